"""The run machinery the training programs share: data preparation, global batches, metrics, the loop.

The loop only feeds batches and writes what the step returns; the step itself (`llama_jax.trainer`) is pure, and
the batch for step k is a pure function of (seed, k + data_skip, store), so nothing here holds state a resumed run
would need.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from llama_jax.config import RunConfig, to_yaml
from llama_jax.data import (TokenStore, batch_for_step, build_store, is_validation_file, load_default_corpus,
                            read_documents, resolve_sources)
from llama_jax.errors import ConfigError, DataError
from llama_jax.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from llama_jax.trainer import TrainState, Trainer


# ── Data ─────────────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class PretrainingData:
    tokenizer: Tokenizer
    train: TokenStore
    valid: TokenStore


def prepare_pretraining_data(config: RunConfig, run_dir: Path) -> PretrainingData:
    """Token stores for training and validation: the default corpus, or `data.path` with `data.tokenizer`."""
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
    sharding = trainer.batch_shardings((batch_size, seq_len))
    return {key: jax.make_array_from_process_local_data(sharding, value, (batch_size, seq_len))
            for key, value in local.items()}


# ── Metrics ──────────────────────────────────────────────────────────────────────────────────────────────────────
class MetricsLog:
    """`metrics.jsonl` (one JSON object per logged step) and TensorBoard events; only process 0 writes."""

    def __init__(self, run_dir: Path):
        self.enabled = jax.process_index() == 0
        self._jsonl = open(run_dir / "metrics.jsonl", "a") if self.enabled else None
        self._tensorboard = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(str(run_dir / "tb"))

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{key: _plain(value) for key, value in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def _plain(value: Any) -> Any:
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        value = np.asarray(value).item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible
    return value


# ── The loop ─────────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass
class Throughput:
    """Tokens per second and model FLOPs utilisation over the last logging interval."""

    flops_per_token: float
    peak_flops: float  # whole mesh, per second
    _start: float = dataclasses.field(default_factory=time.perf_counter)
    _tokens: float = 0.0

    def add(self, tokens: float) -> None:
        self._tokens += tokens

    def take(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        tokens_per_sec = self._tokens / elapsed
        self._start, self._tokens = time.perf_counter(), 0.0
        return {"tokens_per_sec": tokens_per_sec, "mfu": tokens_per_sec * self.flops_per_token / self.peak_flops}


def evaluate(trainer: Trainer, params: dict[str, jax.Array], batches: Callable[[int], Mapping[str, jax.Array]],
             count: int) -> float:
    """Mean token loss over `count` batches."""
    eval_fn = trainer.eval_loss()
    loss_sum, weight_sum = 0.0, 0.0
    for index in range(count):
        loss, weight = eval_fn(params, batches(index))
        loss_sum, weight_sum = loss_sum + float(loss), weight_sum + float(weight)
    if weight_sum == 0:
        raise DataError("the validation batches hold no tokens to score")
    return loss_sum / weight_sum


def write_run_config(config: RunConfig, run_dir: Path) -> None:
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(config))


def train(trainer: Trainer, state: TrainState, config: RunConfig, run_dir: Path,
          train_batch: Callable[[int], Mapping[str, jax.Array]],
          eval_batch: Callable[[int], Mapping[str, jax.Array]] | None,
          peak_flops: float) -> TrainState:
    """Run steps until `train.steps`, logging every `train.log_every_steps` and evaluating every `eval.every_steps`."""
    from tqdm import tqdm

    train_config = config.train
    step_fn = trainer.jit_step((train_config.batch_size, train_config.seq_len))
    throughput = Throughput(config.model.flops_per_token(train_config.seq_len), peak_flops)
    log = MetricsLog(run_dir)
    first_step = int(state.step)
    progress = tqdm(total=train_config.steps, initial=first_step, desc="train", unit="step",
                    disable=jax.process_index() != 0, dynamic_ncols=True, file=sys.stderr)
    try:
        for step in range(first_step, train_config.steps):
            state, metrics = step_fn(state, train_batch(step + int(state.data_skip)))
            throughput.add(train_config.batch_size * train_config.seq_len)
            done = step + 1
            record: dict[str, Any] = {}
            if done % train_config.log_every_steps == 0 or done == train_config.steps:
                record = {key: float(value) for key, value in jax.device_get(metrics).items() if key != "tokens"}
                record.update(throughput.take())
            if eval_batch is not None and (done % config.eval.every_steps == 0 or done == train_config.steps):
                record["eval_loss"] = evaluate(trainer, state.params, eval_batch, config.eval.batches)
            if record:
                log.write(done, record)
                progress.set_postfix({key: f"{record[key]:.4g}" for key in ("loss", "eval_loss", "tokens_per_sec")
                                      if key in record})
            progress.update(1)
    finally:
        progress.close()
        log.close()
    return state
