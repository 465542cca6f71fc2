"""Ghost Attention training data from conversations JSONL: `python -m scripts.gatt --instruction TEXT IN OUT`.

The same as `python -m llama_jax.chat gatt ...`; see `python -m llama_jax.chat gatt-sampling --help` for the
step that prepares dialogs for a model to answer with the instruction on every user turn.
"""
from __future__ import annotations

from typing import Sequence

from llama_jax.chat import main as chat_main
from llama_jax.errors import run_program


def main(argv: Sequence[str]) -> int:
    return chat_main(["gatt", *argv])


if __name__ == "__main__":
    run_program(main)
