"""Fine-tunes an AR model into a block-diffusion model (or trains the AR baseline).

  python train.py --config configs/tiny.py
  python train.py --config configs/qwen2.5_1.5b.py --set init.source=/models/Qwen2.5-1.5B-Instruct
  python train.py --config configs/tiny.py --resume      # continue train.run_dir exactly
  python train.py --config runs/tiny/config.json --resume   # the same, without repeating --set

Every config field can be set with --set section.field=value (see dllm_jax/config.py and
dllm_jax/run_config.py for the sections).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, action="append",
                      help="a Python config file, e.g. configs/tiny.py, or a run's "
                           "config.json (to --resume it as it was started)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override one config field, e.g. --set train.steps=100 (repeatable)")
  parser.add_argument("--resume", action="store_true",
                      help="continue from the newest good checkpoint in train.run_dir")
  args = parser.parse_args(argv)
  if len(args.config) > 1:  # (argparse keeps the last; a --set given twice is an error too)
    parser.error(f"--config given {len(args.config)} times ({', '.join(args.config)}); give one")
  args.config = args.config[0]
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  logging.captureWarnings(True)  # (a library's warning as one log line, not file:line + source)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax narrates every file it writes
  # (jax reports at INFO each platform plugin it tried and did not find: libtpu on every GPU or
  # CPU run)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

  from dllm_jax import run_config, training
  from dllm_jax.checkpoint import CheckpointRestoreError, CheckpointSaveError
  from dllm_jax.config import ConfigError
  from dllm_jax.convert import CheckpointError
  from dllm_jax.data import DataError
  from dllm_jax.tokenizer import TokenizerError

  try:
    cfg = run_config.load(args.config, args.set)
    result = training.train(cfg, resume=args.resume)
  except (ConfigError, CheckpointError, CheckpointRestoreError, DataError, TokenizerError) as e:
    # Bad input, explained in the message: no traceback.
    print(f"error: {e}", file=sys.stderr)
    return _leave(2)
  except (training.DivergedError, CheckpointSaveError) as e:  # (a failed run, explained)
    print(f"error: {e}", file=sys.stderr)
    return _leave(1)
  except BaseException:
    if _multi_process():
      traceback.print_exc()
      return _leave(1)
    raise
  if result.get("stopped"):
    # Not finished: a scheduler must not take it for a finished run (128 + the signal, as a
    # shell reports a process the signal ended: 143 for SIGTERM, 130 for Ctrl-C).
    name = result.get("signal", "SIGTERM")
    print(f"stopped by {name} at step {result['step']} (saved); continue it with --resume")
    print(f"run directory: {cfg.train.run_dir}")
    return _leave(130 if name == "SIGINT" else 143)
  print(_summary_line(result, cfg.train.steps, cfg.objective.kind))
  print(f"run directory: {cfg.train.run_dir}")
  return 0


def _summary_line(result: dict, steps: int, kind: str = "diffusion") -> str:
  """The line a finished run ends with: its last loss, or, where this invocation ran no step
  (a resumed run already at train.steps), that, not a 'loss nan' that reads as a diverged run."""
  if "loss" in result:
    line = f"step {result['step']}: loss {result['loss']:.4f}"
  elif result["step"] >= steps:
    line = (f"step {result['step']}: no step to run, the run is at train.steps={steps} already "
            "(--set train.steps=N continues it to step N)")
  else:
    line = f"step {result['step']}: no step ran (the data ran out)"
  if "eval_accuracy" in result:
    what = "next-token" if kind == "ar" else "masked-token"  # (what the eval scores)
    line += (f"; held-out {what} accuracy {result['eval_accuracy']:.3f} over "
             f"{int(result['eval_tokens'])} tokens (eval loss {result['eval_loss']:.4f})")
  return line


def _multi_process() -> bool:
  jax = sys.modules.get("jax")
  return jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1


# How long a leaving process waits for its peers to leave too (an error every process raises,
# e.g. a config one), before it goes alone (an error only it saw; its peers may wait for it in
# a collective they will never finish).
LEAVE_TOGETHER_S = 10.0


def _leave(code: int) -> int:
  """`code`, returned; in a multi-process job the process ends here instead. An error seen by
  one process only would otherwise leave it in jax.distributed's shutdown barrier, waiting for
  peers that wait in a collective for it: gone, it lets the coordination service end them.

  Where every process raised the error, they meet first, and process 0, which hosts the
  coordination service, leaves last: a peer still on its way out when the service went away was
  ended by its client (SIGABRT and a stack trace in place of its error message; seen under
  load in tests/test_multihost.py)."""
  if _multi_process():
    sys.stdout.flush()
    sys.stderr.flush()
    import jax
    from jax._src import distributed

    try:
      distributed.global_state.client.wait_at_barrier("dllm_jax_leave",
                                                      int(LEAVE_TOGETHER_S * 1000))
      if jax.process_index() == 0:
        time.sleep(1.0)  # the others' os._exit follows their barrier at once
    except Exception:  # noqa: BLE001  (a peer that did not come: leave alone)
      pass
    os._exit(code)
  return code


if __name__ == "__main__":
  sys.exit(main())
