"""checkpoint.save / restore_latest on a small state: a bit-exact round trip of params and
optimizer state with the data position, and what partial, corrupt or foreign step directories
and a changed data source do. (The training loop's own resume tests are in test_train.py.)"""

import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from dllm_jax import checkpoint, data
from dllm_jax import tokenizer as tok_lib

TOK = tok_lib.simple_chars()
DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])
TX = optax.adamw(1e-3)


def _state(k):
  """A state of mixed dtypes (bf16 too) with non-trivial AdamW moments, different for each k."""
  rng = np.random.default_rng(k)
  params = {"w": jnp.asarray(rng.standard_normal((4, 8)), jnp.float32),
            "emb": jnp.asarray(rng.standard_normal((5, 3)), jnp.bfloat16)}
  opt = TX.init(params)
  for _ in range(2):
    grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype),
                                   params)
    updates, opt = TX.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
  return {"step": jnp.int32(k), "params": params, "opt_state": opt,
          "rng": jnp.asarray([k, 0xFFFFFFFF], jnp.uint32)}


ABSTRACT = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=DEVICE), _state(0))


def _dataset(path):
  cfg = data.DataConfig(source=str(path), seq_len=32, block_size=16, batch_size=2, seed=3)
  return data.make_dataset(cfg, TOK)


def _write_records(path, n):
  path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a #### {i}"}) + "\n"
                          for i in range(n)))


def _run(tmp_path, steps=(2, 4, 6)):
  """A run directory with a checkpoint at each step (the data iterator k batches in at step k),
  and the batches that follow the last one."""
  src = tmp_path / "train.jsonl"
  _write_records(src, 11)
  it = _dataset(src)
  mgr = checkpoint.manager(tmp_path / "run", async_save=True)
  drawn = 0
  for k in steps:
    for _ in range(k - drawn):
      next(it)
    drawn = k
    checkpoint.save(mgr, k, _state(k), it)
  after = [next(it) for _ in range(5)]  # (drawn while the async save may still be writing)
  mgr.wait_until_finished()
  mgr.close()
  it.close()
  return tmp_path / "run", src, after


def _restore(run_dir, src):
  it = _dataset(src)
  mgr = checkpoint.manager(run_dir)
  try:
    return checkpoint.restore_latest(mgr, ABSTRACT, it), it
  finally:
    mgr.close()


def _assert_bit_exact(got, want):
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    assert np.asarray(g).tobytes() == np.asarray(w).tobytes()


def test_round_trip_is_bit_exact_and_the_data_continues_where_it_was_saved(tmp_path):
  run_dir, src, after = _run(tmp_path)
  state, it = _restore(run_dir, src)
  _assert_bit_exact(state, _state(6))
  for want in after:  # no batch seen twice or skipped
    got = next(it)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  it.close()


def test_partial_and_incomplete_step_directories(tmp_path):
  run_dir, src, _ = _run(tmp_path)
  ckpts = run_dir / "checkpoints"
  # A save killed mid-write leaves orbax's temporary directory: not a step, nothing warned.
  shutil.copytree(ckpts / "6", ckpts / "8.orbax-checkpoint-tmp-1234")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    state, it = _restore(run_dir, src)
  assert int(state["step"]) == 6 and it.get_state() == _restored_state(run_dir, 6)
  it.close()
  # A step directory without its files (a copy cut short), and one whose data position is torn:
  # skipped with a warning, set aside, and the data position is the older checkpoint's.
  (ckpts / "10").mkdir()
  (ckpts / "6" / "data" / "process_0-of-1.json").write_text('{"grain": ')
  with pytest.warns(RuntimeWarning, match="corrupt or incomplete"):
    state, it = _restore(run_dir, src)
  _assert_bit_exact(state, _state(4))
  assert it.get_state() == _restored_state(run_dir, 4)
  it.close()
  assert checkpoint.saved_steps(run_dir) == [2, 4]
  assert sorted(p.name for p in (run_dir / "unreadable_checkpoints").iterdir()) == ["10", "6"]


def _restored_state(run_dir, step):
  return json.loads((run_dir / "checkpoints" / str(step) / "data" / "process_0-of-1.json")
                    .read_text())


def test_a_changed_data_source_is_refused_not_taken_for_corruption(tmp_path):
  # Records appended to the file since the save: its shuffled order is another, and the saved
  # position would replay some records and skip others. Refused by name; nothing set aside.
  run_dir, src, _ = _run(tmp_path)
  _write_records(src, 12)
  with pytest.raises(data.DataChangedError, match="source of 11 records, and the data now "
                                                  "holds 12"):
    _restore(run_dir, src)
  assert checkpoint.saved_steps(run_dir) == [2, 4, 6]
  assert not (run_dir / "unreadable_checkpoints").exists()


def test_an_unreadable_file_is_named_not_taken_for_corruption(tmp_path, monkeypatch):
  # A file this process may not read (a permission, as orbax wraps a shard's read error): the
  # checkpoint is intact, so no older step is restored in its place and nothing is set aside.
  # Only the newest is unreadable: the older ones would restore.
  run_dir, src, _ = _run(tmp_path)
  real = ocp.CheckpointManager.restore

  def denied(self, step, *args, **kwargs):
    if step != 6:
      return real(self, step, *args, **kwargs)
    path = run_dir / "checkpoints" / str(step) / "state"
    raise Exception("Encountered error while reading array index") from PermissionError(
        13, "Permission denied", str(path))
  monkeypatch.setattr(ocp.CheckpointManager, "restore", denied)
  with pytest.raises(checkpoint.CheckpointRestoreError,
                     match=r"cannot be read \(\[Errno 13\] Permission denied: .*/6/state'\); .*"
                           "give this process read access"):
    _restore(run_dir, src)
  assert checkpoint.saved_steps(run_dir) == [2, 4, 6]
  assert not (run_dir / "unreadable_checkpoints").exists()


def test_load_params_reads_the_newest_params_in_their_saved_dtypes(tmp_path):
  # decode.py and eval read a run's weights through load_params: the newest step, each array in
  # the dtype it was trained in. The training tests' runs are all float32, so a bf16 param read
  # back as float32 (twice its memory, and not the model trained) passed them.
  run_dir, _, _ = _run(tmp_path)
  step, params = checkpoint.load_params(run_dir)
  assert step == 6
  _assert_bit_exact(params, _state(6)["params"])


def test_a_checkpoint_that_cannot_be_written_is_one_named_error(tmp_path):
  # A full disk surfaced as hundreds of lines of orbax and asyncio tracebacks at the next save.
  mgr = checkpoint.manager(tmp_path / "checkpoints", 2, False)

  class Full:
    directory = mgr.directory

    def save(self, *a, **k):
      try:
        raise OSError(28, "No space left on device")
      except OSError as e:
        raise ValueError("OUT_OF_RANGE: Error writing " + "x" * 400 + " [os_error_code=28]") from e

    wait_until_finished = save

  with pytest.raises(checkpoint.CheckpointSaveError,
                     match=r"saving checkpoint step 5 in .*checkpoints failed \(OSError: \[Errno "
                           r"28\] No space left on device\); .* continue with --resume") as e:
    checkpoint.save(Full(), 5, {"w": np.zeros(2)})
  assert isinstance(e.value.__cause__, ValueError)
  with pytest.raises(checkpoint.CheckpointSaveError, match=r"finishing the last checkpoint in "):
    checkpoint.wait_until_saved(Full())
  mgr.close()
