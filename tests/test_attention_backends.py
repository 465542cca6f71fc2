"""The GPU and TPU attention kernels (llama_jax/attention/gpu.py, tpu.py) and how `attention` chooses among backends.

- Numerics on CPU: splash and the Pallas GPU kernel in Pallas interpret mode, and the cudnn path's
  `jax.nn.dot_product_attention` call with implementation="xla" — what `attention` runs for a kernel named in a
  program for CPU devices — against the float32 reference `attend`: values and dq/dk/dv, grouped-query heads, packed
  documents (perturbing one document changes no other document's outputs), and sharded over a 2x2x2 mesh.
- `implementation`: `auto` by the platform of the mesh's devices (faked with an abstract mesh), never cuDNN for a
  mask with segment ids, fallbacks with one warning per shape, and one-line errors for a named kernel that cannot run.
- Lowering: the whole jitted train step (forward, backward, AdamW; shardings on 8 simulated CPU devices) traced for
  cuda with each GPU choice and for tpu with splash contains the fused-attention custom calls and no CPU kernel, and
  `save_attention_out` keeps the kernels' forward out of the backward pass; with libtpu installed the step is also
  compiled by XLA:TPU for a v5e:2x2 topology (skipped, with the reason, without it).
"""
from __future__ import annotations

import contextlib
import re
import warnings
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from llama_jax.attention import AttentionMask, attend, attention, compiling_for, gpu, implementation
from llama_jax.attention.shards import mesh_platform, target_platform
from llama_jax.config import ModelConfig, OptimizerConfig
from llama_jax.errors import ConfigError, KernelError
from llama_jax.sharding import activation_sharding, make_mesh

BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM = 2, 256, 4, 2, 64
DOCUMENT_BOUNDS = (0, 96, 160, 224)  # row 0: documents 1-3 (not aligned to the 128-token blocks), then padding (0)
CUDNN_CALLS = {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}
TRITON_CALL = "__gpu$xla.gpu.triton"
TPU_CALL = "tpu_custom_call"
CPU_KERNEL = "llama_jax_flash_attention"

pytestmark = pytest.mark.filterwarnings("ignore:model.attention_impl=.* runs emulated")


def _config(impl: str, dtype: str = "float32", **changes) -> ModelConfig:
    fields = dict(vocab_size=256, dim=HEADS * HEAD_DIM, n_layers=2, n_heads=HEADS, n_kv_heads=KV_HEADS,
                  ffn_hidden_dim=512, max_seq_len=LENGTH, dtype=dtype, attention_impl=impl, splash_block_q=128,
                  splash_block_kv=128)
    return ModelConfig(**{**fields, **changes})


def _mask(documents: bool, batch: int = BATCH, length: int = LENGTH) -> AttentionMask:
    """Causal only (no segment ids), or row 0 packing three documents and padding while row 1 holds one document."""
    slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if not documents:
        return AttentionMask(slots, None, slots, None)
    first = np.zeros(length, np.int32)
    for segment, (start, end) in enumerate(zip(DOCUMENT_BOUNDS[:-1], DOCUMENT_BOUNDS[1:]), start=1):
        first[start:end] = segment
    segments = jnp.asarray(np.stack([first] + [np.ones(length, np.int32)] * (batch - 1)))
    return AttentionMask(slots, segments, slots, segments)


def _inputs(dtype, seed: int = 0, length: int = LENGTH):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (BATCH, length, HEADS, HEAD_DIM), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (BATCH, length, KV_HEADS, HEAD_DIM), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (BATCH, length, KV_HEADS, HEAD_DIM), jnp.float32).astype(dtype)
    return q, k, v, jax.random.normal(keys[3], q.shape, jnp.float32).astype(dtype)


def _relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _reference(q, k, v, mask, cotangent):
    """Output and dq, dk, dv of the float32 reference `attend`, on the same (rounded) inputs."""
    as32 = [x.astype(jnp.float32) for x in (q, k, v, cotangent)]
    out, pullback = jax.vjp(lambda q_, k_, v_: attend(q_, k_, v_, mask.dense()), *as32[:3])
    return out, pullback(as32[3])


