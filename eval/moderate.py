"""Classify conversations with a Llama Guard model: `python -m eval.moderate --model PATH INPUT.jsonl`.

    python -m eval.moderate --model guards/llama-guard-3-8b conversations.jsonl > verdicts.jsonl
    python -m eval.moderate --model runs/guard --version 2 --categories policy.jsonl conversations.jsonl
    python -m eval.moderate --model runs/guard --evaluate --category-scores all --results verdicts.jsonl labelled.jsonl

Each input line is {"messages": [...]} (user and assistant turns alternating, from a user turn), optionally with
"id", "label" ("safe"/"unsafe") and "categories" (violated codes); the guard judges the last message: a user prompt
(prompt classification) or an assistant response (response classification). Prints one JSON object per input line:
    {"line": 3, "id": ..., "verdict": "unsafe", "categories": ["S1"], "p_unsafe": 0.97, "role": "User",
     "text": "unsafe\\nS1"}
With --evaluate the input must be labelled, and the program prints one JSON object instead: precision, recall, F1
and AUPRC overall and per category (docs/llama_guard.md says how each is computed).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from llama_jax.cli import add_model_arguments, run_program
from llama_jax.errors import ConfigError, DataError

CHUNK = 64  # conversations judged per call, so results stream out of a long file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.moderate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_model_arguments(parser)
    parser.add_argument("input", metavar="INPUT.jsonl", help='conversations, one {"messages": [...]} per line')
    parser.add_argument("--version", type=int, choices=(1, 2, 3), default=3,
                        help="Llama Guard version: its prompt, chat format and default taxonomy (default 3)")
    parser.add_argument("--categories", metavar="FILE.jsonl",
                        help='custom taxonomy, one {"name": ..., "description": ..., "code": ...} per line '
                             "(description and code optional; default: the version's own taxonomy)")
    parser.add_argument("--exclude", metavar="CODES", type=_codes, default=(),
                        help="leave these comma-separated codes out of the default taxonomy; the others keep their "
                             "codes (e.g. S14 for Llama Guard 3 1B, which was trained on S1-S13)")
    parser.add_argument("--descriptions", action=argparse.BooleanOptionalAction, default=None,
                        help="list category descriptions in the prompt (default: yes for --categories, no for the "
                             "default taxonomy, whose Meta prompts list names only)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="verdict unsafe when p_unsafe >= this (default 0.5)")
    parser.add_argument("--category-scores", metavar="all|CODES", type=_scored_codes, default=False,
                        help="also score every category (all) or these comma-separated codes one-vs-all, one more "
                             "prompt per category: per-category P(unsafe) in the output and per-category AUPRC "
                             "with --evaluate")
    parser.add_argument("--evaluate", action="store_true",
                        help="the input is labelled: print precision, recall, F1 and AUPRC instead of verdicts")
    parser.add_argument("--results", metavar="FILE.jsonl", help="with --evaluate: write the verdicts here too")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per scoring and decoding call")
    parser.add_argument("--max-new-tokens", type=int, default=24,
                        help="token limit of the decoded verdict lines (default 24)")
    return parser


def _codes(text: str) -> tuple[str, ...]:
    return tuple(code.strip() for code in text.split(",") if code.strip())


def _scored_codes(text: str) -> bool | tuple[str, ...]:
    return True if text == "all" else _codes(text)


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    from llama_jax.llama_guard import (
        LlamaGuard,
        category_codes,
        default_taxonomy,
        evaluate,
        labelled_results,
        read_categories,
        read_guard_examples,
    )

    if args.categories and args.exclude:
        raise ConfigError("--exclude edits the default taxonomy: leave the categories out of --categories instead")
    if args.results and not args.evaluate:
        raise ConfigError("--results goes with --evaluate (without it the verdicts are printed)")
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise ConfigError(f"{flag} {value} is not allowed: expected at least 1")
    if not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold {args.threshold} is not allowed: expected a probability, 0 to 1")
    # Every input is read and checked before the model is loaded: a bad line costs no loading time.
    custom = args.categories is not None
    categories = read_categories(args.categories, args.version) if custom else default_taxonomy(args.version,
                                                                                                  args.exclude)
    examples = read_guard_examples(args.input, args.version, categories, labelled=args.evaluate)
    codes = category_codes(args.version, categories)
    if args.category_scores not in (True, False):
        unknown = [code for code in args.category_scores if code not in codes]
        if unknown or not args.category_scores:
            raise ConfigError(f"--category-scores {','.join(args.category_scores)!r}: expected 'all' or codes of the "
                              f"taxonomy ({', '.join(codes)})")
    from llama_jax.scoring import scorer_from_args

    scorer, tokenizer = scorer_from_args(args)
    descriptions = custom if args.descriptions is None else args.descriptions
    guard = LlamaGuard(scorer, tokenizer, args.version, categories, descriptions=descriptions,
                       threshold=args.threshold, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    # Verdicts go to stdout, or with --evaluate (whose stdout is the metrics) to --results if given.
    try:
        output = open(args.results, "w", encoding="utf-8") if args.results else None if args.evaluate else sys.stdout
    except OSError as error:
        raise DataError(f"{args.results}: cannot write the verdicts ({error.strerror or error})") from None
    results = []
    try:
        for start in range(0, len(examples), CHUNK):
            chunk = examples[start:start + CHUNK]
            judged = guard.moderate([e.messages for e in chunk], category_scores=args.category_scores,
                                    names=[e.where for e in chunk])
            results += judged
            if output is not None:
                for record in labelled_results(chunk, judged):
                    output.write(json.dumps(record, ensure_ascii=False) + "\n")
                output.flush()
    finally:
        if output is not None and output is not sys.stdout:
            output.close()
    if args.evaluate:
        metrics = evaluate(examples, results, codes, [category.name.strip() for category in categories])
        print(json.dumps({"model": str(args.model), "data": str(args.input), "version": args.version,
                          "threshold": args.threshold, **metrics}))
    return 0


if __name__ == "__main__":
    run_program(main)
