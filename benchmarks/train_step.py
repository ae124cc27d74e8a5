"""Train-step throughput on one GPU: AR-SFT vs diffusion 2x(2L) vs diffusion 3L, XLA vs Pallas.

    python benchmarks/train_step.py [--shape qwen2.5-1.5b] [--seq-len 2048]
        [--variants ar:xla,2x2l:xla,3l:xla,3l:pallas] [--batches 1,2,4,8] [--remat full,dots]
        [--loss-chunk 0]

Random bf16-compute weights (float32 master copy), AdamW, the real jitted sharded train step of
`dllm_jax.training` on a one-device mesh. For every variant it tries the batch sizes from the
largest down and the remat settings in the order given, and keeps the fastest setting that fits.

Figures: real tokens/s (tokens of the data, L per row, not the noisy copies), step time per real
token relative to AR-SFT, and MFU: model FLOPs actually executed (matmuls of every processed token,
the LM head only where logits are taken, attention over allowed pairs only; backward = 2x forward;
remat recompute not counted) over the bf16 matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ceilings, error_text, run_meta, save_json  # noqa: E402
from benchmarks.decode import SHAPES  # noqa: E402
from dllm_jax.config import KERNEL_LAYOUTS  # noqa: E402


def model_flops_per_row(cfg, seq_len: int, kind: str, layout: str, block: int) -> float:
  """Forward+backward FLOPs of one row of L data tokens under the objective's layout."""
  e, f, h, k, d, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                      cfg.head_dim, cfg.vocab_size)
  per_token_layer = 2 * (e * h * d + 2 * e * k * d + h * d * e + 3 * e * f)
  n_blocks = seq_len // block
  causal_pairs = seq_len * (seq_len + 1) / 2
  block_causal_pairs = block * block * n_blocks * (n_blocks + 1) / 2
  # Noisy block b sees its own block and the b earlier clean blocks.
  noisy_pairs = block * block * n_blocks + block * block * n_blocks * (n_blocks - 1) / 2
  if kind == "ar":
    rows, tokens, logit_tokens, pairs = 1, seq_len, seq_len, causal_pairs
  elif layout == "3l":
    rows, tokens, logit_tokens = 1, 3 * seq_len, 2 * seq_len
    pairs = 2 * noisy_pairs + block_causal_pairs
  else:  # 2x2l: two rows of [noisy ; clean]
    rows, tokens, logit_tokens = 2, 2 * seq_len, seq_len
    pairs = noisy_pairs + block_causal_pairs
  attn = 4 * pairs * h * d * cfg.num_layers
  fwd = tokens * per_token_layer * cfg.num_layers + logit_tokens * 2 * e * v + attn
  return 3 * rows * fwd


