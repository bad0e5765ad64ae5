"""What a pretraining run's features know, against random features:
`python -m metachex_jax.bench features --run=WORKDIR[,WORKDIR...] [--images=400] [--folds=5]`.

Renders fresh NIH-like demo images (generator seed `--seed`, not the demo tree's 0, so none was trained on), takes
the pooled features of an untrained, un-normalised DenseNet (`random`, the transfer's baseline) and of each run's
best checkpoint, and fits the transfer's linear probe (transfer/probe.py, inner L2 search) per NIH label in
`--folds`-fold cross-validation. Prints the per-label out-of-fold AUROC of each start; the demo's design rests on
it (docs/data.md, "What is planted, and why transfer must help"). Synthetic images only.

Human-readable lines first; the last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np
from flax import nnx

from metachex_jax.configs import pretrain
from metachex_jax.contract.pixels import PixelContract
from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.demo.records import sample_nih_records
from metachex_jax.demo.render import ChestFactors, image_key, render_chest
from metachex_jax.demo.write import to_png_array
from metachex_jax.evaluation import metrics
from metachex_jax.imaging.resize import resize_gray
from metachex_jax.models import build_model
from metachex_jax.models.runs import load_run_model
from metachex_jax.transfer.features import forward_batch
from metachex_jax.transfer.probe import ProbeSettings, fit_probe, stratified_group_folds


def nih_images(seed: int, count: int, contract: PixelContract, render_size: int = 256):
    """(uint8 model-view images (n, S, S), labels (n, 14)) of `count` fresh NIH-like demo images."""
    images, labels = [], []
    for i, record in enumerate(sample_nih_records(seed, count)):
        factors = ChestFactors(frozenset(record.findings), False, record.sex == "M", float(record.age),
                               record.view == "AP", "chestxray14")
        pixels = to_png_array(render_chest(image_key(seed, "chestxray14", i), (render_size,) * 2, factors)["image"], "L")
        images.append(contract.from_stored(resize_gray(pixels, contract.resolution)))
        labels.append([name in record.findings for name in PATHOLOGIES])
    return np.stack(images), np.asarray(labels, np.int64)


def pooled_features(model, images: np.ndarray, contract: PixelContract, batch: int = 100) -> np.ndarray:
    """The transfer's own feature pass (transfer/features.py), batch by batch."""
    model.eval()
    return np.concatenate([np.asarray(forward_batch(model, jnp.asarray(images[i:i + batch]), contract)["features"])
                           for i in range(0, len(images), batch)])


def probe_auroc(features: np.ndarray, y: np.ndarray, folds: int, seed: int = 0) -> tuple[float, np.ndarray]:
    """Out-of-fold AUROC of the transfer's probe (one image per patient here), and the out-of-fold probabilities."""
    patients = np.arange(len(y))
    fold = stratified_group_folds(y, patients, folds, seed)
    oof = np.zeros(len(y))
    for f in range(folds):
        test = fold == f
        oof[test] = fit_probe(features[~test], y[~test], features[test], ProbeSettings(),
                              groups=patients[~test]).test_prob
    return float(metrics.roc_auc(y, oof)), oof


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.bench features", description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="", help="pretraining workdirs, comma-separated ('' = random features only)")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=5, help="demo generator seed of the fresh images (tree: 0)")
    parser.add_argument("--image_size", type=int, default=64, help="S of the demo; R = S * 8 / 7")
    parser.add_argument("--arch", default="densenet121", help="architecture of the random start")
    parser.add_argument("--render_size", type=int, default=256, help="rendered image side before the resize")
    args = parser.parse_args(argv)

    contract = PixelContract(image_size=args.image_size, resolution=args.image_size * 8 // 7)
    images, labels = nih_images(args.seed, args.images, contract, args.render_size)
    model_config = pretrain.model(args.arch)
    starts = [("random", build_model(model_config, nnx.Rngs(0)))]
    starts += [(run, load_run_model(run)[0]) for run in filter(None, args.run.split(","))]
    # a label is probed when every training part keeps >= 5 images of each class (the probe's inner 5-fold search)
    smaller = np.minimum(labels.sum(0), len(labels) - labels.sum(0))
    usable = [j for j in range(len(PATHOLOGIES)) if smaller[j] - -(-smaller[j] // args.folds) >= 5]
    result = {"images": len(labels), "folds": args.folds, "seed": args.seed,
              "positives": {PATHOLOGIES[j]: int(labels[:, j].sum()) for j in usable}, "auroc": {}, "oof": {}}
    print(f"{len(labels)} fresh NIH-like images (generator seed {args.seed}), {args.folds}-fold probe per label")
    print(f"{'start':<24s}" + "".join(f"{PATHOLOGIES[j][:11]:>12s}" for j in usable))
    for name, model in starts:
        features = pooled_features(model, images, contract)
        per_label = {PATHOLOGIES[j]: probe_auroc(features, labels[:, j], args.folds) for j in usable}
        result["auroc"][name] = {label: auroc for label, (auroc, _) in per_label.items()}
        result["oof"][name] = {label: oof.tolist() for label, (_, oof) in per_label.items()}
        print(f"{name[-24:]:<24s}" + "".join(f"{auroc:>12.3f}" for auroc, _ in per_label.values()), flush=True)
    result["labels"] = {PATHOLOGIES[j]: labels[:, j].tolist() for j in usable}
    print(json.dumps({k: v for k, v in result.items() if k not in ("oof", "labels")}))
    return result
