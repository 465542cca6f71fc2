"""The one JSONL reader: every JSONL input (corpus sources, conversations, prompts, multiple-choice questions) is read
through `read_jsonl`, so a bad line is reported the same way everywhere: `PATH:LINE: not valid JSON (...)`."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from llama_jax.errors import DataError, LlamaJaxError


def read_jsonl(path: str | os.PathLike[str], what: str,
               error: type[LlamaJaxError] = DataError) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) for each non-blank line of a JSONL file, read line by line.

    The one JSONL reader: a file that cannot be opened is a DataError ("PATH: cannot read WHAT (...)"); a line that
    is not UTF-8 or not JSON is one `error` naming the file and line ("PATH:LINE: not valid JSON (...)").
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
                raise error(f"{path}:{line_number}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{line_number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
