"""Reading text inputs, so that a bad one is reported the same way everywhere: `PATH:LINE:COLUMN: what is wrong`.

`read_jsonl` is the one JSONL reader (corpus sources, conversations, prompts, multiple-choice questions),
`read_json` the one JSON-file reader (checkpoint configs and indexes), and `utf8_text` the one decoder of a whole text
file (configs, corpus text, prompt lists). Lines and columns count from 1; a column counts bytes for bad UTF-8 and
characters for bad JSON.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from llama_jax.errors import DataError, LlamaJaxError

PathLike = str | os.PathLike[str]


def read_jsonl(path: PathLike, what: str, error: type[LlamaJaxError] = DataError) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) for each non-blank line of a JSONL file, read line by line.

    A file that cannot be opened is a DataError ("PATH: cannot read WHAT (...)"); a line that is not UTF-8 or not
    JSON is one `error` naming the file, line and column ("PATH:LINE:COLUMN: not valid JSON (...)").
    """
    try:
        file = open(path, "rb")  # bytes, so that bad UTF-8 is reported with its line number
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc
    with file:
        for line_number, raw_line in enumerate(file, start=1):
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
