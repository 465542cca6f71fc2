"""Plan a pretraining run before renting the cluster: memory per device, FLOPs, step time and device-hours.

The library behind `python -m train.plan CONFIG.yaml [key=value ...] (--devices N | --target tpu-GEN:TOPOLOGY)`.
This module imports no jax at the top, so that program can import it before choosing the device count.

Two compilers, one method. What a plan does, on any machine (a laptop will do):
1. compiles the real train step (`Trainer.jit_step`: forward, chunked loss, backward with remat, gradient
   accumulation, AdamW) for the mesh ahead of time from abstract shapes carrying their shardings — no parameter is
   ever allocated (`compile_plan`) — for one of two kinds of devices:
   - **GPU plans** (`--devices N --accelerator h100-sxm|a100-80gb`): N simulated CPU devices (XLA's host platform,
     set before jax is imported), compiled by **XLA:CPU**. Deviceless compilation for CUDA does not exist in this jax,
     so the memory figures are XLA:CPU's buffer assignment standing in for XLA:GPU's (caveat below).
   - **TPU plans** (`--target tpu-v5p:2x2x1`, also v4, v5e, v6e; `parse_target`): the compile-only devices of that TPU
     topology (`jax.experimental.topologies`, from libtpu, the optional `tpu` extra), compiled by **XLA:TPU**, the
     compiler a TPU VM runs. Its memory analysis is the chip's own (`tpu_devices`).
2. reads the compiled program's memory analysis (per-device bytes of arguments, temporaries and, on TPUs, program
   code), counts the step's matrix-multiply FLOPs in the traced program (`matmul_flops`: XLA's `cost_analysis()`
   counts each while-loop body once, so its FLOPs are not a step total), and sets them against the model FLOPs of
   PaLM's MFU definition;
3. GPU plans: for an accelerator (datasheet peak bf16 dense rates) and an assumed MFU, gives step time, tokens per day
   and GPU-hours for a token budget, and what MFU Meta's published Llama 2 GPU-hours imply (`build_report`,
   `format_report`). TPU plans: a roofline (`roofline`) of the traced FLOPs against the chip's published bf16 peak and
   of XLA:TPU's bytes accessed against its HBM bandwidth — a lower bound on step time, so an upper bound on MFU — and
   chip-hours at that bound and at the assumed MFU (`build_tpu_report`, `format_tpu_report`);
4. says whether the step fits in a device's memory and, if not, suggests the smallest fsdp × tensor split that fits
   (`suggest_splits`), then compiles that suggestion to check it (`verify` in a fresh process for GPU plans, whose
   simulated device count is fixed at import; in this process for TPU plans). On a TPU the limit is the compiler's:
   XLA:TPU places every buffer when it compiles, states how much HBM it lets a program use (`tpu_hbm_limit`) and
   refuses (`RESOURCE_EXHAUSTED`) a program that needs more; "fits" means it compiled and its memory analysis stays
   within that limit (`fits_tpu`).

Batch: the config's global batch (train.batch_size × train.seq_len) is split over the mesh axes the rules give the
batch (data × fsdp by default) and processed in micro-batches of `micro_batch` sequences per batch shard (gradient
accumulation inside the step), so the compiled temporaries are those of one micro-batch while the arguments hold the
whole global batch. Rules that split the sequence (`sharding_rules: sequence`: batch over data, length over fsdp)
divide each micro-batch's tokens, and so its activations, among the devices of a batch shard
(`batch_and_sequence_shards`): how long-context runs fit.

Caveat for GPU plans, printed with the results: XLA:CPU's compiled memory differs from XLA:GPU's. The CPU backend has
no native bf16 arithmetic (it upcasts and may keep float32 copies), uses all-reduce where GPUs reduce-scatter,
schedules buffers differently and has none of the GPU's fusion- or cuDNN/NCCL-specific workspace. Parameters,
optimizer state and gradients are exact (they follow from shapes and shardings); activations and temporaries are an
estimate, high or low (benchmarks/2026-12-06-tpu-planner.md sets XLA:CPU's figures beside XLA:TPU's for the same
steps). Attention is compiled as XLA's chunked attention, never the CPU flash-attention kernel (an opaque custom call
the FLOP count cannot see into). TPU plans compile attention as `model.attention_impl`
chooses for a TPU mesh (`auto`: splash) and say which kernel the step used; Pallas kernels' FLOPs are counted from
their kernel body times their grid.
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_jax.errors import ConfigError
from llama_jax.perf import format_bytes

REPO = Path(__file__).resolve().parents[1]  # where `python -m train.plan` runs (verify)
GIB = 1024 ** 3
MAX_VERIFIED = 3  # suggested splits compiled, in order, until one fits
TPU_MAX_VERIFIED = 6  # more for TPU plans: compiled in this process, and the estimates of tensor splits run low
HEADROOM = 0.10  # fraction of device memory left free for the allocator's fragmentation, NCCL buffers, CUDA context
# A TPU program's buffers are placed by the compiler, with no allocator at run time: nothing is kept free for
# fragmentation, only the part of HBM the TPU runtime keeps, which XLA:TPU states (`tpu_hbm_limit`); this fraction
# stands in where it does not.
TPU_RESERVE = 0.02


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_bf16_tflops: float  # dense (no 2:4 sparsity), per device
    memory_gib: float
    source: str


# Dense bf16 tensor-core peaks from the vendors' datasheets (the sparsity figures there are twice these), TFLOP/s per
# device, by a name that jax.Device.device_kind contains: the first match wins, so more specific names come first.
GPU_PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM5, also reported as "H100 80GB HBM3"
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def gpu_peak_bf16_tflops(device_kind: str) -> float | None:
    """The datasheet peak of the GPU `device_kind` names (as jax.Device.device_kind spells it), or None."""
    return next((tflops for name, tflops in GPU_PEAK_BF16_TFLOPS if name.lower() in device_kind.lower()), None)


ACCELERATORS = {
    "h100-sxm": Accelerator("H100 SXM", gpu_peak_bf16_tflops("H100 SXM"), 80.0,
                            "NVIDIA H100 Tensor Core GPU datasheet: BF16 Tensor Core 1,979 TFLOP/s with sparsity "
                            "= 989 dense; 80 GB HBM3"),
    "a100-80gb": Accelerator("A100 80GB", gpu_peak_bf16_tflops("A100 80GB"), 80.0,
                             "NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOP/s dense "
                             "(624 with sparsity); 80 GB HBM2e"),
}


def accelerator_named(name: str, memory_gib: float | None = None) -> Accelerator:
    """One of ACCELERATORS, with another memory size if given (e.g. 40 for an A100 40GB)."""
    if name not in ACCELERATORS:
        raise ConfigError(f"accelerator {name!r}: expected one of {', '.join(sorted(ACCELERATORS))}")
    accelerator = ACCELERATORS[name]
    return dataclasses.replace(accelerator, memory_gib=memory_gib) if memory_gib else accelerator


@dataclass(frozen=True)
class TpuChip:
    generation: str  # as in a target name: v4, v5e, v5p, v6e
    name: str
    peak_bf16_tflops: float  # per chip
    hbm_gib: float  # per chip
    hbm_gbytes_per_second: float  # per chip, 1e9 bytes
    axes: int  # a topology's axes: 3 (v4, v5p: 3-D torus) or 2 (v5e, v6e)
    megacore: bool  # the chip's two TensorCores are one JAX device (v4, v5p), as on a TPU VM
    source: str


# Per-chip figures from Google Cloud's TPU system-architecture pages (cloud.google.com/tpu/docs/<generation>).
TPU_CHIPS = {
    "v4": TpuChip("v4", "TPU v4", 275.0, 32.0, 1200.0, 3, True,
                  "cloud.google.com/tpu/docs/v4: peak compute per chip 275 TFLOP/s (bf16); HBM2 32 GiB, 1200 GB/s"),
    "v5e": TpuChip("v5e", "TPU v5e", 197.0, 16.0, 819.0, 2, False,
                   "cloud.google.com/tpu/docs/v5e: peak compute per chip 197 TFLOP/s (bf16); HBM2 16 GB, 819 GB/s"),
    "v5p": TpuChip("v5p", "TPU v5p", 459.0, 95.0, 2765.0, 3, True,
                   "cloud.google.com/tpu/docs/v5p: peak compute per chip 459 TFLOP/s (bf16); HBM2e 95 GiB, 2765 GB/s"),
    "v6e": TpuChip("v6e", "TPU v6e", 918.0, 32.0, 1638.0, 2, False,
                   "cloud.google.com/tpu/docs/v6e: peak compute per chip 918 TFLOP/s (bf16); HBM 32 GB, 1638 GB/s"),
}
TPU_MAX_CHIPS = {"v4": 4096, "v5e": 256, "v5p": 8192, "v6e": 256}  # one slice (a pod); suggestions stay within
TARGET_FORMAT = "tpu-GENERATION:TOPOLOGY"


@dataclass(frozen=True)
class TpuTarget:
    """A TPU slice named by its chips along each axis, as XLA:TPU's topologies are (`tpu-v5p:2x2x1`: 4 chips)."""

    chip: TpuChip
    shape: tuple[int, ...]

    @property
    def topology(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def name(self) -> str:
        return f"tpu-{self.chip.generation}:{self.topology}"

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    def accelerator_type(self) -> str:
        """Cloud TPU's AcceleratorType for this slice (v4 and v5p count TensorCores, two per chip)."""
        generation = self.chip.generation
        if generation == "v5e":
            return f"v5litepod-{self.chips}"
        return f"{generation}-{self.chips * (2 if self.chip.megacore else 1)}"

    def topology_options(self) -> dict[str, Any]:
        """`get_topology_desc` options for this slice, as MaxText's AOT compiler passes them
        (`accelerator_to_spec_map.py`): megacore chips on v4/v5p, hosts of 2×2×1 chips, and the wrap-around links of
        a torus — every axis on v4/v5p slices of whole 4×4×4 cubes, axes of 16 chips on v5e/v6e."""
        shape = (*self.shape, 1) if len(self.shape) == 2 else self.shape
        if self.chip.megacore:
            wrap = (all(size % 4 == 0 for size in shape),) * 3
        else:
            wrap = tuple(size == 16 for size in shape[:2]) + (False,)
        return {"chip_config_name": "megacore" if self.chip.megacore else "default",
                "chips_per_host_bounds": (min(shape[0], 2), min(shape[1], 2), 1), "num_slices": 1, "wrap": wrap}


def parse_target(text: str) -> TpuTarget:
    """`tpu-v5p:2x2x1` → TpuTarget: a generation of TPU_CHIPS and the chips along each of its axes (3 for v4/v5p, 2
    for v5e/v6e). Accelerator-type names (`v5p-128`) count TensorCores on some generations and are refused."""
    import re

    generations = ", ".join(TPU_CHIPS)
    found = re.fullmatch(r"tpu-([a-z0-9]+):(\d+(?:x\d+)*)", text.strip())
    if found is None or found.group(1) not in TPU_CHIPS:
        raise ConfigError(f"--target {text!r}: expected {TARGET_FORMAT} with the chips along each axis, e.g. "
                          f"tpu-v5p:2x2x1 or tpu-v5e:4x4 (GENERATION one of {generations}; names such as v5p-128 "
                          "are not accepted)")
    chip = TPU_CHIPS[found.group(1)]
    shape = tuple(int(size) for size in found.group(2).split("x"))
    if len(shape) != chip.axes or min(shape) < 1:
        example = "tpu-v5p:2x2x1" if chip.axes == 3 else "tpu-v5e:4x4"
        raise ConfigError(f"--target {text!r}: a {chip.generation} topology has {chip.axes} positive axes (chips "
                          f"along each), e.g. {example}")
    return TpuTarget(chip, shape)


def tpu_target_for(chip: TpuChip, chips: int) -> TpuTarget | None:
    """The standard slice of `chips` chips of this generation (2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ... for v4/v5p;
    1x1, 2x2, 2x4, 4x4, ..., 16x16 for v5e/v6e), or None where there is none."""
    if chips > TPU_MAX_CHIPS[chip.generation]:
        return None
    if chip.axes == 2 and chips == 1:
        return TpuTarget(chip, (1, 1))
    shape = [2, 2, 1] if chip.axes == 3 else [2, 2]
    while math.prod(shape) < chips:
        smallest = min(shape)
        index = max(i for i, size in enumerate(shape) if size == smallest)
        shape[index] *= 2
    return TpuTarget(chip, tuple(shape)) if math.prod(shape) == chips else None


def libtpu_version() -> str | None:
    """The installed libtpu's version, None without it (the `tpu` extra)."""
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None


def tpu_devices(target: TpuTarget) -> list[Any]:
    """The compile-only devices of `target`'s topology, from libtpu on this machine (no TPU needed): a mesh over them
    compiles with XLA:TPU and nothing can run on them.

    libtpu, loaded here, reads the TPU VM's environment and, finding none, writes warnings about TPU_ACCELERATOR_TYPE
    and TPU_WORKER_HOSTNAMES to stderr from C++; and it takes /tmp/libtpu_lockfile, refusing to load while another
    process holds it. Neither matters to a compile-only topology, so around the load this sets what a TPU VM would
    set — this slice's accelerator type, this host as the only worker, and ALLOW_MULTIPLE_LIBTPU_LOAD (a plan never
    touches a chip, so it may run beside a training process or another plan) — keeping any value already set, and
    restores the environment afterwards."""
    import os

    if libtpu_version() is None and not os.environ.get("TPU_LIBRARY_PATH"):
        raise ConfigError(f"--target {target.name}: the TPU compiler (libtpu) is not installed: "
                          "pip install -e '.[tpu]'")
    import jax
    from jax.experimental import topologies

    quiet = {"TPU_ACCELERATOR_TYPE": target.accelerator_type(), "TPU_WORKER_HOSTNAMES": "localhost",
             "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    added = [name for name in quiet if name not in os.environ]
    os.environ.update({name: quiet[name] for name in added})
    try:
        topology = topologies.get_topology_desc(topology_name=f"{target.chip.generation}:{target.topology}",
                                                platform="tpu", **target.topology_options())
    except jax.errors.JaxRuntimeError as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"--target {target.name}: libtpu does not accept this topology ({reason})") from None
    finally:
        for name in added:
            os.environ.pop(name, None)
    return list(topology.devices)


# Llama 2 paper (Touvron et al. 2023), Table 2: pretraining GPU-hours on A100-80GB, 2.0T tokens, context 4096.
META_LLAMA2_GPU_HOURS = {"llama2-7b": 184_320, "llama2-13b": 368_640, "llama2-70b": 1_720_320}
META_LLAMA2_TOKENS = 2.0e12
META_LLAMA2_SEQ_LEN = 4096


def tpu_hbm_limit(device: Any) -> int | None:
    """The HBM XLA:TPU lets one program use on `device`'s chip — its HBM less what the TPU runtime keeps — as the
    compiler states it when refusing a program larger than any chip (one broadcast, compiled in about a second);
    None if its message does not say."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=SingleDeviceSharding(device))
    try:
        jax.jit(lambda value: jnp.broadcast_to(value, (1 << 17, 1 << 19))).lower(scalar).compile()  # 256 GiB
    except jax.errors.JaxRuntimeError as error:
        refusal = hbm_exhausted(str(error))
        return refusal["available"] if refusal else None
    return None


# ── Arithmetic (no jax) ─────────────────────────────────────────────────────────────────────────────────────────
def gpu_hours(tokens: float, flops_per_token: float, peak_tflops: float, mfu: float) -> float:
    """Device-hours to train on `tokens` when each device delivers `mfu` of its peak in model FLOPs."""
    return tokens * flops_per_token / (peak_tflops * 1e12 * mfu) / 3600.0


def implied_mfu(hours: float, tokens: float, flops_per_token: float, peak_tflops: float) -> float:
    """The MFU at which `hours` device-hours train on `tokens` (the inverse of `gpu_hours`)."""
    return tokens * flops_per_token / (hours * 3600.0 * peak_tflops * 1e12)


def roofline(flops: float, bytes_accessed: float | None, chip: TpuChip) -> dict[str, Any]:
    """A lower bound on one chip's step time: `flops` at the chip's peak bf16 rate or `bytes_accessed` at its HBM
    bandwidth, whichever takes longer (without bytes, the FLOPs alone)."""
    compute = flops / (chip.peak_bf16_tflops * 1e12)
    memory = (bytes_accessed or 0.0) / (chip.hbm_gbytes_per_second * 1e9)
    return {"compute_seconds": compute, "memory_seconds": memory, "step_seconds": max(compute, memory),
            "bound": "compute" if compute >= memory else "memory"}


def mfu_of(model_flops: float, seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: `model_flops` done in `seconds` by one device of `peak_tflops`."""
    return model_flops / (seconds * peak_tflops * 1e12)


def meta_implied_mfus() -> dict[str, float]:
    """MFU implied by the Llama 2 paper's A100 GPU-hours, with model FLOPs as PaLM defines them."""
    from llama_jax.config import MODEL_PRESETS

    peak = ACCELERATORS["a100-80gb"].peak_bf16_tflops
    return {name: implied_mfu(hours, META_LLAMA2_TOKENS, MODEL_PRESETS[name].flops_per_token(META_LLAMA2_SEQ_LEN),
                              peak)
            for name, hours in META_LLAMA2_GPU_HOURS.items()}


def preset_name(model: Any) -> str | None:
    """The preset with this architecture (how the model computes — dtype, remat, attention — is ignored)."""
    from llama_jax.config import MODEL_PRESETS

    how = {"dtype", "remat_policy", "attention_impl", "attention_chunk", "splash_block_q", "splash_block_kv"}
    shape = {k: v for k, v in dataclasses.asdict(model).items() if k not in how}
    for name, preset in MODEL_PRESETS.items():
        if {k: v for k, v in dataclasses.asdict(preset).items() if k not in how} == shape:
            return name
    return None


def attention_as_on_gpu(config: Any) -> Any:
    """The config with attention as XLA:CPU can compile it for a GPU plan. On these simulated CPU devices `auto` would
    pick the CPU flash-attention kernel, an opaque custom call whose products the FLOP count cannot see, and XLA:CPU
    cannot compile the GPU kernels a GPU run picks (`cudnn`, `pallas`): XLA's chunked attention stands in for all of
    them — the same products, without a fused kernel's smaller temporaries (one query block when the sequence is no
    longer than a chunk)."""
    impl = config.model.attention_impl
    if impl == "flash_cpu":
        raise ConfigError("model.attention_impl=flash_cpu is a CPU kernel and a plan is for GPUs: use auto, chunked or "
                          "dense")
    if impl == "splash":
        raise ConfigError(f"model.attention_impl=splash is a TPU kernel and this plan is for GPUs: plan a TPU with "
                          f"--target {TARGET_FORMAT}, or use auto, chunked or dense")
    if impl in ("dense", "chunked"):
        return config
    return dataclasses.replace(config, model=dataclasses.replace(config.model, attention_impl="chunked"))


def attention_on_tpu(config: Any) -> Any:
    """The config unchanged if its attention can be compiled for a TPU (`auto` picks by the mesh's platform: splash
    where it can run), else a one-line error naming the key."""
    impl = config.model.attention_impl
    if impl in ("flash_cpu", "cudnn", "pallas"):
        kind = "a CPU" if impl == "flash_cpu" else "a GPU"
        raise ConfigError(f"model.attention_impl={impl} is {kind} kernel and --target plans a TPU: use auto, splash, "
                          "chunked or dense")
    return config


def resolve_mesh(sizes: Sequence[int], devices: int, counted_by: str | None = None) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with the one -1 (if any) replaced by the remaining devices; their product must be
    `devices` (`counted_by` says where that count comes from in the errors, by default `--devices is N`)."""
    sizes = list(sizes)
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh {sizes}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if devices % known:
            raise ConfigError(f"mesh {sizes}: the fixed sizes' product {known} does not divide {devices} devices"
                              + (f" ({counted_by})" if counted_by else ""))
        sizes[sizes.index(-1)] = devices // known
    if math.prod(sizes) != devices:
        raise ConfigError(f"mesh data×fsdp×tensor = {'×'.join(map(str, sizes))} = {math.prod(sizes)}, "
                         f"but {counted_by or f'--devices is {devices}'}")
    return tuple(sizes)  # type: ignore[return-value]


# ── Exact per-device state bytes for any mesh (shapes and sharding rules only) ──────────────────────────────────
def batch_and_sequence_shards(rules: Any, mesh_shape: Sequence[int]) -> tuple[int, int]:
    """(batch shards, sequence shards): into how many parts the rules split a micro-batch's rows and each of its
    sequences on a (data, fsdp, tensor) mesh — the mesh axes `batch` names, then those `length` names that `batch`
    left (a mesh axis serves one dimension of an array; see llama_jax.sharding)."""
    sizes = dict(zip(("data", "fsdp", "tensor"), mesh_shape))
    table = dict(rules)
    batch_axes = tuple(table.get("batch", ()))
    length_axes = tuple(axis for axis in table.get("length", ()) if axis not in batch_axes)
    return math.prod(sizes[axis] for axis in batch_axes), math.prod(sizes[axis] for axis in length_axes)


def state_bytes(model: Any, rules: Any, mesh_shape: Sequence[int]) -> dict[str, int]:
    """Per-device bytes of float32 parameters, AdamW state (mu, nu) and gradients on a (data, fsdp, tensor) mesh."""
    from jax.sharding import AbstractMesh

    from llama_jax.params import param_specs
    from llama_jax.sharding import MESH_AXES, logical_to_spec

    mesh = AbstractMesh(tuple(mesh_shape), MESH_AXES)
    params = 0
    for spec in param_specs(model).values():
        partition = logical_to_spec(spec.logical_axes, rules, spec.shape, mesh)
        shards = math.prod(mesh.shape[axis] for axes in partition if axes for axis in
                           ((axes,) if isinstance(axes, str) else axes))
        params += math.prod(spec.shape) // shards * 4
    return {"params": params, "opt_state": 2 * params, "grads": params}


# ── FLOPs counted in the traced step ────────────────────────────────────────────────────────────────────────────
def matmul_flops(jaxpr: Any) -> tuple[float, bool]:
    """Matrix-multiply FLOPs of a jaxpr (2 per multiply-add), scan bodies times their length, remat recomputation
    included; (flops, whether a while loop of unknown trip count was counted once).

    A `shard_map` body, written for one device's shard, counts once per device of its manual axes; a Pallas kernel
    counts its own cost estimate where it gives one, else its body (one grid step's blocks) times its grid — every
    grid step, also those a kernel skips at run time (the masked-out blocks of causal attention). A `cond` counts its
    largest branch, but within a `shard_map` body the mean of its branches: there the branch follows the device's
    position (context-parallel attention runs one branch per sequence shard, on as many devices each)."""
    from jax.extend import core as jcore

    uncertain = False

    def count(jaxpr, per_device: bool = False) -> float:
        nonlocal uncertain
        total = 0.0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
                continue
            if eqn.primitive.name == "pallas_call":
                estimate = eqn.params.get("cost_estimate")
                if estimate is not None and estimate.flops:
                    total += float(estimate.flops)
                else:
                    grid = eqn.params["grid_mapping"].grid
                    steps = math.prod(size if isinstance(size, int) else 1 for size in grid)
                    total += steps * count(eqn.params["jaxpr"], per_device)
                continue
            if eqn.primitive.name == "shard_map":
                mesh = eqn.params["mesh"]
                manual = eqn.params.get("manual_axes") or eqn.params.get("newly_manual_axes") or mesh.axis_names
                total += math.prod(mesh.shape[axis] for axis in manual) * count(eqn.params["jaxpr"], True)
                continue
            subs = []
            for value in eqn.params.values():
                for item in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(item, jcore.ClosedJaxpr):
                        subs.append(item.jaxpr)
                    elif isinstance(item, jcore.Jaxpr):
                        subs.append(item)
            if not subs:
                continue
            if eqn.primitive.name == "scan":
                total += eqn.params["length"] * count(eqn.params["jaxpr"].jaxpr, per_device)
            elif eqn.primitive.name == "cond":
                branches = [count(sub, per_device) for sub in subs]
                total += sum(branches) / len(branches) if per_device else max(branches)
            else:
                if eqn.primitive.name == "while":
                    uncertain = True
                total += sum(count(sub, per_device) for sub in subs)
        return total

    return count(jaxpr), uncertain


# ── Compiling the step ──────────────────────────────────────────────────────────────────────────────────────────
def compile_plan(config: Any, mesh_shape: tuple[int, int, int], micro_batch: int,
                 devices: Sequence[Any] | None = None) -> dict[str, Any]:
    """Compile the train step for `mesh_shape` from abstract shapes: memory analysis, FLOPs, timings. `devices`:
    those to build the mesh over (default: this process's, the simulated CPU devices of a GPU plan; for a TPU plan,
    `tpu_devices`), whose platform picks the compiler. A TPU step that needs more HBM than the chip has is no error:
    the plan says so (`bytes["hbm_exhausted"]`), with the compiler's figure for what it needed where it gives one."""
    import jax
    import jax.numpy as jnp

    from llama_jax.sharding import activation_sharding, make_mesh, rules_from_config
    from llama_jax.trainer import Trainer

    data, fsdp, tensor = mesh_shape
    batch, seq_len = config.train.batch_size, config.train.seq_len
    rules = rules_from_config(config.sharding_rules)
    batch_shards, sequence_shards = batch_and_sequence_shards(rules, mesh_shape)
    if batch % (batch_shards * micro_batch):
        raise ConfigError(f"train.batch_size={batch} cannot be split into micro-batches of {micro_batch} sequence(s) "
                          f"on each of the {batch_shards} batch shards the sharding rules make of this mesh: choose "
                          f"--micro-batch or a batch size so that batch_size is a multiple of "
                          f"{batch_shards * micro_batch}")
    if seq_len % sequence_shards:
        raise ConfigError(f"train.seq_len={seq_len} cannot be split into the {sequence_shards} sequence shards the "
                          f"sharding rules make of this mesh: choose a multiple of {sequence_shards}")
    grad_accum = batch // (batch_shards * micro_batch)
    devices = list(jax.devices() if devices is None else devices)[:data * fsdp * tensor]
    platform = devices[0].platform
    if platform == "tpu":  # chips in an order that keeps mesh neighbours ICI neighbours, as on a TPU VM
        from jax.experimental import mesh_utils

        try:
            grid = mesh_utils.create_device_mesh(mesh_shape, devices)
        except NotImplementedError:  # a mesh axis that is no product of whole torus axes (tensor=2 on a 4x4)
            grid = mesh_utils.create_device_mesh(mesh_shape, devices, allow_split_physical_axes=True)
        devices = list(grid.flat)
    mesh = make_mesh(data, fsdp, tensor, devices=devices)
    trainer = Trainer.create(config.model, config.optimizer, config.train.steps, mesh, rules, grad_accum)

    start = time.perf_counter()
    shardings = trainer.state_shardings()
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), trainer.abstract_state(),
                         shardings)
    keys = ("inputs", "targets", "loss_mask") + (("positions", "segment_ids") if config.train.document_masking else ())
    batch_sharding = trainer.batch_shardings((batch, seq_len))
    abstract_batch = {key: jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=batch_sharding) for key in keys}
    with activation_sharding(mesh, rules), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = jax.make_jaxpr(trainer.train_step)(state, abstract_batch)
    executed_flops, uncertain = matmul_flops(traced.jaxpr)
    lowered = trainer.jit_step((batch, seq_len)).lower(state, abstract_batch)
    exhausted = None
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        exhausted = hbm_exhausted(str(error)) if platform == "tpu" else None
        if exhausted is None:
            raise
    compile_seconds = time.perf_counter() - start

    exact = state_bytes(config.model, rules, mesh_shape)
    state_shard_bytes = sum(_shard_bytes(leaf, sharding) for leaf, sharding in
                            zip(jax.tree.leaves(trainer.abstract_state()), jax.tree.leaves(shardings), strict=True))
    batch_bytes = len(keys) * (batch // batch_shards) * (seq_len // sequence_shards) * 4
    grads = exact["grads"] * (2 if grad_accum > 1 else 1)  # the accumulator and one micro-batch's gradient
    state_and_batch = {"params": exact["params"], "opt_state": state_shard_bytes - exact["params"],
                       "batch": batch_bytes}
    if exhausted is None:
        memory = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        temp = int(memory.temp_size_in_bytes)
        # A TPU program's code lives in HBM beside its buffers; a CPU program's does not count against a device.
        code = int(memory.generated_code_size_in_bytes) if platform == "tpu" else 0
        peak = int(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + temp
                   + code)
        memory_bytes = {
            **state_and_batch, "grads": min(grads, temp), "other_temporaries": max(temp - grads, 0), "program": code,
            "compiled_arguments": int(memory.argument_size_in_bytes), "compiled_outputs":
                int(memory.output_size_in_bytes), "compiled_aliased": int(memory.alias_size_in_bytes),
            "compiled_temporaries": temp, "peak": peak,
        }
        xla_cost = {"xla_cost_analysis_per_device": float(cost.get("flops", float("nan"))),
                    "xla_bytes_accessed_per_device": float(cost.get("bytes accessed", float("nan")))}
    else:
        # What the compiler needed (all buffers, arguments included), where its message says; else at least the state.
        arguments = sum(state_and_batch.values())
        peak = exhausted["required"] or arguments + grads
        temp = max(peak - arguments, 0)
        memory_bytes = {**state_and_batch, "grads": min(grads, temp), "other_temporaries": temp - min(grads, temp),
                        "program": 0,
                        "compiled_arguments": None, "compiled_outputs": None, "compiled_aliased": None,
                        "compiled_temporaries": None, "peak": peak, "hbm_exhausted": exhausted}
        xla_cost = {"xla_cost_analysis_per_device": None, "xla_bytes_accessed_per_device": None}
    return {
        "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor}, "devices": data * fsdp * tensor,
        "micro_batch": micro_batch, "grad_accum": grad_accum, "sequence_shards": sequence_shards,
        "tokens_per_device": micro_batch * seq_len // sequence_shards, "compile_seconds": compile_seconds,
        "compiler": compiler_name(platform),
        "attention": attention_used(config, traced.jaxpr, caught, sequence_shards),
        "bytes": memory_bytes,
        "flops": {"executed_global": executed_flops, "executed_counted_while_once": uncertain, **xla_cost},
    }


def compiler_name(platform: str) -> str:
    """Which XLA compiled a plan: XLA:TPU with libtpu's version, or XLA:CPU standing in for a GPU."""
    if platform == "tpu":
        return f"XLA:TPU (libtpu {libtpu_version() or 'from TPU_LIBRARY_PATH'})"
    return f"XLA:{platform.upper()}"


def hbm_exhausted(message: str) -> dict[str, Any] | None:
    """XLA:TPU's refusal of a program that needs more HBM than the chip has: {"required", "available"} bytes where the
    message gives them (None each where not) and its first line; None for any other error."""
    import re

    if "RESOURCE_EXHAUSTED" not in message or ("HBM" not in message and "hbm" not in message):
        return None
    units = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 ** 4}

    def size(pattern: str) -> int | None:
        found = re.search(pattern, message)
        return int(float(found.group(1)) * units[found.group(2).upper()]) if found else None

    return {"required": size(r"memory required[^(]*\(([\d.]+)([KMGT]?)i?B?\)") or size(r"[Uu]sed ([\d.]+)([KMGT]?)"),
            "available": size(r"available HBM \(([\d.]+)([KMGT]?)i?B?\)") or size(r"of ([\d.]+)([KMGT]?)i?B? hbm"),
            "message": message.strip().splitlines()[0][:300]}


