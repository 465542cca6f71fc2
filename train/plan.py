"""Plan a pretraining run before renting the cluster: memory per device, FLOPs, step time and device-hours.

    python -m train.plan CONFIG.yaml [key=value ...] --devices N [--mesh DATAxFSDPxTENSOR] [options]   (GPUs)
    python -m train.plan CONFIG.yaml [key=value ...] --target tpu-GEN:TOPOLOGY [--mesh ...] [options]   (TPUs)
    python -m train.plan configs/llama2-7b.yaml --devices 8 --mesh 1x8x1
    python -m train.plan configs/llama2-70b.yaml --devices 64 --mesh 1x64x1 --accelerator a100-80gb --mfu 0.45
    python -m train.plan configs/llama2-7b.yaml --target tpu-v5p:2x2x1
    python -m train.plan configs/llama2-7b.yaml model=codellama-34b train.seq_len=16384 train.batch_size=8 \
        train.grad_accum=1 sharding_rules=sequence --devices 8 --mesh 1x8x1   (each 16K sequence split 8 ways)

GPU plans simulate N devices (XLA's host platform with N CPU devices, set before jax is imported) and compile the
real train step with XLA:CPU; TPU plans (`--target`, v4, v5e, v5p or v6e; needs `pip install -e '.[tpu]'`) compile
it with XLA:TPU for that topology's compile-only chips, on this machine. Both compile from abstract shapes (nothing is
allocated) and print memory per device, FLOPs, time and device-hours; if the step does not fit, they suggest the
smallest fsdp × tensor split that does and compile it to check (`llama_jax.planner` explains the method and its
caveats). Without --mesh, the config's mesh.

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
from llama_jax.errors import ConfigError, LlamaJaxError


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config YAML (e.g. configs/llama2-7b.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. train.seq_len=2048)")
    parser.add_argument("--devices", type=int, default=None, help="number of GPUs to simulate (a GPU plan)")
    parser.add_argument("--target", default=None, metavar=planner.TARGET_FORMAT,
                        help="a TPU slice by chips per axis, e.g. tpu-v5p:2x2x1, tpu-v5e:4x4, tpu-v4:2x2x1, "
                             "tpu-v6e:4x4: compile with XLA:TPU instead (a TPU plan; needs the tpu extra)")
    parser.add_argument("--mesh", default=None,
                        help=f"{MESH_FORMAT}, e.g. 1x8x1 (one size may be -1); default: the config's mesh")
    parser.add_argument("--micro-batch", type=int, default=1,
                        help="sequences per batch shard per micro-batch: per device, or per data shard under rules "
                             "that split sequences (sharding_rules=sequence) (default 1)")
    parser.add_argument("--accelerator", choices=sorted(planner.ACCELERATORS), default=None,
                        help="the GPU of a GPU plan (default h100-sxm)")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="GPU memory instead of the accelerator's 80 GiB (e.g. 40 for an A100 40GB)")
    parser.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation (default 0.40)")
    parser.add_argument("--tokens", type=float, default=2e12, help="token budget for GPU-hours (default 2e12)")
    parser.add_argument("--no-suggest", action="store_true", help="skip the search for a split that fits")
    parser.add_argument("--no-verify", action="store_true", help="do not compile the suggested split to check it")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    if ((args.devices is not None and args.devices < 1) or args.micro_batch < 1 or not 0 < args.mfu <= 1
            or args.tokens <= 0 or (args.memory_gib is not None and args.memory_gib <= 0)):
        parser.error("--devices, --micro-batch, --tokens and --memory-gib must be positive, --mfu in (0, 1]")
    return args


def check_plan_kind(args: argparse.Namespace) -> None:
    """A GPU plan takes --devices (and --accelerator, --memory-gib); a TPU plan takes --target, whose chips are its
    devices and whose chip its memory."""
    if args.target is None:
        if args.devices is None:
            raise ConfigError(f"--devices N (a GPU plan) or --target {planner.TARGET_FORMAT} (a TPU plan) is needed")
        return
    if args.devices is not None:
        raise ConfigError(f"--devices is for GPU plans: --target {args.target} plans its own chips")
    if args.accelerator is not None or args.memory_gib is not None:
        raise ConfigError(f"--accelerator and --memory-gib are for GPU plans: --target {args.target} names the chip")


def simulate_devices(count: int) -> None:
    """XLA's host platform with `count` CPU devices; only possible before jax is imported."""
    if "jax" in sys.modules:
        raise LlamaJaxError("python -m train.plan must set the simulated device count before jax is imported")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    check_plan_kind(args)
    target = planner.parse_target(args.target) if args.target else None
    mesh_sizes = parse_mesh(args.mesh) if args.mesh else None
    # jax is first imported when the planner compiles the step. A TPU plan's chips come from libtpu: this process's
    # own devices stay one CPU, so that jax never tries to open a TPU on the host it runs on.
    simulate_devices(args.devices or 1)
    config = load_config(args.config, args.overrides)
    if mesh_sizes is None:
        mesh_sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    if target is not None:
        mesh_shape = planner.resolve_mesh(mesh_sizes, target.chips, f"{target.name} has {target.chips} chips")
        report = planner.plan_tpu_report(config, target, mesh_shape, micro_batch=args.micro_batch, mfu=args.mfu,
                                         token_budget=args.tokens, suggest=not args.no_suggest,
                                         verify=not args.no_verify)
        text = planner.format_tpu_report(report)
    else:
        mesh_shape = planner.resolve_mesh(mesh_sizes, args.devices)
        accelerator_name = args.accelerator or "h100-sxm"
        accelerator = planner.accelerator_named(accelerator_name, args.memory_gib)

        def check(suggestion: dict) -> dict:
            return planner.verify(args.config, args.overrides, suggestion, micro_batch=args.micro_batch,
                                  accelerator=accelerator_name, memory_gib=args.memory_gib)

        report = planner.plan_report(config, mesh_shape, accelerator, micro_batch=args.micro_batch, mfu=args.mfu,
                                     token_budget=args.tokens, suggest=not args.no_suggest,
                                     check=None if args.no_verify else check)
        text = planner.format_report(report, accelerator)
    if args.json != "-":
        print(text)
    if args.json:
        encoded = json.dumps(report, default=float)
        if args.json == "-":
            print(encoded)
        else:
            Path(args.json).write_text(encoded + "\n")
    return 0


if __name__ == "__main__":
    run_program(main)
