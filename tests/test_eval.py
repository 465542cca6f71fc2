"""Evaluation: perplexity against the training program's validation loss, bits per byte and multiple choice against
hand computation, the lm-eval adapter on a task defined from local files, greedy decoding against a full forward.

Hand computations use a second code path: one plain full forward of the model per sequence (no batching, chunked
output head or mesh; right-padded to one fixed length, which a causal model cannot see), then log-softmax and sums in
float64 numpy.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama_jax
from eval import multiple_choice as multiple_choice_cli
from eval import perplexity as perplexity_cli
from llama_jax.config import ModelConfig, OptimizerConfig
from llama_jax.data import build_store
from llama_jax.errors import DataError
from llama_jax.generate import generate
from llama_jax.model import Llama
from llama_jax.params import merge_params, model_params
from llama_jax.pretraining_data import global_batch
from llama_jax.run_loop import validation_loss as training_validation_loss
from llama_jax.scoring import (
    MultipleChoiceExample,
    count_text_bytes,
    evaluate_perplexity,
    load_scorer,
    read_multiple_choice,
    rolling_log_likelihoods,
    score_multiple_choice,
)
from llama_jax.sharding import make_mesh
from llama_jax.tokenizer import train_sentencepiece
from llama_jax.trainer import Trainer

WORDS = ("the quick brown fox jumps over the lazy dog while a café owner sells naïve crêpes and 中文 books "
         "def main(): return sum(range(10)) # numbers 12345 and symbols !? ").split()


def document(index: int, length: int) -> str:
    rng = np.random.default_rng(index)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), length))


VALID_DOCUMENTS = [document(i, 10 + 7 * (i % 5)) for i in range(14)]
SMALL_DOCUMENTS = ["the quick brown fox", "café naïve 中文", "def main(): return 12"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def tokenizer(workspace):
    return train_sentencepiece([document(100 + i, 40) for i in range(40)], workspace / "tokenizer.model",
                               vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer) -> Llama:
    config = ModelConfig(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, ffn_hidden_dim=128,
                         max_seq_len=256, dtype="float32", remat_policy="none")
    model = Llama(config, rngs=nnx.Rngs(0))
    # Random weights give near-uniform predictions; a larger output head makes log-likelihoods differ clearly.
    model.output.set_value(model.output[...] * 40.0)
    return model


@pytest.fixture(scope="module")
def checkpoint(workspace, model) -> Path:
    path = llama_jax.save(model, workspace / "checkpoint")
    shutil.copy(workspace / "tokenizer.model", path / "tokenizer.model")  # so --tokenizer can be left out
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_scorer(checkpoint)  # (Scorer on all 8 devices, Tokenizer)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def valid_dir(workspace) -> Path:
    """A folder holding the validation text as one JSONL file."""
    return write_jsonl(workspace / "valid" / "docs.jsonl", [{"text": text} for text in VALID_DOCUMENTS]).parent


REFERENCE_LENGTH = 64  # the reference forward pads every sequence to this length, so it compiles once


@nnx.jit
def plain_forward(model: Llama, tokens: jax.Array) -> jax.Array:
    return model(tokens)


def full_forward_logits(model: Llama, ids: list[int]) -> np.ndarray:
    """Float64 logits [len(ids), vocab] of one plain forward; right padding cannot change a causal model's logits."""
    assert len(ids) <= REFERENCE_LENGTH
    padded = np.zeros((1, REFERENCE_LENGTH), np.int32)
    padded[0, :len(ids)] = ids
    return np.asarray(plain_forward(model, jnp.asarray(padded))[0, :len(ids)], np.float64)


def full_forward_log_probs(model: Llama, ids: list[int]) -> np.ndarray:
    """log P(ids[t+1] | ids[:t+1]) for every t, by a float64 numpy log-softmax of the plain forward's logits."""
    logits = full_forward_logits(model, ids)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return log_probs[np.arange(len(ids) - 1), ids[1:]]


def run_cli(main, argv: list[str], capsys) -> dict:
    capsys.readouterr()
    assert main([str(arg) for arg in argv]) == 0
    return json.loads(capsys.readouterr().out)


