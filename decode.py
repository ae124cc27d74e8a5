"""Decode with a block-diffusion (Fast-dLLM v2) or AR model.

  python decode.py --checkpoint PATH --prompt "What is 7 * 8?"
  python decode.py --checkpoint PATH --prompts prompts.jsonl --batch-size 8 --json
  python decode.py --checkpoint PATH --chat            # interactive multi-turn
  python decode.py --checkpoint PATH --prompt "..." --live   # watch the blocks denoise

PATH: a training run directory (newest good checkpoint), a HF model directory, a .gguf file, or
the shortcut smollm2-135m-instruct. A prompts file holds one JSON object per line with "prompt"
(a user message) or "messages" (a conversation); the model's chat template is applied unless
--no-chat-template. Timings exclude compilation, which is reported apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

import numpy as np

from dllm_jax import decoding_cli
from dllm_jax.decoding_cli import UsageError, encode_at, prompt_width

MASK_GLYPH = "░"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python decode.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  decoding_cli.add_arguments(p, batch_size=8)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", help="one user message")
  src.add_argument("--prompts", help="JSONL file: {'prompt': ...} or {'messages': [...]} a line")
  src.add_argument("--chat", action="store_true", help="interactive multi-turn chat on stdin")
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--no-chat-template", action="store_true", help="feed the prompt text as is")
  p.add_argument("--json", action="store_true", help="print one machine-readable JSON document")
  p.add_argument("--live", action="store_true",
                 help="show the denoising of a single --prompt in the terminal, step by step")
  return p


# --------------------------------------------------------------------------------------------
# Inputs


ROLES = ("system", "user", "assistant", "tool")  # the roles chat templates render (a typo is named)


def read_prompts(path: str) -> tuple[list[list[dict]], list[str]]:
  """Conversations from a JSONL file, and the file:line of each: each line {"prompt": str} or
  {"messages": [{"role", "content"}, ...]}; a bad line is an error naming file:line."""
  conversations, wheres = [], []
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise UsageError(f"--prompts {path}: {e.strerror or e}") from None
  for where, record in decoding_cli.jsonl_values(data, path):
    if isinstance(record, dict) and "prompt" in record and "messages" in record:
      raise UsageError(f"{where}: both 'prompt' and 'messages'; give one")
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
      conversations.append([{"role": "user", "content": record["prompt"]}])
      wheres.append(where)
    elif isinstance(record, dict) and isinstance(record.get("messages"), list):
      messages = record["messages"]
      if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                 and isinstance(m.get("content"), str) for m in messages):
        raise UsageError(f"{where}: 'messages' must be a non-empty list of objects with "
                         "string 'role' and 'content'")
      roles = [m["role"] for m in messages if m["role"] not in ROLES]
      if roles:
        raise UsageError(f"{where}: role {roles[0]!r} is not one of {ROLES}")
      conversations.append(messages)
      wheres.append(where)
    else:
      raise UsageError(f"{where}: expected an object with a string 'prompt' or a list "
                       "'messages'")
  if not conversations:
    raise UsageError(f"{path} holds no prompts")
  return conversations, wheres


def _sampling(args) -> dict:
  return {"temperature": args.temperature, "top_p": args.top_p}


# --------------------------------------------------------------------------------------------
# Decoding


class Decoder:
  """Compiles `generate` once per (batch, prompt width) and times runs apart from compiles."""

  def __init__(self, pretrained, cfg, seed: int):
    import jax

    from dllm_jax import decoding

    self.pretrained, self.cfg = pretrained, cfg
    self.rng = jax.random.key(seed)
    self.fn = jax.jit(lambda p, t, n, r: decoding.generate(p, pretrained.config, t, n, r, cfg))
    self.compiled = {}
    self.compile_s = 0.0
    self.run_s = 0.0
    self.calls = 0

  def __call__(self, prompts: list[list[int]], width: int, batch: int):
    """Generated ids and stats of each prompt; `width`/`batch` fix the compiled shapes."""
    import jax
    import jax.numpy as jnp

    toks = np.zeros((batch, width), np.int32)
    lens = np.zeros((batch,), np.int32)
    for r in range(batch):
      ids = prompts[min(r, len(prompts) - 1)]  # unused rows repeat the last prompt
      toks[r, :len(ids)] = ids
      lens[r] = len(ids)
    args = (self.pretrained.params, jnp.asarray(toks), jnp.asarray(lens),
            jax.random.fold_in(self.rng, self.calls))
    self.calls += 1
    key = (batch, width)
    if key not in self.compiled:
      t0 = time.perf_counter()
      self.compiled[key] = self.fn.lower(*args).compile()
      self.compile_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    out, lengths, stats = jax.block_until_ready(self.compiled[key](*args))
    self.run_s += time.perf_counter() - t0
    out, lengths, nfe = np.asarray(out), np.asarray(lengths), np.asarray(stats["nfe"])
    return [(out[r, :lengths[r]].tolist(), int(nfe[r])) for r in range(len(prompts))]


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _strip_stop(ids: list[int], cfg) -> list[int]:
  return ids[:-1] if ids and ids[-1] in cfg.stop_token_ids else ids


def _check_lengths(prompts, model_cfg, cfg, width, wheres):
  """UsageError for an empty prompt, or prompts `width` wide that with --max-new-tokens would
  reach past the model's context (generate's own DecodeError, named as the flags); `wheres`
  names each prompt."""
  from dllm_jax import decoding

  for ids, where in zip(prompts, wheres):
    if not ids:
      raise UsageError(f"{where}: the prompt is empty after tokenization; give some text")
    if len(ids) > model_cfg.max_position_embeddings:
      raise UsageError(f"{where}: the prompt has {len(ids)} tokens, longer than the model's "
                       f"context ({model_cfg.max_position_embeddings})")
  try:
    decoding.check_reach(model_cfg, cfg, width)
  except decoding.DecodeError as e:
    widest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    which = (f" (the widest prompt: {wheres[widest]}, {len(prompts[widest])} tokens)"
             if len(prompts) > 1 else "")
    raise UsageError(decoding_cli.as_flags(str(e)) + which) from None


def run_batch(args, pretrained, cfg, conversations, wheres=None, on_result=None) -> dict:
  """Decodes the conversations in batches; `wheres` names each in errors (default: --prompt).
  `on_result` is called with each result as soon as its batch is decoded (the text output
  streams: an interrupt keeps what was printed)."""
  tok = pretrained.tokenizer
  wheres = wheres or ["--prompt"] * len(conversations)
  prompts = [encode_at(tok, c, w, args.no_chat_template) for c, w in zip(conversations, wheres)]
  width = prompt_width(max(map(len, prompts)), cfg, pretrained.config)
  _check_lengths(prompts, pretrained.config, cfg, width, wheres)
  batch = max(1, min(args.batch_size, len(prompts)))
  decoder = Decoder(pretrained, cfg, args.seed)
  results = []
  for start in range(0, len(prompts), batch):
    chunk = prompts[start:start + batch]
    for i, (ids, nfe) in enumerate(decoder(chunk, width, batch)):
      text = tok.decode(_strip_stop(ids, cfg))
      results.append({"index": start + i, "prompt": conversations[start + i][-1]["content"],
                      "text": text, "tokens": len(ids), "nfe": nfe,
                      "tokens_per_forward": len(ids) / max(nfe, 1)})
      if on_result is not None:
        on_result(results[-1])
  tokens = sum(r["tokens"] for r in results)
  nfe = sum(r["nfe"] for r in results)
  summary = {"mode": cfg.mode, "prompts": len(results), "generated_tokens": tokens,
             "tokens_per_s": tokens / decoder.run_s if decoder.run_s else 0.0,
             "tokens_per_forward": tokens / max(nfe, 1), "run_s": decoder.run_s,
             "compile_s": decoder.compile_s, "batch_size": batch, "checkpoint": args.checkpoint}
  return {"results": results, "summary": summary}


def _print_summary(s: dict, out=None):
  out = out or sys.stdout
  print(f"[{s['mode']}] {s['generated_tokens']} tokens in {s['run_s']:.2f}s: "
        f"{s['tokens_per_s']:.1f} tokens/s, {s['tokens_per_forward']:.2f} tokens per forward "
        f"(compile {s['compile_s']:.1f}s, not included)", file=out)


def _chat_turns(args, pretrained, cfg, decoder, conversation, turns, stdin, out) -> None:
  """The chat's turns until an empty line or EOF, appended to `conversation` and `turns`."""
  tok = pretrained.tokenizer
  while True:
    print("> ", end="", file=out, flush=True)
    line = stdin.readline()
    if not line.strip():
      break
    conversation.append({"role": "user", "content": line.strip()})
    try:
      ids = encode_at(tok, conversation, "this turn", args.no_chat_template)
    except UsageError as e:  # (the conversation so far stays; this turn is not taken)
      conversation.pop()
      print(f"decode.py: {e}; this turn is not taken", file=out)
      continue
    width = prompt_width(len(ids), cfg, pretrained.config, steps=4)
    try:
      _check_lengths([ids], pretrained.config, cfg, width, ["this turn"])
    except UsageError as e:
      conversation.pop()
      print(f"decode.py: {e}; " + ("the conversation is too long for another turn" if turns
                                   else "this message is not taken: type a shorter one"),
            file=out)
      continue
    (gen, nfe), = decoder([ids], width, 1)
    reply = tok.decode(_strip_stop(gen, cfg))
    conversation.append({"role": "assistant", "content": reply})
    turns.append({"user": line.strip(), "assistant": reply, "tokens": len(gen), "nfe": nfe})
    print(reply, file=out)
    print(f"  ({len(gen)} tokens, {len(gen) / max(nfe, 1):.2f} per forward)", file=out)


