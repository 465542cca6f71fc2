"""Time and peak memory of checkpoint conversions on a random model of a few GB (not a test).

    python scripts/bench_convert.py [--dim 2048 --layers 12 --vocab 32000 --dtype float32] [--workdir DIR]

Writes a random Hugging Face checkpoint (generated tensor by tensor, so the writer itself stays small), then runs each
conversion in its own subprocess and reports its wall time, CPU time and peak RSS (from wait4's rusage of that child
alone), against the model's size on disk. On a shared machine the CPU time is the steadier figure. A baseline child
that only imports the converter shows the fixed cost of jax,
Orbax, TensorStore and torch.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from llama_jax.cli import run_program
from llama_jax.errors import ConfigError

CONVERSIONS = [
    ("hf → orbax", "hf", "orbax", []),
    ("orbax → hf", "orbax", "hf_back", []),
    ("hf → meta (1 shard)", "hf", "meta", []),
    ("hf → meta (2 shards)", "hf", "meta2", ["--shards", "2"]),
    ("meta (2 shards) → orbax", "meta2", "orbax_from_meta", []),
    ("meta (2 shards) → hf", "meta2", "hf_from_meta", []),
]
TARGET_FORMAT = {"orbax": "orbax", "hf_back": "hf", "meta": "meta", "meta2": "meta", "orbax_from_meta": "orbax",
                 "hf_from_meta": "hf"}


def make_checkpoint(directory: Path, dim: int, layers: int, vocab: int, dtype: str) -> None:
    """A random HF checkpoint, each tensor generated when the writer asks for it."""
    import numpy as np

    from llama_jax.config import ModelConfig
    from llama_jax.convert import hf
    from llama_jax.convert.common import DTYPES, ParamSource, staged_output
    from llama_jax.params import param_shapes

    config = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=dim // 128, ffn_hidden_dim=dim * 11 // 4)

    class RandomSource(ParamSource):
        def __init__(self) -> None:
            self.config, self.dtype = config, DTYPES[dtype]
            self._shapes = param_shapes(config)

        def read(self, name: str) -> np.ndarray:
            return self._random(self._shapes[name], seed=(zlib.crc32(name.encode()),))

        def read_layer(self, name: str, layer: int) -> np.ndarray:
            return self._random(self._shapes[name][1:], seed=(zlib.crc32(name.encode()), layer))

        def _random(self, shape: tuple[int, ...], seed: tuple[int, ...]) -> np.ndarray:
            rng = np.random.default_rng(seed)
            return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(self.dtype)

    with staged_output(directory) as staging:
        hf.write_hf(RandomSource(), staging, None, max_shard_size=2 * 1000**3)
    print(f"{config.num_params() / 1e6:.0f}M parameters")


class ChildRun(NamedTuple):
    wall: float  # seconds
    cpu: float  # user + system seconds: what the run costs, however busy the machine is
    peak_rss: float  # GB
    out: str


def run_child(args: list[str]) -> ChildRun:
    """Run `python ARGS` and measure it alone (wait4 gives the rusage of exactly that child)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed:\n{err.read()[-3000:]}")
        # ru_maxrss is in KiB on Linux.
        return ChildRun(elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024**2, out.read())


def folder_size(path: Path) -> float:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) / 1e9


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed after")
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)  # child mode: write the random checkpoint
    args = parser.parse_args(argv)
    for flag in ("dim", "layers", "vocab"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} {getattr(args, flag)} is not allowed: expected a positive size")
    if args.make:
        make_checkpoint(args.make, args.dim, args.layers, args.vocab, args.dtype)
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        script = str(Path(__file__).resolve())
        if (workdir / "hf").is_dir():  # a --workdir kept from an earlier run: reuse its random model
            print(f"random model: reusing {workdir / 'hf'}")
        else:
            made = run_child([script, "--make", str(workdir / "hf"), "--dim", str(args.dim), "--layers",
                              str(args.layers), "--vocab", str(args.vocab), "--dtype", args.dtype])
            print(f"random model: {made.out.strip()}, {args.dtype} (written in {made.wall:.1f} s, peak RSS "
                  f"{made.peak_rss:.2f} GB)")
        for _, _, dst, _ in CONVERSIONS:
            shutil.rmtree(workdir / dst, ignore_errors=True)
        size = folder_size(workdir / "hf")
        print(f"model size: {size:.2f} GB of safetensors")
        baseline = run_child(["-c", "import llama_jax.convert, llama_jax.convert.meta, torch"])
        print(f"baseline (imports only): peak RSS {baseline.peak_rss:.2f} GB, {baseline.cpu:.1f} s CPU\n")
        print("| conversion | wall time | CPU time (user + sys) | peak RSS | peak RSS / model size |")
        print("|---|---|---|---|---|")
        for label, src, dst, extra in CONVERSIONS:
            run = run_child(["-m", "llama_jax.convert", str(workdir / src), str(workdir / dst),
                             "--to", TARGET_FORMAT[dst], *extra])
            print(f"| {label} | {run.wall:.1f} s | {run.cpu:.1f} s | {run.peak_rss:.2f} GB | "
                  f"{run.peak_rss / size:.2f} |", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    run_program(main)
