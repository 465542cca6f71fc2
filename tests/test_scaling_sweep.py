"""Scaling-law sweeps (llama_jax.scaling_sweep, `python -m train.scaling_laws`): run planning by hand-checkable rules,
a micro sweep end to end (plan → train → evaluate → fit, resumable), and collection + fitting on run directories whose
losses follow a known law."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from llama_jax import scaling_sweep as sweep
from llama_jax.config import ModelConfig, load_config
from llama_jax.errors import ConfigError
from train import scaling_laws as program

REPO = Path(__file__).resolve().parents[1]


def write_spec(path: Path, **changes) -> Path:
    spec = {
        "name": "t",
        "base": str(REPO / "configs" / "tiny.yaml"),
        "config": {"model": {"vocab_size": 320, "dtype": "float32", "remat_policy": "none", "max_seq_len": 64},
                   "train": {"seq_len": 32, "batch_size": 4, "log_every_steps": 2, "peak_tflops": 1},
                   "eval": {"batches": 1}, "checkpoint": {"every_steps": 0, "keep": 1}},
        "budgets": [2.0e8],
        "sizes": [1.3e4, 2.7e4, 5.3e4],
        "shape": {"aspect_ratio": 48, "head_dim": 16, "dim_multiple": 16, "multiple_of": 16},
        "schedule": {"lr": 1e-2, "reference_dim": 32, "lr_width_exponent": 0.5, "warmup_fraction": 0.1,
                     "min_warmup_steps": 1, "min_lr_ratio": 0.1},
        "final_eval": {"batch_size": 8},
    }
    spec.update(changes)
    path.write_text(yaml.safe_dump(spec))
    return path


# ── Planning ────────────────────────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("target", [2e4, 1e5, 1e6, 3e8])
def test_shapes_land_near_the_target_size_with_the_aspect_ratio(target):
    base = ModelConfig(vocab_size=1024, max_seq_len=256)
    rule = sweep.ShapeRule(aspect_ratio=64, head_dim=32, dim_multiple=16, multiple_of=32)
    model = sweep.shape_for(target, base, rule)
    non_embedding = model.num_params() - 2 * model.vocab_size * model.dim
    assert sweep.counted_params(model, "non_embedding") == non_embedding
    assert 1 / 1.5 <= non_embedding / target <= 1.5
    assert model.dim % 16 == 0 and model.head_dim % 2 == 0 and model.vocab_size == 1024
    assert model.ffn_hidden_dim is None and model.hidden_dim % 32 == 0  # Meta's rule: 8/3·dim rounded up
    if target >= 1e6:  # small models are too coarse-grained in depth to hold the ratio
        assert 32 <= model.dim / model.n_layers <= 128


def test_plan_matches_tokens_schedule_and_job_list_to_each_budget(tmp_path):
    spec_path = write_spec(tmp_path / "spec.yaml", budgets=[1e10, 4e10], sizes={"ladder": {"count": 3, "factor": 2}})
    spec = sweep.load_spec(spec_path)
    runs = sweep.write_plan(spec_path, spec, tmp_path / "sweep")
    assert {run.budget for run in runs} == {1e10, 4e10}
    jobs = (tmp_path / "sweep" / "jobs.txt").read_text().splitlines()
    assert len(jobs) == len(runs) >= 4
    for run, job in zip(runs, jobs, strict=True):
        config = load_config(run.config_path)
        model, train, optimizer = config.model, config.train, config.optimizer
        # Tokens are what the budget buys at this model's real FLOPs per token, in whole steps.
        assert run.tokens == train.steps * train.batch_size * train.seq_len
        assert run.flops == pytest.approx(model.flops_per_token(train.seq_len) * run.tokens)
        assert abs(run.flops - run.budget) <= model.flops_per_token(train.seq_len) * train.batch_size * train.seq_len
        # Schedule fitted to the run: lr by width, warmup 10% of its steps, cosine to 10% at its own end.
        assert optimizer.lr == pytest.approx(1e-2 * math.sqrt(32 / model.dim), rel=1e-3)
        assert optimizer.warmup_steps == max(1, round(0.1 * train.steps))
        assert optimizer.min_lr_ratio == 0.1 and config.eval.every_steps == train.steps
        assert config.run_dir == run.run_dir and model.vocab_size == 320
        assert job == f"python -m train.pretrain {run.config_path} && python -m train.scaling_laws evaluate " \
                      f"{run.run_dir}"
    plan = json.loads((tmp_path / "sweep" / "plan.json").read_text())
    assert [entry["name"] for entry in plan["runs"]] == [run.name for run in runs]


def test_ladder_is_centred_on_twenty_tokens_per_parameter():
    sizes = sweep.SizeRule(ladder_count=3, ladder_factor=4.0).targets(1.2e12)
    assert sizes == pytest.approx([1e5 / 4, 1e5, 4e5])  # sqrt(1.2e12 / (6 · 20)) = 1e5


@pytest.mark.parametrize("change, message", [
    ({"budgets": [-1]}, "budgets must be positive"),
    ({"shape": {"aspect": 3}}, "unknown keys ['aspect']"),
    ({"bugdets": [1e9]}, "unknown keys ['bugdets']"),
    ({"base": "nowhere.yaml"}, "base config 'nowhere.yaml' not found"),
])
def test_spec_mistakes_are_named(tmp_path, change, message):
    with pytest.raises(ConfigError, match=None) as error:
        sweep.load_spec(write_spec(tmp_path / "spec.yaml", **change))
    assert message in str(error.value)


def test_the_shipped_specs_plan(tmp_path):
    cpu = sweep.load_spec(REPO / "configs" / "scaling" / "cpu.yaml")
    runs, _ = sweep.plan_runs(cpu, tmp_path)
    per_budget = {budget: [run for run in runs if run.budget == budget] for budget in cpu.budgets}
    assert len(per_budget) >= 3 and all(len(group) >= 4 for group in per_budget.values())
    assert all(3e4 <= run.total_params <= 3e6 for run in runs)
    gpu = sweep.load_spec(REPO / "configs" / "scaling" / "gpu.yaml")
    assert gpu.budgets[0] == 1e18 and gpu.target_flops == 1e21
    model = sweep.shape_for(gpu.sizes.targets(1e19)[2], load_config(gpu.base, list(gpu.overrides)).model, gpu.shape)
    assert model.vocab_size == 32000 and model.head_dim == 64 and 1e8 < model.num_params() < 1e9


# ── A micro sweep end to end ────────────────────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def micro_data(tmp_path_factory):
    from llama_jax.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("micro_data")
    lines = [f"def f_{i}(x):\n    return x * {i % 7} + {i % 13}  # line {i}\n" for i in range(600)]
    (root / "train.txt").write_text("".join(lines))
    (root / "valid.txt").write_text("".join(lines[::5]))
    tokenizer = train_sentencepiece([root / "train.txt"], root / "tok.model", vocab_size=300)
    return root, tokenizer.path


def run_sweep_program(args, tmp_path, timeout=600):
    # One device per training process (the test session simulates 8, which only slows tiny runs down).
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["LLAMA_JAX_CACHE"] = str(tmp_path / "cache")
    return subprocess.run([sys.executable, "-m", "train.scaling_laws", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_micro_sweep_plans_trains_collects_and_fits(tmp_path, micro_data):
    root, tokenizer_path = micro_data
    spec = write_spec(tmp_path / "micro.yaml")
    config = yaml.safe_load(spec.read_text())
    config["config"]["data"] = {"path": str(root / "train.txt"), "valid_path": str(root / "valid.txt"),
                                "tokenizer": str(tokenizer_path)}
    spec.write_text(yaml.safe_dump(config))
    out = tmp_path / "sweep"

    result = run_sweep_program(["all", str(spec), "--out", str(out)], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _, runs = sweep.load_plan(out)
    assert len(runs) == 3 and len({run.dim for run in runs}) == 3
    for run in runs:
        record = json.loads((Path(run.run_dir) / "final_eval.json").read_text())
        assert record["step"] == run.steps >= 2 and record["bytes_exact"]
        assert 0 < record["bits_per_byte"] < 9 and math.isfinite(record["eval_loss_metrics"])
        # bits per byte and nats per token describe the same pass over the validation text
        assert record["bits_per_byte"] == pytest.approx(record["nats"] / math.log(2) / record["text_bytes"])
    report = (out / "fit" / "report.txt").read_text()
    assert report == result.stdout[result.stdout.index("Runs (3;"):].split("plots: ")[0]
    assert all(run.name in report for run in runs)
    # Three runs at one budget: no power law, but the budget's own parabola is tried and the reason given.
    assert "IsoFLOP fit: not possible" in report and "parametric fit: not possible" in report
    assert "IsoFLOP profile at" in report
    assert (out / "fit" / "loss_vs_flops.png").stat().st_size > 0
    assert len((out / "fit" / "results.csv").read_text().splitlines()) == 4

    again = run_sweep_program(["run", str(spec), "--out", str(out)], tmp_path)  # resumable: nothing left to do
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("complete, skipped") == 3 and "steps (N=" not in again.stdout


# ── Collection and fitting on known losses ──────────────────────────────────────────────────────────────────────
def synthetic_sweep(tmp_path: Path, bits_per_byte) -> tuple[Path, list]:
    """A planned sweep whose run directories hold final evaluations from `bits_per_byte(N, D)`, without training."""
    spec_path = write_spec(tmp_path / "spec.yaml", budgets=[1e12, 4e12, 1.6e13],
                           sizes={"ladder": {"count": 5, "factor": 2.0}},
                           shape={"aspect_ratio": 64, "head_dim": 32, "dim_multiple": 16, "multiple_of": 32},
                           config={"model": {"vocab_size": 256, "max_seq_len": 128},
                                   "train": {"seq_len": 128, "batch_size": 16}},
                           target_flops=1e14)
    out = tmp_path / "sweep"
    runs = sweep.write_plan(spec_path, sweep.load_spec(spec_path), out)
    for run in runs:
        bpb = bits_per_byte(run.non_embedding_params, run.tokens)
        Path(run.run_dir).mkdir(parents=True)
        (Path(run.run_dir) / "final_eval.json").write_text(json.dumps(
            {"step": run.steps, "bits_per_byte": bpb, "loss": bpb * 2.0, "eval_loss_metrics": bpb * 2.1}))
    return out, runs


def expected_isoflop_exponents(runs, law) -> tuple[float, float]:
    """The slope of ln N_opt against ln C (numpy parabola vertices, and the exact minimum of the law along each
    budget's runs, FLOPs per token interpolated between them)."""
    def loss(n, d):
        return law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]

    budgets: dict[float, list] = {}
    for run in runs:
        budgets.setdefault(run.budget, []).append(run)
    log_flops, vertices, valleys = [], [], []
    for budget, group in sorted(budgets.items()):
        group.sort(key=lambda run: run.non_embedding_params)
        log_n = np.log([run.non_embedding_params for run in group])
        losses = np.array([loss(run.non_embedding_params, run.tokens) for run in group])
        best = int(np.argmin(losses))
        chosen = slice(max(0, best - 2), best + 3)
        a, b, _ = np.polyfit(log_n[chosen], losses[chosen], 2)
        vertices.append(-b / (2 * a))
        grid = np.linspace(log_n[0], log_n[-1], 20001)
        flops_per_token = np.exp(np.interp(grid, log_n, np.log([run.flops_per_token for run in group])))
        valleys.append(grid[np.argmin(loss(np.exp(grid), budget / flops_per_token))])
        log_flops.append(np.log(np.mean([run.flops for run in group])))
    return float(np.polyfit(log_flops, vertices, 1)[0]), float(np.polyfit(log_flops, valleys, 1)[0])


