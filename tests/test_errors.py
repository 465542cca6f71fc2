"""Errors that point at the real cause (issue 23): one exact line per broken input, and a property over every
program's bad inputs — exit status 2, exactly one `error:` line, no traceback, nothing written."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llama_jax
from llama_jax.cli import run_program
from llama_jax.config import load_config
from llama_jax.data import corpus_documents, resolve_sources
from llama_jax.errors import ConfigError, DataError
from llama_jax.jsonl import read_jsonl
from llama_jax.pretraining_data import prepare_pretraining_data
from llama_jax.sft_data import read_chat_sources
from llama_jax.tokenizer import train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=test", "model.vocab_size=320", "train.batch_size=8", "train.seq_len=64", "train.steps=2",
        "train.peak_tflops=1", "eval.batches=1"]


def held_out_rank(text: str) -> int:
    """The documented rule, computed here independently: sha256 of the UTF-8 text, first 8 bytes, mod 1000."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 1000


def split_texts(paths, part):
    return [text for _, text in corpus_documents(paths, part)]


# ── 1. A corpus of one file, or a small folder, trains without data.valid_path ─────────────────────────────────
def test_one_text_holds_out_its_last_tenth_from_a_line_start(tmp_path):
    lines = [f"line {i:04d}\n" for i in range(100)]  # 10 characters each: 1000 in all
    corpus = tmp_path / "one.txt"
    corpus.write_text("".join(lines))
    paths = resolve_sources(corpus)
    # the last 10% = 100 characters = the last 10 lines; both sides together are the text, nothing lost or repeated
    assert split_texts(paths, "valid") == ["".join(lines[90:])]
    assert split_texts(paths, "train") == ["".join(lines[:90])]


def test_one_text_without_newlines_is_cut_at_the_character(tmp_path):
    corpus = tmp_path / "one.txt"
    corpus.write_text("x" * 95 + "y" * 5)
    paths = resolve_sources(corpus)
    assert split_texts(paths, "valid") == ["xxxxx" + "yyyyy"] and split_texts(paths, "train") == ["x" * 90]


def small_corpus(root: Path, names: list[str], texts: list[str]) -> Path:
    root.mkdir(parents=True)
    for name, text in zip(names, texts, strict=True):
        (root / name).write_text(text)
    return root


def test_a_small_folder_holds_out_documents_by_their_text_not_their_location(tmp_path):
    texts = [f"document {i}: " + "words " * (i + 3) for i in range(6)]
    # The documented rule picks documents whose rank is below 10; with none below, the smallest rank moves.
    ranks = [held_out_rank(text) for text in texts]
    expected_valid = {text for text, rank in zip(texts, ranks, strict=True) if rank < 10} or {
        texts[ranks.index(min(ranks))]}
    here = small_corpus(tmp_path / "a" / "corpus", [f"{i}.txt" for i in range(6)], texts)
    elsewhere = small_corpus(tmp_path / "somewhere" / "else" / "renamed",
                             [f"z{5 - i}.txt" for i in range(6)], texts)  # other names, other order on disk
    for root in (here, elsewhere):
        paths = resolve_sources(root)
        valid, train = split_texts(paths, "valid"), split_texts(paths, "train")
        assert set(valid) == expected_valid
        assert sorted(valid + train) == sorted(texts)


