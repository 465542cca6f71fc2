"""llama_jax.alignment against independent float64 references.

Every function is compared with a plain-numpy / plain-Python float64 version written here from the math (explicit
loops, never calling the code under test), on random inputs from fixed seeds and several shapes, plus a few cases
whose expected numbers are worked out by hand in the comments. The model-facing functions (token_logprobs,
sequence_logprobs) are checked on a tiny random Llama against log_softmax of its full logits in float64, and their
gradient against autodiff through the full logits.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import alignment
from llama_jax.config import ModelConfig
from llama_jax.model import Llama
from llama_jax.ops import HEAD_CHUNK

RTOL = 1e-5
ATOL = 1e-5


def f32(x):
    return jnp.asarray(np.asarray(x, np.float64), jnp.float32)


def r32(x):
    """x rounded to float32, as float64: what the code under test receives."""
    return np.asarray(np.asarray(x, np.float32), np.float64)


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=rtol,
                               atol=atol)


# ── Float64 references, written from the math ────────────────────────────────────────────────────────────────────
def softplus(x: float) -> float:
    """log(1 + e^x), stable both ways; −log σ(z) = softplus(−z)."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def ref_masked_mean(x, mask):
    total, count = 0.0, 0.0
    for value, m in zip(np.ravel(x), np.ravel(mask)):
        total += float(value) * float(m)
        count += float(m)
    return total / max(count, 1.0)


def ref_response_spans(mask_row):
    """Indices of the masked positions of one row, in order."""
    return [t for t, m in enumerate(mask_row) if m]


