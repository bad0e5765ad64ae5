"""The pretraining trainer end to end on a tiny synthetic ChestX-ray14 (the demo generator, 64 px) and a tiny
DenseNet: outputs, metrics vs scikit-learn, resume after SIGKILL, NaN stop, corrupt-checkpoint fallback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from sklearn.metrics import roc_auc_score

import subprocesses
from metachex_jax.configs import chexnet, pretrain
from metachex_jax.core import errors, sharding
from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.evaluation import reports
from metachex_jax.models import runs
from metachex_jax.training import checkpointing, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = dict(seed=0, num_nih=160, num_shenzhen=12, num_montgomery=8, num_hospital=40, size=64)
ARG = "demo,arch=densenet_tiny,res=32"


def tiny_config(demo_dir, **overrides):
    c = pretrain.get_config(ARG)
    c.demo_dir = str(demo_dir)
    c.demo_data.update(DEMO)
    c.batch_size_per_device = 8
    c.eval_batch_size_per_device = 16
    c.num_epochs = 1
    c.max_steps = 6
    c.eval_every_steps = 3
    c.checkpoint_every_steps = 2
    c.log_every_steps = 1
    c.n_boot = 20
    c.optim.warmup_steps = 2
    c.update_from_flattened_dict(overrides)
    return c


def overrides_as_flags(c) -> list[str]:
    """The same config for `python -m metachex_jax.main` (what differs from the `ARG` config file)."""
    return [f"--config.demo_dir={c.demo_dir}"] + [f"--config.demo_data.{k}={v}" for k, v in DEMO.items()] + [
        f"--config.{k}={c[k]}" for k in ("batch_size_per_device", "eval_batch_size_per_device", "num_epochs",
                                         "max_steps", "eval_every_steps", "checkpoint_every_steps",
                                         "log_every_steps", "n_boot")] + [
        f"--config.optim.warmup_steps={c.optim.warmup_steps}"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def finished_run(demo_dir, tmp_path_factory):
    """One uninterrupted tiny run (6 steps, evaluations at 3 and 6, checkpoints at 2, 3, 4, 6)."""
    workdir = tmp_path_factory.mktemp("run")
    result = trainer.train_and_evaluate(tiny_config(demo_dir), str(workdir))
    return workdir, result


def saved_state(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)


def test_run_writes_every_output_and_metrics_match_sklearn(finished_run):
    workdir, result = finished_run
    files = set(os.listdir(workdir / "eval"))
    for stem in ("validation_step3", "validation_step6", "test_step6"):
        assert {f"{stem}.json", f"{stem}.md", f"{stem}_predictions.csv"} <= files
    lines = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
    assert [x["step"] for x in lines if "train/loss" in x] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(x["train/loss"]) for x in lines if "train/loss" in x)
    assert any("val/mean_auroc" in x for x in lines) and any("test/mean_auroc" in x for x in lines)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard"))
    # Every test image exactly once, and the per-pathology AUROCs agree with scikit-learn on the saved CSV.
    cols = reports.read_predictions_csv(workdir / "eval" / "test_step6_predictions.csv")
    assert len(set(cols["image_name"])) == len(cols["image_name"]) > 0
    saved = json.load(open(workdir / "eval" / "test_step6.json"))
    for j, name in enumerate(PATHOLOGIES):
        y, p = cols["pathology"][:, j], cols["pathology_prob"][:, j]
        got = saved["pathology"][name]["auroc"]["value"]
        if 0 < y.sum() < len(y):
            assert abs(got - roc_auc_score(y, p)) < 1e-6
        else:
            assert got is None
    assert result["mean_auroc"]["value"] == pytest.approx(saved["mean_auroc"]["value"])
    # Kept: the latest two (4, 6) and the best by validation mean AUROC (3 or 6).
    kept = {int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()}
    assert {4, 6} <= kept <= {3, 4, 6}


def test_resume_after_sigkill_is_bit_identical(demo_dir, finished_run, tmp_path):
    reference, _ = finished_run
    workdir = tmp_path / "killed"
    cache = tmp_path / "xla"  # the restart runs with the compilation cache the killed run wrote
    cmd = [sys.executable, "-m", "metachex_jax.main", f"--config={REPO}/configs/pretrain.py:{ARG}",
           f"--workdir={workdir}", f"--compilation_cache_dir={cache}"] + overrides_as_flags(tiny_config(demo_dir))
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # cache even the tiny model's steps
    proc = subprocesses.start(cmd, tmp_path / "killed.log", cwd=REPO, env=env)
    try:  # orbax renames a step directory into place when complete
        subprocesses.wait([proc], until=lambda: (workdir / "checkpoints" / "2").exists())
    finally:
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait()
    steps_at_kill = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert steps_at_kill and max(steps_at_kill) < 6
    assert any(cache.iterdir())
    done = subprocesses.run(cmd, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    a, b = saved_state(reference, 6), saved_state(workdir, 6)
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_the_console_shows_the_runs_own_lines_and_the_log_file_every_librarys(demo_dir, tmp_path):
    """A run's console holds its own progress lines, not orbax's INFO lines for every checkpoint save and deletion;
    those, with the whole config, are in the run's log file (WORKDIR/logs/process_0.log)."""
    workdir = tmp_path / "run"
    config = tiny_config(demo_dir, max_steps=3, eval_every_steps=3, checkpoint_every_steps=1)
    cmd = [sys.executable, "-m", "metachex_jax.main", f"--config={REPO}/configs/pretrain.py:{ARG}",
           f"--workdir={workdir}", "--compilation_cache_dir=", "--config.keep_checkpoints=1",
           ] + overrides_as_flags(config)
    done = subprocesses.run(cmd, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    for line in ("step 1/3 loss", "step 3/3 loss", "validation at step 3: loss", "mean AUROC"):
        assert line in console, line
    log = (workdir / "logs" / "process_0.log").read_text()
    # What orbax says for each save and deletion (and TFDS while preparing), and the config, are in the log only.
    for chatter in ("Saving checkpoint at step 2", "Queuing deletion of steps", "Finished saving checkpoint",
                    "batch_size_per_device: 8"):
        assert chatter in log and chatter not in console, chatter
    assert "checkpoint_manager.py" not in console and "Downloading and preparing dataset" not in console
    assert "step 3/3 loss" in log  # the log keeps the run's own lines too


@pytest.fixture(scope="module")
def finished_device_run(demo_dir, tmp_path_factory):
    """The tiny run of `finished_run` with augmentation in the train step (augment_on="device")."""
    workdir = tmp_path_factory.mktemp("device_run")
    trainer.train_and_evaluate(tiny_config(demo_dir, **{"data.augment_on": "device"}), str(workdir))
    return workdir


def logged_losses(workdir) -> list[tuple[int, float]]:
    """(step, loss) of every train line of metrics.jsonl so far (complete lines only: it may be being written)."""
    lines = [x for x in (workdir / "metrics.jsonl").read_text().splitlines(keepends=True) if x.endswith("\n")]
    return [(x["step"], x["train/loss"]) for x in map(json.loads, lines) if "train/loss" in x]


def test_sigterm_saves_the_step_and_the_resumed_run_is_bit_identical(demo_dir, finished_device_run, tmp_path):
    """A real SIGTERM mid-run: the run finishes the step in flight, saves it, exits 0; the same command resumes and
    ends bit-identical to the uninterrupted run. With augment_on="device": the augmentation's randomness comes
    from the checkpointed step, so this is also the device augmentation's resume test."""
    workdir = tmp_path / "stopped"
    cache = tmp_path / "xla"
    # No periodic checkpoints (evaluations at 3 and 6 still save): the signal's checkpoint is the one to resume from.
    cmd = [sys.executable, "-m", "metachex_jax.main", f"--config={REPO}/configs/pretrain.py:{ARG}",
           f"--workdir={workdir}", f"--compilation_cache_dir={cache}", "--config.data.augment_on=device",
           ] + overrides_as_flags(tiny_config(demo_dir, checkpoint_every_steps=100))
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    proc = subprocesses.start(cmd, tmp_path / "stopped.log", cwd=REPO, env=env)
    try:  # a step done: mid-run
        subprocesses.wait([proc], until=lambda: (workdir / "metrics.jsonl").exists() and logged_losses(workdir))
        done_at_signal = logged_losses(workdir)[-1][0]
        proc.popen.send_signal(signal.SIGTERM)
        subprocesses.wait([proc])
    finally:
        if proc.popen.poll() is None:
            proc.popen.kill()
    stderr = proc.output()
    assert proc.popen.returncode == 0, stderr[-3000:]
    assert "SIGTERM received: saving a checkpoint at the next step boundary" in stderr
    saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    stopped_at = int(stderr.split("stopped at step ")[1].split()[0])
    assert saved[-1] == stopped_at and done_at_signal <= stopped_at < 6, (done_at_signal, stopped_at)
    assert not (workdir / "eval" / "test_step6.json").exists()  # it stopped before the end
    done = subprocesses.run(cmd, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {workdir}/checkpoints step {stopped_at}" in done.stderr
    for x, y in zip(_leaves(saved_state(finished_device_run, 6)), _leaves(saved_state(workdir, 6)), strict=True):
        np.testing.assert_array_equal(x, y)
    # Every step was trained (and logged) once, with the uninterrupted run's losses (augmentation included).
    assert logged_losses(workdir) == logged_losses(finished_device_run)


def _leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(demo_dir, finished_run, tmp_path):
    workdir = tmp_path / "nan"
    shutil.copytree(finished_run[0], workdir)
    before = sorted(os.listdir(workdir / "checkpoints"))
    config = tiny_config(demo_dir, max_steps=12, num_epochs=5, **{"loss.weights.age": float("nan")})
    with pytest.raises(errors.NonFiniteLossError, match="loss is nan at step 7"):
        trainer.train_and_evaluate(config, str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_resume_keeps_the_worker_count_its_input_position_was_saved_with(demo_dir, finished_run, tmp_path):
    workdir = tmp_path / "workers"
    shutil.copytree(finished_run[0], workdir)
    meta = json.loads((workdir / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["input_workers"] == 0  # auto (-1) on the CPU backend: in-process
    config = tiny_config(demo_dir, max_steps=8, **{"data.workers": 2})
    with pytest.raises(ValueError, match=r"config.data.workers=2, but the checkpoint .* with 0 worker\(s\); "
                                         r"resume with --config.data.workers=0"):
        trainer.train_and_evaluate(config, str(workdir))


def test_corrupt_latest_checkpoint_falls_back_to_previous(finished_run, tmp_path, caplog):
    workdir = tmp_path / "corrupt"
    shutil.copytree(finished_run[0], workdir)
    state_dir = workdir / "checkpoints" / "6" / "state"
    for root, _, names in os.walk(state_dir):
        for name in names:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    manager = runs.make_manager(str(workdir / "checkpoints"), keep=2, async_save=False)
    like = saved_state(finished_run[0], 4)
    import jax
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step, state, meta = checkpointing.restore_latest(manager, checkpointing.abstract(like, cpu))
    manager.close()
    assert step == 4
    assert any("step 6" in r.getMessage() and "could not be restored" in r.getMessage() for r in caplog.records)
    for x, y in zip(_leaves(like), _leaves(state)):
        np.testing.assert_array_equal(x, y)


def test_missing_dataset_says_how_to_prepare_it_or_run_the_demo(tmp_path):
    config = pretrain.get_config("arch=densenet_tiny")
    config.data.data_dir = str(tmp_path / "no_data")
    with pytest.raises(FileNotFoundError) as e:
        trainer.train_and_evaluate(config, str(tmp_path / "wd"))
    message = str(e.value)
    assert "chestxray14/r256" in message and str(tmp_path / "no_data") in message
    assert "python -m metachex_jax.prepare --dataset=chestxray14" in message
    assert "configs/pretrain.py:demo" in message


def test_start_order_own_workdir_then_resume_then_model_init(demo_dir, finished_run, tmp_path):
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from metachex_jax.interop import convert
    from metachex_jax.models import DenseNet, build_model
    from metachex_jax.training import optim
    from metachex_jax.training import steps as train_steps

    donor = DenseNet("densenet_tiny", num_classes=None, rngs=nnx.Rngs(7))
    convert.save_backbone(donor, tmp_path / "backbone", source="test")
    config = tiny_config(demo_dir, model_init=str(tmp_path / "backbone"))
    tx = optim.make_optimizer(config.optim, 8, 6)
    graphdef, fresh = train_steps.create(build_model(config.model, nnx.Rngs(0)), tx)
    replicated = NamedSharding(sharding.make_mesh(), PartitionSpec())
    fresh = jax.device_put(fresh, replicated)

    def start(workdir):
        manager = runs.make_manager(str(workdir / "checkpoints"), keep=2, async_save=False)
        try:
            return trainer.initial_state(config, str(workdir), manager, graphdef, fresh, replicated, None, tx)
        finally:
            manager.close()

    # 3. model_init: the backbone is the donor's, the heads are the fresh random ones.
    state, _, source = start(tmp_path / "a")
    assert source.startswith("backbone from")
    model = train_steps.model_of(graphdef, state)
    np.testing.assert_array_equal(model.backbone.conv0.kernel[...], donor.conv0.kernel[...])
    np.testing.assert_array_equal(model.backbone.norm5.mean[...], donor.norm5.mean[...])
    np.testing.assert_array_equal(model.pathology_head.kernel[...],
                                  train_steps.model_of(graphdef, fresh).pathology_head.kernel[...])
    # 2. resume (another run's full state) wins over model_init.
    config.resume = str(finished_run[0])
    state, _, source = start(tmp_path / "b")
    assert source.startswith("full state from") and int(state.step) == 6
    for x, y in zip(_leaves(state.params), _leaves(saved_state(finished_run[0], 6)["params"])):
        np.testing.assert_array_equal(x, y)
    # 1. the run's own checkpoints win over everything.
    own = tmp_path / "own"
    shutil.copytree(finished_run[0] / "checkpoints", own / "checkpoints")
    shutil.rmtree(own / "checkpoints" / "6")
    state, _, source = start(own)
    assert source.startswith("resumed from") and int(state.step) == 4


def test_chexnet_baseline_trains_through_the_same_trainer(demo_dir, tmp_path):
    config = chexnet.get_config("demo,arch=densenet_tiny,res=32")
    config.demo_dir = str(demo_dir)
    config.demo_data.update(DEMO)
    config.update_from_flattened_dict({"batch_size_per_device": 8, "eval_batch_size_per_device": 16, "max_steps": 2,
                                       "eval_every_steps": 2, "log_every_steps": 1, "n_boot": 10})
    result = trainer.train_and_evaluate(config, str(tmp_path / "chexnet"))
    assert set(result) >= {"pathology", "mean_auroc"} and "age" not in result and "sex_male" not in result
    cols = reports.read_predictions_csv(tmp_path / "chexnet" / "eval" / "test_step2_predictions.csv")
    assert "pathology_prob" in cols and "age_pred" not in cols
