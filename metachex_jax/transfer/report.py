"""The comparison report: metrics of every (start, method, protocol) cell and the files they are written to.

A cell's per-image predictions (`cell_columns`) are its out-of-fold test predictions: every test image once,
with the threshold of the split that predicted it. Thresholded metrics use `margin = prob - threshold`
("positive when margin >= 0"), so they are recomputable from the CSV alone. Metrics (`cell_metrics`):
AUROC, accuracy, sensitivity, specificity, each with a 95% bootstrap CI over images (each TB image is its
own patient), the ROC curve, and for CV the per-fold AUROCs.

Files (`write_report`, into WORKDIR/report/, each written atomically):
    comparison.json                  every number (cells, age/sex evaluation, timings, provenance)
    comparison.md                    AUROC [95% CI] per start x method (rows) and protocol (columns), then
                                     the age/sex table and the timings
    roc_<protocol>.png               the ROC curves of every start x method on that protocol
    predictions/<start>_<method>_<protocol>.csv   per-image predictions (reports.write_predictions_csv)
"""

from __future__ import annotations

import numpy as np

from metachex_jax import files, metrics, reports
from metachex_jax.transfer.plot import write_roc_png


def cell_columns(split_results: list[tuple], tb_sets: dict) -> dict[str, np.ndarray]:
    """Per-image columns from [(split, test_prob, threshold), ...] of one cell."""
    cols = {k: [] for k in ("image_id", "dataset", "index", "fold", "tb", "prob", "threshold")}
    for split, prob, threshold in split_results:
        test_set = tb_sets[split.test_set]
        cols["image_id"] += [test_set.image_id[i] for i in split.test]
        cols["dataset"] += [split.test_set] * len(split.test)
        cols["index"].append(split.test)
        cols["fold"].append(np.full(len(split.test), split.fold, np.int64))
        cols["tb"].append(test_set.tb[split.test])
        cols["prob"].append(np.asarray(prob, np.float64))
        cols["threshold"].append(np.full(len(split.test), threshold, np.float64))
    out = {k: np.asarray(v) if k in ("image_id", "dataset") else np.concatenate(v) for k, v in cols.items()}
    out["margin"] = out["prob"] - out["threshold"]
    return out


def _entry(fn, arrays, n_boot: int, seed: int) -> dict:
    value = float(fn(*arrays))
    groups = np.arange(len(arrays[0]))
    distribution = metrics.bootstrap_distribution(fn, *arrays, groups=groups, n_boot=n_boot, seed=seed)
    low, high = metrics.percentile_ci(distribution)
    return {"value": value, "ci_low": low, "ci_high": high, "n_undefined": metrics.count_undefined(distribution)}


def _accuracy(y, m, weight_mask=None):
    return metrics.accuracy(y, m, 0.0, weight_mask=weight_mask)


def _sensitivity(y, m, weight_mask=None):
    return metrics.sensitivity(y, m, 0.0, weight_mask=weight_mask)


def _specificity(y, m, weight_mask=None):
    return metrics.specificity(y, m, 0.0, weight_mask=weight_mask)


