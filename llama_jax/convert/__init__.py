"""Checkpoint conversion between llama-jax (Orbax), Hugging Face (safetensors) and Meta (consolidated.NN.pth).

    load(path)                         any of the three (or a run directory) → Llama with float32 parameters,
                                       computing in the checkpoint's dtype
    save(model, path, format=...)      Llama → any of the three
    convert(src, dst, to=...)          checkpoint → checkpoint, tensor by tensor
    read_params(path)                  (ModelConfig, {name: array in its stored dtype}) in our layout

Every format is read through a `ParamSource` that yields one of our (stacked) parameters at a time, and every writer
consumes one, so conversions hold little more than the output format forces (see `python -m llama_jax.convert -h`).
Writes go to a temporary directory beside the destination and are renamed into place only when complete.
"""
from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.convert import native
from llama_jax.convert.common import ArraySource, ParamSource, cast, parse_dtype, stacked_names, staged_output
from llama_jax.errors import ConversionError
from llama_jax.model import Llama
from llama_jax.params import model_from_params, model_params, param_shapes

FORMATS = ("orbax", "hf", "meta")
DEFAULT_MAX_SHARD_SIZE = 5 * 1000**3  # bytes per safetensors file, as transformers' save_pretrained defaults to

__all__ = ["FORMATS", "convert", "detect_format", "load", "open_source", "read_params", "save"]


def detect_format(path: str | Path) -> str:
    """'orbax' (a llama-jax checkpoint or run directory), 'hf' or 'meta', from the files in `path`."""
    from llama_jax.convert import hf, meta

    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path} does not exist: give the folder of a checkpoint (a Hugging Face model, a Meta "
                              f"download, a llama-jax checkpoint or a training run directory)")
    if not path.is_dir():
        raise ConversionError(f"{path} is not a directory: a checkpoint is a folder (a Hugging Face model, a Meta "
                              f"download or a llama-jax checkpoint)")
    if native.is_native(path) or native.is_run_dir(path) or native.is_run_step(path):
        return "orbax"
    if hf.is_hf(path):
        return "hf"
    if meta.is_meta(path):
        return "meta"
    # Weights without the config beside them: name the missing file rather than fail to recognise the folder.
    for config_file, weights in ((hf.CONFIG_FILE, "*.safetensors"), (meta.PARAMS_FILE, "consolidated.*.pth")):
        if any(path.glob(weights)):
            raise ConversionError(f"{path / config_file} is missing or not a file: the {weights} files beside it "
                                  f"cannot be read without it; copy it from where the weights came from")
    raise ConversionError(
        f"cannot tell the format of {path}: looked for a Hugging Face model (config.json + *.safetensors), a Meta "
        f"download (params.json + consolidated.NN.pth), a llama-jax checkpoint ({native.MODEL_FILE} + "
        f"{native.PARAMS_DIR}/) or a run directory ({native.RUN_CONFIG} + {native.RUN_CHECKPOINTS}/<step>/)")


def open_source(path: str | Path) -> ParamSource:
    """A checkpoint of any format opened for reading one parameter at a time (use as a context manager)."""
    from llama_jax.convert import hf, meta

    path = Path(path)
    opener = {"orbax": native.open_native, "hf": hf.open_hf, "meta": meta.open_meta}[detect_format(path)]
    return opener(path)


