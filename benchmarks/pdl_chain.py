"""Does programmatic dependent launch hide the boundary between two TMA launches? (#7)

    python benchmarks/pdl_chain.py [--shape qwen2.5-1.5b] [--layers 28]
        [--gate-up-products cuda_cores] [--down-products wgmma]

The batch-1 step's MLPs without the rest of the layer: `--layers` chained pairs of
`matvec_mgpu.silu_pair` (gate/up, adding the previous down's float32 parts to the row, then the
RMSNorm) and `matvec_mgpu.matvec_parts` (down), each layer its own weights, all of them the
program's inputs (so safe under PDL, whose launches read their weights before waiting). Timed
with `pdl=False` and `pdl=True`, alternately, as one jitted program each: wall time a layer and
the weights' read rate over the copy rate of the same run. Session 28 found no gain from PDL in
the model's step, where the launches next to these are Triton's and cannot let the next start
early; here every launch of the chain can, which is the best case for it. Both chains must give
the same bits (the same arithmetic in another order of issue). JSON to $OUT/pdl_chain.json.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import ceilings, run_meta, save_json, timeit  # noqa: E402


def chain(x, parts, scale, gates, ups, downs, *, pdl, products, interpret=False):
  """The MLPs of len(gates) layers, chained as the per-layer step chains them: (row, down's
  parts) after the last."""
  from dllm_jax.kernels import matvec_mgpu

  gate_up_products, down_products = products
  for g, u, w in zip(gates, ups, downs):
    act, x = matvec_mgpu.silu_pair(x, g, u, add_E=parts, norm_scale_E=scale, pdl=pdl,
                                   products=gate_up_products, interpret=interpret)
    parts = matvec_mgpu.matvec_parts(act, w, pdl=pdl, products=down_products,
                                     interpret=interpret)
  return x, parts


def inputs(key, e, f, layers, splits):
  """A row, the parts a down launch leaves ([splits, e] float32), a norm scale and `layers`
  layers' out-major weights, scaled so that the row stays O(1) along the chain."""
  k = jax.random.split(key, 4 + 3 * layers)
  bf = jnp.bfloat16
  w = lambda kk, shape: (shape[1] ** -0.5 * jax.random.normal(kk, shape)).astype(bf)
  return (jax.random.normal(k[0], (e,), bf), 0.1 * jax.random.normal(k[1], (splits, e)),
          (1 + 0.1 * jax.random.normal(k[2], (e,))).astype(bf),
          [w(k[4 + i], (f, e)) for i in range(layers)],
          [w(k[4 + layers + i], (f, e)) for i in range(layers)],
          [0.1 * w(k[4 + 2 * layers + i], (e, f)) for i in range(layers)])


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shape", default="qwen2.5-1.5b")
  ap.add_argument("--layers", type=int, default=28)
  ap.add_argument("--gate-up-products", default="cuda_cores", choices=("cuda_cores", "wgmma"))
  ap.add_argument("--down-products", default="wgmma", choices=("cuda_cores", "wgmma"))
  ap.add_argument("--rounds", type=int, default=2, help="off/on pairs timed, alternately")
  args = ap.parse_args()
  if args.layers < 1 or args.rounds < 1:
    ap.error("--layers and --rounds are positive")
  from benchmarks.decode import SHAPES
  from dllm_jax.kernels import matvec_mgpu

  cfg = SHAPES[args.shape]
  e, f = cfg.hidden_size, cfg.intermediate_size
  products = (args.gate_up_products, args.down_products)
  splits = matvec_mgpu._parts_plan(f, e, None, None, None, matvec_mgpu._sms(),
                                   args.down_products)[0]
  ceil = ceilings(rounds=2)
  res = {"meta": dict(run_meta(), argv=sys.argv[1:]), "ceil": ceil, "splits": splits,
         "rows": []}
  print(ceil, flush=True)
  sets = [inputs(jax.random.key(i), e, f, args.layers, splits) for i in range(2)]
  layer_bytes = 2 * 3 * e * f
  fns = {pdl: jax.jit(lambda *a, pdl=pdl: chain(*a, pdl=pdl, products=products))
         for pdl in (False, True)}
  outs = {pdl: fn(*sets[0]) for pdl, fn in fns.items()}
  same = all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(outs[False], outs[True]))
  res["same_bits"] = same
  print({"same_bits": same}, flush=True)
  for r in range(args.rounds):
    for pdl, fn in fns.items():
      s = timeit(fn, sets, reps=5, inner=4) / args.layers
      row = {"pdl": pdl, "round": r, "us_a_layer": s * 1e6,
             "read_of_copy": layer_bytes / s / (ceil["copy_GBps"] * 1e9),
             "products": list(products), "layers": args.layers}
      print(row, flush=True)
      res["rows"].append(row)
      save_json("pdl_chain.json", res)


if __name__ == "__main__":
  main()
