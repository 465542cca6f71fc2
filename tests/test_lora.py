"""LoRA / QLoRA (llama_jax/lora.py): PEFT interchange checked against Hugging Face `peft` on `transformers`' Llama,
merging, and adapter-only training through train.sft's run loop.

References: `peft.PeftModel` on `transformers.LlamaForCausalLM` loaded from our Hugging Face export (an independent
implementation of LoRA and of the model), a PEFT-created adapter read back, and the plain model of merged weights (a
second code path: no adapters, the unchanged scan of `Llama`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import llama_jax
from llama_jax.config import MODEL_PRESETS, LoraConfig, load_config
from llama_jax.errors import ConfigError, ConversionError
from llama_jax.lora import (
    TARGETS,
    adapter_shapes,
    export_peft,
    frozen_base,
    import_peft,
    lora_model,
    merge,
    read_lora_run,
)
from llama_jax.model import Llama
from llama_jax.params import model_from_params, model_params

REPO = Path(__file__).resolve().parents[1]
CONFIG = dataclasses.replace(MODEL_PRESETS["test"], vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                             ffn_hidden_dim=128, dtype="float32", max_seq_len=128)
LORA = LoraConfig(rank=4, alpha=8.0)
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int32)


def random_adapters(lora: LoraConfig, seed: int) -> dict[str, jax.Array]:
    """Nonzero A and B (a fresh adapter's B is zero, which would hide a misplaced B)."""
    rng = np.random.default_rng(seed)
    return {name: jnp.asarray(rng.normal(0.0, 0.1, shape), jnp.float32)
            for name, shape in adapter_shapes(CONFIG, lora).items()}


@pytest.fixture(scope="module")
def base():
    model = Llama(CONFIG, rngs=nnx.Rngs(3))
    return model_params(model)


@pytest.fixture(scope="module")
def hf_dir(base, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "base"
    llama_jax.save(model_from_params(CONFIG, base), directory, format="hf")
    return directory


def hf_base(hf_dir: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def lora_logits(base, adapters, lora: LoraConfig) -> np.ndarray:
    return np.asarray(lora_model(frozen_base(base, CONFIG, lora), adapters, CONFIG, lora)(jnp.asarray(TOKENS)))


@pytest.mark.parametrize("targets", ["q,k,v,o,gate,up,down", "q,v"])
def test_exported_adapter_loaded_by_peft_gives_our_logits(base, hf_dir, tmp_path, targets):
    from peft import PeftModel

    lora = dataclasses.replace(LORA, targets=targets)
    adapters = random_adapters(lora, seed=1)
    export_peft(adapters, CONFIG, lora, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM" and saved["r"] == 4
    assert sorted(saved["target_modules"]) == sorted(TARGETS[t].hf_module.split(".")[-1] for t in lora.target_names)

    peft_model = PeftModel.from_pretrained(hf_base(hf_dir), tmp_path / "adapter").eval()
    ours = lora_logits(base, adapters, lora)
    np.testing.assert_allclose(ours, torch_logits(peft_model, TOKENS), atol=1e-4, rtol=0)
    # The adapters matter: without them the logits differ by far more than the tolerance.
    assert np.abs(ours - torch_logits(hf_base(hf_dir), TOKENS)).max() > 1e-2


def test_peft_created_adapter_imports_with_peft_logits(hf_dir, base, tmp_path):
    import peft

    torch.manual_seed(5)
    config = peft.LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                             task_type="CAUSAL_LM", init_lora_weights=False)  # random A and B
    peft_model = peft.get_peft_model(hf_base(hf_dir), config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")

    lora, adapters = import_peft(tmp_path / "adapter", CONFIG)
    assert (lora.rank, lora.alpha, lora.target_names) == (8, 32.0, ("q", "k", "o", "up"))
    np.testing.assert_allclose(lora_logits(base, adapters, lora), torch_logits(peft_model, TOKENS), atol=1e-4, rtol=0)


def test_import_of_export_is_identity(tmp_path):
    lora = dataclasses.replace(LORA, targets="k,o,down", alpha=3.0)
    adapters = random_adapters(lora, seed=2)
    export_peft(adapters, CONFIG, lora, tmp_path / "adapter")
    imported_lora, imported = import_peft(tmp_path / "adapter", CONFIG)
    assert imported_lora == lora
    assert imported.keys() == adapters.keys()
    for name in adapters:
        np.testing.assert_array_equal(np.asarray(imported[name]), np.asarray(adapters[name]))


def test_merged_plain_model_equals_the_lora_model(base):
    adapters = random_adapters(LORA, seed=3)
    merged = model_from_params(CONFIG, merge(base, adapters, CONFIG, LORA))
    np.testing.assert_allclose(np.asarray(merged(jnp.asarray(TOKENS))), lora_logits(base, adapters, LORA),
                               atol=1e-5, rtol=0)


def test_fresh_adapters_leave_the_model_unchanged(base):
    from llama_jax.lora import init_adapters

    adapters = init_adapters(CONFIG, LORA, jax.random.key(0))
    assert all(np.any(np.asarray(adapters[f"adapters.{t}_a"])) for t in LORA.target_names)
    plain = model_from_params(CONFIG, base)(jnp.asarray(TOKENS))
    np.testing.assert_array_equal(lora_logits(base, adapters, LORA), np.asarray(plain))


def test_quantized_base_is_close_to_the_float_base(base):
    adapters = random_adapters(LORA, seed=4)
    reference = lora_logits(base, adapters, LORA)
    scale = np.abs(reference).max()
    for base_dtype, tolerance in (("int8", 0.01), ("int4", 0.15), ("nf4", 0.15)):
        lora = dataclasses.replace(LORA, base_dtype=base_dtype)
        quantized = lora_logits(base, adapters, lora)
        error = np.abs(quantized - reference).max() / scale
        assert 0 < error < tolerance, (base_dtype, error)
        # Merging a QLoRA adapter merges into the dequantized base it was trained on.
        merged = model_from_params(CONFIG, merge(base, adapters, CONFIG, lora))
        np.testing.assert_allclose(np.asarray(merged(jnp.asarray(TOKENS))), quantized, atol=1e-5, rtol=0)


@pytest.mark.parametrize("override, key", [("lora.targets=q,x", "lora.targets"), ("lora.rank=-1", "lora.rank"),
                                           ("lora.base_dtype=int2", "lora.base_dtype"),
                                           ("lora.dropout=0.1", "lora.dropout"), ("lora.ranks=4", "lora.ranks")])
def test_bad_lora_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("change, message", [({"use_rslora": True}, "use_rslora"),
                                             ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
                                             ({"peft_type": "IA3"}, "peft_type")])
def test_unsupported_peft_adapters_are_refused(tmp_path, change, message):
    export_peft(random_adapters(LORA, seed=0), CONFIG, LORA, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, **change}))
    with pytest.raises(ConversionError, match=message):
        import_peft(tmp_path, CONFIG)


# ── Training ─────────────────────────────────────────────────────────────────────────────────────────────────────
def lora_trainer(base, lora: LoraConfig, devices: int = 2):
    from llama_jax.config import OptimizerConfig
    from llama_jax.lora import LoraTrainer
    from llama_jax.sharding import make_mesh

    mesh = make_mesh(1, devices, 1, jax.devices()[:devices])
    optimizer = OptimizerConfig(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0)
    return LoraTrainer.create_lora(CONFIG, optimizer, 100, mesh, lora, base)


def overfit_batch(trainer) -> dict[str, jax.Array]:
    rng = np.random.default_rng(7)
    tokens = np.tile(rng.integers(0, 32, (2, 8)), (1, 5))[:, :33].astype(np.int32)  # a repeating pattern to learn
    rows = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((2, 32), np.float32)}
    return trainer.place_rows(rows, 2)


def train_losses(trainer, steps: int) -> tuple[list[float], object]:
    batch = overfit_batch(trainer)
    step = trainer.jit_step((2, 32))
    state, losses = trainer.init_state(0), []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state


def test_adapter_gradients_are_the_chain_rule_of_the_plain_models_weight_gradient(base):
    """dL/dA = s·dL/dW·Bᵀ and dL/dB = s·Aᵀ·dL/dW, with dL/dW the plain model's gradient at the merged weights (the
    unchanged train-step loss, a second code path)."""
    from llama_jax.params import graphdef
    from llama_jax.trainer import loss_sums

    adapters = random_adapters(LORA, seed=6)
    tokens = np.random.default_rng(1).integers(0, 256, (2, 33)).astype(np.int32)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
             "loss_mask": jnp.ones((2, 32), jnp.float32)}
    loss = lora_trainer(base, LORA, devices=1).micro_batch_loss()
    grads = jax.grad(lambda a: loss(a, batch)[0])(adapters)
    plain = graphdef(CONFIG)
    weight_grads = jax.grad(lambda p: loss_sums(p, plain, batch)[0])(merge(base, adapters, CONFIG, LORA))
    scale = LORA.alpha / LORA.rank
    for target in LORA.target_names:
        a, b = adapters[f"adapters.{target}_a"], adapters[f"adapters.{target}_b"]
        dw = weight_grads[TARGETS[target].weight].reshape(CONFIG.n_layers, a.shape[1], b.shape[2])
        np.testing.assert_allclose(np.asarray(grads[f"adapters.{target}_a"]),
                                   scale * np.einsum("lio,lro->lir", dw, b), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(grads[f"adapters.{target}_b"]),
                                   scale * np.einsum("lir,lio->lro", a, dw), rtol=1e-4, atol=1e-6)


