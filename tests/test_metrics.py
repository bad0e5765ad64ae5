"""metachex_jax.metrics against independent references (scikit-learn, scipy, explicit resampling)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.evaluation import metrics


def binary_case(rng, n, n_levels=None, dtype=np.float64):
    """Labels with both classes and scores; n_levels limits the distinct scores (ties)."""
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    score = rng.integers(0, n_levels, n) if n_levels else rng.normal(size=n) + y
    return y, score.astype(dtype)


# -------------------- AUROC

@pytest.mark.parametrize("n", [2, 3, 7, 50, 2000])
def test_roc_auc_matches_sklearn_continuous(n):
    rng = np.random.default_rng(n)
    y, score = binary_case(rng, n)
    assert metrics.roc_auc(y, score) == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)


@pytest.mark.parametrize("n_levels", [1, 2, 3, 10])
def test_roc_auc_matches_sklearn_heavy_ties(n_levels):
    rng = np.random.default_rng(n_levels)
    for n in (4, 30, 500):
        y, score = binary_case(rng, n, n_levels)
        assert metrics.roc_auc(y, score) == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)
    if n_levels == 1:  # every score tied: chance level exactly
        assert metrics.roc_auc(y, score) == 0.5


def test_roc_auc_float32_scores_with_float32_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 5000)
    # Distinct float64 values that collapse to the same float32: ties must be judged on the given values.
    score = (0.5 + rng.integers(0, 50, 5000) * 1e-3 + rng.uniform(0, 1e-9, 5000)).astype(np.float32)
    assert len(np.unique(score)) < 60
    assert metrics.roc_auc(y, score) == pytest.approx(skm.roc_auc_score(y, score), abs=1e-9)


def test_roc_auc_perfect_inverse_and_hand_case():
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.roc_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    # pairs (pos, neg): (0.5 vs 0.5 tie) = 0.5, (0.5 vs 0.1) = 1, (0.9 vs both) = 2 -> 3.5 / 4
    assert metrics.roc_auc([1, 1, 0, 0], [0.5, 0.9, 0.5, 0.1]) == 0.875


def test_roc_auc_masked_entries_are_ignored_whatever_they_hold():
    rng = np.random.default_rng(1)
    y, score = binary_case(rng, 300, 8)
    mask = rng.random(300) < 0.7
    mask[:2] = True
    y_dirty = np.where(mask, y, -1)  # e.g. unknown sex
    score_dirty = np.where(mask, score, np.nan)
    expected = skm.roc_auc_score(y[mask], score[mask])
    assert metrics.roc_auc(y_dirty, score_dirty, weight_mask=mask) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_integer_weights_equal_repeated_rows_and_sklearn_weights():
    rng = np.random.default_rng(2)
    y, score = binary_case(rng, 200, 12)
    weights = rng.integers(0, 4, 200)
    weights[:2] = 1
    repeated = metrics.roc_auc(np.repeat(y, weights), np.repeat(score, weights))
    weighted = metrics.roc_auc(y, score, weight_mask=weights)
    assert weighted == pytest.approx(repeated, abs=1e-12)
    assert weighted == pytest.approx(skm.roc_auc_score(y, score, sample_weight=weights), abs=1e-12)


def test_roc_auc_batched_weights_equal_one_by_one():
    rng = np.random.default_rng(3)
    y, score = binary_case(rng, 100, 6)
    weights = rng.integers(0, 3, (100, 9)).astype(float)
    weights[:, 4] = 0
    weights[y == 1, 5] = 0  # column 5 has no positives
    batched = metrics.roc_auc(y, score, weight_mask=weights)
    assert batched.shape == (9,)
    for b in range(9):
        one = metrics.roc_auc(y, score, weight_mask=weights[:, b])
        assert np.isnan(one) if b in (4, 5) else one == pytest.approx(batched[b], abs=1e-12)
    assert np.isnan(batched[[4, 5]]).all()


def test_roc_auc_single_class_is_nan():
    assert np.isnan(metrics.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert np.isnan(metrics.roc_auc([0, 1, 1], [0.1, 0.2, 0.3], weight_mask=[0, 1, 1]))
    assert np.isnan(metrics.roc_auc([], []))


def test_roc_auc_bad_input_names_every_offender():
    with pytest.raises(ValueError) as e:
        metrics.roc_auc([0, 2, 1, -1, 1], [0.1, 0.2, 0.3, 0.4, 0.5])
    assert "1: 2.0" in str(e.value) and "3: -1.0" in str(e.value)
    with pytest.raises(ValueError) as e:
        metrics.roc_auc([0, 1, 1, 0], [np.nan, 0.2, np.inf, 0.1])
    assert "0: nan" in str(e.value) and "2: inf" in str(e.value)
    with pytest.raises(ValueError, match="0: -1.0"):
        metrics.roc_auc([0, 1], [0.1, 0.2], weight_mask=[-1, 1])
    with pytest.raises(ValueError, match="shape"):
        metrics.roc_auc([0, 1], [0.1, 0.2], weight_mask=[1, 1, 1])


def test_roc_auc_per_column_matches_sklearn_and_names_columns():
    rng = np.random.default_rng(4)
    y = (rng.random((120, 5)) < 0.3).astype(np.float32)
    y[:2] = [[0] * 5, [1] * 5]
    score = (y + rng.normal(size=(120, 5))).astype(np.float32)
    mask = (rng.random((120, 5)) < 0.8).astype(np.float32)
    mask[:2] = 1
    mask[:, 3] = 0
    out = metrics.roc_auc_per_column(y, score, mask)
    for j in range(5):
        keep = mask[:, j] > 0
        assert np.isnan(out[j]) if j == 3 else out[j] == pytest.approx(
            skm.roc_auc_score(y[keep, j], score[keep, j]), abs=1e-12)
    y[7, 1], y[9, 4] = 3, 5
    mask[[7, 9], [1, 4]] = 1
    with pytest.raises(ValueError) as e:
        metrics.roc_auc_per_column(y, score, mask, column_names=list("abcde"))
    assert "y_true[:, b]" in str(e.value) and "7: 3.0" in str(e.value)
    assert "y_true[:, e]" in str(e.value) and "9: 5.0" in str(e.value)


# -------------------- ROC curve

@pytest.mark.parametrize("n_levels", [None, 4])
def test_roc_curve_matches_sklearn(n_levels):
    rng = np.random.default_rng(5)
    y, score = binary_case(rng, 400, n_levels, np.float32)
    weights = rng.integers(0, 3, 400)
    weights[:2] = 1
    for w in (None, weights):
        fpr, tpr, thresholds = metrics.roc_curve(y, score, weight_mask=w)
        ref = skm.roc_curve(y, score, sample_weight=w, drop_intermediate=False)
        np.testing.assert_allclose(fpr, ref[0], atol=1e-12)
        np.testing.assert_allclose(tpr, ref[1], atol=1e-12)
        np.testing.assert_array_equal(thresholds, ref[2])
        assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.roc_auc(y, score, w), abs=1e-12)


def test_roc_curve_single_class_rate_is_nan_like_sklearn():
    fpr, tpr, _ = metrics.roc_curve([1, 1, 1], [0.1, 0.5, 0.9])
    assert np.isnan(fpr).all() and not np.isnan(tpr).any()
    with pytest.warns(Warning):
        ref = skm.roc_curve([1, 1, 1], [0.1, 0.5, 0.9], drop_intermediate=False)
    np.testing.assert_array_equal(tpr, ref[1])


# -------------------- thresholds

def test_accuracy_sensitivity_specificity_match_sklearn():
    rng = np.random.default_rng(6)
    y, _ = binary_case(rng, 300)
    prob = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, 300), 0, 1).astype(np.float32)
    prob[:3] = 0.5  # the threshold itself counts as positive
    mask = rng.random(300) < 0.8
    mask[:3] = True
    for t in (0.3, 0.5):
        pred = (prob >= t).astype(int)
        assert metrics.accuracy(y, prob, t, mask) == pytest.approx(
            skm.accuracy_score(y[mask], pred[mask]), abs=1e-12)
        assert metrics.sensitivity(y, prob, t, mask) == pytest.approx(
            skm.recall_score(y[mask], pred[mask], pos_label=1), abs=1e-12)
        assert metrics.specificity(y, prob, t, mask) == pytest.approx(
            skm.recall_score(y[mask], pred[mask], pos_label=0), abs=1e-12)
    assert np.isnan(metrics.sensitivity([0, 0], [0.1, 0.9], 0.5))
    assert np.isnan(metrics.accuracy([0, 1], [0.1, 0.9], weight_mask=[0, 0]))


def test_youden_threshold_maximises_j_over_sklearn_curve():
    rng = np.random.default_rng(7)
    y, score = binary_case(rng, 500, 40)
    t = metrics.youden_threshold(y, score)
    fpr, tpr, thresholds = skm.roc_curve(y, score, drop_intermediate=False)
    j = tpr - fpr
    best = thresholds[np.isclose(j, j.max(), atol=1e-12)]
    assert t == best.max()
    j_at_t = metrics.sensitivity(y, score, t) + metrics.specificity(y, score, t) - 1
    assert j_at_t == pytest.approx(j.max(), abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        metrics.youden_threshold([1, 1], [0.2, 0.3])


# -------------------- regression

def test_mae_and_pearson_match_references():
    rng = np.random.default_rng(8)
    age = rng.uniform(1, 95, 400).astype(np.float32)
    pred = (age + rng.normal(0, 8, 400)).astype(np.float32)
    age64, pred64 = age.astype(np.float64), pred.astype(np.float64)  # sklearn would average in float32
    mask = rng.random(400) < 0.9
    age_dirty = np.where(mask, age, np.nan)  # masked ages may be anything
    assert metrics.mae(age_dirty, pred, mask) == pytest.approx(
        skm.mean_absolute_error(age64[mask], pred64[mask]), abs=1e-12)
    assert metrics.pearson_r(age_dirty, pred, mask) == pytest.approx(
        scipy.stats.pearsonr(age64[mask], pred64[mask]).statistic, abs=1e-12)
    weights = rng.integers(0, 4, 400)
    assert metrics.pearson_r(age, pred, weights) == pytest.approx(
        scipy.stats.pearsonr(np.repeat(age64, weights), np.repeat(pred64, weights)).statistic, abs=1e-12)
    assert metrics.mae(age, pred, weights) == pytest.approx(
        skm.mean_absolute_error(age64, pred64, sample_weight=weights), abs=1e-12)


def test_regression_undefined_and_bad_values():
    assert np.isnan(metrics.pearson_r([1, 2, 3], [5, 5, 5]))
    assert np.isnan(metrics.mae([1, 2], [1, 2], weight_mask=[0, 0]))
    with pytest.raises(ValueError) as e:
        metrics.mae([1, np.nan, 3], [1, 2, np.inf])
    assert "y_true" in str(e.value) and "1: nan" in str(e.value)
    assert "y_pred" in str(e.value) and "2: inf" in str(e.value)


# -------------------- bootstrap

def test_group_bootstrap_weights_resample_whole_groups_deterministically(monkeypatch):
    rng = np.random.default_rng(9)
    groups = rng.choice([11, 42, 7, 3, 99, 5], size=40)
    chunks = list(metrics.iter_group_bootstrap_weights(groups, n_boot=25, seed=3))
    weights = np.concatenate(chunks, axis=1)
    assert weights.shape == (40, 25)
    for g in np.unique(groups):  # one multiplicity per group and resample
        rows = weights[groups == g]
        assert (rows == rows[0]).all()
    per_group = np.stack([weights[groups == g][0] for g in np.unique(groups)])
    np.testing.assert_array_equal(per_group.sum(axis=0), 6)  # G groups drawn per resample
    assert len({tuple(c) for c in per_group.T}) > 1  # resamples differ
    # Same seed -> same resamples, whatever the chunk size; another seed -> others.
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 40 * 4)
    small_chunks = list(metrics.iter_group_bootstrap_weights(groups, n_boot=25, seed=3))
    assert len(small_chunks) > 1
    np.testing.assert_array_equal(np.concatenate(small_chunks, axis=1), weights)
    other = np.concatenate(list(metrics.iter_group_bootstrap_weights(groups, n_boot=25, seed=4)), axis=1)
    assert not np.array_equal(other, weights)


def test_bootstrap_distribution_equals_metric_on_explicitly_resampled_data():
    rng = np.random.default_rng(10)
    groups = rng.integers(0, 15, 80)
    y, score = binary_case(rng, 80, 5)
    dist = metrics.bootstrap_distribution(metrics.roc_auc, y, score, groups=groups, n_boot=20, seed=1)
    weights = np.concatenate(list(metrics.iter_group_bootstrap_weights(groups, 20, 1)), axis=1).astype(int)
    for b in range(20):
        yb, sb = np.repeat(y, weights[:, b]), np.repeat(score, weights[:, b])
        if len(np.unique(yb)) < 2:
            assert np.isnan(dist[b])
        else:
            assert dist[b] == pytest.approx(skm.roc_auc_score(yb, sb), abs=1e-12)


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    rng = np.random.default_rng(11)
    groups = np.repeat(np.arange(150), 3)
    y, score = binary_case(rng, 450)
    point = metrics.roc_auc(y, score)
    low, high = metrics.bootstrap_ci(metrics.roc_auc, y, score, groups=groups, n_boot=300, seed=0)
    assert low < point < high and high - low < 0.2
    assert (low, high) == metrics.bootstrap_ci(metrics.roc_auc, y, score, groups=groups, n_boot=300, seed=0)
    assert (low, high) != metrics.bootstrap_ci(metrics.roc_auc, y, score, groups=groups, n_boot=300, seed=1)
    wide = metrics.bootstrap_ci(metrics.roc_auc, y, score, groups=groups, n_boot=300, seed=0, alpha=0.01)
    assert wide[0] <= low and wide[1] >= high


def test_group_bootstrap_of_identical_copies_equals_bootstrap_of_patients():
    """Ten identical images per patient carry one patient's information: the group bootstrap CI is that
    of the one-image-per-patient data, and much wider than a row bootstrap that treats copies as new data."""
    rng = np.random.default_rng(12)
    y, score = binary_case(rng, 60)
    patients = np.arange(60) * 7 + 3
    copies = 10
    y10, score10, patients10 = (np.repeat(a, copies) for a in (y, score, patients))
    per_patient = metrics.bootstrap_distribution(metrics.roc_auc, y, score, groups=patients, n_boot=200,
                                                 seed=5)
    grouped = metrics.bootstrap_distribution(metrics.roc_auc, y10, score10, groups=patients10, n_boot=200,
                                             seed=5)
    np.testing.assert_allclose(grouped, per_patient, atol=1e-12)
    group_ci = metrics.percentile_ci(grouped)
    row_ci = metrics.bootstrap_ci(metrics.roc_auc, y10, score10, groups=np.arange(600), n_boot=200, seed=5)
    assert (group_ci[1] - group_ci[0]) > 2 * (row_ci[1] - row_ci[0])


def test_bootstrap_counts_and_excludes_single_class_resamples():
    # One positive patient among six: every resample without it has no positives.
    groups = np.array([0, 0, 1, 1, 2, 3, 4, 5])
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    score = np.array([0.9, 0.4, 0.5, 0.3, 0.2, 0.8, 0.1, 0.6])
    dist = metrics.bootstrap_distribution(metrics.roc_auc, y, score, groups=groups, n_boot=100, seed=0)
    weights = np.concatenate(list(metrics.iter_group_bootstrap_weights(groups, 100, 0)), axis=1)
    missing_positive = weights[0] == 0
    assert 0 < missing_positive.sum() < 100
    assert metrics.count_undefined(dist) == missing_positive.sum()
    np.testing.assert_array_equal(np.isnan(dist), missing_positive)
    low, high = metrics.percentile_ci(dist)
    assert (low, high) == tuple(np.percentile(dist[~missing_positive], [2.5, 97.5]))
    assert metrics.percentile_ci(np.full(5, np.nan)) == pytest.approx((np.nan, np.nan), nan_ok=True)


# -------------------- multitask

def multitask_predictions(rng, n=90, n_patients=25):
    k = len(PATHOLOGIES)
    pathology = (rng.random((n, k)) < 0.3).astype(np.float32)
    pathology[:2, :] = [[0] * k, [1] * k]
    pathology[:, -1] = 0  # Hernia: no positive at all
    mask = (rng.random((n, k)) < 0.9).astype(np.float32)
    mask[:2] = 1
    sex = rng.integers(0, 2, n)
    sex_mask = (rng.random(n) < 0.8).astype(np.float32)
    sex_mask[:2] = 1
    sex[:2] = [0, 1]
    age = rng.uniform(20, 90, n).astype(np.float32)
    age_mask = (rng.random(n) < 0.85).astype(np.float32)
    return {
        "patient_id": rng.integers(0, n_patients, n).astype(np.int64),
        "pathology": pathology,
        "pathology_prob": np.clip(0.3 * pathology + rng.random((n, k)), 0, 1).astype(np.float32),
        "pathology_mask": mask,
        "sex_male": np.where(sex_mask > 0, sex, -1),
        "sex_male_prob": np.clip(0.3 * sex + rng.random(n), 0, 1).astype(np.float32),
        "sex_male_mask": sex_mask,
        "view_ap": rng.integers(0, 2, n),
        "view_ap_prob": rng.random(n).astype(np.float32),
        "view_ap_mask": np.ones(n, np.float32),
        "age": np.where(age_mask > 0, age, 0).astype(np.float32),
        "age_pred": (age + rng.normal(0, 10, n)).astype(np.float32),
        "age_mask": age_mask,
        "image_name": np.array([f"{i:08d}_000.png" for i in range(n)]),
    }


def test_evaluate_multitask_values_match_sklearn():
    rng = np.random.default_rng(13)
    p = multitask_predictions(rng)
    r = metrics.evaluate_multitask(p, n_boot=200, seed=0)
    assert list(r) == ["counts", "bootstrap", "mean_auroc", "pathology", "sex_male", "view_ap", "age"]
    assert list(r["pathology"]) == list(PATHOLOGIES)
    aurocs = []
    for j, name in enumerate(PATHOLOGIES[:-1]):
        keep = p["pathology_mask"][:, j] > 0
        expected = skm.roc_auc_score(p["pathology"][keep, j], p["pathology_prob"][keep, j])
        entry = r["pathology"][name]["auroc"]
        assert entry["value"] == pytest.approx(expected, abs=1e-12)
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
        aurocs.append(expected)
    hernia = r["pathology"]["Hernia"]["auroc"]
    assert np.isnan(hernia["value"]) and hernia["n_undefined"] == 200
    mean = r["mean_auroc"]
    assert mean["value"] == pytest.approx(np.mean(aurocs), abs=1e-12)
    assert mean["labels"] == list(PATHOLOGIES[:-1])
    assert mean["ci_low"] < mean["value"] < mean["ci_high"]

    for task in ("sex_male", "view_ap"):
        keep = p[f"{task}_mask"] > 0
        y, prob = p[task][keep], p[f"{task}_prob"][keep]
        assert r[task]["auroc"]["value"] == pytest.approx(skm.roc_auc_score(y, prob), abs=1e-12)
        assert r[task]["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y, prob >= 0.5), abs=1e-12)
        assert r[task]["accuracy_threshold"] == 0.5
    keep = p["age_mask"] > 0
    assert r["age"]["mae_years"]["value"] == pytest.approx(
        skm.mean_absolute_error(p["age"][keep].astype(np.float64), p["age_pred"][keep].astype(np.float64)),
        abs=1e-12)
    age64, pred64 = p["age"][keep].astype(np.float64), p["age_pred"][keep].astype(np.float64)
    assert r["age"]["pearson_r"]["value"] == pytest.approx(scipy.stats.pearsonr(age64, pred64).statistic,
                                                           abs=1e-12)

    counts = r["counts"]
    assert counts["images"] == 90 and counts["patients"] == len(np.unique(p["patient_id"]))
    assert counts["pathology"]["Atelectasis"] == {
        "labelled": int((p["pathology_mask"][:, 0] > 0).sum()),
        "positives": int(((p["pathology_mask"][:, 0] > 0) & (p["pathology"][:, 0] == 1)).sum())}
    assert counts["sex_male"]["labelled"] == int(p["sex_male_mask"].sum())
    assert counts["age"] == {"labelled": int(keep.sum()), "masked": int((~keep).sum())}
    assert r["bootstrap"]["n_boot"] == 200

    # The CIs are those of the patient bootstrap of the metric itself.
    sex_dist = metrics.bootstrap_distribution(
        lambda y, s, m, weight_mask: metrics.roc_auc(y, s, weight_mask * m[:, None]),
        p["sex_male"], p["sex_male_prob"], p["sex_male_mask"], groups=p["patient_id"], n_boot=200, seed=0)
    sex_auroc = r["sex_male"]["auroc"]
    assert (sex_auroc["ci_low"], sex_auroc["ci_high"]) == metrics.percentile_ci(sex_dist)


def test_evaluate_multitask_is_deterministic_and_handles_missing_heads():
    rng = np.random.default_rng(14)
    p = multitask_predictions(rng)
    a = metrics.evaluate_multitask(p, n_boot=50, seed=2)
    b = metrics.evaluate_multitask(p, n_boot=50, seed=2)
    assert repr(a) == repr(b)
    chexnet = {k: v for k, v in p.items() if k == "patient_id" or k.startswith("pathology")}
    r = metrics.evaluate_multitask(chexnet, n_boot=0)
    assert list(r) == ["counts", "bootstrap", "mean_auroc", "pathology"]
    assert r["mean_auroc"]["value"] == a["mean_auroc"]["value"]
    assert np.isnan(r["mean_auroc"]["ci_low"])


def test_evaluate_multitask_reports_every_problem():
    rng = np.random.default_rng(15)
    p = multitask_predictions(rng)
    broken = dict(p)
    del broken["view_ap_mask"]
    broken["age_pred"] = broken["age_pred"][:10]
    with pytest.raises(ValueError) as e:
        metrics.evaluate_multitask(broken, n_boot=10)
    assert "view_ap_mask" in str(e.value) and "'age_pred' has shape (10,)" in str(e.value)
    bad_values = dict(p)
    bad_values["sex_male"] = np.where(p["sex_male_mask"] > 0, 2, -1)
    bad_values["age_pred"] = np.full(90, np.nan, np.float32)
    with pytest.raises(ValueError) as e:
        metrics.evaluate_multitask(bad_values, n_boot=10)
    assert "sex_male:" in str(e.value) and "age:" in str(e.value)
    with pytest.raises(ValueError, match="patient_id"):
        metrics.evaluate_multitask({k: v for k, v in p.items() if k != "patient_id"})


# -------------------- DeLong, Holm, paired bootstrap

def delong_by_pairs(y, a, b):
    """DeLong et al. (1988) written out from the definition, independently of metrics.delong_test: the
    pairwise kernel psi(pos, neg) = 1 / 0.5 / 0 for every (positive, negative) pair, placement values as its
    row and column means, and the contrast (1, -1) of their covariance matrices."""
    y = np.asarray(y)

    def kernel(s):
        d = np.asarray(s, float)[y == 1][:, None] - np.asarray(s, float)[y == 0][None, :]
        return (d > 0) + 0.5 * (d == 0)

    ka, kb = kernel(a), kernel(b)
    m, n = ka.shape
    contrast = np.array([1.0, -1.0])
    s10 = np.cov(np.stack([ka.mean(1), kb.mean(1)]))
    s01 = np.cov(np.stack([ka.mean(0), kb.mean(0)]))
    variance = contrast @ s10 @ contrast / m + contrast @ s01 @ contrast / n
    z = (ka.mean() - kb.mean()) / np.sqrt(variance)
    return ka.mean(), kb.mean(), np.sqrt(variance), 2 * scipy.stats.norm.sf(abs(z))


def test_delong_hand_example():
    # Positives 0.9, 0.6 (a) / 0.8, 0.2 (b); negatives 0.7, 0.1 (a) / 0.5, 0.3 (b).
    # a: V10 = (1, 1/2), V01 = (1/2, 1), AUROC 3/4.  b: V10 = (1, 0), V01 = (1/2, 1/2), AUROC 1/2.
    # S10: var_a 1/8, var_b 1/2, cov 1/4;  S01: var_a 1/8, var_b 0, cov 0.
    # var(A - B) = (1/8 + 1/2 - 1/2) / 2 + (1/8 + 0 - 0) / 2 = 1/8;  z = (1/4) / sqrt(1/8) = 0.7071
    out = metrics.delong_test([1, 1, 0, 0], [0.9, 0.6, 0.7, 0.1], [0.8, 0.2, 0.5, 0.3])
    assert out["auroc_a"] == 0.75 and out["auroc_b"] == 0.5 and out["difference"] == 0.25
    assert out["se"] == pytest.approx(np.sqrt(1 / 8), abs=1e-15)
    assert out["z"] == pytest.approx(1 / np.sqrt(2), abs=1e-12)
    assert out["p_value"] == pytest.approx(2 * scipy.stats.norm.sf(1 / np.sqrt(2)), abs=1e-12)  # 0.4795


@pytest.mark.parametrize("n_levels", [None, 4])
def test_delong_matches_pairwise_definition_and_sklearn_auroc(n_levels):
    rng = np.random.default_rng(7)
    for n in (12, 80, 400):
        y, a = binary_case(rng, n, n_levels)
        b = a + rng.normal(size=n) * 1.5 if n_levels is None else rng.integers(0, n_levels, n) + y
        out = metrics.delong_test(y, a, b)
        auc_a, auc_b, se, p = delong_by_pairs(y, a, b)
        assert out["auroc_a"] == pytest.approx(skm.roc_auc_score(y, a), abs=1e-12) == pytest.approx(auc_a)
        assert out["auroc_b"] == pytest.approx(auc_b, abs=1e-12)
        assert out["se"] == pytest.approx(se, rel=1e-9)
        assert out["p_value"] == pytest.approx(p, rel=1e-9, abs=1e-15)


def test_delong_identical_scores_and_null_calibration():
    rng = np.random.default_rng(3)
    y, a = binary_case(rng, 50)
    same = metrics.delong_test(y, a, a)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    with pytest.raises(ValueError, match="both classes"):
        metrics.delong_test(np.ones(5), a[:5], a[:5])
    # Under the null (two scores equally informative, independent noise) about 5% of tests reject at 0.05.
    rejections = 0
    for _ in range(300):
        y = rng.integers(0, 2, 120)
        signal = rng.normal(size=120) + y
        rejections += metrics.delong_test(y, signal + rng.normal(size=120), signal + rng.normal(size=120))[
            "p_value"] < 0.05
    assert 0.02 <= rejections / 300 <= 0.09


def test_holm_adjust_hand_example():
    # Sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06 for the last.
    np.testing.assert_allclose(metrics.holm_adjust([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(metrics.holm_adjust([0.5, np.nan, 0.4]), [0.8, np.nan, 0.8])
    assert metrics.holm_adjust([0.9, 0.8]).max() == 1.0


# -------------------- the clustered (Obuchowski 1997) test for patients with several images

def obuchowski_by_loops(y, a, b, clusters):
    """Obuchowski (1997, Biometrics 53:567) written out with plain loops over clusters and images, independently of
    metrics.clustered_auc_test: psi(X, Y) = 1 / 0.5 / 0 for X >, =, < Y; per cluster i the structural components
    V10_i = sum over its positive images X_ij of (1/M) sum_{k,l} psi(X_ij, Y_kl) and V01_i = sum over its negative
    images Y_il of (1/N) sum_{k,j} psi(X_kj, Y_il); S10, S01, S11 and the two scores' covariance from them.
    Returns (AUROC a, AUROC b, se of the difference, two-sided p)."""
    ids = list(dict.fromkeys(clusters.tolist()))
    members = {c: [i for i in range(len(y)) if clusters[i] == c] for c in ids}

    def psi(x, v):
        return 1.0 if x > v else 0.5 if x == v else 0.0

    def components(score):
        pos = {c: [score[i] for i in members[c] if y[i] == 1] for c in ids}
        neg = {c: [score[i] for i in members[c] if y[i] == 0] for c in ids}
        n_pos, n_neg = sum(map(len, pos.values())), sum(map(len, neg.values()))
        all_neg = [v for c in ids for v in neg[c]]
        all_pos = [x for c in ids for x in pos[c]]
        theta = sum(psi(x, v) for x in all_pos for v in all_neg) / (n_pos * n_neg)
        v10 = {c: sum(sum(psi(x, v) for v in all_neg) / n_neg for x in pos[c]) for c in ids}
        v01 = {c: sum(sum(psi(x, v) for x in all_pos) / n_pos for v in neg[c]) for c in ids}
        m = {c: len(pos[c]) for c in ids}
        n = {c: len(neg[c]) for c in ids}
        return theta, v10, v01, m, n, n_pos, n_neg

    ta, v10a, v01a, m, n, big_n, big_m = components(a)
    tb, v10b, v01b, _, _, _, _ = components(b)
    i10 = sum(1 for c in ids if m[c] > 0)
    i01 = sum(1 for c in ids if n[c] > 0)
    i = len(ids)

    def s10(v1, t1, v2, t2):
        return i10 / ((i10 - 1) * big_n) * sum((v1[c] - m[c] * t1) * (v2[c] - m[c] * t2) for c in ids)

    def s01(v1, t1, v2, t2):
        return i01 / ((i01 - 1) * big_m) * sum((v1[c] - n[c] * t1) * (v2[c] - n[c] * t2) for c in ids)

    def s11(v10, t1, v01, t2):
        return i / (i - 1) * sum((v10[c] - m[c] * t1) * (v01[c] - n[c] * t2) for c in ids)

    def cov(r, s):
        (v10r, v01r, tr), (v10s, v01s, ts) = r, s
        return (s10(v10r, tr, v10s, ts) / big_n + s01(v01r, tr, v01s, ts) / big_m
                + (s11(v10r, tr, v01s, ts) + s11(v10s, ts, v01r, tr)) / (big_n * big_m))

    ra, rb = (v10a, v01a, ta), (v10b, v01b, tb)
    se = np.sqrt(cov(ra, ra) + cov(rb, rb) - 2 * cov(ra, rb))
    return ta, tb, se, 2 * scipy.stats.norm.sf(abs(ta - tb) / se)


def clustered_case(rng, clusters, n_levels=None, mixed=True):
    """Clusters of 1 to 4 images, labels per cluster (or per image when mixed), correlated scores a and b."""
    sizes = rng.integers(1, 5, clusters)
    cluster = np.repeat(rng.permutation(10 * clusters)[:clusters], sizes)  # keys in no particular order
    y = np.repeat(rng.integers(0, 2, clusters), sizes)
    if mixed:  # some clusters hold both classes
        flip = rng.random(len(y)) < 0.2
        y = np.where(flip, 1 - y, y)
    y[:2], y[-2:] = [0, 1], [1, 0]
    shared = np.repeat(rng.normal(size=clusters), sizes)
    a = y + shared + rng.normal(size=len(y))
    b = 0.8 * y + shared + rng.normal(size=len(y))
    if n_levels:
        a, b = np.round(a * n_levels / 4), np.round(b * n_levels / 4)  # ties within and across classes
    order = rng.permutation(len(y))  # a cluster's images need not be adjacent
    return y[order], a[order], b[order], cluster[order]


@pytest.mark.parametrize("n_levels,mixed", [(None, False), (None, True), (3, True)])
def test_clustered_auc_test_matches_the_papers_formulas_written_as_loops(n_levels, mixed):
    rng = np.random.default_rng(21)
    for clusters in (6, 25, 60):
        y, a, b, cluster = clustered_case(rng, clusters, n_levels, mixed)
        out = metrics.clustered_auc_test(y, a, b, cluster)
        auc_a, auc_b, se, p = obuchowski_by_loops(y, a, b, cluster)
        assert out["auroc_a"] == pytest.approx(skm.roc_auc_score(y, a), abs=1e-12) == pytest.approx(auc_a)
        assert out["auroc_b"] == pytest.approx(auc_b, abs=1e-12)
        assert out["se"] == pytest.approx(se, rel=1e-9)
        assert out["p_value"] == pytest.approx(p, rel=1e-9, abs=1e-15)
        assert out["n_clusters"] == len(set(cluster.tolist()))


def test_clustered_auc_test_is_delong_with_one_image_per_cluster_and_ignores_identical_copies():
    rng = np.random.default_rng(22)
    for n_levels in (None, 4):
        y, a = binary_case(rng, 150, n_levels)
        b = a + rng.normal(size=150) * 1.5
        delong = metrics.delong_test(y, a, b)
        single = metrics.clustered_auc_test(y, a, b, rng.permutation(150) + 1000)
        for key in ("auroc_a", "auroc_b", "difference", "se", "z", "p_value"):
            assert single[key] == pytest.approx(delong[key], rel=1e-9, abs=1e-15)
        # Every patient imaged three times with identical pixels: no new information. The clustered test gives
        # DeLong's answer on the patients; plain DeLong on the images takes the copies as independent.
        copies = metrics.clustered_auc_test(np.tile(y, 3), np.tile(a, 3), np.tile(b, 3), np.tile(np.arange(150), 3))
        assert copies["se"] == pytest.approx(delong["se"], rel=1e-9)
        naive = metrics.delong_test(np.tile(y, 3), np.tile(a, 3), np.tile(b, 3))
        assert naive["se"] == pytest.approx(delong["se"] / np.sqrt(3), rel=0.02)


def test_clustered_auc_test_needs_two_clusters_of_each_class():
    y = np.array([1, 1, 0, 0, 0])
    with pytest.raises(ValueError, match="at least 2 clusters holding each class; got 1 with a positive"):
        metrics.clustered_auc_test(y, [0.9, 0.8, 0.1, 0.2, 0.3], [0.7, 0.6, 0.4, 0.2, 0.1], [7, 7, 1, 2, 3])


def test_clustered_test_holds_its_level_where_delong_does_not():
    """1,000 null data sets of 200 patients with 1-4 images each (equal true AUROC 0.8, within-patient score
    correlation 0.5, between-model 0.6): the clustered test rejects about 5% at 0.05, plain DeLong far more."""
    from metachex_jax.evaluation import auc_test_level

    # The generator has the stated properties (checked with scikit-learn and numpy on pooled data sets).
    rng = np.random.default_rng(99)
    pooled = [auc_test_level.null_dataset(rng, 200, **auc_test_level.NULL_MODEL) for _ in range(40)]
    for y, a, b, patient in pooled[:5]:
        sizes = np.bincount(patient)
        assert sizes.min() == 1 and sizes.max() == 4 and len(sizes) == 200
        assert all(len(set(y[patient == p])) == 1 for p in range(200))  # a patient-level label
    assert np.mean([skm.roc_auc_score(y, s) for y, a, b, _ in pooled for s in (a, b)]) == pytest.approx(0.8, abs=0.01)
    within, between = [], []
    for y, a, b, patient in pooled:
        residual_a, residual_b = (s - np.where(y == 1, s[y == 1].mean(), s[y == 0].mean()) for s in (a, b))
        later = np.flatnonzero(patient[1:] == patient[:-1]) + 1  # an image and the one before, same patient
        within += list(zip(residual_a[later], residual_a[later - 1]))
        between.append(np.corrcoef(residual_a, residual_b)[0, 1])
    assert np.corrcoef(np.asarray(within).T)[0, 1] == pytest.approx(0.5, abs=0.05)
    assert np.mean(between) == pytest.approx(0.6, abs=0.03)

    result = auc_test_level.rejection_rates(datasets=1000, patients=200, seed=0)
    rates = result["rejection_rate"]
    assert 0.03 <= rates["clustered"] <= 0.07
    assert rates["delong"] > 0.10  # images taken as independent: the variance is understated


def test_paired_bootstrap_difference_equals_explicit_resampling_with_sklearn():
    rng = np.random.default_rng(11)
    y, a = binary_case(rng, 60)
    b = a + rng.normal(size=60)
    groups = np.arange(60)
    out = metrics.paired_bootstrap_difference(metrics.roc_auc, y, a, b, groups=groups, n_boot=200, seed=5)
    assert out["value"] == pytest.approx(skm.roc_auc_score(y, a) - skm.roc_auc_score(y, b), abs=1e-12)
    # The same resamples, drawn explicitly: both scores of every resample see the same patients.
    explicit = []
    for w in metrics.iter_group_bootstrap_weights(groups, 200, 5):
        for column in w.T:
            rows = np.repeat(np.arange(60), column.astype(int))
            if len(set(y[rows])) == 2:
                explicit.append(skm.roc_auc_score(y[rows], a[rows]) - skm.roc_auc_score(y[rows], b[rows]))
    low, high = np.percentile(explicit, [2.5, 97.5])
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    explicit = np.asarray(explicit)
    assert out["p_two_sided"] == pytest.approx(min(1, 2 * min(np.mean(explicit <= 0), np.mean(explicit >= 0))))


def test_paired_bootstrap_ci_agrees_with_scipy_bootstrap():
    rng = np.random.default_rng(12)
    y, a = binary_case(rng, 150)
    b = 0.5 * a + rng.normal(size=150)
    ours = metrics.paired_bootstrap_difference(metrics.roc_auc, y, a, b, groups=np.arange(150), n_boot=4000,
                                               seed=0)
    def auroc_by_ranks(yy, ss):  # Mann-Whitney from scipy's midranks, vectorised over resamples (last axis)
        ranks = scipy.stats.rankdata(ss, axis=-1)
        m = yy.sum(-1)
        n = yy.shape[-1] - m
        return ((ranks * yy).sum(-1) - m * (m + 1) / 2) / (m * n)

    reference = scipy.stats.bootstrap(
        (y, a, b), lambda yy, aa, bb, axis: auroc_by_ranks(yy, aa) - auroc_by_ranks(yy, bb), paired=True,
        vectorized=True, n_resamples=4000, method="percentile", random_state=1).confidence_interval
    # Different random resamples: the intervals agree to Monte-Carlo precision.
    assert ours["ci_low"] == pytest.approx(reference.low, abs=0.015)
    assert ours["ci_high"] == pytest.approx(reference.high, abs=0.015)
    # Pairing matters: the paired interval is narrower than one from independent resamples of each score.
    a_dist = metrics.bootstrap_distribution(metrics.roc_auc, y, a, groups=np.arange(150), n_boot=4000, seed=1)
    b_dist = metrics.bootstrap_distribution(metrics.roc_auc, y, b, groups=np.arange(150), n_boot=4000, seed=2)
    unpaired = np.percentile(a_dist - b_dist, [2.5, 97.5])
    assert ours["ci_high"] - ours["ci_low"] < unpaired[1] - unpaired[0]


# -------------------- operating points

OP_Y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
OP_SCORE = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.35, 0.5, 0.7, 0.8, 0.9])


def test_operating_points_hand_example():
    # Positives 0.9 0.8 0.7 0.5 0.35; negatives 0.6 0.4 0.3 0.2 0.1.
    assert metrics.threshold_at_sensitivity(OP_Y, OP_SCORE, 0.8) == 0.5  # 4 of 5 positives >= 0.5
    assert metrics.threshold_at_sensitivity(OP_Y, OP_SCORE, 0.9) == 0.35  # needs all 5
    assert metrics.threshold_at_specificity(OP_Y, OP_SCORE, 0.8) == 0.5  # 0.6 is the one false positive
    assert metrics.threshold_at_specificity(OP_Y, OP_SCORE, 1.0) == 0.7
    assert metrics.specificity_at_sensitivity(OP_Y, OP_SCORE, 0.8) == pytest.approx(0.8)
    assert metrics.specificity_at_sensitivity(OP_Y, OP_SCORE, 0.9) == pytest.approx(0.6)  # 0.3 0.2 0.1 below 0.35
    assert metrics.sensitivity_at_specificity(OP_Y, OP_SCORE, 0.7) == pytest.approx(0.8)
    assert metrics.sensitivity_at_specificity(OP_Y, OP_SCORE, 1.0) == pytest.approx(0.6)
    # The chosen thresholds give at least the target on the data they were chosen on.
    assert metrics.sensitivity(OP_Y, OP_SCORE, 0.35) == 1.0 and metrics.specificity(OP_Y, OP_SCORE, 0.5) == 0.8
    # Only "nothing positive" keeps the specificity: the threshold sits just above the highest score.
    t = metrics.threshold_at_specificity([1, 0], [0.1, 0.9], 0.7)
    assert t > 0.9 and metrics.specificity([1, 0], [0.1, 0.9], t) == 1.0
    with pytest.raises(ValueError, match="needs positives"):
        metrics.threshold_at_sensitivity([0, 0], [0.1, 0.2], 0.9)


def test_oracle_operating_points_match_sklearn_curve_and_batch():
    rng = np.random.default_rng(4)
    for n_levels in (None, 6):
        y, score = binary_case(rng, 300, n_levels)
        fpr, tpr, _ = skm.roc_curve(y, score, drop_intermediate=False)
        assert metrics.specificity_at_sensitivity(y, score, 0.9) == pytest.approx(np.max(1 - fpr[tpr >= 0.9]))
        assert metrics.sensitivity_at_specificity(y, score, 0.7) == pytest.approx(np.max(tpr[1 - fpr >= 0.7]))
        w = rng.integers(0, 3, (300, 5)).astype(float)
        w[:2] = 1
        batched = metrics.specificity_at_sensitivity(y, score, 0.9, weight_mask=w)
        one_by_one = [metrics.specificity_at_sensitivity(y, score, 0.9, weight_mask=w[:, b]) for b in range(5)]
        np.testing.assert_allclose(batched, one_by_one)
        batched = metrics.sensitivity_at_specificity(y, score, 0.7, weight_mask=w)
        np.testing.assert_allclose(batched, [metrics.sensitivity_at_specificity(y, score, 0.7, weight_mask=w[:, b])
                                             for b in range(5)])
    assert np.isnan(metrics.specificity_at_sensitivity([1, 1], [0.2, 0.3], 0.9))


def test_roc_band_equals_explicit_resampling():
    rng = np.random.default_rng(5)
    y, score = binary_case(rng, 40, 8)
    grid = np.linspace(0, 1, 11)
    low, high = metrics.roc_band(y, score, groups=np.arange(40), fpr_grid=grid, n_boot=100, seed=3)
    curves = []
    for w in metrics.iter_group_bootstrap_weights(np.arange(40), 100, 3):
        for column in w.T:
            rows = np.repeat(np.arange(40), column.astype(int))
            if len(set(y[rows])) == 2:
                fpr, tpr, _ = skm.roc_curve(y[rows], score[rows], drop_intermediate=False)
                curves.append([tpr[fpr <= g + 1e-12].max() for g in grid])
    np.testing.assert_allclose(low, np.percentile(curves, 2.5, axis=0))
    np.testing.assert_allclose(high, np.percentile(curves, 97.5, axis=0))
    assert np.all(low <= high)


# -------------------- calibration

def test_calibration_hand_example_and_sklearn():
    # Bin 0 holds 0.05 (y 0) and 0.05 (y 1): |1 - 0.1| = 0.9; bin 9 holds two 0.95 with y 1: |2 - 1.9| = 0.1.
    assert metrics.expected_calibration_error([0, 1, 1, 1], [0.05, 0.05, 0.95, 0.95]) == pytest.approx(0.25)
    assert metrics.brier_score([0, 1], [0.0, 0.5]) == pytest.approx(0.125)
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(6)
    prob = rng.random(500)
    y = (rng.random(500) < prob ** 1.5).astype(int)
    assert metrics.brier_score(y, prob) == pytest.approx(skm.brier_score_loss(y, prob), abs=1e-12)
    observed, predicted = calibration_curve(y, prob, n_bins=10, strategy="uniform")
    curve = metrics.reliability_curve(y, prob, n_bins=10)
    np.testing.assert_allclose(curve["observed"], observed)
    np.testing.assert_allclose(curve["mean_predicted"], predicted)
    counts = np.asarray(curve["count"])
    assert metrics.expected_calibration_error(y, prob) == pytest.approx(
        np.sum(counts / 500 * np.abs(observed - predicted)), abs=1e-12)
    w = rng.integers(0, 3, (500, 4)).astype(float)
    np.testing.assert_allclose(metrics.expected_calibration_error(y, prob, weight_mask=w),
                               [metrics.expected_calibration_error(np.repeat(y, w[:, b].astype(int)),
                                                                   np.repeat(prob, w[:, b].astype(int)))
                                for b in range(4)])
    with pytest.raises(ValueError, match=r"\[0, 1\].*1: 1.5"):
        metrics.brier_score([0, 1], [0.2, 1.5])
