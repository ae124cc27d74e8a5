"""The jitted decoders against plain-Python transcriptions of the same algorithms."""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dllm_jax import decoding, masks, model
from dllm_jax.cache import init_cache
from dllm_jax.config import ModelConfig
from dllm_jax.decoding import DecodeConfig, DecodeError

MASK = 127
BS, SBS = 8, 4
CFG = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, mask_token_id=MASK,
                  max_position_embeddings=128)


@pytest.fixture(scope="module")
def params():
  # Random weights scaled up so that confidences spread over (0, 1) (median ~0.4, 90th
  # percentile ~0.7): some steps unmask several tokens at the thresholds used below, others one.
  p = model.init_params(CFG, jax.random.key(0))
  p = jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, p)
  return {**p, "lm_head": p["lm_head"] * 10.0}


def _prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  width = max(lengths)
  out = np.zeros((len(lengths), width), np.int32)
  for i, n in enumerate(lengths):
    out[i, :n] = rng.integers(0, MASK, n)
  return out, np.asarray(lengths, np.int32)


# --------------------------------------------------------------------------------------------
# Plain-Python transcriptions (batch of one, host control flow)


@jax.jit
def _uncached(params, tokens_1T):
  meta = masks.TokenMeta.simple(jnp.arange(tokens_1T.shape[1], dtype=jnp.int32)[None])
  return model.forward(params, CFG, tokens_1T, meta, masks.MaskSpec("block_causal", BS))[0][0]


@jax.jit
def _cached(params, tokens_1T, start, cache):
  meta = masks.TokenMeta.simple(start + jnp.arange(tokens_1T.shape[1], dtype=jnp.int32)[None])
  logits, cache = model.forward(params, CFG, tokens_1T, meta, masks.MaskSpec("block_causal", BS),
                                cache)
  return logits[0], cache


def _block_logits_uncached(params, seq, end):
  """Logits [end, V] of seq[:end] recomputed from scratch under the block-causal mask."""
  return np.asarray(_uncached(params, jnp.asarray([seq[:end]], jnp.int32)))


def _forward_cached(params, tokens, start, cache):
  logits, cache = _cached(params, jnp.asarray([tokens], jnp.int32), start, cache)
  return np.asarray(logits), cache


def _no_mask(logits):
  """The mask token is never an output (the decoder's rule; the authors' loop would re-decode
  such a position)."""
  logits = np.array(logits, np.float32)
  logits[..., MASK] = -np.inf
  return logits


