"""Typed configuration: the model's shape, the mesh, and the run.

A run config is YAML (see `configs/`) merged with `key=value` overrides from the command line, validated against
the dataclasses below by OmegaConf. `model` may be a preset name (`model: llama2-7b`), a mapping of fields, or a
mapping with `preset:` plus the fields to change. Every mistake is a `ConfigError` naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llama_jax.cli import parse_mesh
from llama_jax.errors import ConfigError
from llama_jax.jsonl import utf8_text

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "save_dots", "save_attention_out")
ATTENTION_IMPLS = ("auto", "dense", "chunked", "flash_cpu", "cudnn", "pallas", "splash")
SPLASH_BLOCK_MULTIPLE = 128  # splash attention's blocks are whole TPU vector lanes


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency-dependent RoPE scaling (`use_scaled_rope` in Meta's params.json)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        _require(self.factor >= 1.0, "model.rope_scaling.factor", self.factor, "a number >= 1")
        _require(0 < self.low_freq_factor < self.high_freq_factor, "model.rope_scaling.low_freq_factor",
                 self.low_freq_factor, f"0 < low_freq_factor < high_freq_factor ({self.high_freq_factor})")
        _require(self.original_max_position > 0, "model.rope_scaling.original_max_position",
                 self.original_max_position, "a positive integer")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama model, named as in Meta's params.json, plus how it computes."""

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads (multi-head attention)
    ffn_hidden_dim: int | None = None  # None = derived from multiple_of / ffn_dim_multiplier as Meta does
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    # How it computes (not part of the checkpoint's identity).
    dtype: str = "bfloat16"  # compute dtype; parameters, softmax, norm statistics, logits and loss stay float32
    remat_policy: str = "full"
    attention_impl: str = "auto"  # a fused kernel for the mesh's platform where it can run; see docs/performance.md
    attention_chunk: int = 256  # query block of the chunked path (the fastest of 128/256/512 measured on CPU)
    splash_block_q: int = 512  # splash attention (TPU): query block, forward and backward (MaxText's default)
    splash_block_kv: int = 512  # splash attention: key/value block; both are capped at the sequence length

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "multiple_of", "max_seq_len", "attention_chunk"):
            _require(getattr(self, name) > 0, f"model.{name}", getattr(self, name), "a positive integer")
        _require(self.dim % self.n_heads == 0, "model.n_heads", self.n_heads,
                 f"a divisor of model.dim={self.dim} (e.g. {_divisors_hint(self.dim)})")
        _require(self.head_dim % 2 == 0, "model.n_heads", self.n_heads,
                 f"a value making head_dim = dim / n_heads even for rotary embeddings (now {self.head_dim})")
        kv_heads = self.kv_heads
        _require(kv_heads > 0 and self.n_heads % kv_heads == 0, "model.n_kv_heads", self.n_kv_heads,
                 f"a divisor of model.n_heads={self.n_heads} (e.g. {_divisors_hint(self.n_heads)})")
        _require(self.ffn_hidden_dim is None or self.ffn_hidden_dim > 0, "model.ffn_hidden_dim",
                 self.ffn_hidden_dim, "a positive integer or null (derived)")
        _require(self.ffn_dim_multiplier is None or self.ffn_dim_multiplier > 0, "model.ffn_dim_multiplier",
                 self.ffn_dim_multiplier, "a positive number or null")
        _require(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "a positive number")
        _require(self.rope_theta > 0, "model.rope_theta", self.rope_theta, "a positive number")
        _require(self.dtype in COMPUTE_DTYPES, "model.dtype", self.dtype, f"one of {COMPUTE_DTYPES}")
        _require(self.remat_policy in REMAT_POLICIES, "model.remat_policy", self.remat_policy,
                 f"one of {REMAT_POLICIES}")
        _require(self.attention_impl in ATTENTION_IMPLS, "model.attention_impl", self.attention_impl,
                 f"one of {ATTENTION_IMPLS}")
        for name in ("splash_block_q", "splash_block_kv"):
            _require(getattr(self, name) > 0 and getattr(self, name) % SPLASH_BLOCK_MULTIPLE == 0, f"model.{name}",
                     getattr(self, name), f"a positive multiple of {SPLASH_BLOCK_MULTIPLE}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: given, or Meta's rule (2/3 of 4·dim, times the multiplier, rounded up to multiple_of)."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def num_params(self) -> int:
        """Exact parameter count (embedding, blocks, final norm, untied head)."""
        attention = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.kv_heads)
        block = attention + 3 * self.dim * self.hidden_dim + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * block + self.dim + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token as PaLM's MFU defines them: 6·N_matmul + 12·layers·dim·seq_len.

        N_matmul counts the weights that take part in matrix multiplies (blocks and output head, not the embedding
        lookup or the norms); the second term is attention scores and values, forward + backward, unmasked.
        """
        attention = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.kv_heads)
        matmul_params = self.n_layers * (attention + 3 * self.dim * self.hidden_dim) + self.vocab_size * self.dim
        return 6.0 * matmul_params + 12.0 * self.n_layers * self.dim * seq_len


def _divisors_hint(n: int) -> str:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    shown = divisors if len(divisors) <= 8 else divisors[:4] + ["..."] + divisors[-3:]
    return ", ".join(str(d) for d in shown)


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")


# The published architectures. Llama 2 from the paper / Meta's params.json; Llama 3 and 3.1 likewise.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32),
    "llama2-13b": ModelConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40),
    "llama2-70b": ModelConfig(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                              multiple_of=4096, ffn_dim_multiplier=1.3),
    "llama3-8b": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                             multiple_of=1024, ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=8192),
    "llama3-70b": ModelConfig(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                              multiple_of=4096, ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=8192),
    "llama3.1-8b": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                               multiple_of=1024, ffn_dim_multiplier=1.3, rope_theta=500000.0,
                               rope_scaling=RopeScaling(), max_seq_len=131072),
    # Code Llama (Rozière et al. 2023): Llama 2 trained further on code with 16K-token sequences and rope theta raised
    # to 1e6 (Meta's params.json sets `rope_theta`; the code default stays 1e4). Shapes as in the config.json files of
    # codellama/CodeLlama-{7b,13b,34b,70b}-hf (max_position_embeddings 16384, rope_theta 1000000): 7B, 13B and 70B
    # have a vocabulary of 32016 (the infilling tokens added), 34B keeps 32000; 34B and 70B use 8 kv heads. FFN widths
    # follow Meta's rule (11008, 13824, 22016; 70B as Llama 2 70B, 28672). The 70B Python and Instruct variants differ:
    # rope theta 1e4 and 4096 positions (meta-llama/codellama#188) — read those from their checkpoints.
    "codellama-7b": ModelConfig(vocab_size=32016, dim=4096, n_layers=32, n_heads=32, rope_theta=1e6,
                                max_seq_len=16384),
    "codellama-13b": ModelConfig(vocab_size=32016, dim=5120, n_layers=40, n_heads=40, rope_theta=1e6,
                                 max_seq_len=16384),
    "codellama-34b": ModelConfig(vocab_size=32000, dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, rope_theta=1e6,
                                 max_seq_len=16384),
    "codellama-70b": ModelConfig(vocab_size=32016, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                                 multiple_of=4096, ffn_dim_multiplier=1.3, rope_theta=1e6, max_seq_len=16384),
    # Small sizes for tests, benchmarks and CPU experiments.
    "tiny": ModelConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden_dim=704,
                        max_seq_len=1024),
    "bench-s": ModelConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_hidden_dim=1408,
                           max_seq_len=4096),
    "test": ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=160,
                        max_seq_len=128, dtype="float32"),
}


@dataclass(frozen=True)
class MeshConfig:
    """Device counts along the three mesh axes; one axis may be -1 to take all remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # global, in sequences
    seq_len: int = 4096
    grad_accum: int = 1  # micro-batches per step, accumulated inside the jitted step
    log_every_steps: int = 10
    document_masking: bool = False  # attend only within each packed document (Llama 3) instead of across (Llama 2)
    peak_tflops: float | None = None  # per device, for MFU; None = measure a matrix multiply on this machine
    # JAX's persistent compilation cache, so a restart loads the programs instead of compiling them again
    # (run_loop.enable_compilation_cache): auto = $JAX_COMPILATION_CACHE_DIR, else <LLAMA_JAX_CACHE>/jax_compilation,
    # in single-process runs; none = off; anything else = that directory, in every run.
    compilation_cache: str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every_steps"):
            _require(getattr(self, name) > 0, f"train.{name}", getattr(self, name), "a positive integer")
        _require(bool(self.compilation_cache.strip()), "train.compilation_cache", self.compilation_cache,
                 "auto, none, or a directory")
        _require(self.batch_size % self.grad_accum == 0, "train.grad_accum", self.grad_accum,
                 f"a divisor of train.batch_size={self.batch_size}")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with Llama 2's settings, linear warmup then cosine decay to `min_lr_ratio` of the peak."""

    lr: float = 3e-4
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    clip_norm: float = 1.0


