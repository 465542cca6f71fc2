"""Data mixtures (llama_jax.data.Mixture, `data.mixture`): the deal of windows to sources against hand-computed
counts, each mixed window equal to that source's own window (the single-store path), random access, the drawn mix
reported, and a pretraining run over a two-source mixture."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data import ByteTokenizer

from llama_jax.config import load_config
from llama_jax.data import MIX_BLOCK_WINDOWS, Mixture, batch_for_step, build_store
from llama_jax.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 16


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    kinds = {"prose": [f"prose {i}: " + "words and more words " * (i % 5 + 1) for i in range(30)],
             "code": [f"def f{i}(x):\n    return x * {i}\n" * (i % 3 + 1) for i in range(30)],
             "math": [f"{i} + {i} = {2 * i}; " * (i % 4 + 1) for i in range(30)]}
    return {name: build_store([write_jsonl(root / f"{name}.jsonl", texts)], ByteTokenizer(), root / name)
            for name, texts in kinds.items()}


def test_each_block_deals_the_largest_remainder_counts_and_uses_each_sources_windows_once(stores):
    mixture = Mixture(["prose", "code", "math"], list(stores.values()), [7, 2, 1])
    # 4096 × (0.7, 0.2, 0.1) = 2867.2, 819.2, 409.6: the one window left over goes to the largest remainder (math).
    assert mixture.windows_per_block == [2867, 819, 410]
    located = [mixture.locate(seed=3, window=w) for w in range(3 * MIX_BLOCK_WINDOWS)]
    for source, per_block in enumerate([2867, 819, 410]):
        windows = [index for where, index in located if where == source]
        assert windows == list(range(3 * per_block))  # each of its windows once, in its stream's order
    for block in range(3):
        counts = np.bincount([where for where, _ in located[block * MIX_BLOCK_WINDOWS:(block + 1) * MIX_BLOCK_WINDOWS]])
        assert counts.tolist() == [2867, 819, 410]
    assert mixture.windows_drawn(3, 3 * MIX_BLOCK_WINDOWS).tolist() == [3 * 2867, 3 * 819, 3 * 410]
    partial = 2 * MIX_BLOCK_WINDOWS + 1000
    assert mixture.windows_drawn(3, partial).tolist() == np.bincount([w for w, _ in located[:partial]]).tolist()
    # The deal is spread through the block, not in runs: the first 1000 windows already hold about the weights.
    shares = mixture.windows_drawn(3, 1000) / 1000
    np.testing.assert_allclose(shares, [0.7, 0.2, 0.1], atol=0.05)


def test_a_mixed_batch_is_each_sources_own_window(stores):
    names = ["prose", "code", "math"]
    mixture = Mixture(names, [stores[name] for name in names], [1, 1, 2])
    step, batch_size, seed = 5, 8, 11
    mixed = batch_for_step(mixture, step, batch_size, SEQ_LEN, seed)
    for row in range(batch_size):
        source, window = mixture.locate(seed, step * batch_size + row)
        alone = batch_for_step(stores[names[source]], window, 1, SEQ_LEN, seed)  # its window w, as batch w of size 1
        for key, values in alone.items():
            np.testing.assert_array_equal(mixed[key][row], values[0], err_msg=f"row {row} {key}")


def test_any_step_is_the_same_whatever_came_before(stores):
    def fresh():
        return Mixture(["prose", "code"], [stores["prose"], stores["code"]], [3, 1])

    walked = fresh()
    for step in range(0, 40, 3):
        batch_for_step(walked, step, 4, SEQ_LEN, 0)
    direct = batch_for_step(fresh(), 1200, 4, SEQ_LEN, 0)  # in the second block
    again = batch_for_step(walked, 1200, 4, SEQ_LEN, 0)
    for key in direct:
        np.testing.assert_array_equal(direct[key], again[key])
    # Two processes' rows are the halves of the global batch.
    halves = [batch_for_step(fresh(), 7, 4, SEQ_LEN, 0, process, 2) for process in range(2)]
    whole = batch_for_step(fresh(), 7, 4, SEQ_LEN, 0)
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([half[key] for half in halves]), whole[key])


def test_bad_mixtures_are_refused(stores, tmp_path):
    with pytest.raises(DataError, match=r"^mixture source 'code': weight 1\.00e-04 of the total is below one window "
                                        r"in 4096; raise it or leave the source out$"):
        Mixture(["prose", "code"], [stores["prose"], stores["code"]], [9999, 1])

    class OtherTokenizer(ByteTokenizer):
        def fingerprint(self) -> str:
            return "another-tokenizer"

    other = build_store([write_jsonl(tmp_path / "x.jsonl", ["some text"])], OtherTokenizer(), tmp_path / "x")
    with pytest.raises(DataError, match=r"^mixture sources were tokenized with different tokenizers"):
        Mixture(["prose", "x"], [stores["prose"], other], [1, 1])
    with pytest.raises(ConfigError, match=r"^data\.mixture\[1\]\.weight=0\.0 is not allowed: expected a positive"):
        load_config("configs/tiny.yaml", ["data.mixture=[{path: a, weight: 1}, {path: b, weight: 0}]"])
    with pytest.raises(ConfigError, match=r"^data\.mixture='\[\.\.\.\]' is not allowed: expected either data\.path"):
        load_config("configs/tiny.yaml", ["data.path=a", "data.mixture=[{path: a, weight: 1}]"])
    with pytest.raises(ConfigError, match=r"^unknown config key 'colour' in a data\.mixture entry: allowed keys "
                                          r"there are \['name', 'path', 'text_field', 'valid_path', 'weight'\]$"):
        load_config("configs/tiny.yaml", ["data.mixture=[{path: a, weight: 1, colour: red}]"])


@pytest.mark.slow
def test_pretraining_on_a_mixture_reports_the_mix_it_drew(tmp_path):
    import argparse
    import difflib
    import textwrap

    code = tmp_path / "code"
    code.mkdir()
    for module in (argparse, textwrap):
        (code / f"{module.__name__}.txt").write_text(Path(module.__file__).read_text())
    prose = write_jsonl(tmp_path / "prose.jsonl", [line for line in Path(difflib.__file__).read_text().split("\n\n")
                                                   if line.strip()])
    run_dir = tmp_path / "run"
    mixture = f"[{{path: {code}, weight: 3, name: code}}, {{path: {prose}, weight: 1, name: prose}}]"
    args = ["configs/tiny.yaml", "model=test", "model.vocab_size=512", "train.batch_size=8", "train.seq_len=64",
            "train.steps=4", "train.peak_tflops=1", "eval.every_steps=4", "eval.batches=1", f"run_dir={run_dir}",
            f"data.mixture={mixture}", "data.build_workers=2"]  # the stores tokenized by two processes
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "LLAMA_JAX_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "train.pretrain", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("data mix drawn")]
    # 4 steps × 8 rows = 32 windows, dealt as the first 32 slots of block 0 for seed 0 (computed independently here
    # from the stores the run wrote).
    from llama_jax.data import TokenStore

    stores = [TokenStore.open(run_dir / "token_store" / f"mixture-{i}" / "train") for i in range(2)]
    expected = Mixture(["code", "prose"], stores, [3, 1]).windows_drawn(0, 32)
    assert line == (f"data mix drawn over 32 windows: code {expected[0] / 32:.1%} ({expected[0]} windows; weight "
                    f"75.0%) · prose {expected[1] / 32:.1%} ({expected[1]} windows; weight 25.0%)")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and "eval_loss" in records[-1]
