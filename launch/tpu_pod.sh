#!/usr/bin/env bash
# A Cloud TPU VM pod slice: the same command on every worker (gcloud ... ssh --worker=all); on TPU VMs
# jax.distributed.initialize() finds the other workers itself (TPU_WORKER_HOSTNAMES is set there).
# Every worker reads its own slice of the global batch, so SHARDS and WORKDIR must be folders every worker
# mounts (a bucket through gcsfuse, or Filestore): calcjax reads and writes through the filesystem.
#
#   TPU_NAME=calcjax-v5p-64 ZONE=us-east5-a PROJECT=my-project CONFIG=configs/default.py \
#     WORKDIR=/mnt/bucket/runs/r1 SHARDS=/mnt/bucket/shards REPO_ON_TPU=~/calcjax launch/tpu_pod.sh [...]
#
# Needs: gcloud, TPU_NAME, ZONE, PROJECT, CONFIG, WORKDIR, SHARDS, and the repository installed on every
# worker at REPO_ON_TPU (pip install -e . 'jax[tpu]').
set -euo pipefail
source "$(dirname "$0")/common.sh"
need_cmd gcloud "the Google Cloud CLI reaches the TPU workers"
need_var TPU_NAME "the TPU VM name"
need_var ZONE "the TPU's zone"
need_var PROJECT "the Google Cloud project"
need_var CONFIG "a config file, e.g. configs/default.py"
need_var WORKDIR "the run folder, mounted on every worker"
need_var SHARDS "the shard folder, mounted on every worker"
need_var REPO_ON_TPU "where the repository is installed on the workers"
case "$SHARDS$WORKDIR" in *://*) die "SHARDS and WORKDIR must be mounted folders, not URLs (see the header)";; esac
extra=$(printf ' %q' "$@")
# The shards are checked on the workers (this machine need not mount them).
remote="cd $REPO_ON_TPU && (test -f $SHARDS/manifest.json || { echo no manifest.json in $SHARDS on \$(hostname) >&2; exit 2; }) && python3 -m calcjax.train --config $CONFIG --workdir $WORKDIR --config.data.shards=$SHARDS$extra"
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --worker=all --command "$remote"
