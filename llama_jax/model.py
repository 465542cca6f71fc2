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
- Attention masks come from slots, not positions: a query attends to keys at the same or an earlier slot with the same
  segment id. Segment ids keep packed documents apart (0 marks padding); positions (for RoPE) restart per document.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from llama_jax import cpu_kernels
from llama_jax.config import ModelConfig
from llama_jax.errors import KernelError
from llama_jax.sharding import constrain

Array = jax.Array
LAYERS_METADATA = {nnx.PARTITION_NAME: "layers", "logical_axes": "layers"}
_MASKED = float(jnp.finfo(jnp.float32).min)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], logical_axes: tuple[str, ...], std: float = 0.02) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), logical_axes=logical_axes)


def _dot(equation: str, x: Array, w: Array, dtype: jnp.dtype) -> Array:
    """Einsum with inputs in the compute dtype and float32 accumulation (much faster than bf16 out on CPU too)."""
    return mixed_einsum(equation, x, w, jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def mixed_einsum(equation: str, x: Array, y: Array, dtype: jnp.dtype) -> Array:
    """einsum(equation, x, y) with both inputs cast to `dtype`, accumulated and returned in float32.

    The backward pass is written out so that its two products run in `dtype` as well: the incoming float32 cotangent
    is rounded to `dtype` (as PyTorch's autocast does), and each gradient is accumulated in float32 and returned in
    its input's dtype (a float32 weight gets a float32 gradient). Plain autodiff would multiply the float32
    cotangent by a bfloat16 operand, which XLA:CPU runs as a float32 product at well under the bf16 rate, and would
    round weight gradients to bfloat16 on their way back through the cast.
    """
    return jnp.einsum(equation, x.astype(dtype), y.astype(dtype), preferred_element_type=jnp.float32)


def _compact_residuals(dtype: jnp.dtype, *inputs: Array) -> tuple[Array, ...]:
    """The inputs in the compute dtype for a backward pass (half the bytes of float32), then one zero-size array per
    input that keeps its own dtype, so that its gradient can be returned in it."""
    return (*(x.astype(dtype) for x in inputs), *(jnp.zeros((0,), x.dtype) for x in inputs))


def _mixed_einsum_fwd(equation, x, y, dtype):
    residuals = _compact_residuals(dtype, x, y)
    return jnp.einsum(equation, *residuals[:2], preferred_element_type=jnp.float32), residuals


def _mixed_einsum_bwd(equation, dtype, residuals, grad):
    x_low, y_low, x_like, y_like = residuals
    inputs, out = equation.split("->")
    x_spec, y_spec = inputs.split(",")
    grad = grad.astype(dtype)
    grad_x = jnp.einsum(f"{out},{y_spec}->{x_spec}", grad, y_low, preferred_element_type=jnp.float32)
    grad_y = jnp.einsum(f"{x_spec},{out}->{y_spec}", x_low, grad, preferred_element_type=jnp.float32)
    return grad_x.astype(x_like.dtype), grad_y.astype(y_like.dtype)


mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


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
    def at(cls, positions: Array, inv_freq: Array) -> "Rotary":
        angles = positions.astype(jnp.float32)[..., None] * inv_freq
        angles = constrain(angles, ("batch", "length", None))  # else XLA may split the tables on the wrong axis
        return cls(jnp.cos(angles), jnp.sin(angles))

    def apply(self, x: Array) -> Array:
        """Rotate [batch, seq, heads, head_dim] features pairwise: (x1, x2) → (x1·cos − x2·sin, x2·cos + x1·sin)."""
        x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
        cos, sin = self.cos[:, :, None, :], self.sin[:, :, None, :]
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ── Attention ────────────────────────────────────────────────────────────────────────────────────────────────────
class AttentionMask(NamedTuple):
    """What each query may see: keys at a slot ≤ its own slot, with the same segment id."""

    query_slots: Array  # [batch, q_len] int32
    query_segments: Array  # [batch, q_len] int32
    key_slots: Array  # [batch, kv_len] int32
    key_segments: Array  # [batch, kv_len] int32

    def dense(self, q_range: slice = slice(None), kv_range: slice = slice(None)) -> Array:
        q_slots, q_segments = self.query_slots[:, q_range], self.query_segments[:, q_range]
        k_slots, k_segments = self.key_slots[:, kv_range], self.key_segments[:, kv_range]
        causal = k_slots[:, None, :] <= q_slots[:, :, None]
        same_segment = k_segments[:, None, :] == q_segments[:, :, None]
        return causal & same_segment  # [batch, q_len, kv_len]

    @classmethod
    def into_cache(cls, slots: Array, segment_ids: Array, cache_segments: Array, start: Array) -> "AttentionMask":
        """New tokens at `slots` (their segment ids written into the cache from slot `start`) against every slot of
        a cache whose slots hold `cache_segments` [batch, max_len] (0 = empty)."""
        key_segments = jax.lax.dynamic_update_slice(cache_segments, segment_ids, (0, start))
        key_slots = jnp.broadcast_to(jnp.arange(key_segments.shape[1], dtype=jnp.int32), key_segments.shape)
        return cls(slots, segment_ids, key_slots, key_segments)


@jax.custom_vjp
def attend(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Softmax(q·kᵀ/√d) v for grouped queries: q [b, s, heads, d], k/v [b, t, kv_heads, d], mask [b, s, t].

    Differentiated, it keeps only its inputs, its output and each query's log-normaliser, not the [s, t]
    probabilities; the backward pass recomputes the scores once and uses the log-normaliser in place of a softmax
    (the flash-attention backward, here per block of queries).

    Layouts are chosen for the CPU's matrix multiplies: the forward pass holds scores query-major [b, kv, g, s, t]
    and the backward pass key-major [b, kv, t, g, s], so that P·V, dV = Pᵀ·dO and dK = dSᵀ·Q contract the block's
    last axes, and dQ is computed transposed, dQᵀ = Kᵀ·dS, with the block as a plain right-hand operand. XLA:CPU
    otherwise copies a score-sized block into the transposed layout before the product. The group axis g comes
    before the query axis s because that is the order XLA gives the heads-major copy of q and dO; with s before g
    it transposed every probability block to match (bench-S step 6% slower).
    """
    return _attend_forward(q, k, v, mask)[0]


def _heads_major(x: Array, kv_heads: int) -> Array:
    """[b, s, heads, d] → [b, kv_heads, heads per kv head, s, d] (query head h = kv head · group + g)."""
    batch, length, heads, head_dim = x.shape
    return jnp.transpose(x.reshape(batch, length, kv_heads, heads // kv_heads, head_dim), (0, 2, 3, 1, 4))


def _swap_length_and_heads(x: Array) -> Array:
    """[b, t, kv_heads, d] ↔ [b, kv_heads, t, d]."""
    return jnp.transpose(x, (0, 2, 1, 3))


def _from_heads_major(x: Array) -> Array:
    """[b, kv_heads, g, s, d] → [b, s, heads, d]."""
    batch, kv_heads, group, length, head_dim = x.shape
    return jnp.transpose(x, (0, 3, 1, 2, 4)).reshape(batch, length, kv_heads * group, head_dim)


def _per_layer(q: Array, mask: Array) -> tuple[Array, Array, Array]:
    """The mask and the masked-score value, tied to this layer's queries. Both are the same in every layer, so XLA
    would hoist their broadcasts to the score block's shape out of the loop over layers and then read them from
    memory (at 4K context, 2 GiB of float32 fill values per step); tied, they stay fused into the masking."""
    return jax.lax.optimization_barrier((q, mask, jnp.float32(_MASKED)))


def _attend_forward(q: Array, k: Array, v: Array, mask: Array) -> tuple[Array, Array]:
    kv_heads, scale = k.shape[2], 1.0 / math.sqrt(q.shape[-1])
    q, mask, masked_score = _per_layer(q, mask)
    keys, values = _swap_length_and_heads(k), _swap_length_and_heads(v)  # [b, kv, t, d]
    scores = jnp.einsum("bkgsd,bktd->bkgst", _heads_major(q, kv_heads), keys, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores * scale, masked_score)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.exp(scores - row_max)  # unnormalised; dividing the [.., d] output instead is t/d times cheaper
    row_sum = jnp.sum(probs, axis=-1, keepdims=True)
    out = jnp.einsum("bkgst,bktd->bkgsd", probs.astype(v.dtype), values, preferred_element_type=jnp.float32)
    log_normaliser = (row_max + jnp.log(row_sum))[..., 0]  # [b, kv, g, s]
    return _from_heads_major(out / row_sum).astype(q.dtype), log_normaliser


def _attend_fwd(q, k, v, mask):
    out, log_normaliser = _attend_forward(q, k, v, mask)
    out, log_normaliser = _saveable(out, log_normaliser)
    return out, (q, k, v, mask, out, log_normaliser)


def _saveable(out: Array, log_normalisers):
    """Names the residuals the backward pass needs besides q, k, v, for the `save_attention_out` remat policy."""
    return checkpoint_name(out, "attention_out"), jax.tree.map(
        lambda x: checkpoint_name(x, "attention_log_normaliser"), log_normalisers)


def _attend_bwd(residuals, grad_out):
    q, k, v, mask, out, log_normaliser = residuals
    grads = _attend_grads(q, k, v, mask, out, log_normaliser, grad_out)
    return (*(grad.astype(x.dtype) for grad, x in zip(grads, (q, k, v))), None)


def _attend_grads(q, k, v, mask, out, log_normaliser, grad_out) -> tuple[Array, Array, Array]:
    """dq, dk, dv (float32) of `attend`, from its inputs, output and log-normaliser (the flash-attention backward)."""
    kv_heads, dtype, scale = k.shape[2], q.dtype, 1.0 / math.sqrt(q.shape[-1])
    queries, grad_out = _heads_major(q, kv_heads), _heads_major(grad_out.astype(dtype), kv_heads)
    keys, values = _swap_length_and_heads(k), _swap_length_and_heads(v)
    # Key-major [b, kv, t, g, s]: Pᵀ from the scores and the saved log-normaliser, masked entries exactly 0.
    scores_t = jnp.einsum("bktd,bkgsd->bktgs", keys, queries, preferred_element_type=jnp.float32)
    allowed_t = jnp.swapaxes(mask, 1, 2)[:, None, :, None, :]
    probs_t = jnp.where(allowed_t, jnp.exp(scores_t * scale - log_normaliser[:, :, None]), 0.0)
    grad_v = jnp.einsum("bktgs,bkgsd->bktd", probs_t.astype(dtype), grad_out, preferred_element_type=jnp.float32)
    grad_probs_t = jnp.einsum("bktd,bkgsd->bktgs", values, grad_out, preferred_element_type=jnp.float32)
    # softmax backward: dS = P ⊙ (dP − rowsum(dO ⊙ O)); then the 1/√d of the scores.
    row_dot = jnp.sum(grad_out.astype(jnp.float32) * _heads_major(out, kv_heads).astype(jnp.float32), axis=-1)
    grad_scores_t = (probs_t * (grad_probs_t - row_dot[:, :, None]) * scale).astype(dtype)
    grad_k = jnp.einsum("bktgs,bkgsd->bktd", grad_scores_t, queries, preferred_element_type=jnp.float32)
    # dQᵀ = Kᵀ·dS with Kᵀ [b, kv, d, t] transposed beforehand (it is small) and kept so by the barrier: XLA would
    # otherwise fold the transpose into the product, which then reads the score-sized block transposed (2.4× slower).
    keys_t = jax.lax.optimization_barrier(jnp.swapaxes(keys, 2, 3))
    grad_q_t = jnp.einsum("bkdt,bktgs->bkdgs", keys_t, grad_scores_t, preferred_element_type=jnp.float32)
    grad_q = _from_heads_major(jnp.transpose(grad_q_t, (0, 1, 3, 4, 2)))
    return grad_q, _swap_length_and_heads(grad_k), _swap_length_and_heads(grad_v)


attend.defvjp(_attend_fwd, _attend_bwd)


def _query_blocks(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, length)) for start in range(0, length, chunk)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attend_in_chunks(q: Array, k: Array, v: Array, mask: AttentionMask, chunk: int) -> Array:
    """Causal self-attention one block of queries at a time, never holding the full [s, s] score matrix.

    A query block [start, end) only needs keys [0, end), so the masked upper triangle is skipped entirely (about half
    the FLOPs of dense attention). The backward pass runs `attend`'s per block and adds each block's key and value
    gradients into [0, end) of one float32 buffer, rather than summing zero-padded copies of them.
    """
    return _attend_chunks_forward(q, k, v, mask, chunk)[0]


def _attend_chunks_forward(q, k, v, mask, chunk):
    outputs, log_normalisers = [], []
    for start, end in _query_blocks(q.shape[1], chunk):
        block_mask = mask.dense(slice(start, end), slice(0, end))
        out, log_normaliser = _attend_forward(q[:, start:end], k[:, :end], v[:, :end], block_mask)
        outputs.append(out)
        log_normalisers.append(log_normaliser)
    return jnp.concatenate(outputs, axis=1), log_normalisers


def _attend_chunks_fwd(q, k, v, mask, chunk):
    out, log_normalisers = _attend_chunks_forward(q, k, v, mask, chunk)
    out, log_normalisers = _saveable(out, log_normalisers)
    return out, (q, k, v, mask, out, log_normalisers)


def _attend_chunks_bwd(chunk, residuals, grad_out):
    q, k, v, mask, out, log_normalisers = residuals
    grad_qs = []
    grad_k, grad_v = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for (start, end), log_normaliser in zip(_query_blocks(q.shape[1], chunk), log_normalisers):
        block_mask = mask.dense(slice(start, end), slice(0, end))
        block_q, block_k, block_v = _attend_grads(q[:, start:end], k[:, :end], v[:, :end], block_mask,
                                                  out[:, start:end], log_normaliser, grad_out[:, start:end])
        grad_qs.append(block_q)
        grad_k, grad_v = grad_k.at[:, :end].add(block_k), grad_v.at[:, :end].add(block_v)
    return jnp.concatenate(grad_qs, axis=1).astype(q.dtype), grad_k.astype(k.dtype), grad_v.astype(v.dtype), None


attend_in_chunks.defvjp(_attend_chunks_fwd, _attend_chunks_bwd)


@jax.custom_vjp
def attend_flash_cpu(q: Array, k: Array, v: Array, mask: AttentionMask) -> Array:
    """`attend_in_chunks` as one native CPU kernel per direction (`llama_jax.cpu_kernels`): the same blocks of
    queries and keys, but each score block stays in cache between the products, and the softmax is online."""
    return cpu_kernels.flash_attention_forward(q, k, v, mask)[0]


def _attend_flash_fwd(q, k, v, mask):
    out, log_normaliser = _saveable(*cpu_kernels.flash_attention_forward(q, k, v, mask))
    return out, (q, k, v, mask, out, log_normaliser)


def _attend_flash_bwd(residuals, grad_out):
    return (*cpu_kernels.flash_attention_backward(*residuals, grad_out), None)


attend_flash_cpu.defvjp(_attend_flash_fwd, _attend_flash_bwd)


@struct.dataclass
class KVCache:
    """Keys and values of every layer for decoding: slots [0, index) are filled; segment 0 marks empty or padding."""

    keys: Array  # [layers, batch, max_len, kv_heads, head_dim]
    values: Array
    segment_ids: Array  # [batch, max_len] int32
    index: Array  # int32 scalar: the next slot to write

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, max_len: int) -> "KVCache":
        shape = (config.n_layers, batch, max_len, config.kv_heads, config.head_dim)
        dtype = jnp.dtype(config.dtype)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), jnp.int32),
                   jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]


class LayerInputs(NamedTuple):
    """Everything a block needs besides the residual stream, shared by all layers."""

    rotary: Rotary
    mask: AttentionMask
    cache_index: Array | None  # where this call's keys/values go in the cache, or None without a cache


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        dim, heads, kv_heads, head_dim = config.dim, config.n_heads, config.kv_heads, config.head_dim
        self.w_q = _param(rngs, (dim, heads, head_dim), ("embed", "heads", "head_dim"))
        self.w_k = _param(rngs, (dim, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
        self.w_v = _param(rngs, (dim, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
        self.w_o = _param(rngs, (heads, head_dim, dim), ("heads", "head_dim", "embed"))
        self.config = config

    def __call__(self, x: Array, inputs: LayerInputs, cache: tuple[Array, Array] | None):
        config, dtype = self.config, jnp.dtype(self.config.dtype)
        q = inputs.rotary.apply(_dot("bsd,dhk->bshk", x, self.w_q[...], dtype)).astype(dtype)
        k = inputs.rotary.apply(_dot("bsd,dhk->bshk", x, self.w_k[...], dtype)).astype(dtype)
        v = _dot("bsd,dhk->bshk", x, self.w_v[...], dtype).astype(dtype)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        if cache is not None:
            k_all, v_all = (jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (0, inputs.cache_index, 0, 0))
                            for c, new in zip(cache, (k, v)))
            out = attend(q, k_all, v_all, inputs.mask.dense())
            cache = (k_all, v_all)
        elif self._flash_cpu(q, k):
            out = attend_flash_cpu(q, k, v, inputs.mask)
        elif self._chunked(x.shape[1]):
            out = attend_in_chunks(q, k, v, inputs.mask, config.attention_chunk)
        else:
            out = attend(q, k, v, inputs.mask.dense())
        out = checkpoint_name(out, "attention_out")
        return _dot("bshk,hkd->bsd", out, self.w_o[...], dtype).astype(x.dtype), cache

    def _flash_cpu(self, q: Array, k: Array) -> bool:
        impl = self.config.attention_impl
        if impl not in ("flash_cpu", "auto"):
            return False
        unsupported = cpu_kernels.flash_attention_supports(q, k)
        if unsupported is not None and impl == "flash_cpu":
            raise KernelError(f"model.attention_impl=flash_cpu cannot run here: {unsupported}")
        return unsupported is None

    def _chunked(self, length: int) -> bool:
        impl = self.config.attention_impl
        return impl == "chunked" or (impl == "auto" and length > self.config.attention_chunk)


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
        gate = _dot("bsd,df->bsf", x, self.w_gate[...], self.dtype)
        up = _dot("bsd,df->bsf", x, self.w_up[...], self.dtype)
        hidden = constrain(gated_silu(gate, up, self.dtype), ("batch", "length", "mlp"))
        return _dot("bsf,fd->bsd", hidden, self.w_down[...], self.dtype).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gated_silu(gate: Array, up: Array, dtype: jnp.dtype) -> Array:
    """silu(gate) ⊙ up computed in float32 and returned in `dtype`.

    Differentiated, it keeps gate and up in `dtype` rather than the float32 pair autodiff would keep (half the bytes
    of the largest activations: 0.74 GB for bench-S without remat) and recomputes the sigmoid in its backward pass.
    """
    return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(dtype)


def _gated_silu_fwd(gate, up, dtype):
    return gated_silu(gate, up, dtype), _compact_residuals(dtype, gate, up)


def _gated_silu_bwd(dtype, residuals, grad):
    gate_low, up_low, gate_like, up_like = residuals
    gate, up, grad = gate_low.astype(jnp.float32), up_low.astype(jnp.float32), grad.astype(jnp.float32)
    sigmoid = jax.nn.sigmoid(gate)
    grad_gate = grad * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))  # d silu(g)/dg = σ(g)(1 + g(1 − σ(g)))
    return grad_gate.astype(gate_like.dtype), (grad * gate * sigmoid).astype(up_like.dtype)


gated_silu.defvjp(_gated_silu_fwd, _gated_silu_bwd)


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


REMAT_POLICIES = {
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
        return _dot("bsd,vd->bsv", hidden, embedding, jnp.dtype(dtype))
    return _dot("bsd,dv->bsv", hidden, output, jnp.dtype(dtype))


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

    def __call__(self, tokens: Array, *, positions: Array | None = None, segment_ids: Array | None = None,
                 cache: KVCache | None = None) -> Array | tuple[Array, KVCache]:
        """Logits for `tokens`; with a `cache`, also the cache with these tokens' keys and values appended.

        positions: rotary position of each token (default: its slot; restart at 0 per packed document).
        segment_ids: which document each token belongs to (default: all one); tokens attend within their segment.
        """
        hidden, cache = self.hidden_states(tokens, positions=positions, segment_ids=segment_ids, cache=cache)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, cache)

    def hidden_states(self, tokens: Array, *, positions: Array | None = None, segment_ids: Array | None = None,
                      cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
        """The final-normed hidden states [batch, seq, dim] (compute dtype), before the output head."""
        config = self.config
        batch, length = tokens.shape
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        slots = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
        positions = slots if positions is None else positions
        segment_ids = jnp.ones((batch, length), jnp.int32) if segment_ids is None else segment_ids

        if cache is None:
            mask = AttentionMask(slots, segment_ids, slots, segment_ids)
        else:
            mask = AttentionMask.into_cache(slots, segment_ids, cache.segment_ids, start)
        inputs = LayerInputs(Rotary.at(positions, rope_frequencies(config)), mask, None if cache is None else start)

        # Gather from a table split over vocab only (FSDP gathers every weight before use anyway); gathering from
        # an embed-split table forces XLA to replicate and re-split the result.
        table = constrain(self.embedding[...], ("vocab", None))
        x = jnp.take(table, tokens, axis=0).astype(config.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        layer_caches = None if cache is None else (cache.keys, cache.values)
        x, layer_caches = self._run_blocks(x, inputs, layer_caches)
        hidden = self.final_norm(x)
        if cache is not None:
            cache = KVCache(layer_caches[0], layer_caches[1], mask.key_segments, start + length)
        return hidden, cache

    def logits(self, hidden: Array) -> Array:
        """The output head, float32 logits [..., vocab]."""
        return output_head(hidden, self.embedding[...], None if self.output is None else self.output[...],
                           self.config.dtype)

    def _run_blocks(self, x: Array, inputs: LayerInputs, layer_caches):
        policy = self.config.remat_policy

        def apply_block(x, block, layer_cache, inputs):
            return block(x, inputs, layer_cache)

        if policy != "none":
            apply_block = nnx.remat(apply_block, policy=REMAT_POLICIES[policy])

        @nnx.scan(in_axes=(nnx.Carry, 0, 0, None), out_axes=(nnx.Carry, 0), transform_metadata=LAYERS_METADATA)
        def scan_blocks(x, block, layer_cache, inputs):
            return apply_block(x, block, layer_cache, inputs)

        return scan_blocks(x, self.blocks, layer_caches, inputs)


def cross_entropy(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array]:
    """Sum of token losses and sum of weights (so callers can average over micro-batches and hosts exactly)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_loss = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    return jnp.sum(token_loss * weights), jnp.sum(weights)


def abstract_model(config: ModelConfig) -> Llama:
    """The model with ShapeDtypeStructs for parameters: nothing is allocated (for 7B-70B planning and checks)."""
    return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
