"""Preference pairs and prompts (llama_jax/preference_data.py): TRL's row formats, Llama 2's margin table, rendering
as train.sft renders a conversation, deterministic pair batches, and errors that name the file and line.

References are independent of the code under test: expected messages and margins are written out by hand (Llama 2's
"margin small": 1, 2/3, 1/3, 0), Llama 2 token ids come from the `sentencepiece` processor on Meta's prompt text,
Llama 3 ids are spelled out from Meta's ChatFormat on a byte-level rank file (byte b is id b), and batches are checked
against the pairs they were built from.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from llama_jax.chat_format import EncodedDialog, Message, dialog_prompt, encode_dialog
from llama_jax.config import RewardConfig
from llama_jax.errors import DataError
from llama_jax.preference_data import (
    EncodedPair,
    PairBatches,
    encode_answer,
    encode_pairs,
    read_preferences,
    read_prompts,
)

MARGINS = RewardConfig().margins
LLAMA2_MARGIN_SMALL = {"significantly better": 1.0, "better": 2 / 3, "slightly better": 1 / 3,
                       "negligibly better": 0.0}


def write_jsonl(path: Path, rows: list) -> Path:
    """One line per row: a str is written verbatim (bad lines, blank lines), anything else as JSON."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def read_one(tmp_path: Path, row, margins=MARGINS):
    (pair,) = read_preferences(write_jsonl(tmp_path / "pairs.jsonl", [row]), margins)
    return pair


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# ── Tokenizers ──────────────────────────────────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def sp_path(tmp_path_factory) -> Path:
    from llama_jax.tokenizer import train_sentencepiece

    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    text = [f"Say hello to the quick brown fox number {i}. The lazy dog jumps over it {i} times!" for i in range(60)]
    train_sentencepiece(text, path, vocab_size=320)
    return path


@pytest.fixture(scope="module")
def sp(sp_path):
    from llama_jax.tokenizer import load_tokenizer

    return load_tokenizer(sp_path)


@pytest.fixture(scope="module")
def sp_raw(sp_path):
    """The plain sentencepiece processor: the reference for Llama 2 ids."""
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(sp_path))


@pytest.fixture(scope="module")
def llama3_tok(tmp_path_factory):
    """A Llama 3 tokenizer whose 256 regular tokens are the single bytes (byte b is id b), specials at 256.."""
    from llama_jax.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return load_tokenizer(path)


# Meta's llama3 special-token order: begin_of_text, end_of_text, reserved 0, reserved 1, finetune_right_pad_id,
# reserved 2, start_header_id, end_header_id, eom_id, eot_id.
BEGIN, START_HEADER, END_HEADER, EOT = 256, 256 + 6, 256 + 7, 256 + 9


def ids3(text: str) -> list[int]:
    return list(text.encode())


def header3(role: str) -> list[int]:
    return [START_HEADER, *ids3(role), END_HEADER, *ids3("\n\n")]


# ── 1. Row formats ──────────────────────────────────────────────────────────────────────────────────────────────
def test_standard_format(tmp_path):
    pair = read_one(tmp_path, {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"})
    assert pair.prompt == (Message("user", "What is 2+2?"),)
    assert (pair.chosen, pair.rejected) == ("4", "5")
    assert (pair.margin, pair.strength, pair.safety) == (0.0, None, False)
    assert pair.where == f"{(tmp_path / 'pairs.jsonl').resolve()}:1"


def test_conversational_format(tmp_path):
    row = {"prompt": [{"role": "system", "content": "Be brief."}, user("Hi")],
           "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")], "safety": True}
    pair = read_one(tmp_path, row)
    assert pair.prompt == (Message("system", "Be brief."), Message("user", "Hi"))
    assert (pair.chosen, pair.rejected, pair.safety) == ("Hello!", "Go away.", True)


def test_implicit_prompt_conversational_format(tmp_path):
    shared = [user("Hi"), assistant("Hello!"), user("2+2?")]
    pair = read_one(tmp_path, {"chosen": [*shared, assistant("4")], "rejected": [*shared, assistant("22")]})
    # The earlier assistant turn is context: kept, not trained on.
    assert pair.prompt == (Message("user", "Hi"), Message("assistant", "Hello!", train=False), Message("user", "2+2?"))
    assert (pair.chosen, pair.rejected) == ("4", "22")


