"""GSM8K evaluation: answer extraction, accuracy statistics, and an end-to-end run on a tiny model."""

import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax import convert, decoding, eval as eval_lib, model
from dllm_jax import tokenizer as tokenizer_lib
from dllm_jax.config import ModelConfig


@pytest.mark.parametrize("text,expected", [
    ("so she has 5 + 3 = 8 apples.\n#### 8", "8"),
    ("#### 1,234", "1234"),
    ("The answer is 72.", "72"),
    ("costs $18.50 in total", "18.5"),
    ("went from -3 to 4 degrees then #### -7", "-7"),
    ("12.0 dollars", "12"),
    ("no digits here", None),
    ("earlier 41 and 42, then #### none", "42"),
    # A model that runs on past its answer invents the next problem: the first #### counts.
    ("= 18.\n#### 18\n\nQuestion: Tom has 3 apples = 2\n#### 2", "18"),
    # A minus sign starts a number only where one starts.
    ("The trip took 3-4 hours", "4"),
    ("#### 12.", "12"),
    ("#### $1,234.50", "1234.5"),
    ("Q2 is 7", "7"),
    ("so the answer is...18", "18"),  # (an ellipsis, no decimal point: was 0.18)
    ("答案是18", "18"),  # (words are ASCII: was None)
    # A word's tail is no number ("m2"), nor are the digits after a decimal point ("B2.5" is a
    # word's tail, and its "5" the tail of a decimal): the last number here is 18, then 12.
    ("The area is 18 m2", "18"),
    ("12 eggs go in box B2.5", "12"),
])
def test_extract_answer(text, expected):
  assert eval_lib.extract_answer(text) == expected


def test_accuracy_with_standard_error():
  acc, se = eval_lib.accuracy_with_se([True, False, True, True])
  assert acc == 0.75
  np.testing.assert_allclose(se, np.sqrt(0.75 * 0.25 / 4))
  assert eval_lib.accuracy_with_se([]) == (0.0, 0.0)


def test_agreement_matches_problems_by_index_not_by_position():
  # A reference run written in another order and without problem 0: answers are compared per
  # problem index, over the problems both runs hold (1 and 3 agree, 2 does not; 0 is not shared).
  records = [{"index": i, "prediction": p} for i, p in enumerate(["1", "2", None, "4"])]
  reference = [{"index": 3, "prediction": "4"}, {"index": 2, "prediction": "3"},
               {"index": 1, "prediction": "2"}]
  assert eval_lib.agreement(records, reference) == 2 / 3
  # Both without a number is agreement.
  assert eval_lib.agreement(records, [{"index": 2, "prediction": None}]) == 1.0


def test_load_gsm8k_reports_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"question": "q", "answer": "a #### 3"}) + "\n{not json\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:2"):
    eval_lib.load_gsm8k(path)
  assert len(eval_lib.load_gsm8k(path, limit=1)) == 1
  # The gold answer is the number after '####' only: a reference answer without one is refused,
  # not read for the last number of its working ("48/2 = 24").
  for answer in ("She sold 48/2 = 24 clips in May.", "3 apples\n#### n/a"):
    path.write_text(json.dumps({"question": "q", "answer": answer}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: the answer has no final number after"):
      eval_lib.load_gsm8k(path)
  path.write_bytes(json.dumps({"question": "q", "answer": "#### 3"}).encode() + b"\n\xff\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not UTF-8 text"):
    eval_lib.load_gsm8k(path)
  # A UTF-8 BOM, as some editors save one, is no part of the first record (it was refused as
  # invalid JSON with a hint the user could not act on).
  path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"question": "q", "answer": "#### 3"}).encode())
  assert [p.gold for p in eval_lib.load_gsm8k(path)] == ["3"]


def _tiny_pretrained():
  tok = tokenizer_lib.simple_chars()
  cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, mask_token_id=tok.mask_token_id,
                    max_position_embeddings=512)
  params = model.init_params(cfg, jax.random.key(0))
  return convert.Pretrained(params=params, config=cfg, tokenizer=tok,
                            metadata={"objective": "diffusion", "block_size": 8})


