"""Llama Guard training data: `python -m train.guard_data LABELLED.jsonl OUT.jsonl [--version 3]`.

    python -m train.guard_data labelled.jsonl guard_sft.jsonl --version 3 --augment
    python -m train.sft configs/sft.yaml init_from=llama3.1-8b/ data.path=guard_sft.jsonl sft.format=llama3

Turns labelled conversations ({"messages": [...], "label": "safe"|"unsafe", "categories": [codes]}, the file
`eval.moderate --evaluate` reads) into conversations for `train.sft`: the Llama Guard prompt as the user turn, the
verdict (`safe`, or `unsafe` and the codes) as the answer, the only tokens trained on. The prompt is the one
`eval.moderate` and `llama_jax.llama_guard.LlamaGuard` send, so the fine-tuned guard is prompted as it was trained.
Fine-tune with `sft.format=llama2` for versions 1 and 2 and `sft.format=llama3` for version 3 (the program says
which). --augment adds the Llama Guard paper's copies with categories dropped from the prompt, so that the guard
learns to judge by the taxonomy it is given; the copies keep each category's code (docs/llama_guard.md).
"""
from __future__ import annotations

import argparse
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from llama_jax.chat_format import Message, write_conversations
from llama_jax.cli import run_program
from llama_jax.errors import ConfigError
from llama_jax.llama_guard import (
    CHAT_STYLE,
    augmented_examples,
    default_taxonomy,
    guard_training_conversation,
    read_categories,
    read_guard_examples,
)


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    if args.categories and args.exclude:
        raise ConfigError("--exclude edits the default taxonomy: leave the categories out of --categories instead")
    custom = args.categories is not None
    categories = read_categories(args.categories, args.version) if custom else default_taxonomy(args.version,
                                                                                                  args.exclude)
    # Descriptions are decided once for the whole taxonomy, so an augmented copy lists them as its original does.
    descriptions = custom if args.descriptions is None else args.descriptions
    examples = read_guard_examples(args.input, args.version, categories, labelled=True)
    rng = random.Random(args.seed)

    def conversations() -> Iterator[list[Message]]:
        for example in examples:
            yield guard_training_conversation(example, args.version, categories, descriptions=descriptions)
            if args.augment:
                for variant, kept in augmented_examples(example, categories, rng, args.version):
                    yield guard_training_conversation(variant, args.version, kept, descriptions=descriptions)

    count = write_conversations(args.output, conversations())
    print(f"{args.output}: {count} training conversations from {len(examples)} labelled ones; fine-tune with "
          f"python -m train.sft CONFIG init_from=CHECKPOINT data.path={args.output} "
          f"sft.format={CHAT_STYLE[args.version]}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.guard_data", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("input", type=Path, help="labelled conversations JSONL")
    parser.add_argument("output", type=Path, help="SFT conversations JSONL to write")
    parser.add_argument("--version", type=int, choices=(1, 2, 3), default=3, help="Llama Guard version (default 3)")
    parser.add_argument("--categories", metavar="FILE.jsonl",
                        help='custom taxonomy, one {"name": ..., "description": ..., "code": ...} per line '
                             "(description and code optional)")
    parser.add_argument("--exclude", metavar="CODES", default=(),
                        type=lambda text: tuple(c.strip() for c in text.split(",") if c.strip()),
                        help="leave these comma-separated codes out of the default taxonomy (the others keep theirs)")
    parser.add_argument("--descriptions", action=argparse.BooleanOptionalAction, default=None,
                        help="list category descriptions in the prompt (default: yes for --categories, no for the "
                             "default taxonomy); use the same setting for eval.moderate")
    parser.add_argument("--augment", action="store_true",
                        help="add copies with categories dropped from the prompt (an unsafe example whose violated "
                             "categories are dropped becomes safe)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dropped categories (default 0)")
    return parser


if __name__ == "__main__":
    run_program(main)
