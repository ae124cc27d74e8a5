"""`kernels.matvec` (interpret mode on CPU) against its XLA reference, and the model's one-row
decode step with it against the plain XLA path."""

import dataclasses
import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax import cache as kvcache
from dllm_jax import decoding, masks, model
from dllm_jax.config import ConfigError, ModelConfig
from dllm_jax.kernels import matvec


def _inputs(key, e, ns, dtype):
  k = jax.random.split(key, 4 + 2 * len(ns))
  x = (2 * jax.random.normal(k[0], (e,))).astype(dtype)
  add = jax.random.normal(k[1], (e,)).astype(dtype)
  scale = (1 + 0.2 * jax.random.normal(k[2], (e,))).astype(dtype)
  ws = [(e ** -0.5 * jax.random.normal(k[4 + i], (e, n))).astype(dtype) for i, n in enumerate(ns)]
  bs = [jax.random.normal(k[4 + len(ns) + i], (n,)).astype(dtype) for i, n in enumerate(ns)]
  return x, add, scale, ws, bs


def _close(got, want, dtype):
  # bf16 results: the float32 sums differ in order and 1/rms comes after them (one rounding of
  # the normalised row fewer), so at most about a rounding step apart.
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=tol, atol=tol)


@pytest.mark.parametrize("e,ns,block_n,block_k", [
    (64, (32,), 64, 128),  # one chunk, one tile
    (192, (96, 32, 32), 32, 64),  # three weights (q, k, v), tiles of each in one grid
    (576, (144, 48), 64, 128),  # SmolLM2's hidden size: 64-row chunks, 16-column tiles
    (96, (80,), 64, 32),  # 80 columns: tiles of 16
])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("mode", ["plain", "add", "norm", "add_norm_bias"])
def test_norm_matvec_equals_reference(e, ns, block_n, block_k, dtype, mode):
  x, add, scale, ws, bs = _inputs(jax.random.key(e + len(ns)), e, ns, dtype)
  kw = {"plain": {}, "add": {"add_E": add}, "norm": {"norm_scale_E": scale, "eps": 1e-5},
        "add_norm_bias": {"add_E": add, "norm_scale_E": scale, "biases_N": bs}}[mode]
  got, row = matvec.norm_matvec(x, ws, block_n=block_n, block_k=block_k, interpret=True, **kw)
  want, want_row = matvec.norm_matvec_reference(x, ws, **kw)
  assert len(got) == len(ns) and [g.shape for g in got] == [(n,) for n in ns]
  assert all(g.dtype == dtype for g in got)
  for g, w in zip(got, want):
    _close(g, w, dtype)
  if "add_E" in kw:
    np.testing.assert_array_equal(np.asarray(row, np.float32), np.asarray(want_row, np.float32))
  else:
    assert row is None


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("knobs", [dict(block_n=32, block_k=32), {}])  # {}: the defaults
def test_norm_matvec_silu_pair(dtype, knobs):
  x, add, scale, ws, _ = _inputs(jax.random.key(7), 256, (128, 128), dtype)
  kw = dict(add_E=add, norm_scale_E=scale, silu_pair=True)
  (got,), row = matvec.norm_matvec(x, ws, interpret=True, **knobs, **kw)
  (want,), want_row = matvec.norm_matvec_reference(x, ws, **kw)
  assert got.shape == (128,)
  _close(got, want, dtype)
  np.testing.assert_array_equal(np.asarray(row, np.float32), np.asarray(want_row, np.float32))


