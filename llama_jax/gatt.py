"""Ghost Attention (GAtt) training data, as in the Llama 2 paper (section 3.3): a system-like instruction that a
chat model keeps obeying for the whole dialog. `python -m train.gatt` is its program."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llama_jax.chat_format import Message, validate_conversation
from llama_jax.errors import ChatFormatError

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
