"""GSM8K evaluation: batched generation, answer extraction, accuracy with its standard error, speed.

    python -m dllm_jax.eval gsm8k --checkpoint DIR --data test.jsonl [--mode diffusion|ar]
        [--threshold 0.9] [--sub-block-size 8] [--batch-size 32] [--limit N] [--out gen.jsonl]
        [--compare-to other_gen.jsonl] [--layout stacked|per_layer] [--json]

Every batch has the same shape (prompts padded to one length, the last batch filled with copies
of its first row that are dropped afterwards), so the decoder compiles once; compile time is
reported apart from the timed generation.

With --out, each batch's generations reach OUT.partial as they are made (the flags beside them
in OUT.partial.json), and OUT is written whole at the end. Ctrl-C or SIGTERM stops the run after
the batch being decoded (a second one at once) with the summary of the problems done, exit
status 128 + the signal; `--resume` with the same flags decodes the rest, and its OUT is the one
an uninterrupted run writes (a batch's key depends only on --seed and its first problem).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import signal
import sys
import threading
import time
import warnings
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax import decoding, decoding_cli, model

# A minus sign counts only where a number starts ("3-4 hours" holds 3 and 4, not -4), and a
# number is not the tail of a word ("Q2") or of a decimal ("3.5" holds 3.5 alone); words are
# ASCII ("答案是18" holds 18), and an ellipsis is no decimal point ("is...18" holds 18).
_NUMBER = re.compile(r"(?<![A-Za-z0-9_])(?<!\d\.)-?\d[\d,]*(?:\.\d+)?"
                     r"|(?<![A-Za-z0-9_.])-?\.\d+")


def normalize_number(text: str) -> Optional[str]:
  """'1,234.50' -> '1234.5'; None when `text` holds no number."""
  m = _NUMBER.search(text)
  if not m:
    return None
  s = m.group(0).replace(",", "")
  try:
    value = float(s)
  except ValueError:
    return None
  return str(int(value)) if value == int(value) else repr(value)


def extract_answer(text: str) -> Optional[str]:
  """The number after the first '####' (lm-eval's strict match: a model that runs on past its
  answer often invents a next "Question: ... #### n"), else the last number in the text."""
  if "####" in text:
    found = normalize_number(text.split("####", 1)[1])
    if found is not None:
      return found
  numbers = _NUMBER.findall(text)
  for candidate in reversed(numbers):
    found = normalize_number(candidate)
    if found is not None:
      return found
  return None


@dataclasses.dataclass(frozen=True)
class Problem:
  index: int
  question: str
  gold: str
  where: str = ""  # file:line it was read from (named in errors)


def load_gsm8k(path: str | pathlib.Path, limit: Optional[int] = None) -> list[Problem]:
  path = pathlib.Path(path)
  if path.is_dir():
    raise FileNotFoundError(f"GSM8K file {path} is a directory; pass --data PATH/test.jsonl")
  if not path.is_file():
    raise FileNotFoundError(f"GSM8K file {path} does not exist; pass --data PATH/test.jsonl")
  problems = []
  for where, rec in decoding_cli.jsonl_values(path.read_bytes(), str(path)):
    try:
      question, answer = rec["question"], rec["answer"]
    except (KeyError, TypeError) as e:
      raise ValueError(f"{where}: not a GSM8K record with question/answer ({e})") from None
    if not isinstance(question, str) or not isinstance(answer, str):
      raise ValueError(f"{where}: question and answer must be strings, got "
                       f"{type(question).__name__} and {type(answer).__name__}")
    # The gold answer is the number after '####' and nothing else: `extract_answer`'s fallback
    # to the text's last number is for generations, and in a reference answer it would take a
    # number from the working (e.g. "48/2 = 24") as the answer.
    _, marker, final = answer.partition("####")
    gold = normalize_number(final) if marker else None
    if gold is None:
      raise ValueError(f"{where}: the answer has no final number after '####' (GSM8K's "
                       "answers end in '#### N')")
    problems.append(Problem(len(problems), question, gold, where))
    if limit is not None and len(problems) >= limit:
      break
  if not problems:
    raise ValueError(f"{path} holds no GSM8K records (one JSON object with question and answer "
                     "a line)")
  return problems


def _name(problem: Problem) -> str:
  return f"problem {problem.index}" + (f" ({problem.where})" if problem.where else "")


def accuracy_with_se(correct: Sequence[bool]) -> tuple[float, float]:
  """Mean and its standard error sqrt(p (1 - p) / n)."""
  n = len(correct)
  if n == 0:
    return 0.0, 0.0
  p = sum(map(bool, correct)) / n
  return p, math.sqrt(p * (1 - p) / n)


def evaluate(pretrained, problems: Sequence[Problem], decode_cfg: decoding.DecodeConfig,
             batch_size: int, seed: int = 0, log=print,
             stop_token_ids: Optional[tuple[int, ...]] = None,
             layout: str = "per_layer", *, done: Sequence[dict] = (),
             on_batch: Optional[Callable[[list[dict]], None]] = None,
             stop: Optional[Callable[[], bool]] = None) -> tuple[list[dict], dict]:
  """Generates an answer for every problem; returns per-problem records and a summary.

  stop_token_ids: None stops where decode.py does (`decoding.stop_token_ids`).
  layout: `model.LAYOUTS`; "per_layer" (one buffer per layer, no layer loop in the decode step)
    decodes about twice as fast on a GPU as "stacked" (the layout saved); same tokens either way.
  done: the records of an interrupted run of the same settings, whole batches from the first
    problem; decoding goes on after them. Each batch's key depends only on the seed and the
    batch's first problem, so the records are those of a run never interrupted.
  on_batch: called with each batch's new records as soon as they exist (to keep them).
  stop: asked after each batch; True ends the run there (the summary then says "interrupted").
  Accuracy and the per-token counts cover every record; tokens/s, run_s and the rounds cover the
  batches decoded by this call.
  """
  whole = len(done) % batch_size == 0 or len(done) == len(problems)
  if not whole or [r["index"] for r in done] != [p.index for p in problems[:len(done)]]:
    raise ValueError(f"done: {len(done)} records that are not whole batches of {batch_size} "
                     "from the first problem, in order")
  tok = pretrained.tokenizer
  if tok is None:
    raise ValueError("the checkpoint has no tokenizer; evaluation needs one to render prompts")
  decode_cfg = dataclasses.replace(
      decode_cfg, stop_token_ids=(decoding.stop_token_ids(tok, pretrained.config)
                                  if stop_token_ids is None else stop_token_ids))
  # (As decode.py: the question as it is where the tokenizer has no chat template.)
  prompts = [decoding_cli.encode_at(tok, [{"role": "user", "content": p.question}], _name(p))
             for p in problems]
  model_cfg = pretrained.config
  widest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
  width = decoding_cli.prompt_width(len(prompts[widest]), decode_cfg, model_cfg)
  try:
    decoding.check_reach(model_cfg, decode_cfg, width)  # (before anything compiles)
  except decoding.DecodeError as e:  # (which problem: in a data set, the prompt is not at hand)
    raise decoding.DecodeError(
        f"{e} (the widest prompt: {_name(problems[widest])}, {len(prompts[widest])} tokens)"
        ) from None
  # The threshold is an argument, not a constant, so a sweep over thresholds compiles to the same
  # program (and hits JAX's persistent compilation cache when one is set).
  diffusion = decode_cfg.mode == "diffusion"
  fn = jax.jit(lambda params, toks, lens, rng, th: decoding.generate(
      params, model_cfg, toks, lens, rng, decode_cfg, threshold=th if diffusion else None))
  threshold = jnp.float32(decode_cfg.threshold)

  def batch_arrays(start):
    rows = list(range(start, min(start + batch_size, len(prompts))))
    rows += [rows[0]] * (batch_size - len(rows))
    toks = np.zeros((batch_size, width), np.int32)
    lens = np.zeros((batch_size,), np.int32)
    for r, i in enumerate(rows):
      toks[r, :len(prompts[i])] = prompts[i]
      lens[r] = len(prompts[i])
    return jnp.asarray(toks), jnp.asarray(lens)

  params = model.with_layout(pretrained.params, layout)
  rng = jax.random.key(seed)
  t0 = time.perf_counter()
  if len(done) < len(problems):
    compiled = fn.lower(params, *batch_arrays(0), rng, threshold).compile()
  compile_s = time.perf_counter() - t0

  records, run_s, run_tokens, total_iters = list(done), 0.0, 0, 0
  interrupted = False
  for start in range(len(done), len(prompts), batch_size):
    if stop is not None and stop():
      interrupted = True
      break
    toks, lens = batch_arrays(start)
    key = jax.random.fold_in(rng, start)
    jax.block_until_ready((toks, lens, key))
    t0 = time.perf_counter()
    out, lengths, stats = jax.block_until_ready(compiled(params, toks, lens, key, threshold))
    run_s += time.perf_counter() - t0
    out, lengths, nfe = np.asarray(out), np.asarray(lengths), np.asarray(stats["nfe"])
    total_iters += int(stats["iterations"])
    new = []
    for r in range(min(batch_size, len(prompts) - start)):
      p = problems[start + r]
      text = tok.decode(out[r, :lengths[r]].tolist())
      pred = extract_answer(text)
      run_tokens += int(lengths[r])
      new.append({"index": p.index, "question": p.question, "gold": p.gold,
                  "generation": text, "prediction": pred, "correct": pred == p.gold,
                  "tokens": int(lengths[r]), "nfe": int(nfe[r])})
    records += new
    if on_batch is not None:
      on_batch(new)
    log(f"[eval] {len(records)}/{len(problems)} problems, "
        f"{run_tokens / max(run_s, 1e-9):.1f} tokens/s")

  # (None for no problem: an interrupt before the first batch scores nothing, not 0)
  acc, se = accuracy_with_se([r["correct"] for r in records]) if records else (None, None)
  total_tokens = sum(r["tokens"] for r in records)
  total_nfe = sum(r["nfe"] for r in records)
  summary = {
      "n": len(records), "accuracy": acc, "stderr": se,
      # (None where this call decoded nothing: an interrupted run resumed after its last batch)
      "tokens_per_s": run_tokens / max(run_s, 1e-9) if run_s else None,
      "forwards_per_token": total_nfe / max(total_tokens, 1),
      "tokens_per_forward": total_tokens / max(total_nfe, 1),
      "generated_tokens": total_tokens, "run_s": run_s, "compile_s": compile_s,
      # How often a model fails to end its answer, and how often it writes GSM8K's marker: a
      # weak diffusion model loops until the token limit.
      "at_token_limit": sum(r["tokens"] >= decode_cfg.max_new_tokens for r in records)
                        / max(len(records), 1),
      "with_answer_marker": sum("####" in r["generation"] for r in records)
                            / max(len(records), 1),
      "batched_forward_rounds": total_iters, "batch_size": batch_size, "layout": layout,
      "kernel_layout": pretrained.config.kernel_layout,
      "decode": dataclasses.asdict(decode_cfg),
      "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
  }
  if done:
    summary["resumed_after"] = len(done)  # (problems decoded by the interrupted run)
  if interrupted:
    summary["interrupted"] = True
    summary["problems"] = len(problems)
  return records, summary


def agreement(records: Sequence[dict], reference: Sequence[dict]) -> float:
  """Share of problems whose predicted answer equals the reference run's for the same problem
  (two runs that both end without a number agree: parallel decoding changed nothing there)."""
  ref = {r["index"]: r["prediction"] for r in reference}
  shared = [r for r in records if r["index"] in ref]
  if not shared:
    raise ValueError("the two generation files share no problem index")
  return sum(r["prediction"] == ref[r["index"]] for r in shared) / len(shared)


def read_generations(path, problems: Sequence[Problem]) -> list[dict]:
  """Another run's generations JSONL (`--out`), checked before a run compares with it: every
  line an object with an integer "index" and a "prediction" (a string, or null for no number),
  some index among `problems`', and, where a record keeps its "question" (`--out` does), the
  same question as this run's problem of that index; else a UsageError naming the file (and
  line)."""
  where = f"--compare-to {path}"
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise decoding_cli.UsageError(f"{where}: {e}") from None
  questions = {p.index: p.question for p in problems}
  records = []
  for at, record in decoding_cli.jsonl_values(data, where):
    if not isinstance(record, dict) or "index" not in record or "prediction" not in record:
      raise decoding_cli.UsageError(f"{at}: expected an object with 'index' and "
                                    "'prediction' (a generations file written by --out)")
    index, prediction = record["index"], record["prediction"]
    if not isinstance(index, int) or isinstance(index, bool):
      raise decoding_cli.UsageError(f"{at}: 'index' must be an integer, got "
                                    f"{index!r}")
    if prediction is not None and not isinstance(prediction, str):
      raise decoding_cli.UsageError(f"{at}: 'prediction' must be a string or null, "
                                    f"got {prediction!r}")
    if index in questions and record.get("question", questions[index]) != questions[index]:
      raise decoding_cli.UsageError(
          f"{at}: problem {index} there is another question than this run's: "
          "compare generations of the same --data file")
    records.append(record)
  if not any(r["index"] in questions for r in records):
    raise decoding_cli.UsageError(f"{where}: shares no problem index with this run's "
                                  f"{len(questions)} problems")
  return records


def _check_out(out: str, inputs: Sequence[str]) -> None:
  """UsageError, before the evaluation, for an --out the generations could not be written to at
  its end, or that is one of the command's own input files."""
  path = pathlib.Path(out)
  if any(path.resolve() == pathlib.Path(i).resolve() for i in inputs):
    raise decoding_cli.UsageError(f"--out {out} is one of this command's inputs; write the "
                                  "generations to another file")
  if path.is_dir():
    raise decoding_cli.UsageError(f"--out {out} is a directory; give a file path")
  parent = path.parent
  if not parent.is_dir():
    raise decoding_cli.UsageError(f"--out {out}: the directory {parent} does not exist")
  if not os.access(parent, os.W_OK):
    raise decoding_cli.UsageError(f"--out {out}: the directory {parent} is not writable")


