"""Typed, frozen configuration tree, config files and `--set a.b=value` overrides.

A config file is Python that defines `get_config() -> Config`. The command line overrides single
fields; a key that does not exist, or one set twice, is an error that lists what is valid.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib
import types
import typing
from typing import Any, Optional, Sequence


class ConfigError(ValueError):
  """A config file or override is wrong; the message says where and what to do."""


KERNEL_LAYOUTS = ("in_out", "out_in")  # `ModelConfig.kernel_layout`


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a Qwen2 / Llama decoder-only transformer."""

  architecture: str = "llama"  # "llama" | "qwen2": decides the HF class on export
  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = False  # Qwen2 has biases on q, k and v
  tie_embeddings: bool = False
  max_position_embeddings: int = 2048
  mask_token_id: Optional[int] = None  # None: not a diffusion model yet (see model.add_mask_token)
  bos_token_id: Optional[int] = None
  eos_token_id: Optional[int] = None
  pad_token_id: Optional[int] = None
  # Ids besides eos that end a generation: the rest of a Hugging Face eos list (config.json's, or
  # generation_config.json's, e.g. Qwen2.5-Instruct's <|endoftext|> beside <|im_end|>).
  stop_token_ids: tuple[int, ...] = ()
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype; softmax, norms and logits stay in float32
  remat: str = "none"  # "none" | "full" | "dots": what a layer keeps for the backward pass
  attention_impl: str = "auto"  # "auto" (pallas on GPU/TPU, xla on CPU) | "xla" | "pallas"
  # The projections of a one-row decode step (AR at batch 1): "xla", "pallas" (fused with their
  # norms and residual adds, kernels/matvec.py; GPU only) or "auto": pallas where it measured
  # faster (H200: 7.5% at Qwen2.5-1.5B, 5.4% at SmolLM2-135M; BENCHMARKS.md session 17): a Hopper
  # GPU, bf16 weights in the per-layer layout, one device, not a 7B-like MLP (level there);
  # else xla.
  matvec_impl: str = "auto"
  # How the projection kernels are stored: "in_out" ([*in, *out], as Flax and MaxText) or
  # "out_in" ([*out, *in], as a Hugging Face Linear). out_in makes each output's weights one
  # contiguous run, which the one-row kernels read faster (the 1.5B's batch-1 AR step 3.4% more
  # tokens/s on the H200), but XLA's GEMMs of 8-32 rows read it slower (its diffusion forwards
  # 1-3% slower); training is level (BENCHMARKS.md session 24). So in_out is stored, and the
  # decoders convert to out_in where the one-row kernels run (`model.decode_kernel_layout`).
  # `model.with_kernel_layout` converts; a run's model.json records its layout (a file without
  # it is in_out, the layout before the field existed) and a resumed run keeps it.
  kernel_layout: str = "in_out"

  def __post_init__(self):
    check_field_types(self, "model")
    if self.architecture not in ("llama", "qwen2"):
      raise ConfigError(f"model.architecture={self.architecture!r}: expected 'llama' or 'qwen2'")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.{name}={value!r}: a positive integer expected")
    for name in ("rope_theta", "rms_norm_eps"):  # (a NaN or a negative trains to NaN)
      value = getattr(self, name)
      if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"model.{name}={value!r}: a finite positive number expected")
    if self.head_dim % 2:
      raise ConfigError(f"model.head_dim={self.head_dim}: RoPE rotates pairs of dims, so it must "
                        "be even")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"model.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.remat not in ("none", "full", "dots"):
      raise ConfigError(f"model.remat={self.remat!r}: expected 'none', 'full' or 'dots'")
    if self.attention_impl not in ("auto", "xla", "pallas"):
      raise ConfigError(
          f"model.attention_impl={self.attention_impl!r}: expected 'auto', 'xla' or 'pallas'")
    if self.kernel_layout not in KERNEL_LAYOUTS:
      raise ConfigError(f"model.kernel_layout={self.kernel_layout!r}: expected one of "
                        f"{KERNEL_LAYOUTS}")
    if self.matvec_impl not in ("auto", "xla", "pallas"):
      raise ConfigError(
          f"model.matvec_impl={self.matvec_impl!r}: expected 'auto', 'xla' or 'pallas'")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.{name}={getattr(self, name)!r}: expected float32, bfloat16 or float16")
    if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
      raise ConfigError(
          f"model.mask_token_id={self.mask_token_id} is outside the vocabulary (size {self.vocab_size})")
    for i in self.stop_token_ids:
      if not 0 <= i < self.vocab_size:
        raise ConfigError(f"model.stop_token_ids holds {i}, outside the vocabulary (size "
                          f"{self.vocab_size})")


