"""The comparison report: metrics of every (start, method, protocol) cell and the files they are written to.

A protocol column of the report is one protocol for one target (`result["protocol_targets"]`: its target; with
several targets the column is named `<protocol>.<target>`). A cell's per-image predictions (`cell_columns`) are its
out-of-fold test predictions: every test image once, with its label (the target's: TB by default), its patient,
and the thresholds of the split that predicted it. Thresholds are chosen on training data only
(`choose_thresholds`: the probe's inner out-of-fold predictions, fine-tuning's validation part predicted with the
test predictions' BatchNorm rule, finetune.py):
    threshold / margin            Youden's J
    threshold_sens / margin_sens  the highest threshold reaching the sensitivity target (screening: 0.90)
    threshold_spec / margin_spec  the lowest threshold reaching the specificity target (screening: 0.70)
Thresholded metrics use "positive when margin >= 0", so they are recomputable from the CSV alone.
Each split also fits a Platt calibrator on the same training-side scores (`learned_on_training`) and applies it to
its held-out predictions: `prob_platt` (nested: never fitted on the images it is judged on; strictly increasing,
so the thresholded metrics are the same on either scale).

Metrics (`cell_metrics`), each with a 95% bootstrap CI over patients (each TB-set image is its own patient;
every metric of a cell sees the same resamples):
- AUROC, the ROC curve and its pointwise bootstrap band; for CV the per-fold AUROCs;
- accuracy, sensitivity, specificity at Youden's threshold;
- operating points: sensitivity and specificity at the two screening thresholds, and whether WHO's triage
  targets (sensitivity >= 0.90 with specificity >= 0.70) are met by the point estimates and by the CIs' lower
  bounds; the test-set oracle values (specificity at 90% sensitivity, sensitivity at 70% specificity, with the
  threshold chosen on the test images themselves: optimistic, labelled as such);
- calibration: Brier score, expected calibration error, the reliability curve; the same after Platt scaling
  (`calibration_platt`).
Paired comparisons between cells are `paired.py`'s.

Files (`write_report`, into WORKDIR/report/, each written atomically):
    comparison.json                  every number (cells, paired comparisons, age/sex, timings, provenance)
    comparison.md                    the tables: AUROC, who wins, operating points, calibration, Youden
                                     metrics, age/sex, flags (probe convergence, flagged readings), timings
    roc_<protocol>.png               ROC curves with bootstrap bands of every start x method on that protocol
    reliability_<protocol>.png       one reliability diagram per start x method
    reliability_platt_<protocol>.png the same after each split's Platt scaling
    predictions/<start>_<method>_<protocol>.csv   per-image predictions (reports.write_predictions_csv)
"""

from __future__ import annotations

import numpy as np

from metachex_jax.contract.calibration import PlattScaling, fit_platt
from metachex_jax.core import files
from metachex_jax.evaluation import metrics, reports
from metachex_jax.transfer import curves as curves_lib
from metachex_jax.transfer import groups as groups_lib
from metachex_jax.transfer import paired
from metachex_jax.transfer.plot import write_reliability_png, write_roc_png

ROC_GRID = np.linspace(0.0, 1.0, 101)  # false positive rates of the ROC band


def choose_thresholds(y, score, screening) -> dict[str, float]:
    """The decision thresholds of a split, from training-side scores (see the module docstring)."""
    return {"youden": metrics.youden_threshold(y, score),
            "sens": metrics.threshold_at_sensitivity(y, score, screening["sensitivity"]),
            "spec": metrics.threshold_at_specificity(y, score, screening["specificity"])}


def learned_on_training(y, score, screening) -> dict:
    """What a split learns from its training-side scores, never from its held-out images: the decision thresholds
    (`choose_thresholds`) and, under "platt", the Platt calibrator applied to its held-out predictions."""
    return {**choose_thresholds(y, score, screening),
            "platt": fit_platt(y, score, fitted_on=f"the split's training-side scores ({len(y)} images)").to_json()}


