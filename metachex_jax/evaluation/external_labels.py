"""A pretraining run scored on another dataset's test labels, mapped onto its outputs:

    python -m metachex_jax.evaluate --run=WORKDIR --labels=mimic --manual_dir=MIMIC_CXR_JPG [--data_dir=DIR]
        [--labels_csv=mimic-cxr-2.1.0-test-set-labeled.csv]
    python -m metachex_jax.evaluate --run=WORKDIR --labels=vindr --manual_dir=VINDR_CXR [--data_dir=DIR]

1. The dataset's build at the run's resolution (data_dir: --data_dir, else the run's data.data_dir), prepared first
   from --manual_dir when missing, with the run's own build options for the dataset when it has them (so a run
   that trained on it is scored on the test split of the build it trained with), else the reader's defaults.
2. Its TEST split only: MIMIC-CXR's official test split; VinDr-CXR's test set (PhysioNet: the consensus of five
   readers; the Kaggle layout: the build's seeded carve-out). No run trains or validates on a test split.
   MIMIC with --labels_csv: the 2.1.0 radiologists' labels of the test studies (data/raw/mimic.py:
   read_test_labels) replace the labeller's on every image of a listed study; test images of an unlisted study
   are left out and counted, as are listed studies that are not in the build's test split.
3. Which labels are scored (output_groups): a label is scored from the model output of the same name in the
   shared label space (core/labels.py: LABEL_ALIASES; e.g. MIMIC's `Pleural Effusion` and VinDr's `Pleural
   effusion` are NIH's `Effusion`), and VinDr's `Nodule/Mass` from the larger of `Nodule` and `Mass`, as the NIH
   expert evaluation scores "Nodule or mass". A label without such an output is not scored (listed). No looser
   pairs: MIMIC's Lung Lesion is not NIH's Nodule/Mass, VinDr's ILD is not NIH's Fibrosis.
4. An image whose label is unknown (MIMIC: uncertain under the `ignore` policy, or a study without a labeller row)
   is left out of that label's AUROC and counted.
5. AUROC per label with a 95% percentile CI from one bootstrap over PATIENTS (metrics.py; the same resamples for
   every label; VinDr images are their own patients).
6. WORKDIR/eval/{mimic,mimic_radiologists,vindr}_step{N}.json, .md and _predictions.csv (one row per image: its
   scores and labels, -1 unknown), from which every AUROC recomputes.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np

from metachex_jax.data.build import registry
from metachex_jax.data.input import datasets, mixture
from metachex_jax.data.input.spec import DataSpec
from metachex_jax.data.raw import mimic
from metachex_jax.evaluation import expert_labels, metrics, reports
from metachex_jax.models import runs
from metachex_jax.serving.predictor import Predictor

DATASETS = ("mimic", "vindr")
# A dataset's label -> the model outputs whose maximum scores it, where the same-name rule does not apply.
GROUPS = {"vindr": {"Nodule/Mass": ("Nodule", "Mass")}}


def output_group(dataset: str, label: str) -> tuple[str, ...]:
    """The model outputs whose maximum scores `dataset`'s `label` (module docstring, 3)."""
    return GROUPS.get(dataset, {}).get(label, (mixture.space_name(dataset, label),))


def output_groups(dataset: str, label_names, output_names) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """(label -> the outputs scoring it, label -> why it is not scored) for a model with `output_names`."""
    scored, not_scored = {}, {}
    for name in label_names:
        group = output_group(dataset, name)
        if all(output in output_names for output in group):
            scored[name] = group
        else:
            not_scored[name] = f"the model has no {' / '.join(group)} output"
    return scored, not_scored


