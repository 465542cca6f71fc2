"""The run loop every training program shares (pretraining, SFT, and the trainers to come).

It feeds batches, writes what the step returns, and makes the run fault-tolerant: it resumes from the newest
checkpoint of the run directory, saves asynchronously, stops cleanly on SIGTERM/SIGINT, and rolls back on divergence
(llama_jax/checkpoint.py, llama_jax/guard.py). The step itself (`llama_jax.trainer`) is pure, and the batch for step
k is a pure function of (seed, k + data_skip, store); everything else a resumed run needs — the guard's statistics,
the metrics.jsonl line count — is saved in each checkpoint, so a resumed run is bit-identical to an uninterrupted one.

On rollback the abandoned steps' metrics.jsonl lines stay, as history, before the rollback record
(`llama_jax.metrics`); the steps that follow repeat those step numbers (TensorBoard drops the abandoned ones).

A restart costs time, not work: the loop times each (re)start from the process's start to its first step by phase
(`metrics.StartClock`; the training programs mark the phases before the loop), compiles the step ahead of time so
that compilation is timed apart (loaded from JAX's persistent compilation cache when a previous run compiled it:
`enable_compilation_cache`), and accounts every second of the loop in metrics.jsonl, from which `metrics.Goodput`
computes the run's goodput across restarts.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from llama_jax.checkpoint import (
    PREEMPTED_EXIT_STATUS,
    Preempted,
    PreemptionWatch,
    RunCheckpoints,
    replicated_value,
    wipe,
)
from llama_jax.config import ModelConfig, RunConfig, to_yaml
from llama_jax.errors import DataError
from llama_jax.fault_injection import FaultInjection
from llama_jax.guard import Guard, GuardState, Rollback
from llama_jax.metrics import (
    METRICS_FILE,
    Goodput,
    MetricsLog,
    StartClock,
    Throughput,
    format_goodput,
    format_start,
    read_records,
)
from llama_jax.tokenizer import Tokenizer
from llama_jax.trainer import Trainer, TrainState


# ── The loop ─────────────────────────────────────────────────────────────────────────────────────────────────────
def validation_loss(trainer: Trainer, params: dict[str, jax.Array], batches: Callable[[int], Mapping[str, jax.Array]],
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


def keep_tokenizer(tokenizer: Tokenizer, run_dir: Path) -> None:
    """Copy the tokenizer into the run directory, so eval.generate, train.sft and convert find it beside the weights."""
    target = run_dir / "tokenizer.model"
    if jax.process_index() == 0 and tokenizer.path is not None and not target.exists():
        shutil.copyfile(tokenizer.path, target)


def program_config(argv: Sequence[str], usage: str, clock: StartClock) -> RunConfig | int:
    """A training program's run config from `CONFIG.yaml key=value ...`, with the distributed runtime up and the
    compilation cache on; or, after printing `usage` and the default config, the exit status (0 for --help, 2 for no
    arguments)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage + to_yaml(RunConfig()), end="")
        return 0 if argv else 2
    from llama_jax import distributed
    from llama_jax.config import load_config

    config = load_config(argv[0], argv[1:])
    clock.mark("startup")
    distributed.initialize(config.distributed)
    enable_compilation_cache(config)
    clock.mark("distributed")
    return config


@dataclasses.dataclass(frozen=True)
class FineTuningBase:
    """What every fine-tuning program starts from: the `init_from` model, the tokenizer, and the model config with
    this run's compute settings."""

    model: Any  # a Llama
    tokenizer: Tokenizer
    model_config: ModelConfig


def load_fine_tuning_base(config: RunConfig, *, init_from: str, data: str, seq_len: int,
                          seq_len_key: str = "train.seq_len") -> FineTuningBase:
    """`init_from` and `data.path` are required (`init_from`/`data` say what they must be); the sequences of
    `seq_len` tokens (named `seq_len_key` in messages) must fit the model."""
    import llama_jax
    from llama_jax.errors import ConfigError

    if config.init_from is None:
        raise ConfigError(f"init_from is required: {init_from}")
    if config.data.path is None:
        raise ConfigError(f"data.path is required: {data}")
    model = llama_jax.load(config.init_from)
    tokenizer = fine_tuning_tokenizer(config)
    model_config = fine_tuned_model_config(config, model.config)
    if seq_len > model_config.max_seq_len:
        raise ConfigError(f"{seq_len_key}={seq_len} is larger than the model's maximum "
                          f"(max_seq_len={model_config.max_seq_len} in {config.init_from})")
    return FineTuningBase(model, tokenizer, model_config)