def test_multi_turn_prompt_assistant_turns_are_context(tmp_path):
    row = {"prompt": [user("Hi"), assistant("Hello!"), user("Name a color"), assistant("Red"), user("Another")],
           "chosen": [assistant("Blue")], "rejected": [assistant("Red")]}
    pair = read_one(tmp_path, row)
    assert pair.prompt == (Message("user", "Hi"), Message("assistant", "Hello!", train=False),
                           Message("user", "Name a color"), Message("assistant", "Red", train=False),
                           Message("user", "Another"))
    assert (pair.chosen, pair.rejected) == ("Blue", "Red")


def test_several_rows_keep_their_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, "",
                                                  {"prompt": "d", "chosen": "e", "rejected": "f"}])
    pairs = read_preferences(path, MARGINS)
    assert [(p.prompt[0].content, p.where) for p in pairs] == [("a", f"{path.resolve()}:1"),
                                                                ("d", f"{path.resolve()}:3")]


# ── 2. Margins ──────────────────────────────────────────────────────────────────────────────────────────────────
def test_default_table_is_llama2_margin_small():
    assert MARGINS == pytest.approx(LLAMA2_MARGIN_SMALL)


def test_explicit_margin(tmp_path):
    pair = read_one(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 3})
    assert pair.margin == 3.0 and isinstance(pair.margin, float) and pair.strength is None
    assert read_one(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 0.25}).margin == 0.25


