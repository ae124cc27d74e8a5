"""Attention kernels vs XLA (and cuDNN) on one GPU: correctness first, then time.

    python benchmarks/attention.py [--quick] [--sections check,ceil,tune,train,decode]

Checks the compiled kernels against a float32 XLA reference (relative error), measures the bf16
matmul rate and device copy bandwidth of this GPU, then times training attention (forward, and
forward + backward) and decode attention. FLOPs count allowed (query, key) pairs only: forward
4 * pairs * D per head, backward 2.5x that (the FlashAttention convention; the recompute in the
backward kernels is not counted). Prints markdown tables; writes JSON to $OUT/attention.json
after every row when $OUT is set, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import ceilings as common_ceilings  # noqa: E402
from benchmarks.common import distinct_sets, kernel_us, timeit, traced_gpu_events  # noqa: E402
from dllm_jax import attention, masks
from dllm_jax.kernels import decode, flash, flash_mgpu

LEAN_CHECK = 4  # how many check cases of each kind run (--lean-check lowers it)
RESULTS = {"meta": {}, "check": [], "ceil": {}, "tune": [], "tune_decode": [], "train": [],
           "variants": [], "decode": []}
SHAPES = {"qwen2.5-1.5b": (12, 2, 128), "qwen2.5-7b": (28, 4, 128)}


def save():
  out = os.environ.get("OUT")
  if out:
    with open(os.path.join(out, "attention.json"), "w") as f:
      json.dump(RESULTS, f, indent=1)


def safe(fn):
  try:
    return fn()
  except Exception as e:  # OOM or an unsupported configuration: record it, go on
    msg = str(e).split("\n")[0][:160]
    return f"failed: {type(e).__name__}: {msg}"


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if not np.all(np.isfinite(x)):
    return float("nan")
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def layout_segments(b, length, spec, rng, packed, samples=3):
  """Segment ids [B, L], tiled over the streams: one sample per row, or `samples` per row when
  packed, cut at random block boundaries (as data.py packs: every sample padded to blocks)."""
  seg = np.zeros((b, length), np.int32)
  if packed:
    for i in range(b):
      cuts = rng.choice(np.arange(1, length // spec.block_size), samples - 1, replace=False)
      for c in sorted(cuts):
        seg[i, c * spec.block_size:] += 1
  return masks.layout_meta(spec, jnp.asarray(seg))


def allowed_pairs(spec, length):
  """Allowed (query, key) pairs of one row of the layout, single segment (exact count)."""
  pos, stream = masks.layout(spec, length)
  total = 0
  for i in range(0, pos.size, 1024):
    ok = masks.allowed(spec, pos[i:i + 1024, None], stream[i:i + 1024, None], 0,
                       pos[None, :], stream[None, :], 0)
    total += int(ok.sum())
  return total


# ------------------------------------------------------------------------------------------------


CHECK_CASES = [  # (kind, block, num_noisy, L, H, K, D, B, packed); the first two: GQA 6 and 7
    ("diffusion", 32, 1, 300, 12, 2, 128, 2, True),
    ("diffusion", 32, 2, 256, 28, 4, 128, 1, True),
    ("causal", 32, 1, 500, 6, 6, 64, 2, True),
    ("block_causal", 32, 1, 384, 14, 2, 64, 1, False),
]


def _check_inputs(case, rng, seed):
  """(spec, meta, q, k, v, ct) of a check case: bf16 q/k/v, a float32 cotangent."""
  kind, bs, nn_, length, h, kh, d, b, packed = case
  spec = masks.MaskSpec(kind, bs, nn_)
  meta = layout_segments(b, length, spec, rng, packed)
  t = meta.positions.shape[1]
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, h, d), jnp.bfloat16)
  k = jax.random.normal(keys[1], (b, t, kh, d), jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, t, kh, d), jnp.bfloat16)
  ct = jax.random.normal(keys[3], (b, t, h, d), jnp.float32)
  return spec, meta, q, k, v, ct


def check(tiles):
  """Compiled kernels vs float32 XLA reference on bf16 inputs."""
  rng = np.random.default_rng(0)
  for case in CHECK_CASES[:LEAN_CHECK]:
    kind, _, _, length, h, kh, d, b, packed = case
    spec, meta, q, k, v, ct = _check_inputs(case, rng, len(RESULTS["check"]))
    f32 = lambda x: x.astype(jnp.float32)
    # The default, beside the all-Triton kernels and the two dk/dv kernels named explicitly.
    fns = _train_fns(spec, meta, tiles)
    ours, ref, triton = (fns[n] for n in ("pallas", "xla", "triton"))
    grad = lambda f: _grad(f)(q, k, v, ct)
    out, out_triton = jax.jit(ours)(q, k, v), jax.jit(triton)(q, k, v)
    want = jax.jit(ref)(f32(q), f32(k), f32(v))
    g, g_triton = grad(ours), grad(triton)
    fused = ("mosaic_fused",) if d == 128 else ()  # fuse_dq: head_dim 128 only
    g_mosaic = {n: safe(lambda: grad(fns[n])) for n in ("mosaic_dkv", "triton_dkv", *fused)}
    gw = _grad(ref)(f32(q), f32(k), f32(v), ct)
    row = {"case": f"{kind}x{spec.num_streams} B={b} L={length} H={h}/{kh} D={d} packed={packed}",
           "out": rel_err(out, want), "dq": rel_err(g[0], gw[0]), "dk": rel_err(g[1], gw[1]),
           "dv": rel_err(g[2], gw[2]), "out_triton": rel_err(out_triton, want),
           "dq_triton": rel_err(g_triton[0], gw[0])}
    for n, gm in g_mosaic.items():  # explicit choices: reported, not part of "pass"
      if isinstance(gm, str):
        row[n] = gm
      else:
        row.update({f"d{x}_{n}": rel_err(gm[i], gw[i]) for i, x in enumerate("qkv")})
    row["pass"] = all(row[x] < 2e-2 for x in ("out", "dq", "dk", "dv", "out_triton", "dq_triton"))
    RESULTS["check"].append(row)
    print(row, flush=True)
    save()

  if LEAN_CHECK:
    pair_add_bits(tiles)
  for kind, tq, s, h, kh, b in [("block_causal", 8, 1024, 12, 2, 3),
                                ("block_causal", 32, 512, 28, 4, 2),
                                ("causal", 1, 256, 12, 2, 4)][:LEAN_CHECK]:
    spec = masks.MaskSpec(kind, 32)
    keys = jax.random.split(jax.random.key(100 + len(RESULTS["check"])), 3)
    q = jax.random.normal(keys[0], (b, tq, h, 128), jnp.bfloat16)
    kc = jax.random.normal(keys[1], (b, s, kh, 128), jnp.bfloat16)
    vc = jax.random.normal(keys[2], (b, s, kh, 128), jnp.bfloat16)
    start = jnp.asarray(rng.integers(0, s - tq + 1, b), jnp.int32)
    out = jax.jit(lambda *a: decode.decode_attention(*a, spec, **DECODE_KW))(q, kc, vc, start)
    qm = masks.TokenMeta.simple(start[:, None] + jnp.arange(tq)[None])
    km = masks.TokenMeta.simple(jnp.broadcast_to(jnp.arange(s), (b, s)))
    want = attention.xla_attention(q.astype(jnp.float32), kc.astype(jnp.float32),
                                   vc.astype(jnp.float32), masks.dense_mask(spec, qm, km))
    row = {"case": f"decode {kind} T={tq} S={s} H={h}/{kh} B={b}", "out": rel_err(out, want)}
    row["pass"] = row["out"] < 2e-2
    RESULTS["check"].append(row)
    print(row, flush=True)
    save()


def pair_add_bits(tiles):
  """`flash_mgpu.PAIR_ADD`'s exactness on the device: the gradients of the first check case
  (GQA 6, CTAs of 3 heads: two a KV head) with the two shares added by bf16 TMA reduce-adds, against
  the same with bf16 partials summed by XLA in float32. The adds' rounding is the hardware's
  here (the CPU test checks the interpreter's); any differing element fails the check."""
  spec, meta, q, k, v, ct = _check_inputs(CHECK_CASES[0], np.random.default_rng(0), 0)
  grads = {}
  for pair in (1, 0):
    with variant_knobs({"DKV_HEADS": 3, "PAIR_ADD": pair}, tiles) as v_tiles:
      grads[pair] = _grad(_train_fns(spec, meta, v_tiles)["pallas"])(q, k, v, ct)
  differ = {f"d{x}": int(jnp.sum(grads[1][i].view(jnp.uint16) != grads[0][i].view(jnp.uint16)))
            for i, x in enumerate("qkv")}
  row = {"case": "PAIR_ADD bits against the partials' (GQA 6, DKV_HEADS=3)",
         "elements_differing": differ, "pass": not any(differ.values())}
  RESULTS["check"].append(row)
  print(row, flush=True)
  save()


def profile_row(name, spec, length, tiles, impl="pallas", reps=5):
  """GPU time per kernel of one forward + backward of `ours` (jax.profiler trace, `reps` calls),
  so a change to one kernel is judged by its own share of the step."""
  h, kh, d = SHAPES[name]
  b = max(1, 8192 // length)
  meta = layout_segments(b, length, spec, np.random.default_rng(1), False, 1)
  args = _train_inputs(b, meta.positions.shape[1], h, kh, d, seed=10)
  g = _grad(_train_fns(spec, meta, tiles)[impl])
  jax.block_until_ready(g(*args))
  def run():
    for _ in range(reps):
      jax.block_until_ready(g(*args))

  per = kernel_us(run, reps, 80)
  row = {"impl": impl, "shape": name, "layout": f"{spec.kind}x{spec.num_streams}", "L": length,
         "B": b, "kernels_us": dict(sorted(per.items(), key=lambda kv: -kv[1])),
         "total_us": sum(per.values()), **idle_row(g, args, reps)}
  RESULTS.setdefault("profile", []).append(row)
  print(json.dumps(row, indent=1), flush=True)
  save()


def idle_row(g, args, calls):
  """Where the GPU idles between the kernels of `calls` calls of `g` issued back to back (as the
  wall-time figures issue them): span_us, the first kernel's start to the last one's end, and
  busy_us, the kernels' own time, each a call; idle_before_us, the idle time a call before each
  kernel (the gap from the previous kernel's end), the largest first. `g` has run already
  (`profile_row`'s warm-up), so no compile lands in the trace."""

  def run():
    out = None
    for _ in range(calls):
      out = g(*args)
    jax.block_until_ready(out)

  return idle_from_events(traced_gpu_events(run)[0], calls)


def idle_from_events(events, calls):
  """`idle_row`'s figures from (name, start_ns, end_ns) events sorted by start (kernels, and any
  copies and memsets on the GPU's streams; busy_us adds events of different streams that
  overlap, so it can pass span_us where streams run side by side)."""
  if not events:
    raise ValueError("the profile holds no GPU kernel: nothing to measure idle time between")
  idle, last_end = {}, events[0][2]
  for name, start, end in events[1:]:
    idle[name[:80]] = idle.get(name[:80], 0.0) + max(0, start - last_end) / 1e3 / calls
    last_end = max(last_end, end)
  return {"span_us": (last_end - events[0][1]) / 1e3 / calls,
          "busy_us": sum(e - s for _, s, e in events) / 1e3 / calls,
          "idle_before_us": dict(sorted(idle.items(), key=lambda kv: -kv[1]))}


def dq_row(name, spec, length, tiles, tag=None, like=None):
  """The dq kernels alone (each also computes delta): Triton's and Mosaic GPU's (`flash_mgpu.dq`,
  "auto"'s choice on sm_90 since session 42) on the forward's residuals, timed in one process, so
  a change to either is judged without the rest of the backward (the `dq` section). `like`: an
  earlier row of the same case whose kernels' dq this one's must equal (a `--dq-variants`
  variant against the first)."""
  h, kh, d = SHAPES[name]
  b = max(1, 8192 // length)
  meta = layout_segments(b, length, spec, np.random.default_rng(1), False, 1)
  seg = meta.segments
  sets = []
  for i in range(2):
    q, k, v, do = _train_inputs(b, meta.positions.shape[1], h, kh, d, seed=20 + i)
    o, lse = jax.jit(lambda q, k, v: flash._forward(q, k, v, seg, spec, length, tiles, False))(
        q, k, v)
    sets.append((q, k, v, o, do, lse))
  kernels = {
      "triton": lambda q, k, v, o, do, lse: flash._triton_dq(q, k, v, seg, o, do, lse, spec,
                                                             length, tiles, False, None),
      "mosaic": lambda q, k, v, o, do, lse: flash_mgpu.dq(q, k, v, seg, o, do, lse, spec,
                                                          length)}
  row = {"shape": name, "layout": f"{spec.kind}x{spec.num_streams}", "L": length, "B": b}
  if tag is not None:
    row.update(variant=tag, tiles=str(tiles))
  firsts = {}
  for impl, kernel in kernels.items():
    fn = jax.jit(kernel)
    dq0 = safe(lambda: fn(*sets[0])[0])
    if not isinstance(dq0, str):
      firsts[f"{impl}_dq0"] = dq0
      if like is not None and f"{impl}_dq0" in like:
        row[f"{impl}_err_vs_first"] = rel_err(dq0, like[f"{impl}_dq0"])
    if row.get(f"{impl}_err_vs_first", 0.0) > 1e-2:
      row[f"{impl}_us"] = "dq differs from the first variant's: not timed"
    else:
      t = safe(lambda: timeit(fn, sets, reps=5, inner=4))
      row[f"{impl}_us"] = t * 1e6 if isinstance(t, float) else t
  if all(isinstance(row.get(f"{i}_us"), float) for i in kernels):
    row["mosaic_vs_triton"] = row["triton_us"] / row["mosaic_us"]
  RESULTS.setdefault("dq", []).append(row)
  print(row, flush=True)
  save()
  return {**row, **firsts}


def _train_inputs(b, t, h, kh, d, seed):
  """Random bf16 (q, k, v, cotangent) of a training-attention case."""
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], (b, t, h, d), jnp.bfloat16),
          jax.random.normal(ks[1], (b, t, kh, d), jnp.bfloat16),
          jax.random.normal(ks[2], (b, t, kh, d), jnp.bfloat16),
          jax.random.normal(ks[3], (b, t, h, d), jnp.bfloat16))


