"""Does the Llama 2-Chat recipe after SFT really work? A tiny end-to-end run through the public programs:
pretrain → SFT → reward model → rejection sampling → PPO and DPO, judged by a rule the models never see.

    python -m scripts.alignment_experiment --out runs/alignment-exp [--reuse] [--quick]

The task: "List four words for <name>." → four distinct words from a fixed list of 24 (SFT data: uniformly random
words). The hidden preference: an answer is better the more distinct *liked* words it holds (six of the 24: colours
and metals). Preference pairs are pairs of random answers, the one with more liked words chosen, the difference
giving Llama 2's strength label (1 → slightly better, 2 → better, ≥3 → significantly better). Nothing states the
rule: the reward model must infer it from pairs, and the policies from the reward model (RS, PPO) or the pairs (DPO).

Measured on held-out prompts (names never seen in training), with `eval.generate` and the rule itself:
- reward model accuracy on held-out pairs, by strength, with the margin loss and without (`reward.use_margin`);
  and the same ablation where it can show (few pairs, labels flipped more often the closer the pair, several seeds);
- mean rule score of the greedy answers and of 4 sampled answers (temperature 1) per prompt of the SFT, RS, DPO and
  PPO models (PPO with KL β 0.01, Llama 2's, and 0.1), and the reward model's mean score of the greedy answers;
- win rate of each tuned policy over the SFT policy by the rule (ties count half), greedy and sampled;
- PPO's KL to the reference over the run (from its metrics.jsonl); wall time per stage.
Everything is written to OUT (result.json).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from llama_jax.perf import StageTimes
from scripts.sft_experiment import run

WORDS = ("apple river stone cloud green seven table quiet music north orange silver window garden yellow winter "
         "forest candle rabbit mirror planet copper violet meadow").split()
LIKED = frozenset("green orange silver yellow violet copper".split())
SYLLABLES = "ka lo mi ne ru ta vo zi be do fa gu hi ja ke li mo nu pa re si to".split()
PROMPT = "List four words for {}."
STRENGTH_BY_DIFFERENCE = {1: "slightly better", 2: "better", 3: "significantly better", 4: "significantly better"}


def rule_score(answer: str) -> int:
    """The hidden preference: distinct liked words in the answer."""
    return len(LIKED & set(answer.replace(",", " ").replace(".", " ").lower().split()))


class Task:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.used: set[str] = set()

    def name(self) -> str:
        while True:
            name = "".join(self.rng.choice(SYLLABLES) for _ in range(3)).capitalize()
            if name not in self.used:
                self.used.add(name)
                return name

    def answer(self) -> str:
        return " ".join(self.rng.sample(WORDS, 4))

    def pair(self) -> dict:
        prompt = PROMPT.format(self.name())
        while True:
            first, second = self.answer(), self.answer()
            difference = rule_score(first) - rule_score(second)
            if difference:
                break
        chosen, rejected = (first, second) if difference > 0 else (second, first)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
                "strength": STRENGTH_BY_DIFFERENCE[abs(difference)]}


def write_jsonl(path: Path, records: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def make_task(out: Path, sizes: dict[str, int], seed: int) -> dict[str, Path]:
    task = Task(seed)
    sft = [{"messages": [{"role": "user", "content": PROMPT.format(task.name())},
                         {"role": "assistant", "content": task.answer()}]} for _ in range(sizes["sft"])]
    return {"sft": write_jsonl(out / "sft.jsonl", sft),
            "pairs": write_jsonl(out / "pairs.jsonl", [task.pair() for _ in range(sizes["pairs"])]),
            "valid_pairs": write_jsonl(out / "valid_pairs.jsonl", [task.pair() for _ in range(sizes["valid_pairs"])]),
            "prompts": write_jsonl(out / "prompts.jsonl",
                                   [{"prompt": PROMPT.format(task.name())} for _ in range(sizes["prompts"])]),
            "test_prompts": write_jsonl(out / "test_prompts.jsonl",
                                        [{"prompt": PROMPT.format(task.name())} for _ in range(sizes["test"])])}


def answers_of(model: Path, tokenizer: Path, prompts: Path, record: Path, temperature: float = 0.0,
               seed: int = 0) -> list[str]:
    """The model's answers to the prompts with eval.generate: greedy, or sampled at `temperature` with `seed`."""
    output = run(["eval.generate", "--model", str(model), "--tokenizer", str(tokenizer), "--prompts", str(prompts),
                  "--chat-format", "llama2", "--max-new-tokens", "16", "--batch-size", "32", "--json",
                  "--temperature", str(temperature), "--seed", str(seed)])
    record.write_text(output)
    return [json.loads(line)["completion"] for line in output.splitlines() if line.strip()]


