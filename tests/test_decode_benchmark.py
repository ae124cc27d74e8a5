"""benchmarks/decode.py's jax part on a tiny shape (the one-row kernels interpreted): every
measurement runs, and `--kernel-layout auto` decodes the AR rows in the layout decode.py would
(out_in at batch 1 through the one-row kernels) and the forwards in_out; `--measure` leaves
out what it does not name."""

import dataclasses

import pytest

from dllm_jax.config import ModelConfig


@pytest.fixture()
def bench(load_benchmark, monkeypatch, tmp_path):
  mod = load_benchmark("decode")
  monkeypatch.setenv("OUT", str(tmp_path))
  monkeypatch.setattr(mod, "SHAPES", {"tiny": ModelConfig(
      vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=16, param_dtype="bfloat16", dtype="bfloat16")})
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


def test_measure_leaves_out_what_it_does_not_name(bench, tmp_path):
  # (--measure forwards: no AR decoder compiled; the forwards in their mode's layout)
  res = bench.jax_part(["tiny"], [1], ["xla"], [], ["per_layer"], ["pallas"], "auto",
                       ["forwards"])
  row, = res["rows"]
  assert "ar" not in row and "ar_kernel_layout" not in row
  assert row["diffusion_kernel_layout"] == "in_out"
  assert row["sub8_forward_s"] > 0 and row["block32_forward_s"] > 0
  text = bench.report(str(tmp_path))
  assert "| tiny | xla | per_layer | pallas | 1 | n/a |" in text


def test_profile_kernels_are_named_by_their_ops(bench, load_benchmark):
  # decode_profile.py's top kernels carry the jax op each came from (the compiled HLO's
  # op_name), named as a GPU trace names them ('.' written '_').
  common = load_benchmark("common")
  line = ('  %loop_transpose_fusion.29 = bf16[1,8,3,3,64]{4,3,2,1,0} fusion(%p), kind=kLoop, '
          'calls=%fused_transpose.29, metadata={op_name="jit(loop)/layers_3/attn/transpose" '
          'source_file="model.py" source_line=3}')
  assert common.hlo_kernel_ops(line + "\n  %add.1 = f32[] add(%a, %b)") == {
      "loop_transpose_fusion_29": "jit(loop)/layers_3/attn/transpose bf16[1,8,3,3,64]{4,3,2,1,0}"}
  # The forward loop's compiled program: its kernels come from the model's layers.
  import jax

  from dllm_jax import model

  cfg = bench.SHAPES["tiny"]
  params = model.with_layout(model.init_params(cfg, jax.random.key(0)), "per_layer")
  run = bench.forward_loop(cfg, params, 1, 8, bench.PROMPT + 8, 2, True)
  ops = common.hlo_kernel_ops(run.hlo_text())
  assert any("Transformer/layers_1" in op for op in ops.values()), ops
  assert run(0).shape == (1, 8)
