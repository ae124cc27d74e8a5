"""The fastest checked kernel setting of each launch in a `benchmarks/matvec.py` run, as the
flags of `benchmarks/decode_profile.py`, so one device call can sweep and then time the step.

    python benchmarks/matvec_best.py matvec.json --shape qwen2.5-1.5b

Prints `--matvec-knobs=...` (q/k/v), `--matvec-pair-knobs=...` (gate/up) and
`--matvec-partial-knobs=...` (o and down, by the down launch's time): per op, the setting with the
least GPU time per layer among those whose check against XLA passed. The gate/up flags name every
knob, so nothing of the q/k/v setting leaks into that launch.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.decode import SHAPES  # noqa: E402
from dllm_jax.kernels import matvec  # noqa: E402


def best(rows, shape, op):
  ok = [r for r in rows if r["shape"] == shape and r["op"] == op and r["impl"] == "pallas"
        and r.get("check_ok") and "gpu_us" in r]
  return min(ok, key=lambda r: r["gpu_us"])["knobs"] if ok else None


def flags(rows, shape):
  out = []
  for flag, op in (("--matvec-knobs", "qkv"), ("--matvec-pair-knobs", "gate_up"),
                   ("--matvec-partial-knobs", "down")):
    knobs = best(rows, shape, op)
    if knobs is None:
      continue
    if op == "gate_up":  # the pair's defaults for this shape on this device, as the model runs
      f = SHAPES[shape].intermediate_size
      knobs = {**matvec.default_knobs([f], True), "num_warps": 4, **knobs}
    if knobs:
      out.append(f"{flag}=" + ",".join(f"{k}={v}" for k, v in sorted(knobs.items())))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("json")
  ap.add_argument("--shape", required=True)
  args = ap.parse_args()
  with open(args.json) as f:
    rows = json.load(f)["rows"]
  print(" ".join(flags(rows, args.shape)))


if __name__ == "__main__":
  main()
