"""Tokenizer tests: SentencePiece training and round trips, Llama 3 special-token layout, and Meta's real
Llama 3 file checked against Meta's own reference code and against Hugging Face's converter."""
from __future__ import annotations

import base64
import hashlib
import importlib.util
from pathlib import Path

import pytest

from llama_jax.errors import TokenizerError
from llama_jax.tokenizer import Llama3Tokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece

TRAINING_TEXT = "\n".join(
    f"def function_{i}(value):\n    return value * {i} + len('alpha beta gamma delta')\n"
    f"class Thing{i}:\n    '''A small thing numbered {i}.'''\n"
    for i in range(300)
)
ROUND_TRIP_TEXTS = [
    "hello world",
    "    indented line\n\ttabbed = 12345\n",
    " leading space and trailing spaces  ",
    "ünïcødé and an emoji 😀 and CJK 漢字",
    "",
    "\n\n\n",
]


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> SentencePieceTokenizer:
    return train_sentencepiece([TRAINING_TEXT], tmp_path_factory.mktemp("sp") / "tiny.model", vocab_size=400)


# ---------------------------------------------------------------- SentencePiece


def test_sentencepiece_ids_follow_llama2(sentencepiece_model):
    assert sentencepiece_model.vocab_size == 400
    assert (sentencepiece_model.bos_id, sentencepiece_model.eos_id) == (1, 2)
    assert sentencepiece_model.special_id("<s>") == 1
    assert sentencepiece_model.special_id("</s>") == 2
    assert sentencepiece_model.special_id("<unk>") == 0
    assert sentencepiece_model.stop_ids == frozenset({2})
    # Byte pieces follow the three control pieces, as in Llama 2: <0x0A> (newline) is id 3 + 10.
    assert sentencepiece_model.piece(13) == "<0x0A>"


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_sentencepiece_round_trip(sentencepiece_model, text):
    assert sentencepiece_model.decode(sentencepiece_model.encode(text)) == text


def test_sentencepiece_framing_and_pad(sentencepiece_model):
    plain = sentencepiece_model.encode("hello")
    assert sentencepiece_model.encode("hello", bos=True, eos=True) == [1, *plain, 2]
    assert sentencepiece_model.pad_id not in sentencepiece_model.encode(TRAINING_TEXT[:2000] + "😀")


def test_sentencepiece_byte_fallback_and_digit_split(sentencepiece_model):
    # 😀 is U+1F600, UTF-8 bytes F0 9F 98 80; it never occurs in training, so it must fall back to bytes.
    pieces = [sentencepiece_model.piece(i) for i in sentencepiece_model.encode("😀")]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    digit_pieces = [sentencepiece_model.piece(i) for i in sentencepiece_model.encode("x = 987654")]
    text_pieces = [piece for piece in digit_pieces if not piece.startswith("<0x")]
    assert "".join(text_pieces).count("9") == 1
    assert all(sum(ch.isdigit() for ch in piece) <= 1 for piece in text_pieces)


def test_sentencepiece_training_is_deterministic(tmp_path, sentencepiece_model):
    again = train_sentencepiece([TRAINING_TEXT], tmp_path / "again.model", vocab_size=400)
    assert again.fingerprint() == sentencepiece_model.fingerprint()


def test_load_sentencepiece_and_fingerprint_is_file_hash(sentencepiece_model):
    loaded = load_tokenizer(sentencepiece_model.path)
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.fingerprint() == hashlib.sha256(Path(sentencepiece_model.path).read_bytes()).hexdigest()
    assert loaded.encode("hello world") == sentencepiece_model.encode("hello world")


