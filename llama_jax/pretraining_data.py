"""The data a pretraining run trains on: its tokenizer, its training and validation token stores, and its global
batches (`data.batch_for_step` placed on the mesh, each process reading only its own rows)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import jax

from llama_jax.config import RunConfig
from llama_jax.data import (
    TokenStore,
    batch_for_step,
    build_store,
    is_validation_file,
    load_default_corpus,
    read_documents,
    resolve_sources,
)
from llama_jax.distributed import process_zero_first
from llama_jax.errors import ConfigError, DataError
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
    if config.data.path is None:
        tokenizer, train, valid = load_default_corpus(vocab_size)
    else:
        sources = resolve_sources(config.data.path)
        if config.data.valid_path is not None:
            train_files, valid_files = sources, resolve_sources(config.data.valid_path)
        else:
            valid_files = [p for p in sources if is_validation_file(str(p))]
            train_files = [p for p in sources if p not in valid_files]
            if not valid_files or not train_files:
                raise ConfigError(f"data.valid_path is needed: data.path={config.data.path!r} has too few files "
                                  f"({len(sources)}) to hold some out for validation")
        tokenizer = _tokenizer_for(config, train_files, run_dir, vocab_size)
        store_dir = run_dir / "token_store"
        train = build_store(train_files, tokenizer, store_dir / "train")
        valid = build_store(valid_files, tokenizer, store_dir / "valid")
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}); token ids would fall outside the embedding table")
    return PretrainingData(tokenizer, train, valid)


def _tokenizer_for(config: RunConfig, train_files: list[Path], run_dir: Path, vocab_size: int) -> Tokenizer:
    if config.data.tokenizer is not None:
        return load_tokenizer(config.data.tokenizer)
    path = run_dir / "tokenizer.model"
    if path.exists():
        return load_tokenizer(path)
    if not any(text.strip() for file in train_files for text in read_documents(file)):
        raise DataError(f"no documents to train on: data.path={config.data.path!r} "
                        f"({', '.join(map(str, train_files))}) holds no text")
    print(f"training a SentencePiece tokenizer ({vocab_size} pieces) on {len(train_files)} files → {path}",
          file=sys.stderr)
    return train_sentencepiece(train_files, path, vocab_size)


def global_batch(trainer: Trainer, store: TokenStore, index: int, batch_size: int, seq_len: int, seed: int,
                 document_masking: bool) -> dict[str, jax.Array]:
    """Batch `index` as global jax.Arrays; each process reads and places only its own rows."""
    local = batch_for_step(store, index, batch_size, seq_len, seed, jax.process_index(), jax.process_count())
    if not document_masking:  # Llama 2 attends across packed documents; Llama 3 masks them apart
        local = {key: local[key] for key in ("inputs", "targets", "loss_mask")}
    return trainer.place_rows(local, batch_size)