def reference_decode(params, prompt, cfg: DecodeConfig, order=None):
  """The authors' decoder for one row, greedy, in plain Python.

  use_dual_cache=False: every step recomputes the prompt and all generated context from scratch.
  use_dual_cache=True: the authors' two buffers -- a block-level cache of committed blocks and a
  separate copy holding the current block's KV, refreshed by a full-block forward when a
  sub-block starts masked, and updated in place by sub-block forwards otherwise.
  Returns (generated tokens, number of forward passes, number of sub-block forwards). `order`,
  a list, gets (step, index in the answer) for every token as it is decoded.
  """
  n, thr = cfg.max_new_tokens, cfg.threshold
  stop = set(cfg.stop_token_ids)
  p = len(prompt)
  seq, masked = list(prompt), [False] * p
  nfe = sub_forwards = 0
  total = -(-(p + n) // BS) * BS
  prefix_cache = init_cache(CFG, 1, total)
  whole = p // BS * BS
  if whole:
    nfe += 1
    if cfg.use_dual_cache:
      logits, prefix_cache = _forward_cached(params, seq[:whole], 0, prefix_cache)
    else:
      logits = _block_logits_uncached(params, seq, whole)
    if p % BS == 0:
      seq.append(int(np.argmax(_no_mask(logits[-1]))))
      masked.append(False)
  block_start = p // BS * BS
  block_kv = None
  while True:
    block_end = block_start + BS
    while len(seq) < block_end:
      seq.append(MASK)
      masked.append(True)
    # Stopping rules.
    first_stop = next((i for i in range(p, min(len(seq), p + n))
                       if not masked[i] and seq[i] in stop), None)
    if first_stop is not None and not any(masked[p:first_stop]):
      return seq[p:first_stop + 1], nfe, sub_forwards
    if len(seq) >= p + n and not any(masked[p:p + n]):  # (not the rest of the block)
      return seq[p:p + n], nfe, sub_forwards
    if not any(masked[block_start:block_end]):  # commit
      nfe += 1
      if cfg.use_dual_cache:
        logits, prefix_cache = _forward_cached(params, seq[block_start:block_end], block_start,
                                               prefix_cache)
        last = logits[-1]
      else:
        last = _block_logits_uncached(params, seq, block_end)[block_end - 1]
      seq.append(int(np.argmax(_no_mask(last))))
      masked.append(False)
      block_start, block_kv = block_end, None
      continue
    sub = next(s for s in range(block_start, block_end, SBS) if any(masked[s:s + SBS]))
    nfe += 1
    if not cfg.use_dual_cache:
      logits = _block_logits_uncached(params, seq, block_end)
      step = np.stack([logits[max(j - 1, block_start)] for j in range(sub, sub + SBS)])
    elif block_kv is None or masked[sub]:
      logits, block_kv = _forward_cached(params, seq[block_start:block_end], block_start,
                                         prefix_cache)
      step = np.stack([logits[max(j - 1, block_start) - block_start]
                       for j in range(sub, sub + SBS)])
    else:
      sub_forwards += 1
      logits, block_kv = _forward_cached(params, seq[sub:sub + SBS], sub, block_kv)
      step = np.stack([logits[max(j - 1, 0)] for j in range(SBS)])
    probs = np.asarray(jax.nn.softmax(jnp.asarray(_no_mask(step)), axis=-1))
    cand = probs.argmax(-1)
    conf = np.where(masked[sub:sub + SBS], probs[np.arange(SBS), cand], -np.inf)
    unmask = conf > thr
    unmask[conf.argmax()] = True
    for i in range(SBS):
      if unmask[i] and masked[sub + i]:
        seq[sub + i], masked[sub + i] = int(cand[i]), False
        if order is not None:
          order.append((nfe, sub + i - p))


def _decode(params, prompts, lengths, cfg, rng=None):
  rng = jax.random.key(0) if rng is None else rng
  out, lens, stats = decoding.generate_jit(params, CFG, jnp.asarray(prompts), jnp.asarray(lengths),
                                           rng, cfg)
  return np.asarray(out), np.asarray(lens), jax.tree.map(np.asarray, stats)


# Prompt shorter than a block, exactly one block (first token from the prefill), ending inside
# the second block, and exactly two blocks.
LENGTHS = [3, 8, 13, 16]


@pytest.mark.parametrize("dual", [False, True])
def test_batched_decoder_equals_python_transcription(params, dual):
  cfg = DecodeConfig(max_new_tokens=21, block_size=BS, sub_block_size=SBS, threshold=0.5,
                     use_dual_cache=dual)
  prompts, lengths = _prompts(LENGTHS)
  out, lens, stats = _decode(params, prompts, lengths, cfg)
  several = sub_forwards = 0
  for row, n in enumerate(LENGTHS):
    ref, ref_nfe, subs = reference_decode(params, list(prompts[row, :n]), cfg)
    sub_forwards += subs
    assert lens[row] == len(ref)
    np.testing.assert_array_equal(out[row, :lens[row]], ref)
    assert stats["nfe"][row] == ref_nfe
    several += ref_nfe < len(ref)
  # The model and threshold make some rows decode several tokens in one step.
  assert several >= 1
  assert sub_forwards >= 1 if dual else sub_forwards == 0  # the DualCache path is exercised


@pytest.mark.parametrize("mode,dual", [("diffusion", True), ("diffusion", False), ("ar", False)])
def test_per_layer_params_decode_the_same_tokens(params, mode, dual):
  cfg = DecodeConfig(mode=mode, max_new_tokens=13, block_size=BS, sub_block_size=SBS,
                     threshold=0.5, use_dual_cache=dual)
  prompts, lengths = _prompts(LENGTHS)
  stacked = _decode(params, prompts, lengths, cfg)
  per_layer = _decode(model.unstack_layers(params), prompts, lengths, cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, per_layer, stacked)


def test_fewer_new_tokens_give_a_prefix(params):
  """A row stops once its first N tokens are decoded, on the trajectory a longer limit takes, so
  they do not depend on max_new_tokens."""
  prompts, lengths = _prompts(LENGTHS)
  kw = dict(block_size=BS, sub_block_size=SBS, threshold=0.5)
  long, _, _ = _decode(params, prompts, lengths, DecodeConfig(max_new_tokens=21, **kw))
  short, lens, _ = _decode(params, prompts, lengths, DecodeConfig(max_new_tokens=13, **kw))
  assert np.all(lens == 13)
  np.testing.assert_array_equal(short, long[:, :13])


@pytest.mark.parametrize("dual", [False, True])
def test_a_limit_early_in_a_block_ends_the_row_there(params, dual):
  # Threshold 1: one token a round. A prompt of two whole blocks takes its first token from the
  # prefill (a forward). 4 tokens fill its first sub-block: 3 rounds, not the 7 that finish the
  # block; 12 take the block's 7 rounds, its commit (the 9th token) and the next block's first
  # sub-block (3 rounds). A prompt 3 slots into a block: 1 token is 1 round (its sub-block's
  # last slot), not 5. A limit inside a sub-block may wait for slots past it (the most confident
  # goes first): the transcription says how many.
  prompts, lengths = _prompts([2 * BS, 2 * BS + 3], seed=4)
  for row, n, want in [(0, 4, 1 + 3), (0, 12, 1 + 7 + 1 + 3), (0, 1, 1), (1, 1, 1 + 1),
                       (0, 3, None), (1, 3, None)]:
    cfg = DecodeConfig(max_new_tokens=n, block_size=BS, sub_block_size=SBS, threshold=1.0,
                       use_dual_cache=dual)
    out, lens, stats = _decode(params, prompts[row:row + 1], lengths[row:row + 1], cfg)
    ref, ref_nfe, _ = reference_decode(params, list(prompts[row, :lengths[row]]), cfg)
    np.testing.assert_array_equal(out[0], ref)
    assert lens[0] == n and stats["nfe"][0] == ref_nfe, (row, n, stats["nfe"][0], ref_nfe)
    assert want is None or ref_nfe == want, (row, n, ref_nfe, want)


def test_stop_token_and_rows_finish_independently(params):
  prompts, lengths = _prompts([4, 11, 9], seed=3)
  base = DecodeConfig(max_new_tokens=24, block_size=BS, sub_block_size=SBS, threshold=0.5)
  stop = reference_decode(params, list(prompts[1, :11]), base)[0][5]  # row 1 stops by token 6
  cfg = DecodeConfig(max_new_tokens=24, block_size=BS, sub_block_size=SBS, threshold=0.5,
                     stop_token_ids=(stop,))
  out_s, lens_s, stats = _decode(params, prompts, lengths, cfg)
  for row, n in enumerate([4, 11, 9]):
    ref, ref_nfe, _ = reference_decode(params, list(prompts[row, :n]), cfg)
    np.testing.assert_array_equal(out_s[row, :lens_s[row]], ref)
    assert stats["nfe"][row] == ref_nfe
    assert np.all(out_s[row, lens_s[row]:] == cfg.pad_token_id)
  assert lens_s[1] <= 6 and out_s[1, lens_s[1] - 1] == stop
  assert lens_s.max() > lens_s[1]  # another row ran on after row 1 finished


def test_a_stop_token_in_the_prompt_does_not_end_the_answer(params):
  # Only generated tokens stop a row: the prompt's own tokens (here: a stop id at its start and
  # one at its end) are context.
  prompts, lengths = _prompts([5, 11], seed=3)
  cfg = DecodeConfig(max_new_tokens=12, block_size=BS, sub_block_size=SBS, threshold=0.5,
                     stop_token_ids=(int(prompts[0, 0]), int(prompts[1, 10])))
  out, lens, stats = _decode(params, prompts, lengths, cfg)
  for row, n in enumerate([5, 11]):
    ref, ref_nfe, _ = reference_decode(params, list(prompts[row, :n]), cfg)
    assert lens[row] == len(ref) and stats["nfe"][row] == ref_nfe
    np.testing.assert_array_equal(out[row, :lens[row]], ref)


def test_a_stop_decoded_before_a_masked_position_waits_for_it(params):
  # At threshold 1 the most confident position goes first, not the leftmost. A stop token
  # unmasked while a position before it is still masked ends the row only once that position
  # is decoded too (the answer is everything up to the stop), as the transcription decides.
  prompts, lengths = _prompts([5], seed=3)
  cfg = DecodeConfig(max_new_tokens=16, block_size=BS, sub_block_size=SBS, threshold=1.0)
  order = []
  ref, _, _ = reference_decode(params, list(prompts[0, :5]), cfg, order)
  when = {i: step for step, i in order}
  # A token decoded at step s at index j while an index before j was still masked, and that
  # occurs nowhere before j: with it as the stop, the answer ends at j.
  j = next(j for j in sorted(when) if j < len(ref) and ref[j] not in ref[:j]
           and any(when.get(i, 0) > when[j] for i in range(j)))
  cfg = DecodeConfig(**{**cfg.__dict__, "stop_token_ids": (ref[j],)})
  out, lens, stats = _decode(params, prompts, lengths, cfg)
  ref_stop, ref_nfe, _ = reference_decode(params, list(prompts[0, :5]), cfg)
  assert ref_stop == ref[:j + 1]
  assert lens[0] == j + 1 and stats["nfe"][0] == ref_nfe
  np.testing.assert_array_equal(out[0, :j + 1], ref_stop)


def test_a_stop_past_max_new_tokens_does_not_count(params):
  # A threshold this low decodes a whole sub-block in one step, so the token right after the
  # limit is decoded in the same step as the limit's last one. As the stop id it must not
  # count: the row ends at the limit, its length max_new_tokens, never past it.
  prompts, lengths = _prompts([BS], seed=0)  # ends on a block: token 0 from the prefill
  free = DecodeConfig(max_new_tokens=12, block_size=BS, sub_block_size=SBS, threshold=1e-6)
  ref, _, _ = reference_decode(params, list(prompts[0]), free)
  n = 2  # tokens 1 and 2 share token 0's sub-block, decoded in one step
  assert ref[n] not in ref[:n]
  cfg = DecodeConfig(**{**free.__dict__, "max_new_tokens": n, "stop_token_ids": (ref[n],)})
  out, lens, stats = _decode(params, prompts, lengths, cfg)
  ref_n, ref_nfe, _ = reference_decode(params, list(prompts[0]), cfg)
  assert ref_n == ref[:n] and lens[0] == n and stats["nfe"][0] == ref_nfe
  np.testing.assert_array_equal(out[0], ref[:n])


def test_saturated_confidences_at_threshold_one_unmask_one_token_a_step(params):
  # Threshold 1.0 means one token a step: the rule is "exceeds", and no probability exceeds 1.
  # A head scaled up this far puts float32 probabilities of exactly 1.0 on most positions,
  # where ">=" would unmask the whole sub-block at once.
  sharp = {**params, "lm_head": params["lm_head"] * 100.0}
  prompts, lengths = _prompts([3, 8])
  cfg = DecodeConfig(max_new_tokens=12, block_size=BS, sub_block_size=SBS, threshold=1.0)
  logits = _block_logits_uncached(sharp, list(prompts[0, :3]) + [MASK] * (BS - 3), BS)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(_no_mask(logits)), axis=-1)).max(-1)
  assert np.sum(probs == 1.0) >= 2  # the case that tells > from >=
  out, lens, stats = _decode(sharp, prompts, lengths, cfg)
  for row, n in enumerate([3, 8]):
    ref, ref_nfe, _ = reference_decode(sharp, list(prompts[row, :n]), cfg)
    np.testing.assert_array_equal(out[row], ref)
    # One token per forward: each step unmasks one, a commit or the prefill gives one.
    assert stats["nfe"][row] == ref_nfe == 12


