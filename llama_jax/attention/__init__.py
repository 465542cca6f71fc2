"""Attention, by implementation. `attention` picks one from `model.attention_impl`:

- `dense` (`xla.attend`): the whole score matrix at once; also what decoding with a KV cache uses.
- `chunked` (`xla.attend_in_chunks`): blocks of `model.attention_chunk` queries, never the [s, s] matrix.
- `flash_cpu` (`cpu.attend_flash_cpu`): the native CPU kernel, score blocks kept in cache, online softmax.
- `cudnn` (`gpu.attend_cudnn`): cuDNN flash attention; causal only, so never for a mask with segment ids.
- `pallas` (`gpu.attend_pallas`): the Pallas/Triton flash-attention kernel for GPUs, with segment ids.
- `splash` (`tpu.attend_splash`): Pallas splash attention for TPUs, with segment ids.
- `auto`: by the platform of the mesh's devices (`shards.target_platform`, never the process's default backend):
  TPU → splash; GPU → cudnn for a mask without segment ids (one document per row), pallas for packed documents (and
  where cudnn cannot run); CPU → flash_cpu. Where that kernel cannot take the shapes, dtypes or mesh, `chunked` for
  sequences longer than one chunk, else `dense`, with a one-line warning once per shape.

When the mesh splits the sequence (rules mapping `length` to a mesh axis), `context.attend_over_sequence_shards`
gathers keys and values along it and runs flash_cpu, chunked or dense on each device's queries (context parallelism).

A kernel asked for by name that cannot run raises a one-line `KernelError` naming the key and the reason. A GPU or
TPU kernel asked for by name in a program for CPU devices runs emulated (Pallas interpret mode; cuDNN's call with
`implementation="xla"`), with a warning: that is how the tests check their numerics on CPU. To lower a program for
another platform than the mesh's devices, trace it under `compiling_for("cuda")` (or "tpu").

Every implementation takes q [b, s, heads, d], k/v [b, t, kv_heads, d] (grouped-query: query head h reads kv head
h // (heads / kv_heads)) and an `AttentionMask`, and returns [b, s, heads, d] in q's dtype. Each names its output
and log-normaliser for the `save_attention_out` remat policy.
"""
from __future__ import annotations

import jax

from llama_jax.attention import context, cpu, gpu, tpu
from llama_jax.attention.mask import AttentionMask, write_into_cache
from llama_jax.attention.shards import compiling_for, mesh_platform, target_platform, warn_once
from llama_jax.attention.xla import attend, attend_in_chunks
from llama_jax.config import ModelConfig
from llama_jax.errors import KernelError

__all__ = ["AttentionMask", "attend", "attend_in_chunks", "attention", "compiling_for", "implementation",
           "mesh_platform", "target_platform", "write_into_cache"]

KERNEL_PLATFORMS = {"flash_cpu": ("cpu",), "cudnn": ("gpu",), "pallas": ("gpu",), "splash": ("tpu",)}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, config: ModelConfig) -> jax.Array:
    """Causal grouped-query self-attention by `config.attention_impl`."""
    sequence_split = context.sequence_specs(q, k)
    if sequence_split is not None:
        return context.attend_over_sequence_shards(q, k, v, mask, config, sequence_split)
    impl = implementation(config, q, k, mask)
    interpret = impl in ("cudnn", "pallas", "splash") and target_platform() == "cpu"
    if interpret:
        how = "jax.nn.dot_product_attention with implementation='xla'" if impl == "cudnn" else "Pallas interpret mode"
        warn_once(("interpret", impl), f"model.attention_impl={impl} on cpu devices runs emulated ({how}): a "
                                        "numerics check, not the kernel, and slow")
    if impl == "flash_cpu":
        return cpu.attend_flash_cpu(q, k, v, mask)
    if impl == "cudnn":
        return gpu.attend_cudnn(q, k, v, interpret=interpret)
    if impl == "pallas":
        return gpu.attend_pallas(q, k, v, mask, interpret=interpret)
    if impl == "splash":
        return tpu.attend_splash(q, k, v, mask, config, interpret=interpret)
    if impl == "chunked":
        return attend_in_chunks(q, k, v, mask, config.attention_chunk)
    return attend(q, k, v, mask.dense())


def implementation(config: ModelConfig, q: jax.Array, k: jax.Array, mask: AttentionMask) -> str:
    """The implementation `attention` runs for these inputs on the platform being traced for (see the module)."""
    impl, platform = config.attention_impl, target_platform()
    if impl in KERNEL_PLATFORMS:
        reason = unsupported(impl, q, k, mask, config, platform)
        if reason is not None:
            raise KernelError(f"model.attention_impl={impl} cannot run here: {reason}")
        return impl
    if impl == "auto":
        reasons = []
        for candidate in auto_candidates(platform, mask):
            reason = unsupported(candidate, q, k, mask, config, platform)
            if reason is None:
                break
            reasons.append(f"{candidate}: {reason}")
        else:
            candidate = "chunked" if q.shape[1] > config.attention_chunk else "dense"
        if reasons:
            key = (candidate, platform, q.shape, k.shape, str(q.dtype), tuple(reasons))
            warn_once(key, f"model.attention_impl=auto runs {candidate} for q {list(q.shape)} {q.dtype} on {platform}"
                            f" ({'; '.join(reasons)})")
        return candidate
    return impl


def auto_candidates(platform: str, mask: AttentionMask) -> tuple[str, ...]:
    """The fused kernels `auto` tries on this platform, best first. cuDNN only without segment ids: it cannot keep
    packed documents apart."""
    if platform == "tpu":
        return ("splash",)
    if platform == "gpu":
        return ("pallas",) if mask.has_segments else ("cudnn", "pallas")
    if platform == "cpu":
        return ("flash_cpu",)
    return ()


def unsupported(impl: str, q: jax.Array, k: jax.Array, mask: AttentionMask, config: ModelConfig,
                platform: str) -> str | None:
    """None if the fused kernel `impl` can run these inputs in a program for `platform`, else why not. GPU and TPU
    kernels also "run" for cpu, emulated (see the module docstring)."""
    if impl == "flash_cpu":
        return cpu.flash_attention_supports(q, k)
    if platform not in KERNEL_PLATFORMS[impl] + ("cpu",):
        return f"{impl} is a {KERNEL_PLATFORMS[impl][0].upper()} kernel and the mesh's devices are {platform}"
    if impl == "cudnn":
        return gpu.cudnn_supports(q, k, mask, interpret=platform == "cpu")
    if impl == "pallas":
        return gpu.pallas_supports(q, k)
    return tpu.splash_supports(q, k, config)

