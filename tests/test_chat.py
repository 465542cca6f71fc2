"""Chat formats, loss masks, SFT packing and Ghost Attention data.

Expected token ids are written out from the published formats (Meta's llama/generation.py for Llama 2, the llama3
ChatFormat for Llama 3) with byte-level fake tokenizers, so every id can be checked by hand.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_jax.chat import (
    EncodedDialog,
    Message,
    dialog_prompt,
    encode_dialog,
    generation_stop_ids,
    read_conversations,
    validate_conversation,
    write_conversations,
)
from llama_jax.errors import ChatFormatError


class Llama2ByteTokenizer:
    """Like SentencePiece byte fallback in Llama 2's vocabulary: <unk>=0, <s>=1, </s>=2, byte b is id b + 3."""

    bos_id, eos_id, vocab_size = 1, 2, 259
    stop_ids = (2,)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + [byte + 3 for byte in text.encode()] + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode()

    def special_id(self, token: str) -> int:
        raise KeyError(token)


LLAMA3_SPECIALS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eot_id|>": 128009,
}


class Llama3ByteTokenizer:
    """Byte b is id b; the special tokens have Llama 3's real ids."""

    bos_id, eos_id, vocab_size = 128000, 128001, 128256
    stop_ids = (128001, 128009)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + list(text.encode()) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode()

    def special_id(self, token: str) -> int:
        return LLAMA3_SPECIALS[token]


LLAMA2 = Llama2ByteTokenizer()
LLAMA3 = Llama3ByteTokenizer()


def llama2_text(text: str) -> list[int]:
    """Byte-fallback ids of plain text, the Llama 2 fake's only rule (kept trivial so it is checkable by eye)."""
    return [ord(character) + 3 for character in text]


def llama3_text(text: str) -> list[int]:
    return [ord(character) for character in text]


BOS2, EOS2 = 1, 2
BEGIN, START_HEADER, END_HEADER, EOT = 128000, 128006, 128007, 128009

MULTI_TURN = [
    Message("system", "Be brief."),
    Message("user", " Hi there "),
    Message("assistant", "Hello!\n"),
    Message("user", "2+2?"),
    Message("assistant", " 4"),
]


def flagged(pieces: list[tuple[list[int], bool]]) -> EncodedDialog:
    """Concatenate (ids, trained) pieces into the expected tokens and mask."""
    return EncodedDialog(
        tokens=[i for ids, _ in pieces for i in ids],
        loss_mask=[trained for ids, trained in pieces for _ in ids],
    )


# ---------------------------------------------------------------------------------------------------------------
# Llama 2


def test_llama2_single_turn_ids_written_out():
    encoded = encode_dialog([Message("user", "hi"), Message("assistant", "yo")], LLAMA2, "llama2", for_generation=False)
    # <s> "[INST]" " " "hi" " " "[/INST]" | " " "yo" " " </s>   (byte b -> b + 3)
    prompt = [1, 94, 76, 81, 86, 87, 96, 35, 107, 108, 35, 94, 50, 76, 81, 86, 87, 96]
    answer = [35, 124, 114, 35, 2]
    assert encoded.tokens == prompt + answer
    assert encoded.loss_mask == [False] * len(prompt) + [True] * len(answer)


def test_llama2_multi_turn_with_system_prompt():
    encoded = encode_dialog(MULTI_TURN, LLAMA2, "llama2", for_generation=False)
    # System folded into the first user turn; one BOS...EOS per answered pair. Meta strips the folded string as a
    # whole, so the first user message keeps its leading space after the <</SYS>> block.
    expected = flagged([
        ([BOS2] + llama2_text("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi there [/INST]"), False),
        (llama2_text(" Hello! ") + [EOS2], True),
        ([BOS2] + llama2_text("[INST] 2+2? [/INST]"), False),
        (llama2_text(" 4 ") + [EOS2], True),
    ])
    assert encoded == expected
    assert LLAMA2.decode([t for t, m in zip(encoded.tokens, encoded.loss_mask) if m]) == " Hello!  4 "


