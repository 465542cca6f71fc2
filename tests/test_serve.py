"""eval.serve: the OpenAI-compatible server, driven by real clients against independent references.

One server process (`python -m eval.serve` on a free loopback port, with an API key, 4 slots and a queue of 4) is
shared by the whole module. References: `llama_jax.generate.generate` (the batch decoder: left padding, one scalar
cache index, its own loop) for every generated token; lm-eval's `local-completions` model is checked against the
lm-eval adapter's in-process scorer on the very token sequences lm-eval sent. The hostile requests are raw HTTP.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_generate import REPO, hf_model, model, model_dir, tokenizer  # noqa: F401 (module fixtures shared with these tests)

from llama_jax.chat_format import Message, dialog_prompt, generation_stop_ids
from llama_jax.generate import Sampling, generate
from llama_jax.serving import token_text

API_KEY = "test-key-123"
SLOTS, MAX_QUEUE = 4, 4
NEW = 10
PROMPTS = ["The quick brown fox", "Rain in the morning", "Numbers such as 12", "A model reads", "Über café",
           "Questions and answers: what"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(model_dir: Path, log_path: Path, *flags: str, wait_s: float = 180) -> Iterator[str]:
    """`python -m eval.serve --model MODEL_DIR FLAGS` on a free loopback port and one CPU device, its output in
    `log_path` (quoted by a failure to start); yields its base URL once /health answers, then stops it by process
    id. Shared with the browser tests (tests/test_web_page.py)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one device
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "eval.serve", "--model", str(model_dir), "--host",
                                    "127.0.0.1", "--port", str(port), *flags],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + wait_s
        while True:
            assert process.poll() is None, f"eval.serve exited with {process.returncode}:\n{log_path.read_text()}"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"eval.serve never became healthy:\n{log_path.read_text()}"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with running_server(model_dir, log_path, "--api-key", API_KEY, "--slots", str(SLOTS), "--max-queue",
                        str(MAX_QUEUE), "--served-model-name", "tiny") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


def expected_completion(model, tokenizer, prompt: list[int], stop_ids, max_new: int = NEW, **kwargs):
    completion = generate(model, [prompt], max_new_tokens=max_new, stop_ids=stop_ids, **kwargs)[0]
    return completion, tokenizer.decode(completion.tokens)


def usage_tokens(completion) -> int:
    return len(completion.tokens) + (completion.finish_reason == "stop")


