"""The block-sparse training forward, dq and dk/dv kernels in Mosaic GPU (Hopper): TMA + wgmma.

Same contract as `flash._forward` (padded q [B, Tp, H, D], k/v [B, Tp, K, D], seg [B, Tp];
returns o and the base-2 log-sum-exp [B, H, Tp]), so `flash`'s Triton backward runs on its
residuals unchanged. Why a second forward: Pallas' Triton lowering runs each program's softmax
and tensor-core work in sequence and stayed at 0.42-0.46 of the matmul rate on the H200; this
kernel follows jax's `attention_mgpu` (FlashAttention-3's schedule): one CTA is two consumer
warpgroups of 64 query rows, which take turns on the tensor cores (a schedule barrier) so one's
softmax overlaps the other's matmuls, and a producer warpgroup that streams the planned K/V tiles
into two shared-memory slots by TMA. The forward is persistent (`PERSISTENT`): one CTA per SM
runs a list of (batch row, head, 128-row tile) work items dealt heaviest first, its K/V stream
running on from item to item and the next item's Q copied while the current one computes
(BENCHMARKS.md, session 32: its GPU time 1.01-1.05x faster than session 30's kernel, which ran
one CTA an item, in the same run on an H100).

The plan is `flash`'s, at 128-row outer tiles: `visit_runs` narrowed by `segment_runs`, then
flattened per (batch row, outer tile) into one list of key tiles, full ones first
(`visit_list`). The producer copies that row of the plan into shared memory and walks it; the
consumers apply the layout mask and the segment comparison on the partial tiles only. An outer
tile whose visits are not all inside one segment counts every visit as partial.

`dkv` is the forward's tiling transposed, without its turns (128 keys a CTA, the query tiles of
one or several heads of a GQA group streamed: `DKV_HEADS`; see its docstring). `dq` is the
forward's tiling, one CTA a tile, no turns (it also computes delta for `dkv`); or `dkv`
accumulates dQ itself (`fuse_dq`: FlashAttention-3's TMA reduce-adds).

Two bodies, one schedule of copies and barriers: on the GPU, P stays in registers and PV
accumulates in place (`run_state`); in interpret mode (CPU tests) jax 0.10.2's Mosaic GPU
interpreter has neither a register wgmma operand nor `run_state`, so P goes through shared memory
and each wgmma lands in a fresh accumulator. Both share the mask and softmax arithmetic
(`_softmax_step`). Layout casts and layouts of loads apply on the GPU only (no CPU rules). The
forward's opt-in `FWD_OVERLAP` is a GPU body with its own schedule (V freed a visit late), which
the interpreter does not run.
"""

from __future__ import annotations

import functools
import inspect

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
# Whether the forward's two consumer warpgroups take turns on the tensor cores (jax's schedule
# barrier, so one's softmax overlaps the other's products). The dk/dv kernel ran 1.1x faster
# without turns (session 12); the forward without them ran 1.06-1.07x slower at L=2048 for both
# head shapes and layouts (H200, BENCHMARKS.md, session 15), so it keeps them.
FWD_TURNS = True
# The proxy fence a consumer puts before releasing a slot it read with plain loads (`_stream`).
# Required by PTX's memory model, added in session 26 without a GPU. False only to time what it
# costs (benchmarks/attention.py --sections variants --variants 'fence:;bare:RELEASE_FENCE=0'):
# nothing measurable on an H100 (session 28): fwd+bwd within 1.6% of the default, either way.
RELEASE_FENCE = True
# Whether the forward runs one CTA per SM, each taking a list of work items (a batch row's and
# head's 128-row tile), instead of one CTA per item: each CTA's prologue (Q, plan, first K/V
# latency), epilogue (O store) and the last wave's tail are paid once a CTA, not once an item.
# Measured (H100, L=2048, same run, BENCHMARKS.md session 32): the forward kernel's GPU time
# 249.5 / 548.9 / 402.0 / 887.5 us against 261.7 / 576.4 / 407.7 / 917.1 for session 30's
# kernel (1.5B 2L, 7B 2L, 1.5B 3L, 7B 3L): 1.01-1.05x, less than session 30's estimate of the
# per-CTA costs (a quarter of the forward) promised. False runs one CTA an item through this
# code with static indices (no item loop): 262.2 / 589.7 us, level with session 30's kernel
# (session 31's 1.09-1.15x loss was that mode's loop over one item, since removed).
PERSISTENT = True
# FlashAttention-3's intra-warpgroup overlap in the forward (GPU body only): visit i issues its
# S_i = Q K_i^T and the previous visit's O += P_{i-1} V_{i-1} together, computes S_i's softmax
# while the PV product runs, then rescales O once PV has landed; the last visit's PV runs after
# the loops. 0: off (one product at a time, as jax's attention_mgpu); 1: on, one meeting of the
# two consumer warpgroups a visit (after the products are issued); 2: on, a second meeting after
# the softmax, so the two warpgroups' softmaxes alternate. Why: Nsight Compute put the default's
# tensor pipe at 49% of its cycles with 0.56 eligible warps a scheduler (H100, session 41). Its
# first version ran 1.4-1.5x slower (forward GPU time, 1.5B heads, L=2048, session 41): ptxas
# serialized every wgmma (C7513) because P_i was converted into the loop-carried PV operand while
# P_{i-1} V_{i-1} still read it. P_i is now converted after that product lands: ptxas no longer
# serializes (session 42), and with the partial tiles' masks from key intervals nothing spills,
# but the forward still runs 1.04-1.05x slower than the default (H100, session 42), so it stays
# opt-in. Untried: the S accumulator kept out of run_state's carried state. The interpreter
# runs the default schedule whatever this is (no register operands there), so CPU tests do not
# cover this one's barrier order. `benchmarks/forward_protocol_model.py` models it by hand
# (every interleaving of up to three items, both values, turns on and off; edit it with this
# code): no deadlock and no slot read after its refill (session 41).
FWD_OVERLAP = 0
# Under FWD_OVERLAP, whether the producer copies K a visit ahead of V (K_0, K_1, V_0, K_2, V_1,
# ...; True) or each visit's K then V. In the latter, K_{j+1} queues behind V_j's wait for its
# slot, which both consumers free only at the end of visit j - 1 (a review's latency point,
# session 41). The protocol model above finds no deadlock or stale read in either order. The
# overlap's timings (session 42) are with K ahead; K then V's was cut off by a call's time limit.
OVERLAP_K_AHEAD = True
# The forward's consumer registers a thread: 232 (producer 40) or 240 (producer 24). With the 2D
# mask iotas ptxas spilled 212 bytes a consumer thread at 232, and 240 took 1.3-1.4% less GPU
# time (session 41, one reading); since the masks use key intervals nothing spills at 232, and
# 240 ran 1.02x slower (session 42, H100, 1.5B heads, L=2048).
FWD_REGS = 232


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


