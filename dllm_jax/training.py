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
import os
import pathlib
import signal
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from dllm_jax import model, objective, sharding
from dllm_jax.config import (KERNEL_LAYOUTS, ConfigError, ModelConfig, TrainConfig,
                             check_coordinator_address)

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


def check_batch_size(batch_size: int, grad_accum: int, mesh: Mesh) -> int:
  """The micro-batch size; errors when the batch does not split over accumulation and devices."""
  shards = sharding.batch_divisor(mesh)
  if batch_size % grad_accum or (batch_size // grad_accum) % shards:
    raise ConfigError(
        f"data.batch_size={batch_size} does not split into train.grad_accum={grad_accum} "
        f"micro-batches that divide over the {shards} batch shards of the mesh (mesh.data x "
        f"mesh.fsdp); make data.batch_size a multiple of {grad_accum * shards}")
  processes = jax.process_count()
  if processes > 1:
    # Each process feeds its own share of the batch: its devices must hold that share alone,
    # not rows another process holds too (a batch replicated over the processes' devices).
    held = {index[0].start for index in sharding.batch_sharding(mesh)
            .addressable_devices_indices_map((shards, 1)).values()}
    if len(held) * processes != shards:
      raise ConfigError(
          f"multi-host: the mesh splits the batch into {shards} shards (mesh.data x mesh.fsdp) "
          f"and this process's devices hold {len(held)} of them, not 1/{processes} each: every "
          f"process reads its own rows, so make mesh.data x mesh.fsdp a multiple of the "
          f"{processes} processes, with mesh.tensor over the devices of one host")
  return batch_size // grad_accum


def shard_batch(local_batch: Mapping[str, np.ndarray], grad_accum: int, mesh: Mesh,
                row_ids: bool = True) -> dict[str, jax.Array]:
  """This process's rows [B_local, L] -> global arrays [grad_accum, B / grad_accum, L].

  Each process contributes its own rows (processes read disjoint shards of the data).
  `row_ids`: also "row" int32 [grad_accum, B / grad_accum, 1], each row's place in the batch as
  the processes hold it (process-major), placed as the rows are: what keys its noise, whatever
  the micro-batches and the mesh's layout (its last axis only gives it the batch's sharding)."""
  out = {}
  sh = sharding.batch_sharding(mesh, leading=1)
  if row_ids:
    local = np.asarray(next(iter(local_batch.values()))).shape[0]
    rows = jax.process_index() * local + np.arange(local, dtype=np.int32)
    out.update(shard_batch({"row": rows[:, None]}, grad_accum, mesh, row_ids=False))
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
    with sharding.activation_constraints(mesh):
      return _step(state, batch)

  def _step(state: TrainState, batch: Mapping[str, jax.Array]):
    key = jax.random.fold_in(state.rng, state.step)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    # Each row's noise is keyed by its place in the batch, so a row is noised alike however the
    # batch is split into micro-batches (train.grad_accum may change on resume).
    batch = dict(batch)
    if "row" not in batch:
      raise ValueError("the batch has no 'row' ids (each row's place in the batch, which keys "
                       "its noise): build it with training.shard_batch")
    row_keys = jax.vmap(jax.vmap(lambda r: jax.random.fold_in(key, r)))(batch.pop("row")[..., 0])

    def body(carry, xs):
      grads, loss_sum, count, correct = carry
      keys, micro_batch = xs
      g, l, c, r = micro_grads(state.params, micro_batch, keys)
      return (jax.tree_util.tree_map(jnp.add, grads, g), loss_sum + l, count + c,
              correct + r), None

    init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
    (grads, loss_sum, count, correct), _ = jax.lax.scan(body, init, (row_keys, batch))
    # d(sum of loss sums)/d params over the total count: the gradient of the mean loss.
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss_sum / denom,
        "count": count,
        "accuracy": correct / denom,
        "grad_norm": optax.tree_utils.tree_norm(grads),
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      rng=state.rng), metrics

  batch_sh = sharding.batch_sharding(mesh, leading=1)
  repl = sharding.replicated(mesh)
  # Besides these in/out shardings, the model's logical activation constraints (batch over
  # data x fsdp, heads / mlp / vocab over tensor) are bound to the mesh while `step` is traced,
  # so XLA's propagation does not have to guess the activations' layout inside the layer scan.
  return jax.jit(step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, repl),
                 donate_argnums=(0,))


# --------------------------------------------------------------------------------------------
# Model source, multi-host start-up


def maybe_initialize_distributed(mesh_cfg) -> None:
  """`jax.distributed.initialize` when a coordinator is configured (config or environment)."""
  import os

  address = mesh_cfg.coordinator_address or os.environ.get("DLLM_COORDINATOR_ADDRESS", "")
  if not address:
    if mesh_cfg.num_processes > 1 or mesh_cfg.process_id > 0:
      # (each host would train alone as process 0, all of them into one run directory)
      raise ConfigError(f"mesh.num_processes={mesh_cfg.num_processes} / mesh.process_id="
                        f"{mesh_cfg.process_id} ask for several processes, but no coordinator "
                        "is set: set mesh.coordinator_address=HOST:PORT of process 0 (or "
                        "DLLM_COORDINATOR_ADDRESS)")
    return
  if not mesh_cfg.coordinator_address:
    check_coordinator_address(address, "DLLM_COORDINATOR_ADDRESS")
  def env_int(name, default):
    value = os.environ.get(name, default)
    try:
      return int(value)
    except ValueError:
      raise ConfigError(f"{name}={value!r}: an integer expected") from None

  num = mesh_cfg.num_processes or env_int("DLLM_NUM_PROCESSES", "0")
  pid = mesh_cfg.process_id if mesh_cfg.process_id >= 0 else env_int("DLLM_PROCESS_ID", "-1")
  if num < 1 or not 0 <= pid < num:
    raise ConfigError(f"multi-host: coordinator {address!r} is set but num_processes={num} / "
                      f"process_id={pid} are not; set mesh.num_processes and mesh.process_id (or "
                      "DLLM_NUM_PROCESSES and DLLM_PROCESS_ID)")
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize(address, num_processes=num, process_id=pid)
  log.info("jax.distributed: process %d of %d, coordinator %s", pid, num, address)


