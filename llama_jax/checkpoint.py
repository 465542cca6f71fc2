"""Checkpoints of a training run, and how a run stops on a signal: `python -m llama_jax.checkpoint ls RUN_DIR`.

Each checkpoint is one Orbax `CheckpointManager` step, `<run_dir>/checkpoints/<step>/`, holding four items:

    params/      the flat dict {dotted parameter name: array} (Orbax, sharded) — what `llama_jax.load(RUN_DIR)` reads
    opt_state/   the optimizer state (Orbax, sharded like the parameters)
    meta/        meta.json: step, data_skip (the next batch index is step + data_skip), the RNG key data, the
                 divergence guard's statistics and rollback history, the metrics.jsonl line count, time, last loss
    config/      config.json: the resolved run config the checkpoint was written under

Saves are asynchronous: `save` returns once the arrays are copied off the device and the write continues in the
background while training goes on. Orbax writes a step under `<step>.orbax-checkpoint-tmp-*` and renames it (with a
`commit_success.txt`) only when every item is on disk, so a crash mid-save never leaves a directory that passes for
a complete checkpoint; unfinished directories are removed when the next run starts. A checkpoint that fails to
restore (a missing, truncated or unreadable file) is reported with its path, moved aside to `<step>.corrupt`, and
the previous one is tried. Restores place every array directly in the shards of the current mesh, whatever mesh
wrote it; Orbax writes the arrays and `llama_jax.convert.native.ArrayReader` reads them back (at the disk's speed,
which Orbax's own restore falls well short of on a small CPU: benchmarks/2026-12-06-xeon-goodput.md).

Exit statuses of a training program (see `Preempted`): 0 finished · 2 error (one `error:` line, including a run
that keeps diverging) · 75 stopped by SIGTERM/SIGINT after saving a complete checkpoint (EX_TEMPFAIL: run the same
command again to continue) · 130/143 (128 + signal) aborted by a second signal without waiting for the save.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies
from orbax.checkpoint._src.handlers.json_checkpoint_handler import JsonCheckpointHandler

from llama_jax.config import RunConfig, resolve_model
from llama_jax.convert.native import ArrayReader
from llama_jax.distributed import barrier
from llama_jax.errors import CheckpointError, LlamaJaxError
from llama_jax.metrics import METRICS_FILE, Goodput, format_goodput, read_records
from llama_jax.params import param_shapes
from llama_jax.perf import format_bytes

CHECKPOINTS = "checkpoints"
ITEMS = ("params", "opt_state", "meta", "config")
META_FILE = "meta.json"
CONFIG_FILE = "config.json"
CORRUPT_SUFFIX = ".corrupt"
CORRUPT_NOTE = "CORRUPT.txt"
TMP_MARKER = ".orbax-checkpoint-tmp"
_SAVE_POLL_SECONDS = 0.05  # how late a signal may be handled while a save is awaited
PREEMPTED_EXIT_STATUS = 75  # EX_TEMPFAIL (sysexits.h): stopped on a signal with a complete checkpoint; run again

logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save and restore at INFO


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


# ── The meta item: JSON, with a test-only delay before it is written ─────────────────────────────────────────────
class _MetaHandler(JsonCheckpointHandler):
    """JSON like Orbax's own handler; `debug.save_delay_seconds` holds the write (and so the commit) open."""

    async def async_save(self, directory, item=None, args=None):
        if args is not None and getattr(args, "delay_seconds", 0):
            delay, item = args.delay_seconds, args.item

            async def slow_write():
                await asyncio.sleep(delay)
                await self._save_fn(item, directory)

            return [ocp.future.CommitFutureAwaitingContractedSignals(slow_write(), name="meta_save")]
        return await super().async_save(directory, item, args)


@ocp.args.register_with_handler(_MetaHandler, for_save=True)
@dataclasses.dataclass
class _MetaSave(ocp.args.CheckpointArgs):
    item: Mapping[str, Any]
    delay_seconds: float = 0.0


@ocp.args.register_with_handler(_MetaHandler, for_restore=True)
@dataclasses.dataclass
class _MetaRestore(ocp.args.CheckpointArgs):
    item: Any = None


