"""What every program shares: how it starts, how it spells a device mesh, and how it reports a user error.

Conventions (CONTRIBUTING.md has them in prose):
- Every program starts as `python -m <package>.<program>`: `train.*` for training, `eval.*` for evaluation and
  inference, `llama_jax.*` for the tools that belong to the library (convert, checkpoint, config).
- A program that runs a training configuration takes `CONFIG.yaml [key=value ...]`; its own options are flags.
  Every other program takes flags only.
- A device mesh is written `DATAxFSDPxTENSOR`, one size may be -1 (the remaining devices): `mesh=1x-1x1` as a
  config override, `--mesh 1x-1x1` as a flag (and in lm-eval's `--model_args`, where commas separate arguments).
- A user error (any `LlamaJaxError`) prints one line `error: <message>` on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from llama_jax.errors import ConfigError, LlamaJaxError

USAGE_ERROR_STATUS = 2
MESH_FORMAT = "DATAxFSDPxTENSOR"


def run_program(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run a program's main; a LlamaJaxError becomes one line on stderr and exit status 2."""
    try:
        status = main(sys.argv[1:] if argv is None else argv)
    except LlamaJaxError as error:
        print(f"error: {error}", file=sys.stderr)
        abort(USAGE_ERROR_STATUS, "a user error ended this process")
    sys.exit(status or 0)


@contextlib.contextmanager
def removed_on_error(path: Path) -> Iterator[None]:
    """Delete `path` if this block created it and then failed: a program that rejects its inputs while setting up
    a run leaves no run directory behind (a run directory that existed before is left as it was)."""
    existed = path.exists()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(path, ignore_errors=True)
        raise


def abort(status: int, reason: str) -> None:
    """End a multi-process run from this process now: the peers notice it as a dead process and stop too.

    For error paths that would otherwise `sys.exit` into JAX's shutdown barrier
    (see `distributed._exit_on_uncaught_exception`).
    In a single-process run this is plain `sys.exit(status)`.
    """
    jax = sys.modules.get("jax")  # without jax imported there are no peers to stop
    if jax is None or not jax.distributed.is_initialized() or jax.process_count() == 1:
        sys.exit(status)
    print(f"error: {reason}; stopping this process now — the other processes stop when they notice "
          "(at once if this is process 0, else within distributed.heartbeat_timeout_seconds)", file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


def parse_mesh(text: str, *, option: str = "--mesh") -> tuple[int, int, int]:
    """'DATAxFSDPxTENSOR' → (data, fsdp, tensor); each a positive size or -1 (the remaining devices)."""
    try:
        sizes = tuple(int(part) for part in str(text).split("x"))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or any(size == 0 or size < -1 for size in sizes) or sizes.count(-1) > 1:
        hint = " (the comma spelling is gone: write 1x-1x1)" if "," in str(text) else ""
        raise ConfigError(f"{option} {text!r}: expected {MESH_FORMAT} sizes such as 1x-1x1 or 2x2x2, at most "
                          f"one of them -1{hint}")
    return sizes  # type: ignore[return-value]


def moved(old: str, new: str) -> NoReturn:
    """The entry point of a program that changed name: one line saying the new command, exit status 2."""
    print(f"error: `{old}` is now `{new}`", file=sys.stderr)
    sys.exit(USAGE_ERROR_STATUS)


def add_model_arguments(parser: argparse.ArgumentParser, *, mesh: bool = True, multi_process: bool = False) -> None:
    """The options every evaluation and inference program shares: which model, tokenizer, dtype and mesh
    (`scoring.model_from_args` loads what they name)."""
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="checkpoint of any format: llama-jax (or a training run directory), Hugging Face, Meta")
    parser.add_argument("--tokenizer", metavar="PATH", default=None,
                        help="tokenizer file or folder (default: the model folder's tokenizer.model)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="compute dtype (default: the checkpoint's); parameters stay float32")
    if mesh:
        parser.add_argument("--mesh", default="1x-1x1", metavar="DATAxFSDPxTENSOR",
                            help="device mesh sizes, -1 = the remaining devices (default 1x-1x1: parameters and "
                                 "batch split over all devices)")
    if multi_process:
        parser.add_argument("--distributed", action="store_true",
                            help="join JAX's distributed runtime first (one process per host; the coordinator and "
                                 "process ids come from the cluster: SLURM, Open MPI, Kubernetes)")
