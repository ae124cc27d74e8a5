"""Model-level properties: cache equivalence, causality through gradients, remat, full-size shapes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax import cache as kvcache
from dllm_jax import masks, model
from dllm_jax.config import ConfigError, ModelConfig

# (in_out: its tests convert from it to the default out_in and back.)
TINY = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, kernel_layout="in_out")


def _positions(b, t, start=0):
  return jnp.broadcast_to(jnp.arange(start, start + t, dtype=jnp.int32), (b, t))


@pytest.fixture(scope="module")
def params():
  return model.init_params(TINY, jax.random.key(0))


def test_cached_ar_steps_equal_full_recompute(params):
  tokens = jax.random.randint(jax.random.key(1), (3, 12), 0, TINY.vocab_size)
  full = model.ar_forward(params, TINY, tokens)
  cache = kvcache.init_cache(TINY, 3, 16)
  spec = masks.MaskSpec("causal")
  logits, cache = model.forward(params, TINY, tokens[:, :5],
                                masks.TokenMeta.simple(_positions(3, 5)), spec, cache)
  pieces = [logits]
  for i in range(5, 12):
    logits, cache = model.forward(params, TINY, tokens[:, i:i + 1],
                                  masks.TokenMeta.simple(_positions(3, 1, i)), spec, cache)
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, rtol=1e-5, atol=1e-5)


def test_block_forward_against_cache_equals_uncached_block_causal(params):
  # Prefill two blocks, then forward the third block against the cache: the same logits as the
  # block-causal forward of the whole sequence.
  bs = 4
  spec = masks.MaskSpec("block_causal", block_size=bs)
  tokens = jax.random.randint(jax.random.key(2), (2, 3 * bs), 0, TINY.vocab_size)
  full, _ = model.forward(params, TINY, tokens, masks.TokenMeta.simple(_positions(2, 3 * bs)), spec)
  cache = kvcache.init_cache(TINY, 2, 4 * bs)
  _, cache = model.forward(params, TINY, tokens[:, :2 * bs],
                           masks.TokenMeta.simple(_positions(2, 2 * bs)), spec, cache)
  last, _ = model.forward(params, TINY, tokens[:, 2 * bs:],
                          masks.TokenMeta.simple(_positions(2, bs, 2 * bs)), spec, cache)
  np.testing.assert_allclose(last, full[:, 2 * bs:], rtol=1e-5, atol=1e-5)


def test_rows_at_different_offsets_write_their_own_slots(params):
  # Row 0 writes slots 0..3, row 1 slots 4..7: each row's logits equal that row decoded alone.
  spec = masks.MaskSpec("block_causal", block_size=4)
  tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, TINY.vocab_size)
  cache = kvcache.init_cache(TINY, 2, 8)
  _, cache = model.forward(params, TINY, tokens[:, :4],
                           masks.TokenMeta.simple(_positions(2, 4)), spec, cache)
  pos = jnp.array([[0, 1, 2, 3], [4, 5, 6, 7]], jnp.int32)
  mixed = jnp.stack([tokens[0, :4], tokens[1, 4:]])
  out, _ = model.forward(params, TINY, mixed, masks.TokenMeta.simple(pos), spec, cache)
  row1_full, _ = model.forward(params, TINY, tokens[1:], masks.TokenMeta.simple(_positions(1, 8)),
                               spec)
  np.testing.assert_allclose(out[1], row1_full[0, 4:], rtol=1e-5, atol=1e-5)


def test_causal_logits_have_no_gradient_from_later_tokens(params):
  t = 8
  tokens = jax.random.randint(jax.random.key(4), (1, t), 0, TINY.vocab_size)
  emb = params["embed"]["embedding"]

  # Gradient w.r.t. the embedding rows of later tokens must vanish.
  def loss_from_table(table, i):
    p = dict(params, embed={"embedding": table})
    return model.ar_forward(p, TINY, tokens)[0, i].sum()

  for i in (0, 3, 6):
    g = jax.grad(loss_from_table)(emb, i)
    later = set(np.asarray(tokens[0, i + 1:]).tolist()) - set(np.asarray(tokens[0, :i + 1]).tolist())
    for tok in later:
      assert float(jnp.abs(g[tok]).max()) == 0.0, (i, tok)
    seen = np.asarray(tokens[0, :i + 1])
    assert float(jnp.abs(g[seen]).max()) > 0.0


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_same_loss_and_grads(params, remat):
  tokens = jax.random.randint(jax.random.key(5), (2, 8), 0, TINY.vocab_size)
  cfg = dataclasses.replace(TINY, remat=remat)

  def loss(p, c):
    return jnp.mean(jax.nn.log_softmax(model.ar_forward(p, c, tokens))[..., 0])

  l0, g0 = jax.value_and_grad(loss)(params, TINY)
  l1, g1 = jax.value_and_grad(loss)(params, cfg)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_per_layer_layout_gives_same_logits_and_cache(params):
  tokens = jax.random.randint(jax.random.key(7), (2, 6), 0, TINY.vocab_size)
  spec, meta = masks.MaskSpec("causal"), masks.TokenMeta.simple(_positions(2, 6))
  per_layer = model.unstack_layers(params)
  assert sorted(k for k in per_layer if k.startswith("layers")) == ["layers_0", "layers_1"]
  logits, cache = model.forward(params, TINY, tokens, meta, spec, kvcache.init_cache(TINY, 2, 8))
  logits_pl, cache_pl = model.forward(per_layer, TINY, tokens, meta, spec,
                                      kvcache.init_cache(TINY, 2, 8, per_layer=True))
  np.testing.assert_allclose(logits_pl, logits, rtol=1e-6, atol=1e-6)
  assert isinstance(cache_pl.k, tuple) and cache_pl.max_len == 8 and cache_pl.batch == 2
  np.testing.assert_allclose(jnp.stack(cache_pl.k), cache.k, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jnp.stack(cache_pl.v), cache.v, rtol=1e-6, atol=1e-6)
  # Round trip, and the logical axes of the per-layer layout match its tree.
  jax.tree_util.tree_map(np.testing.assert_array_equal, model.stack_layers(per_layer), params)
  axes = model.param_logical_axes(TINY, stacked=False)
  assert (jax.tree_util.tree_structure(axes, is_leaf=lambda x: isinstance(
      x, jax.sharding.PartitionSpec)) == jax.tree_util.tree_structure(per_layer))
  assert axes["layers_0"]["mlp"]["up"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
  with pytest.raises(ValueError, match="per_layer=True"):
    model.forward(per_layer, TINY, tokens, meta, spec, kvcache.init_cache(TINY, 2, 8))
  with pytest.raises(ValueError, match="already unstacked"):
    model.unstack_layers(per_layer)
  short = kvcache.init_cache(dataclasses.replace(TINY, num_layers=1), 2, 8, per_layer=True)
  with pytest.raises(ValueError, match="has 1 layers, the model 2"):
    model.forward(per_layer, TINY, tokens, meta, spec, short)
  with pytest.raises(ValueError, match="layers_0 .. layers_N-1, got"):
    model.stack_layers({k: v for k, v in per_layer.items() if k != "layers_0"})
  # with_layout converts either way and leaves params already in the layout alone.
  assert model.with_layout(params, "stacked") is params
  assert model.with_layout(per_layer, "per_layer") is per_layer
  jax.tree_util.tree_map(np.testing.assert_array_equal, model.with_layout(params, "per_layer"),
                         per_layer)
  jax.tree_util.tree_map(np.testing.assert_array_equal, model.with_layout(per_layer, "stacked"),
                         params)
  with pytest.raises(ValueError, match="layout='scan': expected one of"):
    model.with_layout(params, "scan")
  with pytest.raises(ValueError, match=r"neither 'layers'.*\['params'\]"):
    model.with_layout({"params": params}, "per_layer")


def test_kernel_layouts_compute_the_same_model(params):
  # "out_in" stores each projection kernel [*out, *in]: the same model, its kernels transposed.
  tokens = jax.random.randint(jax.random.key(8), (2, 6), 0, TINY.vocab_size)
  spec, meta = masks.MaskSpec("causal"), masks.TokenMeta.simple(_positions(2, 6))
  om, om_cfg = model.with_kernel_layout(params, TINY, "out_in")
  assert om_cfg == dataclasses.replace(TINY, kernel_layout="out_in")
  layer = om["layers"]
  assert layer["attn"]["q"]["kernel"].shape == (2, 4, 8, 32)  # [L, H, D, E]
  assert layer["attn"]["o"]["kernel"].shape == (2, 32, 4, 8)  # [L, E, H, D]
  assert layer["mlp"]["gate"]["kernel"].shape == (2, 64, 32)  # [L, F, E]
  assert layer["mlp"]["down"]["kernel"].shape == (2, 32, 64)  # [L, E, F]
  np.testing.assert_array_equal(layer["attn"]["o"]["kernel"][1, :, 2, 3],
                                params["layers"]["attn"]["o"]["kernel"][1, 2, 3, :])
  # What the model initialises in that layout has the same tree, shapes and logical axes.
  shapes = lambda t: jax.tree_util.tree_map(lambda x: x.shape, t)
  assert shapes(jax.eval_shape(lambda r: model.init_params(om_cfg, r), jax.random.key(0))) == \
      shapes(om)
  axes = model.param_logical_axes(om_cfg)["layers"]
  P = jax.sharding.PartitionSpec
  assert axes["attn"]["q"]["kernel"] == P("layers", "heads", "head_dim", "embed")
  assert axes["attn"]["o"]["kernel"] == P("layers", "embed", "heads", "head_dim")
  assert axes["mlp"]["down"]["kernel"] == P("layers", "embed", "mlp")
  cache = lambda: kvcache.init_cache(TINY, 2, 8)
  want, want_cache = model.forward(params, TINY, tokens, meta, spec, cache())
  got, got_cache = model.forward(om, om_cfg, tokens, meta, spec, cache())
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_cache.k, want_cache.k, rtol=1e-5, atol=1e-5)
  # A one-token step (the single-row product) and the per-layer layout, converted either way.
  step = (tokens[:1, :1], masks.TokenMeta.simple(_positions(1, 1)), spec)
  np.testing.assert_allclose(model.forward(om, om_cfg, *step)[0],
                             model.forward(params, TINY, *step)[0], rtol=1e-5, atol=1e-5)
  per_layer, _ = model.with_kernel_layout(model.unstack_layers(params), TINY, "out_in")
  jax.tree_util.tree_map(np.testing.assert_array_equal, per_layer, model.unstack_layers(om))
  back, back_cfg = model.with_kernel_layout(om, om_cfg, "in_out")
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  assert back_cfg == TINY
  assert model.with_kernel_layout(params, TINY, "in_out")[0] is params
  # Host (numpy) params convert too: the HF import and export run there.
  host, _ = model.with_kernel_layout(jax.tree_util.tree_map(np.asarray, params), TINY, "out_in")
  jax.tree_util.tree_map(np.testing.assert_array_equal, host, om)
  # Params in the other layout than the config says are refused by name, not multiplied (the
  # one-row kernels would read the transposes without a word), nor converted twice.
  assert model.stored_kernel_layout(om, om_cfg) == "out_in"
  assert model.stored_kernel_layout(per_layer, om_cfg) == "out_in"
  for p, c in ((om, TINY), (params, om_cfg)):
    with pytest.raises(ValueError, match=f"stored {model.stored_kernel_layout(p, TINY)} but "
                                         f"kernel_layout='{c.kernel_layout}'"):
      model.forward(p, c, *step)
  with pytest.raises(ValueError, match="stored out_in but kernel_layout='in_out'"):
    model.with_kernel_layout(om, TINY, "out_in")
  with pytest.raises(ValueError, match="not this config's model"):
    model.forward(params, dataclasses.replace(TINY, hidden_size=48), *step)
  with pytest.raises(ValueError, match="kernel_layout='ji': expected one of"):
    model.with_kernel_layout(params, TINY, "ji")
  with pytest.raises(ValueError, match=r"neither 'layers' nor 'layers_0'.*params dict"):
    model.with_kernel_layout({"params": params}, TINY, "out_in")
  with pytest.raises(ConfigError, match="model.kernel_layout='io': expected one of"):
    dataclasses.replace(TINY, kernel_layout="io")


@pytest.mark.parametrize("tie", [True, False])
def test_head_matrix_is_the_head_forward_applies(tie):
  # The chunked loss applies `head_matrix` to `return_hidden` states outside the module.
  cfg = dataclasses.replace(TINY, tie_embeddings=tie)
  p = model.init_params(cfg, jax.random.key(2))
  tokens = jax.random.randint(jax.random.key(3), (2, 6), 0, cfg.vocab_size)
  spec, meta = masks.MaskSpec("causal"), masks.TokenMeta.simple(_positions(2, 6))
  logits, _ = model.forward(p, cfg, tokens, meta, spec)
  hidden, _ = model.forward(p, cfg, tokens, meta, spec, return_hidden=True)
  np.testing.assert_allclose(hidden @ model.head_matrix(p, cfg), logits, rtol=1e-5, atol=1e-5)


def test_bf16_compute_is_close_to_fp32(params):
  tokens = jax.random.randint(jax.random.key(6), (2, 16), 0, TINY.vocab_size)
  ref = model.ar_forward(params, TINY, tokens)
  out = model.ar_forward(params, dataclasses.replace(TINY, dtype="bfloat16"), tokens)
  assert out.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert rel < 2e-2, rel


QWEN25_1_5B = ModelConfig(architecture="qwen2", vocab_size=151936, hidden_size=1536,
                          intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
                          head_dim=128, qkv_bias=True, tie_embeddings=True, rope_theta=1e6)
QWEN25_7B = ModelConfig(architecture="qwen2", vocab_size=152064, hidden_size=3584,
                        intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                        head_dim=128, qkv_bias=True, tie_embeddings=False, rope_theta=1e6)


@pytest.mark.parametrize("cfg,expected", [(QWEN25_1_5B, 1_543_714_304), (QWEN25_7B, 7_615_616_512)])
def test_full_size_parameter_counts_without_allocation(cfg, expected):
  shapes = jax.eval_shape(lambda r: model.init_params(cfg, r), jax.random.key(0))
  assert model.num_params(shapes) == expected
  axes = model.param_logical_axes(cfg)
  jax.tree_util.tree_map(lambda s, a: None if len(s.shape) == len(a) else pytest.fail(str(a)),
                         shapes, axes)


def test_single_row_matmul_is_a_two_row_dot():
  # A one-token decode step at batch 1 multiplies a single row; model._matmul doubles it so that
  # XLA on a GPU keeps the dot a GEMM (BENCHMARKS.md, decode profile). Same values as x @ w, and
  # every other shape (batch 1 with several tokens included) is one plain dot.
  w = jax.random.normal(jax.random.key(8), (48, 40), jnp.float32)

  def lhs_shapes(x):
    eqns = jax.make_jaxpr(model._matmul)(x, w).eqns
    return [e.invars[0].aval.shape for e in eqns if e.primitive.name == "dot_general"]

  for shape, rows in [((1, 1, 48), (2, 48)), ((1, 48), (2, 48)), ((1, 8, 48), (1, 8, 48)),
                      ((3, 1, 48), (3, 1, 48)), ((3, 48), (3, 48))]:
    x = jax.random.normal(jax.random.key(7), shape, jnp.float32)
    y = model._matmul(x, w)
    assert y.shape == shape[:-1] + (40,)
    np.testing.assert_allclose(y, x @ w, rtol=1e-6, atol=1e-6)
    assert lhs_shapes(x) == [rows], shape


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mask_rows", [None, "even", "odd", "tokens"])
def test_cache_write_puts_each_row_at_its_own_offset(batch, mask_rows):
  # A batch of one takes a plain dynamic_update_slice (no scatter, BENCHMARKS.md decode profile);
  # both paths must write the same slots and leave masked rows, or masked tokens, alone. Row 0
  # writes the last three slots.
  rng = np.random.default_rng(batch)
  layer = jnp.asarray(rng.normal(size=(batch, 16, 2, 4)), jnp.float32)
  new = jnp.asarray(rng.normal(size=(batch, 3, 2, 4)), jnp.float32)
  start = jnp.asarray([13] + list(rng.integers(0, 14, size=batch - 1)), jnp.int32)
  if mask_rows == "tokens":  # the decoder's rows at a sub-block step: some tokens of a row
    mask = jnp.asarray([[True, False, True], [False, False, False], [False, True, True]][:batch])
  else:
    mask = None if mask_rows is None else jnp.asarray(
        [(i % 2 == 0) == (mask_rows == "even") for i in range(batch)])
  out = jax.jit(kvcache.write)(layer, new, start, mask)
  want = np.array(layer)
  for i in range(batch):
    for t in range(3):
      if mask is None or bool(mask[i] if mask.ndim == 1 else mask[i, t]):
        want[i, int(start[i]) + t] = new[i, t]
  np.testing.assert_array_equal(out, want)
  jaxpr = str(jax.make_jaxpr(kvcache.write)(layer, new, start, mask))
  assert ("scatter" in jaxpr) == (batch > 1)


def test_cache_write_refuses_rows_that_do_not_match_the_cache():
  layer = jnp.zeros((1, 8, 1, 2))
  new = jnp.ones((1, 2, 1, 2))
  with pytest.raises(ValueError, match="cache has 1 rows"):
    kvcache.write(layer, new, jnp.array([3, 5, 0]))
  with pytest.raises(ValueError, match="cache has 1 rows"):
    kvcache.write(layer, new, jnp.array([3]), jnp.array([False, True]))
  with pytest.raises(ValueError, match=r"per row \[1\] or per token \[1, 2\], got shape \(1, 3\)"):
    kvcache.write(layer, new, jnp.array([3]), jnp.array([[False, True, True]]))
  # An integer mask would be taken as "nonzero: write": refused, with the way out.
  with pytest.raises(ValueError, match="mask must be bool .* got int32; compare it first"):
    kvcache.write(layer, new, jnp.array([3]), jnp.array([[0, 2]], jnp.int32))


def test_projection_refuses_an_input_of_the_wrong_trailing_shape():
  # Flattening to a 2-D matmul would otherwise accept [.., D, H] for [.., H, D] and scramble it.
  o = model.Projection(2, (TINY.num_heads, TINY.head_dim, TINY.hidden_size),
                       ("heads", "head_dim", "embed"), None, jnp.float32, jnp.float32, name="o")
  kernel = {"params": {"kernel": jnp.ones((TINY.num_heads, TINY.head_dim, TINY.hidden_size))}}
  ok = o.apply(kernel, jnp.ones((2, 3, TINY.num_heads, TINY.head_dim)))
  assert ok.shape == (2, 3, TINY.hidden_size)
  with pytest.raises(ValueError, match="must end in the kernel's input dims"):
    o.apply(kernel, jnp.ones((2, 3, TINY.head_dim, TINY.num_heads)))


def test_square_model_kernel_layout_is_ambiguous_and_not_refused():
  # With H == D == E the o kernel's [H, D, E] and [E, H, D] have one shape: the layout is read
  # off the gate kernel instead, and converted params are refused as for any model. Where that
  # is square too (M == E), the stored layout cannot be read: None, and neither config's layout
  # refused (guessing "in_out" would reject every out_in square model).
  attn_square = dataclasses.replace(TINY, hidden_size=4, num_heads=4, num_kv_heads=2, head_dim=4)
  assert attn_square.intermediate_size != 4
  p = model.init_params(attn_square, jax.random.key(0))
  assert model.stored_kernel_layout(p, attn_square) == "in_out"
  om, om_cfg = model.with_kernel_layout(p, attn_square, "out_in")
  assert model.stored_kernel_layout(om, om_cfg) == "out_in"
  with pytest.raises(ValueError, match="stored out_in but kernel_layout='in_out'"):
    model.with_kernel_layout(om, attn_square, "out_in")  # (would transpose them back)
  cfg = dataclasses.replace(attn_square, intermediate_size=4)
  p = model.init_params(cfg, jax.random.key(0))
  assert model.stored_kernel_layout(p, cfg) is None
  om, om_cfg = model.with_kernel_layout(p, cfg, "out_in")
  assert model.stored_kernel_layout(om, om_cfg) is None
  step = (jnp.zeros((1, 2), jnp.int32), masks.TokenMeta.simple(_positions(1, 2)),
          masks.MaskSpec("causal"))
  np.testing.assert_allclose(model.forward(om, om_cfg, *step)[0],
                             model.forward(p, cfg, *step)[0], rtol=1e-5, atol=1e-5)


def test_bf16_rms_norm_rounds_once_from_the_exact_value():
  # The statistics are taken in float32 whatever the compute dtype (as HF does): with unit
  # scales the bf16 output is the exact normalised value rounded once. Computing them in bf16
  # is off by bf16 rounding, which the whole-model bf16 test's 2e-2 tolerance cannot see.
  x = np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32)
  norm = model.RMSNorm(1e-6, jnp.bfloat16, jnp.float32)
  xb = jnp.asarray(x, jnp.bfloat16)
  y = norm.apply({"params": {"scale": jnp.ones(512, jnp.float32)}}, xb)
  assert y.dtype == jnp.bfloat16
  x64 = np.asarray(xb.astype(jnp.float32), np.float64)
  want = x64 / np.sqrt(np.mean(x64 * x64, -1, keepdims=True) + 1e-6)
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(jnp.asarray(want, jnp.bfloat16), np.float32))