def ref_log_softmax(logits):
    """float64 log_softmax over the last axis, by the log-sum-exp of each row."""
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def random_response_masks(rng, batch, length):
    """Rows of prompt (0) · answer (1) · padding (0), with a full row and an answer reaching the end."""
    masks = np.zeros((batch, length), bool)
    for b in range(batch):
        start = rng.randint(0, length - 1)
        stop = rng.randint(start + 1, length + 1)
        masks[b, start:stop] = True
    masks[0] = True  # the whole row is answer
    if batch > 1:
        masks[1] = False
        masks[1, length // 2:] = True  # an answer that runs to the end, after a prompt
    if batch > 2:
        masks[2] = False
        masks[2, 1:min(3, length)] = True  # short answer, then padding
    return masks


# ── reward_margin_loss ───────────────────────────────────────────────────────────────────────────────────────────
def test_reward_margin_loss_hand_computed():
    # r_c = r_r, m = 0: −log σ(0) = log 2 = 0.6931471806.
    # r_c = 2, r_r = 0, m = 1: −log σ(1) = log(1 + e^−1) = 0.3132616875.
    # r_c = 0, r_r = 1, m = 3: −log σ(−4) = log(1 + e^4) = 4.0181499279.
    loss = alignment.reward_margin_loss(f32([1.0, 2.0, 0.0]), f32([1.0, 0.0, 1.0]), f32([0.0, 1.0, 3.0]))
    close(loss, [0.6931471806, 0.3132616875, 4.0181499279])


@pytest.mark.parametrize("seed,shape", [(0, (7,)), (1, (33,)), (2, (4, 5))])
def test_reward_margin_loss_random(seed, shape):
    rng = np.random.RandomState(seed)
    chosen, rejected = rng.randn(*shape) * 3, rng.randn(*shape) * 3
    margin = rng.choice([0.0, 1 / 3, 2 / 3, 1.0], size=shape)  # Llama 2's discrete margins
    expected = np.vectorize(lambda c, r, m: softplus(-(c - r - m)))(chosen, rejected, margin)
    close(alignment.reward_margin_loss(f32(chosen), f32(rejected), f32(margin)), expected)


def test_reward_margin_loss_is_finite_for_large_gaps():
    loss = alignment.reward_margin_loss(f32([200.0, -200.0]), f32([0.0, 0.0]), f32([0.0, 0.0]))
    close(loss, [0.0, 200.0])


# ── dpo_loss ─────────────────────────────────────────────────────────────────────────────────────────────────────
def test_dpo_loss_hand_computed():
    # π_c = −1, π_r = −3, ref_c = ref_r = −2: h = (−1 + 3) − 0 = 2; β = 0.5: βh = 1.
    # sigmoid, ε = 0: −log σ(1) = 0.3132616875.
    # sigmoid, ε = 0.1: 0.9·log(1 + e^−1) + 0.1·log(1 + e^1) = 0.9·0.3132616875 + 0.1·1.3132616875 = 0.4132616875.
    # ipo: (h − 1/(2β))² = (2 − 1)² = 1.
    # rewards: β(π_c − ref_c) = 0.5·1 = 0.5, β(π_r − ref_r) = 0.5·(−1) = −0.5.
    args = (f32([-1.0]), f32([-3.0]), f32([-2.0]), f32([-2.0]))
    loss, chosen, rejected = alignment.dpo_loss(*args, beta=0.5)
    close(loss, [0.3132616875])
    close(chosen, [0.5])
    close(rejected, [-0.5])
    close(alignment.dpo_loss(*args, beta=0.5, label_smoothing=0.1)[0], [0.4132616875])
    loss, chosen, rejected = alignment.dpo_loss(*args, beta=0.5, kind="ipo")
    close(loss, [1.0])
    close(chosen, [0.5])
    close(rejected, [-0.5])
    # ipo, β = 0.1: (2 − 5)² = 9.
    close(alignment.dpo_loss(*args, beta=0.1, kind="ipo")[0], [9.0])


@pytest.mark.parametrize("seed,batch", [(0, 5), (1, 16), (2, 1)])
@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 2.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.4])
def test_dpo_sigmoid_random(seed, batch, beta, label_smoothing):
    rng = np.random.RandomState(seed)
    # Sequence log-probs: large and negative. The reference takes the same float32-rounded inputs.
    pc, pr, rc, rr = (r32(rng.randn(batch) * 20 - 60) for _ in range(4))
    loss, chosen, rejected = alignment.dpo_loss(f32(pc), f32(pr), f32(rc), f32(rr), beta=beta,
                                                label_smoothing=label_smoothing)
    expected_loss, expected_chosen, expected_rejected = [], [], []
    for b in range(batch):
        h = (pc[b] - pr[b]) - (rc[b] - rr[b])
        expected_loss.append((1 - label_smoothing) * softplus(-beta * h) + label_smoothing * softplus(beta * h))
        expected_chosen.append(beta * (pc[b] - rc[b]))
        expected_rejected.append(beta * (pr[b] - rr[b]))
    # h is a difference of numbers ~60 in float32 (~1e-5 absolute): the loss and rewards inherit β times that.
    tol = 1e-5 + 2e-5 * beta
    close(loss, expected_loss, atol=tol)
    close(chosen, expected_chosen, atol=tol)
    close(rejected, expected_rejected, atol=tol)


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
def test_dpo_ipo_random(beta):
    rng = np.random.RandomState(7)
    pc, pr, rc, rr = (r32(rng.randn(9) * 2 - 5) for _ in range(4))
    loss, chosen, rejected = alignment.dpo_loss(f32(pc), f32(pr), f32(rc), f32(rr), beta=beta, kind="ipo")
    expected = [((pc[b] - pr[b]) - (rc[b] - rr[b]) - 1 / (2 * beta)) ** 2 for b in range(9)]
    close(loss, expected, rtol=1e-5, atol=1e-4)
    close(chosen, beta * (pc - rc))
    close(rejected, beta * (pr - rr))


def test_dpo_loss_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown DPO loss"):
        alignment.dpo_loss(f32([0.0]), f32([0.0]), f32([0.0]), f32([0.0]), beta=0.1, kind="hinge")


# ── masked_mean, whiten ──────────────────────────────────────────────────────────────────────────────────────────
def test_masked_mean_hand_computed():
    # (1 + 2 + 3) / 3 = 2 (the 10 is masked out); an all-zero mask gives 0, not NaN.
    close(alignment.masked_mean(f32([[1.0, 2.0], [3.0, 10.0]]), jnp.array([[1, 1], [1, 0]])), 2.0)
    close(alignment.masked_mean(f32([1.0, 2.0]), jnp.array([False, False])), 0.0)


