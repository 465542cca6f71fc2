"""The train step: a pure function (state, batch) → (state, metrics) under `jax.jit` with explicit shardings.

Everything a resumed run needs lives in `TrainState` (parameters, optimizer state, step, RNG, data position);
nothing stateful hides in Python objects. Parameters are a flat dict {dotted name: float32 array} — the same form
checkpoints and converters use — merged into the NNX module inside the step.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from llama_jax.config import ModelConfig, OptimizerConfig
from llama_jax.model import Llama
from llama_jax.ops import HEAD_CHUNK, output_head_loss
from llama_jax.params import ModelOnMesh, merge_params, param_specs
from llama_jax.sharding import DEFAULT_RULES, Rules, put_global, replicated

Batch = Mapping[str, jax.Array]  # inputs, targets, loss_mask [batch, seq]; optional positions, segment_ids


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict[str, jax.Array]
    opt_state: optax.OptState
    rng: jax.Array  # uint32[2] raw key data (checkpoint-friendly)
    data_skip: jax.Array  # int32 scalar: batches skipped by rollbacks; the next batch index is step + data_skip
    # The divergence guard's statistics are host values (llama_jax/guard.py), saved beside this state in every
    # checkpoint (llama_jax/checkpoint.py), so a resumed run judges its steps exactly as an uninterrupted one.


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio of the peak at the last step (Llama 2)."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=config.lr * config.min_lr_ratio)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (β1 0.9, β2 0.95, eps 1e-5, weight decay 0.1) after global-norm clipping; norm scales are not decayed."""
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(learning_rate_schedule(config, total_steps), b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay,
                    mask=lambda params: {name: value.ndim > 1 and not name.endswith(".scale")
                                         for name, value in params.items()}),
    )


