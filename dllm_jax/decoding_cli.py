"""The decoding flags that `decode.py` and `python -m dllm_jax.eval` share: their definitions, the
check of their values before the (slow) checkpoint load, the checkpoint loaded for decoding, and
the `DecodeConfig` they make. One definition, so the two commands decode alike and say the same.

Building the parser imports no jax, so `--help` and a flag outside its choices answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import warnings
from typing import Any, Iterator

from dllm_jax.config import KERNEL_LAYOUTS  # (config imports no jax)

# Literal here, so that building the parser imports no jax; a test checks them against
# `decoding.MODES` and `model.LAYOUTS`.
MODES = ("diffusion", "ar")
LAYOUTS = ("stacked", "per_layer")
DEFAULT_BLOCK_SIZE = 32  # the authors' (Fast-dLLM v2's models are trained with it)
DEFAULT_SUB_BLOCK = 8  # the authors' sub-block
DEFAULT_THRESHOLD = 0.9  # the authors' confidence threshold


class UsageError(ValueError):
  """A bad command line, prompts file or checkpoint for the chosen mode."""


class UsageExit(SystemExit):
  """Ends a command on bad input with exit status 2, as argparse's own usage errors and train.py's
  bad-input errors do (a SystemExit given a message would exit 1). `str()` is the message."""

  def __init__(self, message: str):
    super().__init__(2)
    self.message = message

  def __str__(self):
    return self.message


def cli_warnings(prog: str) -> None:
  """Warnings printed as `prog: warning: message`, like the errors' lines, where Python's default
  prints the file and line that raised them and that line's source (for a command-line user,
  noise around the message)."""
  warnings.formatwarning = lambda message, *_, **__: f"{prog}: warning: {message}\n"


@contextlib.contextmanager
def quiet_broken_pipe():
  """A reader that closed the pipe early (`decode.py ... | head -1`) ends the command quietly
  with 141 (128 + SIGPIPE, as a shell reports it), not with a BrokenPipeError traceback; stdout
  goes to /dev/null first so that Python's flush at exit does not raise again."""
  try:
    yield
  except BrokenPipeError:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(141) from None


def usage_exit(prog: str, message: str) -> UsageExit:
  """The exit for `prog: error: message`, the line written to stderr first (a SystemExit with an
  integer status prints nothing itself)."""
  line = f"{prog}: error: {message}"
  print(line, file=sys.stderr)
  return UsageExit(line)


def jsonl_values(data: bytes, name: str) -> Iterator[tuple[str, Any]]:
  """(where, value) of each non-blank line of a JSONL file's bytes, `where` being 'name:line';
  a UsageError naming the line for one that is not UTF-8 or not JSON. Lazy: a caller that stops
  early never reads the lines after."""
  for number, raw in enumerate(data.splitlines(), 1):
    where = f"{name}:{number}"
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise UsageError(f"{where}: not UTF-8 text ({e})") from None
    if number == 1:
      line = line.removeprefix("\ufeff")  # (a UTF-8 BOM, as some editors save; data.py too)
    if not line.strip():
      continue
    try:
      yield where, json.loads(line)
    except json.JSONDecodeError as e:
      raise UsageError(f"{where}: not valid JSON ({e.msg})") from None


