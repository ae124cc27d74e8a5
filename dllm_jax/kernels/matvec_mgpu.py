"""The batch-1 AR step's MLP launches in Mosaic GPU (Hopper): weights streamed by TMA, rows
spread evenly over the SMs (`model.ROW_TMA`: gate/up by default). Exact in the CPU interpreter,
free of races by jax 0.11's detector (which models TMA's async proxy), lowered for CUDA on the
CPU under jax 0.10 and 0.11, and correct on an H200. Timed there in the 1.5B's batch-1 step
(session 27, BENCHMARKS.md): gate/up 15.8 us a layer against the Triton launch's 18.2; down
25.0 us on the CUDA cores against 9.5, and no faster than Triton's on wgmma.

Why: the Pallas Triton gate/up launch (`matvec.norm_matvec`) reads its weights at ~0.87 of the
copy rate and down at ~0.85, where XLA's TMA GEMM reads the same weights at ~1.2 (H200,
BENCHMARKS.md sessions 18-20); pointer loads do not stream like TMA. Session 20 found jax's
persistent Mosaic GPU matmul at ~1.0 of the copy rate only where every SM had one work tile:
the 1.5B's 8960 gate/up columns in 64-row tiles are 140 tiles on 132 SMs, and the 8 SMs with
two set the time. Hence the plan here (`row_plan`): a CTA takes a contiguous run of the
weight's rows (output features) in units of 8, spread so that no CTA has more than one unit over
another (the 1.5B's gate/up on its default 264 CTAs, two an SM: 64 runs of 40 rows, 200 of 32).

Weights out-major only ([N, K], `ModelConfig.kernel_layout="out_in"`): a CTA's step tile
[rows, 64] is `rows` runs of 128 bytes, one TMA box into a 128-byte-swizzled slot; SLOTS of them
in flight. The products run on the CUDA cores by default (`PRODUCTS`): each tile is read from
shared memory in the wgmma register layout, multiplied by the row's 64-element chunk broadcast
along its rows, and summed along them in float32 (one row needs no tensor cores, and this is the
same code in the CPU interpreter, which has no register or transposed wgmma operand). Rows are
padded to 64 for that layout; the padding rows read stale shared memory and are never stored.
`products="wgmma"` (GPU only) has the tensor cores do them instead: the chunk repeated on 64
rows as the register A operand, the slot's tile transposed as B.

Numerics are `matvec.norm_matvec`'s and `matvec.matvec_partials`' (which follow the model's XLA
path): the residual-added row rounded to the compute dtype, scale * row rounded, float32
products, 1/rms applied to their sums, then each product rounded, and SiLU(gate) * up rounded
as XLA rounds its bf16 ops; only the order of the float32 sums differs.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dllm_jax.kernels import matvec
from dllm_jax.kernels.flash_mgpu import _interpret_params, _load, _plgpu
from dllm_jax.kernels.matvec import _round

BK = 64  # a step's columns of the weight: one 128-byte swizzle tile of bf16
UNIT = 8  # rows are handed out in units of a TMA box's tile height
# Slots of weight tiles in flight per CTA. At the 1.5B a gate/up step is two [40, 64] tiles
# (10 KB) on two CTAs an SM; down's is one [48, 64] tile (6 KB) on one CTA an SM, so it keeps
# more in flight. Unmeasured: chosen so ~70-80 KB an SM are in flight (bandwidth x latency of an
# H200, ~4 TB/s x ~2 us, over 132 SMs).
GATE_UP_SLOTS = 4
DOWN_SLOTS = 12
# Up to how many padded rows the products accumulate elementwise and are summed along the rows
# once (`_stream`'s defer_sum): about half the instructions a step of the per-step sum (no
# shuffles between lanes), for 32 more float32 registers a thread per 64 rows and weight, which
# a 1-CTA-an-SM run of 192 rows (the 7B's gate/up) could not hold without spilling. Unmeasured;
# benchmarks/matvec_tma.py times both.
DEFER_SUM_ROWS = 64
MAX_SLOTS = 32  # Mosaic GPU allocates at most 32 barriers a group
# Where the products run (`_stream`): "cuda_cores" (multiply-adds from shared memory in the wgmma
# register layout; the CPU interpreter's body too) or "wgmma" (the row's chunk, repeated on 64
# rows, as the register A operand and the weight tile transposed as B: the tensor cores do 64x
# the work, asynchronously; GPU only, since the interpreter has neither a register operand nor a
# transposed one). The launches' default; the model passes its own (`model.ROW_TMA`). In the
# 1.5B's step (session 27) gate/up ran faster on the CUDA cores, down on neither beat Triton's.
PRODUCTS = "cuda_cores"
PRODUCT_KINDS = ("cuda_cores", "wgmma")


def _padded(rows: int) -> int:
  """Rows rounded up to 64: the wgmma register layout's row blocks."""
  return -(-rows // 64) * 64


def _ring_shape(weights: int, slots: int, big: int, products: str) -> tuple[int, int, int]:
  """The weight tiles' ring in shared memory: `slots` steps of `weights` tiles of up to `big`
  rows, a tile an index of the leading dimension. The CUDA-core products read a tile in the
  register layout's 64-row blocks (`_stream`), so each is given `_padded(big)` rows, never
  written past its own: were they the next tile's, the reads would race with its copy landing
  (harmless for the sums, which are per row, but a race by PTX's memory model, and one that
  jax 0.11's interpreter reports). wgmma reads `big` rows."""
  return slots * weights, _padded(big) if products == "cuda_cores" else big, BK


def _out_shape(big: int, products: str) -> tuple[int, ...]:
  """A CTA's output staging (`_store_sums`): its [m] sums, or wgmma's [64, big] accumulator."""
  return (_padded(big),) if products == "cuda_cores" else (64, big)


def _swizzled():
  """The transforms of the ring: 8-row tiles of 128-byte rows, swizzled (TMA's and wgmma's)."""
  plgpu = _plgpu()
  return dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def row_plan(n: int, ctas: int) -> tuple[int, int, int]:
  """(n_big, big, small): the first n_big of `ctas` CTAs take `big` rows of n, the others `small`,
  handed out in units of UNIT rows so that big - small is one unit (zero when they divide)."""
  if n % UNIT or n // UNIT < ctas or ctas < 1:
    raise ValueError(f"row_plan: {n} rows do not split into {ctas} runs of whole {UNIT}-row "
                     "units (rows a multiple of 8, at least one unit a CTA)")
  units = n // UNIT
  small = units // ctas
  n_big = units - small * ctas
  return n_big, (small + bool(n_big)) * UNIT, small * UNIT


def unsupported(e: int, n: int, dtype) -> str | None:
  """Why these kernels cannot run a row of length e times weights of n rows (None when they can):
  the row's steps and the rows' units must be whole."""
  if e % 128:
    return f"row length {e} is not a multiple of 128 (the row's work is spread over 128 threads)"
  if n % UNIT:
    return f"weight rows {n} are not a multiple of {UNIT}"
  if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
    return f"dtype {jnp.dtype(dtype).name} is not bfloat16"
  try:
    _plgpu()
  except ImportError as err:
    return f"no Mosaic GPU in this jax ({err})"
  return None


def _stream(w_refs, w_s, bars, chunk, rows, big, r0, k0, nk, slots, defer_sum, products,
            interpret, prologue=None):
  """float32 [m] per weight (m = rows rounded up to 64; with `products` "wgmma" [64, big],
  every row the same sums): the sum over steps i < nk of
  w[r0 : r0 + rows, (k0 + i) * BK :][:, :BK] times `chunk(i)` (float32 [BK], the row's chunk in
  the wgmma column layout). Weight j's step tiles land in w_s (`_ring_shape`) at index
  slot * len(w_refs) + j (barrier bars[j][slot]), refilled `slots` steps ahead; a tile is read
  as m rows, the rows past it never written (stale values whose sums are never stored). The
  loop is unrolled `slots` times, so every slot index is static (written when the slots were
  offsets into a tiled dimension, which Mosaic GPU does not lower dynamically; kept, since a
  dynamic index is unmeasured). `defer_sum` (CUDA-core products only): the products accumulate
  elementwise in a [m, BK] float32 array (a multiply-add a weight element) and are summed along
  the rows once at the end, instead of at every step (shuffles between lanes each step; fewer
  registers); None: while m <= DEFER_SUM_ROWS. `prologue()` runs once the first slots' copies
  are issued (the row's own work, overlapping them); returns (sums, what prologue returned)."""
  plgpu = _plgpu()
  wl = plgpu.Layout.WGMMA
  m = _padded(rows)
  nw = len(w_refs)
  at = lambda slot, j: slot * nw + j
  if defer_sum is None:
    defer_sum = m <= DEFER_SUM_ROWS

  def fetch(i, slot):
    cols = pl.ds((k0 + i) * BK, BK)
    for j, w_ref in enumerate(w_refs):
      plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(r0, rows), cols],
                              w_s.at[at(slot, j), pl.ds(0, rows)], bars[j].at[slot])

  for s in range(min(slots, nk)):
    fetch(s, s)
  before = prologue() if prologue is not None else None
  if products == "wgmma":
    return _stream_wgmma(w_refs, w_s, bars, chunk, big, at, fetch, nk, slots), before

  def step(i, slot, accs):
    xb = lax.broadcast_in_dim(chunk(i), (m, BK), [1])
    out = []
    for j, acc in enumerate(accs):
      plgpu.barrier_wait(bars[j].at[slot])
      tile = w_s.at[at(slot, j), pl.ds(0, m)]
      w = _load(tile, wl, interpret).astype(jnp.float32)
      out.append(acc + w * xb if defer_sum else acc + jnp.sum(w * xb, axis=1))
    # The refill is a write by the async proxy after these generic-proxy reads: without a proxy
    # fence from every reading thread (then the warpgroup barrier Mosaic puts before a copy) the
    # TMA may land before the reads are done (PTX's proxy memory model; jax 0.11's interpreter
    # reports the race).
    @pl.when(i + slots < nk)
    def _():
      plgpu.commit_smem()
      fetch(i + slots, slot)
    return tuple(out)

  z = jnp.zeros((m, BK) if defer_sum else (m,), jnp.float32)
  if not interpret:
    z = plgpu.layout_cast(z, wl if defer_sum else wl.reduce(1))
  accs = _slot_loop(step, nk, slots, (z,) * nw)
  if defer_sum:
    accs = tuple(jnp.sum(a, axis=1) for a in accs)
  return accs, before


