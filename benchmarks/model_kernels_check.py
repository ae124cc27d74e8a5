"""The model's training path with the default Pallas kernels against attention_impl="xla".

    python benchmarks/model_kernels_check.py

A 2-layer model (D=64, 6/2 heads, bf16 compute, full remat) on two packed 2L diffusion rows:
loss and every parameter gradient with `attention_impl="pallas"` vs `"xla"`, and whether the
Mosaic GPU forward ran (it does on an sm_90 GPU; elsewhere the Triton kernels, interpreted on a
CPU). The differences are bf16 rounding: both paths round activations to bf16 between layers.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dllm_jax import masks, model  # noqa: E402
from dllm_jax.config import ModelConfig  # noqa: E402
from dllm_jax.kernels import flash_mgpu  # noqa: E402


def main():
  print(jax.__version__, jax.devices()[0].device_kind, "sm_90:", flash_mgpu.on_hopper(),
        flush=True)
  traced = []
  forward = flash_mgpu.forward
  flash_mgpu.forward = lambda *a, **k: (traced.append(1), forward(*a, **k))[1]
  cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                    num_heads=6, num_kv_heads=2, head_dim=64, qkv_bias=True, dtype="bfloat16",
                    remat="full", attention_impl="xla")
  params = model.init_params(cfg, jax.random.key(0))
  spec = masks.MaskSpec("diffusion", 32, 1)
  length = 320
  seg = np.zeros((2, length), np.int32)
  seg[0, 96:] = 1
  seg[1, 160:] = 1
  seg[1, 256:] = 2
  meta = masks.layout_meta(spec, jnp.asarray(seg))
  tokens = jax.random.randint(jax.random.key(1), (2, 2 * length), 0, cfg.vocab_size)
  ct = jax.random.normal(jax.random.key(2), (2, 2 * length, cfg.vocab_size), jnp.float32)

  def loss(p, c):
    logits, _ = model.forward(p, c, tokens, meta, spec)
    return (logits.astype(jnp.float32) * ct).mean()

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  want, want_g = value_and_grad(params, cfg)
  got, got_g = value_and_grad(params, dataclasses.replace(cfg, attention_impl="pallas"))
  rel = [float(jnp.linalg.norm((a - b).astype(jnp.float32))
               / (jnp.linalg.norm(b.astype(jnp.float32)) + 1e-30))
         for a, b in zip(jax.tree_util.tree_leaves(got_g), jax.tree_util.tree_leaves(want_g))]
  print(f"Mosaic GPU forward traced {len(traced)} times; loss xla {float(want):.6g}, pallas "
        f"{float(got):.6g}; parameter gradients, relative L2: max {max(rel):.3g}, median "
        f"{float(np.median(rel)):.3g}", flush=True)


if __name__ == "__main__":
  main()
