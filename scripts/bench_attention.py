"""Attention alone, forward and forward+backward: `python -m scripts.bench_attention [--config bench-s bench-4k]
[--dtype float32|bfloat16] [--impls flash_cpu chunked sdpa] [--runs 5]`.

One layer's causal self-attention at the train-step benchmark's shapes (`scripts.bench.BENCH_SHAPES`; bench-S:
batch 8 × 1024 tokens, bench-4K: 2 × 4096; the bench-s preset's 8 query heads, 4 kv heads, head_dim 64), through each
implementation in this one process, runs interleaved so that a change in machine load hits them alike:
- flash_cpu: the native CPU kernel (`llama_jax.attention.cpu`), what `model.attention_impl=auto` runs on CPU;
- chunked: XLA's attention in query blocks of the preset's `attention_chunk` (`attention.attend_in_chunks`), what auto
  runs elsewhere;
- sdpa: PyTorch's `scaled_dot_product_attention(is_causal=True, enable_gqa=True)`, the train-step peer's attention.
Reported: the median time, and GFLOP/s counting causal attention's useful products only (forward 2·b·h·s²·d,
backward 2.5× that; no recomputation), beside XLA's float32 matrix multiply measured in the same run.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import Any

from scripts.bench import BENCH_SHAPES

os.environ.setdefault("JAX_PLATFORMS", "cpu")

BACKWARD_FLOPS_FACTOR = 2.5  # the backward's useful products per forward product (FlashAttention's convention)


def forward_flops(model: Any, batch: int, length: int) -> float:
    # 4·b·h·s²·d for both products, halved by causality
    return 2.0 * batch * model.n_heads * length * length * model.head_dim


def jax_calls(impl: str, model: Any, dtype: str, batch: int,
              length: int) -> tuple[Callable[[], object], Callable[[], object]]:
    import jax
    import jax.numpy as jnp

    from llama_jax.attention import AttentionMask, attend_in_chunks
    from llama_jax.attention.cpu import attend_flash_cpu

    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, length, model.n_heads, model.head_dim)).astype(dtype)
    k, v = (jax.random.normal(key, (batch, length, model.kv_heads, model.head_dim)).astype(dtype)
            for key in keys[1:])
    slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    segments = jnp.ones((batch, length), jnp.int32)
    mask = AttentionMask(slots, segments, slots, segments)

    def attention(q, k, v):
        if impl == "flash_cpu":
            return attend_flash_cpu(q, k, v, mask)
        return attend_in_chunks(q, k, v, mask, model.attention_chunk)

    forward = jax.jit(attention)
    gradients = jax.jit(jax.grad(lambda *qkv: jnp.sum(attention(*qkv).astype(jnp.float32)), argnums=(0, 1, 2)))
    return (lambda: jax.block_until_ready(forward(q, k, v)),
            lambda: jax.block_until_ready(gradients(q, k, v)))


def torch_calls(model: Any, dtype: str, batch: int,
                length: int) -> tuple[Callable[[], object], Callable[[], object]]:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, model.n_heads, length, model.head_dim, generator=generator).to(getattr(torch, dtype))
    k, v = (torch.randn(batch, model.kv_heads, length, model.head_dim, generator=generator).to(q.dtype)
            for _ in range(2))

    def forward():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def gradients():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True).float().sum().backward()

    return forward, gradients


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", choices=sorted(BENCH_SHAPES),
                        default=sorted(BENCH_SHAPES, reverse=True))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--impls", nargs="+", choices=("flash_cpu", "chunked", "sdpa"),
                        default=["flash_cpu", "chunked", "sdpa"])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per call after one warm-up (default 5)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    impls = [impl for impl in args.impls if impl != "sdpa" or importlib.util.find_spec("torch") is not None]

    from llama_jax import perf
    from llama_jax.attention import cpu as cpu_kernels
    from llama_jax.config import MODEL_PRESETS

    if "flash_cpu" in impls and (reason := cpu_kernels.unavailable_reason()) is not None:
        print(f"flash_cpu left out: {reason}")
        impls.remove("flash_cpu")
    ceiling = perf.measure_matmul_ceiling("float32")
    print(f"XLA float32 matmul: {ceiling / 1e9:.0f} GFLOP/s; dtype {args.dtype}; median of {args.runs} runs")
    for config in args.config:
        preset, length, batch = BENCH_SHAPES[config]
        model = MODEL_PRESETS[preset]
        calls = {impl: torch_calls(model, args.dtype, batch, length) if impl == "sdpa"
                 else jax_calls(impl, model, args.dtype, batch, length) for impl in impls}
        for pair in calls.values():
            for call in pair:
                call()  # compiles
        times: dict[tuple[str, int], list[float]] = {(impl, which): [] for impl in impls for which in (0, 1)}
        for _ in range(args.runs):
            for impl, pair in calls.items():
                for which, call in enumerate(pair):
                    times[impl, which].append(perf.time_call(call))
        flops = forward_flops(model, batch, length)
        print(f"{config}: batch {batch} × {length} tokens, {model.n_heads} heads / {model.kv_heads} kv heads, "
              f"head_dim {model.head_dim}")
        for impl in impls:
            forward, both = perf.median(times[impl, 0]), perf.median(times[impl, 1])
            both_flops = flops * (1 + BACKWARD_FLOPS_FACTOR)
            print(f"  {impl:<10} forward {forward * 1e3:7.0f} ms ({flops / forward / 1e9:4.0f} GFLOP/s)   "
                  f"forward+backward {both * 1e3:7.0f} ms ({both_flops / both / 1e9:4.0f} GFLOP/s, "
                  f"{both_flops / both / ceiling:.0%} of the matmul)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
