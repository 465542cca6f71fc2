"""Complete prompts with a model: `python -m eval.generate --model PATH --prompt TEXT [--prompt TEXT ...]`.

    python -m eval.generate --model ckpt/ --prompt "The capital of France is" --max-new-tokens 32
    python -m eval.generate --model hf-llama/ --prompts prompts.jsonl --chat-format llama3 --temperature 0.7 \\
        --top-p 0.9 --seed 1 --json

    python -m eval.generate --model codellama-7b/ --infill --prefix $'def add(a, b):\\n    return ' \\
        --suffix $'\\n\\nprint(add(1, 2))\\n' [--suffix-first]

--model is any checkpoint `llama_jax.load` reads (llama-jax, Hugging Face, Meta, a run directory); the tokenizer is
the model directory's tokenizer.model unless --tokenizer says otherwise. --prompts reads one prompt per line, or JSONL
objects with a "prompt" key. With --chat-format each prompt is one user turn (after --system, if given) rendered in
that chat format; "none" feeds the text as is after BOS. Prints one completion per prompt, or one JSON object per
line with --json.

--infill fills in the middle between each --prefix and the --suffix given after it (or the "prefix" and "suffix" of
each JSONL object of --prompts) with Code Llama's infilling prompt (`llama_jax.infilling`), prefix-suffix-middle or,
with --suffix-first, suffix-prefix-middle; generation stops at ▁<EOT>, and the middle is printed.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_jax.chat_format import CHAT_STYLES, Message, dialog_prompt, generation_stop_ids
from llama_jax.cli import add_model_arguments, run_program
from llama_jax.errors import ConfigError, DataError, TokenizerError
from llama_jax.jsonl import read_jsonl, utf8_text

CHAT_FORMAT_NONE = "none"


# ── Arguments shared with eval.chat ──────────────────────────────────────────────────────────────────────────────
def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="token limit per answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--system", help="system message (with a chat format)")


def sampling_from_args(args: argparse.Namespace):
    from llama_jax.generate import Sampling

    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def resolve_chat_format(requested: str, tokenizer) -> str:
    """'auto' picks the chat format that matches the tokenizer: Llama 3's tiktoken file or Llama 2's SentencePiece."""
    if requested != "auto":
        return requested
    return "llama3" if getattr(tokenizer, "kind", "") == "llama3" else "llama2"


def stop_ids_for(tokenizer, chat_format: str) -> frozenset[int]:
    if chat_format == CHAT_FORMAT_NONE:
        return frozenset(tokenizer.stop_ids)
    return frozenset(tokenizer.stop_ids) | generation_stop_ids(tokenizer, chat_format)


def prompt_tokens(text: str, tokenizer, chat_format: str, system: str | None) -> list[int]:
    if chat_format == CHAT_FORMAT_NONE:
        return tokenizer.encode(text, bos=True)
    messages = ([Message("system", system)] if system is not None else []) + [Message("user", text)]
    return dialog_prompt(messages, tokenizer, chat_format)


# ── Prompts ──────────────────────────────────────────────────────────────────────────────────────────────────────
def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a file: JSONL objects with a "prompt" key if the first non-blank line is one, else one per line."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read prompts ({error.strerror or error})") from None
    lines = utf8_text(data, path).splitlines()
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise DataError(f"{path}: no prompts (the file is empty)")
    if not numbered[0][1].lstrip().startswith("{"):
        return [line for _, line in numbered]
    return [_json_prompt(path, number, record) for number, record in read_jsonl(path, "prompts")]


def _json_prompt(path: str | Path, line_number: int, record: object) -> str:
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise DataError(f'{path}:{line_number}: expected an object with a string "prompt"')
    return record["prompt"]


def read_infilling_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(prefix, suffix) of each JSONL object of a file: {"prefix": "...", "suffix": "..."} per line."""
    pairs = []
    for number, record in read_jsonl(path, "infilling prompts"):
        if not (isinstance(record, dict) and isinstance(record.get("prefix"), str)
                and isinstance(record.get("suffix"), str)):
            raise DataError(f'{path}:{number}: expected an object with string "prefix" and "suffix"')
        pairs.append((record["prefix"], record["suffix"]))
    if not pairs:
        raise DataError(f"{path}: no infilling prompts (the file is empty)")
    return pairs


# ── Generation ───────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Result:
    prompt: str
    prompt_tokens: int
    completion: str
    tokens: list[int]
    finish_reason: str


def complete(model, tokenizer, prompts: Sequence[str], *, chat_format: str, system: str | None,
             max_new_tokens: int, sampling, seed: int, batch_size: int) -> Iterator[Result]:
    """Completions in prompt order, `batch_size` prompts per generate call."""
    from llama_jax.generate import generate

    stop_ids = stop_ids_for(tokenizer, chat_format)
    for start in range(0, len(prompts), batch_size):
        texts = prompts[start:start + batch_size]
        encoded = [prompt_tokens(text, tokenizer, chat_format, system) for text in texts]
        # Batches draw with different seeds (seed + index of their first prompt): equal prompts in different
        # batches are sampled independently, and a rerun with the same seed reproduces everything.
        completions = generate(model, encoded, max_new_tokens=max_new_tokens, sampling=sampling,
                               seed=seed + start, stop_ids=stop_ids)
        for text, ids, completion in zip(texts, encoded, completions):
            yield Result(text, len(ids), tokenizer.decode(completion.tokens), completion.tokens,
                         completion.finish_reason)


