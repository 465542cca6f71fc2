"""Checkpoint throughput and the step-time cost of asynchronous saving, on this machine (a measurement, not a test).

    python -m scripts.bench_checkpoint [--workdir DIR] [--dim 1024 --layers 16 --vocab 32000] [--pairs 4]
                                       [--repeats 3] [--skip-saves] [--skip-processes]

1. Throughput: the full training state (float32 parameters + AdamW moments) of a model of --dim/--layers/--vocab
   (default 271M parameters: 1.08 GB of parameters, 3.25 GB of state) is saved with `RunCheckpoints` (the code the
   training loop uses), synchronously and asynchronously (--skip-saves: one synchronous save, to restore from);
   against the disk's raw write speed measured in the same run: the same number of bytes written in 64 MB blocks
   and fsync'ed, in the same directory. The first save of a process (thread pools, TensorStore contexts) is
   reported apart.
2. Restore, from a cold page cache (the files' pages dropped with posix_fadvise DONTNEED before each read), taking
   turns --repeats times so that each restore has a raw read of the same bytes (the checkpoint's own files, read
   in 64 MB blocks by one thread) beside it: the full train state with `RunCheckpoints.restore` (the loop's code,
   `ArrayReader`), the same through Orbax's restore (what the loop used before: `orbax`), parameters only with
   `llama_jax.load(RUN_DIR)` and through Orbax's StandardCheckpointer; then (unless --skip-processes) two local
   processes restoring their own halves of the state (an fsdp=2 mesh), again beside a raw read. CPU seconds are
   reported with each: on these 2-core machines the kernel's copy of a buffered read already takes one core, so a
   restore runs at the disk's speed only if the rest costs less than the other core.
3. Overhead: `llama_jax.run_loop.train` itself on the `bench-s` preset in float32 (56M parameters, 0.68 GB of state;
   default 8 × 128 tokens per step, so a save is large next to a step), logging every 20 steps and saving every 40,
   asynchronously and then synchronously: each interval holding a save is compared with the interval just before
   it (see `overhead`), and the time each save() holds the loop is timed directly.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
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


def model_overrides(dim: int, layers: int, vocab: int) -> list[str]:
    return [f"model.dim={dim}", f"model.n_layers={layers}", f"model.vocab_size={vocab}", f"model.n_heads={dim // 64}",
            f"model.ffn_hidden_dim={dim * 11 // 4}", "model.dtype=float32", "train.seq_len=256"]


def throughput(workdir: Path, dim: int, layers: int, vocab: int, repeats: int, saves: bool, processes: bool) -> dict:
    import jax

    from llama_jax.checkpoint import RunCheckpoints
    from llama_jax.config import load_config
    from llama_jax.run_loop import write_run_config
    from llama_jax.sharding import make_mesh
    from llama_jax.trainer import Trainer

    model = model_overrides(dim, layers, vocab)
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

    for mode in ("first", "sync", "async") if saves else ("sync",):  # a process's first save pays its set-up
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
        if mode != "sync":
            shutil.rmtree(run_dir)
    out["raw_disk"] = raw_disk(workdir, out["save_sync"]["bytes_on_disk"])
    print(f"raw disk: {json.dumps(out['raw_disk'])}", file=sys.stderr)

    run_dir = workdir / "run_sync"
    config = load_config(None, [*model, f"run_dir={run_dir}"])
    write_run_config(config, run_dir)  # so that llama_jax.load reads it as a run directory
    del state
    out["restore"] = restores(run_dir, trainer, config, repeats)
    if processes:
        out["restore_2_processes"] = two_process_restores(run_dir, dim, layers, vocab, repeats)
    shutil.rmtree(run_dir)
    return out


# ── Restores against raw reads ───────────────────────────────────────────────────────────────────────────────────
def read_raw(paths: list[Path]) -> None:
    """Read files front to back in 64 MB blocks: what the disk gives one reader."""
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            while file.read(BLOCK):
                pass


def files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def cold(path: Path, action: Callable[[], object]) -> dict[str, float]:
    """Seconds and CPU-seconds of `action` after dropping `path` from the page cache."""
    drop_cache(path)
    cpu, started = time.process_time(), time.perf_counter()
    action()
    return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu}


def restore_state(run_dir: Path, trainer, config) -> None:
    """Step 1 of the run, as the training loop restores it."""
    import jax

    from llama_jax.checkpoint import RunCheckpoints

    checkpoints = RunCheckpoints(run_dir, trainer, config)
    jax.block_until_ready(checkpoints.restore(1).state)
    checkpoints.close()


def restore_state_with_orbax(run_dir: Path, trainer, config) -> None:
    """Step 1's arrays as the training loop restored them before `ArrayReader`: Orbax's PyTree restore, straight
    onto the trainer's shardings."""
    import jax
    import orbax.checkpoint as ocp

    from llama_jax.checkpoint import RunCheckpoints

    target = trainer.restore_target()
    placed = {item: ocp.args.PyTreeRestore(item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree))
              for item, tree in (("params", target.params), ("opt_state", target.opt_state))}
    checkpoints = RunCheckpoints(run_dir, trainer, config)
    restored = checkpoints.manager.restore(1, args=ocp.args.Composite(**placed))
    jax.block_until_ready((restored["params"], restored["opt_state"]))
    checkpoints.close()


