"""Plan a pretraining run before renting the cluster: memory per device, FLOPs, step time and GPU-hours.

    python -m train.plan CONFIG.yaml [key=value ...] --devices N [--mesh DATAxFSDPxTENSOR] [options]
    python -m train.plan configs/llama2-7b.yaml --devices 8 --mesh 1x8x1
    python -m train.plan configs/llama2-70b.yaml --devices 64 --mesh 1x64x1 --accelerator a100-80gb --mfu 0.45

Simulates N devices (XLA's host platform with N CPU devices, set before jax is imported), compiles the real train
step for the mesh from abstract shapes (nothing is allocated) and prints memory per device, FLOPs, time and GPU-hours;
if the step does not fit, suggests the smallest fsdp × tensor split that does and compiles it to check
(`llama_jax.planner` explains the method and its caveats). Without --mesh, the config's mesh.

Exit status: 0 done · 2 error (one `error:` line).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from llama_jax import planner  # imports no jax: the device count can still be chosen after this
from llama_jax.cli import MESH_FORMAT, parse_mesh, run_program
from llama_jax.config import load_config
from llama_jax.errors import LlamaJaxError


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config YAML (e.g. configs/llama2-7b.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. train.seq_len=2048)")
    parser.add_argument("--devices", type=int, required=True, help="number of devices to simulate")
    parser.add_argument("--mesh", default=None,
                        help=f"{MESH_FORMAT}, e.g. 1x8x1 (one size may be -1); default: the config's mesh")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per device per micro-batch (default 1)")
    parser.add_argument("--accelerator", choices=sorted(planner.ACCELERATORS), default="h100-sxm")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="device memory instead of the accelerator's 80 GiB (e.g. 40 for an A100 40GB)")
    parser.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation (default 0.40)")
    parser.add_argument("--tokens", type=float, default=2e12, help="token budget for GPU-hours (default 2e12)")
    parser.add_argument("--no-suggest", action="store_true", help="skip the search for a split that fits")
    parser.add_argument("--no-verify", action="store_true", help="do not compile the suggested split to check it")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    if (args.devices < 1 or args.micro_batch < 1 or not 0 < args.mfu <= 1 or args.tokens <= 0
            or (args.memory_gib is not None and args.memory_gib <= 0)):
        parser.error("--devices, --micro-batch, --tokens and --memory-gib must be positive, --mfu in (0, 1]")
    return args


def simulate_devices(count: int) -> None:
    """XLA's host platform with `count` CPU devices; only possible before jax is imported."""
    if "jax" in sys.modules:
        raise LlamaJaxError("python -m train.plan must set the simulated device count before jax is imported")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    mesh_sizes = parse_mesh(args.mesh) if args.mesh else None
    simulate_devices(args.devices)  # jax is first imported when the planner compiles the step
    config = load_config(args.config, args.overrides)
    if mesh_sizes is None:
        mesh_sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    mesh_shape = planner.resolve_mesh(mesh_sizes, args.devices)
    accelerator = planner.accelerator_named(args.accelerator, args.memory_gib)

    def check(suggestion: dict) -> dict:
        return planner.verify(args.config, args.overrides, suggestion, micro_batch=args.micro_batch,
                              accelerator=args.accelerator, memory_gib=args.memory_gib)

    report = planner.plan_report(config, mesh_shape, accelerator, micro_batch=args.micro_batch, mfu=args.mfu,
                                 token_budget=args.tokens, suggest=not args.no_suggest,
                                 check=None if args.no_verify else check)
    if args.json != "-":
        print(planner.format_report(report, accelerator))
    if args.json:
        text = json.dumps(report, default=float)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    run_program(main)