@pytest.mark.parametrize("seed,shape", [(0, (3, 11)), (1, (1, 40)), (2, (6, 5))])
def test_masked_mean_random(seed, shape):
    rng = np.random.RandomState(seed)
    x, mask = rng.randn(*shape) * 4, rng.rand(*shape) < 0.6
    close(alignment.masked_mean(f32(x), jnp.asarray(mask)), ref_masked_mean(x, mask))
    close(alignment.masked_mean(f32(x), jnp.ones(shape, bool)), ref_masked_mean(x, np.ones(shape)))


def ref_whiten(x, mask, eps=1e-8):
    """(x − mean) / sqrt(var + eps), mean and (population) variance over the masked entries, applied everywhere."""
    mean = ref_masked_mean(x, mask)
    variance = ref_masked_mean((np.asarray(x, np.float64) - mean) ** 2, mask)
    return (np.asarray(x, np.float64) - mean) / math.sqrt(variance + eps)


def test_whiten_hand_computed():
    # x = 1, 2, 3, 4: mean 2.5, variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25, std 1.1180339887:
    # whitened −1.5/1.118.. = −1.3416407865, −0.5/1.118.. = −0.4472135955, and the mirror images.
    close(alignment.whiten(f32([1.0, 2.0, 3.0, 4.0])), [-1.3416407865, -0.4472135955, 0.4472135955, 1.3416407865])
    # Masked: the statistics of 1 and 3 only (mean 2, variance 1); the masked-out 10 is shifted and scaled too.
    close(alignment.whiten(f32([1.0, 3.0, 10.0]), jnp.array([1, 1, 0])), [-1.0, 1.0, 8.0])


@pytest.mark.parametrize("seed,shape", [(0, (16,)), (1, (3, 9)), (2, (2, 50))])
def test_whiten_random(seed, shape):
    rng = np.random.RandomState(seed)
    x = rng.randn(*shape) * 5 + 3
    mask = rng.rand(*shape) < 0.7
    close(alignment.whiten(f32(x)), ref_whiten(x, np.ones(shape)), atol=1e-4)
    close(alignment.whiten(f32(x), jnp.asarray(mask)), ref_whiten(x, mask), atol=1e-4)
    # The masked entries come out with mean 0 and (population) variance 1.
    whitened = np.asarray(alignment.whiten(f32(x), jnp.asarray(mask)), np.float64)
    assert abs(whitened[mask].mean()) < 1e-5
    assert abs(whitened[mask].var() - 1.0) < 1e-4


# ── kl_penalized_rewards ─────────────────────────────────────────────────────────────────────────────────────────
def ref_kl_penalized_rewards(score, policy, reference, mask, beta):
    batch, length = mask.shape
    rewards, kl = np.zeros((batch, length)), np.zeros((batch, length))
    for b in range(batch):
        answer = ref_response_spans(mask[b])
        for t in answer:
            kl[b, t] = policy[b, t] - reference[b, t]
            rewards[b, t] = -beta * kl[b, t]
        if answer:
            rewards[b, answer[-1]] += score[b]
    return rewards, kl


def test_kl_penalized_rewards_hand_computed():
    # Mask 0 1 1 0, log π = ·, −1, −2, ·, log π_ref = ·, −1.5, −1, ·, β = 0.1, score 3:
    # kl = 0, 0.5, −1, 0; rewards = 0, −0.05, 0.1 + 3 = 3.1, 0 (the padding's log-probs are ignored).
    rewards, kl = alignment.kl_penalized_rewards(f32([3.0]), f32([[-7.0, -1.0, -2.0, -9.0]]),
                                                 f32([[-1.0, -1.5, -1.0, -2.0]]), jnp.array([[0, 1, 1, 0]]), 0.1)
    close(kl, [[0.0, 0.5, -1.0, 0.0]])
    close(rewards, [[0.0, -0.05, 3.1, 0.0]])


