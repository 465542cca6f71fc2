"""Start-up on JAX's distributed runtime: one process per host, every process sees the global device mesh.

`initialize` is called once, before anything touches a device. On a cluster JAX detects the coordinator, process
count and process id itself (SLURM, Open MPI, Kubernetes JobSet ...); the `distributed.*` config keys override that,
e.g. for several local processes on one machine. Timeouts make a dead peer end the job with an error, not a hang.
"""
from __future__ import annotations

import os

import jax

from llama_jax.config import DistributedConfig
from llama_jax.errors import ConfigError

# Environment markers of the schedulers jax.distributed detects on its own.
_CLUSTER_MARKERS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JOBSET_NAME", "TPU_WORKER_HOSTNAMES")


def initialize(config: DistributedConfig) -> bool:
    """Join the distributed runtime if configured or on a detected cluster; False for a plain single process."""
    explicit = config.coordinator_address is not None
    if explicit and (config.num_processes is None or config.process_id is None):
        raise ConfigError("distributed.coordinator_address needs distributed.num_processes and "
                          "distributed.process_id too")
    if not explicit and not config.auto_detect:
        return False
    if not explicit and not any(marker in os.environ for marker in _CLUSTER_MARKERS):
        return False
    # Collectives between CPU devices of different processes (local multi-process runs); GPU backends ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address, num_processes=config.num_processes,
        process_id=config.process_id, initialization_timeout=config.initialization_timeout_seconds,
        heartbeat_timeout_seconds=config.heartbeat_timeout_seconds)
    return True
