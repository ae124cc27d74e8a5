"""The model's one-row decode step with `model.matvec_impl="pallas"` against `"xla"`, on the device.

    python benchmarks/matvec_model_check.py [--shapes qwen2.5-1.5b,smollm2-135m]

Random bf16 weights of a benchmark shape (per-layer layout, norm scales and biases perturbed away
from 1 and 0 so a dropped one shows), a 512-token prompt prefilled by the XLA path, then one step
of the next token by each path against that cache (attention by the decode kernel by default, as
on a GPU the model runs it): the logits' largest difference relative to
their largest value, their correlation, whether the argmax agrees, and the same for the updated
cache. The CPU tests compare the interpreted kernels on small shapes; this compares the compiled
ones at the real shapes. JSON to $OUT/matvec_model_check.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import (add_row_tma_argument, apply_row_tma, random_params,  # noqa: E402
                               run_meta, save_json)
from benchmarks.decode import SHAPES  # noqa: E402
from dllm_jax import cache as kvcache  # noqa: E402
from dllm_jax import masks, model  # noqa: E402
from dllm_jax.config import KERNEL_LAYOUTS  # noqa: E402

PROMPT = 512


def _perturb(path, x):
  name = jax.tree_util.keystr(path)
  if "scale" in name:
    return x * (1 + 0.5 * jnp.sin(jnp.arange(x.shape[-1]) + 1.0)).astype(x.dtype)
  if "bias" in name:
    return (0.5 * jnp.cos(jnp.arange(x.size) * 0.37)).reshape(x.shape).astype(x.dtype)
  return x


def check(name, attention_impl="pallas", kernel_layout="out_in"):
  cfg = dataclasses.replace(SHAPES[name], matvec_impl="xla", attention_impl=attention_impl,
                            kernel_layout=kernel_layout)
  params = jax.jit(lambda r: model.with_layout(
      jax.tree_util.tree_map_with_path(_perturb, random_params(cfg, r)), "per_layer"))(
          jax.random.key(0))
  spec = masks.MaskSpec("causal")
  tokens = jax.random.randint(jax.random.key(1), (1, PROMPT + 1), 0, cfg.vocab_size)
  pos = lambda s, n: masks.TokenMeta.simple(jnp.arange(s, s + n, dtype=jnp.int32)[None])
  fwd = jax.jit(model.forward, static_argnums=(1, 4))
  cache = kvcache.init_cache(cfg, 1, PROMPT + 64, per_layer=True)
  _, cache = fwd(params, cfg, tokens[:, :PROMPT], pos(0, PROMPT), spec, cache)
  out = {}
  for impl in ("xla", "pallas"):
    c = dataclasses.replace(cfg, matvec_impl=impl)
    logits, new = fwd(params, c, tokens[:, PROMPT:], pos(PROMPT, 1), spec, cache)
    out[impl] = (np.asarray(logits, np.float32).ravel(),
                 [np.asarray(a[:, PROMPT], np.float32) for a in new.k + new.v])
  (got, got_kv), (want, want_kv) = out["pallas"], out["xla"]
  rel = lambda g, w: float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30))
  res = {"shape": name, "logits_max_rel_err": rel(got, want),
         "logits_corr": float(np.corrcoef(got, want)[0, 1]),
         "argmax_agrees": bool(got.argmax() == want.argmax()),
         "cache_row_max_rel_err": max(rel(g, w) for g, w in zip(got_kv, want_kv))}
  # bf16 steps that differ only in the order of float32 sums (the CPU test's bound, 28+ layers).
  res["ok"] = (res["logits_corr"] > 0.999 and res["argmax_agrees"]
               and res["cache_row_max_rel_err"] < 5e-2)
  return res


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shapes", default="qwen2.5-1.5b,smollm2-135m")
  ap.add_argument("--attention", default="pallas", choices=["pallas", "xla"],
                  help="attention_impl of both paths")
  ap.add_argument("--kernel-layout", default="out_in", choices=KERNEL_LAYOUTS,
                  help="model.kernel_layout of both paths (default: the one-row step's, "
                       "model.decode_kernel_layout)")
  add_row_tma_argument(ap, "the kernels' path: ")
  args = ap.parse_args()
  apply_row_tma(args.row_tma)
  res = {"meta": run_meta(), "rows": []}
  for name in args.shapes.split(","):
    row = {**check(name, args.attention, args.kernel_layout), "attention": args.attention,
           "kernel_layout": args.kernel_layout, "row_tma": dict(model.ROW_TMA)}
    print(row, flush=True)
    res["rows"].append(row)
    save_json("matvec_model_check.json", res)


if __name__ == "__main__":
  main()
