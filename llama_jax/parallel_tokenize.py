"""Building a token store with every core of a machine, or across machines, on HF datatrove's executors.

The sources' files are cut into `tasks` runs of consecutive files of about equal size. Task i tokenizes its run
into its own part (`<store>.parts/<i>/`: the documents' tokens, lengths and source indices as raw arrays), written
under a temporary name and renamed when complete; datatrove's executor runs the tasks (a local process pool, SLURM
array jobs or Ray) and records each finished one, so running the same build again after a task failed or was killed
runs that task alone. A last one-task step, run by the executor once every part is complete, appends the parts in
order into the store exactly as `llama_jax.data.build_store` writes it in one process — the same arrays, chunks and
manifest, byte for byte, so the batches of every step are unchanged — then swaps it into place and removes the parts.

What stays single-process (`build_store` is used instead, with a line saying why): a store at a URL, the FIM
transform (each document's split depends on its index in the whole corpus), and a held-out split whose corpus-wide
corrections apply (one distinct text, or no document — or every document — falling on one side by its hash: these
are corpora of a handful of documents, decided after the parts exist, from counts every task records).

This module builds on `llama_jax.data`'s store internals (the array appender, manifest, staged swap and build lock),
which is why it reaches into them rather than copying them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llama_jax import data
from llama_jax.data import PathLike, SplitPart, TokenStore
from llama_jax.documents import DEFAULT_TEXT_FIELD, read_documents
from llama_jax.errors import DataError
from llama_jax.tokenizer import Tokenizer, load_tokenizer

EXECUTORS = ("local", "slurm", "ray")
_PART_FILES = ("tokens", "lengths", "sources")
_STATS_FILE = "stats.json"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything a task needs, as plain values (the executor pickles it into worker processes or jobs)."""

    files: tuple[str, ...]
    cuts: tuple[int, ...]  # task i reads files[cuts[i]:cuts[i + 1]]
    tokenizer_path: str
    token_dtype: str
    part: SplitPart | None
    text_field: str
    parts_dir: str

    def task_files(self, rank: int) -> range:
        return range(self.cuts[rank], self.cuts[rank + 1])

    def part_dir(self, rank: int) -> Path:
        return Path(self.parts_dir) / f"{rank:05d}"


def build_store_parallel(sources: PathLike | Sequence[PathLike], tokenizer: Tokenizer, out_dir: PathLike, *,
                         workers: int, tasks: int | None = None, part: SplitPart | None = None,
                         text_field: str = DEFAULT_TEXT_FIELD, force: bool = False, executor: str = "local",
                         executor_options: dict[str, Any] | None = None) -> TokenStore | None:
    """`data.build_store` of `sources`, its tokenization spread over `tasks` tasks (default: `workers`) run by
    datatrove's `executor` ("local": `workers` processes here; "slurm"/"ray": jobs, with `executor_options` passed to
    datatrove's executor). Returns the store, or None when a SLURM/Ray build was submitted and is still to finish
    (run the same call again once it has: it returns the finished store)."""
    if executor not in EXECUTORS:
        raise DataError(f"executor {executor!r} is not one of {EXECUTORS}")
    paths = data.resolve_sources(sources)
    location = data._Location(str(out_dir))
    expected = {**data._inputs_manifest(paths, tokenizer, part, text_field), "fim": None}
    reason = _single_process_reason(location, tokenizer)
    if reason:
        print(f"building {out_dir} in one process: {reason}", file=sys.stderr)
        return data.build_store(paths, tokenizer, out_dir, force=force, part=part, text_field=text_field)
    parts_dir = location.path.parent / f".{location.path.name}.parts"
    existing = location.read_manifest()
    if existing is not None and data._same_inputs(existing, expected) and not force:
        shutil.rmtree(parts_dir, ignore_errors=True)  # a scheduler's build finished since the last call
        return TokenStore.open(out_dir)
    tasks = max(1, min(tasks or workers, len(paths)))
    plan = _Plan(tuple(map(str, paths)), _cuts([path.stat().st_size for path in paths], tasks),
                 str(tokenizer.path), data._token_dtype(tokenizer.vocab_size).name, part, text_field, str(parts_dir))
    _forget_parts_of_other_inputs(parts_dir, expected)
    tokenize = datatrove_executor(executor, [_TokenizeTask(plan)], tasks, workers, parts_dir / "tokenize", None,
                                  executor_options)
    commit = datatrove_executor(executor, [_CommitStep(plan, str(out_dir), expected)], 1, 1, parts_dir / "commit",
                                tokenize, executor_options)
    commit.run()
    if location.read_manifest() is None:
        return None  # submitted to a scheduler: not finished yet
    shutil.rmtree(parts_dir, ignore_errors=True)  # the parts and the executors' logs and completion marks
    return TokenStore.open(out_dir)


