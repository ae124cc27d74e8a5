"""Checkpoints of a training run (orbax) and loading a model from a run directory.

A run directory is self-describing:

  RUN_DIR/config.json       the full run config (`run_config.Config`)
  RUN_DIR/model.json        the model config actually trained (after import and the mask token)
                            and the model's metadata ({"objective", "block_size", ...})
  RUN_DIR/tokenizer/        tokenizer.json + tokenizer_config.json
  RUN_DIR/checkpoints/STEP/ state (step, params, optimizer, base key) and the data iterator
                            state of every process
  RUN_DIR/metrics.jsonl     one line per logged step

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it), so a
run killed mid-save leaves the previous checkpoints intact. A latest checkpoint that is corrupt
or incomplete is skipped with a warning and the one before it is used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import warnings
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from dllm_jax import config as config_lib

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MODEL_JSON = "model.json"
CONFIG_JSON = "config.json"
TOKENIZER_DIR = "tokenizer"


def manager(run_dir: str | pathlib.Path, keep: Optional[int] = None, async_save: bool = True,
            create: bool = True) -> ocp.CheckpointManager:
  """The run's orbax manager; `keep=None` keeps every checkpoint (readers never delete)."""
  directory = pathlib.Path(run_dir).absolute() / CHECKPOINTS
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                         enable_async_checkpointing=async_save)
  import grain.checkpoint as grain_ckpt

  handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain_ckpt.CheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


class CheckpointRestoreError(RuntimeError):
  """No checkpoint of a run restores into the state this config describes."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (a full disk, a lost mount); the message names the step,
  the directory and the first cause."""


def _first_cause(e: BaseException) -> str:
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  text = str(e)
  if len(text) > 320:  # (orbax puts the OS error, e.g. "No space left on device", last)
    text = f"{text[:100]} ... {text[-200:]}"
  return f"{type(e).__name__}: {text}"


@contextlib.contextmanager
def _writing(mgr: ocp.CheckpointManager, what: str):
  """Orbax's error from a save (or from the asynchronous save before it, which it surfaces
  here) as one CheckpointSaveError line instead of an asyncio traceback."""
  try:
    yield
  except Exception as e:  # noqa: BLE001  (any failure to write is this one error)
    raise CheckpointSaveError(
        f"{what} in {mgr.directory} failed ({_first_cause(e)}); saves are asynchronous, so this "
        "may be the one before it. Free space or fix the directory, then continue with --resume "
        "from the newest checkpoint that was written") from e


def wait_until_saved(mgr: ocp.CheckpointManager) -> None:
  """Waits for the asynchronous save under way; a CheckpointSaveError if it failed."""
  with _writing(mgr, "finishing the last checkpoint"):
    mgr.wait_until_finished()


class _IteratorState:
  """Adapts a data iterator with a JSON-able `get_state()` dict to grain's orbax handler (which
  stores bytes per process). The state is taken at construction: an async save must not see
  batches drawn after it was requested."""

  def __init__(self, iterator: Any):
    self._iterator = iterator
    self._saved = json.dumps(iterator.get_state()).encode()

  def get_state(self) -> bytes:
    return self._saved

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    pass


def save(mgr: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any = None) -> None:
  """Starts an (async) save of `state` and, when given, the grain iterator's state as of now."""
  import grain.checkpoint as grain_ckpt

  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = grain_ckpt.CheckpointSave(_IteratorState(data_iterator))
  with _writing(mgr, f"saving checkpoint step {step}"):
    mgr.save(step, args=ocp.args.Composite(**items), force=True)


