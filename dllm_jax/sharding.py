"""Logical axis names, the one table that maps them to mesh axes, and the mesh itself.

Layers name their parameter and activation axes with the constants below and never a mesh axis;
`logical_rules()` is the only place where a logical axis meets the device mesh
(`data`, `fsdp`, `tensor`). `make_mesh` builds that mesh and `shardings_for` turns logical
PartitionSpecs into NamedShardings, replicating any dim its mesh axes do not divide.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

# Parameter axes.
VOCAB = "vocab"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
LAYERS = "layers"
NORM = "norm"  # the scale vector of an RMSNorm: small, replicated

# Activation axes.
BATCH = "activation_batch"
LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"
ACT_KV_HEADS = "activation_kv_heads"
ACT_MLP = "activation_mlp"
ACT_VOCAB = "activation_vocab"

MESH_AXES = ("data", "fsdp", "tensor")

# Parameters are split along `fsdp` on their largest non-tensor axis (ZeRO-3 style: each device
# holds a slice and all-gathers it per layer) and along `tensor` on heads / mlp / vocab
# (Megatron style). Activations shard their batch over data and fsdp together.
PARAM_RULES = (
    (VOCAB, "tensor"),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (HEAD_DIM, None),
    (LAYERS, None),
    (NORM, None),
)

ACTIVATION_RULES = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_KV_HEADS, "tensor"),
    (ACT_MLP, "tensor"),
    (ACT_VOCAB, "tensor"),
)


def logical_rules() -> tuple[tuple[str, object], ...]:
  """The logical -> mesh table for `nn.logical_axis_rules` / `nn.logical_to_mesh_sharding`."""
  return PARAM_RULES + ACTIVATION_RULES


@contextlib.contextmanager
def activation_constraints(mesh: Mesh):
  """Binds the model's `nn.with_logical_constraint`s to `mesh`; enter it inside the function that
  jit traces. Flax applies a constraint only when logical rules and a mesh are both in context;
  the abstract mesh is enough to name the axes, and unlike `jax.set_mesh` it may be set under jit.
  """
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(logical_rules()):
    yield


# --------------------------------------------------------------------------------------------
# The device mesh and NamedShardings derived from the table above.


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves a -1 (auto) size and checks that the sizes multiply to `num_devices`."""
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if num_devices % fixed:
    raise ValueError(f"mesh sizes {sizes} do not divide the {num_devices} devices; "
                     "set mesh.data / mesh.fsdp / mesh.tensor so their product is the device count")
  resolved = {k: (num_devices // fixed if v == -1 else v) for k, v in sizes.items()}
  if math.prod(resolved.values()) != num_devices:
    raise ValueError(f"mesh sizes {resolved} use {math.prod(resolved.values())} devices but "
                     f"{num_devices} are present; make the product match or set one size to -1")
  return tuple(resolved[a] for a in MESH_AXES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  # make_mesh lays the last (tensor) axis on the closest devices (same host / NVLink domain).
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, where: str) -> PartitionSpec:
  """Replicates every dim whose size its mesh axes do not divide (e.g. vocab + 1 mask token)."""
  dims = list(spec) + [None] * (len(shape) - len(spec))
  for i, axes in enumerate(dims):
    if axes is None:
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    n = math.prod(mesh.shape[a] for a in names)
    if shape[i] % n:
      log.info("sharding: %s dim %d (size %d) is not divisible by mesh %s=%d; replicated",
               where, i, shape[i], "x".join(names), n)
      dims[i] = None
  return PartitionSpec(*dims)


def _check_named(logical_specs: Any) -> None:
  """Refuses a logical axis name the table lacks: flax would map it to None, replicating that
  dim on every device without a word (a typo in a layer's axis names, or a rule dropped)."""
  known = {name for name, _ in logical_rules()}
  leaves = jax.tree_util.tree_flatten_with_path(
      logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
  for path, spec in leaves:
    for axes in spec if isinstance(spec, PartitionSpec) else ():
      for name in axes if isinstance(axes, tuple) else (axes,):
        if name is not None and name not in known:
          raise ValueError(
              f"sharding: {jax.tree_util.keystr(path)} names the logical axis {name!r}, which "
              f"the table in dllm_jax/sharding.py does not map (it has {sorted(known)}); name "
              "one of those, or add a rule for it there (None to replicate it)")


def shardings_for(logical_specs: Any, shapes: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree given its logical PartitionSpecs and its shapes.

  `logical_specs` is a pytree of PartitionSpecs of logical names (e.g. `model.param_logical_axes`)
  and `shapes` a matching pytree of arrays or ShapeDtypeStructs.
  """
  _check_named(logical_specs)
  mesh_specs = nn.logical_to_mesh(logical_specs, logical_rules())
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
      mesh_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  shape_leaves = treedef.flatten_up_to(shapes)
  out = [
      NamedSharding(mesh, _fit(spec, tuple(s.shape), mesh, jax.tree_util.keystr(path)))
      for (path, spec), s in zip(leaves, shape_leaves)
  ]
  return jax.tree_util.tree_unflatten(treedef, out)


def readable_values(x) -> Optional[np.ndarray]:
  """`x`'s values as numpy where this process can read them all, else None: traced under an
  outer jit, or a global array sharded over hosts (each host holds only its shards). For input
  checks that can look at values only where they are concrete."""
  if isinstance(x, jax.core.Tracer):
    return None
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  return np.asarray(x)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
  """Sharding of a [*leading, batch, length] array: batch over the activation batch rule."""
  spec = nn.logical_to_mesh_axes((BATCH, LENGTH), logical_rules())
  return NamedSharding(mesh, PartitionSpec(*([None] * leading), *spec))


def batch_divisor(mesh: Mesh) -> int:
  """How many shards the batch axis is split into; the global batch must be a multiple."""
  spec = nn.logical_to_mesh_axes((BATCH,), logical_rules())[0]
  names = spec if isinstance(spec, tuple) else ((spec,) if spec else ())
  return math.prod(mesh.shape[a] for a in names)
