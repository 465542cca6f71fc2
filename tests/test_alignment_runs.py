"""The alignment programs end to end: train.reward, train.dpo and train.ppo resume bit-identically after kill -9 (the
run loop's checkpoints hold everything, PPO's rollout RNG and prompt position included), give the same step on an
8-device (data 2, fsdp 2, tensor 2) mesh as on one device, refuse bad judges and prompts with one clear error, and
leave run directories that `llama_jax.load` reads back.

References: an uninterrupted run of the same command (for the resumed runs: params compared bit for bit, every
step's metrics equal); a one-device mesh (for the sharded step); the final checkpoint's arrays read with
`ArrayReader` and a score computed here in float64 from the hidden states (for `llama_jax.load`).

The programs run in subprocesses on one CPU device (XLA_FLAGS cleared) sharing a JAX compilation cache.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax.config import (
    MODEL_PRESETS,
    DPOConfig,
    OptimizerConfig,
    PPOConfig,
    RewardConfig,
    RewardModelsConfig,
    RolloutConfig,
)
from llama_jax.convert.native import ArrayReader
from llama_jax.errors import ConfigError, DataError
from llama_jax.model import Llama
from llama_jax.params import model_from_params, model_params
from llama_jax.sharding import make_mesh

REPO = Path(__file__).resolve().parents[1]
CONFIG = dataclasses.replace(MODEL_PRESETS["test"], vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                             ffn_hidden_dim=128, dtype="float32", max_seq_len=128)
STEPS = 6
COMMON = ["train.batch_size=8", f"train.steps={STEPS}", "train.log_every_steps=1", "train.peak_tflops=1",
          "model.dtype=float32", "checkpoint.every_steps=2"]
PAIR_ARGS = ["train.seq_len=64", "sft.epochs=null", "optimizer.lr=1e-3"]
PPO_ARGS = ["optimizer.lr=1e-4", "ppo.prompt_len=32", "rollout.max_new_tokens=16", "ppo.minibatches=2"]
# Fields that measure time (they differ between any two runs): left out when runs are compared.
TIMING = {"tokens_per_sec", "mfu", "time", "goodput", "start"}


# ── Fixtures: a tiny model with its tokenizer, preference pairs, prompts, a reward model ──────────────────────────
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("alignment")


@pytest.fixture(scope="module")
def model_dir(workdir) -> Path:
    """A tiny random Llama in the llama-jax format with a SentencePiece tokenizer inside (train.sft's input)."""
    from llama_jax.tokenizer import train_sentencepiece

    path = workdir / "model"
    llama_jax.save(Llama(CONFIG, rngs=nnx.Rngs(0)), path)
    text = [f"Repeat after me: {i} fox. The quick brown fox jumps over the lazy dog {i} times." for i in range(50)]
    train_sentencepiece(text, path / "tokenizer.model", vocab_size=320)
    return path


@pytest.fixture(scope="module")
def pairs_file(workdir) -> Path:
    path = workdir / "pairs.jsonl"
    strengths = ["better", "significantly better", "slightly better", "negligibly better"]
    path.write_text("".join(json.dumps({"prompt": f"Repeat after me: {i} fox", "chosen": f"{i} fox",
                                        "rejected": f"the lazy dog jumps {i} times", "strength": strengths[i % 4]})
                            + "\n" for i in range(16)))
    return path


@pytest.fixture(scope="module")
def prompts_file(workdir) -> Path:
    path = workdir / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Repeat after me: {i} fox"}) + "\n" for i in range(16)))
    return path


def random_reward_params(seed: int) -> dict[str, jax.Array]:
    from llama_jax.reward_model import reward_params_from_policy

    return reward_params_from_policy(model_params(Llama(CONFIG, rngs=nnx.Rngs(seed))), CONFIG,
                                     jax.random.key(seed))


@pytest.fixture(scope="module")
def judge_dir(workdir, model_dir) -> Path:
    """A saved (untrained) reward model with the policy's tokenizer beside it."""
    from llama_jax.reward_model import RewardModel

    path = workdir / "judge"
    llama_jax.save(RewardModel(CONFIG, random_reward_params(11)), path)
    shutil.copyfile(model_dir / "tokenizer.model", path / "tokenizer.model")
    return path


def program_args(name: str, model_dir: Path, data: Path, judge: Path | None = None) -> list[str]:
    args = ["configs/sft.yaml", f"init_from={model_dir}", f"data.path={data}", *COMMON]
    if name == "train.ppo":
        return [*args, f"judge.helpfulness={judge}", *PPO_ARGS]
    return [*args, *PAIR_ARGS, *(["dpo.precompute_reference=false"] if name == "train.dpo" else [])]


@pytest.fixture(scope="module")
def reference_run(model_dir, pairs_file, prompts_file, judge_dir, workdir):
    """`reference_run(program)`: the run directory of an uninterrupted run of the program (run once per module)."""
    runs: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in runs:
            data = prompts_file if name == "train.ppo" else pairs_file
            run_dir = workdir / f"{name}.reference"
            run_to_end(name, [*program_args(name, model_dir, data, judge_dir), f"run_dir={run_dir}"], workdir,
                       f"{name}.reference", workdir / "cache")
            runs[name] = run_dir
        return runs[name]

    return run


# ── Running a program ────────────────────────────────────────────────────────────────────────────────────────────
class Program:
    """`python -m <module>` on one CPU device, its stderr in a file the test can poll; `cache`: the caches (JAX's
    compilation cache among them) the module's programs share."""

    def __init__(self, module: str, args: list[str], logdir: Path, name: str, cache: Path):
        env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "LLAMA_JAX_CACHE": str(cache),
               "JAX_COMPILATION_CACHE_DIR": str(cache / "jax_compilation"),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        self.stderr_path = logdir / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                                        stdout=subprocess.DEVNULL, stderr=self._stderr)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait(self, timeout=300) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._stderr.close()

    def wait_until(self, condition, timeout=240) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"the run ended (status {self.process.returncode}) before the test's condition:"
                                     f"\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting:\n{self.stderr[-3000:]}")
            time.sleep(0.02)

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)  # by pid, never by name
        self.wait()


