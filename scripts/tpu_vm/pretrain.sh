#!/usr/bin/env bash
# Pretraining on a Cloud TPU VM slice: one process per TPU host, all running the same program and config.
#
#   scripts/tpu_vm/pretrain.sh TPU_NAME CONFIG.yaml [key=value ...]
#   TPU_ZONE=us-east5-a scripts/tpu_vm/pretrain.sh my-v5p-64 configs/llama2-7b.yaml run_dir=/mnt/runs/7b mesh=1x-1x1
#   SETUP=1 scripts/tpu_vm/pretrain.sh my-v5p-64 configs/llama2-7b.yaml   # first copy this checkout and install
#
# Run it from the repository root on a machine with `gcloud`. It runs `python3 -m train.pretrain CONFIG ...` on
# every worker of the slice (`gcloud compute tpus tpu-vm ssh --worker=all`); JAX finds the coordinator, the process
# count and each process's id from the TPU metadata itself, so no distributed.* key is needed. The run directory
# must be shared by all hosts (a GCS-fuse or NFS mount) for checkpoints to be complete, as on any cluster.
#
# Preemption: a worker stopped with SIGTERM saves a checkpoint and exits with status 75; run the same command again
# (after the slice is back) and every host resumes from that checkpoint.
#
# Environment: TPU_ZONE and TPU_PROJECT (default: gcloud's configured ones), REMOTE_DIR (the checkout on the
# workers, default llama-jax in the login user's home), SETUP=1 (copy this checkout there and install it with the
# TPU extra first), LIBTPU_INIT_ARGS (replaces the flags below), GCLOUD (default gcloud).
set -euo pipefail

if (( $# < 2 )); then
  echo "usage: $0 TPU_NAME CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
tpu_name=$1
shift
gcloud=${GCLOUD:-gcloud}
remote_dir=${REMOTE_DIR:-llama-jax}
where=(--worker=all)
[[ -n "${TPU_ZONE:-}" ]] && where+=(--zone="$TPU_ZONE")
[[ -n "${TPU_PROJECT:-}" ]] && where+=(--project="$TPU_PROJECT")

# libtpu flags for FSDP over a scanned stack of layers (the collectives MaxText's TPU configs overlap with compute):
# run each layer's weight all-gather and gradient reduce-scatter asynchronously, fused with the compute around it,
# across several steps of the layer loop.
libtpu_flags=${LIBTPU_INIT_ARGS:-"--xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true"}

quoted_args=$(printf ' %q' "$@")
if [[ "${SETUP:-0}" == 1 ]]; then
  archive=$(mktemp /tmp/llama-jax-XXXXXX.tar.gz)
  trap 'rm -f "$archive"' EXIT
  git archive --format=tar.gz -o "$archive" HEAD
  "$gcloud" compute tpus tpu-vm scp "$archive" "$tpu_name:llama-jax.tar.gz" "${where[@]}"
  "$gcloud" compute tpus tpu-vm ssh "$tpu_name" "${where[@]}" --command "mkdir -p $(printf %q "$remote_dir") \
&& tar -xzf llama-jax.tar.gz -C $(printf %q "$remote_dir") && cd $(printf %q "$remote_dir") \
&& python3 -m pip install -q -e '.[tpu]'"
fi
"$gcloud" compute tpus tpu-vm ssh "$tpu_name" "${where[@]}" --command "cd $(printf %q "$remote_dir") \
&& LIBTPU_INIT_ARGS=$(printf %q "$libtpu_flags") python3 -m train.pretrain$quoted_args"
