"""The out-of-distribution description (contract/ood.py) against independent references: scikit-learn's
Ledoit-Wolf estimate and Mahalanobis distances, and simulations with known truth for the threshold's promise
(held-out images like the reference are flagged at the rate the threshold implies)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.covariance import LedoitWolf

from metachex_jax.contract import ood


def correlated(rng, n: int, f: int, mixing: np.ndarray) -> np.ndarray:
    return rng.normal(size=(n, f)) @ mixing + 3.0


@pytest.mark.parametrize("n,f", [(30, 50), (200, 12), (64, 64)])
def test_ledoit_wolf_and_distances_equal_scikit_learns(n, f):
    rng = np.random.default_rng(n + f)
    x = correlated(rng, n, f, rng.normal(size=(f, f)) * 0.4)
    mean, covariance, shrinkage = ood.ledoit_wolf(x)
    reference = LedoitWolf().fit(x)
    assert shrinkage == pytest.approx(reference.shrinkage_, rel=1e-10)
    np.testing.assert_allclose(mean, reference.location_, atol=1e-12)
    np.testing.assert_allclose(covariance, reference.covariance_, rtol=1e-10, atol=1e-12)
    new = correlated(rng, 7, f, rng.normal(size=(f, f)))
    described = ood.describe(x, x[:5], quantile=0.9)
    # sklearn's mahalanobis() gives squared distances; the stored precision is float32
    np.testing.assert_allclose(described.distance(new) ** 2, reference.mahalanobis(new), rtol=1e-4)


def test_threshold_is_the_order_statistic_and_its_rate():
    d = np.arange(1.0, 21.0)  # 20 held-out distances
    t = ood.order_statistic_threshold(d[::-1], 0.9)  # k = ceil(0.9 * 21) = 19
    assert (t["threshold"], t["k"], t["n"]) == (19.0, 19, 20) and t["expected_flag_rate"] == pytest.approx(2 / 21)
    few = ood.order_statistic_threshold(d[:5], 0.99)  # too few for the 99th percentile: their maximum, 1 / (n+1)
    assert few["threshold"] == 5.0 and few["expected_flag_rate"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="not finite"):
        ood.order_statistic_threshold(np.array([1.0, np.nan]), 0.9)


def test_held_out_images_like_the_reference_are_flagged_at_the_rate_the_threshold_implies():
    """Simulation with known truth: reference, held-out and new images from one distribution. Conditional on the
    threshold a new image is flagged with probability U ~ Beta(n + 1 - k, k) (exchangeability), so over R repeats
    of m new images the flag count is a sum of beta-binomials; its mean is m R (n + 1 - k) / (n + 1) and we allow
    4 standard deviations."""
    rng = np.random.default_rng(0)
    f, n_ref, n_held, m, repeats = 8, 150, 99, 200, 60
    mixing = rng.normal(size=(f, f))
    flagged, rates = 0, set()
    for _ in range(repeats):
        described = ood.describe(correlated(rng, n_ref, f, mixing), correlated(rng, n_held, f, mixing),
                                 quantile=0.9)
        flagged += int(np.sum(described.flags(described.distance(correlated(rng, m, f, mixing))) == 1))
        rates.add(described.info["expected_flag_rate"])
    (rate,) = rates
    k = ood.order_statistic_threshold(np.arange(n_held), 0.9)["k"]
    assert rate == pytest.approx((n_held + 1 - k) / (n_held + 1)) == pytest.approx(0.1)
    sd = np.sqrt(repeats * stats.betabinom(m, n_held + 1 - k, k).var())
    assert abs(flagged - repeats * m * rate) <= 4 * sd, (flagged, repeats * m * rate, sd)
    # Shifted images (the mean moved by 3 standard deviations along one feature) are flagged in their majority.
    shifted = correlated(rng, m, f, mixing) + 3 * np.linalg.norm(mixing, axis=0)[None, :] * np.eye(f)[0]
    assert np.mean(described.flags(described.distance(shifted)) == 1) > 0.5


def test_out_of_fold_threshold_uses_each_fold_under_the_others_description():
    rng = np.random.default_rng(1)
    x = correlated(rng, 60, 5, rng.normal(size=(5, 5)))
    folds = ood.seeded_folds(60, 4, seed=3)
    assert sorted(np.bincount(folds)) == [15, 15, 15, 15]
    described = ood.describe_out_of_fold(x, folds, quantile=0.95)
    brute = []
    for fold in range(4):  # brute force: sklearn's estimate on the other folds, distances of this fold
        other = LedoitWolf().fit(x[folds != fold])
        brute += list(np.sqrt(other.mahalanobis(x[folds == fold])))
    k = int(np.ceil(0.95 * 61))
    assert described.threshold == pytest.approx(np.sort(brute)[k - 1], rel=1e-8)
    mean, covariance, _ = ood.ledoit_wolf(x)  # the description itself: every image
    np.testing.assert_allclose(described.mean, mean)
    assert described.info["reference_images"] == 60 and described.info["threshold_images"] == 60
    with pytest.raises(ValueError, match="at least 2 folds"):
        ood.describe_out_of_fold(x, np.zeros(60), quantile=0.9)


def test_description_round_trips_and_failed_rows_stay_unscored():
    rng = np.random.default_rng(2)
    x = correlated(rng, 40, 6, np.eye(6))
    described = ood.describe(x[:30], x[30:], quantile=0.9, source={"what": "test"})
    again = ood.FeatureReference.from_bytes(described.to_bytes())
    assert again.threshold == described.threshold and again.info == described.info
    queries = np.vstack([x[:3], np.full((1, 6), np.nan)])
    np.testing.assert_allclose(again.distance(queries)[:3], described.distance(queries)[:3], rtol=1e-6)
    assert np.isnan(again.distance(queries)[3]) and list(again.flags(again.distance(queries)))[3] == -1
    assert described.card_entry()["file"] == ood.FILE and described.card_entry()["source"] == {"what": "test"}
    with pytest.raises(ValueError, match="do not fit this description of 6 features"):
        described.distance(x[:, :5])
    with pytest.raises(ValueError, match="not a readable description"):
        ood.FeatureReference.from_bytes(b"not an npz", "x/ood.npz")
    with pytest.raises(ValueError, match="not finite"):
        ood.describe(np.vstack([x[:5], np.full((1, 6), np.inf)]), x[30:])
