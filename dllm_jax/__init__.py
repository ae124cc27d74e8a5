from dllm_jax.decoding import DecodeConfig, generate, generate_jit
