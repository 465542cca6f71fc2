"""Scaling-law sweeps: generate runs from a small spec, train them, collect their bits per byte, fit the laws.

The library behind `python -m train.scaling_laws {plan,run,all,fit,evaluate}`; the fits themselves are
`llama_jax.scaling`'s. In order: `load_spec` reads a spec, `plan_runs`/`write_plan` turn it into run configs, a
cluster job list and plan.json, `run_sweep` trains and scores them one after another (resumable; `evaluate_run`
scores one run), `collect` gathers the final evaluations, and `fit_sweep` fits, writes the report, the CSV table
and the plots.

A spec names a base run config, a list of compute budgets in training FLOPs, and the model sizes to try at each
budget (a list shared by all budgets, a list per budget, or a ladder around Chinchilla's 20 tokens per parameter).
Each (budget, size) becomes a Llama whose depth and width follow a fixed aspect ratio, trained for the tokens the
budget buys it, D = C / flops_per_token, with a learning-rate warmup and cosine decay ending at the run's own last
step (Hoffmann et al. found a schedule longer than the run biases the comparison). See configs/scaling/cpu.yaml for
every key.

Sweep directory (default runs/scaling-<spec name>):
    spec.yaml  plan.json  jobs.txt  configs/<run>.yaml  runs/<run>/{config.yaml, metrics.jsonl, checkpoints/,
    train.log, final_eval.json}  fit/{report.txt, results.csv, *.png}
Each line of jobs.txt trains and scores one run from the repository root: `python -m train.pretrain CONFIG &&
python -m train.scaling_laws evaluate RUN_DIR`.

Counting. N is the non-embedding parameter count by default (Kaplan et al.; `shape.params: total` gives Chinchilla's
count including the embedding and output head); at CPU scale the embedding and head are a large share of a model, and
counting them bends the small models' curves. C is the FLOPs the run really spends: ModelConfig.flops_per_token (the
matrix multiplies of blocks and head, plus attention) times the tokens, so IsoFLOP runs are equal in compute even where
the head or attention is a large share; the runs' C/(6ND) is reported. The fits use the final validation bits per
byte, a whole pass over the validation split (tokenizer-independent units; a constant factor from nats per token for
one tokenizer, so the exponents do not depend on the choice).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from llama_jax.config import ModelConfig, RunConfig, load_config, read_yaml_mapping, to_yaml
from llama_jax.errors import ConfigError, LlamaJaxError

REPO = Path(__file__).resolve().parents[1]  # the repository root: training runs `python -m train.pretrain` here
PLAN_FILE = "plan.json"
JOBS_FILE = "jobs.txt"
FINAL_EVAL_FILE = "final_eval.json"
TIMING_FILE = "sweep_timing.json"
CHINCHILLA_TOKENS_PER_PARAM = 20.0


# ── The spec ────────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class ShapeRule:
    """How a target parameter count becomes a Llama shape."""

    params: str = "non_embedding"  # which N sizes and fits count: non_embedding (Kaplan) or total (Chinchilla)
    aspect_ratio: float = 64.0  # dim / n_layers to aim for (Kaplan: loss is flat over a wide range of it)
    head_dim: int = 32  # the head width aimed at: n_heads = dim / head_dim, rounded to a divisor of dim
    dim_multiple: int = 16  # model widths tried: multiples of this (finer than head_dim, for small models)
    kv_group: int = 1  # query heads per kv head (1 = multi-head attention, 2 = kv heads = heads / 2)
    multiple_of: int = 32  # Meta's SwiGLU hidden rounding (hidden = 8/3·dim rounded up to this)
    min_layers: int = 1
    max_layers: int = 128

    def __post_init__(self) -> None:
        if self.params not in ("non_embedding", "total"):
            raise ConfigError(f"shape.params={self.params!r}: expected non_embedding or total")
        for name in ("aspect_ratio", "head_dim", "dim_multiple", "kv_group", "multiple_of", "min_layers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"shape.{name}={getattr(self, name)!r}: expected a positive number")


@dataclass(frozen=True)
class ScheduleRule:
    """Learning rate and schedule per run: peak lr by width, warmup by the run's length, cosine to its end."""

    lr: float = 3e-4  # peak learning rate of a model of width reference_dim
    reference_dim: int = 4096
    lr_width_exponent: float = 0.5  # lr = lr · (reference_dim / dim)^exponent: wider models take smaller steps
    warmup_fraction: float = 0.05  # of the run's own steps
    min_warmup_steps: int = 5
    max_warmup_steps: int = 2000
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak exactly at the run's last step


