"""Chat formats, loss masks, SFT packing and Ghost Attention data.

Expected token ids are written out from the published formats (Meta's llama/generation.py for Llama 2, the llama3
ChatFormat for Llama 3) with byte-level fake tokenizers, so every id can be checked by hand.
"""
from __future__ import annotations

import io
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama_jax.chat_format import (
    EncodedDialog,
    Message,
    dialog_prompt,
    encode_dialog,
    generation_stop_ids,
    read_conversations,
    validate_conversation,
    write_conversations,
)
from llama_jax.errors import ChatFormatError, DataError, TokenizerError
from llama_jax.gatt import gatt_sample, gatt_sampling_dialog
from llama_jax.sft_data import PackedRows, PackedSFTBatches, pack_dialogs
from train.gatt import main


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


class ContextSensitiveTokenizer(Llama2ByteTokenizer):
    """Encodes "/INST]" as one id (998) unless it ends the text: the prompt alone differs well before its end."""

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        if not text.endswith("[/INST]"):
            text = text.replace("/INST]", "\x00")
        return [998 if i == 3 else i for i in super().encode(text, bos=bos, eos=eos)]


def test_llama2_mask_refuses_a_boundary_it_cannot_place():
    with pytest.raises(TokenizerError, match="encodes differently alone and followed by its answer"):
        encode_dialog([Message("user", "q"), Message("assistant", "a")], ContextSensitiveTokenizer(), "llama2",
                      for_generation=False)


class SentencePieceAdapter:
    """A real SentencePiece model behind the ChatTokenizer interface (BOS 1, EOS 2 as in Llama 2)."""

    def __init__(self, processor):
        self.processor, self.bos_id, self.eos_id = processor, processor.bos_id(), processor.eos_id()

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.processor.encode(text) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)


@pytest.fixture(scope="module")
def llama2_like_sentencepiece() -> SentencePieceAdapter:
    """A small BPE model trained with Llama 2's SentencePiece settings (byte fallback, digits split, identity
    normalisation, whitespace as a piece prefix), to check the answer boundary on real merges."""
    import sentencepiece

    words = ("the a of to and in is it you that he was for on are with as his they at one have this from or had by "
             "word but what some we can out other were all there when up use your how said an each she which do "
             "their time if will way about many then them write would like so these her long make thing see").split()
    rng = random.Random(0)
    endings = [".", "?", "!", " [INST] x [/INST]", " 42."]
    lines = [" ".join(rng.choice(words) for _ in range(12)) + rng.choice(endings) for _ in range(2000)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=600, byte_fallback=True,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0, minloglevel=2,
        num_threads=1, hard_vocab_limit=False,
    )
    return SentencePieceAdapter(sentencepiece.SentencePieceProcessor(model_proto=model.getvalue()))


@pytest.mark.parametrize("answer", ["4", "What is it?", "]] ok", "日本", "  the way  ", "[/INST] again"])
def test_llama2_answer_boundary_with_real_sentencepiece(llama2_like_sentencepiece, answer):
    tokenizer = llama2_like_sentencepiece
    system, question = "You are a", "  what is 2+2? "
    encoded = encode_dialog([Message("system", system), Message("user", question), Message("assistant", answer)],
                            tokenizer, "llama2", for_generation=False)
    # Meta's chat_completion, written out: the pair is one encode(bos=True, eos=True) call.
    prompt = f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{question}".strip() + " [/INST]"
    assert encoded.tokens == tokenizer.encode(f"{prompt} {answer.strip()} ", bos=True, eos=True)
    answer_start = len(tokenizer.encode(prompt, bos=True))  # SentencePiece never merges "]" with "▁answer"
    assert encoded.loss_mask == [False] * answer_start + [True] * (len(encoded.tokens) - answer_start)
    assert tokenizer.decode(encoded.tokens[answer_start:-1]).strip() == answer.strip()


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


