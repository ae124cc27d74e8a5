"""Training data: JSONL or synthetic records -> chat-rendered samples -> block-aligned packed batches.

Pipeline (one JAX process sees only its own shard):

  records (JSONL lines by byte offset, or a synthetic task made in code)
    -> grain.MapDataset: shuffle by seed, reshuffled each epoch, repeated
    -> every process_count-th record from process_index on (disjoint shards that cover the data)
    -> rendered with the tokenizer's chat template; loss only on assistant tokens
    -> padded to a multiple of the block size, packed first-fit into the rows of a batch
    -> batches {"tokens", "loss_mask", "segments"} of [batch_size / process_count, seq_len]

A sample never shares a block with another, and its segment id (1, 2, ... within a row; 0 is
padding) keeps attention inside it. Bad records are skipped and counted (`BatchIterator.stats`),
logged with file:line; `DataConfig.strict` turns the first into a `DataError`.

The iterator's state is a small JSON-able dict (`get_state` / `set_state`): the grain iterator
state before the first record not yet in a yielded batch, plus the counters. Restoring it replays
exactly the batches an uninterrupted iterator would have yielded; a state saved when the source
held another number of records (its shuffled order is then another) raises `DataChangedError`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import threading
import zlib
from typing import Any, Iterator, Optional, Sequence

import grain
import numpy as np

from dllm_jax import config as config_lib
from dllm_jax.config import ConfigError
from dllm_jax.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger(__name__)

SYNTHETIC_TASKS = ("reverse", "sort", "upper")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class DataError(ValueError):
  """A record is unusable and data.strict is set; the message names file:line and the problem."""


class DataChangedError(DataError):
  """A saved iterator state is a position in a source of another number of records than this
  one: the file changed since, and its shuffled order with it."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  # "synthetic", or JSONL file(s): comma-separated paths or globs. Each line is one record:
  # {"messages": [{"role", "content"}, ...]}, {"prompt", "response"} or {"question", "answer"}.
  source: str = "synthetic"
  eval_source: str = ""  # held-out JSONL; "" with a synthetic source: held-out synthetic records
  seq_len: int = 256  # tokens per packed row; a multiple of block_size
  block_size: int = 32  # must equal objective.block_size
  batch_size: int = 8  # rows per step over all processes
  seed: int = 0
  shuffle: bool = True
  num_epochs: Optional[int] = None  # None: repeat forever
  max_records: int = 0  # 0: all; else only the first N records (in file order), of each split
  strict: bool = False  # the first bad record is an error instead of being skipped
  synthetic_task: str = "reverse"  # "reverse" | "sort" | "upper"
  synthetic_size: int = 100_000  # distinct training records of the synthetic task
  synthetic_min_len: int = 4  # length range of the task's random strings
  synthetic_max_len: int = 12
  eval_records: int = 256  # held-out synthetic records
  # True: the tail of a sample that ends with an assistant turn (any template text past the
  # assistant span, which already holds ChatML's newline, and the block padding) is a response
  # too, noised and predicted, so the model learns to fill a block after its answer as a
  # decoder asks it to (every later position masked); False: those
  # positions are visible pad tokens in training, which decoding never shows. Off by default:
  # on the tiny synthetic task it cut held-out answer accuracy from 0.78 to 0.2-0.25 in 400 steps
  # (the visible padding tells a tiny model the answer's length); see the issue notes.
  loss_on_block_padding: bool = False

  def __post_init__(self):
    config_lib.check_field_types(self, "data")
    if self.block_size < 1 or self.seq_len < self.block_size or self.seq_len % self.block_size:
      raise ConfigError(f"data.seq_len={self.seq_len} must be a positive multiple of "
                        f"data.block_size={self.block_size}")
    if self.batch_size < 1:
      raise ConfigError(f"data.batch_size={self.batch_size}: must be positive")
    if self.synthetic_task not in SYNTHETIC_TASKS:
      raise ConfigError(
          f"data.synthetic_task={self.synthetic_task!r}: expected one of {SYNTHETIC_TASKS}")
    if not 1 <= self.synthetic_min_len <= self.synthetic_max_len:
      raise ConfigError(f"data.synthetic_min_len={self.synthetic_min_len} and synthetic_max_len="
                        f"{self.synthetic_max_len}: need 1 <= min <= max")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ConfigError(f"data.num_epochs={self.num_epochs}: must be positive or None")
    if not 0 <= self.seed < 2**32:  # (grain's shuffle takes an unsigned 32-bit seed)
      raise ConfigError(f"data.seed={self.seed}: expected 0 <= seed < 2**32")
    if self.max_records < 0:
      raise ConfigError(f"data.max_records={self.max_records}: must be >= 0 (0: every record)")
    for name in ("synthetic_size", "eval_records"):
      if getattr(self, name) < 1:
        raise ConfigError(f"data.{name}={getattr(self, name)}: must be at least 1")


