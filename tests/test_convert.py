"""HF / GGUF import and HF export against transformers on tiny random models, and bad inputs."""

import json
import os
import pathlib
import shutil

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from dllm_jax import checkpoint, convert, decoding, model
from dllm_jax import tokenizer as tk

TOL = 1e-4
DIMS = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
            max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-6)


def _hf_model(kind: str):
  torch.manual_seed({"qwen2": 0, "llama_untied": 1, "llama_tied": 2}[kind])
  if kind == "qwen2":
    m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**DIMS))
    with torch.no_grad():  # transformers initialises biases to zero; make the mapping visible
      for layer in m.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
          proj.bias.normal_(0.0, 0.5)
  else:
    cfg = transformers.LlamaConfig(**DIMS, tie_word_embeddings=kind == "llama_tied")
    m = transformers.LlamaForCausalLM(cfg)
  with torch.no_grad():  # norms start at one; random scales catch a swapped norm
    for name, p in m.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  return m.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """{kind: (torch model, saved dir)}; "qwen2_sharded" is the qwen2 model in many shards."""
  out = {}
  for kind in ("qwen2", "llama_untied", "llama_tied"):
    m = _hf_model(kind)
    d = tmp_path_factory.mktemp(kind)
    m.save_pretrained(d)
    out[kind] = (m, d)
  d = tmp_path_factory.mktemp("qwen2_sharded")
  out["qwen2"][0].save_pretrained(d, max_shard_size="40KB")
  out["qwen2_sharded"] = (out["qwen2"][0], d)
  return out


def _tokens(batch=2, length=24, vocab=256, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, (batch, length))


def _rel_err(ours, ref):
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def _hf_logits(m, tokens):
  with torch.no_grad():
    return m(torch.tensor(tokens)).logits.float().numpy()


def _ours_logits(pre, tokens):
  return np.asarray(model.ar_forward(pre.params, pre.config, jnp.asarray(tokens)))


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_sharded", "llama_untied", "llama_tied"])
def test_hf_dir_logits_match_transformers(hf_dirs, kind):
  m, d = hf_dirs[kind]
  if kind == "qwen2_sharded":
    assert (d / "model.safetensors.index.json").is_file()
    assert len(list(d.glob("model-*.safetensors"))) > 2
  pre = convert.load_hf_dir(d)
  cfg = pre.config
  assert (cfg.architecture, cfg.qkv_bias) == (("qwen2", True) if "qwen2" in kind else ("llama", False))
  assert cfg.tie_embeddings == (kind == "llama_tied") and ("lm_head" in pre.params) != cfg.tie_embeddings
  assert (cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta) == (2, 16, 5000.0)
  tokens = _tokens()
  assert _rel_err(_ours_logits(pre, tokens), _hf_logits(m, tokens)) <= TOL
  # Stored as HF stores a Linear ([out, in]), transposed once at load: the same logits.
  om = convert.cast(pre, "float32", kernel_layout="out_in")
  assert om.config.kernel_layout == "out_in" and pre.config.kernel_layout == "in_out"
  assert om.params["layers"]["mlp"]["down"]["kernel"].shape[1:] == (cfg.hidden_size,
                                                                    cfg.intermediate_size)
  assert _rel_err(_ours_logits(om, tokens), _hf_logits(m, tokens)) <= TOL


def _greedy(pre, prompts, n=32, stop=()):
  lengths = np.array([len(p) for p in prompts])
  padded = np.zeros((len(prompts), lengths.max()), np.int32)
  for i, p in enumerate(prompts):
    padded[i, :len(p)] = p
  out, out_len, _ = decoding.generate_jit(
      pre.params, pre.config, jnp.asarray(padded), jnp.asarray(lengths), jax.random.key(0),
      decoding.DecodeConfig(mode="ar", max_new_tokens=n, temperature=0.0, stop_token_ids=stop))
  return [list(np.asarray(o[:k])) for o, k in zip(out, out_len)]


