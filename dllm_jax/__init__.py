"""dllm_jax: Fast-dLLM v2 block-diffusion language models in JAX.

`from dllm_jax import DecodeConfig, generate, generate_jit` gives the decoder's entry points
(`dllm_jax.decoding`). They load on first use, so a command line that only parses its flags
(`decode.py --help`) does not import jax.
"""

_DECODING = ("DecodeConfig", "generate", "generate_jit")
__all__ = list(_DECODING)


def __getattr__(name):
  if name in _DECODING:
    from dllm_jax import decoding

    return getattr(decoding, name)
  raise AttributeError(f"module 'dllm_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_DECODING))
