"""Train-step benchmark on an accelerator: tokens/s per device, MFU against the chip's published peak, peak device
memory and compile time, in one command that finishes in a few minutes.

    python -m scripts.bench_device                        # bench-gpu: a Llama 3.2 1B-shaped model, bf16, 4K context
    python -m scripts.bench_device --config tiny-cpu      # the same code path at a size a CPU runs in seconds
    python -m scripts.bench_device --batch 4 --remat save_dots --attention-impl pallas --json out.json

The step is the library's own (`Trainer.jit_step`: forward, chunked loss, backward, AdamW with clipping) on a mesh of
all local devices (fsdp over them), fed one fixed batch of random tokens (one document per row, so `auto` may take a
kernel that only masks causally). It is compiled ahead of time, so compile time is reported on its own, then run for
--warmup untimed and --steps timed steps.

MFU is the model's FLOPs per second (`ModelConfig.flops_per_token`, PaLM's definition) divided by the chip's
published dense bf16 peak (`llama_jax.planner.GPU_PEAK_BF16_TFLOPS`, by the device kind JAX reports); for a device
the table does not know (a CPU, say) it divides by a matrix multiply measured here instead and says so. Peak memory
is the device's own high-water mark (`memory_stats()["peak_bytes_in_use"]`) where the backend reports one, else
this process's peak RSS. Figures from a device go to benchmarks/, with the card they came from.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_jax.cli import run_program
from llama_jax.errors import ConfigError

SEED = 0


@dataclasses.dataclass(frozen=True)
class DeviceBench:
    """A model shape and a per-device batch."""

    model: dict[str, Any]  # ModelConfig fields
    seq_len: int
    batch_per_device: int


BENCHES = {
    # Llama 3.2 1B's shape (dim 2048, 16 layers, 32 heads / 8 kv heads, MLP 8192, 128K vocabulary, tied embeddings):
    # its parameters, gradients and AdamW moments (~20 GB in float32) leave room for 4K-token activations on one
    # 80 GB GPU.
    "bench-gpu": DeviceBench(dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                                  ffn_hidden_dim=8192, rope_theta=500000.0, tie_embeddings=True, max_seq_len=4096,
                                  dtype="bfloat16", remat_policy="full"), seq_len=4096, batch_per_device=4),
    "tiny-cpu": DeviceBench(dict(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=256,
                                 max_seq_len=256, dtype="float32", remat_policy="full"), seq_len=256,
                            batch_per_device=2),
}


def published_peak(device_kind: str) -> float | None:
    """FLOP/s of one chip from the planner's datasheet table, or None for a device it does not list."""
    from llama_jax.planner import gpu_peak_bf16_tflops  # imports no jax

    tflops = gpu_peak_bf16_tflops(device_kind)
    return None if tflops is None else tflops * 1e12


def peak_memory_bytes(device: Any) -> tuple[int, str]:
    """(bytes, where from): the device allocator's high-water mark, else this process's peak RSS."""
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    from llama_jax.perf import peak_rss_bytes_self

    return peak_rss_bytes_self(), "process peak RSS (the backend reports no device memory)"