def test_fit_recovers_a_known_law_from_run_directories(tmp_path, capsys):
    """Run directories whose final evaluations follow L = E + A/N^α + B/D^β: collection and both fits see it."""
    # Equal exponents put the optimum at D/N = (B/A)^(1/α) = 20, where the ladder is centred.
    law = {"E": 0.8, "A": 100.0, "B": 100.0 * 20**0.32, "alpha": 0.32, "beta": 0.32}
    out, runs = synthetic_sweep(tmp_path, lambda n, d: law["E"] + law["A"] / n ** law["alpha"]
                                + law["B"] / d ** law["beta"])
    assert program.main(["fit", str(out), "--bootstrap", "8"]) == 0
    printed = capsys.readouterr().out
    report = (out / "fit" / "report.txt").read_text()
    assert report in printed and f"Runs ({len(runs)};" in report
    assert "Compute-optimal allocation for C = 1e+14" in report
    alpha = float(report.split("alpha = ")[1].split()[0])
    beta = float(report.split("beta  = ")[1].split()[0])
    assert alpha == pytest.approx(0.32, abs=0.01) and beta == pytest.approx(0.32, abs=0.01)
    # The IsoFLOP minima follow the same law: N_opt ∝ C^(β/(α+β)) = C^0.5, up to how the real C differs from 6ND
    # (the head's share of the FLOPs shrinks as models grow) and to the parabola's fit of a power-law valley. Both
    # are derived here independently: numpy parabolas through each budget's lowest loss and two sizes either side
    # (what the report's a must equal, to its printed digits), and the law's true valley along each budget with
    # the runs' real FLOPs per token (which the parabolas approximate).
    exponent = float(report.split("N_opt ∝ C^a: a = ")[1].split()[0])
    by_parabolas, by_valley = expected_isoflop_exponents(runs, law)
    assert exponent == pytest.approx(by_parabolas, abs=0.006)
    assert abs(exponent - by_valley) < 0.05
    for name in ("loss_vs_flops", "isoflop_profiles", "compute_frontier"):
        assert (out / "fit" / f"{name}.png").stat().st_size > 0
    table = np.genfromtxt(out / "fit" / "results.csv", delimiter=",", names=True, dtype=None, encoding=None)
    assert len(table) == len(runs)