def ceilings():
  """The device's two ceilings, merged with any measured earlier in this run (the best of all
  readings counts: `common.ceilings`); every fraction already recorded is taken again against
  them, so rows timed before a better reading do not read high."""
  RESULTS["ceil"].update(common_ceilings(before=RESULTS["ceil"]))
  mm, bw = RESULTS["ceil"]["matmul_tflops"], RESULTS["ceil"]["copy_GBps"]
  for key, rows in RESULTS.items():
    if not isinstance(rows, list):
      continue
    for r in rows:
      for f in [f for f in r if f.endswith("_frac")]:
        # "{impl}_bw_frac" is of "{impl}_GBps"; "{impl}_{fwd|fwdbwd}_frac" of "..._tflops"
        if f.endswith("_bw_frac"):
          src, ceil = f[:-len("_bw_frac")] + "_GBps", bw
        else:
          src, ceil = f[:-len("_frac")] + "_tflops", mm
        if isinstance(r.get(src), float):
          r[f] = r[src] / ceil
  print("ceilings", RESULTS["ceil"], flush=True)
  save()


def _train_fns(spec, meta, tiles):
  mask_fn = lambda: masks.dense_mask(spec, meta, meta)

  def ours(**changes):  # our kernels, with `tiles` changed by `changes` (checked when run, so
    # that a variant's Tiles that one of these changes would contradict fails only that impl)
    return lambda q, k, v: flash.block_sparse_attention(
        q, k, v, meta.segments, spec, dataclasses.replace(tiles, **changes))

  def xla(q, k, v):
    return attention.xla_attention(q, k, v, mask_fn())

  def cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask_fn()[:, None],
                                        implementation="cudnn")

  return {"pallas": ours(), "xla": xla, "cudnn": cudnn,
          # every kernel Triton's
          "triton": ours(forward="triton", dkv="triton", dq="triton", fuse_dq=False),
          # the dk/dv kernel named: Mosaic's (the default's choice on sm_90 for the diffusion
          # layouts at head_dim 128) or Triton's (the default's choice before session 12)
          "mosaic_dkv": ours(dkv="mosaic"), "triton_dkv": ours(dkv="triton", fuse_dq=False),
          # the Mosaic GPU dk/dv kernel accumulating dQ too (no dq kernel)
          "mosaic_fused": ours(dkv="mosaic", fuse_dq=True)}


