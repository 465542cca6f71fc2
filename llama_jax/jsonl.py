"""Reading text inputs, so that a bad one is reported the same way everywhere: `PATH:LINE:COLUMN: what is wrong`.

`read_jsonl` is the one JSONL reader (corpus sources, conversations, prompts, multiple-choice questions; plain,
gzip'd — `.gz` — or zstd-compressed — `.zst` —, decompressed as it reads),
`read_json` the one JSON-file reader (checkpoint configs and indexes), and `utf8_text` the one decoder of a whole text
file (configs, corpus text, prompt lists). Lines and columns count from 1; a column counts bytes for bad UTF-8 and
characters for bad JSON.

A JSONL file may also be an object-store URL ("s3://bucket/chats.jsonl.zst", "gs://...", "https://...",
"memory://..."), given as a string or as the `upath.UPath` that `url_path` (and `llama_jax.data.resolve_sources`)
makes of one: it is read through fsspec, streamed and checked for truncation as a local file is, and its errors
name the URL.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from llama_jax.errors import DataError, LlamaJaxError

if TYPE_CHECKING:
    from upath import UPath

PathLike = str | os.PathLike[str]
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")  # two letters or more: "C://x" stays a Windows path


def is_url(name: object) -> bool:
    """Whether `name` is a URL string ("scheme://..."), as opposed to a local path."""
    return isinstance(name, str) and _URL.match(name) is not None


def url_path(url: str) -> UPath:
    """The `upath.UPath` of `url` (which behaves as a pathlib.Path: name, suffixes, stat, open, glob, is_dir),
    once fsspec can read its protocol: one DataError names the URL and the package to install when it cannot."""
    import fsspec
    from fsspec.registry import known_implementations
    from upath import UPath

    protocol = url.split("://", 1)[0].lower()
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:  # fsspec knows the protocol; the package implementing it is not installed
        package = known_implementations.get(protocol, {}).get("class", "").split(".")[0]
        if package and package != "fsspec":
            raise DataError(f"{url}: reading {protocol}:// URLs needs the {package} package, which is not installed "
                            f"(pip install {package})") from None
        raise DataError(f"{url}: cannot read {protocol}:// URLs here ({exc})") from None
    except ValueError:
        raise DataError(f"{url}: unknown URL protocol {protocol!r} (fsspec has no filesystem for it)") from None
    return UPath(url)


def read_jsonl(path: PathLike | UPath, what: str, error: type[LlamaJaxError] = DataError) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) for each non-blank line of a JSONL file, read line by line.

    A file that cannot be opened is a DataError ("PATH: cannot read WHAT (...)"), a damaged compressed one a
    DataError naming the line after which it broke; a line that is not UTF-8 or not JSON is one `error` naming the
    file, line and column ("PATH:LINE:COLUMN: not valid JSON (...)").
    """
    try:
        file = _open_binary(path)  # bytes, so that bad UTF-8 is reported with its line number
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc
    with file:
        for line_number, raw_line in enumerate(_lines(file, path), start=1):
            try:
                line = raw_line.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not content
            except UnicodeDecodeError as exc:
                raise error(f"{path}:{line_number}:{exc.start + 1}: not valid UTF-8 ({exc.reason})") from None
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line.rstrip("\r\n"))  # an error at the end stays on this line
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{line_number}:{exc.colno}: not valid JSON ({_json_problem(exc)})") from None


def _open_binary(path: PathLike | UPath) -> io.BufferedIOBase:
    if is_url(path) or not isinstance(path, (str, os.PathLike)):  # a URL, as a string or an (fsspec) UPath
        return _open_url(url_path(path) if isinstance(path, str) else path)
    name = os.fspath(path)
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(open(path, "rb")), buffer_size=1 << 16)
    return open(path, "rb")


