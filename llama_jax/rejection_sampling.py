"""Rejection sampling (Llama 2-Chat's best-of-K): sample K answers per prompt, score each with the reward model(s),
keep the best (optionally only above a threshold), and write the kept conversations as SFT data.

Answers are sampled with the KV-cache decoder (`generate.generate`, temperature/top-p, a seed per batch of prompts)
and scored on exactly the token ids the policy wrote (prompt + answer + its stop token), so the reward model must
read the policy's tokenizer. With a safety model beside the helpfulness model, the score is Llama 2's combination
(`alignment.combined_reward`). The written JSONL is `train.sft`'s input: one `{"messages": [...], "score": s}` per
kept prompt.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from llama_jax.alignment import combined_reward
from llama_jax.chat_format import Message, conversation_to_json, dialog_prompt
from llama_jax.errors import DataError
from llama_jax.generate import Sampling, generate
from llama_jax.model import Llama
from llama_jax.preference_data import Prompt
from llama_jax.reward_model import RewardModel


@dataclass(frozen=True)
class Sampled:
    prompt: Prompt
    answers: list[str]
    scores: list[float]

    @property
    def best(self) -> int:
        return int(np.argmax(self.scores))


@dataclass(frozen=True)
class RoundSummary:
    prompts: int
    samples_per_prompt: int
    kept: int
    mean_score_all: float  # over every sampled answer
    mean_score_kept: float  # over the kept (best) answers
    mean_score_first: float  # over the first sample of each prompt: what one sample (no selection) scores

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def score_sequences(judges: Sequence[RewardModel], rows: Sequence[tuple[list[int], list[int]]], safety: Sequence[bool],
                    pad_id: int, threshold: float) -> np.ndarray:
    """Scores of (prompt tokens, answer tokens) rows: the helpfulness model's, or Llama 2's combination."""
    length = max(16, 1 << (max(len(p) + len(a) for p, a in rows) - 1).bit_length())
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for row, (prompt, answer) in enumerate(rows):
        tokens[row, :len(prompt) + len(answer)] = prompt + answer
        mask[row, len(prompt):len(prompt) + len(answer)] = 1
    scores = [judge.score_tokens(tokens, mask) for judge in judges]
    if len(scores) == 1:
        return scores[0]
    return np.asarray(combined_reward(jnp.asarray(scores[0]), jnp.asarray(scores[1]),
                                      jnp.asarray(np.asarray(safety)), threshold=threshold))


def sample_and_score(policy: Llama, judges: Sequence[RewardModel], tokenizer, style: str, prompts: Sequence[Prompt],
                     *, samples: int, sampling: Sampling, max_new_tokens: int, seed: int, batch_size: int,
                     stop_ids: Sequence[int], safety_threshold: float = 0.15) -> list[Sampled]:
    """K sampled answers and their scores for every prompt, `batch_size` prompts (× K rows) at a time; the seed of
    batch b is seed + b, so a result does not depend on what ran before it."""
    results = []
    for batch_index, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        encoded = [dialog_prompt(prompt.messages, tokenizer, style) for prompt in chunk]
        repeated = [tokens for tokens in encoded for _ in range(samples)]
        completions = generate(policy, repeated, max_new_tokens=max_new_tokens, sampling=sampling,
                               seed=seed + batch_index, stop_ids=stop_ids)
        rows = [(prompt_tokens, completion.tokens + ([completion.stop_token] if completion.stop_token is not None
                                                     else []))
                for prompt_tokens, completion in zip(repeated, completions)]
        safety = [prompt.safety for prompt in chunk for _ in range(samples)]
        scores = score_sequences(judges, rows, safety, tokenizer.pad_id, safety_threshold)
        for index, prompt in enumerate(chunk):
            part = slice(index * samples, (index + 1) * samples)
            results.append(Sampled(prompt, [tokenizer.decode(c.tokens) for c in completions[part]],
                                   [float(s) for s in scores[part]]))
    return results


def summarize(sampled: Sequence[Sampled], threshold: float | None) -> tuple[list[Sampled], RoundSummary]:
    kept = [item for item in sampled if threshold is None or item.scores[item.best] >= threshold]
    every = [score for item in sampled for score in item.scores]
    summary = RoundSummary(
        prompts=len(sampled), samples_per_prompt=len(sampled[0].scores) if sampled else 0, kept=len(kept),
        mean_score_all=float(np.mean(every)) if every else float("nan"),
        mean_score_kept=float(np.mean([item.scores[item.best] for item in kept])) if kept else float("nan"),
        mean_score_first=float(np.mean([item.scores[0] for item in sampled])) if sampled else float("nan"))
    return kept, summary


def write_sft_data(path: str | Path, kept: Sequence[Sampled]) -> int:
    """The kept answers as train.sft conversations (`{"messages": [...], "score": s}`), all or nothing."""
    path = Path(path)
    if not kept:
        raise DataError(f"{path}: no answer was kept (every best score is below rejection.threshold)")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "w", encoding="utf-8") as output:
            for item in kept:
                record = json.loads(conversation_to_json([*item.prompt.messages,
                                                          Message("assistant", item.answers[item.best])]))
                record["score"] = item.scores[item.best]
                output.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return len(kept)
