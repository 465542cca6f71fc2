"""Memory per device of one PPO step (four models: policy + value head trained, reference and reward model frozen)
from an ahead-of-time compile of the real step on simulated devices, as `train.plan` does for pretraining.

    python -m scripts.plan_ppo --model llama2-7b --devices 8 --mesh 1x8x1 --rollouts 64 --prompt-len 1024 \
        --new-tokens 1024 [--minibatches 8] [--reward-model llama2-7b] [--json PATH]

Nothing is allocated: the state, the frozen models and the prompts are abstract shapes with this mesh's shardings,
and XLA:CPU compiles the step (rollout with the KV-cache decoder, scoring, GAE, the minibatch updates). The report
splits the per-device bytes into the trained state (policy + value head, AdamW moments), each frozen model, and the
compiler's temporaries (KV cache, activations, gradients). XLA:CPU schedules memory as a CPU does; a GPU compile
(different fusion, no host offload) differs by some percent (see llama_jax.planner's caveats).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

GIB = 1024 ** 3


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--reward-model", default=None, help="the reward model's preset (default: --model)")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--mesh", default="1x8x1")
    parser.add_argument("--rollouts", type=int, default=64, help="prompts per PPO step (global)")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--minibatches", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from train.plan import simulate_devices

    simulate_devices(args.devices)
    import dataclasses

    import jax
    import jax.numpy as jnp

    from llama_jax.cli import parse_mesh
    from llama_jax.config import OptimizerConfig, PPOConfig, RewardModelsConfig, RolloutConfig, resolve_model
    from llama_jax.planner import resolve_mesh
    from llama_jax.ppo import PPOTrainer
    from llama_jax.reward_model import RewardModel, reward_param_shapes
    from llama_jax.sharding import make_mesh

    policy_config = resolve_model(args.model)
    reward_config = resolve_model(args.reward_model or args.model)
    data, fsdp, tensor = resolve_mesh(parse_mesh(args.mesh), args.devices)
    mesh = make_mesh(data, fsdp, tensor)
    ppo = PPOConfig(epochs=args.epochs, minibatches=args.minibatches, prompt_len=args.prompt_len)
    rollout = RolloutConfig(max_new_tokens=args.new_tokens)
    abstract_reward = RewardModel(reward_config, {name: jax.ShapeDtypeStruct(shape, jnp.float32)
                                                  for name, shape in reward_param_shapes(reward_config).items()})
    trainer = PPOTrainer(policy_config, mesh, optimizer=None, schedule=None, ppo=ppo, rollout=rollout,
                         judge=RewardModelsConfig(), reward_configs=(reward_config,), stop_ids=(2,), pad_id=0,
                         frozen=None)
    from llama_jax.trainer import learning_rate_schedule, make_optimizer

    optimizer_config = OptimizerConfig(lr=1e-6, warmup_steps=0, min_lr_ratio=1.0)
    trainer = dataclasses.replace(trainer, optimizer=make_optimizer(optimizer_config, 1000),
                                  schedule=learning_rate_schedule(optimizer_config, 1000))
    frozen_shardings = trainer.frozen_shardings()
    reference_shapes = {name: spec.shape for name, spec in trainer.abstract_params().items()
                        if name in frozen_shardings["reference"]}
    frozen = {"reference": {name: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=frozen_shardings["reference"][name])
                            for name, shape in reference_shapes.items()},
              "reward_0": {name: jax.ShapeDtypeStruct(value.shape, jnp.float32,
                                                      sharding=frozen_shardings["reward_0"][name])
                           for name, value in abstract_reward.params.items()}}
    trainer = dataclasses.replace(trainer, frozen=frozen)
    state = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                         trainer.abstract_state(), trainer.state_shardings())
    batch_shape = (args.rollouts, args.prompt_len + args.new_tokens)
    batch_sharding = trainer.batch_shardings(batch_shape)
    batch = {name: jax.ShapeDtypeStruct((args.rollouts, args.prompt_len), jnp.int32, sharding=batch_sharding)
             for name in ("prompt_tokens", "prompt_segment_ids", "prompt_positions", "safety")}
    print(f"compiling one PPO step of {args.model} on {args.devices} simulated devices (mesh {data}x{fsdp}x{tensor})"
          f", {args.rollouts} rollouts of {args.prompt_len} + {args.new_tokens} tokens ...", file=sys.stderr)
    compiled = trainer.jit_step(batch_shape).lower(state, batch).compile()
    memory = compiled.memory_analysis()

    def per_device(tree) -> int:
        total = 0
        for leaf in jax.tree.leaves(tree):
            shard = leaf.sharding.shard_shape(leaf.shape)
            size = 1
            for dim in shard:
                size *= dim
            total += size * jnp.dtype(leaf.dtype).itemsize
        return total

    report = {
        "model": args.model, "reward_model": args.reward_model or args.model, "devices": args.devices,
        "mesh": [data, fsdp, tensor], "rollouts": args.rollouts, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "minibatches": args.minibatches, "epochs": args.epochs,
        "gib_per_device": {
            "policy_params_and_value_head": per_device(state.params) / GIB,
            "adamw_moments": per_device(state.opt_state) / GIB,
            "reference": per_device(frozen["reference"]) / GIB,
            "reward_model": per_device(frozen["reward_0"]) / GIB,
            "compiled_arguments": memory.argument_size_in_bytes / GIB,
            "compiled_temporaries": memory.temp_size_in_bytes / GIB,
            "peak": (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                     + memory.temp_size_in_bytes) / GIB}}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as output:
            json.dump(report, output, indent=2)
    return report


if __name__ == "__main__":
    main()
