"""The Llama 2 / Llama 3 transformer in Flax NNX, top to bottom.

    tokens ─ embedding ─┬─ N × Block ─ RMSNorm ─ output head ─ logits (float32)
                        │   Block:  x + Attention(RMSNorm(x))       grouped-query, rotary positions
                        │           x + SwiGLU(RMSNorm(x))
Conventions:
- Parameters are float32 and carry their logical axis names (`logical_axes` metadata); `llama_jax.sharding` maps
  the names onto a device mesh. Blocks are stacked along a leading `layers` axis and applied with a scan, so compile
  time does not grow with depth.
- Matrix multiplies take inputs in the compute dtype (`config.dtype`) and accumulate in float32. Softmax, the norms'
  statistics, rotary angles, logits and loss are float32.
- Rotary embeddings use the half-split layout (the first half of each head's features pairs with the second half),
  as Hugging Face stores q/k weights. Meta's checkpoints use the interleaved layout; `llama_jax.convert` permutes
  the q/k weights once on the way in and out, so the model itself has one convention.
- Attention masks come from slots, not positions (`llama_jax.attention.AttentionMask`); segment ids keep packed
  documents apart (0 marks padding), and positions (for RoPE) restart per document.
- The numerics with hand-written gradients live beside the model, not in it: `llama_jax.ops` (mixed-precision
  products, SwiGLU's gate, the chunked loss) and `llama_jax.attention` (one module per attention implementation).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llama_jax.attention import AttentionMask, attend, attention, write_into_cache
from llama_jax.config import ModelConfig
from llama_jax.ops import dot, gated_silu
from llama_jax.sharding import constrain

Array = jax.Array
LAYERS_METADATA = {nnx.PARTITION_NAME: "layers", "logical_axes": "layers"}


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], logical_axes: tuple[str, ...], std: float = 0.02) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), logical_axes=logical_axes)


# ── Normalisation ────────────────────────────────────────────────────────────────────────────────────────────────
class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("embed",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


# ── Rotary position embedding ────────────────────────────────────────────────────────────────────────────────────
def rope_frequencies(config: ModelConfig) -> Array:
    """Inverse frequencies θ_i = theta^(-2i/d), with Llama 3.1's scaling of the low frequencies if configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    # Wavelengths shorter than the original context/high_freq_factor are kept, longer than context/low_freq_factor
    # are divided by `factor`, and the band between is interpolated smoothly (Llama 3.1's `apply_scaling`).
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = scaling.original_max_position / scaling.low_freq_factor
    high_freq_wavelength = scaling.original_max_position / scaling.high_freq_factor
    smooth = (scaling.original_max_position / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = jnp.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, interpolated)
    return jnp.where(wavelength < high_freq_wavelength, inv_freq, scaled)


