"""Token store and packed, deterministic, resumable pretraining batches.

Token store
-----------
Sources (text files, JSON lines — plain, gzip'd or zstd-compressed — and Parquet files with a text field or
column, directories or globs of them; `llama_jax.documents` reads each record by record) are
tokenized once into a directory holding two TensorStore zarr3 arrays, chunked and zstd-compressed:

    tokens    1-D, every document's tokens back to back (uint16 if the vocabulary fits, else uint32);
              no BOS/EOS are stored, packing adds them
    offsets   1-D int64, num_documents + 1 entries; document i is tokens[offsets[i]:offsets[i+1]]
    manifest.json   format version, tokenizer fingerprint and ids, each source's path, size and
                    mtime, the fill-in-the-middle settings (null: none), token and document counts

`build_store` reuses an existing store only if its manifest names the same sources (same sizes and
mtimes), the same tokenizer fingerprint and the same FIM settings; otherwise it rebuilds. A half-written
store is never used: a local store is built in a hidden sibling directory and renamed into place when complete;
a store at an object-store URL (e.g. "gs://bucket/corpus") has its manifest deleted first and
written last, and a store without a manifest is never opened.

Packing (what batch k contains)
-------------------------------
Each document is framed as [BOS] + tokens + [EOS]. Epoch e lays all documents out in an order
fixed by (seed, e) — a sort by a 64-bit hash of (seed, e, document index), so it depends on
nothing but integers — and concatenates them into a virtual token stream. Epochs follow one
another, so the stream is infinite. Window w is stream[w*seq_len : (w+1)*seq_len + 1]: seq_len
inputs plus one more token for the last target, so consecutive windows share one token and every
stream token is an input exactly once. Row r of step k is window k*global_batch + r.

Batch k is therefore a pure function of (store, seed, k, global_batch, seq_len): a process
computes only its own rows [i*B/P, (i+1)*B/P), and a resumed run (or a run that skips ahead)
sees exactly the batches it would have seen. Documents are split across rows where a window
ends; nothing is dropped and nothing is padded.

Within a row: `segment_ids` number the documents 1, 2, ... (0 would mean padding; packing never
pads), `positions` count from 0 at each document start and also at the row start (a document cut
by a window boundary continues at position 0: attention cannot see the previous row anyway, and
positions stay below seq_len). `targets` are the inputs shifted by one; `loss_mask` is 0 where the
target belongs to the next document (an EOS input whose target is the next BOS), 1 elsewhere.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import tensorstore as ts

from llama_jax.documents import DEFAULT_TEXT_FIELD, SOURCE_SUFFIXES, read_documents
from llama_jax.errors import DataError
from llama_jax.infilling import FimTransform
from llama_jax.jsonl import is_url, url_path
from llama_jax.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

PathLike = str | os.PathLike[str]

STORE_FORMAT = "llama_jax.token_store/1"
DEFAULT_SEQ_LEN = 4096
MANIFEST_NAME = "manifest.json"
_CHUNK_TOKENS = 1 << 18  # 512 KiB of uint16 per chunk: small enough for cheap random reads
_ENCODE_BATCH_CHARS = 8 << 20  # characters handed to the tokenizer's threads at a time
_PRELOAD_LIMIT_BYTES = 256 << 20  # stores up to this size are read into memory once


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def resolve_sources(sources: PathLike | Sequence[PathLike], suffixes: Sequence[str] = SOURCE_SUFFIXES) -> list[Path]:
    """Expand files, directories (their files with one of `suffixes`, recursively) and globs into a sorted file
    list. An entry may be an object-store URL ("s3://bucket/corpus/*.jsonl.zst", "gs://bucket/fineweb/",
    "https://host/file.parquet", "memory://..."): it expands the same way, through fsspec, into `upath.UPath`s,
    which the readers and the store manifest take as they take the pathlib.Paths of local entries."""
    entries = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    files: list[Path] = []
    for entry in entries:
        files.extend(_expand_source(entry if _is_url_path(entry) else str(entry), suffixes))
    unique = list(dict.fromkeys(path if _is_url_path(path) else path.resolve() for path in files))
    if not unique:
        raise DataError("empty corpus: no source files given")
    return unique


def _is_url_path(entry: object) -> bool:
    """A UPath of a URL (not a local path): what `resolve_sources` returns for URL entries."""
    return not isinstance(entry, (str, os.PathLike)) and hasattr(entry, "protocol")


def _expand_source(entry: str, suffixes: Sequence[str]) -> list[Path]:
    if is_url(entry) or _is_url_path(entry):
        return _expand_url(str(entry), suffixes)
    if glob.has_magic(entry):
        matches = sorted(Path(match) for match in glob.glob(entry, recursive=True) if Path(match).is_file())
        if not matches:
            raise DataError(f"{entry}: pattern matches no files")
        return matches
    path = Path(entry)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(tuple(suffixes)))
        if not found:
            raise DataError(f"{path}: directory has no {' or '.join(suffixes)} files")
        return found
    if not path.is_file():
        raise DataError(f"{path}: no such source file")
    return [path]


def _expand_url(url: str, suffixes: Sequence[str]) -> list:
    """A URL entry as `_expand_source` expands a local one: a glob (`**` recursive) into its files, a folder (prefix)
    into its files with one of `suffixes`, recursively, a file into itself; sorted by URL."""
    base = url_path(url)
    fs = base.fs

    def upath(name: str):
        return type(base)(fs.unstrip_protocol(name), **base.storage_options)

    try:
        if glob.has_magic(url) and base.protocol not in ("http", "https"):  # "?" in an http URL starts its query
            found = fs.glob(url, detail=True)
            matches = sorted(name for name, info in found.items() if info.get("type") == "file")
            if not matches:
                raise DataError(f"{url}: pattern matches no files")
            return [upath(name) for name in matches]
        if fs.isdir(url):
            found = sorted(name for name in fs.find(url) if name.endswith(tuple(suffixes)))
            if not found:
                raise DataError(f"{url}: directory has no {' or '.join(suffixes)} files")
            return [upath(name) for name in found]
        if not fs.isfile(url):
            raise DataError(f"{url}: no such source file")
    except (OSError, ValueError) as error:  # credentials, network, a malformed bucket name
        raise DataError(f"{url}: cannot list source ({error})") from None
    return [base]


SplitPart = Literal["train", "valid"]
SINGLE_TEXT_HELD_OUT_FRACTION = 0.1  # as nanoGPT splits a one-file corpus (shakespeare.txt)
HELD_OUT_RULE = "documents by sha256(text)[:8] % 1000 < 10, at least one; one text: its last 10% from a line start"


def corpus_documents(paths: Sequence[Path], part: SplitPart | None = None,
                     text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[tuple[int, str]]:
    """(source index, text) of every document of `paths`, in order; with `part`, one side of the held-out split.
    `text_field` names the JSON field or Parquet column that holds a record's text.

    The held-out split, for a corpus given without validation files: a document is held out when the first 8 bytes
    of the sha256 of its text, mod 1000, fall below VALIDATION_PER_MILLE — so the split follows the text, not where
    the files live or what they are called — and each side gets at least one document (the one with the smallest
    hash moves). A corpus of one document (or of copies of one text) holds out the last 10% of its characters
    instead, cut where a line starts.
    """
    if part is None:
        for source_index, path in enumerate(paths):
            for text in read_documents(path, text_field):
                yield source_index, text
        return
    held_out = _held_out_digests(paths, text_field)
    for source_index, text in corpus_documents(paths, text_field=text_field):
        if held_out is None:
            kept = _split_one_text(text, paths[source_index])[part == "valid"]
        else:
            kept = text if (_text_digest(text) in held_out) == (part == "valid") else ""
        if kept:
            yield source_index, kept


def _text_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _held_out_digests(paths: Sequence[Path], text_field: str) -> frozenset[bytes] | None:
    """The digests of the held-out documents, or None when the corpus has only one distinct text."""
    digests = {_text_digest(text) for _, text in corpus_documents(paths, text_field=text_field) if text}
    if not digests:
        raise DataError(f"empty corpus: {len(paths)} source file(s) contain no text (first: {paths[0]})")
    if len(digests) == 1:
        return None
    held_out = {digest for digest in digests if _per_mille(digest) < VALIDATION_PER_MILLE}
    if not held_out or held_out == digests:
        smallest = min(digests, key=_per_mille_order)
        held_out = {smallest} if not held_out else held_out - {smallest}
    return frozenset(held_out)


def _per_mille(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "big") % 1000


def _per_mille_order(digest: bytes) -> tuple[int, bytes]:
    return _per_mille(digest), digest


def _split_one_text(text: str, path: Path) -> tuple[str, str]:
    """(training head, held-out tail) of the one text of a corpus: its last 10% of characters, from a line start."""
    if len(text) < 2:
        raise DataError(f"{path}: the corpus is one text of {len(text)} character(s), too little to hold out "
                        "validation text from; give data.valid_path")
    cut = len(text) - max(1, int(len(text) * SINGLE_TEXT_HELD_OUT_FRACTION))
    line_start = text.rfind("\n", 0, cut) + 1
    if line_start > len(text) // 2:  # hold out whole lines, unless that would take half the text
        cut = line_start
    return text[:cut], text[cut:]


def _describe_sources(paths: Sequence[Path]) -> list[dict]:
    """Each source's path (or URL), size and mtime; a URL's also its store's version of the object (ETag,
    generation, modification time, as its filesystem reports one), since some stores report no mtime."""
    described = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError as error:
            raise DataError(f"{path}: cannot read source ({error.strerror or error})") from None
        entry = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if _is_url_path(path):
            entry["version"] = _object_version(stat.as_info())
        described.append(entry)
    return described


_VERSION_KEYS = ("ETag", "etag", "md5Hash", "generation", "version_id", "VersionId", "LastModified", "last_modified",
                 "mtime", "updated", "created")


def _object_version(info: dict) -> str | None:
    """What the object store says identifies this version of the object (first of `_VERSION_KEYS` its fsspec info
    holds)."""
    return next((str(info[key]) for key in _VERSION_KEYS if info.get(key) is not None), None)


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# --------------------------------------------------------------------------------------------
# Where a store lives: a local directory or an object-store URL
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Location:
    """A store's address; local directories get atomic renames, URLs get a manifest-last commit."""

    address: str

    @property
    def is_local(self) -> bool:
        return "://" not in self.address

    @property
    def path(self) -> Path:
        return Path(self.address)

    def kvstore(self, name: str) -> dict | str:
        if self.is_local:
            return {"driver": "file", "path": str(self.path / name)}
        return f"{self.address.rstrip('/')}/{name}/"

    def read_manifest(self) -> dict | None:
        """The manifest, or None when there is none (an unfinished or absent store)."""
        if self.is_local:
            try:
                raw = (self.path / MANIFEST_NAME).read_bytes()
            except FileNotFoundError:
                return None
        else:
            result = self._url_kvstore().read(MANIFEST_NAME).result()
            if result.state != "value":
                return None
            raw = result.value
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError:
            return None
        return manifest if isinstance(manifest, dict) and manifest.get("format") == STORE_FORMAT else None

    def write_manifest(self, manifest: dict) -> None:
        raw = json.dumps(manifest, indent=1).encode()
        if self.is_local:
            with open(self.path / MANIFEST_NAME, "wb") as handle:
                handle.write(raw)
                handle.flush()
                os.fsync(handle.fileno())
        else:
            self._url_kvstore().write(MANIFEST_NAME, raw).result()

    def delete_manifest(self) -> None:
        if self.is_local:
            (self.path / MANIFEST_NAME).unlink(missing_ok=True)
        else:
            self._url_kvstore().write(MANIFEST_NAME, None).result()

    def _url_kvstore(self) -> ts.KvStore:
        return ts.KvStore.open(self.address.rstrip("/") + "/").result()