@dataclasses.dataclass
class DataStats:
  """Counters of what a process's iterator has consumed (saved with its state)."""

  records: int = 0  # records read, good or bad
  samples: int = 0  # records packed into rows
  skipped: dict = dataclasses.field(default_factory=dict)  # reason -> count
  tokens: int = 0  # sample tokens before padding
  loss_tokens: int = 0
  padding: int = 0  # pad tokens, inside samples (block padding) and at row ends

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def summary(self) -> str:
    bad = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
    total = self.tokens + self.padding
    fill = self.tokens / total if total else 0.0
    # A record read but not yet placed waits for the next batch (a run that stops at
    # train.steps leaves one): neither packed nor skipped.
    waiting = self.records - self.samples - sum(self.skipped.values())
    wait = f", {waiting} read for the next batch" if waiting else ""
    return (f"{self.records} records, {self.samples} packed{wait}, skipped {bad}; "
            f"{self.loss_tokens} loss tokens, rows {fill:.0%} filled")


# --------------------------------------------------------------------------------------------
# Record sources: random access, each item (where, record-or-text).


def jsonl_paths(source: str, key: str = "data.source") -> list[str]:
  """The files a source of comma-separated paths and globs names, in order; a ConfigError
  naming `key` (the setting it came from) for a part that matches no file."""
  paths = []
  for part in (p.strip() for p in source.split(",")):
    if not part:
      continue
    part = os.path.expanduser(part)  # (a plain path as a glob: "~/train.jsonl" too)
    found = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
    if not found or not all(os.path.isfile(p) for p in found):
      where = "" if os.path.isabs(part) else f" (relative to {os.getcwd()})"
      folder = next((p for p in found if os.path.isdir(p)), None)
      if folder is not None:
        raise ConfigError(f"{key}: {folder!r} is a directory{where}; give the JSONL files in it, "
                          f"e.g. {os.path.join(folder, '*.jsonl')!r}")
      raise ConfigError(f"{key}: {part!r} matches no file{where}; give JSONL paths (comma-"
                        "separated, globs allowed)"
                        + (" or 'synthetic'" if key == "data.source" else ""))
    paths.extend(found)
  if not paths:
    raise ConfigError(f"{key} is empty; give JSONL paths"
                      + (" or 'synthetic'" if key == "data.source" else ""))
  return paths


_BOM = b"\xef\xbb\xbf"


class _JsonlSource:
  """Lines of JSONL files by byte offset, so nothing but an index lives in memory."""

  def __init__(self, source: str, max_records: int, key: str = "data.source"):
    paths = jsonl_paths(source, key)
    self._paths = paths
    files, offsets, lengths, lines = [], [], [], []
    for f, path in enumerate(paths):
      with open(path, "rb") as fh:
        pos = 0
        for n, raw in enumerate(fh, start=1):
          # A line that is only a UTF-8 BOM (and whitespace) is blank too; a BOM before a record
          # is fine as it is (json.loads of bytes decodes it as utf-8-sig).
          if raw.removeprefix(_BOM).strip():
            files.append(f)
            offsets.append(pos)
            lengths.append(len(raw))
            lines.append(n)
          pos += len(raw)
          if max_records and len(files) >= max_records:
            break
      if max_records and len(files) >= max_records:
        break
    if not files:
      verb = "holds" if len(paths) == 1 else "hold"
      raise ConfigError(f"{key}: {', '.join(paths)} {verb} no records")
    self._file = np.asarray(files, np.int32)
    self._offset = np.asarray(offsets, np.int64)
    self._length = np.asarray(lengths, np.int64)
    self._line = np.asarray(lines, np.int64)
    self._fds = {}
    self._lock = threading.Lock()

  def __len__(self):
    return len(self._file)

  def __getitem__(self, i):
    f = int(self._file[i])
    fd = self._fds.get(f)
    if fd is None:
      with self._lock:
        fd = self._fds.get(f)
        if fd is None:
          fd = self._fds[f] = os.open(self._paths[f], os.O_RDONLY)
    # pread, not seek + read: grain's prefetch threads read records concurrently.
    raw = os.pread(fd, int(self._length[i]), int(self._offset[i]))
    return f"{self._paths[f]}:{int(self._line[i])}", raw

  def __getstate__(self):  # descriptors do not travel to grain worker processes
    return {**self.__dict__, "_fds": {}, "_lock": None}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def __del__(self, _close=os.close):  # bound now: module globals may be gone at exit
    for fd in getattr(self, "_fds", {}).values():
      _close(fd)


