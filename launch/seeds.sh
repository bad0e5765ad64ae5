#!/usr/bin/env bash
# Train one config with several seeds (one run per seed), on this machine, on SLURM or on TPU VMs; optionally
# compare them as one start in a transfer run. See launch/README.md. Usage: launch/seeds.sh --help
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") --seeds=0,1,2 --workdir=BASE [options] [LAUNCHER_OPTIONS] [-- MAIN_FLAGS...]

Trains CONFIG once per seed, run s in BASE/seed_s with --config.seed=s (the model's initialisation and the data
order; the data stay the same), so that a transfer run takes them as ONE start:
    --config.init_from='BASE/seed_*'    (each run's cells, their mean and standard deviation, and the
                                         comparison decided across the runs: docs/transfer.md)
Where the runs go (--on):
  local   one after the other on this machine: PYTHON -m metachex_jax.main --config=CONFIG
          --workdir=BASE/seed_s --config.seed=s [MAIN_FLAGS...]; a rerun resumes each from its checkpoints
  slurm   one launch/slurm.sh job per seed (job name NAME-seed<s>); LAUNCHER_OPTIONS go to slurm.sh
          (e.g. --nodes=1 --gpus-per-node=8 --partition=gpu)
  tpu     one TPU VM per seed: launch/tpu_vm.sh up --name=NAME-seed<s> --no-follow, BASE on Cloud Storage;
          LAUNCHER_OPTIONS go to tpu_vm.sh (e.g. --zone=us-central2-b --accelerator-type=v4-8 --spot
          --data-dir=gs://B/tensorflow_datasets)

Options:
  --seeds=S,S,...        the seeds, non-negative integers (e.g. 0,1,2); required
  --workdir=BASE         the runs' parent folder (gs://... for --on=tpu); required
  --on=local|slurm|tpu   (default: local)
  --config=CONFIG        (default: configs/pretrain.py)
  --name=NAME            job / TPU VM name prefix (default: metachex-\$USER)
  --transfer=CONFIG      with --on=local: after the last seed, run this transfer config on all of them:
                         --config=CONFIG --config.init_from='BASE/seed_*' --workdir=BASE/transfer
  --transfer-flag=FLAG   a flag for that transfer run (repeatable), e.g. --transfer-flag=--config.demo_dir=D
  --python=PYTHON        interpreter with metachex_jax installed (default: \$PYTHON or python3)
  --dry-run              print the commands, run nothing
  -h, --help             this message
Everything after -- goes to every run's metachex_jax.main unchanged (not to the transfer run).

The synthetic demo's 3-seed check (docs/transfer.md, "The demo's results"):
  $(basename "$0") --seeds=0,1,2 --workdir=/tmp/metachex_demo_seeds --config=configs/pretrain.py:demo \\
      --transfer=configs/transfer.py:demo
USAGE
}

seeds="" workdir="" on=local config="configs/pretrain.py" name="metachex-${USER:-user}" transfer=""
python="${PYTHON:-python3}"
launcher_flags=() main_flags=() transfer_flags=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --seeds=* | --workdir=* | --on=* | --config=* | --name=* | --transfer=* | --transfer-flag=* | --python=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"
      continue ;;
    --seeds) need_value "$1" "$#"; seeds="$2"; shift ;;
    --workdir) need_value "$1" "$#"; workdir="$2"; shift ;;
    --on) need_value "$1" "$#"; on="$2"; shift ;;
    --config) need_value "$1" "$#"; config="$2"; shift ;;
    --name) need_value "$1" "$#"; name="$2"; shift ;;
    --transfer) need_value "$1" "$#"; transfer="$2"; shift ;;
    --transfer-flag) need_value "$1" "$#"; transfer_flags+=("$2"); shift ;;
    --python) need_value "$1" "$#"; python="$2"; shift ;;
    --) shift; main_flags=("$@"); break ;;
    -*) launcher_flags+=("$1") ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done

PROBLEMS=()
IFS=, read -r -a seed_list <<<"$seeds"
((${#seed_list[@]})) || PROBLEMS+=("--seeds is required, e.g. --seeds=0,1,2")
for seed in "${seed_list[@]}"; do
  is_uint "$seed" || PROBLEMS+=("--seeds: '$seed' is not a non-negative integer")
done
if [[ -n "$seeds" ]] && (($(printf '%s\n' "${seed_list[@]}" | sort | uniq -d | wc -l))); then
  PROBLEMS+=("--seeds names a seed twice: '$seeds'")
fi
[[ -n "$workdir" ]] || PROBLEMS+=("--workdir is required")
case "$on" in
  local | slurm) [[ "$workdir" != gs://* ]] || PROBLEMS+=("--on=$on needs a local or shared --workdir, got '$workdir'") ;;
  tpu) [[ "$workdir" == gs://* ]] || PROBLEMS+=("--on=tpu needs --workdir=gs://..., got '$workdir'") ;;
  *) PROBLEMS+=("--on must be local, slurm or tpu, got '$on'") ;;
esac
[[ "$on" != local ]] || ((${#launcher_flags[@]} == 0)) ||
  PROBLEMS+=("unknown option(s) for --on=local: ${launcher_flags[*]}")
[[ -z "$transfer" || "$on" == local ]] || PROBLEMS+=("--transfer runs after the seeds on this machine: --on=local only")
((${#transfer_flags[@]} == 0)) || [[ -n "$transfer" ]] || PROBLEMS+=("--transfer-flag needs --transfer")
fail_if_problems

launch_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for seed in "${seed_list[@]}"; do
  run_dir="${workdir%/}/seed_$seed"
  case "$on" in
    local) run "$python" -m metachex_jax.main "--config=$config" "--workdir=$run_dir" "--config.seed=$seed" \
      "${main_flags[@]}" ;;
    slurm) run bash "$launch_dir/slurm.sh" "--job-name=$name-seed$seed" "--config=$config" "--workdir=$run_dir" \
      "--python=$python" "${launcher_flags[@]}" -- "--config.seed=$seed" "${main_flags[@]}" ;;
    tpu) run bash "$launch_dir/tpu_vm.sh" up "--name=$name-seed$seed" "--config=$config" "--workdir=$run_dir" \
      --no-follow "${launcher_flags[@]}" -- "--config.seed=$seed" "${main_flags[@]}" ;;
  esac
done
if [[ -n "$transfer" ]]; then
  run "$python" -m metachex_jax.main "--config=$transfer" "--config.init_from=${workdir%/}/seed_*" \
    "--workdir=${workdir%/}/transfer" "${transfer_flags[@]}"
fi
