"""A pretraining run's out-of-distribution description (contract/ood.py) of one checkpoint: the pooled features
of a seeded sample of its training images (at most `max_images`), the threshold from the same number of its
validation images at most; written to WORKDIR/ood/step_<N>.npz, where `predict` and `export` find it.

    path = describe_run(workdir, step="best", max_images=2000, quantile=0.99)

The trainer calls it at the end of a run for the best checkpoint (config.ood; the lead process, after the
checkpoints are on disk); `python -m metachex_jax.ood WORKDIR --step=N` does it for another step or an older
run. Features come from the model exactly as `predict` computes them (`Predictor` on the stored records through
the run's pixel contract). A mixture's sample takes an equal share of `max_images` from each dataset's training
split, and the same from each validation split.
"""

from __future__ import annotations

import ml_collections
import numpy as np
from absl import logging

from metachex_jax.contract import ood
from metachex_jax.core import files
from metachex_jax.data.input import datasets
from metachex_jax.data.input.spec import DataSpec
from metachex_jax.models import runs
from metachex_jax.serving.predictor import Predictor


def sample_indices(size: int, count: int, seed: int) -> np.ndarray:
    """`count` record indices out of `size` (all when size <= count), seeded, in increasing order."""
    if size <= count:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, count, replace=False))


def features_of_records(predictor: Predictor, source, indices: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, F) pooled features of records `indices` of a split (its stored images through the pixel contract)."""
    out = []
    for start in range(0, len(indices), batch_size):
        crops = np.stack([predictor.contract.from_stored(source[int(i)]["image"])
                          for i in indices[start:start + batch_size]])
        out.append(predictor(crops, features=True)["features"])
    return np.concatenate(out) if out else np.zeros((0, predictor.num_features), np.float32)


def describe_run(workdir: str, *, step: str | int = "best", max_images: int = 2000,
                 quantile: float = ood.DEFAULT_QUANTILE, seed: int = 0, data_dir: str | None = None,
                 batch_size: int = 64) -> str:
    """Describe checkpoint `step` of the run in `workdir` (module docstring); returns the file written."""
    if max_images < 2:
        raise ValueError(f"max_images={max_images}: a description needs at least 2 training images")
    config = ml_collections.ConfigDict(runs.saved_config(workdir))
    if data_dir:
        config.data.data_dir = data_dir
    predictor = Predictor.load(workdir, step=step, batch_size=batch_size)
    data = datasets.pretraining_data(DataSpec.from_config(config))
    share = max(2, max_images // len(data.splits))
    reference, heldout, counts = [], [], {}
    for name, splits in data.splits.items():
        train = sample_indices(len(splits["train"]), share, seed)
        validation = sample_indices(len(splits["validation"]), share, seed + 1)
        reference.append(features_of_records(predictor, splits["train"], train, batch_size))
        heldout.append(features_of_records(predictor, splits["validation"], validation, batch_size))
        counts[name] = {"train_images": len(train), "of_train": len(splits["train"]),
                        "validation_images": len(validation), "of_validation": len(splits["validation"])}
    source = {"run": workdir, "step": predictor.info["step"], "datasets": counts, "seed": seed,
              "reference": "a seeded sample of the training split", "threshold": "the validation split"}
    description = ood.describe(np.concatenate(reference), np.concatenate(heldout), quantile=quantile, source=source)
    path = ood.run_reference_path(files.join, files.absolute(workdir), predictor.info["step"])
    files.makedirs(files.join(files.absolute(workdir), ood.RUN_FOLDER))
    files.write_atomic(path, description.to_bytes())
    logging.info("OOD description of step %d: %d training images, threshold %.4g from %d validation images "
                 "(expected flag rate %.3f) -> %s", predictor.info["step"], description.info["reference_images"],
                 description.threshold, description.info["threshold_images"],
                 description.info["expected_flag_rate"], path)
    return path
