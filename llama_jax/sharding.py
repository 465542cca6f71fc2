"""Sharding as data: logical axis names → mesh axes through one rules table.

Parameters carry logical names (`logical_axes` metadata, e.g. ('embed', 'mlp')); activations are constrained with
logical names at block boundaries. `DEFAULT_RULES` maps each name onto the (data, fsdp, tensor) mesh:

    batch → (data, fsdp)     embed → fsdp      heads, kv_heads, mlp, vocab → tensor     length, head_dim, layers → -

`SEQUENCE_RULES` (`sharding_rules: sequence` in a config) splits each sequence instead of the batch over fsdp, for
contexts whose activations one device cannot hold (MaxText's context parallelism, its `context` axis doubling as an
FSDP axis for the weights):

    batch → data     length → fsdp     embed → fsdp      heads, kv_heads, mlp, vocab → tensor     head_dim, layers → -

The blocks outside attention are per token, so XLA's partitioner splits them along the sequence with no communication
beyond FSDP's; attention gathers keys and values along the sequence (`llama_jax.attention.context`). The loss's scan
over sequence chunks (`ops.output_head_loss`) cannot stay split: XLA gathers the final hidden states and every device
of a data shard computes the output head for the whole micro-batch.

Two resolution rules keep any table valid on any mesh and any model size:
- a mesh axis serves at most one dimension of an array (the first that asks for it), so an activation
  [batch, length, embed] is split over (data, fsdp) on batch only, while a weight [embed, mlp] is split fsdp × tensor;
- a mesh axis that does not divide a dimension is left out for that array (it is replicated instead), so a tiny test
  model or a batch smaller than the mesh still compiles.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llama_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers")

Rules = tuple[tuple[str, tuple[str, ...]], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("length", ()),
    ("head_dim", ()),
    ("layers", ()),
)

# The default table with the fsdp axis moved from the batch to the sequence: a micro-batch of one sequence per data
# shard is split along its length over fsdp (sequence or context parallelism); weights stay split as by default.
SEQUENCE_RULES: Rules = (("batch", ("data",)), ("length", ("fsdp",))) + tuple(
    rule for rule in DEFAULT_RULES if rule[0] not in ("batch", "length"))

NAMED_RULES: dict[str, Rules] = {"default": DEFAULT_RULES, "sequence": SEQUENCE_RULES}


def rules_from_config(table: Mapping[str, Sequence[str] | str | None] | str | None) -> Rules:
    """The rules table from config (`sharding_rules:`), checked: a table, or the name of one of NAMED_RULES; None
    gives DEFAULT_RULES."""
    if table is None:
        return DEFAULT_RULES
    if isinstance(table, str):
        if table not in NAMED_RULES:
            raise ConfigError(f"sharding_rules={table!r} is not a known table: expected one of {sorted(NAMED_RULES)} "
                              "or a mapping of logical axis names to mesh axes")
        return NAMED_RULES[table]
    if not isinstance(table, Mapping):
        raise ConfigError(f"sharding_rules={table!r} is not allowed: expected one of {sorted(NAMED_RULES)} or a "
                          "mapping of logical axis names to mesh axes")
    rules = []
    for logical, mesh_axes in table.items():
        if logical not in LOGICAL_AXES:
            raise ConfigError(f"sharding_rules.{logical}: unknown logical axis; expected one of {LOGICAL_AXES}")
        axes = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        for axis in axes:
            if axis not in MESH_AXES:
                raise ConfigError(f"sharding_rules.{logical}={list(axes)}: unknown mesh axis {axis!r}; "
                                  f"expected some of {MESH_AXES}")
        rules.append((logical, axes))
    missing = set(LOGICAL_AXES) - {name for name, _ in rules}
    return tuple(rules) + tuple((name, ()) for name in LOGICAL_AXES if name in missing)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}={size} is not allowed: expected a positive integer or -1 (the rest)")
    auto = [name for name, size in sizes.items() if size == -1]
    if len(auto) > 1:
        raise ConfigError(f"mesh: only one of {auto} may be -1")
    known = math.prod(size for size in sizes.values() if size != -1)
    if auto:
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices cannot be split with {sizes} (the fixed sizes' "
                              f"product {known} must divide the device count)")
        sizes[auto[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ConfigError(f"mesh: data×fsdp×tensor = {sizes['data']}×{sizes['fsdp']}×{sizes['tensor']} = "
                          f"{math.prod(sizes.values())} but {len(devices)} devices are present")
    shape = tuple(sizes[name] for name in MESH_AXES)
    grid = np.asarray(devices, dtype=object).reshape(shape)
    # Auto axes: XLA chooses how to shard intermediate values; explicit axes reject ambiguous contractions.
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, devices)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """The PartitionSpec for an array whose dimensions have these logical names (see the module's two rules)."""
    table = dict(rules)
    used: set[str] = set()
    spec: list[tuple[str, ...] | None] = []
    for dim, logical in enumerate(logical_axes):
        kept: list[str] = []
        for axis in table.get(logical, ()) if logical is not None else ():
            if axis in used:
                continue
            if shape is not None and mesh is not None:
                size = mesh.shape[axis] * math.prod(mesh.shape[a] for a in kept)
                if shape[dim] % size:
                    continue
            kept.append(axis)
        used.update(kept)
        spec.append(tuple(kept) if kept else None)
    return PartitionSpec(*spec)


def param_shardings(specs: Mapping[str, Any], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict[str, NamedSharding]:
    """NamedShardings for flat parameters, from objects with `.shape` and `.logical_axes` (`params.param_specs`)."""
    return {name: NamedSharding(mesh, logical_to_spec(spec.logical_axes, rules, spec.shape, mesh))
            for name, spec in specs.items()}


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES, shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding of [batch, length] token arrays."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules, shape, mesh))


def put_global(value: jax.Array | np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """`value` — the whole array, held by this process (a model every process loaded) — as a global array split by
    `sharding`. `jax.device_put` can place onto this process's devices only; in a multi-process run each process
    contributes the shards its devices hold, cut from its own copy."""
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_rows(local: Mapping[str, np.ndarray], global_rows: int, mesh: Mesh,
               rules: Rules = DEFAULT_RULES) -> dict[str, jax.Array]:
    """This process's rows of [global_rows, seq] token arrays as global int32 jax.Arrays split along the batch axis.

    Every process passes only the rows it read or built itself (`data.process_rows` says which); no process ever
    holds the whole batch.
    """
    shape = (global_rows, next(iter(local.values())).shape[1])
    sharding = batch_sharding(mesh, rules, shape)
    _require_whole_rows(sharding, shape)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value, np.int32), shape)
            for key, value in local.items()}


def _require_whole_rows(sharding: NamedSharding, shape: tuple[int, int]) -> None:
    """Each process reads whole rows, so its devices must hold whole rows between them: rules that split sequences
    (SEQUENCE_RULES) need the mesh axes they split them over inside each process."""
    covered = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        covered.update(range(*index[1].indices(shape[1])))
    if len(covered) != shape[1]:
        raise ConfigError(f"the sharding rules split each sequence of {shape[1]} tokens across processes (this one's "
                          f"devices hold {len(covered)} of its positions), but every process reads whole rows: keep "
                          "the mesh axes that split sequences (fsdp under sharding_rules=sequence) within one host and "
                          "let data span the hosts")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """While tracing under this context, `constrain` pins activations to the mesh by the rules."""
    with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(rules):
        yield


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical names; a no-op outside `activation_sharding`."""
    rules = flax_spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, tuple(rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def bytes_per_device(arrays: Any) -> dict[jax.Device, int]:
    """Bytes each device holds for a tree of (sharded) arrays, read from their shards."""
    totals: dict[jax.Device, int] = {}
    for array in jax.tree.leaves(arrays):
        for shard in array.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals
