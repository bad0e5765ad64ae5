"""Paired comparisons of the report's cells: "is start/method A better than B on the same images?"

    paired_comparisons(cells_columns, n_boot, seed) -> [comparison, ...]     for one protocol

Every pair of (start, method) cells of a protocol is compared on the test images BOTH predicted (pooled
out-of-fold predictions, matched by dataset and image id; in the demo fine-tuning covers fewer CV folds than the
probe, so a probe/fine-tune pair is compared on fine-tuning's folds only):

- the AUROC difference A - B with a paired bootstrap 95% CI over patients: every resample draws patients once and
  evaluates both cells on it (`metrics.paired_bootstrap_difference`; each TB-set image is its own patient);
- the paired test of the same difference, `test`: DeLong's (`metrics.delong_test`) when every patient has one
  image among them, else the clustered test with patients as clusters (`metrics.clustered_auc_test`, Obuchowski
  1997: DeLong takes a patient's images as independent and understates the variance); its p-value raw and
  Holm-adjusted within the protocol (`metrics.holm_adjust`: the family is every pair of that protocol);
- the winner (`winner`): A (or B) when the Holm-adjusted p is below 0.05 AND the paired 95% CI excludes 0 on A's
  (B's) side; otherwise neither.
"""

from __future__ import annotations

import itertools

import numpy as np

from metachex_jax.evaluation import metrics

WIN_ALPHA = 0.05  # the family-wise level of the wins rule (the CI is the bootstrap's 95%)
TEST_NAMES = {"delong": "DeLong", "clustered": "clustered (Obuchowski)"}


def _common_images(a: dict, b: dict) -> tuple[np.ndarray, np.ndarray]:
    """Row indices into a and b of the images both predicted, in a's order."""
    keys_b = {(d, i): row for row, (d, i) in enumerate(zip(b["dataset"], b["image_id"]))}
    rows_a, rows_b = [], []
    for row, key in enumerate(zip(a["dataset"], a["image_id"])):
        if key in keys_b:
            rows_a.append(row)
            rows_b.append(keys_b[key])
    return np.asarray(rows_a, np.int64), np.asarray(rows_b, np.int64)


def paired_test(y, score_a, score_b, patient) -> dict:
    """DeLong's test when every patient has one image, else the clustered test; {"method", ...the test's dict}."""
    if len(np.unique(patient)) == len(patient):
        return {"method": "delong", **metrics.delong_test(y, score_a, score_b)}
    return {"method": "clustered", **metrics.clustered_auc_test(y, score_a, score_b, patient)}


def winner(difference: dict, test: dict, p_holm: float | None, alpha: float = WIN_ALPHA) -> str | None:
    """"a" or "b" when the Holm-adjusted p is below alpha and the paired bootstrap CI excludes 0 on the side of the
    tested difference; None (neither) otherwise."""
    if p_holm is None or not p_holm < alpha:
        return None
    if test["difference"] > 0 and difference["ci_low"] > 0:
        return "a"
    if test["difference"] < 0 and difference["ci_high"] < 0:
        return "b"
    return None


def compare_pair(a: dict, b: dict, n_boot: int, seed: int) -> dict:
    """AUROC(a) - AUROC(b) on the images both predicted: the bootstrap CI and the paired test (module docstring)."""
    rows_a, rows_b = _common_images(a, b)
    y = a["label"][rows_a].astype(np.float64)
    if not np.array_equal(y, b["label"][rows_b]):  # the same image with two labels: a bug, never a result
        raise ValueError("paired comparison: the two cells disagree on the labels of the same images")
    score_a, score_b, patient = a["prob"][rows_a], b["prob"][rows_b], a["patient"][rows_a]
    out = {"n_images": int(len(y)), "n_positive": int(y.sum()), "n_patients": int(len(np.unique(patient)))}
    if len(y) == 0 or y.min() == y.max():
        return {**out, "difference": None, "test": None}
    difference = metrics.paired_bootstrap_difference(metrics.roc_auc, y, score_a, score_b, groups=patient,
                                                     n_boot=n_boot, seed=seed)
    test = paired_test(y, score_a, score_b, patient)
    return {**out, "auroc_a": test["auroc_a"], "auroc_b": test["auroc_b"], "difference": difference, "test": test}


def paired_comparisons(cells: dict[str, dict], n_boot: int, seed: int) -> list[dict]:
    """Every pair of one protocol's cells ({"start/method": per-image columns}, in report order), with `p_holm` the
    paired test's p-value Holm-adjusted over the protocol's pairs and `wins` the winning cell's name (or None)."""
    comparisons = [{"a": key_a, "b": key_b, **compare_pair(a, b, n_boot, seed)}
                   for (key_a, a), (key_b, b) in itertools.combinations(cells.items(), 2)]
    p = [c["test"]["p_value"] if c["test"] else np.nan for c in comparisons]
    for comparison, adjusted in zip(comparisons, metrics.holm_adjust(p)):
        comparison["p_holm"] = None if np.isnan(adjusted) else float(adjusted)
        side = comparison["test"] and winner(comparison["difference"], comparison["test"], comparison["p_holm"])
        comparison["wins"] = {"a": comparison["a"], "b": comparison["b"], None: None}[side]
    return comparisons
