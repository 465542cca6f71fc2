"""Weight-only int8 / int4 quantization for inference, and quantized checkpoints (quantize once, load many times).

    quantize_model(model, "int8" | "int4", group_size=...)   Llama → the same Llama with its block matrices quantized
    python -m llama_jax.quantize SRC DST --quantize int4       any checkpoint → quantized checkpoint (with tokenizer)
    load_model(path, quantize=..., group_size=...)             any checkpoint → float or quantized Llama (a float one
                                                               is quantized layer by layer while it is read)
    save_quantized(model, path) / load_quantized(path)         a quantized llama-jax checkpoint

What is quantized: the seven matrices of every block (w_q, w_k, w_v, w_o, w_gate, w_up, w_down), symmetric absmax
per group: each output channel's input features are cut into groups of `group_size` consecutive features (the
input of w_o is its flattened (heads, head_dim)), and each group gets one float32 scale = absmax / (qmax + ½) with
q = clip(round(w / scale), qmin, qmax) (qwix's symmetric integer scheme: int8 qmax 127, int4 qmax 7). group_size
None means one group per output channel (the whole input). The embedding, the norms and the output head stay float:
they are a few percent of a 7B model's weights, the head sets every logit, and the embedding is read by a gather
that int arrays would have to be dequantized for in full (docs/quantization.md).

How: the arrays are qwix `QArray`s (`qwix.quantize` / `qwix.dequantize`) held by `QuantizedParam`, an `nnx.Param`
whose `[...]` returns the dequantized float32 weight in the model's own shape. The model code is unchanged: every
product still goes through `llama_jax.ops.dot`, which casts the weight to the compute dtype, and the dequantization
runs inside the jitted forward pass next to it (qwix's own `einsum`/`dot_general` does the same, dequantize then a
float product, whenever the other operand is a float activation). So a quantized model is a `Llama`: `model(tokens)`,
`generate`, `stream` and `model_params` (dequantized) all work on it. qwix's model-level interception
(`qwix.quantize_model` + `PtqProvider`) cannot work on this model: it swaps a module's parameter for its quantized
form from inside the first call, which NNX refuses inside the scan over the stacked blocks (TraceContextError), and
our products run `jnp.einsum` inside a `custom_vjp`, where the weight is a fresh tracer that qwix does not recognise
as a parameter, so it would silently stay float.

Checkpoint: a llama-jax checkpoint directory (`model.json`, `params/` written by `convert.native.write_native`) plus
`quantization.json` ({"mode", "group_size", "format_version"}). A quantized weight NAME is stored as `NAME.qvalue`
(int8; for int4 two values per byte, uint8 [.., in/2, out], because TensorStore stores an int4 array one value per
byte) and `NAME.scale` (float32); every other parameter as float32 under its own name.
"""
from __future__ import annotations

import functools
import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from llama_jax.config import ModelConfig
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.model import Llama

MODES = ("int8", "int4")
QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
QMAX = {"int8": 127, "int4": 7}
# int8 per output channel, as LLM.int8 and qwix default to; int4 in groups of 64 as bitsandbytes' 4-bit blocks (64
# divides the hidden sizes of the Llama 2/3 models and of configs/tiny.yaml, 128 does not divide tiny's 704).
DEFAULT_GROUP_SIZE: dict[str, int | None] = {"int8": None, "int4": 64}
# Quantized parameters → (input axes, output axes) after the leading layers axis. Input axes are the ones the product
# contracts with the activations; groups run along them (flattened).
QUANTIZED_WEIGHTS: dict[str, tuple[int, int]] = {
    "blocks.attention.w_q": (1, 2), "blocks.attention.w_k": (1, 2), "blocks.attention.w_v": (1, 2),
    "blocks.attention.w_o": (2, 1),
    "blocks.mlp.w_gate": (1, 1), "blocks.mlp.w_up": (1, 1), "blocks.mlp.w_down": (1, 1),
}
QUANTIZATION_FILE = "quantization.json"
FORMAT_VERSION = 1

Array = jax.Array


