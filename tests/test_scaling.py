"""Scaling-law fits recover a known L(N, D) = E + A/N^α + B/D^β from a synthetic, noisy sweep.

The sweep mimics a real IsoFLOP sweep: five budgets a decade apart, seven model sizes per budget
spanning 16× around (deliberately 1.3× off) the true optimum, D = C/(6N), 0.5% multiplicative
noise. Tolerances were chosen so that all of 30 noise seeds pass, not just the seed used here.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from llama_jax.errors import LlamaJaxError
from llama_jax.scaling import (
    CHINCHILLA,
    IsoFlopFit,
    ParametricFit,
    RunResult,
    ScalingFitError,
    fit_isoflop,
    fit_parametric,
    fit_profile,
    format_report,
    group_by_budget,
    optimal_allocation,
    parametric_optimum,
    save_plots,
)

E, A, B, ALPHA, BETA = 1.8, 400.0, 410.0, 0.34, 0.28
TRUE_PARAMS_EXPONENT = BETA / (ALPHA + BETA)  # a = β/(α+β) ≈ 0.452
BUDGETS = (1e17, 1e18, 1e19, 1e20, 1e21)
NAMED_BUDGET = 3e19
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def true_loss(params: np.ndarray | float, tokens: np.ndarray | float) -> np.ndarray | float:
    return E + A / np.power(params, ALPHA) + B / np.power(tokens, BETA)


def true_optimal_params(flops: float) -> float:
    """Analytic N_opt under 6ND = C, written out here independently of the module."""
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    return g * (flops / 6) ** (BETA / (ALPHA + BETA))


def synthetic_sweep(noise: float = 0.005, seed: int = 0, sizes_per_budget: int = 7) -> list[RunResult]:
    rng = np.random.default_rng(seed)
    runs = []
    for budget in BUDGETS:
        centre = 1.3 * true_optimal_params(budget)
        for params in centre * np.geomspace(0.25, 4.0, sizes_per_budget):
            tokens = budget / (6 * params)
            loss = true_loss(params, tokens) * math.exp(noise * rng.standard_normal())
            runs.append(RunResult(params, tokens, loss, name=f"C{budget:.0e}-N{params:.3g}", budget=budget))
    return runs


@pytest.fixture(scope="module")
def sweep() -> list[RunResult]:
    return synthetic_sweep()


@pytest.fixture(scope="module")
def isoflop(sweep) -> IsoFlopFit:
    return fit_isoflop(sweep)


@pytest.fixture(scope="module")
def parametric(sweep) -> ParametricFit:
    return fit_parametric(sweep, n_bootstrap=12, seed=0)


# --- recovery of known exponents ------------------------------------------------------------


def test_parametric_fit_recovers_exponents_and_irreducible_loss(parametric):
    assert parametric.alpha == pytest.approx(ALPHA, abs=0.03)
    assert parametric.beta == pytest.approx(BETA, abs=0.03)
    assert parametric.E == pytest.approx(E, abs=0.1)
    assert parametric.params_exponent == pytest.approx(TRUE_PARAMS_EXPONENT, abs=0.03)


def test_parametric_fit_is_exact_on_noise_free_data():
    fit = fit_parametric(synthetic_sweep(noise=0.0), n_bootstrap=0)
    np.testing.assert_allclose(fit.parameters(), [E, A, B, ALPHA, BETA], rtol=1e-3)


def test_parametric_bootstrap_gives_finite_positive_spreads(parametric):
    assert parametric.bootstrap_samples.shape == (12, 5)
    for name in ("E", "A", "B", "alpha", "beta", "a", "b"):
        assert math.isfinite(parametric.stderr[name]) and parametric.stderr[name] > 0, name


def test_parametric_bootstrap_is_reproducible_from_its_seed(sweep):
    first = fit_parametric(sweep[:21], n_bootstrap=3, seed=7, n_starts=4)
    second = fit_parametric(sweep[:21], n_bootstrap=3, seed=7, n_starts=4)
    np.testing.assert_array_equal(first.bootstrap_samples, second.bootstrap_samples)


def test_isoflop_fit_recovers_allocation_exponents(isoflop):
    assert len(isoflop.profiles) == len(BUDGETS)
    assert isoflop.params_law.exponent == pytest.approx(TRUE_PARAMS_EXPONENT, abs=0.05)
    assert isoflop.tokens_law.exponent == pytest.approx(1 - TRUE_PARAMS_EXPONENT, abs=0.05)
    assert 0 < isoflop.params_law.exponent_stderr < 0.05


def test_isoflop_optimal_tokens_follow_from_six_n_d(isoflop):
    for profile in isoflop.profiles:
        assert profile.optimal_tokens == pytest.approx(profile.budget / (6 * profile.optimal_params), rel=1e-9)


@pytest.mark.parametrize("fit_name", ["isoflop", "parametric"])
def test_optimal_allocation_for_a_named_budget_matches_the_analytic_optimum(fit_name, request):
    allocation = optimal_allocation(request.getfixturevalue(fit_name), NAMED_BUDGET)
    assert allocation.params == pytest.approx(true_optimal_params(NAMED_BUDGET), rel=0.15)
    assert allocation.tokens == pytest.approx(NAMED_BUDGET / (6 * true_optimal_params(NAMED_BUDGET)), rel=0.15)
    assert allocation.params_interval[0] < allocation.params < allocation.params_interval[1]


def test_closed_form_optimum_matches_brute_force_minimisation():
    """A second code path: the minimum of the true L(N, C/(6N)) over a fine grid of N."""
    flops = 1e21
    params = np.geomspace(1e7, 1e12, 200_001)
    brute_force = params[np.argmin(true_loss(params, flops / (6 * params)))]
    closed_form, tokens = parametric_optimum(np.array([E, A, B, ALPHA, BETA]), flops)
    assert closed_form == pytest.approx(brute_force, rel=1e-4)
    assert 6 * closed_form * tokens == pytest.approx(flops)


def plateau_sweep(noise: float, seed: int = 0, budgets=(1e18, 1e19, 1e20, 1e21)) -> list[RunResult]:
    """One ladder of 14 sizes 1.5× apart for every budget (as a CPU sweep has), the optimum moving across it, and
    runs with fewer than 2 tokens per parameter stuck 0.5 above the law (still on the initial loss plateau)."""
    rng = np.random.default_rng(seed)
    ladder = 0.25 * true_optimal_params(1e18) * 1.5 ** np.arange(14)
    runs = []
    for budget in budgets:
        for params in ladder:
            tokens = budget / (6 * params)
            loss = true_loss(params, tokens) + (0.5 if tokens < 2 * params else 0.0)
            runs.append(RunResult(params, tokens, loss * math.exp(noise * rng.standard_normal()), budget=budget))
    return runs


def test_isoflop_fit_around_each_minimum_recovers_the_exponent_despite_plateau_runs():
    """The failure mode of a short CPU sweep: the largest models at each budget sit on the loss plateau. A parabola
    through every size is dragged by them (a ≈ 0.51 here); one through the lowest loss and two sizes either side is
    not. Tolerances hold for every one of 20 noise seeds."""
    runs = plateau_sweep(noise=0.002)
    local = fit_isoflop(runs)
    assert len(local.profiles) == 4 and not local.skipped
    assert local.params_law.exponent == pytest.approx(TRUE_PARAMS_EXPONENT, abs=0.03)
    for profile in local.profiles:
        assert 4 <= profile.fitted.sum() <= 5  # two sizes either side where the ladder has them
        assert profile.optimal_params == pytest.approx(true_optimal_params(profile.budget), rel=0.2)
    every_size = fit_isoflop(runs, neighbours=None)
    assert every_size.params_law.exponent - TRUE_PARAMS_EXPONENT > 0.04
    noise_free = fit_isoflop(plateau_sweep(noise=0.0))
    assert noise_free.params_law.exponent == pytest.approx(TRUE_PARAMS_EXPONENT, abs=0.003)


def test_budget_whose_optimum_is_off_the_ladder_is_skipped_and_reported():
    # At 1e23 the optimum (≈ 1.1e11 parameters) lies beyond the ladder's largest model (≈ 1.1e10).
    runs = plateau_sweep(noise=0.0, budgets=(1e18, 1e19, 1e20, 1e23))
    fit = fit_isoflop(runs, on_bad_profile="skip")
    assert [profile.budget for profile in fit.profiles] == [1e18, 1e19, 1e20]
    assert len(fit.skipped) == 1
    assert "C=1e+23: no interior minimum" in fit.skipped[0] and "add larger models" in fit.skipped[0]
    assert "skipped: IsoFLOP profile at budget C=1e+23: no interior minimum" in format_report(fit, None)
    with pytest.raises(ScalingFitError, match=r"C=1e\+23: no interior minimum"):
        fit_isoflop(runs)


def test_vertex_standard_error_matches_the_scatter_of_vertices_over_noise():
    """A second code path for the parabola's own uncertainty: the spread of N_opt over 400 noisy draws."""
    rng = np.random.default_rng(0)
    log_sizes = math.log(1e8) + np.linspace(-1.0, 1.0, 5)
    truth = 3.0 + 0.2 * (log_sizes - math.log(1e8) - 0.2) ** 2
    vertices, stderrs = [], []
    for _ in range(400):
        losses = truth + 0.005 * rng.standard_normal(5)
        runs = [RunResult(math.exp(x), 1e18 / (6 * math.exp(x)), loss) for x, loss in zip(log_sizes, losses)]
        profile = fit_profile(runs, 1e18)
        vertices.append(math.log(profile.optimal_params))
        stderrs.append(profile.log_params_stderr)
    assert np.mean(vertices) == pytest.approx(math.log(1e8) + 0.2, abs=0.01)
    assert np.std(vertices) == pytest.approx(math.sqrt(np.mean(np.square(stderrs))), rel=0.2)
    three = [RunResult(math.exp(x), 1.0, loss) for x, loss in zip(log_sizes[1:4], truth[1:4])]
    assert math.isnan(fit_profile(three, 1e18).log_params_stderr)


