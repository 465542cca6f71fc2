"""Scaling-law analysis of a sweep's final losses: IsoFLOP profiles and the parametric law L(N, D).

The sweep runner turns each finished run into a `RunResult` (parameters N, training tokens D,
training FLOPs C, final validation loss); this module fits them the two ways Hoffmann et al. (2022,
"Chinchilla") did:

* `fit_isoflop` (their approach 2): at each compute budget, a parabola in log N through the lowest
  loss and its neighbouring sizes (the sizes must bracket the minimum); its vertex is that budget's
  compute-optimal N_opt, and D_opt follows from the runs' own (N, D)
  pairs. Power laws N_opt ∝ C^a and D_opt ∝ C^b are then straight lines in log-log space.
* `fit_parametric` (their approach 3): L(N, D) = E + A/N^α + B/D^β, fitted by minimising a Huber
  loss between log L and log L̂ with L-BFGS from a grid of starting points; uncertainty by bootstrap.

Pure numpy/scipy (matplotlib only inside `save_plots`), so it runs anywhere the runner does.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import optimize, stats
from threadpoolctl import threadpool_limits

from llama_jax.errors import LlamaJaxError

# Forward + backward pass ≈ 6 FLOPs per parameter per token (Kaplan et al. 2020); the C = 6ND
# convention under which the closed-form compute-optimal allocation below holds.
FLOPS_PER_PARAM_PER_TOKEN = 6.0
# An IsoFLOP parabola is fitted to the lowest loss and this many model sizes on each side of it.
DEFAULT_NEIGHBOURS = 2


class ScalingFitError(LlamaJaxError):
    """Runs that cannot support a scaling-law fit: too few, non-finite, or without an interior minimum."""


@dataclass(frozen=True)
class RunResult:
    """One finished run: N parameters trained on D tokens with C FLOPs, reaching `loss`.

    `flops` defaults to 6·N·D; a runner that counts FLOPs itself (attention, embeddings) passes its
    own. `budget` is the nominal compute budget the sweep assigned the run: IsoFLOP profiles group
    runs by it, so runs whose exact FLOPs differ slightly still share one profile.
    """

    params: float
    tokens: float
    loss: float
    flops: float | None = None
    name: str | None = None
    budget: float | None = None

    def __post_init__(self) -> None:
        if self.flops is None:
            try:
                flops = FLOPS_PER_PARAM_PER_TOKEN * float(self.params) * float(self.tokens)
            except (TypeError, ValueError) as error:
                raise ScalingFitError(f"run {self.label}: params and tokens must be numbers") from error
            object.__setattr__(self, "flops", flops)

    @property
    def label(self) -> str:
        """How errors name this run: its name, else its size and token count."""
        if self.name:
            return repr(self.name)
        return f"N={self.params!r}, D={self.tokens!r}"


def _check_runs(runs: Sequence[RunResult], minimum: int, purpose: str) -> None:
    """Every quantity is logged, so each must be finite and positive; say which run is not."""
    if len(runs) < minimum:
        raise ScalingFitError(f"{purpose} needs at least {minimum} runs, got {len(runs)}")
    for run in runs:
        for quantity in ("params", "tokens", "flops", "loss"):
            value = getattr(run, quantity)
            if not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
                raise ScalingFitError(
                    f"run {run.label}: {quantity} is {value!r}, not a finite number"
                    + ("; drop or rerun diverged runs before fitting" if quantity == "loss" else "")
                )
            if value <= 0:
                raise ScalingFitError(f"run {run.label}: {quantity} must be positive, got {value!r}")


# ---------------------------------------------------------------------------------------------
# IsoFLOP profiles (Hoffmann et al. approach 2)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class IsoFlopProfile:
    """One compute budget's runs and the parabola loss = c2·x² + c1·x + c0 in x = ln N − centre.

    `params`, `tokens` and `losses` hold every run of the budget (ordered by N); `fitted` marks the
    ones the parabola was fitted to (the lowest loss and its neighbours). `log_params_stderr` is the
    standard error of ln N_opt from the parabola's own residuals (NaN when it passes exactly
    through its points, as with three), so N_opt is uncertain by a factor exp(±stderr).
    """

    budget: float
    params: np.ndarray
    tokens: np.ndarray
    losses: np.ndarray
    fitted: np.ndarray
    log_params_centre: float
    coefficients: tuple[float, float, float]
    optimal_params: float
    optimal_tokens: float
    optimal_loss: float
    log_params_stderr: float = math.nan

    def predict(self, params: np.ndarray | float) -> np.ndarray:
        """The parabola's loss at model size(s) `params`."""
        return np.polyval(self.coefficients, np.log(params) - self.log_params_centre)

    @property
    def fitted_range(self) -> tuple[float, float]:
        """The smallest and largest N the parabola was fitted to."""
        return float(self.params[self.fitted].min()), float(self.params[self.fitted].max())