def run_to_end(module: str, args: list[str], logdir: Path, name: str, cache: Path) -> str:
    program = Program(module, args, logdir, name, cache)
    status = program.wait()
    assert status == 0, program.stderr[-3000:]
    return program.stderr


def step_records(run_dir: Path) -> dict[int, dict]:
    """Every step's metrics record, timing fields left out."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "step" in record and "loss" in record:
            assert record["step"] not in records, f"step {record['step']} logged twice"
            records[record["step"]] = {key: value for key, value in record.items()
                                       if key not in TIMING and not key.endswith("_seconds")}
    return records


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def complete(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / str(step) / "commit_success.txt").is_file()


def checkpoint_arrays(run_dir: Path, step: int, item: str) -> dict[str, np.ndarray]:
    reader = ArrayReader(run_dir / "checkpoints" / str(step) / item)
    return {name: reader.read(name) for name in reader.names()}


def assert_kill9_resumes_bit_identically(module: str, args: list[str], reference: Path, workdir: Path,
                                         cache: Path, metrics: tuple[str, ...]) -> None:
    """The command killed (SIGKILL) after a checkpoint and before the end, then rerun to the end, against the
    uninterrupted `reference` run: the same final params, optimizer state and RNG, and the same metrics at every
    step."""
    run_dir = workdir / "run"
    killed_args = [*args, f"run_dir={run_dir}", "debug.step_sleep_seconds=0.5"]
    first = Program(module, killed_args, workdir, "first", cache)
    first.wait_until(lambda: complete(run_dir, 2) and logged_steps(run_dir) >= 3)
    first.kill()
    assert not complete(run_dir, STEPS) and logged_steps(run_dir) < STEPS
    stderr = run_to_end(module, killed_args, workdir, "rerun", cache)
    assert "resuming from" in stderr, stderr[-3000:]

    expected, actual = step_records(reference), step_records(run_dir)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert sorted(actual) == sorted(expected)
    for step in expected:
        for name in metrics:
            assert actual[step][name] == expected[step][name], (step, name, actual[step], expected[step])
        assert actual[step] == expected[step], step  # every other metric too
    for item in ("params", "opt_state"):
        ours, theirs = checkpoint_arrays(run_dir, STEPS, item), checkpoint_arrays(reference, STEPS, item)
        assert sorted(ours) == sorted(theirs)
        for name in theirs:
            assert ours[name].dtype == theirs[name].dtype and np.array_equal(ours[name], theirs[name]), (item, name)
    meta = json.loads((run_dir / "checkpoints" / str(STEPS) / "meta" / "meta.json").read_text())
    meta_ref = json.loads((reference / "checkpoints" / str(STEPS) / "meta" / "meta.json").read_text())
    assert meta["rng"] == meta_ref["rng"] and meta["step"] == meta_ref["step"] == STEPS


# ── 1-3. kill -9 and resume ──────────────────────────────────────────────────────────────────────────────────────
@pytest.mark.slow
def test_reward_training_resumes_bit_identically_after_kill9(model_dir, pairs_file, reference_run, workdir,
                                                             tmp_path):
    reference = reference_run("train.reward")
    assert_kill9_resumes_bit_identically("train.reward", program_args("train.reward", model_dir, pairs_file),
                                         reference, tmp_path, workdir / "cache",
                                         ("loss", "accuracy", "reward_chosen", "reward_rejected", "margin"))
    records = step_records(reference)
    assert records[STEPS]["loss"] < records[1]["loss"]  # it trained


@pytest.mark.slow
def test_dpo_training_resumes_bit_identically_after_kill9(model_dir, pairs_file, reference_run, workdir, tmp_path):
    reference = reference_run("train.dpo")
    assert_kill9_resumes_bit_identically("train.dpo", program_args("train.dpo", model_dir, pairs_file), reference,
                                         tmp_path, workdir / "cache",
                                         ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"))
    records = step_records(reference)
    assert records[STEPS]["loss"] < records[1]["loss"]


@pytest.mark.slow
def test_ppo_training_resumes_bit_identically_after_kill9(model_dir, judge_dir, prompts_file, reference_run,
                                                          workdir, tmp_path):
    reference = reference_run("train.ppo")
    # reward and kl are functions of the sampled answers: equal only if the rollout RNG and the prompt position
    # were restored.
    assert_kill9_resumes_bit_identically("train.ppo", program_args("train.ppo", model_dir, prompts_file, judge_dir),
                                         reference, tmp_path, workdir / "cache",
                                         ("reward", "kl", "loss", "response_length"))
    records = step_records(reference)
    # Each step samples fresh answers to fresh prompts: the per-step rewards differ, so equal ones mean something.
    assert len({records[step]["reward"] for step in records}) == STEPS


# ── 4. The sharded step equals the one-device step ───────────────────────────────────────────────────────────────
OPTIMIZER = OptimizerConfig(lr=1e-3, warmup_steps=0, min_lr_ratio=1.0)
MESHES = {"1 device": (1, 1, 1), "data 2, fsdp 2, tensor 2": (2, 2, 2)}


def mesh_of(sizes: tuple[int, int, int]):
    count = int(np.prod(sizes))
    assert len(jax.devices()) >= count
    return make_mesh(*sizes, devices=jax.devices()[:count])


def pair_batch(seq: int = 32) -> dict[str, np.ndarray]:
    """Eight pairs of random token rows: a prompt of 6-10 tokens, an answer after it, padding (0) after that."""
    rng = np.random.default_rng(3)
    local = {}
    for side in ("chosen", "rejected"):
        tokens = np.zeros((8, seq), np.int32)
        mask = np.zeros((8, seq), np.int32)
        for row in range(8):
            prompt, answer = rng.integers(6, 11), rng.integers(3, 15)
            tokens[row, :prompt + answer] = rng.integers(3, CONFIG.vocab_size, prompt + answer)
            mask[row, prompt:prompt + answer] = 1
        local[f"{side}_tokens"], local[f"{side}_mask"] = tokens, mask
    local["margin"] = rng.uniform(0, 1, 8).astype(np.float32)
    return local


def one_step(trainer, params, local, place) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    # numpy copies: on one device state_from_params keeps the caller's buffers, which the step donates
    state = trainer.state_from_params({name: np.array(value) for name, value in params.items()}, seed=5)
    batch = place(trainer, local)
    shape = next(iter(local.values())).shape
    state, metrics = trainer.jit_step((8, shape[1]))(state, batch)
    return ({name: float(value) for name, value in metrics.items()},
            {name: np.asarray(value) for name, value in state.params.items()})


def assert_same_step(results, expect_metrics: tuple[str, ...]) -> None:
    (metrics_1, params_1), (metrics_8, params_8) = results
    assert set(expect_metrics) <= set(metrics_1)
    assert metrics_1.keys() == metrics_8.keys()
    for name in metrics_1:
        np.testing.assert_allclose(metrics_8[name], metrics_1[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert params_1.keys() == params_8.keys()
    for name in params_1:
        np.testing.assert_allclose(params_8[name], params_1[name], rtol=0, atol=1e-5, err_msg=name)


def test_reward_step_on_8_devices_equals_one_device():
    from llama_jax.preference_data import place_pair_batch
    from llama_jax.reward_model import RewardTrainer

    params, local = random_reward_params(1), pair_batch()
    results = []
    for sizes in MESHES.values():
        trainer = RewardTrainer.create_reward(CONFIG, OPTIMIZER, 10, mesh_of(sizes), RewardConfig())
        results.append(one_step(trainer, params, local, lambda t, rows: place_pair_batch(t, rows, 8)))
    assert_same_step(results, ("loss", "accuracy", "reward_chosen", "reward_rejected", "margin", "grad_norm"))
    assert results[0][0]["grad_norm"] > 0


@pytest.mark.slow
def test_dpo_step_on_8_devices_equals_one_device():
    from llama_jax.dpo import DPOTrainer
    from llama_jax.preference_data import place_pair_batch

    policy = model_params(Llama(CONFIG, rngs=nnx.Rngs(1)))
    reference = model_params(Llama(CONFIG, rngs=nnx.Rngs(2)))  # another model: nonzero implicit rewards
    local = {name: value for name, value in pair_batch().items() if name != "margin"}
    results = []
    for sizes in MESHES.values():
        trainer = DPOTrainer.create_dpo(CONFIG, OPTIMIZER, 10, mesh_of(sizes), DPOConfig(), reference)
        results.append(one_step(trainer, policy, local, lambda t, rows: place_pair_batch(t, rows, 8)))
    assert_same_step(results, ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"))
    assert abs(results[0][0]["rewards/margins"]) > 1e-4


@pytest.mark.slow
def test_ppo_step_on_8_devices_equals_one_device():
    from llama_jax.ppo import PPOTrainer, PromptBatches
    from llama_jax.reward_model import RewardModel

    policy = model_params(Llama(CONFIG, rngs=nnx.Rngs(1)))
    judge = RewardModel(CONFIG, random_reward_params(4))
    rng = np.random.default_rng(9)
    prompts = [list(rng.integers(3, CONFIG.vocab_size, rng.integers(4, 13))) for _ in range(8)]
    local = PromptBatches(prompts, [False] * 8, 16, 8, seed=0).batch(0)
    ppo = PPOConfig(prompt_len=16, minibatches=2, epochs=2)
    rollout = RolloutConfig(max_new_tokens=8, temperature=1.0)
    results = []
    for sizes in MESHES.values():
        trainer = PPOTrainer.create_ppo(CONFIG, OPTIMIZER, 10, mesh_of(sizes), ppo, rollout,
                                        RewardModelsConfig(helpfulness="judge"), policy, [judge], stop_ids=[2],
                                        pad_id=0)
        results.append(one_step(trainer, policy, local, lambda t, rows: t.place_rows(rows, 8)))
    assert_same_step(results, ("loss", "reward", "kl", "policy_loss", "value_loss", "entropy", "response_length"))
    assert "value_head.weight" in results[0][1]


# ── 5. Errors ────────────────────────────────────────────────────────────────────────────────────────────────────
def run_ppo_expecting_error(monkeypatch, capsys, args: list[str]) -> str:
    """train.ppo's main through run_program: the one-line `error: ...` it prints (status 2, no traceback)."""
    from llama_jax.cli import run_program
    from train.ppo import main

    monkeypatch.chdir(REPO)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_program(main, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def ppo_args(model_dir, judge, prompts, run_dir, *extra) -> list[str]:
    return ["configs/sft.yaml", f"init_from={model_dir}", f"judge.helpfulness={judge}", f"data.path={prompts}",
            f"run_dir={run_dir}", "train.compilation_cache=none", *COMMON, *PPO_ARGS, *extra]


def test_ppo_refuses_a_reward_model_with_another_tokenizer(model_dir, prompts_file, tmp_path, monkeypatch, capsys):
    from llama_jax.reward_model import RewardModel
    from llama_jax.tokenizer import load_tokenizer, train_sentencepiece

    judge = tmp_path / "judge"
    llama_jax.save(RewardModel(CONFIG, random_reward_params(11)), judge)
    text = [f"Lorem ipsum dolor sit amet {i}, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut "
            f"labore et dolore magna aliqua {i * 7}." for i in range(50)]
    train_sentencepiece(text, judge / "tokenizer.model", vocab_size=320)
    # Same vocabulary size, another tokenizer: only the tokenizer check can tell.
    assert load_tokenizer(judge / "tokenizer.model").vocab_size == load_tokenizer(
        model_dir / "tokenizer.model").vocab_size == CONFIG.vocab_size
    with pytest.raises(DataError, match="different tokenizer"):
        from train.ppo import main

        monkeypatch.chdir(REPO)
        main(ppo_args(model_dir, judge, prompts_file, tmp_path / "run"))
    line = run_ppo_expecting_error(monkeypatch, capsys, ppo_args(model_dir, judge, prompts_file, tmp_path / "run"))
    assert "different tokenizer" in line and str(judge) in line


def test_ppo_refuses_a_language_model_as_judge(model_dir, prompts_file, tmp_path, monkeypatch, capsys):
    from train.ppo import main

    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="not a reward model"):
        main(ppo_args(model_dir, model_dir, prompts_file, tmp_path / "run"))
    line = run_ppo_expecting_error(monkeypatch, capsys, ppo_args(model_dir, model_dir, prompts_file,
                                                                 tmp_path / "run"))
    assert str(model_dir) in line and "not a reward model" in line


