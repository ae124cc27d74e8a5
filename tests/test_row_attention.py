"""`kernels.decode.row_attention` (interpreted): one query token's attention at batch 1 with
its q/k/v parts finished, RoPE and the cache write in the same kernel, against the ops it
replaces, and inside the model's one-row step."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax import attention, masks, model
from dllm_jax import cache as kvcache
from dllm_jax.kernels import decode, matvec
from test_matvec import CFG, check_one_row_step

THETA = 10000.0


def _reference(qp, kp, vp, rsqrt, biases, kc, vc, pos, spec, dtype, write_mask):
  """The one-row step's ops before this kernel: `finish_partials`, `rope`, `cache.write` and
  the XLA attention over the written cache."""
  h, d = qp.shape[1:]
  kv = kp.shape[1]
  bq, bk, bv = biases or (None,) * 3
  fin = lambda parts, b: matvec.finish_partials(parts.reshape(parts.shape[0], -1), rsqrt, dtype,
                                                None if b is None else b.reshape(-1))
  positions = jnp.full((1, 1), pos, jnp.int32)
  q = model.rope(fin(qp, bq).reshape(1, 1, h, d), positions, THETA)
  k = model.rope(fin(kp, bk).reshape(1, 1, kv, d), positions, THETA)
  v = fin(vp, bv).reshape(1, 1, kv, d)
  kc = kvcache.write(kc[None], k, jnp.array([pos]), write_mask)
  vc = kvcache.write(vc[None], v, jnp.array([pos]), write_mask)
  k_meta = masks.TokenMeta.simple(jnp.arange(kc.shape[1], dtype=jnp.int32)[None])
  mask = masks.dense_mask(spec, masks.TokenMeta.simple(positions), k_meta)
  out = attention.xla_attention(q, kc.astype(dtype), vc.astype(dtype), mask)
  return out.reshape(h, d), kc[0], vc[0]


def _inputs(h, kv, d, slots, parts, bias, cache_dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 8)
  qp = jax.random.normal(ks[0], (parts, h, d))
  kp = jax.random.normal(ks[1], (parts, kv, d))
  vp = jax.random.normal(ks[2], (parts, kv, d))
  rsqrt = jnp.full((16,), 0.7, jnp.float32)
  kc = jax.random.normal(ks[3], (slots, kv, d)).astype(cache_dtype)
  vc = jax.random.normal(ks[4], (slots, kv, d)).astype(cache_dtype)
  biases = None
  if bias:
    biases = [jax.random.normal(k, s).astype(jnp.bfloat16)
              for k, s in zip(ks[5:], [(h, d), (kv, d), (kv, d)])]
  return qp, kp, vp, rsqrt, biases, kc, vc


def _run(pos, spec, *, h=12, kv=2, d=64, slots=128, parts=3, bias=True, splits=None, block_k=None,
         cache_dtype=jnp.bfloat16, write_mask=None, seed=0, combine=True):
  qp, kp, vp, rsqrt, biases, kc, vc = _inputs(h, kv, d, slots, parts, bias, cache_dtype, seed)
  cos, sin = (t.reshape(d // 2) for t in model.rope_tables(jnp.full((1, 1), pos), d, THETA))
  got = decode.row_attention(qp, kp, vp, rsqrt, cos, sin, kc, vc,
                             jnp.zeros((kv,), jnp.int32) if combine else None,
                             jnp.array([pos]), spec, dtype=jnp.bfloat16, biases=biases,
                             write_mask=write_mask, splits=splits, block_k=block_k,
                             combine=combine, interpret=True)
  want = _reference(qp, kp, vp, rsqrt, biases, kc, vc, pos, spec, jnp.bfloat16, write_mask)
  return got, want


CAUSAL = masks.MaskSpec("causal")
BLOCK = masks.MaskSpec("block_causal", 32)
BLOCK48 = masks.MaskSpec("block_causal", 48)  # blocks that do not divide the cache


@pytest.mark.parametrize("pos,spec,shape,splits,block_k", [
    (77, CAUSAL, dict(), None, None),  # the default split (the 2 tiles of 64 in one run)
    (200, CAUSAL, dict(slots=256), None, None),  # the default split: 2 runs of 2 tiles
    (0, CAUSAL, dict(), 2, None),  # the first slot: only the new key
    (63, CAUSAL, dict(), 2, 32),  # the last slot of a tile, several tiles a split
    (64, CAUSAL, dict(), 4, 32),  # the first slot of a tile
    (127, CAUSAL, dict(), 8, 16),  # the last slot; every split holds one tile
    (200, CAUSAL, dict(), 3, 32),  # past the cache: written at the last slot, as cache.write
    (40, BLOCK, dict(), 2, 16),  # block-causal: stale slots after the new one are seen
    (95, BLOCK, dict(h=9, kv=3, bias=False), 1, 32),  # one split, SmolLM2's group of 3
    (50, CAUSAL, dict(h=7, kv=1, d=32, parts=1), 3, 16),  # a group of 7, one part, head_dim 32
    (90, CAUSAL, dict(h=4, kv=4, d=128, parts=5), 2, 64),  # no grouping, head_dim 128
    (100, BLOCK48, dict(), 4, 16),  # the block runs past the cache's last slot
    (30, BLOCK48, dict(), 3, 16),
    (60, CAUSAL, dict(h=20, kv=1, d=32, parts=2), 2, 32),  # a group of 20: 32-row tiles
])
def test_row_attention_equals_the_ops_it_replaces(pos, spec, shape, splits, block_k):
  (out, kc, vc, counter), (want_out, want_kc, want_vc) = _run(
      pos, spec, splits=splits, block_k=block_k, **shape)
  # The cache rows are the same ops' results, rounded the same way: equal.
  np.testing.assert_array_equal(np.asarray(kc, np.float32), np.asarray(want_kc, np.float32))
  np.testing.assert_array_equal(np.asarray(vc, np.float32), np.asarray(want_vc, np.float32))
  # Attention over bf16 inputs in float32, summed in another order (head_dim in two halves,
  # float32 partials where decode_attention rounds them to bf16): within a bf16 rounding.
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32),
                             rtol=1e-2, atol=8e-3)
  np.testing.assert_array_equal(counter, 0)  # left zero for the next layer's launch


def test_row_attention_without_the_write_sees_the_old_slot():
  (out, kc, vc, _), (want_out, want_kc, want_vc) = _run(
      70, CAUSAL, splits=2, write_mask=jnp.array([False]))
  np.testing.assert_array_equal(np.asarray(kc, np.float32), np.asarray(want_kc, np.float32))
  np.testing.assert_array_equal(np.asarray(vc, np.float32), np.asarray(want_vc, np.float32))
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32),
                             rtol=1e-2, atol=8e-3)
  written, _ = _run(70, CAUSAL, splits=2)
  assert not np.array_equal(np.asarray(written[1]), np.asarray(kc))  # the write did happen


def test_row_attention_with_a_float32_cache():
  (out, kc, vc, _), (want_out, want_kc, want_vc) = _run(33, CAUSAL, splits=2,
                                                        cache_dtype=jnp.float32)
  assert kc.dtype == vc.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(kc), np.asarray(want_kc))
  np.testing.assert_array_equal(np.asarray(vc), np.asarray(want_vc))
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32),
                             rtol=1e-2, atol=8e-3)


def test_row_attention_counts_on_the_counter():
  # A counter not zero on entry: no program sees itself last, so no output is combined. Shows
  # the combine is what writes the output (the tests above would pass a kernel that never
  # counted only if every split wrote it).
  qp, kp, vp, rsqrt, biases, kc, vc = _inputs(12, 2, 64, 128, 3, True, jnp.bfloat16)
  cos, sin = (t.reshape(32) for t in model.rope_tables(jnp.full((1, 1), 30), 64, THETA))
  args = (qp, kp, vp, rsqrt, cos, sin, kc, vc)
  run = lambda counter: decode.row_attention(*args, counter, jnp.array([30]), CAUSAL,
                                             dtype=jnp.bfloat16, biases=biases, splits=2,
                                             interpret=True)
  good, _, _, counter = run(jnp.zeros((2,), jnp.int32))
  bad, _, _, counter_bad = run(jnp.full((2,), 5, jnp.int32))
  np.testing.assert_array_equal(counter, 0)
  np.testing.assert_array_equal(counter_bad, 7)  # each of the 2 splits added one
  assert np.abs(np.asarray(good, np.float32)).max() > 0.1
  assert not np.allclose(np.asarray(good, np.float32), np.asarray(bad, np.float32))


def test_row_attention_launches_chain_on_the_returned_counter():
  # As the model's layers do: the second launch takes the first one's counter (and cache).
  qp, kp, vp, rsqrt, biases, kc, vc = _inputs(12, 2, 64, 128, 3, True, jnp.bfloat16)
  counter = jnp.zeros((2,), jnp.int32)
  for pos in (40, 41):
    cos, sin = (t.reshape(32) for t in model.rope_tables(jnp.full((1, 1), pos), 64, THETA))
    want = _reference(qp, kp, vp, rsqrt, biases, kc, vc, pos, CAUSAL, jnp.bfloat16, None)
    out, kc, vc, counter = decode.row_attention(
        qp, kp, vp, rsqrt, cos, sin, kc, vc, counter, jnp.array([pos]), CAUSAL,
        dtype=jnp.bfloat16, biases=biases, splits=4, block_k=16, interpret=True)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want[0], np.float32),
                               rtol=1e-2, atol=8e-3)
    np.testing.assert_array_equal(np.asarray(kc, np.float32), np.asarray(want[1], np.float32))
    np.testing.assert_array_equal(counter, 0)


def _combine(parts, lse, dtype):
  """The splits' combine of `row_attention` (float32, as its last program does it), rounded."""
  w = jnp.exp2(lse - lse.max(0))
  return (jnp.einsum("ah,ahd->hd", w, parts) / w.sum(0)[:, None]).astype(dtype)