@pytest.mark.parametrize("kind", ["qwen2", "llama_tied"])
def test_hf_dir_greedy_generation_matches_transformers(hf_dirs, kind):
  m, d = hf_dirs[kind]
  pre = convert.load_hf_dir(d)
  prompts = [list(_tokens(1, 7, seed=3)[0]), list(_tokens(1, 12, seed=4)[0])]
  ours = _greedy(pre, prompts)
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      # An explicit attention mask: else transformers masks prompt tokens equal to pad_token_id.
      ref = m.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                       max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got == ref[0, len(prompt):].tolist()
    assert len(got) == 32


def test_bfloat16_load(hf_dirs):
  _, d = hf_dirs["qwen2"]
  f32 = convert.load_hf_dir(d)
  # (checkpoint.load_model is decode.py's and eval's loader: a 7B read as float32 first would
  # take twice the host memory of the bf16 it runs in)
  bf16 = checkpoint.load_model(d, dtype="bfloat16")
  assert bf16.config.param_dtype == bf16.config.dtype == "bfloat16"
  for a, b in zip(jax.tree.leaves(f32.params), jax.tree.leaves(bf16.params)):
    assert b.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(a.astype(ml_dtypes.bfloat16), b)


def _small_tokenizer(n=200):
  """A tokenizer of `n` tokens, none of them a mask token."""
  vocab = {chr(0x100 + i): i for i in range(n)}
  return tk.Tokenizer(backend=tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[])))


def test_add_mask_token_uses_spare_row_of_padded_vocab(hf_dirs):
  pre = convert.load_hf_dir(hf_dirs["qwen2"][1])
  pre.tokenizer = _small_tokenizer(200)  # 256 embedding rows: rows 200.. are padding
  out = convert.add_mask_token(pre)
  assert out.config.mask_token_id == 200 and out.config.vocab_size == 256
  assert out.tokenizer.encode("<|mask|>") == [200] and out.tokenizer.mask_token_id == 200
  assert out.params is pre.params
  assert pre.tokenizer.mask_token_id is None and pre.tokenizer.vocab_size == 200  # input untouched
  again = convert.add_mask_token(out)  # keeps the existing one
  assert again.config.mask_token_id == 200 and again.tokenizer.vocab_size == 201


@pytest.mark.parametrize("kind", ["llama_untied", "llama_tied"])
def test_add_mask_token_grows_full_vocab(hf_dirs, kind):
  pre = convert.load_hf_dir(hf_dirs[kind][1])
  pre.tokenizer = _small_tokenizer(256)
  out = convert.add_mask_token(pre)
  assert out.config.mask_token_id == 256 and out.config.vocab_size == 320  # 257 rounded up to 64
  assert out.tokenizer.encode("<|mask|>") == [256]
  emb = out.params["embed"]["embedding"]
  np.testing.assert_allclose(emb[256:], np.broadcast_to(emb[:256].mean(0), (64, 64)), rtol=1e-6)
  tokens = _tokens()
  before, after = _ours_logits(pre, tokens), _ours_logits(out, tokens)
  np.testing.assert_array_equal(after[..., :256], before)
  # New columns score the mean logit: never the argmax of an untrained model.
  np.testing.assert_allclose(after[..., 256], before.mean(-1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["qwen2", "llama_tied"])
def test_export_loads_in_transformers_with_same_logits(hf_dirs, tmp_path, kind):
  pre = convert.load_hf_dir(hf_dirs[kind][1])
  pre.tokenizer = tk.simple_chars() if kind == "qwen2" else _small_tokenizer(256)
  pre.metadata = {"objective": "diffusion", "block_size": 32}
  pre = convert.add_mask_token(pre)
  out = convert.export_hf_dir(pre, tmp_path / "export")
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                     "tokenizer.json", "tokenizer_config.json"]
  assert os.listdir(tmp_path) == ["export"]  # no temporary directory left beside it
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(hf).__name__ == {"qwen2": "Qwen2ForCausalLM", "llama_tied": "LlamaForCausalLM"}[kind]
  tokens = _tokens(vocab=pre.config.vocab_size)
  ours = _ours_logits(pre, tokens)
  assert _rel_err(ours, _hf_logits(hf, tokens)) <= TOL
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok.convert_tokens_to_ids("<|mask|>") == pre.config.mask_token_id

  back = convert.load_hf_dir(out)
  assert back.config == pre.config
  assert back.metadata == {"objective": "diffusion", "block_size": 32,
                           "generation": {"do_sample": False}}  # (greedy, as exported)
  assert back.tokenizer.mask_token_id == pre.config.mask_token_id
  assert jax.tree.structure(back.params) == jax.tree.structure(pre.params)
  for a, b in zip(jax.tree.leaves(pre.params), jax.tree.leaves(back.params)):
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# Tiny GGUF files written here, loaded by transformers and by us