def cell_columns(split_results: list[tuple], sets: dict) -> dict[str, np.ndarray]:
    """Per-image columns from [(split, test_prob, thresholds), ...] of one cell (thresholds: choose_thresholds,
    or learned_on_training: then also each split's Platt-calibrated probabilities, `prob_platt`)."""
    names = {"threshold": "youden", "threshold_sens": "sens", "threshold_spec": "spec"}
    cols = {k: [] for k in ("image_id", "dataset", "index", "patient", "fold", "label", "prob", *names)}
    for split, prob, thresholds in split_results:
        test_set = sets[split.test_set]
        cols["image_id"] += [test_set.image_id[i] for i in split.test]
        cols["dataset"] += [split.test_set] * len(split.test)
        cols["index"].append(split.test)
        cols["patient"].append(test_set.patient[split.test])
        cols["fold"].append(np.full(len(split.test), split.fold, np.int64))
        cols["label"].append(test_set.y[split.test])
        cols["prob"].append(np.asarray(prob, np.float64))
        for column, name in names.items():
            cols[column].append(np.full(len(split.test), thresholds[name], np.float64))
        if "platt" in thresholds:
            cols.setdefault("prob_platt", []).append(PlattScaling.from_json(thresholds["platt"])(prob))
    if "prob_platt" in cols and len(cols["prob_platt"]) != len(cols["prob"]):
        raise ValueError("some splits of the cell have a Platt calibrator and some do not")
    out = {k: np.asarray(v) if k in ("image_id", "dataset") else np.concatenate(v) for k, v in cols.items()}
    for column in names:
        out[column.replace("threshold", "margin")] = out["prob"] - out[column]
    return out


def _entry(fn, arrays, groups, n_boot: int, seed: int) -> dict:
    value = float(fn(*arrays))
    distribution = metrics.bootstrap_distribution(fn, *arrays, groups=groups, n_boot=n_boot, seed=seed)
    low, high = metrics.percentile_ci(distribution)
    return {"value": value, "ci_low": low, "ci_high": high, "n_undefined": metrics.count_undefined(distribution)}


def _accuracy(y, m, weight_mask=None):
    return metrics.accuracy(y, m, 0.0, weight_mask=weight_mask)


def _sensitivity(y, m, weight_mask=None):
    return metrics.sensitivity(y, m, 0.0, weight_mask=weight_mask)


def _specificity(y, m, weight_mask=None):
    return metrics.specificity(y, m, 0.0, weight_mask=weight_mask)


def _who_met(sensitivity: dict, specificity: dict, screening, bound: str) -> bool:
    return bool(sensitivity[bound] >= screening["sensitivity"] and specificity[bound] >= screening["specificity"])


def operating_points(y, prob, cols: dict, screening, n_boot: int, seed: int) -> dict:
    """Sensitivity / specificity at the thresholds chosen on training data, WHO targets, the test oracle."""
    out = {"targets": dict(screening)}
    groups = cols["patient"]
    for rule, margin in (("at_sensitivity_target", cols["margin_sens"]), ("at_specificity_target", cols["margin_spec"])):
        sens = _entry(_sensitivity, (y, margin), groups, n_boot, seed)
        spec = _entry(_specificity, (y, margin), groups, n_boot, seed)
        out[rule] = {"sensitivity": sens, "specificity": spec,
                     "who_met_point": _who_met(sens, spec, screening, "value"),
                     "who_met_lower_bound": _who_met(sens, spec, screening, "ci_low")}

    def spec_at_sens(y, p, weight_mask=None):
        return metrics.specificity_at_sensitivity(y, p, screening["sensitivity"], weight_mask=weight_mask)

    def sens_at_spec(y, p, weight_mask=None):
        return metrics.sensitivity_at_specificity(y, p, screening["specificity"], weight_mask=weight_mask)

    out["oracle"] = {"specificity_at_sensitivity_target": _entry(spec_at_sens, (y, prob), groups, n_boot, seed),
                     "sensitivity_at_specificity_target": _entry(sens_at_spec, (y, prob), groups, n_boot, seed)}
    return out


def calibration(y, prob, groups, n_bins: int, n_boot: int, seed: int) -> dict:
    def ece(y, p, weight_mask=None):
        return metrics.expected_calibration_error(y, p, n_bins, weight_mask=weight_mask)

    return {"brier": _entry(metrics.brier_score, (y, prob), groups, n_boot, seed),
            "ece": _entry(ece, (y, prob), groups, n_boot, seed),
            "reliability": metrics.reliability_curve(y, prob, n_bins)}