@pytest.mark.parametrize("pos,spec,shape,splits,block_k", [
    (77, CAUSAL, dict(), None, None),
    (200, CAUSAL, dict(slots=256), None, None),  # 2 splits of 2 tiles
    (0, CAUSAL, dict(), 2, None),  # the second split sees no key: lse -inf, weight 0
    (127, CAUSAL, dict(), 8, 16),
    (95, BLOCK, dict(h=9, kv=3, bias=False), 1, 32),
    (100, BLOCK48, dict(), 4, 16),
    (60, CAUSAL, dict(h=20, kv=1, d=32, parts=2), 2, 32),
    (200, CAUSAL, dict(), 3, 32),  # past the cache; 4 tiles in 3 splits (2, 2, 0)
    (5, CAUSAL, dict(), 5, 16),  # the later splits see no key
    (50, CAUSAL, dict(h=7, kv=1, d=32, parts=1), 3, 16),
    (90, CAUSAL, dict(h=4, kv=4, d=128, parts=5), 2, 64),
    (70, CAUSAL, dict(write_mask=jnp.array([False])), 2, None),
    (33, CAUSAL, dict(cache_dtype=jnp.float32), 2, None),
])
def test_row_attention_leaves_its_splits_for_the_o_launch(pos, spec, shape, splits, block_k):
  # combine=False: the same cache write, and the splits' outputs and log-sum-exps that, combined,
  # give the combining launch's output and the ops it replaces.
  (out, kc, vc, _), (want_out, want_kc, want_vc) = _run(
      pos, spec, splits=splits, block_k=block_k, **shape)
  (parts, lse), kc2, vc2, none = _run(pos, spec, splits=splits, block_k=block_k,
                                      combine=False, **shape)[0]
  h, d = want_out.shape
  assert none is None
  assert parts.shape == (lse.shape[0], h, d) and parts.dtype == lse.dtype == jnp.float32
  assert lse.shape[0] == (splits or decode.default_row_splits(kc.shape[0] // 64))
  np.testing.assert_array_equal(np.asarray(kc2, np.float32), np.asarray(want_kc, np.float32))
  np.testing.assert_array_equal(np.asarray(vc2, np.float32), np.asarray(want_vc, np.float32))
  got = np.asarray(_combine(parts, lse, jnp.bfloat16), np.float32)
  np.testing.assert_allclose(got, np.asarray(want_out, np.float32), rtol=1e-2, atol=8e-3)
  # The same float32 arithmetic as the launch's own combine, up to the order of its sums.
  np.testing.assert_allclose(got, np.asarray(out, np.float32), rtol=8e-3, atol=1e-6)


def test_combined_matvec_partials_combines_the_row_it_multiplies():
  # The o launch of the one-row step: the row is the splits' combine, head by head; a chunk
  # of the row never spans two heads (block_k=32 below cuts 64-wide heads in two chunks).
  for (a, h, d, n, kw) in [(5, 12, 128, 1536, {}), (3, 9, 64, 576, {}),
                           (4, 4, 64, 64, dict(splits=2, block_k=32)), (1, 6, 32, 96, {}),
                           (3, 12, 128, 1536, dict(splits=8)),  # runs start mid-head
                           (16, 4, 128, 64, dict(splits=8))]:  # ROW_MAX_SPLITS, 64-row runs
    ks = jax.random.split(jax.random.key(a * h), 3)
    parts = jax.random.normal(ks[0], (a, h, d))
    # Base-2 log-sum-exps far past float32's exp2 range: only the largest's subtraction keeps
    # the weights finite.
    lse = jax.random.normal(ks[1], (a, h)) * 4 + jnp.array([200.0, -150.0, 0.0] * 6)[:a, None]
    if a > 1:
      lse = lse.at[a - 1, 1].set(-jnp.inf)  # a split that saw no key
      parts = parts.at[a - 1, 1].set(0.0)
    w = (jax.random.normal(ks[2], (h * d, n)) * d ** -0.5).astype(jnp.bfloat16)
    row = _combine(parts, lse, jnp.bfloat16).reshape(h * d)
    want = matvec.matvec_partials(row, w, interpret=True, **kw)
    got = matvec.combined_matvec_partials(parts, lse, w, dtype=jnp.bfloat16, interpret=True,
                                          **kw)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got.sum(0)), np.asarray(want.sum(0)), rtol=1e-2,
                               atol=2e-2)
    exact = np.asarray(row, np.float64) @ np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(got.sum(0)), exact, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("change,match", [
    (dict(lse=jnp.zeros((3, 11))), r"lse \(3, 11\)"),
    (dict(parts=jnp.zeros((3, 12, 64))), "1536 rows are not the parts' 12 heads x 64"),
    (dict(parts=jnp.zeros((3, 16, 48)), lse=jnp.zeros((3, 16)),
          w=jnp.zeros((768, 64), jnp.bfloat16)), "head_dim 48"),
    (dict(block_n=8), "block_n=8 must be"),
    (dict(parts=jnp.zeros((0, 12, 128)), lse=jnp.zeros((0, 12))), "0 splits of the attention"),
    (dict(parts=jnp.zeros((17, 12, 128)), lse=jnp.zeros((17, 12))), "17 splits"),
    (dict(lse=jnp.zeros((3, 12), jnp.int32)), "'lse': 'int32'"),
    (dict(w=jnp.zeros((1536, 40), jnp.bfloat16)), "columns 40"),
    (dict(splits=5), "splits=5 does not divide"),
])
def test_combined_matvec_partials_names_bad_inputs(change, match):
  kw = dict(parts=jnp.zeros((3, 12, 128)), lse=jnp.zeros((3, 12)),
            w=jnp.zeros((1536, 64), jnp.bfloat16), splits=None, block_n=32)
  kw.update(change)
  with pytest.raises(ValueError, match=match):
    matvec.combined_matvec_partials(kw["parts"], kw["lse"], kw["w"], dtype=jnp.bfloat16,
                                    splits=kw["splits"], block_n=kw["block_n"], interpret=True)


