"""The multi-host path on one machine: two CPU processes joined over gloo, launched with launch/multinode.sh
(which sets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID and execs `python -m metachex_jax.main`),
on the tiny demo run of test_train.py. Checked: jax.distributed is initialised exactly when asked or detected;
the run trains, evaluates every test image exactly once over both hosts, logs from the lead process only and
checkpoints collectively, each host saving its own input position; a run SIGKILLed on both processes resumes
from its last checkpoint and ends with bit-identical parameters; the same run again on the first run's compilation
cache directory completes, bit-identical; a SIGTERM to one process stops both at the same step with a checkpoint,
and the restarted pair ends bit-identical too. Moving to a different number of processes (the two-process
checkpoint read by one process, with load_run_model and with the trainer's restore_latest) restores the state and
starts the input afresh. Every wait is on the processes' progress (tests/subprocesses.py): a hung run fails with
each process's Python stacks.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from test_train import ARG, REPO, logged_losses, overrides_as_flags, tiny_config

import subprocesses
from metachex_jax.data.input import datasets, pipeline
from metachex_jax.data.input.spec import DataSpec
from metachex_jax.evaluation import reports
from metachex_jax.models import build_model, runs
from metachex_jax.training import checkpointing, optim
from metachex_jax.training import steps as train_steps

LAUNCHER = os.path.join(REPO, "launch", "multinode.sh")
NUM_PROCESSES = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(workdir, demo_dir, launch: str = "first", cache=None, **overrides) -> list[subprocesses.Child]:
    """Both processes of one two-process run; their output goes to WORKDIR.logs/<launch>.process<i>.txt.

    JAX's persistent compilation cache is on with the thresholds at 0, so that every step would be cached: in
    `cache` if given, else in WORKDIR.xla, which only this workdir's runs (a run and its restart) share."""
    coordinator = f"localhost:{_free_port()}"
    os.makedirs(f"{workdir}.logs", exist_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache or f"{workdir}.xla"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    procs = []
    for i in range(NUM_PROCESSES):
        cmd = ["bash", LAUNCHER, f"--coordinator={coordinator}", f"--num-processes={NUM_PROCESSES}",
               f"--process-id={i}", f"--config={REPO}/configs/pretrain.py:{ARG}", f"--workdir={workdir}",
               f"--python={sys.executable}", "--"] + overrides_as_flags(tiny_config(demo_dir, **overrides))
        procs.append(subprocesses.start(cmd, log_path(workdir, launch, i), name=f"{launch} process {i}",
                                        cwd=REPO, env=env))
    return procs


def log_path(workdir, launch: str, i: int) -> str:
    return os.path.join(f"{workdir}.logs", f"{launch}.process{i}.txt")


def output(workdir, i: int, launch: str = "first") -> str:
    with open(log_path(workdir, launch, i)) as f:
        return f.read()


def finish(procs, workdir, launch: str = "first") -> None:
    """Wait until both processes exit (failing if the run stalls, see tests/subprocesses.py), each with status 0."""
    subprocesses.wait(procs)
    for i, p in enumerate(procs):
        code = p.popen.returncode
        assert code == 0, f"process {i} exited with {code}:\n{output(workdir, i, launch)[-4000:]}"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """An empty demo_dir: the two-process run generates and prepares the demo data itself, in turns."""
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def two_process_run(demo_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multihost") / "run"
    finish(start(workdir, demo_dir), workdir)
    return workdir


def saved_state(workdir, step):
    """A checkpointed train state read back as host numpy arrays, whatever devices wrote it."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path).item_metadata
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata.tree)
        return checkpointer.restore(path, restore_args=as_numpy)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def by_path(tree) -> dict[str, np.ndarray]:
    """{"[blocks][0][conv1][kernel]": array, ...}: list indices and dict keys spelled alike."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path).replace("'", ""): np.asarray(value) for path, value in flat}


def test_initialize_is_called_exactly_when_asked_or_detected(tmp_path):
    """maybe_initialize in a fresh process: the coordinator variables are passed on; "no" and a plain host skip it."""
    probe = ("import sys, jax; from metachex_jax.core import distributed; "
             "print(distributed.maybe_initialize(sys.argv[1]), jax.distributed.is_initialized(), jax.process_count())")
    coordinator = {"JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}", "JAX_NUM_PROCESSES": "1",
                   "JAX_PROCESS_ID": "0"}
    plain = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC",
                                                                       "JAX_PROCESS_ID", "SLURM_", "TPU_WORKER"))}
    cases = {("auto", True): "True True 1", ("no", True): "False False 1", ("auto", False): "False False 1"}
    procs = {case: subprocesses.start([sys.executable, "-c", probe, case[0]], tmp_path / f"{n}.out",
                                      stderr_log=tmp_path / f"{n}.err",
                                      env={**plain, "JAX_PLATFORMS": "cpu", **(coordinator if case[1] else {})})
             for n, case in enumerate(cases)}
    subprocesses.wait(list(procs.values()))
    for case, proc in procs.items():
        out, err = proc.output(0), proc.output(1)
        assert proc.popen.returncode == 0, err[-3000:]
        assert out.split("\n")[-2] == cases[case], (case, out, err[-3000:])


