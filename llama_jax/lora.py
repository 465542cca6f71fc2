"""LoRA and QLoRA on a Llama: adapters, the adapted model, merging, PEFT export/import, and the adapter-only trainer.

For each targeted projection W (q, k, v, o, gate, up, down; `LoraConfig.targets`) a layer holds A [in, r] and
B [r, out], stacked along `layers` like the block weights, and computes with W + (alpha/r)·A·B, exactly as Hugging
Face PEFT's `LoraLayer` (scale `lora_alpha / r`, no rsLoRA). A starts as PEFT's kaiming-uniform
(U(±1/sqrt(in))) and B at zero, so a fresh adapter leaves the model unchanged.

    adapter parameters (flat names, float32)      adapters.<t>_a  [layers, in, r]     adapters.<t>_b  [layers, r, out]

`in`/`out` are the weight's input/output features flattened in our layout's order: w_q [dim, heads, head_dim] is
[dim, heads·head_dim] (head-major), w_o [heads, head_dim, dim] is [heads·head_dim, dim]. That is also the order of
Hugging Face's rows and columns (its q/k weights are our half-split rotary layout transposed, no permutation), so the
PEFT files are our A and B transposed per layer (`export_peft`, `import_peft`).

Why not qwix's LoRA (`qwix.LoraProvider` / `apply_lora_to_model`): it intercepts `jnp.einsum` inside the module call
and creates the adapters as module attributes. On this model (checked with qwix 0.1.8, flax 0.12.8, jax 0.10.2) it
fails twice: `apply_lora_to_model` attaches an unstacked `nnx.Rngs` to every submodule, including the blocks that
`nnx.scan` iterates over, and the scan fails (`IndexError: tuple index out of range` in `_infer_scan_length`); and on
a single unscanned block, differentiating fails with `TraceContextError: Cannot mutate 'SwiGLU' from different trace
level`, because the einsum it intercepts runs inside `llama_jax.ops.mixed_einsum`'s custom VJP. So the adapters are
explicit here. qwix is still what quantizes the frozen base for QLoRA (`qwix.quantize` / `qwix.dequantize`).

How the adapters enter the model without changing `llama_jax.model`: `LoraLlama` subclasses `Llama` and replaces
only the scan over the blocks. Inside the scan, each layer's targeted weights become W + (alpha/r)·A·B (W
dequantized first for QLoRA) and the unchanged `Block` runs on them. The merged weight exists for one layer at a
time, and its gradient too (turned into A's and B's inside the layer), so memory stays one layer's weights above the
frozen base; the backward pass computes each projection's weight gradient as full fine-tuning does. LoRA dropout
(which acts on the adapter's input only) cannot be expressed on a merged weight, so `lora.dropout` must be 0.

Training (`LoraTrainer`): the train state's `params` are the adapters only, so the optimizer state, the checkpoints
and the gradients are adapter-sized; the frozen base is a jit argument beside the state, rebuilt from the run's
`init_from` (and re-quantized, deterministically) when a run resumes. The run loop is `llama_jax.run_loop`'s.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.config import LoraConfig, ModelConfig, OptimizerConfig, RunConfig
from llama_jax.errors import ConfigError, ConversionError
from llama_jax.model import _CHECKPOINT_POLICIES, Llama
from llama_jax.params import merge_params, param_shapes
from llama_jax.sharding import DEFAULT_RULES, Rules, put_global, replicated
from llama_jax.trainer import Batch, Trainer, TrainState, chunked_cross_entropy, learning_rate_schedule, make_optimizer

Array = jax.Array


@dataclass(frozen=True)
class Target:
    weight: str  # our stacked parameter
    hf_module: str  # its module under model.layers.<i> in Hugging Face's LlamaForCausalLM
    input_axes: int  # how many leading axes of one layer's weight are input features


TARGETS = {
    "q": Target("blocks.attention.w_q", "self_attn.q_proj", 1),
    "k": Target("blocks.attention.w_k", "self_attn.k_proj", 1),
    "v": Target("blocks.attention.w_v", "self_attn.v_proj", 1),
    "o": Target("blocks.attention.w_o", "self_attn.o_proj", 2),
    "gate": Target("blocks.mlp.w_gate", "mlp.gate_proj", 1),
    "up": Target("blocks.mlp.w_up", "mlp.up_proj", 1),
    "down": Target("blocks.mlp.w_down", "mlp.down_proj", 1),
}
HF_TARGETS = {target.hf_module.split(".")[-1]: name for name, target in TARGETS.items()}  # q_proj → q
QUANT_GROUP = 64  # input features per int4/nf4 scale (bitsandbytes' QLoRA block size)
PEFT_PREFIX = "base_model.model.model.layers"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# adapter_config.json fields whose other values change what the adapter computes in ways this LoRA does not
UNSUPPORTED_PEFT = {"use_rslora": False, "use_dora": False, "bias": "none", "lora_bias": False, "fan_in_fan_out": False,
                    "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None, "rank_pattern": {},
                    "alpha_pattern": {}, "exclude_modules": None, "target_parameters": None,
                    "layer_replication": None, "trainable_token_indices": None}


# ── Shapes ───────────────────────────────────────────────────────────────────────────────────────────────────────
@functools.lru_cache(maxsize=16)
def _param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return param_shapes(config)  # from abstract shapes: cached, since the scan body asks once per target


def layer_shape(config: ModelConfig, target: str) -> tuple[int, ...]:
    """One layer's weight shape of `target` in our layout."""
    return _param_shapes(config)[TARGETS[target].weight][1:]