def _whole_rows(columns: int) -> int:
  """`columns` int32 rounded up to whole 128-byte rows (32 columns): what TMA copies of plan
  rows move."""
  return -(-columns // 32) * 32


def visit_list(spec, length, seg_BT, num_outer, rows=OUTER, cols=BLOCK_K, transpose=False):
  """int32 [B, num_outer, W]: per batch row and outer tile (`rows` query rows, or `cols` keys
  when `transpose`), the inner tiles to visit (full first) in columns 0..V-1, then n_full at V,
  n_vis at V + 1, at V + 2 whether every visit lies inside one segment (1) or the kernel compares
  segment ids (0), and the outer tile's own index at V + 3 (so rows can be reordered); W a
  multiple of 32 (TMA copies of whole 128-byte rows). Returns (plan, V)."""
  plan = flash.visit_runs(spec, length, rows, cols, transpose, 0, num_outer=num_outer)
  first, count, n_full_runs, _ = plan
  lo, hi, one = flash.segment_runs(plan, seg_BT, rows, cols, transpose=transpose)
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
  listed = jnp.zeros((b, num_outer, v), jnp.int32)
  bi, oi = np.ix_(np.arange(b), np.arange(num_outer))
  listed = listed.at[bi[..., None], oi[..., None], dest].set(tiles, mode="drop")
  # Several segments meet in the outer tile: the full tiles need the segment comparison too.
  n_full = jnp.where(one != 0, n_full, 0)
  n_vis = valid.sum(-1)
  index = jnp.broadcast_to(jnp.arange(num_outer, dtype=jnp.int32), (b, num_outer))
  wp = _whole_rows(v + 4)
  extra = jnp.zeros((b, num_outer, wp - v - 4), jnp.int32)
  packed = jnp.concatenate([listed, n_full[..., None], n_vis[..., None], one[..., None],
                            index[..., None], extra], -1)
  return packed.astype(jnp.int32), v


def heavy_first_list(spec, length, seg_BT, num_outer, rows, cols, transpose):
  """`visit_list`'s plan with its outer tiles reordered heaviest first (each row carries its
  tile's index), for kernels that launch one CTA an outer tile in that order. Returns (plan, V)."""
  plan, nv = visit_list(spec, length, seg_BT, num_outer, rows=rows, cols=cols,
                        transpose=transpose)
  order = flash.heavy_first(flash.visit_runs(spec, length, rows, cols, transpose, 0,
                                             num_outer=num_outer))
  return plan[:, order], nv


def _streamed_transposes(interpret, d, cols, *xs):
  """The interpreter has no transposed refs, so a kernel streams X^T ([B, heads, D, Tp]) there;
  on the GPU a tiny placeholder stands in (the transposed view of X's own tile is used)."""
  return tuple(x.transpose(0, 2, 3, 1) if interpret else jnp.zeros((1, 1, d, cols), x.dtype)
               for x in xs)


def _visit_loops(step, n_full, n_vis, one, carry, first=None):
  """A consumer's visits in plan order: the full tiles (no mask), then the partial ones, with the
  layout mask only when every visit lies inside one segment (`one`), else with the segment
  comparison too (one of the last two loops is empty). `step(i, carry, masked)`; with `first`
  (`FWD_OVERLAP`), visit 0 runs `first(0, carry, masked)` instead, in its class's loop."""
  mid = jnp.where(one != 0, n_vis, n_full)
  for lo, hi, masked in ((0, n_full, False), (n_full, mid, "layout"), (mid, n_vis, "segments")):
    if first is not None:  # the class's share of [0, 1)
      split = jnp.maximum(lo, jnp.minimum(hi, 1))
      carry = lax.fori_loop(lo, split, functools.partial(first, masked=masked), carry)
      lo = split
    carry = lax.fori_loop(lo, hi, functools.partial(step, masked=masked), carry)
  return carry


def _iota(shape, dim, interpret):
  """int32 [shape[dim]]: 0, 1, ... along dimension `dim` of a [shape] tile, in the register
  layout that broadcasts along the tile's other dimension (the wgmma results' row or column
  layout on the GPU)."""
  if interpret:
    return jnp.arange(shape[dim], dtype=jnp.int32)
  plgpu = _plgpu()
  layout = plgpu.Layout.WGMMA.reduce(1 - dim)
  return plgpu.broadcasted_iota(jnp.int32, (shape[dim],), 0, layout=layout)


def _load(ref, layout, interpret):
  """A shared-memory read in the register layout the wgmma results use (none in the interpreter).
  jax 0.10's `plgpu.load` takes an index (here none); jax 0.11's deprecates it."""
  if interpret:
    return ref[...]
  load = _plgpu().load
  idx = inspect.signature(load).parameters.get("idx")
  if idx is not None and idx.default is inspect.Parameter.empty:
    return load(ref, (), layout=layout)
  return load(ref, layout=layout)


def _product(a, b_ref, shape):
  """float32 [shape]: a @ b_ref by one wgmma into a fresh accumulator, read back to registers."""
  plgpu = _plgpu()

  def f(acc_ref):
    plgpu.wgmma(acc_ref, a, b_ref)
    return acc_ref[...]
  return pl.run_scoped(f, plgpu.ACC(shape, jnp.float32))


def _take_turns(sched_bar):
  """The other consumer warpgroup's turn on the tensor cores (jax's schedule barrier)."""
  plgpu = _plgpu()
  plgpu.barrier_arrive(sched_bar)
  plgpu.barrier_wait(sched_bar)


# A TMA copy moves at most 256 elements along a dimension: a plan row wider than this (a key
# tile seen by many query tiles, `dkv`'s columns of visited halves, a long layout's forward
# work-table row) is copied in pieces.
PLAN_COPY_MAX = 256


def plan_pieces(width: int) -> list[tuple[int, int]]:
  """(start, size) of the copies of a `width`-wide plan row, one barrier each."""
  return [(c, min(PLAN_COPY_MAX, width - c)) for c in range(0, width, PLAN_COPY_MAX)]


def _copy_plan(row, dst, bar_at):
  """Copies a plan row (`row` in global memory) into `dst` ([W] in shared memory) in
  `plan_pieces`, piece c arriving on barrier `bar_at(c)`; `_wait_plan` waits for them all."""
  for c, (start, size) in enumerate(plan_pieces(dst.shape[-1])):
    piece = pl.ds(start, size)
    _plgpu().copy_gmem_to_smem(row.at[piece], dst.at[piece], bar_at(c))


def _wait_plan(bar_at, width):
  for c in range(len(plan_pieces(width))):
    _plgpu().barrier_wait(bar_at(c))


def _producer_start(plan_row, plan_s, plan_bar, nv, interpret, regs=40):
  """The producer warpgroup's prologue: give up registers, copy this CTA's plan row into shared
  memory (in `plan_pieces`, whose barriers the consumers wait on too: `_wait_plan`), and read
  its (n_full, n_vis, one)."""
  plgpu = _plgpu()
  if not interpret:
    plgpu.set_max_registers(regs, action="decrease")
  bar_at = lambda c: plan_bar.at[c]
  _copy_plan(plan_row, plan_s, bar_at)
  _wait_plan(bar_at, plan_s.shape[0])
  return plan_s[nv], plan_s[nv + 1], plan_s[nv + 2]


def _stream(n_vis, fetch, wait_free, streamed=0):
  """The producer's loop: visit i's tiles into slot (streamed + i) % SLOTS (`fetch(i, slot)`),
  `streamed` the visits its CTA streamed before (a persistent CTA's earlier items), a slot
  refilled once both consumers released it (`wait_free(slot)`; under the forward's
  `FWD_OVERLAP` it waits for K's release only, `fetch` for V's). A consumer that read a slot
  with plain loads (the generic proxy: segment ids, lse, delta; wgmma operands are read by the
  async proxy) fences (`commit_smem`) before its release, since the refill is an async-proxy
  write: PTX's proxy memory model orders the two only through that fence (FlashAttention's
  Hopper backward fences before releasing its LSE stage too; in these bodies the loads' values
  are used before the release, so no refill could overtake them in practice)."""
  fresh = jnp.clip(SLOTS - streamed, 0, n_vis)  # visits into slots never filled before

  @pl.loop(0, fresh)
  def _(i):
    fetch(i, streamed + i)

  @pl.loop(fresh, n_vis)
  def _(i):
    slot = lax.rem(streamed + i, SLOTS)
    wait_free(slot)
    fetch(i, slot)


def _keep(spec, length, shape, q_dim, q_idx, k_idx, masked, own_seg, streamed_seg, streamed_bar,
          interpret):
  """bool [shape] of a partial tile whose dimension `q_dim` runs over queries (layout indices
  `q_idx`, a vector along it) and the other over keys (`k_idx`): the layout mask, and when `masked`
  is "segments" the segment comparison of this warpgroup's resident tile (ids in `own_seg`, along
  dimension 0) with the streamed one (`streamed_seg`, along 1, its copy awaited on
  `streamed_bar`). The layout mask compares each key with its query's key intervals
  (`flash.key_bounds`, computed on the vector of queries: a few ops a score). The ids are loaded
  and broadcast per visit: a [rows, cols] copy of the resident ids held across the loop is 64
  registers a thread, which made the forward 23% slower."""
  plgpu = _plgpu()
  along = lambda x, dim: x if isinstance(x, int) else lax.broadcast_in_dim(x, shape, [dim])
  keys = along(k_idx, 1 - q_dim)
  bounds = flash.key_bounds(spec, length, q_idx)
  ok = flash.keys_in(keys, [(None if lo is None else along(lo, q_dim), along(hi, q_dim))
                            for lo, hi in bounds])
  if masked == "segments":
    plgpu.barrier_wait(streamed_bar)
    layout = plgpu.Layout.WGMMA
    own = lax.broadcast_in_dim(_load(own_seg, layout.reduce(1), interpret), shape, [0])
    streamed = lax.broadcast_in_dim(_load(streamed_seg, layout.reduce(0), interpret), shape, [1])
    ok = ok & (own == streamed)
  return ok


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


def deal(weights, ctas: int) -> np.ndarray:
  """Work items dealt to `ctas` persistent CTAs: int32 [ctas, M], each row a CTA's item indices
  (into `weights`) in the order it runs them, -1 past its last. Longest-processing-time first:
  items heaviest first (ties: lowest index), each to the least-loaded CTA so far (ties: lowest
  CTA), so the heaviest start in the first round and the light ones fill the gaps at the end."""
  import heapq

  weights = np.asarray(weights)
  order = np.argsort(-weights, kind="stable")
  lists = [[] for _ in range(ctas)]
  loads = [(0, c) for c in range(ctas)]
  for item in order:
    load, c = heapq.heappop(loads)
    lists[c].append(item)
    heapq.heappush(loads, (load + int(weights[item]), c))
  out = np.full((ctas, max(map(len, lists))), -1, np.int32)
  for c, items in enumerate(lists):
    out[c, :len(items)] = items
  return out


def _forward_ctas(n_items: int, interpret: bool) -> int:
  """How many CTAs the forward launches: one per work item unless `PERSISTENT`, else one per SM
  (the interpreter: half the items, so that CTAs take several and more than one CTA runs)."""
  if not PERSISTENT:
    return n_items
  if interpret:
    return max(1, n_items // 2)
  from dllm_jax.kernels import decode
  return min(n_items, decode.sm_count())


def work_table(spec, length, seg, b, h, n_outer, ctas):
  """int32 [ctas, M, W]: row m of CTA c is the `visit_list` row of the m-th work item that CTA
  runs, with the item's batch row at V + 4, its head at V + 5, the CTA's item count at V + 6,
  its visits (all items') at V + 7, the visits of its items before this one at V + 8 and
  whether the item before this one had any (1) or not (0) at V + 9: the kernel reads its
  running counts from the row instead of carrying them through its loop over items.
  Items are (batch row, head, 128-row tile), dealt by `deal` on the layout's visit counts plus
  one (an item's fixed cost; segment ids only shorten items, and are data). Returns (table, V)."""
  plan, nv = visit_list(spec, length, seg, n_outer)
  visits = flash.visit_counts(flash.visit_runs(spec, length, OUTER, BLOCK_K, False, 0,
                                              num_outer=n_outer))
  # item (tile, batch row, head), head fastest: the items of one weight run side by side in
  # head order, so a GQA group's heads read their K/V tiles at about the same time
  weights = np.repeat(visits + 1, b * h)
  lists = deal(weights, ctas)
  items = np.maximum(lists, 0)
  tile, bi, head = items // (b * h), items // h % b, items % h
  rows = plan[bi, tile][..., :nv + 4]
  n_items = (lists >= 0).sum(1)
  extra = np.stack([bi, head, np.broadcast_to(n_items[:, None], bi.shape)], -1)
  n_vis = jnp.where(lists >= 0, rows[..., nv + 1], 0)  # [ctas, M]
  after = jnp.cumsum(n_vis, 1)
  total = jnp.broadcast_to(after[:, -1:], bi.shape)  # the CTA's visits
  before = after - n_vis
  prev_vis = jnp.pad(n_vis[:, :-1] > 0, [(0, 0), (1, 0)])
  counts = jnp.stack([total, before, prev_vis.astype(jnp.int32)], -1).astype(jnp.int32)
  width = _whole_rows(nv + 10)
  pad = np.zeros(bi.shape + (width - nv - 10,), np.int32)
  return jnp.concatenate([rows, jnp.asarray(extra, jnp.int32), counts, jnp.asarray(pad)],
                         -1), nv


def forward(q, k, v, seg, spec: masks.MaskSpec, length: int, interpret: bool = False):
  """(o [B, Tp, H, D], lse [B, H, Tp]) of `flash._forward`'s problem; Tp a multiple of 128.

  A CTA runs a list of work items (`work_table`), one per SM when `PERSISTENT`: the producer
  streams every item's K/V tiles as one sequence through the slots and copies the next item's
  Q into the other of two Q buffers while the current one runs; the consumers stage each item's
  O in its Q buffer and go on while the store drains."""
  plgpu = _plgpu()
  b, tp, h, d = q.shape
  if tp % OUTER:
    raise ValueError(f"padded length {tp} is not a multiple of {OUTER}")
  if FWD_REGS not in (232, 240):
    raise ValueError(f"flash_mgpu.FWD_REGS={FWD_REGS}: must be 232 or 240")
  if FWD_OVERLAP not in (0, 1, 2):
    raise ValueError(f"flash_mgpu.FWD_OVERLAP={FWD_OVERLAP}: must be 0, 1 or 2")
  group = h // k.shape[2]
  bq, bk = BLOCK_Q, BLOCK_K
  # k_in, k_ref, k_s: K^T ([B, K, D, Tp]) in the interpreter, which has no transposed refs; on
  # the GPU K itself, its tiles read transposed by the wgmma (XLA's transpose: 8-16 us, session 33).
  k_in = k.transpose(0, 2, 3, 1) if interpret else k
  n_outer = tp // OUTER
  ctas = _forward_ctas(b * h * n_outer, interpret)
  table, nv = work_table(spec, length, seg, b, h, n_outer, ctas)
  n_pieces = len(plan_pieces(table.shape[-1]))  # (its rows pass PLAN_COPY_MAX from L ~ 31k)
  dtype = q.dtype
  c = d ** -0.5 * _LOG2E
  wgmma_l = plgpu.Layout.WGMMA
  row_l = wgmma_l.reduce(1)
  lc = (lambda x, layout: x) if interpret else plgpu.layout_cast

  iota = functools.partial(_iota, (bq, bk), interpret=interpret)

  # One item a CTA (not PERSISTENT): the item's body inline with its item and slot indices
  # static, so the code is that of the kernel the persistent one replaced
  one_each = ctas == b * h * n_outer

  def when(cond, body):  # pl.when, or a Python branch where `cond` is static
    if isinstance(cond, (bool, np.bool_)):
      if cond:
        body()
    else:
      pl.when(cond)(body)

  def for_items(n_items, item):
    """item(m, s) for each of the CTA's items, s its plan/Q slot (m mod 2). Not in pairs with
    static slots: that body, traced twice, spilled 552 bytes against 212 and ran the forward
    1.23-1.25x slower (H100, BENCHMARKS.md session 32)."""
    if one_each:
      item(0, 0)
    else:
      @pl.loop(0, n_items)
      def _(m):
        item(m, lax.rem(m, 2))

  def kernel(q_ref, k_ref, v_ref, seg_ref, table_ref, o_ref, lse_ref, q_s, k_s, v_s, p_s,
             lse_s, segq_s, segk_s, plan_s, plan_bar, q_bar, sq_bar, k_bar, v_bar, sk_bar,
             k_free, v_free, item_free, sched_bar):
    cta = lax.axis_index("sm")
    wg = lax.axis_index("wg")
    turns = FWD_TURNS
    sched = functools.partial(_take_turns, sched_bar) if turns else lambda: None
    overlap = FWD_OVERLAP and not interpret

    def item_count():  # the CTA's items (read once its first plan row has arrived)
      return 1 if one_each else plan_s[0, nv + 6]

    def read_item(s):  # (batch row, head, tile, n_full, n_vis, one) of the item in plan slot s
      return tuple(plan_s[s, nv + j] for j in (4, 5, 3, 0, 1, 2))

    def counts(s, n_vis):  # (visits of the CTA's earlier items, its visits, the last had any)
      if one_each:
        return 0, n_vis, 0
      return plan_s[s, nv + 8], plan_s[s, nv + 7], plan_s[s, nv + 9]

    def row_bar(s):  # the barriers of item slot s's plan row, by piece
      return lambda c: plan_bar.at[s * n_pieces + c]

    def wait_row(s):
      _wait_plan(row_bar(s), plan_s.shape[-1])

    def copy_row(m, s):
      _copy_plan(table_ref.at[cta, m], plan_s.at[s], row_bar(s))
      wait_row(s)

    @pl.when(wg == 2)
    def _producer():
      if not interpret:
        plgpu.set_max_registers(24 if FWD_REGS == 240 else 40, action="decrease")
      copy_row(0, 0)

      def item(m, s):
        def refill():  # slot s held item m - 2: both consumers are past it and its O store
          def item_freed():
            plgpu.barrier_wait(item_free.at[s])
            # this warpgroup read plan_s[s] with plain loads two items ago; the row comes by
            # an async-proxy write (PTX orders the two only through this fence)
            plgpu.commit_smem()
          when(m >= 2, item_freed)
          copy_row(m, s)

        when(m > 0, refill)
        bi, head, tile, n_full, n_vis, one = read_item(s)
        streamed = counts(s, n_vis)[0]
        kvh = lax.div(head, jnp.int32(group))
        for w in range(2):
          rows = pl.ds(tile * OUTER + w * bq, bq)
          # one barrier per copy: a copy's arrivals are a whole warpgroup's, so two copies on
          # one barrier would complete it early
          plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, head], q_s.at[s, w], q_bar.at[2 * s + w])
          plgpu.copy_gmem_to_smem(seg_ref.at[bi, rows], segq_s.at[s, w], sq_bar.at[2 * s + w])

        def keys_of(i):  # visit i's key tile
          return pl.ds(pl.multiple_of(plan_s[s, i] * bk, bk), bk)

        def fetch_k(i, slot):
          keys = keys_of(i)
          plgpu.copy_gmem_to_smem(k_ref.at[bi, kvh, :, keys] if interpret
                                  else k_ref.at[bi, keys, kvh], k_s.at[slot], k_bar.at[slot])

        def fetch_v(i, slot):  # V and, where the visit compares them, the keys' segment ids
          keys = keys_of(i)
          if overlap:  # V's slot is freed a visit after K's (see wait_free)
            when(streamed + i >= SLOTS, lambda: plgpu.barrier_wait(v_free.at[slot]))
          plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, kvh], v_s.at[slot], v_bar.at[slot])

          @pl.when((i >= n_full) & (one == 0))  # the visits that compare segment ids
          def _():
            plgpu.copy_gmem_to_smem(seg_ref.at[bi, keys], segk_s.at[slot], sk_bar.at[slot])

        def fetch(i, slot):
          fetch_k(i, slot)
          fetch_v(i, slot)

        def wait_free(slot):
          plgpu.barrier_wait(k_free.at[slot])
          # Under FWD_OVERLAP a consumer frees V_j only at the end of visit j + 1 (P_j V_j runs
          # there), after it has waited for K_{j+2}, which goes into V_j's slot: K's copy
          # waiting for that slot's V too would deadlock. So V is awaited in `fetch_v`, after
          # K's copy.
          if not overlap:
            plgpu.barrier_wait(v_free.at[slot])

        if overlap and OVERLAP_K_AHEAD:
          # K_0, K_1, V_0, K_2, V_1, ...: K_{j+1} does not queue behind V_j's wait for its slot,
          # which the warpgroup a turn behind frees late
          fresh = jnp.clip(SLOTS - streamed, 0, n_vis)  # visits into slots never filled before

          @pl.loop(0, n_vis + 1)
          def _(j):
            @pl.when(j < n_vis)
            def _():
              slot = lax.rem(streamed + j, SLOTS)
              pl.when(j >= fresh)(lambda: plgpu.barrier_wait(k_free.at[slot]))
              fetch_k(j, slot)

            pl.when(j >= 1)(lambda: fetch_v(j - 1, lax.rem(streamed + j - 1, SLOTS)))
        else:
          _stream(n_vis, fetch, wait_free, streamed)

      for_items(item_count(), item)

    @pl.when(wg < 2)
    def _consumer():
      if not interpret:
        plgpu.set_max_registers(FWD_REGS, action="increase")
      wait_row(0)
      n_items = item_count()
      if not interpret and turns and one_each:
        pl.when(wg == 1)(sched)  # offsets the two warpgroups by one turn

      def item(m, s):
        when(m > 0, lambda: wait_row(s))
        bi, head, tile, n_full, n_vis, one = read_item(s)
        streamed, total, in_turns = counts(s, n_vis)

        # Every phase of a barrier is waited for (the interpreter checks, FWD_OVERLAP aside): a
        # release only where the producer will refill, here item m - 1's slot for item m + 1.
        def release_item():  # item m - 1's O has left its Q buffer: the producer may refill it
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          plgpu.barrier_arrive(item_free.at[1 - s])

        when((m > 0) & (m + 1 < n_items), release_item)

        if not interpret and turns and not one_each:
          # wg 1 runs one turn behind wg 0 through each run of items with visits: it takes the
          # offset at the run's first item, wg 0 gives it back at an item without visits (or
          # after the last). Held across an item without visits, the offset paired wg 1's last
          # turn before it with wg 0's first turn after it, which waits for a plan row the
          # producer copies only once wg 1 has released its slot: a deadlock (a review's model).
          pl.when((wg == 1) & (n_vis > 0) & (in_turns == 0))(sched)
          pl.when((wg == 0) & (n_vis == 0) & (in_turns != 0))(sched)

        base = tile * OUTER + wg * bq
        plgpu.barrier_wait(q_bar.at[2 * s + wg])
        plgpu.barrier_wait(sq_bar.at[2 * s + wg])

        def keep_of(i, slot, masked):
          return _keep(spec, length, (bq, bk), 0, iota(0) + base, iota(1) + plan_s[s, i] * bk,
                       masked, segq_s.at[s, wg], segk_s.at[slot], sk_bar.at[slot], interpret)

        def scores(slot, after=lambda: None):
          def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_s.at[s, wg],
                        k_s.at[slot] if interpret else k_s.at[slot].transpose((1, 0)))
            after()
            return acc_ref[...]
          return pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))

        def release(bars, i):  # a K/V slot, where the producer will refill it
          pl.when(streamed + i + SLOTS < total)(lambda: plgpu.barrier_arrive(bars.at[
              lax.rem(streamed + i, SLOTS)]))

        def interpret_step(i, carry, masked):
          acc, m_, l = carry
          slot = lax.rem(streamed + i, SLOTS)
          plgpu.barrier_wait(k_bar.at[slot])
          s_ = scores(slot)
          release(k_free, i)
          p, alpha, m_, l = _softmax_step(s_, m_, l, c,
                                          keep_of(i, slot, masked) if masked else None)
          p_s[wg] = p.astype(dtype)
          plgpu.commit_smem()
          plgpu.barrier_wait(v_bar.at[slot])

          def pv(acc_ref):
            plgpu.wgmma(acc_ref, p_s.at[wg], v_s.at[slot])
            return acc_ref[...]

          o = pl.run_scoped(pv, plgpu.ACC((bq, d), jnp.float32))
          if masked == "segments":  # segk_s[slot] read by plain loads (`_stream`)
            plgpu.commit_smem()
          release(v_free, i)
          return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + o, m_, l

        def gpu_step(i, carry, masked):
          # jax's attention_mgpu schedule: turns on the tensor cores, P in registers, PV in
          # place, the next K's barrier waited for while PV runs (its wait before the loop).
          acc, m_, l = carry
          slot = lax.rem(streamed + i, SLOTS)
          s_ = scores(slot, after=sched)
          release(k_free, i)
          p, alpha, m_, l = _softmax_step(s_, m_, l, c,
                                          keep_of(i, slot, masked) if masked else None)
          acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
          p16 = p.astype(dtype)
          acc, l, m_, p16 = lax.optimization_barrier((acc, l, m_, p16))
          if turns:
            plgpu.barrier_arrive(sched_bar)
          plgpu.barrier_wait(v_bar.at[slot])
          if turns:
            plgpu.barrier_wait(sched_bar)

          def pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, v_s.at[slot])
            nxt = lax.rem(streamed + i + 1, SLOTS)
            pl.when(i + 1 < n_vis)(lambda: plgpu.barrier_wait(k_bar.at[nxt]))

          acc = pl.run_state(pv)(plgpu.ACC.init(acc))
          if masked == "segments" and RELEASE_FENCE:  # segk_s[slot] read by plain loads
            plgpu.commit_smem()
          release(v_free, i)
          return acc, m_, l

        # FWD_OVERLAP: a visit's softmax runs while the previous visit's PV product does. The
        # carry holds P of the visit before (bf16, the PV product's register operand).
        slot_of = lambda i: lax.rem(streamed + i, SLOTS)
        meet_after_softmax = sched if FWD_OVERLAP == 2 else (lambda: None)

        def softmax_of(i, s_, m_, l, masked):  # (P in float32, alpha, m, l)
          slot = slot_of(i)
          release(k_free, i)
          p, alpha, m_, l = _softmax_step(s_, m_, l, c,
                                          keep_of(i, slot, masked) if masked else None)
          if masked == "segments" and RELEASE_FENCE:  # segk_s[slot] read by plain loads
            plgpu.commit_smem()
          return p, alpha, m_, l

        def next_k(i):  # the next visit's K, waited for while this visit's products run
          pl.when(i + 1 < n_vis)(lambda: plgpu.barrier_wait(k_bar.at[slot_of(i + 1)]))

        def overlap_first(i, carry, masked):  # visit 0: S_0 and its softmax, no PV yet
          acc, m_, l, _ = carry
          s_ = scores(slot_of(i), after=sched)
          p, _, m_, l = softmax_of(i, s_, m_, l, masked)
          next_k(i)
          meet_after_softmax()
          return acc, m_, l, p.astype(dtype)

        def overlap_step(i, carry, masked):  # visit i >= 1: S_i and P_{i-1} V_{i-1} at once
          acc, m_, l, p_prev = carry
          prev = slot_of(i - 1)

          def products(refs):
            o_ref, s_ref, soft_ref = refs
            plgpu.wgmma(s_ref, q_s.at[s, wg], k_s.at[slot_of(i)].transpose((1, 0)))
            plgpu.barrier_wait(v_bar.at[prev])  # S_i runs meanwhile
            plgpu.wgmma(o_ref, p_prev, v_s.at[prev])
            sched()
            s_ = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # S_i landed, PV may run on
            # the barrier keeps the softmax ahead of run_state's closing wait for PV
            soft = lax.optimization_barrier(softmax_of(i, s_, m_, l, masked))
            for ref, value in zip(soft_ref, soft):
              ref[...] = value
            next_k(i)
            meet_after_softmax()

          zeros = lc(jnp.zeros((bq, bk), jnp.float32), wgmma_l)
          soft0 = (zeros, m_, m_, l)  # placeholders of (P_i, alpha, m, l)'s types and layouts
          acc, _, (p, alpha, m_, l) = pl.run_state(products)(
              (plgpu.ACC.init(acc), plgpu.ACC.init(zeros), soft0))
          release(v_free, i - 1)
          # P_i becomes the next PV's bf16 operand only now, with P_{i-1} V_{i-1} done: written
          # while that product ran, its registers (the loop's carry) made ptxas serialize every
          # wgmma of the kernel (C7513; session 41, H100: the forward 1.4-1.5x slower).
          return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), m_, l, p.astype(dtype)

        def overlap_last(i, carry):  # the last visit's PV
          acc, m_, l, p_last = carry
          slot = slot_of(i)
          plgpu.barrier_wait(v_bar.at[slot])

          def pv(acc_ref):
            plgpu.wgmma(acc_ref, p_last, v_s.at[slot])

          acc = pl.run_state(pv)(plgpu.ACC.init(acc))
          release(v_free, i)
          return acc, m_, l, p_last

        carry = (lc(jnp.zeros((bq, d), jnp.float32), wgmma_l),
                 lc(jnp.full((bq,), -jnp.inf, jnp.float32), row_l),
                 lc(jnp.zeros((bq,), jnp.float32), row_l))
        step = interpret_step if interpret else gpu_step
        if not interpret:
          first = streamed % SLOTS if isinstance(streamed, int) else lax.rem(streamed, SLOTS)
          pl.when(n_vis > 0)(lambda: plgpu.barrier_wait(k_bar.at[first]))
        if overlap:
          carry += (lc(jnp.zeros((bq, bk), jnp.float32), wgmma_l).astype(dtype),)
          carry = _visit_loops(overlap_step, n_full, n_vis, one, carry, first=overlap_first)
          acc, m_, l, _ = lax.fori_loop(jnp.maximum(n_vis - 1, 0), n_vis, overlap_last, carry)
        else:
          acc, m_, l = _visit_loops(step, n_full, n_vis, one, carry)
        # l == 0 only on rows with nothing to visit (padding): keep them finite, as flash does.
        l = jnp.where(l == 0.0, jnp.ones_like(l), l)
        # O staged in this item's Q buffer (its last QK^T has been waited for): the producer
        # refills it two items on, after the release above in the next item
        q_s[s, wg] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
        lse_s[s, wg] = m_ + jnp.log2(l)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_s.at[s, wg], o_ref.at[bi, pl.ds(base, bq), head])
        plgpu.copy_smem_to_gmem(lse_s.at[s, wg], lse_ref.at[bi, head, pl.ds(base, bq)])

      for_items(n_items, item)
      if not interpret and turns:
        if one_each:
          pl.when(wg == 0)(sched)
        else:  # the last item's slot was not refilled: its visit count is still there
          pl.when((wg == 0) & (plan_s[lax.rem(n_items - 1, 2), nv + 1] > 0))(sched)
      plgpu.wait_smem_to_gmem(0)

  tiled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
  kernel.__name__ = "block_sparse_attention_fwd_mgpu"  # Mosaic GPU names the kernel after it
  o, lse = plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
      scratch_types=[
          # Q [item slot, warpgroup]: two items' (+32 KB: 192 KB of shared memory in all)
          plgpu.SMEM((2, 2, bq, d), dtype, **tiled),
          plgpu.SMEM((SLOTS, d, bk) if interpret else (SLOTS, bk, d), dtype, **tiled),  # K^T, K
          plgpu.SMEM((SLOTS, bk, d), dtype, **tiled),
          # P's shared-memory copy is used in interpret mode only; on the GPU it stays in
          # registers, so it takes no space there.
          plgpu.SMEM((2, bq, bk) if interpret else (1, 8, 64), dtype, **tiled),
          plgpu.SMEM((2, 2, bq), jnp.float32), plgpu.SMEM((2, 2, bq), jnp.int32),
          plgpu.SMEM((SLOTS, bk), jnp.int32), plgpu.SMEM((2, table.shape[-1]), jnp.int32),
          plgpu.Barrier(num_barriers=2 * n_pieces),  # plan rows, by item slot and piece
          plgpu.Barrier(num_barriers=4), plgpu.Barrier(num_barriers=4),  # Q, its ids: slot, wg
          plgpu.Barrier(num_barriers=SLOTS), plgpu.Barrier(num_barriers=SLOTS),
          plgpu.Barrier(num_barriers=SLOTS),
          plgpu.Barrier(num_arrivals=2, num_barriers=SLOTS),
          plgpu.Barrier(num_arrivals=2, num_barriers=SLOTS),
          plgpu.Barrier(num_arrivals=2, num_barriers=2),  # item slots released
          plgpu.Barrier(num_arrivals=2)],
      grid=(ctas,), grid_names=("sm",),
      num_threads=3, thread_name="wg",
      compiler_params=None if interpret else plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params() if interpret else None,
  )(q, k_in, v, seg, table)
  return o, lse


