"""Ghost Attention data and conversation files: check a conversations JSONL file, write the GAtt sampling dialogs,
and write GAtt training data (the Llama 2 paper, section 3.3; `llama_jax.gatt`).

    python -m train.gatt check chats.jsonl
    python -m train.gatt gatt-sampling --instruction "Always answer as a pirate." chats.jsonl sampling.jsonl
    python -m train.gatt gatt --instruction "Always answer as a pirate." chats.jsonl gatt.jsonl
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import get_args

from llama_jax.chat_format import Ending, Message, read_conversations, read_numbered_conversations, write_conversations
from llama_jax.cli import run_program
from llama_jax.errors import ChatFormatError
from llama_jax.gatt import GATT_SEPARATOR, gatt_sample, gatt_sampling_dialog, remove_gatt_instruction


def main(argv: Sequence[str]) -> int:
    """Check conversation files and build Ghost Attention data."""
    args = _argument_parser().parse_args(list(argv))
    return args.run(args)


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.gatt", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="validate a conversations JSONL file")
    check.add_argument("path", type=Path)
    check.add_argument("--ending", choices=get_args(Ending), default="assistant",
                       help="role every conversation must end on (default: assistant, as training data)")
    check.set_defaults(run=_run_check)

    sampling = commands.add_parser(
        "gatt-sampling",
        help="write the GAtt sampling dialogs: the instruction on every user message, for a model to re-answer "
        "turn by turn; feed the answered result back with `gatt --from-sampling`",
    )
    _add_gatt_arguments(sampling)
    sampling.set_defaults(run=_run_gatt_sampling)

    gatt = commands.add_parser(
        "gatt",
        help='write GAtt training data: the instruction in the first user message only, "train": false on every '
        "answer but the last",
    )
    _add_gatt_arguments(gatt)
    gatt.add_argument("--from-sampling", action="store_true",
                      help="the input's user messages all carry the instruction (answered gatt-sampling output)")
    gatt.set_defaults(run=_run_gatt)
    return parser


def _add_gatt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instruction", required=True, help='e.g. "Always answer as a pirate."')
    parser.add_argument("--separator", default=GATT_SEPARATOR,
                        help="text between the instruction and the user message (default: a blank line)")
    parser.add_argument("input", type=Path, help="conversations JSONL")
    parser.add_argument("output", type=Path, help="JSONL to write")


def _run_check(args: argparse.Namespace) -> int:
    count = sum(1 for _ in read_conversations(args.path, ending=args.ending))
    print(f"{args.path}: {count} conversations")
    return 0


def _run_gatt_sampling(args: argparse.Namespace) -> int:
    def build(messages: list[Message]) -> list[Message]:
        return gatt_sampling_dialog(messages, args.instruction, separator=args.separator)

    count = write_conversations(args.output, _converted(args.input, "any", build))
    print(f"{args.output}: {count} sampling dialogs")
    return 0


def _run_gatt(args: argparse.Namespace) -> int:
    def build(messages: list[Message]) -> list[Message]:
        if args.from_sampling:
            messages = remove_gatt_instruction(messages, args.instruction, separator=args.separator)
        return gatt_sample(messages, args.instruction, separator=args.separator).messages

    count = write_conversations(args.output, _converted(args.input, "assistant", build))
    print(f"{args.output}: {count} GAtt samples")
    return 0


def _converted(
    path: Path, ending: Ending, convert: Callable[[list[Message]], list[Message]]
) -> Iterator[list[Message]]:
    """convert() applied to each conversation of a file, its errors naming the input line."""
    for line, messages in read_numbered_conversations(path, ending=ending):
        try:
            yield convert(messages)
        except ChatFormatError as error:
            raise ChatFormatError(f"{path}:{line}: {error}") from None


if __name__ == "__main__":
    run_program(main)
