"""The data a pretraining run trains on: its tokenizer, its training and validation token stores, and its global
batches (`data.batch_for_step` placed on the mesh, each process reading only its own rows)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import jax

from llama_jax.config import RunConfig
from llama_jax.data import (
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
from llama_jax.infilling import fim_transform
from llama_jax.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from llama_jax.trainer import Trainer


@dataclass(frozen=True)
class PretrainingData:
    tokenizer: Tokenizer
    train: TokenStore
    valid: TokenStore


def prepare_pretraining_data(config: RunConfig, run_dir: Path) -> PretrainingData:
    """Token stores for training and validation: the default corpus, or `data.path` with `data.tokenizer`.

    In a multi-process run process 0 trains the tokenizer and writes the stores first; the others then open them.
    """
    with process_zero_first("prepare_pretraining_data"):
        return _prepare_pretraining_data(config, run_dir)


def _prepare_pretraining_data(config: RunConfig, run_dir: Path) -> PretrainingData:
    vocab_size = config.model.vocab_size
    fim = fim_transform(config)  # only the training store is transformed: validation loss stays comparable
    if config.data.path is None:
        tokenizer, train, valid = load_default_corpus(vocab_size, fim=fim)
    else:
        sources = resolve_sources(config.data.path)
        if config.data.valid_path is not None:
            train_part, valid_part = (sources, None), (resolve_sources(config.data.valid_path), None)
        else:  # hold out documents of data.path (`data.corpus_documents` says which)
            train_part, valid_part = (sources, "train"), (sources, "valid")
        tokenizer = _tokenizer_for(config, *train_part, run_dir, vocab_size, infilling=fim is not None)
        if fim is not None:
            try:
                tokenizer.infilling_ids()
            except TokenizerError as error:
                raise ConfigError(f"data.fim_rate={config.data.fim_rate}: {error}") from None
        store_dir = run_dir / "token_store"
        field = config.data.text_field
        train = build_store(train_part[0], tokenizer, store_dir / "train", part=train_part[1], fim=fim,
                            text_field=field)
        valid = build_store(valid_part[0], tokenizer, store_dir / "valid", part=valid_part[1], text_field=field)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}); token ids would fall outside the embedding table")
    return PretrainingData(tokenizer, train, valid)


def _tokenizer_for(config: RunConfig, files: list[Path], part: SplitPart | None, run_dir: Path,
                   vocab_size: int, infilling: bool = False) -> Tokenizer:
    if config.data.tokenizer is not None:
        return load_tokenizer(config.data.tokenizer)
    path = run_dir / "tokenizer.model"
    if path.exists():
        return load_tokenizer(path)
    # the documents' text, not the files' JSON
    texts = [text for _, text in corpus_documents(files, part, config.data.text_field)]
    if not any(text.strip() for text in texts):
        raise DataError(f"no documents to train on: data.path={config.data.path!r} "
                        f"({', '.join(map(str, files))}) holds no text")
    print(f"training a SentencePiece tokenizer ({vocab_size} pieces) on {len(texts)} documents → {path}",
          file=sys.stderr)
    return train_sentencepiece(texts, path, vocab_size, infilling=infilling)


def global_batch(trainer: Trainer, store: TokenStore, index: int, batch_size: int, seq_len: int, seed: int,
                 document_masking: bool) -> dict[str, jax.Array]:
    """Batch `index` as global jax.Arrays; each process reads and places only its own rows."""
    local = batch_for_step(store, index, batch_size, seq_len, seed, jax.process_index(), jax.process_count())
    if not document_masking:  # Llama 2 attends across packed documents; Llama 3 masks them apart
        local = {key: local[key] for key in ("inputs", "targets", "loss_mask")}
    return trainer.place_rows(local, batch_size)
