"""Goodput and restart time: the account `metrics.Goodput` keeps, checked against hand computations on records written
here, and the fields a run writes (time, step_seconds, start phases, carried lost work, goodput so far), checked
against the records themselves. No assertion is on a duration: only on how recorded durations add up.
"""
import json
import time
from pathlib import Path

import jax
import pytest

from llama_jax.config import load_config
from llama_jax.data import build_store
from llama_jax.metrics import START_PHASES, Goodput, StartClock, format_goodput, process_start_time, read_records
from llama_jax.pretraining_data import global_batch
from llama_jax.run_loop import train
from llama_jax.sharding import make_mesh
from llama_jax.tokenizer import train_sentencepiece
from llama_jax.trainer import Trainer

STEPS = 8
MODEL = ["model=test", "model.vocab_size=512", "train.batch_size=4", "train.seq_len=32", "train.peak_tflops=1",
         "optimizer.warmup_steps=2", "train.log_every_steps=1", "eval.every_steps=4", "eval.batches=1",
         "checkpoint.every_steps=4", "guard.enabled=false"]


# ── The account, by hand ─────────────────────────────────────────────────────────────────────────────────────────
def start(process_start, carried=None, **phases):
    return {"process_start": process_start, "restored_step": None, "phases": phases, "carried": carried}


def test_goodput_account_by_hand():
    phases = dict(startup=2.0, distributed=0.5, data=1.0, setup=0.5, restore=1.0, compile=3.0, first_step=0.4)
    carried = {"first_start": None, "starts": 1,
               "lost": {"startup": 4.0, "restore": 0.5, "compile": 1.0, "rolled_back": 0.0, "lost_work": 6.0,
                        "checkpoint": 0.25, "eval": 0.0}}
    records = [
        {"step": 1, "time": 1010.0, "step_seconds": 1.5, "checkpoint_seconds": 0.0, "start": start(1000.0, **phases)},
        {"step": 2, "time": 1012.0, "step_seconds": 1.5, "checkpoint_seconds": 0.0, "eval_seconds": 0.5},
        {"step": 3, "time": 1014.0, "step_seconds": 1.75, "checkpoint_seconds": 0.25},
        # Steps 3 and 4 diverged: back to step 2; step 3's time and this record's are rolled back.
        {"step": 4, "time": 1017.0, "event": "rollback", "restored_step": 2, "step_seconds": 1.5,
         "checkpoint_seconds": 0.0, "restore_seconds": 1.0},
        {"step": 3, "time": 1019.0, "step_seconds": 2.0, "checkpoint_seconds": 0.0},
        # A restart (after a kill that lost 6 s of steps, carried by the next start), at 1030.
        {"step": 4, "time": 1040.0, "step_seconds": 1.0, "checkpoint_seconds": 0.0,
         "start": start(1030.0, carried, **phases)},
    ]
    summary = Goodput.of(records).summary()
    wall = 1040.0 - 1000.0
    productive = 1.5 + 1.5 + 2.0 + 1.0
    lost = {"startup": 2 * 4.0 + 4.0, "restore": 2 * 1.0 + 0.5, "compile": 2 * 3.0 + 1.0,
            "rolled_back": 1.75 + 1.5 + 1.0, "lost_work": 6.0, "checkpoint": 0.25 + 0.25, "eval": 0.5}
    lost["other"] = wall - productive - sum(lost.values())
    assert summary["wall_seconds"] == wall and summary["productive_seconds"] == productive
    assert summary["goodput"] == pytest.approx(productive / wall)
    assert summary["lost_seconds"] == pytest.approx(lost) and summary["restarts"] == 2
    assert format_goodput(summary).startswith(f"goodput {100 * productive / wall:.1f}% of 40.0 s since the first "
                                              f"start (2 restarts); lost: startup 12.0 s")
    # Up to a later moment (a live run): the extra time is `other`.
    assert Goodput.of(records).summary(end=1050.0)["lost_seconds"]["other"] == pytest.approx(lost["other"] + 10)


def test_records_cut_by_a_resume_carry_their_time_as_lost_work():
    cut = [{"step": 5, "time": 7.0, "step_seconds": 2.0, "checkpoint_seconds": 0.5,
            "start": start(1.0, None, startup=1.0, restore=2.0)},
           {"step": 6, "time": 9.0, "step_seconds": 1.5, "checkpoint_seconds": 0.0, "eval_seconds": 0.25}]
    carried = Goodput.of(cut).as_carried()
    assert carried["first_start"] == 1.0 and carried["starts"] == 1
    assert carried["lost"] == {"startup": 1.0, "restore": 2.0, "compile": 0.0, "rolled_back": 0.0, "lost_work": 3.5,
                               "checkpoint": 0.5, "eval": 0.25}
    assert Goodput().summary()["goodput"] is None  # no recorded start: unknown, never a made-up figure
    assert format_goodput(Goodput().summary()).startswith("goodput: unknown")


