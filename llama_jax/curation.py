"""Corpus curation, stage by stage and resumable, on HF datatrove's executors (the engine `parallel_tokenize` uses).

- `quality`: documents failing Gopher's quality or repetition rules or C4's rules (C4 also drops lines) — datatrove's
  `GopherQualityFilter`, `GopherRepetitionFilter`, `C4QualityFilter`;
- `exact`: every copy after the first of a document with the same normalised text — datatrove's `simplify_text`,
  xxhash64;
- `minhash`: near-duplicates, documents whose word 5-gram Jaccard with an earlier kept document is at least the
  threshold — datasketch's `MinHash` and `MinHashLSH`, checked on the full signature, exactly near the threshold;
- `lines`: boilerplate, lines that occur in at least `line_min_documents` documents, cut from every document (one
  left with nothing else goes) — xxhash64 of the stripped line;
- `classifier` (optional, not in the default stages): documents whose quality classifier score is below
  `classifier_threshold` — `llama_jax.quality_classifier` (trained by `python -m train.quality_classifier`) at
  `classifier_path`; removed documents carry their `score`.

Each stage reads the previous stage's output (the first reads the sources: any format `llama_jax.documents` reads)
and writes, under `OUT/<stage>/`:
- `docs/NNNNN.jsonl.gz`: the kept documents, one shard per task, records `{"text", "id"}` (`id`: the source file and
  record number, carried through every stage) — so `OUT/<last stage>/docs` is directly a `data.path` for
  `train.pretrain`;
- `removed/NNNNN.jsonl.gz` (unless `keep_removed=False`): the removed documents with `reason` (and `duplicate_of`,
  `jaccard` for the de-duplication stages);
- `stats.json`: documents and bytes in and out, and documents and bytes removed per reason (bytes: UTF-8 of the
  text; `bytes_trimmed` counts what C4's line rules and the line stage cut out of kept documents, so
  `bytes_in = bytes_out + removed bytes + bytes_trimmed` and `documents_in = documents_out + removed documents`).

A stage is three kinds of datatrove step: a scan (per task: hashes, signatures or line counts of its documents), a
one-task decision (which documents, or lines, go: the only step that sees the whole corpus), and an apply (per task:
write kept and removed documents); `quality` is an apply alone. Every step writes its output under a temporary name
and renames it when complete, datatrove records every finished task, and `stats.json` is written last: running the
same curation again skips complete stages and finished tasks. `OUT/<stage>/inputs.json` records what the stage was
built from (its input files' sizes and times, the previous stage, the settings); a stage built from anything else is
redone, with every stage after it.

Near-duplicates (why datasketch rather than datatrove's MinHash pipeline): datatrove's MinHash stages remove every
document that shares one LSH bucket with another, so their precision is the S-curve's — at a 0.8 threshold a pair
with Jaccard 0.6 shares a bucket often. Here the LSH (datasketch, its bands chosen by `_optimal_param` to favour
recall) only proposes candidates among the documents kept so far; the full signature's estimate decides when it is
more than `minhash_verify_sigmas` (4) standard deviations from the threshold, and the exact Jaccard of the two
documents' shingle sets (their texts fetched by one more pass over the stage's input) decides the rest.
`scripts/bench_dedup.py` measures recall and false positives.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llama_jax.data import resolve_sources
from llama_jax.documents import DEFAULT_TEXT_FIELD, read_documents, source_path
from llama_jax.errors import ConfigError, DataError
from llama_jax.jsonl import read_jsonl

STAGES = ("quality", "exact", "minhash", "lines")
OPTIONAL_STAGES = ("classifier",)  # need a setting to run (classifier_path): never in the default stages
QUALITY_FILTERS = ("gopher_quality", "gopher_repetition", "c4")
EXECUTORS = ("local", "slurm", "ray")
STATS_FILE = "stats.json"
INPUTS_FILE = "inputs.json"
MINHASH_SCHEME = "affine32"  # datasketch's permutations (32-bit hash values)


@dataclasses.dataclass(frozen=True)
class CurationConfig:
    """Which stages run, in order, and their settings (defaults: datatrove's filter defaults, Jaccard 0.8)."""

    stages: tuple[str, ...] = STAGES
    quality_filters: tuple[str, ...] = QUALITY_FILTERS
    quality_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # filter -> its kwargs
    minhash_threshold: float = 0.8
    minhash_num_perm: int = 256
    minhash_ngram: int = 5
    minhash_seed: int = 1
    minhash_verify_sigmas: float = 4.0
    line_min_documents: int = 5
    classifier_path: str | None = None  # a folder train.quality_classifier saved
    classifier_threshold: float = 0.5

    def __post_init__(self):
        known = (*STAGES, *OPTIONAL_STAGES)
        unknown = [stage for stage in self.stages if stage not in known]
        if unknown or not self.stages or len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"stages {','.join(self.stages)!r}: expected distinct names among {','.join(known)}")
        if "classifier" in self.stages and self.classifier_path is None:
            raise ConfigError("stage classifier: needs classifier_path (a folder train.quality_classifier saved)")
        if not 0.0 <= self.classifier_threshold <= 1.0:
            raise ConfigError(f"classifier_threshold {self.classifier_threshold}: expected a probability in [0, 1]")
        bad = [name for name in (*self.quality_filters, *self.quality_options) if name not in QUALITY_FILTERS]
        if bad:
            raise ConfigError(f"quality filter {bad[0]!r} is not one of {QUALITY_FILTERS}")
        if not 0.0 < self.minhash_threshold <= 1.0:
            raise ConfigError(f"minhash threshold {self.minhash_threshold}: expected a Jaccard in (0, 1]")
        if self.minhash_num_perm < 16 or self.minhash_ngram < 1:
            raise ConfigError(f"minhash num_perm {self.minhash_num_perm} / ngram {self.minhash_ngram}: expected "
                              "num_perm >= 16 and ngram >= 1")
        if self.line_min_documents < 2:
            raise ConfigError(f"line_min_documents {self.line_min_documents}: expected at least 2")

    @property
    def minhash_band(self) -> tuple[float, float]:
        """Signature estimates of Jaccard below the first are not duplicates, from the second on they are; in
        between, the exact Jaccard of the two documents decides."""
        t = self.minhash_threshold
        sigma = math.sqrt(max(t * (1 - t), 0.01) / self.minhash_num_perm)
        return max(0.0, t - self.minhash_verify_sigmas * sigma), min(1.0, t + self.minhash_verify_sigmas * sigma)

    def stage_settings(self, stage: str) -> dict:
        if stage == "quality":
            return {"filters": list(self.quality_filters), "options": self.quality_options}
        if stage == "minhash":
            return {key: getattr(self, key) for key in ("minhash_threshold", "minhash_num_perm", "minhash_ngram",
                                                         "minhash_seed", "minhash_verify_sigmas")}
        if stage == "lines":
            return {"line_min_documents": self.line_min_documents}
        if stage == "classifier":
            from llama_jax.quality_classifier import classifier_fingerprint

            return {"classifier_path": str(self.classifier_path), "classifier_threshold": self.classifier_threshold,
                    "classifier_sha256": classifier_fingerprint(self.classifier_path)}
        return {}