@dataclass(frozen=True, kw_only=True)
class Trainer(ModelOnMesh):
    """Builds the jitted init and step functions for one model, optimizer and mesh."""

    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    grad_accum: int = 1

    @classmethod
    def create(cls, model_config: ModelConfig, optimizer_config: OptimizerConfig, total_steps: int, mesh: Mesh,
               rules: Rules = DEFAULT_RULES, grad_accum: int = 1) -> Trainer:
        return cls(model_config, mesh, rules, optimizer=make_optimizer(optimizer_config, total_steps),
                   schedule=learning_rate_schedule(optimizer_config, total_steps), grad_accum=grad_accum)

    # ── Shardings ────────────────────────────────────────────────────────────────────────────────────────────
    def state_shardings(self) -> TrainState:
        """The state's shardings: optimizer-state trees shaped like the parameters (AdamW's mu, nu) are sharded like
        the parameters, every other leaf (step counts) replicated. Derived from abstract shapes only: optax's
        `tree_map_params` would run `optimizer.init` eagerly, which executes on the current mesh's devices and so
        fails on compile-only devices (a TPU topology planned from a CPU machine) or under `jax.set_mesh`."""
        params = self.param_shardings()
        abstract_params = self.abstract_params()
        abstract_opt_state = jax.eval_shape(self.optimizer.init, abstract_params)
        # The same structural matching as tree_map_params(self.optimizer, ...), with init traced, never executed.
        opt_state = optax.tree_map_params(lambda placeholder: jax.eval_shape(self.optimizer.init, placeholder),
                                          lambda _, sharding: sharding, abstract_opt_state, params,
                                          transform_non_params=lambda _: replicated(self.mesh))
        scalar = replicated(self.mesh)
        return TrainState(step=scalar, params=params, opt_state=opt_state, rng=scalar, data_skip=scalar)

    def abstract_params(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The trained parameters' shapes (float32): the model's; trainers with heads add theirs."""
        return {name: jax.ShapeDtypeStruct(spec.shape, jnp.float32)
                for name, spec in param_specs(self.model_config).items()}

    # ── Initialisation ───────────────────────────────────────────────────────────────────────────────────────
    def init_state(self, seed: int) -> TrainState:
        """Fresh parameters and optimizer state, created directly in their shards."""
        return jax.jit(self._init, static_argnums=0, out_shardings=self.state_shardings())(seed)

    def state_from_params(self, params: Mapping[str, jax.Array], seed: int) -> TrainState:
        """A fresh train state (step 0, new optimizer moments) holding a copy of `params` (a pretrained model's, for
        fine-tuning) in their shards. A copy: each step donates the state, and the caller's arrays must survive it
        (a rollback with no checkpoint to return to calls this again with them)."""
        state = self.init_state(seed)
        shardings = self.state_shardings()
        params = {name: put_global(value, shardings.params[name]).copy() for name, value in params.items()}
        opt_state = jax.jit(self.optimizer.init, out_shardings=shardings.opt_state)(params)
        return state.replace(params=params, opt_state=opt_state)

    def abstract_state(self, seed: int = 0) -> TrainState:
        """Shapes and dtypes of the state, nothing allocated (planning 7B-70B runs)."""
        return jax.eval_shape(lambda: self._init(seed))

    def restore_target(self) -> TrainState:
        """Shapes, dtypes and this mesh's shardings of the state: what a checkpoint is restored into."""
        return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                            self.abstract_state(), self.state_shardings())

    def _init(self, seed: int) -> TrainState:
        params_key, rng = jax.random.split(jax.random.key(seed))
        model = Llama(self.model_config, rngs=nnx.Rngs(params=params_key))
        params = {".".join(map(str, path)): variable[...]
                  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params),
                          rng=jax.random.key_data(rng), data_skip=jnp.zeros((), jnp.int32))

    # ── The step ─────────────────────────────────────────────────────────────────────────────────────────────
    def jit_step(self, batch_shape: tuple[int, int]) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
        """train_step under jax.jit: explicit in/out shardings, the state donated. One per batch shape and Trainer,
        so every run of this Trainer (a resume, a rollback, the next test) calls the same compiled program."""
        key = ("step", tuple(batch_shape))
        if key not in self._jitted:
            state_shardings = self.state_shardings()
            batch = self.batch_shardings(batch_shape)
            metrics = replicated(self.mesh)
            self._jitted[key] = self.under_rules(jax.jit(self.train_step, in_shardings=(state_shardings, batch),
                                                         out_shardings=(state_shardings, metrics), donate_argnums=0))
        return self._jitted[key]

    @functools.cached_property
    def _jitted(self) -> dict[Any, Callable]:
        return {}

    def under_rules(self, jitted: Callable) -> Callable:
        """Call (and so trace) `jitted` with the mesh and rules in context, so activations get constrained."""

        @functools.wraps(jitted)
        def call(*args):
            with self.activation_sharding():
                return jitted(*args)

        call.lower = lambda *args: self._lower(jitted, *args)
        return call

    def _lower(self, jitted, *args):
        with self.activation_sharding():
            return jitted.lower(*args)

    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        loss, grads, tokens, means = self.loss_and_grads(state.params, batch)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": self.schedule(state.step),
                   "tokens": tokens, **means}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def loss_and_grads(self, params: dict[str, jax.Array], batch: Batch
                       ) -> tuple[jax.Array, dict, jax.Array, dict[str, jax.Array]]:
        """(mean loss over the whole batch, its gradient, the loss weight, the mean of each extra metric),
        accumulated over `grad_accum` micro-batches. The mean is per token (language modelling) or per pair
        (preference losses): whatever the micro-batch loss counts as its weight."""
        micro_batches = jax.tree.map(self._split_micro_batches, dict(batch))
        loss_fn = self.micro_batch_sums()

        def accumulate(carry, micro_batch):
            loss_sum, weight_sum, extra_sums, grad_sum = carry
            (loss, (weight, extras)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, micro_batch)
            return (loss_sum + loss, weight_sum + weight, jax.tree.map(jnp.add, extra_sums, extras),
                    jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        extra_zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                                   jax.eval_shape(loss_fn, params, first)[1][1])
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), extra_zeros, zeros)
        (loss_sum, weight_sum, extra_sums, grad_sum), _ = jax.lax.scan(accumulate, init, micro_batches)
        scale = 1.0 / jnp.maximum(weight_sum, 1.0)
        means = {name: value * scale for name, value in extra_sums.items()}
        return loss_sum * scale, jax.tree.map(lambda g: g * scale, grad_sum), weight_sum, means

    def micro_batch_sums(self) -> Callable[[dict[str, jax.Array], Batch],
                                           tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]]:
        """(trained params, micro-batch) → (loss sum, (weight sum, {metric: sum})): the extra sums are reported as
        means per unit of weight beside the loss (the preference trainers' accuracies and rewards)."""
        loss_fn = self.micro_batch_loss()

        def sums(params, batch):
            loss, weight = loss_fn(params, batch)
            return loss, (weight, {})

        return sums

    def micro_batch_loss(self) -> Callable[[dict[str, jax.Array], Batch], tuple[jax.Array, jax.Array]]:
        """(trained params, micro-batch) → (loss sum, weight sum): what `loss_and_grads` differentiates (LoRA's
        trainer, `llama_jax.lora.LoraTrainer`, trains adapters over a frozen base instead)."""
        graphdef = self.graphdef
        return lambda params, batch: loss_sums(params, graphdef, batch)

    def _split_micro_batches(self, x: jax.Array) -> jax.Array:
        """[batch, ...] → [grad_accum, batch/grad_accum, ...], micro-batch i taking rows i, i+A, i+2A, ...

        Strided rows keep every micro-batch spread over all devices of the batch-sharded axis.
        """
        micro = x.shape[0] // self.grad_accum
        return x.reshape(micro, self.grad_accum, *x.shape[1:]).swapaxes(0, 1)

    def eval_loss(self) -> Callable[[dict[str, jax.Array], Batch], tuple[jax.Array, jax.Array]]:
        """Jitted (params, batch) → (loss sum, token count); one per Trainer (compiled once, not per evaluation)."""
        if "eval" not in self._jitted:
            graphdef = self.graphdef

            def evaluate(params, batch):
                return loss_sums(params, graphdef, batch)

            self._jitted["eval"] = self.under_rules(jax.jit(evaluate))
        return self._jitted["eval"]


