"""The linear probe's solver and model selection against scikit-learn, fold assignment, protocol checks, and the
report's metrics (numpy only: no model, no dataset)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedGroupKFold

from metachex_jax.evaluation import metrics
from metachex_jax.transfer import paired, probe, protocols, report
from metachex_jax.transfer.sets import TransferSet


def toy_features(n=120, d=40, seed=0, signal=0.6):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    x = rng.normal(size=(n, d)) + signal * y[:, None] * rng.normal(size=d)[None]
    return np.maximum(x, 0.0), y  # ReLU-like, like pooled DenseNet features


@pytest.mark.parametrize("l2", [1e-3, 1e-1, 3.0])
def test_solver_matches_sklearn(l2):
    x, y = toy_features()
    z = (x - x.mean(0)) / x.std(0)
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    coef, bias, iterations, converged = probe.fit_logistic(u * s, y, np.ones((1, len(y))), np.array([l2]),
                                                           tol=1e-7, max_iter=2000)
    assert iterations[0] < 2000 and converged[0]
    reference = LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-12, max_iter=10000).fit(z, y)
    np.testing.assert_allclose(vt.T @ coef[0], reference.coef_[0], atol=1e-5 * max(1, np.abs(reference.coef_).max()))
    assert bias[0] == pytest.approx(reference.intercept_[0], abs=1e-5)


def test_weighted_problems_equal_subsets():
    x, y = toy_features(n=60, d=10)
    keep = np.arange(60) % 3 != 0
    both = probe.fit_logistic(x, y, np.stack([keep, np.ones(60)]).astype(float), np.array([0.1, 0.1]), tol=1e-7)
    alone = probe.fit_logistic(x[keep], y[keep], np.ones((1, keep.sum())), np.array([0.1]), tol=1e-7)
    np.testing.assert_allclose(both[0][0], alone[0][0], atol=1e-6)


def test_fit_probe_chooses_by_inner_cv_and_is_deterministic():
    x, y = toy_features(n=200, d=60, seed=1)
    settings = probe.ProbeSettings(inner_folds=4, l2_grid=(1e-3, 1e-2, 1e-1, 1.0, 10.0))
    train, test = np.arange(200) < 150, np.arange(200) >= 150
    a = probe.fit_probe(x[train], y[train], x[test], settings, groups=np.arange(150))
    b = probe.fit_probe(x[train], y[train], x[test], settings, groups=np.arange(150))
    np.testing.assert_array_equal(a.test_prob, b.test_prob)
    # The chosen lambda is the inner-CV optimum, and the refit equals sklearn's fit with that lambda.
    assert a.l2 == min(a.inner_scores, key=a.inner_scores.get)
    z = (x[train] - a.mean) / a.scale
    reference = LogisticRegression(C=1.0 / (a.l2 * 150), tol=1e-12, max_iter=10000).fit(z, y[train])
    np.testing.assert_allclose(a.test_prob, reference.predict_proba((x[test] - a.mean) / a.scale)[:, 1], atol=1e-4)
    assert roc_auc_score(y[test], a.test_prob) > 0.8
    with pytest.raises(ValueError, match=r"single class \(150 normal, 0 TB\)"):
        probe.fit_probe(x[train], np.zeros(150, np.int64), x[test], settings, groups=np.arange(150))


def test_probe_that_hits_its_iteration_limit_says_so():
    x, y = toy_features(n=120, d=40, seed=2)
    train, test = np.arange(120) < 90, np.arange(120) >= 90
    settings = probe.ProbeSettings(inner_folds=3, l2_grid=(1e-3, 1.0), max_iter=2, tol=1e-9)
    stopped = probe.fit_probe(x[train], y[train], x[test], settings, groups=np.arange(90))
    assert not stopped.converged and stopped.iterations == 2
    assert [u["l2"] for u in stopped.unconverged] == [1e-3, 1.0]
    assert all(1 <= u["problems"] <= 4 for u in stopped.unconverged)  # of 3 inner folds + the refit
    done = probe.fit_probe(x[train], y[train], x[test], probe.ProbeSettings(inner_folds=3, l2_grid=(1e-3, 1.0)),
                           groups=np.arange(90))
    assert done.converged and done.unconverged == [] and done.iterations < 500
    # The threshold scores are the inner out-of-fold probabilities of the training rows.
    assert done.train_oof_prob.shape == (90,) and roc_auc_score(y[train], done.train_oof_prob) > 0.7


def test_inner_folds_stratified_and_deterministic():
    y = np.array([0] * 23 + [1] * 17)
    folds = probe.stratified_group_folds(y, np.arange(40), 5, seed=3)
    np.testing.assert_array_equal(folds, probe.stratified_group_folds(y, np.arange(40), 5, seed=3))
    for f in range(5):
        assert np.sum(y[folds == f] == 0) in (4, 5) and np.sum(y[folds == f] == 1) in (3, 4)


def patients_with_several_images(rng, n_patients, signal=0.0, d=30):
    """(features, labels, patients): 1-4 images per patient, a patient-level label, and features that are the
    patient's own signature plus a little image noise (near-duplicate images of one patient), plus `signal` x label."""
    sizes = rng.integers(1, 5, n_patients)
    patient = np.repeat(rng.permutation(100 * n_patients)[:n_patients], sizes)
    label = np.repeat(np.arange(n_patients) % 2, sizes)
    signature = np.repeat(rng.normal(size=(n_patients, d)), sizes, axis=0)
    x = signature + 0.05 * rng.normal(size=signature.shape) + signal * label[:, None]
    order = rng.permutation(len(label))
    return x[order], label[order], patient[order]


