"""Label-efficiency draws and statistics, and the rule across several pretraining runs (numpy only: no model, no
dataset). The curves and run groups end to end are in test_transfer_run.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from metachex_jax.evaluation import metrics
from metachex_jax.transfer import curves, groups, protocols
from metachex_jax.transfer.sets import TransferSet
from metachex_jax.transfer.weights import Start


def difference_variance_from_pairs(test, y, a, b, *args):
    """var(mean_d A_d - mean_d B_d) from the 1-D test of every pair of score vectors: for weights w summing to 0,
    w' C w = -1/2 sum_rs w_r w_s var(A_r - A_s) (C the covariance of the AUROCs), and var(A_r - A_s) is what the
    1-D test reports (se^2). Independent of how the 2-D test averages placement values."""
    vectors = list(a) + list(b)
    w = np.r_[np.full(len(a), 1 / len(a)), np.full(len(b), -1 / len(b))]
    total = 0.0
    for r, s in itertools.combinations(range(len(vectors)), 2):
        total += 2 * w[r] * w[s] * test(y, vectors[r], vectors[s], *args)["se"] ** 2
    return -0.5 * total


@pytest.mark.parametrize("clustered", [False, True])
def test_paired_tests_of_mean_auroc_over_draws(clustered):
    rng = np.random.default_rng(3)
    if clustered:
        sizes = rng.integers(1, 4, 70)
        patient = np.repeat(np.arange(70), sizes)
        y = np.repeat(np.arange(70) % 2, sizes)
    else:
        patient, y = np.arange(90), np.arange(90) % 2
    shared = y + rng.normal(size=len(y))
    a = np.stack([shared + 0.4 * y + rng.normal(size=len(y)) for _ in range(3)])  # 3 draws each
    b = np.stack([shared + rng.normal(size=len(y)) for _ in range(3)])
    test = metrics.clustered_auc_test if clustered else metrics.delong_test
    args = (patient,) if clustered else ()
    out = test(y, a, b, *args)
    assert out["auroc_a"] == pytest.approx(np.mean([roc_auc_score(y, s) for s in a]), abs=1e-12)
    assert out["auroc_b"] == pytest.approx(np.mean([roc_auc_score(y, s) for s in b]), abs=1e-12)
    assert out["se"] ** 2 == pytest.approx(difference_variance_from_pairs(test, y, a, b, *args), rel=1e-9)
    # One draw is the 1-D test.
    assert test(y, a[:1], b[:1], *args) == pytest.approx(test(y, a[0], b[0], *args))


def hospital_like(n_patients=60, seed=0):
    """Labels and patients with 1-3 images per patient, ~40% positive patients."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 4, n_patients)
    patient = np.repeat(rng.permutation(1000)[:n_patients], sizes)
    y = np.repeat((rng.random(n_patients) < 0.4).astype(np.int64), sizes)
    return y, patient


def test_draws_are_stratified_whole_patients_and_seeded():
    y, patient = hospital_like()
    share = y.mean()
    for size in (10, 20, 40):
        rows = curves.draw_subset(y, patient, size, np.random.default_rng([0, size]))
        counts = np.bincount(y[rows], minlength=2)
        assert counts.min() >= curves.MIN_PER_CLASS
        for value in (0, 1):  # each class: at least its share (>= 5), exceeded by at most one patient's images
            target = max(curves.MIN_PER_CLASS, round(size * (share if value else 1 - share)))
            assert target - 1 <= counts[value] <= target + 3, (size, value, counts)
        chosen = set(patient[rows].tolist())
        assert all(set(np.flatnonzero(patient == p)) <= set(rows.tolist()) for p in chosen)  # whole patients
        assert np.array_equal(rows, curves.draw_subset(y, patient, size, np.random.default_rng([0, size])))
        assert not np.array_equal(rows, curves.draw_subset(y, patient, size, np.random.default_rng([1, size])))
    assert curves.draw_subset(y, patient, 9, np.random.default_rng(0)) is None  # cannot leave 5 of each
    few = np.r_[np.ones(4, np.int64), np.zeros(40, np.int64)]
    assert curves.draw_subset(few, np.arange(44), 20, np.random.default_rng(0)) is None  # 4 positives in all
    one_per_patient = (np.arange(100) % 3 == 0).astype(np.int64)
    rows = curves.draw_subset(one_per_patient, np.arange(100), 30, np.random.default_rng(0))
    assert len(rows) == 30 and np.bincount(one_per_patient[rows]).tolist() == [20, 10]  # exact: the TB sets