def add_arguments(parser: argparse.ArgumentParser, *, batch_size: int) -> None:
  """The shared flags; `batch_size` is the command's default batch."""
  parser.add_argument("--checkpoint", required=True,
                      help="training run dir, HF dir, .gguf file or smollm2-135m-instruct")
  parser.add_argument("--mode", choices=MODES, default="diffusion")
  parser.add_argument("--threshold", type=float, default=None,
                      help="diffusion: unmask every token whose confidence exceeds this "
                           f"(default {DEFAULT_THRESHOLD})")
  parser.add_argument("--block-size", type=int, default=None,
                      help="diffusion block size (default: the one a run of ours was trained "
                           f"with, from its model.json; else {DEFAULT_BLOCK_SIZE}, the authors')")
  parser.add_argument("--sub-block-size", type=int, default=None,
                      help=f"diffusion: tokens decoded in parallel (default {DEFAULT_SUB_BLOCK})")
  parser.add_argument("--max-new-tokens", type=int, default=256)
  parser.add_argument("--batch-size", type=int, default=batch_size)
  parser.add_argument("--no-dual-cache", action="store_true",
                      help="forward the whole block every step (the authors' "
                      "use_block_cache=False)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                      help="compute and weight dtype (default: bfloat16 on GPU/TPU, float32 on "
                           "CPU)")
  parser.add_argument("--layout", choices=LAYOUTS, default="per_layer",
                      help="parameter layout to decode with: per_layer (unstacked once after "
                           "loading; 2x faster steps for Qwen2.5-1.5B on an H100, 2.5-5x the "
                           "compile time) or stacked (as saved; better for one short prompt)")
  parser.add_argument("--matvec", choices=["auto", "xla", "pallas"], default="auto",
                      help="one-row projections of AR decoding at batch 1: pallas fuses each "
                           "layer's norms into them (GPU); auto: pallas where it pays, see "
                           "model.matvec_impl")
  parser.add_argument("--kernel-layout", choices=("auto",) + KERNEL_LAYOUTS, default="auto",
                      help="store the projection kernels [*in, *out] (in_out) or [*out, *in] "
                           "(out_in) to decode with, transposed once after loading; auto: "
                           "out_in where AR at batch 1 runs the one-row kernels, else in_out "
                           "(model.decode_kernel_layout)")
  parser.add_argument("--force", action="store_true",
                      help="diffusion-decode a model not trained for it (warns instead of "
                           "refusing)")


# DecodeConfig's fields that are this command line's flags, named as the flags in its errors.
_FLAG_FIELDS = ("max_new_tokens", "sub_block_size", "block_size", "threshold", "temperature",
                "top_p", "mode")


def as_flags(message: str) -> str:
  """A decoding error's text with DecodeConfig's field names written as the flags that set
  them ('DecodeConfig.max_new_tokens=0' -> '--max-new-tokens=0')."""
  message = re.sub(r"DecodeConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-")
                   if m.group(1) in _FLAG_FIELDS else m.group(0), message)
  # (the plain names that are not also English words)
  return re.sub(r"\b(max_new_tokens|sub_block_size|block_size|top_p)\b",
                lambda m: "--" + m.group(1).replace("_", "-"), message)


def check(args, recorded: int | None = None, **sampling) -> None:
  """UsageError for a shared flag's bad value, before the checkpoint's weights are read.
  `sampling`: the command's own `DecodeConfig` fields (temperature, top_p), checked with the
  rest. Without --block-size, the sub-block size is checked against `recorded`, the size the
  loaded checkpoint was trained with (`load`), else the size its JSON records
  (`recorded_block_size`: a run's model.json, an export's config.json), else the default."""
  from dllm_jax import decoding

  if args.batch_size < 1:
    raise UsageError(f"--batch-size={args.batch_size}: must be >= 1")
  unused = [flag for flag, given in (("--threshold", args.threshold is not None),
                                     ("--block-size", args.block_size is not None),
                                     ("--sub-block-size", args.sub_block_size is not None),
                                     ("--no-dual-cache", args.no_dual_cache)) if given]
  if args.mode == "ar" and unused:
    warnings.warn(f"{', '.join(unused)} set the diffusion decoder; --mode ar decodes one token a "
                  "step and ignores them", stacklevel=2)
  if not -2**63 <= args.seed < 2**63:  # (jax.random.key takes a 64-bit integer)
    raise UsageError(f"--seed={args.seed}: must fit in 64 bits (|seed| < 2**63)")
  from_checkpoint = args.mode == "diffusion" and args.block_size is None
  if from_checkpoint and recorded is None:
    recorded = recorded_block_size(args.checkpoint)
  try:
    _config(args, recorded, **sampling)
  except decoding.DecodeError as e:
    message = as_flags(str(e))
    if from_checkpoint and "--block-size" in message:
      message += f" ({args.checkpoint} " + (
          f"was trained with blocks of {recorded} tokens)" if recorded is not None else
          f"records no block size: the default, {DEFAULT_BLOCK_SIZE})")
    raise UsageError(message) from None
  if sampling.get("temperature") == 0 and sampling.get("top_p", 1.0) != 1.0:
    warnings.warn(f"--top-p {sampling['top_p']} shapes sampling; --temperature 0 decodes "
                  "greedily and ignores it (give a --temperature above 0 to sample)",
                  stacklevel=2)


