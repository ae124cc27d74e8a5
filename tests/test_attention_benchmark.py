"""benchmarks/attention.py's bookkeeping: variant specs are checked before a GPU call is spent on
them, and every fraction is taken against the best ceiling reading of the run."""

import jax.numpy as jnp
import pytest

from dllm_jax import masks
from dllm_jax.kernels import flash_mgpu


@pytest.fixture()
def bench(load_benchmark):
  return load_benchmark("attention")


def test_parse_variants(bench):
  assert bench.parse_variants("base:;sum:PAIR_ADD=0,FUSED_GROUP=8") == [
      ("base", {}), ("sum", {"PAIR_ADD": 0, "FUSED_GROUP": 8})]
  with pytest.raises(SystemExit, match="flash_mgpu has no knob 'NO_SUCH'"):
    bench.parse_variants("x:NO_SUCH=1")
  with pytest.raises(SystemExit, match="flash_mgpu has no knob 'dkv'"):  # a function, not a knob
    bench.parse_variants("x:dkv=1")
  with pytest.raises(SystemExit, match=r"FWD_TURNS='yes' is not an integer \(booleans: 0/1\)"):
    bench.parse_variants("x:FWD_TURNS=yes")
  assert hasattr(flash_mgpu, "FWD_TURNS")
  # flash's own knobs by prefix
  assert bench.parse_variants("x:flash.DELTA_IN_DQ=0,PERSISTENT=1") == [
      ("x", {"flash.DELTA_IN_DQ": 0, "PERSISTENT": 1})]
  with pytest.raises(SystemExit, match="kernels.flash has no knob 'NOPE'"):
    bench.parse_variants("x:flash.NOPE=0")
  # the timed Tiles' fields by prefix, strings allowed
  assert bench.parse_variants("x:tiles.forward=triton,tiles.block_q=128,DKV_HEADS=7") == [
      ("x", {"tiles.forward": "triton", "tiles.block_q": 128, "DKV_HEADS": 7})]
  with pytest.raises(SystemExit, match="flash.Tiles has no field 'nope'"):
    bench.parse_variants("x:tiles.nope=1")
  # typed as the field is: a boolean 'False' is False, not a truthy string
  assert bench.parse_variants("x:tiles.fuse_dq=False;y:tiles.dkv=mosaic,tiles.fuse_dq=1") == [
      ("x", {"tiles.fuse_dq": False}), ("y", {"tiles.dkv": "mosaic", "tiles.fuse_dq": True})]
  with pytest.raises(SystemExit, match="tiles.fuse_dq='maybe' is not a boolean"):
    bench.parse_variants("x:tiles.fuse_dq=maybe")
  with pytest.raises(SystemExit, match="tiles.block_q='abc' is not an integer"):
    bench.parse_variants("x:tiles.block_q=abc")
  # Tiles' own checks run before any GPU time is spent
  with pytest.raises(SystemExit, match=r"Tiles.dq='cuda': expected one of"):
    bench.parse_variants("x:tiles.dq=cuda")
  with pytest.raises(SystemExit, match="fuse_dq=True needs dkv='mosaic'"):
    bench.parse_variants("x:tiles.dkv=triton,tiles.fuse_dq=1")


def test_variant_rows_time_each_variant_with_its_tiles_and_knobs(bench, monkeypatch):
  # A variant's tiles.FIELD knobs replace the timed Tiles' fields for that variant only; its
  # module knobs are set while it runs and restored after.
  seen = []
  monkeypatch.setattr(bench, "check_grads", lambda impls, tiles, tag: True)
  monkeypatch.setattr(bench, "save", lambda: None)

  def row(shape, spec, length, tiles, impls, record):
    seen.append((tiles.forward, flash_mgpu.DKV_HEADS))
    return {}
  monkeypatch.setattr(bench, "train_row", row)
  before = flash_mgpu.DKV_HEADS
  bench.variant_rows(bench.parse_variants("a:tiles.forward=triton,DKV_HEADS=7;b:"),
                     bench.flash.Tiles(), ("pallas",), profile=False)
  assert seen == [("triton", 7)] * 4 + [("auto", before)] * 4
  assert flash_mgpu.DKV_HEADS == before
  # --variant-shapes: one head shape, both layouts
  seen.clear()
  bench.variant_rows(bench.parse_variants("a:"), bench.flash.Tiles(), ("pallas",), profile=False,
                     shapes=bench.variant_shapes("qwen2.5-1.5b"))
  assert len(seen) == 2
  with pytest.raises(SystemExit, match="--variant-shapes: unknown"):
    bench.variant_shapes("qwen2.5-3b")