@dataclasses.dataclass
class TestImages:
    """The scored images of a test split: their record rows, labels (N, K) in `label_names` order, patients."""

    rows: np.ndarray
    image_id: list[str]
    patient: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...]
    accounting: dict


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def test_images(source, label_names: tuple[str, ...], radiologist_labels: dict | None = None) -> TestImages:
    """Every record of `source` (a test split) with its labels; with `radiologist_labels` (MIMIC: study ->
    labels), the images of listed studies only, with those labels."""
    ids, patients, labels = [], [], []
    for i in range(len(source)):
        record = source[i]
        ids.append(_text(record["image_id"]))
        patients.append(int(record["patient_key"]))
        labels.append(np.asarray(record["labels"], np.int64))
    rows = np.arange(len(ids))
    labels = np.asarray(labels, np.int64).reshape(len(ids), len(label_names))
    accounting = {"test_images": len(ids)}
    if radiologist_labels is not None:
        studies = [mimic.study_of(i) for i in ids]
        rows = np.array([i for i, s in enumerate(studies) if s in radiologist_labels], np.int64)
        unlisted = sorted({s for s in studies if s not in radiologist_labels})
        absent = sorted(set(radiologist_labels) - set(studies))
        labels = np.array([radiologist_labels[studies[i]] for i in rows], np.int64).reshape(len(rows), -1)
        accounting |= {
            "test_images_of_labelled_studies": len(rows),
            "test_studies_without_radiologist_labels": {"count": len(unlisted), "images": len(ids) - len(rows),
                                                        "studies": unlisted},
            "labelled_studies_not_in_test_split": {"count": len(absent), "studies": absent}}
    return TestImages(rows, [ids[i] for i in rows], np.asarray(patients, np.int64)[rows], labels, label_names,
                      accounting)


