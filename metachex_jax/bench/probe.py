"""Benchmark of the TB transfer's two costs: `python -m metachex_jax.bench probe [--sklearn] [--extract]`.

    probe     a full 10-fold cross-validated linear probe (each fold: standardise, inner 5-fold search over the
              9 L2 strengths, refit, threshold, predict) on a Shenzhen-sized feature table: 662 x 1024, 336 TB,
              with a planted signal (or `--features=CACHE.npz`, a table the feature cache wrote). The issue's
              goal: under 10 s on 2 CPU cores.
    sklearn   (--sklearn; needs scikit-learn) the reference: scikit-learn's LogisticRegressionCV (lbfgs, the
              same grid as C = 1 / (lambda n), the same inner folds), timed on `--sklearn_folds` of the outer
              folds in the same run; the ratio is per fold.
    extract   (--extract) frozen-feature extraction throughput of DenseNet-121 (`--arch`) at `--resolution`:
              the transfer's own jitted forward pass on uint8 batches already on the device, img/s after
              compilation, on whatever backend JAX sees.

Human-readable lines first; the last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import jax
import numpy as np
from flax import nnx

from metachex_jax.configs import pretrain
from metachex_jax.contract.pixels import PixelContract
from metachex_jax.evaluation import metrics
from metachex_jax.models import build_model
from metachex_jax.transfer.features import forward_batch
from metachex_jax.transfer.probe import ProbeSettings, fit_probe, stratified_group_folds

NUM_IMAGES, NUM_TB, NUM_FEATURES = 662, 336, 1024  # the real Shenzhen set; DenseNet-121's pooled features


def planted_features(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels): ReLU-like non-negative features, a few of which shift with TB."""
    rng = np.random.default_rng(seed)
    y = np.zeros(NUM_IMAGES, np.int64)
    y[rng.permutation(NUM_IMAGES)[:NUM_TB]] = 1
    x = np.maximum(rng.normal(0.0, 1.0, (NUM_IMAGES, NUM_FEATURES)) + 0.4 * y[:, None] * (rng.random(NUM_FEATURES) < 0.05),
                   0.0)
    return x.astype(np.float32), y


def time_probe(x: np.ndarray, y: np.ndarray, folds: int, settings: ProbeSettings) -> tuple[float, np.ndarray]:
    """Seconds for the whole cross-validated probe, and its out-of-fold probabilities."""
    patients = np.arange(len(y))  # one image per patient, as in the TB sets
    fold = stratified_group_folds(y, patients, folds, settings.seed)
    oof = np.zeros(len(y))
    start = time.perf_counter()
    for f in range(folds):
        test = fold == f
        oof[test] = fit_probe(x[~test], y[~test], x[test], settings, groups=patients[~test]).test_prob
    return time.perf_counter() - start, oof


def time_sklearn(x: np.ndarray, y: np.ndarray, folds: int, num_folds: int, settings: ProbeSettings) -> float:
    """Seconds per outer fold of scikit-learn's LogisticRegressionCV on the same problem."""
    from sklearn.linear_model import LogisticRegressionCV  # optional: scikit-learn is the test extra's
    from sklearn.model_selection import PredefinedSplit
    from sklearn.preprocessing import StandardScaler

    patients = np.arange(len(y))
    fold = stratified_group_folds(y, patients, folds, settings.seed)
    seconds = []
    for f in range(num_folds):
        train = fold != f
        z = StandardScaler().fit_transform(x[train])
        inner = PredefinedSplit(stratified_group_folds(y[train], patients[train], settings.inner_folds, settings.seed))
        cs = [1.0 / (lam * train.sum()) for lam in settings.l2_grid]
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # sklearn 1.9's notice about its fitted attributes
            LogisticRegressionCV(Cs=cs, cv=inner, scoring="neg_log_loss", max_iter=settings.max_iter).fit(z, y[train])
        seconds.append(time.perf_counter() - start)
    return statistics.mean(seconds)


def extraction_throughput(arch: str, resolution: int, batch: int, batches: int) -> dict:
    config = pretrain.model(arch)
    model = build_model(config, nnx.Rngs(0))
    model.eval()
    contract = PixelContract(resolution, resolution, config.normalization, config.geometry)
    images = jax.device_put(np.random.default_rng(0).integers(0, 256, (batch, resolution, resolution), np.uint8))
    start = time.perf_counter()
    jax.block_until_ready(forward_batch(model, images, contract))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        out = forward_batch(model, images, contract)
    jax.block_until_ready(out)
    return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "arch": arch,
            "resolution": resolution, "batch": batch, "extract_compile_s": compile_s,
            "extract_img_per_s": batch * batches / (time.perf_counter() - start)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.bench probe", description=__doc__.split("\n")[0])
    parser.add_argument("--features", default="", help="a feature-cache .npz (default: planted 662 x 1024)")
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--sklearn", action="store_true", help="also time scikit-learn's LogisticRegressionCV")
    parser.add_argument("--sklearn_folds", type=int, default=1, help="outer folds timed with scikit-learn")
    parser.add_argument("--extract", action="store_true", help="also time feature extraction")
    parser.add_argument("--arch", default="densenet121")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=5, help="timed extraction batches")
    args = parser.parse_args(argv)

    if args.features:
        with np.load(args.features) as f:
            # a TB set's cached table (transfer/features.py) carries the TB label as its target (format 1: "tb")
            x, y, source = f["features"], f["target"] if "target" in f.files else f["tb"], args.features
    else:
        (x, y), source = planted_features(), "planted"
    settings = ProbeSettings()
    result = {"features": source, "n": len(y), "d": x.shape[1], "folds": args.folds}
    result["probe_s"], oof = time_probe(x, y, args.folds, settings)
    result["probe_oof_auroc"] = float(metrics.roc_auc(y, oof))
    print(f"linear probe: {args.folds}-fold CV with a {settings.inner_folds}-fold inner search over "
          f"{len(settings.l2_grid)} strengths on {len(y)} x {x.shape[1]} ({source}): {result['probe_s']:.2f} s "
          f"(out-of-fold AUROC {result['probe_oof_auroc']:.3f})")
    if args.sklearn:
        result["sklearn_s_per_fold"] = time_sklearn(x, y, args.folds, args.sklearn_folds, settings)
        result["speedup_vs_sklearn"] = result["sklearn_s_per_fold"] / (result["probe_s"] / args.folds)
        print(f"  scikit-learn LogisticRegressionCV: {result['sklearn_s_per_fold']:.2f} s per outer fold "
              f"(ours {result['probe_s'] / args.folds:.2f} s): {result['speedup_vs_sklearn']:.0f}x")
    if args.extract:
        result |= extraction_throughput(args.arch, args.resolution, args.batch, args.batches)
        print(f"feature extraction: {args.arch} at {args.resolution}px, batch {args.batch}, {result['backend']} "
              f"({result['device']}): {result['extract_img_per_s']:.1f} img/s after a {result['extract_compile_s']:.1f} s "
              "compile")
    print(json.dumps(result), flush=True)
    return result
