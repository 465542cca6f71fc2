"""Cheap checks of the measurement helpers' arithmetic and plumbing (no timing assertions: the machine is shared)."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from llama_jax import perf
from llama_jax.config import MODEL_PRESETS


def test_median_odd_even_and_empty():
    assert perf.median([3.0, 1.0, 2.0]) == 2.0
    assert perf.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError):
        perf.median([])


def test_matmul_flops_counts_multiply_and_add():
    assert perf.matmul_flops(2, 3, 4) == 48.0


def test_tokens_per_second_and_mfu_by_hand():
    # bench-S: 8 × 1024 tokens in 8.192 s is 1,000 tokens/s.
    rate = perf.tokens_per_second(8 * 1024, 8.192)
    assert rate == pytest.approx(1000.0)
    # 290 MFLOP/token at 1,000 tokens/s against a 580 GFLOP/s ceiling is 50%.
    assert perf.model_flops_utilisation(290e6, rate, 580e9) == pytest.approx(0.5)


def test_bench_s_flops_per_token_by_hand():
    config = MODEL_PRESETS["bench-s"]
    attention = 512 * 64 * (2 * 8 + 2 * 4)  # q, o: 8 heads; k, v: 4 kv heads; head_dim 64
    matmul_params = 8 * (attention + 3 * 512 * 1408) + 32000 * 512
    assert config.flops_per_token(1024) == 6 * matmul_params + 12 * 8 * 512 * 1024


def test_rate_from_timings_uses_the_median():
    assert perf.rate_from_timings(100.0, [1.0, 2.0, 100.0]) == 50.0


def test_time_call_with_cpu_returns_non_negative_pair():
    wall, cpu = perf.time_call_with_cpu(lambda: sum(range(1000)))
    assert wall >= 0 and cpu >= 0


def test_xla_ceiling_is_positive_and_finite_for_a_tiny_matmul():
    for dtype in ("bfloat16", "float32"):
        rate = perf.measure_matmul_ceiling(dtype, size=64, repeats=2)
        assert math.isfinite(rate) and rate > 0


def test_torch_ceiling_is_positive_and_finite_for_a_tiny_matmul():
    rate = perf.measure_torch_matmul_ceiling("bfloat16", size=64, repeats=2)
    assert math.isfinite(rate) and rate > 0


# Spawned from a lean launcher, since a child's peak starts at its spawner's high-water mark (pytest's is large).
PEAK_RSS_LAUNCHER = """
import importlib.util, subprocess, sys
spec = importlib.util.spec_from_file_location("perf", sys.argv[1])
perf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(perf)
touch = "b = bytearray({size}); b[::4096] = b'x' * len(b[::4096])"
for size in (200 << 20, 1 << 20):
    child = subprocess.Popen([sys.executable, "-c", touch.format(size=size)])
    print(*perf.wait_with_peak_rss(child))
"""


def test_peak_rss_of_a_child_counts_its_own_allocation():
    """os.wait4 reports each child's own peak: one touching 200 MiB peaks above that, its sibling far below."""
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_LAUNCHER, perf.__file__], capture_output=True, text=True,
                          check=True)
    (big_status, big_rss), (small_status, small_rss) = (map(int, line.split()) for line in done.stdout.splitlines())
    assert big_status == small_status == 0
    assert big_rss > 200 << 20
    assert small_rss < 100 << 20


def test_format_bytes():
    assert perf.format_bytes(0) == "0 B"
    assert perf.format_bytes(512) == "512 B"
    assert perf.format_bytes(3 * 1024 ** 3) == "3.0 GiB"


def test_bench_summary_arithmetic_and_table():
    """scripts.bench's report from made-up measurements: tokens/s from the median step, MFU, ours/peer ratios."""
    from scripts.bench import BenchSpec, SideResult, format_table, summarise

    spec = BenchSpec(config="bench-s", seq_len=1024, batch=8, dtype="bfloat16", remat="full", attention_chunk=None,
                     attention_impl=None, loss_chunk=None, model={"attention_chunk": 512}, flops_per_token=290e6)
    ours = SideResult(info={"trace_lower_seconds": 2.0, "compile_seconds": 8.0}, ready_seconds=20.0,
                      warmup_seconds=[30.0], step_seconds=[8.192, 9.0, 7.0], step_cpu_seconds=[16.0, 17.0, 15.0],
                      losses=[10.0, 9.9, 9.8], ceilings=[580e9, 500e9, 600e9],
                      finish={"peak_rss_bytes": 3 << 30})
    peer = SideResult(info={}, ready_seconds=5.0, warmup_seconds=[12.0], step_seconds=[4.096, 4.0, 5.0],
                      step_cpu_seconds=[8.0, 8.0, 9.0], losses=[10.0, 9.5, 9.0], ceilings=[700e9],
                      finish={"peak_rss_bytes": 6 << 30})
    summary = summarise(spec, {"ours": ours, "peer": peer})
    assert summary["sides"]["ours"]["tokens_per_second"] == pytest.approx(1000.0)  # 8192 tokens / 8.192 s
    assert summary["sides"]["peer"]["tokens_per_second"] == pytest.approx(2000.0)
    assert summary["sides"]["ours"]["mfu_vs_xla_ceiling"] == pytest.approx(0.5)  # 290 GFLOP/s of 580
    assert summary["sides"]["ours"]["compile_seconds"] == 10.0
    assert summary["ours_over_peer"] == pytest.approx({"tokens_per_second": 0.5, "peak_rss": 0.5,
                                                       "cpu_seconds_per_step": 2.0})
    table = format_table(summary)
    assert "ours/peer" in table and "1,000" in table and "50.0%" in table


@pytest.mark.parametrize("bf16_rate, usable", [(1.4e9, False), (19e9, False), (21e9, True), (400e9, True)])
def test_bench_refuses_a_bfloat16_peer_without_bfloat16_arithmetic(bf16_rate, usable):
    """A CPU whose torch bf16 matmul is under a quarter of its f32 rate (80 GFLOP/s here) gets one clear error."""
    from scripts.bench import BenchError, check_torch_bfloat16

    class MadeUpRates:
        @staticmethod
        def measure_torch_matmul_ceiling(dtype, size, repeats):
            return {"bfloat16": bf16_rate, "float32": 80e9}[dtype]

    if usable:
        check_torch_bfloat16(MadeUpRates())
    else:
        with pytest.raises(BenchError, match=r"--dtype float32"):
            check_torch_bfloat16(MadeUpRates())


def test_bench_stops_with_the_peers_reason_when_it_cannot_run(monkeypatch, tmp_path):
    """A child that answers 'unusable' ends the run with its reason, and the children already started are killed."""
    import scripts.bench as bench

    started = []

    class FakeChild:
        def __init__(self, role, spec, log_dir):
            self.role, self.killed = role, False
            self.process = self
            started.append(self)

        def request(self, command):
            if self.role == "peer":
                return {"event": "unusable", "reason": "no bfloat16 here; --dtype float32"}
            return {"event": "ready"}

        def kill(self):
            self.killed = True

        def wait(self):
            return -9

    monkeypatch.setattr(bench, "Child", FakeChild)
    spec = bench.BenchSpec(config="bench-s", seq_len=1024, batch=8, dtype="bfloat16", remat="full",
                           attention_chunk=None, attention_impl=None, loss_chunk=None)
    with pytest.raises(bench.BenchError, match=r"^peer: no bfloat16 here; --dtype float32$"):
        bench.run_lockstep(spec, ["ours", "peer"], 1, 1, tmp_path, lambda text: None)
    assert [child.killed for child in started] == [True, True]
