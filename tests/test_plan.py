"""The run planner (llama_jax.planner, `python -m train.plan`): per-device memory, FLOPs, GPU-hours and the split that
fits, checked against hand arithmetic; TPU plans compiled by XLA:TPU where libtpu (the `tpu` extra) is installed.

CI installs no `tpu` extra, so the tests that compile for a TPU skip there with their reason; the target parser, the
chip table, the roofline arithmetic and the error paths run everywhere."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_jax.config import MODEL_PRESETS, load_config
from llama_jax.errors import ConfigError
from llama_jax.planner import (
    ACCELERATORS,
    GIB,
    META_LLAMA2_GPU_HOURS,
    TPU_CHIPS,
    gpu_hours,
    hbm_exhausted,
    implied_mfu,
    matmul_flops,
    meta_implied_mfus,
    mfu_of,
    parse_target,
    resolve_mesh,
    roofline,
    state_bytes,
    tpu_target_for,
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
    # Time and GPU-hours at 40% MFU on H100 SXM, checked against each other and against the implied-MFU inverse
    # rather than by restating the planner's formulas: 2e12 tokens are 2e12 / 1024 steps of 16 × 64 tokens on 8 GPUs.
    assert plan["gpu_hours"] * 3600 == pytest.approx(plan["step_seconds"] * 8 * 2e12 / (16 * 64), rel=1e-9)
    assert implied_mfu(plan["gpu_hours"], 2e12, model.flops_per_token(64), 989.0) == pytest.approx(0.4, rel=1e-9)
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


def test_sequence_sharding_divides_each_devices_tokens_and_keeps_the_flops():
    """sharding_rules=sequence on (1,8,1): one sequence per micro-batch split 8 ways; the state is split as by default
    and the batch exactly as the rules say; the FLOPs are one device's (each shard runs its own branch of the causal
    blocks, so none is skipped or repeated)."""
    plan = run_plan("sharding_rules=sequence", "--devices", "8", "--mesh", "1x8x1", "--no-suggest")
    model, b = MODEL_PRESETS["test"], plan["bytes"]
    assert (plan["sequence_shards"], plan["tokens_per_device"], plan["grad_accum"]) == (8, 64 // 8, 16)
    assert b["batch"] == 3 * 16 * (64 // 8) * 4  # inputs, targets, loss_mask: all 16 rows, 8 of 64 columns
    assert b["compiled_arguments"] == b["params"] + b["opt_state"] + b["batch"]
    assert b["params"] == state_bytes(model, DEFAULT_RULES, (1, 8, 1))["params"]
    assert "gathered from 8 sequence shards" in plan["attention"]
    assert plan["model_flops_per_step"] == model.flops_per_token(64) * 16 * 64
    # Against one device's step with the default rules, traced in this process (nothing compiled).
    import dataclasses

    import jax
    import jax.numpy as jnp

    from llama_jax.config import OptimizerConfig
    from llama_jax.sharding import SEQUENCE_RULES, activation_sharding, make_mesh
    from llama_jax.trainer import Trainer

    config = dataclasses.replace(model, attention_impl="chunked", attention_chunk=32, max_seq_len=256)
    counts = {}
    for name, rules, shape in (("one", DEFAULT_RULES, (1, 1, 1)), ("sequence", SEQUENCE_RULES, (1, 4, 2))):
        mesh = make_mesh(*shape, devices=jax.devices()[:math.prod(shape)])
        trainer = Trainer.create(config, OptimizerConfig(), 10, mesh, rules, grad_accum=2)
        state = trainer.abstract_state()
        batch = {key: jax.ShapeDtypeStruct((4, 256), jnp.int32) for key in ("inputs", "targets", "loss_mask")}
        with activation_sharding(mesh, rules):
            counts[name] = matmul_flops(jax.make_jaxpr(trainer.train_step)(state, batch).jaxpr)[0]
    assert counts["sequence"] == counts["one"]


# ── TPU plans ─────────────────────────────────────────────────────────────────────────────────────────────────────
LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'); CI installs "
                                                     "no tpu extra, so XLA:TPU cannot compile here")


def test_tpu_targets_are_named_by_chips_per_axis():
    target = parse_target("tpu-v5p:2x2x1")
    assert (target.chip.generation, target.shape, target.chips, target.name) == ("v5p", (2, 2, 1), 4, "tpu-v5p:2x2x1")
    # Cloud TPU's accelerator types count TensorCores on v4/v5p (two per chip) and chips on v5e/v6e.
    assert target.accelerator_type() == "v5p-8" and parse_target("tpu-v4:4x4x4").accelerator_type() == "v4-128"
    assert parse_target("tpu-v5e:4x4").accelerator_type() == "v5litepod-16"
    assert parse_target("tpu-v6e:16x16").accelerator_type() == "v6e-256"
    # MaxText's AOT options: megacore on v4/v5p, hosts of 2×2×1 chips, wrap-around on whole cubes / 16-chip axes.
    assert parse_target("tpu-v5p:4x4x4").topology_options() == {
        "chip_config_name": "megacore", "chips_per_host_bounds": (2, 2, 1), "num_slices": 1, "wrap": (True,) * 3}
    assert parse_target("tpu-v5e:4x4").topology_options()["wrap"] == (False, False, False)
    assert parse_target("tpu-v6e:16x16").topology_options()["wrap"] == (True, True, False)
    with pytest.raises(ConfigError) as error:
        parse_target("v5p-128")
    assert str(error.value) == (
        "--target 'v5p-128': expected tpu-GENERATION:TOPOLOGY with the chips along each axis, e.g. tpu-v5p:2x2x1 or "
        "tpu-v5e:4x4 (GENERATION one of v4, v5e, v5p, v6e; names such as v5p-128 are not accepted)")
    for bad in ("tpu-v5p-128", "tpu-v7:2x2", "tpu-v5p:2x2x1x1x"):
        with pytest.raises(ConfigError, match="expected tpu-GENERATION:TOPOLOGY"):
            parse_target(bad)
    with pytest.raises(ConfigError, match="a v5p topology has 3 positive axes"):
        parse_target("tpu-v5p:4x4")
    with pytest.raises(ConfigError, match="a v5e topology has 2 positive axes"):
        parse_target("tpu-v5e:0x4")


def test_standard_slices_for_a_chip_count():
    v5p, v5e = TPU_CHIPS["v5p"], TPU_CHIPS["v5e"]
    assert [tpu_target_for(v5p, n).topology for n in (4, 8, 16, 32, 64, 128)] == [
        "2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8"]
    assert [tpu_target_for(v5e, n).topology for n in (1, 4, 8, 16, 32, 256)] == [
        "1x1", "2x2", "2x4", "4x4", "4x8", "16x16"]
    assert tpu_target_for(v5e, 2) is None and tpu_target_for(v5p, 2) is None and tpu_target_for(v5e, 512) is None


def test_tpu_chip_table_is_googles():
    # Google Cloud's TPU system-architecture pages: bf16 peak TFLOP/s, HBM GiB, HBM GB/s per chip.
    table = {name: (chip.peak_bf16_tflops, chip.hbm_gib, chip.hbm_gbytes_per_second, chip.megacore)
             for name, chip in TPU_CHIPS.items()}
    assert table == {"v4": (275.0, 32.0, 1200.0, True), "v5e": (197.0, 16.0, 819.0, False),
                     "v5p": (459.0, 95.0, 2765.0, True), "v6e": (918.0, 32.0, 1638.0, False)}


def test_a_tpu_fit_needs_the_compile_and_the_memory_analysis_within_the_limit():
    from llama_jax.planner import fits_tpu

    assert fits_tpu({"peak": 10 * GIB}, 15.75 * GIB)
    assert not fits_tpu({"peak": 17 * GIB}, 15.75 * GIB)  # compiled, but adds up to more than the limit
    assert not fits_tpu({"peak": 17 * GIB, "hbm_exhausted": {"required": 17 * GIB}}, 15.75 * GIB)


def test_roofline_and_the_mfu_it_implies_by_hand():
    v5p, v5e = TPU_CHIPS["v5p"], TPU_CHIPS["v5e"]
    # Compute-bound: 1e15 FLOPs at 459e12 FLOP/s = 2.17865 s; 1e12 bytes at 2765e9 B/s = 0.36166 s.
    line = roofline(1e15, 1e12, v5p)
    assert line["compute_seconds"] == pytest.approx(2.1786492374727668, rel=1e-12)
    assert line["memory_seconds"] == pytest.approx(0.3616636528028933, rel=1e-12)
    assert line["step_seconds"] == line["compute_seconds"] and line["bound"] == "compute"
    # 7.5e14 model FLOPs in that step: 7.5e14 / (2.17865 × 459e12) = 0.75, the model/executed ratio.
    assert mfu_of(7.5e14, line["step_seconds"], 459.0) == pytest.approx(0.75, rel=1e-12)
    # Memory-bound: 1e12 FLOPs / 197e12 = 5.076 ms against 1e10 bytes / 819e9 = 12.21 ms.
    line = roofline(1e12, 1e10, v5e)
    assert line["bound"] == "memory" and line["step_seconds"] == pytest.approx(1e10 / 819e9, rel=1e-12)
    assert mfu_of(1e12, line["step_seconds"], 197.0) == pytest.approx(1e12 / (1e10 / 819e9) / 197e12, rel=1e-12)
    assert roofline(1e12, None, v5e)["step_seconds"] == pytest.approx(1e12 / 197e12, rel=1e-12)  # FLOPs alone


def test_the_tpu_compilers_refusal_is_read():
    refusal = hbm_exhausted("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                            "temporaries (40.02G) exceeds available HBM (15.75G).\nmore")
    assert refusal["required"] == int(40.02 * GIB) and refusal["available"] == int(15.75 * GIB)
    assert refusal["message"].startswith("RESOURCE_EXHAUSTED: Ran out of memory on HBM")
    refusal = hbm_exhausted("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
                            "hbm. Used 20.5G of 15.75G hbm. Exceeded hbm capacity by 4.75G.")
    assert refusal["required"] == int(20.5 * GIB) and refusal["available"] == int(15.75 * GIB)
    assert hbm_exhausted("INTERNAL: something else") is None


def test_kernel_and_shard_map_flops_count_every_grid_step_and_shard():
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    def kernel(x_ref, y_ref, o_ref):
        o_ref[...] = x_ref[...] @ y_ref[...]

    def blocked_matmul(x, y):  # four grid steps, each a [64, 128] × [128, 64] block product
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((128, 128), jnp.float32), grid=(2, 2),
                              in_specs=[pl.BlockSpec((64, 128), lambda i, j: (i, 0)),
                                        pl.BlockSpec((128, 64), lambda i, j: (0, j))],
                              out_specs=pl.BlockSpec((64, 64), lambda i, j: (i, j)), interpret=True)(x, y)

    square = jax.ShapeDtypeStruct((128, 128), jnp.float32)
    assert matmul_flops(jax.make_jaxpr(blocked_matmul)(square, square).jaxpr) == (2 * 128 ** 3, False)
    # A shard_map body sees one device's rows; all 8 devices run it.
    mesh = jax.make_mesh((8,), ("rows",), axis_types=(AxisType.Explicit,))
    split = jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("rows")))
    whole = jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    per_shard = jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(PartitionSpec("rows"), PartitionSpec()),
                              out_specs=PartitionSpec("rows"))
    assert matmul_flops(jax.make_jaxpr(per_shard)(split, whole).jaxpr) == (2 * 128 ** 3, False)


def test_state_shardings_are_optaxs_without_running_the_optimizer():
    # The second code path: optax.tree_map_params with the optimizer itself, which runs its init eagerly on this CPU
    # mesh (fine here, impossible on compile-only TPU devices).
    import jax
    import optax

    from llama_jax.sharding import make_mesh, replicated
    from llama_jax.trainer import Trainer

    trainer = Trainer.create(MODEL_PRESETS["test"], load_config(REPO / "configs/tiny.yaml").optimizer, 10,
                             make_mesh(1, 4, 2))
    ours = trainer.state_shardings()
    eager = optax.tree_map_params(trainer.optimizer, lambda _, sharding: sharding, trainer.abstract_state().opt_state,
                                  trainer.param_shardings(), transform_non_params=lambda _: replicated(trainer.mesh))
    assert jax.tree.structure(ours.opt_state) == jax.tree.structure(eager)
    assert jax.tree.leaves(ours.opt_state) == jax.tree.leaves(eager)
    assert any(sharding.spec != () for sharding in jax.tree.leaves(ours.opt_state))  # mu, nu really are split
    # Under jax.set_mesh (where the eager path would place its zeros on the mesh), nothing is executed.
    with trainer.activation_sharding():
        assert jax.tree.leaves(trainer.state_shardings().opt_state) == jax.tree.leaves(eager)


def test_tpu_plan_errors_are_one_line():
    result = plan_program("configs/tiny.yaml", *SMALL, "--target", "v5p-128", timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --target 'v5p-128': expected tpu-GENERATION:TOPOLOGY with the chips along each axis, e.g. "
        "tpu-v5p:2x2x1 or tpu-v5e:4x4 (GENERATION one of v4, v5e, v5p, v6e; names such as v5p-128 are not accepted)"]
    result = plan_program("configs/tiny.yaml", *SMALL, "--target", "tpu-v5e:2x2", "--devices", "4", timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --devices is for GPU plans: --target tpu-v5e:2x2 plans its own chips"]
    result = plan_program("configs/tiny.yaml", *SMALL, "--target", "tpu-v5e:2x2", "--mesh", "1x8x1", timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: mesh data×fsdp×tensor = 1×8×1 = 8, but tpu-v5e:2x2 has 4 chips"]
    result = plan_program("configs/tiny.yaml", *SMALL, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --devices N (a GPU plan) or --target tpu-GENERATION:TOPOLOGY (a TPU plan) is needed"]


def test_a_tpu_plan_without_libtpu_names_the_extra(monkeypatch):
    from llama_jax import planner

    monkeypatch.setattr(planner, "libtpu_version", lambda: None)
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    with pytest.raises(ConfigError) as error:
        planner.tpu_devices(parse_target("tpu-v5e:2x2"))
    assert str(error.value) == ("--target tpu-v5e:2x2: the TPU compiler (libtpu) is not installed: "
                                "pip install -e '.[tpu]'")


@needs_libtpu
def test_a_tpu_plan_is_compiled_by_xla_tpu():
    # The `test` model at 4 sequences per chip; chunked attention (XLA operations), so the FLOPs are all visible.
    result = plan_program("configs/tiny.yaml", *SMALL, "model.attention_impl=chunked", "--target", "tpu-v5e:2x2",
                          "--json", "-", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""  # libtpu's warnings about the TPU VM environment do not reach the user
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    assert plan["compiler"].startswith("XLA:TPU (libtpu ") and plan["target"] == "tpu-v5e:2x2"
    assert plan["devices"] == 4 and plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}  # tiny.yaml: fsdp -1
    assert plan["attention"] == "chunked (XLA operations)"
    model, b = MODEL_PRESETS["test"], plan["bytes"]
    # The bytes are the TPU compiler's memory analysis: its arguments are the state and batch shards computed from
    # shapes and shardings, in XLA:TPU's tiled layouts (this model's 64-wide rows fill half of a 128-lane tile), and
    # the peak adds its outputs, temporaries and program code, less the donated state.
    exact = b["params"] + b["opt_state"] + b["batch"]
    assert exact < b["compiled_arguments"] < 4 * exact
    assert b["batch"] == 3 * (16 // 4) * 64 * 4
    assert b["program"] > 0 and b["peak"] == (b["compiled_arguments"] + b["compiled_outputs"]
                                              - b["compiled_aliased"] + b["compiled_temporaries"] + b["program"])
    # The limit is the compiler's own (the chip's 16 GiB less the TPU runtime's share), and this step is far within it.
    assert plan["hbm_bytes"] == 16 * GIB and 0.9 * 16 * GIB < plan["hbm_available_bytes"] < 16 * GIB
    assert plan["fits"] and b["peak"] < plan["hbm_available_bytes"] and "suggestion" not in plan
    # FLOPs from the traced step; the roofline and MFU are the arithmetic above on the report's own figures.
    assert plan["model_flops_per_step"] == model.flops_per_token(64) * 16 * 64
    assert 1.0 < plan["flops"]["executed_global"] / plan["model_flops_per_step"] < 1.5
    line = roofline(plan["flops"]["executed_global"] / 4, plan["flops"]["xla_bytes_accessed_per_device"],
                    TPU_CHIPS["v5e"])
    assert plan["roofline"] == line
    assert plan["predicted_mfu"] == pytest.approx(plan["model_flops_per_step"] / 4 / (line["step_seconds"] * 197e12))


@needs_libtpu
def test_a_tpu_plan_that_does_not_fit_gets_a_split_the_tpu_compiler_accepts():
    # A billion parameters, mostly a 2^20-token vocabulary: 16 bytes of state each are more than one v5e chip's HBM.
    result = plan_program("configs/tiny.yaml", *SMALL, "model.attention_impl=chunked", "model.vocab_size=1048576",
                          "model.dim=512", "model.ffn_hidden_dim=512", "--target", "tpu-v5e:1x1", "--json", "-",
                          timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    refusal, b = plan["bytes"]["hbm_exhausted"], plan["bytes"]
    assert not plan["fits"] and refusal["message"].startswith("RESOURCE_EXHAUSTED")
    assert refusal["available"] == plan["hbm_available_bytes"] < refusal["required"] == b["peak"]
    assert b["params"] == plan["parameters"] * 4 and b["compiled_arguments"] is None
    # The smallest group that fits by the estimate is fsdp=4, on the smallest v5e slice with 4 chips; XLA:TPU
    # compiled it and its memory analysis stays within the limit.
    suggestion = plan["suggestion"]
    assert suggestion["target"] == "tpu-v5e:2x2" and suggestion["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert suggestion["verified_fits"] and suggestion["verified_peak"] <= plan["hbm_available_bytes"]
