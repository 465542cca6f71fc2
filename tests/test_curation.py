"""llama_jax.curation and train.curate on tiny hand-made corpora: each stage removes what it should and keeps the rest,
the counts add up, removed documents are written aside with their reason, complete stages are skipped on a rerun, bad
input is one DataError naming the path, and the curated folder reads back with llama_jax.documents."""
from __future__ import annotations

import gzip
import json
import random
import re

import pytest

from llama_jax.curation import CurationConfig, curate
from llama_jax.data import resolve_sources
from llama_jax.documents import read_documents
from llama_jax.errors import ConfigError, DataError

BOILERPLATE = "Subscribe to our newsletter for more updates every week."  # in 5 documents: removed
SHARED = "Please share this page with your friends and family."  # in 4 documents: below the 5-document bar, kept
_SYLLABLES = ("ka", "lo", "mi", "ter", "an", "vel", "dor", "pra", "nu", "sen", "tol", "ber", "gri", "fen", "ru", "zen")
_STOP = ("the", "of", "and", "to", "that", "with", "have", "be", "is", "in")


def _words(rng: random.Random, count: int) -> list[str]:
    vocab = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(800)})
    return [rng.choice(_STOP) if rng.random() < 0.25 else rng.choice(vocab) for _ in range(count)]


def _text(words: list[str]) -> str:
    """Sentences of 10 words, 3 to a line: prose that passes Gopher's and C4's rules."""
    sentences = [" ".join(words[i:i + 10]).capitalize() + "." for i in range(0, len(words), 10)]
    return "\n".join(" ".join(sentences[i:i + 3]) for i in range(0, len(sentences), 3))


def _reference_jaccard(a: str, b: str, n: int = 5) -> float:
    """Independent reference: word 5-grams of the lower-cased words."""
    def grams(text):
        words = re.findall(r"\w+", text.lower())
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}
    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y)


def _corpus(rng: random.Random) -> tuple[list[str], dict]:
    originals = [_words(rng, 10 * rng.randint(15, 25)) for _ in range(12)]  # whole sentences: C4 keeps every line
    texts = [_text(words) for words in originals]
    for index in range(2, 7):
        texts[index] += "\n" + BOILERPLATE
    for index in range(7, 11):
        texts[index] += "\n" + SHARED
    near = [rng.choice(originals[5]) if position in (40, 120) else word
            for position, word in enumerate(originals[1])]  # 2 of ~200 words replaced
    far = [rng.choice(originals[5]) if rng.random() < 0.15 else word for word in originals[3]]
    extra = {
        "exact": texts[0].replace(" ", "  "),  # the same text once spaces are normalised
        "near": _text(near),
        "far": _text(far),
        "short": "$$$ ### !!! %%%",
        "repetitive": " ".join(["The cat and the dog have to be with that one of them again."] * 30),
    }
    return texts + list(extra.values()), extra


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = tmp_path_factory.mktemp("curation")
    texts, extra = _corpus(random.Random(0))
    # two source files of two formats, so that the stages run as 2 tasks
    (root / "a.jsonl").write_text("".join(json.dumps({"body": text}) + "\n" for text in texts[:9]))
    with gzip.open(root / "b.jsonl.gz", "wt") as file:
        file.writelines(json.dumps({"body": text}) + "\n" for text in texts[9:])
    results = curate([root / "a.jsonl", root / "b.jsonl.gz"], root / "out", CurationConfig(), tasks=2,
                     text_field="body")
    ids = {f"{root / 'a.jsonl'}:{i + 1}": text for i, text in enumerate(texts[:9])}
    ids.update({f"{root / 'b.jsonl.gz'}:{i + 1}": text for i, text in enumerate(texts[9:])})
    return root, texts, extra, {result.stage: result for result in results}, ids


