"""The KV cache as an explicit pytree of static shape.

Slot i of a row holds the key/value of the token at position i of that row, so a row's valid
keys are exactly the slots whose position the mask allows: no separate length is needed for
attention, and rows of a batch may sit at different positions. Writes go to contiguous slots
starting at each row's own offset.
"""

from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp
from flax import struct

from dllm_jax.config import ModelConfig


@struct.dataclass
class KVCache:
  """k and v: one array [layers, batch, max_len, kv_heads, head_dim] for stacked params, or a
  tuple of `layers` arrays [batch, max_len, kv_heads, head_dim] for per-layer params
  (`model.unstack_layers`), so that each layer's cache is its own buffer, updated in place."""
  k: Union[jax.Array, tuple[jax.Array, ...]]
  v: Union[jax.Array, tuple[jax.Array, ...]]

  @property
  def max_len(self) -> int:
    return self._one_layer_shape[1]

  @property
  def batch(self) -> int:
    return self._one_layer_shape[0]

  @property
  def per_layer(self) -> bool:
    return isinstance(self.k, tuple)

  @property
  def _one_layer_shape(self):
    return self.k[0].shape if self.per_layer else self.k.shape[1:]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None,
               per_layer: bool = False) -> KVCache:
  """An empty cache; `per_layer` for params in the per-layer layout (`model.unstack_layers`)."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  if per_layer:
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return KVCache(k=zeros(), v=zeros())
  shape = (cfg.num_layers, *shape)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def write(layer_kv: jax.Array, new_kv: jax.Array, start: jax.Array,
          mask: jax.Array | None = None) -> jax.Array:
  """Writes new_kv [B, T, K, D] into layer_kv [B, S, K, D] at slots start[b] .. start[b]+T-1.

  The caller keeps start + T <= S: `dynamic_update_slice` clamps an out-of-range start, which
  would overwrite valid slots. Where `mask` is False the slots keep what they hold: a mask [B]
  leaves whole rows unchanged (a batched decoder whose rows are in different phases forwards
  all rows but commits some), a mask [B, T] single tokens (its rows at a sub-block step write
  only their sub-block's slots of a forwarded block).
  """
  def one_row(row, new, s, keep_new):  # row [S, K, D] or, for a batch of one, [1, S, K, D]
    new = new.astype(row.dtype)
    zero = jnp.zeros((), s.dtype)  # (indices of one dtype: Python ints are int64 under x64)
    index = (zero,) * (row.ndim - 3) + (s, zero, zero)
    if keep_new is not None:
      keep_new = keep_new.reshape(keep_new.shape + (1, 1))  # [T, 1, 1] or [1, 1]
      new = jnp.where(keep_new, new, jax.lax.dynamic_slice(row, index, new.shape))
    return jax.lax.dynamic_update_slice(row, new, index)

  b, t = layer_kv.shape[0], new_kv.shape[1]
  rows = {"new_kv": new_kv.shape[:1], "start": jnp.shape(start),
          "mask": None if mask is None else jnp.shape(mask)[:1]}
  if any(v is not None and v != (b,) for v in rows.values()):
    raise ValueError(f"cache write: the cache has {b} rows; new_kv, start and mask need one "
                     f"each, got leading shapes {rows}")
  if mask is not None and jnp.shape(mask) not in ((b,), (b, t)):
    raise ValueError(f"cache write: the mask is per row [{b}] or per token [{b}, {t}], got "
                     f"shape {jnp.shape(mask)}")
  if mask is not None and jnp.result_type(mask) != jnp.bool_:
    # (jnp.where would take any nonzero entry as True: a mask of weights or indices would
    # write silently)
    raise ValueError(f"cache write: the mask must be bool (True: write the slot), got "
                     f"{jnp.result_type(mask)}; compare it first, e.g. mask > 0")
  start = jnp.asarray(start).astype(jnp.int32)
  if b == 1:
    # vmap would make this a scatter, which XLA's GPU pipeline turns back into an update of the
    # slice plus a select that keeps the old slots if the window were out of bounds: one more
    # kernel per K and per V write in a batch-1 decode step (BENCHMARKS.md, decode profile).
    # A plain dynamic_update_slice clamps instead, as each row of the vmapped path does.
    return one_row(layer_kv, new_kv, start[0], None if mask is None else mask[0])
  if mask is None:
    return jax.vmap(lambda r, n, s: one_row(r, n, s, None))(layer_kv, new_kv, start)
  return jax.vmap(one_row)(layer_kv, new_kv, start, mask)