@contextlib.contextmanager
def _build_lock(location: _Location) -> Iterator[None]:
    """Serialise builders of one local store across processes; URLs rely on manifest-last instead.

    The lock file lives only while a builder holds it, and folders made for it are removed again if the build
    fails, so a rejected source leaves nothing behind. A waiter that wakes on a lock file already unlinked by the
    previous holder tries again on the new one.
    """
    if not location.is_local:
        yield
        return
    parent = location.path.parent
    made = [folder for folder in (parent, *parent.parents) if not folder.exists()]
    lock_path = parent / f".{location.path.name}.lock"
    while True:
        parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(lock_path, "a")
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock_path).st_ino == os.fstat(lock_file.fileno()).st_ino:
                break
        lock_file.close()
    built = False
    try:
        yield
        built = True
    finally:
        lock_path.unlink(missing_ok=True)  # while still held, so no waiter can take the old file
        lock_file.close()
        for folder in [] if built else made:  # innermost first; a folder someone else filled meanwhile stays
            with contextlib.suppress(OSError):
                folder.rmdir()


# --------------------------------------------------------------------------------------------
# Building a store
# --------------------------------------------------------------------------------------------


class _ArrayAppender:
    """A growing 1-D zarr3 array written in large contiguous pieces."""

    def __init__(self, kvstore: dict | str, dtype: np.dtype, flush_items: int = 16 * _CHUNK_TOKENS):
        metadata = {
            "shape": [0],
            "data_type": dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [_CHUNK_TOKENS]}},
            "codecs": [
                {"name": "bytes", "configuration": {"endian": "little"}},
                {"name": "zstd", "configuration": {"level": 3}},
            ],
        }
        spec = {"driver": "zarr3", "kvstore": kvstore, "metadata": metadata}
        self._array = ts.open(spec, create=True, delete_existing=True).result()
        self._dtype = dtype
        self._flush_items = flush_items
        self._pending: list[np.ndarray] = []
        self._pending_items = 0
        self.length = 0

    def append(self, values: np.ndarray) -> None:
        self._pending.append(values.astype(self._dtype, copy=False))
        self._pending_items += len(values)
        if self._pending_items >= self._flush_items:
            self.flush()

    def flush(self) -> None:
        if not self._pending_items:
            return
        values = np.concatenate(self._pending)
        end = self.length + len(values)
        self._array = self._array.resize(exclusive_max=[end], expand_only=True).result()
        self._array[self.length : end].write(values).result()
        self.length = end
        self._pending, self._pending_items = [], 0