@pytest.mark.parametrize("e,n,splits,block_k", [
    (1536, 64, 4, 512),  # the 1.5B's o split four ways: 384-row runs in chunks of 128
    (1792, 96, None, 512),  # the default split
    (576, 48, 9, 512),  # SmolLM2's o: 64-row runs
    (320, 80, 5, 32),  # 16-column tiles, two chunks a run
])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_matvec_partials_sum_to_the_product(e, n, splits, block_k, dtype):
  x, _, _, (w,), _ = _inputs(jax.random.key(e), e, (n,), dtype)
  parts = matvec.matvec_partials(x, w, splits=splits, block_k=block_k, interpret=True)
  s = splits or matvec.pick_splits(e, n, block_k=block_k)
  assert parts.shape == (s, n) and parts.dtype == jnp.float32
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  np.testing.assert_allclose(np.asarray(parts, np.float64).sum(0), want, rtol=1e-5, atol=1e-5)
  # Each part is its run of the row alone, not the whole product over S.
  run = e // s
  np.testing.assert_allclose(parts[1], np.asarray(x[run:2 * run], np.float64)
                             @ np.asarray(w[run:2 * run], np.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_out_major_weights_give_the_row_major_products(dtype):
  # The same tiles, chunks and sums on a weight stored [N, E] (a Linear's layout): every launch
  # equals its row-major self on the transpose. Shapes with several chunks, tiles and splits.
  x, add, scale, ws, bs = _inputs(jax.random.key(11), 192, (96, 32, 32), dtype)
  om = [w.T for w in ws]
  parts5 = jax.random.normal(jax.random.key(12), (5, 192))
  # (The float32 sums inside a tile's product may be ordered differently: one bf16 step.)
  eq = lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-5,
      rtol=8e-3 if a.dtype == jnp.bfloat16 else 1e-5)
  f = functools.partial(matvec.norm_matvec, block_n=32, block_k=64, interpret=True)
  for kw in (dict(add_E=parts5, norm_scale_E=scale, biases_N=bs), dict(add_E=add)):
    (g, r), (w, wr) = f(x, om, out_major=True, **kw), f(x, ws, **kw)
    jax.tree_util.tree_map(eq, (g, r), (w, wr))
  pair = [ws[1], ws[2]]
  kw = dict(add_E=add, norm_scale_E=scale, silu_pair=True)
  jax.tree_util.tree_map(eq, f(x, [w.T for w in pair], out_major=True, **kw), f(x, pair, **kw))
  f = functools.partial(matvec.norm_matvec_partials, norm_scale_E=scale, add_E=parts5,
                        splits=3, block_k=32, interpret=True)
  jax.tree_util.tree_map(eq, f(x, om, out_major=True), f(x, ws))
  f = functools.partial(matvec.matvec_partials, splits=3, block_k=32, interpret=True)
  eq(f(x, om[0], out_major=True), f(x, ws[0]))
  parts, lse = jax.random.normal(jax.random.key(13), (2, 3, 64)), jnp.zeros((2, 3))
  f = functools.partial(matvec.combined_matvec_partials, dtype=dtype, splits=2, block_k=32,
                        interpret=True)
  eq(f(parts, lse, om[0], out_major=True), f(parts, lse, ws[0]))


def test_out_major_weights_are_checked_as_out_major():
  x, _, scale, (w,), _ = _inputs(jax.random.key(0), 64, (32,), jnp.float32)
  for call in (lambda: matvec.norm_matvec(x, [w], out_major=True, interpret=True),
               lambda: matvec.matvec_partials(x, w, out_major=True, interpret=True),
               lambda: matvec.norm_matvec_partials(x, [w], norm_scale_E=scale, out_major=True,
                                                   interpret=True)):
    with pytest.raises(ValueError, match=r"\[N, E\] \(out_major\)"):
      call()
  with pytest.raises(ValueError, match="64 columns are not the parts' 2 heads x 16"):
    matvec.combined_matvec_partials(jnp.zeros((1, 2, 16)), jnp.zeros((1, 2)), w.T,
                                    dtype=jnp.float32, out_major=True, interpret=True)


def test_default_knobs_widen_a_large_gate_up_pair(monkeypatch):
  from dllm_jax.kernels import decode as decode_kernel

  monkeypatch.setattr(decode_kernel, "sm_count", lambda: 132)  # an H100's or H200's
  assert matvec.default_knobs([8960, 8960], True) == {"block_n": 32, "block_k": 256,
                                                       "num_stages": 3}  # 1.5B: 280 tiles
  assert matvec.default_knobs([18944, 18944], True) == {"block_n": 64, "block_k": 256,
                                                         "num_stages": 2}  # 7B: 592 tiles
  assert matvec.default_knobs([18944, 512, 512], False)["block_n"] == 32  # q/k/v stay narrow


def test_pick_splits_fills_one_wave():
  assert matvec.pick_splits(1536, 1536, programs=264) == 4  # 48 tiles: 192 programs
  assert matvec.pick_splits(8960, 1536, programs=264) == 5  # 1.5B down: 240
  assert matvec.pick_splits(18944, 3584, programs=264) == 2  # 7B down: 224
  assert matvec.pick_splits(576, 576, programs=264) == 9  # SmolLM2 o: 64-row runs
  assert matvec.pick_splits(64, 8192, programs=264) == 1  # the columns alone fill it


@pytest.mark.parametrize("mode", ["add", "add_norm_bias"])
def test_norm_matvec_adds_partial_sums(mode):
  dtype = jnp.bfloat16
  x, _, scale, ws, bs = _inputs(jax.random.key(3), 192, (96, 32), dtype)
  parts = jax.random.normal(jax.random.key(4), (5, 192))
  kw = {"add_E": parts}
  if mode == "add_norm_bias":
    kw.update(norm_scale_E=scale, biases_N=bs)
  got, row = matvec.norm_matvec(x, ws, block_k=64, interpret=True, **kw)
  want, want_row = matvec.norm_matvec_reference(x, ws, **kw)
  for g, w in zip(got, want):
    _close(g, w, dtype)
  # The row is x + (the parts' sum rounded to bf16), rounded: exactly what the model adds.
  np.testing.assert_array_equal(np.asarray(row, np.float32),
                                np.asarray(x + parts.sum(0).astype(dtype), np.float32))


def test_matvec_partials_refuses_bad_inputs():
  x, _, _, (w,), _ = _inputs(jax.random.key(0), 64, (32,), jnp.float32)
  with pytest.raises(ValueError, match=r"weight \[E, N\]"):
    matvec.matvec_partials(x, w[:32], interpret=True)
  with pytest.raises(ValueError, match="splits=3 does not divide the row length 64"):
    matvec.matvec_partials(x, w, splits=3, interpret=True)
  with pytest.raises(ValueError, match="8 splits of the row: row length 8"):
    matvec.matvec_partials(x, w, splits=8, interpret=True)
  with pytest.raises(ValueError, match=r"or partial sums \[S, 64\]"):
    matvec.norm_matvec(x, [w], add_E=jnp.zeros((2, 32)), interpret=True)
  for kw, msg in ((dict(block_n=8), "block_n=8 must be an integer >= 16"),
                  (dict(splits=2.0), "splits=2.0 must be"), (dict(splits=True), "splits=True"),
                  (dict(num_stages=0), "num_stages=0 must be an integer >= 1")):
    with pytest.raises(ValueError, match=msg):
      matvec.matvec_partials(x, w, interpret=True, **kw)
  with pytest.raises(ValueError, match="block_k=8 must be an integer >= 16"):
    matvec.norm_matvec(x, [w], block_k=8, interpret=True)
  with pytest.raises(ValueError, match="no rows or no columns"):
    matvec.pick_splits(0, 32)
  with pytest.raises(ValueError, match="weight column counts expected"):
    matvec.default_knobs([], True)


@pytest.mark.parametrize("add", ["parts", "row", None])
@pytest.mark.parametrize("splits", [3, None])  # None: pick_splits
def test_norm_matvec_partials_finish_to_the_reference(add, splits):
  # q/k/v as the model runs them: three weights, the row's norm, the previous down's parts.
  dtype = jnp.bfloat16
  x, add_row, scale, ws, bs = _inputs(jax.random.key(5), 192, (96, 32, 32), dtype)
  add_E = {"parts": jax.random.normal(jax.random.key(6), (5, 192)), "row": add_row,
           None: None}[add]
  parts, rsqrt, row = matvec.norm_matvec_partials(x, ws, norm_scale_E=scale, add_E=add_E,
                                                  eps=1e-5, splits=splits, block_k=32,
                                                  interpret=True)
  s = splits or matvec.pick_splits(192, 160, 32, 32)
  assert [p.shape for p in parts] == [(s, n) for n in (96, 32, 32)] and rsqrt.shape == (16,)
  want, want_row = matvec.norm_matvec_reference(x, ws, add_E=add_E, norm_scale_E=scale,
                                                eps=1e-5, biases_N=bs)
  for p, b, w in zip(parts, bs, want):
    _close(matvec.finish_partials(p, rsqrt, dtype, b), w, dtype)
  if add is None:
    assert row is None
  else:
    np.testing.assert_array_equal(np.asarray(row, np.float32), np.asarray(want_row, np.float32))
  r = np.asarray(want_row if add else x, np.float32)
  np.testing.assert_allclose(rsqrt, 1 / np.sqrt(np.mean(r * r) + 1e-5), rtol=1e-5)


def test_norm_matvec_partials_refuses_bad_inputs():
  x, _, scale, ws, _ = _inputs(jax.random.key(0), 64, (32, 32), jnp.bfloat16)
  f = functools.partial(matvec.norm_matvec_partials, interpret=True)
  with pytest.raises(ValueError, match=r"weights \[E, N\]"):
    f(x, [ws[0][:32]], norm_scale_E=scale)
  with pytest.raises(ValueError, match="norm_scale_E has shape"):
    f(x, ws, norm_scale_E=scale[:32])
  with pytest.raises(ValueError, match=r"add_E has shape \(32,\)"):
    f(x, ws, norm_scale_E=scale, add_E=x[:32])
  with pytest.raises(ValueError, match="splits=3 does not divide the row length 64"):
    f(x, ws, norm_scale_E=scale, splits=3)
  with pytest.raises(ValueError, match="8 splits of the row: row length 8"):
    f(x, ws, norm_scale_E=scale, splits=8)
  with pytest.raises(ValueError, match="columns 24"):
    f(x, [ws[0][:, :24]], norm_scale_E=scale)


def test_norm_matvec_refuses_bad_inputs():
  x, _, _, ws, bs = _inputs(jax.random.key(0), 64, (32, 32), jnp.float32)
  with pytest.raises(ValueError, match=r"weights \[E, N\]"):
    matvec.norm_matvec(x, [ws[0].T[:, :16]], interpret=True)
  with pytest.raises(ValueError, match="columns 24"):
    matvec.norm_matvec(x, [ws[0][:, :24]], interpret=True)
  with pytest.raises(ValueError, match="row length 40"):
    matvec.norm_matvec(x[:40], [ws[0][:40]], interpret=True)
  with pytest.raises(ValueError, match="silu_pair"):
    matvec.norm_matvec(x, ws[:1], silu_pair=True, interpret=True)
  with pytest.raises(ValueError, match="biases"):
    matvec.norm_matvec(x, ws, biases_N=bs[:1], interpret=True)
  with pytest.raises(ValueError, match=r"add_E has shape \(32,\), the row \(64,\)"):
    matvec.norm_matvec(x, ws, add_E=x[:32], interpret=True)
  with pytest.raises(ValueError, match="norm_scale_E has shape"):
    matvec.norm_matvec(x, ws, norm_scale_E=x[None], interpret=True)
  with pytest.raises(ValueError, match="at least one weight"):
    matvec.norm_matvec(x, [], interpret=True)
  with pytest.raises(ValueError, match="a row"):
    matvec.norm_matvec(x[0], ws, interpret=True)


def test_norm_matvec_lowers_for_cuda(lower_for_cuda):
  # The interpreter never lowers the kernel through Triton; this does, on the CPU.
  x, add, scale, ws, bs = _inputs(jax.random.key(1), 192, (96, 32, 32), jnp.bfloat16)
  f = lambda x, a, s, ws, bs: matvec.norm_matvec(x, ws, add_E=a, norm_scale_E=s, biases_N=bs)
  g = lambda x, a, s, ws: matvec.norm_matvec(x, ws[:2], add_E=a, norm_scale_E=s, silu_pair=True)
  h = lambda x, ws: matvec.matvec_partials(x, ws[0], splits=3)
  n = lambda x, a, s, ws: matvec.norm_matvec_partials(x, ws, norm_scale_E=s, add_E=a, splits=3)
  parts = jnp.zeros((5, 192), jnp.float32)  # partial sums as the add: one load per part
  for fn, args in ((f, (x, add, scale, ws, bs)), (g, (x, add, scale, [ws[1], ws[2]])),
                   (h, (x, ws)), (f, (x, parts, scale, ws, bs)), (n, (x, parts, scale, ws))):
    text = lower_for_cuda(fn, *args)
    assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 1


CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, dtype="bfloat16",
                  param_dtype="float32", matvec_impl="xla")