def cell_metrics(cols: dict, n_boot: int, seed: int) -> dict:
    y, prob, margin = cols["tb"].astype(np.float64), cols["prob"], cols["margin"]
    out = {
        "n_images": int(len(y)), "n_tb": int(y.sum()),
        "auroc": _entry(metrics.roc_auc, (y, prob), n_boot, seed),
        "accuracy": _entry(_accuracy, (y, margin), n_boot, seed),
        "sensitivity": _entry(_sensitivity, (y, margin), n_boot, seed),
        "specificity": _entry(_specificity, (y, margin), n_boot, seed),
    }
    fpr, tpr, _ = metrics.roc_curve(y, prob)
    out["roc_curve"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    folds = sorted(set(cols["fold"].tolist()) - {-1})
    if folds:
        per_fold = [float(metrics.roc_auc(y[cols["fold"] == f], prob[cols["fold"] == f])) for f in folds]
        out["per_fold_auroc"] = dict(zip(map(str, folds), per_fold))
        out["per_fold_auroc_mean"] = float(np.mean(per_fold))
        out["per_fold_auroc_sd"] = float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else None
    return out


def age_sex_metrics(table: dict, n_boot: int, seed: int) -> dict:
    """The MetaChexNet age and sex heads on a TB set vs its clinical readings (unknown values masked out)."""
    groups = np.arange(len(table["tb"]))
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


def _ci_cell(entry: dict) -> str:
    f = reports.format_number
    return f"{f(entry['value'], 3)} [{f(entry['ci_low'], 3)}, {f(entry['ci_high'], 3)}]"


def markdown(result: dict) -> str:
    protocols = result["protocols"]
    lines = ["# TB transfer comparison", "",
             "AUROC [95% bootstrap CI over images] of the pooled out-of-fold test predictions; n = test images "
             "(fine-tuning may cover fewer CV folds: see finetune.max_folds).", ""]
    rows = []
    for key, cell_group in result["cells"].items():
        row = [key]
        for protocol in protocols:
            cell = cell_group.get(protocol)
            row.append(f"{_ci_cell(cell['auroc'])} (n={cell['n_images']})" if cell else "-")
        rows.append(row)
    lines.append(reports.markdown_table(["start / method"] + protocols, rows))
    if result.get("notes"):
        lines += [f"Note: {note}" for note in result["notes"]] + [""]
    lines += ["Accuracy / sensitivity / specificity at the threshold chosen on the training data (Youden):", ""]
    rows = []
    for key, cell_group in result["cells"].items():
        for protocol, cell in cell_group.items():
            rows.append([key, protocol] + [_ci_cell(cell[m]) for m in ("accuracy", "sensitivity", "specificity")])
    lines.append(reports.markdown_table(["start / method", "protocol", "accuracy", "sensitivity", "specificity"],
                                        rows))
    if result.get("age_sex"):
        lines += ["MetaChexNet age and sex heads applied unchanged to the TB sets (vs the clinical readings):", ""]
        rows = [[start, dataset, _ci_cell(e["age_mae_years"]), e["n_age_known"], _ci_cell(e["sex_auroc"]),
                 _ci_cell(e["sex_accuracy"]), e["n_sex_known"]]
                for start, per_set in result["age_sex"].items() for dataset, e in per_set.items()]
        lines.append(reports.markdown_table(["start", "dataset", "age MAE (years)", "n age", "sex AUROC",
                                             "sex accuracy", "n sex"], rows))
    t = result["timings"]
    lines += ["Timings (this machine):", ""]
    lines.append(reports.markdown_table(["what", "value"], [[k, reports.format_number(v, 2)] for k, v in t.items()]))
    return "\n".join(lines)


def write_report(out_dir: str, result: dict, predictions: dict[str, dict]) -> None:
    """Write every file of the module docstring; `predictions`: "start_method_protocol" -> columns."""
    files.makedirs(files.join(out_dir, "predictions"))  # out_dir: local or gs://
    for name, cols in predictions.items():
        reports.write_predictions_csv(files.join(out_dir, "predictions", f"{name}.csv"), cols)
    for protocol in result["protocols"]:
        curves = [(f"{key} (AUROC {cell[protocol]['auroc']['value']:.3f})", np.asarray(cell[protocol]["roc_curve"]["fpr"]),
                   np.asarray(cell[protocol]["roc_curve"]["tpr"]))
                  for key, cell in result["cells"].items() if protocol in cell]
        write_roc_png(files.join(out_dir, f"roc_{protocol}.png"), f"TB detection, {protocol}", curves)
    reports.write_json(files.join(out_dir, "comparison.json"), result)
    reports.write_text(files.join(out_dir, "comparison.md"), markdown(result))