def restore_latest(mgr: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any = None
                   ) -> Optional[Any]:
  """The newest checkpoint that restores, or None when there is none.

  `abstract_state` holds ShapeDtypeStructs with shardings (the state lands sharded); the data
  iterator, when given, is set to its saved state in place. Checkpoints that fail to restore are
  skipped with a warning and, once an older one restores, moved to RUN_DIR/unreadable_checkpoints/
  (kept for inspection) so the resumed run can save those steps again. When none restores, raises
  `CheckpointRestoreError` and moves nothing.
  """
  import grain.checkpoint as grain_ckpt

  unreadable = []
  restored = None
  steps = sorted(mgr.all_steps(), reverse=True)
  if data_iterator is not None:
    _check_process_count(mgr, steps)
  complete = _complete_on_every_process(mgr, steps, data_iterator is not None)
  for step, ok in zip(steps, complete):
    if not ok:
      _warn_unreadable(mgr, step, FileNotFoundError(
          "its state, or a process's data-iterator state, is missing on some process"))
      unreadable.append(step)
      continue
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain_ckpt.CheckpointRestore(_IteratorState(data_iterator))
    try:
      restored = mgr.restore(step, args=ocp.args.Composite(**items))["state"]
      break
    except Exception as e:  # noqa: BLE001  (a failure of the files: this checkpoint is unusable)
      _raise_if_not_the_files(e)
      _warn_unreadable(mgr, step, e)
      unreadable.append(step)
  if unreadable and restored is None:
    # Not one restores: with the configs compared first (training.check_resume), corruption of
    # them all, or a state this version lays out otherwise; either way nothing is moved.
    raise CheckpointRestoreError(
        f"none of the checkpoints {sorted(unreadable)} in {mgr.directory} restores into this run's "
        "state (the warnings above say why each failed); resume with the config the run was "
        "started with (config.json beside them) and the version of dllm_jax that wrote them")
  if unreadable:
    _set_aside(mgr, unreadable)
  return restored


def _check_process_count(mgr: ocp.CheckpointManager, steps: list[int]) -> None:
  """CheckpointRestoreError, naming both counts, when the checkpoints' data-iterator states were
  written by another number of processes than this run's: each process saves where it is in its
  own share of the data, which does not map onto another split (every checkpoint would fail to
  restore, each warned about as corrupt)."""
  directory = pathlib.Path(mgr.directory)
  written = {int(p.stem.rsplit("-of-", 1)[1]) for s in steps
             for p in (directory / str(s) / "data").glob("process_*-of-*.json")
             if p.stem.rsplit("-of-", 1)[1].isdigit()}
  n = jax.process_count()
  if written and n not in written:
    raise CheckpointRestoreError(
        f"the checkpoints in {directory} hold the data positions of "
        f"{' or '.join(map(str, sorted(written)))} processes, and this run has {n}: resume with "
        "as many processes as the run was trained with, or start a new run from its weights "
        f"(init.source={directory.parent})")


def _complete_on_every_process(mgr: ocp.CheckpointManager, steps: list[int],
                               with_data: bool) -> list[bool]:
  """For each step, whether every process finds its files (the state, and its own data-iterator
  state): agreed once, before any restore. A process whose own file is missing would otherwise
  fall back to an older step while the others restored the newer one, and their collectives
  would no longer match (two processes hung, or aborted in gloo). Corrupt bytes that only one
  process reads are not caught here: orbax's restore runs collectives of its own, so one
  process failing inside it cannot be agreed on afterwards."""
  import numpy as np

  i, n = jax.process_index(), jax.process_count()
  directory = pathlib.Path(mgr.directory)
  here = np.asarray([(directory / str(s) / "state").is_dir() and (
      not with_data or (directory / str(s) / "data" / f"process_{i}-of-{n}.json").is_file())
      for s in steps], bool)
  if n > 1 and steps:
    from jax.experimental import multihost_utils

    here = np.all(multihost_utils.process_allgather(here), axis=0)
  return [bool(x) for x in here]


