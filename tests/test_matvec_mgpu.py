"""`kernels.matvec_mgpu` (Mosaic GPU's interpreter on CPU) against `kernels.matvec`'s Triton
launches it would replace, lowered for CUDA at the real shapes, and the model's one-row step
with it (`model.ROW_TMA`) against the XLA path."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax import masks, model
from dllm_jax.kernels import flash_mgpu, matvec, matvec_mgpu

from test_matvec import CFG, check_one_row_step


def _pair_inputs(key, e, f):
  k = jax.random.split(key, 6)
  x = (2 * jax.random.normal(k[0], (e,))).astype(jnp.bfloat16)
  g = (e ** -0.5 * jax.random.normal(k[1], (f, e))).astype(jnp.bfloat16)
  u = (e ** -0.5 * jax.random.normal(k[2], (f, e))).astype(jnp.bfloat16)
  parts = jax.random.normal(k[3], (3, e), jnp.float32)
  scale = (1 + 0.2 * jax.random.normal(k[4], (e,))).astype(jnp.bfloat16)
  return x, g, u, parts, scale


@pytest.mark.parametrize("add,norm,defer_sum", [
    (None, False, True), (None, True, False), ("parts", True, True), ("parts", False, False),
    ("row", True, True), ("row", False, True)])
def test_silu_pair_equals_the_triton_launch(add, norm, defer_sum):
  # 208 rows on 3 CTAs: two runs of 72 rows and one of 64 (two row counts, padded to 128 and 64
  # for the register layout); 4 steps through 3 slots (a refill and the unrolled remainder).
  e, f = 256, 208
  x, g, u, parts, scale = _pair_inputs(jax.random.key(0), e, f)
  add_E = {"parts": parts, "row": parts[0].astype(jnp.bfloat16), None: None}[add]
  kw = dict(add_E=add_E, norm_scale_E=scale if norm else None, eps=1e-5)
  act, row = matvec_mgpu.silu_pair(x, g, u, ctas=3, slots=3, defer_sum=defer_sum,
                                   interpret=True, **kw)
  (want,), want_row = matvec.norm_matvec(x, (g, u), silu_pair=True, out_major=True,
                                         interpret=True, **kw)
  assert act.shape == (f,) and act.dtype == jnp.bfloat16
  # The same roundings in the same places; only the order of float32 sums differs.
  np.testing.assert_allclose(np.asarray(act, np.float32), np.asarray(want, np.float32),
                             rtol=1e-2, atol=1e-2)
  assert np.mean(np.asarray(act) == np.asarray(want)) > 0.95
  if add is None:
    assert row is None and want_row is None
  else:
    np.testing.assert_array_equal(np.asarray(row, np.float32), np.asarray(want_row, np.float32))


@pytest.mark.parametrize("n,splits,ctas,slots,defer_sum", [
    (96, 2, 4, 3, True), (96, 1, 3, 2, False), (96, 4, 8, 12, None),
    (112, 2, 6, 3, None)])  # 112 rows on 3 CTAs a split: runs of 40, 40 and 32
def test_matvec_parts_equal_the_triton_partials(n, splits, ctas, slots, defer_sum):
  k = 512  # 8 steps of 64: a split's steps through `slots` slots, remainder unrolled
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (k,)).astype(jnp.bfloat16)
  w = (k ** -0.5 * jax.random.normal(kw, (n, k))).astype(jnp.bfloat16)
  got = matvec_mgpu.matvec_parts(x, w, splits=splits, ctas=ctas, slots=slots,
                                 defer_sum=defer_sum, interpret=True)
  want = matvec.matvec_partials(x, w, splits=splits, out_major=True, interpret=True)
  assert got.shape == (splits, n) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  full = jnp.dot(w.astype(jnp.float32), x.astype(jnp.float32))
  np.testing.assert_allclose(got.sum(0), full, rtol=1e-4, atol=1e-4)


def test_row_plan_spreads_rows_evenly():
  for n, ctas in ((8960, 132), (8960, 264), (1536, 66), (18944, 132), (64, 8), (208, 3)):
    n_big, big, small = matvec_mgpu.row_plan(n, ctas)
    assert n_big * big + (ctas - n_big) * small == n
    assert big % 8 == 0 and small % 8 == 0 and big - small == (8 if n_big else 0)
  assert matvec_mgpu.row_plan(8960, 132) == (64, 72, 64)
  assert matvec_mgpu.row_plan(8960, 140) == (0, 64, 64)  # no unused bigger size to allocate
  with pytest.raises(ValueError, match="row_plan"):
    matvec_mgpu.row_plan(100, 3)  # not whole units
  with pytest.raises(ValueError, match="row_plan"):
    matvec_mgpu.row_plan(64, 9)  # fewer units than CTAs


def test_defaults_fit_shared_memory_and_fill_the_sms():
  # The 1.5B's gate/up: two CTAs an SM of 40/32-row runs (each tile given 64 rows: about 103 KiB
  # a CTA), 4 slots; the 7B's, with 70 KiB of float32 parts a CTA, one of 144/136-row runs (tiles
  # of 192 rows) in 2 slots (3 do not fit), and in 3 with the o launch's 2 parts.
  assert matvec_mgpu._pair_plan(1536, 8960, 5, None, None, 132) == (264, 4)
  assert matvec_mgpu._pair_plan(3584, 18944, 5, None, None, 132) == (132, 2)
  assert matvec_mgpu._pair_plan(3584, 18944, 2, None, None, 132) == (132, 3)
  assert matvec_mgpu._pair_plan(256, 208, 0, None, None, 132) == (26, 4)  # one unit a CTA
  for e, f, parts in ((1536, 8960, 5), (3584, 18944, 5), (256, 208, 0)):
    ctas, slots = matvec_mgpu._pair_plan(e, f, parts, None, None, 132)
    big = matvec_mgpu.row_plan(f, ctas)[1]
    assert matvec_mgpu._pair_smem(e, parts, big, slots) <= matvec_mgpu.SMEM_BYTES
  with pytest.raises(ValueError, match="shared memory"):
    matvec_mgpu._pair_plan(3584, 18944, 5, 132, 3, 132)  # the 7B at 3 slots: 235 KiB
  # The wgmma products read a tile's own rows (no padding) and stage a [64, run] output: the
  # 1.5B's and the 7B's plans fit.
  assert matvec_mgpu._pair_plan(1536, 8960, 4, None, None, 132, "wgmma") == (264, 4)
  assert matvec_mgpu._parts_plan(18944, 3584, None, None, None, 132, "wgmma") == (4, 132, 12)
  assert matvec_mgpu._parts_plan(18944, 3584, None, None, None, 132) == (4, 132, 12)
  assert matvec_mgpu._parts_plan(8960, 1536, None, None, None, 132) == (4, 132, 12)
  assert matvec_mgpu._parts_plan(512, 96, None, None, None, 132) == (1, 12, 12)  # too few to split
  assert matvec_mgpu._parts_plan(8960, 1536, None, None, 20, 132)[2] == 20  # given, fits: kept
  with pytest.raises(ValueError, match="shared memory"):
    matvec_mgpu._parts_plan(18944, 3584, None, None, 14, 132)  # given slots are not cut
  with pytest.raises(ValueError, match="shared memory"):
    matvec_mgpu._parts_plan(8960, 1536, 1, 8, 32, 132)  # 192-row runs in 32 slots


def test_bad_inputs_are_refused():
  x, g, u, parts, scale = _pair_inputs(jax.random.key(2), 256, 64)
  pair = lambda **kw: matvec_mgpu.silu_pair(**{**dict(x_E=x, gate_FE=g, up_FE=u, ctas=2,
                                                      interpret=True), **kw})
  with pytest.raises(ValueError, match="out-major weights"):
    pair(gate_FE=g.T)
  with pytest.raises(ValueError, match="differ"):
    pair(up_FE=u[:56])
  with pytest.raises(ValueError, match="not bfloat16"):
    pair(x_E=x.astype(jnp.float32), gate_FE=g.astype(jnp.float32), up_FE=u.astype(jnp.float32))
  with pytest.raises(ValueError, match="multiple of 128"):
    pair(x_E=x[:192], gate_FE=g[:, :192], up_FE=u[:, :192])
  with pytest.raises(ValueError, match="add_E"):
    pair(add_E=parts[:, :128])
  with pytest.raises(ValueError, match="norm_scale_E"):
    pair(norm_scale_E=scale[:128])
  with pytest.raises(ValueError, match="slots"):
    pair(slots=0)
  with pytest.raises(ValueError, match="slots"):
    pair(slots=33)  # more barriers than Mosaic GPU allocates in a group
  with pytest.raises(ValueError, match="GPU only"):
    pair(products="wgmma")  # interpreted
  with pytest.raises(ValueError, match="products"):
    pair(products="tensor")
  with pytest.raises(ValueError, match="row_plan"):
    pair(ctas=9)  # 64 rows are 8 units
  w = g[:, :256]
  with pytest.raises(ValueError, match="splits"):
    matvec_mgpu.matvec_parts(x, w, splits=3, interpret=True)  # 4 steps
  with pytest.raises(ValueError, match="ctas"):
    matvec_mgpu.matvec_parts(x, w, splits=2, ctas=3, interpret=True)
  with pytest.raises(ValueError, match="differ"):
    matvec_mgpu.matvec_parts(x, w.astype(jnp.float32), interpret=True)


@pytest.mark.parametrize("e,f,parts,defer_sum,products", [
    (1536, 8960, 4, None, "cuda_cores"), (1536, 8960, 4, False, "cuda_cores"),
    (1536, 8960, 4, True, "cuda_cores"), (1536, 8960, 4, None, "wgmma"),
    (3584, 18944, 2, None, "cuda_cores"), (3584, 18944, 2, None, "wgmma")])  # 1.5B, 7B
def test_gpu_bodies_lower_for_cuda(e, f, parts, defer_sum, products, lower_for_cuda):
  # The interpreter runs neither the register layouts nor the CTA counts of a GPU; this traces
  # and lowers both launches as the model calls them at the real shapes (default knobs, the
  # parts the o launch leaves on 132 SMs) for CUDA on the CPU (shared memory that does not fit
  # is an error here).
  assert matvec.pick_splits(e, e) == parts
  sd = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  assert matvec_mgpu._sms() == 132  # the CPU's default SM count: an H100's and an H200's
  pair = lambda x, g, u, p, s: matvec_mgpu.silu_pair(x, g, u, add_E=p, norm_scale_E=s,
                                                     defer_sum=defer_sum, products=products)
  down = lambda x, w: matvec_mgpu.matvec_parts(x, w, defer_sum=defer_sum, products=products)
  for fn, args in ((pair, (sd((e,), bf), sd((f, e), bf), sd((f, e), bf),
                           sd((parts, e), jnp.float32), sd((e,), bf))),
                   (down, (sd((f,), bf), sd((e, f), bf)))):
    text = lower_for_cuda(fn, *args)
    assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 1


CFG_TMA = dataclasses.replace(CFG, hidden_size=128, intermediate_size=384, head_dim=32,
                              kernel_layout="out_in")


# (down alone, which no default takes, was dropped in session 38 for CI's time: both launches
# on TMA run its launch beside the Triton ones' neighbours already.)
@pytest.mark.parametrize("stacked,launches", [(False, ("gate_up", "down")),
                                               (True, ("gate_up", "down")),
                                               (False, ("gate_up",))])
def test_model_one_row_step_with_tma_launches_equals_xla(monkeypatch, stacked, launches):
  # wgmma's products stand for the GPU's choice: the interpreter runs the CUDA cores' instead.
  monkeypatch.setattr(model, "ROW_TMA", {k: "wgmma" if k in launches else None
                                         for k in ("gate_up", "down")})
  jax.clear_caches()  # ROW_TMA is read as the step is traced: no other case's trace
  jaxpr, layers = check_one_row_step(CFG_TMA, stacked, masks.MaskSpec("causal"))
  # The chosen MLP launches are Mosaic GPU kernels; q/k/v, o and the others stay Triton's.
  tma_pair, tma_down = "gate_up" in launches, "down" in launches
  assert jaxpr.count("name=norm_matvec") == (0 if tma_pair else layers)
  assert jaxpr.count("name=matvec_partials") == layers * (1 if tma_down else 2)  # o (and down)
  assert len(re.findall(r"name=silu_pair\b", jaxpr)) == (layers if tma_pair else 0)
  assert len(re.findall(r"name=matvec_parts\b", jaxpr)) == (layers if tma_down else 0)
  # One kernel each, which every layer's call shares (`matvec_mgpu._one_lowering`).
  assert jaxpr.count("name=silu_pair_tma") == tma_pair
  assert jaxpr.count("name=matvec_parts_tma") == tma_down


def test_row_tma_applies_only_where_it_can(monkeypatch):
  monkeypatch.setattr(model, "ROW_TMA", {"gate_up": "wgmma", "down": "cuda_cores"})
  # The interpreter runs wgmma's launches with the CUDA cores' products.
  assert model._row_tma(CFG_TMA, True, True) == "cuda_cores"
  assert model._row_tma(CFG_TMA, True, True, parts=5) == "cuda_cores"
  assert model._row_tma(CFG_TMA, False, True) is None  # in_out weights: the Triton launches
  assert model._row_tma(CFG, True, True) is None  # hidden 64: not a multiple of 128
  assert model._row_tma(CFG_TMA, True, False) is None  # compiled, on a CPU (not a Hopper GPU)
  assert model._row_tma(dataclasses.replace(CFG_TMA, dtype="float32"), True, True) is None
  # On a Hopper GPU each launch gets its own products.
  monkeypatch.setattr(flash_mgpu, "on_hopper", lambda: True)
  assert model._row_tma(CFG_TMA, True, False, parts=5) == "wgmma"
  assert model._row_tma(CFG_TMA, True, False) == "cuda_cores"
  # The 7B's gate/up with 64 float32 parts: their buffer alone is 900 KB of shared memory; the
  # down launch still runs.
  big = dataclasses.replace(CFG_TMA, hidden_size=3584, intermediate_size=18944)
  assert model._row_tma(big, True, True) and model._row_tma(big, True, True, parts=64) is None
  # Each launch off alone.
  monkeypatch.setattr(model, "ROW_TMA", {"gate_up": "wgmma", "down": None})
  assert model._row_tma(CFG_TMA, True, False) is None
  assert model._row_tma(CFG_TMA, True, False, parts=5) == "wgmma"
  monkeypatch.setattr(model, "ROW_TMA", {"gate_up": None, "down": None})
  assert model._row_tma(CFG_TMA, True, True, parts=5) is None


def test_interpreter_finds_no_race(monkeypatch):
  # A slot is refilled by TMA while the loop goes on: the interpreter's race detector (vector
  # clocks over the copies, barriers and reads) must find every refill ordered after the reads,
  # and no read of a tile's padding rows overlapping another tile's copy. jax 0.11's detector
  # also orders the generic proxy's reads before the async proxy's refill only through a proxy
  # fence (commit_smem): without it, or with tiles packed at their own heights, it fails here.
  # (Private names of the interpreter, in jax 0.10.2, which CI installs, and 0.11.2; another jax
  # may move them.)
  ipc = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call")
  params = matvec_mgpu._interpret_params()
  if not (hasattr(params, "detect_races") and hasattr(ipc, "get_races")):
    pytest.skip("this jax's Mosaic GPU interpreter has no race detector")
  monkeypatch.setattr(matvec_mgpu, "_interpret_params",
                      lambda: dataclasses.replace(params, detect_races=True))
  jax.clear_caches()  # the launches are jitted: read as they are traced, not from a cached trace
  x, g, u, parts, scale = _pair_inputs(jax.random.key(3), 256, 208)
  act, _ = matvec_mgpu.silu_pair(x, g, u, add_E=parts, norm_scale_E=scale, ctas=3, slots=2,
                                 interpret=True)
  jax.block_until_ready(act)
  assert not ipc.get_races().races_found
  # One slot: every step's tile lands where the previous step's was read.
  got = matvec_mgpu.matvec_parts(x, g[:96], splits=2, ctas=4, slots=1, interpret=True)
  jax.block_until_ready(got)
  assert not ipc.get_races().races_found


def test_matvec_tma_benchmark_runs_every_row(load_benchmark, monkeypatch, tmp_path):
  # benchmarks/matvec_tma.py end to end on a tiny shape with the kernels interpreted and the
  # profile faked: every row is built, checked against the Triton launch and recorded.
  import json
  import sys

  from benchmarks import decode as decode_bench

  bench = load_benchmark("matvec_tma")
  tiny = dataclasses.replace(CFG_TMA, rms_norm_eps=1e-5)
  monkeypatch.setitem(decode_bench.SHAPES, "tiny", tiny)
  monkeypatch.setattr(bench, "SETS", 2)
  monkeypatch.setattr(bench, "ceilings", lambda rounds: {"copy_GBps": 1000.0})
  profiles = iter([{"gemm": 3.0}, {"norm_matvec": 3.0}, {},  # the third as in session 26
                   {"gemm": 3.0}, {"matvec_partials_x": 3.0}, {"matvec_parts_tma_x": 2.0,
                                                                "triton_gemm": 1.0}])
  monkeypatch.setattr(bench, "kernel_us", lambda run, calls: (run(), next(profiles))[1])
  monkeypatch.setattr(bench, "timeit", lambda fn, arg_sets: (fn(*arg_sets[0]), 10e-6)[1])
  for name in ("silu_pair", "matvec_parts"):
    monkeypatch.setattr(matvec_mgpu, name, functools.partial(getattr(matvec_mgpu, name),
                                                             interpret=True))
  for name in ("norm_matvec", "matvec_partials"):
    monkeypatch.setattr(matvec, name, functools.partial(getattr(matvec, name), interpret=True))
  monkeypatch.setenv("OUT", str(tmp_path))
  monkeypatch.setattr(sys, "argv", ["matvec_tma.py", "--shape", "tiny", "--pair-knobs",
                                    "1,2,1,0", "--down-knobs", "1,3,0,0,2", "--no-probe"])
  bench.main()
  rows = json.loads((tmp_path / "matvec_tma.json").read_text())["rows"]
  assert [r["impl"] for r in rows] == ["xla_gate_up", "triton_gate_up", "tma_gate_up",
                                       "xla_down", "triton_down", "tma_down"]
  for r in rows:
    assert "error" not in r, r
    assert r["wall_us"] == 5.0 and r["max_rel_err"] < 2e-2  # 10 us a call of 2 sets
    weights = 2 if r["op"] == "gate_up" else 1
    weight_bytes = 2 * weights * tiny.hidden_size * tiny.intermediate_size
    assert r["wall_of_copy"] == pytest.approx(weight_bytes / 5e-6 / 1e12)
  # A profile without the launch leaves the row its wall time and says why it has no `us`.
  assert "us" not in rows[2] and "no kernel named like" in rows[2]["profile_error"]
  assert all(r["us"] == 3.0 for i, r in enumerate(rows) if i != 2)
  # Down's optional fifth knob, CTAs an SM (capped, as the launch's default, at a unit of 8 rows
  # a CTA: 16 here).
  assert rows[5]["knobs"]["ctas"] == 16
  assert bench._knobs("4,12,0,1", ("a", "b", "c", "d"), {"e": 1}) == [
      {"a": 4, "b": 12, "c": 0, "d": 1, "e": 1}]
  with pytest.raises(SystemExit):
    bench._knobs("4,12,0,1,2,3", ("a", "b", "c", "d"), {"e": 1})


def test_matvec_tma_probe_lowers_for_cuda(load_benchmark, lower_for_cuda):
  # The benchmark's tensor-core probe runs on a GPU only (a transposed operand): lowered here at
  # the 1.5B shape so that it cannot break unseen before a device call.
  bench = load_benchmark("matvec_tma")
  sd = jax.ShapeDtypeStruct
  x, w = sd((1536,), jnp.bfloat16), sd((8960, 1536), jnp.bfloat16)
  text = lower_for_cuda(lambda x, g, u: bench.probe(x, g, u, ctas=132, slots=4), x, w, w)
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 1


def test_row_tma_flag_of_the_decode_benchmarks(monkeypatch):
  # One --row-tma for decode.py, decode_profile.py and matvec_model_check.py: both launches on
  # one kind of products, or each launch its own (or Triton's).
  import argparse

  from benchmarks import common

  monkeypatch.setattr(model, "ROW_TMA", {"gate_up": None, "down": None})
  ap = argparse.ArgumentParser()
  common.add_row_tma_argument(ap)
  assert ap.parse_args([]).row_tma is None
  assert ap.parse_args(["--row-tma", "cuda_cores"]).row_tma == {"gate_up": "cuda_cores",
                                                                "down": "cuda_cores"}
  assert (ap.parse_args(["--row-tma", "gate_up=wgmma,down=triton"]).row_tma
          == {"gate_up": "wgmma", "down": None})
  assert ap.parse_args(["--row-tma", "down=wgmma"]).row_tma == {"gate_up": None, "down": "wgmma"}
  for bad in (["tensor"], ["gate_up=tensor"], ["up=wgmma"], ["gate_up"],
              ["gate_up=wgmma,gate_up=triton"], []):  # [] : no value (no silent default)
    with pytest.raises(SystemExit):
      ap.parse_args(["--row-tma", *bad])
  common.apply_row_tma(ap.parse_args(["--row-tma", "wgmma"]).row_tma)
  assert model.ROW_TMA == {"gate_up": "wgmma", "down": "wgmma"}
  common.apply_row_tma(None)  # no flag: the model's setting stays
  assert model.ROW_TMA == {"gate_up": "wgmma", "down": "wgmma"}
  common.apply_row_tma(ap.parse_args(["--row-tma", "triton"]).row_tma)
  assert model.ROW_TMA == {"gate_up": None, "down": None}


def test_each_launch_lowers_once_per_program(lower_for_cuda):
  # Three layers' MLPs chained as the per-layer step chains them: one Mosaic GPU kernel each for
  # gate/up and down (one hash), which the GPU runtime compiles once, not once a layer.
  e, f, layers = 128, 384, 3
  sd = jax.ShapeDtypeStruct
  bf = jnp.bfloat16

  def mlps(x, parts, scale, gates, ups, downs):
    for i in range(layers):
      act, x = matvec_mgpu.silu_pair(x, gates[i], ups[i], add_E=parts, norm_scale_E=scale)
      parts = matvec_mgpu.matvec_parts(act, downs[i])
    return x, parts

  splits = matvec_mgpu._parts_plan(f, e, None, None, None, matvec_mgpu._sms(), "cuda_cores")[0]
  text = lower_for_cuda(mlps, sd((e,), bf), sd((splits, e), jnp.float32), sd((e,), bf),
                        sd((layers, f, e), bf), sd((layers, f, e), bf), sd((layers, e, f), bf))
  hashes = re.findall(r'kernel_hash = "((?:[^"\\]|\\.)*)"', text)
  assert len(hashes) == len(set(hashes)) == 2, len(hashes)  # lowered once each
