"""Logical axis names and the one table that maps them to mesh axes.

Layers name their parameter and activation axes with the constants below and never a mesh axis;
`logical_rules()` is the only place where a logical axis meets the device mesh
(`data`, `fsdp`, `tensor`).
"""

from __future__ import annotations

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
