"""The device benchmark (scripts/bench_device.py) at a CPU size: its figures are the ones it says they are."""
import json

import pytest

from llama_jax.config import ModelConfig
from scripts import bench_device


@pytest.mark.parametrize("kind, tflops", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                          ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                          ("NVIDIA L4", 121.0), ("cpu", None)])
def test_published_peaks_by_device_kind(kind, tflops):
    assert bench_device.published_peak(kind) == (None if tflops is None else tflops * 1e12)


def test_tiny_run_reports_consistent_figures(tmp_path):
    out = tmp_path / "result.json"
    assert bench_device.main(["--config", "tiny-cpu", "--steps", "2", "--warmup", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    bench = bench_device.BENCHES["tiny-cpu"]
    config = ModelConfig(**bench.model)
    tokens_per_step = result["global_batch"] * result["seq_len"]
    assert result["global_batch"] == bench.batch_per_device * result["devices"]
    assert result["tokens_per_sec_per_device"] == pytest.approx(
        tokens_per_step / result["step_seconds"] / result["devices"])
    assert result["mfu"] == pytest.approx(
        config.flops_per_token(bench.seq_len) * result["tokens_per_sec_per_device"] / result["peak_flops_per_device"])
    assert result["model_params"] == config.num_params()
    assert result["peak_source"].startswith("measured") and result["peak_memory_bytes"] > 0


def test_bad_sizes_are_one_clear_error():
    with pytest.raises(bench_device.ConfigError, match=r"^--seq-len 0 is not allowed"):
        bench_device.main(["--config", "tiny-cpu", "--seq-len", "0"])
