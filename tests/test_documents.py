"""Corpus files in the formats corpora ship in (llama_jax/documents.py): each format written by its own library
(gzip, zstandard, pyarrow) gives back the documents written, a token store built from it equals the one built from
plain JSONL, memory stays flat while a large compressed file streams, and a damaged file names where it broke."""
from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from test_data import ByteTokenizer

from llama_jax.config import DataConfig
from llama_jax.data import build_store, corpus_documents, resolve_sources
from llama_jax.documents import read_documents
from llama_jax.errors import ConfigError, DataError

TEXTS = [f"document {i}: " + "wörd " * (i * 7 % 23) + "\nend" for i in range(40)] + ["", "a line\r\nand {json}"]


def json_lines(texts, field="text") -> bytes:
    return "".join(json.dumps({field: text, "id": i}) + "\n" for i, text in enumerate(texts)).encode()


def write_format(directory: Path, suffix: str, texts=TEXTS, field="text") -> Path:
    path = directory / f"corpus{suffix}"
    if suffix == ".parquet":
        table = pa.table({"id": list(range(len(texts))), field: texts})
        pq.write_table(table, path, row_group_size=7)  # several row groups
    elif suffix == ".jsonl.zst":
        compressor = zstandard.ZstdCompressor(write_checksum=True)
        data = json_lines(texts, field)
        half = len(data) // 2  # two frames, as concatenated shards are
        path.write_bytes(compressor.compress(data[:half]) + compressor.compress(data[half:]))
    elif suffix in (".jsonl.gz", ".json.gz"):
        path.write_bytes(gzip.compress(json_lines(texts, field)))
    else:
        path.write_bytes(json_lines(texts, field))
    return path


FORMATS = [".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".parquet"]


@pytest.mark.parametrize("suffix", FORMATS)
def test_each_format_gives_back_the_documents_written(tmp_path, suffix):
    path = write_format(tmp_path, suffix)
    assert list(read_documents(path)) == TEXTS


@pytest.mark.parametrize("suffix", FORMATS[1:])
def test_a_store_from_each_format_equals_the_store_from_plain_jsonl(tmp_path, suffix):
    (tmp_path / "plain").mkdir()
    (tmp_path / "other").mkdir()
    plain_sources = [write_format(tmp_path / "plain", ".jsonl")]
    other_sources = [write_format(tmp_path / "other", suffix, field="content")]
    plain = build_store(plain_sources, ByteTokenizer(), tmp_path / "store_plain")
    other = build_store(other_sources, ByteTokenizer(), tmp_path / "store_other", text_field="content")
    assert other.manifest["num_documents"] == plain.manifest["num_documents"] == len([t for t in TEXTS if t])
    np.testing.assert_array_equal(other.offsets, plain.offsets)
    np.testing.assert_array_equal(other.read_tokens(0, other.num_tokens),
                                  plain.read_tokens(0, plain.num_tokens))
    assert other.manifest["text_field"] == "content"
    # The held-out split follows the text, so it is the same whatever the file format.
    for part in ("train", "valid"):
        assert ([t for _, t in corpus_documents(other_sources, part, "content")]
                == [t for _, t in corpus_documents(plain_sources, part)])


def test_a_folder_picks_up_every_format(tmp_path):
    for index, suffix in enumerate(FORMATS):
        (tmp_path / str(index)).mkdir()
        write_format(tmp_path / str(index), suffix)
    (tmp_path / "notes.md").write_text("not a source")
    found = resolve_sources(tmp_path)
    assert sorted(path.name for path in found) == sorted(f"corpus{suffix}" for suffix in FORMATS)


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_a_large_compressed_file_streams_in_flat_memory(tmp_path, suffix):
    record = "x" * 2000
    count = 20_000  # 40 MB of text
    path = tmp_path / f"big{suffix}"
    data = json_lines([record] * count)
    path.write_bytes(gzip.compress(data, 1) if suffix.endswith(".gz") else zstandard.ZstdCompressor().compress(data))
    tracemalloc.start()
    try:
        seen = sum(1 for _ in read_documents(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == count
    assert peak < len(data) / 20, f"peak {peak} bytes while reading {len(data)} bytes"


def test_a_large_parquet_file_streams_in_flat_memory(tmp_path):
    path = tmp_path / "big.parquet"
    texts = ["y" * 2000] * 20_000
    pq.write_table(pa.table({"text": texts}), path, row_group_size=2000)
    del texts
    pool = pa.default_memory_pool()
    before = pool.max_memory()
    assert sum(1 for _ in read_documents(path)) == 20_000
    assert pool.max_memory() - before < 40_000_000 / 4


# ── Damaged files and wrong fields: one error naming the file and where ─────────────────────────────────────────
@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_a_truncated_download_names_the_file_and_the_last_good_line(tmp_path, suffix):
    path = write_format(tmp_path, suffix, texts=[f"doc {i} " * 300 for i in range(400)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"^{path}: the compressed stream is damaged after line \d+ \(") as caught:
        list(read_documents(path))
    assert "ends inside a zstd frame" in str(caught.value) or "end-of-stream" in str(caught.value)


def test_a_corrupt_gzip_file_is_refused(tmp_path):
    path = write_format(tmp_path, ".jsonl.gz", texts=[f"doc {i} " * 300 for i in range(400)])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"^{path}: the compressed stream is damaged after line \d+"):
        list(read_documents(path))


def test_a_missing_field_names_the_fields_there_are(tmp_path):
    path = write_format(tmp_path, ".jsonl.gz", field="content")
    with pytest.raises(DataError, match=rf"^{path}:1: JSON line has no string field 'text' \(its fields: 'content', "
                                        r"'id'; choose one with data.text_field\)$"):
        list(read_documents(path))


def test_a_missing_parquet_column_names_the_columns(tmp_path):
    path = write_format(tmp_path, ".parquet", field="content")
    expected = rf"^{path}: Parquet file has no column 'text' \(its columns: 'id', 'content'\); choose one with "
    with pytest.raises(DataError, match=expected + r"data.text_field$"):
        list(read_documents(path))


def test_a_null_parquet_row_names_its_row(tmp_path):
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["one", "two", None, "four"]}), path)
    with pytest.raises(DataError, match=rf"^{path}: row 3: column 'text' is null$"):
        list(read_documents(path))


def test_a_non_text_parquet_column_is_refused(tmp_path):
    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(DataError, match=rf"^{path}: Parquet column 'text' holds int64, not strings$"):
        list(read_documents(path))


def test_a_file_that_is_not_parquet_is_refused(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text("not parquet")
    with pytest.raises(DataError, match=rf"^{path}: cannot read Parquet source \("):
        list(read_documents(path))


def test_an_empty_text_field_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^data.text_field='' is not allowed"):
        DataConfig(text_field="")
