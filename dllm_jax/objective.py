"""Training objectives: Fast-dLLM v2 complementary-mask block diffusion, and the AR-SFT baseline.

Diffusion (per row of a packed batch, blocks of B tokens, samples start on block boundaries):

* Only loss-bearing (response) tokens are noised. Each block draws t ~ U(0, 1) and masks each of
  its response tokens with probability p = (1 - eps) t + eps. The complementary copy masks exactly
  the response tokens the first copy left visible, so every response token is predicted once.
* The model sees `[noisy ; clean]` (see `masks`): a noisy block attends itself bidirectionally and
  the clean blocks before it. Token shift: the output at position i predicts token i + 1, and
  counts only where token i + 1 is masked in that copy and belongs to the same sample.
* Loss = cross-entropy summed over counted positions of both copies / their count. `loss_fn`
  returns the sum and the count so a trainer can count-weight over micro-batches and devices.

Layouts: "2x2l" is the authors' (each copy with its own clean half: 2 rows of 2L tokens);
"3l" lays out `[noisy ; noisy_complement ; clean]` and shares the clean half, which the masks make
invisible across copies, so it gives the same loss and gradients on 25% fewer tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dllm_jax import masks, model
from dllm_jax import sharding as ax
from dllm_jax import config as config_lib
from dllm_jax.config import ConfigError, ModelConfig

Batch = Mapping[str, jax.Array]  # tokens int32, loss_mask bool, segments int32; each [batch, L]

KINDS = ("diffusion", "ar")
LAYOUTS = ("3l", "2x2l")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  kind: str = "diffusion"  # "diffusion" | "ar" (next-token SFT baseline)
  block_size: int = 32
  eps: float = 1e-3  # lowest masking rate of a block
  layout: str = "3l"  # "3l" (shared clean copy) | "2x2l" (the authors' layout, for comparison)
  # Tokens per chunk of the loss's LM head (0: all at once). With a chunk, the float32 logits
  # [B, chunk, V] of one chunk exist at a time and are recomputed in the backward pass, instead
  # of [B, 2L, V] for the whole batch (at a 152k vocabulary, the largest buffers of a step).
  loss_chunk: int = 0

  def __post_init__(self):
    config_lib.check_field_types(self, "objective")
    if self.kind not in KINDS:
      raise ConfigError(f"objective.kind={self.kind!r}: expected one of {KINDS}")
    if self.layout not in LAYOUTS:
      raise ConfigError(f"objective.layout={self.layout!r}: expected one of {LAYOUTS}")
    if self.block_size < 1:
      raise ConfigError(f"objective.block_size={self.block_size}: must be a positive integer")
    if not 0.0 <= self.eps < 1.0:
      raise ConfigError(f"objective.eps={self.eps}: must lie in [0, 1) (at 1 every response "
                        "token is masked in one copy and none in its complement)")
    if self.loss_chunk < 0:
      raise ConfigError(f"objective.loss_chunk={self.loss_chunk}: must be >= 0 (0: no chunks)")


def _check_batch(batch: Batch, block_size: int) -> None:
  missing = {"tokens", "loss_mask", "segments"} - set(batch)
  if missing:
    raise ValueError(f"batch lacks {sorted(missing)}; a batch holds tokens, loss_mask, segments")
  shape = batch["tokens"].shape
  for name in ("loss_mask", "segments"):
    if batch[name].shape != shape:
      raise ValueError(f"batch[{name!r}] has shape {batch[name].shape}, tokens {shape}")
  if len(shape) != 2 or shape[1] % block_size:
    raise ValueError(
        f"batch tokens have shape {shape}: expected [batch, L] with L a multiple of the block "
        f"size {block_size} (set data.seq_len to a multiple of objective.block_size)")
  seg = ax.readable_values(batch["segments"])
  if seg is not None:  # (values are checked where this process can read them)
    check_segments(seg, block_size)


def check_segments(segments_BL: np.ndarray, block_size: int) -> None:
  """Packed samples as the masks and kernels take them, else a ValueError: each run of equal
  segment ids starts on a block boundary (blocks are counted from a sample's first token, and
  the Pallas kernels tile by blocks of the row), and no id > 0 names two runs of a row (tokens
  of one id attend each other wherever they are; positions restart at each run). `data`'s
  packing makes such rows; a caller's own batch is checked here where its values are concrete
  (under jit they are not)."""
  seg = np.asarray(segments_BL)
  starts = np.ones(seg.shape, bool)
  starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
  rows, cols = np.nonzero(starts & (np.arange(seg.shape[1]) % block_size != 0))
  if rows.size:
    r, c = int(rows[0]), int(cols[0])
    raise ValueError(f"batch['segments'] row {r}: a sample (segment id {int(seg[r, c])}) starts "
                     f"at position {c}, not on a block boundary (a multiple of {block_size}); "
                     "pad each sample to whole blocks, as data's packing does")
  for r in range(seg.shape[0]):
    ids = seg[r][starts[r]]
    ids = ids[ids > 0]
    if np.unique(ids).size != ids.size:
      dup = next(int(i) for i in ids if (ids == i).sum() > 1)
      raise ValueError(f"batch['segments'] row {r}: segment id {dup} names two separate runs "
                       "of tokens, which would attend each other; give each sample its own id")


def response_mask(batch: Batch) -> jax.Array:
  """bool [B, L]: the tokens that may be noised and predicted (never padding)."""
  return jnp.asarray(batch["loss_mask"], bool) & (jnp.asarray(batch["segments"]) > 0)


def _row_keys(rng: jax.Array, b: int) -> tuple[jax.Array, jax.Array]:
  """(rate keys, draw keys), one of each per row, from one key or from one key per row [b]
  (typed or raw): a row's noise then depends on its own key alone, not on the rows beside it."""
  typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  if rng.ndim == (0 if typed else 1):
    rng = jax.random.split(rng, b)
  elif rng.shape[0] != b or rng.ndim != (1 if typed else 2):
    raise ValueError(f"noise keys of shape {rng.shape}: expected one key or one per row "
                     f"({b} rows)")
  pairs = jax.vmap(jax.random.split)(rng)  # [b, 2(, 2)]
  return pairs[:, 0], pairs[:, 1]


