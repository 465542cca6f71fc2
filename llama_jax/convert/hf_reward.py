"""A reward model as a Hugging Face `LlamaForSequenceClassification` with one label, and back.

The folder is what `LlamaForSequenceClassification.save_pretrained` writes for `num_labels=1`: config.json (the
causal LM's, with `architectures: ["LlamaForSequenceClassification"]`, one label and `pad_token_id`) and safetensors
holding the backbone under the causal LM's `model.*` names (the same mapping, `weight_map.hf_mappings`) and
`score.weight` [1, dim], the transpose of our head [dim, 1]; there is no `lm_head`. transformers scores a row at its
last token that is not `pad_token_id` (the last token of every row when pad_token_id is None, which it allows only
for batches of one row), as `RewardModel.score_tokens` scores it at the last token of the response mask.

Tensors are streamed into files laid out up front, with `hf`'s writer pieces, into a staged folder (all or nothing).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from llama_jax.convert import hf
from llama_jax.convert.common import (
    ParamSource,
    check_names,
    check_shapes,
    compute_dtype,
    parse_dtype,
    read_json_object,
    staged_output,
)
from llama_jax.convert.weight_map import TensorMapping, _linear, hf_mappings, params_from_external
from llama_jax.errors import ConversionError

ARCHITECTURE = "LlamaForSequenceClassification"
HF_SCORE = "score.weight"
DEFAULT_MAX_SHARD_SIZE = 5 * 1000**3  # as llama_jax.convert (and transformers' save_pretrained) default to


def reward_mappings(config) -> list[TensorMapping]:
    """The backbone's tensors under the causal LM's names (no head) and the score head [1, dim] ↔ ours [dim, 1]."""
    from llama_jax.reward_model import SCORE, backbone_config

    to_ours, to_theirs = _linear(config.dim, (1,))
    return [*hf_mappings(backbone_config(config)),
            TensorMapping(SCORE, None, HF_SCORE, to_ours, to_theirs, (1, config.dim))]


def hf_reward_config(config, dtype: np.dtype, pad_token_id: int | None) -> dict[str, Any]:
    """config.json: the causal LM's (`hf.hf_config`) as a one-label sequence classifier."""
    if pad_token_id is not None and not (isinstance(pad_token_id, (int, np.integer)) and not isinstance(
            pad_token_id, bool) and 0 <= pad_token_id < config.vocab_size):
        raise ConversionError(f"pad_token_id={pad_token_id!r} must be None or a token id in [0, {config.vocab_size})")
    raw = hf.hf_config(config, dtype)
    raw.update(architectures=[ARCHITECTURE], num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
               pad_token_id=None if pad_token_id is None else int(pad_token_id))
    return raw


class _RewardSource(ParamSource):
    """A reward model's parameters in memory, checked against its config's shapes."""

    def __init__(self, model):
        from llama_jax.reward_model import reward_param_shapes

        self.config = model.config
        self._params = model.params
        expected = reward_param_shapes(model.config)
        check_names(expected, {name: tuple(value.shape) for name, value in model.params.items()},
                    what="the reward model's parameters", config=model.config)
        for name, shape in expected.items():
            if tuple(model.params[name].shape) != shape:
                raise ConversionError(f"reward model parameter {name} has shape {tuple(model.params[name].shape)}, "
                                      f"the config needs {shape}")
        self.dtype = np.dtype(model.params["embedding"].dtype)

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self._params[name])

    def read_layer(self, name: str, layer: int) -> np.ndarray:
        return np.asarray(self._params[name][layer])

    def dtype_of(self, name: str) -> np.dtype:
        return np.dtype(self._params[name].dtype)