def test_two_processes_train_evaluate_log_once_and_checkpoint(two_process_run, demo_dir):
    workdir = two_process_run
    assert f"process 0/{NUM_PROCESSES}" in output(workdir, 0)  # jax.distributed joined both processes
    # The demo data (missing at the start) was prepared by process 0 alone; process 1 waited and reused it.
    assert "preparing chestxray14/" in output(workdir, 0) and "preparing" not in output(workdir, 1)
    # Only the lead process logs: each step appears once in metrics.jsonl.
    lines = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
    assert [x["step"] for x in lines if "train/loss" in x] == [1, 2, 3, 4, 5, 6]
    assert "step 6/6" in output(workdir, 0) and "step 6/6" not in output(workdir, 1)
    # Each host evaluated its own shard; gathered, every test image appears exactly once.
    test_split = datasets.chestxray14_splits(DataSpec.from_config(tiny_config(demo_dir)))["test"]
    cols = reports.read_predictions_csv(workdir / "eval" / "test_step6_predictions.csv")
    assert sorted(cols["index"].tolist()) == list(range(len(test_split)))
    # Checkpoints hold the state once and each host's own input position.
    kept = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert kept[-1] == 6
    iterator_files = sorted(os.listdir(workdir / "checkpoints" / "6" / "data_iter"))
    assert all(any(f"process_{i}-of-{NUM_PROCESSES}" in name for name in iterator_files)
               for i in range(NUM_PROCESSES)), iterator_files
    # No OOD description in a multi-process run (loading a checkpoint is collective): said, with the command.
    assert not (workdir / "ood").exists()
    assert f"python -m metachex_jax.ood {workdir} --step=6" in output(workdir, 0)


