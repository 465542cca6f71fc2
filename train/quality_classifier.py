"""Train a quality classifier: `python -m train.quality_classifier --data labelled.jsonl --out DIR`.

    python -m train.quality_classifier --data labelled.jsonl --out classifiers/quality
    python -m train.quality_classifier --data judged.jsonl --score-threshold 3 --out classifiers/quality

The labelled examples are JSON lines `{"text": ..., "label": 0|1}` (1 = high quality), or `{"text": ..., "score":
number}` with `--score-threshold` (label 1 from that score on) — scores from any judge, e.g. a larger model's
ratings as Llama 3 used Llama 2's. A random `--valid-fraction` (default 0.1) is held out: the program prints its
accuracy at 0.5 against chance (the majority label's share), then refits on every example (`--no-refit`: keep the
model fitted without the held-out part) and saves the classifier to DIR (`llama_jax.quality_classifier`: hashed word
and character n-grams, scikit-learn's logistic regression). The curation stage `classifier` applies it with a
threshold.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from llama_jax.cli import run_program


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.quality_classifier", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, metavar="FILE", help="labelled JSONL (.jsonl, .jsonl.gz, .zst)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to save the classifier in")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="records with a \"score\" are label 1 from this score on")
    parser.add_argument("--valid-fraction", type=float, default=0.1,
                        help="share of the examples held out to measure accuracy (default 0.1; 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="of the held-out split (default 0)")
    parser.add_argument("--C", dest="c", type=float, default=4.0,
                        help="inverse L2 regularisation strength of the logistic regression (default 4)")
    parser.add_argument("--no-refit", action="store_true",
                        help="save the model fitted without the held-out examples instead of refitting on all")
    args = parser.parse_args(argv)
    from llama_jax.quality_classifier import evaluate, load_labelled, split_examples, train_classifier

    texts, labels = load_labelled(args.data, args.score_threshold)
    train_index, valid_index = split_examples(len(texts), args.valid_fraction, args.seed)
    record = {"data": str(args.data), "score_threshold": args.score_threshold}
    metrics = None
    classifier = None
    if len(valid_index) and len(set(labels[train_index].tolist())) == 2:
        classifier = train_classifier([texts[i] for i in train_index], labels[train_index], c=args.c, record=record)
        metrics = evaluate(classifier, [texts[i] for i in valid_index], labels[valid_index])
        print(f"held out {metrics['examples']} of {len(texts)} examples: accuracy {metrics['accuracy']:.4f} "
              f"(chance {metrics['chance']:.4f}), precision {metrics['precision']:.4f}, recall "
              f"{metrics['recall']:.4f} of label 1")
    elif len(valid_index):
        print("the training part holds one label only: no held-out accuracy", file=sys.stderr)
    if classifier is None or not args.no_refit:
        classifier = train_classifier(texts, labels, c=args.c, record=record)
    if metrics is not None:
        classifier.record["held_out"] = metrics
    path = classifier.save(args.out)
    print(json.dumps({"saved": str(path), "examples": len(texts), "positives": int(labels.sum())}))
    return 0


if __name__ == "__main__":
    run_program(main)