@dataclasses.dataclass(frozen=True)
class StageResult:
    stage: str
    docs_dir: Path
    stats: dict
    skipped: bool  # complete from an earlier run


# ── Plans ────────────────────────────────────────────────────────────────────────────────────────────────────────
@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything a stage's tasks need, as plain values (the executor pickles it into worker processes or jobs)."""

    stage: str
    files: tuple[str, ...]
    cuts: tuple[int, ...]  # task i reads files[cuts[i]:cuts[i + 1]]
    sources: bool  # the first stage reads source files (any format); later ones the previous stage's shards
    text_field: str
    stage_dir: str
    keep_removed: bool
    config: CurationConfig

    @property
    def tasks(self) -> int:
        return len(self.cuts) - 1

    def path(self, *parts: str) -> Path:
        return Path(self.stage_dir, *parts)

    def documents(self, rank: int) -> Iterator[tuple[str, str]]:
        """(id, text) of task `rank`'s documents, in order."""
        for path in map(source_path, self.files[self.cuts[rank]:self.cuts[rank + 1]]):
            if self.sources:
                for number, text in enumerate(read_documents(path, self.text_field), 1):
                    yield f"{path}:{number}", text
            else:
                for _, record in read_jsonl(path, "curated shard"):
                    yield record["id"], record["text"]


