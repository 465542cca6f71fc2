"""The quality classifier (llama_jax.quality_classifier, train.quality_classifier): trained on synthetic labelled
text it separates held-out examples, saves and loads back to the same scores, scores by its documented formula,
rejects bad labelled files with one error naming file:line, and as a curation stage keeps and removes documents by
threshold with the stages' counts."""
import gzip
import json

import numpy as np
import pytest

from llama_jax.errors import DataError
from llama_jax.quality_classifier import (
    FeatureSettings,
    QualityClassifier,
    load_labelled,
    train_classifier,
)

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we their been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such like "
         "our over man me even most made after also did many before must through back years where much your way "
         "well down should because each just those people how too little state good very make world still own see "
         "men work long get here between both life being under never day same another know while last might us "
         "great old year off come since against go came right used take three river garden letter morning village "
         "summer window teacher question history language market station story music family evening").split()
BOILERPLATE = ["Click here to subscribe to our newsletter!", "All rights reserved.", "Accept all cookies",
               "Share on Facebook | Tweet | Pin it", "Home > Products > Sale", "Terms of Service | Privacy Policy"]
SPAM = ["BUY NOW!!! CHEAP $$$ BEST PRICE!!!", "WIN A FREE IPHONE >>> CLICK <<<", "100% FREE!!! NO CREDIT CARD!!!",
        "hot deals hot deals hot deals", "$$$ MAKE MONEY FAST $$$"]


def clean_text(rng: np.random.Generator) -> str:
    sentences = []
    for _ in range(rng.integers(3, 8)):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(6, 16))]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"]))
    return " ".join(sentences)


def junk_text(rng: np.random.Generator) -> str:
    kind = rng.integers(0, 3)
    if kind == 0:  # keyboard mash
        keys = "qwertyuiopasdfghjklzxcvbnm;,./[]1234567890"
        return " ".join("".join(rng.choice(list(keys), rng.integers(3, 12))) for _ in range(rng.integers(10, 40)))
    if kind == 1:  # boilerplate
        return "\n".join(rng.choice(BOILERPLATE) for _ in range(rng.integers(3, 10)))
    return "\n".join(rng.choice(SPAM) for _ in range(rng.integers(2, 8)))  # spam


def labelled(count: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count)
    return [clean_text(rng) if label else junk_text(rng) for label in labels], labels


@pytest.fixture(scope="module")
def trained():
    texts, labels = labelled(200, seed=0)
    return train_classifier(texts, labels, settings=FeatureSettings(n_features=1 << 14))


def test_separates_held_out_examples_far_above_chance(trained):
    texts, labels = labelled(200, seed=1)  # other draws than the training ones
    chance = max(labels.mean(), 1 - labels.mean())
    accuracy = np.mean((trained.scores(texts) >= 0.5) == (labels == 1))
    assert chance < 0.6 and accuracy >= 0.9, (accuracy, chance)


def test_scores_follow_the_documented_formula(trained):
    """sigmoid(hashed word 1-2-grams and char 1-4-grams, each L2-normalised, · weights + intercept), in numpy."""
    from sklearn.feature_extraction.text import HashingVectorizer

    texts, _ = labelled(20, seed=2)
    common = dict(n_features=1 << 14, alternate_sign=False, norm="l2")
    words = HashingVectorizer(analyzer="word", ngram_range=(1, 2), token_pattern=r"\w+|[^\w\s]+", **common)
    chars = HashingVectorizer(analyzer="char", ngram_range=(1, 4), **common)
    features = np.hstack([words.transform(texts).toarray(), chars.transform(texts).toarray()]).astype(np.float64)
    expected = 1.0 / (1.0 + np.exp(-(features @ trained.weights + trained.intercept)))
    np.testing.assert_allclose(trained.scores(texts), expected, rtol=1e-12, atol=1e-15)


def test_save_and_load_give_identical_scores(trained, tmp_path):
    texts, _ = labelled(50, seed=3)
    loaded = QualityClassifier.load(trained.save(tmp_path / "classifier"))
    assert np.array_equal(loaded.scores(texts), trained.scores(texts))
    assert loaded.settings == trained.settings