def test_llama3_matches_metas_chat_format_with_the_real_tokenizer():
    """Meta's own llama3 ChatFormat and tokenizer (llama_models, a pinned test dependency) as a second code path."""
    from llama_models.datatypes import RawMessage
    from llama_models.llama3 import chat_format
    from llama_models.llama3.tokenizer import Tokenizer

    meta_tokenizer = Tokenizer.get_instance()

    class Adapter:
        bos_id, eos_id = meta_tokenizer.bos_id, meta_tokenizer.eos_id
        encode = staticmethod(meta_tokenizer.encode)
        special_id = staticmethod(meta_tokenizer.special_tokens.__getitem__)

    # Contents come stripped: this llama_models version no longer strips them, Meta's original llama3 code did.
    conversation = [Message("system", "Answer in French."), Message("user", "Hello, how are you?"),
                    Message("assistant", "Très bien, merci !"), Message("user", "Et 12+30 ?"),
                    Message("assistant", "42.")]
    def metas_prompt(messages: list[Message]) -> list[int]:
        raw = [RawMessage(role=m.role, content=m.content) for m in messages]
        return chat_format.ChatFormat(meta_tokenizer).encode_dialog_prompt(raw).tokens

    assert dialog_prompt(conversation[:4], Adapter(), "llama3") == metas_prompt(conversation[:4])
    # Meta's encoder always ends on an empty assistant header; training data ends on the last <|eot_id|>.
    encoded = encode_dialog(conversation, Adapter(), "llama3", for_generation=False)
    empty_assistant_header = [128006, *meta_tokenizer.encode("assistant", bos=False, eos=False), 128007,
                              *meta_tokenizer.encode("\n\n", bos=False, eos=False)]
    assert encoded.tokens + empty_assistant_header == metas_prompt(conversation)
    answers = meta_tokenizer.decode([t for t, m in zip(encoded.tokens, encoded.loss_mask) if m])
    assert answers == "Très bien, merci !<|eot_id|>42.<|eot_id|>"


# ---------------------------------------------------------------------------------------------------------------
# Conversation rules and JSONL errors


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})


