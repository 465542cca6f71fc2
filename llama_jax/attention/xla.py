"""Attention in plain XLA operations, with hand-written backward passes (the flash-attention backward).

`attend` holds the whole [s, t] score matrix of its inputs; `attend_in_chunks` runs it one block of queries at a time
against only the keys that block can see, so the [s, s] matrix never exists and the masked upper triangle is
skipped. Both keep only their inputs, output and each query's log-normaliser for the backward pass, which
recomputes the scores once.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llama_jax.attention.mask import AttentionMask

Array = jax.Array
MASKED_SCORE = float(jnp.finfo(jnp.float32).min)


@jax.custom_vjp
def attend(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Softmax(q·kᵀ/√d) v for grouped queries: q [b, s, heads, d], k/v [b, t, kv_heads, d], mask [b, s, t].

    Differentiated, it keeps only its inputs, its output and each query's log-normaliser, not the [s, t]
    probabilities; the backward pass recomputes the scores once and uses the log-normaliser in place of a softmax
    (the flash-attention backward, here per block of queries).

    Layouts are chosen for the CPU's matrix multiplies: the forward pass holds scores query-major [b, kv, g, s, t]
    and the backward pass key-major [b, kv, t, g, s], so that P·V, dV = Pᵀ·dO and dK = dSᵀ·Q contract the block's
    last axes, and dQ is computed transposed, dQᵀ = Kᵀ·dS, with the block as a plain right-hand operand. XLA:CPU
    otherwise copies a score-sized block into the transposed layout before the product. The group axis g comes
    before the query axis s because that is the order XLA gives the heads-major copy of q and dO; with s before g
    it transposed every probability block to match.
    """
    return _attend_forward(q, k, v, mask)[0]


