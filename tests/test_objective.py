"""The block-diffusion and AR-SFT objectives against a NumPy transcription of their semantics."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dllm_jax import masks, model, objective
from dllm_jax.config import ConfigError, ModelConfig
from dllm_jax.objective import ObjectiveConfig

jax.config.update("jax_default_matmul_precision", "highest")

BLOCK = 8
CFG = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, qkv_bias=True, mask_token_id=127,
                  attention_impl="xla")


def random_batch(seed, batch=3, length=48, block=BLOCK):
  """Rows packed with samples of random length (padded to blocks), a prompt then a response."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size - 1, (batch, length)).astype(np.int32)
  loss_mask = np.zeros((batch, length), bool)
  segments = np.zeros((batch, length), np.int32)
  for r in range(batch):
    start, seg = 0, 1
    while True:
      n = int(rng.integers(2, 2 * block + 4))  # odd lengths too
      padded = -(-n // block) * block
      if start + padded > length:
        break
      segments[r, start:start + padded] = seg
      prompt = int(rng.integers(1, n))
      loss_mask[r, start + prompt:start + n] = True
      start += padded
      seg += 1
  return {"tokens": tokens, "loss_mask": loss_mask, "segments": segments}


# ---------------------------------------------------------------------------------------------
# NumPy transcription of the model and of the objective's semantics.


def np_forward(params, cfg, tokens, positions, allowed):
  """Logits [T, V] of one row, float64, with a dense boolean attention mask [T, T]."""
  params, cfg = model.with_kernel_layout(params, cfg, "in_out")  # (the einsums below read it)
  p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
  lay = p["layers"]

  def rms(x, scale):
    return scale * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps)

  def rope(x):
    d = x.shape[-1]
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)
    f = positions[:, None] * inv
    cos, sin = np.cos(f)[:, None], np.sin(f)[:, None]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  x = p["embed"]["embedding"][tokens]
  group = cfg.num_heads // cfg.num_kv_heads
  for i in range(cfg.num_layers):
    h = rms(x, lay["attn_norm"]["scale"][i])
    a = lay["attn"]
    q = rope(np.einsum("te,ehd->thd", h, a["q"]["kernel"][i]) + a["q"]["bias"][i])
    k = rope(np.einsum("te,ehd->thd", h, a["k"]["kernel"][i]) + a["k"]["bias"][i])
    v = np.einsum("te,ehd->thd", h, a["v"]["kernel"][i]) + a["v"]["bias"][i]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(cfg.head_dim)
    s = np.where(allowed[None], s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("hts,shd->thd", w, v)
    x = x + np.einsum("thd,hde->te", o, a["o"]["kernel"][i])
    h = rms(x, lay["mlp_norm"]["scale"][i])
    m = lay["mlp"]
    g = h @ m["gate"]["kernel"][i]
    x = x + ((g / (1 + np.exp(-g))) * (h @ m["up"]["kernel"][i])) @ m["down"]["kernel"][i]
  return rms(x, p["final_norm"]["scale"]) @ p["lm_head"]


def np_sample_positions(segments):
  pos = np.zeros_like(segments)
  for i in range(1, len(segments)):
    pos[i] = pos[i - 1] + 1 if segments[i] == segments[i - 1] else 0
  return pos


def np_diffusion_mask(segments, pos, block):
  """[noisy ; clean] of length 2L, written rule by rule."""
  length = len(segments)
  m = np.zeros((2 * length, 2 * length), bool)
  for q in range(2 * length):
    for k in range(2 * length):
      qi, ki = q % length, k % length
      if segments[qi] != segments[ki]:
        continue
      qb, kb = pos[qi] // block, pos[ki] // block
      q_noisy, k_noisy = q < length, k < length
      if q_noisy and k_noisy:
        m[q, k] = qb == kb
      elif q_noisy:
        m[q, k] = kb < qb
      elif not k_noisy:
        m[q, k] = kb <= qb
  return m


def np_shifted_ce(logits, tokens, predicted, segments):
  loss, count = 0.0, 0
  for i in range(len(tokens) - 1):
    if predicted[i + 1] and segments[i] == segments[i + 1]:
      lse = np.log(np.sum(np.exp(logits[i] - logits[i].max()))) + logits[i].max()
      loss += lse - logits[i, tokens[i + 1]]
      count += 1
  return loss, count


def np_diffusion_loss(params, batch, noised, block):
  noisy, noisy_c, masked, masked_c = (np.asarray(a) for a in noised)
  total, count = 0.0, 0
  for r in range(batch["tokens"].shape[0]):
    tok, seg = batch["tokens"][r], batch["segments"][r]
    pos = np_sample_positions(seg)
    allowed = np_diffusion_mask(seg, pos, block)
    length = len(tok)
    for x, m in ((noisy[r], masked[r]), (noisy_c[r], masked_c[r])):
      logits = np_forward(params, CFG, np.concatenate([x, tok]), np.tile(pos, 2), allowed)
      s, c = np_shifted_ce(logits[:length], tok, m, seg)
      total += s
      count += c
  return total, count


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def params():
  return model.init_params(CFG, jax.random.key(1))


def test_noise_masks_only_response_tokens_and_complements_exactly():
  batch = random_batch(0, batch=8, length=64)
  resp = batch["loss_mask"] & (batch["segments"] > 0)
  obj = ObjectiveConfig(block_size=BLOCK)
  noisy, noisy_c, m, mc = (np.asarray(a) for a in
                           objective.noise(jax.random.key(3), batch, obj, CFG.mask_token_id))
  assert not (m & mc).any()
  np.testing.assert_array_equal(m | mc, resp)
  np.testing.assert_array_equal(noisy, np.where(m, CFG.mask_token_id, batch["tokens"]))
  np.testing.assert_array_equal(noisy_c, np.where(mc, CFG.mask_token_id, batch["tokens"]))
  # eps near 1 masks every response token in the first copy; eps = 1 (the complement empty
  # always) is refused.
  near = dataclasses.replace(obj, eps=1 - 1e-7)
  _, _, m1, mc1 = objective.noise(jax.random.key(3), batch, near, 5)
  np.testing.assert_array_equal(np.asarray(m1), resp)
  assert not np.asarray(mc1).any()
  with pytest.raises(ConfigError, match=r"objective.eps=1.0: must lie in \[0, 1\)"):
    dataclasses.replace(obj, eps=1.0)


@pytest.mark.parametrize("segments,why", [
    ([1] * 5 + [2] * 11, r"row 1: a sample \(segment id 2\) starts at position 5"),
    ([1] * 8 + [0] * 3 + [2] * 5, r"\(segment id 2\) starts at position 11"),
    ([1] * 8 + [2] * 4 + [0] * 4, r"\(segment id 0\) starts at position 12"),
    ([1] * 8 + [2] * 8 + [1] * 8 + [0] * 8, "segment id 1 names two separate runs")])
def test_packed_segments_must_start_on_blocks_and_name_one_run(segments, why):
  # Blocks of 8. data's packing never makes these rows; a caller's own batch is checked.
  seg = np.array([[1] * len(segments), segments], np.int32)
  batch = {"tokens": np.zeros(seg.shape, np.int32), "loss_mask": seg > 0, "segments": seg}
  with pytest.raises(ValueError, match=why):
    objective.noise(jax.random.key(0), batch, ObjectiveConfig(block_size=8), 5)
  ok = np.array([[1] * 8 + [2] * 8, [1] * 8 + [0] * 8], np.int32)  # aligned runs pass
  objective.noise(jax.random.key(0), {"tokens": np.zeros(ok.shape, np.int32),
                                      "loss_mask": ok > 0, "segments": ok},
                  ObjectiveConfig(block_size=8), 5)


def test_noise_rate_is_drawn_per_block():
  """Full-response blocks: the masked fraction of a block follows p ~ U(eps, 1) independently
  per block (a per-row rate would correlate blocks of one row)."""
  b, length, block = 512, 128, 32
  batch = {"tokens": np.zeros((b, length), np.int32), "loss_mask": np.ones((b, length), bool),
           "segments": np.ones((b, length), np.int32)}
  _, _, m, _ = objective.noise(jax.random.key(0), batch, ObjectiveConfig(), 1)
  frac = np.asarray(m).reshape(b, length // block, block).mean(-1)  # [rows, blocks]
  assert abs(frac.mean() - 0.5) < 0.02
  # Var = Var(p) + E[p (1 - p)] / B for a rate uniform on [0, 1].
  assert abs(frac.var() - (1 / 12 + 1 / 6 / block)) < 0.006
  corr = np.corrcoef(frac[:, 0], frac[:, 1])[0, 1]
  assert abs(corr) < 0.1


@pytest.mark.parametrize("layout", ["3l", "2x2l"])
def test_diffusion_loss_equals_numpy_transcription(params, layout):
  batch = random_batch(1)
  obj = ObjectiveConfig(block_size=BLOCK, layout=layout)
  rng = jax.random.key(7)
  loss_sum, count, metrics = jax.jit(objective.loss_fn, static_argnums=(1, 2))(
      params, CFG, obj, batch, rng)
  ref_sum, ref_count = np_diffusion_loss(
      params, batch, objective.noise(rng, batch, obj, CFG.mask_token_id), BLOCK)
  resp = batch["loss_mask"] & (batch["segments"] > 0)
  assert ref_count > 20 and ref_count <= resp.sum()
  assert int(count) == ref_count
  np.testing.assert_allclose(float(loss_sum), ref_sum, rtol=2e-6)
  assert 0 <= float(metrics["correct"]) <= ref_count


def test_3l_equals_2x2l_in_loss_and_gradients(params):
  batch = random_batch(2)
  rng = jax.random.key(11)

  def run(layout):
    obj = ObjectiveConfig(block_size=BLOCK, layout=layout)
    f = lambda p: objective.loss_fn(p, CFG, obj, batch, rng)[0]
    return jax.jit(jax.value_and_grad(f))(params)

  (l3, g3), (l4, g4) = run("3l"), run("2x2l")
  np.testing.assert_allclose(float(l3), float(l4), rtol=1e-6)
  # The clean half's gradient is one sum in 3L and two summed rows in 2x2L: equal up to fp32
  # summation order, i.e. a few ulps of each tensor's scale.
  for a, b in zip(jax.tree_util.tree_leaves(g3), jax.tree_util.tree_leaves(g4)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(a - b)) <= 2e-6 * np.max(np.abs(b)), np.max(np.abs(a - b))


def test_3l_processes_a_quarter_fewer_tokens(params):
  batch = random_batch(2)
  seen = {}

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, model.Transformer) and context.method_name == "__call__":
      seen[layout] = args[0].size
    return next_fun(*args, **kwargs)

  for layout in ("3l", "2x2l"):
    with nn.intercept_methods(spy):
      objective.loss_fn(params, CFG, ObjectiveConfig(block_size=BLOCK, layout=layout), batch,
                        jax.random.key(0))
  assert seen["3l"] * 4 == seen["2x2l"] * 3


def _vocab_dots(jaxpr) -> list[tuple]:
  """Output shapes of the dot_generals in `jaxpr` (sub-jaxprs too) whose last axis is the
  vocabulary: the LM head's matmuls."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape[-1] == CFG.vocab_size:
      shapes.append(eqn.outvars[0].aval.shape)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      shapes += _vocab_dots(sub)
  return shapes


@pytest.mark.parametrize("layout", ["3l", "2x2l"])
def test_diffusion_head_runs_once_per_position(params, layout):
  """The two copies count complementary positions, so the LM head runs on L hidden states a row,
  not on both copies' 2L; the loss and its gradients are those of the head on both copies."""
  batch = random_batch(6)
  obj = ObjectiveConfig(block_size=BLOCK, layout=layout)
  rng = jax.random.key(8)
  loss = lambda p: objective.loss_fn(p, CFG, obj, batch, rng)[0]
  assert _vocab_dots(jax.make_jaxpr(loss)(params).jaxpr) == [(3, 48, CFG.vocab_size)]

  def both_copies(p):  # the head on every position of both copies, counted ones summed
    tokens, segments = jnp.asarray(batch["tokens"]), jnp.asarray(batch["segments"])
    noisy, noisy_c, m, mc = objective.noise(rng, batch, obj, CFG.mask_token_id)
    total = 0.0
    for logits, mk in zip(objective.diffusion_logits(p, CFG, obj, noisy, noisy_c, tokens,
                                                     segments), (m, mc)):
      targets, counted = objective._shifted_targets(tokens, mk, segments)
      logits = logits.astype(jnp.float32)
      ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None],
                                                               -1)[..., 0]
      total += jnp.sum(jnp.where(counted, ce, 0.0))
    return total

  (got, g), (want, w) = (jax.jit(jax.value_and_grad(f))(params) for f in (loss, both_copies))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(w)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(a - b)) <= 2e-6 * np.max(np.abs(b)), np.max(np.abs(a - b))


