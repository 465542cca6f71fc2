"""Direct preference optimisation: `python -m train.dpo CONFIG.yaml init_from=SFT_MODEL data.path=pairs.jsonl`.

The policy starts from `init_from` (an SFT model); the frozen reference is that model (or `dpo.reference`), held
beside the policy and sharded like it, or replaced by log-probabilities computed once before training
(`dpo.precompute_reference=true`). Pairs are TRL's preference format rendered in `sft.format` as SFT renders them.
Loss `dpo.loss` (sigmoid, with `dpo.label_smoothing`; or ipo) with `dpo.beta` (0.1); metrics named as TRL names
them (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected). The
run machinery is pretraining's; `llama_jax.load(run_dir)` reads the tuned policy.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

import llama_jax
from llama_jax.cli import run_program
from llama_jax.dpo import DPOTrainer, precompute_reference
from llama_jax.errors import ConfigError
from llama_jax.metrics import StartClock
from llama_jax.params import model_params
from llama_jax.preference_data import PairBatches, global_pair_batch, read_encoded_pairs
from llama_jax.run_loop import (
    keep_tokenizer,
    load_fine_tuning_base,
    peak_flops,
    program_config,
    train,
    write_run_config,
)
from llama_jax.sharding import mesh_from_config, rules_from_config

USAGE = """usage: python -m train.dpo CONFIG.yaml init_from=SFT_MODEL data.path=PAIRS.jsonl [key=value ...]

Config keys (as for train.sft, plus dpo.*):
"""


def main(argv: Sequence[str]) -> int:
    clock = StartClock()
    config = program_config(argv, USAGE, clock)
    if isinstance(config, int):
        return config
    seq_len = config.train.seq_len
    base = load_fine_tuning_base(config, init_from="the SFT model DPO tunes",
                                 data="preference pairs (JSONL with prompt, chosen, rejected)", seq_len=seq_len)
    policy, tokenizer, model_config = base.model, base.tokenizer, base.model_config
    policy_params = model_params(policy)
    reference_params = policy_params
    if config.dpo.reference is not None:
        reference = llama_jax.load(config.dpo.reference)
        if reference.config.vocab_size != policy.config.vocab_size or \
                model_params(reference).keys() != policy_params.keys():
            raise ConfigError(f"dpo.reference={config.dpo.reference} is not the same architecture as init_from="
                              f"{config.init_from}")
        reference_params = model_params(reference)
    pairs = read_encoded_pairs(config.data.path, tokenizer, config)
    batch_size = config.train.batch_size
    clock.mark("data")
    steps = config.train.steps
    if config.sft.epochs is not None:
        steps = max(1, math.ceil(config.sft.epochs * (len(pairs) // batch_size)))
    config = dataclasses.replace(config, model=model_config, train=dataclasses.replace(config.train, steps=steps))
    mesh = mesh_from_config(config.mesh)
    rules = rules_from_config(config.sharding_rules)
    precomputed = config.dpo.precompute_reference
    trainer = DPOTrainer.create_dpo(model_config, config.optimizer, steps, mesh, config.dpo,
                                    None if precomputed else reference_params, rules, config.train.grad_accum)
    if precomputed:
        pairs = precompute_reference(trainer, reference_params, pairs, seq_len, batch_size, tokenizer.pad_id)
    del reference_params
    batches = PairBatches(pairs, seq_len, batch_size, tokenizer.pad_id, config.seed)
    eval_batches = None
    if config.data.valid_path is not None:
        valid_pairs = read_encoded_pairs(config.data.valid_path, tokenizer, config)
        if precomputed:
            raise ConfigError("data.valid_path with dpo.precompute_reference=true is not supported: the validation "
                              "loss needs the reference model")
        valid = PairBatches(valid_pairs, seq_len, batch_size, tokenizer.pad_id, config.seed)
        eval_batches = lambda index: global_pair_batch(trainer, valid, index)  # noqa: E731
    run_dir = Path(config.run_dir)
    write_run_config(config, run_dir)
    keep_tokenizer(tokenizer, run_dir)
    if jax.process_index() == 0:
        print(f"DPO ({config.dpo.loss}, beta {config.dpo.beta}) from {config.init_from} on {len(pairs)} preference "
              f"pairs for {steps} steps", file=sys.stderr)
    train(trainer, config, run_dir, lambda index: global_pair_batch(trainer, batches, index), eval_batches,
          peak_flops(config, mesh.size), init_state=lambda: trainer.state_from_params(policy_params, config.seed),
          start_clock=clock)
    if jax.process_index() == 0:
        print(f"DPO-tuned model in {run_dir} (e.g. python -m eval.chat --model {run_dir})")
    return 0


if __name__ == "__main__":
    run_program(main)
