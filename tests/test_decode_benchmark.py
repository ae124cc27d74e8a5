"""benchmarks/decode.py's jax part on a tiny shape (the one-row kernels interpreted): every
measurement runs, and `--kernel-layout auto` decodes the AR rows in the layout decode.py would
(out_in at batch 1 through the one-row kernels) and the forwards in_out, or out_in where a
variant's `--kernel-rows` runs them through the kernels too."""

import dataclasses

import pytest

from dllm_jax.config import ModelConfig


@pytest.fixture()
def bench(load_benchmark, monkeypatch, tmp_path):
  mod = load_benchmark("decode")
  monkeypatch.setenv("OUT", str(tmp_path))
  monkeypatch.setattr(mod, "SHAPES", {"tiny": ModelConfig(
      vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=16, param_dtype="bfloat16", dtype="bfloat16", mask_token_id=255)})
  monkeypatch.setattr(mod, "ceilings", lambda *a, **k: {"matmul_tflops": 1.0, "copy_GBps": 1.0})
  monkeypatch.setattr(mod, "PROMPT", 16)
  monkeypatch.setattr(mod, "NEW", 4)
  monkeypatch.setattr(mod, "FORWARDS", 2)
  return mod


def test_auto_kernel_layout_per_row(bench, tmp_path):
  res = bench.jax_part(["tiny"], [1, 2], ["xla"], [], ["per_layer"], ["pallas"], "auto")
  rows = {r["batch"]: r for r in res["rows"]}
  assert {b: (r["kernel_layout"], r["ar_kernel_layout"]) for b, r in rows.items()} == {
      1: ("in_out", "out_in"), 2: ("in_out", "in_out")}
  for r in rows.values():
    assert isinstance(r["ar"], dict) and r["ar"]["tokens"] == 4 * r["batch"]
    assert r["ar_tokens_per_s"] > 0 and r["sub8_forward_s"] > 0 and r["block32_forward_s"] > 0
  assert (tmp_path / "decode_jax.json").is_file()


def test_kernel_rows_variants(bench, tmp_path):
  from dllm_jax import model

  # (the AR decoder left out: --measure forwards)
  # (no diffusion decoder: test_matvec decodes on the kernels' rows)
  res = bench.jax_part(["tiny"], [1], ["xla"], [], ["per_layer"], ["pallas"], "auto",
                       [1, 32], ["forwards"])
  rows = {r["kernel_rows"]: r for r in res["rows"]}
  assert {k: r["diffusion_kernel_layout"] for k, r in rows.items()} == {1: "in_out",
                                                                        32: "out_in"}
  for r in rows.values():
    assert "ar" not in r and "ar_kernel_layout" not in r
    assert r["sub8_forward_s"] > 0 and r["block32_forward_s"] > 0
  assert model.KERNEL_ROWS == 1  # (restored)
  text = bench.report(str(tmp_path))
  assert "| tiny | xla | per_layer | pallas | 32 | 1 |" in text


def test_kernel_rows_flag_is_checked(load_benchmark):
  import argparse

  common = load_benchmark("common")
  assert common.parse_kernel_rows("1,32") == [1, 32]
  for bad in ("a", "1,64", "0", ""):
    with pytest.raises(argparse.ArgumentTypeError, match="integers in 1..32"):
      common.parse_kernel_rows(bad)
