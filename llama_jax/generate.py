"""Text generation: batched prefill, then one token per step from a preallocated KV cache, all under `jax.jit`.

    prompts ─ left-pad ─ prefill (one call, whole prompt) ─ sample ─┬─ decode step (one token) ─ sample ─┐
                                                                    └──────── until stop or limit ◄───────┘
Left padding puts every row's last prompt token in the same (last) slot, so one prefill call serves the whole batch and
each decode step writes one slot for all rows. Pad slots get segment id 0 and real tokens segment 1, so attention never
sees the padding; RoPE positions count from 0 at each row's first real token, so a padded row computes exactly what it
would alone.

The model's blocks are stacked along a leading `layers` axis for its scan; slicing a layer's weights out of the stack
inside the decode loop makes XLA copy them at every step (on 2 CPU cores that copy cost more than the whole step
should), and a scan over the stacked KV cache rebuilds the cache at every step. So generation runs the same `Block`
modules layer by layer (unrolled) on a per-layer copy of the weights made once per call (`DecodeWeights`), with one
key and one value buffer per layer that each step updates in place (`LayerCache`). The price is one extra copy of the
block weights while generating (none when the compute dtype differs from the parameters', which needed a cast copy
anyway).

Two drivers share the same prefill and step functions:
- `generate` runs the whole decode loop inside one jitted `jax.lax.while_loop` (no Python per token) and returns
  completions for a batch;
- `stream` runs a jitted step per token and yields tokens as they come (for interactive chat).

Sampling works on float32 logits: greedy when temperature is 0, otherwise temperature, then top-k, then top-p (nucleus)
on what is left. Step i draws with `fold_in(PRNGKey(seed), i)`, so both drivers draw the same tokens for the same seed.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.attention import AttentionMask
from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError
from llama_jax.infilling import infilling_prompt
from llama_jax.model import LayerInputs, Llama, Rotary, output_head, rope_frequencies
from llama_jax.quantize import is_quantized
from llama_jax.tokenizer import Tokenizer

Array = jax.Array
FinishReason = Literal["stop", "length"]
# Token fed to rows that have finished; its value never matters because those rows are masked and ignored.
_FILLER_TOKEN = 0
# Shapes are rounded up to these multiples so that similar calls share one compiled program.
_STOP_IDS_MULTIPLE = 8
_CACHE_MULTIPLE = 128


# ── Sampling ─────────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen."""

    temperature: float = 0.0  # 0 = greedy (argmax); top_k and top_p are then irrelevant
    top_k: int = 0  # keep only the k most likely tokens; 0 = no limit
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches p; 1 = no limit

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature={self.temperature} is not allowed: expected a finite number >= 0")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} is not allowed: expected >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} is not allowed: expected 0 < top_p <= 1 (1 turns it off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def arrays(self) -> SamplingArrays:
        # Greedy needs none of these; a temperature of 1 keeps the unused division harmless.
        temperature = self.temperature if not self.greedy else 1.0
        return SamplingArrays(jnp.float32(temperature), jnp.int32(self.top_k), jnp.float32(self.top_p))


GREEDY = Sampling()


class SamplingArrays(NamedTuple):
    """Sampling settings as traced values: changing them reuses the compiled program (only greedy-or-not is static)."""

    temperature: Array
    top_k: Array
    top_p: Array


def sample_tokens(logits: Array, key: Array, sampling: Sampling) -> Array:
    """One token id per row of float32 logits [batch, vocab]."""
    return _sample(logits, key, sampling.greedy, sampling.arrays())