# --- the parabola, by hand ------------------------------------------------------------------


def test_parabola_minimum_hand_computed():
    # Losses 3, 1, 1 at ln N = 10, 11, 12: with x = ln N − 10 the parabola through them is
    # x² − 3x + 3, minimal at x = 1.5 (ln N = 11.5) with loss 0.75.
    budget = 1e15
    runs = [RunResult(math.exp(x), budget / (6 * math.exp(x)), loss) for x, loss in ((10, 3.0), (11, 1.0), (12, 1.0))]
    profile = fit_profile(runs, budget)
    assert math.log(profile.optimal_params) == pytest.approx(11.5)
    assert profile.optimal_loss == pytest.approx(0.75)
    assert profile.optimal_tokens == pytest.approx(budget / (6 * math.exp(11.5)))


# --- run bookkeeping ------------------------------------------------------------------------


def test_flops_default_to_six_n_d_unless_given():
    assert RunResult(1e6, 2e7, 3.0).flops == pytest.approx(6 * 1e6 * 2e7)
    assert RunResult(1e6, 2e7, 3.0, flops=1.5e14).flops == 1.5e14


def test_runs_without_budget_are_grouped_by_nearby_flops():
    sizes_and_flops = ((1, 1.00e18), (2, 1.02e18), (3, 0.99e18), (4, 1e19), (5, 1.01e19))
    runs = [RunResult(n, 1.0, 3.0, flops=c) for n, c in sizes_and_flops]
    groups = group_by_budget(runs)
    assert [sorted(run.params for run in members) for _, members in groups] == [[1, 2, 3], [4, 5]]
    assert groups[0][0] == pytest.approx(1e18, rel=0.02)


