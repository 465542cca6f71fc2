"""The preference trainers' steps against second code paths: the reward model's loss and metrics from full-model
hidden states, DPO's loss from float64 log-softmax of full logits (TRL's formula), PPO's in-step rollout against
`generate`, and a reward model learning a rule it is never told."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.config import MODEL_PRESETS, DPOConfig, OptimizerConfig, RewardConfig
from llama_jax.dpo import DPOTrainer
from llama_jax.generate import PaddedPrompts, Sampling, generate, left_pad, sample_in_graph
from llama_jax.model import Llama
from llama_jax.params import model_from_params, model_params
from llama_jax.ppo import assemble
from llama_jax.preference_data import place_pair_batch
from llama_jax.reward_model import SCORE, RewardTrainer, reward_params_from_policy
from llama_jax.sharding import make_mesh

CONFIG = dataclasses.replace(MODEL_PRESETS["test"], vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                             ffn_hidden_dim=64, dtype="float32", max_seq_len=64)
SEQ = 16
OPTIMIZER = OptimizerConfig(lr=1e-3, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0)


@pytest.fixture(scope="module")
def policy_params():
    return model_params(Llama(CONFIG, rngs=nnx.Rngs(0)))


def one_device_mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def random_pairs(rows: int, seed: int) -> dict[str, np.ndarray]:
    """Chosen/rejected rows of random tokens with answers of random lengths after a shared prompt."""
    rng = np.random.default_rng(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        tokens = rng.integers(1, CONFIG.vocab_size, (rows, SEQ)).astype(np.int32)
        mask = np.zeros((rows, SEQ), np.int32)
        for row in range(rows):
            start, end = rng.integers(3, 8), rng.integers(9, SEQ + 1)
            mask[row, start:end] = 1
            tokens[row, end:] = 0
        batch[f"{side}_tokens"], batch[f"{side}_mask"] = tokens, mask
    batch["margin"] = rng.uniform(0, 1, rows).astype(np.float32)
    return batch


def float64_scores(params: dict, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reward scores by another path: the full Llama's hidden states (its output head unused), the head in float64 at
    the last masked position found by a Python loop."""
    backbone = {name: value for name, value in params.items() if name != SCORE}
    backbone["output"] = jnp.zeros((CONFIG.dim, CONFIG.vocab_size))
    model = model_from_params(CONFIG, backbone)
    hidden = np.asarray(model.hidden_states(jnp.asarray(tokens)), np.float64)
    head = np.asarray(params[SCORE], np.float64)[:, 0]
    return np.array([hidden[row, max(np.nonzero(mask[row])[0])] @ head for row in range(len(tokens))])


def test_reward_step_loss_and_metrics_match_a_float64_reference(policy_params):
    trainer = RewardTrainer.create_reward(CONFIG, OPTIMIZER, 10, one_device_mesh(), RewardConfig())
    params = reward_params_from_policy(policy_params, CONFIG, jax.random.key(1))
    state = trainer.state_from_params(params, 0)
    batch = random_pairs(4, 0)
    reference_params = {name: np.asarray(value) for name, value in params.items()}
    chosen = float64_scores(reference_params, batch["chosen_tokens"], batch["chosen_mask"])
    rejected = float64_scores(reference_params, batch["rejected_tokens"], batch["rejected_mask"])
    _, metrics = trainer.jit_step((4, SEQ))(state, place_pair_batch(trainer, batch, 4))
    difference = chosen - rejected
    expected_loss = np.mean(np.log1p(np.exp(-(difference - batch["margin"]))))
    np.testing.assert_allclose(float(metrics["loss"]), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(difference > 0))
    np.testing.assert_allclose(float(metrics["reward_chosen"]), chosen.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["reward_rejected"]), rejected.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["margin"]), difference.mean(), rtol=1e-5, atol=1e-6)

    no_margin = RewardTrainer.create_reward(CONFIG, OPTIMIZER, 10, one_device_mesh(), RewardConfig(use_margin=False))
    _, metrics = no_margin.jit_step((4, SEQ))(no_margin.state_from_params(params, 0),
                                              place_pair_batch(no_margin, batch, 4))
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(np.log1p(np.exp(-difference))), rtol=1e-5)