def _grad(fn):
  return jax.jit(jax.grad(lambda q, k, v, ct: (fn(q, k, v) * ct).astype(jnp.float32).sum(),
                          (0, 1, 2)))


def train_row(name, spec, length, tiles, impls=("pallas", "triton", "xla", "cudnn"),
              record="train", batch=None, samples=1):
  """Times one case; `samples` > 1 packs that many samples into every row (random block-aligned
  cuts, seeded), and the allowed pairs then count only pairs of one sample."""
  h, kh, d = SHAPES[name]
  b = batch or max(1, 8192 // length)  # 8192 query positions per layout part: fills the GPU
  meta = layout_segments(b, length, spec, np.random.default_rng(samples), samples > 1, samples)
  t = meta.positions.shape[1]
  sets = [_train_inputs(b, t, h, kh, d, seed=10 + i) for i in range(2)]
  if samples > 1:
    pairs = int(jax.jit(lambda: masks.dense_mask(spec, meta, meta).sum())()) * h
  else:
    pairs = allowed_pairs(spec, length) * b * h
  fwd_flops = 4 * pairs * d
  mm = RESULTS["ceil"].get("matmul_tflops")
  fns = _train_fns(spec, meta, tiles)
  row = {"shape": name, "layout": f"{spec.kind}x{spec.num_streams}", "L": length, "T": t, "B": b,
         "samples": samples, "density": pairs / (b * h * t * t)}
  if record == "tune":
    row["tiles"] = str(tiles)
  for impl in impls:
    fn = fns[impl]
    fwd = jax.jit(fn)
    tf = safe(lambda: timeit(lambda q, k, v, ct: fwd(q, k, v), sets, reps=3, inner=3))
    g = _grad(fn)
    tb = safe(lambda: timeit(g, sets, reps=3, inner=3))
    row[f"{impl}_fwd_ms"] = tf * 1e3 if isinstance(tf, float) else tf
    row[f"{impl}_fwdbwd_ms"] = tb * 1e3 if isinstance(tb, float) else tb
    if isinstance(tf, float):
      row[f"{impl}_fwd_tflops"] = fwd_flops / tf / 1e12
      if mm:
        row[f"{impl}_fwd_frac"] = row[f"{impl}_fwd_tflops"] / mm
    if isinstance(tb, float):
      row[f"{impl}_fwdbwd_tflops"] = 3.5 * fwd_flops / tb / 1e12
      if mm:
        row[f"{impl}_fwdbwd_frac"] = row[f"{impl}_fwdbwd_tflops"] / mm
  RESULTS[record].append(row)
  print(row, flush=True)
  save()
  return row


DECODE_KW = {}  # tuning knobs of decode.decode_attention chosen by the decode tuning step


def parse_variants(text):
  """'name:KNOB=v,KNOB=v;name2:...' -> [(name, {KNOB: value})]: `flash_mgpu`'s module constants
  (the Mosaic kernels' experiment knobs, e.g. PAIR_ADD, FUSED_GROUP, DKV_HEADS), `flash`'s
  as flash.KNOB (e.g. flash.DELTA_IN_DQ), both integers, or a field of the timed `flash.Tiles`
  as tiles.FIELD (e.g. tiles.forward=triton; typed as the field is, `tiles_value`), the variant's
  Tiles checked as `flash.Tiles` checks them."""
  out = []
  for part in filter(None, text.split(";")):
    name, _, knobs = part.partition(":")
    kv = {}
    for item in filter(None, knobs.split(",")):
      k, _, v = item.partition("=")
      if k.startswith("tiles."):
        kv[k] = tiles_value(part, k[len("tiles."):], v)
        continue
      module, attr = knob_place(k)
      if not hasattr(module, attr) or not attr.isupper():
        raise SystemExit(f"--variants {part!r}: {module.__name__} has no knob {attr!r}")
      if not v.lstrip("-").isdigit():
        raise SystemExit(f"--variants {part!r}: {k}={v!r} is not an integer (booleans: 0/1)")
      kv[k] = int(v)
    fields = {k[len("tiles."):]: v for k, v in kv.items() if k.startswith("tiles.")}
    try:  # Tiles' own checks, before any GPU time is spent on the variant
      flash.Tiles(**fields)
    except ValueError as e:
      raise SystemExit(f"--variants {part!r}: {e}") from None
    out.append((name, kv))
  return out


def tiles_value(part, field, text):
  """A `tiles.FIELD=text` knob's value, typed as the `flash.Tiles` field is (booleans as 0/1 or
  true/false), so that 'fuse_dq=False' is not the truthy string 'False'."""
  types = {f.name: f.type for f in dataclasses.fields(flash.Tiles)}
  if field not in types:
    raise SystemExit(f"--variants {part!r}: flash.Tiles has no field {field!r}")
  kind = types[field] if isinstance(types[field], str) else types[field].__name__
  if kind == "bool":
    if text.lower() not in ("0", "1", "true", "false"):
      raise SystemExit(f"--variants {part!r}: tiles.{field}={text!r} is not a boolean "
                       "(0/1, true/false)")
    return text.lower() in ("1", "true")
  if kind == "int":
    if not text.lstrip("-").isdigit():
      raise SystemExit(f"--variants {part!r}: tiles.{field}={text!r} is not an integer")
    return int(text)
  return text


def add_baseline_forward(path):
  """Makes `flash_mgpu.BASELINE_FORWARD` a variant knob: with it 1, the forward is the one in the
  module at `path` (an earlier revision's flash_mgpu.py, e.g. `git show REV:dllm_jax/kernels/
  flash_mgpu.py > old.py`), so an earlier kernel is timed in the same run as the current one."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("baseline_flash_mgpu", path)
  old = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(old)
  current = flash_mgpu.forward
  flash_mgpu.BASELINE_FORWARD = 0

  def forward(*args, **kw):
    return (old.forward if flash_mgpu.BASELINE_FORWARD else current)(*args, **kw)

  flash_mgpu.forward = forward


def check_grads(impls, tiles, tag):
  """Outputs and gradients of `impls` against the float32 XLA reference on the two diffusion
  check cases (packed, GQA 6 and 7), as `check` does for the default; a variant is timed only if
  exact."""
  rng = np.random.default_rng(7)
  ok = True
  for case in CHECK_CASES[:2]:
    kind, _, nn_, length, h, kh, d, b, _ = case
    spec, meta, q, k, v, ct = _check_inputs(case, rng, 1000 + len(RESULTS["check"]))
    f32 = lambda x: x.astype(jnp.float32)
    fns = _train_fns(spec, meta, tiles)
    gw = _grad(fns["xla"])(f32(q), f32(k), f32(v), ct)
    want = jax.jit(fns["xla"])(f32(q), f32(k), f32(v))
    row = {"case": f"{tag} {kind}x{nn_} B={b} L={length} H={h}/{kh} D={d} packed"}
    for impl in impls:
      out = safe(lambda: jax.jit(fns[impl])(q, k, v))
      row[f"out_{impl}"] = out if isinstance(out, str) else rel_err(out, want)
      ok &= isinstance(row[f"out_{impl}"], float) and row[f"out_{impl}"] < 2e-2
      g = safe(lambda: _grad(fns[impl])(q, k, v, ct))
      if isinstance(g, str):
        row[impl] = g
        ok = False
        continue
      row.update({f"d{x}_{impl}": rel_err(g[i], gw[i]) for i, x in enumerate("qkv")})
      ok &= all(row[f"d{x}_{impl}"] < 2e-2 for x in "qkv")
    row["pass"] = ok
    RESULTS["check"].append(row)
    print(row, flush=True)
    save()
  return ok


def knob_place(knob):
  """(module, name) of a --variants knob: flash.NAME is `flash`'s, any other `flash_mgpu`'s."""
  return (flash, knob[len("flash."):]) if knob.startswith("flash.") else (flash_mgpu, knob)


@contextlib.contextmanager
def variant_knobs(knobs, base_tiles):
  """Sets a variant's module knobs (jax's caches cleared) and yields its Tiles (the base with the
  variant's tiles.FIELD values); the knobs are restored after."""
  tiles = dataclasses.replace(base_tiles, **{k[len("tiles."):]: v for k, v in knobs.items()
                                             if k.startswith("tiles.")})
  knobs = {k: v for k, v in knobs.items() if not k.startswith("tiles.")}
  old = {k: getattr(*knob_place(k)) for k in knobs}
  try:
    for k, v in knobs.items():
      setattr(*knob_place(k), v)
    jax.clear_caches()
    yield tiles
  finally:
    for k, v in old.items():
      setattr(*knob_place(k), v)
    jax.clear_caches()


def variant_shapes(text):
  """--variant-shapes 'qwen2.5-1.5b,...' -> the SHAPES keys it names (all when empty)."""
  names = tuple(filter(None, text.split(","))) or tuple(SHAPES)
  unknown = [n for n in names if n not in SHAPES]
  if unknown:
    raise SystemExit(f"--variant-shapes: unknown {unknown}; expected some of {list(SHAPES)}")
  return names


def variant_rows(variants, tiles, impls, profile, shapes=tuple(SHAPES)):
  """For each variant: its knobs set, its gradients checked, then the L=2048 cases of `shapes`
  (both layouts) timed (and profiled) with `impls`."""
  for name, knobs in variants:
    with variant_knobs(knobs, tiles) as v_tiles:
      if not check_grads(impls, v_tiles, name):
        print(f"variant {name}: not exact, not timed", flush=True)
        continue
      for nn_ in (1, 2):
        for shape in shapes:
          spec = masks.MaskSpec("diffusion", 32, nn_)
          row = train_row(shape, spec, 2048, v_tiles, impls=impls, record="variants")
          row["variant"] = name
          row["tiles"] = str(v_tiles)
          if profile:
            for impl in impls:
              profile_row(shape, spec, 2048, v_tiles, impl)
              RESULTS["profile"][-1]["variant"] = name
          save()


def dq_variant_rows(variants, tiles, shapes=tuple(SHAPES)):
  """The `dq` section under --dq-variants: the dq kernels alone (`dq_row`) under each variant's
  knobs on the L=2048 cases of `shapes` (3L first); a variant's dq must equal the first's on the
  same inputs before it is timed."""
  first = {}
  for i, (name, knobs) in enumerate(variants):
    with variant_knobs(knobs, tiles) as v_tiles:
      for nn_ in (2, 1):
        for shape in shapes:
          spec = masks.MaskSpec("diffusion", 32, nn_)
          row = dq_row(shape, spec, 2048, v_tiles, tag=name, like=first.get((shape, nn_)))
          if i == 0:
            first[(shape, nn_)] = row


def decode_row(name, s, b, tq=8, kw=None, record="decode"):
  """One decode step's attention; n_sets calls on distinct caches inside one executable, so
  neither L2 hits nor host dispatch enter the time (the model runs a step as one executable)."""
  h, kh, d = SHAPES[name]
  kw = DECODE_KW if kw is None else kw
  spec = masks.MaskSpec("block_causal", 32)
  start = jnp.full((b,), s - tq, jnp.int32)  # last sub-block of the last block: all S slots seen
  kv_bytes = 2 * b * s * kh * d * 2
  n_sets = distinct_sets(kv_bytes)
  sets = []
  for i in range(n_sets):
    ks = jax.random.split(jax.random.key(50 + i), 3)
    sets.append((jax.random.normal(ks[0], (b, tq, h, d), jnp.bfloat16),
                 jax.random.normal(ks[1], (b, s, kh, d), jnp.bfloat16),
                 jax.random.normal(ks[2], (b, s, kh, d), jnp.bfloat16)))
  qm = masks.TokenMeta.simple(start[:, None] + jnp.arange(tq)[None])
  km = masks.TokenMeta.simple(jnp.broadcast_to(jnp.arange(s), (b, s)))
  ours = lambda q, k, v: decode.decode_attention(q, k, v, start, spec, **kw)
  xla = lambda q, k, v: attention.xla_attention(q, k, v, masks.dense_mask(spec, qm, km))
  copy_bw = RESULTS["ceil"].get("copy_GBps")
  row = {"shape": name, "S": s, "B": b, "T": tq}
  if record == "tune_decode":
    row["kw"] = str(kw)
  for impl, fn in (("pallas", ours), ("xla", xla)):
    if record == "tune_decode" and impl == "xla":
      continue
    many = jax.jit(lambda all_sets: [fn(*x) for x in all_sets])
    t = safe(lambda: timeit(many, [(sets,)], reps=5, inner=2))
    if isinstance(t, float):
      t /= n_sets
      row[f"{impl}_us"] = t * 1e6
      row[f"{impl}_GBps"] = kv_bytes / t / 1e9
      if copy_bw:
        row[f"{impl}_bw_frac"] = row[f"{impl}_GBps"] / copy_bw
    else:
      row[f"{impl}_us"] = t
  RESULTS.setdefault(record, []).append(row)
  print(row, flush=True)
  save()
  return row


def fmt(x, digits=2):
  return f"{x:.{digits}f}" if isinstance(x, float) else ("-" if x is None else str(x)[:40])


def tables():
  print("\n### Correctness (compiled, bf16 inputs vs float32 XLA reference, relative L2 error)")
  print("| case | out | dq | dk | dv | out, Triton only | dq, Triton only | pass |\n"
        + "|---" * 8 + "|")
  for r in RESULTS["check"]:
    if "out" not in r:  # a variant's check (`check_grads`): below
      continue
    print(f"| {r['case']} | " + " | ".join(fmt(r.get(x), 5) for x in ("out", "dq", "dk", "dv",
                                                                         "out_triton", "dq_triton"))
          + f" | {r['pass']} |")
  for r in RESULTS["check"]:
    if "elements_differing" in r:  # `pair_add_bits`
      print(f"\n{r['case']}: elements differing {r['elements_differing']}, pass {r['pass']}")
  variant_checks = [r for r in RESULTS["check"] if "out" not in r and "elements_differing" not in r]
  if variant_checks:
    print("\n### Variants' correctness (relative L2 error against the float32 XLA reference)")
    print("| case | impl | out | dq | dk | dv | pass |\n" + "|---" * 7 + "|")
    for r in variant_checks:
      for impl in [f[len("out_"):] for f in r if f.startswith("out_")]:
        print(f"| {r['case']} | {impl} | " + " | ".join(
            fmt(r.get(f"{x}_{impl}", r.get(impl)), 5) for x in ("out", "dq", "dk", "dv"))
              + f" | {r['pass']} |")
  print(f"\nceilings: {RESULTS['ceil']}")
  for key in ("tune", "train", "variants"):
    if not RESULTS.get(key):
      continue
    print(f"\n### {key}: time ms (TFLOP/s on allowed pairs, fraction of matmul rate)")
    print("| shape | layout | L | B | samples | density | impl | fwd ms | fwd TFLOP/s | frac |"
          " fwd+bwd ms | fwd+bwd TFLOP/s | frac | xla/pallas fwd | xla/pallas fwd+bwd |")
    print("|" + "---|" * 15)
    for r in RESULTS[key]:
      for impl in [f[:-len("_fwd_ms")] for f in r if f.endswith("_fwd_ms")]:
        sf = sb = "-"
        if impl == "pallas" and isinstance(r.get("xla_fwd_ms"), float):
          sf = fmt(r["xla_fwd_ms"] / r["pallas_fwd_ms"]) if isinstance(r["pallas_fwd_ms"], float) else "-"
        if impl == "pallas" and isinstance(r.get("xla_fwdbwd_ms"), float):
          sb = (fmt(r["xla_fwdbwd_ms"] / r["pallas_fwdbwd_ms"])
                if isinstance(r["pallas_fwdbwd_ms"], float) else "-")
        label = impl + (f" {r['tiles']}" if key == "tune" and impl == "pallas" else "")
        label = f"{r['variant']}: {label}" if "variant" in r else label
        print(f"| {r['shape']} | {r['layout']} | {r['L']} | {r['B']} | {r.get('samples', 1)} | "
              f"{r['density']:.3f} | "
              f"{label} | {fmt(r[f'{impl}_fwd_ms'], 3)} | {fmt(r.get(f'{impl}_fwd_tflops'), 1)} | "
              f"{fmt(r.get(f'{impl}_fwd_frac'))} | {fmt(r[f'{impl}_fwdbwd_ms'], 3)} | "
              f"{fmt(r.get(f'{impl}_fwdbwd_tflops'), 1)} | {fmt(r.get(f'{impl}_fwdbwd_frac'))} | "
              f"{sf} | {sb} |")
  for r in RESULTS["tune_decode"]:
    print(f"decode tune {r['kw']}: {fmt(r['pallas_us'], 1)} us, {fmt(r.get('pallas_GBps'), 0)} GB/s, "
          f"{fmt(r.get('pallas_bw_frac'))} of copy")
  if RESULTS["decode"]:
    print("\n### decode (block_causal, T=8 sub-block at the end of the cache)")
    print("| shape | S | B | pallas us | GB/s | frac copy | xla us | GB/s | frac copy | speedup |")
    print("|" + "---|" * 10)
    for r in RESULTS["decode"]:
      sp = (fmt(r["xla_us"] / r["pallas_us"]) if isinstance(r.get("xla_us"), float)
            and isinstance(r.get("pallas_us"), float) else "-")
      print(f"| {r['shape']} | {r['S']} | {r['B']} | {fmt(r['pallas_us'], 1)} | "
            f"{fmt(r.get('pallas_GBps'), 0)} | {fmt(r.get('pallas_bw_frac'))} | {fmt(r['xla_us'], 1)} | "
            f"{fmt(r.get('xla_GBps'), 0)} | {fmt(r.get('xla_bw_frac'))} | {sp} |")


# Rows 0-4 tune the Triton dk/dv kernel, so they name it (the default picks Mosaic's on sm_90).
TUNE = [  # forward 128 rows, 2 stages: the default until session 6
    flash.Tiles(128, 64, 64, 64, 64, 64, dkv_head_split=1, num_stages=2, dkv="triton"),
    # ncu (NOTES_attention.md): the dk/dv kernel's SMs were idle ~40% of its time; by the tile
    # plan its heaviest program (an early clean key tile, 6 heads x 64 query tiles) outlasts a
    # fair share of the GPU (inferred); splitting the group's heads over programs shortens it.
    flash.Tiles(128, 64, 64, 64, 64, 64, dkv_head_split=2, num_stages=2, dkv="triton"),
    flash.Tiles(128, 64, 64, 64, 64, 64, dkv_head_split=3, num_stages=2, dkv="triton"),
    # best of run 3:
    flash.Tiles(128, 64, 64, 64, 128, 64, num_warps_dkv=8, dkv_head_split=1, num_stages=2,
                dkv="triton"),
    flash.Tiles(128, 64, 64, 64, 128, 64, num_warps_dkv=8, dkv_head_split=2, num_stages=2,
                dkv="triton"),
    flash.Tiles(),  # the default: session 6's tiles; since session 12 dkv='auto'
]
# A wider sweep of the training kernels' tiles, warps and pipeline depths (`--sections sweep`):
# each against the defaults of session 5 (`_T`) on the 1.5B 2L case, the first four also on the
# 7B 3L case. Its `block_q=64, num_stages=3` row is the default since session 6.
_T = flash.Tiles(block_q=128, num_stages=2, dkv="triton")
SWEEP = [
    _T, dataclasses.replace(_T, num_warps=8),
    dataclasses.replace(_T, num_warps=8, num_stages=3),
    dataclasses.replace(_T, block_k=128, num_warps=8), dataclasses.replace(_T, num_stages=3),
    dataclasses.replace(_T, block_q=64, num_stages=3),
    dataclasses.replace(_T, block_q=64, block_k=128),
    dataclasses.replace(_T, block_q_dq=128, num_warps_bwd=8),
    dataclasses.replace(_T, num_stages_bwd=3), dataclasses.replace(_T, block_k_dq=128),
    dataclasses.replace(_T, block_q_dq=128, block_k_dq=32, num_warps_bwd=8),
]
# Session 8, on the H200: knobs around the current default `Tiles()` (64-row forward, 3 stages;
# 64x64 dq and dk/dv tiles, 2 stages, dk/dv heads split in two), `--sections sweep8`, on the
# 1.5B 2L and 7B 3L cases at L=2048. Deeper pipelines for every kernel, and for the dk/dv kernel
# the shape of Triton's own fused-attention tutorial (32 query rows against 128 keys).
_D = flash.Tiles(dkv="triton")  # the Triton kernels' knobs
SWEEP_S8 = [
    _D, dataclasses.replace(_D, num_stages=4), dataclasses.replace(_D, num_stages=2),
    dataclasses.replace(_D, block_k=32, num_stages=4),
    dataclasses.replace(_D, block_q=128, num_warps=8),
    dataclasses.replace(_D, num_stages_bwd=3),
    dataclasses.replace(_D, block_q_dkv=32, block_k_dkv=128, num_warps_dkv=8),
    dataclasses.replace(_D, block_q_dkv=32, block_k_dkv=128, num_warps_dkv=8, num_stages_bwd=3),
    dataclasses.replace(_D, block_q_dkv=32),
    dataclasses.replace(_D, block_k_dq=32, num_stages_bwd=3),
]
DECODE_TUNE = [  # the default (one wave) and, from benchmarks/decode_kernel.py, its closest rivals
    {},
    {"block_k": 64, "programs": 528, "num_stages": 3},
    {"block_k": 128, "programs": 528, "num_stages": 3},
    {"block_k": 64, "programs": 264, "num_stages": 3},
]


def tiles_to_time(index: int) -> flash.Tiles:
  """TUNE[index], or without one the library's default kernels: session 28 timed TUNE[0]
  (Triton's dk/dv) on an H100 by leaving --tiles out, and took it for the default."""
  return TUNE[index] if index >= 0 else flash.Tiles()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sections", default="check,ceil,tune,train,decode",
                  help="also: profile (GPU time per kernel of fwd+bwd at L=2048), dq (the Triton "
                       "and Mosaic dq kernels alone at L=2048), sweep, "
                       "sweep8 (SWEEP's or SWEEP_S8's tiles on two cases; give ceil with them)")
  ap.add_argument("--quick", action="store_true", help="L=2048 2L and decode S=4096 only")
  ap.add_argument("--lengths", default="2048,1024,4096", help="training-attention lengths L")
  ap.add_argument("--packed", type=int, default=0,
                  help="also time rows packing this many samples each (pallas only)")
  ap.add_argument("--tiles", type=int, default=-1,
                  help="index into TUNE to use without tuning (default: flash.Tiles(), the "
                       "library's own, TUNE[5])")
  ap.add_argument("--lean-check", type=int, default=4, help="check cases of each kind to run")
  ap.add_argument("--variants", default="",
                  help="with --sections variants: 'name:KNOB=v,...;name2:...', flash_mgpu's knobs "
                       "per variant (e.g. 'base:;sum:PAIR_ADD=0'); each is checked, then "
                       "timed on the four L=2048 cases with --impls (profiled too with profile)")
  ap.add_argument("--variant-shapes", default="",
                  help="the variants and dq sections' head shapes, e.g. qwen2.5-1.5b "
                       "(default: all)")
  ap.add_argument("--dq-variants", default="",
                  help="with --sections dq: variants as --variants takes them (e.g. "
                       "'base:;w8:tiles.block_q_dq=128,tiles.num_warps_bwd=8'), each timing "
                       "the two dq kernels alone on the four L=2048 cases")
  ap.add_argument("--baseline-forward", metavar="FILE",
                  help="an earlier flash_mgpu.py whose forward the variant knob "
                       "BASELINE_FORWARD=1 times (e.g. 'old:BASELINE_FORWARD=1')")
  ap.add_argument("--tables-from", help="print the tables of an earlier run's JSON and exit")
  ap.add_argument("--impls", default="pallas,triton,xla,cudnn",
                  help="training-attention implementations to time (also: mosaic_dkv / "
                       "triton_dkv, the default with Tiles(dkv='mosaic' / 'triton'); "
                       "mosaic_fused, Tiles(dkv='mosaic', fuse_dq=True))")
  args = ap.parse_args()
  if args.tables_from:
    with open(args.tables_from) as f:
      RESULTS.update(json.load(f))
    print(RESULTS["meta"])
    tables()
    return
  global LEAN_CHECK
  LEAN_CHECK = args.lean_check
  shapes = variant_shapes(args.variant_shapes)  # (a bad name fails here, before any section)
  if args.baseline_forward:
    add_baseline_forward(args.baseline_forward)
  sections = args.sections.split(",")
  RESULTS["meta"] = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                     "argv": sys.argv}
  print(RESULTS["meta"], flush=True)
  tiles = tiles_to_time(args.tiles)
  if "check" in sections:  # with split dk/dv heads: the path with more to get wrong
    check(dataclasses.replace(tiles, dkv_head_split=2))
  if "ceil" in sections:
    ceilings()
  if "tune" in sections and args.tiles < 0:
    spec = masks.MaskSpec("diffusion", 32, 1)
    best = None
    for cand in TUNE:
      r = train_row("qwen2.5-1.5b", spec, 2048, cand, impls=("pallas",), record="tune")
      score = r["pallas_fwdbwd_ms"] if isinstance(r["pallas_fwdbwd_ms"], float) else 1e9
      if best is None or score < best[0]:
        best = (score, cand)
    tiles = best[1]
    RESULTS["meta"]["tiles"] = str(tiles)
    best = None
    for kw in DECODE_TUNE:
      r = decode_row("qwen2.5-1.5b", 4096, 32, kw=kw, record="tune_decode")
      score = r["pallas_us"] if isinstance(r["pallas_us"], float) else 1e9
      if best is None or score < best[0]:
        best = (score, kw)
    DECODE_KW.update(best[1])
    RESULTS["meta"]["decode_kw"] = dict(DECODE_KW)
  if "sweep" in sections:
    for cand in SWEEP:
      train_row("qwen2.5-1.5b", masks.MaskSpec("diffusion", 32, 1), 2048, cand,
                impls=("pallas",), record="tune")
    for cand in SWEEP[:4]:
      train_row("qwen2.5-7b", masks.MaskSpec("diffusion", 32, 2), 2048, cand,
                impls=("pallas",), record="tune")
  if "sweep8" in sections:
    for name, spec in (("qwen2.5-1.5b", masks.MaskSpec("diffusion", 32, 1)),
                       ("qwen2.5-7b", masks.MaskSpec("diffusion", 32, 2))):
      for cand in SWEEP_S8:
        train_row(name, spec, 2048, cand, impls=("pallas",), record="tune")
  if "train" in sections:
    lengths = (2048,) if args.quick else tuple(int(x) for x in args.lengths.split(","))
    for length in lengths:
      for nn_ in (1, 2):
        for name in SHAPES:
          train_row(name, masks.MaskSpec("diffusion", 32, nn_), length, tiles,
                    impls=tuple(args.impls.split(",")))
          if args.packed > 1:
            train_row(name, masks.MaskSpec("diffusion", 32, nn_), length, tiles,
                      impls=("pallas",), samples=args.packed)
  if "variants" in sections:
    variant_rows(parse_variants(args.variants), tiles, tuple(args.impls.split(",")),
                 profile="profile" in sections, shapes=shapes)
  if "profile" in sections and "variants" not in sections:
    for nn_ in (1, 2):
      for name in SHAPES:
        for impl in args.impls.split(","):
          if impl not in ("xla", "cudnn"):
            profile_row(name, masks.MaskSpec("diffusion", 32, nn_), 2048, tiles, impl)
  if "dq" in sections and args.dq_variants:
    dq_variant_rows(parse_variants(args.dq_variants), tiles, shapes)
  elif "dq" in sections:
    for nn_ in (2, 1):  # 3L first
      for name in shapes:
        dq_row(name, masks.MaskSpec("diffusion", 32, nn_), 2048, tiles)
  if "decode" in sections:
    for name, lens in (("qwen2.5-1.5b", (4096,) if args.quick else (512, 1024, 2048, 4096, 8192)),
                       ("qwen2.5-7b", (4096,))):
      for s in lens:
        for b in (1, 32):
          decode_row(name, s, b)
  if "ceil" in sections and len(sections) > 1:  # again after the rows: the best reading counts
    ceilings()
  tables()


if __name__ == "__main__":
  main()