def curate(sources: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
           config: CurationConfig | None = None, *, workers: int = 1, tasks: int | None = None,
           executor: str = "local", text_field: str = DEFAULT_TEXT_FIELD, keep_removed: bool = True,
           executor_options: dict[str, Any] | None = None) -> list[StageResult] | None:
    """Run `config.stages` in order over `sources`' documents, into `out_dir/<stage>/` (see the module docstring).
    `tasks` (default: `workers`) shards of the work run on datatrove's `executor` ("local": `workers` processes;
    "slurm"/"ray": jobs with `executor_options`). Returns each stage's result, the last one's `docs_dir` being the
    curated corpus; None when a SLURM/Ray run was submitted and has still to finish (call again once it has)."""
    config = config or CurationConfig()
    if executor not in EXECUTORS:
        raise ConfigError(f"executor {executor!r} is not one of {EXECUTORS}")
    if workers < 1 or (tasks is not None and tasks < 1):
        raise ConfigError(f"workers {workers} / tasks {tasks}: expected positive counts")
    paths = resolve_sources(sources)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: output exists and is not a folder")
    tasks = max(1, min(tasks or workers, len(paths)))
    plans, fingerprints = [], []
    previous: dict | None = None
    for index, stage in enumerate(config.stages):
        stage_dir = out / stage
        if index == 0:
            files = tuple(map(str, paths))
            cuts = _cuts([path.stat().st_size for path in paths], tasks)
            inputs = [[str(path), path.stat().st_size, path.stat().st_mtime_ns] for path in paths]
        else:
            files = tuple(str(out / config.stages[index - 1] / "docs" / f"{rank:05d}.jsonl.gz")
                          for rank in range(tasks))
            cuts = tuple(range(tasks + 1))
            inputs = None
        fingerprint = {"stage": stage, "inputs": inputs, "previous": previous, "tasks": tasks,
                       "text_field": text_field if index == 0 else "text", "settings": config.stage_settings(stage)}
        plans.append(_Plan(stage, files, cuts, index == 0, text_field, str(stage_dir), keep_removed, config))
        fingerprints.append(fingerprint)
        previous = fingerprint

    results: list[StageResult] = []
    chain = None
    redo = False
    for plan, fingerprint in zip(plans, fingerprints):
        stage_dir = Path(plan.stage_dir)
        stats = _complete_stats(stage_dir, fingerprint)
        if stats is not None and not redo:
            results.append(StageResult(plan.stage, stage_dir / "docs", stats, True))
            continue
        redo = True  # every stage after one that is (re)built is rebuilt: its input may change
        if _read_json(stage_dir / INPUTS_FILE) != fingerprint or stats is not None:
            shutil.rmtree(stage_dir, ignore_errors=True)
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / INPUTS_FILE).write_text(json.dumps(fingerprint, indent=1))
        chain = _stage_executors(plan, executor, workers, chain, executor_options)
        results.append(StageResult(plan.stage, stage_dir / "docs", {}, False))
    if chain is not None:
        chain.run()
    final = []
    for result in results:
        if result.skipped:
            final.append(result)
            continue
        stats = _read_json(Path(result.docs_dir).parent / STATS_FILE)
        if stats is None:
            return None  # submitted to a scheduler: not finished yet
        final.append(dataclasses.replace(result, stats=stats))
    return final


