"""The Pallas kernels under a (data, fsdp, tensor) mesh of 8 fake CPU devices: run per device
(interpret mode) and equal the unsharded XLA reference, outputs and gradients."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dllm_jax import attention, kernels, masks, sharding


def _record_shapes(monkeypatch, name):
  """Replaces kernels.<name> with a wrapper that records the q shape each call sees."""
  seen = []
  inner = getattr(kernels, name)

  def spy(q, *args, **kwargs):
    seen.append(q.shape)
    return inner(q, *args, **kwargs)

  monkeypatch.setattr(kernels, name, spy)
  return seen


def _rand(key, shapes):
  return [jax.random.normal(k, s, jnp.float32) for k, s in zip(jax.random.split(key, len(shapes)),
                                                                shapes)]


def test_layout_kernel_runs_per_device_and_equals_reference(monkeypatch):
  spec = masks.MaskSpec("diffusion", 8, num_noisy=2)
  b, length, h, kh, d = 4, 16, 4, 2, 16
  segments = np.ones((b, length), np.int32)
  segments[1, 8:] = 2  # a packed second sample
  meta = masks.layout_meta(spec, jnp.asarray(segments))
  t = meta.positions.shape[1]
  q, k, v, ct = _rand(jax.random.key(0), [(b, t, h, d), (b, t, kh, d), (b, t, kh, d),
                                          (b, t, h, d)])
  mesh = sharding.make_mesh(2, 2, 2)
  seen = _record_shapes(monkeypatch, "block_sparse_attention")

  def out_and_grads(impl):
    def f(q, k, v):
      return attention.attend(q, k, v, spec, meta, meta, impl, contract="layout")
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct)

  # Inputs placed as the model's activations are: batch over data x fsdp, heads over tensor.
  act = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  args = [jax.device_put(x, act) for x in (q, k, v, ct)]
  run = kernels.mesh_bound(jax.jit(lambda q, k, v, ct: out_and_grads("pallas")), mesh)
  q, k, v, ct = args
  got, got_grads = run(q, k, v, ct)
  assert seen == [(b // 4, t, h // 2, d)]  # one trace, on each device's slice
  want, want_grads = out_and_grads("xla")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for name, g, w in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


def test_cache_kernel_runs_per_device_and_equals_reference(monkeypatch):
  spec = masks.MaskSpec("block_causal", 8)
  b, t, s, h, kh, d = 8, 8, 32, 4, 2, 16
  q, kc, vc = _rand(jax.random.key(1), [(b, t, h, d), (b, s, kh, d), (b, s, kh, d)])
  start = jnp.asarray([0, 8, 16, 24, 8, 0, 24, 16], jnp.int32)
  q_meta = masks.TokenMeta.simple(start[:, None] + jnp.arange(t, dtype=jnp.int32)[None])
  k_meta = masks.TokenMeta.simple(jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)))
  seen = _record_shapes(monkeypatch, "decode_attention")

  def f(impl):
    return lambda q, kc, vc: attention.attend(q, kc, vc, spec, q_meta, k_meta, impl,
                                              contract="cache")

  mesh = sharding.make_mesh(4, 1, 2)
  got = kernels.mesh_bound(jax.jit(f("pallas")), mesh)(q, kc, vc)
  assert seen == [(b // 4, t, h // 2, d)]
  np.testing.assert_allclose(got, f("xla")(q, kc, vc), rtol=1e-5, atol=1e-5)


def test_without_a_mesh_or_a_split_the_kernel_sees_whole_inputs(monkeypatch, caplog):
  spec = masks.MaskSpec("block_causal", 8)
  b, length, h, d = 3, 16, 2, 16  # 3 rows and 1 KV head: nothing splits over 2 x 2 x 2
  meta = masks.layout_meta(spec, jnp.ones((b, length), jnp.int32))
  q, k, v = _rand(jax.random.key(2), [(b, length, h, d), (b, length, 1, d), (b, length, 1, d)])
  seen = _record_shapes(monkeypatch, "block_sparse_attention")
  f = jax.jit(lambda q, k, v: attention.attend(q, k, v, spec, meta, meta, "pallas",
                                               contract="layout"))
  want = attention.attend(q, k, v, spec, meta, meta, "xla")
  np.testing.assert_allclose(f(q, k, v), want, rtol=1e-5, atol=1e-5)
  with caplog.at_level(logging.WARNING, logger="dllm_jax.kernels"):
    got = kernels.mesh_bound(f, sharding.make_mesh(2, 2, 2))(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert "neither batch 3 nor 1 KV heads split over mesh" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="dllm_jax.kernels"):
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    np.testing.assert_allclose(kernels.mesh_bound(f, one)(q, k, v), want, rtol=1e-5, atol=1e-5)
  assert seen == [(b, length, h, d)] * 3
  assert not caplog.text  # one device: nothing to split, nothing to warn about


def test_sharded_train_step_with_the_kernel_equals_xla(monkeypatch):
  import optax

  from dllm_jax import objective, training
  from dllm_jax.config import ModelConfig, TrainConfig

  # One layer, no remat: under nn.scan more layers reuse the same compiled body.
  cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=1,
                    num_heads=4, num_kv_heads=2, head_dim=16, mask_token_id=127)
  obj = objective.ObjectiveConfig(kind="diffusion", block_size=8)
  train_cfg = TrainConfig(steps=2, grad_accum=1)
  mesh = sharding.make_mesh(2, 2, 2)
  rs = np.random.RandomState(0)
  segments = np.ones((8, 32), np.int32)
  segments[:, 16:] = 2
  batch = {"tokens": rs.randint(0, 127, (8, 32)).astype(np.int32),
           "loss_mask": rs.rand(8, 32) < 0.7, "segments": segments}
  tx = optax.sgd(0.5)  # parameters then differ by lr x the gradient difference

  sh, _ = training.state_shardings(cfg, tx, mesh)
  params = jax.device_get(training.init_state(None, cfg, tx, seed=0, shardings=sh).params)

  def run(impl):
    model_cfg = dataclasses.replace(cfg, attention_impl=impl)
    state = training.init_state(params, model_cfg, tx, seed=0, shardings=sh)
    step = training.make_train_step(model_cfg, obj, train_cfg, tx, mesh, sh)
    # No mesh_bound: the step traces under sharding.activation_constraints(mesh) itself.
    state, metrics = step(state, training.shard_batch(batch, 1, mesh))
    return float(metrics["loss"]), jax.device_get(state.params)

  seen = _record_shapes(monkeypatch, "block_sparse_attention")
  loss_k, params_k = run("pallas")
  # The step's kernel calls see 3L rows of 2 per device (init traces a 1-token model first).
  assert (8 // 4, 3 * 32, 4 // 2, 16) in seen and (8, 3 * 32, 4, 16) not in seen
  loss_x, params_x = run("xla")
  np.testing.assert_allclose(loss_k, loss_x, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(params_x), jax.tree_util.tree_leaves(params_k)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
