"""Rejection sampling: the K answers are generate's samples, their scores the reward model's on exactly those
tokens (or Llama 2's helpfulness/safety combination), the best is kept, and the program writes SFT data and a round
summary that agree with each other."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax.chat_format import Message, dialog_prompt, generation_stop_ids, read_conversations
from llama_jax.config import MODEL_PRESETS
from llama_jax.errors import DataError
from llama_jax.generate import Sampling, generate
from llama_jax.model import Llama
from llama_jax.params import model_params
from llama_jax.preference_data import Prompt
from llama_jax.rejection_sampling import Sampled, sample_and_score, summarize, write_sft_data
from llama_jax.reward_model import RewardModel, reward_params_from_policy

REPO = Path(__file__).resolve().parents[1]
CONFIG = dataclasses.replace(MODEL_PRESETS["test"], vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                             ffn_hidden_dim=128, dtype="float32", max_seq_len=128)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from llama_jax.tokenizer import train_sentencepiece

    path = tmp_path_factory.mktemp("rs") / "model"
    llama_jax.save(Llama(CONFIG, rngs=nnx.Rngs(0)), path)
    text = [f"List four words for item {i}: apple river green stone. The quick brown fox {i}." for i in range(60)]
    train_sentencepiece(text, path / "tokenizer.model", vocab_size=320)
    return path


def judge(seed: int) -> RewardModel:
    params = reward_params_from_policy(model_params(Llama(CONFIG, rngs=nnx.Rngs(seed))), CONFIG,
                                       jax.random.key(seed))
    return RewardModel(CONFIG, params)


def prompts() -> list[Prompt]:
    return [Prompt((Message("user", f"List four words for item {i}."),), i % 2 == 1, f"p:{i}") for i in range(3)]


def hand_scores(model: RewardModel, rows: list[tuple[list[int], list[int]]]) -> np.ndarray:
    """Each row scored alone, unpadded: the head reads the last answer token."""
    scores = []
    for prompt, answer in rows:
        tokens = np.asarray([prompt + answer], np.int32)
        mask = np.asarray([[0] * len(prompt) + [1] * len(answer)], np.int32)
        scores.append(model.score_tokens(tokens, mask)[0])
    return np.asarray(scores)


def test_samples_are_generates_and_scores_the_reward_models(model_dir):
    from llama_jax.alignment import combined_reward
    from llama_jax.tokenizer import load_tokenizer

    policy = llama_jax.load(model_dir)
    tokenizer = load_tokenizer(model_dir / "tokenizer.model")
    stop_ids = sorted(generation_stop_ids(tokenizer, "llama2"))
    sampling = Sampling(temperature=1.0)
    helpfulness, safety = judge(1), judge(2)
    sampled = sample_and_score(policy, [helpfulness, safety], tokenizer, "llama2", prompts(), samples=3,
                               sampling=sampling, max_new_tokens=10, seed=5, batch_size=8, stop_ids=stop_ids,
                               safety_threshold=0.15)
    encoded = [dialog_prompt(prompt.messages, tokenizer, "llama2") for prompt in prompts()]
    repeated = [tokens for tokens in encoded for _ in range(3)]
    expected = generate(policy, repeated, max_new_tokens=10, sampling=sampling, seed=5, stop_ids=stop_ids)
    rows = [(prompt, c.tokens + ([c.stop_token] if c.stop_token is not None else []))
            for prompt, c in zip(repeated, expected)]
    safety_tags = np.repeat([prompt.safety for prompt in prompts()], 3)
    expected_scores = np.asarray(combined_reward(hand_scores(helpfulness, rows), hand_scores(safety, rows),
                                                 safety_tags, threshold=0.15))
    got = np.asarray([score for item in sampled for score in item.scores])
    np.testing.assert_allclose(got, expected_scores, rtol=1e-4, atol=1e-4)
    assert [answer for item in sampled for answer in item.answers] == [tokenizer.decode(c.tokens) for c in expected]
    for item in sampled:
        assert item.scores[item.best] == max(item.scores)


def test_summary_and_written_data():
    tagged = prompts()
    sampled = [Sampled(tagged[0], ["a", "b", "c"], [0.5, 2.0, -1.0]), Sampled(tagged[1], ["d", "e", "f"],
                                                                              [-3.0, -2.0, -4.0])]
    kept, summary = summarize(sampled, None)
    assert [item.best for item in kept] == [1, 1]
    assert summary.mean_score_all == pytest.approx((0.5 + 2 - 1 - 3 - 2 - 4) / 6)
    assert summary.mean_score_kept == pytest.approx((2.0 - 2.0) / 2)
    assert summary.mean_score_first == pytest.approx((0.5 - 3.0) / 2)
    kept, summary = summarize(sampled, threshold=0.0)
    assert len(kept) == summary.kept == 1 and summary.mean_score_kept == 2.0


def test_written_sft_data_is_train_sft_input(tmp_path):
    item = Sampled(prompts()[0], ["x y", "best answer"], [0.1, 0.9])
    path = tmp_path / "out.jsonl"
    assert write_sft_data(path, [item]) == 1
    [conversation] = list(read_conversations(path))
    assert [(m.role, m.content) for m in conversation] == [("user", "List four words for item 0."),
                                                           ("assistant", "best answer")]
    assert json.loads(path.read_text())["score"] == 0.9
    with pytest.raises(DataError, match="no answer was kept"):
        write_sft_data(tmp_path / "none.jsonl", [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # nothing half-written


def test_the_program_writes_data_and_summary_that_agree(model_dir, tmp_path, monkeypatch, capsys):
    from train.rejection_sampling import main

    judge_dir = tmp_path / "judge"
    llama_jax.save(judge(3), judge_dir)
    shutil.copyfile(model_dir / "tokenizer.model", judge_dir / "tokenizer.model")
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": f"List four words for item {i}."}) + "\n"
                                   for i in range(6)))
    monkeypatch.chdir(REPO)
    run_dir = tmp_path / "run"
    assert main(["configs/sft.yaml", f"init_from={model_dir}", f"judge.helpfulness={judge_dir}",
                 f"data.path={prompt_file}", f"run_dir={run_dir}", "rejection.samples=4",
                 "rollout.max_new_tokens=8", "rejection.batch_size=4"]) == 0
    summary = json.loads((run_dir / "rejection_sampling.json").read_text())
    records = [json.loads(line) for line in (run_dir / "rejection_sampled.jsonl").read_text().splitlines()]
    assert summary["prompts"] == summary["kept"] == len(records) == 6 and summary["samples_per_prompt"] == 4
    assert summary["mean_score_kept"] == pytest.approx(np.mean([record["score"] for record in records]))
    assert summary["mean_score_kept"] >= summary["mean_score_all"] and summary["mean_score_kept"] >= \
        summary["mean_score_first"]
    assert "kept 6 of 6" in capsys.readouterr().out