def loss_sums(params: dict[str, jax.Array], graphdef: nnx.GraphDef, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(sum of token cross-entropies, sum of loss weights), the output head applied chunk by chunk."""
    model = merge_params(graphdef, params)
    hidden = model.hidden_states(batch["inputs"], positions=batch.get("positions"),
                                 segment_ids=batch.get("segment_ids"))
    return chunked_cross_entropy(model, hidden, batch["targets"], batch["loss_mask"])


def chunked_cross_entropy(model: Llama, hidden: jax.Array, targets: jax.Array,
                          weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of the output head over sequence chunks, never materialising [batch, seq, vocab] logits.

    A [batch, seq, vocab] float32 logit tensor and its gradient are the largest temporaries of a Llama step (1 GiB
    each for batch 8 × 1024 × 32000); chunking keeps them at [batch, HEAD_CHUNK, vocab]. See `output_head_loss`.
    """
    if model.output is None:  # tied embeddings: the head is the embedding table, [vocab, dim]
        head, layout = model.embedding[...], "vd"
    else:
        head, layout = model.output[...], "dv"
    length = hidden.shape[1]
    chunk = HEAD_CHUNK if length % HEAD_CHUNK == 0 else length
    return output_head_loss(hidden, head, targets, weights.astype(jnp.float32), layout,
                            jnp.dtype(model.config.dtype), chunk)


@dataclass(frozen=True, kw_only=True)
class FrozenModelsTrainer(Trainer):
    """A trainer whose step also reads frozen arrays (a reference model, reward models): `frozen` travels as a jit
    argument beside the state, placed by `frozen_shardings()`, so it is neither a compile-time constant nor part of
    the checkpointed state (a resumed run rebuilds it from the same inputs). Inside the step `self.frozen` is the
    traced argument."""

    frozen: Any = dataclasses.field(default=None, hash=False, compare=False)

    def frozen_shardings(self) -> Any:
        """Shardings of `frozen`: model parameters as the rules shard them, everything else replicated."""
        full, shapes = self.param_shardings(), self.abstract_params()

        def sharding(path, value):
            name = ".".join(str(getattr(key, "key", key)) for key in path[1:])
            if name in full and tuple(value.shape) == tuple(shapes[name].shape):
                return full[name]
            return replicated(self.mesh)

        return jax.tree_util.tree_map_with_path(sharding, self.frozen)

    def place_frozen(self) -> FrozenModelsTrainer:
        """This trainer with `frozen` copied into its shardings: never the buffers of the state, which each step
        donates (a reference model starts as the very arrays the policy starts from)."""
        placed = jax.tree.map(put_global, self.frozen, self.frozen_shardings())
        return dataclasses.replace(self, frozen=jax.tree.map(lambda value: value.copy(), placed))

    def jit_step(self, batch_shape: tuple[int, int]) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
        key = ("frozen_step", tuple(batch_shape))
        if key not in self._jitted:
            state = self.state_shardings()

            def step(state, frozen, batch):
                return dataclasses.replace(self, frozen=frozen).train_step(state, batch)

            jitted = jax.jit(step, in_shardings=(state, self.frozen_shardings(), self.batch_shardings(batch_shape)),
                             out_shardings=(state, replicated(self.mesh)), donate_argnums=0)
            self._jitted[key] = self.with_frozen(jitted)
        return self._jitted[key]

    def eval_loss(self) -> Callable[[dict[str, jax.Array], Batch], tuple[jax.Array, jax.Array]]:
        if "frozen_eval" not in self._jitted:
            def evaluate(params, frozen, batch):
                loss, (weight, _) = dataclasses.replace(self, frozen=frozen).micro_batch_sums()(params, batch)
                return loss, weight

            self._jitted["frozen_eval"] = self.with_frozen(jax.jit(evaluate))
        return self._jitted["frozen_eval"]

    def with_frozen(self, jitted: Callable) -> Callable:
        """(first, batch) → jitted(first, frozen, batch), traced with the mesh and rules in context."""

        def call(first, batch):
            with self.activation_sharding():
                return jitted(first, self.frozen, batch)

        call.lower = lambda first, batch: self._lower(jitted, first, self.frozen, batch)
        return call
