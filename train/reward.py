"""Reward-model training as Llama 2 did it: `python -m train.reward CONFIG.yaml init_from=PATH data.path=pairs.jsonl`.

The model starts from a pretrained or SFT checkpoint (`init_from`): its backbone, and a fresh scalar head reading the
hidden state of the answer's last token. Preference pairs (TRL's format, `llama_jax.preference_data`) are rendered in
the chat format `sft.format` exactly as SFT renders conversations; the loss is −log σ(r(x, y_c) − r(x, y_r) − m(r)),
m(r) from each pair's `margin` or `strength` (`reward.margin_*`; `reward.use_margin=false` for the plain ranking
loss). Metrics per logged step: loss, accuracy, reward_chosen, reward_rejected, margin. Everything else — sharding,
checkpoints, exact resume, SIGTERM save, rollback, metrics.jsonl — is the run loop's. `llama_jax.load(run_dir)`
returns the trained `RewardModel`; `python -m eval.reward` scores with it.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

from llama_jax.cli import run_program
from llama_jax.metrics import StartClock
from llama_jax.params import model_params
from llama_jax.preference_data import PairBatches, global_pair_batch, read_encoded_pairs
from llama_jax.reward_model import RewardTrainer, reward_params_from_policy
from llama_jax.run_loop import (
    keep_tokenizer,
    load_fine_tuning_base,
    peak_flops,
    program_config,
    train,
    write_run_config,
)
from llama_jax.sharding import mesh_from_config, rules_from_config

USAGE = """usage: python -m train.reward CONFIG.yaml init_from=CHECKPOINT data.path=PAIRS.jsonl [key=value ...]

Preference pairs: TRL's format, {"prompt", "chosen", "rejected"} strings or message lists, optional "margin" or
"strength". Config keys (as for train.sft, plus reward.*):
"""
def main(argv: Sequence[str]) -> int:
    clock = StartClock()
    config = program_config(argv, USAGE, clock)
    if isinstance(config, int):
        return config
    seq_len = config.train.seq_len
    base = load_fine_tuning_base(
        config, init_from="the pretrained or SFT checkpoint the reward model starts from",
        data="preference pairs (JSONL with prompt, chosen, rejected)", seq_len=seq_len)
    pretrained, tokenizer, model_config = base.model, base.tokenizer, base.model_config
    pairs = read_encoded_pairs(config.data.path, tokenizer, config)
    batches = PairBatches(pairs, seq_len, config.train.batch_size, tokenizer.pad_id, config.seed)
    clock.mark("data")
    steps = config.train.steps
    if config.sft.epochs is not None:
        steps = max(1, math.ceil(config.sft.epochs * batches.batches_per_epoch))
    config = dataclasses.replace(config, model=model_config, train=dataclasses.replace(config.train, steps=steps))
    run_dir = Path(config.run_dir)
    mesh = mesh_from_config(config.mesh)
    trainer = RewardTrainer.create_reward(model_config, config.optimizer, steps, mesh, config.reward,
                                          rules_from_config(config.sharding_rules), config.train.grad_accum)
    initial = reward_params_from_policy(model_params(pretrained), model_config, jax.random.key(config.seed))
    del pretrained
    eval_batches = None
    if config.data.valid_path is not None:
        valid = PairBatches(read_encoded_pairs(config.data.valid_path, tokenizer, config), seq_len,
                            config.train.batch_size, tokenizer.pad_id, config.seed)
        eval_batches = lambda index: global_pair_batch(trainer, valid, index)  # noqa: E731
    write_run_config(config, run_dir)
    keep_tokenizer(tokenizer, run_dir)
    if jax.process_index() == 0:
        print(f"training a reward model from {config.init_from} on {len(pairs)} preference pairs for {steps} steps "
              f"({batches.batches_per_epoch} batches per epoch)", file=sys.stderr)
    train(trainer, config, run_dir, lambda index: global_pair_batch(trainer, batches, index), eval_batches,
          peak_flops(config, mesh.size), init_state=lambda: trainer.state_from_params(initial, config.seed),
          start_clock=clock)
    if jax.process_index() == 0:
        print(f"reward model in {run_dir} (score with python -m eval.reward --model {run_dir} ...)")
    return 0


if __name__ == "__main__":
    run_program(main)