def attention_used(config: Any, jaxpr: Any, caught: Sequence[Any] = (), sequence_shards: int = 1) -> str:
    """Which attention the traced step runs: the Pallas kernels it calls (splash on a TPU), else the XLA path the
    config resolves to, on each device's part of the sequence where the rules split it; with `auto`'s fallback
    warnings, if any."""
    kernels: set[str] = set()

    def visit(jaxpr) -> None:
        from jax.extend import core as jcore

        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                name = eqn.params.get("name") or getattr(eqn.params.get("name_and_src_info"), "name", None)
                kernels.add(str(name or "pallas_call"))
            for value in eqn.params.values():
                for item in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(item, jcore.ClosedJaxpr):
                        visit(item.jaxpr)
                    elif isinstance(item, jcore.Jaxpr):
                        visit(item)

    visit(jaxpr)
    impl = config.model.attention_impl
    if kernels:
        used = f"Pallas kernels {', '.join(sorted(kernels))} (model.attention_impl={impl})"
    elif impl in ("dense", "chunked"):
        used = f"{impl} (XLA operations)"
    else:
        queries = config.train.seq_len // sequence_shards
        chosen = "chunked" if queries > config.model.attention_chunk else "dense"
        used = f"{chosen} (XLA operations; model.attention_impl={impl})"
    if sequence_shards > 1:
        used += (f", each device's {config.train.seq_len // sequence_shards:,} queries against keys and values "
                 f"gathered from {sequence_shards} sequence shards")
    notes = sorted({str(w.message) for w in caught if "attention_impl" in str(w.message)})
    return used + "".join(f"; {note}" for note in notes)


