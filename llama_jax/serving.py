"""The server's engine: continuous batching of generation requests over a fixed number of KV-cache slots.

    submit ─ bounded queue ─┬─ prefill into a free slot (batch 1, prompt right-padded to a bucket) ─┐
                            │                                                                       ▼
                            └──── slot freed ◄── stop / limit / cancel ◄── decode step over the busy slots
One device thread runs the loop; callers (the OpenAI-compatible HTTP layer, `build_app` at the end of this module,
and `run_to_end` for benchmarks) only queue requests and receive events through a sink they pass in.

Contract:
- The cache has `slots` rows of `cache_len` slots each, and one write index per row (`LayerCache.index` [slots]), so
  every request sits at its own length. A new request is prefilled alone into a fresh cache of its padded prompt's
  width and copied into a free row, then joins the running decode batch at the next step boundary; a finished,
  cancelled or disconnected request frees its row at the next step boundary.
- A prompt is right-padded (padding is segment 0, never attended, and overwritten by later tokens), so a row's RoPE
  position equals its cache slot and prompt-token log-probabilities (`echo`) come out of the same prefill.
- The cache holds rows 0 to the highest busy one, rounded up to a power of two (rows are taken lowest first), and
  grows or shrinks when that changes; a decode step runs all its rows, so a lone request does not pay for idle slots.
- Steps are pipelined: the next step is dispatched (fed the device's own copy of the tokens just drawn) before the
  host reads and delivers the last one, so the host's work overlaps the device's. A row whose last token ends it has
  had one more token drawn speculatively, which is ignored.
- Sampling is per row: a request's token i is drawn with `fold_in(PRNGKey(seed), i)`, as `llama_jax.generate` does,
  so a request's tokens do not depend on its neighbours and equal `generate` on that prompt alone with that seed (up
  to float rounding). Greedy rows use argmax; programs are compiled separately for all-greedy and any-sampling.
- Events reach the sink in order from the engine thread: optionally `PromptScores`, then `Token`s, then exactly one
  `Finished` (or `Failed`). A sink must not block.
"""
from __future__ import annotations

import collections
import functools
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from starlette.requests import Request  # module-level: FastAPI resolves route annotations in globals

from llama_jax.errors import ConfigError, LlamaJaxError
from llama_jax.generate import (
    GREEDY,
    Architecture,
    DecodeWeights,
    LayerCache,
    Sampling,
    SamplingArrays,
    _round_up,
    _sample,
    decode_weights,
    forward,
    output_logits,
)
from llama_jax.model import Llama

Array = jax.Array
FinishReason = Literal["stop", "length", "cancelled"]
# Prompts are right-padded to a multiple of this, so similar lengths share one compiled prefill program.
PROMPT_BUCKET = 32
# The most alternatives a request may ask to see per token (OpenAI's completions limit).
MAX_TOP_LOGPROBS = 5


class QueueFullError(LlamaJaxError):
    """The engine's queue of waiting requests is at its bound (the HTTP layer answers 429)."""


# ── Requests and events ─────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to continue. `logprobs`/`prompt_logprobs`: None = none, n = the chosen token's and the n most
    likely tokens' log-probabilities (0 ≤ n ≤ MAX_TOP_LOGPROBS), for generated and prompt tokens respectively."""

    prompt: Sequence[int]
    max_tokens: int
    sampling: Sampling = GREEDY
    seed: int = 0
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    prompt_logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprobs:
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-probability), most likely first


@dataclass(frozen=True)
class PromptScores:
    """Log-probabilities of prompt tokens 1.. given the tokens before them (token 0 has none)."""

    logprobs: tuple[TokenLogprobs, ...]


@dataclass(frozen=True)
class Token:
    token: int
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    generated: int  # tokens drawn, the stop token included
    stop_token: int | None = None
    stop_logprobs: TokenLogprobs | None = None  # the stop token's, when the request asked for logprobs


@dataclass(frozen=True)
class Failed:
    message: str


Event = PromptScores | Token | Finished | Failed
Sink = Callable[[Event], None]


class Handle:
    """A submitted request; `cancel` frees its slot at the next step boundary (the sink then gets Finished)."""

    def __init__(self, request: GenerationRequest, sink: Sink):
        self.request, self.sink = request, sink
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True  # read by the engine thread; a plain flag suffices (set once, never cleared)


@dataclass(frozen=True)
class EngineConfig:
    slots: int = 8  # KV-cache rows: the most requests decoded at once
    max_queue: int = 64  # the most requests waiting for a slot; more are refused (QueueFullError)
    max_seq_len: int | None = None  # prompt + new tokens per request (default and upper bound: the model's)

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ConfigError(f"slots={self.slots} is not allowed: expected at least 1")
        if self.max_queue < 0:
            raise ConfigError(f"max_queue={self.max_queue} is not allowed: expected at least 0")


# ── Device programs ─────────────────────────────────────────────────────────────────────────────────────────────
class RowRules(NamedTuple):
    """Per-row sampling inputs (traced, so new requests reuse the compiled programs)."""

    keys: Array  # [rows, 2] uint32: PRNGKey(seed) of each row's request
    steps: Array  # [rows] int32: tokens the row has drawn so far (the fold_in index of its next draw)
    temperature: Array  # [rows] float32, 0 = greedy
    top_k: Array  # [rows] int32
    top_p: Array  # [rows] float32