def _slot_loop(step, nk, slots, carry):
  """carry = step(i, slot, carry) for i < nk, slot = i % slots a Python int: the loop unrolled
  `slots` times (`_stream`), the last nk % slots steps after it."""
  def rounds(r, carry):
    for s in range(slots):
      carry = step(r * slots + s, s, carry)
    return carry

  carry = lax.fori_loop(0, nk // slots, rounds, carry)
  for s in range(nk % slots):
    carry = step(nk // slots * slots + s, s, carry)
  return carry


def _stream_wgmma(w_refs, w_s, bars, chunk, big, at, fetch, nk, slots):
  """`_stream`'s loop with the products on the tensor cores: acc [64, big] += the row's chunk
  repeated on 64 rows (registers, wgmma's smallest M) times the weight tile transposed ([BK,
  big] from the slot: N = big, a multiple of 8). A run of fewer rows leaves stale columns past
  them, never stored; one N for both runs keeps the output staging whole (jax 0.11's layout
  inference fails on a store into a slice of it). Each step's wgmmas are awaited before its
  slot is refilled. Returns the accumulators' values."""
  plgpu = _plgpu()

  def scope(*acc_refs):
    def step(i, slot, carry):
      xb = lax.broadcast_in_dim(chunk(i).astype(jnp.bfloat16), (64, BK), [1])
      for j, acc in enumerate(acc_refs):
        plgpu.barrier_wait(bars[j].at[slot])
        plgpu.wgmma(acc, xb, w_s.at[at(slot, j), pl.ds(0, big)].transpose((1, 0)))
      plgpu.wgmma_wait(0)
      pl.when(i + slots < nk)(lambda: fetch(i + slots, slot))
      return carry

    _slot_loop(step, nk, slots, 0)
    return tuple(acc[...] for acc in acc_refs)

  return pl.run_scoped(scope, *(plgpu.ACC((64, big), jnp.float32) for _ in w_refs))


def _store_sums(y, o_s, out_ref, i, r0, rows):
  """Writes a run's results (`_stream`'s [m], or its [64, big] whose rows are equal) to
  out_ref[i, r0 : r0 + rows] in global memory, through o_s (`_out_shape`). (wgmma's goes out as a
  [1, rows] box: jax 0.11's layout inference fails on a 1-D slice of its 2-D staging.)"""
  plgpu = _plgpu()
  if y.ndim == 1:
    o_s[pl.ds(0, y.shape[0])] = y
    src, dst = o_s.at[pl.ds(0, rows)], out_ref.at[i, pl.ds(r0, rows)]
  else:
    o_s[...] = y
    src, dst = o_s.at[pl.ds(0, 1), pl.ds(0, rows)], out_ref.at[pl.ds(i, 1), pl.ds(r0, rows)]
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(src, dst)
  plgpu.wait_smem_to_gmem(0)


def _products_of(fn, products, interpret):
  """`products` resolved: None is PRODUCTS on a GPU and "cuda_cores" in the interpreter."""
  if products is None:
    return "cuda_cores" if interpret else PRODUCTS
  if products not in PRODUCT_KINDS:
    raise ValueError(f"{fn}: products={products!r}; expected one of {PRODUCT_KINDS}")
  if products == "wgmma" and interpret:
    raise ValueError(f"{fn}: products='wgmma' runs on a GPU only (the CPU interpreter has no "
                     "register or transposed wgmma operand): use 'cuda_cores'")
  return products


def _chunk_loader(x_s, interpret):
  """chunk(i): float32 [BK], chunk i of the row (of the CTA's run of it) in shared memory
  [steps, BK], in the layout `_stream` broadcasts along the tile's rows."""
  plgpu = _plgpu()

  def chunk(i):
    ref = x_s.at[i]
    v = _load(ref, plgpu.Layout.WGMMA.reduce(0), interpret)
    return v.astype(jnp.float32)
  return chunk


def _row_loader(e, interpret):
  """load(ref): a [e / BK, BK] row input from shared memory, every dtype in one strided layout
  (Mosaic picks a vector width per dtype by default, and bf16 and float32 values then do not
  combine)."""
  plgpu = _plgpu()
  vec = next(v for v in (4, 2, 1) if e % (128 * v) == 0)
  layout = plgpu.Layout.WG_STRIDED((e // BK, BK), vec_size=vec)
  return lambda ref: _load(ref, layout, interpret)


def _rows_of(cta, n_big, big, small, run):
  """Calls run(rows, r0) with this CTA's static row count and its first row."""
  if n_big:
    pl.when(cta < n_big)(lambda: run(big, cta * big))
  if small:
    pl.when(cta >= n_big)(lambda: run(small, n_big * big + (cta - n_big) * small))


def _one_lowering(*static: str):
  """jit with `static` as static arguments, around a launch: every call of it in one program with
  the same shapes and knobs then shares one traced jaxpr, which lowers once. Mosaic GPU names each
  lowering of a kernel apart (jax 0.11 writes a counted dump name into the module), so two call
  sites of the same launch hash apart, and the GPU runtime, which caches compiled kernels by that
  hash, compiles each for seconds (3.7-7.9 s at the 1.5B on an H200, session 26): minutes for the
  per-layer step's 2 x layers sites."""
  return functools.partial(jax.jit, static_argnames=static)


@_one_lowering("eps", "ctas", "slots", "defer_sum", "products", "interpret")
def silu_pair(x_E: jax.Array, gate_FE: jax.Array, up_FE: jax.Array, *,
              add_E: Optional[jax.Array] = None, norm_scale_E: Optional[jax.Array] = None,
              eps: float = 1e-6, ctas: Optional[int] = None, slots: Optional[int] = None,
              defer_sum: Optional[bool] = None, products: Optional[str] = None,
              interpret: bool = False):
  """(act [F], row): `act = SiLU(norm(x + add) @ gate.T) * (norm(x + add) @ up.T)`, as
  `matvec.norm_matvec(x, (gate, up), silu_pair=True, out_major=True, ...)` computes it.

  x [E] bf16; gate, up [F, E] (out-major). `add_E`: an added row [E], or float32 partial sums
  [S, E] (`matvec_partials`' or `matvec_parts`' output) whose sum rounded to bf16 is added; the
  residual-added row is returned as `row` (None without an add). `norm_scale_E`: RMSNorm's scale
  (eps `eps`), its 1/rms applied to the products' sums. `ctas` and `slots` (defaults:
  `_pair_plan`), `defer_sum` (`_stream`) and `products` (PRODUCTS) are tuning knobs.
  """
  plgpu = _plgpu()
  _check("silu_pair", x_E, (gate_FE, up_FE))
  if gate_FE.shape != up_FE.shape:
    raise ValueError(f"silu_pair: gate {gate_FE.shape} and up {up_FE.shape} differ")
  matvec._check_row_inputs("silu_pair", x_E, (gate_FE, up_FE), add_E, norm_scale_E,
                           out_major=True)
  e = x_E.shape[0]
  f = gate_FE.shape[0]
  nk = e // BK
  dtype = x_E.dtype
  parts = 0 if add_E is None or add_E.ndim == 1 else add_E.shape[0]
  products = _products_of("silu_pair", products, interpret)
  ctas, slots = _pair_plan(e, f, parts, ctas, slots, _sms(), products)
  n_big, big, small = row_plan(f, ctas)
  has_add, has_norm = add_E is not None, norm_scale_E is not None

  def kernel(*refs):
    it = iter(refs)
    x_ref = next(it)
    add_ref = next(it) if has_add else None
    scale_ref = next(it) if has_norm else None
    g_ref, u_ref, act_ref = next(it), next(it), next(it)
    row_ref = next(it) if has_add else None
    x_s, add_s, sc_s, nx_s, w_s, o_s, in_bar, g_bar, u_bar = it
    cta = lax.axis_index("cta")

    # The row's inputs by TMA, first: the prologue needs them before any product, and their
    # latency then overlaps the weights' first slots, issued at once after them. (Hopper's
    # programmatic dependent launch, which would issue the weights' slots before waiting for the
    # launches that write the row, gained nothing in the 1.5B's step: BENCHMARKS.md, sessions
    # 28-29; removed in session 39.)
    plgpu.copy_gmem_to_smem(x_ref, x_s, in_bar.at[0])
    if has_add:
      plgpu.copy_gmem_to_smem(add_ref, add_s, in_bar.at[1])
    if has_norm:
      plgpu.copy_gmem_to_smem(scale_ref, sc_s, in_bar.at[2])

    def run(rows, r0):
      def prologue():
        # The row: the residual add, and scale * row, into nx_s [nk, BK] (the products' operand);
        # 1/rms is a scalar that multiplies the products' sums.
        load = _row_loader(e, interpret)
        plgpu.barrier_wait(in_bar.at[0])
        row = load(x_s).astype(jnp.float32)
        if has_add:
          plgpu.barrier_wait(in_bar.at[1])
          if parts:
            a = load(add_s.at[0])
            for s in range(1, parts):
              a = a + load(add_s.at[s])
            a = _round(a, dtype)
          else:
            a = load(add_s).astype(jnp.float32)
          row = _round(row + a, dtype)
        rsqrt = None
        if has_norm:
          plgpu.barrier_wait(in_bar.at[2])
          rsqrt = lax.rsqrt(jnp.sum(row * row) / e + eps)
          nx_s[...] = _round(load(sc_s).astype(jnp.float32) * row, dtype).astype(dtype)
        else:
          nx_s[...] = row.astype(dtype)
        if has_add:
          @pl.when(cta == 0)
          def _():
            x_s[...] = row.astype(dtype)  # x is read; its slot holds the row's copy out
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(x_s, row_ref)
        return rsqrt

      (g, u), rsqrt = _stream((g_ref, u_ref), w_s, (g_bar, u_bar),
                              _chunk_loader(nx_s, interpret), rows, big, r0, 0, nk, slots,
                              defer_sum, products, interpret, prologue)
      if rsqrt is not None:
        g, u = g * rsqrt, u * rsqrt
      g, u = _round(g, dtype), _round(u, dtype)
      s_ = _round(g * _round(jax.nn.sigmoid(g), dtype), dtype)
      _store_sums((s_ * u).astype(dtype), o_s, act_ref, 0, r0, rows)

    _rows_of(cta, n_big, big, small, run)

  kernel.__name__ = "silu_pair_tma"
  args = [x_E.reshape(nk, BK)]
  if has_add:
    args.append(add_E.astype(jnp.float32).reshape(parts, nk, BK) if parts
                else add_E.astype(dtype).reshape(nk, BK))
  if has_norm:
    args.append(norm_scale_E.astype(dtype).reshape(nk, BK))
  outs = [jax.ShapeDtypeStruct((1, f), dtype)]
  if has_add:
    outs.append(jax.ShapeDtypeStruct((nk, BK), dtype))
  add_smem = ((parts, nk, BK) if parts else (nk, BK)) if has_add else (1, 8)
  res = plgpu.kernel(
      kernel,
      out_type=outs,
      scratch_types=[
          plgpu.SMEM((nk, BK), dtype),
          plgpu.SMEM(add_smem, jnp.float32 if parts else dtype),
          plgpu.SMEM((nk, BK) if has_norm else (1, 8), dtype),
          plgpu.SMEM((nk, BK), dtype),
          plgpu.SMEM(_ring_shape(2, slots, big, products), dtype, **_swizzled()),
          plgpu.SMEM(_out_shape(big, products), dtype),
          plgpu.Barrier(num_barriers=3),
          plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots)],
      grid=(ctas,), grid_names=("cta",),
      interpret=_interpret_params() if interpret else None,
  )(*args, gate_FE, up_FE)
  act = res[0].reshape(f)
  return act, (res[1].reshape(e) if has_add else None)


@_one_lowering("splits", "ctas", "slots", "defer_sum", "products", "interpret")
def matvec_parts(x_K: jax.Array, w_NK: jax.Array, *, splits: Optional[int] = None,
                 ctas: Optional[int] = None, slots: Optional[int] = None,
                 defer_sum: Optional[bool] = None, products: Optional[str] = None,
                 interpret: bool = False) -> jax.Array:
  """x [K] @ w.T, w out-major [N, K], as float32 partial sums [splits, N] over `splits` equal runs
  of the row (split-K), as `matvec.matvec_partials(..., out_major=True)` leaves them; the next
  launch sums them where it reads its row (`add_E`). Each run of the row has ctas / splits CTAs,
  which split the N rows as `row_plan` does. `splits`, `ctas`, `slots` (defaults: `_parts_plan`),
  `defer_sum` (`_stream`) and `products` (PRODUCTS) are tuning knobs."""
  plgpu = _plgpu()
  _check("matvec_parts", x_K, (w_NK,))
  k = x_K.shape[0]
  n = w_NK.shape[0]
  products = _products_of("matvec_parts", products, interpret)
  splits, ctas, slots = _parts_plan(k, n, splits, ctas, slots, _sms(), products)
  per = ctas // splits
  n_big, big, small = row_plan(n, per)
  nk = k // BK // splits
  dtype = x_K.dtype

  def kernel(x_ref, w_ref, o_ref, x_s, w_s, o_s, x_bar, w_bar):
    cta = lax.axis_index("cta")
    part = lax.div(cta, jnp.int32(per))
    k0 = part * nk

    plgpu.copy_gmem_to_smem(x_ref.at[part], x_s, x_bar.at[0])  # first, as silu_pair's row

    def prologue():
      plgpu.barrier_wait(x_bar.at[0])

    def run(rows, r0):
      (y,), _ = _stream((w_ref,), w_s, (w_bar,), _chunk_loader(x_s, interpret), rows, big,
                        r0, k0, nk, slots, defer_sum, products, interpret, prologue)
      _store_sums(y, o_s, o_ref, part, r0, rows)

    _rows_of(lax.rem(cta, jnp.int32(per)), n_big, big, small, run)

  kernel.__name__ = "matvec_parts_tma"
  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((splits, n), jnp.float32),
      scratch_types=[
          plgpu.SMEM((nk, BK), dtype),
          plgpu.SMEM(_ring_shape(1, slots, big, products), dtype, **_swizzled()),
          plgpu.SMEM(_out_shape(big, products), jnp.float32),
          plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_barriers=slots)],
      grid=(ctas,), grid_names=("cta",),
      interpret=_interpret_params() if interpret else None,
  )(x_K.reshape(splits, nk, BK), w_NK)


def _check(fn, x, ws):
  """A bf16 row [K] and out-major weights [N, K] these kernels cover, else a ValueError."""
  if x.ndim != 1 or any(w.ndim != 2 or w.shape[1] != x.shape[0] for w in ws):
    raise ValueError(f"{fn}: a row [K] and out-major weights [N, K] expected; got x {x.shape} "
                     f"and weights {[w.shape for w in ws]}")
  for w in ws:
    why = unsupported(x.shape[0], w.shape[0], x.dtype)
    if why is None and w.dtype != x.dtype:
      why = f"weights {w.dtype} differ from the row's {x.dtype}"
    if why is not None:
      raise ValueError(f"{fn}: {why}")


SMEM_BYTES = 227 * 1024  # shared memory a Hopper SM gives its CTAs
SMEM_SLACK = 8192  # what Mosaic adds to a CTA's buffers (reduction scratch, barriers): ~3 KB


def _pair_smem(e, parts, big, slots, products="cuda_cores"):
  """Shared-memory bytes of a `silu_pair` CTA's buffers, its largest run `big` rows."""
  row = 2 * e * 3 + (4 * parts * e if parts else 2 * e)  # x, scale, normed row; the add
  return (row + 2 * math.prod(_ring_shape(2, slots, big, products))
          + 2 * math.prod(_out_shape(big, products)))


def _parts_smem(nk, big, slots, products="cuda_cores"):
  """Shared-memory bytes of a `matvec_parts` CTA's buffers (nk steps of its run of the row)."""
  return (2 * nk * BK + 2 * math.prod(_ring_shape(1, slots, big, products))
          + 4 * math.prod(_out_shape(big, products)))


def _pair_plan(e, f, parts, ctas, slots, sms, products="cuda_cores"):
  """(ctas, slots) of a `silu_pair` launch, the given ones checked. Defaults: two CTAs an SM
  where two fit in its shared memory (the rows past a run, padded to 64 for the register layout,
  are work too: 40-row runs pad less than 72-row ones), else one; GATE_UP_SLOTS slots, fewer
  where they do not fit (the 7B's 144-row runs take 3 beside the o launch's 2 parts, 2 beside
  5); never more CTAs than 8-row units."""
  if slots is not None and (not isinstance(slots, int) or isinstance(slots, bool)
                            or not 1 <= slots <= MAX_SLOTS):
    raise ValueError(f"silu_pair: slots={slots!r} must be an integer in 1..{MAX_SLOTS}")
  if ctas is not None and (not isinstance(ctas, int) or isinstance(ctas, bool) or ctas < 1):
    raise ValueError(f"silu_pair: ctas={ctas!r} must be a positive integer")
  per_sms = (None,) if ctas is not None else (2, 1)
  for per_sm in per_sms:
    n = ctas if per_sm is None else default_pair_ctas(f, per_sm, sms)
    big = row_plan(f, n)[1]
    for s_ in ([slots] if slots is not None else range(GATE_UP_SLOTS, 1, -1)):
      if (per_sm or 1) * (_pair_smem(e, parts, big, s_, products) + SMEM_SLACK) <= SMEM_BYTES:
        return n, s_
  raise ValueError(f"silu_pair: a CTA's shared memory does not fit in {SMEM_BYTES} bytes "
                   f"(row {e}, {parts} parts, ctas={ctas}, slots={slots}): give fewer slots or "
                   "more CTAs")


def launch_unsupported(e: int, f: int, parts: Optional[int] = None,
                       products: Optional[str] = None) -> str | None:
  """Why the default launches cannot run an MLP of hidden size e and f intermediate rows (None
  when they can): `matvec_parts`' down when `parts` is None, else `silu_pair`'s gate/up with an
  add of `parts` float32 partial sums (0: none, or a plain row); products on `products`
  (default PRODUCTS)."""
  products = products or PRODUCTS
  dt = jnp.bfloat16
  why = unsupported(e, f, dt) or unsupported(f, e, dt)
  if why is not None:
    return why
  try:
    if parts is None:
      _parts_plan(f, e, None, None, None, _sms(), products)
    else:
      _pair_plan(e, f, parts, None, None, _sms(), products)
  except ValueError as err:
    return str(err)
  return None


def default_pair_ctas(f: int, per_sm: int, sms: int) -> int:
  """`silu_pair`'s CTAs for f weight rows at `per_sm` CTAs an SM on `sms` SMs: no more than
  8-row units."""
  return min(per_sm * sms, f // UNIT)


def default_parts_ctas(n: int, splits: int, sms: int) -> int:
  """`matvec_parts`' CTAs for n weight rows split `splits` ways on `sms` SMs: one an SM, rounded
  down to a multiple of the splits, and no more per split than 8-row units."""
  return splits * min(sms // splits, n // UNIT)


def default_splits(k: int, n: int, sms: int) -> int:
  """`matvec_parts`' split of a row of k by n weight rows: the most of 4, 2, 1 that divides the
  row's steps and still gives each CTA 4 units (32 rows) or more (wider TMA boxes)."""
  for s in (4, 2):
    if (k // BK) % s == 0 and n // UNIT >= 4 * (sms // s):
      return s
  return 1


def _parts_plan(k, n, splits, ctas, slots, sms, products="cuda_cores"):
  """(splits, ctas, slots) of a `matvec_parts` launch, the given ones checked (defaults:
  `default_splits`; the SMs rounded down to a multiple of the splits, at most a unit of 8 rows
  a CTA; DOWN_SLOTS slots, fewer where they do not fit)."""
  if splits is None:
    splits = default_splits(k, n, sms)
  if (not isinstance(splits, int) or isinstance(splits, bool) or splits < 1
      or (k // BK) % splits):
    raise ValueError(f"matvec_parts: splits={splits!r} must be a positive integer dividing the "
                     f"row's {k // BK} steps of {BK}")
  if slots is not None and (not isinstance(slots, int) or isinstance(slots, bool)
                            or not 1 <= slots <= MAX_SLOTS):
    raise ValueError(f"matvec_parts: slots={slots!r} must be an integer in 1..{MAX_SLOTS}")
  if ctas is None:
    ctas = default_parts_ctas(n, splits, sms)
  if not isinstance(ctas, int) or isinstance(ctas, bool) or ctas < 1 or ctas % splits:
    raise ValueError(f"matvec_parts: ctas={ctas!r} must be a positive multiple of splits="
                     f"{splits}")
  big = row_plan(n, ctas // splits)[1]
  for s_ in ([slots] if slots is not None else range(DOWN_SLOTS, 1, -1)):
    if _parts_smem(k // BK // splits, big, s_, products) + SMEM_SLACK <= SMEM_BYTES:
      return splits, ctas, s_
  raise ValueError(f"matvec_parts: a CTA's shared memory does not fit in {SMEM_BYTES} bytes "
                   f"(slots={slots}, {big}-row runs): give fewer slots or more CTAs")


def _sms():
  from dllm_jax.kernels.decode import sm_count  # the device's SMs (a default on a CPU)

  return sm_count()
