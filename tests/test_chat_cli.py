"""eval.chat: a two-turn conversation through stdin, checked against non-streamed greedy generation.

The model's weights are random, so what it answers cannot be predicted; instead the test checks the mechanics: the
second turn's prompt is the whole dialog (the first question and the first answer included), and what the program
streams equals what `generate` (the batch path, no streaming) produces for the same prompts.
"""
from __future__ import annotations

from test_generate import MAX_NEW, finish, hf_model, model, model_dir, start_module, tokenizer  # noqa: F401 (module fixtures shared with these tests)

from eval.chat import PROMPT_PAD_MULTIPLE, ChatSession, run_chat
from llama_jax.chat_format import Message, dialog_prompt
from llama_jax.generate import generate

QUESTIONS = ["The quick brown fox", "What did I say before?"]


def expected_dialog(model, tokenizer) -> list[tuple[list[int], list[int], str]]:
    """(prompt tokens, answer tokens, answer text) per turn, from `generate` and the chat format directly."""
    stop_ids = {tokenizer.eos_id}  # Llama 2 format: answers end at EOS
    messages: list[Message] = []
    turns = []
    for question in QUESTIONS:
        messages.append(Message("user", question))
        prompt = dialog_prompt(messages, tokenizer, "llama2")
        answer = generate(model, [prompt], max_new_tokens=MAX_NEW, stop_ids=stop_ids,
                          pad_to_multiple=PROMPT_PAD_MULTIPLE)[0].tokens
        text = tokenizer.decode(answer)
        messages.append(Message("assistant", text))
        turns.append((prompt, answer, text))
    return turns


def test_chat_program_keeps_the_conversation(model, tokenizer, model_dir):
    import json

    process = start_module("eval.chat", "--model", str(model_dir), "--max-new-tokens", str(MAX_NEW),
                           "--debug-tokens")
    expected = expected_dialog(model, tokenizer)  # computed while the program starts up and compiles

    status, stdout, stderr = finish(process, "".join(question + "\n" for question in QUESTIONS))
    assert status == 0, stderr
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert len(records) == 2
    (first_prompt, first_answer, first_text), (second_prompt, second_answer, second_text) = expected
    assert first_answer, "the test model answered nothing: the second turn could not show it saw the first"

    # The second turn's prompt holds the first question and the first answer, before the second question.
    assert records[1]["prompt_tokens"] == second_prompt
    assert second_prompt[: len(first_prompt)] == first_prompt
    rendered = tokenizer.decode(second_prompt)
    assert rendered.index(QUESTIONS[0]) < rendered.index(first_text.strip()) < rendered.index(QUESTIONS[1])
    # Streamed answers equal the non-streamed greedy answers of the same prompts.
    assert [r["answer_tokens"] for r in records] == [first_answer, second_answer]
    assert records[0]["prompt_tokens"] == first_prompt
    assert stdout == f"{first_text}\n{second_text}\n"


class FlushRecorder:
    """A text stream that remembers what was written between flushes."""

    def __init__(self) -> None:
        self.flushed: list[str] = []
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self.flushed.append(self._pending)
        self._pending = ""


def test_answers_stream_piece_by_piece_and_exit_ends_the_chat(model, tokenizer):
    import io

    session = ChatSession(model, tokenizer, "llama2", system="Be brief.", max_new_tokens=MAX_NEW)
    out = FlushRecorder()
    run_chat(session, io.StringIO(f"{QUESTIONS[0]}\n\n/exit\n{QUESTIONS[1]}\n"), out, interactive=True)

    assert session.turns == 1  # the blank line is skipped and nothing after /exit is read
    assert [m.role for m in session.messages] == ["system", "user", "assistant"]
    answer = session.messages[-1].content
    # Flushed: the user prompt, the answer piece by piece, its newline, and two more prompts (blank line, /exit).
    assert out.flushed[0] == "> " and out.flushed[-3:] == ["\n", "> ", "> "]
    pieces = out.flushed[1:-3]
    assert "".join(pieces) == answer
    assert len(pieces) > 1  # written as the tokens came, not in one piece at the end
    expected = generate(model, [session.last_prompt_tokens], max_new_tokens=MAX_NEW, stop_ids={tokenizer.eos_id},
                        pad_to_multiple=PROMPT_PAD_MULTIPLE)[0]
    assert session.last_answer_tokens == expected.tokens


def test_sft_program_fine_tunes_into_a_loadable_run_dir(model, model_dir, tmp_path):
    """train.sft end to end on a few conversations: the run directory alone (final checkpoint + tokenizer) is what
    eval.generate takes as --model, and its weights moved away from the starting point. Paths are given relative to
    the working directory, as users type them (Orbax reads no checkpoint metadata under a relative path)."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np
    from test_generate import REPO

    import llama_jax
    from llama_jax.params import model_params

    chats = tmp_path / "chats.jsonl"
    with open(chats, "w") as f:
        for i in range(12):
            messages = [{"role": "user", "content": f"Repeat after me: {i} fox"},
                        {"role": "assistant", "content": f"{i} fox"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    run_dir = tmp_path / "sft"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one device
    command = [sys.executable, "-m", "train.sft", "configs/sft.yaml", f"init_from={os.path.relpath(model_dir, REPO)}",
               f"data.path={chats}",
               f"run_dir={run_dir}", "train.batch_size=2", "train.seq_len=64", "sft.epochs=1", "optimizer.lr=1e-3",
               "train.log_every_steps=1"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "tokenizer.model").read_bytes() == (model_dir / "tokenizer.model").read_bytes()
    assert not (run_dir / "model").exists()  # no second copy of the weights: the last checkpoint is the model

    tuned = llama_jax.load(run_dir)
    before, after = model_params(model), model_params(tuned)
    assert before.keys() == after.keys()
    assert any(not np.allclose(np.asarray(before[name]), np.asarray(after[name])) for name in before)

    process = start_module("eval.generate", "--model", os.path.relpath(run_dir, REPO),
                           "--prompt", "Repeat after me: 3 fox", "--chat-format", "llama2", "--max-new-tokens", "4",
                           "--json")
    status, stdout, stderr = finish(process)
    assert status == 0, stderr
    assert json.loads(stdout)["prompt"] == "Repeat after me: 3 fox"
