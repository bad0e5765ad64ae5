"""Paired comparisons of the report's cells: "is start/method A better than B on the same images?"

    paired_comparisons(cells_columns, n_boot, seed) -> [comparison, ...]     for one protocol

Every pair of (start, method) cells of a protocol is compared on the test images BOTH predicted (pooled
out-of-fold predictions, matched by dataset and image id; in the demo fine-tuning covers fewer CV folds than the
probe, so a probe/fine-tune pair is compared on fine-tuning's folds only):

- the AUROC difference A - B with a paired bootstrap 95% CI over patients: every resample draws patients once and
  evaluates both cells on it (`metrics.paired_bootstrap_difference`; each TB-set image is its own patient);
- DeLong's test p-value for the same difference (`metrics.delong_test`), raw and Holm-adjusted within the
  protocol (`metrics.holm_adjust`: the family is every pair of that protocol);
- the winner: A (or B) when the paired 95% CI excludes 0 on its side, otherwise none.
"""

from __future__ import annotations

import itertools

import numpy as np

from metachex_jax import metrics


def _common_images(a: dict, b: dict) -> tuple[np.ndarray, np.ndarray]:
    """Row indices into a and b of the images both predicted, in a's order."""
    keys_b = {(d, i): row for row, (d, i) in enumerate(zip(b["dataset"], b["image_id"]))}
    rows_a, rows_b = [], []
    for row, key in enumerate(zip(a["dataset"], a["image_id"])):
        if key in keys_b:
            rows_a.append(row)
            rows_b.append(keys_b[key])
    return np.asarray(rows_a, np.int64), np.asarray(rows_b, np.int64)


def compare_pair(a: dict, b: dict, n_boot: int, seed: int) -> dict:
    """AUROC(a) - AUROC(b) on the images both predicted; see the module docstring."""
    rows_a, rows_b = _common_images(a, b)
    y = a["label"][rows_a].astype(np.float64)
    if not np.array_equal(y, b["label"][rows_b]):  # the same image with two labels: a bug, never a result
        raise ValueError("paired comparison: the two cells disagree on the labels of the same images")
    score_a, score_b = a["prob"][rows_a], b["prob"][rows_b]
    out = {"n_images": int(len(y)), "n_positive": int(y.sum())}
    if len(y) == 0 or y.min() == y.max():
        return {**out, "difference": None, "delong": None, "winner": None}
    difference = metrics.paired_bootstrap_difference(metrics.roc_auc, y, score_a, score_b, groups=a["patient"][rows_a],
                                                     n_boot=n_boot, seed=seed)
    delong = metrics.delong_test(y, score_a, score_b)
    winner = "a" if difference["ci_low"] > 0 else "b" if difference["ci_high"] < 0 else None
    return {**out, "auroc_a": delong["auroc_a"], "auroc_b": delong["auroc_b"], "difference": difference,
            "delong": delong, "winner": winner}


def paired_comparisons(cells: dict[str, dict], n_boot: int, seed: int) -> list[dict]:
    """Every pair of one protocol's cells ({"start/method": per-image columns}, in report order), with
    `p_holm` the DeLong p-value Holm-adjusted over the protocol's pairs and `wins` the winning cell's name."""
    comparisons = []
    for (key_a, a), (key_b, b) in itertools.combinations(cells.items(), 2):
        comparison = {"a": key_a, "b": key_b, **compare_pair(a, b, n_boot, seed)}
        comparison["wins"] = {"a": key_a, "b": key_b, None: None}[comparison.pop("winner")]
        comparisons.append(comparison)
    p = [c["delong"]["p_value"] if c["delong"] else np.nan for c in comparisons]
    for comparison, adjusted in zip(comparisons, metrics.holm_adjust(p)):
        comparison["p_holm"] = None if np.isnan(adjusted) else float(adjusted)
    return comparisons