def _shard_bytes(leaf: Any, sharding: Any) -> int:
    shape = sharding.shard_shape(leaf.shape) if leaf.shape else ()
    return math.prod(shape) * leaf.dtype.itemsize


# ── Fitting ─────────────────────────────────────────────────────────────────────────────────────────────────────
def usable_bytes(accelerator: Accelerator) -> float:
    return accelerator.memory_gib * GIB * (1.0 - HEADROOM)


def tpu_usable_bytes(chip: TpuChip) -> float:
    """A TPU chip's HBM less TPU_RESERVE: the limit where the compiler does not state its own (`tpu_hbm_limit`)."""
    return chip.hbm_gib * GIB * (1.0 - TPU_RESERVE)


def estimate_bytes(plan: dict[str, Any], model: Any, rules: Any, mesh_shape: Sequence[int]) -> int:
    """Per-device peak for another mesh at the same micro-batch: state and gradients exactly; the compiled
    activations and other temporaries divided by the change in the tensor split (tensor parallelism splits heads,
    the MLP and the vocabulary; fsdp does not shrink a device's micro-batch activations) and in the sequence split
    (rules that split sequences divide a device's tokens) — conservative for fsdp, which also shrinks the optimizer's
    temporaries."""
    base = plan["bytes"]
    exact = state_bytes(model, rules, mesh_shape)
    planned = plan["mesh"]
    planned_batch, planned_sequence = batch_and_sequence_shards(rules, (planned["data"], planned["fsdp"],
                                                                        planned["tensor"]))
    batch_shards, sequence_shards = batch_and_sequence_shards(rules, mesh_shape)
    grad_accum = plan["grad_accum"] * planned_batch // batch_shards
    grads = exact["grads"] * (2 if grad_accum > 1 else 1)
    # A device's activations follow its share of a micro-batch's tokens and of the heads/MLP/vocabulary.
    other = base["other_temporaries"] * (planned["tensor"] * planned_sequence) / (mesh_shape[2] * sequence_shards)
    batch = base["batch"] * (planned_batch * planned_sequence) / (batch_shards * sequence_shards)
    return int(exact["params"] + exact["opt_state"] + batch + grads + other + base.get("program", 0))