class Drawn(NamedTuple):
    tokens: Array  # [rows] int32
    logprob: Array | None  # [rows] float32: the drawn token's log-probability
    top_values: Array | None  # [rows, n]
    top_ids: Array | None  # [rows, n]


def _draw(logits: Array, rules: RowRules, sampling: bool, top_n: int | None) -> Drawn:
    logits = logits.astype(jnp.float32)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if sampling:
        keys = jax.vmap(jax.random.fold_in)(rules.keys, rules.steps)
        temperature = jnp.where(rules.temperature > 0, rules.temperature, 1.0)

        def one(row_logits, key, t, k, p):
            return _sample(row_logits[None], key, False, SamplingArrays(t, k, p))[0]

        drawn = jax.vmap(one)(logits, keys, temperature, rules.top_k, rules.top_p)
        tokens = jnp.where(rules.temperature > 0, drawn, tokens)
    if top_n is None:
        return Drawn(tokens, None, None, None)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
    values, ids = jax.lax.top_k(log_probs, max(top_n, 1))
    return Drawn(tokens, chosen, values, ids)


class _Model:
    """The static argument of the engine's programs: the architecture and the weights' tree structure.

    Hashed by identity: jit hashes its static arguments on every call, and hashing the modules' graph definitions
    (or flattening the weights' nnx.State) each step costs more host time than a small model's step takes. The
    weights travel as a flat tuple of arrays for the same reason.
    """

    def __init__(self, arch: Architecture, weights: DecodeWeights):
        self.arch = arch
        leaves, self.treedef = jax.tree.flatten(weights)
        self.leaves = tuple(leaves)

    def weights(self, leaves: Sequence[Array]) -> DecodeWeights:
        return jax.tree.unflatten(self.treedef, leaves)


class PromptDrawn(NamedTuple):
    logprob: Array  # [width - 1]: log P(token t+1 | tokens ..t)
    top_values: Array  # [width - 1, n]
    top_ids: Array  # [width - 1, n]


@functools.partial(jax.jit, static_argnames=("model", "sampling", "top_n", "prompt_top_n"), donate_argnames=("cache",))
def _prefill_slot(model: _Model, leaves: Sequence[Array], cache: LayerCache, slot: Array, tokens: Array,
                  length: Array, rules: RowRules, sampling: bool, top_n: int | None,
                  prompt_top_n: int | None) -> tuple[LayerCache, Drawn, PromptDrawn | None]:
    """Run one right-padded prompt [1, width] into a fresh cache, copy it into row `slot`, draw its first token."""
    arch, weights = model.arch, model.weights(leaves)
    width = tokens.shape[1]
    offsets = jnp.arange(width, dtype=jnp.int32)[None]
    segments = (offsets < length).astype(jnp.int32)
    hidden, fresh = forward(arch, weights, tokens, offsets, segments, LayerCache.empty(arch.config, 1, width))
    last = jax.lax.dynamic_slice_in_dim(hidden, length - 1, 1, axis=1)
    drawn = _draw(output_logits(arch, weights, last)[:, 0], rules, sampling, top_n)
    layers = tuple(tuple(jax.lax.dynamic_update_slice(full, new.astype(full.dtype), (slot, 0, 0, 0))
                         for full, new in zip(full_layer, new_layer))
                   for full_layer, new_layer in zip(cache.layers, fresh.layers))
    row_segments = jnp.zeros((1, cache.segment_ids.shape[1]), jnp.int32).at[:, :width].set(segments)
    cache = LayerCache(layers, jax.lax.dynamic_update_slice(cache.segment_ids, row_segments, (slot, 0)),
                       cache.index.at[slot].set(length))
    prompt = None
    if prompt_top_n is not None:
        log_probs = jax.nn.log_softmax(output_logits(arch, weights, hidden)[0, :-1], axis=-1)
        chosen = jnp.take_along_axis(log_probs, tokens[0, 1:, None], axis=-1)[:, 0]
        values, ids = jax.lax.top_k(log_probs, max(prompt_top_n, 1))
        prompt = PromptDrawn(chosen, values, ids)
    return cache, drawn, prompt


@functools.partial(jax.jit, static_argnames=("model", "rows", "sampling", "top_n"), donate_argnames=("cache",))
def _decode_slots(model: _Model, leaves: Sequence[Array], cache: LayerCache, previous: Array, chained: Array,
                  given: Array, active: Array, rules: RowRules, rows: int, sampling: bool,
                  top_n: int | None) -> tuple[LayerCache, Drawn, Array]:
    """One token for every row of the cache (`rows` of them): busy rows feed their last token at their own slot;
    idle rows are fed as padding (segment 0) and keep their index.

    A row's last token is `previous[row]` (the tokens the step before drew, still on the device) where `chained`,
    else `given[row]` (a token from the host: a new row's first). Returns the new cache, what was drawn, and the
    drawn tokens padded to all slots (the next step's `previous`).
    """
    arch, weights = model.arch, model.weights(leaves)
    tokens = jnp.where(chained, previous[:rows], given)
    segment = active.astype(jnp.int32)[:, None]
    hidden, new = forward(arch, weights, tokens[:, None], cache.index[:, None], segment, cache)
    drawn = _draw(output_logits(arch, weights, hidden)[:, 0], rules, sampling, top_n)
    index = jnp.where(active, new.index, cache.index)
    padded = jnp.zeros(previous.shape, jnp.int32).at[:rows].set(drawn.tokens)
    return LayerCache(new.layers, new.segment_ids, index), drawn, padded