def test_dq_variants_time_triton_dq_per_variant_against_the_first(bench, monkeypatch):
  # --sections dq --dq-variants: the dq kernels under each variant's knobs and tiles, and every
  # later variant's row compared with the first's of the same case.
  seen = []

  def row(shape, spec, length, tiles, tag, like):
    seen.append((tag, spec.num_streams, tiles.num_warps_bwd, bench.flash.DELTA_IN_DQ,
                 None if like is None else like["tag"]))
    return {"tag": tag}
  monkeypatch.setattr(bench, "dq_row", row)
  before = bench.flash.DELTA_IN_DQ
  bench.dq_variant_rows(bench.parse_variants("a:;b:flash.DELTA_IN_DQ=0,tiles.num_warps_bwd=8"),
                        bench.flash.Tiles())
  assert [s[:2] for s in seen] == [("a", 3), ("a", 3), ("a", 2), ("a", 2)] + [
      ("b", 3), ("b", 3), ("b", 2), ("b", 2)]  # 3L first
  assert {s[2:] for s in seen[:4]} == {(4, before, None)}
  assert {s[2:] for s in seen[4:]} == {(8, 0, "a")}
  assert bench.flash.DELTA_IN_DQ == before


def test_dq_row_times_both_dq_kernels_and_checks_each_against_the_first(bench, monkeypatch):
  # The dq section times Triton's and the Mosaic dq kernel on the same residuals; a later
  # variant's kernel whose dq differs from the first variant's is reported, not timed.
  shift = {"mosaic": 0.0}
  monkeypatch.setattr(bench.flash, "_forward", lambda q, *a: (q, jnp.zeros(q.shape[:3])))
  monkeypatch.setattr(bench.flash, "_triton_dq", lambda q, *a: (q, None))
  monkeypatch.setattr(bench.flash_mgpu, "dq", lambda q, *a: (q + shift["mosaic"], None))
  monkeypatch.setattr(bench, "timeit", lambda fn, sets, **kw: 2e-4 if "x" in shift else 1e-4)
  monkeypatch.setattr(bench, "save", lambda: None)
  monkeypatch.setitem(bench.SHAPES, "tiny", (2, 1, 16))
  spec = masks.MaskSpec("diffusion", 32, 1)
  first = bench.dq_row("tiny", spec, 64, bench.flash.Tiles(), tag="a")
  assert first["triton_us"] == first["mosaic_us"] == pytest.approx(100.0)
  assert first["mosaic_vs_triton"] == pytest.approx(1.0)
  shift.update(mosaic=1.0, x=True)  # the second variant's Mosaic dq differs
  second = bench.dq_row("tiny", spec, 64, bench.flash.Tiles(), tag="b", like=first)
  assert second["triton_err_vs_first"] == 0.0 and second["triton_us"] == pytest.approx(200.0)
  assert second["mosaic_err_vs_first"] > 1e-2
  assert second["mosaic_us"] == "dq differs from the first variant's: not timed"
  assert "mosaic_vs_triton" not in second


def test_baseline_forward_is_a_variant_knob(bench, monkeypatch, tmp_path):
  # --baseline-forward FILE: the knob BASELINE_FORWARD=1 runs FILE's forward in place of the
  # current one (an earlier kernel timed in the same run), 0 the current one.
  (tmp_path / "old.py").write_text("def forward(*args, **kw):\n  return ('old', args)\n")
  monkeypatch.setattr(flash_mgpu, "forward", lambda *args, **kw: ("new", args))
  monkeypatch.setattr(flash_mgpu, "BASELINE_FORWARD", 0, raising=False)
  bench.add_baseline_forward(str(tmp_path / "old.py"))
  assert bench.parse_variants("old:BASELINE_FORWARD=1") == [("old", {"BASELINE_FORWARD": 1})]
  assert flash_mgpu.forward(1, 2) == ("new", (1, 2))
  monkeypatch.setattr(flash_mgpu, "BASELINE_FORWARD", 1)
  assert flash_mgpu.forward(1, 2) == ("old", (1, 2))