def test_ppo_refuses_a_prompt_longer_than_prompt_len(model_dir, judge_dir, tmp_path, monkeypatch, capsys):
    from train.ppo import main

    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "Repeat after me: 1 fox"}, {"prompt": "Repeat after me: 2 fox"},
             {"prompt": " ".join(["The quick brown fox jumps over the lazy dog."] * 8)}, {"prompt": "3 fox"}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.chdir(REPO)
    with pytest.raises(DataError, match=r"prompts\.jsonl:3\b.*ppo\.prompt_len=32"):
        main(ppo_args(model_dir, judge_dir, prompts, tmp_path / "run"))
    line = run_ppo_expecting_error(monkeypatch, capsys, ppo_args(model_dir, judge_dir, prompts, tmp_path / "run"))
    assert f"{prompts}:3" in line


# ── 6. llama_jax.load of the run directories ─────────────────────────────────────────────────────────────────────
def hand_scores(params: dict[str, np.ndarray], tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The score read by hand: the final-normed hidden state (a plain Llama holding the backbone's arrays) at each
    row's last answer token, times the head, in float64."""
    from llama_jax.reward_model import SCORE, backbone_config

    backbone = model_from_params(backbone_config(CONFIG), {k: v for k, v in params.items() if k != SCORE})
    hidden = np.asarray(backbone.hidden_states(jnp.asarray(tokens)), np.float64)
    last = [max(np.flatnonzero(row)) for row in mask]
    return np.array([hidden[row, index] @ params[SCORE].astype(np.float64)[:, 0] for row, index in enumerate(last)])


@pytest.mark.slow
def test_load_reads_reward_and_ppo_runs(model_dir, reference_run):
    from llama_jax.reward_model import RewardModel

    reward_dir, ppo_dir = reference_run("train.reward"), reference_run("train.ppo")

    # The reward run: a RewardModel holding the final checkpoint's arrays, scoring as the hand computation does.
    reward = llama_jax.load(reward_dir)
    assert isinstance(reward, RewardModel)
    saved = checkpoint_arrays(reward_dir, STEPS, "params")
    assert sorted(reward.params) == sorted(saved) and "score.weight" in saved and "output" not in saved
    for name, value in saved.items():
        assert np.array_equal(np.asarray(reward.params[name]), value), name
    local = pair_batch(seq=24)
    tokens, mask = local["chosen_tokens"], local["chosen_mask"]
    np.testing.assert_allclose(reward.score_tokens(tokens, mask), hand_scores(saved, tokens, mask),
                               rtol=1e-4, atol=1e-4)
    start = {name: np.asarray(value) for name, value in model_params(llama_jax.load(model_dir)).items()}
    assert any(not np.array_equal(start[name], saved[name]) for name in saved if name in start)  # trained

    # The PPO run: the policy as a Llama, the value head left out, every other array the checkpoint's.
    policy = llama_jax.load(ppo_dir)
    assert isinstance(policy, Llama)
    saved = checkpoint_arrays(ppo_dir, STEPS, "params")
    assert "value_head.weight" in saved
    loaded = {name: np.asarray(value) for name, value in model_params(policy).items()}
    assert sorted(loaded) == sorted(set(saved) - {"value_head.weight"})
    for name, value in loaded.items():
        assert np.array_equal(value, saved[name]), name
    assert any(not np.array_equal(start[name], loaded[name]) for name in loaded)  # PPO moved the policy


# ── Two processes ────────────────────────────────────────────────────────────────────────────────────────────────
@pytest.mark.slow
def test_ppo_in_two_processes_trains_like_one_process(model_dir, judge_dir, prompts_file, reference_run, workdir,
                                                      tmp_path):
    """PPO as two processes × 4 devices joined by JAX's distributed runtime (each building only its rows of the
    prompt batch; rollouts, scoring and updates inside the step across both) gives the one-device run's metrics."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "two"
    args = [*program_args("train.ppo", model_dir, prompts_file, judge_dir), f"run_dir={run_dir}",
            f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
            "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "LLAMA_JAX_CACHE": str(tmp_path / "cache")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    processes = []
    for i in range(2):
        log = open(tmp_path / f"process{i}.log", "w")
        processes.append((subprocess.Popen([sys.executable, "-m", "train.ppo", *args, f"distributed.process_id={i}"],
                                           cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        statuses = [process.wait(timeout=400) for process, _ in processes]
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.kill()  # by PID
                process.wait()
            log.close()
    assert statuses == [0, 0], (tmp_path / "process0.log").read_text()[-3000:]
    one, two = step_records(reference_run("train.ppo")), step_records(run_dir)
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        for key in ("reward", "kl", "loss", "policy_loss", "value_loss", "entropy", "response_length"):
            np.testing.assert_allclose(two[step][key], one[step][key], rtol=2e-4, atol=2e-5, err_msg=f"{key} {step}")