_RUNTIME_FIELDS = ("param_dtype", "dtype", "remat", "attention_impl", "matvec_impl",
                   "kernel_layout")
# Of those, what a resumed run may change: not kernel_layout, which shapes the saved state
# (train() takes the run's own: keep_run_layout).
_RESUME_FREE_FIELDS = tuple(f for f in _RUNTIME_FIELDS if f != "kernel_layout")


# Run settings a resumed run may change: how long it runs, what it logs and evaluates, how it
# is laid out on the devices and checkpointed. Anything else (the data and its order, the
# objective, the optimizer, the seed) would make the resumed steps those of another run.
_RESUME_FREE_SETTINGS = ("train.steps", "train.log_every", "train.progress", "train.eval_batches",
                         "train.export_hf", "train.run_dir", "train.grad_accum", "data.eval_source",
                         "data.eval_records", "data.strict", "objective.loss_chunk", "init.",
                         "mesh.", "checkpoint.",
                         "model.")  # (model.json holds the model that was trained: below)


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def keep_run_layout(cfg, run_dir: pathlib.Path):
  """`cfg` with model.kernel_layout set to the one the run in `run_dir` stores its kernels in
  (its model.json; unchanged where it has none). A resumed run keeps its layout whatever the
  config says: the layout is how the kernels are stored, not what the model computes, and the
  checkpoints (optimizer moments too) are shaped by it. Runs whose model.json predates the field
  are in_out. On several processes, process 0's reading decides for all."""
  from dllm_jax import checkpoint

  def read() -> tuple[Optional[str], Optional[str]]:  # (layout, why it could not be read)
    try:
      saved = checkpoint.saved_model_config(run_dir)
    except (ConfigError, OSError) as e:
      return None, str(e)
    return (cfg.model.kernel_layout if saved is None else saved.kernel_layout), None

  if jax.process_count() == 1:
    layout, why = read()
  else:
    # Process 0 reads and every process takes its answer (or its refusal), so that one host's
    # unreadable copy cannot leave the others waiting in a collective.
    from jax.experimental import multihost_utils

    layout, why = read() if jax.process_index() == 0 else (None, None)
    code = -1 if layout is None else KERNEL_LAYOUTS.index(layout)
    code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
    layout = None if code < 0 else KERNEL_LAYOUTS[code]
    why = why or f"process 0 could not read {run_dir}'s model.json (its error says why)"
  if layout is None:
    raise ConfigError(f"--resume: {why}")
  if layout == cfg.model.kernel_layout:
    return cfg
  log.info("--resume: %s stores its kernels %s; continuing in that layout (the config says "
           "model.kernel_layout=%s)", run_dir, layout, cfg.model.kernel_layout)
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kernel_layout=layout))


def _warn_schedule_change(run_dir: pathlib.Path, train_cfg: TrainConfig, start: int) -> None:
  """A warning where a resume's train.steps moves the learning-rate schedule under the run (its
  warmup and cosine are laid over train.steps): the rate at the resumed step then jumps."""
  from dllm_jax import checkpoint

  try:
    old_steps = json.loads((run_dir / checkpoint.CONFIG_JSON).read_text())["train"]["steps"]
  except (OSError, ValueError, KeyError, TypeError):
    return
  if not isinstance(old_steps, int) or old_steps == train_cfg.steps:
    return
  was = float(lr_schedule(dataclasses.replace(train_cfg, steps=old_steps))(start))
  now = float(lr_schedule(train_cfg)(start))
  if not math.isclose(was, now, rel_tol=1e-6):
    log.warning("--resume: train.steps %d -> %d moves the learning-rate schedule (train.schedule"
                "=%s, warmup_ratio=%s over train.steps): at step %d the rate is %.3g, where the "
                "run's own schedule had %.3g; the resumed steps are not those of one run to %d",
                old_steps, train_cfg.steps, train_cfg.schedule, train_cfg.warmup_ratio, start,
                now, was, train_cfg.steps)