def _write_gguf(path, hf_model, arch, tensor_type=gguf.GGMLQuantizationType.Q8_0,
                override=None, extra=None, tokenizer_model="gpt2"):
  """Writes `hf_model` the way llama.cpp's converter does (llama Q/K rows permuted); `extra`:
  more float32 tensors by GGUF name."""
  cfg = hf_model.config
  heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(heads)
  w.add_head_count_kv(kv)
  w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_dimension_count(cfg.hidden_size // heads)
  w.add_vocab_size(cfg.vocab_size)
  # Byte-level vocabulary: the 256 byte symbols (row i spells byte i) and no merges.
  symbols = list(tk._bytes_to_unicode().values())
  w.add_tokenizer_model(tokenizer_model)
  w.add_token_list(symbols)
  w.add_token_merges([])
  w.add_token_types([1] * 256)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)

  def permute(x, n_head):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2) \
        .reshape(x.shape)

  names = {v: k for k, v in convert._GGUF_NAMES.items()}
  for name, p in hf_model.state_dict().items():
    x = p.float().numpy()
    if name == "lm_head.weight":
      if cfg.tie_word_embeddings:
        continue
      g = "output.weight"
    elif name == "model.embed_tokens.weight":
      g = "token_embd.weight"
    elif name == "model.norm.weight":
      g = "output_norm.weight"
    else:
      _, _, i, *mid, leaf = name.split(".")
      g = f"blk.{i}.{names['.'.join(mid)]}.{leaf}"
      if arch == "llama" and mid[-1] in ("q_proj", "k_proj"):
        x = permute(x, heads if mid[-1] == "q_proj" else kv)
    ttype = (override or {}).get(g, tensor_type if x.ndim == 2 else gguf.GGMLQuantizationType.F32)
    if ttype == gguf.GGMLQuantizationType.F32:
      w.add_tensor(g, x)
    elif ttype == gguf.GGMLQuantizationType.I32:
      w.add_tensor(g, x.astype(np.int32))
    else:
      w.add_tensor(g, gguf.quants.quantize(x, ttype), raw_dtype=ttype)
  for g, x in (extra or {}).items():
    w.add_tensor(g, np.asarray(x, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("kind,ttype", [("qwen2", "Q8_0"), ("llama_untied", "Q8_0"),
                                        ("llama_tied", "Q8_0"), ("qwen2", "F16")])
def test_gguf_logits_match_transformers(hf_dirs, tmp_path, kind, ttype):
  arch = "qwen2" if kind == "qwen2" else "llama"
  path = tmp_path / "tiny.gguf"
  _write_gguf(path, hf_dirs[kind][0], arch, gguf.GGMLQuantizationType[ttype])
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
  pre = convert.load_pretrained(str(path))
  assert pre.config.architecture == arch and pre.config.qkv_bias == (arch == "qwen2")
  assert pre.config.tie_embeddings == (kind == "llama_tied")
  assert pre.tokenizer.vocab_size == 256
  tokens = _tokens()
  assert _rel_err(_ours_logits(pre, tokens), _hf_logits(hf, tokens)) <= TOL


# --------------------------------------------------------------------------------------------
# Bad inputs: each error names the file and the problem


def _copy_dir(src, dst):
  dst.mkdir()
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


def test_missing_and_truncated_shards(hf_dirs, tmp_path):
  src = hf_dirs["qwen2_sharded"][1]
  d = _copy_dir(src, tmp_path / "missing")
  victim = sorted(d.glob("model-*.safetensors"))[1]
  victim.unlink()
  with pytest.raises(convert.CheckpointError, match=f"{victim.name}.*missing"):
    convert.load_hf_dir(d)
  d = _copy_dir(src, tmp_path / "truncated")
  victim = sorted(d.glob("model-*.safetensors"))[1]
  data = victim.read_bytes()
  for cut in (len(data) - 1, len(data) // 2, 100):
    victim.write_bytes(data[:cut])
    with pytest.raises(convert.CheckpointError, match=f"{victim.name}.*truncated or corrupt"):
      convert.load_hf_dir(d)
  d = _copy_dir(hf_dirs["qwen2"][1], tmp_path / "nofile")
  (d / "model.safetensors").unlink()
  with pytest.raises(convert.CheckpointError, match="neither model.safetensors"):
    convert.load_hf_dir(d)


def _edit_config(src, dst, **changes):
  d = _copy_dir(src, dst)
  raw = json.loads((d / "config.json").read_text())
  for k, v in changes.items():
    if v is None:
      raw.pop(k, None)
    else:
      raw[k] = v
  (d / "config.json").write_text(json.dumps(raw))
  return d


@pytest.mark.parametrize("changes,message", [
    (dict(architectures=["MistralForCausalLM"], model_type="mistral"),
     r"config.json: architectures=\['MistralForCausalLM'\].*supported: \['LlamaForCausalLM', "
     r"'Qwen2ForCausalLM'\]"),
    (dict(hidden_size=None), r"config.json: required field 'hidden_size' is missing"),
    (dict(rms_norm_eps=None), r"config.json: required field 'rms_norm_eps' is missing"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     r"config.json: rope scaling type 'llama3' is not supported; supported: plain RoPE"),
    (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}),
     r"rope scaling type 'linear' is not supported"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu'"),
    # rope_parameters (default) and a rope_scaling added by hand: both are read
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), r"rope scaling type 'yarn'"),
    (dict(quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True}),
     r"a quantized checkpoint \(quantization_config, quant_method='bitsandbytes'\)"),
    (dict(eos_token_id="</s>"), r"eos_token_id='</s>' is not a token id"),
    (dict(intermediate_size=96), r"mlp.gate_proj.weight' has shape \(128, 64\), config.json "
     r"implies \(96, 64\)"),
])
def test_bad_config_json(hf_dirs, tmp_path, changes, message):
  d = _edit_config(hf_dirs["llama_untied"][1], tmp_path / "bad", **changes)
  with pytest.raises(convert.CheckpointError, match=message):
    convert.load_hf_dir(d)


