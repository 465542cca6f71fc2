"""Attention, by implementation. `attention` picks one from `model.attention_impl`:

- `dense` (`xla.attend`): the whole score matrix at once; also what decoding with a KV cache uses.
- `chunked` (`xla.attend_in_chunks`): blocks of `model.attention_chunk` queries, never the [s, s] matrix.
- `flash_cpu` (`cpu.attend_flash_cpu`): the native CPU kernel, score blocks kept in cache, online softmax.
- `auto`: `flash_cpu` where the kernel can run (CPU, its dtypes and head sizes, a mesh that does not split the
  sequence), else `chunked` for sequences longer than one chunk, else `dense`.

Every implementation takes q [b, s, heads, d], k/v [b, t, kv_heads, d] (grouped-query: query head h reads kv head
h // (heads / kv_heads)) and an `AttentionMask`, and returns [b, s, heads, d] in q's dtype. Each names its output
and log-normaliser for the `save_attention_out` remat policy.
"""
from __future__ import annotations

import jax

from llama_jax.attention import cpu
from llama_jax.attention.mask import AttentionMask
from llama_jax.attention.xla import attend, attend_in_chunks
from llama_jax.config import ModelConfig
from llama_jax.errors import KernelError

__all__ = ["AttentionMask", "attend", "attend_in_chunks", "attention", "implementation"]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, config: ModelConfig) -> jax.Array:
    """Causal grouped-query self-attention by `config.attention_impl`."""
    impl = implementation(config, q, k)
    if impl == "flash_cpu":
        return cpu.attend_flash_cpu(q, k, v, mask)
    if impl == "chunked":
        return attend_in_chunks(q, k, v, mask, config.attention_chunk)
    return attend(q, k, v, mask.dense())


def implementation(config: ModelConfig, q: jax.Array, k: jax.Array) -> str:
    """The implementation `attention` runs for these inputs: flash_cpu, chunked or dense."""
    impl = config.attention_impl
    if impl in ("flash_cpu", "auto"):
        unsupported = cpu.flash_attention_supports(q, k)
        if unsupported is None:
            return "flash_cpu"
        if impl == "flash_cpu":
            raise KernelError(f"model.attention_impl=flash_cpu cannot run here: {unsupported}")
    if impl == "chunked" or (impl == "auto" and q.shape[1] > config.attention_chunk):
        return "chunked"
    return "dense"
