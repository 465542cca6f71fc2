"""Generation: KV-cache decoding against two independent paths, sampling, stopping, and the eval.generate program.

References: argmax of repeated full forwards without a cache (a second code path through our model) and
transformers' `generate` on the same random weights. One tiny model and a handful of shapes are shared by all tests,
so each program is compiled once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import ours_from_hf, random_hf_model

from eval.chat import PROMPT_PAD_MULTIPLE
from llama_jax import generate as generate_module
from llama_jax.config import MODEL_PRESETS
from llama_jax.errors import ConfigError
from llama_jax.generate import GREEDY, IncrementalDecoder, Sampling, generate, left_pad, sample_tokens, stream
from llama_jax.model import Llama
from llama_jax.tokenizer import train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 384
MAX_NEW = 12
# Single prompts are padded as eval.chat pads its prompts, here and in test_chat_cli, so they share compiled programs.
SINGLE_PAD = PROMPT_PAD_MULTIPLE
CONFIG = dataclasses.replace(MODEL_PRESETS["test"], vocab_size=VOCAB_SIZE, max_seq_len=256)
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "A model reads the whole conversation, then writes its answer one token at a time.",
    "Rain in the morning, wind at noon, and a clear sky over the hills by evening.",
    "Numbers such as 12, 345 and 6789 are split into single digits by the tokenizer.",
    "Über café naïve: accented letters and emoji 🙂 fall back to bytes when they are rare.",
    "Questions and answers: what did I say before? You said the fox was quick and brown.",
]


@pytest.fixture(scope="module")
def hf_model():
    model = random_hf_model(CONFIG, seed=0)
    model.generation_config.eos_token_id = None  # no stop token unless a test passes one, as in our calls
    return model


@pytest.fixture(scope="module")
def model(hf_model):
    return ours_from_hf(CONFIG, hf_model)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Three prompts of different lengths (BOS first), so the batch is really left-padded."""
    rng = np.random.default_rng(0)
    return [[1, *rng.integers(3, VOCAB_SIZE, length).tolist()] for length in (4, 10, 1)]


@pytest.fixture(scope="module")
def greedy_batch(model, prompts):
    return generate(model, prompts, max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def greedy_alone(model, prompts):
    # Alone and padded to another width than in the batch: the padding must not change any result.
    return [generate(model, [prompt], max_new_tokens=MAX_NEW, pad_to_multiple=SINGLE_PAD)[0] for prompt in prompts]


def full_forward_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence through the model without a cache at every step.

    The sequence is right-padded to one width (padding in segment 0, invisible to earlier tokens) so that a single
    compiled forward serves every step.
    """
    graphdef, params = nnx.split(model)
    width = len(prompt) + max_new_tokens
    forward = jax.jit(lambda params, tokens, segments: nnx.merge(graphdef, params)(tokens, segment_ids=segments))
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(tokens)] = tokens
        segments = (np.arange(width) < len(tokens)).astype(np.int32)[None]
        logits = forward(params, jnp.asarray(padded), jnp.asarray(segments))
        tokens.append(int(np.argmax(np.asarray(logits)[0, len(tokens) - 1])))
    return tokens[len(prompt):]


def hf_greedy(hf_model, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None = None):
    """transformers' greedy generate on a left-padded batch (its own attention mask and positions)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    stop = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                pad_token_id=0, **stop)
    return out[:, width:].tolist()


# ── Greedy correctness ───────────────────────────────────────────────────────────────────────────────────────────
def test_cached_greedy_equals_repeated_full_forwards(model, prompts, greedy_alone):
    for prompt, completion in zip(prompts, greedy_alone):
        assert completion.tokens == full_forward_greedy(model, prompt, MAX_NEW)
        assert completion.finish_reason == "length" and len(completion.tokens) == MAX_NEW


def test_greedy_equals_transformers_generate(hf_model, prompts, greedy_batch):
    expected = hf_greedy(hf_model, prompts, MAX_NEW)
    assert [completion.tokens for completion in greedy_batch] == expected


def test_tied_head_and_bfloat16_compute_equal_their_full_forwards(prompts):
    """Generation runs the blocks layer by layer on its own copy of the weights: check the branches the main model
    does not take (an output head tied to the embedding; weights cast to a compute dtype unlike the parameters')."""
    config = dataclasses.replace(CONFIG, tie_embeddings=True, max_seq_len=64)
    for dtype in ("float32", "bfloat16"):
        model = Llama(dataclasses.replace(config, dtype=dtype), rngs=nnx.Rngs(1))
        completion = generate(model, [prompts[1]], max_new_tokens=6)[0]
        assert completion.tokens == full_forward_greedy(model, prompts[1], 6), dtype


def test_left_padded_rows_equal_generating_each_prompt_alone(greedy_batch, greedy_alone):
    assert [c.tokens for c in greedy_batch] == [c.tokens for c in greedy_alone]
    # The rows really differ (a batch that repeats one row would prove nothing).
    assert len({tuple(c.tokens) for c in greedy_batch}) == len(greedy_batch)


def test_left_pad_layout():
    padded = left_pad([[5, 6, 7], [8]], pad_to_multiple=4)
    assert padded.tokens.shape == (2, 4)
    assert padded.segment_ids.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert padded.positions.tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]]
    assert padded.tokens[:, -1].tolist() == [7, 8]