@dataclass(frozen=True)
class MixtureSource:
    """One source of a data mixture (`data.mixture`, llama_jax.data.Mixture)."""

    path: str | None = None  # files, a folder or a glob, as data.path
    weight: float | None = None  # its share of the training windows, relative to the others' (they need not sum to 1)
    name: str | None = None  # how reports call it; None = the path
    text_field: str | None = None  # None = data.text_field
    valid_path: str | None = None  # None = hold out documents of `path`, as without a mixture

    @property
    def label(self) -> str:
        return self.name or str(self.path)


@dataclass(frozen=True)
class DataConfig:
    path: str | None = None  # None = the default corpus (the Python standard library's sources)
    tokenizer: str | None = None  # None = a SentencePiece model trained on the corpus and cached
    valid_path: str | None = None
    text_field: str = "text"  # the JSON field / Parquet column holding each record's text (llama_jax/documents.py)
    # Several sources drawn by weight instead of data.path: a list of {path, weight, name, text_field, valid_path}.
    mixture: list[MixtureSource] | None = None
    # Processes that tokenize the token store (datatrove's local executor; llama_jax/parallel_tokenize.py); 1 = this
    # process alone. The store is byte-identical either way.
    build_workers: int = 1
    # Fill-in-the-middle (pretraining; llama_jax/infilling.py): the share of training documents split into prefix,
    # middle and suffix (Code Llama: 0.9; 0 = off), and the share of those laid out suffix-first.
    fim_rate: float = 0.0
    fim_spm_rate: float = 0.5

    def __post_init__(self) -> None:
        for name in ("fim_rate", "fim_spm_rate"):
            _require(0 <= getattr(self, name) <= 1, f"data.{name}", getattr(self, name), "a number in [0, 1]")
        _require(isinstance(self.text_field, str) and bool(self.text_field), "data.text_field", self.text_field,
                 "the name of a JSON field or Parquet column")
        _require(self.build_workers >= 1, "data.build_workers", self.build_workers, "an integer >= 1")
        if self.mixture is not None:
            self._check_mixture()

    def _check_mixture(self) -> None:
        _require(self.path is None and self.valid_path is None, "data.mixture", "[...]",
                 "either data.path (and data.valid_path) or data.mixture, not both (a mixture's sources carry "
                 "their own path and valid_path)")
        _require(len(self.mixture) > 0, "data.mixture", [], "a list of at least one {path, weight} source")
        for index, source in enumerate(self.mixture):
            key = f"data.mixture[{index}]"
            _require(bool(source.path), f"{key}.path", source.path, "the files, folder or glob of this source")
            weight = source.weight
            _require(weight is not None and math.isfinite(weight) and weight > 0, f"{key}.weight", weight,
                     "a positive number (its share of the training windows relative to the other sources)")
        labels = [source.label for source in self.mixture]
        duplicated = sorted({label for label in labels if labels.count(label) > 1})
        _require(not duplicated, "data.mixture", duplicated, "sources with distinct names (give each a name)")


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 200  # evaluate on data.valid_path every this many steps (and at the end)
    batches: int = 8

    def __post_init__(self) -> None:
        _require(self.every_steps >= 1, "eval.every_steps", self.every_steps,
                 "an integer >= 1 (leave out data.valid_path for no evaluation)")
        _require(self.batches >= 1, "eval.batches", self.batches, "an integer >= 1")


