"""How far an image is from a model's training images in its feature space: the out-of-distribution (OOD) score
a saved model carries, readable without the model code.

    reference = describe(train_features, heldout_features, quantile=0.99, source={...})
    reference = describe_out_of_fold(features, folds, quantile=0.99, source={...})   # no separate held-out set
    distance = reference.distance(features)          # (N,) Mahalanobis distances (NaN rows stay NaN)
    flags = reference.flags(distance)                # distance > reference.threshold
    data = reference.to_bytes(); FeatureReference.from_bytes(data)                     # the `ood.npz` file

The description: the mean of the pooled features of (a sample of) the model's training images and their
covariance shrunk towards a scaled identity by Ledoit and Wolf's (2004) rule (`ledoit_wolf`, the same estimate as
scikit-learn's `LedoitWolf`), so it is well conditioned even with fewer images than features. The score is the
Mahalanobis distance sqrt((f - mean)' covariance^-1 (f - mean)).

The threshold comes from images the description was NOT fitted on (a validation split, or each fold's images
under the description of the other folds): with their distances sorted, d(1) <= ... <= d(n), it is d(k) with
k = ceil(quantile * (n + 1)) (at most n). A new image exchangeable with those held-out images exceeds it with
probability exactly (n + 1 - k) / (n + 1) (`expected_flag_rate`, at most 1 - quantile once n >= 1 / (1 -
quantile) - 1; with fewer images the threshold is their maximum and the rate 1 / (n + 1), which the description
records). That rate is the score's only promise: images like the training images are flagged at about that rate.
Images flagged are far from the training images in this model's features; what the features do not represent
(a change the network is blind to) is not seen, and an image not flagged is not thereby one the model handles
well.

A model directory keeps the description in `ood.npz` beside its card, and the card's "ood" entry says what it
is (`card_entry`); a pretraining run keeps one per step in WORKDIR/ood/step_<N>.npz (`run_reference_path`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math

import numpy as np

FILE = "ood.npz"
RUN_FOLDER = "ood"
DEFAULT_QUANTILE = 0.99
METHOD = "Mahalanobis distance of the pooled features; covariance shrunk by Ledoit-Wolf"


def run_reference_path(join, workdir: str, step: int) -> str:
    """WORKDIR/ood/step_<N>.npz (`join`: the path join of the caller's file system, local or gs://)."""
    return join(workdir, RUN_FOLDER, f"step_{int(step)}.npz")


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, shrunk covariance, shrinkage) of the rows of `x` (N, F): Ledoit and Wolf's estimate
    (1 - s) * S + s * mu * I, S the empirical covariance (divided by N), mu = trace(S) / F."""
    x = np.asarray(x, np.float64)
    n, f = x.shape
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 images, got {n}")
    mean = x.mean(axis=0)
    centred = x - mean
    empirical = centred.T @ centred / n
    mu = np.trace(empirical) / f
    squares = centred ** 2
    beta_sum = float(np.sum(squares.sum(axis=1) ** 2))  # sum over i, j of sum_n x_ni^2 x_nj^2
    delta_sum = float(np.sum(empirical ** 2))  # sum over i, j of (sum_n x_ni x_nj / n)^2
    beta = (beta_sum / n - delta_sum) / (f * n)
    delta = (delta_sum - 2.0 * mu * np.trace(empirical) + f * mu ** 2) / f
    beta = min(beta, delta)
    shrinkage = 0.0 if beta == 0 else beta / delta
    covariance = (1.0 - shrinkage) * empirical
    covariance.flat[::f + 1] += shrinkage * mu
    return mean, covariance, float(shrinkage)


def _precision(covariance: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(covariance)
    floor = max(values.max(), 1e-30) * 1e-12  # zero-variance features with no shrinkage (all images alike)
    return (vectors / np.maximum(values, floor)) @ vectors.T


def mahalanobis(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = np.asarray(features, np.float64) - mean
    return np.sqrt(np.maximum(np.einsum("nf,fg,ng->n", d, precision, d), 0.0))


def order_statistic_threshold(distances: np.ndarray, quantile: float) -> dict:
    """The threshold of the module docstring from held-out distances: {"threshold", "k", "n",
    "expected_flag_rate"}."""
    d = np.sort(np.asarray(distances, np.float64))
    n = len(d)
    if n == 0 or not np.isfinite(d).all():
        raise ValueError(f"the threshold needs finite distances of held-out images, got {n} "
                         f"({int(np.sum(~np.isfinite(d)))} not finite)")
    if not 0 < quantile < 1:
        raise ValueError(f"quantile={quantile}: must be in (0, 1)")
    k = min(math.ceil(quantile * (n + 1)), n)
    return {"threshold": float(d[k - 1]), "k": k, "n": n, "expected_flag_rate": (n + 1 - k) / (n + 1)}


@dataclasses.dataclass
class FeatureReference:
    """A model's training images in its feature space, and the threshold beyond which an image is flagged."""

    mean: np.ndarray  # (F,) float64
    precision: np.ndarray  # (F, F): the inverse of the shrunk covariance
    threshold: float
    info: dict  # json-ready: quantile, images, expected_flag_rate, shrinkage, source, ...

    @property
    def num_features(self) -> int:
        return len(self.mean)

    def distance(self, features) -> np.ndarray:
        """Mahalanobis distances of the rows of `features` (N, F); rows with NaN (failed files) give NaN."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features {features.shape} do not fit this description of {self.num_features} "
                             "features")
        out = np.full(len(features), np.nan)
        ok = np.isfinite(features).all(axis=1)
        out[ok] = mahalanobis(features[ok], self.mean, self.precision)
        return out

    def flags(self, distance) -> np.ndarray:
        """1 where the distance exceeds the threshold, 0 where not; -1 where the distance is NaN."""
        distance = np.asarray(distance, np.float64)
        return np.where(np.isnan(distance), -1, (distance > self.threshold).astype(np.int64))

    def card_entry(self) -> dict:
        """What a model card says about its description (the arrays are in FILE beside it)."""
        return {"file": FILE, "method": METHOD, "threshold": self.threshold, **self.info}

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, precision=self.precision.astype(np.float32),
                 threshold=np.float64(self.threshold), info=np.asarray(json.dumps(self.info)))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "") -> FeatureReference:
        try:
            with np.load(io.BytesIO(data)) as npz:
                reference = cls(npz["mean"].astype(np.float64), npz["precision"].astype(np.float64),
                                float(npz["threshold"]), json.loads(str(npz["info"])))
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{where or 'the OOD description'} is not a readable description ({FILE}): {e}") from e
        if reference.precision.shape != (reference.num_features,) * 2:
            raise ValueError(f"{where}: precision {reference.precision.shape} does not fit a mean of "
                             f"{reference.num_features} features")
        return reference


def _describe(reference_features, threshold: dict, quantile: float, source: dict, extra: dict) -> FeatureReference:
    mean, covariance, shrinkage = ledoit_wolf(reference_features)
    info = {"quantile": quantile, "reference_images": int(len(reference_features)),
            "threshold_images": threshold["n"], "threshold_rank": threshold["k"],
            "expected_flag_rate": threshold["expected_flag_rate"], "shrinkage": shrinkage,
            "num_features": int(len(mean)), **extra, "source": source}
    return FeatureReference(mean, _precision(covariance), threshold["threshold"], info)


def _check(features: np.ndarray, what: str) -> np.ndarray:
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or not np.isfinite(features).all():
        raise ValueError(f"{what}: expected finite features (N, F), got {features.shape} "
                         f"({int(np.sum(~np.isfinite(features)))} values not finite)")
    return features


def describe(reference_features, heldout_features, *, quantile: float = DEFAULT_QUANTILE,
             source: dict | None = None) -> FeatureReference:
    """The description of `reference_features` (training images), threshold from `heldout_features`
    (validation images, never the reference's)."""
    reference_features = _check(reference_features, "reference images")
    heldout_features = _check(heldout_features, "held-out images")
    mean, covariance, _ = ledoit_wolf(reference_features)
    threshold = order_statistic_threshold(mahalanobis(heldout_features, mean, _precision(covariance)), quantile)
    return _describe(reference_features, threshold, quantile, source or {},
                     {"threshold_from": "held-out images (validation)"})


def describe_out_of_fold(features, folds, *, quantile: float = DEFAULT_QUANTILE,
                         source: dict | None = None) -> FeatureReference:
    """The description of every row of `features`; the threshold from out-of-fold distances: each fold's images
    under the description of the other folds (`folds`: (N,) fold ids, at least 2 distinct)."""
    features = _check(features, "reference images")
    folds = np.asarray(folds)
    ids = np.unique(folds)
    if len(ids) < 2 or len(folds) != len(features):
        raise ValueError(f"out-of-fold distances need at least 2 folds over the {len(features)} images, got "
                         f"{len(ids)} fold(s) for {len(folds)}")
    distances = np.empty(len(features))
    for fold in ids:
        held = folds == fold
        mean, covariance, _ = ledoit_wolf(features[~held])
        distances[held] = mahalanobis(features[held], mean, _precision(covariance))
    threshold = order_statistic_threshold(distances, quantile)
    return _describe(features, threshold, quantile, source or {},
                     {"threshold_from": f"out-of-fold distances ({len(ids)} folds)"})


def seeded_folds(n: int, k: int, seed: int = 0) -> np.ndarray:
    """(n,) fold ids 0..k-1, balanced, in a seeded random order."""
    return np.random.default_rng(seed).permutation(np.arange(n) % k)