@pytest.mark.parametrize("seed,batch,length", [(0, 4, 10), (1, 7, 23), (2, 3, 2)])
@pytest.mark.parametrize("beta", [0.0, 0.05, 0.2])
def test_kl_penalized_rewards_random(seed, batch, length, beta):
    rng = np.random.RandomState(seed)
    score = rng.randn(batch) * 2
    policy, reference = -rng.rand(batch, length) * 5, -rng.rand(batch, length) * 5
    mask = random_response_masks(rng, batch, length)
    rewards, kl = alignment.kl_penalized_rewards(f32(score), f32(policy), f32(reference), jnp.asarray(mask), beta)
    expected_rewards, expected_kl = ref_kl_penalized_rewards(score, policy, reference, mask, beta)
    close(kl, expected_kl)
    close(rewards, expected_rewards)


# ── generalized_advantages ───────────────────────────────────────────────────────────────────────────────────────
def ref_generalized_advantages(rewards, values, mask, gamma, lam):
    """GAE by an explicit backwards loop over each row's answer positions only: t+1 is the next answer position,
    V and A are 0 after the last; everything outside the answer is 0."""
    batch, length = mask.shape
    advantages, returns = np.zeros((batch, length)), np.zeros((batch, length))
    for b in range(batch):
        next_value, next_advantage = 0.0, 0.0
        for t in reversed(ref_response_spans(mask[b])):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            advantage = delta + gamma * lam * next_advantage
            advantages[b, t] = advantage
            returns[b, t] = advantage + values[b, t]
            next_value, next_advantage = values[b, t], advantage
    return advantages, returns


def test_generalized_advantages_hand_computed():
    # Row: prompt, 3 answer tokens, padding. Answer rewards 1, 0, 2; values 0.5, 1, −1; γ = 0.9, λ = 0.5 (γλ = 0.45).
    # t=3: δ = 2 + 0 − (−1) = 3, A = 3.
    # t=2: δ = 0 + 0.9·(−1) − 1 = −1.9, A = −1.9 + 0.45·3 = −0.55.
    # t=1: δ = 1 + 0.9·1 − 0.5 = 1.4, A = 1.4 + 0.45·(−0.55) = 1.1525.
    # returns A + V: 1.6525, 0.45, 2. The prompt and padding (reward 5 and 7, values 4 and 9 there) give 0.
    advantages, returns = alignment.generalized_advantages(
        f32([[5.0, 1.0, 0.0, 2.0, 7.0]]), f32([[4.0, 0.5, 1.0, -1.0, 9.0]]), jnp.array([[0, 1, 1, 1, 0]]),
        gamma=0.9, lam=0.5)
    close(advantages, [[0.0, 1.1525, -0.55, 3.0, 0.0]])
    close(returns, [[0.0, 1.6525, 0.45, 2.0, 0.0]])


@pytest.mark.parametrize("seed,batch,length", [(0, 5, 12), (1, 8, 31), (2, 3, 3), (3, 2, 64)])
@pytest.mark.parametrize("gamma,lam", [(0.9, 0.95), (0.99, 0.5), (1.0, 1.0), (0.7, 0.0)])
def test_generalized_advantages_random(seed, batch, length, gamma, lam):
    rng = np.random.RandomState(seed)
    # Rewards and values are non-zero everywhere, padding and prompt included: only the answer's may count.
    rewards, values = rng.randn(batch, length), rng.randn(batch, length) * 2
    mask = random_response_masks(rng, batch, length)
    advantages, returns = alignment.generalized_advantages(f32(rewards), f32(values), jnp.asarray(mask),
                                                           gamma=gamma, lam=lam)
    expected_advantages, expected_returns = ref_generalized_advantages(rewards, values, mask, gamma, lam)
    close(advantages, expected_advantages, atol=5e-5)
    close(returns, expected_returns, atol=5e-5)


