"""Decode attention: a run of query tokens against the KV cache, split over the cache length.

Contract (model.py's cache branch): row b's T queries sit at positions start[b] .. start[b]+T-1,
cache slot s holds position s, one segment. A query at position p may see slots <= p (`causal`)
or up to the end of its block, ((p // B) + 1) * B - 1 (`block_causal`), so each row needs only a
prefix of the cache: tiles past the last allowed slot are neither read nor computed.

The queries of one KV head's group are folded into the rows of one tile ([T * group, D]), so each
K/V tile is read once per group. The cache length is split over programs (flash-decoding), each
writing its normalised partial output and log-sum-exp; a small XLA step combines them (none when
one program covers the whole cache). Partials are stored in the output's dtype by default, as
vLLM's paged attention v2 does: at batch 32 float32 partials were about an eighth of the bytes
the kernel moves, read again by the combine. Everything is in base 2, like `flash`.

`row_attention` is the batch-1, one-token case of the model's one-row step
(`model._row_attention`): the same attention with the work around it in its launch (the q/k/v
parts' sums, RoPE, the cache write), which took five small XLA kernels around
`decode_attention`. Its splits' combine is either its own (`combine=True`: the last program of a
KV head, found by an atomic counter) or, as the model runs it, the o launch's
(`combine=False`, `matvec.combined_matvec_partials`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dllm_jax import masks

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)
# Programs of this kernel that one SM holds at once (64-slot K and V tiles of head_dim 128 in 3
# stages take 96 KB of shared memory each; ncu on the H100 read 12.5% occupancy, two 4-warp
# programs). By default the cache is split so the whole grid fits in one such wave: a grid just
# over it runs a second, nearly empty wave (on the H200, B=32, S=4096, 1.5B heads: 5 splits = 320
# programs took 57.0 us, 3 splits = 192 took 46.9 and 9 splits = 576 took 51.1; BENCHMARKS.md).
RESIDENT_PER_SM = 2
# Where the device does not say how many SMs it has (CPU, interpret mode): an H100's or H200's.
DEFAULT_SM_COUNT = 132
# The old default, kept as a knob value: split the cache into at least this many programs.
TARGET_PROGRAMS = 528


def sm_count() -> int:
  """SMs of the default device (`core_count` on GPUs), else DEFAULT_SM_COUNT."""
  n = getattr(jax.devices()[0], "core_count", None)
  return n if isinstance(n, int) and n > 0 else DEFAULT_SM_COUNT


def _dot(a, b, trans_b=False):
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _last_slot(spec: masks.MaskSpec, pos):
  if spec.kind == "causal":
    return pos
  bs = spec.block_size
  return (lax.div(pos, bs) + 1) * bs - 1


def _kernel(start_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, spec, num_queries, group,
            rows, block_k, tiles_per_split, num_kv_tiles, scale):
  split, row_tile, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start = start_ref[b]
  q = q_ref[...]
  r = row_tile * rows + jnp.arange(rows, dtype=jnp.int32)
  t = lax.div(r, group)  # query offset of each row
  last = jnp.where(t < num_queries, _last_slot(spec, start + t), -1)  # padding rows see nothing
  # Tile range of the rows of this tile: full up to the first real row's limit, none past the last.
  t_first = lax.div(row_tile * rows, group)
  t_last = jnp.minimum(lax.div(row_tile * rows + rows - 1, group), num_queries - 1)
  n_full = jnp.minimum(lax.div(_last_slot(spec, start + t_first) + 1, block_k), num_kv_tiles)
  n_used = jnp.minimum(lax.div(_last_slot(spec, start + t_last) + block_k, block_k),
                       num_kv_tiles)
  lo = split * tiles_per_split
  hi = jnp.minimum(lo + tiles_per_split, n_used)

  def body(j, carry, masked):
    acc, m, l = carry
    first = pl.multiple_of(j * block_k, block_k)
    k = k_ref[pl.ds(first, block_k), :]
    s = _dot(q, k, trans_b=True) * (scale * _LOG2E)
    if masked:
      slot = first + jnp.arange(block_k, dtype=jnp.int32)
      s = jnp.where(slot[None, :] <= last[:, None], s, _MASKED)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    v = v_ref[pl.ds(first, block_k), :]
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l * alpha + p.sum(axis=1)

  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
           jnp.zeros((rows,), jnp.float32))
  mid = jnp.clip(n_full, lo, hi)
  carry = lax.fori_loop(lo, mid, functools.partial(body, masked=False), carry)
  acc, m, l = lax.fori_loop(mid, hi, functools.partial(body, masked=True), carry)
  # A split that saw no tile (or a padding row) has l == 0: output 0, lse -inf, weight 0.
  o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)


def split_cache(num_kv_tiles: int, programs: int, programs_per_split: int) -> tuple[int, int]:
  """(splits, tiles per split): the cache's tiles cut into at least `programs` /
  `programs_per_split` runs of equal length (the last shorter), none empty."""
  splits = max(1, min(num_kv_tiles, -(-programs // programs_per_split)))
  per = -(-num_kv_tiles // splits)
  return -(-num_kv_tiles // per), per


def one_wave_split(num_kv_tiles: int, slots: int, programs_per_split: int) -> tuple[int, int]:
  """(splits, tiles per split): as many equal runs as keep the grid within `slots` resident
  programs (one wave), at least one, never more than the tiles."""
  return split_cache(num_kv_tiles, max(1, slots // programs_per_split), 1)


def plan_splits(num_kv_tiles: int, programs_per_split: int,
                programs: int | None = None) -> tuple[int, int]:
  """(splits, tiles per split) of `decode_attention`'s `programs` knob: None fills one wave of
  the device (RESIDENT_PER_SM per SM), an int asks for at least that many programs."""
  if programs is None:
    return one_wave_split(num_kv_tiles, RESIDENT_PER_SM * sm_count(), programs_per_split)
  return split_cache(num_kv_tiles, programs, programs_per_split)


def _pick_block_k(cache_len: int) -> int | None:
  for bk in (64, 32, 16):
    if cache_len % bk == 0:
      return bk
  return None


def supported(q_BTHD, k_BSKD) -> str | None:
  """None when `decode_attention` covers these shapes, else why not."""
  if _pick_block_k(k_BSKD.shape[1]) is None:
    return f"cache length {k_BSKD.shape[1]} is not a multiple of 16"
  d = q_BTHD.shape[-1]
  if d < 16 or d & (d - 1):
    return f"head_dim {d} is not a power of two >= 16"
  return None


def decode_attention(q_BTHD, k_BSKD, v_BSKD, start_B, spec: masks.MaskSpec, *,
                     interpret: bool = False, block_k: int | None = None,
                     programs: int | None = None, num_warps: int = 4, num_stages: int = 3,
                     partial_dtype=None, block_rows: int | None = None):
  """Attention of queries at positions start[b] + (0..T-1) over cache slots 0..S-1.

  Equals `attention.xla_attention` under `masks.dense_mask` of the model's cache branch metadata.
  `block_k` (cache slots per tile, default the largest of 64/32/16 dividing S) and `programs`
  (split the cache length into at least this many programs; default: as many as fill one wave,
  RESIDENT_PER_SM per SM of the device) are tuning knobs, and so are
  `partial_dtype` (dtype of the per-split outputs; default the queries' dtype) and `block_rows`
  (query rows of a group per program, a power of two >= 16; default all of them, up to 128).
  """
  if spec.kind not in ("causal", "block_causal"):
    raise ValueError(f"decode attention takes a causal or block_causal spec, got {spec}")
  b, t, h, d = q_BTHD.shape
  s, kv_heads = k_BSKD.shape[1], k_BSKD.shape[2]
  group = h // kv_heads
  block_k = block_k or _pick_block_k(s)
  if block_k is None or s % block_k:
    raise ValueError(f"cache length {s} must be a multiple of 16 (and of block_k={block_k})")
  n_rows = t * group
  if block_rows is not None and (block_rows < 16 or block_rows & (block_rows - 1)):
    raise ValueError(f"block_rows={block_rows}: must be a power of two >= 16")
  rows = block_rows or max(16, min(128, pl.next_power_of_2(n_rows)))
  row_tiles = -(-n_rows // rows)
  num_kv_tiles = s // block_k
  splits, tiles_per_split = plan_splits(num_kv_tiles, b * kv_heads * row_tiles, programs)

  # [B, T, K*G, D] -> [B, K, T*G rows (padded), D]: row r is query r // G, head r % G of the group.
  q = q_BTHD.reshape(b, t, kv_heads, group, d).transpose(0, 2, 1, 3, 4)
  q = q.reshape(b, kv_heads, n_rows, d)
  q = jnp.pad(q, [(0, 0), (0, 0), (0, row_tiles * rows - n_rows), (0, 0)])

  kernel = functools.partial(
      _kernel, spec=spec, num_queries=t, group=group, rows=rows, block_k=block_k,
      tiles_per_split=tiles_per_split, num_kv_tiles=num_kv_tiles, scale=d ** -0.5)
  part = lambda dtype, *shape: jax.ShapeDtypeStruct(
      (splits, b, kv_heads, row_tiles * rows) + shape, dtype)
  start = jnp.asarray(start_B, jnp.int32)
  o, lse = pl.pallas_call(
      kernel,
      grid=(splits, row_tiles, b, kv_heads),
      in_specs=[
          pl.BlockSpec((b,), lambda *_: (0,)),
          pl.BlockSpec((None, None, rows, d), lambda sp, rt, bi, ki: (bi, ki, rt, 0)),
          pl.BlockSpec((None, s, None, d), lambda sp, rt, bi, ki: (bi, 0, ki, 0)),
          pl.BlockSpec((None, s, None, d), lambda sp, rt, bi, ki: (bi, 0, ki, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, rows, d), lambda sp, rt, bi, ki: (sp, bi, ki, rt, 0)),
          pl.BlockSpec((None, None, None, rows), lambda sp, rt, bi, ki: (sp, bi, ki, rt)),
      ],
      out_shape=[part(partial_dtype or q_BTHD.dtype, d), part(jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="decode_attention",
  )(start, q, k_BSKD, v_BSKD)

  if splits == 1:
    out = o[0]
  else:  # splits that saw no tile carry lse = -inf and weigh nothing; split 0 always sees slot 0
    w = jnp.exp2(lse - lse.max(axis=0)[None])
    out = (o.astype(jnp.float32) * w[..., None]).sum(0) / w.sum(0)[..., None]
  out = out[:, :, :n_rows].reshape(b, kv_heads, t, group, d).transpose(0, 2, 1, 3, 4)
  return out.reshape(b, t, h, d).astype(q_BTHD.dtype)


# --------------------------------------------------------------------------------------------
# One row (batch 1, one query token) with its RoPE and cache write: `row_attention`.


def _finish_rows(ref, bias_ref, first, n, half, d2, num_parts, rsqrt, dtype, count=None):
  """float32 [n, d2] of `matvec.finish_partials` on heads first .. first+n-1, columns
  half*d2 .. half*d2+d2 of the parts ref [S, heads, D]: their sum (added one by one) times
  1/rms, rounded to dtype, plus the bias rounded as XLA rounds a bf16 add. Rows at or past
  `count` (if given) are masked: they read 0."""
  sl = (pl.ds(first, n), pl.ds(half * d2, d2))
  mask = None
  if count is not None:
    mask = jnp.broadcast_to((jnp.arange(n, dtype=jnp.int32) < count)[:, None], (n, d2))
  load = lambda r: plgpu.load(r, mask=mask, other=0.0 if mask is not None else None)
  # (A Python int index does not discharge in the interpreter: jnp.int32.)
  parts = [load(ref.at[(jnp.int32(s),) + sl]).astype(jnp.float32) for s in range(num_parts)]
  y = functools.reduce(lambda a, b: a + b, parts)
  y = (y * rsqrt).astype(dtype).astype(jnp.float32)
  if bias_ref is not None:
    y = (y + load(bias_ref.at[sl]).astype(jnp.float32)).astype(dtype).astype(jnp.float32)
  return y


def combine_weights(lses):
  """(weights, their sum) of the splits' combine: exp2 of each split's base-2 log-sum-exp less
  the largest. `row_attention`'s own combine and the o launch's
  (`matvec.combined_matvec_partials`) both weigh the splits by it, so the two combine with the
  same float32 arithmetic."""
  top = functools.reduce(jnp.maximum, lses)
  ws = [jnp.exp2(x - top) for x in lses]
  return ws, functools.reduce(lambda a, b: a + b, ws)


def _rotate(lo, hi, cos, sin, dtype):
  """`model.rope` on the two halves of head_dim (float32 in, dtype values as float32 out)."""
  rnd = lambda x: x.astype(dtype).astype(jnp.float32)
  return rnd(lo * cos - hi * sin), rnd(hi * cos + lo * sin)


def _row_kernel(pos_ref, wm_ref, qp_ref, kp_ref, vp_ref, r_ref, *refs, has_bias, spec, group,
                rows, d, block_k, tiles_per_split, num_kv_tiles, splits, num_parts, scale,
                dtype, cache_dtype, combine, interpret):
  it = iter(refs)
  bq_ref, bk_ref, bv_ref = (next(it), next(it), next(it)) if has_bias else (None,) * 3
  cos_ref, sin_ref = next(it), next(it)
  for _ in range(3 if combine else 2):
    next(it)  # the aliased inputs (caches, counter): read and written through the outputs
  if combine:
    out_ref, po_ref, plse_ref, kc_ref, vc_ref, ctr_ref = it
  else:
    po_ref, plse_ref, kc_ref, vc_ref = it
  sp, g = pl.program_id(0), pl.program_id(1)
  d2 = d // 2
  p = pos_ref[0]
  slots = num_kv_tiles * block_k
  w = jnp.clip(p, 0, slots - 1)  # the cache write's slot (clamped, as dynamic_update_slice)
  tile_w = lax.div(w, block_k)
  # This program writes the new k, v and sees them from registers, not from the cache (no
  # other program reads slot w). It writes them after its walk over the cache, so that the
  # interpreter, which runs a program's steps in order, reads the old slot as a GPU may.
  own = (lax.div(tile_w, tiles_per_split) == sp) & (wm_ref[0] != 0)
  rsqrt = r_ref[0]
  cos = cos_ref[...][None, :]
  sin = sin_ref[...][None, :]

  fin = lambda ref, b_ref, first, n, half, count=None: _finish_rows(
      ref, b_ref, first, n, half, d2, num_parts, rsqrt, dtype, count)
  q_lo, q_hi = _rotate(fin(qp_ref, bq_ref, g * group, rows, 0, group),
                       fin(qp_ref, bq_ref, g * group, rows, 1, group), cos, sin, dtype)
  k_lo, k_hi = _rotate(fin(kp_ref, bk_ref, g, 1, 0), fin(kp_ref, bk_ref, g, 1, 1), cos, sin,
                       dtype)
  v_lo, v_hi = fin(vp_ref, bv_ref, g, 1, 0), fin(vp_ref, bv_ref, g, 1, 1)
  to_cache = lambda x: x.astype(cache_dtype).astype(dtype)  # as stored, then read back

  qc_lo, qc_hi = q_lo.astype(dtype), q_hi.astype(dtype)
  new_rows = ((kc_ref, k_lo, 0), (kc_ref, k_hi, 1), (vc_ref, v_lo, 0), (vc_ref, v_hi, 1))
  k_lo, k_hi = to_cache(k_lo).astype(jnp.float32), to_cache(k_hi).astype(jnp.float32)
  v_lo, v_hi = to_cache(v_lo), to_cache(v_hi)
  c = scale * _LOG2E
  s_w = (jnp.sum(q_lo * k_lo, axis=1) + jnp.sum(q_hi * k_hi, axis=1)) * c  # [rows]
  r = jnp.arange(rows, dtype=jnp.int32)
  last = jnp.where(r < group, _last_slot(spec, p), -1)
  n_full = jnp.minimum(lax.div(_last_slot(spec, p) + 1, block_k), num_kv_tiles)
  n_used = jnp.minimum(lax.div(_last_slot(spec, p) + block_k, block_k), num_kv_tiles)
  lo = sp * tiles_per_split
  hi = jnp.minimum(lo + tiles_per_split, n_used)

  def body(j, carry, masked):
    acc_lo, acc_hi, m, l = carry
    first = pl.multiple_of(j * block_k, block_k)
    ks = pl.ds(first, block_k)
    s = (_dot(qc_lo, kc_ref[ks, g, pl.ds(0, d2)].astype(dtype), trans_b=True)
         + _dot(qc_hi, kc_ref[ks, g, pl.ds(d2, d2)].astype(dtype), trans_b=True)) * c
    vl = vc_ref[ks, g, pl.ds(0, d2)].astype(dtype)
    vh = vc_ref[ks, g, pl.ds(d2, d2)].astype(dtype)
    if masked:
      slot = first + jnp.arange(block_k, dtype=jnp.int32)
      new = own & (slot == w)
      s = jnp.where(new[None, :], s_w[:, None], s)
      s = jnp.where(slot[None, :] <= last[:, None], s, _MASKED)
      vl = jnp.where(new[:, None], v_lo, vl)
      vh = jnp.where(new[:, None], v_hi, vh)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    pr = jnp.exp2(s - m_new[:, None])
    acc_lo = acc_lo * alpha[:, None] + _dot(pr.astype(dtype), vl)
    acc_hi = acc_hi * alpha[:, None] + _dot(pr.astype(dtype), vh)
    return acc_lo, acc_hi, m_new, l * alpha + pr.sum(axis=1)

  zeros = jnp.zeros((rows, d2), jnp.float32)
  carry = (zeros, zeros, jnp.full((rows,), -jnp.inf, jnp.float32),
           jnp.zeros((rows,), jnp.float32))
  # Tiles before the first partial one (or the one holding slot w here) need no mask.
  mid = jnp.clip(jnp.where(own, jnp.minimum(n_full, tile_w), n_full), lo, hi)
  carry = lax.fori_loop(lo, mid, functools.partial(body, masked=False), carry)
  acc_lo, acc_hi, m, l = lax.fori_loop(mid, hi, functools.partial(body, masked=True), carry)

  @pl.when(own)
  def _():
    for ref, x, half in new_rows:
      ref[w, g, pl.ds(half * d2, d2)] = x.reshape(d2).astype(cache_dtype)

  # A split that saw no tile (or a padding row) has l == 0: output 0, lse -inf, weight 0.
  inv = 1.0 / jnp.where(l == 0.0, 1.0, l)[:, None]
  o_lo, o_hi = acc_lo * inv, acc_hi * inv
  row_mask = jnp.broadcast_to((r < group)[:, None], (rows, d2))

  def store_out(lo_, hi_):
    for half, x in enumerate((lo_, hi_)):
      plgpu.store(out_ref.at[pl.ds(g * group, rows), pl.ds(half * d2, d2)],
                  x.astype(out_ref.dtype), mask=row_mask)

  if not combine:  # the splits' outputs [splits, H, D] and log-sum-exps [splits, H]
    for half, x in enumerate((o_lo, o_hi)):
      plgpu.store(po_ref.at[sp, pl.ds(g * group, rows), pl.ds(half * d2, d2)], x, mask=row_mask)
    plgpu.store(plse_ref.at[sp, pl.ds(g * group, rows)], m + jnp.log2(l), mask=r < group)
    return
  if splits == 1:
    store_out(o_lo, o_hi)
    return
  po_ref[sp, g, :, pl.ds(0, d2)] = o_lo
  po_ref[sp, g, :, pl.ds(d2, d2)] = o_hi
  plse_ref[sp, g, :] = m + jnp.log2(l)
  # The last of a KV head's splits to finish combines them. The barrier puts every thread's
  # stores before the counter's add (acquire-release, issued by one thread); the last program
  # reads the partials with volatile loads, which L1 (it may hold lines of an earlier launch)
  # does not serve.
  if not interpret:
    plgpu.debug_barrier()
  done = plgpu.atomic_add(ctr_ref, (g,), jnp.int32(1))

  @pl.when(done == splits - 1)
  def _():
    ctr_ref[pl.ds(g, 1)] = jnp.zeros((1,), jnp.int32)  # ready for the next launch
    rd = lambda ref: plgpu.load(ref, volatile=True)
    at = lambda ref, s, *idx: ref.at[(jnp.int32(s), g) + idx]
    ws, den = combine_weights([rd(at(plse_ref, s, slice(None))) for s in range(splits)])
    den = den[:, None]
    num_lo = functools.reduce(lambda a, b: a + b, [
        wt[:, None] * rd(at(po_ref, s, slice(None), pl.ds(0, d2))) for s, wt in enumerate(ws)])
    num_hi = functools.reduce(lambda a, b: a + b, [
        wt[:, None] * rd(at(po_ref, s, slice(None), pl.ds(d2, d2))) for s, wt in enumerate(ws)])
    store_out(num_lo / den, num_hi / den)


# `row_attention`'s cache split: runs of this many tiles, at most ROW_MAX_SPLITS of them. At
# the 1.5B's heads and a 640-slot cache (10 tiles of 64) 3-6 splits took 7.9-8.5 us a launch, 2
# splits 11.8 and 1 split 16.3; at 4096 slots 16 splits 11.2, 8 splits 13.2 and 32 splits 12.0
# (H200, BENCHMARKS.md session 21). Loading each tile a step ahead did not help.
ROW_TILES_PER_SPLIT = 2
# The combine reads every split's partial output: the last program (combine=True), or each of
# the o launch's programs for its run of the row (the model's path).
ROW_MAX_SPLITS = 16
# The longest cache `row_attention` was measured at, and where the model stops using it: past
# it each program's walk grows (the splits stop at ROW_MAX_SPLITS) while `decode_attention`
# splits the cache to fill the GPU.
ROW_MAX_SLOTS = 4096


def default_row_splits(num_kv_tiles: int) -> int:
  return max(1, min(ROW_MAX_SPLITS, -(-num_kv_tiles // ROW_TILES_PER_SPLIT)))


def row_supported(num_heads: int, num_kv_heads: int, head_dim: int, cache_len: int) -> str | None:
  """None when `row_attention` covers these shapes, else why not."""
  if head_dim < 32 or head_dim & (head_dim - 1):
    return f"head_dim {head_dim} is not a power of two >= 32 (its halves meet the tensor cores)"
  if num_heads % num_kv_heads:
    return f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads"
  if num_heads // num_kv_heads > 128:
    return f"a group of {num_heads // num_kv_heads} query heads is over 128 rows"
  if _pick_block_k(cache_len) is None:
    return f"cache length {cache_len} is not a multiple of 16"
  return None


def row_attention(q_parts_SHD, k_parts_SKD, v_parts_SKD, rsqrt, cos, sin, k_cache_SKD,
                  v_cache_SKD, counter_K, pos, spec: masks.MaskSpec, *, dtype, biases=None,
                  write_mask=None, block_k: int | None = None, splits: int | None = None,
                  combine: bool = True, num_warps: int = 4, num_stages: int = 3,
                  interpret: bool = False):
  """One query token's attention at batch 1, with the work around it in the same launch.

  Returns (out [H, D] in `dtype`, k cache, v cache, counter); with `combine=False`
  ((parts [splits, H, D], lse [splits, H]), k cache, v cache, None): the splits' normalised
  outputs and base-2 log-sum-exps (float32), uncombined, for the next launch to combine where
  it loads its row (`matvec.combined_matvec_partials`, the one-row step's o product). That takes
  the combine's serial chain (the stores, a barrier, the counter's atomic and the last
  program's reads) out of this launch, and `counter_K` must then be None. The inputs are what
  the one-row step's q/k/v launch (`matvec.norm_matvec_partials`) leaves: float32 partial sums
  q [S, H, D], k and v [S, K, D], 1/rms ([16], every entry the same), and `biases` (q [H, D],
  k and v [K, D], or None). This kernel finishes them as `matvec.finish_partials` does, applies RoPE
  (`cos`, `sin` [D / 2] float32 of the token's position `pos` (int [1]), `model.rope_tables`),
  writes k and v into the caches [S', K, D] at slot `pos` (>= 0; past the end clamped to the
  last slot, as `cache.write`; not where `write_mask` (bool [1]) is False), and attends the
  query over the cache under `spec` (causal or block_causal) as `decode_attention` does. Before
  this the step ran five small XLA kernels around `decode_attention` for that work, the splits'
  combine among them (BENCHMARKS.md, session 21).

  The cache is split over `splits` programs a KV head (`default_row_splits`). With
  `combine=True` (the default) the last of a head's programs to finish combines their
  normalised outputs (float32) by their log-sum-exp, counted by `counter_K` (int32 [K], zero on
  entry; each launch leaves it zero again, so one zeroed counter serves every layer of a step).
  The caches (and the counter) are updated in place (aliased); pass arrays the caller no longer
  needs.
  """
  if spec.kind not in ("causal", "block_causal"):
    raise ValueError(f"row_attention takes a causal or block_causal spec, got {spec}")
  if (counter_K is None) == combine:
    raise ValueError("row_attention: combine=True needs the counter (int32 [K], zeros); "
                     f"combine=False takes counter_K=None (got combine={combine}, counter_K "
                     f"{'None' if counter_K is None else jnp.shape(counter_K)})")
  ranks = {"q_parts": (q_parts_SHD, 3), "k_cache": (k_cache_SKD, 3)}
  bad = {k: jnp.shape(a) for k, (a, r) in ranks.items() if jnp.ndim(a) != r}
  if bad:
    raise ValueError(f"row_attention: q parts [S, H, D] and a k cache [slots, K, D] (one "
                     f"layer, batch 1) expected; got shapes {bad}")
  parts, h, d = q_parts_SHD.shape
  s_max, kv, _ = k_cache_SKD.shape
  why = row_supported(h, kv, d, s_max)
  if why is not None:
    raise ValueError(f"row_attention: {why}")
  expect = {"k_parts": ((parts, kv, d), k_parts_SKD), "v_parts": ((parts, kv, d), v_parts_SKD),
            "k_cache": ((s_max, kv, d), k_cache_SKD), "v_cache": ((s_max, kv, d), v_cache_SKD),
            "cos": ((d // 2,), cos), "sin": ((d // 2,), sin), "pos": ((1,), pos),
            "rsqrt": ((16,), rsqrt)}
  if combine:
    expect["counter"] = ((kv,), counter_K)
  if write_mask is not None:
    expect["write_mask"] = ((1,), write_mask)
  bad = {k: jnp.shape(a) for k, (shape, a) in expect.items() if jnp.shape(a) != shape}
  if bad:
    raise ValueError(f"row_attention: shapes {bad} do not match q parts {q_parts_SHD.shape} "
                     f"(expected {({k: expect[k][0] for k in bad})})")
  dtypes = {"pos": (pos, jnp.integer)}
  if combine:
    dtypes["counter"] = (counter_K, jnp.int32)
  if write_mask is not None:
    dtypes["write_mask"] = (write_mask, jnp.bool_)
  bad = {k: str(jnp.result_type(a)) for k, (a, want) in dtypes.items()
         if not jnp.issubdtype(jnp.result_type(a), want)}
  if bad:
    raise ValueError(f"row_attention: dtypes {bad}; pos is an integer, the counter int32 (it "
                     "is updated in place) and write_mask bool")
  if v_cache_SKD.dtype != k_cache_SKD.dtype:
    raise ValueError(f"row_attention: k cache {k_cache_SKD.dtype} and v cache "
                     f"{v_cache_SKD.dtype} differ")
  block_k = block_k or _pick_block_k(s_max)
  if block_k < 16 or block_k & (block_k - 1) or s_max % block_k:
    raise ValueError(f"row_attention: block_k={block_k} must be a power of two >= 16 that "
                     f"divides the cache length {s_max}")
  num_kv_tiles = s_max // block_k
  if splits is None:
    splits = default_row_splits(num_kv_tiles)
  elif isinstance(splits, bool) or not isinstance(splits, (int, np.integer)):
    raise ValueError(f"row_attention: splits={splits!r} is not an integer")
  splits = int(splits)
  if not 1 <= splits <= num_kv_tiles:
    raise ValueError(f"row_attention: splits={splits} must be 1 .. {num_kv_tiles} (the "
                     f"cache's tiles of {block_k})")
  tiles_per_split = -(-num_kv_tiles // splits)
  group = h // kv
  rows = max(16, pl.next_power_of_2(group))
  if biases is not None:
    shapes = [tuple(b.shape) for b in biases]
    if shapes != [(h, d), (kv, d), (kv, d)]:
      raise ValueError(f"row_attention: biases {shapes}, expected q {(h, d)}, k and v {(kv, d)}")
    biases = [b.astype(dtype) for b in biases]
  # A group's rows are a tile of `rows` query heads, masked past the group; the last group's
  # tile reaches past the heads. A GPU never touches masked rows, but the interpreter slices the
  # whole tile out of the array, so there the q rows and the output are padded to hold it.
  pad = (kv - 1) * group + rows - h if interpret else 0
  if pad:
    q_parts_SHD = jnp.pad(q_parts_SHD, [(0, 0), (0, pad), (0, 0)])
    if biases is not None:
      biases[0] = jnp.pad(biases[0], [(0, pad), (0, 0)])
  wm = jnp.ones((1,), jnp.int32) if write_mask is None else write_mask.astype(jnp.int32)
  args = [jnp.asarray(pos, jnp.int32), wm.reshape(1), q_parts_SHD.astype(jnp.float32),
          k_parts_SKD.astype(jnp.float32), v_parts_SKD.astype(jnp.float32),
          rsqrt.astype(jnp.float32)]
  args += list(biases or [])
  args += [cos.astype(jnp.float32), sin.astype(jnp.float32), k_cache_SKD, v_cache_SKD]
  caches = [jax.ShapeDtypeStruct(k_cache_SKD.shape, k_cache_SKD.dtype),
            jax.ShapeDtypeStruct(v_cache_SKD.shape, v_cache_SKD.dtype)]
  if combine:
    args.append(counter_K.astype(jnp.int32))
    outs = [jax.ShapeDtypeStruct((h + pad, d), dtype),
            jax.ShapeDtypeStruct((splits, kv, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((splits, kv, rows), jnp.float32),
            *caches, jax.ShapeDtypeStruct((kv,), jnp.int32)]
  else:
    outs = [jax.ShapeDtypeStruct((splits, h + pad, d), jnp.float32),
            jax.ShapeDtypeStruct((splits, h + pad), jnp.float32), *caches]
  aliased = 3 if combine else 2  # the caches (and the counter): last of the inputs and outputs
  first_alias, first_out = len(args) - aliased, len(outs) - aliased
  whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
  kernel = functools.partial(
      _row_kernel, has_bias=biases is not None, spec=spec, group=group, rows=rows, d=d,
      block_k=block_k, tiles_per_split=tiles_per_split, num_kv_tiles=num_kv_tiles,
      splits=splits, num_parts=parts, scale=d ** -0.5, dtype=jnp.dtype(dtype),
      cache_dtype=k_cache_SKD.dtype, combine=combine, interpret=interpret)
  results = pl.pallas_call(
      kernel,
      grid=(splits, kv),
      in_specs=[whole(a.shape) for a in args],
      out_specs=[whole(o.shape) for o in outs],
      out_shape=outs,
      input_output_aliases={first_alias + i: first_out + i for i in range(aliased)},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="row_attention",
  )(*args)
  if not combine:
    parts, lse, k_cache, v_cache = results
    return (parts[:, :h], lse[:, :h]), k_cache, v_cache, None
  out, _, _, k_cache, v_cache, counter = results
  return out[:h], k_cache, v_cache, counter
