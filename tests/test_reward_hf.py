"""A reward model exported as Hugging Face's `LlamaForSequenceClassification` (one label) and read back.

The reference is transformers itself: it loads the exported folder and its scores (`logits[:, 0]`, the head at each
row's last non-pad token) must equal `RewardModel.score_tokens`. The tensors are also checked against the causal-LM
export of the same backbone and against the head read with the safetensors library; bf16 rounding is torch's.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from transformers import LlamaForSequenceClassification

import llama_jax
from llama_jax.config import MODEL_PRESETS
from llama_jax.convert import hf
from llama_jax.convert.hf_reward import is_hf_reward_model, load_hf_reward_model, save_hf_reward_model
from llama_jax.errors import ConversionError
from llama_jax.model import Llama
from llama_jax.params import model_from_params, model_params
from llama_jax.reward_model import SCORE, RewardModel, reward_params_from_policy

GQA = dataclasses.replace(MODEL_PRESETS["test"], vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                          ffn_hidden_dim=128, dtype="float32", max_seq_len=128)
CONFIGS = {"gqa": GQA, "mha": dataclasses.replace(GQA, n_kv_heads=None),
           "tied": dataclasses.replace(GQA, tie_embeddings=True)}
ROWS, LENGTH, PAD = 3, 16, 7


def random_policy_params(config, seed: int = 0) -> dict:
    """A random language model's parameters with norm scales moved off 1, so that their mapping is tested."""
    params = dict(model_params(Llama(config, rngs=nnx.Rngs(seed))))
    rng = np.random.default_rng(seed)
    for name, value in params.items():
        if name.endswith("scale"):
            params[name] = jnp.asarray(1.0 + 0.2 * rng.standard_normal(value.shape), jnp.float32)
    return params


def random_reward_model(config, seed: int = 0) -> tuple[RewardModel, dict]:
    policy = random_policy_params(config, seed)
    params = reward_params_from_policy(policy, config, jax.random.key(seed + 1))
    # A head of unit-scale weights, so that scores are several units apart and an error in it cannot hide.
    head = np.random.default_rng(seed + 2).standard_normal((config.dim, 1)).astype(np.float32)
    params[SCORE] = jnp.asarray(head)
    return RewardModel(config, params), policy


def hf_scores(folder: Path, tokens: np.ndarray, attention_mask: np.ndarray | None = None,
              one_row_at_a_time: bool = False) -> np.ndarray:
    model = LlamaForSequenceClassification.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    assert model.config.num_labels == 1
    with torch.no_grad():
        if one_row_at_a_time:  # transformers refuses batches of several rows without a pad token
            logits = [model(torch.as_tensor(row[None], dtype=torch.long)).logits for row in tokens]
            return torch.cat(logits).float().numpy()[:, 0]
        mask = None if attention_mask is None else torch.as_tensor(attention_mask, dtype=torch.long)
        return model(torch.as_tensor(tokens, dtype=torch.long), attention_mask=mask).logits.float().numpy()[:, 0]


