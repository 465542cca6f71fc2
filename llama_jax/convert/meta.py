"""Meta format: `params.json` + `consolidated.NN.pth`, one file per model-parallel rank, as Meta's download ships.

Meta's reference code (meta-llama/llama for Llama 2, meta-llama/llama3 and llama-models for Llama 3) builds each rank's
layers from fairscale's parallel layers, and each file holds that rank's slice of every weight:

    ColumnParallelLinear  wq, wk, wv, w1, w3, output    split on the output dim (weight dim 0)
    RowParallelLinear     wo, w2                        split on the input dim (weight dim 1)
    ParallelEmbedding     tok_embeddings (Llama 2)      split on the embedding dim (dim 1)
    VocabParallelEmbedding tok_embeddings (Llama 3)     split on the vocabulary (dim 0)
    RMSNorm weights                                     replicated in every file

Reading concatenates the slices along those dims (the embedding's from its shapes); writing cuts them. Files are
opened with `torch.load(..., mmap=True, weights_only=True)`: memory-mapped, and never unpickling arbitrary objects.
PyTorch is needed for this format only (`pip install 'llama-jax[meta]'`).
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import mmap
import os
import re
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

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
    describe,
    read_json_object,
)
from llama_jax.convert.native import config_from_mapping
from llama_jax.convert.weight_map import META_NAMES, meta_mappings
from llama_jax.errors import ConversionError

PARAMS_FILE = "params.json"
SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth")
EMBEDDING = META_NAMES["embedding"]
OUTPUT = META_NAMES["output"]
FIRST_QUERY = META_NAMES["blocks.attention.w_q"].format(layer=0)
FINAL_NORM = META_NAMES["final_norm.scale"]
# How torch's weights-only unpickler names the function or class it refused to load (torch 2.4 … 2.13 wordings).
_REFUSED_GLOBAL = re.compile(r"unsupported GLOBAL ([\w.]+)", re.IGNORECASE)

# Which dim of each weight Meta's model-parallel layers split (by our parameter name); None = replicated.
SPLIT_DIMS: dict[str, int | None] = {
    "blocks.attention.w_q": 0, "blocks.attention.w_k": 0, "blocks.attention.w_v": 0, "blocks.attention.w_o": 1,
    "blocks.mlp.w_gate": 0, "blocks.mlp.w_up": 0, "blocks.mlp.w_down": 1, "output": 0,
    "blocks.attention_norm.scale": None, "blocks.mlp_norm.scale": None, "final_norm.scale": None,
}
# (multiple_of, ffn_dim_multiplier) of Meta's published models, in an order that gives each its own: Llama 2 7B/13B
# and Code Llama, Llama 3.2 1B, Llama 2/3 70B, Llama 3 8B, Llama 3.1 405B.
PUBLISHED_FFN_RULES = [(256, None), (256, 1.5), (4096, 1.3), (1024, 1.3), (4096, 1.2)]
EMBEDDING_SPLITS = {"vocab": 0, "dim": 1}  # Llama 3 (VocabParallelEmbedding), Llama 2 (ParallelEmbedding)
LLAMA3_ROPE_THETA = 500000.0
CODE_LLAMA_ROPE_THETA = 1e6
TRAINED_LENGTH_BY_THETA = {LLAMA3_ROPE_THETA: 8192, CODE_LLAMA_ROPE_THETA: 16384}
_MADV_DONTNEED = 4
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
# Meta's `use_scaled_rope` applies Llama 3.1's scaling with these constants, fixed in its code.
META_ROPE_SCALING = RopeScaling()


def is_meta(path: Path) -> bool:
    return (path / PARAMS_FILE).is_file() and bool(_shard_files(path))


def _torch():
    try:
        import torch
    except ImportError:
        raise ConversionError("the Meta format needs PyTorch: pip install 'llama-jax[meta]'") from None
    return torch


def embedding_split_dim(config: ModelConfig, choice: str = "auto") -> int:
    """0 (vocab, Llama 3) or 1 (dim, Llama 2) for the token embedding's model-parallel split.

    'auto' takes Llama 3's layout when the config looks like Llama 3: its 128K vocabulary, its rope theta of
    500000, or Llama 3.1's scaled rope. Everything else (Llama 2, Code Llama with theta 1e6) gets Llama 2's layout.
    """
    if choice == "auto":
        llama3 = (config.vocab_size >= 128000 or config.rope_theta == LLAMA3_ROPE_THETA
                  or config.rope_scaling is not None)
        return EMBEDDING_SPLITS["vocab" if llama3 else "dim"]
    if choice not in EMBEDDING_SPLITS:
        raise ConversionError(f"meta embedding split {choice!r} is not known: expected 'auto', 'vocab' (Llama 3) "
                              f"or 'dim' (Llama 2)")
    return EMBEDDING_SPLITS[choice]


# ── params.json ↔ ModelConfig ──────────────────────────────────────────────────────────────────────────────────
def config_from_params(raw: dict[str, Any], vocab_size: int, tied: bool, where: Path) -> ModelConfig:
    """Our config from Meta's params.json (vocab_size given separately: old Llama 2 files say -1)."""
    try:
        fields = dict(dim=int(raw["dim"]), n_layers=int(raw["n_layers"]), n_heads=int(raw["n_heads"]))
    except KeyError as missing:
        raise ConversionError(f"{where} lacks {missing}, which Meta's params.json always has") from None
    kv_heads = raw.get("n_kv_heads")
    scaled = bool(raw.get("use_scaled_rope", False))
    theta = float(raw.get("rope_theta") or 10000.0)  # Llama 2's params.json has none: its code fixes 10000
    # Context length is not in params.json; these are the families' trained lengths (a serving default only): Llama
    # 3.1 (scaled rope), Llama 3 (theta 500000), Code Llama (theta 1e6, trained on 16K-token sequences), else Llama 2.
    max_seq_len = 131072 if scaled else TRAINED_LENGTH_BY_THETA.get(theta, 4096)
    fields.update(vocab_size=vocab_size, n_kv_heads=None if kv_heads in (None, fields["n_heads"]) else int(kv_heads),
                  multiple_of=int(raw.get("multiple_of", 256)), ffn_dim_multiplier=raw.get("ffn_dim_multiplier"),
                  norm_eps=float(raw.get("norm_eps", 1e-5)), rope_theta=theta,
                  rope_scaling=dataclasses.asdict(META_ROPE_SCALING) if scaled else None,
                  max_seq_len=max_seq_len, tie_embeddings=tied)
    return config_from_mapping(fields, where)


