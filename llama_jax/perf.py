"""Measurement helpers shared by the benchmark and the training program: timing, FLOP/s ceilings, MFU, peak memory.

This module imports only the standard library at the top: jax and torch are imported inside the functions that need
them, so a process measuring the PyTorch peer's memory can load this file without loading jax (whose import alone
would add to that memory).

Model FLOPs utilisation (MFU) here is the model's FLOPs per second (`ModelConfig.flops_per_token` × tokens/s)
divided by a matrix-multiply ceiling measured on the same machine in the same run, not by a datasheet peak: on a
shared CPU the deliverable matmul rate moves with the load, and what matters is how much of it the step uses.
"""
from __future__ import annotations

import functools
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

# A square matmul of this size is large enough to reach the BLAS/XLA kernels' steady state on a CPU core
# (≈ 17 GFLOP, tens of milliseconds) and small enough that a whole ceiling measurement takes about a second.
CEILING_MATMUL_SIZE = 2048
CEILING_REPEATS = 8


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence (mean of the middle two for an even count)."""
    if not values:
        raise ValueError("median of an empty sequence")
    return float(statistics.median(values))


class StageTimes:
    """Wall-clock seconds of an experiment's named stages, each printed to stderr as it ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, stage: str, function: Callable[..., object], *arguments: object) -> object:
        start = time.perf_counter()
        value = function(*arguments)
        self.seconds[stage] = round(time.perf_counter() - start, 1)
        print(f"{stage}: {self.seconds[stage]:.0f} s", file=sys.stderr, flush=True)
        return value


def matmul_flops(rows: int, inner: int, cols: int) -> float:
    """FLOPs of a [rows, inner] × [inner, cols] product: one multiply and one add per term."""
    return 2.0 * rows * inner * cols


def tokens_per_second(tokens_per_step: int, step_seconds: float) -> float:
    return tokens_per_step / step_seconds


def model_flops_utilisation(flops_per_token: float, tokens_per_sec: float, ceiling_flops_per_sec: float) -> float:
    """Fraction of the measured matmul ceiling that the model's useful FLOPs reach."""
    return flops_per_token * tokens_per_sec / ceiling_flops_per_sec


def time_call(call: Callable[[], object]) -> float:
    """Wall seconds of one call; `call` must block until its work is done (e.g. `jax.block_until_ready`)."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def time_call_with_cpu(call: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one blocking call.

    On a shared machine the CPU time tells how much work a step is, apart from how long it waited for a core
    (inflated somewhat by threads spinning at barriers while a sibling waits).
    """
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def rate_from_timings(flops: float, seconds: Sequence[float]) -> float:
    """FLOP/s at the median of the timings (median, not best: step times are medians too, so MFU compares like
    with like on a machine whose load changes)."""
    return flops / median(seconds)


# ── Matrix-multiply ceilings ─────────────────────────────────────────────────────────────────────────────────────
def measure_matmul_ceiling(dtype: str = "bfloat16", size: int = CEILING_MATMUL_SIZE,
                           repeats: int = CEILING_REPEATS) -> float:
    """FLOP/s of an XLA [size, size] matmul on the default device, as the model computes it.

    bfloat16 means bfloat16 inputs accumulated and returned in float32 (`preferred_element_type`): the model's
    dots do this because XLA:CPU's bf16 → bf16 dot is far slower. float32 is a plain float32 dot. The output
    buffer is donated back each call so the timing is the kernel, not page faults on a fresh 16 MiB result.
    """
    import jax

    matmul, inputs, output = _xla_matmul(dtype, size)
    timings = []
    for _ in range(repeats + 1):  # the first call includes compilation
        start = time.perf_counter()
        output = jax.block_until_ready(matmul(*inputs, output))
        timings.append(time.perf_counter() - start)
    return rate_from_timings(matmul_flops(size, size, size), timings[1:])


@functools.lru_cache(maxsize=4)
def _xla_matmul(dtype: str, size: int):
    import jax
    import jax.numpy as jnp

    input_dtype = jnp.dtype(dtype)
    accumulate = jnp.float32 if input_dtype == jnp.bfloat16 else input_dtype
    keys = jax.random.split(jax.random.key(0))
    inputs = tuple(jax.random.normal(key, (size, size), jnp.float32).astype(input_dtype) for key in keys)

    @functools.partial(jax.jit, donate_argnums=2)
    def matmul(left, right, previous_output):
        del previous_output  # donated only so XLA can write the result into its buffer
        return jnp.dot(left, right, preferred_element_type=accumulate)

    return matmul, inputs, jnp.zeros((size, size), accumulate)


def measure_torch_matmul_ceiling(dtype: str = "bfloat16", size: int = CEILING_MATMUL_SIZE,
                                 repeats: int = CEILING_REPEATS) -> float:
    """FLOP/s of a PyTorch [size, size] matmul in `dtype` (oneDNN for bf16, MKL/OpenBLAS for f32), written into
    a reused output tensor."""
    import torch

    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(0)
    left, right = (torch.randn(size, size, generator=generator).to(torch_dtype) for _ in range(2))
    output = torch.empty(size, size, dtype=torch_dtype)
    timings = [time_call(lambda: torch.matmul(left, right, out=output)) for _ in range(repeats + 1)]
    return rate_from_timings(matmul_flops(size, size, size), timings[1:])


# ── Memory ───────────────────────────────────────────────────────────────────────────────────────────────────────
def max_rss_bytes(usage: resource.struct_rusage) -> int:
    """ru_maxrss in bytes: Linux reports KiB (macOS reports bytes)."""
    return usage.ru_maxrss * (1 if os.uname().sysname == "Darwin" else 1024)


def peak_rss_bytes_self() -> int:
    """This process's peak resident set size so far."""
    return max_rss_bytes(resource.getrusage(resource.RUSAGE_SELF))


def wait_with_peak_rss(process: subprocess.Popen) -> tuple[int, int]:
    """Reap `process` and return (exit code, its peak RSS in bytes).

    os.wait4 gives this one child's resource usage; RUSAGE_CHILDREN would be the maximum over every child this
    process has reaped so far, which mixes up the processes of a side-by-side benchmark.
    Spawn from a lean process: Linux starts the child's count at the spawning process's own high-water mark (the
    fork/vfork image is counted at exec), so a parent that once held 1 GB gives every child a 1 GB floor.
    """
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, max_rss_bytes(usage)


def format_bytes(count: float) -> str:
    if count <= 0:
        return "0 B"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = min(int(math.log(count, 1024)), len(units) - 1)
    return f"{count / 1024 ** power:.1f} {units[power]}" if power else f"{int(count)} B"