class _WriteError(Exception):
  """OUT.partial could not be written (a full disk); the message says what is kept."""


# An interrupted run's records, kept beside --out (OUT.partial, a batch at a time) with the flags
# they were decoded with (OUT.partial.json), until the run ends and writes OUT whole.
def _partial_path(out: Optional[str]) -> Optional[pathlib.Path]:
  """OUT.partial for an --out that is a file path; None without --out or for a device or pipe
  (/dev/stdout), beside which nothing is kept."""
  if not out:
    return None
  path = pathlib.Path(out)
  if path.exists() and not path.is_file():
    return None
  return path.with_name(path.name + ".partial")


def _settings_path(partial: pathlib.Path) -> pathlib.Path:
  return partial.with_name(partial.name + ".json")


# Flags that do not change a problem's record.
_NOT_SETTINGS = ("out", "resume", "json", "compare_to")


def _settings(args) -> dict:
  """The flags a problem's record depends on, files as absolute paths (a resumed run may start
  in another directory)."""
  settings = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_SETTINGS}
  settings["data"] = str(pathlib.Path(args.data).resolve())
  if os.path.exists(args.checkpoint):
    settings["checkpoint"] = str(pathlib.Path(args.checkpoint).resolve())
  return settings


# What `evaluate` writes in a record, and the types --resume requires of one read back.
_RECORD_FIELDS = {"index": int, "question": str, "gold": str, "generation": str,
                  "correct": bool, "tokens": int, "nfe": int}