def suggest_splits(plan: dict[str, Any], config: Any, usable: float,
                   device_counts: Callable[[int], bool] = lambda devices: True) -> list[dict[str, Any]]:
    """Splits whose estimated peak is at most `usable` bytes, smallest fsdp × tensor group first (then the smallest
    tensor): on the planned device count when the group divides it (data = devices / group), else on `group` devices
    (data = 1); only device counts `device_counts` accepts (a TPU slice of that many chips must exist)."""
    from llama_jax.sharding import rules_from_config

    model, rules = config.model, rules_from_config(config.sharding_rules)
    devices, micro, batch, seq_len = plan["devices"], plan["micro_batch"], config.train.batch_size, config.train.seq_len
    tensors = [t for t in (1, 2, 4, 8) if model.n_heads % t == 0 and model.kv_heads % t == 0]
    groups = sorted({f * t for t in tensors for f in (2 ** k for k in range(13)) if f * t <= 4096})
    found = []
    for group in groups:
        for tensor in tensors:
            if group % tensor:
                continue
            fsdp = group // tensor
            data = devices // group if group <= devices and devices % group == 0 else 1
            batch_shards, sequence_shards = batch_and_sequence_shards(rules, (data, fsdp, tensor))
            if batch % (batch_shards * micro) or seq_len % sequence_shards or not device_counts(data * group):
                continue
            estimate = estimate_bytes(plan, model, rules, (data, fsdp, tensor))
            if estimate <= usable:
                found.append({"mesh": {"data": data, "fsdp": fsdp, "tensor": tensor}, "devices": data * group,
                              "estimated_peak": estimate})
    return found


