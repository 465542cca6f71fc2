"""Token stores built by several processes on datatrove's local executor (llama_jax/parallel_tokenize.py): byte for
byte the store a single-process build writes (whole corpus and both sides of the held-out split), and after a task
fails, the next run redoes that task alone."""
from __future__ import annotations

import filecmp
import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llama_jax.data import build_store
from llama_jax.errors import DataError
from llama_jax.parallel_tokenize import build_store_parallel
from llama_jax.tokenizer import train_sentencepiece


def identical_trees(left: Path, right: Path) -> list[str]:
    """Paths that differ between two directory trees (missing on one side, or different bytes)."""
    comparison = filecmp.dircmp(left, right)
    problems = [f"{left / name}" for name in comparison.left_only + comparison.right_only + comparison.funny_files]
    _, mismatch, errors = filecmp.cmpfiles(left, right, comparison.common_files, shallow=False)
    problems += [str(left / name) for name in mismatch + errors]
    for name in comparison.common_dirs:
        problems += identical_trees(left / name, right / name)
    return problems


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six files of three formats (a gzip'd JSONL of many documents among them) and a SentencePiece tokenizer."""
    import argparse
    import difflib
    import textwrap

    root = tmp_path_factory.mktemp("corpus")
    modules = [argparse, difflib, textwrap]
    paragraphs = [block for module in modules for block in Path(module.__file__).read_text().split("\n\n")
                  if block.strip()]
    for index in range(4):
        lines = "".join(json.dumps({"text": text}) + "\n" for text in paragraphs[index::4])
        (root / f"part{index}.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (root / "book.txt").write_text(Path(json.__file__).read_text())
    pq.write_table(pa.table({"text": paragraphs[:50]}), root / "table.parquet")
    tokenizer = train_sentencepiece([Path(m.__file__) for m in modules], root / "tok.model", 512)
    return root, tokenizer


@pytest.mark.parametrize("part", [None, "train", "valid"])
def test_a_parallel_build_is_byte_identical_to_the_single_process_build(corpus, tmp_path, part):
    root, tokenizer = corpus
    single = build_store(root, tokenizer, tmp_path / "single", part=part)
    parallel = build_store_parallel(root, tokenizer, tmp_path / "parallel", workers=2, tasks=4, part=part)
    assert parallel.num_documents == single.num_documents > 0
    assert identical_trees(tmp_path / "single", tmp_path / "parallel") == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["parallel", "single"]  # parts and logs removed


def test_a_failed_task_is_redone_alone(corpus, tmp_path):
    root, tokenizer = corpus
    sources = tmp_path / "sources"
    sources.mkdir()
    for path in sorted(root.glob("part*.jsonl.gz")):
        (sources / path.name).write_bytes(path.read_bytes())
    damaged = sources / "part2.jsonl.gz"
    good = damaged.read_bytes()
    stat = damaged.stat()
    broken = bytearray(good)
    broken[len(broken) // 2] ^= 0xFF  # same size and mtime (restored below): the same inputs to the build
    damaged.write_bytes(bytes(broken))
    os.utime(damaged, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    with pytest.raises(DataError, match=rf"^{damaged}:"):  # its damage (bad JSON or a failed CRC), by line
        # one worker: tasks in order, so which finish is known (with a pool, a failure also stops tasks in flight)
        build_store_parallel(sources, tokenizer, tmp_path / "store", workers=1, tasks=4)
    assert not (tmp_path / "store").exists()  # nothing committed
    parts = tmp_path / ".store.parts"
    finished = sorted(path.name for path in parts.iterdir() if path.name.isdigit())
    assert finished == ["00000", "00001"]  # task 2 failed; the executor stopped before task 3

    damaged.write_bytes(good)
    os.utime(damaged, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    redone: list[str] = []
    original_rename = os.rename

    def recording_rename(source, target):  # which parts this second run writes
        if Path(target).parent == parts:
            redone.append(Path(target).name)
        return original_rename(source, target)

    os.rename = recording_rename
    try:
        build_store_parallel(sources, tokenizer, tmp_path / "store", workers=1, tasks=4)
    finally:
        os.rename = original_rename
    assert redone == ["00002", "00003"]  # the finished tasks were not run again
    build_store(sources, tokenizer, tmp_path / "single")
    assert identical_trees(tmp_path / "single", tmp_path / "store") == []


KILLED_BUILD = """
import sys, time
from pathlib import Path
import llama_jax.parallel_tokenize as parallel
from llama_jax.tokenizer import load_tokenizer

# Slow every task down (module level: datatrove's workers re-import __main__, so they are slowed too), so that the
# build can be killed with some parts finished and others not.
_batches = parallel._batches
def slow_batches(documents, tokenizer):
    for batch in _batches(documents, tokenizer):
        time.sleep(0.3)
        yield batch
parallel._batches = slow_batches

if __name__ == "__main__":
    sources, tokenizer, store = sys.argv[1:]
    parallel.build_store_parallel(sources, load_tokenizer(tokenizer), store, workers=2, tasks=6)
"""


@pytest.mark.slow
def test_a_killed_build_keeps_its_finished_parts_and_redoes_the_rest_alone(corpus, tmp_path):
    """kill -9 of the whole build (the executor and its two worker processes, as a machine going down) with some parts
    finished: running it again redoes only the unfinished parts, and the store is the single-process build's."""
    import signal
    import subprocess
    import sys
    import time

    root, tokenizer = corpus
    sources = tmp_path / "sources"
    sources.mkdir()
    for index in range(3):  # six files of the same documents, each with several batches of paragraphs
        for path in sorted(root.glob("part*.jsonl.gz"))[:2]:
            (sources / f"{index}-{path.name}").write_bytes(path.read_bytes())
    script = tmp_path / "build.py"
    script.write_text(KILLED_BUILD)
    store = tmp_path / "store"
    parts = tmp_path / ".store.parts"
    process = subprocess.Popen([sys.executable, str(script), str(sources), str(tokenizer.path), str(store)],
                               cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)

    def finished() -> list[str]:
        return sorted(path.name for path in parts.iterdir() if path.name.isdigit()) if parts.is_dir() else []

    deadline = time.monotonic() + 240
    while not finished():
        assert process.poll() is None, "the build ended before any part was finished"
        assert time.monotonic() < deadline, "no part finished in time"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the build's own process group (by id, never by name)
    process.wait()
    done_before = finished()
    assert 1 <= len(done_before) < 6 and not store.exists()

    redone: list[str] = []
    original_rename = os.rename

    def recording_rename(source, target):
        if Path(target).parent == parts:
            redone.append(Path(target).name)
        return original_rename(source, target)

    os.rename = recording_rename
    try:
        build_store_parallel(sources, tokenizer, store, workers=1, tasks=6)
    finally:
        os.rename = original_rename
    assert sorted(redone) == sorted(set(f"{i:05d}" for i in range(6)) - set(done_before))
    build_store(sources, tokenizer, tmp_path / "single")
    assert identical_trees(tmp_path / "single", store) == []