def test_evaluate_end_to_end_counts_every_problem_once(tmp_path):
  data = tmp_path / "test.jsonl"
  rows = [{"question": f"What is {i} + {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"}
          for i in range(5)]
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  problems = eval_lib.load_gsm8k(data)
  pre = _tiny_pretrained()
  common = dict(max_new_tokens=16, block_size=8, sub_block_size=4)
  ar_records, ar_summary = eval_lib.evaluate(
      pre, problems, decoding.DecodeConfig(mode="ar", **common), batch_size=2,
      log=lambda *a: None, stop_token_ids=())
  assert [r["index"] for r in ar_records] == list(range(5))
  assert ar_summary["n"] == 5 and 0.0 <= ar_summary["accuracy"] <= 1.0
  # AR decoding takes one forward per token (plus the prefill).
  assert ar_summary["forwards_per_token"] >= 1.0
  one, one_summary = eval_lib.evaluate(
      pre, problems, decoding.DecodeConfig(threshold=1.0, **common), batch_size=2,
      log=lambda *a: None, stop_token_ids=())
  # A random tiny model is nearly uniform over ~100 ids: this threshold unmasks whole sub-blocks.
  fast, fast_summary = eval_lib.evaluate(
      pre, problems, decoding.DecodeConfig(threshold=0.001, **common), batch_size=2,
      log=lambda *a: None, stop_token_ids=())
  assert eval_lib.agreement(one, one) == 1.0
  assert 0.0 <= eval_lib.agreement(fast, one) <= 1.0
  assert one_summary["generated_tokens"] == fast_summary["generated_tokens"] == 5 * 16
  # No stop tokens: every answer runs to the limit.
  assert one_summary["at_token_limit"] == 1.0
  assert 0.0 <= one_summary["with_answer_marker"] <= 1.0
  assert fast_summary["tokens_per_forward"] > 2 * one_summary["tokens_per_forward"]


def test_evaluate_per_layer_layout_gives_the_same_generations(tmp_path):
  data = tmp_path / "test.jsonl"
  data.write_text("".join(json.dumps({"question": f"What is {i} + 1?",
                                      "answer": f"#### {i + 1}"}) + "\n" for i in range(3)))
  problems = eval_lib.load_gsm8k(data)
  pre = _tiny_pretrained()
  cfg = decoding.DecodeConfig(threshold=0.5, max_new_tokens=16, block_size=8, sub_block_size=4)
  runs = {layout: eval_lib.evaluate(pre, problems, cfg, batch_size=2, log=lambda *a: None,
                                    stop_token_ids=(), layout=layout)
          for layout in model.LAYOUTS}
  (stacked, s_sum), (per_layer, p_sum) = runs["stacked"], runs["per_layer"]
  assert [r["generation"] for r in per_layer] == [r["generation"] for r in stacked]
  assert (p_sum["layout"], s_sum["layout"]) == ("per_layer", "stacked")
  assert p_sum["kernel_layout"] == pre.config.kernel_layout  # (what the decoder ran in)
  with pytest.raises(ValueError, match="layout='scan'"):
    eval_lib.evaluate(pre, problems, cfg, batch_size=2, log=lambda *a: None, layout="scan")


