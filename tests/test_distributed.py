"""Multi-process training on one machine: 2 processes × 4 simulated CPU devices against 1 process × 8 devices.

Every run is the real program (`python -m train.pretrain`), the 2-process ones started by scripts/local_cluster.sh
or, where a test needs the PIDs, directly with the same arguments. Processes meet on a free 127.0.0.1 port and are
only ever stopped by PID.

The learning rate is constant after a 2-step warmup (optimizer.min_lr_ratio=1), so a 10-step run and a 15-step run
see the same schedule and a run resumed from a 10-step run's checkpoint must continue the 15-step reference exactly.

What is shown: 2 × 4 devices give the 1 × 8 losses (10 steps, float32, rtol 1e-5); a checkpoint written by 2 processes
resumes in 1 process, and (after one of 2 processes was SIGKILLed mid-run) in a fresh 2-process run; a killed or hung
peer ends the other process with a non-zero status within KILL_EXIT_BOUND_SECONDS.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llama_jax.config import DistributedConfig
from llama_jax.distributed import detect_cluster, initialize, local_device_ids
from llama_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
HEARTBEAT_SECONDS = 5
# From SIGKILL of one process to the other's exit: the heartbeat timeout plus slack for a loaded 2-core machine.
# Measured here: 2-6 s when the killed process is process 1 (heartbeats), under 1 s when it is process 0 (its
# coordination service goes with it).
KILL_EXIT_BOUND_SECONDS = HEARTBEAT_SECONDS + 15


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module's single-process runs (compiling is most of a tiny run's time
    on 2 cores). Not for multi-process runs: JAX writes the cache from process 0 only and the other processes' keys
    differ, so process 0 alone gets hits, races ahead, and gloo's fixed 30 s rendezvous ends the run."""
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, compile_cache):
    from llama_jax.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("corpus")
    (root / "train.txt").write_text("\n".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps over {i % 5} dogs"
                                              for i in range(600)))
    (root / "valid.txt").write_text("\n".join(f"line {i}: the quick brown fox {i * 3 % 11} jumps" for i in range(60)))
    tokenizer = train_sentencepiece([root / "train.txt"], root / "tok.model", vocab_size=300)
    return root, Path(tokenizer.path), compile_cache


def program_args(corpus, run_dir, steps, *extra):
    root, tokenizer, _ = corpus
    return ["configs/tiny.yaml", "model=test", "model.vocab_size=320", "model.dtype=float32", "train.batch_size=8",
            "train.seq_len=32", f"train.steps={steps}", "train.log_every_steps=1", "train.peak_tflops=1",
            "optimizer.lr=1e-2", "optimizer.warmup_steps=2", "optimizer.min_lr_ratio=1.0", "eval.every_steps=1000",
            "eval.batches=1", "checkpoint.every_steps=5", f"data.path={root / 'train.txt'}",
            f"data.valid_path={root / 'valid.txt'}", f"data.tokenizer={tokenizer}", f"run_dir={run_dir}",
            f"distributed.heartbeat_timeout_seconds={HEARTBEAT_SECONDS}", *extra]


def environment(corpus, tmp_path, devices, compile_cache=False):
    flags = " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                     if "xla_force_host_platform_device_count" not in flag)
    env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
           "JAX_PLATFORMS": "cpu", "LLAMA_JAX_CACHE": str(tmp_path / "cache"), "PYTHON": sys.executable,
           "PYTHONUNBUFFERED": "1"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if compile_cache:
        env.update(JAX_COMPILATION_CACHE_DIR=str(corpus[2]), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return env


def one_process(corpus, tmp_path, args, timeout=600):
    return subprocess.run([sys.executable, "-m", "train.pretrain", *args], cwd=REPO,
                          env=environment(corpus, tmp_path, 8, compile_cache=True), capture_output=True, text=True,
                          timeout=timeout)


def local_cluster(corpus, tmp_path, args, processes=2, timeout=600):
    return subprocess.run(["scripts/local_cluster.sh", str(processes), *args], cwd=REPO,
                          env=environment(corpus, tmp_path, 8), capture_output=True, text=True, timeout=timeout)


def start_two_processes(corpus, tmp_path, args):
    """The two processes of a local cluster started directly (their PIDs known); output in process<i>.log."""
    port = free_port()
    env = environment(corpus, tmp_path, 4)
    processes = []
    for i in range(2):
        with open(tmp_path / f"process{i}.log", "w") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "train.pretrain", *args, f"distributed.coordinator_address=127.0.0.1:{port}",
                 "distributed.num_processes=2", f"distributed.process_id={i}"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return processes


def stop(processes):
    for p in processes:
        if p.poll() is None:
            p.kill()  # by PID (Popen.kill sends SIGKILL to this child only)
            p.wait()


def wait_for(condition, processes, tmp_path, what, timeout=600):
    deadline = time.monotonic() + timeout
    while not condition():
        assert all(p.poll() is None for p in processes), (tmp_path / "process0.log").read_text()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def losses(run_dir):
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["loss"] for record in records}


