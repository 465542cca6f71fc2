"""Custom-gradient numerics the model and the train step are built from.

Each function here has a backward pass written by hand, because autodiff's would be slower or hold more memory:
- `mixed_einsum`: products in the compute dtype, accumulated in float32, also in the backward pass;
- `gated_silu`: SwiGLU's silu(gate)·up, keeping its residuals in the compute dtype;
- `output_head_loss`: the output head and cross-entropy chunk by chunk over the sequence, never holding the
  [batch, seq, vocab] logits, with the gradient computed in the forward pass while each chunk's logits are at hand.
Attention's kernels live in `llama_jax.attention`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
HEAD_CHUNK = 256  # sequence positions per output-head chunk: full-vocab logits are never materialised at once


def dot(equation: str, x: Array, w: Array, dtype: jnp.dtype) -> Array:
    """Einsum with inputs in the compute dtype and float32 accumulation (much faster than bf16 out on CPU too)."""
    return mixed_einsum(equation, x, w, jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def mixed_einsum(equation: str, x: Array, y: Array, dtype: jnp.dtype) -> Array:
    """einsum(equation, x, y) with both inputs cast to `dtype`, accumulated and returned in float32.

    The backward pass is written out so that its two products run in `dtype` as well: the incoming float32 cotangent
    is rounded to `dtype` (as PyTorch's autocast does), and each gradient is accumulated in float32 and returned in
    its input's dtype (a float32 weight gets a float32 gradient). Plain autodiff would multiply the float32
    cotangent by a bfloat16 operand, which XLA:CPU runs as a float32 product at well under the bf16 rate, and would
    round weight gradients to bfloat16 on their way back through the cast.
    """
    return jnp.einsum(equation, x.astype(dtype), y.astype(dtype), preferred_element_type=jnp.float32)


def compact_residuals(dtype: jnp.dtype, *inputs: Array) -> tuple[Array, ...]:
    """The inputs in the compute dtype for a backward pass (half the bytes of float32), then one zero-size array per
    input that keeps its own dtype, so that its gradient can be returned in it."""
    return (*(x.astype(dtype) for x in inputs), *(jnp.zeros((0,), x.dtype) for x in inputs))


def _mixed_einsum_fwd(equation, x, y, dtype):
    residuals = compact_residuals(dtype, x, y)
    return jnp.einsum(equation, *residuals[:2], preferred_element_type=jnp.float32), residuals


def _mixed_einsum_bwd(equation, dtype, residuals, grad):
    x_low, y_low, x_like, y_like = residuals
    inputs, out = equation.split("->")
    x_spec, y_spec = inputs.split(",")
    grad = grad.astype(dtype)
    grad_x = jnp.einsum(f"{out},{y_spec}->{x_spec}", grad, y_low, preferred_element_type=jnp.float32)
    grad_y = jnp.einsum(f"{x_spec},{out}->{y_spec}", x_low, grad, preferred_element_type=jnp.float32)
    return grad_x.astype(x_like.dtype), grad_y.astype(y_like.dtype)


mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gated_silu(gate: Array, up: Array, dtype: jnp.dtype) -> Array:
    """silu(gate) ⊙ up computed in float32 and returned in `dtype`.

    Differentiated, it keeps gate and up in `dtype` rather than the float32 pair autodiff would keep (half the bytes
    of the largest activations of a step without remat) and recomputes the sigmoid in its backward pass.
    """
    return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(dtype)


def _gated_silu_fwd(gate, up, dtype):
    return gated_silu(gate, up, dtype), compact_residuals(dtype, gate, up)


def _gated_silu_bwd(dtype, residuals, grad):
    gate_low, up_low, gate_like, up_like = residuals
    gate, up, grad = gate_low.astype(jnp.float32), up_low.astype(jnp.float32), grad.astype(jnp.float32)
    sigmoid = jax.nn.sigmoid(gate)
    grad_gate = grad * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))  # d silu(g)/dg = σ(g)(1 + g(1 − σ(g)))
    return grad_gate.astype(gate_like.dtype), (grad * gate * sigmoid).astype(up_like.dtype)


gated_silu.defvjp(_gated_silu_fwd, _gated_silu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def output_head_loss(hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array, layout: str,
                     dtype: jnp.dtype, chunk: int) -> tuple[jax.Array, jax.Array]:
    """(Σ weight · cross-entropy, Σ weight) of logits = hidden · head, chunk by chunk over the sequence.

    hidden [batch, seq, dim] (compute dtype), head [dim, vocab] ("dv") or [vocab, dim] ("vd", tied embeddings),
    float32 weights [batch, seq]. Differentiated, the forward pass also computes the gradient with respect to the
    logits, (softmax − one-hot)·weight, while each chunk's logits are at hand, and turns it at once into the
    gradients of hidden and head: the backward pass only scales them by the loss's cotangent. This avoids
    recomputing every chunk's logits and softmax in the backward pass (a third of the head's cost). As in
    `mixed_einsum`, the products run in the compute dtype with float32 accumulation.
    """
    (loss, weight), _ = _head_loss_scan(hidden, head, targets, weights, layout, dtype, chunk, with_grads=False)
    return loss, weight


def _head_loss_fwd(hidden, head, targets, weights, layout, dtype, chunk):
    (loss, weight), (grad_hidden, grad_head) = _head_loss_scan(hidden, head, targets, weights, layout, dtype, chunk,
                                                               with_grads=True)
    return (loss, weight), (grad_hidden, grad_head, targets, weights)


def _head_loss_bwd(layout, dtype, chunk, residuals, cotangents):
    grad_hidden, grad_head, targets, weights = residuals
    loss_cotangent = cotangents[0]  # Σ weight does not depend on the inputs
    return ((grad_hidden * loss_cotangent.astype(grad_hidden.dtype)), grad_head * loss_cotangent,
            np.zeros(targets.shape, jax.dtypes.float0), jnp.zeros_like(weights))


output_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)


def _head_loss_scan(hidden, head, targets, weights, layout, dtype, chunk, *, with_grads):
    batch, length, dim = hidden.shape
    head_low = head.astype(dtype)
    logits_eq = "bsd,dv->bsv" if layout == "dv" else "bsd,vd->bsv"
    head_grad_eq = "bsd,bsv->dv" if layout == "dv" else "bsd,bsv->vd"
    hidden_grad_eq = "bsv,dv->bsd" if layout == "dv" else "bsv,vd->bsd"

    def by_chunk(x: jax.Array) -> jax.Array:  # [batch, seq, ...] -> [chunks, batch, chunk, ...]
        return x.reshape(x.shape[0], length // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)

    def add_chunk(carry, pieces):
        hidden_chunk, target_chunk, weight_chunk = pieces
        hidden_low = hidden_chunk.astype(dtype)
        logits = jnp.einsum(logits_eq, hidden_low, head_low, preferred_element_type=jnp.float32)
        log_normaliser = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, target_chunk[..., None], axis=-1)[..., 0]
        loss = carry[0] + jnp.sum((log_normaliser - target_logit) * weight_chunk)
        weight = carry[1] + jnp.sum(weight_chunk)
        if not with_grads:
            return (loss, weight), None
        probs = jnp.exp(logits - log_normaliser[..., None])
        one_hot = jax.nn.one_hot(target_chunk, logits.shape[-1], dtype=jnp.float32)
        grad_logits = ((probs - one_hot) * weight_chunk[..., None]).astype(dtype)
        grad_head = carry[2] + jnp.einsum(head_grad_eq, hidden_low, grad_logits, preferred_element_type=jnp.float32)
        grad_hidden = jnp.einsum(hidden_grad_eq, grad_logits, head_low, preferred_element_type=jnp.float32)
        return (loss, weight, grad_head), grad_hidden.astype(hidden.dtype)

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero) + ((jnp.zeros(head.shape, jnp.float32),) if with_grads else ())
    carry, grad_hidden = jax.lax.scan(add_chunk, init, (by_chunk(hidden), by_chunk(targets), by_chunk(weights)))
    if not with_grads:
        return carry, None
    grad_hidden = grad_hidden.swapaxes(0, 1).reshape(batch, length, dim)
    return carry[:2], (grad_hidden, carry[2].astype(head.dtype))
