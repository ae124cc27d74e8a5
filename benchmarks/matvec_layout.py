"""Whether the one-row kernels read their weights slowly because of the layout: a column tile
[K, bn] of a row-major [K, N] weight is K rows of bn * 2 bytes, N * 2 bytes apart (35 KB for this
script's default, the 1.5B's gate and up as one [1536, 17920] weight; 17.9 KB in the model's
gate/up launch, which reads two [1536, 8960] weights), where XLA's GEMM reads 128-column tiles
through TMA. The same Pallas Triton product (the row as 16 equal rows through the tensor cores,
as `kernels.matvec`) on the weight as it is and on the weight pre-tiled to [N / bn, K, bn]
(each program's tile one contiguous run), and on the weight transposed to [N, K] (out-major, as
Hugging Face stores a Linear: each program's bn output columns are bn whole rows of K, one
contiguous run as well, in a layout XLA's GEMMs take as they are), GPU time from a profile, 16
distinct weight sets, independent products in one jit (no L2 hits). Beside them XLA's one-row
GEMM, and its GEMMs of more rows (--xla-rows: a batch-32 step, a prefill; each also as the
backward's dx product) on [K, N] and on [N, K]: a layout the kernels would
keep must not slow the prefill and diffusion forwards, which multiply through XLA.

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
PREFILL = 512  # rows of the prefill-sized GEMM
# (block_n, block_k, num_stages, num_warps)
SETTINGS = [(32, 256, 3, 4), (32, 512, 3, 4), (64, 256, 3, 4), (64, 128, 4, 4),
            (128, 128, 3, 4), (128, 64, 4, 4), (64, 512, 2, 4)]


def _kernel(x_ref, w_ref, o_ref, *, bk, nk, bn, transposed):
  # x_ref [K]; w_ref [K, bn] (row-major or tiled) or [bn, K] (transposed): this program's
  # output columns.
  def body(c, acc):
    a = jnp.broadcast_to(x_ref[pl.ds(c * bk, bk)][None, :], (ROWS, bk))
    w = w_ref[:, pl.ds(c * bk, bk)] if transposed else w_ref[pl.ds(c * bk, bk), :]
    return acc + lax.dot_general(a, w, (((1,), (1 if transposed else 0,)), ((), ())),
                                 preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, nk, body, jnp.zeros((ROWS, bn), jnp.float32))
  first = lax.broadcasted_iota(jnp.int32, (ROWS, bn), 0) == 0
  o_ref[...] = jnp.sum(jnp.where(first, acc, 0.0), axis=0).astype(o_ref.dtype)


LAYOUTS = ("row_major", "tiled", "transposed")


def matvec(x, w, *, layout, bn, bk, stages, warps, interpret=False):
  """x [K] @ the weight, bf16 [N]: w is [K, N] (`row_major`), [N / bn, K, bn] (`tiled`) or
  [N, K] (`transposed`)."""
  k = x.shape[0]
  if layout not in LAYOUTS:
    raise ValueError(f"matvec: layout {layout!r}; expected one of {LAYOUTS}")
  tiles = {"row_major": lambda: w.shape[1] // bn, "tiled": lambda: w.shape[0],
           "transposed": lambda: w.shape[0] // bn}[layout]()
  spec = {"row_major": lambda: pl.BlockSpec((k, bn), lambda j: (0, j)),
          "tiled": lambda: pl.BlockSpec((None, k, bn), lambda j: (j, 0, 0)),
          "transposed": lambda: pl.BlockSpec((bn, k), lambda j: (j, 0))}[layout]()
  return pl.pallas_call(
      functools.partial(_kernel, bk=bk, nk=k // bk, bn=bn, transposed=layout == "transposed"),
      grid=(tiles,),
      in_specs=[pl.BlockSpec((k,), lambda j: (0,)), spec],
      out_specs=pl.BlockSpec((bn,), lambda j: (j,)),
      out_shape=jax.ShapeDtypeStruct((tiles * bn,), x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
      interpret=interpret, name="layout_matvec")(x, w)


def relayout(w, layout, bn):
  """[K, N] in `layout` (see `matvec`)."""
  k, n = w.shape
  if layout == "tiled":
    return w.reshape(k, n // bn, bn).transpose(1, 0, 2)
  return w.T if layout == "transposed" else w


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--n", type=int, default=17920, help="weight columns (1.5B gate + up)")
  ap.add_argument("--k", type=int, default=1536, help="weight rows (the row's length)")
  ap.add_argument("--xla-rows", default=f"1,32,{PREFILL}",
                  help="rows of XLA's GEMMs on both layouts (1: the --matvec xla step; 32: a "
                  "batch-32 decode step; 512: a prefill), each also as the backward's dx "
                  "product (dy [M, N] times the weight's transpose) from 32 rows up")
  ap.add_argument("--no-triton", action="store_true", help="XLA's GEMMs only")
  args = ap.parse_args()
  xla_rows = [int(r) for r in args.xla_rows.split(",") if r]
  ceil = ceilings(rounds=2)
  bw = ceil["copy_GBps"] * 1e9
  res = {"meta": dict(run_meta(), argv=sys.argv[1:]), "ceil": ceil, "rows": []}
  print(ceil, flush=True)
  k, n = args.k, args.n
  x = jax.random.normal(jax.random.key(0), (k,), jnp.bfloat16)
  ws = [(k ** -0.5 * jax.random.normal(jax.random.key(1 + i), (k, n))).astype(jnp.bfloat16)
        for i in range(SETS)]
  m_max = max(xla_rows + [1])
  xs = jax.random.normal(jax.random.key(SETS + 1), (m_max, k), jnp.bfloat16)
  dys = jax.random.normal(jax.random.key(SETS + 2), (m_max, n), jnp.bfloat16)
  want = jnp.dot(x.astype(jnp.float32), ws[0].astype(jnp.float32))
  nt = lambda a, w: lax.dot_general(a, w, (((1,), (1,)), ((), ())))  # a @ w.T
  # (impl, knobs, run(x, sets), layout, the rows multiplied)
  runs = [("xla", None, lambda x, ws: [model._matmul(x[None], w)[0] for w in ws], "row_major", 1),
          ("xla_transposed", None, lambda x, ws: [nt(x[None], w)[0] for w in ws], "transposed",
           1)]
  for m in (r for r in xla_rows if r > 1):
    # (The whole product is returned: a slice of it would let XLA multiply fewer rows.)
    a, dy = xs[:m], dys[:m]
    runs += [(f"xla_{m}", None, lambda _, ws, a=a: [jnp.dot(a, w) for w in ws], "row_major", m),
             (f"xla_{m}_transposed", None, lambda _, ws, a=a: [nt(a, w) for w in ws],
              "transposed", m),
             (f"xla_dx_{m}", None, lambda _, ws, dy=dy: [nt(dy, w) for w in ws], "row_major",
              -m),
             (f"xla_dx_{m}_transposed", None, lambda _, ws, dy=dy: [jnp.dot(dy, w) for w in ws],
              "transposed", -m)]
  for bn, bk, stages, warps in ([] if args.no_triton else SETTINGS):
    kw = dict(bn=bn, bk=bk, stages=stages, warps=warps)
    for layout in LAYOUTS:
      fn = functools.partial(matvec, layout=layout, **kw)
      runs.append((layout, kw, lambda x, ws, fn=fn: [fn(x, w) for w in ws], layout, 1))
  sets_of = {}
  for impl, kw, run, layout, m in runs:
    dx, m = m < 0, abs(m)  # (a negative count: the backward's dx product of -m rows)
    row = {"impl": impl, "knobs": kw, "K": k, "N": n, "M": m}
    f = jax.jit(run)
    try:
      key = (layout, kw["bn"] if (kw and layout == "tiled") else None)
      if key not in sets_of:
        sets_of[key] = [jax.block_until_ready(relayout(w, layout, key[1] or 1)) for w in ws]
      sets = sets_of[key]
      got = f(x, sets)[0]
      got = (got if m == 1 else got[0]).astype(jnp.float32)
      w32 = ws[0].astype(jnp.float32)
      ref = (want if m == 1 else jnp.dot(dys[0].astype(jnp.float32), w32.T) if dx
             else jnp.dot(xs[0].astype(jnp.float32), w32))
      row["max_rel_err"] = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
      if row["max_rel_err"] > 2e-2:
        raise ValueError(f"wrong output: {row['max_rel_err']:.3g} of the largest value")
      per = kernel_us(lambda: [jax.block_until_ready(f(x, sets)) for _ in range(ROUNDS)],
                      ROUNDS * SETS)
      row["kernels_us"] = per
      row["us"] = product_us(per, "gemm", "nvjet", "cutlass", "layout_matvec")
      row["of_copy"] = 2 * k * n / (row["us"] * 1e-6) / bw
      if m > 1:
        row["tflops"] = 2 * m * k * n / (row["us"] * 1e-6) / 1e12
    except Exception as e:  # a setting that does not compile or fit is recorded
      row["error"] = error_text(e)
    print(row, flush=True)
    res["rows"].append(row)
    save_json("matvec_layout.json", res)


if __name__ == "__main__":
  main()