def params_json(config: ModelConfig) -> dict[str, Any]:
    """Meta's params.json for `config`; an explicit ffn width is expressed through multiple_of/ffn_dim_multiplier."""
    if config.rope_scaling not in (None, META_ROPE_SCALING):
        raise ConversionError(f"rope scaling {config.rope_scaling} cannot be written to params.json: Meta's "
                              f"use_scaled_rope fixes it to {META_ROPE_SCALING}")
    multiple_of, multiplier = _ffn_rule(config)
    return {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
            "n_kv_heads": config.kv_heads, "vocab_size": config.vocab_size, "multiple_of": multiple_of,
            "ffn_dim_multiplier": multiplier, "norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
            "use_scaled_rope": config.rope_scaling is not None}


def _ffn_rule(config: ModelConfig) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's width rule gives config.hidden_dim."""
    if config.ffn_hidden_dim is None:
        return config.multiple_of, config.ffn_dim_multiplier
    target = config.ffn_hidden_dim
    derived = int(2 * (4 * config.dim) / 3)
    # First the config's own, then the published models' values (so a Hugging Face Llama gets back the params.json
    # Meta shipped), then a rule that always works: rounding up to multiple_of=target gives exactly target from any
    # width in (0, target].
    candidates = [(config.multiple_of, config.ffn_dim_multiplier), *PUBLISHED_FFN_RULES, (target, None)]
    if derived > target:
        candidates += [(target, target / derived), (target, (target - 0.5) / derived)]
    for multiple_of, multiplier in candidates:
        probe = dataclasses.replace(config, ffn_hidden_dim=None, multiple_of=multiple_of,
                                    ffn_dim_multiplier=multiplier)
        if probe.hidden_dim == target:
            return multiple_of, multiplier
    raise ConversionError(f"ffn width {target} cannot be expressed through Meta's multiple_of/ffn_dim_multiplier "
                          f"for dim={config.dim}")