def test_generalized_advantages_multi_turn_mask():
    """An answer mask with a gap (two scored turns): t+1 is the next answer token, skipping the gap, as documented."""
    rng = np.random.RandomState(11)
    rewards, values = rng.randn(2, 12), rng.randn(2, 12)
    mask = np.zeros((2, 12), bool)
    mask[0, 2:5] = mask[0, 7:10] = True
    mask[1, 0:3] = mask[1, 5:6] = mask[1, 9:12] = True
    advantages, returns = alignment.generalized_advantages(f32(rewards), f32(values), jnp.asarray(mask),
                                                           gamma=0.95, lam=0.8)
    expected_advantages, expected_returns = ref_generalized_advantages(rewards, values, mask, 0.95, 0.8)
    close(advantages, expected_advantages)
    close(returns, expected_returns)


# ── ppo_policy_loss, ppo_value_loss ──────────────────────────────────────────────────────────────────────────────
def ref_ppo_policy_loss(new, old, advantages, mask, clip):
    terms, clipped_count, count = 0.0, 0.0, 0.0
    for b in range(mask.shape[0]):
        for t in ref_response_spans(mask[b]):
            ratio = math.exp(new[b, t] - old[b, t])
            unclipped = -advantages[b, t] * ratio
            clipped = -advantages[b, t] * min(max(ratio, 1 - clip), 1 + clip)
            terms += max(unclipped, clipped)
            clipped_count += 1.0 if clipped > unclipped else 0.0
            count += 1
    return terms / max(count, 1), clipped_count / max(count, 1)


def test_ppo_policy_loss_hand_computed():
    # ε = 0.2. Tokens (ratio, A):
    #   (1.5, 1):  unclipped −1.5, clipped −1.2 → −1.2 (clipped above)
    #   (0.5, −1): unclipped 0.5, clipped 0.8 → 0.8 (clipped below)
    #   (1.0, 2):  −2, −2 → −2 (not clipped)
    #   (0.5, 1):  unclipped −0.5, clipped −0.8 → −0.5 (ratio outside but the unclipped term is the larger)
    #   (3.0, 5):  masked out.
    # loss = (−1.2 + 0.8 − 2 − 0.5) / 4 = −0.725; clip fraction 2/4 = 0.5.
    ratio = np.array([[1.5, 0.5, 1.0, 0.5, 3.0]])
    old = np.array([[-2.0, -1.0, -3.0, -0.5, -1.0]])
    advantages = np.array([[1.0, -1.0, 2.0, 1.0, 5.0]])
    loss, clip_fraction = alignment.ppo_policy_loss(f32(old + np.log(ratio)), f32(old), f32(advantages),
                                                    jnp.array([[1, 1, 1, 1, 0]]), clip=0.2)
    close(loss, -0.725)
    close(clip_fraction, 0.5)


@pytest.mark.parametrize("seed,batch,length", [(0, 4, 16), (1, 8, 40), (2, 2, 5)])
@pytest.mark.parametrize("clip", [0.1, 0.2, 0.5])
def test_ppo_policy_loss_random(seed, batch, length, clip):
    rng = np.random.RandomState(seed)
    old = -rng.rand(batch, length) * 4
    new = old + rng.randn(batch, length) * 0.4  # ratios spread across both clip edges
    advantages = rng.randn(batch, length)  # both signs
    mask = random_response_masks(rng, batch, length)
    loss, clip_fraction = alignment.ppo_policy_loss(f32(new), f32(old), f32(advantages), jnp.asarray(mask),
                                                    clip=clip)
    expected_loss, expected_fraction = ref_ppo_policy_loss(new, old, advantages, mask, clip)
    close(loss, expected_loss)
    close(clip_fraction, expected_fraction)


def test_ppo_policy_loss_clips_on_both_sides():
    """The random set-up above does clip both ways (else the test would not see a wrong sign on one side)."""
    rng = np.random.RandomState(1)
    old = -rng.rand(8, 40) * 4
    new = old + rng.randn(8, 40) * 0.4
    advantages = rng.randn(8, 40)
    ratio = np.exp(new - old)
    assert ((ratio > 1.2) & (advantages > 0)).sum() > 5
    assert ((ratio < 0.8) & (advantages < 0)).sum() > 5
    assert ((ratio > 1.2) & (advantages < 0)).sum() > 5  # outside the range, but the unclipped term wins
    ones = jnp.ones((8, 40), bool)
    _, fraction = alignment.ppo_policy_loss(f32(new), f32(old), f32(advantages), ones, clip=0.2)
    expected = np.mean(((ratio > 1.2) & (advantages > 0)) | ((ratio < 0.8) & (advantages < 0)))
    close(fraction, expected)


