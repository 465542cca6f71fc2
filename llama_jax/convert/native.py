"""The llama-jax checkpoint format, and reading the parameters out of a training run directory.

A llama-jax checkpoint is a directory:

    model.json    the ModelConfig, every field of dataclasses.asdict(config)
    params/       an Orbax checkpoint of the flat dict {dotted parameter name: array} (`params.model_params`)

A run directory (written by the training program) is recognised by `config.yaml` (whose `model:` section is a full
ModelConfig mapping) beside `checkpoints/<step>/`; each step's item `params` has the same flat-dict form, so the
newest complete step reads exactly like a llama-jax checkpoint.

Orbax writes every array; `ArrayReader` reads them back (a run's train state included: `llama_jax.checkpoint`) with
TensorStore directly rather than through Orbax's restore, which costs about as much CPU again as the disk read: its
TensorStore reads go through the file API into buffers of their own and are then copied into unaligned numpy
arrays, which `jax.device_put` copies once more (XLA:CPU adopts only aligned host memory, and copies unaligned memory
slowly). The reader maps the files (TensorStore's `memmap` file mode) and lands every shard in a page-aligned buffer
that XLA:CPU adopts as it is (figures: benchmarks/2026-12-06-xeon-goodput.md).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
import yaml
from etils import epath

from llama_jax.config import ModelConfig, resolve_model
from llama_jax.convert.common import ParamSource, check_names, check_shapes, read_json_object
from llama_jax.errors import CheckpointError, ConversionError, LlamaJaxError
from llama_jax.params import param_shapes

MODEL_FILE = "model.json"
PARAMS_DIR = "params"
RUN_CONFIG = "config.yaml"
RUN_CHECKPOINTS = "checkpoints"
TRAINING_HEADS = ("value_head.weight",)  # arrays a run's checkpoint holds beside the model's (llama_jax.ppo)

# Orbax logs every save and restore at INFO; a converter's output should be its own.
logging.getLogger("absl").setLevel(logging.WARNING)


def is_native(path: Path) -> bool:
    return (path / MODEL_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def is_run_dir(path: Path) -> bool:
    return (path / RUN_CONFIG).is_file() and (path / RUN_CHECKPOINTS).is_dir()


def is_run_step(path: Path) -> bool:
    """`RUN_DIR/checkpoints/<step>` given directly."""
    return path.name.isdigit() and (path / PARAMS_DIR).is_dir() and is_run_dir(path.parent.parent)


def config_to_json(config: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2) + "\n"


def config_from_mapping(fields: Mapping[str, Any], where: Path) -> ModelConfig:
    try:
        return resolve_model(dict(fields))
    except LlamaJaxError as error:
        raise ConversionError(f"{where}: {error}") from None


def read_model_json(path: Path) -> ModelConfig:
    return config_from_mapping(read_json_object(path), path)


def run_model_config(run_dir: Path) -> ModelConfig:
    path = run_dir / RUN_CONFIG
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConversionError(f"{path} is not a readable YAML file: {error}".replace("\n", " ")) from None
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, (dict, str)):
        raise ConversionError(f"{path} has no `model:` section with the model's config")
    try:
        return resolve_model(model)
    except LlamaJaxError as error:
        raise ConversionError(f"{path}: {error}") from None


def run_steps(run_dir: Path) -> list[int]:
    """Finished step numbers, newest first. Orbax writes a step under a temporary name and renames it when it is
    complete, so only all-digit names count (a `<step>.orbax-checkpoint-tmp-…` directory is an unfinished save)."""
    checkpoints = run_dir / RUN_CHECKPOINTS
    return sorted((int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and p.is_dir()), reverse=True)


def latest_run_checkpoint(run_dir: str | Path) -> tuple[int, Path]:
    """(step, path of its `params` item) of the newest complete checkpoint of a run directory.

    Complete: Orbax's `commit_success.txt` marks the step (or its params item) as fully written, and the params'
    metadata reads. A step that fails either is skipped for the one before it.
    """
    run_dir = Path(run_dir)
    problems = []
    for step in run_steps(run_dir):
        params = run_dir / RUN_CHECKPOINTS / str(step) / PARAMS_DIR
        try:
            if not any((where / "commit_success.txt").is_file() for where in (params.parent, params)):
                raise ConversionError("no commit_success.txt (an unfinished save)")
            _array_metadata(params)
            return step, params
        except ConversionError as error:
            problems.append(f"step {step}: {error}")
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise CheckpointError(f"{run_dir / RUN_CHECKPOINTS} holds no complete checkpoint with a `{PARAMS_DIR}` item"
                          f"{detail}")


def _tree_metadata(params_dir: Path) -> Any:
    """Orbax's metadata of a checkpoint (a TreeMetadata), without reading any array.

    Asked of the item's handler, not of a Checkpointer: a Checkpointer also looks for the step-level
    `_CHECKPOINT_METADATA` file, which lives one level up in a run directory, and warns through absl on every read.
    """
    params_dir = Path(params_dir).absolute()  # under a relative path Orbax finds no metadata and returns None
    if not (params_dir / "_METADATA").is_file():
        raise ConversionError(f"{params_dir} is not a complete Orbax checkpoint (no _METADATA)")
    try:
        with contextlib.closing(ocp.PyTreeCheckpointHandler()) as handler:
            return handler.metadata(epath.Path(params_dir))
    except Exception as error:  # Orbax raises many kinds on a damaged checkpoint; all mean "cannot read it"
        raise ConversionError(f"{params_dir} is not a readable Orbax checkpoint: {type(error).__name__}: "
                              f"{error}") from None


def _array_metadata(params_dir: Path) -> dict[str, Any]:
    """{name: metadata with .shape and .dtype} of an Orbax flat-dict checkpoint, without reading any array."""
    tree = _tree_metadata(params_dir).tree
    if not isinstance(tree, dict) or any(isinstance(value, dict) for value in tree.values()):
        raise ConversionError(f"{params_dir} does not hold a flat dict of parameters by dotted name")
    return dict(tree)


# ── Reading Orbax arrays ─────────────────────────────────────────────────────────────────────────────────────────
HOST_ALIGNMENT = 4096  # a page: XLA:CPU adopts host buffers aligned to it without copying them
_READ_CONTEXT = {
    "file_io_concurrency": {"limit": 128},
    "file_io_mode": {"mode": "memmap"},  # page faults fill the page cache; no read() into a buffer to copy from
    "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000},  # OCDBT's b-tree nodes, read once per reader
}


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose data starts on a page boundary."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    raw = np.empty(size + HOST_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % HOST_ALIGNMENT
    return raw[start:start + size].view(dtype).reshape(shape)


class ArrayReader:
    """The arrays of one Orbax PyTree item (`params/`, `opt_state/`: OCDBT or not, zarr or zarr3), by Orbax's
    parameter names (the tree path joined with dots), read with TensorStore."""

    def __init__(self, directory: Path):
        self.directory = Path(directory).absolute()
        metadata = read_json_object(self.directory / "_METADATA")
        self._zarr3 = bool(metadata.get("use_zarr3", False))
        self._ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(self.directory))
        self._context = ts.Context(_READ_CONTEXT)  # one per item, so OCDBT's b-tree is read once
        self._stores: dict[str, Any] = {}
        self._names = [".".join(str(key["key"]) for key in entry["key_metadata"])
                       for entry in metadata.get("tree_metadata", {}).values()
                       if not entry.get("value_metadata", {}).get("skip_deserialize")]

    def names(self) -> list[str]:
        """Every array's name, as `_METADATA` lists them."""
        return list(self._names)

    def _spec(self, name: str) -> dict[str, Any]:
        info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(self.directory), use_zarr3=self._zarr3,
                                           is_ocdbt_checkpoint=self._ocdbt, ts_context=self._context)
        return ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)

    def _open(self, names: list[str]) -> dict[str, Any]:
        """Open the TensorStores of `names` at once (their metadata reads overlap)."""
        pending = {name: ts.open(ts.Spec(self._spec(name)), open=True, read=True, context=self._context)
                   for name in names if name not in self._stores}
        self._stores.update({name: future.result() for name, future in pending.items()})
        return {name: self._stores[name] for name in names}

    def read(self, name: str, index: Any = ()) -> np.ndarray:
        """`name`, or its `index` (e.g. one layer), as numpy in the stored dtype."""
        store = self._open([name])[name][index]
        return _read_into_aligned(store).result()

    def read_placed(self, targets: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
        """Every named array as a jax.Array with its target's shape, dtype and sharding. Each process reads only the
        shards its devices hold (once for several local devices holding the same shard), all reads in flight at once."""
        stores = self._open(list(targets))
        reads = []  # (name, devices, future of a host buffer)
        for name, target in targets.items():
            store = stores[name]
            if tuple(store.shape) != tuple(target.shape):
                raise ConversionError(f"{self.directory}: array {name} has shape {tuple(store.shape)}, expected "
                                      f"{tuple(target.shape)}")
            devices_by_index = collections.defaultdict(list)
            for device, index in target.sharding.addressable_devices_indices_map(tuple(target.shape)).items():
                devices_by_index[_hashable(index)].append(device)
            for index, devices in devices_by_index.items():
                reads.append((name, devices, _read_into_aligned(store[_slices(index)], target.dtype)))
        shards = collections.defaultdict(list)
        for name, devices, future in reads:
            buffer = future.result()
            shards[name].extend(jax.device_put(buffer, device) for device in devices)  # adopted: no copy on CPU
        return {name: jax.make_array_from_single_device_arrays(tuple(target.shape), target.sharding, shards[name])
                for name, target in targets.items()}


class _BufferRead:
    """A TensorStore read into an aligned buffer; `result()` waits for it and returns the buffer."""

    def __init__(self, buffer: np.ndarray, future: Any):
        self.buffer, self.future = buffer, future

    def result(self) -> np.ndarray:
        self.future.result()
        return self.buffer


def _read_into_aligned(store: Any, dtype: Any = None) -> _BufferRead:
    """Start reading all of `store` (an array or a slice of one) into a fresh aligned buffer of `dtype` (default:
    the stored dtype; TensorStore converts)."""
    buffer = aligned_empty(tuple(store.shape), np.dtype(dtype) if dtype is not None else store.dtype.numpy_dtype)
    source = store[ts.d[:].translate_to[0]] if store.rank else store
    if buffer.dtype != store.dtype.numpy_dtype:
        source = ts.cast(source, ts.dtype(buffer.dtype.name))
    return _BufferRead(buffer, ts.array(buffer, copy=False).write(source))


def _hashable(index: tuple[slice, ...]) -> tuple[tuple[Any, Any], ...]:
    return tuple((part.start, part.stop) for part in index)


def _slices(index: tuple[tuple[Any, Any], ...]) -> tuple[slice, ...]:
    return tuple(slice(start, stop) for start, stop in index)


class NativeSource(ParamSource):
    """Parameters from an Orbax flat-dict checkpoint, read one at a time or all at once (`ArrayReader`)."""

    def __init__(self, config: ModelConfig, params_dir: Path):
        self.config = config
        self.params_dir = Path(params_dir).absolute()
        # A training run may keep heads beside the language model (PPO's value head): the model is the rest.
        self.metadata = {name: meta for name, meta in _array_metadata(self.params_dir).items()
                         if name not in TRAINING_HEADS}
        expected = param_shapes(config)
        found = {name: tuple(meta.shape) for name, meta in self.metadata.items()}
        check_names(expected, found, what=f"parameters in {self.params_dir}", config=config)
        check_shapes(expected, found, config)
        self.dtype = np.dtype(self.metadata["embedding"].dtype)
        self._reader = self._guarded(lambda: ArrayReader(self.params_dir))

    def dtype_of(self, name: str) -> np.dtype:
        return np.dtype(self.metadata[name].dtype)

    def read_layer(self, name: str, layer: int) -> np.ndarray:
        """One layer of a stacked parameter, read without reading the rest."""
        return self._guarded(lambda: self._reader.read(name, layer))

    def read(self, name: str) -> np.ndarray:
        return self._guarded(lambda: self._reader.read(name))

    def read_all(self, shardings: Mapping[str, jax.sharding.Sharding]) -> dict[str, jax.Array]:
        """Every parameter at once, as jax.Arrays placed by `shardings` (each process reads only its shards)."""
        targets = {name: jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=shardings[name])
                   for name, meta in self.metadata.items()}
        return self._guarded(lambda: self._reader.read_placed(targets))

    def _guarded(self, restore):
        try:
            return restore()
        except ConversionError:
            raise
        except Exception as error:  # a truncated or damaged array file surfaces from TensorStore as many kinds
            raise ConversionError(f"cannot read {self.params_dir}: {type(error).__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else ''}") from None


