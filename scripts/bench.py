"""Train-step benchmark, ours against Hugging Face's PyTorch Llama, side by side on this machine.

    python -m scripts.bench --config bench-s|bench-4k [--steps N] [--warmup N] [--dtype bfloat16|float32]
                            [--remat full|save_dots|save_attention_out|none] [--attention-chunk N]
                            [--attention-impl auto|dense|chunked|flash_cpu|cudnn|pallas|splash] [--loss-chunk N]
                            [--peer/--no-peer]
                            [--json OUT]

OURS is `Trainer.jit_step` on a one-device mesh (synthetic random tokens, one fixed batch, AdamW with clipping);
the PEER is `transformers.LlamaForCausalLM` of the same shape (float32 weights, `torch.autocast(cpu, bfloat16)` for
--dtype bfloat16, sdpa attention, `torch.optim.AdamW` with the same settings and gradient clipping, two threads).

Each runs in its own subprocess, so each process's peak RSS is its own (os.wait4). The parent stays lean (standard
library only, no jax) because Linux starts a spawned child's peak-RSS count at its parent's high-water mark. A first
short-lived child resolves the model config (that needs llama_jax, hence jax). The two processes stay alive
together and take turns step by step, alternating who goes first: on a shared machine whose load changes by the
minute, both sides then see the same conditions and the ratio ours/peer is meaningful even when the absolute
numbers are not. The matrix-multiply ceilings (XLA in our process, torch in the peer's) are measured between the
steps too, and MFU divides by their median.

Steps talk to the parent over a line protocol on the children's stdin and a private copy of their stdout (library
output on fd 1 is redirected to stderr, which goes to a log file shown if a child fails).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

# Only the standard library above: neither the parent nor the peer's process may import jax (its import costs RSS
# charged to the peer directly, or to both children through the parent's high-water mark).
REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_SHAPES = {  # config name → (model preset, seq_len, batch)
    "bench-s": ("bench-s", 1024, 8),
    "bench-4k": ("bench-s", 4096, 2),
}
SEED = 0
# llama_jax.config.ATTENTION_IMPLS, spelled out: the parent process must not import llama_jax (see above).
ATTENTION_IMPLS = ("auto", "dense", "chunked", "flash_cpu", "cudnn", "pallas", "splash")


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """Everything a child needs to build its step; passed to it as JSON."""

    config: str
    seq_len: int
    batch: int
    dtype: str
    remat: str
    attention_chunk: int | None
    attention_impl: str | None
    loss_chunk: int | None
    model: dict[str, Any] | None = None  # the ModelConfig fields as plain values, once resolved ("describe")
    flops_per_token: float | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch


# ── Child processes ──────────────────────────────────────────────────────────────────────────────────────────────
def resolve_model(spec: BenchSpec) -> BenchSpec:
    """The spec with the model config (bench preset at the spec's length, dtype and knobs) and its FLOPs/token."""
    from llama_jax.config import MODEL_PRESETS

    preset, _, _ = BENCH_SHAPES[spec.config]
    changes: dict[str, Any] = {"dtype": spec.dtype, "remat_policy": spec.remat,
                               "max_seq_len": max(MODEL_PRESETS[preset].max_seq_len, spec.seq_len)}
    if spec.attention_chunk is not None:
        changes["attention_chunk"] = spec.attention_chunk
    if spec.attention_impl is not None:
        changes["attention_impl"] = spec.attention_impl
    model = dataclasses.replace(MODEL_PRESETS[preset], **changes)
    # Explicit widths, so the peer (which must not import llama_jax) needs no derivation rules.
    model = dataclasses.replace(model, n_kv_heads=model.kv_heads, ffn_hidden_dim=model.hidden_dim)
    return dataclasses.replace(spec, model=dataclasses.asdict(model),
                               flops_per_token=model.flops_per_token(spec.seq_len))


class OurStep:
    """Trainer.jit_step on one device, compiled ahead of time so compile time is measured on its own."""

    def __init__(self, spec: BenchSpec):
        import jax
        import numpy as np

        from llama_jax import trainer as trainer_module
        from llama_jax.config import ModelConfig, OptimizerConfig
        from llama_jax.sharding import make_mesh

        if spec.loss_chunk is not None:
            trainer_module.HEAD_CHUNK = spec.loss_chunk  # read when the step is traced, which happens below
        self.jax = jax
        model_config = ModelConfig(**{**spec.model, "rope_scaling": None})  # the bench presets have none
        mesh = make_mesh(devices=jax.devices()[:1])
        # No warm-up, like the peer's constant learning rate, so the two losses after N steps are comparable.
        optimizer = OptimizerConfig(warmup_steps=0)
        trainer = trainer_module.Trainer.create(model_config, optimizer, total_steps=1000, mesh=mesh)
        shape = (spec.batch, spec.seq_len)
        self.state = trainer.init_state(SEED)
        self.batch = jax.device_put(synthetic_batch(np.random.default_rng(SEED), model_config.vocab_size, shape),
                                    trainer.batch_shardings(shape))
        step = trainer.jit_step(shape)
        start = time.perf_counter()
        lowered = step.lower(self.state, self.batch)
        lowered_at = time.perf_counter()
        self.compiled = lowered.compile()
        compiled_at = time.perf_counter()
        self.info = {"trace_lower_seconds": lowered_at - start, "compile_seconds": compiled_at - lowered_at,
                     **compiled_stats(self.compiled), "devices": str(jax.devices()[0])}
        self.ceiling_dtype = spec.dtype

    def step(self) -> dict[str, float]:
        def run() -> None:
            self.state, metrics = self.compiled(self.state, self.batch)
            self.metrics = self.jax.block_until_ready(metrics)
            self.jax.block_until_ready(self.state)

        from llama_jax.perf import time_call_with_cpu

        seconds, cpu_seconds = time_call_with_cpu(run)
        return {"seconds": seconds, "cpu_seconds": cpu_seconds, "loss": float(self.metrics["loss"])}

    def ceiling(self) -> float:
        from llama_jax.perf import measure_matmul_ceiling

        return measure_matmul_ceiling(self.ceiling_dtype)


def synthetic_batch(rng, vocab_size: int, shape: tuple[int, int]) -> dict[str, Any]:
    """Random tokens in data.py's batch layout: one document per row, every target counted."""
    import numpy as np

    batch, length = shape
    tokens = rng.integers(0, vocab_size, (batch, length + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones(shape, np.int32),
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), shape).copy()}


