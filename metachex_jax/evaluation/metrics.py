"""Evaluation metrics with patient-level bootstrap confidence intervals (numpy only).

Design
------
Every metric takes an optional `weight_mask`: non-negative per-example weights. A 0/1 mask says which
examples count (a label may be unknown, e.g. sex = -1); integer weights are multiplicities, so a weighted
metric equals the metric of the data set in which example i appears weight_mask[i] times. `weight_mask`
may also be 2-D, shape (N, B): B weightings at once (one column each), giving B results. The bootstrap
uses exactly this: a resample is a vector of multiplicities, so B resamples are one (N, B) weight matrix
and every metric is computed for a chunk of resamples in a few vectorised passes over it. Examples run
along axis 0 so that the cumulative sums the ROC needs add contiguous rows of B values (fast in numpy).

Entries whose weight is 0 in every weighting are ignored entirely: their labels and scores may hold
anything (NaN, -1 for "unknown"). Entries that count must have 0/1 labels and finite scores; otherwise a
ValueError names every offending index. All arithmetic is float64 whatever the input dtype (float32 scores
are upcast exactly), so a metric recomputed from a lossless copy of the inputs is bit-identical.

Undefined metrics are NaN, never an error: AUROC (and sensitivity / specificity) when a class is absent,
MAE when nothing counts, Pearson r when either variable has zero variance.

Bootstrap: `bootstrap_distribution` resamples GROUPS (patients) with replacement, as many groups as there
are, so all images of a patient enter or leave a resample together (images of one patient are correlated;
resampling rows would understate the uncertainty). Resample b is drawn from one numpy Generator seeded with
`seed`, in order, so the resamples depend only on (groups, n_boot, seed): two calls with the same
arguments see the same resamples, which makes CIs of several metrics paired. Resamples in which a metric is
undefined give NaN; `percentile_ci` drops them and `count_undefined` counts them so reports can show it.

Comparisons and screening (used by the TB transfer report):
- `delong_test` (two correlated AUROCs on the same cases, DeLong 1988), `clustered_auc_test` (the same when
  patients have several images: Obuchowski 1997, patients as clusters), `holm_adjust` (a family of tests),
  `paired_bootstrap_difference` (metric(a) - metric(b) with both evaluated on every resample).
- Operating points: `threshold_at_sensitivity` / `threshold_at_specificity` choose a threshold on training data;
  `specificity_at_sensitivity` / `sensitivity_at_specificity` are the test-set oracle values; `roc_band` is a
  bootstrap band of the ROC curve.
- Calibration: `brier_score`, `expected_calibration_error`, `reliability_curve`.

`evaluate_multitask` (at the end) applies all of this to the MetaChexNet heads: per-pathology and mean
AUROC, sex and view AUROC and accuracy, age MAE and Pearson r, each with a patient-bootstrap CI.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from metachex_jax.core.labels import PATHOLOGIES

# Bootstrap weight matrices are built in chunks of at most this many elements (N * B float64 = 32 MB).
_CHUNK_ELEMENTS = 4_000_000


# ----------------------------------------------------------------------------------------------------
# Input checking: every check names all offending entries, and entries that do not count are zeroed.
# ----------------------------------------------------------------------------------------------------

def _offenders(bad: np.ndarray, values: np.ndarray) -> str:
    """'index: value, ...' for every True entry of `bad` (indices are tuples for 2-D arrays)."""
    return ", ".join(f"{int(i[0]) if len(i) == 1 else tuple(int(j) for j in i)}: {v!r}"
                     for i, v in zip(np.argwhere(bad), values[bad].tolist()))


def _check_1d(name: str, x, n: int | None = None) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} entries, expected {n}")
    return a


def _check_weights(weight_mask, n: int, name: str = "weight_mask") -> np.ndarray:
    """float64 weights of shape (N,) or (N, B); ones when None."""
    if weight_mask is None:
        return np.ones(n, dtype=np.float64)
    w = np.asarray(weight_mask, dtype=np.float64)
    if w.ndim not in (1, 2) or w.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) or ({n}, B); got {w.shape}")
    if w.size and np.isfinite(w.sum()) and w.min() >= 0:  # fast path: two reductions, no temporaries
        return w
    bad = ~(w >= 0) | ~np.isfinite(w)
    if bad.any():
        raise ValueError(f"{name} must be finite and >= 0; offending entries (index: value): "
                         + _offenders(bad, w))
    return w


def _rows_counted(w: np.ndarray) -> np.ndarray:
    """(N,) bool: examples with a positive weight in at least one weighting."""
    return (w > 0) if w.ndim == 1 else (w > 0).any(axis=1)


def _check_binary(name: str, y, counted: np.ndarray) -> np.ndarray:
    """float64 0/1 labels, 0 where not counted."""
    y = np.asarray(y, dtype=np.float64)
    bad = counted & (y != 0) & (y != 1)
    if bad.any():
        raise ValueError(f"{name} must be 0 or 1 where it counts (weight > 0); offending entries "
                         f"(index: value): " + _offenders(bad, y))
    return np.where(counted, y, 0.0)


def _check_finite(name: str, x, counted: np.ndarray) -> np.ndarray:
    """float64 values, 0 where not counted."""
    x = np.asarray(x, dtype=np.float64)
    bad = counted & ~np.isfinite(x)
    if bad.any():
        raise ValueError(f"{name} must be finite where it counts (weight > 0); offending entries "
                         f"(index: value): " + _offenders(bad, x))
    return np.where(counted, x, 0.0)


def _binary_inputs(y_true, score, weight_mask):
    """Checked (labels, scores, weights) of a binary task."""
    y_true = _check_1d("y_true", y_true)
    score = _check_1d("score", score, y_true.shape[0])
    w = _check_weights(weight_mask, y_true.shape[0])
    counted = _rows_counted(w)
    return _check_binary("y_true", y_true, counted), _check_finite("score", score, counted), w


def _ratio(num, den):
    """num / den with NaN where den == 0; a Python float for scalar inputs."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return float(out) if out.ndim == 0 else out


