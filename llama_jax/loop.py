"""The run machinery the training programs share: data preparation, global batches, metrics, the loop.

The loop feeds batches, writes what the step returns, and makes the run fault-tolerant: it resumes from the newest
checkpoint of the run directory, saves asynchronously, stops cleanly on SIGTERM/SIGINT, and rolls back on divergence
(llama_jax/checkpoint.py, llama_jax/guard.py). The step itself (`llama_jax.trainer`) is pure, and the batch for step
k is a pure function of (seed, k + data_skip, store); everything else a resumed run needs — the guard's statistics,
the metrics.jsonl line count — is saved in each checkpoint, so a resumed run is bit-identical to an uninterrupted one.

metrics.jsonl holds one record per logged step and one `{"event": "rollback", ...}` record per rollback. On resume
it is cut back to the lines written up to the restored checkpoint, so it reads exactly as an uninterrupted run's. On
rollback the abandoned steps' lines stay, as history, before the rollback record; the steps that follow repeat
those step numbers (TensorBoard drops the abandoned ones).
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
import jax.numpy as jnp
import numpy as np

from llama_jax.checkpoint import (PREEMPTED_EXIT_STATUS, Preempted, PreemptionWatch, RunCheckpoints,
                                  replicated_value, wipe)
from llama_jax.config import DebugConfig, RunConfig, to_yaml
from llama_jax.data import (TokenStore, batch_for_step, build_store, is_validation_file, load_default_corpus,
                            read_documents, resolve_sources)
from llama_jax.distributed import process_zero_first
from llama_jax.errors import ConfigError, DataError
from llama_jax.guard import Guard, GuardState, Rollback
from llama_jax.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from llama_jax.trainer import TrainState, Trainer


# ── Data ─────────────────────────────────────────────────────────────────────────────────────────────────────────
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
    sharding = trainer.batch_shardings((batch_size, seq_len))
    return {key: jax.make_array_from_process_local_data(sharding, value, (batch_size, seq_len))
            for key, value in local.items()}


# ── Metrics ──────────────────────────────────────────────────────────────────────────────────────────────────────
METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """`metrics.jsonl` (one JSON object per logged step, plus event records) and TensorBoard; only process 0 writes.

    `keep_lines` truncates metrics.jsonl to its first lines before appending (a resumed run continues from the line
    count its checkpoint recorded, so no line is lost or written twice); `purge_step` makes TensorBoard drop the
    events of steps from there on, written by the run that was interrupted or rolled back.
    """

    def __init__(self, run_dir: Path, keep_lines: int | None = None, purge_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.lines = 0
        self._jsonl = None
        self._tensorboard = None
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lines = truncate_lines(self.path, keep_lines) if keep_lines is not None else count_lines(self.path)
            self._jsonl = open(self.path, "a")
            self._open_tensorboard(purge_step)

    def _open_tensorboard(self, purge_step: int | None) -> None:
        self._tensorboard = _summary_writer()(str(self.run_dir / "tb"), purge_step=purge_step)

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{key: _plain(value) for key, value in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self.lines += 1
        if "event" in record:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tensorboard.add_scalar(key, value, step)

    def purge_from(self, step: int) -> None:
        """TensorBoard forgets steps >= `step` (after a rollback); metrics.jsonl keeps them as history."""
        if self.enabled:
            self._tensorboard.close()
            self._open_tensorboard(step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch when it can only to accept
    torch tensors, and that costs seconds of every (re)start; scalars need none of it."""
    import importlib

    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        return importlib.import_module("tensorboardX").SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        return importlib.import_module("tensorboardX").SummaryWriter
    finally:
        del sys.modules["torch"]


def count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as file:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))


def truncate_lines(path: Path, keep: int) -> int:
    """Cut `path` after its first `keep` complete lines (a torn last line goes too); the number of lines left."""
    if not path.is_file():
        return 0
    offset = lines = 0
    with open(path, "rb") as file:
        for line in file:
            if lines == keep or not line.endswith(b"\n"):
                break
            offset, lines = offset + len(line), lines + 1
    with open(path, "r+b") as file:
        file.truncate(offset)
    return lines


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
    """`<run_dir>/config.yaml`: the resolved config (with checkpoint.fresh off, so rerunning it resumes)."""
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        resumable = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, fresh=False))
        (run_dir / "config.yaml").write_text(to_yaml(resumable))


