"""llama-jax: Llama 2 and Llama 3 in JAX / Flax NNX."""
from llama_jax.errors import LlamaJaxError

__all__ = ["LlamaJaxError"]
