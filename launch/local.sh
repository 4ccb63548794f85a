#!/usr/bin/env bash
# Starts K training processes on this machine, joined by jax.distributed through a coordinator on 127.0.0.1:
# the code path of a multi-host run (one process per host), for testing and debugging on one box.
#
#   launch/local.sh -n 2 -d 4 -- --config=configs/tiny.py --workdir=/tmp/tiny2 --config.total_steps=10
#
#   -n K     processes (default 2)
#   -d D     fake CPU devices per process (JAX_PLATFORMS=cpu, --num_cpu_devices=D); without -d every process
#            sees whatever JAX finds, which on a GPU box is every GPU: use launch/slurm.sbatch there
#   -p PORT  coordinator port (default: a free one)
#   -l DIR   log directory (default: WORKDIR/logs)
# Everything after -- goes to `python -m eva_clip_jax.train`. Process 0 prints to stdout (and logs/process_0.log);
# the others write only to logs/process_<i>.log. If any process fails, the rest are stopped (they would otherwise
# wait forever in a collective) and the script exits with the failed process's status.
set -euo pipefail

usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

processes=2
devices=''
port=''
log_dir=''
while getopts 'n:d:p:l:h' opt; do
  case "$opt" in
    n) processes="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    l) log_dir="$OPTARG" ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == '--' ]] && shift
(($# > 0)) || usage
[[ "$processes" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: -n wants a positive integer, got '$processes'" >&2; exit 2; }

workdir=''
previous=''
for arg in "$@"; do
  case "$arg" in
    --workdir=*) workdir="${arg#--workdir=}" ;;
    *) [[ "$previous" == '--workdir' ]] && workdir="$arg" ;;
  esac
  previous="$arg"
done
[[ -n "$workdir" ]] || { echo 'local.sh: pass --workdir=DIR to the trainer (after --)' >&2; exit 2; }
if [[ -z "$log_dir" ]]; then
  if [[ "$workdir" == *://* ]]; then
    echo "local.sh: workdir $workdir is not local: give a log directory with -l" >&2
    exit 2
  fi
  log_dir="$workdir/logs"
fi
mkdir -p "$log_dir"

python="${PYTHON:-python}"
if [[ -z "$port" ]]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
if [[ -n "$devices" ]]; then
  export JAX_PLATFORMS=cpu
  set -- "$@" "--num_cpu_devices=$devices"
fi

pids=()
stop_all() {
  # SIGTERM first: a healthy trainer saves a checkpoint and stops at the next step. One blocked in a collective
  # with a dead peer never reaches that step, hence SIGKILL after a grace period.
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 30); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < processes; i++)); do
  log="$log_dir/process_$i.log"
  command=("$python" -m eva_clip_jax.train "$@" "--coordinator_address=127.0.0.1:$port"
           "--num_processes=$processes" "--process_id=$i")
  if ((i == 0)); then
    "${command[@]}" > >(tee "$log") 2>&1 &
  else
    "${command[@]}" >"$log" 2>&1 &
  fi
  pids+=("$!")
done

# Poll rather than `wait -n`: it names the process that failed and needs no bash >= 5.1.
declare -A running
for i in "${!pids[@]}"; do running[$i]=1; done
while ((${#running[@]} > 0)); do
  for i in "${!running[@]}"; do
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    unset 'running[$i]'
    status=0
    wait "${pids[$i]}" || status=$?
    if ((status != 0)); then
      echo "local.sh: process $i exited with status $status; the end of $log_dir/process_$i.log:" >&2
      tail -n 40 "$log_dir/process_$i.log" | sed "s/^/[process $i] /" >&2
      stop_all
      exit "$status"
    fi
  done
  sleep 1
done
wait  # the tee of process 0