def recorded_block_size(checkpoint: str) -> int | None:
  """The block size a checkpoint of ours was trained with, from its small JSON file (a run's
  model.json, an export's config.json), without loading it; None where it records none or the
  file cannot be read (the load then says why)."""
  import pathlib

  path = pathlib.Path(checkpoint).expanduser()
  for name, read in (("model.json", lambda raw: raw.get("metadata", {})),
                     ("config.json", lambda raw: raw.get("dllm_jax") or {})):
    try:
      raw = json.loads((path / name).read_text())
      size = read(raw).get("block_size") if isinstance(raw, dict) else None
    except (OSError, ValueError, AttributeError):
      continue
    return size if isinstance(size, int) and not isinstance(size, bool) else None
  return None


def _config(args, block_size: int | None = None, **fields):
  """The flags' `DecodeConfig`; `block_size` stands in for an absent --block-size (else the
  default). --mode ar reads none of the diffusion flags (warned in `check`): the defaults stand
  in for them, so a value only diffusion would refuse is not an error."""
  from dllm_jax import decoding

  ar = args.mode == "ar"
  sub_block = DEFAULT_SUB_BLOCK if ar or args.sub_block_size is None else args.sub_block_size
  block = args.block_size if not ar and args.block_size is not None else (
      block_size if not ar and block_size is not None else DEFAULT_BLOCK_SIZE)
  return decoding.DecodeConfig(
      mode=args.mode, max_new_tokens=args.max_new_tokens, block_size=block,
      sub_block_size=sub_block,
      threshold=DEFAULT_THRESHOLD if ar or args.threshold is None else args.threshold,
      use_dual_cache=ar or not args.no_dual_cache, **fields)


def load(args, command: str, *, batch: int | None = None):
  """The checkpoint as a `convert.Pretrained` for decoding: with a tokenizer, a block-diffusion
  model for --mode diffusion (or --force, with a warning), cast to the dtype and in the layouts
  asked for. `command` names the caller in errors; `batch` is the batch the decoder will run
  (default --batch-size), which `--kernel-layout auto` decides on."""
  import jax

  from dllm_jax import checkpoint, convert, model

  dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  try:
    # (loaded in the dtype it will run in: a 7B HF directory read as float32 first would take
    # 30 GB of host memory)
    pretrained = checkpoint.load_model(args.checkpoint, dtype=dtype)
  except (ValueError, OSError, checkpoint.CheckpointRestoreError) as e:
    # What a bad path or file raises: CheckpointError, ConfigError, TokenizerError (ValueErrors),
    # a missing or unreadable file (OSError), a checkpoint orbax cannot restore.
    raise UsageError(f"--checkpoint {args.checkpoint}: {e}{_inside_run_hint(args.checkpoint)}"
                     ) from None
  mismatch = model.params_mismatch(pretrained.params, pretrained.config)
  if mismatch:
    raise UsageError(f"--checkpoint {args.checkpoint}: its weights are not the model its config "
                     f"describes ({mismatch}); the config (a run's model.json, a HF "
                     "config.json) and the weights come from different models")
  if pretrained.tokenizer is None:
    raise UsageError(f"{args.checkpoint} has no tokenizer; {command} needs one to encode text")
  if args.mode == "diffusion":
    reason = convert.not_diffusion_reason(pretrained)
    if reason and pretrained.config.mask_token_id is None:
      # (--force cannot help: there is no mask token to fill the blocks with)
      raise UsageError(f"{args.checkpoint} is not a block-diffusion model ({reason}); decode "
                       "it with --mode ar, or fine-tune it into one with train.py (which adds "
                       "the mask token)")
    if reason and not args.force:
      raise UsageError(f"{args.checkpoint} is not a block-diffusion model ({reason}); use "
                       "--mode ar, fine-tune it with train.py, or --force to decode it anyway")
    if reason:
      warnings.warn(f"{args.checkpoint}: {reason}; diffusion decoding it anyway (--force)",
                    stacklevel=2)
    trained = pretrained.metadata.get("block_size")
    trained = trained if isinstance(trained, int) else None
    if args.block_size is None and trained is not None:
      check(args, trained)  # (`check` read it from the checkpoint's JSON: again as loaded)
      args.block_size = trained
    elif trained is not None and args.block_size != trained:
      warnings.warn(f"{args.checkpoint} was trained with blocks of {trained} tokens; decoding "
                    f"with --block-size {args.block_size}, which it has not seen (pass "
                    f"--block-size {trained} to decode it as trained)", stacklevel=2)
  kernel_layout = args.kernel_layout
  if kernel_layout == "auto":  # (decided on the config the decoder will run)
    runs = convert.cast_config(pretrained.config, dtype, args.matvec)
    try:
      kernel_layout = model.decode_kernel_layout(
          runs, mode=args.mode, batch=args.batch_size if batch is None else batch,
          stacked=args.layout == "stacked")
    except ValueError as e:  # (--matvec pallas where the kernels do not run: named)
      raise UsageError(f"--matvec {args.matvec}: {e}") from None
  try:
    return convert.cast(pretrained, dtype, args.layout, args.matvec, kernel_layout)
  except ValueError as e:  # (what the checks above did not foresee: one line, not a traceback)
    raise UsageError(f"--checkpoint {args.checkpoint}: {e}") from None


