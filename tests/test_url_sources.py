"""Corpus sources at URLs (fsspec, through universal-pathlib): fsspec's in-process `memory://` filesystem stands in for
an object store. Each format read by URL gives back the documents written (the same as the local file), globs and
folders of URLs expand to the sorted files, a token store built from URLs holds the tokens a byte tokenizer gives by
hand (the same as the one built from local files), a truncated compressed file names its URL and line, and a URL
whose filesystem is not installed, or that is missing, is one DataError naming it."""
from __future__ import annotations

import gzip
import re
import tracemalloc
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zstandard
from test_data import ByteTokenizer
from test_documents import FORMATS, TEXTS, json_lines, write_format

from llama_jax.data import build_store, corpus_documents, resolve_sources
from llama_jax.documents import read_documents
from llama_jax.errors import DataError
from llama_jax.jsonl import read_jsonl


@pytest.fixture
def memory():
    """(filesystem, a fresh memory:// folder URL); the folder is removed afterwards."""
    fs = fsspec.filesystem("memory")
    base = f"memory://corpus/{uuid.uuid4().hex}"
    yield fs, base
    if fs.exists(base):
        fs.rm(base, recursive=True)


def upload(fs, local: Path, url: str) -> str:
    fs.pipe(url, local.read_bytes())
    return url


@pytest.mark.parametrize("suffix", [".txt", *FORMATS])
def test_each_format_read_by_url_gives_the_documents_of_the_local_file(tmp_path, memory, suffix):
    fs, base = memory
    if suffix == ".txt":
        local = tmp_path / "book.txt"
        local.write_bytes("a whole book\nin wörds\n".encode())
        expected = ["a whole book\nin wörds\n"]
    else:
        local, expected = write_format(tmp_path, suffix), TEXTS
    url = upload(fs, local, f"{base}/{local.name}")
    assert list(read_documents(url)) == expected  # a URL string
    (path,) = resolve_sources(url)
    assert str(path) == url and not isinstance(path, Path)
    assert list(read_documents(path)) == expected == list(read_documents(local))  # the UPath resolve_sources gives


def test_globs_and_folders_of_urls_expand_to_the_sorted_files(tmp_path, memory):
    fs, base = memory
    for name in ["b.jsonl", "a.jsonl.gz", "sub/c.parquet", "sub/deeper/d.jsonl.zst", "sub/notes.md", "z.txt"]:
        fs.pipe(f"{base}/{name}", b"x")
    folder = [f"{base}/{name}" for name in
              ["a.jsonl.gz", "b.jsonl", "sub/c.parquet", "sub/deeper/d.jsonl.zst", "z.txt"]]
    assert [str(path) for path in resolve_sources(base)] == folder
    assert [str(path) for path in resolve_sources(base + "/")] == folder
    assert [str(path) for path in resolve_sources(f"{base}/*.jsonl*")] == [f"{base}/a.jsonl.gz", f"{base}/b.jsonl"]
    assert [str(path) for path in resolve_sources(f"{base}/**/*.jsonl*")] == [
        f"{base}/a.jsonl.gz", f"{base}/b.jsonl", f"{base}/sub/deeper/d.jsonl.zst"]
    assert [str(path) for path in resolve_sources(base, suffixes=(".jsonl",))] == [f"{base}/b.jsonl"]
    # Local entries stay pathlib.Paths, resolved, beside URL ones; a source named twice counts once.
    (tmp_path / "local.txt").write_text("here")
    mixed = resolve_sources([str(tmp_path / "local.txt"), f"{base}/b.jsonl", f"{base}/*.jsonl"])
    assert mixed[0] == (tmp_path / "local.txt").resolve() and type(mixed[0]) is type(Path())
    assert [str(path) for path in mixed[1:]] == [f"{base}/b.jsonl"]


def test_a_store_built_from_urls_equals_the_store_built_from_local_files(tmp_path, memory):
    fs, base = memory
    texts = [TEXTS[:20], TEXTS[20:35], TEXTS[35:]]
    (tmp_path / "corpus").mkdir()
    local = [write_format(tmp_path / "corpus", suffix, texts=part).rename(tmp_path / "corpus" / f"{i}{suffix}")
             for i, (suffix, part) in enumerate(zip([".jsonl.zst", ".parquet", ".jsonl.gz"], texts, strict=True))]
    for path in local:
        upload(fs, path, f"{base}/{path.name}")
    from_urls = build_store(base, ByteTokenizer(), tmp_path / "store_urls")
    from_disk = build_store(tmp_path / "corpus", ByteTokenizer(), tmp_path / "store_disk")
    # By hand: each non-empty document's UTF-8 bytes + 3, back to back, in file order.
    documents = [text for part in texts for text in part if text]
    expected = np.array([byte + 3 for text in documents for byte in text.encode()])
    np.testing.assert_array_equal(from_urls.read_tokens(0, from_urls.num_tokens), expected)
    np.testing.assert_array_equal(from_urls.read_tokens(0, from_urls.num_tokens),
                                  from_disk.read_tokens(0, from_disk.num_tokens))
    np.testing.assert_array_equal(from_urls.offsets, np.cumsum([0] + [len(text.encode()) for text in documents]))
    np.testing.assert_array_equal(from_urls.offsets, from_disk.offsets)
    sources = from_urls.manifest["sources"]
    assert [entry["path"] for entry in sources] == [f"{base}/{path.name}" for path in local]
    assert [entry["size"] for entry in sources] == [path.stat().st_size for path in local]
    # The held-out split follows the text, wherever the files are.
    for part in ("train", "valid"):
        assert ([text for _, text in corpus_documents(resolve_sources(base), part)]
                == [text for _, text in corpus_documents(resolve_sources(tmp_path / "corpus"), part)])


