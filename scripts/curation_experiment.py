"""Does curation pay? A tiny Llama trained on a curated corpus against the same corpus uncurated, at equal tokens,
scored in bits per byte on a clean held-out split.

    python -m scripts.curation_experiment --out /tmp/curation_experiment [--steps 300] [--clean-mb 1.2]

The corpus is built here, nothing is downloaded:
- clean: standard-library `.py` files of the default corpus's training split (2-40 KB each, drawn with --seed) up to
  --clean-mb MB; the held-out split is the default corpus's validation files (never in either training corpus);
- dirty = clean + a 4-line spam banner pasted at the top of 60% of the documents + exact copies of 15% of them +
  near-copies of another 15% (1% of their words replaced by other words of the document) + junk documents (random
  symbols, keyboard mash, one line repeated) of about a quarter of the bytes, all shuffled.

It runs `python -m train.curate` on the dirty corpus (stages exact, minhash, lines — one at a time, so each stage's
wall time is measured; `quality` is left out: C4's line rules strip code), trains the quality classifier
(`python -m train.quality_classifier`) on a separate labelled sample (other standard-library files = 1, junk from
another seed = 0: labels by provenance, the stand-in for a judge) and applies it as the `classifier` stage of
`train.curate`. Then two `configs/tiny.yaml` runs with the default corpus's
tokenizer, one on the dirty corpus and one on the curated corpus, each --steps × 8 × 256 tokens, and
`python -m eval.perplexity` of each on the held-out split. Prints and writes OUT/result.json.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BANNER = ["# ==== Mirrored by CodeDump.example -- the fastest Python script mirror! ====",
          "# Download thousands more scripts at http://codedump.example/?ref=py",
          "# Copyright (c) 2026 CodeDump Ltd. All rights reserved. Redistribution prohibited.",
          "# Sponsored: cheap VPS hosting, 50% off with code PYTHON50"]
SYMBOLS = list("!@#$%^&*()_+-=[]{}|;:'\",.<>/?`~\\0123456789")
KEYS = list("qwertyuiopasdfghjklzxcvbnm;,./[]")


def run(command: list[str], log: Path) -> tuple[float, str]:
    start = time.perf_counter()
    with open(log, "w") as file:
        done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=file, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}); see {log}\n{done.stdout[-2000:]}")
    return seconds, done.stdout


def junk_document(rng: np.random.Generator) -> str:
    kind = rng.integers(0, 3)
    size = int(rng.integers(3000, 12000))
    if kind == 0:  # random symbols in random-length lines
        text = "".join(rng.choice(SYMBOLS, size))
        return "\n".join(text[i:i + int(rng.integers(20, 90))] for i in range(0, size, 60))
    if kind == 1:  # keyboard mash
        words = ["".join(rng.choice(KEYS, int(rng.integers(2, 10)))) for _ in range(size // 6)]
        return "\n".join(" ".join(words[i:i + 10]) for i in range(0, len(words), 10))
    line = "".join(rng.choice(KEYS + SYMBOLS, int(rng.integers(15, 60))))  # one line repeated
    return "\n".join([line] * (size // (len(line) + 1)))


def near_copy(text: str, rate: float, rng: np.random.Generator) -> str:
    """`rate` of the whitespace-separated words replaced by other words of the same text (layout kept)."""
    parts = re.split(r"(\s+)", text)
    words = [i for i in range(0, len(parts), 2) if parts[i]]
    for i in rng.choice(words, max(1, round(rate * len(words))), replace=False):
        parts[i] = parts[int(rng.choice(words))]
    return "".join(parts)


def build_corpus(out: Path, clean_mb: float, seed: int) -> dict:
    from llama_jax.data import default_corpus

    rng = np.random.default_rng(seed)
    files = [path for path in default_corpus("train") if 2000 <= path.stat().st_size <= 40000]
    order = rng.permutation(len(files))
    clean, labelled_clean, total = [], [], 0
    for index in order:
        text = files[index].read_text(encoding="utf-8")
        if total < clean_mb * 1e6:
            clean.append(text)
            total += len(text.encode())
        elif len(labelled_clean) < 150:
            labelled_clean.append(text)
    heldout = [path.read_text(encoding="utf-8") for path in default_corpus("valid")]
    junk_target = 0.45 * total  # junk documents: about a quarter of the dirty corpus's bytes
    bannered = [("\n".join(BANNER) + "\n" + text) if rng.random() < 0.6 else text for text in clean]
    documents = [("clean", text) for text in bannered]
    picks = rng.permutation(len(clean))
    n_copies = round(0.15 * len(clean))
    documents += [("exact_copy", bannered[i]) for i in picks[:n_copies]]
    documents += [("near_copy", near_copy(bannered[i], 0.01, rng)) for i in picks[n_copies:2 * n_copies]]
    junk_bytes = 0
    while junk_bytes < junk_target:
        text = junk_document(rng)
        if rng.random() < 0.6:
            text = "\n".join(BANNER) + "\n" + text
        documents.append(("junk", text))
        junk_bytes += len(text.encode())
    documents = [documents[i] for i in rng.permutation(len(documents))]
    with open(out / "dirty.jsonl", "w") as file:
        for kind, text in documents:
            file.write(json.dumps({"text": text, "kind": kind}) + "\n")
    with open(out / "heldout.jsonl", "w") as file:
        for text in heldout:
            file.write(json.dumps({"text": text}) + "\n")
    junk_rng = np.random.default_rng(seed + 1000)
    labelled = [(text, 1) for text in labelled_clean] + [(junk_document(junk_rng), 0) for _ in labelled_clean]
    with open(out / "labelled.jsonl", "w") as file:
        for text, label in labelled:
            file.write(json.dumps({"text": text, "label": label}) + "\n")
    kinds: dict[str, dict[str, int]] = {}
    for kind, text in documents:
        entry = kinds.setdefault(kind, {"documents": 0, "bytes": 0})
        entry["documents"] += 1
        entry["bytes"] += len(text.encode())
    clean_bytes = sum(len(text.encode()) for text in clean)
    dirty_bytes = sum(entry["bytes"] for entry in kinds.values())
    return {"clean_documents": len(clean), "clean_bytes": clean_bytes, "dirty_documents": len(documents),
            "dirty_bytes": dirty_bytes, "dirty_by_kind": kinds,
            "non_clean_share_of_bytes": round(1 - clean_bytes / dirty_bytes, 4),
            "heldout_documents": len(heldout), "heldout_bytes": sum(len(t.encode()) for t in heldout),
            "labelled_examples": len(labelled), "kinds": [kind for kind, _ in documents]}


def read_ids(docs_dir: Path) -> dict[str, str]:
    import gzip

    texts = {}
    for shard in sorted(docs_dir.glob("*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as file:
            for line in file:
                record = json.loads(line)
                texts[record["id"]] = record["text"]
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/curation_experiment")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--clean-mb", type=float, default=1.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--line-min-documents", type=int, default=75)
    parser.add_argument("--classifier-threshold", type=float, default=0.5)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    started = time.perf_counter()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    corpus = build_corpus(out, args.clean_mb, args.seed)
    kinds = corpus.pop("kinds")
    timings["build_corpus"] = time.perf_counter() - t0
    print(f"corpus: {corpus['clean_documents']} clean stdlib files ({corpus['clean_bytes']:,} B) -> dirty "
          f"{corpus['dirty_documents']} docs ({corpus['dirty_bytes']:,} B, {corpus['non_clean_share_of_bytes']:.1%} "
          f"not clean originals); held out {corpus['heldout_documents']} files ({corpus['heldout_bytes']:,} B)")

    seconds, printed = run([python, "-m", "train.quality_classifier", "--data", str(out / "labelled.jsonl"),
                            "--out", str(out / "classifier")], out / "classifier_train.log")
    timings["classifier_train"] = seconds
    print("classifier: " + printed.strip().splitlines()[0] + f"  [{seconds:.1f} s]")

    curated = out / "curated"
    stages = ["exact", "minhash", "lines", "classifier"]
    stage_stats = {}
    for count in range(1, len(stages) + 1):  # resumable: each call builds one more stage
        seconds, printed = run([python, "-m", "train.curate", str(out / "dirty.jsonl"), "--out", str(curated),
                                "--stages", ",".join(stages[:count]),
                                "--line-min-documents", str(args.line_min_documents),
                                "--classifier", str(out / "classifier"),
                                "--classifier-threshold", str(args.classifier_threshold)], out / f"curate_{count}.log")
        stage = stages[count - 1]
        timings[f"curate_{stage}"] = seconds
        stage_stats[stage] = json.loads((curated / stage / "stats.json").read_text())
        print(printed.strip().splitlines()[-2] + f"  [{seconds:.1f} s, with process start]")

    # what curation did to each kind of document (ids are dirty.jsonl:<record>)
    final = {doc_id.rsplit(":", 1)[1]: text for doc_id, text in read_ids(curated / "classifier" / "docs").items()}
    dirty_texts = [json.loads(line)["text"] for line in open(out / "dirty.jsonl")]
    survived: dict[str, dict[str, int]] = {}
    clean_loss = 0
    for number, (kind, text) in enumerate(zip(kinds, dirty_texts), 1):
        entry = survived.setdefault(kind, {"documents": 0, "kept": 0})
        entry["documents"] += 1
        kept = final.get(str(number))
        if kept is not None:
            entry["kept"] += 1
            if kind == "clean":
                body = text.split("\n".join(BANNER) + "\n", 1)[-1]
                clean_loss += max(0, len(body.encode()) - len(kept.encode()))
    print("kept per kind: " + ", ".join(f"{kind} {e['kept']}/{e['documents']}" for kind, e in survived.items())
          + f"; bytes cut from kept clean documents beyond the banner: {clean_loss:,}")

    from llama_jax.data import default_cache_dir

    tokenizer = next(default_cache_dir().glob("stdlib-py*-vocab4096/tokenizer.model"), None)
    if tokenizer is None:
        sys.exit("the default corpus's tokenizer is not cached: run `python -m train.pretrain configs/tiny.yaml "
                 "train.steps=1` once")
    tokens = args.steps * 8 * 256
    results = {}
    for name, path in (("uncurated", out / "dirty.jsonl"), ("curated", curated / "classifier" / "docs")):
        run_dir = out / "runs" / name
        seconds, _ = run([python, "-m", "train.pretrain", "configs/tiny.yaml", f"data.path={path}",
                          f"data.valid_path={out / 'heldout.jsonl'}", f"data.tokenizer={tokenizer}",
                          f"train.steps={args.steps}", "train.batch_size=8", "train.seq_len=256",
                          "eval.every_steps=100000", "eval.batches=2", f"seed={args.seed}", f"run_dir={run_dir}",
                          "--fresh"], out / f"pretrain_{name}.log")
        timings[f"pretrain_{name}"] = seconds
        eval_seconds, printed = run([python, "-m", "eval.perplexity", "--model", str(run_dir), "--data",
                                     str(out / "heldout.jsonl"), "--seq-len", "256", "--batch-size", "8",
                                     "--no-document-masking", "--json", "--no-progress",
                                     "--store-dir", str(out / "heldout_store")], out / f"eval_{name}.log")
        timings[f"eval_{name}"] = eval_seconds
        score = json.loads(printed.strip().splitlines()[-1])
        results[name] = {"data": str(path), "bits_per_byte": score["bits_per_byte"], "loss": score["loss"],
                         "heldout_tokens": score["tokens"], "heldout_bytes": score["text_bytes"]}
        print(f"{name}: trained {args.steps} steps × 8 × 256 = {tokens:,} tokens in {seconds:.0f} s; held-out "
              f"{score['bits_per_byte']:.4f} bits/byte (loss {score['loss']:.4f} nats/token, "
              f"{score['tokens']:,} tokens) [eval {eval_seconds:.0f} s]")

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    first, last = stage_stats["exact"], stage_stats["classifier"]
    result = {
        "corpus": {"description": "clean = standard-library .py files of the default corpus's training split "
                                  f"(2-40 KB, seed {args.seed}); dirty = clean + spam banner in 60% of documents + "
                                  "exact copies of 15% + near-copies (1% of words replaced) of 15% + junk documents "
                                  "(random symbols, keyboard mash, one line repeated); held out = the default "
                                  "corpus's validation files", **corpus},
        "curation": {"stages": [*stages, "classifier"], "line_min_documents": args.line_min_documents,
                     "classifier_threshold": args.classifier_threshold,
                     "before": {"documents": first["documents_in"], "bytes": first["bytes_in"]},
                     "after": {"documents": last["documents_out"], "bytes": last["bytes_out"]},
                     "per_stage": stage_stats, "kept_per_kind": survived,
                     "bytes_cut_from_kept_clean_documents_beyond_the_banner": clean_loss,
                     "classifier_held_out": json.loads((out / "classifier" / "classifier.json").read_text())
                     ["record"].get("held_out")},
        "training": {"config": "configs/tiny.yaml", "steps": args.steps, "batch_size": 8, "seq_len": 256,
                     "tokens": tokens, "tokenizer": str(tokenizer),
                     "corpus_tokens": {name: _train_tokens(out / f"pretrain_{name}.log") for name in results}},
        "bits_per_byte": {name: entry["bits_per_byte"] for name, entry in results.items()},
        "eval": results,
        "wall_seconds": {**{key: round(value, 1) for key, value in timings.items()},
                         "total": round(time.perf_counter() - started, 1)},
        "cpu": model,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    difference = results["curated"]["bits_per_byte"] - results["uncurated"]["bits_per_byte"]
    print(f"curation: {first['documents_in']} docs / {first['bytes_in']:,} B -> {last['documents_out']} docs / "
          f"{last['bytes_out']:,} B; bits per byte on held-out: curated "
          f"{results['curated']['bits_per_byte']:.4f} vs uncurated {results['uncurated']['bits_per_byte']:.4f} "
          f"({difference:+.4f}) at {tokens:,} tokens each; CPU {model}; total {result['wall_seconds']['total']:.0f} s"
          f" -> {out / 'result.json'}")


def _train_tokens(log: Path) -> int:
    """Tokens of a run's training store, from its first line (`... · N training tokens`); 0 if not found."""
    found = re.search(r"([\d,]+) training tokens", log.read_text())
    return int(found.group(1).replace(",", "")) if found else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