# --- errors ---------------------------------------------------------------------------------


def test_errors_are_llama_jax_errors():
    assert issubclass(ScalingFitError, LlamaJaxError)


@pytest.mark.parametrize("fit", [fit_isoflop, lambda runs: fit_parametric(runs, n_bootstrap=0)])
def test_non_finite_loss_names_the_run(sweep, fit):
    runs = list(sweep)
    runs[4] = RunResult(runs[4].params, runs[4].tokens, float("nan"), name="diverged-run", budget=runs[4].budget)
    with pytest.raises(ScalingFitError, match="diverged-run.*loss"):
        fit(runs)


@pytest.mark.parametrize("fit", [fit_isoflop, fit_parametric])
def test_too_few_runs(sweep, fit):
    with pytest.raises(ScalingFitError, match="at least 6 runs, got 4"):
        fit(sweep[:4])


def test_budget_with_too_few_model_sizes_is_named(sweep):
    runs = sweep[:7] + sweep[7:9]  # the second budget keeps only two sizes
    with pytest.raises(ScalingFitError, match=r"C=1e\+18: needs runs at 3 or more model sizes, got 2"):
        fit_isoflop(runs)


def test_downward_parabola_is_named():
    # The lowest loss is interior, but around it the losses form a hump, not a valley (noise, a diverged run).
    sizes_and_losses = ((1e7, 1.0), (1e8, 2.0), (1e9, 0.5), (1e10, 2.0), (1e11, 1.0))
    runs = [RunResult(n, 1e18 / (6 * n), loss, budget=1e18) for n, loss in sizes_and_losses]
    with pytest.raises(ScalingFitError, match=r"C=1e\+18: the parabola fitted to the 5 runs .* opens downward"):
        fit_profile(runs, 1e18)


@pytest.mark.parametrize("losses, edge, fix", [
    ((4.0, 3.2, 2.9), "largest", "add larger models"),  # still falling at the largest model
    ((2.9, 3.2, 4.0), "smallest", "add smaller models"),  # already rising from the smallest
])
def test_budget_without_an_interior_minimum_is_named_with_the_fix(losses, edge, fix):
    runs = [RunResult(n, 1e18 / (6 * n), loss) for n, loss in zip((1e7, 1e8, 1e9), losses)]
    with pytest.raises(ScalingFitError, match=rf"C=1e\+18: no interior minimum: the lowest loss \(2.9\) is at the "
                                              rf"{edge} sampled model size .*{fix} at this budget"):
        fit_profile(runs, 1e18)


