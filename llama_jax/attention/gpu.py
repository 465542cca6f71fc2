"""Fused attention on GPUs, forward and backward, shard by shard over the mesh (`shards.over_shards`).

- `cudnn`: cuDNN's flash attention, the call `jax.nn.dot_product_attention(q, k, v, is_causal=True,
  implementation="cudnn")`: causal, bfloat16 or float16, grouped-query attention without repeating keys and values
  (the call takes kv_heads < heads). Its API has no segment ids, only causal and padding-length masks, so it would let
  packed documents attend to one another (the bug of maxtext#4476): it runs only on a mask without segment ids
  (`AttentionMask.has_segments`), and `llama_jax.attention.implementation` refuses it for any other.
- `pallas`: the Pallas (Triton) flash-attention kernel `jax.experimental.pallas.ops.gpu.attention.mha`, causal with
  segment ids, for packed documents. It needs as many key/value heads as query heads, so each kv head is repeated
  over its group of query heads inside the shard (the repeat's gradient sums the group's back).

Both differentiate with the kernels' own backward kernels, on the residuals their own custom VJPs keep, but through a
custom VJP of ours that names the forward output and log-normaliser (cuDNN's softmax statistics) for the
`save_attention_out` remat policy; that takes the kernels' forward and backward rules from jax's modules (private
names, pinned by jax==0.10.2 and by tests/test_attention_backends.py).

Both assume self-attention over slots 0..s-1 with equal query and key lengths, which is what `Llama.hidden_states`
builds; decoding with a KV cache uses `attend`. `interpret=True` (set by `attention` where the program is for CPU,
i.e. in the numerics tests) runs the Pallas kernel in Pallas's interpret mode and the cudnn path's
`jax.nn.dot_product_attention` call with `implementation="xla"`: the layout and mask plumbing is checked on CPU, the
kernels themselves only on a GPU.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

from llama_jax.attention.mask import AttentionMask
from llama_jax.attention.shards import over_shards, unshardable_reason
from llama_jax.attention.xla import saveable

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128  # jax's limit before Hopper (256 from Hopper on; Llama's head_dim is 128)
PALLAS_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
PALLAS_BLOCKS = pallas_gpu.BlockSizes.get_default()
PALLAS_BLOCK = PALLAS_BLOCKS.block_q  # sequence lengths must fill whole forward blocks (128)


def _common_reason(q: jax.Array, k: jax.Array) -> str | None:
    if q.shape[1] != k.shape[1]:
        return f"query length {q.shape[1]} differs from key length {k.shape[1]} (self-attention only)"
    if q.dtype != k.dtype:
        return f"q is {q.dtype} but k/v are {k.dtype}"
    return None


def cudnn_supports(q: jax.Array, k: jax.Array, mask: AttentionMask, *, interpret: bool = False) -> str | None:
    """None if `attend_cudnn` can run these inputs on the mesh in context, else why not."""
    if mask.has_segments:
        return ("the batch has segment ids (packed documents, e.g. train.document_masking=true) and cuDNN's attention "
                "cannot mask them: it would attend across documents; use pallas (or auto)")
    if q.dtype not in CUDNN_DTYPES:
        return f"dtype {q.dtype} (cuDNN flash attention takes bfloat16 or float16)"
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return f"head_dim {head_dim} (cuDNN flash attention takes a multiple of 8 up to {CUDNN_MAX_HEAD_DIM})"
    if not interpret:
        try:
            cudnn_attention.check_cudnn_version()
        except RuntimeError as error:  # no CUDA libraries in this process, e.g. lowering for cuda on a CPU host
            return f"cuDNN is not available here ({error})"
    return _common_reason(q, k) or unshardable_reason(q, k)


def pallas_supports(q: jax.Array, k: jax.Array) -> str | None:
    """None if `attend_pallas` can run these inputs on the mesh in context, else why not."""
    if q.dtype not in PALLAS_DTYPES:
        return f"dtype {q.dtype} (the Pallas GPU kernel takes bfloat16, float16 or float32)"
    head_dim, length = q.shape[-1], q.shape[1]
    if head_dim % 16 or head_dim > 256:
        return f"head_dim {head_dim} (the Pallas GPU kernel takes a multiple of 16 up to 256)"
    if length % PALLAS_BLOCK:
        return f"sequence length {length} is not a multiple of {PALLAS_BLOCK} (the Pallas GPU kernel's block)"
    return _common_reason(q, k) or unshardable_reason(q, k)


def attend_cudnn(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False) -> jax.Array:
    """Causal grouped-query attention through cuDNN: q [b, s, heads, d], k/v [b, s, kv_heads, d] → [b, s, heads, d].
    Differentiable (cuDNN's own backward kernel)."""
    if interpret:
        def on_shard(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    else:
        on_shard = _cudnn_causal
    return over_shards(on_shard, q, k, (q, k, v), ("q", "kv", "kv"), "q")


# cuDNN's own VJP, split so that its residuals carry the names the `save_attention_out` policy saves. Undifferentiated,
# it is exactly the public call; differentiated, the forward and backward rules of that call's custom VJP get the
# arguments the public call gives them (the lowering tests compare the forward kernels' configurations).
@jax.custom_vjp
def _cudnn_causal(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def _cudnn_static_args(q):
    """scale, seed, dropout rate, (bias, bias gradient), mask type, layout, sliding window, cuDNN version, whether
    to return the statistics: what `jax.nn.dot_product_attention(q, k, v, is_causal=True)` passes."""
    return (1.0 / math.sqrt(q.shape[-1]), 42, 0.0, (False, False), cudnn_attention.MaskType.CAUSAL,
            cudnn_attention.AttentionLayout.BTNH.value, None, cudnn_attention.check_cudnn_version(), False)


def _cudnn_fwd(q, k, v):
    unused = jnp.zeros(0, q.dtype)  # bias, sequence lengths, offsets, page tables
    out, residuals = cudnn_attention._dot_product_attention_fwd_rule(q, k, v, *(unused,) * 7,
                                                                     *_cudnn_static_args(q))
    *inputs, statistics, _ = residuals
    out, statistics = saveable(out, statistics)
    return out, (*inputs, statistics, out)


def _cudnn_bwd(residuals, grad_out):
    grads = cudnn_attention._dot_product_attention_bwd_rule(*_cudnn_static_args(residuals[0]), residuals, grad_out)
    return tuple(grads[:3])


_cudnn_causal.defvjp(_cudnn_fwd, _cudnn_bwd)


def attend_pallas(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                  interpret: bool = False) -> jax.Array:
    """Causal grouped-query attention within segments through the Pallas GPU kernel; shapes as `attend_cudnn`.
    Differentiable (the kernel's own backward kernel)."""

    def on_shard(q, k, v, segment_ids):
        group = q.shape[2] // k.shape[2]
        k, v = (jnp.repeat(x, group, axis=2) if group > 1 else x for x in (k, v))
        return _pallas_mha(q, k, v, segment_ids, interpret)

    segment_ids = mask.query_segments.astype(jnp.int32) if mask.has_segments else None
    return over_shards(on_shard, q, k, (q, k, v, segment_ids), ("q", "kv", "kv", "tokens"), "q")


# The kernel's own VJP, split so that its residuals carry the names the `save_attention_out` policy saves: the forward
# is `mha(..., return_residuals=True)` and the backward the kernel's backward function, on exactly the residuals
# `mha`'s own custom VJP keeps (q, k, v, segment ids, output, log-normaliser).
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _pallas_mha(q, k, v, segment_ids, interpret):
    return _pallas_forward(q, k, v, segment_ids, interpret)[0]


def _pallas_forward(q, k, v, segment_ids, interpret):
    return pallas_gpu.mha(q, k, v, segment_ids, sm_scale=1.0 / math.sqrt(q.shape[-1]), causal=True,
                          block_sizes=PALLAS_BLOCKS, interpret=interpret, return_residuals=True)


def _pallas_fwd(q, k, v, segment_ids, interpret):
    out, log_normaliser = saveable(*_pallas_forward(q, k, v, segment_ids, interpret))
    return out, (q, k, v, segment_ids, out, log_normaliser)


def _pallas_bwd(interpret, residuals, grad_out):
    q = residuals[0]
    grad_q, grad_k, grad_v, _ = pallas_gpu._mha_backward(
        1.0 / math.sqrt(q.shape[-1]), True, PALLAS_BLOCKS, "triton", None, 2, None, interpret, False, False,
        residuals, grad_out.astype(q.dtype))
    return grad_q, grad_k, grad_v, None


_pallas_mha.defvjp(_pallas_fwd, _pallas_bwd)
