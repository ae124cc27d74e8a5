"""benchmarks/grid_wait.py without a GPU: the one-launch wait computes what the two launches do
(interpreted: its programs run in order, so the wait is met at once), and each wait lowers to
one Triton kernel."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture()
def bench(load_benchmark):
  return load_benchmark("grid_wait")


def test_one_launch_equals_two_and_leaves_the_counter_zero(bench):
  src = bench.source(64, 16)
  prev = jnp.zeros((1, 1), jnp.float32)
  want = bench.two_launches(prev, src, producers=3, consumers=5, walk=4, interpret=True)
  got, counter = bench.fused(prev, src, jnp.zeros((1,), jnp.int32), producers=3, consumers=5,
                             walk=4, wait="volatile", interpret=True)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(counter, 0)
  # The rows are the producers' walks summed: not a constant the consumers could write alone.
  rows = bench.produce_launch(prev, src, producers=3, walk=4, interpret=True)
  np.testing.assert_array_equal(np.asarray(want[2]), np.asarray(rows.sum(0) + 2))
  assert len(set(np.asarray(rows[:, 0]).tolist())) > 1
  # Not zero on entry: every program still counts itself, and none resets it.
  _, counter = bench.fused(prev, src, jnp.full((1,), 100, jnp.int32), producers=3, consumers=5,
                           walk=4, wait="volatile", interpret=True)
  np.testing.assert_array_equal(counter, 108)


@pytest.mark.parametrize("wait", ["atomic", "volatile", "backoff"])
def test_each_wait_lowers_to_one_triton_kernel(bench, wait, lower_for_cuda):
  f = functools.partial(bench.fused, producers=10, consumers=48, walk=8, wait=wait)
  text = lower_for_cuda(f, jnp.zeros((1, 1), jnp.float32), bench.source(4096, 128),
                        jnp.zeros((1,), jnp.int32))
  assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 1
  with pytest.raises(ValueError, match="wait='spin': expected one of"):
    bench.fused(jnp.zeros((1, 1)), bench.source(64, 16), jnp.zeros((1,), jnp.int32),
                producers=1, consumers=1, walk=1, wait="spin")


def test_chain_times_the_last_launch_and_checks_every_one(bench):
  src = bench.source(64, 16)
  step = functools.partial(bench.fused, producers=2, consumers=3, walk=2, wait="volatile",
                           interpret=True)
  outs, counters = bench.chain(step, layers=3, every_counter=True)(src)
  out, counter = bench.chain(step, layers=3)(src)
  assert outs.shape == (3, 3, 16) and counters.shape == (3, 1) and counter.shape == (1,)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(outs[-1]))
  np.testing.assert_array_equal(counters, 0)
