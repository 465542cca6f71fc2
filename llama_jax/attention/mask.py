"""Which keys each query may see, for every attention implementation.

Masks come from slots, not positions: a query attends to keys at the same or an earlier slot with the same segment
id. Segment ids keep packed documents apart (0 marks padding and empty cache slots).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class AttentionMask(NamedTuple):
    """What each query may see: keys at a slot ≤ its own slot, with the same segment id."""

    query_slots: Array  # [batch, q_len] int32
    query_segments: Array  # [batch, q_len] int32
    key_slots: Array  # [batch, kv_len] int32
    key_segments: Array  # [batch, kv_len] int32

    def dense(self, q_range: slice = slice(None), kv_range: slice = slice(None)) -> Array:
        q_slots, q_segments = self.query_slots[:, q_range], self.query_segments[:, q_range]
        k_slots, k_segments = self.key_slots[:, kv_range], self.key_segments[:, kv_range]
        causal = k_slots[:, None, :] <= q_slots[:, :, None]
        same_segment = k_segments[:, None, :] == q_segments[:, :, None]
        return causal & same_segment  # [batch, q_len, kv_len]

    @classmethod
    def into_cache(cls, slots: Array, segment_ids: Array, cache_segments: Array, start: Array) -> AttentionMask:
        """New tokens at `slots` (their segment ids written into the cache from slot `start`) against every slot of
        a cache whose slots hold `cache_segments` [batch, max_len] (0 = empty)."""
        key_segments = jax.lax.dynamic_update_slice(cache_segments, segment_ids, (0, start))
        key_slots = jnp.broadcast_to(jnp.arange(key_segments.shape[1], dtype=jnp.int32), key_segments.shape)
        return cls(slots, segment_ids, key_slots, key_segments)
