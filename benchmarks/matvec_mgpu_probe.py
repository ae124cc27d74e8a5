"""How fast jax's own Mosaic GPU matmul (TMA, wgmma, a persistent warp-specialised pipeline)
streams the weights of a one-row product on this GPU: whether a gate/up launch on TMA could match
XLA's GEMM (15.0-15.5 us a layer at the 1.5B against our Pallas Triton launch's 19.3,
BENCHMARKS.md sessions 18-19) before one is written.

    python benchmarks/matvec_mgpu_probe.py [--shapes qwen2.5-1.5b] [--ops gate_up[,down]]
        [--tiles 'TILE_N,TILE_K,STEPS;...']

Runs `jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu.matmul` (not our code) with the row
padded to 64 rows (wgmma's smallest M) against weights [K, N]: gate/up as one [E, 2F] weight, as
XLA fuses them; down [F, E] (its E columns give only E / (2 TILE_N) CTAs without a split-K, so
its figure bounds nothing; it is there to see the per-CTA rate). The kernel is persistent, one
CTA an SM, over N / (2 TILE_N) work tiles: the 1.5B's 17920 gate/up columns are 140 tiles of 128
on 132 SMs, two rounds for 8 of them, so each setting is also timed on the first
SMs x 2 TILE_N columns alone (`fill` rows: one tile an SM), the streaming rate without that
tail. Beside it XLA's product of the single row (the model's `_matmul`). Each is checked
against a float32 product (a setting whose output is off by over 2e-2 of the largest value is
not timed), then run over distinct weight sets (no L2 hits); figures: the GPU us of a call's
product kernel (`gpu_us`, from a profile: a lone call's wall time is the host's dispatch; every
kernel's in `kernels_us`) and the weights' read rate against the copy bandwidth of the same
run. JSON to $OUT/matvec_mgpu_probe.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import (ceilings, distinct_sets, error_text, kernel_us,  # noqa: E402
                               product_us, run_meta, save_json, timeit)
from benchmarks.decode import SHAPES  # noqa: E402
from dllm_jax import model  # noqa: E402

ROWS = 64  # the padded row block: wgmma's smallest M


def parse_tiles(text: str) -> list[tuple[int, int, int]]:
  """'TILE_N,TILE_K,STEPS;...' as (tile_n, tile_k, max_concurrent_steps) triples. TILE_N is
  each consumer warpgroup's columns: a multiple of 64 (the kernel slices it out of 64-column
  swizzle tiles)."""
  out = []
  for item in filter(None, (t.strip() for t in text.split(";"))):
    parts = item.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
      raise SystemExit(f"--tiles: {item!r} is not TILE_N,TILE_K,STEPS (three positive integers)")
    if int(parts[0]) % 64:
      raise SystemExit(f"--tiles: {item!r}: TILE_N must be a multiple of 64")
    out.append(tuple(int(p) for p in parts))
  if not out:
    raise SystemExit("--tiles: no setting given")
  return out


def weight_shape(cfg, op: str) -> tuple[int, int]:
  """[K, N] of the op's weight: gate/up as one GEMM (XLA's fusion of the pair), down."""
  e, f = cfg.hidden_size, cfg.intermediate_size
  return {"gate_up": (e, 2 * f), "down": (f, e)}[op]


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shapes", default="qwen2.5-1.5b")
  ap.add_argument("--ops", default="gate_up")
  ap.add_argument("--tiles", default="64,64,4;64,128,4;64,64,8;128,64,4;64,128,3")
  args = ap.parse_args()
  tiles = parse_tiles(args.tiles)
  ops = args.ops.split(",")
  if set(ops) - {"gate_up", "down"}:
    ap.error(f"--ops: {args.ops!r}; expected a subset of gate_up,down")
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

  fields = {f.name for f in dataclasses.fields(hm.TuningConfig)}
  sms = hm.get_num_sms()
  # jax 0.10's matmul(a, b, c, config) takes an addend c; a version without it takes (a, b, config).
  takes_c = "c" in inspect.signature(hm.matmul).parameters
  mosaic = lambda a, b, config: (hm.matmul(a, b, None, config=config) if takes_c
                                 else hm.matmul(a, b, config=config))
  res = {"meta": dict(run_meta(), argv=sys.argv[1:]), "ceil": ceilings(rounds=2), "rows": []}
  bw = res["ceil"]["copy_GBps"] * 1e9
  print(res["ceil"], flush=True)
  for name in args.shapes.split(","):
    cfg = SHAPES[name]
    for op in ops:
      k, n = weight_shape(cfg, op)
      wbytes = 2 * k * n
      sets = distinct_sets(wbytes)
      ws = [(k ** -0.5 * jax.random.normal(jax.random.key(i), (k, n))).astype(jnp.bfloat16)
            for i in range(sets)]
      x = jax.random.normal(jax.random.key(99), (k,), jnp.bfloat16)
      xs = jnp.zeros((ROWS, k), jnp.bfloat16).at[0].set(x)
      want = jnp.dot(x.astype(jnp.float32), ws[0].astype(jnp.float32))
      scale = float(jnp.max(jnp.abs(want)))
      xla = jax.jit(lambda x, w: model._matmul(x[None], w)[0])
      runs = [("xla", {}, xla, x, n)]
      for tn, tk, steps in tiles:
        kw = dict(tile_m=ROWS, tile_n=tn, tile_k=tk, max_concurrent_steps=steps)
        if "wg_dimension" in fields:  # two consumer warpgroups side by side over N
          kw["wg_dimension"] = hm.MatmulDimension.N
        if "epi_tile_n" in fields:
          kw["epi_tile_n"] = min(64, tn)
        config = hm.TuningConfig(**kw)
        fn = jax.jit(lambda x, w, config=config: mosaic(x, w, config)[0])
        knobs = {"tile_n": tn, "tile_k": tk, "steps": steps, "work_tiles": n // (2 * tn)}
        runs.append(("mosaic", knobs, fn, xs, n))
        fill = sms * 2 * tn  # one work tile an SM
        if fill < n:
          runs.append(("mosaic_fill", dict(knobs, work_tiles=sms), fn, xs, fill))
      sliced = {n: ws}  # weight sets by their column count; the `fill` ones copied once
      for impl, knobs, fn, arg, cols in runs:
        row = {"shape": name, "op": op, "K": k, "N": cols, "impl": impl, "knobs": knobs,
               "floor_us": 2 * k * cols / bw * 1e6}
        if cols not in sliced:
          sliced[cols] = [w[:, :cols] for w in ws]
        w_sets = sliced[cols]
        try:
          got = fn(arg, w_sets[0]).astype(jnp.float32)
          row["max_rel_err"] = float(jnp.max(jnp.abs(got - want[:cols]))) / scale
          if row["max_rel_err"] > 2e-2:
            raise ValueError(f"wrong output: {row['max_rel_err']:.3g} of the largest value")
          row["us"] = timeit(fn, [(arg, w) for w in w_sets], reps=5, inner=20) * 1e6
          # The wall time of one small call is the host's dispatch (session 20: 35-70 us for
          # every setting); the GPU time of the product's kernel is the figure, the copies and
          # the two-row concatenation around it counted apart.
          calls = 4 * len(w_sets)
          per = kernel_us(lambda: jax.block_until_ready([fn(arg, w_sets[i % len(w_sets)])
                                                         for i in range(calls)]), calls, 60)
          row["kernels_us"] = per
          row["gpu_us"] = product_us(per, "gemm", "mosaic_gpu")
          row["total_us"] = sum(per.values())
          row["read_GBps"] = 2 * k * cols / row["gpu_us"] * 1e-3
          row["of_copy"] = row["read_GBps"] * 1e9 / bw
        except Exception as e:  # a setting that does not compile, fit or compute is recorded
          row["error"] = error_text(e)
        print(row, flush=True)
        res["rows"].append(row)
        save_json("matvec_mgpu_probe.json", res)


if __name__ == "__main__":
  main()
