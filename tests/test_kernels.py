"""The hand-written gradients (ops.mixed_einsum, ops.output_head_loss) against independent references:
jax.grad of plain float64 code that shares nothing with the kernels but the maths."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.ops import mixed_einsum, output_head_loss


def _relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("equation, x_shape, y_shape", [
    ("bsd,dhk->bshk", (2, 5, 8), (8, 3, 4)),  # q/k/v projections
    ("bshk,hkd->bsd", (2, 5, 3, 4), (3, 4, 8)),  # output projection
    ("bsd,vd->bsv", (2, 5, 8), (11, 8)),  # tied output head
    ("bskgd,btkd->bkgst", (2, 5, 2, 3, 4), (2, 6, 2, 4)),  # grouped attention scores (batch dims)
    ("bkgst,btkd->bskgd", (2, 2, 3, 5, 6), (2, 6, 2, 4)),  # attention values
])
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_mixed_einsum_value_and_gradients_match_float64(equation, x_shape, y_shape, dtype, tolerance):
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], x_shape, jnp.float32)
    y = jax.random.normal(keys[1], y_shape, jnp.float32)
    out_shape = jax.eval_shape(lambda a, b: jnp.einsum(equation, a, b), x, y).shape
    cotangent = jax.random.normal(keys[2], out_shape, jnp.float32)

    value, grads = jax.value_and_grad(lambda a, b: jnp.sum(mixed_einsum(equation, a, b, jnp.dtype(dtype))
                                                           * cotangent), argnums=(0, 1))(x, y)
    with jax.enable_x64(True):
        x64, y64, c64 = (jnp.asarray(np.asarray(t), jnp.float64) for t in (x, y, cotangent))
        ref_value, ref_grads = jax.value_and_grad(lambda a, b: jnp.sum(jnp.einsum(equation, a, b) * c64),
                                                  argnums=(0, 1))(x64, y64)
        ref_grads = [np.asarray(g) for g in ref_grads]
        # The forward pass multiplies the inputs rounded to `dtype` exactly and accumulates in float32: against
        # float64 products of the same rounded inputs, only float32 accumulation error remains.
        rounded = [jnp.asarray(np.asarray(t.astype(dtype).astype(jnp.float32)), jnp.float64) for t in (x, y)]
        rounded_value = float(jnp.sum(jnp.einsum(equation, *rounded) * c64))
    assert float(value) == pytest.approx(rounded_value, rel=1e-5, abs=1e-4)
    assert abs(float(value) - float(ref_value)) <= tolerance * max(1.0, abs(float(ref_value)))
    for grad, ref, primal in zip(grads, ref_grads, (x, y)):
        assert grad.dtype == primal.dtype and grad.shape == primal.shape
        assert _relative_error(grad, ref) < tolerance


def test_mixed_einsum_gradient_keeps_a_bfloat16_input_bfloat16():
    x = jnp.ones((2, 3, 4), jnp.bfloat16)
    w = jnp.ones((4, 5), jnp.float32)
    grad_x, grad_w = jax.grad(lambda a, b: jnp.sum(mixed_einsum("bsd,dv->bsv", a, b, jnp.dtype(jnp.bfloat16))),
                              argnums=(0, 1))(x, w)
    assert grad_x.dtype == jnp.bfloat16 and grad_w.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(grad_w), np.full((4, 5), 6.0))


def _reference_head_loss(hidden, head, targets, weights, layout):
    """Plain float64 cross-entropy of the whole [batch, seq, vocab] logits, no chunks."""
    logits = jnp.einsum("bsd,dv->bsv" if layout == "dv" else "bsd,vd->bsv", hidden, head)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_loss = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_loss * weights), jnp.sum(weights)


@pytest.mark.parametrize("layout", ["dv", "vd"])
@pytest.mark.parametrize("length, chunk", [(12, 4), (12, 12), (10, 5)])
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_output_head_loss_value_and_gradients_match_float64(layout, length, chunk, dtype, tolerance):
    batch, dim, vocab = 3, 16, 37
    keys = jax.random.split(jax.random.key(2), 4)
    hidden = jax.random.normal(keys[0], (batch, length, dim), jnp.float32).astype(dtype)
    head_shape = (dim, vocab) if layout == "dv" else (vocab, dim)
    head = 0.5 * jax.random.normal(keys[1], head_shape, jnp.float32)
    targets = jax.random.randint(keys[2], (batch, length), 0, vocab, jnp.int32)
    weights = (jax.random.uniform(keys[3], (batch, length)) > 0.3).astype(jnp.float32)  # some tokens not counted
    scale = 0.37  # a cotangent other than 1 must scale both gradients

    def loss(h, w):
        total, count = output_head_loss(h, w, targets, weights, layout, jnp.dtype(dtype), chunk)
        return scale * total, count

    (value, count), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, head)
    with jax.enable_x64(True):
        h64, w64 = (jnp.asarray(np.asarray(t, np.float64)) for t in (hidden, head))
        t64, m64 = jnp.asarray(np.asarray(targets)), jnp.asarray(np.asarray(weights, np.float64))

        def ref_loss(h, w):
            total, ref_count = _reference_head_loss(h, w, t64, m64, layout)
            return scale * total, ref_count

        (ref_value, ref_count), ref_grads = jax.value_and_grad(ref_loss, argnums=(0, 1), has_aux=True)(h64, w64)
        ref_value, ref_count, ref_grads = float(ref_value), float(ref_count), [np.asarray(g) for g in ref_grads]
    assert float(count) == ref_count == float(np.sum(np.asarray(weights)))
    assert abs(float(value) - ref_value) <= tolerance * abs(ref_value)
    assert grads[0].dtype == hidden.dtype and grads[1].dtype == jnp.float32
    for grad, ref in zip(grads, ref_grads):
        assert _relative_error(grad, ref) < tolerance
    # Without differentiation the same function gives the same value.
    total, _ = output_head_loss(hidden, head, targets, weights, layout, jnp.dtype(dtype), chunk)
    assert float(scale * total) == pytest.approx(float(value), rel=1e-6)


def _reference_attention(q, k, v, mask):
    """Plain softmax attention in float64 with GQA by repeating k/v heads (the way transformers does)."""
    heads, kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
    k = jnp.repeat(k, heads // kv_heads, axis=2)
    v = jnp.repeat(v, heads // kv_heads, axis=2)
    scores = jnp.einsum("bshd,bthd->bhst", q, k) / np.sqrt(head_dim)
    scores = jnp.where(mask[:, None], scores, -np.inf)
    return jnp.einsum("bhst,bthd->bshd", jax.nn.softmax(scores, axis=-1), v)


def _packed_mask(batch: int, length: int):
    """Row 0 packs documents of several lengths (and padding, segment 0, at the end); the others hold one document."""
    from llama_jax.attention import AttentionMask

    slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    bounds = [0, length * 4 // 13, length * 9 // 13, length * 11 // 13, length]
    first_row = np.concatenate([np.full(end - start, segment) for segment, (start, end)
                                in enumerate(zip(bounds[:-1], bounds[1:]), start=1)])
    first_row[bounds[3]:] = 0
    segments = jnp.asarray(np.stack([first_row] + [np.ones(length, np.int32)] * (batch - 1)), jnp.int32)
    return AttentionMask(slots, segments, slots, segments), bounds[1]


# None: one dense block; 5 does not divide 13; "flash": the native CPU kernel (one partial 64-block at 13, two full
# and one partial at 150, a document boundary and padding inside blocks).
@pytest.mark.parametrize("chunk, length, heads, kv_heads", [
    (None, 13, 6, 2), (4, 13, 6, 2), (5, 13, 6, 2), (13, 13, 6, 2),
    ("flash", 13, 6, 2), ("flash", 150, 6, 2), ("flash", 150, 4, 4), ("flash", 128, 3, 1)])
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_attention_value_and_gradients_match_float64(chunk, length, heads, kv_heads, dtype, tolerance):
    from llama_jax.attention import attend, attend_in_chunks
    from llama_jax.attention.cpu import attend_flash_cpu

    batch, head_dim = 2, 16
    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), jnp.float32).astype(dtype)
    cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
    mask, first_document = _packed_mask(batch, length)

    def ours(q_, k_, v_):
        if chunk is None:
            return attend(q_, k_, v_, mask.dense())
        if chunk == "flash":
            return attend_flash_cpu(q_, k_, v_, mask)
        return attend_in_chunks(q_, k_, v_, mask, chunk)

    out, pullback = jax.vjp(jax.jit(ours), q, k, v)
    grads = pullback(cotangent.astype(dtype))
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    with jax.enable_x64(True):
        args64 = [jnp.asarray(np.asarray(t, np.float64)) for t in (q, k, v)]
        dense_mask = jnp.asarray(np.asarray(mask.dense()))
        ref_out, ref_pullback = jax.vjp(lambda *a: _reference_attention(*a, dense_mask), *args64)
        ref_grads = [np.asarray(g) for g in ref_pullback(jnp.asarray(np.asarray(cotangent, np.float64)))]
        ref_out = np.asarray(ref_out)
    assert _relative_error(out, ref_out) < tolerance
    for grad, ref in zip(grads, ref_grads):
        assert _relative_error(grad, ref) < tolerance
    # Nothing leaks across documents: a key's gradient comes only from queries of its own document.
    first_doc_keys = grads[1][0, :first_document]
    _, only_first = jax.vjp(ours, q, k, v)
    cotangent_rest = cotangent.at[0, :first_document].set(0.0)
    leaked = only_first(cotangent_rest.astype(dtype))[1][0, :first_document]
    assert float(jnp.max(jnp.abs(leaked.astype(jnp.float32)))) == 0.0
    assert float(jnp.max(jnp.abs(first_doc_keys.astype(jnp.float32)))) > 0.0


def _tiny_model_gradient(remat_policy: str):
    import dataclasses

    from flax import nnx

    from llama_jax.config import MODEL_PRESETS
    from llama_jax.model import Llama

    config = dataclasses.replace(MODEL_PRESETS["tiny"], dtype="float32", remat_policy=remat_policy,
                                 attention_impl="chunked", attention_chunk=16)
    graphdef, params = nnx.split(Llama(config, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(5), (2, 40), 0, config.vocab_size)
    weights = jax.random.normal(jax.random.key(6), (2, 40, config.vocab_size))

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params)(tokens) * weights)

    return jax.grad(loss)(params), str(jax.make_jaxpr(jax.grad(loss))(params))


def test_remat_policies_give_the_same_gradients_and_save_attention_out_skips_the_attention_forward():
    reference, plain_program = _tiny_model_gradient("none")
    exps_without_remat = plain_program.count(" exp ")
    for policy in ("full", "save_dots", "save_attention_out"):
        grads, program = _tiny_model_gradient(policy)
        for grad, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
            assert _relative_error(grad, ref) < 1e-5, policy
        # Softmax exponentials in the program: forward + backward without remat; `full` recomputes the attention
        # forward once more, `save_attention_out` keeps its output and log-normaliser and must not.
        expected = exps_without_remat + (exps_without_remat // 2 if policy in ("full", "save_dots") else 0)
        assert program.count(" exp ") == expected, policy


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_gated_silu_value_and_gradients_match_float64(dtype, tolerance):
    from llama_jax.ops import gated_silu

    keys = jax.random.split(jax.random.key(7), 3)
    gate, up = (3 * jax.random.normal(key, (2, 5, 12), jnp.float32) for key in keys[:2])
    cotangent = jax.random.normal(keys[2], (2, 5, 12), jnp.float32).astype(dtype)
    out, pullback = jax.vjp(lambda g, u: gated_silu(g, u, dtype), gate, up)
    grads = pullback(cotangent)
    assert out.dtype == dtype and all(g.dtype == jnp.float32 for g in grads)
    with jax.enable_x64(True):
        g64, u64, c64 = (jnp.asarray(np.asarray(t, np.float64)) for t in (gate, up, cotangent))
        ref_out, ref_pullback = jax.vjp(lambda g, u: g / (1 + jnp.exp(-g)) * u, g64, u64)
        ref_grads = [np.asarray(t) for t in ref_pullback(c64)]
    assert _relative_error(out, np.asarray(ref_out)) < tolerance
    for grad, ref in zip(grads, ref_grads):
        assert _relative_error(grad, ref) < tolerance