@dataclass(frozen=True)
class InfillResult:
    prefix: str
    suffix: str
    middle: str
    prompt_tokens: int
    tokens: list[int]
    finish_reason: str


def infill_pairs(model, tokenizer, pairs: Sequence[tuple[str, str]], *, suffix_first: bool, max_new_tokens: int,
                 sampling, seed: int, batch_size: int) -> Iterator[InfillResult]:
    """Middles in input order, `batch_size` pairs per generate call (seeds as `complete` gives them)."""
    from llama_jax.generate import infill

    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        prefixes, suffixes = [prefix for prefix, _ in batch], [suffix for _, suffix in batch]
        middles = infill(model, tokenizer, prefixes, suffixes, suffix_first=suffix_first,
                         max_new_tokens=max_new_tokens, sampling=sampling, seed=seed + start)
        for (prefix, suffix), result in zip(batch, middles):
            yield InfillResult(prefix, suffix, result.middle, result.prompt_tokens, result.tokens,
                               result.finish_reason)


def _infilling_pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    if args.prompt:
        raise ConfigError("--infill takes --prefix and --suffix, not --prompt")
    if args.chat_format != CHAT_FORMAT_NONE or args.system is not None:
        raise ConfigError("--infill fills in raw code: it takes no --chat-format or --system")
    prefixes, suffixes = list(args.prefix or []), list(args.suffix or [])
    if len(prefixes) != len(suffixes):
        raise ConfigError(f"--infill needs one --suffix per --prefix: got {len(prefixes)} --prefix and "
                          f"{len(suffixes)} --suffix")
    pairs = list(zip(prefixes, suffixes)) + (read_infilling_pairs(args.prompts) if args.prompts else [])
    if not pairs:
        raise ConfigError("--infill needs --prefix TEXT --suffix TEXT (repeatable) or --prompts FILE.jsonl")
    return pairs


def _check_infilling_tokenizer(args: argparse.Namespace) -> None:
    """A tokenizer without the infilling tokens is one error line naming its file, before the model is loaded."""
    from llama_jax.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(args.tokenizer if args.tokenizer is not None else args.model)
    except TokenizerError:
        return  # model_from_args reports an unreadable tokenizer, with its hint
    tokenizer.infilling_ids()


def _main_infill(args: argparse.Namespace) -> int:
    pairs = _infilling_pairs(args)
    sampling = sampling_from_args(args)
    _check_infilling_tokenizer(args)
    from llama_jax.scoring import model_from_args

    model, tokenizer, _ = model_from_args(args)
    results = infill_pairs(model, tokenizer, pairs, suffix_first=args.suffix_first,
                           max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                           batch_size=args.batch_size)
    _print_results(results, lambda index, result: (f"=== {index + 1}", result.middle), len(pairs) == 1, args.json)
    return 0


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} is not allowed: expected at least 1")
    if args.infill:
        return _main_infill(args)
    if args.prefix or args.suffix or args.suffix_first:
        raise ConfigError("--prefix, --suffix and --suffix-first belong to --infill")
    prompts = list(args.prompt or []) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise ConfigError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    if args.system is not None and args.chat_format == CHAT_FORMAT_NONE:
        raise ConfigError("--system needs a chat format: pass --chat-format llama2 or llama3")
    sampling = sampling_from_args(args)
    from llama_jax.scoring import model_from_args

    model, tokenizer, _ = model_from_args(args)
    results = complete(model, tokenizer, prompts, chat_format=args.chat_format, system=args.system,
                       max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                       batch_size=args.batch_size)
    _print_results(results, lambda index, result: (f"=== {index + 1}: {result.prompt}", result.completion),
                   len(prompts) == 1, args.json)
    return 0


def _print_results(results: Iterable[Any], header_and_text: Callable[[int, Any], tuple[str, str]], single: bool,
                   as_json: bool) -> None:
    """As each result arrives: one JSON object, or the text alone (a single result), or the text under its header."""
    for index, result in enumerate(results):
        header, text = header_and_text(index, result)
        if as_json:
            print(json.dumps(result.__dict__, ensure_ascii=False), flush=True)
        else:
            print(text if single else f"{header}\n{text}", flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.generate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from llama_jax.quantize import add_quantize_arguments

    add_model_arguments(parser, mesh=False)
    add_quantize_arguments(parser)
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompts", help="file of prompts: one per line, or JSONL with a \"prompt\" key")
    parser.add_argument("--chat-format", choices=(*CHAT_STYLES, CHAT_FORMAT_NONE), default=CHAT_FORMAT_NONE,
                        help="render each prompt as a user turn of this chat format (default: none, raw text)")
    add_sampling_arguments(parser, max_new_tokens=128)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt and line")
    infilling = parser.add_argument_group("infilling (Code Llama 7B/13B base models)")
    infilling.add_argument("--infill", action="store_true",
                           help="fill in the middle between --prefix and --suffix; stops at ▁<EOT>")
    infilling.add_argument("--prefix", action="append", help="text before the gap (repeatable, with --suffix)")
    infilling.add_argument("--suffix", action="append", help="text after the gap (repeatable, with --prefix)")
    infilling.add_argument("--suffix-first", action="store_true",
                           help="suffix-prefix-middle prompt order (SPM) instead of prefix-suffix-middle (PSM)")
    return parser


if __name__ == "__main__":
    run_program(main)
