"""The divergence guard: watches every step's loss and gradient norm and decides when to roll back.

A non-finite loss or gradient norm triggers a rollback at once. A spike — the loss above its running mean by
`max(spike_sigmas · noise, spike_min_delta)` — triggers one when it holds for `spike_steps` consecutive steps. The
running mean is an exponential moving average (decay `ema_decay`); `noise` is the step-to-step standard deviation,
estimated from successive differences (EMA of (loss_t - loss_t-1)² / 2), so a falling loss curve does not inflate it
as the plain variance around a lagging mean would. Spiking steps update neither; spikes are judged only after
`warmup_steps` observations, and the mean needs a few multiples of 1 / (1 - ema_decay) steps to settle.

The decision is made on the host from the two scalars each step returns, so it costs one small device-to-host read
per step (the loop reads step k's scalars after dispatching step k+1, so the device never waits).

`GuardState` is plain JSON and is saved in every checkpoint: a resumed run judges its steps exactly as the
uninterrupted run would. The rollback history is the exception by design: it is carried across rollbacks (a
rollback restores the statistics of its checkpoint but keeps the history), so the cap on rollbacks in a window of
steps ends a run that keeps diverging instead of looping.

Step numbers here count as in metrics.jsonl: step k is the k-th optimizer step (the one that moves the state from
step k-1 to step k), so "the checkpoint from before a spike that started at step k" is the newest with step <= k-1.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llama_jax.config import GuardConfig
from llama_jax.errors import LlamaJaxError


class DivergenceError(LlamaJaxError):
    """The run keeps diverging: more rollbacks within the window than `guard.max_rollbacks` allows."""


@dataclass
class GuardState:
    count: int = 0  # finite, non-spiking losses folded into the statistics
    mean: float = 0.0  # EMA of the loss
    noise_var: float = 0.0  # EMA of (loss_t - loss_t-1)² / 2
    last: float = 0.0  # the last loss folded in
    spike_run: int = 0  # consecutive spiking steps so far
    spike_start: int | None = None  # the first step of that run
    rollbacks: list[int] = field(default_factory=list)  # the steps that triggered past rollbacks

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> GuardState:
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})


@dataclass(frozen=True)
class Rollback:
    """Roll back to a checkpoint with step <= `before` because of `step` (see the module docstring)."""

    step: int  # the step whose values triggered the rollback
    before: int  # the newest usable checkpoint has step <= this (the step before the spike began)
    reason: str
    loss: float
    grad_norm: float


class Guard:
    def __init__(self, config: GuardConfig, state: GuardState | None = None):
        self.config = config
        self.state = state or GuardState()

    @property
    def suspect(self) -> bool:
        """A spike is under way: a checkpoint now could hold the diverging state, so saves wait until it ends."""
        return self.state.spike_run > 0

    def threshold(self) -> float:
        """The loss above which a step counts as spiking (inf while warming up)."""
        s = self.state
        if s.count < max(self.config.warmup_steps, 1):
            return math.inf
        return s.mean + max(self.config.spike_sigmas * math.sqrt(max(s.noise_var, 0.0)), self.config.spike_min_delta)

    def observe(self, step: int, loss: float, grad_norm: float) -> Rollback | None:
        """Judge step `step`'s values; a Rollback if the run must go back, else None (statistics updated)."""
        if not self.config.enabled:
            return None
        s = self.state
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            start = s.spike_start if s.spike_start is not None else step
            return Rollback(step, start - 1, f"non-finite {what}", loss, grad_norm)
        limit = self.threshold()
        if loss > limit:
            s.spike_run += 1
            s.spike_start = step if s.spike_start is None else s.spike_start
            if s.spike_run >= self.config.spike_steps:
                return Rollback(step, s.spike_start - 1,
                                f"loss spike: {s.spike_run} steps above {limit:.4g} (running mean {s.mean:.4g})",
                                loss, grad_norm)
            return None
        s.spike_run, s.spike_start = 0, None
        if s.count == 0:
            s.mean, s.noise_var = loss, 0.0
        else:
            decay = self.config.ema_decay
            s.mean = decay * s.mean + (1.0 - decay) * loss
            s.noise_var = decay * s.noise_var + (1.0 - decay) * 0.5 * (loss - s.last) ** 2
        s.last = loss
        s.count += 1
        return None

    def check_cap(self, rollback: Rollback) -> int:
        """Record a rollback; the number in the window, or DivergenceError when it would exceed the cap."""
        window = self.config.rollback_window
        recent = [step for step in self.state.rollbacks if step > rollback.step - window]
        if len(recent) >= self.config.max_rollbacks:
            history = ", ".join(map(str, recent + [rollback.step]))
            raise DivergenceError(
                f"training keeps diverging: {rollback.reason} at step {rollback.step} would be rollback "
                f"{len(recent) + 1} within {window} steps (guard.max_rollbacks={self.config.max_rollbacks}; "
                f"rollbacks at steps {history}). Lower optimizer.lr, raise optimizer.warmup_steps or "
                f"guard.skip_batches, or inspect the data around these steps")
        return len(recent) + 1

    def restart_from(self, state: GuardState | None, rollback: Rollback) -> None:
        """After a rollback: the restored checkpoint's statistics, this run's rollback history plus this one."""
        history = self.state.rollbacks + [rollback.step]
        self.state = dataclasses.replace(state or GuardState(), rollbacks=history,
                                         spike_run=0, spike_start=None)
