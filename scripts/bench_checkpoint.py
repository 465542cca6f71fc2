"""Checkpoint throughput and the step-time cost of asynchronous saving, on this machine (a measurement, not a test).

    python -m scripts.bench_checkpoint [--workdir DIR] [--dim 1024 --layers 16 --vocab 32000] [--pairs 4]

1. Throughput: the full training state (float32 parameters + AdamW moments) of a model of --dim/--layers/--vocab
   (default 271M parameters: 1.08 GB of parameters, 3.25 GB of state) is saved with `RunCheckpoints` (the code the
   training loop uses), synchronously and asynchronously, then restored; against the disk's raw write speed
   measured in the same run: the same number of bytes written in 64 MB blocks and fsync'ed, in the same
   directory. The first save of a process (thread pools, TensorStore contexts) is reported apart. Before each cold
   read the files' pages are dropped from the page cache (posix_fadvise DONTNEED),
   so restores read the disk, and a raw read of the same bytes is the reference.
2. Overhead: `llama_jax.run_loop.train` itself on the `bench-s` preset in float32 (56M parameters, 0.68 GB of state;
   default 8 × 128 tokens per step, so a save is large next to a step), logging every 20 steps and saving every 40,
   asynchronously and then synchronously: each interval holding a save is compared with the interval just before
   it (see `overhead`), and the time each save() holds the loop is timed directly.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from llama_jax.cli import run_program
from llama_jax.errors import ConfigError

BLOCK = 64 << 20


def drop_cache(path: Path) -> None:
    """Evict the page-cache pages of every file under `path` (they are clean: written and fsync'ed)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def raw_disk(directory: Path, size: int) -> dict[str, float]:
    """GB/s writing `size` bytes with fsync (and without: the page cache), and reading them back cold."""
    import numpy as np

    block = np.random.default_rng(0).integers(0, 255, BLOCK, dtype=np.uint8).tobytes()
    path = directory / "raw.bin"
    results = {}
    for label, sync in (("write_fsync", True), ("write_page_cache", False)):
        path.unlink(missing_ok=True)
        started = time.perf_counter()
        with open(path, "wb") as file:
            written = 0
            while written < size:
                file.write(block[:min(BLOCK, size - written)])
                written += min(BLOCK, size - written)
            file.flush()
            if sync:
                os.fsync(file.fileno())
        results[label] = size / (time.perf_counter() - started) / 1e9
    drop_cache(path)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as file:
        while file.read(BLOCK):
            pass
    results["read_cold"] = size / (time.perf_counter() - started) / 1e9
    path.unlink()
    return results


def _realistic_moments(state):
    """Adam moments of a trained model's magnitude (random, incompressible) instead of the initial zeros."""
    import jax
    import jax.numpy as jnp

    leaves, tree = jax.tree.flatten(state.opt_state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [jax.random.normal(k, x.shape, x.dtype) * 1e-3 if jnp.issubdtype(x.dtype, jnp.floating) else x
              for k, x in zip(keys, leaves)]
    return state.replace(opt_state=jax.tree.unflatten(tree, leaves))


def throughput(workdir: Path, dim: int, layers: int, vocab: int) -> dict:
    import jax

    from llama_jax.checkpoint import RunCheckpoints
    from llama_jax.config import load_config
    from llama_jax.sharding import make_mesh
    from llama_jax.trainer import Trainer

    model = [f"model.dim={dim}", f"model.n_layers={layers}", f"model.vocab_size={vocab}", f"model.n_heads={dim // 64}",
             f"model.ffn_hidden_dim={dim * 11 // 4}", "model.dtype=float32", "train.seq_len=256"]
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    base = load_config(None, model)
    trainer = Trainer.create(base.model, base.optimizer, 1000, mesh)
    state = trainer.init_state(0)
    state = jax.jit(_realistic_moments, donate_argnums=0)(state)  # zeros would compress to nothing on disk
    jax.block_until_ready(state)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    meta = {"step": 0, "data_skip": 0, "rng": [0, 0], "guard": {}, "metrics_lines": 0}
    out: dict = {"params": base.model.num_params(), "param_bytes": param_bytes, "state_bytes": state_bytes}

    for mode in ("first", "sync", "async"):  # the first save of a process pays one-time set-up: shown apart
        run_dir = workdir / f"run_{mode}"
        config = load_config(None, [*model, f"run_dir={run_dir}", f"checkpoint.async_save={mode != 'sync'}"])
        checkpoints = RunCheckpoints(run_dir, trainer, config)
        cpu, started = time.process_time(), time.perf_counter()
        checkpoints.save(1, state, {**meta, "step": 1})
        returned = time.perf_counter() - started
        checkpoints.wait()
        total, cpu = time.perf_counter() - started, time.process_time() - cpu
        size = tree_size(run_dir / "checkpoints" / "1")
        out[f"save_{mode}"] = {"seconds": total, "blocking_seconds": returned, "cpu_seconds": cpu,
                               "bytes_on_disk": size, "gb_per_s": state_bytes / total / 1e9}
        checkpoints.close()
        print(f"save ({mode}): {state_bytes / 1e9:.2f} GB of state ({size / 1e9:.2f} GB on disk) in {total:.2f} s "
              f"= {state_bytes / total / 1e9:.2f} GB/s (save() returned after {returned:.2f} s; {cpu:.1f} CPU-s)",
              file=sys.stderr)

    run_dir = workdir / "run_sync"
    config = load_config(None, [*model, f"run_dir={run_dir}"])
    del state
    for label, cold in (("restore_cold", True), ("restore_warm", False)):
        if cold:
            drop_cache(run_dir / "checkpoints")
        checkpoints = RunCheckpoints(run_dir, trainer, config)
        started = time.perf_counter()
        restored = checkpoints.restore(1)
        jax.block_until_ready(restored.state)
        seconds = time.perf_counter() - started
        checkpoints.close()
        del restored
        out[label] = {"seconds": seconds, "gb_per_s": state_bytes / seconds / 1e9}
        print(f"{label}: {state_bytes / 1e9:.2f} GB in {seconds:.2f} s = {state_bytes / seconds / 1e9:.2f} GB/s",
              file=sys.stderr)
    out["raw_disk"] = raw_disk(workdir, out["save_sync"]["bytes_on_disk"])
    print(f"raw disk: {json.dumps(out['raw_disk'])}", file=sys.stderr)
    for mode in ("first", "sync", "async"):
        shutil.rmtree(workdir / f"run_{mode}")
    return out


def overhead(workdir: Path, pairs: int, model: str, batch_size: int, seq_len: int) -> dict:
    """Step-time cost of a save, from paired 20-step logging intervals of one `run_loop.train` run per mode.

    With log_every_steps=20 and a checkpoint every 40 steps, the save at step 40k comes right after the interval
    ending at 40k is logged, so intervals ending at 40k + 20 hold a save (its blocking part and the background
    write competing with the steps) and those ending at 40k do not. Comparing each such pair cancels the slow drift
    of a busy machine; the cost per save over 20 steps is the overhead at one save per 20 steps.
    """
    import jax
    import numpy as np

    from llama_jax.checkpoint import RunCheckpoints
    from llama_jax.config import load_config
    from llama_jax.perf import median
    from llama_jax.run_loop import train
    from llama_jax.sharding import make_mesh
    from llama_jax.trainer import Trainer

    steps = 20 + 40 * pairs
    overrides = [f"model={model}", "model.dtype=float32", f"train.batch_size={batch_size}", f"train.seq_len={seq_len}",
                 f"train.steps={steps}", "train.log_every_steps=20", "train.peak_tflops=1", "optimizer.warmup_steps=10",
                 "checkpoint.every_steps=40", "guard.enabled=false"]
    base = load_config(None, overrides)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    trainer = Trainer.create(base.model, base.optimizer, steps, mesh)
    sharding = trainer.batch_shardings((batch_size, seq_len))

    def batch(index: int):
        rng = np.random.default_rng(index)
        tokens = rng.integers(0, base.model.vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
        arrays = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                  "loss_mask": np.ones((batch_size, seq_len), np.int32)}
        return {k: jax.make_array_from_process_local_data(sharding, v, v.shape) for k, v in arrays.items()}

    state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state()))
    out = {"model": f"{model} (float32)", "params": base.model.num_params(), "state_bytes": state_bytes,
           "tokens_per_step": batch_size * seq_len}
    blocking: list[float] = []
    save = RunCheckpoints.save

    def timed_save(self, *args, **kwargs):  # how long each save holds the training loop
        started = time.perf_counter()
        try:
            return save(self, *args, **kwargs)
        finally:
            blocking.append(time.perf_counter() - started)

    RunCheckpoints.save = timed_save
    for mode, extra in (("async", []), ("sync", ["checkpoint.async_save=false"])):
        run_dir = workdir / f"overhead_{mode}"
        config = load_config(None, [*overrides, *extra, f"run_dir={run_dir}"])
        blocking.clear()
        train(trainer, config, run_dir, batch, None, 1e12, init_state=lambda: trainer.init_state(0))
        seconds = {r["step"]: 20 * batch_size * seq_len / r["tokens_per_sec"]
                   for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
        shutil.rmtree(run_dir)
        quiet = [seconds[40 * k] for k in range(1, pairs + 1)]
        saving = [seconds[40 * k + 20] for k in range(1, pairs + 1)]
        per_save = median([b - a for a, b in zip(quiet, saving)])
        step = median(quiet) / 20
        held = median(blocking[:-1])  # the last is the final save, after the last interval
        out[mode] = {"interval_seconds_without_save": quiet, "interval_seconds_with_save": saving,
                     "median_step_seconds": step, "median_seconds_per_save": per_save,
                     "overhead_percent_at_1_save_per_20_steps": 100 * per_save / (20 * step),
                     "median_seconds_loop_held_per_save": held,
                     "held_percent_at_1_save_per_20_steps": 100 * held / (20 * step)}
        print(f"{mode}: step {step:.3f} s; intervals without a save {[round(x, 2) for x in quiet]}, with "
              f"{[round(x, 2) for x in saving]}; {per_save:.3f} s per save = "
              f"{100 * per_save / (20 * step):.1f}% at one save per 20 steps; save() held the loop "
              f"{held:.3f} s = {100 * held / (20 * step):.2f}%", file=sys.stderr)
    RunCheckpoints.save = save
    return out


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="on the disk to measure (default: a temp dir)")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--pairs", type=int, default=4, help="pairs of 20-step intervals per overhead run")
    parser.add_argument("--overhead-model", default="bench-s", help="a preset, run in float32")
    parser.add_argument("--overhead-batch", type=int, default=8)
    parser.add_argument("--overhead-seq", type=int, default=128)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args(argv)
    for flag in ("dim", "layers", "vocab", "pairs", "overhead_batch", "overhead_seq"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not allowed: expected at least 1")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"load_average_before": os.getloadavg()}
    try:
        if not args.skip_throughput:
            results["throughput"] = throughput(workdir, args.dim, args.layers, args.vocab)
        if not args.skip_overhead:
            results["overhead"] = overhead(workdir, args.pairs, args.overhead_model, args.overhead_batch,
                                           args.overhead_seq)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    run_program(main)