def ref_ppo_value_loss(new, old, returns, mask, clip):
    terms, count = 0.0, 0
    for b in range(mask.shape[0]):
        for t in ref_response_spans(mask[b]):
            clipped = old[b, t] + min(max(new[b, t] - old[b, t], -clip), clip)
            terms += max((new[b, t] - returns[b, t]) ** 2, (clipped - returns[b, t]) ** 2)
            count += 1
    return 0.5 * terms / max(count, 1)


def test_ppo_value_loss_hand_computed():
    # ε = 0.5. (V, V_old, R) = (2, 0, 0): (2 − 0)² = 4 vs (0.5 − 0)² = 0.25 → 4.
    #                          (1, 0, 3): (1 − 3)² = 4 vs (0.5 − 3)² = 6.25 → 6.25.
    #                          (9, 9, 9): masked out.
    # ½ · (4 + 6.25) / 2 = 2.5625.
    loss = alignment.ppo_value_loss(f32([[2.0, 1.0, 9.0]]), f32([[0.0, 0.0, 9.0]]), f32([[0.0, 3.0, 0.0]]),
                                    jnp.array([[1, 1, 0]]), clip=0.5)
    close(loss, 2.5625)


@pytest.mark.parametrize("seed,batch,length", [(0, 4, 16), (1, 6, 33), (2, 1, 4)])
@pytest.mark.parametrize("clip", [0.05, 0.2, 1.0])
def test_ppo_value_loss_random(seed, batch, length, clip):
    rng = np.random.RandomState(seed)
    old = rng.randn(batch, length)
    new = old + rng.randn(batch, length) * 0.3
    returns = rng.randn(batch, length)
    mask = random_response_masks(rng, batch, length)
    loss = alignment.ppo_value_loss(f32(new), f32(old), f32(returns), jnp.asarray(mask), clip=clip)
    close(loss, ref_ppo_value_loss(new, old, returns, mask, clip))


# ── combined_reward ──────────────────────────────────────────────────────────────────────────────────────────────
def test_combined_reward_hand_computed():
    # threshold 0.15. σ(−2) = 0.1192 < 0.15 → safety; σ(−1) = 0.2689 → helpfulness unless tagged; σ(3) = 0.953.
    helpfulness = f32([10.0, 11.0, 12.0, 13.0])
    safety = f32([-2.0, -1.0, -1.0, 3.0])
    tagged = jnp.array([False, False, True, True])
    close(alignment.combined_reward(helpfulness, safety, tagged, threshold=0.15), [-2.0, 11.0, -1.0, 3.0])
    # threshold 0.5: σ(−1) < 0.5 too.
    close(alignment.combined_reward(helpfulness, safety, jnp.zeros(4, bool), threshold=0.5), [-2.0, -1.0, -1.0, 13.0])


@pytest.mark.parametrize("seed,threshold", [(0, 0.15), (1, 0.5), (2, 0.05)])
def test_combined_reward_random(seed, threshold):
    rng = np.random.RandomState(seed)
    helpfulness, safety = rng.randn(50) * 2, rng.randn(50) * 3
    tagged = rng.rand(50) < 0.3
    expected = [safety[i] if tagged[i] or sigmoid(safety[i]) < threshold else helpfulness[i] for i in range(50)]
    close(alignment.combined_reward(f32(helpfulness), f32(safety), jnp.asarray(tagged.astype(np.int32)),
                                    threshold=threshold), expected)


