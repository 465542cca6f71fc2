"""Code Llama: the presets against the published shapes and sizes, and conversion of Code-Llama-shaped checkpoints.

References are independent of our code: the shapes are the published Hugging Face configs written out below and
counted by `transformers` (its model built on the meta device, nothing allocated); the checkpoints are built by
`transformers` (Hugging Face) and by hand with torch (Meta, `test_convert.write_meta_by_hand`), and the logits are
`transformers`'.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import hf_logits, random_hf_model
from test_convert import assert_same_bytes, hf_tensors, meta_tensors, write_meta_by_hand
from transformers import LlamaConfig, LlamaForCausalLM

import llama_jax
from llama_jax import convert
from llama_jax.config import MODEL_PRESETS, ModelConfig
from llama_jax.params import model_from_params, model_params, param_specs

# ── Presets ──────────────────────────────────────────────────────────────────────────────────────────────────────
# The shape keys of codellama/CodeLlama-{7b,13b,34b,70b}-hf/config.json on Hugging Face (the same shapes as Meta's
# params.json; the vocabulary of Meta's files comes from their tokenizer.model).
HF_CONFIGS = {
    "codellama-7b": dict(vocab_size=32016, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32),
    "codellama-13b": dict(vocab_size=32016, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                          num_attention_heads=40, num_key_value_heads=40),
    "codellama-34b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=22016, num_hidden_layers=48,
                          num_attention_heads=64, num_key_value_heads=8),
    "codellama-70b": dict(vocab_size=32016, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8),
}
# Exact published parameter counts: 7B — the GGUF `general.parameter_count` of CodeLlama-7B (llama.cpp, as Ollama's
# model info reports it) and Together's fine-tuning price table (together-python `model_param_count`); 13B —
# Together's table; 34B — Together's model list (`num_parameters` of Phind-CodeLlama-34B, a fine-tune of the same
# shape). For 70B no exact published count was found: Llama 2 70B's published 68,976,648,192 (tests/test_config.py)
# plus the 16 added vocabulary rows of the embedding and the output head, 2 · 16 · 8192.
PUBLISHED_PARAMS = {
    "codellama-7b": 6_738_546_688,
    "codellama-13b": 13_016_028_160,
    "codellama-34b": 33_743_970_304,
    "codellama-70b": 68_976_648_192 + 2 * 16 * 8192,
}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_presets_have_the_published_shapes_and_sizes(name):
    preset, published = MODEL_PRESETS[name], HF_CONFIGS[name]
    ours = dict(vocab_size=preset.vocab_size, hidden_size=preset.dim, intermediate_size=preset.hidden_dim,
                num_hidden_layers=preset.n_layers, num_attention_heads=preset.n_heads,
                num_key_value_heads=preset.kv_heads)
    assert ours == published
    # Every Code Llama base model: rope theta 1e6 (params.json's rope_theta), trained on 16K-token sequences.
    assert (preset.rope_theta, preset.max_seq_len) == (1e6, 16384)
    with torch.device("meta"):  # transformers' own module, shapes only
        reference = LlamaForCausalLM(LlamaConfig(**published, rope_theta=1e6, max_position_embeddings=16384))
    counted = sum(parameter.numel() for parameter in reference.parameters())
    assert counted == PUBLISHED_PARAMS[name]
    assert sum(math.prod(spec.shape) for spec in param_specs(preset).values()) == counted
    assert preset.num_params() == counted


# ── Conversion ───────────────────────────────────────────────────────────────────────────────────────────────────
# Code Llama 7B's vocabulary and rope theta on a two-layer model with grouped-query attention (as 34B/70B); the
# 160-wide FFN is the one `write_meta_by_hand`'s params.json describes.
CODE = ModelConfig(vocab_size=32016, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=160, rope_theta=1e6,
                   max_seq_len=16384, dtype="float32", remat_policy="none")
LONG = 4608  # past Llama 2's 4096 positions, where Code Llama's theta matters
# Meta's Code Llama params.json has rope_theta and no vocab_size (Meta's code takes it from the tokenizer), as
# CodeLlama-7b's: {"dim", "n_layers", "n_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_theta"}.
META_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 160, "ffn_dim_multiplier": 0.94,
               "norm_eps": 1e-5, "rope_theta": 1000000}
# config.json as the published Code Llama folders have it (transformers 4.33): rope_theta at the top, no
# rope_parameters, max_position_embeddings 16384.
HF_CONFIG_JSON = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 160, "max_position_embeddings": 16384,
    "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
    "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.33.0.dev0", "use_cache": True,
    "vocab_size": 32016,
}


@pytest.fixture(scope="module")
def code_llama(tmp_path_factory):
    """(transformers reference model, its HF folder with the published config.json, a Meta folder, scratch dir)."""
    root = tmp_path_factory.mktemp("code_llama")
    reference = random_hf_model(CODE, seed=11)
    reference.save_pretrained(root / "saved")
    hf_dir = root / "hf"
    hf_dir.mkdir()
    shutil.copy(root / "saved" / "model.safetensors", hf_dir)
    (hf_dir / "config.json").write_text(json.dumps(HF_CONFIG_JSON))
    meta_dir = write_meta_by_hand(reference, CODE, root / "meta", shards=2)
    (meta_dir / "params.json").write_text(json.dumps(META_PARAMS))
    return reference, hf_dir, meta_dir, root


def expected_config(**changes) -> ModelConfig:
    return dataclasses.replace(CODE, remat_policy="full", **changes)


def test_code_llama_configs_are_read_from_both_formats(code_llama):
    reference, hf_dir, meta_dir, root = code_llama
    assert convert.read_params(hf_dir)[0] == expected_config()
    assert convert.read_params(root / "saved")[0] == expected_config()  # as transformers 5 writes it: rope_parameters
    # params.json has no context length: Code Llama's rope theta stands for its 16K training sequences.
    meta_config = convert.read_params(meta_dir)[0]
    assert meta_config == expected_config(ffn_hidden_dim=None, multiple_of=160, ffn_dim_multiplier=0.94)
    assert meta_config.hidden_dim == 160


def test_hf_code_llama_round_trips_bit_exactly(code_llama):
    reference, hf_dir, meta_dir, root = code_llama
    convert.convert(hf_dir, root / "hf_orbax", "orbax")
    convert.convert(root / "hf_orbax", root / "hf_back", "hf")
    assert_same_bytes(hf_tensors(hf_dir), hf_tensors(root / "hf_back"))
    written = json.loads((root / "hf_back" / "config.json").read_text())
    assert (written["vocab_size"], written["rope_theta"], written["max_position_embeddings"]) == (32016, 1e6, 16384)
    assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}
    # HF → Meta gives the checkpoint cut by hand (Llama 2's layout: the embedding split along dim).
    convert.convert(root / "hf_orbax", root / "hf_meta", "meta", shards=2)
    for by_hand, written in zip(meta_tensors(meta_dir), meta_tensors(root / "hf_meta"), strict=True):
        assert_same_bytes(by_hand, written)
    params = json.loads((root / "hf_meta" / "params.json").read_text())
    assert (params["rope_theta"], params["vocab_size"], params["n_kv_heads"]) == (1e6, 32016, 2)


def test_meta_code_llama_round_trips_bit_exactly(code_llama):
    reference, hf_dir, meta_dir, root = code_llama
    convert.convert(meta_dir, root / "meta_orbax", "orbax")
    convert.convert(root / "meta_orbax", root / "meta_back", "meta", shards=2)
    for original, written in zip(meta_tensors(meta_dir), meta_tensors(root / "meta_back"), strict=True):
        assert_same_bytes(original, written)
    # Meta → HF gives the weights transformers saved.
    convert.convert(root / "meta_orbax", root / "meta_hf", "hf")
    assert_same_bytes(hf_tensors(hf_dir), hf_tensors(root / "meta_hf"))
    written = json.loads((root / "meta_hf" / "config.json").read_text())
    assert (written["rope_theta"], written["max_position_embeddings"]) == (1e6, 16384)


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


def test_logits_match_transformers_past_4k_tokens(code_llama):
    """4,608 positions: rotary angles with theta 1e6 past Llama 2's context, from both formats."""
    reference, hf_dir, meta_dir, root = code_llama
    tokens = np.random.default_rng(5).integers(0, CODE.vocab_size, size=(1, LONG))
    expected = hf_logits(reference, tokens)
    for source in (hf_dir, meta_dir):
        model = llama_jax.load(source, dtype="float32")
        ours = np.asarray(_logits(model, jnp.asarray(tokens, jnp.int32)))
        np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0, err_msg=str(source))
    # Theta matters at these positions: Llama 2's 10000 gives other logits.
    loaded = llama_jax.load(hf_dir, dtype="float32")
    llama2_theta = model_from_params(dataclasses.replace(loaded.config, rope_theta=10000.0), model_params(loaded))
    assert np.abs(np.asarray(_logits(llama2_theta, jnp.asarray(tokens, jnp.int32))) - expected).max() > 1e-2