def restores(run_dir: Path, trainer, config, repeats: int) -> dict:
    """Cold restores of the train state and of the parameters, new code and Orbax's, each beside a raw read of the
    same files, taking turns `repeats` times; medians and each turn's restore/raw ratio."""
    import jax
    import orbax.checkpoint as ocp

    import llama_jax

    step_dir = run_dir / "checkpoints" / "1"
    state_files, param_files = files_of(step_dir), files_of(step_dir / "params")
    sizes = {"state": sum(p.stat().st_size for p in state_files),
             "params": sum(p.stat().st_size for p in param_files)}

    def state_new():
        restore_state(run_dir, trainer, config)

    def state_orbax():
        restore_state_with_orbax(run_dir, trainer, config)

    def params_new():
        jax.block_until_ready(llama_jax.load(run_dir))

    def params_orbax():  # NativeSource.read_all before ArrayReader
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = {name: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=device)
                    for name, meta in ocp.PyTreeCheckpointHandler().metadata(step_dir / "params").tree.items()}
        with ocp.StandardCheckpointer() as checkpointer:
            jax.block_until_ready(checkpointer.restore((step_dir / "params").absolute(), abstract))

    cases = {"state": (state_files, {"new": state_new, "orbax": state_orbax}),
             "params": (param_files, {"new": params_new, "orbax": params_orbax})}
    turns: dict[str, list[dict]] = {f"{what}_{how}": [] for what, (_, ways) in cases.items() for how in [*ways, "raw"]}
    for turn in range(repeats):
        for what, (files, ways) in cases.items():
            for how, action in (("raw", lambda files=files: read_raw(files)), *ways.items()):
                timing = cold(step_dir, action)
                timing["gb_per_s"] = sizes[what] / timing["seconds"] / 1e9
                timing["load"] = os.getloadavg()[0]
                turns[f"{what}_{how}"].append(timing)
                print(f"turn {turn + 1}: {what} {how}: {sizes[what] / 1e9:.2f} GB in {timing['seconds']:.2f} s = "
                      f"{timing['gb_per_s']:.2f} GB/s, {timing['cpu_seconds']:.2f} CPU-s (load "
                      f"{timing['load']:.1f})", file=sys.stderr)
    return summarize_turns(turns, sizes)


def summarize_turns(turns: dict[str, list[dict]], sizes: dict[str, int]) -> dict:
    """Medians of each way's GB/s and CPU-s, and of its ratio to the raw read of the same turn."""
    out: dict = {"bytes": sizes, "turns": turns}
    for key, timings in turns.items():
        what, how = key.split("_", 1)
        raw = turns[f"{what}_raw"]
        out[key] = {"median_gb_per_s": statistics.median(t["gb_per_s"] for t in timings),
                    "median_cpu_seconds": statistics.median(t["cpu_seconds"] for t in timings),
                    "ratio_to_raw_per_turn": [t["gb_per_s"] / r["gb_per_s"] for t, r in zip(timings, raw)]}
        out[key]["median_ratio_to_raw"] = statistics.median(out[key]["ratio_to_raw_per_turn"])
        print(f"{key}: median {out[key]['median_gb_per_s']:.2f} GB/s, {out[key]['median_cpu_seconds']:.2f} CPU-s, "
              f"x{out[key]['median_ratio_to_raw']:.2f} the raw read of its turn", file=sys.stderr)
    return out