def _open_url(path: UPath) -> io.BufferedIOBase:
    """`path` (a UPath) opened through fsspec, decompressed as it is read like a local file."""
    raw = path.open("rb")
    name = path.name
    if name.endswith(".gz"):
        file = gzip.GzipFile(fileobj=raw, mode="rb")
        file.myfileobj = raw  # the attribute by which GzipFile closes a file it opened itself: it owns this one too
        return file
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(raw), buffer_size=1 << 16)
    return raw


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a zstd file, frame after frame. zstandard's own stream reader returns a file cut
    inside a frame as if it had ended there; this one raises EOFError, so a truncated download is not read as a
    shorter corpus. Its decompressor object has no output limit, so the input is fed in pieces sized from the ratio
    seen so far: about `_OUTPUT_BYTES` come out per call, however well the text compresses."""

    _OUTPUT_BYTES = 1 << 18
    _MIN_INPUT, _MAX_INPUT = 64, 1 << 16

    def __init__(self, raw: io.BufferedIOBase):
        import zstandard

        self._raw, self._context = raw, zstandard.ZstdDecompressor()
        self._frame = self._context.decompressobj()
        self._in_frame = False
        self._input_bytes = self._MIN_INPUT  # grows once the ratio is known
        self._out, self._offset = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._offset == len(self._out):
            chunk = self._raw.read(self._input_bytes)
            if not chunk:
                if self._in_frame and not self._frame.eof:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._out, self._offset = self._decompress(chunk), 0
            self._input_bytes = self._next_input_bytes(len(chunk), len(self._out))
        count = min(len(buffer), len(self._out) - self._offset)
        buffer[:count] = self._out[self._offset:self._offset + count]
        self._offset += count
        return count

    def _next_input_bytes(self, fed: int, produced: int) -> int:
        if not produced:  # a block is still incomplete: its size says nothing about the ratio yet
            return min(self._MAX_INPUT, 2 * fed)
        wanted = self._OUTPUT_BYTES * fed / produced
        return int(min(self._MAX_INPUT, max(self._MIN_INPUT, wanted)))

    def _decompress(self, chunk: bytes) -> bytes:
        self._in_frame = True
        out = [self._frame.decompress(chunk)]
        while self._frame.eof and self._frame.unused_data:  # the next frame begins in this chunk
            rest = self._frame.unused_data
            self._frame = self._context.decompressobj()
            out.append(self._frame.decompress(rest))
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _lines(file: io.BufferedIOBase, path: PathLike) -> Iterator[bytes]:
    """The file's lines; a compressed stream that breaks off or is corrupt is one DataError naming where."""
    count = 0
    while True:
        try:
            line = file.readline()
        except (OSError, EOFError, zlib.error, _ZstdError) as exc:
            raise DataError(f"{path}: the compressed stream is damaged after line {count} ({exc})") from None
        if not line:
            return
        count += 1
        yield line


try:
    from zstandard import ZstdError as _ZstdError
except ImportError:  # pragma: no cover - zstandard is an install requirement
    class _ZstdError(Exception):
        pass


def read_json(path: PathLike, what: str, error: type[LlamaJaxError] = DataError) -> Any:
    """The JSON value a whole file holds; a missing, unreadable, non-UTF-8 or malformed file is one `error`."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    text = utf8_text(data, path, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({_json_problem(exc)})") from None


def utf8_text(data: bytes, path: PathLike, error: type[LlamaJaxError] = DataError) -> str:
    """`data` decoded as UTF-8 (without a byte-order mark), or one `error` naming the line and byte column."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not content
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(f"{path}:{line}:{exc.start - line_start + 1}: not valid UTF-8 ({exc.reason})") from None


def _json_problem(error: json.JSONDecodeError) -> str:
    """json's message without the position it expects to follow ("Unterminated string starting at"): the position
    is already in the PATH:LINE:COLUMN prefix."""
    return error.msg[:-len(" at")] + " here" if error.msg.endswith(" at") else error.msg