def in_out(config: ModelConfig, target: str) -> tuple[int, int]:
    shape = layer_shape(config, target)
    split = TARGETS[target].input_axes
    return math.prod(shape[:split]), math.prod(shape[split:])


def adapter_shapes(config: ModelConfig, lora: LoraConfig) -> dict[str, tuple[int, ...]]:
    """{adapter name: shape}, A [layers, in, r] and B [layers, r, out] per target."""
    shapes = {}
    for target in lora.target_names:
        fan_in, fan_out = in_out(config, target)
        shapes[f"adapters.{target}_a"] = (config.n_layers, fan_in, lora.rank)
        shapes[f"adapters.{target}_b"] = (config.n_layers, lora.rank, fan_out)
    return shapes


def init_adapters(config: ModelConfig, lora: LoraConfig, key: Array) -> dict[str, Array]:
    """PEFT's default initialisation: A ~ U(±1/sqrt(in)) (kaiming-uniform, a=√5), B = 0."""
    adapters = {}
    for (name, shape), target_key in zip(adapter_shapes(config, lora).items(),
                                         jax.random.split(key, 2 * len(lora.target_names))):
        if name.endswith("_a"):
            bound = 1.0 / math.sqrt(shape[1])
            adapters[name] = jax.random.uniform(target_key, shape, jnp.float32, -bound, bound)
        else:
            adapters[name] = jnp.zeros(shape, jnp.float32)
    return adapters


def _check_rank(lora: LoraConfig) -> None:
    if lora.rank <= 0:
        raise ConfigError(f"lora.rank={lora.rank} is not allowed here: expected a positive rank for a LoRA model")


# ── Quantized base (QLoRA) ───────────────────────────────────────────────────────────────────────────────────────
def _qtype(base_dtype: str) -> Any:
    return {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}[base_dtype]


def _how(fan_in: int, base_dtype: str) -> dict[str, Any]:
    """Scales per output feature (and layer); int4/nf4 also per group of QUANT_GROUP input features."""
    tiles = {} if base_dtype == "int8" or fan_in % QUANT_GROUP else {1: QUANT_GROUP}
    return {"channelwise_axes": (0, 2), "tiled_axes": tiles}


def quantize_weight(weight: Array, config: ModelConfig, target: str, base_dtype: str) -> tuple[Array, Array]:
    """(qvalue, scale) of a stacked weight flattened to [layers, in, out], by qwix."""
    import qwix

    fan_in, fan_out = in_out(config, target)
    flat = jnp.asarray(weight, jnp.float32).reshape(config.n_layers, fan_in, fan_out)
    quantized = qwix.quantize(flat, _qtype(base_dtype), **_how(fan_in, base_dtype))
    return quantized.qvalue, quantized.scale


def dequantize_weight(qvalue: Array, scale: Array, base_dtype: str) -> Array:
    import qwix

    return qwix.dequantize(qwix.QArray(qvalue=qvalue, scale=scale, qtype=_qtype(base_dtype)))


class FrozenQuantized(nnx.Variable):
    """A quantized base weight's values or scales: never trained."""