def synthetic_record(task: str, rng: np.random.Generator, min_len: int, max_len: int) -> dict:
  """A {"prompt", "response"} record of a string task a tiny model learns in minutes."""
  s = "".join(rng.choice(list(_LETTERS), size=int(rng.integers(min_len, max_len + 1))))
  if task == "reverse":
    return {"prompt": f"reverse: {s}", "response": s[::-1]}
  if task == "sort":
    return {"prompt": f"sort: {s}", "response": "".join(sorted(s))}
  return {"prompt": f"upper: {s}", "response": s.upper()}


_HELD_OUT_SHARE = 16  # one prompt in 16 (by hash) is held out of synthetic training
_HELD_OUT_TRIES = 10_000


class _SyntheticSource:
  def __init__(self, cfg: DataConfig, size: int, salt: int):
    # (data.max_records limits each split, synthetic ones too: it was read for JSONL only)
    size = min(size, cfg.max_records) if cfg.max_records else size
    self._cfg, self._size, self._salt = cfg, size, salt

  def __len__(self):
    return self._size

  def __getitem__(self, i):
    # Record i depends only on (seed, split, i): the same under any shuffling or sharding. The
    # held-out split takes only prompts whose hash falls in its share and training never does,
    # so no held-out prompt is ever trained on (two independent draws shared 18 of 128).
    rng = np.random.default_rng((self._cfg.seed, self._salt, int(i)))
    for _ in range(_HELD_OUT_TRIES):
      rec = synthetic_record(self._cfg.synthetic_task, rng, self._cfg.synthetic_min_len,
                             self._cfg.synthetic_max_len)
      if (zlib.crc32(rec["prompt"].encode()) % _HELD_OUT_SHARE == 0) == (self._salt == 1):
        return f"synthetic:{i}", rec
    raise ConfigError(f"data.synthetic_min_len={self._cfg.synthetic_min_len} and "
                      f"synthetic_max_len={self._cfg.synthetic_max_len} give too few distinct "
                      "strings to hold some out for evaluation; allow longer strings")


# --------------------------------------------------------------------------------------------
# Rendering


@dataclasses.dataclass(frozen=True)
class _Bad:
  where: str
  reason: str  # a short category, counted
  detail: str


def _messages(rec: Any) -> tuple[Optional[list], str, str]:
  """(messages, reason, detail): messages of a record in any of the three shapes, or why not."""
  if not isinstance(rec, dict):
    return None, "not_an_object", f"expected a JSON object, got {type(rec).__name__}"
  if "messages" in rec:
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in msgs):
      return None, "missing_field", '"messages" must be a list of {"role": str, "content": str}'
    if not any(m["role"] == "assistant" for m in msgs):
      return None, "empty_response", "no assistant message"
    if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
      return None, "empty_response", "an assistant message is empty"
    return msgs, "", ""
  for user_key, reply_key in (("prompt", "response"), ("question", "answer")):
    if user_key in rec or reply_key in rec:
      for key in (user_key, reply_key):
        if not isinstance(rec.get(key), str):
          return None, "missing_field", f'field "{key}" missing or not a string'
      if not rec[reply_key].strip():
        return None, "empty_response", f'"{reply_key}" is empty'
      return ([{"role": "user", "content": rec[user_key]},
               {"role": "assistant", "content": rec[reply_key]}], "", "")
  return None, "missing_field", (f"keys {sorted(rec)}: expected \"messages\", \"prompt\" + "
                                 "\"response\" or \"question\" + \"answer\"")