def _perturbed(cfg, key):
  """Random params with norm scales away from 1 and nonzero biases, so that a scale or bias
  applied wrongly (or not at all) shows."""
  params = model.init_params(cfg, key)

  def perturb(path, x):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return x * (1 + 0.5 * jnp.sin(jnp.arange(x.shape[-1]) + 1.0))
    if "bias" in name:
      return 0.5 * jnp.cos(jnp.arange(x.size) * 0.37).reshape(x.shape)
    return x
  return jax.tree_util.tree_map_with_path(perturb, params)


def check_one_row_step(cfg, stacked, spec, slots=32, prefill=12):
  """One decode step of the token after a `prefill`-token prefill into a cache of `slots`, by
  the XLA path (cfg) and the one-row kernels (cfg with matvec_impl="pallas"): their logits and
  caches agree. Returns the kernels' step as a jaxpr string, and how many layers it spells out
  (the scan's body holds one)."""
  params = model.with_layout(_perturbed(cfg, jax.random.key(0)),
                             "stacked" if stacked else "per_layer")
  pallas = dataclasses.replace(cfg, matvec_impl="pallas")
  tokens = jax.random.randint(jax.random.key(1), (1, prefill + 1), 0, cfg.vocab_size)
  pos = lambda s, n: masks.TokenMeta.simple(jnp.arange(s, s + n, dtype=jnp.int32)[None])
  fwd = jax.jit(model.forward, static_argnums=(1, 4))
  cache = kvcache.init_cache(cfg, 1, slots, per_layer=not stacked)
  _, cache = fwd(params, cfg, tokens[:, :prefill], pos(0, prefill), spec, cache)
  step = (tokens[:, prefill:], pos(prefill, 1), spec, cache)
  want, want_cache = fwd(params, cfg, *step)
  got, got_cache = fwd(params, pallas, *step)
  # bf16 steps that differ in the order of float32 sums and where 1/rms applies: about one
  # rounding apart (a dropped norm scale moved these logits by 2e-2, a dropped bias by more).
  np.testing.assert_allclose(got, want, rtol=5e-3, atol=5e-3)
  assert np.corrcoef(np.ravel(got), np.ravel(want))[0, 1] > 0.9999
  for g, w in zip(jax.tree_util.tree_leaves(got_cache), jax.tree_util.tree_leaves(want_cache)):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=5e-3, atol=5e-3)
  jaxpr = str(jax.make_jaxpr(model.forward, static_argnums=(1, 4))(params, pallas, *step))
  return jaxpr, 1 if stacked else cfg.num_layers


