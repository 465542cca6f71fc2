"""The numerics of learning from preferences: per-sequence log-probabilities and scores, the reward model's margin
ranking loss, DPO (and IPO), and PPO's pieces (the KL-penalised per-token reward, GAE, the clipped policy and value
losses). Pure functions of arrays; the trainers that use them are `llama_jax.reward_model`, `llama_jax.dpo` and
`llama_jax.ppo`.

Conventions. A sequence is a row of token ids with a response mask: True on the tokens of the answer being scored
(the final assistant turn and its EOS / <|eot_id|>). A token's log-probability is read from the logits at the
position before it, so `sequence_logprobs` sums log p(tokens[t] | tokens[:t]) over the masked t. Where a mean over
tokens is meant (PPO's losses) it is over the masked tokens of the whole batch, as TRL's `masked_mean` does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.model import Llama
from llama_jax.ops import HEAD_CHUNK

Array = jax.Array


# ── Per-token and per-sequence quantities of a model ─────────────────────────────────────────────────────────────
def next_token_targets(tokens: Array, response_mask: Array) -> tuple[Array, Array]:
    """(targets, weights) [batch, seq]: position t predicts tokens[t + 1], weighted by whether that token is part of
    the response; the last position predicts nothing."""
    targets = jnp.roll(tokens, -1, axis=1)
    weights = jnp.roll(response_mask.astype(jnp.float32), -1, axis=1).at[:, -1].set(0.0)
    return targets, weights


def token_logprobs(model: Llama, hidden: Array, targets: Array, *, with_entropy: bool = False
                   ) -> tuple[Array, Array | None]:
    """log p(targets) [batch, seq] (float32) under the model's output head, and the entropy of each position's
    distribution if asked. Computed chunk by chunk over the sequence, each chunk's logits recomputed in the backward
    pass (jax.checkpoint), so [batch, seq, vocab] logits are never held at once."""
    if model.output is None:
        head, equation = model.embedding[...], "bsd,vd->bsv"
    else:
        head, equation = model.output[...], "bsd,dv->bsv"
    dtype = jnp.dtype(model.config.dtype)
    batch, length, _ = hidden.shape
    chunk = HEAD_CHUNK if length % HEAD_CHUNK == 0 else length

    @jax.checkpoint
    def one_chunk(hidden_chunk, target_chunk):
        logits = jnp.einsum(equation, hidden_chunk.astype(dtype), head.astype(dtype),
                            preferred_element_type=jnp.float32)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(log_probs, target_chunk[..., None], axis=-1)[..., 0]
        entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1) if with_entropy else jnp.zeros_like(picked)
        return picked, entropy

    def by_chunk(x):
        return x.reshape(batch, length // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)

    def unchunk(x):
        return x.swapaxes(0, 1).reshape(batch, length)

    _, (picked, entropy) = jax.lax.scan(lambda carry, pieces: (carry, one_chunk(*pieces)), None,
                                        (by_chunk(hidden), by_chunk(targets)))
    return unchunk(picked), unchunk(entropy) if with_entropy else None


def sequence_logprobs(model: Llama, tokens: Array, response_mask: Array) -> Array:
    """Σ log p(response token | everything before it) per row, float32 [batch]."""
    targets, weights = next_token_targets(tokens, response_mask)
    logprobs, _ = token_logprobs(model, model.hidden_states(tokens), targets)
    return jnp.sum(logprobs * weights, axis=1)


def last_response_index(response_mask: Array) -> Array:
    """[batch] index of each row's last response token (a reward model reads its hidden state there)."""
    length = response_mask.shape[1]
    return length - 1 - jnp.argmax(jnp.flip(response_mask.astype(jnp.int32), axis=1), axis=1)


def scalar_head(hidden: Array, head: Array, index: Array) -> Array:
    """hidden[b, index[b]] · head per row, float32 [batch]: a reward model's score (head [dim, 1], as Hugging Face's
    `LlamaForSequenceClassification.score` transposed) or a value estimate."""
    picked = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
    return jnp.einsum("bd,do->bo", picked.astype(jnp.float32), head.astype(jnp.float32))[:, 0]


def token_values(hidden: Array, head: Array) -> Array:
    """A value head on every position, float32 [batch, seq]."""
    return jnp.einsum("bsd,do->bso", hidden.astype(jnp.float32), head.astype(jnp.float32))[..., 0]


# ── Reward model ─────────────────────────────────────────────────────────────────────────────────────────────────
def reward_margin_loss(chosen: Array, rejected: Array, margin: Array) -> Array:
    """Llama 2's binary ranking loss per pair: −log σ(r(x, y_c) − r(x, y_r) − m(r))."""
    return -jax.nn.log_sigmoid(chosen - rejected - margin)