# ── Numerics on CPU ──────────────────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("impl, dtype, documents, mesh", [
    ("pallas", jnp.float32, True, None), ("pallas", jnp.float32, False, None), ("pallas", jnp.bfloat16, True, None),
    ("splash", jnp.float32, True, None), ("splash", jnp.float32, False, None), ("splash", jnp.bfloat16, True, None),
    ("cudnn", jnp.bfloat16, False, None),  # (float16: XLA:CPU has no float16 products to emulate it with)
    ("pallas", jnp.float32, True, (2, 2, 2)), ("splash", jnp.float32, True, (2, 2, 2)),
    ("cudnn", jnp.bfloat16, False, (2, 2, 2)),
])
def test_kernel_values_and_gradients_match_the_float32_reference(impl, dtype, documents, mesh):
    q, k, v, cotangent = _inputs(dtype)
    mask, config = _mask(documents), _config(impl, jnp.dtype(dtype).name)

    def ours(q_, k_, v_):
        return attention(q_, k_, v_, mask, config)

    context = activation_sharding(make_mesh(*mesh)) if mesh else contextlib.nullcontext()
    with context:
        assert implementation(config, q, k, mask) == impl
        if mesh:  # batch over data, query and kv heads over tensor: the kernel runs per shard
            assert "shard_map" in str(jax.make_jaxpr(ours)(q, k, v))
        out, pullback = jax.vjp(jax.jit(ours), q, k, v)
        grads = pullback(cotangent)
    ref_out, ref_grads = _reference(q, k, v, mask, cotangent)
    tolerance = 1e-5 if dtype == jnp.float32 else 3e-2
    assert out.dtype == dtype and out.shape == q.shape
    assert _relative_error(out, ref_out) < tolerance
    for grad, ref, primal in zip(grads, ref_grads, (q, k, v)):
        assert grad.dtype == primal.dtype and grad.shape == primal.shape
        assert _relative_error(grad, ref) < tolerance


@pytest.mark.parametrize("impl", ["pallas", "splash"])
def test_packed_documents_never_see_each_other(impl):
    """Perturbing document 2 of row 0 changes no other document's outputs, and a loss on document 1 alone gives the
    keys and values of every other document exactly zero gradient."""
    q, k, v, cotangent = _inputs(jnp.float32)
    mask, config = _mask(True), _config(impl)
    run = jax.jit(lambda q_, k_, v_: attention(q_, k_, v_, mask, config))
    start, end = DOCUMENT_BOUNDS[1], DOCUMENT_BOUNDS[2]
    noise = _inputs(jnp.float32, seed=1)
    perturbed = [x.at[0, start:end].add(n[0, start:end]) for x, n in zip((q, k, v), noise)]
    before, after = np.asarray(run(q, k, v)), np.asarray(run(*perturbed))
    others = np.ones((BATCH, LENGTH), bool)
    others[0, start:end] = False
    np.testing.assert_array_equal(before[others], after[others])
    assert np.abs(before[0, start:end] - after[0, start:end]).max() > 0.1

    only_first = jnp.zeros_like(cotangent).at[0, :start].set(cotangent[0, :start])
    _, pullback = jax.vjp(run, q, k, v)
    _, grad_k, grad_v = pullback(only_first)
    for grad in (grad_k, grad_v):
        assert float(jnp.abs(grad[0, start:]).max()) == 0.0 and float(jnp.abs(grad[1]).max()) == 0.0
        assert float(jnp.abs(grad[0, :start]).max()) > 0.0


# ── Choosing an implementation ───────────────────────────────────────────────────────────────────────────────────
def _abstract_mesh(platform: str) -> AbstractMesh:
    kinds = {"gpu": "NVIDIA H100 80GB HBM3", "tpu": "TPU v5p", "cpu": "cpu"}
    device = AbstractDevice(device_kind=kinds[platform], num_cores=None, platform=platform)
    return AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,), abstract_device=device)


def _shapes(dtype, length: int = LENGTH, batch: int = BATCH):
    return (jax.ShapeDtypeStruct((batch, length, HEADS, HEAD_DIM), dtype),
            jax.ShapeDtypeStruct((batch, length, KV_HEADS, HEAD_DIM), dtype))


@pytest.fixture
def cudnn_present(monkeypatch):
    """cuDNN's version as a GPU host reports it: jax asks the CUDA libraries, which this CPU host lacks."""
    monkeypatch.setattr(gpu.cudnn_attention, "check_cudnn_version", lambda: 90800)


