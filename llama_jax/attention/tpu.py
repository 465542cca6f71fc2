"""Fused attention on TPUs: Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), forward and
backward, shard by shard over the mesh (`shards.over_shards`; Mosaic kernels cannot be partitioned by XLA).

Causal with segment ids (packed documents stay apart), grouped-query attention natively: the multi-head kernel maps
query head h onto key/value head h // (heads / kv_heads), so keys and values are never repeated. Splash does not scale
the scores, so q is multiplied by 1/√head_dim first. Blocks are `model.splash_block_q` and `model.splash_block_kv`
(capped at the sequence length), the same for the forward and both backward kernels; the sequence length must be a
multiple of both. The kernel names its output and log-normaliser "attention_log_normaliser", which the
`save_attention_out` remat policy saves.

Assumes self-attention over slots 0..s-1, as `Llama.hidden_states` builds. `interpret=True` (set by `attention` where
the program is for CPU, i.e. in the numerics tests) runs the kernel in Pallas's interpret mode.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from llama_jax.attention.mask import AttentionMask
from llama_jax.attention.shards import over_shards, unshardable_reason
from llama_jax.config import SPLASH_BLOCK_MULTIPLE, ModelConfig

SPLASH_DTYPES = (jnp.bfloat16, jnp.float32)


def block_sizes(length: int, config: ModelConfig) -> tuple[int, int]:
    """(query block, key/value block) for this sequence length: the configured sizes, capped at the length."""
    return min(config.splash_block_q, length), min(config.splash_block_kv, length)


def splash_supports(q: jax.Array, k: jax.Array, config: ModelConfig) -> str | None:
    """None if `attend_splash` can run these inputs on the mesh in context, else why not."""
    if q.dtype not in SPLASH_DTYPES or q.dtype != k.dtype:
        return f"dtype {q.dtype} (splash attention takes bfloat16 or float32)"
    length = q.shape[1]
    if k.shape[1] != length:
        return f"query length {length} differs from key length {k.shape[1]} (self-attention only)"
    if length % SPLASH_BLOCK_MULTIPLE:
        return f"sequence length {length} is not a multiple of {SPLASH_BLOCK_MULTIPLE}"
    block_q, block_kv = block_sizes(length, config)
    if length % block_q or length % block_kv:
        return (f"sequence length {length} is not a multiple of model.splash_block_q={block_q} and "
                f"model.splash_block_kv={block_kv}")
    return unshardable_reason(q, k)


def attend_splash(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, config: ModelConfig, *,
                  interpret: bool = False) -> jax.Array:
    """Causal grouped-query attention within segments: q [b, s, heads, d], k/v [b, s, kv_heads, d] → [b, s, heads, d].
    Differentiable (splash's own backward kernels)."""
    blocks = block_sizes(q.shape[1], config)

    def on_shard(q, k, v, segment_ids):
        scale = 1.0 / math.sqrt(q.shape[-1])
        q = (q.astype(jnp.float32) * scale).astype(q.dtype)
        heads_major = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # [b, s, h, d] ↔ [b, h, s, d]
        kernel = _kernel(q.shape[2], q.shape[1], *blocks, interpret)
        if segment_ids is None:
            out = jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v))
        else:
            out = jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v),
                                   splash.SegmentIds(q=segment_ids, kv=segment_ids))
        return heads_major(out)

    segment_ids = mask.query_segments.astype(jnp.int32) if mask.has_segments else None
    return over_shards(on_shard, q, k, (q, k, v, segment_ids), ("q", "kv", "kv", "tokens"), "q")


def _kernel(heads: int, length: int, block_q: int, block_kv: int, interpret: bool) -> splash.SplashAttentionKernel:
    """The causal splash kernel for one shard's heads. Built afresh in each trace: its block masks become constants
    of the traced program, which may not be shared between traces (nor between meshes)."""
    causal = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length)) for _ in range(heads)])
    sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                              block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                              block_q_dq=block_q, block_kv_dq=block_kv)
    return splash.make_splash_mha(causal, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  residual_checkpoint_name="attention_log_normaliser", interpret=interpret)