def _position_grads(params, layout, batch, rng, copy, query):
  """|d loss(query position of a noisy copy) / d input embedding| for every token of the layout
  row 0, as [row length]."""
  obj = ObjectiveConfig(block_size=BLOCK, layout=layout)
  tokens = jnp.asarray(batch["tokens"])
  segments = jnp.asarray(batch["segments"])
  noisy, noisy_c, _, _ = objective.noise(rng, batch, obj, CFG.mask_token_id)
  n_tokens = (3 if layout == "3l" else 2) * tokens.shape[1]
  row = tokens.shape[0] if layout == "2x2l" and copy == 1 else 0  # 2x2l: copy 2 rows follow

  def loss_at(delta_TE):
    def add_delta(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
        out = out.at[row].add(delta_TE)
      return out

    with nn.intercept_methods(add_delta):
      logits = objective.diffusion_logits(params, CFG, obj, noisy, noisy_c, tokens, segments)
    return jax.nn.log_softmax(logits[copy][0, query])[tokens[0, query + 1]]

  g = jax.grad(loss_at)(jnp.zeros((n_tokens, CFG.hidden_size)))
  return np.abs(np.asarray(g)).sum(-1)


@pytest.mark.parametrize("layout", ["3l", "2x2l"])
def test_no_gradient_leaks_to_unseen_inputs(params, layout):
  """The prediction at a noisy position depends on its own noisy block of its own copy and the
  clean blocks before it in its own sample, and on nothing else."""
  length = 48
  batch = {"tokens": random_batch(3, length=length)["tokens"],
           "segments": np.array([[1] * 16 + [2] * 24 + [0] * 8] * 3, np.int32),
           "loss_mask": np.ones((3, length), bool)}
  rng = jax.random.key(5)
  for copy in (0, 1):
    query = 16 + 8 + 3  # sample 2, its second block
    g = _position_grads(params, layout, batch, rng, copy, query)
    expected = np.zeros_like(g, bool)
    noisy_start = copy * length if layout == "3l" else 0
    clean_start = (2 if layout == "3l" else 1) * length
    expected[noisy_start + 24:noisy_start + 32] = True  # own noisy block
    expected[clean_start + 16:clean_start + 24] = True  # sample 2's first clean block
    assert (g[~expected] == 0).all(), np.nonzero(g[~expected])
    assert (g[expected] > 0).all()


def test_ar_objective_equals_numpy_transcription(params):
  batch = random_batch(4)
  obj = ObjectiveConfig(kind="ar", block_size=BLOCK)
  loss_sum, count, _ = jax.jit(objective.loss_fn, static_argnums=(1, 2))(
      params, CFG, obj, batch, jax.random.key(0))
  ref_sum, ref_count = 0.0, 0
  for r in range(batch["tokens"].shape[0]):
    tok, seg = batch["tokens"][r], batch["segments"][r]
    pos = np_sample_positions(seg)
    t = np.arange(len(tok))
    causal = (seg[:, None] == seg[None, :]) & (t[None, :] <= t[:, None])
    logits = np_forward(params, CFG, tok, pos, causal)
    s, c = np_shifted_ce(logits, tok, batch["loss_mask"][r] & (seg > 0), seg)
    ref_sum += s
    ref_count += c
  assert int(count) == ref_count > 20
  np.testing.assert_allclose(float(loss_sum), ref_sum, rtol=2e-6)


def test_loss_is_the_same_with_the_batch_sharded(params):
  batch = random_batch(5, batch=8, length=32)
  obj = ObjectiveConfig(block_size=BLOCK)
  f = jax.jit(objective.loss_fn, static_argnums=(1, 2))
  want = f(params, CFG, obj, batch, jax.random.key(2))
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
  got = f(params, CFG, obj, sharded, jax.random.key(2))
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
  assert float(got[1]) == float(want[1])


def test_bad_inputs_give_clear_errors(params):
  batch = random_batch(6, length=40)
  with pytest.raises(ValueError, match="multiple of the block size 16"):
    objective.loss_fn(params, CFG, ObjectiveConfig(block_size=16), batch, jax.random.key(0))
  with pytest.raises(ValueError, match="lacks"):
    objective.loss_fn(params, CFG, ObjectiveConfig(block_size=8), {"tokens": batch["tokens"]},
                      jax.random.key(0))
  with pytest.raises(ConfigError, match="mask_token_id"):
    objective.loss_fn(params, dataclasses.replace(CFG, mask_token_id=None),
                      ObjectiveConfig(block_size=8), batch, jax.random.key(0))
  with pytest.raises(ConfigError, match="objective.layout"):
    ObjectiveConfig(layout="4l")
  with pytest.raises(ConfigError, match="objective.loss_chunk"):
    ObjectiveConfig(loss_chunk=-1)


@pytest.mark.parametrize("kind,layout,tie", [("ar", "3l", True), ("diffusion", "3l", False),
                                             ("diffusion", "2x2l", True)])
def test_chunked_loss_equals_whole_loss(kind, layout, tie):
  cfg = dataclasses.replace(CFG, tie_embeddings=tie)
  params = model.init_params(cfg, jax.random.key(4))
  batch = random_batch(8)

  def run(chunk):  # 20 does not divide L=48: the last chunk is padded
    obj = ObjectiveConfig(kind=kind, block_size=BLOCK, layout=layout, loss_chunk=chunk)
    f = lambda p: objective.loss_fn(p, cfg, obj, batch, jax.random.key(5))
    (loss, (count, metrics)), grads = jax.jit(jax.value_and_grad(
        lambda p: (lambda r: (r[0], r[1:]))(f(p)), has_aux=True))(params)
    return float(loss), float(count), float(metrics["correct"]), grads

  whole, got = run(0), run(20)
  np.testing.assert_allclose(got[0], whole[0], rtol=1e-6)
  assert got[1:3] == whole[1:3]
  for a, b in zip(jax.tree_util.tree_leaves(got[3]), jax.tree_util.tree_leaves(whole[3])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(b))))


