"""Label-efficiency curves: how the transfer result grows with the number of labelled training images.

    plan = plan_draws(splits, views, protocol_targets, sizes=parse_sizes("10,20,50,all"), draws=3, seed=0)
    curves = probe_curves(plan, starts, tables, views, settings, full_columns)   # (+ finetune_curves)
    summary = summarise(curves, plan, n_boot, seed, target_auroc, replicates)
    write_curves(out_dir, summary, curves, plan)                                 # files, figures

Sizes (`config.train_sizes`: numbers of training images, and "all") and draws (`config.train_draws`). For every
protocol column, size and draw, each split of the protocol (every CV fold; the one split of a cross-dataset
protocol) gets a subset of ITS training images (`draw_subset`): stratified by the target, whole patients, seeded by
(config.seed, protocol, size, draw, fold) and recorded (`draws.json`). Stratified: each class gets its share of the
size, rounded, but at least MIN_PER_CLASS = 5 images (the probe's inner 5-fold search and its out-of-fold
thresholds need them): a size below 10, or a class with fewer than 5 training images, is skipped with a note. A
size at least as large as a split's training set is clipped to all of it; a size clipped for every split is "all"
(noted). "all" is the full run itself: its cells' predictions are reused (one draw: the whole training set).

Each (start, method, size, draw) is fitted on the drawn images and predicts the SAME held-out images as the full
run (all of them for the probe; the fine-tuned folds for fine-tuning), so the points of a curve differ only in what
was trained on. The probe reuses the cached features (features.py); fine-tuning (`config.train_sizes_finetune`)
takes its validation part out of the draw (a stratified fifth of its patients) and skips sizes whose fit part is
smaller than one batch (noted).

A point (protocol, start/method, size): the AUROC of each draw's pooled held-out predictions; their mean, the band
across draws (min .. max), and a 95% bootstrap CI of the mean over patients (each resample scores every draw on the
same resampled patients). Two starts at one size are compared by the mean AUROC over draws: the paired bootstrap
CI of the difference and the paired test on the mean placement values (DeLong, or the clustered test where a
patient has several images: metrics.delong_placements), Holm-adjusted over every comparison of the protocol's
curve (pairs x sizes) and judged by the win rule (paired.winner). With several runs per start (groups.py) the
comparisons are made per replicate, each its own family. Per protocol the report states the smallest size whose
mean AUROC reaches `config.curve_target_auroc` (per start/method) and the smallest size from which no larger size
has a win between two starts.

Files (under WORKDIR/report/curves/): `curve_<protocol>.png` (AUROC against training images, log scale),
`<start>_<method>_<protocol>.csv` (one row per size, draw and held-out image: every plotted point is the mean over
draws of the AUROC of its rows), `draws.json` (each draw's training images per split). The numbers are in
comparison.json's `curves`; the tables in comparison.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib

import numpy as np
from absl import logging

from metachex_jax.core import files
from metachex_jax.evaluation import metrics, reports
from metachex_jax.transfer import paired as paired_lib
from metachex_jax.transfer import sets as sets_lib
from metachex_jax.transfer.plot import write_curve_png
from metachex_jax.transfer.probe import ProbeSettings, fit_probe, stratified_group_folds

ALL = "all"
MIN_PER_CLASS = 5
VALIDATION_PARTS = 5  # fine-tuning's validation part: one of this many stratified parts of the draw's patients


def parse_sizes(text: str) -> list[int | str]:
    """"10,20,50,all" -> [10, 20, 50, "all"] (numbers ascending, "all" last); "" -> [] (no curves)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    numbers = sorted({int(t) for t in items if t != ALL})
    return numbers + ([ALL] if ALL in items else [])


@dataclasses.dataclass(frozen=True)
class Draw:
    """One draw of one size for one protocol: the training rows of every split (indices into its train set)."""

    rows: tuple[np.ndarray, ...]  # per split of the protocol, in order

    @property
    def n_train(self) -> float:
        return float(np.mean([len(r) for r in self.rows]))


@dataclasses.dataclass
class ProtocolPlan:
    sizes: list[int | str]  # the sizes drawn (after skipping), "all" included when asked
    draws: dict  # size -> [Draw]
    notes: list[str]


