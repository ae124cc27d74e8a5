"""Whether the Triton gate/up launch (`kernels.matvec.norm_matvec`, silu_pair) is held back by
programs unevenly spread over the SMs, or by how it streams: its GPU time on gate and up weights
[1536, N] whose column tiles fill exactly one wave (N = 8448: 264 programs of 32 columns, two an
SM, or 132 of 64; N = 4224: 132 of 32, one an SM) against the 1.5B's N = 8960 (280 programs: a
second wave of 16), other tile shapes (`CASES`), and XLA's GEMM of the same products (which
streams through TMA) beside them.

    python benchmarks/matvec_balance.py

Each case runs over 16 distinct weight sets, independent products in one jit (no L2 hits), four
times under the profiler; figures are GPU us a launch (the product's kernels: `norm_matvec`, or
XLA's `gemm_fusion*`; `total_us` adds every kernel) and the weights' read rate as a fraction of
the copy bandwidth (bytes read + written) measured in the same run. JSON to $OUT/matvec_balance.json.
Session 20 (BENCHMARKS.md): one wave or not, the kernel reads at ~0.87 of the copy rate; XLA's
GEMM at ~1.19.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import (ceilings, error_text, kernel_us, product_us, run_meta,  # noqa: E402
                               save_json)
from dllm_jax import model  # noqa: E402
from dllm_jax.kernels import matvec  # noqa: E402

E, SETS, ROUNDS = 1536, 16, 4
# (columns of each weight, block_n, block_k, num_stages); block_n None: XLA's GEMM.
CASES = [(8960, 32, 256, 3), (8448, 32, 256, 3), (8448, 64, 256, 2), (8960, 64, 256, 2),
         (4224, 32, 256, 3), (4224, 32, 512, 3), (8448, 64, 128, 4), (8448, 64, 128, 3),
         (8448, 32, 512, 3), (8448, 128, 128, 2), (8960, None, 0, 0), (8448, None, 0, 0)]


def main():
  ceil = ceilings(rounds=2)
  res = {"meta": run_meta(), "ceil": ceil, "rows": []}
  print(ceil, flush=True)
  x = jax.random.normal(jax.random.key(0), (E,), jnp.bfloat16)
  add = jax.random.normal(jax.random.key(1), (5, E), jnp.float32)  # o's partial sums
  scale = jnp.ones((E,), jnp.bfloat16)
  for n, bn, bk, stages in CASES:
    ws = [[(E ** -0.5 * jax.random.normal(jax.random.key(10 * i + j), (E, n))).astype(jnp.bfloat16)
           for j in range(2)] for i in range(SETS)]
    if bn is None:  # XLA: the residual add, two one-row GEMMs (XLA merges them), SiLU product
      def run(x, ws):
        h = x + add.sum(0).astype(x.dtype)
        return [jax.nn.silu(model._matmul(h[None], g)[0]) * model._matmul(h[None], u)[0]
                for g, u in ws]
    else:
      def run(x, ws, bn=bn, bk=bk, stages=stages):
        return [matvec.norm_matvec(x, (g, u), add_E=add, norm_scale_E=scale, silu_pair=True,
                                   block_n=bn, block_k=bk, num_stages=stages)[0][0]
                for g, u in ws]
    f = jax.jit(run)
    row = {"N": n, "block_n": bn or "xla", "block_k": bk, "stages": stages,
           "programs": n // bn if bn else None}
    try:
      jax.block_until_ready(f(x, ws))
      per = kernel_us(lambda: [jax.block_until_ready(f(x, ws)) for _ in range(ROUNDS)],
                      ROUNDS * SETS)
      row["kernels_us"] = per
      row["us"] = product_us(per, "gemm", "norm_matvec")
      row["total_us"] = sum(per.values())
      row["of_copy"] = 2 * 2 * E * n / (row["us"] * 1e-6) / (ceil["copy_GBps"] * 1e9)
    except Exception as e:  # a setting that does not compile or fit is recorded
      row["error"] = error_text(e)
    print(row, flush=True)
    res["rows"].append(row)
    save_json("matvec_balance.json", res)


if __name__ == "__main__":
  main()