def test_row_attention_counter_goes_with_the_combine():
  qp, kp, vp, rsqrt, _, kc, vc = _inputs(12, 2, 64, 128, 3, False, jnp.bfloat16)
  cos = sin = jnp.zeros((32,))
  for counter, combine in [(None, True), (jnp.zeros((2,), jnp.int32), False)]:
    with pytest.raises(ValueError, match="combine=True needs the counter"):
      decode.row_attention(qp, kp, vp, rsqrt, cos, sin, kc, vc, counter, jnp.array([3]), CAUSAL,
                           dtype=jnp.bfloat16, combine=combine, interpret=True)


def test_default_row_splits():
  assert decode.default_row_splits(12) == 6
  assert decode.default_row_splits(1) == 1
  assert decode.default_row_splits(3) == 2
  assert decode.default_row_splits(1000) == decode.ROW_MAX_SPLITS


@pytest.mark.parametrize("change,match", [
    (dict(spec=masks.MaskSpec("diffusion")), "causal or block_causal"),
    (dict(splits=9), r"splits=9 must be 1 \.\. 8"),
    (dict(splits=0), r"splits=0 must be"),
    (dict(block_k=24), "block_k=24 must be a power of two"),
    (dict(counter=jnp.zeros((3,), jnp.int32)), r"'counter': \(3,\)"),
    (dict(v_cache=jnp.zeros((128, 2, 64), jnp.float32)), "differ"),
    (dict(biases=[jnp.zeros((12, 64))] * 3), "biases"),
    (dict(k_cache=jnp.zeros((1, 128, 2, 64), jnp.bfloat16)), r"'k_cache': \(1, 128, 2, 64\)"),
    (dict(k_cache=jnp.zeros((128, 2, 128), jnp.bfloat16)), r"'k_cache': \(128, 2, 128\)"),
    (dict(pos=3), r"'pos': \(\)"),
    (dict(pos=jnp.array([3.0])), r"'pos': 'float32'"),
    (dict(counter=jnp.zeros((2,), jnp.float32)), r"'counter': 'float32'"),
    (dict(write_mask=jnp.array([True, False])), r"'write_mask': \(2,\)"),
    (dict(write_mask=jnp.array([1])), r"'write_mask': 'int32'"),
    (dict(splits=2.0), r"splits=2\.0 is not an integer"),
])
def test_row_attention_names_bad_inputs(change, match):
  qp, kp, vp, rsqrt, _, kc, vc = _inputs(12, 2, 64, 128, 3, False, jnp.bfloat16)
  cos = sin = jnp.zeros((32,))
  kw = dict(spec=CAUSAL, counter=jnp.zeros((2,), jnp.int32), k_cache=kc, v_cache=vc,
            splits=None, block_k=16, biases=None, pos=jnp.array([3]), write_mask=None)
  kw.update(change)
  with pytest.raises(ValueError, match=match):
    decode.row_attention(qp, kp, vp, rsqrt, cos, sin, kw["k_cache"], kw["v_cache"],
                         kw["counter"], kw["pos"], kw["spec"], dtype=jnp.bfloat16,
                         biases=kw["biases"], write_mask=kw["write_mask"], splits=kw["splits"],
                         block_k=kw["block_k"], interpret=True)