def test_next_blocks_first_token_is_greedy_when_sampling(params):
  # With temperature > 0 the steps sample, but a block's first token is the argmax of the
  # previous block's last position (the reference's rule), here recomputed from scratch over the
  # final tokens (committed blocks' KV is a forward of their final tokens).
  lengths = [3, 8, 13, 16]
  prompts, lens_in = _prompts(lengths, seed=1)
  cfg = DecodeConfig(max_new_tokens=20, block_size=BS, sub_block_size=SBS, threshold=0.7,
                     temperature=1.5)
  out, lens, _ = _decode(params, prompts, lens_in, cfg)
  checked = 0
  for row, n in enumerate(lengths):
    seq = list(prompts[row, :n]) + out[row, :lens[row]].tolist()
    for end in range(-(-n // BS) * BS, len(seq), BS):  # every block start in the answer
      logits = _block_logits_uncached(params, seq, end)[end - 1]
      assert seq[end] == int(np.argmax(_no_mask(logits))), (row, end)
      checked += 1
  assert checked >= 8


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_sampling_draws_fresh_tokens_every_step_and_row(params, mode):
  # A model with uniform distributions (a zero head): each sampled token is a fresh uniform
  # draw, so an answer holds many distinct tokens and rows differ, their first tokens too (AR
  # samples its first token from the prefill). Reusing one key across steps would repeat the
  # same draw at each sub-block slot (at most SBS distinct tokens, plus the greedy block
  # starts); a greedy first token would be the same in every row.
  uniform = {**params, "lm_head": jnp.zeros_like(params["lm_head"])}
  prompts = np.tile(_prompts([3])[0], (6, 1))  # one prompt: only the keys tell rows apart
  cfg = DecodeConfig(mode=mode, max_new_tokens=24, block_size=BS, sub_block_size=SBS,
                     temperature=1.0)
  out, lens, _ = _decode(uniform, prompts, np.full(6, 3, np.int32), cfg)
  assert np.all(lens == 24) and not np.any(out == MASK)
  assert min(len(set(row.tolist())) for row in out) >= 3 * SBS, out
  assert len(set(out[:, 0].tolist())) > 1 and len({tuple(r) for r in out.tolist()}) == 6


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_each_row_gets_what_it_gets_alone(params, mode):
  lengths = [2, 9, 16, 6]
  prompts, lens_in = _prompts(lengths, seed=5)
  cfg = DecodeConfig(mode=mode, max_new_tokens=19, block_size=BS, sub_block_size=SBS,
                     threshold=0.7, temperature=0.8, top_p=0.9, stop_token_ids=(7, 11))
  keys = jax.random.split(jax.random.key(42), len(lengths))
  out, lens, stats = _decode(params, prompts, lens_in, cfg, keys)
  for row in range(len(lengths)):
    out1, lens1, stats1 = _decode(params, prompts[row:row + 1], lens_in[row:row + 1], cfg,
                                  keys[row:row + 1])
    assert lens1[0] == lens[row]
    np.testing.assert_array_equal(out1[0], out[row])
    assert stats1["nfe"][0] == stats["nfe"][row]


def test_threshold_semantics(params):
  prompts, lengths = _prompts([5, 8, 12], seed=7)
  tpf = {}
  for thr in (1.0, 0.5, 0.1):
    cfg = DecodeConfig(max_new_tokens=24, block_size=BS, sub_block_size=SBS, threshold=thr)
    seen = []

    def on_step(tokens, masked, done):
      seen.append((np.asarray(masked).sum(axis=1), np.asarray(done)))

    out, lens, stats = decoding.generate(params, CFG, prompts, lengths, jax.random.key(0), cfg,
                                         on_step=on_step)
    counts = np.stack([c for c, _ in seen])  # masked positions after prefill and each iteration
    active = ~np.stack([d for _, d in seen])[:-1]  # unfinished before each iteration
    decoded = counts[:-1] - counts[1:]
    assert len(seen) == stats["iterations"] and active[0].all()  # iterations counts the prefill
    # Every iteration of an unfinished row unmasks at least one token (a commit fills in the
    # next block's first token), finished rows none; at threshold 1.0 exactly one.
    assert np.all(decoded[active] >= 1) and np.all(decoded[~active] == 0)
    if thr == 1.0:
      assert np.all(decoded[active] == 1)
    tpf[thr] = np.asarray(stats["tokens_per_nfe"])
  assert np.all(tpf[0.5] >= tpf[1.0])
  assert np.all(tpf[0.1] >= tpf[0.5])
  assert np.all(tpf[0.1] > tpf[1.0])


def test_traced_threshold_serves_a_sweep_with_one_program(params):
  prompts, lengths = _prompts([5, 8, 12], seed=7)
  base = DecodeConfig(max_new_tokens=24, block_size=BS, sub_block_size=SBS, threshold=1.0)
  fn = jax.jit(lambda th: decoding.generate(params, CFG, prompts, lengths, jax.random.key(0),
                                            base, threshold=th))
  compiled = fn.lower(jnp.float32(1.0)).compile()
  for thr in (1.0, 0.5, 0.1):
    want = decoding.generate(params, CFG, prompts, lengths, jax.random.key(0),
                             DecodeConfig(**{**base.__dict__, "threshold": thr}))
    got = compiled(jnp.float32(thr))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[2]["nfe"], want[2]["nfe"])
  # A concrete threshold is checked like DecodeConfig's.
  with pytest.raises(DecodeError, match=r"generate\(threshold=1.5\): must be in \(0, 1\]"):
    decoding.generate(params, CFG, prompts, lengths, jax.random.key(0), base, threshold=1.5)
  # A per-row threshold is refused, traced or not (it would broadcast along the sub-block).
  with pytest.raises(DecodeError, match=r"must be a scalar, got shape \(3,\)"):
    decoding.generate(params, CFG, prompts, lengths, jax.random.key(0), base,
                      threshold=np.full(3, 0.5, np.float32))
  with pytest.raises(DecodeError, match="must be a scalar"):
    jax.jit(lambda th: decoding.generate(params, CFG, prompts, lengths, jax.random.key(0), base,
                                         threshold=th))(jnp.full(3, 0.5))


def test_one_compiled_program_without_host_transfers(params):
  prompts, lengths = _prompts([6, 10])
  cfg = DecodeConfig(max_new_tokens=16, block_size=BS, sub_block_size=SBS, threshold=0.5)
  args = jax.device_put((params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(0)))
  compiled = jax.jit(decoding.generate, static_argnums=(1, 5)).lower(
      args[0], CFG, args[1], args[2], args[3], cfg).compile()
  assert "while" in compiled.as_text()
  with jax.transfer_guard("disallow"):
    out, lens, stats = compiled(*args)
    out.block_until_ready()
  ref, _, _ = reference_decode(params, list(prompts[0, :6]), cfg)
  np.testing.assert_array_equal(np.asarray(out)[0, :len(ref)], ref)
  # Lengths are data here, so a bad one cannot raise: that row decodes nothing, the other is
  # unaffected.
  out2, lens2, _ = compiled(args[0], args[1], jnp.asarray([6, 0]), args[3])
  np.testing.assert_array_equal(out2[0], out[0])
  assert int(lens2[1]) == 0 and np.all(np.asarray(out2[1]) == cfg.pad_token_id)


@pytest.mark.parametrize("dual", [True, False])
def test_a_round_runs_one_forward(params, dual, monkeypatch):
  """Rows at different steps share a round's one forward: the block forward where any row
  needs it (rows at a sub-block step write only their sub-block's slots), else the sub-block
  forward. Running both in a mixed round cost a batch of 32 1.10-1.20x the rounds without the
  DualCache (BENCHMARKS.md session 43); that the tokens stay each row's own is
  test_each_row_gets_what_it_gets_alone's and the transcription test's. Counted as the
  forwards run, not as written: each forward sits in a cond of its own (session 45)."""
  prompts, lengths = _prompts([3, 13])
  cfg = DecodeConfig(max_new_tokens=16, block_size=BS, sub_block_size=SBS, threshold=0.5,
                     use_dual_cache=dual)
  ran = []  # the tokens per row of each forward that ran
  forward = model.forward

  def counted(params, model_cfg, tokens, *a, **k):
    width = tokens.shape[1]
    jax.debug.callback(lambda: ran.append(width))
    return forward(params, model_cfg, tokens, *a, **k)

  monkeypatch.setattr(model, "forward", counted)
  decode = jax.jit(lambda p, t, n: decoding.generate(p, CFG, t, n, jax.random.key(0), cfg))
  _, _, stats = decode(params, jnp.asarray(prompts), jnp.asarray(lengths))
  jax.effects_barrier()
  assert len(ran) == int(stats["iterations"])  # the prefill, then one forward a round
  rounds = ran[1:]
  assert BS in rounds and (SBS in rounds) == dual, sorted(set(rounds))


_ar_logits = jax.jit(model.ar_forward, static_argnums=1)


def _greedy_recompute(params, prompt, n, width):
  """n greedy tokens after `prompt`, each from a causal forward of the whole sequence so far
  (padded to `width`: causal, so the padding after it does not change its logits)."""
  seq = list(prompt)
  for _ in range(n):
    logits = _ar_logits(params, CFG, jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32))
    seq.append(int(np.argmax(_no_mask(logits[0, len(seq) - 1]))))
  return seq[len(prompt):]