def predict_rows(predictor, source, rows: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """The model's outputs on records `rows` of `source` (stored images, the run's pixel contract)."""
    outputs: dict[str, list] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        crops = np.stack([predictor.contract.from_stored(source[int(i)]["image"]) for i in chunk])
        for key, values in predictor(crops).items():
            outputs.setdefault(key, []).append(values)
    return {k: np.concatenate(v) for k, v in outputs.items()}


def build_spec(config, dataset: str, *, data_dir: str | None, manual_dir: str | None) -> DataSpec:
    """The data spec reading `dataset`'s build at the run's resolution (module docstring, 1)."""
    data = config.data
    family = registry.family(dataset)
    table = {k: v for k, v in family.parameters.items() if k != "bit_depth"} | {"manual_dir": ""}
    if dataset in data:  # the run's own options for it (a run that may have trained on it)
        table |= {k: v for k, v in dict(data[dataset]).items() if k in table}
    if manual_dir:
        table["manual_dir"] = os.path.expanduser(manual_dir)
    return DataSpec(data_dir=data_dir or data.data_dir, resolution=data.resolution, image_size=data.image_size,
                    bit_depth=data.get("bit_depth", 0), tables={dataset: table})


def evaluate_run(run: str, dataset: str, *, manual_dir: str | None = None, data_dir: str | None = None,
                 labels_csv: str | None = None, step: str = "best", n_boot: int = 1000, seed: int = 0,
                 batch_size: int = 64) -> dict:
    """Score `run` on `dataset`'s test labels (module docstring); writes WORKDIR/eval/<name>_step{N}.* and returns
    the result."""
    if dataset not in DATASETS:
        raise ValueError(f"external labels of {dataset!r}: choose one of {DATASETS}")
    if labels_csv and dataset != "mimic":
        raise ValueError("--labels_csv with --labels=vindr: only MIMIC has a separate label file (the 2.1.0 "
                         "radiologists' test labels)")
    radiologist_labels, renamed = mimic.read_test_labels(labels_csv) if labels_csv else (None, None)
    config = ml_collections.ConfigDict(runs.saved_config(run))
    spec = build_spec(config, dataset, data_dir=data_dir, manual_dir=manual_dir)
    source = datasets.dataset_splits(spec, dataset, ("test",))["test"]
    label_names = mixture.native_label_names(source, "labelled")
    predictor = Predictor.load(run, step=step, batch_size=batch_size)
    groups, not_scored = output_groups(dataset, label_names, predictor.output_names)
    if not groups:
        raise ValueError(f"the model of {run} has none of the outputs {dataset}'s labels are scored from; its "
                         f"outputs: {predictor.output_names}; the labels: {not_scored}")
    images = test_images(source, label_names, radiologist_labels)
    if not len(images.rows):
        raise ValueError(f"no test image of {dataset} to score: {images.accounting}")
    outputs = predict_rows(predictor, source, images.rows, batch_size)

    columns = {"image_id": np.array(images.image_id), "patient_key": images.patient}
    scored = list(groups)
    scores = np.stack([np.max(np.stack([outputs[o] for o in groups[name]]), axis=0) for name in scored], axis=1)
    labels = images.labels[:, [label_names.index(name) for name in scored]]
    known = labels >= 0
    for k, name in enumerate(scored):
        columns[f"score[{name}]"], columns[f"label[{name}]"] = scores[:, k], labels[:, k]

    def all_aurocs(weight_mask):
        w = weight_mask if weight_mask.ndim == 2 else weight_mask[:, None]
        return np.stack([metrics.roc_auc(np.maximum(labels[:, k], 0), scores[:, k], w * known[:, k:k + 1])
                         for k in range(len(scored))], axis=-1)

    point = all_aurocs(np.ones(len(images.rows)))[0]
    dist = (metrics.bootstrap_distribution(all_aurocs, groups=images.patient, n_boot=n_boot, seed=seed)
            if n_boot else np.empty((0, len(scored))))
    findings = {}
    for k, name in enumerate(scored):
        low, high = metrics.percentile_ci(dist[:, k]) if n_boot else (float("nan"), float("nan"))
        findings[name] = {"scored_from": list(groups[name]),
                          "auroc": {"value": float(point[k]), "ci_low": low, "ci_high": high,
                                    "n_undefined": metrics.count_undefined(dist[:, k]) if n_boot else 0},
                          "positives": int((labels[:, k] == 1).sum()), "negatives": int((labels[:, k] == 0).sum()),
                          "unknown": int((~known[:, k]).sum())}
    trained_on = dataset in mixture.parse_mixture(config.data.get("datasets", "chestxray14"))
    result = {"run": run, "step": predictor.info.get("step"), "dataset": dataset,
              "labels": "radiologists (2.1.0 test file)" if labels_csv else "the build's test split",
              "label_file": labels_csv, "renamed_columns": (renamed or {}).get("columns"),
              "build": {"data_dir": spec.data_dir, "resolution": spec.resolution, "options": spec.tables[dataset],
                        "config_name": source.dataset_info.config_name},
              "trained_on_dataset": trained_on, "accounting": images.accounting, "findings": findings,
              "not_scored": not_scored,
              "counts": {"images": len(images.rows), "patients": int(len(np.unique(images.patient)))},
              "bootstrap": {"n_boot": n_boot, "seed": seed, "alpha": 0.05, "resampled": "patient_key",
                            "interval": "percentile"}}
    result["name"] = f"{dataset}_radiologists" if labels_csv else dataset
    expert_labels.write(run, result, columns, name=result["name"], markdown_fn=markdown)
    return result


def markdown(result: dict) -> str:
    rows = [[name, " / ".join(e["scored_from"]), reports.format_number(e["auroc"]["value"]),
             f"[{reports.format_number(e['auroc']['ci_low'])}, {reports.format_number(e['auroc']['ci_high'])}]",
             f"{e['positives']} / {e['positives'] + e['negatives']}", str(e["unknown"])]
            for name, e in result["findings"].items()]
    notes = [f"{result['counts']['images']} test images ({result['counts']['patients']} patients) of "
             f"{result['accounting']['test_images']} in the build's test split; labels: {result['labels']}."]
    if "test_studies_without_radiologist_labels" in result["accounting"]:
        a = result["accounting"]
        notes.append(f"Left out: {a['test_studies_without_radiologist_labels']['images']} test images of "
                     f"{a['test_studies_without_radiologist_labels']['count']} studies the label file does not "
                     f"list; {a['labelled_studies_not_in_test_split']['count']} listed studies are not in the "
                     "test split.")
    if result["trained_on_dataset"]:
        notes.append(f"The run trained on {result['dataset']}'s train split (not its test split).")
    notes.append("Not scored (the model has no counterpart output): " + (", ".join(result["not_scored"]) or "none")
                 + ".")
    b = result["bootstrap"]
    notes.append(f"95% CIs: percentile bootstrap over patients, {b['n_boot']} resamples, seed {b['seed']}.")
    return (f"### {result['name']} test labels, step {result['step']}\n\n"
            + reports.markdown_table(["Label", "Model outputs (max)", "AUROC", "95% CI", "Positives / known",
                                      "Unknown"], rows) + "\n" + "\n".join(notes) + "\n")