@functools.partial(jax.jit, static_argnames=("rows",))  # not donated: the shape changes, the buffers cannot be reused
def _resize_cache(cache: LayerCache, rows: int) -> LayerCache:
    """The cache with `rows` rows: the first rows kept, new rows empty."""
    def resize(part: Array) -> Array:
        if part.shape[0] >= rows:
            return part[:rows]
        return jnp.concatenate([part, jnp.zeros((rows - part.shape[0], *part.shape[1:]), part.dtype)])

    return jax.tree.map(resize, cache)


# ── The engine ──────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass(eq=False)  # compared by identity: a slot's row may be replaced while a step for the old one is in flight
class _Row:
    handle: Handle
    key: np.ndarray  # [2] uint32
    last_token: int = 0  # the host's copy of the token to feed next, for a row not chained to the step in flight
    dispatched: int = 0  # draws dispatched so far (the fold_in index of the next draw)
    delivered: int = 0  # draws handed to the sink


class _InFlight(NamedTuple):
    """A decode step dispatched but not yet read back: the device works on it while the host delivers the last."""

    drawn: Drawn  # device arrays
    padded: Array  # [slots] its tokens, fed to the next step without a trip through the host
    rows: tuple[_Row | None, ...]  # the row of each slot it ran (None: idle)


def _logprobs_of(drawn: Drawn, row: int, top_n: int) -> TokenLogprobs:
    top = tuple(zip(drawn.top_ids[row, :top_n].tolist(), drawn.top_values[row, :top_n].tolist()))
    return TokenLogprobs(float(drawn.logprob[row]), top)


def _rows_bucket(highest_busy: int, slots: int) -> int:
    rows = 1
    while rows < highest_busy + 1:
        rows *= 2
    return min(rows, slots)