def test_evaluate_records_and_summary_follow_each_rows_generation(tmp_path, monkeypatch):
  # A stand-in decoder whose every row "answers" with its own prompt (the question, as there is
  # no chat template), cut at max_new_tokens and padded past its length as decoding.generate
  # pads, at one forward per token plus the prefill. Every record and summary number then
  # follows from the questions alone. The pad is the digit 9, so a generation read past its
  # length changes the answer; the 5 problems in batches of 2 leave a padded last batch.
  qa = [("#### 7", "7"),  # right
        ("I think 41", "41"),  # right (the last number); problem 0's gold would be wrong
        ("3 + 4 = #### 7 really it is", "8"),  # wrong; cut at the token limit after "r"
        ("no idea", "5"),  # no number
        ("#### 5", "5")]  # right
  data = tmp_path / "test.jsonl"
  data.write_text("".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n"
                          for q, a in qa))
  problems = eval_lib.load_gsm8k(data)
  pre = _tiny_pretrained()
  pre.tokenizer.chat_template = None
  limit = 16

  def echo(params, model_cfg, toks, lens, rng, cfg, threshold=None):
    lengths = jnp.minimum(lens, cfg.max_new_tokens)
    first = jnp.pad(toks, ((0, 0), (0, cfg.max_new_tokens)))[:, :cfg.max_new_tokens]
    out = jnp.where(jnp.arange(cfg.max_new_tokens)[None] < lengths[:, None], first,
                    cfg.pad_token_id)
    nfe = lengths + 1
    return out, lengths, {"nfe": nfe, "iterations": jnp.max(nfe)}

  monkeypatch.setattr(decoding, "generate", echo)
  # A fake clock: each reading one second on, compiling 1000 s. Generation is timed apart from
  # the compile, so tokens/s is the generated tokens over a few seconds, not over 1000.
  now = [0.0]

  def perf_counter():
    now[0] += 1.0
    return now[0]

  compile_ = jax.stages.Lowered.compile

  def slow_compile(self, *args, **kwargs):
    now[0] += 1000.0
    return compile_(self, *args, **kwargs)

  monkeypatch.setattr(eval_lib, "time", types.SimpleNamespace(perf_counter=perf_counter))
  monkeypatch.setattr(jax.stages.Lowered, "compile", slow_compile)
  pad = pre.tokenizer.token_to_id("9")
  cfg = decoding.DecodeConfig(max_new_tokens=limit, block_size=8, sub_block_size=4,
                              pad_token_id=pad)
  records, summary = eval_lib.evaluate(pre, problems, cfg, batch_size=2, log=lambda *a: None,
                                       stop_token_ids=())
  tokens = [min(len(q), limit) for q, _ in qa]
  assert [r["index"] for r in records] == list(range(5))
  assert [r["question"] for r in records] == [q for q, _ in qa]
  assert [r["generation"] for r in records] == [q[:limit] for q, _ in qa]
  assert [r["prediction"] for r in records] == ["7", "41", "7", None, "5"]
  assert [r["gold"] for r in records] == [a for _, a in qa]
  assert [r["correct"] for r in records] == [True, True, False, False, True]
  assert [r["tokens"] for r in records] == tokens
  assert [r["nfe"] for r in records] == [t + 1 for t in tokens]
  assert summary["n"] == 5 and summary["accuracy"] == pytest.approx(3 / 5)
  assert summary["stderr"] == pytest.approx(np.sqrt(0.6 * 0.4 / 5))
  assert summary["generated_tokens"] == sum(tokens) == 45
  # Tokens per forward: every row's tokens over every row's forwards (not the batched rounds).
  assert summary["tokens_per_forward"] == pytest.approx(45 / 50)
  assert summary["forwards_per_token"] == pytest.approx(50 / 45)
  assert summary["batched_forward_rounds"] == 11 + 17 + 7
  assert summary["at_token_limit"] == pytest.approx(1 / 5)
  assert summary["with_answer_marker"] == pytest.approx(3 / 5)
  assert summary["compile_s"] >= 1000 > summary["run_s"] > 0
  assert summary["tokens_per_s"] == pytest.approx(45 / summary["run_s"])


_SWEEP = """
import json, pathlib, sys
from dllm_jax import decoding, eval as eval_lib
sys.path.insert(0, {tests!r})
from test_eval import _tiny_pretrained
problems = eval_lib.load_gsm8k({data!r})
pre, cache, counts = _tiny_pretrained(), pathlib.Path({cache!r}), []
for th in (0.9, 0.5):
  cfg = decoding.DecodeConfig(threshold=th, max_new_tokens=16, block_size=8, sub_block_size=4)
  eval_lib.evaluate(pre, problems, cfg, batch_size=2, log=lambda *a: None, stop_token_ids=())
  counts.append(len(list(cache.iterdir())))
print(json.dumps(counts))
"""