def check_resume(run_dir: pathlib.Path, cfg, model_cfg: ModelConfig, tokenizer=None) -> None:
  """ConfigError, before anything is restored or written, when this config would not continue
  the run: its model.json records a model other than `model_cfg` in a field the saved state
  depends on (its shapes or layout; restoring would fail on every checkpoint), its config.json
  other settings than these in anything but `_RESUME_FREE_SETTINGS`, or its tokenizer/ another
  tokenizer than `tokenizer` (init.* may change, but not what the data is tokenized with)."""
  from dllm_jax import checkpoint, run_config

  saved = checkpoint.saved_model_config(run_dir)
  diff = {} if saved is None else {
      f"model.{f.name}": (getattr(saved, f.name), getattr(model_cfg, f.name))
      for f in dataclasses.fields(ModelConfig)
      if f.name not in _RESUME_FREE_FIELDS
      and getattr(saved, f.name) != getattr(model_cfg, f.name)}
  path = run_dir / checkpoint.CONFIG_JSON
  if not path.is_file():
    # (A run's checkpoints copied without it: nothing to compare this config with. Process 0
    # writes it: on another host's own disk it is absent by design.)
    if jax.process_index() == 0:
      log.warning("--resume: %s is missing, so this config's settings cannot be checked against "
                  "the run's: the resumed steps use this config's data, optimizer and seed "
                  "as given", path)
  else:
    try:
      old = _flat(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
      raise ConfigError(f"--resume: {path} is not JSON ({e}); restore it from the run's "
                        "config.before_step_*.json or your command line") from None
    new = _flat(json.loads(run_config.to_json(cfg)))
    # (Settings one side lacks, from another version of this config, are not compared.)
    diff.update({k: (old[k], new[k]) for k in sorted(old.keys() & new.keys())
                 if old[k] != new[k]
                 and not any(k == f or (f.endswith(".") and k.startswith(f))
                             for f in _RESUME_FREE_SETTINGS)})
  saved_tok = run_dir / checkpoint.TOKENIZER_DIR / "tokenizer.json"
  if tokenizer is not None and saved_tok.is_file():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
      tokenizer.save(tmp)
      now = json.loads((pathlib.Path(tmp) / "tokenizer.json").read_text())
    if json.loads(saved_tok.read_text()) != now:
      diff["tokenizer"] = (f"{saved_tok.parent}", "another one (from init.*)")
  # Every process refuses together (with config.json on process 0's disk alone, the others
  # would go on into the restore's collectives and wait for ever).
  if _any_process(bool(diff)) and not diff:
    raise ConfigError(f"--resume: another process found this config does not continue the run "
                      f"in {run_dir} (its error says why)")
  if diff:
    said = "; ".join(f"{k}={old!r} there, {new!r} here" for k, (old, new) in diff.items())
    # (train() resumes in the run's layout, `keep_run_layout`; a direct caller may not.)
    hint = (" A run in the other kernel layout starts from this one with "
            f"init.source={run_dir} and a new train.run_dir (its weights are converted)."
            if "model.kernel_layout" in diff else
            f" To change them, start a new run from this one's weights (init.source={run_dir} "
            "and a new train.run_dir); if only a path changed (the same files elsewhere), edit "
            f"it in {path}.")
    raise ConfigError(f"--resume: {run_dir} was started with other settings ({said}); a "
                      f"resumed run keeps its model, data, objective, optimizer and seed, so "
                      f"resume with the command line that started it, or with its own config: "
                      f"python train.py --config {path} --resume.{hint}")


def keep_replaced_config(run_dir: pathlib.Path, cfg, step: int) -> None:
  """On resume, the run's config.json as it was, kept as config.before_step_STEP.json when this
  config changes something in it (what `check_resume` lets change): the run's history."""
  from dllm_jax import checkpoint, run_config

  path = run_dir / checkpoint.CONFIG_JSON
  if jax.process_index() != 0 or not path.is_file():
    return
  if json.loads(path.read_text()) != json.loads(run_config.to_json(cfg)):
    kept, n = run_dir / f"config.before_step_{step}.json", 1
    while kept.exists():  # (resumed from the same step before: keep that one too)
      kept, n = run_dir / f"config.before_step_{step}.{n}.json", n + 1
    path.replace(kept)


def run_model(cfg, run_dir: pathlib.Path, steps: Sequence[int]
              ) -> Optional[tuple[None, ModelConfig, Any, dict]]:
  """For a resume: (None, model config, tokenizer, metadata) as the run in `run_dir` saved them,
  with `cfg.model`'s runtime fields, when it holds checkpoints (`steps`) and every process can
  read its model.json and tokenizer/; else None (then `build_model` reads init.*). The weights
  come from the checkpoint, so init.source is neither needed nor read: the model it named may be
  gone."""
  from dllm_jax import checkpoint
  from dllm_jax.tokenizer import TokenizerError

  saved = None
  if steps and checkpoint.is_run_dir(run_dir):
    try:
      saved = checkpoint.saved_model(run_dir)
    except (ConfigError, TokenizerError, OSError) as e:
      log.warning("--resume: the run's model.json or tokenizer/ is unreadable (%s); building "
                  "the model from init.* instead", e)
  if _any_process(saved is None):  # (a process whose disk lacks the run's files: all use init.*)
    return None
  saved_cfg, tokenizer, metadata = saved
  if cfg.init.source.strip() == "random":
    # A run from scratch has its config's architecture: `check_resume` refuses another one by
    # name (the special ids are the tokenizer's, as `build_model` sets them).
    model_cfg = dataclasses.replace(cfg.model, **{f: getattr(saved_cfg, f) for f in (
        "mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id")})
    if cfg.init.tokenizer == "chars":
      # Built as the run's start built it: a copy saved before the alphabet was saved lacks it,
      # and drops characters outside it instead of refusing them (`check_resume` compares them).
      tokenizer = _chars_tokenizer()
  else:  # a pretrained model keeps its own (the config's only described it: the first start
    # warned about what differed)
    model_cfg = dataclasses.replace(
        saved_cfg, **{f: getattr(cfg.model, f) for f in _RESUME_FREE_FIELDS})
  return None, model_cfg, tokenizer, metadata


def _chars_tokenizer():
  from dllm_jax import tokenizer as tokenizer_lib

  tok = tokenizer_lib.simple_chars()
  tokenizer_lib.add_mask_token(tok)
  return tok


def _warn_unused_model_fields(asked: ModelConfig, used: ModelConfig, source: str) -> None:
  """A warning naming each model.* setting the run does not use (`source` decides it: a
  pretrained model's architecture, a tokenizer's special ids). The run's config.json records the
  model it trains."""
  def differ(a, b):  # (a float read from a file as float32 is the same setting)
    if isinstance(a, float) and isinstance(b, (int, float)):
      return not math.isclose(a, b, rel_tol=1e-6)
    return a != b

  ignored = [f"model.{f.name}={getattr(asked, f.name)!r} (used: {getattr(used, f.name)!r})"
             for f in dataclasses.fields(ModelConfig)
             if getattr(asked, f.name) not in (None, ())  # (not set)
             and differ(getattr(asked, f.name), getattr(used, f.name))]
  if ignored:
    log.warning("%s decides these model settings, not the config: %s", source, "; ".join(ignored))


def build_model(cfg) -> tuple[Optional[Params], ModelConfig, Any, dict]:
  """(host params or None for random init, model config, tokenizer, metadata) from `cfg.init`.

  A pretrained model keeps its architecture; `cfg.model` contributes only its runtime fields.
  The mask token is added when the model has none.
  """
  from dllm_jax import checkpoint, convert
  from dllm_jax import tokenizer as tokenizer_lib

  source = cfg.init.source
  if source.startswith("~"):  # ("--set init.source=~/m": no shell expands it)
    source = str(pathlib.Path(source).expanduser())
  if not source:
    raise ConfigError("init.source is empty: this config needs a model, e.g. --set "
                      "init.source=/path/to/hf_dir (or a .gguf file, or 'random')")
  metadata = {"objective": cfg.objective.kind, "block_size": cfg.objective.block_size}
  if source != "random" and cfg.init.tokenizer != "chars":
    raise ConfigError(f"init.tokenizer={cfg.init.tokenizer!r} is for init.source=random; "
                      f"init.source={source} brings its own tokenizer: leave init.tokenizer out")
  if source == "random":
    if cfg.init.tokenizer == "chars":
      tok = _chars_tokenizer()
    else:
      try:
        tok = tokenizer_lib.from_hf_dir(cfg.init.tokenizer)
      except tokenizer_lib.TokenizerError as e:  # (named by the key that gave the path)
        raise tokenizer_lib.TokenizerError(f"init.tokenizer={cfg.init.tokenizer!r}: {e}") from None
      tokenizer_lib.add_mask_token(tok)
    model_cfg = cfg.model
    if model_cfg.vocab_size < tok.vocab_size:
      raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                        f"{tok.vocab_size} ids (init.tokenizer={cfg.init.tokenizer!r}); raise it")
    model_cfg = dataclasses.replace(
        model_cfg, mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    _warn_unused_model_fields(cfg.model, model_cfg, f"init.tokenizer={cfg.init.tokenizer!r}")
    return None, model_cfg, tok, metadata
  if (pathlib.Path(source) / checkpoint.MODEL_JSON).is_file():
    try:  # (a run directory; load_model names one without its checkpoints/)
      pretrained = checkpoint.load_model(source)
    except FileNotFoundError as e:  # (a run directory without a readable checkpoint: named)
      raise ConfigError(f"init.source={source}: {e}") from None
  else:
    try:
      pretrained = convert.load_pretrained(source, dtype=cfg.model.param_dtype)
    except convert.CheckpointError as e:  # (named by the key that gave the path)
      raise convert.CheckpointError(f"init.source={source}: {e}") from None
  # (What the config describes is the model as loaded: the mask token may grow its vocabulary.)
  _warn_unused_model_fields(
      cfg.model, dataclasses.replace(pretrained.config, **{f: getattr(cfg.model, f)
                                                           for f in _RUNTIME_FIELDS}), source)
  pretrained = convert.add_mask_token(pretrained)
  params = pretrained.params
  if pretrained.config.kernel_layout != cfg.model.kernel_layout:
    # Transposed on the host: a run directory's params arrive on one device, where a transposed
    # copy beside them would double what that device holds.
    params = jax.tree_util.tree_map(np.asarray, params)
  params, model_cfg = model.with_kernel_layout(params, pretrained.config, cfg.model.kernel_layout)
  model_cfg = dataclasses.replace(
      model_cfg, **{f: getattr(cfg.model, f) for f in _RUNTIME_FIELDS})
  if pretrained.tokenizer is None:
    raise ConfigError(f"init.source={source!r} carries no tokenizer; training needs one")
  if pretrained.metadata.get("generation"):  # (the source's sampling defaults, for an export)
    metadata["generation"] = pretrained.metadata["generation"]
  return params, model_cfg, pretrained.tokenizer, metadata


# --------------------------------------------------------------------------------------------
# Progress and metrics


class Progress:
  """A one-line stderr progress bar: step, loss, tokens/s, ETA; redrawn in place on a terminal,
  a line per update where stderr is a file or pipe (a log would otherwise hold one line of
  carriage returns, with the next log record glued to its end), and so in a notebook too."""

  def __init__(self, total: int, start: int, enabled: bool):
    self.total, self.start, self.enabled = total, start, enabled
    self.tty = enabled and sys.stderr.isatty()
    self.t0 = time.perf_counter()
    self._timed_from = None  # the first step is mostly compilation: rates start after it

  def update(self, step: int, tokens_per_step: int, metrics: Mapping[str, float]) -> dict:
    now = time.perf_counter()
    if self._timed_from is None:
      self._timed_from = (step, now)
    done = step - self._timed_from[0]
    elapsed = now - self._timed_from[1]
    rate = done / elapsed if done and elapsed > 0 else 0.0
    eta = (self.total - step) / rate if rate else None
    stats = {"tokens_per_s": rate * tokens_per_step, "eta_s": eta,
             "elapsed_s": now - self.t0}
    if self.enabled:
      width = 24
      filled = int(width * step / self.total)
      eta_text = "?" if eta is None else f"{int(eta) // 60}:{int(eta) % 60:02d}"
      line = (f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} "
              f"loss {metrics['loss']:.4f} acc {metrics['accuracy']:.3f} "
              f"{stats['tokens_per_s']:,.0f} tok/s ETA {eta_text}")
      sys.stderr.write(f"\r{line}   " if self.tty else f"{line}\n")
      sys.stderr.flush()
    return stats

  def close(self):
    if self.tty:
      sys.stderr.write("\n")
      sys.stderr.flush()


