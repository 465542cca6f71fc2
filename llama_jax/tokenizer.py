"""Tokenizers behind one interface: Llama 2 style SentencePiece and Llama 3 tiktoken rank files.

`load_tokenizer(path)` looks at the file and returns the matching implementation; `train_sentencepiece`
trains a new Llama-2-like BPE model when a user has none (the default corpus does this).

Both implementations encode text as *ordinary* text: a document that happens to contain
"<|eot_id|>" gets the tokens of those characters, never the special id. Special ids only enter a
sequence on purpose, through `bos=`/`eos=` or `special_id()`. This keeps raw training data from
forging control tokens.

Infilling (Code Llama 7B/13B): such a tokenizer ends its vocabulary with four pieces, `▁<PRE>`, `▁<SUF>`, `▁<MID>`,
`▁<EOT>` (`INFILLING_PIECES`); `infilling_ids()` finds them or raises one TokenizerError naming the file and the
missing pieces. Whatever type a file gives them, they are control pieces here, so text such as " <PRE>" still
encodes as ordinary text. `encode_infilling`/`decode_infilling` encode and decode without SentencePiece's implicit
leading space, as Code Llama encodes the suffix and the middle.
"""
from __future__ import annotations

import abc
import base64
import binascii
import hashlib
import io
import itertools
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from llama_jax.errors import TokenizerError

PathLike = str | os.PathLike[str]

# Code Llama's infilling pieces, in the order of their ids in its tokenizer.model (appended after the regular
# vocabulary): prefix, suffix, middle, end of the infilled text. The "▁" is part of the piece names.
INFILLING_PIECES = ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")


class InfillingIds(NamedTuple):
    """The ids of the four infilling pieces."""

    prefix: int
    suffix: int
    middle: int
    eot: int