# --------------------------------------------------------------------------------------------
# Overrides


def _field_types(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _fits(value: Any, tp: Any) -> bool:
  """Whether `value` is of the field type `tp` as a config means it: an int is a float too,
  but a bool is not a number and a string is not a bool."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    return any(_fits(value, a) for a in args)
  if tp is type(None):
    return value is None
  if tp is bool:
    return isinstance(value, bool)
  if tp is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if tp is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if tp is str:
    return isinstance(value, str)
  if origin is tuple:
    return isinstance(value, tuple) and (not args or all(_fits(v, args[0]) for v in value))
  return True  # (other types are checked by their own sections)


def _type_name(tp: Any) -> str:
  """`int`, or `tuple[int, ...]` for a generic: a tuple of strings for a tuple of ints must not
  read as 'is a tuple; expected tuple'."""
  if typing.get_origin(tp) is not None:
    return str(tp).replace("typing.", "")
  return getattr(tp, "__name__", str(tp))


def check_field_types(node: Any, section: str) -> None:
  """ConfigError naming the first field of a config section whose value is not of its declared
  type: a config file is Python, where `shuffle="false"` would read as true. Each section calls
  it first in its __post_init__, before its checks compare values."""
  hints = _field_types(type(node))
  for f in dataclasses.fields(node):
    value, tp, key = getattr(node, f.name), hints[f.name], f"{section}.{f.name}"
    if not _fits(value, tp):
      args = [a for a in typing.get_args(tp) if a is not type(None)]
      want = (" or ".join(_type_name(a) for a in args) + " or None"
              if type(None) in typing.get_args(tp) else _type_name(tp))
      raise ConfigError(f"{key}={value!r} is a {type(value).__name__}; expected {want}")
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
      # (seeds, sizes and counts all become 64-bit integers: one past it overflowed mid-run)
      raise ConfigError(f"{key}={value}: out of range (a 64-bit integer)")


def _parse_value(text: str, tp: Any, key: str) -> Any:
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    non_none = [a for a in args if a is not type(None)]
    if text.lower() in ("none", "null"):
      return None
    if len(non_none) == 1:
      return _parse_value(text, non_none[0], key)
  if tp is bool:
    if text.lower() in ("1", "true", "yes", "on"):
      return True
    if text.lower() in ("0", "false", "no", "off"):
      return False
    raise ConfigError(f"--set {key}={text}: expected a boolean (true/false)")
  if tp is int:
    try:
      value = int(text)
    except ValueError:
      raise ConfigError(f"--set {key}={text}: expected an integer") from None
    return value  # (its range is checked with the section's fields: check_field_types)
  if tp is float:
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f"--set {key}={text}: expected a number") from None
  if tp is str:
    return text
  if origin is tuple:
    items = [t for t in text.split(",") if t.strip()] if text.strip() else []
    elem = args[0] if args else str
    try:
      return tuple(_parse_value(t.strip(), elem, key) for t in items)
    except ConfigError as e:  # (the item's error, and how a tuple is written)
      name = getattr(elem, "__name__", elem)
      raise ConfigError(f"--set {key}={text}: an item of it is not {name} "
                        f"({str(e).split(': ')[-1]}); write the items comma-separated without "
                        f"brackets, e.g. --set {key}=1,2 (an empty value: none)") from None
  raise ConfigError(f"--set {key}: fields of type {tp} cannot be set from the command line")


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
  """Returns `cfg` with each "a.b.c=value" applied; unknown or repeated keys are errors.

  All overrides are applied together, so each section is rebuilt (and validated) once: fields that
  must agree across sections (e.g. data.block_size and objective.block_size) can be changed in
  one command line.
  """
  tree: dict = {}
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=100")
    key, text = item.split("=", 1)
    key = key.strip()
    path = key.split(".")
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ConfigError(f"--set {key}: {part!r} is set as a value elsewhere on the command line")
    if isinstance(node.get(path[-1]), dict):  # (a section, some of whose fields are set)
      raise ConfigError(f"--set {key}: {key!r} is a section, and its fields are set elsewhere on "
                        "the command line; set one of its fields")
    if path[-1] in node:
      raise ConfigError(f"--set {key} is given twice; give each key once")
    node[path[-1]] = (text, key)
  return _apply_tree(cfg, tree, "")


def _apply_tree(node: Any, tree: dict, where: str) -> Any:
  names = [f.name for f in dataclasses.fields(node)]
  changes = {}
  for head, sub in tree.items():
    full = f"{where}{head}"
    if head not in names:
      example = sub
      while isinstance(example, dict):  # (any leaf below: each holds its whole --set key)
        example = next(iter(example.values()))
      example = example[1]
      raise ConfigError(
          f"--set {example}: unknown key {head!r} in {type(node).__name__}; valid keys: "
          + ", ".join(names))
    current = getattr(node, head)
    if isinstance(sub, dict):
      if not dataclasses.is_dataclass(current):
        raise ConfigError(f"--set {full}.{next(iter(sub))}: {full} is not a config section")
      changes[head] = _apply_tree(current, sub, f"{full}.")
      continue
    text, key = sub
    if dataclasses.is_dataclass(current):
      raise ConfigError(f"--set {key}: {head!r} is a section; set one of its fields: "
                        + ", ".join(f.name for f in dataclasses.fields(current)))
    changes[head] = _parse_value(text, _field_types(type(node))[head], key)
  try:
    return dataclasses.replace(node, **changes)
  except ConfigError as e:  # (named by the overrides given under this node, not its sections)
    raise ConfigError(f"--set {', '.join(_leaves(tree))}: {e}") from None


def _leaves(tree: dict) -> list[str]:
  """The "key=value" overrides under a node of `apply_overrides`' tree, as they were given."""
  out = []
  for sub in tree.values():
    out += _leaves(sub) if isinstance(sub, dict) else [f"{sub[1]}={sub[0]}"]
  return out


def load_config_file(path: str | pathlib.Path) -> Any:
  """Runs a Python config file and returns what its `get_config()` returns."""
  path = pathlib.Path(path)
  if path.is_dir():
    raise ConfigError(f"config file {path} is a directory; give a Python config file, e.g. "
                      "configs/tiny.py")
  if not path.is_file():
    raise ConfigError(f"config file {path} does not exist")
  if path.suffix != ".py":
    raise ConfigError(f"config file {path} is not a Python file; give a .py config that defines "
                      "get_config(), e.g. configs/tiny.py, or a run's config.json")
  spec = importlib.util.spec_from_file_location(f"_dllm_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
      raise ConfigError(f"config file {path} defines no get_config() function")
    return module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001  (the file's own error, named with its line)
    raise ConfigError(f"config file {path}: {type(e).__name__}: {e}{_line_in(e, path)}") from e


def _line_in(error: BaseException, path: pathlib.Path) -> str:
  """' (line N)': where in the config file `error` was raised (the innermost frame there)."""
  if isinstance(error, SyntaxError):
    return ""  # (its message names the line already)
  import traceback

  lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
           if pathlib.Path(f.filename).resolve() == path.resolve()]
  return f" (line {lines[-1]})" if lines else ""


def to_dict(cfg: Any) -> dict:
  return dataclasses.asdict(cfg)


def from_dict(cls, data: dict, where: str = "config") -> Any:
  """Builds dataclass `cls` from a nested dict, rejecting unknown keys."""
  names = {f.name: f for f in dataclasses.fields(cls)}
  unknown = set(data) - set(names)
  if unknown:
    raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; valid keys: {sorted(names)}")
  hints = _field_types(cls)
  kwargs = {}
  for name, value in data.items():
    tp = hints[name]
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
      value = from_dict(tp, value, f"{where}.{name}")
    elif typing.get_origin(tp) is tuple and isinstance(value, list):
      value = tuple(value)
    kwargs[name] = value
  return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Sections of a training run (the top-level `run_config.Config` gathers them with the data and
# objective sections, which live next to the code that reads them).


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimizer, schedule and loop. The defaults are the authors' (lr 2e-5 constant, 3% warmup)."""

  steps: int = 1000
  # The batch (rows per optimizer step, over all devices) is data.batch_size; it is split into
  # grad_accum micro-batches, and the loss is count-weighted across them.
  grad_accum: int = 1
  learning_rate: float = 2e-5
  schedule: str = "constant"  # "constant" | "cosine", both after a linear warmup
  warmup_ratio: float = 0.03
  min_lr_ratio: float = 0.0  # cosine only: final lr / peak lr
  weight_decay: float = 0.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  grad_clip: float = 1.0  # global-norm clipping; 0 turns it off
  seed: int = 0
  run_dir: str = "runs/run"
  log_every: int = 1  # steps between metrics lines
  progress: bool = True  # the stderr progress bar
  eval_batches: int = 0  # held-out batches scored at the end (masked-token accuracy); 0: none
  export_hf: bool = False  # write the final model to RUN_DIR/hf as a HF directory

  def __post_init__(self):
    check_field_types(self, "train")
    if self.steps < 1:
      raise ConfigError(f"train.steps={self.steps}: must be at least 1")
    if self.grad_accum < 1:
      raise ConfigError(f"train.grad_accum={self.grad_accum}: must be at least 1")
    if self.schedule not in ("constant", "cosine"):
      raise ConfigError(f"train.schedule={self.schedule!r}: expected 'constant' or 'cosine'")
    if not 0.0 <= self.warmup_ratio <= 1.0:
      raise ConfigError(f"train.warmup_ratio={self.warmup_ratio}: expected a value in [0, 1]")
    if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
      raise ConfigError(f"train.learning_rate={self.learning_rate}: must be a positive number")
    if not 0.0 <= self.min_lr_ratio <= 1.0:
      raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio}: expected a value in [0, 1] "
                        "(the final cosine lr over the peak)")
    if self.min_lr_ratio and self.schedule != "cosine":
      raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio} applies to the cosine schedule "
                        f"only, and train.schedule={self.schedule!r}: set train.schedule=cosine "
                        "or leave min_lr_ratio at 0")
    for name in ("adam_b1", "adam_b2"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ConfigError(f"train.{name}={getattr(self, name)}: expected a value in [0, 1)")
    for name in ("weight_decay", "adam_eps", "grad_clip"):
      value = getattr(self, name)
      if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"train.{name}={value}: must be a finite number >= 0"
                          + (" (0 turns clipping off)" if name == "grad_clip" else ""))
    if self.adam_eps == 0:
      # (Adam divides by sqrt(v) + eps: 0/0 = NaN for every weight a step leaves without a
      # gradient, e.g. the embedding rows of tokens the batch lacks, while the loss looks fine.)
      raise ConfigError("train.adam_eps=0: must be > 0 (rows without a gradient, such as unused "
                        "tokens' embeddings, would become NaN); the default is 1e-8")
    if self.log_every < 1:
      raise ConfigError(f"train.log_every={self.log_every}: must be at least 1")
    if self.eval_batches < 0:
      raise ConfigError(f"train.eval_batches={self.eval_batches}: must be >= 0 (0: no evaluation)")
    if not self.run_dir.strip():
      raise ConfigError("train.run_dir is empty: give the directory the run writes to")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes (-1: all remaining devices) and the multi-host coordinator.

  When `coordinator_address` is empty, the environment variables DLLM_COORDINATOR_ADDRESS,
  DLLM_NUM_PROCESSES and DLLM_PROCESS_ID are used; when those are unset too, the run is one process.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  coordinator_address: str = ""  # "host:port" of process 0
  num_processes: int = 0
  process_id: int = -1

  def __post_init__(self):
    check_field_types(self, "mesh")
    sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
    bad = [k for k, v in sizes.items() if v == 0 or v < -1]
    if bad:
      raise ConfigError(f"mesh.{bad[0]}={sizes[bad[0]]}: expected a positive size or -1 (auto)")
    if sum(v == -1 for v in sizes.values()) > 1:
      raise ConfigError(f"mesh sizes {sizes}: at most one axis may be -1 (auto)")
    if self.num_processes < 0 or self.process_id < -1:
      raise ConfigError(f"mesh.num_processes={self.num_processes}, mesh.process_id="
                        f"{self.process_id}: expected num_processes >= 0 (0: from the "
                        "environment) and process_id >= -1 (-1: from the environment)")
    if self.coordinator_address:
      check_coordinator_address(self.coordinator_address, "mesh.coordinator_address")


