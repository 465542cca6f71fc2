"""Does the fill-in-the-middle transform teach infilling? Train the same tiny Llama twice on the same synthetic code,
once with `data.fim_rate` and once without, and measure exact match of infilled middles on held-out documents.

    python -m scripts.fim_experiment --out runs/fim-exp [--steps 1200] [--fim-rate 0.9]

Each document assigns a string of words and asserts it again below:

    alpha = "apple river stone"
    assert alpha == "apple river stone"

with three to five different words drawn from a list of 24; the held-out documents use word sequences no training
document has. The infilling task cuts one word (with the space before it) out of a held-out document's first
sequence, at a random position: prefix = everything before it, middle = the word, suffix = the rest. Nothing before
the gap tells the word — only the suffix's copy of the sequence does — so a model must read the suffix to fill it;
left to right, it is a guess among the 24 words. Training never sees a held-out document, and sees its own documents
whole or cut by the transform at random characters.

Both runs use one tokenizer (with the infilling pieces) and `train.pretrain` with identical settings apart from
`data.fim_rate`; both are measured by `eval.generate --infill` (greedy, prefix-suffix-middle and suffix-prefix-middle
prompts) on the same held-out documents. As a left-to-right reference, the run without FIM also continues each
prefix as plain text (`eval.generate --prompts`): a hit when the continuation starts with the middle and the
suffix's first character. The figures and each stage's wall time are printed and written to OUT/result.json.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from llama_jax.perf import StageTimes

WORDS = ("apple river stone cloud green seven table quiet music north orange silver window garden yellow winter "
         "forest candle rabbit mirror planet copper violet meadow").split()
NAMES = ("alpha beta gamma delta total value count index first last inner outer").split()
DOCUMENT = '{name} = "{words}"\nassert {name} == "{words}"\n'


def make_documents(count: int, rng: random.Random, seen: set[str]) -> list[tuple[str, str, str]]:
    """(prefix, middle, suffix) of `count` documents whose word sequences are new (not in `seen`); the middle is one
    word of the first sequence, with the space before it."""
    documents = []
    while len(documents) < count:
        words = rng.sample(WORDS, rng.randint(3, 5))  # no word twice, so the suffix's copy shows where the gap is
        if " ".join(words) in seen:
            continue
        seen.add(" ".join(words))
        text = DOCUMENT.format(name=rng.choice(NAMES), words=" ".join(words))
        cut = rng.randrange(len(words))
        start = text.index('"') + 1 + sum(len(word) + 1 for word in words[:cut]) - (1 if cut else 0)
        end = start + len(words[cut]) + (1 if cut else 0)
        documents.append((text[:start], text[start:end], text[end:]))
    return documents


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def run(args: Sequence[str]) -> str:
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def infill_exact_match(run_dir: Path, tokenizer: Path, prompts: Path, middles: list[str], suffix_first: bool,
                       record: Path) -> float:
    """The share of infilled middles equal to the held-out middle; every answer is kept in `record`."""
    output = run(["eval.generate", "--model", str(run_dir), "--tokenizer", str(tokenizer), "--infill",
                  "--prompts", str(prompts), "--max-new-tokens", "16", "--batch-size", "50", "--json",
                  *(["--suffix-first"] if suffix_first else [])])
    record.write_text(output)
    answers = [json.loads(line)["middle"] for line in output.splitlines() if line.strip()]
    assert len(answers) == len(middles), (len(answers), len(middles))
    return sum(got == want for got, want in zip(answers, middles)) / len(middles)


def left_to_right_exact_match(run_dir: Path, tokenizer: Path, prompts: Path,
                              documents: list[tuple[str, str, str]], record: Path) -> float:
    """The share of plain continuations of the prefix that start with the middle and the suffix's first character."""
    output = run(["eval.generate", "--model", str(run_dir), "--tokenizer", str(tokenizer), "--prompts",
                  str(prompts), "--max-new-tokens", "16", "--batch-size", "50", "--json"])
    record.write_text(output)
    completions = [json.loads(line)["completion"] for line in output.splitlines() if line.strip()]
    assert len(completions) == len(documents), (len(completions), len(documents))
    return sum(got.startswith(middle + suffix[0]) for got, (_, middle, suffix) in zip(completions, documents)) / len(
        documents)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fim-experiment"))
    parser.add_argument("--train-documents", type=int, default=4000)
    parser.add_argument("--test-documents", type=int, default=200)
    parser.add_argument("--fim-rate", type=float, default=0.9, help="data.fim_rate of the FIM run (Code Llama's)")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", nargs="*", default=[], help="more train.pretrain overrides for both runs")
    args = parser.parse_args(argv)
    out = args.out.resolve()  # Orbax reads no checkpoint metadata under a relative path
    out.mkdir(parents=True, exist_ok=True)
    stages = StageTimes()
    timed, seconds = stages.run, stages.seconds

    rng, seen = random.Random(args.seed), set()
    train_docs = make_documents(args.train_documents, rng, seen)
    valid_docs = make_documents(100, rng, seen)
    test_docs = make_documents(args.test_documents, rng, seen)
    as_text = [{"text": "".join(parts)} for parts in train_docs]  # training sees whole documents
    train_path = write_jsonl(out / "train.jsonl", as_text)
    valid_path = write_jsonl(out / "valid.jsonl", [{"text": "".join(parts)} for parts in valid_docs])
    infill_prompts = write_jsonl(out / "test_infill.jsonl", [{"prefix": p, "suffix": s} for p, _, s in test_docs])
    plain_prompts = write_jsonl(out / "test_prefixes.jsonl", [{"prompt": p} for p, _, _ in test_docs])
    middles = [middle for _, middle, _ in test_docs]

    from llama_jax.tokenizer import train_sentencepiece

    tokenizer = out / "tokenizer.model"
    timed("tokenizer", lambda: train_sentencepiece([record["text"] for record in as_text], tokenizer,
                                                   args.vocab_size, infilling=True))
    config = {
        "model": {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden_dim": 352,
                  "vocab_size": args.vocab_size, "max_seq_len": 256, "dtype": "float32", "remat_policy": "none"},
        "seed": args.seed,
        "train": {"steps": args.steps, "batch_size": 16, "seq_len": 128, "log_every_steps": 50},
        "optimizer": {"lr": 3e-3, "warmup_steps": max(1, args.steps // 10)},
        "eval": {"every_steps": args.steps, "batches": 4},
        "checkpoint": {"every_steps": 0, "async_save": False},
        "data": {"path": str(train_path), "valid_path": str(valid_path), "tokenizer": str(tokenizer)},
    }
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    common = [str(config_path), *args.train]
    result: dict = {"train_documents": len(train_docs), "test_documents": len(test_docs), "steps": args.steps,
                    "fim_rate": args.fim_rate}
    for label, rate in (("fim", args.fim_rate), ("no_fim", 0.0)):
        run_dir = out / label
        if run_dir.exists():  # always train afresh: train.pretrain would resume a finished run
            shutil.rmtree(run_dir)
        timed(f"train_{label}", run, ["train.pretrain", *common, f"run_dir={run_dir}", f"data.fim_rate={rate}"])
        for order, suffix_first in (("psm", False), ("spm", True)):
            score = timed(f"eval_{label}_{order}", infill_exact_match, run_dir, tokenizer, infill_prompts, middles,
                          suffix_first, out / f"middles_{label}_{order}.jsonl")
            result[f"exact_match_{label}_{order}"] = score
            print(f"{label} {order}: infill exact match {score:.1%}", file=sys.stderr, flush=True)
    score = timed("eval_no_fim_left_to_right", left_to_right_exact_match, out / "no_fim", tokenizer, plain_prompts,
                  test_docs, out / "continuations_no_fim.jsonl")
    result["exact_match_no_fim_left_to_right"] = score
    result.update(seconds=seconds, total_seconds=round(sum(seconds.values()), 1), config=config,
                  train_overrides=args.train)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
