"""The backward's delta pass (delta[b, h, t] = sum_d o * do, float32) in three XLA forms, at the
training-attention shapes of benchmarks/attention.py (L=2048, B=4).

    python benchmarks/delta_pass.py

`einsum` is what `flash._backward` runs: one fusion that reduces over D and
writes [B, H, T]. `sum_t` reduces over D in [B, T, H] (a row reduction) and transposes the small
result; `sum` leaves it in [B, T, H] (no transpose: what the kernels would read if they took
that layout). Bytes: o and do read once (bf16), delta written once (float32).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks.common import ceilings, run_meta, save_json, timeit  # noqa: E402

FORMS = {
    "einsum": lambda o, do: jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32),
                                       do.astype(jnp.float32)),
    "sum_t": lambda o, do: jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32),
                                   -1).transpose(0, 2, 1),
    "sum": lambda o, do: jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), -1),
}


def main():
  res = {"meta": run_meta(), "ceil": ceilings(rounds=1), "rows": []}
  bw = res["ceil"]["copy_GBps"]
  print(res["meta"], res["ceil"], flush=True)
  for name, t, h in (("1.5B 2L", 4096, 12), ("7B 2L", 4096, 28), ("1.5B 3L", 6144, 12),
                     ("7B 3L", 6144, 28)):
    b, d = 4, 128
    sets = []
    for i in range(4):
      ks = jax.random.split(jax.random.key(i), 2)
      sets.append(tuple(jax.random.normal(kk, (b, t, h, d), jnp.bfloat16) for kk in ks))
    nbytes = 2 * b * t * h * d * 2 + b * t * h * 4
    row = {"case": name, "floor_us": nbytes / bw / 1e3}
    ref = FORMS["einsum"](*sets[0])
    for form, fn in FORMS.items():
      f = jax.jit(fn)
      got = f(*sets[0])
      got = got if got.shape == ref.shape else got.transpose(0, 2, 1)
      assert float(jnp.max(jnp.abs(got - ref))) < 1e-3 * float(jnp.max(jnp.abs(ref))), form
      row[f"{form}_us"] = timeit(f, sets, reps=5, inner=20) * 1e6
    res["rows"].append(row)
    print(row, flush=True)
    save_json("delta_pass.json", res)
  print("| case | floor us (copy rate) | " + " | ".join(f"{f} us" for f in FORMS) + " |")
  print("|---" * (2 + len(FORMS)) + "|")
  for r in res["rows"]:
    print(f"| {r['case']} | {r['floor_us']:.1f} | "
          + " | ".join(f"{r[f'{f}_us']:.1f}" for f in FORMS) + " |")


if __name__ == "__main__":
  main()
