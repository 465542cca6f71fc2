"""What every format shares: a lazily read parameter source, dtype handling, and staged (all-or-nothing) output."""
from __future__ import annotations

import abc
import contextlib
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from llama_jax.config import COMPUTE_DTYPES, ModelConfig
from llama_jax.convert.weight_map import TensorMapping
from llama_jax.errors import ConversionError
from llama_jax.jsonl import read_json
from llama_jax.params import param_shapes

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BFLOAT16}


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object (config.json, params.json, model.json, an index), or a ConversionError."""
    raw = read_json(path, "a checkpoint's JSON file", ConversionError)
    if not isinstance(raw, dict):
        raise ConversionError(f"{path} must hold a JSON object")
    return raw


def parse_dtype(dtype: str | np.dtype | None) -> np.dtype | None:
    """'float32' / 'bfloat16' / a numpy dtype / None (keep each tensor's stored dtype)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConversionError(f"dtype {dtype!r} is not supported: expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    resolved = np.dtype(dtype)
    if resolved not in DTYPES.values():
        raise ConversionError(f"dtype {resolved} is not supported: expected one of {sorted(DTYPES)}")
    return resolved


def dtype_name(dtype: np.dtype) -> str:
    """'float32', 'bfloat16', 'float16': how configs (ours, transformers') spell a dtype."""
    return np.dtype(dtype).name


def compute_dtype(declared: Any, stored: np.dtype) -> str:
    """The compute dtype of a loaded external checkpoint, as transformers' `dtype="auto"` picks it: the dtype its
    config declares, else the dtype its weights are stored in."""
    return declared if declared in COMPUTE_DTYPES else dtype_name(stored)


def cast(array: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    """`array` in `dtype` (None keeps it). float32 → bfloat16 rounds to nearest even, as torch and XLA do."""
    if dtype is None or array.dtype == dtype:
        return array
    return array.astype(dtype)


class ParamSource(abc.ABC):
    """Our parameters (dotted names, stacked layers), read one at a time in the dtype they are stored in.

    Readers of every format implement this, and writers of every format consume it, so a conversion never needs the
    whole model in memory unless the output format itself requires it.
    """

    config: ModelConfig
    dtype: np.dtype  # the dtype the tensors are stored in (what "keep the source dtype" writes)

    def names(self) -> list[str]:
        return list(param_shapes(self.config))

    @abc.abstractmethod
    def read(self, name: str) -> np.ndarray:
        """One parameter, in our layout, in its stored dtype."""

    def read_layer(self, name: str, layer: int) -> np.ndarray:
        """One layer's slice of a stacked (`blocks.*`) parameter; sources override this to read only that much."""
        return self.read(name)[layer]

    def dtype_of(self, name: str) -> np.dtype:
        """The stored dtype of one parameter (a checkpoint may keep, say, norms in float32 beside bfloat16)."""
        return self.dtype

    def close(self) -> None:  # noqa: B027 (a no-op by default, not abstract)
        """Release open files (sources that hold none need not override this)."""

    def __enter__(self) -> ParamSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArraySource(ParamSource):
    """Parameters already in memory (a model being saved, or arrays a caller built)."""

    def __init__(self, config: ModelConfig, params: Mapping[str, np.ndarray]):
        self.config = config
        self._params = params
        self.dtype = np.dtype(params["embedding"].dtype) if "embedding" in params else np.dtype("float32")
        expected = param_shapes(config)
        check_names(expected, {name: tuple(value.shape) for name, value in params.items()}, what="parameters")
        for name, shape in expected.items():
            if tuple(params[name].shape) != shape:
                raise ConversionError(f"parameter {name} has shape {tuple(params[name].shape)}, the config needs "
                                      f"{shape}")

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self._params[name])

    def read_layer(self, name: str, layer: int) -> np.ndarray:
        return np.asarray(self._params[name][layer])

    def dtype_of(self, name: str) -> np.dtype:
        return np.dtype(self._params[name].dtype)


class ExternalSource(ParamSource):
    """Our parameters assembled from an external checkpoint's tensors (HF or Meta), one external tensor at a time.

    Subclasses provide `read_external(name)`; the per-tensor layout transforms come from `llama_jax.convert.weight_map`.
    """

    def __init__(self, config: ModelConfig, mappings: list[TensorMapping]):
        self.config = config
        self._by_ours: dict[str, list[TensorMapping]] = {}
        for mapping in mappings:
            self._by_ours.setdefault(mapping.ours, []).append(mapping)
        self._shapes = param_shapes(config)

    @abc.abstractmethod
    def read_external(self, name: str) -> np.ndarray:
        """One external tensor by its external name, in its stored dtype and layout."""

    @abc.abstractmethod
    def external_dtype(self, name: str) -> np.dtype:
        """The stored dtype of one external tensor, without reading it."""

    def dtype_of(self, name: str) -> np.dtype:
        return self.external_dtype(self._by_ours[name][0].theirs)

    def check_dtypes(self) -> None:
        """Layers are stacked into one array per parameter, so each parameter's tensors must share a dtype."""
        for group in self._by_ours.values():
            first = self.external_dtype(group[0].theirs)
            for mapping in group[1:]:
                if self.external_dtype(mapping.theirs) != first:
                    raise ConversionError(f"tensor {mapping.theirs} is {self.external_dtype(mapping.theirs)} but "
                                          f"{group[0].theirs} is {first}: the layers of a weight must share a dtype")

    def read(self, name: str) -> np.ndarray:
        group = self._by_ours[name]
        if group[0].layer is None:
            return self._convert(group[0])
        stacked = np.empty(self._shapes[name], self.dtype_of(name))
        for mapping in group:
            stacked[mapping.layer] = self._convert(mapping)
        return stacked

    def read_layer(self, name: str, layer: int) -> np.ndarray:
        mapping = self._by_ours[name][layer]
        assert mapping.layer == layer
        return self._convert(mapping)

    def _convert(self, mapping: TensorMapping) -> np.ndarray:
        tensor = self.read_external(mapping.theirs)
        if tuple(tensor.shape) != mapping.their_shape:
            raise ConversionError(f"tensor {mapping.theirs} has shape {tuple(tensor.shape)}, the config needs "
                                  f"{mapping.their_shape}")
        return mapping.to_ours(tensor)


def stacked_names(config: ModelConfig) -> set[str]:
    """Our parameters stacked along a leading layer axis (`blocks.*`): the ones converted a layer at a time."""
    return {name for name in param_shapes(config) if name.startswith("blocks.")}


def check_names(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], what: str,
                config: ModelConfig | None = None, described: str | None = None) -> None:
    """Missing or unexpected tensors → one ConversionError naming them (and the shapes of the unexpected ones).

    described: the config as its file spells it (`config_file (key=value, ...)`); default: our config's fields.
    """
    missing = [name for name in expected if name not in found]
    extra = [name for name in found if name not in expected]
    if not missing and not extra:
        return
    parts = []
    if missing:
        parts.append(f"missing {_some(missing)} (expected shape {expected[missing[0]]} for {missing[0]})")
    if extra:
        parts.append("unexpected " + _some([f"{name} {found[name]}" for name in extra]))
    if described is None:
        described = f"the config for {describe(config)}" if config is not None else "the config"
    raise ConversionError(f"{what} do not match {described}: " + "; ".join(parts))