def _encoded_batches(paths: Sequence[Path], tokenizer: Tokenizer, part: SplitPart | None,
                     text_field: str) -> Iterator[tuple[list[int], list[list[int]]]]:
    """(source index of each document, token ids of each document as an array), in batches the tokenizer runs on its
    threads."""
    batch_sources: list[int] = []
    batch_texts: list[str] = []
    batch_chars = 0
    for source_index, text in corpus_documents(paths, part, text_field):
        batch_sources.append(source_index)
        batch_texts.append(text)
        batch_chars += len(text)
        if batch_chars >= _ENCODE_BATCH_CHARS:
            yield batch_sources, tokenizer.encode_batch_arrays(batch_texts)
            batch_sources, batch_texts, batch_chars = [], [], 0
    if batch_texts:
        yield batch_sources, tokenizer.encode_batch_arrays(batch_texts)


def _write_arrays(location: _Location, paths: Sequence[Path], tokenizer: Tokenizer, part: SplitPart | None,
                  text_field: str) -> dict:
    """Tokenize every source into tokens/offsets arrays at `location`; returns the counts for the manifest.

    Documents that tokenize to nothing (empty texts) are left out: framed, they would be a bare BOS EOS.
    """
    tokens = _ArrayAppender(location.kvstore("tokens"), _token_dtype(tokenizer.vocab_size))
    offsets = _ArrayAppender(location.kvstore("offsets"), np.dtype(np.int64))
    offsets.append(np.zeros(1, np.int64))
    documents_per_source = np.zeros(len(paths), np.int64)
    num_tokens = 0
    for sources, encoded in _encoded_batches(paths, tokenizer, part, text_field):
        kept = [index for index, ids in enumerate(encoded) if len(ids)]
        if not kept:
            continue
        lengths = np.array([len(encoded[index]) for index in kept], np.int64)
        tokens.append(np.concatenate([encoded[index] for index in kept]).astype(np.int64))
        offsets.append(num_tokens + np.cumsum(lengths))
        num_tokens += int(lengths.sum())
        np.add.at(documents_per_source, np.array([sources[index] for index in kept]), 1)
    tokens.flush()
    offsets.flush()
    if num_tokens == 0:
        raise DataError(f"empty corpus: {len(paths)} source file(s) contain no text (first: {paths[0]})")
    return {
        "num_tokens": num_tokens,
        "num_documents": int(documents_per_source.sum()),
        "documents_per_source": documents_per_source.tolist(),
    }


