"""Our model against transformers' LlamaForCausalLM (eager attention, float32) on the same random weights."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import hf_logits, ours_from_hf, random_hf_model

from llama_jax import generate
from llama_jax.config import ModelConfig, RopeScaling

BASE = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=8, n_kv_heads=8, ffn_hidden_dim=96,
                   max_seq_len=64, norm_eps=1e-5, dtype="float32", remat_policy="none")

CASES = {
    "multi-head": BASE,
    "grouped-query": dataclasses.replace(BASE, n_kv_heads=2),
    "multi-query": dataclasses.replace(BASE, n_kv_heads=1),
    # Llama 3.1 scaling with an original context of 16, exercised on 48 tokens (3x longer).
    "llama3.1-rope-scaling": dataclasses.replace(BASE, n_kv_heads=2, rope_theta=500000.0, max_seq_len=64,
                                                 rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16)),
    "tied-embeddings": dataclasses.replace(BASE, n_kv_heads=4, tie_embeddings=True),
    "chunked-attention": dataclasses.replace(BASE, n_kv_heads=2, attention_impl="chunked", attention_chunk=16),
    "chunked-attention-uneven": dataclasses.replace(BASE, n_kv_heads=2, attention_impl="chunked", attention_chunk=20),
}
SEQ_LEN = 48


@nnx.jit
def forward(model, tokens):
    return model(tokens)


@functools.partial(jax.jit, static_argnums=0)
def decode_forward(arch, weights, tokens, start, cache):
    """The decoder's (llama_jax.generate) forward pass over the next tokens, appending them to the KV cache."""
    positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, cache = generate.forward(arch, weights, tokens, positions, jnp.ones_like(tokens), cache)
    return generate.output_logits(arch, weights, hidden), cache


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    config = CASES[request.param]
    reference = random_hf_model(config, seed=len(request.param))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, SEQ_LEN))
    return config, reference, ours_from_hf(config, reference), tokens


def test_full_forward_matches_transformers(pair):
    config, reference, ours, tokens = pair
    expected = hf_logits(reference, tokens)
    got = np.asarray(forward(ours, jnp.asarray(tokens, jnp.int32)))
    assert got.dtype == np.float32 and got.shape == (2, SEQ_LEN, config.vocab_size)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_kv_cache_decode_matches_transformers(pair):
    """Prefill 20 tokens, then feed the rest one at a time: every step's logits equal the reference's."""
    config, reference, ours, tokens = pair
    logits, cache = prefill_then_decode(config, ours, tokens, prefill=20, max_len=SEQ_LEN + 8)
    np.testing.assert_allclose(logits, hf_logits(reference, tokens), atol=1e-5, rtol=0)
    assert int(cache.index) == SEQ_LEN


def prefill_then_decode(config, model, tokens, *, prefill: int, max_len: int):
    """Logits of every position through the decoder (llama_jax.generate): the first `prefill` tokens in one call,
    then one token per call from the KV cache; and the final cache."""
    arch, weights = generate.decode_weights(model)
    cache = generate.LayerCache.empty(config, batch=tokens.shape[0], max_len=max_len)
    logits, cache = decode_forward(arch, weights, jnp.asarray(tokens[:, :prefill], jnp.int32), 0, cache)
    steps = [np.asarray(logits)]
    for t in range(prefill, tokens.shape[1]):
        logits, cache = decode_forward(arch, weights, jnp.asarray(tokens[:, t:t + 1], jnp.int32), t, cache)
        steps.append(np.asarray(logits))
    return np.concatenate(steps, axis=1), cache


# The default CPU attention path: head_dim 32 (the CPU kernel needs a multiple of 16) and 150 tokens, more than two
# of the kernel's 64-key blocks and a partial third, under `auto` (which picks the kernel here) and forced.
KERNEL_BASE = ModelConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=160,
                          max_seq_len=160, norm_eps=1e-5, dtype="float32", remat_policy="none")
KERNEL_SEQ_LEN = 150


@pytest.fixture(scope="module", params=["auto", "flash_cpu"])
def kernel_pair(request):
    from llama_jax.attention import cpu

    assert cpu.unavailable_reason() is None  # else `auto` would quietly test XLA's attention instead
    config = dataclasses.replace(KERNEL_BASE, attention_impl=request.param)
    reference = random_hf_model(config, seed=7)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, size=(2, KERNEL_SEQ_LEN))
    return config, reference, ours_from_hf(config, reference), tokens


def test_cpu_kernel_forward_matches_transformers(kernel_pair):
    config, reference, ours, tokens = kernel_pair
    got = np.asarray(forward(ours, jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(got, hf_logits(reference, tokens), atol=1e-5, rtol=0)


def test_cpu_kernel_config_kv_cache_decode_matches_transformers(kernel_pair):
    config, reference, ours, tokens = kernel_pair
    logits, _ = prefill_then_decode(config, ours, tokens, prefill=100, max_len=KERNEL_SEQ_LEN + 10)
    np.testing.assert_allclose(logits, hf_logits(reference, tokens), atol=1e-5, rtol=0)
