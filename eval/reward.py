"""Score with a reward model: accuracy on held-out preference pairs, or the score of (prompt, response) pairs.

    python -m eval.reward --model runs/rm --pairs held_out.jsonl [--chat-format llama2] [--json]
    python -m eval.reward --model runs/rm --score answers.jsonl [--chat-format llama3]

--model is a reward model `llama_jax.load` reads (a train.reward run directory or a saved reward model); the
tokenizer is the model folder's tokenizer.model unless --tokenizer names another. --pairs takes TRL's preference
format (as train.reward) and prints the accuracy (chosen scored above rejected), by strength label where the pairs
carry one, and the mean score margin. --score takes JSONL objects with "prompt" (a string or messages ending on a
user turn) and "response", and prints each line's score as JSON (`{"score": s}` per input line, in order).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from llama_jax.chat_format import CHAT_STYLES, Message
from llama_jax.cli import run_program
from llama_jax.config import RewardConfig
from llama_jax.errors import ConfigError, DataError
from llama_jax.jsonl import read_jsonl


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.reward", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="PATH", help="reward model (train.reward run or saved)")
    parser.add_argument("--tokenizer", metavar="PATH", default=None,
                        help="tokenizer file (default: the model folder's tokenizer.model)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--pairs", metavar="FILE", help="held-out preference pairs: report accuracy")
    what.add_argument("--score", metavar="FILE", help='JSONL of {"prompt", "response"}: print each score')
    parser.add_argument("--chat-format", choices=CHAT_STYLES, default="llama2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the accuracy report as one JSON object")
    return parser


def pair_accuracy(model, tokenizer, style: str, pairs, batch_size: int = 8) -> dict:
    """Accuracy (chosen scored above rejected), overall and per strength label, and the mean score margin."""
    prompts = [list(pair.prompt) for pair in pairs]
    chosen = model.score(tokenizer, style, prompts, [pair.chosen for pair in pairs], batch_size=batch_size)
    rejected = model.score(tokenizer, style, prompts, [pair.rejected for pair in pairs], batch_size=batch_size)
    correct = chosen > rejected
    by_strength: dict[str, list[bool]] = defaultdict(list)
    for pair, right in zip(pairs, correct):
        if pair.strength is not None:
            by_strength[pair.strength].append(bool(right))
    return {"pairs": len(pairs), "accuracy": float(np.mean(correct)),
            "mean_margin": float(np.mean(chosen - rejected)),
            "accuracy_by_strength": {name: float(np.mean(values)) for name, values in by_strength.items()}}


def read_scoring_requests(path: str) -> tuple[list[list[Message]], list[str]]:
    """(prompts, responses) of a JSONL file of {"prompt", "response"} objects; errors name the file and line."""
    from llama_jax.preference_data import parse_prompt

    prompts, responses = [], []
    for line, record in read_jsonl(path, "scoring requests"):
        where = f"{path}:{line}"
        prompt = parse_prompt(record, where, extra_keys=frozenset({"response"}))
        if not isinstance(record.get("response"), str):
            raise DataError(f'{where}: expected a string "response"')
        prompts.append(list(prompt.messages))
        responses.append(record["response"])
    if not prompts:
        raise DataError(f"{path}: no scoring requests")
    return prompts, responses


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} is not allowed: expected at least 1")
    import llama_jax
    from llama_jax.preference_data import read_preferences
    from llama_jax.reward_model import RewardModel
    from llama_jax.tokenizer import load_tokenizer

    model = llama_jax.load(args.model)
    if not isinstance(model, RewardModel):
        raise ConfigError(f"{args.model} is a language model, not a reward model (train one with train.reward)")
    tokenizer = load_tokenizer(args.tokenizer or f"{args.model}/tokenizer.model")
    if args.pairs:
        report = pair_accuracy(model, tokenizer, args.chat_format,
                               read_preferences(args.pairs, RewardConfig().margins), args.batch_size)
        if args.json:
            print(json.dumps(report))
        else:
            print(f"accuracy {report['accuracy']:.4f} on {report['pairs']} pairs (mean score margin "
                  f"{report['mean_margin']:.4f})")
            for name, value in sorted(report["accuracy_by_strength"].items()):
                print(f"  {name}: {value:.4f}")
        return 0
    prompts, responses = read_scoring_requests(args.score)
    for score in model.score(tokenizer, args.chat_format, prompts, responses, batch_size=args.batch_size):
        print(json.dumps({"score": float(score)}))
    return 0


if __name__ == "__main__":
    run_program(main)
