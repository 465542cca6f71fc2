"""Chat formats for Llama 2 and Llama 3: conversations as token ids plus a mask of the tokens trained on.

Conversations are lists of `Message`s (system first if any, then user and assistant alternating, starting with
the user). `encode_dialog` renders one exactly as Meta's reference code does and marks the assistant answers and
their closing EOS / `<|eot_id|>` as trained; an assistant message with `train=False` (as in Ghost Attention data)
stays in the context but is not trained on.

The tokenizer is duck-typed (see `ChatTokenizer`): `encode(text, *, bos, eos)`, `bos_id`, `eos_id` and
`special_id(name)`, so this module never imports a tokenizer implementation.
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Protocol, Sequence, get_args

import numpy as np

from llama_jax.errors import ChatFormatError, DataError, TokenizerError, run_program

Role = Literal["system", "user", "assistant"]
ChatStyle = Literal["llama2", "llama3"]
# Which role a conversation must end on: training data ends on an answer, a generation prompt on a user turn.
Ending = Literal["assistant", "user", "any"]

ROLES: tuple[str, ...] = get_args(Role)
CHAT_STYLES: tuple[str, ...] = get_args(ChatStyle)

# Llama 2 (Meta's llama/generation.py): these are plain text, tokenized like any other text.
LLAMA2_INST_OPEN, LLAMA2_INST_CLOSE = "[INST]", "[/INST]"
LLAMA2_SYS_OPEN, LLAMA2_SYS_CLOSE = "<<SYS>>\n", "\n<</SYS>>\n\n"

# Llama 3 (Meta's llama3 ChatFormat): special tokens, looked up by name in the tokenizer.
LLAMA3_BEGIN_OF_TEXT = "<|begin_of_text|>"
LLAMA3_END_OF_TEXT = "<|end_of_text|>"
LLAMA3_START_HEADER = "<|start_header_id|>"
LLAMA3_END_HEADER = "<|end_header_id|>"
LLAMA3_END_OF_TURN = "<|eot_id|>"


class ChatTokenizer(Protocol):
    """The part of llama_jax.tokenizer this module uses."""

    bos_id: int
    eos_id: int

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...

    def special_id(self, token: str) -> int: ...


@dataclass(frozen=True)
class Message:
    """One turn. `train` only matters for assistant messages: False keeps the answer as context without loss."""

    role: Role
    content: str
    train: bool = True


@dataclass(frozen=True)
class EncodedDialog:
    """Token ids of a rendered conversation and, per token, whether it is a training target."""

    tokens: list[int]
    loss_mask: list[bool]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.loss_mask):
            raise ValueError(f"tokens ({len(self.tokens)}) and loss_mask ({len(self.loss_mask)}) differ in length")


# ---------------------------------------------------------------------------------------------------------------
# Conversation rules


def validate_conversation(messages: Sequence[Message], *, ending: Ending = "assistant") -> None:
    """Raise ChatFormatError unless the roles follow the format: [system] user assistant user ... ending as asked."""
    if not messages:
        raise ChatFormatError("empty conversation: no messages")
    for index, message in enumerate(messages):
        _check_message_fields(index, message)
    dialog_start = 1 if messages[0].role == "system" else 0
    if dialog_start == len(messages):
        raise ChatFormatError("conversation has a system message but no user message")
    for index in range(dialog_start, len(messages)):
        expected = "user" if (index - dialog_start) % 2 == 0 else "assistant"
        actual = messages[index].role
        if actual != expected:
            rule = (
                "a system message may only come first"
                if actual == "system"
                else "after an optional system message, user and assistant alternate starting with 'user'"
            )
            raise ChatFormatError(f"message {index + 1} has role {actual!r} where {expected!r} is expected: {rule}")
    last_role = messages[-1].role
    if ending != "any" and last_role != ending:
        purpose = (
            "training data must end on an assistant answer"
            if ending == "assistant"
            else "a generation prompt must end on a user turn"
        )
        raise ChatFormatError(f"conversation ends on a {last_role!r} message; {purpose}")


def _check_message_fields(index: int, message: Message) -> None:
    if message.role not in ROLES:
        raise ChatFormatError(f"message {index + 1} has unknown role {message.role!r}; expected one of {ROLES}")
    if not isinstance(message.content, str):
        raise ChatFormatError(f"message {index + 1} content is {type(message.content).__name__}, expected a string")
    if not isinstance(message.train, bool):
        raise ChatFormatError(f"message {index + 1} 'train' is {message.train!r}, expected true or false")


# ---------------------------------------------------------------------------------------------------------------
# JSONL conversations: {"messages": [{"role": ..., "content": ..., "train": false?}, ...]} one per line

_MESSAGE_KEYS = frozenset({"role", "content", "train"})


def read_numbered_conversations(
    path: str | Path, *, ending: Ending = "assistant"
) -> Iterator[tuple[int, list[Message]]]:
    """Yield (line number, messages) per non-blank line; the first bad line raises ChatFormatError naming it."""
    try:
        file = open(path, "rb")  # bytes, so that bad UTF-8 is reported with its line number
    except OSError as error:
        raise DataError(f"{path}: cannot read conversations: {error.strerror or error}") from error
    with file:
        for line_number, raw_line in enumerate(file, start=1):
            if not raw_line.strip():
                continue  # blank lines (e.g. a trailing newline pair) carry no conversation
            try:
                messages = conversation_from_json(raw_line)
                validate_conversation(messages, ending=ending)
            except ChatFormatError as error:
                raise ChatFormatError(f"{path}:{line_number}: {error}") from None
            yield line_number, messages


def read_conversations(path: str | Path, *, ending: Ending = "assistant") -> Iterator[list[Message]]:
    """Yield each conversation of a JSONL file, validated; errors name the file and line."""
    for _, messages in read_numbered_conversations(path, ending=ending):
        yield messages


def conversation_from_json(line: str | bytes) -> list[Message]:
    """Parse one JSONL line into messages (field types only; role order is validate_conversation's job)."""
    try:
        record = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
    except UnicodeDecodeError as error:
        raise ChatFormatError(f"not UTF-8 text: {error.reason} at byte {error.start}") from None
    except json.JSONDecodeError as error:
        raise ChatFormatError(f"invalid JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(record, dict) or "messages" not in record:
        raise ChatFormatError('expected a JSON object with a "messages" list')
    if not isinstance(record["messages"], list):
        raise ChatFormatError(f'"messages" is {type(record["messages"]).__name__}, expected a list')
    return [_message_from_json(index, item) for index, item in enumerate(record["messages"])]


def _message_from_json(index: int, item: object) -> Message:
    if not isinstance(item, dict):
        raise ChatFormatError(f"message {index + 1} is {type(item).__name__}, expected an object")
    # Unknown keys are rejected so that a typo such as "contents" or "trian" is not silently ignored.
    unknown = sorted(set(item) - _MESSAGE_KEYS)
    if unknown:
        raise ChatFormatError(f"message {index + 1} has unknown keys {unknown}; allowed: {sorted(_MESSAGE_KEYS)}")
    for key in ("role", "content"):
        if key not in item:
            raise ChatFormatError(f"message {index + 1} has no {key!r}")
    message = Message(role=item["role"], content=item["content"], train=item.get("train", True))
    _check_message_fields(index, message)
    return message


def conversation_to_json(messages: Sequence[Message]) -> str:
    """One JSONL line; "train": false is written only where a message's loss is zeroed."""
    items = []
    for message in messages:
        item: dict[str, object] = {"role": message.role, "content": message.content}
        if not message.train:
            item["train"] = False
        items.append(item)
    return json.dumps({"messages": items}, ensure_ascii=False)


def write_conversations(path: str | Path, conversations: Iterable[Sequence[Message]]) -> int:
    """Write conversations as JSONL, all or nothing: an error midway leaves no partial file. Returns the count."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    count = 0
    try:
        with open(partial, "w", encoding="utf-8") as output:
            for messages in conversations:
                output.write(conversation_to_json(messages) + "\n")
                count += 1
        os.replace(partial, path)
    except OSError as error:
        raise DataError(f"{path}: cannot write conversations: {error.strerror or error}") from error
    finally:
        partial.unlink(missing_ok=True)
    return count


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def encode_dialog(
    messages: Sequence[Message], tokenizer: ChatTokenizer, style: ChatStyle, *, for_generation: bool
) -> EncodedDialog:
    """Token ids of a conversation in `style`, with loss_mask True on trained assistant answers and their EOS/eot.

    for_generation=False: training data, must end on an assistant answer.
    for_generation=True: a prompt, must end on a user turn; the tokens end where the model's answer begins
    ("[/INST]" for Llama 2, an empty assistant header for Llama 3).
    """
    validate_conversation(messages, ending="user" if for_generation else "assistant")
    if style == "llama2":
        return _encode_llama2(messages, tokenizer)
    if style == "llama3":
        return _encode_llama3(messages, tokenizer, for_generation=for_generation)
    raise ChatFormatError(f"unknown chat style {style!r}; expected one of {CHAT_STYLES}")


def dialog_prompt(messages: Sequence[Message], tokenizer: ChatTokenizer, style: ChatStyle) -> list[int]:
    """Token ids to feed a model so that it writes the next assistant answer."""
    return encode_dialog(messages, tokenizer, style, for_generation=True).tokens


def generation_stop_ids(tokenizer: ChatTokenizer, style: ChatStyle) -> frozenset[int]:
    """Ids that end an answer: EOS for Llama 2; <|end_of_text|> or <|eot_id|> for Llama 3."""
    if style == "llama2":
        return frozenset({tokenizer.eos_id})
    if style == "llama3":
        return frozenset({tokenizer.special_id(LLAMA3_END_OF_TEXT), tokenizer.special_id(LLAMA3_END_OF_TURN)})
    raise ChatFormatError(f"unknown chat style {style!r}; expected one of {CHAT_STYLES}")


def _encode_llama2(messages: Sequence[Message], tokenizer: ChatTokenizer) -> EncodedDialog:
    """Meta's chat_completion: one BOS ... EOS encode() call per answered pair, a BOS-only call for the last prompt.

    Whether the dialog ends on an answer (training) or a user turn (prompt) decides if there is a final prompt.
    """
    turns = _llama2_fold_system(messages)
    tokens: list[int] = []
    loss_mask: list[bool] = []
    for user, answer in zip(turns[0::2], turns[1::2]):
        pair_tokens, answer_start = _encode_llama2_pair(tokenizer, user.content, answer.content)
        tokens += pair_tokens
        loss_mask += [False] * answer_start + [answer.train] * (len(pair_tokens) - answer_start)
    if turns[-1].role == "user":
        prompt_tokens = tokenizer.encode(_llama2_prompt_text(turns[-1].content), bos=True, eos=False)
        tokens += prompt_tokens
        loss_mask += [False] * len(prompt_tokens)
    return EncodedDialog(tokens, loss_mask)


def _llama2_fold_system(messages: Sequence[Message]) -> list[Message]:
    """Meta prepends "<<SYS>>\\n{system}\\n<</SYS>>\\n\\n" to the first user content (system not stripped)."""
    if messages[0].role != "system":
        return list(messages)
    system, first_user = messages[0], messages[1]
    folded = LLAMA2_SYS_OPEN + system.content + LLAMA2_SYS_CLOSE + first_user.content
    return [dataclasses.replace(first_user, content=folded), *messages[2:]]


def _llama2_prompt_text(user_content: str) -> str:
    return f"{LLAMA2_INST_OPEN} {user_content.strip()} {LLAMA2_INST_CLOSE}"


def _encode_llama2_pair(tokenizer: ChatTokenizer, user_content: str, answer_content: str) -> tuple[list[int], int]:
    """Tokens of one answered pair, encoded in one call as Meta does, and the index where the answer starts.

    The answer boundary is found by encoding the prompt part alone: its ids are a prefix of the pair's ids when
    the tokenizer does not merge across the boundary (SentencePiece puts the space before the answer at the start
    of the answer's first piece, so "[/INST]"'s closing "]" and "▁answer" stay separate pieces). If a tokenizer
    did merge across it, the pair's ids are kept unchanged (faithful to Meta) and the answer starts at the first
    id where the two encodings differ: that one id straddles the boundary and carries answer text, so it is
    trained on. Encodings that differ earlier than the prompt's last id would put prompt text under the loss,
    so they raise TokenizerError instead.
    """
    prompt_text = _llama2_prompt_text(user_content)
    pair_text = f"{prompt_text} {answer_content.strip()} "
    pair_tokens = tokenizer.encode(pair_text, bos=True, eos=True)
    prompt_tokens = tokenizer.encode(prompt_text, bos=True, eos=False)
    if not pair_tokens or pair_tokens[0] != tokenizer.bos_id or pair_tokens[-1] != tokenizer.eos_id:
        raise TokenizerError("encode(text, bos=True, eos=True) returned ids not starting with BOS and ending with EOS")
    answer_start = _common_prefix_length(prompt_tokens, pair_tokens)
    if answer_start < len(prompt_tokens) - 1:
        raise TokenizerError(
            f"the Llama 2 prompt {prompt_text!r} encodes differently alone and followed by its answer "
            f"({len(prompt_tokens) - answer_start} ids differ), so the answer's loss mask cannot be placed"
        )
    # BOS is always shared and EOS never is, so the answer region is never empty and never swallows the BOS.
    assert 1 <= answer_start < len(pair_tokens), (answer_start, len(pair_tokens))
    return pair_tokens, answer_start


def _common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def _encode_llama3(messages: Sequence[Message], tokenizer: ChatTokenizer, *, for_generation: bool) -> EncodedDialog:
    """Meta's llama3 ChatFormat: <|begin_of_text|>, then per message header + content.strip() + <|eot_id|>."""
    tokens = [tokenizer.special_id(LLAMA3_BEGIN_OF_TEXT)]
    loss_mask = [False]
    end_of_turn = tokenizer.special_id(LLAMA3_END_OF_TURN)
    for message in messages:
        header = _llama3_header(tokenizer, message.role)
        body = tokenizer.encode(message.content.strip(), bos=False, eos=False) + [end_of_turn]
        trained = message.role == "assistant" and message.train
        tokens += header + body
        loss_mask += [False] * len(header) + [trained] * len(body)
    if for_generation:
        # An empty assistant header: the model writes the answer from here on.
        header = _llama3_header(tokenizer, "assistant")
        tokens += header
        loss_mask += [False] * len(header)
    return EncodedDialog(tokens, loss_mask)


def _llama3_header(tokenizer: ChatTokenizer, role: str) -> list[int]:
    return [
        tokenizer.special_id(LLAMA3_START_HEADER),
        *tokenizer.encode(role, bos=False, eos=False),
        tokenizer.special_id(LLAMA3_END_HEADER),
        *tokenizer.encode("\n\n", bos=False, eos=False),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Packing encoded conversations into fixed-length rows for supervised fine-tuning
#
# A conversation of n tokens fills n - 1 slots (input tokens[i], target tokens[i + 1]); several conversations
# share a row, none is split across rows. One longer than seq_len + 1 tokens is truncated to its first
# seq_len + 1 tokens with a warning (so it fills a row alone), and dropped, also with a warning, if what is left
# has no trained target (e.g. a long system prompt that leaves no room for an answer).


@dataclass(frozen=True)
class PackedRows:
    """[rows, seq_len] arrays. Padding: token/target pad_id, loss_mask False, segment 0, position 0."""

    tokens: np.ndarray  # int32 inputs
    targets: np.ndarray  # int32, the next token of the same conversation
    loss_mask: np.ndarray  # bool, True where the target is a trained assistant token
    segment_ids: np.ndarray  # int32, 1, 2, ... per conversation within a row; attention must not cross them
    positions: np.ndarray  # int32, restarting at 0 for each conversation (RoPE positions)


def pack_dialogs(dialogs: Sequence[EncodedDialog], seq_len: int, pad_id: int) -> PackedRows:
    """Pack conversations in the given order into rows (next-fit: a new row when the next one does not fit)."""
    slot_counts = packable_slot_counts(dialogs, seq_len)
    rows = plan_rows(slot_counts, range(len(dialogs)), seq_len)
    return fill_rows(dialogs, slot_counts, rows, seq_len, pad_id)


def packable_slot_counts(dialogs: Sequence[EncodedDialog], seq_len: int) -> np.ndarray:
    """Slots each conversation fills (n - 1, capped at seq_len); 0 for one that is dropped. Warns about both."""
    if seq_len < 1:
        raise DataError(f"seq_len must be at least 1, got {seq_len}")
    counts = np.zeros(len(dialogs), dtype=np.int64)
    truncated = dropped = 0
    for index, dialog in enumerate(dialogs):
        slots = min(len(dialog.tokens) - 1, seq_len)
        truncated += len(dialog.tokens) - 1 > seq_len
        if slots < 1 or not any(dialog.loss_mask[1 : slots + 1]):
            dropped += 1
            continue
        counts[index] = slots
    if truncated:
        warnings.warn(f"{truncated} of {len(dialogs)} conversations are longer than seq_len + 1 = {seq_len + 1} "
                      f"tokens and were truncated", stacklevel=3)
    if dropped:
        warnings.warn(f"{dropped} of {len(dialogs)} conversations have no trained target within seq_len + 1 = "
                      f"{seq_len + 1} tokens and were dropped", stacklevel=3)
    if not counts.any():
        raise DataError(f"none of the {len(dialogs)} conversations has a trained target to pack")
    return counts


def plan_rows(
    slot_counts: Sequence[int] | np.ndarray, order: Sequence[int] | np.ndarray, seq_len: int
) -> list[list[int]]:
    """Conversation indices per row, visiting `order` and skipping those with 0 slots. Next-fit keeps the
    visiting order (so a shuffle stays a shuffle) and runs in linear time."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in order:
        slots = int(slot_counts[index])
        if slots == 0:
            continue
        if used + slots > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(int(index))
        used += slots
    if current:
        rows.append(current)
    return rows


def fill_rows(
    dialogs: Sequence[EncodedDialog], slot_counts: np.ndarray, rows: Sequence[Sequence[int]], seq_len: int, pad_id: int
) -> PackedRows:
    """Materialise planned rows into arrays."""
    shape = (len(rows), seq_len)
    packed = PackedRows(
        tokens=np.full(shape, pad_id, dtype=np.int32),
        targets=np.full(shape, pad_id, dtype=np.int32),
        loss_mask=np.zeros(shape, dtype=bool),
        segment_ids=np.zeros(shape, dtype=np.int32),
        positions=np.zeros(shape, dtype=np.int32),
    )
    for row, indices in enumerate(rows):
        start = 0
        for segment, index in enumerate(indices, start=1):
            slots = int(slot_counts[index])
            tokens = np.asarray(dialogs[index].tokens[: slots + 1], dtype=np.int32)
            span = slice(start, start + slots)
            packed.tokens[row, span] = tokens[:-1]
            packed.targets[row, span] = tokens[1:]
            packed.loss_mask[row, span] = dialogs[index].loss_mask[1 : slots + 1]
            packed.segment_ids[row, span] = segment
            packed.positions[row, span] = np.arange(slots)
            start += slots
    return packed


@dataclass
class PackedSFTBatches:
    """Batches of packed rows where batch(step) is a pure function of (dialogs, seed, step).

    Each epoch visits the conversations in a permutation drawn from np.random.default_rng((seed, epoch)) and
    packs them next-fit; the epochs' rows are concatenated and step k takes rows [k * batch_size, (k + 1) *
    batch_size), so a batch may straddle two epochs. Resuming needs only the step. The caches below only
    avoid recomputing epoch layouts; they never change a result.
    """

    dialogs: Sequence[EncodedDialog]
    seq_len: int
    batch_size: int
    pad_id: int
    seed: int
    _slot_counts: np.ndarray = field(init=False, repr=False)
    _epoch_starts: list[int] = field(init=False, repr=False)  # first global row of each epoch planned so far
    _recent_plans: dict[int, list[list[int]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {self.batch_size}")
        self._slot_counts = packable_slot_counts(self.dialogs, self.seq_len)
        self._epoch_starts = [0]
        self._recent_plans = {}

    def batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> PackedRows:
        """This process's contiguous share of the global batch for `step`."""
        if step < 0:
            raise DataError(f"step must be non-negative, got {step}")
        if self.batch_size % process_count or not 0 <= process_index < process_count:
            raise DataError(f"cannot split batch_size {self.batch_size} over {process_count} processes "
                            f"(process_index {process_index})")
        share = self.batch_size // process_count
        first = step * self.batch_size + process_index * share
        rows = [self._row(global_row) for global_row in range(first, first + share)]
        return fill_rows(self.dialogs, self._slot_counts, rows, self.seq_len, self.pad_id)

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """Conversation indices per row in `epoch`."""
        if epoch not in self._recent_plans:
            if len(self._recent_plans) >= 2:  # a batch spans two epochs at most, unless an epoch is tiny
                del self._recent_plans[min(self._recent_plans)]
            order = np.random.default_rng((self.seed, epoch)).permutation(len(self.dialogs))
            self._recent_plans[epoch] = plan_rows(self._slot_counts, order, self.seq_len)
        return self._recent_plans[epoch]

    def epoch_of_row(self, global_row: int) -> tuple[int, int]:
        """(epoch, row within the epoch) of a global row index."""
        while self._epoch_starts[-1] <= global_row:
            planned_epochs = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + len(self.epoch_rows(planned_epochs)))
        epoch = bisect.bisect_right(self._epoch_starts, global_row) - 1
        return epoch, global_row - self._epoch_starts[epoch]

    def _row(self, global_row: int) -> list[int]:
        epoch, row = self.epoch_of_row(global_row)
        return self.epoch_rows(epoch)[row]


# ---------------------------------------------------------------------------------------------------------------
# Ghost Attention data (Llama 2 paper, section 3.3)
#
# Answers are sampled with the instruction concatenated to every user message; the training sample keeps it only
# in the first user message and trains only on the last answer ("set the loss to 0 for all the tokens from the
# previous turns, including assistant messages"), since the earlier answers were produced with an instruction
# the training context no longer shows.

# Between the instruction and the user's text; the paper does not specify one.
GATT_SEPARATOR = "\n\n"

AnswerFn = Callable[[list[Message]], str]


@dataclass(frozen=True)
class GattSample:
    """A GAtt training conversation; only its last assistant message has train=True."""

    messages: list[Message]

    @property
    def train_flags(self) -> list[bool]:
        """Per message, whether its tokens are trained on (user and system messages never are)."""
        return [message.role == "assistant" and message.train for message in self.messages]


def with_instruction(user_content: str, instruction: str, separator: str = GATT_SEPARATOR) -> str:
    return f"{instruction}{separator}{user_content}"


def gatt_sampling_dialog(
    conversation: Sequence[Message], instruction: str, *, separator: str = GATT_SEPARATOR
) -> list[Message]:
    """The conversation as the answering model sees it: the instruction on every user message."""
    _check_instruction(instruction)
    return [
        dataclasses.replace(m, content=with_instruction(m.content, instruction, separator)) if m.role == "user" else m
        for m in conversation
    ]


def gatt_sample(
    conversation: Sequence[Message],
    instruction: str,
    answer_fn: AnswerFn | None = None,
    *,
    separator: str = GATT_SEPARATOR,
) -> GattSample:
    """A GAtt training sample from a conversation without the instruction.

    With answer_fn, every answer is sampled afresh, turn by turn, from answer_fn(sampling dialog so far) where
    every user message carries the instruction; the conversation's own answers are ignored and it may end on a
    user turn. Without answer_fn, the conversation's answers are used as they are (the caller vouches that they
    were produced with the instruction on every user turn) and it must end on an answer.
    """
    _check_instruction(instruction)
    validate_conversation(conversation, ending="any" if answer_fn else "assistant")
    answered = _sample_answers(conversation, instruction, answer_fn, separator) if answer_fn else list(conversation)
    first_user = next(i for i, m in enumerate(answered) if m.role == "user")
    last_answer = max(i for i, m in enumerate(answered) if m.role == "assistant")
    messages = []
    for index, message in enumerate(answered):
        if index == first_user:
            message = dataclasses.replace(message, content=with_instruction(message.content, instruction, separator))
        if message.role == "assistant":
            message = dataclasses.replace(message, train=index == last_answer)
        messages.append(message)
    return GattSample(messages)


def remove_gatt_instruction(
    conversation: Sequence[Message], instruction: str, *, separator: str = GATT_SEPARATOR
) -> list[Message]:
    """Undo gatt_sampling_dialog on an answered sampling dialog; every user message must carry the instruction."""
    _check_instruction(instruction)
    prefix = with_instruction("", instruction, separator)
    stripped = []
    for index, message in enumerate(conversation):
        if message.role == "user":
            if not message.content.startswith(prefix):
                raise ChatFormatError(f"message {index + 1} (user) does not start with the GAtt instruction")
            message = dataclasses.replace(message, content=message.content[len(prefix) :])
        stripped.append(message)
    return stripped


def _sample_answers(
    conversation: Sequence[Message], instruction: str, answer_fn: AnswerFn, separator: str
) -> list[Message]:
    sampling: list[Message] = []  # what the model sees: instruction on every user message
    answered: list[Message] = []  # the same turns without the instruction
    for message in conversation:
        if message.role == "assistant":
            continue  # replaced by the model's own answer
        answered.append(message)
        if message.role != "user":
            sampling.append(message)
            continue
        sampling.append(dataclasses.replace(message, content=with_instruction(message.content, instruction, separator)))
        answer = answer_fn(list(sampling))
        if not isinstance(answer, str):
            raise TypeError(f"answer_fn returned {type(answer).__name__}, expected str")
        sampling.append(Message("assistant", answer))
        answered.append(Message("assistant", answer))
    return answered


def _check_instruction(instruction: str) -> None:
    if not isinstance(instruction, str) or not instruction.strip():
        raise ChatFormatError("the GAtt instruction is empty")


# ---------------------------------------------------------------------------------------------------------------
# Command line: python -m llama_jax.chat {check,gatt-sampling,gatt} ...


def main(argv: Sequence[str]) -> int:
    """Check conversation files and build Ghost Attention data."""
    args = _argument_parser().parse_args(list(argv))
    return args.run(args)


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.chat", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="validate a conversations JSONL file")
    check.add_argument("path", type=Path)
    check.add_argument("--ending", choices=get_args(Ending), default="assistant",
                       help="role every conversation must end on (default: assistant, as training data)")
    check.set_defaults(run=_run_check)

    sampling = commands.add_parser(
        "gatt-sampling",
        help="write the GAtt sampling dialogs: the instruction on every user message, for a model to re-answer "
        "turn by turn; feed the answered result back with `gatt --from-sampling`",
    )
    _add_gatt_arguments(sampling)
    sampling.set_defaults(run=_run_gatt_sampling)

    gatt = commands.add_parser(
        "gatt",
        help='write GAtt training data: the instruction in the first user message only, "train": false on every '
        "answer but the last",
    )
    _add_gatt_arguments(gatt)
    gatt.add_argument("--from-sampling", action="store_true",
                      help="the input's user messages all carry the instruction (answered gatt-sampling output)")
    gatt.set_defaults(run=_run_gatt)
    return parser


def _add_gatt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instruction", required=True, help='e.g. "Always answer as a pirate."')
    parser.add_argument("--separator", default=GATT_SEPARATOR,
                        help="text between the instruction and the user message (default: a blank line)")
    parser.add_argument("input", type=Path, help="conversations JSONL")
    parser.add_argument("output", type=Path, help="JSONL to write")


def _run_check(args: argparse.Namespace) -> int:
    count = sum(1 for _ in read_conversations(args.path, ending=args.ending))
    print(f"{args.path}: {count} conversations")
    return 0


def _run_gatt_sampling(args: argparse.Namespace) -> int:
    def build(messages: list[Message]) -> list[Message]:
        return gatt_sampling_dialog(messages, args.instruction, separator=args.separator)

    count = write_conversations(args.output, _converted(args.input, "any", build))
    print(f"{args.output}: {count} sampling dialogs")
    return 0


def _run_gatt(args: argparse.Namespace) -> int:
    def build(messages: list[Message]) -> list[Message]:
        if args.from_sampling:
            messages = remove_gatt_instruction(messages, args.instruction, separator=args.separator)
        return gatt_sample(messages, args.instruction, separator=args.separator).messages

    count = write_conversations(args.output, _converted(args.input, "assistant", build))
    print(f"{args.output}: {count} GAtt samples")
    return 0


def _converted(
    path: Path, ending: Ending, convert: Callable[[list[Message]], list[Message]]
) -> Iterator[list[Message]]:
    """convert() applied to each conversation of a file, its errors naming the input line."""
    for line, messages in read_numbered_conversations(path, ending=ending):
        try:
            yield convert(messages)
        except ChatFormatError as error:
            raise ChatFormatError(f"{path}:{line}: {error}") from None


if __name__ == "__main__":
    run_program(main)
