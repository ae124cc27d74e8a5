"""Block-sparse flash attention over the static training layouts, forward and backward (Pallas).

The row layout is `masks.layout(spec, L)`: T = spec.num_streams * L tokens whose position and
stream follow from their index, so which (query tile, key tile) pairs hold allowed pairs is known
on the host (`masks.tile_map`). Each query tile loops over its non-empty key tiles only, as runs
of consecutive tiles: first the full ones (no layout mask), then the partial ones (layout mask
from indices). Segment ids (packed samples) are runtime data: before the kernels run, XLA narrows
each run to the tiles whose ids can meet the outer tile's (`segment_runs`), so a sample packed
after others never visits their keys, and an outer tile whose visits all lie inside one segment
skips the in-kernel segment comparison.

Grouped-query attention: the forward and dq kernels run per query head and read their KV head in
place, so repeated K/V are never materialised; the dk/dv kernel runs per KV head and loops over
the heads of its group, split over `Tiles.dkv_head_split` programs whose float32 dK/dV partials
(one per program, [split, B, T, K, D]; never one per query head unless split equals the group)
are summed afterwards. `flash_mgpu` holds Mosaic GPU (Hopper) versions of the forward, dq and
dk/dv kernels (the default there, `Tiles.forward` / `Tiles.dq` / `Tiles.dkv`, dq and dk/dv for
the diffusion layouts at head_dim 128; the dk/dv kernel can also accumulate dQ:
`Tiles.fuse_dq`), on the same plans. On a TPU, `splash` runs jax's splash attention instead.

Softmax runs in base 2 (scores pre-multiplied by log2 e) with float32 statistics and
accumulators; the saved log-sum-exp is in that base too.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dllm_jax import masks

_MASKED = -0.7 * float(np.finfo(np.float32).max)  # finite: fully masked padding rows stay NaN-free
_LOG2E = math.log2(math.e)
# Whether the Triton dq kernel computes delta = sum_d o * do for the backward (True) or XLA's pass
# over O and dO does (False; kept to time one against the other: benchmarks/attention.py
# --variants 'xla_delta:flash.DELTA_IN_DQ=0,tiles.dq=triton'). The Mosaic dq kernel, "auto"'s
# choice on sm_90 for the diffusion layouts at head_dim 128, always computes delta itself.
DELTA_IN_DQ = True
# Whether the Triton dq kernel's body issues dP = dO V^T right after S = Q K^T, before the
# softmax between them (True), or after it (False: the order since session 3). Same products, so
# the same bits. Nsight Compute (H100, session 41) found this kernel latency-bound: 2 warps a
# scheduler, 0.41 of them eligible, tensor pipe 45%. Timed (session 42, H100, dq alone, 1.5B
# heads, L=2048): 0.96x the time on 2L, 1.03x on 3L; off.
DQ_DP_FIRST = False


def _whole(a):
  """A BlockSpec that hands every program all of `a` (the host plans and their run bounds)."""
  return pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)


def _dot(a, b, trans_a=False, trans_b=False):
  """2-D matmul with float32 accumulation (what Pallas' GPU dot does; kept local across jax versions)."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes (powers of two, >= 16), Triton launch parameters of the three kernels, and how
  the dk/dv kernel splits a group's heads."""

  # The forward's query tiles and pipeline depth: 64 rows with 3 stages beat 128 rows with 2 on the
  # H100 by 5-9% for the 1.5B heads' forward at L=2048 and tied for the 7B's (BENCHMARKS.md,
  # session 6); 128 rows hold a 128x128 float32 accumulator that spills at 255 registers.
  block_q: int = 64
  block_k: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_warps: int = 4
  num_warps_bwd: int = 4  # the dq kernel
  num_warps_dkv: int = 0  # the dk/dv kernel (0: num_warps_bwd)
  # Programs the query heads of one KV head's group are split over in the dk/dv kernel (the
  # largest divisor of the group size not above it); > 1 sums float32 partials in XLA. 2 was
  # fastest for the 1.5B heads on the H100 (fwd+bwd 1.47 ms vs 1.54 for 3 and 2.06 for 1, L=2048);
  # a group of 7 (the 7B) cannot be halved and runs unsplit.
  dkv_head_split: int = 2
  num_stages: int = 3  # the forward kernel
  num_stages_bwd: int = 2
  max_run: int = 0  # longest run of consecutive tiles one inner loop visits (0: no limit)
  # Which forward kernel runs: "mosaic" (`flash_mgpu`, warp-specialised wgmma; 1.10-1.23x the
  # Triton forward on the H200, BENCHMARKS.md session 9), "triton" (below), or "auto": mosaic on
  # an sm_90 GPU for the problems it covers, else triton. The backward is Triton's unless `dkv`.
  forward: str = "auto"
  # Which dk/dv kernel runs: "triton" (below), "mosaic" (`flash_mgpu.dkv`, TMA + wgmma, one or
  # several query heads of a group per CTA: `flash_mgpu.DKV_HEADS`; sm_90 only), or "auto": as
  # `forward`, but only where the Mosaic kernel was timed (diffusion layouts, head_dim 128).
  # Since session 12 (its warpgroups no longer take turns on the tensor cores) it makes fwd+bwd
  # 1.02-1.05x faster there on the H200, 0.98x for the 7B heads' 3L layout (BENCHMARKS.md,
  # session 12). `dkv_head_split`: Triton's only.
  dkv: str = "auto"
  # With dkv="mosaic" and head_dim 128: the dk/dv kernel also accumulates dQ (FlashAttention-3's
  # TMA reduce-adds into float32) and no dq kernel runs. Exact; on the H200, since its CTAs are
  # launched in groups of 16 (batch row, head) pairs (`flash_mgpu.FUSED_GROUP`), its fwd+bwd is
  # level with the default's: 0.98-1.00x the time at L=2048 (wall, one run), GPU time 1123 vs
  # 1123 us (1.5B 2L) and 2470 vs 2483 (7B 2L; BENCHMARKS.md, session 13). Opt-in: not faster in
  # one run, and it holds a float32 dQ ([B, T, H, D]) through the backward.
  fuse_dq: bool = False
  # Which dq kernel runs (it also computes delta for the dk/dv kernel): "triton" (below),
  # "mosaic" (`flash_mgpu.dq`: the forward's tiling, TMA + wgmma; sm_90 only), or "auto": mosaic on
  # sm_90 where it has been run there (diffusion layouts, head_dim 128), else triton. Unused with
  # `fuse_dq`. The Mosaic kernel took 1.01-1.11x Triton's GPU time on three of the four L=2048
  # cases (sessions 33-34) and was removed in session 38; with session 42's partial-tile masks from
  # key intervals it takes 0.76-0.78x (288 against 378 us at the 1.5B heads' 2L, 978 against 1263
  # at the 7B's 3L; H100, same run, BENCHMARKS.md session 42), so "auto" picks it since then. dQ =
  # dS K from a dS the dk/dv kernel stored (sessions 34-36) was removed in session 39; Triton
  # programs over two heads of a group (1.9-2.1x slower) in session 40.
  dq: str = "auto"

  def __post_init__(self):
    for name in ("forward", "dkv", "dq"):
      allowed = ("auto", "triton", "mosaic")
      if getattr(self, name) not in allowed:
        raise ValueError(f"Tiles.{name}={getattr(self, name)!r}: expected one of {allowed}")
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.name in ("forward", "dkv", "dq"):
        continue
      if f.name == "fuse_dq":
        if v and self.dkv != "mosaic":
          raise ValueError(f"Tiles.fuse_dq=True needs dkv='mosaic' (dkv={self.dkv!r}): dQ is "
                           "fused into the Mosaic GPU dk/dv kernel only")
        continue
      if f.name.startswith("block_") and (v < 16 or v & (v - 1)):
        raise ValueError(f"Tiles.{f.name}={v}: must be a power of two >= 16")
      if f.name == "dkv_head_split" and v < 1:
        raise ValueError(f"Tiles.dkv_head_split={v}: must be >= 1")
      zero_ok = f.name == "num_warps_dkv"  # 0: num_warps_bwd
      if f.name.startswith("num_warps") and v not in (1, 2, 4, 8, 16) and not (zero_ok and v == 0):
        raise ValueError(f"Tiles.{f.name}={v}: must be a power of two <= 16"
                         + (" (or 0: num_warps_bwd)" if zero_ok else ""))


@functools.lru_cache(maxsize=256)
def visit_runs(spec: masks.MaskSpec, length: int, block_rows: int, block_cols: int,
               transpose: bool, max_run: int = 0, num_outer: int = 0):
  """Host-side visit plan of the non-empty tiles, as runs of consecutive inner tiles.

  For each outer tile i (query tiles; key tiles when `transpose`), runs r < n_runs[i] cover
  inner tiles first[i, r] .. first[i, r] + count[i, r] - 1; runs r < n_full_runs[i] hold full
  tiles only, the rest partial ones. Runs keep tile addresses affine in the loop index, which lets
  the compiler prefetch the next tile; `max_run` > 0 caps their length (1 = one tile per run).
  `num_outer` pads the plan with empty outer tiles up to the kernel's grid (its rows are padded to
  the largest tile size, so it may have more outer tiles than the layout): the kernels read the
  plan, unchecked, at every grid index. Returns (first, count, n_full_runs, n_runs), int32.
  """
  tmap = masks.tile_map(spec, length, block_rows, block_cols)
  if transpose:
    tmap = tmap.T
  if num_outer < tmap.shape[0] and num_outer:
    raise ValueError(f"num_outer={num_outer} < the layout's {tmap.shape[0]} outer tiles")
  plans = []
  for row in tmap:
    plan = []
    for cls in (masks.TILE_FULL, masks.TILE_PARTIAL):
      tiles = np.flatnonzero(row == cls)
      runs = np.split(tiles, np.flatnonzero(np.diff(tiles) != 1) + 1) if tiles.size else []
      for run in runs:
        step = max_run or run.size
        plan += [(cls, run[i], min(step, run.size - i)) for i in range(0, run.size, step)]
    plans.append(plan)
  plans += [[] for _ in range(num_outer - len(plans))]  # grid padding: nothing to visit
  width = max(1, max(len(p) for p in plans))
  first = np.zeros((len(plans), width), np.int32)
  count = np.zeros((len(plans), width), np.int32)
  for i, plan in enumerate(plans):
    for r, (_, f, c) in enumerate(plan):
      first[i, r], count[i, r] = f, c
  n_full = np.array([sum(c == masks.TILE_FULL for c, _, _ in p) for p in plans], np.int32)
  n_runs = np.array([len(p) for p in plans], np.int32)
  return first, count, n_full, n_runs


def tile_id_range(segments_BT, tile: int):
  """(min, max) int32 [B, Tp // tile] each: the segment ids each `tile`-token tile holds."""
  b, tp = segments_BT.shape
  s = segments_BT.reshape(b, tp // tile, tile)
  return s.min(-1), s.max(-1)


def segment_runs(plan, segments_BT, rows: int, cols: int, transpose: bool):
  """The static plan narrowed by this batch's segment ids (XLA, before the kernels run).

  Segment ids are data, so `visit_runs` counts every tile the layout allows. A tile whose id
  range [min, max] does not meet the outer tile's holds no pair of one segment: each run is cut
  to the span from its first to its last tile that meets (a tile inside the span that does not
  is still visited and masked in-kernel: ids need not be sorted). Query tiles have `rows` rows,
  key tiles `cols`; `transpose` as in `visit_runs`; segments_BT int32 [B, Tp], Tp a multiple of
  both tile sizes and at least the plan's outer tiles.

  Returns lo, hi int32 [B, n_outer, R] (run r visits inner tiles lo..hi-1, none when hi == lo)
  and one_segment int32 [B, n_outer]: 1 when every query and key of every visit shares one id,
  so the kernel needs no segment comparison there.
  """
  first, count, _, n_runs = plan
  id_range = functools.partial(tile_id_range, segments_BT)
  (olo, ohi), (ilo, ihi) = ((id_range(cols), id_range(rows)) if transpose
                            else (id_range(rows), id_range(cols)))
  n_outer, width = first.shape
  m = np.arange(max(1, int(count.max())))
  valid = ((m[None, None, :] < count[:, :, None])
           & (np.arange(width)[None, :, None] < n_runs[:, None, None]))  # [n_outer, R, M]
  inner = np.where(valid, first[:, :, None] + m, 0)
  a_lo, a_hi = ilo[:, inner], ihi[:, inner]  # [B, n_outer, R, M]
  o_lo, o_hi = olo[:, :n_outer, None, None], ohi[:, :n_outer, None, None]
  meets = valid & (a_lo <= o_hi) & (a_hi >= o_lo)
  any_meets = meets.any(-1)
  lo_off = jnp.argmax(meets, -1)
  hi_off = m.size - jnp.argmax(meets[..., ::-1], -1)
  lo = jnp.where(any_meets, first + lo_off, first).astype(jnp.int32)
  hi = jnp.where(any_meets, first + hi_off, first).astype(jnp.int32)
  visited = (m >= lo_off[..., None]) & (m < hi_off[..., None]) & any_meets[..., None]
  same = (a_lo == a_hi) & (a_lo == o_lo) & (o_lo == o_hi)
  one = jnp.all(~visited | same, axis=(-2, -1)) & (olo[:, :n_outer] == ohi[:, :n_outer])
  return lo, hi, one.astype(jnp.int32)


def _visit(plan_refs, outer, tile, body, carry):
  """Runs `body(start, carry, masked)` over the planned tiles of outer tile `outer`; plan_refs
  are (lo, hi) of `segment_runs` for this batch row and (n_full_runs, n_runs) of `visit_runs`."""
  lo_ref, hi_ref, nfull_ref, nruns_ref = plan_refs

  def run(r, carry, masked):
    step = lambda j, c: body(pl.multiple_of(j * tile, tile), c, masked)
    return lax.fori_loop(lo_ref[outer, r], hi_ref[outer, r], step, carry)

  n_full = nfull_ref[outer]
  carry = lax.fori_loop(0, n_full, functools.partial(run, masked=False), carry)
  return lax.fori_loop(n_full, nruns_ref[outer], functools.partial(run, masked=True), carry)


def _by_segments(one_segment, visit):
  """visit(compare_segments), without the comparison when the outer tile lies in one segment."""
  return lax.cond(one_segment != 0, lambda: visit(False), lambda: visit(True))


def _keep(compare_segments, masked, seg_q, seg_k, allowed):
  """Which scores of a tile count; None when all do (a full tile inside one segment)."""
  keep = seg_q[:, None] == seg_k[None, :] if compare_segments else None
  if masked:
    keep = allowed() if keep is None else keep & allowed()
  return keep


def key_bounds(spec: masks.MaskSpec, length: int, q_idx):
  """The keys layout index `q_idx` may attend (segments aside), as half-open intervals
  ((lo, hi), ...) of layout indices, lo None for 0: a causal or block-causal row sees a prefix, a
  noisy diffusion row its own noisy block and the clean blocks before it, a clean row the clean
  blocks up to its own. Keys at padding indices (>= num_streams * length) are in none; a padding
  query's intervals are of no consequence (its output row is dropped).

  The Mosaic GPU kernels' mask (`flash_mgpu._keep`): computed on the vector of a tile's queries,
  so that each score costs a few compares (`keys_in`). `_layout_allowed`'s per-pair stream and
  block arithmetic on their [rows, cols] tiles made the forward 1.13-1.16x slower (session 42,
  H100). The Triton kernels keep `_layout_allowed`, whose row and column parts Triton computes on
  [BQ, 1] and [1, BK] vectors: their dq kernel ran 2% slower with these intervals. Blocks by
  shifts, since Mosaic GPU does not lower integer division of vectors: the block size must be a
  power of two (`flash_mgpu.unsupported`).
  """
  total = spec.num_streams * length
  b = spec.block_size
  shift = b.bit_length() - 1
  block_start = lambda pos: lax.shift_left(lax.shift_right_logical(pos, shift), shift)

  if spec.kind == "causal":
    return ((None, jnp.minimum(q_idx + 1, total)),)
  if spec.kind == "block_causal":
    return ((None, jnp.minimum(block_start(q_idx) + b, total)),)
  n = spec.num_noisy
  part = jnp.zeros_like(q_idx)  # the query's stream part: noisy copies 0..n-1, clean (and pad) n
  for j in range(1, n + 1):
    part = part + (q_idx >= j * length).astype(q_idx.dtype)
  first = part * length  # the part's first index (the clean part's: n * length)
  start = block_start(q_idx - first)  # the query's block, as a position
  own_end = jnp.minimum(start + b, length)  # (a padding query's block ends at the part's end)
  # A noisy query sees its own noisy block and the clean blocks before position `start`; a clean
  # one the clean part up to its own block's end (then `earlier` is empty).
  earlier = jnp.where(part < n, start, jnp.zeros_like(start))
  clean = n * length
  return ((first + earlier, first + own_end), (clean, clean + earlier))


def keys_in(k_idx, bounds):
  """bool: whether key index `k_idx` lies in one of `key_bounds`' intervals (broadcasting)."""
  ok = None
  for lo, hi in bounds:
    inside = k_idx < hi if lo is None else (k_idx >= lo) & (k_idx < hi)
    ok = inside if ok is None else ok | inside
  return ok


def _layout_allowed(spec: masks.MaskSpec, length: int, q_idx, k_idx, vector_div: bool = True):
  """`masks.allowed` for layout indices (segments aside); padding indices are never allowed.

  q_idx and k_idx broadcast against each other (the Triton kernels pass [BQ, 1] and [1, BK]).
  `vector_div=False` avoids integer division of vectors (splash's in-kernel mask on a TPU):
  streams by comparisons, blocks by a shift (the block size must then be a power of two).
  """
  total = spec.num_streams * length

  def pos_stream(idx):
    if spec.kind != "diffusion":
      return idx, jnp.zeros_like(idx)
    if vector_div:
      part = lax.div(idx, jnp.int32(length))
    else:
      part = jnp.zeros_like(idx)
      for j in range(1, spec.num_streams):
        part = part + (idx >= j * length).astype(jnp.int32)
    stream = jnp.where(part < spec.num_noisy, part + 1, jnp.zeros_like(part))
    return idx - part * length, stream

  def block(pos):
    if vector_div:
      return lax.div(pos, jnp.int32(spec.block_size))
    return lax.shift_right_logical(pos, spec.block_size.bit_length() - 1)

  qp, qs = pos_stream(q_idx)
  kp, ks = pos_stream(k_idx)
  if spec.kind == "causal":
    ok = kp <= qp
  else:
    qb, kb = block(qp), block(kp)
    ok = (qs == 0) & (ks == 0) & (kb <= qb)
    if spec.kind == "diffusion":
      noisy = qs > 0
      ok = ok | (noisy & (ks == qs) & (kb == qb)) | (noisy & (ks == 0) & (kb < qb))
  return ok & (k_idx < total)


def _batch_rows(batch_axis, *arrays):
  """BlockSpecs giving each program its batch row of per-row plan arrays ([B, ...] each), the
  batch being grid axis `batch_axis`."""
  return [pl.BlockSpec((None,) + a.shape[1:],
                       lambda *g, n=a.ndim: (g[batch_axis],) + (0,) * (n - 1)) for a in arrays]


# ------------------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(lo_ref, hi_ref, one_ref, nfull_ref, nruns_ref, q_ref, k_ref, v_ref, segq_ref,
                segk_ref, o_ref, lse_ref, *, spec, length, block_q, block_k, scale, num_q_tiles):
  qi = num_q_tiles - 1 - pl.program_id(0)  # heaviest (latest) query tiles first
  q = q_ref[...]
  seg_q = segq_ref[...]
  q_idx = qi * block_q + jnp.arange(block_q, dtype=jnp.int32)
  d = q.shape[-1]

  def body(start, carry, masked, compare_segments):
    acc, m, l = carry
    k = k_ref[pl.ds(start, block_k), :]
    s = _dot(q, k, trans_b=True) * (scale * _LOG2E)
    k_idx = lambda: start + jnp.arange(block_k, dtype=jnp.int32)
    keep = _keep(compare_segments, masked, seg_q, segk_ref[pl.ds(start, block_k)],
                 lambda: _layout_allowed(spec, length, q_idx[:, None], k_idx()[None, :]))
    if keep is not None:
      s = jnp.where(keep, s, _MASKED)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    v = v_ref[pl.ds(start, block_k), :]
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l * alpha + p.sum(axis=1)

  carry = (jnp.zeros((block_q, d), jnp.float32),
           jnp.full((block_q,), -jnp.inf, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  plan = (lo_ref, hi_ref, nfull_ref, nruns_ref)
  acc, m, l = _by_segments(one_ref[qi], lambda cmp: _visit(
      plan, qi, block_k, functools.partial(body, compare_segments=cmp), carry))
  # l == 0 only on query tiles made of padding alone (never visited): keep them finite.
  l = jnp.where(l == 0.0, 1.0, l)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)


def _forward(q, k, v, seg, spec, length, tiles: Tiles, interpret):
  """q [B, Tp, H, D], k/v [B, Tp, K, D], seg [B, Tp] (Tp a multiple of every tile size)."""
  if tiles.forward == "mosaic":
    from dllm_jax.kernels import flash_mgpu

    return flash_mgpu.forward(q, k, v, seg, spec, length, interpret=interpret)
  b, tp, h, d = q.shape
  group = h // k.shape[2]
  bq, bk = tiles.block_q, tiles.block_k
  nq = tp // bq
  plan = visit_runs(spec, length, bq, bk, False, tiles.max_run, num_outer=nq)
  run_lo, run_hi, one = segment_runs(plan, seg, bq, bk, transpose=False)
  rev = lambda i: nq - 1 - i
  kernel = functools.partial(_fwd_kernel, spec=spec, length=length, block_q=bq, block_k=bk,
                             scale=d ** -0.5, num_q_tiles=nq)
  return pl.pallas_call(
      kernel,
      grid=(nq, b, h),
      in_specs=[
          *_batch_rows(1, run_lo, run_hi, one), _whole(plan[2]), _whole(plan[3]),
          pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, rev(i), hi, 0)),
          pl.BlockSpec((None, tp, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
          pl.BlockSpec((None, tp, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
          pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, rev(i))),
          pl.BlockSpec((None, tp), lambda i, bi, hi: (bi, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, rev(i), hi, 0)),
          pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, rev(i))),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret,
      name="block_sparse_attention_fwd",
  )(run_lo, run_hi, one, plan[2], plan[3], q, k, v, seg, seg)


# ------------------------------------------------------------------------------------------------
# Backward


def _dq_kernel(lo_ref, hi_ref, one_ref, nfull_ref, nruns_ref, q_ref, k_ref, v_ref, segq_ref,
               segk_ref, do_ref, lse_ref, o_ref, dq_ref, delta_ref, *, spec, length, block_q,
               block_k, scale, given_delta=False):
  qi = pl.program_id(0)
  q, do = q_ref[...], do_ref[...]
  lse = lse_ref[...]
  if given_delta:  # DELTA_IN_DQ off: o_ref holds XLA's delta rows
    delta = o_ref[...]
  else:
    # delta_i = sum_d o_id * do_id of this program's rows, written for the dk/dv kernel too:
    # each row is one program's, and its dO tile is loaded here anyway. XLA's pass over O and
    # dO took 39-122 us at L=2048 on an H100; this kernel takes 21-52 us more (its O loads):
    # fwd+bwd 1.02-1.04x faster (BENCHMARKS.md, session 32)
    delta = jnp.sum(o_ref[...].astype(jnp.float32) * do.astype(jnp.float32), axis=1)
  delta_ref[...] = delta
  seg_q = segq_ref[...]
  q_idx = qi * block_q + jnp.arange(block_q, dtype=jnp.int32)

  def body(start, dq, masked, compare_segments):
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    s = _dot(q, k, trans_b=True) * (scale * _LOG2E)
    dp = _dot(do, v, trans_b=True) if DQ_DP_FIRST else None
    k_idx = lambda: start + jnp.arange(block_k, dtype=jnp.int32)
    keep = _keep(compare_segments, masked, seg_q, segk_ref[pl.ds(start, block_k)],
                 lambda: _layout_allowed(spec, length, q_idx[:, None], k_idx()[None, :]))
    p = jnp.exp2(s - lse[:, None])
    if keep is not None:
      p = jnp.where(keep, p, 0.0)
    if dp is None:
      dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  plan = (lo_ref, hi_ref, nfull_ref, nruns_ref)
  dq = _by_segments(one_ref[qi], lambda cmp: _visit(
      plan, qi, block_k, functools.partial(body, compare_segments=cmp),
      jnp.zeros(q.shape, jnp.float32)))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(order_ref, lo_ref, hi_ref, one_ref, nfull_ref, nruns_ref, q_ref, k_ref, v_ref,
                segq_ref, segk_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, spec, length,
                block_q, block_k, scale, heads):
  ki = order_ref[pl.program_id(2)]
  tile = pl.ds(pl.multiple_of(ki * block_k, block_k), block_k)
  k, v = k_ref[tile, :], v_ref[tile, :]
  seg_k = segk_ref[tile]
  k_idx = ki * block_k + jnp.arange(block_k, dtype=jnp.int32)

  def body(start, carry, masked, head, compare_segments):
    dk, dv = carry
    rows = pl.ds(start, block_q)
    q = q_ref[rows, head, :]
    do = do_ref[rows, head, :]
    lse, delta = lse_ref[head, rows], delta_ref[head, rows]
    s = _dot(q, k, trans_b=True) * (scale * _LOG2E)
    q_idx = lambda: start + jnp.arange(block_q, dtype=jnp.int32)
    keep = _keep(compare_segments, masked, segq_ref[rows], seg_k,
                 lambda: _layout_allowed(spec, length, q_idx()[:, None], k_idx[None, :]))
    p = jnp.exp2(s - lse[:, None])
    if keep is not None:
      p = jnp.where(keep, p, 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    return dk + _dot(ds.astype(q.dtype), q, trans_a=True), dv

  plan = (lo_ref, hi_ref, nfull_ref, nruns_ref)

  def all_heads(cmp):
    per_head = lambda head, carry: _visit(
        plan, ki, block_q, functools.partial(body, head=head, compare_segments=cmp), carry)
    zeros = jnp.zeros(k.shape, jnp.float32)
    return lax.fori_loop(0, heads, per_head, (zeros, zeros))

  dk, dv = _by_segments(one_ref[ki], all_heads)
  dk_ref[tile, :] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[tile, :] = dv.astype(dv_ref.dtype)


def largest_divisor(n: int, cap: int) -> int:
  """The largest divisor of n not above cap (cap >= 1): a split of n into whole, equal parts."""
  return max(c for c in range(1, min(cap, n) + 1) if n % c == 0)


def visit_counts(plan) -> np.ndarray:
  """int [n_outer]: how many inner tiles each outer tile of a `visit_runs` plan visits."""
  _, count, _, n_runs = plan
  return np.where(np.arange(count.shape[1])[None, :] < n_runs[:, None], count, 0).sum(1)


def heavy_first(plan) -> np.ndarray:
  """Outer tiles ordered by how many inner tiles they visit, most first (ties: lowest index),
  so the longest programs start in the first wave instead of forming the tail of the last."""
  return np.argsort(-visit_counts(plan), kind="stable").astype(np.int32)


def _xla_delta(o, do):
  """delta_i = sum_d o_id * do_id as one XLA pass, [B, H, Tp] like lse (where no dq kernel
  computes it, or DELTA_IN_DQ is off)."""
  return jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))


