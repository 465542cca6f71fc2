"""The lm-evaluation-harness model "llama_jax": any llama-jax-loadable checkpoint driven by `lm_eval`'s tasks.

lm-eval (0.4.x) finds models only in its own registry and has no plugin entry points, so the registration must be
imported before its command line runs. This module does that and then hands its arguments to lm-eval's CLI:

    python -m eval.lm_eval_adapter --model llama_jax --model_args path=runs/tiny,tokenizer=runs/tiny/tokenizer.model \\
        --tasks hellaswag --batch_size 16
    python -m eval.lm_eval_adapter run --model llama_jax --model_args path=hf/Llama-2-7b,dtype=bfloat16 \\
        --tasks my_task --include_path my_tasks/        # a task defined from local files

(every `lm_eval` option works the same). From Python, import this module and pass `model="llama_jax"` or a
`LlamaJaxLM(...)` to `lm_eval.simple_evaluate`.

model_args: path (checkpoint of any format), tokenizer (default: the checkpoint folder's tokenizer.model), dtype,
mesh (DATAxFSDPxTENSOR, default 1x-1x1), max_length (default: the model's max_seq_len), max_gen_toks. The batch size
is lm-eval's own --batch_size (rounded up to a multiple of the device count; "auto" means 8).

Requests map onto `llama_jax.scoring`: loglikelihood → score_continuations, loglikelihood_rolling →
rolling_log_likelihoods; generate_until → `llama_jax.generate.generate` (greedy whatever the sampling settings; a
request asking for sampling gets a warning), cut at the first stop string. One process; the model is sharded over
that process's devices.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (registers lm-eval's own models first: its registry skips them once non-empty)
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry, register_model

from llama_jax.cli import parse_mesh
from llama_jax.generate import generate
from llama_jax.params import merge_params
from llama_jax.scoring import load_scorer, rolling_log_likelihoods, score_continuations, truncate_at_stop

MODEL_NAME = "llama_jax"
DEFAULT_MAX_GEN_TOKS = 256
logger = logging.getLogger(__name__)


def _as_batch_size(value: Any, default: int) -> int:
    """lm-eval passes batch_size as an int, a numeric string or 'auto' (meaning: our default)."""
    if value is None or str(value).startswith("auto"):
        return default
    return int(value)


class LlamaJaxLM(LM):
    def __init__(self, path: str, tokenizer: str | None = None, dtype: str | None = None, mesh: str = "1x-1x1",
                 batch_size: int | str | None = 8, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, **unused: Any):
        super().__init__()
        if unused:  # lm-eval adds device / max_batch_size for every model; JAX picks its devices itself
            logger.info("llama_jax ignores %s", sorted(unused))
        mesh_sizes = parse_mesh(mesh, option="model_args mesh=")
        self.scorer, self.tokenizer = load_scorer(path, tokenizer, dtype=dtype, mesh=mesh_sizes)
        self.batch_size = _as_batch_size(batch_size, 8)
        self.max_length = int(max_length) if max_length else self.scorer.config.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        self.path = str(path)

    # ── Scoring ─────────────────────────────────────────────────────────────────────────────────────────────
    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(request.args) for request in requests]
        scores = score_continuations(self.scorer, self.tokenizer, pairs, batch_size=self.batch_size,
                                     max_length=self.max_length, progress=not disable_tqdm)
        results = [(score.log_likelihood, score.is_greedy) for score in scores]
        for pair, result in zip(pairs, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        texts = [request.args[0] for request in requests]
        totals = rolling_log_likelihoods(self.scorer, self.tokenizer, texts, batch_size=self.batch_size,
                                         max_length=self.max_length, progress=not disable_tqdm)
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    # ── Generation ──────────────────────────────────────────────────────────────────────────────────────────
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        outputs: list[str | None] = [None] * len(requests)
        # Requests with the same stop strings and budget are decoded together.
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(self._generation_key(request.args[1]), []).append(index)
        for (stops, max_new), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chosen = indices[start:start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in chosen], list(stops), max_new)
                for index, text in zip(chosen, texts):
                    outputs[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return outputs  # type: ignore[return-value]

    def _generation_key(self, gen_kwargs: dict) -> tuple[tuple[str, ...], int]:
        gen_kwargs = dict(gen_kwargs or {})
        if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0.0:
            logger.warning("llama_jax decodes greedily; ignoring sampling settings %s", gen_kwargs)
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        return tuple(until), int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))

    def _generate(self, contexts: Sequence[str], stops: list[str], max_new: int) -> list[str]:
        budget = max(self.max_length - max_new, 1)  # keep the prompt's end when prompt + answer would not fit
        prompts = [([self.tokenizer.bos_id] + self.tokenizer.encode(context))[-budget:] for context in contexts]
        model = merge_params(self.scorer.graphdef, self.scorer.params)
        completions = generate(model, prompts, max_new_tokens=max_new, stop_ids=self.tokenizer.stop_ids)
        return [truncate_at_stop(self.tokenizer.decode(completion.tokens), stops) for completion in completions]

    # ── What lm-eval records about the model ────────────────────────────────────────────────────────────────
    @property
    def tokenizer_name(self) -> str:
        return f"llama_jax-{self.tokenizer.fingerprint()[:16]}"

    def get_model_info(self) -> dict:
        return {"model_path": self.path, "tokenizer_fingerprint": self.tokenizer.fingerprint(),
                "dtype": self.scorer.config.dtype}


# Registered once per process: run as `python -m eval.lm_eval_adapter`, this file is both __main__ and (if anything
# imports it) eval.lm_eval_adapter, and lm-eval refuses a second, different class under the same name.
if MODEL_NAME not in model_registry:
    register_model(MODEL_NAME)(LlamaJaxLM)


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line, with the llama_jax model registered."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    # lm-eval's CLI reads sys.argv itself.
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
