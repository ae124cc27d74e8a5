"""Two JAX processes on localhost (CPU, two devices each) train through jax.distributed and
checkpoint: one global mesh over 4 devices, each process saving its own data-iterator state."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import types

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two(run_dir, steps, resume=False, extra=(), devices=2, env_extra=None):
  """train.py as two processes of one job; [(returncode, stdout, stderr)] of each. `extra`
  overrides replace the defaults of the same key; `env_extra` adds to both's environment."""
  port = _free_port()
  sets = {s.split("=")[0]: s for s in (
      f"train.steps={steps}", f"train.run_dir={run_dir}", "checkpoint.every_steps=2",
      "data.batch_size=8", "data.seq_len=48", "train.progress=false",
      "train.eval_batches=0", "mesh.data=2", f"mesh.fsdp={devices}", *extra)}.values()
  cmd = [sys.executable, "train.py", "--config", "configs/tiny.py"] + (["--resume"] * resume)
  for s in sets:
    cmd += ["--set", s]
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               DLLM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", DLLM_NUM_PROCESSES="2",
               DLLM_PROCESS_ID=str(pid), **(env_extra or {}))
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=500))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def test_two_processes_train_and_checkpoint(tmp_path):
  run_dir = tmp_path / "run"
  runs = _run_two(run_dir, 3)
  procs = [types.SimpleNamespace(returncode=rc) for rc, _, _ in runs]
  outputs = [(out, err) for _, out, err in runs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
    assert "step 3: loss" in out
  # Both processes ran the same global steps (the loss is a global, replicated value).
  final = [[l for l in out.splitlines() if l.startswith("step 3: loss")] for out, _ in outputs]
  assert final[0] == final[1]
  assert "process 0 of 2" in outputs[0][1] and "process 1 of 2" in outputs[1][1]
  assert "{'data': 2, 'fsdp': 2, 'tensor': 1}" in outputs[0][1]

  ckpts = run_dir / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir()) == [2, 3]
  for step in (2, 3):
    data_states = sorted(p.name for p in (ckpts / str(step) / "data").glob("process_*.json"))
    assert data_states == ["process_0-of-2.json", "process_1-of-2.json"]
  # Process 0 alone writes the metrics and the run files.
  steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3]
  assert (run_dir / "model.json").is_file() and (run_dir / "tokenizer" / "tokenizer.json").is_file()

  # One process's data state of the last checkpoint lost: both resume from the one before (the
  # lost one set aside), not one from each (which hung: the processes' collectives differed).
  (ckpts / "3" / "data" / "process_1-of-2.json").unlink()
  runs = _run_two(run_dir, 4, resume=True)
  for rc, out, err in runs:
    assert rc == 0, err[-3000:]
    assert "resumed at step 2" in err and "step 4: loss" in out
  assert (run_dir / "unreadable_checkpoints" / "3").is_dir()
  assert sorted(int(p.name) for p in ckpts.iterdir()) == [2, 4]


def test_processes_end_together_when_their_shards_run_out_at_different_steps(tmp_path):
  # Nine records over two processes (five and four) with one epoch: one process's shard runs out
  # a step before the other's. Each stopping on its own left the other in the next step's
  # collectives for ever; they must agree to end at the same step, and end it as a finished run.
  records = tmp_path / "nine.jsonl"
  records.write_text("".join(json.dumps({"prompt": f"reverse: {w}", "response": w[::-1]}) + "\n"
                             for w in ("dacedd", "dcebe", "cbae", "abcde", "edcba", "bbad",
                                       "cadeb", "eebac", "dabc")))
  runs = _run_two(tmp_path / "run", 1000, devices=1, extra=(
      f"data.source={records}", "data.num_epochs=1", "checkpoint.async_save=false",
      "train.log_every=1000"))
  finals = []
  for rc, out, err in runs:
    assert rc == 0, err[-3000:]
    assert "the data ran out (data.num_epochs=1) after step" in err
    finals += [l for l in out.splitlines() if l.startswith("step ")]
  assert len(finals) == 2 and finals[0] == finals[1] and not finals[0].startswith("step 1000")
  assert "loss nan" not in finals[0]  # the last step's metrics are on record


def test_a_data_error_on_one_process_stops_both(tmp_path):
  # A malformed record in process 1's shard under data.strict: process 1 raised alone and waited
  # in jax.distributed's shutdown barrier, process 0 in the next collective, both for ever.
  lines = [json.dumps({"prompt": f"reverse: {w}", "response": w[::-1]})
           for w in ("abcde", "bcdea", "cdeab", "deabc", "eabcd", "abced")]
  lines[3] = '{"prompt": "broken"'  # (unshuffled, odd records are process 1's)
  records = tmp_path / "bad.jsonl"
  records.write_text("\n".join(lines) + "\n")
  runs = _run_two(tmp_path / "run", 6, devices=1, extra=(
      f"data.source={records}", "data.shuffle=false", "data.strict=true"))
  (rc0, _, err0), (rc1, _, err1) = runs
  assert rc0 == rc1 == 2, (err0[-2000:], err1[-2000:])
  assert "bad.jsonl:4: malformed JSON" in err1
  assert "reading the data failed on another process" in err0


def test_process_settings_from_the_environment_are_checked(monkeypatch):
  from dllm_jax import config, training
  monkeypatch.setenv("DLLM_COORDINATOR_ADDRESS", "127.0.0.1:1")
  monkeypatch.setenv("DLLM_NUM_PROCESSES", "two")
  with pytest.raises(config.ConfigError, match="DLLM_NUM_PROCESSES='two': an integer expected"):
    training.maybe_initialize_distributed(config.MeshConfig())


def test_a_mesh_that_does_not_split_the_batch_over_the_processes_is_refused(tmp_path):
  # tensor=2 over one device of each process: both would feed the same (replicated) batch shard
  runs = _run_two(tmp_path / "run", 2, devices=1, extra=("mesh.data=1", "mesh.fsdp=1",
                                                                    "mesh.tensor=2"))
  for rc, _, err in runs:
    assert rc == 2 and "error: multi-host: the mesh splits the batch into 1 shards" in err, \
        err[-2000:]
  assert not (tmp_path / "run").exists()  # refused before anything is written


def test_an_error_every_process_raises_ends_each_with_its_message_when_one_is_late(tmp_path):
  # The same refusal, with process 1 reaching it 3 s after process 0 (a sitecustomize delays its
  # check): process 0 hosts the coordination service, and leaving first it had process 1 ended
  # by its client (SIGABRT, a stack trace, no message), as a loaded CI machine once did.
  hook = tmp_path / "hook"
  hook.mkdir()
  (hook / "sitecustomize.py").write_text(
      "import os, time\n"
      "if os.environ.get('DLLM_PROCESS_ID') == '1':\n"
      "  from dllm_jax import training\n"
      "  check = training.check_batch_size\n"
      "  def late(*args, **kwargs):\n"
      "    time.sleep(3.0)\n"
      "    return check(*args, **kwargs)\n"
      "  training.check_batch_size = late\n")
  runs = _run_two(tmp_path / "run", 2, devices=1,
                  extra=("mesh.data=1", "mesh.fsdp=1", "mesh.tensor=2"),
                  env_extra={"PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])})
  for rc, _, err in runs:
    assert rc == 2 and "error: multi-host: the mesh splits the batch into 1 shards" in err, \
        err[-2000:]