def _single_process_reason(location: data._Location, tokenizer: Tokenizer) -> str:
    if not location.is_local:
        return "the store is at a URL (parallel builds write local parts)"
    if not getattr(tokenizer, "path", None):
        return "the tokenizer has no file the worker processes could load"
    return ""


def _cuts(sizes: Sequence[int], tasks: int) -> tuple[int, ...]:
    """Boundaries cutting files into `tasks` runs of consecutive files, each about total/tasks bytes."""
    cumulative = np.cumsum([max(1, size) for size in sizes])
    targets = cumulative[-1] * np.arange(1, tasks) / tasks
    inner = np.searchsorted(cumulative, targets, side="left") + 1
    return (0, *np.minimum(inner, len(sizes)).tolist(), len(sizes))


def _forget_parts_of_other_inputs(parts_dir: Path, expected: dict) -> None:
    """Parts from a build of other sources, tokenizer or split are not this build's: start over."""
    marker = parts_dir / "inputs.json"
    if marker.exists() and json.loads(marker.read_text()) != expected:
        shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text(json.dumps(expected))


def datatrove_executor(kind: str, pipeline: list, tasks: int, workers: int, logging_dir: Path, depends: Any,
                       options: dict[str, Any] | None):
    """datatrove's executor of `kind` (local, slurm or ray) running `pipeline` as `tasks` tasks after `depends`
    (the token-store build and `llama_jax.curation`'s stages both run on it)."""
    common = dict(pipeline=pipeline, tasks=tasks, logging_dir=str(logging_dir), depends=depends, **(options or {}))
    if kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(workers=workers, **common)
    if kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        return SlurmPipelineExecutor(**common)
    from datatrove.executor import RayPipelineExecutor

    return RayPipelineExecutor(**common)


# ── The tasks ────────────────────────────────────────────────────────────────────────────────────────────────────
class _TokenizeTask:
    """datatrove pipeline step (a callable(data, rank, world_size)): tokenize task `rank`'s files into its part."""

    def __init__(self, plan: _Plan):
        self.plan = plan

    def __call__(self, _data, rank: int = 0, world_size: int = 1) -> None:
        plan = self.plan
        final = plan.part_dir(rank)
        if final.exists():  # finished by an earlier run whose completion mark was lost
            return
        staging = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex}")
        staging.mkdir(parents=True)
        tokenizer = load_tokenizer(plan.tokenizer_path)
        stats = {"documents": 0, "held_out": 0, "first_digest": None, "several_texts": False}
        handles = {name: open(staging / f"{name}.bin", "wb") for name in _PART_FILES}
        try:
            for sources, encoded in _batches(self._documents(rank, stats), tokenizer):
                kept = [index for index, ids in enumerate(encoded) if len(ids)]
                lengths = np.array([len(encoded[index]) for index in kept], np.int64)
                tokens = (np.concatenate([encoded[index] for index in kept]) if kept
                          else np.zeros(0, np.int64)).astype(np.int64)
                handles["tokens"].write(tokens.astype(plan.token_dtype).tobytes())
                handles["lengths"].write(lengths.tobytes())
                handles["sources"].write(np.array([sources[index] for index in kept], np.int64).tobytes())
        finally:
            for handle in handles.values():
                handle.close()
        (staging / _STATS_FILE).write_text(json.dumps(stats))
        os.rename(staging, final)

    def _documents(self, rank: int, stats: dict) -> Iterator[tuple[int, str]]:
        """(source index, text) of the task's files; with a split, the documents on its side by their hash."""
        plan = self.plan
        for source_index in plan.task_files(rank):
            for text in read_documents(plan.files[source_index], plan.text_field):
                if plan.part is None:
                    yield source_index, text
                    continue
                if not text:
                    continue
                digest = data._text_digest(text)
                held = data._per_mille(digest) < data.VALIDATION_PER_MILLE
                stats["documents"] += 1
                stats["held_out"] += held
                if stats["first_digest"] is None:
                    stats["first_digest"] = digest.hex()
                elif digest.hex() != stats["first_digest"]:
                    stats["several_texts"] = True
                if held == (plan.part == "valid"):
                    yield source_index, text