def compiled_stats(compiled: Any) -> dict[str, float]:
    """XLA's buffer plan for the step: deterministic, so memory comparisons don't depend on the machine's load.

    (Not cost_analysis FLOPs: XLA counts a scan's body once, not once per layer.)
    """
    try:
        memory = compiled.memory_analysis()
    except Exception:  # best effort: not every backend/version provides it
        return {}
    return {"xla_temp_bytes": memory.temp_size_in_bytes, "xla_argument_bytes": memory.argument_size_in_bytes,
            "xla_output_bytes": memory.output_size_in_bytes}


class BenchError(Exception):
    """A benchmark that cannot give a meaningful figure here; the message says why and what to run instead."""


# A bfloat16 matmul this much slower than float32 means the CPU has no bfloat16 arithmetic for torch to use
# (AVX512-BF16, AMX or Arm BF16): oneDNN then falls back to a reference loop (benchmarks/), and one
# autocast step of bench-S would take hours.
SLOW_BF16_FRACTION = 0.25
BF16_PROBE_SIZE = 256


def check_torch_bfloat16(perf: Any) -> None:
    """Raise BenchError if torch's bfloat16 matmul is far slower than its float32 one on this CPU."""
    rates = {dtype: perf.measure_torch_matmul_ceiling(dtype, size=BF16_PROBE_SIZE, repeats=3)
             for dtype in ("bfloat16", "float32")}
    if rates["bfloat16"] < SLOW_BF16_FRACTION * rates["float32"]:
        raise BenchError(
            f"torch's bfloat16 matmul runs at {rates['bfloat16'] / 1e9:.1f} GFLOP/s on this CPU against "
            f"{rates['float32'] / 1e9:.0f} in float32 (no bfloat16 arithmetic: AVX512-BF16, AMX or Arm BF16), so "
            f"the bfloat16-autocast peer would take hours per step; compare in float32: --dtype float32")