def test_lora_step_trains_only_the_adapters(base):
    trainer = lora_trainer(base, LORA)
    before = {name: np.array(value) for name, value in trainer.base.items()}
    losses, state = train_losses(trainer, 6)
    assert losses[-1] < 0.9 * losses[0]
    # Only adapters are trained and held by the optimizer; the frozen base is bit-identical afterwards.
    assert state.params.keys() == adapter_shapes(CONFIG, LORA).keys()
    assert all(np.array_equal(np.asarray(trainer.base[name]), before[name]) for name in before)
    adapter_size = sum(int(np.prod(shape)) for shape in adapter_shapes(CONFIG, LORA).values())
    moments = sum(leaf.size for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim == 3)
    assert moments == 2 * adapter_size  # AdamW's mu and nu, adapter-shaped
    assert sum(leaf.size for leaf in jax.tree.leaves(state.opt_state)) < 2 * adapter_size + 16
    assert adapter_size < 0.2 * CONFIG.num_params()
    # B moved away from zero, so the trained model differs from the base.
    assert any(np.any(np.asarray(state.params[f"adapters.{t}_b"])) for t in LORA.target_names)


@pytest.fixture(scope="module")
def float_losses(base) -> list[float]:
    return train_losses(lora_trainer(base, LORA, devices=1), 8)[0]


