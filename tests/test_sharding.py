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
    loss, grads, _, _ = loss_and_grads(state.params, make_batch())
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


# ── Sequence (context) parallelism: sharding_rules: sequence ─────────────────────────────────────────────────────
# Sequences of 256 tokens split over fsdp; query blocks of 64, so a device's queries span one or two blocks and the
# gathered keys several devices' worth. Packed documents (segment ids, positions restarting) cross shard boundaries.
SEQ_CONFIG = dataclasses.replace(CONFIG, attention_chunk=64, max_seq_len=256)
SEQ_BATCH, SEQ_LEN = 4, 256


def sequence_batch(documents: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, SEQ_CONFIG.vocab_size, (SEQ_BATCH, SEQ_LEN + 1)).astype(np.int32)
    mask = np.ones((SEQ_BATCH, SEQ_LEN), np.float32)
    mask[1, :7] = 0
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}
    if documents:  # documents of 100 + 156 tokens (row 2: 100 + 90 + 66); positions restart at each
        segments = np.ones((SEQ_BATCH, SEQ_LEN), np.int32)
        segments[:, 100:] = 2
        segments[2, 190:] = 3
        starts = np.maximum.accumulate(np.where(np.diff(segments, prepend=0) != 0, np.arange(SEQ_LEN), 0), axis=1)
        batch.update(segment_ids=segments, positions=(np.arange(SEQ_LEN) - starts).astype(np.int32))
    return batch


@functools.cache
def sequence_step(mesh_shape, rules_name, impl, documents):
    from llama_jax.sharding import NAMED_RULES

    config = dataclasses.replace(SEQ_CONFIG, attention_impl=impl)
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    trainer = Trainer.create(config, OptimizerConfig(lr=1e-2, warmup_steps=0), total_steps=10,
                             mesh=make_mesh(*mesh_shape, devices=devices), rules=NAMED_RULES[rules_name], grad_accum=2)
    params = trainer.init_state(seed=0).params
    loss, grads, _, _ = trainer.under_rules(jax.jit(trainer.loss_and_grads))(params, sequence_batch(documents))
    return float(loss), jax.device_get(grads)


@pytest.mark.parametrize("mesh_shape, impl, documents", [
    ((1, 4, 2), "chunked", False),  # XLA's query blocks, one traced branch per shard offset
    ((1, 2, 4), "chunked", True),  # tensor 4 splits 4 query heads, not 2 kv heads: attention keeps heads whole
    ((2, 2, 2), "auto", True),  # auto on CPU devices: the flash kernel on each shard (slots carry the offsets)
    pytest.param((1, 8, 1), "dense", False, marks=pytest.mark.slow),
])
def test_sequence_sharded_step_equals_single_device(mesh_shape, impl, documents):
    """The sequence split over fsdp (keys and values gathered in attention) against one device's dense attention."""
    expected_loss, expected_grads = sequence_step((1, 1, 1), "default", "dense", documents)
    loss, grads = sequence_step(mesh_shape, "sequence", impl, documents)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    for name, grad in expected_grads.items():
        np.testing.assert_allclose(grads[name], grad, atol=1e-6, rtol=1e-4, err_msg=name)


def test_sequence_rules_split_tokens_and_activations_not_the_batch():
    from jax.sharding import PartitionSpec as P

    from llama_jax.config import load_config
    from llama_jax.sharding import SEQUENCE_RULES

    mesh = make_mesh(2, 2, 2)
    assert rules_from_config(load_config(None, ["sharding_rules=sequence"]).sharding_rules) == SEQUENCE_RULES
    assert rules_from_config("default") == DEFAULT_RULES
    assert logical_to_spec(("batch", "length"), SEQUENCE_RULES, (4, 256), mesh) == P("data", "fsdp")
    assert logical_to_spec(("batch", "length", "embed"), SEQUENCE_RULES, (4, 256, 64), mesh) == P("data", "fsdp", None)
    # Weights are split exactly as by default (the fsdp axis also shards them, as MaxText's context axis does).
    for axes, shape in ((("embed", "mlp"), (64, 160)), (("vocab", "embed"), (256, 64))):
        assert logical_to_spec(axes, SEQUENCE_RULES, shape, mesh) == logical_to_spec(axes, DEFAULT_RULES, shape, mesh)
    with pytest.raises(ConfigError, match=r"^sharding_rules='context' is not a known table: expected one of "
                                          r"\['default', 'sequence'\]"):
        rules_from_config("context")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_a_split_sequence_lowers_for_gpus_and_tpus_with_xla_attention(platform):
    """The fused GPU/TPU kernels' causal masks assume queries at slots 0..s-1: on a split sequence `auto` runs XLA's
    attention on each shard (keys and values all-gathered), and a kernel named explicitly is a one-line error."""
    import re

    import jax.numpy as jnp

    from llama_jax.attention import compiling_for
    from llama_jax.errors import KernelError
    from llama_jax.sharding import SEQUENCE_RULES

    def lowered(impl):
        config = dataclasses.replace(SEQ_CONFIG, dtype="bfloat16", attention_impl=impl)
        trainer = Trainer.create(config, OptimizerConfig(), 10, make_mesh(1, 4, 2), SEQUENCE_RULES)
        shape = (2, SEQ_LEN)
        batch = {key: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=trainer.batch_shardings(shape))
                 for key in ("inputs", "targets", "loss_mask")}
        with trainer.activation_sharding(), compiling_for(platform):
            return trainer.jit_step(shape).__wrapped__.trace(trainer.restore_target(), batch).lower(
                lowering_platforms=(platform,)).as_text()

    text = lowered("auto")
    assert "all_gather" in text
    calls = set(re.findall(r"custom_call @([\w$.\-]+)", text))
    assert not {call for call in calls if "cudnn" in call or "triton" in call or "tpu_custom_call" in call
                or "llama_jax_flash" in call}, calls
    named = "cudnn" if platform == "cuda" else "splash"
    with pytest.raises(KernelError, match=rf"^model.attention_impl={named} cannot run here: the mesh splits the "
                                          "sequence"):
        lowered(named)
