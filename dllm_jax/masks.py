"""Attention masks as structured descriptions, lowered to a dense reference mask.

Every token carries three integers: its RoPE position, its stream (0 = clean, s > 0 = noisy copy s)
and its segment (the packed sample it belongs to). A static `MaskSpec` says which (query, key)
pairs of that metadata may attend. The same description serves:

* AR training and decoding (`causal`),
* block-causal prefill / block decoding against a cache (`block_causal`: a block sees itself
  bidirectionally and every earlier block),
* the Fast-dLLM v2 training layout (`diffusion`): rows `[noisy_1 ; ... ; noisy_n ; clean]`, each
  part covering positions 0..L-1. A noisy token sees its own noisy block (both directions) in its
  own stream and the clean blocks strictly before it; a clean token sees clean blocks up to its own.
  `num_noisy=1` is the authors' 2L layout, `num_noisy=2` our 3L layout that shares one clean copy
  between the two complementary noisy copies.

Tokens never attend across segments. Kernels derive their tile maps from the same description.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

KINDS = ("causal", "block_causal", "diffusion")


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  kind: str
  block_size: int = 32
  num_noisy: int = 1  # diffusion only: how many noisy copies precede the clean one

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"MaskSpec.kind={self.kind!r}: expected one of {KINDS}")
    if self.block_size < 1:
      raise ValueError(f"MaskSpec.block_size={self.block_size}: must be positive")
    if self.kind == "diffusion" and self.num_noisy < 1:
      raise ValueError(f"MaskSpec.num_noisy={self.num_noisy}: a diffusion layout needs >= 1")

  @property
  def num_streams(self) -> int:
    return self.num_noisy + 1 if self.kind == "diffusion" else 1


@struct.dataclass
class TokenMeta:
  """Per-token attention metadata; every field is int32 [batch, seq]."""

  positions: jax.Array
  streams: jax.Array
  segments: jax.Array

  @classmethod
  def simple(cls, positions: jax.Array, segments: jax.Array | None = None) -> "TokenMeta":
    """Clean tokens of one sample (or of `segments`), at the given positions."""
    positions = jnp.asarray(positions, jnp.int32)
    zeros = jnp.zeros_like(positions)
    return cls(positions, zeros, zeros if segments is None else jnp.asarray(segments, jnp.int32))


def layout(spec: MaskSpec, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Positions and streams, each [spec.num_streams * length], of one row of the layout."""
  pos = np.arange(length, dtype=np.int32)
  if spec.kind != "diffusion":
    return pos, np.zeros(length, np.int32)
  streams = [np.full(length, s, np.int32) for s in range(1, spec.num_noisy + 1)]
  streams.append(np.zeros(length, np.int32))
  return np.tile(pos, spec.num_streams), np.concatenate(streams)


def packed_positions(segments_BL: jax.Array) -> jax.Array:
  """int32 [B, L]: each token's offset from the first token of its run of equal segment ids.

  Packed samples then see RoPE positions 0, 1, ... exactly as they do alone at inference. Samples
  start on block boundaries, so `position // block_size` still names the same blocks.
  """
  seg = jnp.asarray(segments_BL, jnp.int32)
  idx = jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape)
  starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def layout_meta(spec: MaskSpec, segments: jax.Array, positions: jax.Array | None = None
                ) -> TokenMeta:
  """TokenMeta [batch, num_streams * L] for rows whose per-position segments are `segments` [B, L].

  `positions` [B, L] (e.g. `packed_positions(segments)`) replaces the default 0..L-1 of each part.
  """
  batch, length = segments.shape
  pos, streams = layout(spec, length)
  seg = jnp.tile(jnp.asarray(segments, jnp.int32), (1, spec.num_streams))
  if positions is not None:
    pos = jnp.tile(jnp.asarray(positions, jnp.int32), (1, spec.num_streams))
  return TokenMeta(
      positions=jnp.broadcast_to(jnp.asarray(pos), (batch, pos.shape[-1])),
      streams=jnp.broadcast_to(jnp.asarray(streams), (batch, streams.size)),
      segments=seg,
  )


def allowed(spec: MaskSpec, q_pos, q_stream, q_seg, k_pos, k_stream, k_seg):
  """Whether a query may attend a key, elementwise over broadcastable int arrays (numpy or jax)."""
  same_seg = q_seg == k_seg
  if spec.kind == "causal":
    return same_seg & (k_pos <= q_pos)
  qb = q_pos // spec.block_size
  kb = k_pos // spec.block_size
  clean_rule = (q_stream == 0) & (k_stream == 0) & (kb <= qb)
  if spec.kind == "block_causal":
    return same_seg & clean_rule
  noisy_q = q_stream > 0
  own_block = noisy_q & (k_stream == q_stream) & (kb == qb)
  earlier_clean = noisy_q & (k_stream == 0) & (kb < qb)
  return same_seg & (clean_rule | own_block | earlier_clean)