def test_ar_equals_greedy_recompute(params):
  prompts, lengths = _prompts([3, 7, 12], seed=9)
  cfg = DecodeConfig(mode="ar", max_new_tokens=10)
  out, lens, stats = _decode(params, prompts, lengths, cfg)
  for row, n in enumerate([3, 7, 12]):
    np.testing.assert_array_equal(out[row], _greedy_recompute(params, prompts[row, :n], 10, 22))
  assert np.all(lens == 10) and np.all(stats["nfe"] == 10)


def test_ar_stop_tokens_end_rows_where_greedy_recompute_meets_one(params):
  # A stop as a row's very first token (decided after the prefill) and one later (inside the
  # step loop) each end their row there, stop included; the other rows run on.
  lengths = [3, 7, 12]
  prompts, lens_in = _prompts(lengths, seed=9)
  refs = [_greedy_recompute(params, prompts[r, :n], 10, 22) for r, n in enumerate(lengths)]
  later = next(t for i, t in enumerate(refs[1]) if i >= 3 and t not in refs[1][:i])
  stops = (refs[0][0], later)
  want = [next((i + 1 for i, t in enumerate(ref) if t in stops), 10) for ref in refs]
  assert want[0] == 1 and 1 < want[1] < 10, want  # both places are exercised
  cfg = DecodeConfig(mode="ar", max_new_tokens=10, stop_token_ids=stops)
  out, lens, stats = _decode(params, prompts, lens_in, cfg)
  np.testing.assert_array_equal(lens, want)
  for row, ref in enumerate(refs):
    np.testing.assert_array_equal(out[row, :want[row]], ref[:want[row]])
    assert np.all(out[row, want[row]:] == cfg.pad_token_id)


