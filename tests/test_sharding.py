"""Sharded equals unsharded: one train step's loss and gradients on 8 simulated devices against one device."""
import dataclasses
import functools

import jax
import numpy as np
import pytest

from llama_jax.config import MODEL_PRESETS, OptimizerConfig
from llama_jax.errors import ConfigError
from llama_jax.sharding import DEFAULT_RULES, bytes_per_device, logical_to_spec, make_mesh, rules_from_config
from llama_jax.trainer import Trainer

CONFIG = dataclasses.replace(MODEL_PRESETS["test"], dtype="float32", attention_impl="chunked", attention_chunk=16)
BATCH, SEQ = 8, 32


def make_batch():
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
    mask = np.ones((BATCH, SEQ), np.float32)
    mask[0, :5] = 0  # uneven loss weights: the mean must be over weighted tokens, not micro-batches
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}


@functools.cache
def one_step(mesh_shape):
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    trainer = Trainer.create(CONFIG, OptimizerConfig(lr=1e-2, warmup_steps=0), total_steps=10,
                             mesh=make_mesh(*mesh_shape, devices=devices), grad_accum=2)
    state = trainer.init_state(seed=0)
    loss_and_grads = trainer.under_rules(jax.jit(trainer.loss_and_grads))
    loss, grads, _ = loss_and_grads(state.params, make_batch())
    new_state, metrics = trainer.jit_step((BATCH, SEQ))(state, make_batch())
    return {"loss": float(loss), "grads": jax.device_get(grads), "params": jax.device_get(new_state.params),
            "metrics": jax.device_get(metrics), "state": new_state}


@pytest.fixture(scope="module")
def single_device():
    return one_step((1, 1, 1))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2)])
def test_sharded_step_equals_single_device(single_device, mesh_shape):
    sharded = one_step(mesh_shape)
    np.testing.assert_allclose(sharded["loss"], single_device["loss"], rtol=1e-6)
    for name, grad in single_device["grads"].items():
        np.testing.assert_allclose(sharded["grads"][name], grad, atol=1e-6, rtol=1e-4, err_msg=name)
    for name, param in single_device["params"].items():
        # Adam divides by sqrt(v): float32 noise in near-zero gradients moves a parameter by ~1e-6 of a 1e-2 step.
        np.testing.assert_allclose(sharded["params"][name], param, atol=1e-5, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(sharded["metrics"]["grad_norm"], single_device["metrics"]["grad_norm"], rtol=1e-5)


def test_loss_is_independent_of_the_model_code_path(single_device):
    """The step's loss at init equals a plain log-softmax cross-entropy of the full logits (second code path)."""
    from llama_jax.params import model_from_params

    trainer = Trainer.create(CONFIG, OptimizerConfig(), 10, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    params = jax.device_get(trainer.init_state(seed=0).params)
    batch = make_batch()
    logits = np.asarray(model_from_params(CONFIG, params)(batch["inputs"]), np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    token_loss = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
    expected = (token_loss * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    np.testing.assert_allclose(single_device["loss"], expected, rtol=1e-5)


def test_fsdp8_holds_an_eighth_of_the_parameters_per_device():
    state = one_step((1, 8, 1))["state"]
    total = sum(value.nbytes for value in jax.tree.leaves(state.params))
    per_device = bytes_per_device(state.params)
    assert len(per_device) == 8
    small_replicated = sum(value.nbytes for name, value in state.params.items() if value.ndim <= 1)
    for device, held in per_device.items():
        assert held <= total / 8 + small_replicated, (device, held, total)
    # The optimizer's moments follow the parameters' shardings.
    opt_total = sum(leaf.nbytes for leaf in jax.tree.leaves(state.opt_state))
    assert max(bytes_per_device(state.opt_state).values()) <= opt_total / 8 + 1024


def test_rules_resolution():
    mesh = make_mesh(2, 2, 2)
    assert logical_to_spec(("batch", "length", "embed"), DEFAULT_RULES, (8, 16, 64), mesh) == \
        jax.sharding.PartitionSpec(("data", "fsdp"), None, None)  # fsdp serves batch first, then is used up
    assert logical_to_spec(("embed", "mlp"), DEFAULT_RULES, (64, 160), mesh) == \
        jax.sharding.PartitionSpec("fsdp", "tensor")
    # A dimension the mesh axis does not divide stays replicated on that axis.
    assert logical_to_spec(("kv_heads",), DEFAULT_RULES, (1,), mesh) == jax.sharding.PartitionSpec(None)


def test_mesh_shapes_and_errors():
    assert make_mesh(1, -1, 2).shape == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ConfigError, match="3×1×1 = 3 but 8 devices"):
        make_mesh(3, 1, 1)
    with pytest.raises(ConfigError, match="only one of"):
        make_mesh(-1, -1, 1)
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
        rules_from_config({"mlp": ["model"]})
    with pytest.raises(ConfigError, match="unknown logical axis"):
        rules_from_config({"hidden": ["tensor"]})