class MetricsLog:
  """metrics.jsonl in the run directory (process 0), plus TensorBoard when installed.

  On resume, lines of steps after the restored step are dropped: those steps are trained again.
  """

  def __init__(self, run_dir: pathlib.Path, start_step: int):
    self.enabled = jax.process_index() == 0
    self.path = run_dir / "metrics.jsonl"
    self._tb = None
    if not self.enabled:
      return
    if self.path.exists():
      kept = []
      for n, line in enumerate(self.path.read_text().splitlines(), 1):
        try:
          record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
          # A run killed mid-write leaves a partial last line: that step is trained again.
          log.warning("%s:%d is not a JSON record (%r); dropped", self.path, n, line[:80])
          continue
        if isinstance(record, dict) and record.get("step", 0) <= start_step:
          kept.append(line)
      from dllm_jax import checkpoint

      checkpoint.write_text_whole(self.path, "".join(line + "\n" for line in kept))
    self._file = open(self.path, "a")
    try:
      from tensorboardX import SummaryWriter
    except ImportError:
      try:
        from torch.utils.tensorboard import SummaryWriter
      except ImportError:
        SummaryWriter = None
    if SummaryWriter is not None:
      try:
        self._tb = SummaryWriter(str(run_dir / "tensorboard"))
      except Exception as e:  # noqa: BLE001  (optional; a broken install must not stop training)
        log.info("TensorBoard disabled: %s", e)

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, record["step"])

  def close(self):
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


