#!/usr/bin/env bash
# Cloud TPU VM launcher: create a TPU VM (slice), push the code, set up a virtual environment and run the
# trainer on every worker at once. See launch/README.md. Usage: launch/tpu_vm.sh --help
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") COMMAND --zone=ZONE [options] [-- MAIN_FLAGS...]

Commands (each prints the gcloud commands it runs; with --dry-run it only prints them):
  create   create the TPU VM (--accelerator-type, --version, --spot)
  push     copy the committed code (git archive of HEAD in --source) to ~/metachex-jax on every worker
  setup    idempotent: uv + Python $PYTHON_VERSION + venv ~/metachex-venv with jax[tpu], gcsfs,
           google-cloud-storage (gs:// workdirs) and metachex_jax
  copy-data  copy the prepared datasets from --data-source=gs://... to --data-dir (a local folder) on every
           worker (gcloud storage rsync: a rerun copies only what is missing)
  run      start 'python -m metachex_jax.main --config=CONFIG --workdir=WORKDIR --config.distributed=yes'
           on all workers at once (detached: it survives a dropped ssh connection), then stream worker 0's log
  logs     stream worker 0's log (~/metachex-run.log); Ctrl-C stops streaming, not the run
  stop     stop the run on every worker: SIGTERM, so that it saves a checkpoint at the next step boundary;
           waits (up to 5 minutes) until it has exited
  status   show the TPU VM's state (READY, PREEMPTED, ...)
  delete   delete the TPU VM (the workdir on Cloud Storage stays)
  up       create, push, setup, copy-data (when --data-source is given) and run

Options:
  --name=NAME              TPU VM name (default: metachex-\$USER)
  --zone=ZONE              e.g. us-central2-b (v4), us-west4-a (v5e); required
  --project=PROJECT        Google Cloud project (default: gcloud's configured project)
  --accelerator-type=TYPE  e.g. v4-8, v4-32, v5litepod-8, v5litepod-16 (default: v4-8)
  --version=RUNTIME        TPU software version (default by type: v4 tpu-ubuntu2204-base,
                           v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot                   a Spot VM: much cheaper, can be preempted at any time (see README)
  --config=CONFIG          config spec relative to the repository (default: configs/pretrain.py)
  --workdir=gs://B/P       run directory on Cloud Storage (required for run/up; a rerun resumes from it)
  --data-dir=DIR           prepared datasets as the workers see them (passed as --config.data.data_dir):
                           gs://B/P, or a folder on every worker's local disk (/abs/path or ~/path)
  --data-source=gs://B/P   copy-data: the prepared datasets in Cloud Storage (the folder holding
                           chestxray14/, shenzhen/, ...) to copy to --data-dir on every worker
  --source=DIR             checkout to push (default: the repository holding this script)
  --no-follow              run: do not stream the log after starting
  --dry-run                print the commands, run nothing
  -h, --help               this message
Everything after -- goes to metachex_jax.main unchanged, e.g. -- --config.batch_size_per_device=64

Examples:
  $(basename "$0") up --zone=us-central2-b --accelerator-type=v4-8 --spot \\
      --workdir=gs://my-bucket/runs/metachex1 --data-dir=gs://my-bucket/tensorflow_datasets
  $(basename "$0") up --zone=us-central2-b --accelerator-type=v4-8 --spot \\
      --workdir=gs://my-bucket/runs/metachex1 \\
      --data-source=gs://my-bucket/tensorflow_datasets --data-dir=~/tensorflow_datasets
USAGE
}

PYTHON_VERSION=3.12
# Paths on the workers, expanded there.
REMOTE_CODE="\$HOME/metachex-jax"
REMOTE_VENV="\$HOME/metachex-venv"
REMOTE_LOG="\$HOME/metachex-run.log"
REMOTE_PID="\$HOME/metachex-run.pid"

command="" name="metachex-${USER:-user}" zone="" project="" accelerator_type="v4-8" version="" spot=0
config="configs/pretrain.py" workdir="" data_dir="" data_source="" follow=1
source_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
main_flags=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) spot=1 ;;
    --no-follow) follow=0 ;;
    --name=* | --zone=* | --project=* | --accelerator-type=* | --version=* | --config=* | --workdir=* | \
      --data-dir=* | --data-source=* | --source=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"
      continue ;;
    --name) need_value "$1" "$#"; name="$2"; shift ;;
    --zone) need_value "$1" "$#"; zone="$2"; shift ;;
    --project) need_value "$1" "$#"; project="$2"; shift ;;
    --accelerator-type) need_value "$1" "$#"; accelerator_type="$2"; shift ;;
    --version) need_value "$1" "$#"; version="$2"; shift ;;
    --config) need_value "$1" "$#"; config="$2"; shift ;;
    --workdir) need_value "$1" "$#"; workdir="$2"; shift ;;
    --data-dir) need_value "$1" "$#"; data_dir="$2"; shift ;;
    --data-source) need_value "$1" "$#"; data_source="$2"; shift ;;
    --source) need_value "$1" "$#"; source_dir="$2"; shift ;;
    --) shift; main_flags=("$@"); break ;;
    -*) die "unknown option: $1" ;;
    *) [[ -z "$command" ]] || die "one command at a time, got '$command' and '$1'"; command="$1" ;;
  esac
  shift
done

if [[ -z "$version" ]]; then
  case "$accelerator_type" in
    v4-*) version=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
  esac
fi

PROBLEMS=()
case "$command" in
  create | push | setup | copy-data | run | logs | stop | status | delete | up) ;;
  "") PROBLEMS+=("a command is required: create, push, setup, copy-data, run, logs, stop, status, delete or up") ;;
  *) PROBLEMS+=("unknown command '$command'") ;;
esac
[[ -n "$zone" ]] || PROBLEMS+=("--zone is required")
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  PROBLEMS+=("--name must be lower-case letters, digits and hyphens, starting with a letter, got '$name'")
if [[ "$command" == create || "$command" == up ]]; then
  [[ -n "$version" ]] ||
    PROBLEMS+=("no default runtime for --accelerator-type=$accelerator_type; pass --version=RUNTIME")
fi
if [[ "$command" == run || "$command" == up ]]; then
  # Every worker writes its share of each checkpoint into the same directory, and the VM's disk is gone
  # once it is deleted or preempted: the workdir must be on Cloud Storage.
  [[ "$workdir" == gs://?* ]] || PROBLEMS+=("--workdir must be a gs:// path (shared by all workers), got '$workdir'")
fi
# A local --data-dir is a path on every worker: absolute or under the worker's home, plain characters only (it
# is expanded there, in the remote shell).
local_data_dir_pattern='^(/|~/)[A-Za-z0-9_./-]*$'
if [[ "$command" != copy-data && -n "$data_dir" && "$data_dir" != gs://?* &&
  ! "$data_dir" =~ $local_data_dir_pattern ]]; then
  PROBLEMS+=("--data-dir must be a gs:// path or a folder on the workers (/abs/path or ~/path; letters, digits, _ . / - only), got '$data_dir'")
fi
if [[ "$command" == copy-data || ( "$command" == up && -n "$data_source" ) ]]; then
  [[ "$data_source" == gs://?* ]] ||
    PROBLEMS+=("--data-source must be the gs:// folder of the prepared datasets, got '$data_source'")
  [[ "$data_dir" =~ $local_data_dir_pattern ]] ||
    PROBLEMS+=("--data-dir must be the folder on the workers to copy the datasets to (/abs/path or ~/path; letters, digits, _ . / - only), got '$data_dir'")
elif [[ -n "$data_source" ]]; then
  PROBLEMS+=("--data-source is only for copy-data and up")
fi
if [[ "$command" == push || "$command" == up ]]; then
  [[ -d "$source_dir/.git" || -f "$source_dir/.git" ]] || PROBLEMS+=("--source=$source_dir is not a git checkout")
fi
fail_if_problems

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone")
[[ -z "$project" ]] || where+=("--project=$project")

# on_workers WORKERS REMOTE_COMMAND: run a shell command on the given workers ("all" or a number).
on_workers() {
  run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" "--worker=$1" "--command=$2"
}

do_create() {
  local spot_flag=()
  ((spot)) && spot_flag=(--spot)
  run "${gcloud_tpu[@]}" create "$name" "${where[@]}" "--accelerator-type=$accelerator_type" \
    "--version=$version" "${spot_flag[@]}"
}

do_push() {
  if ! ((DRY_RUN)) && [[ -n "$(git -C "$source_dir" status --porcelain --untracked-files=no)" ]]; then
    echo "warning: $source_dir has uncommitted changes; pushing the committed HEAD only" >&2
  fi
  local tarball="${TMPDIR:-/tmp}/$name-code.tar.gz"
  run git -C "$source_dir" archive --format=tar.gz --prefix=metachex-jax/ -o "$tarball" HEAD
  run "${gcloud_tpu[@]}" scp "$tarball" "$name:metachex-jax.tar.gz" "${where[@]}" --worker=all
  on_workers all "rm -rf $REMOTE_CODE && tar -xzf \$HOME/metachex-jax.tar.gz -C \$HOME"
}

do_setup() {
  # Safe to repeat: uv and the venv are created only when missing; the install brings them up to date.
  on_workers all "set -e; export PATH=\$HOME/.local/bin:\$PATH; \
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
test -x $REMOTE_VENV/bin/python || uv venv --python $PYTHON_VERSION $REMOTE_VENV; \
uv pip install --python $REMOTE_VENV/bin/python 'jax[tpu]' gcsfs google-cloud-storage -e $REMOTE_CODE"
}

# remote_path PATH: PATH as a word for the workers' shell ("~/x" becomes $HOME/x, expanded there).
remote_path() {
  if [[ "$1" == \~/* ]]; then
    echo "\$HOME/${1#\~/}"
  else
    quote "$1"
  fi
}

do_copy_data() {
  # rsync: a rerun (say, after a Spot VM was recreated) copies only what is missing or changed.
  local target
  target="$(remote_path "$data_dir")"
  on_workers all "set -e; mkdir -p $target; gcloud storage rsync --recursive $(quote "$data_source") $target"
}

do_run() {
  # config.distributed=yes: on a TPU VM, jax.distributed.initialize() finds the slice's workers through the
  # metadata server (a single-host VM is a slice of one); the environment-variable detection cannot see it.
  local flags=("--config=$config" "--workdir=$workdir" --config.distributed=yes)
  [[ -z "$data_dir" ]] || flags+=("--config.data.data_dir=$data_dir")
  flags+=("${main_flags[@]}")
  on_workers all "set -e; cd $REMOTE_CODE; \
if test -f $REMOTE_PID && kill -0 \$(cat $REMOTE_PID) 2>/dev/null; then echo 'a run is already going' >&2; exit 1; fi; \
nohup $REMOTE_VENV/bin/python -m metachex_jax.main $(quote "${flags[@]}") >$REMOTE_LOG 2>&1 </dev/null & \
echo \$! >$REMOTE_PID"
  ((follow)) && do_logs
  return 0
}

do_logs() {
  on_workers 0 "tail -n +1 -F $REMOTE_LOG"
}

do_stop() {
  # SIGTERM: every worker's trainer saves a checkpoint at the same step and exits (metachex_jax/core/preemption.py).
  on_workers all "if test -f $REMOTE_PID; then pid=\$(cat $REMOTE_PID); kill -TERM \$pid 2>/dev/null; \
for i in \$(seq 300); do kill -0 \$pid 2>/dev/null || break; sleep 1; done; rm -f $REMOTE_PID; fi"
}

case "$command" in
  create) do_create ;;
  push) do_push ;;
  setup) do_setup ;;
  copy-data) do_copy_data ;;
  run) do_run ;;
  logs) do_logs ;;
  stop) do_stop ;;
  status) run "${gcloud_tpu[@]}" describe "$name" "${where[@]}" "--format=value(state)" ;;
  delete) run "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet ;;
  up)
    do_create; do_push; do_setup
    [[ -z "$data_source" ]] || do_copy_data
    do_run ;;
esac
