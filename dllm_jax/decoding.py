"""Fast-dLLM v2 parallel block decoding, and plain KV-cached AR decoding, as one jitted program.

`generate(params, model_cfg, prompt_tokens_BP, prompt_lengths_B, rng, config)` runs the whole
decode on device: the block, sub-block and step loops of the authors' decoder are folded into one
`lax.while_loop` in which every unfinished row takes exactly one action per iteration (a
denoising step, or the commit of its finished block), so rows of different prompt lengths sit at
different blocks and still get the tokens they would get alone (up to floating-point rounding:
the products' shapes depend on the batch and on the round; see `generate`).

How the single KV buffer maps onto the authors' two caches
-----------------------------------------------------------
The authors keep a block-level cache (`past_key_values`: KV of committed blocks) and, with
DualCache, a sub-block cache (`block_past_key_values`: KV of the whole current block from its
last full forward, overwritten in place at a sub-block's positions by every sub-block forward).
Here both live in one `KVCache` buffer whose slot i holds position i of the row:

* slots before the current block are the block-level cache (written by the prefill and by each
  commit, never touched while a block is being denoised);
* the current block's slots are the sub-block cache: a full-block forward writes all of them
  ("keep the block KV"), a sub-block forward writes only its sub-block's slots in place and
  attends, under the `block_causal` mask by position, to every earlier block plus the whole
  current block -- exactly the keys the authors concatenate (`past ; block_past`);
* slots after the current block hold stale or zero KV that the block-causal mask never lets a
  query see; each is overwritten by a full-block forward before any query of its block reads it
  (a block's first step is always a full forward).

Committing a block is a full-block forward of its final tokens: its KV lands in the same slots,
which now count as block-level cache. Without DualCache every step is a full-block forward,
which is the authors' `use_block_cache=False` path.

A round runs one forward for all rows: the full-block one where any row commits or needs it, in
which a row at a sub-block step writes only its sub-block's slots (a per-token cache write mask),
so that its sub-block's queries read the same keys a sub-block forward would; else the
sub-block one.

The authors' semantics kept (their `batch_sample`, per row):
* the prompt's whole blocks are prefilled; if the prompt ends on a block boundary the first new
  token is the argmax of the prefill's last position (also when the prompt is exactly one block
  long: the reference skips that prefill, a defect not copied);
* the current block is the prompt's tail plus mask tokens; sub-blocks are decoded left to right;
  each step shifts the logits by one (position j reads the output of j - 1, the block's first
  position its own), samples, and unmasks in the current sub-block every masked token whose
  confidence (probability of the sampled token) exceeds the threshold, and at least the most
  confident one;
* DualCache: a step forwards the whole block when the block has not been forwarded whole yet or
  the sub-block's first token is still masked, else only the sub-block; the decision is per row
  (the reference takes it for the whole batch with `.any()`);
* a full block is committed by one forward; the argmax at its last position is the next block's
  first token (greedy, as in the reference, also when sampling);
* a row stops once a stop token is decoded with no mask before it, or once its first
  `max_new_tokens` tokens are all decoded. The reference decodes the rest of that block too;
  those rounds change no token before it, so the first N tokens still do not depend on N, and a
  limit early in a block does not cost the block's remaining rounds;
* sampling (temperature, top-p) draws every row from its own distribution with its own key (the
  reference's top-p path draws every row from row 0's distribution).

A token equal to the mask id in the prompt is not decoded: which positions are masked is tracked
in a boolean array, not by comparing tokens with the mask id. Nor is the mask token ever an
output: its logit is -inf wherever a token is chosen (the reference would write it, and then
re-decode the position, the same way again when greedy); a trained model gives it almost no mass.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dllm_jax import masks, model, sharding
from dllm_jax.cache import KVCache, init_cache
from dllm_jax.config import ModelConfig

Params = Any
MODES = ("diffusion", "ar")


class DecodeError(ValueError):
  """Bad decoding input; the message says what was wrong and what to do."""


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  mode: str = "diffusion"  # "diffusion" (Fast-dLLM v2 parallel decoding) | "ar" (the baseline)
  max_new_tokens: int = 256
  block_size: int = 32
  sub_block_size: int = 8
  threshold: float = 0.9  # unmask tokens whose confidence exceeds this; 1.0: one per step
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0
  use_dual_cache: bool = True
  stop_token_ids: tuple[int, ...] = ()
  mask_token_id: Optional[int] = None  # None: the model config's mask_token_id
  pad_token_id: int = 0  # fills tokens_BN past each row's length

  def __post_init__(self):
    if self.mode not in MODES:
      raise DecodeError(f"DecodeConfig.mode={self.mode!r}: expected one of {MODES}")
    for name in ("max_new_tokens", "block_size", "sub_block_size", "pad_token_id"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise DecodeError(f"DecodeConfig.{name}={value!r}: expected an integer")
      object.__setattr__(self, name, int(value))  # (static under jit: a Python int hashes)
    for name in ("threshold", "temperature", "top_p"):
      value = getattr(self, name)
      if (not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool)
          or not math.isfinite(value)):
        raise DecodeError(f"DecodeConfig.{name}={value!r}: expected a finite number")
      object.__setattr__(self, name, float(value))
    stops = self.stop_token_ids
    stops = (stops,) if isinstance(stops, (int, np.integer)) else stops
    try:  # (integers of any kind, a jax scalar too; not a bool, a float or a string)
      if isinstance(stops, (str, bytes)):
        raise TypeError
      stops = tuple(stops)  # (once: a generator is read here and only here)
      if any(isinstance(t, (bool, np.bool_)) for t in stops):
        raise TypeError
      stops = tuple(operator.index(t) for t in stops)
    except TypeError:
      raise DecodeError(f"DecodeConfig.stop_token_ids={self.stop_token_ids!r}: expected token "
                        "ids (a tuple of ints)") from None
    # Python ints: the config is a static argument of the jitted decoder, and must hash.
    object.__setattr__(self, "stop_token_ids", stops)
    if not isinstance(self.use_dual_cache, (bool, np.bool_)):  # ("no" would be truthy)
      raise DecodeError(f"DecodeConfig.use_dual_cache={self.use_dual_cache!r}: expected True or "
                        "False")
    object.__setattr__(self, "use_dual_cache", bool(self.use_dual_cache))
    if self.mask_token_id is not None:
      if (not isinstance(self.mask_token_id, (int, np.integer))
          or isinstance(self.mask_token_id, bool)):
        raise DecodeError(f"DecodeConfig.mask_token_id={self.mask_token_id!r}: expected an "
                          "integer or None")
      object.__setattr__(self, "mask_token_id", int(self.mask_token_id))
    if self.max_new_tokens < 1:
      raise DecodeError(f"DecodeConfig.max_new_tokens={self.max_new_tokens}: must be >= 1")
    if self.block_size < 1 or self.sub_block_size < 1:
      raise DecodeError(f"DecodeConfig.block_size={self.block_size}, sub_block_size="
                        f"{self.sub_block_size}: both must be >= 1")
    if self.block_size % self.sub_block_size:
      divisors = [d for d in range(1, self.block_size + 1) if self.block_size % d == 0]
      raise DecodeError(
          f"DecodeConfig.sub_block_size={self.sub_block_size} does not divide block_size="
          f"{self.block_size}; pick a divisor of it: {divisors}")
    if not 0.0 < self.threshold <= 1.0:
      raise DecodeError(f"DecodeConfig.threshold={self.threshold}: must be in (0, 1] "
                        "(1.0 unmasks one token per step)")
    if self.temperature < 0:
      raise DecodeError(f"DecodeConfig.temperature={self.temperature}: must be >= 0 (0 = greedy)")
    if 0 < self.temperature < np.finfo(np.float32).tiny:  # (flushed to 0 on the device: NaN)
      raise DecodeError(f"DecodeConfig.temperature={self.temperature}: below float32's smallest "
                        "normal number; use 0 for greedy decoding")
    if not 0.0 < self.top_p <= 1.0:
      raise DecodeError(f"DecodeConfig.top_p={self.top_p}: must be in (0, 1]")
    # (An id outside the vocabulary is allowed: -1 can mark padding as no token.)
    if not -2 ** 31 <= self.pad_token_id < 2 ** 31:
      raise DecodeError(f"DecodeConfig.pad_token_id={self.pad_token_id}: must fit in int32 "
                        "(the output's dtype)")


@struct.dataclass
class DecodeState:
  """Everything the decode loop carries; B = batch, L = cache length (a multiple of blocks)."""

  tokens: jax.Array  # int32 [B, L]: prompt, decoded tokens, mask tokens where still masked
  masked: jax.Array  # bool [B, L]: positions still to be decoded
  cache: KVCache  # slot i = position i; see the module docstring for what each region holds
  block_start: jax.Array  # int32 [B]: first position of the row's current block
  has_block_kv: jax.Array  # bool [B]: the current block was forwarded whole (DualCache)
  done: jax.Array  # bool [B]
  length: jax.Array  # int32 [B]: valid generated tokens (set when done)
  nfe: jax.Array  # int32 [B]: forward passes that included this row
  keys: jax.Array  # typed PRNG keys [B]: one stream per row
  iterations: jax.Array  # int32 []: batched forward rounds (the loop's trip count)


def stop_token_ids(tokenizer, model_cfg: ModelConfig) -> tuple[int, ...]:
  """The ids that end an answer: the tokenizer's end-of-turn and eos, the model's eos and its
  other stop ids (the rest of a Hugging Face eos list)."""
  return tuple(sorted({i for i in (tokenizer.eot_token_id, tokenizer.eos_token_id,
                                   model_cfg.eos_token_id, *model_cfg.stop_token_ids)
                       if i is not None}))


# --------------------------------------------------------------------------------------------
# Validation


def _check(model_cfg: ModelConfig, config: DecodeConfig, prompt_tokens_BP, prompt_lengths_B):
  if not isinstance(config, DecodeConfig):
    raise DecodeError(f"config must be a DecodeConfig, got {type(config).__name__}")
  if prompt_tokens_BP.ndim != 2:
    raise DecodeError(f"prompt_tokens must be [batch, prompt_len], got shape "
                      f"{prompt_tokens_BP.shape}")
  batch, width = prompt_tokens_BP.shape
  if width < 1 or batch < 1:
    raise DecodeError(f"prompt_tokens has shape {prompt_tokens_BP.shape}: an empty prompt "
                      "cannot be decoded; give at least one token (e.g. BOS) per row")
  if prompt_lengths_B.shape != (batch,):
    raise DecodeError(f"prompt_lengths must be [batch]={batch}, got shape "
                      f"{prompt_lengths_B.shape}")
  for name, x in (("prompt_tokens", prompt_tokens_BP), ("prompt_lengths", prompt_lengths_B)):
    if not jnp.issubdtype(x.dtype, jnp.integer):  # (a float would be truncated, a bool read as 1)
      raise DecodeError(f"{name} must hold integers (token ids, lengths), got {x.dtype}")
  if width > model_cfg.max_position_embeddings:
    raise DecodeError(
        f"prompt of {width} tokens is longer than the model's context "
        f"(max_position_embeddings={model_cfg.max_position_embeddings}); shorten the prompt or "
        "its padding")
  check_reach(model_cfg, config, width)
  for t in config.stop_token_ids:
    if not 0 <= t < model_cfg.vocab_size:
      raise DecodeError(f"stop token {t} is outside the vocabulary (size {model_cfg.vocab_size})")
  mask_id = _mask_id(model_cfg, config)
  if mask_id is None and config.mode == "diffusion":
    raise DecodeError(
        "diffusion decoding needs a mask token, and neither DecodeConfig.mask_token_id nor the "
        "model config's mask_token_id is set: this model was not diffusion-trained; use "
        "mode='ar' or fine-tune it first")
  if mask_id is not None and not 0 <= mask_id < model_cfg.vocab_size:
    # (AR mode too: it never emits the mask token, and a negative id would ban another)
    raise DecodeError(f"mask token {mask_id} is outside the vocabulary "
                      f"(size {model_cfg.vocab_size})")
  if (config.mask_token_id is not None and model_cfg.mask_token_id is not None
      and config.mask_token_id != model_cfg.mask_token_id):
    raise DecodeError(f"DecodeConfig.mask_token_id={config.mask_token_id} differs from the "
                      f"model's mask token {model_cfg.mask_token_id}, the one it was trained "
                      "to fill: leave DecodeConfig.mask_token_id None")
  if mask_id is not None and mask_id in config.stop_token_ids:
    raise DecodeError(f"stop token {mask_id} is the mask token, which the decoder never "
                      "outputs: a stop on it could never fire; remove it from stop_token_ids")
  # Values traced under an outer jit are not checked: rows with a bad length decode nothing.
  lengths = sharding.readable_values(prompt_lengths_B)
  lengths = [] if lengths is None else lengths.tolist()
  for row, n in enumerate(lengths):
    if n < 1:
      raise DecodeError(f"prompt {row} is empty (length {n}); give at least one token (e.g. BOS)")
    if n > width:
      raise DecodeError(f"prompt {row} has length {n} but prompt_tokens is only {width} wide")
  tokens = sharding.readable_values(prompt_tokens_BP)  # (traced: an id outside the vocabulary embeds as NaN)
  if tokens is not None and lengths:
    inside = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    bad = inside & ((tokens < 0) | (tokens >= model_cfg.vocab_size))
    if bad.any():
      row, col = (int(i) for i in np.argwhere(bad)[0])
      raise DecodeError(f"prompt {row} holds token id {int(tokens[row, col])} at position {col}, "
                        f"outside the vocabulary (size {model_cfg.vocab_size}); check the "
                        "tokenizer matches the model")


def reach(config: DecodeConfig, width: int) -> int:
  """How many positions a decode of prompts `width` wide holds (its cache's length): diffusion
  rounds up to whole blocks."""
  total = width + config.max_new_tokens
  return _round_up(total, config.block_size) if config.mode == "diffusion" else total


def check_reach(model_cfg: ModelConfig, config: DecodeConfig, width: int) -> None:
  """DecodeError when prompts `width` wide and `config.max_new_tokens` reach past the model's
  context: positions it was never trained at."""
  total, context = reach(config, width), model_cfg.max_position_embeddings
  if total <= context:
    return
  diffusion = config.mode == "diffusion"
  # New tokens that fit: a diffusion cache holds whole blocks, so the context's last partial
  # block is out of reach too.
  room = (context // config.block_size * config.block_size if diffusion else context) - width
  smaller_blocks = diffusion and room < context - width
  if room >= 1:
    fix = (f"lower max_new_tokens to {room} or less"
           + (", use a smaller block_size" if smaller_blocks else "") + " or shorten the prompt")
  else:
    fix = ("use a smaller block_size or " if smaller_blocks else "") + "shorten the prompt"
  blocks = f" (whole blocks of block_size={config.block_size})" if diffusion else ""
  raise DecodeError(
      f"a prompt {width} wide and max_new_tokens={config.max_new_tokens} reach position "
      f"{total}{blocks}, past the model's context (max_position_embeddings={context}); {fix}")


def _mask_id(model_cfg: ModelConfig, config: DecodeConfig) -> Optional[int]:
  return config.mask_token_id if config.mask_token_id is not None else model_cfg.mask_token_id


def _row_keys(rng: jax.Array, batch: int) -> jax.Array:
  """Typed keys [batch]: `rng` is one key (row b gets fold_in(rng, b)) or already one per row."""
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    why = f"rng must be a PRNG key (jax.random.key(seed)) or one per row, got {rng.dtype} of " \
          f"shape {rng.shape}"
    if rng.dtype != jnp.uint32 or rng.ndim not in (1, 2):
      raise DecodeError(why)
    try:
      rng = jax.random.wrap_key_data(rng)
    except TypeError:  # (raw key data of another width than the default generator's)
      raise DecodeError(why) from None
  if rng.shape == ():
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch))
  if rng.shape == (batch,):
    return rng
  raise DecodeError(f"rng must be one PRNG key or one per row ({batch}), got shape {rng.shape}")


# --------------------------------------------------------------------------------------------
# Sampling


def sample(logits_BTV: jax.Array, keys_B: jax.Array, temperature: float, top_p: float):
  """Per-row sampling. Returns (tokens int32 [B, T], confidence float32 [B, T]).

  Confidence is the probability of the chosen token under the distribution it was drawn from:
  softmax(logits) when greedy, else the temperature-scaled, top-p-truncated, renormalised one.
  """
  logits = logits_BTV.astype(jnp.float32)
  if temperature == 0.0:
    probs = jax.nn.softmax(logits, axis=-1)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tokens, jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]
  # The largest logit subtracted before the division: a tiny temperature then sends the others
  # to -inf, where logits / temperature overflowed to inf and the softmax gave NaN under jit.
  probs = jax.nn.softmax((logits - logits.max(axis=-1, keepdims=True)) / temperature, axis=-1)
  if top_p < 1.0:
    order = jnp.argsort(-probs, axis=-1)
    cumulative = jnp.cumsum(jnp.take_along_axis(probs, order, axis=-1), axis=-1)
    # Keep a token while the mass before it is within top_p; the most likely always stays.
    keep_sorted = jnp.concatenate(
        [jnp.ones_like(cumulative[..., :1], bool), cumulative[..., :-1] <= top_p], axis=-1)
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    probs = jnp.where(keep, probs, 0.0)
    probs = probs / jnp.sum(probs, axis=-1, keepdims=True)

  def one_row(key, p_TV):
    return jax.random.categorical(key, jnp.log(p_TV), axis=-1)

  tokens = jax.vmap(one_row)(keys_B, probs).astype(jnp.int32)
  return tokens, jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]


def _never(logits: jax.Array, token_id: Optional[int]) -> jax.Array:
  """`logits` [..., V] with `token_id` (the mask token) made impossible. A decoder that wrote
  it would output it (the authors' loop would re-decode such a position, the same token again
  when greedy); a trained model gives it almost no mass, so the other confidences stay."""
  if token_id is None:
    return logits
  return logits.at[..., token_id].set(-jnp.inf)


def _split(keys_B):
  pairs = jax.vmap(jax.random.split)(keys_B)  # [B, 2]
  return pairs[:, 0], pairs[:, 1]


# --------------------------------------------------------------------------------------------
# Helpers over rows at different offsets


def _rows_slice(x_BL, start_B, size):
  return jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, size))(x_BL, start_B)


def _rows_update(x_BL, new_BT, start_B):
  return jax.vmap(lambda row, new, s: jax.lax.dynamic_update_slice_in_dim(row, new, s, 0))(
      x_BL, new_BT, start_B)


def _meta(start_B, size):
  return masks.TokenMeta.simple(start_B[:, None] + jnp.arange(size, dtype=jnp.int32)[None, :])


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _is_stop(tokens, stop_token_ids):
  if not stop_token_ids:
    return jnp.zeros(tokens.shape, bool)
  return jnp.isin(tokens, jnp.asarray(stop_token_ids, jnp.int32))


# --------------------------------------------------------------------------------------------
# Diffusion decoding


def _status(st_tokens, st_masked, plen, config):
  """(done, length) per row from the decoded tokens; see the stopping rules in the docstring."""
  n = config.max_new_tokens
  pos = jnp.arange(st_tokens.shape[1], dtype=jnp.int32)[None, :]
  generated = (pos >= plen[:, None]) & (pos < (plen + n)[:, None])
  stop_at = jnp.where(generated & ~st_masked & _is_stop(st_tokens, config.stop_token_ids),
                      pos, st_tokens.shape[1])
  first_stop = jnp.min(stop_at, axis=1)
  masked_before = jnp.any(st_masked & (pos >= plen[:, None]) & (pos < first_stop[:, None]), axis=1)
  stopped = (first_stop < st_tokens.shape[1]) & ~masked_before
  at_limit = ~jnp.any(st_masked & generated, axis=1)
  length = jnp.where(stopped, first_stop - plen + 1, n)
  return stopped | at_limit, length.astype(jnp.int32)


def _diffusion(params, cfg: ModelConfig, prompt_BP, plen_B, keys_B, config: DecodeConfig,
               on_step: Optional[Callable], threshold):
  bs, sbs, n = config.block_size, config.sub_block_size, config.max_new_tokens
  mask_id = _mask_id(cfg, config)
  batch, width = prompt_BP.shape
  total = _round_up(width + n, bs)  # every row's last block ends at or before this
  rows = jnp.arange(batch)
  pos = jnp.arange(total, dtype=jnp.int32)[None, :]

  valid = (plen_B >= 1) & (plen_B <= width)
  plen = jnp.clip(plen_B, 1, width).astype(jnp.int32)
  padded = jnp.pad(prompt_BP.astype(jnp.int32), ((0, 0), (0, total - width)))
  masked = pos >= plen[:, None]
  tokens = jnp.where(masked, mask_id, padded)

  # Prefill the prompt's whole blocks. Its partial last block (and the padding) are forwarded
  # too, but the block-causal mask keeps them from whole blocks, and their slots are rewritten by
  # the first full-block step before anything reads them.
  prefill_len = _round_up(width, bs)
  cache = init_cache(cfg, batch, total, per_layer=not model.is_stacked(params))
  logits, cache = model.forward(
      params, cfg, tokens[:, :prefill_len], _meta(jnp.zeros_like(plen), prefill_len),
      masks.MaskSpec("block_causal", bs), cache, head_index=(plen - 1)[:, None])
  ar_first = plen % bs == 0
  first = jnp.argmax(_never(logits[:, 0], mask_id), axis=-1).astype(jnp.int32)
  tokens = tokens.at[rows, plen].set(jnp.where(ar_first, first, tokens[rows, plen]))
  masked = masked.at[rows, plen].set(masked[rows, plen] & ~ar_first)
  block_start = (plen // bs) * bs

  done, length = _status(tokens, masked, plen, config)
  state = DecodeState(
      tokens=tokens, masked=masked, cache=cache, block_start=block_start,
      has_block_kv=jnp.zeros(batch, bool), done=done | ~valid,
      length=jnp.where(valid, length, 0), nfe=(plen >= bs).astype(jnp.int32), keys=keys_B,
      iterations=jnp.zeros((), jnp.int32))
  spec = masks.MaskSpec("block_causal", bs)
  sub_offsets = jnp.arange(sbs, dtype=jnp.int32)

  def body(st: DecodeState) -> DecodeState:
    active = ~st.done
    blk = _rows_slice(st.tokens, st.block_start, bs)  # [B, bs]
    blk_masked = _rows_slice(st.masked, st.block_start, bs)
    any_masked = blk_masked.any(axis=1)
    commit = active & ~any_masked
    step = active & any_masked
    # The current sub-block is the first one holding a mask: earlier ones are fully decoded.
    sub_start = (jnp.argmax(blk_masked.reshape(batch, bs // sbs, sbs).any(-1), axis=1)
                 * sbs).astype(jnp.int32)
    first_masked = jnp.take_along_axis(blk_masked, sub_start[:, None], axis=1)[:, 0]
    if config.use_dual_cache:
      full = step & (~st.has_block_kv | first_masked)
    else:
      full = step
    partial = step & ~full
    whole = commit | full

    # One forward a round. Where any row commits or needs its block forwarded whole, the round
    # forwards every row's block; a row at a sub-block step then writes only its sub-block's
    # slots, so its sub-block's queries meet the cached block KV that the sub-block forward of
    # the DualCache would meet (its other positions are computed and never read). Else the
    # round forwards the sub-blocks alone. (Running both forwards in a mixed round cost a batch
    # of 32 1.10-1.20x the rounds without the DualCache, BENCHMARKS.md session 43.)
    # Logits: the sub-block's shifted positions and the block's last.
    shifted = jnp.maximum(sub_start[:, None] + sub_offsets[None, :] - 1, 0)
    head_block = jnp.concatenate([shifted, jnp.full((batch, 1), bs - 1, jnp.int32)], axis=1)
    in_sub = ((jnp.arange(bs)[None, :] >= sub_start[:, None])
              & (jnp.arange(bs)[None, :] < (sub_start + sbs)[:, None]))
    write_tokens = whole[:, None] | (partial[:, None] & in_sub)  # [B, bs]
    any_whole = whole.any()
    keys, sample_keys = _split(st.keys)

    def read(out):
      """A forward's (logits [B, sbs + 1, V], cache) as what the round reads of it: the
      sub-block's candidates and confidences [B, sbs] and the next block's first token [B],
      sampled inside the forward's branch so that a skipped branch fills only these."""
      logits, cache = out
      candidates, confidence = sample(_never(logits[:, :sbs], mask_id), sample_keys,
                                      config.temperature, config.top_p)
      nxt = jnp.argmax(_never(logits[:, sbs], mask_id), axis=-1).astype(jnp.int32)
      return (candidates, confidence, nxt), cache

    def block_fwd(cache):
      return read(model.forward(params, cfg, blk, _meta(st.block_start, bs), spec, cache,
                                head_index=head_block, cache_write_mask=write_tokens))

    def no_block(cache):
      return (jnp.zeros((batch, sbs), jnp.int32), jnp.zeros((batch, sbs), jnp.float32),
              jnp.zeros((batch,), jnp.int32)), cache

    # Each forward in a cond of its own whose other branch passes the cache through: one cond
    # choosing between the two forwards, each writing the cache, made XLA's GPU program copy
    # buffers every round (60 copies a round at the 135M, one a layer inside the forward and
    # about thirty after it, ~0.08 ms: a DualCache round 0.976 ms against 0.928 without it at
    # batch 1; BENCHMARKS.md session 45). The two predicates exclude each other, so a round
    # still runs one forward.
    read_out, cache = jax.lax.cond(any_whole, block_fwd, no_block, st.cache)
    if config.use_dual_cache:
      sub_tokens = _rows_slice(blk, sub_start, sbs)
      # A sub-block forward runs only where the sub-block's first token is decoded, so the
      # first position's own output (index 0) stands in for the shifted one; it is never read.
      # No row commits in such a round: the ninth row, in the place of the block's last
      # position, is never read either (it keeps the branches' shapes equal without a copy).
      head_sub = jnp.broadcast_to(
          jnp.concatenate([jnp.maximum(sub_offsets - 1, 0), jnp.array([sbs - 1], jnp.int32)]),
          (batch, sbs + 1))

      def sub_fwd(carry):
        return read(model.forward(params, cfg, sub_tokens,
                                  _meta(st.block_start + sub_start, sbs), spec, carry[1],
                                  head_index=head_sub, cache_write_mask=partial))

      # (~any_whole: every active row is at a sub-block step)
      read_out, cache = jax.lax.cond(~any_whole, sub_fwd, lambda c: c, (read_out, cache))
    candidates, confidence, nxt = read_out
    sub_masked = _rows_slice(blk_masked, sub_start, sbs) & step[:, None]
    confidence = jnp.where(sub_masked, confidence, -jnp.inf)
    unmask = (confidence > threshold) | jax.nn.one_hot(
        jnp.argmax(confidence, axis=1), sbs, dtype=bool)
    unmask &= sub_masked
    sub_new = jnp.where(unmask, candidates, _rows_slice(blk, sub_start, sbs))
    blk = _rows_update(blk, sub_new, sub_start)
    blk_masked = _rows_update(blk_masked, _rows_slice(blk_masked, sub_start, sbs) & ~unmask,
                              sub_start)
    tokens = _rows_update(st.tokens, blk, st.block_start)
    masked = _rows_update(st.masked, blk_masked, st.block_start)

    # Commit: the block's KV is now written; its last output is the next block's first token.
    # A committing row is not done, so its next block lies inside the buffer.
    nxt_pos = jnp.minimum(st.block_start + bs, total - 1)
    tokens = tokens.at[rows, nxt_pos].set(jnp.where(commit, nxt, tokens[rows, nxt_pos]))
    masked = masked.at[rows, nxt_pos].set(masked[rows, nxt_pos] & ~commit)
    block_start = jnp.where(commit, st.block_start + bs, st.block_start)
    has_block_kv = jnp.where(commit, False, st.has_block_kv | full)

    done, length = _status(tokens, masked, plen, config)
    new = DecodeState(
        tokens=tokens, masked=masked, cache=cache, block_start=block_start,
        has_block_kv=has_block_kv, done=st.done | done,
        length=jnp.where(st.done, st.length, length), nfe=st.nfe + active.astype(jnp.int32),
        keys=keys, iterations=st.iterations + 1)
    if on_step is not None:
      jax.debug.callback(on_step, new.tokens, new.masked, new.done, ordered=True)
    return new

  if on_step is not None:
    jax.debug.callback(on_step, state.tokens, state.masked, state.done, ordered=True)
  state = jax.lax.while_loop(lambda st: ~jnp.all(st.done), body, state)
  out = _rows_slice(state.tokens, plen, n)
  return out, state.length, state.nfe, state.iterations + 1  # + the prefill


# --------------------------------------------------------------------------------------------
# AR decoding: the baseline, over the same cache pytree


def _ar(params, cfg: ModelConfig, prompt_BP, plen_B, keys_B, config: DecodeConfig):
  n = config.max_new_tokens
  batch, width = prompt_BP.shape
  rows = jnp.arange(batch)
  valid = (plen_B >= 1) & (plen_B <= width)
  plen = jnp.clip(plen_B, 1, width).astype(jnp.int32)
  causal = masks.MaskSpec("causal")
  cache = init_cache(cfg, batch, width + n, per_layer=not model.is_stacked(params))
  # Padding after a row's prompt is forwarded too; causality hides it and each later token
  # overwrites its slot before reading it. It is forwarded as token 0: whatever the caller put
  # there (an id outside the vocabulary embeds as NaN, which 0-weighted attention still spreads).
  prompt_BP = jnp.where(jnp.arange(width)[None, :] < plen[:, None], prompt_BP, 0)
  logits, cache = model.forward(params, cfg, prompt_BP.astype(jnp.int32),
                                _meta(jnp.zeros_like(plen), width), causal, cache,
                                head_index=(plen - 1)[:, None])
  keys, sample_keys = _split(keys_B)
  never = _mask_id(cfg, config)  # (a diffusion model's mask token is no answer in AR mode either)
  first, _ = sample(_never(logits, never), sample_keys, config.temperature, config.top_p)
  out = jnp.zeros((batch, n), jnp.int32).at[:, 0].set(first[:, 0])
  count = jnp.ones(batch, jnp.int32)
  done = ~valid | _is_stop(first[:, 0], config.stop_token_ids) | (n == 1)

  def body(carry):
    out, count, done, cache, keys, it = carry
    active = ~done
    last = out[rows, count - 1]
    logits, cache = model.forward(params, cfg, last[:, None], _meta(plen + count - 1, 1), causal,
                                  cache, cache_write_mask=active)
    keys, sample_keys = _split(keys)
    tok, _ = sample(_never(logits, never), sample_keys, config.temperature, config.top_p)
    tok = tok[:, 0]
    idx = jnp.minimum(count, n - 1)
    out = out.at[rows, idx].set(jnp.where(active, tok, out[rows, idx]))
    count = count + active.astype(jnp.int32)
    done = done | (active & _is_stop(tok, config.stop_token_ids)) | (count >= n)
    return out, count, done, cache, keys, it + 1

  out, count, done, _, _, it = jax.lax.while_loop(
      lambda c: ~jnp.all(c[2]), body, (out, count, done, cache, keys, jnp.zeros((), jnp.int32)))
  length = jnp.where(valid, count, 0)
  return out, length, jnp.where(valid, count, 0), it + 1


# --------------------------------------------------------------------------------------------
# Public entry points


def generate(
    params: Params,
    model_cfg: ModelConfig,
    prompt_tokens_BP: jax.Array,
    prompt_lengths_B: jax.Array,
    rng: jax.Array,
    config: DecodeConfig,
    on_step: Optional[Callable] = None,
    threshold=None,
) -> tuple[jax.Array, jax.Array, dict]:
  """Decodes `config.max_new_tokens` tokens after each row's prompt.

  params: stacked, as trained and saved, or per-layer (`model.with_layout(params, "per_layer")`:
  one buffer per layer and no layer loop in the step; about 2x faster steps on a GPU, see
  BENCHMARKS.md). Convert once, outside the function you jit.

  prompt_tokens_BP: int [B, P], row b's prompt in its first prompt_lengths_B[b] entries (the rest
  is ignored). rng: one PRNG key, or one per row (a row then gets what it gets alone with its
  key). Returns tokens int32 [B, max_new_tokens] (entries past a row's length are
  `config.pad_token_id`), lengths int32 [B] (up to and including the stop token) and stats:
  `nfe` [B] forward passes that included the row (prefill and commits included), `tokens_per_nfe`
  [B], their totals `total_nfe`, `total_tokens_per_nfe`, and `iterations`, the number of batched
  forward rounds, prefill included (one forward each). Traceable: jit it with model_cfg, config
  and on_step static (`generate_jit`).

  Each row gets the tokens it would get alone, up to floating-point rounding, which can only
  matter at a near-tie between two tokens: the products' shapes, and with them the order of
  their sums, depend on the batch size (XLA's GEMMs, the decode kernel's split over the cache),
  and a row at a DualCache sub-block step is computed inside the round's block forward when
  another row needs one (the same keys and values as its own sub-block forward, 32 query rows
  instead of 8).
  `on_step(tokens_BL, masked_BL, done_B)` (diffusion only) is called from the device with the
  state after the prefill and after every step; it is for visualisation, leave it None otherwise.
  `threshold` (diffusion only): a scalar, possibly traced, used in place of `config.threshold`,
  so that one compiled decoder serves a sweep of thresholds (a traced value is not checked: keep
  it in (0, 1]).
  """
  prompt_tokens_BP = _device_ints(prompt_tokens_BP, "prompt_tokens")
  prompt_lengths_B = _device_ints(prompt_lengths_B, "prompt_lengths")
  _check_call(model_cfg, config, prompt_tokens_BP, prompt_lengths_B, on_step, threshold,
              params)
  keys = _row_keys(jnp.asarray(rng), prompt_tokens_BP.shape[0])
  if config.mode == "ar":
    out, lengths, nfe, iterations = _ar(params, model_cfg, prompt_tokens_BP, prompt_lengths_B,
                                        keys, config)
  else:
    if threshold is None:
      threshold = config.threshold
    out, lengths, nfe, iterations = _diffusion(params, model_cfg, prompt_tokens_BP,
                                               prompt_lengths_B, keys, config, on_step,
                                               jnp.asarray(threshold, jnp.float32))
  cols = jnp.arange(config.max_new_tokens)[None, :]
  out = jnp.where(cols < lengths[:, None], out, config.pad_token_id)
  safe_nfe = jnp.maximum(nfe, 1)
  stats = {
      "nfe": nfe,
      "tokens_per_nfe": lengths / safe_nfe,
      "total_nfe": jnp.sum(nfe),
      "total_tokens_per_nfe": jnp.sum(lengths) / jnp.maximum(jnp.sum(nfe), 1),
      "iterations": iterations,
  }
  return out, lengths, stats


def _device_ints(x, name: str) -> jax.Array:
  """`x` as a jax array; host integers that int32 cannot hold are refused first, since
  jnp.asarray wraps them (2**32 + 5 becomes 5) before any check could see them."""
  if not isinstance(x, jax.Array):
    host = np.asarray(x)
    if (host.dtype.kind in "iu" and host.size and not jax.config.jax_enable_x64
        and (host.min() < -2 ** 31 or host.max() >= 2 ** 31)):
      bad = host[(host < -2 ** 31) | (host >= 2 ** 31)].flat[0]
      raise DecodeError(f"{name} holds {bad}, which int32 cannot hold (token ids and lengths "
                        "are int32 on the device)")
  return jnp.asarray(x)


def _check_call(model_cfg, config, prompt_tokens_BP, prompt_lengths_B, on_step, threshold,
                params=None):
  """`generate`'s checks of its arguments; values an outer jit traces are not checked (see
  `generate`)."""
  if not isinstance(model_cfg, ModelConfig):
    raise DecodeError(f"model_cfg must be a ModelConfig, got {type(model_cfg).__name__}")
  if params is not None:
    mismatch = model.params_mismatch(params, model_cfg)
    if mismatch:
      raise DecodeError(f"params do not fit model_cfg: {mismatch}; pass the config the params "
                        "were made with (a checkpoint's, from checkpoint.load_model)")
  _check(model_cfg, config, prompt_tokens_BP, prompt_lengths_B)
  if config.mode == "ar" and (on_step is not None or threshold is not None):
    raise DecodeError("generate(on_step=..., threshold=...) are for diffusion decoding; mode='ar' "
                      "unmasks nothing: leave them None")
  if threshold is None:
    return
  if isinstance(threshold, bool) or getattr(threshold, "dtype", None) == bool:  # (np.bool_ too)
    raise DecodeError(f"generate(threshold={threshold!r}): expected a number in (0, 1], not a "
                      "bool")
  if jnp.ndim(threshold) != 0:
    # A [B] threshold would broadcast against [B, sub_block] confidences along the wrong axis.
    raise DecodeError(f"generate(threshold=...): must be a scalar, got shape "
                      f"{jnp.shape(threshold)}")
  try:
    value = float(threshold)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return  # traced: checked by whoever made it
  if not 0.0 < value <= 1.0:  # (NaN too)
    raise DecodeError(f"generate(threshold={value}): must be in (0, 1] (1.0 unmasks one token "
                      "per step)")


_generate_compiled = jax.jit(generate, static_argnames=("model_cfg", "config", "on_step"))


def generate_jit(params: Params, model_cfg: ModelConfig, prompt_tokens_BP, prompt_lengths_B,
                 rng, config: DecodeConfig, on_step: Optional[Callable] = None, threshold=None):
  """`generate`, compiled once per (model_cfg, config, on_step) and input shapes. Its arguments
  are checked here first, values included (prompt lengths, token ids, `threshold`), as
  `generate` checks them: inside the compiled function they are traced and could not be (a bad
  length or token id would decode garbage). Called under an outer jit, only shapes are checked;
  the threshold stays traced, so one compiled decoder serves a sweep of thresholds."""
  prompt_tokens_BP = _device_ints(prompt_tokens_BP, "prompt_tokens")
  prompt_lengths_B = _device_ints(prompt_lengths_B, "prompt_lengths")
  _check_call(model_cfg, config, prompt_tokens_BP, prompt_lengths_B, on_step, threshold,
              params)
  return _generate_compiled(params, model_cfg, prompt_tokens_BP, prompt_lengths_B, rng, config,
                            on_step=on_step, threshold=threshold)