def test_row_attention_takes_a_numpy_integer_split():
  (out, *_), (want, *_) = _run(50, CAUSAL, splits=np.int64(2))
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32),
                             rtol=1e-2, atol=8e-3)


def test_row_supported_names_the_shape():
  assert decode.row_supported(12, 2, 128, 768) is None
  assert "head_dim 16" in decode.row_supported(4, 2, 16, 64)
  assert "multiple of 16" in decode.row_supported(4, 2, 64, 40)
  assert "not a multiple of 3 KV heads" in decode.row_supported(4, 3, 64, 64)
  assert "group of 129" in decode.row_supported(129, 1, 64, 64)


def test_row_attention_lowers_for_cuda_as_one_triton_call(lower_for_cuda):
  sd = jax.ShapeDtypeStruct
  f32, bf = jnp.float32, jnp.bfloat16
  fn = lambda *a: decode.row_attention(*a[:10], CAUSAL, dtype=bf, biases=list(a[10:]))
  args = [sd((3, 12, 128), f32), sd((3, 2, 128), f32), sd((3, 2, 128), f32), sd((16,), f32),
          sd((64,), f32), sd((64,), f32), sd((768, 2, 128), bf), sd((768, 2, 128), bf),
          sd((2,), jnp.int32), sd((1,), jnp.int32), sd((12, 128), bf), sd((2, 128), bf),
          sd((2, 128), bf)]
  text = lower_for_cuda(fn, *args)
  assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 1

  def uncombined(*a):  # the model's pair: the splits left for the o launch to combine
    (p, lse), kc, vc, _ = decode.row_attention(*a[:8], None, a[9], CAUSAL, dtype=bf,
                                               combine=False)
    return matvec.combined_matvec_partials(p, lse, a[-1], dtype=bf), kc, vc
  text = lower_for_cuda(uncombined, *args[:10], sd((1536, 1536), bf))
  assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 2