def cell_metrics(cols: dict, n_boot: int, seed: int, screening, calibration_bins: int = 10) -> dict:
    y, prob, margin, groups = cols["label"].astype(np.float64), cols["prob"], cols["margin"], cols["patient"]
    out = {
        "n_images": int(len(y)), "n_positive": int(y.sum()), "n_patients": int(len(np.unique(groups))),
        "auroc": _entry(metrics.roc_auc, (y, prob), groups, n_boot, seed),
        "accuracy": _entry(_accuracy, (y, margin), groups, n_boot, seed),
        "sensitivity": _entry(_sensitivity, (y, margin), groups, n_boot, seed),
        "specificity": _entry(_specificity, (y, margin), groups, n_boot, seed),
        "operating_points": operating_points(y, prob, cols, screening, n_boot, seed),
        "calibration": calibration(y, prob, groups, calibration_bins, n_boot, seed),
    }
    if "prob_platt" in cols:
        out["calibration_platt"] = calibration(y, cols["prob_platt"], groups, calibration_bins, n_boot, seed)
    fpr, tpr, _ = metrics.roc_curve(y, prob)
    low, high = metrics.roc_band(y, prob, groups=groups, fpr_grid=ROC_GRID, n_boot=n_boot, seed=seed)
    out["roc_curve"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    out["roc_band"] = {"fpr": ROC_GRID.tolist(), "tpr_low": low.tolist(), "tpr_high": high.tolist()}
    folds = sorted(set(cols["fold"].tolist()) - {-1})
    if folds:
        per_fold = [float(metrics.roc_auc(y[cols["fold"] == f], prob[cols["fold"] == f])) for f in folds]
        out["per_fold_auroc"] = dict(zip(map(str, folds), per_fold))
        out["per_fold_auroc_mean"] = float(np.mean(per_fold))
        out["per_fold_auroc_sd"] = float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else None
    return out


def age_sex_metrics(table: dict, groups, n_boot: int, seed: int) -> dict:
    """The MetaChexNet age and sex heads on a dataset vs its recorded ages and sexes (a TB set's clinical readings;
    unknown values masked out); CIs resample `groups` (patients)."""
    age_mask, sex_mask = table["age_mask"].astype(np.float64), table["sex_mask"].astype(np.float64)

    def masked(fn, mask):  # the known-value mask folded into the (bootstrap) weights
        return lambda a, b, weight_mask=None: fn(a, b, weight_mask=mask if weight_mask is None
                                                 else weight_mask * mask[:, None])

    out = {"n_age_known": int(age_mask.sum()), "n_sex_known": int(sex_mask.sum())}
    for name, fn, a, b, mask in (
            ("age_mae_years", metrics.mae, table["age"], table["age_pred"], age_mask),
            ("age_pearson_r", metrics.pearson_r, table["age"], table["age_pred"], age_mask),
            ("sex_auroc", metrics.roc_auc, table["sex_male"], table["sex_male_prob"], sex_mask),
            ("sex_accuracy", lambda y, s, weight_mask=None: metrics.accuracy(y, s, 0.5, weight_mask=weight_mask),
             table["sex_male"], table["sex_male_prob"], sex_mask)):
        f = masked(fn, mask)
        value = float(f(a, b))
        distribution = metrics.bootstrap_distribution(f, a, b, groups=groups, n_boot=n_boot, seed=seed)
        low, high = metrics.percentile_ci(distribution)
        out[name] = {"value": value, "ci_low": low, "ci_high": high,
                     "n_undefined": metrics.count_undefined(distribution)}
    return out


# ---------------------------------------------------------------------------------------------------------------
# comparison.md
# ---------------------------------------------------------------------------------------------------------------

def _ci_cell(entry: dict | None, digits: int = 3) -> str:
    if entry is None:
        return "-"
    f = reports.format_number
    return f"{f(entry['value'], digits)} [{f(entry['ci_low'], digits)}, {f(entry['ci_high'], digits)}]"


def _signed_ci(entry: dict) -> str:
    return f"{entry['value']:+.3f} [{entry['ci_low']:+.3f}, {entry['ci_high']:+.3f}]"


def _p_value(p: float | None) -> str:
    return "n/a" if p is None or np.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _auroc_table(result: dict) -> list[str]:
    protocols = result["protocols"]
    rows = []
    for key, cell_group in result["cells"].items():
        row = [key]
        for protocol in protocols:
            cell = cell_group.get(protocol)
            row.append(f"{_ci_cell(cell['auroc'])} (n={cell['n_images']})" if cell else "-")
        rows.append(row)
    lines = ["AUROC [95% bootstrap CI over patients] of the pooled out-of-fold test predictions; n = test images "
             "(fine-tuning may cover fewer CV folds: see finetune.max_folds).", ""]
    finetune = result.get("finetune")
    if finetune:
        lines += [f"Fine-tuned models predict with BatchNorm statistics recomputed for their weights (precise BN): "
                  f"on the fit images for validation and within a dataset; across datasets on the "
                  f"{'training set' if finetune['bn_stats'] == 'fit' else 'unlabelled test set (test-time adaptation)'}"
                  f" (finetune.bn_stats={finetune['bn_stats']}). Learning rates used: "
                  + ", ".join(f"{k} {v:g}" for k, v in finetune["effective_lr"].items())
                  + f" (finetune.optim.lr_scaling={finetune['lr_scaling']}).", ""]
    return lines + [reports.markdown_table(["start / method"] + protocols, rows)]


def _who_wins_tables(result: dict) -> list[str]:
    lines = ["## Who wins (paired)", "",
             "AUROC difference A - B on the test images both cells predicted, with a paired bootstrap 95% CI over "
             "patients (the same resampled patients for both); the paired test's p-value, raw and Holm-adjusted over "
             "the protocol's pairs: DeLong's test where every patient has one image, the clustered test (Obuchowski "
             "1997, patients as clusters) where any patient has several. A cell wins a pair when the Holm-adjusted p "
             f"is below {paired.WIN_ALPHA:g} AND the paired CI excludes 0 on its side; otherwise neither.", ""]
    for protocol, comparisons in result.get("paired", {}).items():
        rows = []
        for c in comparisons:
            if c["difference"] is None:
                rows.append([c["a"], c["b"], c["n_images"], c["n_patients"], "-", "-", "-", "-",
                             "undefined (one class)"])
                continue
            rows.append([c["a"], c["b"], c["n_images"], c["n_patients"], _signed_ci(c["difference"]),
                         paired.TEST_NAMES[c["test"]["method"]], _p_value(c["test"]["p_value"]),
                         _p_value(c["p_holm"]), c["wins"] or "neither"])
        lines += [f"### {protocol}", "",
                  reports.markdown_table(["A", "B", "images", "patients", "AUROC A - B [95% CI]", "test", "p",
                                          "Holm p", "wins"], rows)]
    return lines


def _operating_point_tables(result: dict) -> list[str]:
    targets = result["screening"]
    sens_t, spec_t = targets["sensitivity"], targets["specificity"]
    rule_names = {"at_sensitivity_target": f"sens >= {sens_t:g} on training", "at_specificity_target":
                  f"spec >= {spec_t:g} on training"}
    rows, oracle_rows, calibration_rows = [], [], []
    for key, cell_group in result["cells"].items():
        for protocol, cell in cell_group.items():
            points = cell["operating_points"]
            for rule, name in rule_names.items():
                p = points[rule]
                rows.append([key, protocol, name, _ci_cell(p["sensitivity"]), _ci_cell(p["specificity"]),
                             f"{_yes_no(p['who_met_point'])} / {_yes_no(p['who_met_lower_bound'])}"])
            oracle = points["oracle"]
            oracle_rows.append([key, protocol, _ci_cell(oracle["specificity_at_sensitivity_target"]),
                                _ci_cell(oracle["sensitivity_at_specificity_target"])])
            cal, platt = cell["calibration"], cell.get("calibration_platt")
            calibration_rows.append([key, protocol, _ci_cell(cal["brier"]), _ci_cell(cal["ece"]),
                                     _ci_cell(platt and platt["brier"]), _ci_cell(platt and platt["ece"])])
    return [
        "## Screening operating points", "",
        f"WHO's target product profile for a TB triage test: sensitivity >= {sens_t:g} with specificity >= "
        f"{spec_t:g}. Each split's threshold is chosen on its training data only (the probe's inner out-of-fold "
        "predictions, fine-tuning's validation part) and applied to its held-out images; 95% bootstrap CIs. "
        "'WHO met' is judged on the point estimates / on the CIs' lower bounds.", "",
        reports.markdown_table(["start / method", "protocol", "threshold rule", "sensitivity", "specificity",
                                "WHO met (point / lower bound)"], rows),
        "Test-set oracle (threshold chosen on the test images themselves: optimistic, not a deployable result):", "",
        reports.markdown_table(["start / method", "protocol", f"specificity at {sens_t:g} sensitivity",
                                f"sensitivity at {spec_t:g} specificity"], oracle_rows),
        "## Calibration", "",
        f"Brier score and expected calibration error ({result['calibration_bins']} equal-width bins) of the "
        "predicted probabilities, 95% bootstrap CIs (ECE is biased upwards on small samples, so its interval "
        "may sit above the point estimate); reliability diagrams in reliability_<protocol>.png. After Platt: "
        "each split's held-out probabilities through a Platt calibrator fitted on that split's training-side "
        "scores only (the same scores its thresholds come from), reliability_platt_<protocol>.png; the map is "
        "increasing, so the thresholded metrics above do not change.", "",
        reports.markdown_table(["start / method", "protocol", "Brier", "ECE", "Brier after Platt",
                                "ECE after Platt"], calibration_rows),
    ]


def _flag_lines(result: dict) -> list[str]:
    lines = []
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in result["notes"]] + [""]
    flagged = [(name, image_id, text) for name, d in result["datasets"].items()
               for image_id, text in d.get("flagged_readings", {}).items()]
    if flagged:
        lines += ["## Flagged readings", "",
                  "Normal images whose clinical reading names TB (kept with their label; from each build's skip "
                  "report):", "",
                  reports.markdown_table(["dataset", "image", "reading"],
                                         [[n, i, t.replace("\n", " / ")] for n, i, t in flagged])]
    return lines