def train(trainer: Trainer, config: RunConfig, run_dir: Path,
          train_batch: Callable[[int], Mapping[str, jax.Array]],
          eval_batch: Callable[[int], Mapping[str, jax.Array]] | None,
          peak_flops: float, init_state: Callable[[], TrainState]) -> TrainState:
    """Run steps until `train.steps`: fault-tolerant, and resuming from `<run_dir>/checkpoints/` if it holds any.

    `train_batch(i)` is global batch i (the loop asks for i = step + data_skip); `eval_batch(i)` the i-th
    validation batch, or None for no evaluation; `init_state()` a fresh TrainState (called when there is no
    checkpoint to resume, or a rollback finds none from before the divergence). Logs every
    `train.log_every_steps` to metrics.jsonl, evaluates every `eval.every_steps`, checkpoints every
    `checkpoint.every_steps` / `every_minutes` and at the end, rolls back on divergence (`guard.*`), and on
    SIGTERM/SIGINT saves and raises `Preempted` (a SystemExit with status 75). Returns the final state.
    """
    return _Run(trainer, config, Path(run_dir), train_batch, eval_batch, peak_flops, init_state).run()


class _Run:
    def __init__(self, trainer, config, run_dir, train_batch, eval_batch, peak_flops, init_state):
        self.trainer, self.config, self.run_dir = trainer, config, run_dir
        self.train_batch, self.eval_batch, self.init_state = train_batch, eval_batch, init_state
        tc = config.train
        self.total = tc.steps
        self.tokens_per_step = tc.batch_size * tc.seq_len
        self.step_fn = trainer.jit_step((tc.batch_size, tc.seq_len))
        self.throughput = Throughput(config.model.flops_per_token(tc.seq_len), peak_flops)
        self.faults = FaultInjection(config.debug, trainer, (tc.batch_size, tc.seq_len), config.model.vocab_size)

        if config.checkpoint.fresh:
            wipe(run_dir)
            if jax.process_index() == 0:
                print(f"--fresh: deleted the checkpoints of {run_dir}; starting over", file=sys.stderr)
        self.checkpoints = RunCheckpoints(run_dir, trainer, config)
        restored = self.checkpoints.restore_latest()
        if restored is not None:
            self.state = restored.state
            self.guard = Guard(config.guard, GuardState.from_json(restored.meta.get("guard", {})))
            keep_lines = int(restored.meta.get("metrics_lines", 0))
            self.last_loss = restored.meta.get("loss")
            self._say(f"resuming from {self.checkpoints.directory / str(restored.step)} (step {restored.step} of "
                      f"{self.total}, next batch {restored.step + int(restored.meta['data_skip'])})")
            changes = self.checkpoints.changed_settings(restored.config)
            if changes:
                self._say("warning: the config differs from the checkpoint's: " + "; ".join(changes))
        else:
            self.state = init_state()
            self.guard = Guard(config.guard)
            keep_lines, self.last_loss = 0, None
        self.step = int(jax.device_get(self.state.step))
        self.data_skip = int(jax.device_get(self.state.data_skip))
        self.log = MetricsLog(run_dir, keep_lines=keep_lines, purge_step=self.step + 1)
        self.pending: tuple[int, dict] | None = None  # the last dispatched step not judged by the guard yet
        self.record: dict[str, float] = {}  # its metrics once judged
        self.save_pending = False
        self.last_save = time.monotonic()

    def _say(self, message: str) -> None:
        if jax.process_index() == 0:
            progress = getattr(self, "progress", None)
            if progress is not None:
                progress.write(message, file=sys.stderr)  # above the progress bar, not through it
            else:
                print(message, file=sys.stderr, flush=True)

    # ── The loop ──
    def run(self) -> TrainState:
        from tqdm import tqdm

        self.progress = tqdm(total=self.total, initial=self.step, desc="train", unit="step",
                             disable=jax.process_index() != 0, dynamic_ncols=True, file=sys.stderr)
        try:
            with PreemptionWatch() as watch:
                iteration = 0
                while True:
                    if self.step >= self.total:
                        if self.pending is not None and self._judge_pending():
                            continue  # rolled back
                        break
                    if watch.requested(iteration):
                        self._stop(watch)
                    iteration += 1
                    if self._dispatch():
                        continue  # rolled back
                    if self._boundary() and not self._judge_pending():
                        self._at_boundary()
            self.checkpoints.wait()
        finally:
            self.progress.close()
            self.log.close()
            self.checkpoints.close()
        return self.state

    def _dispatch(self) -> bool:
        """Start step `self.step + 1`; meanwhile judge the step before it (its scalars are ready or nearly).
        True if that judgement rolled the run back (the step just dispatched belonged to the abandoned run)."""
        index = self.step + self.data_skip
        batch = self.faults.batch(self.train_batch(index), index)
        self.state, metrics = self.step_fn(self.faults.state(self.state, self.step + 1, index), batch)
        self.throughput.add(self.tokens_per_step)
        if self.pending is not None and self._judge_pending():
            return True
        self.pending = (self.step + 1, metrics)
        self.step += 1
        self.progress.update(1)
        if self.config.debug.step_sleep_seconds:
            time.sleep(self.config.debug.step_sleep_seconds)
        c = self.config.checkpoint
        if (c.every_steps and self.step % c.every_steps == 0) or self.step == self.total or self._time_to_save():
            self.save_pending = True
        return False

    def _time_to_save(self) -> bool:
        minutes = self.config.checkpoint.every_minutes
        if not minutes:
            return False
        due = time.monotonic() - self.last_save >= minutes * 60
        if jax.process_count() == 1:
            return due
        if self.step % self.config.train.log_every_steps:
            return False  # processes agree on time only where they meet anyway
        from jax.experimental import multihost_utils

        return bool(multihost_utils.broadcast_one_to_all(np.int32(due)))

    def _boundary(self) -> bool:
        done = self.step
        return (self.save_pending or done % self.config.train.log_every_steps == 0 or done == self.total
                or self._eval_due())

    def _eval_due(self) -> bool:
        return self.eval_batch is not None and (self.step % self.config.eval.every_steps == 0
                                                or self.step == self.total)

    def _judge_pending(self) -> bool:
        """Guard the pending step; True if that rolled the run back."""
        step, metrics = self.pending
        self.pending = None
        values = jax.device_get(metrics)
        loss, grad_norm = float(values["loss"]), float(values["grad_norm"])
        self.record = {key: float(value) for key, value in values.items() if key != "tokens"}
        verdict = self.guard.observe(step, loss, grad_norm)
        if verdict is None:
            if math.isfinite(loss):
                self.last_loss = loss
            return False
        self._rollback(verdict)
        return True

    def _at_boundary(self) -> None:
        """Log, evaluate and save at step `self.step`, whose values the guard has judged."""
        done = self.step
        record: dict[str, Any] = {}
        if done % self.config.train.log_every_steps == 0 or done == self.total:
            record = dict(self.record)
            record.update(self.throughput.take())
        if self._eval_due():
            record["eval_loss"] = evaluate(self.trainer, self.state.params, self.eval_batch,
                                           self.config.eval.batches)
        if record:
            self.log.write(done, record)
            self.progress.set_postfix({key: f"{record[key]:.4g}" for key in ("loss", "eval_loss", "tokens_per_sec")
                                       if key in record})
        if self.save_pending and not self.guard.suspect:
            self._save()

    def _save(self) -> None:
        rng = np.asarray(jax.device_get(self.state.rng))
        last_loss = self.last_loss if self.last_loss is not None and math.isfinite(self.last_loss) else None
        meta = {"step": self.step, "data_skip": self.data_skip, "rng": [int(x) for x in rng.ravel()],
                "guard": self.guard.state.to_json(), "metrics_lines": self.log.lines, "time": time.time(),
                "loss": last_loss}
        self.checkpoints.save(self.step, self.state, meta)
        self.save_pending = False
        self.last_save = time.monotonic()

    # ── Preemption ──
    def _stop(self, watch: PreemptionWatch) -> None:
        if self.pending is not None:
            self._judge_pending()
        if self.step not in self.checkpoints.steps():
            self._save()
        self.checkpoints.wait()
        self._say(f"stopped by {watch.signal_name} at step {self.step}: checkpoint "
                  f"{self.checkpoints.directory / str(self.step)} is complete; run the same command to continue "
                  f"(exit status {PREEMPTED_EXIT_STATUS})")
        raise Preempted(self.step, watch.signal_name)

    # ── Rollback ──
    def _rollback(self, verdict: Rollback) -> None:
        count = self.guard.check_cap(verdict)  # DivergenceError past the cap
        self.checkpoints.wait()
        restored = self.checkpoints.restore_latest(at_most=verdict.before)
        if restored is not None:
            state, base, base_skip = restored.state, restored.step, int(restored.meta["data_skip"])
            guard_state = GuardState.from_json(restored.meta.get("guard", {}))
            where = f"checkpoint {restored.step}"
        else:
            state, base, base_skip, guard_state = self.init_state(), 0, 0, None
            where = "the initial state (no checkpoint from before it)"
        trigger_batch = verdict.step - 1 + self.data_skip
        skip = self.config.guard.skip_batches
        next_batch = trigger_batch + 1 if skip is None else base + base_skip + skip
        data_skip = next_batch - base
        state = state.replace(data_skip=replicated_value(np.int32(data_skip), state.data_skip.sharding))
        self.guard.restart_from(guard_state, verdict)
        self.checkpoints.delete_after(base)
        limits = f"{self.config.guard.max_rollbacks} in {self.config.guard.rollback_window} steps"
        self._say(f"rollback {count} (of at most {limits}): {verdict.reason} at step {verdict.step} (loss "
                  f"{verdict.loss:.4g}, gradient norm {verdict.grad_norm:.4g}) → restored {where}, step {base}; "
                  f"skipping {next_batch - base - base_skip} batches: the next batch is {next_batch}")
        self.log.write(verdict.step, {"event": "rollback", "reason": verdict.reason, "loss": verdict.loss,
                                      "grad_norm": verdict.grad_norm, "restored_step": base,
                                      "skipped_batches": next_batch - base - base_skip, "next_batch": next_batch,
                                      "data_skip": data_skip, "rollbacks_in_window": count})
        self.log.purge_from(base + 1)
        self.state, self.step, self.data_skip = state, base, data_skip
        self.pending, self.save_pending = None, False
        self.last_loss = None
        self.throughput.take()
        self.progress.reset(total=self.total)
        self.progress.update(base)