# ── Indexing helpers: last_response_index, next_token_targets, scalar_head, token_values ─────────────────────────
def test_last_response_index():
    mask = np.array([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0], [0, 1, 0, 1, 0]], bool)
    np.testing.assert_array_equal(alignment.last_response_index(jnp.asarray(mask)), [2, 4, 4, 0, 3])
    rng = np.random.RandomState(0)
    for length in (1, 7, 30):
        mask = random_response_masks(rng, 6, length) if length > 1 else np.ones((6, 1), bool)
        expected = [max(ref_response_spans(row)) for row in mask]
        np.testing.assert_array_equal(alignment.last_response_index(jnp.asarray(mask)), expected)
        np.testing.assert_array_equal(alignment.last_response_index(jnp.asarray(mask.astype(np.float32))), expected)


def test_next_token_targets():
    # tokens 5 6 7 8, mask 0 0 1 1: position 1 predicts 7 (answer), position 2 predicts 8 (answer), 3 predicts nothing.
    targets, weights = alignment.next_token_targets(jnp.array([[5, 6, 7, 8]]), jnp.array([[0, 0, 1, 1]]))
    np.testing.assert_array_equal(np.asarray(targets)[:, :-1], [[6, 7, 8]])
    np.testing.assert_array_equal(weights, [[0.0, 1.0, 1.0, 0.0]])
    rng = np.random.RandomState(3)
    tokens = rng.randint(0, 1000, size=(5, 17))
    mask = random_response_masks(rng, 5, 17)
    targets, weights = alignment.next_token_targets(jnp.asarray(tokens), jnp.asarray(mask))
    assert weights.dtype == jnp.float32
    for b in range(5):
        for t in range(17):
            if t + 1 < 17:
                assert int(targets[b, t]) == tokens[b, t + 1]
            assert float(weights[b, t]) == (1.0 if t + 1 < 17 and mask[b, t + 1] else 0.0)


@pytest.mark.parametrize("seed,batch,length,dim", [(0, 3, 9, 8), (1, 5, 20, 16)])
def test_scalar_head_and_token_values(seed, batch, length, dim):
    rng = np.random.RandomState(seed)
    hidden, head = rng.randn(batch, length, dim), rng.randn(dim, 1)
    index = rng.randint(0, length, size=batch)
    expected = [sum(hidden[b, index[b], d] * head[d, 0] for d in range(dim)) for b in range(batch)]
    score = alignment.scalar_head(f32(hidden), f32(head), jnp.asarray(index))
    assert score.shape == (batch,) and score.dtype == jnp.float32
    close(score, expected, atol=5e-5)
    # bfloat16 hidden states (the model's compute dtype) are read in float32.
    close(alignment.scalar_head(f32(hidden).astype(jnp.bfloat16), f32(head), jnp.asarray(index)),
          [sum(float(jnp.bfloat16(hidden[b, index[b], d])) * head[d, 0] for d in range(dim)) for b in range(batch)],
          atol=1e-4)
    expected_values = np.array([[sum(hidden[b, t, d] * head[d, 0] for d in range(dim)) for t in range(length)]
                                for b in range(batch)])
    values = alignment.token_values(f32(hidden), f32(head))
    assert values.shape == (batch, length) and values.dtype == jnp.float32
    close(values, expected_values, atol=5e-5)


# ── token_logprobs, sequence_logprobs on a tiny model ────────────────────────────────────────────────────────────
def tiny_model(tie_embeddings: bool = False, seed: int = 0) -> Llama:
    config = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, max_seq_len=1024, multiple_of=16,
                         dtype="float32", tie_embeddings=tie_embeddings)
    model = Llama(config, rngs=nnx.Rngs(seed))
    # The initial head (std 0.02) gives near-uniform distributions; scale it so that they are peaked and the
    # log-probabilities of different tokens differ a lot (less when tied: the table also feeds the input, and a
    # large one makes every position predict its own token with certainty).
    if tie_embeddings:
        model.embedding[...] = model.embedding[...] * 5.0
    else:
        model.output[...] = model.output[...] * 40.0
    return model


@pytest.fixture(scope="module")
def untied():
    return tiny_model(False)


@pytest.fixture(scope="module")
def tied():
    return tiny_model(True, seed=1)


def ref_model_logprobs(model, tokens):
    """float64 log_softmax of the model's full logits [batch, seq, vocab]."""
    return ref_log_softmax(np.asarray(model(jnp.asarray(tokens)), np.float64))