def describe(config: ModelConfig) -> str:
    return (f"dim={config.dim}, n_layers={config.n_layers}, n_heads={config.n_heads}, "
            f"n_kv_heads={config.kv_heads}, hidden={config.hidden_dim}, vocab={config.vocab_size}")


def _some(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > limit else ''}]"


def check_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                 config: ModelConfig, described: str | None = None) -> None:
    """Every tensor's shape against the config, before anything is converted or written.

    described: the config as its file spells it (`config_file (key=value, ...)`), so that the message names the file
    that disagrees with the weights; default: our config's fields.
    """
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise shape_mismatch(name, found[name], shape, described or f"the config ({describe(config)})")


def shape_mismatch(name: str, found: tuple[int, ...], needed: tuple[int, ...], described: str) -> ConversionError:
    """A tensor whose shape is not the one its config implies."""
    return ConversionError(f"tensor {name} has shape {tuple(found)}, but {described} needs {tuple(needed)}: the "
                           f"config and the weights disagree (fix the config, or use the weights it came with)")


@contextlib.contextmanager
def staged_output(destination: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside `destination` that becomes it only if the block completes.

    Conversions write into the yielded directory; on any error (or Ctrl-C) it is removed, so a failed conversion
    leaves nothing at the destination. The final rename is atomic on one filesystem.
    """
    destination = Path(destination).absolute()
    refuse_existing(destination, overwrite)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if destination.exists():
            retired = destination.parent / f".{destination.name}.old-{uuid.uuid4().hex[:8]}"
            destination.rename(retired)
            staging.rename(destination)
            _remove(retired)
        else:
            staging.rename(destination)
    except BaseException:
        _remove(staging)
        raise


def refuse_existing(destination: str | Path, overwrite: bool, how_to_overwrite: str = "overwrite=True") -> None:
    """A ConversionError if `destination` exists and may not be replaced; `how_to_overwrite` is the option as the
    caller spells it (a program's flag, or the Python keyword)."""
    destination = Path(destination).absolute()
    if destination.exists() and not overwrite:
        raise ConversionError(f"{destination} already exists: choose another destination or pass {how_to_overwrite}")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