# ── The scheme ───────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Quantization:
    """A checked mode and group size (None: one group per output channel).

    `of` takes the user's group size: None for the mode's default, 0 for one group per output channel."""

    mode: str
    group_size: int | None

    @classmethod
    def of(cls, mode: str, group_size: int | None = None) -> Quantization:
        if mode not in MODES:
            raise ConfigError(f"quantization mode {mode!r} is not supported: expected one of {', '.join(MODES)}")
        if group_size is None:
            group_size = DEFAULT_GROUP_SIZE[mode]
        elif isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0 or group_size == 1:
            raise ConfigError(f"group_size={group_size!r} is not allowed: expected an integer >= 2 that divides "
                              "every quantized weight's input size, or 0 (one group per output channel)")
        elif group_size == 0:
            group_size = None
        elif mode == "int4" and group_size % 2:
            raise ConfigError(f"group_size={group_size} is not allowed for int4: expected an even size (two int4 "
                              "values share a byte on disk)")
        return cls(mode, group_size)

    def check(self, config: ModelConfig) -> None:
        """Every quantized weight's input size is a multiple of the group size (an error names the first that is
        not, and the sizes that would do)."""
        sizes = input_sizes(config)
        if self.group_size is not None:
            for name, size in sizes.items():
                if size % self.group_size:
                    fits = [g for g in (32, 64, 128, 256) if all(s % g == 0 for s in sizes.values())]
                    raise ConfigError(f"group_size={self.group_size} does not divide the input size {size} of "
                                      f"{name}: use a divisor of every weight's input size (e.g. "
                                      f"{', '.join(map(str, fits)) or 'none of 32-256 fits'}), or 0 for one group "
                                      "per output channel")
        elif self.mode == "int4" and any(size % 2 for size in sizes.values()):
            raise ConfigError("int4 needs even input sizes (two values per byte on disk): "
                              f"{ {name: size for name, size in sizes.items() if size % 2} }")

    def __str__(self) -> str:
        groups = "one scale per output channel" if self.group_size is None else f"groups of {self.group_size}"
        return f"{self.mode}, {groups}"

    def to_json(self) -> dict:
        # 0, not null, for one group per output channel: null would read back as the mode's default
        return {"format_version": FORMAT_VERSION, "mode": self.mode, "group_size": self.group_size or 0}


def input_sizes(config: ModelConfig) -> dict[str, int]:
    """{quantized weight: its input size}: the features its product contracts, where the groups run."""
    return {name: math.prod(_split_shape(shape[1:], name)[1]) for name, shape in weight_shapes(config).items()}


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    from llama_jax.params import param_shapes

    shapes = param_shapes(config)
    return {name: shapes[name] for name in QUANTIZED_WEIGHTS}


