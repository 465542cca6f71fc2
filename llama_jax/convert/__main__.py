"""python -m llama_jax.convert SRC DST --to {orbax,hf,meta}: convert a checkpoint, its format detected."""
from __future__ import annotations

import argparse
import re
import time
from collections.abc import Sequence

from llama_jax.cli import run_program
from llama_jax.convert.common import refuse_existing
from llama_jax.errors import ConversionError

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ConversionError(f"--max-shard-size {text!r} is not a size like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.convert",
        description="Convert a Llama checkpoint between llama-jax (Orbax), Hugging Face (safetensors) and Meta "
                    "(consolidated.NN.pth). SRC's format is detected: a Hugging Face folder (config.json + "
                    "*.safetensors), a Meta folder (params.json + consolidated.NN.pth), a llama-jax checkpoint "
                    "(model.json + params/) or a training run directory (its newest complete checkpoint).")
    parser.add_argument("src", metavar="SRC", help="the checkpoint folder to read")
    parser.add_argument("dst", metavar="DST", help="the folder to write (must not exist, unless --overwrite)")
    parser.add_argument("--to", required=True, choices=("orbax", "hf", "meta"), help="output format")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="dtype of the written tensors (default: keep the source's)")
    parser.add_argument("--shards", type=int, default=1,
                        help="Meta only: model-parallel shards to cut the weights into (default 1)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="Hugging Face only: largest safetensors file (default 5GB); larger models get "
                             "model-0000i-of-0000n.safetensors files and an index")
    parser.add_argument("--meta-embedding-split", choices=("auto", "vocab", "dim"), default="auto",
                        help="Meta only: cut the token embedding by vocabulary (Llama 3) or by embedding dim "
                             "(Llama 2); auto picks Llama 3 for a 128K vocabulary, rope theta 500000 or scaled rope")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists (only once complete)")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    from llama_jax import convert

    started = time.perf_counter()
    refuse_existing(args.dst, args.overwrite, how_to_overwrite="--overwrite")
    source_format = convert.detect_format(args.src)
    convert.convert(args.src, args.dst, args.to, dtype=args.dtype, shards=args.shards,
                    max_shard_size=parse_size(args.max_shard_size),
                    meta_embedding_split=args.meta_embedding_split, overwrite=args.overwrite)
    print(f"converted {args.src} ({source_format}) → {args.dst} ({args.to}) in "
          f"{time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    run_program(main)