def unpadded_rows(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    tokens = rng.integers(0, GQA.vocab_size, (ROWS, LENGTH))
    mask = np.zeros((ROWS, LENGTH), np.int32)
    for row, start in enumerate((LENGTH - 1, 5, 0)):  # responses of 1, 11 and 16 tokens, all ending the row
        mask[row, start:] = 1
    return tokens, mask


def padded_rows(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded rows (PAD occurs nowhere else), the response mask ending at each row's last real token."""
    tokens = np.full((ROWS, LENGTH), PAD)
    mask = np.zeros((ROWS, LENGTH), np.int32)
    attention = np.zeros((ROWS, LENGTH), np.int32)
    for row, (length, start) in enumerate(((LENGTH, 9), (9, 4), (3, 2))):
        real = rng.integers(0, GQA.vocab_size - 1, length)
        tokens[row, :length] = np.where(real >= PAD, real + 1, real)
        mask[row, start:length] = 1
        attention[row, :length] = 1
    assert not np.any(tokens[attention == 1] == PAD)
    return tokens, mask, attention


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scores_match_transformers(tmp_path, name):
    config = CONFIGS[name]
    model, _ = random_reward_model(config)
    rng = np.random.default_rng(3)

    folder = llama_jax.save(model, tmp_path / "rm", format="hf")
    raw = json.loads((folder / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForSequenceClassification"] and raw["pad_token_id"] is None
    assert raw["tie_word_embeddings"] is config.tie_embeddings
    with safe_open(folder / "model.safetensors", "np") as file:
        assert "lm_head.weight" not in file.keys() and "score.weight" in file.keys()
    tokens, mask = unpadded_rows(rng)
    ours = model.score_tokens(tokens, mask)
    theirs = hf_scores(folder, tokens, one_row_at_a_time=True)
    assert np.std(theirs) > 0.5  # the rows' scores differ: a wrong row or token would show
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    save_hf_reward_model(model, folder, pad_token_id=PAD, overwrite=True)
    assert json.loads((folder / "config.json").read_text())["pad_token_id"] == PAD
    tokens, mask, attention = padded_rows(rng)
    ours = model.score_tokens(tokens, mask)
    np.testing.assert_allclose(ours, hf_scores(folder, tokens, attention), atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours, hf_scores(folder, tokens), atol=1e-4, rtol=0)  # HF pools by pad id alone


def test_round_trip_and_tensor_layout(tmp_path):
    config = GQA
    model, policy = random_reward_model(config, seed=4)
    folder = save_hf_reward_model(model, tmp_path / "rm", pad_token_id=0)
    assert is_hf_reward_model(folder)

    loaded = load_hf_reward_model(folder)
    assert sorted(loaded.params) == sorted(model.params)
    for name, value in model.params.items():
        assert loaded.params[name].dtype == jnp.float32, name
        np.testing.assert_array_equal(np.asarray(loaded.params[name]), np.asarray(value), err_msg=name)
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "kv_heads", "hidden_dim", "norm_eps", "rope_theta",
                  "rope_scaling", "max_seq_len", "tie_embeddings", "dtype"):
        assert getattr(loaded.config, field) == getattr(config, field), field

    # The backbone is stored exactly as the causal-LM export of the same weights stores it; the head as [1, dim].
    causal = llama_jax.save(model_from_params(config, policy), tmp_path / "lm", format="hf")
    with safe_open(folder / "model.safetensors", "np") as ours, \
            safe_open(causal / "model.safetensors", "np") as lm:
        assert set(ours.keys()) == (set(lm.keys()) - {"lm_head.weight"}) | {"score.weight"}
        for key in lm.keys():
            if key != "lm_head.weight":
                np.testing.assert_array_equal(ours.get_tensor(key), lm.get_tensor(key), err_msg=key)
        head = ours.get_tensor("score.weight")
    assert head.shape == (1, config.dim)
    np.testing.assert_array_equal(head[0], np.asarray(model.params[SCORE])[:, 0])

    # Cut into several files with an index, as transformers shards: the same parameters come back.
    sharded = save_hf_reward_model(model, tmp_path / "sharded", max_shard_size=100_000)
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    for name, value in load_hf_reward_model(sharded).params.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(model.params[name]), err_msg=name)


def test_bfloat16_export(tmp_path):
    model, _ = random_reward_model(GQA, seed=5)
    folder = save_hf_reward_model(model, tmp_path / "rm", dtype="bfloat16", pad_token_id=PAD)
    raw = json.loads((folder / "config.json").read_text())
    assert raw["dtype"] == "bfloat16" and raw["torch_dtype"] == "bfloat16"
    with safe_open(folder / "model.safetensors", "pt") as file:
        assert {file.get_tensor(key).dtype for key in file.keys()} == {torch.bfloat16}
        head = file.get_tensor("score.weight").float().numpy()
    expected = torch.as_tensor(np.array(model.params[SCORE])[:, 0]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(head[0], expected)  # round to nearest even, as torch rounds

    tokens, mask, attention = padded_rows(np.random.default_rng(6))
    ours = model.score_tokens(tokens, mask)
    theirs = hf_scores(folder, tokens, attention)
    scale = np.max(np.abs(ours))
    np.testing.assert_allclose(theirs, ours, atol=0.02 * scale, rtol=0)
    assert not np.array_equal(theirs, ours)  # the weights really were rounded

    loaded = load_hf_reward_model(folder)
    assert loaded.config.dtype == "bfloat16"  # as transformers' dtype="auto" computes
    np.testing.assert_array_equal(np.asarray(loaded.params[SCORE])[:, 0], expected)


def test_causal_lm_folder_is_refused(tmp_path):
    config = GQA
    causal = llama_jax.save(model_from_params(config, random_policy_params(config)), tmp_path / "lm", format="hf")
    assert not is_hf_reward_model(causal)
    with pytest.raises(ConversionError, match="LlamaForSequenceClassification") as caught:
        load_hf_reward_model(causal)
    assert str(causal) in str(caught.value)

    # A classifier with two labels is not a reward model either.
    model, _ = random_reward_model(config)
    folder = save_hf_reward_model(model, tmp_path / "two")
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("num_labels")
    raw.update(id2label={"0": "bad", "1": "good"}, label2id={"bad": 0, "good": 1})
    (folder / "config.json").write_text(json.dumps(raw))
    assert is_hf_reward_model(folder)
    with pytest.raises(ConversionError, match="2 labels") as caught:
        load_hf_reward_model(folder)
    assert str(folder) in str(caught.value)


def test_existing_folder_and_failed_writes_leave_nothing_half_written(tmp_path, monkeypatch):
    first, _ = random_reward_model(GQA, seed=7)
    second, _ = random_reward_model(GQA, seed=8)
    folder = save_hf_reward_model(first, tmp_path / "rm")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    with pytest.raises(ConversionError, match="already exists"):
        llama_jax.save(second, folder, format="hf")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before

    def fail_midway(source, mappings, dtypes, placement, descriptors):
        original(source, mappings[:3], dtypes, placement, descriptors)
        raise OSError("disk full")

    original = hf._stream_tensors
    monkeypatch.setattr(hf, "_stream_tensors", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        save_hf_reward_model(second, folder, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_hf_reward_model(second, tmp_path / "new")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["rm"]  # no staging folder, no partial "new"