def dense_mask(spec: MaskSpec, q: TokenMeta, k: TokenMeta) -> jax.Array:
  """Boolean [batch, q_len, k_len]; the reference every kernel is tested against."""
  return allowed(
      spec,
      q.positions[:, :, None], q.streams[:, :, None], q.segments[:, :, None],
      k.positions[:, None, :], k.streams[:, None, :], k.segments[:, None, :],
  )


# --------------------------------------------------------------------------------------------
# Tile maps for block-sparse kernels, derived from the static layout alone.

TILE_EMPTY, TILE_PARTIAL, TILE_FULL = 0, 1, 2


def _stream_runs(spec: MaskSpec, length: int, tile: int, num_tiles: int):
  """Per layout part p and tile i, the position interval [lo, hi] of part p inside tile i.

  Returns (lo, hi, stream) with lo/hi int64 [num_parts, num_tiles] (hi < lo when the tile holds no
  token of that part) and stream [num_parts]: the layout is parts of `length` consecutive indices,
  so a tile meets each part in at most one contiguous run of positions.
  """
  parts = spec.num_streams
  total = parts * length
  start = np.arange(num_tiles, dtype=np.int64) * tile
  end = np.minimum(start + tile, total)  # exclusive
  part_start = np.arange(parts, dtype=np.int64)[:, None] * length
  lo = np.maximum(start[None, :], part_start) - part_start
  hi = np.minimum(end[None, :], part_start + length) - 1 - part_start
  if spec.kind == "diffusion":
    stream = np.array(list(range(1, spec.num_noisy + 1)) + [0], np.int64)
  else:
    stream = np.zeros(1, np.int64)
  return lo, hi, stream


def tile_map(spec: MaskSpec, length: int, block_q: int, block_k: int) -> np.ndarray:
  """Class of every (query tile, key tile) of the layout `layout(spec, length)`, ignoring segments.

  Returns int8 [ceil(T / block_q), ceil(T / block_k)] with T = spec.num_streams * length, each
  TILE_EMPTY (no allowed pair: skip), TILE_FULL (every pair of a real query with the tile's keys
  allowed, no padding key: no mask needed) or TILE_PARTIAL. Computed from per-tile position
  intervals on the host in O(tiles^2): the rules are monotone in block index, so an interval pair
  is empty/full exactly when its extreme corners are.
  """
  total = spec.num_streams * length
  nq, nk = -(-total // block_q), -(-total // block_k)
  qlo, qhi, qstream = _stream_runs(spec, length, block_q, nq)
  klo, khi, kstream = _stream_runs(spec, length, block_k, nk)
  any_allowed = np.zeros((nq, nk), bool)
  all_allowed = np.ones((nq, nk), bool)
  bs = spec.block_size
  for a in range(qstream.size):
    for c in range(kstream.size):
      ql, qh = qlo[a][:, None], qhi[a][:, None]
      kl, kh = klo[c][None, :], khi[c][None, :]
      present = (qh >= ql) & (kh >= kl)
      sq, sk = qstream[a], kstream[c]
      if spec.kind == "causal":
        some, every = kl <= qh, kh <= ql
      else:
        qbl, qbh, kbl, kbh = ql // bs, qh // bs, kl // bs, kh // bs
        if sq == 0 and sk == 0:  # clean -> clean: kb <= qb
          some, every = kbl <= qbh, kbh <= qbl
        elif sq > 0 and sk == sq:  # noisy -> own noisy block: kb == qb
          some = np.maximum(qbl, kbl) <= np.minimum(qbh, kbh)
          every = (qbl == qbh) & (kbl == kbh) & (qbl == kbl)
        elif sq > 0 and sk == 0:  # noisy -> earlier clean blocks: kb < qb
          some, every = kbl < qbh, kbh < qbl
        else:
          some, every = np.zeros((1, 1), bool), np.zeros((1, 1), bool)
      any_allowed |= present & some
      all_allowed &= ~present | every
  key_padding = (np.arange(nk) + 1) * block_k > total
  out = np.where(any_allowed, TILE_PARTIAL, TILE_EMPTY)
  out = np.where(any_allowed & all_allowed & ~key_padding[None, :], TILE_FULL, out)
  return out.astype(np.int8)