def _split_shape(shape: tuple[int, ...], name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(leading axes, input axes, output axes) of a weight, stacked ([layers, ...]) or one layer's."""
    n_in, n_out = QUANTIZED_WEIGHTS[name]
    lead = len(shape) - n_in - n_out
    return tuple(shape[:lead]), tuple(shape[lead:lead + n_in]), tuple(shape[lead + n_in:])


@functools.partial(jax.jit, static_argnames=("name", "quantization"))
def quantize_array(weight: Array, name: str, quantization: Quantization) -> qwix.QArray:
    """A float weight (stacked or one layer) as a QArray of shape [*leading, input, output] (input and output axes
    flattened), with one scale per (leading index, group of input features, output feature)."""
    lead, in_shape, out_shape = _split_shape(tuple(weight.shape), name)
    matrix = weight.astype(jnp.float32).reshape(*lead, math.prod(in_shape), math.prod(out_shape))
    tiled = {} if quantization.group_size is None else {len(lead): quantization.group_size}
    return qwix.quantize(matrix, QTYPES[quantization.mode], channelwise_axes=(*range(len(lead)), len(lead) + 1),
                         tiled_axes=tiled)


class QuantizedParam(nnx.Param):
    """A block matrix held as a qwix QArray [*leading, input, output]; `[...]` gives the float32 weight in the model's
    own shape (so the model's code reads it like any parameter, and the dequantization is traced into its jit)."""

    def dequantized(self) -> Array:
        qarray = self.get_value()
        in_shape, out_shape = self.get_metadata()["in_shape"], self.get_metadata()["out_shape"]
        weight = qwix.dequantize(qarray)
        return weight.reshape(*weight.shape[:-2], *in_shape, *out_shape)

    def __getitem__(self, key):
        return self.dequantized()[key]

    @property
    def shape(self) -> tuple[int, ...]:
        qarray = self.get_value()
        return (*qarray.shape[:-2], *self.get_metadata()["in_shape"], *self.get_metadata()["out_shape"])


def is_quantized(value: object) -> bool:
    """True for a QArray: pytree maps that cast or slice weights treat it as one leaf (`generate.decode_weights`)."""
    return isinstance(value, qwix.QArray)


def _quantized_param(qarray: qwix.QArray, name: str, shape: tuple[int, ...], quantization: Quantization
                     ) -> QuantizedParam:
    _, in_shape, out_shape = _split_shape(shape, name)
    return QuantizedParam(qarray, in_shape=in_shape, out_shape=out_shape, mode=quantization.mode,
                          group_size=quantization.group_size)


def _module_and_attribute(model: Llama, name: str) -> tuple[nnx.Module, str]:
    *path, attribute = name.split(".")
    return functools.reduce(getattr, path, model), attribute


# ── Models ───────────────────────────────────────────────────────────────────────────────────────────────────────
def quantize_model(model: Llama, mode: str, *, group_size: int | None = None) -> Llama:
    """A new model whose block matrices are quantized (`model` is left as it is; the other weights are shared).

    mode: "int8" or "int4"; group_size: input features per scale (default: int8 per output channel, int4 64; 0: one
    scale per output channel).
    """
    quantization = Quantization.of(mode, group_size)
    quantization.check(model.config)
    if quantization_of(model) is not None:
        raise ConfigError(f"the model is already quantized ({quantization_of(model)}): quantize the float model")
    graphdef, state = nnx.split(model)
    quantized = nnx.merge(graphdef, state)  # new Variables around the same arrays
    for name in QUANTIZED_WEIGHTS:
        module, attribute = _module_and_attribute(quantized, name)
        weight = getattr(module, attribute)[...]
        setattr(module, attribute, _quantized_param(quantize_array(weight, name, quantization), name,
                                                    tuple(weight.shape), quantization))
    return quantized


def quantization_of(model: Llama) -> Quantization | None:
    """The model's quantization, or None for a float model."""
    module, attribute = _module_and_attribute(model, next(iter(QUANTIZED_WEIGHTS)))
    variable = getattr(module, attribute)
    if not isinstance(variable, QuantizedParam):
        return None
    return Quantization(variable.get_metadata()["mode"], variable.get_metadata()["group_size"])


# ── Checkpoints ──────────────────────────────────────────────────────────────────────────────────────────────────
def is_quantized_checkpoint(path: str | Path) -> bool:
    return (Path(path) / QUANTIZATION_FILE).is_file()


def pack_int4(values: np.ndarray) -> np.ndarray:
    """int4 values [..., n, m] (n even) → uint8 [..., n/2, m]: row 2i in the low nibble, row 2i+1 in the high one."""
    nibbles = np.asarray(values).astype(np.int8).astype(np.uint8) & 0x0F
    return nibbles[..., 0::2, :] | (nibbles[..., 1::2, :] << 4)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """The inverse of `pack_int4`: int8 values in [-8, 7]."""
    low, high = (packed & 0x0F).astype(np.int8), (packed >> 4).astype(np.int8)
    values = np.stack([low, high], axis=-2).reshape(*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1])
    return np.where(values > 7, values - 16, values).astype(np.int8)


