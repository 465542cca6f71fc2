"""Token store and packing tests, on small synthetic corpora written into tmp_path.

References are hand-computed values, a trivially correct byte tokenizer, the tokenizer's own
encode() of each source document, and batches produced in a separate Python process."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts

from llama_jax import data
from llama_jax.data import (
    TokenStore,
    batch_for_step,
    build_store,
    default_cache_dir,
    default_corpus,
    epoch_document_order,
    load_default_corpus,
    unigram_entropy,
)
from llama_jax.errors import DataError
from llama_jax.tokenizer import Tokenizer, train_sentencepiece

REPO_ROOT = Path(__file__).resolve().parents[1]
BOS, EOS = 1, 2


class ByteTokenizer(Tokenizer):
    """Reference tokenizer: id = UTF-8 byte + 3, BOS 1, EOS 2. Obviously right, so expectations are by hand."""

    vocab_size, bos_id, eos_id, pad_id = 259, BOS, EOS, 0
    stop_ids = frozenset({EOS})
    path = None

    def __init__(self):
        self.encode_batch_calls = 0

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self._framed([byte + 3 for byte in text.encode()], bos, eos)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        self.encode_batch_calls += 1
        return super().encode_batch(texts)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode()

    def special_id(self, token: str) -> int:
        return {"<s>": BOS, "</s>": EOS}[token]

    def fingerprint(self) -> str:
        return "byte-tokenizer-v1"


def subprocess_environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def write_jsonl(path: Path, texts: Sequence[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(texts)))
    return path


# Varied lengths, a JSONL file and two text files, so documents cross rows and rows hold several documents.
SOURCE_TEXTS = {
    "a.jsonl": [f"document {i}: " + "word " * (i * 7 % 23) + "end" for i in range(25)],
    "b.txt": ["A plain text file.\nWith two lines and ünïcødé."],
    "c.txt": ["x" * 300 + "\n" + "short tail"],
}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("corpus")
    write_jsonl(directory / "a.jsonl", SOURCE_TEXTS["a.jsonl"])
    for name in ("b.txt", "c.txt"):
        (directory / name).write_text(SOURCE_TEXTS[name][0], encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory, corpus_dir) -> Tokenizer:
    texts = [text for texts in SOURCE_TEXTS.values() for text in texts]
    return train_sentencepiece(texts, tmp_path_factory.mktemp("tok") / "sp.model", vocab_size=300)


@pytest.fixture(scope="module")
def sp_store(tmp_path_factory, corpus_dir, sp_tokenizer) -> TokenStore:
    return build_store(corpus_dir, sp_tokenizer, tmp_path_factory.mktemp("stores") / "sp")


# ---------------------------------------------------------------- packing, by hand


def test_hand_built_packing(tmp_path):
    """Three documents "ab" = [BOS, a, b, EOS] x 3 (a = 97 + 3, b = 98 + 3): a 12-token epoch stream."""
    source = write_jsonl(tmp_path / "docs.jsonl", ["ab", "ab", "ab"])
    store = build_store(source, ByteTokenizer(), tmp_path / "store")
    a, b = 100, 101
    step0 = batch_for_step(store, step=0, global_batch=2, seq_len=5, seed=0)
    assert step0["inputs"].tolist() == [[BOS, a, b, EOS, BOS], [a, b, EOS, BOS, a]]
    assert step0["targets"].tolist() == [[a, b, EOS, BOS, a], [b, EOS, BOS, a, b]]
    assert step0["segment_ids"].tolist() == [[1, 1, 1, 1, 2], [1, 1, 1, 2, 2]]
    assert step0["positions"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert step0["loss_mask"].tolist() == [[1, 1, 1, 0, 1], [1, 1, 0, 1, 1]]
    # Window 2 = stream[10:16] runs from the end of epoch 0 into epoch 1.
    step1 = batch_for_step(store, step=1, global_batch=2, seq_len=5, seed=0)
    assert step1["inputs"][0].tolist() == [b, EOS, BOS, a, b]
    assert step1["targets"][0].tolist() == [EOS, BOS, a, b, EOS]
    assert step1["segment_ids"][0].tolist() == [1, 1, 2, 2, 2]
    assert step1["positions"][0].tolist() == [0, 1, 0, 1, 2]
    assert step1["loss_mask"][0].tolist() == [1, 0, 1, 1, 1]
    assert all(array.dtype == np.int32 for array in step0.values())


def test_document_order_is_a_seeded_permutation():
    order = epoch_document_order(1000, seed=3, epoch=0)
    assert sorted(order.tolist()) == list(range(1000))
    assert order.tolist() == epoch_document_order(1000, seed=3, epoch=0).tolist()
    assert order.tolist() != epoch_document_order(1000, seed=3, epoch=1).tolist()
    assert order.tolist() != epoch_document_order(1000, seed=4, epoch=0).tolist()


# ---------------------------------------------------------------- packing, a whole epoch


def source_documents(tokenizer: Tokenizer) -> list[tuple[int, ...]]:
    return [tuple(tokenizer.encode(text)) for texts in SOURCE_TEXTS.values() for text in texts]


def split_framed(stream: Sequence[int]) -> list[tuple[int, ...]]:
    """Parse [BOS doc EOS]* by token value (SentencePiece never emits BOS/EOS inside a document)."""
    documents, index = [], 0
    while index < len(stream):
        assert stream[index] == BOS, f"expected BOS at stream position {index}"
        end = stream.index(EOS, index)
        documents.append(tuple(stream[index + 1 : end]))
        index = end + 1
    return documents


@pytest.mark.parametrize("seed", [0, 11])
def test_epoch_has_every_token_once(sp_store, sp_tokenizer, seed):
    batch_size, seq_len = 3, 16
    epoch_tokens = sp_store.tokens_per_epoch
    expected = sorted(source_documents(sp_tokenizer))
    assert epoch_tokens == sum(len(doc) + 2 for doc in expected)
    steps = math.ceil(2 * epoch_tokens / (batch_size * seq_len)) + 1
    batches = [batch_for_step(sp_store, step, batch_size, seq_len, seed) for step in range(steps)]
    inputs = np.concatenate([batch["inputs"] for batch in batches]).reshape(-1).tolist()
    targets = np.concatenate([batch["targets"] for batch in batches]).reshape(-1).tolist()
    epoch0, epoch1 = inputs[:epoch_tokens], inputs[epoch_tokens : 2 * epoch_tokens]
    assert sorted(split_framed(epoch0)) == expected
    assert sorted(split_framed(epoch1)) == expected
    assert split_framed(epoch0) != split_framed(epoch1), "each epoch has its own order"
    # Targets are the stream shifted by one, across row and step boundaries.
    assert targets[:-1] == inputs[1:]


def test_segments_positions_and_mask_follow_the_tokens(sp_store):
    batch = batch_for_step(sp_store, step=2, global_batch=4, seq_len=32, seed=5)
    for row in range(4):
        inputs = batch["inputs"][row].tolist()
        segment, position = 1, 0
        for t, token in enumerate(inputs):
            if t > 0 and token == BOS:
                segment, position = segment + 1, 0
            assert batch["segment_ids"][row, t] == segment
            assert batch["positions"][row, t] == position
            assert batch["loss_mask"][row, t] == (0 if token == EOS else 1)
            position += 1


# ---------------------------------------------------------------- determinism across processes


def test_batch_identical_in_a_fresh_process(sp_store, tmp_path):
    out = tmp_path / "batch.npz"
    script = textwrap.dedent(
        f"""
        import numpy as np
        from llama_jax.data import TokenStore, batch_for_step
        store = TokenStore.open({sp_store.address!r})
        np.savez({str(out)!r}, **batch_for_step(store, step=7, global_batch=4, seq_len=24, seed=123))
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO_ROOT, env=subprocess_environment())
    theirs = np.load(out)
    ours = batch_for_step(TokenStore.open(sp_store.address), step=7, global_batch=4, seq_len=24, seed=123)
    for key, value in ours.items():
        np.testing.assert_array_equal(theirs[key], value, err_msg=key)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_concatenate_to_the_global_batch(sp_store, process_count):
    whole = batch_for_step(sp_store, step=5, global_batch=8, seq_len=20, seed=9)
    shards = [
        batch_for_step(sp_store, 5, 8, 20, 9, process_index=i, process_count=process_count)
        for i in range(process_count)
    ]
    for key, value in whole.items():
        np.testing.assert_array_equal(np.concatenate([shard[key] for shard in shards]), value, err_msg=key)