def test_the_training_program_reports_accuracy_and_saves(tmp_path, capsys):
    from train.quality_classifier import main

    texts, labels = labelled(120, seed=4)
    data = tmp_path / "labelled.jsonl"  # as scores from a judge, labelled at a threshold
    data.write_text("".join(json.dumps({"text": text, "score": 4.0 if label else 1.5}) + "\n"
                            for text, label in zip(texts, labels)))
    assert main(["--data", str(data), "--out", str(tmp_path / "out"), "--score-threshold", "3",
                 "--valid-fraction", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert "held out 30 of 120 examples: accuracy" in printed
    classifier = QualityClassifier.load(tmp_path / "out")
    assert classifier.record["held_out"]["accuracy"] >= 0.9
    held_texts, held_labels = labelled(60, seed=5)
    assert np.mean((classifier.scores(held_texts) >= 0.5) == (held_labels == 1)) >= 0.9


@pytest.mark.parametrize("lines, message", [
    ([{"text": "a", "label": 1}, {"text": "b"}], ':2: no "label" (0 or 1) and no "score"'),
    ([{"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": 2}], ":3: label 2: expected 0 or 1"),
    ([{"text": "a", "label": "1"}], ':1: label "1": expected 0 or 1'),
    ([{"text": "a", "label": True}], ":1: label true: expected 0 or 1"),
    ([{"label": 1}], ':1: no "text" string'),
    ([{"text": "a", "score": 0.3}], ':1: a "score" but no score threshold'),
    ([], ": no labelled examples"),
    ([{"text": "a", "label": 1}, {"text": "b", "label": 1}], ": all 2 examples have label 1"),
])
def test_bad_labelled_files_are_one_error_naming_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(DataError) as error:
        load_labelled(path)
    assert str(error.value) == f"{path}{message}" or str(error.value).startswith(f"{path}{message}")


def read_shard(path):
    with gzip.open(path, "rt", encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def test_the_stage_keeps_documents_at_or_above_the_threshold(trained, tmp_path, capsys):
    """`train.curate --stages exact,classifier --classifier DIR`: the documents the classifier scores at least the
    threshold are kept, the others removed with their score; stats count them; a rerun is skipped and another
    threshold rebuilds the stage."""
    from train.curate import main

    texts, labels = labelled(60, seed=6)
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts + texts[:5]))  # 5 exact copies
    scores = trained.scores(texts)
    threshold = 0.5
    trained.save(tmp_path / "model")

    def curate(threshold: float) -> dict:
        assert main([str(source), "--out", str(tmp_path / "curated"), "--stages", "exact,classifier",
                     "--classifier", str(tmp_path / "model"), "--classifier-threshold", str(threshold)]) == 0
        return json.loads((tmp_path / "curated" / "classifier" / "stats.json").read_text())

    stats = curate(threshold)
    assert "classifier: 60 docs" in capsys.readouterr().out
    stage = tmp_path / "curated" / "classifier"
    kept = [record for path in sorted((stage / "docs").glob("*.jsonl.gz")) for record in read_shard(path)]
    removed = [record for path in sorted((stage / "removed").glob("*.jsonl.gz")) for record in read_shard(path)]
    line = {record["id"]: int(record["id"].rsplit(":", 1)[1]) - 1 for record in kept + removed}
    assert [line[record["id"]] for record in kept] == [i for i in range(60) if scores[i] >= threshold]
    assert sorted(line[record["id"]] for record in removed) == [i for i in range(60) if scores[i] < threshold]
    for record in removed:
        assert record["reason"] == "classifier" and record["score"] == pytest.approx(scores[line[record["id"]]],
                                                                                      abs=1e-6)
    assert np.mean([labels[line[record["id"]]] == 0 for record in removed]) >= 0.9
    sizes = [len(text.encode()) for text in texts]
    assert stats["documents_in"] == 60 and stats["bytes_in"] == sum(sizes)
    assert stats["documents_out"] == len(kept)
    assert stats["bytes_out"] == sum(size for size, score in zip(sizes, scores) if score >= threshold)
    assert stats["removed"]["classifier"] == {"documents": len(removed),
                                              "bytes": sum(size for size, s in zip(sizes, scores) if s < threshold)}

    finished = (stage / "stats.json").stat().st_mtime_ns
    assert curate(threshold) == stats  # resumed: nothing redone
    assert (stage / "stats.json").stat().st_mtime_ns == finished
    everything = curate(0.0)  # another threshold: the stage is rebuilt
    assert everything["documents_out"] == 60 and not everything.get("removed")


