"""Evaluation of a pretraining state on one split: per-image predictions -> metrics -> files.

Every image is counted exactly once: the eval pipeline pads the last batches and marks padding rows with
example_mask 0, and those rows are dropped here before any metric is computed. Predictions from all hosts
are gathered; only the lead host writes:

    WORKDIR/eval/{tag}_step{N}_predictions.csv   one row per image: name, patient, targets, probabilities
    WORKDIR/eval/{tag}_step{N}.json              every metric with its 95% CI (bootstrap over patients)
    WORKDIR/eval/{tag}_step{N}.md                the same as a markdown table

`python -m metachex_jax.evaluation.reports recompute PREDICTIONS_CSV` recomputes the metrics from the CSV alone.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from metachex_jax.core import files
from metachex_jax.core.labels import METADATA_TASKS, PATHOLOGIES
from metachex_jax.data.input import pipeline
from metachex_jax.evaluation import metrics, reports


def predict(eval_step, state, source, *, global_batch, contract, data_sharding, max_batches=0, workers=0,
            kind="nih"):
    """Run `eval_step` over a split (records of `kind`: pipeline.EXAMPLE_FORMATS); images are made by the model's
    pixel `contract` (its size and geometry; the step normalises them). Returns (per-image columns of the real
    examples, mean loss terms)."""
    columns: dict[str, list] = {}
    loss_sums: dict[str, float] = {}
    count = 0.0
    with pipeline.eval_batches(source, kind=kind, global_batch_size=global_batch, image_size=contract.image_size,
                               geometry=contract.geometry, num_workers=workers) as batches:
        for i, local in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            batch = {k: jax.make_array_from_process_local_data(data_sharding, v) for k, v in local.items()}
            preds, loss_terms, n = eval_step(state, batch)
            keep = {k: v for k, v in batch.items() if k != "image"}
            gathered = multihost_utils.process_allgather({**keep, **preds}, tiled=True)
            for k, v in gathered.items():
                columns.setdefault(k, []).append(np.asarray(v))
            for k, v in loss_terms.items():
                loss_sums[k] = loss_sums.get(k, 0.0) + float(v)
            count += float(n)
    table = {k: np.concatenate(v) for k, v in columns.items()}
    real = table.pop("example_mask") > 0
    table = {k: v[real] for k, v in table.items()}
    return table, {k: v / max(count, 1.0) for k, v in loss_sums.items()}


def prediction_columns(table: dict, image_names: list[str]) -> dict:
    """Per-image columns for the CSV and for `metrics.evaluate_multitask`: targets, masks and predictions."""
    cols = {"image_name": np.asarray(image_names), "patient_id": table["patient_id"], "index": table["index"]}
    if "pathology_prob" in table:
        cols.update(pathology=table["pathology"], pathology_prob=table["pathology_prob"],
                    pathology_mask=table["pathology_mask"])
    if "metadata_prob" in table:
        for j, task in enumerate(METADATA_TASKS):
            cols[task] = table["metadata"][:, j]
            cols[f"{task}_prob"] = table["metadata_prob"][:, j]
            cols[f"{task}_mask"] = table["metadata_mask"][:, j]
    if "age_pred" in table:
        cols.update(age=table["age"], age_pred=table["age_pred"], age_mask=table["age_mask"])
    return cols


def evaluate_split(eval_step, state, source, *, split, step, tag, workdir, global_batch, contract,
                   data_sharding, loss_weights, n_boot, seed, max_batches=0, workers=0, kind="nih",
                   label_names=PATHOLOGIES) -> dict:
    """Predict, compute every metric, write the files; returns the metrics (with the weighted loss).

    `label_names`: the model's pathology outputs (a mixture's label space: data/input/mixture.py); records of kind
    "labelled" carry a mask per label, so each dataset is scored on the labels it has."""
    table, loss_terms = predict(eval_step, state, source, global_batch=global_batch, contract=contract,
                                data_sharding=data_sharding, max_batches=max_batches, workers=workers, kind=kind)
    names = [_text(source[int(i)]["image_name"]) for i in table["index"]]
    cols = prediction_columns(table, names)
    result = metrics.evaluate_multitask(cols, n_boot=n_boot, seed=seed, label_names=label_names)
    result["loss"] = float(sum(loss_weights[k] * v for k, v in loss_terms.items()))
    result.update({f"loss_{k}": v for k, v in loss_terms.items()})
    result["split"], result["step"] = split, int(step)
    if jax.process_index() == 0:
        write_outputs(workdir, tag, step, split, cols, result, label_names)
    return result


def combine_datasets(results: dict[str, dict], *, workdir: str, tag: str, step: int, split: str) -> dict:
    """A mixture's evaluation: each dataset's result (its files are `{tag}_{dataset}_step{N}.*`) and their means.

    `mean_auroc` is the mean over datasets of each dataset's mean AUROC over the labels it has (the best
    checkpoint's criterion; datasets whose mean is undefined are left out), `loss` the mean of their losses.
    Written to WORKDIR/eval/{tag}_step{N}_datasets.{json,md} on the lead host.
    """
    means = {name: r["mean_auroc"]["value"] for name, r in results.items()}
    defined = [v for v in means.values() if np.isfinite(v)]
    combined = {"split": split, "step": int(step), "datasets": results,
                "mean_auroc": {"value": float(np.mean(defined)) if defined else float("nan"),
                               "datasets": [name for name, v in means.items() if np.isfinite(v)]},
                "loss": float(np.mean([r["loss"] for r in results.values()]))}
    if jax.process_index() == 0:
        out = files.join(workdir, "eval")
        files.makedirs(out)
        stem = files.join(out, f"{tag}_step{step}_datasets")
        reports.write_json(stem + ".json", {k: v for k, v in combined.items() if k != "datasets"} | {
            "per_dataset": {name: {"mean_auroc": r["mean_auroc"], "loss": r["loss"],
                                   "images": r["counts"]["images"], "file": f"{tag}_{name}_step{step}.json"}
                            for name, r in results.items()}})
        rows = [[name, reports.format_number(r["mean_auroc"]["value"]),
                 f"[{reports.format_number(r['mean_auroc']['ci_low'])}, "
                 f"{reports.format_number(r['mean_auroc']['ci_high'])}]", len(r["mean_auroc"]["labels"]),
                 r["counts"]["images"]] for name, r in results.items()]
        rows.append(["mean over datasets", reports.format_number(combined["mean_auroc"]["value"]), "", "", ""])
        reports.write_text(stem + ".md", f"### {split}, step {step}: each dataset on the labels it has\n\n"
                           + reports.markdown_table(["Dataset", "Mean AUROC", "95% CI", "Labels", "Images"], rows))
    return combined


def write_outputs(workdir: str, tag: str, step: int, split: str, cols: dict, result: dict,
                  label_names=PATHOLOGIES) -> str:
    """Write the three files of the module docstring into WORKDIR/eval (local or gs://); returns their stem."""
    out = files.join(workdir, "eval")
    files.makedirs(out)
    stem = files.join(out, f"{tag}_step{step}")
    reports.write_predictions_csv(stem + "_predictions.csv", cols,
                                  column_names=reports.multitask_column_names(label_names))
    reports.write_json(stem + ".json", result)
    reports.write_text(stem + ".md", reports.multitask_markdown(result, title=f"{split}, step {step}"))
    return stem


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
