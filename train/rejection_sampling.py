"""One round of rejection-sampling fine-tuning data: `python -m train.rejection_sampling CONFIG.yaml
init_from=POLICY judge.helpfulness=REWARD_MODEL data.path=prompts.jsonl [rejection.samples=K] [key=value ...]`.

Samples `rejection.samples` answers per prompt from the policy (`rollout.temperature`, `rollout.top_p`,
`rollout.max_new_tokens`, `seed`), scores them with the reward model(s) (`judge.*`), keeps each prompt's best
(only if at least `rejection.threshold`, when set) and writes them as SFT conversations with their scores
(`rejection.out`, default `<run_dir>/rejection_sampled.jsonl`); `<run_dir>/rejection_sampling.json` records the
round's mean score of all samples, of the first sample per prompt, and of the kept ones. Fine-tune on the written
file with `python -m train.sft CONFIG init_from=POLICY data.path=<that file>` (the next round samples from the
result). Prompt files are as train.ppo's. Runs in one process (generation on one device).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import llama_jax
from llama_jax.chat_format import generation_stop_ids
from llama_jax.cli import run_program
from llama_jax.errors import ConfigError
from llama_jax.generate import Sampling
from llama_jax.metrics import StartClock
from llama_jax.preference_data import read_prompts
from llama_jax.rejection_sampling import sample_and_score, summarize, write_sft_data
from llama_jax.reward_model import load_judges
from llama_jax.run_loop import fine_tuning_tokenizer, keep_tokenizer, program_config, write_run_config

USAGE = """usage: python -m train.rejection_sampling CONFIG.yaml init_from=POLICY judge.helpfulness=REWARD_MODEL \\
    data.path=PROMPTS.jsonl [rejection.samples=K] [rejection.threshold=S] [rejection.out=FILE] [key=value ...]

Config keys (rejection.*, rollout.*, judge.*, sft.format, seed):
"""
SUMMARY_FILE = "rejection_sampling.json"


def main(argv: Sequence[str]) -> int:
    config = program_config(argv, USAGE, StartClock())
    if isinstance(config, int):
        return config
    if config.init_from is None:
        raise ConfigError("init_from is required: the policy to sample answers from")
    if config.data.path is None:
        raise ConfigError("data.path is required: prompts (JSONL with \"prompt\")")
    policy = llama_jax.load(config.init_from)
    tokenizer = fine_tuning_tokenizer(config)
    judges = load_judges(config.judge, tokenizer, config.init_from, policy.config.vocab_size)
    prompts = read_prompts(config.data.path)
    run_dir = Path(config.run_dir)
    out = Path(config.rejection.out) if config.rejection.out is not None else run_dir / "rejection_sampled.jsonl"
    rollout, rejection = config.rollout, config.rejection
    print(f"sampling {rejection.samples} answers to each of {len(prompts)} prompts from {config.init_from}",
          file=sys.stderr)
    sampled = sample_and_score(policy, judges, tokenizer, config.sft.format, prompts, samples=rejection.samples,
                               sampling=Sampling(temperature=rollout.temperature, top_p=rollout.top_p),
                               max_new_tokens=rollout.max_new_tokens, seed=config.seed,
                               batch_size=rejection.batch_size,
                               stop_ids=sorted(generation_stop_ids(tokenizer, config.sft.format)),
                               safety_threshold=config.judge.safety_threshold)
    kept, summary = summarize(sampled, rejection.threshold)
    write_run_config(config, run_dir)
    keep_tokenizer(tokenizer, run_dir)
    write_sft_data(out, kept)
    (run_dir / SUMMARY_FILE).write_text(json.dumps({**summary.to_dict(), "sft_data": str(out)}, indent=2) + "\n")
    print(f"kept {summary.kept} of {summary.prompts} prompts' best answers in {out}: mean score of the kept answers "
          f"{summary.mean_score_kept:.4f}, of all {summary.prompts * summary.samples_per_prompt} samples "
          f"{summary.mean_score_all:.4f} (one sample per prompt: {summary.mean_score_first:.4f})")
    print(f"fine-tune on them: python -m train.sft CONFIG init_from={config.init_from} data.path={out}")
    return 0


if __name__ == "__main__":
    run_program(main)