def test_batch_not_divisible_by_processes(sp_store):
    with pytest.raises(DataError, match="global batch 6"):
        batch_for_step(sp_store, 0, 6, 16, process_index=0, process_count=4)


def test_reads_through_tensorstore_match_preloaded(sp_store):
    unloaded = TokenStore.open(sp_store.address, preload_limit_bytes=0)
    assert unloaded._tokens_in_memory is None
    for key, value in batch_for_step(sp_store, 3, 4, 64, 1).items():
        np.testing.assert_array_equal(batch_for_step(unloaded, 3, 4, 64, 1)[key], value, err_msg=key)


def test_store_matches_source_tokenization(sp_store, sp_tokenizer):
    stored = [tuple(sp_store.document(i).tolist()) for i in range(sp_store.num_documents)]
    assert stored == source_documents(sp_tokenizer)  # storage keeps source order: a.jsonl, b.txt, c.txt


# ---------------------------------------------------------------- rebuilds and crashes


def test_store_reused_until_a_source_changes(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", ["one", "two"])
    tokenizer = ByteTokenizer()
    first = build_store(source, tokenizer, tmp_path / "store")
    calls = tokenizer.encode_batch_calls
    build_store(source, tokenizer, tmp_path / "store")
    assert tokenizer.encode_batch_calls == calls, "unchanged sources must not be tokenized again"
    write_jsonl(source, ["one", "two", "three!"])
    rebuilt = build_store(source, tokenizer, tmp_path / "store")
    assert tokenizer.encode_batch_calls > calls
    assert (first.num_tokens, rebuilt.num_tokens) == (6, 12)
    assert rebuilt.document(2).tolist() == [byte + 3 for byte in b"three!"]


def test_store_rebuilt_for_another_tokenizer(tmp_path, sp_tokenizer):
    source = write_jsonl(tmp_path / "docs.jsonl", ["some words here"])
    build_store(source, ByteTokenizer(), tmp_path / "store")
    rebuilt = build_store(source, sp_tokenizer, tmp_path / "store")
    assert rebuilt.tokenizer_fingerprint == sp_tokenizer.fingerprint()
    assert rebuilt.document(0).tolist() == sp_tokenizer.encode("some words here")


def failing_tokenizer(monkeypatch) -> ByteTokenizer:
    """A tokenizer that raises on its second batch; batches are tiny so a build has several."""
    monkeypatch.setattr(data, "_ENCODE_BATCH_CHARS", 8)
    tokenizer = ByteTokenizer()
    real = tokenizer.encode_batch

    def encode_batch(texts):
        if tokenizer.encode_batch_calls >= 1:
            raise RuntimeError("simulated crash during writing")
        return real(texts)

    tokenizer.encode_batch = encode_batch
    return tokenizer


def test_exception_mid_build_keeps_the_old_store(tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "docs.jsonl", ["first version"])
    old = build_store(source, ByteTokenizer(), tmp_path / "store")
    write_jsonl(source, ["second version, longer", "and another document"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_store(source, failing_tokenizer(monkeypatch), tmp_path / "store")
    assert not list(tmp_path.glob(".store.building-*")), "the staging directory is removed"
    survivor = TokenStore.open(tmp_path / "store")
    assert survivor.num_tokens == old.num_tokens == len("first version")
    monkeypatch.undo()
    rebuilt = build_store(source, ByteTokenizer(), tmp_path / "store")
    assert rebuilt.num_documents == 2


def test_exception_in_first_build_leaves_no_store(tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "docs.jsonl", ["first document", "second document", "third document"])
    with pytest.raises(RuntimeError):
        build_store(source, failing_tokenizer(monkeypatch), tmp_path / "store")
    with pytest.raises(DataError, match="no finished token store"):
        TokenStore.open(tmp_path / "store")


def test_killed_build_is_never_used(tmp_path, sp_tokenizer):
    source = write_jsonl(tmp_path / "docs.jsonl", [f"document number {i}" for i in range(40)])
    script = textwrap.dedent(
        f"""
        import os, signal
        from llama_jax import data
        from llama_jax.tokenizer import load_tokenizer
        data._ENCODE_BATCH_CHARS = 100
        tokenizer = load_tokenizer({str(sp_tokenizer.path)!r})
        real, calls = tokenizer.encode_batch, []
        def encode_batch(texts):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(texts)
        tokenizer.encode_batch = encode_batch
        data.build_store({str(source)!r}, tokenizer, {str(tmp_path / "store")!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=subprocess_environment())
    assert result.returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".store.building-*")), "the killed build left its staging directory"
    with pytest.raises(DataError):
        TokenStore.open(tmp_path / "store")
    store = build_store(source, sp_tokenizer, tmp_path / "store")
    assert store.num_documents == 40
    assert not list(tmp_path.glob(".store.building-*")), "leftovers are cleaned by the next build"


def test_store_at_a_url(tmp_path, corpus_dir, sp_tokenizer, sp_store):
    url = f"file://{tmp_path}/remote"
    remote = build_store(corpus_dir, sp_tokenizer, url)
    for key, value in batch_for_step(sp_store, 2, 4, 32, 0).items():
        np.testing.assert_array_equal(batch_for_step(remote, 2, 4, 32, 0)[key], value, err_msg=key)
    (tmp_path / "remote" / "manifest.json").unlink()  # what an interrupted rebuild looks like there
    with pytest.raises(DataError, match="no finished token store"):
        TokenStore.open(url)


def test_open_with_another_tokenizer_fingerprint(sp_store):
    with pytest.raises(DataError, match="built with tokenizer"):
        TokenStore.open(sp_store.address, expected_fingerprint="0" * 64)


# ---------------------------------------------------------------- errors


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty corpus.*empty.txt"):
        build_store(tmp_path / "empty.txt", ByteTokenizer(), tmp_path / "store")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="nothing"):
        build_store(tmp_path / "nothing", ByteTokenizer(), tmp_path / "store")


def test_non_utf8_file_names_file_and_offset(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(DataError, match=re.escape(f"{bad}:1:4: not valid UTF-8 (invalid continuation byte)") + "$"):
        build_store(bad, ByteTokenizer(), tmp_path / "store")


def test_jsonl_line_without_text_names_file_and_line(tmp_path):
    bad = tmp_path / "records.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"records.jsonl:3: .*'text'"):
        build_store(bad, ByteTokenizer(), tmp_path / "store")


def test_invalid_json_line(tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": unquoted}\n')
    # column 10 is the `u` of `unquoted`, counted from 1
    with pytest.raises(DataError, match=re.escape(f"{bad}:2:10: not valid JSON (Expecting value)") + "$"):
        build_store(bad, ByteTokenizer(), tmp_path / "store")


def test_missing_source(tmp_path):
    with pytest.raises(DataError, match="missing.txt"):
        build_store(tmp_path / "missing.txt", ByteTokenizer(), tmp_path / "store")


@pytest.mark.parametrize("preload_limit_bytes", [0, 1 << 20])
def test_out_of_vocabulary_token_on_read(tmp_path, preload_limit_bytes):
    source = write_jsonl(tmp_path / "docs.jsonl", ["hello", "world"])
    build_store(source, ByteTokenizer(), tmp_path / "store")
    tokens_path = tmp_path / "store" / "tokens"
    tokens = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tokens_path)}}).result()
    tokens[3].write(np.uint16(300)).result()  # vocabulary is 259
    store = TokenStore.open(tmp_path / "store", preload_limit_bytes=preload_limit_bytes)
    with pytest.raises(DataError, match=r"store.*token id 300 at token index 3 is outside the vocabulary \(size 259\)"):
        batch_for_step(store, 0, 1, 16)


# ---------------------------------------------------------------- statistics


def test_unigram_entropy_by_hand(tmp_path):
    store = build_store(write_jsonl(tmp_path / "docs.jsonl", ["ab", "aab"]), ByteTokenizer(), tmp_path / "store")
    # Targets: a b EOS a a b EOS -> a: 3/7, b: 2/7, EOS: 2/7 (BOS is never a target).
    expected = -(3 / 7 * math.log(3 / 7) + 2 * (2 / 7) * math.log(2 / 7))
    assert unigram_entropy(store) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- default corpus


def test_default_corpus_split_is_deterministic_and_disjoint():
    train, valid = default_corpus("train"), default_corpus("valid")
    assert train == default_corpus("train") and valid == default_corpus("valid")
    assert not set(train) & set(valid)
    assert train == sorted(train, key=lambda p: p.relative_to(data.stdlib_dir()).as_posix())
    assert 0.005 < len(valid) / (len(train) + len(valid)) < 0.05
    everything = train + valid
    assert all(path.suffix == ".py" for path in everything)
    excluded = {"site-packages", "test", "tests"}
    assert not [p for p in everything if excluded & set(p.relative_to(data.stdlib_dir()).parts)]
    assert data.stdlib_dir() / "json" / "decoder.py" in everything


def split_by_rule(relative: str) -> str:
    """The documented rule, restated: sha256 of the relative path, first 8 bytes big-endian, mod 1000 < 10."""
    value = int.from_bytes(hashlib.sha256(relative.encode()).digest()[:8], "big")
    return "valid" if value % 1000 < 10 else "train"


@pytest.fixture
def fake_stdlib(tmp_path) -> Path:
    """A small stand-in for the standard library, with names chosen so both splits are non-empty."""
    root = tmp_path / "stdlib"
    names = [f"module_{i}.py" for i in range(1000)]
    valid = [name for name in names if split_by_rule(name) == "valid"][:3]
    chosen = valid + [name for name in names if split_by_rule(name) == "train"][:30]
    for index, name in enumerate(chosen):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"def function_{index}(x):\n    return x + {index}\n\n# {'note ' * index}\n")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "thirdparty.py").write_text("ignored = True\n")
    (root / "test").mkdir()
    (root / "test" / "test_module_0.py").write_text("ignored = True\n")
    return root


def test_default_corpus_split_follows_the_rule(fake_stdlib):
    valid = default_corpus("valid", root=fake_stdlib)
    train = default_corpus("train", root=fake_stdlib)
    expected = sorted(p.name for p in fake_stdlib.glob("*.py") if split_by_rule(p.name) == "valid")
    assert [p.name for p in valid] == expected
    assert len(valid) == 3 and len(train) == 30


def test_load_default_corpus_builds_once(fake_stdlib, tmp_path):
    tokenizer, train, valid = load_default_corpus(300, cache_dir=tmp_path / "cache", root=fake_stdlib)
    assert tokenizer.vocab_size == 300
    assert train.tokenizer_fingerprint == valid.tokenizer_fingerprint == tokenizer.fingerprint()
    assert valid.num_documents == 3 and train.num_documents == 30
    first_file = default_corpus("valid", root=fake_stdlib)[0]
    assert tokenizer.decode(valid.document(0).tolist()) == first_file.read_text()
    model_files = list((tmp_path / "cache").rglob("tokenizer.model"))
    assert len(model_files) == 1
    stamp = model_files[0].stat().st_mtime_ns
    again, train_again, _ = load_default_corpus(300, cache_dir=tmp_path / "cache", root=fake_stdlib)
    assert model_files[0].stat().st_mtime_ns == stamp, "the cached tokenizer is reused, not retrained"
    assert again.fingerprint() == tokenizer.fingerprint()
    assert train_again.manifest == train.manifest


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_JAX_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("LLAMA_JAX_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "llama_jax"


def test_real_default_corpus_round_trips(tmp_path):
    tokenizer, train, valid = load_default_corpus(1024, cache_dir=tmp_path)
    valid_files = default_corpus("valid")
    assert valid.num_documents == len(valid_files)
    assert tokenizer.decode(valid.document(0).tolist()) == valid_files[0].read_text(encoding="utf-8")
    assert 0 < unigram_entropy(valid) < math.log(1024)