class _Manager(ocp.CheckpointManager):
    """Orbax's manager, minus its own calls to JAX's preemption sync point: the training loop is the one caller,
    at every step boundary, with a counter that only grows (Orbax would call it with step numbers, which repeat
    after a rollback, and the sync point needs one increasing counter from one caller)."""

    def reached_preemption(self, step: int) -> bool:
        return False


# ── A run's checkpoints ──────────────────────────────────────────────────────────────────────────────────────────
@dataclasses.dataclass
class Restored:
    step: int
    state: Any  # llama_jax.trainer.TrainState
    meta: dict[str, Any]
    config: dict[str, Any]


class ConfigMismatch(CheckpointError):
    """The checkpoint is readable but belongs to a different model: never mistaken for corruption."""


class RunCheckpoints:
    """The CheckpointManager of one run directory, bound to a Trainer (its mesh and shardings) and a RunConfig."""

    def __init__(self, run_dir: str | Path, trainer, config: RunConfig):
        self.run_dir = Path(run_dir)
        self.directory = (self.run_dir / CHECKPOINTS).absolute()
        self.trainer = trainer
        self.config = config
        self.config_json = json.loads(json.dumps(dataclasses.asdict(config)))
        settings = config.checkpoint
        keep = [policies.LatestN(settings.keep)]
        if settings.keep_every:
            keep.append(policies.EveryNSteps(settings.keep_every))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=settings.async_save, cleanup_tmp_directories=True, create=True,
            preservation_policy=policies.AnyPreservationPolicy(keep), save_root_metadata=False)
        # Arrays: Orbax's PyTree handler (the format StandardCheckpointer reads), uncompressed unless asked: float32
        # state compresses poorly, so zstd saves little space and costs much save and restore time
        # (scripts/bench_checkpoint.py; figures in benchmarks/).
        arrays = lambda: ocp.PyTreeCheckpointHandler(use_compression=settings.compress)  # noqa: E731
        handlers = {"params": arrays(), "opt_state": arrays(),
                    "meta": _MetaHandler(filename=META_FILE), "config": JsonCheckpointHandler(filename=CONFIG_FILE)}
        self.manager = _Manager(self.directory, options=options, item_handlers=handlers)
        self.last_save = time.monotonic()
        self._target = None  # the trainer's restore target, traced at the first restore

    def due(self, step: int) -> bool:
        """Whether `step` is to be saved: every `checkpoint.every_steps`, the run's last step, and once
        `checkpoint.every_minutes` have passed since the last save (in a multi-process run, decided by process 0 at
        logging steps, where the processes meet anyway, so that they all save the same step)."""
        settings = self.config.checkpoint
        if (settings.every_steps and step % settings.every_steps == 0) or step == self.config.train.steps:
            return True
        if not settings.every_minutes:
            return False
        elapsed = time.monotonic() - self.last_save >= settings.every_minutes * 60
        if jax.process_count() == 1:
            return elapsed
        if step % self.config.train.log_every_steps:
            return False
        from jax.experimental import multihost_utils

        return bool(multihost_utils.broadcast_one_to_all(np.int32(elapsed)))

    # ── Saving ──
    def save(self, step: int, state, meta: Mapping[str, Any]) -> bool:
        """Start saving `state` as step `step` (asynchronous unless checkpoint.async_save=false); False if present."""
        self.last_save = time.monotonic()
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            params=ocp.args.PyTreeSave(state.params), opt_state=ocp.args.PyTreeSave(state.opt_state),
            meta=_MetaSave(dict(meta), self.config.debug.save_delay_seconds),
            config=ocp.args.JsonSave(self.config_json))
        return self.manager.save(step, args=args, force=True)

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete on disk."""
        # Poll rather than join Orbax's finalize thread at once: the kernel may hand a process-wide SIGTERM to any
        # thread, and CPython runs the Python handler only when the main thread next runs bytecode, so a main thread
        # parked in join() would hold a second signal's "abort now" until the save it should abort had finished.
        while self.manager.is_saving_in_progress():
            time.sleep(_SAVE_POLL_SECONDS)
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        """Complete checkpoints, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def close(self) -> None:
        self.manager.close()

    # ── Restoring ──
    def restore(self, step: int) -> Restored:
        """Step `step` onto the trainer's mesh. CheckpointError naming the path if any part cannot be read."""
        path = self.directory / str(step)
        try:
            small = self.manager.restore(step, args=ocp.args.Composite(meta=_MetaRestore(),
                                                                       config=ocp.args.JsonRestore()))
            meta, saved_config = dict(small["meta"]), dict(small["config"])
        except Exception as error:  # Orbax/TensorStore raise many kinds on damaged files; all mean "unreadable"
            raise CheckpointError(f"checkpoint {path} is unreadable: {_describe(error)}") from None
        self._check_model(saved_config, path)
        if self._target is None:
            self._target = self.trainer.restore_target()
        target = self._target
        try:
            params, opt_state = (read_item(path / item, getattr(target, item)) for item in ("params", "opt_state"))
            if int(meta["step"]) != step:
                raise ValueError(f"{META_FILE} says step {meta['step']}")
            scalars = dict(step=replicated_value(np.int32(meta["step"]), target.step.sharding),
                           rng=replicated_value(np.asarray(meta["rng"], np.uint32), target.rng.sharding),
                           data_skip=replicated_value(np.int32(meta["data_skip"]), target.data_skip.sharding))
        except Exception as error:
            raise CheckpointError(f"checkpoint {path} is unreadable: {_describe(error)}") from None
        state = target.replace(params=dict(params), opt_state=opt_state, **scalars)
        return Restored(step, state, meta, saved_config)

    def restore_latest(self, at_most: int | None = None) -> Restored | None:
        """The newest checkpoint (with step <= at_most) that restores, or None if there is none.

        An unreadable checkpoint is reported with its path and the previous one is tried; once one restores, the
        unreadable newer ones are moved aside to `<step>.corrupt` (so they are never retried or overwritten). If none
        restores, CheckpointError lists why and nothing is moved: a run never silently starts over. Every process
        takes part and they agree on each step's outcome.
        """
        failures: list[tuple[int, str]] = []
        for step in self.steps():
            if at_most is not None and step > at_most:
                continue
            error = None
            try:
                restored = self.restore(step)
            except ConfigMismatch:
                raise
            except CheckpointError as caught:
                error, restored = caught, None
            if _all_processes_agree(error is None):
                for bad, reason in failures:
                    moved = self._quarantine(bad, reason)
                    _warn(f"warning: {reason}; moved it to {moved}; using checkpoint {step} instead")
                return restored
            reason = str(error) if error is not None else f"checkpoint {self.directory / str(step)} is unreadable " \
                                                            f"on another process"
            failures.append((step, reason))
        if failures:
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored ({'; '.join(r for _, r in failures)}); "
                f"start over with --fresh (or a new run_dir), or move the damaged steps aside")
        return None

    def delete_after(self, step: int) -> None:
        """Delete checkpoints newer than `step` (after a rollback they belong to the abandoned trajectory)."""
        self.wait()
        for newer in self.steps():
            if newer > step:
                self.manager.delete(newer)

    def _quarantine(self, step: int, reason: str) -> Path:
        source = self.directory / str(step)
        target = self.directory / f"{step}{CORRUPT_SUFFIX}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}{CORRUPT_SUFFIX}-{n}"
        if jax.process_index() == 0:
            with contextlib.suppress(OSError):
                source.rename(target)
                (target / CORRUPT_NOTE).write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {reason}\n")
        barrier(f"checkpoint.quarantine-{step}")
        self.manager.reload()
        return target

    def _check_model(self, saved: Mapping[str, Any], path: Path) -> None:
        """The saved model must have the current model's parameter shapes; other config changes are reported."""
        try:
            saved_model = resolve_model(dict(saved["model"]))
        except (LlamaJaxError, KeyError, TypeError) as error:
            raise CheckpointError(f"checkpoint {path} has an unreadable {CONFIG_FILE}: {error}") from None
        if saved_model == self.config.model:
            return  # the same config has the same shapes (computing them builds the model abstractly: slow)
        current = param_shapes(self.config.model)
        before = param_shapes(saved_model)
        if before != current:
            changed = sorted(name for name in set(current) | set(before) if current.get(name) != before.get(name))
            raise ConfigMismatch(
                f"checkpoint {path} holds a different model (parameters {', '.join(changed[:4])}"
                f"{' ...' if len(changed) > 4 else ''} differ in shape): resume with the config it was written "
                f"under, or start over with --fresh (or a new run_dir)")

    def changed_settings(self, saved: Mapping[str, Any]) -> list[str]:
        """`key: old → new` for every config value that differs from the checkpoint's (run-local keys ignored)."""
        ignore = ("run_dir", "checkpoint.fresh", "debug.", "distributed.", "train.compilation_cache")
        old, new = _flatten(saved), _flatten(self.config_json)
        return [f"{key}: {old.get(key)!r} → {new.get(key)!r}" for key in sorted(set(old) | set(new))
                if old.get(key) != new.get(key) and not key.startswith(ignore)]