class Engine:
    """Continuous batching over `config.slots` KV-cache rows, run by one thread (`start`/`stop`)."""

    def __init__(self, model: Llama, config: EngineConfig = EngineConfig()):
        model_len = model.config.max_seq_len
        self.max_seq_len = config.max_seq_len or model_len
        if not 1 < self.max_seq_len <= model_len:
            raise ConfigError(f"max_seq_len={config.max_seq_len} is not allowed: expected 2..{model_len} (the "
                              "model's max_seq_len)")
        self.config = config
        self.vocab_size = model.config.vocab_size
        self._model = _Model(*decode_weights(model))
        self.arch = self._model.arch
        self.cache_len = _round_up(self.max_seq_len, PROMPT_BUCKET)
        self._cache = self._empty_cache()
        self._rows: list[_Row | None] = [None] * config.slots
        self._waiting: collections.deque[Handle] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for monitoring)
        self._in_flight: _InFlight | None = None
        self.finished: collections.Counter[str] = collections.Counter()  # requests ended, by reason

    def _empty_cache(self) -> LayerCache:
        # The cache holds rows 0 .. the highest busy slot, rounded up to a power of two (`_fit_cache`).
        cache = LayerCache.empty(self.arch.config, 1, self.cache_len)
        return cache._replace(index=jnp.zeros((1,), jnp.int32))

    def _fit_cache(self, rows: int) -> None:
        """Grow or shrink the cache to `rows` rows. A step then runs on exactly the rows it has: slicing the busy
        rows out of a larger cache inside the step made XLA copy the whole cache at every step."""
        if rows != self._cache.index.shape[0]:
            self._cache = _resize_cache(self._cache, rows)

    # ── Callers' side (any thread) ──────────────────────────────────────────────────────────────────────────
    def check(self, request: GenerationRequest) -> None:
        """Raise ConfigError unless the request fits this engine (the HTTP layer turns it into a 400)."""
        prompt = request.prompt
        if len(prompt) == 0:
            raise ConfigError("the prompt has no tokens: expected at least one")
        bad = sorted({int(t) for t in prompt if not 0 <= int(t) < self.vocab_size})
        if bad:
            raise ConfigError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        if request.max_tokens < 0:
            raise ConfigError(f"max_tokens={request.max_tokens} is not allowed: expected >= 0")
        if len(prompt) + request.max_tokens > self.max_seq_len:
            raise ConfigError(f"this model's maximum context length is {self.max_seq_len} tokens; the prompt has "
                              f"{len(prompt)} and max_tokens asks for {request.max_tokens} more")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(request, name)
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise ConfigError(f"{name}={value} is not allowed: expected 0..{MAX_TOP_LOGPROBS}")
        if not 0 <= request.seed < 2**31:
            raise ConfigError(f"seed={request.seed} is not allowed: expected 0 <= seed < 2**31")

    def submit(self, request: GenerationRequest, sink: Sink) -> Handle:
        """Queue a request; its events go to `sink` from the engine thread. QueueFullError when the queue is full."""
        self.check(request)
        handle = Handle(request, sink)
        with self._wake:
            # Requests the engine thread has not yet moved into free slots do not count against the bound.
            free = sum(row is None for row in self._rows)
            if len(self._waiting) - free >= self.config.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting for a slot (the bound is "
                                     f"{self.config.max_queue} beyond the free slots: --max-queue); retry later")
            self._waiting.append(handle)
            self._wake.notify()
        return handle

    def stats(self) -> dict[str, int]:
        with self._wake:
            busy = sum(row is not None for row in self._rows)
            return {"slots": self.config.slots, "busy_slots": busy, "queued": len(self._waiting),
                    "decode_steps": self.steps, **{f"finished_{reason}": self.finished[reason]
                                                   for reason in ("stop", "length", "cancelled")}}

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="llama-jax-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # ── The engine thread ───────────────────────────────────────────────────────────────────────────────────
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not any(self._rows) and self._in_flight is None:
                    self._wake.wait()
                if self._stopping:
                    break
                admitted = []
                for slot, row in enumerate(self._rows):
                    if row is None and self._waiting:
                        admitted.append((slot, self._waiting.popleft()))
            seated: set[int] = set()
            try:
                for slot, handle in admitted:
                    self._admit(slot, handle)
                    seated.add(id(handle))
                self._drop_cancelled()
                self._step()
            except Exception as error:  # a failed device call: fail the busy requests, keep serving
                self._in_flight = None
                message = f"the engine failed: {type(error).__name__}: {error}"
                self._fail_all(message)
                for _, handle in admitted:  # taken from the queue but never seated: they are owed an answer too
                    if id(handle) not in seated:
                        handle.sink(Failed(message))
        for row in self._rows:
            if row is not None:
                row.handle.sink(Failed("the server is shutting down"))

    def _fail_all(self, message: str) -> None:
        with self._wake:
            rows, self._rows = self._rows, [None] * self.config.slots
        for row in rows:
            if row is not None:
                row.handle.sink(Failed(message))
        self._cache = self._empty_cache()  # a failed call may have consumed the donated cache

    def _free(self, slot: int, event: Event) -> None:
        row = self._rows[slot]
        with self._wake:
            self._rows[slot] = None
            if isinstance(event, Finished):
                self.finished[event.reason] += 1
        row.handle.sink(event)

    def _rules(self, rows: Sequence[_Row | None]) -> tuple[RowRules, bool]:
        n = len(rows)
        keys, steps = np.zeros((n, 2), np.uint32), np.zeros(n, np.int32)
        temperature, top_k, top_p = np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32)
        for i, row in enumerate(rows):
            if row is not None:
                sampling = row.handle.request.sampling
                keys[i], steps[i] = row.key, row.dispatched
                temperature[i], top_k[i], top_p[i] = sampling.temperature, sampling.top_k, sampling.top_p
        return RowRules(keys, steps, temperature, top_k, top_p), bool((temperature > 0).any())

    def _admit(self, slot: int, handle: Handle) -> None:
        request = handle.request
        if handle.cancelled:  # its client went away while it waited
            with self._wake:
                self.finished["cancelled"] += 1
            handle.sink(Finished("cancelled", 0))
            return
        row = _Row(handle, np.asarray(jax.random.PRNGKey(request.seed), np.uint32))
        length = len(request.prompt)
        width = min(_round_up(length, PROMPT_BUCKET), self.cache_len)
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :length] = request.prompt
        rules, sampling = self._rules([row])
        top_n = request.logprobs if request.max_tokens > 0 else None
        self._fit_cache(max(_rows_bucket(slot, self.config.slots), self._cache.index.shape[0]))
        self._cache, drawn, prompt = _prefill_slot(
            self._model, self._model.leaves, self._cache, np.int32(slot), tokens, np.int32(length), rules,
            sampling=sampling, top_n=top_n, prompt_top_n=request.prompt_logprobs)
        row.dispatched = 1
        with self._wake:
            self._rows[slot] = row
        if prompt is not None:
            prompt = PromptDrawn(*(np.asarray(part) for part in prompt))
            n = request.prompt_logprobs
            scores = tuple(TokenLogprobs(float(prompt.logprob[t]),
                                         tuple(zip(prompt.top_ids[t, :n].tolist(), prompt.top_values[t, :n].tolist())))
                           for t in range(length - 1))
            handle.sink(PromptScores(scores))
        if request.max_tokens == 0:
            self._free(slot, Finished("length", 0))
            return
        self._deliver(slot, row, Drawn(*(None if part is None else np.asarray(part) for part in drawn)), 0)

    def _deliver(self, slot: int, row: _Row, drawn: Drawn, index: int) -> None:
        """Hand `row` (in `slot`) its drawn token (row `index` of `drawn`) and finish it if that was its last. A row
        that ended (or was replaced) since the step was dispatched ignores the token: it was drawn speculatively."""
        if self._rows[slot] is not row:
            return
        request = row.handle.request
        token = int(drawn.tokens[index])
        row.delivered += 1
        logprobs = None if request.logprobs is None else _logprobs_of(drawn, index, request.logprobs)
        if token in request.stop_ids:
            self._free(slot, Finished("stop", row.delivered, token, logprobs))
            return
        row.last_token = token
        row.handle.sink(Token(token, logprobs))
        if row.delivered >= request.max_tokens:
            self._free(slot, Finished("length", row.delivered))

    def _drop_cancelled(self) -> None:
        for slot, row in enumerate(self._rows):
            if row is not None and row.handle.cancelled:
                self._free(slot, Finished("cancelled", row.delivered))

    def _step(self) -> None:
        """Dispatch the next decode step, then deliver the one in flight while the device runs the new one.

        A row is stepped again before its last token is known on the host (so the host's work overlaps the
        device's): if that token turns out to end it, the extra token is drawn for nothing and ignored.
        """
        in_flight, self._in_flight = self._in_flight, None
        live = [slot for slot, row in enumerate(self._rows)
                if row is not None and row.dispatched < row.handle.request.max_tokens]
        if live:
            busy = [slot for slot, row in enumerate(self._rows) if row is not None]
            rows = _rows_bucket(max(busy), self.config.slots)
            self._fit_cache(rows)
            chosen = [row if slot in live else None for slot, row in enumerate(self._rows[:rows])]
            flight_rows = in_flight.rows if in_flight is not None else ()
            chained = np.array([row is not None and slot < len(flight_rows) and flight_rows[slot] is row
                                for slot, row in enumerate(chosen)])
            given = np.array([0 if row is None else row.last_token for row in chosen], np.int32)
            active = np.array([row is not None for row in chosen])
            wanted = [row.handle.request.logprobs for row in chosen if row is not None]
            top_n = max((n for n in wanted if n is not None), default=None)
            rules, sampling = self._rules(chosen)
            previous = in_flight.padded if in_flight is not None else np.zeros(self.config.slots, np.int32)
            self._cache, drawn, padded = _decode_slots(
                self._model, self._model.leaves, self._cache, previous, chained, given, active, rules, rows=rows,
                sampling=sampling, top_n=top_n)
            for row in chosen:
                if row is not None:
                    row.dispatched += 1
            self._in_flight = _InFlight(drawn, padded, tuple(chosen))
            self.steps += 1
        if in_flight is not None:
            drawn = Drawn(*(None if part is None else np.asarray(part) for part in in_flight.drawn))
            for slot, row in enumerate(in_flight.rows):
                if row is not None:
                    self._deliver(slot, row, drawn, slot)