def _sample(logits: Array, key: Array, greedy: bool, settings: SamplingArrays) -> Array:
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # Candidates in descending order (ties keep the lower id first, as argmax does). Drawing among sorted candidates
    # rather than thresholding logits keeps exactly k tokens even when logits tie, and k=1 or a tiny p leaves only
    # the argmax.
    candidate_ids = jnp.argsort(-logits, axis=-1, stable=True)
    candidate_logits = jnp.take_along_axis(logits, candidate_ids, axis=-1) / settings.temperature
    rank = jnp.arange(logits.shape[-1])
    keep = (settings.top_k <= 0) | (rank < settings.top_k)
    candidate_logits = jnp.where(keep, candidate_logits, -jnp.inf)
    probs = jax.nn.softmax(candidate_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Top-p over what top-k left: a candidate is kept while the more likely ones have not yet reached p (so the
    # first always is). top_p = 1 keeps everything, even where the cumulative sum rounds to 1 early.
    keep = (settings.top_p >= 1) | (mass_before < settings.top_p)
    choice = jax.random.categorical(key, jnp.where(keep, candidate_logits, -jnp.inf), axis=-1)
    return jnp.take_along_axis(candidate_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# ── Prompts ──────────────────────────────────────────────────────────────────────────────────────────────────────
class PaddedPrompts(NamedTuple):
    """A batch of prompts left-padded to one length (numpy, int32, [batch, length])."""

    tokens: np.ndarray
    segment_ids: np.ndarray  # 0 on padding, 1 on prompt tokens
    positions: np.ndarray  # RoPE positions: 0 at each row's first real token (padding gets 0 too; it is masked)
    lengths: np.ndarray  # [batch] real prompt lengths


def left_pad(prompts: Sequence[Sequence[int]], pad_to_multiple: int = 1) -> PaddedPrompts:
    """Left-pad prompts to the longest, rounded up to a multiple (fewer distinct shapes means fewer compiles)."""
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ConfigError("every prompt needs at least one token (e.g. BOS)")
    lengths = np.array([len(prompt) for prompt in prompts], np.int32)
    width = _round_up(int(lengths.max()), pad_to_multiple)
    tokens = np.full((len(prompts), width), _FILLER_TOKEN, np.int32)
    segment_ids = np.zeros((len(prompts), width), np.int32)
    positions = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        start = width - len(prompt)
        tokens[row, start:] = prompt
        segment_ids[row, start:] = 1
        positions[row, start:] = np.arange(len(prompt))
    return PaddedPrompts(tokens, segment_ids, positions, lengths)


# ── The model, layer by layer, with a per-layer cache ─────────────────────────────────────────────────────────────
class DecodeWeights(NamedTuple):
    """The model's parameters laid out for decoding: each block's weights on their own (not slices of a stack)."""

    embedding: Array  # [vocab, dim]
    output: Array | None  # [dim, vocab], or None when the head is tied to the embedding
    final_norm: nnx.State
    layers: tuple[nnx.State, ...]  # one Block state per layer


class Architecture(NamedTuple):
    """The static (hashable) half of a model: its config and the graph definitions to rebuild its modules from."""

    config: ModelConfig
    block: nnx.GraphDef
    norm: nnx.GraphDef


class LayerCache(NamedTuple):
    """Keys and values of every layer, one buffer per layer so that each step writes its slot in place."""

    layers: tuple[tuple[Array, Array], ...]  # per layer: keys and values [batch, max_len, kv_heads, head_dim]
    segment_ids: Array  # [batch, max_len] int32; 0 marks empty slots and padding
    index: Array  # int32: the next slot to write, a scalar (every row) or [batch] (each row its own, as the server's)

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, max_len: int) -> LayerCache:
        shape, dtype = (batch, max_len, config.kv_heads, config.head_dim), jnp.dtype(config.dtype)
        layers = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layers))
        return cls(layers, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


def decode_weights(model: Llama) -> tuple[Architecture, DecodeWeights]:
    """Split a model into its static architecture and its weights per layer, cast to the compute dtype.

    The model casts every weight to the compute dtype where it uses it, so casting once here changes no result; it
    spares each decode step re-reading float32 weights and converting them (decoding is bound by reading weights).
    """
    block_graphdef, blocks = nnx.split(model.blocks)
    norm_graphdef, final_norm = nnx.split(model.final_norm)
    architecture = Architecture(model.config, block_graphdef, norm_graphdef)
    output = None if model.output is None else model.output[...]
    return architecture, _unstack_jitted(model.embedding[...], output, final_norm, blocks,
                                         n_layers=model.config.n_layers, dtype=model.config.dtype)


@functools.partial(jax.jit, static_argnames=("n_layers", "dtype"))
def _unstack_jitted(embedding: Array, output: Array | None, final_norm: nnx.State, blocks: nnx.State, n_layers: int,
                    dtype: str) -> DecodeWeights:
    # A quantized weight (llama_jax.quantize) stays as it is, integers and float32 scales: it is dequantized where
    # it is used, and its layer is sliced as one QArray (whose `[i]` slices the values and the scales together).
    cast = lambda tree: jax.tree.map(  # noqa: E731
        lambda value: value if is_quantized(value) else value.astype(dtype), tree, is_leaf=is_quantized)
    layers = tuple(cast(jax.tree.map(lambda value, i=i: value[i], blocks, is_leaf=is_quantized))
                   for i in range(n_layers))
    return DecodeWeights(cast(embedding), None if output is None else cast(output), cast(final_norm), layers)


def forward(arch: Architecture, weights: DecodeWeights, tokens: Array, positions: Array, segment_ids: Array,
            cache: LayerCache) -> tuple[Array, LayerCache]:
    """Llama.hidden_states with a cache, one layer after another: final-normed hidden states [batch, seq, dim].

    The blocks are the model's own `Block` modules; only the loop over layers differs (unrolled, per-layer buffers).
    """
    config = arch.config
    batch, length = tokens.shape
    start = cache.index
    slots = jnp.broadcast_to(start[..., None] + jnp.arange(length, dtype=jnp.int32), (batch, length))
    mask = AttentionMask.into_cache(slots, segment_ids, cache.segment_ids, start)
    inputs = LayerInputs(Rotary.at(positions, rope_frequencies(config)), mask, start)
    x = jnp.take(weights.embedding, tokens, axis=0).astype(config.dtype)
    layer_caches = []
    for layer_weights, layer_cache in zip(weights.layers, cache.layers):
        x, layer_cache = nnx.merge(arch.block, layer_weights)(x, inputs, layer_cache)
        layer_caches.append(layer_cache)
    hidden = nnx.merge(arch.norm, weights.final_norm)(x)
    return hidden, LayerCache(tuple(layer_caches), mask.key_segments, start + length)


def output_logits(arch: Architecture, weights: DecodeWeights, hidden: Array) -> Array:
    """Llama.logits: the output head, float32 logits."""
    return output_head(hidden, weights.embedding, weights.output, arch.config.dtype)


# ── Prefill and decode steps ─────────────────────────────────────────────────────────────────────────────────────
class DecodeState(NamedTuple):
    """Everything the decode loop carries from one step to the next."""

    cache: LayerCache
    last_token: Array  # [batch] the most recent token, fed at the next step
    next_position: Array  # [batch] its RoPE position
    done: Array  # [batch] bool: the row produced a stop token (it keeps running, masked, until all rows are done)
    step: Array  # int32 scalar: tokens generated so far
    output: Array  # [batch, max_new_tokens] generated tokens (filler after a row's stop token)


class Rules(NamedTuple):
    """The per-call inputs of decoding that are traced values, so changing them reuses the compiled program."""

    stop_ids: Array  # [n] int32, padded with -1 (never drawn) to a multiple of _STOP_IDS_MULTIPLE
    sampling: SamplingArrays
    key: Array  # the base PRNG key; step i draws with fold_in(key, i)


def _is_stop(tokens: Array, stop_ids: Array) -> Array:
    return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


def _prefill(arch: Architecture, weights: DecodeWeights, prompts: PaddedPrompts, rules: Rules, greedy: bool,
             cache_len: int, max_new_tokens: int) -> DecodeState:
    """Run the whole padded prompt through the model into a fresh cache and draw the first new token."""
    batch = prompts.tokens.shape[0]
    cache = LayerCache.empty(arch.config, batch, cache_len)
    hidden, cache = forward(arch, weights, prompts.tokens, prompts.positions, prompts.segment_ids, cache)
    # Left padding puts every row's last prompt token in the last slot: only that slot's logits are needed.
    logits = output_logits(arch, weights, hidden[:, -1:])[:, 0]
    first = _sample(logits, jax.random.fold_in(rules.key, 0), greedy, rules.sampling)
    output = jnp.full((batch, max_new_tokens), _FILLER_TOKEN, jnp.int32).at[:, 0].set(first)
    return DecodeState(cache, first, prompts.lengths.astype(jnp.int32), _is_stop(first, rules.stop_ids),
                       jnp.ones((), jnp.int32), output)


def _decode_step(arch: Architecture, weights: DecodeWeights, state: DecodeState, rules: Rules,
                 greedy: bool) -> DecodeState:
    """Feed each row's last token and draw the next; finished rows are fed as padding (segment 0) and keep filler."""
    segment = jnp.where(state.done, 0, 1).astype(jnp.int32)[:, None]
    hidden, cache = forward(arch, weights, state.last_token[:, None], state.next_position[:, None], segment,
                             state.cache)
    logits = output_logits(arch, weights, hidden)
    drawn = _sample(logits[:, 0], jax.random.fold_in(rules.key, state.step), greedy, rules.sampling)
    token = jnp.where(state.done, _FILLER_TOKEN, drawn)
    output = jax.lax.dynamic_update_slice(state.output, token[:, None], (0, state.step))
    return DecodeState(cache, token, state.next_position + 1, state.done | _is_stop(token, rules.stop_ids),
                       state.step + 1, output)


def _decode_loop(arch: Architecture, weights: DecodeWeights, state: DecodeState, rules: Rules,
                 greedy: bool) -> DecodeState:
    max_new_tokens = state.output.shape[1]

    def keep_going(carry: tuple[DecodeWeights, DecodeState]) -> Array:
        state = carry[1]
        return (state.step < max_new_tokens) & ~jnp.all(state.done)

    def step(carry: tuple[DecodeWeights, DecodeState]) -> tuple[DecodeWeights, DecodeState]:
        # NNX refuses to run a module whose parameters are tracers of an outer trace, so the weights travel in the
        # (unchanged) loop carry and the modules are rebuilt inside the body.
        weights, state = carry
        return weights, _decode_step(arch, weights, state, rules, greedy)

    return jax.lax.while_loop(keep_going, step, (weights, state))[1]


_STATIC = ("arch", "greedy", "cache_len", "max_new_tokens")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_jitted(arch: Architecture, weights: DecodeWeights, prompts: PaddedPrompts, rules: Rules, greedy: bool,
                     cache_len: int, max_new_tokens: int) -> tuple[Array, Array]:
    state = _prefill(arch, weights, prompts, rules, greedy, cache_len, max_new_tokens)
    state = _decode_loop(arch, weights, state, rules, greedy)
    return state.output, state.step


@functools.partial(jax.jit, static_argnames=_STATIC)
def _prefill_jitted(arch: Architecture, weights: DecodeWeights, prompts: PaddedPrompts, rules: Rules, greedy: bool,
                    cache_len: int, max_new_tokens: int) -> DecodeState:
    return _prefill(arch, weights, prompts, rules, greedy, cache_len, max_new_tokens)


# The state is donated so that each step updates the cache in place instead of copying it.
@functools.partial(jax.jit, static_argnames=("arch", "greedy"), donate_argnames=("state",))
def _decode_step_jitted(arch: Architecture, weights: DecodeWeights, state: DecodeState, rules: Rules,
                        greedy: bool) -> DecodeState:
    return _decode_step(arch, weights, state, rules, greedy)


def sample_in_graph(model: Llama, prompts: PaddedPrompts, key: Array, sampling: Sampling, stop_ids: Array,
                    max_new_tokens: int) -> Array:
    """`generate`'s prefill and decode loop as a traceable function, for use inside a jitted step whose parameters
    are traced (PPO's rollouts): new tokens [batch, max_new_tokens], each row's stop token included and filler (0)
    after it. `prompts` are jax arrays (`left_pad`'s output placed on the mesh); `key` raw PRNG key data; `stop_ids`
    [n] int32 (pad with -1)."""
    arch, weights = decode_weights(model)
    rules = Rules(stop_ids, sampling.arrays(), key)
    cache_len = _round_up(prompts.tokens.shape[1] + max_new_tokens, _CACHE_MULTIPLE)
    state = _prefill(arch, weights, prompts, rules, sampling.greedy, cache_len, max_new_tokens)
    return _decode_loop(arch, weights, state, rules, sampling.greedy).output


# ── Public drivers ───────────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Completion:
    """The new tokens of one prompt, without the stop token; `stop_token` is the id that ended it, if any."""

    tokens: list[int]
    finish_reason: FinishReason
    stop_token: int | None = None


class _Prepared(NamedTuple):
    arch: Architecture
    weights: DecodeWeights
    prompts: PaddedPrompts
    rules: Rules
    cache_len: int


def _prepare(model: Llama, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling, seed: int,
             stop_ids: Iterable[int], pad_to_multiple: int) -> _Prepared:
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} is not allowed: expected at least 1")
    padded = left_pad(prompts, pad_to_multiple)
    vocab_size = model.config.vocab_size
    out_of_range = sorted({int(t) for prompt in prompts for t in prompt if not 0 <= int(t) < vocab_size})
    if out_of_range:
        raise ConfigError(f"prompt token ids {out_of_range[:5]} are outside the model's vocabulary "
                          f"(size {vocab_size}): is the tokenizer the model's?")
    longest = int(padded.lengths.max())
    if longest + max_new_tokens > model.config.max_seq_len:
        raise ConfigError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                          f"max_seq_len={model.config.max_seq_len}")
    # Stop ids are padded with -1 (never drawn) to a fixed multiple, so different stop sets share one program.
    unique_stops = sorted({int(t) for t in stop_ids})
    stop_array = np.full(_round_up(max(len(unique_stops), 1), _STOP_IDS_MULTIPLE), -1, np.int32)
    stop_array[: len(unique_stops)] = unique_stops
    rules = Rules(jnp.asarray(stop_array), sampling.arrays(), jax.random.PRNGKey(seed))
    # The cache length is rounded up too: the decode step's program depends on it, and a chat's prompts grow.
    cache_len = _round_up(padded.tokens.shape[1] + max_new_tokens, _CACHE_MULTIPLE)
    return _Prepared(*decode_weights(model), PaddedPrompts(*(jnp.asarray(part) for part in padded)), rules, cache_len)