def test_inner_folds_keep_each_patients_images_together():
    rng = np.random.default_rng(5)
    x, y, patient = patients_with_several_images(rng, 60, signal=0.5)
    settings = probe.ProbeSettings(inner_folds=4, l2_grid=(1e-2, 1.0))
    fit = probe.fit_probe(x, y, x[:5], settings, groups=patient)
    folds = fit.inner_fold
    assert sorted(set(folds.tolist())) == [0, 1, 2, 3]
    for f in range(4):
        held, fitted = set(patient[folds == f]), set(patient[folds != f])
        assert not held & fitted  # no patient both in an inner fit part and its held-out part
        assert set(y[folds == f]) == {0, 1}
    # Balanced about as well as scikit-learn's StratifiedGroupKFold (the reference) in images and in classes.
    reference = [held for _, held in StratifiedGroupKFold(n_splits=4).split(x, y, patient)]
    sizes, reference_sizes = [np.sum(folds == f) for f in range(4)], [len(held) for held in reference]
    assert np.ptp(sizes) <= np.ptp(reference_sizes) + 2
    deviation = max(abs(y[folds == f].mean() - y.mean()) for f in range(4))
    assert deviation <= max(abs(y[held].mean() - y.mean()) for held in reference) + 0.03
    # Deterministic.
    np.testing.assert_array_equal(folds, probe.stratified_group_folds(y, patient, 4, settings.seed))


def test_out_of_fold_scores_are_not_inflated_by_a_patients_other_images():
    """Labels unrelated to the features, near-duplicate images per patient: folds of images put a patient's copies
    on both sides and the out-of-fold scores look informative (the old behaviour); folds of patients do not."""
    rng = np.random.default_rng(6)
    x, y, patient = patients_with_several_images(rng, 80, d=100)
    settings = probe.ProbeSettings(inner_folds=5, l2_grid=(1e-3, 1e-1, 10.0))
    by_patient = probe.fit_probe(x, y, x[:5], settings, groups=patient)
    by_image = probe.fit_probe(x, y, x[:5], settings, groups=np.arange(len(y)))
    assert roc_auc_score(y, by_image.train_oof_prob) > 0.9  # leakage
    assert abs(roc_auc_score(y, by_patient.train_oof_prob) - 0.5) < 0.2
    with pytest.raises(ValueError, match=r"only 1 patient\(s\) of one class"):
        probe.fit_probe(x[:6], np.array([1, 1, 0, 0, 0, 0]), x[:1], settings, groups=np.array([3, 3, 4, 5, 6, 7]))