def a_cv_protocol(n=60, folds=3):
    y = (np.arange(n) % 5 < 2).astype(np.int64)
    view = TransferSet("tb", "Tuberculosis", [("tb", np.arange(n))], None, y, np.arange(n) % folds, np.arange(n),
                       [f"img{i}" for i in range(n)], ["tb"] * n, np.array(["train"] * n))
    protocol = protocols.parse_protocol("cv_tb")
    return {"cv_tb": protocols.check_protocol(protocol, {"tb": view}, need_validation=False)}, {"T": {"tb": view}}


def test_plan_draws_within_each_split_clips_and_skips_with_notes():
    splits, views = a_cv_protocol()
    plan = curves.plan_draws(splits, views, {"cv_tb": "T"}, sizes=[6, 12, 20, 40, "all"], draws=3, seed=0)["cv_tb"]
    assert plan.sizes == [12, 20, "all"]
    assert any("size 6 skipped" in n for n in plan.notes) and any("size 40 is at least" in n for n in plan.notes)
    for size in (12, 20):
        assert len(plan.draws[size]) == 3
        for draw in plan.draws[size]:
            for split, rows in zip(splits["cv_tb"], draw.rows):
                assert len(rows) == size and set(rows.tolist()) <= set(split.train.tolist())
        assert not np.array_equal(plan.draws[size][0].rows[0], plan.draws[size][1].rows[0])
    assert [r.tolist() for r in plan.draws["all"][0].rows] == [s.train.tolist() for s in splits["cv_tb"]]
    again = curves.plan_draws(splits, views, {"cv_tb": "T"}, sizes=[12], draws=3, seed=0)["cv_tb"]
    assert all(np.array_equal(a, b) for d, e in zip(plan.draws[12], again.draws[12]) for a, b in zip(d.rows, e.rows))
    assert curves.parse_sizes("all, 50,10") == [10, 50, "all"] and curves.parse_sizes("") == []


def replicate(value, wins, ci=0.05):
    """A replicate's comparison of a/probe with b/probe: AUROC difference `value`, `wins` "a", "b" or None."""
    return {"replicate": 0, "a": "a@0/probe", "b": "b/probe", "p_holm": 0.01,
            "difference": {"value": value, "ci_low": value - ci, "ci_high": value + ci},
            "wins": {"a": "a@0/probe", "b": "b/probe", None: None}[wins]}


def test_a_comparison_across_runs_needs_one_sign_and_a_majority_of_wins():
    assert groups.decide([replicate(0.1, "a"), replicate(0.08, "a"), replicate(0.02, None)])["side"] == "a"
    assert groups.decide([replicate(-0.1, "b"), replicate(-0.2, "b"), replicate(-0.01, None)])["side"] == "b"
    mixed = groups.decide([replicate(0.1, "a"), replicate(0.2, "a"), replicate(-0.01, None)])
    assert mixed["side"] is None and not mixed["same_sign"]  # one run points the other way
    assert groups.decide([replicate(0.1, "a"), replicate(0.02, None), replicate(0.03, None)])["side"] is None
    assert groups.decide([replicate(0.1, "a"), replicate(0.1, "a")])["side"] == "a"
    assert groups.decide([replicate(0.1, "a"), replicate(0.02, None)])["side"] is None  # 1 of 2 is no majority


def fake_start(name, val):
    return Start(name, "run", None, "", {"val_mean_auroc": val}, None)


def test_a_group_deploys_its_run_with_the_best_pretraining_validation():
    group = groups.StartGroup("metachexnet", [fake_start("metachexnet@0", 0.81), fake_start("metachexnet@1", 0.84),
                                              fake_start("metachexnet@2", 0.83)])
    start, why = groups.deploy_run(group)
    assert start.name == "metachexnet@1" and "metachexnet@1 0.8400" in why and "best validation" in why
    group.starts[2].info["val_mean_auroc"] = None
    start, why = groups.deploy_run(group)
    assert start.name == "metachexnet@0" and "not every run recorded a validation result" in why
    assert groups.replicates([group, groups.StartGroup("random", [fake_start("random", None)])])[2] == [
        group.starts[2], fake_start("random", None)]
