#!/usr/bin/env bash
# A multi-host run on one machine: N processes of the same program, each with its own simulated CPU devices,
# joined by JAX's distributed runtime (coordinator on 127.0.0.1) and JAX's CPU collectives (gloo).
#
#   scripts/local_cluster.sh N CONFIG.yaml [key=value ...]
#   scripts/local_cluster.sh 2 configs/tiny.yaml train.steps=20 run_dir=runs/two-hosts
#
# Process i runs `python -m train.pretrain CONFIG key=value ... distributed.coordinator_address=127.0.0.1:PORT
# distributed.num_processes=N distributed.process_id=i` with XLA_FLAGS=--xla_force_host_platform_device_count=D/N,
# so the N processes together see one mesh of D devices (D = $LOCAL_CLUSTER_DEVICES, default 8): the same mesh,
# batch and losses as one process with D simulated devices, but with every cross-process path of a real cluster
# (coordination service, per-process batch slices, process-0-only logging, cooperative checkpoints) exercised.
# Output lines are prefixed with [i]. If any process fails, the others are stopped (by PID) and the launcher exits
# with the failed process's status; Ctrl-C stops them all.
#
# JAX's persistent compilation cache is switched off here: JAX writes it from process 0 only and the other
# processes' cache keys differ, so process 0 alone gets cache hits and races ahead, and the CPU collectives (gloo)
# end the run when the processes reach a collective more than 30 s apart (a fixed rendezvous timeout).
#
# Environment: LOCAL_CLUSTER_DEVICES (total simulated devices, default 8), LOCAL_CLUSTER_PORT (coordinator port,
# default a free one), LOCAL_CLUSTER_MODULE (default train.pretrain), PYTHON (default python3).
set -uo pipefail

usage() { echo "usage: $0 NUM_PROCESSES CONFIG.yaml [key=value ...]" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
num_processes=$1; shift
if ! [[ $num_processes =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NUM_PROCESSES must be a positive integer, not '$num_processes'" >&2
  exit 2
fi
python=${PYTHON:-python3}
module=${LOCAL_CLUSTER_MODULE:-train.pretrain}
total_devices=${LOCAL_CLUSTER_DEVICES:-8}
if (( total_devices % num_processes != 0 )); then
  echo "error: $total_devices simulated devices (LOCAL_CLUSTER_DEVICES) cannot be split evenly over" \
    "$num_processes processes" >&2
  exit 2
fi
devices_per_process=$(( total_devices / num_processes ))
xla_flags=$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<< "${XLA_FLAGS:-}")
free_port='import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
port=${LOCAL_CLUSTER_PORT:-$("$python" -c "$free_port")}
if [[ -n ${JAX_COMPILATION_CACHE_DIR:-} ]]; then
  echo "local cluster: ignoring JAX_COMPILATION_CACHE_DIR (see the note at the top of $0)" >&2
  unset JAX_COMPILATION_CACHE_DIR
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # `-m train.pretrain` resolves from any directory

prefix() { awk -v p="$1" '{ print p $0; fflush() }'; }  # line-buffered on GNU and BSD systems alike

pids=()
stop_all() {  # stop every process still running, by PID: SIGTERM (save and stop), then SIGKILL after 30 s
  local pid alive=()
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null && alive+=("$pid"); done
  for _ in $(seq 150); do
    local any=0
    for pid in "${alive[@]}"; do kill -0 "$pid" 2>/dev/null && any=1; done
    (( any )) || return 0
    sleep 0.2
  done
  for pid in "${alive[@]}"; do kill -KILL "$pid" 2>/dev/null; done
}
trap 'stop_all; exit 130' INT TERM

echo "local cluster: $num_processes processes × $devices_per_process CPU devices, coordinator 127.0.0.1:$port" >&2
for (( i = 0; i < num_processes; i++ )); do
  XLA_FLAGS="$xla_flags --xla_force_host_platform_device_count=$devices_per_process" JAX_PLATFORMS=cpu \
    PYTHONUNBUFFERED=1 "$python" -m "$module" "$@" \
    "distributed.coordinator_address=127.0.0.1:$port" "distributed.num_processes=$num_processes" \
    "distributed.process_id=$i" \
    > >(prefix "[$i] ") 2> >(prefix "[$i] " >&2) &
  pids+=($!)
  echo "[$i] pid $!" >&2
done

# Wait for all; the first failure stops the rest. (Polling rather than `wait -n`, so bash 3.2 — macOS — works.)
status=0
done_count=0
finished=()
while (( done_count < num_processes )); do
  for (( i = 0; i < num_processes; i++ )); do
    [[ -z ${finished[i]:-} ]] || continue
    kill -0 "${pids[i]}" 2>/dev/null && continue
    wait "${pids[i]}"
    code=$?
    finished[i]=1
    (( done_count++ ))
    if (( code != 0 && status == 0 )); then
      echo "local cluster: process $i (pid ${pids[i]}) exited with status $code; stopping the others" >&2
      status=$code
      stop_all
    fi
  done
  (( done_count < num_processes )) && sleep 0.2
done
wait 2>/dev/null  # the output filters
exit $status
