"""PPO against reward models, as Llama 2-Chat's RLHF stage: one pure train step per rollout batch.

A step takes a batch of prompts and the state (policy parameters with a value head, optimizer state, RNG) and,
inside one jitted program:
1. samples an answer per prompt with the KV-cache decoder (`generate.sample_in_graph`; temperature/top-p from
   `rollout.*`, the key split from the state's RNG, so a resumed run draws the same answers);
2. scores each answer with the reward model(s) (Llama 2's combination of helpfulness and safety, whitened over the
   batch: `judge.*`), and computes the policy's and the frozen reference's log-probabilities and the value head's
   estimates of every answer token;
3. turns them into per-token rewards R = score − β·KL(π‖π_ref) (`ppo.kl_beta`), advantages and returns by GAE
   (`ppo.gamma`, `ppo.lam`; advantages whitened);
4. runs `ppo.epochs` passes of `ppo.minibatches` minibatches of the clipped policy loss (ε `ppo.clip`) plus
   `ppo.value_coef` × the clipped value loss, one optimizer update each.
Metrics: reward (mean combined score before whitening), kl (mean per-answer Σ log π/π_ref), policy_loss,
value_loss, entropy, clip_fraction, response_length, loss (policy + weighted value loss), grad_norm.

The frozen models (reference and reward models) travel beside the state (`trainer.FrozenModelsTrainer`), each
sharded by the rules as a trained model would be. The value head (`value_head.weight` [dim, 1]) shares the policy's
backbone (TRL's `AutoModelForCausalLMWithValueHead`); a checkpoint's policy loads with `llama_jax.load`, which leaves
the value head out.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llama_jax.alignment import (
    combined_reward,
    generalized_advantages,
    kl_penalized_rewards,
    last_response_index,
    masked_mean,
    next_token_targets,
    ppo_policy_loss,
    ppo_value_loss,
    scalar_head,
    token_logprobs,
    token_values,
    whiten,
)
from llama_jax.config import ModelConfig, OptimizerConfig, PPOConfig, RewardModelsConfig, RolloutConfig
from llama_jax.data import epoch_document_order, process_rows
from llama_jax.errors import ConfigError, DataError
from llama_jax.generate import PaddedPrompts, Sampling, left_pad, sample_in_graph
from llama_jax.params import graphdef, merge_params, param_specs
from llama_jax.reward_model import SCORE, RewardModel, backbone_config
from llama_jax.sharding import DEFAULT_RULES, Rules, param_shardings, replicated
from llama_jax.trainer import Batch, FrozenModelsTrainer, TrainState, learning_rate_schedule, make_optimizer

Array = jax.Array
VALUE_HEAD = "value_head.weight"  # in convert.native.TRAINING_HEADS: loading a PPO run leaves it out
STOP_IDS_WIDTH = 8


@dataclass(frozen=True, kw_only=True)
class PPOTrainer(FrozenModelsTrainer):
    """(state, batch of prompts) → (state, metrics). `frozen` = {"reference": params, "reward_0": params[, "reward_1"]}
    (helpfulness, then safety)."""

    ppo: PPOConfig
    rollout: RolloutConfig
    judge: RewardModelsConfig
    reward_configs: tuple[ModelConfig, ...]
    stop_ids: tuple[int, ...]
    pad_id: int

    @classmethod
    def create_ppo(cls, model_config: ModelConfig, optimizer_config: OptimizerConfig, total_steps: int, mesh,
                   ppo: PPOConfig, rollout: RolloutConfig, judge: RewardModelsConfig,
                   reference: Mapping[str, Array], reward_models: Sequence[RewardModel], stop_ids: Sequence[int],
                   pad_id: int, rules: Rules = DEFAULT_RULES) -> PPOTrainer:
        updates = total_steps * ppo.epochs * ppo.minibatches  # the optimizer steps once per minibatch
        frozen = {"reference": dict(reference)}
        frozen.update({f"reward_{i}": dict(model.params) for i, model in enumerate(reward_models)})
        trainer = cls(model_config, mesh, rules, optimizer=make_optimizer(optimizer_config, updates),
                      schedule=learning_rate_schedule(optimizer_config, updates), ppo=ppo, rollout=rollout,
                      judge=judge, reward_configs=tuple(model.config for model in reward_models),
                      stop_ids=tuple(sorted(set(stop_ids))), pad_id=pad_id, frozen=frozen)
        return trainer.place_frozen()

    # ── Parameters: the policy and its value head ──
    def abstract_params(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {**super().abstract_params(), VALUE_HEAD: jax.ShapeDtypeStruct((self.model_config.dim, 1),
                                                                               jnp.float32)}

    def param_shardings(self):
        return {**super().param_shardings(), VALUE_HEAD: replicated(self.mesh)}

    def _init(self, seed: int) -> TrainState:
        state = super()._init(seed)
        params = {**state.params, VALUE_HEAD: jnp.zeros((self.model_config.dim, 1), jnp.float32)}
        return state.replace(params=params, opt_state=self.optimizer.init(params))

    def state_from_params(self, params: Mapping[str, Array], seed: int) -> TrainState:
        """The policy's parameters (a language model's) and a zero value head."""
        with_head = {**params, VALUE_HEAD: jnp.zeros((self.model_config.dim, 1), jnp.float32)}
        return super().state_from_params(with_head, seed)

    def frozen_shardings(self):
        """The reference like the policy; each reward model by the rules for its own shapes (head replicated)."""
        shardings = {"reference": super().param_shardings()}
        for i, config in enumerate(self.reward_configs):
            backbone = param_shardings(param_specs(backbone_config(config)), self.mesh, self.rules)
            shardings[f"reward_{i}"] = {**backbone, SCORE: replicated(self.mesh)}
        return shardings

    # ── The step ──
    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        rollout_key, shuffle_key, next_key = jax.random.split(jax.random.wrap_key_data(state.rng), 3)
        experience, rollout_metrics = self.experience(state.params, batch, jax.random.key_data(rollout_key))
        params, opt_state, update_metrics = self.optimize(state.params, state.opt_state, experience, shuffle_key)
        inner = self.ppo.epochs * self.ppo.minibatches
        metrics = {**rollout_metrics, **update_metrics, "lr": self.schedule(state.step * inner),
                   "tokens": jnp.sum(experience["mask"])}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             rng=jax.random.key_data(next_key)), metrics

    def experience(self, params: Mapping[str, Array], batch: Batch, key: Array
                   ) -> tuple[dict[str, Array], dict[str, Array]]:
        """Sample answers, score them and compute everything the updates need (no gradients flow from here)."""
        params = jax.lax.stop_gradient(params)
        policy = merge_params(self.graphdef, _without_head(params))
        prompts = PaddedPrompts(batch["prompt_tokens"], batch["prompt_segment_ids"], batch["prompt_positions"],
                                jnp.sum(batch["prompt_segment_ids"], axis=1))
        sampling = Sampling(temperature=self.rollout.temperature, top_p=self.rollout.top_p)
        stops = np.full(STOP_IDS_WIDTH, -1, np.int32)
        stops[:len(self.stop_ids)] = self.stop_ids
        answers = sample_in_graph(policy, prompts, key, sampling, jnp.asarray(stops), self.rollout.max_new_tokens)
        sequence = assemble(prompts, answers, jnp.asarray(stops), self.pad_id)
        targets, mask = next_token_targets(sequence["tokens"], sequence["response_mask"])
        hidden = policy.hidden_states(sequence["tokens"], positions=sequence["positions"],
                                      segment_ids=sequence["segment_ids"])
        old_logprobs, _ = token_logprobs(policy, hidden, targets)
        old_values = token_values(hidden, params[VALUE_HEAD]) * mask
        reference = merge_params(self.graphdef, jax.lax.stop_gradient(self.frozen["reference"]))
        reference_logprobs, _ = token_logprobs(reference, reference.hidden_states(
            sequence["tokens"], positions=sequence["positions"], segment_ids=sequence["segment_ids"]), targets)
        score = self.judge_scores(sequence, batch["safety"][:, 0])
        shaped = whiten(score) if self.judge.whiten else score
        rewards, kl = kl_penalized_rewards(shaped, old_logprobs, reference_logprobs, mask, self.ppo.kl_beta)
        advantages, returns = generalized_advantages(rewards, old_values, mask, gamma=self.ppo.gamma,
                                                     lam=self.ppo.lam)
        advantages = whiten(advantages, mask) * mask
        experience = {"tokens": sequence["tokens"], "positions": sequence["positions"],
                      "segment_ids": sequence["segment_ids"], "targets": targets, "mask": mask,
                      "old_logprobs": old_logprobs * mask, "old_values": old_values, "advantages": advantages,
                      "returns": returns}
        metrics = {"reward": jnp.mean(score), "kl": jnp.mean(jnp.sum(kl, axis=1)),
                   "response_length": jnp.mean(jnp.sum(sequence["response_mask"], axis=1).astype(jnp.float32))}
        return jax.lax.stop_gradient(experience), metrics

    def judge_scores(self, sequence: Mapping[str, Array], safety_tagged: Array) -> Array:
        """Each answer's score: the helpfulness model's, or Llama 2's combination with the safety model's."""
        index = last_response_index(sequence["response_mask"])
        scores = []
        for i, config in enumerate(self.reward_configs):
            params = jax.lax.stop_gradient(self.frozen[f"reward_{i}"])
            model = merge_params(graphdef(backbone_config(config)),
                                 {name: value for name, value in params.items() if name != SCORE})
            hidden = model.hidden_states(sequence["tokens"], positions=sequence["positions"],
                                         segment_ids=sequence["segment_ids"])
            scores.append(scalar_head(hidden, params[SCORE], index))
        if len(scores) == 1:
            return scores[0]
        return combined_reward(scores[0], scores[1], safety_tagged, threshold=self.judge.safety_threshold)

    def optimize(self, params: dict[str, Array], opt_state, experience: Mapping[str, Array], key: Array):
        """`ppo.epochs` passes over the rollout batch in `ppo.minibatches` shuffled minibatches, one update each."""
        rows = experience["tokens"].shape[0]
        minibatches = self.ppo.minibatches
        if rows % minibatches:
            raise DataError(f"train.batch_size={rows} is not divisible by ppo.minibatches={minibatches}")
        size = rows // minibatches
        orders = jnp.stack([jax.random.permutation(jax.random.fold_in(key, epoch), rows)
                            for epoch in range(self.ppo.epochs)])
        indices = orders.reshape(self.ppo.epochs * minibatches, size)
        loss_fn = self._update_loss

        def update(carry, index):
            params, opt_state = carry
            minibatch = {name: jnp.take(value, index, axis=0) for name, value in experience.items()}
            (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, minibatch)
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads)}

        (params, opt_state), per_update = jax.lax.scan(update, (params, opt_state), indices)
        return params, opt_state, {name: jnp.mean(values) for name, values in per_update.items()}

    def _update_loss(self, params: Mapping[str, Array], minibatch: Mapping[str, Array]):
        model = merge_params(self.graphdef, _without_head(params))
        hidden = model.hidden_states(minibatch["tokens"], positions=minibatch["positions"],
                                     segment_ids=minibatch["segment_ids"])
        logprobs, entropy = token_logprobs(model, hidden, minibatch["targets"], with_entropy=True)
        values = token_values(hidden, params[VALUE_HEAD])
        mask = minibatch["mask"]
        policy_loss, clip_fraction = ppo_policy_loss(logprobs, minibatch["old_logprobs"], minibatch["advantages"],
                                                     mask, clip=self.ppo.clip)
        value_loss = ppo_value_loss(values, minibatch["old_values"], minibatch["returns"], mask,
                                    clip=self.ppo.value_clip)
        loss = policy_loss + self.ppo.value_coef * value_loss
        return loss, {"policy_loss": policy_loss, "value_loss": value_loss,
                      "entropy": masked_mean(entropy, mask), "clip_fraction": clip_fraction}

    def eval_loss(self) -> Callable:
        raise ConfigError("PPO has no validation loss (data.valid_path): judge the policy's answers with eval.reward")


def _without_head(params: Mapping[str, Array]) -> dict[str, Array]:
    return {name: value for name, value in params.items() if name != VALUE_HEAD}


def assemble(prompts: PaddedPrompts, answers: Array, stop_ids: Array, pad_id: int) -> dict[str, Array]:
    """Prompt + answer rows [batch, prompt_len + max_new_tokens]: tokens (pad_id after each answer's stop token),
    RoPE positions continuing the prompt's, segment ids (0 on the prompt's left padding), and the response mask (1
    on the answer's tokens, its stop token included)."""
    batch, new = answers.shape
    is_stop = jnp.any(answers[:, :, None] == stop_ids[None, None, :], axis=-1)
    length = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1) + 1, new)
    answer_mask = (jnp.arange(new)[None, :] < length[:, None]).astype(jnp.int32)
    tokens = jnp.concatenate([prompts.tokens, jnp.where(answer_mask > 0, answers, pad_id)], axis=1)
    positions = jnp.concatenate([prompts.positions, prompts.lengths[:, None] + jnp.arange(new)[None, :]], axis=1)
    segment_ids = jnp.concatenate([prompts.segment_ids, jnp.ones_like(answers)], axis=1)
    response_mask = jnp.concatenate([jnp.zeros_like(prompts.tokens), answer_mask], axis=1)
    return {"tokens": tokens, "positions": positions.astype(jnp.int32), "segment_ids": segment_ids,
            "response_mask": response_mask}