def test_a_store_from_urls_is_reused_until_an_object_changes(tmp_path, memory):
    fs, base = memory
    fs.pipe(f"{base}/a.jsonl", json_lines(["one", "two"]))
    first = build_store(base, ByteTokenizer(), tmp_path / "store")
    tokenizer = ByteTokenizer()
    again = build_store(base, tokenizer, tmp_path / "store")
    assert tokenizer.encode_batch_calls == 0 and again.manifest == first.manifest  # reused, nothing re-encoded
    fs.pipe(f"{base}/a.jsonl", json_lines(["six", "ten"]))  # same size, new object
    rebuilt = build_store(base, ByteTokenizer(), tmp_path / "store")
    assert rebuilt.read_tokens(0, rebuilt.num_tokens).tolist() == [byte + 3 for byte in b"sixten"]


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_a_truncated_compressed_url_names_the_url_and_the_last_good_line(tmp_path, memory, suffix):
    fs, base = memory
    path = write_format(tmp_path, suffix, texts=[f"doc {i} " * 300 for i in range(400)])
    url = f"{base}/{path.name}"
    data = path.read_bytes()
    fs.pipe(url, data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"^{url}: the compressed stream is damaged after line (\d+) \(") as caught:
        list(read_documents(url))
    line = re.search(r"after line (\d+)", str(caught.value))[1]
    assert 0 < int(line) < 400
    assert "ends inside a zstd frame" in str(caught.value) or "end-of-stream" in str(caught.value)


def test_a_bad_json_line_at_a_url_names_the_url_line_and_column(memory):
    fs, base = memory
    fs.pipe(f"{base}/chats.jsonl", b'{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=rf"^{base}/chats.jsonl:2:10: not valid JSON"):
        list(read_jsonl(resolve_sources(f"{base}/chats.jsonl", suffixes=(".jsonl",))[0], "conversations"))


def test_a_large_compressed_url_streams_in_flat_memory(memory):
    fs, base = memory
    data = json_lines(["x" * 2000] * 20_000)  # 40 MB of text
    fs.pipe(f"{base}/big.jsonl.zst", zstandard.ZstdCompressor().compress(data))
    fs.pipe(f"{base}/big.jsonl.gz", gzip.compress(data, 1))
    for name in ("big.jsonl.zst", "big.jsonl.gz"):
        tracemalloc.start()
        try:
            seen = sum(1 for _ in read_documents(f"{base}/{name}"))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert seen == 20_000
        assert peak < len(data) / 10, f"{name}: peak {peak} bytes while reading {len(data)} bytes"


@pytest.mark.parametrize(("url", "package"), [("s3://bucket/corpus/*.jsonl.zst", "s3fs"),
                                              ("gs://bucket/fineweb/part-0.parquet", "gcsfs")])
def test_a_url_whose_filesystem_is_not_installed_says_what_to_install(url, package):
    pytest.importorskip("upath")
    try:
        fsspec.get_filesystem_class(url.split("://")[0])
        pytest.skip(f"{package} is installed")
    except ImportError:
        pass
    message = (f"^{re.escape(url)}: " + r"reading \w+:// URLs needs the " + package
               + rf" package, which is not installed \(pip install {package}\)$")
    with pytest.raises(DataError, match=message):
        resolve_sources(url)
    with pytest.raises(DataError, match=message):
        list(read_documents(url))


def test_an_unknown_protocol_and_missing_urls_are_named(memory):
    _, base = memory
    with pytest.raises(DataError, match=r"^nosuch://bucket/a.jsonl: unknown URL protocol 'nosuch'"):
        resolve_sources("nosuch://bucket/a.jsonl")
    with pytest.raises(DataError, match=rf"^{base}/missing.jsonl: no such source file$"):
        resolve_sources(f"{base}/missing.jsonl")
    with pytest.raises(DataError, match=rf"^{base}/\*.parquet: pattern matches no files$"):
        resolve_sources(f"{base}/*.parquet")
    with pytest.raises(DataError, match=rf"^{base}/missing.jsonl.gz: cannot read source \("):
        list(read_documents(f"{base}/missing.jsonl.gz"))
    with pytest.raises(DataError, match=rf"^{base}/missing.parquet: cannot read Parquet source \("):
        list(read_documents(f"{base}/missing.parquet"))
    with pytest.raises(DataError, match=rf"^{base}/missing.txt: cannot read source \("):
        list(read_documents(f"{base}/missing.txt"))
