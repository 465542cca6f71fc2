"""`llama_jax.load`: a checkpoint of any kind as a model.

The formats `llama_jax.convert` reads (a llama-jax checkpoint or training run, Hugging Face, Meta), and two folders
that other modules write on top of them: a quantized checkpoint (`llama_jax.quantize.save_quantized`), which loads as
its quantized model, and a LoRA run (`train.sft ... lora.rank=R`), which loads as its base with the newest adapters
merged in (PEFT's `merge_and_unload`). It lives apart from `llama_jax.convert` because quantization and LoRA are
built on the converter.
"""
from __future__ import annotations

from pathlib import Path

import jax

from llama_jax.errors import ConversionError
from llama_jax.model import Llama


def load(path: str | Path, *, dtype: str | None = None,
         shardings: dict[str, jax.sharding.Sharding] | None = None,
         mesh: jax.sharding.Mesh | None = None) -> Llama:
    """The model stored at `path`; dtype, shardings and mesh as for `llama_jax.convert.load` (a quantized
    checkpoint loads onto one device)."""
    from llama_jax import convert, lora, quantize

    path = Path(path)
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