@dataclass(frozen=True)
class SizeRule:
    """Target N per budget: an explicit grid, a grid per budget, or a geometric ladder around 20 tokens/param."""

    grid: tuple[float, ...] = ()
    per_budget: Mapping[float, tuple[float, ...]] = field(default_factory=dict)
    ladder_count: int = 4
    ladder_factor: float = 2.0
    tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM

    def targets(self, budget: float) -> list[float]:
        if self.per_budget:
            for key, sizes in self.per_budget.items():
                if math.isclose(key, budget, rel_tol=1e-6):
                    return list(sizes)
            raise ConfigError(f"sizes: no list of sizes for budget {budget:.3g}")
        if self.grid:
            return list(self.grid)
        # Centre: C = 6·N·D with D = tokens_per_param·N. The real optimum at this scale is what the sweep measures,
        # so the ladder is spread wide enough (count · factor) to bracket it.
        centre = math.sqrt(budget / (6.0 * self.tokens_per_param))
        offsets = [i - (self.ladder_count - 1) / 2 for i in range(self.ladder_count)]
        return [centre * self.ladder_factor**offset for offset in offsets]


@dataclass(frozen=True)
class SweepSpec:
    name: str
    base: Path
    overrides: tuple[str, ...]
    budgets: tuple[float, ...]
    sizes: SizeRule
    shape: ShapeRule
    schedule: ScheduleRule
    target_flops: float | None = None
    flops_per_second: float | None = None  # for the plan's time estimate
    overhead_seconds: float = 30.0  # per run: start-up, compilation, final evaluation


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep spec")
    known = {"name", "base", "config", "budgets", "sizes", "shape", "schedule", "final_eval", "target_flops",
             "estimate"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"sweep spec {path}: unknown keys {unknown}; allowed {sorted(known)}")
    if "base" not in raw or "budgets" not in raw:
        raise ConfigError(f"sweep spec {path}: needs `base` (a run config) and `budgets` (a list of FLOPs)")
    budgets = tuple(sorted(float(b) for b in raw["budgets"]))
    if not budgets or any(b <= 0 for b in budgets):
        raise ConfigError(f"sweep spec {path}: budgets must be positive FLOP counts, got {raw['budgets']!r}")
    unknown_eval = sorted(set(raw.get("final_eval") or {}) - {"batch_size", "batches"})
    if unknown_eval:
        raise ConfigError(f"sweep spec {path}: unknown keys {unknown_eval} in final_eval; allowed batch_size, batches")
    estimate = raw.get("estimate") or {}
    return SweepSpec(
        name=str(raw.get("name", path.stem)),
        base=_resolve_base(raw["base"], path),
        overrides=tuple(_flatten_overrides(raw.get("config") or {})),
        budgets=budgets,
        sizes=_size_rule(raw.get("sizes"), path),
        shape=_build_rule(ShapeRule, raw.get("shape"), "shape"),
        schedule=_build_rule(ScheduleRule, raw.get("schedule"), "schedule"),
        target_flops=float(raw["target_flops"]) if raw.get("target_flops") is not None else None,
        flops_per_second=float(estimate["flops_per_second"]) if estimate.get("flops_per_second") else None,
        overhead_seconds=float(estimate.get("overhead_seconds", 30.0)),
    )


def _resolve_base(base: str, spec_path: Path) -> Path:
    """A base config path as written from the working directory (`configs/tiny.yaml`), else beside the spec."""
    for candidate in (Path(base), spec_path.parent / base, REPO / base):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"sweep spec {spec_path}: base config {base!r} not found")


