"""A pretraining run scored on NIH ChestX-ray14's expert labels (Majkowska et al., Radiology 2019), next to the
same images' original (text-mined) NIH labels:

    python -m metachex_jax.evaluate --run=WORKDIR --labels=nih_expert --labels_csv=FILE [--labels_csv=FILE2]

1. The label files (data/raw/nih_expert.py: the merged file with `Set Id`, or the test and validation files).
2. The run's model (best checkpoint unless --step) and its config: which ChestX-ray14 build it read (data_dir,
   resolution, validation carve-out), and whether ChestX-ray14 was in its training data at all.
3. Contamination: every expert-labelled image is looked up in the prepared ChestX-ray14 build. Images in the
   run's TRAINING or VALIDATION split are counted, listed and excluded, so the score is never contaminated (most of
   the expert validation set lies in NIH's train_val list); images missing from the build are counted too. The
   rest (the build's test split) are scored.
4. Which findings a model can be scored on (EXPERT_RULES): Pneumothorax = its Pneumothorax output; Nodule or mass
   = max(Nodule, Mass); Airspace opacity = its `Lung Opacity` output when it has one (a model pretrained with
   CheXpert's extra label), else max(Consolidation, Infiltration, Pneumonia); Fracture only for a model with a
   Fracture output. The original NIH labels of the same images are combined the same way (any of the labels);
   NIH has no fracture label.
5. AUROC against the expert labels and against the original labels, each with a 95% percentile CI from one
   bootstrap over PATIENTS (metrics.py; the same resamples for every number, so they are paired).
6. WORKDIR/eval/nih_expert_step{N}.json (every number, counts, excluded images), .md, and _predictions.csv (one
   row per scored image: score, expert and original labels per finding), from which every AUROC recomputes.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence

import ml_collections
import numpy as np
from tqdm import tqdm

from metachex_jax.core import files
from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.data.input import datasets, mixture
from metachex_jax.data.input.spec import DataSpec
from metachex_jax.data.raw import nih_expert
from metachex_jax.evaluation import metrics, reports
from metachex_jax.models import runs
from metachex_jax.serving.predictor import Predictor

# finding -> (model outputs whose maximum scores it, in order of preference: the first rule the model has all
# outputs of wins; the NIH labels whose union is the original label, or () when NIH has none)
EXPERT_RULES = {
    "Fracture": ([("Fracture",)], ()),
    "Pneumothorax": ([("Pneumothorax",)], ("Pneumothorax",)),
    "Airspace opacity": ([("Lung Opacity",), ("Consolidation", "Infiltration", "Pneumonia")],
                         ("Consolidation", "Infiltration", "Pneumonia")),
    "Nodule or mass": ([("Nodule", "Mass")], ("Nodule", "Mass")),
}


def scoring_rules(output_names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """finding -> the model outputs scoring it (their maximum), for the findings this model can be scored on."""
    rules = {}
    for finding, (choices, _) in EXPERT_RULES.items():
        for outputs in choices:
            if all(name in output_names for name in outputs):
                rules[finding] = outputs
                break
    return rules


def _read_names(source) -> list[str]:
    names = []
    for i in tqdm(range(len(source)), desc="reading image names", unit="img", mininterval=2.0):
        name = source[i]["image_name"]
        names.append(name.decode() if isinstance(name, bytes) else str(name))
    return names


def locate(expert: dict, splits: dict, trained_on_nih: bool) -> tuple[dict, dict]:
    """(name -> (split, record index) of the expert images to score, the accounting of the others)."""
    where = {}
    for split, source in splits.items():
        for i, name in enumerate(_read_names(source)):
            if name in expert:
                where[name] = (split, i)
    used = ("train", "validation") if trained_on_nih else ()
    excluded = {split: sorted(n for n, (s, _) in where.items() if s == split) for split in used}
    missing = sorted(set(expert) - set(where))
    scored = {n: w for n, w in where.items() if w[0] not in used}
    accounting = {
        "expert_images": len(expert),
        "found_in_build": len(where),
        "missing_from_build": {"count": len(missing), "images": missing},
        "excluded_in_run_training_or_validation": {split: {"count": len(names), "by_set": dict(Counter(
            expert[n].set_id for n in names)), "images": names} for split, names in excluded.items()},
        "scored": {"count": len(scored), "by_set": dict(Counter(expert[n].set_id for n in scored)),
                   "splits": dict(Counter(s for s, _ in scored.values()))},
    }
    return scored, accounting


def score_images(predictor, splits: dict, scored: dict, batch_size: int = 64) -> tuple[list[str], dict, dict]:
    """Run the model on the scored images' stored records -> (names, outputs {name: (N,)}, NIH labels (N, 14))."""
    names = sorted(scored)
    outputs: dict[str, list] = {}
    nih_labels = []
    for start in range(0, len(names), batch_size):
        chunk = names[start:start + batch_size]
        records = [splits[scored[n][0]][scored[n][1]] for n in chunk]
        crops = np.stack([predictor.contract.from_stored(r["image"]) for r in records])
        for key, values in predictor(crops).items():
            outputs.setdefault(key, []).append(values)
        nih_labels += [np.asarray(r["labels"], np.int64) for r in records]
    return names, {k: np.concatenate(v) for k, v in outputs.items()}, np.array(nih_labels).reshape(-1, 14)