# ── Reading ─────────────────────────────────────────────────────────────────────────────────────────────────────
def _shard_files(path: Path) -> list[Path]:
    return sorted((file for file in path.glob("consolidated.*.pth") if SHARD_PATTERN.fullmatch(file.name)),
                  key=lambda file: int(SHARD_PATTERN.fullmatch(file.name).group(1)))


def _load_shard(file: Path) -> dict[str, Any]:
    torch = _torch()
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # torch reports a truncated zip, a bad pickle, etc. with many exception types
        refused = _REFUSED_GLOBAL.search(str(error))
        if refused:  # torch's weights-only unpickler met a function or class: the file could run code if loaded
            raise ConversionError(f"{file} contains objects other than tensors ({refused.group(1)}), so it was "
                                  f"refused for safety (loading them could run code): a Meta checkpoint holds "
                                  f"only tensors; use the files of the original download") from None
        raise ConversionError(f"{file} is not a readable PyTorch checkpoint (truncated or damaged?): "
                              f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    if not isinstance(state, dict):
        raise ConversionError(f"{file} does not hold a dict of tensors")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{file} holds {name!r} of type {type(value).__name__}, not a tensor: a Meta "
                                  f"checkpoint holds only tensors")
    return state


def _release_pages(tensor: Any) -> None:
    """Drop the memory-mapped file pages behind `tensor` from this process's resident set.

    torch.load(mmap=True) maps each file privately and read-only in practice; pages read once stay resident (and
    count as this process's memory) until unmapped. Once a tensor has been copied out they are not needed, and
    MADV_DONTNEED on clean private file pages only means a later access reads them from the file again.
    """
    if _LIBC is None:
        return
    storage = tensor.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    first_page = start - start % mmap.PAGESIZE
    end = start + size
    # Whole pages strictly inside the tensor only, so a neighbour's shared page is never touched.
    first_page = first_page if first_page == start else first_page + mmap.PAGESIZE
    length = (end - first_page) // mmap.PAGESIZE * mmap.PAGESIZE
    if length > 0:
        _LIBC.madvise(ctypes.c_void_p(first_page), ctypes.c_size_t(length), _MADV_DONTNEED)


def numpy_dtype(torch_dtype: Any) -> np.dtype:
    torch = _torch()
    dtypes = {torch.float32: np.dtype(np.float32), torch.bfloat16: BFLOAT16, torch.float16: np.dtype(np.float16)}
    if torch_dtype not in dtypes:
        raise ConversionError(f"tensor dtype {torch_dtype} is not supported (float32, bfloat16, float16)")
    return dtypes[torch_dtype]


def to_numpy(tensor: Any) -> np.ndarray:
    torch = _torch()
    if numpy_dtype(tensor.dtype) == BFLOAT16:  # numpy has no bfloat16; reinterpret the bits as ml_dtypes' bfloat16
        return tensor.view(torch.int16).numpy().view(BFLOAT16)
    return tensor.numpy()


def from_numpy(array: np.ndarray) -> Any:
    torch = _torch()
    array = np.ascontiguousarray(array)
    if array.dtype == BFLOAT16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


