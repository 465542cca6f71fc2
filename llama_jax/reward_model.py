"""Reward models as Llama 2 trained them: the Llama backbone with a scalar head reading the hidden state of the
answer's last token, trained on preference pairs with the margin ranking loss −log σ(r(x, y_c) − r(x, y_r) − m(r)).

A reward model's parameters are the backbone's (every Llama parameter except the output head: a reward model has no
language-model head, as Hugging Face's `LlamaForSequenceClassification` has none) and `score.weight` [dim, 1], the
transpose of that class's `score.weight` [1, dim]. The score of (prompt, answer) is the final-normed hidden state at
the answer's last token (its EOS / <|eot_id|>) times the head, in float32.

On disk: a `train.reward` run directory (its newest checkpoint), or a llama-jax checkpoint folder written by
`save_reward_model` (model.json + params/, the same layout as a language model's, with `score.weight` among the
arrays and no `output`). `llama_jax.load` returns a `RewardModel` for either; `llama_jax.save(reward_model, path,
format="hf")` writes a Hugging Face `LlamaForSequenceClassification` with one label (`llama_jax.convert.hf_reward`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from llama_jax.alignment import last_response_index, reward_margin_loss, scalar_head
from llama_jax.chat_format import Message
from llama_jax.config import ModelConfig, OptimizerConfig, RewardConfig, RewardModelsConfig
from llama_jax.errors import ConversionError, DataError
from llama_jax.params import graphdef, merge_params, param_specs
from llama_jax.sharding import DEFAULT_RULES, Rules, replicated
from llama_jax.trainer import Batch, Trainer, TrainState, learning_rate_schedule, make_optimizer

Array = jax.Array
SCORE = "score.weight"
OUTPUT_HEAD = "output"


def backbone_config(config: ModelConfig) -> ModelConfig:
    """The config whose model has no separate output head: a reward model computes hidden states only (tied
    embeddings read the embedding table as the head, which a reward model never applies)."""
    return dataclasses.replace(config, tie_embeddings=True)


def reward_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {name: spec.shape for name, spec in param_specs(backbone_config(config)).items()}
    return {**shapes, SCORE: (config.dim, 1)}


def init_score_head(config: ModelConfig, key: Array) -> Array:
    """N(0, 1/dim): a fresh head's scores start at about the scale of one hidden unit."""
    return jax.random.normal(key, (config.dim, 1), jnp.float32) / math.sqrt(config.dim)


def reward_params_from_policy(params: Mapping[str, Array], config: ModelConfig, key: Array) -> dict[str, Array]:
    """A reward model initialised from a language model (pretrained or SFT): its backbone and a fresh head."""
    backbone = {name: value for name, value in params.items() if name != OUTPUT_HEAD}
    return {**backbone, SCORE: init_score_head(config, key)}


def sequence_scores(params: Mapping[str, Array], backbone: object, tokens: Array, response_mask: Array) -> Array:
    """Scores [batch] of padded sequences; the head reads the last token of each row's response."""
    model = merge_params(backbone, {name: value for name, value in params.items() if name != SCORE})
    return scalar_head(model.hidden_states(tokens), params[SCORE], last_response_index(response_mask))


def pair_sums(params: Mapping[str, Array], backbone: object, batch: Batch, use_margin: bool
              ) -> tuple[Array, tuple[Array, dict[str, Array]]]:
    """(Σ loss, (pairs, {accuracy, reward_chosen, reward_rejected, margin} sums)) of a batch of pairs."""
    chosen = sequence_scores(params, backbone, batch["chosen_tokens"], batch["chosen_mask"])
    rejected = sequence_scores(params, backbone, batch["rejected_tokens"], batch["rejected_mask"])
    margin = batch["margin"][:, 0] if use_margin else jnp.zeros_like(chosen)
    losses = reward_margin_loss(chosen, rejected, margin)
    sums = {"accuracy": jnp.sum((chosen > rejected).astype(jnp.float32)), "reward_chosen": jnp.sum(chosen),
            "reward_rejected": jnp.sum(rejected), "margin": jnp.sum(chosen - rejected)}
    return jnp.sum(losses), (jnp.asarray(chosen.shape[0], jnp.float32), sums)


