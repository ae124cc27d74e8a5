"""Can programmatic dependent launch hide the boundary between two TMA launches? (#7)

    python benchmarks/pdl_chain.py [--shape qwen2.5-1.5b] [--layers 28]
        [--gate-up-products cuda_cores] [--down-products wgmma]
        [--plans 'default;PER_SM,SLOTS,DOWN_SLOTS;...'] [--rounds 2]

The batch-1 step's MLPs without the rest of the layer: `--layers` chained pairs of
`matvec_mgpu.silu_pair` (gate/up, adding the previous down's float32 parts to the row, then the
RMSNorm) and `matvec_mgpu.matvec_parts` (down), each layer its own weights, all of them the
program's inputs (so safe under PDL, whose launches read their weights before waiting). For
each plan of the two launches, timed with `pdl=False` and `pdl=True` as one jitted program
each, in ABBA order: wall time a layer, and the weights' read rate over the copy rate of the
same run.

Session 28 found no gain from PDL in the model's step. Unlike there, every launch of this chain
can let the next start early. Two things still stand between this chain and an ideal overlap:
- Shared memory. At the 1.5B two gate/up CTAs an SM (the default plan) fill it, so a down CTA
  cannot join them; the second plan (one gate/up CTA an SM of 2 slots, down's own 12) lets one
  of each share an SM, by the launches' estimate of their shared memory (recorded a plan).
  Its baseline is its own PDL-off run: to count, a gain must also beat the default plan's.
- Order. Under PDL the row is fetched after the wait, behind the weights' first tiles; without
  it, first. The two are measured together.

Both programs must give the same bits (the same arithmetic, issued in another order): checked
on one input set before the timings and on every set after them; a difference is an error (exit
1). Whether each program's kernels were lowered with jax 0.11's PDL mark is recorded
(`uses_pdl_marks`): the mark asks the launch for PDL, which a profile would have to confirm. JSON to
$OUT/pdl_chain.json. (On a CPU the kernels run in Mosaic GPU's interpreter, CUDA-core products
only: the tests' run, not a measurement.)
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import ceilings, run_meta, save_json, timeit  # noqa: E402


def chain(x, parts, scale, gates, ups, downs, *, pdl, products, pair_knobs=None,
          down_knobs=None, interpret=False):
  """The MLPs of len(gates) layers, chained as the per-layer step chains them: (row, down's
  parts) after the last. `pair_knobs`, `down_knobs`: silu_pair's and matvec_parts' knobs
  (ctas, slots; None: their defaults)."""
  from dllm_jax.kernels import matvec_mgpu

  gate_up_products, down_products = products
  for g, u, w in zip(gates, ups, downs):
    act, x = matvec_mgpu.silu_pair(x, g, u, add_E=parts, norm_scale_E=scale, pdl=pdl,
                                   products=gate_up_products, interpret=interpret,
                                   **(pair_knobs or {}))
    parts = matvec_mgpu.matvec_parts(act, w, pdl=pdl, products=down_products,
                                     interpret=interpret, **(down_knobs or {}))
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


def parse_plans(text: str) -> list[tuple[int, int, int] | None]:
  """'PER_SM,SLOTS,DOWN_SLOTS;...' as [(gate/up CTAs an SM, gate/up slots, down slots), ...];
  'default' is both launches' own plans, None."""
  plans = []
  for item in filter(None, (t.strip() for t in text.split(";"))):
    if item == "default":
      plans.append(None)
      continue
    fields = item.split(",")
    if len(fields) != 3 or not all(v.strip().isdigit() and int(v) > 0 for v in fields):
      raise SystemExit(f"--plans: {item!r} is not PER_SM,SLOTS,DOWN_SLOTS (positive integers) "
                       "or 'default'")
    plans.append(tuple(map(int, fields)))
  if not plans:
    raise SystemExit("--plans: no plan given")
  return plans


