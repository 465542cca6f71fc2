"""The optimizer recipe and gradient accumulation against hand-written references.

AdamW (β 0.9/0.95, eps 1e-5, weight decay 0.1 not on norm scales) after global-norm clipping at 1.0 is written out
in numpy below, as Loshchilov & Hutter and Llama 2 describe it; the learning rate follows the warmup + cosine formula
written out here; accumulating gradients over micro-batches must give the whole batch's token-weighted mean.
"""
import dataclasses
import math

import jax
import numpy as np
import pytest

from llama_jax.config import MODEL_PRESETS, OptimizerConfig
from llama_jax.sharding import make_mesh
from llama_jax.trainer import Trainer, learning_rate_schedule, make_optimizer

RECIPE = OptimizerConfig(lr=1e-2, warmup_steps=0)


def numpy_adamw_steps(params, grads_per_step, config, learning_rates):
    """Clip by the global norm, then AdamW with bias correction; no weight decay on 1-D scales (norms)."""
    params = {name: np.asarray(value, np.float64) for name, value in params.items()}
    m = {name: np.zeros_like(value) for name, value in params.items()}
    v = {name: np.zeros_like(value) for name, value in params.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, learning_rates), start=1):
        norm = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads.values()))
        scale = min(1.0, config.clip_norm / norm)
        for name, value in params.items():
            g = np.asarray(grads[name], np.float64) * scale
            m[name] = config.b1 * m[name] + (1 - config.b1) * g
            v[name] = config.b2 * v[name] + (1 - config.b2) * g * g
            m_hat, v_hat = m[name] / (1 - config.b1 ** t), v[name] / (1 - config.b2 ** t)
            step = m_hat / (np.sqrt(v_hat) + config.eps)
            if value.ndim > 1 and not name.endswith(".scale"):
                step = step + config.weight_decay * value
            params[name] = value - lr * step
    return params


def test_adamw_steps_match_the_hand_written_update():
    rng = np.random.default_rng(0)
    params = {"embedding": rng.normal(size=(5, 4)), "blocks.mlp.w_up": rng.normal(size=(2, 4, 3)),
              "final_norm.scale": rng.normal(size=(4,)) + 1.0}
    params = {name: value.astype(np.float32) for name, value in params.items()}
    # The first step's gradients have a global norm far above 1 (clipped), the second's below it (not clipped).
    grads_per_step = [{name: (3.0 * rng.normal(size=value.shape)).astype(np.float32) for name, value in params.items()},
                      {name: (0.05 * rng.normal(size=value.shape)).astype(np.float32)
                       for name, value in params.items()}]
    total_steps = 50
    optimizer = make_optimizer(RECIPE, total_steps)
    schedule = learning_rate_schedule(RECIPE, total_steps)
    state, ours = optimizer.init(params), params
    for grads in grads_per_step:
        updates, state = optimizer.update(grads, state, ours)
        ours = {name: ours[name] + updates[name] for name in ours}
    expected = numpy_adamw_steps(params, grads_per_step, RECIPE, [float(schedule(0)), float(schedule(1))])
    for name in params:
        np.testing.assert_allclose(ours[name], expected[name], rtol=2e-5, atol=1e-6, err_msg=name)


def test_learning_rate_warmup_peak_and_cosine_end():
    config = OptimizerConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    total = 100
    schedule = learning_rate_schedule(config, total)

    def formula(step: int) -> float:
        if step < config.warmup_steps:
            return config.lr * step / config.warmup_steps
        progress = (step - config.warmup_steps) / (total - config.warmup_steps)
        floor = config.lr * config.min_lr_ratio
        return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    for step in (0, 5, 10, 11, 40, 55, 99, 100):
        assert float(schedule(step)) == pytest.approx(formula(step), rel=1e-5, abs=1e-12), step
    assert float(schedule(10)) == pytest.approx(1e-3) and float(schedule(100)) == pytest.approx(1e-4)


def accumulation_run(grad_accum: int):
    config = dataclasses.replace(MODEL_PRESETS["test"], dtype="float32", remat_policy="none")
    trainer = Trainer.create(config, RECIPE, total_steps=10, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                             grad_accum=grad_accum)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, config.vocab_size, (4, 33)).astype(np.int32)
    mask = np.ones((4, 32), np.float32)
    mask[0, :28] = 0  # micro-batch 0 (rows 0 and 2 when split in two) holds far fewer scored tokens than batch 1
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}
    state = trainer.init_state(seed=0)
    loss, grads, count, _ = trainer.under_rules(jax.jit(trainer.loss_and_grads))(state.params, batch)
    new_state, _ = trainer.jit_step((4, 32))(state, batch)
    return float(loss), jax.device_get(grads), float(count), jax.device_get(new_state.params)


def test_gradient_accumulation_equals_the_whole_batch():
    loss_1, grads_1, count_1, params_1 = accumulation_run(1)
    loss_2, grads_2, count_2, params_2 = accumulation_run(2)
    assert count_1 == count_2 == 4 * 32 - 28
    assert loss_2 == pytest.approx(loss_1, rel=1e-6)
    for name in grads_1:
        np.testing.assert_allclose(grads_2[name], grads_1[name], rtol=1e-5, atol=1e-7, err_msg=name)
        # Adam divides by √v, so float32 rounding in tiny gradients shows in the update at ~1e-7 absolute.
        np.testing.assert_allclose(params_2[name], params_1[name], rtol=1e-6, atol=2e-6, err_msg=name)
