"""decode.py on tiny models exported to HF directories: batch, JSON, chat, live view, errors."""

import dataclasses
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dllm_jax import convert, decoding, model
from dllm_jax import tokenizer as tk
from dllm_jax.config import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import decode  # noqa: E402

FAST = ["--block-size", "8", "--sub-block-size", "4", "--threshold", "0.5",
        "--max-new-tokens", "12"]


def _export(path, objective, edit=None):
  tok = tk.simple_chars()
  cfg = ModelConfig(architecture="qwen2", qkv_bias=True, vocab_size=128, hidden_size=32,
                    intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    max_position_embeddings=256, mask_token_id=tok.mask_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  params = model.init_params(cfg, jax.random.key(0))
  params = jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, params)
  params = edit(params, tok) if edit else params
  metadata = {"objective": objective} if objective else {}
  convert.export_hf_dir(convert.Pretrained(params, cfg, tok, metadata), path)
  return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("decode_cli")
  return {"diffusion": _export(root / "dllm", "diffusion"), "ar": _export(root / "ar", None)}


def test_prompts_file_batched_json_equals_generate(dirs, tmp_path, capsys):
  prompts = ["What is 2+2?", "Say hi", "A longer prompt about blocks and masks, please."]
  path = tmp_path / "p.jsonl"
  path.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts[:2]) + "\n\n"
                  + json.dumps({"messages": [{"role": "user", "content": prompts[2]}]}) + "\n")
  result = decode.main(["--checkpoint", dirs["diffusion"], "--prompts", str(path),
                        "--batch-size", "2", "--json", *FAST])
  printed = json.loads(capsys.readouterr().out)
  assert printed["summary"] == result["summary"]
  s = result["summary"]
  assert s["prompts"] == 3 and s["batch_size"] == 2 and s["mode"] == "diffusion"
  assert s["tokens_per_s"] > 0 and s["compile_s"] > 0 and s["tokens_per_forward"] > 0
  # Each answer is what generate() gives that prompt alone, under the model's chat template.
  pre = convert.load_pretrained(dirs["diffusion"])
  tok = pre.tokenizer
  cfg = decoding.DecodeConfig(max_new_tokens=12, block_size=8, sub_block_size=4, threshold=0.5,
                              stop_token_ids=(tok.eot_token_id,), pad_token_id=tok.pad_token_id)
  encoded = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]))
             for p in prompts]
  width = -(-max(map(len, encoded)) // 8) * 8  # one compiled shape for the three prompts
  for r, ids in zip(result["results"], encoded):
    assert ids[:3] == tok.encode("<|im_start|>user")[:3]
    row = np.zeros((1, width), np.int32)
    row[0, :len(ids)] = ids
    out, n, stats = decoding.generate_jit(pre.params, pre.config, jnp.asarray(row),
                                          jnp.asarray([len(ids)]), jax.random.key(0), cfg)
    gen = np.asarray(out)[0, :int(n[0])].tolist()
    assert r["tokens"] == len(gen) and r["nfe"] == int(stats["nfe"][0])
    assert r["text"] == tok.decode(gen[:-1] if gen[-1] == tok.eot_token_id else gen)


def _generate_alone(pre, text, cfg):
  """generate()'s answer and nfe for one prompt under the model's chat template."""
  ids = pre.tokenizer.encode(pre.tokenizer.apply_chat_template([{"role": "user",
                                                                  "content": text}]))
  row = np.zeros((1, -(-len(ids) // 8) * 8), np.int32)  # whole blocks, as decode.py pads
  row[0, :len(ids)] = ids
  out, n, stats = decoding.generate_jit(pre.params, pre.config, jnp.asarray(row),
                                        jnp.asarray([len(ids)]), jax.random.key(0), cfg)
  return np.asarray(out)[0, :int(n[0])].tolist(), int(stats["nfe"][0])


def test_no_dual_cache_flag_decodes_without_the_dual_cache(dirs):
  # The DualCache reuses the block's stale KV outside the sub-block, so it may decode other
  # tokens than recomputing the block every step; --no-dual-cache must give the latter. The
  # prompt and length are ones where the two differ.
  flags = ["--block-size", "8", "--sub-block-size", "4", "--threshold", "0.5",
           "--max-new-tokens", "24"]
  pre = convert.load_pretrained(dirs["diffusion"])
  tok = pre.tokenizer
  cfg = decoding.DecodeConfig(max_new_tokens=24, block_size=8, sub_block_size=4, threshold=0.5,
                              stop_token_ids=(tok.eot_token_id,), pad_token_id=tok.pad_token_id)
  answers = {dual: _generate_alone(pre, "x", dataclasses.replace(cfg, use_dual_cache=dual))
             for dual in (True, False)}
  assert answers[True][0] != answers[False][0]  # the case that tells the two apart
  for dual, extra in ((True, []), (False, ["--no-dual-cache"])):
    result = decode.main(["--checkpoint", dirs["diffusion"], "--prompt", "x", "--json",
                          *flags, *extra])["results"][0]
    gen, nfe = answers[dual]
    assert (result["tokens"], result["nfe"]) == (len(gen), nfe), dual
    assert result["text"] == tok.decode(gen[:-1] if gen[-1] == tok.eot_token_id else gen)


def test_answers_end_at_the_models_stop_token(tmp_path):
  # A model that puts all its mass on the end-of-turn token (a large constant direction in
  # every embedding, read by the head's eot column): the answer ends at its first token, in
  # both modes, because decode.py stops on the tokenizer's and model's stop ids.
  def eot_everywhere(params, tok):
    params = dict(params, embed={"embedding": params["embed"]["embedding"].at[:, 0].add(1e3)})
    return dict(params, lm_head=params["lm_head"].at[0, tok.eot_token_id].add(1e3))

  path = _export(tmp_path / "eot", "diffusion", eot_everywhere)
  for mode, flags in (("diffusion", FAST), ("ar", FAST[-2:])):  # (AR: no diffusion flags)
    result = decode.main(["--checkpoint", path, "--prompt", "hi", "--mode", mode, *flags])
    assert result["results"][0]["tokens"] == 1 and result["results"][0]["text"] == "", mode


def test_ar_batch_one_with_fused_projections(dirs, monkeypatch):
  # --matvec pallas runs kernels.matvec (interpreted here) for the one-row steps; greedy text
  # equals the XLA path's.
  from dllm_jax.kernels import matvec

  traced = []
  plain = matvec.norm_matvec
  monkeypatch.setattr(matvec, "norm_matvec",
                      lambda *a, **k: traced.append(k.get("out_major")) or plain(*a, **k))
  # (No --batch-size: one --prompt decodes at batch 1, which --kernel-layout auto decides on.)
  base = ["--checkpoint", dirs["ar"], "--prompt", "What is 2+2?", "--mode", "ar",
          "--max-new-tokens", "10"]
  want = decode.main(base)
  assert not traced
  got = decode.main(base + ["--matvec", "pallas"])
  assert traced  # two launches a layer in the traced step
  assert got["results"][0]["text"] == want["results"][0]["text"]
  assert set(traced) == {True}  # --kernel-layout auto: [*out, *in] where these kernels run
  # The kernels stored [*in, *out] after loading: the same text by both paths, the launches
  # reading them as such.
  traced.clear()
  for matvec_impl in ("xla", "pallas"):
    io = decode.main(base + ["--matvec", matvec_impl, "--kernel-layout", "in_out"])
    assert io["results"][0]["text"] == want["results"][0]["text"]
  assert set(traced) == {False}


def test_kernels_that_cannot_run_are_a_usage_error(dirs, monkeypatch):
  # --kernel-layout auto asks whether the one-row kernels run; where --matvec pallas cannot, the
  # answer is one named error line, not a traceback.
  def refuse(*a, **k):
    raise ValueError("model.matvec_impl='pallas' runs a Triton kernel, which has no 'tpu' "
                     "lowering")
  monkeypatch.setattr(model, "_row_kernels", refuse)
  with pytest.raises(SystemExit, match="--matvec pallas: model.matvec_impl='pallas' runs"):
    decode.main(["--checkpoint", dirs["ar"], "--prompt", "hi", "--mode", "ar", "--matvec",
                 "pallas"])


def test_diffusion_mode_refused_for_non_diffusion_checkpoint(dirs, monkeypatch):
  with pytest.raises(SystemExit, match="not a block-diffusion model.*objective=None.*--mode ar"):
    decode.main(["--checkpoint", dirs["ar"], "--prompt", "hi", *FAST])
  with pytest.warns(UserWarning, match="--force"):
    result = decode.main(["--checkpoint", dirs["ar"], "--prompt", "hi", "--force", *FAST])
  assert result["results"][0]["tokens"] >= 1
  # Without a mask token (an AR model from the hub) --force cannot help, and the error does not
  # offer it.
  from dllm_jax import checkpoint
  ar = convert.load_pretrained(dirs["ar"])
  no_mask = dataclasses.replace(ar, config=dataclasses.replace(ar.config, mask_token_id=None))
  monkeypatch.setattr(checkpoint, "load_model", lambda path, dtype="float32": no_mask)
  for force in ([], ["--force"]):
    with pytest.raises(SystemExit, match="no mask token.*--mode ar") as e:
      decode.main(["--checkpoint", dirs["ar"], "--prompt", "hi", *force, *FAST])
    assert "--force" not in str(e.value)


def test_bad_arguments_are_clear_errors(dirs, tmp_path):
  base = ["--checkpoint", dirs["diffusion"], "--prompt", "hi"]
  with pytest.raises(SystemExit, match=r"threshold=1.5: must be in \(0, 1\]"):
    decode.main(base + ["--threshold", "1.5"])
  with pytest.raises(SystemExit, match=r"--sub-block-size=5 does not divide --block-size=32; "
                                       r"pick a divisor of it: \[1, 2, 4, 8, 16, 32\] \(.* "
                                       r"records no block size: the default, 32\)"):
    decode.main(base + ["--sub-block-size", "5"])
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "ok"}\n{"text": 3}\n')
  with pytest.raises(SystemExit, match=f"{bad}:2: expected an object"):
    decode.main(["--checkpoint", dirs["diffusion"], "--prompts", str(bad)])
  for messages in ([], ["hi"], [{"role": "user"}]):
    bad.write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(SystemExit, match=f"{bad}:1: 'messages' must be a non-empty list"):
      decode.main(["--checkpoint", dirs["diffusion"], "--prompts", str(bad)])
  for line, message in (('{"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}',
                         "both 'prompt' and 'messages'; give one"),
                        ('{"messages": [{"role": "usr", "content": "x"}]}',
                         "role 'usr' is not one of")):
    bad.write_text(line + "\n")
    with pytest.raises(SystemExit, match=f"{bad}:1: {message}"):
      decode.main(["--checkpoint", dirs["diffusion"], "--prompts", str(bad)])
  bad.write_bytes(b'{"prompt": "ok"}\n\xff\n')
  with pytest.raises(SystemExit, match=f"{bad}:2: not UTF-8 text"):
    decode.main(["--checkpoint", dirs["diffusion"], "--prompts", str(bad)])
  with pytest.raises(SystemExit, match="--prompts .*missing.jsonl: No such file"):
    decode.main(["--checkpoint", dirs["diffusion"], "--prompts", str(tmp_path / "missing.jsonl")])
  with pytest.raises(SystemExit, match="longer than the model's context"):
    decode.main(base[:2] + ["--prompt", "x" * 300, *FAST])
  # A prompt that fits, but not with the tokens asked for after it (256 positions here).
  with pytest.raises(SystemExit, match=r"reach position \d+ \(whole blocks of --block-size=\d+\), "
                     r"past the model's context .*; lower --max-new-tokens to \d+ or less"):
    decode.main(base[:2] + ["--prompt", "x" * 150, *FAST[:-1], "120"])
  # The blocks, not the tokens asked for, reach past it: the flag to change is named.
  with pytest.raises(SystemExit, match=r"reach position 512 \(whole blocks of --block-size=512\)"
                     r".*; use a smaller --block-size or shorten the prompt"):
    decode.main(base[:2] + ["--prompt", "hi", "--block-size", "512", "--sub-block-size", "8",
                            "--max-new-tokens", "8"])
  with pytest.raises(SystemExit, match="--live needs a single --prompt"):
    decode.main(["--checkpoint", dirs["diffusion"], "--chat", "--live"])


def test_live_view_fills_masks_in(dirs, capsys):
  result = decode.main(["--checkpoint", dirs["diffusion"], "--prompt", "hello", "--live", *FAST])
  frames = result["frames"]
  glyphs = [f.count(decode.MASK_GLYPH) for f in frames]
  assert glyphs[0] > 0 and glyphs[-1] == 0  # starts masked, ends decoded
  assert len(frames) >= 3  # the prefill's state, then one frame per step or commit
  assert result["text"] in capsys.readouterr().out


def test_diffusion_flags_with_ar_mode_are_named_as_ignored(dirs):
  with pytest.warns(UserWarning, match=r"--threshold, --sub-block-size, --no-dual-cache set the "
                                       "diffusion decoder; --mode ar .* ignores them"):
    decode.main(["--checkpoint", dirs["ar"], "--prompt", "hi", "--mode", "ar",
                 "--max-new-tokens", "4", "--threshold", "0.3", "--sub-block-size", "2",
                 "--no-dual-cache"])
  # Ignored, so not refused: a block size the sub-block size does not divide, or one that only
  # diffusion's whole blocks would take past the context.
  for block in ("7", "512"):
    with pytest.warns(UserWarning, match=r"--block-size, --sub-block-size set the diffusion "
                                         "decoder; --mode ar"):
      result = decode.main(["--checkpoint", dirs["ar"], "--prompt", "hi", "--mode", "ar",
                            "--max-new-tokens", "4", "--block-size", block,
                            "--sub-block-size", "2"])
    assert 1 <= result["results"][0]["tokens"] <= 4


def test_top_p_without_sampling_is_named_as_ignored(dirs):
  with pytest.warns(UserWarning, match=r"--top-p 0.5 shapes sampling; --temperature 0 decodes "
                                       "greedily and ignores it"):
    decode.main(["--checkpoint", dirs["ar"], "--prompt", "hi", "--mode", "ar",
                 "--max-new-tokens", "2", "--top-p", "0.5"])


def test_text_the_tokenizer_cannot_encode_is_named_where_it_came_from(dirs, tmp_path,
                                                                      monkeypatch, capsys):
  # (these models' character tokenizer knows printable ASCII only)
  with pytest.raises(SystemExit, match=r"decode.py: error: --prompt: the character tokenizer "
                                       r"cannot encode \['\xe9'\].*remove them from the text"):
    decode.main(["--checkpoint", dirs["diffusion"], "--prompt", "h\xe9llo", *FAST])
  path = tmp_path / "p.jsonl"
  path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "caf\xe9"}) + "\n")
  with pytest.raises(SystemExit, match=rf"{path}:2: the character tokenizer cannot encode"):
    decode.main(["--checkpoint", dirs["diffusion"], "--prompts", str(path), *FAST])
  # In a chat the turn is refused by name and the chat goes on.
  monkeypatch.setattr(sys, "stdin", io.StringIO("caf\xe9\nhi\n\n"))
  result = decode.main(["--checkpoint", dirs["diffusion"], "--chat", "--mode", "ar",
                        "--max-new-tokens", "4"])
  assert [t["user"] for t in result["turns"]] == ["hi"]
  assert "this turn: the character tokenizer cannot encode" in capsys.readouterr().out