def generate(model: Llama, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: Sampling = GREEDY,
             seed: int = 0, stop_ids: Iterable[int] = (), pad_to_multiple: int = 16) -> list[Completion]:
    """Complete a batch of token-id prompts (any lengths); each row stops at its first stop id or the token limit.

    Each row's result equals generating that prompt alone (up to float rounding of the differently padded batch).
    pad_to_multiple rounds the padded prompt length up, so prompts of similar length reuse one compiled program.
    """
    stop_set = frozenset(int(t) for t in stop_ids)
    prepared = _prepare(model, prompts, max_new_tokens, sampling, seed, stop_set, pad_to_multiple)
    output, steps = _generate_jitted(prepared.arch, prepared.weights, prepared.prompts, prepared.rules,
                                     sampling.greedy, prepared.cache_len, max_new_tokens)
    output = np.asarray(output)[:, : int(steps)]
    return [_completion(row.tolist(), stop_set) for row in output]


def _completion(tokens: list[int], stop_ids: frozenset[int]) -> Completion:
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return Completion(tokens[:index], "stop", token)
    return Completion(tokens, "length")


def stream(model: Llama, prompt: Sequence[int], *, max_new_tokens: int, sampling: Sampling = GREEDY, seed: int = 0,
           stop_ids: Iterable[int] = (), pad_to_multiple: int = 16) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are drawn (the stop token is not yielded).

    Draws the same tokens as `generate` for the same prompt and seed; Python runs once per token, so it is a little
    slower, which an interactive reader does not notice.
    """
    stop_set = frozenset(int(t) for t in stop_ids)
    prepared = _prepare(model, [prompt], max_new_tokens, sampling, seed, stop_set, pad_to_multiple)
    state = _prefill_jitted(prepared.arch, prepared.weights, prepared.prompts, prepared.rules, sampling.greedy,
                            prepared.cache_len, max_new_tokens)
    for step in range(max_new_tokens):
        if step > 0:
            state = _decode_step_jitted(prepared.arch, prepared.weights, state, prepared.rules, sampling.greedy)
        token = int(state.last_token[0])
        if token in stop_set:
            return
        yield token


# ── Text ─────────────────────────────────────────────────────────────────────────────────────────────────────────
class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces to print, never splitting a multi-byte character.

    Byte-fallback tokens (SentencePiece) and byte-level BPE (tiktoken) can end in the middle of a UTF-8 character,
    which decodes to U+FFFD until the rest arrives; such a tail is held back. Decoding the whole list each time keeps
    the tokenizer's own rules (e.g. SentencePiece dropping the leading space of the first piece).
    """

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token: int) -> str:
        """Add one id; return the text that is now certain (possibly empty)."""
        self._ids.append(token)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def flush(self) -> str:
        """Whatever is left (an unfinished character is printed as U+FFFD)."""
        return self._take(self._tokenizer.decode(self._ids))

    @property
    def text(self) -> str:
        return self._tokenizer.decode(self._ids)

    def _take(self, text: str) -> str:
        # Decoding is normally prefix-stable. If a new token ever rewrote earlier text, what was printed stays
        # printed and only the text beyond it is added.
        piece = text[len(self._emitted):] if len(text) > len(self._emitted) else ""
        self._emitted += piece
        return piece