@dataclass(frozen=True)
class DistributedConfig:
    """JAX's distributed runtime. Unset = auto-detect on a cluster (SLURM, Open MPI, Kubernetes), else one process."""

    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    auto_detect: bool = True
    initialization_timeout_seconds: int = 300
    heartbeat_timeout_seconds: int = 60  # a peer silent this long ends the job with an error instead of a hang


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under <run_dir>/checkpoints/ (see llama_jax/checkpoint.py); a run resumes from the newest."""

    every_steps: int = 500  # 0 = only at the end, on preemption, and by every_minutes
    every_minutes: float = 0.0  # also save when this long has passed since the last save; 0 = off
    keep: int = 3  # the most recent checkpoints kept ...
    keep_every: int = 0  # ... plus every step that is a multiple of this; 0 = none
    async_save: bool = True  # training continues while the write finishes
    compress: bool = False  # zstd: float32 state shrinks little, and saves and restores get much slower
    fresh: bool = False  # start over even if run_dir holds checkpoints (deletes them); `--fresh` on the command line

    def __post_init__(self) -> None:
        for name in ("every_steps", "keep_every"):
            _require(getattr(self, name) >= 0, f"checkpoint.{name}", getattr(self, name), "an integer >= 0")
        _require(self.every_minutes >= 0, "checkpoint.every_minutes", self.every_minutes, "a number >= 0")
        _require(self.keep >= 1, "checkpoint.keep", self.keep, "an integer >= 1")


@dataclass(frozen=True)
class GuardConfig:
    """Rollback on divergence (llama_jax/guard.py): a non-finite loss or gradient norm, or a loss spike held for
    `spike_steps` consecutive steps, restores the newest checkpoint from before it and skips the batches since."""

    enabled: bool = True
    ema_decay: float = 0.99  # of the running mean and variance of the loss
    warmup_steps: int = 50  # steps observed before spikes are judged (non-finite values always are)
    spike_sigmas: float = 6.0  # a spike: loss > mean + max(spike_sigmas · std, spike_min_delta)
    spike_min_delta: float = 0.25  # nats
    spike_steps: int = 3  # consecutive spiking steps that trigger a rollback
    skip_batches: int | None = None  # batches skipped after a rollback; None = every batch since the restored step
    max_rollbacks: int = 3  # more than this many rollbacks within rollback_window steps ends the run with an error
    rollback_window: int = 1000

    def __post_init__(self) -> None:
        _require(0.0 < self.ema_decay < 1.0, "guard.ema_decay", self.ema_decay, "a number in (0, 1)")
        for name in ("warmup_steps", "max_rollbacks"):
            _require(getattr(self, name) >= 0, f"guard.{name}", getattr(self, name), "an integer >= 0")
        for name in ("spike_steps", "rollback_window"):
            _require(getattr(self, name) >= 1, f"guard.{name}", getattr(self, name), "an integer >= 1")
        _require(self.spike_sigmas > 0, "guard.spike_sigmas", self.spike_sigmas, "a positive number")
        _require(self.spike_min_delta >= 0, "guard.spike_min_delta", self.spike_min_delta, "a number >= 0")
        _require(self.skip_batches is None or self.skip_batches >= 0, "guard.skip_batches", self.skip_batches,
                 "an integer >= 0 or null (every batch since the restored checkpoint)")


@dataclass(frozen=True)
class DebugConfig:
    """Test-only fault injection. Steps count as in metrics.jsonl (step k = the k-th optimizer step, from 1)."""

    inject_nan_at_step: int | None = None  # this step's batch gives a NaN loss, gradient and update
    inject_nan_sticky: bool = False  # tie the NaN to the step number, not the batch: it recurs after every rollback
    spike_at_step: int | None = None  # this step's batch gets uniformly random token ids (a loss spike) ...
    spike_batches: int = 1  # ... and so do the batches of the steps after it, this many in all
    save_delay_seconds: float = 0.0  # each checkpoint's write is held open this long (to kill a process mid-save)
    step_sleep_seconds: float = 0.0  # the loop sleeps this long after each step (to signal a run at a chosen point)

    def __post_init__(self) -> None:
        for name in ("inject_nan_at_step", "spike_at_step"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"debug.{name}", value, "a step >= 1 or null")
        _require(self.spike_batches >= 1, "debug.spike_batches", self.spike_batches, "an integer >= 1")
        for name in ("save_delay_seconds", "step_sleep_seconds"):
            _require(getattr(self, name) >= 0, f"debug.{name}", getattr(self, name), "a number >= 0")


@dataclass(frozen=True)
class SFTConfig:
    """Chat fine-tuning (train/sft.py): data.path is chat JSONL, one {"messages": [...]} conversation per line."""

    format: str = "llama2"  # llama2: [INST] ... [/INST] between BOS/EOS; llama3: header tokens and <|eot_id|>
    epochs: float | None = 2.0  # sets train.steps from the packed dataset size; null = use train.steps

    def __post_init__(self) -> None:
        _require(self.format in ("llama2", "llama3"), "sft.format", self.format, "llama2 or llama3")
        _require(self.epochs is None or self.epochs > 0, "sft.epochs", self.epochs, "a positive number or null")


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the block's linear projections, in Meta's order
LORA_BASE_DTYPES = ("float32", "int8", "int4", "nf4")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA / QLoRA fine-tuning (llama_jax/lora.py, docs/lora.md): rank 0 trains every parameter instead."""

    rank: int = 0  # r of the low-rank update W + (alpha/r)·A·B; 0 = off (full fine-tuning)
    alpha: float = 16.0
    targets: str = ",".join(LORA_TARGETS)  # comma-separated subset of q,k,v,o,gate,up,down
    dropout: float = 0.0  # only 0 (see docs/lora.md: adapters are applied as per-layer merged weights)
    base_dtype: str = "float32"  # the frozen base's storage: float32, or int8/int4/nf4 (QLoRA, quantized by qwix)

    def __post_init__(self) -> None:
        _require(self.rank >= 0, "lora.rank", self.rank, "an integer >= 0 (0 = off)")
        _require(self.alpha > 0, "lora.alpha", self.alpha, "a positive number")
        names = self.target_names
        _require(bool(names) and all(name in LORA_TARGETS for name in names) and len(set(names)) == len(names),
                 "lora.targets", self.targets, f"a comma-separated subset of {','.join(LORA_TARGETS)}")
        _require(self.dropout == 0.0, "lora.dropout", self.dropout,
                 "0.0 (LoRA dropout is not implemented: see docs/lora.md)")
        _require(self.base_dtype in LORA_BASE_DTYPES, "lora.base_dtype", self.base_dtype,
                 f"one of {LORA_BASE_DTYPES}")

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in str(self.targets).split(",") if name.strip())


