"""What a run reports: `metrics.jsonl` and TensorBoard (process 0 only), and the throughput it measures.

metrics.jsonl holds one record per logged step (`step`, `loss`, `grad_norm`, `lr`, `tokens_per_sec`, `mfu`, and
`eval_loss` when evaluated) and one `{"event": "rollback", ...}` record per rollback. Its line count is saved in
each checkpoint, so a resumed run cuts it back to that many lines and it reads exactly as an uninterrupted run's.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping
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