BLOCK_KV = 64  # keys per consumer warpgroup in the dk/dv kernel (wgmma's M); a CTA takes 2x
BLOCK_QI = 64  # query rows of one streamed tile in the dk/dv kernel (wgmma's K: 64 at least)
# The fused dk/dv kernel's CTAs are launched in groups of at most this many (batch row, query
# head) pairs, each group's key tiles heaviest first: the CTAs running at once then reduce-add
# mostly into the float32 dQ rows of 16 pairs (32 MB at T=4096), which fit the H200's L2,
# instead of every pair's (100-235 MB). Against one group of all (session 12's order, every
# pair's heaviest tiles first) the 7B heads' fused kernel ran 2019 -> 1585 us (2L) and 3255 ->
# 2600 (3L), the 1.5B heads' 700 -> 708 (2L); groups of 4 and 8 were slower than 16 for both
# shapes. Groups of 24 / 28 (session 19, one reading each): the 7B heads' 2L fwd+bwd 2-3% faster
# than with 16, the 1.5B's level or 1.8% slower, the 3L cases level (28 untimed there); the
# fused backward, opt-in, stays level with the default either way (BENCHMARKS.md).
FUSED_GROUP = 16
# dS^T slots the fused kernel's warpgroups exchange through, and how many visits a warpgroup's
# dQ products trail its dS (at visit i, the dQ columns of visit i - DQ_LAG; DQ_LAG < DS_SLOTS).
# A warpgroup writes visit i's dS once both have read visit i - DS_SLOTS's, which they do at
# visit i - DS_SLOTS + DQ_LAG: with 2 slots and lag 1 that is the visit just before, a meeting
# every visit that keeps the two warpgroups in phase. A visit of slack (3 slots, lag 1: +16 KB of
# shared memory) made the kernel 1.18x slower on the H200, 3 slots with lag 2 1.31x; 4 slots do
# not fit (BENCHMARKS.md, session 14).
DS_SLOTS = 2
DQ_LAG = 1
# Where exactly two CTAs share a KV head's dK and dV (the 1.5B heads: 3 of the group's 6 heads a
# CTA), each adds its bf16 share into a zeroed bf16 dK and dV by a TMA reduce-add instead of
# writing a partial that XLA sums (17-27 us at L=2048 for the 1.5B heads, session 37's
# profile). Exact for two: 0 + a is a, and a + b rounds once, as XLA's float32 sum then bf16
# does, in either order; more partials than two would round in the order the CTAs end, so those
# stay partials. (FlashAttention-3's float32 reduce-adds of every head's share, converted after
# the kernel, cost the kernel more than XLA's sum saved: fwd+bwd 1.01x the time, H200, session 15;
# removed in session 38.) On an H100 (L=2048, two readings each, BENCHMARKS.md session 38) the
# 1.5B heads' fwd+bwd GPU time 1.5-3.0% lower (2L) and 1.6-1.9% (3L), the dk/dv kernel itself
# 8-15 us faster; the partials' 33.5 MB (2L) not allocated. False: the partials (the tests
# compare the two: equal bits in the interpreter; on an H100 too, `attention.py`'s
# `pair_add_bits`: dQ, dK and dV with no element differing, session 40).
PAIR_ADD = True
# Query heads of one KV head's group that an unfused dk/dv CTA walks in turn, adding their shares
# of dK and dV in its accumulators (the largest divisor of the group not above it; 0:
# `dkv_heads` picks). Each head more a CTA saves a CTA's prologue (K, V, segment ids, plan, the
# first tiles' latency) and one bf16 partial of dK and dV that XLA would write, read and sum;
# fewer, longer CTAs balance worse. Measured (H100, L=2048, same run, BENCHMARKS.md session 33):
# the choice (3 of the 1.5B heads' 6, all 7 of the 7B's) against one head a CTA, the dk/dv kernel
# plus XLA's partial sum 465 -> 424 us (1.5B 2L), 1113 -> 940 (7B 2L), 752 -> 718 (1.5B 3L),
# 1785 -> 1541 (7B 3L). All 6 of the 1.5B's heads (its heaviest key tile then 1.8x an SM's
# share): fwd+bwd 1.18x slower than 3.
DKV_HEADS = 0
# The unfused dk/dv kernel's register split (consumers 232 with a producer of 40, or 240 with
# 24). ptxas spills 324 bytes a consumer thread at 232 and 272 at 240; Nsight Compute put a third
# of the warps' stall cycles on those spills' loads (H100, session 35). At 240 the kernel's GPU
# time is level or lower in every case (H100, L=2048, two readings each, same run: 1.5B heads 2L
# 421 / 421 us against 423 / 421, 7B 2L 967 / 967 against 968 / 966, 1.5B 3L 701 / 707 against
# 709 / 708, 7B 3L 1570 / 1573 against 1600 / 1595; BENCHMARKS.md session 36); fwd+bwd moves
# within its run-to-run spread. Session 35's other levers against the spills, timed in session 36
# and removed: P^T or dS^T written to shared memory for their products (more spills, 448-484
# bytes; the kernel 1.09-1.19x slower) and S^T's product before dP^T's (the same spills and time).
DKV_REGS = 240