def _raise_if_not_the_files(error: Exception) -> None:
  """Re-raises what says nothing about a checkpoint's files: memory running out (the devices'
  or the host's) is no corruption, and must not send a run to an older step or set aside the
  newest one; nor is a data source that changed since the save (`data.DataChangedError`, raised
  as itself: every checkpoint would fail the same way, each warned about as corrupt), nor a file
  this process may not read (a `CheckpointRestoreError` naming it: its checkpoint is intact)."""
  from dllm_jax import data

  seen, e = set(), error
  while e is not None and id(e) not in seen:  # (orbax wraps a shard's read error in its own)
    seen.add(id(e))
    if isinstance(e, data.DataChangedError):
      raise e
    if isinstance(e, PermissionError):
      raise CheckpointRestoreError(
          f"a checkpoint file cannot be read ({e}); a permission says nothing of the "
          "checkpoint, so none was skipped or set aside: give this process read access to the "
          "run's checkpoints/ and start again") from error
    if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e):
      raise error
    e = e.__cause__ or e.__context__


def _warn_unreadable(mgr: ocp.CheckpointManager, step: int, error: Exception) -> None:
  msg = (f"checkpoint {mgr.directory}/{step} is corrupt or incomplete "
         f"({type(error).__name__}: {str(error)[:200]}); falling back to an earlier one")
  # (One channel: train.py routes warnings into its log, decode.py prints them as its own.)
  warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _set_aside(mgr: ocp.CheckpointManager, steps: list[int]) -> None:
  directory = pathlib.Path(mgr.directory)
  if jax.process_index() == 0:
    aside = directory.parent / "unreadable_checkpoints"
    aside.mkdir(exist_ok=True)
    for step in steps:
      target = aside / str(step)
      n = 1
      while target.exists():
        target, n = aside / f"{step}.{n}", n + 1
      (directory / str(step)).rename(target)
      log.warning("moved unreadable checkpoint %d to %s", step, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("dllm_jax.checkpoint.set_aside")
  mgr.reload()


# --------------------------------------------------------------------------------------------
# Reading a model back


def write_text_whole(path: pathlib.Path, text: str) -> None:
  """Writes `text` to `path` through a temporary beside it, renamed into place: a kill mid-write
  leaves the previous file whole."""
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  tmp.replace(path)


def write_run_files(run_dir: str | pathlib.Path, run_config: dict, model_cfg: config_lib.ModelConfig,
                    metadata: dict, tokenizer: Any) -> None:
  """config.json, model.json and tokenizer/ (process 0 only)."""
  if jax.process_index() != 0:
    return
  run_dir = pathlib.Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  write_text_whole(run_dir / CONFIG_JSON, json.dumps(run_config, indent=2))
  write_text_whole(run_dir / MODEL_JSON, json.dumps(
      {"model": config_lib.to_dict(model_cfg), "metadata": metadata}, indent=2))
  tokenizer.save(run_dir / TOKENIZER_DIR)


def saved_steps(run_dir: str | pathlib.Path) -> list[int]:
  """Steps of the finished checkpoints of a run (unreadable ones included), oldest first."""
  with contextlib.closing(manager(run_dir, async_save=False, create=False)) as mgr:
    return sorted(mgr.all_steps())


def is_run_dir(path: str | pathlib.Path) -> bool:
  path = pathlib.Path(path)
  return (path / MODEL_JSON).is_file() and (path / CHECKPOINTS).is_dir()


def load_params(run_dir: str | pathlib.Path) -> tuple[int, Any]:
  """(step, params) of the newest good checkpoint of a run, as arrays on the first device. Only
  the params are read: the optimizer's moments are twice their size (a 7B run's float32 state
  is ~91 GB, more than one GPU holds, where its params are ~30)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with contextlib.closing(manager(run_dir, async_save=False, create=False)) as mgr:
    for step in sorted(mgr.all_steps(), reverse=True):
      try:
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
            _saved_params_shapes(mgr, step, run_dir))
        return step, _restore_params(pathlib.Path(mgr.directory) / str(step) / "state", target)
      except Exception as e:  # noqa: BLE001
        _raise_if_not_the_files(e)
        _warn_unreadable(mgr, step, e)
  raise FileNotFoundError(f"{run_dir} holds no readable checkpoint under {CHECKPOINTS}/; train "
                          "first (python train.py --config ...) or pass a model path")


def _saved_params_shapes(mgr: ocp.CheckpointManager, step: int, run_dir) -> Any:
  """The params' shapes and dtypes in checkpoint `step`: orbax's record of the saved tree, or,
  where that file (state/_METADATA) is gone, the tree the run's model.json describes, which is
  how a resume restores the same checkpoint (by the state it builds from the config)."""
  meta = mgr.item_metadata(step).get("state")
  if meta is not None:
    return meta["params"]
  model_cfg = saved_model_config(run_dir)
  if model_cfg is None:
    raise FileNotFoundError(f"checkpoint {step} has no record of its tree (state/_METADATA) and "
                            f"{run_dir} no {MODEL_JSON} to rebuild it from")
  from dllm_jax import model

  return jax.eval_shape(lambda key: model.init_params(model_cfg, key), jax.random.key(0))


def _restore_params(state_dir: pathlib.Path, target: Any) -> Any:
  """The "params" subtree of a saved TrainState, shaped and placed as `target`, the rest left on
  disk (orbax's partial restore, from 0.12)."""
  restore_args = jax.tree_util.tree_map(
      lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype),
      target)
  with contextlib.closing(ocp.PyTreeCheckpointer()) as ckptr:
    restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
  return restored["params"]


def _read_model_json(path: pathlib.Path) -> tuple[config_lib.ModelConfig, dict]:
  """(model config, metadata) of a run's model.json at `path`."""
  try:
    saved = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise config_lib.ConfigError(f"{path} is not JSON ({e}); it is the run's model config, "
                                 "which train.py writes: restore it or start a new run") from None
  if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
    raise config_lib.ConfigError(f"{path} holds no 'model' config: not the model.json train.py "
                                 "writes")
  # Runs written before kernel_layout was recorded stored their kernels in_out.
  fields = {"kernel_layout": "in_out", **saved["model"]}
  return (config_lib.from_dict(config_lib.ModelConfig, fields, str(path)),
          saved.get("metadata", {}))


def saved_model(run_dir: str | pathlib.Path) -> tuple[config_lib.ModelConfig, Any, dict]:
  """(model config, tokenizer, metadata) as a run saved them (model.json, tokenizer/), without
  its weights: what a resumed run is built from before its checkpoint restores."""
  from dllm_jax import tokenizer as tokenizer_lib

  run_dir = pathlib.Path(run_dir)
  model_cfg, metadata = _read_model_json(run_dir / MODEL_JSON)
  return model_cfg, tokenizer_lib.from_hf_dir(run_dir / TOKENIZER_DIR), metadata


def saved_model_config(run_dir: str | pathlib.Path) -> Optional[config_lib.ModelConfig]:
  """The model config a run's model.json records (None when it has none)."""
  path = pathlib.Path(run_dir) / MODEL_JSON
  return _read_model_json(path)[0] if path.is_file() else None


def load_model(path: str | pathlib.Path, dtype: str = "float32"):
  """A training run directory -> its newest good params, config, tokenizer and metadata as a
  `convert.Pretrained` (params as saved); any other path (or shortcut) ->
  `convert.load_pretrained(path, dtype)`."""
  from dllm_jax import convert, tokenizer as tokenizer_lib

  path = pathlib.Path(path).expanduser() if str(path).startswith("~") else path
  if (pathlib.Path(path) / MODEL_JSON).is_file() and not is_run_dir(path):
    raise FileNotFoundError(f"{path} is a training run's directory (it has {MODEL_JSON}) without "
                            f"its {CHECKPOINTS}/; copy those too, or pass another model path")
  if not is_run_dir(path):
    return convert.load_pretrained(str(path), dtype=dtype)
  path = pathlib.Path(path)
  model_cfg, saved_metadata = _read_model_json(path / MODEL_JSON)
  step, params = load_params(path)
  metadata = dict(saved_metadata, step=step, run_dir=str(path))
  return convert.Pretrained(params=params, config=model_cfg,
                            tokenizer=tokenizer_lib.from_hf_dir(path / TOKENIZER_DIR),
                            metadata=metadata)