def _complete_stats(stage_dir: Path, fingerprint: dict) -> dict | None:
    stats = _read_json(stage_dir / STATS_FILE)
    return stats if stats is not None and _read_json(stage_dir / INPUTS_FILE) == fingerprint else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cuts(sizes: Sequence[int], tasks: int) -> tuple[int, ...]:
    """Boundaries cutting files into `tasks` runs of consecutive files, each about total/tasks bytes, none empty."""
    if tasks >= len(sizes):
        return tuple(range(len(sizes) + 1))
    cumulative = np.cumsum([max(1, size) for size in sizes])
    targets = cumulative[-1] * np.arange(1, tasks) / tasks
    inner = np.searchsorted(cumulative, targets, side="left") + 1
    cuts = [0]
    for cut in inner.tolist():  # strictly increasing and leaving a file for every later task
        cuts.append(min(max(cut, cuts[-1] + 1), len(sizes) - (tasks - len(cuts))))
    return (*cuts, len(sizes))


def _stage_executors(plan: _Plan, kind: str, workers: int, depends: Any, options: dict[str, Any] | None):
    from llama_jax.parallel_tokenize import datatrove_executor

    logs = plan.path("logs")
    if plan.stage not in ("quality", "classifier"):  # those two decide document by document: an apply alone
        depends = datatrove_executor(kind, [_ScanTask(plan)], plan.tasks, workers, logs / "scan", depends, options)
        depends = datatrove_executor(kind, [_DecideStep(plan)], 1, 1, logs / "decide", depends, options)
    depends = datatrove_executor(kind, [_ApplyTask(plan)], plan.tasks, workers, logs / "apply", depends, options)
    return datatrove_executor(kind, [_SummaryStep(plan)], 1, 1, logs / "summary", depends, options)


# ── Writing files whole ──────────────────────────────────────────────────────────────────────────────────────────
def _staging(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")


def _write_json(path: Path, value: Any) -> None:
    staging = _staging(path)
    staging.write_text(json.dumps(value, indent=1))
    os.replace(staging, path)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    staging = _staging(path)
    with open(staging, "wb") as file:
        np.savez(file, **arrays)
    os.replace(staging, path)


class _ShardWriter:
    """A gzip'd JSON lines file written under a temporary name; `commit` renames it into place."""

    def __init__(self, path: Path | None):
        self.path = path
        self.staging = _staging(path) if path else None
        self.file = gzip.open(self.staging, "wt", encoding="utf-8", compresslevel=3) if path else None

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        if self.file:
            self.file.close()
            os.replace(self.staging, self.path)

    def discard(self) -> None:
        if self.file:
            self.file.close()
            self.staging.unlink(missing_ok=True)


# ── Normalisation and hashing (datatrove's) ──────────────────────────────────────────────────────────────────────
def _hash64():
    from datatrove.utils.hashing import HashConfig, create_hash_func

    hash_bytes = create_hash_func(HashConfig(precision=64, hash_fc="xxhash"), bytes)
    return lambda text: hash_bytes(text.encode("utf-8"))


def _simplify(text: str) -> str:
    from datatrove.utils.text import simplify_text

    return simplify_text(text)


def shingles(text: str, ngram: int) -> set[bytes]:
    """The word n-grams of a document's normalised text (lower case, no punctuation, numbers as 0): the sets whose
    Jaccard the `minhash` stage estimates. A document of fewer than `ngram` words is one shingle."""
    words = _simplify(text).split()
    if len(words) <= ngram:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + ngram]).encode() for i in range(len(words) - ngram + 1)}


def _signature(texts: Sequence[str], config: CurationConfig) -> np.ndarray:
    from datasketch import MinHash

    minhashes = MinHash.bulk([list(shingles(text, config.minhash_ngram)) for text in texts],
                             num_perm=config.minhash_num_perm, seed=config.minhash_seed, scheme=MINHASH_SCHEME)
    return np.array([m.hashvalues for m in minhashes], np.uint32).reshape(len(texts), config.minhash_num_perm)


def _nonblank_lines(text: str) -> set[str]:
    return {line.strip() for line in text.splitlines() if line.strip()}