@dataclass(frozen=True, eq=False)
class PowerLaw:
    """y = exp(log_coefficient) · C^exponent, fitted by least squares on ln y = log_coefficient + exponent · ln C.

    `covariance` is that regression's 2×2 covariance of (log_coefficient, exponent); `dof` its
    residual degrees of freedom (0 with two budgets, when no uncertainty can be estimated).
    """

    log_coefficient: float
    exponent: float
    covariance: np.ndarray
    dof: int

    @property
    def exponent_stderr(self) -> float:
        return float(math.sqrt(self.covariance[1, 1])) if self.dof > 0 else math.nan

    def __call__(self, flops: np.ndarray | float) -> np.ndarray:
        return np.exp(self.log_coefficient + self.exponent * np.log(flops))

    def interval(self, flops: np.ndarray | float, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Confidence interval of the fitted line at `flops` (t distribution; NaN without residual dof)."""
        design = np.stack([np.ones_like(np.log(flops)), np.log(flops)], axis=-1)
        log_stderr = np.sqrt(np.einsum("...i,ij,...j->...", design, self.covariance, design))
        t_quantile = stats.t.ppf(0.5 + level / 2, self.dof) if self.dof > 0 else math.nan
        centre = np.log(self(flops))
        return np.exp(centre - t_quantile * log_stderr), np.exp(centre + t_quantile * log_stderr)


@dataclass(frozen=True, eq=False)
class IsoFlopFit:
    """Per-budget parabolas and the power laws N_opt ∝ C^a, D_opt ∝ C^b through their minima.

    `skipped` lists the budgets left out (with the reason) when fitted with on_bad_profile="skip".
    """

    profiles: tuple[IsoFlopProfile, ...]
    params_law: PowerLaw
    tokens_law: PowerLaw
    skipped: tuple[str, ...] = ()
    neighbours: int | None = DEFAULT_NEIGHBOURS


def group_by_budget(runs: Sequence[RunResult], relative_tolerance: float = 0.05) -> list[tuple[float, list[RunResult]]]:
    """Runs grouped into compute budgets, smallest first.

    A run's `budget` decides its group when set. Runs without one are grouped by FLOPs: sorted, a
    new group starts once FLOPs exceed the group's first by more than `relative_tolerance`, and the
    group's budget is the geometric mean of its FLOPs.
    """
    groups: dict[float, list[RunResult]] = {}
    for run in runs:
        if run.budget is not None:
            groups.setdefault(float(run.budget), []).append(run)
    current: list[RunResult] = []
    for run in sorted((run for run in runs if run.budget is None), key=lambda run: run.flops):
        if current and run.flops > current[0].flops * (1 + relative_tolerance):
            groups.setdefault(_geometric_mean_flops(current), []).extend(current)
            current = []
        current.append(run)
    if current:
        groups.setdefault(_geometric_mean_flops(current), []).extend(current)
    return sorted(groups.items())


def _geometric_mean_flops(runs: Sequence[RunResult]) -> float:
    return float(np.exp(np.mean(np.log([run.flops for run in runs]))))


def fit_profile(
    runs: Sequence[RunResult], budget: float, neighbours: int | None = DEFAULT_NEIGHBOURS
) -> IsoFlopProfile:
    """Least-squares parabola of loss in ln N through one budget's lowest loss and its neighbours.

    The sizes must bracket the minimum: the lowest loss must lie at an interior size, with a larger
    loss at a smaller and at a larger model. The parabola is then fitted to that size and up to
    `neighbours` sizes on each side of it (None: every size, as Hoffmann et al. did). A parabola is
    only a local description of an IsoFLOP valley: far from the minimum the losses rise as power
    laws (steeply on the large-model side, where runs get few steps), and fitting them all pulls the
    vertex toward the middle of the sampled range, which biases N_opt(C) when one ladder of sizes
    serves every budget.

    Raises ScalingFitError naming the budget when there are fewer than three model sizes, when the
    lowest loss is at the smallest or largest size (no interior minimum: the sweep does not bracket
    the optimum), when the parabola opens downward, when its vertex lies outside the sizes it was
    fitted to, or when the vertex is undetermined: its standard error (from the parabola's
    residuals, with four or more sizes) spans more than the fitted sizes, as when the losses near
    the minimum are flat within their run-to-run scatter.
    """
    where = f"IsoFLOP profile at budget C={budget:.3g}"
    if neighbours is not None and neighbours < 1:
        raise ScalingFitError(f"{where}: neighbours must be at least 1 (or None for every size), got {neighbours!r}")
    ordered = sorted(runs, key=lambda run: run.params)
    params = np.array([run.params for run in ordered], dtype=float)
    tokens = np.array([run.tokens for run in ordered], dtype=float)
    losses = np.array([run.loss for run in ordered], dtype=float)
    sizes = np.unique(params)
    if len(sizes) < 3:
        raise ScalingFitError(f"{where}: needs runs at 3 or more model sizes, got {len(sizes)}")
    # Repeated runs of one size (seeds) count once, at their mean loss, when locating the minimum.
    mean_losses = np.array([losses[params == size].mean() for size in sizes])
    lowest = int(np.argmin(mean_losses))
    if lowest in (0, len(sizes) - 1):
        edge, side = ("smallest", "smaller") if lowest == 0 else ("largest", "larger")
        raise ScalingFitError(
            f"{where}: no interior minimum: the lowest loss ({mean_losses[lowest]:.4g}) is at the {edge} sampled "
            f"model size N={sizes[lowest]:.3g} (sampled {sizes[0]:.3g}-{sizes[-1]:.3g}), so the optimum is "
            f"not bracketed; add {side} models at this budget"
        )
    if neighbours is None:
        window = (sizes[0], sizes[-1])
    else:
        window = (sizes[max(0, lowest - neighbours)], sizes[min(len(sizes) - 1, lowest + neighbours)])
    fitted = (params >= window[0]) & (params <= window[1])
    x_all = np.log(params)
    # Centring ln N keeps the quadratic's normal equations well conditioned (ln N ≈ 15-25).
    centre = float(np.mean(x_all[fitted]))
    x, y = x_all[fitted] - centre, losses[fitted]
    design = np.stack([x**2, x, np.ones_like(x)], axis=1)
    (curvature, slope, intercept), _, _, _ = np.linalg.lstsq(design, y, rcond=None)
    if curvature <= 0:
        raise ScalingFitError(
            f"{where}: the parabola fitted to the {fitted.sum()} runs around the lowest loss opens downward "
            f"(curvature {curvature:.3g}), so the losses there have no valley; check for diverged or noisy runs, or "
            "sample more sizes near the minimum"
        )
    log_optimum = centre - slope / (2 * curvature)
    optimal_params = float(np.exp(log_optimum))
    if not window[0] <= optimal_params <= window[1]:
        raise ScalingFitError(
            f"{where}: the parabola's minimum N={optimal_params:.3g} lies outside the model sizes it was fitted to "
            f"[{window[0]:.3g}, {window[1]:.3g}]; the losses there are not a valley (sample more sizes near the "
            "minimum)"
        )
    log_params_stderr = _vertex_stderr(design, y, (curvature, slope, intercept))
    if log_params_stderr > 0.5 * math.log(window[1] / window[0]):  # False for NaN (exactly three sizes)
        raise ScalingFitError(
            f"{where}: N_opt={optimal_params:.3g} is undetermined: its standard error (×/÷"
            f"{math.exp(min(log_params_stderr, 700)):.3g}) spans more than the sizes fitted "
            f"[{window[0]:.3g}, {window[1]:.3g}], because the losses around the minimum are flatter than their "
            "scatter; repeat runs with other seeds or sample sizes further apart"
        )
    return IsoFlopProfile(
        budget=float(budget),
        params=params,
        tokens=tokens,
        losses=losses,
        fitted=fitted,
        log_params_centre=centre,
        coefficients=(float(curvature), float(slope), float(intercept)),
        optimal_params=optimal_params,
        optimal_tokens=_tokens_at(params, tokens, optimal_params),
        optimal_loss=float(intercept - slope**2 / (4 * curvature)),
        log_params_stderr=log_params_stderr,
    )


def _vertex_stderr(design: np.ndarray, losses: np.ndarray, coefficients: Sequence[float]) -> float:
    """Standard error of the vertex x* = −c1/(2·c2) by the delta method from the least-squares covariance of
    (c2, c1, c0); NaN without residual degrees of freedom."""
    dof = len(losses) - 3
    if dof <= 0:
        return math.nan
    curvature, slope, _ = coefficients
    residuals = losses - design @ np.asarray(coefficients)
    covariance = float(residuals @ residuals) / dof * np.linalg.inv(design.T @ design)
    gradient = np.array([slope / (2 * curvature**2), -1 / (2 * curvature), 0.0])
    return float(math.sqrt(max(gradient @ covariance @ gradient, 0.0)))


def _tokens_at(params: np.ndarray, tokens: np.ndarray, at_params: float) -> float:
    """D at N=`at_params` along the budget's own line of ln D against ln N.

    With C = 6ND exactly this is C/(6N); taking it from the runs keeps D_opt right when the runner
    counts FLOPs its own way or rounds token counts to whole batches.
    """
    slope, intercept = np.polyfit(np.log(params), np.log(tokens), 1)
    return float(np.exp(intercept + slope * math.log(at_params)))


def fit_power_law(flops: np.ndarray, values: np.ndarray) -> PowerLaw:
    """Least-squares line ln values = k + exponent · ln flops, with its covariance (needs ≥ 2 points)."""
    design = np.stack([np.ones_like(flops), np.log(flops)], axis=1)
    solution, _, _, _ = np.linalg.lstsq(design, np.log(values), rcond=None)
    dof = len(flops) - 2
    residuals = np.log(values) - design @ solution
    residual_variance = float(residuals @ residuals) / dof if dof > 0 else math.nan
    covariance = residual_variance * np.linalg.inv(design.T @ design)
    return PowerLaw(float(solution[0]), float(solution[1]), covariance, dof)


def fit_isoflop(
    results: Sequence[RunResult],
    on_bad_profile: Literal["raise", "skip"] = "raise",
    relative_tolerance: float = 0.05,
    neighbours: int | None = DEFAULT_NEIGHBOURS,
) -> IsoFlopFit:
    """IsoFLOP analysis: a parabola per compute budget, then N_opt ∝ C^a and D_opt ∝ C^b.

    Budgets come from `group_by_budget`; each budget's parabola is fitted by `fit_profile` to its
    lowest loss and `neighbours` sizes either side (None: all). A budget whose profile has no
    interior minimum raises ScalingFitError, or with on_bad_profile="skip" is left out and listed in
    `IsoFlopFit.skipped`. Needs at least two usable budgets; exponent uncertainties need three.
    """
    _check_runs(results, 6, "an IsoFLOP fit")
    profiles: list[IsoFlopProfile] = []
    skipped: list[str] = []
    for budget, runs in group_by_budget(results, relative_tolerance):
        try:
            profiles.append(fit_profile(runs, budget, neighbours))
        except ScalingFitError as error:
            if on_bad_profile == "raise":
                raise
            skipped.append(str(error))
    if len(profiles) < 2:
        raise ScalingFitError(
            f"an IsoFLOP fit needs at least 2 compute budgets with a usable profile, got {len(profiles)}"
            + (f" ({len(skipped)} skipped: {'; '.join(skipped)})" if skipped else "")
        )
    budgets = np.array([profile.budget for profile in profiles])
    return IsoFlopFit(
        profiles=tuple(profiles),
        params_law=fit_power_law(budgets, np.array([profile.optimal_params for profile in profiles])),
        tokens_law=fit_power_law(budgets, np.array([profile.optimal_tokens for profile in profiles])),
        skipped=tuple(skipped),
        neighbours=neighbours,
    )


# ---------------------------------------------------------------------------------------------
# Parametric fit L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. approach 3)
# ---------------------------------------------------------------------------------------------

HUBER_DELTA = 1e-3  # Hoffmann et al.'s δ: residuals in log loss beyond 0.1% count linearly, not squared
PARAMETER_NAMES = ("E", "A", "B", "alpha", "beta")


def _initial_grid() -> np.ndarray:
    """Hoffmann et al.'s starting points as rows (a, b, e, α, β), with A = e^a, B = e^b, E = e^e."""
    exponents = np.arange(0.0, 2.01, 0.5)
    log_e = np.arange(-1.0, 1.01, 0.5)
    log_ab = np.arange(0.0, 25.1, 5.0)
    mesh = np.meshgrid(log_ab, log_ab, log_e, exponents, exponents, indexing="ij")
    return np.stack([axis.ravel() for axis in mesh], axis=1)


def _log_prediction_terms(theta: np.ndarray, log_params: np.ndarray, log_tokens: np.ndarray) -> np.ndarray:
    """The three log-terms whose log-sum-exp is log L̂: (a − α ln N, b − β ln D, e); theta may be (..., 5)."""
    a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
    return np.stack(
        np.broadcast_arrays(a - alpha * log_params, b - beta * log_tokens, e * np.ones_like(log_params)), axis=-1
    )


def _logsumexp_last(terms: np.ndarray) -> np.ndarray:
    """log Σ exp over the last axis, shifted by the maximum; scipy's general version costs several times more,
    and the objective is evaluated tens of thousands of times per bootstrap."""
    top = terms.max(axis=-1)
    return top + np.log(np.exp(terms - top[..., None]).sum(axis=-1))


def _huber(residuals: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of each residual and its derivative."""
    small = np.abs(residuals) <= delta
    value = np.where(small, 0.5 * residuals**2, delta * (np.abs(residuals) - 0.5 * delta))
    slope = np.where(small, residuals, delta * np.sign(residuals))
    return value, slope


def _objective(
    theta: np.ndarray, log_params: np.ndarray, log_tokens: np.ndarray, log_losses: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    """Summed Huber loss of log L̂ − log L, and its gradient in theta = (a, b, e, α, β).

    Scaled by 1/δ² so that a residual of δ costs ½: the raw sum is ~1e-6, below the absolute
    tolerances at which L-BFGS declares convergence, and it would stop before reaching the optimum.
    """
    terms = _log_prediction_terms(theta, log_params, log_tokens)
    log_predicted = _logsumexp_last(terms)
    shares = np.exp(terms - log_predicted[:, None])  # d log L̂ / d term
    value, slope = _huber(log_predicted - log_losses, delta)
    weighted = slope[:, None] * shares
    gradient = np.array([
        weighted[:, 0].sum(),
        weighted[:, 1].sum(),
        weighted[:, 2].sum(),
        -(weighted[:, 0] * log_params).sum(),
        -(weighted[:, 1] * log_tokens).sum(),
    ])
    return float(value.sum()) / delta**2, gradient / delta**2


def _grid_objectives(
    grid: np.ndarray, log_params: np.ndarray, log_tokens: np.ndarray, log_losses: np.ndarray, delta: float
) -> np.ndarray:
    """The objective at every starting point at once (vectorised: thousands of points, no optimiser)."""
    residuals = _logsumexp_last(_log_prediction_terms(grid, log_params, log_tokens)) - log_losses
    return _huber(residuals, delta)[0].sum(axis=-1) / delta**2


def _minimise_from(
    starts: np.ndarray, log_params: np.ndarray, log_tokens: np.ndarray, log_losses: np.ndarray, delta: float
) -> tuple[np.ndarray, float]:
    """Best L-BFGS result over the starting points: (theta, objective)."""
    best_theta, best_value = starts[0], math.inf
    for start in starts:
        result = optimize.minimize(
            _objective, start, args=(log_params, log_tokens, log_losses, delta), jac=True,
            method="L-BFGS-B", options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-9},
        )
        if np.all(np.isfinite(result.x)) and result.fun < best_value:
            best_theta, best_value = result.x, float(result.fun)
    return best_theta, best_value


def _best_starts(grid: np.ndarray, count: int, *data: np.ndarray) -> np.ndarray:
    """The `count` grid points with the lowest objective: L-BFGS from all 4,500 would take minutes."""
    values = _grid_objectives(grid, *data)
    return grid[np.argsort(values)[:count]]


def _theta_to_parameters(theta: np.ndarray) -> np.ndarray:
    """(a, b, e, α, β) → (E, A, B, α, β)."""
    a, b, e, alpha, beta = theta
    return np.array([np.exp(e), np.exp(a), np.exp(b), alpha, beta])


@dataclass(frozen=True, eq=False)
class ParametricFit:
    """L(N, D) = E + A/N^α + B/D^β, with bootstrap spreads.

    `bootstrap_samples` holds one row (E, A, B, α, β) per bootstrap refit; `stderr` their standard
    deviations by name, including the derived exponents a = β/(α+β) and b = α/(α+β).
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    huber_delta: float
    n_runs: int
    flops_range: tuple[float, float]
    bootstrap_samples: np.ndarray
    stderr: dict[str, float]

    @property
    def params_exponent(self) -> float:
        """a in N_opt ∝ C^a under C = 6ND."""
        return self.beta / (self.alpha + self.beta)

    @property
    def tokens_exponent(self) -> float:
        """b in D_opt ∝ C^b under C = 6ND."""
        return self.alpha / (self.alpha + self.beta)

    def predict(self, params: np.ndarray | float, tokens: np.ndarray | float) -> np.ndarray:
        return self.E + self.A / np.power(params, self.alpha) + self.B / np.power(tokens, self.beta)

    def parameters(self) -> np.ndarray:
        return np.array([self.E, self.A, self.B, self.alpha, self.beta])


def fit_parametric(
    results: Sequence[RunResult],
    n_bootstrap: int = 100,
    seed: int = 0,
    n_starts: int = 16,
    huber_delta: float = HUBER_DELTA,
) -> ParametricFit:
    """Fit L(N, D) = E + A/N^α + B/D^β as Hoffmann et al. (2022, approach 3) did.

    Minimises Σ Huber_δ(LSE(a − α ln N, b − β ln D, e) − ln L) over (a, b, e, α, β), A = e^a,
    B = e^b, E = e^e, with L-BFGS. Their grid of 4,500 starting points is scored in one vectorised
    pass and L-BFGS runs from the `n_starts` best of them; the lowest optimum wins. Uncertainty:
    `n_bootstrap` refits on runs resampled with replacement (seeded by `seed`), each started from
    the full-data optimum and the resample's own best grid points.
    """
    _check_runs(results, 6, "a parametric fit")
    for quantity in ("params", "tokens"):
        if len({getattr(run, quantity) for run in results}) < 3:
            raise ScalingFitError(f"a parametric fit needs runs at 3 or more distinct values of {quantity}")
    data = _log_data(results)
    grid = _initial_grid()
    # scipy's L-BFGS-B calls BLAS on 5×5 problems thousands of times; OpenBLAS's thread hand-off
    # then dominates, and on a busy few-core machine makes the fit slower than one thread.
    with threadpool_limits(limits=1, user_api="blas"):
        theta, value = _minimise_from(_best_starts(grid, n_starts, *data, huber_delta), *data, huber_delta)
        if not math.isfinite(value):
            raise ScalingFitError("the parametric fit did not converge from any starting point")
        samples = _bootstrap(results, theta, grid, n_bootstrap, seed, huber_delta)
    return ParametricFit(
        *_theta_to_parameters(theta),
        objective=value,
        huber_delta=huber_delta,
        n_runs=len(results),
        flops_range=(min(run.flops for run in results), max(run.flops for run in results)),
        bootstrap_samples=samples,
        stderr=_bootstrap_stderr(samples),
    )


def _log_data(runs: Sequence[RunResult]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.log(np.array([getattr(run, q) for run in runs], dtype=float)) for q in ("params", "tokens", "loss"))


def _bootstrap(
    runs: Sequence[RunResult], theta: np.ndarray, grid: np.ndarray, n_bootstrap: int, seed: int, delta: float
) -> np.ndarray:
    """(E, A, B, α, β) refitted on `n_bootstrap` resamples of the runs; resamples that fail are dropped."""
    rng = np.random.default_rng(seed)
    log_params, log_tokens, log_losses = _log_data(runs)
    samples = []
    for _ in range(n_bootstrap):
        pick = rng.integers(0, len(runs), len(runs))
        data = (log_params[pick], log_tokens[pick], log_losses[pick], delta)
        starts = np.vstack([theta, _best_starts(grid, 1, *data)])
        refit, value = _minimise_from(starts, *data)
        if math.isfinite(value):
            samples.append(_theta_to_parameters(refit))
    return np.array(samples).reshape(-1, len(PARAMETER_NAMES))


def _bootstrap_stderr(samples: np.ndarray) -> dict[str, float]:
    if len(samples) < 2:
        return {name: math.nan for name in (*PARAMETER_NAMES, "a", "b")}
    alpha, beta = samples[:, 3], samples[:, 4]
    spreads = dict(zip(PARAMETER_NAMES, np.std(samples, axis=0, ddof=1).tolist()))
    spreads["a"] = float(np.std(beta / (alpha + beta), ddof=1))
    spreads["b"] = float(np.std(alpha / (alpha + beta), ddof=1))
    return spreads


# ---------------------------------------------------------------------------------------------
# Compute-optimal allocation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    """The compute-optimal model size and token count for one budget, with an uncertainty interval.

    Intervals are the fit's: the regression's t interval for "isoflop" (NaN with two budgets), the
    bootstrap percentiles for "parametric". `predicted_loss` is the parametric law's loss there.
    """

    method: Literal["isoflop", "parametric"]
    flops: float
    params: float
    tokens: float
    params_interval: tuple[float, float]
    tokens_interval: tuple[float, float]
    level: float
    predicted_loss: float | None = None

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


def parametric_optimum(parameters: np.ndarray, flops: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """N_opt and D_opt minimising L(N, D) subject to 6ND = C, for rows of (E, A, B, α, β).

    Lagrange: N_opt = G·(C/6)^(β/(α+β)), D_opt = G⁻¹·(C/6)^(α/(α+β)), G = (αA/(βB))^(1/(α+β)).
    Broadcasts: parameters (..., 5) against flops.
    """
    _, coef_a, coef_b, alpha, beta = np.moveaxis(np.asarray(parameters, dtype=float), -1, 0)
    if np.ndim(flops):  # one row of results per parameter set, one column per budget
        alpha, beta, coef_a, coef_b = (np.expand_dims(x, -1) for x in (alpha, beta, coef_a, coef_b))
    scale = (alpha * coef_a / (beta * coef_b)) ** (1 / (alpha + beta))
    tokens_per_flop_unit = np.asarray(flops, dtype=float) / FLOPS_PER_PARAM_PER_TOKEN
    return (
        scale * tokens_per_flop_unit ** (beta / (alpha + beta)),
        tokens_per_flop_unit ** (alpha / (alpha + beta)) / scale,
    )


def optimal_allocation(fit: IsoFlopFit | ParametricFit, flops: float, level: float = 0.95) -> Allocation:
    """Compute-optimal N and D for a budget of `flops` FLOPs according to either fit."""
    if not (isinstance(flops, (int, float, np.number)) and math.isfinite(flops) and flops > 0):
        raise ScalingFitError(f"the compute budget must be a finite positive number of FLOPs, got {flops!r}")
    if isinstance(fit, IsoFlopFit):
        return _isoflop_allocation(fit, float(flops), level)
    if isinstance(fit, ParametricFit):
        return _parametric_allocation(fit, float(flops), level)
    raise TypeError(f"optimal_allocation takes an IsoFlopFit or ParametricFit, not {type(fit).__name__}")


def _isoflop_allocation(fit: IsoFlopFit, flops: float, level: float) -> Allocation:
    params_low, params_high = fit.params_law.interval(flops, level)
    tokens_low, tokens_high = fit.tokens_law.interval(flops, level)
    return Allocation(
        method="isoflop",
        flops=flops,
        params=float(fit.params_law(flops)),
        tokens=float(fit.tokens_law(flops)),
        params_interval=(float(params_low), float(params_high)),
        tokens_interval=(float(tokens_low), float(tokens_high)),
        level=level,
    )


def _parametric_allocation(fit: ParametricFit, flops: float, level: float) -> Allocation:
    params, tokens = parametric_optimum(fit.parameters(), flops)
    tail = 100 * (1 - level) / 2
    if len(fit.bootstrap_samples) >= 2:
        sample_params, sample_tokens = parametric_optimum(fit.bootstrap_samples, flops)
        params_interval = tuple(float(x) for x in np.percentile(sample_params, [tail, 100 - tail]))
        tokens_interval = tuple(float(x) for x in np.percentile(sample_tokens, [tail, 100 - tail]))
    else:
        params_interval = tokens_interval = (math.nan, math.nan)
    return Allocation(
        method="parametric",
        flops=flops,
        params=float(params),
        tokens=float(tokens),
        params_interval=params_interval,
        tokens_interval=tokens_interval,
        level=level,
        predicted_loss=float(fit.predict(params, tokens)),
    )


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChinchillaReference:
    """Hoffmann et al. (2022) published values: approach 3's fitted law and each approach's exponents.

    E, A and B depend on the dataset, tokenizer and loss unit (theirs: nats per token on MassiveText),
    so only the exponents are comparable across setups.
    """

    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.34
    beta: float = 0.28
    params_exponents: tuple[float, float, float] = (0.50, 0.49, 0.46)  # a, approaches 1, 2, 3
    tokens_exponents: tuple[float, float, float] = (0.50, 0.51, 0.54)  # b, approaches 1, 2, 3


CHINCHILLA = ChinchillaReference()


def _plus_minus(value: float, stderr: float, digits: int = 3) -> str:
    spread = f"{stderr:.{digits}f}" if math.isfinite(stderr) else "n/a"
    return f"{value:.{digits}f} ± {spread}"


def _isoflop_lines(fit: IsoFlopFit) -> list[str]:
    around = "every size" if fit.neighbours is None else f"the lowest loss ± {fit.neighbours} sizes"
    lines = [f"IsoFLOP profiles (Chinchilla approach 2: parabola in ln N per budget, fitted to {around})",
             f"  {'budget C':>10}  {'runs':>7}  {'N_opt':>10}  {'×/÷ (1 s.e.)':>12}  {'D_opt':>10}  "
             f"{'loss at N_opt':>13}"]
    for profile in fit.profiles:
        spread = (f"{math.exp(profile.log_params_stderr):12.2f}" if math.isfinite(profile.log_params_stderr)
                  else f"{'n/a':>12}")
        used = f"{int(profile.fitted.sum())}/{len(profile.params)}"
        lines.append(f"  {profile.budget:10.3g}  {used:>7}  {profile.optimal_params:10.3g}  {spread}  "
                     f"{profile.optimal_tokens:10.3g}  {profile.optimal_loss:13.4f}")
    lines.append("  (runs = fitted/all at the budget; ×/÷ = the parabola's own uncertainty in N_opt, n/a through "
                 "exactly 3 points)")
    lines += [f"  skipped: {reason}" for reason in fit.skipped]
    dof = fit.params_law.dof
    note = f"regression standard error, {dof} residual dof" if dof > 0 else "no uncertainty with 2 budgets"
    chinchilla = CHINCHILLA
    exponent_sum = fit.params_law.exponent + fit.tokens_law.exponent
    lines += [
        f"  N_opt ∝ C^a: a = {_plus_minus(fit.params_law.exponent, fit.params_law.exponent_stderr)}  ({note})",
        f"  D_opt ∝ C^b: b = {_plus_minus(fit.tokens_law.exponent, fit.tokens_law.exponent_stderr)}",
        f"  a + b = {exponent_sum:.3f} (1 when C = 6ND exactly; more when FLOPs per token grow slower than N)",
        f"  Chinchilla: a = {chinchilla.params_exponents[0]:.2f} / {chinchilla.params_exponents[1]:.2f}, "
        f"b = {chinchilla.tokens_exponents[0]:.2f} / {chinchilla.tokens_exponents[1]:.2f} (approaches 1 / 2)",
    ]
    return lines


def _parametric_lines(fit: ParametricFit) -> list[str]:
    chinchilla = CHINCHILLA
    rows = [("E", fit.E, chinchilla.E, 3), ("A", fit.A, chinchilla.A, 1), ("B", fit.B, chinchilla.B, 1),
            ("alpha", fit.alpha, chinchilla.alpha, 3), ("beta", fit.beta, chinchilla.beta, 3)]
    lines = [f"Parametric fit L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla approach 3: Huber δ={fit.huber_delta:g} "
             f"on ln L, L-BFGS; ± = bootstrap std over {len(fit.bootstrap_samples)} resamples of {fit.n_runs} runs)"]
    lines += [f"  {name:<6}= {_plus_minus(value, fit.stderr[name], digits):<22} Chinchilla {reference:g}"
              for name, value, reference, digits in rows]
    lines += [
        f"  a = beta/(alpha+beta) = {_plus_minus(fit.params_exponent, fit.stderr['a'])}   "
        f"Chinchilla {chinchilla.params_exponents[2]:.2f}",
        f"  b = alpha/(alpha+beta) = {_plus_minus(fit.tokens_exponent, fit.stderr['b'])}  "
        f"Chinchilla {chinchilla.tokens_exponents[2]:.2f}",
        "  (E, A, B depend on the data, tokenizer and loss unit; compare exponents.)",
    ]
    return lines


def _with_interval(value: float, interval: tuple[float, float]) -> str:
    if not all(math.isfinite(bound) for bound in interval):
        return f"{value:.3g}"
    return f"{value:.3g} [{interval[0]:.3g}, {interval[1]:.3g}]"


def _allocation_line(allocation: Allocation) -> str:
    has_interval = all(math.isfinite(bound) for bound in allocation.params_interval)
    text = (f"  {allocation.method:<10} N = {_with_interval(allocation.params, allocation.params_interval)}, "
            f"D = {_with_interval(allocation.tokens, allocation.tokens_interval)}"
            + (f" ({100 * allocation.level:g}% intervals)" if has_interval else " (no interval)")
            + f", D/N = {allocation.tokens_per_param:.1f}")
    if allocation.predicted_loss is not None:
        text += f", predicted loss {allocation.predicted_loss:.4f}"
    return text


def _extrapolation_note(flops: float, fitted_flops: Sequence[float]) -> str:
    """How far the named budget lies outside the budgets the fits saw; power laws drift when extrapolated."""
    low, high = min(fitted_flops), max(fitted_flops)
    if flops > high:
        return f" (extrapolated {flops / high:.3g}× beyond the largest fitted budget {high:.3g})"
    if flops < low:
        return f" (below the smallest fitted budget {low:.3g})"
    return " (within the fitted budgets)"


def format_report(
    isoflop_fit: IsoFlopFit | None,
    parametric_fit: ParametricFit | None,
    target_flops: float | None = None,
) -> str:
    """A human-readable summary: fitted exponents ± uncertainty beside Chinchilla's, and the
    compute-optimal N and D for `target_flops` by each fit given."""
    if isoflop_fit is None and parametric_fit is None:
        raise ScalingFitError("format_report needs an IsoFLOP fit, a parametric fit, or both")
    sections = []
    if isoflop_fit is not None:
        sections.append(_isoflop_lines(isoflop_fit))
    if parametric_fit is not None:
        sections.append(_parametric_lines(parametric_fit))
    if target_flops is not None:
        fits = [fit for fit in (isoflop_fit, parametric_fit) if fit is not None]
        if isoflop_fit is not None:
            fitted_flops = [profile.budget for profile in isoflop_fit.profiles]
        else:
            fitted_flops = list(parametric_fit.flops_range)
        header = f"Compute-optimal allocation for C = {target_flops:.3g} FLOPs" + _extrapolation_note(
            target_flops, fitted_flops
        )
        sections.append([header] + [_allocation_line(optimal_allocation(fit, target_flops)) for fit in fits])
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

PLOT_FILES = {
    "loss_vs_flops": "loss_vs_flops.png",
    "isoflop_profiles": "isoflop_profiles.png",
    "compute_frontier": "compute_frontier.png",
}


def save_plots(
    results: Sequence[RunResult],
    isoflop_fit: IsoFlopFit | None,
    parametric_fit: ParametricFit | None,
    out_dir: str | Path,
    target_flops: float | None = None,
) -> dict[str, Path]:
    """Write the sweep's plots as PNGs into `out_dir` and return their paths by name.

    loss_vs_flops: every run's loss against its FLOPs, coloured by model size, with the fitted
    frontier. isoflop_profiles (needs the IsoFLOP fit): each budget's losses against N, its parabola
    and minimum. compute_frontier: N_opt and D_opt against C for both fits with their uncertainty
    bands, extended to `target_flops` when given.
    """
    _check_runs(results, 1, "plotting")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"loss_vs_flops": _loss_vs_flops_figure(results, isoflop_fit, parametric_fit)}
    if isoflop_fit is not None:
        figures["isoflop_profiles"] = _isoflop_figure(isoflop_fit)
    if isoflop_fit is not None or parametric_fit is not None:
        figures["compute_frontier"] = _frontier_figure(results, isoflop_fit, parametric_fit, target_flops)
    paths = {}
    for name, figure in figures.items():
        paths[name] = out_dir / PLOT_FILES[name]
        figure.savefig(paths[name], dpi=120)
    return paths


def _new_figure(columns: int = 1):
    """A figure detached from pyplot: nothing global (backend, current figure) changes, and it is
    rendered by Agg on save, so this works headless and inside other programs' plotting sessions."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4 * columns, 4.8), layout="constrained")
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def _colour_scale(values: Sequence[float], label: str, figure, axes):
    """A log-scaled viridis colour per value, and a colour bar explaining it."""
    from matplotlib import cm, colors

    norm = colors.LogNorm(min(values), max(values) * (1.0001 if min(values) == max(values) else 1))
    mapper = cm.ScalarMappable(norm=norm, cmap="viridis")
    figure.colorbar(mapper, ax=axes, label=label)
    return lambda value: mapper.to_rgba(value)


def _by_model_size(results: Sequence[RunResult]) -> dict[float, list[RunResult]]:
    """Runs grouped by N to 3 significant figures, each group ordered by FLOPs."""
    groups: dict[float, list[RunResult]] = {}
    for run in results:
        groups.setdefault(float(f"{run.params:.3g}"), []).append(run)
    return {size: sorted(runs, key=lambda run: run.flops) for size, runs in sorted(groups.items())}


def _loss_vs_flops_figure(results, isoflop_fit, parametric_fit):
    figure, (axes,) = _new_figure()
    groups = _by_model_size(results)
    colour = _colour_scale(list(groups), "parameters N", figure, axes)
    for size, runs in groups.items():
        axes.plot([r.flops for r in runs], [r.loss for r in runs], "o-", color=colour(size), markersize=4, linewidth=1)
    flops = np.geomspace(min(r.flops for r in results), max(r.flops for r in results), 100)
    if parametric_fit is not None:
        params, tokens = parametric_optimum(parametric_fit.parameters(), flops)
        # The closed-form optimum spends C as 6ND; where a run's real FLOPs per token exceed 6N (a large output
        # head, attention), this curve lies below what the budget buys, and the legend says so.
        axes.plot(flops, parametric_fit.predict(params, tokens), "k--",
                  label="parametric fit: compute-optimal loss if C = 6ND")
    if isoflop_fit is not None:
        axes.plot([p.budget for p in isoflop_fit.profiles], [p.optimal_loss for p in isoflop_fit.profiles],
                  "r*", markersize=12, label="IsoFLOP minima")
    axes.set(xscale="log", xlabel="training FLOPs C", ylabel="final validation loss",
             title="Loss against compute, per model size")
    if isoflop_fit is not None or parametric_fit is not None:
        axes.legend()
    return figure


def _isoflop_figure(fit: IsoFlopFit):
    figure, (axes,) = _new_figure()
    colour = _colour_scale([p.budget for p in fit.profiles], "compute budget C (FLOPs)", figure, axes)
    for profile in fit.profiles:
        params = np.geomspace(*profile.fitted_range, 100)
        axes.plot(profile.params, profile.losses, ":", color=colour(profile.budget), linewidth=0.8)
        axes.plot(profile.params[profile.fitted], profile.losses[profile.fitted], "o", color=colour(profile.budget),
                  markersize=5)
        axes.plot(profile.params[~profile.fitted], profile.losses[~profile.fitted], "o", markersize=5,
                  markerfacecolor="none", markeredgecolor=colour(profile.budget))
        axes.plot(params, profile.predict(params), "-", color=colour(profile.budget), label=f"C = {profile.budget:.2g}")
        axes.plot(profile.optimal_params, profile.optimal_loss, "*", color="red", markersize=12, markeredgecolor="k")
    axes.plot([], [], "*", color="red", markeredgecolor="k", markersize=12, label="parabola minimum")
    axes.plot([], [], "o", color="grey", markerfacecolor="none", label="not in the parabola's fit")
    axes.set(xscale="log", xlabel="parameters N", ylabel="final validation loss",
             title="IsoFLOP profiles: parabola in ln N around each budget's minimum")
    axes.legend(fontsize="small")
    return figure


def _frontier_figure(results, isoflop_fit, parametric_fit, target_flops):
    figure, (params_axes, tokens_axes) = _new_figure(columns=2)
    fitted_flops = [r.flops for r in results]
    lowest = min(fitted_flops + ([target_flops] if target_flops else [])) / 2
    highest = max(fitted_flops + ([target_flops] if target_flops else [])) * 2
    flops = np.geomspace(lowest, highest, 100)
    if isoflop_fit is not None:
        _plot_isoflop_frontier(isoflop_fit, flops, params_axes, tokens_axes)
    if parametric_fit is not None:
        _plot_parametric_frontier(parametric_fit, flops, params_axes, tokens_axes)
    for axes, quantity in ((params_axes, "N_opt (parameters)"), (tokens_axes, "D_opt (tokens)")):
        if target_flops is not None:
            axes.axvline(target_flops, color="grey", linestyle=":", label=f"target C = {target_flops:.2g}")
        axes.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=quantity)
        axes.legend(fontsize="small")
    params_axes.set_title("Compute-optimal model size")
    tokens_axes.set_title("Compute-optimal training tokens")
    return figure


def _plot_isoflop_frontier(fit: IsoFlopFit, flops: np.ndarray, params_axes, tokens_axes) -> None:
    budgets = [p.budget for p in fit.profiles]
    for axes, law, optima, name in ((params_axes, fit.params_law, [p.optimal_params for p in fit.profiles], "N"),
                                    (tokens_axes, fit.tokens_law, [p.optimal_tokens for p in fit.profiles], "D")):
        axes.plot(budgets, optima, "o", color="tab:blue", label="IsoFLOP minima")
        axes.plot(flops, law(flops), "-", color="tab:blue", label=f"IsoFLOP: {name}_opt ∝ C^{law.exponent:.3f}")
        if law.dof > 0:
            axes.fill_between(flops, *law.interval(flops), color="tab:blue", alpha=0.15)


def _plot_parametric_frontier(fit: ParametricFit, flops: np.ndarray, params_axes, tokens_axes) -> None:
    params, tokens = parametric_optimum(fit.parameters(), flops)
    exponents = {"N": fit.params_exponent, "D": fit.tokens_exponent}
    for axes, values, name, index in ((params_axes, params, "N", 0), (tokens_axes, tokens, "D", 1)):
        axes.plot(flops, values, "--", color="tab:orange", label=f"parametric: {name}_opt ∝ C^{exponents[name]:.3f}")
        if len(fit.bootstrap_samples) >= 2:
            samples = parametric_optimum(fit.bootstrap_samples, flops)[index]
            axes.fill_between(flops, *np.percentile(samples, [2.5, 97.5], axis=0), color="tab:orange", alpha=0.15)