@dataclass(frozen=True)
class RewardConfig:
    """Reward models (train/reward.py; docs/alignment.md): Llama 2's margin ranking loss. A pair's margin is its
    `margin`, or its `strength` label's value here (Llama 2's "margin small" by default), or 0."""

    margin_significantly_better: float = 1.0
    margin_better: float = 2 / 3
    margin_slightly_better: float = 1 / 3
    margin_negligibly_better: float = 0.0
    use_margin: bool = True  # false: the plain binary ranking loss (InstructGPT's), margins ignored

    def __post_init__(self) -> None:
        for name, value in self.margins.items():
            _require(math.isfinite(value) and value >= 0, f"reward.margin_{name.replace(' ', '_')}", value,
                     "a finite number >= 0")

    @property
    def margins(self) -> dict[str, float]:
        """{strength label: margin}, the labels of Llama 2's annotation scale."""
        return {"significantly better": self.margin_significantly_better, "better": self.margin_better,
                "slightly better": self.margin_slightly_better, "negligibly better": self.margin_negligibly_better}


@dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimisation (train/dpo.py), as TRL's DPOTrainer."""

    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO's ε: the share of labels assumed flipped
    loss: str = "sigmoid"  # sigmoid (DPO) or ipo
    reference: str | None = None  # the frozen reference model; None = init_from (the model being tuned)
    precompute_reference: bool = False  # compute the reference's log-probabilities once, hold no reference model

    def __post_init__(self) -> None:
        _require(self.beta > 0, "dpo.beta", self.beta, "a positive number")
        _require(0 <= self.label_smoothing < 0.5, "dpo.label_smoothing", self.label_smoothing, "a number in [0, 0.5)")
        _require(self.loss in ("sigmoid", "ipo"), "dpo.loss", self.loss, "sigmoid or ipo")


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling answers (rejection sampling and PPO rollouts) with the KV-cache decoder."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        _require(self.max_new_tokens >= 1, "rollout.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        _require(self.temperature > 0, "rollout.temperature", self.temperature, "a positive number (sampling)")
        _require(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "a number in (0, 1]")