def _class_targets(size: int, y: np.ndarray) -> tuple[int, int] | None:
    """(negatives, positives) to draw: the classes' shares of `size`, each >= MIN_PER_CLASS; None if impossible."""
    available = np.bincount(y, minlength=2)
    positive = int(round(size * available[1] / len(y)))
    positive = min(max(positive, MIN_PER_CLASS), size - MIN_PER_CLASS)
    negative = size - positive
    if available.min() < MIN_PER_CLASS or size < 2 * MIN_PER_CLASS:
        return None
    if positive > available[1]:  # a scarce class gives all it has, the other fills the size
        positive, negative = int(available[1]), size - int(available[1])
    if negative > available[0]:
        negative, positive = int(available[0]), size - int(available[0])
    return negative, positive


def draw_subset(y: np.ndarray, patient: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray | None:
    """Row indices of a stratified subset of about `size` images made of whole patients (module docstring), sorted;
    None when the size cannot leave MIN_PER_CLASS images of each class."""
    targets = _class_targets(size, y)
    if targets is None:
        return None
    keys, group = np.unique(patient, return_inverse=True)
    group = group.reshape(-1)
    label = np.zeros(len(keys), np.int64)
    np.maximum.at(label, group, y)
    chosen = []
    for value, target in ((0, targets[0]), (1, targets[1])):
        members = np.flatnonzero(label == value)
        taken = 0
        for g in members[rng.permutation(len(members))]:
            if taken >= target:
                break
            rows = np.flatnonzero(group == g)
            chosen.append(rows)
            taken += int((y[rows] == value).sum())
    rows = np.sort(np.concatenate(chosen))
    counts = np.bincount(y[rows], minlength=2)
    return rows if counts.min() >= MIN_PER_CLASS else None


def _seed(seed: int, protocol: str, size: int, draw: int, fold: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(protocol.encode()), size, draw, fold + 1])


def plan_draws(splits: dict, views: dict, protocol_targets: dict, *, sizes: list, draws: int,
               seed: int) -> dict[str, ProtocolPlan]:
    """Per protocol column: the sizes that can be drawn and every draw's training rows (module docstring)."""
    plans = {}
    for protocol, protocol_splits in splits.items():
        sets = views[protocol_targets[protocol]]
        plan = ProtocolPlan([], {}, [])
        for size in sizes:
            if size == ALL:
                plan.sizes.append(ALL)
                plan.draws[ALL] = [Draw(tuple(s.train for s in protocol_splits))]
                continue
            if all(size >= len(s.train) for s in protocol_splits):
                plan.notes.append(f"{protocol}: size {size} is at least every split's training set "
                                  f"(at most {max(len(s.train) for s in protocol_splits)} images): clipped to all")
                continue
            made, failed = [], []
            for d in range(draws):
                rows = []
                for split in protocol_splits:
                    train_set = sets[split.train_set]
                    if size >= len(split.train):
                        rows.append(split.train)
                        continue
                    picked = draw_subset(train_set.y[split.train], train_set.patient[split.train], size,
                                         _seed(seed, protocol, size, d, split.fold))
                    if picked is None:
                        failed.append(split.fold)
                        break
                    rows.append(split.train[picked])
                if failed:
                    break
                made.append(Draw(tuple(rows)))
            if failed:
                plan.notes.append(f"{protocol}: size {size} skipped: it cannot leave {MIN_PER_CLASS} training images "
                                  f"of each class (the probe's inner folds and thresholds need them)")
                continue
            plan.sizes.append(size)
            plan.draws[size] = made
        plans[protocol] = plan
    return plans


