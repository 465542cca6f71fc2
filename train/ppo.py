"""PPO against reward models: `python -m train.ppo CONFIG.yaml init_from=SFT_MODEL judge.helpfulness=REWARD_MODEL
data.path=prompts.jsonl [judge.safety=SAFETY_MODEL]`.

The policy starts from `init_from` (the SFT model), which also stays frozen as the KL reference. Each step samples
one answer per prompt of a batch (`rollout.*`), scores them (`judge.*`: Llama 2's helpfulness/safety combination,
whitened), and runs `ppo.epochs` × `ppo.minibatches` clipped-objective updates (`llama_jax.ppo`). Prompts: JSONL
with "prompt" (a string or messages ending on a user turn) and an optional "safety" tag, rendered in `sft.format`.
Sequences are `ppo.prompt_len` + `rollout.max_new_tokens` tokens (train.seq_len is set to that). The run machinery
is pretraining's: the rollout RNG and the prompt position live in the checkpointed state, so a resumed run samples
the same answers. `llama_jax.load(run_dir)` reads the tuned policy.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

from llama_jax.chat_format import dialog_prompt, generation_stop_ids
from llama_jax.cli import run_program
from llama_jax.errors import DataError
from llama_jax.metrics import StartClock
from llama_jax.params import model_params
from llama_jax.ppo import PPOTrainer, PromptBatches
from llama_jax.preference_data import read_prompts
from llama_jax.reward_model import load_judges
from llama_jax.run_loop import (
    keep_tokenizer,
    load_fine_tuning_base,
    peak_flops,
    program_config,
    train,
    write_run_config,
)
from llama_jax.sharding import mesh_from_config, rules_from_config

USAGE = """usage: python -m train.ppo CONFIG.yaml init_from=SFT_MODEL judge.helpfulness=REWARD_MODEL \\
    data.path=PROMPTS.jsonl [judge.safety=REWARD_MODEL] [key=value ...]

Config keys (as for train.sft, plus ppo.*, rollout.*, judge.*):
"""


def main(argv: Sequence[str]) -> int:
    clock = StartClock()
    config = program_config(argv, USAGE, clock)
    if isinstance(config, int):
        return config
    seq_len = config.ppo.prompt_len + config.rollout.max_new_tokens
    base = load_fine_tuning_base(config, init_from="the SFT model PPO tunes (also the frozen KL reference)",
                                 data="prompts (JSONL with \"prompt\")", seq_len=seq_len,
                                 seq_len_key="ppo.prompt_len + rollout.max_new_tokens")
    policy, tokenizer, model_config = base.model, base.tokenizer, base.model_config
    config = dataclasses.replace(config, model=model_config, train=dataclasses.replace(config.train, seq_len=seq_len))
    judges = load_judges(config.judge, tokenizer, config.init_from, model_config.vocab_size)
    prompts = read_prompts(config.data.path)
    encoded = []
    for prompt in prompts:
        tokens = dialog_prompt(prompt.messages, tokenizer, config.sft.format)
        if len(tokens) > config.ppo.prompt_len:
            raise DataError(f"{prompt.where}: the prompt is {len(tokens)} tokens, more than ppo.prompt_len="
                            f"{config.ppo.prompt_len}")
        encoded.append(tokens)
    batches = PromptBatches(encoded, [prompt.safety for prompt in prompts], config.ppo.prompt_len,
                            config.train.batch_size, config.seed)
    clock.mark("data")
    mesh = mesh_from_config(config.mesh)
    policy_params = model_params(policy)
    trainer = PPOTrainer.create_ppo(model_config, config.optimizer, config.train.steps, mesh, config.ppo,
                                    config.rollout, config.judge, policy_params, judges,
                                    generation_stop_ids(tokenizer, config.sft.format), tokenizer.pad_id,
                                    rules_from_config(config.sharding_rules))
    del judges, policy
    run_dir = Path(config.run_dir)
    write_run_config(config, run_dir)
    keep_tokenizer(tokenizer, run_dir)
    if jax.process_index() == 0:
        print(f"PPO from {config.init_from} on {len(prompts)} prompts for {config.train.steps} steps "
              f"({config.train.batch_size} rollouts, {config.ppo.epochs} epochs × {config.ppo.minibatches} "
              f"minibatches each; KL β {config.ppo.kl_beta})", file=sys.stderr)

    def prompt_batch(index: int):
        local = batches.batch(index, process_index=jax.process_index(), process_count=jax.process_count())
        return trainer.place_rows(local, config.train.batch_size)

    train(trainer, config, run_dir, prompt_batch, None, peak_flops(config, mesh.size),
          init_state=lambda: trainer.state_from_params(policy_params, config.seed), start_clock=clock)
    if jax.process_index() == 0:
        print(f"PPO-tuned policy in {run_dir} (e.g. python -m eval.chat --model {run_dir})")
    return 0


if __name__ == "__main__":
    run_program(main)