def check_coordinator_address(address: str, where: str) -> None:
  """ConfigError unless `address` is HOST:PORT with a port in 1..65535 (jax.distributed takes
  anything and then fails inside gRPC: an IndexError, or a crash of the process)."""
  host, colon, port = address.rpartition(":")
  if not colon or not host.strip("[]") or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise ConfigError(f"{where}={address!r}: expected HOST:PORT (process 0's host and a free "
                      "port in 1..65535), e.g. 10.0.0.1:1234")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 500  # also saved at the end and on SIGTERM
  keep: int = 3  # the last `keep` checkpoints are kept
  async_save: bool = True

  def __post_init__(self):
    check_field_types(self, "checkpoint")
    if self.every_steps < 1:
      raise ConfigError(f"checkpoint.every_steps={self.every_steps}: must be at least 1")
    if self.keep < 1:
      raise ConfigError(f"checkpoint.keep={self.keep}: must be at least 1")


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """Where the weights come from.

  `source="random"` initialises `model` from scratch with `tokenizer` ("chars": the built-in
  character tokenizer); any other source (a HF directory, a .gguf file, a shortcut such as
  "smollm2-135m-instruct", or a training run directory) is loaded with its own architecture and
  tokenizer, and only the runtime fields of `model` (dtypes, remat, attention_impl, matvec_impl,
  kernel_layout: its kernels are transposed to that layout) apply.
  """

  source: str = "random"  # "" in a shipped config means: the user must set it (checked at start)
  tokenizer: str = "chars"  # random init only

  def __post_init__(self):
    check_field_types(self, "init")