def render(item, tokenizer: Tokenizer, cfg: DataConfig):
  """(where, raw line or record) -> dict(ids, loss_mask, n) padded to blocks, or a _Bad."""
  where, rec = item
  if isinstance(rec, (bytes, str)):
    try:
      rec = json.loads(rec)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return _Bad(where, "malformed_json", f"malformed JSON: {e}")
    except (RecursionError, ValueError) as e:  # (nested past Python's stack, an int past 4300
      # digits: valid JSON that Python's parser refuses; raised, it ended the run mid-training)
      return _Bad(where, "malformed_json", f"JSON that Python cannot read: {type(e).__name__}: "
                                           f"{str(e)[:200]}")
  msgs, reason, detail = _messages(rec)
  if msgs is None:
    return _Bad(where, reason, detail)
  try:
    ids, mask = tokenizer.encode_chat(msgs)
  except (TokenizerError, KeyError, TypeError) as e:
    return _Bad(where, "untokenizable", f"cannot render through the chat template: {e}")
  if not any(mask):
    return _Bad(where, "empty_response", "no assistant token after rendering")
  if tokenizer.mask_token_id is not None and tokenizer.mask_token_id in ids:
    # The text spells the mask token: a visible copy would then look masked to the model, and
    # a response token equal to it would train the model to predict the mask.
    return _Bad(where, "mask_token", f"the text holds the mask token (id "
                f"{tokenizer.mask_token_id}), which only the noise may place")
  n = len(ids)
  padded = -(-n // cfg.block_size) * cfg.block_size
  if padded > cfg.seq_len:
    return _Bad(where, "too_long", f"{n} tokens, {padded} padded to blocks of "
                f"{cfg.block_size}: longer than data.seq_len={cfg.seq_len}")
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  if pad is None:
    raise ConfigError("the tokenizer has neither a pad nor an eos token to pad samples with")
  out_ids = np.full(padded, pad, np.int32)
  out_ids[:n] = ids
  out_mask = np.zeros(padded, bool)
  out_mask[:n] = mask
  if cfg.loss_on_block_padding and padded > n:
    last = max(i for i, m in enumerate(mask) if m)
    if all(tokenizer.eot_token_id != t for t in ids[last + 1:]):  # ends with the assistant turn
      out_mask[last + 1:] = True
  return {"ids": out_ids, "loss_mask": out_mask, "n": n, "where": where}


# --------------------------------------------------------------------------------------------
# Packing and batching


class BatchIterator(Iterator[dict]):
  """First-fit block-aligned packing of rendered samples into fixed-size batches.

  Samples, in order, go to the first row of the batch with room for them; the first sample that
  fits in no row closes the batch and opens the next one. A batch is thus a contiguous run of
  the sample stream, and the iterator state is just where that run ends.
  """

  def __init__(self, samples: grain.DatasetIterator, cfg: DataConfig, rows: int, pad_id: int,
               bad_run_limit: Optional[int] = None, source_records: Optional[int] = None):
    self._it = samples
    # How many records the source holds: its shuffled order (and so what a saved position
    # means) depends on it. Saved with the state and checked on restore.
    self._source_records = source_records
    self._cfg = cfg
    self._rows = rows
    self._pad = pad_id
    # Bad records in a row that mean no record of the source is good (`make_dataset`), where a
    # repeating source would otherwise spin on them for ever.
    self._bad_run_limit = bad_run_limit
    self._bad_run = 0
    self._pending = None  # a sample read but not yet placed
    self._pending_state = None  # the grain state from just before that sample
    self._done = False
    self.stats = DataStats()

  def __iter__(self):
    return self

  def _next_sample(self):
    """The next good sample (bad ones counted, logged or raised), or None at the end."""
    while True:
      state = self._it.get_state()
      try:
        s = next(self._it)
      except StopIteration:
        return None, None
      self.stats.records += 1
      if isinstance(s, _Bad):
        if self._cfg.strict:
          raise DataError(f"{s.where}: {s.detail} (data.strict is set; fix or remove the "
                          "record, or unset data.strict to skip bad records)")
        count = self.stats.skipped.get(s.reason, 0) + 1
        self.stats.skipped[s.reason] = count
        if count <= 10:
          log.warning("%s: skipped: %s%s", s.where, s.detail,
                      " (further records skipped for this reason are only counted)"
                      if count == 10 else "")
        self._bad_run += 1
        if self._bad_run_limit and self._bad_run >= self._bad_run_limit:
          raise DataError(f"{self._bad_run} records of data.source in a row made no sample "
                          f"(skipped so far: {self.stats.skipped}): most likely none does; the "
                          "warnings above say why, e.g. records longer than data.seq_len")
        continue
      self._bad_run = 0
      return s, state

  def __next__(self) -> dict:
    if self._done:
      raise StopIteration
    cfg = self._cfg
    tokens = np.full((self._rows, cfg.seq_len), self._pad, np.int32)
    loss_mask = np.zeros((self._rows, cfg.seq_len), bool)
    segments = np.zeros((self._rows, cfg.seq_len), np.int32)
    used = [0] * self._rows  # tokens taken in each row
    placed = sum_block_padding = 0
    while True:
      if self._pending is None:
        self._pending, self._pending_state = self._next_sample()
        if self._pending is None:
          self._done = True
          break
      s = self._pending
      size = len(s["ids"])
      r = next((r for r in range(self._rows) if used[r] + size <= cfg.seq_len), None)
      if r is None:  # fits in no row: it opens the next batch
        break
      at = used[r]
      tokens[r, at:at + size] = s["ids"]
      loss_mask[r, at:at + size] = s["loss_mask"]
      segments[r, at:at + size] = (segments[r, at - 1] if at else 0) + 1
      used[r] += size
      self.stats.samples += 1
      self.stats.tokens += s["n"]
      self.stats.loss_tokens += int(s["loss_mask"].sum())
      sum_block_padding += size - s["n"]
      placed += 1
      self._pending = None
    if placed == 0:
      raise StopIteration
    self.stats.padding += int((tokens.size - (segments > 0).sum()) + sum_block_padding)
    return {"tokens": tokens, "loss_mask": loss_mask, "segments": segments}

  def get_state(self) -> dict:
    """JSON-able; restoring it re-reads the record that had not fit in a yielded row."""
    stats = self.stats.to_dict()
    if self._pending is not None:
      upstream = self._pending_state
      stats["records"] -= 1  # it is read, and counted, again after a restore
    else:
      upstream = self._it.get_state()
    return {"grain": upstream, "stats": stats, "done": self._done,
            "source_records": self._source_records}

  def set_state(self, state: dict) -> None:
    saved = state.get("source_records")  # (None: saved before it was recorded, or unknown)
    if None not in (saved, self._source_records) and saved != self._source_records:
      raise DataChangedError(
          f"the saved data position is into a source of {saved} records, and the data now "
          f"holds {self._source_records}: a file of data.source changed since it was saved, and "
          "with it the shuffled order, so the resumed run would see some records again and skip "
          "others; resume with the data the run was trained on, or start a new run from its "
          "weights (init.source=RUN_DIR and a new train.run_dir)")
    self._it.set_state(state["grain"])
    self._pending = self._pending_state = None
    self._done = bool(state.get("done", False))
    self.stats = DataStats(**{**state["stats"], "skipped": dict(state["stats"]["skipped"])})

  def close(self) -> None:
    """Stops grain's prefetch threads (they would otherwise keep rendering records)."""
    self._it.close()


def make_dataset(cfg: DataConfig, tokenizer: Tokenizer, *, process_index: int = 0,
                 process_count: int = 1, split: str = "train") -> BatchIterator:
  """An iterator of this process's batches: dicts of numpy arrays [batch_size / process_count,
  seq_len] ("tokens" int32, "loss_mask" bool, "segments" int32).

  split="train" shuffles by `cfg.seed` (reshuffled each epoch) and repeats `num_epochs` times;
  split="eval" reads the held-out records once, in order.
  """
  if cfg.batch_size % process_count:
    raise ConfigError(f"data.batch_size={cfg.batch_size} is not divisible by the "
                      f"{process_count} JAX processes; each process packs an equal share")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside 0..{process_count - 1}")
  if split not in ("train", "eval"):
    raise ValueError(f"split={split!r}: expected 'train' or 'eval'")
  synthetic = cfg.source.strip() == "synthetic"
  if split == "train":
    source = (_SyntheticSource(cfg, cfg.synthetic_size, salt=0) if synthetic
              else _JsonlSource(cfg.source, cfg.max_records))
  elif cfg.eval_source:
    source = _JsonlSource(cfg.eval_source, cfg.max_records, key="data.eval_source")
  elif synthetic:
    source = _SyntheticSource(cfg, cfg.eval_records, salt=1)
  else:
    raise ConfigError("data.eval_source is empty: give held-out JSONL files for evaluation")

  ds = grain.MapDataset.source(source)
  if split == "train":
    if cfg.shuffle:
      ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
  # One process reads the whole stream: 2N bad records in a row hold a whole pass, whatever
  # order each pass comes in. Several take every n-th record of it, so a good record reaches a
  # given one in a pass only by chance (about 1/n a pass when passes are reshuffled): 40n
  # passes' worth (40N records) miss it with odds below e^-40.
  bad_run_limit = len(source) * (2 if process_count == 1 else 40)
  ds = ds[process_index::process_count]
  ds = ds.map(lambda item: render(item, tokenizer, cfg))
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  return BatchIterator(iter(ds.to_iter_dataset()), cfg, cfg.batch_size // process_count, pad,
                       bad_run_limit, source_records=len(source))
