"""The four attention masks equal matrices written out by hand from the rules."""

import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax import masks

# Two samples packed on blocks of 2: sample 1 has 3 tokens padded to 4, sample 2 has 2 tokens,
# then one block of row padding (segment 0).
SEGMENTS = [1, 1, 1, 1, 2, 2, 0, 0]


def parse(rows):
  return np.array([[c == "1" for c in r.replace(" ", "")] for r in rows])


def build(spec, segments, packed):
  seg = jnp.asarray([segments], jnp.int32)
  pos = masks.packed_positions(seg) if packed else None
  meta = masks.layout_meta(spec, seg, pos)
  return np.asarray(masks.dense_mask(spec, meta, meta))[0]


@pytest.mark.parametrize("packed", [False, True])
def test_causal(packed):
  want = parse(["10000000",
                "11000000",
                "11100000",
                "11110000",
                "00001000",
                "00001100",
                "00000010",
                "00000011"])
  np.testing.assert_array_equal(build(masks.MaskSpec("causal", 2), SEGMENTS, packed), want)


@pytest.mark.parametrize("packed", [False, True])
def test_block_causal(packed):
  want = parse(["11000000",
                "11000000",
                "11110000",
                "11110000",
                "00001100",
                "00001100",
                "00000011",
                "00000011"])
  np.testing.assert_array_equal(build(masks.MaskSpec("block_causal", 2), SEGMENTS, packed), want)


@pytest.mark.parametrize("packed", [False, True])
def test_diffusion_2l(packed):
  # Rows/columns: noisy 0..7, then clean 0..7.
  want = parse(["11000000 00000000",
                "11000000 00000000",
                "00110000 11000000",
                "00110000 11000000",
                "00001100 00000000",
                "00001100 00000000",
                "00000011 00000000",
                "00000011 00000000",
                "00000000 11000000",
                "00000000 11000000",
                "00000000 11110000",
                "00000000 11110000",
                "00000000 00001100",
                "00000000 00001100",
                "00000000 00000011",
                "00000000 00000011"])
  got = build(masks.MaskSpec("diffusion", 2, num_noisy=1), SEGMENTS, packed)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("packed", [False, True])
def test_diffusion_3l(packed):
  # Rows/columns: noisy copy 1, noisy copy 2, clean; each over positions 0..5.
  want = parse(["110000 000000 000000",
                "110000 000000 000000",
                "001100 000000 110000",
                "001100 000000 110000",
                "000011 000000 000000",
                "000011 000000 000000",
                "000000 110000 000000",
                "000000 110000 000000",
                "000000 001100 110000",
                "000000 001100 110000",
                "000000 000011 000000",
                "000000 000011 000000",
                "000000 000000 110000",
                "000000 000000 110000",
                "000000 000000 111100",
                "000000 000000 111100",
                "000000 000000 000011",
                "000000 000000 000011"])
  got = build(masks.MaskSpec("diffusion", 2, num_noisy=2), SEGMENTS[:6], packed)
  np.testing.assert_array_equal(got, want)


def test_packed_positions_restart_at_each_sample():
  got = masks.packed_positions(jnp.asarray([SEGMENTS, [1] * 8], jnp.int32))
  np.testing.assert_array_equal(np.asarray(got), [[0, 1, 2, 3, 0, 1, 0, 1], list(range(8))])


def test_layout_meta_of_the_3l_layout():
  spec = masks.MaskSpec("diffusion", 2, num_noisy=2)
  meta = masks.layout_meta(spec, jnp.asarray([[1, 1, 2, 2]], jnp.int32),
                           jnp.asarray([[0, 1, 0, 1]], jnp.int32))
  np.testing.assert_array_equal(np.asarray(meta.positions), [[0, 1, 0, 1] * 3])
  np.testing.assert_array_equal(np.asarray(meta.streams), [[1] * 4 + [2] * 4 + [0] * 4])
  np.testing.assert_array_equal(np.asarray(meta.segments), [[1, 1, 2, 2] * 3])
