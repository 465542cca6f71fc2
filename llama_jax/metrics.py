"""What a run reports: `metrics.jsonl` and TensorBoard (process 0 only), the throughput it measures, and its goodput.

metrics.jsonl holds one record per logged step (`step`, `loss`, `grad_norm`, `lr`, `tokens_per_sec`, `mfu`, and
`eval_loss` when evaluated) and one `{"event": "rollback", ...}` record per rollback. Its line count is saved in
each checkpoint, so a resumed run cuts it back to that many lines and its steps read exactly as an uninterrupted
run's.

Goodput (as MaxText measures it): the share of the wall-clock time since the run's first start spent in steps that
the final model is made of. Every record carries `time` (Unix seconds) and the loop's time since the record before
(`step_seconds` in steps, `checkpoint_seconds` held by saves, `eval_seconds`, a rollback's `restore_seconds`); the
first step record after each (re)start carries `start`, the time from the process's start to its first step by
phase, and `carried`, the account of the records a resume cut off (the work lost since the last checkpoint), so
`Goodput` rebuilds the whole account from the file alone, after any number of kill -9s.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

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
        self.cut: list[dict[str, Any]] = []  # the records `keep_lines` cut off: written after the resumed checkpoint
        self.goodput = Goodput()  # the account of every record in the file, kept up to date by `write`
        self._jsonl = None
        self._tensorboard = None
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if keep_lines is not None:
                self.cut = read_records(self.path, skip=keep_lines)
                self.lines = truncate_lines(self.path, keep_lines)
            else:
                self.lines = count_lines(self.path)
            self.goodput = Goodput.of(read_records(self.path))
            self._jsonl = open(self.path, "a")
            self._open_tensorboard(purge_step)

    def _open_tensorboard(self, purge_step: int | None) -> None:
        self._tensorboard = _summary_writer()(str(self.run_dir / "tb"), purge_step=purge_step)

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        """Append a record, stamped with the wall-clock `time`; a step record also gets the run's `goodput` so far."""
        if not self.enabled:
            return
        record = {"step": step, **{key: _plain(value) for key, value in values.items()}, "time": time.time()}
        self.goodput.add(record)
        if "event" not in record:
            record["goodput"] = self.goodput.summary()["goodput"]
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self.lines += 1
        if "event" in record:
            return
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
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


def read_records(path: Path, skip: int = 0) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl after its first `skip` lines; a torn or unreadable line (a process killed while
    writing it) is left out, so a file cut short by kill -9 still reads."""
    if not path.is_file():
        return []
    records = []
    with open(path, "rb") as file:
        for number, line in enumerate(file):
            if number < skip or not line.endswith(b"\n"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


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


# ── Goodput ──────────────────────────────────────────────────────────────────────────────────────────────────────
START_PHASES = ("startup", "distributed", "data", "setup", "restore", "compile", "first_step")
LOSSES = ("startup", "restore", "compile", "rolled_back", "lost_work", "checkpoint", "eval", "other")
_LOSS_OF_PHASE = {"startup": "startup", "distributed": "startup", "data": "startup", "setup": "startup",
                  "restore": "restore", "compile": "compile"}  # first_step is inside the first interval's steps


def process_start_time() -> float:
    """When this process started (Unix time): from /proc on Linux (to 10 ms), else now."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - (uptime - started_after_boot)


class StartClock:
    """Where a (re)started process's time goes until its first step: each `mark(phase)` books the time since the
    previous mark (or the process's start) to `phase`.

    Phases, in order (START_PHASES): startup (the interpreter, imports, the config), distributed (joining the
    runtime), data (preparing or opening the data), setup (the mesh, the trainer, the peak FLOP/s), restore (the
    checkpoint, or a fresh state), compile (the train step), first_step.
    """

    def __init__(self, process_start: float | None = None):
        self.process_start = process_start_time() if process_start is None else process_start
        self.phases: dict[str, float] = {}
        self._last = self.process_start

    def mark(self, phase: str) -> None:
        now = time.time()
        self.phases[phase] = self.phases.get(phase, 0.0) + max(now - self._last, 0.0)
        self._last = now

    def total(self) -> float:
        return sum(self.phases.values())


