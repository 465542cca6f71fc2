"""LoRA vs full fine-tuning on the SFT experiment's copy task, and QLoRA (int4 base) vs LoRA (float base).

    python -m scripts.lora_experiment --out runs/lora-exp [--reuse-pretrain] [--sft ...] [--lora ...]

Pretrains the tiny model as `scripts.sft_experiment` does (smaller by default, to fit a few CPU minutes), then
fine-tunes it three times with `train.sft` on the same conversations and settings: every parameter; LoRA adapters over
the float base; LoRA over an int4 base (QLoRA). The LoRA runs are merged into plain checkpoints with
`python -m llama_jax.convert.lora` and all three are scored by the same greedy `eval.generate` exact match on held-out
prompts. Also reported: the optimizer state's bytes in each run's final checkpoint, and the max / mean absolute
difference between the QLoRA and LoRA training-loss curves (same batches, same steps). Figures go to OUT/result.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from llama_jax.perf import StageTimes
from scripts.sft_experiment import exact_match, make_task, run


def optimizer_state_bytes(run_dir: Path) -> int:
    """Bytes of the optimizer state in the run's newest checkpoint."""
    from llama_jax.convert.native import ArrayReader, latest_run_checkpoint

    _, params = latest_run_checkpoint(run_dir)
    reader = ArrayReader(params.parent / "opt_state")
    return sum(reader.read(name).nbytes for name in reader.names())


def loss_curve(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {record["step"]: record["loss"] for record in records if "loss" in record and "step" in record}


def curve_gap(a: dict[int, float], b: dict[int, float]) -> dict[str, float]:
    steps = sorted(set(a) & set(b))
    gaps = [abs(a[step] - b[step]) for step in steps]
    return {"steps_compared": len(steps), "max_abs_diff": max(gaps), "mean_abs_diff": sum(gaps) / len(gaps),
            "final_loss_a": a[steps[-1]], "final_loss_b": b[steps[-1]]}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lora-experiment"))
    parser.add_argument("--base-config", default="configs/tiny.yaml")
    parser.add_argument("--pretrain", nargs="*", default=["train.steps=60", "train.seq_len=128", "train.batch_size=8",
                                                          "optimizer.lr=3e-3", "optimizer.warmup_steps=10",
                                                          "eval.every_steps=1000"],
                        help="overrides for train.pretrain")
    parser.add_argument("--sft", nargs="*", default=["sft.epochs=null", "train.steps=160", "train.batch_size=8",
                                                     "train.seq_len=128", "optimizer.warmup_steps=10",
                                                     "train.log_every_steps=4", "eval.every_steps=1000"],
                        help="overrides for train.sft shared by all three fine-tunes")
    parser.add_argument("--full", nargs="*", default=["optimizer.lr=1e-3"], help="overrides of the full fine-tune")
    parser.add_argument("--lora", nargs="*", default=["lora.rank=16", "lora.alpha=32", "optimizer.lr=3e-3",
                                                      "optimizer.weight_decay=0"],
                        help="overrides of the LoRA and QLoRA fine-tunes")
    parser.add_argument("--qlora-dtype", default="int4", choices=("int8", "int4", "nf4"))
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="full,lora,qlora",
                        help="which fine-tunes to run (comma-separated subset of full,lora,qlora)")
    parser.add_argument("--reuse-pretrain", action="store_true", help="keep a finished OUT/pretrain run")
    args = parser.parse_args(argv)
    out = args.out.resolve()  # Orbax reads no checkpoint metadata under a relative path
    out.mkdir(parents=True, exist_ok=True)
    pretrain_dir = out / "pretrain"
    stages = StageTimes()
    timed, seconds = stages.run, stages.seconds

    if not args.reuse_pretrain:
        timed("pretrain", run, ["train.pretrain", args.base_config, f"run_dir={pretrain_dir}", *args.pretrain])
    tokenizer = pretrain_dir / "tokenizer.model"
    train_path, test_path, answers = make_task(out, args.train_size, args.test_size, args.seed)
    common = [args.base_config, f"init_from={pretrain_dir}", f"data.path={train_path}", f"data.tokenizer={tokenizer}",
              *args.sft]
    variants = {"full": args.full, "lora": args.lora, "qlora": [*args.lora, f"lora.base_dtype={args.qlora_dtype}"]}
    variants = {name: overrides for name, overrides in variants.items() if name in args.variants.split(",")}
    result: dict = {"settings": {"pretrain": args.pretrain, "sft": args.sft, **variants,
                                 "train_conversations": args.train_size, "test_prompts": len(answers)}}
    for name, overrides in variants.items():
        run_dir = out / name
        if run_dir.exists():  # train.sft would resume it; each variant fine-tunes the pretrained model afresh
            shutil.rmtree(run_dir)
        timed(f"sft_{name}", run, ["train.sft", *common, f"run_dir={run_dir}", *overrides])
        model = run_dir
        if name != "full":
            model = out / f"{name}_merged"
            timed(f"merge_{name}", run, ["llama_jax.convert.lora", "--run", str(run_dir), "--merged", str(model),
                                         "--overwrite"])
        score = timed(f"eval_{name}", exact_match, model, tokenizer, test_path, answers,
                      out / f"completions_{name}.jsonl")
        result[name] = {"exact_match": score, "optimizer_state_bytes": optimizer_state_bytes(run_dir),
                        "final_loss": loss_curve(run_dir)[max(loss_curve(run_dir))]}
        print(f"{name}: exact match {score:.1%}, optimizer state {result[name]['optimizer_state_bytes']:,} bytes",
              file=sys.stderr, flush=True)
    if "lora" in variants and "qlora" in variants:
        result["qlora_vs_lora_loss"] = curve_gap(loss_curve(out / "qlora"), loss_curve(out / "lora"))
    result["seconds"] = seconds
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
