"""llama-jax: Llama 2 and Llama 3 in JAX / Flax NNX.

The public names are resolved on first use, so `python -m llama_jax.<module>` programs and light imports (configs,
errors) do not pay for jax, Orbax and TensorStore until they need them.
"""
from llama_jax.errors import LlamaJaxError

__all__ = ["Llama", "LlamaJaxError", "ModelConfig", "load", "load_quantized", "quantize_model", "save",
           "save_quantized"]

_LAZY = {"Llama": "llama_jax.model", "ModelConfig": "llama_jax.config", "load": "llama_jax.loading",
         "save": "llama_jax.loading", "quantize_model": "llama_jax.quantize", "save_quantized": "llama_jax.quantize",
         "load_quantized": "llama_jax.quantize"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llama_jax' has no attribute {name!r}")
