"""A broken transfer path fails a test: on a small synthetic task where pretraining matters, the pretrained start
beats the SAME checkpoint with every tensor's values shuffled ("damaged"), through the whole transfer path
(checkpoint reading, layout conversion, pixel contract, features, probe, paired comparison).

The task (written here as CSV datasets, read by the real builders): 32 px images of smooth noise with 2-5 bright or
dark disks (distractors) each; a positive image also holds one faint ring. A densenet_tiny pretrained on 256 other
such images for 100 steps (through the trainer, the label a CSV column) gives a linear probe on 80 new images an
AUROC of 0.87; its damaged copy 0.48 (measured on CPU). Loading the wrong weights, a layout conversion that
scrambles them, or features that ignore the checkpoint would put the real
start at the damaged one's level."""

from __future__ import annotations

import csv

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from metachex_jax.configs import pretrain, transfer
from metachex_jax.models import runs
from metachex_jax.training import checkpointing, trainer
from metachex_jax.transfer import run

SIZE = 32


def smooth(rng, sigma_px: float) -> np.ndarray:
    """Zero-mean unit-std random field with correlation length sigma_px (a Gaussian filter in Fourier space)."""
    f = np.fft.fftfreq(SIZE)
    transfer_fn = np.exp(-2 * (np.pi * sigma_px) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    field = np.fft.ifft2(np.fft.fft2(rng.standard_normal((SIZE, SIZE))) * transfer_fn).real
    return field / field.std()


def ring_task(folder, n: int, seed: int):
    """`n` PNGs (half with a ring) and folder/labels.csv (path, Ring)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        image = smooth(rng, 1.5) * rng.uniform(10, 30) + rng.uniform(90, 160)
        for _ in range(rng.integers(2, 6)):  # distractors: disks, bright or dark
            cy, cx = rng.uniform(3, SIZE - 3, 2)
            image += rng.choice([-1, 1]) * rng.uniform(30, 60) * (np.hypot(yy - cy, xx - cx) < rng.uniform(1.5, 3))
        if i % 2:
            cy, cx = rng.uniform(6, SIZE - 6, 2)
            image += 55 * (np.abs(np.hypot(yy - cy, xx - cx) - 3.5) < 0.8)
        image += rng.normal(0, 4, image.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / "images" / f"{i:04d}.png")
        rows.append({"path": f"images/{i:04d}.png", "Ring": str(i % 2)})
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "Ring"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "labels.csv"


def damage(run_dir, out_dir, seed: int = 0) -> None:
    """A pretraining workdir holding `run_dir`'s best checkpoint with the values of every tensor permuted."""
    source = runs.make_manager(str(run_dir / "checkpoints"), keep=1 << 30, async_save=False)
    step = max(source.all_steps())
    meta = source.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    step = meta["best"]["step"]
    state = source.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    source.close()
    rng = np.random.default_rng(seed)
    shuffled = {key: _shuffle(value, rng) for key, value in state.items()}
    target = runs.make_manager(str(out_dir / "checkpoints"), keep=1, async_save=False)
    checkpointing.save(target, step, shuffled, None, meta, metrics={runs.BEST_METRIC: meta["best"]["val_mean_auroc"]})
    target.wait_until_finished()
    target.close()


def _shuffle(tree, rng):
    def permute(leaf):
        array = np.asarray(leaf)
        return rng.permutation(array.ravel()).reshape(array.shape) if array.ndim else array

    return jax.tree.map(permute, tree)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    base = tmp_path_factory.mktemp("ring")
    csv_path = ring_task(base / "pretrain_images", 256, seed=1)
    c = pretrain.get_config("arch=densenet_tiny,res=32,datasets=csv")
    c.data.data_dir = str(base / "tfds")
    c.data.csv.update(csv=str(csv_path), manual_dir=str(base / "pretrain_images"))
    c.data.extra_labels = "Ring"
    c.model.update(metadata_tasks=[], age_hidden=0)  # the task has one label
    c.loss.weights.update(metadata=0.0, age=0.0)
    c.batch_size_per_device, c.eval_batch_size_per_device = 32, 64
    c.num_steps, c.eval_every_steps, c.log_every_steps, c.n_boot = 100, 100, 50, 10
    c.optim.update(lr=3e-3, schedule="cosine", warmup_steps=5, lr_scaling="none")
    workdir = base / "pre"
    trainer.train_and_evaluate(c, str(workdir))
    return base, workdir


def test_a_damaged_start_loses_to_the_real_one(pretrained, tmp_path):
    base, workdir = pretrained
    damage(workdir, tmp_path / "damaged")
    csv_path = ring_task(tmp_path / "task", 80, seed=2)
    c = transfer.get_config("arch=densenet_tiny,res=32,methods=probe")
    c.update_from_flattened_dict({
        "init_from": str(workdir), "compare_with": str(tmp_path / "damaged"), "data.data_dir": str(tmp_path / "tfds"),
        "data.csv.csv": str(csv_path), "data.csv.manual_dir": str(tmp_path / "task"), "data.csv.num_folds": 5,
        "init_name": "pretrained", "protocols": "cv_csv", "targets": "Ring", "feature_cache_dir": str(tmp_path / "cache"),
        "n_boot": 200,
        "deploy.start": "none", "probe.inner_folds": 5})
    result = run.run(c, str(tmp_path / "tb"))
    assert list(result["starts"]) == ["pretrained", "chexnet"]  # the damaged copy: a run without metadata heads
    real, damaged = (result["cells"][f"{name}/probe"]["cv_csv"]["auroc"]["value"] for name in result["starts"])
    assert result["starts"]["chexnet"]["source"] == str(tmp_path / "damaged")
    assert result["starts"]["chexnet"]["weights_fingerprint"] != result["starts"]["pretrained"]["weights_fingerprint"]
    assert real > 0.8 and damaged < real - 0.2, (real, damaged)  # measured: 0.87 vs 0.48
    [comparison] = result["paired"]["cv_csv"]
    assert comparison["wins"] == "pretrained/probe"  # by the rule: Holm-adjusted test and paired CI agree