# ── The adapted model ────────────────────────────────────────────────────────────────────────────────────────────
class Adapters(nnx.Module):
    def __init__(self, config: ModelConfig, lora: LoraConfig, key: Array):
        for name, value in init_adapters(config, lora, key).items():
            setattr(self, name.split(".", 1)[1], nnx.LoRAParam(value))


class QuantizedBase(nnx.Module):
    """The targeted weights of a QLoRA base as qwix stores them (the float copies in `blocks` are empty)."""

    def __init__(self, config: ModelConfig, lora: LoraConfig, blocks: nnx.Module):
        for target in lora.target_names:
            weight = _block_variable(blocks, target)
            qvalue, scale = quantize_weight(weight[...], config, target, lora.base_dtype)
            setattr(self, f"{target}_qvalue", FrozenQuantized(qvalue))
            setattr(self, f"{target}_scale", FrozenQuantized(scale))
            weight.set_value(jnp.zeros((config.n_layers, 0), jnp.float32))


def _block_path(target: str) -> tuple[str, ...]:
    return tuple(TARGETS[target].weight.split(".")[1:])  # ("attention", "w_q")


def _block_variable(blocks: nnx.Module, target: str) -> nnx.Variable:
    module = blocks
    for part in _block_path(target):
        module = getattr(module, part)
    return module


class LoraLlama(Llama):
    """`Llama` whose targeted projections compute with W + (alpha/r)·A·B; call it as a Llama."""

    def __init__(self, config: ModelConfig, lora: LoraConfig, *, rngs: nnx.Rngs | None = None):
        _check_rank(lora)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        super().__init__(config, rngs=rngs)
        self.lora = lora
        self.adapters = Adapters(config, lora, rngs.params())
        self.quantized = QuantizedBase(config, lora, self.blocks) if lora.base_dtype != "float32" else None

    def _run_blocks(self, x: Array, inputs) -> Array:
        lora, config = self.lora, self.config
        block_def, block_state = nnx.split(self.blocks)
        weights = {path: variable[...] for path, variable in nnx.to_flat_state(block_state)}
        adapters = {t: (getattr(self.adapters, f"{t}_a")[...], getattr(self.adapters, f"{t}_b")[...])
                    for t in lora.target_names}
        quantized = {} if self.quantized is None else {
            t: (getattr(self.quantized, f"{t}_qvalue")[...], getattr(self.quantized, f"{t}_scale")[...])
            for t in lora.target_names}
        scale = lora.alpha / lora.rank

        def apply_block(x, layer):
            weights, adapters, quantized = layer
            weights = dict(weights)
            for target, (a, b) in adapters.items():
                path = _block_path(target)
                base = (dequantize_weight(*quantized[target], lora.base_dtype) if target in quantized
                        else weights[path]).reshape(layer_shape(config, target))
                weights[path] = base + (scale * (a @ b)).reshape(base.shape)
            block = nnx.merge(block_def, nnx.from_flat_state(list(weights.items())))
            return block(x, inputs, None)[0], None

        if config.remat_policy != "none":
            apply_block = jax.checkpoint(apply_block, policy=_CHECKPOINT_POLICIES[config.remat_policy])
        x, _ = jax.lax.scan(apply_block, x, (weights, adapters, quantized))
        return x


@functools.lru_cache(maxsize=16)
def lora_graphdef(config: ModelConfig, lora: LoraConfig) -> nnx.GraphDef:
    """LoraLlama's static structure, to rebuild it from flat parameters (inside jit too)."""
    return nnx.split(nnx.eval_shape(lambda: LoraLlama(config, lora)), nnx.Variable)[0]


def frozen_base(params: Mapping[str, Array], config: ModelConfig, lora: LoraConfig) -> dict[str, Array]:
    """The base parameters as a LoraLlama holds them: as given for float32, the targets quantized by qwix for
    int8/int4/nf4 (their float entries then empty)."""
    base = {name: jnp.asarray(value, jnp.float32) for name, value in params.items()}
    if lora.base_dtype == "float32":
        return base
    for target in lora.target_names:
        name = TARGETS[target].weight
        qvalue, scale = quantize_weight(base[name], config, target, lora.base_dtype)
        base[f"quantized.{target}_qvalue"], base[f"quantized.{target}_scale"] = qvalue, scale
        base[name] = jnp.zeros((config.n_layers, 0), jnp.float32)
    return base