def test_live_view_with_json_prints_one_json_document(dirs, capsys):
  # The frames (and the text) go to stderr: stdout is what --json promises.
  decode.main(["--checkpoint", dirs["diffusion"], "--prompt", "hello", "--live", "--json", *FAST])
  captured = capsys.readouterr()
  result = json.loads(captured.out)
  assert result["text"] and decode.MASK_GLYPH in captured.err


def test_chat_keeps_the_conversation(dirs, monkeypatch, capsys):
  monkeypatch.setattr(sys, "stdin", io.StringIO("hi there\nand again\n\n"))
  result = decode.main(["--checkpoint", dirs["diffusion"], "--chat", "--mode", "ar",
                        "--max-new-tokens", "6"])
  turns = result["turns"]
  assert [t["user"] for t in turns] == ["hi there", "and again"]
  assert all(1 <= t["tokens"] <= 6 for t in turns)
  assert "tokens/s" in capsys.readouterr().out


def test_chat_refuses_a_turn_past_the_context_and_goes_on(dirs, monkeypatch, capsys):
  # A turn whose conversation and reply would reach past the model's context (256 here) is
  # refused by name and not taken; the chat, and the conversation before it, go on.
  monkeypatch.setattr(sys, "stdin", io.StringIO("x" * 250 + "\nhi\n" + "y" * 230 + "\n\n"))
  result = decode.main(["--checkpoint", dirs["diffusion"], "--chat", "--mode", "ar",
                        "--max-new-tokens", "6"])
  assert [t["user"] for t in result["turns"]] == ["hi"]
  out = capsys.readouterr().out
  first, later = out.split("this message is not taken: type a shorter one")
  assert "too long for another turn" not in first and "too long for another turn" in later


