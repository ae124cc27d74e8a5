"""Which GEMM XLA compiled for each product of a one-row decode step, with its tiling.

    python benchmarks/xla_gemm_config.py [--shapes qwen2.5-1.5b]

`kernels/matvec.py` streams the weights of a one-row product more slowly than XLA's own GEMM
does for the gate/up pair (BENCHMARKS.md, session 17); this reads XLA's choice off the compiled
step instead of guessing it: every fusion of the optimised HLO (`compiled.as_text()`) whose
backend config names a GEMM, with its dot's operand shapes and the config (Triton's block sizes,
split-K, stages and warps, or a cuBLAS call). One layer of the shape (per-layer layout, random
bf16 weights), one token against a 512-slot cache, `matvec_impl="xla"`. JSON to
$OUT/xla_gemm_config.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import run_meta, save_json  # noqa: E402
from benchmarks.decode import SHAPES  # noqa: E402
from dllm_jax import cache as kvcache  # noqa: E402
from dllm_jax import masks, model  # noqa: E402


def _is_gemm(line: str, cfg) -> bool:
  """A GEMM's backend config: a Triton GEMM fusion (its kind names a gemm) or a cuBLAS call.
  Matching the words anywhere in the line also listed other fusions whose names or configs
  mention Triton (their native-emitter configs, session 18)."""
  if isinstance(cfg, dict):
    return ("gemm" in cfg.get("fusion_backend_config", {}).get("kind", "")
            or "gemm_backend_config" in cfg)
  # A config that did not parse as JSON (more than the config matched): the same tests on text.
  return "cublas" in line or bool(re.search(r'"kind":\s*"[^"]*gemm|gemm_backend_config', line))


def gemms(hlo: str) -> list[dict]:
  """Each instruction of `hlo` whose backend config is a GEMM's: its name, the shapes in its
  line, and the config (JSON, parsed where it parses)."""
  found = []
  for line in hlo.splitlines():
    if "backend_config=" not in line:
      continue
    m = re.search(r"backend_config=(\{.*\})", line)
    cfg = m.group(1) if m else ""
    try:
      cfg = json.loads(cfg)
    except ValueError:
      pass
    if not _is_gemm(line, cfg):
      continue
    found.append({"name": line.split("=")[0].strip(),
                  "shapes": re.findall(r"\w+\[[\d,]*\]", line)[:6], "backend_config": cfg})
  return found


def summary(cfg) -> str:
  """The tiling of a fusion's backend config in one line: the Triton fusion's kind, stages,
  warps, whether TMA is allowed and its output tiles (the config's own JSON otherwise)."""
  if not isinstance(cfg, dict):
    return str(cfg)[:200]
  fusion = cfg.get("fusion_backend_config", {})
  block = fusion.get("block_level_fusion_config") or fusion.get("triton_gemm_config")
  if not block:
    return json.dumps(fusion or cfg)[:200]
  keep = ("num_stages", "num_warps", "is_tma_allowed", "block_m", "block_n", "block_k", "split_k")
  tiles = [t.get("sizes") for t in block.get("output_tiles", [])]
  return f"{fusion.get('kind')} {({k: block[k] for k in keep if k in block})} tiles {tiles}"


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shapes", default="qwen2.5-1.5b")
  args = ap.parse_args()
  res = {"meta": run_meta(), "shapes": {}}
  for name in args.shapes.split(","):
    cfg = dataclasses.replace(SHAPES[name], num_layers=1, matvec_impl="xla",
                              attention_impl="pallas")
    params = jax.jit(lambda r: model.with_layout(model.init_params(cfg, r), "per_layer"))(
        jax.random.key(0))
    cache = kvcache.init_cache(cfg, 1, 512, per_layer=True)
    meta = masks.TokenMeta.simple(jnp.full((1, 1), 300, jnp.int32))
    fwd = jax.jit(model.forward, static_argnums=(1, 4))
    hlo = fwd.lower(params, cfg, jnp.ones((1, 1), jnp.int32), meta, masks.MaskSpec("causal"),
                    cache).compile().as_text()
    res["shapes"][name] = found = gemms(hlo)
    print(f"## {name}: {len(found)} instructions with a GEMM-like backend config")
    for g in found:
      print(f"  {g['name']}: {g['shapes']} {summary(g['backend_config'])}")
  save_json("xla_gemm_config.json", res)


if __name__ == "__main__":
  main()