def _read_partial(partial: pathlib.Path, problems: Sequence[Problem], batch: int) -> list[dict]:
  """The records of OUT.partial as whole batches from the first problem (a kill mid-batch can
  leave part of one, and a cut last line): what --resume need not decode again."""
  data = partial.read_bytes()
  lines = data.splitlines()
  records = []
  for number, raw in enumerate(lines, 1):
    where = f"{partial}:{number}"
    if not raw.strip():
      continue
    try:
      record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
      if number == len(lines) and not data.endswith(b"\n"):
        break  # (the line being written when the run was killed: its batch is decoded again)
      raise decoding_cli.UsageError(f"{where}: not a JSON line; {partial} is damaged: delete "
                                    "it and its .json to start again") from None
    good = isinstance(record, dict) and all(
        isinstance(record.get(k), t) and (t is bool or not isinstance(record.get(k), bool))
        for k, t in _RECORD_FIELDS.items()) and (record.get("prediction") is None
                                                 or isinstance(record["prediction"], str))
    if not good:
      raise decoding_cli.UsageError(f"{where}: not a record of this command (fields "
                                    f"{sorted(_RECORD_FIELDS)} and prediction); delete "
                                    f"{partial} and its .json to start again")
    at = len(records)
    if (at >= len(problems) or record["index"] != problems[at].index
        or record["question"] != problems[at].question):
      raise decoding_cli.UsageError(
          f"{where}: holds problem {record['index']} where this run's problem number {at} "
          f"stands; it was decoded from another --data file or --limit: delete {partial} and "
          "its .json to start again")
    records.append(record)
  if len(records) == len(problems):
    return records
  return records[:len(records) - len(records) % batch]