# ── The steps (datatrove pipeline steps: callables (data, rank, world_size)) ──────────────────────────────────────
class _ScanTask:
    """Per task: what the decision needs of its documents (ids and hashes, signatures, or line counts)."""

    def __init__(self, plan: _Plan):
        self.plan = plan

    def __call__(self, _data, rank: int = 0, world_size: int = 1) -> None:
        plan = self.plan
        out = plan.path("work", "scan", f"{rank:05d}.npz")
        if out.exists():
            return
        ids: list[str] = []
        if plan.stage == "lines":
            hash64 = _hash64()
            counts: Counter = Counter()
            for _, text in plan.documents(rank):
                counts.update({hash64(line) for line in _nonblank_lines(text)})
            keys = np.fromiter(counts.keys(), np.uint64, len(counts))
            _save_npz(out, hashes=keys, counts=np.fromiter(counts.values(), np.int64, len(counts)))
            return
        if plan.stage == "exact":
            hash64 = _hash64()
            hashes = []
            for doc_id, text in plan.documents(rank):
                ids.append(doc_id)
                hashes.append(hash64(_simplify(text)))
            _save_npz(out, ids=np.array(ids, dtype=str), hashes=np.array(hashes, np.uint64))
            return
        blocks, texts = [], []
        for doc_id, text in plan.documents(rank):
            ids.append(doc_id)
            texts.append(text)
            if len(texts) == 512:
                blocks.append(_signature(texts, plan.config))
                texts = []
        blocks.append(_signature(texts, plan.config))
        _save_npz(out, ids=np.array(ids, dtype=str), signatures=np.concatenate(blocks))


class _DecideStep:
    """One task, once every scan is done: the documents (per task: index -> details) or lines that go."""

    def __init__(self, plan: _Plan):
        self.plan = plan

    def __call__(self, _data, rank: int = 0, world_size: int = 1) -> None:
        plan = self.plan
        done = plan.path("work", "decision", "done")
        if done.exists():
            return
        scans = [np.load(plan.path("work", "scan", f"{task:05d}.npz")) for task in range(plan.tasks)]
        if plan.stage == "lines":
            hashes = np.concatenate([scan["hashes"] for scan in scans])
            counts = np.concatenate([scan["counts"] for scan in scans])
            unique, inverse = np.unique(hashes, return_inverse=True)
            totals = np.bincount(inverse, weights=counts, minlength=len(unique))
            _save_npz(plan.path("work", "decision", "lines.npz"),
                      hashes=unique[totals >= plan.config.line_min_documents])
        else:
            decide = self._exact if plan.stage == "exact" else self._near
            for task, removed in enumerate(decide(scans)):
                _write_json(plan.path("work", "decision", f"{task:05d}.json"), removed)
        done.write_text("")

    def _exact(self, scans) -> list[dict]:
        first: dict[int, str] = {}
        removed = []
        for scan in scans:
            task_removed = {}
            for index, (doc_id, value) in enumerate(zip(scan["ids"].tolist(), scan["hashes"].tolist())):
                if value in first:
                    task_removed[index] = {"duplicate_of": first[value]}
                else:
                    first[value] = doc_id
            removed.append(task_removed)
        return removed

    def _near(self, scans) -> list[dict]:
        """Greedy in corpus order: a document goes when an earlier kept document's signature estimate reaches
        `minhash_band`'s upper end (4 standard deviations above the threshold); estimates within the band are
        settled by the exact Jaccard of the two documents' shingles, whose texts one more pass over the stage's
        input fetches (only those documents' texts are held)."""
        from datasketch import LeanMinHash, MinHashLSH
        from datasketch.lsh import _optimal_param

        config = self.plan.config
        low, high = config.minhash_band
        # bands chosen for the band's low end, weighing a missed pair 19 times a spurious candidate
        bands, rows = _optimal_param(max(low, 0.05), config.minhash_num_perm, 0.05, 0.95)
        lsh = MinHashLSH(num_perm=config.minhash_num_perm, params=(bands, rows))
        kept: dict[str, np.ndarray] = {}
        removed: list[dict] = []
        pending: dict[tuple[int, int], tuple[str, list[tuple[float, str]]]] = {}  # (task, index) -> id, candidates
        for task, scan in enumerate(scans):
            task_removed = {}
            for index, (doc_id, signature) in enumerate(zip(scan["ids"].tolist(), scan["signatures"])):
                sketch = LeanMinHash(seed=config.minhash_seed, hashvalues=signature, scheme=MINHASH_SCHEME)
                estimates = sorted(((float(np.mean(kept[candidate] == signature)), candidate)
                                    for candidate in lsh.query(sketch)), reverse=True)
                if estimates and estimates[0][0] >= high:
                    task_removed[index] = {"duplicate_of": estimates[0][1], "jaccard": round(estimates[0][0], 4)}
                    continue
                uncertain = [(estimate, candidate) for estimate, candidate in estimates if estimate >= low]
                if uncertain:
                    pending[task, index] = doc_id, uncertain
                if doc_id not in kept:  # kept unless the exact check below finds it a duplicate
                    kept[doc_id] = signature
                    lsh.insert(doc_id, sketch, check_duplication=False)
            removed.append(task_removed)
        if pending:
            texts = self._texts({doc_id for doc_id, _ in pending.values()} |
                                {candidate for _, uncertain in pending.values() for _, candidate in uncertain})
            for (task, index), (doc_id, uncertain) in pending.items():
                mine = shingles(texts[doc_id], config.minhash_ngram)
                for _, candidate in uncertain:
                    theirs = shingles(texts[candidate], config.minhash_ngram)
                    exact = len(mine & theirs) / len(mine | theirs)
                    if exact >= config.minhash_threshold:
                        removed[task][index] = {"duplicate_of": candidate, "jaccard": round(exact, 4), "exact": True}
                        break
        return removed

    def _texts(self, wanted: set[str]) -> dict[str, str]:
        texts = {}
        for task in range(self.plan.tasks):
            for doc_id, text in self.plan.documents(task):
                if doc_id in wanted:
                    texts[doc_id] = text
        return texts


