"""The one-row step's MLP launches on TMA (`kernels.matvec_mgpu`, #7) against the Triton launches
they would replace and XLA's GEMM on the same out-major weights, in one run.

    python benchmarks/matvec_tma.py [--shape qwen2.5-1.5b]
        [--pair-knobs 'PER_SM,SLOTS,DEFER,WGMMA;...']
        [--down-knobs 'SPLITS,SLOTS,DEFER,WGMMA[,PER_SM];...'] [--no-probe]

Gate/up: `matvec.norm_matvec(silu_pair=True, out_major=True)` (Triton) and
`matvec_mgpu.silu_pair` at each (CTAs an SM, slots, DEFER, WGMMA), both with the residual add of the
float32 parts the o launch leaves and the RMSNorm, as the model runs them; XLA's GEMM of the one
row by gate and up as one [2F, E] weight (the bare product: the streaming rate to reach). Down:
`matvec.matvec_partials` (its default splits) and `matvec_mgpu.matvec_parts` at each (splits,
slots, DEFER, WGMMA[, CTAs an SM: 1, the launch's default]), XLA's one-row GEMM. DEFER (1/0) is
`matvec_mgpu`'s `defer_sum`, WGMMA (1/0) its `products` ("wgmma" or "cuda_cores"). `--no-probe`
drops the tensor-core probe: the same plan and ring of slots with the products as wgmma (the
weight tile as A, the row repeated 8 times as a transposed B; GPU only, no add or norm), which
tells whether the CUDA-core products of `matvec_mgpu` hold the stream back.

Each output is checked on a fresh row against a float32 XLA reference (largest difference over
2e-2 of the largest value: not timed). Each row's figures, over 16 weight sets (no L2 hits):
`wall_us`, wall time a launch from calls of all 16 queued back to back (launch gaps included,
as in the model's step); `us`, the GPU us of a call's product kernels read off a profile, where
the profile holds them (in session 26 it held none of the Mosaic GPU launches'); each also as
the weights' read rate over the copy rate of the same run. JSON to $OUT/matvec_tma.json.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from benchmarks.common import (ceilings, error_text, kernel_us, product_us, run_meta,  # noqa: E402
                               save_json, timeit)

SETS, ROUNDS = 16, 4
PRODUCTS = ("cuda_cores", "wgmma")  # by the WGMMA knob
N8 = 8  # wgmma's smallest N


def probe(x_K, g_NK, u_NK, *, ctas=132, slots=4):
  """SiLU(g @ x) * (u @ x) as bf16 [N, 8] (every column the product), g and u out-major [N, K]:
  `matvec_mgpu`'s plan and ring of slots with the products on the tensor cores, the weight tile
  as wgmma's A (M = the run's rows, padded to 64) and the row repeated 8 times (N = 8, wgmma's
  smallest) as a transposed B. GPU only: the CPU interpreter has no transposed operand."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from dllm_jax.kernels.matvec_mgpu import BK, _padded, _swizzled, row_plan

  n, k = g_NK.shape
  nk = k // BK
  n_big, big, small = row_plan(n, ctas)
  mpad = _padded(big)
  dtype = g_NK.dtype

  def kernel(x_ref, g_ref, u_ref, o_ref, x_s, w_s, o_s, x_bar, g_bar, u_bar):
    c = lax.axis_index("cta")
    plgpu.copy_gmem_to_smem(x_ref, x_s, x_bar.at[0])

    def run(rows, r0):
      m = _padded(rows)

      def fetch(i, slot):
        cols = pl.ds(i * BK, BK)
        plgpu.copy_gmem_to_smem(g_ref.at[pl.ds(r0, rows), cols],
                                w_s.at[slot, 0, pl.ds(0, rows)], g_bar.at[slot])
        plgpu.copy_gmem_to_smem(u_ref.at[pl.ds(r0, rows), cols],
                                w_s.at[slot, 1, pl.ds(0, rows)], u_bar.at[slot])

      for s in range(min(slots, nk)):
        fetch(s, s)
      plgpu.barrier_wait(x_bar.at[0])

      def scope(acc_g, acc_u):
        @pl.loop(0, nk)
        def _(i):
          slot = lax.rem(i, slots)
          b = x_s.at[:, pl.ds(i * BK, BK)].transpose((1, 0))
          plgpu.barrier_wait(g_bar.at[slot])
          plgpu.wgmma(acc_g, w_s.at[slot, 0, pl.ds(0, m)], b)
          plgpu.barrier_wait(u_bar.at[slot])
          plgpu.wgmma(acc_u, w_s.at[slot, 1, pl.ds(0, m)], b)
          plgpu.wgmma_wait(0)
          pl.when(i + slots < nk)(lambda: fetch(i + slots, slot))

        g, u = acc_g[...], acc_u[...]
        o_s[pl.ds(0, m)] = ((g * jax.nn.sigmoid(g)) * u).astype(dtype)

      pl.run_scoped(scope, plgpu.ACC((m, N8), jnp.float32), plgpu.ACC((m, N8), jnp.float32))
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_s.at[pl.ds(0, rows)], o_ref.at[pl.ds(r0, rows)])
      plgpu.wait_smem_to_gmem(0)

    if n_big:
      pl.when(c < n_big)(lambda: run(big, c * big))
    if small:
      pl.when(c >= n_big)(lambda: run(small, n_big * big + (c - n_big) * small))

  kernel.__name__ = "mv_tma_wg"
  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((n, N8), dtype),
      scratch_types=[plgpu.SMEM((N8, k), dtype, **_swizzled()),
                     plgpu.SMEM((slots, 2, mpad, BK), dtype, **_swizzled()),
                     plgpu.SMEM((mpad, N8), dtype),
                     plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_barriers=slots),
                     plgpu.Barrier(num_barriers=slots)],
      grid=(ctas,), grid_names=("cta",),
  )(jnp.broadcast_to(x_K[None], (N8, k)), g_NK, u_NK)