def checkpoint_steps(run_dir):
    directory = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """15 steps in one process with 8 simulated devices."""
    tmp_path = tmp_path_factory.mktemp("reference")
    result = one_process(corpus, tmp_path, program_args(corpus, tmp_path / "run", 15))
    assert result.returncode == 0, result.stderr[-3000:]
    curve = losses(tmp_path / "run")
    assert sorted(curve) == list(range(1, 16)) and curve[15] < curve[1]
    return curve


@pytest.fixture(scope="module")
def two_process_run(corpus, tmp_path_factory):
    """10 steps in 2 processes × 4 devices (scripts/local_cluster.sh): metrics and checkpoints at steps 5 and 10."""
    tmp_path = tmp_path_factory.mktemp("two")
    result = local_cluster(corpus, tmp_path, program_args(corpus, tmp_path / "run", 10))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "run", result


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_all_devices(reference, two_process_run):
    run_dir, result = two_process_run
    assert "2 processes × 4 CPU devices" in result.stderr
    assert "distributed: 2 processes × 4 CPU devices = 8 devices" in result.stderr
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 11))  # one metrics line per step: only process 0 writes
    np.testing.assert_allclose([curve[s] for s in range(1, 11)], [reference[s] for s in range(1, 11)], rtol=1e-5)
    # Only process 0 writes metrics, TensorBoard and progress.
    assert "[0] validation loss" in result.stdout and "[1] validation loss" not in result.stdout
    assert "train:" not in "".join(line for line in result.stderr.splitlines() if line.startswith("[1]"))
    assert checkpoint_steps(run_dir) == [5, 10]


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process(reference, two_process_run, corpus, tmp_path):
    """(Resuming the same checkpoint in a fresh 2-process run is the last part of the kill test below.)"""
    written, _ = two_process_run
    run_dir = tmp_path / "run"
    shutil.copytree(written, run_dir)
    result = one_process(corpus, tmp_path, program_args(corpus, run_dir, 15))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / '10'} (step 10 of 15" in result.stderr
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 16))
    np.testing.assert_allclose([curve[s] for s in range(11, 16)], [reference[s] for s in range(11, 16)], rtol=1e-5)