def save_quantized(model: Llama, path: str | Path, *, overwrite: bool = False,
                   companions: list[Path] = ()) -> Path:
    """Write a quantized model as a quantized llama-jax checkpoint (format in the module docstring); `companions`
    (e.g. tokenizer files) are copied beside it."""
    from llama_jax.convert import native
    from llama_jax.convert.common import staged_output

    quantization = quantization_of(model)
    if quantization is None:
        raise ConfigError("save_quantized needs a quantized model: call quantize_model(model, 'int8' | 'int4') first "
                          "(a float model is saved with llama_jax.save)")
    arrays: dict[str, np.ndarray] = {}
    for path_parts, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(str(part) for part in path_parts)
        value = variable.get_value()
        if isinstance(value, qwix.QArray):
            qvalue = np.asarray(value.qvalue)
            arrays[f"{name}.qvalue"] = pack_int4(qvalue) if quantization.mode == "int4" else qvalue
            arrays[f"{name}.scale"] = np.asarray(value.scale, np.float32)
        else:
            arrays[name] = np.asarray(value, np.float32)
    with staged_output(path, overwrite) as staging:
        native.write_native(model.config, arrays, staging)
        (staging / QUANTIZATION_FILE).write_text(json.dumps(quantization.to_json(), indent=2) + "\n")
        for file in companions:
            shutil.copyfile(file, staging / Path(file).name)
    return Path(path)


def read_quantization(path: str | Path) -> Quantization:
    from llama_jax.convert.common import read_json_object

    file = Path(path) / QUANTIZATION_FILE
    raw = read_json_object(file)
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {raw.get('format_version')!r} is not supported (expected "
                              f"{FORMAT_VERSION})")
    try:
        return Quantization.of(raw.get("mode"), raw.get("group_size"))
    except ConfigError as error:
        raise CheckpointError(f"{file}: {error}") from None


def load_quantized(path: str | Path, *, dtype: str | None = None) -> Llama:
    """The quantized model saved at `path` by `save_quantized`; dtype: the compute dtype (default: the saved one)."""
    import dataclasses

    from llama_jax.convert import native

    path = Path(path)
    if not is_quantized_checkpoint(path):
        raise CheckpointError(f"{path} is not a quantized llama-jax checkpoint (no {QUANTIZATION_FILE})")
    quantization = read_quantization(path)
    config = native.read_model_json(path / native.MODEL_FILE)
    config = config if dtype is None else dataclasses.replace(config, dtype=dtype)
    reader = native.ArrayReader(path / native.PARAMS_DIR)
    stored = set(reader.names())

    def read(name: str) -> np.ndarray:
        if name not in stored:
            raise CheckpointError(f"{path / native.PARAMS_DIR} lacks the array {name}")
        return reader.read(name)

    def weight(name: str, shape: tuple[int, ...]) -> Array | qwix.QArray:
        if name not in QUANTIZED_WEIGHTS:
            return jnp.asarray(read(name), jnp.float32)
        qvalue = read(f"{name}.qvalue")
        qvalue = unpack_int4(qvalue) if quantization.mode == "int4" else qvalue
        return qwix.QArray(jnp.asarray(qvalue, QTYPES[quantization.mode]), jnp.asarray(read(f"{name}.scale")),
                           qtype=QTYPES[quantization.mode])

    return _assemble(config, quantization, weight)


def _assemble(config: ModelConfig, quantization: Quantization | None, weight) -> Llama:
    """A model from `weight(name, shape)`, which returns a float array or (for the quantized names) a QArray."""
    from llama_jax.params import abstract_model, param_shapes

    model = abstract_model(config)
    for name, shape in param_shapes(config).items():
        value = weight(name, shape)
        module, attribute = _module_and_attribute(model, name)
        if isinstance(value, qwix.QArray):
            lead, in_shape, out_shape = _split_shape(shape, name)
            expected = (*lead, math.prod(in_shape), math.prod(out_shape))
            groups = 1 if quantization.group_size is None else expected[-2] // quantization.group_size
            if tuple(value.shape) != expected or tuple(value.scale.shape) != (*lead, groups, expected[-1]):
                raise CheckpointError(f"quantized weight {name} has shape {tuple(value.shape)} with scales "
                                      f"{tuple(value.scale.shape)}, the config and {quantization} need {expected} "
                                      f"with {(*lead, groups, expected[-1])}")
            setattr(module, attribute, _quantized_param(value, name, shape, quantization))
        else:
            if tuple(value.shape) != tuple(shape):
                raise CheckpointError(f"parameter {name} has shape {tuple(value.shape)}, the config needs "
                                      f"{tuple(shape)}")
            getattr(module, attribute).set_value(value)
    return model


