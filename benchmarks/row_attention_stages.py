"""EXPERIMENT (session 22): where `row_attention`'s 7.7 us a launch goes, by leaving stages out.

    python benchmarks/row_attention_stages.py

The batch-1 step's case (Qwen2.5-1.5B heads 12/2, D=128; position 575 of a 640-slot cache; q/k/v
parts in 3 splits), GPU us a launch from a profile, in one jit of CALLS launches chained through
the caches and the counter, each after a 128 MB write that pushes the caches out of L2 (in the
step ~93 MB of weights pass between two launches of a layer) and a small op that writes the
parts (in the step the q/k/v launch has just written them). Variants leave out (the kernel's
experimental `_skip`): the q/k/v parts' loads ("prologue"), the walk over the cache ("walk"),
the new k/v's store ("write"), the splits' combine ("combine"); "mask_combine" reads only the
group's rows in the combine. Outputs of the variants are wrong by design; only the times count.
Beside them decode_attention on the same cache (its own launch and XLA's combine).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import kernel_us, run_meta, save_json  # noqa: E402
from dllm_jax import masks  # noqa: E402
from dllm_jax.kernels import decode  # noqa: E402

H, KH, D, SLOTS, POS, PARTS, CALLS = 12, 2, 128, 640, 575, 3, 24
VARIANTS = [  # (splits or None for the default, skip)
    (None, ()), (None, ("prologue",)), (None, ("walk",)), (None, ("write",)),
    (None, ("combine",)), (None, ("prologue", "walk", "write", "combine")),
    (None, ("mask_combine",)), (10, ()), (10, ("combine",)), (10, ("mask_combine",)),
    (1, ()), (1, ("prologue",)), (1, ("walk",)), (None, ())]


def main():
  ks = jax.random.split(jax.random.key(0), 6)
  kc = jax.random.normal(ks[1], (SLOTS, KH, D), jnp.bfloat16)
  vc = jax.random.normal(ks[2], (SLOTS, KH, D), jnp.bfloat16)
  qp, kp, vp = (jax.random.normal(k, (PARTS, n, D)) for k, n in
                zip(jax.random.split(ks[0], 3), (H, KH, KH)))
  cos = sin = jnp.full((D // 2,), 0.5, jnp.float32)
  junk = jnp.zeros((64 * 1024 * 1024,), jnp.bfloat16)  # 128 MB
  spec = masks.MaskSpec("causal")
  res = {"meta": dict(run_meta(), argv=sys.argv[1:]), "rows": []}

  def chain(attend):
    def run(qp, kp, vp, kc, vc, junk):
      ctr = jnp.zeros((KH,), jnp.int32)
      outs = []
      for _ in range(CALLS):
        junk = junk * jnp.bfloat16(1.0001)
        z = junk[0].astype(jnp.float32) * 0.0  # orders this call after the flush
        out, kc, vc, ctr = attend(qp + z, kp + z, vp + z, kc, vc, ctr)
        outs.append(out)
        junk = junk + outs[-1][0, 0].astype(jnp.bfloat16) * 0
      return jnp.stack(outs), kc, vc, junk
    return jax.jit(run)

  for splits, skip in VARIANTS:
    row = {"splits": splits, "skip": list(skip)}
    attend = lambda qp, kp, vp, kc, vc, ctr, splits=splits, skip=skip: decode.row_attention(
        qp, kp, vp, jnp.ones((16,)), cos, sin, kc, vc, ctr, jnp.array([POS]), spec,
        dtype=jnp.bfloat16, splits=splits, _skip=skip)
    f = chain(attend)
    try:
      jax.block_until_ready(f(qp, kp, vp, kc, vc, junk))
      per = kernel_us(lambda: jax.block_until_ready(f(qp, kp, vp, kc, vc, junk)), CALLS)
      row["us"] = per.get("row_attention")
      row["kernels_us"] = per
    except Exception as e:  # noqa: BLE001
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(row.get("splits"), row.get("skip"), row.get("us"), row.get("error", ""), flush=True)
    res["rows"].append(row)
    save_json("row_attention_stages.json", res)

  # decode_attention on the same cache: q [1, 1, H, D], the cache as [1, SLOTS, KH, D].
  def attend_ref(qp, kp, vp, kc, vc, ctr):
    q = qp.sum(0).astype(jnp.bfloat16)[None, None]
    o = decode.decode_attention(q, kc[None], vc[None], jnp.array([POS]), spec)
    return o[0, 0], kc, vc, ctr
  f = chain(attend_ref)
  jax.block_until_ready(f(qp, kp, vp, kc, vc, junk))
  per = kernel_us(lambda: jax.block_until_ready(f(qp, kp, vp, kc, vc, junk)), CALLS)
  row = {"splits": "decode_attention", "skip": [], "us": per.get("decode_attention"),
         "kernels_us": per}
  print("decode_attention", row["us"], {k: round(v, 2) for k, v in per.items()}, flush=True)
  res["rows"].append(row)
  save_json("row_attention_stages.json", res)


if __name__ == "__main__":
  main()
