"""Conversion errors that point at the real cause (issue 23), and the dtype a loaded checkpoint computes in.

Every error test asserts the whole one-line message. Checkpoints are tiny and built here: Hugging Face folders by
transformers, Meta folders by hand with torch (`test_convert.write_meta_by_hand`).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_reference import hf_logits, random_hf_model
from test_convert import LLAMA2, LLAMA3, TOKENS, edited_hf, our_logits, write_meta_by_hand
from transformers import LlamaConfig, LlamaForCausalLM

import llama_jax
from llama_jax import convert
from llama_jax.cli import run_program
from llama_jax.convert.__main__ import main as convert_main
from llama_jax.errors import ConversionError


@pytest.fixture(scope="module")
def reference() -> LlamaForCausalLM:
    return random_hf_model(LLAMA2)


@pytest.fixture(scope="module")
def hf_dir(reference, tmp_path_factory) -> Path:
    """A float32 Hugging Face folder as transformers writes it (config.json says dtype float32)."""
    directory = tmp_path_factory.mktemp("float32") / "hf"
    reference.save_pretrained(directory)
    return directory


def conversion_error(path: Path) -> str:
    with pytest.raises(ConversionError) as error:
        convert.read_params(path)
    return str(error.value)


def run_convert_program(argv: list[str], capsys) -> str:
    """The program's stderr, checked to be one `error:` line with exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_program(convert_main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    return err.rstrip("\n")


# ── Item 2: a Meta folder missing a shard ────────────────────────────────────────────────────────────────────────
def test_meta_missing_last_shard_is_named(reference, tmp_path):
    meta = write_meta_by_hand(reference, LLAMA2, tmp_path / "meta", shards=4)
    (meta / "consolidated.03.pth").unlink()
    assert conversion_error(meta) == (
        f"{meta} lacks consolidated.03.pth: the checkpoint has 4 model-parallel shards, consolidated.00.pth … "
        f"consolidated.03.pth (each holds 16 of the 64 rows of layers.0.attention.wq.weight); copy the missing file "
        f"from the original download")


# ── Item 3: a .pth holding code ──────────────────────────────────────────────────────────────────────────────────
class RunsACommand:
    """What a malicious checkpoint pickles: unpickling it would call os.system."""

    def __reduce__(self):
        return os.system, ("true",)


def test_pth_holding_code_is_refused_for_safety(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    torch.save({"tok_embeddings.weight": torch.zeros(256, 64), "hook": RunsACommand()}, meta / "consolidated.00.pth")
    system = f"{os.system.__module__}.{os.system.__name__}"  # posix.system on Linux
    assert conversion_error(meta) == (
        f"{meta / 'consolidated.00.pth'} contains objects other than tensors ({system}), so it was refused for safety "
        f"(loading them could run code): a Meta checkpoint holds only tensors; use the files of the original "
        f"download")


def test_truncated_pth_is_still_called_truncated(reference, tmp_path):
    meta = write_meta_by_hand(reference, LLAMA2, tmp_path / "meta", shards=1)
    shard = meta / "consolidated.00.pth"
    os.truncate(shard, shard.stat().st_size // 2)
    assert re.fullmatch(rf"{re.escape(str(shard))} is not a readable PyTorch checkpoint \(truncated or damaged\?\): "
                        r"\w+: [^\n]+", conversion_error(meta))


# ── Items 4 and 5: a config file contradicting the weights ───────────────────────────────────────────────────────
DISAGREE = "the config and the weights disagree (fix the config, or use the weights it came with)"


def test_hf_config_json_contradicting_the_weights(hf_dir, tmp_path):
    wider = edited_hf(hf_dir, tmp_path / "wider", {"hidden_size": 128})
    assert conversion_error(wider) == (
        f"tensor model.embed_tokens.weight has shape (256, 64), but {wider / 'config.json'} (hidden_size=128, "
        f"intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16, "
        f"vocab_size=256) needs (256, 128): {DISAGREE}")
    head_dim = edited_hf(hf_dir, tmp_path / "head_dim", {"head_dim": 32})
    assert conversion_error(head_dim) == (
        f"tensor model.layers.0.self_attn.q_proj.weight has shape (64, 64), but {head_dim / 'config.json'} "
        f"(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, "
        f"head_dim=32, vocab_size=256) needs (128, 64): {DISAGREE}")


def test_hf_model_with_another_head_dim_is_unsupported(tmp_path):
    """Weights that agree with a config.json whose head_dim is not hidden_size / heads: a model llama-jax cannot run."""
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                                 num_attention_heads=4, head_dim=32)).save_pretrained(tmp_path / "hf")
    assert conversion_error(tmp_path / "hf") == (
        f"{tmp_path / 'hf' / 'config.json'}: head_dim=32 differs from hidden_size/num_attention_heads=16, which "
        f"llama-jax does not support")