def test_training_from_files(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text(TRAINING_TEXT, encoding="utf-8")
    from_file = train_sentencepiece([source], tmp_path / "from_file.model", vocab_size=400)
    assert from_file.decode(from_file.encode("class Thing7:")) == "class Thing7:"


def test_vocab_too_small_is_a_tokenizer_error(tmp_path):
    with pytest.raises(TokenizerError, match="small.model"):
        train_sentencepiece([TRAINING_TEXT], tmp_path / "small.model", vocab_size=100)  # < 3 + 256 bytes


# ---------------------------------------------------------------- errors


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(TokenizerError, match="nope.model"):
        load_tokenizer(missing)


def test_garbage_file_names_path(tmp_path):
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00\xffnot a model at all\x13\x37" * 10)
    with pytest.raises(TokenizerError, match="garbage.model"):
        load_tokenizer(garbage)


def test_empty_file_names_path(tmp_path):
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(TokenizerError, match="empty.model"):
        load_tokenizer(empty)


def test_malformed_rank_file_names_path_and_line(tmp_path):
    bad = tmp_path / "ranks.model"
    bad.write_text("IQ== 0\nthis line is wrong\n")
    with pytest.raises(TokenizerError, match=r"ranks.model:2"):
        load_tokenizer(bad)


def test_decode_out_of_vocabulary_id(sentencepiece_model):
    with pytest.raises(TokenizerError, match="400"):
        sentencepiece_model.decode([5, 400])


def test_unknown_special_token_is_named(sentencepiece_model):
    with pytest.raises(TokenizerError, match="<|eot_id|>"):
        sentencepiece_model.special_id("<|eot_id|>")


# ---------------------------------------------------------------- Llama 3 layout on a tiny rank file


@pytest.fixture(scope="module")
def tiny_rank_file(tmp_path_factory) -> Path:
    """256 single bytes (rank = byte value), then merges 'ab' = 256 and ' ab' = 257."""
    tokens = [bytes([b]) for b in range(256)] + [b"ab", b" ab"]
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


def test_tiny_rank_file_special_layout(tiny_rank_file):
    tokenizer = load_tokenizer(tiny_rank_file)
    assert isinstance(tokenizer, Llama3Tokenizer)
    n = 258  # regular tokens; specials follow
    assert tokenizer.vocab_size == n + 256
    assert (tokenizer.bos_id, tokenizer.eos_id) == (n, n + 1)
    assert tokenizer.special_id("<|start_header_id|>") == n + 6
    assert tokenizer.special_id("<|end_header_id|>") == n + 7
    assert tokenizer.special_id("<|eot_id|>") == n + 9
    assert tokenizer.special_id("<|reserved_special_token_245|>") == n + 255  # Meta: 12 named, then reserved 2..245
    assert tokenizer.stop_ids >= {n + 1, n + 9}


def test_tiny_rank_file_bpe_by_hand(tiny_rank_file):
    tokenizer = load_tokenizer(tiny_rank_file)
    # Pre-tokenized as "ab", " ab", "c"; then BPE merges a+b (256) and ' '+ab (257).
    assert tokenizer.encode("ab abc", bos=True) == [258, 256, 257, ord("c")]
    assert tokenizer.decode([256, 257]) == "ab ab"


def test_special_token_text_is_ordinary_text(tiny_rank_file):
    tokenizer = load_tokenizer(tiny_rank_file)
    ids = tokenizer.encode("<|eot_id|>")
    assert tokenizer.special_id("<|eot_id|>") not in ids
    assert ids == list(b"<|eot_id|>")
    assert tokenizer.decode(ids) == "<|eot_id|>"


def test_model_directory_is_accepted(tiny_rank_file):
    assert load_tokenizer(tiny_rank_file.parent).vocab_size == 258 + 256


# ---------------------------------------------------------------- Meta's real Llama 3 tokenizer

LLAMA3_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 2024-06-01; I'll pay $1,234,567.89!",
    "    def f(x):\n        return x ** 2\n\n\n# comment\r\n",
    "Ünïcödé — 漢字かな交じり文 😀👍🏽 مرحبا",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|> literal text, not specials",
    "a" * 30_000 + " " * 30_000 + "b",  # runs past tiktoken's regex limit: cut as Meta cuts them
]


@pytest.fixture(scope="module")
def llama3_file() -> Path:
    # llama-models (a pinned test dependency) ships Meta's Llama 3 tokenizer file.
    package_dir = Path(importlib.util.find_spec("llama_models").submodule_search_locations[0])
    path = package_dir / "llama3" / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"llama-models has no {path}")
    return path


@pytest.fixture(scope="module")
def llama3(llama3_file) -> Llama3Tokenizer:
    return load_tokenizer(llama3_file)


def test_llama3_known_ids(llama3):
    assert llama3.vocab_size == 128_256
    assert (llama3.bos_id, llama3.eos_id) == (128_000, 128_001)
    assert llama3.special_id("<|start_header_id|>") == 128_006
    assert llama3.special_id("<|end_header_id|>") == 128_007
    assert llama3.special_id("<|eot_id|>") == 128_009
    assert {128_001, 128_009} <= llama3.stop_ids
    assert llama3.encode("Hello world", bos=True) == [128_000, 9906, 1917]


def test_llama3_matches_meta_reference(llama3, llama3_file):
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    meta = MetaTokenizer(llama3_file)
    for text in LLAMA3_TEXTS:
        assert llama3.encode(text, bos=True, eos=True) == meta.encode(text, bos=True, eos=True), text[:40]
    assert {token: llama3.special_id(token) for token in meta.special_tokens} == meta.special_tokens
    assert llama3.pad_id == meta.pad_id
    assert llama3.stop_ids == frozenset(meta.stop_tokens)


def test_llama3_matches_hugging_face_conversion(llama3, llama3_file):
    """A second BPE engine (Rust `tokenizers`) and transformers' own copy of the pre-tokenizer regex."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    reference = TikTokenConverter(vocab_file=str(llama3_file)).converted()
    for text in LLAMA3_TEXTS[:5]:
        assert llama3.encode(text) == reference.encode(text, add_special_tokens=False).ids, text[:40]


@pytest.mark.parametrize("text", LLAMA3_TEXTS)
def test_llama3_round_trip(llama3, text):
    assert llama3.decode(llama3.encode(text)) == text


def test_llama3_encode_batch_matches_encode(llama3):
    assert llama3.encode_batch(LLAMA3_TEXTS) == [llama3.encode(text) for text in LLAMA3_TEXTS]


def test_llama3_store_arrays_match_meta(llama3, llama3_file):
    """The ids a token store writes (numpy, straight from tiktoken, special-token text taken as text, long runs cut)
    are Meta's."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    meta = MetaTokenizer(llama3_file)
    arrays = llama3.encode_batch_arrays(LLAMA3_TEXTS + [""])
    assert [array.tolist() for array in arrays] == [meta.encode(text, bos=False, eos=False)
                                                    for text in LLAMA3_TEXTS + [""]]