@pytest.mark.parametrize("label, canonical, margin", [
    ("significantly better", "significantly better", 1.0),
    ("better", "better", 2 / 3),
    ("slightly better", "slightly better", 1 / 3),
    ("negligibly better", "negligibly better", 0.0),
    ("significantly_better", "significantly better", 1.0),
    ("Slightly_Better", "slightly better", 1 / 3),
    ("SIGNIFICANTLY BETTER", "significantly better", 1.0),
    ("  Better ", "better", 2 / 3),
    ("unsure", "negligibly better", 0.0),
    ("Unsure", "negligibly better", 0.0),
    ("negligibly_better", "negligibly better", 0.0),
])
def test_strength_labels(tmp_path, label, canonical, margin):
    pair = read_one(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b", "strength": label})
    assert pair.strength == canonical
    assert pair.margin == pytest.approx(margin, abs=1e-12)


def test_no_margin_nor_strength_is_zero(tmp_path):
    pair = read_one(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b"})
    assert (pair.margin, pair.strength) == (0.0, None)


def test_custom_table_is_used(tmp_path):
    margins = RewardConfig(margin_better=2.0, margin_significantly_better=5.0).margins
    assert read_one(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b", "strength": "better"},
                    margins).margin == 2.0
    assert read_one(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b", "strength": "significantly_better"},
                    margins).margin == 5.0
    assert read_one(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b", "strength": "slightly better"},
                    margins).margin == pytest.approx(1 / 3)


# ── 3. Rendering ────────────────────────────────────────────────────────────────────────────────────────────────
def test_llama2_rendering_matches_sft_and_masks_the_answer_only(sp, sp_raw):
    prompt = (Message("user", "Say hello to the fox"),)
    answer = "The lazy dog jumps over it"
    encoded = encode_answer(prompt, answer, sp, "llama2")
    # What train.sft trains on.
    sft = encode_dialog([*prompt, Message("assistant", answer)], sp, "llama2", for_generation=False)
    assert encoded.tokens == sft.tokens and encoded.loss_mask == sft.loss_mask
    # Meta's chat_completion, by hand: BOS + "[INST] {user} [/INST] {answer} " + EOS, one encode call.
    expected = [sp_raw.bos_id(), *sp_raw.encode(f"[INST] {prompt[0].content} [/INST] {answer} "), sp_raw.eos_id()]
    assert encoded.tokens == expected
    prefix = [sp_raw.bos_id(), *sp_raw.encode(f"[INST] {prompt[0].content} [/INST]")]
    assert dialog_prompt(prompt, sp, "llama2") == prefix
    assert encoded.tokens[:len(prefix)] == prefix
    assert encoded.loss_mask == [False] * len(prefix) + [True] * (len(expected) - len(prefix))
    assert encoded.tokens[-1] == sp_raw.eos_id() and encoded.loss_mask[-1]


def test_llama2_multi_turn_masks_only_the_final_answer(tmp_path, sp, sp_raw):
    row = {"prompt": [{"role": "system", "content": "Be brief."}, user("Say hello"), assistant("hello fox"),
                      user("Again")], "chosen": [assistant("hello dog")], "rejected": [assistant("no")]}
    pair = read_one(tmp_path, row)
    encoded = encode_answer(pair.prompt, pair.chosen, sp, "llama2")
    first = [sp_raw.bos_id(), *sp_raw.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nSay hello [/INST] hello fox "),
             sp_raw.eos_id()]
    second_prompt = [sp_raw.bos_id(), *sp_raw.encode("[INST] Again [/INST]")]
    second = [sp_raw.bos_id(), *sp_raw.encode("[INST] Again [/INST] hello dog "), sp_raw.eos_id()]
    assert second[:len(second_prompt)] == second_prompt
    assert encoded.tokens == first + second
    assert encoded.loss_mask == [False] * (len(first) + len(second_prompt)) + [True] * (
        len(second) - len(second_prompt))
    assert dialog_prompt(pair.prompt, sp, "llama2") == first + second_prompt
    # train.sft's rendering of the same conversation (with the context turn untrained) is identical.
    sft = encode_dialog([*pair.prompt, Message("assistant", pair.chosen)], sp, "llama2", for_generation=False)
    assert (encoded.tokens, encoded.loss_mask) == (sft.tokens, sft.loss_mask)


def test_llama3_rendering_matches_meta_chat_format(tmp_path, llama3_tok):
    assert (llama3_tok.special_id("<|begin_of_text|>"), llama3_tok.special_id("<|eot_id|>")) == (BEGIN, EOT)
    row = {"prompt": [user("Hi"), assistant("Hello!"), user("2+2?")],
           "chosen": [assistant(" 4\n")], "rejected": [assistant("5")]}
    pair = read_one(tmp_path, row)
    encoded = encode_answer(pair.prompt, pair.chosen, llama3_tok, "llama3")
    context = ([BEGIN] + header3("user") + ids3("Hi") + [EOT] + header3("assistant") + ids3("Hello!") + [EOT]
               + header3("user") + ids3("2+2?") + [EOT] + header3("assistant"))
    answer = ids3("4") + [EOT]
    assert encoded.tokens == context + answer
    assert encoded.loss_mask == [False] * len(context) + [True] * len(answer)
    assert dialog_prompt(pair.prompt, llama3_tok, "llama3") == context
    sft = encode_dialog([*pair.prompt, Message("assistant", pair.chosen)], llama3_tok, "llama3",
                        for_generation=False)
    assert (encoded.tokens, encoded.loss_mask) == (sft.tokens, sft.loss_mask)


# ── 4. PairBatches ──────────────────────────────────────────────────────────────────────────────────────────────
def synthetic_pairs(count: int) -> list[EncodedPair]:
    """Pair i: chosen of length 3 + i % 4 filled with 100 + i, rejected of length 2 + i % 3 filled with 300 + i,
    masks 0 on the first token; margin i / 4."""
    pairs = []
    for i in range(count):
        chosen_len, rejected_len = 3 + i % 4, 2 + i % 3
        chosen = EncodedDialog([100 + i] * chosen_len, [False] + [True] * (chosen_len - 1))
        rejected = EncodedDialog([300 + i] * rejected_len, [False] + [True] * (rejected_len - 1))
        pairs.append(EncodedPair(chosen, rejected, i / 4))
    return pairs


def test_pair_batches_content_padding_and_dtypes():
    seq_len, pad = 8, 7
    batches = PairBatches(synthetic_pairs(12), seq_len=seq_len, batch_size=4, pad_id=pad, seed=3)
    batch = batches.batch(0)
    assert set(batch) == {"chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask", "margin"}
    assert batch["margin"].dtype == np.float32 and batch["margin"].shape == (4,)
    assert batch["chosen_tokens"].dtype == np.int32 and batch["chosen_tokens"].shape == (4, seq_len)
    for row in range(4):
        i = int(batch["chosen_tokens"][row, 0]) - 100
        assert batch["margin"][row] == np.float32(i / 4)
        for side, base, length in (("chosen", 100, 3 + i % 4), ("rejected", 300, 2 + i % 3)):
            tokens, mask = batch[f"{side}_tokens"][row], batch[f"{side}_mask"][row]
            np.testing.assert_array_equal(tokens, [base + i] * length + [pad] * (seq_len - length))
            np.testing.assert_array_equal(mask, [0] + [1] * (length - 1) + [0] * (seq_len - length))


def test_pair_batches_deterministic_and_each_pair_once_per_epoch():
    pairs = synthetic_pairs(12)
    first = PairBatches(pairs, seq_len=8, batch_size=4, pad_id=0, seed=5)
    second = PairBatches(list(pairs), seq_len=8, batch_size=4, pad_id=0, seed=5)
    assert first.batches_per_epoch == 3
    epochs = []
    for epoch in range(2):
        seen = []
        for step in range(epoch * 3, epoch * 3 + 3):
            a, b = first.batch(step), second.batch(step)
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
            seen += [int(t) - 100 for t in a["chosen_tokens"][:, 0]]
            assert sorted(a["margin"].tolist()) == sorted(pairs[i].margin for i in seen[-4:])
        assert sorted(seen) == list(range(12))  # every pair exactly once
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a fresh order each epoch
    other_seed = PairBatches(pairs, seq_len=8, batch_size=4, pad_id=0, seed=6)
    assert [int(t) for step in range(3) for t in other_seed.batch(step)["chosen_tokens"][:, 0]] != [
        100 + i for i in epochs[0]]


def test_pair_batches_split_across_processes():
    batches = PairBatches(synthetic_pairs(12), seq_len=8, batch_size=4, pad_id=0, seed=1)
    for step in range(4):
        whole = batches.batch(step)
        parts = [batches.batch(step, process_index=p, process_count=2) for p in range(2)]
        for part in parts:
            assert part["chosen_tokens"].shape == (2, 8)
        first_ids = {int(t) for t in parts[0]["chosen_tokens"][:, 0]}
        second_ids = {int(t) for t in parts[1]["chosen_tokens"][:, 0]}
        assert not first_ids & second_ids
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([parts[0][key], parts[1][key]]), whole[key])


def test_pair_batches_batch_larger_than_pairs():
    with pytest.raises(DataError, match="batch_size=5"):
        PairBatches(synthetic_pairs(4), seq_len=8, batch_size=5, pad_id=0, seed=0)


def test_pair_batches_from_files_end_to_end(tmp_path, sp):
    rows = [{"prompt": f"Say hello to fox {i}", "chosen": f"hello fox {i}", "rejected": "no", "strength": "better"}
            for i in range(4)]
    pairs = encode_pairs(read_preferences(write_jsonl(tmp_path / "p.jsonl", rows), MARGINS), sp, "llama2", 64)
    batch = PairBatches(pairs, seq_len=64, batch_size=4, pad_id=sp.pad_id, seed=0).batch(0)
    np.testing.assert_allclose(batch["margin"], [2 / 3] * 4, rtol=1e-6)
    for row in range(4):
        tokens, mask = batch["rejected_tokens"][row], batch["rejected_mask"][row]
        end = int(np.flatnonzero(tokens == sp.eos_id)[-1]) + 1
        assert (tokens[end:] == sp.pad_id).all() and not mask[end:].any() and mask[end - 1] == 1


# ── 5. Bad input ────────────────────────────────────────────────────────────────────────────────────────────────
GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("bad, words", [
    ({"prompt": "p", "rejected": "b"}, "'chosen'"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "same answer"),
    ({"prompt": [user("p")], "chosen": [assistant("x")], "rejected": [assistant("x")]}, "same answer"),
    ({**GOOD, "strength": "much better"}, "unknown strength 'much better'"),
    ({**GOOD, "strength": 2}, "unknown strength 2"),
    ({"prompt": [user("p")], "chosen": [user("x")], "rejected": [assistant("y")]}, "chosen must be one assistant"),
    ({"chosen": [user("p"), user("x")], "rejected": [user("p"), assistant("y")]}, "chosen must be one assistant"),
    ({"prompt": [user("p")], "chosen": [assistant("x"), assistant("z")], "rejected": [assistant("y")]},
     "chosen must be one assistant"),
    ({"chosen": [user("p"), assistant("x")], "rejected": [user("q"), assistant("y")]}, "share every turn"),
    ({"prompt": [user("p"), assistant("a")], "chosen": [assistant("x")], "rejected": [assistant("y")]},
     "ends on a 'assistant'"),
    ({**GOOD, "margin": 1, "strength": "better"}, "not both"),
    ({**GOOD, "margin": "1"}, "not a finite number"),
    ({**GOOD, "margin": True}, "not a finite number"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}', "not a finite number"),
    ({**GOOD, "safety": "yes"}, "safety"),
    ({"prompt": ["p"], "chosen": [assistant("x")], "rejected": [assistant("y")]}, "message 1"),
    ({"prompt": [user("p")], "chosen": "x", "rejected": [assistant("y")]}, "must both be strings or both message"),
    ({"prompt": [user("p")], "chosen": "x", "rejected": "y"}, "prompt must be a string"),
    ([1, 2], "expected a JSON object"),
    ('"just a string"', "expected a JSON object"),
    ('{"prompt": "p", "chosen": "a", "rejected": ', "not valid JSON"),
    ({**GOOD, "choosen": "a"}, "unknown keys ['choosen']"),
])
def test_bad_row_names_file_and_line(tmp_path, bad, words):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, "", bad, GOOD])  # the bad row is on line 3
    with pytest.raises(DataError) as error:
        read_preferences(path, MARGINS)
    message = str(error.value)
    assert re.search(r"pairs\.jsonl:3(:\d+)?: ", message), message
    assert words in message


