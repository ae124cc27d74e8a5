"""The GSM8K study: SmolLM2-135M-Instruct fine-tuned twice (AR-SFT and block diffusion) with the
same data, steps and learning rate, then evaluated and timed.

    python benchmarks/gsm8k_study.py --data-dir DIR [--work runs/study] [--steps N]
        [--stages train,speed,zeroshot,areval,diffeval] [--limit N] [--jobs N]
        [--base smollm2-135m-instruct | path/to/SmolLM2.gguf] [--set key=value ...]
    python benchmarks/gsm8k_study.py --report study.json   # markdown + PNG plots under docs/

Stages, run in this order (each skips the settings whose results already exist under --work, so
a study can be spread over several calls on one machine):
  train     configs/smollm2_gsm8k.py with objective.kind=ar and =diffusion; records the held-out
            masked-token accuracy (next-token accuracy for AR) on the test split
  speed     batch 1 on the first 128 problems: the AR model, and the diffusion model at each
            threshold with sub-block 8 (alone on the GPU: these are the timed figures)
  zeroshot  the unmodified SmolLM2 with AR decoding, whole test set, batch 32
  areval    AR model with AR decoding, whole test set, batch 32
  diffeval  diffusion model at thresholds 1.0 .. 0.7 and sub-blocks 4, 8, 16, 32; whole test set,
            batch 32; agreement with the same sub-block size's threshold-1.0 answers
  (`eval` means areval,diffeval.)
--jobs N runs the two fine-tunes side by side, and zeroshot, areval and diffeval as up to N
processes sharing the GPU (one per sub-block size): a 135M model's decode step is launch-bound,
so they overlap well. Their wall times and batch-32 tokens/s are then shared-GPU figures, marked
so in study.json (`concurrent_jobs`: how many jobs could share the GPU at most; fewer did once
the shorter jobs ended).
Evaluations decode with the per-layer parameter layout (--layout) and share a JAX persistent
compilation cache (--compile-cache, default WORK/jax_cache): the threshold is an argument of the
compiled decoder, so each sub-block size should compile once per batch size (shown on CPU by
tests/test_eval.py; not yet observed on a GPU). On a cache hit `compile_s` is the load time.
Results: WORK/study.json, merged under a file lock (and copied to $OUT/study.json when $OUT is
set); every generation in WORK/<setting>.jsonl. benchmarks/gsm8k_study_remote.sh runs every
stage detached on a GPU machine reached through short calls, and polls the results back.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pathlib
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

THRESHOLDS = (1.0, 0.95, 0.9, 0.8, 0.7)
SUB_BLOCKS = (4, 8, 16, 32)


def _load(path: pathlib.Path) -> dict:
  return json.loads(path.read_text()) if path.exists() else {}


@contextlib.contextmanager
def _locked(work: pathlib.Path):
  with open(work / "study.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _save(work: pathlib.Path, study: dict) -> None:
  """Merges `study` into WORK/study.json: concurrent jobs each add their own settings."""
  with _locked(work):
    merged = _load(work / "study.json")
    merged.update(study)
    study.update(merged)
    text = json.dumps(merged, indent=1)
    tmp = work / "study.json.tmp"
    tmp.write_text(text)
    tmp.replace(work / "study.json")
    if os.environ.get("OUT"):
      pathlib.Path(os.environ["OUT"], "study.json").write_text(text)


def stage_train(study, work, data_dir, steps, extra, kinds=("ar", "diffusion")):
  from dllm_jax import run_config, training

  for kind in kinds:
    key = f"train_{kind}"
    if key in study:
      if study[key].get("step") != steps:
        raise SystemExit(f"{work}/study.json holds {key} trained for {study[key].get('step')} "
                         f"steps, not --steps {steps}: use another --work to train anew")
      continue
    overrides = [f"objective.kind={kind}", f"data.source={data_dir}/train.jsonl",
                 f"data.eval_source={data_dir}/test.jsonl", f"train.steps={steps}",
                 f"train.run_dir={work}/{kind}", "train.progress=false", *extra]
    cfg = run_config.load("configs/smollm2_gsm8k.py", overrides)
    t0 = time.perf_counter()
    result = training.train(cfg)
    study[key] = dict({k: v for k, v in result.items() if isinstance(v, (int, float, str))},
                      wall_s=time.perf_counter() - t0, overrides=overrides,
                      concurrent_jobs=int(os.environ.get("DLLM_STUDY_JOBS", "1")))
    print(key, study[key], flush=True)
    _save(work, study)


def _evaluate(study, work, key, checkpoint, decode_kwargs, batch, limit, reference=None,
              jobs=1, layout="per_layer"):
  from dllm_jax import checkpoint as ckpt, convert, decoding, eval as ev, model

  if key in study:
    old = study[key]
    if (old.get("limit"), old.get("max_new_tokens"), old.get("layout", "stacked")) != (
        limit, decode_kwargs["max_new_tokens"], layout):
      raise SystemExit(f"{work}/study.json holds {key} for limit={old.get('limit')}, "
                       f"max_new_tokens={old.get('max_new_tokens')}, layout="
                       f"{old.get('layout', 'stacked')}, not limit={limit}, max_new_tokens="
                       f"{decode_kwargs['max_new_tokens']}, layout={layout}: use another --work "
                       "(or the same settings to resume)")
    return
  # bf16 weights and compute, and the kernel layout `python -m dllm_jax.eval` would pick for
  # this mode and batch (--kernel-layout auto), as a user would decode on a GPU.
  loaded = ckpt.load_model(checkpoint)
  kernel_layout = model.decode_kernel_layout(convert.cast_config(loaded.config, "bfloat16"),
                                             mode=decode_kwargs["mode"], batch=batch,
                                             stacked=layout == "stacked")
  pre = convert.cast(loaded, "bfloat16", layout, kernel_layout=kernel_layout)
  problems = ev.load_gsm8k(os.path.join(study["data_dir"], "test.jsonl"), limit)
  records, summary = ev.evaluate(pre, problems, decoding.DecodeConfig(**decode_kwargs), batch,
                                 log=lambda *a: None, layout=layout)
  gen_path = work / f"{key}.jsonl"
  with gen_path.open("w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  if reference is not None:
    ref_path = work / f"{reference}.jsonl"
    if ref_path.exists():
      summary["agreement_with_threshold_1"] = ev.agreement(
          records, [json.loads(l) for l in ref_path.read_text().splitlines() if l])
    else:
      print(f"[study] {key}: no {ref_path.name} to compare answers with (threshold 1.0 not "
            "evaluated in this --work); agreement left out", flush=True)
  summary.pop("decode", None)
  study[key] = dict(summary, limit=limit, concurrent_jobs=jobs, **decode_kwargs)
  print(key, {k: study[key][k] for k in ("accuracy", "stderr", "tokens_per_s",
                                           "tokens_per_forward")}, flush=True)
  _save(work, study)


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--data-dir", help="folder with GSM8K train.jsonl and test.jsonl")
  ap.add_argument("--work", default="runs/study")
  ap.add_argument("--base", default="smollm2-135m-instruct",
                  help="the model to fine-tune and to evaluate zero-shot (name or .gguf path)")
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--stages", default="train,speed,zeroshot,areval,diffeval")
  ap.add_argument("--limit", type=int, default=None, help="test problems (default: all 1319)")
  ap.add_argument("--speed-limit", type=int, default=128)
  ap.add_argument("--max-new-tokens", type=int, default=256)
  ap.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)))
  ap.add_argument("--sub-blocks", default=",".join(map(str, SUB_BLOCKS)))
  ap.add_argument("--layout", choices=["stacked", "per_layer"], default="per_layer",
                  help="parameter layout for decoding (dllm_jax.eval --layout)")
  ap.add_argument("--compile-cache", default=None,
                  help="JAX persistent compilation cache (default WORK/jax_cache; '' for none): "
                       "the thresholds of one sub-block size then compile once")
  ap.add_argument("--jobs", type=int, default=1,
                  help="concurrent processes for the two fine-tunes and for "
                       "zeroshot/areval/diffeval (see above)")
  ap.add_argument("--train-kinds", default="ar,diffusion",
                  help="the fine-tunes the train stage runs (with --jobs 2, side by side)")
  ap.add_argument("--set", action="append", default=[], help="extra training overrides")
  ap.add_argument("--report", help="study.json to turn into markdown and plots")
  args = ap.parse_args()
  if args.report:
    report(_load(pathlib.Path(args.report)))
    return
  if not args.data_dir:
    ap.error("--data-dir is required (a folder holding GSM8K train.jsonl and test.jsonl)")
  stages = [x for st in args.stages.split(",")
            for x in (("areval", "diffeval") if st == "eval" else (st,))]
  known = {"train", "speed", "zeroshot", "areval", "diffeval"}
  if set(stages) - known:
    ap.error(f"--stages: unknown {sorted(set(stages) - known)}; choose from {sorted(known)}")
  work = pathlib.Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  study = _load(work / "study.json")
  study["data_dir"] = args.data_dir
  cache_dir = str(work / "jax_cache") if args.compile_cache is None else args.compile_cache
  import jax

  # Overrides a JAX_COMPILATION_CACHE_DIR from the environment either way; child jobs get the
  # same directory through their --compile-cache.
  jax.config.update("jax_compilation_cache_dir", cache_dir or None)
  n = args.max_new_tokens
  thresholds = [float(t) for t in args.thresholds.split(",")]
  sub_blocks = [int(b) for b in args.sub_blocks.split(",")]
  train_kinds = args.train_kinds.split(",")
  if set(train_kinds) - {"ar", "diffusion"}:
    ap.error(f"--train-kinds: unknown {sorted(set(train_kinds) - {'ar', 'diffusion'})}; choose "
             "from ['ar', 'diffusion']")
  if "train" in stages and args.jobs > 1 and len(train_kinds) > 1:
    # One child a fine-tune: a 135M model's train step leaves the GPU room for the other's.
    common = _child(args, work, cache_dir, "--steps", str(args.steps), "--stages", "train",
                    *[x for kv in args.set for x in ("--set", kv)])
    _run_children([common + ["--train-kinds", k] for k in train_kinds], args.jobs, work, "train")
    study = _load(work / "study.json")
  elif "train" in stages:
    stage_train(study, work, args.data_dir, args.steps, [f"init.source={args.base}", *args.set],
                train_kinds)
  needs = {"ar": ("speed", "areval"), "diffusion": ("speed", "diffeval")}
  for kind, users in needs.items():
    if set(users) & set(stages) and not (work / kind).is_dir():
      ap.error(f"stages {sorted(set(users) & set(stages))} evaluate {work / kind}, which does "
               "not exist: run the train stage first (same --work)")
  if "speed" in stages:
    _evaluate(study, work, "speed_ar", str(work / "ar"), dict(mode="ar", max_new_tokens=n), 1,
              args.speed_limit, layout=args.layout)
    for th in thresholds:
      _evaluate(study, work, f"speed_diff_t{th}_s8", str(work / "diffusion"),
                dict(mode="diffusion", max_new_tokens=n, threshold=th, sub_block_size=8), 1,
                args.speed_limit, layout=args.layout)
  evals = [s for s in ("zeroshot", "areval", "diffeval") if s in stages]
  if args.jobs > 1 and evals:
    # One child per sub-block size (threshold 1.0 first: the others' agreement reads it), and
    # one for the two AR evaluations.
    common = _child(args, work, cache_dir, "--max-new-tokens", str(n), "--thresholds",
                    args.thresholds, "--layout", args.layout)
    common += ["--limit", str(args.limit)] if args.limit else []
    children = []
    ar_stages = [s for s in evals if s != "diffeval"]
    if ar_stages:
      children.append(common + ["--stages", ",".join(ar_stages)])
    if "diffeval" in evals:
      children += [common + ["--stages", "diffeval", "--sub-blocks", str(b)] for b in sub_blocks]
    _run_children(children, args.jobs, work, "eval")
    study = _load(work / "study.json")
  else:
    jobs = int(os.environ.get("DLLM_STUDY_JOBS", "1"))
    if "zeroshot" in evals:
      _evaluate(study, work, "zeroshot_ar", args.base, dict(mode="ar", max_new_tokens=n), 32,
                args.limit, jobs=jobs, layout=args.layout)
    if "areval" in evals:
      _evaluate(study, work, "ar_model_ar", str(work / "ar"), dict(mode="ar", max_new_tokens=n),
                32, args.limit, jobs=jobs, layout=args.layout)
    if "diffeval" in evals:
      for sub in sub_blocks:
        for th in sorted(thresholds, reverse=True):
          _evaluate(study, work, f"diff_t{th}_s{sub}", str(work / "diffusion"),
                    dict(mode="diffusion", max_new_tokens=n, threshold=th, sub_block_size=sub),
                    32, args.limit, reference=f"diff_t1.0_s{sub}", jobs=jobs,
                    layout=args.layout)
  _save(work, study)


def _child(args, work: pathlib.Path, cache_dir: str, *extra: str) -> list[str]:
  """The command line of one child job: this script on the same data, work folder, base model
  and compilation cache, one job itself, plus `extra`."""
  return [sys.executable, os.path.abspath(__file__), "--data-dir", args.data_dir, "--work",
          str(work), "--base", args.base, "--jobs", "1", "--compile-cache", cache_dir, *extra]


def _run_children(children: list[list[str]], jobs: int, work: pathlib.Path, what: str) -> None:
  """Runs `children` (command lines) as up to `jobs` processes at a time, each logging to
  WORK/<what><i>.log; exits naming the logs of those that failed."""
  # Children allocate as they go: JAX's default would have each (and this process, which keeps
  # its pool from the stages before) reserve most of the GPU.
  env = dict(os.environ, DLLM_STUDY_JOBS=str(min(jobs, len(children))),
             XLA_PYTHON_CLIENT_PREALLOCATE="false")
  started = []
  for i, cmd in enumerate(children):
    while sum(p.poll() is None for p, _ in started) >= jobs:
      time.sleep(1)
    log_path = work / f"{what}{i}.log"
    print("[study] starting", " ".join(cmd[2:]), "->", log_path, flush=True)
    with open(log_path, "w") as log:
      started.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT),
                      log_path))
  failed = [(p, log) for p, log in started if p.wait()]
  if failed:
    raise SystemExit(f"{len(failed)} {what} job(s) failed: " + "; ".join(
        f"exit {p.returncode}, see {log}" for p, log in failed))


DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


_DIFF_KEY = re.compile(r"^(speed_)?diff_t([0-9.]+)_s(\d+)$")


def _settings(study: dict) -> tuple[list[float], list[int]]:
  """The thresholds (high to low) and sub-block sizes that `study` holds results for."""
  found = [_DIFF_KEY.match(k) for k in study]
  ths = sorted({float(m.group(2)) for m in found if m}, reverse=True)
  subs = sorted({int(m.group(3)) for m in found if m})
  return ths, subs


def report(study: dict, plot_dir: pathlib.Path = DOCS) -> str:
  """Markdown tables for BENCHMARKS.md and the two plots under `plot_dir`.

  Settings absent from `study` show as "not run"; batch-32 tokens/s measured while other
  evaluation jobs shared the GPU carry a dagger.
  """
  def acc(s):
    return f"{s['accuracy']:.3f} ± {s['stderr']:.3f}" if s else "not run"

  def b32(s):
    if not s:
      return "not run"
    return f"{s['tokens_per_s']:.0f}" + ("†" if s.get("concurrent_jobs", 1) > 1 else "")

  def b1(s):
    return f"{s['tokens_per_s']:.0f}" if s else "not run"

  thresholds, sub_blocks = _settings(study)
  n_full = next((v["n"] for k, v in study.items() if k.startswith(("diff_", "ar_model", "zero"))),
                "?")
  n_speed = next((v["n"] for k, v in study.items() if k.startswith("speed_")), "?")
  ar_b1 = study.get("speed_ar")
  ar_speed = ar_b1["tokens_per_s"] if ar_b1 else None
  lines = [f"| model / decoding | sub-block | threshold | accuracy ± s.e. ({n_full}) | agreement "
           f"with t=1.0 | tokens per forward | batch-32 tok/s | batch-1 tok/s ({n_speed}) | "
           f"batch-1 accuracy ({n_speed}) | batch-1 speed-up vs AR |", "|" + "---|" * 10]
  zs = study.get("zeroshot_ar")
  lines.append(f"| SmolLM2-135M-Instruct zero-shot, AR | - | - | {acc(zs)} | - | 1.00 | {b32(zs)} "
               "| - | - | - |")
  ar = study.get("ar_model_ar")
  lines.append(f"| AR-SFT model, AR | - | - | {acc(ar)} | - | 1.00 | {b32(ar)} | {b1(ar_b1)} | "
               f"{acc(ar_b1)} | {'1.00' if ar_b1 else '-'} |")
  for sub in sub_blocks:
    for th in thresholds:
      s = study.get(f"diff_t{th}_s{sub}")
      sp = study.get(f"speed_diff_t{th}_s{sub}")
      if not s and not sp:
        continue
      tpf = (s or sp)["tokens_per_forward"]
      agree = s.get("agreement_with_threshold_1") if s else None
      speedup = f"{sp['tokens_per_s'] / ar_speed:.2f}" if sp and ar_speed else "-"
      lines.append(
          f"| diffusion model | {sub} | {th} | {acc(s)} | "
          f"{'-' if agree is None else f'{agree:.3f}'} | {tpf:.2f}{'' if s else ' (b1)'} | "
          f"{b32(s)} | {b1(sp) if sp else '-'} | {acc(sp) if sp else '-'} | {speedup} |")
  for kind in ("ar", "diffusion"):
    t = study.get(f"train_{kind}")
    if t:
      what = "next-token" if kind == "ar" else "masked-token"
      shared = "† (both fine-tunes shared the GPU)" if t.get("concurrent_jobs", 1) > 1 else ""
      lines.append(f"\n{kind} fine-tune: {t['step']} steps in {t['wall_s']:.0f} s{shared}, "
                   f"final train loss {t['loss']:.3f}, held-out {what} accuracy "
                   f"{t['eval_accuracy']:.3f} (GSM8K test, {t['eval_tokens']:.0f} tokens)")
  text = "\n".join(lines)
  print(text)
  try:
    _plots(study, plot_dir)
  except ImportError as e:
    print(f"no plots: {e}")
  return text


def _plots(study: dict, docs: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  docs.mkdir(parents=True, exist_ok=True)
  fig, ax = plt.subplots(figsize=(6, 4))
  thresholds, sub_blocks = _settings(study)
  for sub in sub_blocks:
    pts = [(th, study[f"diff_t{th}_s{sub}"]) for th in thresholds if f"diff_t{th}_s{sub}" in study]
    if pts:
      ax.errorbar([p[0] for p in pts], [p[1]["accuracy"] for p in pts],
                  yerr=[p[1]["stderr"] for p in pts], marker="o", capsize=3,
                  label=f"diffusion, sub-block {sub}")
  if "ar_model_ar" in study:
    a = study["ar_model_ar"]
    ax.axhline(a["accuracy"], color="k", ls="--", label="AR-SFT model, AR decoding (±2 s.e.)")
    ax.axhspan(a["accuracy"] - 2 * a["stderr"], a["accuracy"] + 2 * a["stderr"], color="k",
               alpha=0.1)
  if "zeroshot_ar" in study:
    ax.axhline(study["zeroshot_ar"]["accuracy"], color="gray", ls=":",
               label="SmolLM2 zero-shot, AR decoding")
  _finish(fig, ax, "GSM8K accuracy (full test set)", docs / "gsm8k_accuracy_vs_threshold.png")
  fig, ax = plt.subplots(figsize=(6, 4))
  for sub in sub_blocks:
    pts = [(th, study[f"speed_diff_t{th}_s{sub}"]) for th in thresholds
           if f"speed_diff_t{th}_s{sub}" in study]
    if pts:
      ax.plot([p[0] for p in pts], [p[1]["tokens_per_s"] for p in pts], marker="o",
              label=f"diffusion, sub-block {sub}")
  if "speed_ar" in study:
    ar_tps = study["speed_ar"]["tokens_per_s"]
    ax.axhline(ar_tps, color="k", ls="--", label="AR-SFT, AR decoding")
    ax.axhline(2.5 * ar_tps, color="gray", ls=":", label="2.5x AR (the issue's target)")
  _finish(fig, ax, "tokens/s at batch 1 (first 128 problems)",
          docs / "gsm8k_tokens_per_s_vs_threshold.png")


def _finish(fig, ax, ylabel: str, path: pathlib.Path) -> None:
  """Both plots: threshold falling left to right, as parallelism grows."""
  ax.set_xlabel("confidence threshold")
  ax.set_ylabel(ylabel)
  ax.invert_xaxis()
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