def evaluate_run(run: str, label_files: Sequence[str], *, step: str = "best", data_dir: str | None = None,
                 n_boot: int = 1000, seed: int = 0, batch_size: int = 64) -> dict:
    """Score `run` on the expert labels (module docstring); writes WORKDIR/eval/nih_expert_step{N}.* and returns
    the result."""
    expert = nih_expert.read_expert_labels(label_files)
    config = ml_collections.ConfigDict(runs.saved_config(run))
    if data_dir:
        config.data.data_dir = data_dir
    predictor = Predictor.load(run, step=step, batch_size=batch_size)
    rules = scoring_rules(predictor.output_names)
    if not rules:
        raise ValueError(f"the model of {run} has none of the outputs the expert findings are scored from "
                         f"({EXPERT_RULES}); its outputs: {predictor.output_names}")
    trained_on_nih = "chestxray14" in mixture.parse_mixture(config.data.get("datasets", "chestxray14"))
    splits = datasets.chestxray14_splits(DataSpec.from_config(config))
    scored, accounting = locate(expert, splits, trained_on_nih)
    if not scored:
        raise ValueError(f"none of the {len(expert)} expert-labelled images is left to score: {accounting}")
    names, outputs, nih_labels = score_images(predictor, splits, scored, batch_size)

    columns = {"image_name": np.array(names), "patient_id": np.array([expert[n].patient_id for n in names]),
               "set_id": np.array([expert[n].set_id for n in names])}
    columns["split"] = np.array([scored[n][0] for n in names])
    targets = []  # (finding, label source, y)
    for finding, outputs_used in rules.items():
        j = nih_expert.FINDINGS.index(finding)
        score = np.max(np.stack([outputs[o] for o in outputs_used]), axis=0)
        columns[f"score[{finding}]"] = score
        y_expert = np.array([expert[n].labels[j] for n in names], np.int64)
        columns[f"expert[{finding}]"] = y_expert
        targets.append((finding, "expert", y_expert))
        nih_names = EXPERT_RULES[finding][1]
        if nih_names:
            y_nih = np.max(nih_labels[:, [PATHOLOGIES.index(p) for p in nih_names]], axis=1)
            columns[f"nih[{finding}]"] = y_nih
            targets.append((finding, "nih", y_nih))

    def all_aurocs(weight_mask):
        return np.stack([metrics.roc_auc(y, columns[f"score[{f}]"], weight_mask) for f, _, y in targets], axis=-1)

    point = all_aurocs(np.ones(len(names)))
    dist = (metrics.bootstrap_distribution(all_aurocs, groups=columns["patient_id"], n_boot=n_boot, seed=seed)
            if n_boot else np.empty((0, len(targets))))
    findings = {}
    for k, (finding, source, y) in enumerate(targets):
        low, high = metrics.percentile_ci(dist[:, k]) if n_boot else (float("nan"), float("nan"))
        findings.setdefault(finding, {"scored_from": list(rules[finding])})[source] = {
            "auroc": {"value": float(point[k]), "ci_low": low, "ci_high": high,
                      "n_undefined": metrics.count_undefined(dist[:, k]) if n_boot else 0},
            "positives": int(y.sum()), "images": int(len(y))}
    result = {"run": run, "step": predictor.info.get("step"), "label_files": [str(f) for f in label_files],
              "expert_labels": nih_expert.summary(expert), "chestxray14_build": {
                  "data_dir": config.data.data_dir, "resolution": config.data.resolution,
                  "val_fraction": config.data.val_fraction, "val_seed": config.data.val_seed,
                  "trained_on_chestxray14": trained_on_nih},
              "accounting": accounting, "findings": findings,
              "not_scored": {f: "the model has no " + " / ".join("+".join(c) for c in EXPERT_RULES[f][0]) + " output"
                             for f in EXPERT_RULES if f not in rules},
              "counts": {"images": len(names), "patients": int(len(np.unique(columns["patient_id"])))},
              "bootstrap": {"n_boot": n_boot, "seed": seed, "alpha": 0.05, "resampled": "patient_id",
                            "interval": "percentile"}}
    write(run, result, columns)
    return result