def test_reward_model_learns_a_rule_it_is_never_told(policy_params):
    """Chosen answers hold more tokens below 16 than rejected ones; the model sees only which side won. Held-out
    accuracy starts near chance and ends high."""
    rng = np.random.default_rng(0)

    def pairs(count: int) -> dict[str, np.ndarray]:
        batch = {name: np.zeros((count, SEQ), np.int32) for name in
                 ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")}
        for row in range(count):
            prompt = rng.integers(16, CONFIG.vocab_size, 4)
            liked = rng.integers(1, 5)
            for side, low in (("chosen", liked), ("rejected", 0)):
                answer = np.concatenate([rng.integers(1, 16, low), rng.integers(16, CONFIG.vocab_size, 6 - low)])
                rng.shuffle(answer)
                batch[f"{side}_tokens"][row, :10] = np.concatenate([prompt, answer])
                batch[f"{side}_mask"][row, 4:10] = 1
        batch["margin"] = np.zeros(count, np.float32)
        return batch

    trainer = RewardTrainer.create_reward(CONFIG, OPTIMIZER, 200, one_device_mesh(), RewardConfig())
    state = trainer.state_from_params(reward_params_from_policy(policy_params, CONFIG, jax.random.key(1)), 0)
    held_out = pairs(64)

    def accuracy(params) -> float:
        chosen = float64_scores(params, held_out["chosen_tokens"], held_out["chosen_mask"])
        rejected = float64_scores(params, held_out["rejected_tokens"], held_out["rejected_mask"])
        return float(np.mean(chosen > rejected))

    before = accuracy(jax.device_get(state.params))
    step = trainer.jit_step((16, SEQ))
    for _ in range(120):
        state, _ = step(state, place_pair_batch(trainer, pairs(16), 16))
    after = accuracy(jax.device_get(state.params))
    assert before < 0.75 and after > 0.9, (before, after)


def full_logprobs(params: dict, tokens: np.ndarray, mask: np.ndarray, average: bool = False) -> np.ndarray:
    """Σ log p(answer tokens) from float64 log-softmax of the full logits."""
    logits = np.asarray(model_from_params(CONFIG, params)(jnp.asarray(tokens)), np.float64)
    log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    totals = []
    for row in range(len(tokens)):
        picked = [log_probs[row, t - 1, tokens[row, t]] for t in range(1, SEQ) if mask[row, t]]
        totals.append(np.mean(picked) if average else np.sum(picked))
    return np.array(totals)


@pytest.mark.parametrize("loss,precompute", [("sigmoid", False), ("sigmoid", True), ("ipo", False)])
def test_dpo_step_matches_trl_formula_on_float64_logprobs(policy_params, loss, precompute):
    from llama_jax.chat_format import EncodedDialog
    from llama_jax.dpo import precompute_reference
    from llama_jax.preference_data import EncodedPair, PairBatches

    reference = {name: value + 0.01 * jax.random.normal(jax.random.key(i), value.shape)
                 for i, (name, value) in enumerate(policy_params.items())}
    dpo = DPOConfig(beta=0.2, label_smoothing=0.1 if loss == "sigmoid" else 0.0, loss=loss)
    mesh = one_device_mesh()
    trainer = DPOTrainer.create_dpo(CONFIG, OPTIMIZER, 10, mesh, dpo, None if precompute else reference)
    batch = random_pairs(4, 1)
    if precompute:
        pairs = [EncodedPair(*(EncodedDialog(list(batch[f"{side}_tokens"][row]), list(batch[f"{side}_mask"][row]))
                               for side in ("chosen", "rejected")), 0.0) for row in range(4)]
        pairs = precompute_reference(trainer, reference, pairs, SEQ, 4, 0)
        batch = PairBatches(pairs, SEQ, 4, 0, seed=0).batch(0)
    _, metrics = trainer.jit_step((4, SEQ))(trainer.state_from_params(policy_params, 0),
                                            place_pair_batch(trainer, batch, 4))
    average = loss == "ipo"
    logps = [full_logprobs(params, batch[f"{side}_tokens"], batch[f"{side}_mask"], average)
             for params in (policy_params, reference) for side in ("chosen", "rejected")]
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = logps
    h = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if loss == "sigmoid":
        log_sigmoid = lambda x: -np.log1p(np.exp(-x))  # noqa: E731
        expected = -(1 - dpo.label_smoothing) * log_sigmoid(dpo.beta * h) - dpo.label_smoothing * log_sigmoid(
            -dpo.beta * h)
    else:
        expected = (h - 1 / (2 * dpo.beta)) ** 2
    np.testing.assert_allclose(float(metrics["loss"]), expected.mean(), rtol=2e-4)
    chosen_reward = dpo.beta * (policy_chosen - reference_chosen)
    rejected_reward = dpo.beta * (policy_rejected - reference_rejected)
    np.testing.assert_allclose(float(metrics["rewards/chosen"]), chosen_reward.mean(), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(float(metrics["rewards/rejected"]), rejected_reward.mean(), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(float(metrics["rewards/margins"]), (chosen_reward - rejected_reward).mean(),
                               rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(float(metrics["rewards/accuracies"]), np.mean(chosen_reward > rejected_reward))
    if not average:
        np.testing.assert_allclose(float(metrics["logps/chosen"]), policy_chosen.mean(), rtol=1e-4)
        np.testing.assert_allclose(float(metrics["logps/rejected"]), policy_rejected.mean(), rtol=1e-4)


def test_in_step_rollout_equals_generate(policy_params):
    """PPO samples inside its jitted step with generate's own prefill and decode loop: the same key and prompts give
    generate's tokens (the stop token kept, filler after it)."""
    model = model_from_params(CONFIG, policy_params)
    prompts = [[1, 5, 9], [1, 7, 3, 11, 4], [1, 2]]
    sampling = Sampling(temperature=1.0)
    stop = 6
    expected = generate(model, prompts, max_new_tokens=12, sampling=sampling, seed=3, stop_ids=[stop],
                        pad_to_multiple=1)
    padded = left_pad(prompts)
    stops = jnp.asarray([stop] + [-1] * 7, jnp.int32)

    @jax.jit
    def rollout(params, tokens, segment_ids, positions, lengths):
        prompts = PaddedPrompts(tokens, segment_ids, positions, lengths)
        return sample_in_graph(model_from_params(CONFIG, params), prompts, jax.random.PRNGKey(3), sampling, stops, 12)

    answers = np.asarray(rollout(policy_params, *(jnp.asarray(x) for x in padded)))
    for row, completion in enumerate(expected):
        produced = answers[row].tolist()
        if completion.stop_token is not None:
            end = len(completion.tokens)
            assert produced[:end + 1] == completion.tokens + [stop]
            assert all(token == 0 for token in produced[end + 1:])
        else:
            assert produced[:len(completion.tokens)] == completion.tokens


def test_assemble_builds_prompt_and_answer_rows():
    padded = left_pad([[1, 5, 9], [1, 7]])
    prompts = type(padded)(*(jnp.asarray(x) for x in padded))
    answers = jnp.asarray([[4, 6, 0, 0], [8, 3, 2, 5]])
    rows = jax.tree.map(np.asarray, assemble(prompts, answers, jnp.asarray([6, -1], jnp.int32), pad_id=0))
    assert rows["tokens"].tolist() == [[1, 5, 9, 4, 6, 0, 0], [0, 1, 7, 8, 3, 2, 5]]
    assert rows["response_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]]
    assert rows["positions"].tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 0, 1, 2, 3, 4, 5]]
    assert rows["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]]