# ── Blocking use (benchmarks, tests) ────────────────────────────────────────────────────────────────────────────
@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    finished: Finished | None = None
    prompt_scores: PromptScores | None = None
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)


def run_to_end(engine: Engine, request: GenerationRequest, timeout: float | None = None) -> Result:
    """Submit a request and wait for its end; raise LlamaJaxError if the engine failed it."""
    events: queue.Queue[Event] = queue.Queue()
    engine.submit(request, events.put)
    result = Result()
    while True:
        event = events.get(timeout=timeout)
        if isinstance(event, Token):
            result.tokens.append(event.token)
            result.logprobs.append(event.logprobs)
        elif isinstance(event, PromptScores):
            result.prompt_scores = event
        elif isinstance(event, Finished):
            result.finished = event
            return result
        else:
            raise LlamaJaxError(event.message)


# ── Text: stop strings and token strings ────────────────────────────────────────────────────────────────────────
class StopText:
    """Tokens → text pieces to send, ending at the first stop string (which is not sent).

    While streaming, a tail of the text that could be the start of a stop string is held back until the next token
    settles it, so a stop string split over tokens is never half-sent.
    """

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        from llama_jax.generate import IncrementalDecoder

        self._decoder = IncrementalDecoder(tokenizer)
        self._stops = tuple(stop for stop in stops if stop)
        self._pending = ""
        self.stopped = False

    def push(self, token: int) -> str:
        return "" if self.stopped else self._settle(self._decoder.push(token))

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = self._settle(self._decoder.flush())
        if not self.stopped:
            text, self._pending = text + self._pending, ""
        return text

    def _settle(self, piece: str) -> str:
        self._pending += piece
        hits = [self._pending.find(stop) for stop in self._stops if stop in self._pending]
        if hits:
            text, self._pending, self.stopped = self._pending[:min(hits)], "", True
            return text
        hold = max((n for stop in self._stops for n in range(1, len(stop)) if self._pending.endswith(stop[:n])),
                   default=0)
        text, self._pending = self._pending[:len(self._pending) - hold], self._pending[len(self._pending) - hold:]
        return text


def token_text(tokenizer, token: int) -> str:
    """One token as text for log-probability listings (SentencePiece's "▁" shown as the space it stands for)."""
    piece = getattr(tokenizer, "piece", None)
    return piece(token).replace("\u2581", " ") if piece is not None else tokenizer.decode([token])


# ── The OpenAI-compatible HTTP API ──────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class ServerConfig:
    """What the HTTP layer needs besides the engine and the tokenizer."""

    model_name: str  # the id /v1/models lists and requests must name (or leave out)
    chat_format: str  # "llama2" | "llama3"
    api_key: str | None = None  # when set, every API route needs `Authorization: Bearer <key>`
    max_body_bytes: int = 1 << 20  # larger request bodies get 413 without being read
    web_dir: str | None = None  # static files served at / (the chat page), after the API routes


class ApiError(Exception):
    """An OpenAI-style error answer: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _error_bytes(error: ApiError) -> bytes:
    import json

    return json.dumps(error.body()).encode()


def _api_path(path: str) -> bool:
    """Routes the API key protects: the API itself, not /health nor the chat page's static files."""
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize", "/tokenizer_info")