def test_sampler_per_row_and_top_p():
  logits = jnp.log(jnp.asarray([[[0.5, 0.3, 0.15, 0.05]], [[0.05, 0.15, 0.3, 0.5]]]))
  keys = jax.random.split(jax.random.key(1), 2)
  many_keys = jax.random.split(jax.random.key(2), (300, 2))
  draws = np.asarray(jax.jit(jax.vmap(lambda k: decoding.sample(logits, k, 1.0, 0.7)[0]))(
      many_keys))[:, :, 0]
  # top_p=0.7 keeps {0, 1} for row 0 and {3, 2} for row 1: each row draws from its own.
  assert set(np.unique(draws[:, 0])) == {0, 1}
  assert set(np.unique(draws[:, 1])) == {2, 3}
  tok, conf = decoding.sample(logits, keys, 1.0, 0.7)
  expected = {0: 0.5 / 0.8, 1: 0.3 / 0.8, 2: 0.3 / 0.8, 3: 0.5 / 0.8}
  for row in range(2):
    np.testing.assert_allclose(conf[row, 0], expected[int(tok[row, 0])], rtol=1e-5)
  tok, conf = decoding.sample(logits, keys, 0.0, 1.0)
  np.testing.assert_array_equal(tok[:, 0], [0, 3])
  np.testing.assert_allclose(conf[:, 0], [0.5, 0.5], rtol=1e-5)


