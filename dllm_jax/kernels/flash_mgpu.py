"""The block-sparse training forward in Mosaic GPU (Hopper): warp-specialised, TMA + wgmma.

Same contract as `flash._forward` (padded q [B, Tp, H, D], k/v [B, Tp, K, D], seg [B, Tp];
returns o and the base-2 log-sum-exp [B, H, Tp]), so `flash`'s Triton backward runs on its
residuals unchanged. Why a second forward: Pallas' Triton lowering runs each program's softmax
and tensor-core work in sequence and stayed at 0.42-0.46 of the matmul rate on the H200; this
kernel follows jax's `attention_mgpu` (FlashAttention-3's schedule): one CTA is two consumer
warpgroups of 64 query rows, which take turns on the tensor cores (a schedule barrier) so one's
softmax overlaps the other's matmuls, and a producer warpgroup that streams the planned K/V tiles
into two shared-memory slots by TMA.

The plan is `flash`'s, at 128-row outer tiles: `visit_runs` narrowed by `segment_runs`, then
flattened per (batch row, outer tile) into one list of key tiles, full ones first
(`visit_list`). The producer copies that row of the plan into shared memory and walks it; the
consumers apply the layout mask and the segment comparison on the partial tiles only. An outer
tile whose visits are not all inside one segment counts every visit as partial.

Two bodies, one schedule of copies and barriers: on the GPU, P stays in registers and PV
accumulates in place (`run_state`); in interpret mode (CPU tests) jax 0.10.2's Mosaic GPU
interpreter has neither a register wgmma operand nor `run_state`, so P goes through shared memory
and each wgmma lands in a fresh accumulator. Both share the mask and softmax arithmetic
(`_softmax_step`). Layout casts and layouts of loads apply on the GPU only (no CPU rules).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from dllm_jax import masks
from dllm_jax.kernels import flash

_MASKED, _LOG2E = flash._MASKED, flash._LOG2E
BLOCK_Q = 64  # rows per consumer warpgroup (wgmma's M); a CTA takes 2 * BLOCK_Q
BLOCK_K = 128  # 1.15-1.17x faster than 64-key tiles on the H200 (BENCHMARKS.md, session 9)
SLOTS = 2
OUTER = 2 * BLOCK_Q


def _plgpu():
  import jax.experimental.pallas.mosaic_gpu as plgpu  # absent from some CPU-only jaxlib builds
  return plgpu


def unsupported(spec: masks.MaskSpec, head_dim: int, dtype) -> str | None:
  """Why this kernel cannot run the problem (None when it can), on any device."""
  if spec.kind != "causal" and spec.block_size & (spec.block_size - 1):
    return f"block_size {spec.block_size} is not a power of two"
  if head_dim not in (64, 128):
    return f"head_dim {head_dim} is not 64 or 128"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name} is not bf16 or f16"
  try:
    _plgpu()
  except ImportError as e:
    return f"no Mosaic GPU in this jax ({e})"
  return None


def on_hopper() -> bool:
  """Whether the default device is an sm_90 GPU (wgmma and TMA as this kernel uses them)."""
  dev = jax.devices()[0]
  return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def visit_list(spec, length, seg_BT, num_outer):
  """int32 [B, num_outer, W]: per batch row and 128-row outer tile, the key tiles to visit
  (full first) in columns 0..V-1, then n_full at V, n_vis at V + 1 and at V + 2 whether every
  visit lies inside one segment (1) or the kernel compares segment ids (0); W a multiple of 32
  (TMA copies of whole 128-byte rows). Returns (plan, V)."""
  plan = flash.visit_runs(spec, length, OUTER, BLOCK_K, False, 0, num_outer=num_outer)
  first, count, n_full_runs, _ = plan
  lo, hi, one = flash.segment_runs(plan, seg_BT, OUTER, BLOCK_K, transpose=False)
  m = max(1, int(count.max()))
  width = first.shape[1]
  v = max(1, int(count.sum(1).max()))
  tiles = lo[..., None] + np.arange(m)  # [B, n_outer, R, M]
  valid = tiles < hi[..., None]
  in_full = np.arange(width)[:, None] < n_full_runs[:, None, None]  # [n_outer, R, 1]
  n_full = jnp.sum(valid & in_full, axis=(-2, -1))
  b = seg_BT.shape[0]
  tiles, valid = tiles.reshape(b, num_outer, -1), valid.reshape(b, num_outer, -1)
  dest = jnp.where(valid, jnp.cumsum(valid, -1) - 1, v)  # v: out of bounds, dropped
  rows = jnp.zeros((b, num_outer, v), jnp.int32)
  bi, oi = np.ix_(np.arange(b), np.arange(num_outer))
  rows = rows.at[bi[..., None], oi[..., None], dest].set(tiles, mode="drop")
  # Several segments meet in the outer tile: the full tiles need the segment comparison too.
  n_full = jnp.where(one != 0, n_full, 0)
  n_vis = valid.sum(-1)
  wp = -(-(v + 3) // 32) * 32
  extra = jnp.zeros((b, num_outer, wp - v - 3), jnp.int32)
  packed = jnp.concatenate([rows, n_full[..., None], n_vis[..., None], one[..., None], extra], -1)
  return packed.astype(jnp.int32), v


def _softmax_step(s, m, l, c, keep):
  """One tile of the online softmax in base 2. s [BQ, BK] raw scores, m/l [BQ], c the scale
  times log2 e, keep None or bool [BQ, BK]. Returns (p, alpha, m_new, l_new)."""
  bcast = lambda x: lax.broadcast_in_dim(x, s.shape, [0])
  if keep is None:
    m_new = jnp.maximum(m, s.max(axis=1) * c)
    p = jnp.exp2(s * c - bcast(m_new))  # one FMA a score
  else:
    # Scale before masking: exp2(fma(fill, c, -m)) of a huge fill is not exactly 1 where a row
    # is fully masked (the fused product keeps the bits the rounded m lost), which gave NaN.
    s = jnp.where(keep, s * c, jnp.full_like(s, _MASKED))
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.exp2(s - bcast(m_new))
  alpha = jnp.exp2(m - m_new)
  return p, alpha, m_new, l * alpha + p.sum(axis=1)


def forward(q, k, v, seg, spec: masks.MaskSpec, length: int, interpret: bool = False):
  """(o [B, Tp, H, D], lse [B, H, Tp]) of `flash._forward`'s problem; Tp a multiple of 128."""
  plgpu = _plgpu()
  b, tp, h, d = q.shape
  if tp % OUTER:
    raise ValueError(f"padded length {tp} is not a multiple of {OUTER}")
  group = h // k.shape[2]
  bq, bk = BLOCK_Q, BLOCK_K
  kt = k.transpose(0, 2, 3, 1)  # [B, K, D, Tp]: the interpreter has no transpose_ref
  plan, nv = visit_list(spec, length, seg, tp // OUTER)
  dtype = q.dtype
  c = d ** -0.5 * _LOG2E
  wgmma_l = plgpu.Layout.WGMMA
  row_l, col_l = wgmma_l.reduce(1), wgmma_l.reduce(0)
  lc = (lambda x, layout: x) if interpret else plgpu.layout_cast

  def iota(dim):
    if interpret:
      return lax.broadcasted_iota(jnp.int32, (bq, bk), dim)
    return plgpu.broadcasted_iota(jnp.int32, (bq, bk), dim, layout=wgmma_l)

  def load(ref, layout):
    return ref[...] if interpret else plgpu.load(ref, (), layout=layout)

  def kernel(q_ref, kt_ref, v_ref, seg_ref, plan_ref, o_ref, lse_ref, q_s, kt_s, v_s, p_s,
             lse_s, segq_s, segk_s, plan_s, plan_bar, q_bar, sq_bar, k_bar, v_bar, sk_bar,
             k_free, v_free, sched_bar):
    head, qt, bi = lax.axis_index("heads"), lax.axis_index("q"), lax.axis_index("batch")
    kvh = lax.div(head, jnp.int32(group))
    wg = lax.axis_index("wg")

    def sched():  # the other consumer warpgroup's turn on the tensor cores
      plgpu.barrier_arrive(sched_bar)
      plgpu.barrier_wait(sched_bar)

    @pl.when(wg == 2)
    def _producer():
      if not interpret:
        plgpu.set_max_registers(40, action="decrease")
      plgpu.copy_gmem_to_smem(plan_ref.at[bi, qt], plan_s, plan_bar.at[0])
      plgpu.barrier_wait(plan_bar.at[0])
      n_full, n_vis, one = plan_s[nv], plan_s[nv + 1], plan_s[nv + 2]

      def fetch(i, slot):
        tile = pl.multiple_of(plan_s[i] * bk, bk)
        plgpu.copy_gmem_to_smem(kt_ref.at[bi, kvh, :, pl.ds(tile, bk)], kt_s.at[slot],
                                k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[bi, pl.ds(tile, bk), kvh], v_s.at[slot], v_bar.at[slot])

        @pl.when((i >= n_full) & (one == 0))  # the visits that compare segment ids
        def _():
          plgpu.copy_gmem_to_smem(seg_ref.at[bi, pl.ds(tile, bk)], segk_s.at[slot],
                                  sk_bar.at[slot])

      @pl.loop(0, jnp.minimum(n_vis, SLOTS))
      def _(i):
        fetch(i, i)

      @pl.loop(SLOTS, n_vis)
      def _(i):
        slot = lax.rem(i, SLOTS)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])
        fetch(i, slot)

    @pl.when(wg < 2)
    def _consumer():
      if not interpret:
        plgpu.set_max_registers(232, action="increase")
      base = qt * OUTER + wg * bq
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(base, bq), head], q_s.at[wg], q_bar.at[wg])
      # one barrier per copy: a copy's arrivals are a whole warpgroup's, so two copies on one
      # barrier would complete it early
      plgpu.copy_gmem_to_smem(seg_ref.at[bi, pl.ds(base, bq)], segq_s.at[wg], sq_bar.at[wg])
      plgpu.barrier_wait(plan_bar.at[0])
      n_full, n_vis, one = plan_s[nv], plan_s[nv + 1], plan_s[nv + 2]
      plgpu.barrier_wait(q_bar.at[wg])
      plgpu.barrier_wait(sq_bar.at[wg])

      def keep_of(i, slot, masked):
        ok = flash._layout_allowed(spec, length, iota(0) + base, iota(1) + plan_s[i] * bk,
                                   vector_div=False)
        if masked == "segments":
          # Loaded and broadcast per visit: a [BQ, BK] copy of the query ids held across the
          # loop is 64 registers a thread, which made the whole kernel 23% slower.
          plgpu.barrier_wait(sk_bar.at[slot])
          seg_q = lax.broadcast_in_dim(load(segq_s.at[wg], row_l), (bq, bk), [0])
          seg_k = lax.broadcast_in_dim(load(segk_s.at[slot], col_l), (bq, bk), [1])
          ok = ok & (seg_q == seg_k)
        return ok

      def scores(slot, after=lambda: None):
        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_s.at[wg], kt_s.at[slot])
          after()
          return acc_ref[...]
        return pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))

      def interpret_step(i, carry, masked):
        acc, m, l = carry
        slot = lax.rem(i, SLOTS)
        refill = i + SLOTS < n_vis
        plgpu.barrier_wait(k_bar.at[slot])
        s = scores(slot)
        pl.when(refill)(lambda: plgpu.barrier_arrive(k_free.at[slot]))
        p, alpha, m, l = _softmax_step(s, m, l, c, keep_of(i, slot, masked) if masked else None)
        p_s[wg] = p.astype(dtype)
        plgpu.commit_smem()
        plgpu.barrier_wait(v_bar.at[slot])

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p_s.at[wg], v_s.at[slot])
          return acc_ref[...]

        o = pl.run_scoped(pv, plgpu.ACC((bq, d), jnp.float32))
        pl.when(refill)(lambda: plgpu.barrier_arrive(v_free.at[slot]))
        return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + o, m, l

      def gpu_step(i, carry, masked):
        # jax's attention_mgpu schedule: turns on the tensor cores, P in registers, PV in
        # place, the next K's barrier waited for while PV runs (its wait before the loop).
        acc, m, l = carry
        slot = lax.rem(i, SLOTS)
        refill = i + SLOTS < n_vis
        s = scores(slot, after=sched)
        pl.when(refill)(lambda: plgpu.barrier_arrive(k_free.at[slot]))
        p, alpha, m, l = _softmax_step(s, m, l, c, keep_of(i, slot, masked) if masked else None)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        p16 = p.astype(dtype)
        acc, l, m, p16 = lax.optimization_barrier((acc, l, m, p16))
        plgpu.barrier_arrive(sched_bar)
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_wait(sched_bar)

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_s.at[slot])
          pl.when(i + 1 < n_vis)(lambda: plgpu.barrier_wait(k_bar.at[lax.rem(i + 1, SLOTS)]))

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        pl.when(refill)(lambda: plgpu.barrier_arrive(v_free.at[slot]))
        return acc, m, l

      carry = (lc(jnp.zeros((bq, d), jnp.float32), wgmma_l),
               lc(jnp.full((bq,), -jnp.inf, jnp.float32), row_l),
               lc(jnp.zeros((bq,), jnp.float32), row_l))
      step = interpret_step if interpret else gpu_step
      if not interpret:
        pl.when(n_vis > 0)(lambda: plgpu.barrier_wait(k_bar.at[0]))
        pl.when(wg == 1)(sched)  # offsets the two warpgroups by one turn
      # Full tiles, then partial ones: with the layout mask only inside one segment, else with
      # the segment comparison too (one of the last two loops is empty).
      mid = jnp.where(one != 0, n_vis, n_full)
      carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
      carry = lax.fori_loop(n_full, mid, functools.partial(step, masked="layout"), carry)
      acc, m, l = lax.fori_loop(mid, n_vis, functools.partial(step, masked="segments"), carry)
      if not interpret:
        pl.when(wg == 0)(sched)
      # l == 0 only on rows with nothing to visit (padding): keep them finite, as flash does.
      l = jnp.where(l == 0.0, jnp.ones_like(l), l)
      q_s[wg] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
      lse_s[wg] = m + jnp.log2(l)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_s.at[wg], o_ref.at[bi, pl.ds(base, bq), head])
      plgpu.copy_smem_to_gmem(lse_s.at[wg], lse_ref.at[bi, head, pl.ds(base, bq)])
      plgpu.wait_smem_to_gmem(0)

  tiled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
  o, lse = plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
      scratch_types=[
          plgpu.SMEM((2, bq, d), dtype, **tiled), plgpu.SMEM((SLOTS, d, bk), dtype, **tiled),
          plgpu.SMEM((SLOTS, bk, d), dtype, **tiled),
          # P's shared-memory copy is used in interpret mode only; on the GPU it stays in
          # registers, so it takes no space there.
          plgpu.SMEM((2, bq, bk) if interpret else (1, 8, 64), dtype, **tiled),
          plgpu.SMEM((2, bq), jnp.float32), plgpu.SMEM((2, bq), jnp.int32),
          plgpu.SMEM((SLOTS, bk), jnp.int32), plgpu.SMEM((plan.shape[-1],), jnp.int32),
          plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_barriers=2),
          plgpu.Barrier(num_barriers=2),
          plgpu.Barrier(num_barriers=SLOTS), plgpu.Barrier(num_barriers=SLOTS),
          plgpu.Barrier(num_barriers=SLOTS),
          plgpu.Barrier(num_arrivals=2, num_barriers=SLOTS),
          plgpu.Barrier(num_arrivals=2, num_barriers=SLOTS),
          plgpu.Barrier(num_arrivals=2)],
      grid=(h, tp // OUTER, b), grid_names=("heads", "q", "batch"),
      num_threads=3, thread_name="wg",
      compiler_params=None if interpret else plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params() if interpret else None,
  )(q, kt, v, seg, plan)
  return o, lse


def _interpret_params():
  plgpu = _plgpu()
  if hasattr(plgpu, "InterpretParams"):  # public from jax 0.11
    return plgpu.InterpretParams()
  from jax._src.pallas.mosaic_gpu.interpret import params  # jax 0.10: no public name
  return params.InterpretGPUParams()
