"""Decode speed at the paper's shapes (random bf16 weights, one GPU), beside its floors and a peer.

    python benchmarks/decode.py --part jax   [--shapes qwen2.5-1.5b,qwen2.5-7b]
        [--impls xla,pallas] [--layouts stacked,per_layer]
    python benchmarks/decode.py --part peer  [--shapes ...]   # transformers generate (PyTorch)
    python benchmarks/decode.py --part report                 # markdown from $OUT/*.json

The parts run as separate processes so that JAX's and PyTorch's allocators never share the GPU;
run all three in one device call so that every ratio compares figures of the same machine.

jax part: the device's copy bandwidth and matmul rate; AR decoding (our `generate(mode="ar")`,
one compiled program) of 256 new tokens after a 512-token prompt at batch 1, 8, 32, beside the
weight-read floor (parameter bytes / copy bandwidth per step); the time of one forward of a
32-token block and of an 8-token sub-block against the cache (in a jitted loop of them, as the
decoder runs them: `forward_loop`); and the diffusion decoder's real
time per forward (whole `generate(mode="diffusion")` over its forward count) with and without
the DualCache.
peer part: transformers `generate` (greedy, 256 new tokens forced) eager and with
`cache_implementation="static"` (compiled forward), and one eager 32-token block forward against
a 512-token cache: what the authors' decoder pays per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (add_decode_model_arguments, apply_decode_model_arguments,  # noqa: E402
                               ceilings, error_text, random_params, run_meta, save_json, timeit)
from dllm_jax import run_config  # noqa: E402
from dllm_jax.config import ModelConfig  # noqa: E402

PROMPT, NEW = 512, 256
SHAPES = {
    "qwen2.5-1.5b": ModelConfig(architecture="qwen2", vocab_size=151936, hidden_size=1536,
                                intermediate_size=8960, num_layers=28, num_heads=12,
                                num_kv_heads=2, head_dim=128, qkv_bias=True, tie_embeddings=True,
                                rope_theta=1e6, max_position_embeddings=32768,
                                mask_token_id=151665, param_dtype="bfloat16", dtype="bfloat16",
                                attention_impl="xla"),
    "qwen2.5-7b": ModelConfig(architecture="qwen2", vocab_size=152064, hidden_size=3584,
                              intermediate_size=18944, num_layers=28, num_heads=28,
                              num_kv_heads=4, head_dim=128, qkv_bias=True, tie_embeddings=False,
                              rope_theta=1e6, max_position_embeddings=32768, mask_token_id=151665,
                              param_dtype="bfloat16", dtype="bfloat16", attention_impl="xla"),
}

# The GSM8K study's model, shape from its config (one source), at the decoding dtype and with the
# other shapes' runtime settings; its mask id is any valid token (random weights).
SHAPES["smollm2-135m"] = dataclasses.replace(
    run_config.load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "configs", "smollm2_gsm8k.py"), []).model,
    param_dtype="bfloat16", mask_token_id=49151, attention_impl="xla", remat=ModelConfig().remat)


FORWARDS = 32  # forwards of one timed loop (`forward_loop`)


def forward_loop(cfg, params, batch, t_len, offset, n, per_layer):
  """run(i): n forwards of t_len tokens at positions offset.. (block-causal, blocks of 32: a
  diffusion block or sub-block) against a fresh cache of PROMPT + 32 slots, in one jitted loop,
  each forward's tokens the previous one's argmax, as the diffusion decoder calls the model.
  Compiled here; run.hlo_text() is the compiled program's HLO (`common.hlo_kernel_ops`).

  One loop, not one jitted call a forward: a call of its own also pays the host's dispatch of
  every parameter, which the decoder's loop never does (session 18: a 1.5B sub-block forward
  took 2.61 ms a call and 1.58 ms in a loop)."""
  import jax
  import jax.numpy as jnp

  from dllm_jax import cache as kvcache
  from dllm_jax import masks, model

  spec = masks.MaskSpec("block_causal", block_size=32)
  meta = masks.TokenMeta.simple(jnp.broadcast_to(
      jnp.arange(offset, offset + t_len, dtype=jnp.int32), (batch, t_len)))
  toks = jax.random.randint(jax.random.key(4), (batch, t_len), 0, 32000)

  @jax.jit
  def loop(p, toks):
    c = kvcache.init_cache(cfg, batch, PROMPT + 32, per_layer=per_layer)

    def body(_, carry):
      toks, c = carry
      logits, c = model.forward(p, cfg, toks, meta, spec, c)
      return jnp.argmax(logits, -1).astype(toks.dtype), c
    return jax.lax.fori_loop(0, n, body, (toks, c))[0]
  compiled = loop.lower(params, toks).compile()
  run = lambda i: compiled(params, (toks + i) % 32000)
  run.hlo_text = compiled.as_text
  return run


def _safe(fn):
  try:
    return fn()
  except Exception as e:  # an OOM or unsupported setting is recorded, and the run goes on
    return f"failed: {error_text(e, 200)}"


def jax_part(shapes, batches, impls, diffusion_batches, layouts=("stacked",),
             matvecs=("xla",), kernel_layout="auto", measure=("ar", "forwards")):
  """kernel_layout "auto": the AR, and the forwards with the diffusion decoder, each run in
  `model.decode_kernel_layout`'s for their mode (out_in where the one-row kernels run), as
  `decode.py` decodes. measure: which of the AR decoder and the block / sub-block forwards
  each row times (the diffusion decoder runs at `diffusion_batches`); each compiles programs of
  its own, which a short device call may not have time for."""
  import jax
  import jax.numpy as jnp

  from dllm_jax import decoding, model

  # argv says which variant ran (a --plain-dot run writes the same file name as the default).
  res = {"meta": dict(run_meta(), argv=sys.argv[1:]), "ceil": ceilings(), "rows": []}
  print("ceilings", res["ceil"], flush=True)
  save_json("decode_jax.json", res)
  bw = res["ceil"]["copy_GBps"] * 1e9
  for name in shapes:
    # The same weights for every variant, each layout made once (attention_impl is not a
    # parameter).
    base = dataclasses.replace(
        SHAPES[name], kernel_layout="in_out" if kernel_layout == "auto" else kernel_layout)
    stacked = jax.jit(lambda r: random_params(base, r))(jax.random.key(0))
    by_layout = {"stacked": stacked}
    if "per_layer" in layouts:
      by_layout["per_layer"] = jax.jit(model.unstack_layers)(stacked)
    for impl, layout, mv in [(i, l, m) for i in impls for l in layouts for m in matvecs]:
      cfg = dataclasses.replace(base, attention_impl=impl, matvec_impl=mv)
      params = by_layout[layout]
      pbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
      floor_step = pbytes / bw
      for b in batches:
        row = {"shape": name, "impl": impl, "layout": layout, "matvec": mv, "batch": b,
               "kernel_layout": base.kernel_layout,
               "param_bytes": pbytes,
               "floor_tokens_per_s": b / floor_step}
        prompt = jax.random.randint(jax.random.key(1), (b, PROMPT), 0, 32000)
        lens = jnp.full((b,), PROMPT, jnp.int32)

        def run_generate(dcfg, params=params, cfg=cfg):
          fn = jax.jit(lambda p, t, l, r: decoding.generate(p, cfg, t, l, r, dcfg))
          t0 = time.perf_counter()
          compiled = fn.lower(params, prompt, lens, jax.random.key(2)).compile()
          compile_s = time.perf_counter() - t0
          out = jax.block_until_ready(compiled(params, prompt, lens, jax.random.key(2)))
          times = []
          for i in range(3):
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(params, prompt, lens, jax.random.key(3 + i)))
            times.append(time.perf_counter() - t0)
          tokens, nfe = int(out[1].sum()), int(out[2]["total_nfe"])
          return {"s": statistics.median(times), "tokens": tokens, "nfe": nfe,
                  "iterations": int(out[2]["iterations"]), "compile_s": compile_s}

        def in_layout(mode):
          """(params, cfg) in the layout `mode` decodes in (row[mode + "_kernel_layout"]): a
          transposed copy where auto picks the other one."""
          chosen = base.kernel_layout
          if kernel_layout == "auto":
            chosen = model.decode_kernel_layout(cfg, mode=mode, batch=b,
                                                stacked=layout == "stacked")
          row[f"{mode}_kernel_layout"] = chosen
          return model.with_kernel_layout(params, cfg, chosen)

        def run_ar():
          return run_generate(decoding.DecodeConfig(mode="ar", max_new_tokens=NEW),
                              *in_layout("ar"))

        if "ar" in measure:
          ar = _safe(run_ar)
          row["ar"] = ar
          if isinstance(ar, dict):
            row["ar_tokens_per_s"] = ar["tokens"] / ar["s"]
            row["ar_vs_floor"] = row["floor_tokens_per_s"] / row["ar_tokens_per_s"]

        # The forwards' and the diffusion decoder's (a copy of the weights only where used).
        timed = "forwards" in measure or b in diffusion_batches
        dp, dc = in_layout("diffusion") if timed else (None, None)

        # One forward of a 32-token block / an 8-token sub-block against a 512-token cache,
        # in a loop of FORWARDS.
        def step_time(t_len, offset):
          run = forward_loop(dc, dp, b, t_len, offset, FORWARDS, layout != "stacked")
          return timeit(run, [(0,), (1,)], reps=5, inner=1) / FORWARDS

        if "forwards" in measure:
          row["block32_forward_s"] = _safe(lambda: step_time(32, PROMPT))
          row["sub8_forward_s"] = _safe(lambda: step_time(8, PROMPT + 8))
        for dual in ((True, False) if b in diffusion_batches else ()):
          key = "diffusion_dual" if dual else "diffusion_nodual"
          d = _safe(lambda: run_generate(decoding.DecodeConfig(
              mode="diffusion", max_new_tokens=NEW, threshold=1.0, use_dual_cache=dual),
              dp, dc))
          row[key] = d
          if isinstance(d, dict):
            row[key + "_s_per_forward_round"] = d["s"] / d["iterations"]
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        save_json("decode_jax.json", res)
        dp = dc = None  # (a transposed copy: not held into the next batch)
      # Drop this variant's weights: the closures' defaults and cells hold them too.
      params = run_generate = run_ar = step_time = in_layout = None
    del stacked, by_layout
  return res


def peer_part(shapes, batches, modes):
  import torch
  import transformers

  res = {"meta": {"torch": torch.__version__, "transformers": transformers.__version__,
                  "device": torch.cuda.get_device_name()}, "rows": []}
  for name in shapes:
    c = SHAPES[name]
    qwen = c.architecture == "qwen2"
    hf_cfg = (transformers.Qwen2Config if qwen else transformers.LlamaConfig)(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_embeddings, max_position_embeddings=4096)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
      m = (transformers.Qwen2ForCausalLM if qwen else transformers.LlamaForCausalLM)(hf_cfg).eval()
    torch.set_default_dtype(torch.float32)

    def sync_time(fn, reps):
      fn()
      times = []
      for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
      return statistics.median(times)

    for b in batches:
      ids = torch.randint(0, 32000, (b, PROMPT), device="cuda")
      row = {"shape": name, "batch": b}
      for mode in modes:
        kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                      attention_mask=torch.ones_like(ids))
        if mode == "static":
          kwargs["cache_implementation"] = "static"

        def gen():
          with torch.inference_mode():
            m.generate(ids, **kwargs)

        t = _safe(lambda: sync_time(gen, 2))
        row[mode] = t if isinstance(t, str) else {"s": t, "tokens_per_s": b * NEW / t}
      # One eager block forward of 32 tokens against a 512-token cache, as the authors' decoder.
      def block_forward():
        with torch.inference_mode():
          out = m(ids, use_cache=True)
          past = out.past_key_values
          blk = torch.randint(0, 32000, (b, 32), device="cuda")

          def step():
            m(blk, past_key_values=past, use_cache=False)
            # transformers' cache objects grow in place even without use_cache: keep it at the
            # prompt so every timed forward sees a 512-token cache.
            if hasattr(past, "crop"):
              past.crop(PROMPT)

          step()
          torch.cuda.synchronize()
          t0 = time.perf_counter()
          for _ in range(10):
            step()
          torch.cuda.synchronize()
          return (time.perf_counter() - t0) / 10

      row["block32_forward_s"] = _safe(block_forward)
      res["rows"].append(row)
      print(json.dumps(row), flush=True)
      save_json("decode_peer.json", res)
    del m
    torch.cuda.empty_cache()
  return res


def report(out_dir):
  ours = json.load(open(os.path.join(out_dir, "decode_jax.json")))
  peer_path = os.path.join(out_dir, "decode_peer.json")
  peer = json.load(open(peer_path)) if os.path.exists(peer_path) else {"rows": []}
  pr = {(r["shape"], r["batch"]): r for r in peer["rows"]}
  m = ours["meta"]
  lines = [f"device {m['device']}, jax {m['jax']}, {m['date']}; copy "
           f"{ours['ceil']['copy_GBps']:.0f} GB/s, bf16 matmul {ours['ceil']['matmul_tflops']:.0f} "
           f"TFLOP/s; XLA_FLAGS={m.get('xla_flags', '')!r}; peer: {peer.get('meta', {})}",
           "",
           "| shape | attn | layers | matvec | batch | AR tok/s | floor tok/s | floor/AR | "
           "peer eager tok/s | peer static tok/s | ours/peer static | block32 fwd ms | sub8 fwd "
           "ms | peer block32 fwd ms | diff. s/round dual | diff. s/round no-dual |",
           "|" + "---|" * 16]

  def f(x, scale=1.0, d=1):
    return f"{x * scale:.{d}f}" if isinstance(x, (int, float)) else "n/a"

  for r in ours["rows"]:
    p = pr.get((r["shape"], r["batch"]), {})
    eager = p.get("eager", {}) if isinstance(p.get("eager"), dict) else {}
    static = p.get("static", {}) if isinstance(p.get("static"), dict) else {}
    ours_tps = r.get("ar_tokens_per_s")
    ratio = ours_tps / static["tokens_per_s"] if ours_tps and static else None
    lines.append(
        f"| {r['shape']} | {r['impl']} | {r.get('layout', 'stacked')} | "
        f"{r.get('matvec', 'xla')} | {r['batch']} | "
        f"{f(ours_tps)} | "
        f"{f(r['floor_tokens_per_s'])} | {f(r.get('ar_vs_floor'), d=2)} | "
        f"{f(eager.get('tokens_per_s'))} | {f(static.get('tokens_per_s'))} | {f(ratio, d=2)} | "
        f"{f(r.get('block32_forward_s'), 1e3, 2)} | {f(r.get('sub8_forward_s'), 1e3, 2)} | "
        f"{f(p.get('block32_forward_s'), 1e3, 2)} | "
        f"{f(r.get('diffusion_dual_s_per_forward_round'), 1e3, 2)} | "
        f"{f(r.get('diffusion_nodual_s_per_forward_round'), 1e3, 2)} |")
  text = "\n".join(lines)
  print(text)
  return text


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--part", choices=["jax", "peer", "report"], required=True)
  ap.add_argument("--shapes", default="qwen2.5-1.5b,qwen2.5-7b")
  ap.add_argument("--batches", default="1,8,32")
  ap.add_argument("--impls", default="xla", help="attention impls for the jax part: xla,pallas")
  ap.add_argument("--diffusion-batches", default="1,32",
                  help="batches at which the whole diffusion decoder is timed")
  ap.add_argument("--layouts", default="stacked,per_layer",
                  help="parameter layouts for the jax part: stacked,per_layer (per_layer: "
                       "model.unstack_layers, one buffer per layer and no scan)")
  ap.add_argument("--matvecs", default="xla",
                  help="model.matvec_impl values for the jax part: xla,pallas (the one-row "
                       "projections, kernels/matvec.py)")
  ap.add_argument("--peer-modes", default="eager,static")
  add_decode_model_arguments(ap, "jax part: ")
  ap.add_argument("--measure", default="ar,forwards",
                  help="jax part: what each row times, of ar (the AR decoder) and forwards "
                       "(one block and one sub-block forward in a loop); the diffusion decoder "
                       "runs at --diffusion-batches (empty: none). Each compiles its own "
                       "programs: leave out what a short device call does not need")
  args = ap.parse_args()
  measure = [m for m in args.measure.split(",") if m]
  unknown = set(measure) - {"ar", "forwards"}
  if unknown:
    ap.error(f"--measure: unknown {sorted(unknown)}; known: ar, forwards")
  apply_decode_model_arguments(ap, args)
  shapes = [s for s in args.shapes.split(",") if s]
  unknown = set(shapes) - set(SHAPES)
  if unknown:
    ap.error(f"unknown shapes {sorted(unknown)}; known: {sorted(SHAPES)}")
  batches = [int(b) for b in args.batches.split(",")]
  bad_layouts = set(args.layouts.split(",")) - {"stacked", "per_layer"}
  if bad_layouts:
    ap.error(f"--layouts: unknown {sorted(bad_layouts)}; known: stacked, per_layer")
  if args.part == "jax":
    jax_part(shapes, batches, args.impls.split(","),
             [int(b) for b in args.diffusion_batches.split(",") if b],
             args.layouts.split(","), args.matvecs.split(","), args.kernel_layout, measure)
  elif args.part == "peer":
    peer_part(shapes, batches, args.peer_modes.split(","))
  else:
    report(os.environ.get("OUT", "."))


if __name__ == "__main__":
  main()
