"""The pretraining program end to end, its loss curve on a (2,2,2) mesh, and its one-line errors."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from llama_jax.config import MODEL_PRESETS, OptimizerConfig
from llama_jax.data import batch_for_step, build_store
from llama_jax.sharding import make_mesh
from llama_jax.tokenizer import train_sentencepiece
from llama_jax.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model=test", "model.vocab_size=512", "train.batch_size=8", "train.seq_len=64", "train.peak_tflops=1",
         "eval.batches=2"]


def run_program(args, tmp_path, timeout=600):
    env = {**os.environ, "LLAMA_JAX_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "train.pretrain", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_pretrain_on_the_default_corpus_learns(tmp_path):
    run_dir = tmp_path / "run"
    result = run_program(["configs/tiny.yaml", *SMALL, "train.steps=60", "train.log_every_steps=10",
                          "eval.every_steps=20", "optimizer.lr=1e-2", "optimizer.warmup_steps=10",
                          f"run_dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    for record in records:
        assert {"step", "loss", "grad_norm", "lr", "tokens_per_sec", "mfu"} <= set(record)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 3
    assert records[-1]["loss"] < records[0]["loss"] - 0.5 and evals[-1] < evals[0] - 0.5
    assert (run_dir / "config.yaml").is_file() and any((run_dir / "tb").iterdir())
    assert "validation loss" in result.stdout and "unigram entropy" in result.stdout


def test_mesh_2x2x2_gives_the_single_device_loss_curve(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps" for i in range(400)))
    tokenizer = train_sentencepiece([corpus], tmp_path / "tok.model", vocab_size=300)
    store = build_store([corpus], tokenizer, tmp_path / "store")
    config = dataclasses.replace(MODEL_PRESETS["test"], vocab_size=320, dtype="float32")

    def losses(mesh_shape):
        mesh = make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
        trainer = Trainer.create(config, OptimizerConfig(lr=1e-2, warmup_steps=2), 5, mesh, grad_accum=2)
        state, step_fn, curve = trainer.init_state(0), trainer.jit_step((8, 32)), []
        for step in range(5):
            batch = batch_for_step(store, step, 8, 32, seed=0)
            batch = {key: batch[key] for key in ("inputs", "targets", "loss_mask")}
            state, metrics = step_fn(state, batch)
            curve.append(float(metrics["loss"]))
        return np.array(curve)

    single, sharded = losses((1, 1, 1)), losses((2, 2, 2))
    assert single[-1] < single[0]
    np.testing.assert_allclose(sharded, single, rtol=2e-5)


@pytest.mark.parametrize("case", ["empty", "not-utf8", "seq-too-long", "vocab-too-small"])
def test_bad_input_gives_one_clear_error(tmp_path, case):
    data = tmp_path / "data"
    data.mkdir()
    train_file = data / "train.txt"
    train_file.write_text("def g(x):\n    return x + 1\n" * 200)
    args = ["configs/tiny.yaml", *SMALL, "train.steps=2", f"run_dir={tmp_path / 'run'}",
            f"data.path={train_file}", f"data.valid_path={data / 'valid.txt'}"]
    (data / "valid.txt").write_text("def f():\n    return 1\n" * 50)
    expected = {
        "empty": "no documents to train on",
        "not-utf8": "not valid UTF-8",
        "seq-too-long": "train.seq_len=4096 is larger than the model's maximum (model.max_seq_len=128)",
        "vocab-too-small": "model.vocab_size=300 is smaller than the tokenizer's vocabulary",
    }[case]
    if case == "empty":
        train_file.write_text("")
    elif case == "not-utf8":
        train_file.write_bytes(b"good text\n" * 20 + b"\xff\xfe bad bytes")
    elif case == "seq-too-long":
        args.append("train.seq_len=4096")
    else:
        args += [f"data.tokenizer={make_tokenizer(tmp_path)}", "model.vocab_size=300"]
    result = run_program(args, tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def make_tokenizer(tmp_path):
    from llama_jax.data import default_corpus

    return train_sentencepiece(default_corpus("train")[:20], tmp_path / "big.model", vocab_size=400).path
