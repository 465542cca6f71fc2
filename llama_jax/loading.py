"""`llama_jax.load`: a checkpoint of any kind as a model.

The formats `llama_jax.convert` reads (a llama-jax checkpoint or training run, Hugging Face, Meta), and two folders
that other modules write on top of them: a quantized checkpoint (`llama_jax.quantize.save_quantized`), which loads as
its quantized model, and a LoRA run (`train.sft ... lora.rank=R`), which loads as its base with the newest adapters
merged in (PEFT's `merge_and_unload`). It lives apart from `llama_jax.convert` because quantization and LoRA are
built on the converter; and a reward model (`train.reward` run or `reward_model.save_reward_model` folder), which loads
as a `RewardModel`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from llama_jax.errors import ConversionError
from llama_jax.model import Llama

if TYPE_CHECKING:
    from llama_jax.reward_model import RewardModel


def load(path: str | Path, *, dtype: str | None = None,
         shardings: dict[str, jax.sharding.Sharding] | None = None,
         mesh: jax.sharding.Mesh | None = None) -> Llama | RewardModel:
    """The model stored at `path`; dtype, shardings and mesh as for `llama_jax.convert.load` (a quantized
    checkpoint or a reward model loads onto one device)."""
    from llama_jax import convert, lora, quantize, reward_model

    path = Path(path)
    from llama_jax.convert import hf_reward

    if reward_model.is_reward_checkpoint(path) or hf_reward.is_hf_reward_model(path):
        model = (reward_model.load_reward_model(path) if reward_model.is_reward_checkpoint(path)
                 else hf_reward.load_hf_reward_model(path))
        return model if dtype is None else dataclasses.replace(
            model, config=dataclasses.replace(model.config, dtype=dtype))
    if quantize.is_quantized_checkpoint(path):
        if shardings is not None or mesh is not None:
            raise ConversionError(f"{path} is a quantized checkpoint: it loads onto one device (no shardings=/mesh=)")
        return quantize.load_quantized(path, dtype=dtype)
    if lora.is_lora_run(path):
        from llama_jax.params import model_from_params, model_params

        run = lora.read_lora_run(path)
        base = load(run.config.init_from, dtype=dtype, shardings=shardings, mesh=mesh)
        return model_from_params(base.config, lora.merge(model_params(base), run.adapters, base.config, run.lora))
    return convert.load(path, dtype=dtype, shardings=shardings, mesh=mesh)


def save(model: Llama | RewardModel, path: str | Path, format: str = "orbax", **options: Any) -> Path:
    """Write `model` at `path`: a language model as `llama_jax.convert.save` writes it (format 'orbax', 'hf' or
    'meta', with its options); a reward model as a llama-jax folder ('orbax') or a Hugging Face
    `LlamaForSequenceClassification` with one label ('hf')."""
    from llama_jax import convert, reward_model

    if isinstance(model, reward_model.RewardModel):
        if format == "orbax":
            return reward_model.save_reward_model(model, path, overwrite=options.get("overwrite", False))
        if format == "hf":
            from llama_jax.convert.hf_reward import save_hf_reward_model

            return save_hf_reward_model(model, path, **options)
        raise ConversionError(f"a reward model saves as 'orbax' or 'hf', not {format!r}")
    return convert.save(model, path, format, **options)