def test_llama2_generation_prompt_ends_in_inst_close():
    prompt = dialog_prompt(MULTI_TURN[:4], LLAMA2, "llama2")
    assert prompt == (
        [BOS2] + llama2_text("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi there [/INST] Hello! ") + [EOS2]
        + [BOS2] + llama2_text("[INST] 2+2? [/INST]")
    )
    assert generation_stop_ids(LLAMA2, "llama2") == {2}


def test_llama2_system_and_single_user_prompt():
    prompt = dialog_prompt([Message("system", "S"), Message("user", "q")], LLAMA2, "llama2")
    assert prompt == [BOS2] + llama2_text("[INST] <<SYS>>\nS\n<</SYS>>\n\nq [/INST]")


class MergingTokenizer(Llama2ByteTokenizer):
    """Merges "] " into one id (999), as a tokenizer merging across the prompt/answer boundary would."""

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = super().encode(text, bos=bos, eos=eos)
        merged: list[int] = []
        for i in ids:
            if merged and merged[-1] == ord("]") + 3 and i == ord(" ") + 3:
                merged[-1] = 999
            else:
                merged.append(i)
        return merged


def test_llama2_mask_when_tokenizer_merges_across_answer_boundary():
    encoded = encode_dialog([Message("user", "q"), Message("assistant", "a")], MergingTokenizer(), "llama2",
                            for_generation=False)
    # "[INST]" ends in "] " -> 999 too, so the merged ids come from the pair encoded in one call, as Meta does.
    prompt = [1, 94, 76, 81, 86, 87, 999, 116, 35, 94, 50, 76, 81, 86, 87]
    answer = [999, 100, 35, 2]  # "] " straddles the boundary and carries the answer's space: trained on
    assert encoded.tokens == prompt + answer
    assert encoded.loss_mask == [False] * len(prompt) + [True] * len(answer)


# ---------------------------------------------------------------------------------------------------------------
# Llama 3


def test_llama3_single_turn_ids_written_out():
    encoded = encode_dialog([Message("user", "hi"), Message("assistant", "yo")], LLAMA3, "llama3", for_generation=False)
    prompt = [128000, 128006, 117, 115, 101, 114, 128007, 10, 10, 104, 105, 128009,
              128006, 97, 115, 115, 105, 115, 116, 97, 110, 116, 128007, 10, 10]
    answer = [121, 111, 128009]
    assert encoded.tokens == prompt + answer
    assert encoded.loss_mask == [False] * len(prompt) + [True] * len(answer)


def llama3_header(role: str) -> list[int]:
    return [START_HEADER] + llama3_text(role) + [END_HEADER] + llama3_text("\n\n")


def test_llama3_multi_turn_with_system_prompt():
    encoded = encode_dialog(MULTI_TURN, LLAMA3, "llama3", for_generation=False)
    expected = flagged([
        ([BEGIN], False),
        (llama3_header("system") + llama3_text("Be brief.") + [EOT], False),
        (llama3_header("user") + llama3_text("Hi there") + [EOT], False),
        (llama3_header("assistant"), False),
        (llama3_text("Hello!") + [EOT], True),
        (llama3_header("user") + llama3_text("2+2?") + [EOT], False),
        (llama3_header("assistant"), False),
        (llama3_text("4") + [EOT], True),
    ])
    assert encoded == expected


def test_llama3_generation_prompt_ends_in_empty_assistant_header():
    prompt = dialog_prompt(MULTI_TURN[:4], LLAMA3, "llama3")
    assert prompt == (
        [BEGIN]
        + llama3_header("system") + llama3_text("Be brief.") + [EOT]
        + llama3_header("user") + llama3_text("Hi there") + [EOT]
        + llama3_header("assistant") + llama3_text("Hello!") + [EOT]
        + llama3_header("user") + llama3_text("2+2?") + [EOT]
        + llama3_header("assistant")
    )
    assert generation_stop_ids(LLAMA3, "llama3") == {128001, 128009}