def test_killed_two_process_run_resumes_bit_identical(two_process_run, demo_dir, tmp_path):
    workdir = tmp_path / "killed"
    procs = start(workdir, demo_dir)
    try:  # orbax renames a step into place once complete
        subprocesses.wait(procs, until=lambda: (workdir / "checkpoints" / "2").exists())
    finally:
        for p in procs:
            p.popen.send_signal(signal.SIGKILL)
        for p in procs:
            p.popen.wait()
    steps_at_kill = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert steps_at_kill and max(steps_at_kill) < 6
    finish(start(workdir, demo_dir, "resumed"), workdir, "resumed")
    assert f"resumed from {workdir}/checkpoints step {max(steps_at_kill)}" in output(workdir, 0, "resumed")
    for x, y in zip(leaves(saved_state(two_process_run, 6)), leaves(saved_state(workdir, 6)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_rerun_on_the_compilation_cache_of_the_first_run_completes_bit_identical(two_process_run, demo_dir,
                                                                                     tmp_path):
    """The same run again, in a fresh workdir, on the compilation cache directory the first run used (the restart
    path of a requeued job): it completes and ends bit-identical to the first. It used to hang at its first step:
    process 0 loaded its compiled steps from the cache while process 1 compiled its own, and on CPU the all-reduce
    of a loaded executable never meets that of a freshly compiled one (the docs' Launching page, "Multi-host runs
    and the compilation cache"). Multi-process CPU runs now go without the cache, and say so."""
    workdir = tmp_path / "rerun"
    finish(start(workdir, demo_dir, cache=f"{two_process_run}.xla"), workdir)
    assert "JAX's persistent compilation cache is off: in a multi-process run on CPU" in output(workdir, 0)
    for x, y in zip(leaves(saved_state(two_process_run, 6)), leaves(saved_state(workdir, 6)), strict=True):
        np.testing.assert_array_equal(x, y)
    assert logged_losses(workdir) == logged_losses(two_process_run)


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resume_is_bit_identical(two_process_run, demo_dir,
                                                                                       tmp_path):
    """SIGTERM to process 1 only: its flag reaches process 0 through the train step (an OR over the processes), so
    both finish the step in flight, save the same step together and exit 0; the restarted pair ends bit-identical
    to the uninterrupted run."""
    workdir = tmp_path / "preempted"
    procs = start(workdir, demo_dir, checkpoint_every_steps=100)  # only evaluations (3, 6) and the signal save
    try:  # a step done: mid-run
        subprocesses.wait(procs, until=lambda: (workdir / "metrics.jsonl").exists() and logged_losses(workdir))
        done_at_signal = logged_losses(workdir)[-1][0]
        procs[1].popen.send_signal(signal.SIGTERM)
        finish(procs, workdir)  # both exit with status 0
    finally:
        for p in procs:
            if p.popen.poll() is None:
                p.popen.kill()
    assert "SIGTERM received" in output(workdir, 1) and "SIGTERM received" not in output(workdir, 0)
    stopped = [int(output(workdir, i).split("stopped at step ")[1].split()[0]) for i in range(NUM_PROCESSES)]
    assert stopped[0] == stopped[1] and done_at_signal <= stopped[0] < 6, (done_at_signal, stopped)
    kept = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert kept[-1] == stopped[0]
    iterator_files = os.listdir(workdir / "checkpoints" / str(stopped[0]) / "data_iter")
    assert all(any(f"process_{i}-of-{NUM_PROCESSES}" in name for name in iterator_files)
               for i in range(NUM_PROCESSES)), iterator_files
    finish(start(workdir, demo_dir, "resumed", checkpoint_every_steps=100), workdir, "resumed")
    assert f"resumed from {workdir}/checkpoints step {stopped[0]}" in output(workdir, 0, "resumed")
    for x, y in zip(leaves(saved_state(two_process_run, 6)), leaves(saved_state(workdir, 6)), strict=True):
        np.testing.assert_array_equal(x, y)
    assert logged_losses(workdir) == logged_losses(two_process_run)


def test_two_process_checkpoint_restores_in_one_process(two_process_run):
    model, info = runs.load_run_model(str(two_process_run), step="latest")
    assert info["step"] == 6 and info["arch"] == "densenet_tiny"
    saved = saved_state(two_process_run, 6)
    _, params, batch_stats = nnx.split(model, nnx.Param, ...)
    restored = {"params": params, "batch_stats": batch_stats}
    for part in ("params", "batch_stats"):
        expected, got = by_path(runs._unwrap_values(saved[part])), by_path(restored[part].to_pure_dict())
        assert expected.keys() == got.keys() and len(got) > 10
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"{part}{name}")
    # The restored model runs on this process's single device.
    out = model(np.zeros((2, 32, 32, 3), np.float32))
    assert np.isfinite(np.asarray(out["pathology"])).all()


def test_two_process_checkpoint_resumes_training_in_one_process(two_process_run, demo_dir):
    """What the trainer does on start-up (train.initial_state), here with 1 process and 1 device."""
    config = tiny_config(demo_dir)
    global_batch = config.batch_size_per_device * NUM_PROCESSES
    model = build_model(config.model, nnx.Rngs(config.seed))
    _, fresh = train_steps.create(model, optim.make_optimizer(config.optim, global_batch, config.max_steps))
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    manager = runs.make_manager(str(two_process_run / "checkpoints"), keep=2, async_save=False)
    train_split = datasets.chestxray14_splits(DataSpec.from_config(config))["train"]
    try:
        with pipeline.train_batches(train_split, kind="nih", global_batch_size=config.batch_size_per_device,
                                    image_size=config.data.image_size, seed=config.seed) as batches:
            step, state, meta = checkpointing.restore_latest(manager, checkpointing.abstract(fresh, here), batches)
            assert next(batches)["image"].shape[0] == config.batch_size_per_device
    finally:
        manager.close()
    assert step == 6 and int(state.step) == 6 and meta["best"]["step"] in (3, 6)
    saved = saved_state(two_process_run, 6)
    for part in ("params", "batch_stats"):
        expected = by_path(runs._unwrap_values(saved[part]))
        got = by_path(getattr(state, part).to_pure_dict())
        assert expected.keys() == got.keys() and len(got) > 10
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"{part}{name}")
