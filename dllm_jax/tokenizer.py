"""Tokenizers: HF `tokenizer.json` directories, GGUF metadata, and a tiny built-in character set.

A `Tokenizer` is a `tokenizers.Tokenizer` plus what a chat model needs around it: the model's own
jinja chat template (rendered the way transformers renders it, so prompts match token for token)
and the ids of its special tokens. `encode_chat` turns a conversation into ids and a loss mask that
covers exactly what the assistant wrote, found by rendering prefixes of the conversation, so it
works for any template without knowing its syntax.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import pathlib
import string
from typing import Any, Optional, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

log = logging.getLogger(__name__)

MASK_TOKEN = "<|mask|>"

# Tokens that close a chat turn, in the order we look for them; a template whose turns end in none
# of these falls back to the eos token.
_END_OF_TURN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Message = dict[str, Any]


class TokenizerError(ValueError):
  """A tokenizer file, template or conversation is unusable; the message says which and why."""


@dataclasses.dataclass
class Tokenizer:
  """A `tokenizers.Tokenizer` with its chat template and special token ids.

  Mutable on purpose: `add_mask_token` registers a token in place, like the HF tokenizers do.
  """

  backend: tokenizers.Tokenizer
  chat_template: Optional[str] = None
  bos_token_id: Optional[int] = None
  eos_token_id: Optional[int] = None
  pad_token_id: Optional[int] = None
  mask_token_id: Optional[int] = None
  eot_token_id: Optional[int] = None  # closes an assistant turn (e.g. <|im_end|>); eos if none
  unk_token_id: Optional[int] = None
  # Characters `encode` accepts (the built-in char tokenizer); None: anything. Without it a
  # character-level vocabulary would silently drop unknown characters.
  alphabet: Optional[frozenset[str]] = None

  # ------------------------------------------------------------------------------------------
  # Encoding

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce, added tokens included."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`; special tokens written in the text are recognised. None are added
    unless `add_special_tokens`: then what the tokenizer's post-processor adds to a plain text
    (Llama's BOS), as transformers' `tokenizer(text)` does. A rendered chat template has them
    already."""
    self._check_alphabet(text)
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as e:
      # (a lone surrogate: what undecodable bytes in stdin or argv become, and JSON's "\ud800";
      # the backend raised a bare TypeError)
      raise TokenizerError(f"the text holds {text[e.start:e.end]!r} (after "
                           f"{text[max(0, e.start - 24):e.start]!r}), which is no Unicode "
                           "character (bytes that were not UTF-8, or a lone surrogate escape): "
                           "give UTF-8 text") from None
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

  def token_to_id(self, token: str) -> Optional[int]:
    return self.backend.token_to_id(token)

  def id_to_token(self, token_id: int) -> Optional[str]:
    return self.backend.id_to_token(int(token_id))

  def _check_alphabet(self, text: str) -> None:
    if self.alphabet is None:
      return
    specials = [t.content for t in self.backend.get_added_tokens_decoder().values()]
    rest = text
    for s in specials:
      rest = rest.replace(s, "")
    bad = sorted(set(rest) - self.alphabet)
    if bad:
      raise TokenizerError(
          f"the character tokenizer cannot encode {bad!r}: it knows printable ASCII only "
          "(a model trained with it never saw them); remove them from the text, or train with "
          "simple_chars(extra_chars=...) or a real tokenizer")

  # ------------------------------------------------------------------------------------------
  # Chat

  def special_tokens(self) -> dict[str, Optional[str]]:
    """The template variables HF passes: bos_token, eos_token, pad_token, unk_token, mask_token."""
    ids = {"bos_token": self.bos_token_id, "eos_token": self.eos_token_id,
           "pad_token": self.pad_token_id, "unk_token": self.unk_token_id,
           "mask_token": self.mask_token_id}
    return {name: (None if i is None else self.id_to_token(i)) for name, i in ids.items()}

  def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                          **template_kwargs) -> str:
    """The conversation rendered by the model's own template, as transformers renders it."""
    if not self.chat_template:
      raise TokenizerError("this tokenizer has no chat template (tokenizer_config.json has no "
                           "'chat_template'); give one or format the prompt yourself")
    for i, m in enumerate(messages):
      if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise TokenizerError(f"messages[{i}]={m!r}: each message must be a dict with 'role' and "
                             "'content'")
    variables = {**self.special_tokens(), **template_kwargs}
    try:
      return _compile_template(self.chat_template).render(
          messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
          tools=variables.pop("tools", None), documents=variables.pop("documents", None),
          **variables)
    except jinja2.TemplateError as e:
      raise TokenizerError(f"the chat template failed on this conversation: {e}") from e

  def encode_chat(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
    """Ids of the rendered conversation and a loss mask: True exactly on the tokens of each
    assistant message's content, the end-of-turn token that closes it and the whitespace the
    template renders right after that token within the same turn (ChatML's "\n" after
    `<|im_end|>`; none after Llama 3's `<|eot_id|>`).

    That is the authors' span: Fast-dLLM v2 trains through LMFlow, whose Qwen2.5 template marks
    `{% generation %}{{ content + '<|im_end|>' + '\n' }}{% endgeneration %}` as the assistant's
    (lmflow/utils/conversation_template/qwen.py), so the newline is noised and predicted like
    the answer, not left visible in the block after it. The span never reaches into the next
    message's text: it stops at the end of what the assistant message adds to the rendering.
    Tokens are masked where their character offsets overlap the span, so a token straddling
    either end (a byte-level piece such as "\n 6" at the start of a reply) is masked.

    Spans are found by rendering prefixes: the text an assistant message adds after the
    generation prompt of the conversation before it. A template that rewrites earlier turns when
    later ones are added (so a prefix does not render to a prefix) is refused.
    """
    full = self.apply_chat_template(messages, add_generation_prompt=False)
    char_spans = []
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      prompt = self.apply_chat_template(messages[:i], add_generation_prompt=True)
      upto = self.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
      if not (full.startswith(upto) and upto.startswith(prompt)):
        raise TokenizerError(
            f"messages[{i}]: the chat template does not render this conversation's prefixes as "
            "prefixes of the whole (it rewrites earlier turns), so the assistant span cannot be "
            "located; use a template without that behaviour")
      turn = upto[len(prompt):]
      content = m["content"]
      offset = turn.find(content)
      if offset < 0:  # templates such as Llama 3's trim the content
        content = content.strip()
        offset = turn.find(content)
      if offset < 0:
        raise TokenizerError(f"messages[{i}]: the template does not render the assistant content "
                             "verbatim, so its tokens cannot be found")
      start = len(prompt) + offset
      end = start + len(content)
      eot = self.id_to_token(self.eot_token_id) if self.eot_token_id is not None else None
      if eot is not None:
        after = turn[offset + len(content):]
        k = after.find(eot)
        # The end-of-turn token belongs to the turn only if nothing but whitespace precedes it;
        # so does the whitespace that follows it up to the end of this turn (ChatML's "\n").
        if k >= 0 and not after[:k].strip():
          trailer = after[k + len(eot):]
          end += k + len(eot) + len(trailer) - len(trailer.lstrip())
      char_spans.append((start, end))

    self._check_alphabet(full)
    enc = self.backend.encode(full, add_special_tokens=False)
    mask = [any(s < te and ts < e for s, e in char_spans) for ts, te in enc.offsets]
    return list(enc.ids), mask

  # ------------------------------------------------------------------------------------------
  # Files

  def save(self, directory: str | pathlib.Path, model_max_length: int = 1 << 30) -> None:
    """Writes tokenizer.json and tokenizer_config.json (with the chat template), loadable by
    `transformers.AutoTokenizer` and by `from_hf_dir`. `model_max_length`: the context of the
    model it goes with (transformers warns past it)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self.backend.save(str(directory / "tokenizer.json"))
    added = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                 "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
        for i, t in sorted(self.backend.get_added_tokens_decoder().items())
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        **{k: v for k, v in self.special_tokens().items()},
    }
    if self.chat_template:
      config["chat_template"] = self.chat_template
    if self.eot_token_id is not None:
      config["dllm_jax_eot_token"] = self.id_to_token(self.eot_token_id)
    if self.alphabet is not None:  # (a character vocabulary: what it may encode, see `encode`)
      config["dllm_jax_alphabet"] = "".join(sorted(self.alphabet))
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2,
                                                                ensure_ascii=False))


# --------------------------------------------------------------------------------------------
# Jinja, as transformers sets it up (utils/chat_template_utils.py)


class _GenerationTag(jinja2.ext.Extension):
  """Accepts `{% generation %}...{% endgeneration %}` (used by some templates to mark assistant
  text for HF's assistant masks) and renders its body unchanged."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # jinja's own tojson escapes HTML characters, which HF's (and the models' templates) do not.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


_TEMPLATES: dict[str, jinja2.Template] = {}


def _compile_template(source: str) -> jinja2.Template:
  if source not in _TEMPLATES:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
      _TEMPLATES[source] = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
      raise TokenizerError(f"the chat template is not valid jinja: {e}") from e
  return _TEMPLATES[source]


# --------------------------------------------------------------------------------------------
# Constructors


def _token_content(value) -> Optional[str]:
  """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def _id_of(backend: tokenizers.Tokenizer, token: Optional[str], where: str) -> Optional[int]:
  if token is None:
    return None
  token_id = backend.token_to_id(token)
  if token_id is None:
    raise TokenizerError(f"{where}: special token {token!r} is not in the vocabulary")
  return token_id


def _end_of_turn(backend: tokenizers.Tokenizer, eos_id: Optional[int]) -> Optional[int]:
  for token in _END_OF_TURN_CANDIDATES:
    token_id = backend.token_to_id(token)
    if token_id is not None:
      return token_id
  return eos_id


def from_hf_dir(path: str | pathlib.Path) -> Tokenizer:
  """Loads tokenizer.json with tokenizer_config.json / special_tokens_map.json / chat_template.jinja."""
  path = pathlib.Path(path)
  tok_file = path / "tokenizer.json"
  if not tok_file.is_file():
    raise TokenizerError(f"{tok_file} does not exist; dllm_jax reads fast tokenizers only (save "
                         "the tokenizer with transformers' save_pretrained to get tokenizer.json)")
  try:
    backend = tokenizers.Tokenizer.from_file(str(tok_file))
  except Exception as e:
    raise TokenizerError(f"{tok_file} is not a valid tokenizers file: {e}") from e
  # A file may carry truncation or padding (to a training length); transformers turns both off
  # for each call unless asked, and so must we: they would cut prompts and samples silently.
  backend.no_truncation()
  backend.no_padding()

  def read(name: str) -> dict:
    f = path / name
    try:
      return json.loads(f.read_text()) if f.is_file() else {}
    except json.JSONDecodeError as e:
      raise TokenizerError(f"{f} is not valid JSON: {e}") from e

  tok_config, special = read("tokenizer_config.json"), read("special_tokens_map.json")
  # As transformers resolves the two: a tokenizer_config.json that lists added_tokens_decoder
  # (every one transformers >= 4.34 writes) wins; an older one yields to special_tokens_map.json.
  if "added_tokens_decoder" in tok_config:
    config = {**special, **tok_config}
  else:
    config = {**tok_config, **special}
  template = config.get("chat_template")
  if isinstance(template, list):  # several named templates: HF uses "default"
    named = {t.get("name"): t.get("template") for t in template}
    template = named.get("default")
  jinja_file = path / "chat_template.jinja"
  if jinja_file.is_file():
    template = jinja_file.read_text()

  where = str(path / "tokenizer_config.json")
  ids = {name: _id_of(backend, _token_content(config.get(name)), where)
         for name in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")}
  if ids["mask_token"] is None:
    ids["mask_token"] = backend.token_to_id(MASK_TOKEN)
  eot = _id_of(backend, config.get("dllm_jax_eot_token"), where)
  alphabet = config.get("dllm_jax_alphabet")
  return Tokenizer(
      backend=backend, chat_template=template, bos_token_id=ids["bos_token"],
      eos_token_id=ids["eos_token"], pad_token_id=ids["pad_token"],
      mask_token_id=ids["mask_token"], unk_token_id=ids["unk_token"],
      eot_token_id=eot if eot is not None else _end_of_turn(backend, ids["eos_token"]),
      alphabet=frozenset(alphabet) if isinstance(alphabet, str) else None)


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table, the alphabet of byte-level BPE vocabularies."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


# llama.cpp token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer splits of the vocabularies whose `tokenizer.ggml.pre` names one (the table of
# transformers' GGUF builder); the digits-first names below split as llama.cpp does, where
# transformers falls back to GPT-2's split; any other name gets GPT-2's (with a warning).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's pre-tokenizer names that split digits one by one before GPT-2's split.
_DIGITS_FIRST = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                 "minerva-7b")
_GGUF_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}


def from_gguf(reader_or_path) -> Tokenizer:
  """Builds the byte-level BPE tokenizer a GGUF file describes ("gpt2" tokenizer model).

  Follows transformers' own GGUF tokenizer builder (integrations/gguf): byte-level
  pre-tokenizer with the split `tokenizer.ggml.pre` names (GPT-2's by default), control tokens
  added whole as special tokens, user-defined ones as plain added tokens; except that the
  digits-first vocabularies (SmolLM2's "smollm") split as llama.cpp and their own tokenizer.json
  do, where transformers splits as GPT-2.
  """
  import gguf  # imported here: only GGUF users need it

  reader = reader_or_path
  if not isinstance(reader, gguf.GGUFReader):
    reader = gguf.GGUFReader(str(reader_or_path))
  where = getattr(reader.data, "filename", None) or "the GGUF file"
  fields = reader.fields

  def get(key, default=None):
    return fields[key].contents() if key in fields else default

  kind = get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise TokenizerError(f"{where}: tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2', "
                         "used by Llama 3, Qwen2 and SmolLM) is supported")
  tokens = get("tokenizer.ggml.tokens")
  if tokens is None:
    raise TokenizerError(f"{where}: metadata lacks tokenizer.ggml.tokens")
  merges = get("tokenizer.ggml.merges", [])  # GGUFWriter leaves out an empty merge list
  types = get("tokenizer.ggml.token_type") or [1] * len(tokens)

  spelling = _bytes_to_unicode()
  alphabet = set(spelling.values())
  # Tokens outside the byte alphabet (rare mislabels) are spelled in it, as transformers does.
  vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
           for i, t in enumerate(tokens)}
  bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                   continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
  backend = tokenizers.Tokenizer(bpe)
  pre = get("tokenizer.ggml.pre")
  split = _GGUF_SPLITS.get(pre)
  if pre in _DIGITS_FIRST:
    # Every digit its own piece before GPT-2's split, as SmolLM2's own tokenizer.json does
    # (llama.cpp's `\p{N}` first for these): "x =  1" is [x, Ġ=, ĠĠ, 1], not [.., Ġ, Ġ, 1].
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  elif split is None:
    if pre not in (None, "default", "gpt-2", "gpt2"):
      log.warning("%s: tokenizer.ggml.pre=%r is not one dllm_jax knows; splitting as GPT-2 does, "
                  "which may tokenize otherwise than the model was trained", where, pre)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  backend.decoder = decoders.ByteLevel()
  control = [AddedToken(t, normalized=False, special=True)
             for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
  backend.add_special_tokens(control)
  user = [AddedToken(t, normalized=False, special=False)
          for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
  backend.add_tokens(user)

  def special(key):
    i = get(f"tokenizer.ggml.{key}")
    return None if i is None else int(i)

  eos = special("eos_token_id")
  bos = special("bos_token_id")
  if get("tokenizer.ggml.add_bos_token") and bos is not None:
    # (Llama 3's files: a plain text starts with BOS, as their tokenizer.json's post-processor
    # makes it; `encode(text, add_special_tokens=True)` adds it)
    bos_text = backend.id_to_token(bos)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos_text} $A", pair=f"{bos_text} $A {bos_text} $B",
        special_tokens=[(bos_text, bos)])
  return Tokenizer(
      backend=backend, chat_template=get("tokenizer.chat_template"),
      bos_token_id=bos, eos_token_id=eos,
      pad_token_id=special("padding_token_id"), unk_token_id=special("unknown_token_id"),
      mask_token_id=backend.token_to_id(MASK_TOKEN), eot_token_id=_end_of_turn(backend, eos))


SIMPLE_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", MASK_TOKEN)


def simple_chars(extra_chars: str = "") -> Tokenizer:
  """A character-level tokenizer over printable ASCII (plus `extra_chars`) with ChatML special
  tokens and template. Ids 0-3 are the special tokens, then one id per character. Needs no files:
  for the synthetic tasks and tests."""
  chars = list(dict.fromkeys(string.printable + extra_chars))
  vocab = {t: i for i, t in enumerate(SIMPLE_SPECIAL_TOKENS)}
  for c in chars:
    vocab.setdefault(c, len(vocab))
  # BPE without merges is a character tokenizer that tokenizers and transformers both load.
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
  backend.decoder = decoders.Fuse()
  backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                              for t in SIMPLE_SPECIAL_TOKENS])
  ids = {t: i for i, t in enumerate(SIMPLE_SPECIAL_TOKENS)}
  return Tokenizer(
      backend=backend, chat_template=_CHATML_TEMPLATE, bos_token_id=None,
      eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
      mask_token_id=ids[MASK_TOKEN], eot_token_id=ids["<|im_end|>"], alphabet=frozenset(chars))


def add_mask_token(tokenizer: Tokenizer) -> int:
  """Registers `<|mask|>` as a special token if the tokenizer has none; returns the mask id."""
  if tokenizer.mask_token_id is None:
    existing = tokenizer.backend.token_to_id(MASK_TOKEN)
    if existing is None:
      tokenizer.backend.add_special_tokens([AddedToken(MASK_TOKEN, normalized=False,
                                                       special=True)])
      existing = tokenizer.backend.token_to_id(MASK_TOKEN)
    tokenizer.mask_token_id = existing
  return tokenizer.mask_token_id
