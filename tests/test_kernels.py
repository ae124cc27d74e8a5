"""Pallas attention kernels (interpret mode on CPU) against the XLA reference with a dense mask."""

import dataclasses
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax import attention, masks, model
from dllm_jax import cache as kvcache
from dllm_jax import kernels
from dllm_jax.config import ModelConfig
from dllm_jax.kernels import decode, flash

SMALL = flash.Tiles(16, 16, 16, 16, 16, 16, dkv_head_split=1)
MIXED = flash.Tiles(16, 32, 32, 16, 16, 32)  # different maps for the forward, dq and dk/dv kernels
SPLIT2 = flash.Tiles(16, 16, 16, 16, 16, 16, dkv_head_split=2)  # dk/dv from per-program partials
SPLIT4 = flash.Tiles(16, 16, 16, 16, 16, 16, dkv_head_split=4)  # group 6: clipped to 3 programs
UNEVEN = flash.Tiles(32, 16, 16, 16, 16, 16)  # rows padded to 32: more dq/dkv grid tiles than plan


def _dense_tile_classes(spec, length, bq, bk):
  """Tile classes derived from the dense mask (the definition `masks.tile_map` must equal)."""
  pos, stream = masks.layout(spec, length)
  ok = masks.allowed(spec, pos[:, None], stream[:, None], 0, pos[None, :], stream[None, :], 0)
  t = pos.size
  nq, nk = -(-t // bq), -(-t // bk)
  out = np.zeros((nq, nk), np.int8)
  for i in range(nq):
    for j in range(nk):
      tile = ok[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
      if tile.any():
        full = tile.all() and (j + 1) * bk <= t
        out[i, j] = masks.TILE_FULL if full else masks.TILE_PARTIAL
  return out


@pytest.mark.parametrize("spec", [
    masks.MaskSpec("causal"),
    masks.MaskSpec("block_causal", 8),
    masks.MaskSpec("diffusion", 8, 1),
    masks.MaskSpec("diffusion", 4, 2),
    masks.MaskSpec("diffusion", 16, 1),
])
@pytest.mark.parametrize("length", [13, 24, 37, 64])
@pytest.mark.parametrize("bq,bk", [(8, 16), (16, 8), (32, 32)])
def test_tile_map_equals_dense_classification(spec, length, bq, bk):
  got = masks.tile_map(spec, length, bq, bk)
  want = _dense_tile_classes(spec, length, bq, bk)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("spec", [
    masks.MaskSpec("causal"),
    masks.MaskSpec("block_causal", 8),
    masks.MaskSpec("diffusion", 1, 1),
    masks.MaskSpec("diffusion", 8, 1),
    masks.MaskSpec("diffusion", 4, 2),
    masks.MaskSpec("diffusion", 32, 3),
])
@pytest.mark.parametrize("length", [1, 13, 32, 37, 64])
@pytest.mark.parametrize("vector_div", [True, False])
def test_key_bounds_are_the_layout_mask(spec, length, vector_div):
  # Both forms of a partial tile's layout mask: the Mosaic kernels' key intervals
  # (flash.key_bounds) and the Triton kernels' per-pair arithmetic (_layout_allowed). Every
  # (query, key) pair of the layout must get masks.allowed's answer, and no key at a padding index
  # may be seen (a padding query's answer is free).
  pos, stream = masks.layout(spec, length)
  t = pos.size
  want = masks.allowed(spec, pos[:, None], stream[:, None], 0, pos[None, :], stream[None, :], 0)
  q = jnp.arange(t + 40, dtype=jnp.int32)  # 40 padding indices past the layout
  k = q[None, :]
  bounds = flash.key_bounds(spec, length, q)
  by_bounds = flash.keys_in(k, [(lo if lo is None or isinstance(lo, int) else lo[:, None],
                                 hi[:, None]) for lo, hi in bounds])
  pairwise = flash._layout_allowed(spec, length, q[:, None], k, vector_div)
  for got in (np.asarray(by_bounds), np.asarray(pairwise)):
    np.testing.assert_array_equal(got[:t, :t], want)
    assert not got[:, t:].any()


def test_tile_map_skips_most_of_a_long_diffusion_layout():
  # 2L at L=2048, tiles 128 x 64: 16 noisy then 16 clean query tiles, 32 + 32 key tiles. Query
  # tile i (blocks 4i..4i+3) has 2i full clean key tiles whether noisy or clean; its diagonal is
  # partial: 2 own-noisy + 2 clean tiles for a noisy tile, 2 clean ones for a clean tile.
  tmap = masks.tile_map(masks.MaskSpec("diffusion", 32, 1), 2048, 128, 64)
  full, partial = 2 * sum(2 * i for i in range(16)), 16 * 4 + 16 * 2
  np.testing.assert_array_equal(np.bincount(tmap.ravel(), minlength=3),
                                [tmap.size - full - partial, partial, full])


def _segments(b, length, cuts):
  seg = np.zeros((b, length), np.int32)
  for row, row_cuts in enumerate(cuts[:b]):
    for c in row_cuts:
      seg[row, c:] += 1
  return jnp.asarray(seg)


def _qkv(key, b, t, h, kh, d, dtype):
  ks = jax.random.split(key, 4)
  return (jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype),
          jax.random.normal(ks[1], (b, t, kh, d), jnp.float32).astype(dtype),
          jax.random.normal(ks[2], (b, t, kh, d), jnp.float32).astype(dtype),
          jax.random.normal(ks[3], (b, t, h, d), jnp.float32))


TRAIN_CASES = [
    # spec, L, B, H, K, D, segment cuts per row (block-aligned), tiles
    (masks.MaskSpec("diffusion", 8, 1), 29, 2, 6, 1, 16, [[16], []], SMALL),
    (masks.MaskSpec("diffusion", 4, 2), 21, 1, 7, 1, 16, [[8, 12]], SMALL),
    (masks.MaskSpec("diffusion", 8, 1), 40, 1, 3, 1, 16, [[24]], MIXED),
    (masks.MaskSpec("block_causal", 16), 45, 2, 3, 1, 64, [[], [32]], SMALL),
    (masks.MaskSpec("causal"), 33, 1, 2, 2, 128, [[10]], SMALL),
    (masks.MaskSpec("diffusion", 8, 1), 29, 2, 6, 1, 16, [[16], []], SPLIT2),
    (masks.MaskSpec("diffusion", 4, 2), 21, 1, 12, 2, 16, [[8, 12]], SPLIT4),
    (masks.MaskSpec("causal"), 33, 1, 2, 1, 16, [[10]], UNEVEN),
    # Many short samples: most clean-prefix tiles of a later sample are cut by segment_runs.
    (masks.MaskSpec("diffusion", 8, 1), 64, 2, 3, 1, 16, [[16, 24, 40, 48], [8]], SMALL),
    (masks.MaskSpec("diffusion", 8, 2), 48, 1, 6, 2, 16, [[16, 32]], SPLIT2),
]


@pytest.mark.parametrize("spec,length,b,h,kh,d,cuts,tiles", TRAIN_CASES)
def test_block_sparse_forward_and_grads_equal_reference(spec, length, b, h, kh, d, cuts, tiles):
  meta = masks.layout_meta(spec, _segments(b, length, cuts))
  t = meta.positions.shape[1]
  q, k, v, ct = _qkv(jax.random.key(length), b, t, h, kh, d, jnp.float32)
  mask = masks.dense_mask(spec, meta, meta)

  def ours(q, k, v):
    return flash.block_sparse_attention(q, k, v, meta.segments, spec, tiles, interpret=True)

  def ref(q, k, v):
    return attention.xla_attention(q, k, v, mask)

  def out_and_grads(f):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct)

  # Under jit, interpret mode compiles each kernel once instead of stepping it op by op.
  got, got_grads = jax.jit(lambda: out_and_grads(ours))()
  want, want_grads = out_and_grads(ref)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for name, g, w in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