def markdown(result: dict) -> str:
    targets = ", ".join(dict.fromkeys(result["protocol_targets"].values()))
    lines = [f"# Transfer comparison: {targets}", ""] + _auroc_table(result)
    if result.get("paired"):
        lines += _who_wins_tables(result)
    if result.get("groups"):
        lines += groups_lib.markdown_lines(result["groups"])
    if result.get("curves"):
        lines += curves_lib.markdown_lines(result["curves"])
    lines += _operating_point_tables(result)
    lines += ["## At Youden's threshold", "",
              "Accuracy / sensitivity / specificity at the threshold chosen on the training data (Youden's J):", ""]
    rows = []
    for key, cell_group in result["cells"].items():
        for protocol, cell in cell_group.items():
            rows.append([key, protocol] + [_ci_cell(cell[m]) for m in ("accuracy", "sensitivity", "specificity")])
    lines.append(reports.markdown_table(["start / method", "protocol", "accuracy", "sensitivity", "specificity"],
                                        rows))
    if result.get("age_sex"):
        lines += ["## Age and sex", "",
                  "MetaChexNet age and sex heads applied unchanged to the transfer datasets (vs their recorded "
                  "ages and sexes: the TB sets' clinical readings):", ""]
        rows = [[start, dataset, _ci_cell(e["age_mae_years"]), e["n_age_known"], _ci_cell(e["sex_auroc"]),
                 _ci_cell(e["sex_accuracy"]), e["n_sex_known"]]
                for start, per_set in result["age_sex"].items() for dataset, e in per_set.items()]
        lines.append(reports.markdown_table(["start", "dataset", "age MAE (years)", "n age", "sex AUROC",
                                             "sex accuracy", "n sex"], rows))
    lines += _flag_lines(result)
    lines += ["## Timings (this machine)", ""]
    lines.append(reports.markdown_table(["what", "value"], [[k, reports.format_number(v, 2)]
                                                           for k, v in result["timings"].items()]))
    return "\n".join(lines)