# ── Stopping ─────────────────────────────────────────────────────────────────────────────────────────────────────
def test_each_row_stops_at_its_first_stop_token(model, hf_model, prompts, greedy_batch):
    unrestricted = [c.tokens for c in greedy_batch]
    stop = unrestricted[0][4]  # a token row 0 emits mid-way; other rows may emit it elsewhere or never
    completions = generate(model, prompts, max_new_tokens=MAX_NEW, stop_ids={stop})
    for tokens, completion in zip(unrestricted, completions):
        if stop in tokens:
            cut = tokens.index(stop)
            assert completion.tokens == tokens[:cut]
            assert (completion.finish_reason, completion.stop_token) == ("stop", stop)
        else:
            assert completion.tokens == tokens and completion.finish_reason == "length"
    # transformers agrees: it emits the EOS and then padding.
    for expected, completion in zip(hf_greedy(hf_model, prompts, MAX_NEW, eos_token_id=stop), completions):
        assert expected[: len(completion.tokens)] == completion.tokens


def test_generation_ends_early_when_every_row_has_stopped(model, prompts, greedy_batch):
    first_tokens = {c.tokens[0] for c in greedy_batch}
    completions = generate(model, prompts, max_new_tokens=MAX_NEW, stop_ids=first_tokens)
    assert all(c.tokens == [] and c.finish_reason == "stop" for c in completions)
    # The decode loop itself stopped after the first token instead of running on to MAX_NEW masked steps.
    prepared = generate_module._prepare(model, prompts, MAX_NEW, GREEDY, 0, first_tokens, 16)
    _, steps = generate_module._generate_jitted(prepared.arch, prepared.weights, prepared.prompts, prepared.rules,
                                                True, prepared.cache_len, MAX_NEW)
    _, steps_without_stops = generate_module._generate_jitted(
        prepared.arch, prepared.weights, prepared.prompts, prepared.rules._replace(
            stop_ids=jnp.full_like(prepared.rules.stop_ids, -1)), True, prepared.cache_len, MAX_NEW)
    assert (int(steps), int(steps_without_stops)) == (1, MAX_NEW)


# ── Sampling ─────────────────────────────────────────────────────────────────────────────────────────────────────
def test_sampling_is_reproducible_by_seed(model, prompts, greedy_batch):
    hot = Sampling(temperature=1.5)
    first = [c.tokens for c in generate(model, prompts, max_new_tokens=MAX_NEW, sampling=hot, seed=1)]
    again = [c.tokens for c in generate(model, prompts, max_new_tokens=MAX_NEW, sampling=hot, seed=1)]
    other = [c.tokens for c in generate(model, prompts, max_new_tokens=MAX_NEW, sampling=hot, seed=2)]
    assert first == again
    assert first != other
    assert first != [c.tokens for c in greedy_batch]


def test_top_k_one_and_tiny_top_p_are_greedy(model, prompts, greedy_batch):
    greedy = [c.tokens for c in greedy_batch]
    top_1 = generate(model, prompts, max_new_tokens=MAX_NEW, sampling=Sampling(temperature=2.0, top_k=1), seed=3)
    nucleus = generate(model, prompts, max_new_tokens=MAX_NEW, sampling=Sampling(temperature=2.0, top_p=1e-6),
                       seed=3)
    assert [c.tokens for c in top_1] == greedy
    assert [c.tokens for c in nucleus] == greedy