def _removed(root, stage) -> list[dict]:
    records = []
    for path in sorted((root / "out" / stage / "removed").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as file:
            records.extend(map(json.loads, file))
    return records


def _id_of(ids, text):
    return next(doc_id for doc_id, value in ids.items() if value == text)


def test_quality_removes_short_and_repetitive_documents_with_reasons(curated):
    root, texts, extra, results, ids = curated
    removed = {record["id"]: record["reason"] for record in _removed(root, "quality")}
    assert removed == {_id_of(ids, extra["short"]): "gopher_quality/gopher_short_doc",
                       _id_of(ids, extra["repetitive"]): removed[_id_of(ids, extra["repetitive"])]}
    assert removed[_id_of(ids, extra["repetitive"])].startswith("gopher_repetition/")
    assert results["quality"].stats["documents_in"] == len(texts) == 17
    assert results["quality"].stats["documents_out"] == 15


def test_exact_removes_the_normalised_copy_once(curated):
    root, texts, extra, results, ids = curated
    [record] = _removed(root, "exact")
    assert record["reason"] == "exact_duplicate"
    assert record["id"] == _id_of(ids, extra["exact"]) and record["duplicate_of"] == _id_of(ids, texts[0])


def test_minhash_removes_the_near_copy_and_keeps_the_far_one(curated):
    root, texts, extra, results, ids = curated
    assert _reference_jaccard(extra["near"], texts[1]) >= 0.85  # the planted pairs are what the test says
    assert _reference_jaccard(extra["far"], texts[3]) < 0.5
    [record] = _removed(root, "minhash")
    assert record["reason"] == "near_duplicate"
    assert record["id"] == _id_of(ids, extra["near"]) and record["duplicate_of"] == _id_of(ids, texts[1])
    assert record["jaccard"] >= 0.8


def test_lines_cuts_boilerplate_from_every_document_and_keeps_rarer_lines(curated):
    root, texts, extra, results, ids = curated
    final = [text for path in resolve_sources(results["lines"].docs_dir) for text in read_documents(path)]
    assert len(final) == 13  # 17 - short - repetitive - exact copy - near copy
    assert not any(BOILERPLATE in text for text in final)
    assert sum(SHARED in text for text in final) == 4
    stats = results["lines"].stats
    assert stats["lines_removed"] == 5 and stats["documents_removed"] == 0
    assert stats["bytes_trimmed"] == 5 * len((BOILERPLATE + "\n").encode())  # the line and its line break
    assert set(final) == {text.replace("\n" + BOILERPLATE, "") for text in texts[:12]} | {extra["far"]}


def test_counts_add_up_and_match_the_files(curated):
    root, texts, extra, results, ids = curated
    previous_out = len(texts)
    for stage in ("quality", "exact", "minhash", "lines"):
        stats = json.loads((root / "out" / stage / "stats.json").read_text())
        assert stats == results[stage].stats
        assert stats["documents_in"] == previous_out
        assert stats["documents_in"] == stats["documents_out"] + stats["documents_removed"]
        assert stats["bytes_in"] == stats["bytes_out"] + stats["bytes_removed"] + stats["bytes_trimmed"]
        removed = _removed(root, stage)
        assert len(removed) == stats["documents_removed"]
        assert sum(len(record["text"].encode()) for record in removed) == stats["bytes_removed"]
        kept = [text for path in resolve_sources(results[stage].docs_dir) for text in read_documents(path)]
        assert len(kept) == stats["documents_out"] and sum(len(t.encode()) for t in kept) == stats["bytes_out"]
        previous_out = stats["documents_out"]
    assert results["quality"].stats["bytes_in"] == sum(len(text.encode()) for text in texts)


def test_rerun_skips_complete_stages_and_redoes_changed_ones(curated):
    root, texts, extra, results, ids = curated
    sources = [root / "a.jsonl", root / "b.jsonl.gz"]
    shards = sorted((root / "out").glob("*/docs/*.jsonl.gz"))
    times = [path.stat().st_mtime_ns for path in shards]
    again = curate(sources, root / "out", CurationConfig(), tasks=2, text_field="body")
    assert [result.skipped for result in again] == [True] * 4
    assert [result.stats for result in again] == [results[stage].stats for stage in results]
    assert [path.stat().st_mtime_ns for path in shards] == times
    # a lower boilerplate bar redoes the line stage alone, which now cuts the 4-document line too
    changed = curate(sources, root / "out", CurationConfig(line_min_documents=4), tasks=2, text_field="body")
    assert [result.skipped for result in changed] == [True, True, True, False]
    assert changed[-1].stats["lines_removed"] == 9
    untouched = [(path, time) for path, time in zip(shards, times) if path.parent.parent.name != "lines"]
    assert len(untouched) == 6 and all(path.stat().st_mtime_ns == time for path, time in untouched)


def test_no_removed_writes_nothing_aside(tmp_path):
    texts, _ = _corpus(random.Random(1))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    [result] = curate(tmp_path / "a.jsonl", tmp_path / "out", CurationConfig(stages=("exact",)), keep_removed=False)
    assert result.stats["documents_removed"] == 1
    assert not list((tmp_path / "out" / "exact").glob("removed/*"))


def test_bad_input_is_one_data_error_naming_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "missing.jsonl")):
        curate(tmp_path / "missing.jsonl", tmp_path / "out")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataError, match=re.escape(f"{broken}:2")):
        curate(broken, tmp_path / "out", CurationConfig(stages=("exact",)))
    with pytest.raises(ConfigError, match="stages"):
        CurationConfig(stages=("quality", "bogus"))


def test_program_prints_a_line_per_stage_and_one_error_line(tmp_path, capsys):
    from llama_jax.cli import run_program
    from train.curate import main

    texts, _ = _corpus(random.Random(2))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    assert main([str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"), "--stages", "exact,lines"]) == 0
    lines = capsys.readouterr().out.splitlines()
    [exact] = [line for line in lines if line.startswith("exact: ")]
    assert "17 docs" in exact and "-> 16 docs" in exact and "exact_duplicate 1" in exact
    assert any(line.startswith("lines: ") and "5 lines" in line for line in lines)
    assert lines[-1] == f"curated: {tmp_path / 'out' / 'lines' / 'docs'}"
    with pytest.raises(SystemExit) as exit_info:
        run_program(main, [str(tmp_path / "nothing.jsonl"), "--out", str(tmp_path / "out2")])
    assert exit_info.value.code == 2
    [error] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert error.startswith("error: ") and "nothing.jsonl" in error
