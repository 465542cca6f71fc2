"""Test-only faults a run can be told to meet (`debug.*` config keys), so that the guard's rollbacks are testable
end to end on the real train step."""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from llama_jax.config import DebugConfig
from llama_jax.trainer import Trainer, TrainState


class FaultInjection:
    """`debug.inject_nan_at_step` and `debug.spike_at_step`: steps that diverge, for the guard's tests.

    A NaN is injected by setting one parameter to NaN just before the step, so that step's loss, its gradients and
    the update are all NaN, as in a real blow-up; the train step's program is unchanged. A spike replaces the
    batch's tokens by uniformly random ids (a corrupted batch). Both hit the batch a step reads in a run without
    rollbacks (batch index step - 1), so skipping it cures them; with `debug.inject_nan_sticky` the NaN hits the
    step number whatever its batch, so it recurs after every rollback.
    """

    def __init__(self, debug: DebugConfig, trainer: Trainer, batch_shape: tuple[int, int], vocab_size: int):
        self.debug = debug
        if debug.inject_nan_at_step is not None:
            def poison(state: TrainState) -> TrainState:
                name = min(state.params)
                return state.replace(params={**state.params, name: state.params[name] * jnp.nan})

            shardings = trainer.state_shardings()
            self._poison = jax.jit(poison, in_shardings=(shardings,), out_shardings=shardings, donate_argnums=0)
        if debug.spike_at_step is not None:
            sharding = trainer.batch_shardings(batch_shape)
            self._random = jax.jit(
                lambda index: tuple(jax.random.randint(key, batch_shape, 0, vocab_size, jnp.int32)
                                    for key in jax.random.split(jax.random.key(index))),
                out_shardings=(sharding, sharding))

    def state(self, state: TrainState, step: int, index: int) -> TrainState:
        at = self.debug.inject_nan_at_step
        if at is None or not (step == at if self.debug.inject_nan_sticky else index == at - 1):
            return state
        return self._poison(state)

    def batch(self, batch: Mapping[str, jax.Array], index: int) -> Mapping[str, jax.Array]:
        at = self.debug.spike_at_step
        if at is None or not 0 <= index - (at - 1) < self.debug.spike_batches:
            return batch
        inputs, targets = self._random(index)
        return {**batch, "inputs": inputs, "targets": targets}