def wipe(run_dir: str | Path) -> None:
    """`--fresh`: delete the run's checkpoints (every process calls this; process 0 deletes)."""
    directory = Path(run_dir) / CHECKPOINTS
    if jax.process_index() == 0 and directory.exists():
        shutil.rmtree(directory)
    barrier("checkpoint.fresh")


def read_item(directory: Path, target: Any) -> Any:
    """An item's arrays (a pytree Orbax saved) straight into the shards `target` (ShapeDtypeStructs with shardings)
    describes; Orbax names each array by its tree path."""
    names = jax.tree.leaves(ocp.tree.get_param_names(target, include_empty_nodes=False))
    leaves, treedef = jax.tree.flatten(target)
    arrays = ArrayReader(directory).read_placed(dict(zip(names, leaves, strict=True)))
    return jax.tree.unflatten(treedef, [arrays[name] for name in names])


def replicated_value(value: np.ndarray, sharding) -> jax.Array:
    """A host value as a global array with `sharding` (replicated), on every process."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and key != "sharding_rules":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _all_processes_agree(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


# ── Stopping on a signal ─────────────────────────────────────────────────────────────────────────────────────────
class Preempted(SystemExit):
    """Raised by the training loop after a signal once the checkpoint at `step` is complete: exit status 75."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(PREEMPTED_EXIT_STATUS)
        self.step, self.signal_name = step, signal_name