def test_top_p_keeps_the_token_whose_preceding_mass_is_exactly_top_p():
  # The authors' rule (Dream's top_p_logits): drop a token when the mass before it exceeds
  # top_p. Two tokens of 1/2 each (exact in float32) and top_p = 0.5: the second one's preceding
  # mass is 0.5, not above it, so both stay and the chosen one's confidence is 1/2, not 1.
  logits = jnp.asarray([[[0.0, 0.0, -jnp.inf, -jnp.inf]]])
  keys = jax.random.split(jax.random.key(3), (64, 1))
  tok, conf = jax.jit(jax.vmap(lambda k: decoding.sample(logits, k, 1.0, 0.5)))(keys)
  np.testing.assert_array_equal(np.asarray(conf), 0.5)
  assert set(np.unique(np.asarray(tok)).tolist()) == {0, 1}


def test_bad_inputs_are_clear_errors(params):
  prompts, lengths = _prompts([3, 5])
  ok = DecodeConfig(max_new_tokens=4, block_size=BS, sub_block_size=SBS)
  with pytest.raises(DecodeError, match="longer than the model's context"):
    decoding.generate(params, CFG, np.zeros((1, 129), np.int32), np.array([129]),
                      jax.random.key(0), ok)
  with pytest.raises(DecodeError, match="empty"):
    decoding.generate(params, CFG, prompts, np.array([3, 0]), jax.random.key(0), ok)
  with pytest.raises(DecodeError, match="empty"):
    decoding.generate(params, CFG, np.zeros((1, 0), np.int32), np.array([0]), jax.random.key(0), ok)
  for thr in (0.0, -0.1, 1.5):
    with pytest.raises(DecodeError, match=r"threshold.*\(0, 1\]"):
      DecodeConfig(threshold=thr)
  with pytest.raises(DecodeError, match="does not divide block_size"):
    DecodeConfig(block_size=32, sub_block_size=5)
  ar_model = ModelConfig(**{**CFG.__dict__, "mask_token_id": None})
  with pytest.raises(DecodeError, match="not diffusion-trained"):
    decoding.generate(params, ar_model, prompts, lengths, jax.random.key(0), ok)
  with pytest.raises(DecodeError, match="mode"):
    DecodeConfig(mode="beam")
  # Types a config file or a caller may get wrong, named (not a TypeError deep inside).
  for fields, message in (({"max_new_tokens": 2.5}, "max_new_tokens=2.5: expected an integer"),
                          ({"temperature": float("nan")}, "temperature=nan: expected a finite"),
                          ({"stop_token_ids": ["2"]}, "stop_token_ids=.*expected token ids"),
                          ({"stop_token_ids": None}, "stop_token_ids=None: expected token ids")):
    with pytest.raises(DecodeError, match=message):
      DecodeConfig(**fields)
  # One id, or numpy/jax integers, are token ids: Python ints, so the config hashes under jit.
  assert DecodeConfig(stop_token_ids=2).stop_token_ids == (2,)
  assert DecodeConfig(stop_token_ids=[np.int32(2), jnp.int32(3)]).stop_token_ids == (2, 3)
  assert DecodeConfig(stop_token_ids=(t for t in (4, 5))).stop_token_ids == (4, 5)  # read once
  with pytest.raises(DecodeError, match=r"rng must be a PRNG key \(jax.random.key\(seed\)\)"):
    decoding.generate(params, CFG, prompts, lengths, 0, ok)
  # The cache reaches past the model's context (128 positions here).
  with pytest.raises(DecodeError, match=r"reach position 136 \(whole blocks of block_size=8\), "
                     r"past the model's context \(max_position_embeddings=128\); lower "
                     r"max_new_tokens to 8 or less or shorten the prompt"):
    decoding.generate(params, CFG, np.zeros((1, 120), np.int32), np.array([120]),
                      jax.random.key(0), DecodeConfig(max_new_tokens=10, block_size=BS,
                                                      sub_block_size=SBS))
  # An id outside the vocabulary inside a prompt embeds as NaN: named instead.
  bad = np.array(prompts)
  bad[1, 2] = CFG.vocab_size
  with pytest.raises(DecodeError, match=f"prompt 1 holds token id {CFG.vocab_size} at position 2"):
    decoding.generate(params, CFG, bad, lengths, jax.random.key(0), ok)
  # generate_jit checks the values it is given before they are traced (inside the compiled
  # decoder they could not be: a bad length or id decoded garbage, a threshold of 5 ran).
  key = jax.random.key(0)
  for args, message in (((prompts, np.array([3, 0]), key, ok), "prompt 1 is empty"),
                        ((prompts, np.array([3, 9]), key, ok), "prompt 1 has length 9"),
                        ((bad, lengths, key, ok), "prompt 1 holds token id"),
                        ((prompts.astype(np.float32), lengths, key, ok),
                         "prompt_tokens must hold integers"),
                        ((prompts, np.array([True, True]), key, ok),
                         "prompt_lengths must hold integers"),
                        ((prompts, lengths, jnp.zeros(3, jnp.uint32), ok), "rng must be a PRNG")):
    with pytest.raises(DecodeError, match=message):
      decoding.generate_jit(params, CFG, *args)
  with pytest.raises(DecodeError, match=r"generate\(threshold=5.0\): must be in \(0, 1\]"):
    decoding.generate_jit(params, CFG, prompts, lengths, key, ok, threshold=5.0)
  # AR mode: the mask token is checked as in diffusion mode (a negative id would ban another
  # token), and the diffusion-only arguments are refused rather than ignored.
  ar = DecodeConfig(mode="ar", max_new_tokens=4)
  with pytest.raises(DecodeError, match="mask token -1 is outside the vocabulary"):
    decoding.generate(params, CFG, prompts, lengths, key,
                      DecodeConfig(mode="ar", max_new_tokens=4, mask_token_id=-1))
  for kw in ({"threshold": 0.5}, {"on_step": print}):
    with pytest.raises(DecodeError, match="are for diffusion decoding; mode='ar'"):
      decoding.generate(params, CFG, prompts, lengths, key, ar, **kw)
  # A mask id other than the model's, a stop on the mask token (never output), a bool
  # threshold, a padding id past int32 (review of session 37).
  with pytest.raises(DecodeError, match="mask_token_id=5 differs from the model's mask token 127"):
    decoding.generate(params, CFG, prompts, lengths, key, DecodeConfig(
        max_new_tokens=4, block_size=BS, sub_block_size=SBS, mask_token_id=5))
  with pytest.raises(DecodeError, match="stop token 127 is the mask token"):
    decoding.generate(params, CFG, prompts, lengths, key, DecodeConfig(
        max_new_tokens=4, block_size=BS, sub_block_size=SBS, stop_token_ids=(3, MASK)))
  for thr in (True, np.bool_(True)):
    with pytest.raises(DecodeError, match="not a bool"):
      decoding.generate(params, CFG, prompts, lengths, key, ok, threshold=thr)
  with pytest.raises(DecodeError, match="pad_token_id=4294967296: must fit in int32"):
    DecodeConfig(pad_token_id=2 ** 32)
  assert DecodeConfig(pad_token_id=-1).pad_token_id == -1  # a sentinel outside the vocabulary