class _ApplyTask:
    """Per task: its documents, kept ones into `docs/`, removed ones (with why) into `removed/`, and its counts."""

    def __init__(self, plan: _Plan):
        self.plan = plan

    def __call__(self, _data, rank: int = 0, world_size: int = 1) -> None:
        plan = self.plan
        stats_path = plan.path("work", "stats", f"{rank:05d}.json")
        if stats_path.exists():
            return
        stats = {"documents_in": 0, "bytes_in": 0, "documents_out": 0, "bytes_out": 0, "bytes_trimmed": 0,
                 "removed": {}}
        if plan.stage == "lines":
            stats["lines_removed"] = 0
        docs = _ShardWriter(plan.path("docs", f"{rank:05d}.jsonl.gz"))
        removed = _ShardWriter(plan.path("removed", f"{rank:05d}.jsonl.gz") if plan.keep_removed else None)
        decide = self._decider(rank, stats)
        try:
            for index, (doc_id, text) in enumerate(plan.documents(rank)):
                size = len(text.encode("utf-8"))
                stats["documents_in"] += 1
                stats["bytes_in"] += size
                new_text, reason, details = decide(index, doc_id, text)
                if reason is None:
                    new_size = len(new_text.encode("utf-8")) if new_text is not text else size
                    stats["documents_out"] += 1
                    stats["bytes_out"] += new_size
                    stats["bytes_trimmed"] += size - new_size
                    docs.write({"text": new_text, "id": doc_id})
                else:
                    counts = stats["removed"].setdefault(reason, {"documents": 0, "bytes": 0})
                    counts["documents"] += 1
                    counts["bytes"] += size
                    removed.write({"text": text, "id": doc_id, "reason": reason, **details})
        except BaseException:
            docs.discard()
            removed.discard()
            raise
        docs.commit()
        removed.commit()
        _write_json(stats_path, stats)

    def _decider(self, rank: int, stats: dict):
        """A function (index, id, text) -> (text to keep, removal reason or None, details)."""
        plan = self.plan
        if plan.stage == "quality":
            filters = _quality_filters(plan.config)

            def quality(index, doc_id, text):
                from datatrove.data import Document
                from datatrove.pipeline.filters.base_filter import get_filter_result

                document = Document(text=text, id=doc_id)
                for name, step in filters:
                    keep, why = get_filter_result(step.filter(document))
                    if not keep:
                        return text, f"{name}/{why or 'rejected'}", {}
                return document.text, None, {}
            return quality
        if plan.stage == "classifier":
            from llama_jax.quality_classifier import classifier_decider

            return classifier_decider(plan.config.classifier_path, plan.config.classifier_threshold)
        if plan.stage == "lines":
            boilerplate = set(np.load(plan.path("work", "decision", "lines.npz"))["hashes"].tolist())
            hash64 = _hash64()

            def lines(index, doc_id, text):
                kept, dropped = [], 0
                for line in text.splitlines(keepends=True):
                    if line.strip() and hash64(line.strip()) in boilerplate:
                        dropped += 1
                    else:
                        kept.append(line)
                stats["lines_removed"] += dropped
                if not dropped:
                    return text, None, {}
                new_text = "".join(kept)
                if not text.endswith(("\n", "\r")):  # a cut last line takes the line break before it along
                    new_text = new_text.rstrip("\r\n")
                if not new_text.strip():
                    return text, "lines/only_boilerplate", {"lines_removed": dropped}
                return new_text, None, {}
            return lines
        removed = {int(index): details for index, details in
                   json.loads(plan.path("work", "decision", f"{rank:05d}.json").read_text()).items()}
        reason = "exact_duplicate" if plan.stage == "exact" else "near_duplicate"

        def dedup(index, doc_id, text):
            details = removed.get(index)
            return (text, None, {}) if details is None else (text, reason, details)
        return dedup