def launch_place(cta, n_outer: int, pairs: int, h: int):
  """(key tile, batch row, head) of the dk/dv kernel's CTA `cta` (int32, any shape), `h` heads
  a batch row (query heads, or units of `dkv_heads` of them): CTAs launch in groups of `pairs`
  (batch row, head) pairs, inside a group key tile major."""
  span = jnp.int32(n_outer * pairs)
  within = lax.rem(cta, span)
  bh = lax.div(cta, span) * pairs + lax.rem(within, jnp.int32(pairs))
  return lax.div(within, jnp.int32(pairs)), lax.div(bh, jnp.int32(h)), lax.rem(bh, jnp.int32(h))


def dkv_heads(spec: masks.MaskSpec, length: int, n_outer: int, b: int, h: int, group: int,
              sms: int | None = None) -> int:
  """Query heads an unfused dk/dv CTA walks (`DKV_HEADS`, else the choice below): the most, among
  the group's divisors, whose heaviest CTA (the most-visited key tile's visits times the heads)
  is no longer than one SM's share of all visits. Launched heaviest first, the CTAs then end
  within about one CTA of each other, as one-head CTAs do (a greedy schedule of the 2L and 3L
  plans at L=2048: 1.00-1.01x the mean per SM for 3 heads of the 1.5B's 6 and 7 of the 7B's 7,
  1.8x for all 6 of the 1.5B's, whose heaviest key tile alone is 1.8x the share)."""
  if DKV_HEADS < 0:
    raise ValueError(f"flash_mgpu.DKV_HEADS={DKV_HEADS}: must be 0 (chosen) or a head count")
  if DKV_HEADS:
    return flash.largest_divisor(group, DKV_HEADS)
  w = flash.visit_counts(flash.visit_runs(spec, length, BLOCK_QI, 2 * BLOCK_KV, True, 0,
                                          num_outer=n_outer))
  if not sms:
    from dllm_jax.kernels import decode
    sms = decode.sm_count()
  share = b * h * int(w.sum()) / sms
  return max(c for c in range(1, group + 1) if group % c == 0 and (c == 1 or c * w.max() <= share))


