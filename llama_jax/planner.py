"""Plan a pretraining run before renting the cluster: memory per device, FLOPs, step time and GPU-hours.

The library behind `python -m train.plan CONFIG.yaml [key=value ...] --devices N [--mesh DATAxFSDPxTENSOR]`, which
simulates N devices (XLA's host platform with N CPU devices, set before jax is imported) and calls `plan_report`.
This module imports no jax at the top, so that program can import it before choosing the device count.

What a plan does, on any machine (a laptop will do):
1. compiles the real train step (`Trainer.jit_step`: forward, chunked loss, backward with remat, gradient
   accumulation, AdamW) for the mesh ahead of time from abstract shapes carrying their shardings — no parameter is
   ever allocated (`compile_plan`);
2. reads the compiled program's memory analysis (per-device bytes of arguments and temporaries), counts the step's
   matrix-multiply FLOPs in the traced program (`matmul_flops`), and sets them against the model FLOPs of PaLM's MFU
   definition;
3. for an accelerator (H100 SXM, A100 80GB: datasheet peak bf16 dense rates) and an assumed MFU, gives step time,
   tokens per day and GPU-hours for a token budget, and what MFU Meta's published Llama 2 GPU-hours imply
   (`build_report`, `format_report`);
4. says whether the step fits in the accelerator's memory (with headroom) and, if not, suggests the smallest
   fsdp × tensor split that fits (`suggest_splits`), then compiles that suggestion to check it (`verify`).

Batch: the config's global batch (train.batch_size × train.seq_len) is split over data × fsdp and processed in
micro-batches of `micro_batch` sequences per device (gradient accumulation inside the step), so the compiled
temporaries are those of one micro-batch while the arguments hold the whole global batch.

Caveat, printed with the results: XLA:CPU's compiled memory differs from XLA:GPU's. The CPU backend has no native
bf16 arithmetic (it upcasts and may keep float32 copies), uses all-reduce where GPUs reduce-scatter, schedules buffers
differently and has none of the GPU's fusion- or cuDNN/NCCL-specific workspace. Parameters, optimizer state and
gradients are exact (they follow from shapes and shardings); activations and temporaries are an estimate, usually on
the high side. Attention is compiled as XLA's chunked attention, as `auto` runs it on a GPU, never the CPU
flash-attention kernel (an opaque custom call the FLOP count cannot see into).
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_jax.errors import ConfigError
from llama_jax.perf import format_bytes

REPO = Path(__file__).resolve().parents[1]  # where `python -m train.plan` runs (verify)
GIB = 1024 ** 3
MAX_VERIFIED = 3  # suggested splits compiled, in order, until one fits
HEADROOM = 0.10  # fraction of device memory left free for the allocator's fragmentation, NCCL buffers, CUDA context


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_bf16_tflops: float  # dense (no 2:4 sparsity), per device
    memory_gib: float
    source: str


# Peak rates from NVIDIA's datasheets (the sparsity figures there are twice these).
ACCELERATORS = {
    "h100-sxm": Accelerator("H100 SXM", 989.0, 80.0,
                            "NVIDIA H100 Tensor Core GPU datasheet: BF16 Tensor Core 1,979 TFLOP/s with sparsity "
                            "= 989 dense; 80 GB HBM3"),
    "a100-80gb": Accelerator("A100 80GB", 312.0, 80.0,
                             "NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOP/s dense "
                             "(624 with sparsity); 80 GB HBM2e"),
}


def accelerator_named(name: str, memory_gib: float | None = None) -> Accelerator:
    """One of ACCELERATORS, with another memory size if given (e.g. 40 for an A100 40GB)."""
    if name not in ACCELERATORS:
        raise ConfigError(f"accelerator {name!r}: expected one of {', '.join(sorted(ACCELERATORS))}")
    accelerator = ACCELERATORS[name]
    return dataclasses.replace(accelerator, memory_gib=memory_gib) if memory_gib else accelerator


# Llama 2 paper (Touvron et al. 2023), Table 2: pretraining GPU-hours on A100-80GB, 2.0T tokens, context 4096.
META_LLAMA2_GPU_HOURS = {"llama2-7b": 184_320, "llama2-13b": 368_640, "llama2-70b": 1_720_320}
META_LLAMA2_TOKENS = 2.0e12
META_LLAMA2_SEQ_LEN = 4096


# ── Arithmetic (no jax) ─────────────────────────────────────────────────────────────────────────────────────────
def gpu_hours(tokens: float, flops_per_token: float, peak_tflops: float, mfu: float) -> float:
    """Device-hours to train on `tokens` when each device delivers `mfu` of its peak in model FLOPs."""
    return tokens * flops_per_token / (peak_tflops * 1e12 * mfu) / 3600.0


def implied_mfu(hours: float, tokens: float, flops_per_token: float, peak_tflops: float) -> float:
    """The MFU at which `hours` device-hours train on `tokens` (the inverse of `gpu_hours`)."""
    return tokens * flops_per_token / (hours * 3600.0 * peak_tflops * 1e12)


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

    how = {"dtype", "remat_policy", "attention_impl", "attention_chunk"}
    shape = {k: v for k, v in dataclasses.asdict(model).items() if k not in how}
    for name, preset in MODEL_PRESETS.items():
        if {k: v for k, v in dataclasses.asdict(preset).items() if k not in how} == shape:
            return name
    return None


def attention_as_on_gpu(config: Any) -> Any:
    """The config with attention as a GPU run computes it: `auto` would pick the CPU flash-attention kernel on these
    simulated CPU devices, an opaque custom call whose products the FLOP count cannot see; on a GPU it is XLA's
    attention, which `chunked` compiles (one query block when the sequence is no longer than a chunk)."""
    impl = config.model.attention_impl
    if impl == "flash_cpu":
        raise ConfigError("model.attention_impl=flash_cpu is a CPU kernel and a plan is for GPUs: use auto, chunked or "
                         "dense")
    if impl != "auto":
        return config
    return dataclasses.replace(config, model=dataclasses.replace(config.model, attention_impl="chunked"))


def resolve_mesh(sizes: Sequence[int], devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with the one -1 (if any) replaced by the remaining devices; their product must be
    `devices`."""
    sizes = list(sizes)
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh {sizes}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if devices % known:
            raise ConfigError(f"mesh {sizes}: the fixed sizes' product {known} does not divide {devices} devices")
        sizes[sizes.index(-1)] = devices // known
    if math.prod(sizes) != devices:
        raise ConfigError(f"mesh data×fsdp×tensor = {'×'.join(map(str, sizes))} = {math.prod(sizes)}, "
                         f"but --devices is {devices}")
    return tuple(sizes)  # type: ignore[return-value]