def _batches(documents: Iterator[tuple[int, str]], tokenizer: Tokenizer):
    """The documents encoded in batches on the tokenizer's threads (as the single-process build does)."""
    sources: list[int] = []
    texts: list[str] = []
    characters = 0
    for source_index, text in documents:
        sources.append(source_index)
        texts.append(text)
        characters += len(text)
        if characters >= data._ENCODE_BATCH_CHARS:
            yield sources, tokenizer.encode_batch_arrays(texts)
            sources, texts, characters = [], [], 0
    if texts:
        yield sources, tokenizer.encode_batch_arrays(texts)


class _CommitStep:
    """datatrove pipeline step run once after every tokenize task: the parts, in order, become the store."""

    def __init__(self, plan: _Plan, out_dir: str, expected: dict):
        self.plan, self.out_dir, self.expected = plan, out_dir, expected

    def __call__(self, _data, rank: int = 0, world_size: int = 1) -> None:
        plan = self.plan
        tasks = len(plan.cuts) - 1
        missing = [rank for rank in range(tasks) if not plan.part_dir(rank).is_dir()]
        if missing:
            raise DataError(f"{plan.parts_dir}: parts {missing} are missing; run the build again to redo them")
        if self._needs_corpus_wide_split():
            print(f"building {self.out_dir} in one process: the held-out split needs corpus-wide corrections",
                  file=sys.stderr)
            data.build_store(list(map(Path, plan.files)), load_tokenizer(plan.tokenizer_path), self.out_dir,
                             force=True, part=plan.part, text_field=plan.text_field)
        else:
            location = data._Location(self.out_dir)
            with data._build_lock(location):
                self._commit(location, tasks)

    def _needs_corpus_wide_split(self) -> bool:
        if self.plan.part is None:
            return False
        stats = [json.loads((self.plan.part_dir(rank) / _STATS_FILE).read_text())
                 for rank in range(len(self.plan.cuts) - 1)]
        documents, held = sum(s["documents"] for s in stats), sum(s["held_out"] for s in stats)
        firsts = {s["first_digest"] for s in stats if s["first_digest"]}
        several = any(s["several_texts"] for s in stats) or len(firsts) > 1
        return not several or held == 0 or held == documents

    def _commit(self, location: data._Location, tasks: int) -> None:
        data._staged_swap(location, lambda staging: self._append_parts(staging, tasks), self.expected)

    def _append_parts(self, staging: data._Location, tasks: int) -> dict:
        """The parts, in order, appended into the staging store as `data._write_arrays` writes it; its counts."""
        plan = self.plan
        dtype = np.dtype(plan.token_dtype)
        tokens = data._ArrayAppender(staging.kvstore("tokens"), dtype)
        offsets = data._ArrayAppender(staging.kvstore("offsets"), np.dtype(np.int64))
        offsets.append(np.zeros(1, np.int64))
        documents_per_source = np.zeros(len(plan.files), np.int64)
        num_tokens = 0
        for rank in range(tasks):
            part = plan.part_dir(rank)
            for chunk in _read_chunks(part / "tokens.bin", dtype):
                tokens.append(chunk)
            lengths = np.fromfile(part / "lengths.bin", np.int64)
            offsets.append(num_tokens + np.cumsum(lengths))
            num_tokens += int(lengths.sum())
            np.add.at(documents_per_source, np.fromfile(part / "sources.bin", np.int64), 1)
        tokens.flush()
        offsets.flush()
        if num_tokens == 0:
            raise DataError(f"empty corpus: {len(plan.files)} source file(s) contain no text (first: {plan.files[0]})")
        return {"num_tokens": num_tokens, "num_documents": int(documents_per_source.sum()),
                "documents_per_source": documents_per_source.tolist()}


def _read_chunks(path: Path, dtype: np.dtype, items: int = 1 << 24) -> Iterator[np.ndarray]:
    """A raw array file in pieces, so that merging a part does not hold it in memory whole."""
    total = path.stat().st_size // dtype.itemsize
    for start in range(0, total, items):
        yield np.fromfile(path, dtype, count=min(items, total - start), offset=start * dtype.itemsize)