class RequestGuard:
    """ASGI middleware run before any route: the API key, and the body size limit.

    A body whose Content-Length is over the limit is refused before a byte of it is read; a chunked body is read
    only up to the limit. The body read here is replayed to the route, and later receive() calls pass through (so a
    route still hears the client disconnect).
    """

    def __init__(self, app, config: ServerConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if self.config.api_key is not None and _api_path(scope["path"]):
            import hmac

            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.config.api_key}".encode()):
                what = "no API key given" if not given else "the API key is not valid"
                await self._refuse(send, ApiError(401, f"{what}: send the header 'Authorization: Bearer <key>'",
                                                  kind="authentication_error", code="invalid_api_key"))
                return
        limit = self.config.max_body_bytes
        too_large = ApiError(413, f"the request body is larger than the limit of {limit} bytes",
                             code="request_too_large")
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._refuse(send, too_large)
            return
        body, more = b"", True
        if scope["method"] in ("POST", "PUT", "PATCH"):
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    await self._refuse(send, too_large)
                    return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send, error: ApiError) -> None:
        payload = _error_bytes(error)
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def _request_models():
    """The request bodies as pydantic models (built on first use: pydantic is only needed by the server)."""
    from typing import Annotated

    from pydantic import BaseModel, ConfigDict, Field

    class Body(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

    class StreamOptions(Body):
        include_usage: bool = False
        continuous_usage_stats: bool = False

    class Common(Body):
        model: str | None = None
        max_tokens: int | None = None
        temperature: Annotated[float, Field(ge=0, le=100)] = 1.0
        top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
        top_k: Annotated[int, Field(ge=-1)] = 0  # vLLM spells "no limit" -1
        n: int = 1
        stream: bool = False
        stream_options: StreamOptions | None = None
        stop: str | list[str] | None = None
        seed: int | None = None
        presence_penalty: float = 0.0
        frequency_penalty: float = 0.0
        logit_bias: dict[str, float] | None = None
        user: str | None = None

    class Completion(Common):
        max_tokens: int | None = 16  # OpenAI's default for completions
        prompt: str | list[str] | list[int] | list[list[int]]
        echo: bool = False
        logprobs: int | None = None
        best_of: int | None = None
        suffix: str | None = None

    class TextPart(Body):
        type: str
        text: str

    class ChatMessage(Body):
        role: str
        content: str | list[TextPart]
        name: str | None = None

    class Chat(Common):
        messages: list[ChatMessage]
        max_completion_tokens: int | None = None
        logprobs: bool = False
        top_logprobs: int | None = None

    class Tokenize(Body):
        model: str | None = None
        prompt: str
        add_special_tokens: bool = True

    class Detokenize(Body):
        model: str | None = None
        tokens: list[int]

    return {"completion": Completion, "chat": Chat, "tokenize": Tokenize, "detokenize": Detokenize}


def _parse(raw: bytes, model_class):
    """JSON bytes → a validated request model, or a 400 ApiError naming the offending field."""
    import json

    from pydantic import ValidationError

    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return model_class.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = ("unknown field (not part of this API)" if first["type"] == "extra_forbidden" else first["msg"])
        raise ApiError(400, f"{param}: {message}", param=param) from None


def _check_common(body, model_name: str) -> None:
    if body.model is not None and body.model != model_name:
        raise ApiError(404, f"the model {body.model!r} does not exist: this server serves {model_name!r}",
                       param="model", code="model_not_found", kind="not_found_error")
    if body.n != 1:
        raise ApiError(400, f"n={body.n} is not supported: this server returns one choice (n=1)", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) != 0:
            raise ApiError(400, f"{name} is not supported (only 0)", param=name)
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not stop or len(stop) > 256 for stop in stops):
        raise ApiError(400, "stop takes at most 4 non-empty strings of at most 256 characters", param="stop")
    if body.seed is not None and not 0 <= body.seed < 2**31:
        raise ApiError(400, f"seed={body.seed} is not allowed: expected 0 <= seed < 2**31", param="seed")


def _stops(body) -> list[str]:
    return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])


def _sampling(body) -> Sampling:
    return Sampling(temperature=float(body.temperature), top_k=max(body.top_k, 0), top_p=float(body.top_p))


@dataclass
class _Outcome:
    """How a request ended, filled in as its events are read."""

    generated: int = 0
    reason: str = "length"