# ── Training ─────────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True, kw_only=True)
class RewardTrainer(Trainer):
    """The reward model's train step: (state, batch of pairs) → (state, metrics). The state's params are the reward
    model's (backbone sharded by the rules like a language model's, the head replicated); metrics add accuracy,
    the mean chosen/rejected rewards and their margin."""

    reward: RewardConfig

    @classmethod
    def create_reward(cls, model_config: ModelConfig, optimizer_config: OptimizerConfig, total_steps: int,
                      mesh: Mesh, reward: RewardConfig, rules: Rules = DEFAULT_RULES,
                      grad_accum: int = 1) -> RewardTrainer:
        return cls(backbone_config(model_config), mesh, rules, optimizer=make_optimizer(optimizer_config, total_steps),
                   schedule=learning_rate_schedule(optimizer_config, total_steps), grad_accum=grad_accum,
                   reward=reward)

    def abstract_params(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {**super().abstract_params(), SCORE: jax.ShapeDtypeStruct((self.model_config.dim, 1), jnp.float32)}

    def param_shardings(self) -> dict[str, NamedSharding]:
        return {**super().param_shardings(), SCORE: replicated(self.mesh)}

    def _init(self, seed: int) -> TrainState:
        state = super()._init(seed)
        params = {**state.params, SCORE: init_score_head(self.model_config, jax.random.key(seed + 1))}
        return state.replace(params=params, opt_state=self.optimizer.init(params))

    def micro_batch_sums(self) -> Callable:
        backbone, use_margin = self.graphdef, self.reward.use_margin
        return lambda params, batch: pair_sums(params, backbone, batch, use_margin)

    def eval_loss(self) -> Callable[[dict[str, Array], Batch], tuple[Array, Array]]:
        """Jitted (params, batch of pairs) → (Σ margin loss, pairs)."""
        if "reward_eval" not in self._jitted:
            sums = self.micro_batch_sums()
            self._jitted["reward_eval"] = self.under_rules(jax.jit(lambda params, batch: (
                lambda result: (result[0], result[1][0]))(sums(params, batch))))
        return self._jitted["reward_eval"]


# ── A trained reward model ───────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class RewardModel:
    """A reward model's config and parameters (float32, backbone without output head + `score.weight`)."""

    config: ModelConfig
    params: dict[str, Array]

    @functools.cached_property
    def backbone(self) -> object:
        return graphdef(backbone_config(self.config))

    def score_tokens(self, tokens: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
        """Scores [rows] of padded token rows (the head reads each row's last response token)."""
        return np.asarray(_jitted_scores(self.backbone)(self.params, jnp.asarray(tokens, jnp.int32),
                                                         jnp.asarray(response_mask, jnp.int32)))

    def score(self, tokenizer, style: str, prompts: Sequence[Sequence[Message]], answers: Sequence[str], *,
              batch_size: int = 8) -> np.ndarray:
        """r(prompt, answer) for each pair, rendered in the chat format `style` as SFT renders them."""
        from llama_jax.preference_data import encode_answer, pad_dialogs

        if len(prompts) != len(answers):
            raise DataError(f"{len(prompts)} prompts but {len(answers)} answers to score")
        encoded = [encode_answer(prompt, answer, tokenizer, style) for prompt, answer in zip(prompts, answers)]
        scores = []
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            length = _bucket(max(len(dialog.tokens) for dialog in chunk))
            rows = list(chunk) + [chunk[-1]] * (batch_size - len(chunk))  # a fixed batch shape: one compilation
            tokens, mask = pad_dialogs(rows, length, tokenizer.pad_id)
            scores.extend(self.score_tokens(tokens, mask)[:len(chunk)])
        return np.asarray(scores, np.float32)


def _bucket(length: int) -> int:
    """Round a padded length up to a power of two (at least 16): few distinct shapes, few compilations."""
    return max(16, 1 << (length - 1).bit_length())


@functools.lru_cache(maxsize=8)
def _jitted_scores(backbone: object) -> Callable:
    return jax.jit(lambda params, tokens, mask: sequence_scores(params, backbone, tokens, mask))


def is_reward_checkpoint(path: str | Path) -> bool:
    """Whether `path` (a run directory, one of its steps, or a llama-jax checkpoint folder) holds a reward model."""
    params_dir = _params_dir(Path(path), quiet=True)
    if params_dir is None:
        return False
    from llama_jax.convert.native import ArrayReader

    try:
        return SCORE in ArrayReader(params_dir).names()
    except Exception:  # not an Orbax item: not a reward model (the caller's loader reports what it is)
        return False


def _params_dir(path: Path, quiet: bool = False) -> Path | None:
    from llama_jax.convert import native

    try:
        if native.is_run_dir(path):
            return native.latest_run_checkpoint(path)[1]
        if native.is_run_step(path) or native.is_native(path):
            return path / native.PARAMS_DIR
    except Exception:
        if not quiet:
            raise
    return None


def _model_config(path: Path) -> ModelConfig:
    from llama_jax.convert import native

    if native.is_run_step(path):
        return native.run_model_config(path.parent.parent)
    if native.is_run_dir(path):
        return native.run_model_config(path)
    return native.read_model_json(path / native.MODEL_FILE)


def load_reward_model(path: str | Path) -> RewardModel:
    """The reward model of a `train.reward` run directory (newest complete checkpoint) or a saved one."""
    from llama_jax.convert.native import ArrayReader

    path = Path(path)
    params_dir = _params_dir(path)
    if params_dir is None:
        raise ConversionError(f"{path} is neither a train.reward run directory nor a saved reward model")
    config = _model_config(path)
    reader = ArrayReader(params_dir)
    expected = reward_param_shapes(config)
    names = set(reader.names())
    if SCORE not in names:
        raise ConversionError(f"{params_dir} holds a language model, not a reward model (no {SCORE})")
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or extra:
        raise ConversionError(f"{params_dir} does not hold a reward model of its config: missing {missing}, "
                              f"unexpected {extra}")
    params = {}
    for name, shape in expected.items():
        value = reader.read(name)
        if tuple(value.shape) != shape:
            raise ConversionError(f"{params_dir}: {name} has shape {tuple(value.shape)}, expected {shape}")
        params[name] = jnp.asarray(value, jnp.float32)
    return RewardModel(config, params)


def save_reward_model(model: RewardModel, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a llama-jax checkpoint folder (model.json + params/) that `llama_jax.load` reads back as this model."""
    from llama_jax.convert.common import staged_output
    from llama_jax.convert.native import write_native

    with staged_output(path, overwrite) as staging:
        write_native(model.config, dict(model.params), staging)
    return Path(path)


def check_same_tokenizer(policy_tokenizer, reward_tokenizer, policy_path: object, reward_path: object) -> None:
    """A reward model scores token ids: it must read them with the policy's tokenizer."""
    if policy_tokenizer.fingerprint() != reward_tokenizer.fingerprint():
        raise DataError(f"the reward model {reward_path} uses a different tokenizer from the policy {policy_path} "
                        f"(fingerprints {reward_tokenizer.fingerprint()[:12]} vs "
                        f"{policy_tokenizer.fingerprint()[:12]}): it would score other token ids")


def load_judges(judge: RewardModelsConfig, policy_tokenizer, policy_path: object, vocab_size: int
                ) -> list[RewardModel]:
    """The reward models of `judge.*` (helpfulness, then safety if given), each checked to read the policy's
    tokens: the same vocabulary size and, where the reward model keeps a tokenizer beside it, the same tokenizer."""
    import llama_jax
    from llama_jax.errors import ConfigError
    from llama_jax.tokenizer import load_tokenizer

    if judge.helpfulness is None:
        raise ConfigError("judge.helpfulness is required: the reward model that scores the policy's answers")
    judges = []
    for path in (judge.helpfulness, judge.safety):
        if path is None:
            continue
        model = llama_jax.load(path)
        if not isinstance(model, RewardModel):
            raise ConfigError(f"{path} is a language model, not a reward model (train one with train.reward)")
        candidate = Path(path) / "tokenizer.model"
        if candidate.is_file():
            check_same_tokenizer(policy_tokenizer, load_tokenizer(candidate), policy_path, path)
        if model.config.vocab_size != vocab_size:
            raise DataError(f"the reward model {path} has a vocabulary of {model.config.vocab_size} tokens, the "
                            f"policy {policy_path} {vocab_size}: they cannot share token ids")
        judges.append(model)
    return judges
