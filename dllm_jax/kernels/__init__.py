"""Pallas attention kernels behind `attention.attend(..., impl="pallas")`.

Which kernel runs is decided by the caller's static `contract`, never guessed from shapes:

* `"layout"`: q_meta == k_meta == `masks.layout_meta(spec, segments)`: T = num_streams * L tokens
  whose positions and streams follow from their index (model.py's no-cache branch: training,
  AR scoring). Runs `flash.block_sparse_attention` (forward + custom_vjp backward).
* `"cache"`: the queries are a contiguous run of positions per row starting at
  `q_meta.positions[:, 0]`, the keys are cache slots 0..S-1 with slot == position, one segment
  (model.py's cache branch). Runs `decode.decode_attention`.

Anything else, or a shape a kernel does not cover, falls back to the XLA reference with a
one-time log line naming the reason. Kernels lower through Pallas' Triton backend (GPU); on a TPU
the XLA path runs (these kernels use Triton-only features: dynamic loop bounds and gathers of
tiles by a host-computed index list).
"""

from __future__ import annotations

import functools
import logging

import jax

from dllm_jax import attention, masks
from dllm_jax.kernels import decode, flash
from dllm_jax.kernels.decode import decode_attention
from dllm_jax.kernels.flash import Tiles, block_sparse_attention

__all__ = ["attend", "block_sparse_attention", "decode_attention", "Tiles", "CONTRACTS"]

CONTRACTS = ("layout", "cache")
_log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _fallback_once(reason: str) -> None:
  _log.warning("pallas attention falls back to XLA: %s", reason)


def _why_not(q, k, spec: masks.MaskSpec, contract, interpret: bool) -> str | None:
  if contract not in CONTRACTS:
    return f"no static contract given (contract={contract!r}; kernels know {CONTRACTS})"
  if not interpret and jax.default_backend() != "gpu":
    return f"no Pallas kernel for backend {jax.default_backend()!r} (Triton kernels are GPU-only)"
  d = q.shape[-1]
  if d < 16 or d & (d - 1):
    return f"head_dim {d} is not a power of two >= 16"
  if q.shape[2] % k.shape[2]:
    return f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads"
  if contract == "layout":
    if q.shape[1] != k.shape[1] or q.shape[1] % spec.num_streams:
      return (f"layout contract needs T == S == num_streams * L, got T={q.shape[1]}, "
              f"S={k.shape[1]}, spec={spec}")
    return None
  if spec.kind == "diffusion":
    return "cache contract with a diffusion spec"
  return decode.supported(q, k)


def attend(q_BTHD, k_BSKD, v_BSKD, spec: masks.MaskSpec, q_meta: masks.TokenMeta,
           k_meta: masks.TokenMeta, contract: str | None = None, interpret: bool | None = None,
           tiles: Tiles = Tiles()):
  """`attention.attend` through a Pallas kernel when `contract` says which one applies.

  `interpret=None` interprets on CPU (tests) and compiles elsewhere.
  """
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  reason = _why_not(q_BTHD, k_BSKD, spec, contract, interpret)
  if reason is not None:
    _fallback_once(reason)
    return attention.xla_attention(q_BTHD, k_BSKD, v_BSKD, masks.dense_mask(spec, q_meta, k_meta))
  if contract == "layout":
    return block_sparse_attention(q_BTHD, k_BSKD, v_BSKD, q_meta.segments, spec, tiles,
                                  interpret=interpret)
  return decode_attention(q_BTHD, k_BSKD, v_BSKD, q_meta.positions[:, 0], spec,
                          interpret=interpret)
