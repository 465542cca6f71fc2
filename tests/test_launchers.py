"""The cluster launchers: the TPU VM recipe runs one process per host with the same program and config, and the
XLA flags the GPU launchers set are flags this jaxlib knows (XLA refuses to start on an unknown one)."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TPU_LAUNCHER = REPO / "scripts" / "tpu_vm" / "pretrain.sh"


def fake_gcloud(tmp_path: Path) -> tuple[Path, Path]:
    """A `gcloud` that records each call's arguments, NUL-separated, one call per line of the log."""
    log = tmp_path / "gcloud.log"
    script = tmp_path / "gcloud"
    script.write_text(f"#!/usr/bin/env bash\nprintf '%s\\0' \"$@\" >> {shlex.quote(str(log))}\necho >> "
                      f"{shlex.quote(str(log))}\n")
    script.chmod(0o755)
    return script, log


def recorded_calls(log: Path) -> list[list[str]]:
    return [line.rstrip("\0").split("\0") for line in log.read_text().splitlines() if line]


def test_tpu_vm_launcher_runs_the_same_program_on_every_worker(tmp_path):
    gcloud, log = fake_gcloud(tmp_path)
    args = ["configs/tiny.yaml", "run_dir=/mnt/runs/a b", "train.steps=10", "mesh=1x-1x1"]
    env = {**os.environ, "GCLOUD": str(gcloud), "TPU_ZONE": "us-east5-a", "REMOTE_DIR": "work dir/llama-jax"}
    env.pop("LIBTPU_INIT_ARGS", None)
    result = subprocess.run([str(TPU_LAUNCHER), "my-v5p-64", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    [call] = recorded_calls(log)
    assert call[:7] == ["compute", "tpus", "tpu-vm", "ssh", "my-v5p-64", "--worker=all", "--zone=us-east5-a"]
    assert call[7] == "--command"
    remote = shlex.split(call[8])  # what each worker's shell runs
    assert remote[:3] == ["cd", "work dir/llama-jax", "&&"]
    libtpu, program = remote[3], remote[4:]
    assert libtpu.startswith("LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true ")
    assert program == ["python3", "-m", "train.pretrain", *args]


def test_tpu_vm_launcher_usage_error_is_one_line(tmp_path):
    gcloud, log = fake_gcloud(tmp_path)
    result = subprocess.run([str(TPU_LAUNCHER), "only-a-name"], cwd=REPO, env={**os.environ, "GCLOUD": str(gcloud)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and not log.exists()


def gpu_launcher_flags() -> dict[str, list[str]]:
    slurm = (REPO / "scripts" / "slurm" / "pretrain.sbatch").read_text()
    kubernetes = (REPO / "scripts" / "k8s" / "llama-jax-jobset.yaml").read_text()
    flag = re.compile(r"^\s*(--xla_[a-z0-9_]+=\S+)\s*$", re.MULTILINE)
    return {"slurm": flag.findall(slurm), "kubernetes": flag.findall(kubernetes)}


def run_with_xla_flags(flags: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_gpu_launchers_set_the_same_flags_and_this_jaxlib_knows_them():
    flags = gpu_launcher_flags()
    assert len(flags["slurm"]) >= 10 and sorted(flags["slurm"]) == sorted(flags["kubernetes"])
    result = run_with_xla_flags(flags["slurm"])
    assert result.returncode == 0, result.stderr[-2000:]
    # The check can fail: XLA stops on a flag it does not know.
    misspelled = run_with_xla_flags(["--xla_gpu_enable_latency_hiding_schedular=true"])
    assert misspelled.returncode != 0 and "Unknown flag" in misspelled.stderr