def test_dq_with_dp_issued_first_has_the_same_bits(monkeypatch):
  # flash.DQ_DP_FIRST only moves dP's product ahead of the softmax; dQ must not change by a bit.
  spec, length, b, h, kh, d, cuts, tiles = TRAIN_CASES[8]  # packed: every masked class
  meta = masks.layout_meta(spec, _segments(b, length, cuts))
  q, k, v, ct = _qkv(jax.random.key(3), b, meta.positions.shape[1], h, kh, d, jnp.bfloat16)

  def dq():
    f = lambda q: flash.block_sparse_attention(q, k, v, meta.segments, spec, tiles,
                                               interpret=True)
    return jax.jit(lambda: jax.vjp(f, q)[1](ct.astype(jnp.bfloat16))[0])()

  before = np.asarray(dq(), np.float32)
  monkeypatch.setattr(flash, "DQ_DP_FIRST", True)
  after = np.asarray(dq(), np.float32)
  assert np.isfinite(before).all() and np.abs(before).max() > 0
  np.testing.assert_array_equal(after, before)


def test_block_sparse_with_unsorted_segment_ids_equals_reference():
  # Ids need not increase along a row (a sample's id may come back after another's): the span
  # segment_runs keeps then holds tiles of another segment, which must still be masked.
  spec = masks.MaskSpec("diffusion", 8, 1)
  seg = jnp.asarray([[0] * 16 + [3] * 8 + [0] * 16 + [1] * 8, [2] * 48])
  meta = masks.layout_meta(spec, seg)
  q, k, v, ct = _qkv(jax.random.key(11), 2, 96, 2, 1, 16, jnp.float32)
  mask = masks.dense_mask(spec, meta, meta)
  ours = lambda q, k, v: flash.block_sparse_attention(q, k, v, meta.segments, spec, SMALL,
                                                      interpret=True)
  ref = lambda q, k, v: attention.xla_attention(q, k, v, mask)
  loss = lambda f: lambda *a: (f(*a) * ct).sum()
  got, got_g = jax.jit(jax.value_and_grad(loss(ours), (0, 1, 2)))(q, k, v)
  want, want_g = jax.value_and_grad(loss(ref), (0, 1, 2))(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  for name, g, w in zip("qkv", got_g, want_g):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("transpose", [False, True])
def test_segment_runs_visit_every_same_segment_pair_and_skip_the_rest(transpose):
  spec = masks.MaskSpec("diffusion", 8, 1)
  length, bq, bk = 64, 16, 8
  seg = _segments(3, length, [[16, 40], [], [8, 24, 32, 48]])
  meta = masks.layout_meta(spec, seg)
  seg_t = meta.segments  # [B, 128]: divisible by both tile sizes
  plan = flash.visit_runs(spec, length, bq, bk, transpose)
  lo, hi, one = map(np.asarray, flash.segment_runs(plan, seg_t, bq, bk, transpose))
  ok = np.asarray(masks.dense_mask(spec, meta, meta))  # [B, T, T]: layout and segments
  first, count, _, n_runs = plan
  rows, cols = (bk, bq) if transpose else (bq, bk)
  for b in range(3):
    okb = ok[b].T if transpose else ok[b]
    segb = np.asarray(seg_t[b])
    static = visited = 0
    for i in range(first.shape[0]):
      tiles = {j for r in range(n_runs[i]) for j in range(lo[b, i, r], hi[b, i, r])}
      # Each run only shrinks; every inner tile holding an allowed pair of outer tile i is kept.
      for r in range(n_runs[i]):
        assert first[i, r] <= lo[b, i, r] <= hi[b, i, r] <= first[i, r] + count[i, r]
      need = {j for j in range(okb.shape[1] // cols)
              if okb[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols].any()}
      assert need <= tiles, (b, i, sorted(need - tiles))
      static += sum(count[i, :n_runs[i]])
      visited += len(tiles)
      # one_segment: every query and key of every visit carries one id.
      ids = {int(x) for x in segb[i * rows:(i + 1) * rows]}
      for j in tiles:
        ids |= {int(x) for x in segb[j * cols:(j + 1) * cols]}
      assert one[b, i] == (len(ids) == 1), (b, i, ids)
    if b == 1:  # one sample: nothing to cut, and every tile lies in it
      assert visited == static and one[b].all()
    else:  # packed rows: later samples' runs are cut
      assert visited < static


def test_block_sparse_bf16_inputs_accumulate_in_float32():
  spec = masks.MaskSpec("diffusion", 8, 1)
  meta = masks.layout_meta(spec, jnp.zeros((1, 24), jnp.int32))
  q, k, v, _ = _qkv(jax.random.key(7), 1, 48, 4, 2, 32, jnp.bfloat16)
  out = jax.jit(lambda q, k, v: flash.block_sparse_attention(q, k, v, meta.segments, spec, SMALL,
                                                             interpret=True))(q, k, v)
  assert out.dtype == jnp.bfloat16
  f32 = lambda x: x.astype(jnp.float32)
  want = attention.xla_attention(f32(q), f32(k), f32(v), masks.dense_mask(spec, meta, meta))
  err = jnp.linalg.norm(f32(out) - want) / jnp.linalg.norm(want)
  assert err < 1e-2  # bf16 rounding of inputs and output only; a bf16 accumulator gives ~1e-1


DECODE_CASES = [
    # kind, block, T, S, B, H, K, starts
    ("block_causal", 16, 8, 64, 3, 6, 2, [0, 24, 56]),
    ("causal", 16, 1, 48, 2, 3, 1, [0, 47]),
    ("block_causal", 8, 32, 128, 2, 7, 1, [0, 96]),  # 224 rows: two row tiles
]


@pytest.mark.parametrize("programs,block_rows", [
    (None, None),  # the default: splits that fill one wave of the device (or 132 SMs' worth)
    (decode.TARGET_PROGRAMS, None),  # many splits
    (1, None),  # one split: no combine
    (1, 16),  # a group's rows over several programs, each reading the whole cache
])
@pytest.mark.parametrize("kind,bs,t,s,b,h,kh,starts", DECODE_CASES)
def test_decode_equals_reference_on_random_caches(kind, bs, t, s, b, h, kh, starts, programs,
                                                  block_rows):
  spec = masks.MaskSpec(kind, bs)
  ks = jax.random.split(jax.random.key(s + t), 3)
  q = jax.random.normal(ks[0], (b, t, h, 16))
  kc = jax.random.normal(ks[1], (b, s, kh, 16))
  vc = jax.random.normal(ks[2], (b, s, kh, 16))
  start = jnp.asarray(starts, jnp.int32)
  got = jax.jit(lambda *a: decode.decode_attention(*a, spec, interpret=True, programs=programs,
                                                  block_rows=block_rows))(q, kc, vc, start)
  q_meta = masks.TokenMeta.simple(start[:, None] + jnp.arange(t)[None])
  k_meta = masks.TokenMeta.simple(jnp.broadcast_to(jnp.arange(s), (b, s)))
  want = attention.xla_attention(q, kc, vc, masks.dense_mask(spec, q_meta, k_meta))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tiles,slots,per_split", [
    (64, 264, 64), (64, 264, 128), (64, 264, 2), (8, 264, 64), (128, 264, 2), (64, 264, 300),
    (7, 264, 37), (1, 264, 1)])