class MetaSource(ExternalSource):
    """A Meta folder; each tensor is merged from its shards when it is read (the shards stay memory-mapped)."""

    def __init__(self, path: Path):
        files = _shard_files(path)
        raw = read_json_object(path / PARAMS_FILE)
        self._shards = [_load_shard(file) for file in files]
        self._files = files
        _check_all_shards_present(path, files, self._shards[0])
        names = list(self._shards[0])
        for file, shard in zip(files[1:], self._shards[1:]):
            if set(shard) != set(names):
                differ = sorted(set(shard) ^ set(names))
                raise ConversionError(f"{file.name} and {files[0].name} hold different tensors: {differ[:6]}")
        if EMBEDDING not in self._shards[0]:
            raise ConversionError(f"{files[0]} has no {EMBEDDING}")
        self._split: dict[str, int | None] = {EMBEDDING: self._embedding_split(int(raw.get("dim", 0)))}
        embedding_shape = self._merged_shape(EMBEDDING)
        vocab = int(raw.get("vocab_size", -1))
        vocab = embedding_shape[0] if vocab <= 0 else vocab
        config = config_from_params(raw, vocab, tied=OUTPUT not in self._shards[0], where=path / PARAMS_FILE)
        mappings = meta_mappings(config)
        for mapping in mappings:
            if mapping.theirs != EMBEDDING:
                self._split[mapping.theirs] = SPLIT_DIMS[mapping.ours]
        expected = {mapping.theirs: mapping.their_shape for mapping in mappings}
        found = {name: self._merged_shape(name) if name in self._split else tuple(self._shards[0][name].shape)
                 for name in names}
        found = {name: shape for name, shape in found.items() if not name.endswith("rope.freqs")}
        described = f"{path / PARAMS_FILE} ({describe(config)})"
        check_names(expected, found, what=f"tensors in {path}", described=described)
        check_shapes(expected, found, config, described)
        super().__init__(config, mappings)
        self.check_dtypes()
        self.dtype = self.external_dtype(EMBEDDING)
        self.embedding_split = self._split[EMBEDDING]
        # params.json names no dtype: compute in the one the weights are stored in (Meta ships bfloat16).
        self.config = dataclasses.replace(config, dtype=compute_dtype(None, self.dtype))

    def external_dtype(self, name: str) -> np.dtype:
        return numpy_dtype(self._shards[0][name].dtype)

    def _embedding_split(self, params_dim: int) -> int | None:
        """Llama 2 files cut the embedding's columns, Llama 3 files its rows: tell which from the shapes.

        The model's dim is read from the (replicated) final norm, so a params.json that contradicts the weights is
        reported against the embedding's true shape.
        """
        if len(self._shards) == 1:
            return None
        first = self._shards[0]
        dim = first[FINAL_NORM].shape[0] if FINAL_NORM in first and first[FINAL_NORM].ndim == 1 else params_dim
        return 0 if first[EMBEDDING].shape[1] == dim else 1

    def _merged_shape(self, name: str) -> tuple[int, ...]:
        shapes = [tuple(shard[name].shape) for shard in self._shards]
        axis = self._split.get(name)
        if axis is None or len(shapes) == 1:
            if any(shape != shapes[0] for shape in shapes):
                raise ConversionError(f"tensor {name} should be replicated but has shapes {shapes} in the shards")
            return shapes[0]
        merged = list(shapes[0])
        merged[axis] = sum(shape[axis] for shape in shapes)
        for file, shape in zip(self._files, shapes):
            if len(shape) != 2 or shape[1 - axis] != shapes[0][1 - axis]:
                raise ConversionError(f"tensor {name} in {file.name} has shape {shape}, which does not join the "
                                      f"other shards' {shapes[0]} along dim {axis}")
        return tuple(merged)

    def read_external(self, name: str) -> np.ndarray:
        pieces = [shard[name] for shard in self._shards]
        axis = self._split.get(name)
        if axis is None or len(pieces) == 1:
            first = to_numpy(pieces[0]).copy()
            for file, piece in zip(self._files[1:], pieces[1:]):
                if not np.array_equal(to_numpy(piece), first):
                    raise ConversionError(f"tensor {name} should be the same in every shard but differs in "
                                          f"{file.name}")
        else:
            first = np.concatenate([to_numpy(piece) for piece in pieces], axis=axis)
        for piece in pieces:
            _release_pages(piece)
        return first

    def close(self) -> None:
        self._shards = []