def test_quantized_tensors_and_slow_tokenizers_are_refused(hf_dirs, tmp_path):
  # int8 codes (a bitsandbytes file whose config lost its quantization_config) would load as the
  # weights themselves
  import safetensors.numpy
  d = _copy_dir(hf_dirs["llama_tied"][1], tmp_path / "int8")
  tensors = safetensors.numpy.load_file(str(d / "model.safetensors"))
  name = "model.layers.1.mlp.up_proj.weight"
  tensors[name] = np.clip(tensors[name] * 300, -127, 127).astype(np.int8)
  safetensors.numpy.save_file(tensors, str(d / "model.safetensors"))
  with pytest.raises(convert.CheckpointError, match=f"tensor '{name}' is I8; only F32, F16 and "
                     "BF16"):
    convert.load_hf_dir(d)
  # tokenizer files without tokenizer.json: said at load, not as "no tokenizer" later
  d = _copy_dir(hf_dirs["llama_tied"][1], tmp_path / "slow")
  (d / "vocab.json").write_text("{}")
  with pytest.raises(tk.TokenizerError, match="tokenizer.json does not exist; dllm_jax reads "
                     "fast tokenizers only"):
    convert.load_hf_dir(d)


def test_eos_lists_stop_generation_and_survive_export(hf_dirs, tmp_path):
  # Qwen2.5-Instruct: config.json's eos is <|im_end|>, generation_config.json's [<|im_end|>,
  # <|endoftext|>]; transformers' generate stops at either, and so must the decoders.
  d = _edit_config(hf_dirs["llama_untied"][1], tmp_path / "eos", eos_token_id=[7, 9])
  sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05}
  (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 11], "pad_token_id": 5,
                                                        "transformers_version": "4.0", **sampling}))
  pre = convert.load_hf_dir(d)
  assert pre.metadata["generation"] == sampling  # (the ids are the config's; the version theirs)
  assert pre.config.eos_token_id == 7 and pre.config.stop_token_ids == (9, 11)
  pre.tokenizer = tk.simple_chars()  # (its end of turn and eos: 2)
  assert decoding.stop_token_ids(pre.tokenizer, pre.config) == (2, 7, 9, 11)
  out = convert.export_hf_dir(pre, tmp_path / "export")
  generation = json.loads((out / "generation_config.json").read_text())
  assert generation["eos_token_id"] == [7, 2, 9, 11] and generation["pad_token_id"] == 0
  # The source's sampling defaults are written back (they were replaced by do_sample=false), and
  # kept out of config.json's own metadata.
  assert {k: generation[k] for k in sampling} == sampling
  assert "generation" not in json.loads((out / "config.json").read_text())["dllm_jax"]
  assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [7, 2, 9, 11]
  back = convert.load_hf_dir(out)
  assert (back.config.eos_token_id, back.config.stop_token_ids) == (7, (9, 11))
  assert decoding.stop_token_ids(back.tokenizer, back.config) == (2, 7, 9, 11)