def test_unknown_strength_lists_the_allowed_labels(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{**GOOD, "strength": "way better"}])
    with pytest.raises(DataError) as error:
        read_preferences(path, MARGINS)
    for label in ("significantly better", "'better'", "slightly better", "negligibly better", "unsure"):
        assert label in str(error.value)


def test_empty_file(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", ["", "  "])
    with pytest.raises(DataError, match=r"pairs\.jsonl: no preference pairs"):
        read_preferences(path, MARGINS)


def test_answers_that_render_identically_are_rejected(tmp_path):
    """Both chat formats render an answer's content.strip(), so answers that differ only in surrounding whitespace
    are the same token sequence: the pair says nothing, like identical answers (rejected for that reason)."""
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "Yes", "rejected": " Yes\n"}])
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: .*same answer"):
        read_preferences(path, MARGINS)


# ── read_prompts ────────────────────────────────────────────────────────────────────────────────────────────────
def test_read_prompts(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Tell me a joke"},
        "",
        {"prompt": [{"role": "system", "content": "Be safe."}, user("Hi"), assistant("Hello"), user("How to?")],
         "safety": True},
    ])
    first, second = read_prompts(path)
    assert first.messages == (Message("user", "Tell me a joke"),) and first.safety is False
    assert first.where == f"{path.resolve()}:1"
    assert second.messages == (Message("system", "Be safe."), Message("user", "Hi"),
                               Message("assistant", "Hello", train=False), Message("user", "How to?"))
    assert second.safety is True and second.where == f"{path.resolve()}:3"


