"""Weight-only int8 / int4 quantization: the scheme against a numpy reference written here, the quantized model against
a float model built from the reference's dequantized weights (a second code path), checkpoints, and eval.generate.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax
from llama_jax import quantize
from llama_jax.config import MODEL_PRESETS
from llama_jax.convert.native import ArrayReader
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.generate import generate
from llama_jax.params import model_from_params, model_params, param_shapes

REPO = Path(__file__).resolve().parents[1]
CONFIG = dataclasses.replace(MODEL_PRESETS["test"], vocab_size=320)  # dim 64, hidden 160, 4 heads × 16
# (input axes, output axes) after the layers axis, written out again here rather than read from the module.
LAYOUT = {"blocks.attention.w_q": (1, 2), "blocks.attention.w_k": (1, 2), "blocks.attention.w_v": (1, 2),
          "blocks.attention.w_o": (2, 1), "blocks.mlp.w_gate": (1, 1), "blocks.mlp.w_up": (1, 1),
          "blocks.mlp.w_down": (1, 1)}
SCHEMES = [("int8", None), ("int8", 32), ("int4", 32), ("int4", 0)]  # None: the default; 0: per channel


def reference_quantize(weight: np.ndarray, name: str, mode: str, group: int | None):
    """Symmetric absmax per group of consecutive input features (per layer and output feature): scale = absmax /
    (qmax + 1/2), q = clip(round-half-even(w / scale), -qmax - 1, qmax).

    Returns q [L, in, out] (int8), the scales [L, groups, out], the dequantized weight in the weight's shape, and
    where w / scale lies within float rounding of a .5 tie (a group's largest weight always does: ±(qmax + 1/2)),
    where either neighbour is a correct rounding."""
    qmax = {"int8": 127, "int4": 7}[mode]
    n_in, _ = LAYOUT[name]
    layers, inputs = weight.shape[0], int(np.prod(weight.shape[1:1 + n_in]))
    matrix = weight.reshape(layers, inputs, -1).astype(np.float32)
    size = group or inputs  # int8's default and 0: one group per output channel
    grouped = matrix.reshape(layers, inputs // size, size, -1)
    scale = np.abs(grouped).max(axis=2, keepdims=True) / np.float32(qmax + 0.5)
    ratio = grouped / scale
    q = np.clip(np.round(ratio), -qmax - 1, qmax)
    ties = np.abs(np.abs(ratio) % 1 - 0.5) < 1e-4
    return q.reshape(matrix.shape).astype(np.int8), scale[:, :, 0, :], ties.reshape(matrix.shape)


def assert_matches_reference(qarray, weight: np.ndarray, name: str, mode: str, group: int | None) -> None:
    """The integers equal the reference's except on .5 ties (float rounding of the quotient decides those, and
    differs by an ulp between XLA and numpy: either neighbour is right there); the scales equal to float rounding."""
    q, scale, ties = reference_quantize(weight, name, mode, group)
    assert qarray.qvalue.dtype == {"int8": jnp.int8, "int4": jnp.int4}[mode]
    ours = np.asarray(qarray.qvalue).astype(np.int8)
    assert ours.shape == q.shape, name
    assert np.all((ours == q) | (ties & (np.abs(ours.astype(int) - q) == 1))), name
    assert np.mean(ours == q) > 0.98, name
    np.testing.assert_allclose(np.asarray(qarray.scale), scale, rtol=1e-6, atol=0, err_msg=name)


def numpy_dequantized(model, float_params, dtype: str = "float32"):
    """A float model holding the quantized model's integers × scales, dequantized in numpy: the second code path
    (the integers and scales themselves are checked against the reference above)."""
    params = dict(float_params)
    for name, qarray in quantize.quantized_params(model).items():
        q, scale = np.asarray(qarray.qvalue).astype(np.float32), np.asarray(qarray.scale)
        params[name] = (q * np.repeat(scale, q.shape[-2] // scale.shape[-2], axis=-2)).reshape(params[name].shape)
    return model_from_params(dataclasses.replace(CONFIG, dtype=dtype), params)


@pytest.fixture(scope="module")
def float_params() -> dict[str, np.ndarray]:
    """Heavy-tailed random weights (Student-t), so that group scales differ a lot; norm scales around 1."""
    rng = np.random.default_rng(0)
    params = {}
    for name, shape in param_shapes(CONFIG).items():
        if name.endswith("norm.scale"):
            params[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            params[name] = (0.03 * rng.standard_t(4, shape)).astype(np.float32)
    return params


@pytest.fixture(scope="module")
def float_model(float_params):
    return model_from_params(CONFIG, float_params)


TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, CONFIG.vocab_size, (2, 24)), jnp.int32)
PROMPTS = [[1, 17, 99, 4, 250], [1, 8]]


@pytest.mark.parametrize("mode,group", SCHEMES)
def test_integers_and_scales_equal_the_numpy_reference(float_model, float_params, mode, group):
    model = quantize.quantize_model(float_model, mode, group_size=group)
    stored = quantize.quantized_params(model)
    assert sorted(stored) == sorted(LAYOUT)
    dequantized = model_params(model)  # what the model's code reads: `[...]` of each weight
    for name in LAYOUT:
        assert_matches_reference(stored[name], float_params[name], name, mode, group)
        q, scale = np.asarray(stored[name].qvalue).astype(np.float32), np.asarray(stored[name].scale)
        groups = q.shape[-2] // scale.shape[-2]
        np.testing.assert_array_equal(np.asarray(dequantized[name]),
                                      (q * np.repeat(scale, groups, axis=-2)).reshape(float_params[name].shape))
        # Dequantized weights are within half a step of the float ones.
        error = np.abs(np.asarray(dequantized[name]).reshape(q.shape) - float_params[name].reshape(q.shape))
        assert np.all(error <= 0.5001 * np.repeat(scale, groups, axis=-2)), name
    # The float model is left as it was.
    np.testing.assert_array_equal(np.asarray(float_model.blocks.mlp.w_up[...]), float_params["blocks.mlp.w_up"])


@pytest.mark.parametrize("mode,group,dtype", [("int8", None, "float32"), ("int4", 32, "bfloat16")])
def test_quantized_logits_and_decoding_equal_a_float_model_of_the_dequantized_weights(float_params, mode, group,
                                                                                      dtype):
    """model(tokens), and generate's decode path (whose per-layer copy casts float weights for compute once and
    keeps quantized ones as they are)."""
    model = quantize.quantize_model(model_from_params(dataclasses.replace(CONFIG, dtype=dtype), float_params), mode,
                                    group_size=group)
    reference = numpy_dequantized(model, float_params, dtype)
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(np.asarray(model(TOKENS)), np.asarray(reference(TOKENS)), rtol=tolerance,
                               atol=tolerance)
    got = generate(model, PROMPTS, max_new_tokens=8)
    want = generate(reference, PROMPTS, max_new_tokens=8)
    assert [c.tokens for c in got] == [c.tokens for c in want]


def test_int8_logits_are_close_to_the_float_model_and_int4_further(float_model):
    """Relative RMS error of the logits (heavy-tailed random weights, the hard case for absmax scales)."""
    logits = np.asarray(float_model(TOKENS))
    errors = {}
    for mode, group in (("int8", None), ("int4", 32), ("int4", 0)):
        quantized = np.asarray(quantize.quantize_model(float_model, mode, group_size=group)(TOKENS))
        errors[mode, group] = np.sqrt(np.mean((quantized - logits) ** 2)) / logits.std()
    assert errors["int8", None] < 0.03, errors
    assert errors["int8", None] < errors["int4", 32] < errors["int4", 0] < 1, errors  # smaller groups, closer


def test_bad_mode_and_group_size_are_errors_naming_the_value(float_model):
    cases = [({"mode": "int3"}, "'int3'"), ({"mode": "fp8"}, "'fp8'"),
             ({"mode": "int4", "group_size": 48}, "group_size=48 does not divide the input size 64"),
             ({"mode": "int8", "group_size": -1}, "group_size=-1"), ({"mode": "int8", "group_size": 1}, "group_size=1"),
             ({"mode": "int4", "group_size": 5}, "group_size=5"),
             ({"mode": "int4"}, "group_size=64 does not divide the input size 160 of blocks.mlp.w_down")]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            quantize.quantize_model(float_model, **kwargs)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize.quantize_model(quantize.quantize_model(float_model, "int8"), "int4", group_size=32)


def test_int4_packing_puts_two_values_in_a_byte():
    values = np.array([[-8, 7], [7, -1], [0, 3], [-3, 1]], np.int8)  # rows 0 and 2 in the low nibbles
    packed = quantize.pack_int4(values)
    # -8 = 0x8, 7 = 0x7 → 0x78; 7, -1 = 0xF → 0xF7; 0, -3 = 0xD → 0xD0; 3, 1 → 0x13
    np.testing.assert_array_equal(packed, np.array([[0x78, 0xF7], [0xD0, 0x13]], np.uint8))
    np.testing.assert_array_equal(quantize.unpack_int4(packed), values)


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32), ("int4", 0)])
def test_quantized_checkpoint_round_trip_stores_integers(float_model, mode, group, tmp_path):
    model = quantize.quantize_model(float_model, mode, group_size=group)
    path = quantize.save_quantized(model, tmp_path / "q")
    reader = ArrayReader(path / "params")
    for name, shape in quantize.weight_shapes(CONFIG).items():
        stored = reader.read(f"{name}.qvalue")
        inputs = int(np.prod(shape[1:1 + LAYOUT[name][0]]))
        rows = inputs // 2 if mode == "int4" else inputs
        assert stored.dtype == (np.uint8 if mode == "int4" else np.int8)
        assert stored.shape == (shape[0], rows, int(np.prod(shape)) // shape[0] // inputs)
    assert json.loads((path / "quantization.json").read_text())["mode"] == mode
    loaded = quantize.load_quantized(path)
    assert quantize.quantization_of(loaded) == quantize.quantization_of(model)
    for name, qarray in quantize.quantized_params(model).items():
        again = quantize.quantized_params(loaded)[name]
        assert again.qvalue.dtype == qarray.qvalue.dtype
        np.testing.assert_array_equal(np.asarray(again.qvalue), np.asarray(qarray.qvalue))
        np.testing.assert_array_equal(np.asarray(again.scale), np.asarray(qarray.scale))
    np.testing.assert_array_equal(np.asarray(loaded(TOKENS)), np.asarray(model(TOKENS)))
    assert quantize.load_model(path).config == CONFIG  # load_model reads a quantized checkpoint as saved
    import llama_jax

    np.testing.assert_array_equal(np.asarray(llama_jax.load(path)(TOKENS)), np.asarray(model(TOKENS)))
    with pytest.raises(ConfigError, match="already quantized"):
        quantize.load_model(path, quantize="int8" if mode == "int4" else "int4", group_size=32)
    with pytest.raises(ConfigError, match="save_quantized needs a quantized model"):
        quantize.save_quantized(float_model, tmp_path / "float")


def test_int4_checkpoint_holds_half_a_byte_per_weight(float_model, tmp_path):
    def array_bytes(path: Path) -> int:
        return sum(f.stat().st_size for f in (path / "params").rglob("*") if f.is_file())

    sizes = {mode: array_bytes(quantize.save_quantized(quantize.quantize_model(float_model, mode, group_size=32),
                                                       tmp_path / mode)) for mode in ("int8", "int4")}
    weights = sum(int(np.prod(shape)) for shape in quantize.weight_shapes(CONFIG).values())
    # The float parts and the scales are the same in both: the difference is about half a byte per quantized weight,
    # give or take the store's own bookkeeping (OCDBT's manifest and b-tree vary by a few KB from one save to the
    # next, which is several percent of this small model's 86K weights).
    assert 0.4 * weights < sizes["int8"] - sizes["int4"] < 0.65 * weights, (sizes, weights)


def test_float_checkpoint_is_quantized_layer_by_layer_while_loading(float_model, float_params, tmp_path):
    path = llama_jax.save(float_model, tmp_path / "float")
    model = quantize.load_model(path, quantize="int4", group_size=32)
    for name, qarray in quantize.quantized_params(model).items():
        assert_matches_reference(qarray, float_params[name], name, "int4", 32)
    assert sorted(quantize.quantized_params(model)) == sorted(LAYOUT)
    np.testing.assert_array_equal(np.asarray(model_params(model)["embedding"]), float_params["embedding"])
    with pytest.raises(ConfigError, match="group_size=7"):
        quantize.load_model(path, group_size=7)
    # The program writes the same integers and scales into a quantized checkpoint.
    assert quantize.main([str(path), str(tmp_path / "int4"), "--quantize", "int4", "--group-size", "32"]) == 0
    for name, qarray in quantize.quantized_params(quantize.load_model(tmp_path / "int4")).items():
        expected = quantize.quantized_params(model)[name]
        np.testing.assert_array_equal(np.asarray(qarray.qvalue), np.asarray(expected.qvalue))
        np.testing.assert_array_equal(np.asarray(qarray.scale), np.asarray(expected.scale))
    with pytest.raises(CheckpointError, match="not a quantized llama-jax checkpoint"):
        quantize.load_quantized(path)


# ── eval.generate --quantize end to end ──────────────────────────────────────────────────────────────────────────
def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def float_checkpoint(float_model, tmp_path_factory):
    """The float model as a llama-jax checkpoint with a tokenizer inside, as a user's would be."""
    from llama_jax.tokenizer import train_sentencepiece

    directory = tmp_path_factory.mktemp("program")
    tokenizer = train_sentencepiece(TEXT, directory / "tokenizer.model", vocab_size=CONFIG.vocab_size)
    path = llama_jax.save(float_model, directory / "model")
    (path / "tokenizer.model").write_bytes(Path(tokenizer.path).read_bytes())
    return path, tokenizer


