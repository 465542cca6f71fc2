"""Server throughput under concurrent clients, next to `generate`: `python -m scripts.bench_serve [--preset tiny]`.

One random-weight model (MODEL_PRESETS[--preset], vocabulary of a SentencePiece tokenizer trained here on stdlib
source text) is served in this process by `llama_jax.serving` (uvicorn on 127.0.0.1, a free port, --slots 16).
Clients are threads sending `POST /v1/completions` with token-id prompts (--prompt-len random tokens), greedy,
max_tokens=--new-tokens; each client sends --requests requests one after another. For 1, 4, 8 and 16 clients it
prints the generated tokens per second (all clients' completion tokens over the wall time of the round) and the
p50/p99 request latency. In the same run, `llama_jax.generate.generate` completes the same prompts at batch 1 and
batch 8 (no stop ids) for the reference rates; the rounds and the reference runs alternate, so a change in machine
load hits both. Every round and reference is run once untimed first (compiles). Loopback only; bounded by
--requests and --max-seconds per round.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def build(preset: str, workdir: Path):
    """The tokenizer (trained on a few stdlib modules' source) and a random model with its vocabulary."""
    import collections
    import json

    from flax import nnx

    from llama_jax.config import MODEL_PRESETS
    from llama_jax.model import Llama
    from llama_jax.tokenizer import train_sentencepiece

    text = "\n".join(inspect.getsource(module) for module in (collections, json, argparse, inspect))
    tokenizer = train_sentencepiece([text], workdir / "tokenizer.model", vocab_size=2048)
    config = dataclasses.replace(MODEL_PRESETS[preset], vocab_size=tokenizer.vocab_size, dtype="float32",
                                 remat_policy="none", max_seq_len=512)
    return tokenizer, Llama(config, rngs=nnx.Rngs(0))


def serve(engine, tokenizer):
    """uvicorn in a thread on a free loopback port; returns (base url, server)."""
    import uvicorn

    from llama_jax.serving import ServerConfig, build_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = build_app(engine, tokenizer, ServerConfig(model_name="bench", chat_format="llama2"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def client_round(url: str, prompts: list[list[int]], clients: int, requests: int, new_tokens: int,
                 max_seconds: float) -> tuple[float, list[float], int]:
    """(wall seconds, request latencies, completion tokens) of `clients` threads × `requests` requests each."""
    import httpx

    latencies, tokens, lock = [], [0], threading.Lock()
    deadline = time.monotonic() + max_seconds

    def client(index: int) -> None:
        with httpx.Client(timeout=max_seconds) as http:
            for r in range(requests):
                if time.monotonic() > deadline:
                    return
                start = time.perf_counter()
                answer = http.post(f"{url}/v1/completions", json={
                    "prompt": prompts[(index * requests + r) % len(prompts)], "max_tokens": new_tokens,
                    "temperature": 0}).json()
                with lock:
                    latencies.append(time.perf_counter() - start)
                    tokens[0] += answer["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, latencies, tokens[0]


def generate_rate(model, prompts: list[list[int]], batch: int, new_tokens: int) -> float:
    from llama_jax.generate import generate

    start = time.perf_counter()
    completions = generate(model, prompts[:batch], max_new_tokens=new_tokens)
    return sum(len(c.tokens) for c in completions) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=2, help="requests per client per round")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per client count (medians)")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=256,
                        help="the engine's context (its cache length); 256 is what generate allocates for 64 + 128")
    parser.add_argument("--max-seconds", type=float, default=300, help="bound on each round")
    args = parser.parse_args()

    from llama_jax.serving import Engine, EngineConfig

    with tempfile.TemporaryDirectory() as workdir:
        tokenizer, model = build(args.preset, Path(workdir))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, tokenizer.vocab_size, args.prompt_len).tolist() for _ in range(64)]
    engine = Engine(model, EngineConfig(slots=args.slots, max_queue=256, max_seq_len=args.max_seq_len))
    url, server = serve(engine, tokenizer)
    print(f"model {args.preset} ({model.config.dim} dim, {model.config.n_layers} layers, vocab "
          f"{model.config.vocab_size}), prompts {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"{args.slots} slots, engine context {args.max_seq_len}")

    for batch in (1, 8):
        generate_rate(model, prompts, batch, args.new_tokens)  # compile
    for clients in args.clients:
        client_round(url, prompts, clients, 1, args.new_tokens, args.max_seconds)  # compile this row bucket
    ratios = {}
    for clients in args.clients:
        batch = 1 if clients == 1 else 8
        reference, rates, latencies = [], [], []
        for _ in range(args.repeats):  # alternate, so that a change in machine load hits both sides
            reference.append(generate_rate(model, prompts, batch, args.new_tokens))
            wall, round_latencies, tokens = client_round(url, prompts, clients, args.requests, args.new_tokens,
                                                         args.max_seconds)
            rates.append(tokens / wall)
            latencies += round_latencies
        latencies.sort()
        p50, p99 = statistics.median(latencies), latencies[int(round(0.99 * (len(latencies) - 1)))]
        rate, reference_rate = statistics.median(rates), statistics.median(reference)
        ratios[clients] = rate / reference_rate
        print(f"clients {clients:>2}: {rate:8.1f} generated tokens/s   p50 {p50:6.2f} s   p99 {p99:6.2f} s   "
              f"({len(latencies)} requests)   generate batch {batch}: {reference_rate:8.1f} tokens/s   "
              f"ratio {ratios[clients]:.0%}", flush=True)
    print("medians of", args.repeats, "alternating runs; targets: 1 client >= 90% of generate batch 1, 8 clients >= "
          "80% of generate batch 8")
    server.should_exit = True
    engine.stop()


if __name__ == "__main__":
    main()
