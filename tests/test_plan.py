"""The run planner (llama_jax.planner, `python -m train.plan`): per-device memory, FLOPs, GPU-hours and the split that
fits, checked against hand arithmetic."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_jax.config import MODEL_PRESETS
from llama_jax.errors import ConfigError
from llama_jax.planner import (
    ACCELERATORS,
    GIB,
    META_LLAMA2_GPU_HOURS,
    gpu_hours,
    implied_mfu,
    meta_implied_mfus,
    resolve_mesh,
    state_bytes,
)
from llama_jax.sharding import DEFAULT_RULES

REPO = Path(__file__).resolve().parents[1]
# A two-layer model (dim 64, vocab 256) compiles in seconds; float32 keeps XLA:CPU from adding bf16 copies.
SMALL = ["model=test", "train.batch_size=16", "train.seq_len=64"]


def plan_program(*args, timeout=600):
    """`python -m train.plan ARGS` from the repository root (where `train` lives)."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}  # the planner sets its own devices
    return subprocess.run([sys.executable, "-m", "train.plan", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_plan(*args, timeout=600):
    result = plan_program("configs/tiny.yaml", *SMALL, *args, "--json", "-", timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_meta_gpu_hours_imply_mfu_by_hand():
    # Llama 2 7B per token, by hand: attention 4·4096² = 67,108,864 and SwiGLU 3·4096·11008 = 135,266,304 weights per
    # layer, × 32 layers, + the 32000 × 4096 output head = 6,607,077,376 matmul weights; × 6, + 12·32·4096·4096.
    flops_per_token = 6 * (32 * (67_108_864 + 135_266_304) + 32_000 * 4096) + 12 * 32 * 4096 * 4096
    assert flops_per_token == 46_084_915_200 == MODEL_PRESETS["llama2-7b"].flops_per_token(4096)
    expected = 2e12 * flops_per_token / (184_320 * 3600 * 312e12)
    mfus = meta_implied_mfus()
    assert mfus["llama2-7b"] == pytest.approx(expected, rel=1e-12)
    assert round(mfus["llama2-7b"], 3) == 0.445
    assert round(mfus["llama2-13b"], 3) == 0.421 and round(mfus["llama2-70b"], 3) == 0.460
    # gpu_hours is implied_mfu's inverse: at Meta's implied MFU we get Meta's hours back.
    for name, hours in META_LLAMA2_GPU_HOURS.items():
        fpt = MODEL_PRESETS[name].flops_per_token(4096)
        assert gpu_hours(2e12, fpt, 312.0, mfus[name]) == pytest.approx(hours, rel=1e-12)
    assert implied_mfu(100.0, 3.6e20, 1.0, 1000.0) == pytest.approx(1.0)  # 3.6e20 FLOPs = 100 h at 1 PFLOP/s
    assert ACCELERATORS["h100-sxm"].peak_bf16_tflops == 989.0 and ACCELERATORS["a100-80gb"].peak_bf16_tflops == 312.0


def test_state_bytes_are_exact_for_7b_and_70b_meshes():
    seven = MODEL_PRESETS["llama2-7b"]
    assert seven.num_params() == 6_738_415_616
    # Every 7B weight has an `embed` dimension (4096, divisible by 8): fsdp=8 splits all of it 8 ways.
    assert state_bytes(seven, DEFAULT_RULES, (1, 8, 1)) == {"params": 6_738_415_616 * 4 // 8,
                                                            "opt_state": 2 * 6_738_415_616 * 4 // 8,
                                                            "grads": 6_738_415_616 * 4 // 8}
    # Tensor parallelism splits heads/mlp/vocab further; norms ([layers, dim]) only by fsdp.
    seventy = MODEL_PRESETS["llama2-70b"]
    norms = (2 * seventy.n_layers + 1) * seventy.dim
    expected = (seventy.num_params() - norms) * 4 // 64 + norms * 4 // 8
    assert state_bytes(seventy, DEFAULT_RULES, (1, 8, 8))["params"] == expected
    # Data parallelism replicates.
    assert state_bytes(seven, DEFAULT_RULES, (8, 1, 1))["params"] == 6_738_415_616 * 4


def test_mesh_resolution():
    assert resolve_mesh((1, -1, 1), 64) == (1, 64, 1)
    assert resolve_mesh((2, -1, 8), 64) == (2, 4, 8)
    with pytest.raises(ConfigError, match="does not divide"):
        resolve_mesh((1, -1, 3), 64)
    with pytest.raises(ConfigError, match="--devices is 8"):
        resolve_mesh((1, 4, 1), 8)


@pytest.fixture(scope="module")
def replicated_plan():
    return run_plan("--devices", "8", "--mesh", "8x1x1")


def test_plan_compiles_the_step_and_accounts_for_its_memory_and_flops(replicated_plan):
    plan = replicated_plan
    model = MODEL_PRESETS["test"]
    b = plan["bytes"]
    assert plan["devices"] == 8 and plan["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert plan["grad_accum"] == 16 // 8 and plan["micro_batch"] == 1
    # Pure data parallelism: every device holds all float32 parameters and both AdamW moments.
    assert b["params"] == model.num_params() * 4
    assert b["opt_state"] == pytest.approx(2 * b["params"], abs=64)  # + a few int32 scalars (steps, counts)
    assert b["batch"] == 3 * (16 // 8) * 64 * 4  # inputs, targets, loss_mask rows of this device
    # The compiled program's arguments are exactly the state and batch shards computed from shapes and shardings.
    assert b["compiled_arguments"] == b["params"] + b["opt_state"] + b["batch"]
    assert b["peak"] == b["compiled_arguments"] + b["compiled_temporaries"] + b["compiled_outputs"] \
        - b["compiled_aliased"]
    assert b["grads"] + b["other_temporaries"] == b["compiled_temporaries"]
    # Model FLOPs are PaLM's per-token formula times the batch's tokens; the counted matmuls exceed them by the
    # remat recomputation (the forward again: up to 4/3) and the loss chunk's recomputed logits.
    assert plan["model_flops_per_step"] == model.flops_per_token(64) * 16 * 64
    ratio = plan["flops"]["executed_global"] / plan["model_flops_per_step"]
    assert 1.0 < ratio < 1.5
    # Time and GPU-hours at 40% MFU on H100 SXM.
    assert plan["step_seconds"] == pytest.approx(plan["model_flops_per_step"] / (8 * 989e12 * 0.4), rel=1e-12)
    assert plan["gpu_hours"] == pytest.approx(2e12 * model.flops_per_token(64) / (989e12 * 0.4) / 3600, rel=1e-12)
    assert plan["fits"] and "suggestion" not in plan


def test_plan_says_when_it_does_not_fit_and_finds_the_smallest_split(replicated_plan):
    peak = replicated_plan["bytes"]["peak"]
    # A device with exactly the replicated peak: 10% headroom makes it not fit.
    plan = run_plan("--devices", "8", "--mesh", "8x1x1", "--memory-gib", repr(peak / GIB))
    assert not plan["fits"] and plan["usable_bytes"] == pytest.approx(0.9 * peak)
    suggestion = plan["suggestion"]
    mesh = suggestion["mesh"]
    assert mesh["fsdp"] * mesh["tensor"] == 2 and mesh["data"] * 2 == 8 and suggestion["devices"] == 8
    # The suggestion was compiled, and fits.
    assert suggestion["verified_peak"] <= plan["usable_bytes"] < peak


def test_plan_reports_a_bad_mesh_in_one_line():
    result = plan_program("configs/tiny.yaml", "--devices", "8", "--mesh", "1x3x1", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: mesh data×fsdp×tensor = 1×3×1 = 3, but --devices is 8"
    # The old comma spelling is refused in one line that shows the one spelling.
    result = plan_program("configs/tiny.yaml", "--devices", "8", "--mesh", "1,8,1", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --mesh '1,8,1': expected DATAxFSDPxTENSOR sizes such as 1x-1x1 or 2x2x2, at most one of them -1 "
        "(the comma spelling is gone: write 1x-1x1)"]


def test_the_program_imports_no_jax_before_it_sets_the_device_count():
    # train.plan imports the planner and the config at its top; the simulated device count must still be settable.
    result = subprocess.run([sys.executable, "-c", "import sys, train.plan; assert 'jax' not in sys.modules"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_old_command_names_the_new_one():
    result = subprocess.run([sys.executable, "scripts/plan.py", "configs/tiny.yaml", "--devices", "8"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: `python scripts/plan.py` is now `python -m train.plan`"]


@pytest.mark.parametrize("name, lr, seq_len, tokens", [("llama2-7b", 3e-4, 4096, 2e12),
                                                       ("llama2-13b", 3e-4, 4096, 2e12),
                                                       ("llama2-70b", 1.5e-4, 4096, 2e12),
                                                       ("llama3-8b", 3e-4, 8192, 15e12)])
def test_pretraining_configs_follow_the_published_recipes(name, lr, seq_len, tokens):
    from llama_jax.config import load_config

    config = load_config(REPO / "configs" / f"{name}.yaml")
    assert config.model == MODEL_PRESETS[name]
    train, optimizer = config.train, config.optimizer
    assert train.seq_len == seq_len and train.batch_size * train.seq_len == 4 * 2 ** 20  # 4M-token batches
    assert math.isclose(train.steps * train.batch_size * train.seq_len, tokens, rel_tol=1e-6)
    assert (optimizer.lr, optimizer.warmup_steps, optimizer.min_lr_ratio, optimizer.weight_decay,
            optimizer.clip_norm, optimizer.b1, optimizer.b2) == (lr, 2000, 0.1, 0.1, 1.0, 0.9, 0.95)
    assert config.model.dtype == "bfloat16" and train.document_masking == name.startswith("llama3")
    assert train.batch_size % train.grad_accum == 0


def test_plan_counts_attention_flops_as_a_gpu_runs_them():
    # At seq 512 the test model's attention products are most of its FLOPs (12·layers·dim·seq = 786K per token
    # against 614K for the weights): the CPU flash-attention kernel `auto` picks on these simulated devices would hide
    # them in a custom call, so the plan compiles XLA's attention and counts them (the forward again under remat).
    plan = run_plan("train.seq_len=512", "model.max_seq_len=512", "--devices", "8", "--mesh", "8x1x1",
                    "--no-suggest")
    ratio = plan["flops"]["executed_global"] / plan["model_flops_per_step"]
    assert 1.0 < ratio < 1.5
    result = plan_program("configs/tiny.yaml", *SMALL, "model.attention_impl=flash_cpu", "--devices", "8")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: model.attention_impl=flash_cpu is a CPU kernel and a plan is for GPUs: use auto, chunked or dense"]