# --------------------------------------------------------------------------------------------
# Evaluation


def held_out_batches(cfg, tokenizer):
  """This process's batches of the held-out split, as `evaluate` scores them: on the answers'
  own tokens only (the padding after an answer is easy to predict and would flatter the
  accuracy)."""
  from dllm_jax import data

  held_out = dataclasses.replace(cfg.data, loss_on_block_padding=False)
  return data.make_dataset(held_out, tokenizer, process_index=jax.process_index(),
                           process_count=jax.process_count(), split="eval")


def evaluate(state: TrainState, model_cfg: ModelConfig, cfg, tokenizer, mesh: Mesh,
             shardings: TrainState) -> dict:
  """Held-out masked-token accuracy (next-token accuracy for AR) over `train.eval_batches`
  batches of the eval split; every process runs the same number of steps (empty batches once
  its share is exhausted) so collectives stay matched."""
  it = held_out_batches(cfg, tokenizer)
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 0x5EED)
  def eval_step(params, batch, i):
    with sharding.activation_constraints(mesh):
      # Each batch its own noise: one shared key would give every batch the same rates.
      return objective.eval_masked_accuracy(params, model_cfg, cfg.objective,
                                            {k: v[0] for k, v in batch.items()},
                                            jax.random.fold_in(key, i))

  repl = sharding.replicated(mesh)
  eval_fn = jax.jit(
      eval_step,
      in_shardings=(shardings.params, sharding.batch_sharding(mesh, leading=1), repl),
      out_shardings=repl)
  totals = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
  empty = None
  for i in range(cfg.train.eval_batches):
    batch, _ = _next_everywhere(it)  # (a process whose share ran out scores empty batches)
    if batch is None:
      if empty is None:
        rows = cfg.data.batch_size // jax.process_count()
        empty = {"tokens": np.zeros((rows, cfg.data.seq_len), np.int32),
                 "loss_mask": np.zeros((rows, cfg.data.seq_len), bool),
                 "segments": np.zeros((rows, cfg.data.seq_len), np.int32)}
      batch = empty
    out = jax.device_get(eval_fn(state.params, shard_batch(batch, 1, mesh, row_ids=False),
                                 np.int32(i)))
    for k in totals:
      totals[k] += float(out[k])
  it.close()
  count = max(totals["count"], 1.0)
  return {"eval_loss": totals["loss_sum"] / count, "eval_accuracy": totals["correct"] / count,
          "eval_tokens": totals["count"]}