def markdown(result: dict) -> str:
    rows = []
    for finding, entry in result["findings"].items():
        for source, label in (("expert", "expert labels"), ("nih", "original NIH labels")):
            if source in entry:
                e = entry[source]
                rows.append([finding, label, " / ".join(entry["scored_from"]),
                             reports.format_number(e["auroc"]["value"]),
                             f"[{reports.format_number(e['auroc']['ci_low'])}, "
                             f"{reports.format_number(e['auroc']['ci_high'])}]", f"{e['positives']} / {e['images']}"])
    a = result["accounting"]
    excluded = {s: v["count"] for s, v in a["excluded_in_run_training_or_validation"].items()}
    notes = [f"{a['expert_images']} expert-labelled images; {a['scored']['count']} scored "
             f"({result['counts']['patients']} patients; sets {a['scored']['by_set']}); excluded because the run "
             f"trained or validated on them: {excluded or 'none'}; not in the prepared build: "
             f"{a['missing_from_build']['count']}."]
    notes += [f"{f}: not scored ({why})." for f, why in result["not_scored"].items()]
    b = result["bootstrap"]
    notes.append(f"95% CIs: percentile bootstrap over patients, {b['n_boot']} resamples, seed {b['seed']}.")
    return (f"### NIH expert labels (Majkowska et al. 2019), step {result['step']}\n\n"
            + reports.markdown_table(["Finding", "Against", "Model outputs (max)", "AUROC", "95% CI",
                                      "Positives / images"], rows) + "\n" + "\n".join(notes) + "\n")


def write(run: str, result: dict, columns: dict, *, name: str = "nih_expert", markdown_fn=None) -> str:
    """WORKDIR/eval/{name}_step{N}.json, .md (by `markdown_fn`, default this module's) and _predictions.csv."""
    out = files.join(files.absolute(run), "eval")
    files.makedirs(out)
    stem = files.join(out, f"{name}_step{result['step']}")
    plain = {}
    for key, values in columns.items():  # "score[Pneumothorax]" -> a 2-D column score[...] per finding
        name, _, sub = key.partition("[")
        plain.setdefault(name, {})[sub.rstrip("]")] = values
    table = {name: (parts[""] if list(parts) == [""] else np.stack(list(parts.values()), axis=1))
             for name, parts in plain.items()}
    reports.write_predictions_csv(stem + "_predictions.csv", table,
                                  column_names={n: list(p) for n, p in plain.items() if list(p) != [""]})
    reports.write_json(stem + ".json", result)
    reports.write_text(stem + ".md", (markdown_fn or markdown)(result))
    return stem


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels_csv", action="append", default=[],
                        help="nih_expert: the merged expert label file, or each of the test and validation files "
                        "(repeat); mimic: the 2.1.0 radiologist-labelled test file (optional)")
    parser.add_argument("--data_dir", help="where the prepared build is (default: the run's data.data_dir)")