def tb_set(name, tb, fold, split=None):
    n = len(tb)
    return TransferSet(name, "Tuberculosis", [], None, np.asarray(tb), np.asarray(fold), np.arange(n),
                       [f"{name}_{i}" for i in range(n)], [name] * n,
                       np.asarray(split if split is not None else ["train"] * n))


def test_protocol_splits_are_disjoint_and_single_class_folds_are_named():
    tb = np.array([0, 1] * 9)
    sets = {"shenzhen": tb_set("shenzhen", tb, np.arange(18) % 3), "montgomery": tb_set("montgomery", tb[:12],
                                                                                          np.arange(12) % 3)}
    for name in protocols.TB_PROTOCOLS:
        for split in protocols.check_protocol(protocols.parse_protocol(name), sets, need_validation=True):
            if split.train_set == split.test_set:
                assert not set(split.train) & set(split.test)
            assert set(split.validation) < set(split.train)
    bad = {"shenzhen": tb_set("shenzhen", tb, np.where(tb == 1, 0, np.arange(18) % 3)), "montgomery": sets["montgomery"]}
    with pytest.raises(ValueError) as e:
        protocols.check_protocol(protocols.parse_protocol("cv_shenzhen"), bad, need_validation=False)
    assert "shenzhen fold 1: the test part has a single class (3 negative, 0 positive Tuberculosis)" in str(e.value)
    assert "shenzhen fold 2: the test part has a single class" in str(e.value)


def test_fixed_split_protocol_is_the_builds_split_and_names_a_single_class_validation_part():
    """split_<d>: train = the build's train + validation rows (fine-tuning fits on train, stops on validation),
    test = its test rows, whatever the folds; a validation part of one class is refused, by name."""
    tb = np.array([0, 1] * 9)
    split = np.array(["train", "test", "validation"] * 6)
    sets = {"tbx11k": tb_set("tbx11k", tb, np.zeros(18, int), split)}
    (s,) = protocols.check_protocol(protocols.parse_protocol("split_tbx11k"), sets, need_validation=False)
    rows = np.arange(18)
    np.testing.assert_array_equal(s.train, rows[split != "test"])
    np.testing.assert_array_equal(s.validation, rows[split == "validation"])
    np.testing.assert_array_equal(s.fit, rows[split == "train"])
    np.testing.assert_array_equal(s.test, rows[split == "test"])
    one_class = np.where(split == "validation", 0, tb)
    with pytest.raises(ValueError) as e:
        protocols.check_protocol(protocols.parse_protocol("split_tbx11k"),
                                 {"tbx11k": tb_set("tbx11k", one_class, np.zeros(18, int), split)},
                                 need_validation=False)
    assert "tbx11k its fixed split: the validation part has a single class (6 negative, 0 positive" in str(e.value)


