#!/usr/bin/env bash
# One host, every local accelerator (e.g. 8 GPUs): one process; jax sees all local devices and the
# ('data',) mesh spans them, so the global batch (config.train.batch_size) is split over the GPUs.
#
#   CONFIG=configs/default.py WORKDIR=/runs/r1 SHARDS=/data/shards launch/single_host.sh [--config.x=y ...]
#
# Needs: CONFIG, WORKDIR, SHARDS (a folder with manifest.json); nvidia-smi when REQUIRE_GPU=1 (default).
# Rerunning the same command resumes from WORKDIR's latest checkpoint.
set -euo pipefail
source "$(dirname "$0")/common.sh"
need_var CONFIG "a config file, e.g. configs/default.py"
need_var WORKDIR "the run folder (checkpoints, logs)"
need_var SHARDS "the shard folder written by python -m data_prep.build"
need_file "$CONFIG" "config file"
need_shards "$SHARDS"
if [ "${REQUIRE_GPU:-1}" = 1 ]; then
  need_cmd nvidia-smi "REQUIRE_GPU=1 asks for GPUs; REQUIRE_GPU=0 runs on whatever jax finds"
  echo "GPUs: $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"
fi
PY=$(python_bin)
"$PY" -c "import jax; print('jax', jax.__version__, 'devices:', jax.devices())" \
  || die "jax does not start with $PY (install calcjax with a CUDA jax: pip install -e . 'jax[cuda12]')"
CONFIG=$(realpath "$CONFIG"); WORKDIR=$(realpath -m "$WORKDIR"); SHARDS=$(realpath "$SHARDS")  # before cd
cd "$REPO"
exec "$PY" -m calcjax.train --config "$CONFIG" --workdir "$WORKDIR" --config.data.shards="$SHARDS" "$@"