def lora_model(base: Mapping[str, Array], adapters: Mapping[str, Array], config: ModelConfig,
               lora: LoraConfig) -> LoraLlama:
    """The LoRA model of a frozen base (`frozen_base`) and adapters (works inside jit)."""
    _check_rank(lora)
    return merge_params(lora_graphdef(config, lora), {**base, **adapters})


def merge(params: Mapping[str, Array], adapters: Mapping[str, Array], config: ModelConfig,
          lora: LoraConfig) -> dict[str, Array]:
    """Plain Llama parameters W + (alpha/r)·A·B. For a quantized base (QLoRA) W is the dequantized base the adapters
    were trained on, so the merged model computes what the LoRA model did."""
    merged = {name: jnp.asarray(value, jnp.float32) for name, value in params.items()}
    scale = lora.alpha / lora.rank
    for target in lora.target_names:
        name = TARGETS[target].weight
        weight = merged[name]
        if lora.base_dtype != "float32":
            weight = dequantize_weight(*quantize_weight(weight, config, target, lora.base_dtype), lora.base_dtype)
        delta = scale * jnp.einsum("lir,lro->lio", adapters[f"adapters.{target}_a"], adapters[f"adapters.{target}_b"])
        merged[name] = (weight.reshape(delta.shape) + delta).reshape(config.n_layers, *layer_shape(config, target))
    return merged


# ── PEFT files ───────────────────────────────────────────────────────────────────────────────────────────────────
def peft_config(lora: LoraConfig, base_model: str | None = None) -> dict[str, Any]:
    """adapter_config.json's fields (the ones PEFT's LoraConfig reads; the rest take PEFT's defaults)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "target_modules": sorted(TARGETS[t].hf_module.split(".")[-1]
                                                                   for t in lora.target_names),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model}


def peft_tensors(adapters: Mapping[str, Array], config: ModelConfig, lora: LoraConfig) -> dict[str, np.ndarray]:
    """{PEFT key: array}: lora_A.weight [r, in] and lora_B.weight [out, r] per layer and target (float32)."""
    tensors = {}
    for target in lora.target_names:
        a, b = (np.asarray(adapters[f"adapters.{target}_{part}"], np.float32) for part in "ab")
        for layer in range(config.n_layers):
            key = f"{PEFT_PREFIX}.{layer}.{TARGETS[target].hf_module}"
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[layer].T)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[layer].T)
    return tensors


def export_peft(adapters: Mapping[str, Array], config: ModelConfig, lora: LoraConfig, directory: str | Path,
                base_model: str | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors`, the files `peft.PeftModel.from_pretrained` loads
    onto the Hugging Face export of the base (`llama_jax.save(model, dir, format="hf")`)."""
    from safetensors.numpy import save_file

    _check_rank(lora)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config(lora, base_model), indent=2) + "\n")
    save_file(peft_tensors(adapters, config, lora), directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return directory


def import_peft(directory: str | Path, config: ModelConfig) -> tuple[LoraConfig, dict[str, Array]]:
    """(LoraConfig, adapters) of a PEFT LoRA adapter directory for a Llama of `config`; anything PEFT can express
    that this LoRA cannot (rsLoRA, DoRA, biases, per-module ranks, other modules) is a ConversionError naming it."""
    directory = Path(directory)
    raw = _read_adapter_config(directory)
    lora = _lora_from_peft(raw, directory / ADAPTER_CONFIG)
    tensors = _read_adapter_tensors(directory)
    adapters, expected = {}, set()
    for target in lora.target_names:
        fan_in, fan_out = in_out(config, target)
        for part, letter, shape in (("a", "A", (lora.rank, fan_in)), ("b", "B", (fan_out, lora.rank))):
            layers = []
            for layer in range(config.n_layers):
                key = _find_key(tensors, f"{layer}.{TARGETS[target].hf_module}.lora_{letter}", directory)
                expected.add(key)
                if tuple(tensors[key].shape) != shape:
                    raise ConversionError(f"{directory / ADAPTER_WEIGHTS}: {key} has shape {tuple(tensors[key].shape)}"
                                          f", expected {shape} for r={lora.rank} on this model")
                layers.append(np.asarray(tensors[key], np.float32).T)
            adapters[f"adapters.{target}_{part}"] = jnp.asarray(np.stack(layers))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ConversionError(f"{directory / ADAPTER_WEIGHTS} holds tensors this model has no place for: {extra[:4]}")
    return lora, adapters


def _read_adapter_config(directory: Path) -> dict[str, Any]:
    path = directory / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} does not exist: a PEFT adapter folder holds {ADAPTER_CONFIG} and "
                              f"{ADAPTER_WEIGHTS}") from None
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path} is not readable JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{path} must hold a JSON object")
    return raw


