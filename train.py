"""Fine-tunes an AR model into a block-diffusion model (or trains the AR baseline).

  python train.py --config configs/tiny.py
  python train.py --config configs/qwen2.5_1.5b.py --set init.source=/models/Qwen2.5-1.5B-Instruct
  python train.py --config configs/tiny.py --resume      # continue train.run_dir exactly

Every config field can be set with --set section.field=value (see dllm_jax/config.py and
dllm_jax/run_config.py for the sections).
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="a Python config file, e.g. configs/tiny.py")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override one config field, e.g. --set train.steps=100 (repeatable)")
  parser.add_argument("--resume", action="store_true",
                      help="continue from the newest good checkpoint in train.run_dir")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax narrates every file it writes

  from dllm_jax import run_config, training
  from dllm_jax.checkpoint import CheckpointRestoreError
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
    return 2
  line = f"step {result['step']}: loss {result.get('loss', float('nan')):.4f}"
  if "eval_accuracy" in result:
    line += (f"; held-out masked-token accuracy {result['eval_accuracy']:.3f} over "
             f"{int(result['eval_tokens'])} tokens (eval loss {result['eval_loss']:.4f})")
  print(line)
  print(f"run directory: {cfg.train.run_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
