"""What every benchmark needs: a timer that keeps compilation out, and the device's two ceilings
(bf16 matmul rate, copy bandwidth) measured in the same run as the figures compared with them."""

from __future__ import annotations

import collections
import datetime
import glob
import json
import math
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp


def timeit(fn, arg_sets, reps=5, inner=4, min_region_s=0.02):
  """Median seconds per call of `fn` after two warm-up calls; cycles through `arg_sets` so that
  repeated calls do not measure the L2 cache.

  Each timed region runs `inner` calls back to back, more if needed for the region to last
  `min_region_s`: a region pays once for the first launch's latency and the final
  synchronisation (0.1-0.2 ms on the H200), which over two or three sub-millisecond calls read as
  20-40% of their time (decode attention at S=4096: 62-75 us a call with 2-3 calls a region,
  50.4-50.8 us with 40; BENCHMARKS.md).
  """
  jax.block_until_ready(fn(*arg_sets[0]))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*arg_sets[-1]))
  inner = max(inner, math.ceil(min_region_s / max(time.perf_counter() - t0, 1e-6)))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = None
    for i in range(inner):
      out = fn(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


def random_params(cfg, rng):
  """Random params of model config `cfg`, drawn in the in_out kernel layout and converted to
  `cfg.kernel_layout`, so that runs in either layout multiply the same weights (stacked)."""
  import dataclasses

  from dllm_jax import model

  base = dataclasses.replace(cfg, kernel_layout="in_out")
  return model.with_kernel_layout(model.init_params(base, rng), base, cfg.kernel_layout)[0]


def distinct_sets(bytes_per_set: float) -> int:
  """How many distinct input sets one timed executable cycles through: at least 4 and 1 GB (at
  most 16), so no call hits L2 and the executable's own launch cost (tens of us) is spread as it
  is in a model step, where a kernel is one of hundreds."""
  return int(min(16, max(4, math.ceil(1e9 / bytes_per_set))))


def ceilings(rounds: int = 3, before: dict | None = None) -> dict:
  """bf16 matmul TFLOP/s (8192^3 on random data) and copy GB/s (bytes read + written): the best
  of `rounds` measurements each, and of `before` (an earlier call's result, merged in), with
  every measurement kept under `*_all`.

  The best, not one reading: one 8192^3 matmul timing on the same H200 read 795, 774 and 725
  TFLOP/s in three calls while the attention kernels beside it moved by 2% (BENCHMARKS.md,
  session 14). A throttled or cold reading lowers the bar every fraction is taken against; the
  best reading is what the device can do, so a fraction of it means one thing.
  """
  n = 8192
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
  x = jax.random.normal(jax.random.key(3), (1 << 30,), jnp.bfloat16)  # 2 GiB
  mm, cp = jax.jit(lambda a, b: a @ b), jax.jit(lambda x: x * 2)
  mm_all = list((before or {}).get("matmul_tflops_all", []))
  cp_all = list((before or {}).get("copy_GBps_all", []))
  for _ in range(rounds):
    mm_all.append(2 * n ** 3 / timeit(mm, [(a, b), (b, a)], reps=5, inner=10) / 1e12)
    cp_all.append(2 * (1 << 30) * 2 / timeit(cp, [(x,)], reps=5, inner=5) / 1e9)
  del a, b, x
  return {"matmul_tflops": max(mm_all), "copy_GBps": max(cp_all),
          "matmul_tflops_all": [round(v, 1) for v in mm_all],
          "copy_GBps_all": [round(v, 1) for v in cp_all]}


def run_meta() -> dict:
  dev = jax.devices()[0]
  from dllm_jax import model

  return {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
          "jax": jax.__version__, "date": datetime.date.today().isoformat(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "row_tma": dict(model.ROW_TMA)}


def save_json(name: str, results: dict) -> None:
  """Writes $OUT/name when $OUT is set, so a run cut short keeps what it measured."""
  out = os.environ.get("OUT")
  if out:
    with open(os.path.join(out, name), "w") as f:
      json.dump(results, f, indent=1)


def kernel_us(run, calls: int, width: int = 40) -> dict:
  """GPU us a call of each kernel (names cut to `width` characters) over `calls` calls made by
  `run()`, read off a profile: the figure for a launch too short for wall time, where one call's
  time is the host's dispatch."""
  events, _ = traced_gpu_events(run)
  per = collections.Counter()
  for name, s, e in events:
    per[name[:width]] += (e - s) / 1e3 / calls
  return dict(per)


def product_us(per: dict, *names: str) -> float:
  """The GPU us of `kernel_us`' kernels whose names hold any of `names`: a product's own launches
  without the copies and concatenations around it. An error when the profile holds none (a
  library kernel under another name, e.g. cuBLAS's nvjet_*), rather than a rate of zero time."""
  us = sum(v for k, v in per.items() if any(n in k for n in names))
  if us <= 0:
    raise ValueError(f"no kernel named like {names} in the profile: {sorted(per)}")
  return us


def error_text(e: BaseException, limit: int = 300) -> str:
  """One line for a benchmark row whose setting failed: the exception's type and the first
  `limit` characters of its first line (none for an exception without a message)."""
  return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:limit]}"