def test_a_law_without_an_optimum_is_reported_but_not_plotted(tmp_path):
    """Losses that grow with N at a fixed budget (as runs stuck on the initial plateau give): the parametric fit
    has a non-positive exponent, is shown as degenerate, and the report and plots are still written."""
    out, runs = synthetic_sweep(tmp_path, lambda n, d: 1.0 + 0.01 * n ** 0.3 + 50.0 / d ** 0.3)
    min_steps = min(run.steps for run in runs) + 1  # leaves the shortest run out
    assert program.main(["fit", str(out), "--bootstrap", "4", "--min-steps", str(min_steps)]) == 0
    report = (out / "fit" / "report.txt").read_text()
    assert "parametric fit: degenerate" in report and "[degenerate] Parametric fit" in report
    assert "IsoFLOP fit: not possible" in report  # every budget's best model is its smallest
    short = sorted(run.name for run in runs if run.steps < min_steps)
    assert len(short) == 1 and f"left out of the fits (fewer than {min_steps} steps): {short[0]}" in report
    assert f"Runs ({len(runs)};" in report  # the table still lists every run
    assert (out / "fit" / "loss_vs_flops.png").is_file()


def test_a_budget_that_does_not_bracket_its_optimum_is_reported_and_left_out(tmp_path):
    """At the largest budget the losses still fall at the largest model: that budget is named, with the fix, in the
    report; the IsoFLOP fit uses the other two, and the profiles' table says how many runs each parabola used."""
    law = lambda n, d: 0.8 + 100.0 / n ** 0.32 + 100.0 * 20**0.32 / d ** 0.32  # noqa: E731
    out, runs = synthetic_sweep(tmp_path, law)
    largest = max(run.budget for run in runs)
    for run in runs:
        if run.budget == largest:  # falling with N: the optimum lies beyond the sampled sizes
            (Path(run.run_dir) / "final_eval.json").write_text(json.dumps(
                {"step": run.steps, "bits_per_byte": 3.0 - 0.1 * math.log(run.non_embedding_params), "loss": 1.0}))
    assert program.main(["fit", str(out), "--no-parametric"]) == 0
    report = (out / "fit" / "report.txt").read_text()
    assert f"skipped: IsoFLOP profile at budget C={largest:.3g}: no interior minimum" in report
    assert "add larger models at this budget" in report
    assert "no uncertainty with 2 budgets" in report
    rows = [line.split() for line in report.splitlines() if line.strip().startswith(("1e+12", "4e+12"))]
    assert len(rows) == 2 and all(row[1] in ("4/5", "5/5") for row in rows)
    assert "parabola in ln N per budget, fitted to the lowest loss ± 2 sizes" in report