def _resumed_records(args, partial: pathlib.Path, problems: Sequence[Problem],
                     batch: int) -> list[dict]:
  """The records that --resume goes on after ([] for a run from the first problem); a
  UsageError where an interrupted run's file would be overwritten without --resume, or cannot be
  continued with these flags."""
  if not partial.exists():
    if args.resume:
      warnings.warn(f"--resume: no interrupted run to continue ({partial} does not exist); "
                    "decoding from the first problem")
    return []
  if not args.resume:
    raise decoding_cli.UsageError(
        f"--out {args.out}: {partial} holds the generations of an interrupted run; continue it "
        f"with --resume (and the same flags), or delete {partial} to start again")
  settings = _settings_path(partial)
  try:
    saved = json.loads(settings.read_text(encoding="utf-8"))
    if not isinstance(saved, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    raise decoding_cli.UsageError(
        f"--resume: {settings} is unreadable ({e}), so the flags {partial} was decoded with are "
        f"unknown; delete both to start again") from None
  now = _settings(args)
  differ = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
  if differ:
    said = "; ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} there, {now.get(k)!r} here"
                     for k in differ)
    raise decoding_cli.UsageError(
        f"--resume: {partial} was decoded with other flags ({said}); resume with the flags it "
        f"was decoded with, or delete {partial} to start again")
  return _read_partial(partial, problems, batch)


