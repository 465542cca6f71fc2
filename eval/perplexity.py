"""python -m eval.perplexity --model PATH --data SOURCE: loss, perplexity and bits per byte of a model on a text source.

SOURCE is text files, JSONL files (their "text" fields), folders or globs of them, or `stdlib:valid` /
`stdlib:train` (the default pretraining corpus's splits). The text is tokenized once into a cached token store and
scored in packed windows of --seq-len tokens, as the training program packs its validation batches.

By default every window of one pass over the text is scored, so the token count and the bits per byte are exact;
bits per byte (nats / ln 2 / UTF-8 bytes) do not depend on the tokenizer, so models with different tokenizers compare.
`--batches N` scores only the first N batches, exactly the batches a training run validates on with
`eval.batches=N` (give its train.batch_size, train.seq_len, seed and train.document_masking), so the loss equals the
run's logged eval_loss; bits per byte are then apportioned by token count.

Examples:
    python -m eval.perplexity --model runs/tiny --tokenizer runs/tiny/tokenizer.model --data stdlib:valid
    python -m eval.perplexity --model hf/Llama-2-7b --data books/ --seq-len 4096 --batch-size 8 --dtype bfloat16
    python -m eval.perplexity --model runs/tiny --data stdlib:valid --batches 8 --batch-size 8 --seq-len 256 \\
        --no-document-masking --json
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import jax

from llama_jax.cli import run_program

STDLIB_PREFIX = "stdlib:"


def build_parser() -> argparse.ArgumentParser:
    from llama_jax.cli import add_model_arguments
    from llama_jax.quantize import add_quantize_arguments

    parser = argparse.ArgumentParser(prog="python -m eval.perplexity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, multi_process=True)
    add_quantize_arguments(parser)
    parser.add_argument("--data", required=True, nargs="+", metavar="SOURCE",
                        help="text/JSONL files, folders, globs, or stdlib:valid / stdlib:train")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the model's "
                                                                   "max_seq_len)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="windows per batch (default: one per device)")
    parser.add_argument("--batches", type=int, default=None, metavar="N",
                        help="score only the first N batches (a training run's validation batches) instead of one "
                             "whole pass over the text")
    parser.add_argument("--seed", type=int, default=0, help="document order of the packed stream (the run's seed)")
    parser.add_argument("--document-masking", action=argparse.BooleanOptionalAction, default=True,
                        help="attend only within each packed document (default); --no-document-masking attends "
                             "across them, as runs with train.document_masking=false do")
    parser.add_argument("--store-dir", default=None,
                        help="where to keep the tokenized text (default: a folder under $LLAMA_JAX_CACHE or "
                             "~/.cache/llama_jax, keyed by the files and the tokenizer)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the summary line")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def resolve_data(entries: Sequence[str]) -> list[Path | str]:
    """Sources as given, with stdlib:<split> replaced by the default corpus's files of that split."""
    from llama_jax.data import default_corpus

    resolved: list[Path | str] = []
    for entry in entries:
        if entry.startswith(STDLIB_PREFIX):
            resolved.extend(default_corpus(entry[len(STDLIB_PREFIX):]))  # type: ignore[arg-type]
        else:
            resolved.append(entry)
    return resolved


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    from llama_jax.errors import ConfigError
    from llama_jax.scoring import count_text_bytes, evaluate_perplexity, open_text_store, scorer_from_args

    # A quantized model is scored through its dequantized weights (`model_params`), the same numbers its products use.
    scorer, tokenizer = scorer_from_args(args)
    sources = resolve_data(args.data)
    store = open_text_store(sources, tokenizer, args.store_dir)
    seq_len = args.seq_len or scorer.config.max_seq_len
    batch_size = args.batch_size or scorer.device_count
    for name, value in (("--seq-len", seq_len), ("--batch-size", batch_size), ("--batches", args.batches or 1)):
        if value < 1:
            raise ConfigError(f"{name}={value}: expected a positive integer")
    result = evaluate_perplexity(scorer, store, seq_len=seq_len, batch_size=batch_size, seed=args.seed,
                                 document_masking=args.document_masking, num_batches=args.batches,
                                 text_bytes=count_text_bytes(sources), progress=not args.no_progress)
    if jax.process_index() == 0:
        if args.json:
            print(json.dumps({"model": str(args.model), "data": list(args.data),
                              "document_masking": args.document_masking, "seed": args.seed, **result.to_dict()}))
        else:
            print(result.summary())
    return 0


if __name__ == "__main__":
    run_program(main)