@pytest.mark.slow
def test_killing_one_process_stops_the_other_and_both_resume(reference, corpus, tmp_path):
    run_dir = tmp_path / "run"
    processes = start_two_processes(corpus, tmp_path, program_args(corpus, run_dir, 15,
                                                                    "debug.step_sleep_seconds=0.5"))
    try:
        wait_for(lambda: (run_dir / "checkpoints").is_dir() and 5 in checkpoint_steps(run_dir), processes, tmp_path,
                 "the checkpoint at step 5")
        victim, survivor = processes[1], processes[0]
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        # A survivor that hangs fails the test by this timeout; how fast it exits is a figure, printed below.
        status = survivor.wait(timeout=KILL_EXIT_BOUND_SECONDS + 60)
        elapsed = time.monotonic() - killed_at
    finally:
        stop(processes)
    log = (tmp_path / "process0.log").read_text()
    assert status != 0, log[-3000:]
    # A peer killed mid-collective resets its connections: the survivor's collective fails at once and it exits
    # (status 1, see distributed._exit_on_uncaught_exception); otherwise the heartbeat timeout ends it (SIGABRT).
    assert any(sign in log for sign in ("Connection reset", "Connection closed by peer", "another task died")), \
        log[-3000:]
    print(f"survivor exited with status {status} {elapsed:.1f} s after its peer was killed")
    last = max(checkpoint_steps(run_dir))
    assert 5 <= last < 15

    result = local_cluster(corpus, tmp_path, program_args(corpus, run_dir, 15))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / str(last)} (step {last} of 15" in result.stderr
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 16))  # the killed run's lines after the checkpoint were dropped
    np.testing.assert_allclose([curve[s] for s in range(1, 16)], [reference[s] for s in range(1, 16)], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("hung", [1, 0])
def test_a_hung_process_ends_the_run_within_the_heartbeat_timeout(corpus, tmp_path, hung):
    """A stopped process (SIGSTOP: a hung host, a network partition) keeps its connections open, so only the missing
    heartbeats reveal it: the other process must still exit, with JAX's error, within the heartbeat timeout."""
    run_dir = tmp_path / "run"
    processes = start_two_processes(corpus, tmp_path, program_args(corpus, run_dir, 100))
    try:
        # Once both have joined the runtime; they are then compiling or training — heartbeats run on their own
        # threads either way.
        wait_for(lambda: "distributed: 2 processes" in (tmp_path / "process0.log").read_text(), processes, tmp_path,
                 "the processes to join")
        time.sleep(1.0)
        os.kill(processes[hung].pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        survivor = processes[1 - hung]
        status = survivor.wait(timeout=KILL_EXIT_BOUND_SECONDS + 60)
        elapsed = time.monotonic() - stopped_at
    finally:
        stop(processes)  # SIGKILL ends a stopped process too
    log = (tmp_path / f"process{1 - hung}.log").read_text()
    assert status == -signal.SIGABRT, log[-3000:]
    assert "Terminating process because the JAX distributed service detected fatal errors" in log
    print(f"process {1 - hung} exited {elapsed:.1f} s after process {hung} hung")


# ── Start-up logic without a cluster ─────────────────────────────────────────────────────────────────────────────
def test_single_process_without_a_cluster_does_not_initialize(monkeypatch):
    for marker in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(marker, raising=False)
    assert detect_cluster() is None
    assert initialize(DistributedConfig()) is False


@pytest.mark.parametrize("keys, message", [
    ({"coordinator_address": "127.0.0.1:1234"}, "needs distributed.num_processes and distributed.process_id"),
    ({"num_processes": 2, "process_id": 0}, "need distributed.coordinator_address"),
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 2}, "0 ≤ process_id < "),
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 0, "heartbeat_timeout_seconds": 0},
     "distributed.heartbeat_timeout_seconds=0"),
])
def test_incomplete_distributed_keys_are_config_errors(keys, message):
    with pytest.raises(ConfigError, match=message):
        initialize(DistributedConfig(**keys))


def test_one_task_per_slurm_node_gets_every_gpu_of_the_node():
    one_per_node = {"SLURM_STEP_TASKS_PER_NODE": "1(x4)", "SLURM_GPUS_ON_NODE": "8"}
    assert local_device_ids("slurm", one_per_node) == list(range(8))
    assert local_device_ids("slurm", {**one_per_node, "JAX_LOCAL_DEVICE_IDS": "0,1"}) is None  # JAX reads it
    assert local_device_ids("slurm", {"SLURM_STEP_TASKS_PER_NODE": "8(x4)", "SLURM_GPUS_ON_NODE": "8"}) is None
    assert local_device_ids("ompi", one_per_node) is None


def test_slurm_environment_is_detected_like_jax_does(monkeypatch):
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-004]", "SLURM_NTASKS": "4",
                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(key, value)
    assert detect_cluster() == "slurm"
    from jax._src.clusters import SlurmCluster

    # The coordinator JAX derives: the first node of the step, on a port fixed by the job id.
    assert SlurmCluster.get_coordinator_address(None, None) == f"gpu001:{4242 % 4096 + 61440}"
