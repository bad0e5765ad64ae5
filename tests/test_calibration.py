"""Platt scaling (contract/calibration.py) against scikit-learn's logistic regression, and its monotonicity: an
operating point keeps its sensitivity and specificity on the calibrated scale."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from metachex_jax.contract import calibration
from metachex_jax.contract.outputs import Output
from metachex_jax.evaluation import metrics


def overconfident(rng, n: int):
    """Labels and probabilities of a model whose logits are 3x too large (true slope 1/3)."""
    true_logit = rng.normal(0.0, 2.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(np.int64)
    return y, 1 / (1 + np.exp(-3.0 * true_logit))


@pytest.mark.parametrize("seed", [0, 1])
def test_platt_equals_scikit_learns_logistic_regression_on_the_logit(seed):
    """sklearn's LogisticRegression with C large (no penalty to speak of) on x = logit(p); Platt's smoothed targets
    t are fitted as each image twice: label 1 with weight t, label 0 with weight 1 - t (the same likelihood)."""
    rng = np.random.default_rng(seed)
    y, prob = overconfident(rng, 300)
    platt = calibration.fit_platt(y, prob, fitted_on="test")
    x, t = calibration.logit(prob), calibration.smoothed_targets(y)
    reference = LogisticRegression(C=1e10, tol=1e-12, max_iter=10_000).fit(
        np.r_[x, x][:, None], np.r_[np.ones(len(y)), np.zeros(len(y))], sample_weight=np.r_[t, 1 - t])
    assert platt.a == pytest.approx(reference.coef_[0, 0], rel=1e-5)
    assert platt.b == pytest.approx(reference.intercept_[0], rel=1e-5, abs=1e-6)
    assert 0.2 < platt.a < 0.5  # the overconfidence is undone
    np.testing.assert_allclose(platt(prob), reference.predict_proba(x[:, None])[:, 1], rtol=1e-5)
    assert (platt.n, platt.n_positive, platt.fitted_on) == (300, int(y.sum()), "test")
    # It calibrates: on new images from the same model the ECE drops.
    y_new, prob_new = overconfident(rng, 4000)
    assert (metrics.expected_calibration_error(y_new, platt(prob_new))
            < metrics.expected_calibration_error(y_new, prob_new) / 2)


def test_the_map_is_strictly_increasing_so_the_operating_point_is_unchanged():
    rng = np.random.default_rng(3)
    y, prob = overconfident(rng, 500)
    platt = calibration.fit_platt(y[:250], prob[:250])
    held_y, held = y[250:], prob[250:]
    grid = np.sort(rng.random(10_000))
    grid = grid[np.diff(grid, prepend=-1) > 0]
    assert np.all(np.diff(platt(grid)) > 0)
    for threshold in (metrics.threshold_at_sensitivity(y[:250], prob[:250], 0.9), 0.5, float(np.median(held))):
        raw = held >= threshold
        calibrated = platt(held) >= platt(threshold)
        np.testing.assert_array_equal(raw, calibrated)
        assert (metrics.sensitivity(held_y, platt(held), platt(threshold))
                == metrics.sensitivity(held_y, held, threshold))
        assert (metrics.specificity(held_y, platt(held), platt(threshold))
                == metrics.specificity(held_y, held, threshold))


def test_separable_and_non_ranking_scores_still_give_an_increasing_map():
    y = np.array([0] * 20 + [1] * 20)
    separable = calibration.fit_platt(y, np.r_[np.linspace(0.01, 0.4, 20), np.linspace(0.6, 0.99, 20)])
    assert np.isfinite([separable.a, separable.b]).all() and separable.a > 0 and not separable.degenerate
    reversed_scores = calibration.fit_platt(y, np.r_[np.linspace(0.6, 0.99, 20), np.linspace(0.01, 0.4, 20)])
    assert reversed_scores.degenerate and reversed_scores.a == calibration.MIN_SLOPE
    assert reversed_scores(np.array([0.5]))[0] == pytest.approx(0.5, abs=1e-3)  # the smoothed base rate
    assert reversed_scores(np.array([0.3]))[0] < reversed_scores(np.array([0.7]))[0]
    saturated = calibration.fit_platt(y, np.r_[np.zeros(20), np.ones(20)])  # float32 probabilities of 0 and 1
    assert np.isfinite(saturated(np.array([0.0, 1.0]))).all()
    with pytest.raises(ValueError, match="0/1 labels"):
        calibration.fit_platt(np.array([0, 2]), np.array([0.1, 0.9]))


def test_the_calibrator_travels_with_its_output():
    platt = calibration.PlattScaling(0.4, -0.2, 30, 12, "cv_shenzhen out-of-fold predictions")
    output = Output("tb", "probability", 0.31, calibration=platt)
    entry = output.to_json()
    assert entry["calibration"]["method"] == "platt" and entry["threshold"] == 0.31
    assert Output.from_json(entry) == output
    assert Output.from_json({"name": "tb", "kind": "probability"}).calibration is None
    with pytest.raises(ValueError, match="unknown calibration method"):
        calibration.PlattScaling.from_json({"method": "isotonic", "a": 1, "b": 0})
