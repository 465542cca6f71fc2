"""python -m eval.multiple_choice --model PATH --data FILE.jsonl: zero-shot multiple-choice accuracy.

Each JSONL line is {"context": str, "choices": [str, ...], "answer": index}. Every choice is scored as
log P(delimiter + choice | context) (BOS first; the delimiter defaults to one space, as lm-eval's target_delimiter),
and the example counts as right when the answer has the highest score:
    acc       the summed log-likelihood of the choice's tokens;
    acc_norm  that sum divided by the choice's length in characters (lm-eval's acc_norm), which does not favour
              short choices just for having fewer tokens to pay for.

Example:
    python -m eval.multiple_choice --model hf/Llama-2-7b --data questions.jsonl --batch-size 16 --json
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from llama_jax.cli import run_program


def build_parser() -> argparse.ArgumentParser:
    from llama_jax.cli import add_model_arguments

    parser = argparse.ArgumentParser(prog="python -m eval.multiple_choice", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, metavar="FILE.jsonl", help="examples: context, choices, answer")
    parser.add_argument("--delimiter", default=" ", help="text between context and choice (default: one space)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences scored together (default 8, rounded "
                                                                  "up to a multiple of the device count)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="longest sequence scored; longer ones keep their end (default: the model's max_seq_len)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the summary line")
    parser.add_argument("--per-example", action="store_true",
                        help="with --json: include every choice's log-likelihood and both predictions")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    from llama_jax.scoring import read_multiple_choice, score_multiple_choice, scorer_from_args

    examples = read_multiple_choice(args.data)
    scorer, tokenizer = scorer_from_args(args)
    result = score_multiple_choice(scorer, tokenizer, examples, delimiter=args.delimiter,
                                   batch_size=args.batch_size, max_length=args.max_length,
                                   progress=not args.no_progress)
    if args.json:
        print(json.dumps({"model": str(args.model), "data": str(args.data), **result.to_dict(args.per_example)}))
    else:
        print(result.summary())
    return 0


if __name__ == "__main__":
    run_program(main)