class PeerStep:
    """Hugging Face LlamaForCausalLM trained the usual PyTorch way."""

    def __init__(self, spec: BenchSpec, perf: Any):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.set_num_threads(2)
        if spec.dtype == "bfloat16":
            check_torch_bfloat16(perf)
        torch.manual_seed(SEED)
        model = spec.model
        config = LlamaConfig(
            vocab_size=model["vocab_size"], hidden_size=model["dim"], intermediate_size=model["ffn_hidden_dim"],
            num_hidden_layers=model["n_layers"], num_attention_heads=model["n_heads"],
            num_key_value_heads=model["n_kv_heads"], rms_norm_eps=model["norm_eps"], rope_theta=model["rope_theta"],
            max_position_embeddings=model["max_seq_len"], tie_word_embeddings=model["tie_embeddings"],
            attn_implementation="sdpa")
        self.torch, self.perf, self.dtype = torch, perf, spec.dtype
        self.model = LlamaForCausalLM(config).float().train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-5,
                                           weight_decay=0.1)
        generator = torch.Generator().manual_seed(SEED)
        self.tokens = torch.randint(0, model["vocab_size"], (spec.batch, spec.seq_len), generator=generator)
        self.info = {"attn_implementation": self.model.config._attn_implementation,
                     "torch_threads": torch.get_num_threads(), "torch": torch.__version__}

    def step(self) -> dict[str, float]:
        torch = self.torch
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bfloat16")

        def run() -> None:
            with autocast:
                self.loss = self.model(input_ids=self.tokens, labels=self.tokens).loss  # HF shifts the labels
            self.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        seconds, cpu_seconds = self.perf.time_call_with_cpu(run)
        return {"seconds": seconds, "cpu_seconds": cpu_seconds, "loss": float(self.loss)}

    def ceiling(self) -> float:
        return self.perf.measure_torch_matmul_ceiling(self.dtype)


@functools.lru_cache(maxsize=1)
def load_perf_lean() -> Any:
    """llama_jax/perf.py loaded by path: importing it as llama_jax.perf would run llama_jax/__init__ (jax)."""
    spec = importlib.util.spec_from_file_location("_bench_perf", REPO_ROOT / "llama_jax" / "perf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve(role: str, spec: BenchSpec) -> int:
    """A child's loop: build the step, report 'ready', then answer step / ceiling / quit commands."""
    if role == "describe":
        print(json.dumps(dataclasses.asdict(resolve_model(spec))))
        return 0
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything libraries print goes to the log, never into the protocol

    def reply(message: dict[str, Any]) -> None:
        protocol.write(json.dumps(message) + "\n")

    start = time.perf_counter()
    if role == "ours":
        from llama_jax import perf

        worker: OurStep | PeerStep = OurStep(spec)
    else:
        perf = load_perf_lean()
        try:
            worker = PeerStep(spec, perf)
        except BenchError as error:
            reply({"event": "unusable", "reason": str(error)})
            return 0
    reply({"event": "ready", "setup_seconds": time.perf_counter() - start, **worker.info})
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            reply({"event": "step", **worker.step()})
        elif command == "ceiling":
            reply({"event": "ceiling", "flops_per_second": worker.ceiling()})
        elif command == "quit":
            reply({"event": "done", "peak_rss_bytes": perf.peak_rss_bytes_self()})
            return 0
    return 1


# ── Parent: drive both children in lockstep ──────────────────────────────────────────────────────────────────────
class Child:
    """A benchmark child process and its line protocol."""

    def __init__(self, role: str, spec: BenchSpec, log_dir: Path):
        self.role = role
        self.log_path = log_dir / f"{role}.log"
        self.log = open(self.log_path, "w")
        env = child_environment()
        argv = [sys.executable, "-m", "scripts.bench", "--child", role, "--spec", json.dumps(dataclasses.asdict(spec))]
        self.process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True, bufsize=1)

    def request(self, command: str | None) -> dict[str, Any]:
        """Send a command (None: just read the next reply) and return the child's JSON reply."""
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            raise RuntimeError(f"{self.role} child exited with status {self.process.returncode}; the end of its log "
                               f"({self.log_path}):\n{self.log_path.read_text()[-3000:]}")
        return json.loads(line)

    def finish(self) -> dict[str, Any]:
        """Ask the child to quit; its own peak RSS report and the one os.wait4 gives must agree closely."""
        done = self.request("quit")
        self.process.stdin.close()
        status, peak_rss = load_perf_lean().wait_with_peak_rss(self.process)
        self.log.close()
        return {"exit_status": status, "peak_rss_bytes": peak_rss, "self_reported_peak_rss_bytes":
                done["peak_rss_bytes"]}