# --------------------------------------------------------------------------------------------
# The loop


def run_dir_of(cfg) -> pathlib.Path:
  """train.run_dir as a path, "~" expanded (no shell expands a --set value: a directory named
  "~" would appear here); ConfigError when it, or the directory it would be made in, is a file
  or cannot be written."""
  run_dir = pathlib.Path(cfg.train.run_dir).expanduser()
  for p in (run_dir, *run_dir.parents):  # the nearest part that exists
    if p.exists():
      if not p.is_dir():
        raise ConfigError(f"train.run_dir={cfg.train.run_dir}: {p} is a file, not a directory; "
                          "choose a directory for the run")
      if p != run_dir and not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"train.run_dir={cfg.train.run_dir}: it cannot be made in {p} (not "
                          "writable); choose a directory you can write to")
      break
  return run_dir


def check_run_dir(cfg) -> None:
  """ConfigError before anything is written when train.run_dir is the model's own source, or a
  directory that is not a training run but holds files a run writes (config.json, model.json,
  tokenizer/: an HF model directory, say), which the run would overwrite."""
  from dllm_jax import checkpoint

  run_dir = run_dir_of(cfg)
  source = cfg.init.source.strip()
  if (source and source != "random"
      and pathlib.Path(source).expanduser().resolve() == run_dir.resolve()):
    raise ConfigError(f"train.run_dir={run_dir} is init.source itself; a run writes its own "
                      "config.json and checkpoints there: choose another train.run_dir")
  ours = [n for n in (checkpoint.CONFIG_JSON, checkpoint.MODEL_JSON, checkpoint.TOKENIZER_DIR)
          if (run_dir / n).exists()]
  if ours and not checkpoint.is_run_dir(run_dir):
    raise ConfigError(f"train.run_dir={run_dir} is not a training run but holds "
                      f"{', '.join(ours)}, which a run would overwrite; choose an empty or new "
                      "directory")


def check_context(cfg, model_cfg: ModelConfig) -> None:
  """ConfigError when the training rows are longer than the model's context: both halves of a
  row take positions 0..seq_len-1, past the positions the model has (and the decoders refuse)."""
  if cfg.data.seq_len > model_cfg.max_position_embeddings:
    raise ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than the model's context "
                      f"(max_position_embeddings={model_cfg.max_position_embeddings}); lower "
                      "data.seq_len, or raise model.max_position_embeddings for a random init")


def check_held_out(cfg, tokenizer) -> None:
  """ConfigError before the first step when the held-out split makes no sample on any process
  (no record, or every one malformed or longer than data.seq_len): the evaluation after the
  last step would report an accuracy over 0 tokens. Reads one batch a process (a collective: on
  every process), which also meets a file that cannot be read, or a bad record under
  data.strict, here instead of after the run."""
  if not cfg.train.eval_batches:
    return
  batch, _ = _next_everywhere(held_out_batches(cfg, tokenizer))
  if not _most_over_processes(int(batch is not None)):
    where = (f"data.eval_source={cfg.data.eval_source}" if cfg.data.eval_source
             else f"the held-out synthetic records (data.eval_records={cfg.data.eval_records})")
    raise ConfigError(f"{where} made no held-out sample (every record malformed, or longer "
                      f"than data.seq_len={cfg.data.seq_len}); train.eval_batches="
                      f"{cfg.train.eval_batches} would score 0 tokens: fix the held-out data or "
                      "set train.eval_batches=0")


def check_end_of_run(cfg, model_cfg: ModelConfig) -> None:
  """ConfigError before the first step for what the run would only meet after its last: the
  held-out evaluation without held-out data, an HF export the model has no class for."""
  from dllm_jax import convert, data

  if (cfg.train.eval_batches and not cfg.data.eval_source
      and cfg.data.source.strip() not in ("synthetic", "")):  # (an empty source: data says so)
    raise ConfigError(f"train.eval_batches={cfg.train.eval_batches} evaluates on "
                      "data.eval_source, which is empty: give held-out JSONL files, or set "
                      "train.eval_batches=0")
  if cfg.train.eval_batches and cfg.data.eval_source:
    data.jsonl_paths(cfg.data.eval_source, "data.eval_source")
  why = cfg.train.export_hf and convert.export_refusal(model_cfg)
  if why:
    raise ConfigError(f"train.export_hf=true: {why}, or set train.export_hf=false")