def fuse_dq_unsupported(head_dim: int) -> str | None:
  """Why `dkv(fuse_dq=True)` cannot run this head_dim (None when it can)."""
  if head_dim != 128:
    return (f"needs head_dim 128 (dQ's columns are split between two warpgroups in 64-column "
            f"tiles), got {head_dim}")
  return None


@functools.lru_cache(maxsize=64)
def nonempty_tiles(spec: masks.MaskSpec, length: int, tp: int, tile: int = BLOCK_QI):
  """int32 [tp // tile, tp // tile]: 0 for each (query tile, key tile) the layout does not leave
  empty, -1 for the rest (int32, as it is stored in the dk/dv plan rows: -1 is a 64-key half a
  visit passes over)."""
  tmap = masks.tile_map(spec, length, tile, tile) != masks.TILE_EMPTY
  n = tp // tile
  table = np.full((n, n), -1, np.int32)
  table[:tmap.shape[0], :tmap.shape[1]][tmap] = 0
  table.flags.writeable = False  # shared by every caller (cached)
  return table


def _zeroed(shape, dtype=jnp.float32):
  """A zeroed global-memory Ref for a kernel's reduce-adds. Passed to `pl.kernel` it is aliased
  in and out (`plgpu.kernel` takes no Refs, nor input_output_aliases in jax 0.10)."""
  return jax.new_ref(jnp.zeros(shape, dtype), memory_space=_plgpu().GMEM)