@pytest.mark.parametrize("text, value", [("2", 2), ("all", None), ("0", "error"), ("x", "error")])
def test_neighbours_option(text, value):
    parser = program.build_parser()
    if value == "error":
        with pytest.raises(SystemExit):
            parser.parse_args(["fit", "somewhere", "--neighbours", text])
    else:
        assert parser.parse_args(["fit", "somewhere", "--neighbours", text]).neighbours == value


def test_a_moved_sweep_directory_reads_its_own_runs(tmp_path):
    """plan.json holds absolute paths; a renamed sweep directory must not read the runs at its old location (which a
    newer sweep may have taken)."""
    law = lambda n, d: 0.8 + 100.0 / n ** 0.32 + 100.0 * 20**0.32 / d ** 0.32  # noqa: E731
    out, runs = synthetic_sweep(tmp_path, law)
    moved = tmp_path / "sweep-renamed"
    out.rename(moved)
    for run in runs:  # a newer sweep at the old location, with other losses
        Path(run.run_dir).mkdir(parents=True)
        (Path(run.run_dir) / "final_eval.json").write_text(json.dumps({"step": run.steps, "bits_per_byte": 9.0,
                                                                       "loss": 9.0}))
    _, loaded = sweep.load_plan(moved)
    assert [Path(run.run_dir) for run in loaded] == [(moved / "runs" / run.name).resolve() for run in runs]
    collected = sweep.collect(loaded, evaluate_missing=False)
    assert len(collected) == len(runs)
    assert all(c.bits_per_byte == pytest.approx(law(c.plan.non_embedding_params, c.plan.tokens)) for c in collected)


def test_the_old_command_names_the_new_one():
    result = subprocess.run([sys.executable, "-m", "scripts.scaling_laws", "fit", "somewhere"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: `python -m scripts.scaling_laws` is now `python -m train.scaling_laws`"]
