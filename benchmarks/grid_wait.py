"""What a wait across one launch's programs costs in a Pallas Triton kernel (#7).

Session 24 ran the o product in `row_attention`'s launch: its programs waited on a counter for
the attending ones, and the launch took 21.3 us a layer against 9.2 for the two launches it
replaced (BENCHMARKS.md). Fusing launches is the lever left for the batch-1 step's launch costs,
so this times the wait alone, on a stand-in for the attention: P producer programs each walk a
chain of `walk` dependent loads (the attention's walk over the cache is such a chain) and write a
row; C consumer programs wait until every producer has counted itself done, then sum the rows.
Against it: the same work as two launches (producers, then consumers) and the producers' launch
alone. Each figure is us a launch in a jit of 28 launches chained as a step's layers are.

Waits (`--waits`):
- `atomic`: poll the counter with atomic adds of zero (Triton runs a scalar atomic on one thread
  and hands its result to the others through shared memory and a barrier);
- `volatile`: poll with volatile loads (every thread), then count in with one atomic add;
- `backoff`: as `atomic`, with `backoff` dependent multiply-adds between polls, so that fewer
  polls reach L2 while the producers work.

Every fused launch is checked against the two-launch result (equal) and for a counter left 0.

    python3 benchmarks/grid_wait.py [--consumers 10,48,192] [--walk 8] [--waits ...]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

from benchmarks.common import error_text, run_meta, save_json, timeit  # noqa: E402

WAITS = ("atomic", "volatile", "backoff")
LAYERS = 28  # launches a timed call chains, as a step's layers
_TRITON = plgpu.CompilerParams(num_warps=4, num_stages=1)  # (Triton, as kernels/decode.py)


def source(n: int, d: int) -> jax.Array:
  """[n, d] float32 rows whose entries all hold the next row's index (a pointer chase)."""
  nxt = (np.arange(n) * 7 + 3) % n
  return jnp.asarray(np.repeat(nxt[:, None], d, axis=1), jnp.float32)


def _walk(src_ref, start, walk: int, n: int):
  """float32 [d]: the sum of `walk` rows of src, each row's index read from the one before."""
  def body(_, carry):
    idx, acc = carry
    x = src_ref[idx, :]
    return lax.rem(jnp.max(x).astype(jnp.int32), n), acc + x

  d = src_ref.shape[1]
  _, acc = lax.fori_loop(0, walk, body, (lax.rem(start, n), jnp.zeros((d,), jnp.float32)))
  return acc


def _produce(p, prev_ref, src_ref, rows_ref, *, walk):
  start = p + prev_ref[0, 0].astype(jnp.int32)  # (after the previous launch: a layer chain)
  rows_ref[p, :] = _walk(src_ref, start, walk, src_ref.shape[0])


def _consume(c, rows_ref, out_ref, *, producers, volatile):
  load = (lambda r: plgpu.load(rows_ref.at[jnp.int32(r), :], volatile=True)) if volatile else (
      lambda r: rows_ref[jnp.int32(r), :])
  total = functools.reduce(lambda a, b: a + b, [load(r) for r in range(producers)])
  out_ref[c, :] = total + c.astype(jnp.float32)


def _fused_kernel(prev_ref, src_ref, _ctr_in, rows_ref, out_ref, ctr_ref, *, producers,
                  consumers, walk, wait, backoff, interpret):
  pid = pl.program_id(0)

  @pl.when(pid < producers)
  def _():
    _produce(pid, prev_ref, src_ref, rows_ref, walk=walk)
    if not interpret:
      plgpu.debug_barrier()  # every thread's stores before the count's release
    plgpu.atomic_add(ctr_ref, (jnp.int32(0),), jnp.int32(1))

  @pl.when(pid >= producers)
  def _():
    # (Zeros made by ops, not constants: the interpreter's discharge of a loop takes none.)
    zero = lambda: jnp.zeros((), jnp.int32)
    if wait == "volatile":
      peek = lambda _: jnp.max(plgpu.load(ctr_ref.at[pl.ds(0, 1)], volatile=True))
    else:
      def peek(_):
        seen = plgpu.atomic_add(ctr_ref, (zero(),), zero())
        if wait == "backoff":  # dependent multiply-adds the compiler cannot drop
          x = lax.fori_loop(0, backoff, lambda i, x: x * 0.999 + 1e-3, seen.astype(jnp.float32))
          seen = seen + (x < -1.0).astype(jnp.int32)  # (x stays positive: adds 0)
        return seen
    lax.while_loop(lambda seen: seen < producers, peek, jnp.int32(0))
    done = plgpu.atomic_add(ctr_ref, (jnp.int32(0),), jnp.int32(1))
    if not interpret:
      plgpu.debug_barrier()  # the count's acquire before every thread's reads

    @pl.when(done == producers + consumers - 1)
    def _():
      ctr_ref[pl.ds(0, 1)] = jnp.zeros((1,), jnp.int32)  # ready for the next launch

    _consume(pid - producers, rows_ref, out_ref, producers=producers, volatile=True)