@dataclass(frozen=True)
class RewardModelsConfig:
    """The reward model(s) that judge answers (rejection sampling, PPO). With a safety model too, Llama 2's
    combination: the safety score where the prompt is safety-tagged or σ(safety score) < safety_threshold, else
    the helpfulness score."""

    helpfulness: str | None = None  # a reward model (train.reward run dir or saved reward model)
    safety: str | None = None  # optional second reward model
    safety_threshold: float = 0.15
    whiten: bool = True  # PPO: whiten the combined scores over each rollout batch (Llama 2)

    def __post_init__(self) -> None:
        _require(0 < self.safety_threshold < 1, "judge.safety_threshold", self.safety_threshold, "a number in (0, 1)")


@dataclass(frozen=True)
class RejectionConfig:
    """Rejection-sampling fine-tuning data (train/rejection_sampling.py)."""

    samples: int = 4  # K answers per prompt
    threshold: float | None = None  # keep the best answer only if its score is at least this
    out: str | None = None  # the SFT JSONL written; None = <run_dir>/rejection_sampled.jsonl
    batch_size: int = 16  # prompts decoded together

    def __post_init__(self) -> None:
        _require(self.samples >= 1, "rejection.samples", self.samples, "an integer >= 1")
        _require(self.batch_size >= 1, "rejection.batch_size", self.batch_size, "an integer >= 1")