def test_top_k_and_top_p_only_draw_from_the_kept_set():
    # Probabilities 0.5, 0.3, 0.15, 0.05: top-p 0.7 keeps {0, 1} (0.5 < 0.7, then 0.8 ≥ 0.7); top-k 3 keeps {0, 1, 2}.
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000, jnp.float32))
    key = jax.random.PRNGKey(0)
    sample = jax.jit(sample_tokens, static_argnames="sampling")
    by_p = np.asarray(sample(logits, key, sampling=Sampling(temperature=1.0, top_p=0.7)))
    by_k = np.asarray(sample(logits, key, sampling=Sampling(temperature=1.0, top_k=3)))
    assert set(by_p.tolist()) == {0, 1}
    assert abs((by_p == 0).mean() - 0.5 / 0.8) < 0.03  # renormalised over the kept set
    assert set(by_k.tolist()) == {0, 1, 2}
    assert abs((by_k == 2).mean() - 0.15 / 0.95) < 0.03


def test_bad_sampling_settings_are_one_line_errors(model):
    for kwargs in ({"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ConfigError) as raised:
            Sampling(**kwargs)
        [(key, value)] = kwargs.items()
        message = str(raised.value)
        assert len(message.splitlines()) == 1 and message.startswith(f"{key}={value} is not allowed: expected")
    with pytest.raises(ConfigError, match="max_seq_len"):
        generate(model, [[1] * 250], max_new_tokens=10)
    with pytest.raises(ConfigError, match="vocabulary"):
        generate(model, [[1, VOCAB_SIZE]], max_new_tokens=1)


# ── Streaming ────────────────────────────────────────────────────────────────────────────────────────────────────
def test_stream_yields_the_same_tokens_as_generate(model, prompts, greedy_alone):
    expected = greedy_alone[1].tokens
    assert list(stream(model, prompts[1], max_new_tokens=MAX_NEW, pad_to_multiple=SINGLE_PAD)) == expected
    stop = expected[3]
    streamed = stream(model, prompts[1], max_new_tokens=MAX_NEW, stop_ids={stop}, pad_to_multiple=SINGLE_PAD)
    assert list(streamed) == expected[: expected.index(stop)]


def test_incremental_decoder_never_splits_a_character(tokenizer):
    text = "café 日本 ß naïve"  # the CJK characters and ß are not in the vocabulary: byte fallback
    ids = tokenizer.encode(text)
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(token) for token in ids] + [decoder.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece) > 3  # it really streams


# ── eval.generate end to end ─────────────────────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_sentencepiece(TRAINING_TEXT, tmp_path_factory.mktemp("tokenizer") / "tokenizer.model",
                               vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="module")
def model_dir(model, tokenizer, tmp_path_factory) -> Path:
    """The test model in the llama-jax format, with the tokenizer inside, as a user's checkpoint would be."""
    import llama_jax

    path = tmp_path_factory.mktemp("checkpoint") / "model"
    llama_jax.save(model, path)
    (path / "tokenizer.model").write_bytes(Path(tokenizer.path).read_bytes())
    return path


def start_module(module: str, *args: str) -> subprocess.Popen:
    """Start `python -m module args` with piped stdin/stdout/stderr; the test works on in the meantime."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", module, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)


def finish(process: subprocess.Popen, stdin: str = "") -> tuple[int, str, str]:
    try:
        stdout, stderr = process.communicate(stdin, timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, stdout, stderr


def test_eval_generate_program(model, tokenizer, model_dir, tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text('{"prompt": "The quick brown fox"}\n\n{"prompt": "Rain in the morning"}\n')
    process = start_module("eval.generate", "--model", str(model_dir), "--prompt", "A model reads", "--prompts",
                           str(prompts_file), "--max-new-tokens", str(MAX_NEW), "--batch-size", "2", "--json")
    texts = ["A model reads", "The quick brown fox", "Rain in the morning"]  # --prompt values, then the file's
    encoded = [tokenizer.encode(text, bos=True) for text in texts]
    expected = [generate(model, [ids], max_new_tokens=MAX_NEW, stop_ids=tokenizer.stop_ids,
                         pad_to_multiple=SINGLE_PAD)[0] for ids in encoded]

    status, stdout, stderr = finish(process)
    assert status == 0, stderr
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [r["prompt"] for r in records] == texts
    for record, ids, completion in zip(records, encoded, expected):
        assert record["tokens"] == completion.tokens
        assert record["completion"] == tokenizer.decode(completion.tokens)
        assert record["prompt_tokens"] == len(ids)
        assert record["finish_reason"] == completion.finish_reason


def test_eval_generate_reports_errors_on_one_line(tmp_path, capsys):
    from eval.generate import main
    from llama_jax.cli import run_program

    for argv, message in (([], "no prompts"),
                          (["--prompt", "hi", "--system", "Be brief."], "--system needs a chat format"),
                          (["--prompt", "hi"], "--tokenizer")):
        with pytest.raises(SystemExit) as exit_info:
            run_program(main, ["--model", str(tmp_path / "missing"), *argv])
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr
