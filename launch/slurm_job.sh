#!/usr/bin/env bash
#SBATCH --job-name=metachex
#SBATCH --output=%x-%j.out
# The batch script that launch/slurm.sh submits (or: sbatch [OPTIONS] launch/slurm_job.sh COMMAND...).
# Self-contained on purpose: sbatch runs a spooled copy of this file, away from the rest of launch/.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: sbatch --nodes=N --ntasks-per-node=G --gpus-per-node=G [...] $(basename "$0") [--dry-run] COMMAND...

Inside a SLURM allocation, starts COMMAND (e.g. python -m metachex_jax.main --config=... --workdir=...)
once per task with srun: one task per GPU, as JAX's SLURM detection expects. Every task sees all the node's
GPUs and jax.distributed.initialize() gives task SLURM_LOCALID its own GPU; process 0 (SLURM_PROCID 0)
coordinates and writes the logs. --kill-on-bad-exit stops every task when one fails, so a crash never
leaves the others waiting at a collective. --dry-run prints the srun command instead of running it.
launch/slurm.sh builds the whole sbatch command for you.
USAGE
}

dry_run=0
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  --dry-run) dry_run=1; shift ;;
esac
if (($# == 0)); then
  echo "$(basename "$0"): no command given; see --help" >&2
  exit 2
fi
if ((!dry_run)) && [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "$(basename "$0"): not inside a SLURM job; submit it with sbatch (or use launch/slurm.sh)" >&2
  exit 2
fi

srun_cmd=(srun --kill-on-bad-exit=1 "$@")
if ((dry_run)); then
  line="$(printf '%q ' "${srun_cmd[@]}")"
  echo "${line% }"
  exit 0
fi
echo "job ${SLURM_JOB_ID}: ${SLURM_NTASKS:-?} tasks on ${SLURM_JOB_NODELIST:-?}" >&2
exec "${srun_cmd[@]}"
