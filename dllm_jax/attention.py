"""Multi-head attention over a structured mask: the XLA reference and the kernel dispatch.

Grouped-query attention is computed with queries reshaped to [batch, seq, kv_heads, group, dim]
so repeated K/V are never materialised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dllm_jax import masks

_NEG_INF = -1e30  # finite, so a fully masked row gives a uniform softmax rather than NaN


def resolve_impl(impl: str) -> str:
  if impl != "auto":
    return impl
  return "xla" if jax.default_backend() == "cpu" else "pallas"


def xla_attention(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    mask_BTS: jax.Array,
) -> jax.Array:
  """Dense masked attention; scores and softmax in float32. Returns [B, T, H, D] in q's dtype."""
  b, t, h, d = q_BTHD.shape
  kv_heads = k_BSKD.shape[2]
  q = q_BTHD.reshape(b, t, kv_heads, h // kv_heads, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k_BSKD, preferred_element_type=jnp.float32)
  scores = scores * (d ** -0.5)
  scores = jnp.where(mask_BTS[:, None, None, :, :], scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_BSKD.dtype), v_BSKD,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, d).astype(q_BTHD.dtype)


def attend(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    spec: masks.MaskSpec,
    q_meta: masks.TokenMeta,
    k_meta: masks.TokenMeta,
    impl: str = "auto",
    contract: str | None = None,
) -> jax.Array:
  """Attention of q over (k, v) under `spec` applied to the tokens' metadata.

  `contract` (static) tells a kernel which structure the metadata has, so it never guesses from
  shapes: "layout" (q_meta == k_meta == `masks.layout_meta(spec, segments)`, segments starting on
  block boundaries) or "cache" (each row's queries at consecutive positions from
  `q_meta.positions[:, 0]`, keys = cache slots 0..S-1 with slot == position, one segment); None
  runs the XLA reference. See `dllm_jax.kernels`.
  """
  impl = resolve_impl(impl)
  if impl == "xla":
    return xla_attention(q_BTHD, k_BSKD, v_BSKD, masks.dense_mask(spec, q_meta, k_meta))
  if impl == "pallas":
    from dllm_jax import kernels  # imported lazily: the CPU path never needs Pallas

    return kernels.attend(q_BTHD, k_BSKD, v_BSKD, spec, q_meta, k_meta, contract)
  raise ValueError(f"attention impl {impl!r}: expected 'auto', 'xla' or 'pallas'")