def verify(config_path: str | Path, overrides: Sequence[str], suggestion: dict[str, Any], *, micro_batch: int,
           accelerator: str, memory_gib: float | None = None) -> dict[str, Any]:
    """Compile the suggested mesh and return its report. In a fresh `python -m train.plan` process, because the
    simulated device count is fixed when jax is imported; run from the repository root, where `train` lives."""
    mesh = suggestion["mesh"]
    command = [sys.executable, "-m", "train.plan", str(Path(config_path).resolve()), *overrides,
               "--devices", str(suggestion["devices"]), "--mesh", f"{mesh['data']}x{mesh['fsdp']}x{mesh['tensor']}",
               "--micro-batch", str(micro_batch), "--accelerator", accelerator, "--no-suggest", "--json", "-"]
    if memory_gib:
        command += ["--memory-gib", repr(memory_gib)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"compiling the suggested mesh failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def plan_report(config: Any, mesh_shape: tuple[int, int, int], accelerator: Accelerator, *, micro_batch: int = 1,
                mfu: float = 0.40, token_budget: float = 2e12, suggest: bool = True,
                check: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The whole plan for `config` on `mesh_shape` (which must use the simulated devices this process has): compile,
    report and, if the step does not fit, the smallest split that does. `check(suggestion)` compiles a suggestion
    and returns its plan (e.g. `verify`); with it, up to MAX_VERIFIED suggestions are compiled, in order, until one
    fits; without it, the first estimate is reported unchecked."""
    config = attention_as_on_gpu(config)
    plan = compile_plan(config, mesh_shape, micro_batch)
    plan["seq_len"] = config.train.seq_len
    report = build_report(config, plan, accelerator, mfu, token_budget)
    if not report["fits"] and suggest:
        report["suggestion"] = None
        for candidate in suggest_splits(plan, config, usable_bytes(accelerator))[:MAX_VERIFIED if check else 1]:
            report["suggestion"] = candidate
            if check is None:
                break
            candidate["verified_peak"] = check(candidate)["bytes"]["peak"]
            if candidate["verified_peak"] <= usable_bytes(accelerator):
                break
    return report


def plan_tpu_report(config: Any, target: TpuTarget, mesh_shape: tuple[int, int, int], *, micro_batch: int = 1,
                    mfu: float = 0.40, token_budget: float = 2e12, suggest: bool = True,
                    verify: bool = True) -> dict[str, Any]:
    """The whole plan for `config` on `mesh_shape` over the chips of `target`, compiled by XLA:TPU on this machine:
    report and, if the step does not fit, the smallest split that does — on these chips, else on the standard slice of
    as many chips as the split needs. With `verify`, up to TPU_MAX_VERIFIED suggestions are compiled, in order, until
    one fits (`checked` lists them; `suggestion` is the one that fits, else None); without it, `suggestion` is the
    first estimate, unchecked."""
    config = attention_on_tpu(config)
    devices = tpu_devices(target)
    available = tpu_hbm_limit(devices[0]) or tpu_usable_bytes(target.chip)
    plan = compile_plan(config, mesh_shape, micro_batch, devices=devices)
    plan["seq_len"] = config.train.seq_len
    report = build_tpu_report(config, plan, target, mfu, token_budget, available)
    if not report["fits"] and suggest:
        report["suggestion"] = None
        chip = target.chip

        def slice_for(chips: int) -> TpuTarget | None:
            return target if chips == target.chips else tpu_target_for(chip, chips)

        found = suggest_splits(plan, config, available, lambda chips: slice_for(chips) is not None)
        report["checked"] = []
        for candidate in found[:TPU_MAX_VERIFIED if verify else 1]:
            slice_ = slice_for(candidate["devices"])
            candidate["target"] = slice_.name
            if not verify:
                report["suggestion"] = candidate
                break
            mesh = candidate["mesh"]
            checked = compile_plan(config, (mesh["data"], mesh["fsdp"], mesh["tensor"]), micro_batch,
                                   devices=tpu_devices(slice_))
            candidate["verified_peak"] = checked["bytes"]["peak"]
            candidate["verified_fits"] = fits_tpu(checked["bytes"], available)
            report["checked"].append(candidate)
            if candidate["verified_fits"]:
                report["suggestion"] = candidate
                break
    return report


def fits_tpu(memory: dict[str, Any], available: float) -> bool:
    """XLA:TPU compiled the step, and the peak its memory analysis adds up to (arguments, outputs not written over a
    donated argument, temporaries, code) is within the HBM the compiler lets a program use. Both: the compiler refuses
    a program whose buffers exceed that limit by its own count, yet a large program it accepts can still add up to
    more in its memory analysis, and such a plan is not called a fit."""
    return "hbm_exhausted" not in memory and memory["peak"] <= available


def build_tpu_report(config: Any, plan: dict[str, Any], target: TpuTarget, mfu: float, token_budget: float,
                     available: float) -> dict[str, Any]:
    """A TPU plan's report: fits (`fits_tpu` against `available`, the HBM XLA:TPU lets a program use), the roofline
    step time and the MFU it implies (an upper bound), and chip-hours at that bound and at the assumed `mfu`."""
    model, train, chip = config.model, config.train, target.chip
    chips = plan["devices"]
    tokens_per_step = train.batch_size * train.seq_len
    flops_per_token = model.flops_per_token(train.seq_len)
    model_flops = flops_per_token * tokens_per_step
    line = roofline(plan["flops"]["executed_global"] / chips, plan["flops"]["xla_bytes_accessed_per_device"], chip)
    predicted = mfu_of(model_flops / chips, line["step_seconds"], chip.peak_bf16_tflops)
    hbm = chip.hbm_gib * GIB
    return {
        "model": preset_name(model) or "custom", "parameters": model.num_params(), **plan,
        "target": target.name, "chip": chip.name, "tokens_per_step": tokens_per_step,
        "model_flops_per_token": flops_per_token, "model_flops_per_step": model_flops,
        "peak_bf16_tflops": chip.peak_bf16_tflops, "hbm_bytes": hbm, "hbm_available_bytes": available,
        "hbm_gbytes_per_second": chip.hbm_gbytes_per_second, "source": chip.source,
        "fits": fits_tpu(plan["bytes"], available),
        "roofline": line, "predicted_mfu": predicted, "step_seconds": line["step_seconds"],
        "tokens_per_day": tokens_per_step / line["step_seconds"] * 86400, "token_budget": token_budget,
        "chip_hours": gpu_hours(token_budget, flops_per_token, chip.peak_bf16_tflops, predicted),
        "mfu": mfu, "step_seconds_at_mfu": model_flops / (chips * chip.peak_bf16_tflops * 1e12 * mfu),
        "chip_hours_at_mfu": gpu_hours(token_budget, flops_per_token, chip.peak_bf16_tflops, mfu),
    }


def _model_line(report: dict[str, Any], devices: str) -> str:
    """A report's first line: the model, its size, the mesh and the devices it was planned for."""
    mesh = report["mesh"]
    return (f"{report['model']}: {report['parameters'] / 1e9:.2f}B parameters · mesh data={mesh['data']} "
            f"fsdp={mesh['fsdp']} tensor={mesh['tensor']} · {devices}")


def format_tpu_report(report: dict[str, Any]) -> str:
    b, flops, line = report["bytes"], report["flops"], report["roofline"]
    chips, hbm, available, compiler = (report["devices"], report["hbm_bytes"], report["hbm_available_bytes"],
                                       report["compiler"])

    exhausted = b.get("hbm_exhausted")
    verdict = "fits" if report["fits"] else "DOES NOT FIT"
    lines = [
        _model_line(report, f"{chips} chips of {report['chip']} ({report['target']})"),
        _batch_line(report, "chip"),
        f"  compiler: {compiler}, on this machine for {report['target']}'s compile-only devices: the real train "
        f"step from abstract shapes (nothing allocated), {report['compile_seconds']:.0f} s",
        f"  attention: {report['attention']}",
        "",
        f"Memory per chip (state: exact, from shapes and shardings; the rest: {compiler.split(' (')[0]}'s memory "
        "analysis of the compiled step)",
        *_memory_rows(report),
    ]
    if exhausted is None:
        lines += [
            _row("program (TPU code in HBM)", b["program"]),
            _row("peak", b["peak"], f"   {report['chip']}: {format_bytes(hbm)} HBM (Google's figure); XLA:TPU "
                                   f"lets a program use {format_bytes(available)} → {verdict}"),
            f"  (compiled: arguments {format_bytes(b['compiled_arguments'])} — the state and batch above in XLA:TPU's "
            f"tiled layouts — temporaries {format_bytes(b['compiled_temporaries'])}; the new state is written over the "
            "donated one. XLA:TPU places every buffer when it compiles: the peak is the chip's own)",
        ]
        if not report["fits"]:
            lines.append("  XLA:TPU accepted the program, but its memory analysis adds up to more than the compiler's "
                         "limit: not counted as a fit")
    else:
        lines += [
            _row("needed (XLA:TPU)" if exhausted["required"] else "at least (state and batch)", b["peak"],
                f"   {report['chip']}: {format_bytes(hbm)} HBM (Google's figure); XLA:TPU lets a program use "
                f"{format_bytes(available)} → {verdict}"),
            f"  XLA:TPU refused to compile it: {exhausted['message']}",
        ]
    if not report["fits"] and "suggestion" in report:
        def split(candidate: dict[str, Any]) -> str:
            m = candidate["mesh"]
            return f"--target {candidate['target']} --mesh {m['data']}x{m['fsdp']}x{m['tensor']}"

        too_large = [c for c in report.get("checked", []) if not c["verified_fits"]]
        suggestion = report["suggestion"]
        if suggestion is not None:
            m = suggestion["mesh"]
            checked = (f" → compiled by XLA:TPU: peak {format_bytes(suggestion['verified_peak'])}, fits"
                       if "verified_peak" in suggestion else " (not compiled to check: --no-verify)")
            lines.append(f"  smallest split that fits: fsdp={m['fsdp']} tensor={m['tensor']} ({split(suggestion)}): "
                         f"estimated peak {format_bytes(suggestion['estimated_peak'])}{checked}")
        elif not too_large:
            lines.append("  no fsdp × tensor split on a slice of this generation fits by the estimate at this "
                         "micro-batch: lower --micro-batch or train.seq_len")
        else:
            lines.append(f"  none of the {len(too_large)} smallest splits by the estimate fits when compiled: try a "
                         "larger slice, a lower --micro-batch or train.seq_len")
        if too_large:
            lines.append("  compiled by XLA:TPU and too large: " + " · ".join(
                f"{split(c)} {format_bytes(c['verified_peak'])} (estimated {format_bytes(c['estimated_peak'])})"
                for c in too_large))
    executed = flops["executed_global"]
    model_flops = report["model_flops_per_step"]
    lines += [
        "",
        "Compute per step",
        f"  model FLOPs {model_flops:.3e} ({report['model_flops_per_token']:.3e} per token: 6·N_matmul + "
        "12·layers·dim·seq, PaLM's MFU definition)",
        f"  matmul FLOPs executed {executed:.3e} = {executed / model_flops:.2f}× model ({executed / chips:.3e} per "
        "chip), counted in the traced step (remat recomputation and the loss's recomputed logits included)",
    ]
    if report["attention"].startswith("Pallas"):
        lines.append("  (Pallas kernels counted at every grid step, the blocks they skip at run time included — "
                     "causal attention's masked half — so this count runs high and the MFU bound below low)")
    if flops["xla_cost_analysis_per_device"] is not None:
        lines.append(f"  XLA:TPU cost analysis per chip: {flops['xla_cost_analysis_per_device']:.3e} FLOPs, "
                     f"{flops['xla_bytes_accessed_per_device']:.3e} bytes accessed — each loop body (layer scan, "
                     "micro-batch scan) counted once: not step totals")
    memory_term = (f"memory ≥ {flops['xla_bytes_accessed_per_device']:.3e} B / "
                   f"{report['hbm_gbytes_per_second']:g} GB/s = {_seconds(line['memory_seconds'])}"
                   if flops["xla_bytes_accessed_per_device"] is not None else "memory: no cost analysis (not compiled)")
    lines += [
        "",
        f"Step time on {chips} × {report['chip']} ({report['peak_bf16_tflops']:g} TFLOP/s bf16 peak, "
        f"{report['hbm_gbytes_per_second']:g} GB/s HBM per chip: Google Cloud's TPU pages) — a roofline, not XLA's "
        "cost model",
        f"  compute {executed / chips:.3e} FLOPs / peak = {_seconds(line['compute_seconds'])} · {memory_term} → "
        f"step ≥ {_seconds(line['step_seconds'])} ({line['bound']}-bound)",
        f"  → MFU ≤ {report['predicted_mfu']:.1%} · {report['tokens_per_step'] / line['step_seconds']:,.0f} tokens/s · "
        f"{report['tokens_per_day'] / 1e9:.2f}B tokens/day · {report['token_budget'] / 1e12:g}T tokens: "
        f"{report['chip_hours']:,.0f} chip-hours",
        "  an upper bound on MFU: it leaves out collectives not hidden behind compute, the time of non-matmul "
        "operations beyond the bytes XLA counts once per loop, and kernels running below peak",
        f"  at {report['mfu']:.0%} MFU (assumed, --mfu): step {_seconds(report['step_seconds_at_mfu'])} · "
        f"{report['chip_hours_at_mfu']:,.0f} chip-hours for {report['token_budget'] / 1e12:g}T tokens",
    ]
    return "\n".join(lines)


# ── Report ──────────────────────────────────────────────────────────────────────────────────────────────────────
def build_report(config: Any, plan: dict[str, Any], accelerator: Accelerator, mfu: float,
                 token_budget: float) -> dict[str, Any]:
    model, train = config.model, config.train
    tokens_per_step = train.batch_size * train.seq_len
    flops_per_token = model.flops_per_token(train.seq_len)
    model_flops = flops_per_token * tokens_per_step
    devices = plan["devices"]
    step_seconds = model_flops / (devices * accelerator.peak_bf16_tflops * 1e12 * mfu)
    tokens_per_day = tokens_per_step / step_seconds * 86400
    name = preset_name(model)
    report = {
        "model": name or "custom", "parameters": model.num_params(), **plan,
        "tokens_per_step": tokens_per_step,
        "model_flops_per_token": flops_per_token, "model_flops_per_step": model_flops,
        "accelerator": accelerator.name, "peak_bf16_tflops": accelerator.peak_bf16_tflops, "mfu": mfu,
        "step_seconds": step_seconds, "tokens_per_day": tokens_per_day, "token_budget": token_budget,
        "days": token_budget / tokens_per_day,
        "gpu_hours": gpu_hours(token_budget, flops_per_token, accelerator.peak_bf16_tflops, mfu),
        "gpu_hours_a100": gpu_hours(token_budget, flops_per_token, ACCELERATORS["a100-80gb"].peak_bf16_tflops, mfu),
        "usable_bytes": usable_bytes(accelerator), "fits": plan["bytes"]["peak"] <= usable_bytes(accelerator),
        "meta_implied_mfu": meta_implied_mfus(),
    }
    if name in META_LLAMA2_GPU_HOURS:
        report["meta_gpu_hours"] = META_LLAMA2_GPU_HOURS[name]
    return report


def format_report(report: dict[str, Any], accelerator: Accelerator) -> str:
    b, flops = report["bytes"], report["flops"]
    devices, usable = report["devices"], report["usable_bytes"]

    verdict = "fits" if report["fits"] else "DOES NOT FIT"
    lines = [
        _model_line(report, f"{devices} devices"),
        _batch_line(report, "device"),
        f"  compiler: {report['compiler']}, for {devices} simulated CPU devices standing in for the GPUs: the real "
        f"train step from abstract shapes (nothing allocated), {report['compile_seconds']:.0f} s",
        f"  attention: {report['attention']}",
        "",
        "Memory per device (state: exact, from shapes and shardings; the rest: XLA:CPU's compiled memory analysis)",
        *_memory_rows(report),
        _row("peak", b["peak"], f"   {accelerator.name}: {format_bytes(accelerator.memory_gib * GIB)}, "
                               f"{format_bytes(usable)} usable ({HEADROOM:.0%} headroom) → {verdict}"),
        f"  (compiled: arguments {format_bytes(b['compiled_arguments'])}, temporaries "
        f"{format_bytes(b['compiled_temporaries'])}; the new state is written over the donated one)",
        "  caveat: this is XLA:CPU's buffer assignment, not XLA:GPU's: no native bf16 arithmetic (float32 copies),",
        "  all-reduce where GPUs reduce-scatter, another schedule, no GPU workspace. State and gradients are exact;",
        "  activations and temporaries are an estimate, high or low.",
    ]
    if not report["fits"] and "suggestion" in report:
        suggestion = report["suggestion"]
        if suggestion is None:
            lines.append("  no fsdp × tensor split up to 4096 devices fits at this micro-batch: lower --micro-batch "
                         "or train.seq_len")
        else:
            m = suggestion["mesh"]
            lines.append(f"  smallest split that fits: fsdp={m['fsdp']} tensor={m['tensor']} (--mesh {m['data']}x"
                         f"{m['fsdp']}x{m['tensor']} on {suggestion['devices']} devices): estimated peak "
                         f"{format_bytes(suggestion['estimated_peak'])}")
            if "verified_peak" in suggestion:
                fits = suggestion["verified_peak"] <= usable
                lines.append(f"  compiled to check: peak {format_bytes(suggestion['verified_peak'])} → "
                             f"{'fits' if fits else 'does NOT fit either (no split checked fits)'}")
    executed = flops["executed_global"]
    lines += [
        "",
        "Compute per step",
        f"  model FLOPs {report['model_flops_per_step']:.3e} ({report['model_flops_per_token']:.3e} per token: "
        "6·N_matmul + 12·layers·dim·seq, PaLM's MFU definition)",
        f"  matmul FLOPs executed {executed:.3e} = {executed / report['model_flops_per_step']:.2f}× model "
        f"({executed / devices:.3e} per device), counted in the traced step:",
        "    remat recomputation and the loss's recomputed logits add, causal attention blocks skip",
        f"  XLA cost analysis {flops['xla_cost_analysis_per_device']:.3e} per device: counts each loop body (layer "
        "scan, micro-batch scan) once, not a step total",
        "",
        f"Time on {devices} × {accelerator.name} ({accelerator.peak_bf16_tflops:g} TFLOP/s bf16 dense, datasheet) "
        f"at {report['mfu']:.0%} MFU",
        f"  step {report['step_seconds']:.2f} s · {report['tokens_per_step'] / report['step_seconds']:,.0f} tokens/s "
        f"· {report['tokens_per_day'] / 1e9:.2f}B tokens/day",
        f"  {report['token_budget'] / 1e12:g}T tokens: {report['days']:,.1f} days on {devices} devices = "
        f"{report['gpu_hours']:,.0f} {accelerator.name} GPU-hours ({report['gpu_hours_a100']:,.0f} on A100 80GB)",
        "",
        "Llama 2 paper, A100-80GB GPU-hours for 2T tokens → the MFU they imply (model FLOPs at seq 4096, 312 TFLOP/s):",
        "  " + " · ".join(f"{name}: {META_LLAMA2_GPU_HOURS[name]:,} h → {mfu:.1%}"
                          for name, mfu in report["meta_implied_mfu"].items()),
    ]
    if "meta_gpu_hours" in report:
        ours = gpu_hours(META_LLAMA2_TOKENS, _preset_fpt(report["model"]), ACCELERATORS["a100-80gb"].peak_bf16_tflops,
                         report["mfu"])
        lines.append(f"  {report['model']} at {report['mfu']:.0%} MFU: {ours:,.0f} A100 GPU-hours for 2T tokens of "
                     f"{META_LLAMA2_SEQ_LEN}, {ours / report['meta_gpu_hours']:.2f}× Meta's "
                     f"{report['meta_gpu_hours']:,}")
    return "\n".join(lines)


def _batch_line(report: dict[str, Any], device: str) -> str:
    """How a step's batch is cut: micro-batches per device (or per data shard, each sequence split over devices)."""
    head = (f"  batch {report['tokens_per_step'] // report['seq_len']} × {report['seq_len']} = "
            f"{report['tokens_per_step']:,} tokens per step: ")
    shards = report.get("sequence_shards", 1)
    if shards == 1:
        return (head + f"micro-batches of {report['micro_batch']} sequence(s) per {device}, {report['grad_accum']} "
                "accumulation steps")
    return (head + f"micro-batches of {report['micro_batch']} sequence(s) per data shard, each sequence split "
            f"{shards} ways along its length ({report['tokens_per_device']:,} tokens per {device}), "
            f"{report['grad_accum']} accumulation steps")


def _row(label: str, n: float, note: str = "") -> str:
    return f"  {label:<38}{format_bytes(n):>11}{note}"


def _memory_rows(report: dict[str, Any]) -> list[str]:
    """The per-device rows both reports share: the state (exact) and the temporaries (the compiler's)."""
    b = report["bytes"]
    return [_row("parameters (float32)", b["params"]),
            _row("optimizer state (AdamW mu, nu)", b["opt_state"]),
            _row("gradients (float32" + (", + accumulator)" if report["grad_accum"] > 1 else ")"), b["grads"]),
            _row("batch (int32 token arrays)", b["batch"]),
            _row("activations and other temporaries", b["other_temporaries"])]


def _seconds(value: float) -> str:
    return f"{value:.3g} s" if value >= 0.01 else f"{value * 1e3:.3g} ms"


def _preset_fpt(name: str) -> float:
    from llama_jax.config import MODEL_PRESETS

    return MODEL_PRESETS[name].flops_per_token(META_LLAMA2_SEQ_LEN)
