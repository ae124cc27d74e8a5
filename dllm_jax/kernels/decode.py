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
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
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
