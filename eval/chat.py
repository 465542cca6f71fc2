"""Chat with a model in the terminal: `python -m eval.chat --model PATH [--system TEXT]`.

    python -m eval.chat --model llama3-8b-instruct/ --system "Answer in one sentence." --temperature 0.6 --top-p 0.9
    printf 'Hi!\\nWhat did I just say?\\n' | python -m eval.chat --model ckpt/ --tokenizer tok.model

Reads one user message per line from stdin (a terminal or a pipe) and prints the answer token by token as it is
generated. The whole conversation is kept: every turn renders the dialog so far in the chat format (Llama 2 or
Llama 3, picked from the tokenizer unless --chat-format says otherwise) and the model reads all of it. Ends at end of
input or on a line "/exit". --debug-tokens writes each turn's prompt and answer token ids to stderr as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from typing import TextIO

from eval.generate import add_sampling_arguments, resolve_chat_format, sampling_from_args, stop_ids_for
from llama_jax.chat_format import CHAT_STYLES, Message, dialog_prompt
from llama_jax.cli import add_model_arguments, run_program
from llama_jax.errors import ConfigError

EXIT_COMMAND = "/exit"
USER_PROMPT = "> "
# A conversation's prompt grows every turn; padding it to a coarse multiple lets several turns share one compiled
# prefill program instead of compiling anew for each length.
PROMPT_PAD_MULTIPLE = 64


class ChatSession:
    """A conversation with a model: each `reply` sees every earlier message."""

    def __init__(self, model, tokenizer, chat_format: str, *, system: str | None = None, max_new_tokens: int = 256,
                 sampling=None, seed: int = 0):
        from llama_jax.generate import GREEDY

        self.model, self.tokenizer, self.chat_format = model, tokenizer, chat_format
        self.messages: list[Message] = [Message("system", system)] if system is not None else []
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling or GREEDY
        self.seed = seed
        self.stop_ids = stop_ids_for(tokenizer, chat_format)
        self.turns = 0
        self.last_prompt_tokens: list[int] = []
        self.last_answer_tokens: list[int] = []

    def prompt_for(self, user_text: str) -> list[int]:
        """The tokens the model reads to answer `user_text` after the conversation so far."""
        return dialog_prompt([*self.messages, Message("user", user_text)], self.tokenizer, self.chat_format)

    def reply(self, user_text: str) -> Iterator[str]:
        """Yield the answer's text piece by piece; when exhausted, the user turn and the answer are in `messages`."""
        from llama_jax.generate import IncrementalDecoder, stream

        prompt = self.prompt_for(user_text)
        room = self.model.config.max_seq_len - len(prompt)
        if room < 1:
            raise ConfigError(f"the conversation is {len(prompt)} tokens long and fills the model's "
                              f"max_seq_len={self.model.config.max_seq_len}; start a new one")
        decoder = IncrementalDecoder(self.tokenizer)
        answer_tokens: list[int] = []
        # Each turn samples with its own seed, so answers differ between turns but a rerun reproduces them all.
        for token in stream(self.model, prompt, max_new_tokens=min(self.max_new_tokens, room),
                            sampling=self.sampling, seed=self.seed + self.turns, stop_ids=self.stop_ids,
                            pad_to_multiple=PROMPT_PAD_MULTIPLE):
            answer_tokens.append(token)
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail
        self.messages += [Message("user", user_text), Message("assistant", decoder.text)]
        self.turns += 1
        self.last_prompt_tokens, self.last_answer_tokens = prompt, answer_tokens


def run_chat(session: ChatSession, lines: TextIO, out: TextIO, *, interactive: bool,
             debug: TextIO | None = None) -> None:
    """Read user lines until end of input or /exit, streaming each answer to `out` (flushed per piece)."""
    while True:
        if interactive:
            out.write(USER_PROMPT)
            out.flush()
        line = lines.readline()
        if not line or line.strip() == EXIT_COMMAND:
            break
        user_text = line.rstrip("\r\n")
        if not user_text.strip():
            continue
        for piece in session.reply(user_text):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        if debug is not None:
            record = {"turn": session.turns, "prompt_tokens": session.last_prompt_tokens,
                      "answer_tokens": session.last_answer_tokens, "answer": session.messages[-1].content}
            debug.write(json.dumps(record, ensure_ascii=False) + "\n")
            debug.flush()


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    sampling = sampling_from_args(args)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} is not allowed: expected at least 1")
    from llama_jax.scoring import model_from_args

    model, tokenizer, _ = model_from_args(args)
    session = ChatSession(model, tokenizer, resolve_chat_format(args.chat_format, tokenizer), system=args.system,
                          max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)
    run_chat(session, sys.stdin, sys.stdout, interactive=sys.stdin.isatty(),
             debug=sys.stderr if args.debug_tokens else None)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.chat", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from llama_jax.quantize import add_quantize_arguments

    add_model_arguments(parser, mesh=False)
    add_quantize_arguments(parser)
    parser.add_argument("--chat-format", choices=("auto", *CHAT_STYLES), default="auto",
                        help="chat format (default: llama3 for a Llama 3 tokenizer, else llama2)")
    add_sampling_arguments(parser, max_new_tokens=256)
    parser.add_argument("--debug-tokens", action="store_true",
                        help="write each turn's prompt and answer token ids to stderr as JSON lines")
    return parser


if __name__ == "__main__":
    run_program(main)
