"""Does SFT really teach? Pretrain a tiny Llama, fine-tune it on a chat task whose answers can be checked exactly,
and measure exact-match accuracy before and after with `eval.generate` — all through the public programs.

    python -m scripts.sft_experiment --out runs/sft-exp [--pretrain train.steps=150 ...] [--sft sft.epochs=8 ...]

The task: "Repeat after me: w1 w2 w3 w4" → "w1 w2 w3 w4", words drawn from a fixed list; the test prompts are word
sequences never seen in training, so a model must learn to copy, not memorise. A pretrained model continues the
prompt with Python-like text (the default corpus), so it starts near 0%. Both measurements use the same program
(`eval.generate`, greedy, the Llama 2 chat format) on the same held-out prompts. The figures and each stage's wall time
are printed and written to OUT/result.json.
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

from llama_jax.perf import StageTimes

WORDS = ("apple river stone cloud green seven table quiet music north orange silver window garden yellow winter "
         "forest candle rabbit mirror planet copper violet meadow").split()
TASK = "Repeat after me: {}"


def make_task(out: Path, train_size: int, test_size: int, seed: int) -> tuple[Path, Path, list[str]]:
    """Train conversations (JSONL) and held-out test prompts with their exact answers."""
    rng = random.Random(seed)
    seen: set[str] = set()

    def phrase() -> str:
        while True:
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 5)))
            if words not in seen:
                seen.add(words)
                return words

    train = [phrase() for _ in range(train_size)]
    test = [phrase() for _ in range(test_size)]
    train_path, test_path = out / "train.jsonl", out / "test_prompts.jsonl"
    with open(train_path, "w") as f:
        for words in train:
            messages = [{"role": "user", "content": TASK.format(words)}, {"role": "assistant", "content": words}]
            f.write(json.dumps({"messages": messages}) + "\n")
    with open(test_path, "w") as f:
        for words in test:
            f.write(json.dumps({"prompt": TASK.format(words)}) + "\n")
    return train_path, test_path, test


def run(args: Sequence[str]) -> str:
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def exact_match(model: Path, tokenizer: Path, prompts: Path, answers: list[str], record: Path) -> float:
    """The share of completions equal to the answer (whitespace-stripped); every completion is kept in `record`."""
    output = run(["eval.generate", "--model", str(model), "--tokenizer", str(tokenizer), "--prompts", str(prompts),
                  "--chat-format", "llama2", "--max-new-tokens", "24", "--batch-size", "16", "--json"])
    record.write_text(output)
    completions = [json.loads(line)["completion"] for line in output.splitlines() if line.strip()]
    assert len(completions) == len(answers), (len(completions), len(answers))
    return sum(got.strip() == want for got, want in zip(completions, answers)) / len(answers)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/sft-experiment"))
    parser.add_argument("--base-config", default="configs/tiny.yaml")
    parser.add_argument("--pretrain", nargs="*", default=["train.steps=150", "train.seq_len=128", "train.batch_size=16",
                                                          "optimizer.lr=3e-3", "optimizer.warmup_steps=30"],
                        help="overrides for train.pretrain")
    parser.add_argument("--sft", nargs="*", default=["sft.epochs=8", "optimizer.lr=1e-3", "optimizer.warmup_steps=20",
                                                     "train.batch_size=16", "train.seq_len=128"],
                        help="overrides for train.sft")
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse-pretrain", action="store_true",
                        help="keep a finished OUT/pretrain run instead of pretraining again")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # Orbax reads no checkpoint metadata under a relative path
    args.out.mkdir(parents=True, exist_ok=True)

    pretrain_dir, sft_dir = args.out / "pretrain", args.out / "sft"
    stages = StageTimes()
    timed, seconds = stages.run, stages.seconds

    if not args.reuse_pretrain:
        timed("pretrain", run, ["train.pretrain", args.base_config, f"run_dir={pretrain_dir}", *args.pretrain])
    tokenizer = pretrain_dir / "tokenizer.model"  # train.pretrain keeps its tokenizer in the run directory
    train_path, test_path, answers = make_task(args.out, args.train_size, args.test_size, args.seed)
    before = timed("eval_before", exact_match, pretrain_dir, tokenizer, test_path, answers,
                   args.out / "completions_before.jsonl")
    print(f"exact match before SFT: {before:.1%}", file=sys.stderr, flush=True)
    if sft_dir.exists():  # train.sft would resume it; the experiment always fine-tunes the pretrained model afresh
        shutil.rmtree(sft_dir)
    timed("sft", run, ["train.sft", args.base_config, f"run_dir={sft_dir}", f"init_from={pretrain_dir}",
                       f"data.path={train_path}", f"data.tokenizer={tokenizer}", *args.sft])
    after = timed("eval_after", exact_match, sft_dir, tokenizer, test_path, answers,
                  args.out / "completions_after.jsonl")
    result = {"exact_match_before": before, "exact_match_after": after, "train_conversations": args.train_size,
              "test_prompts": len(answers), "pretrain_overrides": args.pretrain, "sft_overrides": args.sft,
              "reused_pretrain": args.reuse_pretrain, "seconds": seconds,
              "total_seconds": round(sum(seconds.values()), 1)}
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
