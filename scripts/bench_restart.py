"""What a restart costs, and a run's goodput through kill -9s (a measurement, not a test).

    python -m scripts.bench_restart [--workdir DIR] [--configs tiny,bench-s] [--kills 3] [--seed 0]

1. Restart breakdown, for each of --configs (`tiny`: configs/tiny.yaml; `bench-s`: the bench-s preset in float32,
   batch 8 × 1024), all runs of `python -m train.pretrain` on one CPU device, each stopped by SIGTERM a few logged
   steps after it starts (which saves a checkpoint at a step boundary, so nothing is lost):
     fresh  the first start, with an empty persistent compilation cache (it fills it);
     cold   a restart without the compilation cache (`train.compilation_cache=none`);
     warm   a restart with the cache the fresh run filled.
   Each start's time from its process's start to its first step, by phase, comes from the `start` field the run
   records in metrics.jsonl; a step's time is the median `step_seconds` of the records after the first of a start
   (one step per record).
2. Goodput through kill -9: the tiny config for --steps steps, killed with SIGKILL --kills times at random moments
   (uniform in --kill-window seconds after each start), restarted each time, then run to the end. The goodput the run
   reports (its last record, and `python -m llama_jax.checkpoint ls`) is set beside one computed here from the wall-
   clock timestamps of its records: wall time from the first recorded process start to the last record, productive
   time the sum of the gaps between consecutive records of one process over the steps the run kept (the first
   record of a process counts from the moment its first step began).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from llama_jax.cli import run_program
from llama_jax.errors import ConfigError
from llama_jax.metrics import START_PHASES, Goodput, format_goodput, read_records

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "tiny": ["configs/tiny.yaml", "train.steps=400"],
    "bench-s": ["configs/tiny.yaml", "model=bench-s", "model.dtype=float32", "train.batch_size=8",
                "train.seq_len=1024", "train.steps=400"],
}
COMMON = ["train.log_every_steps=1", "eval.every_steps=100000", "checkpoint.every_steps=100000"]


class Run:
    """`python -m train.pretrain ARGS` on one CPU device, its stderr in a file."""

    def __init__(self, args: list[str], log: Path):
        env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
        env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the runs choose with train.compilation_cache
        self.log = log
        self._file = open(log, "w")
        self.started = time.time()
        self.process = subprocess.Popen([sys.executable, "-m", "train.pretrain", *args], cwd=REPO, env=env,
                                        stdout=subprocess.DEVNULL, stderr=self._file)

    def records_since(self, run_dir: Path) -> list[dict]:
        """The records this process wrote (from the one carrying its `start`)."""
        records = read_records(run_dir / "metrics.jsonl")
        mine = [i for i, record in enumerate(records) if record.get("start", {}).get("process_start", 0)
                >= self.started - 1.0]
        return records[mine[0]:] if mine else []

    def stop_after(self, run_dir: Path, records: int, timeout: float = 3600) -> int:
        """SIGTERM once this process has written `records` step records; its exit status."""
        deadline = time.monotonic() + timeout
        while len(self.records_since(run_dir)) < records:
            if self.process.poll() is not None:
                raise RuntimeError(f"the run ended early ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"timed out: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        self.process.send_signal(signal.SIGTERM)
        return self.wait()

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)  # by pid, never by name
        self.wait()

    def wait(self, timeout: float = 3600) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._file.close()


# ── 1. The restart breakdown ─────────────────────────────────────────────────────────────────────────────────────
def breakdown(workdir: Path, name: str, records_per_run: int) -> dict:
    run_dir, cache = workdir / f"restart_{name}", workdir / f"jax_cache_{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    base = [*CONFIGS[name], *COMMON, f"run_dir={run_dir}"]
    out = {}
    for label, cache_setting in (("fresh", str(cache)), ("cold", "none"), ("warm", str(cache))):
        run = Run([*base, f"train.compilation_cache={cache_setting}"], workdir / f"restart_{name}_{label}.log")
        status = run.stop_after(run_dir, records_per_run)
        if status != 75:
            raise RuntimeError(f"{name} {label}: exit status {status}: {run.log.read_text()[-2000:]}")
        records = run.records_since(run_dir)
        start = records[0]["start"]
        step = statistics.median(r["step_seconds"] for r in records[1:])
        out[label] = {"phases": start["phases"], "to_first_step_seconds": start["to_first_step_seconds"],
                      "compile_cache_hits": start["compile_cache_hits"], "restored_step": start["restored_step"],
                      "step_seconds": step, "first_step_in_steps": start["to_first_step_seconds"] / step,
                      "load": os.getloadavg()[0]}
        print(f"{name} {label}: first step after {start['to_first_step_seconds']:.2f} s = "
              f"{start['to_first_step_seconds'] / step:.1f} steps of {step:.3f} s; "
              + ", ".join(f"{phase} {start['phases'].get(phase, 0):.2f}" for phase in START_PHASES)
              + f"; {start['compile_cache_hits']} programs from the cache", file=sys.stderr)
    shutil.rmtree(run_dir)
    return out


# ── 2. Goodput through kill -9 ───────────────────────────────────────────────────────────────────────────────────
def goodput_by_hand(records: list[dict]) -> dict:
    """Goodput from the records' wall-clock timestamps (see the module docstring): `gaps` counts all of the time
    between a kept step record and the record before it as productive; `goodput` takes out of it the evaluation and
    checkpoint stalls the records say happened in between."""
    starts = [r["start"] for r in records if "start" in r]
    first_start = min([s["process_start"] for s in starts]
                      + [s["carried"]["first_start"] for s in starts if s.get("carried")
                         and s["carried"].get("first_start")])
    kept: dict[int, float] = {}
    previous = None
    for record in records:
        if "start" in record:
            phases = record["start"]["phases"]
            previous = record["start"]["process_start"] + sum(phases.values()) - phases["first_step"]
        if record.get("event") == "rollback":
            kept = {step: gaps for step, gaps in kept.items() if step <= record["restored_step"]}
        elif "event" not in record:
            gap = record["time"] - previous
            kept[record["step"]] = (gap, gap - record.get("eval_seconds", 0) - record["checkpoint_seconds"])
        previous = record["time"]
    wall = records[-1]["time"] - first_start
    gaps, productive = (sum(kept_gap[i] for kept_gap in kept.values()) for i in (0, 1))
    return {"goodput": productive / wall, "goodput_gaps": gaps / wall, "wall_seconds": wall,
            "productive_seconds": productive, "gaps_seconds": gaps}


def killed_run(workdir: Path, kills: int, steps: int, window: tuple[float, float], seed: int) -> dict:
    run_dir, cache = workdir / "killed", workdir / "jax_cache_tiny"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [*CONFIGS["tiny"], *COMMON, f"train.steps={steps}", "checkpoint.every_steps=10", f"run_dir={run_dir}",
            f"train.compilation_cache={cache}"]
    rng = random.Random(seed)
    first_launch = time.time()
    moments = []
    for kill in range(kills):
        run = Run(args, workdir / f"killed_{kill}.log")
        moment = rng.uniform(*window)
        time.sleep(max(moment - (time.time() - run.started), 0))
        if run.process.poll() is not None:
            raise RuntimeError(f"the run ended before kill {kill + 1}: {run.log.read_text()[-2000:]}")
        run.kill()
        logged = [r["step"] for r in read_records(run_dir / "metrics.jsonl") if "event" not in r]
        moments.append({"seconds_after_start": moment, "last_logged_step": logged[-1] if logged else None})
        print(f"kill -9 {kill + 1} at {moment:.1f} s after its start (last logged step "
              f"{moments[-1]['last_logged_step']})", file=sys.stderr)
    last = Run(args, workdir / "killed_last.log")
    if last.wait() != 0:
        raise RuntimeError(f"the last run failed: {last.log.read_text()[-2000:]}")
    records = read_records(run_dir / "metrics.jsonl")
    reported = Goodput.of(records).summary()
    hand = goodput_by_hand(records)
    listing = subprocess.run([sys.executable, "-m", "llama_jax.checkpoint", "ls", str(run_dir)], cwd=REPO,
                             capture_output=True, text=True).stdout
    console = [line for line in last.log.read_text().replace("\r", "\n").splitlines() if line.startswith("goodput")]
    out = {"kills": moments, "reported_last_record": records[-1]["goodput"], "reported": reported,
           "by_hand": hand, "difference": reported["goodput"] - hand["goodput"],
           "true_wall_seconds_from_first_launch": records[-1]["time"] - first_launch,
           "console": console[-1] if console else None, "ls": listing.strip().splitlines()[-1]}
    print(f"reported: {format_goodput(reported)}\nby hand: goodput {100 * hand['goodput']:.1f}% of "
          f"{hand['wall_seconds']:.1f} s ({hand['productive_seconds']:.1f} s productive; all of the gaps: "
          f"{100 * hand['goodput_gaps']:.1f}%)\nconsole: {out['console']}\nls: {out['ls']}", file=sys.stderr)
    shutil.rmtree(run_dir)
    return out


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_restart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--configs", default="tiny,bench-s", help=f"of {', '.join(CONFIGS)}; empty: none")
    parser.add_argument("--records", type=int, default=6, help="step records each restart-breakdown run writes")
    parser.add_argument("--kills", type=int, default=3, help="kill -9s of the goodput run (0: skip it)")
    parser.add_argument("--steps", type=int, default=120, help="steps of the goodput run")
    parser.add_argument("--kill-window", type=float, nargs=2, default=(8.0, 30.0), metavar=("FROM", "TO"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    configs = [name for name in args.configs.split(",") if name]
    unknown = [name for name in configs if name not in CONFIGS]
    if unknown or args.records < 2 or args.kills < 0:
        raise ConfigError(f"--configs {args.configs!r} --records {args.records} --kills {args.kills}: expected "
                          f"configs from {', '.join(CONFIGS)}, at least 2 records, kills >= 0")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_restart_", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"load_average_before": os.getloadavg()}
    try:
        for name in configs:
            results[f"restart_{name}"] = breakdown(workdir, name, args.records)
        if args.kills:
            results["goodput_through_kills"] = killed_run(workdir, args.kills, args.steps, tuple(args.kill_window),
                                                          args.seed)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    run_program(main)