def test_cell_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    cols = {"label": y, "prob": np.clip(0.3 * y + rng.random(80) * 0.7, 0, 1), "fold": np.arange(80) % 4,
            "patient": np.arange(80)}
    for name, low, high in (("", 0.5, 0.4), ("_sens", 0.2, 0.25), ("_spec", 0.6, 0.55)):
        cols["margin" + name] = cols["prob"] - np.where(cols["fold"] < 2, low, high)
    screening = {"sensitivity": 0.9, "specificity": 0.7}
    cell = report.cell_metrics(cols, n_boot=50, seed=0, screening=screening)
    assert cell["auroc"]["value"] == pytest.approx(roc_auc_score(y, cols["prob"]), abs=1e-12)
    assert cell["specificity"]["value"] == pytest.approx(np.mean(cols["margin"][y == 0] < 0), abs=1e-12)
    for f in range(4):
        rows = cols["fold"] == f
        assert cell["per_fold_auroc"][str(f)] == pytest.approx(roc_auc_score(y[rows], cols["prob"][rows]))
    # Operating points: each split's own threshold, applied to its held-out images.
    points = cell["operating_points"]
    sens = np.mean(cols["margin_sens"][y == 1] >= 0)
    spec = np.mean(cols["margin_sens"][y == 0] < 0)
    assert points["at_sensitivity_target"]["sensitivity"]["value"] == pytest.approx(sens, abs=1e-12)
    assert points["at_sensitivity_target"]["specificity"]["value"] == pytest.approx(spec, abs=1e-12)
    assert points["at_sensitivity_target"]["who_met_point"] == (sens >= 0.9 and spec >= 0.7)
    lower = points["at_specificity_target"]
    assert lower["who_met_lower_bound"] == (lower["sensitivity"]["ci_low"] >= 0.9 and lower["specificity"]["ci_low"] >= 0.7)
    fpr, tpr, _ = roc_curve(y, cols["prob"], drop_intermediate=False)
    oracle = points["oracle"]
    assert oracle["specificity_at_sensitivity_target"]["value"] == pytest.approx(np.max(1 - fpr[tpr >= 0.9]))
    assert oracle["sensitivity_at_specificity_target"]["value"] == pytest.approx(np.max(tpr[1 - fpr >= 0.7]))
    assert cell["calibration"]["brier"]["value"] == pytest.approx(brier_score_loss(y, cols["prob"]), abs=1e-12)
    band = cell["roc_band"]
    assert np.all(np.asarray(band["tpr_low"]) <= np.asarray(band["tpr_high"]))


def test_choose_thresholds_come_from_the_training_scores_only():
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    score = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.35, 0.5, 0.7, 0.8, 0.9])
    t = report.choose_thresholds(y, score, {"sensitivity": 0.8, "specificity": 0.8})
    assert t == {"youden": 0.5, "sens": 0.5, "spec": 0.5}
    t = report.choose_thresholds(y, score, {"sensitivity": 1.0, "specificity": 1.0})
    assert t["sens"] == 0.35 and t["spec"] == 0.7


def test_paired_comparisons_use_common_images_and_holm():
    rng = np.random.default_rng(1)
    n = 120
    y = np.arange(n) % 2
    good = y + rng.normal(size=n) * 0.6
    cells = {}
    for key, score, keep in (("strong/probe", good, np.ones(n, bool)), ("weak/probe", rng.normal(size=n), np.ones(n, bool)),
                             ("strong/finetune", good + rng.normal(size=n) * 0.1, np.arange(n) < 60)):
        cells[key] = {"dataset": np.array(["shenzhen"] * keep.sum()), "image_id": np.array([f"i{i}" for i in np.flatnonzero(keep)]),
                      "label": y[keep], "prob": score[keep], "patient": np.flatnonzero(keep)}
    out = paired.paired_comparisons(cells, n_boot=200, seed=0)
    assert [(c["a"], c["b"]) for c in out] == [("strong/probe", "weak/probe"), ("strong/probe", "strong/finetune"),
                                               ("weak/probe", "strong/finetune")]
    first = out[0]
    assert first["n_images"] == n and first["wins"] == "strong/probe" and first["difference"]["ci_low"] > 0
    assert first["test"]["method"] == "delong" and first["p_holm"] < 0.05  # one image per patient
    expected = roc_auc_score(y, good) - roc_auc_score(y, cells["weak/probe"]["prob"])
    assert first["test"]["difference"] == pytest.approx(expected)
    assert out[1]["n_images"] == 60  # only the images both cells predicted
    assert out[1]["auroc_a"] == pytest.approx(roc_auc_score(y[:60], good[:60]))
    assert out[2]["wins"] == "strong/finetune"
    raw = [c["test"]["p_value"] for c in out]
    assert raw[0] == metrics.delong_test(y, good, cells["weak/probe"]["prob"])["p_value"]
    np.testing.assert_allclose([c["p_holm"] for c in out], metrics.holm_adjust(raw))