def _pooled(split_probs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(split_probs).astype(np.float64)


def probe_curves(plans: dict[str, ProtocolPlan], starts, tables: dict, views: dict, protocol_targets: dict,
                 splits: dict, settings: ProbeSettings, full_columns: dict) -> dict:
    """{protocol: {"start/probe": {size: (D, N) pooled held-out probabilities}}}; "all" from the full run's cell
    (`full_columns[protocol][key]`, the same fit)."""
    out: dict = {}
    for protocol, plan in plans.items():
        sets = views[protocol_targets[protocol]]
        first = splits[protocol][0]
        for start in starts:
            key = f"{start.name}/probe"
            per_dataset = {name: tables[start.name, name] for name, _ in sets[first.train_set].parts}
            per_dataset |= {name: tables[start.name, name] for name, _ in sets[first.test_set].parts}
            train_features = sets_lib.features_of(per_dataset, sets[first.train_set])
            test_features = sets_lib.features_of(per_dataset, sets[first.test_set])
            y_train, patients = sets[first.train_set].y, sets[first.train_set].patient
            points = {}
            for size in plan.sizes:
                if size == ALL:
                    points[ALL] = full_columns[protocol][key]["prob"][None, :]
                    continue
                probs = []
                for draw in plan.draws[size]:
                    probs.append(_pooled([
                        fit_probe(train_features[rows], y_train[rows], test_features[split.test], settings,
                                  groups=patients[rows]).test_prob
                        for split, rows in zip(splits[protocol], draw.rows)]))
                points[size] = np.stack(probs)
            out.setdefault(protocol, {})[key] = points
            logging.info("label-efficiency curve: probe %s %s at sizes %s", start.name, protocol, plan.sizes)
    return out


def validation_part(y: np.ndarray, patient: np.ndarray, seed: int) -> np.ndarray:
    """Positions (into the draw) of fine-tuning's validation part: one stratified fifth of the draw's patients."""
    return np.flatnonzero(stratified_group_folds(y, patient, VALIDATION_PARTS, seed) == 0)


def finetune_curves(plans: dict[str, ProtocolPlan], starts, tuner, views: dict, protocol_targets: dict,
                    splits: dict, full_columns: dict, seed: int) -> tuple[dict, list[str]]:
    """Fine-tuning's points, as `probe_curves` (fine-tuned folds only: finetune.max_folds), and notes."""
    out, notes = {}, []
    max_folds = tuner.settings.max_folds
    for protocol, plan in plans.items():
        sets = views[protocol_targets[protocol]]
        chosen = splits[protocol][:max_folds] if max_folds else splits[protocol]
        for start in starts:
            if start.kind == "random_bn":  # fine-tunes to random's predictions (finetune.py)
                continue
            key = f"{start.name}/finetune"
            points = {}
            for size in plan.sizes:
                if size == ALL:
                    points[ALL] = full_columns[protocol][key]["prob"][None, :]
                    continue
                probs = []
                for d, draw in enumerate(plan.draws[size]):
                    split_probs = []
                    for split, rows in zip(chosen, draw.rows):
                        train_set = sets[split.train_set]
                        val = rows[validation_part(train_set.y[rows], train_set.patient[rows], seed + d)]
                        if len(rows) - len(val) < tuner.global_batch:
                            break
                        drawn = dataclasses.replace(split, train=rows, validation=val)
                        split_probs.append(tuner.run(start, drawn, sets).test_prob)
                    if len(split_probs) < len(chosen):
                        break
                    probs.append(_pooled(split_probs))
                if len(probs) < len(plan.draws[size]):
                    note = (f"{protocol}: fine-tuning curve size {size} skipped: its fit part (the draw less its "
                            f"validation fifth) is smaller than one batch (finetune.batch_size={tuner.global_batch})")
                    notes += [] if note in notes else [note]
                    continue
                points[size] = np.stack(probs)
            out.setdefault(protocol, {})[key] = points
    return out, notes


def mean_auroc(y, scores, weight_mask=None):
    """The mean over the rows of `scores` (D, N) of their AUROCs (per bootstrap column with a weight matrix)."""
    return np.mean([metrics.roc_auc(y, s, weight_mask=weight_mask) for s in scores], axis=0)


def _point(size, n_train: float, y, scores, patient, n_boot: int, seed: int) -> dict:
    per_draw = [float(metrics.roc_auc(y, s)) for s in scores]
    distribution = metrics.bootstrap_distribution(mean_auroc, y, scores, groups=patient, n_boot=n_boot, seed=seed)
    low, high = metrics.percentile_ci(distribution)
    return {"size": size, "n_train": n_train, "draws": len(per_draw), "auroc_draws": per_draw,
            "mean": float(np.mean(per_draw)), "min": float(np.min(per_draw)), "max": float(np.max(per_draw)),
            "ci_low": low, "ci_high": high}


def _compare(y, a, b, patient, n_boot: int, seed: int) -> dict:
    difference = metrics.paired_bootstrap_difference(mean_auroc, y, a, b, groups=patient, n_boot=n_boot, seed=seed)
    return {"difference": difference, "test": paired_lib.paired_test(y, a, b, patient)}


def summarise(curves: dict, plans: dict[str, ProtocolPlan], columns_of: dict, *, n_boot: int, seed: int,
              target_auroc: float, replicates: list[list[str]], notes: list[str]) -> dict:
    """Every point, the comparisons of starts per size, and the two summary sizes (module docstring).
    `columns_of[protocol]`: a full cell's columns (labels, patients, ids of the held-out images, in order) per
    method; `replicates`: the start names of each replicate."""
    out = {"target_auroc": target_auroc, "min_per_class": MIN_PER_CLASS, "notes": list(notes), "protocols": {}}
    for protocol, per_key in curves.items():
        plan = plans[protocol]
        out["notes"] += plan.notes
        points: dict[str, list[dict]] = {}
        for key, by_size in per_key.items():
            cols = columns_of[protocol][key.split("/")[1]]
            y, patient = cols["label"].astype(np.float64), cols["patient"]
            points[key] = [_point(size, plan.draws[size][0].n_train if size == ALL else
                                  float(np.mean([d.n_train for d in plan.draws[size]])), y, scores, patient, n_boot,
                                  seed) for size, scores in by_size.items()]
        comparisons = []
        for r, names in enumerate(replicates):
            family = []
            for method in ("probe", "finetune"):
                keys = [f"{n}/{method}" for n in names if f"{n}/{method}" in per_key]
                cols = columns_of[protocol].get(method)
                for key_a, key_b in itertools.combinations(keys, 2):
                    for size in per_key[key_a]:
                        if size not in per_key[key_b]:
                            continue
                        y = cols["label"].astype(np.float64)
                        family.append({"size": size, "a": key_a, "b": key_b, "replicate": r,
                                       **_compare(y, per_key[key_a][size], per_key[key_b][size], cols["patient"],
                                                  n_boot, seed)})
            for c, p in zip(family, metrics.holm_adjust([c["test"]["p_value"] for c in family])):
                c["p_holm"] = None if np.isnan(p) else float(p)
                side = paired_lib.winner(c["difference"], c["test"], c["p_holm"])
                c["wins"] = {"a": c["a"], "b": c["b"], None: None}[side]
            comparisons += family
        sizes = plan.sizes
        reaches = {key: next((p["size"] for p in pts if p["mean"] >= target_auroc), None)
                   for key, pts in points.items()}
        no_win_from = []
        for r in range(len(replicates)):
            won = [s for s in sizes if any(c["wins"] and c["size"] == s and c["replicate"] == r for c in comparisons)]
            last = max((sizes.index(s) for s in won), default=-1)
            no_win_from.append(sizes[last + 1] if last + 1 < len(sizes) else None)
        out["protocols"][protocol] = {"sizes": sizes, "points": points, "paired": comparisons,
                                      "reaches_target": reaches, "no_win_from": no_win_from}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Files and tables
# ---------------------------------------------------------------------------------------------------------------

def _size_label(size) -> str:
    return str(size)


def write_curves(out_dir: str, summary: dict, curves: dict, plans: dict[str, ProtocolPlan], columns_of: dict,
                 splits: dict, views: dict, protocol_targets: dict) -> None:
    """Every file of the module docstring under `out_dir` (local or gs://)."""
    files.makedirs(out_dir)
    for protocol, per_key in curves.items():
        for key, by_size in per_key.items():
            cols = columns_of[protocol][key.split("/")[1]]
            rows: dict[str, list] = {k: [] for k in ("size", "n_train", "draw", "image_id", "dataset", "patient",
                                                     "fold", "label", "prob")}
            for size, scores in by_size.items():
                for d, prob in enumerate(scores):
                    n = len(prob)
                    rows["size"] += [_size_label(size)] * n
                    draw = plans[protocol].draws[size][d]
                    rows["n_train"].append(np.full(n, draw.n_train))
                    rows["draw"].append(np.full(n, d, np.int64))
                    rows["image_id"] += list(cols["image_id"])
                    rows["dataset"] += list(cols["dataset"])
                    for c in ("patient", "fold", "label"):
                        rows[c].append(cols[c])
                    rows["prob"].append(prob)
            table = {k: np.asarray(v) if k in ("size", "image_id", "dataset") else np.concatenate(v)
                     for k, v in rows.items()}
            start, method = key.split("/")
            reports.write_predictions_csv(files.join(out_dir, f"{start}_{method}_{protocol}.csv"), table)
        series = []
        for key, points in summary["protocols"][protocol]["points"].items():
            series.append((key, [p["n_train"] for p in points], [p["mean"] for p in points],
                           [p["min"] for p in points], [p["max"] for p in points], [p["ci_low"] for p in points],
                           [p["ci_high"] for p in points]))
        target = protocol_targets[protocol]
        write_curve_png(files.join(out_dir, f"curve_{protocol}.png"), f"{target}, {protocol}", series,
                        summary["target_auroc"])
    draws = {}
    for protocol, plan in plans.items():
        sets = views[protocol_targets[protocol]]
        draws[protocol] = {
            _size_label(size): [{str(split.fold): [sets[split.train_set].image_id[i] for i in rows]
                                 for split, rows in zip(splits[protocol], draw.rows)}
                                for draw in plan.draws[size]]
            for size in plan.sizes if size != ALL}
    reports.write_json(files.join(out_dir, "draws.json"), draws)


def markdown_lines(summary: dict) -> list[str]:
    """The label-efficiency section of comparison.md."""
    f = reports.format_number
    lines = ["## Label efficiency", "",
             f"AUROC on the full run's held-out images of models trained on draws of each size (stratified, whole "
             f"patients, at least {summary['min_per_class']} images of each class): mean over the draws [95% "
             "bootstrap CI of that mean over patients] (min .. max across draws); 'all' is the full run. Figures: "
             "curves/curve_<protocol>.png; per-image predictions: curves/*.csv.", ""]
    for protocol, entry in summary["protocols"].items():
        sizes = entry["sizes"]
        rows = []
        for key, points in entry["points"].items():
            by_size = {p["size"]: p for p in points}
            rows.append([key] + [
                f"{f(by_size[s]['mean'], 3)} [{f(by_size[s]['ci_low'], 3)}, {f(by_size[s]['ci_high'], 3)}]"
                + (f" ({f(by_size[s]['min'], 3)} .. {f(by_size[s]['max'], 3)})" if by_size[s]["draws"] > 1 else "")
                if s in by_size else "-" for s in sizes])
        n_train = {p["size"]: p["n_train"] for pts in entry["points"].values() for p in pts}
        header = ["start / method"] + [f"{s} ({f(n_train[s], 0)} images)" if s == ALL else str(s) for s in sizes]
        lines += [f"### {protocol}", "", reports.markdown_table(header, rows)]
        reach = ", ".join(f"{k} {v if v is not None else 'never'}" for k, v in entry["reaches_target"].items())
        lines += [f"Smallest size whose mean AUROC reaches {summary['target_auroc']:g}: {reach}.", ""]
        replicated = len(entry["no_win_from"]) > 1
        for r, size in enumerate(entry["no_win_from"]):
            where = f" (replicate {r})" if replicated else ""
            lines.append(f"Smallest size from which no larger size has a win between two starts{where}: "
                         f"{size if size is not None else 'none (the largest size has a win)'}.")
        rows = [[c["size"], c["a"], c["b"]] + ([c["replicate"]] if replicated else [])
                + (["-", "-", "-", "undefined"] if c["difference"] is None else
                   [f"{c['difference']['value']:+.3f} [{c['difference']['ci_low']:+.3f}, "
                    f"{c['difference']['ci_high']:+.3f}]", f(c["test"]["p_value"], 3),
                    f(c["p_holm"], 3) if c["p_holm"] is not None else "n/a", c["wins"] or "neither"])
                for c in entry["paired"]]
        if rows:
            lines += ["", "Paired, per size (mean AUROC over draws; Holm over every comparison of this curve):", "",
                      reports.markdown_table(["size", "A", "B"] + (["replicate"] if replicated else [])
                                             + ["A - B [95% CI]", "p", "Holm p", "wins"], rows)]
        lines.append("")
    if summary["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in summary["notes"]] + [""]
    return lines
