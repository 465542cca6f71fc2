"""Scaling-law sweeps: generate runs from a small spec, train them, collect their bits per byte, fit the laws.

    python -m train.scaling_laws plan SPEC.yaml [--out DIR]     write the run configs and a cluster job list
    python -m train.scaling_laws run  SPEC.yaml [--out DIR]     train them one after another (resumable)
    python -m train.scaling_laws fit  DIR [--target-flops C]    collect, fit, report and plot
    python -m train.scaling_laws all  SPEC.yaml [--out DIR] [--target-flops C]   run, then fit
    python -m train.scaling_laws evaluate RUN_DIR               final bits per byte of one run (cluster jobs)

Run from the repository root: each run trains in its own `python -m train.pretrain CONFIG` process, as one line of
jobs.txt does on a cluster. See configs/scaling/cpu.yaml for every key of a spec, and `llama_jax.scaling_sweep` for
how budgets become runs and how N and C are counted.

Exit status: 0 done · 1 some runs failed (named at the end) · 2 error (one `error:` line) · 130 stopped (the run in
progress saved a checkpoint; the same command resumes the sweep).
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from llama_jax import scaling_sweep as sweep
from llama_jax.cli import run_program


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.scaling_laws", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("plan", "write run configs, jobs.txt and plan.json"),
                       ("run", "plan, then train and evaluate every run not yet complete"),
                       ("all", "run, then fit")):
        command = commands.add_parser(name, help=text)
        command.add_argument("spec", type=Path)
        command.add_argument("--out", type=Path, default=None, help="sweep directory (default runs/scaling-<name>)")
        if name == "all":
            _fit_arguments(command)
    fit = commands.add_parser("fit", help="collect the runs' final bits per byte, fit, report and plot")
    fit.add_argument("sweep_dir", type=Path)
    fit.add_argument("--fit-dir", type=Path, default=None, help="where the report and plots go (default SWEEP/fit)")
    _fit_arguments(fit)
    evaluate = commands.add_parser("evaluate", help="final bits per byte of one run → <run_dir>/final_eval.json")
    evaluate.add_argument("run_dir", type=Path)
    evaluate.add_argument("--batch-size", type=int, default=None)
    evaluate.add_argument("--batches", type=int, default=None, help="score only this many batches (default: all)")
    return parser


def _fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target-flops", type=float, default=None,
                        help="budget for the compute-optimal N and D (default: the spec's target_flops, else 10× the "
                             "largest budget)")
    parser.add_argument("--metric", choices=("bpb", "loss"), default="bpb",
                        help="fit bits per byte (default) or nats per token")
    parser.add_argument("--params", choices=("non_embedding", "total"), default=None,
                        help="which N to fit (default: the spec's shape.params)")
    parser.add_argument("--no-parametric", action="store_true", help="skip the parametric L(N, D) fit")
    parser.add_argument("--min-steps", type=int, default=0,
                        help="fit only runs of at least this many steps (shorter runs may not have left the initial "
                             "loss plateau, where no power law holds); they stay in the run table")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the parametric fit")
    parser.add_argument("--neighbours", type=_neighbours, default=2, metavar="K",
                        help="fit each IsoFLOP parabola to the budget's lowest loss and K model sizes on each side of "
                             "it (default 2; `all`: every size, as Hoffmann et al.)")


def _neighbours(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number or `all`, got {text!r}")
    return value


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "evaluate":
        record = sweep.evaluate_run(args.run_dir, args.batch_size, args.batches)
        print(json.dumps(record))
        return 0
    if args.command == "fit":
        return _fit_command(args.sweep_dir, args)
    spec = sweep.load_spec(args.spec)
    sweep_dir = args.out or sweep.default_sweep_dir(spec)
    runs = sweep.write_plan(args.spec, spec, sweep_dir)
    print(sweep.plan_table(runs, spec))
    print(f"configs in {sweep_dir / 'configs'}; job list (one line per run, for a cluster): "
          f"{sweep_dir / sweep.JOBS_FILE}", flush=True)
    if args.command == "plan":
        return 0
    started = time.monotonic()
    try:
        failed = sweep.run_sweep(runs, log=lambda message: print(message, flush=True))
    except KeyboardInterrupt:
        print("stopped: the run in progress saved a checkpoint; the same command resumes the sweep", flush=True)
        return 130
    print(f"sweep wall time {(time.monotonic() - started) / 60:.1f} min"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    if args.command == "all":
        status = _fit_command(sweep_dir, args)
        return 1 if failed else status
    return 1 if failed else 0


def _fit_command(sweep_dir: Path, args: argparse.Namespace) -> int:
    plan, runs = sweep.load_plan(sweep_dir)
    collected = sweep.collect(runs, log=lambda message: print(message, flush=True))
    target = args.target_flops if args.target_flops is not None else plan.get("target_flops")
    fit_dir = getattr(args, "fit_dir", None) or sweep_dir / "fit"
    outcome = sweep.fit_sweep(collected, fit_dir, target, metric=args.metric,
                              params=args.params or plan.get("params_counted", "non_embedding"),
                              parametric=not args.no_parametric, n_bootstrap=args.bootstrap,
                              min_steps=args.min_steps, neighbours=args.neighbours)
    print(outcome.report, end="")
    print("plots: " + ", ".join(str(path) for path in outcome.plots.values()))
    print(f"report: {fit_dir / 'report.txt'} · table: {fit_dir / 'results.csv'}")
    return 0


if __name__ == "__main__":
    run_program(main)
