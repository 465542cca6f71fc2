"""A quality classifier trained from labelled examples, and the curation stage `classifier` that applies it.

The model is scikit-learn's: the text's hashed word 1-2-grams and character 1-4-grams (two `HashingVectorizer`s,
each row L2-normalised, no vocabulary to store) and a `LogisticRegression` on them. Its score is the probability
that a document is "high quality" (label 1). Labels may come from any scorer — Llama 3 labelled its training data
with Llama 2 — as `{"text": ..., "label": 0|1}` or `{"text": ..., "score": float}` with a threshold
(`load_labelled`); `python -m train.quality_classifier` trains one.

A saved classifier is a folder: `classifier.json` (the feature settings, the intercept, the training record) and
`weights.npz` (the non-zero weights, by feature index). Nothing is pickled: loading rebuilds the vectorizers from
their settings (their hashing is scikit-learn's signed 32-bit MurmurHash3 of each n-gram), and scores are computed
here in float64 (`QualityClassifier.scores`), identically before saving and after loading.

The stage is `llama_jax.curation`'s optional `classifier` stage (`train.curate --stages ...,classifier
--classifier DIR`): its apply step asks `classifier_decider` about each document, which removes those scoring below
the threshold with `reason: classifier` and their `score`; `classifier_fingerprint` is what makes a stage built with
another classifier be rebuilt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from llama_jax.errors import ConfigError, DataError
from llama_jax.jsonl import read_jsonl

REASON = "classifier"
CONFIG_FILE = "classifier.json"
WEIGHTS_FILE = "weights.npz"
FORMAT = "llama-jax-quality-classifier/1"


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
    """The two hashed feature sets (scikit-learn `HashingVectorizer` arguments)."""

    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (1, 4)
    n_features: int = 1 << 18  # per feature set
    lowercase: bool = True

    def vectorizers(self):
        from sklearn.feature_extraction.text import HashingVectorizer

        common = dict(n_features=self.n_features, alternate_sign=False, norm="l2", lowercase=self.lowercase,
                      dtype=np.float64)
        # words: runs of letters/digits/_ and also runs of other non-space characters (symbols are signal here)
        words = HashingVectorizer(analyzer="word", ngram_range=tuple(self.word_ngrams),
                                  token_pattern=r"\w+|[^\w\s]+", **common)
        chars = HashingVectorizer(analyzer="char", ngram_range=tuple(self.char_ngrams), **common)
        return words, chars


class QualityClassifier:
    """Scores texts with P(high quality) = sigmoid(features · weights + intercept)."""

    def __init__(self, settings: FeatureSettings, weights: np.ndarray, intercept: float, record: dict | None = None):
        if weights.shape != (2 * settings.n_features,):
            raise ConfigError(f"classifier weights of shape {weights.shape}: expected ({2 * settings.n_features},)")
        self.settings = settings
        self.weights = np.asarray(weights, np.float64)
        self.intercept = float(intercept)
        self.record = dict(record or {})
        self._vectorizers = settings.vectorizers()

    def features(self, texts: Sequence[str]):
        import scipy.sparse

        return scipy.sparse.hstack([vectorizer.transform(texts) for vectorizer in self._vectorizers], format="csr")

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.zeros(0)
        return self.features(list(texts)) @ self.weights + self.intercept

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """P(label 1) of each text, float64."""
        logits = self.logits(texts)
        return 0.5 * (1.0 + np.tanh(0.5 * logits))  # the logistic function, without overflow

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        nonzero = np.flatnonzero(self.weights)
        staging = directory / f".{WEIGHTS_FILE}.tmp-{uuid.uuid4().hex}"
        with open(staging, "wb") as file:
            np.savez(file, indices=nonzero.astype(np.int64), values=self.weights[nonzero])
        os.replace(staging, directory / WEIGHTS_FILE)
        config = {"format": FORMAT, "features": dataclasses.asdict(self.settings), "intercept": self.intercept,
                  "record": self.record}
        staging = directory / f".{CONFIG_FILE}.tmp-{uuid.uuid4().hex}"
        staging.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(staging, directory / CONFIG_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> QualityClassifier:
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        try:
            config = json.loads(config_path.read_text())
        except OSError as error:
            raise ConfigError(f"{config_path}: cannot read the quality classifier ({error.strerror or error})") \
                from None
        except ValueError as error:
            raise ConfigError(f"{config_path}: not valid JSON ({error})") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ConfigError(f"{config_path}: not a quality classifier (expected format {FORMAT!r})")
        try:
            features = config["features"]
            settings = FeatureSettings(word_ngrams=tuple(features["word_ngrams"]),
                                       char_ngrams=tuple(features["char_ngrams"]),
                                       n_features=int(features["n_features"]), lowercase=bool(features["lowercase"]))
            with np.load(weights_path) as arrays:
                indices, values = arrays["indices"], arrays["values"]
            weights = np.zeros(2 * settings.n_features, np.float64)
            weights[indices] = values
            return cls(settings, weights, float(config["intercept"]), config.get("record"))
        except OSError as error:
            raise ConfigError(f"{weights_path}: cannot read the classifier's weights ({error})") from None
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ConfigError(f"{directory}: a damaged quality classifier ({type(error).__name__}: {error})") \
                from None


# ── Labelled examples and training ───────────────────────────────────────────────────────────────────────────────
def load_labelled(path: str | os.PathLike, score_threshold: float | None = None) -> tuple[list[str], np.ndarray]:
    """Texts and 0/1 labels of a JSONL file of `{"text": str, "label": 0|1}` or `{"text": str, "score": number}`
    (label 1 when score >= `score_threshold`). A bad line is one DataError naming `path:line`; so is a file with no
    examples or with one class only."""
    texts: list[str] = []
    labels: list[int] = []
    for line, record in read_jsonl(path, "labelled examples"):
        where = f"{path}:{line}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object {{\"text\": ..., \"label\": 0|1}}, got "
                            f"{type(record).__name__}")
        text = record.get("text")
        if not isinstance(text, str):
            raise DataError(f"{where}: no \"text\" string" if text is None else
                            f"{where}: \"text\" is {type(text).__name__}, expected a string")
        if "label" in record:
            label = record["label"]
            if isinstance(label, bool) or label not in (0, 1) or not isinstance(label, (int, float)):
                raise DataError(f"{where}: label {json.dumps(label)}: expected 0 or 1")
            labels.append(int(label))
        elif "score" in record:
            score = record["score"]
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not np.isfinite(score):
                raise DataError(f"{where}: score {json.dumps(score)}: expected a finite number")
            if score_threshold is None:
                raise DataError(f"{where}: a \"score\" but no score threshold to turn it into a label "
                                "(--score-threshold)")
            labels.append(int(score >= score_threshold))
        else:
            raise DataError(f"{where}: no \"label\" (0 or 1) and no \"score\"")
        texts.append(text)
    if not texts:
        raise DataError(f"{path}: no labelled examples")
    counts = np.bincount(labels, minlength=2)
    if counts.min() == 0:
        only = int(np.argmax(counts))
        raise DataError(f"{path}: all {len(labels)} examples have label {only}; a classifier needs both labels")
    return texts, np.array(labels, np.int64)


def train_classifier(texts: Sequence[str], labels: Sequence[int] | np.ndarray, *, c: float = 4.0,
                     settings: FeatureSettings | None = None, class_weight: str | None = "balanced",
                     max_iter: int = 1000, record: dict | None = None) -> QualityClassifier:
    """Fit the logistic regression (L2, inverse strength `c`, lbfgs: deterministic) on the hashed features."""
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels, np.int64)
    if len(texts) != len(labels) or not len(texts):
        raise ConfigError(f"{len(texts)} texts and {len(labels)} labels: expected as many, and at least one")
    if set(np.unique(labels).tolist()) != {0, 1}:
        raise ConfigError(f"labels {sorted(set(labels.tolist()))}: expected both 0 and 1")
    if c <= 0:
        raise ConfigError(f"C={c}: expected a positive inverse regularisation strength")
    settings = settings or FeatureSettings()
    classifier = QualityClassifier(settings, np.zeros(2 * settings.n_features), 0.0)
    features = classifier.features(list(texts))
    model = LogisticRegression(C=c, class_weight=class_weight, max_iter=max_iter, solver="lbfgs")
    model.fit(features, labels)
    record = {"examples": int(len(labels)), "positives": int(labels.sum()), "C": c, "class_weight": class_weight,
              "sklearn_version": _sklearn_version(), **(record or {})}
    return QualityClassifier(settings, model.coef_[0].astype(np.float64), float(model.intercept_[0]), record)


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


def split_examples(count: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a random training / held-out split (at least one held out when the fraction is positive)."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ConfigError(f"valid fraction {valid_fraction}: expected a number in [0, 1)")
    order = np.random.default_rng(seed).permutation(count)
    held = min(count - 1, max(1, round(count * valid_fraction))) if valid_fraction > 0 else 0
    return np.sort(order[held:]), np.sort(order[:held])


def evaluate(classifier: QualityClassifier, texts: Sequence[str], labels: np.ndarray,
             threshold: float = 0.5) -> dict[str, float]:
    """Accuracy at `threshold`, against chance (the majority label's share), and precision/recall of label 1."""
    labels = np.asarray(labels)
    predicted = classifier.scores(texts) >= threshold
    positives = labels == 1
    kept = predicted.sum()
    return {"examples": int(len(labels)), "accuracy": float(np.mean(predicted == positives)),
            "chance": float(max(positives.mean(), 1 - positives.mean())),
            "precision": float((predicted & positives).sum() / kept) if kept else float("nan"),
            "recall": float((predicted & positives).sum() / max(1, positives.sum()))}


# ── The curation stage ───────────────────────────────────────────────────────────────────────────────────────────
def classifier_decider(classifier_path: str | os.PathLike, threshold: float) -> Callable[[int, str, str], tuple]:
    """For `llama_jax.curation`'s apply step: (index, id, text) -> (text, reason or None, details), scoring one
    document at a time."""
    classifier = QualityClassifier.load(classifier_path)
    _check_threshold(threshold)

    def decide(index: int, doc_id: str, text: str):
        score = float(classifier.scores([text])[0])
        return (text, None, {}) if score >= threshold else (text, REASON, {"score": round(score, 6)})
    return decide


def classifier_fingerprint(classifier_path: str | os.PathLike) -> str:
    """sha256 of the saved classifier's two files: a stage built with another classifier is rebuilt."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = Path(classifier_path) / name
        try:
            digest.update(path.read_bytes())
        except OSError as error:
            raise ConfigError(f"{path}: cannot read the quality classifier ({error.strerror or error})") from None
    return digest.hexdigest()


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"classifier_threshold {threshold}: expected a probability in [0, 1]")
