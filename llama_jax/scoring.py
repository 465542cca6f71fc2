"""Scoring a model: perplexity and bits per byte over a text source, log-likelihoods of continuations and multiple
choice (what `eval/` and the lm-eval adapter are built on; generation is `llama_jax.generate`'s).

One primitive serves them all: the log-probability the model gives each target token, computed under `jax.jit` on a
device mesh with the output head applied in sequence chunks (a [batch, seq, vocab] logit tensor is never held).

Perplexity
----------
`evaluate_perplexity` packs documents into seq_len windows exactly as training does (`data.batch_for_step`: BOS and
EOS around every document, windows cut across documents, nothing padded), so its loss on the batches the training
program validates on is that program's validation loss. Two modes:
- whole epoch (default): every window of one pass over the documents; targets past the end of the pass are masked,
  so each document token and each document's EOS is scored exactly once. Bits per byte are then exact:
  total nats / ln 2 / UTF-8 bytes of the documents' text (EOS prediction included in the nats, as in the loss).
- `num_batches=N`: the first N batches of the packed stream (what training's `eval.batches` uses). These cover part
  of the text, so their byte count is apportioned: text bytes × scored tokens / tokens in one pass
  (`bytes_exact` is False in the result).

Continuations and multiple choice
---------------------------------
A continuation is scored as lm-eval's reference implementation scores it: tokenize context + continuation as one
text and the context alone; the tokens past the shared prefix are the continuation's (a token merged across the
boundary is counted with the continuation). Every sequence starts with BOS, so an empty context is allowed. A sequence
longer than `max_length` keeps its last `max_length` + 1 tokens. The length-normalised multiple-choice score divides
the summed log-likelihood by the choice's length in characters (lm-eval's `acc_norm`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from llama_jax.cli import parse_mesh
from llama_jax.config import ModelConfig
from llama_jax.data import (
    SplitPart,
    TokenStore,
    batch_for_step,
    build_store,
    corpus_documents,
    default_cache_dir,
    process_rows,
    resolve_sources,
)
from llama_jax.errors import ConfigError, DataError, TokenizerError
from llama_jax.jsonl import read_jsonl
from llama_jax.model import Llama
from llama_jax.ops import HEAD_CHUNK
from llama_jax.params import ModelOnMesh, merge_params, model_params
from llama_jax.sharding import DEFAULT_RULES, Rules, make_mesh
from llama_jax.tokenizer import Tokenizer
from llama_jax.trainer import loss_sums

PathLike = str | os.PathLike[str]
LENGTH_BUCKET = 32  # sequence lengths are padded up to a multiple of this, so few distinct shapes are compiled


# ── The scoring primitive on a mesh ──────────────────────────────────────────────────────────────────────────────
def target_log_probs(model: Llama, inputs: jax.Array, targets: jax.Array, *, positions: jax.Array | None = None,
                     segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(log P(target) [b, s] float32, target is the argmax [b, s]) with the output head applied in chunks."""
    hidden = model.hidden_states(inputs, positions=positions, segment_ids=segment_ids)
    log_probs, greedy = [], []
    for start in range(0, hidden.shape[1], HEAD_CHUNK):
        logits = model.logits(hidden[:, start:start + HEAD_CHUNK])
        chunk_targets = targets[:, start:start + HEAD_CHUNK]
        target_logit = jnp.take_along_axis(logits, chunk_targets[..., None], axis=-1)[..., 0]
        log_probs.append(target_logit - jax.nn.logsumexp(logits, axis=-1))
        greedy.append(jnp.argmax(logits, axis=-1) == chunk_targets)
    return jnp.concatenate(log_probs, axis=1), jnp.concatenate(greedy, axis=1)


