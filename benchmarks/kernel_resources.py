"""Registers, spills and stack of the Mosaic GPU training forward as ptxas reports them, per
`flash_mgpu` variant (on a GPU: ptxas runs when Mosaic GPU compiles a kernel for the device).

    python benchmarks/kernel_resources.py --variants 'p1:;p0:PERSISTENT=0' \
        [--baseline-forward old_flash_mgpu.py] [--kernel forward|dkv]

Why: a change around the forward's visit loops (a loop over items, dynamic slot indices) can
change how ptxas allocates the consumers' registers, which a timing shows only as a slower
kernel. Each variant is compiled in a process of its own with MOSAIC_GPU_DUMP_PTXAS set (its
report goes to stdout, one per compiled module); the lines that matter are printed and written
to $OUT/kernel_resources.json when $OUT is set. Shape: Qwen2.5-1.5B heads (12/2, 128), the 2L
diffusion layout, L = 2048, batch 4 (attention.py's L = 2048 case).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KEEP = re.compile(r"registers|spill|stack frame|Compiling entry|Function properties|error|"
                  r"wgmma|serializ|warning",
                  re.IGNORECASE)


def compile_one(knobs: dict, kernel: str, baseline: str | None):
  """In the child: set the knobs, compile and run the kernel once (ptxas reports as it builds)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import attention as bench
  from dllm_jax import masks
  from dllm_jax.kernels import flash_mgpu

  if baseline:
    bench.add_baseline_forward(baseline)
  for k, v in knobs.items():  # (checked by parse_variants in the parent)
    setattr(*bench.knob_place(k), v)
  spec, length, b = masks.MaskSpec("diffusion", 32, 1), 2048, 4
  meta = bench.layout_segments(b, length, spec, np.random.default_rng(1), False, 1)
  q, k, v, do = bench._train_inputs(b, meta.positions.shape[1], 12, 2, 128, seed=10)
  seg = meta.segments
  if kernel == "forward":
    out = jax.jit(lambda q, k, v: flash_mgpu.forward(q, k, v, seg, spec, length))(q, k, v)
  else:
    lse = jnp.zeros((b, 12, q.shape[1]), jnp.float32)
    out = jax.jit(lambda q, k, v, do: flash_mgpu.dkv(q, k, v, seg, do, lse, lse, spec,
                                                     length))(q, k, v, do)
  jax.block_until_ready(out)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--variants", default="default:",
                  help="'name:KNOB=v,...;name2:...' as attention.py --variants takes them")
  ap.add_argument("--baseline-forward", metavar="FILE",
                  help="an earlier flash_mgpu.py (knob BASELINE_FORWARD=1 compiles its forward)")
  ap.add_argument("--kernel", default="forward", choices=("forward", "dkv"))
  ap.add_argument("--child", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child is not None:
    compile_one(json.loads(args.child), args.kernel, args.baseline_forward)
    return
  from benchmarks import attention as bench

  if args.baseline_forward:  # the knob exists only once the module is loaded
    bench.add_baseline_forward(args.baseline_forward)
  results = {}
  for name, knobs in bench.parse_variants(args.variants):
    cmd = [sys.executable, os.path.abspath(__file__), "--kernel", args.kernel,
           "--child", json.dumps(knobs)]
    if args.baseline_forward:
      cmd += ["--baseline-forward", args.baseline_forward]
    env = dict(os.environ, MOSAIC_GPU_DUMP_PTXAS="1")
    env.pop("MOSAIC_GPU_DUMP_TO", None)
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln.strip() for ln in (run.stdout + run.stderr).splitlines() if KEEP.search(ln)]
    results[name] = {"knobs": knobs, "rc": run.returncode, "ptxas": lines}
    print(f"== {name} {knobs} (rc {run.returncode})", flush=True)
    print("\n".join(lines) if lines else (run.stdout + run.stderr)[-2000:], flush=True)
    out = os.environ.get("OUT")
    if out:
      with open(os.path.join(out, "kernel_resources.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
