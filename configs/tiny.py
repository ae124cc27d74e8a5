"""Quick start: a tiny randomly initialised model learns the synthetic "reverse" task on CPU.

python train.py --config configs/tiny.py   (about 2-3 minutes on 2 CPU cores)

It ends by printing the held-out masked-token accuracy (chance is about 1/26) and leaves a run
directory that `checkpoint.load_model` and decode.py read.
"""

from dllm_jax.config import (CheckpointConfig, InitConfig, MeshConfig, ModelConfig,
                             TrainConfig)
from dllm_jax.data import DataConfig
from dllm_jax.objective import ObjectiveConfig
from dllm_jax.run_config import Config

BLOCK = 16


def get_config() -> Config:
  return Config(
      model=ModelConfig(architecture="llama", vocab_size=128, hidden_size=64,
                        intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16, max_position_embeddings=256, attention_impl="xla"),
      init=InitConfig(source="random", tokenizer="chars"),
      data=DataConfig(source="synthetic", synthetic_task="reverse", synthetic_min_len=3,
                      synthetic_max_len=8, seq_len=96, block_size=BLOCK, batch_size=16,
                      eval_records=128),
      objective=ObjectiveConfig(kind="diffusion", block_size=BLOCK),
      # Measured (seed 0, CPU): 94.7% held-out masked-token accuracy after 400 steps at
      # 1d5cf7b (chance ~4%); an earlier version of the code read 78%, and there lr 3e-3
      # reached 62%, 5e-3 28%.
      train=TrainConfig(steps=400, learning_rate=2e-3, warmup_ratio=0.125, schedule="cosine",
                        min_lr_ratio=0.1, weight_decay=0.01, adam_b2=0.98, run_dir="runs/tiny",
                        eval_batches=8),
      mesh=MeshConfig(data=-1),
      checkpoint=CheckpointConfig(every_steps=200, keep=2),
  )