def _backward(q, k, v, seg, o, lse, do, spec, length, tiles: Tiles, interpret):
  if tiles.dkv == "mosaic" and tiles.fuse_dq:
    from dllm_jax.kernels import flash_mgpu

    return flash_mgpu.dkv(q, k, v, seg, do, lse, _xla_delta(o, do), spec, length, interpret,
                          fuse_dq=True)
  # dq, and delta [B, H, Tp] (like lse) for the dk/dv kernel, which therefore runs after it
  if tiles.dq == "mosaic":
    from dllm_jax.kernels import flash_mgpu

    dq, delta = flash_mgpu.dq(q, k, v, seg, o, do, lse, spec, length, interpret)
  else:
    xla_delta = None if DELTA_IN_DQ else _xla_delta(o, do)
    dq, delta = _triton_dq(q, k, v, seg, o, do, lse, spec, length, tiles, interpret, xla_delta)
  return _dkv(q, k, v, seg, do, lse, delta, dq, spec, length, tiles, interpret)


def _triton_dq(q, k, v, seg, o, do, lse, spec, length, tiles: Tiles, interpret, xla_delta):
  """(dq, delta) by the Triton dq kernel (`xla_delta`: XLA's delta, given instead of O)."""
  b, tp, h, d = q.shape
  group = h // k.shape[2]
  params = plgpu.CompilerParams(num_warps=tiles.num_warps_bwd,
                                 num_stages=tiles.num_stages_bwd)
  bq, bk = tiles.block_q_dq, tiles.block_k_dq
  plan = visit_runs(spec, length, bq, bk, False, tiles.max_run, num_outer=tp // bq)
  run_lo, run_hi, one = segment_runs(plan, seg, bq, bk, transpose=False)
  q_tile = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))
  kv_all = pl.BlockSpec((None, tp, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0))
  row_q = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
  return pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec, length=length, block_q=bq, block_k=bk,
                        scale=d ** -0.5, given_delta=xla_delta is not None),
      grid=(tp // bq, b, h),
      in_specs=[*_batch_rows(1, run_lo, run_hi, one), _whole(plan[2]), _whole(plan[3]), q_tile,
                kv_all, kv_all,
                pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)),
                pl.BlockSpec((None, tp), lambda i, bi, hi: (bi, 0)),
                q_tile, row_q, q_tile if xla_delta is None else row_q],
      out_specs=[q_tile, row_q],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
      compiler_params=params,
      interpret=interpret,
      name="block_sparse_attention_dq",
  )(run_lo, run_hi, one, plan[2], plan[3], q, k, v, seg, seg, do, lse,
    o if xla_delta is None else xla_delta)