@pytest.mark.parametrize("stacked,spec,kernel_layout", [
    (False, CAUSAL, "in_out"), (True, masks.MaskSpec("block_causal", 8), "in_out"),
    (False, CAUSAL, "out_in")])  # out_in: the o launch combines into a [N, K] product
def test_model_one_row_step_with_row_attention_equals_xla(stacked, spec, kernel_layout):
  cfg = dataclasses.replace(CFG, head_dim=32, attention_impl="pallas", kernel_layout=kernel_layout)
  # 48 slots: 3 tiles of 16 in 2 splits (slots 0-31, 32-47), and the step's token at 40, so
  # both splits see keys and the o launch's combine of them runs in every layer (or the scan).
  assert decode.default_row_splits(48 // 16) == 2
  jaxpr, layers = check_one_row_step(cfg, stacked, spec, slots=48, prefill=40)
  assert jaxpr.count("name=row_attention") == layers
  assert jaxpr.count("name=combined_matvec_partials") == layers  # o
  assert jaxpr.count("name=matvec_partials") == layers  # down
  assert "name=decode_attention" not in jaxpr


@pytest.mark.parametrize("off,slots", [(True, 16), (False, decode.ROW_MAX_SLOTS + 64)])
def test_model_without_row_attention_runs_the_decode_kernel(monkeypatch, off, slots):
  # Turned off, or a cache longer than row_attention was measured at.
  if off:
    monkeypatch.setattr(model, "ROW_ATTENTION", False)
  cfg = dataclasses.replace(CFG, head_dim=32, attention_impl="pallas", matvec_impl="pallas")
  params = model.with_layout(model.init_params(cfg, jax.random.key(0)), "per_layer")
  cache = kvcache.init_cache(cfg, 1, slots, per_layer=True)
  meta = masks.TokenMeta.simple(jnp.full((1, 1), 3, jnp.int32))
  jaxpr = str(jax.make_jaxpr(model.forward, static_argnums=(1, 4))(
      params, cfg, jnp.ones((1, 1), jnp.int32), meta, CAUSAL, cache))
  assert "name=row_attention" not in jaxpr
  assert jaxpr.count("name=decode_attention") == CFG.num_layers