def test_one_wave_split_fills_one_wave_and_covers_the_cache(tiles, slots, per_split):
  splits, per = decode.one_wave_split(tiles, slots, per_split)
  assert splits * per >= tiles > (splits - 1) * per  # every tile in a run, no run empty
  assert splits * per_split <= max(slots, per_split)  # one wave (one split if a split overflows)
  # As many splits as fit: one more equal cut would overflow the wave or exceed the tiles.
  fewer_per = -(-tiles // (splits + 1))
  more = -(-tiles // fewer_per) if splits < tiles else splits
  assert more == splits or more * per_split > slots


def test_attend_without_contract_falls_back_to_xla_once(caplog):
  spec = masks.MaskSpec("causal")
  meta = masks.layout_meta(spec, jnp.zeros((1, 16), jnp.int32))
  q, k, v, _ = _qkv(jax.random.key(3), 1, 16, 2, 1, 16, jnp.float32)
  want = attention.xla_attention(q, k, v, masks.dense_mask(spec, meta, meta))
  kernels._fallback_once.cache_clear()
  with caplog.at_level(logging.WARNING, logger="dllm_jax.kernels"):
    for _ in range(2):
      got = attention.attend(q, k, v, spec, meta, meta, impl="pallas")
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert len([r for r in caplog.records if "falls back" in r.message]) == 1
  got = attention.attend(q, k, v, spec, meta, meta, impl="pallas", contract="layout")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_model_with_pallas_attention_equals_xla():
  cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=6, num_kv_heads=2, head_dim=16, qkv_bias=True)
  pallas_cfg = dataclasses.replace(cfg, attention_impl="pallas")
  params = model.init_params(cfg, jax.random.key(0))
  spec = masks.MaskSpec("diffusion", 8, 1)
  seg = jnp.asarray([[0] * 16 + [1] * 8])
  meta = masks.layout_meta(spec, seg)
  tokens = jax.random.randint(jax.random.key(1), (1, 48), 0, 128)
  fwd = jax.jit(model.forward, static_argnums=(1, 4))
  want, _ = fwd(params, cfg, tokens, meta, spec)
  got, _ = fwd(params, pallas_cfg, tokens, meta, spec)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  # Cache branch: two blocks in the cache, then one sub-block of the third against it.
  spec = masks.MaskSpec("block_causal", 8)
  pos = lambda start, n: masks.TokenMeta.simple(jnp.arange(start, start + n, dtype=jnp.int32)[None])
  _, cache = fwd(params, cfg, tokens[:, :16], pos(0, 16), spec, kvcache.init_cache(cfg, 1, 32))
  want, _ = fwd(params, cfg, tokens[:, 16:20], pos(16, 4), spec, cache)
  got, _ = fwd(params, pallas_cfg, tokens[:, 16:20], pos(16, 4), spec, cache)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_visit_plans_cover_the_padded_grid():
  # T=33 padded to 64 rows: 4 grid tiles of 16, of which the layout has 3. The kernels read the
  # plan (and the dk/dv order) at every grid index unchecked, so both must have 4 entries.
  spec = masks.MaskSpec("causal")
  first, count, n_full, n_runs = flash.visit_runs(spec, 33, 16, 16, True, num_outer=4)
  assert first.shape[0] == count.shape[0] == n_full.size == n_runs.size == 4
  assert n_runs[3] == 0 and n_runs[:3].min() > 0
  order = flash.heavy_first((first, count, n_full, n_runs))
  assert sorted(order.tolist()) == [0, 1, 2, 3] and order[-1] == 3
  with pytest.raises(ValueError, match="num_outer"):
    flash.visit_runs(spec, 33, 16, 16, True, num_outer=2)


def test_dkv_tiles_are_visited_heaviest_first():
  spec = masks.MaskSpec("diffusion", 32, 1)
  plan = flash.visit_runs(spec, 256, 64, 64, True)
  order = flash.heavy_first(plan)
  _, count, _, n_runs = plan
  work = [int(count[i, :n_runs[i]].sum()) for i in range(len(n_runs))]
  assert sorted(order.tolist()) == list(range(len(work)))
  assert [work[i] for i in order] == sorted(work, reverse=True)
  assert work[order[0]] > work[order[-1]]  # the layout is uneven, so the order is not trivial


@pytest.mark.parametrize("field,value", [("num_warps_dkv", 3), ("num_warps", 0),
                                         ("dkv_head_split", 0), ("block_q", 48)])
def test_tiles_refuse_bad_settings(field, value):
  with pytest.raises(ValueError, match=field):
    flash.Tiles(**{field: value})


def test_decode_in_bf16_stays_within_bf16_rounding():
  # The split outputs are stored in the output dtype (bf16 here) before the combine.
  spec = masks.MaskSpec("block_causal", 16)
  b, t, s, h, kh, d = 2, 8, 256, 6, 2, 64
  ks = jax.random.split(jax.random.key(7), 3)
  q = jax.random.normal(ks[0], (b, t, h, d)).astype(jnp.bfloat16)
  kc = jax.random.normal(ks[1], (b, s, kh, d)).astype(jnp.bfloat16)
  vc = jax.random.normal(ks[2], (b, s, kh, d)).astype(jnp.bfloat16)
  start = jnp.asarray([40, 248], jnp.int32)
  got = decode.decode_attention(q, kc, vc, start, spec, interpret=True, block_k=16)
  assert got.dtype == jnp.bfloat16
  f32 = lambda x: x.astype(jnp.float32)
  q_meta = masks.TokenMeta.simple(start[:, None] + jnp.arange(t)[None])
  k_meta = masks.TokenMeta.simple(jnp.broadcast_to(jnp.arange(s), (b, s)))
  want = attention.xla_attention(f32(q), f32(kc), f32(vc), masks.dense_mask(spec, q_meta, k_meta))
  err = jnp.linalg.norm(f32(got) - want) / jnp.linalg.norm(want)
  assert err < 1e-2


def test_training_kernels_lower_for_cuda_as_triton_calls(lower_for_cuda):
  # The Triton forward, dq (which also writes delta for the dk/dv kernel) and dk/dv kernels of
  # a fwd+bwd, lowered for CUDA on the CPU: the interpreter runs their bodies, not Triton's
  # lowering of them (2L diffusion, GQA 6, head_dim 128, bf16: the benchmark's shape, shortened).
  spec = masks.MaskSpec("diffusion", 32, 1)
  meta = masks.layout_meta(spec, _segments(2, 128, [[64], []]))
  b, t, h, kh, d = 2, meta.positions.shape[1], 12, 2, 128
  tiles = flash.Tiles(forward="triton", dkv="triton")
  sd = jax.ShapeDtypeStruct

  def fwd_bwd(q, k, v, ct):
    out, vjp = jax.vjp(lambda q, k, v: flash.block_sparse_attention(
        q, k, v, meta.segments, spec, tiles), q, k, v)
    return out, vjp(ct)

  text = lower_for_cuda(fwd_bwd, sd((b, t, h, d), jnp.bfloat16), sd((b, t, kh, d), jnp.bfloat16),
                        sd((b, t, kh, d), jnp.bfloat16), sd((b, t, h, d), jnp.bfloat16))
  assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 3


def test_auto_attention_is_the_kernel_on_a_gpu_and_xla_on_the_cpu(monkeypatch):
  # "auto" (the config default) must reach the kernels on a GPU; on this CPU-only machine every
  # other test runs the XLA reference, so a dispatch that never chose the kernel would pass.
  assert attention.resolve_impl("xla") == "xla" and attention.resolve_impl("pallas") == "pallas"
  for backend, want in (("cpu", "xla"), ("gpu", "pallas")):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    assert attention.resolve_impl("auto") == want, backend


def test_model_tells_the_kernels_its_mask_contract(monkeypatch):
  # Without a contract `kernels.attend` falls back to XLA (with one warning): the model's
  # uncached forward must pass "layout" and its cache branch "cache", or the kernel never runs.
  seen = []

  def spy(q, k, v, spec, q_meta, k_meta, contract):
    seen.append(contract)
    return attention.xla_attention(q, k, v, masks.dense_mask(spec, q_meta, k_meta))

  cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=8, attention_impl="pallas")
  params = model.init_params(cfg, jax.random.key(0))
  monkeypatch.setattr(kernels, "attend", spy)  # (after init, whose trace attends too)
  spec = masks.MaskSpec("causal")
  meta = masks.TokenMeta.simple(jnp.arange(4, dtype=jnp.int32)[None])
  tokens = jnp.zeros((1, 4), jnp.int32)
  model.forward(params, cfg, tokens, meta, spec)
  model.forward(params, cfg, tokens, meta, spec, kvcache.init_cache(cfg, 1, 8))
  assert seen == ["layout", "cache"]


def test_fully_masked_query_rows_attend_uniformly_not_nan():
  # A row with no allowed key (padding) must stay finite: the reference masks with a finite
  # -1e30, so its softmax is uniform over the keys, i.e. the mean of v.
  q, k, v, _ = _qkv(jax.random.key(4), 1, 8, 2, 1, 16, jnp.float32)
  mask = jnp.tril(jnp.ones((8, 8), bool)).at[3].set(False)[None]
  out = attention.xla_attention(q, k, v, mask)
  assert bool(jnp.isfinite(out).all())
  np.testing.assert_allclose(out[0, 3], jnp.broadcast_to(v[0, :, 0].mean(0), (2, 16)),
                             rtol=1e-5, atol=1e-6)
