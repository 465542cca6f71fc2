"""The one place that maps llama-jax parameters to and from Hugging Face's and Meta's tensor names and layouts.

Our parameters (`llama_jax.params`), by dotted name, with blocks stacked on a leading layer axis:

    embedding                      [vocab, dim]
    blocks.attention_norm.scale    [layers, dim]
    blocks.attention.w_q           [layers, dim, heads, head_dim]        (rotary: half-split layout)
    blocks.attention.w_k / w_v     [layers, dim, kv_heads, head_dim]
    blocks.attention.w_o           [layers, heads, head_dim, dim]
    blocks.mlp_norm.scale          [layers, dim]
    blocks.mlp.w_gate / w_up       [layers, dim, hidden]
    blocks.mlp.w_down              [layers, hidden, dim]
    final_norm.scale               [dim]
    output                         [dim, vocab]                         (absent with tied embeddings)

Hugging Face stores linear weights as [out, in] and uses the half-split rotary layout, so its q/k weights need only a
transpose. Meta's reference code uses the interleaved layout (feature pairs 2i, 2i+1), so q/k rows are permuted
within each head on the way in and out. Each mapping converts one tensor, so converters can stream.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.errors import ConversionError
from llama_jax.params import param_shapes

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TensorMapping:
    """One external tensor ↔ one of our parameters (or one layer's slice of it)."""

    ours: str
    layer: int | None
    theirs: str
    to_ours: Transform
    to_theirs: Transform
    their_shape: tuple[int, ...]


def _linear(in_dim: int, out_shape: tuple[int, ...]) -> tuple[Transform, Transform]:
    """[out, in] external weight ↔ our [in, *out_shape]."""
    out_size = int(np.prod(out_shape))
    return (lambda w: np.ascontiguousarray(w.T).reshape(in_dim, *out_shape),
            lambda w: np.ascontiguousarray(w.reshape(in_dim, out_size).T))


def _output_linear(in_shape: tuple[int, ...], out_dim: int) -> tuple[Transform, Transform]:
    """[out, in] external weight ↔ our [*in_shape, out] (e.g. the attention output w_o [heads, head_dim, dim])."""
    in_size = int(np.prod(in_shape))
    return (lambda w: np.ascontiguousarray(w.T).reshape(*in_shape, out_dim),
            lambda w: np.ascontiguousarray(w.reshape(in_size, out_dim).T))


def interleaved_to_half_split(w: np.ndarray, heads: int) -> np.ndarray:
    """Permute the rows [heads·head_dim, in] of a q/k weight from Meta's rotary layout to ours."""
    head_dim = w.shape[0] // heads
    return w.reshape(heads, head_dim // 2, 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)


def half_split_to_interleaved(w: np.ndarray, heads: int) -> np.ndarray:
    head_dim = w.shape[0] // heads
    return w.reshape(heads, 2, head_dim // 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)


def _identity(w: np.ndarray) -> np.ndarray:
    return w


def _rotary_permuted(transforms: tuple[Transform, Transform], heads: int) -> tuple[Transform, Transform]:
    to_ours, to_theirs = transforms
    return (lambda w: to_ours(interleaved_to_half_split(w, heads)),
            lambda w: half_split_to_interleaved(to_theirs(w), heads))


def _mappings(config: ModelConfig, names: Mapping[str, str], rotary_interleaved: bool) -> list[TensorMapping]:
    dim, heads, kv_heads, head_dim = config.dim, config.n_heads, config.kv_heads, config.head_dim
    hidden, vocab = config.hidden_dim, config.vocab_size
    q, k = _linear(dim, (heads, head_dim)), _linear(dim, (kv_heads, head_dim))
    if rotary_interleaved:
        q, k = _rotary_permuted(q, heads), _rotary_permuted(k, kv_heads)
    per_layer = {
        "blocks.attention_norm.scale": ((_identity, _identity), (dim,)),
        "blocks.attention.w_q": (q, (heads * head_dim, dim)),
        "blocks.attention.w_k": (k, (kv_heads * head_dim, dim)),
        "blocks.attention.w_v": (_linear(dim, (kv_heads, head_dim)), (kv_heads * head_dim, dim)),
        "blocks.attention.w_o": (_output_linear((heads, head_dim), dim), (dim, heads * head_dim)),
        "blocks.mlp_norm.scale": ((_identity, _identity), (dim,)),
        "blocks.mlp.w_gate": (_linear(dim, (hidden,)), (hidden, dim)),
        "blocks.mlp.w_up": (_linear(dim, (hidden,)), (hidden, dim)),
        "blocks.mlp.w_down": (_output_linear((hidden,), dim), (dim, hidden)),
    }
    mappings = [TensorMapping("embedding", None, names["embedding"], _identity, _identity, (vocab, dim))]
    for layer in range(config.n_layers):
        for ours, ((to_ours, to_theirs), shape) in per_layer.items():
            theirs = names[ours].format(layer=layer)
            mappings.append(TensorMapping(ours, layer, theirs, to_ours, to_theirs, shape))
    mappings.append(TensorMapping("final_norm.scale", None, names["final_norm.scale"], _identity, _identity, (dim,)))
    if not config.tie_embeddings:
        to_ours, to_theirs = _linear(dim, (vocab,))
        mappings.append(TensorMapping("output", None, names["output"], to_ours, to_theirs, (vocab, dim)))
    return mappings


HF_NAMES = {
    "embedding": "model.embed_tokens.weight",
    "blocks.attention_norm.scale": "model.layers.{layer}.input_layernorm.weight",
    "blocks.attention.w_q": "model.layers.{layer}.self_attn.q_proj.weight",
    "blocks.attention.w_k": "model.layers.{layer}.self_attn.k_proj.weight",
    "blocks.attention.w_v": "model.layers.{layer}.self_attn.v_proj.weight",
    "blocks.attention.w_o": "model.layers.{layer}.self_attn.o_proj.weight",
    "blocks.mlp_norm.scale": "model.layers.{layer}.post_attention_layernorm.weight",
    "blocks.mlp.w_gate": "model.layers.{layer}.mlp.gate_proj.weight",
    "blocks.mlp.w_up": "model.layers.{layer}.mlp.up_proj.weight",
    "blocks.mlp.w_down": "model.layers.{layer}.mlp.down_proj.weight",
    "final_norm.scale": "model.norm.weight",
    "output": "lm_head.weight",
}

META_NAMES = {
    "embedding": "tok_embeddings.weight",
    "blocks.attention_norm.scale": "layers.{layer}.attention_norm.weight",
    "blocks.attention.w_q": "layers.{layer}.attention.wq.weight",
    "blocks.attention.w_k": "layers.{layer}.attention.wk.weight",
    "blocks.attention.w_v": "layers.{layer}.attention.wv.weight",
    "blocks.attention.w_o": "layers.{layer}.attention.wo.weight",
    "blocks.mlp_norm.scale": "layers.{layer}.ffn_norm.weight",
    "blocks.mlp.w_gate": "layers.{layer}.feed_forward.w1.weight",
    "blocks.mlp.w_up": "layers.{layer}.feed_forward.w3.weight",
    "blocks.mlp.w_down": "layers.{layer}.feed_forward.w2.weight",
    "final_norm.scale": "norm.weight",
    "output": "output.weight",
}


def hf_mappings(config: ModelConfig) -> list[TensorMapping]:
    return _mappings(config, HF_NAMES, rotary_interleaved=False)


def meta_mappings(config: ModelConfig) -> list[TensorMapping]:
    return _mappings(config, META_NAMES, rotary_interleaved=True)


def params_from_external(config: ModelConfig, mappings: list[TensorMapping],
                         read: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Our stacked parameters from external tensors fetched one at a time by `read(name)`."""
    shapes = param_shapes(config)
    params: dict[str, np.ndarray] = {}
    for mapping in mappings:
        tensor = read(mapping.theirs)
        if tuple(tensor.shape) != mapping.their_shape:
            raise ConversionError(f"tensor {mapping.theirs} has shape {tuple(tensor.shape)}, but the config "
                                  f"(dim={config.dim}, heads={config.n_heads}, kv_heads={config.kv_heads}, "
                                  f"hidden={config.hidden_dim}, vocab={config.vocab_size}) needs {mapping.their_shape}")
        value = mapping.to_ours(np.asarray(tensor))
        if mapping.layer is None:
            params[mapping.ours] = value
        else:
            stacked = params.get(mapping.ours)
            if stacked is None:
                stacked = params[mapping.ours] = np.empty(shapes[mapping.ours], value.dtype)
            stacked[mapping.layer] = value
    return params
