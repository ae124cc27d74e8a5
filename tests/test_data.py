"""The data pipeline: rendering, block-aligned packing, determinism, sharding, state, bad records."""

import dataclasses
import json
import logging

import numpy as np
import pytest

from dllm_jax import data
from dllm_jax import tokenizer as tok_lib
from dllm_jax.config import ConfigError
from dllm_jax.data import DataConfig

TOK = tok_lib.simple_chars()
END = "<|im_end|>"


def write_jsonl(path, records):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return str(path)


def qa_records(n):
  return [{"question": f"q{i}?", "answer": f"a{i} #### {i}"} for i in range(n)]


def samples_of(batch):
  """[(tokens, loss_mask)] of every packed sample of a batch, block padding included."""
  out = []
  for toks, mask, seg in zip(batch["tokens"], batch["loss_mask"], batch["segments"]):
    for s in range(1, seg.max() + 1):
      out.append((toks[seg == s], mask[seg == s]))
  return out


def test_each_record_shape_renders_with_loss_on_assistant_tokens_only(tmp_path):
  recs = [
      {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"}, {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y!"}]},
      {"prompt": "2+2", "response": "4"},
      {"question": "How many?", "answer": "3 + 4 = 7\n#### 7"},
  ]
  cfg = DataConfig(source=write_jsonl(tmp_path / "a.jsonl", recs), seq_len=128, block_size=16,
                   batch_size=3, shuffle=False, num_epochs=1)
  got = samples_of(next(data.make_dataset(cfg, TOK)))
  want_text = [
      "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
      "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nx<|im_end|>\n"
      "<|im_start|>assistant\ny!<|im_end|>\n",
      "<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
      "<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\n3 + 4 = 7\n#### 7<|im_end|>\n",
  ]
  want_loss = [["hello" + END + "\n", "y!" + END + "\n"], ["4" + END + "\n"],
               ["3 + 4 = 7\n#### 7" + END + "\n"]]
  assert len(got) == 3
  for (ids, mask), text, loss_spans in zip(got, want_text, want_loss):
    assert len(ids) % 16 == 0
    n = len(TOK.encode(text))
    assert TOK.decode(ids[:n], skip_special=False) == text
    assert (ids[n:] == TOK.pad_token_id).all() and not mask[n:].any()  # block padding
    # The loss-bearing tokens are exactly the assistant turns, each with its end-of-turn token
    # and the newline the template renders after it (the authors' span).
    runs, cur = [], []
    for i, m in zip(ids, mask):
      if m:
        cur.append(i)
      elif cur:
        runs.append(TOK.decode(cur, skip_special=False))
        cur = []
    assert runs == loss_spans


def test_packing_is_block_aligned_with_correct_segments(tmp_path):
  recs = [{"prompt": "p" * int(k), "response": "r" * int(m)}
          for k, m in np.random.default_rng(0).integers(1, 30, (60, 2))]
  cfg = DataConfig(source=write_jsonl(tmp_path / "a.jsonl", recs), seq_len=96, block_size=16,
                   batch_size=4, shuffle=False, num_epochs=1)
  it = data.make_dataset(cfg, TOK)
  batches = list(it)
  for b in batches:
    seg = b["segments"]
    blocks = seg.reshape(seg.shape[0], -1, 16)
    assert (blocks == blocks[..., :1]).all()  # one sample per block
    for row in seg:  # ids 1, 2, ... in order, padding (0) only at the end
      nz = row[row > 0]  # (the last batch of a finite epoch may hold empty rows)
      assert (np.diff(nz) >= 0).all() and (np.unique(nz) == np.arange(1, len(set(nz)) + 1)).all()
      assert (row[len(nz):] == 0).all()
    assert not b["loss_mask"][seg == 0].any()
  # First fit: a batch closes only when the next sample fits in none of its rows.
  for b, following in zip(batches, batches[1:]):
    opening = (following["segments"][0] == 1).sum()
    assert ((b["segments"] == 0).sum(axis=1) < opening).all()
  key = lambda s: (s[0].tobytes(), s[1].tobytes())
  got = sorted((key(s) for b in batches for s in samples_of(b)))
  expected = sorted(key((e["ids"], e["loss_mask"])) for e in
                    (data.render(("x", r), TOK, cfg) for r in recs))
  assert got == expected and len(got) == 60
  assert it.stats.samples == 60 and it.stats.records == 60
  assert it.stats.tokens + it.stats.padding == len(batches) * 4 * 96