@pytest.mark.parametrize("style, tokenizer", [("llama2", LLAMA2), ("llama3", LLAMA3)])
def test_untrained_answer_stays_in_context_without_loss(style, tokenizer):
    frozen = [MULTI_TURN[0], MULTI_TURN[1], Message("assistant", "Hello!\n", train=False), *MULTI_TURN[3:]]
    full = encode_dialog(MULTI_TURN, tokenizer, style, for_generation=False)
    partial = encode_dialog(frozen, tokenizer, style, for_generation=False)
    assert partial.tokens == full.tokens
    trained_text = [t for t, m in zip(partial.tokens, partial.loss_mask) if m]
    expected_last = llama2_text(" 4 ") + [EOS2] if style == "llama2" else llama3_text("4") + [EOT]
    assert trained_text == expected_last


# ---------------------------------------------------------------------------------------------------------------
# Conversation rules and JSONL errors


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})


@pytest.mark.parametrize(
    "bad_line, message_part",
    [
        ('{"messages": [{"role": "user", "content": "q"}', "invalid JSON"),
        ('{"messages": []}', "empty conversation"),
        ('{"messages": [{"role": "robot", "content": "q"}]}', "unknown role 'robot'"),
        ('{"messages": [{"role": "assistant", "content": "a"}]}', "message 1 has role 'assistant'"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]}',
         "system message may only come first"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}',
         "message 2 has role 'user' where 'assistant' is expected"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},'
         ' {"role": "user", "content": "q2"}]}', "ends on a 'user' message"),
        ('{"messages": [{"role": "system", "content": "s"}]}', "no user message"),
        ('{"messages": [{"role": "user", "content": 3}]}', "content is int"),
        ('{"messages": [{"role": "user", "contents": "q"}]}', "unknown keys ['contents']"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": 0}]}',
         "'train' is 0"),
        ('["user", "q"]', '"messages" list'),
    ],
)
def test_each_bad_line_gives_one_error_naming_file_and_line(tmp_path, bad_line, message_part):
    path = write_lines(tmp_path / "chats.jsonl", [GOOD_LINE, "", bad_line, GOOD_LINE])
    conversations = read_conversations(path)
    assert next(conversations) == [Message("user", "q"), Message("assistant", "a")]
    with pytest.raises(ChatFormatError) as raised:
        next(conversations)
    assert str(raised.value).startswith(f"{path}:3: ")
    assert message_part in str(raised.value)


def test_prompts_may_end_on_user_turn(tmp_path):
    path = write_lines(tmp_path / "prompts.jsonl", ['{"messages": [{"role": "user", "content": "q"}]}'])
    assert list(read_conversations(path, ending="user")) == [[Message("user", "q")]]
    with pytest.raises(ChatFormatError, match="ends on a 'user' message"):
        list(read_conversations(path))


def test_encode_dialog_checks_the_ending():
    with pytest.raises(ChatFormatError, match="generation prompt must end on a user turn"):
        encode_dialog(MULTI_TURN, LLAMA2, "llama2", for_generation=True)
    with pytest.raises(ChatFormatError, match="training data must end on an assistant answer"):
        encode_dialog(MULTI_TURN[:4], LLAMA3, "llama3", for_generation=False)


def test_write_then_read_keeps_train_markers(tmp_path):
    conversation = [Message("user", "q"), Message("assistant", "ä", train=False), Message("user", "r"),
                    Message("assistant", "b")]
    path = tmp_path / "out.jsonl"
    assert write_conversations(path, [conversation]) == 1
    assert '"train": false' in path.read_text(encoding="utf-8")
    assert list(read_conversations(path)) == [conversation]
    validate_conversation(conversation)
