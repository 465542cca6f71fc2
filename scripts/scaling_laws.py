"""Moved: the scaling-law sweep is `python -m train.scaling_laws` (its library, llama_jax.scaling_sweep)."""
from llama_jax.cli import moved

if __name__ == "__main__":
    moved("python -m scripts.scaling_laws", "python -m train.scaling_laws")