@dataclass(frozen=True)
class PromptBatches:
    """Batch k of prompts is a pure function of (prompts, seed, k): a fresh order each epoch. Arrays [rows,
    prompt_len]: prompt_tokens (left-padded), prompt_segment_ids, prompt_positions, safety (1 where tagged)."""

    prompts: Sequence[Sequence[int]]
    safety: Sequence[bool]
    prompt_len: int
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.batch_size > len(self.prompts):
            raise DataError(f"train.batch_size={self.batch_size} is larger than the {len(self.prompts)} prompts")

    def batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        per_epoch = len(self.prompts) // self.batch_size
        epoch, within = divmod(step, per_epoch)
        order = epoch_document_order(len(self.prompts), self.seed, epoch)
        picked = [int(order[within * self.batch_size + row])
                  for row in process_rows(self.batch_size, process_index, process_count)]
        padded = left_pad([self.prompts[i] for i in picked])
        width = padded.tokens.shape[1]
        pad = self.prompt_len - width

        def widen(array: np.ndarray) -> np.ndarray:
            return np.pad(array, ((0, 0), (pad, 0)))

        safety = np.asarray([self.safety[i] for i in picked], np.int32)
        return {"prompt_tokens": widen(padded.tokens), "prompt_segment_ids": widen(padded.segment_ids),
                "prompt_positions": widen(padded.positions),
                "safety": np.repeat(safety[:, None], self.prompt_len, axis=1)}
