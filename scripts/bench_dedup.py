"""Near-duplicate removal on a generated corpus with planted near-duplicates: recall, false positives, throughput.

    python -m scripts.bench_dedup [--originals 2200] [--pairs-per-rate 100] [--threshold 0.8] [--seed 0]

The corpus: `--originals` documents of 200-500 words drawn (seeded) from a vocabulary of 3,000 made-up words plus
English stop words, in sentences of 8-16 words. For each edit rate below, `--pairs-per-rate` originals get a planted
copy in which every word is replaced by a random vocabulary word with that probability. The documents are shuffled
and the `minhash` stage of `llama_jax.curation` runs on them alone (`workers=1`).

The truth is exact: the word 5-gram Jaccard (`llama_jax.curation.shingles`, the sets the stage estimates) of every
planted pair, and of every removed document with the document it was matched to.
- recall: of the planted pairs with Jaccard >= threshold, the fraction with at least one member removed;
- false positives: removed documents whose Jaccard with the document they were matched to is below the threshold;
  the false-positive rate divides them by the negatives — documents with no planted partner at or above the threshold
  (unrelated originals and both members of planted pairs below it; unrelated made-up texts share almost no 5-grams);
- throughput: documents per second of the whole stage (scan, decision, apply), on the CPU printed.
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_jax.curation import CurationConfig, curate, shingles  # noqa: E402

EDIT_RATES = (0.0, 0.01, 0.02, 0.03, 0.05, 0.10, 0.20, 0.40)
SYLLABLES = ("ka", "lo", "mi", "ter", "an", "vel", "dor", "is", "pra", "nu", "sen", "tol", "ber", "gri", "ma", "fen",
             "ol", "ru", "shi", "zen", "bar", "quo", "lin", "ex")
STOP_WORDS = ("the", "of", "and", "to", "that", "with", "have", "be", "is", "in", "for", "on", "it", "as", "was")


def vocabulary(rng: random.Random, size: int = 3000) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def random_words(rng: random.Random, vocab: list[str], count: int) -> list[str]:
    return [rng.choice(STOP_WORDS) if rng.random() < 0.25 else rng.choice(vocab) for _ in range(count)]


def as_text(words: list[str], seed: int) -> str:
    """Words as sentences of 8-16 words (the cut points depend on `seed`, the same for a copy and its original)."""
    rng = random.Random(seed)
    sentences, start = [], 0
    while start < len(words):
        end = start + rng.randint(8, 16)
        sentences.append(" ".join(words[start:end]).capitalize() + ".")
        start = end
    return "\n".join(" ".join(sentences[i:i + 4]) for i in range(0, len(sentences), 4))


def jaccard(a: str, b: str, ngram: int) -> float:
    x, y = shingles(a, ngram), shingles(b, ngram)
    return len(x & y) / len(x | y)


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--originals", type=int, default=2200)
    parser.add_argument("--pairs-per-rate", type=int, default=100)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.pairs_per_rate * len(EDIT_RATES) > args.originals:
        parser.error("--originals must be at least --pairs-per-rate x the number of edit rates")
    rng = random.Random(args.seed)
    vocab = vocabulary(rng)
    originals = [random_words(rng, vocab, rng.randint(200, 500)) for _ in range(args.originals)]
    docs = {f"orig{i}": as_text(words, i) for i, words in enumerate(originals)}
    pairs = []  # (original key, copy key, edit rate)
    chosen = rng.sample(range(args.originals), args.pairs_per_rate * len(EDIT_RATES))
    for n, index in enumerate(chosen):
        rate = EDIT_RATES[n // args.pairs_per_rate]
        words = [rng.choice(vocab) if rng.random() < rate else word for word in originals[index]]
        docs[f"copy{index}"] = as_text(words, index)
        pairs.append((f"orig{index}", f"copy{index}", rate))
    keys = list(docs)
    rng.shuffle(keys)
    config = CurationConfig(stages=("minhash",), minhash_threshold=args.threshold, minhash_num_perm=args.num_perm)
    ngram = config.minhash_ngram

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "corpus.jsonl")
        with open(source, "w") as file:
            for key in keys:
                file.write(json.dumps({"text": docs[key], "key": key}) + "\n")
        line_key = {f"{source.resolve()}:{number}": key for number, key in enumerate(keys, 1)}
        start = time.perf_counter()
        [result] = curate([source], Path(tmp, "out"), config, workers=1, tasks=1)
        seconds = time.perf_counter() - start
        with gzip.open(Path(tmp, "out", "minhash", "removed", "00000.jsonl.gz"), "rt") as file:
            removed = {line_key[record["id"]]: line_key[record["duplicate_of"]] for record in map(json.loads, file)}

    truth = {(a, b): jaccard(docs[a], docs[b], ngram) for a, b, _ in pairs}
    positive_pairs = [(a, b) for (a, b), value in truth.items() if value >= args.threshold]
    has_partner = {key for pair in positive_pairs for key in pair}
    found = sum(a in removed or b in removed for a, b in positive_pairs)
    false_positives = [key for key, match in removed.items() if jaccard(docs[key], docs[match], ngram) < args.threshold]
    negatives = len(docs) - len(has_partner)

    print(f"corpus: {len(docs):,} documents ({args.originals:,} originals, {len(pairs):,} planted copies), "
          f"seed {args.seed}; word {ngram}-gram Jaccard threshold {args.threshold}, {args.num_perm} permutations, "
          "signature estimates in [{:.3f}, {:.3f}) checked exactly".format(*config.minhash_band))
    print(f"{'edit rate':>9} {'pairs':>5} {'Jaccard min/mean/max':>22} {'>= thr':>6} {'removed':>7}")
    for rate in EDIT_RATES:
        rows = [(a, b) for a, b, r in pairs if r == rate]
        values = [truth[pair] for pair in rows]
        caught = sum(a in removed or b in removed for a, b in rows)
        print(f"{rate:>9.0%} {len(rows):>5} {min(values):>8.3f}/{sum(values) / len(values):.3f}/{max(values):.3f} "
              f"{sum(v >= args.threshold for v in values):>6} {caught:>7}")
    recall = found / max(1, len(positive_pairs))
    print(f"recall of pairs with Jaccard >= {args.threshold}: {found}/{len(positive_pairs)} = {recall:.2%}")
    print(f"false positives: {len(false_positives)} of {len(removed)} removed documents "
          f"(precision {1 - len(false_positives) / max(1, len(removed)):.2%}); false-positive rate "
          f"{len(false_positives)}/{negatives} negatives = {len(false_positives) / max(1, negatives):.2%}")
    print(f"throughput: {len(docs) / seconds:,.0f} docs/s ({len(docs):,} documents in {seconds:.1f} s, 1 worker, "
          f"scan + decision + apply) on {cpu_model()}")


if __name__ == "__main__":
    main()