def noisy_pairs(path: Path, count: int, seed: int, flip: dict[str, float]) -> Path:
    """Preference pairs whose labels are flipped with a probability per strength, as annotators disagree more on
    close pairs than on clear ones (the regime where Llama 2 found the margin to help)."""
    task, rng = Task(seed), random.Random(seed + 1)
    records = []
    for _ in range(count):
        pair = task.pair()
        if rng.random() < flip[pair["strength"]]:
            pair["chosen"], pair["rejected"] = pair["rejected"], pair["chosen"]
        records.append(pair)
    return write_jsonl(path, records)


def reward_scores(reward_model: Path, prompts: Path, answers: list[str], out: Path) -> list[float]:
    requests = [{"prompt": json.loads(line)["prompt"], "response": answer}
                for line, answer in zip(prompts.read_text().splitlines(), answers)]
    path = write_jsonl(out, requests)
    output = run(["eval.reward", "--model", str(reward_model), "--score", str(path), "--batch-size", "32"])
    return [json.loads(line)["score"] for line in output.splitlines() if line.strip()]


def pair_accuracy(reward_model: Path, pairs: Path) -> dict:
    return json.loads(run(["eval.reward", "--model", str(reward_model), "--pairs", str(pairs), "--json",
                           "--batch-size", "32"]))


def win_rate(tuned: list[str], reference: list[str]) -> float:
    """Share of prompts where the tuned answer beats the reference answer by the rule (ties count half)."""
    points = [1.0 if rule_score(a) > rule_score(b) else 0.5 if rule_score(a) == rule_score(b) else 0.0
              for a, b in zip(tuned, reference)]
    return sum(points) / len(points)