def traced_gpu_events(run):
  """Calls `run()` under `jax.profiler.trace` and reads the trace back: (events, lines), events
  the (name, start_ns, end_ns) of every kernel and copy on a GPU stream, sorted by start, and
  lines the number of events on each of the trace's GPU lines (to see what a trace did hold)."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      run()
    paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    if not paths:
      raise SystemExit(f"jax.profiler.trace wrote no *.xplane.pb under {d}: no profile to read")
    data = jax.profiler.ProfileData.from_file(paths[0])
  events, lines = [], collections.Counter()
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      evs = list(line.events)
      lines[f"{plane.name} | {line.name}"] += len(evs)
      if line.name.startswith("Stream"):
        events += [(e.name, e.start_ns, e.start_ns + e.duration_ns) for e in evs]
  return sorted(events, key=lambda e: e[1]), dict(lines)


def hlo_kernel_ops(hlo_text: str) -> dict:
  """{kernel name as a GPU trace names it: what it computes} from a compiled program's HLO text
  (`compiled.as_text()`): every fusion and custom call, by the op_name of the jax operation it
  came from (its last 120 characters) and its output shape, so that a profile's
  `loop_transpose_fusion_29` reads as the layer's attention combine. The trace writes the
  HLO's `.` as `_`."""
  import re

  pat = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) (?:fusion|custom-call)\((.*)$")
  ops = {}
  for line in hlo_text.splitlines():
    m = pat.match(line)
    if m:
      op = re.search(r'op_name="([^"]*)"', m.group(3))
      ops[m.group(1).replace(".", "_")] = f"{(op.group(1) if op else '')[-120:]} {m.group(2)}"
  return ops


def parse_row_tma(text: str) -> dict:
  """`--row-tma`'s value as `model.ROW_TMA`: "P" (both MLP launches' products on P; "triton":
  both `kernels.matvec`'s) or "gate_up=P,down=P" (a launch left out, or given "triton", is
  `kernels.matvec`'s), P one of `matvec_mgpu.PRODUCT_KINDS`."""
  import argparse

  from dllm_jax.kernels.matvec_mgpu import PRODUCT_KINDS

  launches, choices = ("gate_up", "down"), (*PRODUCT_KINDS, "triton")
  if text in choices:
    return dict.fromkeys(launches, None if text == "triton" else text)
  setting, named = dict.fromkeys(launches), set()
  for part in text.split(","):
    launch, _, products = part.strip().partition("=")
    if launch in named or launch not in launches or products not in choices:
      raise argparse.ArgumentTypeError(
          f"{part!r}: expected one of {choices}, or LAUNCH=PRODUCTS pairs joined by commas, "
          f"each LAUNCH once, LAUNCH in {launches} and PRODUCTS in {choices}")
    setting[launch] = None if products == "triton" else products
    named.add(launch)
  return setting


def add_row_tma_argument(ap, scope: str = "") -> None:
  """`--row-tma P | gate_up=P,down=P` on a decode benchmark's parser (`scope` prefixes its
  help, e.g. "jax part: "); `apply_row_tma` carries it out. A value is required: a bare flag
  meaning both launches on TMA would be the slowest setting measured (session 27)."""
  ap.add_argument("--row-tma", default=None, type=parse_row_tma,
                  help=f"{scope}model.ROW_TMA (default: the model's, gate_up=cuda_cores,"
                       "down=triton): the one-row step's gate/up and down by "
                       "kernels/matvec_mgpu.py's TMA launches (out_in weights only) with their "
                       "products on the given units (cuda_cores or wgmma), or both by Triton's "
                       "(triton); or per launch, e.g. gate_up=wgmma,down=triton")


def add_decode_model_arguments(ap, scope: str = "") -> None:
  """The model switches of the decode benchmarks (decode.py, decode_profile.py): --kernel-layout,
  --plain-dot, --no-row-attention and --row-tma (`scope` prefixes their help, e.g. "jax part:
  "); `apply_decode_model_arguments` carries them out."""
  from dllm_jax.config import KERNEL_LAYOUTS

  ap.add_argument("--kernel-layout", default="auto", choices=("auto",) + KERNEL_LAYOUTS,
                  help=f"{scope}model.kernel_layout: the projection kernels [*in, *out] or "
                       "[*out, *in]; auto: each mode and batch in model.decode_kernel_layout's "
                       "(out_in where the one-row kernels run), as decode.py")
  ap.add_argument("--plain-dot", action="store_true",
                  help=f"{scope}multiply a single row as one (model._matmul's baseline)")
  ap.add_argument("--no-row-attention", action="store_true",
                  help=f"{scope}model.ROW_ATTENTION off: the one-row step's RoPE, cache write "
                       "and split combine as XLA kernels around decode_attention (the baseline "
                       "of kernels/decode.row_attention)")
  add_row_tma_argument(ap, scope)


def apply_decode_model_arguments(ap, args) -> None:
  """Sets the model's switches from `add_decode_model_arguments`' flags; --plain-dot pins
  args.kernel_layout to in_out (its jnp.dot multiplies [K, N] weights)."""
  from dllm_jax import model

  if args.no_row_attention:
    model.ROW_ATTENTION = False
  apply_row_tma(args.row_tma)
  if args.plain_dot:
    if args.kernel_layout == "out_in":
      ap.error("--plain-dot multiplies [K, N] weights: --kernel-layout in_out only")
    args.kernel_layout = "in_out"
    model._matmul = jnp.dot


def apply_row_tma(setting) -> None:
  """model.ROW_TMA = `setting` (`--row-tma`'s value); None leaves the model's default."""
  from dllm_jax import model

  if setting is not None:
    model.ROW_TMA = dict(setting)
