"""Infilling (issue 22): Code Llama's prompt ids in both orders, the infilling pieces of a tokenizer, generation that
stops at ▁<EOT>, the FIM transform of training documents and its place in the token store, and the bad inputs.

References: prompt ids written by hand from single-character pieces, and Meta's rules applied literally to the raw
`sentencepiece` processor (codellama llama/tokenizer.py and llama/generation.py):

    encode_infilling(s) = sp.encode("☺" + s)[2:]          # no implicit leading space
    PSM = [bos, pre] + sp.encode(prefix) + [suf] + encode_infilling(suffix) + [mid]
    SPM = [bos, pre, suf] + encode_infilling(suffix) + [mid] + sp.encode(prefix)

and, for generation, a model programmed by hand to predict a chosen next token.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece
from flax import nnx
from sentencepiece import sentencepiece_model_pb2

from llama_jax.config import MODEL_PRESETS, load_config
from llama_jax.data import batch_for_step, build_store
from llama_jax.errors import ConfigError, TokenizerError
from llama_jax.generate import generate, infill
from llama_jax.infilling import FimTransform, infilling_prompt
from llama_jax.model import Llama
from llama_jax.pretraining_data import prepare_pretraining_data
from llama_jax.tokenizer import INFILLING_PIECES, SentencePieceTokenizer, train_sentencepiece

PIECES = ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")  # Code Llama's, in the order of their ids
# "☺" only ever follows a letter here, so it is a piece of its own and "▁☺" is not one, as in Code Llama's
# vocabulary: Meta's `[2:]` then cuts exactly the dummy prefix and the sentinel.
CODE = [f'def get_{name}(x{i}):\n    return "alpha beta" + x{i}  # ok☺done\nassert get_{name}(1) == {i}\n'
        for i, name in enumerate(["north", "south", "east", "west", "value", "count"] * 20)]


@pytest.fixture(scope="module")
def chars(tmp_path_factory) -> SentencePieceTokenizer:
    """Three characters and no merges (the vocabulary is exactly the required pieces): every id is hand-known."""
    return train_sentencepiece(["ab ba abba", "b a ab"], tmp_path_factory.mktemp("chars") / "chars.model",
                               vocab_size=3 + 256 + 3 + 4, infilling=True)


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> SentencePieceTokenizer:
    return train_sentencepiece(CODE, tmp_path_factory.mktemp("code") / "code.model", vocab_size=400, infilling=True)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> SentencePieceTokenizer:
    return train_sentencepiece(CODE, tmp_path_factory.mktemp("plain") / "plain.model", vocab_size=400)


def raw(tokenizer: SentencePieceTokenizer) -> sentencepiece.SentencePieceProcessor:
    """The file through sentencepiece alone, as Meta's Tokenizer opens it."""
    return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer.path))


def meta_encode_infilling(sp: sentencepiece.SentencePieceProcessor, text: str) -> list[int]:
    return sp.encode("☺" + text)[2:]


# ── The tokenizer's infilling pieces ────────────────────────────────────────────────────────────────────────────
def test_infilling_pieces_are_control_pieces_at_the_end(code):
    sp = raw(code)
    assert INFILLING_PIECES == PIECES
    assert code.vocab_size == sp.get_piece_size() == 400
    assert [sp.id_to_piece(i) for i in range(396, 400)] == list(PIECES)
    assert all(sp.is_control(i) for i in range(396, 400))
    assert tuple(code.infilling_ids()) == (396, 397, 398, 399)
    assert [sp.piece_to_id(piece) for piece in PIECES] == [396, 397, 398, 399]  # Meta's lookup finds them


def test_text_that_spells_infilling_tokens_is_ordinary_text(code):
    text = "x <PRE> y <SUF> z <MID> w <EOT>"
    ids = code.encode(text)
    assert not set(ids) & set(code.infilling_ids())
    assert code.decode(ids) == text


