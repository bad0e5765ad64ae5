#!/usr/bin/env bash
# Submit a pretraining run to a SLURM GPU cluster: one process per GPU. See launch/README.md.
# Usage: launch/slurm.sh --help
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") --workdir=DIR [options] [-- MAIN_FLAGS...]

Submits launch/slurm_job.sh with sbatch; in the job, srun starts
    PYTHON -m metachex_jax.main --config=CONFIG --workdir=DIR [MAIN_FLAGS...]
once per GPU (--ntasks-per-node = --gpus-per-node). JAX detects the SLURM job and connects the processes
(metachex_jax/core/distributed.py calls jax.distributed.initialize() when the job has more than one task).
Resubmitting with the same --workdir resumes from its last checkpoint. SIGTERM (sent --signal-before-limit
seconds before the time limit, and by SLURM preemption) makes every task save a checkpoint at the same step
and exit with status 0.

Options:
  --nodes=N              nodes (default: 1)
  --gpus-per-node=G      GPUs used on each node = processes per node (default: 8)
  --cpus-per-task=C      CPU cores per process, for the input pipeline (default: 8)
  --time=T               wall-clock limit, e.g. 24:00:00 (default: 24:00:00)
  --partition=P          SLURM partition (default: the cluster's default)
  --account=A            SLURM account (default: yours)
  --job-name=NAME        (default: metachex)
  --requeue              let SLURM requeue the job after preemption or node failure (it then resumes)
  --signal-before-limit=S  send SIGTERM to every task S seconds before the time limit, so that the run saves
                         a checkpoint and stops cleanly (default: 300; SLURM may send it up to 60 s earlier;
                         0: no signal, the time limit kills the run)
  --config=CONFIG        (default: configs/pretrain.py)
  --workdir=DIR          on a file system every node sees; required
  --python=PYTHON        interpreter with metachex_jax installed, as seen on the nodes (default: \$PYTHON or
                         python3)
  --dry-run              print the sbatch command instead of running it
  -h, --help             this message
Everything after -- goes to metachex_jax.main unchanged, e.g. -- --config.data.data_dir=/shared/tfds
USAGE
}

nodes=1 gpus_per_node=8 cpus_per_task=8 time_limit="24:00:00" partition="" account="" job_name=metachex
requeue=0 signal_before_limit=300 config="configs/pretrain.py" workdir="" python="${PYTHON:-python3}"
main_flags=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --requeue) requeue=1 ;;
    --nodes=* | --gpus-per-node=* | --cpus-per-task=* | --time=* | --partition=* | --account=* | \
      --job-name=* | --signal-before-limit=* | --config=* | --workdir=* | --python=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"
      continue ;;
    --nodes) need_value "$1" "$#"; nodes="$2"; shift ;;
    --gpus-per-node) need_value "$1" "$#"; gpus_per_node="$2"; shift ;;
    --cpus-per-task) need_value "$1" "$#"; cpus_per_task="$2"; shift ;;
    --time) need_value "$1" "$#"; time_limit="$2"; shift ;;
    --partition) need_value "$1" "$#"; partition="$2"; shift ;;
    --account) need_value "$1" "$#"; account="$2"; shift ;;
    --job-name) need_value "$1" "$#"; job_name="$2"; shift ;;
    --signal-before-limit) need_value "$1" "$#"; signal_before_limit="$2"; shift ;;
    --config) need_value "$1" "$#"; config="$2"; shift ;;
    --workdir) need_value "$1" "$#"; workdir="$2"; shift ;;
    --python) need_value "$1" "$#"; python="$2"; shift ;;
    --) shift; main_flags=("$@"); break ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done

PROBLEMS=()
for option in nodes gpus_per_node cpus_per_task; do
  value="${!option}"
  if ! is_uint "$value" || ((value < 1)); then
    PROBLEMS+=("--${option//_/-} must be a positive integer, got '$value'")
  fi
done
is_uint "$signal_before_limit" ||
  PROBLEMS+=("--signal-before-limit must be a number of seconds >= 0, got '$signal_before_limit'")
[[ -n "$workdir" ]] || PROBLEMS+=("--workdir is required")
[[ "$workdir" != gs://* ]] || PROBLEMS+=("--workdir must be on a shared file system here, got '$workdir'")
fail_if_problems

sbatch_flags=("--job-name=$job_name" "--nodes=$nodes" "--ntasks-per-node=$gpus_per_node"
  "--gpus-per-node=$gpus_per_node" "--cpus-per-task=$cpus_per_task" "--time=$time_limit"
  "--output=$job_name-%j.out")
[[ -z "$partition" ]] || sbatch_flags+=("--partition=$partition")
[[ -z "$account" ]] || sbatch_flags+=("--account=$account")
((requeue)) && sbatch_flags+=(--requeue)
# No "B:": the signal goes to the tasks (the trainers), not to the batch shell.
((signal_before_limit > 0)) && sbatch_flags+=("--signal=TERM@$signal_before_limit")
launch_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
run sbatch "${sbatch_flags[@]}" "$launch_dir/slurm_job.sh" "$python" -m metachex_jax.main "--config=$config" \
  "--workdir=$workdir" "${main_flags[@]}"