@dataclasses.dataclass
class SideResult:
    """One side's measurements as the parent collects them."""

    info: dict[str, Any]
    ready_seconds: float
    warmup_seconds: list[float] = dataclasses.field(default_factory=list)
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    step_cpu_seconds: list[float] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    ceilings: list[float] = dataclasses.field(default_factory=list)
    finish: dict[str, Any] = dataclasses.field(default_factory=dict)


def run_lockstep(spec: BenchSpec, roles: Sequence[str], warmup: int, steps: int, log_dir: Path,
                 say: Callable[[str], None]) -> dict[str, SideResult]:
    """Start each child in turn (so compiles don't overlap), then alternate their steps and ceiling measurements."""
    children: dict[str, Child] = {}
    results: dict[str, SideResult] = {}
    try:
        for role in roles:
            started = time.perf_counter()
            children[role] = Child(role, spec, log_dir)
            ready = children[role].request(None)
            if ready["event"] == "unusable":
                raise BenchError(f"{role}: {ready['reason']}")
            results[role] = SideResult(info=ready, ready_seconds=time.perf_counter() - started)
            say(f"{role}: ready after {results[role].ready_seconds:.1f} s")
        for index in range(warmup):
            for role in roles:
                results[role].warmup_seconds.append(children[role].request("step")["seconds"])
            say(f"warm-up {index + 1}/{warmup}: " + _progress(results, "warmup_seconds"))
        measure_ceilings(children, results)
        for index in range(steps):
            order = roles if index % 2 == 0 else tuple(reversed(roles))  # nobody always goes right after the other
            for role in order:
                reply = children[role].request("step")
                results[role].step_seconds.append(reply["seconds"])
                results[role].step_cpu_seconds.append(reply["cpu_seconds"])
                results[role].losses.append(reply["loss"])
            measure_ceilings(children, results)
            say(f"step {index + 1}/{steps}: " + _progress(results, "step_seconds"))
        for role in roles:
            results[role].finish = children.pop(role).finish()
    finally:
        for child in children.values():  # only reached on an error: don't leave a child behind
            child.process.kill()
            child.process.wait()
    return results


def measure_ceilings(children: dict[str, Child], results: dict[str, SideResult]) -> None:
    for role, child in children.items():
        results[role].ceilings.append(child.request("ceiling")["flops_per_second"])


def _progress(results: dict[str, SideResult], field: str) -> str:
    return ", ".join(f"{role} {getattr(result, field)[-1]:.2f} s" for role, result in results.items())