def test_a_jsonl_corpus_splits_its_records(tmp_path):
    texts = [f"record {i} " * 3 for i in range(300)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    valid = split_texts([corpus], "valid")
    assert valid == [text for text in texts if held_out_rank(text) < 10] and 0 < len(valid) < 15


def test_pretraining_data_from_one_file_needs_no_valid_path(tmp_path):
    corpus = tmp_path / "one.txt"
    corpus.write_text("".join(f"the fox {i % 13} jumps over dog {i % 7}\n" for i in range(300)))
    tokenizer = train_sentencepiece([corpus], tmp_path / "tok.model", vocab_size=300)
    config = load_config(None, [*TINY, f"data.path={corpus}", f"data.tokenizer={tokenizer.path}"])
    data = prepare_pretraining_data(config, tmp_path / "run")
    head, tail = split_texts([corpus], "train")[0], split_texts([corpus], "valid")[0]
    assert data.train.num_tokens == len(tokenizer.encode(head))
    assert data.valid.num_tokens == len(tokenizer.encode(tail))


# ── 6-8. Config files: bad bytes, bad syntax, a folder ───────────────────────────────────────────────────────────
def test_a_config_that_is_not_utf8_is_one_line_exit_2(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("model: tiny\n# caf\u00e9\n".encode("latin-1"))
    result = subprocess.run([sys.executable, "-m", "llama_jax.config", str(config)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    # "é" in latin-1 is the byte 0xe9, the 6th of line 2 ("# caf" before it); "\n" follows, not a continuation byte
    assert result.stderr == f"error: config file {config}:2:6: not valid UTF-8 (invalid continuation byte)\n"


@pytest.mark.parametrize("text, where, problem", [
    ("model: tiny\ntrain:\n  steps: [1\n", "4:1",
     "expected ',' or ']', but got '<stream end>'; while parsing a flow sequence at line 3 column 10"),
    ("model: tiny\n seed: 3\n", "2:6", "mapping values are not allowed here"),
])
def test_yaml_syntax_errors_name_the_file_line_and_column(tmp_path, text, where, problem):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert str(raised.value) == f"config file {config}:{where}: not valid YAML ({problem})"


def test_a_jsonl_syntax_error_gives_its_column(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "cut sho')
    with pytest.raises(DataError) as raised:
        list(read_jsonl(path, "source"))
    assert str(raised.value) == f"{path}:2:10: not valid JSON (Unterminated string starting here)"


def test_a_config_path_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path)
    assert str(raised.value) == f"config file {tmp_path} is a directory; expected a YAML file"


def chat_line(question: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})


def test_sft_reads_folders_and_globs_of_chat_files(tmp_path):
    folder = tmp_path / "chats"
    (folder / "b").mkdir(parents=True)
    (folder / "a.jsonl").write_text(chat_line("q1", "a1") + "\n")
    (folder / "b" / "c.jsonl").write_text(chat_line("q2", "a2") + "\n" + chat_line("q3", "a3") + "\n")
    (folder / "notes.txt").write_text("not a chat file")
    questions = lambda source: [dialog[0].content for dialog in read_chat_sources(source)]  # noqa: E731
    assert questions(folder) == ["q1", "q2", "q3"]
    assert questions(str(folder / "**" / "*.jsonl")) == ["q1", "q2", "q3"]
    with pytest.raises(DataError) as raised:
        list(read_chat_sources(folder / "b" / "empty"))
    assert str(raised.value) == f"{folder / 'b' / 'empty'}: no such source file"


# ── 9. A rejected input leaves no run directory behind ──────────────────────────────────────────────────────────
@pytest.mark.parametrize("case", ["missing", "bad-line"])
def test_pretrain_writes_nothing_when_its_data_is_rejected(tmp_path, case):
    corpus = tmp_path / "docs.jsonl"
    if case == "bad-line":
        corpus.write_text('{"text": "one"}\n{"text": "two"}\n{"txt": "three"}\n')
    run_dir = tmp_path / "run"
    status, stdout, stderr = run_in_process("train.pretrain", ["configs/tiny.yaml", *TINY, f"data.path={corpus}",
                                                               f"run_dir={run_dir}"])
    expected = {"missing": f"{corpus}: no such source file",
                "bad-line": f"{corpus}:3: JSON line has no string field 'text' (its fields: 'txt'; choose one with "
                            "data.text_field)"}[case]
    assert (status, stderr) == (2, f"error: {expected}\n")
    assert not run_dir.exists()


# ── The property: every program, every broken input ──────────────────────────────────────────────────────────────
def run_in_process(module: str, argv: list[str], cwd: Path = REPO) -> tuple[int, str, str]:
    """A program's main as `python -m` runs it, in this process: (exit status, stdout, stderr). An exception other
    than a user error propagates (it would be a traceback)."""
    import importlib

    imported = importlib.import_module(module)
    if hasattr(imported, "__path__"):  # a package runs as its __main__
        imported = importlib.import_module(f"{module}.__main__")
    main = imported.main
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), contextlib.chdir(cwd):
        try:
            run_program(main, argv)
        except SystemExit as exit_:
            status = exit_.code
    return status, stdout.getvalue(), stderr.getvalue()


GOOD_CONFIG = """model:
  preset: test
  vocab_size: 320
seed: 0
train:
  batch_size: 8
  seq_len: 64
  steps: 2
  peak_tflops: 1.0
eval:
  batches: 1
"""


@dataclass(frozen=True)
class Inputs:
    """A workspace of good inputs for every program; each case breaks one file in a copy of it."""

    root: Path

    def files(self) -> dict[str, bytes]:
        return {str(path.relative_to(self.root)): path.read_bytes()
                for path in sorted(self.root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("inputs")
    texts = [f"doc {i}: the fox {i % 13} jumps over the dog {i % 7}.\n" * 3 for i in range(40)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    (root / "chats.jsonl").write_text("".join(chat_line(f"question {i}", f"answer {i}") + "\n" for i in range(8)))
    (root / "questions.jsonl").write_text("".join(
        json.dumps({"context": f"fox {i}", "choices": ["jumps", "sleeps"], "answer": 0}) + "\n" for i in range(4)))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"the fox {i}"}) + "\n" for i in range(3)))
    (root / "config.yaml").write_text(GOOD_CONFIG)
    tokenizer = train_sentencepiece(texts, root / "tokenizer.model", vocab_size=300)
    from flax import nnx

    model = llama_jax.Llama(load_config(root / "config.yaml").model, rngs=nnx.Rngs(0))
    llama_jax.save(model, root / "model")
    shutil.copy(tokenizer.path, root / "model" / "tokenizer.model")
    llama_jax.save(model, root / "hf", format="hf")
    return Inputs(root)


@dataclass(frozen=True)
class Program:
    module: str
    argv: Callable[[Path], list[str]]
    breakable: tuple[str, ...]  # the input files a case may break
    own_process: bool = False  # it must import jax itself (train.plan sets the simulated device count first)

    def run(self, workspace: Path) -> tuple[int, str]:
        """(exit status, stderr) of the program on the workspace's inputs, run from the workspace."""
        if not self.own_process:
            status, _, stderr = run_in_process(self.module, self.argv(workspace), cwd=workspace)
            return status, stderr
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("XLA_FLAGS", None)
        result = subprocess.run([sys.executable, "-m", self.module, *self.argv(workspace)], cwd=workspace, env=env,
                                capture_output=True, text=True, timeout=300)
        return result.returncode, result.stderr


PROGRAMS = [
    Program("train.pretrain", lambda w: [str(w / "config.yaml"), f"data.path={w / 'corpus.jsonl'}",
                                         f"data.tokenizer={w / 'tokenizer.model'}", f"run_dir={w / 'run'}"],
            ("config.yaml", "corpus.jsonl")),
    Program("train.sft", lambda w: [str(w / "config.yaml"), f"init_from={w / 'model'}",
                                    f"data.path={w / 'chats.jsonl'}", f"run_dir={w / 'sft-run'}"],
            ("config.yaml", "chats.jsonl")),
    Program("train.gatt", lambda w: ["gatt", "--instruction", "Answer as a pirate.", str(w / "chats.jsonl"),
                                     str(w / "gatt.jsonl")], ("chats.jsonl",)),
    Program("train.plan", lambda w: [str(w / "config.yaml"), "--devices", "8", "--no-suggest", "--no-verify"],
            ("config.yaml",), own_process=True),
    Program("llama_jax.config", lambda w: [str(w / "config.yaml")], ("config.yaml",)),
    Program("eval.perplexity", lambda w: ["--model", str(w / "model"), "--data", str(w / "corpus.jsonl"),
                                          "--store-dir", str(w / "store"), "--no-progress"], ("corpus.jsonl",)),
    Program("eval.multiple_choice", lambda w: ["--model", str(w / "model"), "--data", str(w / "questions.jsonl"),
                                               "--no-progress"], ("questions.jsonl",)),
    Program("eval.generate", lambda w: ["--model", str(w / "model"), "--prompts", str(w / "prompts.jsonl"),
                                        "--max-new-tokens", "2"], ("prompts.jsonl", "model/model.json")),
    Program("llama_jax.convert", lambda w: [str(w / "hf"), str(w / "converted"), "--to", "orbax"],
            ("hf/config.json", "hf/model.safetensors")),
]


def break_file(data: bytes, how: str, where: float) -> bytes:
    """Break a file for sure, at a position chosen by `where` in [0, 1)."""
    if how == "truncate":  # a copy or download that stopped early: before a JSON file's closing brace
        return data[:int(where * (data.rindex(b"}") if data.lstrip().startswith(b"{") else len(data)))]
    lines = data.decode("utf-8").splitlines(keepends=True)
    line_index = min(int(where * len(lines)), len(lines) - 1)
    if how == "bad-utf8":  # 0xff starts no UTF-8 sequence
        at = int(where * len(data))
        return data[:at] + b"\xff" + data[at:]
    if how == "cut-line":  # every proper prefix of a JSON object is invalid JSON
        line = lines[line_index].rstrip("\n")
        lines[line_index] = line[:max(1, int(where * len(line)))] + "\n"
    elif how == "unclosed-yaml":  # nothing after it closes the brace
        lines.insert(line_index, "broken: {unclosed\n")
    elif how == "code-tag":  # safe_load refuses it; had it run, PWNED would appear in the workspace (the cwd)
        lines.insert(line_index, 'pwned: !!python/object/apply:os.system ["touch PWNED"]\n')
    elif how == "wrong-type":
        lines = [re.sub(r"^(\s*\w+:) [\w.]+$", r"\1 lots", line.rstrip("\n")) + "\n"
                 if index == line_index and ":" in line and not line.rstrip().endswith(":") else line
                 for index, line in enumerate(lines)]
        if lines == data.decode("utf-8").splitlines(keepends=True):
            lines.append("seed: lots\n")
    elif how == "drop-field":  # rename the first key of a record: the reader wants it by name
        record = json.loads(lines[line_index])
        first = next(iter(record))
        lines[line_index] = json.dumps({f"{first}_typo": record[first], **{k: v for k, v in record.items()
                                                                             if k != first}}) + "\n"
    return "".join(lines).encode("utf-8")


BREAKS = {".yaml": ("bad-utf8", "unclosed-yaml", "code-tag", "wrong-type"),
          ".jsonl": ("bad-utf8", "cut-line", "drop-field"),
          ".json": ("bad-utf8", "truncate"),
          ".safetensors": ("truncate",)}

CASES = [(program, name, how) for program in PROGRAMS for name in program.breakable
         for how in BREAKS[Path(name).suffix]]


def check_user_error(workspace: Path, program: Program, before: dict[str, bytes]) -> str:
    status, stderr = program.run(workspace)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 2, stderr
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    assert Inputs(workspace).files() == before, "the program wrote or changed files"
    return errors[0]


@settings(max_examples=len(CASES) * 2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=st.sampled_from(CASES), where=st.floats(0, 1, exclude_max=True))
def test_every_broken_input_gives_one_error_line_exit_2_and_writes_nothing(inputs, tmp_path_factory, case,
                                                                            where):
    program, name, how = case
    workspace = tmp_path_factory.mktemp("case")
    shutil.copytree(inputs.root, workspace, dirs_exist_ok=True)
    target = workspace / name
    target.write_bytes(break_file(target.read_bytes(), how, where))
    before = Inputs(workspace).files()
    error = check_user_error(workspace, program, before)
    assert str(workspace) in error or name in error, error  # it names the input that is wrong
    shutil.rmtree(workspace)


@pytest.mark.parametrize("program", PROGRAMS, ids=[program.module for program in PROGRAMS])
@pytest.mark.parametrize("missing", ["file", "folder-for-file"])
def test_every_missing_or_misplaced_input_gives_one_error_line(inputs, tmp_path, program, missing):
    shutil.copytree(inputs.root, tmp_path, dirs_exist_ok=True)
    target = tmp_path / program.breakable[0]
    target.unlink()
    if missing == "folder-for-file":
        target.mkdir()
    error = check_user_error(tmp_path, program, Inputs(tmp_path).files())
    assert str(target) in error, error


def test_the_cases_cover_every_program_and_break():
    assert {program.module for program, _, _ in CASES} == {program.module for program in PROGRAMS}
    assert {how for _, _, how in CASES} == {how for hows in BREAKS.values() for how in hows}
    rng = random.Random(0)  # each break really changes its file
    for program, name, how in CASES:
        data = (GOOD_CONFIG.encode() if name.endswith(".yaml") else b'{"a": 1, "b": [2]}\n{"c": "d"}\n')
        assert break_file(data, how, rng.random()) != data, (program.module, how)
