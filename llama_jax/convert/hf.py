"""Hugging Face format: `config.json` + `model.safetensors` (or `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json`), as `transformers.LlamaForCausalLM.save_pretrained` writes and `from_pretrained` reads.

Both directions work on the safetensors layout directly (an 8-byte header length, a JSON header of names, dtypes,
shapes and byte offsets, then the raw little-endian data): reading validates the header against the file's size and
then reads one tensor at a time with pread, and writing lays out every file's header first (all shapes are known
from the config) and then writes each tensor at its offset as it is produced. `safetensors.safe_open` memory-maps
whole files, and every page it touches stays in the process's resident set until the file is closed, which would
count the whole checkpoint against a conversion's memory; plain reads keep only the tensor being converted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from llama_jax.config import ModelConfig, RopeScaling
from llama_jax.convert.common import (
    BFLOAT16,
    ExternalSource,
    ParamSource,
    cast,
    check_names,
    check_shapes,
    compute_dtype,
    dtype_name,
    read_json_object,
    shape_mismatch,
)
from llama_jax.convert.native import config_from_mapping
from llama_jax.convert.weight_map import HF_NAMES, TensorMapping, hf_mappings
from llama_jax.errors import ConversionError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", BFLOAT16: "BF16", np.dtype(np.float16): "F16"}
DTYPES_BY_CODE = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1000**2  # the safetensors library's own limit
# Buffers some older checkpoints carry that hold nothing learned (recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def is_hf(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and ((path / INDEX_FILE).is_file() or any(path.glob("*.safetensors")))


# ── config.json ↔ ModelConfig ──────────────────────────────────────────────────────────────────────────────────
def config_from_hf(raw: dict[str, Any], where: Path) -> ModelConfig:
    """Our config from a transformers LlamaConfig dict (transformers 4 `rope_scaling` or 5 `rope_parameters`).

    A `head_dim` other than hidden_size / num_attention_heads is checked against the weights (`HFSource`).
    """
    if raw.get("model_type", "llama") != "llama":
        raise ConversionError(f"{where}: model_type {raw.get('model_type')!r} is not a Llama model ('llama')")
    for key, unsupported in (("attention_bias", True), ("mlp_bias", True)):
        if raw.get(key) == unsupported:
            raise ConversionError(f"{where}: {key}={unsupported} is not supported (Llama has no biases)")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act={raw['hidden_act']!r} is not supported (Llama uses silu)")
    try:
        dim, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        fields = dict(vocab_size=int(raw["vocab_size"]), dim=dim, n_layers=int(raw["num_hidden_layers"]),
                      n_heads=heads, ffn_hidden_dim=int(raw["intermediate_size"]))
    except KeyError as missing:
        raise ConversionError(f"{where} lacks {missing}, which a Llama config needs") from None
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    rope = raw.get("rope_parameters") or {}
    legacy_scaling = raw.get("rope_scaling") or {}
    fields.update(n_kv_heads=None if kv_heads == heads else kv_heads,
                  norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                  rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
                  rope_scaling=_scaling_from_hf(legacy_scaling or rope, where),
                  max_seq_len=int(raw.get("max_position_embeddings", 2048)),
                  tie_embeddings=bool(raw.get("tie_word_embeddings", False)))
    return config_from_mapping(fields, where)


def _scaling_from_hf(spec: dict[str, Any], where: Path) -> dict[str, Any] | None:
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type != "llama3":
        raise ConversionError(f"{where}: rope type {rope_type!r} is not supported (only 'default' and 'llama3')")
    try:
        return dict(factor=float(spec["factor"]), low_freq_factor=float(spec["low_freq_factor"]),
                    high_freq_factor=float(spec["high_freq_factor"]),
                    original_max_position=int(spec["original_max_position_embeddings"]))
    except KeyError as missing:
        raise ConversionError(f"{where}: llama3 rope scaling lacks {missing}") from None


def declared_dtype(raw: dict[str, Any]) -> Any:
    """The dtype config.json declares: `dtype` (transformers 5) or `torch_dtype` (transformers 4); None if neither."""
    return raw.get("dtype") or raw.get("torch_dtype")


def describe_hf(raw: dict[str, Any], where: Path) -> str:
    """config.json's shape keys as the file spells them, for messages about weights that disagree with it."""
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size")
    return f"{where} ({', '.join(f'{key}={raw[key]}' for key in keys if raw.get(key) is not None)})"