@pytest.mark.parametrize("base_dtype", ["int4", "nf4"])
def test_qlora_trains_close_to_lora_on_the_float_base(base, float_losses, base_dtype):
    quantized_losses, _ = train_losses(lora_trainer(base, dataclasses.replace(LORA, base_dtype=base_dtype), 1), 8)
    assert quantized_losses[-1] < 0.9 * quantized_losses[0]
    gaps = np.abs(np.array(quantized_losses) - np.array(float_losses))
    assert gaps.max() < 0.05 * float_losses[0], (float_losses, quantized_losses)
    assert gaps.max() > 0  # the quantized base is really used


CHATS = [{"messages": [{"role": "user", "content": f"Repeat after me: {i} fox"},
                       {"role": "assistant", "content": f"{i} fox"}]} for i in range(12)]


def sft_args(model_dir: Path, chats: Path, run_dir: Path) -> list[str]:
    return ["configs/sft.yaml", f"init_from={model_dir}", f"data.path={chats}", f"run_dir={run_dir}",
            "train.batch_size=8", "train.seq_len=64", "sft.epochs=null", "train.steps=8", "checkpoint.every_steps=4",
            "checkpoint.async_save=false", "optimizer.lr=1e-2", "train.log_every_steps=1",
            "lora.rank=4", "lora.alpha=8", "lora.targets=q,v,o,down", "train.peak_tflops=1"]