def load_model(path: str | Path, *, quantize: str | None = None, group_size: int | None = None,
               dtype: str | None = None) -> Llama:
    """The model at `path`: a quantized checkpoint as saved, or any float checkpoint (`llama_jax.load`'s formats),
    quantized when `quantize` is given. A float checkpoint is then read one layer of one weight at a time and each
    is quantized as it arrives, so the float32 model never exists in memory (only its float embedding and head)."""
    import dataclasses

    from llama_jax.convert import load, open_source

    if is_quantized_checkpoint(path):
        saved = read_quantization(path)
        wanted = None if quantize is None else Quantization.of(quantize, group_size)
        if wanted is not None and wanted != saved:
            raise ConfigError(f"{path} is already quantized ({saved}): it cannot be quantized as {wanted}; drop "
                              "--quantize or start from the float checkpoint")
        return load_quantized(path, dtype=dtype)
    if quantize is None:
        if group_size is not None:
            raise ConfigError(f"group_size={group_size} needs a quantization mode (--quantize int8|int4)")
        return load(path, dtype=dtype)
    quantization = Quantization.of(quantize, group_size)
    with open_source(path) as source:
        config = source.config if dtype is None else dataclasses.replace(source.config, dtype=dtype)
        quantization.check(config)

        def weight(name: str, shape: tuple[int, ...]) -> Array | qwix.QArray:
            if name not in QUANTIZED_WEIGHTS:
                return jnp.asarray(source.read(name), jnp.float32)
            # The block matrices are stacked [layers, ...]: one layer in float at a time.
            layers = [quantize_array(jnp.asarray(source.read_layer(name, layer)), name, quantization)
                      for layer in range(shape[0])]
            return jax.tree.map(lambda *parts: jnp.stack(parts), *layers)

        return _assemble(config, quantization, weight)


def quantize_checkpoint(src: str | Path, dst: str | Path, mode: str, *, group_size: int | None = None,
                        overwrite: bool = False) -> Path:
    """Quantize the checkpoint at `src` (any format, read layer by layer) into a quantized checkpoint at `dst`,
    with its tokenizer files."""
    from llama_jax.convert import TOKENIZER_FILES

    model = load_model(src, quantize=mode, group_size=group_size)
    companions = [Path(src) / name for name in TOKENIZER_FILES if (Path(src) / name).is_file()]
    return save_quantized(model, dst, overwrite=overwrite, companions=companions)


def quantized_params(model: Llama) -> Mapping[str, qwix.QArray]:
    """{name: QArray} of a quantized model's block matrices (empty for a float model)."""
    found = {}
    for name in QUANTIZED_WEIGHTS:
        module, attribute = _module_and_attribute(model, name)
        value = getattr(module, attribute).get_value()
        if isinstance(value, qwix.QArray):
            found[name] = value
    return found


# ── Programs ─────────────────────────────────────────────────────────────────────────────────────────────────────
def add_quantize_arguments(parser) -> None:
    """--quantize and --group-size, for the programs that load a model (`scoring.model_from_args` reads them)."""
    parser.add_argument("--quantize", choices=MODES, default=None,
                        help="weight-only quantization of the block matrices (a float checkpoint is quantized "
                             "layer by layer while it loads; a quantized checkpoint loads as saved)")
    parser.add_argument("--group-size", type=int, default=None, metavar="N",
                        help="input features per scale (default: int8 one scale per output channel, int4 64; "
                             "0: one scale per output channel)")


def main(argv=None) -> int:
    """python -m llama_jax.quantize SRC DST --quantize int8|int4 [--group-size N] [--overwrite]"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llama_jax.quantize",
                                     description="Quantize a checkpoint of any format (read layer by layer) into a "
                                                 "quantized llama-jax checkpoint, tokenizer files included.")
    parser.add_argument("src", help="float checkpoint: llama-jax, run directory, Hugging Face or Meta")
    parser.add_argument("dst", help="where to write the quantized checkpoint")
    add_quantize_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    args = parser.parse_args(argv)
    if args.quantize is None:
        raise ConfigError("--quantize int8|int4 is required")
    path = quantize_checkpoint(args.src, args.dst, args.quantize, group_size=args.group_size,
                               overwrite=args.overwrite)
    print(f"{path}: {read_quantization(path)}")
    return 0


if __name__ == "__main__":
    from llama_jax.cli import run_program

    run_program(main)
