"""Qwen2.5-1.5B(-Instruct) from a local HF directory -> Fast-dLLM v2 block diffusion.

python train.py --config configs/qwen2.5_1.5b.py --set init.source=/models/Qwen2.5-1.5B-Instruct \
    --set data.source=/data/sft.jsonl [--set objective.kind=ar]

The authors' recipe: lr 2e-5 constant after 3% warmup, blocks of 32. One GPU of 80 GB holds it
(fp32 master weights and AdamW moments, bf16 compute, full remat, and the LM head's loss in chunks
of 512 positions: without them the logits of a micro-batch of 8 rows asked for 47 GB more and
the first step ran out of memory on an H100); more GPUs shard over data.
"""

from dllm_jax.config import (CheckpointConfig, InitConfig, MeshConfig, ModelConfig,
                             TrainConfig)
from dllm_jax.data import DataConfig
from dllm_jax.objective import ObjectiveConfig
from dllm_jax.run_config import Config

BLOCK = 32


def get_config() -> Config:
  return Config(
      # Read from the checkpoint at start; kept here so shapes are known without it.
      model=ModelConfig(architecture="qwen2", vocab_size=151936, hidden_size=1536,
                        intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
                        head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6, qkv_bias=True,
                        tie_embeddings=True, max_position_embeddings=32768,
                        param_dtype="float32", dtype="bfloat16", remat="full"),
      init=InitConfig(source=""),  # required: --set init.source=/path/to/hf_dir
      data=DataConfig(source="../shared/data/gsm8k/train.jsonl", seq_len=2048,
                      block_size=BLOCK, batch_size=32),
      objective=ObjectiveConfig(kind="diffusion", block_size=BLOCK, loss_chunk=512),
      train=TrainConfig(steps=5000, learning_rate=2e-5, warmup_ratio=0.03, schedule="constant",
                        grad_accum=4, run_dir="runs/qwen2.5_1.5b", export_hf=True),
      mesh=MeshConfig(data=-1),
      checkpoint=CheckpointConfig(every_steps=500, keep=2),
  )