def _check_all_shards_present(path: Path, files: list[Path], first: dict[str, Any]) -> None:
    """Name the consolidated.NN.pth files missing from `path`, before their absence shows up as wrong shapes.

    Meta's wq is square (heads × head_dim = dim) and every shard holds an equal slice of its rows, so its shape in
    any one shard gives the number of shards; the numbering of the files present gives a lower bound.
    """
    numbers = [int(SHARD_PATTERN.fullmatch(file.name).group(1)) for file in files]
    count, reason = max(numbers) + 1, ""
    query = first.get(FIRST_QUERY)
    if query is not None and query.ndim == 2 and query.shape[0] and query.shape[1] % query.shape[0] == 0:
        rows, dim = query.shape
        if dim // rows > count:
            count = dim // rows
            reason = f" (each holds {rows} of the {dim} rows of {FIRST_QUERY})"
    missing = [f"consolidated.{number:02d}.pth" for number in range(count) if number not in numbers]
    if missing:
        raise ConversionError(f"{path} lacks {', '.join(missing)}: the checkpoint has {count} model-parallel "
                              f"shards, consolidated.00.pth … consolidated.{count - 1:02d}.pth{reason}; copy the "
                              f"missing file{'s' if len(missing) > 1 else ''} from the original download")


def open_meta(path: Path) -> MetaSource:
    return MetaSource(path)


# ── Writing ─────────────────────────────────────────────────────────────────────────────────────────────────────
def write_meta(source: ParamSource, directory: Path, dtype: np.dtype | None, shards: int,
               embedding_split: str = "auto") -> None:
    """Write a Meta folder with `shards` consolidated.NN.pth files into the existing `directory`, streaming.

    torch.save wants every tensor of a file at once, so each file is first written as a skeleton with torch's
    `skip_data` (the zip layout, pickled tensor metadata and space for every tensor, from untouched `torch.empty`
    tensors), and each tensor's bytes are then written into its record as our parameters are read, a layer at a time.
    """
    torch = _torch()
    config = source.config
    embedding_dim = embedding_split_dim(config, embedding_split)
    _check_divisible(config, shards, embedding_dim)
    (directory / PARAMS_FILE).write_text(json.dumps(params_json(config), indent=2) + "\n")
    # Meta's reference model always has an output layer: a tied head is written as a copy of the embedding.
    plan = [(mapping, embedding_dim if mapping.ours == "embedding" else SPLIT_DIMS[mapping.ours], mapping.theirs)
            for mapping in meta_mappings(config)]
    if config.tie_embeddings:
        plan.append((plan[0][0], SPLIT_DIMS["output"], OUTPUT))
    dtypes = {name: dtype if dtype is not None else source.dtype_of(mapping.ours) for mapping, _, name in plan}
    files = [directory / f"consolidated.{rank:02d}.pth" for rank in range(shards)]
    for file in files:
        skeleton = {name: torch.empty(_piece_shape(mapping.their_shape, axis, shards),
                                      dtype=from_numpy(np.zeros(1, dtypes[name])).dtype)
                    for mapping, axis, name in plan}
        with torch.serialization.skip_data():
            torch.save(skeleton, file)
        del skeleton
    records = [_TorchZipRecords(file, [name for _, _, name in plan]) for file in files]
    try:
        for mapping, axis, theirs in plan:
            value = (source.read(mapping.ours) if mapping.layer is None
                     else source.read_layer(mapping.ours, mapping.layer))
            tensor = cast(mapping.to_theirs(value), dtypes[theirs])
            for rank, piece in enumerate(_cut(tensor, axis, shards)):
                records[rank].fill(theirs, piece)
        for file_records in records:
            file_records.finish()
    finally:
        for file_records in records:
            file_records.close()