@pytest.mark.parametrize("platform, documents, dtype, expected", [
    ("tpu", False, jnp.bfloat16, "splash"), ("tpu", True, jnp.bfloat16, "splash"),
    ("gpu", False, jnp.bfloat16, "cudnn"), ("gpu", True, jnp.bfloat16, "pallas"),
    ("gpu", True, jnp.float16, "pallas"), ("gpu", False, jnp.float32, "pallas"),  # cuDNN: bf16/fp16 only
])
def test_auto_follows_the_platform_of_the_mesh_not_the_default_backend(monkeypatch, cudnn_present, platform,
                                                                         documents, dtype, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu" if platform != "cpu" else "gpu")
    q, k = _shapes(dtype)
    with jax.sharding.use_abstract_mesh(_abstract_mesh(platform)), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float32 case warns that cuDNN cannot take it
        assert mesh_platform() == target_platform() == platform
        assert implementation(_config("auto"), q, k, _mask(documents)) == expected


def test_auto_on_cpu_devices_and_outside_a_mesh(monkeypatch):
    q, k = _shapes(jnp.float32)
    from llama_jax.attention import cpu
    expected = "flash_cpu" if cpu.unavailable_reason() is None else "chunked"
    with activation_sharding(make_mesh(1, 8, 1)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the mesh's devices decide, not this
        assert mesh_platform() == "cpu" and implementation(_config("auto"), q, k, _mask(True)) == expected
    assert mesh_platform() == "gpu"  # outside a mesh: the default backend
    monkeypatch.undo()
    with jax.sharding.use_abstract_mesh(_abstract_mesh("tpu")):
        assert cpu.flash_attention_supports(q, k) == "the kernel is for CPU, not tpu"
    with compiling_for("cuda"):
        assert target_platform() == "gpu" and mesh_platform() == "cpu"
    with pytest.raises(ValueError, match="compiling_for"):
        with compiling_for("metal"):
            pass


def test_cudnn_is_never_chosen_for_segment_ids_and_refuses_them_when_named(cudnn_present):
    q, k = _shapes(jnp.bfloat16)
    with compiling_for("gpu"):
        assert implementation(_config("auto"), q, k, _mask(False)) == "cudnn"
        assert implementation(_config("auto"), q, k, _mask(True)) == "pallas"
        with pytest.raises(KernelError, match=r"^model.attention_impl=cudnn cannot run here: the batch has segment "
                                              r"ids .* it would attend across documents; use pallas"):
            implementation(_config("cudnn"), q, k, _mask(True))
    # The same in a CPU program (emulated cuDNN), and from the model: a packed batch never reaches cuDNN.
    from flax import nnx

    from llama_jax.model import Llama
    model = Llama(_config("cudnn", "bfloat16", n_layers=1), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((BATCH, LENGTH), jnp.int32)
    assert model(tokens).shape == (BATCH, LENGTH, 256)  # no segment ids: one document per row
    with pytest.raises(KernelError, match="model.attention_impl=cudnn cannot run here: the batch has segment ids"):
        model(tokens, segment_ids=_mask(True).query_segments)


def test_auto_falls_back_with_one_warning_per_shape():
    q, k = _shapes(jnp.bfloat16, length=200, batch=3)  # shapes no other test uses: a warning is given once per shape
    with compiling_for("gpu"):
        expected = (r"^model.attention_impl=auto runs dense for q \[3, 200, 4, 64\] bfloat16 on gpu "
                    r"\(pallas: sequence length 200 is not a multiple of 128 \(the Pallas GPU kernel's block\)\)$")
        with pytest.warns(UserWarning, match=expected):
            assert implementation(_config("auto"), q, k, _mask(True, 3, 200)) == "dense"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert implementation(_config("auto"), q, k, _mask(True, 3, 200)) == "dense"
    with compiling_for("tpu"), pytest.warns(UserWarning, match=r"runs chunked .* \(splash: sequence length 300 is"):
        q, k = _shapes(jnp.bfloat16, length=300, batch=3)
        assert implementation(_config("auto"), q, k, _mask(True, 3, 300)) == "chunked"


@pytest.mark.parametrize("impl, platform, length, dtype, changes, message", [
    ("cudnn", "gpu", 256, jnp.float32, {}, "dtype float32 (cuDNN flash attention takes bfloat16 or float16)"),
    ("pallas", "gpu", 200, jnp.bfloat16, {}, "sequence length 200 is not a multiple of 128 (the Pallas GPU kernel"),
    ("splash", "tpu", 384, jnp.bfloat16, {"splash_block_q": 256},
     "sequence length 384 is not a multiple of model.splash_block_q=256 and model.splash_block_kv=128"),
    ("splash", "tpu", 256, jnp.float16, {}, "dtype float16 (splash attention takes bfloat16 or float32)"),
    ("splash", "gpu", 256, jnp.bfloat16, {}, "splash is a TPU kernel and the mesh's devices are gpu"),
    ("pallas", "tpu", 256, jnp.bfloat16, {}, "pallas is a GPU kernel and the mesh's devices are tpu"),
    ("flash_cpu", "tpu", 256, jnp.float32, {}, "the kernel is for CPU, not tpu"),
])
def test_a_named_kernel_that_cannot_run_is_a_one_line_error(impl, platform, length, dtype, changes, message):
    q, k = _shapes(dtype, length=length)
    with compiling_for(platform), pytest.raises(KernelError) as error:
        implementation(_config(impl, **changes), q, k, _mask(False, length=length))
    assert str(error.value).startswith(f"model.attention_impl={impl} cannot run here: ")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_cudnn_named_without_cudnn_libraries_is_a_one_line_error():
    try:
        gpu.cudnn_attention.check_cudnn_version()
        pytest.skip("cuDNN is installed here")
    except RuntimeError:
        pass
    q, k = _shapes(jnp.bfloat16)
    with compiling_for("cuda"), pytest.raises(KernelError, match=r"^model.attention_impl=cudnn cannot run here: "
                                                                  r"cuDNN is not available here \(cuDNN is not "):
        implementation(_config("cudnn"), q, k, _mask(False))


def test_attention_config_keys_are_validated():
    for key in ("splash_block_q", "splash_block_kv"):
        for bad in (0, 100, -128):
            with pytest.raises(ConfigError, match=rf"^model.{key}={bad} is not allowed: expected a positive multiple "
                                                  r"of 128$"):
                ModelConfig(**{key: bad})
    with pytest.raises(ConfigError, match=r"model.attention_impl='flash' .*'cudnn', 'pallas', 'splash'"):
        ModelConfig(attention_impl="flash")
    from llama_jax.config import load_config
    overrides = ["model=tiny", "train.seq_len=256", "model.attention_impl=splash", "model.splash_block_kv=1024"]
    model = load_config(None, overrides).model
    assert (model.attention_impl, model.splash_block_q, model.splash_block_kv) == ("splash", 512, 1024)


# ── Lowering the whole train step ────────────────────────────────────────────────────────────────────────────────
def _train_step_program(config: ModelConfig, mesh, documents: bool, platform: str | None):
    """The jitted train step traced with abstract arguments (nothing allocated) under the trainer's mesh and rules,
    and lowered for `platform` (None: the mesh's own)."""
    from llama_jax.trainer import Trainer

    trainer = Trainer.create(config, OptimizerConfig(), 10, mesh)
    shape = (4, LENGTH)
    state = trainer.restore_target()
    keys = ("inputs", "targets", "loss_mask") + (("segment_ids", "positions") if documents else ())
    batch = {key: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=trainer.batch_shardings(shape)) for key in keys}
    jitted = trainer.jit_step(shape).__wrapped__  # the jax.jit object under the trainer's rules wrapper
    with trainer.activation_sharding():
        if platform is None:
            return jitted.trace(state, batch).lower()
        with compiling_for(platform):
            return jitted.trace(state, batch).lower(lowering_platforms=(platform,))


def _custom_calls(lowered) -> Counter:
    return Counter(re.findall(r"custom_call @([\w$.\-]+)", lowered.as_text()))


@pytest.mark.parametrize("impl, documents, platform, kernels", [
    ("cudnn", False, "cuda", CUDNN_CALLS), ("pallas", True, "cuda", {TRITON_CALL}),
    ("pallas", False, "cuda", {TRITON_CALL}), ("auto", False, "cuda", CUDNN_CALLS),
    ("auto", True, "cuda", {TRITON_CALL}), ("splash", True, "tpu", {TPU_CALL}), ("auto", False, "tpu", {TPU_CALL}),
])
def test_the_train_step_lowers_with_the_fused_attention_kernel(cudnn_present, impl, documents, platform, kernels):
    lowered = _train_step_program(_config(impl, "bfloat16"), make_mesh(2, 2, 2), documents, platform)
    calls = _custom_calls(lowered)
    assert kernels <= set(calls), calls
    others = (CUDNN_CALLS | {TRITON_CALL, TPU_CALL}) - kernels
    assert not others & set(calls) and not any(CPU_KERNEL in call for call in calls), calls
    text = lowered.as_text()
    if TRITON_CALL in kernels:  # the segment-aware kernel when documents are masked, its backward kernels too
        assert all(name in text for name in ("mha_forward", "mha_preprocess_backward", "mha_backward"))
    if TPU_CALL in kernels:
        segmented = "_segmented" if documents else ""
        for kernel in ("fwd", "dq", "dkv"):
            assert re.search(rf"splash_mha_{kernel}{segmented}_(no_)?residuals", text), kernel


@pytest.mark.parametrize("impl, documents, platform, kernel", [
    ("cudnn", False, "cuda", "__cudnn$fmhaSoftmax"), ("pallas", True, "cuda", TRITON_CALL),
    ("splash", True, "tpu", TPU_CALL),
])
def test_save_attention_out_keeps_the_kernel_forward_out_of_the_backward_pass(cudnn_present, impl, documents,
                                                                               platform, kernel):
    """Under `full` the backward pass reruns each block's attention forward kernel; under `save_attention_out` the
    kernel's output and log-normaliser are saved and it does not (one forward call fewer in the program)."""
    counts = {policy: _custom_calls(_train_step_program(_config(impl, "bfloat16", remat_policy=policy),
                                                        make_mesh(1, 4, 2), documents, platform))[kernel]
              for policy in ("full", "save_attention_out")}
    assert counts["full"] == counts["save_attention_out"] + 1, counts


def test_our_kernel_vjps_lower_to_the_kernels_own(cudnn_present):
    """Our custom VJPs, which name the residuals, call the kernels' forward and backward rules exactly as the kernels'
    own VJPs do: the same custom calls with the same configurations (Triton's kernel IR aside, which embeds the
    source locations of its callers)."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu
    q, k = _shapes(jnp.bfloat16)
    segments = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)

    def calls(attend_fn, *args):
        def loss(q_, k_, v_, *rest):
            return jnp.sum(attend_fn(q_, k_, v_, *rest).astype(jnp.float32))
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, *args).lower(
            lowering_platforms=("cuda",)).as_text()
        return [re.sub(r'ir = "[^"]*"', "ir", re.sub(r"%[\w#:]+", "%", line.strip()))
                for line in text.splitlines() if "custom_call" in line]

    ours = calls(gpu._cudnn_causal)
    assert ours and ours == calls(lambda *a: jax.nn.dot_product_attention(*a, is_causal=True, implementation="cudnn"))
    q, k = _shapes(jnp.bfloat16)
    k = q  # the Pallas kernel takes equal heads
    ours = calls(lambda q_, k_, v_, s: gpu._pallas_mha(q_, k_, v_, s, False), segments)
    theirs = calls(lambda q_, k_, v_, s: pallas_gpu.mha(q_, k_, v_, s, sm_scale=HEAD_DIM ** -0.5, causal=True),
                   segments)
    assert len(ours) == 3 and ours == theirs


# ── XLA:TPU, where libtpu is installed ───────────────────────────────────────────────────────────────────────────
def _tpu_topology(name: str):
    try:
        import libtpu  # noqa: F401  (the TPU compiler; an optional extra: pip install -e '.[tpu]')
    except ImportError:
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler for the deviceless compile")
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(topology_name=name, platform="tpu")
    except Exception as error:  # noqa: BLE001  (libtpu present but unusable here)
        pytest.skip(f"libtpu cannot describe TPU topology {name} here: {str(error).splitlines()[0]}")


def test_the_train_step_compiles_for_a_tpu_topology_with_splash():
    topology = _tpu_topology("v5e:2x2")
    mesh = make_mesh(1, 2, 2, devices=topology.devices)
    lowered = _train_step_program(_config("auto", "bfloat16", remat_policy="save_attention_out"), mesh,
                                  documents=True, platform=None)  # auto: the mesh's devices are TPUs → splash
    calls = _custom_calls(lowered)
    assert calls[TPU_CALL] == 3 and not any(CPU_KERNEL in call for call in calls), calls
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    assert memory.argument_size_in_bytes > 0 and memory.temp_size_in_bytes >= 0