def chat(args, pretrained, cfg, stdin=None, out=None) -> dict:
  """Multi-turn chat: each line typed is a user turn; an empty line or EOF ends it."""
  stdin, out = stdin or sys.stdin, out or sys.stdout
  tok = pretrained.tokenizer
  # --max-new-tokens past what even a one-word first message leaves room for is a flag error,
  # not a turn to retype.
  probe = encode_at(tok, [{"role": "user", "content": "hi"}], "a one-word message",
                    args.no_chat_template)
  try:
    _check_lengths([probe], pretrained.config, cfg,
                   prompt_width(len(probe), cfg, pretrained.config, steps=4), ["--chat"])
  except UsageError as e:
    raise UsageError(f"--chat: no turn would fit, not even a one-word message: {e}") from None
  decoder = Decoder(pretrained, cfg, args.seed)
  conversation, turns = [], []
  print("chat: type a message, an empty line to quit", file=out)
  try:
    _chat_turns(args, pretrained, cfg, decoder, conversation, turns, stdin, out)
  except KeyboardInterrupt:  # (Ctrl-C ends the chat as an empty line does; the turn under way
    # is dropped)
    print("\n(interrupted: the chat ends here)", file=out)
  tokens = sum(t["tokens"] for t in turns)
  return {"turns": turns, "summary": {
      "mode": cfg.mode, "generated_tokens": tokens, "run_s": decoder.run_s,
      "tokens_per_s": tokens / decoder.run_s if decoder.run_s else 0.0,
      "tokens_per_forward": tokens / max(sum(t["nfe"] for t in turns), 1),
      "compile_s": decoder.compile_s}}