def _piece_shape(shape: tuple[int, ...], axis: int | None, shards: int) -> tuple[int, ...]:
    if axis is None:
        return shape
    return tuple(size // shards if dim == axis else size for dim, size in enumerate(shape))


class _TorchZipRecords:
    """The tensor records of a zip written by torch.save, to be filled in place (with their CRC-32s).

    torch stores each tensor's bytes uncompressed in a record `<archive>/data/<key>`, keys numbered in the order
    tensors are pickled (the dict's order). A record's CRC-32 appears three times: in its local header, in the data
    descriptor after it, and in the central directory; all three are written once the bytes are in.
    """

    _LOCAL, _CENTRAL, _DESCRIPTOR = 0x04034B50, 0x02014B50, 0x08074B50

    def __init__(self, path: Path, names: list[str]):
        self.path = path
        with zipfile.ZipFile(path) as archive:
            infos, central_start = archive.infolist(), archive.start_dir
        self._descriptor = os.open(path, os.O_RDWR)
        central_crc = self._central_crc_positions(infos, central_start)
        by_key = {info.filename.rsplit("/data/", 1)[1]: info for info in infos if "/data/" in info.filename}
        if sorted(by_key, key=int) != [str(i) for i in range(len(names))]:
            raise ConversionError(f"{path}: torch.save wrote records {sorted(by_key)} for {len(names)} tensors")
        self._records: dict[str, tuple[int, int, list[int]]] = {}
        for key, name in enumerate(names):
            info = by_key[str(key)]
            local = os.pread(self._descriptor, 30, info.header_offset)
            if int.from_bytes(local[:4], "little") != self._LOCAL or info.compress_type != zipfile.ZIP_STORED:
                raise ConversionError(f"{path}: record {info.filename} is not a stored zip entry")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_length + extra_length
            crc_positions = [info.header_offset + 14, central_crc[info.filename]]
            if info.flag_bits & 0x08:  # a data descriptor follows the data, with or without its signature
                signature = os.pread(self._descriptor, 4, start + info.file_size)
                has_signature = int.from_bytes(signature, "little") == self._DESCRIPTOR
                crc_positions.append(start + info.file_size + (4 if has_signature else 0))
            self._records[name] = (start, info.file_size, crc_positions)
        self._filled: set[str] = set()

    def _central_crc_positions(self, infos: list[zipfile.ZipInfo], position: int) -> dict[str, int]:
        positions = {}
        for info in infos:  # the central directory lists entries in infolist() order
            header = os.pread(self._descriptor, 46, position)
            if int.from_bytes(header[:4], "little") != self._CENTRAL:
                raise ConversionError(f"{self.path}: unexpected zip central directory layout")
            positions[info.filename] = position + 16
            name_length, extra_length, comment_length = struct.unpack("<HHH", header[28:34])
            position += 46 + name_length + extra_length + comment_length
        return positions

    def fill(self, name: str, array: np.ndarray) -> None:
        start, size, crc_positions = self._records[name]
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        if data.nbytes != size:
            raise ConversionError(f"{self.path}: tensor {name} has {data.nbytes} bytes, its record {size}")
        view, position = memoryview(data), start
        while len(view):
            written = os.pwrite(self._descriptor, view, position)
            view, position = view[written:], position + written
        crc = struct.pack("<I", zlib.crc32(data))
        for crc_position in crc_positions:
            os.pwrite(self._descriptor, crc, crc_position)
        self._filled.add(name)

    def finish(self) -> None:
        unfilled = [name for name in self._records if name not in self._filled]
        if unfilled:
            raise ConversionError(f"{self.path}: tensors {unfilled[:6]} were never written")
        os.fsync(self._descriptor)

    def close(self) -> None:
        os.close(self._descriptor)


def _cut(tensor: np.ndarray, axis: int | None, shards: int) -> list[np.ndarray]:
    if axis is None or shards == 1:
        return [np.ascontiguousarray(tensor)] * shards
    # Contiguous copies: torch.save of a view would store the whole underlying tensor in every file.
    return [np.ascontiguousarray(piece) for piece in np.split(tensor, shards, axis=axis)]


def _check_divisible(config: ModelConfig, shards: int, embedding_dim: int) -> None:
    if shards < 1:
        raise ConversionError(f"shards={shards}: expected a positive number of model-parallel shards")
    sizes = {"n_heads": config.n_heads, "n_kv_heads": config.kv_heads, "ffn hidden": config.hidden_dim,
             "vocab_size": config.vocab_size, "dim" if embedding_dim == 1 else "vocab_size (embedding rows)":
             config.dim if embedding_dim == 1 else config.vocab_size}
    for what, size in sizes.items():
        if size % shards:
            raise ConversionError(f"cannot cut into {shards} model-parallel shards: {what}={size} is not divisible "
                                  f"by {shards}")
