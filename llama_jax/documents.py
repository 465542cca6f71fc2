"""The documents of one corpus file, in the formats corpora ship in, read record by record.

| suffix | documents | as shipped by |
|---|---|---|
| `.txt` | the whole file is one document | books, a single source file |
| `.jsonl`, `.jsonl.gz`, `.jsonl.zst` | one per line: the line's `text_field` | SlimPajama, RedPajama (zstd) |
| `.json.gz` | one per line (JSON lines, gzip'd): the line's `text_field` | Dolma's `documents/*.json.gz` |
| `.parquet` | one per row: the `text_field` column | FineWeb, FineWeb-Edu |

Memory does not grow with a file's size, only with its largest record: JSON lines are decompressed and parsed one
at a time (`llama_jax.jsonl.read_jsonl`, which also names the line of a bad one), Parquet is read one column of one
batch of rows at a time. A damaged file is one DataError naming the file and the line or row where reading stopped.

A source may be a local path or an object-store URL ("s3://bucket/part-0001.jsonl.zst", "gs://...", "https://...",
"memory://..."): a URL string, or the `upath.UPath` that `llama_jax.data.resolve_sources` makes of one, is read
through fsspec, record by record as well (Parquet through pyarrow on the fsspec file), and errors name the URL.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from llama_jax.errors import DataError
from llama_jax.jsonl import is_url, read_jsonl, url_path, utf8_text

if TYPE_CHECKING:
    from upath import UPath

JSON_LINES_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz")
SOURCE_SUFFIXES = (".txt", *JSON_LINES_SUFFIXES, ".parquet")
DEFAULT_TEXT_FIELD = "text"
_PARQUET_BATCH_ROWS = 1024  # rows per read: a few MB of text, whatever the file's row-group size


def is_source_file(path: Path | UPath) -> bool:
    return path.name.endswith(SOURCE_SUFFIXES)


def source_path(source: str | os.PathLike[str] | UPath) -> Path | UPath:
    """A source as a path: a URL string becomes a UPath (a DataError when its filesystem is not installed), any other
    string a pathlib.Path; paths are returned as they are."""
    if is_url(source):
        return url_path(source)
    return Path(source) if isinstance(source, str) else source


def read_documents(path: str | os.PathLike[str] | UPath, text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    """The documents of one source file or URL, in file order (see the module docstring for what each format
    holds)."""
    path = source_path(path)
    name = path.name
    if name.endswith(JSON_LINES_SUFFIXES):
        return _json_lines_texts(path, text_field)
    if name.endswith(".parquet"):
        return _parquet_texts(path, text_field)
    return iter([_read_utf8(path)])


def _read_utf8(path: Path | UPath) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read source ({error.strerror or error})") from error
    return utf8_text(data, path)


def _json_lines_texts(path: Path | UPath, text_field: str) -> Iterator[str]:
    for line_number, record in read_jsonl(path, "source"):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(f"{path}:{line_number}: JSON line has no string field {text_field!r}"
                            + _field_hint(record, text_field))
        yield record[text_field]


def _field_hint(record: object, text_field: str) -> str:
    if isinstance(record, dict) and text_field not in record:
        return f" (its fields: {', '.join(map(repr, list(record)[:8]))}; choose one with data.text_field)"
    return ""


def _parquet_texts(path: Path | UPath, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    local = isinstance(path, os.PathLike)
    raw = None
    try:
        raw = None if local else path.open("rb")  # a URL: pyarrow reads (and seeks in) the fsspec file
        file = pq.ParquetFile(path if local else raw)
    except (OSError, pa.ArrowException) as error:
        if raw is not None:
            raw.close()
        raise DataError(f"{path}: cannot read Parquet source ({error})") from None
    with file, (raw if raw is not None else contextlib.nullcontext()):
        columns = file.schema_arrow.names
        if text_field not in columns:
            raise DataError(f"{path}: Parquet file has no column {text_field!r} (its columns: "
                            f"{', '.join(map(repr, columns[:12]))}); choose one with data.text_field")
        kind = file.schema_arrow.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{path}: Parquet column {text_field!r} holds {kind}, not strings")
        row = 0
        batches = file.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field])
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (OSError, pa.ArrowException) as error:
                raise DataError(f"{path}: Parquet file is damaged after row {row} ({error})") from None
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    raise DataError(f"{path}: row {row}: column {text_field!r} is null")
                yield text