# ── DPO ──────────────────────────────────────────────────────────────────────────────────────────────────────────
def dpo_loss(policy_chosen: Array, policy_rejected: Array, reference_chosen: Array, reference_rejected: Array, *,
             beta: float, label_smoothing: float = 0.0, kind: str = "sigmoid") -> tuple[Array, Array, Array]:
    """(loss, chosen reward, rejected reward) per pair, as TRL's `DPOTrainer.dpo_loss` defines them.

    h = (log π(y_c) − log π(y_r)) − (log π_ref(y_c) − log π_ref(y_r)).
    sigmoid: −(1 − ε)·log σ(β·h) − ε·log σ(−β·h) (ε the label smoothing: conservative DPO);
    ipo: (h − 1/(2β))² (TRL feeds IPO length-averaged log-probabilities: the caller's choice).
    The implicit rewards are β·(log π − log π_ref) of each answer.
    """
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if kind == "sigmoid":
        loss = (-jax.nn.log_sigmoid(beta * logits) * (1 - label_smoothing)
                - jax.nn.log_sigmoid(-beta * logits) * label_smoothing)
    elif kind == "ipo":
        loss = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}: expected sigmoid or ipo")
    return loss, beta * (policy_chosen - reference_chosen), beta * (policy_rejected - reference_rejected)


# ── PPO ──────────────────────────────────────────────────────────────────────────────────────────────────────────
def masked_mean(x: Array, mask: Array) -> Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def whiten(x: Array, mask: Array | None = None, eps: float = 1e-8) -> Array:
    """(x − mean) / std over the (masked) entries: Llama 2 whitens the reward models' scores before PPO."""
    mask = jnp.ones_like(x) if mask is None else mask.astype(jnp.float32)
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * jax.lax.rsqrt(variance + eps)


def kl_penalized_rewards(score: Array, policy_logprobs: Array, reference_logprobs: Array, response_mask: Array,
                         beta: float) -> tuple[Array, Array]:
    """(per-token rewards [batch, T], per-token KL estimate [batch, T]).

    Llama 2's R = score − β·D_KL(π‖π_ref), spread over the answer as RLHF implementations do: every answer token
    gets −β·(log π − log π_ref) of the token sampled (the k1 estimator of the KL), and the last answer token also
    the whole sequence's score.
    """
    mask = response_mask.astype(jnp.float32)
    kl = (policy_logprobs - reference_logprobs) * mask
    last = jax.nn.one_hot(last_response_index(response_mask), mask.shape[1], dtype=jnp.float32)
    return -beta * kl + score[:, None] * last, kl


def generalized_advantages(rewards: Array, values: Array, response_mask: Array, *, gamma: float, lam: float
                           ) -> tuple[Array, Array]:
    """(advantages, returns) [batch, T] by GAE over the answer tokens (Schulman et al. 2016).

    δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}, where t+1 is the next answer token (V and A are 0 after
    the last one); the returns the value head regresses to are A_t + V_t. Positions outside the answer get 0.
    """
    mask = response_mask.astype(jnp.float32)
    values = values * mask

    def backwards(carry, column):
        next_value, next_advantage = carry
        reward, value, live = column
        delta = reward + gamma * next_value - value
        advantage = (delta + gamma * lam * next_advantage) * live
        # Outside the answer the carry passes through unchanged (answers are contiguous, so this only matters for
        # padding after them, where the carry is still zero).
        return (jnp.where(live > 0, value, next_value), jnp.where(live > 0, advantage, next_advantage)), advantage

    zeros = jnp.zeros(rewards.shape[0], jnp.float32)
    _, advantages = jax.lax.scan(backwards, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
    advantages = advantages.T
    return advantages, (advantages + values) * mask


def ppo_policy_loss(new_logprobs: Array, old_logprobs: Array, advantages: Array, response_mask: Array, *,
                    clip: float) -> tuple[Array, Array]:
    """(clipped surrogate loss, clip fraction), means over the answer tokens.

    ratio = π_new/π_old per token; loss = mean(max(−A·ratio, −A·clip(ratio, 1 − ε, 1 + ε))); the clip fraction is
    the share of tokens where the clipped term is the larger (TRL's `policy/clipfrac_avg`).
    """
    ratio = jnp.exp(new_logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(unclipped, clipped), response_mask)
    return loss, masked_mean((clipped > unclipped).astype(jnp.float32), response_mask)


def ppo_value_loss(new_values: Array, old_values: Array, returns: Array, response_mask: Array, *,
                   clip: float) -> Array:
    """½·mean(max((V − R)², (clip(V, V_old ± ε) − R)²)) over the answer tokens (TRL's clipped value loss)."""
    clipped = old_values + jnp.clip(new_values - old_values, -clip, clip)
    return 0.5 * masked_mean(jnp.maximum((new_values - returns) ** 2, (clipped - returns) ** 2), response_mask)


def combined_reward(helpfulness: Array, safety: Array, safety_tagged: Array, *, threshold: float) -> Array:
    """Llama 2's R_c: the safety model's score where the prompt is safety-tagged or σ(safety score) < threshold
    (0.15 in the paper), else the helpfulness model's. Scores are the models' raw (logit) outputs."""
    use_safety = safety_tagged.astype(bool) | (jax.nn.sigmoid(safety) < threshold)
    return jnp.where(use_safety, safety, helpfulness)