class PreemptionWatch:
    """SIGTERM/SIGINT → save at the next step boundary, then stop; a second signal aborts (exit 128 + signal).

    One process: a handler sets a flag the loop checks between steps. Several processes: SIGTERM is caught by JAX's
    preemption notifier (installed by `jax.distributed.initialize`), and `reached_preemption_sync_point` — checked
    at every step boundary — turns true on every process at the same step, so all save the same step; SIGINT is
    forwarded to it as a SIGTERM.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._multi = jax.process_count() > 1

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():
            wanted = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
            for signum in wanted:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"\n{name} again: aborting without waiting for the checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{name}: saving a checkpoint at the next step boundary, then stopping (send it again to abort)",
              file=sys.stderr, flush=True)
        if self._multi:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier, which tells every process

    def requested(self, iteration: int) -> bool:
        """True at the step boundary where this run must save and stop (the same `iteration` on every process)."""
        if not self._multi:
            return self.signum is not None
        from jax.experimental import multihost_utils

        try:
            return multihost_utils.reached_preemption_sync_point(iteration)
        except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service=False)
            return False

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "SIGTERM"


# ── Inspection: python -m llama_jax.checkpoint ls RUN_DIR ────────────────────────────────────────────────────────
@dataclasses.dataclass
class Listing:
    name: str
    step: int | None
    status: str  # complete · unfinished · corrupt · unreadable · incomplete
    time: float | None
    size: int
    meta: dict[str, Any]
    detail: str = ""


def list_checkpoints(run_dir: str | Path, verify: bool = False) -> list[Listing]:
    """Every entry of <run_dir>/checkpoints, oldest first, with its status."""
    directory = Path(run_dir) / CHECKPOINTS
    if not directory.is_dir():
        raise CheckpointError(f"{directory} does not exist: {run_dir} is not a training run directory with "
                              f"checkpoints")
    listings = []
    for path in directory.iterdir():
        if not path.is_dir():
            continue
        head = path.name.split(".", 1)[0]
        step = int(head) if head.isdigit() else None
        meta = _read_json(path / "meta" / META_FILE)
        saved = meta.get("time") or _commit_time(path)
        entry = Listing(path.name, step, "complete", saved, _size(path), meta)
        if TMP_MARKER in path.name:
            entry.status, entry.detail = "unfinished", "a save in progress, or interrupted (removed at the next start)"
        elif CORRUPT_SUFFIX in path.name:
            note = path / CORRUPT_NOTE
            entry.status = "corrupt"
            entry.detail = note.read_text().strip() if note.is_file() else "moved aside at restore"
        elif step is None:
            continue
        else:
            missing = [item for item in ITEMS if not (path / item).is_dir()]
            if missing or not (path / "commit_success.txt").is_file():
                entry.status = "incomplete"
                entry.detail = f"missing {', '.join(missing) or 'commit_success.txt'}"
            elif verify:
                problem = _verify(path)
                if problem:
                    entry.status, entry.detail = "unreadable", problem
        listings.append(entry)
    return sorted(listings, key=lambda e: (e.step if e.step is not None else -1, e.name))


def _verify(path: Path) -> str:
    """Read every array of a checkpoint to host memory, one at a time; '' if all of it reads, else what failed."""
    for item in ("params", "opt_state"):
        try:
            reader = ArrayReader(path / item)
            for name in reader.names():
                reader.read(name)
        except Exception as error:
            return f"{path / item}: {_describe(error)}"
    for item, name in (("meta", META_FILE), ("config", CONFIG_FILE)):
        if not _read_json(path / item / name):
            return f"{path / item / name} is missing or not JSON"
    return ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _commit_time(path: Path) -> float | None:
    info = _read_json(path / "_CHECKPOINT_METADATA")
    nanoseconds = info.get("commit_timestamp_nsecs") or info.get("init_timestamp_nsecs")
    if nanoseconds:
        return nanoseconds / 1e9
    with contextlib.suppress(OSError):
        return path.stat().st_mtime
    return None


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


def format_listing(listings: Sequence[Listing]) -> str:
    rows = [("step", "saved", "size", "status", "next batch", "loss", "rollbacks", "")]
    for entry in listings:
        meta = entry.meta
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.time)) if entry.time else "-"
        batch = str(int(meta["step"]) + int(meta["data_skip"])) if "step" in meta and "data_skip" in meta else "-"
        loss = meta.get("loss")
        loss_text = f"{loss:.4f}" if isinstance(loss, (int, float)) and math.isfinite(loss) else "-"
        rollbacks = str(len(meta.get("guard", {}).get("rollbacks", []))) if meta else "-"
        label = str(entry.step) if entry.status in ("complete", "unreadable", "incomplete") else entry.name
        rows.append((label, saved, format_bytes(entry.size), entry.status, batch, loss_text, rollbacks, entry.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(7)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row[:7], widths)).rstrip()
                     + (f"  {row[7]}" if row[7] else "") for row in rows)


USAGE = """usage: python -m llama_jax.checkpoint ls RUN_DIR [--verify]