def test_ceilings_take_the_best_reading_and_refresh_fractions(bench, monkeypatch):
  readings = iter([(700.0, 3000.0), (800.0, 3200.0)])

  def fake(rounds=3, before=None):  # what common.ceilings returns: best of all readings so far
    mm, cp = next(readings)
    mm_all = list((before or {}).get("matmul_tflops_all", [])) + [mm]
    cp_all = list((before or {}).get("copy_GBps_all", [])) + [cp]
    return {"matmul_tflops": max(mm_all), "copy_GBps": max(cp_all),
            "matmul_tflops_all": mm_all, "copy_GBps_all": cp_all}

  monkeypatch.setattr(bench, "common_ceilings", fake)
  monkeypatch.setattr(bench, "save", lambda: None)
  bench.ceilings()
  row = {"pallas_fwdbwd_tflops": 350.0, "pallas_fwdbwd_frac": 0.5, "pallas_GBps": 1600.0,
         "pallas_bw_frac": 1600.0 / 3000.0, "pallas_fwd_ms": "failed: OOM"}
  bench.RESULTS["train"].append(row)
  bench.ceilings()  # a better reading after the rows: every fraction is taken against it
  assert bench.RESULTS["ceil"]["matmul_tflops"] == 800.0
  assert bench.RESULTS["ceil"]["matmul_tflops_all"] == [700.0, 800.0]
  assert row["pallas_fwdbwd_frac"] == pytest.approx(350.0 / 800.0)
  assert row["pallas_bw_frac"] == pytest.approx(1600.0 / 3200.0)
  assert row["pallas_fwd_ms"] == "failed: OOM"


def test_without_tiles_the_default_kernels_are_timed(load_benchmark):
  from dllm_jax.kernels import flash
  bench = load_benchmark("attention")
  assert bench.tiles_to_time(-1) == flash.Tiles()
  assert bench.tiles_to_time(0) == bench.TUNE[0] and bench.TUNE[0].dkv == "triton"


def test_train_fns_build_for_every_tiles_variant(bench):
  # A variant's Tiles (here fuse_dq, which needs the Mosaic dk/dv kernel) must not break the
  # other impls' construction: each impl's Tiles is checked when it runs (a session's GPU call
  # was lost to the "triton" impl's Tiles being built eagerly).
  from dllm_jax import masks
  spec = masks.MaskSpec("diffusion", 32, 1)
  meta = masks.layout_meta(spec, bench.jnp.zeros((1, 64), bench.jnp.int32))
  fns = bench._train_fns(spec, meta, bench.flash.Tiles(dkv="mosaic", fuse_dq=True))
  assert {"pallas", "xla", "triton", "mosaic_dkv", "triton_dkv", "mosaic_fused"} <= set(fns)
  q = bench.jnp.ones((1, 128, 2, 64), bench.jnp.float32)
  k = bench.jnp.ones((1, 128, 1, 64), bench.jnp.float32)
  # every kernel Triton's, dq included: traced (its Tiles built and checked), not run on the CPU
  assert bench.jax.eval_shape(fns["triton"], q, k, k).shape == q.shape


def test_idle_time_is_the_gaps_between_kernels_a_call(bench):
  # two calls of [a 0-10, b 13-20] then [a 30-40, b 41-50] (ns), issued back to back: b waits
  # 3 + 1 ns, a waits 10 ns (between the calls)
  events = [("a", 0, 10), ("b", 13, 20), ("a", 30, 40), ("b", 41, 50)]
  row = bench.idle_from_events(events, calls=2)
  assert row["span_us"] == 50 / 1e3 / 2 and row["busy_us"] == 36 / 1e3 / 2
  assert row["idle_before_us"] == {"a": 10 / 1e3 / 2, "b": 4 / 1e3 / 2}
  with pytest.raises(ValueError, match="no GPU kernel"):
    bench.idle_from_events([], calls=1)



def test_forward_protocol_model_finds_every_schedule_safe_and_a_planted_deadlock(load_benchmark):
  # benchmarks/forward_protocol_model.py (a hand model of flash_mgpu.forward's barriers) must keep
  # running, find the schedules safe, and still see a deadlock: the producer waiting for V's slot
  # before K's copy under FWD_OVERLAP.
  model = load_benchmark("forward_protocol_model")
  plans = [[(1, 2, 1), (0, 3, 0)], [(0, 3, 0), (0, 0, 1), (0, 1, 0)]]
  for spec in plans:
    for overlap, meetings in ((0, 2), (1, 1), (1, 2), (2, 1), (2, 2)):
      for turns in (True, False):
        result = model.explore(model.items_of(spec), overlap, meetings, turns, False)
        assert result[0] == "ok", (spec, overlap, meetings, turns, result)
  producer = model.producer

  def waits_for_v_first(items, overlap):  # the default's wait order under overlap
    for op in producer(items, 0):
      yield op
  model.producer = waits_for_v_first
  assert model.explore(model.items_of([(0, 3, 0)]), 1, 1, True, False)[0] == "deadlock"
