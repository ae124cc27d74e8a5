"""Whether the one-row kernels read their weights slowly because of the layout: a column tile
[K, bn] of a row-major [K, N] weight is K rows of bn * 2 bytes, N * 2 bytes apart (35 KB for this
script's default, the 1.5B's gate and up as one [1536, 17920] weight; 17.9 KB in the model's
gate/up launch, which reads two [1536, 8960] weights), where XLA's GEMM reads 128-column tiles
through TMA. The same Pallas Triton product (the row as 16 equal rows through the tensor cores,
as `kernels.matvec`) on the weight as it is and on the weight pre-tiled to [N / bn, K, bn]
(each program's tile one contiguous run), GPU time from a profile, 16 distinct weight sets,
independent products in one jit (no L2 hits).

    python benchmarks/matvec_layout.py [--n 17920] [--k 1536]

Figures: GPU us a launch and the read rate as a fraction of the copy rate (bytes read +
written) measured in the same run; XLA's one-row GEMM beside them. JSON to
$OUT/matvec_layout.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

from benchmarks.common import (ceilings, error_text, kernel_us, product_us, run_meta,  # noqa: E402
                               save_json)
from dllm_jax import model  # noqa: E402

SETS, ROUNDS, ROWS = 16, 4, 16
# (block_n, block_k, num_stages, num_warps)
SETTINGS = [(32, 256, 3, 4), (32, 512, 3, 4), (64, 256, 3, 4), (64, 128, 4, 4),
            (128, 128, 3, 4), (128, 64, 4, 4), (64, 512, 2, 4)]


def _kernel(x_ref, w_ref, o_ref, *, bk, nk, bn):
  # x_ref [K]; w_ref [K, bn]: this program's column tile, whichever layout it came from.
  def body(c, acc):
    a = jnp.broadcast_to(x_ref[pl.ds(c * bk, bk)][None, :], (ROWS, bk))
    return acc + lax.dot_general(a, w_ref[pl.ds(c * bk, bk), :], (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, nk, body, jnp.zeros((ROWS, bn), jnp.float32))
  first = lax.broadcasted_iota(jnp.int32, (ROWS, bn), 0) == 0
  o_ref[...] = jnp.sum(jnp.where(first, acc, 0.0), axis=0).astype(o_ref.dtype)


def matvec(x, w, *, tiled, bn, bk, stages, warps, interpret=False):
  """x [K] @ w, w [K, N] or, `tiled`, [N / bn, K, bn]; bf16 [N]."""
  k = x.shape[0]
  tiles = w.shape[0] if tiled else w.shape[1] // bn
  spec = (pl.BlockSpec((None, k, bn), lambda j: (j, 0, 0)) if tiled
          else pl.BlockSpec((k, bn), lambda j: (0, j)))
  return pl.pallas_call(
      functools.partial(_kernel, bk=bk, nk=k // bk, bn=bn),
      grid=(tiles,),
      in_specs=[pl.BlockSpec((k,), lambda j: (0,)), spec],
      out_specs=pl.BlockSpec((bn,), lambda j: (j,)),
      out_shape=jax.ShapeDtypeStruct((tiles * bn,), x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
      interpret=interpret, name="layout_matvec")(x, w)


def tile(w, bn):
  """[K, N] -> [N / bn, K, bn]."""
  k, n = w.shape
  return w.reshape(k, n // bn, bn).transpose(1, 0, 2)


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--n", type=int, default=17920, help="weight columns (1.5B gate + up)")
  ap.add_argument("--k", type=int, default=1536, help="weight rows (the row's length)")
  args = ap.parse_args()
  ceil = ceilings(rounds=2)
  bw = ceil["copy_GBps"] * 1e9
  res = {"meta": dict(run_meta(), argv=sys.argv[1:]), "ceil": ceil, "rows": []}
  print(ceil, flush=True)
  k, n = args.k, args.n
  x = jax.random.normal(jax.random.key(0), (k,), jnp.bfloat16)
  ws = [(k ** -0.5 * jax.random.normal(jax.random.key(1 + i), (k, n))).astype(jnp.bfloat16)
        for i in range(SETS)]
  want = jnp.dot(x.astype(jnp.float32), ws[0].astype(jnp.float32))
  runs = [("xla", None, lambda x, ws: [model._matmul(x[None], w)[0] for w in ws], ws)]
  for bn, bk, stages, warps in SETTINGS:
    kw = dict(bn=bn, bk=bk, stages=stages, warps=warps)
    for tiled in (False, True):
      fn = functools.partial(matvec, tiled=tiled, **kw)
      runs.append(("tiled" if tiled else "row_major", kw,
                   lambda x, ws, fn=fn: [fn(x, w) for w in ws], None))
  tiled_sets = {}
  for impl, kw, run, sets in runs:
    row = {"impl": impl, "knobs": kw, "K": k, "N": n}
    f = jax.jit(run)
    try:
      if sets is None:
        if impl == "tiled":
          if kw["bn"] not in tiled_sets:
            tiled_sets[kw["bn"]] = [jax.block_until_ready(tile(w, kw["bn"])) for w in ws]
          sets = tiled_sets[kw["bn"]]
        else:
          sets = ws
      got = f(x, sets)[0].astype(jnp.float32)
      row["max_rel_err"] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
      if row["max_rel_err"] > 2e-2:
        raise ValueError(f"wrong output: {row['max_rel_err']:.3g} of the largest value")
      per = kernel_us(lambda: [jax.block_until_ready(f(x, sets)) for _ in range(ROUNDS)],
                      ROUNDS * SETS)
      row["kernels_us"] = per
      row["us"] = product_us(per, "gemm", "layout_matvec")
      row["of_copy"] = 2 * k * n / (row["us"] * 1e-6) / bw
    except Exception as e:  # a setting that does not compile or fit is recorded
      row["error"] = error_text(e)
    print(row, flush=True)
    res["rows"].append(row)
    save_json("matvec_layout.json", res)


if __name__ == "__main__":
  main()