@pytest.mark.parametrize("stacked,qkv_bias,kernel_layout", [
    (True, True, "in_out"), (False, True, "in_out"), (False, False, "in_out"),
    (False, True, "out_in"), (True, False, "out_in")])  # out_in: each launch reads [N, K]
def test_model_one_row_step_with_kernels_equals_xla(stacked, qkv_bias, kernel_layout):
  cfg = dataclasses.replace(CFG, qkv_bias=qkv_bias, kernel_layout=kernel_layout)
  jaxpr, layers = check_one_row_step(cfg, stacked, masks.MaskSpec("causal"))
  # Four kernel launches a layer.
  assert jaxpr.count("name=norm_partials") == layers  # q/k/v
  assert jaxpr.count("name=norm_matvec") == layers  # gate/up
  assert jaxpr.count("name=matvec_partials") == 2 * layers  # o, down


def test_stacked_carry_takes_the_down_launch_shape(monkeypatch):
  # The scan's zeros are shaped as the down launch makes its parts, knobs and all.
  monkeypatch.setattr(matvec, "matvec_partials",
                      functools.partial(matvec.matvec_partials, splits=2))
  params = _perturbed(CFG, jax.random.key(0))
  pallas = dataclasses.replace(CFG, matvec_impl="pallas")
  spec = masks.MaskSpec("causal")
  cache = kvcache.init_cache(CFG, 1, 16)
  meta = masks.TokenMeta.simple(jnp.full((1, 1), 3, jnp.int32))
  tokens = jnp.ones((1, 1), jnp.int32)
  got, _ = model.forward(params, pallas, tokens, meta, spec, cache)
  want, _ = model.forward(params, CFG, tokens, meta, spec, cache)
  np.testing.assert_allclose(got, want, rtol=5e-3, atol=5e-3)