def launch_plans(e, f, products, plans, sms):
  """Each plan (`parse_plans`) at hidden size e and f intermediate rows, as the launches will
  run it: knobs, CTAs, slots and shared memory a CTA of each launch, and whether a down CTA
  fits on an SM beside all the gate/up CTAs it holds (else, under PDL, down's CTAs start on an
  SM only as gate/up's there finish); a ValueError names a plan that does not fit at all."""
  from dllm_jax.kernels import matvec_mgpu as mm

  gate_up_products, down_products = products
  out = []
  for plan in plans:
    pair_knobs = down_knobs = None
    if plan is not None:
      pair_knobs = {"ctas": mm.default_pair_ctas(f, plan[0], sms), "slots": plan[1]}
      down_knobs = {"slots": plan[2]}
    try:
      splits, d_ctas, d_slots = mm._parts_plan(f, e, None, None,
                                               (down_knobs or {}).get("slots"), sms,
                                               down_products)
      ctas, slots = mm._pair_plan(e, f, splits, (pair_knobs or {}).get("ctas"),
                                  (pair_knobs or {}).get("slots"), sms, gate_up_products)
    except ValueError as err:
      raise ValueError(f"--plans {plan}: {err}") from None
    pair_smem = mm._pair_smem(e, splits, mm.row_plan(f, ctas)[1], slots, gate_up_products)
    down_smem = mm._parts_smem(f // mm.BK // splits, mm.row_plan(e, d_ctas // splits)[1],
                               d_slots, down_products)
    out.append({"pair_knobs": pair_knobs, "down_knobs": down_knobs, "splits": splits,
                "pair": {"ctas": ctas, "slots": slots, "smem_bytes": pair_smem},
                "down": {"ctas": d_ctas, "slots": d_slots, "smem_bytes": down_smem},
                "down_fits_beside_an_sms_pair_ctas": (
                    -(-ctas // sms) * (pair_smem + mm.SMEM_SLACK) + down_smem + mm.SMEM_SLACK
                    <= mm.SMEM_BYTES)})
  return out


@contextlib.contextmanager
def pdl_marks():
  """Yields a list that collects, as Mosaic GPU kernels are lowered inside the block, whether
  each was marked for programmatic stream serialisation (jax 0.11's `uses_pdl`; None under a
  jax whose lowering has no such mark): a run whose PDL programs show no True did not ask for
  PDL at all."""
  from jax.experimental.mosaic.gpu import core as mosaic_core

  marks = []
  real = mosaic_core._lower_as_gpu_kernel
  takes = "uses_pdl" in inspect.signature(real).parameters

  def spy(*args, **kw):
    marks.append(kw.get("uses_pdl", False) if takes else None)
    return real(*args, **kw)

  mosaic_core._lower_as_gpu_kernel = spy
  try:
    yield marks
  finally:
    mosaic_core._lower_as_gpu_kernel = real


def same_bits(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def main():
  from benchmarks.decode import SHAPES
  from dllm_jax.kernels import matvec_mgpu

  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
  ap.add_argument("--layers", type=int, default=28)
  ap.add_argument("--gate-up-products", default="cuda_cores",
                  choices=matvec_mgpu.PRODUCT_KINDS)
  ap.add_argument("--down-products", default="wgmma", choices=matvec_mgpu.PRODUCT_KINDS)
  ap.add_argument("--plans", default="default;1,2,12",
                  help="plans, each gate/up's CTAs an SM and slots and down's slots, or "
                       "'default' (the launches' own: at the 1.5B two gate/up CTAs an SM, "
                       "which leave no room for a down CTA beside them); the second default, "
                       "1,2,12 (down's own slots), lets a CTA of each share an SM, by the "
                       "launches' estimate of their shared memory")
  ap.add_argument("--rounds", type=int, default=2, help="ABBA pairs of pdl off / on a plan")
  args = ap.parse_args()
  if args.layers < 1 or args.rounds < 1:
    ap.error("--layers and --rounds are positive")

  cfg = SHAPES[args.shape]
  e, f = cfg.hidden_size, cfg.intermediate_size
  products = (args.gate_up_products, args.down_products)
  sms = matvec_mgpu._sms()
  interpret = jax.default_backend() == "cpu"  # the tests' run: Mosaic GPU's interpreter
  if interpret and "wgmma" in products:
    ap.error("on a CPU the launches run in Mosaic GPU's interpreter, which has no wgmma "
             "products: give --gate-up-products cuda_cores --down-products cuda_cores")
  # The shape checks of both launches (gate/up's plan is checked with each plan below).
  why = matvec_mgpu.launch_unsupported(e, f, None, args.down_products)
  if why is not None:
    ap.error(f"--shape {args.shape}: the TMA launches do not cover it: {why}")
  try:
    plans = launch_plans(e, f, products, parse_plans(args.plans), sms)
  except ValueError as err:
    ap.error(str(err))
  ceil = ceilings(rounds=2)
  res = {"meta": dict(run_meta(), argv=sys.argv[1:]), "ceil": ceil, "plans": plans,
         "rows": []}
  print(ceil, flush=True)
  layer_bytes = 2 * 3 * e * f
  for index, plan in enumerate(plans):
    # Each plan's own inputs: the down launch's splits set the parts' shape.
    sets = [inputs(jax.random.key(i), e, f, args.layers, plan["splits"]) for i in range(2)]
    fns = {pdl: jax.jit(lambda *a, pdl=pdl, plan=plan: chain(
        *a, pdl=pdl, products=products, pair_knobs=plan["pair_knobs"],
        down_knobs=plan["down_knobs"], interpret=interpret)) for pdl in (False, True)}
    # Compiled here: the lowering's PDL mark of each program recorded as it lowers.
    with pdl_marks() as marks:
      plan["same_bits_before"] = same_bits(fns[False](*sets[0]), fns[True](*sets[0]))
    plan["uses_pdl_marks"] = marks
    save_json("pdl_chain.json", res)
    for r in range(args.rounds):
      for pdl in ((False, True, True, False) if r % 2 == 0 else (True, False, False, True)):
        s = timeit(fns[pdl], sets, reps=5, inner=4) / args.layers
        row = {"plans_index": index, "pdl": pdl, "round": r, "us_a_layer": s * 1e6,
               "read_of_copy": layer_bytes / s / (ceil["copy_GBps"] * 1e9),
               "products": list(products), "layers": args.layers}
        print(row, flush=True)
        res["rows"].append(row)
        save_json("pdl_chain.json", res)
    plan["same_bits_after"] = all(same_bits(fns[False](*a), fns[True](*a)) for a in sets)
    print(plan, flush=True)
    save_json("pdl_chain.json", res)
    if not (plan["same_bits_before"] and plan["same_bits_after"]):
      raise SystemExit(f"plan {index}: pdl on and off gave different results; the "
                       "timings are recorded but the PDL chain is not correct")


if __name__ == "__main__":
  main()
