"""Launches each attention kernel a few times, warm, so Nsight Compute can read its counters.

    ncu --clock-control none -k regex:NAME --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight ... python benchmarks/ncu_attention.py --case train|decode|row

Shapes are the benchmark's headline cases: training, Qwen2.5-1.5B heads (12/2, D=128), the
diffusion 2L layout at L=2048, batch 4 (kernels block_sparse_attention_fwd/_dq/_dkv); decode,
the same heads, an 8-token sub-block at the end of a 4096-slot cache, batch 32
(decode_attention); row, the batch-1 one-token step's `row_attention` at position 575 of a
640-slot cache (the decode_profile case), its q/k/v parts in 3 splits as the q/k/v launch leaves
them, as the model runs it: its splits left for the o launch (`combined_matvec_partials`, also
launched) to combine, or with `--row-combine` combining them itself (the launch profiled in
BENCHMARKS.md session 22: 8.5 us under ncu, a chain of latencies at one warp a scheduler).
Nothing is timed here.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks.attention import SHAPES  # noqa: E402
from dllm_jax import masks  # noqa: E402
from dllm_jax.kernels import decode, flash, matvec  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--case", choices=["train", "decode", "row"], required=True)
  ap.add_argument("--row-splits", type=int, default=0,
                  help="row case: row_attention's splits (0: its default)")
  ap.add_argument("--row-combine", action="store_true",
                  help="row case: row_attention combines its own splits (atomic counter)")
  ap.add_argument("--calls", type=int, default=3)
  ap.add_argument("--num-warps-dkv", type=int, default=0, help="flash.Tiles.num_warps_dkv")
  ap.add_argument("--dkv-head-split", type=int, default=flash.Tiles().dkv_head_split,
                  help="flash.Tiles.dkv_head_split (1: the unsplit kernel of the ncu table)")
  ap.add_argument("--dkv", default="triton", choices=["triton", "mosaic", "auto"],
                  help="flash.Tiles.dkv (triton: the kernel the two knobs above tune)")
  ap.add_argument("--knobs", default="",
                  help="module knobs as attention.py --variants takes them: 'KNOB=v,flash.X=v'")
  args = ap.parse_args()
  if args.knobs:
    from benchmarks.attention import knob_place, parse_variants

    for k, v in parse_variants(f"knobs:{args.knobs}")[0][1].items():
      setattr(*knob_place(k), v)
  h, kh, d = SHAPES["qwen2.5-1.5b"]
  ks = jax.random.split(jax.random.key(0), 4)
  if args.case == "train":
    b, length = 4, 2048
    spec = masks.MaskSpec("diffusion", 32, 1)
    meta = masks.layout_meta(spec, jnp.zeros((b, length), jnp.int32))
    t = meta.positions.shape[1]
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, t, kh, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, kh, d), jnp.bfloat16)
    ct = jax.random.normal(ks[3], (b, t, h, d), jnp.bfloat16)
    tiles = flash.Tiles(num_warps_dkv=args.num_warps_dkv, dkv_head_split=args.dkv_head_split,
                        dkv=args.dkv)
    attn = lambda q, k, v: flash.block_sparse_attention(q, k, v, meta.segments, spec, tiles)
    fn = jax.jit(jax.grad(lambda q, k, v: (attn(q, k, v) * ct).astype(jnp.float32).sum(),
                          (0, 1, 2)))
    call = lambda: fn(q, k, v)
  elif args.case == "row":
    slots, pos, parts = 640, 575, 3
    kc = jax.random.normal(ks[1], (slots, kh, d), jnp.bfloat16)
    vc = jax.random.normal(ks[2], (slots, kh, d), jnp.bfloat16)
    qp, kp, vp = (jax.random.normal(k, (parts, n, d)) for k, n in
                  zip(jax.random.split(ks[0], 3), (h, kh, kh)))
    cos = sin = jnp.full((d // 2,), 0.5, jnp.float32)
    w_o = jax.random.normal(ks[3], (h * d, 1536), jnp.bfloat16)  # the 1.5B o: [H * D, E]

    def row(qp, kp, vp, kc, vc):
      counter = jnp.zeros((kh,), jnp.int32) if args.row_combine else None
      out = decode.row_attention(
          qp, kp, vp, jnp.ones((16,)), cos, sin, kc, vc, counter, jnp.array([pos]),
          masks.MaskSpec("causal"), dtype=jnp.bfloat16, splits=args.row_splits or None,
          combine=args.row_combine)[0]
      if args.row_combine:
        return out
      return matvec.combined_matvec_partials(*out, w_o, dtype=jnp.bfloat16)  # the o launch
    fn = jax.jit(row)
    call = lambda: fn(qp, kp, vp, kc, vc)
  else:
    b, s, tq = 32, 4096, 8
    spec = masks.MaskSpec("block_causal", 32)
    start = jnp.full((b,), s - tq, jnp.int32)
    q = jax.random.normal(ks[0], (b, tq, h, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, kh, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, kh, d), jnp.bfloat16)
    fn = jax.jit(lambda q, k, v: decode.decode_attention(q, k, v, start, spec))
    call = lambda: fn(q, k, v)
  for _ in range(args.calls):
    jax.block_until_ready(call())


if __name__ == "__main__":
  main()
