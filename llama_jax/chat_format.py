"""Chat formats for Llama 2 and Llama 3: conversations as token ids plus a mask of the tokens trained on.

Conversations are lists of `Message`s (system first if any, then user and assistant alternating, starting with
the user). `encode_dialog` renders one exactly as Meta's reference code does and marks the assistant answers and
their closing EOS / `<|eot_id|>` as trained; an assistant message with `train=False` (as in Ghost Attention data)
stays in the context but is not trained on.

The tokenizer is duck-typed (see `ChatTokenizer`): `encode(text, *, bos, eos)`, `bos_id`, `eos_id` and
`special_id(name)`, so this module never imports a tokenizer implementation.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

from llama_jax.errors import ChatFormatError, DataError, TokenizerError
from llama_jax.jsonl import read_jsonl

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
    for line_number, record in read_jsonl(path, "conversations", ChatFormatError):
        try:
            messages = conversation_from_json(record)
            validate_conversation(messages, ending=ending)
        except ChatFormatError as error:
            raise ChatFormatError(f"{path}:{line_number}: {error}") from None
        yield line_number, messages


def read_conversations(path: str | Path, *, ending: Ending = "assistant") -> Iterator[list[Message]]:
    """Yield each conversation of a JSONL file, validated; errors name the file and line."""
    for _, messages in read_numbered_conversations(path, ending=ending):
        yield messages


def conversation_from_json(record: Any) -> list[Message]:
    """One parsed JSONL record as messages (field types only; role order is validate_conversation's job)."""
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
