# Shared checks of the launchers (sourced, not run). Each names what it needs and stops with a message.
# Usage inside a launcher:  source "$(dirname "$0")/common.sh"; need_var CONFIG "a config file, e.g. configs/default.py"

die() { echo "calcjax launch: $*" >&2; exit 2; }

need_var() {  # need_var NAME "what it is"
  local name=$1 what=$2
  [ -n "${!name:-}" ] || die "set $name: $what"
}

need_file() {  # need_file PATH "what it is"
  [ -e "$1" ] || die "$2 not found: $1"
}

need_cmd() {  # need_cmd COMMAND "why"
  command -v "$1" >/dev/null 2>&1 || die "'$1' is not on PATH ($2)"
}

need_shards() {  # need_shards FOLDER: a shard folder with manifest.json (object storage: mount it first)
  case "$1" in
    *://*) die "SHARDS=$1 is a URL: calcjax reads shards and writes runs through the filesystem; mount the bucket (gcsfuse, s3fs, Filestore, Lustre) and pass the mounted folder" ;;
  esac
  [ -f "$1/manifest.json" ] || die "no manifest.json in SHARDS=$1: build shards with python -m data_prep.build, on storage every host mounts"
}

python_bin() {  # the interpreter: $PYTHON, else the repository's .venv, else python3
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
  elif [ -x "$REPO/.venv/bin/python" ]; then echo "$REPO/.venv/bin/python"
  else echo python3; fi
}

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
