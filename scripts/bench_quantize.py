"""Quantized inference on a trained model: `python -m scripts.bench_quantize [--run-dir DIR] [--steps N]`.

Trains configs/tiny.yaml for --steps steps on the default corpus (the standard library's sources) unless --run-dir
already holds a finished run, then compares float32, bfloat16-compute, int8 and int4 (weight-only, llama_jax.quantize)
versions of the same weights:
- weight bytes as the decoder holds them (`generate.decode_weights`: float weights cast to the compute dtype,
  quantized ones as integers plus float32 scales) and on disk (llama-jax checkpoint, bfloat16 checkpoint, quantized
  checkpoint);
- validation bits per byte on the default corpus's validation split (`stdlib:valid`, the first --eval-batches
  batches of --eval-batch-size × --seq-len tokens, as `eval.perplexity --batches` scores them);
- greedy decode tokens/s (`generate`, --prompt-len prompt tokens from the validation text, --new-tokens new tokens,
  no early stop) at each --batches size: the median of --runs timed runs after a warm-up, all variants interleaved
  so that a change in machine load hits them alike; and the share of greedy tokens equal to float32's (position by
  position: after a row's first different token the rest of it mostly differs too).
Then the same decode timing on a random-weight model of --speed-preset (default bench-s, 56M parameters), where reading
the weights takes a larger share of a step than in the tiny model, whose 19 MiB of float32 weights nearly fit the
CPU's caches. Prints Markdown tables (and --json writes the figures).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@dataclasses.dataclass
class Variant:
    name: str
    model: object
    save: object  # (model, path) → None: writes its checkpoint
    figures: dict = dataclasses.field(default_factory=dict)
    times: dict = dataclasses.field(default_factory=dict)
    tokens: dict = dataclasses.field(default_factory=dict)


def ensure_trained(run_dir: Path, steps: int) -> None:
    """Train configs/tiny.yaml into run_dir unless a finished run is there already."""
    from llama_jax.convert.native import is_run_dir, run_steps

    if is_run_dir(run_dir) and run_steps(run_dir) and max(run_steps(run_dir)) >= steps:
        return
    command = [sys.executable, "-m", "train.pretrain", "configs/tiny.yaml", f"run_dir={run_dir}",
               f"train.steps={steps}"]
    print("training:", " ".join(command[1:]), file=sys.stderr, flush=True)
    subprocess.run(command, check=True)


def build_variants(run_dir: Path, int4_group: int | None) -> list[Variant]:
    import llama_jax
    from llama_jax import quantize

    def save_float(dtype):
        return lambda model, path: llama_jax.save(model, path, dtype=dtype)

    variants = [Variant("float32", llama_jax.load(run_dir, dtype="float32"), save_float(None)),
                Variant("bf16", llama_jax.load(run_dir, dtype="bfloat16"), save_float("bfloat16"))]
    for dtype, suffix in (("float32", ""), ("bfloat16", " (bf16 compute)")):
        for mode, group in (("int8", None), ("int4", int4_group)):
            model = quantize.load_model(run_dir, quantize=mode, group_size=group, dtype=dtype)
            variants.append(Variant(f"{mode}{suffix}", model, quantize.save_quantized))
    return variants


def decode_bytes(model) -> dict[str, int]:
    """Bytes of the weights the decoder holds (what each decode step reads): all, and the blocks' alone (the part
    that is quantized; the rest is the embedding, the output head and the final norm)."""
    import jax

    from llama_jax.generate import decode_weights

    weights = decode_weights(model)[1]
    size = lambda tree: sum(leaf.on_device_size_in_bytes() for leaf in jax.tree.leaves(tree))  # noqa: E731
    return {"decode_bytes": size(weights), "decode_block_bytes": size(weights.layers)}


def disk_bytes(variant: Variant) -> int:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "checkpoint"
        variant.save(variant.model, path)
        return sum(file.stat().st_size for file in (path / "params").rglob("*") if file.is_file())


def bits_per_byte(variant: Variant, tokenizer, args: argparse.Namespace) -> dict:
    from llama_jax.data import default_corpus
    from llama_jax.scoring import Scorer, count_text_bytes, evaluate_perplexity, open_text_store

    sources = default_corpus("valid")
    store = open_text_store(sources, tokenizer)
    # A quantized model is scored through its dequantized weights (`params.model_params`), the numbers its own
    # products use (tests/test_quantize.py checks that the logits are equal).
    result = evaluate_perplexity(Scorer.place(variant.model), store, seq_len=args.seq_len,
                                 batch_size=args.eval_batch_size, num_batches=args.eval_batches,
                                 text_bytes=count_text_bytes(sources), progress=False)
    return {"loss": result.loss, "bits_per_byte": result.bits_per_byte}


def prompts_from_validation(tokenizer, batch: int, length: int, seed: int) -> np.ndarray:
    from llama_jax.data import default_corpus

    rng = np.random.default_rng(seed)
    files = default_corpus("valid")
    rows = []
    while len(rows) < batch:
        ids = tokenizer.encode(files[rng.integers(len(files))].read_text(errors="replace"), bos=True)
        if len(ids) >= length:
            start = int(rng.integers(0, len(ids) - length + 1))
            rows.append(ids[start:start + length])
    return np.array(rows, np.int32)


def random_variants(preset: str, int4_group: int | None, seed: int) -> list[Variant]:
    """float32, bf16, int8 and int4 of one random-weight model of a preset (decode speed does not depend on what the
    weights learned; a larger model shows where reading the weights dominates a step)."""
    from flax import nnx

    from llama_jax import quantize
    from llama_jax.config import MODEL_PRESETS
    from llama_jax.model import Llama
    from llama_jax.params import model_from_params, model_params

    config = dataclasses.replace(MODEL_PRESETS[preset], dtype="float32", remat_policy="none")
    params = model_params(Llama(config, rngs=nnx.Rngs(seed)))
    models = {dtype: model_from_params(dataclasses.replace(config, dtype=dtype), params)
              for dtype in ("float32", "bfloat16")}
    variants = [Variant("float32", models["float32"], None), Variant("bf16", models["bfloat16"], None)]
    for dtype, suffix in (("float32", ""), ("bfloat16", " (bf16 compute)")):
        for mode, group in (("int8", None), ("int4", int4_group)):
            variants.append(Variant(f"{mode}{suffix}", quantize.quantize_model(models[dtype], mode, group_size=group),
                                    None))
    return variants


def time_decoding(variants: list[Variant], prompts_of, args: argparse.Namespace) -> None:
    """prompts_of(batch) → token id rows [batch, prompt_len]."""
    from llama_jax.generate import generate

    for batch in args.batches:
        prompts = prompts_of(batch).tolist()
        for variant in variants:  # warm-up: compiles
            completions = generate(variant.model, prompts, max_new_tokens=args.new_tokens)
            variant.tokens[batch] = np.array([c.tokens for c in completions])
            variant.times[batch] = []
        for _ in range(args.runs):
            for variant in variants:
                start = time.perf_counter()
                generate(variant.model, prompts, max_new_tokens=args.new_tokens)
                variant.times[batch].append(time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/quantize-bench/pretrain"))
    parser.add_argument("--steps", type=int, default=300, help="training steps of configs/tiny.yaml")
    parser.add_argument("--int4-group-size", type=int, default=None, help="default: quantize's (64)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed-preset", default="bench-s",
                        help="also time decoding of a random-weight model of this preset ('' for none)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    ensure_trained(args.run_dir, args.steps)
    from llama_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.run_dir / "tokenizer.model")
    variants = build_variants(args.run_dir, args.int4_group_size)
    for variant in variants:
        variant.figures.update(**decode_bytes(variant.model), disk_bytes=disk_bytes(variant),
                               **bits_per_byte(variant, tokenizer, args))
    load_before = os.getloadavg()[0]
    time_decoding(variants, lambda batch: prompts_from_validation(tokenizer, batch, args.prompt_len, args.seed),
                  args)
    print_table(variants, args, load_before)
    figures = {"trained": {v.name: {**v.figures, "seconds": v.times} for v in variants}}
    if args.speed_preset:
        variants = random_variants(args.speed_preset, args.int4_group_size, args.seed)
        for variant in variants:
            variant.figures.update(**decode_bytes(variant.model))
        config = variants[0].model.config
        rng = np.random.default_rng(args.seed)
        load_before = os.getloadavg()[0]
        time_decoding(variants, lambda batch: rng.integers(3, config.vocab_size, (batch, args.prompt_len)), args)
        print(f"\nDecode speed of a random-weight {args.speed_preset} model:\n")
        print_speed_table(variants, args, load_before)
        figures[args.speed_preset] = {v.name: {**v.figures, "seconds": v.times} for v in variants}
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def speed_cells(variant: Variant, base: Variant, args: argparse.Namespace) -> list[str]:
    cells = []
    for batch in args.batches:
        rate = batch * args.new_tokens / statistics.median(variant.times[batch])
        base_rate = batch * args.new_tokens / statistics.median(base.times[batch])
        same = float(np.mean(variant.tokens[batch] == base.tokens[batch]))
        cells += [f"{rate:.0f}", f"{rate / base_rate:.2f}×", f"{same:.0%}"]
    return cells


def speed_header(args: argparse.Namespace) -> list[str]:
    return [cell for batch in args.batches
            for cell in (f"tokens/s b{batch}", f"vs f32 b{batch}", f"= f32 tokens b{batch}")]


def print_rows(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def mib(variant: Variant) -> str:
    return (f"{variant.figures['decode_bytes'] / 2**20:.2f} "
            f"({variant.figures['decode_block_bytes'] / 2**20:.2f})")


def print_table(variants: list[Variant], args: argparse.Namespace, load_before: float) -> None:
    header = ["variant", "decoder weights MiB (blocks)", "checkpoint MiB", "valid loss", "bits/byte",
              *speed_header(args)]
    print_rows(header, [[v.name, mib(v), f"{v.figures['disk_bytes'] / 2**20:.2f}", f"{v.figures['loss']:.5f}",
                         f"{v.figures['bits_per_byte']:.5f}", *speed_cells(v, variants[0], args)]
                        for v in variants])
    print(f"\nmodel {args.run_dir} · seq_len {args.seq_len} · {args.eval_batches}×{args.eval_batch_size} validation "
          f"windows · prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy, median of {args.runs} runs · "
          f"load average {load_before:.1f} before timing, {os.getloadavg()[0]:.1f} after")


def print_speed_table(variants: list[Variant], args: argparse.Namespace, load_before: float) -> None:
    print_rows(["variant", "decoder weights MiB (blocks)", *speed_header(args)],
               [[v.name, mib(v), *speed_cells(v, variants[0], args)] for v in variants])
    print(f"\nprompt {args.prompt_len} random tokens + {args.new_tokens} new tokens, greedy, median of {args.runs} "
          f"runs · load average {load_before:.1f} before timing, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    sys.exit(main())