def _weighted_sum(v: np.ndarray, w: np.ndarray):
    """sum_n v[n] * w[n, ...]: a scalar for (N,) weights, (B,) for (N, B). (einsum: much faster than a
    BLAS matrix-vector product for these shapes on a busy CPU.)"""
    return np.einsum("n,n...->...", v, w)


def _per_row(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Shape a per-example (N,) array to broadcast against weights of shape (N,) or (N, B)."""
    return v if w.ndim == 1 else v[:, None]


# ----------------------------------------------------------------------------------------------------
# ROC
# ----------------------------------------------------------------------------------------------------

def _auc(positive: np.ndarray, negative: np.ndarray, score: np.ndarray, w: np.ndarray):
    """Weighted AUROC from per-example class factors (label * mask, (1 - label) * mask) and weights.

    AUROC = P(a random positive scores above a random negative) + P(they tie) / 2. Sort the positives by
    decreasing score and let cp[j] be the weight of the j highest; with k_gt(r) / k_ge(r) the number of
    positives scoring > / >= score[r], the positive weight strictly above example r is cp[k_gt(r)] and
    the tied positive weight is cp[k_ge(r)] - cp[k_gt(r)]. Summing these over the negatives, times their
    weight, gives the Mann-Whitney statistic. The ranks do not depend on the weights, so B weightings
    need one sort, one cumulative sum over the positives and one pass over the (N, B) weights.
    """
    distinct, group = np.unique(-score, return_inverse=True)  # group: rank of the score, highest first
    pos_rows = np.flatnonzero(positive > 0)
    pos_per_group = np.bincount(group[pos_rows], minlength=len(distinct))
    k_ge = np.cumsum(pos_per_group)[group]
    k_gt = k_ge - pos_per_group[group]
    top = pos_rows[np.argsort(group[pos_rows], kind="stable")]
    cp = np.zeros((len(top) + 1,) + w.shape[1:])  # cp[j]: weight of the j highest-scoring positives
    np.cumsum(w[top] * _per_row(positive[top], w), axis=0, out=cp[1:])
    above = np.einsum("n...,n,n...->...", w, negative, cp[k_gt])
    tied = np.flatnonzero(k_ge != k_gt)  # examples tied with some positive (usually few)
    ties = np.einsum("n...,n,n...->...", w[tied], negative[tied], cp[k_ge[tied]] - cp[k_gt[tied]])
    return _ratio(above + 0.5 * ties, cp[-1] * _weighted_sum(negative, w))


def roc_auc(y_true, score, weight_mask=None):
    """Area under the ROC curve, exact, ties counted as half (= Mann-Whitney U / (n_pos * n_neg)).

    Args:
      y_true: (N,) 0/1 labels (anything where weight_mask is 0).
      score: (N,) scores on any scale (probabilities or logits); float32 is fine.
      weight_mask: None, (N,) or (N, B) non-negative weights (0/1 mask or multiplicities).
    Returns:
      a float, or (B,) float64 for a 2-D weight_mask; NaN where the counted examples hold one class only.
    Agrees with sklearn.metrics.roc_auc_score(y_true, score, sample_weight=weight_mask), which raises
    instead of returning NaN for one class.
    """
    y, s, w = _binary_inputs(y_true, score, weight_mask)
    return _auc(y, 1.0 - y, s, w)


def roc_auc_per_column(y_true, score, mask=None, weight_mask=None,
                       column_names: Sequence[str] | None = None):
    """AUROC of each column of (N, K) labels and scores; `mask` (N, K) marks known labels (weight 0/1).

    Returns (K,) or, for an (N, B) weight_mask, (B, K); NaN for a column with one class. Errors name the
    column (by `column_names` when given) and every offending entry.
    """
    y, s = np.asarray(y_true), np.asarray(score)
    if y.ndim != 2 or s.shape != y.shape:
        raise ValueError(f"y_true and score must both be (N, K); got {y.shape} and {s.shape}")
    n, k = y.shape
    names = list(column_names) if column_names is not None else [str(j) for j in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} column_names for {k} columns")
    m = np.ones(y.shape) if mask is None else _check_weights(mask, n, "mask")
    if m.shape != y.shape:
        raise ValueError(f"mask must have shape {y.shape}; got {m.shape}")
    w = _check_weights(weight_mask, n)
    rows = _rows_counted(w)
    errors, columns = [], []
    for j in range(k):
        counted = rows & (m[:, j] > 0)
        try:
            yj = _check_binary(f"y_true[:, {names[j]}]", y[:, j], counted)
            sj = _check_finite(f"score[:, {names[j]}]", s[:, j], counted)
        except ValueError as e:
            errors.append(str(e))
            continue
        columns.append((yj, sj, m[:, j]))
    if errors:
        raise ValueError("\n".join(errors))
    # The label mask multiplies the per-example factors, never the (N, B) weight matrix.
    return np.stack([_auc(yj * mj, (1.0 - yj) * mj, sj, w) for yj, sj, mj in columns], axis=-1)


def roc_curve(y_true, score, weight_mask=None):
    """ROC curve at every distinct score, like sklearn.metrics.roc_curve(..., drop_intermediate=False).

    Examples with weight 0 are dropped first (as sklearn does). The curve starts at (0, 0) with threshold
    +inf, then has one point per distinct counted score, highest first; a point's rates are those of the
    rule "positive when score >= threshold". If a class is absent, its rate (fpr without negatives, tpr
    without positives) is all NaN, as in sklearn (which also warns).

    Returns:
      fpr, tpr, thresholds: float64 arrays of length (number of distinct counted scores + 1).
    """
    y, s, w = _binary_inputs(y_true, score, weight_mask)
    if w.ndim != 1:
        raise ValueError("roc_curve takes a 1-D weight_mask")
    keep = w > 0
    # Distinct scores in decreasing order; each point adds the weight of every example at that score.
    neg_thresholds, group = np.unique(-s[keep], return_inverse=True)
    pos = np.bincount(group, weights=w[keep] * y[keep], minlength=len(neg_thresholds))
    neg = np.bincount(group, weights=w[keep] * (1.0 - y[keep]), minlength=len(neg_thresholds))
    tp, fp = np.r_[0.0, np.cumsum(pos)], np.r_[0.0, np.cumsum(neg)]
    tpr = tp / tp[-1] if tp[-1] > 0 else np.full(tp.shape, np.nan)
    fpr = fp / fp[-1] if fp[-1] > 0 else np.full(fp.shape, np.nan)
    return fpr, tpr, np.r_[np.inf, -neg_thresholds]


def youden_threshold(y_true, score, weight_mask=None) -> float:
    """The score threshold maximising Youden's J = sensitivity + specificity - 1 = TPR - FPR.

    Pick the operating point on TRAINING (or validation) data, then apply the returned threshold unchanged
    to test data with `sensitivity` / `specificity` / `accuracy` (all "positive when score >= threshold").
    Candidates are the distinct counted scores (sklearn's roc_curve thresholds without +inf); among equal
    J the highest threshold (the most specific rule) wins. Raises if a class is absent (J is undefined).
    """
    fpr, tpr, thresholds = roc_curve(y_true, score, weight_mask)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        raise ValueError("youden_threshold needs both classes among the counted examples")
    j = tpr[1:] - fpr[1:]
    return float(thresholds[1:][np.argmax(j)])


# ----------------------------------------------------------------------------------------------------
# Thresholded classification metrics: "positive when score >= threshold"
# ----------------------------------------------------------------------------------------------------

def accuracy(y_true, score, threshold: float = 0.5, weight_mask=None):
    """Weighted fraction of examples with (score >= threshold) == y_true; NaN if nothing counts."""
    y, s, w = _binary_inputs(y_true, score, weight_mask)
    correct = ((s >= threshold) == (y == 1)).astype(np.float64)
    return _ratio(_weighted_sum(correct, w), np.sum(w, axis=0))


def sensitivity(y_true, score, threshold: float, weight_mask=None):
    """True positive rate of "positive when score >= threshold"; NaN without positives."""
    y, s, w = _binary_inputs(y_true, score, weight_mask)
    return _ratio(_weighted_sum(y * (s >= threshold), w), _weighted_sum(y, w))


def specificity(y_true, score, threshold: float, weight_mask=None):
    """True negative rate of "positive when score >= threshold"; NaN without negatives."""
    y, s, w = _binary_inputs(y_true, score, weight_mask)
    return _ratio(_weighted_sum((1.0 - y) * (s < threshold), w), _weighted_sum(1.0 - y, w))


# ----------------------------------------------------------------------------------------------------
# Screening operating points: a sensitivity or specificity target
# ----------------------------------------------------------------------------------------------------

# A rate computed as a ratio of counts may land a rounding error below the target it equals.
_RATE_TOLERANCE = 1e-12


def _roc_counts(y: np.ndarray, s: np.ndarray, w: np.ndarray):
    """Cumulative (weighted) true and false positives of "positive when score >= t", t the distinct scores
    from the highest down: (tp, fp, thresholds), tp and fp (K + 1,) or (K + 1, B), row 0 = nothing positive
    (threshold +inf). Works for (N, B) weights (one ROC per column)."""
    order = np.argsort(-s, kind="stable")
    sorted_s = s[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(sorted_s) != 0), len(s) - 1]
    tp = np.cumsum(w[order] * _per_row(y[order], w), axis=0)[last_of_group]
    fp = np.cumsum(w[order] * _per_row(1.0 - y[order], w), axis=0)[last_of_group]
    zero = np.zeros((1,) + w.shape[1:])
    return np.concatenate([zero, tp]), np.concatenate([zero, fp]), np.r_[np.inf, sorted_s[last_of_group]]


def threshold_at_sensitivity(y_true, score, target: float) -> float:
    """The highest threshold whose sensitivity ("positive when score >= threshold") is at least `target`.

    Choose it on training data and apply it unchanged to test data (as `youden_threshold`). Raises without
    positives. Among thresholds reaching the target the highest is the most specific one.
    """
    y, s, w = _binary_inputs(y_true, score, None)
    if not 0 < target <= 1 or not y.any():
        raise ValueError(f"threshold_at_sensitivity needs positives and 0 < target <= 1; got target={target}")
    tp, _, thresholds = _roc_counts(y, s, w)
    k = int(np.argmax(tp / tp[-1] >= target - _RATE_TOLERANCE))
    return float(thresholds[k])


def threshold_at_specificity(y_true, score, target: float) -> float:
    """The lowest threshold whose specificity is at least `target` (the most sensitive such rule).

    When only "nothing positive" reaches the target, the threshold is just above the highest score.
    Raises without negatives.
    """
    y, s, w = _binary_inputs(y_true, score, None)
    if not 0 < target <= 1 or y.all():
        raise ValueError(f"threshold_at_specificity needs negatives and 0 < target <= 1; got target={target}")
    _, fp, thresholds = _roc_counts(y, s, w)
    k = int(np.sum(1.0 - fp / fp[-1] >= target - _RATE_TOLERANCE)) - 1  # fp grows with k: a prefix qualifies
    return float(thresholds[k]) if k > 0 else float(np.nextafter(thresholds[1], np.inf))


def _rates_per_column(y_true, score, weight_mask):
    """(tpr, fpr) of every threshold, shaped (K + 1, B) (B = 1 for 1-D weights; NaN columns for an absent
    class), the column indices, and whether the weights were 1-D."""
    y, s, w = _binary_inputs(y_true, score, weight_mask)
    tp, fp, _ = _roc_counts(y, s, w)
    tp, fp = tp.reshape(len(tp), -1), fp.reshape(len(fp), -1)
    return _ratio(tp, tp[-1]), _ratio(fp, fp[-1]), np.arange(tp.shape[1]), w.ndim == 1


def specificity_at_sensitivity(y_true, score, target: float, weight_mask=None):
    """The best specificity of any threshold on THESE data whose sensitivity is at least `target`.

    An oracle: the threshold is chosen on the data it is evaluated on, so it is optimistic for test data
    (report it as such, next to a threshold chosen on training data). NaN when a class is absent.
    Accepts (N, B) weights like every metric here (B results).
    """
    tpr, fpr, columns, one = _rates_per_column(y_true, score, weight_mask)
    first = np.argmax(tpr >= target - _RATE_TOLERANCE, axis=0)  # tpr grows along axis 0 and ends at 1
    out = np.where(np.isnan(tpr[-1] + fpr[-1]), np.nan, 1.0 - fpr[first, columns])
    return float(out[0]) if one else out


def sensitivity_at_specificity(y_true, score, target: float, weight_mask=None):
    """The best sensitivity of any threshold on THESE data whose specificity is at least `target` (an
    oracle, like `specificity_at_sensitivity`). NaN when a class is absent."""
    tpr, fpr, columns, one = _rates_per_column(y_true, score, weight_mask)
    last = np.maximum(np.sum(1.0 - fpr >= target - _RATE_TOLERANCE, axis=0) - 1, 0)  # fpr grows: a prefix
    out = np.where(np.isnan(tpr[-1] + fpr[-1]), np.nan, tpr[last, columns])
    return float(out[0]) if one else out


def roc_band(y_true, score, *, groups, fpr_grid, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05):
    """Pointwise (1 - alpha) percentile band of the ROC curve: the true positive rate at each false positive
    rate of `fpr_grid` (the best tpr with fpr <= the grid value, i.e. the step curve) over group-bootstrap
    resamples (the same resamples as `bootstrap_distribution` with this seed). Resamples with one class are
    left out. Returns (tpr_low, tpr_high), each shaped like fpr_grid."""
    y, s, _ = _binary_inputs(y_true, score, None)
    grid = np.asarray(fpr_grid, dtype=np.float64)
    curves = []
    for w in iter_group_bootstrap_weights(groups, n_boot, seed):
        tp, fp, _ = _roc_counts(y, s, w)
        for b in range(w.shape[1]):
            if tp[-1, b] > 0 and fp[-1, b] > 0:
                tpr, fpr = tp[:, b] / tp[-1, b], fp[:, b] / fp[-1, b]
                curves.append(tpr[np.searchsorted(fpr, grid + _RATE_TOLERANCE, side="right") - 1])
    if not curves:
        return np.full(grid.shape, np.nan), np.full(grid.shape, np.nan)
    low, high = np.percentile(np.asarray(curves), [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return low, high


# ----------------------------------------------------------------------------------------------------
# Calibration of predicted probabilities
# ----------------------------------------------------------------------------------------------------

def _probability_inputs(y_true, prob, weight_mask):
    y, p, w = _binary_inputs(y_true, prob, weight_mask)
    bad = _rows_counted(w) & ((p < 0) | (p > 1))
    if bad.any():
        raise ValueError("probabilities must lie in [0, 1]; offending entries (index: value): " + _offenders(bad, p))
    return y, p, w


def brier_score(y_true, prob, weight_mask=None):
    """Mean squared difference between the predicted probability and the 0/1 outcome (lower is better; 0.25
    for a constant 0.5). Agrees with sklearn.metrics.brier_score_loss."""
    y, p, w = _probability_inputs(y_true, prob, weight_mask)
    return _ratio(_weighted_sum((p - y) ** 2, w), np.sum(w, axis=0))


def calibration_bins(prob, n_bins: int = 10) -> np.ndarray:
    """Bin index of each probability: equal-width bins on [0, 1], each (a, b] except the first [0, b] (as
    sklearn.calibration.calibration_curve's "uniform" strategy)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], np.asarray(prob, dtype=np.float64), side="left")


def expected_calibration_error(y_true, prob, n_bins: int = 10, weight_mask=None):
    """ECE = sum over equal-width bins of (bin weight / total) x |observed TB fraction - mean probability|,
    i.e. sum_bins |sum(y - p)| / N (`calibration_bins`). 0 for perfectly calibrated probabilities."""
    y, p, w = _probability_inputs(y_true, prob, weight_mask)
    one_hot = np.eye(n_bins)[calibration_bins(p, n_bins)]  # (N, bins)
    gap = np.einsum("nk,n,n...->k...", one_hot, y - p, w)  # per bin: sum of (y - p), weighted
    return _ratio(np.abs(gap).sum(axis=0), np.sum(w, axis=0))


def reliability_curve(y_true, prob, n_bins: int = 10) -> dict[str, list]:
    """The reliability diagram's points: per non-empty bin, the mean predicted probability, the observed
    TB fraction and the count (as sklearn's calibration_curve, plus counts)."""
    y, p, _ = _probability_inputs(y_true, prob, None)
    bins = calibration_bins(p, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    filled = count > 0
    mean_p = np.bincount(bins, weights=p, minlength=n_bins)[filled] / count[filled]
    observed = np.bincount(bins, weights=y, minlength=n_bins)[filled] / count[filled]
    return {"mean_predicted": mean_p.tolist(), "observed": observed.tolist(), "count": count[filled].tolist(),
            "bin_edges": np.linspace(0.0, 1.0, n_bins + 1).tolist()}


# ----------------------------------------------------------------------------------------------------
# Regression metrics
# ----------------------------------------------------------------------------------------------------

def _regression_inputs(a, b, weight_mask, names: tuple[str, str]):
    a = _check_1d(names[0], a)
    b = _check_1d(names[1], b, a.shape[0])
    w = _check_weights(weight_mask, a.shape[0])
    counted = _rows_counted(w)
    errors = []
    checked = []
    for name, values in zip(names, (a, b)):
        try:
            checked.append(_check_finite(name, values, counted))
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise ValueError("\n".join(errors))
    return checked[0], checked[1], w, counted


def mae(y_true, y_pred, weight_mask=None):
    """Weighted mean absolute error (in the units of y, e.g. years); NaN if nothing counts."""
    y, p, w, _ = _regression_inputs(y_true, y_pred, weight_mask, ("y_true", "y_pred"))
    return _ratio(_weighted_sum(np.abs(y - p), w), np.sum(w, axis=0))


def pearson_r(x, y, weight_mask=None):
    """Weighted Pearson correlation; NaN if nothing counts or either variable is constant."""
    x, y, w, counted = _regression_inputs(x, y, weight_mask, ("x", "y"))
    # Shift by the counted mean first (r is shift-invariant) so the raw moments below do not cancel.
    if counted.any():
        x = np.where(counted, x - x[counted].mean(), 0.0)
        y = np.where(counted, y - y[counted].mean(), 0.0)
    total = np.sum(w, axis=0)
    mean_x, mean_y = _ratio(_weighted_sum(x, w), total), _ratio(_weighted_sum(y, w), total)
    cov = _weighted_sum(x * y, w) - total * mean_x * mean_y
    var_x = _weighted_sum(x * x, w) - total * mean_x ** 2
    var_y = _weighted_sum(y * y, w) - total * mean_y ** 2
    with np.errstate(invalid="ignore"):
        denominator = np.sqrt(np.maximum(var_x, 0.0) * np.maximum(var_y, 0.0))
    r = np.clip(_ratio(cov, denominator), -1.0, 1.0)  # rounding may land a hair outside [-1, 1]
    return float(r) if np.ndim(r) == 0 else r


# ----------------------------------------------------------------------------------------------------
# Group (patient) bootstrap
# ----------------------------------------------------------------------------------------------------

def iter_group_bootstrap_weights(groups, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield (N, b) float64 multiplicity matrices, one column per resample, n_boot columns in total.

    Resample r draws G groups uniformly with replacement (G = the number of distinct `groups`); column r
    gives every example the number of times its group was drawn. The draws come from one
    `np.random.default_rng(seed)`, one resample after another, so they do not depend on the chunking.
    """
    groups = _check_1d("groups", groups)
    if groups.shape[0] == 0:
        raise ValueError("cannot bootstrap an empty data set")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    _, group_of_row = np.unique(groups, return_inverse=True)
    n_groups = int(group_of_row.max()) + 1
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // groups.shape[0])
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        counts = np.empty((n_groups, b), dtype=np.float64)
        for r in range(b):
            counts[:, r] = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        yield counts[group_of_row]


def bootstrap_distribution(metric_fn: Callable[..., Any], *arrays, groups, n_boot: int = 1000,
                           seed: int = 0) -> np.ndarray:
    """The metric on each of n_boot group-bootstrap resamples.

    `metric_fn(*arrays, weight_mask=W)` must accept an (N, b) multiplicity matrix W and return b results,
    shape (b,) or (b, K), as every metric in this module does. Fold a label mask in with e.g.
    `lambda y, s, m, weight_mask: roc_auc(y, s, weight_mask=weight_mask * m[:, None])`.
    Returns float64 (n_boot,) or (n_boot, K); NaN marks resamples where the metric is undefined.
    """
    parts = [np.asarray(metric_fn(*arrays, weight_mask=w), dtype=np.float64)
             for w in iter_group_bootstrap_weights(groups, n_boot, seed)]
    return np.concatenate(parts, axis=0)


def percentile_ci(distribution, alpha: float = 0.05):
    """Percentile interval (alpha/2, 1 - alpha/2) over the defined (non-NaN) resamples, along axis 0.

    Undefined resamples are left out (`count_undefined` counts them); with none defined the interval is
    (NaN, NaN). Percentiles use numpy's default linear interpolation. For a 2-D distribution, returns
    (low (K,), high (K,)).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    d = np.asarray(distribution, dtype=np.float64)
    if d.ndim == 2:
        lows, highs = zip(*(percentile_ci(d[:, j], alpha) for j in range(d.shape[1])))
        return np.array(lows), np.array(highs)
    defined = d[~np.isnan(d)]
    if defined.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(defined, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def count_undefined(distribution):
    """Number of resamples where the metric was undefined (NaN); per column for 2-D distributions."""
    n = np.isnan(np.asarray(distribution, dtype=np.float64)).sum(axis=0)
    return int(n) if np.ndim(n) == 0 else n


def bootstrap_ci(metric_fn: Callable[..., Any], *arrays, groups, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05):
    """(low, high) group-bootstrap percentile CI of `metric_fn(*arrays)`; see `bootstrap_distribution`.

    Resamples where the metric is undefined are excluded from the percentiles; call
    `bootstrap_distribution` and `count_undefined` to report how many there were.
    """
    distribution = bootstrap_distribution(metric_fn, *arrays, groups=groups, n_boot=n_boot, seed=seed)
    return percentile_ci(distribution, alpha)


def paired_bootstrap_difference(metric_fn: Callable[..., Any], y_true, score_a, score_b, *, groups,
                                n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """metric(a) - metric(b) on the same cases, with a paired group-bootstrap percentile CI: each resample
    draws patients once and evaluates BOTH scores on it (one weight matrix for both), so what the two share
    (the same hard and easy patients) cancels in the difference.

    `metric_fn(y, score, weight_mask=None)` is any metric of this module (e.g. `roc_auc`). Returns
    {"value", "ci_low", "ci_high", "n_undefined", "p_two_sided"}: p_two_sided is the bootstrap's two-sided
    p-value, 2 x min(fraction of resamples <= 0, fraction >= 0), capped at 1 (resolution 1 / n_boot).
    """
    def difference(y, a, b, weight_mask=None):
        return np.asarray(metric_fn(y, a, weight_mask=weight_mask)) - np.asarray(metric_fn(y, b, weight_mask=weight_mask))

    value = float(difference(y_true, score_a, score_b))
    distribution = bootstrap_distribution(difference, y_true, score_a, score_b, groups=groups, n_boot=n_boot,
                                          seed=seed)
    low, high = percentile_ci(distribution, alpha)
    defined = distribution[~np.isnan(distribution)]
    p = min(1.0, 2 * min(np.mean(defined <= 0), np.mean(defined >= 0))) if defined.size else float("nan")
    return {"value": value, "ci_low": low, "ci_high": high, "n_undefined": count_undefined(distribution),
            "p_two_sided": float(p)}


# ----------------------------------------------------------------------------------------------------
# DeLong's test for two correlated AUROCs, and Holm's correction
# ----------------------------------------------------------------------------------------------------

def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # the rank of the last member of each tie group
    return (last - (counts - 1) / 2.0)[inverse]


def delong_placements(y_true, score) -> tuple[float, np.ndarray, np.ndarray]:
    """(AUROC, V10, V01): DeLong's structural components (placement values) of one score.

    V10[i] = fraction of negatives scoring below positive i (ties count half); V01[j] = fraction of positives
    scoring above negative j. AUROC = mean(V10) = mean(V01). Computed from midranks (Sun & Xu 2014,
    "Fast implementation of DeLong's algorithm", IEEE SPL 21(11)): O(N log N) instead of O(m n).

    `score` may also be (D, N): D score vectors of the same cases (e.g. models fitted on D draws of training
    data). Then the AUROC is the mean of their D AUROCs and V10 / V01 the means of their placement values: the
    structural components of that mean (an average of U-statistics is the U-statistic of the averaged kernel), so
    the tests below compare mean AUROCs over draws, with the variance that comes from the cases.
    """
    if np.ndim(score) == 2:
        parts = [delong_placements(y_true, row) for row in np.asarray(score)]
        return (float(np.mean([p[0] for p in parts])), np.mean([p[1] for p in parts], axis=0),
                np.mean([p[2] for p in parts], axis=0))
    y, s, _ = _binary_inputs(y_true, score, None)
    positive, negative = s[y == 1], s[y == 0]
    m, n = len(positive), len(negative)
    if m == 0 or n == 0:
        raise ValueError(f"DeLong needs both classes; got {m} positive and {n} negative cases")
    combined = _midranks(np.r_[positive, negative])
    v10 = (combined[:m] - _midranks(positive)) / n
    v01 = 1.0 - (combined[m:] - _midranks(negative)) / m
    return float(v10.mean()), v10, v01


def _normal_test(auc_a: float, auc_b: float, variance: float) -> dict[str, float]:
    """Two-sided normal test of AUROC(a) = AUROC(b) given the variance of the difference. When the variance is 0
    (e.g. identical scores, or both perfect) z is NaN and p is 1 if the AUROCs are equal, NaN if not."""
    difference = auc_a - auc_b
    se = float(np.sqrt(max(variance, 0.0)))
    if se > 1e-15:
        z = difference / se
        p = float(math.erfc(abs(z) / math.sqrt(2.0)))  # 2 (1 - Phi(|z|))
    else:
        z, p = float("nan"), 1.0 if abs(difference) < 1e-15 else float("nan")
    return {"auroc_a": auc_a, "auroc_b": auc_b, "difference": float(difference), "se": se, "z": float(z),
            "p_value": p}


def delong_test(y_true, score_a, score_b) -> dict[str, float]:
    """DeLong, DeLong & Clarke-Pearson (1988, Biometrics 44:837) test of AUROC(a) = AUROC(b), two scores of
    the SAME cases (paired): var(A - B) = (S10_aa + S10_bb - 2 S10_ab) / m + (S01_aa + S01_bb - 2 S01_ab) / n
    with S10 / S01 the sample covariances (ddof 1) of the placement values over the m positives / n negatives.

    Returns {"auroc_a", "auroc_b", "difference", "se", "z", "p_value"} (two-sided normal p-value; see
    `_normal_test` for a zero variance). Cases are assumed independent (one image per patient, as in the TB
    sets); with several images per patient use `clustered_auc_test`. Either score may be (D, N): the mean AUROC
    of D score vectors (`delong_placements`).
    """
    auc_a, v10_a, v01_a = delong_placements(y_true, score_a)
    auc_b, v10_b, v01_b = delong_placements(y_true, score_b)
    m, n = len(v10_a), len(v01_a)
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's variance needs at least 2 cases of each class; got {m} positive, {n} negative")
    s10, s01 = np.cov(np.stack([v10_a, v10_b])), np.cov(np.stack([v01_a, v01_b]))
    variance = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    return _normal_test(auc_a, auc_b, variance)


def clustered_auc_test(y_true, score_a, score_b, clusters) -> dict[str, float]:
    """Test of AUROC(a) = AUROC(b), two scores of the same images, when images come in correlated CLUSTERS
    (patients): Obuchowski (1997, "Nonparametric analysis of clustered ROC curve data", Biometrics 53:567).

    Images are the units; AUROC is over all (positive image, negative image) pairs, as for unclustered data.
    With the placement values V10 / V01 (`delong_placements`) summed per cluster i (V10_i over its m_i positive
    images, V01_i over its n_i negative ones), N / M the positive / negative images, I the clusters, I10 / I01
    those holding a positive / negative image, and for scores r, s in {a, b}:
        S10_rs = I10 / ((I10 - 1) N) sum_i (V10_i^r - m_i A_r)(V10_i^s - m_i A_s)
        S01_rs = I01 / ((I01 - 1) M) sum_i (V01_i^r - n_i A_r)(V01_i^s - n_i A_s)
        S11_rs = I / (I - 1) sum_i (V10_i^r - m_i A_r)(V01_i^s - n_i A_s)
        cov(A_r, A_s) = S10_rs / N + S01_rs / M + (S11_rs + S11_sr) / (N M)
    and var(A_a - A_b) = cov_aa + cov_bb - 2 cov_ab. A cluster may hold both classes. With one image per
    cluster this is DeLong's variance exactly (S11 = 0). Vectorised: O(N log N), one sort per score.

    `clusters`: (N,) any hashable patient keys (an image without a patient id is its own cluster: give it a key
    of its own). Returns `delong_test`'s dict plus "n_clusters". Raises unless at least 2 clusters hold each
    class. Either score may be (D, N): the mean AUROC of D score vectors (`delong_placements`).
    """
    y = _check_binary("y_true", _check_1d("y_true", y_true), np.ones(np.shape(y_true)[:1], bool))
    clusters = _check_1d("clusters", clusters, len(y))
    _, cluster = np.unique(clusters, return_inverse=True)
    cluster = cluster.reshape(-1)
    num_clusters = int(cluster.max()) + 1 if len(cluster) else 0
    positive = y == 1
    pos_cluster, neg_cluster = cluster[positive], cluster[~positive]
    m_i = np.bincount(pos_cluster, minlength=num_clusters).astype(np.float64)
    n_i = np.bincount(neg_cluster, minlength=num_clusters).astype(np.float64)
    i10, i01 = int(np.sum(m_i > 0)), int(np.sum(n_i > 0))
    if i10 < 2 or i01 < 2:
        raise ValueError(f"the clustered AUROC variance needs at least 2 clusters holding each class; got {i10} "
                         f"with a positive and {i01} with a negative image")
    big_n, big_m = float(m_i.sum()), float(n_i.sum())
    aucs, d10, d01 = [], [], []
    for score in (score_a, score_b):
        auc, v10, v01 = delong_placements(y, score)
        aucs.append(auc)
        d10.append(np.bincount(pos_cluster, weights=v10, minlength=num_clusters) - m_i * auc)
        d01.append(np.bincount(neg_cluster, weights=v01, minlength=num_clusters) - n_i * auc)
    d10, d01 = np.stack(d10, axis=1), np.stack(d01, axis=1)  # (I, 2): the clusters' deviations per score
    s10 = i10 / ((i10 - 1) * big_n) * (d10.T @ d10)
    s01 = i01 / ((i01 - 1) * big_m) * (d01.T @ d01)
    s11 = num_clusters / (num_clusters - 1) * (d10.T @ d01)
    cov = s10 / big_n + s01 / big_m + (s11 + s11.T) / (big_n * big_m)
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    return {**_normal_test(aucs[0], aucs[1], variance), "n_clusters": num_clusters}


def holm_adjust(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control) for one family of tests.

    Sorted ascending, p_(i) becomes max_{j <= i} min(1, (m - j + 1) p_(j)); reject where adjusted <= alpha.
    NaN p-values are left out of the family (m counts the others) and stay NaN.
    """
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    defined = np.flatnonzero(~np.isnan(p))
    order = defined[np.argsort(p[defined], kind="stable")]
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


# ----------------------------------------------------------------------------------------------------
# MetaChexNet multi-task evaluation
# ----------------------------------------------------------------------------------------------------

# Per-image prediction arrays evaluate_multitask reads: (target, prediction, mask) per task. A task whose
# three arrays are all absent is skipped (e.g. the CheXNet baseline has the pathology head only). Targets
# follow the data contract (pathology multi-hot in PATHOLOGIES order, sex_male 1 = male, view_ap 1 = AP,
# age in years); predictions are probabilities (pathology, sex, view) and years (age); masks are 1 where
# the target is known. `patient_id` (N,) is required: the bootstrap resamples patients.
TASK_ARRAYS = {
    "pathology": ("pathology", "pathology_prob", "pathology_mask"),
    "sex_male": ("sex_male", "sex_male_prob", "sex_male_mask"),
    "view_ap": ("view_ap", "view_ap_prob", "view_ap_mask"),
    "age": ("age", "age_pred", "age_mask"),
}
# Sex and view accuracy: predict the positive class when its probability is >= this.
ACCURACY_THRESHOLD = 0.5


def _with_mask(mask: np.ndarray, weight_mask: np.ndarray) -> np.ndarray:
    return weight_mask * _per_row(np.asarray(mask, dtype=np.float64), weight_mask)


def _pathology_metrics(target, prob, mask, weight_mask, names=PATHOLOGIES):
    """(K,) or (B, K): AUROC per pathology (K = len(names))."""
    return roc_auc_per_column(target, prob, mask, weight_mask, column_names=names)


def _binary_task_metrics(target, prob, mask, weight_mask):
    """(2,) or (B, 2): AUROC, accuracy at ACCURACY_THRESHOLD."""
    w = _with_mask(mask, weight_mask)
    return np.stack([roc_auc(target, prob, w), accuracy(target, prob, ACCURACY_THRESHOLD, w)], axis=-1)


def _age_metrics(age, age_pred, mask, weight_mask):
    """(2,) or (B, 2): MAE in years, Pearson r."""
    w = _with_mask(mask, weight_mask)
    return np.stack([mae(age, age_pred, w), pearson_r(age, age_pred, w)], axis=-1)


_TASK_METRICS = {"pathology": _pathology_metrics, "sex_male": _binary_task_metrics,
                 "view_ap": _binary_task_metrics, "age": _age_metrics}


def _check_predictions(predictions: Mapping[str, Any], label_names: Sequence[str]) -> tuple[int, list[str]]:
    """(N, tasks present); raises naming every missing key and every array of the wrong shape."""
    errors = []
    if "patient_id" not in predictions:
        errors.append("missing 'patient_id'")
    tasks = []
    for task, keys in TASK_ARRAYS.items():
        present = [k for k in keys if k in predictions]
        if present and len(present) < len(keys):
            missing = [k for k in keys if k not in present]
            errors.append(f"task {task!r} needs {list(keys)}; missing {missing}")
        elif present:
            tasks.append(task)
    if not tasks:
        errors.append(f"no task to evaluate: give the arrays of at least one of {TASK_ARRAYS}")
    n = len(np.asarray(predictions["patient_id"])) if "patient_id" in predictions else None
    for key in ["patient_id"] + [k for t in tasks for k in TASK_ARRAYS[t]]:
        if key not in predictions:
            continue
        shape = np.shape(predictions[key])
        expected = (n, len(label_names)) if key.startswith("pathology") else (n,)
        if shape != expected:
            errors.append(f"{key!r} has shape {shape}, expected {expected}")
    if errors:
        raise ValueError("invalid predictions:\n  " + "\n  ".join(errors))
    return n, tasks


def _entry(value, distribution, alpha: float) -> dict[str, Any]:
    """One reported metric: point estimate, percentile CI, number of undefined resamples."""
    if distribution.shape[0] == 0:
        low, high, undefined = float("nan"), float("nan"), 0
    else:
        (low, high), undefined = percentile_ci(distribution, alpha), count_undefined(distribution)
    return {"value": float(value), "ci_low": low, "ci_high": high, "n_undefined": undefined}


def _counts(predictions: Mapping[str, Any], n: int, tasks: list[str], label_names: Sequence[str]) -> dict[str, Any]:
    counts: dict[str, Any] = {"images": n, "patients": int(len(np.unique(predictions["patient_id"])))}
    for task in tasks:
        target_key, _, mask_key = TASK_ARRAYS[task]
        labelled = np.asarray(predictions[mask_key]) > 0
        if task == "age":
            counts["age"] = {"labelled": int(labelled.sum()), "masked": int(n - labelled.sum())}
            continue
        positives = labelled & (np.asarray(predictions[target_key]) == 1)
        if task == "pathology":
            counts["pathology"] = {
                name: {"labelled": int(labelled[:, j].sum()), "positives": int(positives[:, j].sum())}
                for j, name in enumerate(label_names)}
        else:
            counts[task] = {"labelled": int(labelled.sum()), "positives": int(positives.sum())}
    return counts


def evaluate_multitask(predictions: Mapping[str, Any], n_boot: int = 1000, seed: int = 0,
                       alpha: float = 0.05, label_names: Sequence[str] = PATHOLOGIES) -> dict[str, Any]:
    """Metrics of the MetaChexNet heads with patient-bootstrap CIs, as a JSON-able nested dict.

    Args:
      predictions: per-image arrays named as in TASK_ARRAYS, plus `patient_id`; other keys are ignored.
        One row per real image (drop padding rows first).
      n_boot: bootstrap resamples of patients (0: no CIs, reported as NaN). All tasks see the same
        resamples (same seed and patients), so their CIs are paired.
      seed, alpha: bootstrap seed; the CIs are (1 - alpha) percentile intervals.
      label_names: the names of the pathology columns (NIH's 14, or a mixture's label space: data/input/mixture.py).
        A label no image has a known value for (mask 0 everywhere: a dataset without it) is undefined, hence
        left out of the mean, which is then the mean over the labels the data has.
    Returns:
      {"counts": images, patients, labelled / positive counts per task, ages masked,
       "bootstrap": the settings,
       "mean_auroc": entry + "labels" (the pathologies averaged),
       "pathology": {name: {"auroc": entry}} in label_names order,
       "sex_male" / "view_ap": {"auroc": entry, "accuracy": entry, "accuracy_threshold": 0.5},
       "age": {"mae_years": entry, "pearson_r": entry}}
      for the tasks present, where entry = {"value", "ci_low", "ci_high", "n_undefined"} and n_undefined
      counts resamples in which the metric was undefined (left out of the CI). Undefined values are NaN.
      The pathology mean is over the labels whose AUROC is defined on the full set; a resample's mean is
      undefined when any of those labels is undefined in it.
    """
    label_names = tuple(label_names)
    n, tasks = _check_predictions(predictions, label_names)
    if n_boot < 0 or not 0 < alpha < 1:
        raise ValueError(f"need n_boot >= 0 and 0 < alpha < 1; got n_boot={n_boot}, alpha={alpha}")
    arrays = {t: [np.asarray(predictions[k]) for k in TASK_ARRAYS[t]] for t in tasks}
    # Point estimates first: they check every input, and all problems are reported together.
    point, errors = {}, []
    metric_fns = {**_TASK_METRICS,
                  "pathology": lambda *a, weight_mask: _pathology_metrics(*a, weight_mask, names=label_names)}
    for task in tasks:
        try:
            point[task] = metric_fns[task](*arrays[task], weight_mask=np.ones(n))
        except ValueError as e:
            errors.append(f"{task}: {e}")
    if errors:
        raise ValueError("invalid predictions:\n" + "\n".join(errors))

    groups = np.asarray(predictions["patient_id"])
    result: dict[str, Any] = {
        "counts": _counts(predictions, n, tasks, label_names),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "alpha": alpha, "resampled": "patient_id",
                      "interval": "percentile"},
    }
    # One bootstrap pass computes every task's metrics on each resample, side by side.
    sizes = [point[t].size for t in tasks]

    def all_tasks(weight_mask):
        return np.concatenate([metric_fns[t](*arrays[t], weight_mask=weight_mask) for t in tasks], axis=1)

    if n_boot:
        all_dist = bootstrap_distribution(all_tasks, groups=groups, n_boot=n_boot, seed=seed)
    else:
        all_dist = np.empty((0, sum(sizes)))
    dists = dict(zip(tasks, np.split(all_dist, np.cumsum(sizes)[:-1], axis=1)))
    for task in tasks:
        dist = dists[task]
        if task == "pathology":
            defined = ~np.isnan(point[task])
            mean_dist = dist[:, defined].mean(axis=1) if defined.any() else np.full(dist.shape[0], np.nan)
            mean = point[task][defined].mean() if defined.any() else float("nan")
            result["mean_auroc"] = {**_entry(mean, mean_dist, alpha),
                                    "labels": [name for name, d in zip(label_names, defined) if d]}
            result[task] = {name: {"auroc": _entry(point[task][j], dist[:, j], alpha)}
                            for j, name in enumerate(label_names)}
        elif task == "age":
            result[task] = {"mae_years": _entry(point[task][0], dist[:, 0], alpha),
                            "pearson_r": _entry(point[task][1], dist[:, 1], alpha)}
        else:
            result[task] = {"auroc": _entry(point[task][0], dist[:, 0], alpha),
                            "accuracy": _entry(point[task][1], dist[:, 1], alpha),
                            "accuracy_threshold": ACCURACY_THRESHOLD}
    return result