def write_report(out_dir: str, result: dict, predictions: dict[str, dict]) -> None:
    """Write every file of the module docstring; `predictions`: "start_method_protocol" -> columns."""
    files.makedirs(files.join(out_dir, "predictions"))  # out_dir: local or gs://
    for name, cols in predictions.items():
        reports.write_predictions_csv(files.join(out_dir, "predictions", f"{name}.csv"), cols)
    for protocol in result["protocols"]:
        cells = [(key, cell[protocol]) for key, cell in result["cells"].items() if protocol in cell]
        curves = [(f"{key} (AUROC {c['auroc']['value']:.3f})", c["roc_curve"]["fpr"], c["roc_curve"]["tpr"],
                   (c["roc_band"]["fpr"], c["roc_band"]["tpr_low"], c["roc_band"]["tpr_high"])) for key, c in cells]
        target = result["protocol_targets"][protocol]
        write_roc_png(files.join(out_dir, f"roc_{protocol}.png"), f"{target}, {protocol}", curves)
        for name, entry, title in (("reliability", "calibration", "Calibration"),
                                   ("reliability_platt", "calibration_platt", "After Platt scaling")):
            panels = [{"label": key, "reliability": c[entry]["reliability"], "brier": c[entry]["brier"]["value"],
                       "ece": c[entry]["ece"]["value"]} for key, c in cells if entry in c]
            if panels:
                write_reliability_png(files.join(out_dir, f"{name}_{protocol}.png"), f"{title}, {protocol}",
                                      panels)
    reports.write_json(files.join(out_dir, "comparison.json"), result)
    reports.write_text(files.join(out_dir, "comparison.md"), markdown(result))