# ── Perplexity ───────────────────────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("document_masking", [False, True])
def test_perplexity_equals_training_validation_loss(workspace, tokenizer, model, checkpoint, valid_dir, capsys,
                                                    document_masking):
    """The training program's eval_loss (run_loop.validation_loss over pretraining_data.global_batch) on a different
    mesh, vs the CLI."""
    batches, batch_size, seq_len, seed = 3, 4, 32, 5
    store = build_store(valid_dir, tokenizer, workspace / f"training_store_{document_masking}")
    trainer = Trainer.create(model.config, OptimizerConfig(), 10, make_mesh(data=2, fsdp=2, tensor=2))
    params = jax.device_put(model_params(model), trainer.param_shardings())
    expected = training_validation_loss(
        trainer, params,
        lambda index: global_batch(trainer, store, index, batch_size, seq_len, seed, document_masking), batches)

    masking_flag = "--document-masking" if document_masking else "--no-document-masking"
    report = run_cli(perplexity_cli.main, [
        "--model", checkpoint, "--data", valid_dir, "--batches", batches, "--batch-size", batch_size,
        "--seq-len", seq_len, "--seed", seed, masking_flag, "--store-dir", workspace / f"store_{document_masking}",
        "--json", "--no-progress"], capsys)
    assert report["tokens"] <= batches * batch_size * seq_len and not report["bytes_exact"]
    assert report["loss"] == pytest.approx(expected, rel=2e-6)
    assert report["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_whole_pass_loss_and_bits_per_byte_by_hand(workspace, model, loaded):
    """One window holds the whole text: each document (BOS + tokens + EOS) is scored alone, as a forward of it alone."""
    scorer, tokenizer = loaded
    source = write_jsonl(workspace / "small" / "docs.jsonl", [{"text": text} for text in SMALL_DOCUMENTS])
    store = build_store(source, tokenizer, workspace / "small_store")
    framed = [[tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id] for text in SMALL_DOCUMENTS]
    assert sum(map(len, framed)) <= 64
    result = evaluate_perplexity(scorer, store, seq_len=64, batch_size=4, document_masking=True,
                                 text_bytes=count_text_bytes(source), progress=False)

    nats = -sum(full_forward_log_probs(model, ids).sum() for ids in framed)
    text_bytes = sum(len(text.encode("utf-8")) for text in SMALL_DOCUMENTS)
    assert text_bytes > sum(len(text) for text in SMALL_DOCUMENTS)  # multi-byte characters are counted as bytes
    assert result.bytes_exact and result.batches == 1
    assert result.tokens == sum(len(ids) - 1 for ids in framed)
    assert result.text_bytes == text_bytes
    assert result.nats == pytest.approx(nats, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(nats / math.log(2) / text_bytes, rel=1e-5)


def test_whole_pass_in_many_windows_scores_every_token_once(workspace, loaded, checkpoint, valid_dir, capsys):
    scorer, tokenizer = loaded
    source = valid_dir
    report = run_cli(perplexity_cli.main, ["--model", checkpoint, "--data", source, "--seq-len", 32,
                                           "--batch-size", 4, "--store-dir", workspace / "many_windows",
                                           "--json", "--no-progress"], capsys)
    encoded = [tokenizer.encode(text) for text in VALID_DOCUMENTS]
    assert report["batches"] > 1 and report["bytes_exact"]
    assert report["tokens"] == sum(len(ids) + 1 for ids in encoded)  # every token and each EOS, never BOS
    assert report["text_bytes"] == sum(len(text.encode("utf-8")) for text in VALID_DOCUMENTS)
    assert report["bits_per_byte"] == pytest.approx(report["loss"] * report["tokens"] / math.log(2)
                                                    / report["text_bytes"])
    # Any checkpoint format: the same weights as a Hugging Face folder score the same.
    hf_dir = llama_jax.save(loaded_model(checkpoint), workspace / "hf", format="hf")
    capsys.readouterr()
    assert perplexity_cli.main(["--model", str(hf_dir), "--tokenizer", str(checkpoint), "--dtype", "float32",
                                "--data", str(source), "--seq-len", "32", "--batch-size", "4",
                                "--store-dir", str(workspace / "many_windows"), "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert f"loss {report['loss']:.4f} nats/token" in summary and f"{report['bits_per_byte']:.4f} bits/byte" in summary


def loaded_model(checkpoint: Path) -> Llama:
    return llama_jax.load(checkpoint)


# ── Multiple choice ──────────────────────────────────────────────────────────────────────────────────────────────
CONTEXTS = ("the quick brown", "a café owner sells", "def main():")
CANDIDATES = ("fox", "dog", "lazy dog jumps over", "naïve crêpes and books", "return", "中文", "numbers 12345",
              "the quick brown fox jumps")


def hand_log_likelihood(model: Llama, tokenizer, context: str, choice: str) -> float:
    """log P(" " + choice | BOS + context), tokens split as whole text vs context alone."""
    whole = tokenizer.encode(context + " " + choice)
    context_ids = tokenizer.encode(context)
    assert whole[:len(context_ids)] == context_ids, "pick contexts whose tokens do not merge into the choice"
    ids = [tokenizer.bos_id] + whole
    return float(full_forward_log_probs(model, ids)[len(context_ids):].sum())


@pytest.fixture(scope="module")
def choice_examples(model, tokenizer) -> tuple[list[MultipleChoiceExample], np.ndarray]:
    """Examples and their hand log-likelihoods; the first is one where summed and normalised scores disagree.

    Every answer is the hand computation's length-normalised choice, so acc_norm is 1 and acc is below 1 (the first
    example at least is wrong by summed score): the data tells the two metrics apart.
    """
    scores = {(context, choice): hand_log_likelihood(model, tokenizer, context, choice)
              for context in CONTEXTS for choice in CANDIDATES}
    disagreeing = [(context, a, b) for context in CONTEXTS for a in CANDIDATES for b in CANDIDATES
                   if scores[context, a] > scores[context, b]
                   and scores[context, a] / len(a) < scores[context, b] / len(b)]
    assert disagreeing, "no (sum-preferred, length-normalised-preferred) pair among the candidates"
    context, sum_choice, norm_choice = disagreeing[0]
    choice_sets = [(context, (sum_choice, norm_choice))]
    choice_sets += [(context, CANDIDATES[index::2][:3]) for index, context in enumerate(CONTEXTS)]
    hand = [np.array([scores[context, choice] for choice in choices]) for context, choices in choice_sets]
    examples = [MultipleChoiceExample(context, choices, int(np.argmax(values / [len(c) for c in choices])))
                for (context, choices), values in zip(choice_sets, hand)]
    return examples, hand


def test_multiple_choice_matches_hand_computation(workspace, checkpoint, choice_examples, capsys):
    examples, hand = choice_examples
    path = write_jsonl(workspace / "mc.jsonl", [{"context": e.context, "choices": list(e.choices),
                                                 "answer": e.answer} for e in examples])
    report = run_cli(multiple_choice_cli.main, ["--model", checkpoint, "--data", path, "--batch-size", 4,
                                                "--json", "--per-example", "--no-progress"], capsys)
    hand_predictions = [int(np.argmax(values)) for values in hand]
    hand_norm = [int(np.argmax(values / [len(c) for c in e.choices])) for values, e in zip(hand, examples)]
    answers = [example.answer for example in examples]
    assert hand_predictions[0] == 0 and hand_norm[0] == 1  # the built disagreement
    for ours, reference in zip(report["log_likelihoods"], hand):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4)
    assert report["predictions"] == hand_predictions and report["predictions_norm"] == hand_norm
    assert report["acc"] == pytest.approx(np.mean(np.equal(hand_predictions, answers))) and report["acc"] < 1
    assert report["acc_norm"] == 1.0
    assert report["count"] == len(examples)


def test_multiple_choice_file_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "a", "choices": ["b", "c"], "answer": 0}\n{"context": "a", "choices": ["b"], '
                    '"answer": 0}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: 'choices'"):
        read_multiple_choice(path)
    path.write_text('{"context": "a", "choices": ["b", "c"], "answer": 2}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: 'answer'"):
        read_multiple_choice(path)
    path.write_text('not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1:1: not valid JSON \(Expecting value\)$"):
        read_multiple_choice(path)


# ── lm-eval ──────────────────────────────────────────────────────────────────────────────────────────────────────
TASK_YAML = """task: llama_jax_local_choice
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
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def local_task(workspace, choice_examples, tmp_path_factory) -> Path:
    """A folder with an lm-eval task whose data is a local JSONL file of the multiple-choice examples."""
    import eval.lm_eval_adapter  # noqa: F401  (registers "llama_jax")

    examples, _ = choice_examples
    folder = tmp_path_factory.mktemp("lm_eval")
    data = write_jsonl(folder / "data.jsonl", [{"context": e.context, "choices": list(e.choices),
                                                "answer": e.answer} for e in examples])
    (folder / "tasks").mkdir()
    (folder / "tasks" / "local_choice.yaml").write_text(TASK_YAML.format(data=data))
    return folder / "tasks"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def test_lm_eval_runs_a_local_task_with_our_accuracy(checkpoint, loaded, choice_examples, local_task, offline):
    """lm-eval builds the requests and computes acc / acc_norm itself; they must equal our scorer's on the data."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="llama_jax", model_args=f"path={checkpoint}", batch_size=4, tasks=["llama_jax_local_choice"],
        task_manager=TaskManager(include_path=str(local_task), include_defaults=False), bootstrap_iters=0,
        torch_random_seed=None)
    harness = results["results"]["llama_jax_local_choice"]
    examples, _ = choice_examples
    ours = score_multiple_choice(*loaded, examples)
    assert harness["acc,none"] == pytest.approx(ours.accuracy)
    assert harness["acc_norm,none"] == pytest.approx(ours.accuracy_norm)
    assert ours.accuracy != ours.accuracy_norm  # the data tells the two metrics apart
    per_sample = sorted(results["samples"]["llama_jax_local_choice"], key=lambda sample: sample["doc_id"])
    for sample, expected in zip(per_sample, ours.log_likelihoods):
        np.testing.assert_allclose([response[0][0] for response in sample["resps"]], expected, rtol=1e-6)


@pytest.mark.slow
def test_lm_eval_command_line_with_llama_jax_model(checkpoint, loaded, choice_examples, local_task, offline,
                                                   tmp_path, capsys):
    """lm-eval's own command line (`python -m eval.lm_eval_adapter` = `lm_eval` + the registration); slow because
    lm-eval indexes its thousands of built-in tasks first."""
    from eval.lm_eval_adapter import main

    main(["--model", "llama_jax", "--model_args", f"path={checkpoint}", "--tasks", "llama_jax_local_choice",
          "--include_path", str(local_task), "--batch_size", "4", "--output_path", str(tmp_path / "out")])
    assert "llama_jax_local_choice" in capsys.readouterr().out
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    harness = json.loads(results_file.read_text())["results"]["llama_jax_local_choice"]
    ours = score_multiple_choice(*loaded, choice_examples[0])
    assert (harness["acc,none"], harness["acc_norm,none"]) == pytest.approx((ours.accuracy, ours.accuracy_norm))


# ── Generation and rolling log-likelihood ───────────────────────────────────────────────────────────────────────
def reference_greedy(model: Llama, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens by re-running the plain full forward over everything so far (no cache)."""
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(np.argmax(full_forward_logits(model, ids)[-1])))
    return ids[len(prompt):]


def test_greedy_generation_on_the_scorers_mesh_matches_full_forward(model, loaded):
    """The one decoder (llama_jax.generate) on the scorer's sharded parameters, as lm-eval's generate_until runs it."""
    scorer, tokenizer = loaded
    prompts = [[tokenizer.bos_id] + tokenizer.encode(text) for text in ("the quick brown fox", "café")]
    completions = generate(merge_params(scorer.graphdef, scorer.params), prompts, max_new_tokens=6)
    assert [completion.tokens for completion in completions] == [reference_greedy(model, prompt, 6)
                                                                  for prompt in prompts]


def test_lm_eval_generate_until_and_rolling(model, checkpoint, loaded):
    from lm_eval.api.instance import Instance

    from eval.lm_eval_adapter import LlamaJaxLM

    _, tokenizer = loaded
    adapter = LlamaJaxLM(path=str(checkpoint), batch_size=2)
    context = "a café owner"
    reference = tokenizer.decode(reference_greedy(model, [tokenizer.bos_id] + tokenizer.encode(context), 8))
    stop = reference.strip()[3:5]  # text the model will produce, so generation must cut there
    request = Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 8}), 0)
    unbounded = Instance("generate_until", {}, (context, {"until": ["\u2603"], "max_gen_toks": 8}), 1)
    assert adapter.generate_until([request, unbounded]) == [reference[:reference.find(stop)], reference]

    text = "the lazy dog jumps over the quick brown fox"
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    rolling = adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert rolling[0] == pytest.approx(full_forward_log_probs(model, ids).sum(), rel=1e-5)
    # With windows shorter than the text, every token is scored once, in lm-eval's own rolling windows: each
    # window's continuation conditioned on that window's context only.
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windowed = rolling_log_likelihoods(adapter.scorer, tokenizer, [text], max_length=4)
    windows = [make_disjoint_window(window) for window in get_rolling_token_windows(
        token_list=ids[1:], prefix_token=tokenizer.bos_id, max_seq_len=4, context_len=1)]
    assert len(windows) > 2 and sum(len(continuation) for _, continuation in windows) == len(ids) - 1
    by_hand = sum(full_forward_log_probs(model, context + continuation)[-len(continuation):].sum()
                  for context, continuation in windows)
    assert windowed[0] == pytest.approx(by_hand, rel=1e-5) and abs(windowed[0] - rolling[0]) > 1e-3