def test_every_eos_id_of_config_json_stops_generation(hf_dirs, tmp_path):
  # Llama-3.1-Instruct's config.json lists eos [<|end_of_text|>, <|eom_id|>, <|eot_id|>]: the
  # first is the model's eos, each other one stops a generation as well, as it does in
  # transformers' generate, with or without a generation_config.json.
  d = _edit_config(hf_dirs["llama_untied"][1], tmp_path / "eos", eos_token_id=[7, 8, 9])
  (d / "generation_config.json").unlink()  # (save_pretrained's, which lists eos 2)
  pre = convert.load_hf_dir(d)
  assert pre.config.eos_token_id == 7 and pre.config.stop_token_ids == (8, 9)
  (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [12, 7]}))
  assert convert.load_hf_dir(d).config.stop_token_ids == (8, 9, 12)


def test_hf_config_norm_eps_and_head_dim_are_read_and_exported(tmp_path):
  # Llama's (and SmolLM2's) rms_norm_eps is 1e-5, not our default 1e-6, and head_dim may differ
  # from hidden_size / num_attention_heads (here 8, not 16): both are read from config.json,
  # give transformers' logits, and are written back by the export.
  torch.manual_seed(4)
  dims = dict(DIMS, rms_norm_eps=1e-5, head_dim=8)
  m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dims)).eval()
  m.save_pretrained(tmp_path / "src")
  pre = convert.load_hf_dir(tmp_path / "src")
  assert (pre.config.rms_norm_eps, pre.config.head_dim) == (1e-5, 8)
  tokens = _tokens()
  assert _rel_err(_ours_logits(pre, tokens), _hf_logits(m, tokens)) <= TOL
  out = convert.export_hf_dir(pre, tmp_path / "export")
  raw = json.loads((out / "config.json").read_text())
  assert (raw["rms_norm_eps"], raw["head_dim"]) == (1e-5, 8)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert (hf.config.rms_norm_eps, hf.config.head_dim) == (1e-5, 8)
  assert _rel_err(_hf_logits(m, tokens), _hf_logits(hf, tokens)) <= TOL
  assert convert.load_hf_dir(out).config == pre.config