def test_chat_refuses_a_reply_length_no_message_leaves_room_for(dirs, monkeypatch, capsys):
  # --max-new-tokens 256 of the model's 256 positions: every turn was refused as "too long for
  # another turn", and the chat exited 0.
  monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\n"))
  with pytest.raises(SystemExit) as e:
    decode.main(["--checkpoint", dirs["diffusion"], "--chat", "--max-new-tokens", "256"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "a one-word message" in err and "--max-new-tokens" in err


def test_prompt_padding_never_costs_context():
  # Prompts are padded to whole blocks so programs are reused, but not where the padding would
  # push a request that fits (37 + 8155 = 8192) past the context.
  # (decode.py's and eval's)
  from dllm_jax import decoding
  from dllm_jax.decoding_cli import prompt_width
  model_cfg = ModelConfig(max_position_embeddings=256)
  cfg = decoding.DecodeConfig(mode="ar", block_size=32, max_new_tokens=200)
  assert prompt_width(10, cfg, model_cfg) == 32
  assert prompt_width(40, cfg, model_cfg) == prompt_width(40, cfg, model_cfg, steps=4) == 40
  cfg = decoding.DecodeConfig(mode="ar", block_size=32, max_new_tokens=100)
  assert prompt_width(40, cfg, model_cfg) == 64 and prompt_width(40, cfg, model_cfg, 4) == 128


def test_command_line_subprocess(dirs):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  proc = subprocess.run(
      [sys.executable, str(ROOT / "decode.py"), "--checkpoint", dirs["ar"], "--prompt", "hi",
       "--mode", "ar", "--max-new-tokens", "5", "--json", "--threshold", "0.5"],
      capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout)
  assert out["summary"]["mode"] == "ar" and 1 <= out["results"][0]["tokens"] <= 5
  assert out["summary"]["tokens_per_forward"] == pytest.approx(1.0)
  # A warning is one line in the errors' form, not Python's file, line and source.
  assert "decode.py: warning: --threshold set the diffusion decoder" in proc.stderr
  assert "UserWarning" not in proc.stderr


def test_the_parser_answers_without_importing_jax():
  # `decode.py --help` and a bad choice must not wait for jax (seconds on a cold start).
  code = ("import sys, decode; decode._parser().parse_args(['--checkpoint', 'x', '--prompt', 'y'])"
          "; assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)")
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_a_missing_checkpoint_is_one_error_line(tmp_path, capsys):
  message = r"decode.py: error: --checkpoint .*nothing: .*does not exist; give"
  with pytest.raises(SystemExit, match=message) as e:
    decode.main(["--checkpoint", str(tmp_path / "nothing"), "--prompt", "hi", *FAST])
  # Bad input exits 2, as argparse's usage errors and train.py's do; the line is on stderr.
  assert e.value.code == 2
  assert capsys.readouterr().err.strip() == str(e.value)


def _tiny_pretrained(metadata, **cfg_fields):
  tok = tk.simple_chars()
  cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64,
                    mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
  # (zeros of the right shapes: a random init takes seconds, and no forward runs here)
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                        jax.eval_shape(lambda k: model.init_params(cfg, k), jax.random.key(0)))
  return convert.Pretrained(params, dataclasses.replace(cfg, **cfg_fields), tok, metadata)


def _load_args(*extra):
  return decode._parser().parse_args(["--checkpoint", "ckpt", "--prompt", "hi",
                                      "--layout", "stacked", *extra])


def test_weights_of_another_model_are_one_error_line(monkeypatch):
  # A run directory whose model.json is another model's than its checkpoints': a named error,
  # not a traceback from a layout check deep in the load (the o kernel's shape) or from jit.
  from dllm_jax import checkpoint, decoding_cli
  for field, value in (("hidden_size", 64), ("num_layers", 2), ("vocab_size", 256)):
    wrong = _tiny_pretrained({"objective": "diffusion"}, **{field: value})
    monkeypatch.setattr(checkpoint, "load_model", lambda path, dtype="float32": wrong)
    with pytest.raises(decoding_cli.UsageError,
                       match=r"--checkpoint ckpt: its weights are not the model its config "
                             r"describes \(params\[.*different models"):
      decoding_cli.load(_load_args(), "decode.py")
  right = _tiny_pretrained({"objective": "diffusion"})
  assert model.params_mismatch(right.params, right.config) is None
  out_in, out_cfg = model.with_kernel_layout(right.params, right.config, "out_in")
  assert model.params_mismatch(out_in, out_cfg) is None


def test_the_trained_block_size_is_the_default_and_another_is_warned(monkeypatch, recwarn,
                                                                      tmp_path):
  from dllm_jax import checkpoint, decoding_cli
  trained = _tiny_pretrained({"objective": "diffusion", "block_size": 16})
  monkeypatch.setattr(checkpoint, "load_model", lambda path, dtype="float32": trained)
  with pytest.warns(UserWarning, match="trained with blocks of 16 tokens.*--block-size 32.*"
                                       "pass --block-size 16"):
    decoding_cli.load(_load_args("--block-size", "32"), "decode.py")
  recwarn.clear()
  decoding_cli.load(_load_args("--block-size", "16"), "decode.py")
  # Without --block-size the run's own is taken (the quick start's tiny run: 16), checked again
  args = _load_args()
  decoding_cli.load(args, "decode.py")
  assert args.block_size == 16
  assert not [w for w in recwarn if "trained with blocks" in str(w.message)]
  # A sub-block size is checked against the size the run was trained with, not the default:
  # before the load where the run's model.json says it, and again with what was loaded.
  run = tmp_path / "run"
  run.mkdir()
  (run / "model.json").write_text(json.dumps({"model": {}, "metadata": {"block_size": 16}}))
  assert decoding_cli.recorded_block_size(str(run)) == 16
  assert decoding_cli.recorded_block_size(str(tmp_path / "nothing")) is None
  for sub in ("32", "5"):
    message = (rf"--sub-block-size={sub} does not divide --block-size=16; pick a divisor of it: "
               r"\[1, 2, 4, 8, 16\] \(.* was trained with blocks of 16 tokens\)")
    args = _load_args("--sub-block-size", sub)
    args.checkpoint = str(run)
    with pytest.raises(decoding_cli.UsageError, match=message):
      decoding_cli.check(args)
    with pytest.raises(decoding_cli.UsageError, match=message):  # (the model.json unread)
      decoding_cli.load(_load_args("--sub-block-size", sub), "decode.py")
  # A model that does not say (a HF directory): the authors' 32
  untold = _tiny_pretrained({"objective": "diffusion"})
  monkeypatch.setattr(checkpoint, "load_model", lambda path, dtype="float32": untold)
  args = _load_args()
  decoding_cli.load(args, "decode.py")
  assert decoding_cli.decode_config(args, untold).block_size == 32


def test_every_decoding_flag_reaches_the_decoder_config():
  # The CLI's tiny model decodes one token a forward at any threshold, so no decode test can
  # tell a --threshold that never reached the decoder (a mutation review found it unguarded).
  from dllm_jax import decoding_cli
  pre = _tiny_pretrained({"objective": "diffusion", "block_size": 16})
  cfg = decoding_cli.decode_config(
      _load_args("--threshold", "0.7", "--sub-block-size", "4", "--block-size", "16",
                 "--no-dual-cache", "--max-new-tokens", "24"), pre)
  assert (cfg.mode, cfg.threshold, cfg.sub_block_size, cfg.block_size, cfg.use_dual_cache,
          cfg.max_new_tokens) == ("diffusion", 0.7, 4, 16, False, 24)
  default = decoding_cli.decode_config(_load_args(), pre)
  assert (default.threshold, default.sub_block_size, default.use_dual_cache) == (
      decoding_cli.DEFAULT_THRESHOLD, decoding_cli.DEFAULT_SUB_BLOCK, True)
  assert default.threshold != 0.7 and default.sub_block_size != 4


def test_a_step_directory_of_a_run_names_the_run_to_pass(tmp_path):
  # MaxText habit: pointing at RUN/checkpoints/STEP. The error says which directory to pass.
  from dllm_jax import decoding_cli
  run = tmp_path / "run"
  (run / "checkpoints" / "400" / "state").mkdir(parents=True)
  (run / "model.json").write_text("{}")
  for inside in ("checkpoints", "checkpoints/400", "checkpoints/400/state"):
    args = _load_args()
    args.checkpoint = str(run / inside)
    with pytest.raises(decoding_cli.UsageError,
                       match=f"is inside the training run {run}: pass --checkpoint {run} "):
      decoding_cli.load(args, "decode.py")


def _five_prompts_run_whole(dirs, tmp_path, capsys, *extra):
  """(flags decoding five prompts in batches of 2, that run's result), its output discarded."""
  path = tmp_path / "p.jsonl"
  path.write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(5)))
  flags = ["--checkpoint", dirs["diffusion"], "--prompts", str(path), "--batch-size", "2",
           *extra, *FAST]
  whole = decode.main(flags)
  capsys.readouterr()
  return flags, whole