def run(bench: DeviceBench, *, steps: int, warmup: int, overrides: dict[str, Any]) -> dict[str, Any]:
    import jax
    import numpy as np

    from llama_jax.config import ModelConfig, OptimizerConfig
    from llama_jax.perf import median, model_flops_utilisation, tokens_per_second
    from llama_jax.sharding import make_mesh
    from llama_jax.trainer import Trainer

    config = ModelConfig(**{**bench.model, **overrides})
    devices = jax.devices()
    mesh = make_mesh(data=1, fsdp=len(devices), tensor=1, devices=devices)
    trainer = Trainer.create(config, OptimizerConfig(warmup_steps=0), total_steps=steps + warmup + 1, mesh=mesh)
    shape = (bench.batch_per_device * len(devices), bench.seq_len)
    rng = np.random.default_rng(SEED)
    tokens = rng.integers(0, config.vocab_size, (shape[0], shape[1] + 1), dtype=np.int32)
    local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones(shape, np.int32)}

    start = time.perf_counter()
    state = trainer.init_state(SEED)
    batch = trainer.place_rows(local, shape[0])
    step = trainer.jit_step(shape)
    lowered = step.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()

    seconds, loss = [], float("nan")
    for index in range(warmup + steps):
        began = time.perf_counter()
        state, metrics = compiled(state, batch)
        loss = float(jax.block_until_ready(metrics)["loss"])
        if index >= warmup:
            seconds.append(time.perf_counter() - began)

    step_seconds = median(seconds)
    tokens_per_sec = tokens_per_second(shape[0] * shape[1], step_seconds)
    flops_per_token = config.flops_per_token(bench.seq_len)
    device = devices[0]
    peak = published_peak(device.device_kind)
    peak_source = "published bf16 peak"
    if peak is None:
        from llama_jax.perf import measure_matmul_ceiling

        peak, peak_source = measure_matmul_ceiling(config.dtype), f"measured {config.dtype} matmul on this device"
    memory, memory_source = peak_memory_bytes(device)
    return {
        "device_kind": device.device_kind, "platform": device.platform, "devices": len(devices),
        "model_params": config.num_params(), "seq_len": bench.seq_len, "global_batch": shape[0],
        "dtype": config.dtype, "remat_policy": config.remat_policy, "attention_impl": config.attention_impl,
        "trace_lower_seconds": lowered_at - start, "compile_seconds": compiled_at - lowered_at,
        "step_seconds": step_seconds, "tokens_per_sec_per_device": tokens_per_sec / len(devices),
        "mfu": model_flops_utilisation(flops_per_token, tokens_per_sec / len(devices), peak),
        "peak_flops_per_device": peak, "peak_source": peak_source,
        "peak_memory_bytes": memory, "memory_source": memory_source, "final_loss": loss,
    }


def format_result(result: dict[str, Any]) -> str:
    from llama_jax.perf import format_bytes

    return "\n".join([
        f"device: {result['devices']} × {result['device_kind']} ({result['platform']})",
        f"model: {result['model_params'] / 1e6:,.1f} M parameters, {result['dtype']}, remat {result['remat_policy']}, "
        f"attention {result['attention_impl']}, {result['global_batch']} × {result['seq_len']} tokens per step",
        f"compile: {result['compile_seconds']:.1f} s (trace + lower {result['trace_lower_seconds']:.1f} s)",
        f"step: {result['step_seconds'] * 1e3:.1f} ms (median) · "
        f"{result['tokens_per_sec_per_device']:,.0f} tokens/s per device · loss {result['final_loss']:.3f}",
        f"MFU: {result['mfu']:.1%} of {result['peak_flops_per_device'] / 1e12:.1f} TFLOP/s ({result['peak_source']})",
        f"peak memory: {format_bytes(result['peak_memory_bytes'])} per device ({result['memory_source']})",
    ])


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_device", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(BENCHES), default="bench-gpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling (default 2)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per device (default: the config's)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the config's)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None)
    parser.add_argument("--remat", choices=("none", "full", "save_dots", "save_attention_out"), default=None)
    parser.add_argument("--attention-impl", default=None, help="model.attention_impl (default: auto)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    for flag in ("steps", "batch", "seq_len"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {value} is not allowed: expected at least 1")
    if args.warmup < 0:
        raise ConfigError(f"--warmup {args.warmup} is not allowed: expected 0 or more")
    bench = BENCHES[args.config]
    if args.batch is not None or args.seq_len is not None:
        bench = dataclasses.replace(bench, batch_per_device=args.batch or bench.batch_per_device,
                                    seq_len=args.seq_len or bench.seq_len)
    overrides = {key: value for key, value in (("dtype", args.dtype), ("remat_policy", args.remat),
                                               ("attention_impl", args.attention_impl)) if value is not None}
    overrides["max_seq_len"] = max(bench.seq_len, bench.model["max_seq_len"])
    result = run(bench, steps=args.steps, warmup=args.warmup, overrides=overrides)
    print(format_result(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    run_program(main)