def _flatten_overrides(tree: Mapping[str, Any], prefix: str = "") -> Iterable[str]:
    """A nested mapping as `a.b=value` overrides for load_config (values in YAML's flow style)."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten_overrides(value, dotted + ".")
        else:
            yield f"{dotted}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def _build_rule(cls: type, raw: Mapping[str, Any] | None, section: str):
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw or {}) - allowed)
    if unknown:
        raise ConfigError(f"sweep spec `{section}`: unknown keys {unknown}; allowed {sorted(allowed)}")
    return cls(**(raw or {}))


def _size_rule(raw: Any, spec_path: Path) -> SizeRule:
    if raw is None:
        return SizeRule()
    if isinstance(raw, list):
        return SizeRule(grid=tuple(float(size) for size in raw))
    if isinstance(raw, dict) and "ladder" in raw:
        ladder = raw["ladder"] or {}
        return SizeRule(ladder_count=int(ladder.get("count", 4)), ladder_factor=float(ladder.get("factor", 2.0)),
                        tokens_per_param=float(ladder.get("tokens_per_param", CHINCHILLA_TOKENS_PER_PARAM)))
    if isinstance(raw, dict):
        return SizeRule(per_budget={float(budget): tuple(float(s) for s in sizes) for budget, sizes in raw.items()})
    raise ConfigError(f"sweep spec {spec_path}: `sizes` must be a list, a mapping budget → list, or {{ladder: ...}}")


# ── Model shapes ────────────────────────────────────────────────────────────────────────────────────────────────
def counted_params(model: ModelConfig, which: str) -> int:
    """N as the spec counts it: all parameters, or without the embedding table and output head."""
    total = model.num_params()
    if which == "total":
        return total
    embedding_and_head = model.vocab_size * model.dim * (1 if model.tie_embeddings else 2)
    return total - embedding_and_head


def shape_for(target_params: float, base: ModelConfig, rule: ShapeRule) -> ModelConfig:
    """The Llama closest to `target_params` (in log N) among dims that are multiples of dim_multiple, preferring an
    aspect ratio dim/n_layers near the rule's; ties go to the shallower model (faster per FLOP)."""
    best: tuple[float, ModelConfig] | None = None
    for layers in range(rule.min_layers, rule.max_layers + 1):
        dims = _dims_near(target_params, layers, base, rule)
        if layers > rule.min_layers and dims[-1] / layers < rule.aspect_ratio / 12:
            break  # far too deep and narrow to win on the score below; deeper only gets worse
        for dim in dims:
            candidate = _shaped(base, dim, layers, rule)
            if candidate is None:
                continue
            size_error = abs(math.log(counted_params(candidate, rule.params) / target_params))
            if size_error > math.log(1.5):
                continue
            # One unit of aspect-ratio error (a factor e) weighs like a factor e^(1/4) in size.
            score = size_error + 0.25 * abs(math.log(dim / layers / rule.aspect_ratio))
            if best is None or score < best[0] - 1e-12:
                best = (score, candidate)
    if best is None:
        raise ConfigError(f"no model shape within 1.5x of N={target_params:.3g} ({rule.params}) with widths a "
                          f"multiple of {rule.dim_multiple} and {rule.min_layers}-{rule.max_layers} layers")
    return best[1]


def _dims_near(target_params: float, layers: int, base: ModelConfig, rule: ShapeRule) -> range:
    """Widths worth trying at this depth: a block holds ≈ 12·dim² parameters (4·dim² attention, 8·dim² SwiGLU), plus
    2·vocab·dim of embedding and head when N is the total; solve for dim and look within a factor 1.6 of it."""
    embedding = 2 * base.vocab_size if rule.params == "total" else 0
    guess = (-embedding + math.sqrt(embedding**2 + 48 * layers * target_params)) / (24 * layers)
    low = max(rule.dim_multiple, math.floor(guess / 1.6 / rule.dim_multiple) * rule.dim_multiple)
    high = math.ceil(guess * 1.6 / rule.dim_multiple) * rule.dim_multiple
    return range(low, high + 1, rule.dim_multiple)