class _Events:
    """The asyncio side of one engine request: the engine thread's events land on an asyncio queue."""

    def __init__(self) -> None:
        import asyncio

        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handle: Handle | None = None

    def sink(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


def build_app(engine: Engine, tokenizer, config: ServerConfig):
    """The FastAPI application: the OpenAI routes, /health, the tokenizer routes, and the chat page at /."""
    import asyncio
    import json
    import secrets
    import time
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    models = _request_models()
    stop_ids = frozenset(tokenizer.stop_ids)
    from llama_jax.chat_format import Message, dialog_prompt, generation_stop_ids

    chat_stop_ids = stop_ids | generation_stop_ids(tokenizer, config.chat_format)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        if engine._thread is None:
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="llama-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(error.status_code, str(error.detail), kind=kind).body(),
                            status_code=error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        return JSONResponse(ApiError(500, f"internal error: {type(error).__name__}", kind="server_error").body(),
                            status_code=500)

    def submit(request: GenerationRequest, events: _Events) -> None:
        try:
            events.handle = engine.submit(request, events.sink)
        except QueueFullError as error:
            raise ApiError(429, str(error), kind="rate_limit_error", code="queue_full") from None
        except ConfigError as error:
            text = str(error)
            param = next((name for name in ("max_tokens", "logprobs", "seed") if name in text), "prompt")
            code = "context_length_exceeded" if "context length" in text else None
            raise ApiError(400, text, param=param, code=code) from None

    async def next_event(events: _Events, request: Request):
        """The next engine event; a client that went away cancels its request (freeing the slot)."""
        while True:
            try:
                return await asyncio.wait_for(events.queue.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    events.handle.cancel()
                    raise ApiError(499, "the client disconnected") from None

    async def text_pieces(get_event, text: StopText, outcome: _Outcome):
        """(text piece, event) for each engine event of a request until it ends: a token's piece (cut at a stop
        string, which ends it), the held-back tail at Finished, "" for other events (prompt scores). `outcome`
        gets the finish reason and the count of generated tokens; an engine failure is an ApiError (500)."""
        while True:
            event = await get_event()
            if isinstance(event, Token):
                outcome.generated += 1
                yield text.push(event.token), event
                if text.stopped:
                    outcome.reason = "stop"
                    return
            elif isinstance(event, Finished):
                outcome.generated = event.generated
                outcome.reason = "stop" if event.reason == "stop" else "length"
                yield text.flush(), event
                return
            elif isinstance(event, Failed):
                raise ApiError(500, event.message, kind="server_error")
            else:
                yield "", event

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def limit(requested: int | None, prompt: Sequence[int], default: int | None) -> int:
        room = engine.max_seq_len - len(prompt)
        value = requested if requested is not None else (default if default is not None else room)
        if value is not None and not 0 <= value <= room:
            raise ApiError(400, f"max_tokens={value} is not allowed: this model's maximum context length is "
                                f"{engine.max_seq_len} tokens and the prompt has {len(prompt)}, so at most {room}",
                           param="max_tokens", code="context_length_exceeded")
        return value

    def sse(payload: dict | str) -> bytes:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()

    async def body_of(request: Request, kind: str):
        return _parse(await request.body(), models[kind])

    # ── Routes ──────────────────────────────────────────────────────────────────────────────────────────────
    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created,
                                            "owned_by": "llama-jax", "max_model_len": engine.max_seq_len}]}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"tokenizer_class": type(tokenizer).__name__, "bos_token": token_text(tokenizer, tokenizer.bos_id),
                "eos_token": token_text(tokenizer, tokenizer.eos_id), "pad_token": None,
                "model_max_length": engine.max_seq_len}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await body_of(request, "tokenize")
        tokens = tokenizer.encode(body.prompt, bos=body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": engine.max_seq_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await body_of(request, "detokenize")
        if any(not 0 <= t < engine.vocab_size for t in body.tokens):
            raise ApiError(400, f"token ids must be in 0..{engine.vocab_size - 1}", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request, "completion")
        _check_common(body, config.model_name)
        if body.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported (only 1)", param="best_of")
        if body.suffix is not None:
            raise ApiError(400, "suffix is not supported", param="suffix")
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        prompts = [tokenizer.encode(p, bos=True) if isinstance(p, str) else list(p) for p in prompt]
        if body.stream and len(prompts) > 1:
            raise ApiError(400, "streaming takes one prompt per request", param="prompt")
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        requests = [GenerationRequest(p, limit(body.max_tokens, p, None), _sampling(body), seed, stop_ids,
                                      logprobs=body.logprobs,
                                      prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None
                                      else None) for p in prompts]
        streams = []
        try:
            for generation in requests:
                events = _Events()
                submit(generation, events)
                streams.append(events)
        except ApiError:
            for events in streams:
                events.handle.cancel()
            raise
        ident = f"cmpl-{secrets.token_hex(12)}"
        if body.stream:
            return StreamingResponse(_stream_completion(streams[0], body, ident), media_type="text/event-stream")
        choices, prompt_total, completion_total = [], 0, 0
        try:
            for index, (events, generation) in enumerate(zip(streams, requests)):
                choice, generated = await _complete_one(events, request, generation, body, index)
                choices.append(choice)
                prompt_total += len(generation.prompt)
                completion_total += generated
        finally:
            for events in streams:
                events.handle.cancel()
        return {"id": ident, "object": "text_completion", "created": int(time.time()), "model": config.model_name,
                "choices": choices, "usage": usage(prompt_total, completion_total)}

    async def _complete_one(events: _Events, request: Request, generation: GenerationRequest, body,
                            index: int) -> tuple[dict, int]:
        text, outcome = StopText(tokenizer, _stops(body)), _Outcome()
        pieces, listed_ids, listed_rows = [], [], []
        async for piece, event in text_pieces(lambda: next_event(events, request), text, outcome):
            pieces.append(piece)
            if isinstance(event, PromptScores):
                listed_ids, listed_rows = list(generation.prompt), [None, *event.logprobs]
            elif isinstance(event, Token):
                listed_ids.append(event.token)
                listed_rows.append(event.logprobs)
            elif event.stop_logprobs is not None:  # listed (as vLLM does) though its text is not sent
                listed_ids.append(event.stop_token)
                listed_rows.append(event.stop_logprobs)
        if text.stopped:
            events.handle.cancel()
        generated, reason = outcome.generated, outcome.reason
        prompt_text = tokenizer.decode(generation.prompt) if body.echo else ""
        choice = {"index": index, "text": prompt_text + "".join(pieces), "logprobs": None, "finish_reason": reason}
        if body.logprobs is not None:
            offset = 0 if body.echo else len(tokenizer.decode(generation.prompt))
            choice["logprobs"] = _listing(listed_ids, listed_rows, body.logprobs, offset)
        return choice, generated

    async def _stream_completion(events: _Events, body, ident: str):
        text, outcome = StopText(tokenizer, _stops(body)), _Outcome()

        def chunk(piece: str, logprobs: dict | None = None, finish: str | None = None) -> bytes:
            return sse({"id": ident, "object": "text_completion", "created": int(time.time()),
                        "model": config.model_name,
                        "choices": [{"index": 0, "text": piece, "logprobs": logprobs, "finish_reason": finish}]})

        try:
            if body.echo:
                yield chunk(tokenizer.decode(events.handle.request.prompt))
            try:
                async for piece, event in text_pieces(events.queue.get, text, outcome):
                    listing = None
                    if body.logprobs is not None and isinstance(event, Token):
                        listing = _listing([event.token], [event.logprobs], body.logprobs)
                    if piece or listing:
                        yield chunk(piece, listing)
            except ApiError as error:
                yield sse(error.body())
                return
            generated, reason = outcome.generated, outcome.reason
            yield chunk("", finish=reason)
            if body.stream_options is not None and body.stream_options.include_usage:
                yield sse({"id": ident, "object": "text_completion", "created": int(time.time()),
                           "model": config.model_name, "choices": [],
                           "usage": usage(len(events.handle.request.prompt), generated)})
            yield sse("[DONE]")
        finally:
            events.handle.cancel()  # a client that went away (or a stop string) frees the slot

    def _listing(ids: Sequence[int], rows: Sequence[TokenLogprobs | None], top_n: int, offset: int = 0) -> dict:
        tokens = [token_text(tokenizer, t) for t in ids]
        offsets = []
        for piece in tokens:
            offsets.append(offset)
            offset += len(piece)
        return {"tokens": tokens,
                "token_logprobs": [None if row is None else row.logprob for row in rows],
                "top_logprobs": [None if row is None else {token_text(tokenizer, t): lp for t, lp in row.top[:top_n]}
                                 for row in rows],
                "text_offset": offsets}


    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request, "chat")
        _check_common(body, config.model_name)
        if body.logprobs or body.top_logprobs:
            raise ApiError(400, "logprobs are not supported for chat completions (use /v1/completions)",
                           param="logprobs")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        messages = []
        for index, message in enumerate(body.messages):
            content = message.content
            if not isinstance(content, str):
                if any(part.type != "text" for part in content):
                    raise ApiError(400, "only text content parts are supported",
                                   param=f"messages.{index}.content")
                content = "".join(part.text for part in content)
            messages.append(Message(message.role, content))
        from llama_jax.errors import ChatFormatError

        try:
            prompt = dialog_prompt(messages, tokenizer, config.chat_format)
        except ChatFormatError as error:
            raise ApiError(400, str(error), param="messages") from None
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if len(prompt) >= engine.max_seq_len:
            raise ApiError(400, f"the conversation is {len(prompt)} tokens long; this model's maximum context "
                                f"length is {engine.max_seq_len}", param="messages", code="context_length_exceeded")
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        generation = GenerationRequest(prompt, limit(requested, prompt, None), _sampling(body), seed, chat_stop_ids)
        events = _Events()
        submit(generation, events)
        ident = f"chatcmpl-{secrets.token_hex(12)}"
        if body.stream:
            return StreamingResponse(_stream_chat(events, body, ident), media_type="text/event-stream")
        text, outcome = StopText(tokenizer, _stops(body)), _Outcome()
        try:
            pieces = [piece async for piece, _ in text_pieces(lambda: next_event(events, request), text, outcome)]
        finally:
            events.handle.cancel()
        return {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": config.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "logprobs": None, "finish_reason": outcome.reason}],
                "usage": usage(len(prompt), outcome.generated)}

    async def _stream_chat(events: _Events, body, ident: str):
        text, outcome = StopText(tokenizer, _stops(body)), _Outcome()

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            return sse({"id": ident, "object": "chat.completion.chunk", "created": int(time.time()),
                        "model": config.model_name,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        try:
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for piece, _ in text_pieces(events.queue.get, text, outcome):
                    if piece:
                        yield chunk({"content": piece})
            except ApiError as error:
                yield sse(error.body())
                return
            generated, reason = outcome.generated, outcome.reason
            yield chunk({}, finish=reason)
            if body.stream_options is not None and body.stream_options.include_usage:
                yield sse({"id": ident, "object": "chat.completion.chunk", "created": int(time.time()),
                           "model": config.model_name, "choices": [],
                           "usage": usage(len(events.handle.request.prompt), generated)})
            yield sse("[DONE]")
        finally:
            events.handle.cancel()  # a client that went away (or a stop string) frees the slot

    if config.web_dir is not None:
        from starlette.staticfiles import StaticFiles

        # Mounted last: the API routes above take precedence over files of the same path.
        app.mount("/", StaticFiles(directory=config.web_dir, html=True), name="web")
    app.add_middleware(RequestGuard, config=config)
    return app