def test_a_torn_last_line_and_a_damaged_line_are_left_out(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "time": 1.0}\nnot json\n[1, 2]\n{"step": 2, "time": 2.0}\n{"step": 3, "ti')
    assert read_records(path) == [{"step": 1, "time": 1.0}, {"step": 2, "time": 2.0}]
    assert read_records(path, skip=2) == [{"step": 2, "time": 2.0}]
    assert read_records(tmp_path / "missing.jsonl") == []


def test_start_clock_books_the_time_between_marks():
    clock = StartClock(process_start=time.time() - 5.0)
    clock.mark("startup")
    clock.mark("data")
    clock.mark("data")
    assert list(clock.phases) == ["startup", "data"] and clock.phases["startup"] >= 5.0
    assert clock.total() == pytest.approx(sum(clock.phases.values()))
    assert time.time() - 7 * 24 * 3600 < process_start_time() <= time.time()  # this process, started before now


# ── What a run writes ────────────────────────────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import argparse

    root = tmp_path_factory.mktemp("corpus")
    (root / "train.txt").write_text(Path(argparse.__file__).read_text())
    tokenizer = train_sentencepiece([root / "train.txt"], root / "tok.model", vocab_size=512)
    store = build_store([root / "train.txt"], tokenizer, root / "store")
    config = load_config(None, [*MODEL, f"train.steps={STEPS}"])
    trainer = Trainer.create(config.model, config.optimizer, STEPS, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    return trainer, lambda index: global_batch(trainer, store, index, 4, 32, 0, False)


def run(setup, run_dir: Path):
    trainer, batches = setup
    config = load_config(None, [*MODEL, f"train.steps={STEPS}", f"run_dir={run_dir}"])
    train(trainer, config, run_dir, batches, batches, 1e12, init_state=lambda: trainer.init_state(0))
    return read_records(run_dir / "metrics.jsonl")


def test_a_run_records_its_start_its_time_and_its_goodput(setup, tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = run(setup, run_dir)
    assert [r["step"] for r in first] == list(range(1, STEPS + 1))
    times = [r["time"] for r in first]
    assert times == sorted(times)
    for record in first:
        assert record["step_seconds"] >= 0 and record["checkpoint_seconds"] >= 0
        assert ("eval_seconds" in record) == ("eval_loss" in record)
    started = first[0]["start"]
    assert set(started["phases"]) == {"setup", "restore", "data", "compile", "first_step"} <= set(START_PHASES)
    assert started["restored_step"] is None and started["carried"] is None
    assert started["to_first_step_seconds"] == pytest.approx(sum(started["phases"].values()))
    assert all("start" not in r for r in first[1:])
    err = capsys.readouterr().err
    assert "first step" in err and "fresh start" in err and "goodput " in err

    # Killed after step 6 as far as the checkpoints know: checkpoint 8 never got written.
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "8")
    cut = first[4:]  # the records after checkpoint 4's line count
    resumed = run(setup, run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert resumed[:4] == first[:4]
    restart = resumed[4]["start"]
    assert restart["restored_step"] == 4 and restart["devices"] == 1 and restart["peak_flops"] == 1e12
    assert restart["carried"]["lost"]["lost_work"] == pytest.approx(sum(r["step_seconds"] for r in cut))
    assert restart["carried"]["lost"]["eval"] == pytest.approx(sum(r.get("eval_seconds", 0) for r in cut))
    # Each step record's goodput is the account of the file up to it.
    for i, record in enumerate(resumed):
        assert record["goodput"] == pytest.approx(Goodput.of(resumed[:i + 1]).summary()["goodput"], rel=1e-12)
    summary = Goodput.of(resumed).summary()
    assert summary["restarts"] == 1
    assert summary["wall_seconds"] == pytest.approx(resumed[-1]["time"] - first[0]["start"]["process_start"])
    assert summary["productive_seconds"] == pytest.approx(sum(r["step_seconds"] for r in resumed))
    assert "resumed at step 4" in capsys.readouterr().err
    json.dumps(resumed)  # plain JSON all the way down
