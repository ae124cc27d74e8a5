"""Train-step throughput: AR-SFT vs diffusion 2x(2L) vs diffusion 3L, XLA vs Pallas, on one GPU
or sharded over several.

    python benchmarks/train_step.py [--shape qwen2.5-1.5b] [--seq-len 2048]
        [--variants ar:xla,2x2l:xla,3l:xla,3l:pallas] [--batches 1,2,4,8] [--remat full,dots]
        [--loss-chunk 0] [--devices 1] [--mesh data=1,fsdp=-1,tensor=1]

Random bf16-compute weights (float32 master copy), AdamW, the real jitted sharded train step of
`dllm_jax.training`. For every variant it tries the batch sizes from the largest down and the
remat settings in the order given, and keeps the fastest setting that fits.

Several GPUs (#8): `--devices 1,2,4,8` runs every variant on a mesh of the first N devices for
each N, of the sizes `--mesh` gives (default FSDP over all N). `--batches` are rows per batch
shard (mesh data x fsdp): the batch per GPU stays constant as N grows, so the per-device figures
compare directly, and `scaling` is a device count's real tokens/s per device over one device's
(same variant, same run).

Figures: real tokens/s (tokens of the data, L per row, not the noisy copies), and per device; step
time per real token relative to AR-SFT; MFU: model FLOPs actually executed (matmuls of every
processed token, the LM head on the L positions a row whose logits the loss takes, attention
over allowed pairs only; backward = 2x forward; remat recompute not counted) per device over the
bf16 matmul rate of one device measured in the same run; the compiled step's memory per device
(the compiler's own analysis: state, batch, temporaries, less what the donated state reuses).
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
    rows, tokens, pairs = 1, seq_len, causal_pairs
  elif layout == "3l":
    rows, tokens = 1, 3 * seq_len
    pairs = 2 * noisy_pairs + block_causal_pairs
  else:  # 2x2l: two rows of [noisy ; clean]
    rows, tokens = 2, 2 * seq_len
    pairs = noisy_pairs + block_causal_pairs
  attn = 4 * pairs * h * d * cfg.num_layers
  # The head runs on L positions under every objective (diffusion: each position in the one
  # noisy copy where it takes the loss).
  fwd = rows * (tokens * per_token_layer * cfg.num_layers + attn) + seq_len * 2 * e * v
  return 3 * fwd


def parse_mesh(text: str) -> dict:
  """'data=1,fsdp=-1,tensor=1' -> {"data": 1, "fsdp": -1, "tensor": 1} (sizes, -1: the rest)."""
  sizes = {"data": 1, "fsdp": 1, "tensor": 1}
  for part in filter(None, text.split(",")):
    name, _, value = part.partition("=")
    if name not in sizes or not value.lstrip("-").isdigit():
      raise ValueError(f"--mesh {text!r}: expected data=D,fsdp=F,tensor=T (integers, one of "
                       f"them may be -1), got {part!r}")
    sizes[name] = int(value)
  return sizes


def compiled_bytes(compiled) -> int:
  """A compiled step's memory per device: its arguments, outputs and temporaries, less the
  outputs that reuse the donated state's buffers."""
  mem = compiled.memory_analysis()
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)


