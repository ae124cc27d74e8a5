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


def brute_force_mask(kind, num_noisy, block, segments):
  """The layout's mask written index by index from the method's rules, for samples of any number
  of blocks (the hand-written matrices above hold at most two blocks a sample, which cannot tell
  'every earlier block' from 'the block just before')."""
  length = len(segments)
  parts = num_noisy + 1 if kind == "diffusion" else 1
  start = [0] * length  # first index of each token's run of equal segment ids
  for i in range(1, length):
    start[i] = start[i - 1] if segments[i] == segments[i - 1] else i
  want = np.zeros((parts * length, parts * length), bool)
  for q in range(parts * length):
    for k in range(parts * length):
      qi, ki = q % length, k % length
      if segments[qi] != segments[ki]:
        continue
      # Stream s > 0 is noisy copy s (parts 0..num_noisy-1); the last part is the clean copy.
      qs = q // length + 1 if q // length < parts - 1 else 0
      ks = k // length + 1 if k // length < parts - 1 else 0
      qb, kb = (qi - start[qi]) // block, (ki - start[ki]) // block  # blocks of its sample
      if qs == 0:
        want[q, k] = ks == 0 and kb <= qb  # clean: block-causal over the clean copy
      else:  # noisy: its own noisy block of its own copy, every clean block strictly before
        want[q, k] = (ks == qs and kb == qb) or (ks == 0 and kb < qb)
  return want


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind,num_noisy", [("block_causal", 1), ("diffusion", 1),
                                            ("diffusion", 2)])
@pytest.mark.parametrize("block", [1, 2, 3])
def test_masks_of_samples_of_many_blocks_equal_the_rules(packed, kind, num_noisy, block):
  # Samples of 4, 1 and 3 blocks, then 2 blocks of row padding: a query of a sample's fourth
  # block must see all three clean blocks before it, not only the nearest one.
  runs = [(1, 4), (2, 1), (3, 3), (0, 2)]
  segments = [s for s, n in runs for _ in range(n * block)]
  got = build(masks.MaskSpec(kind, block, num_noisy=num_noisy), segments, packed)
  np.testing.assert_array_equal(got, brute_force_mask(kind, num_noisy, block, segments))
