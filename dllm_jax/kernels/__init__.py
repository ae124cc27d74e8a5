"""Pallas attention kernels behind `attention.attend(..., impl="pallas")`.

Which kernel runs is decided by the caller's static `contract`, never guessed from shapes:

* `"layout"`: q_meta == k_meta == `masks.layout_meta(spec, segments)`: T = num_streams * L tokens
  whose positions and streams follow from their index (model.py's no-cache branch: training,
  AR scoring). Runs `flash.block_sparse_attention` (forward + custom_vjp backward).
* `"cache"`: the queries are a contiguous run of positions per row starting at
  `q_meta.positions[:, 0]`, the keys are cache slots 0..S-1 with slot == position, one segment
  (model.py's cache branch). Runs `decode.decode_attention`.

Anything else, or a shape a kernel does not cover, falls back to the XLA reference with a
one-time log line naming the reason. Kernels lower through Pallas' Triton backend (GPU), except
the training forward, dq and dk/dv kernels on an sm_90 GPU, which are Mosaic GPU's (`flash_mgpu`,
`Tiles.forward`, `Tiles.dq`, `Tiles.dkv`; dq and dk/dv for the diffusion layouts at head_dim 128).
On a TPU the layout contract runs jax's splash attention under the layout's mask (`splash`,
Mosaic TPU; tested in interpret mode only, never run on a TPU) and the cache contract the XLA
path (the decode kernel is Triton's).

A Pallas kernel is a custom call XLA cannot partition: on a device mesh it would gather its
inputs onto every device. So when a mesh is set for the trace (the train and eval steps trace
under `sharding.activation_constraints(mesh)`; elsewhere `jax.set_mesh(mesh)` or
`mesh_bound(fn, mesh)` below), `attend` runs the kernel per device under `jax.shard_map`: the
batch split as the activation batch rule says (data x fsdp) and the heads over `tensor`. Rows and
heads never mix in attention, so each device's slice is an independent problem.
"""

from __future__ import annotations

import functools
import logging
import math

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from dllm_jax import attention, masks, sharding
from dllm_jax.kernels import decode, flash
from dllm_jax.kernels.decode import decode_attention
from dllm_jax.kernels.flash import Tiles, block_sparse_attention

__all__ = ["attend", "block_sparse_attention", "decode_attention", "Tiles", "CONTRACTS",
           "mesh_bound"]

CONTRACTS = ("layout", "cache")
_log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _fallback_once(reason: str) -> None:
  _log.warning("pallas attention falls back to XLA: %s", reason)


def _why_not(q, k, spec: masks.MaskSpec, contract, interpret: bool) -> str | None:
  if contract not in CONTRACTS:
    return f"no static contract given (contract={contract!r}; kernels know {CONTRACTS})"
  if jax.default_backend() == "tpu":
    if contract == "cache":
      return "no Pallas decode kernel for a TPU (the decode kernel is Triton's, GPU-only)"
    from dllm_jax.kernels import splash

    why = splash.supported(spec)
    if why is not None:
      return f"no splash attention for this layout on a TPU: {why}"
  elif not interpret and jax.default_backend() != "gpu":
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


def mesh_bound(fn, mesh: jax.sharding.Mesh):
  """`fn` called under `jax.set_mesh(mesh)`, so the kernels it traces run per device.

  A jitted function traced without a mesh context (shardings only on its inputs, e.g. a decode
  function) sees no mesh, and a kernel inside it would be gathered. Wrap the step: `step = kernels.mesh_bound(step, mesh)`;
  every call (hence every trace and cache lookup) then happens under the same mesh.
  """
  @functools.wraps(fn)
  def bound(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)
  return bound


def _split_axes(mesh, rule: str, size: int) -> tuple[str, ...]:
  """The mesh axes `rule` maps to that split `size` evenly (nothing if they do not)."""
  axes = nn.logical_to_mesh_axes((rule,), sharding.logical_rules())[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  # Axes already manual (inside another shard_map) or of size 1 take no part.
  axes = tuple(a for a in axes if a in mesh.axis_names and a not in mesh.manual_axes
               and mesh.shape[a] > 1)
  if not axes or size % math.prod(mesh.shape[a] for a in axes):
    return ()
  return axes


def _per_device(kernel, q_BTHD, k_BSKD, v_BSKD, row_args):
  """kernel(q, k, v, *row_args) run per device when a mesh is set for the trace; `row_args` are
  [B, ...] arrays split like the batch."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or all(mesh.shape[a] == 1 for a in mesh.axis_names if a not in mesh.manual_axes):
    return kernel(q_BTHD, k_BSKD, v_BSKD, *row_args)
  batch = _split_axes(mesh, sharding.BATCH, q_BTHD.shape[0]) or None
  # Splitting the KV heads splits the query heads into matching groups (H is a multiple of K).
  heads = _split_axes(mesh, sharding.ACT_KV_HEADS, k_BSKD.shape[2]) or None
  if batch is None and heads is None:
    _fallback_once(f"neither batch {q_BTHD.shape[0]} nor {k_BSKD.shape[2]} KV heads split over "
                   f"mesh {dict(mesh.shape)}: the kernel runs on whole (gathered) inputs")
    return kernel(q_BTHD, k_BSKD, v_BSKD, *row_args)
  qkv = P(batch, None, heads, None)
  rows = tuple(P(batch, *([None] * (x.ndim - 1))) for x in row_args)
  # check_vma=False: pallas_call does not track varying manual axes.
  return _shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv) + rows, out_specs=qkv,
                    check_vma=False)(q_BTHD, k_BSKD, v_BSKD, *row_args)


def _shard_map(f, **kwargs):
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, **kwargs)
  from jax.experimental.shard_map import shard_map  # jax < 0.7

  kwargs["check_rep"] = kwargs.pop("check_vma")
  return shard_map(f, **kwargs)


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
    kernel = functools.partial(_layout_kernel, spec=spec, tiles=tiles, interpret=interpret)
    return _per_device(kernel, q_BTHD, k_BSKD, v_BSKD, (q_meta.segments,))
  kernel = functools.partial(_cache_kernel, spec=spec, interpret=interpret)
  return _per_device(kernel, q_BTHD, k_BSKD, v_BSKD, (q_meta.positions[:, 0],))


def _layout_kernel(q, k, v, segments_BT, *, spec, tiles, interpret):
  if jax.default_backend() == "tpu":  # (imported here: splash pulls in Pallas' TPU modules)
    from dllm_jax.kernels import splash

    return splash.layout_attention(q, k, v, segments_BT, spec, interpret=interpret)
  return block_sparse_attention(q, k, v, segments_BT, spec, tiles, interpret=interpret)


def _cache_kernel(q, k, v, start_B, *, spec, interpret):
  return decode_attention(q, k, v, start_B, spec, interpret=interpret)