# ── Report ───────────────────────────────────────────────────────────────────────────────────────────────────────
def summarise(spec: BenchSpec, results: dict[str, SideResult]) -> dict[str, Any]:
    """Medians, tokens/s, MFU against both ceilings, memory, and ours/peer ratios."""
    perf, flops_per_token = load_perf_lean(), spec.flops_per_token
    xla_ceiling = perf.median(results["ours"].ceilings) if "ours" in results else None
    torch_ceiling = perf.median(results["peer"].ceilings) if "peer" in results else None
    sides: dict[str, dict[str, Any]] = {}
    for role, result in results.items():
        step = perf.median(result.step_seconds)
        rate = perf.tokens_per_second(spec.tokens_per_step, step)
        first_step = result.warmup_seconds[0] if result.warmup_seconds else None
        side = {"tokens_per_second": rate, "step_seconds_median": step, "step_seconds": result.step_seconds,
                "step_seconds_min": min(result.step_seconds), "step_seconds_max": max(result.step_seconds),
                "cpu_seconds_per_step_median": perf.median(result.step_cpu_seconds),
                "step_cpu_seconds": result.step_cpu_seconds, "first_step_seconds": first_step,
                "warmup_seconds": result.warmup_seconds,
                "peak_rss_bytes": result.finish["peak_rss_bytes"], "loss_last": result.losses[-1],
                "mfu_vs_xla_ceiling": perf.model_flops_utilisation(flops_per_token, rate, xla_ceiling)
                if xla_ceiling else None,
                "mfu_vs_torch_ceiling": perf.model_flops_utilisation(flops_per_token, rate, torch_ceiling)
                if torch_ceiling else None,
                "ceilings": result.ceilings, "info": result.info, "finish": result.finish}
        if role == "ours":
            side["compile_seconds"] = result.info["trace_lower_seconds"] + result.info["compile_seconds"]
        else:
            side["compile_seconds"] = None  # eager PyTorch: first-step overhead shows in first_step_seconds
        sides[role] = side
    summary: dict[str, Any] = {"spec": dataclasses.asdict(spec), "flops_per_token": flops_per_token,
                               "xla_ceiling_flops_per_second": xla_ceiling,
                               "torch_ceiling_flops_per_second": torch_ceiling, "sides": sides}
    if "ours" in sides and "peer" in sides:
        summary["ours_over_peer"] = {
            "tokens_per_second": sides["ours"]["tokens_per_second"] / sides["peer"]["tokens_per_second"],
            "peak_rss": sides["ours"]["peak_rss_bytes"] / sides["peer"]["peak_rss_bytes"],
            "cpu_seconds_per_step": sides["ours"]["cpu_seconds_per_step_median"]
            / sides["peer"]["cpu_seconds_per_step_median"],
        }
    return summary


def format_table(summary: dict[str, Any]) -> str:
    format_bytes = load_perf_lean().format_bytes
    spec, sides = summary["spec"], summary["sides"]
    roles = list(sides)
    headers = {"ours": "ours (JAX)", "peer": "peer (HF torch)"}

    def number(value: float | None, pattern: str) -> str:
        return "-" if value is None else pattern.format(value)

    rows: list[tuple[str, list[str]]] = [
        ("tokens/s (median step)", [number(sides[r]["tokens_per_second"], "{:,.0f}") for r in roles]),
        ("step time, s: median", [number(sides[r]["step_seconds_median"], "{:.2f}") for r in roles]),
        ("step time, s: min-max", [f"{sides[r]['step_seconds_min']:.2f}-{sides[r]['step_seconds_max']:.2f}"
                                   for r in roles]),
        ("CPU s/step (user+sys, median)", [number(sides[r]["cpu_seconds_per_step_median"], "{:.2f}")
                                           for r in roles]),
        ("compile, s (AOT lower+compile)", [number(sides[r]["compile_seconds"], "{:.1f}") for r in roles]),
        ("first step, s", [number(sides[r]["first_step_seconds"], "{:.2f}") for r in roles]),
        ("peak RSS", [format_bytes(sides[r]["peak_rss_bytes"]) for r in roles]),
        ("MFU vs XLA matmul ceiling", [number(sides[r]["mfu_vs_xla_ceiling"], "{:.1%}") for r in roles]),
        ("MFU vs torch matmul ceiling", [number(sides[r]["mfu_vs_torch_ceiling"], "{:.1%}") for r in roles]),
        ("loss after last step", [number(sides[r]["loss_last"], "{:.3f}") for r in roles]),
    ]
    ratios = summary.get("ours_over_peer", {})
    ratio_column = {"tokens/s (median step)": ratios.get("tokens_per_second"), "peak RSS": ratios.get("peak_rss"),
                    "CPU s/step (user+sys, median)": ratios.get("cpu_seconds_per_step")}
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{spec['config']}: seq {spec['seq_len']} × batch {spec['batch']} = {spec['seq_len'] * spec['batch']:,} "
             f"tokens/step, {summary['flops_per_token'] / 1e6:.1f} MFLOP/token, dtype {spec['dtype']}, "
             f"remat {spec['remat']}, attention {spec['attention_impl'] or 'auto'} chunk "
             f"{spec['model']['attention_chunk']}, loss chunk {spec['loss_chunk'] or 'default'}"]
    ceilings = []
    if summary["xla_ceiling_flops_per_second"]:
        ceilings.append(f"XLA {_ceiling_kind(spec['dtype'])} {summary['xla_ceiling_flops_per_second'] / 1e9:.0f}")
    if summary["torch_ceiling_flops_per_second"]:
        ceilings.append(f"torch {spec['dtype']} {summary['torch_ceiling_flops_per_second'] / 1e9:.0f}")
    lines.append("matmul ceilings (GFLOP/s, median over the run): " + " · ".join(ceilings))
    lines.append(" " * width + "".join(f"{headers[r]:>18}" for r in roles) + ("   ours/peer" if ratios else ""))
    for label, values in rows:
        ratio = ratio_column.get(label)
        lines.append(f"{label:<{width}}" + "".join(f"{v:>18}" for v in values)
                     + (f"{ratio:>12.2f}" if ratio is not None and ratios else ""))
    ours = sides.get("ours")
    if ours and "xla_temp_bytes" in ours["info"]:
        lines.append(f"ours: XLA buffer plan: temporaries {format_bytes(ours['info']['xla_temp_bytes'])}, "
                     f"arguments {format_bytes(ours['info']['xla_argument_bytes'])}")
    return "\n".join(lines)


