"""One row times several weight matrices, with the residual add and RMSNorm that feed them fused
in: the projections of a one-token decode step at batch 1.

At batch 1 an AR step multiplies a single row by every weight matrix. Each product is a
matrix-vector product bound by reading the weights, and XLA runs the work around it as kernels of
their own, 1-2 us each however little they do: the norm's reduction, the norm's multiply, the
residual add, the SiLU product (BENCHMARKS.md, "Where the 1.5B batch-1 AR step goes"). Here one
kernel does all of it: every program computes the (tiny) residual-added row, or its run of it,
then reads its columns of the weights. The model (`model.matvec_impl`, "auto" on a GPU) runs four
a layer: the attention's norm with q/k/v (adding the previous layer's down product;
`norm_matvec_partials`), o, the residual add and MLP norm with gate/up and the SiLU product
(`norm_matvec`), and down. The q/k/v, o and down products have too few column tiles to fill the
GPU, so they split their rows (split-K) and leave float32 partial sums that whatever reads them
adds: the next launch where it reads the row (o, down), the attention's launch with its RoPE and
cache write (q/k/v: `decode.row_attention`, session 21; else the XLA kernels of RoPE and the
cache write, session 19). No kernel runs just to reduce them. Likewise the o launch
(`combined_matvec_partials`) combines the attention's cache splits as it loads its row, which
`row_attention` leaves uncombined (session 22: the step's GPU time 2.4% shorter than with the
attention's own combine).

Where it stands (H200, BENCHMARKS.md session 17): the step 7.5% faster than XLA's at the
Qwen2.5-1.5B shape, 5.4% at SmolLM2-135M, level at 7B, with 305 kernels a step instead of 473
(1.5B); the step's logits correlated 0.9998 with XLA's at the 1.5B and 135M shapes (largest
difference 2% of the largest logit, argmax equal). In the same step profiles the 1.5B's gate/up
launch took 19.3 us a layer against XLA's GEMM's 16.8 (the kernel streams the weights slower),
its down 9.9 against 10.9. XLA streams gate/up in 128-column tiles through TMA (session 18,
`benchmarks/xla_gemm_config.py`), which a Triton kernel of Pallas pointer loads does not match.

Measured not to pay (session 18), so not here: RoPE and the cache writes fused into these
launches, with the split combine of `decode_attention`'s XLA step (level: the q/k/v and o
launches grew by what the five small kernels had cost; session 21 put them into the
attention's launch instead, which paid, and session 22 the combine into o's, which paid), and
extra q/k/v programs reading gate/up into L2 (far slower). Session 20:
the gate/up launch reads at ~0.87 of the copy rate whether or not its programs fill one wave
(XLA's TMA GEMM ~1.19); gate/up by XLA's GEMM inside this step cost more in the kernels around
it than it saved, and gate and up interleaved in one weight (128-byte rows) ran slightly
slower. Gate and up stored as [F / 32, E, 32] tiles (each program's tile contiguous) cut the
launch 7% and the step's GPU time 2.2%, but only on a second copy of the weights: not kept
(BENCHMARKS.md).

Numerics follow the model's XLA path op for op, within rounding, with one exception: the norm's
1/rms multiplies the products' float32 sums, not the row before them (it is one scalar, so it
factors out; the weights' loads then wait for no reduction over the row). The row is the bf16
residual add, scale * row rounded to the compute dtype, the products accumulated in float32,
times 1/rms and rounded to the compute dtype, then the bias (or SiLU(gate) * up) each rounded as
XLA rounds its bf16 ops. Against the model's path that drops the rounding of the normalised row
and orders the float32 sums differently. Float32 rows multiply at full precision (the model's XLA
dots at default precision may use TF32 on a GPU). Measured with bf16 weights only; in float16 the
un-normalised scale * row can overflow where the normalised row would not (`model.matvec_impl`'s
"auto" runs these kernels for bf16 only).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _pow2_divisor(n: int, at_most: int) -> int:
  """The largest power of two <= at_most that divides n (1 if none larger)."""
  b = 1
  while b * 2 <= at_most and n % (b * 2) == 0:
    b *= 2
  return b


def _check_knobs(fn: str, **knobs) -> None:
  """Positive integer knobs (block sizes at least 16), else a ValueError naming the knob."""
  for name, v in knobs.items():
    least = 16 if name.startswith("block_") else 1
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
      raise ValueError(f"{fn}: {name}={v!r} must be an integer >= {least}")


def supported(e: int, ns: Sequence[int], block_n: int = 32, block_k: int = 256) -> str | None:
  """None when `norm_matvec` covers a row of length e times weights of ns columns, else why
  not."""
  if _pow2_divisor(e, block_k) < 16:
    return f"row length {e} has no power-of-two divisor >= 16"
  for n in ns:
    if _pow2_divisor(n, block_n) < 16:
      return f"weight columns {n} have no power-of-two divisor >= 16"
  return None


def _round(x, dtype):
  """float32 -> dtype -> float32: what storing a `dtype` intermediate does."""
  return x.astype(dtype).astype(jnp.float32)


_ROWS = 16  # rows of the tensor-core product (the row, repeated)


def _products(load, prep, w_refs, col, nk, bk, bn, dtype, row0=0, out_major=False):
  """float32 [bn] per weight: the sum over chunks c < nk of prep(load(c)) [bk] times rows
  row0 + c*bk .. of w[:, col:col+bn] (of w[col:col+bn, :]'s columns for an out-major w [N, K]).

  The row goes through the tensor cores as 16 equal rows (their smallest M): Triton pipelines
  only loads that feed a dot, and a weight-bound product needs its loads in flight while it
  multiplies (an elementwise multiply-add reached half the bandwidth of XLA's GEMM on the
  H200, BENCHMARKS.md). Row 0 of the result is the product. The next chunk of the row is
  loaded (`load`) before this chunk's products and prepared (`prep`) after them, so its latency
  hides behind them instead of standing in front of every chunk (loading each chunk in the
  iteration that multiplies it made the 1.5B step's gate/up launch 2.2x slower, session 19).
  """
  first_row = lax.broadcasted_iota(jnp.int32, (_ROWS, bn), 0) == 0
  precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None

  def body(c, carry):
    accs, xn = carry
    nxt = load(jnp.minimum(c + 1, nk - 1))
    a = jnp.broadcast_to(xn[None, :], (_ROWS, bk))
    rows, cols = pl.ds(row0 + c * bk, bk), pl.ds(col, bn)
    accs = tuple(
        acc + lax.dot_general(a, (w_ref[cols, rows] if out_major else w_ref[rows, cols]
                                  ).astype(dtype),
                              (((1,), (int(out_major),)), ((), ())), precision=precision,
                              preferred_element_type=jnp.float32)
        for acc, w_ref in zip(accs, w_refs))
    return accs, prep(nxt)

  zeros = tuple(jnp.zeros((_ROWS, bn), jnp.float32) for _ in w_refs)
  accs, _ = lax.fori_loop(0, nk, body, (zeros, prep(load(0))))
  return [jnp.sum(jnp.where(first_row, acc, 0.0), axis=0) for acc in accs]


def _row_inputs(x_ref, add_ref, scale_ref, add_parts, start, size):
  """The raw inputs of the row at start .. start + size: x; the add (None, [size], or for float32
  partial sums [S, E] a list of S loads of [size], Triton tiles being powers of two); the norm's
  scale (or None)."""
  sl = pl.ds(start, size)
  add = None
  if add_ref is not None:
    add = [add_ref[i, sl] for i in range(add_parts)] if add_parts else add_ref[sl]
  return x_ref[sl], add, None if scale_ref is None else scale_ref[sl]


def _residual_row(raw, add_parts, dtype):
  """x + add of `_row_inputs`' values, float32 of dtype values rounded as the model rounds."""
  x = raw[0].astype(jnp.float32)
  if raw[1] is not None:
    if add_parts:  # the product the parts sum to, rounded as XLA rounds its GEMM's output
      a = _round(sum(p.astype(jnp.float32) for p in raw[1]), dtype)
    else:
      a = raw[1].astype(jnp.float32)
    x = _round(x + a, dtype)
  return x


def _scaled_row(raw, add_parts, dtype):
  """The products' operand from `_row_inputs`' values: scale * (x + add) rounded to dtype (the
  row alone without a scale). 1/rms is one scalar, so it multiplies the products' float32 sums
  instead, and the weights' loads wait for no reduction over the row (the q/k/v launch 6.61 ->
  6.22 us at the 1.5B, BENCHMARKS.md session 19)."""
  x = _residual_row(raw, add_parts, dtype)
  if raw[2] is not None:
    x = _round(raw[2].astype(jnp.float32) * x, dtype)
  return x.astype(dtype)


def _kernel(*refs, num_w, has_add, add_parts, has_norm, has_bias, silu_pair, eps, bk, nk, bn,
            tiles, dtype, out_major):
  it = iter(refs)
  x_ref = next(it)
  add_ref = next(it) if has_add else None
  scale_ref = next(it) if has_norm else None
  w_refs = [next(it) for _ in range(num_w)]
  b_refs = [next(it) for _ in range(num_w)] if has_bias else None
  o_refs = [next(it) for _ in range(1 if silu_pair else num_w)]
  sum_ref = next(it) if has_add else None
  e = bk * nk
  j = pl.program_id(0)

  load = lambda c: _row_inputs(x_ref, add_ref, scale_ref, add_parts, c * bk, bk)  # chunk c
  row = lambda raw: _residual_row(raw, add_parts, dtype)

  def rsqrt_and_sum():  # the norm's 1/rms (None without a norm); program 0 stores the row
    raws = [load(c) for c in range(nk)]  # read again: by now from the cache
    if has_add:
      @pl.when(j == 0)
      def _():
        for c, raw in enumerate(raws):
          sum_ref[pl.ds(c * bk, bk)] = row(raw).astype(sum_ref.dtype)
    if has_norm:
      return lax.rsqrt(sum(jnp.sum(x * x) for x in map(row, raws)) / e + eps)
    return None

  normed = lambda raw: _scaled_row(raw, add_parts, dtype)

  def matvec(refs, col):  # the products of scale * row, times 1/rms
    ys = _products(load, normed, refs, col, nk, bk, bn, dtype, out_major=out_major)
    r = rsqrt_and_sum()
    return [_round(y if r is None else y * r, dtype) for y in ys]

  if silu_pair:
    col = pl.multiple_of(j * bn, bn)
    g, u = matvec(w_refs, col)
    s = _round(g * _round(jax.nn.sigmoid(g), dtype), dtype)
    o_refs[0][pl.ds(col, bn)] = (s * u).astype(o_refs[0].dtype)
    return

  first = 0
  for i in range(num_w):  # program j works on the weight whose tiles hold it
    @pl.when((j >= first) & (j < first + tiles[i]))
    def _(i=i, first=first):
      col = pl.multiple_of((j - first) * bn, bn)
      y, = matvec(w_refs[i:i + 1], col)
      if has_bias:
        y = _round(y + b_refs[i][pl.ds(col, bn)].astype(jnp.float32), dtype)
      o_refs[i][pl.ds(col, bn)] = y.astype(o_refs[i].dtype)
    first += tiles[i]


# A gate/up pair with more 32-column tiles than this a streaming multiprocessor (the 7B's 18944
# columns: 592 tiles, 4.5 a SM on 132) streamed faster in 64-column tiles.
WIDE_PAIR_TILES_PER_SM = 4


def default_knobs(ns: Sequence[int], silu_pair: bool) -> dict:
  """`norm_matvec`'s block_n, block_k and num_stages for weights of ns columns: the fastest of the
  sweeps on the H200 (BENCHMARKS.md, sessions 16-17). 32 columns a program and chunks of 512
  rows, or 256 for the gate/up pair, whose two weight tiles in three stages must fit in shared
  memory; a pair of many column tiles (WIDE_PAIR_TILES_PER_SM) 64 columns in two stages: at the
  7B's gate/up 69.9 us a layer against 97.5 for the narrow setting (XLA 71.7), at the 1.5B's 280
  tiles 20.2 against 19.8."""
  if not ns or min(ns) < 1:
    raise ValueError(f"default_knobs: weight column counts expected, got {list(ns)}")
  if not silu_pair:
    return {"block_n": 32, "block_k": 512, "num_stages": 3}
  from dllm_jax.kernels.decode import sm_count  # the device's SMs (a default on a CPU)

  if max(ns) // _pow2_divisor(max(ns), 32) > WIDE_PAIR_TILES_PER_SM * sm_count():
    return {"block_n": 64, "block_k": 256, "num_stages": 2}
  return {"block_n": 32, "block_k": 256, "num_stages": 3}


def _kn(w, out_major: bool) -> tuple[int, int]:
  """(K, N): the rows the row multiplies and the output columns of a weight [K, N], or of an
  out-major one [N, K] (a Linear's layout: each output column's weights one contiguous run)."""
  return (w.shape[1], w.shape[0]) if out_major else tuple(w.shape)


def _check_row_inputs(fn: str, x_E, ws_EN, add_E, norm_scale_E, out_major: bool) -> None:
  """A row [E], weights [E, N] ([N, E] out-major), an add [E] or partial sums [S, E], a scale
  [E]; else a ValueError naming `fn` and the shapes."""
  if (x_E.ndim != 1 or not ws_EN
      or any(w.ndim != 2 or _kn(w, out_major)[0] != x_E.shape[0] for w in ws_EN)):
    want = "[N, E] (out_major)" if out_major else "[E, N]"
    raise ValueError(f"{fn}: a row [E] and at least one weight, all weights {want}, expected; "
                     f"got x {x_E.shape} and weights {[w.shape for w in ws_EN]}")
  e = x_E.shape[0]
  for name, a in (("add_E", add_E), ("norm_scale_E", norm_scale_E)):
    if a is not None and a.shape != (e,) and not (name == "add_E" and a.ndim == 2
                                                   and a.shape[1] == e and a.shape[0] >= 1):
      raise ValueError(f"{fn}: {name} has shape {a.shape}, the row ({e},)"
                       + (f" or partial sums [S, {e}]" if name == "add_E" else ""))


def norm_matvec(x_E: jax.Array, ws_EN: Sequence[jax.Array], *,
                add_E: Optional[jax.Array] = None,
                norm_scale_E: Optional[jax.Array] = None, eps: float = 1e-6,
                biases_N: Optional[Sequence[jax.Array]] = None, silu_pair: bool = False,
                block_n: Optional[int] = None, block_k: Optional[int] = None,
                num_warps: int = 4, num_stages: Optional[int] = None, out_major: bool = False,
                interpret: bool = False):
  """(outputs, row): `outputs[i] = norm(x + add) @ ws[i] (+ biases[i])`, in x's dtype.

  x [E]; ws[i] [E, N_i], or [N_i, E] with `out_major` (each program's columns one contiguous
  run of the weight). `add_E` given: the row is x + add (rounded to x's dtype), returned as
  `row` (the residual stream after the add); else `row` is None. `add_E` may also be float32
  partial sums [S, E] (`matvec_partials`' output): then add = their sum rounded to x's dtype,
  the product they split. `norm_scale_E` given: the row is RMS-normalised (eps `eps`), as
  `model.RMSNorm`, its 1/rms applied to the products. `silu_pair`: ws = (gate, up) and the one
  output is SiLU(row @ gate) * (row @ up). `block_n` / `block_k` (columns per program, rows
  per chunk; the largest powers of two up to them that divide the shapes), `num_warps` and
  `num_stages` are tuning knobs; those left None take `default_knobs`.
  """
  ws_EN = tuple(ws_EN)
  _check_row_inputs("norm_matvec", x_E, ws_EN, add_E, norm_scale_E, out_major)
  e = x_E.shape[0]
  ns = [_kn(w, out_major)[1] for w in ws_EN]
  d = default_knobs(ns, silu_pair)
  block_n, block_k, num_stages = (d[k] if v is None else v for k, v in (
      ("block_n", block_n), ("block_k", block_k), ("num_stages", num_stages)))
  _check_knobs("norm_matvec", block_n=block_n, block_k=block_k, num_warps=num_warps,
               num_stages=num_stages)
  why = supported(e, ns, block_n, block_k)
  if why is not None:
    raise ValueError(f"norm_matvec: {why}")
  if silu_pair and (len(ws_EN) != 2 or ws_EN[0].shape != ws_EN[1].shape or biases_N):
    raise ValueError("norm_matvec: silu_pair takes two weights of one shape (gate, up), no bias")
  if biases_N is not None and [b.shape for b in biases_N] != [(n,) for n in ns]:
    raise ValueError(f"norm_matvec: biases {[b.shape for b in biases_N]} do not match the "
                     f"weights' columns {ns}")
  dtype = x_E.dtype
  # Scale, bias and the added row enter the arithmetic in the row's dtype, as in the model.
  add_parts = 0 if add_E is None or add_E.ndim == 1 else add_E.shape[0]
  if add_E is not None:
    add_E = add_E.astype(jnp.float32 if add_parts else dtype)
  norm_scale_E = None if norm_scale_E is None else norm_scale_E.astype(dtype)
  biases_N = None if biases_N is None else [b.astype(dtype) for b in biases_N]
  bk = _pow2_divisor(e, block_k)
  bn = min(_pow2_divisor(n, block_n) for n in ns)
  tiles = tuple(n // bn for n in ns)
  grid = tiles[0] if silu_pair else sum(tiles)

  whole = lambda a: pl.BlockSpec(a.shape, lambda j: (0,) * a.ndim)
  args = [x_E] + ([add_E] if add_E is not None else [])
  args += [norm_scale_E] if norm_scale_E is not None else []
  args += list(ws_EN) + (list(biases_N) if biases_N is not None else [])
  outs = [jax.ShapeDtypeStruct((n,), dtype) for n in (ns[:1] if silu_pair else ns)]
  if add_E is not None:
    outs.append(jax.ShapeDtypeStruct((e,), dtype))
  kernel = functools.partial(
      _kernel, num_w=len(ws_EN), has_add=add_E is not None, add_parts=add_parts,
      has_norm=norm_scale_E is not None, has_bias=biases_N is not None, silu_pair=silu_pair,
      eps=eps, bk=bk, nk=e // bk, bn=bn, tiles=tiles, dtype=dtype, out_major=out_major)
  res = pl.pallas_call(
      kernel,
      grid=(grid,),
      in_specs=[whole(a) for a in args],
      out_specs=[pl.BlockSpec(o.shape, lambda j: (0,)) for o in outs],
      out_shape=outs,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="norm_matvec",
  )(*args)
  res = list(res)
  row = res.pop() if add_E is not None else None
  return tuple(res), row


def pick_splits(e: int, n: int, block_n: int = 32, block_k: int = 512,
                programs: Optional[int] = None) -> int:
  """The default split of `matvec_partials` and `norm_matvec_partials` over the row length e
  (weights [e, n]): the most splits
  whose grid (column tiles x splits) still fits in `programs` (default two a streaming
  multiprocessor, one wave of programs holding their 3-stage weight tiles), each split's rows a
  multiple of 64, or of the largest power of two (at least 16) dividing both e and block_k;
  1 where no split qualifies."""
  if programs is None:
    from dllm_jax.kernels.decode import sm_count  # the device's SMs (a default on a CPU)

    programs = 2 * sm_count()
  if e < 1 or n < 1:
    raise ValueError(f"pick_splits: a weight [{e}, {n}] has no rows or no columns")
  tiles = n // _pow2_divisor(n, block_n)
  least = max(16, min(64, _pow2_divisor(e, block_k)))
  fits = [s for s in range(1, e // least + 1)
          if e % s == 0 and _pow2_divisor(e // s, block_k) >= least and tiles * s <= programs]
  return max(fits, default=1)


def _checked_splits(fn: str, e: int, n: int, splits: Optional[int], block_n: int,
                    block_k: int) -> tuple[int, int]:
  """(splits, rows a split): `splits` of a row of length e times weights of n columns, default
  `pick_splits`, checked to cut the row into runs the kernels cover; errors name `fn`."""
  if splits is None:
    splits = pick_splits(e, n, block_n, block_k)
  _check_knobs(fn, splits=splits)
  if e % splits:
    raise ValueError(f"{fn}: splits={splits} does not divide the row length {e}")
  why = supported(e // splits, [n], block_n, block_k)
  if why is not None:
    raise ValueError(f"{fn}: {splits} splits of the row: {why}")
  return splits, e // splits


def _split_k_plan(fn: str, e: int, n: int, splits: Optional[int], block_n: int, block_k: int,
                  num_warps: int, num_stages: int) -> tuple[int, int, int]:
  """(splits, rows a split, column tile) of a split-K product of a row [e] by a weight [e, n],
  the knobs checked; errors name `fn`."""
  _check_knobs(fn, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages)
  if _pow2_divisor(n, block_n) < 16:
    raise ValueError(f"{fn}: weight columns {n} have no power-of-two divisor >= 16")
  splits, rows = _checked_splits(fn, e, n, splits, block_n, block_k)
  return splits, rows, _pow2_divisor(n, block_n)


def _split_k_call(kernel, row_specs, n: int, bn: int, rows: int, splits: int, num_warps: int,
                  num_stages: int, out_major: bool, interpret: bool, name: str):
  """The pallas_call of a split-K product: a program per (column tile, run of the row), the row's
  inputs (`row_specs`) then the weight [E, n] in tiles [rows, bn] (out-major [n, E]: [bn, rows]),
  float32 partial sums [splits, n] out."""
  w_spec = (pl.BlockSpec((bn, rows), lambda j, s: (j, s)) if out_major else
            pl.BlockSpec((rows, bn), lambda j, s: (s, j)))
  return pl.pallas_call(
      kernel,
      grid=(n // bn, splits),
      in_specs=[*row_specs, w_spec],
      out_specs=pl.BlockSpec((None, bn), lambda j, s: (s, j)),
      out_shape=jax.ShapeDtypeStruct((splits, n), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=name,
  )


def _partials_kernel(x_ref, w_ref, o_ref, *, bk, nk, bn, dtype, out_major):
  # x_ref [rows]: this split's part of the row; w_ref [rows, bn] ([bn, rows]); o_ref [bn].
  load = lambda c: x_ref[pl.ds(c * bk, bk)]
  o_ref[...] = _products(load, lambda x: x.astype(dtype), [w_ref], 0, nk, bk, bn, dtype,
                         out_major=out_major)[0]


def matvec_partials(x_E: jax.Array, w_EN: jax.Array, *, splits: Optional[int] = None,
                    block_n: int = 32, block_k: int = 512, num_warps: int = 4,
                    num_stages: int = 3, out_major: bool = False,
                    interpret: bool = False) -> jax.Array:
  """x [E] @ w [E, N] (w [N, E] with `out_major`) as float32 partial sums [S, N] over S equal
  runs of the row (split-K).

  A product whose columns alone give too few programs to stream the weights at full rate (the
  o and down projections: 48 tiles of 32 columns at Qwen2.5-1.5B's 1536, against 132 SMs)
  splits the row; the next kernel sums the parts where it reads them (`norm_matvec`'s `add_E`),
  so no kernel runs just to reduce them. Their sum rounded to x's dtype is the product, as XLA's
  GEMM rounds it; the order of the float32 sums differs. `splits` (default `pick_splits`; it
  must divide E into runs with a power-of-two divisor >= 16), `block_n`, `block_k`, `num_warps`
  and `num_stages` are tuning knobs, as in `norm_matvec`.
  """
  if x_E.ndim != 1 or w_EN.ndim != 2 or _kn(w_EN, out_major)[0] != x_E.shape[0]:
    want = "[N, E] (out_major)" if out_major else "[E, N]"
    raise ValueError(f"matvec_partials: a row [E] and a weight {want} expected; got x "
                     f"{x_E.shape} and w {w_EN.shape}")
  e, n = _kn(w_EN, out_major)
  splits, rows, bn = _split_k_plan("matvec_partials", e, n, splits, block_n, block_k, num_warps,
                                   num_stages)
  bk = _pow2_divisor(rows, block_k)
  kernel = functools.partial(_partials_kernel, bk=bk, nk=rows // bk, bn=bn, dtype=x_E.dtype,
                             out_major=out_major)
  return _split_k_call(kernel, [pl.BlockSpec((rows,), lambda j, s: (s,))], n, bn, rows, splits,
                       num_warps, num_stages, out_major, interpret, "matvec_partials")(x_E, w_EN)


def _combined_partials_kernel(p_ref, lse_ref, w_ref, o_ref, *, rows, head_dim, num_parts, bk,
                              nk, bn, dtype, out_major):
  from dllm_jax.kernels.decode import combine_weights  # row_attention's own combine's weights

  # p_ref [A, E], lse_ref [A, H] (whole): the attention's splits; w_ref [rows, bn] ([bn, rows]);
  # o_ref [bn].
  # A chunk of the row lies in one head (bk divides head_dim), so it has one weight a split.
  start = pl.program_id(1) * rows
  at = lambda a: jnp.int32(a)  # (a Python int index does not discharge in the interpreter)

  def load(c):
    first = start + c * bk
    head = lax.div(first, head_dim)
    ws, den = combine_weights([lse_ref[at(a), head] for a in range(num_parts)])
    num = functools.reduce(lambda a, b: a + b, [
        wt * p_ref[at(a), pl.ds(first, bk)] for a, wt in enumerate(ws)])
    return num / den

  o_ref[...] = _products(load, lambda x: x.astype(dtype), [w_ref], 0, nk, bk, bn, dtype,
                         out_major=out_major)[0]


def combined_matvec_partials(parts_AHD: jax.Array, lse_AH: jax.Array, w_EN: jax.Array, *,
                             dtype, splits: Optional[int] = None, block_n: int = 32,
                             block_k: int = 512, num_warps: int = 4, num_stages: int = 3,
                             out_major: bool = False, interpret: bool = False) -> jax.Array:
  """`matvec_partials` of the attention output that A splits of the cache leave uncombined
  (`decode.row_attention(..., combine=False)`): x [E = H * D] is, head by head, the splits'
  outputs parts [A, H, D] weighted by exp2 of their base-2 log-sum-exps lse [A, H] less their
  largest, over the weights' sum, rounded to `dtype` (what that kernel's own combine stores),
  and the result x @ w [E, N] (w [N, E] with `out_major`) as float32 partial sums [S, N].
  Each program combines the run of the row it multiplies as it loads it, from L2 (the attention
  has just written the parts), so no launch runs only to combine them. A split that saw no key
  has lse -inf and weight 0 (its parts must be finite, as `row_attention` stores them: zeros); a
  head whose every split has lse -inf would be NaN, which `row_attention` never leaves (split 0
  always sees slot 0). Knobs as `matvec_partials`; a chunk of the row (block_k) is cut to lie
  in one head.
  """
  if parts_AHD.ndim != 3 or lse_AH.shape != parts_AHD.shape[:2] or w_EN.ndim != 2:
    raise ValueError(f"combined_matvec_partials: parts [A, H, D], lse [A, H] and a weight "
                     f"[H * D, N] ([N, H * D] out_major) expected; got parts "
                     f"{parts_AHD.shape}, lse {lse_AH.shape} and "
                     f"w {w_EN.shape}")
  num_parts, h, d = parts_AHD.shape
  from dllm_jax.kernels.decode import ROW_MAX_SPLITS  # lazily, as sm_count

  if not 1 <= num_parts <= ROW_MAX_SPLITS:
    raise ValueError(f"combined_matvec_partials: {num_parts} splits of the attention; 1 .. "
                     f"{ROW_MAX_SPLITS} are combined (each program loads every split's run)")
  bad = {k: str(a.dtype) for k, a in (("parts", parts_AHD), ("lse", lse_AH))
         if not jnp.issubdtype(a.dtype, jnp.floating)}
  if bad:
    raise ValueError(f"combined_matvec_partials: float parts and lse expected, got {bad}")
  e, n = _kn(w_EN, out_major)
  if e != h * d:
    raise ValueError(f"combined_matvec_partials: the weight's {e} "
                     f"{'columns' if out_major else 'rows'} are not the parts' {h} heads x {d}")
  if d & (d - 1) or d < 16:
    raise ValueError(f"combined_matvec_partials: head_dim {d} is not a power of two >= 16 (a "
                     "chunk of the row lies in one head)")
  splits, rows, bn = _split_k_plan("combined_matvec_partials", e, n, splits, block_n, block_k,
                                   num_warps, num_stages)
  # (>= 16: _checked_splits leaves runs with a power-of-two divisor >= 16, and d is one.)
  bk = _pow2_divisor(rows, min(block_k, d))
  kernel = functools.partial(_combined_partials_kernel, rows=rows, head_dim=d,
                             num_parts=num_parts, bk=bk, nk=rows // bk, bn=bn,
                             dtype=jnp.dtype(dtype), out_major=out_major)
  whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
  return _split_k_call(kernel, [whole((num_parts, e)), whole((num_parts, h))], n, bn, rows,
                       splits, num_warps, num_stages, out_major, interpret,
                       "combined_matvec_partials")(
      parts_AHD.reshape(num_parts, e).astype(jnp.float32), lse_AH.astype(jnp.float32),
      w_EN.astype(dtype))


def _norm_partials_kernel(*refs, num_w, has_add, add_parts, e, bk_row, rows, bk, bn, tiles,
                          splits, eps, dtype, out_major):
  it = iter(refs)
  x_ref = next(it)
  add_ref = next(it) if has_add else None
  scale_ref = next(it)
  w_refs = [next(it) for _ in range(num_w)]
  o_refs = [next(it) for _ in range(num_w)]
  r_ref = next(it)
  sum_ref = next(it) if has_add else None
  p = pl.program_id(0)
  work = sum(tiles) * splits

  load = lambda start, size: _row_inputs(x_ref, add_ref, scale_ref, add_parts, start, size)
  row = lambda raw: _residual_row(raw, add_parts, dtype)

  @pl.when(p == work)  # one program more than the products': the whole row's 1/rms (and row)
  def _():
    xs = [row(load(c * bk_row, bk_row)) for c in range(e // bk_row)]
    if has_add:
      for c, x in enumerate(xs):
        sum_ref[pl.ds(c * bk_row, bk_row)] = x.astype(sum_ref.dtype)
    r = lax.rsqrt(sum(jnp.sum(x * x) for x in xs) / e + eps)
    r_ref[...] = jnp.full(r_ref.shape, r, jnp.float32)

  s = p % splits  # this program's run of the row
  t = p // splits  # its column tile, over the weights' tiles in order
  normed = lambda raw: _scaled_row(raw, add_parts, dtype)  # 1/rms multiplies the parts' sum

  first = 0
  for i in range(num_w):
    @pl.when((p < work) & (t >= first) & (t < first + tiles[i]))
    def _(i=i, first=first):
      col = pl.multiple_of((t - first) * bn, bn)
      y, = _products(lambda c: load(s * rows + c * bk, bk), normed, [w_refs[i]], col,
                     rows // bk, bk, bn, dtype, row0=s * rows, out_major=out_major)
      o_refs[i][pl.ds(s, 1), pl.ds(col, bn)] = y[None]
    first += tiles[i]


def norm_matvec_partials(x_E: jax.Array, ws_EN: Sequence[jax.Array], *, norm_scale_E: jax.Array,
                         add_E: Optional[jax.Array] = None, eps: float = 1e-6,
                         splits: Optional[int] = None, block_n: int = 32, block_k: int = 512,
                         num_warps: int = 4, num_stages: int = 3, out_major: bool = False,
                         interpret: bool = False):
  """(parts, rsqrt, row): `norm(x + add) @ ws[i]` as float32 partial sums over S runs of the row
  (split-K), for a product whose columns alone give too few programs (the q/k/v of a one-row
  step: 64 tiles of 32 columns at Qwen2.5-1.5B). The norm's 1/rms is one scalar, so the parts
  hold the products of scale * row and `rsqrt` ([16] float32, every entry 1/rms) scales their
  sum: `norm_matvec`'s output i is `(parts[i].sum(0) * rsqrt[0])` rounded to x's dtype, plus
  its bias, which `finish_partials` computes in the caller's ops that read it
  (`model._fused_row_layer`). `row`: as
  `norm_matvec`'s (x + add, or None without `add_E`); `add_E` may be float32 partial sums
  [S', E]. One program more than the products' computes the whole row's 1/rms and stores the
  row, so no other program reads more than its run of the row. `splits` (default
  `pick_splits`), `block_n`, `block_k`, `num_warps`, `num_stages`, `out_major` (ws [N_i, E]): as
  `matvec_partials`.
  """
  ws_EN = tuple(ws_EN)
  if norm_scale_E is None:
    raise ValueError("norm_matvec_partials: norm_scale_E is required (1/rms scales the parts)")
  _check_row_inputs("norm_matvec_partials", x_E, ws_EN, add_E, norm_scale_E, out_major)
  e = x_E.shape[0]
  ns = [_kn(w, out_major)[1] for w in ws_EN]
  _check_knobs("norm_matvec_partials", block_n=block_n, block_k=block_k, num_warps=num_warps,
               num_stages=num_stages)
  why = supported(e, ns, block_n, block_k)
  if why is not None:
    raise ValueError(f"norm_matvec_partials: {why}")
  bn = min(_pow2_divisor(n, block_n) for n in ns)
  tiles = tuple(n // bn for n in ns)
  splits, rows = _checked_splits("norm_matvec_partials", e, sum(ns), splits, bn, block_k)
  dtype = x_E.dtype
  add_parts = 0 if add_E is None or add_E.ndim == 1 else add_E.shape[0]
  if add_E is not None:
    add_E = add_E.astype(jnp.float32 if add_parts else dtype)
  args = [x_E] + ([add_E] if add_E is not None else []) + [norm_scale_E.astype(dtype)]
  args += list(ws_EN)
  outs = [jax.ShapeDtypeStruct((splits, n), jnp.float32) for n in ns]
  outs.append(jax.ShapeDtypeStruct((16,), jnp.float32))
  if add_E is not None:
    outs.append(jax.ShapeDtypeStruct((e,), dtype))
  whole = lambda shape: pl.BlockSpec(shape, lambda j: (0,) * len(shape))
  kernel = functools.partial(
      _norm_partials_kernel, num_w=len(ws_EN), has_add=add_E is not None, add_parts=add_parts,
      e=e, bk_row=_pow2_divisor(e, block_k), rows=rows, bk=_pow2_divisor(rows, block_k), bn=bn,
      tiles=tiles, splits=splits, eps=eps, dtype=dtype, out_major=out_major)
  res = list(pl.pallas_call(
      kernel,
      grid=(sum(tiles) * splits + 1,),
      in_specs=[whole(a.shape) for a in args],
      out_specs=[whole(o.shape) for o in outs],
      out_shape=outs,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="norm_partials",
  )(*args))
  row = res.pop() if add_E is not None else None
  rsqrt = res.pop()
  return tuple(res), rsqrt, row


def finish_partials(parts_SN: jax.Array, rsqrt: jax.Array, dtype,
                    bias_N: Optional[jax.Array] = None) -> jax.Array:
  """`norm_matvec_partials`' output i from its parts: their sum times 1/rms, rounded to `dtype`,
  plus the bias (rounded as XLA rounds a bf16 add). The parts are added one by one, so XLA fuses
  the sum into whatever reads the result (a reduction would be a kernel of its own)."""
  y = functools.reduce(lambda a, b: a + b, list(parts_SN)) * rsqrt[0]
  y = y.astype(dtype)
  return y if bias_N is None else y + bias_N.astype(dtype)


def norm_matvec_reference(x_E, ws_EN, *, add_E=None, norm_scale_E=None, eps=1e-6,
                          biases_N=None, silu_pair=False, dot=None):
  """`norm_matvec` in plain XLA, written as the model writes it; `dot(x [1, E], w [E, N])` is
  the product (default a plain dot; the model's `_matmul` for what the model runs)."""
  dot = dot or (lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  dtype = x_E.dtype
  if add_E is not None and add_E.ndim == 2:  # partial sums: the product they split
    add_E = add_E.astype(jnp.float32).sum(0).astype(dtype)
  x = x_E if add_E is None else x_E + add_E
  h = x
  if norm_scale_E is not None:
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32) + eps)
    h = norm_scale_E.astype(dtype) * y.astype(dtype)
  ys = [dot(h[None], w.astype(dtype)).astype(dtype)[0] for w in ws_EN]
  if silu_pair:
    ys = [jax.nn.silu(ys[0]) * ys[1]]
  elif biases_N is not None:
    ys = [y + b.astype(dtype) for y, b in zip(ys, biases_N)]
  return tuple(ys), (x if add_E is not None else None)
