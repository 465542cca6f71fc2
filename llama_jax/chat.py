"""Moved: the conversation format is `llama_jax.chat_format`, and the Ghost Attention program `python -m train.gatt`."""
from llama_jax.cli import moved

if __name__ == "__main__":
    moved("python -m llama_jax.chat", "python -m train.gatt")
