"""Where an AR decode step's time goes on the GPU: kernels per step, the GPU's busy time, the gaps.

    python benchmarks/decode_profile.py [--shape qwen2.5-1.5b] [--batch 1] [--layout per_layer]

Times `generate(mode="ar")` (random bf16 weights, 512-token prompt) without the profiler, then
runs it once under `jax.profiler.trace` and reads the trace back (`jax.profiler.ProfileData`):
every kernel and copy on the GPU's streams between the first and the last of the run. Per step
(the whole call, the 512-token prefill included, over its steps): the wall time, how many
kernels, how long the GPU was busy (union of their intervals; the traced span also holds the
profiler's own stalls), and the kernels that take the most time, each with the jax op it came
from (the compiled HLO's op_name, `common.hlo_kernel_ops`); and about one step's kernel
sequence. A step whose busy time is far below its wall time is paced by the host
launching kernels, not by the GPU; run it under different `XLA_FLAGS` (command buffers) to see
what they change. JSON to $OUT/decode_profile[_TAG].json.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import (add_decode_model_arguments, apply_decode_model_arguments,  # noqa: E402
                               ceilings, hlo_kernel_ops, random_params, run_meta, save_json,
                               traced_gpu_events)
from benchmarks.decode import PROMPT, SHAPES, forward_loop  # noqa: E402
from dllm_jax import decoding, model  # noqa: E402


def _busy_ns(events):
  busy, end = 0.0, float("-inf")
  for _, s, e in events:
    if e > end:
      busy += e - max(s, end)
      end = e
  return busy


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--new", type=int, default=128, help="new tokens (steps) per generate call")
  ap.add_argument("--prompt", type=int, default=PROMPT, help="prompt tokens (the prefill)")
  ap.add_argument("--layout", default="per_layer", choices=model.LAYOUTS)
  ap.add_argument("--impl", default="pallas", choices=["pallas", "xla"])
  ap.add_argument("--matvec", default="xla", choices=["xla", "pallas", "auto"],
                  help="model.matvec_impl: the one-row projections (kernels/matvec.py)")
  ap.add_argument("--forward", type=int, default=0,
                  help="T > 0: profile one forward of T tokens (a diffusion block or sub-block, "
                       "block-causal, blocks of 32) against the cache after the prompt, run "
                       "--new times, instead of AR generate; per step = per forward")
  ap.add_argument("--diffusion", choices=["dual", "nodual"], default=None,
                  help="profile diffusion generate (threshold 1.0: a token a round, --new "
                       "rounds), with or without the DualCache, instead of AR; per step = per "
                       "round")
  ap.add_argument("--tag", default="", help="suffix of the JSON file name (one per XLA_FLAGS)")
  ap.add_argument("--no-ceilings", action="store_true")
  ap.add_argument("--decode-programs", type=int, default=0,
                  help="the decode kernel's `programs` knob (0: its default)")
  ap.add_argument("--matvec-knobs", default="",
                  help="knobs of kernels/matvec.norm_matvec for both of a layer's launches, "
                       "e.g. 'block_k=256,num_stages=4'")
  ap.add_argument("--matvec-pair-knobs", default="",
                  help="knobs of the gate/up launch alone (silu_pair), over --matvec-knobs")
  ap.add_argument("--matvec-partial-knobs", default="",
                  help="knobs of the down launch (matvec_partials; the o launch's too "
                       "without row_attention), e.g. 'splits=4'")
  ap.add_argument("--o-knobs", default="",
                  help="knobs of the o launch that combines row_attention's splits "
                       "(combined_matvec_partials), e.g. 'block_n=64'")
  ap.add_argument("--row-attention-knobs", default="",
                  help="knobs of kernels/decode.row_attention, e.g. 'splits=2,block_k=32'")
  add_decode_model_arguments(ap)
  args = ap.parse_args()
  if args.forward and args.diffusion:
    ap.error("--forward and --diffusion each profile a loop of their own: give one")
  apply_decode_model_arguments(ap, args)
  if args.row_attention_knobs:
    from dllm_jax.kernels import decode as decode_kernels

    if (args.no_row_attention or args.matvec == "xla" or args.impl == "xla" or args.batch != 1
        or args.forward or args.layout == "stacked"
        or args.prompt + args.new > decode_kernels.ROW_MAX_SLOTS):
      ap.error("--row-attention-knobs tune row_attention, which runs only in the AR step at "
               "--batch 1 with --matvec auto|pallas, --impl pallas, the per-layer layout, a "
               f"cache of at most {decode_kernels.ROW_MAX_SLOTS} slots (--prompt + --new) and "
               "without --no-row-attention")

    knobs = {}
    for item in filter(None, args.row_attention_knobs.split(",")):
      key, _, value = item.partition("=")
      if key not in ("splits", "block_k", "num_warps", "num_stages") or not value.isdigit():
        ap.error(f"--row-attention-knobs: {item!r} is not splits|block_k|num_warps|num_stages"
                 "=INT")
      knobs[key] = int(value)
    decode_kernels.row_attention = functools.partial(decode_kernels.row_attention, **knobs)
  if args.matvec_knobs or args.matvec_pair_knobs or args.matvec_partial_knobs or args.o_knobs:
    from benchmarks.matvec import KNOBS, PARTIAL_KNOBS, parse_knobs
    from dllm_jax.kernels import matvec

    def one(text, flag, allowed=KNOBS):
      settings = parse_knobs(text, flag, allowed)
      if len(settings) > 1:
        ap.error(f"{flag}: one knob setting expected, got {text!r}")
      return settings[0] if settings else {}

    knobs = one(args.matvec_knobs, "--matvec-knobs")
    pair = one(args.matvec_pair_knobs, "--matvec-pair-knobs")
    plain = matvec.norm_matvec

    def tuned(*a, silu_pair=False, **kw):
      return plain(*a, silu_pair=silu_pair, **{**kw, **knobs, **(pair if silu_pair else {})})

    matvec.norm_matvec = tuned
    matvec.matvec_partials = functools.partial(
        matvec.matvec_partials,
        **one(args.matvec_partial_knobs, "--matvec-partial-knobs", PARTIAL_KNOBS))
    matvec.combined_matvec_partials = functools.partial(
        matvec.combined_matvec_partials, **one(args.o_knobs, "--o-knobs", PARTIAL_KNOBS))
  if args.plain_dot:
    args.tag = args.tag or "_plaindot"  # never overwrite the default run's JSON
  if args.decode_programs:
    from dllm_jax import kernels

    kernels.decode_attention = functools.partial(kernels.decode_attention,
                                                 programs=args.decode_programs)

  cfg = dataclasses.replace(SHAPES[args.shape], attention_impl=args.impl,
                            matvec_impl=args.matvec)
  if args.kernel_layout == "auto":
    args.kernel_layout = model.decode_kernel_layout(
        cfg, mode="diffusion" if args.forward or args.diffusion else "ar", batch=args.batch,
        stacked=args.layout == "stacked")
  cfg = dataclasses.replace(cfg, kernel_layout=args.kernel_layout)
  params = jax.jit(lambda r: model.with_layout(random_params(cfg, r), args.layout))(
      jax.random.key(0))
  pbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
  res = {"meta": run_meta(), "args": vars(args), "param_bytes": pbytes}
  if not args.no_ceilings:
    res["ceil"] = ceilings()
  b = args.batch
  if args.forward:
    run = forward_loop(cfg, params, b, args.forward, args.prompt, args.new,
                       args.layout != "stacked")
  else:
    prompt = jax.random.randint(jax.random.key(1), (b, args.prompt), 0, 32000)
    lens = jnp.full((b,), args.prompt, jnp.int32)
    dcfg = decoding.DecodeConfig(mode="ar", max_new_tokens=args.new)
    if args.diffusion:
      dcfg = decoding.DecodeConfig(mode="diffusion", max_new_tokens=args.new, threshold=1.0,
                                   use_dual_cache=args.diffusion == "dual")
    fn = jax.jit(lambda p, t, l, r: decoding.generate(p, cfg, t, l, r, dcfg))
    compiled = fn.lower(params, prompt, lens, jax.random.key(2)).compile()
    run = lambda i: compiled(params, prompt, lens, jax.random.key(2 + i))
    run.hlo_text = compiled.as_text
  out = jax.block_until_ready(run(0))  # the warm-up
  if not args.forward:  # (to compare runs that should decode alike)
    res["first_tokens"] = [int(t) for t in out[0][0, :16]]
  # AR and diffusion: the prefill is generate's first iteration.
  steps = args.new if args.forward else int(out[2]["iterations"]) - 1
  times = []
  for i in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(run(1 + i))
    times.append(time.perf_counter() - t0)
  res["wall_s"] = statistics.median(times)

  events, lines = traced_gpu_events(lambda: jax.block_until_ready(run(7)))
  res["trace_lines"] = lines
  if not events:
    res["error"] = "no GPU stream events in the trace"
    save_json(f"decode_profile{args.tag}.json", res)
    print(res)
    return
  ops = hlo_kernel_ops(run.hlo_text())  # what each kernel computes, by its jax op
  span = events[-1][2] - events[0][1]
  busy = _busy_ns(events)
  per_name = collections.defaultdict(lambda: [0, 0.0])
  for name, s, e in events:
    per_name[name][0] += 1
    per_name[name][1] += e - s
  top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:25]
  gaps = [max(0, events[i + 1][1] - events[i][2]) for i in range(len(events) - 1)]
  # About one step's events, from the middle of the run (where a step starts is not marked).
  per_step = len(events) / steps
  mid = len(events) // 2
  window = events[mid:mid + int(round(per_step))]
  res.update({
      "steps": steps,
      "wall_ms_per_step": res["wall_s"] / steps * 1e3,
      "floor_ms_per_step": pbytes / (res["ceil"]["copy_GBps"] * 1e9) * 1e3 if "ceil" in res else None,
      "traced_span_ms_per_step": span / steps / 1e6,
      "gpu_busy_ms_per_step": busy / steps / 1e6,
      "gpu_idle_ms_per_step": (span - busy) / steps / 1e6,
      "events_per_step": per_step,
      "gap_us_quantiles": [g / 1e3 for g in statistics.quantiles(gaps, n=10)] if len(gaps) > 10
                          else None,
      "top_kernels": [{"name": n[:160], "count_per_step": c / steps,
                       "us_per_step": t / steps / 1e3, "us_each": t / c / 1e3,
                       "op": ops.get(n, "")}
                      for n, (c, t) in top],
      "one_step": [{"name": n[:100], "us": (e - s) / 1e3,
                    "gap_before_us": (s - window[i - 1][2]) / 1e3 if i else None}
                   for i, (n, s, e) in enumerate(window)],
  })
  save_json(f"decode_profile{args.tag}.json", res)
  keys = ("steps", "wall_ms_per_step", "floor_ms_per_step", "traced_span_ms_per_step",
          "gpu_busy_ms_per_step", "gpu_idle_ms_per_step", "events_per_step", "gap_us_quantiles")
  print({k: res[k] for k in keys})
  for t in res["top_kernels"][:15]:
    print(f"  {t['us_per_step']:8.1f} us/step  {t['count_per_step']:6.1f}x  {t['name'][:40]}  "
          f"{t['op'][-90:]}")


if __name__ == "__main__":
  main()
