"""Chat fine-tuning as Llama 2-Chat was made: `python -m train.sft CONFIG.yaml init_from=PATH data.path=chats.jsonl`.

Conversations (JSONL, one `{"messages": [{"role": ..., "content": ...}, ...]}` per line; `data.path` is a file, a
folder of *.jsonl files or a glob) are rendered in the Llama 2 or Llama 3 chat format (`sft.format`); the loss falls
only on assistant answers (and their EOS / <|eot_id|>), never on system or user tokens. Several conversations are
packed per sequence, and attention never crosses from one to another (segment ids). The run machinery — sharding,
metrics, evaluation, checkpoints, resume — is pretraining's (`llama_jax.run_loop`); the run directory keeps the
tokenizer, and `llama_jax.load(run_dir)` (so `--model run_dir` in eval.generate and eval.chat) reads the final
checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

from llama_jax.chat_format import EncodedDialog, encode_dialog
from llama_jax.cli import run_program
from llama_jax.config import RunConfig
from llama_jax.metrics import StartClock
from llama_jax.params import model_params
from llama_jax.run_loop import (
    keep_tokenizer,
    load_fine_tuning_base,
    peak_flops,
    program_config,
    train,
    write_run_config,
)
from llama_jax.sft_data import PackedSFTBatches, read_chat_sources
from llama_jax.sharding import mesh_from_config, rules_from_config
from llama_jax.tokenizer import Tokenizer
from llama_jax.trainer import Trainer

USAGE = """usage: python -m train.sft CONFIG.yaml init_from=CHECKPOINT data.path=CHATS.jsonl [key=value ...]

Config keys (as for train.pretrain, plus init_from and sft.*):
"""


def main(argv: Sequence[str]) -> int:
    clock = StartClock()  # the time from the process's start to its first step, by phase
    config = program_config(argv, USAGE, clock)
    if isinstance(config, int):
        return config
    base = load_fine_tuning_base(
        config, init_from="the checkpoint to fine-tune (a run dir, llama-jax, HF or Meta)",
        data="chat JSONL, one {\"messages\": [...]} conversation per line", seq_len=config.train.seq_len)
    pretrained, tokenizer, model_config = base.model, base.tokenizer, base.model_config
    train_dialogs = _encode(config.data.path, tokenizer, config)
    batches = PackedSFTBatches(train_dialogs, config.train.seq_len, config.train.batch_size, tokenizer.pad_id,
                               config.seed)
    clock.mark("data")  # the pretrained weights, the tokenizer and the conversations
    steps = config.train.steps
    if config.sft.epochs is not None:
        steps = max(1, math.ceil(config.sft.epochs * len(batches.epoch_rows(0)) / config.train.batch_size))
    config = dataclasses.replace(config, model=model_config, train=dataclasses.replace(config.train, steps=steps))
    run_dir = Path(config.run_dir)
    mesh = mesh_from_config(config.mesh)
    rules = rules_from_config(config.sharding_rules)
    pretrained_params = model_params(pretrained)
    if config.lora.rank > 0:  # LoRA / QLoRA: adapters train over the frozen (maybe quantized) pretrained weights
        from llama_jax.lora import LoraTrainer

        trainer = LoraTrainer.create_lora(model_config, config.optimizer, steps, mesh, config.lora, pretrained_params,
                                          rules, config.train.grad_accum)
        init_state = lambda: trainer.init_state(config.seed)  # noqa: E731
    else:
        trainer = Trainer.create(model_config, config.optimizer, steps, mesh, rules, config.train.grad_accum)
        init_state = lambda: trainer.state_from_params(pretrained_params, config.seed)  # noqa: E731
    eval_batches = None
    if config.data.valid_path is not None:
        valid = PackedSFTBatches(_encode(config.data.valid_path, tokenizer, config), config.train.seq_len,
                                 config.train.batch_size, tokenizer.pad_id, config.seed)
        eval_batches = lambda index: sft_batch(trainer, valid, index, config)  # noqa: E731
    write_run_config(config, run_dir)  # only now that every input has been read
    keep_tokenizer(tokenizer, run_dir)
    if jax.process_index() == 0:
        trained = sum(x.size for x in jax.tree.leaves(trainer.abstract_state().params))
        print(f"fine-tuning {trained:,} of {model_config.num_params():,} parameters from {config.init_from} on "
              f"{len(train_dialogs)} conversations ({len(batches.epoch_rows(0))} packed rows per epoch) for "
              f"{steps} steps", file=sys.stderr)
    # The loop's last checkpoint holds the final parameters: `llama_jax.load(run_dir)` reads them.
    train(trainer, config, run_dir, lambda index: sft_batch(trainer, batches, index, config), eval_batches,
          peak_flops(config, mesh.size),
          init_state=init_state, start_clock=clock)
    if jax.process_index() == 0 and config.lora.rank > 0:
        print(f"LoRA adapters in {run_dir}; export or merge them with python -m llama_jax.convert.lora --run "
              f"{run_dir} --peft DIR --merged DIR (docs/lora.md)")
    elif jax.process_index() == 0:
        print(f"fine-tuned model in {run_dir} (e.g. python -m eval.chat --model {run_dir})")
    return 0


def _encode(sources: str, tokenizer: Tokenizer, config: RunConfig) -> list[EncodedDialog]:
    return [encode_dialog(messages, tokenizer, config.sft.format, for_generation=False)
            for messages in read_chat_sources(sources)]


def sft_batch(trainer: Trainer, batches: PackedSFTBatches, index: int, config: RunConfig) -> dict[str, jax.Array]:
    """Packed batch `index` as global arrays; each process builds only its own rows."""
    rows = batches.batch(index, process_index=jax.process_index(), process_count=jax.process_count())
    local = {"inputs": rows.tokens, "targets": rows.targets, "loss_mask": rows.loss_mask,
             "segment_ids": rows.segment_ids, "positions": rows.positions}
    return trainer.place_rows(local, config.train.batch_size)


if __name__ == "__main__":
    run_program(main)