@pytest.mark.parametrize(
    "bad_line, message_part",
    [
        # the line is 46 characters long: the missing "]}" is expected at column 47
        ('{"messages": [{"role": "user", "content": "q"}', ":47: not valid JSON (Expecting ',' delimiter)"),
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
    assert str(raised.value).startswith(f"{path}:3:")
    assert message_part in str(raised.value)


def test_bad_utf8_and_missing_file(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_bytes(GOOD_LINE.encode() + b"\r\n" + GOOD_LINE.replace("q", "\xe9").encode("latin-1") + b"\n")
    column = GOOD_LINE.index('"q"') + 2  # the latin-1 é, counted from 1
    expected = f"{path}:2:{column}: not valid UTF-8 (invalid continuation byte)"
    with pytest.raises(ChatFormatError, match=re.escape(expected) + "$"):
        list(read_conversations(path))
    with pytest.raises(DataError, match="cannot read conversations"):
        list(read_conversations(tmp_path / "missing.jsonl"))


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


# ---------------------------------------------------------------------------------------------------------------
# Packing

F, T = False, True
PAD = 0


def test_pack_dialogs_written_out():
    dialogs = [
        EncodedDialog([10, 11, 12, 13], [F, F, T, T]),  # 3 slots
        EncodedDialog([20, 21, 22], [F, T, T]),  # 2 slots
        EncodedDialog([30, 31, 32, 33, 34, 35], [F, F, F, T, T, T]),  # 5 slots: does not fit after the first two
    ]
    packed = pack_dialogs(dialogs, seq_len=6, pad_id=PAD)
    np.testing.assert_array_equal(packed.tokens, [[10, 11, 12, 20, 21, PAD], [30, 31, 32, 33, 34, PAD]])
    np.testing.assert_array_equal(packed.targets, [[11, 12, 13, 21, 22, PAD], [31, 32, 33, 34, 35, PAD]])
    np.testing.assert_array_equal(packed.loss_mask, [[F, T, T, T, T, F], [F, F, T, T, T, F]])
    np.testing.assert_array_equal(packed.segment_ids, [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(packed.positions, [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 0]])
    assert packed.tokens.dtype == np.int32 and packed.loss_mask.dtype == bool


def test_overlong_conversation_is_truncated_with_a_warning_and_untrainable_one_dropped():
    dialogs = [
        EncodedDialog([1, 2, 3, 4, 5, 6, 7], [F, T, T, T, T, T, T]),
        EncodedDialog([8, 9, 10, 11, 12, 13], [F, F, F, F, F, T]),  # the answer lies beyond seq_len + 1 tokens
    ]
    with pytest.warns(UserWarning) as caught:
        packed = pack_dialogs(dialogs, seq_len=4, pad_id=PAD)
    assert len(caught) == 2
    assert "2 of 2 conversations are longer than seq_len + 1 = 5 tokens and were truncated" in str(caught[0].message)
    assert "1 of 2 conversations have no trained target" in str(caught[1].message)
    np.testing.assert_array_equal(packed.tokens, [[1, 2, 3, 4]])
    np.testing.assert_array_equal(packed.targets, [[2, 3, 4, 5]])
    with pytest.raises(DataError, match="none of the 1 conversations"), pytest.warns(UserWarning):
        pack_dialogs([dialogs[1]], seq_len=4, pad_id=PAD)


def numbered_conversations(count: int) -> list[list[Message]]:
    """Conversations of varied length whose first user message names them, so rows can be traced back."""
    return [
        [Message("user", f"#{index}")] + [Message("assistant", "a" * (index % 7))]
        + [Message(role, "xy" * (index % 3)) for _ in range(index % 3) for role in ("user", "assistant")]
        for index in range(count)
    ]


def unpack(packed: PackedRows) -> list[tuple[list[int], list[bool]]]:
    """Each conversation of each row back as (tokens, mask) from its inputs plus its final target."""
    pieces = []
    for row in range(packed.tokens.shape[0]):
        for segment in range(1, packed.segment_ids[row].max() + 1):
            where = np.flatnonzero(packed.segment_ids[row] == segment)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1)), "a conversation is not contiguous"
            np.testing.assert_array_equal(packed.positions[row, where], np.arange(len(where)))
            tokens = [*packed.tokens[row, where].tolist(), int(packed.targets[row, where[-1]])]
            pieces.append((tokens, packed.loss_mask[row, where].tolist()))
        padding = packed.segment_ids[row] == 0
        assert not packed.loss_mask[row, padding].any()
        if padding.any():
            assert padding[np.argmax(padding):].all(), "padding only at the end of a row"
    return pieces


@pytest.mark.parametrize("style, tokenizer", [("llama2", LLAMA2), ("llama3", LLAMA3)])
def test_batches_keep_every_conversation_whole_once_per_epoch(style, tokenizer):
    dialogs = [encode_dialog(c, tokenizer, style, for_generation=False) for c in numbered_conversations(40)]
    seq_len = max(len(d.tokens) for d in dialogs) + 5
    batches = PackedSFTBatches(dialogs, seq_len=seq_len, batch_size=1, pad_id=PAD, seed=3)
    rows = [batches.batch(step) for step in range(len(batches.epoch_rows(0)))]
    assert len(rows) < len(dialogs)  # rows do hold several conversations
    pieces = [piece for packed in rows for piece in unpack(packed)]
    expected = {tuple(d.tokens): d.loss_mask[1:] for d in dialogs}
    seen = [tuple(tokens) for tokens, _ in pieces]
    for tokens, mask in pieces:
        assert expected[tuple(tokens)] == mask  # whole, in order, with its own mask shifted onto targets
    assert sorted(seen) == sorted(expected)  # each conversation exactly once in the epoch


def test_batch_is_a_pure_function_of_seed_and_step():
    dialogs = [encode_dialog(c, LLAMA3, "llama3", for_generation=False) for c in numbered_conversations(30)]
    make = lambda seed: PackedSFTBatches(dialogs, seq_len=96, batch_size=4, pad_id=PAD, seed=seed)  # noqa: E731
    in_order, out_of_order, other_seed = make(7), make(7), make(8)
    sequential = [in_order.batch(step) for step in range(12)]  # several epochs
    for step in [11, 0, 5, 3]:
        assert_packed_equal(out_of_order.batch(step), sequential[step])
    assert not np.array_equal(other_seed.batch(0).tokens, sequential[0].tokens)
    assert in_order.epoch_rows(0) != in_order.epoch_rows(1)  # reshuffled per epoch
    halves = [in_order.batch(6, process_index=i, process_count=2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h.tokens for h in halves]), sequential[6].tokens)


def assert_packed_equal(actual: PackedRows, expected: PackedRows) -> None:
    for name in ("tokens", "targets", "loss_mask", "segment_ids", "positions"):
        np.testing.assert_array_equal(getattr(actual, name), getattr(expected, name), err_msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Ghost Attention

PIRATE = "Always answer as a pirate."
THREE_TURNS = [
    Message("user", "Where is Paris?"),
    Message("assistant", "In France."),
    Message("user", "And Rome?"),
    Message("assistant", "In Italy."),
    Message("user", "Thanks"),
    Message("assistant", "You are welcome."),
]


def test_gatt_sample_keeps_instruction_in_first_user_turn_and_trains_only_last_answer():
    sample = gatt_sample([Message("system", "You help."), *THREE_TURNS], PIRATE)
    assert sample.messages == [
        Message("system", "You help."),
        Message("user", "Always answer as a pirate.\n\nWhere is Paris?"),
        Message("assistant", "In France.", train=False),
        Message("user", "And Rome?"),
        Message("assistant", "In Italy.", train=False),
        Message("user", "Thanks"),
        Message("assistant", "You are welcome."),
    ]
    assert sample.train_flags == [False, False, False, False, False, False, True]


@pytest.mark.parametrize("style, tokenizer", [("llama2", LLAMA2), ("llama3", LLAMA3)])
def test_gatt_mask_covers_only_the_last_answer(style, tokenizer):
    encoded = encode_dialog(gatt_sample(THREE_TURNS, PIRATE).messages, tokenizer, style, for_generation=False)
    trained = [t for t, m in zip(encoded.tokens, encoded.loss_mask) if m]
    assert trained == (llama2_text(" You are welcome. ") + [EOS2] if style == "llama2"
                       else llama3_text("You are welcome.") + [EOT])
    # The instruction is in the context once, before the first question.
    text = tokenizer.decode(encoded.tokens)
    assert text.count(PIRATE) == 1 and text.index(PIRATE) < text.index("Where is Paris?")


def test_gatt_answers_are_sampled_with_the_instruction_on_every_user_turn():
    seen: list[list[Message]] = []

    def pirate_model(messages: list[Message]) -> str:
        seen.append(messages)
        return f"Arr #{len(seen)}"

    questions = [Message("user", "Where is Paris?"), Message("assistant", "ignored"), Message("user", "And Rome?")]
    sample = gatt_sample(questions, PIRATE, answer_fn=pirate_model)
    assert seen == [
        [Message("user", f"{PIRATE}\n\nWhere is Paris?")],
        [Message("user", f"{PIRATE}\n\nWhere is Paris?"), Message("assistant", "Arr #1"),
         Message("user", f"{PIRATE}\n\nAnd Rome?")],
    ]
    assert sample.messages == [
        Message("user", f"{PIRATE}\n\nWhere is Paris?"),
        Message("assistant", "Arr #1", train=False),
        Message("user", "And Rome?"),
        Message("assistant", "Arr #2"),
    ]
    assert gatt_sampling_dialog(THREE_TURNS, PIRATE)[2::2] == [
        Message("user", f"{PIRATE}\n\nAnd Rome?"), Message("user", f"{PIRATE}\n\nThanks")]


def test_gatt_without_answers_needs_a_final_answer():
    with pytest.raises(ChatFormatError, match="ends on a 'user' message"):
        gatt_sample(THREE_TURNS[:3], PIRATE)
    with pytest.raises(ChatFormatError, match="instruction is empty"):
        gatt_sample(THREE_TURNS, "  ")


def test_gatt_command_line_round_trip(tmp_path):
    source = tmp_path / "chats.jsonl"
    write_conversations(source, [THREE_TURNS, THREE_TURNS[:2]])
    sampling, answered, training = tmp_path / "sampling.jsonl", tmp_path / "answered.jsonl", tmp_path / "gatt.jsonl"
    assert main(["gatt-sampling", "--instruction", PIRATE, str(source), str(sampling)]) == 0
    dialogs = list(read_conversations(sampling))
    assert all(m.content.startswith(PIRATE) for d in dialogs for m in d if m.role == "user")
    # A model re-answers every turn of the sampling dialogs; here, a pirate who says the same.
    write_conversations(answered, [[Message(m.role, "Arr!") if m.role == "assistant" else m for m in d]
                                   for d in dialogs])
    assert main(["gatt", "--from-sampling", "--instruction", PIRATE, str(answered), str(training)]) == 0
    lines = [json.loads(line) for line in training.read_text(encoding="utf-8").splitlines()]
    assert lines[0] == {"messages": [
        {"role": "user", "content": f"{PIRATE}\n\nWhere is Paris?"},
        {"role": "assistant", "content": "Arr!", "train": False},
        {"role": "user", "content": "And Rome?"},
        {"role": "assistant", "content": "Arr!", "train": False},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Arr!"},
    ]}
    assert lines[1] == {"messages": [{"role": "user", "content": f"{PIRATE}\n\nWhere is Paris?"},
                                     {"role": "assistant", "content": "Arr!"}]}
    # Without --from-sampling the answers are taken as they are and the instruction added to the first turn only.
    assert main(["gatt", "--instruction", PIRATE, str(source), str(training)]) == 0
    assert [m.content for m in next(read_conversations(training))][:3] == [
        f"{PIRATE}\n\nWhere is Paris?", "In France.", "And Rome?"]


def test_gatt_script_reports_the_bad_line_and_writes_nothing(tmp_path):
    source = write_lines(tmp_path / "chats.jsonl", [GOOD_LINE, GOOD_LINE])
    output = tmp_path / "gatt.jsonl"
    with pytest.raises(ChatFormatError, match=re.escape(f"{source}:1: message 1 (user) does not start with the GAtt")):
        main(["gatt", "--from-sampling", "--instruction", PIRATE, str(source), str(output)])
    assert not output.exists() and not list(tmp_path.glob("*.partial"))
    result = subprocess.run(
        [sys.executable, "-m", "train.gatt", "gatt", "--instruction", PIRATE, str(source), str(output)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert len(list(read_conversations(output))) == 2
    write_lines(source, [GOOD_LINE, '{"messages": [{"role": "user", "content": "q"}]}'])
    result = subprocess.run(
        [sys.executable, "-m", "train.gatt", "gatt", "--instruction", PIRATE, str(source), str(output)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {source}:2: conversation ends on a 'user' message")


@pytest.mark.parametrize("old", [["-m", "scripts.gatt"], ["-m", "llama_jax.chat", "gatt"]])
def test_the_old_gatt_commands_name_the_new_one(old, tmp_path):
    result = subprocess.run([sys.executable, *old, "--instruction", PIRATE, "in.jsonl", "out.jsonl"],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: `python {' '.join(old[:2])}` is now `python -m train.gatt`"]