def run(shape, seq_len, variants, batches, remats, steps, loss_chunk=0,
        kernel_layout="in_out", devices=(1,), mesh_sizes=None):
  import jax
  import numpy as np

  from dllm_jax import objective, sharding, training
  from dllm_jax.config import TrainConfig

  mesh_sizes = mesh_sizes or {"data": 1, "fsdp": -1, "tensor": 1}
  res = {"meta": run_meta(), "ceil": ceilings(), "rows": [], "shape": shape, "seq_len": seq_len,
         "loss_chunk": loss_chunk, "kernel_layout": kernel_layout, "mesh_sizes": mesh_sizes,
         "device_count": jax.device_count()}
  print("ceilings", res["ceil"], flush=True)
  save_json("train_step.json", res)
  base = dataclasses.replace(SHAPES[shape], param_dtype="float32", dtype="bfloat16",
                             kernel_layout=kernel_layout)
  rng = np.random.default_rng(0)
  for n in devices:
    if n > jax.device_count():
      row = {"devices": n, "error": f"{n} devices asked for, {jax.device_count()} present"}
      print(json.dumps(row), flush=True)
      res["rows"].append(row)
      continue
    mesh = sharding.make_mesh(**mesh_sizes, devices=jax.devices()[:n])
    shards = sharding.batch_divisor(mesh)
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
          rows = b * shards
          row = {"variant": variant, "remat": remat, "devices": n, "mesh": dict(mesh.shape),
                 "batch_per_shard": b, "batch": rows}
          try:
            tx = training.make_optimizer(tcfg)
            sh, _ = training.state_shardings(cfg, tx, mesh)
            state = training.init_state(None, cfg, tx, 0, sh)
            step = training.make_train_step(cfg, obj, tcfg, tx, mesh, sh)
            # Half prompt, half response: the response is what gets noised.
            tokens = rng.integers(0, 32000, (rows, seq_len), dtype=np.int32)
            loss_mask = np.zeros((rows, seq_len), bool)
            loss_mask[:, seq_len // 2:] = True
            segments = np.ones((rows, seq_len), np.int32)
            batch = training.shard_batch({"tokens": tokens, "loss_mask": loss_mask,
                                          "segments": segments}, 1, mesh)
            t0 = time.perf_counter()
            step = step.lower(state, batch).compile()  # (once: its memory, then its steps)
            row["compiled_gib_per_device"] = compiled_bytes(step) / 2 ** 30
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
            row.update(step_s=dt, loss=float(m["loss"]), real_tokens_per_s=rows * seq_len / dt)
            row["real_tokens_per_s_per_device"] = row["real_tokens_per_s"] / n
            flops = rows * model_flops_per_row(cfg, seq_len, kind, obj.layout, obj.block_size)
            row["tflops"] = flops / dt / 1e12
            row["mfu"] = row["tflops"] / n / res["ceil"]["matmul_tflops"]
            del state, step
          except Exception as e:  # out of memory or unsupported: record, try a smaller batch
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
        res["rows"].append(dict(best, best=True))
  save_json("train_step.json", res)
  return res


def report(res) -> str:
  best = [r for r in res["rows"] if r.get("best")]
  m = res["meta"]
  lines = [f"{res['shape']}, L={res['seq_len']}; device {m['device']}, jax {m['jax']}, "
           f"{m['date']}; bf16 matmul {res['ceil']['matmul_tflops']:.0f} TFLOP/s a device", "",
           "| variant | devices | mesh | remat | batch | step s | real tok/s | per device | "
           "scaling | time per real token vs AR | TFLOP/s | MFU | GiB a device |",
           "|" + "---|" * 13]
  for r in best:
    n = r.get("devices", 1)
    ar = next((a for a in best if a["variant"].startswith("ar:") and a.get("devices", 1) == n),
              None)
    one = next((o for o in best if o["variant"] == r["variant"] and o.get("devices", 1) == 1),
               None)
    per_device = r["real_tokens_per_s"] / n
    rel = (ar["real_tokens_per_s"] / r["real_tokens_per_s"]) if ar else float("nan")
    scaling = per_device / one["real_tokens_per_s"] if one else float("nan")
    mesh = "x".join(f"{k}{v}" for k, v in r.get("mesh", {}).items() if v > 1) or "1"
    gib = r.get("compiled_gib_per_device", float("nan"))
    lines.append(f"| {r['variant']} | {n} | {mesh} | {r['remat']} | {r['batch']} | "
                 f"{r['step_s']:.3f} | {r['real_tokens_per_s']:.0f} | {per_device:.0f} | "
                 f"{scaling:.1%} | {rel:.2f} | {r['tflops']:.0f} | {r['mfu']:.1%} | {gib:.1f} |")
  text = "\n".join(lines)
  print(text)
  return text


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
  ap.add_argument("--seq-len", type=int, default=2048)
  ap.add_argument("--variants", default="ar:xla,2x2l:xla,3l:xla,3l:pallas")
  ap.add_argument("--batches", default="1,2,4,8",
                  help="rows per batch shard (mesh data x fsdp): per GPU under FSDP")
  ap.add_argument("--remat", default="full")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--loss-chunk", type=int, default=0, help="objective.loss_chunk (0: no chunks)")
  ap.add_argument("--kernel-layout", default="in_out", choices=KERNEL_LAYOUTS,
                  help="model.kernel_layout: the projection kernels [*in, *out] or [*out, *in]")
  ap.add_argument("--devices", default="1",
                  help="device counts, each run on the first N devices (e.g. 1,2,4,8)")
  ap.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1",
                  help="mesh sizes over each device count (one of them may be -1: the rest)")
  args = ap.parse_args()
  try:
    mesh_sizes = parse_mesh(args.mesh)
  except ValueError as e:
    ap.error(str(e))
  res = run(args.shape, args.seq_len, args.variants.split(","),
            [int(b) for b in args.batches.split(",")], args.remat.split(","), args.steps,
            args.loss_chunk, args.kernel_layout, [int(n) for n in args.devices.split(",")],
            mesh_sizes)
  report(res)


if __name__ == "__main__":
  main()