# ── Exact per-device state bytes for any mesh (shapes and sharding rules only) ──────────────────────────────────
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
    included; (flops, whether a while loop of unknown trip count was counted once)."""
    from jax.extend import core as jcore

    uncertain = False

    def count(jaxpr) -> float:
        nonlocal uncertain
        total = 0.0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
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
                total += eqn.params["length"] * count(eqn.params["jaxpr"].jaxpr)
            elif eqn.primitive.name == "cond":
                total += max(count(sub) for sub in subs)
            else:
                if eqn.primitive.name == "while":
                    uncertain = True
                total += sum(count(sub) for sub in subs)
        return total

    return count(jaxpr), uncertain


# ── Compiling the step for a simulated mesh ─────────────────────────────────────────────────────────────────────
def compile_plan(config: Any, mesh_shape: tuple[int, int, int], micro_batch: int) -> dict[str, Any]:
    """Compile the train step for `mesh_shape` from abstract shapes; memory analysis, FLOPs, timings."""
    import jax
    import jax.numpy as jnp

    from llama_jax.sharding import activation_sharding, make_mesh, rules_from_config
    from llama_jax.trainer import Trainer

    data, fsdp, tensor = mesh_shape
    batch, seq_len = config.train.batch_size, config.train.seq_len
    batch_shards = data * fsdp
    if batch % (batch_shards * micro_batch):
        raise ConfigError(f"train.batch_size={batch} cannot be split into micro-batches of {micro_batch} sequence(s) "
                         f"on each of data×fsdp = {batch_shards} batch shards: choose --micro-batch or a batch size "
                         f"so that batch_size is a multiple of {batch_shards * micro_batch}")
    grad_accum = batch // (batch_shards * micro_batch)
    rules = rules_from_config(config.sharding_rules)
    mesh = make_mesh(data, fsdp, tensor, devices=jax.devices()[:data * fsdp * tensor])
    trainer = Trainer.create(config.model, config.optimizer, config.train.steps, mesh, rules, grad_accum)

    start = time.perf_counter()
    shardings = trainer.state_shardings()
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), trainer.abstract_state(),
                         shardings)
    keys = ("inputs", "targets", "loss_mask") + (("positions", "segment_ids") if config.train.document_masking else ())
    batch_sharding = trainer.batch_shardings((batch, seq_len))
    abstract_batch = {key: jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=batch_sharding) for key in keys}
    with activation_sharding(mesh, rules):
        traced = jax.make_jaxpr(trainer.train_step)(state, abstract_batch)
    executed_flops, uncertain = matmul_flops(traced.jaxpr)
    lowered = trainer.jit_step((batch, seq_len)).lower(state, abstract_batch)
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - start

    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    exact = state_bytes(config.model, rules, mesh_shape)
    state_shard_bytes = sum(_shard_bytes(leaf, sharding) for leaf, sharding in
                            zip(jax.tree.leaves(trainer.abstract_state()), jax.tree.leaves(shardings), strict=True))
    batch_bytes = len(keys) * (batch // batch_shards) * seq_len * 4
    grads = exact["grads"] * (2 if grad_accum > 1 else 1)  # the accumulator and one micro-batch's gradient
    temp = int(memory.temp_size_in_bytes)
    peak = int(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + temp)
    return {
        "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor}, "devices": data * fsdp * tensor,
        "micro_batch": micro_batch, "grad_accum": grad_accum, "compile_seconds": compile_seconds,
        "bytes": {
            "params": exact["params"], "opt_state": state_shard_bytes - exact["params"], "batch": batch_bytes,
            "grads": min(grads, temp), "other_temporaries": max(temp - grads, 0),
            "compiled_arguments": int(memory.argument_size_in_bytes), "compiled_outputs":
                int(memory.output_size_in_bytes), "compiled_aliased": int(memory.alias_size_in_bytes),
            "compiled_temporaries": temp, "peak": peak,
        },
        "flops": {"executed_global": executed_flops, "executed_counted_while_once": uncertain,
                  "xla_cost_analysis_per_device": float(cost.get("flops", float("nan")))},
    }


def _shard_bytes(leaf: Any, sharding: Any) -> int:
    shape = sharding.shard_shape(leaf.shape) if leaf.shape else ()
    return math.prod(shape) * leaf.dtype.itemsize


# ── Fitting ─────────────────────────────────────────────────────────────────────────────────────────────────────
def usable_bytes(accelerator: Accelerator) -> float:
    return accelerator.memory_gib * GIB * (1.0 - HEADROOM)


def estimate_bytes(plan: dict[str, Any], model: Any, rules: Any, mesh_shape: Sequence[int]) -> int:
    """Per-device peak for another mesh at the same micro-batch: state and gradients exactly; the compiled
    activations and other temporaries divided by the change in the tensor split (tensor parallelism splits heads,
    the MLP and the vocabulary; fsdp does not shrink a device's micro-batch activations) — conservative for fsdp,
    which also shrinks the optimizer's temporaries."""
    base = plan["bytes"]
    exact = state_bytes(model, rules, mesh_shape)
    grad_accum = plan["grad_accum"] * plan["mesh"]["data"] * plan["mesh"]["fsdp"] // (mesh_shape[0] * mesh_shape[1])
    grads = exact["grads"] * (2 if grad_accum > 1 else 1)
    other = base["other_temporaries"] * plan["mesh"]["tensor"] / mesh_shape[2]
    batch = base["batch"] * (plan["mesh"]["data"] * plan["mesh"]["fsdp"]) / (mesh_shape[0] * mesh_shape[1])
    return int(exact["params"] + exact["opt_state"] + batch + grads + other)


def suggest_splits(plan: dict[str, Any], config: Any, accelerator: Accelerator) -> list[dict[str, Any]]:
    """Splits whose estimated peak fits, smallest fsdp × tensor group first (then the smallest tensor): on the planned
    device count when the group divides it (data = devices / group), else on `group` devices (data = 1)."""
    from llama_jax.sharding import rules_from_config

    model, rules = config.model, rules_from_config(config.sharding_rules)
    devices, micro, batch = plan["devices"], plan["micro_batch"], config.train.batch_size
    tensors = [t for t in (1, 2, 4, 8) if model.n_heads % t == 0 and model.kv_heads % t == 0]
    groups = sorted({f * t for t in tensors for f in (2 ** k for k in range(13)) if f * t <= 4096})
    found = []
    for group in groups:
        for tensor in tensors:
            if group % tensor:
                continue
            fsdp = group // tensor
            data = devices // group if group <= devices and devices % group == 0 else 1
            if batch % (data * fsdp * micro):
                continue
            estimate = estimate_bytes(plan, model, rules, (data, fsdp, tensor))
            if estimate <= usable_bytes(accelerator):
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
        for candidate in suggest_splits(plan, config, accelerator)[:MAX_VERIFIED if check else 1]:
            report["suggestion"] = candidate
            if check is None:
                break
            candidate["verified_peak"] = check(candidate)["bytes"]["peak"]
            if candidate["verified_peak"] <= usable_bytes(accelerator):
                break
    return report


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
    b, mesh, flops = report["bytes"], report["mesh"], report["flops"]
    devices, usable = report["devices"], report["usable_bytes"]

    def row(label: str, n: float, note: str = "") -> str:
        return f"  {label:<38}{format_bytes(n):>11}{note}"

    verdict = "fits" if report["fits"] else "DOES NOT FIT"
    lines = [
        f"{report['model']}: {report['parameters'] / 1e9:.2f}B parameters · mesh data={mesh['data']} "
        f"fsdp={mesh['fsdp']} tensor={mesh['tensor']} · {devices} devices",
        f"  batch {report['tokens_per_step'] // report['seq_len']} × {report['seq_len']} = "
        f"{report['tokens_per_step']:,} tokens per step: micro-batches of {report['micro_batch']} sequence(s) per "
        f"device, {report['grad_accum']} accumulation steps",
        f"  the real train step, compiled for {devices} simulated CPU devices from abstract shapes (nothing "
        f"allocated): {report['compile_seconds']:.0f} s",
        "",
        "Memory per device (state: exact, from shapes and shardings; the rest: XLA's compiled memory analysis)",
        row("parameters (float32)", b["params"]),
        row("optimizer state (AdamW mu, nu)", b["opt_state"]),
        row("gradients (float32" + (", + accumulator)" if report["grad_accum"] > 1 else ")"), b["grads"]),
        row("batch (int32 token arrays)", b["batch"]),
        row("activations and other temporaries", b["other_temporaries"]),
        row("peak", b["peak"], f"   {accelerator.name}: {format_bytes(accelerator.memory_gib * GIB)}, "
                               f"{format_bytes(usable)} usable ({HEADROOM:.0%} headroom) → {verdict}"),
        f"  (compiled: arguments {format_bytes(b['compiled_arguments'])}, temporaries "
        f"{format_bytes(b['compiled_temporaries'])}; the new state is written over the donated one)",
        "  caveat: this is XLA:CPU's buffer assignment, not XLA:GPU's: no native bf16 arithmetic (float32 copies),",
        "  all-reduce where GPUs reduce-scatter, another schedule, no GPU workspace. State and gradients are exact;",
        "  activations and temporaries are an estimate, usually high.",
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


def _preset_fpt(name: str) -> float:
    from llama_jax.config import MODEL_PRESETS

    return MODEL_PRESETS[name].flops_per_token(META_LLAMA2_SEQ_LEN)