def save_hf_reward_model(model, path: str | Path, *, dtype: str | None = None, overwrite: bool = False,
                         pad_token_id: int | None = None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write `model` (a `RewardModel`) at `path` as a Hugging Face `LlamaForSequenceClassification` with one label.

    dtype: 'float32' / 'bfloat16' / None (keep each parameter's dtype); pad_token_id: config.json's, the token
    transformers skips when it looks for a row's last token (None: it scores only batches of one row);
    max_shard_size: bytes per safetensors file; overwrite: replace an existing folder (else a ConversionError).
    """
    target = parse_dtype(dtype)
    source = _RewardSource(model)
    config_json = hf_reward_config(model.config, target if target is not None else source.dtype, pad_token_id)
    mappings = reward_mappings(model.config)
    dtypes = hf.tensor_dtypes(source, mappings, target)
    with staged_output(path, overwrite) as staging:
        hf.write_safetensors_folder(source, staging, mappings, dtypes, config_json, max_shard_size)
    return Path(path)


# ── Reading ─────────────────────────────────────────────────────────────────────────────────────────────────────
def _num_labels(raw: Mapping[str, Any]) -> int:
    """The labels transformers' config gives a classifier: id2label's, else num_labels, else its default 2."""
    if isinstance(raw.get("id2label"), dict):
        return len(raw["id2label"])
    return int(raw["num_labels"]) if isinstance(raw.get("num_labels"), int) else 2


def is_hf_reward_model(path: str | Path) -> bool:
    """Whether `path` is a Hugging Face folder whose config.json names `LlamaForSequenceClassification` (a folder
    with another number of labels counts too: `load_hf_reward_model` then says why it cannot load it)."""
    path = Path(path)
    if not hf.is_hf(path):
        return False
    try:
        architectures = read_json_object(path / hf.CONFIG_FILE).get("architectures")
    except ConversionError:
        return False
    return isinstance(architectures, list) and ARCHITECTURE in architectures


def load_hf_reward_model(path: str | Path):
    """The `RewardModel` (float32 parameters) of a Hugging Face `LlamaForSequenceClassification` folder with one
    label; its config's dtype is the compute dtype transformers' `dtype="auto"` would pick."""
    import dataclasses

    import jax.numpy as jnp

    from llama_jax.reward_model import RewardModel, backbone_config

    path = Path(path)
    where = path / hf.CONFIG_FILE
    if not where.is_file():
        raise ConversionError(f"{path} is not a Hugging Face {ARCHITECTURE} folder: it has no {hf.CONFIG_FILE}")
    raw = read_json_object(where)
    architectures = raw.get("architectures")
    if not (isinstance(architectures, list) and ARCHITECTURE in architectures):
        raise ConversionError(f"{path} is not a Hugging Face {ARCHITECTURE} (a reward model): {where} declares "
                              f"architectures {architectures!r}")
    labels = _num_labels(raw)
    if labels != 1:
        raise ConversionError(f"{path} is a {ARCHITECTURE} with {labels} labels, not a reward model (one label)")
    config = hf.config_from_hf(raw, where)
    mappings = reward_mappings(config)
    files = [hf.SafetensorsFile(file) for file in hf._weight_files(path)]
    try:
        located: dict[str, hf.SafetensorsFile] = {}
        found: dict[str, tuple[int, ...]] = {}
        for file in files:
            for name, entry in file.entries.items():
                if not name.endswith(hf.IGNORED_SUFFIXES):
                    located[name], found[name] = file, entry.shape
        expected = {mapping.theirs: mapping.their_shape for mapping in mappings}
        described = hf.describe_hf(raw, where)
        check_names(expected, found, what=f"tensors in {path}", described=described)
        hf._check_head_dim(raw, found, expected, config, where)
        check_shapes(expected, found, config, described)
        stored = located[mappings[0].theirs].entries[mappings[0].theirs].dtype
        params = params_from_external(backbone_config(config), mappings,
                                      lambda name: located[name].read(name).astype(np.float32))
    finally:
        for file in files:
            file.close()
    config = dataclasses.replace(config, dtype=compute_dtype(hf.declared_dtype(raw), stored))
    return RewardModel(config, {name: jnp.asarray(value, jnp.float32) for name, value in params.items()})
