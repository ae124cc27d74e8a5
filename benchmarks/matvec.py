"""The fused one-row projections (`kernels/matvec.py`) against the XLA kernels they replace.

    python benchmarks/matvec.py [--shapes qwen2.5-1.5b,qwen2.5-7b,smollm2-135m]
        [--ops qkv,gate_up,o,down]
        [--knobs 'block_n=64,block_k=128,num_warps=4,num_stages=1;...']
        [--partial-knobs 'splits=4,block_n=64;...']

For each shape, the four launches of a one-row decode layer: `qkv` (RMSNorm, q/k/v, bias),
`gate_up` (residual add, RMSNorm, gate/up, SiLU product) by `norm_matvec` at each `--knobs`
setting, and `o` and `down` (split-K partial sums, `matvec_partials`, at each `--partial-knobs`
setting; XLA's side is the model's GEMM, whose output is the summed product; `o` times the
plain launch on a given row, not `combined_matvec_partials`, which the model's o launch is where
`row_attention` runs: `decode_profile.py` times that one in the step). Each kernel
setting is first checked against XLA on one layer (`check_max_rel_err`, `check_ok`). Then each
launch runs over 16 layers of distinct weights in one jitted chain (layer i+1's input is layer
i's output, so nothing is fused across layers and no weight is read from L2; `o` and `down` run
16 independent products, each on its own row: given one shared row, XLA merged them into one
GEMM, which made the XLA side of session 17's o and down rows no measure of the step), as XLA
runs the model's ops (every product through `model._matmul`; the model's MLP uses `nn.Dense`,
the same GEMM at these sizes) and as the kernel with each knob setting. Measured: wall us per
layer (`common.timeit` over the chain), and from a profile the GPU us per layer of every kernel,
beside the weight-read floor per layer at the copy bandwidth of the same run. The gate/up chain slices the SiLU product to the row length for the
next layer's residual, in both variants; its copy shows in the kernel list.
JSON to $OUT/matvec.json.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import (ceilings, error_text, run_meta, save_json, timeit,  # noqa: E402
                               traced_gpu_events)
from benchmarks.decode import SHAPES  # noqa: E402
from dllm_jax import model  # noqa: E402
from dllm_jax.kernels import matvec  # noqa: E402

LAYERS = 16


def _weights(cfg, key):
  e, f = cfg.hidden_size, cfg.intermediate_size
  ns = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim)
  ks = jax.random.split(key, 8)
  # One buffer per layer, as the per-layer layout the decoder runs (a slice of a stacked array
  # is copied out for a custom call; XLA's GEMM reads it in place).
  w = lambda k, *s: [(0.02 * jax.random.normal(jax.random.fold_in(k, i), s)).astype(jnp.bfloat16)
                     for i in range(LAYERS)]
  return {"scale": [1 + a for a in w(ks[0], e)], "qkv": [w(ks[1 + i], e, n) for i, n in enumerate(ns)],
          "bias": [w(ks[4 + i], n) for i, n in enumerate(ns)],
          "gate_up": [w(ks[7], e, f), w(jax.random.fold_in(ks[7], 1), e, f)],
          "o": [w(jax.random.fold_in(ks[7], 2), cfg.num_heads * cfg.head_dim, e)],
          "down": [w(jax.random.fold_in(ks[7], 3), f, e)]}


def _row_len(cfg, op):
  return {"o": cfg.num_heads * cfg.head_dim, "down": cfg.intermediate_size}.get(op,
                                                                               cfg.hidden_size)


def _chain(op, impl, knobs, cfg):
  """A jitted function (x, add, weights) running `op` over LAYERS layers by `impl`."""
  eps = cfg.rms_norm_eps
  fn = _op(impl, knobs, op)

  def run(x, add, w):
    if op in ("o", "down"):  # x: one row a layer (on one shared row XLA merges the products)
      return [fn(x[i], w[op][0][i]) for i in range(LAYERS)]
    for i in range(LAYERS):
      if op == "qkv":
        (q, _, _), _ = fn(x, [a[i] for a in w["qkv"]], norm_scale_E=w["scale"][i], eps=eps,
                          biases_N=[b[i] for b in w["bias"]])
        x = q
      else:
        (h,), x = fn(x, [a[i] for a in w["gate_up"]], add_E=add, norm_scale_E=w["scale"][i],
                     eps=eps, silu_pair=True)
        add = h[:x.shape[0]]
    return x, add

  return jax.jit(run)


def _op(impl, knobs, op="qkv"):
  # On a CPU (a smoke run) the kernel is interpreted.
  interpret = jax.default_backend() == "cpu"
  if op in ("o", "down"):
    if impl == "xla":
      return lambda x, w: model._matmul(x[None], w)[0]
    return functools.partial(matvec.matvec_partials, interpret=interpret, **knobs)
  if impl == "xla":  # the model's one-row product
    return functools.partial(matvec.norm_matvec_reference, dot=model._matmul)
  return functools.partial(matvec.norm_matvec, interpret=interpret, **knobs)


def check(op, knobs, cfg, x, w):
  """Layer 0's outputs by the kernel against XLA's: the largest difference over the largest
  value, per output (bf16 outputs whose float32 sums differ only in order: ~1e-2 at most)."""
  if op in ("o", "down"):
    got = jax.jit(_op("pallas", knobs, op))(x, w[op][0][0]).sum(0).astype(x.dtype)
    want = jax.jit(_op("xla", {}, op))(x, w[op][0][0])
    pairs = [(got, want)]
  else:
    pairs = _pairs(op, knobs, cfg, x, w)
  rel = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32)))
               / max(float(jnp.max(jnp.abs(r.astype(jnp.float32)))), 1e-30)) for g, r in pairs]
  return {"check_max_rel_err": max(rel), "check_ok": max(rel) <= 2e-2}


def _pairs(op, knobs, cfg, x, w):
  kw = dict(eps=cfg.rms_norm_eps, norm_scale_E=w["scale"][0])
  if op == "qkv":
    kw["biases_N"] = [b[0] for b in w["bias"]]
  else:
    kw.update(add_E=x[::-1], silu_pair=True)
  ws = [a[0] for a in w[op]]
  (got, got_row), (want, want_row) = (jax.jit(lambda x, ws: _op(i, k)(x, ws, **kw))(x, ws)
                                      for i, k in (("pallas", knobs), ("xla", {})))
  return list(zip(got, want)) + ([(got_row, want_row)] if want_row is not None else [])


KNOBS = ("block_n", "block_k", "num_warps", "num_stages")  # norm_matvec
PARTIAL_KNOBS = ("block_n", "block_k", "num_warps", "num_stages", "splits")  # matvec_partials


def parse_knobs(text, flag="--knobs", allowed=KNOBS):
  """';'-separated knob settings ('default' = the kernel's defaults) as a list of dicts; errors
  name `flag`."""
  out = []
  for item in filter(None, (t.strip() for t in text.split(";"))):
    if item == "default":
      out.append({})
      continue
    pairs = [p.split("=") for p in item.split(",")]
    if any(len(p) != 2 for p in pairs):
      raise SystemExit(f"{flag}: {item!r} is not KNOB=INT[,KNOB=INT...]")
    kv = dict(pairs)
    bad = set(kv) - set(allowed)
    if bad:
      raise SystemExit(f"{flag}: unknown {sorted(bad)} in {item!r} (knobs: "
                       f"{', '.join(allowed)})")
    try:
      out.append({k: int(v) for k, v in kv.items()})
    except ValueError:
      raise SystemExit(f"{flag}: {item!r} has a value that is not an integer") from None
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shapes", default="qwen2.5-1.5b")
  ap.add_argument("--knobs", default="default",
                  help="';'-separated knob settings of the kernel, 'default' = its defaults")
  ap.add_argument("--ops", default="qkv,gate_up,o,down")
  ap.add_argument("--partial-knobs", default="default",
                  help="';'-separated knob settings of matvec_partials (o and down), with splits")
  args = ap.parse_args()
  ops = args.ops.split(",")
  if set(ops) - {"qkv", "gate_up", "o", "down"}:
    ap.error(f"--ops: {args.ops!r}; expected a subset of qkv,gate_up,o,down")
  knob_sets = {"norm": parse_knobs(args.knobs),
               "partial": parse_knobs(args.partial_knobs, "--partial-knobs",
                                      PARTIAL_KNOBS)}
  res = {"meta": dict(run_meta(), argv=sys.argv[1:]), "ceil": ceilings(rounds=2), "rows": []}
  bw = res["ceil"]["copy_GBps"] * 1e9
  print("ceilings", res["ceil"], flush=True)
  for name in args.shapes.split(","):
    cfg = SHAPES[name]
    w = _weights(cfg, jax.random.key(0))
    for op in ops:
      rows = [jax.random.normal(jax.random.key(1 + i), (_row_len(cfg, op),), jnp.bfloat16)
              for i in range(LAYERS if op in ("o", "down") else 1)]
      x = rows if op in ("o", "down") else rows[0]
      wbytes = sum(a[0].nbytes for a in w[op])
      knobs_of_op = knob_sets["partial" if op in ("o", "down") else "norm"]
      for impl, knobs in [("xla", {})] + [("pallas", k) for k in knobs_of_op]:
        row = {"shape": name, "op": op, "impl": impl, "knobs": knobs,
               "floor_us": wbytes / bw * 1e6}
        try:
          if impl == "pallas":  # the kernel's numbers on this device, before its speed
            row.update(check(op, knobs, cfg, rows[0], w))
          fn = _chain(op, impl, knobs, cfg)
          row["wall_us"] = timeit(fn, [(x, x, w)], reps=5, inner=20) / LAYERS * 1e6
          events, _ = traced_gpu_events(lambda: jax.block_until_ready(fn(x, x, w)))
          per = collections.defaultdict(float)
          for n, s, e in events:
            per[n[:80]] += (e - s) / 1e3 / LAYERS
          row["gpu_us"] = sum(per.values())
          row["kernels_per_layer"] = len(events) / LAYERS
          row["kernels"] = dict(sorted(per.items(), key=lambda kv: -kv[1])[:8])
        except Exception as e:  # a knob setting that does not compile is recorded
          row["error"] = error_text(e)
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        save_json("matvec.json", res)


if __name__ == "__main__":
  main()
