"""Decode speed next to transformers: `python -m scripts.bench_decode [--batches 1 8] [--runs 3]`.

One random-weight model (MODEL_PRESETS['bench-s'] by default) is built in transformers and converted through
llama_jax.layout, so both sides run the same weights. Each side completes the same random prompts (128 tokens) with
128 new tokens, greedily and without stopping early, in this one process; the runs of all sides are interleaved, so
a change in machine load hits them alike. Reported: new tokens per second (batch × new tokens / wall time of the
whole call, prefill included), the median over the timed runs after one warm-up run (which compiles our programs),
and how many of our float32 tokens equal transformers' (random weights have near-ties, so a late divergence is
rounding, not a bug; the tests check exact equality on small models).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@dataclasses.dataclass
class Side:
    name: str
    run: Callable[[np.ndarray], np.ndarray]  # prompts [batch, len] → new tokens [batch, new]
    times: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    tokens: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)


def build_models(preset: str, seed: int):
    """A transformers LlamaForCausalLM with random weights and our float32 and bfloat16-compute copies of it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_jax.config import MODEL_PRESETS
    from llama_jax.convert.weight_map import hf_mappings, params_from_external
    from llama_jax.params import model_from_params

    config = dataclasses.replace(MODEL_PRESETS[preset], dtype="float32", remat_policy="none")
    torch.manual_seed(seed)
    hf_model = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=config.tie_embeddings)).float().eval()
    hf_model.generation_config.eos_token_id = None  # every row writes all new tokens, as ours does (no stop ids)
    state = {name: tensor.detach().numpy() for name, tensor in hf_model.state_dict().items()}
    params = params_from_external(config, hf_mappings(config), state.__getitem__)
    ours_f32 = model_from_params(config, params)
    ours_bf16 = model_from_params(dataclasses.replace(config, dtype="bfloat16"), params)
    return config, hf_model, ours_f32, ours_bf16


def ours_runner(model, new_tokens: int) -> Callable[[np.ndarray], np.ndarray]:
    from llama_jax.generate import generate

    def run(prompts: np.ndarray) -> np.ndarray:
        completions = generate(model, prompts.tolist(), max_new_tokens=new_tokens)  # no stop ids: all 128 tokens
        return np.array([completion.tokens for completion in completions])

    return run


def transformers_runner(hf_model, new_tokens: int) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def run(prompts: np.ndarray) -> np.ndarray:
        ids = torch.as_tensor(prompts, dtype=torch.long)
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=new_tokens, pad_token_id=0)
        return out[:, prompts.shape[1]:].numpy()

    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench-s")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side and batch, after one warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-bf16", action="store_true", help="also time transformers with bfloat16 weights")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads per side (1 makes a comparison on a busy machine fairer: each side then gets "
                             "its share of a core instead of losing time when its threads wait for each other)")
    args = parser.parse_args(argv)
    if args.threads == 1:  # must be set before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()

    import copy

    import torch

    torch.set_num_threads(args.threads)
    config, hf_model, ours_f32, ours_bf16 = build_models(args.preset, args.seed)
    sides = [Side("llama-jax f32", ours_runner(ours_f32, args.new_tokens)),
             Side("llama-jax bf16 compute", ours_runner(ours_bf16, args.new_tokens)),
             Side("transformers f32", transformers_runner(hf_model, args.new_tokens))]
    if args.hf_bf16:
        sides.append(Side("transformers bf16", transformers_runner(copy.deepcopy(hf_model).to(torch.bfloat16),
                                                                   args.new_tokens)))
    rng = np.random.default_rng(args.seed)
    load_before = os.getloadavg()[0]
    for batch in args.batches:
        prompts = rng.integers(3, config.vocab_size, (batch, args.prompt_len)).astype(np.int32)
        for side in sides:
            side.tokens[batch] = side.run(prompts)  # warm-up: compiles our programs, fills torch's caches
            side.times[batch] = []
        for _ in range(args.runs):
            for side in sides:
                start = time.perf_counter()
                side.run(prompts)
                side.times[batch].append(time.perf_counter() - start)
    print_table(args, config, sides, load_before)
    return 0


def print_table(args: argparse.Namespace, config, sides: list[Side], load_before: float) -> None:
    reference = next(side for side in sides if side.name == "transformers f32")
    print(f"decode, {args.preset} ({config.num_params() / 1e6:.1f}M params), prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, greedy; median of {args.runs} runs after a warm-up; "
          f"{args.threads} thread(s) per side on {os.cpu_count()} CPU cores, load average {load_before:.1f} before / "
          f"{os.getloadavg()[0]:.1f} after")
    print(f"| {'implementation':<24} | batch | new tokens/s | s per call | tokens equal to transformers f32 |")
    print(f"|{'-' * 26}|-------|--------------|------------|----------------------------------|")
    for batch in args.batches:
        for side in sides:
            seconds = statistics.median(side.times[batch])
            rate = batch * args.new_tokens / seconds
            equal = (side.tokens[batch] == reference.tokens[batch]).mean()
            print(f"| {side.name:<24} | {batch:>5} | {rate:>12.1f} | {seconds:>10.2f} | {equal:>32.1%} |")


if __name__ == "__main__":
    from llama_jax.cli import run_program

    run_program(main)
