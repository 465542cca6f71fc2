"""Start-up on JAX's distributed runtime: one process per host, every process sees the global device mesh.

`initialize` is called once, before anything touches a device. On a cluster JAX detects the coordinator, process
count and process id itself (SLURM, Open MPI, a Kubernetes indexed Job/JobSet, Cloud TPU); the `distributed.*`
config keys override that, e.g. for several local processes on one machine (`scripts/local_cluster.sh`).

What a multi-process run relies on, and where it lives:
- one global mesh over every process's devices (`jax.devices()` after `initialize`), with each process placing only
  its own rows of a global batch (`pretraining_data.global_batch` → `jax.make_array_from_process_local_data`);
- only process 0 writes metrics.jsonl, TensorBoard events and console progress (`metrics.MetricsLog`, `run_loop.train`);
- Orbax saves and restores cooperatively: every process writes and reads the shards its devices own;
- failure ends the job instead of hanging it. JAX's coordination service takes heartbeats from every process; a
  process silent for `distributed.heartbeat_timeout_seconds` (killed, OOM-killed, node lost) makes every other
  process terminate with "Terminating process because the JAX distributed service detected fatal errors ... another
  task died" (SIGABRT, exit status 134); when process 0 itself dies the others lose the service and terminate within
  about a second. An uncaught exception in one process ends that process at once (`_exit_on_uncaught_exception`)
  rather than holding it in JAX's cooperative shutdown barrier, where it would wait for its peers — which are blocked
  in a collective waiting for it — for the 300 s shutdown timeout.

One process per node with 8 GPUs: under SLURM, JAX's auto-detection gives each process only GPU `SLURM_LOCALID`
(it assumes one process per GPU). With one task per node, `initialize` passes all of the node's GPUs instead (from
`SLURM_GPUS_ON_NODE`), unless `JAX_LOCAL_DEVICE_IDS` says otherwise.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator

import jax

from llama_jax.cli import abort
from llama_jax.config import DistributedConfig
from llama_jax.errors import ConfigError, LlamaJaxError


class DistributedError(LlamaJaxError):
    """The distributed runtime could not be joined (peers missing, wrong address, timeout)."""


# Environment markers of schedulers, used only if JAX's own detection code cannot be imported.
_CLUSTER_MARKERS = {"slurm": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID"),
                    "ompi": ("OMPI_MCA_orte_hnp_uri",)}


def detect_cluster() -> str | None:
    """The environment JAX's auto-detection would bootstrap from ('slurm', 'ompi', 'k8s', ...), or None.

    Uses JAX's own detectors, so that "detected" here means exactly "jax.distributed.initialize() with no arguments
    will work" (SLURM needs an `srun` step, not just an allocation; Kubernetes needs the `kubernetes` package).
    """
    try:
        from jax._src import clusters

        environments = [env for env in clusters.ClusterEnv._cluster_types if not env.opt_in_only_method]
    except (ImportError, AttributeError):  # JAX moved its private detectors: fall back to the markers
        return next((name for name, markers in _CLUSTER_MARKERS.items()
                     if all(marker in os.environ for marker in markers)), None)
    for env in environments:
        try:
            if env.is_env_present():
                return env.name
        except Exception:  # a detector that cannot run here (e.g. no metadata server) means "not this one"
            continue
    return None


def _check_kubernetes(cluster: str | None) -> None:
    """An indexed Kubernetes Job without the `kubernetes` package would silently run N independent jobs."""
    if cluster is None and "KUBERNETES_SERVICE_HOST" in os.environ and "JOB_COMPLETION_INDEX" in os.environ:
        raise DistributedError(
            "this is a pod of an indexed Kubernetes Job, but JAX cannot bootstrap from Kubernetes without the "
            "`kubernetes` package: `pip install 'jax[k8s]'`, or pass distributed.coordinator_address, "
            "distributed.num_processes and distributed.process_id=$(JOB_COMPLETION_INDEX) "
            "(see scripts/k8s/llama-jax-jobset.yaml)")


def local_device_ids(cluster: str | None, environ: dict[str, str] | None = None) -> list[int] | None:
    """All GPUs of the node when SLURM runs one task per node; None = let JAX decide.

    JAX's SLURM detection assumes one process per GPU and gives each process only GPU SLURM_LOCALID, so a job with
    one task per node would use 1 of 8 GPUs per node. `JAX_LOCAL_DEVICE_IDS` (read by JAX) always wins.
    """
    environ = os.environ if environ is None else environ
    if cluster != "slurm" or environ.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    tasks_per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_NTASKS_PER_NODE") or ""
    counts = {part.split("(")[0] for part in tasks_per_node.split(",") if part}
    gpus = environ.get("SLURM_GPUS_ON_NODE", "")
    if counts == {"1"} and gpus.isdigit() and int(gpus) > 1:
        return list(range(int(gpus)))
    return None


def initialize(config: DistributedConfig) -> bool:
    """Join the distributed runtime if configured or on a detected cluster; False for a plain single process."""
    explicit = config.coordinator_address is not None
    if explicit and (config.num_processes is None or config.process_id is None):
        raise ConfigError("distributed.coordinator_address needs distributed.num_processes and "
                          "distributed.process_id too")
    if not explicit and (config.num_processes is not None or config.process_id is not None):
        raise ConfigError("distributed.num_processes and distributed.process_id need "
                          "distributed.coordinator_address too (host:port of process 0)")
    if explicit and not 0 <= config.process_id < config.num_processes:
        raise ConfigError(f"distributed.process_id={config.process_id} is not allowed: expected 0 ≤ process_id < "
                          f"distributed.num_processes={config.num_processes}")
    for key in ("initialization_timeout_seconds", "heartbeat_timeout_seconds"):
        if getattr(config, key) <= 0:
            raise ConfigError(f"distributed.{key}={getattr(config, key)} is not allowed: expected a positive integer")
    if jax.distributed.is_initialized():
        return True
    cluster = None
    if not explicit:
        if not config.auto_detect:
            return False
        cluster = detect_cluster()
        _check_kubernetes(cluster)
        if cluster is None:
            return False
    # Collectives between CPU devices of different processes (local multi-process runs); GPU backends ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = config.coordinator_address or f"the coordinator found by {cluster} detection"
    try:
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address, num_processes=config.num_processes,
            process_id=config.process_id, local_device_ids=local_device_ids(cluster),
            initialization_timeout=config.initialization_timeout_seconds,
            heartbeat_timeout_seconds=config.heartbeat_timeout_seconds)
    except Exception as error:  # jax raises RuntimeError/XlaRuntimeError with gRPC detail on several lines
        reason = " ".join(str(error).split())[:400]
        who = (f"process {config.process_id} of {config.num_processes}" if explicit else "this process")
        raise DistributedError(
            f"{who} could not join the distributed runtime at {where} within "
            f"distributed.initialization_timeout_seconds={config.initialization_timeout_seconds}: {reason} "
            "(are all processes started, with the same coordinator address and process count?)") from None
    _exit_on_uncaught_exception()
    if jax.process_index() == 0:
        print(f"distributed: {jax.process_count()} processes × {jax.local_device_count()} "
              f"{jax.devices()[0].platform.upper()} devices = {jax.device_count()} devices"
              f"{f' ({cluster})' if cluster else ''}, coordinator {where}, heartbeat timeout "
              f"{config.heartbeat_timeout_seconds} s", file=sys.stderr)
    return True


def _exit_on_uncaught_exception() -> None:
    """Print an uncaught exception, then end this process at once (os._exit), skipping JAX's shutdown barrier.

    The barrier would wait for every peer, and the peers are blocked in the next collective waiting for this process:
    everything would stand still for the coordination service's 300 s shutdown timeout. Exiting instead lets the
    peers see a dead process: immediately if it was process 0, otherwise within the heartbeat timeout.
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt):
            previous(exc_type, exc, tb)
        else:
            traceback.print_exception(exc_type, exc, tb)
        abort(1, f"{exc_type.__name__} in process {jax.process_index()} of {jax.process_count()}")

    sys.excepthook = hook


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (nothing to wait for in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"llama_jax.{name}")


@contextlib.contextmanager
def process_zero_first(name: str) -> Iterator[None]:
    """Process 0 runs the body first; the others wait for it, then run it themselves.

    For work that writes a shared cache (a trained tokenizer, a token store): with a shared file system the other
    processes find process 0's result instead of racing it to the same paths; without one they build their own copy.
    """
    if jax.process_index() != 0:
        barrier(name)
    yield
    if jax.process_index() == 0:
        barrier(name)
