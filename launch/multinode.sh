#!/usr/bin/env bash
# Plain multi-node launch with an explicit coordinator: run this once on every node (or once per process).
# See launch/README.md. Usage: launch/multinode.sh --help
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") --coordinator=HOST:PORT --num-processes=N --process-id=I \\
           --config=CONFIG --workdir=DIR [--python=PYTHON] [--dry-run] [-- MAIN_FLAGS...]

Starts one process of an N-process JAX run: sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (which metachex_jax/core/distributed.py passes to jax.distributed.initialize()) and replaces
itself with
    PYTHON -m metachex_jax.main --config=CONFIG --workdir=DIR [MAIN_FLAGS...]
Run it on every node with the same --coordinator (the address of process 0's node, reachable from all
nodes; process 0 listens on PORT) and --num-processes, and a different --process-id 0..N-1. Each process
drives all the accelerators it sees (one process per node), or set CUDA_VISIBLE_DEVICES per process to run
one process per GPU. DIR must be a directory every node sees (shared file system or gs://).

Options:
  --coordinator=HOST:PORT  process 0's host and a free port
  --num-processes=N        processes in the whole run
  --process-id=I           this process, 0..N-1 (0 writes the logs)
  --config=CONFIG          e.g. configs/pretrain.py or configs/pretrain.py:demo
  --workdir=DIR            checkpoints, logs and evaluations (a rerun resumes from here)
  --python=PYTHON          interpreter with metachex_jax installed (default: \$PYTHON or python3)
  --dry-run                print the command instead of running it
  -h, --help               this message
Everything after -- goes to metachex_jax.main unchanged, e.g. -- --config.batch_size_per_device=32
USAGE
}

coordinator="" num_processes="" process_id="" config="" workdir="" python="${PYTHON:-python3}"
main_flags=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --coordinator=* | --num-processes=* | --process-id=* | --config=* | --workdir=* | --python=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"
      continue ;;
    --coordinator) need_value "$1" "$#"; coordinator="$2"; shift ;;
    --num-processes) need_value "$1" "$#"; num_processes="$2"; shift ;;
    --process-id) need_value "$1" "$#"; process_id="$2"; shift ;;
    --config) need_value "$1" "$#"; config="$2"; shift ;;
    --workdir) need_value "$1" "$#"; workdir="$2"; shift ;;
    --python) need_value "$1" "$#"; python="$2"; shift ;;
    --) shift; main_flags=("$@"); break ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done

PROBLEMS=()
[[ "$coordinator" =~ ^[^:[:space:]]+:[0-9]+$ ]] || PROBLEMS+=("--coordinator must be HOST:PORT, got '$coordinator'")
if ! is_uint "$num_processes" || ((num_processes < 1)); then
  PROBLEMS+=("--num-processes must be a positive integer, got '$num_processes'")
fi
if ! is_uint "$process_id"; then
  PROBLEMS+=("--process-id must be an integer >= 0, got '$process_id'")
elif is_uint "$num_processes" && ((process_id >= num_processes)); then
  PROBLEMS+=("--process-id=$process_id is not below --num-processes=$num_processes")
fi
[[ -n "$config" ]] || PROBLEMS+=("--config is required")
[[ -n "$workdir" ]] || PROBLEMS+=("--workdir is required")
fail_if_problems

run_exec env "JAX_COORDINATOR_ADDRESS=$coordinator" "JAX_NUM_PROCESSES=$num_processes" \
  "JAX_PROCESS_ID=$process_id" "$python" -m metachex_jax.main "--config=$config" "--workdir=$workdir" \
  "${main_flags[@]}"
