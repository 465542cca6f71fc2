"""Fault tolerance: resume after kill -9 (also mid-save) and SIGTERM bit-identical to an uninterrupted run (and the
goodput the run reports through the kills, against one computed from its records), rollback on NaN and on a loss
spike, the rollback cap, fallback from a truncated checkpoint, restore onto another mesh, `ls`, and train.sft reading
a run directory without Orbax's metadata warnings.

The end-to-end tests run `python -m train.pretrain` on one CPU device (XLA_FLAGS cleared) in subprocesses that share
a JAX compilation cache; the others call `llama_jax.run_loop.train` in this process with one Trainer (compiled once).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llama_jax.checkpoint import PREEMPTED_EXIT_STATUS, RunCheckpoints, format_listing, list_checkpoints
from llama_jax.config import GuardConfig, load_config
from llama_jax.data import build_store
from llama_jax.errors import CheckpointError
from llama_jax.guard import DivergenceError, Guard
from llama_jax.metrics import Goodput, read_records
from llama_jax.pretraining_data import global_batch
from llama_jax.run_loop import train
from llama_jax.sharding import make_mesh
from llama_jax.tokenizer import train_sentencepiece
from llama_jax.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
STEPS = 24
MODEL = ["model=test", "model.vocab_size=512", "train.batch_size=8", "train.seq_len=64", "train.peak_tflops=1",
         "optimizer.lr=1e-2", "optimizer.warmup_steps=5", "train.log_every_steps=1", "eval.every_steps=8",
         "eval.batches=2", "checkpoint.every_steps=4", "guard.warmup_steps=8"]
# Fields that measure time (they differ between any two runs): left out when runs are compared.
TIMING = ("tokens_per_sec", "mfu", "time", "step_seconds", "checkpoint_seconds", "eval_seconds", "restore_seconds",
          "goodput", "start")


# ── Shared fixtures ──────────────────────────────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus (three standard-library modules) and a SentencePiece tokenizer trained on it once."""
    import argparse
    import difflib
    import textwrap

    root = tmp_path_factory.mktemp("corpus")
    (root / "train.txt").write_text("".join(Path(m.__file__).read_text() for m in (argparse, difflib)))
    (root / "valid.txt").write_text(Path(textwrap.__file__).read_text())
    tokenizer = train_sentencepiece([root / "train.txt"], root / "tok.model", vocab_size=512)
    return root, tokenizer


def program_args(corpus, run_dir, *extra):
    root, tokenizer = corpus
    return ["configs/tiny.yaml", *MODEL, f"train.steps={STEPS}", f"run_dir={run_dir}",
            f"data.path={root / 'train.txt'}", f"data.valid_path={root / 'valid.txt'}",
            f"data.tokenizer={tokenizer.path}", *extra]


class Program:
    """`python -m train.pretrain` on one CPU device, its output in files the test can poll."""

    def __init__(self, args, workdir: Path, name: str):
        env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "LLAMA_JAX_CACHE": str(workdir / "cache"),
               "JAX_COMPILATION_CACHE_DIR": str(workdir / "jax_cache"),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        self.stderr_path = workdir / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "train.pretrain", *args], cwd=REPO, env=env,
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


def records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def complete(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / str(step) / "commit_success.txt").is_file()