def fused(prev, src, counter, *, producers: int, consumers: int, walk: int, wait: str,
          backoff: int = 64, interpret: bool = False):
  """(out [consumers, d], counter): one launch, the consumers waiting on `counter` (int32 [1],
  zero on entry, left zero)."""
  if wait not in WAITS:
    raise ValueError(f"wait={wait!r}: expected one of {WAITS}")
  d = src.shape[1]
  whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
  outs = [jax.ShapeDtypeStruct((producers, d), jnp.float32),
          jax.ShapeDtypeStruct((consumers, d), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32)]
  kernel = functools.partial(_fused_kernel, producers=producers, consumers=consumers, walk=walk,
                             wait=wait, backoff=backoff, interpret=interpret)
  _, out, counter = pl.pallas_call(
      kernel, grid=(producers + consumers,),
      in_specs=[whole(prev.shape), whole(src.shape), whole((1,))],
      out_specs=[whole(o.shape) for o in outs], out_shape=outs,
      input_output_aliases={2: 2}, compiler_params=_TRITON, interpret=interpret,
      name="grid_wait_fused",
  )(prev, src, counter)
  return out, counter


def produce_launch(prev, src, *, producers: int, walk: int, interpret: bool = False):
  """rows [producers, d]: the producers alone, in a launch of their own."""
  d = src.shape[1]
  whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
  return pl.pallas_call(
      lambda prev_ref, src_ref, rows_ref: _produce(pl.program_id(0), prev_ref, src_ref, rows_ref,
                                                   walk=walk),
      grid=(producers,), in_specs=[whole(prev.shape), whole(src.shape)],
      out_specs=whole((producers, d)), out_shape=jax.ShapeDtypeStruct((producers, d), jnp.float32),
      compiler_params=_TRITON, interpret=interpret, name="grid_wait_producers")(prev, src)


def two_launches(prev, src, *, producers: int, consumers: int, walk: int,
                 interpret: bool = False):
  """out [consumers, d]: the producers' launch, then the consumers'."""
  rows = produce_launch(prev, src, producers=producers, walk=walk, interpret=interpret)
  whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
  return pl.pallas_call(
      lambda rows_ref, out_ref: _consume(pl.program_id(0), rows_ref, out_ref,
                                         producers=producers, volatile=False),
      grid=(consumers,), in_specs=[whole(rows.shape)], out_specs=whole((consumers, rows.shape[1])),
      out_shape=jax.ShapeDtypeStruct((consumers, rows.shape[1]), jnp.float32),
      compiler_params=_TRITON, interpret=interpret, name="grid_wait_consumers")(rows)


def chain(step, layers: int = LAYERS, every_counter: bool = False):
  """A jitted function of (src,) running `step(prev, src, counter) -> (out, counter)` `layers`
  times, each launch after the previous one's output; returns (the last out [c, d], the last
  counter), or with `every_counter` (outs [layers, c, d], counters [layers, 1]) for the checks.
  (The timed form keeps no earlier counter: XLA would copy each before the next launch writes
  it in place, a copy a launch that the two-launch form does not pay.)"""
  def run(src):
    prev = jnp.zeros((1, 1), jnp.float32)
    counter = jnp.zeros((1,), jnp.int32)
    outs, counters = [], []
    for _ in range(layers):
      out, counter = step(prev, src, counter)
      prev = out[:1, :1] * 0.0  # (a dependency, not a change: starts stay as they were)
      outs.append(out)
      counters.append(counter)
    if every_counter:
      return jnp.stack(outs), jnp.stack(counters)
    return out, counter
  return jax.jit(run)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--producers", type=int, default=10)
  ap.add_argument("--consumers", default="10,48,192")
  ap.add_argument("--walk", type=int, default=8, help="dependent loads a producer chains")
  ap.add_argument("--waits", default=",".join(WAITS))
  ap.add_argument("--backoff", type=int, default=64)
  ap.add_argument("--rows", type=int, default=4096, help="rows of the walked source [rows, 128]")
  args = ap.parse_args()
  waits = [w for w in args.waits.split(",") if w]
  bad = [w for w in waits if w not in WAITS]
  if bad:
    ap.error(f"--waits: {bad} not in {WAITS}")
  src = source(args.rows, 128)
  p = args.producers
  res = {"meta": run_meta(), "args": vars(args), "rows": []}
  producers_only = chain(lambda prev, s, c: (produce_launch(prev, s, producers=p,
                                                            walk=args.walk), c))
  for c in (int(x) for x in args.consumers.split(",")):
    row = {"producers": p, "consumers": c, "walk": args.walk}
    res["rows"].append(row)
    two = lambda prev, s, ctr: (two_launches(prev, s, producers=p, consumers=c,
                                             walk=args.walk), ctr)
    want, _ = chain(two, every_counter=True)(src)
    row["two_launches_us"] = timeit(chain(two), [(src,)]) / LAYERS * 1e6
    row["producers_alone_us"] = timeit(producers_only, [(src,)]) / LAYERS * 1e6
    for w in waits:
      save_json("grid_wait.json", res)  # (a wait that hangs past the limit leaves the rest)
      try:
        step = functools.partial(fused, producers=p, consumers=c, walk=args.walk, wait=w,
                                 backoff=args.backoff)
        got, counters = chain(step, every_counter=True)(src)
        row[f"{w}_exact"] = bool(np.array_equal(np.asarray(got), np.asarray(want)))
        row[f"{w}_counters"] = sorted(set(np.asarray(counters).ravel().tolist()))[:4]
        row[f"{w}_us"] = timeit(chain(step), [(src,)]) / LAYERS * 1e6
      except Exception as e:  # (one wait failing leaves the others' figures)
        row[f"{w}_error"] = error_text(e)
    print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
  save_json("grid_wait.json", res)


if __name__ == "__main__":
  main()