def read_params(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """The config and all parameters (our layout, stored dtype) of a checkpoint of any format."""
    with open_source(path) as source:
        return source.config, {name: source.read(name) for name in source.names()}


def load(path: str | Path, *, dtype: str | None = None,
         shardings: Mapping[str, jax.sharding.Sharding] | None = None,
         mesh: jax.sharding.Mesh | None = None) -> Llama:
    """The model stored at `path` (any format), with float32 parameters.

    dtype: the compute dtype to set in the model's config (parameters stay float32); default: the checkpoint's own,
        as transformers' `dtype="auto"` picks it: model.json's (llama-jax), config.json's `dtype`/`torch_dtype`
        (Hugging Face; the weights' dtype if it names none), the weights' dtype (Meta, which ships bfloat16).
    shardings: {parameter name: Sharding} to restore onto, or `mesh` to shard by the default logical rules; a
        llama-jax checkpoint is then read shard by shard, so a model larger than one device's memory restores.
    """
    with open_source(path) as source:
        config = source.config if dtype is None else dataclasses.replace(source.config, dtype=dtype)
        placement = _placements(config, source.names(), shardings, mesh)
        if isinstance(source, native.NativeSource):
            params = source.read_all(placement)
        else:
            params = {name: jax.device_put(source.read(name), placement[name]) for name in source.names()}
    # Cast on the devices the arrays live on (elementwise, so sharding is kept).
    params = {name: value.astype(jnp.float32) for name, value in params.items()}
    return model_from_params(config, params)


def _placements(config: ModelConfig, names: list[str], shardings: Mapping[str, jax.sharding.Sharding] | None,
                mesh: jax.sharding.Mesh | None) -> dict[str, jax.sharding.Sharding]:
    if shardings is not None:
        missing = [name for name in names if name not in shardings]
        if missing:
            raise ConversionError(f"shardings= lacks parameters {missing}")
        return {name: shardings[name] for name in names}
    if mesh is not None:
        from llama_jax import params, sharding

        return sharding.param_shardings(params.param_specs(config), mesh)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return {name: device for name in names}


def save(model: Llama, path: str | Path, format: str = "orbax", *, dtype: str | None = None, shards: int = 1,
         max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, meta_embedding_split: str = "auto",
         overwrite: bool = False) -> Path:
    """Write `model` at `path` in `format` ('orbax', 'hf' or 'meta'); dtype 'bfloat16' casts on write.

    shards: Meta model-parallel shards (consolidated.00.pth … ); max_shard_size: bytes per safetensors file.
    """
    params = model_params(model)
    target = parse_dtype(dtype)
    if format == "orbax":
        # Orbax writes jax.Arrays directly (each process its own shards), so they are not gathered to numpy.
        params = {name: value if target is None else value.astype(target) for name, value in params.items()}
        with staged_output(path, overwrite) as staging:
            native.write_native(model.config, params, staging)
        return Path(path)
    source = ArraySource(model.config, {name: np.asarray(value) for name, value in params.items()})
    return _write(source, path, format, target, shards, max_shard_size, meta_embedding_split, overwrite)


def convert(src: str | Path, dst: str | Path, to: str, *, dtype: str | None = None, shards: int = 1,
            max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, meta_embedding_split: str = "auto",
            overwrite: bool = False) -> Path:
    """Convert the checkpoint at `src` (format detected) to format `to` at `dst`; dtype None keeps the source's."""
    target = parse_dtype(dtype)
    with open_source(src) as source:
        return _write(source, dst, to, target, shards, max_shard_size, meta_embedding_split, overwrite,
                      companions=_companion_files(Path(src), to))


# Files beside the weights that a server needs too; copied when present (Meta's folder takes only its tokenizer).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HF_EXTRA_FILES = ("generation_config.json",)


def _companion_files(src: Path, format: str) -> list[Path]:
    names = ("tokenizer.model",) if format == "meta" else TOKENIZER_FILES + HF_EXTRA_FILES
    return [src / name for name in names if (src / name).is_file()]


def _lazy_params(source: ParamSource, dtype: np.dtype | None) -> dict[str, native.LazyParam]:
    """Each parameter read (and cast) only when the Orbax writer reaches it; stacked ones a layer at a time."""
    shapes, stacked = param_shapes(source.config), stacked_names(source.config)
    return {name: native.LazyParam(shapes[name], dtype if dtype is not None else source.dtype_of(name),
                                   lambda name=name: cast(source.read(name), dtype),
                                   (lambda layer, name=name: cast(source.read_layer(name, layer), dtype))
                                   if name in stacked else None)
            for name in source.names()}


def _write(source: ParamSource, dst: str | Path, format: str, dtype: np.dtype | None, shards: int,
           max_shard_size: int, meta_embedding_split: str, overwrite: bool, companions: list[Path] = ()) -> Path:
    from llama_jax.convert import hf, meta

    if format not in FORMATS:
        raise ConversionError(f"unknown output format {format!r}: expected one of {FORMATS}")
    if shards != 1 and format != "meta":
        raise ConversionError(f"shards={shards} applies to the Meta format only (use max_shard_size for hf)")
    with staged_output(dst, overwrite) as staging:
        if format == "orbax":
            native.write_native(source.config, _lazy_params(source, dtype), staging)
        elif format == "hf":
            hf.write_hf(source, staging, dtype, max_shard_size)
        else:
            meta.write_meta(source, staging, dtype, shards, meta_embedding_split)
        for file in companions:
            shutil.copyfile(file, staging / file.name)
    return Path(dst)