def _lora_from_peft(raw: dict[str, Any], path: Path) -> LoraConfig:
    if raw.get("peft_type") != "LORA":
        raise ConversionError(f"{path}: peft_type={raw.get('peft_type')!r}; only LORA adapters can be imported")
    for key, default in UNSUPPORTED_PEFT.items():
        value = raw.get(key, default)
        if value != default and value not in (None, [], {}):
            raise ConversionError(f"{path}: {key}={value!r} is not supported: expected {default!r}")
    modules = raw.get("target_modules")
    if isinstance(modules, str) or not modules:
        raise ConversionError(f"{path}: target_modules={modules!r} must list module names among "
                              f"{sorted(HF_TARGETS)} (regular expressions are not supported)")
    unknown = sorted(set(modules) - set(HF_TARGETS))
    if unknown:
        raise ConversionError(f"{path}: target_modules {unknown} are not Llama projections: expected names among "
                              f"{sorted(HF_TARGETS)}")
    targets = ",".join(t for t in TARGETS if TARGETS[t].hf_module.split(".")[-1] in modules)
    try:
        return LoraConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]), targets=targets)
    except (KeyError, TypeError, ValueError, ConfigError) as error:
        raise ConversionError(f"{path}: r / lora_alpha missing or invalid ({error})") from None


