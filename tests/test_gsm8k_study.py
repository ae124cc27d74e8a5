"""The GSM8K study driver: concurrent jobs merge their results, stage names are checked, and the
report marks what did not run and what shared the GPU."""

import hashlib
import json
import pathlib
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def study_mod(load_benchmark):
  return load_benchmark("gsm8k_study")


def test_save_merges_concurrent_jobs(study_mod, tmp_path, monkeypatch):
  out = tmp_path / "out"
  out.mkdir()
  monkeypatch.setenv("OUT", str(out))
  # Two jobs that loaded the file before either saved: neither may drop the other's result.
  job_a, job_b = {"data_dir": "d"}, {"data_dir": "d"}
  job_a["diff_t1.0_s4"] = {"accuracy": 0.1}
  study_mod._save(tmp_path, job_a)
  job_b["diff_t1.0_s8"] = {"accuracy": 0.2}
  study_mod._save(tmp_path, job_b)
  merged = json.loads((tmp_path / "study.json").read_text())
  assert merged["diff_t1.0_s4"] == {"accuracy": 0.1}
  assert merged["diff_t1.0_s8"] == {"accuracy": 0.2}
  assert json.loads((out / "study.json").read_text()) == merged
  assert "diff_t1.0_s4" in job_b  # the saving job sees the others' results too


def test_unknown_stage_is_an_error(study_mod, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["gsm8k_study.py", "--data-dir", str(tmp_path), "--work",
                                    str(tmp_path / "w"), "--stages", "train,evall"])
  with pytest.raises(SystemExit):
    study_mod.main()
  assert "unknown ['evall']" in capsys.readouterr().err


def test_report_marks_missing_and_shared_figures(study_mod, tmp_path):
  def ev(acc, tps, tpf=1.0, jobs=5, **kw):
    return dict(accuracy=acc, stderr=0.01, tokens_per_s=tps, tokens_per_forward=tpf,
                concurrent_jobs=jobs, n=128 if jobs == 1 else 1319, **kw)

  study = {
      "zeroshot_ar": ev(0.02, 1500.0),
      "ar_model_ar": ev(0.06, 1100.0),
      "speed_ar": ev(0.08, 500.0, jobs=1),
      "diff_t1.0_s8": ev(0.02, 650.0, 0.95, agreement_with_threshold_1=1.0),
      "speed_diff_t1.0_s8": ev(0.02, 400.0, 0.95, jobs=1),
      "speed_diff_t0.7_s8": ev(0.01, 1250.0, 2.6, jobs=1),  # no batch-32 run of this one
  }
  text = study_mod.report(study, plot_dir=tmp_path)
  rows = {line.split("|")[3].strip() + "/" + line.split("|")[2].strip(): line
          for line in text.splitlines() if line.startswith("| diffusion")}
  assert "650†" in rows["1.0/8"] and "0.80" in rows["1.0/8"]  # 400 / 500 at batch 1
  assert "not run" in rows["0.7/8"] and "2.50" in rows["0.7/8"]  # 1250 / 500
  assert "1.00" in rows["1.0/8"].split("|")[5]  # agreement
  assert "| AR-SFT model, AR | - | - | 0.060 ± 0.010 |" in text
  assert "accuracy ± s.e. (1319)" in text and "batch-1 tok/s (128)" in text
  # Without the AR batch-1 run there is no speed-up to state.
  del study["speed_ar"]
  assert "| AR-SFT model, AR | - | - | 0.060 ± 0.010 | - | 1.00 | 1100† | not run | not run | - |" \
      in study_mod.report(study, plot_dir=tmp_path)


def test_resuming_with_other_settings_is_an_error(study_mod, tmp_path):
  study = {"data_dir": "d", "ar_model_ar": {"limit": 64, "max_new_tokens": 256}}
  with pytest.raises(SystemExit, match="limit=64, max_new_tokens=256, layout=stacked, not "
                     "limit=None"):
    study_mod._evaluate(study, tmp_path, "ar_model_ar", "unused", {"max_new_tokens": 256}, 32,
                        None)
  # A result decoded with the other parameter layout is not resumed either.
  study = {"data_dir": "d", "ar_model_ar": {"limit": None, "max_new_tokens": 256}}
  with pytest.raises(SystemExit, match="layout=per_layer: use another --work"):
    study_mod._evaluate(study, tmp_path, "ar_model_ar", "unused", {"max_new_tokens": 256}, 32,
                        None, layout="per_layer")
  # The same settings resume (nothing to do).
  study_mod._evaluate(study, tmp_path, "ar_model_ar", "unused", {"max_new_tokens": 256}, 32, None,
                      layout="stacked")