def _inputs_manifest(paths: Sequence[Path], tokenizer: Tokenizer, part: SplitPart | None, text_field: str) -> dict:
    """The part of the manifest that decides whether a store is still valid."""
    return {
        "format": STORE_FORMAT,
        "tokenizer": {
            "fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
        },
        "token_dtype": _token_dtype(tokenizer.vocab_size).name,
        "sources": _describe_sources(paths),
        "text_field": text_field,
        "held_out_split": None if part is None else {"part": part, "rule": HELD_OUT_RULE},
    }


def _same_inputs(manifest: dict, expected: dict) -> bool:
    return all(manifest.get(key) == value for key, value in expected.items())


def build_store(
    sources: PathLike | Sequence[PathLike],
    tokenizer: Tokenizer,
    out_dir: PathLike,
    *,
    force: bool = False,
    part: SplitPart | None = None,
    fim: FimTransform | None = None,
    text_field: str = DEFAULT_TEXT_FIELD,
) -> TokenStore:
    """Tokenize `sources` into a token store at `out_dir` (local path or URL), unless an up-to-date one is there.

    part: 'train' or 'valid' to store one side of the corpus's held-out split (`corpus_documents`), None for all.
    fim: store documents fill-in-the-middle transformed (`llama_jax.infilling`); the manifest records the settings.
    text_field: the JSON field or Parquet column holding each record's text (`llama_jax.documents`).
    """
    paths = resolve_sources(sources)
    expected = {**_inputs_manifest(paths, tokenizer, part, text_field),
                "fim": None if fim is None else fim.manifest()}
    writer = tokenizer if fim is None else fim.encoder(tokenizer)  # what encodes the documents
    location = _Location(str(out_dir))
    with _build_lock(location):
        existing = location.read_manifest()
        if existing is not None and _same_inputs(existing, expected) and not force:
            with contextlib.suppress(DataError):  # a damaged store is rebuilt below
                return TokenStore.open(out_dir)
        if location.is_local:
            _build_local(location, paths, writer, expected, part)
        else:
            _build_at_url(location, paths, writer, expected, part)
    return TokenStore.open(out_dir)


def _build_local(location: _Location, paths: Sequence[Path], tokenizer: Tokenizer, expected: dict,
                 part: SplitPart | None) -> None:
    _staged_swap(location, lambda staging: _write_arrays(staging, paths, tokenizer, part, expected["text_field"]),
                 expected)


def _staged_swap(location: _Location, write: Callable[[_Location], dict], expected: dict) -> None:
    """`write` the arrays into a hidden sibling directory (it returns the manifest's counts), then swap it in: the
    store path only ever holds complete stores. The caller holds the build lock."""
    parent, name = location.path.parent, location.path.name
    for leftover in parent.glob(f".{name}.building-*"):  # from builders that crashed; we hold the lock
        shutil.rmtree(leftover, ignore_errors=True)
    staging = _Location(str(parent / f".{name}.building-{uuid.uuid4().hex}"))
    try:
        staging.path.mkdir(parents=True)
        counts = write(staging)
        staging.write_manifest({**expected, **counts})
        retired = parent / f".{name}.old-{uuid.uuid4().hex}"
        if location.path.exists():
            os.rename(location.path, retired)
        os.rename(staging.path, location.path)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging.path, ignore_errors=True)


def _build_at_url(location: _Location, paths: Sequence[Path], tokenizer: Tokenizer, expected: dict,
                  part: SplitPart | None) -> None:
    """Object stores have no rename: un-commit (delete the manifest), write arrays, commit (write the manifest)."""
    location.delete_manifest()
    counts = _write_arrays(location, paths, tokenizer, part, expected["text_field"])
    location.write_manifest({**expected, **counts})