class Rotary(NamedTuple):
    cos: Array  # [batch, seq, head_dim/2] float32
    sin: Array

    @classmethod
    def at(cls, positions: Array, inv_freq: Array) -> Rotary:
        angles = positions.astype(jnp.float32)[..., None] * inv_freq
        angles = constrain(angles, ("batch", "length", None))  # else XLA may split the tables on the wrong axis
        return cls(jnp.cos(angles), jnp.sin(angles))

    def apply(self, x: Array) -> Array:
        """Rotate [batch, seq, heads, head_dim] features pairwise: (x1, x2) → (x1·cos − x2·sin, x2·cos + x1·sin)."""
        x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
        cos, sin = self.cos[:, :, None, :], self.sin[:, :, None, :]
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ── Attention ────────────────────────────────────────────────────────────────────────────────────────────────────
class LayerInputs(NamedTuple):
    """Everything a block needs besides the residual stream, shared by all layers."""

    rotary: Rotary
    mask: AttentionMask
    # where this call's keys/values go in the cache: a scalar slot for every row, or [batch] (one per row), or None
    # without a cache
    cache_index: Array | None


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary positions; with a `cache` (keys, values), the decoder's step."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        dim, heads, kv_heads, head_dim = config.dim, config.n_heads, config.kv_heads, config.head_dim
        self.w_q = _param(rngs, (dim, heads, head_dim), ("embed", "heads", "head_dim"))
        self.w_k = _param(rngs, (dim, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
        self.w_v = _param(rngs, (dim, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
        self.w_o = _param(rngs, (heads, head_dim, dim), ("heads", "head_dim", "embed"))
        self.config = config

    def __call__(self, x: Array, inputs: LayerInputs, cache: tuple[Array, Array] | None):
        config, dtype = self.config, jnp.dtype(self.config.dtype)
        q = inputs.rotary.apply(dot("bsd,dhk->bshk", x, self.w_q[...], dtype)).astype(dtype)
        k = inputs.rotary.apply(dot("bsd,dhk->bshk", x, self.w_k[...], dtype)).astype(dtype)
        v = dot("bsd,dhk->bshk", x, self.w_v[...], dtype).astype(dtype)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        if cache is not None:  # decoding: this call's keys and values join the cache, attended densely
            k, v = (write_into_cache(c, new.astype(c.dtype), inputs.cache_index) for c, new in zip(cache, (k, v)))
            out, cache = attend(q, k, v, inputs.mask.dense()), (k, v)
        else:
            out = attention(q, k, v, inputs.mask, config)
        out = checkpoint_name(out, "attention_out")
        return dot("bshk,hkd->bsd", out, self.w_o[...], dtype).astype(x.dtype), cache


# ── Feed-forward ─────────────────────────────────────────────────────────────────────────────────────────────────
class SwiGLU(nnx.Module):
    """down(silu(gate(x)) ⊙ up(x))."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        dim, hidden = config.dim, config.hidden_dim
        self.w_gate = _param(rngs, (dim, hidden), ("embed", "mlp"))
        self.w_up = _param(rngs, (dim, hidden), ("embed", "mlp"))
        self.w_down = _param(rngs, (hidden, dim), ("mlp", "embed"))
        self.dtype = jnp.dtype(config.dtype)

    def __call__(self, x: Array) -> Array:
        gate = dot("bsd,df->bsf", x, self.w_gate[...], self.dtype)
        up = dot("bsd,df->bsf", x, self.w_up[...], self.dtype)
        hidden = constrain(gated_silu(gate, up, self.dtype), ("batch", "length", "mlp"))
        return dot("bsf,fd->bsd", hidden, self.w_down[...], self.dtype).astype(x.dtype)


# ── Transformer block ────────────────────────────────────────────────────────────────────────────────────────────
class Block(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, rngs)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config, rngs)

    def __call__(self, x: Array, inputs: LayerInputs, cache: tuple[Array, Array] | None):
        attention_out, cache = self.attention(self.attention_norm(x), inputs, cache)
        x = x + attention_out
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "length", "embed")), cache


_CHECKPOINT_POLICIES = {  # model.remat_policy → what a block keeps for its backward pass
    "full": None,  # save nothing inside a block: recompute it all in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # attention's output and per-query log-normaliser (a few MiB per layer) are all its backward pass needs besides
    # q, k, v, so the recomputation skips the attention forward pass
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out", "attention_log_normaliser"),
}


# ── The model ────────────────────────────────────────────────────────────────────────────────────────────────────
def output_head(hidden: Array, embedding: Array, output: Array | None, dtype: str) -> Array:
    """Float32 logits [batch, seq, vocab] of hidden [batch, seq, dim]: through `output` [dim, vocab], or through the
    embedding table [vocab, dim] when the head is tied to it (`output` None)."""
    if output is None:
        return dot("bsd,vd->bsv", hidden, embedding, jnp.dtype(dtype))
    return dot("bsd,dv->bsv", hidden, output, jnp.dtype(dtype))


class Llama(nnx.Module):
    """Call on int32 token ids [batch, seq] to get float32 logits [batch, seq, vocab]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.embedding = _param(rngs, (config.vocab_size, config.dim), ("vocab", "embed"))

        @nnx.split_rngs(splits=config.n_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=LAYERS_METADATA)
        def stacked_blocks(rngs: nnx.Rngs) -> Block:
            return Block(config, rngs)

        self.blocks = stacked_blocks(rngs)
        self.final_norm = RMSNorm(config.dim, config.norm_eps)
        self.output = None if config.tie_embeddings else _param(rngs, (config.dim, config.vocab_size),
                                                                 ("embed", "vocab"))

    def __call__(self, tokens: Array, *, positions: Array | None = None,
                 segment_ids: Array | None = None) -> Array:
        """Logits for `tokens`.

        positions: rotary position of each token (default: its slot; restart at 0 per packed document).
        segment_ids: which document each token belongs to (default: all one); tokens attend within their segment.
        """
        return self.logits(self.hidden_states(tokens, positions=positions, segment_ids=segment_ids))

    def hidden_states(self, tokens: Array, *, positions: Array | None = None,
                      segment_ids: Array | None = None) -> Array:
        """The final-normed hidden states [batch, seq, dim] (compute dtype), before the output head."""
        config = self.config
        batch, length = tokens.shape
        slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        positions = slots if positions is None else positions
        # No segment ids: one document per row, a causal-only mask (which lets attention pick a kernel without them)
        mask = AttentionMask(slots, segment_ids, slots, segment_ids)
        inputs = LayerInputs(Rotary.at(positions, rope_frequencies(config)), mask, None)
        x = self.embed(tokens)
        return self.final_norm(self._run_blocks(x, inputs))

    def embed(self, tokens: Array) -> Array:
        """Token embeddings [batch, seq, dim] in the compute dtype."""
        # Gather from a table split over vocab only (FSDP gathers every weight before use anyway); gathering from
        # an embed-split table forces XLA to replicate and re-split the result.
        table = constrain(self.embedding[...], ("vocab", None))
        x = jnp.take(table, tokens, axis=0).astype(self.config.dtype)
        return constrain(x, ("batch", "length", "embed"))

    def logits(self, hidden: Array) -> Array:
        """The output head, float32 logits [..., vocab]."""
        return output_head(hidden, self.embedding[...], None if self.output is None else self.output[...],
                           self.config.dtype)

    def _run_blocks(self, x: Array, inputs: LayerInputs) -> Array:
        policy = self.config.remat_policy

        def apply_block(x, block, inputs):
            return block(x, inputs, None)[0]

        if policy != "none":
            apply_block = nnx.remat(apply_block, policy=_CHECKPOINT_POLICIES[policy])

        @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry, transform_metadata=LAYERS_METADATA)
        def scan_blocks(x, block, inputs):
            return apply_block(x, block, inputs)

        return scan_blocks(x, self.blocks, inputs)
