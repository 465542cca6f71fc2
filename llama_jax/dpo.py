"""Direct preference optimisation (Rafailov et al. 2023) as TRL's DPOTrainer defines it, on the shared run loop.

The policy starts from `init_from`; the frozen reference is the same model (or `dpo.reference`) and travels beside
the state as a jit argument (`trainer.FrozenModelsTrainer`), sharded like the policy — or, with
`dpo.precompute_reference=true`, its log-probabilities are computed once before training and read from the batches,
so no reference model is held while training (TRL's `precompute_ref_log_probs`). Losses: `alignment.dpo_loss`
(sigmoid with label smoothing, or IPO on length-averaged log-probabilities as TRL feeds it). Metrics carry TRL's
names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.alignment import dpo_loss, sequence_logprobs
from llama_jax.config import DPOConfig, ModelConfig, OptimizerConfig
from llama_jax.params import ModelOnMesh, merge_params
from llama_jax.preference_data import EncodedPair, pad_dialogs
from llama_jax.sharding import DEFAULT_RULES, Rules, put_global, replicated
from llama_jax.trainer import FrozenModelsTrainer, learning_rate_schedule, make_optimizer

Array = jax.Array
REFERENCE_KEYS = ("reference_chosen", "reference_rejected")


def answer_logprobs(params: Mapping[str, Array], graphdef: object, tokens: Array, mask: Array
                    ) -> tuple[Array, Array]:
    """(Σ log p of each row's answer tokens, the number of answer tokens) [batch]."""
    logprobs = sequence_logprobs(merge_params(graphdef, params), tokens, mask)
    return logprobs, jnp.sum(mask[:, 1:], axis=1).astype(jnp.float32)  # the first token is never predicted


@dataclass(frozen=True, kw_only=True)
class DPOTrainer(FrozenModelsTrainer):
    """The DPO step: (state, batch of pairs) → (state, metrics); `frozen` is {"reference": params} or {} when the
    batches carry precomputed reference log-probabilities."""

    dpo: DPOConfig

    @classmethod
    def create_dpo(cls, model_config: ModelConfig, optimizer_config: OptimizerConfig, total_steps: int, mesh,
                   dpo: DPOConfig, reference: Mapping[str, Array] | None, rules: Rules = DEFAULT_RULES,
                   grad_accum: int = 1) -> DPOTrainer:
        trainer = cls(model_config, mesh, rules, optimizer=make_optimizer(optimizer_config, total_steps),
                      schedule=learning_rate_schedule(optimizer_config, total_steps), grad_accum=grad_accum,
                      dpo=dpo, frozen={} if reference is None else {"reference": dict(reference)})
        return trainer.place_frozen()

    def micro_batch_sums(self) -> Callable:
        graphdef, dpo, frozen = self.graphdef, self.dpo, self.frozen

        def sums(params, batch):
            policy_chosen, chosen_tokens = answer_logprobs(params, graphdef, batch["chosen_tokens"],
                                                           batch["chosen_mask"])
            policy_rejected, rejected_tokens = answer_logprobs(params, graphdef, batch["rejected_tokens"],
                                                               batch["rejected_mask"])
            if "reference" in frozen:
                reference = jax.lax.stop_gradient(frozen["reference"])
                reference_chosen = answer_logprobs(reference, graphdef, batch["chosen_tokens"],
                                                   batch["chosen_mask"])[0]
                reference_rejected = answer_logprobs(reference, graphdef, batch["rejected_tokens"],
                                                     batch["rejected_mask"])[0]
            else:
                reference_chosen, reference_rejected = (batch[key][:, 0] for key in REFERENCE_KEYS)
            logps = (policy_chosen, policy_rejected, reference_chosen, reference_rejected)
            if dpo.loss == "ipo":  # TRL averages IPO's log-probabilities over each answer's tokens
                counts = (chosen_tokens, rejected_tokens) * 2
                logps = tuple(value / jnp.maximum(count, 1.0) for value, count in zip(logps, counts))
            losses, chosen_rewards, rejected_rewards = dpo_loss(*logps, beta=dpo.beta,
                                                                label_smoothing=dpo.label_smoothing, kind=dpo.loss)
            metrics = {"rewards/chosen": jnp.sum(chosen_rewards), "rewards/rejected": jnp.sum(rejected_rewards),
                       "rewards/accuracies": jnp.sum((chosen_rewards > rejected_rewards).astype(jnp.float32)),
                       "rewards/margins": jnp.sum(chosen_rewards - rejected_rewards),
                       "logps/chosen": jnp.sum(policy_chosen), "logps/rejected": jnp.sum(policy_rejected)}
            return jnp.sum(losses), (jnp.asarray(losses.shape[0], jnp.float32), metrics)

        return sums


def precompute_reference(on_mesh: ModelOnMesh, reference: Mapping[str, Array], pairs: list[EncodedPair],
                         seq_len: int, batch_size: int, pad_id: int) -> list[EncodedPair]:
    """`pairs` with the reference model's answer log-probabilities attached, computed once on the mesh in batches of
    `batch_size` (every process computes them all; each reads back the replicated results)."""
    graphdef = on_mesh.graphdef
    shardings = on_mesh.param_shardings()
    placed = {name: put_global(value, shardings[name]) for name, value in reference.items()}

    @jax.jit
    def both(params, batch):
        chosen = answer_logprobs(params, graphdef, batch["chosen_tokens"], batch["chosen_mask"])[0]
        rejected = answer_logprobs(params, graphdef, batch["rejected_tokens"], batch["rejected_mask"])[0]
        return jax.lax.with_sharding_constraint(jnp.stack([chosen, rejected], axis=1), replicated(on_mesh.mesh))

    from llama_jax.data import process_rows

    result = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one batch shape: one compilation
        rows = [padded[row] for row in process_rows(batch_size, jax.process_index(), jax.process_count())]
        local = {}
        for side in ("chosen", "rejected"):
            tokens, mask = pad_dialogs([getattr(pair, side) for pair in rows], seq_len, pad_id)
            local[f"{side}_tokens"], local[f"{side}_mask"] = tokens, mask
        with on_mesh.activation_sharding():
            values = np.asarray(both(placed, on_mesh.place_rows(local, batch_size)))
        result.extend(dataclasses.replace(pair, reference=(float(values[row, 0]), float(values[row, 1])))
                      for row, pair in enumerate(chunk))
    return result