# Jitted at module level with the graph definition static, so every Scorer of the same model shape (a CLI, an lm-eval
# model object, a test) shares the compiled programs instead of compiling its own. The sharding rules are static too:
# they are read while tracing (by `constrain`), so programs traced under different rules must not be shared.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _loss_sums(graphdef: nnx.GraphDef, rules: Rules, params,
               batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    return loss_sums(params, graphdef, batch)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _token_scores(graphdef: nnx.GraphDef, rules: Rules, params, inputs: jax.Array, targets: jax.Array):
    return target_log_probs(merge_params(graphdef, params), inputs, targets)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Scorer(ModelOnMesh):
    """A model's parameters placed on a mesh, with the jitted scoring functions bound to them.

    Parameters are sharded by the logical rules (by default over all devices on the fsdp axis, which also splits the
    batch, so a model larger than one device still fits); batches are split along the batch axis.
    """

    params: dict[str, jax.Array]

    @classmethod
    def place(cls, model: Llama, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> Scorer:
        """The model's parameters put into their shards on `mesh` (default: all devices on the fsdp axis)."""
        on_mesh = ModelOnMesh(model.config, mesh if mesh is not None else make_mesh(data=1, fsdp=-1, tensor=1), rules)
        shardings = on_mesh.param_shardings()
        params = {name: jax.device_put(value, shardings[name]) for name, value in model_params(model).items()}
        return cls(on_mesh.model_config, on_mesh.mesh, rules, params=params)

    @property
    def config(self) -> ModelConfig:
        return self.model_config

    @property
    def device_count(self) -> int:
        return self.mesh.size

    # Host-side entry points.
    def loss_sums(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(summed negative log-likelihood of the targets under loss_mask, summed loss_mask), as device scalars."""
        with self.activation_sharding():
            return _loss_sums(self.graphdef, self.rules, self.params, dict(batch))

    def token_scores(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For int [b, s+1] token rows: (log P(tokens[:, 1:]) [b, s], greedy [b, s]) as numpy (one process)."""
        placed = self.place_rows({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, tokens.shape[0])
        with self.activation_sharding():
            log_probs, greedy = _token_scores(self.graphdef, self.rules, self.params, placed["inputs"],
                                              placed["targets"])
        return np.asarray(jax.device_get(log_probs), np.float64), np.asarray(jax.device_get(greedy))

    def batch_rows(self, requested: int) -> int:
        """A batch size that splits evenly over the devices: `requested` rounded up to a multiple of them."""
        return max(1, math.ceil(requested / self.device_count)) * self.device_count


# ── Perplexity and bits per byte ────────────────────────────────────────────────────────────────────────────────
@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    nats: float  # summed negative log-likelihood of the scored tokens
    tokens: int  # targets scored (document tokens and EOS; never BOS)
    text_bytes: int | float | None  # UTF-8 bytes of the text those tokens cover (apportioned if not bytes_exact)
    bytes_exact: bool
    batches: int
    seq_len: int
    batch_size: int

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token, in nats."""
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float | None:
        return None if not self.text_bytes else self.nats / math.log(2) / self.text_bytes

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "loss": self.loss, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte}

    def summary(self) -> str:
        bpb = "n/a" if self.bits_per_byte is None else f"{self.bits_per_byte:.4f}"
        approx = "" if self.bytes_exact else " (bytes apportioned)"
        return (f"loss {self.loss:.4f} nats/token · perplexity {self.perplexity:.3f} · {bpb} bits/byte{approx} · "
                f"{self.tokens:,} tokens · {self.text_bytes or 0:,.0f} bytes · {self.batches} batches of "
                f"{self.batch_size}×{self.seq_len}")


def count_text_bytes(sources: PathLike | Sequence[PathLike], part: SplitPart | None = None) -> int:
    """UTF-8 bytes of every document's text in the sources (the text the tokens encode), or in one `part` of their
    held-out split."""
    return sum(len(text.encode("utf-8")) for _, text in corpus_documents(resolve_sources(sources), part))


def open_text_store(sources: PathLike | Sequence[PathLike], tokenizer: Tokenizer,
                    store_dir: PathLike | None = None) -> TokenStore:
    """The sources tokenized into a token store, built once and reused (keyed by the files and the tokenizer)."""
    if store_dir is None:
        paths = [str(path) for path in resolve_sources(sources)]
        key = hashlib.sha256((json.dumps(paths) + tokenizer.fingerprint()).encode()).hexdigest()[:16]
        store_dir = default_cache_dir() / "eval" / key
    return build_store(sources, tokenizer, store_dir)


def epoch_batches(store: TokenStore, seq_len: int, batch_size: int) -> int:
    """Batches whose windows cover one pass over the store: every target of stream positions 1 .. T-1."""
    windows = math.ceil((store.tokens_per_epoch - 1) / seq_len)
    return math.ceil(windows / batch_size)


def _mask_past_epoch(local: dict[str, np.ndarray], step: int, batch_size: int, seq_len: int, rows: range,
                     epoch_tokens: int) -> None:
    """Zero the loss mask of targets at stream positions past the first pass (they repeat the text)."""
    window = np.asarray([step * batch_size + row for row in rows])[:, None]
    target_position = window * seq_len + 1 + np.arange(seq_len)[None, :]
    local["loss_mask"] = np.where(target_position < epoch_tokens, local["loss_mask"], 0)


def evaluate_perplexity(scorer: Scorer, store: TokenStore, *, seq_len: int, batch_size: int, seed: int = 0,
                        document_masking: bool = True, num_batches: int | None = None,
                        text_bytes: int | None = None, progress: bool = True) -> PerplexityResult:
    """Loss, perplexity and bits per byte of the model on the store's packed windows (see the module docstring).

    document_masking: attend only within each packed document (positions restart per document); False attends
        across documents as a Llama 2 run trained without masking does. Match the run's setting to compare losses.
    text_bytes: UTF-8 bytes of the store's text, for bits per byte (None: not reported).
    """
    whole_epoch = num_batches is None
    total_batches = epoch_batches(store, seq_len, batch_size) if whole_epoch else num_batches
    rows = process_rows(batch_size, jax.process_index(), jax.process_count())
    pending: list[tuple[jax.Array, jax.Array]] = []
    bar = tqdm(total=total_batches, unit="batch", file=sys.stderr, dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0, desc="perplexity")
    nats = tokens = 0.0
    for step in range(total_batches):
        local = batch_for_step(store, step, batch_size, seq_len, seed, jax.process_index(), jax.process_count())
        if whole_epoch:
            _mask_past_epoch(local, step, batch_size, seq_len, rows, store.tokens_per_epoch)
        if not document_masking:
            local = {key: local[key] for key in ("inputs", "targets", "loss_mask")}
        pending.append(scorer.loss_sums(scorer.place_rows(local, batch_size)))
        # Read results one batch behind, so the host builds batch k+1 while the devices score batch k.
        if len(pending) > 1:
            nats, tokens = _accumulate(pending.pop(0), nats, tokens)
            bar.set_postfix(loss=f"{nats / max(tokens, 1):.4f}")
        bar.update()
    for result in pending:
        nats, tokens = _accumulate(result, nats, tokens)
    bar.close()
    if tokens == 0:
        raise DataError(f"{store.address}: no tokens to score")
    expected = store.num_tokens + store.num_documents
    if whole_epoch and int(tokens) != expected:  # every document token and EOS once: anything else is a bug
        raise DataError(f"scored {int(tokens)} targets over one pass, expected {expected}")
    scored_bytes = text_bytes if text_bytes is None or whole_epoch else text_bytes * tokens / expected
    return PerplexityResult(nats, int(tokens), scored_bytes, whole_epoch, total_batches, seq_len, batch_size)


def _accumulate(result: tuple[jax.Array, jax.Array], nats: float, tokens: float) -> tuple[float, float]:
    loss_sum, weight_sum = jax.device_get(result)
    return nats + float(loss_sum), tokens + float(weight_sum)


# ── Log-likelihoods of token sequences ──────────────────────────────────────────────────────────────────────────
@dataclasses.dataclass(frozen=True)
class SequenceScore:
    log_likelihood: float  # summed log P of the scored tokens, in nats
    is_greedy: bool  # every scored token is the model's argmax
    num_tokens: int


def score_sequences(scorer: Scorer, sequences: Sequence[tuple[Sequence[int], int]], *, batch_size: int = 8,
                    max_length: int | None = None, progress: bool = False) -> list[SequenceScore]:
    """Score the last `n` tokens of each (tokens, n): sum of log P(token | everything before it).

    Sequences longer than max_length + 1 (default: the model's max_seq_len) keep their last max_length + 1 tokens.
    Sequences are sorted by length and right-padded to a multiple of LENGTH_BUCKET, so few shapes are compiled.
    """
    max_length = max_length or scorer.config.max_seq_len
    rows = scorer.batch_rows(batch_size)
    prepared = [_truncated(list(tokens), scored, max_length) for tokens, scored in sequences]
    order = sorted(range(len(prepared)), key=lambda index: -len(prepared[index][0]))
    results: list[SequenceScore | None] = [None] * len(prepared)
    starts = range(0, len(order), rows)
    for start in tqdm(starts, unit="batch", file=sys.stderr, disable=not progress, desc="scoring"):
        chosen = order[start:start + rows]
        longest = len(prepared[chosen[0]][0])
        width = min(_round_up(longest - 1, LENGTH_BUCKET), max_length) + 1
        tokens = np.zeros((rows, width), np.int32)
        for row, index in enumerate(chosen):
            tokens[row, :len(prepared[index][0])] = prepared[index][0]
        log_probs, greedy = scorer.token_scores(tokens)
        for row, index in enumerate(chosen):
            sequence, scored = prepared[index]
            # Target i is token i + 1, so the last `scored` tokens are targets [len - 1 - scored, len - 1).
            span = slice(len(sequence) - 1 - scored, len(sequence) - 1)
            results[index] = SequenceScore(float(log_probs[row, span].sum()), bool(greedy[row, span].all()), scored)
    return results  # type: ignore[return-value]


def _truncated(tokens: list[int], scored: int, max_length: int) -> tuple[list[int], int]:
    if scored < 1 or scored >= len(tokens):
        raise DataError(f"cannot score {scored} token(s) of a {len(tokens)}-token sequence (the first is context)")
    if scored > max_length:
        raise DataError(f"a continuation of {scored} tokens does not fit in max_length={max_length}")
    return tokens[-(max_length + 1):], scored


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


# ── Continuations of text (lm-eval's loglikelihood) ─────────────────────────────────────────────────────────────
def split_context_continuation(tokenizer: Tokenizer, context: str,
                               continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) whose concatenation is the tokenization of context + continuation.

    The context's trailing whitespace moves to the continuation first (tokenizers attach a space to the following
    word). The continuation gets every token past the longest prefix shared with the context's own tokenization.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tokenizer.encode(stripped + continuation)
    context_ids = tokenizer.encode(stripped) if stripped else []
    shared = 0
    while shared < min(len(whole), len(context_ids)) and whole[shared] == context_ids[shared]:
        shared += 1
    return whole[:shared], whole[shared:]


def score_continuations(scorer: Scorer, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], *,
                        batch_size: int = 8, max_length: int | None = None,
                        progress: bool = False) -> list[SequenceScore]:
    """log P(continuation | context) and greediness for each (context, continuation), BOS before every context."""
    sequences = []
    for context, continuation in pairs:
        context_ids, continuation_ids = split_context_continuation(tokenizer, context, continuation)
        if not continuation_ids:
            raise DataError(f"continuation {continuation!r} of context {context[-40:]!r} encodes to no tokens")
        sequences.append(([tokenizer.bos_id] + context_ids + continuation_ids, len(continuation_ids)))
    return score_sequences(scorer, sequences, batch_size=batch_size, max_length=max_length, progress=progress)


def rolling_log_likelihoods(scorer: Scorer, tokenizer: Tokenizer, texts: Sequence[str], *, batch_size: int = 8,
                            max_length: int | None = None, progress: bool = False) -> list[float]:
    """log P(text) of each whole text after BOS, in windows of max_length predictions with as much context as fits
    (lm-eval's loglikelihood_rolling); no EOS is scored."""
    max_length = max_length or scorer.config.max_seq_len
    sequences, owners = [], []
    for index, text in enumerate(texts):
        stream = [tokenizer.bos_id] + tokenizer.encode(text)
        for start in range(1, len(stream), max_length):
            end = min(start + max_length, len(stream))
            # Predict stream[start:end]; the inputs before them reach back to at most max_length tokens.
            sequences.append((stream[max(0, end - 1 - max_length):end], end - start))
            owners.append(index)
    totals = [0.0] * len(texts)
    scores = score_sequences(scorer, sequences, batch_size=batch_size, max_length=max_length, progress=progress)
    for owner, score in zip(owners, scores):
        totals[owner] += score.log_likelihood
    return totals


# ── Multiple choice ─────────────────────────────────────────────────────────────────────────────────────────────
@dataclasses.dataclass(frozen=True)
class MultipleChoiceExample:
    context: str
    choices: tuple[str, ...]
    answer: int


@dataclasses.dataclass(frozen=True)
class MultipleChoiceResult:
    accuracy: float  # the choice with the highest summed log-likelihood is the answer
    accuracy_norm: float  # ... with the highest log-likelihood per character of the choice (lm-eval's acc_norm)
    count: int
    log_likelihoods: list[list[float]]  # per example, per choice
    predictions: list[int]
    predictions_norm: list[int]

    def to_dict(self, per_example: bool = False) -> dict:
        summary = {"acc": self.accuracy, "acc_norm": self.accuracy_norm, "count": self.count}
        if per_example:
            summary.update(log_likelihoods=self.log_likelihoods, predictions=self.predictions,
                           predictions_norm=self.predictions_norm)
        return summary

    def summary(self) -> str:
        return (f"accuracy {self.accuracy:.4f} (summed log-likelihood) · {self.accuracy_norm:.4f} "
                f"(per character) · {self.count} examples")


def read_multiple_choice(path: PathLike) -> list[MultipleChoiceExample]:
    """JSONL lines {"context": str, "choices": [str, ...], "answer": index}; errors name the line."""
    examples = [_parse_example(record, f"{path}:{line_number}")
                for line_number, record in read_jsonl(path, "multiple-choice file")]
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _parse_example(record: object, where: str) -> MultipleChoiceExample:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with context, choices and answer")
    context, choices, answer = record.get("context"), record.get("choices"), record.get("answer")
    if not isinstance(context, str):
        raise DataError(f"{where}: 'context' must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of at least two non-empty strings")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: 'answer' must be an index into the {len(choices)} choices")
    return MultipleChoiceExample(context, tuple(choices), answer)


def score_multiple_choice(scorer: Scorer, tokenizer: Tokenizer, examples: Sequence[MultipleChoiceExample], *,
                          delimiter: str = " ", batch_size: int = 8, max_length: int | None = None,
                          progress: bool = False) -> MultipleChoiceResult:
    """Accuracy by summed and by per-character log P(delimiter + choice | context); ties go to the first choice.

    The delimiter (lm-eval's `target_delimiter`, default one space) is scored with the choice but not counted in
    its length, as lm-eval does.
    """
    pairs = [(example.context, delimiter + choice) for example in examples for choice in example.choices]
    scores = iter(score_continuations(scorer, tokenizer, pairs, batch_size=batch_size, max_length=max_length,
                                      progress=progress))
    log_likelihoods, predictions, predictions_norm = [], [], []
    for example in examples:
        values = np.array([next(scores).log_likelihood for _ in example.choices])
        lengths = np.array([len(choice) for choice in example.choices], np.float64)
        log_likelihoods.append(values.tolist())
        predictions.append(int(np.argmax(values)))
        predictions_norm.append(int(np.argmax(values / lengths)))
    answers = np.array([example.answer for example in examples])
    return MultipleChoiceResult(float(np.mean(np.array(predictions) == answers)),
                                float(np.mean(np.array(predictions_norm) == answers)), len(examples),
                                log_likelihoods, predictions, predictions_norm)


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((index for index in (text.find(stop) for stop in stop_strings if stop) if index >= 0),
              default=len(text))
    return text[:cut]


# ── Loading for the evaluation programs ─────────────────────────────────────────────────────────────────────────
def load_model_and_tokenizer(model_path: PathLike, tokenizer_path: PathLike | None = None, *,
                             dtype: str | None = None, mesh: Mesh | None = None, quantize: str | None = None,
                             group_size: int | None = None) -> tuple[Llama, Tokenizer]:
    """The model at `model_path` (any checkpoint `llama_jax.load` reads), sharded on `mesh` (default: unsharded, as
    `llama_jax.load` places it), and its tokenizer (default: the model folder's), checked to fit the model's
    vocabulary. With `quantize` ("int8"/"int4") a float checkpoint is quantized layer by layer while it loads
    (`llama_jax.quantize.load_model`); a quantized model is held on one device."""
    from llama_jax import quantize as quantization
    from llama_jax.loading import load
    from llama_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path if tokenizer_path is not None else model_path)
    if quantize is not None or group_size is not None:
        model = quantization.load_model(model_path, quantize=quantize, group_size=group_size, dtype=dtype)
    else:
        quantized = quantization.is_quantized_checkpoint(model_path)
        model = load(model_path, dtype=dtype, mesh=None if quantized else mesh)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TokenizerError(f"the tokenizer {tokenizer.path or tokenizer_path} has {tokenizer.vocab_size} ids but "
                             f"the model only {model.config.vocab_size}: they do not belong together")
    return model, tokenizer


def load_scorer(model_path: PathLike, tokenizer_path: PathLike | None = None, *, dtype: str | None = None,
                mesh: tuple[int, int, int] = (1, -1, 1)) -> tuple[Scorer, Tokenizer]:
    """The model at `model_path` (any format) sharded on a mesh, and its tokenizer (checked to fit the model)."""
    device_mesh = make_mesh(*mesh)
    model, tokenizer = load_model_and_tokenizer(model_path, tokenizer_path, dtype=dtype, mesh=device_mesh)
    return Scorer.place(model, device_mesh), tokenizer


def model_from_args(args) -> tuple[Llama, Tokenizer, Mesh | None]:
    """What `cli.add_model_arguments` asked for: the model on its --mesh (unsharded for a program without the
    option) and its tokenizer, joining the distributed runtime first with --distributed. --quantize and
    --group-size (`llama_jax.quantize.add_quantize_arguments`), where the program has them, quantize it."""
    if getattr(args, "distributed", False) and getattr(args, "quantize", None) is not None:
        raise ConfigError("--quantize runs in one process: drop --distributed")
    if getattr(args, "distributed", False):
        from llama_jax import distributed
        from llama_jax.config import DistributedConfig

        distributed.initialize(DistributedConfig())
    mesh = make_mesh(*parse_mesh(args.mesh)) if getattr(args, "mesh", None) else None
    quantize, group_size = getattr(args, "quantize", None), getattr(args, "group_size", None)
    try:
        model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, dtype=args.dtype, mesh=mesh,
                                                    quantize=quantize, group_size=group_size)
    except TokenizerError as error:
        hint = "" if args.tokenizer else " (pass --tokenizer PATH)"
        raise TokenizerError(f"{error}{hint}") from None
    return model, tokenizer, mesh


def scorer_from_args(args) -> tuple[Scorer, Tokenizer]:
    model, tokenizer, mesh = model_from_args(args)  # the scoring programs all have --mesh
    return Scorer.place(model, mesh), tokenizer