def test_llama_with_attention_bias_exports_exactly(tmp_path):
  # transformers' attention_bias biases o_proj too; ours has none, so it loads only zeros there,
  # and exports zeros
  torch.manual_seed(3)
  m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DIMS, attention_bias=True)).eval()
  with torch.no_grad():
    for layer in m.model.layers:
      for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        proj.bias.normal_(0.0, 0.5)
  m.save_pretrained(tmp_path / "src")
  pre = convert.load_hf_dir(tmp_path / "src")
  assert pre.config.architecture == "llama" and pre.config.qkv_bias
  out = convert.export_hf_dir(pre, tmp_path / "export")
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = _tokens()
  assert _rel_err(_ours_logits(pre, tokens), _hf_logits(hf, tokens)) <= TOL
  assert _rel_err(_hf_logits(m, tokens), _hf_logits(hf, tokens)) <= TOL


def test_missing_tensor_and_tokenizer_too_large(hf_dirs, tmp_path):
  d = _edit_config(hf_dirs["llama_tied"][1], tmp_path / "untied", tie_word_embeddings=False)
  with pytest.raises(convert.CheckpointError, match="tensor 'lm_head.weight' is missing"):
    convert.load_hf_dir(d)
  d = _copy_dir(hf_dirs["llama_tied"][1], tmp_path / "bigtok")
  _small_tokenizer(300).save(d)
  with pytest.raises(convert.CheckpointError,
                     match=r"bigtok: the tokenizer has 300 tokens but the model's embedding has "
                     r"only 256 rows"):
    convert.load_hf_dir(d)


def test_unsupported_gguf_tensor_type_and_architecture(hf_dirs, tmp_path):
  path = tmp_path / "int.gguf"
  _write_gguf(path, hf_dirs["llama_untied"][0], "llama",
              override={"blk.1.ffn_up.weight": gguf.GGMLQuantizationType.I32})
  with pytest.raises(convert.CheckpointError,
                     match=r"int.gguf: tensor 'blk.1.ffn_up.weight' has type I32, which cannot be "
                     r"dequantized"):
    convert.load_gguf(path)
  path = tmp_path / "gemma.gguf"
  w = gguf.GGUFWriter(str(path), "gemma")
  w.add_block_count(1)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(convert.CheckpointError, match=r"general.architecture='gemma' is not "
                     r"supported; supported: 'llama', 'qwen2'"):
    convert.load_pretrained(path)


def test_gguf_tensors_the_model_would_run_without_are_refused(hf_dirs, tmp_path):
  # llama.cpp writes Llama-3's RoPE scaling as a rope_freqs tensor, with no rope.scaling key:
  # dropping it loaded a model that decoded with the wrong frequencies, without a word.
  model = hf_dirs["llama_untied"][0]
  half = model.config.hidden_size // model.config.num_attention_heads // 2
  path = tmp_path / "llama3.gguf"
  _write_gguf(path, model, "llama", extra={"rope_freqs.weight": np.ones(half)})
  with pytest.raises(convert.CheckpointError, match=r"llama3.gguf: holds 'rope_freqs.weight', "
                     r"llama.cpp's form of Llama-3 RoPE scaling"):
    convert.load_gguf(path)
  # A SentencePiece vocabulary (llama.cpp's "llama" tokenizer): refused as a checkpoint error,
  # before any tensor is dequantized.
  path = tmp_path / "spm.gguf"
  _write_gguf(path, model, "llama", tokenizer_model="llama")
  with pytest.raises(convert.CheckpointError, match="tokenizer.ggml.model='llama'; only byte-level"):
    convert.load_gguf(path)
  path = tmp_path / "qknorm.gguf"
  _write_gguf(path, model, "llama", extra={"blk.0.attn_q_norm.weight": np.ones(2 * half)})
  with pytest.raises(convert.CheckpointError, match=r"tensors \['blk.0.attn_q_norm.weight'\] are "
                     r"not part of a plain llama model"):
    convert.load_gguf(path)