def test_ar_generation_with_kernels_matches_xla():
  params = model.with_layout(model.init_params(CFG, jax.random.key(2)), "per_layer")
  prompt = jax.random.randint(jax.random.key(3), (1, 8), 0, CFG.vocab_size)
  dcfg = decoding.DecodeConfig(mode="ar", max_new_tokens=12)
  run = lambda cfg: decoding.generate(params, cfg, prompt, jnp.asarray([8]), jax.random.key(4),
                                      dcfg)
  pallas = dataclasses.replace(CFG, matvec_impl="pallas")
  want = run(CFG)
  got = run(pallas)
  jaxpr = str(jax.make_jaxpr(lambda p: decoding.generate(p, pallas, prompt, jnp.asarray([8]),
                                                         jax.random.key(4), dcfg))(params))
  assert "name=norm_matvec" in jaxpr
  # Greedy tokens of a random model can flip on a near tie; all but a late one must agree.
  agree = np.cumprod(np.asarray(got[0]) == np.asarray(want[0]), axis=-1).sum()
  assert agree >= 8, (got[0], want[0])


def test_matvec_impl_is_validated():
  with pytest.raises(ConfigError, match="matvec_impl"):
    ModelConfig(matvec_impl="triton")
  cfg = dataclasses.replace(CFG, hidden_size=40, num_heads=2, num_kv_heads=1, head_dim=20,
                            matvec_impl="pallas")
  params = model.init_params(cfg, jax.random.key(0))
  cache = kvcache.init_cache(cfg, 1, 16)
  meta = masks.TokenMeta.simple(jnp.zeros((1, 1), jnp.int32))
  with pytest.raises(ValueError, match="matvec_impl='pallas'.*row length 40.*use 'xla'"):
    model.forward(params, cfg, jnp.zeros((1, 1), jnp.int32), meta, masks.MaskSpec("causal"),
                  cache)
  # "xla" and "auto" (the default) run the same model.
  for impl in ("xla", "auto"):
    model.forward(params, dataclasses.replace(cfg, matvec_impl=impl),
                  jnp.zeros((1, 1), jnp.int32), meta, masks.MaskSpec("causal"), cache)