# --------------------------------------------------------------------------------------------
# Reading a store
# --------------------------------------------------------------------------------------------


def _zarr3_spec(location: _Location, name: str) -> dict:
    return {"driver": "zarr3", "kvstore": location.kvstore(name)}


@dataclasses.dataclass(frozen=True)
class _EpochLayout:
    """Documents in one epoch's order and where each one's framed copy ends in the epoch's stream."""

    order: np.ndarray  # document indices
    ends: np.ndarray  # cumulative framed lengths (BOS + tokens + EOS), in `order`


def _mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a fixed, well-mixed bijection of uint64 (numpy wraps on overflow)."""
    x = values.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def epoch_document_order(num_documents: int, seed: int, epoch: int) -> np.ndarray:
    """The document order of one epoch: a permutation that depends only on (seed, epoch), not on library versions."""
    key = _mix64(np.array([seed % (1 << 64)], np.uint64))
    key = _mix64(key ^ np.array([epoch % (1 << 64)], np.uint64))
    hashes = _mix64(np.arange(num_documents, dtype=np.uint64) ^ key)
    return np.argsort(hashes, kind="stable")


class TokenStore:
    """A finished token store, opened for reading. Use `TokenStore.open(path)` or `build_store(...)`."""

    def __init__(self, address: str, manifest: dict, tokens: ts.TensorStore, offsets: np.ndarray, preload: bool):
        self.address = address
        self.manifest = manifest
        self.vocab_size: int = manifest["tokenizer"]["vocab_size"]
        self.bos_id: int = manifest["tokenizer"]["bos_id"]
        self.eos_id: int = manifest["tokenizer"]["eos_id"]
        self.offsets = offsets
        self.document_lengths = np.diff(offsets)
        self._tokens = tokens
        self._tokens_in_memory = tokens.read().result() if preload else None
        self._layouts: dict[tuple[int, int], _EpochLayout] = {}

    @classmethod
    def open(
        cls,
        path: PathLike,
        *,
        expected_fingerprint: str | None = None,
        preload_limit_bytes: int = _PRELOAD_LIMIT_BYTES,
    ) -> TokenStore:
        """Open a complete store; DataError if it is missing, unfinished, inconsistent or for another tokenizer."""
        location = _Location(str(path))
        manifest = location.read_manifest()
        if manifest is None:
            raise DataError(f"{path}: no finished token store here (missing or unreadable {MANIFEST_NAME})")
        fingerprint = manifest["tokenizer"]["fingerprint"]
        if expected_fingerprint is not None and fingerprint != expected_fingerprint:
            raise DataError(
                f"{path}: token store was built with tokenizer {fingerprint[:12]}, not {expected_fingerprint[:12]}"
            )
        context = ts.Context({"cache_pool": {"total_bytes_limit": 64 << 20}})
        try:
            tokens = ts.open(_zarr3_spec(location, "tokens"), read=True, context=context).result()
            offsets = ts.open(_zarr3_spec(location, "offsets"), read=True).result().read().result()
        except ValueError as error:
            raise DataError(f"{path}: token store arrays are unreadable ({error})") from error
        num_tokens, num_documents = manifest["num_tokens"], manifest["num_documents"]
        if tokens.shape != (num_tokens,) or offsets.shape != (num_documents + 1,) or offsets[-1] != num_tokens:
            raise DataError(f"{path}: token store arrays do not match its manifest (incomplete or corrupt store)")
        preload = num_tokens * tokens.dtype.numpy_dtype.itemsize <= preload_limit_bytes
        return cls(str(path), manifest, tokens, offsets, preload)

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    @property
    def num_documents(self) -> int:
        return int(self.manifest["num_documents"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def tokens_per_epoch(self) -> int:
        """Length of one epoch of the packed stream: every document plus its BOS and EOS."""
        return self.num_tokens + 2 * self.num_documents

    def read_tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the flat array (no BOS/EOS), checked against the vocabulary."""
        return self._read_ranges(np.array([start]), np.array([stop]))

    def document(self, index: int) -> np.ndarray:
        """The tokens of document `index` in storage order (no BOS/EOS)."""
        return self.read_tokens(int(self.offsets[index]), int(self.offsets[index + 1]))

    def _read_ranges(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Concatenated token ranges; contiguous reads, issued together so TensorStore overlaps them."""
        if self._tokens_in_memory is not None:
            pieces = [self._tokens_in_memory[a:b] for a, b in zip(starts.tolist(), stops.tolist())]
        else:
            futures = [self._tokens[a:b].read() for a, b in zip(starts.tolist(), stops.tolist()) if b > a]
            pieces = [future.result() for future in futures]
        values = np.concatenate(pieces) if pieces else np.zeros(0, self._tokens.dtype.numpy_dtype)
        self._check_vocabulary(values, starts, stops)
        return values

    def _check_vocabulary(self, values: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> None:
        if not values.size or int(values.max()) < self.vocab_size:
            return
        flat_index = int(np.argmax(values >= self.vocab_size))
        lengths = np.maximum(stops - starts, 0)
        piece = int(np.searchsorted(np.cumsum(lengths), flat_index, side="right"))
        position = int(starts[piece]) + flat_index - int(lengths[:piece].sum())
        raise DataError(
            f"{self.address}: token id {int(values[flat_index])} at token index {position} is outside "
            f"the vocabulary (size {self.vocab_size}); the store is corrupt or from another tokenizer"
        )

    def epoch_layout(self, seed: int, epoch: int) -> _EpochLayout:
        """Cached: computing an order costs a sort over all documents."""
        key = (seed, epoch)
        if key not in self._layouts:
            if len(self._layouts) >= 4:
                self._layouts.pop(next(iter(self._layouts)))
            order = epoch_document_order(self.num_documents, seed, epoch)
            self._layouts[key] = _EpochLayout(order, np.cumsum(self.document_lengths[order] + 2))
        return self._layouts[key]


# --------------------------------------------------------------------------------------------
# Packed batches
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Pieces:
    """A window as consecutive pieces of framed documents: framed positions [start, stop) of `document`."""

    document: np.ndarray
    start: np.ndarray
    stop: np.ndarray


def _window_pieces(store: TokenStore, seed: int, stream_start: int, length: int) -> _Pieces:
    """Which framed documents cover stream[stream_start : stream_start + length], crossing epochs if needed."""
    documents, starts, stops = [], [], []
    position, end = stream_start, stream_start + length
    while position < end:
        epoch, local_start = divmod(position, store.tokens_per_epoch)
        local_stop = min(local_start + end - position, store.tokens_per_epoch)
        layout = store.epoch_layout(seed, epoch)
        first = int(np.searchsorted(layout.ends, local_start, side="right"))
        last = int(np.searchsorted(layout.ends, local_stop - 1, side="right"))
        slots = np.arange(first, last + 1)
        slot_ends = layout.ends[slots]
        slot_starts = slot_ends - (store.document_lengths[layout.order[slots]] + 2)
        documents.append(layout.order[slots])
        starts.append(np.maximum(slot_starts, local_start) - slot_starts)
        stops.append(np.minimum(slot_ends, local_stop) - slot_starts)
        position += local_stop - local_start
    return _Pieces(np.concatenate(documents), np.concatenate(starts), np.concatenate(stops))


def _assemble_window(store: TokenStore, pieces: _Pieces) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, segment ids, positions) of one window from its pieces."""
    lengths = pieces.stop - pieces.start
    segment = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)
    piece_offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = (np.arange(int(lengths.sum())) - piece_offsets).astype(np.int32)
    framed = positions + np.repeat(pieces.start, lengths)  # 0 = BOS, 1..L = tokens, L + 1 = EOS
    document_length = np.repeat(store.document_lengths[pieces.document], lengths)
    tokens = np.empty(len(framed), np.int32)
    is_bos, is_eos = framed == 0, framed == document_length + 1
    tokens[is_bos] = store.bos_id
    tokens[is_eos] = store.eos_id
    # Stored tokens are the framed positions 1..L, i.e. tokens[offset + max(start,1) - 1 : offset + min(stop, L+1) - 1].
    document_offsets = store.offsets[pieces.document]
    read_starts = document_offsets + np.maximum(pieces.start, 1) - 1
    read_stops = document_offsets + np.minimum(pieces.stop, store.document_lengths[pieces.document] + 1) - 1
    tokens[~(is_bos | is_eos)] = store._read_ranges(read_starts, np.maximum(read_stops, read_starts))
    return tokens, segment, positions