@pytest.fixture(scope="module")
def sft_model_dir(tmp_path_factory) -> Path:
    """A tiny base in the llama-jax format with a SentencePiece tokenizer inside, as train.sft takes it."""
    from llama_jax.tokenizer import train_sentencepiece

    path = tmp_path_factory.mktemp("sft") / "model"
    config = dataclasses.replace(CONFIG, vocab_size=320)
    llama_jax.save(Llama(config, rngs=nnx.Rngs(0)), path)
    text = [f"Repeat after me: {i} fox. The quick brown fox jumps over the lazy dog {i} times." for i in range(50)]
    train_sentencepiece(text, path / "tokenizer.model", vocab_size=320)
    return path


def test_lora_sft_run_saves_adapters_and_resumes_bit_identically(sft_model_dir, tmp_path, monkeypatch, capsys):
    from llama_jax.convert.native import ArrayReader
    from train.sft import main

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(chat) + "\n" for chat in CHATS))
    run_dir = tmp_path / "run"
    monkeypatch.chdir(REPO)  # configs/sft.yaml
    assert main(sft_args(sft_model_dir, chats, run_dir)) == 0
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 8 and losses[-1] < losses[0]

    run = read_lora_run(run_dir)
    assert run.step == 8 and run.lora.target_names == ("q", "v", "o", "down")
    assert run.config.init_from == str(sft_model_dir)  # the pointer to the base
    checkpoint = run_dir / "checkpoints" / "8"
    adapter_size = sum(int(np.prod(shape)) for shape in adapter_shapes(run.model_config, run.lora).values())
    opt_reader = ArrayReader(checkpoint / "opt_state")
    opt_size = sum(opt_reader.read(name).size for name in opt_reader.names())
    assert 2 * adapter_size <= opt_size <= 2 * adapter_size + 16  # AdamW moments of the adapters, a step count

    # A stop after step 4's checkpoint: the rerun resumes there and ends with the same adapters, bit for bit.
    final = {name: np.asarray(value) for name, value in run.adapters.items()}
    import shutil

    shutil.rmtree(checkpoint)
    capsys.readouterr()
    assert main(sft_args(sft_model_dir, chats, run_dir)) == 0
    assert "(step 4 of 8" in capsys.readouterr().err  # resumed, not started over
    resumed = read_lora_run(run_dir)
    assert resumed.step == 8
    for name, value in final.items():
        np.testing.assert_array_equal(np.asarray(resumed.adapters[name]), value)

    # Export and merge from the command line: the PEFT files on transformers, and the merged plain checkpoint, both
    # give the LoRA model's logits.
    from llama_jax.convert.lora import main as convert_main

    out = tmp_path / "out"
    assert convert_main(["--run", str(run_dir), "--peft", str(out / "adapter"), "--merged", str(out / "merged"),
                         "--to", "hf"]) == 0
    base_model = llama_jax.load(sft_model_dir)
    settings = resumed.lora
    tokens = TOKENS % base_model.config.vocab_size
    expected = np.asarray(lora_model(frozen_base(model_params(base_model), base_model.config, settings),
                                     resumed.adapters, base_model.config, settings)(jnp.asarray(tokens)))
    assert (out / "merged" / "tokenizer.model").is_file()
    np.testing.assert_allclose(torch_logits(hf_base(out / "merged"), tokens), expected, atol=1e-4, rtol=0)
    # llama_jax.load of the run directory is its base with the adapters merged in.
    np.testing.assert_allclose(np.asarray(llama_jax.load(run_dir)(jnp.asarray(tokens))), expected, atol=1e-4, rtol=0)
    from peft import PeftModel

    llama_jax.save(base_model, out / "base_hf", format="hf")
    peft_model = PeftModel.from_pretrained(hf_base(out / "base_hf"), out / "adapter").eval()
    np.testing.assert_allclose(torch_logits(peft_model, tokens), expected, atol=1e-4, rtol=0)


def test_convert_lora_program_errors_are_one_line(sft_model_dir, tmp_path):
    command = [sys.executable, "-m", "llama_jax.convert.lora", "--run", str(sft_model_dir), "--peft", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": ""})
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
