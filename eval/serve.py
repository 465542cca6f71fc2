"""Serve a model over the OpenAI HTTP API, with a chat page: `python -m eval.serve --model PATH`.

    python -m eval.serve --model llama3-8b-instruct/ --port 8000 --api-key "$KEY" --slots 8
    python -m eval.serve --model ckpt/ --tokenizer tok.model --quantize int8 --max-seq-len 2048

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as server-sent
events), the tokenizer routes vLLM has (/tokenize, /detokenize, /tokenizer_info) and the chat page at /. Requests are
decoded together by `llama_jax.serving.Engine` (continuous batching over --slots KV-cache rows). docs/serving.md has
the details, the limits and the errors. Listens on 127.0.0.1 unless --host says otherwise.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import llama_jax
from llama_jax.chat_format import CHAT_STYLES
from llama_jax.cli import add_model_arguments, run_program
from llama_jax.errors import ConfigError


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    import uvicorn

    from eval.generate import resolve_chat_format
    from llama_jax.scoring import model_from_args
    from llama_jax.serving import Engine, EngineConfig, ServerConfig, build_app

    web_dir = Path(llama_jax.__file__).parent / "web"  # the chat page, package data of the library
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port {args.port} is not allowed: expected 0..65535")
    api_key = args.api_key if args.api_key is not None else os.environ.get("LLAMA_JAX_API_KEY") or None
    engine_config = EngineConfig(slots=args.slots, max_queue=args.max_queue, max_seq_len=args.max_seq_len)
    model, tokenizer, _ = model_from_args(args)  # --quantize: quantized layer by layer while it loads
    engine = Engine(model, engine_config)
    name = args.served_model_name or Path(args.model).resolve().name
    config = ServerConfig(model_name=name, chat_format=resolve_chat_format(args.chat_format, tokenizer),
                          api_key=api_key, max_body_bytes=args.max_body_bytes,
                          web_dir=str(web_dir) if web_dir.is_dir() else None)
    app = build_app(engine, tokenizer, config)
    print(f"serving {name} on http://{args.host}:{args.port} ({args.slots} slots, chat format "
          f"{config.chat_format}{', API key required' if api_key else ''})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, mesh=False)
    from llama_jax.quantize import add_quantize_arguments

    add_quantize_arguments(parser)
    parser.add_argument("--chat-format", choices=("auto", *CHAT_STYLES), default="auto",
                        help="chat format of /v1/chat/completions (default: llama3 for a Llama 3 tokenizer, else "
                             "llama2)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on the API routes (default: $LLAMA_JAX_API_KEY, "
                             "else none)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id of /v1/models (default: the model folder's name)")
    parser.add_argument("--slots", type=int, default=8, help="KV-cache rows: requests decoded at once (default 8)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests that may wait for a slot; more are answered 429 (default 64)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="prompt + new tokens per request (default: the model's max_seq_len)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20,
                        help="larger request bodies are refused with 413 (default 1 MiB)")
    parser.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (default warning)")
    return parser


if __name__ == "__main__":
    run_program(main)