# ── Infilling (the prompt and the training transform: llama_jax/infilling.py) ─────────────────────────────────────────
@dataclass(frozen=True)
class Infilling:
    """One infilled middle: its text, its token ids (without ▁<EOT>) and why generation ended."""

    middle: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop": the model wrote ▁<EOT>; "length": max_new_tokens ran out first


def infill(model: Llama, tokenizer: Tokenizer, prefixes: Sequence[str], suffixes: Sequence[str], *,
           suffix_first: bool = False, max_new_tokens: int = 128, sampling: Sampling = GREEDY,
           seed: int = 0) -> list[Infilling]:
    """The middle between each prefix and suffix (Meta's `text_infilling`): one batched `generate` call that stops
    each row at ▁<EOT>. Greedy unless `sampling` says otherwise."""
    if len(prefixes) != len(suffixes):
        raise ConfigError(f"infill needs one suffix per prefix: got {len(prefixes)} prefixes, {len(suffixes)} "
                          "suffixes")
    prompts = [infilling_prompt(tokenizer, prefix, suffix, suffix_first=suffix_first)
               for prefix, suffix in zip(prefixes, suffixes)]
    if not prompts:
        return []
    eot = tokenizer.infilling_ids().eot
    completions = generate(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                           stop_ids=[eot])
    return [Infilling(tokenizer.decode_infilling(completion.tokens), completion.tokens, len(prompt),
                      completion.finish_reason) for prompt, completion in zip(prompts, completions)]