def test_auto_matvec_picks_the_kernel_only_where_it_was_measured_to_pay(monkeypatch):
  bf16 = dataclasses.replace(CFG, matvec_impl="auto", param_dtype="bfloat16")
  assert not model._row_kernels(bf16, stacked=False)  # on this CPU: XLA
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  from dllm_jax.kernels import flash_mgpu

  monkeypatch.setattr(flash_mgpu, "on_hopper", lambda: False)
  assert not model._row_kernels(bf16, stacked=False)  # tiles sized for a Hopper's memory
  monkeypatch.setattr(flash_mgpu, "on_hopper", lambda: True)
  assert model._row_kernels(bf16, stacked=False)
  assert not model._row_kernels(bf16, stacked=True)  # a slice of the stack would be copied
  assert not model._row_kernels(dataclasses.replace(bf16, param_dtype="float32"), stacked=False)
  f16 = dataclasses.replace(bf16, dtype="float16", param_dtype="float16")
  assert not model._row_kernels(f16, stacked=False)  # measured with bf16 only
  assert not model._row_kernels(dataclasses.replace(bf16, intermediate_size=72), stacked=False)
  # A 7B-like gate/up (wide tiles) was only level with XLA.
  assert not model._row_kernels(dataclasses.replace(bf16, intermediate_size=18944), stacked=False)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
  with jax.set_mesh(mesh):
    assert not model._row_kernels(bf16, stacked=False)  # no warning either: auto means XLA here
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert not model._row_kernels(bf16, stacked=False)  # where "pallas" is an error
  assert ModelConfig().matvec_impl == "auto"


def test_pallas_matvec_is_refused_on_a_tpu(monkeypatch):
  cfg = dataclasses.replace(CFG, matvec_impl="pallas")
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(ValueError, match="matvec_impl='pallas' runs a Triton kernel.*'tpu'"):
    model._row_kernels(cfg, stacked=False)