def ppo_kl(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kls = [record["kl"] for record in records if "kl" in record]
    rewards = [record["reward"] for record in records if "reward" in record]
    return {"kl_first": kls[0], "kl_last": kls[-1], "kl_max": max(kls), "reward_first": rewards[0],
            "reward_last": rewards[-1]}


def fresh(path: Path) -> Path:
    """Every stage starts over (the programs would resume a run directory that exists)."""
    if path.exists():
        shutil.rmtree(path)
    return path


def stage(stages: StageTimes, name: str, run_dir: Path, reuse: bool, args: list[str]) -> None:
    """Run a training program into `run_dir` afresh, or keep it (--reuse) if a previous run of it finished."""
    finished = (run_dir / "config.yaml").is_file() and (
        (run_dir / "checkpoints").is_dir() or (run_dir / "rejection_sampling.json").is_file())
    if reuse and finished:
        print(f"{name}: reusing {run_dir}", file=sys.stderr)
        return
    fresh(run_dir)
    stages.run(name, run, args)


NOISE = {"slightly better": 0.3, "better": 0.15, "significantly better": 0.05}


def margin_ablation(out: Path, stages: StageTimes, sft: Path, tok: list[str], common: list[str],
                    files: dict[str, Path], seeds: int, quick: bool, reuse: bool) -> dict:
    """Llama 2's margin ablation in a regime where it can show: few pairs, labels flipped more often the closer the
    pair (NOISE), one epoch; held-out accuracy by strength with and without the margin, averaged over seeds."""
    by_setting: dict[str, list[dict]] = {"margin": [], "no_margin": []}
    for seed in range(seeds):
        pairs = noisy_pairs(out / f"ablation_pairs_{seed}.jsonl", 64 if quick else 384, 1000 + seed, NOISE)
        for label, use_margin in (("margin", "true"), ("no_margin", "false")):
            run_dir = out / f"ablation_{label}_{seed}"
            stage(stages, f"ablation_{label}_{seed}", run_dir, reuse, [
                "train.reward", *common, f"run_dir={run_dir}", f"init_from={sft}", f"data.path={pairs}", *tok,
                f"reward.use_margin={use_margin}", "train.seq_len=64", "sft.epochs=1", "optimizer.lr=3e-4",
                "optimizer.warmup_steps=5", "train.batch_size=16", f"seed={seed}"])
            by_setting[label].append(pair_accuracy(run_dir, files["valid_pairs"]))
    summary = {}
    for label, reports in by_setting.items():
        strengths = sorted({name for report in reports for name in report["accuracy_by_strength"]})
        summary[label] = {"accuracy": sum(r["accuracy"] for r in reports) / len(reports),
                          "accuracy_by_strength": {name: sum(r["accuracy_by_strength"].get(name, 0.0)
                                                             for r in reports) / len(reports)
                                                   for name in strengths},
                          "per_seed": [r["accuracy"] for r in reports]}
    summary["pairs_per_run"] = 64 if quick else 384
    summary["label_flip_probability"] = NOISE
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/alignment-experiment"))
    parser.add_argument("--base-config", default="configs/tiny.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse-pretrain", action="store_true", help="keep a finished OUT/pretrain run")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps: checks the pipeline only")
    parser.add_argument("--reuse", action="store_true", help="keep every stage that finished in a previous run")
    parser.add_argument("--ablation-seeds", type=int, default=3, help="seeds of the margin ablation")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    sizes = ({"sft": 256, "pairs": 256, "valid_pairs": 64, "prompts": 64, "test": 32} if quick else
             {"sft": 2000, "pairs": 3000, "valid_pairs": 500, "prompts": 512, "test": 128})
    common = [args.base_config, "train.seq_len=128", "train.peak_tflops=1", "checkpoint.every_steps=0",
              "eval.every_steps=100000", f"seed={args.seed}"]
    pretrain, sft = out / "pretrain", out / "sft"
    stages = StageTimes()
    previous = out / "result.json"
    if args.reuse and previous.is_file():  # a reused stage keeps the time it took when it ran
        stages.seconds.update(json.loads(previous.read_text()).get("seconds", {}))
    timed, reuse = stages.run, args.reuse

    if not (args.reuse_pretrain or args.reuse):
        fresh(pretrain)
    stage(stages, "pretrain", pretrain, True, [
        "train.pretrain", args.base_config, f"run_dir={pretrain}", f"train.steps={20 if quick else 150}",
        "train.seq_len=128", "train.batch_size=16", "optimizer.lr=3e-3", "optimizer.warmup_steps=30",
        "train.peak_tflops=1"])
    tokenizer = pretrain / "tokenizer.model"
    files = make_task(out, sizes, args.seed)
    tok = [f"data.tokenizer={tokenizer}"]
    stage(stages, "sft", sft, reuse, [
        "train.sft", *common, f"run_dir={sft}", f"init_from={pretrain}", f"data.path={files['sft']}", *tok,
        f"sft.epochs={1 if quick else 4}", "optimizer.lr=1e-3", "optimizer.warmup_steps=10", "train.batch_size=16"])

    reward_runs = {}
    for label, use_margin in (("margin", "true"), ("no_margin", "false")):
        reward_runs[label] = out / f"reward_{label}"
        stage(stages, f"reward_model_{label}", reward_runs[label], reuse, [
            "train.reward", *common, f"run_dir={reward_runs[label]}", f"init_from={sft}",
            f"data.path={files['pairs']}", *tok, f"reward.use_margin={use_margin}", "train.seq_len=64",
            f"sft.epochs={1 if quick else 2}", "optimizer.lr=3e-4", "optimizer.warmup_steps=10",
            "train.batch_size=16"])
    reward = reward_runs["margin"]
    accuracy = {label: timed(f"reward_accuracy_{label}", pair_accuracy, path, files["valid_pairs"])
                for label, path in reward_runs.items()}
    ablation = margin_ablation(out, stages, sft, tok, common, files, args.ablation_seeds, quick, reuse)

    sampling = ["rollout.max_new_tokens=16", "rollout.temperature=1.0"]
    rs_data = out / "rejection_sampling"
    stage(stages, "rejection_sampling", rs_data, reuse, [
        "train.rejection_sampling", *common, f"run_dir={rs_data}", f"init_from={sft}",
        f"judge.helpfulness={reward}", f"data.path={files['prompts']}", *tok, "rejection.samples=8", *sampling])
    rs = out / "rs_sft"
    stage(stages, "rejection_sampling_sft", rs, reuse, [
        "train.sft", *common, f"run_dir={rs}", f"init_from={sft}",
        f"data.path={rs_data / 'rejection_sampled.jsonl'}", *tok, f"sft.epochs={1 if quick else 3}",
        "optimizer.lr=5e-4", "optimizer.warmup_steps=5", "train.batch_size=16"])

    dpo = out / "dpo"
    stage(stages, "dpo", dpo, reuse, [
        "train.dpo", *common, f"run_dir={dpo}", f"init_from={sft}", f"data.path={files['pairs']}", *tok,
        "train.seq_len=64", "sft.epochs=1", "optimizer.lr=2e-4", "optimizer.warmup_steps=10", "train.batch_size=16",
        "dpo.beta=0.1"])
    ppo_runs = {}
    for label, beta in (("ppo", 0.01), ("ppo_kl0.1", 0.1)):
        ppo_runs[label] = out / label
        stage(stages, label, ppo_runs[label], reuse, [
            "train.ppo", *common, f"run_dir={ppo_runs[label]}", f"init_from={sft}", f"judge.helpfulness={reward}",
            f"data.path={files['prompts']}", *tok, *sampling, "ppo.prompt_len=48",
            f"train.steps={4 if quick else 60}", "train.batch_size=32", "ppo.minibatches=2", "ppo.epochs=4",
            "optimizer.lr=2e-5", "optimizer.warmup_steps=5", "optimizer.min_lr_ratio=1.0", f"ppo.kl_beta={beta}",
            "train.log_every_steps=1"])

    policies = {"sft": sft, "rejection_sampling": rs, "dpo": dpo, **ppo_runs}
    answers, sampled, rule, rule_sampled, scores = {}, {}, {}, {}, {}
    for label, model in policies.items():
        answers[label] = timed(f"eval_{label}", answers_of, model, tokenizer, files["test_prompts"],
                               out / f"answers_{label}.jsonl")
        sampled[label] = [answer for seed in range(4) for answer in answers_of(
            model, tokenizer, files["test_prompts"], out / f"sampled_{label}_{seed}.jsonl", 1.0, seed)]
        rule[label] = sum(map(rule_score, answers[label])) / len(answers[label])
        rule_sampled[label] = sum(map(rule_score, sampled[label])) / len(sampled[label])
        scores[label] = sum(reward_scores(reward, files["test_prompts"], answers[label],
                                          out / f"score_requests_{label}.jsonl")) / len(answers[label])
    result = {
        "reward_model_accuracy": accuracy, "margin_ablation": ablation,
        "rejection_sampling_round": json.loads((rs_data / "rejection_sampling.json").read_text()),
        "mean_rule_score_greedy": rule, "mean_rule_score_sampled": rule_sampled,
        "mean_reward_model_score_greedy": scores,
        "win_rate_over_sft_by_rule_greedy": {label: win_rate(answers[label], answers["sft"]) for label in answers
                                             if label != "sft"},
        "win_rate_over_sft_by_rule_sampled": {label: win_rate(sampled[label], sampled["sft"]) for label in sampled
                                              if label != "sft"},
        "ppo": {label: ppo_kl(path) for label, path in ppo_runs.items()}, "sizes": sizes, "seconds": stages.seconds,
        "total_seconds": round(sum(stages.seconds.values()), 1)}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
