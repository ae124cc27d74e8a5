"""What jax's own Mosaic GPU (wgmma, TMA, warp-specialised) attention reaches on this GPU at our
head shapes: a reference for whether porting the block-sparse kernels to Mosaic GPU would clear
the 45%-of-matmul target that the Triton kernels miss.

    python benchmarks/attention_mgpu_probe.py [--lengths 2048,4096]

Runs `jax.experimental.pallas.ops.gpu.attention_mgpu` (not our code) on [B, T, H, D] float16
inputs (its shared-memory buffers are float16: it refuses bf16) with T = 2L (the 2L layout's row length, 8192 query positions per call as in attention.py):
causal and full forward, and full forward+backward (its backward has no causal mask). FLOPs:
4 * pairs * D per head forward (pairs halved for causal), 3.5x that forward+backward, over the
bf16 matmul rate measured in the same run. Checks each forward against a float32 reference first.
JSON to $OUT/attention_mgpu_probe.json.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.attention import SHAPES  # noqa: E402
from benchmarks.common import ceilings, error_text, run_meta, save_json, timeit  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--lengths", default="2048,4096", help="L; rows are T = 2L long")
  args = ap.parse_args()
  from jax.experimental.pallas.ops.gpu import attention_mgpu as mg

  res = {"meta": run_meta(), "ceil": ceilings(), "rows": []}
  mm = res["ceil"]["matmul_tflops"]
  print(res["meta"], res["ceil"], flush=True)
  for length in (int(x) for x in args.lengths.split(",")):
    t = 2 * length
    b = max(1, 8192 // t)
    for name, (h, kh, d) in SHAPES.items():
      sets = []
      for i in range(2):  # two input sets, so repeated calls do not time the L2
        ks = jax.random.split(jax.random.key(100 * length + 10 * h + i), 4)
        sets.append(tuple(jax.random.normal(kk, (b, t, n, d), jnp.float16)
                          for kk, n in zip(ks, (h, kh, kh, h))))
      q, k, v, ct = sets[0]
      for causal in (False, True):
        row = {"shape": name, "L": length, "T": t, "B": b, "causal": causal}
        pairs = b * h * t * t // (2 if causal else 1)
        fwd_flops = 4 * pairs * d
        best = None
        for block_kv in (128, 64):
          cfg = mg.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2,
                                causal=causal, block_q_dkv=64, block_kv_dkv=64, block_q_dq=64,
                                block_kv_dq=64)
          try:
            fwd = jax.jit(lambda q, k, v, ct, cfg=cfg: mg.attention(q, k, v, cfg))
            got = np.asarray(fwd(q, k, v, ct), np.float64)
            want = np.asarray(mg.attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)),
                                                     causal=causal), np.float64)
            err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            tf = timeit(fwd, sets, reps=5, inner=3)
          except Exception as e:  # shared memory or an unsupported case: record, go on
            row[f"bkv{block_kv}_error"] = error_text(e, 160)
            continue
          row[f"bkv{block_kv}_fwd_ms"] = tf * 1e3
          row[f"bkv{block_kv}_rel_err"] = err
          if best is None or tf < best[0]:
            best = (tf, block_kv, cfg)
        if best is not None:
          row["fwd_ms"], row["block_kv"] = best[0] * 1e3, best[1]
          row["fwd_frac"] = fwd_flops / best[0] / 1e12 / mm
          if not causal:
            g = jax.jit(jax.grad(lambda q, k, v, ct, cfg=best[2]: (
                mg.attention(q, k, v, cfg) * ct).astype(jnp.float32).sum(), (0, 1, 2)))
            try:
              tb = timeit(g, sets, reps=3, inner=3)
              row["fwdbwd_ms"] = tb * 1e3
              row["fwdbwd_frac"] = 3.5 * fwd_flops / tb / 1e12 / mm
            except Exception as e:
              row["bwd_error"] = error_text(e, 160)
        res["rows"].append(row)
        print(row, flush=True)
        save_json("attention_mgpu_probe.json", res)
  print("\n| shape | L | causal | fwd ms | fwd frac | fwd+bwd ms | fwd+bwd frac |")
  print("|---|---|---|---|---|---|---|")
  for r in res["rows"]:
    f = lambda key, p=3: f"{r[key]:.{p}f}" if key in r else "-"
    print(f"| {r['shape']} | {r['L']} | {r['causal']} | {f('fwd_ms')} | {f('fwd_frac', 2)} | "
          f"{f('fwdbwd_ms')} | {f('fwdbwd_frac', 2)} |")


if __name__ == "__main__":
  main()