def test_pallas_matvec_on_a_mesh_falls_back_to_xla(caplog):
  # A mesh of one device: nothing is sharded and the kernel runs.
  params = model.with_layout(model.init_params(CFG, jax.random.key(0)), "per_layer")
  cfg = dataclasses.replace(CFG, matvec_impl="pallas")
  tokens = jnp.zeros((1, 1), jnp.int32)
  meta = masks.TokenMeta.simple(jnp.zeros((1, 1), jnp.int32))
  cache = kvcache.init_cache(CFG, 1, 16, per_layer=True)
  fwd = lambda: model.forward(params, cfg, tokens, meta, masks.MaskSpec("causal"), cache)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  with jax.set_mesh(mesh):
    assert "name=norm_matvec" in str(jax.make_jaxpr(fwd)())
  assert len(jax.devices()) >= 2  # conftest.py asks XLA for 8 CPU devices
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
  model._warn_once.cache_clear()
  with caplog.at_level("WARNING", logger="dllm_jax.model"), jax.set_mesh(mesh):
    assert "norm_matvec" not in str(jax.make_jaxpr(fwd)())
  assert any("ignored on device mesh" in r.message for r in caplog.records)


def test_benchmark_knob_specs(load_benchmark):
  bench = load_benchmark("matvec")
  assert bench.parse_knobs("default;block_n=64,num_stages=2") == [
      {}, {"block_n": 64, "num_stages": 2}]
  with pytest.raises(SystemExit, match=r"unknown \['blockn'\]"):
    bench.parse_knobs("blockn=64")
  with pytest.raises(SystemExit, match="not an integer"):
    bench.parse_knobs("block_n=big")
  with pytest.raises(SystemExit, match="KNOB=INT"):
    bench.parse_knobs("block_n")
  with pytest.raises(SystemExit, match=r"unknown \['splits'\]"):
    bench.parse_knobs("splits=2")
  assert bench.parse_knobs("splits=2", "--partial-knobs", bench.PARTIAL_KNOBS) == [
      {"splits": 2}]

  # The benchmark's check of the kernel against XLA passes for the kernel and fails for a wrong one.
  bench.LAYERS = 1
  w = bench._weights(CFG, jax.random.key(0))
  row = lambda op: jax.random.normal(jax.random.key(1), (bench._row_len(CFG, op),), jnp.bfloat16)
  for op in ("qkv", "gate_up", "o", "down"):
    assert bench.check(op, {}, CFG, row(op), w)["check_ok"]
  def broken(*a, **k):
    outs, row = matvec.norm_matvec(*a, **k)
    return tuple(1.1 * y for y in outs), row

  bench.matvec = types.SimpleNamespace(
      norm_matvec=broken, norm_matvec_reference=matvec.norm_matvec_reference,
      matvec_partials=lambda *a, **k: 1.1 * matvec.matvec_partials(*a, **k))
  for op in ("qkv", "down"):
    result = bench.check(op, {}, CFG, row(op), w)
    assert not result["check_ok"] and result["check_max_rel_err"] > 0.05


def test_xla_gemm_config_reads_the_tiling_off_the_hlo(load_benchmark):
  bench = load_benchmark("xla_gemm_config")
  # A line of the H200's optimised HLO of the 1.5B step (session 18), shortened.
  hlo = ('  %gemm_fusion_dot.6 = bf16[1,17920]{1,0} fusion(bf16[1,1536]{1,0} %p, '
         'bf16[1536,17920]{1,0} %w), kind=kCustom, calls=%c, backend_config={"fusion_backend_'
         'config":{"kind":"__triton_nested_gemm_fusion","block_level_fusion_config":{"num_warps":'
         '"4","output_tiles":[{"sizes":["8","128"]}],"num_stages":3,"is_tma_allowed":true}}}\n'
         '  %add.1 = f32[4]{0} add(f32[4]{0} %a, f32[4]{0} %b)\n'
         # Not a GEMM, though its name and config say triton: left out.
         '  %triton_softmax.2 = bf16[1,64]{1,0} fusion(bf16[1,64]{1,0} %s), kind=kCustom, '
         'calls=%d, backend_config={"fusion_backend_config":{"kind":"__triton","block_level_'
         'fusion_config":{"num_warps":"1"}}}\n'
         # A cuBLAS call is one.
         '  %cublas-gemm.3 = (f32[8,8]{1,0}, s8[0]{0}) custom-call(f32[8,8]{1,0} %x, f32[8,8]{1,0} '
         '%y), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":'
         '{"alpha_real":1}}')
  g, c = bench.gemms(hlo)
  assert c["name"] == "%cublas-gemm.3" and "gemm_backend_config" in c["backend_config"]
  assert g["name"] == "%gemm_fusion_dot.6" and g["shapes"][0] == "bf16[1,17920]"
  assert bench.summary(g["backend_config"]) == (
      "__triton_nested_gemm_fusion {'num_stages': 3, 'num_warps': '4', 'is_tma_allowed': True} "
      "tiles [['8', '128']]")