def ref_sequence_logprobs(log_probs, tokens, mask):
    batch, length = tokens.shape
    totals = np.zeros(batch)
    for b in range(batch):
        for t in range(1, length):  # the first token has no position before it to be predicted from
            if mask[b, t]:
                totals[b] += log_probs[b, t - 1, tokens[b, t]]
    return totals


def check_token_logprobs(model, batch, length, seed):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, model.config.vocab_size, size=(batch, length))
    targets = rng.randint(0, model.config.vocab_size, size=(batch, length))
    log_probs = ref_model_logprobs(model, tokens)
    hidden = model.hidden_states(jnp.asarray(tokens))
    picked, entropy = alignment.token_logprobs(model, hidden, jnp.asarray(targets), with_entropy=True)
    assert picked.shape == entropy.shape == (batch, length)
    assert picked.dtype == entropy.dtype == jnp.float32
    expected = np.array([[log_probs[b, t, targets[b, t]] for t in range(length)] for b in range(batch)])
    expected_entropy = -np.sum(np.exp(log_probs) * log_probs, axis=-1)
    assert expected.std() > 0.5 and expected_entropy.std() > 0.1  # peaked, varied distributions
    close(picked, expected, atol=2e-5)
    close(entropy, expected_entropy, atol=2e-5)
    picked_only, none = alignment.token_logprobs(model, hidden, jnp.asarray(targets))
    assert none is None
    close(picked_only, expected, atol=2e-5)

    mask = random_response_masks(rng, batch, length)
    sequence = alignment.sequence_logprobs(model, jnp.asarray(tokens), jnp.asarray(mask))
    assert sequence.shape == (batch,) and sequence.dtype == jnp.float32
    close(sequence, ref_sequence_logprobs(log_probs, tokens, mask), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("batch,length", [(3, 40), (2, 2 * HEAD_CHUNK), (1, 3 * HEAD_CHUNK)])
def test_token_and_sequence_logprobs(untied, batch, length):
    """Lengths that are a multiple of HEAD_CHUNK go chunk by chunk (2 and 3 chunks here); 40 goes in one piece."""
    check_token_logprobs(untied, batch, length, seed=length)


@pytest.mark.parametrize("batch,length", [(2, 24), (2, 2 * HEAD_CHUNK)])
def test_token_and_sequence_logprobs_tied_embeddings(tied, batch, length):
    assert tied.output is None
    check_token_logprobs(tied, batch, length, seed=100 + length)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("length", [2 * HEAD_CHUNK, 48])
def test_sequence_logprobs_gradient(tie, length):
    """d Σ sequence_logprobs / d params (chunked, rematerialised head) equals autodiff through the full logits."""
    model = tiny_model(tie, seed=2)
    rng = np.random.RandomState(length + tie)
    tokens = jnp.asarray(rng.randint(0, 256, size=(2, length)))
    mask = random_response_masks(rng, 2, length)
    graphdef, params = nnx.split(model)

    def chunked(params):
        return jnp.sum(alignment.sequence_logprobs(nnx.merge(graphdef, params), tokens, jnp.asarray(mask)))

    def full_logits(params):
        log_probs = jax.nn.log_softmax(nnx.merge(graphdef, params)(tokens), axis=-1)
        picked = jnp.take_along_axis(log_probs[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(picked * jnp.asarray(mask[:, 1:], jnp.float32))

    value, grads = jax.value_and_grad(chunked)(params)
    expected_value, expected_grads = jax.value_and_grad(full_logits)(params)
    close(value, expected_value, atol=1e-3)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    expected_leaves = dict(jax.tree_util.tree_leaves_with_path(expected_grads))
    assert len(leaves) == len(expected_leaves) >= 8
    for path, grad in leaves:
        expected = np.asarray(expected_leaves[path], np.float64)
        grad = np.asarray(grad, np.float64)
        assert np.abs(expected).max() > 0, path
        scale = np.abs(expected).max()
        error = np.abs(grad - expected).max() / scale
        assert error < 1e-5, (jax.tree_util.keystr(path), error)
