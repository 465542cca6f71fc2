"""llama-jax: Llama 2 and Llama 3 in JAX / Flax NNX."""
from llama_jax.config import ModelConfig
from llama_jax.errors import LlamaJaxError
from llama_jax.model import Llama

__all__ = ["Llama", "LlamaJaxError", "ModelConfig", "load", "save"]


def __getattr__(name: str):
    # load/save come from the converter, which imports Orbax and TensorStore: only when first used.
    if name in ("load", "save"):
        from llama_jax import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'llama_jax' has no attribute {name!r}")