def test_matvec_mgpu_probe_arguments(load_benchmark):
  bench = load_benchmark("matvec_mgpu_probe")
  assert bench.parse_tiles("64,64,4; 128,128,6") == [(64, 64, 4), (128, 128, 6)]
  for bad in ("64,64", "64,x,4", "0,64,4", "", "32,128,6"):
    with pytest.raises(SystemExit, match="--tiles"):
      bench.parse_tiles(bad)
  cfg = bench.SHAPES["qwen2.5-1.5b"]
  assert bench.weight_shape(cfg, "gate_up") == (1536, 2 * 8960)
  assert bench.weight_shape(cfg, "down") == (8960, 1536)


def test_matvec_layout_benchmark_kernel_reads_every_layout(load_benchmark):
  # The layout benchmark's product must be the same product on the row-major, the pre-tiled and
  # the transposed weight, or its timings compare different work.
  bench = load_benchmark("matvec_layout")
  x = jax.random.normal(jax.random.key(0), (256,), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (256, 96), jnp.bfloat16)
  assert bench.relayout(w, "tiled", 32).shape == (3, 256, 32)
  assert bench.relayout(w, "transposed", 32).shape == (96, 256)
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  for layout in bench.LAYOUTS:
    got = bench.matvec(x, bench.relayout(w, layout, 32), layout=layout, bn=32, bk=64,
                       stages=2, warps=4, interpret=True)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-2, atol=0.3)
  with pytest.raises(ValueError, match="layout 'columns'"):
    bench.matvec(x, w, layout="columns", bn=32, bk=64, stages=2, warps=4, interpret=True)


def test_kernel_us_sums_each_kernel_per_call(load_benchmark, monkeypatch):
  # The one-row benchmarks' figure: GPU us a call per kernel name, from the profile's events.
  common = load_benchmark("common")
  events = [("norm_matvec", 0, 4000), ("gemm_fusion_dot", 5000, 6000),
            ("norm_matvec", 7000, 9000), ("MemcpyD2D", 9000, 9500)]
  monkeypatch.setattr(common, "traced_gpu_events", lambda run: (run() or events, {}))
  assert common.kernel_us(lambda: None, calls=2, width=4) == {"norm": 3.0, "gemm": 0.5,
                                                             "Memc": 0.25}
  assert common.error_text(ValueError("first\nsecond")) == "ValueError: first"
  assert common.error_text(ValueError("first"), limit=3) == "ValueError: fir"
  assert common.error_text(KeyboardInterrupt()) == "KeyboardInterrupt: "  # no message, no crash
  per = {"gemm_fusion": 2.0, "MemcpyD2D": 1.0, "layout_matvec": 3.0}
  assert common.product_us(per, "gemm", "layout_matvec") == 5.0  # the copy counted apart
  with pytest.raises(ValueError, match="no kernel named like"):
    common.product_us({"nvjet_sm90": 4.0}, "gemm")


def test_decode_kernel_layout_is_out_in_only_where_the_one_row_kernels_run():
  # out_in pays in the one-row kernels; XLA's GEMMs of a block's or a batch's rows read in_out
  # faster (BENCHMARKS.md session 24).
  pallas = dataclasses.replace(CFG, matvec_impl="pallas")  # (interpreted on the CPU)
  layout = lambda cfg, **kw: model.decode_kernel_layout(
      cfg, **{"mode": "ar", "batch": 1, "stacked": False, **kw})
  assert layout(pallas) == "out_in"
  assert layout(pallas, mode="diffusion") == "in_out"
  assert layout(pallas, batch=2) == "in_out"
  assert layout(dataclasses.replace(CFG, matvec_impl="xla")) == "in_out"
  assert layout(dataclasses.replace(CFG, matvec_impl="auto")) == "in_out"  # (CPU: XLA)