class Mixture:
    """Several token stores drawn by weight, as Llama 3 tuned its data mix: window w of the run's stream comes from
    one source's own packed stream, so every source keeps the store's guarantees (no document dropped or padded,
    epochs by (seed, epoch) order) and batch k stays a pure function of (stores, weights, seed, k).

    Windows are dealt in blocks of MIX_BLOCK_WINDOWS: a block gives each source its share of the windows, rounded by
    largest remainder (so the mix drawn over any whole block is the configured one to within one window), in an
    order fixed by (seed, block). Where window w comes from, and which window of that source's stream it is, is
    computed from its block alone: any step can be produced without replaying the ones before it.
    """

    def __init__(self, names: Sequence[str], stores: Sequence[TokenStore], weights: Sequence[float]):
        if not (len(names) == len(stores) == len(weights)) or not names:
            raise DataError("a mixture needs one name, store and weight per source, and at least one source")
        for name, weight in zip(names, weights):
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
                raise DataError(f"mixture source {name!r}: weight {weight!r} is not a positive number")
        fingerprints = {store.tokenizer_fingerprint for store in stores}
        if len(fingerprints) > 1:
            raise DataError(f"mixture sources were tokenized with different tokenizers: {sorted(fingerprints)}")
        self.names, self.stores = tuple(names), tuple(stores)
        total = float(sum(weights))
        self.weights = tuple(weight / total for weight in weights)
        self.windows_per_block = _largest_remainder(self.weights, MIX_BLOCK_WINDOWS)
        for name, weight, count in zip(self.names, self.weights, self.windows_per_block):
            if count == 0:
                raise DataError(f"mixture source {name!r}: weight {weight:.2e} of the total is below one window in "
                                f"{MIX_BLOCK_WINDOWS}; raise it or leave the source out")
        self._blocks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        first = stores[0]
        self.vocab_size, self.bos_id, self.eos_id = first.vocab_size, first.bos_id, first.eos_id

    @property
    def num_tokens(self) -> int:
        return sum(store.num_tokens for store in self.stores)

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.stores[0].tokenizer_fingerprint

    def locate(self, seed: int, window: int) -> tuple[int, int]:
        """(source index, window index in that source's own stream) of the run's window `window`."""
        block, slot = divmod(window, MIX_BLOCK_WINDOWS)
        sources, ranks = self._block(seed, block)
        source = int(sources[slot])
        return source, block * self.windows_per_block[source] + int(ranks[slot])

    def windows_drawn(self, seed: int, windows: int) -> np.ndarray:
        """How many of the run's first `windows` windows each source gave: the mix actually drawn."""
        whole_blocks, partial = divmod(windows, MIX_BLOCK_WINDOWS)
        counts = whole_blocks * np.asarray(self.windows_per_block, np.int64)
        if partial:
            counts += np.bincount(self._block(seed, whole_blocks)[0][:partial], minlength=len(self.stores))
        return counts

    def describe_drawn(self, seed: int, windows: int) -> str:
        """One line: each source's share of the first `windows` windows against its configured weight."""
        drawn = self.windows_drawn(seed, windows)
        parts = [f"{name} {count / max(1, windows):.1%} ({count:,} windows; weight {weight:.1%})"
                 for name, count, weight in zip(self.names, drawn.tolist(), self.weights)]
        return f"data mix drawn over {windows:,} windows: " + " · ".join(parts)

    def _block(self, seed: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Per slot of one block: its source, and how many earlier slots of the block that source already had."""
        key = (seed, block)
        if key not in self._blocks:
            if len(self._blocks) >= 4:
                self._blocks.pop(next(iter(self._blocks)))
            order = epoch_document_order(MIX_BLOCK_WINDOWS, seed ^ _MIX_SALT, block)
            sources = np.empty(MIX_BLOCK_WINDOWS, np.int64)
            sources[order] = np.repeat(np.arange(len(self.stores)), self.windows_per_block)
            ranks = np.empty(MIX_BLOCK_WINDOWS, np.int64)
            for source in range(len(self.stores)):
                slots = np.flatnonzero(sources == source)
                ranks[slots] = np.arange(len(slots))
            self._blocks[key] = (sources, ranks)
        return self._blocks[key]


MIX_BLOCK_WINDOWS = 4096
_MIX_SALT = 0x6D69787475726573  # "mixtures": the mixture's deal differs from any store's epoch order


def _largest_remainder(shares: Sequence[float], total: int) -> list[int]:
    """Integers proportional to `shares` summing to `total` (Hamilton's method; ties to the earlier source)."""
    exact = [share * total for share in shares]
    counts = [math.floor(value) for value in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return counts


def _window(source: TokenStore | Mixture, seed: int, window: int, seq_len: int):
    """(tokens, segment ids, positions) of the run's window `window`: seq_len + 1 tokens of the packed stream."""
    if isinstance(source, Mixture):
        index, window = source.locate(seed, window)
        source = source.stores[index]
    return _assemble_window(source, _window_pieces(source, seed, window * seq_len, seq_len + 1))


def process_rows(global_batch: int, process_index: int, process_count: int) -> range:
    """The rows of the global batch that one process produces: [i*B/P, (i+1)*B/P)."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if global_batch < 1 or global_batch % process_count:
        raise DataError(f"global batch {global_batch} must be a positive multiple of process_count {process_count}")
    rows_per_process = global_batch // process_count
    return range(process_index * rows_per_process, (process_index + 1) * rows_per_process)


def batch_for_step(
    store: TokenStore | Mixture,
    step: int,
    global_batch: int,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step`: int32 arrays [rows, seq_len] named
    inputs, targets, segment_ids, positions and loss_mask (see the module docstring)."""
    if step < 0:
        raise DataError(f"step must be >= 0, got {step}")
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    rows = process_rows(global_batch, process_index, process_count)
    # Row r of step k is window k*B + r, i.e. stream[(k*B + r) * seq_len :][: seq_len + 1] (of a mixture: of the
    # stream of the source that window was dealt to).
    windows = [_window(store, seed, step * global_batch + row, seq_len) for row in rows]
    tokens = np.stack([window[0] for window in windows])
    segments = np.stack([window[1] for window in windows])
    positions = np.stack([window[2] for window in windows])
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segments[:, :-1],
        "positions": positions[:, :-1],
        "loss_mask": (segments[:, 1:] == segments[:, :-1]).astype(np.int32),
    }


# --------------------------------------------------------------------------------------------
# Corpus statistics
# --------------------------------------------------------------------------------------------


def unigram_entropy(store: TokenStore | Mixture) -> float:
    """Entropy in nats per token of the corpus's unigram distribution over training targets.

    Targets are every document token plus one EOS per document (BOS is never a target), so this is
    the loss of the best model that ignores context: a trained model's validation loss must beat it.
    A mixture's is that of its sources' distributions weighted by their shares.
    """
    if isinstance(store, Mixture):
        counts = [_unigram_counts(source) for source in store.stores]
        mixed = sum(weight * count / count.sum() for weight, count in zip(store.weights, counts))
        probabilities = mixed[mixed > 0]
        return float(-(probabilities * np.log(probabilities)).sum())
    counts = _unigram_counts(store)
    probabilities = counts[counts > 0] / counts.sum()
    return float(-(probabilities * np.log(probabilities)).sum())


def _unigram_counts(store: TokenStore) -> np.ndarray:
    counts = np.zeros(store.vocab_size, np.int64)
    chunk = 1 << 24
    for start in range(0, store.num_tokens, chunk):
        values = store.read_tokens(start, min(start + chunk, store.num_tokens))
        counts += np.bincount(values, minlength=store.vocab_size)
    counts[store.eos_id] += store.num_documents
    return counts


# --------------------------------------------------------------------------------------------
# The default corpus: the running interpreter's standard library sources
# --------------------------------------------------------------------------------------------

# Tests and bundled third-party packages are not the standard library's own prose and code.
_EXCLUDED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
VALIDATION_PER_MILLE = 10  # about 1% of the files (2-3% of the text: a few hundred KB)
DEFAULT_VOCAB_SIZE = 4096


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation_file(relative_path: str) -> bool:
    """Fixed split: the first 8 bytes of sha256(path relative to the stdlib dir, '/'-separated)."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < VALIDATION_PER_MILLE


def default_corpus(split: Literal["train", "valid"], *, root: PathLike | None = None) -> list[Path]:
    """The standard library's *.py files (tests and site-packages excluded), sorted, in one split."""
    if split not in ("train", "valid"):
        raise DataError(f"unknown split {split!r}: expected 'train' or 'valid'")
    base = Path(root) if root is not None else stdlib_dir()
    chosen = []
    for directory, subdirectories, filenames in os.walk(base):
        subdirectories[:] = [name for name in subdirectories if name not in _EXCLUDED_STDLIB_DIRS]
        for filename in filenames:
            if filename.endswith(".py"):
                path = Path(directory) / filename
                relative = path.relative_to(base).as_posix()
                if is_validation_file(relative) == (split == "valid"):
                    chosen.append(path)
    if not chosen:
        raise DataError(f"{base}: no *.py files for the {split} split of the default corpus")
    return sorted(chosen, key=lambda path: path.relative_to(base).as_posix())


def default_cache_dir() -> Path:
    """$LLAMA_JAX_CACHE, else ~/.cache/llama_jax."""
    configured = os.environ.get("LLAMA_JAX_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "llama_jax"


def _default_corpus_dir(cache_dir: Path, root: Path, vocab_size: int) -> Path:
    version = ".".join(map(str, sys.version_info[:3]))
    root_key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    return cache_dir / f"stdlib-py{version}-{root_key}-vocab{vocab_size}"


def _cached_tokenizer(directory: Path, train_files: Sequence[Path], vocab_size: int,
                      infilling: bool = False) -> Tokenizer:
    """The tokenizer trained on these exact files, trained now if the cache has none."""
    model_path, record_path = directory / "tokenizer.model", directory / "tokenizer.json"
    sources_digest = hashlib.sha256(json.dumps(_describe_sources(train_files)).encode()).hexdigest()
    with _build_lock(_Location(str(model_path))):
        with contextlib.suppress(OSError, ValueError, KeyError):
            record = json.loads(record_path.read_text())
            if record["sources_digest"] == sources_digest and model_path.is_file():
                tokenizer = load_tokenizer(model_path)
                if tokenizer.fingerprint() == record["fingerprint"]:
                    return tokenizer
        tokenizer = train_sentencepiece(train_files, model_path, vocab_size, infilling=infilling)
        record = {"sources_digest": sources_digest, "fingerprint": tokenizer.fingerprint(), "vocab_size": vocab_size}
        temporary = record_path.with_name(f".{record_path.name}.{uuid.uuid4().hex}")
        temporary.write_text(json.dumps(record))
        os.replace(temporary, record_path)
        return tokenizer


def load_default_corpus(
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    cache_dir: PathLike | None = None,
    root: PathLike | None = None,
    fim: FimTransform | None = None,
) -> tuple[Tokenizer, TokenStore, TokenStore]:
    """(tokenizer, train store, validation store) of the standard-library corpus, built and cached on first use.

    fim: the training store's documents are FIM-transformed, with a tokenizer that has the infilling pieces (cached
    apart from the plain one); each FIM setting gets its own training store, so runs with different ones can share
    the cache. The validation store stays plain.
    """
    base = Path(root) if root is not None else stdlib_dir()
    directory = _default_corpus_dir(Path(cache_dir) if cache_dir is not None else default_cache_dir(), base, vocab_size)
    if fim is not None:
        directory = directory.with_name(directory.name + "-infilling")
    train_files = default_corpus("train", root=base)
    valid_files = default_corpus("valid", root=base)
    tokenizer = _cached_tokenizer(directory, train_files, vocab_size, infilling=fim is not None)
    train_dir = directory / ("train" if fim is None else f"train-fim-{fim.key()}")
    train = build_store(train_files, tokenizer, train_dir, fim=fim)
    valid = build_store(valid_files, tokenizer, directory / "valid")
    return tokenizer, train, valid
