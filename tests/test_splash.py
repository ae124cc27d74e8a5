"""The TPU training attention (jax's splash attention under the layout's mask, `kernels.splash`)
in Pallas' interpret mode on CPU, against the XLA reference with the dense mask. Never run on a
TPU (see the module's docstring)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax import attention, kernels, masks
from dllm_jax.kernels import splash


def _segments(b, length, cuts):
  seg = np.zeros((b, length), np.int32)
  for row, row_cuts in enumerate(cuts):
    for c in row_cuts:
      seg[row, c:] += 1
  return jnp.asarray(seg)


def _inputs(b, t, h, kh, d, seed):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, ct = (jax.random.normal(kk, (b, t, h, d), jnp.float32) for kk in ks[::3])
  k, v = (jax.random.normal(kk, (b, t, kh, d), jnp.float32) for kk in ks[1:3])
  return q, k, v, ct


@pytest.mark.parametrize("spec,length,b,h,kh,d,cuts", [
    # 2L, packed rows (a sample boundary inside a 128-token tile), GQA 3, odd L (padded to 256)
    (masks.MaskSpec("diffusion", 32, 1), 100, 2, 6, 2, 64, [[32, 64], []]),
    # 3L, GQA 1 (MHA), ids from 1 (padding tokens then see no key: finite all the same)
    (masks.MaskSpec("diffusion", 16, 2), 72, 1, 2, 2, 32, [[0, 48]]),
    (masks.MaskSpec("block_causal", 16), 160, 1, 7, 1, 32, [[64]]),  # GQA 7
])
def test_splash_layout_attention_and_its_gradients_equal_the_reference(spec, length, b, h, kh,
                                                                        d, cuts):
  meta = masks.layout_meta(spec, _segments(b, length, cuts))
  q, k, v, ct = _inputs(b, meta.positions.shape[1], h, kh, d, length)
  ours = lambda q, k, v: splash.layout_attention(q, k, v, meta.segments, spec, interpret=True)
  ref = lambda q, k, v: attention.xla_attention(q, k, v, masks.dense_mask(spec, meta, meta))
  # Under jit, as a train step runs it (the tiles are classed on the host while tracing).
  out, grads = jax.jit(lambda q, k, v: (ours(q, k, v), jax.vjp(ours, q, k, v)[1](ct)))(q, k, v)
  want, vjp_ref = jax.vjp(ref, q, k, v)
  rel = lambda a, w: float(jnp.linalg.norm(a - w) / jnp.linalg.norm(w))
  assert rel(out, want) < 1e-4
  for name, g, w in zip("qkv", grads, vjp_ref(ct)):
    assert rel(g, w) < 1e-4, f"d{name}"


def test_attend_runs_splash_on_a_tpu(monkeypatch):
  # On a TPU the layout contract goes to splash (here in interpret mode); the cache contract,
  # whose kernel is Triton's, falls back to XLA there.
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  calls = []
  layout_attention = splash.layout_attention
  monkeypatch.setattr(splash, "layout_attention",
                      lambda *a, **kw: calls.append(kw) or layout_attention(*a, **kw))
  spec = masks.MaskSpec("diffusion", 32, 1)
  meta = masks.layout_meta(spec, jnp.zeros((1, 64), jnp.int32))
  q, k, v, _ = _inputs(1, 128, 2, 1, 32, 0)
  got = kernels.attend(q, k, v, spec, meta, meta, contract="layout", interpret=True)
  want = attention.xla_attention(q, k, v, masks.dense_mask(spec, meta, meta))
  assert calls == [{"interpret": True}]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert "decode kernel is Triton's" in kernels._why_not(q, k, masks.MaskSpec("block_causal", 32),
                                                        "cache", False)
  # A block size the kernel's shifts cannot take: XLA, and an error if called directly.
  odd = masks.MaskSpec("diffusion", 24, 1)
  assert "not a power of two" in kernels._why_not(q, k, odd, "layout", False)
  with pytest.raises(ValueError, match="block size 24 is not a power of two"):
    splash.layout_attention(q, k, v, jnp.zeros((1, 128), jnp.int32), odd, interpret=True)
