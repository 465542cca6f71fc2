"""Preference pairs and prompts for the stages after SFT (reward model, DPO, rejection sampling, PPO).

Preference files are JSONL in Hugging Face TRL's preference format, one pair per line:
- standard: `{"prompt": "...", "chosen": "...", "rejected": "..."}` (the prompt is one user turn);
- conversational: `{"prompt": [messages ending on a user turn], "chosen": [{"role": "assistant", ...}],
  "rejected": [{"role": "assistant", ...}]}`; or TRL's implicit prompt: `chosen`/`rejected` whole conversations
  that share everything before their last (assistant) turn;
- optional `"margin": number`, or `"strength"`, one of Llama 2's four levels ("significantly better", "better",
  "slightly better", "negligibly better" or "unsure"), turned into a margin by the config's table
  (`reward.margin_*`, Llama 2's "margin small" by default); optional `"safety": true` tags a safety prompt.
Prompt files (rejection sampling, PPO): JSONL with `"prompt"` a string or a message list ending on a user turn, and
an optional `"safety"` tag.

Each answer is rendered after its prompt in the model's chat format exactly as `train.sft` renders a conversation
(`chat_format.encode_dialog`), with the response mask on the final answer and its EOS / <|eot_id|> only. Errors name
the file and line.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from llama_jax.chat_format import ChatTokenizer, EncodedDialog, Message, encode_dialog, validate_conversation
from llama_jax.chat_format import _message_from_json as message_from_json
from llama_jax.data import PathLike, epoch_document_order, process_rows, resolve_sources
from llama_jax.errors import ChatFormatError, DataError
from llama_jax.jsonl import read_jsonl

STRENGTHS = ("significantly better", "better", "slightly better", "negligibly better")
STRENGTH_ALIASES = {"unsure": "negligibly better", "negligibly better / unsure": "negligibly better"}
PAIR_KEYS = frozenset({"prompt", "chosen", "rejected", "margin", "strength", "safety"})
PROMPT_KEYS = frozenset({"prompt", "safety"})


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[Message, ...]  # ends on a user turn
    chosen: str
    rejected: str
    margin: float  # m(r) of the ranking loss: explicit, from the strength label, or 0
    strength: str | None
    safety: bool
    where: str  # "path:line", for messages


@dataclass(frozen=True)
class Prompt:
    messages: tuple[Message, ...]  # ends on a user turn
    safety: bool
    where: str


def strength_margin(label: object, margins: Mapping[str, float], where: str) -> str:
    """The canonical strength name of `label`; DataError naming the line for an unknown one."""
    name = " ".join(str(label).replace("_", " ").lower().split()) if isinstance(label, str) else None
    name = STRENGTH_ALIASES.get(name, name)
    if name not in margins:
        raise DataError(f"{where}: unknown strength {label!r}: expected one of {list(STRENGTHS)} (or 'unsure')")
    return name


# ── Reading ──────────────────────────────────────────────────────────────────────────────────────────────────────
def read_preferences(sources: PathLike | Sequence[PathLike], margins: Mapping[str, float]) -> list[PreferencePair]:
    """Every pair of the JSONL files `sources` (a file, a folder of *.jsonl, a glob), validated; `margins` maps each
    strength in STRENGTHS to its margin."""
    pairs = []
    for path in resolve_sources(sources, suffixes=(".jsonl",)):
        for line, record in read_jsonl(path, "preference pairs"):
            pairs.append(parse_pair(record, margins, f"{path}:{line}"))
    if not pairs:
        raise DataError(f"{sources}: no preference pairs")
    return pairs


def parse_pair(record: Any, margins: Mapping[str, float], where: str) -> PreferencePair:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with chosen and rejected, got {type(record).__name__}")
    unknown = sorted(set(record) - PAIR_KEYS)
    if unknown:
        raise DataError(f"{where}: unknown keys {unknown}; allowed: {sorted(PAIR_KEYS)}")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataError(f"{where}: the row has no {key!r} (a preference pair needs prompt, chosen, rejected)")
    try:
        prompt, chosen, rejected = _prompt_and_answers(record, where)
    except ChatFormatError as error:
        raise DataError(f"{where}: {error}") from None
    if chosen.strip() == rejected.strip():  # the chat formats render answers stripped
        raise DataError(f"{where}: chosen and rejected are the same answer: the pair says nothing")
    margin, strength = 0.0, None
    if "margin" in record and "strength" in record:
        raise DataError(f"{where}: give margin or strength, not both")
    if "margin" in record:
        margin = record["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not _finite(margin):
            raise DataError(f"{where}: margin {str(margin)[:40]!r} is not a finite number")
    elif "strength" in record:
        strength = strength_margin(record["strength"], margins, where)
        margin = margins[strength]
    safety = record.get("safety", False)
    if not isinstance(safety, bool):
        raise DataError(f"{where}: safety {safety!r} is not true or false")
    return PreferencePair(prompt, chosen, rejected, float(margin), strength, safety, where)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer too large for a float
        return False


def _prompt_and_answers(record: Mapping[str, Any], where: str) -> tuple[tuple[Message, ...], str, str]:
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise DataError(f"{where}: chosen and rejected are strings (TRL's standard format), so prompt must be a "
                            f"string too, got {type(prompt).__name__}")
        return (Message("user", prompt),), chosen, rejected
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise DataError(f"{where}: chosen and rejected must both be strings or both message lists")
    chosen_messages, rejected_messages = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if prompt is None:  # TRL's implicit prompt: whole conversations that differ in their last turn only
        if chosen_messages[:-1] != rejected_messages[:-1]:
            raise DataError(f"{where}: without a prompt, chosen and rejected must share every turn before the last")
        prompt_messages = tuple(chosen_messages[:-1])
        chosen_messages, rejected_messages = chosen_messages[-1:], rejected_messages[-1:]
    elif isinstance(prompt, list):
        prompt_messages = tuple(_messages(prompt, "prompt"))
    else:
        raise DataError(f"{where}: prompt must be a message list when chosen and rejected are")
    answers = []
    for name, messages in (("chosen", chosen_messages), ("rejected", rejected_messages)):
        if len(messages) != 1 or messages[-1].role != "assistant":
            roles = [message.role for message in messages]
            raise DataError(f"{where}: {name} must be one assistant turn (the answer), got roles {roles}: the last "
                            f"turn of a conversational pair must be the assistant's")
        answers.append(messages[0].content)
    prompt_messages = _context(prompt_messages)
    validate_conversation(prompt_messages, ending="user")
    return prompt_messages, answers[0], answers[1]


def _messages(items: list, name: str) -> list[Message]:
    try:
        return [message_from_json(index, item) for index, item in enumerate(items)]
    except ChatFormatError as error:
        raise ChatFormatError(f"{name}: {error}") from None


def _context(messages: Sequence[Message]) -> tuple[Message, ...]:
    """Earlier assistant turns are context: they carry no loss and no score."""
    return tuple(replace(message, train=False) if message.role == "assistant" else message for message in messages)


def read_prompts(sources: PathLike | Sequence[PathLike]) -> list[Prompt]:
    """The prompts of JSONL files: `{"prompt": "..." | [messages ending on a user turn], "safety": bool}`."""
    prompts = [parse_prompt(record, f"{path}:{line}")
               for path in resolve_sources(sources, suffixes=(".jsonl",))
               for line, record in read_jsonl(path, "prompts")]
    if not prompts:
        raise DataError(f"{sources}: no prompts")
    return prompts


def parse_prompt(record: Any, where: str, extra_keys: frozenset[str] = frozenset()) -> Prompt:
    """One prompt record (`extra_keys`: further keys the caller reads itself)."""
    if not isinstance(record, dict) or "prompt" not in record:
        raise DataError(f'{where}: expected an object with a "prompt" (a string or a message list)')
    unknown = sorted(set(record) - PROMPT_KEYS - extra_keys)
    if unknown:
        raise DataError(f"{where}: unknown keys {unknown}; allowed: {sorted(PROMPT_KEYS | extra_keys)}")
    prompt = record["prompt"]
    try:
        if isinstance(prompt, str):
            messages: tuple[Message, ...] = (Message("user", prompt),)
        elif isinstance(prompt, list):
            messages = _context(_messages(prompt, "prompt"))
        else:
            raise ChatFormatError(f"prompt is {type(prompt).__name__}, expected a string or a message list")
        validate_conversation(messages, ending="user")
    except ChatFormatError as error:
        raise DataError(f"{where}: {error}") from None
    safety = record.get("safety", False)
    if not isinstance(safety, bool):
        raise DataError(f"{where}: safety {safety!r} is not true or false")
    return Prompt(messages, safety, where)


# ── Rendering ────────────────────────────────────────────────────────────────────────────────────────────────────
def encode_answer(prompt: Sequence[Message], answer: str, tokenizer: ChatTokenizer, style: str) -> EncodedDialog:
    """The prompt and `answer` rendered as SFT renders a conversation; the mask covers the answer (and its end token)
    only. Each mask marks which tokens are scored: token t counts if loss_mask[t]."""
    encoded = encode_dialog([*prompt, Message("assistant", answer)], tokenizer, style, for_generation=False)
    if not any(encoded.loss_mask):
        raise ChatFormatError("the rendered conversation has no answer tokens")
    return encoded


@dataclass(frozen=True)
class EncodedPair:
    chosen: EncodedDialog
    rejected: EncodedDialog
    margin: float
    reference: tuple[float, float] | None = None  # DPO's precomputed reference log-probabilities (chosen, rejected)


def encode_pairs(pairs: Sequence[PreferencePair], tokenizer: ChatTokenizer, style: str, seq_len: int
                 ) -> list[EncodedPair]:
    """Pairs rendered in the chat format; a pair whose longer answer does not fit in seq_len tokens is dropped (with
    one warning counting them: truncating would cut the answer's end, which the reward model reads)."""
    encoded, dropped = [], 0
    for pair in pairs:
        try:
            chosen = encode_answer(pair.prompt, pair.chosen, tokenizer, style)
            rejected = encode_answer(pair.prompt, pair.rejected, tokenizer, style)
        except ChatFormatError as error:
            raise DataError(f"{pair.where}: {error}") from None
        if max(len(chosen.tokens), len(rejected.tokens)) > seq_len:
            dropped += 1
            continue
        encoded.append(EncodedPair(chosen, rejected, pair.margin))
    if dropped:
        warnings.warn(f"{dropped} of {len(pairs)} preference pairs are longer than seq_len={seq_len} tokens and were "
                      "dropped", stacklevel=2)
    if not encoded:
        raise DataError(f"no preference pair fits in seq_len={seq_len} tokens")
    return encoded


def read_encoded_pairs(sources: PathLike | Sequence[PathLike], tokenizer: ChatTokenizer, config: Any
                       ) -> list[EncodedPair]:
    """The pairs of `sources` rendered for a run (`config`, a RunConfig: its margin table, chat format and
    train.seq_len): what train.reward and train.dpo read for training and for validation."""
    return encode_pairs(read_preferences(sources, config.reward.margins), tokenizer, config.sft.format,
                        config.train.seq_len)


# ── Batches ──────────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class PairBatches:
    """Batch k is a pure function of (pairs, seed, k): pairs in a fresh order each epoch, one pair per row.

    Arrays [rows, seq_len]: `chosen_tokens`/`rejected_tokens` (int32, pad_id after the answer), `chosen_mask`/
    `rejected_mask` (1 on answer tokens); float32 [rows]: `margin`, and `reference_chosen`/`reference_rejected` when
    the pairs carry precomputed reference log-probabilities (DPO)."""

    pairs: Sequence[EncodedPair]
    seq_len: int
    batch_size: int
    pad_id: int
    seed: int

    def __post_init__(self) -> None:
        if self.batch_size > len(self.pairs):
            raise DataError(f"train.batch_size={self.batch_size} is larger than the {len(self.pairs)} preference "
                            "pairs")

    @property
    def batches_per_epoch(self) -> int:
        return len(self.pairs) // self.batch_size

    def batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        epoch, within = divmod(step, self.batches_per_epoch)
        order = epoch_document_order(len(self.pairs), self.seed, epoch)
        rows = process_rows(self.batch_size, process_index, process_count)
        chosen = [self.pairs[order[within * self.batch_size + row]] for row in rows]
        arrays = {**self._side([pair.chosen for pair in chosen], "chosen"),
                  **self._side([pair.rejected for pair in chosen], "rejected"),
                  "margin": np.asarray([pair.margin for pair in chosen], np.float32)}
        if chosen and chosen[0].reference is not None:
            reference = np.asarray([pair.reference for pair in chosen], np.float32)
            arrays["reference_chosen"], arrays["reference_rejected"] = reference[:, 0], reference[:, 1]
        return arrays

    def _side(self, dialogs: Sequence[EncodedDialog], name: str) -> dict[str, np.ndarray]:
        tokens, mask = pad_dialogs(dialogs, self.seq_len, self.pad_id)
        return {f"{name}_tokens": tokens, f"{name}_mask": mask}


def pad_dialogs(dialogs: Sequence[EncodedDialog], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[rows, seq_len] int32 tokens (pad_id after each) and int32 response masks."""
    tokens = np.full((len(dialogs), seq_len), pad_id, np.int32)
    mask = np.zeros((len(dialogs), seq_len), np.int32)
    for row, dialog in enumerate(dialogs):
        tokens[row, :len(dialog.tokens)] = dialog.tokens
        mask[row, :len(dialog.tokens)] = dialog.loss_mask
    return tokens, mask


def place_pair_batch(on_mesh: Any, local: Mapping[str, np.ndarray], global_rows: int) -> dict[str, Any]:
    """A process's rows of a batch of pairs (`PairBatches.batch`) as global arrays on `on_mesh` (a
    `params.ModelOnMesh`). Per-pair values ([rows] float32: margins, reference log-probabilities) are broadcast along
    the sequence to [rows, seq], so that every array of the batch shares one sharding."""
    import jax

    tokens = {name: value for name, value in local.items() if value.ndim == 2}
    placed = on_mesh.place_rows(tokens, global_rows)
    shape = (global_rows, next(iter(tokens.values())).shape[1])
    for name, value in local.items():
        if value.ndim == 1:
            wide = np.ascontiguousarray(np.broadcast_to(np.asarray(value, np.float32)[:, None], (len(value), shape[1])))
            placed[name] = jax.make_array_from_process_local_data(on_mesh.batch_shardings(shape), wide, shape)
    return placed


def global_pair_batch(on_mesh: Any, batches: PairBatches, index: int) -> dict[str, Any]:
    """Batch `index` of `batches` as global arrays; each process builds only its own rows."""
    import jax

    local = batches.batch(index, process_index=jax.process_index(), process_count=jax.process_count())
    return place_pair_batch(on_mesh, local, batches.batch_size)