def saved_arrays(step_dir: Path) -> dict[str, np.ndarray]:
    """Every array of a checkpoint step (params and optimizer state) as numpy, by path."""
    arrays = {}
    for item in ("params", "opt_state"):
        with ocp.PyTreeCheckpointer() as checkpointer:
            tree = checkpointer.metadata(step_dir / item).item_metadata.tree
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            restored = checkpointer.restore(step_dir / item, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        for path, value in jax.tree_util.tree_leaves_with_path(restored):
            arrays[item + jax.tree_util.keystr(path)] = np.asarray(value)
    return arrays


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert records(run_dir) == records(reference)  # every step's loss, grad norm, lr and eval loss, in order
    final = f"checkpoints/{STEPS}"
    ours, theirs = saved_arrays(run_dir / final), saved_arrays(reference / final)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and ours[name].tobytes() == theirs[name].tobytes(), name
    meta = json.loads((run_dir / final / "meta" / "meta.json").read_text())
    meta_ref = json.loads((reference / final / "meta" / "meta.json").read_text())
    assert {k: v for k, v in meta.items() if k != "time"} == {k: v for k, v in meta_ref.items() if k != "time"}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted run, started in the background; waited for by the first test that needs it."""
    workdir = tmp_path_factory.mktemp("reference")
    run_dir = workdir / "run"
    program = Program(program_args(corpus, run_dir), workdir, "reference")

    def finished() -> Path:
        if program.process.returncode is None:
            status = program.wait()
            assert status == 0, program.stderr[-3000:]
        return run_dir

    yield finished
    if program.process.poll() is None:
        program.kill()


# ── kill -9 and SIGTERM: resumed runs are bit-identical ──────────────────────────────────────────────────────────
@pytest.mark.slow
def test_kill9_at_several_points_including_mid_save_resumes_bit_identically(corpus, reference, tmp_path):
    run_dir = tmp_path / "run"
    args = program_args(corpus, run_dir, "debug.step_sleep_seconds=0.2")

    # 1. Killed between checkpoints (4 is complete, 8 not yet written).
    first = Program(args, tmp_path, "first")
    first.wait_until(lambda: complete(run_dir, 4) and logged_steps(run_dir) >= 6)
    first.kill()
    assert logged_steps(run_dir) < 8 and not complete(run_dir, 8)

    # 2. Killed in the middle of an asynchronous save: step 8's write is held open while training goes on.
    second = Program([*args, "debug.save_delay_seconds=60"], tmp_path, "second")

    def unfinished():
        return [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("8.orbax-checkpoint-tmp")]

    second.wait_until(lambda: unfinished() and logged_steps(run_dir) >= 10)
    second.kill()
    assert "resuming from" in second.stderr and f"checkpoints/4 (step 4 of {STEPS}" in second.stderr
    assert unfinished() and not complete(run_dir, 8)  # a torn save, never taken for a checkpoint
    assert [e.status for e in list_checkpoints(run_dir) if e.name.startswith("8")] == ["unfinished"]

    # 3. Killed just after a save completed.
    third = Program(args, tmp_path, "third")
    third.wait_until(lambda: complete(run_dir, 16) and logged_steps(run_dir) >= 17)
    third.kill()
    assert f"checkpoints/4 (step 4 of {STEPS}" in third.stderr and not unfinished()

    # 4. Runs to the end.
    last = Program(args, tmp_path, "last")
    assert last.wait() == 0, last.stderr[-3000:]
    assert f"checkpoints/16 (step 16 of {STEPS}" in last.stderr
    assert_same_run(run_dir, reference())
    assert_goodput_by_hand(run_dir, restarts=3)
    # The last start loaded its train step from the persistent compilation cache the earlier runs filled.
    starts = [r["start"] for r in read_records(run_dir / "metrics.jsonl") if "start" in r]
    assert starts[-1]["restored_step"] == 16 and starts[-1]["compile_cache_hits"] >= 1
    # The run directory stays readable as a model (the conversion contract: checkpoints/<step>/params).
    import llama_jax

    model = llama_jax.load(run_dir, dtype="float32")
    np.testing.assert_array_equal(np.asarray(model.embedding[...]),
                                  saved_arrays(run_dir / f"checkpoints/{STEPS}")["params['embedding']"])


def assert_goodput_by_hand(run_dir: Path, restarts: int) -> None:
    """The goodput the run reports, against one computed here from its records: productive time is the
    `step_seconds` of the steps the final trajectory kept, wall time runs from the first process start to the last
    record, and the losses make up the rest."""
    records = read_records(run_dir / "metrics.jsonl")
    starts = [r["start"] for r in records if "start" in r]
    first_start = min([s["process_start"] for s in starts]
                      + [s["carried"]["first_start"] for s in starts if s["carried"] and s["carried"]["first_start"]])
    wall = records[-1]["time"] - first_start
    kept: dict[int, float] = {}
    for record in records:
        if record.get("event") == "rollback":
            kept = {step: seconds for step, seconds in kept.items() if step <= record["restored_step"]}
        elif "event" not in record:
            kept[record["step"]] = record["step_seconds"]
    productive = sum(kept.values())
    assert records[-1]["goodput"] == pytest.approx(productive / wall, rel=1e-9)
    summary = Goodput.of(records).summary()
    assert summary["restarts"] == restarts and summary["wall_seconds"] == pytest.approx(wall)
    assert summary["productive_seconds"] + sum(summary["lost_seconds"].values()) == pytest.approx(wall)
    assert summary["lost_seconds"]["lost_work"] > 0  # steps after a checkpoint were trained again
    assert all(loss >= 0 for loss in summary["lost_seconds"].values())


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_resumes_a_second_signal_aborts(corpus, reference, tmp_path):
    run_dir = tmp_path / "run"
    args = program_args(corpus, run_dir, "debug.step_sleep_seconds=0.2")
    first = Program(args, tmp_path, "first")
    first.wait_until(lambda: logged_steps(run_dir) >= 6)
    first.process.send_signal(signal.SIGTERM)
    assert first.wait() == PREEMPTED_EXIT_STATUS, first.stderr[-3000:]
    stopped = [line for line in first.stderr.splitlines() if line.startswith("stopped by SIGTERM at step ")]
    assert len(stopped) == 1, first.stderr[-3000:]
    step = int(stopped[0].split("at step ")[1].split(":")[0])
    assert 6 <= step < STEPS and step % 4 != 0  # saved at the step boundary, not at a scheduled checkpoint
    assert complete(run_dir, step)
    meta = json.loads((run_dir / "checkpoints" / str(step) / "meta" / "meta.json").read_text())
    assert meta["step"] == step and meta["metrics_lines"] == logged_steps(run_dir) == step
    listed = {e.step: e.status for e in list_checkpoints(run_dir, verify=True)}
    assert listed[step] == "complete"

    # A second signal while the save is held open aborts at once (128 + SIGTERM), leaving no checkpoint behind.
    second = Program([*args, "debug.save_delay_seconds=60", "checkpoint.every_steps=1000"], tmp_path, "second")
    second.wait_until(lambda: logged_steps(run_dir) >= step + 2)
    second.process.send_signal(signal.SIGTERM)
    second.wait_until(lambda: any(".orbax-checkpoint-tmp" in p.name for p in (run_dir / "checkpoints").iterdir()))
    second.process.send_signal(signal.SIGTERM)
    assert second.wait() == 128 + signal.SIGTERM, second.stderr[-3000:]
    assert "aborting without waiting" in second.stderr
    assert max(e.step for e in list_checkpoints(run_dir) if e.status == "complete") == step

    last = Program(args, tmp_path, "last")
    assert last.wait() == 0, last.stderr[-3000:]
    assert f"checkpoints/{step} (step {step} of {STEPS}" in last.stderr
    assert_same_run(run_dir, reference())


@pytest.mark.slow
def test_two_processes_agree_on_the_preemption_step(corpus, tmp_path):
    """SIGTERM to process 1 only: JAX's preemption sync point makes both save the same step and exit 75."""
    import socket

    run_dir = tmp_path / "run"

    def start(name):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [Program(program_args(corpus, run_dir, "debug.step_sleep_seconds=0.2",
                                     f"distributed.coordinator_address=127.0.0.1:{port}",
                                     "distributed.num_processes=2", f"distributed.process_id={i}"),
                        tmp_path, f"{name}{i}") for i in range(2)]

    first = start("first")
    first[0].wait_until(lambda: logged_steps(run_dir) >= 6)
    first[1].process.send_signal(signal.SIGTERM)
    assert [p.wait() for p in first] == [PREEMPTED_EXIT_STATUS] * 2, first[0].stderr[-2000:] + first[1].stderr[-2000:]
    stopped = [line for line in first[0].stderr.splitlines() if line.startswith("stopped by SIGTERM at step ")]
    step = int(stopped[0].split("at step ")[1].split(":")[0])
    assert complete(run_dir, step) and logged_steps(run_dir) == step

    last = start("last")
    assert [p.wait() for p in last] == [0, 0], last[0].stderr[-2000:] + last[1].stderr[-2000:]
    assert f"checkpoints/{step} (step {step} of {STEPS}" in last[0].stderr
    assert [r["step"] for r in records(run_dir)] == list(range(1, STEPS + 1))


# ── In-process runs: rollback, the cap, corrupted checkpoints, another mesh ─────────────────────────────────────
@pytest.fixture(scope="module")
def setup(corpus, tmp_path_factory):
    """One Trainer on one device (so every in-process run shares one compiled step) and the batch functions."""
    root, tokenizer = corpus
    stores = tmp_path_factory.mktemp("stores")
    train_store = build_store([root / "train.txt"], tokenizer, stores / "train")
    valid_store = build_store([root / "valid.txt"], tokenizer, stores / "valid")
    config = load_config(None, [*MODEL, f"train.steps={STEPS}"])
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    trainer = Trainer.create(config.model, config.optimizer, STEPS, mesh)

    def batches(store):
        return lambda index: global_batch(trainer, store, index, 8, 64, 0, False)

    return trainer, batches(train_store), batches(valid_store)


def run_in_process(setup, run_dir: Path, *overrides):
    trainer, train_batch, eval_batch = setup
    config = load_config(None, [*MODEL, f"train.steps={STEPS}", f"run_dir={run_dir}", *overrides])
    return train(trainer, config, run_dir, train_batch, eval_batch, 1e12, init_state=lambda: trainer.init_state(0))


def events(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "event" in r]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The surviving trajectory's loss per step (a rolled-back step's line is superseded by its repeat)."""
    return {r["step"]: r["loss"] for r in records(run_dir) if "event" not in r}


def test_nan_at_a_step_rolls_back_skips_its_batch_and_finishes(setup, tmp_path, capsys):
    run_dir = tmp_path / "run"
    state = run_in_process(setup, run_dir, "debug.inject_nan_at_step=14")
    assert int(state.step) == STEPS and int(state.data_skip) == 2  # batches 12, 13 (skipped with the NaN one)
    [event] = events(run_dir)
    assert event == {"step": 14, "event": "rollback", "reason": "non-finite loss", "loss": "nan", "grad_norm": "nan",
                     "restored_step": 12, "skipped_batches": 2, "next_batch": 14, "data_skip": 2,
                     "rollbacks_in_window": 1}
    steps = [r["step"] for r in records(run_dir)]
    assert steps == list(range(1, 14)) + [14] + list(range(13, STEPS + 1))  # history, the event, the new steps
    assert all(np.isfinite(loss) for loss in losses_by_step(run_dir).values())
    err = capsys.readouterr().err
    assert "rollback 1 (of at most 3 in 1000 steps): non-finite loss at step 14" in err
    assert "restored checkpoint 12, step 12; skipping 2 batches: the next batch is 14" in err
    meta = json.loads((run_dir / "checkpoints" / str(STEPS) / "meta" / "meta.json").read_text())
    assert meta["guard"]["rollbacks"] == [14] and meta["data_skip"] == 2


def test_loss_spike_from_corrupted_batches_rolls_back(setup, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_in_process(setup, run_dir, "debug.spike_at_step=15", "debug.spike_batches=3", "guard.spike_steps=3",
                   "guard.ema_decay=0.8")
    [event] = events(run_dir)
    assert event["reason"].startswith("loss spike: 3 steps above") and event["step"] == 17
    assert event["restored_step"] == 12 and event["next_batch"] == 17  # checkpoint 16 was held back by the spike
    assert json.loads((run_dir / "checkpoints/16/meta/meta.json").read_text())["data_skip"] == 5
    history = records(run_dir)
    before = history[:history.index({**event})]
    spiking = [r["loss"] for r in before if r["step"] in (15, 16)]  # step 17's values went into the event
    normal = losses_by_step(run_dir)
    assert len(spiking) == 2 and min(spiking + [event["loss"]]) > normal[14] + 1.0
    assert max(loss for step, loss in normal.items() if step > 12) < min(spiking) - 1.0  # back on track
    assert "loss spike" in capsys.readouterr().err


def test_rollback_cap_ends_a_run_that_keeps_diverging(setup, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"training keeps diverging: non-finite loss at step 10 would be "
                                              r"rollback 3 within 1000 steps \(guard.max_rollbacks=2; rollbacks at "
                                              r"steps 10, 10, 10\)"):
        # Logged every 7 steps, step 10 is judged while step 11 runs (the loop's one-step lag).
        run_in_process(setup, run_dir, "debug.inject_nan_at_step=10", "debug.inject_nan_sticky=true",
                       "guard.max_rollbacks=2", "train.log_every_steps=7")
    assert [e["rollbacks_in_window"] for e in events(run_dir)] == [1, 2]


def test_guard_statistics():
    guard = Guard(GuardConfig(warmup_steps=3, spike_sigmas=3.0, spike_min_delta=0.5, spike_steps=2))
    for step, loss in enumerate([5.0, 4.9, 4.8, 4.7], start=1):
        assert guard.observe(step, loss, 1.0) is None
    assert guard.observe(5, 5.0, 1.0) is None and not guard.suspect  # within the margin
    assert guard.observe(6, 9.0, 1.0) is None and guard.suspect  # one spiking step: not yet
    assert guard.observe(7, 4.6, 1.0) is None and not guard.suspect  # it ended: the run resets
    assert guard.observe(8, 9.0, 1.0) is None
    verdict = guard.observe(9, 9.5, 1.0)
    assert verdict is not None and verdict.before == 7 and verdict.step == 9
    assert guard.observe(10, 4.0, float("inf")).reason == "non-finite gradient norm"


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(setup, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_in_process(setup, run_dir)
    before = records(run_dir)
    newest = run_dir / "checkpoints" / str(STEPS)
    data_files = sorted((p for p in (newest / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
                        key=lambda p: p.stat().st_size)
    victim = data_files[-1]
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])
    capsys.readouterr()

    run_in_process(setup, run_dir)  # resumes: 24 is unreadable, so from 20, and trains 21..24 again
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warning) == 1 and str(newest) in warning[0] and "is unreadable" in warning[0], err
    assert warning[0].endswith(f"moved it to {newest}.corrupt; using checkpoint 20 instead")
    assert f"resuming from {run_dir / 'checkpoints' / '20'}" in err
    assert records(run_dir) == before  # the same steps again, bit for bit, and no line twice
    listing = {e.name: e.status for e in list_checkpoints(run_dir)}
    assert listing[f"{STEPS}.corrupt"] == "corrupt" and listing[str(STEPS)] == "complete"

    # When no checkpoint can be read the run stops with an error instead of silently starting over.
    for step_dir in (run_dir / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            (step_dir / "meta" / "meta.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be restored \(checkpoint .*/16 is unreadable"):
        run_in_process(setup, run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["16", "20", "24", "24.corrupt"]


def test_restore_onto_a_different_mesh(tmp_path):
    config = load_config(None, [*MODEL, f"train.steps={STEPS}", f"run_dir={tmp_path}"])
    saver = Trainer.create(config.model, config.optimizer, STEPS, make_mesh(1, 8, 1))
    shardings = saver.state_shardings()
    state = saver.init_state(0)
    # A non-trivial optimizer state (Adam moments and count), made in its shards.
    state = jax.jit(lambda s: s.replace(opt_state=jax.tree.map(lambda x: x + jnp.arange(x.size, dtype=x.dtype)
                                                               .reshape(x.shape) % 7, s.opt_state)),
                    out_shardings=shardings)(state)
    checkpoints = RunCheckpoints(tmp_path, saver, config)
    checkpoints.save(2, state, {"step": 2, "data_skip": 0, "rng": [0, 0], "guard": {}, "metrics_lines": 0})
    checkpoints.close()
    saved = jax.tree.map(np.asarray, (state.params, state.opt_state))

    loader = Trainer.create(config.model, config.optimizer, STEPS, make_mesh(2, 2, 2))
    restored = RunCheckpoints(tmp_path, loader, config).restore_latest()
    assert restored.step == 2
    w_q = restored.state.params["blocks.attention.w_q"]
    assert tuple(w_q.sharding.spec) == (None, "fsdp", "tensor", None) and dict(w_q.sharding.mesh.shape) == {
        "data": 2, "fsdp": 2, "tensor": 2}
    for ours, theirs in zip(jax.tree.leaves((restored.state.params, restored.state.opt_state)), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(ours), theirs)
    assert jax.tree.structure(restored.state.opt_state) == jax.tree.structure(state.opt_state)


def test_ls_lists_checkpoints(setup, tmp_path):
    run_dir = tmp_path / "run"
    run_in_process(setup, run_dir, "checkpoint.keep=2", "checkpoint.keep_every=8")
    assert [e.step for e in list_checkpoints(run_dir)] == [8, 16, 20, 24]  # 2 newest + every multiple of 8
    result = subprocess.run([sys.executable, "-m", "llama_jax.checkpoint", "ls", str(run_dir), "--verify"],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["step", "saved", "size", "status", "next", "batch", "loss", "rollbacks"]
    assert [row.split()[0] for row in rows[:-1]] == ["8", "16", "20", "24"]
    assert all(row.split()[5] == "complete" for row in rows[:-1])
    assert format_listing(list_checkpoints(run_dir)) in result.stdout
    assert rows[-1].startswith("goodput ") and "since the first start (0 restarts)" in rows[-1]


@pytest.mark.slow
def test_sft_from_a_pretraining_run_prints_no_orbax_metadata_warnings(setup, corpus, tmp_path):
    """train.sft started from a run directory reads its newest checkpoint without Orbax's absl warnings about a
    step-level metadata file (which lives one level above the `params` item it reads)."""
    from llama_jax.run_loop import write_run_config

    run_dir = tmp_path / "pretrained"
    run_in_process(setup, run_dir, "train.steps=4", "checkpoint.every_steps=4")
    write_run_config(load_config(None, [*MODEL, f"run_dir={run_dir}"]), run_dir)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                                      {"role": "assistant", "content": f"{i}"}]}) + "\n"
                             for i in range(4)))
    result = subprocess.run(
        [sys.executable, "-m", "train.sft", "configs/sft.yaml", f"init_from={run_dir}", f"data.path={chats}",
         f"data.tokenizer={corpus[1].path}", f"run_dir={tmp_path / 'sft'}", "train.batch_size=2", "train.seq_len=64",
         "sft.epochs=null", "train.steps=1", "train.peak_tflops=1", "eval.batches=1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "LLAMA_JAX_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Metadata file does not exist" not in result.stderr and "absl" not in result.stderr, result.stderr[-3000:]
