"""Where attention runs: the platform a traced program is for, and running a kernel shard by shard on the mesh.

The platform is that of the mesh's devices, read while tracing from the abstract mesh that `jax.set_mesh` puts in
context (`sharding.activation_sharding`): its `abstract_device` names the platform, also for compile-only devices
such as a TPU topology described on a CPU host. It is never `jax.default_backend()`, the process's own devices, except
outside any mesh. `compiling_for` overrides it while tracing a program that will be lowered for another platform than
its mesh's devices (the GPU lowering tests trace on simulated CPU devices).

Fused kernels see one device's shard: `over_shards` wraps them in `jax.shard_map` over the batch and head axes as the
logical rules split q and k/v. A kernel cannot run shard by shard when the mesh splits the sequence or head_dim, or
splits query heads unlike key/value heads (the grouping of query heads onto kv heads would break); `shard_specs` then
says None and the caller falls back or refuses. Mosaic (TPU) kernels cannot be partitioned automatically at all, so on
a multi-device mesh every kernel runs under `shard_map`, with replicated operands where no rules are in context.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterator, Sequence

import jax
from flax.linen import spmd as flax_spmd
from jax.sharding import PartitionSpec

from llama_jax.sharding import logical_to_spec

PLATFORMS = ("cpu", "gpu", "tpu")
_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}
_compiling_for: contextvars.ContextVar[str | None] = contextvars.ContextVar("llama_jax_attention_platform",
                                                                             default=None)


def _normalise(platform: str) -> str:
    return _PLATFORM_ALIASES.get(platform.lower(), platform.lower())


def mesh_platform() -> str:
    """cpu, gpu or tpu: the platform of the devices of the mesh in context, else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return _normalise(device.platform if device is not None else jax.default_backend())


def target_platform() -> str:
    """The platform the program being traced is for: `compiling_for`'s, else `mesh_platform()`."""
    override = _compiling_for.get()
    return override if override is not None else mesh_platform()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Trace attention for `platform` (cpu, gpu/cuda/rocm, tpu) whatever the mesh's devices are: for lowering a
    program for another platform (`.lower(lowering_platforms=...)`) on this host's devices."""
    normalised = _normalise(platform)
    if normalised not in PLATFORMS:
        raise ValueError(f"compiling_for({platform!r}): expected one of {PLATFORMS} (or cuda, rocm)")
    token = _compiling_for.set(normalised)
    try:
        yield
    finally:
        _compiling_for.reset(token)


Specs = tuple[PartitionSpec, PartitionSpec]


def shard_specs(q: jax.Array, k: jax.Array) -> Specs | None | tuple[()]:
    """PartitionSpecs of q [b, s, heads, d] and k/v [b, t, kv_heads, d] under the mesh and rules in context: () when
    there is nothing to split (no mesh, one device, or inside a `shard_map` over the whole mesh), None when a kernel
    cannot run shard by shard (see the module docstring); without rules on a multi-device mesh, replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.are_all_axes_manual:  # inside shard_map: already one device's shard
        return ()
    rules = flax_spmd.get_logical_axis_rules()
    if not rules:
        return PartitionSpec(), PartitionSpec()
    q_spec = logical_to_spec(("batch", "length", "heads", "head_dim"), tuple(rules), q.shape, mesh)
    k_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), tuple(rules), k.shape, mesh)
    if q_spec[1] or k_spec[1] or q_spec[3] or k_spec[3] or q_spec[0] != k_spec[0] or q_spec[2] != k_spec[2]:
        return None
    return q_spec, k_spec


def unshardable_reason(q: jax.Array, k: jax.Array) -> str | None:
    if shard_specs(q, k) is None:
        return "the mesh splits the sequence, or splits query and key/value heads differently"
    return None


def over_shards(kernel: Callable, q: jax.Array, k: jax.Array, args: Sequence, in_kinds: Sequence[str],
                out_kinds: Sequence[str]):
    """`kernel(*args)` on each device's shard (directly where there is nothing to split). Arguments and results are
    named by kind: "q" [b, s, heads, d], "kv" [b, t, kv_heads, d], "tokens" [b, s], "heads" [b, heads, s]; an
    argument that is None stays None. A single result kind gives a single result, a tuple of kinds a tuple.

    Differentiable: jax transposes the shard_map, so a kernel with its own VJP runs forward and backward per shard.
    """
    specs = shard_specs(q, k)
    if specs == ():
        return kernel(*args)
    if specs is None:
        raise ValueError("over_shards: " + unshardable_reason(q, k))
    q_spec, k_spec = specs
    batch_axes = q_spec[0] if len(q_spec) else None
    head_axes = q_spec[2] if len(q_spec) > 2 else None
    by_kind = {"q": q_spec, "kv": k_spec, "tokens": PartitionSpec(batch_axes, None),
               "heads": PartitionSpec(batch_axes, head_axes, None)}
    present = [i for i, arg in enumerate(args) if arg is not None]

    def on_shard(*shards):
        full = [None] * len(args)
        for i, shard in zip(present, shards):
            full[i] = shard
        return kernel(*full)

    in_specs = tuple(by_kind[in_kinds[i]] for i in present)
    out_specs = by_kind[out_kinds] if isinstance(out_kinds, str) else tuple(by_kind[kind] for kind in out_kinds)
    return jax.shard_map(on_shard, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*(args[i] for i in present))


_warned: set[tuple] = set()


def warn_once(key: tuple, message: str) -> None:
    """A warning shown once per process for `key` (e.g. which attention a shape fell back to)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)
