"""The sharded train step and the training loop.

The train state is one pytree (step, params, optimizer state, base RNG key) placed on a
(data, fsdp, tensor) mesh with NamedShardings derived from the logical-axis table in `sharding`.
One jitted step takes a batch of shape [grad_accum, micro_batch, L], scans over the micro-batches
and applies one AdamW update with the count-weighted mean loss: sum of loss sums / sum of counts,
so a micro-batch with more masked tokens weighs more, exactly as one large batch would.

Step s draws its noise from fold_in(base_key, s) (and micro-batch i from fold_in of that, i), so a
resumed run replays the same randomness without saving an RNG stream.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import signal
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding

from dllm_jax import model, objective, sharding
from dllm_jax.config import ConfigError, ModelConfig, TrainConfig

log = logging.getLogger(__name__)

Params = Any
LossFn = Callable[..., tuple[jax.Array, jax.Array, dict]]


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 []: optimizer steps taken
  params: Params
  opt_state: Any
  rng: jax.Array  # uint32 [2]: the run's base key; never advanced (see module docstring)


# --------------------------------------------------------------------------------------------
# Optimizer


def warmup_steps(cfg: TrainConfig) -> int:
  return int(round(cfg.warmup_ratio * cfg.steps))


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 (as HF's schedules: step 0 uses lr 0), then constant or cosine."""
  warmup = warmup_steps(cfg)
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warmup, max(cfg.steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
       optax.constant_schedule(cfg.learning_rate)], [warmup])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(optax.adamw(lr_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                           weight_decay=cfg.weight_decay))
  return optax.chain(*parts)


# --------------------------------------------------------------------------------------------
# Placement


def abstract_params(model_cfg: ModelConfig) -> Params:
  return jax.eval_shape(lambda k: model.init_params(model_cfg, k), jax.random.key(0))


def state_shardings(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh):
  """(NamedShardings of a TrainState, its abstract shapes). Optimizer moments follow their
  parameter's sharding; scalars (counts, step, key) are replicated."""
  params = abstract_params(model_cfg)
  param_sh = sharding.shardings_for(model.param_logical_axes(model_cfg), params, mesh)
  opt_state = jax.eval_shape(tx.init, params)
  repl = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_state, param_sh,
                                 transform_non_params=lambda _: repl)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=opt_state, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  return TrainState(step=repl, params=param_sh, opt_state=opt_sh, rng=repl), shapes


def abstract_state(shardings: TrainState, shapes: TrainState) -> TrainState:
  """ShapeDtypeStructs carrying their sharding: what a checkpoint restores into."""
  return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def place_params(params: Params, param_shardings: Params) -> Params:
  """Host (or single-device) params -> global sharded arrays; works across processes because
  every process holds the same full values and each fills only its own shards."""
  def put(x, sh):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])
  return jax.tree_util.tree_map(put, params, param_shardings)


def init_state(params: Optional[Params], model_cfg: ModelConfig, tx: optax.GradientTransformation,
               seed: int, shardings: TrainState) -> TrainState:
  """A sharded TrainState at step 0. `params=None` initialises them randomly on the devices
  (never whole on one device); otherwise they are placed."""
  init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))
  if params is None:
    params = jax.jit(lambda k: model.init_params(model_cfg, k),
                     out_shardings=shardings.params)(init_key)
  else:
    params = place_params(params, shardings.params)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  # Host-side values become replicated global arrays the same way params do.
  step, rng = place_params((np.int32(0), np.asarray(run_key)), (shardings.step, shardings.rng))
  return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


def check_batch_size(cfg: TrainConfig, mesh: Mesh) -> int:
  """The micro-batch size; errors when the batch does not split over accumulation and devices."""
  micro = cfg.batch_size // cfg.grad_accum
  shards = sharding.batch_divisor(mesh)
  if micro % shards:
    raise ConfigError(
        f"train.batch_size={cfg.batch_size} / train.grad_accum={cfg.grad_accum} = {micro} "
        f"sequences per micro-batch do not split over the {shards} batch shards of the mesh "
        f"(mesh.data x mesh.fsdp); make the micro-batch a multiple of {shards}")
  return micro


def shard_batch(local_batch: Mapping[str, np.ndarray], grad_accum: int, mesh: Mesh
                ) -> dict[str, jax.Array]:
  """This process's rows [B_local, L] -> global arrays [grad_accum, B / grad_accum, L].

  Each process contributes its own rows (processes read disjoint shards of the data)."""
  out = {}
  sh = sharding.batch_sharding(mesh, leading=1)
  for name, x in local_batch.items():
    x = np.asarray(x)
    if x.shape[0] % grad_accum:
      raise ValueError(f"batch[{name!r}] has {x.shape[0]} rows on this process, not a multiple "
                       f"of train.grad_accum={grad_accum}")
    x = x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])
    global_shape = (grad_accum, x.shape[1] * jax.process_count(), *x.shape[2:])
    out[name] = jax.make_array_from_process_local_data(sh, x, global_shape)
  return out


# --------------------------------------------------------------------------------------------
# The step


def make_train_step(model_cfg: ModelConfig, obj_cfg: objective.ObjectiveConfig,
                    train_cfg: TrainConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    shardings: TrainState, loss_fn: LossFn = objective.loss_fn):
  """Returns step(state, batch) -> (state, metrics): jitted, sharded, the state donated.

  `batch` holds global arrays [grad_accum, micro_batch, L] (see `shard_batch`); metrics are
  replicated float32 scalars: loss (count-weighted mean), count, accuracy, grad_norm, lr.
  """
  schedule = lr_schedule(train_cfg)

  def micro_grads(params, micro_batch, key):
    def f(p):
      loss_sum, count, metrics = loss_fn(p, model_cfg, obj_cfg, micro_batch, key)
      return loss_sum, (count, metrics["correct"])
    (loss_sum, (count, correct)), grads = jax.value_and_grad(f, has_aux=True)(params)
    return grads, loss_sum, count, correct

  def step(state: TrainState, batch: Mapping[str, jax.Array]):
    key = jax.random.fold_in(state.rng, state.step)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)

    def body(carry, xs):
      grads, loss_sum, count, correct = carry
      i, micro_batch = xs
      g, l, c, r = micro_grads(state.params, micro_batch, jax.random.fold_in(key, i))
      return (jax.tree_util.tree_map(jnp.add, grads, g), loss_sum + l, count + c,
              correct + r), None

    init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
    accum = jax.tree_util.tree_leaves(batch)[0].shape[0]
    (grads, loss_sum, count, correct), _ = jax.lax.scan(
        body, init, (jnp.arange(accum), dict(batch)))
    # d(sum of loss sums)/d params over the total count: the gradient of the mean loss.
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss_sum / denom,
        "count": count,
        "accuracy": correct / denom,
        "grad_norm": optax.global_norm(grads),
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      rng=state.rng), metrics

  batch_sh = sharding.batch_sharding(mesh, leading=1)
  repl = sharding.replicated(mesh)
  # Activations are left to XLA's sharding propagation from these in/out shardings. The model's
  # logical activation constraints stay inactive (no `nn.logical_axis_rules` context): under such
  # a context flax 0.12 re-runs each DenseGeneral kernel init during apply (its shape check) and
  # constrains the flattened 2-D kernel with 3-D axis names, which fails.
  return jax.jit(step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, repl),
                 donate_argnums=(0,))
