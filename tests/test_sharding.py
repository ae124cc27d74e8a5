"""Mesh and NamedShardings from the logical table, and sharded training on 8 fake CPU devices
matching single-device training step for step."""

import dataclasses
import logging

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from dllm_jax import model, objective, sharding, training
from dllm_jax.config import ConfigError, ModelConfig, TrainConfig

# (in_out: its tests convert from it to the default out_in.)
TINY = ModelConfig(vocab_size=130, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, mask_token_id=129,
                   kernel_layout="in_out")


def test_mesh_auto_axis_and_errors():
  assert jax.device_count() == 8
  assert dict(sharding.make_mesh(-1, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh(1, -1, 1).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(ValueError, match="do not divide the 8 devices"):
    sharding.make_mesh(-1, 3, 1)
  with pytest.raises(ValueError, match="use 4 devices but 8 are present"):
    sharding.make_mesh(2, 2, 1)


def _param_specs(cfg, mesh):
  shapes = training.abstract_params(cfg)
  sh = sharding.shardings_for(model.param_logical_axes(cfg), shapes, mesh)
  return jax.tree_util.tree_map(lambda s: s.spec, sh)


def test_param_shardings_follow_the_logical_table():
  cfg = dataclasses.replace(TINY, vocab_size=128, mask_token_id=127)
  specs = _param_specs(cfg, sharding.make_mesh(2, 2, 2))
  assert specs["embed"]["embedding"] == P("tensor", "fsdp")
  assert specs["lm_head"] == P("fsdp", "tensor")
  assert specs["layers"]["attn"]["q"]["kernel"] == P(None, "fsdp", "tensor", None)
  assert specs["layers"]["attn"]["o"]["kernel"] == P(None, "tensor", None, "fsdp")
  assert specs["layers"]["mlp"]["down"]["kernel"] == P(None, "tensor", "fsdp")
  # (k and v have their own logical axis, kv_heads: its rule mapped to None, replicating them
  # on every tensor device, passed while only q was checked.)
  for name in ("k", "v"):
    assert specs["layers"]["attn"][name]["kernel"] == P(None, "fsdp", "tensor", None)
  for name in ("gate", "up"):
    assert specs["layers"]["mlp"][name]["kernel"] == P(None, "fsdp", "tensor")
  assert specs["final_norm"]["scale"] == P(None)
  for name in ("attn_norm", "mlp_norm"):
    assert specs["layers"][name]["scale"] == P(None, None)
  # Kernels stored [*out, *in]: the same mesh axes, following their logical names.
  om = _param_specs(dataclasses.replace(cfg, kernel_layout="out_in"), sharding.make_mesh(2, 2, 2))
  assert om["layers"]["attn"]["q"]["kernel"] == P(None, "tensor", None, "fsdp")
  assert om["layers"]["attn"]["o"]["kernel"] == P(None, "fsdp", "tensor", None)
  assert om["layers"]["mlp"]["down"]["kernel"] == P(None, "fsdp", "tensor")


def test_every_logical_axis_of_the_params_has_a_rule():
  # flax maps a logical name the rules lack to None: a parameter axis named outside the table (a
  # typo, a rule dropped) would be replicated on every device without a word. Dropping the
  # head_dim rule, say, changes nothing today only because that rule is None.
  named = {name for name, _ in sharding.PARAM_RULES}
  qwen2 = dataclasses.replace(TINY, architecture="qwen2", qkv_bias=True)
  for cfg in (TINY, qwen2, dataclasses.replace(TINY, tie_embeddings=True)):
    for layout in ("in_out", "out_in"):
      specs = model.param_logical_axes(dataclasses.replace(cfg, kernel_layout=layout))
      used = {a for spec in jax.tree_util.tree_leaves(
          specs, is_leaf=lambda x: isinstance(x, P)) for a in spec if a is not None}
      assert used and used <= named, (cfg.architecture, layout, used - named)


def test_a_logical_axis_outside_the_table_is_an_error_naming_it():
  # flax alone would replicate the misspelled axis on every device and say nothing.
  specs = {"w": P("embd", sharding.MLP), "b": P(sharding.MLP)}
  shapes = {"w": jax.ShapeDtypeStruct((8, 16), np.float32),
            "b": jax.ShapeDtypeStruct((16,), np.float32)}
  with pytest.raises(ValueError, match=r"\['w'\] names the logical axis 'embd'"):
    sharding.shardings_for(specs, shapes, sharding.make_mesh(2, 2, 2))
  ok = sharding.shardings_for(dict(specs, w=P(sharding.EMBED, sharding.MLP)), shapes,
                              sharding.make_mesh(2, 2, 2))
  assert ok["w"].spec == P("fsdp", "tensor")


def test_indivisible_dim_falls_back_to_replicated_and_is_logged(caplog):
  cfg = dataclasses.replace(TINY, vocab_size=131, mask_token_id=130)  # 130 tokens + a mask
  with caplog.at_level(logging.INFO, logger="dllm_jax.sharding"):
    specs = _param_specs(cfg, sharding.make_mesh(2, 2, 2))
  assert specs["embed"]["embedding"] == P(None, "fsdp")  # vocab dim replicated, embed kept
  assert specs["lm_head"] == P("fsdp", None)
  assert "['embed']['embedding'] dim 0 (size 131) is not divisible by mesh tensor=2" in caplog.text


def test_optimizer_moments_follow_their_params():
  mesh = sharding.make_mesh(2, 2, 2)
  tx = training.make_optimizer(TrainConfig())
  sh, _ = training.state_shardings(TINY, tx, mesh)
  adam = sh.opt_state[1][0]
  assert adam.mu["layers"]["mlp"]["up"]["kernel"] == sh.params["layers"]["mlp"]["up"]["kernel"]
  assert adam.nu["embed"]["embedding"] == sh.params["embed"]["embedding"]
  assert adam.count.spec == P() and sh.step.spec == P() and sh.rng.spec == P()


def test_batch_must_split_over_accumulation_and_batch_shards():
  mesh = sharding.make_mesh(2, 2, 2)
  assert training.check_batch_size(16, 2, mesh) == 8
  with pytest.raises(ConfigError, match="multiple of 8"):
    training.check_batch_size(12, 2, mesh)


def _batches(n, rows=8, length=32, seed=0):
  rs = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    segments = np.ones((rows, length), np.int32)
    segments[:, 16:] = 2
    segments[0, 24:] = 0  # padding at the end of a row
    out.append({"tokens": rs.randint(0, 128, (rows, length)).astype(np.int32),
                "loss_mask": rs.rand(rows, length) < 0.7, "segments": segments})
  return out


def _train(mesh, obj_cfg, train_cfg, batches, tx=None, params=None, cfg=TINY):
  tx = tx or training.make_optimizer(train_cfg)
  sh, _ = training.state_shardings(cfg, tx, mesh)
  state = training.init_state(params, cfg, tx, seed=0, shardings=sh)
  step = training.make_train_step(cfg, obj_cfg, train_cfg, tx, mesh, sh)
  losses = []
  for b in batches:
    state, metrics = step(state, training.shard_batch(b, train_cfg.grad_accum, mesh))
    losses.append(float(metrics["loss"]))
  return np.asarray(losses), jax.device_get(state.params), state


def test_sharded_training_matches_single_device(capfd):
  obj = objective.ObjectiveConfig(kind="diffusion", block_size=8)
  cfg = TrainConfig(steps=4, grad_accum=2, learning_rate=1e-3, warmup_ratio=0.0)
  batches = _batches(4)
  single = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  losses_1, params_1, _ = _train(single, obj, cfg, batches)
  losses_8, params_8, state_8 = _train(sharding.make_mesh(2, 2, 2), obj, cfg, batches)
  # The sharded state really is spread over the 8 devices.
  q = state_8.params["layers"]["attn"]["q"]["kernel"]
  assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape[1] == 16
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-6)
  assert losses_1[-1] < losses_1[0]
  # data > 1 with fsdp > 1: the embedding lookup used to make XLA replicate its [B, T, E]
  # output on every device (it says so on stderr)
  assert "Involuntary full rematerialization" not in capfd.readouterr().err
  for a, b in zip(jax.tree_util.tree_leaves(params_1), jax.tree_util.tree_leaves(params_8)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_sharded_training_with_out_in_kernels_matches_in_out():
  # The same model stored [*out, *in], trained on 8 devices: the same losses and (transposed)
  # params as [*in, *out] on one.
  obj = objective.ObjectiveConfig(kind="diffusion", block_size=8)
  cfg = TrainConfig(steps=3, learning_rate=1e-3, warmup_ratio=0.0)
  batches = _batches(3)
  params = jax.tree_util.tree_map(np.asarray, model.init_params(TINY, jax.random.key(3)))
  om, om_cfg = model.with_kernel_layout(params, TINY, "out_in")
  single = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  losses_1, params_1, _ = _train(single, obj, cfg, batches, params=params)
  losses_8, params_8, _ = _train(sharding.make_mesh(2, 2, 2), obj, cfg, batches, params=om,
                                 cfg=om_cfg)
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  back, _ = model.with_kernel_layout(params_8, om_cfg, "in_out")
  for a, b in zip(jax.tree_util.tree_leaves(params_1), jax.tree_util.tree_leaves(back)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_train_step_binds_the_activation_constraints_to_the_mesh():
  # The model's logical activation constraints must reach the lowered program as sharding
  # constraints on the (data, fsdp, tensor) mesh: batch over data x fsdp, heads / mlp / vocab
  # over tensor. Without the logical rules and mesh in context flax drops them silently.
  mesh = sharding.make_mesh(2, 2, 2)
  obj = objective.ObjectiveConfig(kind="diffusion", block_size=8)
  cfg = TrainConfig(steps=1, grad_accum=2, learning_rate=1e-3, warmup_ratio=0.0)
  tx = training.make_optimizer(cfg)
  sh, shapes = training.state_shardings(TINY, tx, mesh)
  step = training.make_train_step(TINY, obj, cfg, tx, mesh, sh)
  batch_sh = sharding.batch_sharding(mesh, leading=1)
  batch = {name: jax.ShapeDtypeStruct((2, 4, 32), dtype, sharding=batch_sh)
           for name, dtype in (("tokens", np.int32), ("loss_mask", bool), ("segments", np.int32))}
  batch["row"] = jax.ShapeDtypeStruct((2, 4, 1), np.int32, sharding=batch_sh)
  hlo = step.lower(training.abstract_state(sh, shapes), batch).as_text()
  # 4 rows per micro-batch; the complementary-mask layout [noisy_1; noisy_2; clean] is 3 x 32.
  batch_split = '<@mesh, [{"data", "fsdp"}, {}, '
  for constrained in ('{}]> : tensor<4x96x32xf32>',  # the residual stream
                      '{"tensor"}, {}]> : tensor<4x96x4x8xf32>',  # q: heads over tensor
                      '{"tensor"}, {}]> : tensor<4x96x2x8xf32>',  # k: kv heads over tensor
                      '{"tensor"}]> : tensor<4x96x64xf32>',  # the MLP hidden
                      '{"tensor"}]> : tensor<4x32x130xf32>'):  # logits: L a row (one copy's)
    assert "sdy.sharding_constraint" in hlo and batch_split + constrained in hlo, constrained


def test_grad_accumulation_is_count_weighted():
  # The AR objective draws no noise, so 2 micro-batches of 4 rows must equal one batch of 8:
  # that holds only if the loss is sum(loss sums) / sum(counts), not a mean of micro means.
  obj = objective.ObjectiveConfig(kind="ar", block_size=8)
  batches = _batches(3)
  for b in batches:  # unequal counts in the two halves
    b["loss_mask"][:4, :] = b["loss_mask"][:4, :] & (np.arange(32) < 10)
  mesh = sharding.make_mesh(4, 1, 2)
  one = TrainConfig(steps=3, grad_accum=1, learning_rate=1e-3, warmup_ratio=0.0)
  two = TrainConfig(steps=3, grad_accum=2, learning_rate=1e-3, warmup_ratio=0.0)
  # Plain SGD: parameters then differ by lr x the gradient difference. (Adam would divide each
  # gradient by its own magnitude and amplify float rounding of near-zero entries.)
  sgd = optax.sgd(0.5)
  losses_1, params_1, _ = _train(mesh, obj, one, batches, sgd)
  losses_2, params_2, _ = _train(mesh, obj, two, batches, sgd)
  np.testing.assert_allclose(losses_2, losses_1, rtol=1e-6)
  assert losses_1[-1] < losses_1[0]
  for a, b in zip(jax.tree_util.tree_leaves(params_1), jax.tree_util.tree_leaves(params_2)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_each_step_draws_its_own_noise_and_the_first_applies_lr_0():
  # Step s draws its noise from fold_in(the run's base key, s), which a resumed run replays
  # without a saved RNG stream. A key that ignored the step (every step masking alike) passed
  # every test: the resume tests compare runs that share it. Same params, batch and base key
  # here, so only the noise tells the losses apart.
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  obj = objective.ObjectiveConfig(kind="diffusion", block_size=8)
  cfg = TrainConfig(steps=4, learning_rate=1e-3, warmup_ratio=0.5)
  tx = training.make_optimizer(cfg)
  sh, _ = training.state_shardings(TINY, tx, mesh)
  step_fn = training.make_train_step(TINY, obj, cfg, tx, mesh, sh)
  batch = training.shard_batch(_batches(1)[0], 1, mesh)
  start = jax.device_get(training.init_state(None, TINY, tx, seed=0, shardings=sh))

  def run(step, rng=start.rng):
    # (a fresh copy each time: the step donates its state)
    state, metrics = step_fn(jax.device_put(start.replace(step=np.int32(step), rng=rng), sh),
                             batch)
    return float(metrics["loss"]), jax.device_get(state.params)

  loss, after = run(0)
  assert run(0)[0] == loss  # (deterministic: the differences below are the noise's)
  assert run(1)[0] != loss
  assert run(0, rng=np.asarray([0, 1], np.uint32))[0] != loss
  # The warmup starts at lr 0 (as HF's): the first update leaves every param as it was. (An
  # optimizer whose schedule ran a step ahead of its updates passed: nothing read the lr applied.)
  for a, b in zip(jax.tree_util.tree_leaves(start.params), jax.tree_util.tree_leaves(after)):
    np.testing.assert_array_equal(b, a)