def _read_adapter_tensors(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ConversionError(f"{path} does not exist (adapter_model.bin is not read: save with safetensors)")
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise ConversionError(f"{path} is not a readable safetensors file: {error}") from None


def _find_key(tensors: Mapping[str, np.ndarray], middle: str, directory: Path) -> str:
    """PEFT's key for layer.module.lora_X: `base_model.model.model.layers.<middle>.weight`, the adapter name
    ('.default') absent in saved files but tolerated."""
    for key in (f"{PEFT_PREFIX}.{middle}.weight", f"{PEFT_PREFIX}.{middle}.default.weight"):
        if key in tensors:
            return key
    raise ConversionError(f"{directory / ADAPTER_WEIGHTS} lacks {PEFT_PREFIX}.{middle}.weight")


# ── Training ─────────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True, kw_only=True)
class LoraTrainer(Trainer):
    """The train step of LoRA: gradients, optimizer state and checkpoints hold the adapters only; the frozen base
    (float or quantized) travels as a jit argument. Adapters are small, so they and their optimizer state are
    replicated on every device; the base is sharded as full training shards the parameters (quantized weights are
    replicated)."""

    lora: LoraConfig
    base: dict[str, Array] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def create_lora(cls, model_config: ModelConfig, optimizer_config: OptimizerConfig, total_steps: int, mesh,
                    lora: LoraConfig, base_params: Mapping[str, Array], rules: Rules = DEFAULT_RULES,
                    grad_accum: int = 1) -> LoraTrainer:
        _check_rank(lora)
        trainer = cls(model_config, mesh, rules, optimizer=make_optimizer(optimizer_config, total_steps),
                      schedule=learning_rate_schedule(optimizer_config, total_steps), grad_accum=grad_accum,
                      lora=lora)
        base = frozen_base(base_params, model_config, lora)
        shardings = trainer.base_shardings(base)
        placed = {name: put_global(value, shardings[name]) for name, value in base.items()}
        return dataclasses.replace(trainer, base=placed)

    @functools.cached_property
    def graphdef(self) -> nnx.GraphDef:
        return lora_graphdef(self.model_config, self.lora)

    def base_shardings(self, base: Mapping[str, Array] | None = None) -> dict[str, jax.sharding.Sharding]:
        base = self.base if base is None else base
        full, shapes = self.param_shardings(), param_shapes(self.model_config)
        # A quantized target's empty placeholder and qwix's values and scales are replicated.
        return {name: full[name] if name in full and tuple(value.shape) == shapes[name] else replicated(self.mesh)
                for name, value in base.items()}

    def state_shardings(self) -> TrainState:
        return jax.tree.map(lambda _: replicated(self.mesh), self.abstract_state())

    def _init(self, seed: int) -> TrainState:
        params_key, rng = jax.random.split(jax.random.key(seed))
        adapters = init_adapters(self.model_config, self.lora, params_key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=adapters, opt_state=self.optimizer.init(adapters),
                          rng=jax.random.key_data(rng), data_skip=jnp.zeros((), jnp.int32))

    def micro_batch_loss(self) -> Callable[[dict[str, Array], Batch], tuple[Array, Array]]:
        graphdef, base = self.graphdef, self.base

        def loss(adapters, batch):
            model = merge_params(graphdef, {**base, **adapters})
            hidden = model.hidden_states(batch["inputs"], positions=batch.get("positions"),
                                         segment_ids=batch.get("segment_ids"))
            return chunked_cross_entropy(model, hidden, batch["targets"], batch["loss_mask"])

        return loss

    def jit_step(self, batch_shape: tuple[int, int]) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
        key = ("lora_step", tuple(batch_shape))
        if key not in self._jitted:
            state = self.state_shardings()

            def step(state, base, batch):
                return dataclasses.replace(self, base=base).train_step(state, batch)

            jitted = jax.jit(step, in_shardings=(state, self.base_shardings(), self.batch_shardings(batch_shape)),
                             out_shardings=(state, replicated(self.mesh)), donate_argnums=0)
            self._jitted[key] = self._with_base(jitted)
        return self._jitted[key]

    def eval_loss(self) -> Callable[[dict[str, Array], Batch], tuple[Array, Array]]:
        if "lora_eval" not in self._jitted:
            jitted = jax.jit(lambda adapters, base, batch: dataclasses.replace(self, base=base).micro_batch_loss()(
                adapters, batch))
            self._jitted["lora_eval"] = self._with_base(jitted)
        return self._jitted["lora_eval"]

    def _with_base(self, jitted: Callable) -> Callable:
        """(state or adapters, batch) → jitted(…, base, batch), traced with the mesh and rules in context."""

        def call(first, batch):
            with self.activation_sharding():
                return jitted(first, self.base, batch)

        call.lower = lambda first, batch: self._lower(jitted, first, self.base, batch)
        return call


# ── Runs ─────────────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class LoraRun:
    """What a LoRA training run directory holds: its config (with `init_from`, the base) and the newest adapters."""

    config: RunConfig
    model_config: ModelConfig
    step: int
    adapters: dict[str, Array]

    @property
    def lora(self) -> LoraConfig:
        return self.config.lora


def is_lora_run(path: str | Path) -> bool:
    """Whether `path` is a training run directory whose config trains LoRA adapters (its `lora.rank` alone is read:
    a run's config is validated where the run is read, not here)."""
    from llama_jax.config import read_yaml_mapping
    from llama_jax.convert.native import RUN_CONFIG

    config_file = Path(path) / RUN_CONFIG
    if not config_file.is_file():
        return False
    lora = read_yaml_mapping(config_file, "run config").get("lora")
    rank = lora.get("rank", 0) if isinstance(lora, dict) else 0
    return isinstance(rank, int) and rank > 0


def read_lora_run(run_dir: str | Path) -> LoraRun:
    """The newest complete checkpoint's adapters of a LoRA run (`train.sft ... lora.rank=R`)."""
    from llama_jax.config import load_config
    from llama_jax.convert.native import RUN_CONFIG, ArrayReader, latest_run_checkpoint, run_model_config

    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG).is_file():
        raise ConfigError(f"{run_dir} is not a training run directory: it has no {RUN_CONFIG}")
    config = load_config(run_dir / RUN_CONFIG)
    if config.lora.rank <= 0:
        raise ConfigError(f"{run_dir / RUN_CONFIG} has lora.rank={config.lora.rank}: not a LoRA run (its checkpoint "
                          f"is a full model: read it with llama_jax.load)")
    if config.init_from is None:
        raise ConfigError(f"{run_dir / RUN_CONFIG} has no init_from: the LoRA run's base model is unknown")
    model_config = run_model_config(run_dir)
    step, params_dir = latest_run_checkpoint(run_dir)
    reader = ArrayReader(params_dir)
    expected = adapter_shapes(model_config, config.lora)
    if sorted(reader.names()) != sorted(expected):
        raise ConversionError(f"{params_dir} holds {sorted(reader.names())}, not the adapters {sorted(expected)} of "
                              f"lora.targets={config.lora.targets}")
    adapters = {name: jnp.asarray(reader.read(name), jnp.float32) for name in expected}
    return LoraRun(config, model_config, step, adapters)