def test_problems_the_model_cannot_take_are_named_by_file_and_line(tmp_path):
  # A problem whose text the tokenizer cannot encode, or whose prompt reaches past the context:
  # an error naming it (a data set's prompt cannot be shortened from the command line), before
  # anything compiles; the library raises, main turns it into one line.
  data = tmp_path / "test.jsonl"
  rows = [{"question": "What is 1 + 1?", "answer": "#### 2"},
          {"question": "Tom\u2019s 3 apples?", "answer": "#### 3"}]
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  pre = _tiny_pretrained()
  cfg = decoding.DecodeConfig(max_new_tokens=16, block_size=8, sub_block_size=4)
  with pytest.raises(ValueError, match=rf"problem 1 \({data}:2\): the character tokenizer "
                                       r"cannot encode \['\u2019'\]"):
    eval_lib.evaluate(pre, eval_lib.load_gsm8k(data), cfg, batch_size=2, log=lambda *a: None)
  rows[1]["question"] = "x" * 600  # (512 positions)
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(decoding.DecodeError, match=rf"past the model's context .* \(the widest "
                     rf"prompt: problem 1 \({data}:2\), \d+ tokens\)"):
    eval_lib.evaluate(pre, eval_lib.load_gsm8k(data), cfg, batch_size=2, log=lambda *a: None)


def test_a_threshold_sweep_compiles_once_with_a_persistent_cache(tmp_path):
  # The threshold is an argument of the compiled decoder, so the second threshold finds every
  # program in JAX's persistent cache (what the GSM8K study relies on to save device time). A
  # subprocess: the cache directory is process-wide state.
  data = tmp_path / "test.jsonl"
  data.write_text("".join(json.dumps({"question": f"What is {i}?", "answer": f"#### {i}"}) + "\n"
                          for i in range(3)))
  cache = tmp_path / "cache"
  cache.mkdir()
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, PYTHONPATH=str(root), JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", JAX_PLATFORMS="cpu")
  script = _SWEEP.format(tests=str(root / "tests"), data=str(data), cache=str(cache))
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  first, second = json.loads(out.stdout.strip().splitlines()[-1])
  assert first > 0 and second == first


def test_cast_changes_dtype_and_optionally_layout():
  pre = _tiny_pretrained()
  kept = convert.cast(pre, "bfloat16")
  assert model.is_stacked(kept.params)
  assert kept.config.dtype == kept.config.param_dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(kept.params))
  per_layer = convert.cast(pre, "bfloat16", "per_layer")
  jax.tree_util.tree_map(np.testing.assert_array_equal, per_layer.params,
                         model.unstack_layers(kept.params))
  assert per_layer.config == kept.config


def test_main_with_fused_projections_gives_the_same_generations(tmp_path, monkeypatch):
  # `--matvec pallas`: AR decoding at batch 1 runs kernels.matvec (interpreted here).
  from dllm_jax.kernels import matvec

  data = tmp_path / "test.jsonl"
  data.write_text("".join(json.dumps({"question": f"What is {i} + 2?", "answer": f"#### {i + 2}"})
                          + "\n" for i in range(2)))
  ckpt = tmp_path / "ckpt"
  convert.export_hf_dir(_tiny_pretrained(), ckpt)
  traced = []
  plain = matvec.norm_matvec
  monkeypatch.setattr(matvec, "norm_matvec", lambda *a, **k: traced.append(1) or plain(*a, **k))
  base = ["gsm8k", "--checkpoint", str(ckpt), "--data", str(data), "--mode", "ar",
          "--batch-size", "1", "--max-new-tokens", "8", "--dtype", "float32", "--json"]
  eval_lib.main(base + ["--out", str(tmp_path / "xla.jsonl")])
  assert not traced
  # (--out through a link: written through it, the link kept.)
  (tmp_path / "link.jsonl").symlink_to(tmp_path / "pallas.jsonl")
  summary = eval_lib.main(base + ["--matvec", "pallas", "--out", str(tmp_path / "link.jsonl"),
                                   "--compare-to", str(tmp_path / "xla.jsonl")])
  assert (tmp_path / "link.jsonl").is_symlink()
  assert traced
  assert summary["agreement"] == 1.0 and summary["agreement_with"].endswith("xla.jsonl")
  gens = [[json.loads(line)["generation"] for line in open(tmp_path / f"{name}.jsonl")]
          for name in ("xla", "pallas")]
  assert gens[0] == gens[1] and len(gens[0]) == 2