def dkv(q, k, v, seg, do, lse, delta, spec: masks.MaskSpec, length: int, interpret: bool = False,
        fuse_dq: bool = False):
  """(dq, dk, dv) of `flash._backward`'s problem, the forward's tiling transposed; dq is None
  unless `fuse_dq`.

  One CTA holds 128 keys of one KV head (two consumer warpgroups of 64, K and V resident in
  shared memory) and walks the query tiles that see them, of one query head or, unfused, of
  `dkv_heads` heads of its group in turn; the producer streams Q, dO, lse and delta per visit.
  A visit is S^T = K Q^T and dP^T = V dO^T issued together, P^T and dS^T in registers, then
  dV += P^T dO and dK += dS^T Q issued together. Unlike the forward,
  the two warpgroups do not take turns on the tensor cores: with the forward's schedule barrier
  this kernel ran 1.12-1.16x slower on the H200 unfused, 1.00-1.12x fused (BENCHMARKS.md,
  session 12). Key tiles start heaviest first: the plan's rows are reordered (each carries its
  tile's index).

  A CTA is a whole SM here and its work per key tile varies ~60x, so small CTAs balance best
  (BENCHMARKS.md, session 10); `dkv_heads` groups heads only as far as the heaviest CTA stays
  within one SM's share. With GQA each CTA adds its heads' share into its KV head's dK and dV:
  bf16 TMA reduce-adds into bf16 targets where two CTAs share a KV head (`PAIR_ADD`), else a
  bf16 partial ([group / heads a CTA, B, Tp, K, D]) summed here in float32; none when one CTA
  walks the whole group. The grid is one
  axis of CTAs in launch order: groups of (batch row, head unit) pairs, in each the key tiles
  heaviest first, then the group's pairs; unfused, one group holds every pair; fused,
  `FUSED_GROUP` (see there).

  `fuse_dq` (FlashAttention-3's backward; head_dim 128): each warpgroup also stores its dS^T
  tile to shared memory, and after the next visit's dV and dK products computes one half of the
  previous visit's dQ tile's columns, dQ[:, half] = dS K[:, half] over both warpgroups' 128 keys
  (dS read back transposed), then adds it into a zeroed float32 dQ by a TMA reduce-add; no dq
  kernel runs. The warpgroups pass dS tiles through `DS_SLOTS` slots (`ds_ready`: both written;
  `ds_free`: both read), the dQ products `DQ_LAG` visits behind (default 2 and 1). Splitting by
  columns halves the adds and the accumulator of each warpgroup adding its own keys' whole dQ
  tile, which spilled registers and ran 1.24x the two kernels it replaces (H200, BENCHMARKS.md,
  session 11). Opt-in: with its CTAs launched in groups (`FUSED_GROUP`) level with this kernel
  unfused plus the Triton dq kernel for both shapes (sessions 13 and 14).
  (Storing every visit's dS^T for a dS K kernel in place of the dq kernel, sessions 34-36, made
  fwd+bwd 1.003-1.03x faster for 0.4-1.5 GB of dS: removed in session 39, BENCHMARKS.md.)
  Returns dq [B, Tp, H, D], dk, dv [B, Tp, K, D] in the inputs' dtype.
  """
  plgpu = _plgpu()
  b, tp, h, d = q.shape
  group = h // k.shape[2]
  bk, bq = BLOCK_KV, BLOCK_QI
  outer = 2 * bk
  half = d // 2
  why = fuse_dq_unsupported(d) if fuse_dq else None
  if why is not None:
    raise ValueError(f"fuse_dq=True {why}; use fuse_dq=False")
  if tp % outer:
    raise ValueError(f"padded length {tp} is not a multiple of {outer}")
  n_outer = tp // outer
  plan, nv = heavy_first_list(spec, length, seg, n_outer, bq, outer, transpose=True)
  # Unfused, a consumer warpgroup skips the products of a visit whose 64-key half the layout
  # leaves empty for the visit's 64 query rows (`pass_step`): on an H100 the kernel's GPU time
  # 0.6-6.5% lower over the four L=2048 cases, the 7B heads' most (BENCHMARKS.md, session 37).
  skip_halves = not fuse_dq
  if skip_halves:
    if bk != bq:  # (the table below is of bq x bq tiles, key tiles 2 a row)
      raise ValueError(f"dkv: passing over empty halves needs square tiles (BLOCK_KV={bk}, "
                       f"BLOCK_QI={bq})")
    # Each row's marks for warpgroup w's visit i at columns nv + 4 + w * nv + i (padding to
    # whole 128-byte rows again), of query tile plan[i] and key tile 2 * (the row's tile) + w:
    # 0 where that 64 x 64 tile holds an allowed pair, -1 where the warpgroup passes over it.
    table = nonempty_tiles(spec, length, tp, bq)
    key_tiles = 2 * plan[..., nv + 3, None] + jnp.arange(2)  # [B, n_outer, 2]
    marks = jnp.asarray(table)[plan[..., None, :nv], key_tiles[..., None]]
    marks = marks.reshape(*plan.shape[:2], 2 * nv)
    width = _whole_rows(3 * nv + 4)
    plan = jnp.concatenate([plan[..., :nv + 4], marks, jnp.zeros(
        plan.shape[:2] + (width - 3 * nv - 4,), jnp.int32)], -1)
  dtype = q.dtype
  scale = d ** -0.5
  c = scale * _LOG2E
  wgmma_l = plgpu.Layout.WGMMA
  col_l = wgmma_l.reduce(0)
  lc = (lambda x, layout: x) if interpret else plgpu.layout_cast
  qt, dot = _streamed_transposes(interpret, d, bq, q, do)  # Q^T, dO^T in the interpreter
  # Registers: the fused kernel's consumers need every one (in an earlier layout 24/240 spilled
  # 660 bytes against 820 at 40/232 and ran 10% faster); the unfused one's: `DKV_REGS`.
  if DKV_REGS not in (232, 240):
    raise ValueError(f"flash_mgpu.DKV_REGS={DKV_REGS}: must be 232 or 240")
  regs = (24, 240) if fuse_dq or DKV_REGS == 240 else (40, 232)

  iota = functools.partial(_iota, (bk, bq), interpret=interpret)
  load = functools.partial(_load, interpret=interpret)
  # Query heads a CTA walks (one when fused: its dQ adds trail the visits), the CTAs' (batch
  # row, head unit) pairs of `hpc` heads each, and the partials of one KV head's dK and dV.
  hpc = 1 if fuse_dq else dkv_heads(spec, length, n_outer, b, h, group)
  units = h // hpc
  chunks = group // hpc
  # (batch row, head unit) pairs a launch group holds. Unfused, one group: every pair's heaviest
  # key tiles first balances the tail best, and its CTAs add nothing into global memory. A
  # divisor of b * units, so that every group is whole and `launch_place` a bijection.
  pairs = flash.largest_divisor(b * units, FUSED_GROUP if fuse_dq else b * units)
  n_ds = DS_SLOTS if fuse_dq else 1
  pair_add = chunks == 2 and PAIR_ADD
  partials = chunks > 1 and not pair_add
  lag = DQ_LAG if fuse_dq else 0
  if fuse_dq and not 1 <= lag < n_ds:
    raise ValueError(f"flash_mgpu.DQ_LAG={DQ_LAG} must be at least 1 and below "
                     f"DS_SLOTS={DS_SLOTS}")

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, plan_ref, qt_ref, dot_ref,
             dq_ref, dk_ref, dv_ref, k_s, v_s, q_s, do_s, qt_s, dot_s, p_s, ds_s, dsq_s,
             dq_s, lse_s, delta_s, segk_s, segq_s, plan_s, plan_bar, k_bar, v_bar, sk_bar, q_bar,
             do_bar, qt_bar, dot_bar, lse_bar, delta_bar, sq_bar, add_bar, free, ds_ready,
             ds_free):
    j, bi, unit = launch_place(lax.axis_index("cta"), n_outer, pairs, units)
    head0 = unit * hpc  # the first of the CTA's query heads
    kvh = lax.div(head0, jnp.int32(group))
    wg = lax.axis_index("wg")
    query_rows = lambda i: pl.ds(pl.multiple_of(plan_s[i] * bq, bq), bq)

    def for_heads(body, carry=None):  # body(hh[, carry]) for the CTA's heads in turn
      if hpc == 1:  # no loop over heads (the steps' offset is then a traced 0)
        return body(0) if carry is None else body(0, carry)
      if carry is None:
        return pl.loop(0, hpc)(body)
      return lax.fori_loop(0, hpc, body, carry)

    @pl.when(wg == 2)
    def _producer():
      n_full, n_vis, one = _producer_start(plan_ref.at[bi, j], plan_s, plan_bar, nv, interpret,
                                           regs=regs[0])

      def fetch(hh, i, slot):  # query head head0 + hh's visit i
        head = head0 + hh
        rows = query_rows(i)
        plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, head], q_s.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, head], do_s.at[slot], do_bar.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[bi, head, rows], lse_s.at[slot], lse_bar.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[bi, head, rows], delta_s.at[slot],
                                delta_bar.at[slot])
        if interpret:
          plgpu.copy_gmem_to_smem(qt_ref.at[bi, head, :, rows], qt_s.at[slot], qt_bar.at[slot])
          plgpu.copy_gmem_to_smem(dot_ref.at[bi, head, :, rows], dot_s.at[slot],
                                  dot_bar.at[slot])

        @pl.when((i >= n_full) & (one == 0))  # the visits that compare segment ids
        def _():
          plgpu.copy_gmem_to_smem(seg_ref.at[bi, rows], segq_s.at[slot], sq_bar.at[slot])

      # Each head's visits in turn, as one stream through the slots.
      for_heads(lambda hh: _stream(n_vis, functools.partial(fetch, hh),
                                   lambda slot: plgpu.barrier_wait(free.at[slot]),
                                   streamed=hh * n_vis))

    def consumer(w):  # w: this warpgroup's index (a Python int when fused: see below)
      if not interpret:
        plgpu.set_max_registers(regs[1], action="increase")
      _wait_plan(lambda c: plan_bar.at[c], plan_s.shape[0])
      n_full, n_vis, one = plan_s[nv], plan_s[nv + 1], plan_s[nv + 2]
      total = n_vis * hpc  # the CTA's visits over its heads
      base = plan_s[nv + 3] * outer + w * bk
      keys = pl.ds(base, bk)
      plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, kvh], k_s.at[w], k_bar.at[w])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, kvh], v_s.at[w], v_bar.at[w])
      plgpu.copy_gmem_to_smem(seg_ref.at[bi, keys], segk_s.at[w], sk_bar.at[w])
      plgpu.barrier_wait(k_bar.at[w])
      plgpu.barrier_wait(v_bar.at[w])
      plgpu.barrier_wait(sk_bar.at[w])
      cols = pl.ds(w * half, half)  # this warpgroup's half of dQ's columns

      def keep_of(i, slot, masked):
        return _keep(spec, length, (bk, bq), 1, iota(1) + plan_s[i] * bq, iota(0) + base,
                     masked, segk_s.at[w], segq_s.at[slot], sq_bar.at[slot], interpret)

      bcast = lambda x: lax.broadcast_in_dim(x, (bk, bq), [1])

      def grads(s, dp, i, slot, masked):  # P^T and dS^T [BK, BQ] from S^T and dP^T
        plgpu.barrier_wait(lse_bar.at[slot])
        p = jnp.exp2(s * c - bcast(load(lse_s.at[slot], col_l)))
        if masked:
          p = jnp.where(keep_of(i, slot, masked), p, jnp.zeros_like(p))
        plgpu.barrier_wait(delta_bar.at[slot])
        return p, p * (dp - bcast(load(delta_s.at[slot], col_l)))

      def ds_slot(v):  # the dS^T slot of visit v (v >= -n_ds: the lagged visits before 0)
        return lax.rem(v + n_ds, n_ds)

      def share_ds(i, slot, ds16):
        """This warpgroup's dS^T of visit i into its slot, once both have read the dS^T of
        visit i - n_ds there."""
        pl.when(i >= n_ds)(lambda: plgpu.barrier_wait(ds_free.at[slot]))
        ds_s[slot, w] = ds16
        if interpret:  # dS itself, for the interpreter's untransposed wgmma operand
          dsq_s[slot, w] = ds16.T
        plgpu.commit_smem()
        plgpu.barrier_arrive(ds_ready.at[slot])

      def ds_operand(slot, kh):  # dS [BQ, BK] of warpgroup kh's keys
        if interpret:
          return dsq_s.at[slot, kh]
        return ds_s.at[slot, kh].transpose((1, 0))

      def dq_products(acc_ref, slot):  # acc += dS K[:, cols] over both warpgroups' keys (GPU)
        for kh in range(2):
          plgpu.wgmma(acc_ref, ds_operand(slot, kh), k_s.at[kh, :, cols])

      def dq_columns(slot):  # [BQ, D / 2]: this warpgroup's dQ columns of the visit in `slot`
        def f(acc_ref):
          dq_products(acc_ref, slot)
          return acc_ref[...]
        return pl.run_scoped(f, plgpu.ACC((bq, half), jnp.float32))

      def add_dq(i, x):
        """dQ[rows of visit i, this warpgroup's columns] += x, by a TMA reduce-add."""
        put(dq_ref.at[bi, query_rows(i), head0, cols], x, dq_s, add=True, reused=True)

      def put(target, x, x_s, add, reused):
        """target = x, or target += x with `add` (a TMA reduce-add), staged through x_s[w] (x's
        dtype); `reused`: a store from x_s[w] may still be reading it (the previous add's)."""
        if reused:
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        if add and interpret:  # no reduction_op there: read, add, write back (grid points run
          plgpu.copy_gmem_to_smem(target, x_s.at[w], add_bar.at[w])  # in turn)
          plgpu.barrier_wait(add_bar.at[w])
          x_s[w] = (x_s[w].astype(jnp.float32) + x.astype(jnp.float32)).astype(x.dtype)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(x_s.at[w], target)
          plgpu.wait_smem_to_gmem(0)
        else:
          x_s[w] = x
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(x_s.at[w], target, reduction_op="add" if add else None)

      def seen(i):  # whether the layout lets visit i's query rows see this warpgroup's keys
        return plan_s[nv + 4 + w * nv + i] >= 0

      def release_ds(i):  # visit i's dS^T read: its slot may take visit i + n_ds's
        pl.when(i + n_ds < n_vis)(lambda: plgpu.barrier_arrive(ds_free.at[ds_slot(i)]))

      def interpret_dq(i):  # visit i's dQ columns, in the interpreter
        @pl.when(i >= 0)
        def _():
          prev = ds_slot(i)
          plgpu.barrier_wait(ds_ready.at[prev])
          x = (_product(ds_operand(prev, 0), k_s.at[0, :, cols], (bq, half))
               + _product(ds_operand(prev, 1), k_s.at[1, :, cols], (bq, half)))
          release_ds(i)
          add_dq(i, x)

      def release(v, slot):
        """Frees `slot` after the CTA's visit v, unless no later visit will refill it."""
        pl.when(v + SLOTS < total)(lambda: plgpu.barrier_arrive(free.at[slot]))

      # The steps' `off`: the visits of the CTA's earlier heads, so that slots and barrier phases
      # run on through its heads as one stream (the producer's `streamed`).
      def interpret_step(i, carry, masked, off):
        dk, dv = carry
        slot = lax.rem(off + i, SLOTS)
        for bar in (q_bar, do_bar, qt_bar, dot_bar):
          plgpu.barrier_wait(bar.at[slot])
        s = _product(k_s.at[w], qt_s.at[slot], (bk, bq))
        dp = _product(v_s.at[w], dot_s.at[slot], (bk, bq))
        p, ds = grads(s, dp, i, slot, masked)
        p_s[w] = p.astype(dtype)
        ds16 = ds.astype(dtype)
        dslot = ds_slot(i)
        if fuse_dq:
          share_ds(i, dslot, ds16)
        else:
          ds_s[0, w] = ds16
        plgpu.commit_smem()
        dv = dv + _product(p_s.at[w], do_s.at[slot], (bk, d))
        dk = dk + _product(ds_s.at[dslot, w], q_s.at[slot], (bk, d))
        release(off + i, slot)
        if fuse_dq:
          interpret_dq(i - lag)
        return dk, dv

      def wait_next_operands(v):
        """On the GPU, the Q and dO copies of the CTA's visit v + 1 (the interpreter's steps wait
        their own at their start)."""
        @pl.when(v + 1 < total)
        def _():
          nxt = lax.rem(v + 1, SLOTS)
          plgpu.barrier_wait(q_bar.at[nxt])
          plgpu.barrier_wait(do_bar.at[nxt])

      def pass_step(i, carry, masked, off):
        """Visit i with this warpgroup's half empty by the layout (`skip_halves`): no products,
        but the same barrier waits as a visit's (each wait flips the phase it tracks) and the
        slot's release."""
        slot = lax.rem(off + i, SLOTS)
        if interpret:
          for bar in (q_bar, do_bar, qt_bar, dot_bar):
            plgpu.barrier_wait(bar.at[slot])
        plgpu.barrier_wait(lse_bar.at[slot])
        plgpu.barrier_wait(delta_bar.at[slot])
        if masked == "segments":
          plgpu.barrier_wait(sq_bar.at[slot])
        if not interpret:
          wait_next_operands(off + i)  # (as `gpu_step` waits them)
        release(off + i, slot)
        return carry

      def gpu_step(i, carry, masked, off):
        dk, dv = carry
        slot = lax.rem(off + i, SLOTS)
        dslot, prev = ds_slot(i), ds_slot(i - lag)

        def transposed_products(s_ref, dp_ref):
          plgpu.wgmma(s_ref, k_s.at[w], q_s.at[slot].transpose((1, 0)))
          plgpu.wgmma(dp_ref, v_s.at[w], do_s.at[slot].transpose((1, 0)))
          return s_ref[...], dp_ref[...]

        s, dp = pl.run_scoped(transposed_products, plgpu.ACC((bk, bq), jnp.float32),
                              plgpu.ACC((bk, bq), jnp.float32))
        p, ds = grads(s, dp, i, slot, masked)
        p16, ds16 = p.astype(dtype), ds.astype(dtype)
        if fuse_dq:
          share_ds(i, dslot, ds16)
          pl.when(i >= lag)(lambda: plgpu.barrier_wait(ds_ready.at[prev]))
        # the products' A operands in registers, kept there by the barrier
        dk, dv, p16, ds16 = lax.optimization_barrier((dk, dv, p16, ds16))

        def accumulate(refs):  # (shared-memory views made here: closed over, 0.11 rejects them)
          dv_ref, dk_ref = refs
          plgpu.wgmma(dv_ref, p16, do_s.at[slot])
          plgpu.wgmma(dk_ref, ds16, q_s.at[slot])
          wait_next_operands(off + i)  # while these products run

        dv, dk = pl.run_state(accumulate)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
        if not fuse_dq and RELEASE_FENCE:  # lse_s, delta_s (and segq_s) read by plain loads
          plgpu.commit_smem()  # (`_stream`); the fused body's share_ds fenced after them already
        release(off + i, slot)
        if fuse_dq:
          # Visit i - lag's dQ columns, after dV and dK: issued with them (its accumulator beside
          # theirs and the register operands) it spilled more and ran 1.03x slower on the 1.5B
          # heads, 0.99x on the 7B's (session 12, without turns). Unconditional: while i < lag
          # the slot holds nothing yet and the product is dropped, so the wgmma needs no branch.
          x = dq_columns(prev)

          @pl.when(i >= lag)
          def _():
            release_ds(i - lag)
            add_dq(i - lag, x)
        return dk, dv

      step = interpret_step if interpret else gpu_step
      if skip_halves:
        full_step = step

        def step(i, carry, masked, off):
          return lax.cond(seen(i), lambda c: full_step(i, c, masked=masked, off=off),
                          lambda c: pass_step(i, c, masked=masked, off=off), carry)
      zeros = lc(jnp.zeros((bk, d), jnp.float32), wgmma_l)
      if not interpret:
        @pl.when(total > 0)
        def _():
          plgpu.barrier_wait(q_bar.at[0])
          plgpu.barrier_wait(do_bar.at[0])
      dk, dv = for_heads(lambda hh, carry: _visit_loops(
          functools.partial(step, off=hh * n_vis), n_full, n_vis, one, carry),
          (zeros, zeros))
      for back in range(lag, 0, -1) if fuse_dq else ():  # the last `lag` visits' dQ columns
        last = n_vis - back
        if interpret:
          interpret_dq(last)
        else:
          slot = ds_slot(last)
          pl.when(last >= 0)(lambda: plgpu.barrier_wait(ds_ready.at[slot]))
          x = dq_columns(slot)
          pl.when(last >= 0)(functools.partial(add_dq, last, x))
      out = (lax.rem(unit, jnp.int32(chunks)), bi, keys, kvh) if partials else (bi, keys, kvh)
      # Fused, the other warpgroup may still read k_s[w] for its last dQ: dK goes through v_s[w]
      # too, each store once the last one from there has read it.
      for x, ref, x_s in ((dk * scale, dk_ref, v_s if fuse_dq else k_s), (dv, dv_ref, v_s)):
        put(ref.at[out], x.astype(dtype), x_s, add=pair_add, reused=fuse_dq)
      plgpu.wait_smem_to_gmem(0)

    if fuse_dq:  # one copy of the body per warpgroup, so that dQ's column slices are static
      for w in range(2):
        pl.when(wg == w)(functools.partial(consumer, w))
    else:
      pl.when(wg < 2)(functools.partial(consumer, wg))

  tiled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
  tiled32 = dict(transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)))
  small = (1, 8, 64)  # a buffer this body does not use
  scratch = [
      plgpu.SMEM((2, bk, d), dtype, **tiled), plgpu.SMEM((2, bk, d), dtype, **tiled),
      plgpu.SMEM((SLOTS, bq, d), dtype, **tiled), plgpu.SMEM((SLOTS, bq, d), dtype, **tiled),
      plgpu.SMEM((SLOTS, d, bq) if interpret else small, dtype, **tiled),
      plgpu.SMEM((SLOTS, d, bq) if interpret else small, dtype, **tiled),
      plgpu.SMEM((2, bk, bq) if interpret else small, dtype, **tiled),
      # dS^T tiles: [slot, warpgroup] when fused (both warpgroups read both), else the
      # staging copy of the interpreter's product
      plgpu.SMEM((n_ds, 2, bk, bq) if fuse_dq else (1, 2, bk, bq) if interpret
                 else (1,) + small, dtype, **tiled),
      plgpu.SMEM((n_ds, 2, bq, bk) if interpret and fuse_dq else (1,) + small, dtype, **tiled),
      # float32 staging of dQ's reduce-adds (fused), one [64, D / 2] a warpgroup
      plgpu.SMEM((2, bq, half) if fuse_dq else (1, 8, 32), jnp.float32,
                 **tiled32),
      plgpu.SMEM((SLOTS, bq), jnp.float32), plgpu.SMEM((SLOTS, bq), jnp.float32),
      plgpu.SMEM((2, bk), jnp.int32), plgpu.SMEM((SLOTS, bq), jnp.int32),
      plgpu.SMEM((plan.shape[-1],), jnp.int32),
      plgpu.Barrier(num_barriers=len(plan_pieces(plan.shape[-1]))),  # plan row, by piece
      plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
      *[plgpu.Barrier(num_barriers=SLOTS) for _ in range(7)],
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_arrivals=2, num_barriers=SLOTS),
      plgpu.Barrier(num_arrivals=2, num_barriers=n_ds),
      plgpu.Barrier(num_arrivals=2, num_barriers=n_ds)]
  inputs = (q, k, v, do, lse, delta, seg, plan, qt, dot)
  # Refs aliased in and out, then outputs, by name: the reduce-add targets (dQ when fused, dK
  # and dV with `pair_add`).
  targets = {}
  if fuse_dq:
    targets["dq"] = _zeroed(q.shape)
  if pair_add:
    targets["dk"], targets["dv"] = _zeroed(k.shape, dtype), _zeroed(k.shape, dtype)
  out_type = {}
  if "dk" not in targets:  # written, not added into: outputs (with partials, one a chunk)
    out_type["dk"] = out_type["dv"] = jax.ShapeDtypeStruct(
        ((chunks,) if partials else ()) + k.shape, dtype)

  def body(*refs):
    ins = refs[:len(inputs)]
    named = dict(zip(list(targets) + list(out_type), refs[len(inputs):]))
    pl.run_scoped(functools.partial(kernel, *ins, *(named.get(n) for n in ("dq", "dk", "dv"))),
                  *scratch, collective_axes="wg")

  outs = pl.kernel(
      body,
      out_type=list(out_type.values()),
      # one axis, launched in order (see the docstring and `FUSED_GROUP`)
      mesh=plgpu.Mesh(grid=(n_outer * b * units,), grid_names=("cta",), num_threads=3,
                      thread_name="wg"),
      compiler_params=None if interpret else plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params() if interpret else False,
      name="block_sparse_attention_dkv_mgpu",  # as the forward's: profiles tell them apart
  )(*inputs, *targets.values())
  got = {**{n: t[...] for n, t in targets.items()}, **dict(zip(out_type, outs or ()))}
  dq_out = (got["dq"] * scale).astype(dtype) if fuse_dq else None
  dk, dv = (got[n].astype(dtype) for n in ("dk", "dv"))
  if partials:
    dk = dk.astype(jnp.float32).sum(0).astype(k.dtype)
    dv = dv.astype(jnp.float32).sum(0).astype(v.dtype)
  return dq_out, dk, dv