def test_load_pretrained_errors(tmp_path, monkeypatch):
  with pytest.raises(convert.CheckpointError, match=r"'smollm3-huge' does not exist; .*shortcuts: "
                                                  r"\['smollm2-135m-instruct'\]"):
    convert.load_pretrained("smollm3-huge")
  (tmp_path / "weights.bin").write_bytes(b"")
  with pytest.raises(convert.CheckpointError, match=r"weights.bin' is none of a training run's "
                                                  r"directory, a HF model directory, a .gguf file"):
    convert.load_pretrained(tmp_path / "weights.bin")
  with pytest.raises(convert.CheckpointError, match="config.json does not exist"):
    convert.load_pretrained(tmp_path)
  # "~" (a --set value no shell expanded) and an upper-case .GGUF are found, not refused as
  # "none of a training run's directory, a HF model directory, a .gguf file or a known shortcut"
  monkeypatch.setenv("HOME", str(tmp_path))
  with pytest.raises(convert.CheckpointError, match="config.json does not exist"):
    convert.load_pretrained("~")
  (tmp_path / "m.GGUF").write_bytes(b"not a gguf file")
  with pytest.raises(Exception) as e:
    convert.load_pretrained("~/m.GGUF")
  assert "is none of" not in str(e.value)
  with pytest.raises(convert.CheckpointError, match="dtype='int8'"):
    convert.load_pretrained(tmp_path, dtype="int8")
  # A directory named as a shortcut (a full-precision download, say): which one is meant is
  # asked, not guessed (the packaged Q4_1 file was loaded without a word).
  (tmp_path / "smollm2-135m-instruct").mkdir()
  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    with pytest.raises(convert.CheckpointError, match="is both a shortcut .* and a path here"):
      convert.load_pretrained("smollm2-135m-instruct")
  finally:
    os.chdir(cwd)


def test_failed_export_leaves_nothing(hf_dirs, tmp_path, monkeypatch):
  pre = convert.load_hf_dir(hf_dirs["qwen2"][1])
  target = tmp_path / "out"

  def broken(*args, **kwargs):
    raise OSError("disk full")

  import safetensors.numpy
  monkeypatch.setattr(safetensors.numpy, "save_file", broken)
  with pytest.raises(OSError, match="disk full"):
    convert.export_hf_dir(pre, target)
  assert os.listdir(tmp_path) == []
  monkeypatch.undo()
  bad = convert.Pretrained(params=pre.params, config=pre.config, tokenizer=_small_tokenizer(300),
                           metadata={})
  with pytest.raises(convert.CheckpointError, match="300 tokens"):
    convert.export_hf_dir(bad, target)
  assert os.listdir(tmp_path) == []
  convert.export_hf_dir(pre, target)
  with pytest.raises(convert.CheckpointError, match="out already exists; pass overwrite=True"):
    convert.export_hf_dir(pre, target)
  convert.export_hf_dir(pre, target, overwrite=True)
  assert os.listdir(tmp_path) == ["out"]
  # The old copy of an interrupted overwrite, left beside it, is in no one's way.
  (tmp_path / ".out.old" / "x").mkdir(parents=True)
  convert.export_hf_dir(pre, target, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == [".out.old", "out"]
  # A new copy that cannot take the old one's place leaves the old one where it was.
  real = pathlib.Path.rename

  def refuse_second(self, to):
    if pathlib.Path(to) == target and not self.name.startswith(".out.old"):
      raise OSError("rename refused")
    return real(self, to)

  monkeypatch.setattr(pathlib.Path, "rename", refuse_second)
  with pytest.raises(OSError, match="rename refused"):
    convert.export_hf_dir(pre, target, overwrite=True)
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == [".out.old", "out"]
  assert (target / "model.safetensors").is_file()


def test_export_tensors_of_per_layer_params_equal_stacked():
  from dllm_jax.config import ModelConfig

  cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=3,
                    num_heads=2, num_kv_heads=1, head_dim=8)
  params = model.init_params(cfg, jax.random.key(0))
  stacked = convert._params_to_hf(params, cfg)
  per_layer = convert._params_to_hf(model.unstack_layers(params), cfg)
  out_in = convert._params_to_hf(*model.with_kernel_layout(params, cfg, "out_in"))
  assert stacked.keys() == per_layer.keys() == out_in.keys()
  for name in stacked:
    np.testing.assert_array_equal(per_layer[name], stacked[name])
    np.testing.assert_array_equal(out_in[name], stacked[name])


