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
from flax.linen import spmd as flax_spmd
from jax.sharding import PartitionSpec

from llama_jax.attention.mask import AttentionMask
from llama_jax.attention.xla import saveable
from llama_jax.errors import KernelError
from llama_jax.sharding import logical_to_spec

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
    """None if the kernel can run these shapes and dtypes on the current backend and mesh, else why not."""
    if jax.default_backend() != "cpu":
        return f"the kernel is for CPU, not {jax.default_backend()}"
    if q.dtype != k.dtype or q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (supported: bfloat16, float32)"
    if q.shape[-1] % 16:
        return f"head_dim {q.shape[-1]} is not a multiple of 16"
    if _shard_specs(q, k) is None:
        return "the mesh splits the sequence, or splits query and key/value heads differently"
    return unavailable_reason()


def _shard_specs(q: jax.Array, k: jax.Array) -> tuple[PartitionSpec, PartitionSpec] | None | tuple[()]:
    """PartitionSpecs of q and k/v under the current mesh and rules: () outside a mesh, None if the kernel cannot
    run shard by shard (the sequence is split, or heads are split unlike kv heads, which breaks the grouping)."""
    rules = flax_spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty or mesh.size == 1:
        return ()
    q_spec = logical_to_spec(("batch", "length", "heads", "head_dim"), tuple(rules), q.shape, mesh)
    k_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), tuple(rules), k.shape, mesh)
    if q_spec[1] or k_spec[1] or q_spec[3] or k_spec[3] or q_spec[0] != k_spec[0] or q_spec[2] != k_spec[2]:
        return None
    return q_spec, k_spec


def _over_shards(kernel, q: jax.Array, k: jax.Array, args: tuple, out_kinds: tuple[str, ...]):
    """Run `kernel(*args)` on each device's shard. Arguments and results are named by kind: "q" [b, s, heads, d],
    "kv" [b, t, kv_heads, d], "tokens" [b, s], "heads" [b, heads, s]."""
    specs = _shard_specs(q, k)
    if specs == ():
        return kernel(*args)
    q_spec, k_spec = specs
    by_kind = {"q": q_spec, "kv": k_spec, "tokens": PartitionSpec(q_spec[0], None),
               "heads": PartitionSpec(q_spec[0], q_spec[2], None)}
    in_kinds = ("q", "kv", "kv", "tokens", "tokens", "tokens", "tokens", "q", "heads", "q")[:len(args)]
    return jax.shard_map(kernel, in_specs=tuple(by_kind[kind] for kind in in_kinds),
                         out_specs=tuple(by_kind[kind] for kind in out_kinds), check_vma=False)(*args)


def _mask_arrays(mask: AttentionMask) -> tuple[jax.Array, ...]:
    return tuple(x.astype(jnp.int32) for x in (mask.query_slots, mask.query_segments, mask.key_slots,
                                              mask.key_segments))


def flash_attention_forward(q: jax.Array, k: jax.Array, v: jax.Array,
                            mask: AttentionMask) -> tuple[jax.Array, jax.Array]:
    """Attention output [b, s, heads, d] (q's dtype) and log-normaliser [b, heads, s] float32."""
    _require_kernel()

    def kernel(q, k, v, *mask_arrays):
        batch, length, heads, _ = q.shape
        return jax.ffi.ffi_call(FORWARD_TARGET, (jax.ShapeDtypeStruct(q.shape, q.dtype),
                                                 jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)),
                                vmap_method="sequential")(q, k, v, *mask_arrays)

    return _over_shards(kernel, q, k, (q, k, v, *_mask_arrays(mask)), ("q", "heads"))


def flash_attention_backward(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, out: jax.Array,
                             log_normaliser: jax.Array, grad_out: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dq, dk, dv in the inputs' dtype, from the forward pass's output and log-normaliser."""
    _require_kernel()

    def kernel(q, k, v, *rest):
        shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
        return jax.ffi.ffi_call(BACKWARD_TARGET, shapes, vmap_method="sequential")(q, k, v, *rest)

    args = (q, k, v, *_mask_arrays(mask), out.astype(q.dtype), log_normaliser, grad_out.astype(q.dtype))
    return _over_shards(kernel, q, k, args, ("q", "kv", "kv"))


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