def test_meta_params_json_contradicting_the_weights(tmp_path):
    # Llama 3's layout cuts the embedding by vocabulary: its merged shape is read from the shards, not params.json.
    meta = write_meta_by_hand(random_hf_model(LLAMA3), LLAMA3, tmp_path / "meta", shards=2)
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, "dim": 128}))
    assert conversion_error(meta) == (
        f"tensor tok_embeddings.weight has shape (256, 64), but {meta / 'params.json'} (dim=128, n_layers=2, "
        f"n_heads=8, n_kv_heads=4, hidden=320, vocab=256) needs (256, 128): {DISAGREE}")


# ── Item 8: the convert program's destination and source ─────────────────────────────────────────────────────────
def test_convert_to_existing_destination_names_the_flag(hf_dir, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    assert run_convert_program([str(hf_dir), str(existing), "--to", "orbax"], capsys) == (
        f"error: {existing} already exists: choose another destination or pass --overwrite")
    with pytest.raises(ConversionError) as error:  # the Python API names its keyword
        convert.convert(hf_dir, existing, "orbax")
    assert str(error.value) == f"{existing} already exists: choose another destination or pass overwrite=True"


def test_convert_from_missing_source_says_it_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert run_convert_program([str(missing), str(tmp_path / "out"), "--to", "hf"], capsys) == (
        f"error: {missing} does not exist: give the folder of a checkpoint (a Hugging Face model, a Meta download, "
        f"a llama-jax checkpoint or a training run directory)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("config_file", "weights_file"), [("config.json", "model.safetensors"),
                                                         ("params.json", "consolidated.00.pth")])
def test_weights_without_their_config_file_name_it(tmp_path, config_file, weights_file):
    (tmp_path / weights_file).write_bytes(b"")
    pattern = "*.safetensors" if config_file == "config.json" else "consolidated.*.pth"
    assert conversion_error(tmp_path) == (
        f"{tmp_path / config_file} is missing or not a file: the {pattern} files beside it cannot be read without "
        f"it; copy it from where the weights came from")


# ── Item 10: a loaded checkpoint computes in its own dtype ───────────────────────────────────────────────────────
def test_float32_hf_checkpoint_loads_in_float32_and_matches_transformers(reference, hf_dir):
    model = llama_jax.load(hf_dir)
    assert model.config.dtype == "float32"
    np.testing.assert_allclose(our_logits(model), hf_logits(reference, TOKENS), atol=1e-4, rtol=0)


def test_bfloat16_checkpoints_load_in_bfloat16(reference, tmp_path):
    random_hf_model(LLAMA2, seed=1).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    assert llama_jax.load(tmp_path / "hf").config.dtype == "bfloat16"
    # No dtype in config.json: the weights' dtype, as transformers' dtype="auto" falls back to.
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        raw.pop(key, None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    assert llama_jax.load(tmp_path / "hf").config.dtype == "bfloat16"
    # Meta ships bfloat16 weights and params.json names no dtype; an explicit dtype= still wins.
    meta = write_meta_by_hand(reference, LLAMA2, tmp_path / "meta", shards=1, dtype=torch.bfloat16)
    assert llama_jax.load(meta).config.dtype == "bfloat16"
    assert llama_jax.load(meta, dtype="float32").config.dtype == "float32"