def _quality_filters(config: CurationConfig) -> list[tuple[str, Any]]:
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    classes = {"gopher_quality": GopherQualityFilter, "gopher_repetition": GopherRepetitionFilter,
               "c4": C4QualityFilter}
    return [(name, classes[name](**config.quality_options.get(name, {}))) for name in config.quality_filters]


class _SummaryStep:
    """One task, once every apply is done: the stage's stats.json (which marks the stage complete)."""

    def __init__(self, plan: _Plan):
        self.plan = plan

    def __call__(self, _data, rank: int = 0, world_size: int = 1) -> None:
        plan = self.plan
        parts = [_read_json(plan.path("work", "stats", f"{task:05d}.json")) for task in range(plan.tasks)]
        if any(part is None for part in parts):
            missing = [task for task, part in enumerate(parts) if part is None]
            raise DataError(f"{plan.stage_dir}: tasks {missing} have no counts; run the curation again to redo them")
        total: dict[str, Any] = {"stage": plan.stage}
        for key in parts[0]:
            if key != "removed":
                total[key] = sum(part[key] for part in parts)
        removed: dict[str, dict[str, int]] = {}
        for part in parts:
            for reason, counts in part["removed"].items():
                into = removed.setdefault(reason, {"documents": 0, "bytes": 0})
                into["documents"] += counts["documents"]
                into["bytes"] += counts["bytes"]
        total["removed"] = dict(sorted(removed.items(), key=lambda item: -item[1]["documents"]))
        total["documents_removed"] = sum(counts["documents"] for counts in removed.values())
        total["bytes_removed"] = sum(counts["bytes"] for counts in removed.values())
        total["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        shutil.rmtree(plan.path("work", "scan"), ignore_errors=True)  # signatures: large, no longer needed
        _write_json(plan.path(STATS_FILE), total)


def describe(stats: dict) -> str:
    """One line: documents and bytes in -> out, and the removal reasons."""
    reasons = ", ".join(f"{reason} {counts['documents']:,}" for reason, counts in stats["removed"].items())
    line = (f"{stats['documents_in']:,} docs ({_size(stats['bytes_in'])}) -> {stats['documents_out']:,} docs "
            f"({_size(stats['bytes_out'])}); removed {stats['documents_removed']:,} docs "
            f"({_size(stats['bytes_removed'])})" + (f": {reasons}" if reasons else ""))
    if stats.get("bytes_trimmed"):
        line += f"; trimmed {_size(stats['bytes_trimmed'])} from kept docs"
    if stats.get("lines_removed"):
        line += f" ({stats['lines_removed']:,} lines)"
    return line


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count} B"