def test_a_tiny_temperature_samples_the_argmax_under_jit():
  # logits / 1e-20 overflowed to inf and the jitted softmax gave NaN confidences (and token 0).
  logits = jnp.asarray([[[1.0, 3.0, 2.0, -1.0]], [[0.5, -2.0, 0.25, 0.0]]])
  keys = jax.random.split(jax.random.key(0), 2)
  for t in (1e-9, 1e-20, 1e-37):
    tok, conf = jax.jit(lambda l, k: decoding.sample(l, k, t, 1.0))(logits, keys)
    np.testing.assert_array_equal(tok[:, 0], [1, 0])
    np.testing.assert_array_equal(conf[:, 0], [1.0, 1.0])
  with pytest.raises(DecodeError, match="temperature=1e-40: below float32's smallest normal"):
    DecodeConfig(temperature=1e-40)  # (a device flushes it to 0)


def test_the_mask_token_is_never_an_output(params):
  # A model whose every position favours the mask token (here: its head column raised): the
  # decoders would write it as a token (and the text would drop it without a word). Each takes
  # the best other token instead, as the transcription does.
  head = params["lm_head"]
  boost = jnp.zeros(head.shape[-1]).at[MASK].set(1e4)
  biased = {**params, "lm_head": head + boost * jnp.sign(jnp.sum(head, axis=0, keepdims=True))}
  prompts, lengths = _prompts([3, 8])
  for mode in ("diffusion", "ar"):
    cfg = DecodeConfig(mode=mode, max_new_tokens=12, block_size=BS, sub_block_size=SBS)
    out, lens, _ = _decode(biased, prompts, lengths, cfg)
    assert np.all(lens > 0) and not np.any(out == MASK), mode
  cfg = DecodeConfig(max_new_tokens=12, block_size=BS, sub_block_size=SBS)
  out, lens, _ = _decode(biased, prompts, lengths, cfg)
  ref, _, _ = reference_decode(biased, list(prompts[1, :8]), cfg)
  np.testing.assert_array_equal(out[1, :lens[1]], ref)