class Tokenizer(abc.ABC):
    """What the rest of the project may rely on, whichever file the tokenizer came from."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int  # safe to pad with: never produced by encode(), so never a training target
    stop_ids: frozenset[int]  # generation ends at any of these
    path: Path | None  # the file it was loaded from (None if built in memory)

    @abc.abstractmethod
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text` (as ordinary text), optionally framed by BOS and EOS."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; raises TokenizerError for an id outside the vocabulary."""

    @abc.abstractmethod
    def special_id(self, token: str) -> int:
        """Id of a special token such as "<|start_header_id|>" or "</s>"; TokenizerError if unknown."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Stable hash of the tokenizer file's contents: equal fingerprints encode identically."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() of many texts without BOS/EOS; implementations override it to use threads."""
        return [self.encode(text) for text in texts]

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """encode_batch() as integer arrays, what a token store's writer takes (a tokenizer that can hand its ids
        over without building Python lists overrides it)."""
        return [np.asarray(ids, np.int64) for ids in self.encode_batch(texts)]

    def encode_infilling(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text without an implicit leading space (Code Llama's suffix and middle).

        Only SentencePiece adds such a space; other tokenizers encode as encode_batch does.
        """
        return self.encode_batch(texts)

    def decode_infilling(self, ids: Sequence[int]) -> str:
        """Text of `ids` keeping a leading space that decode() would drop (an infilled middle's)."""
        return self.decode(ids)

    def infilling_ids(self) -> InfillingIds:
        """Ids of ▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT>; one TokenizerError naming the file and the missing pieces."""
        found: dict[str, int] = {}
        for piece in INFILLING_PIECES:
            try:
                found[piece] = self.special_id(piece)
            except TokenizerError:
                pass
        missing = [piece for piece in INFILLING_PIECES if piece not in found]
        if missing:
            raise TokenizerError(
                f"{self.path or '<bytes>'}: tokenizer has no infilling tokens (missing {', '.join(missing)}); "
                "infilling needs a Code Llama 7B/13B tokenizer.model or one trained with "
                "train_sentencepiece(..., infilling=True)")
        return InfillingIds(*(found[piece] for piece in INFILLING_PIECES))

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        checked = [int(token_id) for token_id in ids]
        for token_id in checked:
            if not 0 <= token_id < self.vocab_size:
                raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return checked

    def _framed(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# SentencePiece (Llama 2)
# --------------------------------------------------------------------------------------------


# Code Llama's sentinel for encoding without the implicit leading space (llama/tokenizer.py, encode_infilling).
_INFILLING_SENTINEL = "☺"


def _with_control_pieces(model_bytes: bytes, pieces: Sequence[str]) -> bytes:
    """The model with `pieces` (those it has) retyped as control pieces; nothing else changes."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    for entry in proto.pieces:
        if entry.piece in pieces:
            entry.type = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
    return proto.SerializeToString()


def _with_appended_control_pieces(model_bytes: bytes, pieces: Sequence[str]) -> bytes:
    """The model with `pieces` appended as control pieces at the end of the vocabulary, where Code Llama has its."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    for piece in pieces:
        entry = proto.pieces.add()
        entry.piece, entry.score = piece, 0.0
        entry.type = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
    return proto.SerializeToString()


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, as Llama 2 ships it: unk 0, BOS 1 (<s>), EOS 2 (</s>), byte fallback."""

    kind = "sentencepiece"

    def __init__(self, model_bytes: bytes, path: Path | None = None):
        import sentencepiece

        self.path = path
        self._model_bytes = model_bytes
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
        except (RuntimeError, TypeError, ValueError) as error:
            raise TokenizerError(f"{path or '<bytes>'}: not a SentencePiece model ({error})") from error
        infilling = [self._processor.piece_to_id(piece) for piece in INFILLING_PIECES]
        if any(self._processor.id_to_piece(i) == piece and not self._processor.is_control(i)
               for i, piece in zip(infilling, INFILLING_PIECES)):
            # A user-defined (or normal) ▁<PRE> would be cut out of any text containing " <PRE>": make it a
            # control piece, which encode() never produces. Ids and the file's fingerprint stay as they are.
            self._processor = sentencepiece.SentencePieceProcessor(
                model_proto=_with_control_pieces(model_bytes, INFILLING_PIECES))
        # Meta's encode_infilling: the ids of "☺" + text, less those of "☺" alone (the dummy prefix and the
        # sentinel: two ids in Code Llama's vocabulary, more where "☺" falls back to bytes).
        self._sentinel_ids = list(self._processor.encode(_INFILLING_SENTINEL))
        self.vocab_size = self._processor.get_piece_size()
        if self.vocab_size <= 0:
            raise TokenizerError(f"{path or '<bytes>'}: SentencePiece model has an empty vocabulary")
        self.bos_id = self._processor.bos_id()
        self.eos_id = self._processor.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f"{path or '<bytes>'}: SentencePiece model lacks a BOS or EOS piece")
        # Llama 2 has no pad piece. With byte fallback the unk piece is never produced by encode(),
        # so it is never a target and is safe to pad with.
        pad = self._processor.pad_id()
        self.pad_id = pad if pad >= 0 else self._processor.unk_id()
        self.stop_ids = frozenset({self.eos_id})

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self._framed(list(self._processor.encode(text)), bos, eos)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._processor.encode(list(texts), num_threads=os.cpu_count() or 1)]

    def encode_infilling(self, texts: Sequence[str]) -> list[list[int]]:
        head = self._sentinel_ids
        encoded = self.encode_batch([_INFILLING_SENTINEL + text for text in texts])
        for text, ids in zip(texts, encoded):
            if ids[: len(head)] != head:  # the sentinel merged with the text: its ids cannot be cut off
                raise TokenizerError(f"{self.path or '<bytes>'}: cannot encode {text[:20]!r} without a leading "
                                     f"space: {_INFILLING_SENTINEL!r} merges with the text's first piece")
        return [ids[len(head):] for ids in encoded]

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode(self._check_ids(ids))

    def decode_infilling(self, ids: Sequence[int]) -> str:
        # SentencePiece drops the leading space of the first piece; behind the sentinel there is none to drop.
        text = self._processor.decode(self._sentinel_ids + self._check_ids(ids))
        return text[len(_INFILLING_SENTINEL):]

    def special_id(self, token: str) -> int:
        token_id = self._processor.piece_to_id(token)
        # piece_to_id answers unk for any unknown piece, so confirm the round trip.
        if self._processor.id_to_piece(token_id) != token:
            raise TokenizerError(f"unknown special token {token!r} in SentencePiece model {self.path or '<bytes>'}")
        return token_id

    def fingerprint(self) -> str:
        return _sha256(self._model_bytes)

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of one id (e.g. "▁the" or "<0x0A>"); useful for inspection."""
        return self._processor.id_to_piece(self._check_ids([token_id])[0])


# --------------------------------------------------------------------------------------------
# Llama 3 (tiktoken rank file)
# --------------------------------------------------------------------------------------------

# Meta's Llama 3 pre-tokenizer: contractions, letter runs with one optional leading non-letter,
# digit groups of at most three, punctuation runs, newline runs, other whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256
# The named special tokens in Meta's order (Llama 3.1+ names; Llama 3.0 called the unnamed slots
# reserved tokens, at the same ids). The rest of the 256 are <|reserved_special_token_2..247|>.
LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
# tiktoken's regex engine overflows its backtracking stack on very long runs, so text is cut as
# Meta's reference tokenizer cuts it: windows of this many characters, and inside each window a
# cut whenever a run of whitespace (or of non-whitespace) grows past the second limit.
_TIKTOKEN_WINDOW_CHARS = 400_000
_TIKTOKEN_MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"\s{{{_TIKTOKEN_MAX_RUN_CHARS + 1},}}|\S{{{_TIKTOKEN_MAX_RUN_CHARS + 1},}}")
_RANK_LINE = re.compile(rb"^([A-Za-z0-9+/]+=*)[ \t]+(\d+)[ \t]*\r?$")


def llama3_special_tokens() -> list[str]:
    """All 256 special tokens in id order (the first has id = number of regular tokens)."""
    reserved_count = LLAMA3_NUM_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIAL_TOKENS)
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(reserved_count)]
    return list(LLAMA3_NAMED_SPECIAL_TOKENS) + reserved


# Python's str.isspace() code points (what `\s` matches), all below U+3001: a lookup table for `_longest_run`.
_IS_SPACE = np.zeros(0x3001, bool)
_IS_SPACE[[code for code in range(0x3001) if chr(code).isspace()]] = True


def _longest_run(window: str) -> int:
    """The longest run of whitespace or of non-whitespace characters, computed on arrays: the regex scan below costs
    as much as tiktoken's encode on source code, and a run past the limit is rare."""
    codes = np.frombuffer(window.encode("utf-32-le", "surrogatepass"), np.uint32)
    space = np.zeros(codes.shape, bool)
    low = codes < len(_IS_SPACE)
    space[low] = _IS_SPACE[codes[low]]
    edges = np.flatnonzero(space[1:] != space[:-1]) + 1
    return int(np.diff(np.concatenate(([0], edges, [len(space)]))).max(initial=0))


def _split_long_runs(text: str) -> Iterator[str]:
    """Meta's cutting rule: in each window, a run longer than the limit is cut every limit chars."""
    if len(text) <= _TIKTOKEN_MAX_RUN_CHARS:  # no run can be longer than the text: skip the scan
        yield text
        return
    for window_start in range(0, len(text), _TIKTOKEN_WINDOW_CHARS):
        window = text[window_start : window_start + _TIKTOKEN_WINDOW_CHARS]
        if _longest_run(window) <= _TIKTOKEN_MAX_RUN_CHARS:
            yield window
            continue
        piece_start = 0
        for run in _LONG_RUN.finditer(window):
            for cut in range(run.start() + _TIKTOKEN_MAX_RUN_CHARS, run.end(), _TIKTOKEN_MAX_RUN_CHARS):
                yield window[piece_start:cut]
                piece_start = cut
        yield window[piece_start:]


def _parse_rank_file(data: bytes, path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        match = _RANK_LINE.match(line)
        if match is None:
            raise TokenizerError(f"{path}:{line_number}: expected '<base64 token> <rank>' in a tiktoken rank file")
        try:
            token = base64.b64decode(match.group(1), validate=True)
        except binascii.Error as error:
            raise TokenizerError(f"{path}:{line_number}: bad base64 token ({error})") from error
        ranks[token] = int(match.group(2))
    if not ranks:
        raise TokenizerError(f"{path}: tiktoken rank file has no tokens")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks must be exactly 0..{len(ranks) - 1}, each once")
    return ranks


class Llama3Tokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer: a tiktoken BPE rank file plus 256 special tokens after the regular ones."""

    kind = "llama3"

    def __init__(self, rank_file_bytes: bytes, path: Path | None = None):
        import tiktoken

        self.path = path
        self._file_bytes = rank_file_bytes
        ranks = _parse_rank_file(rank_file_bytes, path or Path("<bytes>"))
        num_regular = len(ranks)
        self._special_ids = {token: num_regular + i for i, token in enumerate(llama3_special_tokens())}
        self._encoding = tiktoken.Encoding(
            name=f"llama3-{_sha256(rank_file_bytes)[:12]}",
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self._special_ids,
            explicit_n_vocab=num_regular + LLAMA3_NUM_SPECIAL_TOKENS,
        )
        self.vocab_size = num_regular + LLAMA3_NUM_SPECIAL_TOKENS
        self.bos_id = self._special_ids["<|begin_of_text|>"]
        self.eos_id = self._special_ids["<|end_of_text|>"]
        self.pad_id = self._special_ids["<|finetune_right_pad_id|>"]
        self.stop_ids = frozenset(self._special_ids[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids: list[int] = []
        for piece in _split_long_runs(text):
            ids.extend(self._encoding.encode_ordinary(piece))
        return self._framed(ids, bos, eos)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        pieces_per_text = [list(_split_long_runs(text)) for text in texts]
        flat = [piece for pieces in pieces_per_text for piece in pieces]
        encoded = iter(self._encoding.encode_ordinary_batch(flat, num_threads=os.cpu_count() or 1))
        # Most texts are one piece: take its list as it is (joining lists token by token costs as much as encoding).
        return [next(encoded) if len(pieces) == 1 else
                list(itertools.chain.from_iterable(next(encoded) for _ in pieces)) for pieces in pieces_per_text]

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """tiktoken's ids straight into numpy (no Python int per token), the pieces on a thread each."""
        pieces_per_text = [list(_split_long_runs(text)) for text in texts]
        flat = [piece for pieces in pieces_per_text for piece in pieces]

        def encode(piece: str) -> np.ndarray:  # encode_ordinary's ids: no special token is recognised in the text
            return self._encoding.encode_to_numpy(piece, allowed_special=set(), disallowed_special=())

        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            encoded = iter(list(pool.map(encode, flat)))
        return [next(encoded) if len(pieces) == 1 else np.concatenate([next(encoded) for _ in pieces])
                for pieces in pieces_per_text]

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode(self._check_ids(ids), errors="replace")

    def special_id(self, token: str) -> int:
        try:
            return self._special_ids[token]
        except KeyError:
            source = self.path or "<bytes>"
            raise TokenizerError(f"unknown special token {token!r} for Llama 3 tokenizer {source}") from None

    def fingerprint(self) -> str:
        return _sha256(self._file_bytes)


# --------------------------------------------------------------------------------------------
# Loading and training
# --------------------------------------------------------------------------------------------


def _resolve_tokenizer_file(path: Path) -> Path:
    """A file as given; for a model directory, its tokenizer.model (HF Llama 3 keeps it in original/)."""
    if not path.is_dir():
        return path
    for candidate in (path / "tokenizer.model", path / "original" / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise TokenizerError(f"{path}: directory has no tokenizer.model (nor original/tokenizer.model)")


def load_tokenizer(path: PathLike) -> Tokenizer:
    """Load a SentencePiece model or a Llama 3 tiktoken rank file, telling them apart by content."""
    file_path = _resolve_tokenizer_file(Path(path))
    try:
        data = file_path.read_bytes()
    except OSError as error:
        raise TokenizerError(f"{file_path}: cannot read tokenizer file ({error.strerror or error})") from error
    if not data.strip():
        raise TokenizerError(f"{file_path}: tokenizer file is empty")
    first_line = data.split(b"\n", 1)[0]
    if _RANK_LINE.match(first_line):
        return Llama3Tokenizer(data, file_path)
    try:
        return SentencePieceTokenizer(data, file_path)
    except TokenizerError:
        raise TokenizerError(f"{file_path}: neither a SentencePiece model nor a Llama 3 tiktoken rank file") from None


def _training_lines(inputs: Iterable[str | os.PathLike[str]], max_lines: int) -> list[str]:
    """Non-blank lines of the inputs, thinned evenly (deterministically) to at most max_lines."""
    lines: list[str] = []
    for item in inputs:
        if isinstance(item, os.PathLike):
            try:
                text = Path(item).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise TokenizerError(f"{item}: cannot read tokenizer training text ({error})") from error
        else:
            text = item
        lines.extend(line for line in text.splitlines() if line.strip())
    if not lines:
        raise TokenizerError("no text to train a tokenizer on")
    if len(lines) > max_lines:
        stride = len(lines) / max_lines
        lines = [lines[int(i * stride)] for i in range(max_lines)]
    return lines


def train_sentencepiece(
    inputs: Iterable[str | os.PathLike[str]],
    out_path: PathLike,
    vocab_size: int,
    *,
    max_lines: int = 300_000,
    character_coverage: float = 0.99995,
    num_threads: int | None = None,
    infilling: bool = False,
) -> SentencePieceTokenizer:
    """Train a Llama-2-like BPE SentencePiece model and write it atomically to `out_path`.

    `inputs` items that are `os.PathLike` are read as UTF-8 files; `str` items are the text itself.
    Settings follow Llama 2's tokenizer: BPE, byte fallback, digits split, identity normalization,
    whitespace kept as is (indentation matters in code), unk/BOS/EOS = 0/1/2. The training lines
    are thinned by a fixed stride rather than SentencePiece's random sampling, so the same inputs
    always give the same model.

    infilling: the last four of the `vocab_size` pieces are Code Llama's `INFILLING_PIECES`, as control pieces (BPE
    learns the other `vocab_size - 4`), for fill-in-the-middle training and prompts (`llama_jax.infilling`).
    """
    import sentencepiece

    lines = _training_lines(inputs, max_lines)
    model = io.BytesIO()
    added = INFILLING_PIECES if infilling else ()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size - len(added),
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            split_by_unicode_script=True,
            split_by_number=True,
            split_by_whitespace=True,
            max_sentencepiece_length=16,
            character_coverage=character_coverage,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            input_sentence_size=0,  # no sampling: lines were thinned above
            shuffle_input_sentence=False,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as error:
        learned = f" (it learns vocab_size - {len(added)} pieces beside the infilling ones)" if added else ""
        raise TokenizerError(f"SentencePiece training for {out_path} failed: {error}{learned}") from error
    model_bytes = _with_appended_control_pieces(model.getvalue(), added) if added else model.getvalue()
    out = Path(out_path)
    _write_atomically(out, model_bytes)
    return SentencePieceTokenizer(model_bytes, out)


def _write_atomically(path: Path, data: bytes) -> None:
    """Readers see either the old file or the complete new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
