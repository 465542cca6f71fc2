"""python -m llama_jax.convert.lora: a LoRA run's adapters as PEFT files, and merged into a plain checkpoint.

    --run RUN_DIR                        a `train.sft ... lora.rank=R` run: its newest adapters, its base (init_from)
    --base CHECKPOINT --adapter PEFT_DIR  or a base checkpoint (any format) with a PEFT LoRA adapter folder

    --peft DIR     writes adapter_config.json + adapter_model.safetensors (load with peft.PeftModel.from_pretrained
                   onto the Hugging Face export of the base)
    --merged DIR   writes the base with W + (alpha/r)·A·B folded in, a plain checkpoint (--to orbax|hf|meta)

The LoRA math, the PEFT layout and what a QLoRA merge means are in `llama_jax.lora` and docs/lora.md.
"""
from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from llama_jax.cli import run_program
from llama_jax.convert.common import refuse_existing
from llama_jax.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.convert.lora",
        description="Export a LoRA run's adapters in Hugging Face PEFT's format, and/or merge them (or a PEFT "
                    "adapter) into the base weights as a plain checkpoint.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_DIR", help="a LoRA training run directory (train.sft lora.rank=R)")
    source.add_argument("--adapter", metavar="PEFT_DIR", help="a PEFT LoRA adapter folder (with --base)")
    parser.add_argument("--base", metavar="CHECKPOINT",
                        help="the base checkpoint (any format); default with --run: the run's init_from")
    parser.add_argument("--peft", metavar="DIR", help="write the adapters here as PEFT files")
    parser.add_argument("--merged", metavar="DIR", help="write the merged model here")
    parser.add_argument("--to", choices=("orbax", "hf", "meta"), default="orbax",
                        help="format of --merged (default orbax, the llama-jax format)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="dtype of --merged's tensors (default float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.peft is None and args.merged is None:
        raise ConfigError("nothing to write: give --peft DIR and/or --merged DIR")
    if args.adapter is not None and args.base is None:
        raise ConfigError("--adapter needs --base: the checkpoint the adapter was trained on")
    if args.adapter is not None and args.peft is not None:
        raise ConfigError("--peft exports a run's adapters; --adapter is already a PEFT folder (use --merged)")
    for output in (args.peft, args.merged):
        if output is not None:
            refuse_existing(output, args.overwrite, how_to_overwrite="--overwrite")

    import llama_jax
    from llama_jax import lora
    from llama_jax.params import model_from_params, model_params

    started = time.perf_counter()
    if args.run is not None:
        run = lora.read_lora_run(args.run)
        base_path, settings, adapters = Path(args.base or run.config.init_from), run.lora, run.adapters
        tokenizer_dirs = [Path(args.run), base_path]
    else:
        base_path = Path(args.base)
        tokenizer_dirs = [base_path]
    base = llama_jax.load(base_path)
    if args.adapter is not None:
        settings, adapters = lora.import_peft(args.adapter, base.config)
    if args.peft is not None:
        if args.overwrite and Path(args.peft).exists():
            shutil.rmtree(args.peft)
        lora.export_peft(adapters, base.config, settings, args.peft, base_model=str(base_path))
        print(f"wrote the PEFT adapter (r={settings.rank}, alpha={settings.alpha:g}, targets {settings.targets}) "
              f"to {args.peft}")
    if args.merged is not None:
        merged = model_from_params(base.config, lora.merge(model_params(base), adapters, base.config, settings))
        llama_jax.save(merged, args.merged, format=args.to, dtype=args.dtype, overwrite=args.overwrite)
        _copy_tokenizer(tokenizer_dirs, Path(args.merged))
        print(f"wrote the merged model ({args.to}) to {args.merged} in {time.perf_counter() - started:.1f} s")
    return 0


def _copy_tokenizer(sources: list[Path], destination: Path) -> None:
    """The first source's tokenizer files beside the merged weights (a server needs them too)."""
    from llama_jax.convert import TOKENIZER_FILES

    for source in sources:
        files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
        if files:
            for file in files:
                shutil.copyfile(file, destination / file.name)
            return


if __name__ == "__main__":
    run_program(main)