def test_evaluate_decodes_in_the_layout_eval_would_pick(study_mod, tmp_path, monkeypatch):
  # The batch-1 speed stage must time what `python -m dllm_jax.eval --batch-size 1` runs: the
  # kernel layout `--kernel-layout auto` picks for the mode and batch.
  import jax

  from dllm_jax import convert, model, tokenizer
  from dllm_jax.config import ModelConfig

  tok = tokenizer.simple_chars()
  cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  convert.export_hf_dir(convert.Pretrained(model.init_params(cfg, jax.random.key(0)), cfg, tok,
                                           {}), tmp_path / "hf")
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "test.jsonl").write_text("".join(
      json.dumps({"question": f"{i} + 1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(2)))
  asked = []
  monkeypatch.setattr(model, "decode_kernel_layout",
                      lambda cfg, **kw: asked.append(kw) or "out_in")
  study = {"data_dir": str(tmp_path / "data")}
  monkeypatch.setattr(study_mod, "_save", lambda work, study: None)
  study_mod._evaluate(study, tmp_path, "speed_ar", str(tmp_path / "hf"),
                      dict(mode="ar", max_new_tokens=4), 1, None)
  assert asked == [dict(mode="ar", batch=1, stacked=False)]
  assert study["speed_ar"]["kernel_layout"] == "out_in" and study["speed_ar"]["n"] == 2


def test_unknown_train_kind_is_an_error(study_mod, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["gsm8k_study.py", "--data-dir", str(tmp_path), "--work",
                                    str(tmp_path / "w"), "--stages", "train",
                                    "--train-kinds", "ar,difusion"])
  with pytest.raises(SystemExit):
    study_mod.main()
  assert "--train-kinds: unknown ['difusion']" in capsys.readouterr().err


def test_side_by_side_fine_tunes_get_one_child_each(study_mod, tmp_path, monkeypatch):
  # --jobs 2 trains each kind in a child of its own, passing --set through; the parent trains
  # nothing itself and reads back what the children saved.
  launched = []

  def fake_run_children(children, jobs, work, what):
    launched.extend(children)
    for cmd in children:
      kind = cmd[cmd.index("--train-kinds") + 1]
      study_mod._save(work, {f"train_{kind}": {"step": 3, "concurrent_jobs": jobs}})

  monkeypatch.setattr(study_mod, "_run_children", fake_run_children)
  monkeypatch.setattr(study_mod, "stage_train", lambda *a, **k: pytest.fail("parent trained"))
  monkeypatch.setattr(sys, "argv", ["gsm8k_study.py", "--data-dir", str(tmp_path), "--work",
                                    str(tmp_path / "w"), "--stages", "train", "--steps", "3",
                                    "--jobs", "2", "--set", "train.learning_rate=2e-4"])
  study_mod.main()
  assert [c[c.index("--train-kinds") + 1] for c in launched] == ["ar", "diffusion"]
  for cmd in launched:
    assert cmd[cmd.index("--set") + 1] == "train.learning_rate=2e-4"
    assert cmd[cmd.index("--stages") + 1] == "train" and cmd[cmd.index("--jobs") + 1] == "1"
  saved = json.loads((tmp_path / "w" / "study.json").read_text())
  assert saved["train_ar"]["concurrent_jobs"] == 2 and saved["train_diffusion"]["step"] == 3


REMOTE = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gsm8k_study_remote.sh"


@pytest.mark.parametrize("size", [1001, 1000])
def test_remote_runner_splits_a_file_into_halves_that_rejoin(tmp_path, size):
  data = bytes(range(256)) * (size // 256) + bytes(size % 256)
  (tmp_path / "model.gguf").write_bytes(data)
  done = subprocess.run(["bash", str(REMOTE), "split", str(tmp_path / "model.gguf"),
                         str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True,
                        text=True, check=True)
  one, two = (tmp_path / "a" / "part1").read_bytes(), (tmp_path / "b" / "part2").read_bytes()
  assert len(one) == (size + 1) // 2 and one + two == data
  assert done.stdout.split()[0] == hashlib.sha256(data).hexdigest()  # what `start` checks
  bad = subprocess.run(["bash", str(REMOTE), "split", str(tmp_path / "model.gguf")],
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "usage" in bad.stderr
