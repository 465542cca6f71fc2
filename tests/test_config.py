"""Config presets, overrides and errors; big models built from abstract shapes only."""
import dataclasses
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from llama_jax.config import MODEL_PRESETS, ModelConfig, load_config
from llama_jax.errors import ConfigError
from llama_jax.params import param_specs
from llama_jax.sharding import param_shardings

# Published parameter counts (Llama 2 paper / Meta model cards, exact counts of the released checkpoints).
PUBLISHED_PARAMS = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_counts_match_published_sizes(name):
    specs = param_specs(MODEL_PRESETS[name])  # abstract shapes from the real module: nothing allocated
    counted = sum(int(np.prod(spec.shape)) for spec in specs.values())
    assert counted == PUBLISHED_PARAMS[name]
    assert MODEL_PRESETS[name].num_params() == PUBLISHED_PARAMS[name]


def test_meta_ffn_rule():
    # Meta's params.json: Llama 2 70B (multiple_of 4096, multiplier 1.3) → 28672; Llama 3 8B (1024, 1.3) → 14336.
    assert MODEL_PRESETS["llama2-7b"].hidden_dim == 11008
    assert MODEL_PRESETS["llama2-13b"].hidden_dim == 13824
    assert MODEL_PRESETS["llama2-70b"].hidden_dim == 28672
    assert MODEL_PRESETS["llama3-8b"].hidden_dim == 14336


@pytest.mark.parametrize("name", ["llama2-70b", "llama3-8b"])
def test_big_models_shard_on_a_1x8x8_mesh_without_allocation(name):
    mesh = AbstractMesh((1, 8, 8), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    specs = param_specs(MODEL_PRESETS[name])
    shardings = param_shardings(specs, mesh)
    assert set(shardings) == set(specs)
    config = MODEL_PRESETS[name]
    # Every large matrix is split 64 ways; only norm scales (and nothing else) stay partly replicated.
    for param, sharding in shardings.items():
        shard_shape = sharding.shard_shape(specs[param].shape)
        fraction = np.prod(shard_shape) / np.prod(specs[param].shape)
        assert fraction == (1 / 8 if param.endswith("scale") else 1 / 64), (param, sharding.spec)
    assert shardings["blocks.attention.w_q"].spec == P(None, "fsdp", "tensor", None)
    assert shardings["embedding"].spec == P("tensor", "fsdp")
    assert config.kv_heads == 8 and shardings["blocks.attention.w_k"].spec == P(None, "fsdp", "tensor", None)


def test_overrides_presets_and_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: llama2-7b\ntrain:\n  steps: 5\nmesh:\n  fsdp: 4\n")
    config = load_config(path, ["model.n_layers=2", "train.batch_size=16", "optimizer.lr=1e-4"])
    assert (config.model.n_layers, config.model.dim, config.model.n_heads) == (2, 4096, 32)
    assert (config.train.steps, config.train.batch_size, config.optimizer.lr) == (5, 16, 1e-4)
    assert config.mesh.fsdp == 4 and config.run_dir == "runs/run"
    inline = load_config(None, ["model.preset=llama3.1-8b", "model.rope_scaling.factor=4"])
    assert inline.model.rope_scaling.factor == 4.0 and inline.model.rope_theta == 500000.0


@pytest.mark.parametrize("overrides, message", [
    (["model.dimm=3"], "unknown config key 'model.dimm'"),
    (["trian.steps=3"], "unknown config key 'trian'"),
    (["model=llama9"], "model='llama9' is not a known preset"),
    (["model.n_heads=7"], "model.n_heads=7 is not allowed: expected a divisor of model.dim=4096"),
    (["model.n_kv_heads=3"], "model.n_kv_heads=3 is not allowed: expected a divisor of model.n_heads=32"),
    (["model.dim=4100", "model.n_heads=4100"], "head_dim = dim / n_heads even"),
    (["train.steps=many"], "config key 'train.steps'"),
    (["model.dtype=int8"], "model.dtype='int8' is not allowed: expected one of"),
    (["model.rope_scaling.low_freq_factor=5"], "model.rope_scaling.low_freq_factor=5"),
    (["steps"], "is not of the form key=value"),
])
def test_bad_config_gives_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.").replace("*", r"\*")):
        load_config(None, overrides)


def test_config_program_prints_one_line_for_user_errors():
    result = subprocess.run([sys.executable, "-m", "llama_jax.config", "model.n_kv_heads=3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: model.n_kv_heads=3 is not allowed: expected a divisor of model.n_heads=32 (e.g. 1, 2, 4, 8, 16, 32)"]
    ok = subprocess.run([sys.executable, "-m", "llama_jax.config", "model=llama2-70b"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "# parameters: 68,976,648,192" in ok.stdout


def test_mesh_in_the_shared_spelling():
    config = load_config("configs/tiny.yaml", ["mesh=2x-1x2"])
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (2, -1, 2)
    config = load_config("configs/tiny.yaml", ["mesh=2x2x2", "mesh.fsdp=1"])
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (2, 1, 2)
    with pytest.raises(ConfigError, match=r"^mesh= '2,2,2': expected DATAxFSDPxTENSOR"):
        load_config("configs/tiny.yaml", ["mesh=2,2,2"])


def test_model_config_is_typed_and_frozen():
    config = ModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dim = 3
    assert jax.numpy.dtype(MODEL_PRESETS["tiny"].dtype) == jax.numpy.bfloat16
