"""Pretrain a Llama: `python -m train.pretrain CONFIG.yaml [key=value ...] [--fresh]`.

With no `data.path`, trains on the Python standard library's own sources (a tokenizer is trained on them and
cached), so `python -m train.pretrain configs/tiny.yaml` works on a fresh machine with no downloads.
Writes `<run_dir>/config.yaml`, `metrics.jsonl`, TensorBoard events under `tb/` and checkpoints under
`checkpoints/`. Run again with the same run_dir, it resumes from the newest complete checkpoint; `--fresh` (or
`checkpoint.fresh=true`) deletes them and starts over.

Exit status: 0 done · 2 error (one `error:` line) · 75 stopped by SIGTERM/SIGINT with a complete checkpoint (run
the same command to continue) · 128 + signal when a second signal aborted it.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import jax

from llama_jax import distributed
from llama_jax.cli import removed_on_error, run_program
from llama_jax.config import RunConfig, load_config, to_yaml
from llama_jax.data import Mixture, unigram_entropy
from llama_jax.metrics import StartClock
from llama_jax.pretraining_data import global_batch, prepare_pretraining_data
from llama_jax.run_loop import enable_compilation_cache, keep_tokenizer, peak_flops, train, write_run_config
from llama_jax.sharding import mesh_from_config, rules_from_config
from llama_jax.trainer import Trainer

USAGE = """usage: python -m train.pretrain CONFIG.yaml [key=value ...] [--fresh]

Resumes from <run_dir>/checkpoints if present; --fresh deletes them and starts over. Exit status 0 done,
2 error, 75 stopped by SIGTERM/SIGINT after saving (run the same command to continue).

Config keys (YAML file, then key=value overrides; `model` may be a preset name such as llama2-7b or tiny):
"""


def main(argv: Sequence[str]) -> int:
    clock = StartClock()  # the time from the process's start to its first step, by phase
    fresh = "--fresh" in argv
    argv = [arg for arg in argv if arg != "--fresh"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + to_yaml(RunConfig()), end="")
        return 0 if argv else 2
    config = load_config(argv[0], [*argv[1:], *(["checkpoint.fresh=true"] if fresh else [])])
    clock.mark("startup")
    distributed.initialize(config.distributed)
    enable_compilation_cache(config)
    clock.mark("distributed")
    run_dir = Path(config.run_dir)
    mesh = mesh_from_config(config.mesh)
    with removed_on_error(run_dir):  # the run directory appears only once its inputs are known good
        data = prepare_pretraining_data(config, run_dir)
        clock.mark("data")
        trainer = Trainer.create(config.model, config.optimizer, config.train.steps, mesh,
                                 rules_from_config(config.sharding_rules), config.train.grad_accum)
        write_run_config(config, run_dir)
        keep_tokenizer(data.tokenizer, run_dir)
    batch_size, seq_len, seed = config.train.batch_size, config.train.seq_len, config.seed
    masking = config.train.document_masking

    def train_batch(index: int):
        return global_batch(trainer, data.train, index, batch_size, seq_len, seed, masking)

    def eval_batch(index: int):
        return global_batch(trainer, data.valid, index, batch_size, seq_len, seed, masking)

    if jax.process_index() == 0:
        print(f"model: {config.model.num_params():,} parameters · mesh {dict(mesh.shape)} · "
              f"{batch_size}×{seq_len} tokens per step · {data.train.num_tokens:,} training tokens",
              file=sys.stderr)
    state = train(trainer, config, run_dir, train_batch, eval_batch, peak_flops(config, mesh.size),
                  init_state=lambda: trainer.init_state(seed), start_clock=clock)

    if jax.process_index() == 0:
        if isinstance(data.train, Mixture):  # every batch index the run asked for, skipped ones included
            batches = int(jax.device_get(state.step)) + int(jax.device_get(state.data_skip))
            print(data.train.describe_drawn(seed, batches * batch_size), file=sys.stderr)
        summary = summarize(run_dir, unigram_entropy(data.valid))
        print(summary)
    return 0


def summarize(run_dir: Path, unigram_nats: float) -> str:
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [record["eval_loss"] for record in records if "eval_loss" in record]
    final = evals[-1] if evals else float("nan")
    return (f"validation loss {final:.4f} nats/token vs unigram entropy {unigram_nats:.4f} "
            f"({'below' if final < unigram_nats else 'NOT below'} it by {unigram_nats - final:.4f}) · run in {run_dir}")


if __name__ == "__main__":
    run_program(main)
