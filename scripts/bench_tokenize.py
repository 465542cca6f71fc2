"""Building token stores at scale: throughput against the tokenizer's own encode rate, and peak memory.

    python -m scripts.bench_tokenize --gigabytes 1 [--workers N] [--out DIR]

The corpus is assembled here: the Python standard library's sources as JSON lines (one file per document), repeated
until it holds --gigabytes of text, in 16 files. For each tokenizer — a SentencePiece model trained on the default
corpus and Meta's Llama 3 tiktoken file (from the llama-models package) — it measures, in the same run:
- the ceiling: the tokenizer's raw encode rate on one thread over a sample of the corpus, times the cores;
- `data.build_store` in one process and `parallel_tokenize.build_store_parallel` with --workers processes: bytes of
  text per second, and the ratio to the ceiling;
- the peak resident memory of each build (its process and its children, sampled every 0.1 s from /proc), over an
  eighth of the corpus and over all of it: flat means it does not grow with the corpus.
Figures are printed as JSON and written to OUT/result.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

FILES = 16
SAMPLE_BYTES = 32 << 20


def assemble_corpus(directory: Path, target_bytes: int) -> int:
    """Standard-library sources as JSON lines, repeated to `target_bytes` of text; returns the text bytes."""
    from llama_jax.data import default_corpus

    texts = [path.read_text(errors="replace") for path in default_corpus("train")]
    directory.mkdir(parents=True, exist_ok=True)
    handles = [open(directory / f"part-{index:02d}.jsonl", "w") for index in range(FILES)]
    written, count = 0, 0
    try:
        while written < target_bytes:
            for text in texts:
                handles[count % FILES].write(json.dumps({"text": text}) + "\n")
                written += len(text.encode())
                count += 1
                if written >= target_bytes:
                    break
    finally:
        for handle in handles:
            handle.close()
    return written


def sample_texts(directory: Path, limit: int) -> list[str]:
    texts, total = [], 0
    with open(directory / "part-00.jsonl") as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
            total += len(texts[-1].encode())
            if total >= limit:
                break
    return texts


def raw_encode_rate(tokenizer_path: str, texts: list[str]) -> float:
    """Bytes per second of the tokenizer's own encoder on one thread: SentencePiece's batch encoder; for tiktoken
    the faster of its two outputs, Python lists (`encode_ordinary_batch`) and numpy (`encode_to_numpy`, which the
    store's writer uses), so that the ceiling is the fastest the library encodes."""
    from llama_jax.tokenizer import SentencePieceTokenizer, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    size = sum(len(text.encode()) for text in texts)

    def rate(encode) -> float:
        started = time.perf_counter()
        encode()
        return size / (time.perf_counter() - started)

    if isinstance(tokenizer, SentencePieceTokenizer):
        return rate(lambda: tokenizer._processor.encode(texts, num_threads=1))
    encoding = tokenizer._encoding
    return max(rate(lambda: encoding.encode_ordinary_batch(texts, num_threads=1)),
               rate(lambda: [encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
                             for text in texts]))


BUILD = """
import os, sys, time, json, threading
from pathlib import Path
sys.path.insert(0, {repo!r})
from llama_jax.tokenizer import load_tokenizer


def tree_rss_bytes(root: int) -> int:
    # Resident bytes of a process and all its descendants now (ru_maxrss would not do: Linux carries a parent's
    # high-water mark into a forked child across exec, so every build would report the benchmark's own).
    parents = {{}}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{{entry}}/stat").read().rsplit(")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
            except OSError:
                pass
    tree, frontier = {{root}}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    total = 0
    for pid in tree:
        try:
            for line in open(f"/proc/{{pid}}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def main():
    files = sorted(Path({corpus!r}).glob("part-*.jsonl"))[:{files}]
    tokenizer = load_tokenizer({tokenizer!r})
    peak, done = [tree_rss_bytes(os.getpid())], threading.Event()

    def sample():
        while not done.wait(0.1):
            peak.append(tree_rss_bytes(os.getpid()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    if {workers} > 1:
        from llama_jax.parallel_tokenize import build_store_parallel
        store = build_store_parallel(files, tokenizer, {out!r}, workers={workers}, force=True)
    else:
        from llama_jax.data import build_store
        store = build_store(files, tokenizer, {out!r}, force=True)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    print(json.dumps({{"seconds": seconds, "tokens": store.num_tokens, "peak_rss_mib": max(peak) / (1 << 20)}}))


if __name__ == "__main__":
    main()
"""


def build(corpus: Path, tokenizer: str, out: Path, workers: int, files: int) -> dict:
    """One build in a fresh process, so that its peak memory is its own."""
    code = BUILD.format(repo=str(Path(__file__).resolve().parents[1]), corpus=str(corpus), tokenizer=tokenizer,
                        out=str(out), workers=workers, files=files)
    script = out.parent / f"build_{workers}.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-tokenize"))
    parser.add_argument("--tokenizers", default="sentencepiece-4096,llama3-tiktoken",
                        help="comma-separated: which of sentencepiece-4096, llama3-tiktoken to measure")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    corpus = out / "corpus"
    text_bytes = assemble_corpus(corpus, int(args.gigabytes * (1 << 30)))
    from llama_jax.data import load_default_corpus

    sentencepiece, _, _ = load_default_corpus(4096)
    import llama_models

    tokenizers = {"sentencepiece-4096": str(sentencepiece.path),
                  "llama3-tiktoken": str(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")}
    chosen = args.tokenizers.split(",")
    unknown = sorted(set(chosen) - set(tokenizers))
    if unknown:
        parser.error(f"unknown tokenizers {unknown}: choose among {sorted(tokenizers)}")
    tokenizers = {name: tokenizers[name] for name in chosen}
    sample = sample_texts(corpus, SAMPLE_BYTES)
    cores = os.cpu_count() or 1
    result: dict = {"corpus_text_bytes": text_bytes, "files": FILES, "cores": cores, "workers": args.workers,
                    "load_average": os.getloadavg()}
    for name, path in tokenizers.items():
        ceiling = raw_encode_rate(path, sample) * cores
        row: dict = {"raw_encode_bytes_per_s_one_thread": ceiling / cores, "ceiling_bytes_per_s": ceiling}
        for workers in (1, args.workers):
            for files, label in ((FILES // 8, "eighth"), (FILES, "all")):
                measured = build(corpus, path, out / f"store-{name}-{workers}", workers, files)
                share = files / FILES
                rate = text_bytes * share / measured["seconds"]
                row[f"workers_{workers}_{label}"] = {**measured, "bytes_per_s": rate, "of_ceiling": rate / ceiling}
        result[name] = row
        print(json.dumps({name: row}), flush=True)
    result["load_average_after"] = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