@dataclass(frozen=True)
class PPOConfig:
    """Proximal policy optimisation against reward model(s) (train/ppo.py): one train step is one rollout batch
    (train.batch_size prompts) followed by `epochs` passes of `minibatches` minibatches over it."""

    kl_beta: float = 0.01  # β of R = score − β·KL(π‖π_ref) (Llama 2: 0.01 for 7B and 13B)
    clip: float = 0.2  # ε of the clipped policy objective
    value_clip: float = 0.2
    value_coef: float = 0.1  # the value loss's weight beside the policy loss (TRL's vf_coef)
    gamma: float = 1.0
    lam: float = 0.95
    epochs: int = 4
    minibatches: int = 1
    prompt_len: int = 64  # prompts are left-padded to this many tokens (longer ones are an error)

    def __post_init__(self) -> None:
        _require(self.kl_beta >= 0, "ppo.kl_beta", self.kl_beta, "a number >= 0")
        _require(0 < self.clip < 1, "ppo.clip", self.clip, "a number in (0, 1)")
        _require(self.value_clip > 0, "ppo.value_clip", self.value_clip, "a positive number")
        _require(self.value_coef >= 0, "ppo.value_coef", self.value_coef, "a number >= 0")
        _require(0 < self.gamma <= 1, "ppo.gamma", self.gamma, "a number in (0, 1]")
        _require(0 <= self.lam <= 1, "ppo.lam", self.lam, "a number in [0, 1]")
        _require(self.epochs >= 1, "ppo.epochs", self.epochs, "an integer >= 1")
        _require(self.minibatches >= 1, "ppo.minibatches", self.minibatches, "an integer >= 1")
        _require(self.prompt_len >= 2, "ppo.prompt_len", self.prompt_len, "an integer >= 2")