@contextlib.contextmanager
def _stop_on_signals(signals: list, say: Callable[[str], None]):
  """Within: SIGINT and SIGTERM end the run after the batch being decoded (their numbers are
  appended to `signals`, and `say` is told the signal's name), a second one at once
  (KeyboardInterrupt). The handlers before are put back after. (Only in the main thread, where
  Python delivers signals.)"""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum, frame):
    signals.append(signal.Signals(signum))
    if len(signals) > 1:
      raise KeyboardInterrupt
    say(signal.Signals(signum).name)

  before = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for s, h in before.items():
      signal.signal(s, h)


PROG = "python -m dllm_jax.eval"  # (its errors' and warnings' prefix)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("task", choices=["gsm8k"])
  decoding_cli.add_arguments(parser, batch_size=32)
  parser.add_argument("--data", required=True, help="GSM8K test.jsonl")
  parser.add_argument("--limit", type=int, default=None, help="first N problems only")
  parser.add_argument("--out", default=None, help="write every generation here (JSONL)")
  parser.add_argument("--compare-to", default=None,
                      help="another run's generations JSONL: report the share of equal answers")
  parser.add_argument("--json", action="store_true", help="print the summary as JSON only")
  parser.add_argument("--resume", action="store_true",
                      help="continue the run that an interrupt (Ctrl-C, SIGTERM) or a kill "
                           "stopped: its generations so far are in OUT.partial; give the same "
                           "flags (without an interrupted run, starts from the first problem)")
  args = parser.parse_args(argv)
  prog = parser.prog
  try:  # the flags and the files before the slow checkpoint load and the evaluation
    decoding_cli.check(args)
    if args.limit is not None and args.limit < 1:
      raise decoding_cli.UsageError(f"--limit={args.limit}: must be >= 1")
    if args.out:
      _check_out(args.out, [args.data] + ([args.compare_to] if args.compare_to else []))
    try:
      problems = load_gsm8k(args.data, args.limit)
    except (ValueError, OSError) as e:  # naming file:line
      raise decoding_cli.UsageError(str(e)) from None
    reference = None
    if args.compare_to:
      reference = read_generations(args.compare_to, problems)
    # (A run of fewer problems than --batch-size decodes them in one batch of their number,
    # and --kernel-layout auto decides for that batch.)
    batch = min(args.batch_size, len(problems))
    partial = _partial_path(args.out)
    if args.resume and partial is None:
      raise decoding_cli.UsageError(
          "--resume continues the generations an interrupted run kept beside its --out file; "
          + ("give --out" if not args.out else f"--out {args.out} is not a file path"))
    done = _resumed_records(args, partial, problems, batch) if partial else []
    pretrained = decoding_cli.load(args, prog, batch=batch)
  except decoding_cli.UsageError as e:
    raise decoding_cli.usage_exit(prog, str(e)) from None
  decode_cfg = decoding_cli.decode_config(args, pretrained)
  log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
  from dllm_jax import checkpoint  # (loaded with the model already)

  kept, handle = [len(done)], None
  if partial is not None:
    # Every batch's records reach the disk as they are made, and the flags beside them: an
    # interrupt or a kill loses at most the batch being decoded (--resume goes on from there).
    checkpoint.write_text_whole(_settings_path(partial), json.dumps(_settings(args), indent=1))
    checkpoint.write_text_whole(partial, "".join(json.dumps(r) + "\n" for r in done))
    handle = open(partial, "a", encoding="utf-8")

  def keep(new):
    if handle is not None:
      try:
        handle.write("".join(json.dumps(r) + "\n" for r in new))
        handle.flush()
        os.fsync(handle.fileno())
      except OSError as e:  # (a full disk: what is kept so far stays, --resume goes on)
        raise _WriteError(f"writing {partial} failed ({e}); it keeps the generations of the "
                          f"batches before ({kept[0]} problems): free space and run the same "
                          "command with --resume") from None
    kept[0] += len(new)

  def interrupted_line():
    if partial is None:
      return (f"interrupted: {kept[0]} of {len(problems)} problems decoded; no --out, so no "
              "generation is kept")
    return (f"interrupted: the generations of {kept[0]} of {len(problems)} problems are kept "
            f"in {partial}; run the same command with --resume to decode the rest")

  signals = []
  where = f"the generations so far are kept in {partial}" if partial else "no --out"

  def say(name):
    print(f"{prog}: {name}: stopping after this batch ({where}); again to stop at once",
          file=sys.stderr)

  with _stop_on_signals(signals, say):
    try:
      records, summary = evaluate(pretrained, problems, decode_cfg, batch, args.seed, log,
                                  layout=args.layout, done=done, on_batch=keep,
                                  stop=lambda: bool(signals))
    except decoding.DecodeError as e:  # (the problems and --max-new-tokens past the context)
      raise decoding_cli.usage_exit(prog, decoding_cli.as_flags(str(e))) from None
    except decoding_cli.UsageError as e:  # (a problem's text the tokenizer cannot encode)
      raise decoding_cli.usage_exit(prog, str(e)) from None
    except _WriteError as e:
      print(f"{prog}: error: {e}", file=sys.stderr)
      raise SystemExit(1) from None
    except KeyboardInterrupt:  # (a second signal, or Ctrl-C where none was caught)
      print(f"{prog}: {interrupted_line()}", file=sys.stderr)
      raise SystemExit(128 + (signals[-1] if signals else signal.SIGINT)) from None
    finally:
      if handle is not None:
        handle.close()
  summary["checkpoint"] = args.checkpoint
  finished = not summary.get("interrupted")
  if args.out and finished:
    out, text = pathlib.Path(args.out), "".join(json.dumps(r) + "\n" for r in records)
    try:
      if out.is_symlink() or (out.exists() and not out.is_file()):
        out.write_text(text)  # (/dev/stdout, a link, a pipe: written as they are)
      else:
        checkpoint.write_text_whole(out, text)  # (complete or not at all)
    except OSError as e:
      kept_in = (f"every generation is kept in {partial}: free space and run the same command "
                 "with --resume, which only writes it" if partial is not None
                 else "the generations are lost")
      print(f"{prog}: error: writing --out {out} failed ({e}); {kept_in}", file=sys.stderr)
      raise SystemExit(1) from None
    if partial is not None:  # (only now: a kill before this line leaves them to --resume)
      partial.unlink()
      _settings_path(partial).unlink()
  if reference is not None:
    summary["agreement_with"] = args.compare_to
    summary["agreement"] = agreement(records, reference)
  if args.json:
    print(json.dumps(summary))
  else:
    speed = (f"{summary['tokens_per_s']:.1f} tokens/s" if summary["tokens_per_s"] is not None
             else "no tokens/s (no batch decoded by this run)")
    score = (f"accuracy {summary['accuracy']:.4f} +- {summary['stderr']:.4f}"
             if summary["n"] else "no problem decoded")
    print(f"{score} (n={summary['n']}), "
          f"{speed}, {summary['tokens_per_forward']:.2f} tokens per forward, compile "
          f"{summary['compile_s']:.1f}s" + (f" (resumed after {summary['resumed_after']} "
                                            "problems: tokens/s of this run's part)"
                                            if "resumed_after" in summary else ""))
    if "agreement" in summary:
      print(f"answers equal to {args.compare_to}: {summary['agreement']:.4f}")
  if not finished:
    print(f"{prog}: {interrupted_line()}", file=sys.stderr)
    raise SystemExit(128 + signals[0])
  return summary


if __name__ == "__main__":
  decoding_cli.cli_warnings(PROG)
  with decoding_cli.quiet_broken_pipe():
    main()