# ── The official openai client ──────────────────────────────────────────────────────────────────────────────────
def test_completions_equal_generate(client, model, tokenizer):
    for text in PROMPTS[:3]:
        prompt = tokenizer.encode(text, bos=True)
        reference, reference_text = expected_completion(model, tokenizer, prompt, tokenizer.stop_ids)
        answer = client.completions.create(model="tiny", prompt=text, max_tokens=NEW, temperature=0, logprobs=0)
        choice = answer.choices[0]
        assert choice.text == reference_text
        listed = reference.tokens + ([reference.stop_token] if reference.stop_token is not None else [])
        assert choice.logprobs.tokens == [token_text(tokenizer, t) for t in listed]  # a stop token is listed too
        assert choice.finish_reason == reference.finish_reason
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), usage_tokens(reference))

        chunks = list(client.completions.create(model="tiny", prompt=text, max_tokens=NEW, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == reference_text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reference.finish_reason
        assert chunks[-1].usage.completion_tokens == usage_tokens(reference)


def test_chat_equals_generate_on_the_chat_format(client, model, tokenizer):
    messages = [Message("system", "Be brief."), Message("user", "What did I say before?")]
    prompt = dialog_prompt(messages, tokenizer, "llama2")
    stops = tokenizer.stop_ids | generation_stop_ids(tokenizer, "llama2")
    reference, reference_text = expected_completion(model, tokenizer, prompt, stops)
    as_json = [{"role": m.role, "content": m.content} for m in messages]
    answer = client.chat.completions.create(model="tiny", messages=as_json, max_tokens=NEW, temperature=0)
    assert answer.choices[0].message.content == reference_text
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == len(prompt)
    assert answer.usage.completion_tokens == usage_tokens(reference)

    chunks = list(client.chat.completions.create(model="tiny", messages=as_json, max_tokens=NEW, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference_text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == len(prompt) + usage_tokens(reference)


def test_concurrent_requests_get_what_they_get_alone(client, model, tokenizer):
    """Six requests at once on four slots (so some wait and join the running batch later), greedy and sampled with
    their own seeds: each equals `generate` on its prompt alone."""
    jobs = [(text, 0.0 if i % 2 == 0 else 0.8, 100 + i) for i, text in enumerate(PROMPTS)]
    expected = []
    for text, temperature, seed in jobs:
        prompt = tokenizer.encode(text, bos=True)
        sampling = Sampling(temperature=temperature, top_p=0.9 if temperature else 1.0)
        expected.append(expected_completion(model, tokenizer, prompt, tokenizer.stop_ids, max_new=NEW + 4,
                                            sampling=sampling, seed=seed)[1])
    answers = [None] * len(jobs)

    def ask(index: int) -> None:
        text, temperature, seed = jobs[index]
        try:
            answers[index] = ask_once(text, temperature, seed)
        except Exception as error:  # reported by the comparison below
            answers[index] = repr(error)

    def ask_once(text: str, temperature: float, seed: int) -> str:
        return client.completions.create(model="tiny", prompt=text, max_tokens=NEW + 4, seed=seed,
                                         temperature=temperature, top_p=0.9 if temperature else 1.0,
                                         ).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == expected


def test_stop_strings_end_the_text_before_them(client, model, tokenizer):
    prompt = tokenizer.encode(PROMPTS[0], bos=True)
    _, full = expected_completion(model, tokenizer, prompt, tokenizer.stop_ids)
    stop = full.strip()[2:4]
    assert stop and stop in full
    for stream in (False, True):
        answer = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=NEW, temperature=0,
                                           stop=[stop], stream=stream)
        chunks = list(answer) if stream else [answer]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == full[:full.index(stop)]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


# ── lm-eval through the server ──────────────────────────────────────────────────────────────────────────────────
TASK_YAML = """task: serve_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""
EXAMPLES = [{"context": "The quick brown", "choices": [" fox", " dog jumps", " cat"], "answer": 0},
            {"context": "Rain in the", "choices": [" morning", " evening sky"], "answer": 1},
            {"context": "Questions and", "choices": [" answers", " numbers 12"], "answer": 0}]


def test_lm_eval_local_completions_equals_the_in_process_scorer(server, model_dir, tokenizer, tmp_path,
                                                                monkeypatch):
    """lm-eval tokenizes through the server (/tokenize: its `remote` tokenizer) and scores with max_tokens=1 + echo +
    logprobs; every log-likelihood equals the lm-eval adapter's scorer on the same tokens, and acc follows."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from eval.lm_eval_adapter import LlamaJaxLM
    from llama_jax.scoring import score_sequences

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(example) + "\n" for example in EXAMPLES))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "task.yaml").write_text(TASK_YAML.format(data=data))
    results = lm_eval.simple_evaluate(
        model="local-completions", tasks=["serve_local_choice"], bootstrap_iters=0, torch_random_seed=None,
        model_args=f"model=tiny,base_url={server}/v1/completions,tokenizer_backend=remote,auth_token={API_KEY},"
                   "batch_size=2,num_concurrent=1,max_retries=1",
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    samples = sorted(results["samples"]["serve_local_choice"], key=lambda sample: sample["doc_id"])
    scorer = LlamaJaxLM(path=str(model_dir)).scorer
    predictions = []
    for sample in samples:
        sequences = []
        for context, continuation in sample["arguments"]:  # lm-eval's split (`LM._encode_pair`), no BOS for APIs
            stripped = context.rstrip()
            whole = tokenizer.encode(stripped + context[len(stripped):] + continuation)
            sequences.append((whole, len(whole) - len(tokenizer.encode(stripped))))
        ours = score_sequences(scorer, sequences)
        through_server = [response[0][0] for response in sample["resps"]]
        np.testing.assert_allclose(through_server, [s.log_likelihood for s in ours], rtol=1e-5, atol=1e-4)
        assert [response[0][1] for response in sample["resps"]] == [s.is_greedy for s in ours]
        predictions.append(int(np.argmax([s.log_likelihood for s in ours])))
    accuracy = np.mean([p == e["answer"] for p, e in zip(predictions, EXAMPLES)])
    assert results["results"]["serve_local_choice"]["acc,none"] == pytest.approx(accuracy)


def test_prompt_logprobs_equal_a_full_forward(server, model, tokenizer):
    """max_tokens=0 + echo + logprobs (vLLM's spelling of 'score the prompt'), against log-softmax of a plain
    forward in float64."""
    import jax.numpy as jnp

    prompt = tokenizer.encode(PROMPTS[5], bos=True)
    answer = httpx.post(f"{server}/v1/completions", headers=auth(), timeout=60, json={
        "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2, "temperature": 0}).json()
    listing = answer["choices"][0]["logprobs"]
    logits = np.asarray(model(jnp.asarray([prompt]))[0], np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    assert listing["token_logprobs"][0] is None and len(listing["token_logprobs"]) == len(prompt)
    np.testing.assert_allclose(listing["token_logprobs"][1:],
                               [log_probs[t, prompt[t + 1]] for t in range(len(prompt) - 1)], atol=1e-4)
    for t, top in enumerate(listing["top_logprobs"][1:]):
        np.testing.assert_allclose(sorted(top.values(), reverse=True), np.sort(log_probs[t])[::-1][:2], atol=1e-4)
    assert answer["usage"]["completion_tokens"] == 0


# ── Bad and hostile requests ────────────────────────────────────────────────────────────────────────────────────
def assert_error(response: httpx.Response, status: int, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param


def test_api_key_is_required(server):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert_error(httpx.post(f"{server}/v1/chat/completions", json=chat), 401)
    assert_error(httpx.post(f"{server}/v1/chat/completions", json=chat,
                            headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(f"{server}/v1/models"), 401)
    assert httpx.get(f"{server}/v1/models", headers=auth()).json()["data"][0]["id"] == "tiny"
    assert httpx.get(f"{server}/health").status_code == 200  # health checks need no key


@pytest.mark.parametrize("body, status, param", [
    (b'{"prompt": "hi", "max_tokens": 2', 400, None),  # malformed JSON
    (b'["a list"]', 400, None),
    (b'{"prompt": "hi", "max_tokens": 2, "frobnicate": true}', 400, "frobnicate"),  # unknown field
    (b'{"prompt": "hi", "max_tokens": 1000000000}', 400, "max_tokens"),  # absurd max_tokens
    (b'{"prompt": "hi", "max_tokens": -1}', 400, "max_tokens"),
    (json.dumps({"prompt": [5] * 300, "max_tokens": 1}).encode(), 400, "max_tokens"),  # longer than the context
    (b'{"prompt": [100000], "max_tokens": 1}', 400, "prompt"),  # not a token id
    (b'{"prompt": "hi", "n": 2}', 400, "n"),
    (b'{"prompt": "hi", "temperature": "hot"}', 400, "temperature"),
    (b'{"prompt": "hi", "model": "gpt-4"}', 404, "model"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    headers = {**auth(), "Content-Type": "application/json"}
    assert_error(httpx.post(f"{server}/v1/completions", content=body, headers=headers), status, param)


def test_bad_chat_requests(server):
    def chat(**fields):
        return httpx.post(f"{server}/v1/chat/completions", headers=auth(), json=fields)

    assert_error(chat(messages=[{"role": "assistant", "content": "hi"}]), 400, "messages")
    assert_error(chat(messages=[{"role": "user", "content": "hi " * 400}]), 400, "messages")
    assert_error(chat(messages=[{"role": "user", "content": "hi", "mood": "happy"}]), 400)
    assert_error(chat(messages=[{"role": "user", "content": "hi"}], logprobs=True), 400, "logprobs")


def test_a_10_mb_body_is_refused_unread(server):
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])), timeout=30) as connection:
        # Only the headers and one byte of the announced 10 MB: the answer must not wait for the rest. (Sending more
        # would race the server's close: unread bytes in its socket make the kernel reset the connection, which can
        # drop the 413 before this client reads it.)
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {10 << 20}\r\n\r\n".encode()
                           + b"{")
        answer = b""
        while chunk := connection.recv(65536):  # the server closes the connection after its answer
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["error"]["code"] == "request_too_large"
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'  # announced honestly, still over the limit
    assert_error(httpx.post(f"{server}/v1/completions", content=big, headers=auth()), 413)
    assert httpx.get(f"{server}/health").status_code == 200


def test_a_flood_past_the_queue_gets_429_while_others_are_served(server, model, tokenizer):
    prompt = tokenizer.encode(PROMPTS[1], bos=True)
    _, reference_text = expected_completion(model, tokenizer, prompt, tokenizer.stop_ids)
    flood = 4 * (SLOTS + MAX_QUEUE)
    statuses, texts, lock = [], [], threading.Lock()
    start = threading.Barrier(flood)

    def ask() -> None:
        start.wait()
        response = httpx.post(f"{server}/v1/completions", headers=auth(), timeout=120,
                              json={"prompt": PROMPTS[1], "max_tokens": NEW, "temperature": 0})
        with lock:
            statuses.append(response.status_code)
            if response.status_code == 200:
                texts.append(response.json()["choices"][0]["text"])
            else:
                assert_error(response, 429)

    threads = [threading.Thread(target=ask) for _ in range(flood)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(statuses) == {200, 429}, statuses
    assert texts and all(text == reference_text for text in texts)
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def wait_idle(server: str) -> dict:
    deadline = time.monotonic() + 60
    while True:
        health = httpx.get(f"{server}/health").json()
        if health["busy_slots"] == 0 and health["queued"] == 0:
            return health
        assert time.monotonic() < deadline, f"slots still busy: {health}"
        time.sleep(0.1)


def test_a_client_that_disconnects_frees_its_slot(server, model, tokenizer):
    """A streaming client reads two chunks of a long answer and hangs up: the request ends as cancelled (not by its
    length) and its slot is free again."""
    long = 200
    prompt = next(p for p in (tokenizer.encode(text, bos=True) for text in PROMPTS)
                  if generate(model, [p], max_new_tokens=long, stop_ids=tokenizer.stop_ids)[0].finish_reason
                  == "length")  # a prompt whose answer runs the full length (no EOS to end it early)
    before = wait_idle(server)
    body = {"prompt": prompt, "max_tokens": long, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/completions", headers=auth(), json=body, timeout=60) as response:
        data_lines = (line for line in response.iter_lines() if line.startswith("data:"))
        assert len([line for line, _ in zip(data_lines, range(2))]) == 2
    after = wait_idle(server)
    assert after["finished_cancelled"] == before["finished_cancelled"] + 1
    assert after["finished_length"] == before["finished_length"]
    assert after["decode_steps"] - before["decode_steps"] < long
    assert httpx.get(f"{server}/health").status_code == 200


def test_engine_with_int8_weights_equals_generate_of_the_same_weights(model, tokenizer):
    """The engine in-process (no HTTP) on the model `--quantize int8` serves: three prompts at once, each equal to
    `generate` with the same quantized weights."""
    from llama_jax.quantize import quantize_model
    from llama_jax.serving import Engine, EngineConfig, GenerationRequest, run_to_end

    quantized = quantize_model(model, "int8")
    prompts = [tokenizer.encode(text, bos=True) for text in PROMPTS[:3]]
    expected = [c.tokens for c in generate(quantized, prompts, max_new_tokens=NEW)]
    engine = Engine(quantized, EngineConfig(slots=2, max_queue=4)).start()
    try:
        results = [None] * len(prompts)

        def run(index: int) -> None:
            results[index] = run_to_end(engine, GenerationRequest(prompts[index], NEW), timeout=120).tokens

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        engine.stop()
    assert results == expected
