"""Native CPU kernels, compiled on first use: flash attention (forward and backward) as XLA FFI custom calls.

XLA:CPU has no fused attention: it writes each softmax pass over a block of scores to memory and runs the
head_dim-wide products well below its matrix-multiply rate, so attention takes a much larger share of a train step
than of its FLOPs (figures: benchmarks/). `flash_attention_cpu.cc` keeps each 64×64 score block in cache and
computes the softmax online.

The C++ source is compiled once per machine and source version with the system's C++ compiler (`$CXX`, else `c++`)
into `$LLAMA_JAX_CACHE/kernels/` (default `~/.cache/llama_jax/kernels/`), written under a temporary name and renamed,
so concurrent processes never load a half-written library. Without a compiler `available()` says why and the model
uses its XLA attention instead.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from llama_jax.attention.mask import AttentionMask
from llama_jax.attention.shards import over_shards, target_platform, unshardable_reason
from llama_jax.attention.xla import saveable
from llama_jax.errors import KernelError

SOURCE = Path(__file__).with_name("flash_attention_cpu.cc")
FORWARD_TARGET, BACKWARD_TARGET = "llama_jax_flash_attention_forward", "llama_jax_flash_attention_backward"
COMPILE_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC")
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float32)


def _machine_key() -> str:
    """The CPU's model and features: -march=native code built on one machine may not run on another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _library_path(compiler: str) -> Path:
    from llama_jax.data import default_cache_dir
    key = hashlib.sha256(b"\0".join(
        part.encode() for part in (SOURCE.read_text(), " ".join(COMPILE_FLAGS), compiler, jax.__version__,
                                   jax.ffi.include_dir(), _machine_key()))).hexdigest()[:16]
    return default_cache_dir() / "kernels" / f"flash_attention_cpu-{key}.so"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *COMPILE_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelError(f"compiling {SOURCE.name} failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
        os.replace(built, target)


@functools.cache
def _load() -> str | None:
    """Build (once per machine) and register the kernels; returns None, or why they cannot be used."""
    if platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        return f"no native kernels for {platform.machine()}"
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        return "no C++ compiler found (set $CXX)"
    library_path = _library_path(compiler)
    try:
        if not library_path.exists():
            _build(compiler, library_path)
        library = ctypes.cdll.LoadLibrary(str(library_path))
    except (KernelError, OSError) as error:
        return str(error)
    for name, symbol in ((FORWARD_TARGET, library.LlamaJaxFlashAttentionForward),
                         (BACKWARD_TARGET, library.LlamaJaxFlashAttentionBackward)):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    return None


def unavailable_reason() -> str | None:
    """None when the flash-attention kernels are built and registered, else why not."""
    return _load()


def flash_attention_supports(q: jax.Array, k: jax.Array) -> str | None:
    """None if the kernel can run these shapes and dtypes on the mesh's platform (`shards.target_platform`: the
    platform of the mesh's devices, outside a mesh the default backend) and mesh, else why not."""
    platform = target_platform()
    if platform != "cpu":
        return f"the kernel is for CPU, not {platform}"
    if q.dtype != k.dtype or q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (supported: bfloat16, float32)"
    if q.shape[-1] % 16:
        return f"head_dim {q.shape[-1]} is not a multiple of 16"
    return unshardable_reason(q, k) or unavailable_reason()


def _mask_arrays(mask: AttentionMask) -> tuple[jax.Array, ...]:
    query_segments, key_segments = mask.segments()
    return tuple(x.astype(jnp.int32) for x in (mask.query_slots, query_segments, mask.key_slots, key_segments))


_IN_KINDS = ("q", "kv", "kv", "tokens", "tokens", "tokens", "tokens", "q", "heads", "q")


def flash_attention_forward(q: jax.Array, k: jax.Array, v: jax.Array,
                            mask: AttentionMask) -> tuple[jax.Array, jax.Array]:
    """Attention output [b, s, heads, d] (q's dtype) and log-normaliser [b, heads, s] float32."""
    _require_kernel()

    def kernel(q, k, v, *mask_arrays):
        batch, length, heads, _ = q.shape
        return jax.ffi.ffi_call(FORWARD_TARGET, (jax.ShapeDtypeStruct(q.shape, q.dtype),
                                                 jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)),
                                vmap_method="sequential")(q, k, v, *mask_arrays)

    args = (q, k, v, *_mask_arrays(mask))
    return over_shards(kernel, q, k, args, _IN_KINDS[:len(args)], ("q", "heads"))


def flash_attention_backward(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, out: jax.Array,
                             log_normaliser: jax.Array, grad_out: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dq, dk, dv in the inputs' dtype, from the forward pass's output and log-normaliser."""
    _require_kernel()

    def kernel(q, k, v, *rest):
        shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
        return jax.ffi.ffi_call(BACKWARD_TARGET, shapes, vmap_method="sequential")(q, k, v, *rest)

    args = (q, k, v, *_mask_arrays(mask), out.astype(q.dtype), log_normaliser, grad_out.astype(q.dtype))
    return over_shards(kernel, q, k, args, _IN_KINDS, ("q", "kv", "kv"))


def _require_kernel() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise KernelError(f"model.attention_impl=flash_cpu: the CPU flash-attention kernel is unavailable: {reason}")


@jax.custom_vjp
def attend_flash_cpu(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
    """`attend_in_chunks` as one native CPU kernel per direction (`flash_attention_cpu.cc`): the same blocks of
    queries and keys, but each score block stays in cache between the products, and the softmax is online."""
    return flash_attention_forward(q, k, v, mask)[0]


def _attend_flash_fwd(q, k, v, mask):
    out, log_normaliser = saveable(*flash_attention_forward(q, k, v, mask))
    return out, (q, k, v, mask, out, log_normaliser)


def _attend_flash_bwd(residuals, grad_out):
    return (*flash_attention_backward(*residuals, grad_out), None)


attend_flash_cpu.defvjp(_attend_flash_fwd, _attend_flash_bwd)