def _dkv(q, k, v, seg, do, lse, delta, dq, spec, length, tiles: Tiles, interpret):
  """(dq, dk, dv): dk and dv by the dk/dv kernel `tiles.dkv`, beside the given dq."""
  b, tp, h, d = q.shape
  kv_heads = k.shape[2]
  group = h // kv_heads
  scale = d ** -0.5
  if tiles.dkv == "mosaic":
    from dllm_jax.kernels import flash_mgpu

    return (dq, *flash_mgpu.dkv(q, k, v, seg, do, lse, delta, spec, length, interpret)[1:])

  # Key tiles differ in work from 1 to ~64 query-tile visits per head (an early clean tile is
  # seen by every later query, a noisy one by its own block), and ncu showed the SMs idle 42% of
  # the dk/dv kernel's time; the tile plan says the heaviest program outlasts a fair share of
  # the GPU (inferred, not profiled). So the key tile is the slowest grid axis, visited heaviest
  # first (its K/V rows are sliced in-kernel, since block index maps cannot read the order), and
  # a group's heads may be split over `split` programs to shorten the heaviest one.
  split = largest_divisor(group, tiles.dkv_head_split)
  bq, bk = tiles.block_q_dkv, tiles.block_k_dkv
  plan = visit_runs(spec, length, bq, bk, True, tiles.max_run, num_outer=tp // bk)
  run_lo, run_hi, one = segment_runs(plan, seg, bq, bk, transpose=True)
  order = heavy_first(plan)  # every grid index maps to a tile of its own, padding tiles last
  assert order.size == tp // bk, (order.size, tp, bk)
  hp = group // split  # query heads per program
  kv_row = pl.BlockSpec((None, tp, None, d), lambda bi, j, i: (bi, 0, j // split, 0))
  q_heads = pl.BlockSpec((None, tp, hp, d), lambda bi, j, i: (bi, 0, j, 0))
  rows_heads = pl.BlockSpec((None, hp, tp), lambda bi, j, i: (bi, j, 0))
  seg_row = pl.BlockSpec((None, tp), lambda bi, j, i: (bi, 0))
  if split == 1:
    out_spec, out_shape = kv_row, [jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2
  else:  # [split, B, Tp, K, D] float32 partials
    out_spec = pl.BlockSpec((None, None, tp, None, d),
                            lambda bi, j, i: (j % split, bi, 0, j // split, 0))
    out_shape = [jax.ShapeDtypeStruct((split,) + k.shape, jnp.float32)] * 2
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec, length=length, block_q=bq, block_k=bk,
                        scale=scale, heads=hp),
      grid=(b, kv_heads * split, tp // bk),
      in_specs=[_whole(order), *_batch_rows(0, run_lo, run_hi, one),
                _whole(plan[2]), _whole(plan[3]), q_heads, kv_row, kv_row, seg_row, seg_row,
                q_heads, rows_heads, rows_heads],
      out_specs=[out_spec, out_spec],
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps_dkv or tiles.num_warps_bwd,
                                           num_stages=tiles.num_stages_bwd),
      interpret=interpret,
      name="block_sparse_attention_dkv",
  )(order, run_lo, run_hi, one, plan[2], plan[3], q, k, v, seg, seg, do, lse, delta)
  if split > 1:
    dk, dv = dk.sum(0).astype(k.dtype), dv.sum(0).astype(v.dtype)
  return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# Public entry: padding and custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention_padded(q, k, v, seg, spec, length, tiles, interpret):
  return _forward(q, k, v, seg, spec, length, tiles, interpret)[0]


def _attention_fwd(q, k, v, seg, spec, length, tiles, interpret):
  o, lse = _forward(q, k, v, seg, spec, length, tiles, interpret)
  return o, (q, k, v, seg, o, lse)


def _attention_bwd(spec, length, tiles, interpret, res, do):
  q, k, v, seg, o, lse = res
  dq, dk, dv = _backward(q, k, v, seg, o, lse, do, spec, length, tiles, interpret)
  return dq, dk, dv, None


_attention_padded.defvjp(_attention_fwd, _attention_bwd)


def _require_mosaic(field: str, spec: masks.MaskSpec, q, interpret: bool, instead: str,
                    choice: str = "mosaic"):
  """An explicit `Tiles.<field>="mosaic"` this problem or device cannot run is an error naming
  why (not a fallback, nor a failure inside Pallas or the Mosaic compiler)."""
  from dllm_jax.kernels import flash_mgpu

  why = flash_mgpu.unsupported(spec, q.shape[-1], q.dtype)
  if why is None and not interpret and not flash_mgpu.on_hopper():
    dev = jax.devices()[0]
    why = (f"it needs an sm_90 GPU (H100/H200), and the device is {dev.platform} "
           f"{getattr(dev, 'device_kind', '')}".rstrip())
  if why is not None:
    raise ValueError(f"Tiles.{field}={choice!r} cannot run this problem: {why}; use {instead}")


def _kernel_choice(field: str, choice: str, spec: masks.MaskSpec, q, interpret: bool) -> str:
  """`Tiles.<field>` ("forward", "dkv" or "dq") resolved for this problem: "auto" picks the Mosaic
  GPU kernel on sm_90 when it covers the problem; an explicit "mosaic" it cannot run is an
  error, not a fallback."""
  if choice == "triton":
    return choice
  if choice == "mosaic":
    _require_mosaic(field, spec, q, interpret, f"{field}='triton' or 'auto'", choice)
    return choice
  from dllm_jax.kernels import flash_mgpu

  why = flash_mgpu.unsupported(spec, q.shape[-1], q.dtype)
  # The Mosaic dk/dv and dq kernels have been run on a GPU for the diffusion layouts at head_dim
  # 128 only (the benchmark's cases); the causal mask (AR-SFT) keeps Triton's until they are too.
  measured = field == "forward" or (field in ("dkv", "dq") and q.shape[-1] == 128
                                    and spec.kind == "diffusion")
  ok = why is None and measured and not interpret and flash_mgpu.on_hopper()
  return "mosaic" if ok else "triton"


def block_sparse_attention(q_BTHD, k_BTKD, v_BTKD, segments_BT, spec: masks.MaskSpec,
                           tiles: Tiles = Tiles(), interpret: bool = False):
  """Attention over the layout `masks.layout_meta(spec, segments)` rows, T = num_streams * L.

  q [B, T, H, D]; k, v [B, T, K, D] with H % K == 0; segments_BT int32 [B, T] (the layout's
  per-token segment ids). Equals `attention.xla_attention` under `masks.dense_mask` of that
  layout; differentiable in q, k, v.
  """
  b, t, h, d = q_BTHD.shape
  if t % spec.num_streams:
    raise ValueError(f"sequence length {t} is not a multiple of the layout's "
                     f"{spec.num_streams} streams (spec={spec})")
  length = t // spec.num_streams
  tiles = dataclasses.replace(
      tiles, **{f: _kernel_choice(f, getattr(tiles, f), spec, q_BTHD, interpret)
                for f in ("forward", "dkv", "dq")})
  lcm = max(tiles.block_q, tiles.block_k, tiles.block_q_dq, tiles.block_k_dq,
            tiles.block_q_dkv, tiles.block_k_dkv)  # all powers of two: the max is their lcm
  if "mosaic" in (tiles.forward, tiles.dkv, tiles.dq):
    from dllm_jax.kernels import flash_mgpu

    why = flash_mgpu.fuse_dq_unsupported(d) if tiles.fuse_dq else None
    if why is not None:
      raise ValueError(f"Tiles.fuse_dq=True {why}; use fuse_dq=False")

    lcm = max(lcm, flash_mgpu.OUTER, flash_mgpu.BLOCK_K, 2 * flash_mgpu.BLOCK_KV,
              flash_mgpu.BLOCK_QI)
  tp = -(-t // lcm) * lcm
  pad = lambda x: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))
  seg = pad(jnp.asarray(segments_BT, jnp.int32))
  out = _attention_padded(pad(q_BTHD), pad(k_BTKD), pad(v_BTKD), seg, spec, length, tiles,
                          interpret)
  return out[:, :t]
