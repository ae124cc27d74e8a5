"""benchmarks/train_step.py on a tiny shape over the fake CPU devices: one device and FSDP over
four, at a constant batch per shard (#8's scaling run, whose GPUs are not lent yet), with
the compiler's per-device memory; and its command-line errors."""

import dataclasses
import subprocess
import sys

import pytest

from dllm_jax.config import ModelConfig

# (the benchmark draws token ids below 32000)
TINY = ModelConfig(vocab_size=32768, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, mask_token_id=32767)


@pytest.fixture()
def bench(load_benchmark, monkeypatch, tmp_path):
  mod = load_benchmark("train_step")
  monkeypatch.setenv("OUT", str(tmp_path))
  monkeypatch.setattr(mod, "SHAPES", {"tiny": TINY})
  monkeypatch.setattr(mod, "ceilings", lambda *a, **k: {"matmul_tflops": 1.0, "copy_GBps": 1.0})
  return mod


def test_fsdp_rows_keep_the_batch_per_device_and_report_scaling(bench, tmp_path):
  res = bench.run("tiny", 64, ["3l:xla"], [2], ["full"], 1, devices=[1, 4, 16])
  best = {(r["variant"], r["devices"]): r for r in res["rows"] if r.get("best")}
  assert set(best) == {("3l:xla", 1), ("3l:xla", 4)}
  for (variant, n), r in best.items():
    assert r["mesh"] == {"data": 1, "fsdp": n, "tensor": 1}
    assert r["batch_per_shard"] == 2 and r["batch"] == 2 * n  # constant rows per device
    assert r["real_tokens_per_s_per_device"] == pytest.approx(r["real_tokens_per_s"] / n)
    assert r["compiled_gib_per_device"] > 0 and r["step_s"] > 0 and r["loss"] > 0
  # The sharded state is split: each device holds less of it than one device holds alone.
  assert (best[("3l:xla", 4)]["compiled_gib_per_device"]
          < best[("3l:xla", 1)]["compiled_gib_per_device"])
  (missing,) = [r for r in res["rows"] if r.get("devices") == 16]
  assert "16 devices asked for, 8 present" in missing["error"]
  text = bench.report(res)
  assert "| 3l:xla | 4 | fsdp4 | full | 8 |" in text
  scaling = (best[("3l:xla", 4)]["real_tokens_per_s_per_device"]
             / best[("3l:xla", 1)]["real_tokens_per_s"])
  assert f"| {scaling:.1%} |" in text
  assert (tmp_path / "train_step.json").is_file()


def test_mesh_flag_is_checked(bench):
  assert bench.parse_mesh("data=2,fsdp=-1") == {"data": 2, "fsdp": -1, "tensor": 1}
  for bad in ("fsdp=x", "pipeline=2", "data"):
    with pytest.raises(ValueError, match="expected data=D,fsdp=F,tensor=T"):
      bench.parse_mesh(bad)
  out = subprocess.run([sys.executable, "benchmarks/train_step.py", "--mesh", "fsdp=two"],
                       capture_output=True, text=True)
  assert out.returncode == 2 and "expected data=D,fsdp=F,tensor=T" in out.stderr