def test_user_defined_infilling_pieces_become_control_pieces(code, tmp_path):
    """A file whose infilling pieces are user-defined (which sentencepiece cuts out of any text) still encodes
    " <PRE>" as ordinary text here, with the same ids."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(code.path).read_bytes())
    for entry in proto.pieces:
        if entry.piece in PIECES:
            entry.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    path = tmp_path / "user_defined.model"
    path.write_bytes(proto.SerializeToString())
    meta_view = sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert 396 in meta_view.encode("x <PRE> y")  # what raw sentencepiece does with such a file
    ours = SentencePieceTokenizer(path.read_bytes(), path)
    assert tuple(ours.infilling_ids()) == (396, 397, 398, 399)
    assert not set(ours.encode("x <PRE> y")) & {396, 397, 398, 399}
    assert ours.fingerprint() != code.fingerprint()  # the file's own hash, not the retyped model's


def test_encode_and_decode_without_the_leading_space(chars, code):
    a, b, space = (chars.special_id(piece) for piece in ("a", "b", "▁"))
    assert chars.encode(" ba") == [space, space, b, a]  # the implicit leading space, then the text's own
    assert chars.encode_infilling([" ba", "ab", ""]) == [[space, b, a], [a, b], []]
    assert chars.decode_infilling([space, a]) == " a" and chars.decode([space, a]) == "a"
    sp = raw(code)
    for text in ('    return "alpha', " beta) + x", "\nassert", "", "ünï 😀"):
        assert code.encode_infilling([text]) == [meta_encode_infilling(sp, text)]
        assert code.decode_infilling(code.encode_infilling([text])[0]) == text


# ── Prompts ─────────────────────────────────────────────────────────────────────────────────────────────────────
def test_prompt_ids_written_by_hand(chars):
    a, b, space = (chars.special_id(piece) for piece in ("a", "b", "▁"))
    pre, suf, mid, _ = (chars.special_id(piece) for piece in PIECES)
    # prefix "ab" -> ▁ a b (implicit space); suffix " ba" -> ▁ b a (its own space only)
    assert infilling_prompt(chars, "ab", " ba") == [1, pre, space, a, b, suf, space, b, a, mid]
    assert infilling_prompt(chars, "ab", " ba", suffix_first=True) == [1, pre, suf, space, b, a, mid, space, a, b]
    assert infilling_prompt(chars, "", "") == [1, pre, suf, mid]


@pytest.mark.parametrize("prefix, suffix", [
    ('def get_north(x0):\n    return "', '" + x0  # ok☺done\nassert get_north(1) == 0\n'),
    ("def get_", "(x1):\n    return 1"),
    ("", " beta"),
    ("  x = 1\n", ""),
])
def test_prompt_ids_follow_meta(code, prefix, suffix):
    sp = raw(code)
    pre, suf, mid = (sp.piece_to_id(piece) for piece in PIECES[:3])
    assert len(sp.encode("☺")) == 2  # the vocabulary is like Code Llama's in what Meta's [2:] relies on
    assert infilling_prompt(code, prefix, suffix) == (
        [sp.bos_id(), pre] + sp.encode(prefix) + [suf] + meta_encode_infilling(sp, suffix) + [mid])
    assert infilling_prompt(code, prefix, suffix, suffix_first=True) == (
        [sp.bos_id(), pre, suf] + meta_encode_infilling(sp, suffix) + [mid] + sp.encode(prefix))


def test_prompt_for_a_tokenizer_without_infilling_tokens_is_one_clear_error(plain, tmp_path):
    with pytest.raises(TokenizerError) as error:
        infilling_prompt(plain, "a", "b")
    assert str(error.value) == (
        f"{plain.path}: tokenizer has no infilling tokens (missing ▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT>); infilling needs "
        "a Code Llama 7B/13B tokenizer.model or one trained with train_sentencepiece(..., infilling=True)")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(plain.path).read_bytes())
    for piece in ("▁<PRE>", "▁<MID>"):  # a file with only some of them names the others
        entry = proto.pieces.add()
        entry.piece, entry.type = piece, sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
    partial = SentencePieceTokenizer(proto.SerializeToString(), tmp_path / "partial.model")
    with pytest.raises(TokenizerError, match=r"partial.model: .*\(missing ▁<SUF>, ▁<EOT>\)"):
        partial.infilling_ids()


# ── Generation stops at ▁<EOT> ─────────────────────────────────────────────────────────────────────────────────
def programmed_model(vocab_size: int, cycle: list[int]) -> Llama:
    """A model whose greedy next token is cycle[i + 1] after cycle[i] (and the token itself after any other).

    Blocks add nothing (zero output projections), so the hidden state is the normalised embedding of the last token;
    the output column of next(t) is t's embedding, which scores |e_t|·sqrt(dim) against about 3·|e_t| for the
    best other column at this vocabulary size.
    """
    config = dataclasses.replace(MODEL_PRESETS["test"], vocab_size=vocab_size, max_seq_len=128)
    model = Llama(config, rngs=nnx.Rngs(0))
    embedding = np.random.default_rng(0).standard_normal((vocab_size, config.dim)).astype(np.float32)
    successor = np.arange(vocab_size)
    for token, following in zip(cycle, cycle[1:] + cycle[:1]):
        successor[token] = following
    output = np.zeros((config.dim, vocab_size), np.float32)
    output[:, successor] = embedding.T
    model.embedding[...] = jnp.asarray(embedding)
    model.output[...] = jnp.asarray(output)
    model.blocks.attention.w_o[...] = jnp.zeros_like(model.blocks.attention.w_o[...])
    model.blocks.mlp.w_down[...] = jnp.zeros_like(model.blocks.mlp.w_down[...])
    return model


@pytest.fixture(scope="module")
def stepping(chars) -> Llama:
    """After ▁<MID>: "▁", "a", then ▁<EOT> (and then ▁<MID> again, were it not stopped)."""
    space, a = chars.special_id("▁"), chars.special_id("a")
    ids = chars.infilling_ids()
    return programmed_model(chars.vocab_size, [ids.middle, space, a, ids.eot])


def test_infill_stops_at_eot_and_keeps_the_middles_leading_space(chars, stepping):
    space, a = chars.special_id("▁"), chars.special_id("a")
    ids = chars.infilling_ids()
    unstopped = generate(stepping, [infilling_prompt(chars, "b", "b")], max_new_tokens=6)[0].tokens
    assert unstopped == [space, a, ids.eot, ids.middle, space, a]  # the programmed model, without a stop
    [result] = infill(stepping, chars, ["b"], ["b"], max_new_tokens=6)
    assert (result.middle, result.tokens, result.finish_reason) == (" a", [space, a], "stop")
    assert result.prompt_tokens == len(infilling_prompt(chars, "b", "b"))
    # suffix-first ends the prompt with the prefix ("▁ a"), after which the model writes ▁<EOT> at once
    [result] = infill(stepping, chars, ["a"], ["b"], suffix_first=True, max_new_tokens=6)
    assert (result.middle, result.tokens, result.finish_reason) == ("", [], "stop")


def test_eval_generate_infill(chars, stepping, tmp_path, capsys):
    import llama_jax
    from eval.generate import main
    from llama_jax.cli import run_program

    model_dir = tmp_path / "model"
    llama_jax.save(stepping, model_dir)
    (model_dir / "tokenizer.model").write_bytes(Path(chars.path).read_bytes())
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prefix": "ab", "suffix": " ba"}\n')
    with pytest.raises(SystemExit) as exit_info:
        run_program(main, ["--model", str(model_dir), "--infill", "--prefix", "b", "--suffix", "b", "--prompts",
                           str(pairs), "--max-new-tokens", "6", "--json"])
    assert exit_info.value.code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prefix"], r["suffix"], r["middle"], r["finish_reason"]) for r in records] == [
        ("b", "b", " a", "stop"), ("ab", " ba", " a", "stop")]
    assert records[1]["prompt_tokens"] == len(infilling_prompt(chars, "ab", " ba"))
    with pytest.raises(SystemExit):
        run_program(main, ["--model", str(model_dir), "--infill", "--prefix", "b", "--suffix", "b",
                           "--max-new-tokens", "6"])
    assert capsys.readouterr().out == " a\n"  # one pair: the middle alone


def test_eval_generate_infill_bad_inputs_are_one_error_line(plain, chars, tmp_path, capsys):
    from eval.generate import main
    from llama_jax.cli import run_program

    missing_model = str(tmp_path / "no-model")
    for argv, message in (
        (["--tokenizer", str(plain.path), "--infill", "--prefix", "a", "--suffix", "b"],
         f"error: {plain.path}: tokenizer has no infilling tokens (missing ▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT>)"),
        (["--tokenizer", str(chars.path), "--infill", "--prefix", "a"], "one --suffix per --prefix"),
        (["--tokenizer", str(chars.path), "--infill"], "--infill needs --prefix TEXT --suffix TEXT"),
        (["--tokenizer", str(chars.path), "--infill", "--prefix", "a", "--suffix", "b", "--chat-format", "llama2"],
         "takes no --chat-format"),
        (["--tokenizer", str(chars.path), "--prompt", "a", "--suffix", "b"], "belong to --infill"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run_program(main, ["--model", missing_model, *argv])
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr, stderr


# ── The FIM transform ───────────────────────────────────────────────────────────────────────────────────────────
def test_split_rate_orders_and_cut_positions():
    """Over many documents: the rate and the SPM share hold, the parts rebuild the text, and the two cuts are two
    independent uniform positions (their smaller one averages 1/3 of the length, the larger 2/3)."""
    texts = [f"document {i}: " + "x" * (50 + i % 97) for i in range(4000)]
    transform = FimTransform(rate=0.9, spm_rate=0.5, seed=7)
    splits = [transform.split(text) for text in texts]
    chosen = [(text, split) for text, split in zip(texts, splits) if split is not None]
    assert 0.88 <= len(chosen) / len(texts) <= 0.92
    assert 0.47 <= np.mean([split.suffix_first for _, split in chosen]) <= 0.53
    assert all(split.prefix + split.middle + split.suffix == text for text, split in chosen)
    starts = np.array([len(split.prefix) / len(text) for text, split in chosen])
    ends = np.array([(len(split.prefix) + len(split.middle)) / len(text) for text, split in chosen])
    assert abs(starts.mean() - 1 / 3) < 0.02 and abs(ends.mean() - 2 / 3) < 0.02
    # a pure function of (seed, text): another instance agrees, another seed does not
    assert [FimTransform(0.9, 0.5, seed=7).split(text) for text in texts[:50]] == splits[:50]
    assert sum(FimTransform(0.9, 0.5, seed=8).split(text) != split for text, split in zip(texts, splits)) > 3000
    assert FimTransform(rate=0.0).split("abc") is None and FimTransform(rate=1.0).split("") is None
    assert all(FimTransform(1.0, spm_rate=0.0).split(text).suffix_first is False for text in texts[:100])


def test_documents_are_laid_out_as_code_llama_trains(code):
    sp = raw(code)
    pre, suf, mid, eot = (sp.piece_to_id(piece) for piece in PIECES)
    texts = [*CODE[:40], "x <PRE> y <MID> z"]
    transform = FimTransform(rate=0.9, seed=3)
    encoded = transform.encode_documents(code, texts)
    layouts = set()
    for text, tokens in zip(texts, encoded):
        split = transform.split(text)
        if split is None:
            assert tokens == sp.encode(text)
            continue
        layouts.add(split.suffix_first)
        if split.suffix_first:  # prefix and middle encoded together
            expected = ([pre, suf] + meta_encode_infilling(sp, split.suffix) + [mid]
                        + sp.encode(split.prefix + split.middle) + [eot])
        else:
            expected = ([pre] + sp.encode(split.prefix) + [suf] + meta_encode_infilling(sp, split.suffix) + [mid]
                        + meta_encode_infilling(sp, split.middle) + [eot])
        assert tokens == expected
        assert sorted(t for t in tokens if t in (pre, suf, mid, eot)) == [pre, suf, mid, eot]  # text stays text
    assert layouts == {False, True}
    assert FimTransform(rate=0.0).encode_documents(code, texts) == [sp.encode(text) for text in texts]


def test_a_document_longer_than_one_context_stays_whole(code):
    text = CODE[0] * 5
    assert FimTransform(rate=1.0).split(text) is not None
    [long] = FimTransform(rate=1.0, max_tokens=len(code.encode(text))).encode_documents(code, [text])
    assert long == code.encode(text)  # framed with BOS/EOS plus four infilling ids it would not fit
    [short] = FimTransform(rate=1.0, max_tokens=len(code.encode(text)) + 20).encode_documents(code, [text])
    assert code.infilling_ids().middle in short


def test_token_store_records_fim_and_rebuilds_when_it_changes(code, tmp_path):
    source = tmp_path / "code.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in CODE[:60]))
    fim = FimTransform(rate=0.5, spm_rate=0.5, seed=1, max_tokens=128)
    store = build_store(source, code, tmp_path / "store", fim=fim)
    assert store.manifest["fim"] == {"rule": "llama_jax.fim/1", "rate": 0.5, "spm_rate": 0.5, "seed": 1,
                                     "max_tokens": 128}
    expected = fim.encode_documents(code, CODE[:60])
    assert [store.document(i).tolist() for i in range(store.num_documents)] == expected
    # the same inputs elsewhere give the same store, so batches are a pure function of (seed, step)
    again = build_store(source, code, tmp_path / "again", fim=FimTransform(0.5, 0.5, seed=1, max_tokens=128))
    for step in range(3):
        first, second = batch_for_step(store, step, 4, 32, seed=5), batch_for_step(again, step, 4, 32, seed=5)
        assert all(np.array_equal(first[key], second[key]) for key in first)
    # another rate, or none, rebuilds the store in place
    plain_store = build_store(source, code, tmp_path / "store")
    assert plain_store.manifest["fim"] is None
    assert [plain_store.document(i).tolist() for i in range(3)] == [code.encode(text) for text in CODE[:3]]
    other = build_store(source, code, tmp_path / "store", fim=dataclasses.replace(fim, rate=1.0))
    assert other.manifest["fim"]["rate"] == 1.0
    assert sum(code.infilling_ids().eot in other.document(i) for i in range(other.num_documents)) == 60


def test_config_keys():
    config = load_config(None, ["data.fim_rate=0.9", "data.fim_spm_rate=0.25"])
    assert (config.data.fim_rate, config.data.fim_spm_rate) == (0.9, 0.25)
    assert load_config(None, []).data.fim_rate == 0.0
    for override, key in (("data.fim_rate=1.5", "data.fim_rate"), ("data.fim_spm_rate=-0.1", "data.fim_spm_rate")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])


def test_pretraining_data_with_fim(tmp_path, plain):
    source = tmp_path / "code.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in CODE))
    base = ["model=test", "model.vocab_size=320", "train.seq_len=64", "seed=4", f"data.path={source}",
            "data.fim_rate=0.9"]
    data = prepare_pretraining_data(load_config(None, base), tmp_path / "run")
    assert data.tokenizer.vocab_size == 320 and tuple(data.tokenizer.infilling_ids()) == (316, 317, 318, 319)
    assert data.train.manifest["fim"] == {"rule": "llama_jax.fim/1", "rate": 0.9, "spm_rate": 0.5, "seed": 4,
                                          "max_tokens": 64}
    assert data.valid.manifest["fim"] is None  # validation loss stays the plain language-modelling loss
    with pytest.raises(ConfigError) as error:
        prepare_pretraining_data(load_config(None, [*base, f"data.tokenizer={plain.path}"]), tmp_path / "run2")
    assert str(error.value) == (
        f"data.fim_rate=0.9: {plain.path}: tokenizer has no infilling tokens (missing ▁<PRE>, ▁<SUF>, ▁<MID>, "
        "▁<EOT>); infilling needs a Code Llama 7B/13B tokenizer.model or one trained with "
        "train_sentencepiece(..., infilling=True)")
