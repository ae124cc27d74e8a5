"""The training attention on a TPU: jax's splash attention (Mosaic TPU) under the layout's mask.

Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) is the TPU form of what
`flash` does on a GPU: the host classes every [block_q, block_kv] tile of the mask as empty,
partial or full; empty tiles are neither copied nor computed, full ones skip the mask, and a
partial tile's mask is evaluated in the kernel from a function of the query and key indices (a
`_ComputableMask`), so no [T, T] mask exists anywhere. Here that function is the layout's own
(`flash._layout_allowed`), and packed samples' segment ids go in as splash's `SegmentIds`.
Grouped-query attention runs splash's MQA kernel once per KV head over its group of query
heads, so K and V are never repeated. Forward and backward (splash's custom_vjp dq and dk/dv
kernels).

**Not run on a TPU** (none at hand): tested on CPU in Pallas' interpret mode against the XLA
reference (tests/test_splash.py). Its tiles are splash's defaults (128), not tuned on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from dllm_jax import masks
from dllm_jax.kernels import flash

TILE = 128  # splash's default tiles (BlockSizes.get_default); the sequence is padded to them


class LayoutMask(mask_lib._ComputableMask):
  """The layout mask of `spec` at `length` tokens a stream over `padded` indices (keys past the
  layout's num_streams * length are never seen), as a function of index arrays: evaluated in numpy
  on the host to class the tiles (at trace time, inside jit too), and in the kernel on a partial
  tile's indices (`flash._layout_allowed`, by comparisons and shifts: the block size must be a
  power of two, `supported`)."""

  def __init__(self, spec: masks.MaskSpec, length: int, padded: int):
    self.spec, self.length = spec, length
    pos, stream = masks.layout(spec, length)
    total = pos.size

    def allowed(q_ids, kv_ids):
      if isinstance(q_ids, np.ndarray):  # the host's tile classes
        # A padding query stands in as the layout's last one (it sees every clean key, as in the
        # kernel); its row is dropped, and with a zero cotangent it adds nothing to dK or dV.
        q, k = np.minimum(q_ids, total - 1), np.minimum(kv_ids, total - 1)
        ok = masks.allowed(spec, pos[q], stream[q], 0, pos[k], stream[k], 0)
        return ok & (kv_ids < total)
      return flash._layout_allowed(spec, length, q_ids, kv_ids, vector_div=False)

    super().__init__(shape=(padded, padded), mask_function=allowed)

  def __eq__(self, other):
    return (isinstance(other, LayoutMask)
            and (self.spec, self.length, self.shape) == (other.spec, other.length, other.shape))

  def __hash__(self):
    return hash((LayoutMask, self.spec, self.length, self.shape))


def supported(spec: masks.MaskSpec) -> str | None:
  """Why splash cannot run this layout (None if it can): the in-kernel mask finds a position's
  block by a shift, since integer division of vectors has not been seen to lower on Mosaic TPU."""
  b = spec.block_size
  if b & (b - 1):
    return f"block size {b} is not a power of two (the TPU kernel's mask shifts)"
  return None


@functools.lru_cache(maxsize=None)
def _kernel(spec: masks.MaskSpec, length: int, padded: int, group: int, interpret: bool):
  """Splash's MQA kernel for one KV head's `group` query heads (its tile classes are computed on
  the host once per layout and length)."""
  mask = mask_lib.MultiHeadMask([LayoutMask(spec, length, padded)] * group)
  return sk.make_splash_mqa_single_device(mask, block_sizes=sk.BlockSizes.get_default(),
                                          interpret=interpret)


def layout_attention(q_BTHD, k_BTKD, v_BTKD, segments_BT, spec: masks.MaskSpec,
                     interpret: bool = False):
  """`flash.block_sparse_attention`'s contract on a TPU: attention over the rows of
  `masks.layout_meta(spec, segments)`, T = num_streams * L; q [B, T, H, D], k/v [B, T, K, D]
  with H % K == 0, segments_BT int32 [B, T]. Differentiable in q, k, v."""
  b, t, h, d = q_BTHD.shape
  kv_heads = k_BTKD.shape[2]
  if t % spec.num_streams or h % kv_heads:
    raise ValueError(f"splash layout attention needs T % num_streams == 0 and H % K == 0, got "
                     f"T={t}, spec={spec}, H={h}, K={kv_heads}")
  why = supported(spec)
  if why is not None:
    raise ValueError(f"splash layout attention cannot run spec={spec}: {why}")
  length, group = t // spec.num_streams, h // kv_heads
  padded = -(-t // TILE) * TILE
  # Padding tokens join segment 0, as in `flash`: the layout mask hides them as keys. As queries
  # (rows dropped below) they may see no key where no sample has id 0; splash's mask value is
  # finite, so such a row stays finite, and its zero cotangent adds nothing to the gradients.
  pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2))
  seg = pad(jnp.asarray(segments_BT, jnp.int32))
  # Splash takes queries pre-scaled (no scale argument: one more rounding of q in its dtype than
  # the GPU kernels, which scale the float32 scores), heads leading: q [B, K, G, Tp, D], k/v
  # [B, K, Tp, D].
  q = (pad(q_BTHD).astype(jnp.float32) * d ** -0.5).astype(q_BTHD.dtype)
  q = q.reshape(b, padded, kv_heads, group, d).transpose(0, 2, 3, 1, 4)
  k, v = (pad(x).transpose(0, 2, 1, 3) for x in (k_BTKD, v_BTKD))
  kernel = _kernel(spec, length, padded, group, interpret)

  def one_head(q, k, v, seg):  # q [G, Tp, D], k/v [Tp, D], seg [Tp]
    return kernel(q, k, v, sk.SegmentIds(q=seg, kv=seg))

  per_row = jax.vmap(one_head, in_axes=(0, 0, 0, None))  # over the KV heads
  out = jax.vmap(per_row)(q, k, v, seg)  # [B, K, G, Tp, D]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, padded, h, d)[:, :t].astype(q_BTHD.dtype)