def live(args, pretrained, cfg, conversation, out=None) -> dict:
  """Runs the decode with a host callback after every step and redraws the generated text,
  masked positions shown as MASK_GLYPH. Slower than the compiled path: a visualisation."""
  out = out or sys.stdout
  import jax
  import jax.numpy as jnp

  from dllm_jax import decoding

  if cfg.mode != "diffusion":
    raise UsageError("--live shows diffusion denoising; use it with --mode diffusion")
  tok = pretrained.tokenizer
  ids = encode_at(tok, conversation, "--prompt", args.no_chat_template)
  _check_lengths([ids], pretrained.config, cfg, len(ids), ["--prompt"])
  plen, n = len(ids), cfg.max_new_tokens
  frames = []
  tty = hasattr(out, "isatty") and out.isatty()

  def on_step(tokens, masked, done):
    tokens, masked = np.asarray(tokens)[0, plen:plen + n], np.asarray(masked)[0, plen:plen + n]
    last = int(np.argmax(masked)) if masked.any() else n
    # Show up to the end of the block being decoded; decoded tokens as text, masks as glyphs.
    shown = min(n, _round_up(plen + last + 1, cfg.block_size) - plen)
    pieces = [MASK_GLYPH if masked[i] else tok.decode([int(tokens[i])], skip_special=False)
              for i in range(shown)]
    frame = "".join(pieces)
    frames.append(frame)
    if tty:
      out.write("\x1b[2J\x1b[H" + frame + "\n")
    else:
      out.write(frame + "\n")
    out.flush()

  t0 = time.perf_counter()
  gen, lengths, stats = decoding.generate(
      pretrained.params, pretrained.config, jnp.asarray([ids], jnp.int32),
      jnp.asarray([plen], jnp.int32), jax.random.key(args.seed), cfg, on_step=on_step)
  jax.block_until_ready(gen)
  elapsed = time.perf_counter() - t0
  gen = np.asarray(gen)[0, :int(lengths[0])].tolist()
  text = tok.decode(_strip_stop(gen, cfg))
  print(text, file=out)
  return {"text": text, "frames": frames, "tokens": len(gen), "nfe": int(stats["nfe"][0]),
          "wall_s_with_compile_and_drawing": elapsed}


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = _parser().parse_args(argv)
  try:
    if args.live and not args.prompt:
      raise UsageError("--live needs a single --prompt")
    decoding_cli.check(args, **_sampling(args))
    conversations = wheres = None
    if args.prompts:
      conversations, wheres = read_prompts(args.prompts)
    # The batch the decoder runs: one conversation for --chat, --live and --prompt.
    batch = max(1, min(args.batch_size, len(conversations))) if conversations else 1
    pretrained = decoding_cli.load(args, "decode.py", batch=batch)
    cfg = decoding_cli.decode_config(args, pretrained, **_sampling(args))
    if args.live:
      # (with --json, stdout holds the one JSON document: the frames and text go to stderr)
      result = live(args, pretrained, cfg, [{"role": "user", "content": args.prompt}],
                    out=sys.stderr if args.json else None)
    elif args.chat:
      result = chat(args, pretrained, cfg, out=sys.stderr if args.json else None)
    else:
      conversations = conversations or [[{"role": "user", "content": args.prompt}]]
      done = []

      def show(r):  # (the text streams; --json prints one document at the end)
        done.append(r)
        if not args.json:
          if len(conversations) > 1:
            print(f"--- [{r['index']}] {r['prompt']}")
          print(r["text"], flush=True)

      try:
        result = run_batch(args, pretrained, cfg, conversations, wheres, on_result=show)
      except KeyboardInterrupt:
        if args.json:  # (the answers decoded so far, in the document's shape)
          print(json.dumps({"results": done, "interrupted": True,
                            "prompts": len(conversations)}))
        where = " (printed above)" if not args.json else " (in the JSON document)"
        print(f"decode.py: interrupted after {len(done)} of {len(conversations)} prompts"
              + (where if done else ""), file=sys.stderr)
        raise SystemExit(130) from None
  except UsageError as e:
    raise decoding_cli.usage_exit("decode.py", str(e)) from None
  if args.json:
    print(json.dumps({k: v for k, v in result.items() if k != "frames"}))
  elif "results" in result:
    _print_summary(result["summary"])
  elif "turns" in result:
    _print_summary(result["summary"])
  return result


if __name__ == "__main__":
  decoding_cli.cli_warnings("decode.py")
  with decoding_cli.quiet_broken_pipe():
    main()