def dq(q, k, v, seg, o, do, lse, spec: masks.MaskSpec, length: int, interpret: bool = False):
  """(dq [B, Tp, H, D], delta [B, H, Tp]) of `flash._backward`'s problem: what its Triton dq
  kernel computes (delta = sum_d o * do, for the dk/dv kernel), on the forward's tiling.

  One CTA holds 128 query rows of one head (two consumer warpgroups of 64; Q, dO, lse and delta
  resident) and walks the key tiles they see, heaviest query tiles first; the producer streams
  K and V per visit. A visit is S = Q K^T and dP = dO V^T issued together (K^T and V^T as
  transposed views of the streamed tiles), P and dS in registers, then dQ += dS K while the next
  tile's barriers are awaited. Like the dk/dv kernel (and unlike the forward), no turns (taking
  them made it 1.04-1.08x slower, session 33).

  delta needs each row's O, read once: the producer copies the CTA's 128 O rows into K slot 1
  before that slot's first tile (visit 1), and streams visit 1 only once both consumers have
  read them (`o_free`); visit 0's products hide the wait, and no 32 KB O buffer is needed
  beside Q, dO and two K/V slots (192 KB; with one, 224 KB of the 227). Returns dq in the
  inputs' dtype."""
  plgpu = _plgpu()
  b, tp, h, d = q.shape
  if tp % OUTER:
    raise ValueError(f"padded length {tp} is not a multiple of {OUTER}")
  if SLOTS < 2 or BLOCK_K != OUTER:
    raise ValueError(f"flash_mgpu.SLOTS={SLOTS}, BLOCK_K={BLOCK_K}: the dq kernel stages a CTA's "
                     f"{OUTER} O rows in K slot 1, which needs two slots of {OUTER} keys")
  group = h // k.shape[2]
  bq, bk = BLOCK_Q, BLOCK_K
  n_outer = tp // OUTER
  plan, nv = heavy_first_list(spec, length, seg, n_outer, OUTER, bk, transpose=False)
  dtype = q.dtype
  scale = d ** -0.5
  c = scale * _LOG2E
  wgmma_l = plgpu.Layout.WGMMA
  row_l = wgmma_l.reduce(1)
  lc = (lambda x, layout: x) if interpret else plgpu.layout_cast
  kt, vt = _streamed_transposes(interpret, d, bk, k, v)  # K^T, V^T in the interpreter
  iota = functools.partial(_iota, (bq, bk), interpret=interpret)
  load = functools.partial(_load, interpret=interpret)

  def kernel(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, seg_ref, plan_ref, kt_ref, vt_ref,
             dq_ref, delta_ref, q_s, do_s, k_s, v_s, kt_s, vt_s, ds_s, lse_s, delta_s, segq_s,
             segk_s, plan_s, plan_bar, q_bar, do_bar, lse_bar, sq_bar, o_bar, o_free, k_bar,
             v_bar, kt_bar, vt_bar, sk_bar, free):
    j, bi, head = launch_place(lax.axis_index("cta"), n_outer, b * h, h)
    kvh = lax.div(head, jnp.int32(group))
    wg = lax.axis_index("wg")

    @pl.when(wg == 2)
    def _producer():
      n_full, n_vis, one = _producer_start(plan_ref.at[bi, j], plan_s, plan_bar, nv, interpret)
      rows = pl.ds(pl.multiple_of(plan_s[nv + 3] * OUTER, OUTER), OUTER)
      plgpu.copy_gmem_to_smem(o_ref.at[bi, rows, head], k_s.at[1], o_bar.at[0])

      def fetch(i, slot):
        keys = pl.ds(pl.multiple_of(plan_s[i] * bk, bk), bk)
        plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, kvh], k_s.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, kvh], v_s.at[slot], v_bar.at[slot])
        if interpret:
          plgpu.copy_gmem_to_smem(kt_ref.at[bi, kvh, :, keys], kt_s.at[slot], kt_bar.at[slot])
          plgpu.copy_gmem_to_smem(vt_ref.at[bi, kvh, :, keys], vt_s.at[slot], vt_bar.at[slot])

        @pl.when((i >= n_full) & (one == 0))  # the visits that compare segment ids
        def _():
          plgpu.copy_gmem_to_smem(seg_ref.at[bi, keys], segk_s.at[slot], sk_bar.at[slot])

      pl.when(n_vis > 0)(lambda: fetch(0, 0))
      plgpu.barrier_wait(o_free.at[0])  # O read: slot 1 may take its first tile
      _stream(jnp.maximum(n_vis - 1, 0), lambda i, slot: fetch(i + 1, slot),
              lambda slot: plgpu.barrier_wait(free.at[slot]), streamed=1)

    def delta_of(w):  # warpgroup w's rows of O (staged in K slot 1) times dO, summed per row
      plgpu.barrier_wait(o_bar.at[0])
      plgpu.barrier_wait(do_bar.at[w])
      o_rows = load(k_s.at[1, pl.ds(w * bq, bq)], wgmma_l).astype(jnp.float32)
      delta = (o_rows * load(do_s.at[w], wgmma_l).astype(jnp.float32)).sum(axis=1)
      plgpu.commit_smem()  # plain loads of slot 1 before its refill by TMA (`_stream`)
      plgpu.barrier_arrive(o_free.at[0])
      delta_s[w] = delta

    @pl.when(wg < 2)
    def _consumer():
      if not interpret:
        plgpu.set_max_registers(232, action="increase")
      _wait_plan(lambda c: plan_bar.at[c], plan_s.shape[0])
      n_full, n_vis, one = plan_s[nv], plan_s[nv + 1], plan_s[nv + 2]
      base = plan_s[nv + 3] * OUTER + wg * bq
      rows = pl.ds(base, bq)
      # one barrier per copy: a copy's arrivals are a whole warpgroup's
      plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, head], do_s.at[wg], do_bar.at[wg])
      plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, head], q_s.at[wg], q_bar.at[wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[bi, head, rows], lse_s.at[wg], lse_bar.at[wg])
      plgpu.copy_gmem_to_smem(seg_ref.at[bi, rows], segq_s.at[wg], sq_bar.at[wg])
      # Static row slices of slot 1 (a warpgroup's index is traced): one branch a warpgroup.
      for w in range(2):
        pl.when(wg == w)(functools.partial(delta_of, w))
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(delta_s.at[wg], delta_ref.at[bi, head, rows])
      plgpu.barrier_wait(lse_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])
      plgpu.barrier_wait(sq_bar.at[wg])
      # The rows' lse and delta stay [BQ] vectors across the loop and are broadcast per visit: a
      # [BQ, BK] broadcast held across it is 64 registers a thread (see `_keep`).
      bcast = lambda x: lax.broadcast_in_dim(x, (bq, bk), [0])
      lse_rows = load(lse_s.at[wg], row_l)
      delta_rows = load(delta_s.at[wg], row_l)

      def keep_of(i, slot, masked):
        return _keep(spec, length, (bq, bk), 0, iota(0) + base, iota(1) + plan_s[i] * bk,
                     masked, segq_s.at[wg], segk_s.at[slot], sk_bar.at[slot], interpret)

      def grads(s, dp, i, slot, masked):  # dS [BQ, BK] from S and dP
        p = jnp.exp2(s * c - bcast(lse_rows))
        if masked:
          p = jnp.where(keep_of(i, slot, masked), p, jnp.zeros_like(p))
        return p * (dp - bcast(delta_rows))

      def release(i, slot, masked):
        if masked == "segments" and RELEASE_FENCE:  # segk_s[slot] read by plain loads
          plgpu.commit_smem()
        pl.when(i + SLOTS < n_vis)(lambda: plgpu.barrier_arrive(free.at[slot]))

      def interpret_step(i, acc, masked):
        slot = lax.rem(i, SLOTS)
        for bar in (k_bar, v_bar, kt_bar, vt_bar):
          plgpu.barrier_wait(bar.at[slot])
        s = _product(q_s.at[wg], kt_s.at[slot], (bq, bk))
        dp = _product(do_s.at[wg], vt_s.at[slot], (bq, bk))
        ds_s[wg] = grads(s, dp, i, slot, masked).astype(dtype)
        plgpu.commit_smem()
        acc = acc + _product(ds_s.at[wg], k_s.at[slot], (bq, d))
        release(i, slot, masked)
        return acc

      def gpu_step(i, acc, masked):
        slot = lax.rem(i, SLOTS)

        def products(s_ref, dp_ref):
          plgpu.wgmma(s_ref, q_s.at[wg], k_s.at[slot].transpose((1, 0)))
          plgpu.wgmma(dp_ref, do_s.at[wg], v_s.at[slot].transpose((1, 0)))
          return s_ref[...], dp_ref[...]

        s, dp = pl.run_scoped(products, plgpu.ACC((bq, bk), jnp.float32),
                              plgpu.ACC((bq, bk), jnp.float32))
        ds16 = grads(s, dp, i, slot, masked).astype(dtype)
        acc, ds16 = lax.optimization_barrier((acc, ds16))

        def accumulate(acc_ref):
          plgpu.wgmma(acc_ref, ds16, k_s.at[slot])

          @pl.when(i + 1 < n_vis)  # the next tile's operands, while this product runs
          def _():
            nxt = lax.rem(i + 1, SLOTS)
            plgpu.barrier_wait(k_bar.at[nxt])
            plgpu.barrier_wait(v_bar.at[nxt])

        acc = pl.run_state(accumulate)(plgpu.ACC.init(acc))
        release(i, slot, masked)
        return acc

      step = interpret_step if interpret else gpu_step
      if not interpret:
        @pl.when(n_vis > 0)
        def _():
          plgpu.barrier_wait(k_bar.at[0])
          plgpu.barrier_wait(v_bar.at[0])
      acc = _visit_loops(step, n_full, n_vis, one, lc(jnp.zeros((bq, d), jnp.float32), wgmma_l))
      q_s[wg] = (acc * scale).astype(dtype)  # dQ staged in Q's buffer (its last read is done)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_s.at[wg], dq_ref.at[bi, rows, head])
      plgpu.wait_smem_to_gmem(0)

  tiled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
  small = (1, 8, 64)  # a buffer this body does not use
  kernel.__name__ = "block_sparse_attention_dq_mgpu"  # Mosaic GPU names the kernel after it
  dq_, delta = plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
      scratch_types=[
          plgpu.SMEM((2, bq, d), dtype, **tiled), plgpu.SMEM((2, bq, d), dtype, **tiled),
          plgpu.SMEM((SLOTS, bk, d), dtype, **tiled), plgpu.SMEM((SLOTS, bk, d), dtype, **tiled),
          plgpu.SMEM((SLOTS, d, bk) if interpret else small, dtype, **tiled),
          plgpu.SMEM((SLOTS, d, bk) if interpret else small, dtype, **tiled),
          # dS in shared memory for the interpreter's wgmma; on the GPU it stays in registers
          plgpu.SMEM((2, bq, bk) if interpret else small, dtype, **tiled),
          plgpu.SMEM((2, bq), jnp.float32), plgpu.SMEM((2, bq), jnp.float32),
          plgpu.SMEM((2, bq), jnp.int32), plgpu.SMEM((SLOTS, bk), jnp.int32),
          plgpu.SMEM((plan.shape[-1],), jnp.int32),
          plgpu.Barrier(num_barriers=len(plan_pieces(plan.shape[-1]))),  # plan row, by piece
          *[plgpu.Barrier(num_barriers=2) for _ in range(4)],  # Q, dO, lse, ids: by warpgroup
          plgpu.Barrier(num_barriers=1),  # O in slot 1
          plgpu.Barrier(num_arrivals=2, num_barriers=1),  # O read by both
          *[plgpu.Barrier(num_barriers=SLOTS) for _ in range(5)],  # K, V, K^T, V^T, key ids
          plgpu.Barrier(num_arrivals=2, num_barriers=SLOTS)],  # slot released by both
      grid=(n_outer * b * h,), grid_names=("cta",),
      num_threads=3, thread_name="wg",
      compiler_params=None if interpret else plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params() if interpret else None,
  )(q, k, v, o, do, lse, seg, plan, kt, vt)
  return dq_, delta


def _interpret_params():
  plgpu = _plgpu()
  if hasattr(plgpu, "InterpretParams"):  # public from jax 0.11
    return plgpu.InterpretParams()
  from jax._src.pallas.mosaic_gpu.interpret import params  # jax 0.10: no public name
  return params.InterpretGPUParams()