def hf_config(config: ModelConfig, dtype: np.dtype) -> dict[str, Any]:
    """The config.json transformers' LlamaConfig expects (readable by transformers 4 and 5)."""
    scaling = _scaling_to_hf(config.rope_scaling)
    llama3_vocab = config.vocab_size >= 128000
    stored_dtype = dtype_name(dtype)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        # transformers 4 reads rope_theta / rope_scaling; transformers 5 reads rope_parameters.
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta} if scaling is None
        else {**scaling, "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": 128000 if llama3_vocab else 1,
        "eos_token_id": 128001 if llama3_vocab else 2,
        "torch_dtype": stored_dtype,
        "dtype": stored_dtype,
    }


def _scaling_to_hf(scaling: RopeScaling | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    return {"rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position}


# ── Reading ─────────────────────────────────────────────────────────────────────────────────────────────────────
class HFSource(ExternalSource):
    """A Hugging Face folder, tensors read one at a time from the safetensors files."""

    def __init__(self, path: Path):
        where = path / CONFIG_FILE
        raw = read_json_object(where)
        config = config_from_hf(raw, where)
        self._files = [SafetensorsFile(file) for file in _weight_files(path)]
        self._where: dict[str, SafetensorsFile] = {}
        found: dict[str, tuple[int, ...]] = {}
        for file in self._files:
            for name, entry in file.entries.items():
                if not name.endswith(IGNORED_SUFFIXES):
                    self._where[name], found[name] = file, entry.shape
        mappings = hf_mappings(config)
        expected = {mapping.theirs: mapping.their_shape for mapping in mappings}
        if config.tie_embeddings and "lm_head.weight" in found:
            found.pop("lm_head.weight")  # a tied head saved anyway is the embedding again
        described = describe_hf(raw, where)
        check_names(expected, found, what=f"tensors in {path}", described=described)
        _check_head_dim(raw, found, expected, config, where)
        check_shapes(expected, found, config, described)
        super().__init__(config, mappings)
        self.check_dtypes()
        self.dtype = self.external_dtype(mappings[0].theirs)
        # Compute as transformers' from_pretrained(dtype="auto") does, so logits match it in the checkpoint's dtype.
        self.config = dataclasses.replace(config, dtype=compute_dtype(declared_dtype(raw), self.dtype))

    def read_external(self, name: str) -> np.ndarray:
        return self._where[name].read(name)

    def external_dtype(self, name: str) -> np.dtype:
        return self._where[name].entries[name].dtype

    def close(self) -> None:
        for file in self._files:
            file.close()


def _check_head_dim(raw: dict[str, Any], found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                    config: ModelConfig, where: Path) -> None:
    """llama-jax's head_dim is hidden_size / num_attention_heads. A config.json declaring another one either
    describes a model llama-jax cannot run (the weights agree with it) or contradicts its weights (they do not)."""
    declared = raw.get("head_dim")
    if declared is None or int(declared) == config.head_dim:
        return
    query = HF_NAMES["blocks.attention.w_q"].format(layer=0)
    declared_shape = (config.n_heads * int(declared), config.dim)
    if found[query] == declared_shape:
        raise ConversionError(f"{where}: head_dim={declared} differs from hidden_size/"
                              f"num_attention_heads={config.head_dim}, which llama-jax does not support")
    if found[query] == expected[query]:  # only head_dim disagrees: the weights have hidden_size / heads
        raise shape_mismatch(query, found[query], declared_shape, describe_hf(raw, where))
    # Otherwise hidden_size or the head counts disagree too: check_shapes names the first tensor they contradict.


class _Entry(NamedTuple):
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets from the start of the file
    end: int


class SafetensorsFile:
    """One safetensors file: its header parsed and checked against the file's size; tensors read on demand."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = open(path, "rb")
        except OSError as error:
            raise ConversionError(f"cannot open {path}: {error}") from None
        try:
            self.entries = self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _damaged(self, why: str) -> ConversionError:
        return ConversionError(f"{self.path} is not a readable safetensors file (truncated or damaged?): {why}")

    def _parse_header(self) -> dict[str, _Entry]:
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(8)
        if len(prefix) < 8:
            raise self._damaged(f"{size} bytes, shorter than the 8-byte header length")
        header_size = int.from_bytes(prefix, "little")
        if header_size > min(MAX_HEADER_BYTES, size - 8):
            raise self._damaged(f"header length {header_size} does not fit in the file's {size} bytes")
        try:
            header = json.loads(self._file.read(header_size))
        except ValueError as error:
            raise self._damaged(f"header is not JSON ({error})") from None
        header.pop("__metadata__", None)
        data_start, entries, end = 8 + header_size, {}, 0
        for name, info in header.items():
            dtype = DTYPES_BY_CODE.get(info.get("dtype")) if isinstance(info, dict) else None
            if dtype is None:
                raise self._damaged(f"tensor {name} has dtype {info.get('dtype') if isinstance(info, dict) else info}"
                                    f", not one of {sorted(DTYPES_BY_CODE)}")
            shape, (begin, stop) = tuple(int(d) for d in info["shape"]), info["data_offsets"]
            if stop - begin != math.prod(shape) * dtype.itemsize:
                raise self._damaged(f"tensor {name} of shape {shape} spans {stop - begin} bytes")
            entries[name] = _Entry(dtype, shape, data_start + begin, data_start + stop)
            end = max(end, data_start + stop)
        if end != size:
            raise self._damaged(f"its header describes {end} bytes but the file has {size}")
        return entries

    def read(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        array = np.empty(entry.shape, entry.dtype)
        buffer = memoryview(array.reshape(-1).view(np.uint8))
        position = entry.begin
        while len(buffer):
            count = os.preadv(self._file.fileno(), [buffer], position)
            if count == 0:
                raise self._damaged(f"tensor {name} ends past the end of the file")
            buffer, position = buffer[count:], position + count
        return array

    def close(self) -> None:
        self._file.close()


def open_hf(path: Path) -> HFSource:
    return HFSource(path)


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files: those the index names, or else model.safetensors, or else every *.safetensors."""
    if (path / INDEX_FILE).is_file():
        weight_map = read_json_object(path / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{path / INDEX_FILE} has no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise ConversionError(f"{path / INDEX_FILE} names {file.name}, which does not exist")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    return sorted(path.glob("*.safetensors"))


# ── Writing ─────────────────────────────────────────────────────────────────────────────────────────────────────
def write_hf(source: ParamSource, directory: Path, dtype: np.dtype | None, max_shard_size: int) -> None:
    """Write a Hugging Face folder into the existing `directory`, streaming tensors from `source`."""
    config = source.config
    mappings = hf_mappings(config)
    dtypes = tensor_dtypes(source, mappings, dtype)
    main_dtype = dtype if dtype is not None else source.dtype
    write_safetensors_folder(source, directory, mappings, dtypes, hf_config(config, main_dtype), max_shard_size)


def tensor_dtypes(source: ParamSource, mappings: Sequence[TensorMapping], dtype: np.dtype | None
                  ) -> dict[str, np.dtype]:
    """{their tensor name: the dtype it is written in}: `dtype`, else each parameter's own; safetensors' only."""
    dtypes = {mapping.theirs: dtype if dtype is not None else source.dtype_of(mapping.ours) for mapping in mappings}
    for name, out_dtype in dtypes.items():
        if out_dtype not in SAFETENSORS_DTYPES:
            raise ConversionError(f"cannot write tensor {name} of dtype {out_dtype} to safetensors")
    return dtypes


def write_safetensors_folder(source: ParamSource, directory: Path, mappings: Sequence[TensorMapping],
                             dtypes: Mapping[str, np.dtype], config_json: Mapping[str, Any],
                             max_shard_size: int) -> None:
    """config.json, then safetensors files (an index when there are several) whose headers are written first and
    whose tensors are streamed to their offsets one at a time (the causal LM and the reward model both)."""
    files = _plan_files(mappings, dtypes, max_shard_size)
    (directory / CONFIG_FILE).write_text(json.dumps(config_json, indent=2) + "\n")
    if len(files) > 1:
        total = sum(layout.nbytes for layout in files)
        weight_map = {mapping.theirs: layout.name for layout in files for mapping in layout.mappings}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    placement = {mapping.theirs: (layout, offset) for layout in files
                 for mapping, offset in zip(layout.mappings, layout.offsets)}
    descriptors = {layout.name: os.open(directory / layout.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                   for layout in files}
    try:
        for layout in files:
            os.pwrite(descriptors[layout.name], layout.header, 0)
        _stream_tensors(source, mappings, dtypes, placement, descriptors)
        for descriptor in descriptors.values():
            os.fsync(descriptor)
    finally:
        for descriptor in descriptors.values():
            os.close(descriptor)


def _stream_tensors(source: ParamSource, mappings: list[TensorMapping], dtypes: dict[str, np.dtype],
                    placement: dict[str, tuple[_FileLayout, int]], descriptors: dict[str, int]) -> None:
    """Read our parameters a layer at a time and write each external tensor at its place in its file."""
    for mapping in mappings:
        value = source.read(mapping.ours) if mapping.layer is None else source.read_layer(mapping.ours, mapping.layer)
        tensor = np.ascontiguousarray(cast(mapping.to_theirs(value), dtypes[mapping.theirs]))
        layout, offset = placement[mapping.theirs]
        _pwrite_all(descriptors[layout.name], tensor.reshape(-1).view(np.uint8), layout.data_start + offset)


def _pwrite_all(descriptor: int, data: np.ndarray, position: int) -> None:
    view = memoryview(data)
    while len(view):
        written = os.pwrite(descriptor, view, position)
        view, position = view[written:], position + written


class _FileLayout:
    """One safetensors file: its tensors, their byte offsets, and the header that describes them."""

    def __init__(self, mappings: list[TensorMapping], dtypes: dict[str, np.dtype]):
        self.mappings = mappings
        self.offsets: list[int] = []
        entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for mapping in mappings:
            dtype = dtypes[mapping.theirs]
            size = math.prod(mapping.their_shape) * dtype.itemsize
            entries[mapping.theirs] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(mapping.their_shape),
                                       "data_offsets": [offset, offset + size]}
            self.offsets.append(offset)
            offset += size
        self.nbytes = offset
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
        self.header = len(text).to_bytes(8, "little") + text
        self.data_start = len(self.header)
        self.name = SINGLE_FILE


def _plan_files(mappings: list[TensorMapping], dtypes: dict[str, np.dtype],
                max_shard_size: int) -> list[_FileLayout]:
    """Tensors in order, cut into files of at most `max_shard_size` bytes (a bigger tensor gets a file alone)."""
    groups: list[list[TensorMapping]] = [[]]
    size = 0
    for mapping in mappings:
        nbytes = math.prod(mapping.their_shape) * dtypes[mapping.theirs].itemsize
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(mapping)
        size += nbytes
    files = [_FileLayout(group, dtypes) for group in groups]
    if len(files) > 1:
        for i, layout in enumerate(files):
            layout.name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
    return files