@pytest.mark.parametrize("on_host", [True, False])
def test_cast_to_another_kernel_layout_on_host_or_device(on_host):
  # Host params are transposed as views before the one device copy; device params are cast
  # first, so the transposed copy is made in the smaller dtype. Same result either way.
  from dllm_jax.config import ModelConfig

  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8)
  params = model.init_params(cfg, jax.random.key(0))
  if on_host:
    params = jax.tree_util.tree_map(np.asarray, params)
  pre = convert.Pretrained(params=params, config=cfg, tokenizer=None, metadata={})
  got = convert.cast(pre, "bfloat16", kernel_layout="out_in")
  assert got.config.kernel_layout == "out_in" and got.config.dtype == "bfloat16"
  want, _ = model.with_kernel_layout(params, cfg, "out_in")
  for g, w in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(want)):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g, np.float32),
                                  np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32))


def test_a_directory_that_holds_no_model_names_what_checkpoints_are_taken(tmp_path):
  with pytest.raises(convert.CheckpointError,
                     match=r"config.json does not exist: .* is not a HF model directory .*; give "
                           r"one, a training run's directory \(model.json, checkpoints/\), a "
                           r"\.gguf file or smollm2-135m-instruct"):
    convert.load_hf_dir(tmp_path)


def test_config_fields_of_the_wrong_kind_are_named_by_file(hf_dirs, tmp_path):
  # They failed as a bare ZeroDivisionError, TypeError or AttributeError (a review's probes).
  def edited(name, edit, filename="config.json"):
    d = tmp_path / name
    shutil.copytree(hf_dirs["qwen2_sharded"][1], d)
    raw = json.loads((d / filename).read_text())
    (d / filename).write_text(json.dumps(edit(raw)))
    return d

  for name, edit, message in (
      ("heads0", lambda r: {**r, "num_attention_heads": 0}, "ZeroDivisionError"),
      ("heads_str", lambda r: {**r, "num_attention_heads": "4"}, "TypeError"),
      ("rope_str", lambda r: {**r, "rope_scaling": "linear"}, "AttributeError")):
    with pytest.raises(convert.CheckpointError, match=rf"{name}/config.json: a field holds a "
                                                      rf"value of the wrong kind \({message}"):
      convert.load_hf_dir(edited(name, edit))
  with pytest.raises(convert.CheckpointError, match=r"config.json holds a list, not an object"):
    convert.load_hf_dir(edited("as_list", lambda r: [r]))
  with pytest.raises(convert.CheckpointError, match=r"index.json: not a valid safetensors index "
                                                    r"\(AttributeError"):
    convert.load_hf_dir(edited("map_list", lambda r: {**r, "weight_map": []},
                               "model.safetensors.index.json"))