def test_ar_padding_past_a_prompt_is_never_read(params):
  # Whatever fills a row past its length (even an id outside the vocabulary, which embeds as
  # NaN and spread through the masked attention) leaves the row's tokens as they are.
  prompts, lengths = _prompts([3, 5])
  cfg = DecodeConfig(mode="ar", max_new_tokens=6)
  want = decoding.generate(params, CFG, prompts, lengths, jax.random.key(0), cfg)[0]
  for fill in (0, CFG.vocab_size, 10 * CFG.vocab_size):
    padded = np.array(prompts)
    padded[0, 3:] = fill
    got = decoding.generate(params, CFG, padded, lengths, jax.random.key(0), cfg)[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_decodes_the_same_tokens_with_jax_enable_x64_on(params, mode):
  # A pipeline with 64-bit types on had failed in the cache write (int32 and int64 indices).
  prompt, lengths = _prompts([3, 5])
  cfg = DecodeConfig(mode=mode, max_new_tokens=8, block_size=8, sub_block_size=4,
                     threshold=0.5)
  want = decoding.generate_jit(params, CFG, prompt, lengths, jax.random.key(0), cfg)
  with jax.enable_x64(True):
    got = decoding.generate_jit(params, CFG, prompt, lengths, jax.random.key(0), cfg)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_ids_past_int32_and_a_non_bool_dual_cache_flag_are_refused(params):
  # jnp.asarray had wrapped 2**32 + 5 to 5 before the checks; "no" had turned the DualCache on.
  prompt, lengths = _prompts([3, 5])
  cfg = DecodeConfig(max_new_tokens=4, block_size=8, sub_block_size=4)
  wide = prompt.astype(np.int64)
  wide[0, 1] = 2 ** 32 + 5
  with pytest.raises(decoding.DecodeError, match=r"prompt_tokens holds 4294967301, which int32 "
                                                 r"cannot hold"):
    decoding.generate_jit(params, CFG, wide, lengths, jax.random.key(0), cfg)
  with pytest.raises(decoding.DecodeError, match=r"prompt_lengths holds 4294967299"):
    decoding.generate(params, CFG, prompt, np.array([2 ** 32 + 3, 5], np.int64),
                      jax.random.key(0), cfg)
  for value in ("no", 0.0, None):
    with pytest.raises(decoding.DecodeError, match="use_dual_cache=.*expected True or False"):
      DecodeConfig(use_dual_cache=value)
  assert DecodeConfig(use_dual_cache=np.bool_(False)).use_dual_cache is False


def test_params_that_do_not_fit_the_config_are_named_before_tracing(params):
  # They failed inside the first forward: flax's shape error, a scan length error, a missing
  # parameter, or an AttributeError for a dict config.
  prompt, lengths = _prompts([3, 5])
  cfg = DecodeConfig(max_new_tokens=4, block_size=8, sub_block_size=4)
  cases = ((dataclasses.replace(CFG, vocab_size=200), params,
            r"params\['embed'\]\['embedding'\] is \(128, 32\), the config's model needs "
            r"\(200, 32\)"),
           (dataclasses.replace(CFG, num_layers=3), params, r"params\['layers'\].* is \(2, "),
           (CFG, {k: v for k, v in params.items() if k != "lm_head"},
            r"params\['lm_head'\] is missing"))
  for model_cfg, p, message in cases:
    for fn in (decoding.generate, decoding.generate_jit):
      with pytest.raises(decoding.DecodeError, match="params do not fit model_cfg: " + message):
        fn(p, model_cfg, prompt, lengths, jax.random.key(0), cfg)
  with pytest.raises(decoding.DecodeError, match="model_cfg must be a ModelConfig, got dict"):
    decoding.generate(params, dataclasses.asdict(CFG), prompt, lengths, jax.random.key(0), cfg)
  # Both layouts fit, and under an outer jit the check reads shapes only.
  per_layer = model.with_layout(params, "per_layer")
  want = decoding.generate_jit(params, CFG, prompt, lengths, jax.random.key(0), cfg)[0]
  got = jax.jit(lambda p: decoding.generate(p, CFG, prompt, lengths, jax.random.key(0), cfg)[0])(
      per_layer)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
