"""Checkpoint conversion: bit-exact round trips, logit parity with transformers, Meta's shard layout, clear errors.

References are independent of the converter: transformers builds and reads the Hugging Face checkpoints, and the
Meta checkpoints are built here with torch from the HF weights by hand (Meta's rotary layout undone with the formula
of transformers' conversion script, shards cut with torch.chunk along the dims written out below).
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml
from flax import nnx
from hf_reference import hf_logits, random_hf_model
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import LlamaForCausalLM

import llama_jax
from llama_jax import convert
from llama_jax.cli import run_program
from llama_jax.config import ModelConfig, RopeScaling
from llama_jax.convert import native
from llama_jax.convert.__main__ import main as cli_main
from llama_jax.convert.common import BFLOAT16
from llama_jax.errors import CheckpointError, ConversionError
from llama_jax.params import model_from_params, model_params, param_shapes

LLAMA2 = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, ffn_hidden_dim=160, max_seq_len=64,
                     dtype="float32", remat_policy="none")
# GQA, Llama 3's theta and Llama 3.1's scaling (the only scaling Meta's params.json can express).
LLAMA3 = dataclasses.replace(LLAMA2, n_heads=8, n_kv_heads=4, rope_theta=500000.0, rope_scaling=RopeScaling(),
                             max_seq_len=16384)
CONFIGS = {"llama2": LLAMA2, "llama3": LLAMA3}
TOKENS = np.random.default_rng(0).integers(0, 256, size=(2, 24))


@nnx.jit
def forward(model, tokens):
    return model(tokens)


def our_logits(model) -> np.ndarray:
    return np.asarray(forward(model, jnp.asarray(TOKENS, jnp.int32)))


# ── Independent Meta checkpoints, built by hand ─────────────────────────────────────────────────────────────────
HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_HF_TO_META = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
# The dim each weight is split on across model-parallel ranks in Meta's reference code (None: replicated).
META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def meta_name(hf_name: str) -> str:
    if hf_name in HF_TO_META:
        return HF_TO_META[hf_name]
    _, _, layer, *rest = hf_name.split(".")
    return f"layers.{layer}.{LAYER_HF_TO_META['.'.join(rest[:-1])]}.weight"


def unpermute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of transformers' convert_llama_weights_to_hf `permute` (which maps Meta's layout to HF's)."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_meta_by_hand(hf_model: LlamaForCausalLM, config: ModelConfig, directory: Path, shards: int,
                       dtype: torch.dtype = torch.float32) -> Path:
    full = {}
    for hf_name, tensor in hf_model.state_dict().items():
        tensor = tensor.detach().to(dtype)
        if "q_proj" in hf_name:
            tensor = unpermute_rotary(tensor, config.n_heads)
        elif "k_proj" in hf_name:
            tensor = unpermute_rotary(tensor, config.kv_heads)
        full[meta_name(hf_name)] = tensor
    llama3 = config.rope_theta == 500000.0
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for name, tensor in full.items():
        kind = name.split(".")[-2]
        dim = (0 if llama3 else 1) if kind == "tok_embeddings" else META_SPLIT.get(kind)
        pieces = [tensor] * shards if dim is None else torch.chunk(tensor, shards, dim=dim)
        for rank, piece in enumerate(pieces):
            ranks[rank][name] = piece.clone()
    directory.mkdir(parents=True)
    for rank, state in enumerate(ranks):
        torch.save(state, directory / f"consolidated.{rank:02d}.pth")
    params = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
              "n_kv_heads": config.kv_heads, "vocab_size": config.vocab_size, "multiple_of": 160,
              "ffn_dim_multiplier": 0.94, "norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
              "use_scaled_rope": config.rope_scaling is not None}
    (directory / "params.json").write_text(json.dumps(params))
    return directory


# ── Fixtures ────────────────────────────────────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    """(config, reference HF model, its float32 HF folder, its logits, scratch dir)."""
    config = CONFIGS[request.param]
    reference = random_hf_model(config, seed=len(request.param))
    root = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(root / "hf")
    return config, reference, root / "hf", hf_logits(reference, TOKENS), root


def hf_tensors(directory: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def meta_tensors(directory: Path) -> list[dict[str, torch.Tensor]]:
    files = sorted(directory.glob("consolidated.*.pth"))
    return [torch.load(file, weights_only=True) for file in files]


def assert_same_bytes(a: dict, b: dict) -> None:
    """Same tensor names, and each tensor the same dtype, shape and bytes."""
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, torch.Tensor):
            x, y = (t.contiguous().view(-1).view(torch.uint8).numpy() if t.dtype == torch.bfloat16 else t.numpy()
                    for t in (x, y))
            assert a[name].dtype == b[name].dtype
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name


# ── Round trips ─────────────────────────────────────────────────────────────────────────────────────────────────
def test_hf_orbax_hf_is_bit_exact(case):
    config, reference, hf_dir, _, root = case
    convert.convert(hf_dir, root / "rt_orbax", "orbax")
    convert.convert(root / "rt_orbax", root / "rt_hf", "hf")
    assert_same_bytes(hf_tensors(hf_dir), hf_tensors(root / "rt_hf"))
    # Sharded output: several files and an index that transformers follows.
    convert.convert(root / "rt_orbax", root / "rt_hf_sharded", "hf", max_shard_size=40_000)
    files = sorted(p.name for p in (root / "rt_hf_sharded").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((root / "rt_hf_sharded" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    assert_same_bytes(hf_tensors(hf_dir), hf_tensors(root / "rt_hf_sharded"))
    reloaded = LlamaForCausalLM.from_pretrained(root / "rt_hf_sharded", attn_implementation="eager")
    np.testing.assert_array_equal(hf_logits(reloaded, TOKENS), hf_logits(reference, TOKENS))


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_meta_orbax_meta_is_bit_exact(case, shards):
    config, reference, _, expected, root = case
    meta_dir = write_meta_by_hand(reference, config, root / f"meta{shards}", shards)
    convert.convert(meta_dir, root / f"meta{shards}_orbax", "orbax")
    convert.convert(root / f"meta{shards}_orbax", root / f"meta{shards}_back", "meta", shards=shards)
    original, written = meta_tensors(meta_dir), meta_tensors(root / f"meta{shards}_back")
    assert len(written) == shards
    for a, b in zip(original, written):
        assert_same_bytes(a, b)
    model = llama_jax.load(root / f"meta{shards}_orbax", dtype="float32")
    np.testing.assert_allclose(our_logits(model), expected, atol=1e-4, rtol=0)


def test_meta_shards_have_meta_shapes(case):
    """Two ranks, shapes written out by hand from Meta's parallel layers."""
    config, reference, hf_dir, _, root = case
    convert.convert(hf_dir, root / "meta_shapes", "meta", shards=2)
    rank0 = meta_tensors(root / "meta_shapes")[0]
    kv_rows = config.kv_heads * config.head_dim
    expected = {
        # Llama 2: ParallelEmbedding cuts the embedding dim; Llama 3: VocabParallelEmbedding cuts the vocabulary.
        "tok_embeddings.weight": (256, 32) if config is LLAMA2 else (128, 64),
        "layers.0.attention.wq.weight": (32, 64),
        "layers.0.attention.wk.weight": (kv_rows // 2, 64),
        "layers.0.attention.wv.weight": (kv_rows // 2, 64),
        "layers.0.attention.wo.weight": (64, 32),
        "layers.0.feed_forward.w1.weight": (80, 64),
        "layers.0.feed_forward.w3.weight": (80, 64),
        "layers.0.feed_forward.w2.weight": (64, 80),
        "layers.0.attention_norm.weight": (64,),
        "layers.1.ffn_norm.weight": (64,),
        "norm.weight": (64,),
        "output.weight": (128, 64),
    }
    assert {name: tuple(rank0[name].shape) for name in expected} == expected
    assert len(rank0) == 1 + 9 * config.n_layers + 2
    # And it is the same checkpoint as the one cut by hand.
    by_hand = write_meta_by_hand(reference, config, root / "meta_shapes_by_hand", 2)
    for a, b in zip(meta_tensors(by_hand), meta_tensors(root / "meta_shapes")):
        assert_same_bytes(a, b)
    for file in (root / "meta_shapes").glob("consolidated.*.pth"):  # records filled in place, CRCs and all
        with zipfile.ZipFile(file) as archive:
            assert archive.testzip() is None
    # Reading releases the file's pages as it goes: a second read must still return the reference's weights.
    _, reference_params = convert.read_params(hf_dir)
    with convert.open_source(root / "meta_shapes") as source:
        for _ in range(2):
            assert np.array_equal(source.read("blocks.attention.w_q"), reference_params["blocks.attention.w_q"])
    # The other family's embedding layout on request; reading tells the two apart by shape.
    other = "dim" if config is LLAMA3 else "vocab"
    convert.convert(hf_dir, root / "meta_other", "meta", shards=2, meta_embedding_split=other)
    assert tuple(meta_tensors(root / "meta_other")[0]["tok_embeddings.weight"].shape) == \
        ((256, 32) if other == "dim" else (128, 64))
    _, ours = convert.read_params(root / "meta_other")
    _, reference_params = convert.read_params(hf_dir)
    assert all(np.array_equal(ours[name], reference_params[name]) for name in reference_params)
    params = json.loads((root / "meta_shapes" / "params.json").read_text())
    assert params["use_scaled_rope"] == (config.rope_scaling is not None)
    assert params["rope_theta"] == config.rope_theta and params["n_kv_heads"] == config.kv_heads


@pytest.mark.parametrize("dim, hidden, multiple_of, multiplier", [
    (4096, 11008, 256, None), (5120, 13824, 256, None),  # Llama 2 7B, 13B
    (8192, 28672, 4096, 1.3), (4096, 14336, 1024, 1.3),  # Llama 2/3 70B, Llama 3 8B
    (2048, 8192, 256, 1.5), (16384, 53248, 4096, 1.2),  # Llama 3.2 1B, Llama 3.1 405B
])
def test_params_json_of_published_sizes(dim, hidden, multiple_of, multiplier):
    """An explicit FFN width (as Hugging Face configs give it) becomes the params.json Meta shipped."""
    from llama_jax.convert.meta import params_json

    config = ModelConfig(vocab_size=32000, dim=dim, n_layers=1, n_heads=dim // 128, ffn_hidden_dim=hidden)
    params = params_json(config)
    assert (params["multiple_of"], params["ffn_dim_multiplier"]) == (multiple_of, multiplier)


# ── Logit parity ────────────────────────────────────────────────────────────────────────────────────────────────
def test_logits_match_transformers_from_every_format(case):
    config, reference, hf_dir, expected, root = case
    from_hf = llama_jax.load(hf_dir, dtype="float32")
    assert from_hf.config == dataclasses.replace(config, n_kv_heads=None if config.kv_heads == config.n_heads
                                                 else config.kv_heads, remat_policy="full", norm_eps=1e-5)
    np.testing.assert_allclose(our_logits(from_hf), expected, atol=1e-4, rtol=0)
    meta_dir = write_meta_by_hand(reference, config, root / "parity_meta", shards=2)
    np.testing.assert_allclose(our_logits(llama_jax.load(meta_dir, dtype="float32")), expected, atol=1e-4, rtol=0)
    llama_jax.save(from_hf, root / "parity_orbax")
    np.testing.assert_allclose(our_logits(llama_jax.load(root / "parity_orbax")), expected, atol=1e-4, rtol=0)


def test_chain_hf_orbax_meta_orbax_hf(case):
    config, reference, hf_dir, expected, root = case
    (hf_dir / "tokenizer.json").write_text("{}")  # tokenizer files travel with the weights
    convert.convert(hf_dir, root / "chain1", "orbax")
    assert (root / "chain1" / "tokenizer.json").is_file() and (root / "chain1" / "generation_config.json").is_file()
    convert.convert(root / "chain1", root / "chain2", "meta", shards=2)
    convert.convert(root / "chain2", root / "chain3", "orbax")
    convert.convert(root / "chain3", root / "chain4", "hf")
    assert_same_bytes(hf_tensors(hf_dir), hf_tensors(root / "chain4"))
    reloaded = LlamaForCausalLM.from_pretrained(root / "chain4", attn_implementation="eager")
    np.testing.assert_array_equal(hf_logits(reloaded, TOKENS), expected)
    np.testing.assert_allclose(our_logits(llama_jax.load(root / "chain4", dtype="float32")), expected,
                               atol=1e-4, rtol=0)


def test_bfloat16_checkpoints(case):
    config, reference, hf_dir, expected, root = case
    # A bfloat16 HF checkpoint (as transformers writes it) is read exactly, upcast to float32.
    bf16_model = random_hf_model(config, seed=7).to(torch.bfloat16)
    bf16_model.save_pretrained(root / "bf16_hf")
    ours = llama_jax.load(root / "bf16_hf", dtype="float32")
    assert all(value.dtype == jnp.float32 for value in model_params(ours).values())
    upcast = random_hf_model(config, seed=7)
    upcast.load_state_dict({k: v.float() for k, v in bf16_model.state_dict().items()})
    np.testing.assert_allclose(our_logits(ours), hf_logits(upcast, TOKENS), atol=1e-4, rtol=0)
    # bfloat16 stays bfloat16 through orbax and Meta, byte for byte.
    convert.convert(root / "bf16_hf", root / "bf16_orbax", "orbax")
    convert.convert(root / "bf16_orbax", root / "bf16_meta", "meta", shards=2)
    assert meta_tensors(root / "bf16_meta")[0]["norm.weight"].dtype == torch.bfloat16
    convert.convert(root / "bf16_meta", root / "bf16_orbax2", "orbax")
    convert.convert(root / "bf16_orbax2", root / "bf16_back", "hf")
    assert_same_bytes(hf_tensors(root / "bf16_hf"), hf_tensors(root / "bf16_back"))
    assert json.loads((root / "bf16_back" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # float32 written as bfloat16: transformers runs it, and both agree with the float32 reference to bf16 precision.
    convert.convert(hf_dir, root / "cast_bf16", "hf", dtype="bfloat16")
    with safe_open(str(root / "cast_bf16" / "model.safetensors"), framework="numpy") as handle:
        assert handle.get_slice("model.norm.weight").get_dtype() == "BF16"
    theirs = hf_logits(LlamaForCausalLM.from_pretrained(root / "cast_bf16", attn_implementation="eager",
                                                        dtype=torch.float32), TOKENS)
    mine = our_logits(llama_jax.load(root / "cast_bf16", dtype="float32"))
    np.testing.assert_allclose(mine, theirs, atol=1e-4, rtol=0)
    scale = np.abs(expected).max()
    assert np.abs(mine - expected).max() < 0.02 * scale  # bf16 weights: ~3 significant digits


def test_mixed_dtypes_are_kept_per_tensor(case, tmp_path):
    """bfloat16 weights beside float32 norms survive HF → orbax → Meta → orbax → HF unchanged."""
    config, reference, hf_dir, _, root = case
    mixed = edited_hf(hf_dir, tmp_path / "mixed", tensors=lambda state: {
        name: value if name.endswith("norm.weight") else value.astype(BFLOAT16) for name, value in state.items()})
    convert.convert(mixed, tmp_path / "orbax", "orbax")
    convert.convert(tmp_path / "orbax", tmp_path / "meta", "meta", shards=2)
    rank1 = meta_tensors(tmp_path / "meta")[1]
    assert rank1["norm.weight"].dtype == torch.float32 and rank1["output.weight"].dtype == torch.bfloat16
    convert.convert(tmp_path / "meta", tmp_path / "orbax2", "orbax")
    convert.convert(tmp_path / "orbax2", tmp_path / "back", "hf")
    assert_same_bytes(hf_tensors(mixed), hf_tensors(tmp_path / "back"))


def test_tied_embeddings_hf_round_trip(tmp_path):
    config = dataclasses.replace(LLAMA2, tie_embeddings=True)
    reference = random_hf_model(config, seed=3)
    reference.save_pretrained(tmp_path / "hf")
    convert.convert(tmp_path / "hf", tmp_path / "orbax", "orbax")
    assert llama_jax.load(tmp_path / "orbax").config.tie_embeddings
    convert.convert(tmp_path / "orbax", tmp_path / "back", "hf")
    back = hf_tensors(tmp_path / "back")
    assert "lm_head.weight" not in back
    assert_same_bytes({k: v for k, v in hf_tensors(tmp_path / "hf").items() if k != "lm_head.weight"}, back)


# ── Native format, run directories, sharded restore ──────────────────────────────────────────────────────────
def test_native_format_layout_and_sharded_restore(case):
    config, reference, hf_dir, expected, root = case
    model = llama_jax.load(hf_dir, dtype="float32")
    llama_jax.save(model, root / "native")
    fields = json.loads((root / "native" / "model.json").read_text())
    assert fields == dataclasses.asdict(model.config)
    _, params = convert.read_params(root / "native")
    assert sorted(params) == sorted(model_params(model))
    from llama_jax.sharding import make_mesh

    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    sharded = llama_jax.load(root / "native", mesh=mesh)
    w_q = sharded.blocks.attention.w_q[...]
    assert len(w_q.sharding.device_set) == 8 and tuple(w_q.sharding.spec) == (None, "fsdp", "tensor", None)
    np.testing.assert_allclose(our_logits(sharded), expected, atol=1e-4, rtol=0)


def make_run_dir(root: Path, model, steps: dict[str, str]) -> Path:
    """A run directory as the trainer writes it: config.yaml with the model mapping, checkpoints/<step>/params.

    steps: {directory name: 'complete' | 'unfinished' (no commit_success.txt) | 'damaged' (no params metadata)}.
    """
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "model": dataclasses.asdict(model.config)}))
    for step, state in steps.items():
        step_dir = run / "checkpoints" / step
        step_dir.mkdir()
        native.write_native(model.config, model_params(model), step_dir)
        (step_dir / "model.json").unlink()  # not guaranteed beside a training checkpoint
        (step_dir / "params" / "commit_success.txt").unlink()
        if state != "unfinished":
            (step_dir / "commit_success.txt").write_text("")  # the CheckpointManager marks the whole step
        if state == "damaged":
            (step_dir / "params" / "_METADATA").unlink()
    return run


def test_run_directory_reads_newest_complete_step(case):
    config, reference, hf_dir, expected, root = case
    model = llama_jax.load(hf_dir, dtype="float32")
    # 200 is the newest complete step: 300 lost its params metadata, 400 never got its commit marker, and
    # "500.orbax-checkpoint-tmp-1" is a save in progress.
    run = make_run_dir(root, model, {"100": "complete", "200": "complete", "300": "damaged", "400": "unfinished",
                                     "500.orbax-checkpoint-tmp-1": "complete"})
    assert native.latest_run_checkpoint(run)[0] == 200
    assert convert.detect_format(run) == "orbax"
    np.testing.assert_allclose(our_logits(llama_jax.load(run, dtype="float32")), expected, atol=1e-4, rtol=0)
    convert.convert(run, root / "run_hf", "hf")
    assert_same_bytes(hf_tensors(hf_dir), hf_tensors(root / "run_hf"))
    step = llama_jax.load(run / "checkpoints" / "100", dtype="float32")  # one step, given directly
    assert step.config == model.config


def test_run_directory_written_by_orbax_checkpoint_manager(case, tmp_path, monkeypatch):
    """The trainer's way of writing: a CheckpointManager step with a `params` item of sharded jax.Arrays."""
    import orbax.checkpoint as ocp

    from llama_jax.sharding import make_mesh

    config, reference, hf_dir, expected, root = case
    model = llama_jax.load(hf_dir, dtype="float32", mesh=make_mesh(data=1, fsdp=4, tensor=2))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(model.config)}))
    manager = ocp.CheckpointManager((tmp_path / "run" / "checkpoints").absolute(),
                                    item_handlers={"params": ocp.StandardCheckpointHandler()})
    for step in (3, 7):
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(model_params(model))))
    manager.wait_until_finished()
    manager.close()
    assert native.latest_run_checkpoint(tmp_path / "run")[0] == 7
    np.testing.assert_allclose(our_logits(llama_jax.load(tmp_path / "run")), expected, atol=1e-4, rtol=0)
    monkeypatch.chdir(tmp_path)  # a relative path, as in the README's examples
    np.testing.assert_allclose(our_logits(llama_jax.load("run")), expected, atol=1e-4, rtol=0)
    convert.convert(tmp_path / "run", tmp_path / "hf", "hf")  # a layer at a time, from the sharded arrays' files
    assert_same_bytes(hf_tensors(hf_dir), hf_tensors(tmp_path / "hf"))