@dataclass
class Goodput:
    """The goodput account of a run, built record by record (`add`) from its metrics.jsonl.

    Productive time is the `step_seconds` of the step records the final trajectory keeps; every other second since
    the first start is a loss: startup (before the restore), restore, compile, rolled_back (steps a rollback
    abandoned, and its restore), lost_work (steps after the last checkpoint, redone after a restart), checkpoint (the
    loop held by saves), eval, and other (the rest: a dead process's last moments and the time until it is
    restarted, logging).
    """

    first_start: float | None = None
    last_time: float | None = None
    starts: int = 0
    productive: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (step, seconds), in order
    lost: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(LOSSES[:-1], 0.0))

    @classmethod
    def of(cls, records: Iterable[Mapping[str, Any]]) -> Goodput:
        account = cls()
        for record in records:
            account.add(record)
        return account

    def add(self, record: Mapping[str, Any]) -> None:
        """Book one record (in file order)."""
        if _is_number(record.get("time")):
            self.last_time = max(self.last_time or record["time"], record["time"])
        start = record.get("start")
        if isinstance(start, Mapping):
            self._add_start(start)
        steps = _seconds(record, "step_seconds")
        if record.get("event") == "rollback":
            restored = record.get("restored_step", 0)
            abandoned = [seconds for step, seconds in self.productive if step > restored]
            self.productive = [(step, seconds) for step, seconds in self.productive if step <= restored]
            self.lost["rolled_back"] += sum(abandoned) + steps + _seconds(record, "restore_seconds")
        elif "event" not in record and _is_number(record.get("step")):
            self.productive.append((record["step"], steps))
        self.lost["checkpoint"] += _seconds(record, "checkpoint_seconds")
        self.lost["eval"] += _seconds(record, "eval_seconds")

    def _add_start(self, start: Mapping[str, Any]) -> None:
        self.starts += 1
        if _is_number(start.get("process_start")):
            self._started(start["process_start"])
        for phase, seconds in (start.get("phases") or {}).items():
            if phase in _LOSS_OF_PHASE and _is_number(seconds):
                self.lost[_LOSS_OF_PHASE[phase]] += seconds
        carried = start.get("carried")
        if isinstance(carried, Mapping):
            self.starts += int(carried.get("starts", 0))
            if _is_number(carried.get("first_start")):
                self._started(carried["first_start"])
            for loss, seconds in (carried.get("lost") or {}).items():
                if loss in self.lost and _is_number(seconds):
                    self.lost[loss] += seconds

    def _started(self, when: float) -> None:
        self.first_start = when if self.first_start is None else min(self.first_start, when)

    def as_carried(self) -> dict[str, Any]:
        """This account as work lost to a restart (for records a resume cut off): productive steps become lost_work."""
        lost = dict(self.lost)
        lost["lost_work"] += sum(seconds for _, seconds in self.productive)
        return {"first_start": self.first_start, "starts": self.starts, "lost": lost}

    def summary(self, end: float | None = None) -> dict[str, Any]:
        """goodput, wall_seconds since the first start, productive_seconds, restarts, and lost_seconds by cause
        (LOSSES, adding up with productive_seconds to wall_seconds). Up to `end` (default: the last record's time).
        Without a recorded start (a run from before goodput was recorded), goodput is None."""
        end = end if end is not None else self.last_time
        productive = sum(seconds for _, seconds in self.productive)
        if self.first_start is None or end is None or end <= self.first_start:
            return {"goodput": None, "wall_seconds": None, "productive_seconds": productive,
                    "restarts": max(self.starts - 1, 0), "lost_seconds": dict(self.lost)}
        wall = end - self.first_start
        lost = dict(self.lost)
        lost["other"] = wall - productive - sum(lost.values())
        return {"goodput": productive / wall, "wall_seconds": wall, "productive_seconds": productive,
                "restarts": max(self.starts - 1, 0), "lost_seconds": lost}


def format_goodput(summary: Mapping[str, Any]) -> str:
    """One line: 'goodput 83.1% of 12m 30s since the first start (3 restarts); lost: startup 20.1 s, ...'."""
    if summary.get("goodput") is None:
        return "goodput: unknown (no recorded start in metrics.jsonl)"
    restarts = summary["restarts"]
    losses = ", ".join(f"{loss.replace('_', ' ')} {_duration(seconds)}"
                       for loss, seconds in summary["lost_seconds"].items() if abs(seconds) >= 0.05)
    return (f"goodput {100 * summary['goodput']:.1f}% of {_duration(summary['wall_seconds'])} since the first start "
            f"({restarts} restart{'s' if restarts != 1 else ''}); lost: {losses or 'nothing'}")


def format_start(phases: Mapping[str, float], restored_step: int | None, cache_hits: int | None) -> str:
    """One line: how long this process took from its start to its first step, by phase."""
    parts = []
    for phase in START_PHASES:
        if phase in phases:
            cached = f" ({cache_hits} from the compilation cache)" if phase == "compile" and cache_hits else ""
            parts.append(f"{phase.replace('_', ' ')} {phases[phase]:.2f} s{cached}")
    where = f"resumed at step {restored_step}" if restored_step is not None else "fresh start"
    return f"first step {sum(phases.values()):.1f} s after the process started ({where}): " + " · ".join(parts)


def _duration(seconds: float) -> str:
    if abs(seconds) < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m {rest:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _seconds(record: Mapping[str, Any], key: str) -> float:
    value = record.get(key)
    return float(value) if _is_number(value) else 0.0
