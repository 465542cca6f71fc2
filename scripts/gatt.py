"""Moved: `python -m train.gatt`."""
from llama_jax.cli import moved

if __name__ == "__main__":
    moved("python -m scripts.gatt", "python -m train.gatt")