def test_main_refuses_bad_flags_and_data_before_loading_the_checkpoint(tmp_path):
  # The checkpoint does not exist: each error must come from the flags or the data first.
  data = tmp_path / "test.jsonl"
  data.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
  base = ["gsm8k", "--checkpoint", str(tmp_path / "missing"), "--data", str(data)]
  for extra, message in ((["--threshold", "1.5"], r"threshold=1.5: must be in \(0, 1\]"),
                         (["--sub-block-size", "5"], "--sub-block-size=5 does not divide"),
                         (["--batch-size", "0"], "--batch-size=0: must be >= 1"),
                         (["--limit", "0"], "--limit=0: must be >= 1"),
                         (["--seed", str(10**23)], r"--seed=\d+: must fit in 64 bits")):
    with pytest.raises(SystemExit, match=r"python -m dllm_jax.eval: error: .*" + message) as e:
      eval_lib.main(base + extra)
    assert e.value.code == 2  # bad input, as argparse's usage errors
  with pytest.raises(SystemExit, match="nope.jsonl does not exist"):
    eval_lib.main(["gsm8k", "--checkpoint", "x", "--data", str(tmp_path / "nope.jsonl")])
  with pytest.raises(SystemExit, match="is a directory; pass --data"):
    eval_lib.main(["gsm8k", "--checkpoint", "x", "--data", str(tmp_path)])
  other = tmp_path / "other.jsonl"
  with pytest.raises(SystemExit, match="--compare-to .*other.jsonl: .*No such file"):
    eval_lib.main(base + ["--compare-to", str(other)])
  other.write_text('{"index": 0, "prediction": "1"}\n[1]\n')
  with pytest.raises(SystemExit, match=r"other.jsonl:2: expected an object with 'index'"):
    eval_lib.main(base + ["--compare-to", str(other)])
  other.write_text('{"index": 5, "prediction": "1"}\n')
  with pytest.raises(SystemExit, match="shares no problem index with this run's 1 problems"):
    eval_lib.main(base + ["--compare-to", str(other)])
  for line, message in (('{"index": [0], "prediction": "1"}', "'index' must be an integer"),
                        ('{"index": 0, "prediction": 1}', "'prediction' must be a string or null"),
                        ('{"index": 0, "prediction": "1", "question": "other q"}',
                         "problem 0 there is another question than this run's")):
    other.write_text(line + "\n")
    with pytest.raises(SystemExit, match=r"other.jsonl:1: " + message):
      eval_lib.main(base + ["--compare-to", str(other)])
  other.write_bytes(b"\xff\xfe\n")
  with pytest.raises(SystemExit, match="other.jsonl:1: not UTF-8 text"):
    eval_lib.main(base + ["--compare-to", str(other)])
  # An --out the generations could not be written to at the end, or an input of the command.
  for out, message in ((tmp_path / "nodir" / "g.jsonl", "nodir does not exist"),
                       (data, "is one of this command's inputs"),
                       (tmp_path, "is a directory")):
    with pytest.raises(SystemExit, match=f"error: --out .*{message}"):
      eval_lib.main(base + ["--out", str(out)])
  assert data.read_text() == json.dumps({"question": "q", "answer": "#### 1"}) + "\n"
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(SystemExit, match=r"empty.jsonl holds no GSM8K records"):
    eval_lib.main(["gsm8k", "--checkpoint", "x", "--data", str(empty)])
  numeric = tmp_path / "numeric.jsonl"
  numeric.write_text(json.dumps({"question": "q", "answer": 5}) + "\n")
  with pytest.raises(SystemExit, match=r"numeric.jsonl:1: question and answer must be strings"):
    eval_lib.main(["gsm8k", "--checkpoint", "x", "--data", str(numeric)])
  # A run directory whose model.json is not JSON: one error line, not a traceback.
  (tmp_path / "bad_run" / "checkpoints").mkdir(parents=True)
  (tmp_path / "bad_run" / "model.json").write_text("{not json")
  with pytest.raises(SystemExit, match=r"error: --checkpoint .*bad_run: "):
    eval_lib.main(["gsm8k", "--checkpoint", str(tmp_path / "bad_run"), "--data", str(data)])
  with pytest.raises(SystemExit,
                     match=r"error: --checkpoint .*missing: .*does not exist; give a "
                           r"training run's directory, a HF model directory"):
    eval_lib.main(base)