def test_a_minimum_flatter_than_the_scatter_is_reported_as_undetermined():
    # Five sizes around a shallow minimum whose losses differ by less than their scatter (as at the CPU sweep's
    # largest budget): the parabola's vertex exists, but its standard error spans more than the sizes fitted.
    sizes_and_losses = ((13408, 2.3953), (21880, 2.4276), (27792, 2.3615), (39592, 2.3913), (53440, 2.3934))
    runs = [RunResult(n, 1e18 / (6 * n), loss) for n, loss in sizes_and_losses]
    with pytest.raises(ScalingFitError, match=r"C=1e\+18: N_opt=.* is undetermined: its standard error .* spans "
                                              r"more than the sizes fitted \[1.34e\+04, 5.34e\+04\]"):
        fit_profile(runs, 1e18)
    # The same valley, deeper than the scatter, is measured.
    deeper = [RunResult(n, 1e18 / (6 * n), loss + 0.5 * math.log(n / 2.8e4) ** 2) for n, loss in sizes_and_losses]
    assert 1.34e4 < fit_profile(deeper, 1e18).optimal_params < 5.35e4


def test_a_convex_fit_cannot_hide_a_minimum_at_the_edge():
    # A least-squares parabola through all four points opens upward with its vertex inside the sampled range
    # (N ≈ 1.5e9), but the lowest loss is at the largest size: the sweep has not bracketed the optimum, and no
    # vertex is reported.
    sizes, losses = (1e7, 1e8, 1e9, 1e10), (4.0, 2.0, 2.1, 1.9)
    curvature, slope, _ = np.polyfit(np.log(sizes), losses, 2)
    assert curvature > 0 and 1e7 < math.exp(-slope / (2 * curvature)) < 1e10
    runs = [RunResult(n, 1e18 / (6 * n), loss) for n, loss in zip(sizes, losses)]
    with pytest.raises(ScalingFitError, match="no interior minimum.*largest"):
        fit_profile(runs, 1e18)
    with pytest.raises(ScalingFitError, match="no interior minimum.*largest"):
        fit_profile(runs, 1e18, neighbours=None)


def test_bad_profiles_can_be_skipped_and_are_reported(sweep):
    falling = [RunResult(n, 1e22 / (6 * n), loss, budget=1e22) for n, loss in ((1e9, 4.0), (1e10, 3.2), (1e11, 2.9))]
    fit = fit_isoflop(list(sweep) + falling, on_bad_profile="skip")
    assert len(fit.profiles) == len(BUDGETS)
    assert len(fit.skipped) == 1 and "C=1e+22" in fit.skipped[0]
    assert "skipped: IsoFLOP profile at budget C=1e+22" in format_report(fit, None)


def test_isoflop_needs_two_budgets(sweep):
    with pytest.raises(ScalingFitError, match="at least 2 compute budgets"):
        fit_isoflop(sweep[:7])


@pytest.mark.parametrize("flops", [0.0, -1e20, float("inf"), float("nan")])
def test_named_budget_must_be_positive_and_finite(isoflop, flops):
    with pytest.raises(ScalingFitError, match="compute budget"):
        optimal_allocation(isoflop, flops)


# --- report and plots -----------------------------------------------------------------------


def test_report_shows_exponents_with_uncertainty_chinchilla_and_allocation(isoflop, parametric):
    report = format_report(isoflop, parametric, target_flops=1e23)
    assert f"a = {isoflop.params_law.exponent:.3f} ± {isoflop.params_law.exponent_stderr:.3f}" in report
    assert f"alpha = {parametric.alpha:.3f} ± {parametric.stderr['alpha']:.3f}" in report
    assert f"Chinchilla {CHINCHILLA.alpha:g}" in report and f"Chinchilla {CHINCHILLA.beta:g}" in report
    assert "C = 1e+23 FLOPs (extrapolated 100× beyond the largest fitted budget 1e+21)" in report
    assert f"N = {optimal_allocation(parametric, 1e23).params:.3g}" in report


def test_plots_are_written_as_png_files(sweep, isoflop, parametric, tmp_path):
    paths = save_plots(sweep, isoflop, parametric, tmp_path / "plots", target_flops=1e22)
    assert set(paths) == {"loss_vs_flops", "isoflop_profiles", "compute_frontier"}
    for path in paths.values():
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, path


def test_two_budgets_give_exponents_without_uncertainty(sweep):
    fit = fit_isoflop(sweep[:14])
    assert len(fit.profiles) == 2 and math.isnan(fit.params_law.exponent_stderr)
    report = format_report(fit, None, target_flops=1e19)
    assert "± n/a  (no uncertainty with 2 budgets)" in report
    assert "(no interval)" in report and "(extrapolated 10× beyond the largest fitted budget 1e+18)" in report
