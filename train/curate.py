"""Corpus curation: `python -m train.curate SOURCES... --out DIR [--stages quality,exact,minhash,lines]`.

    python -m train.curate crawl/*.jsonl.zst --out curated --workers 8
    python -m train.pretrain configs/tiny.yaml data.path=curated/lines/docs

Runs the stages in order on datatrove's executors (`llama_jax.curation`): Gopher and C4 quality rules, exact
de-duplication, MinHash LSH near-duplicate removal, boilerplate-line removal. Each stage writes `DIR/<stage>/docs`
(the kept documents, JSON lines), `DIR/<stage>/removed` (the removed ones, with the reason) and
`DIR/<stage>/stats.json`, and prints one line: documents and bytes in -> out, and why documents went. Running the
same command again skips the stages (and the tasks) already complete. The last line names the curated folder.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from llama_jax.cli import run_program
from llama_jax.curation import OPTIONAL_STAGES, STAGES, CurationConfig, curate, describe
from llama_jax.documents import DEFAULT_TEXT_FIELD


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.curate", description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="files, folders or globs (.txt, .jsonl[.gz|.zst], .json.gz, .parquet)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (one subfolder per stage)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated stages, run in this order (default {','.join(STAGES)}; also "
                             f"{','.join(OPTIONAL_STAGES)}, with --classifier)")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--tasks", type=int, default=None, help="shards of the work (default: --workers)")
    parser.add_argument("--executor", choices=("local", "slurm", "ray"), default="local")
    parser.add_argument("--minhash-threshold", type=float, default=0.8,
                        help="word 5-gram Jaccard from which a document is a near-duplicate (default 0.8)")
    parser.add_argument("--minhash-num-perm", type=int, default=256, help="MinHash permutations (default 256)")
    parser.add_argument("--line-min-documents", type=int, default=5,
                        help="a line in at least this many documents is boilerplate (default 5)")
    parser.add_argument("--classifier", default=None, metavar="DIR",
                        help="quality classifier for the classifier stage (python -m train.quality_classifier)")
    parser.add_argument("--classifier-threshold", type=float, default=0.5,
                        help="documents scoring below this probability of high quality go (default 0.5)")
    parser.add_argument("--text-field", default=DEFAULT_TEXT_FIELD,
                        help="JSON field / Parquet column of the sources' text (default text)")
    parser.add_argument("--no-removed", action="store_true", help="do not write the removed documents aside")
    args = parser.parse_args(argv)
    config = CurationConfig(stages=tuple(stage.strip() for stage in args.stages.split(",") if stage.strip()),
                            minhash_threshold=args.minhash_threshold, minhash_num_perm=args.minhash_num_perm,
                            line_min_documents=args.line_min_documents, classifier_path=args.classifier,
                            classifier_threshold=args.classifier_threshold)
    results = curate(args.sources, args.out, config, workers=args.workers, tasks=args.tasks, executor=args.executor,
                     text_field=args.text_field, keep_removed=not args.no_removed)
    if results is None:
        print(f"submitted to {args.executor}: run the same command again once the jobs have finished")
        return 0
    for result in results:
        done = " (complete already)" if result.skipped else ""
        print(f"{result.stage}{done}: {describe(result.stats)}")
    print(f"curated: {results[-1].docs_dir}")
    return 0


if __name__ == "__main__":
    run_program(main)