def test_the_shared_decoding_flags_name_the_library_choices():
  from dllm_jax import decoding_cli
  assert decoding_cli.MODES == decoding.MODES and decoding_cli.LAYOUTS == model.LAYOUTS


def _signal_at(monkeypatch, call, *signums):
  """Sends each of `signums` to this process when the eval's answer extraction runs for the
  `call`-th time (inside a batch: its records are not yet kept)."""
  calls, plain = [0], eval_lib.extract_answer

  def extract(text):
    calls[0] += 1
    if calls[0] == call:
      for s in signums:
        os.kill(os.getpid(), s)
    return plain(text)

  monkeypatch.setattr(eval_lib, "extract_answer", extract)


def _eval_flags_with_a_full_run(tmp_path, problems):
  """The eval's flags over `problems` problems in batches of 2 on a tiny exported model, after
  one uninterrupted run of them wrote TMP/full.jsonl (what a resumed run must write)."""
  data = tmp_path / "test.jsonl"
  data.write_text("".join(json.dumps({"question": f"What is {i} + 3?", "answer": f"#### {i + 3}"})
                          + "\n" for i in range(problems)))
  ckpt = tmp_path / "ckpt"
  convert.export_hf_dir(_tiny_pretrained(), ckpt)
  base = ["gsm8k", "--checkpoint", str(ckpt), "--data", str(data), "--batch-size", "2",
          "--max-new-tokens", "8", "--block-size", "8", "--sub-block-size", "4",
          "--dtype", "float32", "--json", "--force"]
  eval_lib.main(base + ["--out", str(tmp_path / "full.jsonl")])
  return base


