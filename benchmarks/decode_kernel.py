"""Decode-attention kernel: tuning knobs against the read bound of its own access pattern.

    python benchmarks/decode_kernel.py [--shape qwen2.5-1.5b] [--cache 4096] [--batch 32]
    python benchmarks/decode_kernel.py --cache 512,2048,8192 --batch 1,8,32 \
        --variants default,"bk64 p132"    # a grid of cases, chosen variants only

`decode.decode_attention` moves the K and V slots its queries may see once. How close it gets
to the copy bandwidth depends on how many programs share the cache, tile size, pipelining
depth and what the partial outputs cost; this sweeps those, and times a kernel with the same
grid and loads that only sums what it reads (what the loads alone cost; it also writes a float32
sum per program, so it is a reference, not a bound). Every figure is the time of one call inside
an executable that runs the call on several distinct caches (more bytes than L2 holds, no host
dispatch per call), beside the copy bandwidth measured in the same run. JSON to
$OUT/decode_kernel.json.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from benchmarks.attention import SHAPES  # noqa: E402
from benchmarks.common import (ceilings, distinct_sets, error_text, run_meta,  # noqa: E402
                               save_json, timeit)
from dllm_jax import masks  # noqa: E402
from dllm_jax.kernels import decode  # noqa: E402


def read_bound(q_BTHD, k_BSKD, v_BSKD, *, block_k=64, programs=None, num_warps=4, num_stages=3,
               interpret=False):
  """The decode kernel's grid and K/V loads with the arithmetic left out: every program sums
  the K and V tiles of its split into one [block_k, D] float32 tile."""
  b, t, h, d = q_BTHD.shape
  s, kv_heads = k_BSKD.shape[1], k_BSKD.shape[2]
  num_kv_tiles = s // block_k
  splits, per = decode.plan_splits(num_kv_tiles, b * kv_heads, programs)

  def kernel(k_ref, v_ref, o_ref):
    lo = pl.program_id(0) * per
    hi = jnp.minimum(lo + per, num_kv_tiles)

    def body(j, acc):
      first = pl.multiple_of(j * block_k, block_k)
      return (acc + k_ref[pl.ds(first, block_k), :].astype(jnp.float32)
              + v_ref[pl.ds(first, block_k), :].astype(jnp.float32))

    o_ref[...] = lax.fori_loop(lo, hi, body, jnp.zeros((block_k, d), jnp.float32))

  return pl.pallas_call(
      kernel, grid=(splits, b, kv_heads),
      in_specs=[pl.BlockSpec((None, s, None, d), lambda sp, bi, ki: (bi, 0, ki, 0))] * 2,
      out_specs=pl.BlockSpec((None, None, None, block_k, d),
                             lambda sp, bi, ki: (sp, bi, ki, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((splits, b, kv_heads, block_k, d), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="decode_read_bound")(k_BSKD, v_BSKD)


def make_sets(shape, s, b, tq, head_major_cache=False):
  h, kh, d = SHAPES[shape]
  kv_bytes = 2 * b * s * kh * d * 2
  sets = []
  for i in range(distinct_sets(kv_bytes)):
    ks = jax.random.split(jax.random.key(50 + i), 3)
    q = jax.random.normal(ks[0], (b, tq, h, d), jnp.bfloat16)
    kc = jax.random.normal(ks[1], (b, s, kh, d), jnp.bfloat16)
    vc = jax.random.normal(ks[2], (b, s, kh, d), jnp.bfloat16)
    if head_major_cache:  # stored that way: the fold is not part of the timed call
      fold = lambda x: x.transpose(0, 2, 1, 3).reshape(b * kh, s, 1, d)
      q = q.reshape(b, tq, kh, h // kh, d).transpose(0, 2, 1, 3, 4).reshape(b * kh, tq, h // kh, d)
      kc, vc = fold(kc), fold(vc)
    sets.append((q, kc, vc))
  return sets, kv_bytes


def time_call(fn, sets):
  many = jax.jit(lambda all_sets: [fn(*x) for x in all_sets])
  return timeit(many, [(sets,)], reps=5, inner=3) / len(sets)


VARIANTS = [  # (name, kwargs of decode_attention)
    ("default", {}),  # one wave (decode.RESIDENT_PER_SM programs per SM) since session 8
    ("bk64 p528", {"programs": decode.TARGET_PROGRAMS}),  # the default until session 8
    ("f32 partials", {"partial_dtype": jnp.float32}),
    ("bk128 p264 st2", {"block_k": 128, "programs": 264, "num_stages": 2}),
    ("bk64 p264", {"programs": 264}),
    ("bk64 p132", {"programs": 132}),
    ("bk64 p1056", {"programs": 1056}),
    ("bk64 p64 (one split)", {"programs": 1}),
    ("bk64 st4", {"num_stages": 4}),
    ("bk64 st2", {"num_stages": 2}),
    ("bk32 st4", {"block_k": 32, "num_stages": 4}),
    ("bk128 st3", {"block_k": 128}),
    ("bk64 w8", {"num_warps": 8}),
    ("bk64 w2", {"num_warps": 2}),
    # A group's rows over several programs (each reads the same K/V, from L2 when the programs
    # run side by side): more programs without splitting the cache, so fewer or no partials.
    ("rows16 one split", {"block_rows": 16, "programs": 1}),
    ("rows16 p384", {"block_rows": 16, "programs": 384}),
    ("rows16 p528", {"block_rows": 16}),
    ("rows32 one split", {"block_rows": 32, "programs": 1}),
    ("rows16 one split bk128 st2", {"block_rows": 16, "programs": 1, "block_k": 128,
                                    "num_stages": 2}),
]


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
  ap.add_argument("--cache", default="4096", help="cache length(s), comma-separated")
  ap.add_argument("--batch", default="32", help="batch size(s), comma-separated")
  ap.add_argument("--queries", type=int, default=8)
  ap.add_argument("--variants", default="",
                  help="comma-separated names from VARIANTS (default: all, with the read bound "
                       "and head-major rows)")
  args = ap.parse_args()
  names = dict(VARIANTS)
  chosen = [v for v in args.variants.split(",") if v]
  unknown = [v for v in chosen if v not in names]
  if unknown:
    ap.error(f"--variants: unknown {unknown}; known: {sorted(names)}")
  caches = [int(x) for x in args.cache.split(",")]
  batches = [int(x) for x in args.batch.split(",")]
  tq = args.queries
  spec = masks.MaskSpec("block_causal", 32)
  res = {"meta": run_meta(), "ceil": ceilings(), "shape": args.shape, "T": tq, "rows": []}
  if len(caches) == len(batches) == 1:  # the single-case layout of earlier runs' JSON
    res.update(S=caches[0], B=batches[0])
  copy = res["ceil"]["copy_GBps"]
  print(res["meta"], res["ceil"], flush=True)
  for s in caches:
    for b in batches:
      start = jnp.full((b,), s - tq, jnp.int32)  # last sub-block: every slot is seen
      sets, kv_bytes = make_sets(args.shape, s, b, tq)

      def record(name, fn, these=sets, s=s, b=b, kv_bytes=kv_bytes):
        try:
          t = time_call(fn, these)
          row = {"variant": name, "S": s, "B": b, "us": t * 1e6, "GBps": kv_bytes / t / 1e9,
                 "frac_copy": kv_bytes / t / 1e9 / copy}
        except Exception as e:  # an unsupported knob setting is recorded, the sweep goes on
          row = {"variant": name, "S": s, "B": b,
                 "error": error_text(e, 160)}
        res["rows"].append(row)
        print(row, flush=True)
        save_json("decode_kernel.json", res)

      if not chosen:
        for bk, st in ((64, 3), (128, 2), (64, 4)):
          record(f"read bound bk{bk} st{st}",
                 lambda q, k, v, bk=bk, st=st: read_bound(q, k, v, block_k=bk, num_stages=st))
      for name in chosen or names:
        record(name, lambda q, k, v, kw=names[name], start=start:
               decode.decode_attention(q, k, v, start, spec, **kw))
      if not chosen:
        hm_sets, _ = make_sets(args.shape, s, b, tq, head_major_cache=True)
        hm_start = jnp.repeat(start, SHAPES[args.shape][1])
        record("head-major cache, default",
               lambda q, k, v: decode.decode_attention(q, k, v, hm_start, spec), hm_sets)
        record("head-major read bound bk64 st3", lambda q, k, v: read_bound(q, k, v), hm_sets)
      del sets
  print("\n| S | B | variant | us | GB/s | frac of copy |\n|---|---|---|---|---|---|")
  for r in res["rows"]:
    if "us" in r:
      print(f"| {r['S']} | {r['B']} | {r['variant']} | {r['us']:.1f} | {r['GBps']:.0f} | "
            f"{r['frac_copy']:.2f} |")
    else:
      print(f"| {r['S']} | {r['B']} | {r['variant']} | {r['error']} | | |")


if __name__ == "__main__":
  main()