def open_native(path: Path) -> NativeSource:
    """A llama-jax checkpoint, a run directory (newest complete step), or one step of a run directory."""
    if is_native(path):
        return NativeSource(read_model_json(path / MODEL_FILE), path / PARAMS_DIR)
    if is_run_dir(path):
        config = run_model_config(path)
        _, params_dir = latest_run_checkpoint(path)
        return NativeSource(config, params_dir)
    if is_run_step(path):
        return NativeSource(run_model_config(path.parent.parent), path / PARAMS_DIR)
    raise ConversionError(f"{path} is not a llama-jax checkpoint ({MODEL_FILE} + {PARAMS_DIR}/) nor a run "
                          f"directory ({RUN_CONFIG} + {RUN_CHECKPOINTS}/<step>/{PARAMS_DIR})")


class LazyParam:
    """A parameter read only when Orbax is ready to write it; a stacked one (`load_layer`) a layer at a time."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, load: Callable[[], np.ndarray],
                 load_layer: Callable[[int], np.ndarray] | None = None):
        self.shape, self.dtype, self.load, self.load_layer = tuple(shape), np.dtype(dtype), load, load_layer
        self.ndim, self.size = len(self.shape), math.prod(self.shape)


class _StreamingNumpyHandler(ocp.type_handlers.NumpyHandler):
    """Orbax's numpy handler fed LazyParams: only the array (or layer) being written exists in memory.

    Orbax's own handler gathers every array's write at once, so the whole model would sit in memory. This one writes
    one parameter after another through the same TensorStore specs (recorded as 'np.ndarray', so the checkpoint
    reads like any other), and a stacked parameter layer by layer into one chunk per layer (a write that covers whole
    chunks needs no read-modify-write buffer).
    """

    async def _background_serialize(self, values, infos, args=None):
        for value, info, arg in zip(values, infos, args or [None] * len(values)):
            await super()._background_serialize([value], [info], None if arg is None else [arg])

    async def _open_and_write(self, value, tspec, ts_context):
        if value.load_layer is not None:
            tspec = dict(tspec, metadata=dict(tspec["metadata"], chunks=(1, *value.shape[1:])))
        store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
        # The arrays are fresh and never modified, so TensorStore may write from them without a copy.
        if value.load_layer is None:
            await store.write(self._checked(value.load(), value.shape, value.dtype),
                              can_reference_source_data_indefinitely=True)
            return
        for layer in range(value.shape[0]):
            await store[layer].write(self._checked(value.load_layer(layer), value.shape[1:], value.dtype),
                                     can_reference_source_data_indefinitely=True)

    @staticmethod
    def _checked(array: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        if tuple(array.shape) != tuple(shape) or array.dtype != dtype:
            raise ConversionError(f"a parameter read as {array.dtype}{list(array.shape)}, expected "
                                  f"{dtype}{list(shape)}")
        return array


def write_native(config: ModelConfig, params: Mapping[str, np.ndarray | jax.Array | LazyParam],
                 directory: Path) -> None:
    """Write `params` as a llama-jax checkpoint into the existing `directory`.

    Values may be numpy or jax arrays (any dtype), or LazyParams, which are read and written one at a time.
    """
    (directory / MODEL_FILE).write_text(config_to_json(config))
    # Weights hardly compress (a few percent for zstd), while compressing costs more time than the disk write on a
    # small machine: store them raw. Numpy arrays are written in place: Orbax otherwise deep-copies them first
    # (to guard an asynchronous save against later changes; this save is synchronous).
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),  # Orbax's default, for sharded jax.Arrays
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (LazyParam, _StreamingNumpyHandler(deepcopy_host_arrays=False)))
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
    with contextlib.closing(ocp.Checkpointer(handler)) as checkpointer:
        checkpointer.save((directory / PARAMS_DIR).absolute(), args=ocp.args.PyTreeSave(dict(params)))