def _ceiling_kind(dtype: str) -> str:
    return "bf16×bf16→f32 dot" if dtype == "bfloat16" else f"{dtype} dot"


# ── Command line ─────────────────────────────────────────────────────────────────────────────────────────────────
def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    _, seq_len, batch = BENCH_SHAPES[args.config]
    return BenchSpec(config=args.config, seq_len=seq_len, batch=batch, dtype=args.dtype, remat=args.remat,
                     attention_chunk=args.attention_chunk, attention_impl=args.attention_impl,
                     loss_chunk=args.loss_chunk)


def described(spec: BenchSpec) -> BenchSpec:
    """The spec with its model resolved by a short-lived child (the parent must not import jax itself)."""
    argv = [sys.executable, "-m", "scripts.bench", "--child", "describe", "--spec",
            json.dumps(dataclasses.asdict(spec))]
    done = subprocess.run(argv, cwd=REPO_ROOT, env=child_environment(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"resolving the model config failed:\n{done.stderr[-3000:]}")
    return BenchSpec(**json.loads(done.stdout.strip().splitlines()[-1]))


def child_environment() -> dict[str, str]:
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": python_path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(BENCH_SHAPES), default="bench-s")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per side (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per side first (default 2)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--remat", choices=("full", "save_dots", "save_attention_out", "none"), default="full")
    parser.add_argument("--attention-chunk", type=int, default=None, help="model.attention_chunk (default 256)")
    parser.add_argument("--attention-impl", choices=ATTENTION_IMPLS, default=None)
    parser.add_argument("--loss-chunk", type=int, default=None,
                        help="override trainer.HEAD_CHUNK (sequence positions per output-head chunk)")
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the Hugging Face PyTorch peer (default: when torch and transformers exist)")
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here")
    parser.add_argument("--child", choices=("describe", "ours", "peer"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1 (the first step is slow and is not measured)")
    return args


def peer_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.child:
        return serve(args.child, BenchSpec(**json.loads(args.spec)))
    spec = described(spec_from_args(args))
    roles = ["ours"]
    if args.peer and peer_available():
        roles.append("peer")
    elif args.peer:
        print("torch or transformers is not installed: running without the peer", file=sys.stderr)
    say = _printer(sys.stderr)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-") as log_dir:
        try:
            results = run_lockstep(spec, roles, args.warmup, args.steps, Path(log_dir), say)
        except BenchError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    summary = summarise(spec, results)
    summary["load_average_before"], summary["load_average_after"] = load_before, os.getloadavg()
    print(format_table(summary))
    # The load says how far the absolute numbers are from a quiet machine's; the ratio ours/peer is robust to it.
    print(f"load average (1 min) before / after: {load_before[0]:.1f} / {summary['load_average_after'][0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


def _printer(stream: TextIO) -> Callable[[str], None]:
    started = time.perf_counter()
    return lambda text: print(f"[{time.perf_counter() - started:6.0f} s] {text}", file=stream, flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