def _prompts(batches):
  return [TOK.decode(ids[:m.argmax()]) for b in batches for ids, m in samples_of(b)]


def test_shuffling_is_deterministic_by_seed(tmp_path):
  cfg = DataConfig(source=write_jsonl(tmp_path / "a.jsonl", qa_records(40)), seq_len=64,
                   block_size=16, batch_size=2, seed=3)
  first = [next(it) for it in [data.make_dataset(cfg, TOK)] for _ in range(8)]
  again = [next(it) for it in [data.make_dataset(cfg, TOK)] for _ in range(8)]
  other = [next(it) for it in [data.make_dataset(dataclasses.replace(cfg, seed=4), TOK)]
           for _ in range(8)]
  for a, b in zip(first, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert _prompts(first) != _prompts(other)
  assert sorted(_prompts(first)) != _prompts(first)  # shuffled, not file order


def test_process_shards_are_disjoint_and_cover_the_data(tmp_path):
  cfg = DataConfig(source=write_jsonl(tmp_path / "a.jsonl", qa_records(50)), seq_len=64,
                   block_size=16, batch_size=4, seed=1, num_epochs=1)
  shards = [_prompts(list(data.make_dataset(cfg, TOK, process_index=p, process_count=2)))
            for p in range(2)]
  assert set(shards[0]).isdisjoint(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(_prompts(list(data.make_dataset(cfg, TOK))))
  assert len(shards[0]) + len(shards[1]) == 50
  batch = next(data.make_dataset(cfg, TOK, process_index=1, process_count=2))
  assert batch["tokens"].shape == (2, 64)  # each process packs its share of the global batch
  with pytest.raises(ConfigError, match="not divisible by the 3"):
    data.make_dataset(cfg, TOK, process_index=0, process_count=3)


@pytest.mark.parametrize("source", ["jsonl", "synthetic"])
def test_restored_iterator_continues_exactly(tmp_path, source):
  src = write_jsonl(tmp_path / "a.jsonl", qa_records(30)) if source == "jsonl" else "synthetic"
  cfg = DataConfig(source=src, seq_len=64, block_size=16, batch_size=3, seed=5)
  it = data.make_dataset(cfg, TOK, process_index=1, process_count=3)
  for _ in range(7):  # crosses an epoch of the JSONL source
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  rest = [next(it) for _ in range(12)]
  restored = data.make_dataset(cfg, TOK, process_index=1, process_count=3)
  restored.set_state(state)
  for want in rest:
    got = next(restored)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert restored.stats == it.stats


def test_bad_records_are_skipped_counted_and_logged(tmp_path, caplog):
  lines = [
      json.dumps({"prompt": "ok", "response": "fine"}),  # line 1
      "{not json",  # 2
      json.dumps({"prompt": "no response"}),  # 3
      json.dumps({"question": "q", "answer": "   "}),  # 4
      json.dumps({"prompt": "p" * 200, "response": "long"}),  # 5
      "",  # 6: blank lines are not records
      json.dumps([1, 2]),  # 7
      json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),  # 8
      json.dumps({"text": "unknown shape"}),  # 9
      json.dumps({"prompt": "é?", "response": "not in the char vocabulary: é"}),  # 10
      json.dumps({"question": "fine", "answer": "too"}),  # 11
      json.dumps({"prompt": "spelled", "response": "a <|mask|> b"}),  # 12: the mask token
      "[" * 100000 + "]" * 100000,  # 13: JSON nested past Python's stack (RecursionError)
      '{"prompt": "a", "response": "b", "n": ' + "9" * 5000 + "}",  # 14: an int past 4300 digits
  ]
  path = write_jsonl(tmp_path / "bad.jsonl", lines)
  cfg = DataConfig(source=path, seq_len=64, block_size=16, batch_size=2, shuffle=False,
                   num_epochs=1)
  with caplog.at_level(logging.WARNING, logger="dllm_jax.data"):
    batches = list(data.make_dataset(cfg, TOK))
    it = data.make_dataset(cfg, TOK)
    list(it)
  assert len(samples_of(batches[0])) == 2
  assert it.stats.records == 13 and it.stats.samples == 2
  assert it.stats.skipped == {"malformed_json": 3, "missing_field": 2, "empty_response": 2,
                              "too_long": 1, "not_an_object": 1, "untokenizable": 1,
                              "mask_token": 1}
  assert f"{path}:12: skipped: the text holds the mask token (id {TOK.mask_token_id})" in (
      caplog.text)
  for line in (2, 3, 4, 5, 7, 8, 9, 10):
    assert f"{path}:{line}: skipped" in caplog.text
  assert f"{path}:13: skipped: JSON that Python cannot read: RecursionError" in caplog.text
  assert f"{path}:14: skipped: JSON that Python cannot read: ValueError" in caplog.text
  assert "longer than data.seq_len=64" in caplog.text

  strict = dataclasses.replace(cfg, strict=True)
  with pytest.raises(data.DataError, match=rf"{path}:2: malformed JSON"):
    list(data.make_dataset(strict, TOK))

  # A repeating source with no good record says so, instead of reading it for ever; one with a
  # single good record among them keeps going.
  bad_only = write_jsonl(tmp_path / "bad_only.jsonl", [lines[i] for i in (1, 4, 6, 8)])
  forever = dataclasses.replace(cfg, source=bad_only, num_epochs=None, shuffle=True)
  with pytest.raises(data.DataError, match="8 records of data.source in a row made no sample"):
    next(data.make_dataset(forever, TOK))
  one_good = write_jsonl(tmp_path / "one_good.jsonl", [lines[i] for i in (1, 4, 0, 6, 8)])
  it = data.make_dataset(dataclasses.replace(forever, source=one_good), TOK)
  for _ in range(3):
    next(it)
  # Two processes: one takes every other record, so the good one reaches it only on some
  # passes; it must keep going, not give up after twice its share.
  few = write_jsonl(tmp_path / "few.jsonl", [lines[i] for i in (1, 0, 4)])
  for shuffle in (False, True):
    it = data.make_dataset(dataclasses.replace(forever, source=few, shuffle=shuffle), TOK,
                           process_index=1, process_count=2)
    for _ in range(5):
      next(it)


def test_synthetic_tasks_and_held_out_split():
  rng = np.random.default_rng(0)
  r = data.synthetic_record("reverse", rng, 5, 5)
  assert r["response"] == r["prompt"].split(": ")[1][::-1] and len(r["response"]) == 5
  r = data.synthetic_record("sort", rng, 3, 9)
  assert r["response"] == "".join(sorted(r["prompt"].split(": ")[1]))
  r = data.synthetic_record("upper", rng, 3, 9)
  assert r["response"] == r["prompt"].split(": ")[1].upper()
  cfg = DataConfig(seq_len=64, block_size=16, batch_size=4, eval_records=20)
  held_out = _prompts(list(data.make_dataset(cfg, TOK, split="eval")))
  assert len(held_out) == 20
  train = _prompts([next(it) for it in [data.make_dataset(cfg, TOK)] for _ in range(50)])
  assert len(set(train)) > 150 and not set(held_out) & set(train)
  # Among two-letter strings (676) independent draws of 40 and 400 would share about half of the
  # 40; the held-out share of the prompts is never drawn for training.
  cfg = DataConfig(seq_len=64, block_size=16, batch_size=4, eval_records=40,
                   synthetic_min_len=2, synthetic_max_len=2, synthetic_size=400)
  held_out = set(_prompts(list(data.make_dataset(cfg, TOK, split="eval"))))
  train = set(_prompts([b for b in data.make_dataset(dataclasses.replace(cfg, num_epochs=1), TOK)]))
  assert len(held_out) > 10 and len(train) > 200 and not held_out & train
  # data.max_records limits the synthetic splits as it does JSONL ones (it was ignored there).
  few = dataclasses.replace(cfg, max_records=5, num_epochs=1)
  assert len(_prompts(list(data.make_dataset(few, TOK, split="eval")))) == 5
  assert len(_prompts(list(data.make_dataset(few, TOK)))) == 5


def test_config_errors_say_what_to_do(tmp_path):
  with pytest.raises(ConfigError, match="multiple of data.block_size=32"):
    DataConfig(seq_len=100)
  with pytest.raises(ConfigError, match="matches no file"):
    data.make_dataset(DataConfig(source=str(tmp_path / "missing.jsonl")), TOK)
  with pytest.raises(ConfigError, match="eval_source"):
    data.make_dataset(DataConfig(source=write_jsonl(tmp_path / "a.jsonl", qa_records(2))), TOK,
                      split="eval")


def test_block_padding_after_the_answer_is_a_response(tmp_path):
  # What a diffusion decoder asks of the model: fill the rest of the answer's block (template
  # trailer, then padding) when every later position is masked.
  recs = [{"prompt": "2+2", "response": "4"}]
  cfg = DataConfig(source=write_jsonl(tmp_path / "a.jsonl", recs), seq_len=32, block_size=16,
                   batch_size=1, shuffle=False, num_epochs=1, loss_on_block_padding=True)
  (ids, mask), = samples_of(next(data.make_dataset(cfg, TOK)))
  n = len(TOK.encode("<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"))
  assert len(ids) == 32 and n < 32
  answer = len(TOK.encode("<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n"))
  np.testing.assert_array_equal(mask, np.arange(32) >= answer)
  assert (ids[n:] == TOK.pad_token_id).all()


def test_bom_crlf_and_blank_lines_are_read_as_text_editors_write_them(tmp_path):
  # A UTF-8 BOM (as Windows editors save), CRLF line endings, blank lines (a BOM-only first line
  # among them) and non-ASCII text: every record is read once, nothing counted as malformed.
  rec = lambda i: json.dumps({"question": f"q{i}é?", "answer": f"a\u2028{i}\n#### {i}"},
                             ensure_ascii=i % 2 == 0).encode()
  path = tmp_path / "win.jsonl"
  path.write_bytes(b"\xef\xbb\xbf\r\n" + rec(0) + b"\r\n\r\n" + rec(1) + b"\r\n \t\r\n" + rec(2))
  tok = tok_lib.simple_chars(extra_chars="é\u2028")
  cfg = DataConfig(source=str(path), seq_len=64, block_size=16, batch_size=1, shuffle=False,
                   num_epochs=1, strict=True)
  it = data.make_dataset(cfg, tok)
  got = [tok.decode(ids[:m.argmax()], skip_special=False) for b in it for ids, m in samples_of(b)]
  assert got == [f"<|im_start|>user\nq{i}é?<|im_end|>\n<|im_start|>assistant\n" for i in range(3)]
  assert it.stats.records == 3 and it.stats.skipped == {}
  # A BOM right before the first record is read past too.
  path.write_bytes(b"\xef\xbb\xbf" + rec(0) + b"\r\n" + rec(1) + b"\n")
  assert len([s for b in data.make_dataset(cfg, tok) for s in samples_of(b)]) == 2
  # A file that is only a BOM and blank lines holds no records.
  empty = tmp_path / "empty.jsonl"
  empty.write_bytes(b"\xef\xbb\xbf\n\n")
  with pytest.raises(ConfigError, match="empty.jsonl holds no records"):
    data.make_dataset(dataclasses.replace(cfg, source=str(empty)), tok)


def test_a_home_relative_path_is_found_as_a_glob_is(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  path = write_jsonl(tmp_path / "train.jsonl", qa_records(2))
  assert data.jsonl_paths("~/train.jsonl") == data.jsonl_paths("~/train.js*") == [path]


def test_a_saved_position_into_a_changed_source_is_refused(tmp_path):
  # The shuffled order depends on how many records the source holds: a position saved before
  # records were added would replay some and skip others (with seed 0, 10 -> 11 records: one
  # seen twice, the new one never), so restoring it is refused by name.
  path = tmp_path / "a.jsonl"
  cfg = DataConfig(source=write_jsonl(path, qa_records(10)), seq_len=64, block_size=16,
                   batch_size=1, seed=0, num_epochs=1)
  it = data.make_dataset(cfg, TOK)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state["source_records"] == 10
  rest = _prompts(it)  # (read before the file is rewritten under it)
  write_jsonl(path, qa_records(11))
  with pytest.raises(data.DataChangedError, match="source of 10 records, and the data now holds "
                                                  "11"):
    data.make_dataset(cfg, TOK).set_state(state)
  # A state saved before the count was recorded restores as before.
  write_jsonl(path, qa_records(10))
  old = {k: v for k, v in state.items() if k != "source_records"}
  restored = data.make_dataset(cfg, TOK)
  restored.set_state(old)
  assert _prompts(restored) == rest and len(rest) == 5


def test_block_padding_is_a_response_only_after_a_closing_answer(tmp_path):
  # A conversation that ends with a user turn asks nothing of the block after it: with
  # loss_on_block_padding its loss tokens stay exactly the assistant span, padding visible.
  recs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                        {"role": "user", "content": "bye"}]}]
  cfg = DataConfig(source=write_jsonl(tmp_path / "a.jsonl", recs), seq_len=64, block_size=16,
                   batch_size=1, shuffle=False, num_epochs=1, loss_on_block_padding=True)
  (ids, mask), = samples_of(next(data.make_dataset(cfg, TOK)))
  text = ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
          "<|im_start|>user\nbye<|im_end|>\n")
  n = len(TOK.encode(text))
  assert n % 16 and len(ids) == -(-n // 16) * 16  # (there is block padding to speak of)
  start = len(TOK.encode(text[:text.index("yo")]))
  end = len(TOK.encode(text[:text.index("<|im_start|>user\nbye")]))
  np.testing.assert_array_equal(mask, (np.arange(len(ids)) >= start) & (np.arange(len(ids)) < end))


def test_a_sample_takes_the_fewest_whole_blocks_that_hold_it():
  # Padding to blocks adds under one block: a sample of exactly k blocks' tokens takes k blocks,
  # not k + 1 (a whole block of padding that a diffusion step would see or, with
  # loss_on_block_padding, predict).
  cfg = DataConfig(seq_len=256, block_size=16)
  lengths = []
  for k in range(1, 40):
    s = data.render(("x", {"prompt": "p" * k, "response": "r"}), TOK, cfg)
    assert len(s["ids"]) == -(-s["n"] // 16) * 16, (s["n"], len(s["ids"]))
    lengths.append(s["n"])
  assert any(n % 16 == 0 for n in lengths)  # the case a floor-plus-one rounding gets wrong


def rendered_prompts(recs, cfg):
  """The prompt text of each record as rendered alone: a statement of which records a stream
  should hold that depends on no shuffling, sharding or packing."""
  out = []
  for r in recs:
    s = data.render(("x", r), TOK, cfg)
    out.append(TOK.decode(s["ids"][:s["loss_mask"].argmax()]))
  return out


def test_each_epoch_is_one_full_pass_in_a_new_order(tmp_path):
  # num_epochs passes, each reading every record once and each reshuffled: one fixed order
  # every pass would show the model the same sequence of batches again. One row per batch
  # (batch_size=1, one sample a row) keeps the stream's order in the batches.
  recs = qa_records(20)
  cfg = DataConfig(source=write_jsonl(tmp_path / "a.jsonl", recs), seq_len=64, block_size=16,
                   batch_size=1, seed=2, num_epochs=3)
  it = data.make_dataset(cfg, TOK)
  stream = _prompts(it)
  assert len(stream) == 60 and it.stats.records == 60
  passes = [stream[i * 20:(i + 1) * 20] for i in range(3)]
  for p in passes:
    assert sorted(p) == sorted(rendered_prompts(recs, cfg))
  assert len({tuple(p) for p in passes}) == 3


def test_process_p_of_three_reads_every_third_record_from_p(tmp_path):
  # 50 records over 3 processes (50 % 3 = 2 left over): process p reads records p, p + 3, ...
  # of the stream one process reads, so none is read twice and none, the remainder included,
  # is skipped. (Two processes of an even count could not tell a wrong index or a dropped
  # remainder from the rule.) One row a process keeps each stream's order.
  recs = qa_records(50)
  cfg = DataConfig(source=write_jsonl(tmp_path / "a.jsonl", recs), seq_len=64, block_size=16,
                   batch_size=3, seed=1, num_epochs=1)
  whole = _prompts(data.make_dataset(dataclasses.replace(cfg, batch_size=1), TOK))
  assert sorted(whole) == sorted(rendered_prompts(recs, cfg))
  for p in range(3):
    assert _prompts(data.make_dataset(cfg, TOK, process_index=p, process_count=3)) == whole[p::3]
  with pytest.raises(ValueError, match=r"process_index=3 outside 0\.\.2"):
    data.make_dataset(cfg, TOK, process_index=3, process_count=3)


def test_held_out_jsonl_is_read_once_in_file_order(tmp_path):
  # Evaluation scores the first train.eval_batches batches of data.eval_source: shuffled by
  # the training seed, or repeated, it would score another subset each run; and it must be
  # the held-out file, not data.source.
  held = [{"prompt": f"held {i}", "response": f"out {i}"} for i in range(12)]
  cfg = DataConfig(source=write_jsonl(tmp_path / "train.jsonl", qa_records(30)),
                   eval_source=write_jsonl(tmp_path / "eval.jsonl", held), seq_len=64,
                   block_size=16, batch_size=1, seed=3)  # (shuffled, repeated for ever)
  assert cfg.shuffle and cfg.num_epochs is None
  assert _prompts(data.make_dataset(cfg, TOK, split="eval")) == rendered_prompts(held, cfg)


def test_files_and_globs_are_read_in_order_and_max_records_counts_across_them(tmp_path):
  # data.source is files and globs, read in the order given (a glob's matches sorted);
  # data.max_records keeps the first N records of that whole sequence, whichever file they
  # are in.
  recs = qa_records(9)
  (tmp_path / "d").mkdir()
  first = write_jsonl(tmp_path / "first.jsonl", recs[:2])
  write_jsonl(tmp_path / "d" / "c.jsonl", recs[5:])
  write_jsonl(tmp_path / "d" / "b.jsonl", recs[2:5])
  cfg = DataConfig(source=f"{first}, {tmp_path / 'd' / '*.jsonl'}", seq_len=64, block_size=16,
                   batch_size=1, shuffle=False, num_epochs=1)
  want = rendered_prompts(recs, cfg)
  for n in (0, 1, 2, 3, 4, 6, 9, 20):
    got = _prompts(data.make_dataset(dataclasses.replace(cfg, max_records=n), TOK))
    assert got == (want[:n] if n else want), n


def test_stats_count_the_tokens_the_batches_hold(tmp_path):
  # What a run reports of its data: sample tokens and loss tokens as the batches hold them,
  # and the share of row positions that are sample tokens (tokens / (tokens + padding)).
  recs = qa_records(12)
  cfg = DataConfig(source=write_jsonl(tmp_path / "a.jsonl", recs), seq_len=96, block_size=16,
                   batch_size=2, shuffle=False, num_epochs=1)
  it = data.make_dataset(cfg, TOK)
  batches = list(it)
  rendered = [data.render(("x", r), TOK, cfg) for r in recs]
  assert it.stats.tokens == sum(s["n"] for s in rendered)
  assert it.stats.loss_tokens == sum(int(b["loss_mask"].sum()) for b in batches) == sum(
      int(s["loss_mask"].sum()) for s in rendered)
  total = len(batches) * 2 * 96
  assert it.stats.tokens + it.stats.padding == total
  assert f"rows {round(100 * it.stats.tokens / total)}% filled" in it.stats.summary()
  assert it.stats.tokens < total  # (so a fill of 100% would be wrong)
  assert "rows 75% filled" in data.DataStats(records=1, samples=1, tokens=30,
                                             padding=10).summary()


def test_a_state_restored_into_a_used_iterator_rewinds_it(tmp_path):
  # set_state puts an iterator back where the state was taken even after it has read on: the
  # sample it had read ahead (the one that opened its next batch) belongs to the later position
  # and must not be placed first.
  cfg = DataConfig(source=write_jsonl(tmp_path / "a.jsonl", qa_records(30)), seq_len=64,
                   block_size=16, batch_size=2, seed=5)
  it = data.make_dataset(cfg, TOK)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(4)]
  stats = dataclasses.replace(it.stats, skipped=dict(it.stats.skipped))
  it.set_state(state)
  for w in want:
    got = next(it)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])
  assert it.stats == stats