def run(shape, seq_len, variants, batches, remats, steps, loss_chunk=0,
        kernel_layout="in_out"):
  import jax
  import numpy as np

  from dllm_jax import objective, sharding, training
  from dllm_jax.config import TrainConfig

  res = {"meta": run_meta(), "ceil": ceilings(), "rows": [], "shape": shape, "seq_len": seq_len,
         "loss_chunk": loss_chunk, "kernel_layout": kernel_layout}
  print("ceilings", res["ceil"], flush=True)
  save_json("train_step.json", res)
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1)
  base = dataclasses.replace(SHAPES[shape], param_dtype="float32", dtype="bfloat16",
                             kernel_layout=kernel_layout)
  rng = np.random.default_rng(0)
  for variant in variants:
    layout, impl = variant.split(":")
    kind = "ar" if layout == "ar" else "diffusion"
    obj = objective.ObjectiveConfig(kind=kind, layout="3l" if kind == "ar" else layout,
                                    loss_chunk=loss_chunk)
    best = None
    for remat in remats:
      for b in sorted(batches, reverse=True):
        cfg = dataclasses.replace(base, remat=remat, attention_impl=impl)
        tcfg = TrainConfig(steps=1000, learning_rate=1e-5)
        row = {"variant": variant, "remat": remat, "batch": b}
        try:
          tx = training.make_optimizer(tcfg)
          sh, _ = training.state_shardings(cfg, tx, mesh)
          state = training.init_state(None, cfg, tx, 0, sh)
          step = training.make_train_step(cfg, obj, tcfg, tx, mesh, sh)
          # Half prompt, half response: the response is what gets noised.
          tokens = rng.integers(0, 32000, (b, seq_len), dtype=np.int32)
          loss_mask = np.zeros((b, seq_len), bool)
          loss_mask[:, seq_len // 2:] = True
          segments = np.ones((b, seq_len), np.int32)
          batch = training.shard_batch({"tokens": tokens, "loss_mask": loss_mask,
                                        "segments": segments}, 1, mesh)
          t0 = time.perf_counter()
          state, m = step(state, batch)
          jax.block_until_ready(m)
          row["compile_and_first_s"] = time.perf_counter() - t0
          state, m = step(state, batch)
          jax.block_until_ready(m)
          t0 = time.perf_counter()
          for _ in range(steps):
            state, m = step(state, batch)
          jax.block_until_ready(m)
          dt = (time.perf_counter() - t0) / steps
          row.update(step_s=dt, loss=float(m["loss"]), real_tokens_per_s=b * seq_len / dt)
          flops = b * model_flops_per_row(cfg, seq_len, kind, obj.layout, obj.block_size)
          row["tflops"] = flops / dt / 1e12
          row["mfu"] = row["tflops"] / res["ceil"]["matmul_tflops"]
          del state, step
        except Exception as e:  # out of memory or unsupported: record and try a smaller batch
          row["error"] = error_text(e, 200)
          print(json.dumps(row), flush=True)
          res["rows"].append(row)
          continue
        print(json.dumps(row), flush=True)
        res["rows"].append(row)
        save_json("train_step.json", res)
        if best is None or row["real_tokens_per_s"] > best["real_tokens_per_s"]:
          best = row
        break  # the largest batch that fits for this remat setting
    if best:
      best = dict(best, best=True)
      res["rows"].append(best)
  save_json("train_step.json", res)
  return res


def report(res) -> str:
  best = [r for r in res["rows"] if r.get("best")]
  ar = next((r for r in best if r["variant"].startswith("ar:")), None)
  m = res["meta"]
  lines = [f"{res['shape']}, L={res['seq_len']}; device {m['device']}, jax {m['jax']}, "
           f"{m['date']}; bf16 matmul {res['ceil']['matmul_tflops']:.0f} TFLOP/s", "",
           "| variant | remat | batch | step s | real tok/s | time per real token vs AR | "
           "TFLOP/s | MFU |", "|" + "---|" * 8]
  for r in best:
    rel = (ar["real_tokens_per_s"] / r["real_tokens_per_s"]) if ar else float("nan")
    lines.append(f"| {r['variant']} | {r['remat']} | {r['batch']} | {r['step_s']:.3f} | "
                 f"{r['real_tokens_per_s']:.0f} | {rel:.2f} | {r['tflops']:.0f} | "
                 f"{r['mfu']:.1%} |")
  text = "\n".join(lines)
  print(text)
  return text


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
  ap.add_argument("--seq-len", type=int, default=2048)
  ap.add_argument("--variants", default="ar:xla,2x2l:xla,3l:xla,3l:pallas")
  ap.add_argument("--batches", default="1,2,4,8")
  ap.add_argument("--remat", default="full")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--loss-chunk", type=int, default=0, help="objective.loss_chunk (0: no chunks)")
  ap.add_argument("--kernel-layout", default="in_out", choices=KERNEL_LAYOUTS,
                  help="model.kernel_layout: the projection kernels [*in, *out] or [*out, *in]")
  args = ap.parse_args()
  res = run(args.shape, args.seq_len, args.variants.split(","),
            [int(b) for b in args.batches.split(",")], args.remat.split(","), args.steps,
            args.loss_chunk, args.kernel_layout)
  report(res)


if __name__ == "__main__":
  main()