@pytest.mark.parametrize("bad, words", [
    ({"prompt": [user("Hi"), assistant("Hello")]}, "ends on a 'assistant'"),
    ({"safety": True}, '"prompt"'),
    ({"prompt": 3}, "prompt is int"),
    ({"prompt": "Hi", "safty": True}, "unknown keys ['safty']"),
    ({"prompt": "Hi", "safety": 1}, "safety"),
    ('["Hi"]', '"prompt"'),
    ("{not json", "not valid JSON"),
])
def test_bad_prompt_names_file_and_line(tmp_path, bad, words):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "ok"}, bad])
    with pytest.raises(DataError) as error:
        read_prompts(path)
    message = str(error.value)
    assert re.search(r"prompts\.jsonl:2(:\d+)?: ", message), message
    assert words in message


def test_empty_prompt_file(tmp_path):
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(write_jsonl(tmp_path / "prompts.jsonl", [""]))


# ── 6. encode_pairs and seq_len ─────────────────────────────────────────────────────────────────────────────────
def test_encode_pairs_drops_long_pairs_with_one_warning(tmp_path, sp, sp_raw):
    rows = [{"prompt": "Say hello", "chosen": "hello fox", "rejected": "no", "margin": 0.5},
            {"prompt": "Say hello", "chosen": "The quick brown fox jumps over the lazy dog " * 3, "rejected": "no"},
            {"prompt": "Say hello", "chosen": "no", "rejected": "The quick brown fox jumps over the lazy dog " * 3},
            {"prompt": "Say hi", "chosen": "hi dog", "rejected": "no", "margin": 1.5}]
    pairs = read_preferences(write_jsonl(tmp_path / "pairs.jsonl", rows), MARGINS)
    short = [len(sp_raw.encode(f"[INST] {p} [/INST] {a} ")) + 2 for p, a in
             (("Say hello", "hello fox"), ("Say hello", "no"), ("Say hi", "hi dog"), ("Say hi", "no"))]
    long = len(sp_raw.encode("[INST] Say hello [/INST] " + ("The quick brown fox jumps over the lazy dog " * 3).strip()
                             + " ")) + 2
    seq_len = max(short)  # the longest kept pair fits exactly
    assert long > seq_len
    with pytest.warns(UserWarning) as record:
        encoded = encode_pairs(pairs, sp, "llama2", seq_len)
    assert len(record) == 1 and "2 of 4" in str(record[0].message) and f"seq_len={seq_len}" in str(record[0].message)
    assert [pair.margin for pair in encoded] == [0.5, 1.5]
    assert encoded[0].chosen.tokens == [sp_raw.bos_id(), *sp_raw.encode("[INST] Say hello [/INST] hello fox "),
                                        sp_raw.eos_id()]
    with pytest.raises(DataError, match=f"no preference pair fits in seq_len={min(short) - 1}"):
        with pytest.warns(UserWarning, match="4 of 4"):
            encode_pairs(pairs, sp, "llama2", min(short) - 1)
