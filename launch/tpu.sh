#!/usr/bin/env bash
# Starts EVA-CLIP training on every worker of a Cloud TPU VM slice (JAX finds the other workers by itself).
#
#   launch/tpu.sh [options] TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#   launch/tpu.sh --setup eva-v4-128 us-central2-b configs/l14.py gs://my-bucket/eva-clip/l14 --config.batch_size=65536
#
#   --setup        first clone (or update) the repository on every worker and install requirements + jax[tpu]
#   --repo URL     repository to clone (default: this checkout's origin remote)
#   --ref REF      branch, tag or commit to check out (default: this checkout's current commit)
#   --dir DIR      checkout on the workers, relative to the home directory (default: eva-clip-jax)
#   --project P    GCP project (default: gcloud's configured one)
#   --detach       run under nohup on the workers (log: DIR/train.log) and return; default: stream the output
#   --dry-run      print the gcloud commands instead of running them
# WORKDIR must be visible to every worker: a gs:// bucket (orbax and the metric writer read and write it directly)
# or a shared file system. Running the same command again resumes from WORKDIR.
set -euo pipefail

usage() {
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

setup=0
detach=0
dry_run=0
repo=''
ref=''
dir='eva-clip-jax'
project=()
while (($# > 0)); do
  case "$1" in
    --setup) setup=1 ;;
    --detach) detach=1 ;;
    --dry-run) dry_run=1 ;;
    --repo) repo="$2"; shift ;;
    --ref) ref="$2"; shift ;;
    --dir) dir="$2"; shift ;;
    --project) project=(--project "$2"); shift ;;
    -h | --help) usage ;;
    --) shift; break ;;
    -*) echo "tpu.sh: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
  shift
done
(($# >= 4)) || usage
name="$1"
zone="$2"
config="$3"
workdir="$4"
shift 4
case "$workdir" in
  gs://* | /*) ;;
  *) echo "tpu.sh: WORKDIR must be gs://... or an absolute path on a shared file system, got $workdir" >&2; exit 2 ;;
esac

here="$(cd "$(dirname "$0")/.." && pwd)"
if ((setup)); then
  repo="${repo:-$(git -C "$here" remote get-url origin 2>/dev/null || true)}"
  ref="${ref:-$(git -C "$here" rev-parse HEAD 2>/dev/null || true)}"
  [[ -n "$repo" && -n "$ref" ]] || { echo 'tpu.sh: --setup needs --repo and --ref (no git origin here)' >&2; exit 2; }
fi

# Words for the workers' shell: printf %q quotes each argument for bash (gcloud runs --command through it).
quote() {
  local quoted
  printf -v quoted '%q ' "$@"
  printf '%s' "${quoted% }"
}

run_on_workers() {
  local command=(gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" "${project[@]}" --worker=all
                 --command="$1")
  if ((dry_run)); then
    printf '%q ' "${command[@]}"
    echo
  else
    "${command[@]}"
  fi
}

if ((setup)); then
  # Idempotent: clone once, then fetch and check out the requested ref; pip leaves satisfied packages alone. jax[tpu]
  # is pinned to the jax that requirements.txt installed, so only libtpu is added.
  run_on_workers "set -e; cd ~
    if [ ! -d $(quote "$dir")/.git ]; then git clone $(quote "$repo" "$dir"); fi
    cd $(quote "$dir") && git fetch --quiet origin $(quote "$ref") && git checkout --quiet --detach FETCH_HEAD
    python3 -m pip install --quiet -r requirements.txt && python3 -m pip install --quiet --no-deps -e .
    python3 -m pip install --quiet \"jax[tpu]==\$(python3 -c 'import jax; print(jax.__version__)')\" \\
      -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
fi

# eva_clip_jax.train starts jax.distributed when TPU_WORKER_HOSTNAMES lists several workers. A TPU VM keeps the
# worker list and this worker's number in its metadata, not in the ssh session's environment: export them from
# there (JAX's own TPU detection then reads the same values).
# shellcheck disable=SC2016  # expanded on the workers
cluster_env='md() { curl -sf -H "Metadata-Flavor: Google" \
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"; }
  export TPU_WORKER_ID="${TPU_WORKER_ID:-$(md agent-worker-number)}"
  hosts() { md worker-network-endpoints | tr , "\n" | awk -F: "{print \$NF}" | paste -sd, -; }
  export TPU_WORKER_HOSTNAMES="${TPU_WORKER_HOSTNAMES:-$(hosts)}"'
train="$(quote python3 -m eva_clip_jax.train --config="$config" --workdir="$workdir" "$@")"
if ((detach)); then
  run_on_workers "$cluster_env
  cd ~/$(quote "$dir") && nohup $train > train.log 2>&1 < /dev/null &"
else
  run_on_workers "$cluster_env
  cd ~/$(quote "$dir") && $train"
fi