def test_an_interrupted_eval_keeps_its_generations_and_resume_finishes_the_same_file(
    tmp_path, monkeypatch):
  base = _eval_flags_with_a_full_run(tmp_path, 7)
  out = tmp_path / "gen.jsonl"
  partial = tmp_path / "gen.jsonl.partial"
  settings = tmp_path / "gen.jsonl.partial.json"

  # SIGINT in the second batch: that batch finishes and is kept, the run stops there (130).
  import signal

  handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  _signal_at(monkeypatch, 3, signal.SIGINT)
  with pytest.raises(SystemExit) as e:
    eval_lib.main(base + ["--out", str(out)])
  assert e.value.code == 128 + signal.SIGINT
  assert not out.exists() and settings.exists()
  assert [json.loads(line)["index"] for line in partial.read_text().splitlines()] == [0, 1, 2, 3]
  monkeypatch.undo()

  # The kept file is not overwritten by a run without --resume, nor continued with other flags.
  with pytest.raises(SystemExit, match="gen.jsonl.partial holds the generations of an "
                                       "interrupted run; continue it with --resume"):
    eval_lib.main(base + ["--out", str(out)])
  with pytest.raises(SystemExit, match=r"decoded with other flags \(--max-new-tokens 8 there, "
                                       r"16 here\)"):
    eval_lib.main(base + ["--out", str(out), "--resume", "--max-new-tokens", "16"])
  with pytest.raises(SystemExit, match="--resume continues .*; give --out"):
    eval_lib.main(base + ["--resume"])

  # A kill while a batch was being written leaves a cut line: --resume decodes that batch again.
  with open(partial, "a") as f:
    f.write('{"index": 4, "question": "What is 4')
  summary = eval_lib.main(base + ["--out", str(out), "--resume"])
  assert summary["resumed_after"] == 4 and summary["n"] == 7
  assert out.read_bytes() == (tmp_path / "full.jsonl").read_bytes()
  assert not partial.exists() and not settings.exists()

  # A second signal stops at once: only the batches finished before it are kept (143: SIGTERM).
  _signal_at(monkeypatch, 3, signal.SIGTERM, signal.SIGTERM)
  with pytest.raises(SystemExit) as e:
    eval_lib.main(base + ["--out", str(out)])
  assert e.value.code == 128 + signal.SIGTERM
  assert [json.loads(line)["index"] for line in partial.read_text().splitlines()] == [0, 1]
  assert {s: signal.getsignal(s) for s in handlers} == handlers  # (put back)
  monkeypatch.undo()
  lines = partial.read_text().splitlines()
  partial.write_text("\n".join(["not json"] + lines[1:]) + "\n")
  with pytest.raises(SystemExit, match=r"gen.jsonl.partial:1: not a JSON line"):
    eval_lib.main(base + ["--out", str(out), "--resume"])
  partial.write_text("\n".join(lines) + "\n")
  eval_lib.main(base + ["--out", str(out), "--resume"])
  assert out.read_bytes() == (tmp_path / "full.jsonl").read_bytes()


def test_a_run_stopped_before_its_first_batch_scores_nothing_not_zero(tmp_path):
  data = tmp_path / "test.jsonl"
  data.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "#### 2"}) + "\n")
  records, summary = eval_lib.evaluate(
      _tiny_pretrained(), eval_lib.load_gsm8k(data),
      decoding.DecodeConfig(max_new_tokens=8, block_size=8, sub_block_size=4), batch_size=1,
      log=lambda *a: None, stop_token_ids=(), stop=lambda: True)
  assert records == [] and summary["interrupted"] and summary["n"] == 0
  assert summary["accuracy"] is None and summary["stderr"] is None
  assert summary["tokens_per_s"] is None


def test_a_full_disk_keeps_what_was_written_and_resume_finishes(tmp_path, monkeypatch, capsys):
  from dllm_jax import checkpoint

  base = _eval_flags_with_a_full_run(tmp_path, 5)
  out, partial = tmp_path / "gen.jsonl", tmp_path / "gen.jsonl.partial"
  calls, fsync = [0], os.fsync

  def full_disk(fd):
    calls[0] += 1
    if calls[0] == 2:
      raise OSError(28, "No space left on device")
    return fsync(fd)

  monkeypatch.setattr(eval_lib.os, "fsync", full_disk)
  with pytest.raises(SystemExit) as e:
    eval_lib.main(base + ["--out", str(out)])
  monkeypatch.undo()
  assert e.value.code == 1
  assert (f"error: writing {partial} failed ([Errno 28] No space left on device); it keeps the "
          "generations of the batches before (2 problems)") in capsys.readouterr().err
  # The final write fails: the partial holds every record, and --resume only writes --out.
  real = checkpoint.write_text_whole
  monkeypatch.setattr(checkpoint, "write_text_whole", lambda path, text: (
      (_ for _ in ()).throw(OSError(28, "No space left on device")) if path == out
      else real(path, text)))
  with pytest.raises(SystemExit) as e:
    eval_lib.main(base + ["--out", str(out), "--resume"])
  monkeypatch.undo()
  assert e.value.code == 1 and "every generation is kept in" in capsys.readouterr().err
  assert len(partial.read_text().splitlines()) == 5
  summary = eval_lib.main(base + ["--out", str(out), "--resume"])
  assert summary["resumed_after"] == 5 and summary["tokens_per_s"] is None
  assert out.read_bytes() == (tmp_path / "full.jsonl").read_bytes()