def _ctrl_c_in_batch(monkeypatch, call):
  """Ctrl-C (KeyboardInterrupt) while the decoder runs its `call`-th batch."""
  calls, plain = [0], decode.Decoder.__call__

  def interrupted(self, *a, **k):
    calls[0] += 1
    if calls[0] == call:
      raise KeyboardInterrupt
    return plain(self, *a, **k)

  monkeypatch.setattr(decode.Decoder, "__call__", interrupted)


def test_text_output_streams_and_an_interrupt_keeps_the_batches_printed(dirs, tmp_path,
                                                                         monkeypatch, capsys):
  flags, whole = _five_prompts_run_whole(dirs, tmp_path, capsys)
  # Ctrl-C while the second batch decodes: the first batch's answers were printed already.
  _ctrl_c_in_batch(monkeypatch, 2)
  with pytest.raises(SystemExit) as e:
    decode.main(flags)
  assert e.value.code == 130
  captured = capsys.readouterr()
  first = "".join(f"--- [{r['index']}] {r['prompt']}\n{r['text']}\n"
                  for r in whole["results"][:2])
  assert captured.out == first
  assert "decode.py: interrupted after 2 of 5 prompts (printed above)" in captured.err


def test_an_interrupt_keeps_the_json_answers_and_ends_a_chat_like_an_empty_line(
    dirs, tmp_path, monkeypatch, capsys):
  flags, whole = _five_prompts_run_whole(dirs, tmp_path, capsys, "--json")
  _ctrl_c_in_batch(monkeypatch, 3)
  with pytest.raises(SystemExit) as e:
    decode.main(flags)
  assert e.value.code == 130
  captured = capsys.readouterr()
  printed = json.loads(captured.out)
  assert printed["interrupted"] and printed["prompts"] == 5
  assert printed["results"] == whole["results"][:4]
  assert "interrupted after 4 of 5 prompts (in the JSON document)" in captured.err
  monkeypatch.undo()

  # Ctrl-C at the chat's second prompt: the first turn is kept, the chat's summary printed.
  lines = iter(["hello\n"])

  class Keys:
    def readline(self):
      line = next(lines, None)
      if line is None:
        raise KeyboardInterrupt
      return line

  monkeypatch.setattr(sys, "stdin", Keys())
  result = decode.main(["--checkpoint", dirs["diffusion"], "--chat", "--json", *FAST])
  assert [t["user"] for t in result["turns"]] == ["hello"]
  assert json.loads(capsys.readouterr().out)["turns"][0]["user"] == "hello"


def test_a_closed_pipe_ends_quietly_and_a_too_long_prompts_file_names_the_widest(dirs, tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "x" * 60}) + "\n")
  with pytest.raises(SystemExit, match=r"lower --max-new-tokens to \d+ or less or shorten the "
                                       rf"prompt \(the widest prompt: .*p.jsonl:2, \d+ tokens\)"):
    decode.main(["--checkpoint", dirs["diffusion"], "--prompts", str(path), *FAST[:4],
                 "--max-new-tokens", "240"])
  # `decode.py ... | head -1`: the reader is gone before the first answer is printed.
  proc = subprocess.Popen([sys.executable, str(ROOT / "decode.py"), "--checkpoint",
                           dirs["diffusion"], "--prompts", str(path), "--batch-size", "1", *FAST],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
  proc.stdout.close()
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 141, err.decode()[-2000:]
  assert b"Traceback" not in err