def _shaped(base: ModelConfig, dim: int, layers: int, rule: ShapeRule) -> ModelConfig | None:
    """dim × layers with the head count nearest dim / head_dim that divides dim into even head widths (RoPE
    rotates pairs); None if there is none."""
    aimed = max(1, round(dim / rule.head_dim))
    small = [h for h in range(1, math.isqrt(dim) + 1) if dim % h == 0]
    divisors = [h for h in {*small, *(dim // h for h in small)} if (dim // h) % 2 == 0]
    if not divisors:
        return None
    heads = min(divisors, key=lambda h: (abs(math.log(h / aimed)), -h))
    kv_heads = heads // rule.kv_group if heads % rule.kv_group == 0 else heads
    return dataclasses.replace(base, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                               ffn_hidden_dim=None, ffn_dim_multiplier=None, multiple_of=rule.multiple_of)


# ── The plan ────────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class PlannedRun:
    name: str
    budget: float
    target_params: float
    params: int  # as the spec counts N
    total_params: int
    non_embedding_params: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    steps: int
    tokens: int
    flops: float  # flops_per_token · tokens: what the run really spends
    flops_per_token: float
    lr: float
    warmup_steps: int
    run_dir: str
    config_path: str

    @property
    def six_nd_ratio(self) -> float:
        return self.flops / (6.0 * self.params * self.tokens)


def plan_runs(spec: SweepSpec, sweep_dir: Path) -> tuple[list[PlannedRun], dict[str, RunConfig]]:
    base = load_config(spec.base, list(spec.overrides))
    runs, configs = [], {}
    for budget in spec.budgets:
        seen_shapes = set()
        for target in spec.sizes.targets(budget):
            model = shape_for(target, base.model, spec.shape)
            if (model.dim, model.n_layers) in seen_shapes:
                continue  # two targets rounded to one shape: train it once
            seen_shapes.add((model.dim, model.n_layers))
            run, config = _plan_one(spec, base, model, budget, target, sweep_dir)
            runs.append(run)
            configs[run.name] = config
    return runs, configs


def _plan_one(spec: SweepSpec, base: RunConfig, model: ModelConfig, budget: float, target: float,
              sweep_dir: Path) -> tuple[PlannedRun, RunConfig]:
    batch, seq = base.train.batch_size, base.train.seq_len
    flops_per_token = model.flops_per_token(seq)
    steps = max(1, round(budget / (flops_per_token * batch * seq)))
    tokens = steps * batch * seq
    lr, warmup = _schedule(spec.schedule, model.dim, steps)
    name = f"C{budget:.2g}_d{model.dim}_L{model.n_layers}".replace("+", "")
    run_dir = (sweep_dir / "runs" / name).resolve()
    config = dataclasses.replace(
        base,
        run_dir=str(run_dir),
        model=model,
        train=dataclasses.replace(base.train, steps=steps),
        optimizer=dataclasses.replace(base.optimizer, lr=lr, warmup_steps=warmup,
                                      min_lr_ratio=spec.schedule.min_lr_ratio),
        # One evaluation, at the end; the final bits per byte come from a whole pass afterwards.
        eval=dataclasses.replace(base.eval, every_steps=steps),
    )
    run = PlannedRun(
        name=name, budget=budget, target_params=target, params=counted_params(model, spec.shape.params),
        total_params=model.num_params(), non_embedding_params=counted_params(model, "non_embedding"),
        dim=model.dim, n_layers=model.n_layers, n_heads=model.n_heads, n_kv_heads=model.kv_heads,
        hidden_dim=model.hidden_dim, steps=steps, tokens=tokens, flops=flops_per_token * tokens,
        flops_per_token=flops_per_token, lr=lr, warmup_steps=warmup, run_dir=str(run_dir),
        config_path=str((sweep_dir / "configs" / f"{name}.yaml").resolve()),
    )
    return run, config


def _schedule(rule: ScheduleRule, dim: int, steps: int) -> tuple[float, int]:
    lr = rule.lr * (rule.reference_dim / dim) ** rule.lr_width_exponent
    warmup = round(rule.warmup_fraction * steps)
    warmup = min(max(warmup, rule.min_warmup_steps), rule.max_warmup_steps, max(steps - 1, 0))
    return float(f"{lr:.4g}"), warmup


def write_plan(spec_path: Path, spec: SweepSpec, sweep_dir: Path) -> list[PlannedRun]:
    """Configs, jobs.txt and plan.json under `sweep_dir`; returns the runs in order."""
    runs, configs = plan_runs(spec, sweep_dir)
    (sweep_dir / "configs").mkdir(parents=True, exist_ok=True)
    (sweep_dir / "spec.yaml").write_text(spec_path.read_text())
    for run in runs:
        Path(run.config_path).write_text(to_yaml(configs[run.name]))
    (sweep_dir / JOBS_FILE).write_text("".join(job_line(run) + "\n" for run in runs))
    plan = {"spec": str(spec_path.resolve()), "name": spec.name, "params_counted": spec.shape.params,
            "target_flops": spec.target_flops, "runs": [dataclasses.asdict(run) for run in runs]}
    (sweep_dir / PLAN_FILE).write_text(json.dumps(plan, indent=1) + "\n")
    return runs


def job_line(run: PlannedRun) -> str:
    """One cluster job: train, then score the final checkpoint (run from the repository root)."""
    return (f"python -m train.pretrain {run.config_path} && "
            f"python -m train.scaling_laws evaluate {run.run_dir}")


def plan_table(runs: Sequence[PlannedRun], spec: SweepSpec) -> str:
    lines = [f"{'run':<24} {'N':>9} {'N_total':>9} {'shape d×L h/kv ffn':>20} {'steps':>6} {'D':>9} "
             f"{'C':>9} {'D/N':>6} {'C/6ND':>5} {'lr':>8} {'warm':>5}"]
    for run in runs:
        shape = f"{run.dim}×{run.n_layers} {run.n_heads}/{run.n_kv_heads} {run.hidden_dim}"
        lines.append(f"{run.name:<24} {run.params:9.3g} {run.total_params:9.3g} {shape:>20} {run.steps:6d} "
                     f"{run.tokens:9.3g} {run.flops:9.3g} {run.tokens / run.params:6.1f} {run.six_nd_ratio:5.2f} "
                     f"{run.lr:8.2g} {run.warmup_steps:5d}")
    total = sum(run.flops for run in runs)
    lines.append(f"{len(runs)} runs · N counted as {spec.shape.params} · {total:.3g} training FLOPs in all")
    if spec.flops_per_second:
        seconds = total / spec.flops_per_second + spec.overhead_seconds * len(runs)
        duration = f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.0f} hours"
        lines.append(f"estimated time at {spec.flops_per_second:.3g} FLOP/s + {spec.overhead_seconds:g} s per run: "
                     f"{duration} (one run at a time)")
    return "\n".join(lines)


# ── Running ─────────────────────────────────────────────────────────────────────────────────────────────────────
def load_plan(sweep_dir: Path) -> tuple[dict, list[PlannedRun]]:
    path = sweep_dir / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"{sweep_dir} holds no {PLAN_FILE}: plan or run a sweep spec into it first")
    plan = json.loads(path.read_text())
    return plan, [_rerooted(PlannedRun(**run), sweep_dir) for run in plan["runs"]]


def _rerooted(run: PlannedRun, sweep_dir: Path) -> PlannedRun:
    """The run as found under `sweep_dir`: plan.json records absolute paths, so a sweep directory that was moved or
    renamed would otherwise read (or miss) the runs at its old location — or another sweep's, if one took its place."""
    sweep_dir = sweep_dir.resolve()
    if Path(run.run_dir).parent == sweep_dir / "runs":
        return run
    return dataclasses.replace(run, run_dir=str(sweep_dir / "runs" / run.name),
                               config_path=str(sweep_dir / "configs" / f"{run.name}.yaml"))


def trained_step(run: PlannedRun) -> int | None:
    """The newest complete checkpoint's step, or None."""
    from llama_jax.convert.native import latest_run_checkpoint

    if not (Path(run.run_dir) / "checkpoints").is_dir():
        return None
    try:
        return latest_run_checkpoint(run.run_dir)[0]
    except LlamaJaxError:
        return None


def run_sweep(runs: Sequence[PlannedRun], log=print) -> list[str]:
    """Train and evaluate each run not yet complete, one after another; returns the names of runs that failed."""
    failed = []
    started = time.monotonic()
    for index, run in enumerate(runs, start=1):
        where = f"[{index}/{len(runs)}] {run.name}"
        if _final_eval(run) is not None:
            log(f"{where}: complete, skipped")
            continue
        timing = _read_json(Path(run.run_dir) / TIMING_FILE) or {}
        if trained_step(run) != run.steps:
            log(f"{where}: training {run.steps} steps (N={run.params:.3g}, D={run.tokens:.3g}, C={run.flops:.3g})")
            seconds, status = _train(run)
            timing["train_seconds"] = timing.get("train_seconds", 0.0) + seconds
            _write_json(Path(run.run_dir) / TIMING_FILE, timing)
            if status != 0 or trained_step(run) != run.steps:
                log(f"{where}: training failed (exit status {status}); see {Path(run.run_dir) / 'train.log'}")
                failed.append(run.name)
                continue
        start = time.monotonic()
        try:
            result = evaluate_run(Path(run.run_dir))
        except LlamaJaxError as error:
            log(f"{where}: evaluation failed: {error}")
            failed.append(run.name)
            continue
        timing["eval_seconds"] = time.monotonic() - start
        _write_json(Path(run.run_dir) / TIMING_FILE, timing)
        log(f"{where}: {result['bits_per_byte']:.4f} bits/byte (train {timing.get('train_seconds', 0):.0f} s, "
            f"eval {timing['eval_seconds']:.0f} s; sweep {(time.monotonic() - started) / 60:.1f} min)")
    return failed


def _train(run: PlannedRun) -> tuple[float, int]:
    """`python -m train.pretrain CONFIG` in a subprocess (a run is one process, as on a cluster); its output
    goes to <run_dir>/train.log. Resumes from the run's checkpoint if an earlier attempt was interrupted."""
    Path(run.run_dir).mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    # SIGTERM stops the sweep like Ctrl-C does (JAX, once imported for an evaluation, may have claimed the signal).
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    with open(Path(run.run_dir) / "train.log", "a") as log_file:
        # Its own session: a Ctrl-C at the terminal reaches only this runner, which passes on exactly one SIGTERM
        # (a second signal would make the training program abort without saving).
        process = subprocess.Popen([sys.executable, "-m", "train.pretrain", run.config_path], cwd=REPO,
                                   stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = process.wait()
        except BaseException:
            # The run saves a checkpoint on SIGTERM and stops: running the sweep again resumes it.
            process.terminate()
            process.wait()
            raise
    return time.monotonic() - start, status


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


# ── Final evaluation ────────────────────────────────────────────────────────────────────────────────────────────
def evaluate_run(run_dir: Path, batch_size: int | None = None, batches: int | None = None) -> dict:
    """Score the run's final checkpoint on one whole pass over its validation split (the default corpus's, or
    data.valid_path / the held-out files of data.path) and write <run_dir>/final_eval.json."""
    from llama_jax.convert import load
    from llama_jax.convert.native import latest_run_checkpoint
    from llama_jax.pretraining_data import prepare_pretraining_data
    from llama_jax.scoring import Scorer, evaluate_perplexity
    from llama_jax.sharding import make_mesh

    run_dir = Path(run_dir).resolve()  # Orbax's metadata reader finds nothing under a relative path
    config = load_config(run_dir / "config.yaml")
    step, _ = latest_run_checkpoint(run_dir)
    if step != config.train.steps:
        raise ConfigError(f"{run_dir}: the newest checkpoint is step {step}, not the final step {config.train.steps}")
    settings = _eval_settings(run_dir)
    batch_size = batch_size or settings.get("batch_size", 32)
    batches = batches if batches is not None else settings.get("batches")
    data = prepare_pretraining_data(config, run_dir)
    mesh = make_mesh(1, -1, 1)
    scorer = Scorer.place(load(run_dir, mesh=mesh), mesh)
    result = evaluate_perplexity(scorer, data.valid, seq_len=config.train.seq_len, batch_size=batch_size,
                                 seed=config.seed, document_masking=config.train.document_masking,
                                 num_batches=batches, text_bytes=validation_text_bytes(config),
                                 progress=False)
    record = {"step": step, "eval_loss_metrics": final_metrics_eval_loss(run_dir), **result.to_dict()}
    _write_json(run_dir / FINAL_EVAL_FILE, record)
    return record


def _eval_settings(run_dir: Path) -> dict:
    """The sweep's final_eval settings, from the spec copy two levels up (sweep/runs/<run>), if any."""
    spec_copy = run_dir.parent.parent / "spec.yaml"
    if spec_copy.is_file():
        return (yaml.safe_load(spec_copy.read_text()) or {}).get("final_eval") or {}
    return {}


def validation_text_bytes(config: RunConfig) -> int:
    """UTF-8 bytes of the text the training program validates on (as prepare_pretraining_data splits it)."""
    from llama_jax.data import default_corpus
    from llama_jax.scoring import count_text_bytes

    if config.data.path is None:
        return count_text_bytes(default_corpus("valid"))
    if config.data.valid_path is not None:
        return count_text_bytes(config.data.valid_path)
    return count_text_bytes(config.data.path, part="valid")


def final_metrics_eval_loss(run_dir: Path) -> float | None:
    records = _metrics(run_dir)
    losses = [record["eval_loss"] for record in records if "eval_loss" in record]
    return float(losses[-1]) if losses else None


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steady_step_seconds(run_dir: Path, tokens: int) -> float | None:
    """The run's training time at its steady throughput: tokens / median tokens_per_sec of the logged intervals
    after the first (whose interval includes compilation). None when too few intervals were logged."""
    speeds = [r["tokens_per_sec"] for r in _metrics(run_dir) if "tokens_per_sec" in r and "event" not in r]
    if len(speeds) < 2:
        return None
    return tokens / statistics.median(speeds[1:])


def _final_eval(run: PlannedRun) -> dict | None:
    record = _read_json(Path(run.run_dir) / FINAL_EVAL_FILE)
    return record if record is not None and record.get("step") == run.steps else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(temporary, path)


# ── Collecting and fitting ──────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class CollectedRun:
    plan: PlannedRun
    bits_per_byte: float
    loss: float  # nats per token over the same whole validation pass
    metrics_eval_loss: float | None  # the training program's last eval_loss (eval.batches batches)
    train_seconds: float | None
    eval_seconds: float | None
    steady_seconds: float | None


def collect(runs: Sequence[PlannedRun], evaluate_missing: bool = True, log=print) -> list[CollectedRun]:
    """Each trained run's final evaluation (computed now if missing); runs not trained are reported and left out."""
    collected = []
    for run in runs:
        record = _final_eval(run)
        if record is None and evaluate_missing and trained_step(run) == run.steps:
            log(f"{run.name}: evaluating the final checkpoint")
            try:
                record = evaluate_run(Path(run.run_dir))
            except LlamaJaxError as error:
                log(f"{run.name}: evaluation failed ({error}); left out")
        if record is None:
            log(f"{run.name}: not complete (no final checkpoint at step {run.steps}); left out")
            continue
        timing = _read_json(Path(run.run_dir) / TIMING_FILE) or {}
        collected.append(CollectedRun(run, float(record["bits_per_byte"]), float(record["loss"]),
                                      record.get("eval_loss_metrics"), timing.get("train_seconds"),
                                      timing.get("eval_seconds"), steady_step_seconds(Path(run.run_dir), run.tokens)))
    return collected


def to_results(collected: Sequence[CollectedRun], metric: str, params: str):
    """RunResults for llama_jax.scaling: N as counted, D trained, C spent, budget nominal; diverged runs left out."""
    from llama_jax.scaling import RunResult

    results = []
    for run in collected:
        loss = {"bpb": run.bits_per_byte, "loss": run.loss}[metric]
        if not math.isfinite(loss):
            continue
        n = {"non_embedding": run.plan.non_embedding_params, "total": run.plan.total_params}[params]
        results.append(RunResult(params=float(n), tokens=float(run.plan.tokens), loss=loss, flops=run.plan.flops,
                                 name=run.plan.name, budget=run.plan.budget))
    return results


@dataclass
class FitOutcome:
    report: str
    plots: dict[str, Path]
    isoflop: Any = None
    parametric: Any = None


def fit_sweep(collected: Sequence[CollectedRun], out_dir: Path, target_flops: float | None, metric: str = "bpb",
              params: str = "non_embedding", parametric: bool = True, n_bootstrap: int = 200,
              min_steps: int = 0, neighbours: int | None = 2) -> FitOutcome:
    """IsoFLOP and parametric fits with what the runs support; the report says what could not be fitted and why."""
    from llama_jax import scaling

    fitted_runs = [run for run in collected if run.plan.steps >= min_steps]
    results = to_results(fitted_runs, metric, params)
    if not results:
        raise scaling.ScalingFitError("no complete runs with a finite loss to fit")
    if target_flops is None:
        target_flops = 10 * max(run.budget for run in results)
    notes: list[str] = []
    if len(fitted_runs) < len(collected):
        left_out = sorted({run.plan.name for run in collected} - {run.plan.name for run in fitted_runs})
        notes.append(f"left out of the fits (fewer than {min_steps} steps): {', '.join(left_out)}")
    isoflop = _try(lambda: scaling.fit_isoflop(results, on_bad_profile="skip", neighbours=neighbours), "IsoFLOP fit",
                   notes)
    if isoflop is None:
        notes += [line for line in _single_profiles(results, neighbours)
                  if line.removeprefix("no profile: ") not in notes[-1]]
    fitted, degenerate = None, None
    if parametric:
        fitted = _try(lambda: scaling.fit_parametric(results, n_bootstrap=n_bootstrap), "parametric fit", notes)
    else:
        notes.append("parametric fit: not requested (--no-parametric)")
    if fitted is not None and not _has_optimum(fitted, target_flops):
        # A law whose loss does not fall with both N and D has no compute-optimal allocation to report or plot.
        degenerate, fitted = fitted, None
        notes.append(f"parametric fit: degenerate (alpha={degenerate.alpha:.3g}, beta={degenerate.beta:.3g}): over "
                     "these runs the loss does not fall as a power of both N and D, so the law gives no "
                     "compute-optimal N and D; it is shown above but left out of the allocation and the plots")
    sections = [run_table(collected, metric, params)]
    if isoflop is not None or fitted is not None:
        sections.append(scaling.format_report(isoflop, fitted, target_flops).rstrip("\n"))
    if degenerate is not None:
        sections.append("[degenerate] " + scaling.format_report(None, degenerate).rstrip("\n"))
    sections.append("\n".join(notes + _counting_notes(collected, params, metric)))
    report = "\n\n".join(section for section in sections if section) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.txt").write_text(report)
    _write_results_csv(collected, out_dir / "results.csv")
    plots = scaling.save_plots(results, isoflop, fitted, out_dir, target_flops)
    return FitOutcome(report, plots, isoflop, fitted)


def _has_optimum(fit, flops: float) -> bool:
    """Positive exponents and a finite compute-optimal N and D at `flops` (and where the fits were made)."""
    from llama_jax.scaling import parametric_optimum

    if not (fit.alpha > 0 and fit.beta > 0):
        return False
    params, tokens = parametric_optimum(fit.parameters(), np.array([fit.flops_range[0], flops]))
    return bool(np.all(np.isfinite(params)) and np.all(np.isfinite(tokens)) and np.all(params > 0))


def _try(fit, what: str, notes: list[str]):
    from llama_jax.scaling import ScalingFitError

    try:
        return fit()
    except ScalingFitError as error:
        notes.append(f"{what}: not possible: {error}")
        return None


def _single_profiles(results, neighbours: int | None) -> list[str]:
    """Without an IsoFLOP power law (too few budgets or runs), each budget's own parabola is still informative."""
    from llama_jax.scaling import ScalingFitError, fit_profile, group_by_budget

    lines = []
    for budget, runs in group_by_budget(results):
        try:
            profile = fit_profile(runs, budget, neighbours)
            lines.append(f"IsoFLOP profile at C={budget:.3g}: N_opt={profile.optimal_params:.3g}, "
                         f"D_opt={profile.optimal_tokens:.3g}, loss there {profile.optimal_loss:.4f}")
        except ScalingFitError as error:
            lines.append(f"no profile: {error}")
    return lines


def _counting_notes(collected: Sequence[CollectedRun], params: str, metric: str) -> list[str]:
    ratios = [run.plan.flops / (6.0 * (run.plan.non_embedding_params if params == "non_embedding"
                                       else run.plan.total_params) * run.plan.tokens) for run in collected]
    unit = "bits per byte (whole validation pass)" if metric == "bpb" else "nats per token (whole validation pass)"
    return [f"Loss = final validation {unit}; N = {params.replace('_', '-')} parameters; C = flops_per_token × D "
            f"(block and head matmuls + attention), C/(6ND) = {min(ratios):.2f}-{max(ratios):.2f} over the runs. "
            "The parametric allocation assumes C = 6ND in this N, so where C/(6ND) > 1 it over-states the "
            "N and D a budget buys."]


def run_table(collected: Sequence[CollectedRun], metric: str, params: str) -> str:
    lines = [f"Runs ({len(collected)}; fits use {metric}, N = {params})",
             f"  {'run':<24} {'budget':>8} {'N_nonemb':>9} {'N_total':>9} {'D':>9} {'C':>9} {'D/N':>6} "
             f"{'bpb':>7} {'loss':>7} {'eval_loss':>9} {'train s':>8} {'steady s':>8}"]
    for run in sorted(collected, key=lambda r: (r.plan.budget, r.plan.params)):
        plan = run.plan
        lines.append(
            f"  {plan.name:<24} {plan.budget:8.2g} {plan.non_embedding_params:9.3g} {plan.total_params:9.3g} "
            f"{plan.tokens:9.3g} {plan.flops:9.3g} {plan.tokens / plan.params:6.1f} {run.bits_per_byte:7.4f} "
            f"{run.loss:7.4f} {_number(run.metrics_eval_loss, 9, 4)} {_number(run.train_seconds, 8, 0)} "
            f"{_number(run.steady_seconds, 8, 0)}")
    train = [r.train_seconds for r in collected if r.train_seconds is not None]
    steady = [r.steady_seconds for r in collected if r.steady_seconds is not None]
    evals = [r.eval_seconds for r in collected if r.eval_seconds is not None]
    lines.append(f"  time: training processes {sum(train) / 60:.1f} min (steady-state steps {sum(steady) / 60:.1f} "
                 f"min), final evaluations {sum(evals) / 60:.1f} min")
    return "\n".join(lines)


def _number(value: float | None, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def _write_results_csv(collected: Sequence[CollectedRun], path: Path) -> None:
    columns = ["name", "budget", "non_embedding_params", "total_params", "dim", "n_layers", "n_heads",
               "n_kv_heads", "hidden_dim", "steps", "tokens", "flops", "lr", "warmup_steps"]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns + ["bits_per_byte", "loss", "metrics_eval_loss", "train_seconds", "eval_seconds",
                                   "steady_seconds"])
        for run in collected:
            plan = dataclasses.asdict(run.plan)
            writer.writerow([plan[c] for c in columns] + [run.bits_per_byte, run.loss, run.metrics_eval_loss,
                                                          run.train_seconds, run.eval_seconds, run.steady_seconds])


def default_sweep_dir(spec: SweepSpec) -> Path:
    return Path("runs") / f"scaling-{spec.name}"
