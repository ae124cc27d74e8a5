"""The Mosaic GPU training kernels (`kernels.flash_mgpu`) in jax's Mosaic GPU interpreter.

The interpreter runs each kernel's interpret body (P, dS through shared memory; Q^T, dO^T
streamed); the GPU bodies share their plans, copies, barriers and arithmetic (the forward's
opt-in FWD_OVERLAP aside: its own schedule, lowered here only) and are checked on the device
against the float32 reference (benchmarks/attention.py --sections check).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax import attention, masks
from dllm_jax.kernels import flash, flash_mgpu

MOSAIC = flash.Tiles(forward="mosaic")

CASES = [
    # spec, L, B, H, K, D, segment cuts per row (block-aligned)
    # (the interpreter runs a 128-row CTA in seconds: few CTAs each, two outer tiles in the first)
    (masks.MaskSpec("diffusion", 32, 1), 100, 1, 2, 1, 64, [[32, 64]]),  # packed, GQA 2
    (masks.MaskSpec("diffusion", 16, 2), 40, 1, 3, 1, 64, [[]]),  # 3L, GQA 3
    (masks.MaskSpec("causal"), 100, 1, 2, 2, 128, [[40]]),  # D = 128, no GQA
]


def _segments(b, length, cuts):
  if isinstance(cuts, np.ndarray):  # the ids themselves, [B, L]
    return jnp.asarray(cuts, jnp.int32)
  seg = np.zeros((b, length), np.int32)
  for row, row_cuts in enumerate(cuts):
    for c in row_cuts:
      seg[row, c:] += 1
  return jnp.asarray(seg)


@pytest.mark.parametrize("spec,length,b,h,kh,d,cuts", CASES)
def test_mosaic_forward_and_its_gradients_equal_the_reference(spec, length, b, h, kh, d, cuts):
  meta = masks.layout_meta(spec, _segments(b, length, cuts))
  t = meta.positions.shape[1]
  ks = jax.random.split(jax.random.key(length), 4)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, t, kh, d), jnp.float32).astype(jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, t, kh, d), jnp.float32).astype(jnp.bfloat16)
  ct = jax.random.normal(ks[3], (b, t, h, d), jnp.float32).astype(jnp.bfloat16)
  f32 = lambda x: x.astype(jnp.float32)

  def ours(q, k, v):
    return flash.block_sparse_attention(q, k, v, meta.segments, spec, MOSAIC, interpret=True)

  mask = masks.dense_mask(spec, meta, meta)
  ref = lambda q, k, v: attention.xla_attention(q, k, v, mask)
  def out_and_grads(f, *args):
    out, vjp = jax.vjp(f, *args)
    return out, vjp(ct.astype(out.dtype))

  # Under jit, interpret mode compiles each kernel once instead of stepping it op by op.
  got, got_g = jax.jit(lambda: out_and_grads(ours, q, k, v))()
  want, want_g = out_and_grads(ref, f32(q), f32(k), f32(v))
  rel = lambda a, b: float(jnp.linalg.norm(f32(a) - f32(b)) / jnp.linalg.norm(f32(b)))
  assert got.dtype == jnp.bfloat16
  assert rel(got, want) < 5e-3  # bf16 rounding of inputs, P and the output
  # The backward is the Triton one, on this forward's residuals (o and its log-sum-exp).
  for name, g, w in zip("qkv", got_g, want_g):
    assert rel(g, w) < 1e-2, f"d{name}"


def test_mosaic_forward_one_cta_an_item_equals_the_reference(monkeypatch):
  # PERSISTENT=False: a CTA per item, its body inline instead of the loop over items
  monkeypatch.setattr(flash_mgpu, "PERSISTENT", False)
  jax.clear_caches()  # (the kernels read the knob as they are traced)
  test_mosaic_forward_and_its_gradients_equal_the_reference(*CASES[0])
  jax.clear_caches()


def test_mosaic_forward_copies_work_table_rows_in_pieces(monkeypatch):
  # A work-table row wider than one TMA copy's limit (256 elements on the GPU; here 16, so the
  # 32-wide rows of this case come in two pieces, each with its own barrier per item slot).
  monkeypatch.setattr(flash_mgpu, "PLAN_COPY_MAX", 16)
  spec, length, b, h, kh, d, cuts = CASES[0]
  seg = masks.layout_meta(spec, _segments(b, length, cuts)).segments  # T = 200, Tp = 256
  table = flash_mgpu.work_table(spec, length, jnp.pad(seg, [(0, 0), (0, 56)]), b, h, 2, 1)[0]
  assert len(flash_mgpu.plan_pieces(table.shape[-1])) == 2
  test_mosaic_forward_and_its_gradients_equal_the_reference(*CASES[0])


def test_mosaic_forward_with_items_that_visit_nothing_between_others():
  # Over-padded rows (Tp = 384 for T = 100): tiles 1 and 2 visit nothing, and the one CTA runs
  # [0, 1, 2], so an item without visits sits between two others (the shape in which the GPU
  # body's turns once deadlocked; the interpreter runs no turns, so this checks the rest of the
  # item slots' barriers and the zero-visit items' outputs).
  spec = masks.MaskSpec("diffusion", 16, 1)
  meta = masks.layout_meta(spec, _segments(1, 50, [[]]))
  t, tp = meta.positions.shape[1], 384
  ks = jax.random.split(jax.random.key(3), 3)
  q, k, v = (jax.random.normal(kk, (1, tp, 1, 64), jnp.float32).astype(jnp.bfloat16)
             for kk in ks)
  seg = jnp.pad(meta.segments, [(0, 0), (0, tp - t)])
  table = np.asarray(flash_mgpu.work_table(spec, 50, seg, 1, 1, 3, 1)[0])
  v_ = flash_mgpu.visit_list(spec, 50, seg, 3)[1]
  assert table.shape[1] == 3 and table[0, 1, v_ + 1] == table[0, 2, v_ + 1] == 0
  o, lse = jax.jit(lambda: flash_mgpu.forward(q, k, v, seg, spec, 50, interpret=True))()
  mask = masks.dense_mask(spec, meta, meta)
  f32 = lambda x: x.astype(jnp.float32)
  want = attention.xla_attention(f32(q[:, :t]), f32(k[:, :t]), f32(v[:, :t]), mask)
  rel = float(jnp.linalg.norm(f32(o[:, :t]) - want) / jnp.linalg.norm(want))
  assert rel < 5e-3
  assert np.isfinite(np.asarray(o, np.float32)).all()


FUSED = flash.Tiles(forward="triton", dkv="mosaic", fuse_dq=True)


@pytest.mark.parametrize("spec,length,b,h,kh,d,cuts,tiles", [
    # Packed samples with GQA 2 (the segment comparison, one head a CTA, the two CTAs' dK and dV
    # shares added in bf16 (PAIR_ADD); 4 of its 16 visit halves empty, which their warpgroups
    # pass over) and 3L with GQA 3.
    (*CASES[0], flash.Tiles(forward="triton", dkv="mosaic")),
    (*CASES[1], flash.Tiles(forward="triton", dkv="mosaic")),
    # The AR objective's causal mask at head_dim 128 (dkv="auto" keeps Triton's there until this
    # has run on a GPU too).
    (*CASES[2], flash.Tiles(forward="triton", dkv="mosaic")),
    # dQ fused into the dk/dv kernel (head_dim 128 only): packed GQA 2, and 3L with GQA 3.
    (masks.MaskSpec("diffusion", 32, 1), 100, 1, 2, 1, 128, [[32, 64]], FUSED),
    (masks.MaskSpec("diffusion", 16, 2), 40, 1, 3, 1, 128, [[]], FUSED),
])
def test_mosaic_dkv_gradients_equal_the_reference(spec, length, b, h, kh, d, cuts, tiles):
  meta = masks.layout_meta(spec, _segments(b, length, cuts))
  t = meta.positions.shape[1]
  ks = jax.random.split(jax.random.key(length + 1), 4)
  q, ct = (jax.random.normal(kk, (b, t, h, d), jnp.float32).astype(jnp.bfloat16)
           for kk in ks[::3])
  k, v = (jax.random.normal(kk, (b, t, kh, d), jnp.float32).astype(jnp.bfloat16)
          for kk in ks[1:3])
  f32 = lambda x: x.astype(jnp.float32)
  ours = lambda q, k, v: flash.block_sparse_attention(q, k, v, meta.segments, spec, tiles,
                                                      interpret=True)
  mask = masks.dense_mask(spec, meta, meta)
  ref = lambda q, k, v: attention.xla_attention(q, k, v, mask)
  grads = lambda f, *a: jax.vjp(f, *a)[1](ct.astype(a[0].dtype))
  jaxpr = str(jax.make_jaxpr(lambda: grads(ours, q, k, v))())
  # The Mosaic dk/dv kernel ran, not Triton's; beside Triton's dq kernel unless dQ is fused.
  assert "block_sparse_attention_dkv_mgpu" in jaxpr
  assert re.search(r"block_sparse_attention_dkv(?!_mgpu)", jaxpr) is None
  assert ("block_sparse_attention_dq" in jaxpr) == (not tiles.fuse_dq)
  got = jax.jit(lambda: grads(ours, q, k, v))()
  want = grads(ref, f32(q), f32(k), f32(v))
  rel = lambda a, b: float(jnp.linalg.norm(f32(a) - f32(b)) / jnp.linalg.norm(f32(b)))
  for name, g, w in zip("qkv", got, want):
    assert g.dtype == jnp.bfloat16
    assert rel(g, w) < 1e-2, f"d{name}"


# Visit counts matter here: with an even count a head, a dk/dv CTA's slots would line up even
# if the visits of its earlier heads were not counted (a review's mutation passed the even cases
# and hung on an odd one).
@pytest.mark.parametrize("case,heads", [
    # packed, GQA 2: a CTA walks the whole group, no partials; dk/dv CTAs of 7 and 3 visits a
    # head
    ((masks.MaskSpec("diffusion", 32, 1), 200, 1, 2, 1, 64, [[64]]), 2),
    # packed, GQA 6, head_dim 128: CTAs of 3 heads, 2 a KV head (their shares added in bf16)
    ((masks.MaskSpec("diffusion", 32, 1), 100, 1, 6, 1, 128, [[32, 64]]), 3),
    # 3L, GQA 3: dk/dv CTAs of 2 and 3 visits a head
    ((masks.MaskSpec("diffusion", 16, 2), 64, 1, 3, 1, 64, [[]]), 3),
    (CASES[2], 1),  # causal, no GQA, head_dim 128
    # Unsorted ids (a search's find): key tiles whose narrowed runs hold query tiles whose ids
    # do not meet theirs (query tiles 5 and 11, ids 0 and 3, against key tiles 8 and 9), which
    # the kernel must visit with the segment comparison
    ((masks.MaskSpec("diffusion", 32, 1), 384, 1, 2, 1, 64,
      np.repeat(np.array([[3, 2, 2, 1, 1, 0, 0, 0, 0, 3, 2, 3]]), 32, axis=1)), 2),
])
def test_dkv_ctas_of_several_heads_equal_the_reference(monkeypatch, case, heads):
  # dk/dv CTAs that walk `heads` query heads of a group in turn; the head count the dk/dv kernel
  # took is recorded, so the grouped path is the one checked. Plan rows are copied in pieces of
  # 16 (on the GPU, 256: the 1.5B heads' 3L rows at L=2048 are 320 wide with the columns of
  # visited halves), so every case's rows (32 wide and more) take the multi-piece path.
  monkeypatch.setattr(flash_mgpu, "PLAN_COPY_MAX", 16)
  widths, pieces = [], flash_mgpu.plan_pieces
  monkeypatch.setattr(flash_mgpu, "plan_pieces", lambda w: widths.append(w) or pieces(w))
  monkeypatch.setattr(flash_mgpu, "DKV_HEADS", heads)
  taken, chooser = [], flash_mgpu.dkv_heads
  monkeypatch.setattr(flash_mgpu, "dkv_heads", lambda *a, **kw: taken.append(chooser(*a, **kw))
                      or taken[-1])
  test_mosaic_dkv_gradients_equal_the_reference(*case, flash.Tiles(forward="triton", dkv="mosaic"))
  assert taken and set(taken) == {heads}
  assert widths and min(widths) > 16


def test_nonempty_tiles_mark_the_tiles_the_layout_leaves_empty():
  # (dkv reads it: which 64-key halves a visit passes over)
  spec = masks.MaskSpec("diffusion", 16, 1)
  # T = 200 rows padded to 256: 4 x 4 tiles
  table = flash_mgpu.nonempty_tiles(spec, 100, 256, 64)
  tmap = masks.tile_map(spec, 100, 64, 64) != masks.TILE_EMPTY
  assert table.shape == (4, 4) and table.dtype == np.int32
  assert set(np.unique(table).tolist()) == {-1, 0}
  np.testing.assert_array_equal(table >= 0, np.pad(tmap, [(0, 4 - tmap.shape[0]),
                                                          (0, 4 - tmap.shape[1])]))
  assert not tmap.all()  # (the layout leaves some tiles empty: the comparison is not vacuous)


def test_dq_kernels_are_triton_or_mosaic():
  with pytest.raises(ValueError, match="expected one of"):
    flash.Tiles(dq="ds")
  with pytest.raises(ValueError, match="expected one of"):
    flash.Tiles(dkv="ds")


def test_mosaic_dq_beside_the_triton_dkv_kernel_equals_the_reference():
  # The Mosaic dq kernel's dQ, and its delta feeding Triton's dk/dv kernel (packed, GQA 2, every
  # visit class: full tiles, the layout mask, the segment comparison).
  spec, length, b, h, kh, d, cuts = CASES[0]
  meta = masks.layout_meta(spec, _segments(b, length, cuts))
  t = meta.positions.shape[1]
  ks = jax.random.split(jax.random.key(5), 4)
  q, ct = (jax.random.normal(kk, (b, t, h, d), jnp.float32).astype(jnp.bfloat16) for kk in ks[::3])
  k, v = (jax.random.normal(kk, (b, t, kh, d), jnp.float32).astype(jnp.bfloat16) for kk in ks[1:3])
  tiles = flash.Tiles(forward="triton", dkv="triton", dq="mosaic")
  ours = lambda q, k, v: flash.block_sparse_attention(q, k, v, meta.segments, spec, tiles,
                                                      interpret=True)
  ref = lambda q, k, v: attention.xla_attention(q, k, v, masks.dense_mask(spec, meta, meta))
  grads = lambda f, *a: jax.vjp(f, *a)[1](ct.astype(a[0].dtype))
  jaxpr = str(jax.make_jaxpr(lambda: grads(ours, q, k, v))())
  assert "block_sparse_attention_dq_mgpu" in jaxpr and "dkv_mgpu" not in jaxpr
  f32 = lambda x: x.astype(jnp.float32)
  got = jax.jit(lambda: grads(ours, q, k, v))()
  want = grads(ref, f32(q), f32(k), f32(v))
  for name, g, w in zip("qkv", got, want):
    assert float(jnp.linalg.norm(f32(g) - w) / jnp.linalg.norm(w)) < 1e-2, f"d{name}"


def test_dkv_heads_groups_heads_while_the_heaviest_cta_fits_one_sms_share(monkeypatch):
  monkeypatch.setattr(flash_mgpu, "DKV_HEADS", 0)
  for nn_ in (1, 2):  # the benchmark's cases on an H100's 132 SMs: 3 of the 1.5B's 6, 7B's 7
    spec = masks.MaskSpec("diffusion", 32, nn_)
    for length, b in ((1024, 8), (2048, 4), (4096, 2)):
      n_outer = spec.num_streams * length // 128
      assert flash_mgpu.dkv_heads(spec, length, n_outer, b, 12, 6, sms=132) == 3
      assert flash_mgpu.dkv_heads(spec, length, n_outer, b, 28, 7, sms=132) == 7
  # A small problem: its heaviest key tile alone outlasts an SM's share, one head a CTA.
  assert flash_mgpu.dkv_heads(masks.MaskSpec("diffusion", 32, 1), 128, 2, 1, 12, 6, sms=132) == 1
  monkeypatch.setattr(flash_mgpu, "DKV_HEADS", 4)  # set: the largest divisor not above it
  assert flash_mgpu.dkv_heads(masks.MaskSpec("diffusion", 32, 1), 128, 2, 1, 12, 6) == 3
  monkeypatch.setattr(flash_mgpu, "DKV_HEADS", -1)
  with pytest.raises(ValueError, match="DKV_HEADS=-1: must be 0"):
    flash_mgpu.dkv_heads(masks.MaskSpec("diffusion", 32, 1), 128, 2, 1, 12, 6)


GROUPS = flash.Tiles(forward="triton", dkv="mosaic")  # with DKV_HEADS a whole group (below)
_PACKED_FUSED = ((masks.MaskSpec("diffusion", 32, 1), 100, 1, 2, 1, 128, [[32, 64]]), FUSED)


# Under jax 0.11 (tests/test_jax011.py) every case; under 0.10 (the main suite, whose time is
# CI's budget) only the packed fused-dQ case, which 0.11's detector cannot judge (below).
@pytest.mark.parametrize("case,tiles", [_PACKED_FUSED] if not jax.__version__.startswith("0.11")
                         else [
    (CASES[0], MOSAIC), (CASES[1], MOSAIC), (CASES[2], MOSAIC),
    (CASES[0], flash.Tiles(forward="triton", dkv="mosaic")),
    (CASES[1], flash.Tiles(forward="triton", dkv="mosaic")),
    (CASES[2], flash.Tiles(forward="triton", dkv="mosaic")),
    # The forward on a diffusion layout at head_dim 128 (the models' own).
    ((masks.MaskSpec("diffusion", 32, 1), 100, 1, 2, 1, 128, [[32, 64]]), MOSAIC),
    # The dq kernel (O staged in a K slot for delta, then the slot refilled): packed GQA 2, and
    # 3L with GQA 3 beside the Mosaic dk/dv kernel.
    (CASES[0], flash.Tiles(forward="triton", dkv="triton", dq="mosaic")),
    ((masks.MaskSpec("diffusion", 16, 2), 64, 1, 3, 1, 64, [[]]),
     flash.Tiles(forward="triton", dkv="mosaic", dq="mosaic")),
    # Fused dQ at head_dim 128: 3L with GQA 3, and packed with GQA 2 (not under jax 0.11.2: its
    # key-tile CTAs add into the same dQ rows one grid point after another, and 0.11.2's
    # detector resets every vector clock between grid points while keeping their accesses, so
    # it reports those adds as races, each warpgroup against itself; in sequence they are not).
    ((masks.MaskSpec("diffusion", 16, 2), 40, 1, 3, 1, 128, [[]]), FUSED),
    # dk/dv CTAs that walk a whole group's heads: packed GQA 2, and 3L with GQA 3 (CTAs of 2
    # and 3 visits a head: slots that run on from head to head unaligned).
    (CASES[0], GROUPS),
    ((masks.MaskSpec("diffusion", 16, 2), 64, 1, 3, 1, 64, [[]]), GROUPS),
])
def test_interpreter_finds_no_race_in_the_training_kernels(monkeypatch, case, tiles):
  # The interpreter's race detector orders the warpgroups' shared-memory reads and writes, the
  # TMA copies (0.11's also the async proxy) and the mbarriers by vector clocks: the forward,
  # dk/dv, dq and fused kernels run each case under it.
  ipc = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call")
  if tiles is GROUPS:
    monkeypatch.setattr(flash_mgpu, "DKV_HEADS", case[3])  # a dk/dv CTA a whole group
  # Under 0.11, two CTAs a KV head write partials, not PAIR_ADD's adds: the interpreter's add
  # reads back a target an earlier grid point wrote, which 0.11.2's detector reports as a race
  # for the reason given above for fused dQ (0.10's, which runs the packed fused case, takes
  # both). The GPU bodies differ only by the stores' reduction op.
  if jax.__version__.startswith("0.11"):
    monkeypatch.setattr(flash_mgpu, "PAIR_ADD", False)
  params = flash_mgpu._interpret_params()
  monkeypatch.setattr(flash_mgpu, "_interpret_params",
                      lambda: dataclasses.replace(params, detect_races=True))
  jax.clear_caches()  # (the kernels are read as they are traced)
  # Each Mosaic kernel that starts replaces the interpreter's race state: every one this case
  # runs is collected, so none goes unread and a case that ran none cannot pass.
  gpu_callbacks = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.gpu_callbacks")
  ipc.reset_gpu_interpret_mode_state()
  states, init = [], gpu_callbacks._initialize_shared_memory

  def initialize(*args, **kwargs):
    out = init(*args, **kwargs)
    states.append(ipc.get_races())
    return out
  monkeypatch.setattr(gpu_callbacks, "_initialize_shared_memory", initialize)
  spec, length, b, h, kh, d, cuts = case
  meta = masks.layout_meta(spec, _segments(b, length, cuts))
  t = meta.positions.shape[1]
  ks = jax.random.split(jax.random.key(length), 4)
  q, ct = (jax.random.normal(kk, (b, t, h, d), jnp.float32).astype(jnp.bfloat16) for kk in ks[::3])
  k, v = (jax.random.normal(kk, (b, t, kh, d), jnp.float32).astype(jnp.bfloat16) for kk in ks[1:3])
  f = lambda q, k, v: flash.block_sparse_attention(q, k, v, meta.segments, spec, tiles,
                                                   interpret=True)

  def run():
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct)
  jax.block_until_ready(jax.jit(run)())
  assert states and not any(r.races_found for r in states)


def test_mosaic_dkv_launch_order_covers_every_cta():
  # Two batch rows, two heads and two key tiles: every CTA's (key tile, batch row, head) comes
  # from its place in the launch order, one group of all 4 pairs (unfused). The fused kernel's
  # groups of FUSED_GROUP pairs go through the same `launch_place`, whose unit test below
  # covers several groups (session 38 dropped this test's fused case, 70 s of CI's time).
  test_mosaic_dkv_gradients_equal_the_reference(
      masks.MaskSpec("diffusion", 32, 1), 100, 2, 2, 1, 64, [[32, 64], []],
      flash.Tiles(forward="triton", dkv="mosaic"))


@pytest.mark.parametrize("slots,lag", [(3, 2)])  # (3, 1) and (4, 2) dropped in session 38 (CI time)
def test_fused_dkv_with_other_ds_slots_and_lags(monkeypatch, slots, lag):
  # The dQ products trail the dS by DQ_LAG visits through DS_SLOTS slots (default 2 and 1); the
  # 3L case has key tiles with fewer visits than the lag, whose dQ all comes from the epilogue.
  monkeypatch.setattr(flash_mgpu, "DS_SLOTS", slots)
  monkeypatch.setattr(flash_mgpu, "DQ_LAG", lag)
  test_mosaic_dkv_gradients_equal_the_reference(
      masks.MaskSpec("diffusion", 16, 2), 40, 1, 3, 1, 128, [[]], FUSED)


def test_two_partials_added_in_the_kernel_equal_xla_sum_of_them(monkeypatch):
  # PAIR_ADD: where two CTAs share a KV head (here GQA 2, one head a CTA), each adds its bf16
  # share into zeroed bf16 dK and dV; the result is the bits of the two partials summed by XLA
  # in float32 (0 + a is a; a + b rounds once either way). The dk/dv kernel alone, on lse and
  # delta of the right shape (their values only need to be finite for a comparison of bits).
  monkeypatch.setattr(flash_mgpu, "DKV_HEADS", 1)
  spec, length, b, h, kh, d, cuts = CASES[0]
  seg = masks.layout_meta(spec, _segments(b, length, cuts)).segments
  tp = -(-seg.shape[1] // 128) * 128  # whole 128-key CTAs, as flash pads
  seg = jnp.pad(seg, [(0, 0), (0, tp - seg.shape[1])])
  ks = jax.random.split(jax.random.key(5), 6)
  q, do = (jax.random.normal(kk, (b, tp, h, d), jnp.bfloat16) for kk in ks[:2])
  k, v = (jax.random.normal(kk, (b, tp, kh, d), jnp.bfloat16) for kk in ks[2:4])
  lse = 4.0 + jax.random.uniform(ks[4], (b, h, tp), jnp.float32)
  delta = jax.random.normal(ks[5], (b, h, tp), jnp.float32)
  made = []
  zeroed = flash_mgpu._zeroed
  monkeypatch.setattr(flash_mgpu, "_zeroed",
                      lambda shape, *a: made.append((shape, *a)) or zeroed(shape, *a))

  def dk_dv(pair):
    monkeypatch.setattr(flash_mgpu, "PAIR_ADD", pair)
    return jax.jit(lambda *a: flash_mgpu.dkv(*a, spec, length, interpret=True)[1:])(
        q, k, v, seg, do, lse, delta)
  summed = dk_dv(False)
  assert not made  # the partials' path: no zeroed targets
  added = dk_dv(True)
  assert made == [((b, tp, kh, d), jnp.bfloat16)] * 2  # dK's and dV's: the path taken
  for name, x, y in zip("kv", added, summed):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    assert np.isfinite(y).all() and np.abs(y).max() > 0
    np.testing.assert_array_equal(x, y, err_msg=f"d{name}")


def test_dkv_refuses_a_register_split_it_does_not_have(monkeypatch):
  monkeypatch.setattr(flash_mgpu, "DKV_REGS", 256)
  with pytest.raises(ValueError, match="DKV_REGS=256: must be 232 or 240"):
    test_mosaic_dkv_gradients_equal_the_reference(*CASES[0], flash.Tiles(forward="triton",
                                                                        dkv="mosaic"))


@pytest.mark.parametrize("n_full,n_vis,one", [(3, 5, 1), (0, 4, 1), (0, 4, 0), (2, 6, 0),
                                               (1, 1, 1), (0, 1, 0), (0, 0, 1), (4, 4, 1)])
def test_overlapped_visit_loops_visit_each_tile_once_in_order(n_full, n_vis, one):
  # FWD_OVERLAP's loops (GPU body only, so not run by the interpreter): visit 0 by `first`, each
  # later visit by `step`, in order, each in the mask class `_visit_loops` gives it.
  def record(kind):
    def body(i, log, masked):
      code = {False: 0, "layout": 1, "segments": 2}[masked] + (10 if kind == "first" else 0)
      return log.at[i].set(code)
    return body

  n_full, n_vis, one = (jnp.int32(x) for x in (n_full, n_vis, one))
  plain = flash_mgpu._visit_loops(record("step"), n_full, n_vis, one, jnp.full(8, -1))
  overlapped = flash_mgpu._visit_loops(record("step"), n_full, n_vis, one, jnp.full(8, -1),
                                      first=record("first"))
  want = np.asarray(plain) + np.where(np.arange(8) == 0, 10, 0) * (np.asarray(plain) >= 0)
  np.testing.assert_array_equal(np.asarray(overlapped), want)


@pytest.mark.parametrize("knob,value,message", [("FWD_OVERLAP", 3, "must be 0, 1 or 2"),
                                                ("FWD_REGS", 256, "must be 232 or 240")])
def test_mosaic_forward_refuses_knobs_out_of_range(monkeypatch, knob, value, message):
  monkeypatch.setattr(flash_mgpu, knob, value)
  q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match=f"flash_mgpu.{knob}={value}: {message}"):
    flash_mgpu.forward(q, q[:, :, :1], q[:, :, :1], jnp.zeros((1, 128), jnp.int32),
                       masks.MaskSpec("diffusion", 32, 1), 64, interpret=True)


def test_fused_dkv_refuses_a_lag_its_slots_cannot_hold(monkeypatch):
  monkeypatch.setattr(flash_mgpu, "DQ_LAG", 2)
  with pytest.raises(ValueError, match="DQ_LAG=2 must be at least 1 and below DS_SLOTS=2"):
    test_mosaic_dkv_gradients_equal_the_reference(
        masks.MaskSpec("diffusion", 16, 2), 40, 1, 3, 1, 128, [[]], FUSED)


@pytest.mark.parametrize("n_outer,b,h,pairs", [(3, 2, 6, 4), (2, 4, 12, 16), (5, 1, 7, 7),
                                              (4, 3, 2, 6), (1, 2, 3, 1)])
def test_launch_place_visits_each_cta_once_in_groups_heaviest_first(n_outer, b, h, pairs):
  j, bi, head = (np.asarray(x) for x in flash_mgpu.launch_place(
      jnp.arange(n_outer * b * h, dtype=jnp.int32), n_outer, pairs, h))
  places = set(zip(j.tolist(), bi.tolist(), head.tolist()))
  assert len(places) == n_outer * b * h
  assert places == {(a, c, e) for a in range(n_outer) for c in range(b) for e in range(h)}
  # One group's CTAs come together: key tile major (its heaviest first), then the group's pairs.
  span = n_outer * pairs
  pair = bi * h + head
  for g in range(b * h // pairs):
    sl = slice(g * span, (g + 1) * span)
    assert set(pair[sl].tolist()) == set(range(g * pairs, (g + 1) * pairs))
    assert (j[sl] == np.repeat(np.arange(n_outer), pairs)).all()


def test_visit_list_flattens_the_narrowed_runs_full_tiles_first():
  spec = masks.MaskSpec("diffusion", 32, 1)
  length = 512
  seg = masks.layout_meta(spec, _segments(2, length, [[], [96, 224]])).segments
  n_outer = seg.shape[1] // flash_mgpu.OUTER
  packed, v = flash_mgpu.visit_list(spec, length, seg, n_outer)
  packed = np.asarray(packed)
  assert packed.shape[-1] % 32 == 0  # whole 128-byte TMA rows
  plan = flash.visit_runs(spec, length, flash_mgpu.OUTER, flash_mgpu.BLOCK_K, False,
                          num_outer=n_outer)
  lo, hi, one = map(np.asarray, flash.segment_runs(plan, seg, flash_mgpu.OUTER,
                                                   flash_mgpu.BLOCK_K, False))
  _, _, n_full_runs, n_runs = plan
  for b in range(2):
    for i in range(n_outer):
      full = [j for r in range(n_full_runs[i]) for j in range(lo[b, i, r], hi[b, i, r])]
      part = [j for r in range(n_full_runs[i], n_runs[i]) for j in range(lo[b, i, r], hi[b, i, r])]
      n_full, n_vis, one_seg = packed[b, i, v], packed[b, i, v + 1], packed[b, i, v + 2]
      assert one_seg == one[b, i]
      assert packed[b, i, :n_vis].tolist() == full + part
      # Several segments in the outer tile: its full tiles are compared like partial ones.
      assert n_full == (len(full) if one[b, i] else 0)
  assert not one[1].all() and one[0].all()  # the packed row exercises both cases


@pytest.mark.parametrize("n,ctas", [(7, 3), (132 * 3 + 5, 132), (4, 4), (50, 1)])
def test_deal_gives_every_item_once_heaviest_first_to_the_least_loaded(n, ctas):
  weights = np.random.default_rng(n).integers(1, 20, n)
  lists = flash_mgpu.deal(weights, ctas)
  items = lists[lists >= 0]
  assert sorted(items.tolist()) == list(range(n))
  assert ((lists >= 0).sum(1) > 0).all()  # no CTA idle while another has two items (n >= ctas)
  loads = [int(weights[row[row >= 0]].sum()) for row in lists]
  for row in lists:
    w = weights[row[row >= 0]]
    assert (np.diff(w) <= 0).all()  # each CTA runs its heaviest first
    assert (row[:(row >= 0).sum()] >= 0).all()  # padding only at the end
  # Greedy longest-first: the most loaded CTA's last item went where the load was least then,
  # so no CTA ends more than one item's weight below it (Graham's bound).
  assert max(loads) - min(loads) <= weights.max()


def test_work_table_rows_are_the_dealt_items_visit_lists():
  spec = masks.MaskSpec("diffusion", 32, 1)
  length = 512
  seg = masks.layout_meta(spec, _segments(2, length, [[], [96, 224]])).segments
  n_outer, h, ctas = seg.shape[1] // flash_mgpu.OUTER, 3, 5
  table, v = flash_mgpu.work_table(spec, length, seg, 2, h, n_outer, ctas)
  table = np.asarray(table)
  plan = np.asarray(flash_mgpu.visit_list(spec, length, seg, n_outer)[0])
  assert table.shape[0] == ctas and table.shape[-1] % 32 == 0
  seen = set()
  for c in range(ctas):
    count, total = table[c, 0, v + 6], table[c, 0, v + 7]
    assert (table[c, :, v + 6] == count).all() and count >= 1
    for m in range(count):
      bi, head, tile = table[c, m, v + 4], table[c, m, v + 5], table[c, m, v + 3]
      seen.add((bi, head, tile))
      assert (table[c, m, :v + 4] == plan[bi, tile, :v + 4]).all()
      # the running counts the kernel reads instead of carrying them through its item loop
      assert table[c, m, v + 8] == table[c, :m, v + 1].sum()  # visits before this item
      assert table[c, m, v + 9] == (m > 0 and table[c, m - 1, v + 1] > 0)
    assert total == table[c, :count, v + 1].sum()  # the CTA's visits, all items
  assert seen == {(b, e, t) for b in range(2) for e in range(h) for t in range(n_outer)}


def test_mosaic_forward_refuses_what_it_cannot_run():
  spec = masks.MaskSpec("diffusion", 24, 1)  # block size not a power of two
  meta = masks.layout_meta(spec, jnp.zeros((1, 48), jnp.int32))
  q = jnp.zeros((1, 96, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="block_size 24 is not a power of two.*forward='triton'"):
    flash.block_sparse_attention(q, q, q, meta.segments, spec, MOSAIC, interpret=True)
  with pytest.raises(ValueError, match="float32"):
    flash.block_sparse_attention(q.astype(jnp.float32), q, q, meta.segments,
                                 masks.MaskSpec("diffusion", 32, 1), MOSAIC, interpret=True)
  with pytest.raises(ValueError, match="Tiles.forward='cuda'"):
    flash.Tiles(forward="cuda")
  with pytest.raises(ValueError, match="Tiles.dkv='cuda'"):
    flash.Tiles(dkv="cuda")
  # Outside the interpreter, off an sm_90 GPU (this CPU): a clear refusal, not a compile error.
  ok_spec = masks.MaskSpec("diffusion", 32, 1)
  ok_meta = masks.layout_meta(ok_spec, jnp.zeros((1, 48), jnp.int32))
  for tiles in (MOSAIC, flash.Tiles(forward="triton", dkv="mosaic")):
    with pytest.raises(ValueError, match="needs an sm_90 GPU.*the device is cpu"):
      flash.block_sparse_attention(q, q, q, ok_meta.segments, ok_spec, tiles)
  with pytest.raises(ValueError, match="Tiles.dkv='mosaic' cannot run.*block_size 24"):
    flash.block_sparse_attention(q, q, q, meta.segments, spec,
                                 flash.Tiles(forward="triton", dkv="mosaic"), interpret=True)
  with pytest.raises(ValueError, match="Tiles.fuse_dq=True needs dkv='mosaic'"):
    flash.Tiles(fuse_dq=True)
  with pytest.raises(ValueError, match="Tiles.fuse_dq=True needs head_dim 128.*got 64"):
    flash.block_sparse_attention(q, q, q, ok_meta.segments, ok_spec, FUSED, interpret=True)


def test_auto_kernels_are_triton_off_hopper():
  # On this CPU machine (and in interpret mode anywhere) "auto" keeps the Triton kernels.
  spec = masks.MaskSpec("diffusion", 32, 1)
  for d in (64, 128):
    q = jnp.zeros((1, 64, 2, d), jnp.bfloat16)
    for field in ("forward", "dkv", "dq"):
      assert flash._kernel_choice(field, "auto", spec, q, interpret=True) == "triton"
      assert flash._kernel_choice(field, "auto", spec, q, interpret=False) == "triton"
      assert flash._kernel_choice(field, "mosaic", spec, q, interpret=True) == "mosaic"
      assert flash._kernel_choice(field, "triton", spec, q, interpret=True) == "triton"
  assert flash.Tiles().dkv == flash.Tiles().forward == flash.Tiles().dq == "auto"


def test_auto_on_hopper_picks_mosaic_where_it_was_run(monkeypatch):
  # As if on an sm_90 GPU: the forward wherever it covers the problem; the dk/dv and dq kernels
  # only where they were run on one (diffusion layouts, head_dim 128).
  monkeypatch.setattr(flash_mgpu, "on_hopper", lambda: True)
  diffusion, causal = masks.MaskSpec("diffusion", 32, 1), masks.MaskSpec("causal")
  q64, q128 = (jnp.zeros((1, 64, 2, d), jnp.bfloat16) for d in (64, 128))
  choice = lambda field, spec, q: flash._kernel_choice(field, "auto", spec, q, interpret=False)
  assert choice("dkv", diffusion, q128) == "mosaic"
  assert choice("dkv", diffusion, q64) == "triton"
  assert choice("dkv", causal, q128) == "triton"
  assert choice("forward", diffusion, q64) == "mosaic"
  assert choice("forward", causal, q128) == "mosaic"
  assert choice("dkv", masks.MaskSpec("diffusion", 24, 1), q128) == "triton"  # not covered
  assert choice("dq", diffusion, q128) == "mosaic"
  assert choice("dq", diffusion, q64) == "triton"
  assert choice("dq", causal, q128) == "triton"


@pytest.mark.parametrize("knobs,fuse_dq,kh", [
    ({}, False, 2), ({}, True, 2),  # the defaults
    ({}, True, 6),  # fused, GQA 2: two CTAs a KV head add their bf16 dK and dV shares
    ({"FWD_TURNS": False}, False, 2),
    ({"PERSISTENT": False}, False, 2),  # one CTA an item, the item's body inline
    ({"DKV_HEADS": 3}, False, 2),  # dk/dv CTAs that walk 3 heads: 2 a KV head, bf16 adds
    ({"DKV_HEADS": 2}, False, 2),  # ... 2 heads: 3 partials a KV head, summed by XLA
    ({"DKV_HEADS": 6}, False, 2),  # ... the whole group: no partials
    ({"DS_SLOTS": 3, "DQ_LAG": 2}, True, 2),
    ({"DKV_REGS": 232}, False, 2),  # the dk/dv kernel's other register split (producer 40)
    ({"FWD_OVERLAP": 1, "FWD_REGS": 240}, False, 2),  # the forward's intra-warpgroup overlap
    ({"FWD_OVERLAP": 2, "PERSISTENT": False}, False, 2),
    ({"FWD_OVERLAP": 1, "FWD_TURNS": False}, False, 2),
    ({"FWD_OVERLAP": 2, "OVERLAP_K_AHEAD": False}, False, 2),  # each visit's K, then its V
])
def test_gpu_bodies_lower_for_cuda(monkeypatch, knobs, fuse_dq, kh, lower_for_cuda):
  # The interpreter runs the kernels' interpret bodies only; the GPU bodies (P in registers,
  # transposed shared-memory operands, turns, reduce-adds) are traced and lowered here for CUDA,
  # so a knob's GPU path cannot break unseen between runs on a GPU. Packed 2L, 12 query heads over
  # `kh` KV heads, head_dim 128.
  for name, value in knobs.items():
    monkeypatch.setattr(flash_mgpu, name, value)
  spec = masks.MaskSpec("diffusion", 32, 1)
  # T = 256: whole CTAs; 8 rows: 192 forward items, more than an H100's SMs, so the persistent
  # forward's loop over items is lowered (PERSISTENT=False lowers the one-item body)
  meta = masks.layout_meta(spec, _segments(8, 128, [[32, 96], []] * 4))
  b, t, h, d = 8, meta.positions.shape[1], 12, 128
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, kh, d), jnp.bfloat16)
  lse = jax.ShapeDtypeStruct((b, h, t), jnp.float32)

  def fwd_bwd(q, k, v, do, delta):
    o, lse = flash_mgpu.forward(q, k, v, meta.segments, spec, 128)
    dq = flash_mgpu.dq(q, k, v, meta.segments, o, do, lse, spec, 128)
    return o, dq, flash_mgpu.dkv(q, k, v, meta.segments, do, lse, delta, spec, 128,
                                 fuse_dq=fuse_dq)

  text = lower_for_cuda(fwd_bwd, q, kv, kv, q, lse)
  # The three kernels lowered into Mosaic GPU modules (a kernel given Refs, as the fused and the
  # reduce-add ones are, keeps no name in the text).
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 3