def one_protocol(scores: dict, y, patient) -> dict:
    """Per-image columns of cells that predicted the same images."""
    ids = np.array([f"i{i}" for i in range(len(y))])
    return {key: {"dataset": np.array(["csv"] * len(y)), "image_id": ids, "label": y, "prob": score,
                  "patient": patient} for key, score in scores.items()}


def test_a_cell_wins_only_when_holm_and_the_paired_ci_agree():
    """A CI that excludes 0 next to a Holm-adjusted p above 0.05 is no win (the old rule called it one)."""
    rng = np.random.default_rng(8)
    n = 200
    y = np.arange(n) % 2
    shared = y + rng.normal(size=n)
    scores = {"a/probe": shared + 0.5 * y + rng.normal(size=n) * 0.7, "b/probe": shared + rng.normal(size=n) * 0.7,
              "c/probe": rng.normal(size=n), "d/probe": rng.normal(size=n)}
    out = paired.paired_comparisons(one_protocol(scores, y, np.arange(n)), n_boot=500, seed=0)
    first = out[0]
    assert (first["a"], first["b"]) == ("a/probe", "b/probe")
    assert first["difference"]["ci_low"] > 0 and first["test"]["p_value"] < 0.05  # raw: both say a > b
    assert first["p_holm"] > 0.05 and first["wins"] is None  # adjusted over the 6 pairs: neither
    assert out[1]["wins"] == "a/probe" and out[1]["p_holm"] < 0.05 and out[1]["difference"]["ci_low"] > 0
    # The rule itself, both sides, and a CI on the other side of the tested difference.
    ci = {"ci_low": 0.01, "ci_high": 0.2}
    assert paired.winner(ci, {"difference": 0.1}, 0.049) == "a"
    assert paired.winner(ci, {"difference": 0.1}, 0.05) is None and paired.winner(ci, {"difference": 0.1}, None) is None
    assert paired.winner({"ci_low": -0.2, "ci_high": -0.01}, {"difference": -0.1}, 0.01) == "b"
    assert paired.winner({"ci_low": -0.2, "ci_high": 0.01}, {"difference": -0.1}, 0.01) is None
    assert paired.winner(ci, {"difference": -0.1}, 0.01) is None


def test_patients_with_several_images_are_compared_with_the_clustered_test():
    rng = np.random.default_rng(9)
    sizes = rng.integers(1, 5, 80)
    patient = np.repeat(rng.permutation(1000)[:80], sizes)
    y = np.repeat(np.arange(80) % 2, sizes)
    shared = np.repeat(rng.normal(size=80), sizes)
    scores = {"a/probe": y + shared + rng.normal(size=len(y)), "b/finetune": y + shared + rng.normal(size=len(y))}
    (c,) = paired.paired_comparisons(one_protocol(scores, y, patient), n_boot=100, seed=0)
    assert c["test"]["method"] == "clustered" and c["n_patients"] == 80 and c["n_images"] == len(y)
    expected = metrics.clustered_auc_test(y, scores["a/probe"], scores["b/finetune"], patient)
    assert c["test"]["p_value"] == expected["p_value"] and c["p_holm"] == expected["p_value"]
    assert c["test"]["se"] > metrics.delong_test(y, scores["a/probe"], scores["b/finetune"])["se"]
    md = report.markdown({"protocols": ["cv_csv"], "protocol_targets": {"cv_csv": "Tuberculosis"}, "cells": {},
                          "paired": {"cv_csv": [c]}, "screening": {"sensitivity": 0.9, "specificity": 0.7},
                          "calibration_bins": 10, "timings": {}, "datasets": {}})
    assert "Holm-adjusted p is below 0.05 AND the paired CI excludes 0 on its side; otherwise neither" in md
    assert f"| a/probe | b/finetune | {len(y)} | 80 |" in md and "| clustered (Obuchowski) |" in md