def reference(x_K, g_NK, u_NK):
  """float32 SiLU(g @ x) * (u @ x)."""
  f = lambda w: jnp.dot(w.astype(jnp.float32), x_K.astype(jnp.float32))
  g, u = f(g_NK), f(u_NK)
  return g * jax.nn.sigmoid(g) * u


def _knobs(text: str, names: tuple[str, ...], optional: dict | None = None) -> list[dict]:
  """'A,B;C,D' as [{names[0]: A, names[1]: B}, ...], non-negative integers; `optional`'s
  names (with their defaults) may follow `names` in an item."""
  optional = optional or {}
  every = (*names, *optional)
  out = []
  for item in filter(None, (t.strip() for t in text.split(";"))):
    parts = item.split(",")
    if (not len(names) <= len(parts) <= len(every)
        or not all(p.strip().isdigit() for p in parts)):
      raise SystemExit(f"{item!r} is not {','.join(n.upper() for n in names)}"
                       f"{''.join(f'[,{n.upper()}]' for n in optional)} (integers)")
    out.append({**optional, **dict(zip(every, map(int, parts)))})
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shape", default="qwen2.5-1.5b")
  ap.add_argument("--pair-knobs", default="2,4,1,0;2,4,0,0;2,4,0,1;2,3,1,0;2,6,1,0;1,4,1,0;"
                  "1,4,0,1", help="silu_pair's (CTAs an SM, slots, defer_sum, wgmma) settings")
  ap.add_argument("--down-knobs", default="4,12,1,0;4,12,0,0;4,12,0,1;4,8,1,0;4,16,1,0;2,12,1,0",
                  help="matvec_parts' (splits, slots, defer_sum, wgmma[, CTAs an SM: 1]) "
                       "settings")
  ap.add_argument("--parts", type=int, default=0,
                  help="float32 parts of the added row (default: what the model's o launch "
                       "leaves, matvec.pick_splits of the attention output)")
  ap.add_argument("--no-probe", action="store_true")
  args = ap.parse_args()
  pair_knobs = _knobs(args.pair_knobs, ("per_sm", "slots", "defer", "wgmma"))
  down_knobs = _knobs(args.down_knobs, ("splits", "slots", "defer", "wgmma"), {"per_sm": 1})
  if any(k[n] < 1 for k in pair_knobs + down_knobs for n in ("slots", "per_sm", "splits")
         if n in k):
    ap.error("CTAs an SM, slots and splits are positive")
  from benchmarks.decode import SHAPES
  from dllm_jax.kernels import matvec, matvec_mgpu
  from dllm_jax.kernels.decode import sm_count

  cfg = SHAPES[args.shape]
  e, f = cfg.hidden_size, cfg.intermediate_size
  n_parts = args.parts or matvec.pick_splits(cfg.num_heads * cfg.head_dim, e)
  ceil = ceilings(rounds=2)
  bw = ceil["copy_GBps"] * 1e9
  res = {"meta": dict(run_meta(), argv=sys.argv[1:]), "ceil": ceil, "parts": n_parts,
         "rows": []}
  print(ceil, flush=True)
  key = iter(jax.random.split(jax.random.key(0), 4 * SETS + 8))
  bf = jnp.bfloat16
  x = jax.random.normal(next(key), (e,), bf)
  parts = 0.3 * jax.random.normal(next(key), (n_parts, e), jnp.float32)
  scale = (1 + 0.2 * jax.random.normal(next(key), (e,))).astype(bf)
  act = jax.random.normal(next(key), (f,), bf)
  w = lambda shape, k: (shape[1] ** -0.5 * jax.random.normal(k, shape)).astype(bf)
  pairs = [(w((f, e), next(key)), w((f, e), next(key))) for _ in range(SETS)]
  downs = [w((e, f), next(key)) for _ in range(SETS)]
  joined = [jnp.concatenate(p, 0) for p in pairs]  # [2F, E]: XLA's pair as one GEMM
  nt = lambda a, m: lax.dot_general(a[None], m, (((1,), (1,)), ((), ())))[0]  # a @ m.T
  sms = sm_count()
  norm = dict(add_E=parts, norm_scale_E=scale, eps=cfg.rms_norm_eps)
  # (name, knobs, op, run(row) over the weight sets, output of set 0 -> [N] or parts [S, N])
  bare = lambda o: jax.nn.silu(o[:f].astype(jnp.float32)) * o[f:].astype(jnp.float32)
  runs = [("xla_gate_up", {}, "bare", lambda v: [nt(v, m) for m in joined], bare),
          ("triton_gate_up", {}, "gate_up", lambda v: [matvec.norm_matvec(
              v, p, silu_pair=True, out_major=True, **norm)[0][0] for p in pairs], None)]
  for kn in pair_knobs:
    kw = dict(ctas=matvec_mgpu.default_pair_ctas(f, kn["per_sm"], sms), slots=kn["slots"],
              defer_sum=bool(kn["defer"]), products=PRODUCTS[bool(kn["wgmma"])])
    runs.append(("tma_gate_up", kw, "gate_up", lambda v, kw=kw: [
        matvec_mgpu.silu_pair(v, *p, **norm, **kw)[0] for p in pairs], None))
  if not args.no_probe:
    runs.append(("probe_wg", {"ctas": sms, "slots": 4}, "bare", lambda v: [
        probe(v, *p, ctas=sms, slots=4) for p in pairs], lambda o: o[:, 0]))
  runs += [("xla_down", {}, "down", lambda v: [nt(v, m) for m in downs], None),
           ("triton_down", {"splits": matvec.pick_splits(f, e)}, "down", lambda v: [
               matvec.matvec_partials(v, m, out_major=True) for m in downs], None)]
  for kn in down_knobs:
    kw = dict(splits=kn["splits"], slots=kn["slots"], defer_sum=bool(kn["defer"]),
              products=PRODUCTS[bool(kn["wgmma"])],
              ctas=matvec_mgpu.default_parts_ctas(e, kn["splits"], kn["per_sm"] * sms))
    runs.append(("tma_down", kw, "down", lambda v, kw=kw: [
        matvec_mgpu.matvec_parts(v, m, **kw) for m in downs], None))
  # Each output is checked on a row of its own against an XLA float32 reference (a kernel that
  # left rows unwritten could otherwise pass on a buffer the previous row's kernel had filled).
  f32 = lambda a: a.astype(jnp.float32)
  refs = {"bare": lambda v: reference(v, *pairs[0]),
          "gate_up": lambda v: f32(matvec.norm_matvec_reference(
              v, [p.T for p in pairs[0]], silu_pair=True, **norm)[0][0]),
          "down": lambda v: jnp.dot(f32(downs[0]), f32(v))}
  names = ("gemm", "nvjet", "cutlass", "norm_matvec", "matvec_partials", "silu_pair_tma",
           "matvec_parts_tma", "mv_tma")
  for i, (impl, kw, op, run, view) in enumerate(runs):
    row = {"impl": impl, "op": "down" if op == "down" else "gate_up", "knobs": kw, "E": e,
           "F": f}
    fn = jax.jit(run)
    try:
      v = jax.random.normal(jax.random.key(1000 + i), (f if op == "down" else e,), bf)
      got = fn(v)[0]
      got = view(got) if view else got
      if got.ndim == 2:  # split-K parts
        got = got.sum(0)
      ref = refs[op](v)
      row["max_rel_err"] = float(jnp.max(jnp.abs(f32(got) - ref)) / jnp.max(jnp.abs(ref)))
      if not row["max_rel_err"] <= 2e-2:  # (NaN fails too)
        raise ValueError(f"wrong output: {row['max_rel_err']:.3g} of the largest value")
      xs = x if row["op"] == "gate_up" else act
      weight_bytes = 2 * (2 if row["op"] == "gate_up" else 1) * e * f
      row["wall_us"] = 1e6 * timeit(fn, [(xs,)]) / SETS
      row["wall_of_copy"] = weight_bytes / (row["wall_us"] * 1e-6) / bw
      try:
        per = kernel_us(lambda: [jax.block_until_ready(fn(xs)) for _ in range(ROUNDS)],
                        ROUNDS * SETS)
        row["kernels_us"] = per
        row["us"] = product_us(per, *names)
        row["of_copy"] = weight_bytes / (row["us"] * 1e-6) / bw
      except ValueError as err:  # the profile held none of the Mosaic GPU launches (session 26)
        row["profile_error"] = error_text(err)
    except Exception as err:  # a setting that does not compile or fit is recorded
      row["error"] = error_text(err)
    print({k: v for k, v in row.items() if k != "kernels_us"}, flush=True)
    res["rows"].append(row)
    save_json("matvec_tma.json", res)


if __name__ == "__main__":
  main()