TEXT = ["The quick brown fox jumps over the lazy dog.", "Rain in the morning, wind at noon, sun by evening.",
        "A model reads the prompt and writes its answer one token at a time."]


@pytest.mark.slow  # three program starts
def test_eval_generate_quantizes_with_the_flags(float_checkpoint, float_params):
    path, tokenizer = float_checkpoint
    result = run_module("eval.generate", "--model", str(path), "--quantize", "int4", "--group-size", "32",
                        "--prompt", "The quick brown", "--max-new-tokens", "6", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    reference = numpy_dequantized(quantize.load_model(path, quantize="int4", group_size=32), float_params)
    expected = generate(reference, [tokenizer.encode("The quick brown", bos=True)],
                        max_new_tokens=6, stop_ids=tokenizer.stop_ids)[0]
    assert record["tokens"] == expected.tokens
    bad = run_module("eval.generate", "--model", str(path), "--quantize", "int8", "--group-size", "48", "--prompt",
                     "hi")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1 and "group_size=48" in bad.stderr
    bad = run_module("eval.generate", "--model", str(path), "--quantize", "int3", "--prompt", "hi")
    assert bad.returncode == 2 and "invalid choice: 'int3'" in bad.stderr


def test_eval_perplexity_scores_the_quantized_weights(float_checkpoint, float_params, tmp_path, capsys):
    """--quantize on a float checkpoint, and a saved quantized checkpoint, score as the float checkpoint of the
    numpy-dequantized weights does."""
    from eval import perplexity

    path, _ = float_checkpoint
    data = tmp_path / "valid.txt"
    data.write_text("\n".join(TEXT * 4))
    quantized = quantize.load_model(path, quantize="int8", group_size=32)
    saved = quantize.save_quantized(quantized, tmp_path / "int8", companions=[path / "tokenizer.model"])
    reference = llama_jax.save(numpy_dequantized(quantized, float_params), tmp_path / "reference")

    def score(model: Path, *flags: str) -> dict:
        capsys.readouterr()
        assert perplexity.main(["--model", str(model), "--tokenizer", str(path), "--data", str(data), "--seq-len",
                                "32", "--batch-size", "2", "--store-dir", str(tmp_path / "store"), "--json",
                                "--no-progress", *flags]) == 0
        return json.loads(capsys.readouterr().out)

    expected = score(reference)
    for got in (score(path, "--quantize", "int8", "--group-size", "32"), score(saved)):
        assert got["tokens"] == expected["tokens"]
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert got["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=1e-5)
    assert score(path)["loss"] != pytest.approx(expected["loss"], rel=1e-5)  # the float model scores otherwise
