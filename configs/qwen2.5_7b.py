"""Qwen2.5-7B(-Instruct) from a local HF directory -> Fast-dLLM v2 block diffusion.

python train.py --config configs/qwen2.5_7b.py --set init.source=/models/Qwen2.5-7B-Instruct \
    --set data.source=/data/sft.jsonl [--set objective.kind=ar]

fp32 master weights + AdamW moments are ~120 GB: the parameters and optimizer state are sharded
over every GPU (mesh.fsdp=-1, ZeRO-3 style); e.g. 8 GPUs of one host, or several hosts with
mesh.coordinator_address / DLLM_COORDINATOR_ADDRESS set.
"""

from dllm_jax.config import (CheckpointConfig, InitConfig, MeshConfig, ModelConfig,
                             TrainConfig)
from dllm_jax.data import DataConfig
from dllm_jax.objective import ObjectiveConfig
from dllm_jax.run_config import Config

BLOCK = 32


def get_config() -> Config:
  return Config(
      model=ModelConfig(architecture="qwen2", vocab_size=152064, hidden_size=3584,
                        intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                        head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6, qkv_bias=True,
                        tie_embeddings=False, max_position_embeddings=32768,
                        param_dtype="float32", dtype="bfloat16", remat="full"),
      init=InitConfig(source=""),  # required: --set init.source=/path/to/hf_dir
      data=DataConfig(source="../shared/data/gsm8k/train.jsonl", seq_len=2048,
                      block_size=BLOCK, batch_size=64),
      objective=ObjectiveConfig(kind="diffusion", block_size=BLOCK),
      train=TrainConfig(steps=5000, learning_rate=2e-5, warmup_ratio=0.03, schedule="constant",
                        grad_accum=8, run_dir="runs/qwen2.5_7b", export_hf=True),
      mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
      checkpoint=CheckpointConfig(every_steps=500, keep=2),
  )