def test_run_directory_without_complete_checkpoint(tmp_path):
    model = model_from_params(LLAMA2, {name: np.zeros(shape, np.float32) for name, shape in
                                       param_shapes(LLAMA2).items()})
    run = make_run_dir(tmp_path, model, {"5": "damaged", "6": "unfinished"})
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        llama_jax.load(run)


# ── Errors: clear, and nothing left at the destination ────────────────────────────────────────────────────────
def edited_hf(source: Path, target: Path, config_changes=None, tensors=None) -> Path:
    target.mkdir()
    raw = json.loads((source / "config.json").read_text())
    raw.update(config_changes or {})
    (target / "config.json").write_text(json.dumps(raw))
    state = hf_tensors(source)
    save_file(tensors(state) if tensors else state, str(target / "model.safetensors"))
    return target


def assert_fails(src: Path, dst: Path, match: str, to: str = "orbax") -> None:
    with pytest.raises(ConversionError, match=match):
        convert.convert(src, dst, to)
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.tmp")]


def test_config_weights_mismatch_errors(case):
    config, reference, hf_dir, _, root = case
    errors = root / "errors"
    errors.mkdir()
    more_layers = edited_hf(hf_dir, errors / "layers", {"num_hidden_layers": 3})
    assert_fails(more_layers, errors / "out1", r"missing \[model\.layers\.2\.")
    wider = edited_hf(hf_dir, errors / "dim", {"hidden_size": 128, "head_dim": 128 // config.n_heads})
    assert_fails(wider, errors / "out2", r"model\.embed_tokens\.weight has shape \(256, 64\).*needs \(256, 128\)")
    heads = edited_hf(hf_dir, errors / "heads", {"num_key_value_heads": 2 if config.kv_heads == 4 else 4,
                                                 "num_attention_heads": config.n_heads})
    assert_fails(heads, errors / "out3", r"k_proj\.weight has shape")
    missing = edited_hf(hf_dir, errors / "missing",
                        tensors=lambda s: {k: v for k, v in s.items() if k != "model.layers.1.mlp.up_proj.weight"})
    assert_fails(missing, errors / "out4", r"missing \[model\.layers\.1\.mlp\.up_proj\.weight\].*\(160, 64\)")
    extra = edited_hf(hf_dir, errors / "extra", tensors=lambda s: {**s, "model.extra.weight": np.ones((3, 5),
                                                                                                      np.float32)})
    assert_fails(extra, errors / "out5", r"unexpected \[model\.extra\.weight \(3, 5\)\]")


def test_truncated_and_unknown_inputs(case, tmp_path):
    config, reference, hf_dir, _, root = case
    truncated = edited_hf(hf_dir, tmp_path / "truncated")
    file = truncated / "model.safetensors"
    os.truncate(file, file.stat().st_size - 1000)
    assert_fails(truncated, tmp_path / "out1", r"model\.safetensors is not a readable safetensors file")
    meta_dir = write_meta_by_hand(reference, config, tmp_path / "meta", shards=2)
    shard = meta_dir / "consolidated.01.pth"
    os.truncate(shard, shard.stat().st_size // 2)
    assert_fails(meta_dir, tmp_path / "out2", r"consolidated\.01\.pth is not a readable PyTorch checkpoint")
    (tmp_path / "empty").mkdir()
    assert_fails(tmp_path / "empty", tmp_path / "out3", r"cannot tell the format of .*empty: looked for")
    params = json.loads((meta_dir / "params.json").read_text())
    write_meta_by_hand(reference, config, tmp_path / "meta_layers", shards=1)
    (tmp_path / "meta_layers" / "params.json").write_text(json.dumps({**params, "n_layers": 1}))
    assert_fails(tmp_path / "meta_layers", tmp_path / "out4", r"unexpected \[layers\.1\.")
    convert.convert(hf_dir, tmp_path / "exists", "orbax")
    with pytest.raises(ConversionError, match="already exists"):
        convert.convert(hf_dir, tmp_path / "exists", "orbax")


def test_failure_while_writing_leaves_nothing(case, tmp_path, monkeypatch):
    """An error after some files are written (here: the third tensor) removes the staging directory."""
    config, reference, hf_dir, _, root = case
    from llama_jax.convert import hf

    calls = {"n": 0}
    original = hf._pwrite_all

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        original(*args)

    monkeypatch.setattr(hf, "_pwrite_all", failing)
    with pytest.raises(OSError, match="disk full"):
        convert.convert(hf_dir, tmp_path / "out", "hf")
    assert list(tmp_path.iterdir()) == []


def test_cli(case, tmp_path, capsys):
    config, reference, hf_dir, _, root = case
    with pytest.raises(SystemExit) as exit_info:
        run_program(cli_main, [str(hf_dir), str(tmp_path / "meta"), "--to", "meta", "--shards", "2",
                               "--dtype", "bfloat16"])
    assert exit_info.value.code == 0 and "(hf) →" in capsys.readouterr().out
    assert meta_tensors(tmp_path / "meta")[1]["output.weight"].dtype == torch.bfloat16
    with pytest.raises(SystemExit) as exit_info:
        run_program(cli_main, [str(tmp_path), str(tmp_path / "x"), "--to", "hf"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: cannot tell the format") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        run_program(cli_main, [str(hf_dir), str(tmp_path / "y"), "--to", "meta", "--shards", "3"])
    assert exit_info.value.code == 2 and "not divisible by 3" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