def noise(rng: jax.Array, batch: Batch, obj_cfg: ObjectiveConfig, mask_token_id: int):
  """Complementary per-block masking of the response tokens. `rng` is one key, or one per row
  (training passes each row its own, so its noise does not depend on train.grad_accum).

  Returns (noisy_tokens, noisy_complement_tokens, masked, masked_complement), each [B, L];
  `masked | masked_complement` is exactly the response mask and the two never overlap.
  """
  _check_batch(batch, obj_cfg.block_size)
  return _noise(rng, batch, obj_cfg, mask_token_id)


def _noise(rng, batch, obj_cfg, mask_token_id):
  """`noise` of a batch already checked (`loss_fn` checks it once)."""
  tokens = jnp.asarray(batch["tokens"], jnp.int32)
  resp = response_mask(batch)
  b, length = tokens.shape
  rate_B, draw_B = _row_keys(rng, b)
  t_BN = jax.vmap(lambda k: jax.random.uniform(k, (length // obj_cfg.block_size,)))(rate_B)
  p_BL = jnp.repeat((1.0 - obj_cfg.eps) * t_BN + obj_cfg.eps, obj_cfg.block_size, axis=1)
  masked = resp & (jax.vmap(lambda k: jax.random.uniform(k, (length,)))(draw_B) < p_BL)
  masked_c = resp & ~masked
  return (jnp.where(masked, mask_token_id, tokens), jnp.where(masked_c, mask_token_id, tokens),
          masked, masked_c)


def _shifted_targets(tokens_BL, predict_BL, segments_BL):
  """Targets [B, L] (token i + 1) and which positions count (token i + 1 is predicted and in
  the same sample as position i); the last position predicts nothing."""
  targets = jnp.concatenate([tokens_BL[:, 1:], jnp.zeros_like(tokens_BL[:, :1])], axis=1)
  same = segments_BL[:, 1:] == segments_BL[:, :-1]
  counted = jnp.concatenate([predict_BL[:, 1:] & same, jnp.zeros_like(predict_BL[:, :1])], axis=1)
  return targets, counted


def _token_ce(logits_BLV, targets_BL):
  """Cross-entropy [B, L] and whether the argmax is right, in float32."""
  logits = logits_BLV.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets_BL[..., None], axis=-1)[..., 0]
  ce = jax.nn.logsumexp(logits, axis=-1) - target_logit
  return ce, jnp.argmax(logits, axis=-1) == targets_BL


def _hidden_token_ce(params, model_cfg: ModelConfig, hidden_BLE, targets_BL, chunk: int):
  """`_token_ce` of the logits `hidden @ head` without holding them all: `chunk` tokens at a time,
  each chunk's logits recomputed in the backward pass (chunk 0: one piece)."""
  # Cast inside the chunk: the head's gradient is then summed over chunks in the parameters'
  # dtype (float32 master weights), not in the compute dtype.
  w_EV = model.head_matrix(params, model_cfg)

  def piece(h_BCE, targets_BC):
    logits = jnp.einsum("bce,ev->bcv", h_BCE, w_EV.astype(model_cfg.dtype),
                        preferred_element_type=jnp.float32)
    logits = nn.with_logical_constraint(logits, (ax.BATCH, ax.LENGTH, ax.ACT_VOCAB))
    return _token_ce(logits, targets_BC)

  b, length, e = hidden_BLE.shape
  if not chunk or chunk >= length:
    return piece(hidden_BLE, targets_BL)
  n = -(-length // chunk)
  pad = n * chunk - length
  h = jnp.pad(hidden_BLE, [(0, 0), (0, pad), (0, 0)]).reshape(b, n, chunk, e).swapaxes(0, 1)
  tg = jnp.pad(targets_BL, [(0, 0), (0, pad)]).reshape(b, n, chunk).swapaxes(0, 1)
  ce, right = lax.map(lambda x: jax.checkpoint(piece)(*x), (h, tg))  # [n, B, chunk]
  unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :length]
  return unchunk(ce), unchunk(right)


def _diffusion_forward(params, model_cfg, obj_cfg, noisy_BL, noisy_c_BL, clean_BL, segments_BL,
                       return_hidden):
  """Logits (or final hidden states) [B, 2L, .] of both noisy copies side by side (first copy,
  then its complement) under the configured layout."""
  length = clean_BL.shape[1]
  positions = masks.packed_positions(segments_BL)
  if obj_cfg.layout == "3l":
    spec = masks.MaskSpec("diffusion", obj_cfg.block_size, num_noisy=2)
    rows = jnp.concatenate([noisy_BL, noisy_c_BL, clean_BL], axis=1)
    meta = masks.layout_meta(spec, segments_BL, positions)
    out, _ = model.forward(params, model_cfg, rows, meta, spec, head_slice=(0, 2 * length),
                           return_hidden=return_hidden)
    return out  # the layout's own order
  # The authors' layout: the two copies are separate rows, each with its own clean half.
  spec = masks.MaskSpec("diffusion", obj_cfg.block_size, num_noisy=1)
  rows = jnp.concatenate([jnp.concatenate([noisy_BL, clean_BL], axis=1),
                          jnp.concatenate([noisy_c_BL, clean_BL], axis=1)], axis=0)
  seg2 = jnp.concatenate([segments_BL, segments_BL], axis=0)
  meta = masks.layout_meta(spec, seg2, jnp.concatenate([positions, positions], axis=0))
  out, _ = model.forward(params, model_cfg, rows, meta, spec, head_slice=(0, length),
                         return_hidden=return_hidden)
  b = clean_BL.shape[0]
  return jnp.concatenate([out[:b], out[b:]], axis=1)


def diffusion_logits(params, model_cfg: ModelConfig, obj_cfg: ObjectiveConfig, noisy_BL,
                     noisy_c_BL, clean_BL, segments_BL):
  """Logits [B, L, V] of both noisy copies under the configured layout."""
  both = _diffusion_forward(params, model_cfg, obj_cfg, noisy_BL, noisy_c_BL, clean_BL,
                            segments_BL, return_hidden=False)
  length = clean_BL.shape[1]
  return both[:, :length], both[:, length:]


def _diffusion_loss(params, model_cfg, obj_cfg, batch, rng):
  if model_cfg.mask_token_id is None:
    raise ConfigError("objective.kind='diffusion' needs model.mask_token_id; add a mask token to "
                      "the vocabulary (model.add_mask_token) or set model.mask_token_id")
  tokens = jnp.asarray(batch["tokens"], jnp.int32)
  segments = jnp.asarray(batch["segments"], jnp.int32)
  noisy, noisy_c, masked, masked_c = _noise(rng, batch, obj_cfg, model_cfg.mask_token_id)
  hidden = _diffusion_forward(params, model_cfg, obj_cfg, noisy, noisy_c, tokens, segments,
                              return_hidden=True)  # [B, 2L, E]
  (targets, counted_1), (_, counted_2) = (
      _shifted_targets(tokens, m, segments) for m in (masked, masked_c))
  # The copies mask complementary tokens, so a position counts in one copy at most and both
  # copies predict the same target there: the head runs on L hidden states, each position's
  # from the copy where it counts, instead of on 2L of which half are thrown away.
  length = tokens.shape[1]
  hidden = jnp.where(counted_1[..., None], hidden[:, :length], hidden[:, length:])
  ce, right = _hidden_token_ce(params, model_cfg, hidden, targets, obj_cfg.loss_chunk)
  counted = counted_1 | counted_2
  return (jnp.sum(jnp.where(counted, ce, 0.0)), jnp.sum(counted).astype(jnp.float32),
          {"correct": jnp.sum(counted & right).astype(jnp.float32)})


def _ar_loss(params, model_cfg, obj_cfg, batch):
  tokens = jnp.asarray(batch["tokens"], jnp.int32)
  segments = jnp.asarray(batch["segments"], jnp.int32)
  spec = masks.MaskSpec("causal")
  meta = masks.TokenMeta(masks.packed_positions(segments), jnp.zeros_like(segments), segments)
  hidden, _ = model.forward(params, model_cfg, tokens, meta, spec, return_hidden=True)
  targets, counted = _shifted_targets(tokens, response_mask(batch), segments)
  ce, right = _hidden_token_ce(params, model_cfg, hidden, targets, obj_cfg.loss_chunk)
  return (jnp.sum(jnp.where(counted, ce, 0.0)), jnp.sum(counted).astype(jnp.float32),
          {"correct": jnp.sum(counted & right).astype(jnp.float32)})


def loss_fn(params: Any, model_cfg: ModelConfig, obj_cfg: ObjectiveConfig, batch: Batch,
            rng: jax.Array):
  """(loss_sum, count, metrics): summed token cross-entropy over counted positions, their number
  and {"correct": how many counted positions the argmax predicts}; all float32 scalars.

  The mean loss is loss_sum / count, summed over micro-batches and devices before dividing.
  `rng` draws the noise (unused by the AR objective).
  """
  _check_batch(batch, obj_cfg.block_size)
  if obj_cfg.kind == "ar":
    return _ar_loss(params, model_cfg, obj_cfg, batch)
  return _diffusion_loss(params, model_cfg, obj_cfg, batch, rng)


def eval_masked_accuracy(params: Any, model_cfg: ModelConfig, obj_cfg: ObjectiveConfig,
                         batch: Batch, rng: jax.Array) -> dict[str, jax.Array]:
  """Held-out metrics of one batch as sums (add them over batches, then divide):
  {"loss_sum", "count", "correct"}; accuracy = correct / count is the masked-token accuracy
  (next-token accuracy on response tokens for the AR objective)."""
  loss_sum, count, metrics = loss_fn(params, model_cfg, obj_cfg, batch, rng)
  return {"loss_sum": loss_sum, "count": count, "correct": metrics["correct"]}
