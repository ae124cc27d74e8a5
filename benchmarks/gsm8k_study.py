"""The GSM8K study: SmolLM2-135M-Instruct fine-tuned twice (AR-SFT and block diffusion) with the
same data, steps and learning rate, then evaluated and timed.

    python benchmarks/gsm8k_study.py --data-dir DIR [--work runs/study] [--steps N]
        [--stages train,zeroshot,eval,speed] [--limit N]
    python benchmarks/gsm8k_study.py --report study.json   # markdown + PNG plots under docs/

Stages (each skips the settings whose results already exist under --work, so a study can be
spread over several calls on one machine):
  train     configs/smollm2_gsm8k.py with objective.kind=ar and =diffusion; records the held-out
            masked-token accuracy (next-token accuracy for AR) on the test split
  zeroshot  the unmodified SmolLM2 with AR decoding, whole test set, batch 32
  eval      AR model with AR decoding; diffusion model at thresholds 1.0 .. 0.7 and sub-blocks
            4, 8, 16, 32; whole test set, batch 32; agreement with the same sub-block size's
            threshold-1.0 answers
  speed     batch 1 on the first 128 problems: the AR model, and the diffusion model at each
            threshold with sub-block 8
Results: WORK/study.json (and $OUT/study.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

THRESHOLDS = (1.0, 0.95, 0.9, 0.8, 0.7)
SUB_BLOCKS = (4, 8, 16, 32)


def _load(path: pathlib.Path) -> dict:
  return json.loads(path.read_text()) if path.exists() else {}


def _save(work: pathlib.Path, study: dict) -> None:
  text = json.dumps(study, indent=1)
  (work / "study.json").write_text(text)
  if os.environ.get("OUT"):
    pathlib.Path(os.environ["OUT"], "study.json").write_text(text)


def stage_train(study, work, data_dir, steps, extra):
  from dllm_jax import run_config, training

  for kind in ("ar", "diffusion"):
    key = f"train_{kind}"
    if key in study:
      continue
    overrides = [f"objective.kind={kind}", f"data.source={data_dir}/train.jsonl",
                 f"data.eval_source={data_dir}/test.jsonl", f"train.steps={steps}",
                 f"train.run_dir={work}/{kind}", "train.progress=false", *extra]
    cfg = run_config.load("configs/smollm2_gsm8k.py", overrides)
    t0 = time.perf_counter()
    result = training.train(cfg)
    study[key] = dict({k: v for k, v in result.items() if isinstance(v, (int, float, str))},
                      wall_s=time.perf_counter() - t0, overrides=overrides)
    print(key, study[key], flush=True)
    _save(work, study)


def _evaluate(study, work, key, checkpoint, decode_kwargs, batch, limit, reference=None):
  from dllm_jax import checkpoint as ckpt, convert, decoding, eval as ev

  if key in study:
    return
  # bf16 weights and compute, as a user would decode on a GPU.
  pre = convert.cast(ckpt.load_model(checkpoint), "bfloat16")
  problems = ev.load_gsm8k(os.path.join(study["data_dir"], "test.jsonl"), limit)
  records, summary = ev.evaluate(pre, problems, decoding.DecodeConfig(**decode_kwargs), batch,
                                 log=lambda *a: None)
  gen_path = work / f"{key}.jsonl"
  with gen_path.open("w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  if reference is not None:
    ref_path = work / f"{reference}.jsonl"
    if ref_path.exists():
      summary["agreement_with_threshold_1"] = ev.agreement(
          records, [json.loads(l) for l in ref_path.read_text().splitlines() if l])
  summary.pop("decode", None)
  study[key] = dict(summary, **decode_kwargs)
  print(key, {k: study[key][k] for k in ("accuracy", "stderr", "tokens_per_s",
                                           "tokens_per_forward")}, flush=True)
  _save(work, study)


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--data-dir", help="folder with GSM8K train.jsonl and test.jsonl")
  ap.add_argument("--work", default="runs/study")
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--stages", default="train,zeroshot,eval,speed")
  ap.add_argument("--limit", type=int, default=None, help="test problems (default: all 1319)")
  ap.add_argument("--speed-limit", type=int, default=128)
  ap.add_argument("--max-new-tokens", type=int, default=256)
  ap.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)))
  ap.add_argument("--sub-blocks", default=",".join(map(str, SUB_BLOCKS)))
  ap.add_argument("--set", action="append", default=[], help="extra training overrides")
  ap.add_argument("--report", help="study.json to turn into markdown and plots")
  args = ap.parse_args()
  if args.report:
    report(_load(pathlib.Path(args.report)))
    return
  if not args.data_dir:
    ap.error("--data-dir is required (a folder holding GSM8K train.jsonl and test.jsonl)")
  work = pathlib.Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  study = _load(work / "study.json")
  study["data_dir"] = args.data_dir
  stages = args.stages.split(",")
  n = args.max_new_tokens
  thresholds = [float(t) for t in args.thresholds.split(",")]
  sub_blocks = [int(b) for b in args.sub_blocks.split(",")]
  if "train" in stages:
    stage_train(study, work, args.data_dir, args.steps, args.set)
  if "zeroshot" in stages:
    _evaluate(study, work, "zeroshot_ar", "smollm2-135m-instruct",
              dict(mode="ar", max_new_tokens=n), 32, args.limit)
  if "eval" in stages:
    _evaluate(study, work, "ar_model_ar", str(work / "ar"), dict(mode="ar", max_new_tokens=n),
              32, args.limit)
    for sub in sub_blocks:
      for th in thresholds:
        _evaluate(study, work, f"diff_t{th}_s{sub}", str(work / "diffusion"),
                  dict(mode="diffusion", max_new_tokens=n, threshold=th, sub_block_size=sub),
                  32, args.limit, reference=f"diff_t1.0_s{sub}")
  if "speed" in stages:
    _evaluate(study, work, "speed_ar", str(work / "ar"), dict(mode="ar", max_new_tokens=n), 1,
              args.speed_limit)
    for th in thresholds:
      _evaluate(study, work, f"speed_diff_t{th}_s8", str(work / "diffusion"),
                dict(mode="diffusion", max_new_tokens=n, threshold=th, sub_block_size=8), 1,
                args.speed_limit)
  _save(work, study)


def report(study: dict) -> str:
  """Markdown tables for BENCHMARKS.md and the two plots under docs/."""
  def acc(key):
    s = study.get(key)
    return f"{s['accuracy']:.3f} ± {s['stderr']:.3f}" if s else "n/a"

  ar_speed = study.get("speed_ar", {}).get("tokens_per_s")
  lines = ["| model / decoding | sub-block | threshold | accuracy ± s.e. | agreement with t=1.0 | "
           "tokens per forward | batch-32 tok/s | batch-1 tok/s | batch-1 speed-up vs AR |",
           "|" + "---|" * 9]
  lines.append(f"| SmolLM2 zero-shot, AR | - | - | {acc('zeroshot_ar')} | - | - | "
               f"{study.get('zeroshot_ar', {}).get('tokens_per_s', float('nan')):.0f} | - | - |")
  ar = study.get("ar_model_ar", {})
  lines.append(f"| AR-SFT, AR | - | - | {acc('ar_model_ar')} | - | 1.00 | "
               f"{ar.get('tokens_per_s', float('nan')):.0f} | "
               f"{ar_speed or float('nan'):.0f} | 1.00 |")
  for sub in SUB_BLOCKS:
    for th in THRESHOLDS:
      s = study.get(f"diff_t{th}_s{sub}")
      if not s:
        continue
      sp = study.get(f"speed_diff_t{th}_s8") if sub == 8 else None
      b1 = sp["tokens_per_s"] if sp else None
      up = f"{b1 / ar_speed:.2f}" if b1 and ar_speed else "-"
      lines.append(
          f"| diffusion | {sub} | {th} | {acc(f'diff_t{th}_s{sub}')} | "
          f"{s.get('agreement_with_threshold_1', float('nan')):.3f} | "
          f"{s['tokens_per_forward']:.2f} | {s['tokens_per_s']:.0f} | "
          f"{f'{b1:.0f}' if b1 else '-'} | {up} |")
  text = "\n".join(lines)
  print(text)
  try:
    _plots(study)
  except ImportError as e:
    print(f"no plots: {e}")
  return text


def _plots(study: dict) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  docs = pathlib.Path(__file__).resolve().parents[1] / "docs"
  docs.mkdir(exist_ok=True)
  fig, ax = plt.subplots(figsize=(6, 4))
  for sub in SUB_BLOCKS:
    pts = [(th, study[f"diff_t{th}_s{sub}"]) for th in THRESHOLDS if f"diff_t{th}_s{sub}" in study]
    if pts:
      ax.errorbar([p[0] for p in pts], [p[1]["accuracy"] for p in pts],
                  yerr=[p[1]["stderr"] for p in pts], marker="o", capsize=3,
                  label=f"diffusion, sub-block {sub}")
  if "ar_model_ar" in study:
    a = study["ar_model_ar"]
    ax.axhline(a["accuracy"], color="k", ls="--", label="AR-SFT model, AR decoding")
    ax.axhspan(a["accuracy"] - 2 * a["stderr"], a["accuracy"] + 2 * a["stderr"], color="k",
               alpha=0.1)
  ax.set_xlabel("confidence threshold")
  ax.set_ylabel("GSM8K accuracy (full test set)")
  ax.invert_xaxis()
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(docs / "gsm8k_accuracy_vs_threshold.png", dpi=120)
  fig, ax = plt.subplots(figsize=(6, 4))
  pts = [(th, study[f"speed_diff_t{th}_s8"]) for th in THRESHOLDS
         if f"speed_diff_t{th}_s8" in study]
  if pts:
    ax.plot([p[0] for p in pts], [p[1]["tokens_per_s"] for p in pts], marker="o",
            label="diffusion, sub-block 8")
  if "speed_ar" in study:
    ax.axhline(study["speed_ar"]["tokens_per_s"], color="k", ls="--", label="AR-SFT, AR decoding")
  ax.set_xlabel("confidence threshold")
  ax.set_ylabel("tokens/s at batch 1 (first 128 problems)")
  ax.invert_xaxis()
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(docs / "gsm8k_tokens_per_s_vs_threshold.png", dpi=120)


if __name__ == "__main__":
  main()
