"""The run loop every training program shares (pretraining, SFT, and the trainers to come).

It feeds batches, writes what the step returns, and makes the run fault-tolerant: it resumes from the newest
checkpoint of the run directory, saves asynchronously, stops cleanly on SIGTERM/SIGINT, and rolls back on divergence
(llama_jax/checkpoint.py, llama_jax/guard.py). The step itself (`llama_jax.trainer`) is pure, and the batch for step
k is a pure function of (seed, k + data_skip, store); everything else a resumed run needs — the guard's statistics,
the metrics.jsonl line count — is saved in each checkpoint, so a resumed run is bit-identical to an uninterrupted one.

On rollback the abandoned steps' metrics.jsonl lines stay, as history, before the rollback record
(`llama_jax.metrics`); the steps that follow repeat those step numbers (TensorBoard drops the abandoned ones).
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping
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
from llama_jax.config import RunConfig, to_yaml
from llama_jax.errors import DataError
from llama_jax.fault_injection import FaultInjection
from llama_jax.guard import Guard, GuardState, Rollback
from llama_jax.metrics import MetricsLog, Throughput
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


def peak_flops(config: RunConfig, devices: int) -> float:
    """The mesh's peak FLOP/s for MFU: configured, or a matrix multiply measured on this machine now."""
    if config.train.peak_tflops is not None:
        return config.train.peak_tflops * 1e12 * devices
    from llama_jax.perf import measure_matmul_ceiling

    return measure_matmul_ceiling(config.model.dtype) * devices


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
            record["eval_loss"] = validation_loss(self.trainer, self.state.params, self.eval_batch,
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