@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_chunked_loss_does_not_hold_all_logits(kind):
  # A vocabulary large against everything else, so the logits dominate the step's temporaries.
  cfg = dataclasses.replace(CFG, vocab_size=16384, mask_token_id=16383, num_layers=1)
  params = model.init_params(cfg, jax.random.key(0))
  batch = random_batch(9, batch=2, length=128)
  loss_rows = 2 * 128  # rows x positions whose logits the loss takes (diffusion: one copy's)
  logits_bytes = loss_rows * cfg.vocab_size * 4

  def temp_bytes(chunk):
    obj = ObjectiveConfig(kind=kind, block_size=BLOCK, loss_chunk=chunk)
    g = jax.jit(jax.grad(lambda p: objective.loss_fn(p, cfg, obj, batch, jax.random.key(3))[0]))
    return g.lower(params).compile().memory_analysis().temp_size_in_bytes

  whole, chunked = temp_bytes(0), temp_bytes(16)
  assert whole > logits_bytes  # the float32 logits of every loss position are held at once
  assert whole - chunked > 0.6 * logits_bytes, (whole, chunked, logits_bytes)


def test_noise_rate_runs_affinely_from_eps_to_one():
  """p = (1 - eps) t + eps with t ~ U(0, 1) is uniform on [eps, 1]. At the default eps = 1e-3 a
  rate t + eps or max(t, eps) is indistinguishable from it; at eps = 0.5 the masked fraction of
  a full-response block has mean 0.75 (t + eps: 0.875, max(t, eps): 0.625)."""
  b, length, block, eps = 512, 128, 32, 0.5
  batch = {"tokens": np.zeros((b, length), np.int32), "loss_mask": np.ones((b, length), bool),
           "segments": np.ones((b, length), np.int32)}
  obj = ObjectiveConfig(block_size=block, eps=eps)
  _, _, m, _ = objective.noise(jax.random.key(0), batch, obj, 1)
  frac = np.asarray(m).reshape(b, length // block, block).mean(-1)
  mean = (1 + eps) / 2  # E[p]
  # Var(frac) = Var(p) + E[p (1 - p)] / B, with E[p^2] = (1 + eps + eps^2) / 3.
  var = (1 - eps) ** 2 / 12 + (mean - (1 + eps + eps * eps) / 3) / block
  assert abs(frac.mean() - mean) < 0.02, frac.mean()
  assert abs(frac.var() - var) < 0.004, (frac.var(), var)


def test_every_position_of_a_block_is_masked_alike():
  """Given its block's rate, each response token is masked independently of where it sits: over
  many rows every position is masked about E[p] of the time. (Drawing the rates and the per-token
  draws from one key would tie some tokens' draws to their block's rate.)"""
  b, length = 1024, 128
  batch = {"tokens": np.zeros((b, length), np.int32), "loss_mask": np.ones((b, length), bool),
           "segments": np.ones((b, length), np.int32)}
  obj = ObjectiveConfig()
  _, _, m, _ = objective.noise(jax.random.key(0), batch, obj, 1)
  per_position = np.asarray(m).mean(0)  # [length]; standard error about 0.016 each
  mean = (1 + obj.eps) / 2
  assert np.abs(per_position - mean).max() < 0.1, np.abs(per_position - mean).argmax()


def test_loss_counts_each_response_token_once_within_its_sample(params):
  """Each response token is masked in exactly one copy, so the count over both copies is the
  number of response tokens whose left neighbour is in the same sample, whatever the noise. A
  caller's batch may flag padding (segment 0) or a sample's first token as loss tokens: padding
  is never noised or predicted, and a sample's first token is not predicted from the sample
  before it (data's rows never hold either case, which hid both)."""
  length = 48
  segments = np.array([[1] * 16 + [2] * 24 + [0] * 8, [1] * 8 + [2] * 32 + [0] * 8], np.int32)
  loss_mask = np.ones((2, length), bool)  # every token flagged, padding too
  loss_mask[1, 8:12] = False  # a prompt of sample 2 in row 1
  batch = {"tokens": random_batch(3, batch=2, length=length)["tokens"], "loss_mask": loss_mask,
           "segments": segments}
  resp = loss_mask & (segments > 0)
  want = int((resp[:, 1:] & (segments[:, 1:] == segments[:, :-1])).sum())
  obj = ObjectiveConfig(block_size=BLOCK)
  _, _, m, mc = objective.noise(jax.random.key(4), batch, obj, CFG.mask_token_id)
  np.testing.assert_array_equal(np.asarray(m) | np.asarray(mc), resp)
  _, count, _ = objective.loss_fn(params, CFG, obj, batch, jax.random.key(4))
  # Row 0: tokens 1..15 and 17..39; row 1: tokens 1..7 and 12..39 (after the prompt).
  assert int(count) == want == 15 + 23 + 7 + 28
