"""NIH expert labels: reading the merged file or the pair, the contamination check against the run's training and
validation splits, and AUROCs with patient-bootstrap CIs checked against scikit-learn, on a tiny demo run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dataset_trees import make_mimic_tree, make_vindr_tree
from metachex_jax import evaluate
from metachex_jax.configs import pretrain
from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.data.build import builders
from metachex_jax.data.input import datasets
from metachex_jax.data.input.spec import DataSpec
from metachex_jax.data.raw import mimic, nih_expert, vindr
from metachex_jax.data.raw.common import RawDataError
from metachex_jax.evaluation import expert_labels, external_labels, metrics, reports
from metachex_jax.serving.predictor import Predictor
from metachex_jax.training import trainer

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width, Height],OriginalImagePixelSpacing[x, y],Fracture,Pneumothorax,Airspace opacity,"
          "Nodule or mass")


def expert_rows(nih_csv, names: dict[str, str], seed: int = 0) -> list[str]:
    """Expert rows for `names` (name -> set id): findings from the NIH labels with some flipped, as adjudication
    does; the NIH columns copied from Data_Entry."""
    rng = np.random.default_rng(seed)
    rows = []
    with open(nih_csv) as f:
        next(f)
        for line in f:
            cells = line.rstrip("\n").split(",")
            if cells[0] not in names:
                continue
            found = set(cells[1].split("|"))
            truth = [rng.random() < 0.2, "Pneumothorax" in found,
                     bool(found & {"Consolidation", "Infiltration", "Pneumonia"}), bool(found & {"Nodule", "Mass"})]
            truth = [t != (rng.random() < 0.1) for t in truth]
            rows.append((cells[0], ",".join(cells[:11] + ["YES" if t else "NO" for t in truth]), names[cells[0]]))
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("expert")
    c = pretrain.get_config("demo,arch=densenet_tiny,res=32")
    c.demo_dir = str(base / "demo")
    c.demo_data.update(num_nih=120, num_shenzhen=2, num_montgomery=2, num_hospital=0, size=64)
    c.batch_size_per_device, c.eval_batch_size_per_device, c.num_steps, c.n_boot = 8, 32, 2, 10
    workdir = base / "run"
    trainer.train_and_evaluate(c, str(workdir))
    splits = datasets.chestxray14_splits(DataSpec.from_config(c))
    names = {s: [splits[s][i]["image_name"].decode() for i in range(len(splits[s]))] for s in splits}
    chosen = {n: "test" for n in names["test"][:30]}
    chosen |= {n: "val" for n in names["train"][:10] + names["validation"][:4]}
    nih_csv = next((base / "demo").rglob("Data_Entry_2017_v2020.csv"))
    rows = expert_rows(nih_csv, chosen)
    merged = base / "four_findings_expert_labels_merged.csv"
    merged.write_text("\n".join([HEADER + ",Set Id"] + [f"{r},{s}" for _, r, s in rows]) + "\n")
    pair = [base / "test_labels.csv", base / "validation_labels.csv"]
    for path, set_id in zip(pair, ("test", "val")):
        path.write_text("\n".join([HEADER] + [r for _, r, s in rows if s == set_id]) + "\n")
    return workdir, merged, pair, names, chosen


def test_expert_scores_exclude_the_runs_training_and_validation_images_and_match_sklearn(run, tmp_path):
    workdir, merged, pair, names, chosen = run
    result = expert_labels.evaluate_run(str(workdir), [str(merged)], n_boot=200, seed=3)
    accounting = result["accounting"]
    excluded = accounting["excluded_in_run_training_or_validation"]
    assert excluded["train"]["images"] == sorted(n for n in chosen if n in names["train"])
    assert excluded["validation"]["images"] == sorted(n for n in chosen if n in names["validation"])
    assert excluded["train"]["by_set"] == {"val": 10} and accounting["scored"] == {
        "count": 30, "by_set": {"test": 30}, "splits": {"test": 30}}
    assert set(result["findings"]) == {"Pneumothorax", "Airspace opacity", "Nodule or mass"}
    assert "Fracture" in result["not_scored"]
    assert result["findings"]["Airspace opacity"]["scored_from"] == ["Consolidation", "Infiltration", "Pneumonia"]

    stem = workdir / "eval" / f"nih_expert_step{result['step']}"
    cols = reports.read_predictions_csv(str(stem) + "_predictions.csv")
    assert sorted(cols["image_name"]) == sorted(n for n, s in chosen.items() if s == "test")
    findings = list(result["findings"])
    groups = cols["patient_id"]
    weights = np.concatenate(list(metrics.iter_group_bootstrap_weights(groups, 200, 3)), axis=1)
    for j, finding in enumerate(findings):
        score = cols["score"][:, j]
        for source in ("expert", "nih"):
            y = cols[source][:, j]  # the same findings in the same order (none of them is Fracture)
            entry = result["findings"][finding][source]
            assert entry["auroc"]["value"] == pytest.approx(roc_auc_score(y, score), abs=1e-12)
            boot = [roc_auc_score(y, score, sample_weight=weights[:, b]) if len(set(y[weights[:, b] > 0])) == 2
                    else np.nan for b in range(200)]
            low, high = np.nanpercentile(boot, [2.5, 97.5])
            assert (entry["auroc"]["ci_low"], entry["auroc"]["ci_high"]) == pytest.approx((low, high), abs=1e-12)
    # The expert label is the file's; the original one is the build record's union of NIH labels.
    expert = nih_expert.read_expert_labels([str(merged)])
    for i, name in enumerate(cols["image_name"]):
        assert cols["expert"][i, findings.index("Pneumothorax")] == expert[name].labels[1]
    # The scores are the model's outputs: max(Nodule, Mass) for "Nodule or mass", on the centre crops of the build.
    predictor = Predictor.load(str(workdir))
    c = pretrain.get_config("demo,arch=densenet_tiny,res=32")
    c.demo_dir = str(workdir.parent / "demo")
    c.demo_data.update(num_nih=120, num_shenzhen=2, num_montgomery=2, num_hospital=0, size=64)
    test = datasets.chestxray14_splits(DataSpec.from_config(c))["test"]
    index = {test[i]["image_name"].decode(): i for i in range(len(test))}
    crops = np.stack([predictor.contract.from_stored(test[index[n]]["image"]) for n in cols["image_name"]])
    out = predictor(crops)
    np.testing.assert_allclose(cols["score"][:, findings.index("Nodule or mass")],
                               np.maximum(out["Nodule"], out["Mass"]), rtol=1e-6)
    nih = np.stack([test[index[n]]["labels"] for n in cols["image_name"]])
    np.testing.assert_array_equal(cols["nih"][:, findings.index("Nodule or mass")],
                                  nih[:, [PATHOLOGIES.index("Nodule"), PATHOLOGIES.index("Mass")]].max(axis=1))


def test_the_pair_of_files_equals_the_merged_file_and_the_command_line(run, capsys):
    workdir, merged, pair, _, _ = run
    a = expert_labels.evaluate_run(str(workdir), [str(merged)], n_boot=50)
    b = expert_labels.evaluate_run(str(workdir), [str(p) for p in pair], n_boot=50)
    assert a["findings"] == b["findings"] and a["accounting"] == b["accounting"]
    assert evaluate.main([f"--run={workdir}", "--labels=nih_expert", f"--labels_csv={pair[0]}",
                          f"--labels_csv={pair[1]}", "--n_boot=50"]) == 0
    out = capsys.readouterr().out
    assert "Nodule or mass" in out and "original NIH labels" in out and "Fracture: not scored" in out
    saved = json.loads((workdir / "eval" / f"nih_expert_step{a['step']}.json").read_text())
    assert saved["findings"] == json.loads(json.dumps(b["findings"]))


def test_bad_expert_label_files_are_named(tmp_path):
    merged = tmp_path / "labels.csv"
    rows = [HEADER + ",Set Id",
            "00000001_000.png,No Finding,0,1,58,M,PA,2500,2048,0.143,0.143,NO,MAYBE,NO,NO,test",
            "00000002_000.png,No Finding,0,2,58,M,PA,2500,2048,0.143,0.143,NO,NO,NO,NO,val",
            "00000002_000.png,No Finding,0,2,58,M,PA,2500,2048,0.143,0.143,NO,NO,NO,NO,val",
            "00000003_000.png,No Finding,0,3,58,M,PA,2500,2048,0.143,0.143,NO,NO,NO,NO,train"]
    merged.write_text("\n".join(rows) + "\n")
    with pytest.raises(RawDataError) as error:
        nih_expert.read_expert_labels([str(merged)])
    assert {(p.kind, p.item) for p in error.value.problems} == {
        ("bad_value", "00000001_000.png"), ("duplicate_image", "00000002_000.png"), ("bad_value", "00000003_000.png")}
    assert "Pneumothorax='MAYBE'" in str(error.value) and "Set Id='train'" in str(error.value)
    unnamed = tmp_path / "labels_2019.csv"
    unnamed.write_text(HEADER + "\n")
    with pytest.raises(ValueError, match="does not say whether it holds the test or the validation set"):
        nih_expert.read_expert_labels([str(unnamed)])
    assert nih_expert.summary({}) == {"images": 0, "patients": 0, "sets": {}, "yes": {f: 0 for f in
                                                                                     nih_expert.FINDINGS}}


# --- other datasets' test labels (evaluation/external_labels.py) -----------------------------------------------

MIMIC_TEXT = {"1.0": 1, "0.0": 0, "": 0, "-1.0": -1}  # the labeller's values, uncertain masked (`ignore`)
NIH_COUNTERPARTS = {"mimic": {"Atelectasis": ["Atelectasis"], "Cardiomegaly": ["Cardiomegaly"],
                              "Consolidation": ["Consolidation"], "Edema": ["Edema"], "Pleural Effusion": ["Effusion"],
                              "Pneumonia": ["Pneumonia"], "Pneumothorax": ["Pneumothorax"]},
                    "vindr": {"Atelectasis": ["Atelectasis"], "Cardiomegaly": ["Cardiomegaly"],
                              "Consolidation": ["Consolidation"], "Edema": ["Edema"], "Emphysema": ["Emphysema"],
                              "Infiltration": ["Infiltration"], "Nodule/Mass": ["Nodule", "Mass"],
                              "Pleural effusion": ["Effusion"], "Pleural thickening": ["Pleural_Thickening"],
                              "Pneumothorax": ["Pneumothorax"], "Pulmonary fibrosis": ["Fibrosis"],
                              "Pneumonia": ["Pneumonia"]}}


def check_against_sklearn(workdir, result, expected_labels: dict[str, dict[str, int]], build_dir, dataset):
    """The scored images, their labels (from the tree's truth), the model's scores on the build's test records
    (max over a group) and every AUROC (scikit-learn; NaN where a label has one class among the known)."""
    cols = reports.read_predictions_csv(workdir / "eval" / f"{result['name']}_step{result['step']}_predictions.csv")
    assert sorted(cols["image_id"]) == sorted(expected_labels)
    scored = list(result["findings"])
    assert {f: e["scored_from"] for f, e in result["findings"].items()} == NIH_COUNTERPARTS[dataset]
    test = builders.data_source(dataset, "test", build_dir, config_name=result["build"]["config_name"])
    index = {test[i]["image_id"].decode(): i for i in range(len(test))}
    predictor = Predictor.load(str(workdir))
    out = predictor(np.stack([predictor.contract.from_stored(test[index[n]]["image"]) for n in cols["image_id"]]))
    for k, finding in enumerate(scored):
        y = np.array([expected_labels[n][finding] for n in cols["image_id"]])
        np.testing.assert_array_equal(cols["label"][:, k], y)
        score = np.max([out[o] for o in NIH_COUNTERPARTS[dataset][finding]], axis=0)
        np.testing.assert_allclose(cols["score"][:, k], score, rtol=1e-6)
        entry, known = result["findings"][finding], y >= 0
        assert (entry["positives"], entry["negatives"], entry["unknown"]) == (
            int((y == 1).sum()), int((y == 0).sum()), int((~known).sum()))
        if len(set(y[known])) == 2:
            assert entry["auroc"]["value"] == pytest.approx(roc_auc_score(y[known], score[known]), abs=1e-12)
        else:
            assert entry["auroc"]["value"] is None or np.isnan(entry["auroc"]["value"])  # (JSON: null)
    return cols


def test_mimic_test_split_scored_with_mapped_labels_against_sklearn(run, tmp_path):
    """An NIH run on a tiny MIMIC-CXR-JPG (tests/dataset_trees.py): the official test split's frontal images, the
    labeller's study labels (uncertain masked), the 7 labels with an NIH counterpart; then the 2.1.0 radiologists'
    file (its `Airspace Opacity` and `No Findings` spellings) replacing them for the studies it lists."""
    workdir = run[0]
    tree = make_mimic_tree(tmp_path / "mimic")
    result = external_labels.evaluate_run(str(workdir), "mimic", manual_dir=str(tree.root),
                                          data_dir=str(tmp_path / "tfds"), n_boot=20)
    test = [i for i in tree.images if i["split"] == "test" and i["view"] in ("PA", "AP")]
    truth = {i["path"]: {name: MIMIC_TEXT[tree.labels[i["study"]][name]] for name in mimic.OBSERVATIONS}
             for i in test}
    check_against_sklearn(workdir, result, truth, tmp_path / "tfds", "mimic")
    assert result["accounting"] == {"test_images": 2} and not result["trained_on_dataset"]
    assert set(result["not_scored"]) == set(mimic.OBSERVATIONS) - set(NIH_COUNTERPARTS["mimic"])

    labelled_study, other = test[0]["study"], "59999999"
    header = ["study_id", *(("Airspace Opacity" if n == "Lung Opacity" else "No Findings" if n == "No Finding"
                             else n) for n in mimic.OBSERVATIONS)]
    values = {labelled_study: ["1.0" if n in ("Edema", "Lung Opacity") else "" for n in mimic.OBSERVATIONS],
              other: ["0.0"] * len(mimic.OBSERVATIONS)}
    labels_csv = tmp_path / "mimic-cxr-2.1.0-test-set-labeled.csv"
    labels_csv.write_text("\n".join(",".join(r) for r in [header] + [[s, *v] for s, v in values.items()]) + "\n")
    result = external_labels.evaluate_run(str(workdir), "mimic", manual_dir=str(tree.root),
                                          data_dir=str(tmp_path / "tfds"), labels_csv=str(labels_csv), n_boot=0)
    assert result["name"] == "mimic_radiologists"
    truth = {test[0]["path"]: {n: int(n in ("Edema", "Lung Opacity")) for n in mimic.OBSERVATIONS}}
    check_against_sklearn(workdir, result, truth, tmp_path / "tfds", "mimic")
    a = result["accounting"]
    assert a["test_studies_without_radiologist_labels"] == {"count": 1, "images": 1, "studies": [test[1]["study"]]}
    assert a["labelled_studies_not_in_test_split"] == {"count": 1, "studies": [other]}
    assert result["renamed_columns"] == {"Lung Opacity": "Airspace Opacity", "No Finding": "No Findings"}


def test_vindr_test_set_scored_with_mapped_labels_and_the_command_line(run, tmp_path, capsys):
    """An NIH run on a tiny VinDr-CXR 1.0.0: its test set (consensus labels; `Other disease` spelled as the test
    file does), Nodule/Mass scored from the larger of Nodule and Mass, only clear counterparts scored."""
    workdir = run[0]
    tree = make_vindr_tree(tmp_path / "vindr")
    assert evaluate.main([f"--run={workdir}", "--labels=vindr", f"--manual_dir={tree.root}",
                          f"--data_dir={tmp_path / 'tfds'}", "--n_boot=20"]) == 0
    out = capsys.readouterr().out
    assert "Nodule / Mass" in out and "Not scored (the model has no counterpart output): Aortic enlargement" in out
    result = json.loads(next((workdir / "eval").glob("vindr_step*.json")).read_text())
    truth = {image: {name: int(name in positives) for name in vindr.LABEL_NAMES}
             for image, positives in tree.test.items()}
    check_against_sklearn(workdir, result, truth, tmp_path / "tfds", "vindr")
    assert result["findings"]["Nodule/Mass"]["positives"] == 1
    assert not np.isnan(result["findings"]["Cardiomegaly"]["auroc"]["value"])
    with pytest.raises(SystemExit):  # only MIMIC has a separate label file
        evaluate.main([f"--run={workdir}", "--labels=vindr", "--labels_csv=x.csv"])