# ── Test-only fault injection (debug.*) ──────────────────────────────────────────────────────────────────────────
class FaultInjection:
    """`debug.inject_nan_at_step` and `debug.spike_at_step`: steps that diverge, for the guard's tests.

    A NaN is injected by setting one parameter to NaN just before the step, so that step's loss, its gradients and
    the update are all NaN, as in a real blow-up; the train step's program is unchanged. A spike replaces the
    batch's tokens by uniformly random ids (a corrupted batch). Both hit the batch a step reads in a run without
    rollbacks (batch index step - 1), so skipping it cures them; with `debug.inject_nan_sticky` the NaN hits the
    step number whatever its batch, so it recurs after every rollback.
    """

    def __init__(self, debug: DebugConfig, trainer: Trainer, batch_shape: tuple[int, int], vocab_size: int):
        self.debug = debug
        if debug.inject_nan_at_step is not None:
            def poison(state: TrainState) -> TrainState:
                name = min(state.params)
                return state.replace(params={**state.params, name: state.params[name] * jnp.nan})

            shardings = trainer.state_shardings()
            self._poison = jax.jit(poison, in_shardings=(shardings,), out_shardings=shardings, donate_argnums=0)
        if debug.spike_at_step is not None:
            sharding = trainer.batch_shardings(batch_shape)
            self._random = jax.jit(
                lambda index: tuple(jax.random.randint(key, batch_shape, 0, vocab_size, jnp.int32)
                                    for key in jax.random.split(jax.random.key(index))),
                out_shardings=(sharding, sharding))

    def state(self, state: TrainState, step: int, index: int) -> TrainState:
        at = self.debug.inject_nan_at_step
        if at is None or not (step == at if self.debug.inject_nan_sticky else index == at - 1):
            return state
        return self._poison(state)

    def batch(self, batch: Mapping[str, jax.Array], index: int) -> Mapping[str, jax.Array]:
        at = self.debug.spike_at_step
        if at is None or not 0 <= index - (at - 1) < self.debug.spike_batches:
            return batch
        inputs, targets = self._random(index)
        return {**batch, "inputs": inputs, "targets": targets}