def train(cfg, *, resume: bool = False) -> dict:
  """Trains per `cfg` (a `run_config.Config`); returns the last metrics (and eval results).

  Saves every `checkpoint.every_steps`, at the end and on SIGTERM or SIGINT (after the step
  under way; a second SIGINT raises KeyboardInterrupt at once); `resume=True` continues from the
  newest good checkpoint of `train.run_dir` exactly where it left off. A non-finite loss,
  gradient norm or parameter (before a save) raises DivergedError, unsaved.
  """
  from dllm_jax import checkpoint, data, run_config

  maybe_initialize_distributed(cfg.mesh)
  run_dir = run_dir_of(cfg)
  check_run_dir(cfg)
  if resume:
    cfg = keep_run_layout(cfg, run_dir)
  try:
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  except ValueError as e:  # (sizes that do not fit the devices, named)
    raise ConfigError(str(e)) from None
  check_batch_size(cfg.data.batch_size, cfg.train.grad_accum, mesh)
  # A data.source that names no file, by that key, before the model loads (minutes for a 7B) and
  # before the held-out checks, which would report it as held-out data missing.
  if cfg.data.source.strip() not in ("synthetic", ""):  # (an empty source: make_dataset says so)
    data.jsonl_paths(cfg.data.source)
  # (A resume is built from its run's own files where it can.)
  built = ((run_model(cfg, run_dir, checkpoint.saved_steps(run_dir)) if resume else None)
           or build_model(cfg))
  params, model_cfg, tokenizer, metadata = built
  check_context(cfg, model_cfg)
  check_end_of_run(cfg, model_cfg)
  check_held_out(cfg, tokenizer)
  log.info("mesh %s; model %s, %.1fM params", dict(mesh.shape), model_cfg.architecture,
           sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract_params(model_cfg)))
           / 1e6)

  mgr = checkpoint.manager(run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
  if mgr.all_steps() and not resume:
    raise ConfigError(f"{run_dir} already holds checkpoints {mgr.all_steps()}; pass --resume to "
                      "continue that run, or set train.run_dir to a new directory")

  tx = make_optimizer(cfg.train)
  shardings, shapes = state_shardings(model_cfg, tx, mesh)
  batches = data.make_dataset(cfg.data, tokenizer, process_index=jax.process_index(),
                              process_count=jax.process_count())
  state = None
  if resume and mgr.all_steps():
    check_resume(run_dir, cfg, model_cfg, tokenizer)
  if resume:
    state = checkpoint.restore_latest(mgr, abstract_state(shardings, shapes), batches)
    if state is None:
      log.warning("--resume: %s holds no usable checkpoint; starting from step 0", run_dir)
  if state is None:  # (no checkpoints: a run built from its own files has some, or raised)
    state = init_state(params, model_cfg, tx, cfg.train.seed, shardings)
  del params
  start = int(jax.device_get(state.step))
  # The config as run: its model section is the model trained (a pretrained source decides the
  # architecture), so config.json never contradicts model.json.
  run_cfg = dataclasses.replace(cfg, model=model_cfg)
  if start:
    log.info("resumed at step %d", start)
    _warn_schedule_change(run_dir, cfg.train, start)
    keep_replaced_config(run_dir, run_cfg, start)
  # Only now: a resume whose config the checkpoints do not fit (restore_latest raises) leaves
  # the run's config.json and model.json describing its checkpoints.
  checkpoint.write_run_files(run_dir, json.loads(run_config.to_json(run_cfg)), model_cfg,
                             metadata, tokenizer)

  step_fn = make_train_step(model_cfg, cfg.objective, cfg.train, tx, mesh, shardings)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  progress = Progress(cfg.train.steps, start, cfg.train.progress and jax.process_index() == 0)
  metrics_log = MetricsLog(run_dir, start)

  # SIGTERM (a scheduler) and SIGINT (Ctrl-C) end the run after the step under way, saved; a
  # second Ctrl-C stops at once, unsaved.
  stop = {"signal": None}

  def on_signal(signum, frame):
    if stop["signal"] is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if stop["signal"] is None:
      log.warning("%s: saving after the step under way and stopping%s",
                  signal.Signals(signum).name,
                  " (Ctrl-C again to stop at once, unsaved)" if signum == signal.SIGINT else "")
    stop["signal"] = signum

  previous_handlers = {}
  if _in_main_thread():
    previous_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

  last: dict = {}
  step = saved = logged = start
  metrics, stopped, clean = None, False, False
  try:
    while step < cfg.train.steps:
      batch, ran_out = _next_everywhere(batches)
      # Every process must agree to stop at the same step, or the others would wait in the next
      # step's collectives for ever: shards of unequal size run out at different steps.
      if ran_out and step == 0:
        from dllm_jax.data import DataError

        # (Saved and exported, step 0 would pass the untrained model off as this run's.)
        raise DataError(f"the data gave no batch (data.num_epochs={cfg.data.num_epochs}): no "
                        "step ran; the data summary logged with it says which records were "
                        "skipped and why")
      if ran_out:
        log.warning("the data ran out (data.num_epochs=%s) after step %d%s; ending the run "
                    "there", cfg.data.num_epochs, step,
                    "" if batch is None else " on another process")
        break
      state, metrics = step_fn(state, shard_batch(batch, cfg.train.grad_accum, mesh))
      step += 1
      if step % cfg.train.log_every == 0 or step == cfg.train.steps:
        last = _log_step(step, metrics, progress, tokens_per_step, metrics_log)
        logged = step
        _check_finite(last, None, step, saved, run_dir)
      if step % cfg.checkpoint.every_steps == 0 and step < cfg.train.steps:
        _check_finite(None, state, step, saved, run_dir)
        checkpoint.save(mgr, step, state, batches)
        saved = step
      if _any_process(stop["signal"] is not None):  # (after the step: it is saved)
        name = (signal.Signals(stop["signal"]).name if stop["signal"] is not None
                else "a signal on another process")
        log.warning("%s: saving step %d and stopping", name, step)
        stopped = name
        break
    if metrics is not None and logged != step:  # the last step is always on record
      last = _log_step(step, metrics, progress, tokens_per_step, metrics_log)
      _check_finite(last, None, step, saved, run_dir)
    if step != saved or not mgr.all_steps():
      _check_finite(None, state, step, saved, run_dir)
      checkpoint.save(mgr, step, state, batches)
    checkpoint.wait_until_saved(mgr)
    clean = True
  finally:
    _report_data(batches)
    batches.close()
    progress.close()
    metrics_log.close()
    for s, handler in previous_handlers.items():
      signal.signal(s, handler)
    try:
      mgr.close()
    except Exception:  # noqa: BLE001
      if clean:
        raise
      # (A failed async save raises again here; the error that ended the run goes on instead.)
      log.debug("closing the checkpoint manager after an error", exc_info=True)

  last["step"], last["stopped"] = step, bool(stopped)
  if stopped:
    last["signal"] = stopped
  # A run ends at train.steps or where its data runs out (data.num_epochs), and is then
  # evaluated and exported; one stopped by SIGTERM (on any process: all stopped) is not finished.
  if not stopped:
    if cfg.train.eval_batches:
      last.update(evaluate(state, model_cfg, cfg, tokenizer, mesh, shardings))
    if cfg.train.export_hf:
      export_hf(state, model_cfg, tokenizer, metadata, run_dir / "hf")
  return last


class DivergedError(RuntimeError):
  """The loss, the gradient norm or the parameters stopped being finite: the run stops unsaved,
  so its newest checkpoint is the last good state."""


@jax.jit
def _params_finite(params) -> jax.Array:
  return jax.tree_util.tree_reduce(
      jnp.logical_and, jax.tree_util.tree_map(lambda x: jnp.all(jnp.isfinite(x)), params),
      jnp.array(True))


def _check_finite(metrics: Optional[dict], state, step: int, saved: int,
                  run_dir: pathlib.Path) -> None:
  """DivergedError where the metrics just logged (a loss or gradient norm) or, given `state`,
  the parameters about to be saved hold a NaN or an infinity: such a checkpoint would be
  restored and would push the last good ones out of checkpoint.keep, and the run would go on to
  exit 0. (The parameters are read only before a save: one pass over them, on every process
  alike; the metrics where they are logged, read to the host already.)"""
  bad = [f"{k} {metrics[k]}" for k in ("loss", "grad_norm")
         if metrics and k in metrics and not math.isfinite(metrics[k])]
  if not bad and state is not None and not bool(_params_finite(state.params)):
    bad = ["the parameters"]
  if not bad:
    return
  good = (f"its newest checkpoint (step {saved}) is the last good state" if saved
          else "no checkpoint was saved")
  raise DivergedError(
      f"step {step}: {' and '.join(bad)} not finite: the run diverged and stops here unsaved; "
      f"{good}. Lower train.learning_rate (or set train.grad_clip), and start a new run from "
      f"{'it' if saved else 'the same source'} (init.source={run_dir if saved else '...'} and "
      "a new train.run_dir)")


def _in_main_thread() -> bool:
  import threading

  return threading.current_thread() is threading.main_thread()


def _any_process(flag: bool) -> bool:
  return _most_over_processes(int(flag)) > 0


def _most_over_processes(value: int) -> int:
  """The largest of every process's `value` (one host collective)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.asarray([value], np.int32))))


def _report_data(batches) -> None:
  """What this process's data gave the run; a warning where records were skipped beyond the
  ten warnings a reason gets (30 of 40 records longer than data.seq_len, say)."""
  stats = getattr(batches, "stats", None)
  if stats is None:
    return
  skipped = sum(stats.skipped.values())
  if stats.records and skipped > 0.01 * stats.records:
    log.warning("data (process %d): %d of %d records read were skipped (%.0f%%): %s",
                jax.process_index(), skipped, stats.records, 100 * skipped / stats.records,
                stats.summary())
  else:
    log.info("data (process %d): %s", jax.process_index(), stats.summary())


def _next_everywhere(batches) -> tuple[Optional[dict], bool]:
  """(the next batch or None where this process's data ran out, whether it ran out on any
  process), agreed in one collective. A failure reading it on one process (a malformed record of
  its shard under data.strict, a file only its host lacks) is raised on every process: one
  raising alone would leave the others in the next collective for ever."""
  from dllm_jax.data import DataError

  try:
    batch, failure = next(batches, None), None
  except Exception as e:  # noqa: BLE001  (re-raised below, after the others have heard of it)
    batch, failure = None, e
  worst = _most_over_processes(2 if failure is not None else int(batch is None))
  if worst == 2:
    if failure is not None:
      raise failure
    raise DataError("reading the data failed on another process (its log says where); "
                    "stopping here too")
  return batch, worst == 1


def _log_step(step: int, metrics, progress, tokens_per_step: int, metrics_log) -> dict:
  last = {k: float(v) for k, v in jax.device_get(metrics).items()}
  last.update(progress.update(step, tokens_per_step, last))
  metrics_log.write({"step": step, **last})
  return last


def export_hf(state: TrainState, model_cfg: ModelConfig, tokenizer, metadata: dict,
              out_dir: pathlib.Path) -> None:
  """The final params as a HF directory (process 0 writes; all processes gather)."""
  from dllm_jax import convert
  from jax.experimental import multihost_utils

  params = multihost_utils.process_allgather(state.params, tiled=True)
  if jax.process_index() == 0:
    pretrained = convert.Pretrained(params=jax.tree_util.tree_map(np.asarray, params),
                                    config=model_cfg, tokenizer=tokenizer, metadata=metadata)
    convert.export_hf_dir(pretrained, out_dir, overwrite=True)
    log.info("exported the final model to %s", out_dir)
