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


def layout_meta(spec: MaskSpec, segments: jax.Array) -> TokenMeta:
  """TokenMeta [batch, num_streams * L] for rows whose per-position segments are `segments` [B, L]."""
  batch, length = segments.shape
  pos, streams = layout(spec, length)
  seg = jnp.tile(jnp.asarray(segments, jnp.int32), (1, spec.num_streams))
  return TokenMeta(
      positions=jnp.broadcast_to(jnp.asarray(pos), (batch, pos.size)),
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
