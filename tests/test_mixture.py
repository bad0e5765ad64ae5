"""Pretraining on a mixture: one label space with per-label masks from each example's own dataset (checked entry
by entry on tiny builds of ChestX-ray14, CheXpert, PadChest, a CSV and MIMIC-CXR-JPG), and the trainer on a mixture of the
demo's ChestX-ray14 and hospital CSV: per-dataset evaluation, the best checkpoint on the mean over datasets, and
its export with each step's own metrics."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_fixtures import make_chexpert_tree, make_csv_tree, make_nih_tree, make_padchest_tree
from dataset_trees import make_mimic_tree
from metachex_jax import export
from metachex_jax import reports as reports_command
from metachex_jax.configs import pretrain
from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.data.build import build, builders
from metachex_jax.data.input import mixture, pipeline
from metachex_jax.data.input.augment import Augmentation
from metachex_jax.evaluation import reports
from metachex_jax.models import runs
from metachex_jax.training import trainer

EXTRAS = ("No Finding", "Tuberculosis", "Lung Opacity")
# Where each label of the space comes from in each dataset (written out here, independently of mixture.py).
SOURCE_COLUMN = {
    "chestxray14": {name: name for name in PATHOLOGIES},
    "chexpert": {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion",
                 "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation",
                 "Edema": "Edema", "No Finding": "No Finding", "Lung Opacity": "Lung Opacity"},
    "padchest": {name: name for name in PATHOLOGIES + ("No Finding", "Tuberculosis")},
    "csv": {"Tuberculosis": "Tuberculosis", "Cardiomegaly": "Cardiomegaly"},
}
SOURCE_COLUMN["mimic"] = SOURCE_COLUMN["chexpert"]  # CheXpert's labeller, CheXpert's names


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    base = tmp_path_factory.mktemp("mixture")
    out = base / "out"
    make_nih_tree(base / "nih", n_patients=12)
    make_chexpert_tree(base / "chexpert")
    make_padchest_tree(base / "padchest")
    csv_tree = make_csv_tree(base / "hospital")
    mimic_tree = make_mimic_tree(base / "mimic")
    sources = {}
    for name, manual_dir, kwargs in (("chestxray14", base / "nih", {}), ("chexpert", base / "chexpert", {}),
                                     ("padchest", base / "padchest", {}),
                                     ("csv", base / "hospital", {"csv": str(csv_tree.csv_path)}),
                                     ("mimic", mimic_tree.root, {"patients_csv": str(mimic_tree.patients_csv)})):
        result = build.build_dataset(name, manual_dir, out, resolution=16, num_workers=1, progress=False, **kwargs)
        sources[name] = builders.data_source(name, "train", out, config_name=result.config_name)
    return sources


def expected_entries(dataset: str, record: dict, space) -> dict:
    names = list(PATHOLOGIES) if dataset == "chestxray14" else list(record["_label_names"])  # as the build wrote
    native = dict(zip(names, np.asarray(record["labels"]).tolist()))
    values = [native[SOURCE_COLUMN[dataset][label]] if label in SOURCE_COLUMN[dataset] else -1 for label in space]
    return {"pathology": np.array([v == 1 for v in values], np.float32),
            "pathology_mask": np.array([v >= 0 for v in values], np.float32),
            "metadata": np.array([max(record[t], 0) for t in ("view_ap", "sex_male")], np.float32),
            "metadata_mask": np.array([record[t] >= 0 for t in ("view_ap", "sex_male")], np.float32),
            "age_mask": np.float32(bool(record["age_valid"]))}


def test_mixture_batches_carry_each_datasets_masks_entry_by_entry(builds):
    space = mixture.label_space(",".join(EXTRAS))
    assert space == PATHOLOGIES + EXTRAS
    harmonised = [mixture.HarmonisedSource(source, dataset=name, kind="nih" if name == "chestxray14" else "labelled",
                                           space=space) for name, source in builds.items()]
    assert harmonised[1].provided == tuple(label for label in space if label in SOURCE_COLUMN["chexpert"])
    expected = {}  # (patient key, record index) -> (dataset, expected entries)
    for name, source in builds.items():
        for i in range(len(source)):
            record = dict(source[i])
            if name != "chestxray14":
                record["_label_names"] = source.dataset_info.metadata["label_names"]
                key = int(record["patient_key"])
            else:
                key = int(record["patient_id"])
            expected[key, i] = (name, expected_entries(name, record, space))
    seen = {name: 0 for name in builds}
    with pipeline.train_batches(harmonised, kind="labelled", global_batch_size=8, image_size=16, seed=0,
                                augmentation=Augmentation.none(), weights=[1] * len(builds), process_index=0,
                                process_count=1) as batches:
        for _ in range(15):
            batch = next(batches)
            assert batch["pathology"].shape == batch["pathology_mask"].shape == (8, len(space))
            for row in range(8):
                name, want = expected[int(batch["patient_id"][row]), int(batch["index"][row])]
                seen[name] += 1
                for key, value in want.items():
                    np.testing.assert_array_equal(batch[key][row], value, err_msg=f"{name} {key}")
    assert all(n > 10 for n in seen.values()), seen  # every dataset was mixed in
    # Padding rows of an evaluation batch have the space's shape and every mask 0.
    n = len(harmonised[1])
    with pipeline.eval_batches(harmonised[1], kind="labelled", global_batch_size=n + 3, image_size=16,
                               process_index=0, process_count=1) as batches:
        batch = next(batches)
    assert batch["pathology_mask"].shape == (n + 3, len(space)) and not batch["pathology_mask"][n:].any()
    assert batch["example_mask"][:n].all() and not batch["example_mask"][n:].any()


def test_label_space_and_mixture_parsing():
    assert mixture.label_space("Cardiomegaly, Fracture,,Fracture") == PATHOLOGIES + ("Fracture",)
    assert mixture.parse_mixture("chestxray14:2+chexpert,padchest:0.5") == {"chestxray14": 2.0, "chexpert": 1.0,
                                                                           "padchest": 0.5}
    for bad in ("", "chexpert:0", "chexpert:x", "chexpert,chexpert"):
        with pytest.raises(ValueError, match="name\\[:weight\\]"):
            mixture.parse_mixture(bad)
    np.testing.assert_array_equal(mixture.label_columns("chexpert", ("Pleural Effusion", "Edema"),
                                                        ("Effusion", "Edema", "Mass")), [0, 1, -1])


def test_trainer_on_a_mixture_evaluates_each_dataset_on_its_labels(tmp_path):
    c = pretrain.get_config("demo,arch=densenet_tiny,res=32,datasets=chestxray14+csv:0.5")
    c.demo_dir = str(tmp_path / "demo")
    c.demo_data.update(num_nih=96, num_shenzhen=2, num_montgomery=2, num_hospital=60, size=64)
    c.data.extra_labels = "Tuberculosis"
    c.batch_size_per_device, c.eval_batch_size_per_device = 8, 16
    c.num_steps, c.eval_every_steps, c.log_every_steps, c.n_boot = 4, 2, 2, 20
    c.optim.schedule, c.optim.warmup_steps = "plateau", 0
    assert c.optim.plateau_on == "mean_auroc"
    workdir = tmp_path / "run"
    final = trainer.train_and_evaluate(c, str(workdir))
    space = PATHOLOGIES + ("Tuberculosis",)

    files = set(os.listdir(workdir / "eval"))
    for tag, step in (("validation", 2), ("validation", 4), ("test", final["step"])):  # test: the best checkpoint
        for name in ("chestxray14", "csv"):
            assert {f"{tag}_{name}_step{step}.json", f"{tag}_{name}_step{step}_predictions.csv"} <= files
        assert f"{tag}_step{step}_datasets.json" in files
    summary = json.loads((workdir / "eval" / f"test_step{final['step']}_datasets.json").read_text())
    per = {name: json.loads((workdir / "eval" / f"test_{name}_step{final['step']}.json").read_text())
           for name in ("chestxray14", "csv")}
    assert summary["mean_auroc"]["value"] == pytest.approx(np.mean([r["mean_auroc"]["value"] for r in per.values()]))
    assert final["mean_auroc"]["value"] == pytest.approx(summary["mean_auroc"]["value"])
    # Each dataset on the labels it has: the hospital knows Cardiomegaly and Tuberculosis only, NIH its 14.
    assert set(per["csv"]["mean_auroc"]["labels"]) <= {"Cardiomegaly", "Tuberculosis"}
    assert per["csv"]["counts"]["pathology"]["Mass"]["labelled"] == 0
    assert per["chestxray14"]["counts"]["pathology"]["Tuberculosis"]["labelled"] == 0
    assert "Tuberculosis" not in per["chestxray14"]["mean_auroc"]["labels"]
    # The per-image CSV of a mixture's label space recomputes to the same numbers.
    csv_path = workdir / "eval" / f"test_csv_step{final['step']}_predictions.csv"
    assert reports.pathology_names_in(csv_path) == space
    assert reports_command.main(["recompute", str(csv_path), "--n_boot=20", "--json", str(tmp_path / "re.json")]) == 0
    recomputed = json.loads((tmp_path / "re.json").read_text())
    assert recomputed["mean_auroc"]["value"] == pytest.approx(per["csv"]["mean_auroc"]["value"])
    # The checkpoint records the label space, so the model is rebuilt with its 15 named outputs.
    model, info = runs.load_run_model(str(workdir))
    assert model.pathology_names() == space and info["config"]["data"]["datasets"] == "chestxray14,csv:0.5"
    lines = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
    assert any("val/csv/mean_auroc" in x and "val/chestxray14/mean_auroc" in x for x in lines)

    # Export at each evaluated step, the earlier one first (not the latest): the card's metrics are that step's own,
    # its test results where the trainer tested it (the best checkpoint), else its validation results.
    def same(a, b):  # NaN-safe equality of JSON values
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)

    for step in (2, 4):
        out = tmp_path / f"exported_step{step}"
        assert export.main([str(workdir), f"--out={out}", f"--step={step}", "--platforms=cpu"]) == 0
        metrics = json.loads((out / "model.json").read_text())["metrics"]
        split = "test" if step == final["step"] else "validation"
        combined = json.loads((workdir / "eval" / f"{split}_step{step}_datasets.json").read_text())
        assert (metrics["split"], metrics["step"]) == (split, step)
        assert same(metrics["mean_auroc"], combined["mean_auroc"])
        for name in ("chestxray14", "csv"):
            per_dataset = json.loads((workdir / "eval" / f"{split}_{name}_step{step}.json").read_text())
            assert same(metrics["datasets"][name]["mean_auroc"], per_dataset["mean_auroc"])
            assert same(metrics["datasets"][name]["age_mae_years"], per_dataset["age"]["mae_years"])
