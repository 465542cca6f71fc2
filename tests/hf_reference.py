"""Tiny random-weight Hugging Face Llama models built at test time: the independent numerical reference."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama_jax.config import ModelConfig
from llama_jax.convert.weight_map import hf_mappings, params_from_external
from llama_jax.params import model_from_params


def hf_config(config: ModelConfig) -> LlamaConfig:
    rope_scaling = None
    if config.rope_scaling is not None:
        scaling = config.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
                        "high_freq_factor": scaling.high_freq_factor,
                        "original_max_position_embeddings": scaling.original_max_position}
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, rope_scaling=rope_scaling,
        max_position_embeddings=config.max_seq_len, tie_word_embeddings=config.tie_embeddings,
        attn_implementation="eager")


def random_hf_model(config: ModelConfig, seed: int = 0) -> LlamaForCausalLM:
    """A float32 HF model with random weights (norm scales too, so they are really tested)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(config)).float().eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("norm.weight"):
                tensor.copy_(1.0 + 0.1 * torch.randn_like(tensor))
            else:
                tensor.normal_(0.0, 0.05)
    return model


def hf_state(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    return {name: tensor.detach().float().numpy() for name, tensor in model.state_dict().items()}


def ours_from_hf(config: ModelConfig, model: LlamaForCausalLM):
    state = hf_state(model)
    return model_from_params(config, params_from_external(config, hf_mappings(config), state.__getitem__))


def hf_logits(model: LlamaForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def float32(config: ModelConfig) -> ModelConfig:
    return dataclasses.replace(config, dtype="float32")