def _inside_run_hint(path: str) -> str:
  """For a path inside a training run's checkpoints/ (a step directory, as MaxText's
  load_parameters_path names one): the run directory to pass instead."""
  import pathlib

  from dllm_jax import checkpoint

  p = pathlib.Path(path)
  for run in list(p.parents)[:3]:
    if checkpoint.is_run_dir(run) and p.resolve().is_relative_to(
        (run / checkpoint.CHECKPOINTS).resolve()):
      return (f"; {path} is inside the training run {run}: pass --checkpoint {run} (its newest "
              "good checkpoint is loaded)")
  return ""


def encode(tokenizer, conversation, raw: bool = False) -> list[int]:
  """A conversation's prompt ids: through the tokenizer's chat template (ending in the
  assistant's turn), or its messages' text joined by newlines when `raw` or without a template
  (with what the tokenizer adds to a plain text, e.g. Llama's BOS)."""
  if raw or not tokenizer.chat_template:
    return tokenizer.encode("\n".join(m["content"] for m in conversation),
                            add_special_tokens=True)
  return tokenizer.encode(tokenizer.apply_chat_template(conversation, add_generation_prompt=True))


def encode_at(tokenizer, conversation, where: str, raw: bool = False) -> list[int]:
  """`encode`, a text the tokenizer cannot encode named by `where` it came from (UsageError)."""
  from dllm_jax import tokenizer as tokenizer_lib

  try:
    return encode(tokenizer, conversation, raw)
  except tokenizer_lib.TokenizerError as e:
    raise UsageError(f"{where}: {e}") from None


def prompt_width(n: int, cfg, model_cfg, steps: int = 1) -> int:
  """The prompt width for prompts of up to `n` tokens: whole blocks, in steps of `steps` blocks
  (a chat's growing conversation recompiles rarely), where that still fits the context; else `n`
  itself (the padding is there for reusing compiled programs: it must not cost context)."""
  from dllm_jax import decoding

  for blocks in (steps, 1):
    width = -(-n // (blocks * cfg.block_size)) * blocks * cfg.block_size
    if decoding.reach(cfg, width) <= model_cfg.max_position_embeddings:
      return width
  return n


def decode_config(args, pretrained, **sampling):
  """The `DecodeConfig` of the flags, stopping where the model's chat turn ends and padding with
  the tokenizer's (else the model's) pad token."""
  from dllm_jax import decoding

  tok, cfg = pretrained.tokenizer, pretrained.config
  pad = next((i for i in (tok.pad_token_id, cfg.pad_token_id) if i is not None), 0)
  return _config(args, stop_token_ids=decoding.stop_token_ids(tok, cfg), pad_token_id=pad,
                 **sampling)
