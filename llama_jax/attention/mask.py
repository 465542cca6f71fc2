"""Which keys each query may see, for every attention implementation.

Masks come from slots, not positions: a query attends to keys at the same or an earlier slot with the same segment
id. Segment ids keep packed documents apart (0 marks padding and empty cache slots). A mask without segment ids
(both None) is causal only: each row is one document. That it has none is known while tracing, so a kernel that
cannot mask documents (cuDNN's) is chosen only then (`llama_jax.attention.implementation`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class AttentionMask(NamedTuple):
    """What each query may see: keys at a slot ≤ its own slot, with the same segment id (if there are any)."""

    query_slots: Array  # [batch, q_len] int32
    query_segments: Array | None  # [batch, q_len] int32; None (with key_segments): one document per row
    key_slots: Array  # [batch, kv_len] int32
    key_segments: Array | None  # [batch, kv_len] int32

    @property
    def has_segments(self) -> bool:
        """Whether segment ids may separate documents within a row (static: known while tracing)."""
        return self.query_segments is not None or self.key_segments is not None

    def dense(self, q_range: slice = slice(None), kv_range: slice = slice(None)) -> Array:
        q_slots, k_slots = self.query_slots[:, q_range], self.key_slots[:, kv_range]
        causal = k_slots[:, None, :] <= q_slots[:, :, None]
        if not self.has_segments:
            return causal  # [batch, q_len, kv_len]
        q_segments, k_segments = self.segments()
        same_segment = k_segments[:, kv_range][:, None, :] == q_segments[:, q_range][:, :, None]
        return causal & same_segment

    def segments(self) -> tuple[Array, Array]:
        """Query and key segment ids, all ones (one document) where the mask has none."""
        ones = jnp.ones_like
        return (ones(self.query_slots) if self.query_segments is None else self.query_segments,
                ones(self.key_slots) if self.key_segments is None else self.key_segments)

    @classmethod
    def into_cache(cls, slots: Array, segment_ids: Array, cache_segments: Array, start: Array) -> AttentionMask:
        """New tokens at `slots` (their segment ids written into the cache from slot `start`: a scalar for every row,
        or [batch], one per row) against every slot of a cache whose slots hold `cache_segments` [batch, max_len]
        (0 = empty)."""
        key_segments = write_into_cache(cache_segments, segment_ids, start)
        key_slots = jnp.broadcast_to(jnp.arange(key_segments.shape[1], dtype=jnp.int32), key_segments.shape)
        return cls(slots, segment_ids, key_slots, key_segments)


def write_into_cache(buffer: Array, update: Array, start: Array) -> Array:
    """`update` [batch, n, ...] written into `buffer` [batch, max_len, ...] from slot `start` along axis 1.

    `start` is a scalar (every row writes the same slots: batched generation) or [batch] (each row its own: the
    server's cache slots, whose requests are at different lengths); a per-row write is a vmapped update, which XLA
    turns into one scatter.
    """
    trailing = (0,) * (buffer.ndim - 2)
    if jnp.ndim(start) == 0:
        return jax.lax.dynamic_update_slice(buffer, update, (0, start, *trailing))
    return jax.vmap(lambda row, new, at: jax.lax.dynamic_update_slice(row, new, (at, *trailing)))(buffer, update, start)