Lists the checkpoints of a training run: step, time saved, size on disk, status (complete · unfinished: a save in
progress or interrupted · corrupt: moved aside at restore · incomplete · unreadable: with --verify, which reads every
array), the next batch index (step + data_skip), the loss at that step and the number of rollbacks so far; then the
run's goodput across restarts, from its metrics.jsonl (up to its last record): the share of the time since its first
start spent in the steps it kept, and where the rest went."""


def goodput_line(run_dir: str | Path) -> str | None:
    """The run's goodput across restarts (`metrics.Goodput`), from its metrics.jsonl; None if it has none."""
    path = Path(run_dir) / METRICS_FILE
    return format_goodput(Goodput.of(read_records(path)).summary()) if path.is_file() else None


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] != "ls" or len(argv) < 2 or any(arg not in ("--verify",) for arg in argv[2:]):
        raise CheckpointError(f"unknown command {' '.join(argv)!r}: expected `ls RUN_DIR [--verify]`")
    listings = list_checkpoints(argv[1], verify="--verify" in argv[2:])
    print(format_listing(listings) if listings else f"{Path(argv[1]) / CHECKPOINTS}: no checkpoints")
    goodput = goodput_line(argv[1])
    if goodput is not None:
        print(goodput)
    return 0


if __name__ == "__main__":
    from llama_jax.cli import run_program

    run_program(main)
