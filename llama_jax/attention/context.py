"""Attention with the sequence split over the mesh (context parallelism): keys and values gathered along it.

Under rules that split q's `length` axis (`sharding_rules: sequence`, `llama_jax.sharding.SEQUENCE_RULES`) each device
holds a contiguous block of s/n queries and the keys and values of the same positions. `attend_over_sequence_shards`
runs attention under `jax.shard_map` over the whole mesh: every device all-gathers k, v and the keys' slots and segment
ids along the sequence's mesh axes — MaxText's default `context_parallel_strategy: all_gather` — and attends its own
queries to all of them. Grouped-query attention keeps the gathered tensors small (kv_heads / heads of q's size). The
gather's transpose is a reduce-scatter, so key and value gradients come back split along the sequence.

Left to XLA's partitioner instead, the chunked attention's static slices of a sequence-split array become a
collective-permute per query block and the fused kernels cannot run at all (`shards.shard_specs` refuses a split
sequence); here one gather per layer feeds a per-device kernel:
- `flash_cpu`: the CPU kernel masks by slots, so queries at any slots run as they are (and skip fully masked blocks);
- `chunked`: XLA's query blocks with the shard's offset (`xla.attend_in_chunks(..., offset)`), which must be static:
  `lax.switch` on the device's position along the sequence picks one of n traced branches, so each device reads only
  the keys its queries can see and the FLOPs equal one device's;
- `dense`: the whole [s/n, s] score block.
cuDNN's and the Pallas kernels' (GPU, splash on TPU) causal masks assume queries at slots 0..s-1, so a split sequence
never runs them: named explicitly they are an error, and `auto` on a GPU or TPU runs `chunked` or `dense` (with a
warning). The compiled step: benchmarks/2026-12-06-xeon-code-llama-16k.md.

Not done here: load balancing (the last shard's queries see n times the keys of the first, so with causal attention
it works longest; MaxText reorders the sequence so that each shard holds a block from each end) and ring attention
(passing key/value blocks around the ring to overlap communication with compute and never hold all keys).
"""
from __future__ import annotations

import functools

import jax
from flax.linen import spmd as flax_spmd
from jax.sharding import PartitionSpec

from llama_jax.attention.cpu import attend_flash_cpu, flash_attention_supports
from llama_jax.attention.mask import AttentionMask
from llama_jax.attention.shards import target_platform, warn_once
from llama_jax.attention.xla import attend, attend_in_chunks
from llama_jax.config import ModelConfig
from llama_jax.errors import KernelError
from llama_jax.sharding import logical_to_spec

ALIGNED_KERNELS = ("cudnn", "pallas", "splash")  # causal masks for queries at slots 0..s-1 only


def sequence_specs(q: jax.Array, k: jax.Array) -> tuple[PartitionSpec, PartitionSpec] | None:
    """PartitionSpecs of q [b, s, heads, d] and k/v [b, s, kv_heads, d] when the mesh and rules in context split the
    sequence, else None. Heads stay split only where query and kv heads split alike (the grouping of query heads onto
    kv heads must hold within a shard); head_dim is never split."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = flax_spmd.get_logical_axis_rules()
    if mesh.empty or mesh.size == 1 or mesh.are_all_axes_manual or not rules or q.shape[1] != k.shape[1]:
        return None
    q_spec = logical_to_spec(("batch", "length", "heads", "head_dim"), tuple(rules), q.shape, mesh)
    if not q_spec[1]:
        return None
    k_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), tuple(rules), k.shape, mesh)
    heads = q_spec[2] if q_spec[2] == k_spec[2] else None
    return PartitionSpec(q_spec[0], q_spec[1], heads, None), PartitionSpec(k_spec[0], k_spec[1], heads, None)


def attend_over_sequence_shards(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, config: ModelConfig,
                                specs: tuple[PartitionSpec, PartitionSpec]) -> jax.Array:
    """Causal grouped-query self-attention with the sequence split as `specs` (from `sequence_specs`) say."""
    if config.attention_impl in ALIGNED_KERNELS:
        raise KernelError(f"model.attention_impl={config.attention_impl} cannot run here: the mesh splits the sequence "
                          "(sharding rules map `length` to a mesh axis) and the kernel's causal mask assumes queries "
                          "at slots 0..s-1; use auto, flash_cpu (CPU), chunked or dense")
    q_spec, k_spec = specs
    length_axes = q_spec[1]
    tokens = PartitionSpec(q_spec[0], length_axes)
    segments = mask.segments() if mask.has_segments else ()
    args = (q, k, v, mask.query_slots, mask.key_slots, *segments)
    in_specs = (q_spec, k_spec, k_spec, tokens, tokens) + (tokens,) * len(segments)

    def on_shard(q, k, v, query_slots, key_slots, *segments):
        gather = functools.partial(jax.lax.all_gather, axis_name=length_axes, axis=1, tiled=True)
        query_segments, key_segments = segments if segments else (None, None)
        shard_mask = AttentionMask(query_slots, query_segments, gather(key_slots),
                                   None if key_segments is None else gather(key_segments))
        return _attend_shard(q, gather(k), gather(v), shard_mask, config, length_axes)

    return jax.shard_map(on_shard, in_specs=in_specs, out_specs=q_spec, check_vma=False)(*args)


def _attend_shard(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, config: ModelConfig,
                  length_axes: tuple[str, ...]) -> jax.Array:
    """One device's queries [b, s/n, h, d] against the gathered keys and values [b, s, kv, d]."""
    impl, platform = config.attention_impl, target_platform()
    if impl in ("auto", "flash_cpu"):
        # Inside shard_map the kernel sees one shard, as on one device: only dtype, head_dim and the build can stop it.
        reason = flash_attention_supports(q, k)
        if impl == "flash_cpu" and reason is not None:
            raise KernelError(f"model.attention_impl=flash_cpu cannot run here: {reason}")
        if impl == "auto":
            impl = "flash_cpu" if reason is None else "chunked" if q.shape[1] > config.attention_chunk else "dense"
            if platform != "cpu" or reason is not None:
                why = reason if platform == "cpu" else ("the fused kernels' causal masks assume queries at slots "
                                                        "0..s-1")
                warn_once(("sequence", impl, platform, q.shape), f"model.attention_impl=auto runs {impl} on each "
                                                                  f"shard of the split sequence on {platform} ({why})")
    if impl == "flash_cpu":
        return attend_flash_cpu(q, k, v, mask)
    if impl == "dense":
        return attend(q, k, v, mask.dense())
    local = q.shape[1]
    branches = [functools.partial(_chunked_from, chunk=config.attention_chunk, offset=shard * local)
                for shard in range(k.shape[1] // local)]
    return jax.lax.switch(jax.lax.axis_index(length_axes), branches, q, k, v, mask)


def _chunked_from(q, k, v, mask, *, chunk: int, offset: int):
    return attend_in_chunks(q, k, v, mask, chunk, offset)