@dataclass(frozen=True)
class RunConfig:
    run_dir: str | None = None  # None = runs/<config file stem>
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    # Logical axis name -> mesh axes, or the name of a table in llama_jax.sharding.NAMED_RULES ("sequence": split
    # each sequence over fsdp); None = the default table. Typed Any because OmegaConf has no union of a mapping and a
    # string; llama_jax.sharding.rules_from_config checks it.
    sharding_rules: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    init_from: str | None = None  # fine-tuning: a checkpoint llama_jax.load reads (run dir, native, HF or Meta)
    sft: SFTConfig = field(default_factory=SFTConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    judge: RewardModelsConfig = field(default_factory=RewardModelsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def resolve_model(spec: str | Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """A ModelConfig from a preset name, a mapping of fields (optionally with `preset:`), or a ModelConfig."""
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, str):
        return _preset(spec)
    fields = dict(spec)
    base = _preset(fields.pop("preset")) if "preset" in fields else ModelConfig()
    return _build(ModelConfig, _merge(_as_plain(base), fields), prefix="model")


def _preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model={name!r} is not a known preset: expected one of {sorted(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config and apply `key=value` overrides (values parsed as YAML).

    A value the file got wrong is reported with the file's path in front; one an override got wrong, as it is
    (the message names the key the user typed)."""
    try:
        return _load_config(path, overrides)
    except ConfigError as error:
        if path is None or str(path) in str(error) or not _file_alone_fails_the_same(path, error):
            raise
        raise ConfigError(f"config file {path}: {error}") from None


def _file_alone_fails_the_same(path: str | Path, error: ConfigError) -> bool:
    try:
        _load_config(path, ())
    except ConfigError as file_error:
        return str(file_error) == str(error)
    return False


def _load_config(path: str | Path | None, overrides: Sequence[str]) -> RunConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for override in overrides:
        key, value = _parse_override(override)
        _expand_mesh(raw)  # so that mesh=2x2x2 then mesh.fsdp=4 changes one size
        _set_dotted(raw, key, value)
    _expand_mesh(raw)
    if "model" in raw:
        raw["model"] = _as_plain(_model_from_raw(raw["model"]))
    config = _build(RunConfig, raw, prefix="")
    if config.train.seq_len > config.model.max_seq_len:
        raise ConfigError(f"train.seq_len={config.train.seq_len} is larger than the model's maximum "
                          f"(model.max_seq_len={config.model.max_seq_len})")
    if config.run_dir is None and path is not None:
        config = dataclasses.replace(config, run_dir=str(Path("runs") / Path(path).stem))
    return config


def _expand_mesh(raw: dict[str, Any]) -> None:
    """`mesh: 2x2x2` (the spelling every program shares) → `mesh: {data: 2, fsdp: 2, tensor: 2}`."""
    if isinstance(raw.get("mesh"), str):
        raw["mesh"] = dict(zip(("data", "fsdp", "tensor"), parse_mesh(raw["mesh"], option="mesh=")))


def _model_from_raw(value: Any) -> ModelConfig:
    if isinstance(value, (str, Mapping)):
        return resolve_model(value)
    raise ConfigError(f"model={value!r} is not allowed: expected a preset name {sorted(MODEL_PRESETS)} or a mapping")


def _read_yaml(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path, "config file")


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping (safe tags only); every way it can be wrong is one ConfigError naming the file,
    and for bad bytes or syntax the line and column."""
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; expected a YAML file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as error:
        raise ConfigError(f"{what} {path}: cannot read it ({error.strerror or error})") from None
    try:
        text = utf8_text(data, path, ConfigError)
    except ConfigError as error:
        raise ConfigError(f"{what} {error}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.MarkedYAMLError as error:
        raise ConfigError(f"{what} {_yaml_error_text(path, error)}".replace("\n", " ")) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {path}: not valid YAML ({error})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of keys, not {type(raw).__name__}")
    return raw


def _yaml_error_text(path: Path, error: yaml.MarkedYAMLError) -> str:
    """'PATH:LINE:COLUMN: not valid YAML (problem; context at line L column C)', lines and columns from 1."""
    mark = error.problem_mark or error.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    detail = error.problem or error.context or "syntax error"
    if error.context and error.problem and error.context_mark is not None:
        detail += f"; {error.context} at line {error.context_mark.line + 1} column {error.context_mark.column + 1}"
    return f"{where}: not valid YAML ({detail})"


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.steps=100)")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and parts[0] == "model" and i == 0:
            child = {"preset": child}  # `model: llama2-7b` then `model.n_layers=4`
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value


def _merge(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _as_plain(config: Any) -> Any:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    """Validate `raw` against dataclass `cls` with OmegaConf; reword its errors into one ConfigError line."""
    try:
        schema = OmegaConf.structured(cls)
        merged = OmegaConf.merge(schema, OmegaConf.create(dict(raw)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(_reword(error, cls, prefix)) from None


def _reword(error: OmegaConfBaseException, cls: type, prefix: str) -> str:
    full_key = getattr(error, "full_key", None) or ""
    key = f"{prefix}.{full_key}" if prefix and full_key else (full_key or prefix)
    message = str(error).splitlines()[0]
    if "not in" in message or "Key '" in message and "not" in message:
        parent = _dataclass_at(cls, full_key.rsplit(".", 1)[0] if "." in full_key else "")
        inside = re.search(r"not in '(\w+)'", message)  # an item of a list of dataclasses: OmegaConf names its class
        if inside and dataclasses.is_dataclass(globals().get(inside.group(1))) and (
                parent is None or parent.__name__ != inside.group(1)):
            item = globals()[inside.group(1)]
            allowed = sorted(f.name for f in dataclasses.fields(item))
            return f"unknown config key {full_key!r} in a {_LIST_ITEMS.get(item, item.__name__)} entry: allowed keys " \
                   f"there are {allowed}"
        allowed = sorted(f.name for f in dataclasses.fields(parent)) if parent else []
        return f"unknown config key {key!r}: allowed keys here are {allowed}"
    return f"config key {key!r}: {message}"


_LIST_ITEMS = {MixtureSource: "data.mixture"}  # dataclasses that configs hold in lists, by the list's key


def _dataclass_at(cls: type, dotted: str) -> type | None:
    import typing

    current: Any = cls
    for part in filter(None, dotted.split(".")):
        hints = typing.get_type_hints(current)
        if part not in hints:
            return None
        current = hints[part]
        for arg in typing.get_args(current):  # Optional[X]
            if dataclasses.is_dataclass(arg):
                current = arg
    return current if dataclasses.is_dataclass(current) else None


def to_yaml(config: RunConfig) -> str:
    """The resolved config, as written to `<run_dir>/config.yaml`."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def main(argv: Sequence[str]) -> int:
    """`python -m llama_jax.config [CONFIG.yaml] [key=value ...]`: print the resolved config and the model's size."""
    if argv and argv[0] in ("-h", "--help"):
        print(main.__doc__)
        print("\nKeys and defaults:\n" + to_yaml(RunConfig()))
        return 0
    path = argv[0] if argv and "=" not in argv[0] else None
    config = load_config(path, argv[1:] if path else argv)
    print(to_yaml(config), end="")
    print(f"# parameters: {config.model.num_params():,}")
    return 0


if __name__ == "__main__":
    from llama_jax.cli import run_program

    run_program(main)