def two_process_restores(run_dir: Path, dim: int, layers: int, vocab: int, repeats: int) -> dict:
    """Two local processes (one CPU device each, an fsdp=2 mesh), each restoring its own half of the train state;
    process 0 times raw reads, new and Orbax restores between barriers, taking turns."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "scripts.bench_checkpoint", "--restore-worker", str(run_dir),
               "--port", str(port), "--dim", str(dim), "--layers", str(layers), "--vocab", str(vocab),
               "--repeats", str(repeats)]
    workers = [subprocess.Popen([*command, "--process-id", str(i)], env=env, stdout=subprocess.PIPE, text=True)
               for i in range(2)]
    outputs = [worker.communicate()[0] for worker in workers]
    if any(worker.returncode for worker in workers):
        raise RuntimeError(f"a restore worker failed: {[worker.returncode for worker in workers]}")
    return json.loads(outputs[0].strip().splitlines()[-1])  # its last line: the JSON of its results


def restore_worker(run_dir: Path, process_id: int, port: int, dim: int, layers: int, vocab: int,
                   repeats: int) -> dict:

    from llama_jax import distributed
    from llama_jax.config import load_config
    from llama_jax.sharding import make_mesh
    from llama_jax.trainer import Trainer

    config = load_config(None, [*model_overrides(dim, layers, vocab), f"run_dir={run_dir}", "mesh=1x2x1",
                                f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                                f"distributed.process_id={process_id}"])
    distributed.initialize(config.distributed)
    trainer = Trainer.create(config.model, config.optimizer, 1000, make_mesh(1, 2, 1))
    step_dir = run_dir / "checkpoints" / "1"
    files = files_of(step_dir)
    size = sum(p.stat().st_size for p in files)

    def state_new():
        restore_state(run_dir, trainer, config)

    def state_orbax():
        restore_state_with_orbax(run_dir, trainer, config)

    def raw():
        if process_id == 0:
            read_raw(files)

    turns: dict[str, list[dict]] = {"state_raw": [], "state_new": [], "state_orbax": []}
    for turn in range(repeats):
        for key, action in (("state_raw", raw), ("state_new", state_new), ("state_orbax", state_orbax)):
            if process_id == 0:
                drop_cache(step_dir)
            distributed.barrier(f"bench.{turn}.{key}.start")
            cpu, started = time.process_time(), time.perf_counter()
            action()
            distributed.barrier(f"bench.{turn}.{key}.end")
            seconds = time.perf_counter() - started
            turns[key].append({"seconds": seconds, "gb_per_s": size / seconds / 1e9,
                               "cpu_seconds": time.process_time() - cpu, "load": os.getloadavg()[0]})
            if process_id == 0:
                print(f"turn {turn + 1}: 2 processes, {key}: {size / 1e9:.2f} GB in {seconds:.2f} s = "
                      f"{size / seconds / 1e9:.2f} GB/s", file=sys.stderr)
    return summarize_turns(turns, {"state": size}) if process_id == 0 else {}


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
                   for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                   if "tokens_per_sec" in r}
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
    parser.add_argument("--repeats", type=int, default=3, help="turns of raw read and restores, cold")
    parser.add_argument("--pairs", type=int, default=4, help="pairs of 20-step intervals per overhead run")
    parser.add_argument("--overhead-model", default="bench-s", help="a preset, run in float32")
    parser.add_argument("--overhead-batch", type=int, default=8)
    parser.add_argument("--overhead-seq", type=int, default=128)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-saves", action="store_true", help="one synchronous save, only to restore from")
    parser.add_argument("--skip-processes", action="store_true", help="no restore by two local processes")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--restore-worker", type=Path, default=None, help=argparse.SUPPRESS)  # internal
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag in ("dim", "layers", "vocab", "repeats", "pairs", "overhead_batch", "overhead_seq"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not allowed: expected at least 1")
    if args.restore_worker is not None:
        print(json.dumps(restore_worker(args.restore_worker, args.process_id, args.port, args.dim, args.layers,
                                        args.vocab, args.repeats)))
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"load_average_before": os.getloadavg()}
    try:
        if not args.skip_throughput:
            results["throughput"] = throughput(workdir, args.dim, args.layers, args.vocab, args.repeats,
                                               saves=not args.skip_saves, processes=not args.skip_processes)
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
