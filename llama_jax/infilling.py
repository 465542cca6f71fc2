"""Fill-in-the-middle (infilling) as Code Llama 7B/13B do it: the prompt, generation that stops at ▁<EOT>, and the
FIM transform of training documents.

Prompts (Meta's `infilling_prompt_tokens`, codellama/llama/generation.py), with enc() the tokenizer's ordinary
encoding (SentencePiece adds its implicit leading space "▁") and enc_nosp() the encoding without it
(`Tokenizer.encode_infilling`, Meta's `encode_infilling`):

    PSM (prefix, suffix, middle):  [BOS, ▁<PRE>] + enc(prefix) + [▁<SUF>] + enc_nosp(suffix) + [▁<MID>]
    SPM (suffix_first=True):       [BOS, ▁<PRE>, ▁<SUF>] + enc_nosp(suffix) + [▁<MID>] + enc(prefix)

The model writes the middle and then ▁<EOT>; the middle is decoded without dropping its leading space
(`Tokenizer.decode_infilling`, Meta's `decode_infilling`). Generation stops at ▁<EOT> only, as Meta's does.

Training documents (`FimTransform`, the Code Llama paper's section 2.3 after Bavarian et al. 2022): a document is
split at two character positions drawn uniformly over its length into prefix, middle and suffix, with probability
`rate`; of those, a share `spm_rate` is laid out suffix-first. Each layout continues its prompt (without BOS, which
packing adds) with the middle and ▁<EOT>; the middle and the suffix are encoded without the leading space, and in
SPM the prefix and the middle are encoded together, so SPM never sees a word split at the prefix/middle boundary:

    PSM:  [▁<PRE>] + enc(prefix) + [▁<SUF>] + enc_nosp(suffix) + [▁<MID>] + enc_nosp(middle) + [▁<EOT>]
    SPM:  [▁<PRE>, ▁<SUF>] + enc_nosp(suffix) + [▁<MID>] + enc(prefix + middle) + [▁<EOT>]

Whether and where a document is split depends only on (seed, the document's text) — a SHA-256 of both — so a token
store built with the transform is a pure function of its sources, tokenizer and settings, and a run's batches stay a
pure function of (seed, step). As in the paper, a document is transformed only if it can fit in one training
context (`max_tokens`): a longer one would be cut across windows, separating the middle from its prompt.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from llama_jax.errors import ConfigError
from llama_jax.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llama_jax.config import RunConfig

FIM_RULE = "llama_jax.fim/1"  # names the splitting rule below; a store built by another rule is rebuilt
_UNIT = float(1 << 64)


# ── Prompts (generation: `llama_jax.generate.infill`) ─────────────────────────────────────────────────────────────────
def infilling_prompt(tokenizer: Tokenizer, prefix: str, suffix: str, *, suffix_first: bool = False) -> list[int]:
    """The token ids of an infilling prompt, exactly as Meta's `infilling_prompt_tokens` builds them (see above).

    Raises TokenizerError naming the tokenizer file when it has no infilling tokens.
    """
    ids = tokenizer.infilling_ids()
    prefix_ids, [suffix_ids] = tokenizer.encode(prefix), tokenizer.encode_infilling([suffix])
    if suffix_first:
        return [tokenizer.bos_id, ids.prefix, ids.suffix, *suffix_ids, ids.middle, *prefix_ids]
    return [tokenizer.bos_id, ids.prefix, *prefix_ids, ids.suffix, *suffix_ids, ids.middle]


# ── The FIM transform of training documents ─────────────────────────────────────────────────────────────────────
class FimSplit(NamedTuple):
    """One document cut into three parts (prefix + middle + suffix == the text) and its layout."""

    prefix: str
    middle: str
    suffix: str
    suffix_first: bool


@dataclass(frozen=True)
class FimTransform:
    """The fill-in-the-middle transform: which documents it splits, where, and the tokens it lays them out as."""

    rate: float  # share of documents transformed (the paper: 0.9)
    spm_rate: float = 0.5  # share of the transformed ones laid out suffix-first (the paper: half)
    seed: int = 0
    max_tokens: int | None = None  # a document is transformed only if, framed by BOS/EOS, it has at most this many

    def __post_init__(self) -> None:
        # A run's settings were checked as config keys already (data.fim_rate, data.fim_spm_rate).
        for name, value in (("rate", self.rate), ("spm_rate", self.spm_rate)):
            if not 0 <= value <= 1:
                raise ConfigError(f"FimTransform {name}={value!r} is not allowed: expected a number in [0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"FimTransform max_tokens={self.max_tokens!r} is not allowed: expected a positive "
                              "integer or None")

    def split(self, text: str) -> FimSplit | None:
        """Where `text` is cut, or None when it stays whole: a pure function of (seed, text)."""
        if not text:
            return None
        digest = hashlib.sha256(f"{FIM_RULE}\0{self.seed}\0".encode() + text.encode("utf-8", "surrogatepass")).digest()
        draw, layout, first, second = (int.from_bytes(digest[i:i + 8], "little") for i in range(0, 32, 8))
        if draw / _UNIT >= self.rate:
            return None
        # Two cut positions, each uniform over the len(text) + 1 places between characters, drawn independently.
        start, end = sorted((first % (len(text) + 1), second % (len(text) + 1)))
        return FimSplit(text[:start], text[start:end], text[end:], layout / _UNIT < self.spm_rate)

    def encode_documents(self, tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each document: FIM-laid-out where `split` says so and it fits `max_tokens`, else plain."""
        ids = tokenizer.infilling_ids()
        splits = [self.split(text) for text in texts]
        chosen = [index for index, split in enumerate(splits) if split is not None]
        # All pieces in two batched calls: with the implicit leading space (PSM prefix, SPM prefix + middle) and
        # without it (suffix, PSM middle).
        spaced = tokenizer.encode_batch([_spaced_text(splits[i]) for i in chosen])
        bare = iter(tokenizer.encode_infilling([part for i in chosen for part in _bare_texts(splits[i])]))
        encoded: list[list[int] | None] = [None] * len(texts)
        for position, index in enumerate(chosen):
            if splits[index].suffix_first:
                suffix_ids = next(bare)
                tokens = [ids.prefix, ids.suffix, *suffix_ids, ids.middle, *spaced[position], ids.eot]
            else:
                suffix_ids, middle_ids = next(bare), next(bare)
                tokens = [ids.prefix, *spaced[position], ids.suffix, *suffix_ids, ids.middle, *middle_ids, ids.eot]
            if self.max_tokens is None or len(tokens) + 2 <= self.max_tokens:
                encoded[index] = tokens
        plain = [index for index, tokens in enumerate(encoded) if tokens is None]
        for index, tokens in zip(plain, tokenizer.encode_batch([texts[i] for i in plain])):
            encoded[index] = tokens
        return encoded  # type: ignore[return-value]

    def manifest(self) -> dict:
        """What a token store records of the transform (a store built with other settings is rebuilt)."""
        return {"rule": FIM_RULE, "rate": self.rate, "spm_rate": self.spm_rate, "seed": self.seed,
                "max_tokens": self.max_tokens}

    def key(self) -> str:
        """A short name for these settings (for directories of stores built with them)."""
        return hashlib.sha256(repr(sorted(self.manifest().items())).encode()).hexdigest()[:12]

    def encoder(self, tokenizer: Tokenizer) -> FimEncoder:
        """The tokenizer as a token store's writer uses it, with every document passed through this transform."""
        return FimEncoder(self, tokenizer)


def _spaced_text(split: FimSplit) -> str:
    return split.prefix + split.middle if split.suffix_first else split.prefix


def _bare_texts(split: FimSplit) -> tuple[str, ...]:
    return (split.suffix,) if split.suffix_first else (split.suffix, split.middle)


class FimEncoder:
    """What `data.build_store` asks of a tokenizer to write a store (vocab_size, encode_batch_arrays), with FIM
    applied."""

    def __init__(self, transform: FimTransform, tokenizer: Tokenizer):
        self.transform = transform
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.transform.encode_documents(self.tokenizer, texts)

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int64) for ids in self.encode_batch(texts)]


def fim_transform(config: RunConfig) -> FimTransform | None:
    """A pretraining run's transform (None when data.fim_rate is 0): the run's seed, one context of train.seq_len."""
    if config.data.fim_rate == 0:
        return None
    return FimTransform(config.data.fim_rate, config.data.fim_spm_rate, config.seed, config.train.seq_len)
