"""The data a pretraining run trains on: its tokenizer, its training and validation token stores, and its global
batches (`data.batch_for_step` placed on the mesh, each process reading only its own rows)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import jax

from llama_jax.config import RunConfig
from llama_jax.data import (
    Mixture,
    SplitPart,
    TokenStore,
    batch_for_step,
    build_store,
    corpus_documents,
    load_default_corpus,
    resolve_sources,
)
from llama_jax.distributed import process_zero_first
from llama_jax.errors import ConfigError, DataError, TokenizerError
from llama_jax.infilling import FimTransform, fim_transform
from llama_jax.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from llama_jax.trainer import Trainer


@dataclass(frozen=True)
class PretrainingData:
    tokenizer: Tokenizer
    train: TokenStore | Mixture
    valid: TokenStore | Mixture


def prepare_pretraining_data(config: RunConfig, run_dir: Path) -> PretrainingData:
    """Token stores for training and validation: the default corpus, or `data.path` with `data.tokenizer`.

    In a multi-process run process 0 trains the tokenizer and writes the stores first; the others then open them.
    """
    with process_zero_first("prepare_pretraining_data"):
        return _prepare_pretraining_data(config, run_dir)


@dataclass(frozen=True)
class _Source:
    """One source of the run's text: its files, the split each store reads from them, and its text field."""

    label: str
    train: tuple[list[Path], SplitPart | None]  # files, and which side of their held-out split (None: all)
    valid: tuple[list[Path], SplitPart | None]
    text_field: str
    weight: float = 1.0


def _prepare_pretraining_data(config: RunConfig, run_dir: Path) -> PretrainingData:
    vocab_size = config.model.vocab_size
    fim = fim_transform(config)  # only the training store is transformed: validation loss stays comparable
    if config.data.path is None and config.data.mixture is None:
        tokenizer, train, valid = load_default_corpus(vocab_size, fim=fim)
    else:
        sources = _sources(config)
        tokenizer = _tokenizer_for(config, sources, run_dir, vocab_size, infilling=fim is not None)
        if fim is not None:
            try:
                tokenizer.infilling_ids()
            except TokenizerError as error:
                raise ConfigError(f"data.fim_rate={config.data.fim_rate}: {error}") from None
        store_dir = run_dir / "token_store"
        if config.data.mixture is None:
            train, valid = _stores(sources[0], tokenizer, store_dir, fim, config.data.build_workers)
        else:  # one pair of stores per source, drawn by weight (data.Mixture)
            pairs = [_stores(source, tokenizer, store_dir / f"mixture-{index}", fim, config.data.build_workers)
                     for index, source in enumerate(sources)]
            labels, weights = [source.label for source in sources], [source.weight for source in sources]
            train = Mixture(labels, [pair[0] for pair in pairs], weights)
            valid = Mixture(labels, [pair[1] for pair in pairs], weights)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}); token ids would fall outside the embedding table")
    return PretrainingData(tokenizer, train, valid)


def _sources(config: RunConfig) -> list[_Source]:
    """data.path (with data.valid_path) as one source, or each entry of data.mixture."""
    data = config.data
    if data.mixture is None:
        return [_source("data", data.path, data.valid_path, data.text_field)]
    return [_source(entry.label, entry.path, entry.valid_path, entry.text_field or data.text_field, entry.weight)
            for entry in data.mixture]


def _source(label: str, path: str, valid_path: str | None, text_field: str, weight: float = 1.0) -> _Source:
    files = resolve_sources(path)
    if valid_path is not None:
        return _Source(label, (files, None), (resolve_sources(valid_path), None), text_field, weight)
    # hold out documents of the path (`data.corpus_documents` says which)
    return _Source(label, (files, "train"), (files, "valid"), text_field, weight)


def _stores(source: _Source, tokenizer: Tokenizer, store_dir: Path, fim: FimTransform | None,
            workers: int) -> tuple[TokenStore, TokenStore]:
    if workers > 1 and fim is None:  # FIM draws per document index in the whole corpus: one process
        from llama_jax.parallel_tokenize import build_store_parallel

        return tuple(build_store_parallel(files, tokenizer, store_dir / name, workers=workers, part=part,
                                          text_field=source.text_field)
                     for name, (files, part) in (("train", source.train), ("valid", source.valid)))
    train = build_store(source.train[0], tokenizer, store_dir / "train", part=source.train[1], fim=fim,
                        text_field=source.text_field)
    valid = build_store(source.valid[0], tokenizer, store_dir / "valid", part=source.valid[1],
                        text_field=source.text_field)
    return train, valid


def _tokenizer_for(config: RunConfig, sources: list[_Source], run_dir: Path, vocab_size: int,
                   infilling: bool = False) -> Tokenizer:
    if config.data.tokenizer is not None:
        return load_tokenizer(config.data.tokenizer)
    path = run_dir / "tokenizer.model"
    if path.exists():
        return load_tokenizer(path)
    # the documents' text, not the files' JSON; every source's training side
    texts = [text for source in sources
             for _, text in corpus_documents(source.train[0], source.train[1], source.text_field)]
    if not any(text.strip() for text in texts):
        files = [file for source in sources for file in source.train[0]]
        where = f"data.path={config.data.path!r}" if config.data.mixture is None else "data.mixture"
        raise DataError(f"no documents to train on: {where} ({', '.join(map(str, files))}) holds no text")
    print(f"training a SentencePiece tokenizer ({vocab_size} pieces) on {len(texts)} documents → {path}",
          file=sys.stderr)
    return train_sentencepiece(texts, path, vocab_size, infilling=infilling)


def global_batch(trainer: Trainer, store: TokenStore | Mixture, index: int, batch_size: int, seq_len: int, seed: int,
                 document_masking: bool) -> dict[str, jax.Array]:
    """Batch `index` as global jax.Arrays; each process reads and places only its own rows."""
    local = batch_for_step(store, index, batch_size, seq_len, seed, jax.process_index(), jax.process_count())
    if not document_masking:  # Llama 2 attends across packed documents; Llama 3 masks them apart
        local = {key: local[key] for key in ("inputs", "targets", "loss_mask")}
    return trainer.place_rows(local, batch_size)