def _heads_major(x: Array, kv_heads: int) -> Array:
    """[b, s, heads, d] → [b, kv_heads, heads per kv head, s, d] (query head h = kv head · group + g)."""
    batch, length, heads, head_dim = x.shape
    return jnp.transpose(x.reshape(batch, length, kv_heads, heads // kv_heads, head_dim), (0, 2, 3, 1, 4))


def _swap_length_and_heads(x: Array) -> Array:
    """[b, t, kv_heads, d] ↔ [b, kv_heads, t, d]."""
    return jnp.transpose(x, (0, 2, 1, 3))


def _from_heads_major(x: Array) -> Array:
    """[b, kv_heads, g, s, d] → [b, s, heads, d]."""
    batch, kv_heads, group, length, head_dim = x.shape
    return jnp.transpose(x, (0, 3, 1, 2, 4)).reshape(batch, length, kv_heads * group, head_dim)


def _per_layer(q: Array, mask: Array) -> tuple[Array, Array, Array]:
    """The mask and the masked-score value, tied to this layer's queries. Both are the same in every layer, so XLA
    would hoist their broadcasts to the score block's shape out of the loop over layers and then read them from
    memory (at 4K context, gigabytes of float32 fill values per step); tied, they stay fused into the masking."""
    return jax.lax.optimization_barrier((q, mask, jnp.float32(MASKED_SCORE)))


def _attend_forward(q: Array, k: Array, v: Array, mask: Array) -> tuple[Array, Array]:
    kv_heads, scale = k.shape[2], 1.0 / math.sqrt(q.shape[-1])
    q, mask, masked_score = _per_layer(q, mask)
    keys, values = _swap_length_and_heads(k), _swap_length_and_heads(v)  # [b, kv, t, d]
    scores = jnp.einsum("bkgsd,bktd->bkgst", _heads_major(q, kv_heads), keys, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores * scale, masked_score)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.exp(scores - row_max)  # unnormalised; dividing the [.., d] output instead is t/d times cheaper
    row_sum = jnp.sum(probs, axis=-1, keepdims=True)
    out = jnp.einsum("bkgst,bktd->bkgsd", probs.astype(v.dtype), values, preferred_element_type=jnp.float32)
    log_normaliser = (row_max + jnp.log(row_sum))[..., 0]  # [b, kv, g, s]
    return _from_heads_major(out / row_sum).astype(q.dtype), log_normaliser


def _attend_fwd(q, k, v, mask):
    out, log_normaliser = _attend_forward(q, k, v, mask)
    out, log_normaliser = saveable(out, log_normaliser)
    return out, (q, k, v, mask, out, log_normaliser)


def saveable(out: Array, log_normalisers):
    """Names the residuals the backward pass needs besides q, k, v, for the `save_attention_out` remat policy."""
    return checkpoint_name(out, "attention_out"), jax.tree.map(
        lambda x: checkpoint_name(x, "attention_log_normaliser"), log_normalisers)


def _attend_bwd(residuals, grad_out):
    q, k, v, mask, out, log_normaliser = residuals
    grads = _attend_grads(q, k, v, mask, out, log_normaliser, grad_out)
    return (*(grad.astype(x.dtype) for grad, x in zip(grads, (q, k, v))), None)


def _attend_grads(q, k, v, mask, out, log_normaliser, grad_out) -> tuple[Array, Array, Array]:
    """dq, dk, dv (float32) of `attend`, from its inputs, output and log-normaliser (the flash-attention backward)."""
    kv_heads, dtype, scale = k.shape[2], q.dtype, 1.0 / math.sqrt(q.shape[-1])
    queries, grad_out = _heads_major(q, kv_heads), _heads_major(grad_out.astype(dtype), kv_heads)
    keys, values = _swap_length_and_heads(k), _swap_length_and_heads(v)
    # Key-major [b, kv, t, g, s]: Pᵀ from the scores and the saved log-normaliser, masked entries exactly 0.
    scores_t = jnp.einsum("bktd,bkgsd->bktgs", keys, queries, preferred_element_type=jnp.float32)
    allowed_t = jnp.swapaxes(mask, 1, 2)[:, None, :, None, :]
    probs_t = jnp.where(allowed_t, jnp.exp(scores_t * scale - log_normaliser[:, :, None]), 0.0)
    grad_v = jnp.einsum("bktgs,bkgsd->bktd", probs_t.astype(dtype), grad_out, preferred_element_type=jnp.float32)
    grad_probs_t = jnp.einsum("bktd,bkgsd->bktgs", values, grad_out, preferred_element_type=jnp.float32)
    # softmax backward: dS = P ⊙ (dP − rowsum(dO ⊙ O)); then the 1/√d of the scores.
    row_dot = jnp.sum(grad_out.astype(jnp.float32) * _heads_major(out, kv_heads).astype(jnp.float32), axis=-1)
    grad_scores_t = (probs_t * (grad_probs_t - row_dot[:, :, None]) * scale).astype(dtype)
    grad_k = jnp.einsum("bktgs,bkgsd->bktd", grad_scores_t, queries, preferred_element_type=jnp.float32)
    # dQᵀ = Kᵀ·dS with Kᵀ [b, kv, d, t] transposed beforehand (it is small) and kept so by the barrier: XLA would
    # otherwise fold the transpose into the product, which then reads the score-sized block transposed, far slower.
    keys_t = jax.lax.optimization_barrier(jnp.swapaxes(keys, 2, 3))
    grad_q_t = jnp.einsum("bkdt,bktgs->bkdgs", keys_t, grad_scores_t, preferred_element_type=jnp.float32)
    grad_q = _from_heads_major(jnp.transpose(grad_q_t, (0, 1, 3, 4, 2)))
    return grad_q, _swap_length_and_heads(grad_k), _swap_length_and_heads(grad_v)


attend.defvjp(_attend_fwd, _attend_bwd)


def _query_blocks(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, length)) for start in range(0, length, chunk)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def attend_in_chunks(q: Array, k: Array, v: Array, mask: AttentionMask, chunk: int, offset: int = 0) -> Array:
    """Causal self-attention one block of queries at a time, never holding the full [s, s] score matrix.

    A query block [start, end) only needs keys [0, end), so the masked upper triangle is skipped entirely (about half
    the FLOPs of dense attention). The backward pass runs `attend`'s per block and adds each block's key and value
    gradients into [0, end) of one float32 buffer, rather than summing zero-padded copies of them.

    offset: the queries are keys offset..offset+s-1 of k (a shard of the sequence attending to the gathered keys,
    `llama_jax.attention.context`): block [start, end) then reads keys [0, offset + end).
    """
    return _attend_chunks_forward(q, k, v, mask, chunk, offset)[0]


def _attend_chunks_forward(q, k, v, mask, chunk, offset):
    outputs, log_normalisers = [], []
    for start, end in _query_blocks(q.shape[1], chunk):
        seen = offset + end
        block_mask = mask.dense(slice(start, end), slice(0, seen))
        out, log_normaliser = _attend_forward(q[:, start:end], k[:, :seen], v[:, :seen], block_mask)
        outputs.append(out)
        log_normalisers.append(log_normaliser)
    return jnp.concatenate(outputs, axis=1), log_normalisers


def _attend_chunks_fwd(q, k, v, mask, chunk, offset):
    out, log_normalisers = _attend_chunks_forward(q, k, v, mask, chunk, offset)
    out, log_normalisers = saveable(out, log_normalisers)
    return out, (q, k, v, mask, out, log_normalisers)


def _attend_chunks_bwd(chunk, offset, residuals, grad_out):
    q, k, v, mask, out, log_normalisers = residuals
    grad_qs = []
    grad_k, grad_v = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for (start, end), log_normaliser in zip(_query_blocks(q.shape[1], chunk), log_normalisers):
        seen = offset + end
        block_mask = mask.dense(slice(start, end), slice(0, seen))
        block_q, block_k, block_v = _attend_grads(q[:, start:end], k[:, :seen], v[:, :seen], block_mask,
                                                  out[:, start:end], log_normaliser, grad_out[:, start:end])
        grad_qs.append(block_q)
        grad_k, grad_v = grad_k.at[:, :seen].add(block_k), grad_v.at[:, :seen].add(block_v)
    return jnp.concatenate(grad_qs, axis=1).astype(q.dtype), grad_k.astype(k.dtype), grad_v.astype(v.dtype), None


attend_in_chunks.defvjp(_attend_chunks_fwd, _attend_chunks_bwd)
