"""A model's parameters as a flat dict {dotted name: array}: the form the train step, checkpoints and converters use,
and `ModelOnMesh`, where they and the batches live on a device mesh.

Names, shapes and logical axes come from abstract shapes of `llama_jax.model.Llama` (nothing is allocated); the list
of names with their shapes is in `llama_jax.convert.weight_map`'s docstring.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llama_jax.config import ModelConfig
from llama_jax.errors import ConversionError
from llama_jax.model import Llama
from llama_jax.sharding import DEFAULT_RULES, Rules, activation_sharding, batch_sharding, param_shardings, place_rows


def abstract_model(config: ModelConfig) -> Llama:
    """The model with ShapeDtypeStructs for parameters: nothing is allocated (for 7B-70B planning and checks)."""
    return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))


def graphdef(config: ModelConfig) -> nnx.GraphDef:
    """The model's static structure, to rebuild it from flat parameters with `merge_params` (inside jit too)."""
    return nnx.split(abstract_model(config), nnx.Param)[0]


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    logical_axes: tuple[str, ...]


def param_specs(config: ModelConfig) -> dict[str, ParamSpec]:
    """Our parameter names, shapes and logical axes, from abstract shapes (nothing is allocated)."""
    abstract = abstract_model(config)
    return {name: ParamSpec(tuple(variable.shape), tuple(variable.get_metadata()["logical_axes"]))
            for name, variable in _flat(nnx.state(abstract, nnx.Param)).items()}


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {name: spec.shape for name, spec in param_specs(config).items()}


def _flat(state: nnx.State) -> dict[str, nnx.Variable]:
    return {".".join(str(part) for part in path): variable for path, variable in nnx.to_flat_state(state)}


def model_params(model: Llama) -> dict[str, jax.Array]:
    """Our parameters by dotted name."""
    return {name: variable[...] for name, variable in _flat(nnx.state(model, nnx.Param)).items()}


def merge_params(graphdef: nnx.GraphDef, params: Mapping[str, jax.Array]) -> Llama:
    """A model from its graph definition and flat parameters (works inside jit: the parameters may be tracers)."""
    return nnx.merge(graphdef, nnx.from_flat_state([(tuple(name.split(".")), value) for name, value in params.items()]))


@dataclass(frozen=True)
class ModelOnMesh:
    """A model's structure on a device mesh: what the train step (`trainer.Trainer`) and scoring (`scoring.Scorer`)
    both stand on. Parameters are split by the logical rules, batches along the batch axis, and activations are
    constrained by the same rules while a function is traced under `activation_sharding()`."""

    model_config: ModelConfig
    mesh: Mesh
    rules: Rules = DEFAULT_RULES

    @functools.cached_property
    def graphdef(self) -> nnx.GraphDef:
        return graphdef(self.model_config)

    def param_shardings(self) -> dict[str, NamedSharding]:
        return param_shardings(param_specs(self.model_config), self.mesh, self.rules)

    def batch_shardings(self, batch_shape: tuple[int, int]) -> NamedSharding:
        return batch_sharding(self.mesh, self.rules, batch_shape)

    def place_rows(self, local: Mapping[str, np.ndarray], global_rows: int) -> dict[str, jax.Array]:
        """This process's rows of a [global_rows, seq] batch as global arrays split along the batch axis."""
        return place_rows(local, global_rows, self.mesh, self.rules)

    def activation_sharding(self) -> AbstractContextManager[None]:
        return activation_sharding(self.mesh, self.rules)


def model_from_params(config: ModelConfig, params: Mapping[str, np.ndarray | jax.Array]) -> Llama:
    """A model holding exactly `params` (float32); names and shapes are checked against the config."""
    model = abstract_model(config)
    variables = _flat(nnx.state(model, nnx.Param))
    missing, extra = sorted(set(variables) - set(params)), sorted(set(params) - set(variables))
    if missing or extra:
        raise ConversionError(f"parameters do not match the config: missing {missing}, unexpected {extra}")
    for name, variable in variables.items():
        value = params[name]
        if tuple(value.shape) != tuple(variable.shape):
            raise ConversionError(f"parameter {name} has shape {tuple(value.shape)}, the config needs "
                                  f"{tuple(variable.shape)}")
        variable.set_value(jax.numpy.asarray(value, dtype=jax.numpy.float32))
    return model