COMPUTE_FIELDS = ("dtype", "remat_policy", "attention_impl", "attention_chunk", "splash_block_q", "splash_block_kv")


def fine_tuned_model_config(config: RunConfig, pretrained: ModelConfig) -> ModelConfig:
    """The pretrained model's architecture with this run's compute settings (dtype, remat, attention kernel)."""
    return dataclasses.replace(pretrained, **{name: getattr(config.model, name) for name in COMPUTE_FIELDS})


def fine_tuning_tokenizer(config: RunConfig) -> Tokenizer:
    """The tokenizer of a fine-tuning run: data.tokenizer, else the one beside init_from."""
    from llama_jax.errors import ConfigError
    from llama_jax.tokenizer import load_tokenizer

    if config.data.tokenizer is not None:
        return load_tokenizer(config.data.tokenizer)
    candidate = Path(str(config.init_from)) / "tokenizer.model"
    if not candidate.is_file():
        raise ConfigError(f"data.tokenizer is required: no tokenizer.model in {config.init_from}")
    return load_tokenizer(candidate)


def peak_flops(config: RunConfig, devices: int) -> float:
    """The mesh's peak FLOP/s for MFU: configured; else the one measured at the run's first start (its metrics.jsonl
    records it), so that a restart measures nothing and MFU stays comparable across restarts; else a matrix multiply
    measured on this machine now."""
    if config.train.peak_tflops is not None:
        return config.train.peak_tflops * 1e12 * devices
    recorded = _recorded_peak_flops(config, devices)
    if recorded is not None:
        return recorded
    from llama_jax.perf import measure_matmul_ceiling

    return measure_matmul_ceiling(config.model.dtype) * devices


def _recorded_peak_flops(config: RunConfig, devices: int) -> float | None:
    if config.checkpoint.fresh or config.run_dir is None:
        return None
    for record in reversed(read_records(Path(config.run_dir) / METRICS_FILE)):
        start = record.get("start")
        if isinstance(start, dict) and start.get("devices") == devices and start.get("dtype") == config.model.dtype \
                and isinstance(start.get("peak_flops"), (int, float)) and start["peak_flops"] > 0:
            return float(start["peak_flops"])
    return None


def enable_compilation_cache(config: RunConfig) -> Path | None:
    """Turn on JAX's persistent compilation cache (`train.compilation_cache`), so that a restarted run loads the
    programs a previous run of the same config compiled. Call it before anything compiles (JAX reads the setting at
    its first compilation). Returns the cache's directory, or None when it stays off.

    'auto' (the default): $JAX_COMPILATION_CACHE_DIR if set, else `<LLAMA_JAX_CACHE>/jax_compilation`, for a
    single-process run only: JAX writes the cache from process 0 alone, so in a multi-process run process 0 would
    load its programs and run ahead while the others compile (on CPU, their gloo rendezvous then times out). A
    directory: that one, in every run. 'none': off. (JAX itself also reads $JAX_COMPILATION_CACHE_DIR at import,
    whatever this says.)
    """
    setting = config.train.compilation_cache
    if setting == "none" or (setting == "auto" and jax.process_count() > 1):
        return None
    if setting == "auto":
        from llama_jax.data import default_cache_dir

        directory = Path(os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_cache_dir() / "jax_compilation")
    else:
        directory = Path(setting)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # Every program of a run, the small ones too: a restart would pay for each one it compiles again.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory


@contextlib.contextmanager
def compilation_cache_hits() -> Iterator[list[int]]:
    """Count the programs loaded from the persistent compilation cache inside the block (in `[count]`)."""
    hits = [0]

    def listen(event: str, **kwargs: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            hits[0] += 1

    jax.monitoring.register_event_listener(listen)
    try:
        yield hits
    finally:
        jax.monitoring.unregister_event_listener(listen)


def train(trainer: Trainer, config: RunConfig, run_dir: Path,
          train_batch: Callable[[int], Mapping[str, jax.Array]],
          eval_batch: Callable[[int], Mapping[str, jax.Array]] | None,
          peak_flops: float, init_state: Callable[[], TrainState],
          start_clock: StartClock | None = None) -> TrainState:
    """Run steps until `train.steps`: fault-tolerant, and resuming from `<run_dir>/checkpoints/` if it holds any.

    `train_batch(i)` is global batch i (the loop asks for i = step + data_skip); `eval_batch(i)` the i-th
    validation batch, or None for no evaluation; `init_state()` a fresh TrainState (called when there is no
    checkpoint to resume, or a rollback finds none from before the divergence). Logs every
    `train.log_every_steps` to metrics.jsonl, evaluates every `eval.every_steps`, checkpoints every
    `checkpoint.every_steps` / `every_minutes` and at the end, rolls back on divergence (`guard.*`), and on
    SIGTERM/SIGINT saves and raises `Preempted` (a SystemExit with status 75). Returns the final state.

    `start_clock`: the program's StartClock, its phases up to here marked (default: one started now). The loop
    marks setup, restore, compile and first_step, prints the breakdown once, and records it in metrics.jsonl.
    """
    clock = start_clock if start_clock is not None else StartClock(process_start=time.time())
    return _Run(trainer, config, Path(run_dir), train_batch, eval_batch, peak_flops, init_state, clock).run()


class _Interval:
    """The loop's time since the last metrics record: what held it (saves, evaluation, a rollback's restore), and the
    rest, its steps."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.started = time.perf_counter()
        self.held: dict[str, float] = collections.defaultdict(float)

    @contextlib.contextmanager
    def holding(self, what: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.held[what] += time.perf_counter() - started

    def take(self) -> dict[str, float]:
        """`step_seconds`, `checkpoint_seconds` and `<what>_seconds` of everything else that held the loop; restarts."""
        elapsed = time.perf_counter() - self.started
        fields = {"step_seconds": max(elapsed - sum(self.held.values()), 0.0),
                  "checkpoint_seconds": self.held.get("checkpoint", 0.0)}
        fields.update({f"{what}_seconds": seconds for what, seconds in self.held.items() if what != "checkpoint"})
        self.restart()
        return fields


class _Run:
    def __init__(self, trainer, config, run_dir, train_batch, eval_batch, peak_flops, init_state, clock):
        clock.mark("setup")
        self.trainer, self.config, self.run_dir = trainer, config, run_dir
        self.train_batch, self.eval_batch, self.init_state = train_batch, eval_batch, init_state
        self.clock = clock
        tc = config.train
        self.total = tc.steps
        self.tokens_per_step = tc.batch_size * tc.seq_len
        self.step_fn = trainer.jit_step((tc.batch_size, tc.seq_len))
        self.throughput = Throughput(config.model.flops_per_token(tc.seq_len), peak_flops)
        self.faults = FaultInjection(config.debug, trainer, (tc.batch_size, tc.seq_len), config.model.vocab_size)
        self.interval = _Interval()

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
        clock.mark("restore")
        self.start: dict[str, Any] | None = {  # recorded with the first step record (completed after the first step)
            "process_start": clock.process_start, "restored_step": restored.step if restored is not None else None,
            "devices": trainer.mesh.size, "dtype": config.model.dtype, "peak_flops": peak_flops,
            "compilation_cache": jax.config.jax_compilation_cache_dir,
            # The records this resume cut off (written after its checkpoint): their time is lost to the restart.
            "carried": Goodput.of(self.log.cut).as_carried() if self.log.cut and not config.checkpoint.fresh else None}
        self.start["compile_cache_hits"] = self._compile() if self.step < self.total else 0
        self.pending: tuple[int, dict] | None = None  # the last dispatched step not judged by the guard yet
        self.record: dict[str, float] = {}  # its metrics once judged
        self.save_pending = False

    def _compile(self) -> int:
        """Compile the train step ahead of its first call (the jitted function reuses the program), so that compiling
        is timed apart from the first step; the number of programs loaded from the persistent cache."""
        first_batch = self.train_batch(self.step + self.data_skip)
        self.clock.mark("data")
        with compilation_cache_hits() as hits:
            self.step_fn.lower(self.state, first_batch).compile()
        self.clock.mark("compile")
        return hits[0]

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
        self.throughput.take()  # the first interval's rate counts from here, not from before the restore
        self.interval.restart()
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
                    if self.start is not None and "phases" not in self.start:
                        self._first_step_done()
                    if self._boundary() and not self._judge_pending():
                        self._at_boundary()
            with self.interval.holding("checkpoint"):
                self.checkpoints.wait()
            self._say(format_goodput(self.log.goodput.summary(end=time.time())))
        finally:
            self.progress.close()
            self.log.close()
            self.checkpoints.close()
        return self.state

    def _first_step_done(self) -> None:
        """Time the first step (waiting for it, once) and report the time from the process's start to here."""
        jax.block_until_ready(self.pending[1])
        self.clock.mark("first_step")
        self.start["phases"] = dict(self.clock.phases)
        self.start["to_first_step_seconds"] = self.clock.total()
        self._say(format_start(self.clock.phases, self.start["restored_step"], self.start["compile_cache_hits"]))

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
        if self.checkpoints.due(self.step):
            self.save_pending = True
        return False

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
            with self.interval.holding("eval"):
                record["eval_loss"] = validation_loss(self.trainer, self.state.params, self.eval_batch,
                                                      self.config.eval.batches)
        if record:
            record.update(self.interval.take())
            if self.start is not None and "phases" in self.start:
                record["start"], self.start = self.start, None
            self.log.write(done, record)
            self.progress.set_postfix({key: f"{record[key]:.4g}" for key in ("loss", "eval_loss", "tokens_per_sec")
                                       if key in record})
        if self.save_pending and not self.guard.suspect:
            with self.interval.holding("checkpoint"):
                self._save()

    def _save(self) -> None:
        rng = np.asarray(jax.device_get(self.state.rng))
        last_loss = self.last_loss if self.last_loss is not None and math.isfinite(self.last_loss) else None
        meta = {"step": self.step, "data_skip": self.data_skip, "rng": [int(x) for x in rng.ravel()],
                "guard": self.guard.state.to_json(), "metrics_lines": self.log.lines, "time": time.time(),
                "loss": last_loss}
        self.checkpoints.save(self.step, self.state, meta)
        self.save_pending = False

    # ── Preemption ──
    def _stop(self, watch: PreemptionWatch) -> None:
        if self.pending is not None:
            self._judge_pending()
        with self.interval.holding("checkpoint"):
            if self.step not in self.checkpoints.steps():
                self._save()
            self.checkpoints.wait()
        self._say(format_goodput(self.log.goodput.summary(end=time.time())))
        self._say(f"stopped by {watch.signal_name} at step {self.step}: checkpoint "
                  f"{self.checkpoints.directory / str(self.step)} is complete; run the same command to continue "
                  f"(exit status {PREEMPTED_EXIT_STATUS})")
        raise Preempted(self.step, watch.signal_name)

    # ── Rollback ──
    def _rollback(self, verdict: Rollback) -> None:
        count = self.guard.check_cap(verdict)  # DivergenceError past the cap
        with self.interval.holding("checkpoint"):
            self.checkpoints.wait()
        with self.interval.holding("restore"):
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
                                      "data_skip": data_skip, "rollbacks_in_window": count,
                                      **self.interval.take()})
        self.log.purge_from(base + 1)
        self.state, self.step, self.data_skip = state, base, data_skip
        self.pending, self.save_pending = None, False
        self.last_loss = None
        self.throughput.take()
        self.progress.reset(total=self.total)
        self.progress.update(base)


