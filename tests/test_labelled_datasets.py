"""The label-table datasets on tiny trees in their real layouts: CheXpert (both release folders, uncertainty
policies, frontal only, the patient-disjoint test carve-out), PadChest (.csv and .csv.gz, list-literal labels
and the mapping table, BitsStored_DICOM through the reader, frontal projections, bad literals named) and a CSV of
one's own (formats, metadata forms, folds and splits by patient, fingerprinted config names, bad rows)."""

from __future__ import annotations

import ast
import json

import numpy as np
import pytest

from data_fixtures import (CHEXPERT_OBSERVATIONS, make_chexpert_tree, make_csv_tree, make_padchest_tree, pixel_value,
                           write_png)
from metachex_jax import prepare
from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.data.build import build, builders, registry
from metachex_jax.data.raw import chexpert, labelled, padchest
from metachex_jax.data.raw.common import RawDataError

RESOLUTION = 16


def build_one(dataset, manual_dir, out_dir, **kwargs):
    return build.build_dataset(dataset, manual_dir, out_dir, resolution=RESOLUTION, num_workers=1, progress=False,
                               **kwargs)


def read_all(result) -> dict[str, list[dict]]:
    return {split: [s[i] for i in range(len(s))] for split in labelled.SPLITS
            for s in [builders.data_source(result.dataset, split, result.path.parents[3],
                                           config_name=result.config_name)]}


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------------------------
# CheXpert

@pytest.mark.parametrize("release", chexpert.RELEASE_FOLDERS)
def test_chexpert_build_frontal_only_ignore_policy_and_carve_out(tmp_path, release):
    tree = make_chexpert_tree(tmp_path / "raw", release=release)
    result = build_one("chexpert", tmp_path / "raw", tmp_path / "out")
    assert result.config_name == f"r{RESOLUTION}"
    records = read_all(result)
    source = builders.data_source(result.dataset, "train", tmp_path / "out", config_name=result.config_name)
    assert source.dataset_info.metadata["label_names"] == list(CHEXPERT_OBSERVATIONS)
    rows = {r["Path"]: (table, r) for table, rs in tree.rows.items() for r in rs}
    seen = []
    for split, rs in records.items():
        for record in rs:
            table, row = rows[text(record["image_id"])]
            seen.append(text(record["image_id"]))
            assert row["Frontal/Lateral"] == "Frontal"
            assert (split == "validation") == (table == "valid")
            expected = [{"1.0": 1, "0.0": 0, "-1.0": -1, "": 0}[row[o]] for o in CHEXPERT_OBSERVATIONS]
            np.testing.assert_array_equal(record["labels"], np.array(expected, np.int8))
            assert record["labels"].dtype == np.int8
            assert record["sex_male"] == {"Male": 1, "Female": 0, "Unknown": -1}[row["Sex"]]
            assert record["view_ap"] == {"AP": 1, "PA": 0, "LL": -1}[row["AP/PA"]]
            assert record["age_valid"] == (row["Age"] != "0") and record["age"] == float(row["Age"])
            patient = text(record["image_id"]).split("/")[2]
            assert text(record["patient_id"]) == patient and record["patient_key"] == labelled.patient_key(patient)
            assert np.abs(record["image"].astype(int) - tree.values[row["Path"]]).max() <= 1  # JPEG
            assert record["bit_depth"] == 8
    frontal = {p for p, (_, r) in rows.items() if r["Frontal/Lateral"] == "Frontal"}
    assert sorted(seen) == sorted(frontal)  # no frontal image lost, no lateral kept
    patients = {s: {text(r["patient_id"]) for r in rs} for s, rs in records.items()}
    assert patients["test"] and not patients["test"] & patients["train"]
    report = result.report
    assert report["details"]["excluded_views"] == {
        f"{t} lateral": sum(r["Frontal/Lateral"] == "Lateral" for r in rs) for t, rs in tree.rows.items()}
    assert report["details"]["test_carve_out"] == {"fraction_of_train_patients": 0.1, "seed": 0,
                                                   "patients": len(patients["test"])}
    assert len(report["flags"]["unknown_sex"]) == len(report["flags"]["age_zero"]) == 1
    assert len(report["flags"]["frontal_view_unknown"]) == 1


def test_chexpert_release_folder_itself_as_manual_dir_and_views_all(tmp_path):
    tree = make_chexpert_tree(tmp_path, n_train_patients=4, n_valid_patients=1)
    raw = chexpert.load_chexpert(tree.root, views="all")
    assert len(raw.records) == sum(len(rs) for rs in tree.rows.values())
    laterals = [r for r in raw.records if r.view == "Lateral"]
    assert laterals and all(r.view_ap == -1 for r in laterals)


@pytest.mark.parametrize("policy, expected", [("ignore", -1), ("ones", 1), ("zeros", 0)])
def test_chexpert_uncertainty_policies(tmp_path, policy, expected):
    tree = make_chexpert_tree(tmp_path, n_train_patients=6)
    raw = {r.image_id: r for r in chexpert.load_chexpert(tmp_path, uncertainty=policy).records}
    mixed = {r.image_id: r for r in chexpert.load_chexpert(
        tmp_path, uncertainty=f"{policy},Atelectasis=ones,Edema=zeros").records}
    checked = 0
    for row in tree.rows["train"] + tree.rows["valid"]:
        if row["Path"] not in raw:
            continue
        for j, name in enumerate(CHEXPERT_OBSERVATIONS):
            if row[name] == "-1.0":
                checked += 1
                assert raw[row["Path"]].labels[j] == expected
                assert mixed[row["Path"]].labels[j] == {"Atelectasis": 1, "Edema": 0}.get(name, expected)
            else:
                assert raw[row["Path"]].labels[j] == {"1.0": 1, "0.0": 0, "": 0}[row[name]]
    assert checked > 10
    names = {builders.chexpert_config(RESOLUTION, uncertainty=u).name
             for u in ("ignore", "ones", "zeros", "ignore,Atelectasis=ones,Edema=ones")}
    assert names == {"r16", "r16_unc-ones", "r16_unc-zeros", "r16_unc-ignore-Edema-ones-Atelectasis-ones"}  # observation order
    with pytest.raises(ValueError, match="unknown observation 'Atelectasys'"):
        chexpert.parse_uncertainty("ignore,Atelectasys=ones")


def test_chexpert_carve_out_is_seeded_and_recorded(tmp_path):
    make_chexpert_tree(tmp_path, n_train_patients=30)
    test = {s: {r.patient_id for r in chexpert.load_chexpert(tmp_path, seed=s).split("test")} for s in (0, 0, 1)}
    again = {r.patient_id for r in chexpert.load_chexpert(tmp_path, seed=0).split("test")}
    assert len(test[0]) == 3 and test[0] == again and test[0] != test[1]
    assert builders.chexpert_config(RESOLUTION, test_fraction=0.2, seed=3).name == "r16_test0p2_seed3"


def test_chexpert_bad_rows_named_together_and_skipped(tmp_path):
    tree = make_chexpert_tree(tmp_path, n_train_patients=8)
    train = tree.rows["train"]
    last_patient = train[-1]["Path"].split("/")[2]  # gets an image in valid.csv too
    train[0]["Cardiomegaly"] = "2.0"
    train[1]["Sex"] = "M"
    train[2]["Age"] = "forty"
    train[3]["Frontal/Lateral"] = "Oblique"
    (tree.root.parent / train[4]["Path"]).unlink()
    train.append(dict(train[5]))
    valid_path = f"{tree.root.name}/valid/{last_patient}/study1/view1_frontal.jpg"
    tree.rows["valid"].append({**tree.rows["valid"][0], "Path": valid_path})
    write_png(tree.root.parent / valid_path, 7)
    tree.write_csvs()
    expected = {("unknown_label_value", train[0]["Path"]), ("bad_sex", train[1]["Path"]),
                ("bad_age", train[2]["Path"]), ("bad_view", train[3]["Path"]), ("missing_image", train[4]["Path"]),
                ("duplicate_path", train[5]["Path"])}
    expected |= {("patient_in_both_splits", r["Path"]) for r in train
                 if f"/{last_patient}/" in r["Path"] and r["Frontal/Lateral"] == "Frontal"}
    with pytest.raises(RawDataError) as error:
        chexpert.load_chexpert(tmp_path)
    assert {(p.kind, p.item) for p in error.value.problems} == expected
    for kind, item in expected:
        assert f"[{kind}] {item}:" in str(error.value)
    raw = chexpert.load_chexpert(tmp_path, skip_bad=True)
    assert not {r.image_id for r in raw.records} & {item for _, item in expected}
    assert last_patient in {r.patient_id for r in raw.split("validation")}  # its valid.csv image stays
    assert last_patient not in {r.patient_id for r in raw.records if r.split != "validation"}


# ---------------------------------------------------------------------------------------------------------------
# PadChest

def expected_padchest_labels(cell: str) -> list[int]:
    findings = {f.strip() for f in ast.literal_eval(cell)} - {""}
    return [int(any(f in findings for f in padchest.LABEL_FINDINGS[name])) for name in padchest.LABEL_NAMES]


@pytest.mark.parametrize("gz", [False, True])
def test_padchest_build_labels_bit_depths_and_frontal_projections(tmp_path, gz):
    tree = make_padchest_tree(tmp_path / "raw", gz=gz)
    result = build_one("padchest", tmp_path / "raw", tmp_path / "out")
    records = read_all(result)
    every = [r for rs in records.values() for r in rs]
    source = builders.data_source(result.dataset, "train", tmp_path / "out", config_name=result.config_name)
    assert source.dataset_info.metadata["label_names"] == list(padchest.LABEL_NAMES)
    assert list(padchest.LABEL_NAMES[:14]) == list(PATHOLOGIES)
    frontal = [r for r in tree.rows if r["Projection"] in ("PA", "AP", "AP_horizontal")]
    assert sorted(text(r["image_id"]) for r in every) == sorted(r["ImageID"] for r in frontal)
    for record in every:
        row = tree.row(text(record["image_id"]))
        np.testing.assert_array_equal(record["labels"], expected_padchest_labels(row["Labels"]))
        assert record["view_ap"] == {"PA": 0, "AP": 1, "AP_horizontal": 1}[row["Projection"]]
        assert text(record["view"]) == row["Projection"]
        # The declared depth, not the data rule (which would call 10-bit data 12-bit and darken it 4x).
        assert record["bit_depth"] == tree.bits[row["ImageID"]]
        index = tree.rows.index(row)
        assert np.all(record["image"] == pixel_value(index))
        if row["PatientBirth"]:
            assert record["age_valid"] and record["age"] == pytest.approx(
                int(row["StudyDate_DICOM"][:4]) - float(row["PatientBirth"]))
        else:
            assert not record["age_valid"]
        assert record["sex_male"] == {"M": 1, "F": 0, "O": -1, "": -1}[row["PatientSex_DICOM"]]
    assert {(d["bits"], d["source"]) for d in result.report["bit_depths"]} == {(10, "dataset metadata"),
                                                                               (12, "dataset metadata")}
    details = result.report["details"]
    assert details["excluded_projections"] == {"L": 4, "COSTAL": 4}
    kept_cells = [r["Labels"] for r in frontal]
    assert details["unmapped_findings"] == {
        name: sum(name in cell for cell in kept_cells) for name in ("COPD signs", "subcutaneous emphysema")}
    assert details["empty_strings_in_labels"] == sum("''" in cell for cell in kept_cells)
    patients = {s: {text(r["patient_id"]) for r in rs} for s, rs in records.items()}
    assert not (patients["train"] & patients["test"] or patients["train"] & patients["validation"]
                or patients["validation"] & patients["test"])


def test_padchest_bad_literals_and_values_named_and_skipped(tmp_path):
    tree = make_padchest_tree(tmp_path, n_patients=6)
    bad_cells = ["['normal'", "normal", "[1, 2]", "{'a': 1}"]
    for row, cell in zip(tree.rows, bad_cells):
        row["Labels"] = cell
    tree.rows[4]["PatientSex_DICOM"] = "X"
    tree.rows[5]["PatientBirth"] = "unknown"
    tree.rows.append(dict(tree.rows[6]))
    tree.write_csv()
    expected = {("bad_labels", r["ImageID"]) for r in tree.rows[:4]}
    expected |= {("bad_sex", tree.rows[4]["ImageID"]), ("bad_age", tree.rows[5]["ImageID"]),
                 ("duplicate_image_id", tree.rows[6]["ImageID"])}
    with pytest.raises(RawDataError) as error:
        padchest.load_padchest(tmp_path)
    assert {(p.kind, p.item) for p in error.value.problems} == expected
    for cell in bad_cells:
        assert repr(cell) in str(error.value)
    raw = padchest.load_padchest(tmp_path, skip_bad=True, views="all")
    assert {r.image_id for r in raw.records} == {r["ImageID"] for r in tree.rows} - {i for _, i in expected}


def test_padchest_empty_list_and_views_all(tmp_path):
    tree = make_padchest_tree(tmp_path, n_patients=6)
    raw = {r.image_id: r for r in padchest.load_padchest(tmp_path, views="all").records}
    assert len(raw) == len(tree.rows)
    empty = next(r for r in tree.rows if r["Labels"] == "[]")
    assert raw[empty["ImageID"]].labels == (0,) * len(padchest.LABEL_NAMES)
    lateral = next(r for r in tree.rows if r["Projection"] == "L")
    assert raw[lateral["ImageID"]].view_ap == -1


# ---------------------------------------------------------------------------------------------------------------
# CSV

def test_csv_build_round_trip_folds_splits_and_metadata_forms(tmp_path):
    tree = make_csv_tree(tmp_path / "hospital")
    result = build_one("csv", tree.root, tmp_path / "out", csv=str(tree.csv_path))
    assert result.config_name.startswith(f"labels_r{RESOLUTION}_") and len(result.config_name.split("_")[-1]) == 10
    records = read_all(result)
    every = {text(r["image_id"]): (split, r) for split, rs in records.items() for r in rs}
    assert sorted(every) == sorted(r["path"] for r in tree.rows)
    source = builders.data_source(result.dataset, "train", tmp_path / "out", config_name=result.config_name)
    assert source.dataset_info.metadata["label_names"] == ["Tuberculosis", "Cardiomegaly"]
    for row in tree.rows:
        split, record = every[row["path"]]
        np.testing.assert_array_equal(record["labels"], [int(row["Tuberculosis"]),
                                                         int(row["Cardiomegaly"] or -1)])
        assert record["sex_male"] == {"m": 1, "male": 1, "f": 0, "female": 0}.get(row["Sex"].lower(), -1)
        assert record["view_ap"] == {"pa": 0, "ap": 1}.get(row["view"].lower(), -1)
        assert record["age_valid"] == row["age"].isdigit()
        assert np.abs(record["image"].astype(int) - tree.values[row["path"]]).max() <= 1
        assert record["bit_depth"] == (12 if row["path"].endswith(".png") and tree.rows.index(row) % 3 == 2 else 8)
    by_patient = {}
    for split, record in every.values():
        by_patient.setdefault(text(record["patient_id"]), set()).add((split, int(record["fold"])))
    assert all(len(parts) == 1 for parts in by_patient.values())  # a patient's images share split and fold
    tb = {s: [int(r["labels"][0]) for r in rs] for s, rs in records.items()}
    assert all(0 < sum(v) < len(v) for v in tb.values())  # stratified: both classes in every part
    assert result.report["details"]["unknown_values"] == {"sex": {"": 3, "x": 3}, "view": {"": 4, "lateral": 4},
                                                          "age": {"abc": 1}}


def test_csv_config_names_follow_the_csv_and_every_option(tmp_path):
    tree = make_csv_tree(tmp_path, n_patients=4)
    family = registry.family("csv")
    base = family.config_name(RESOLUTION, csv=str(tree.csv_path))
    assert family.config_name(RESOLUTION, csv=str(tree.csv_path), stratify_by="Tuberculosis") == base
    others = {family.config_name(RESOLUTION, csv=str(tree.csv_path), **option) for option in (
        {"num_folds": 5}, {"seed": 1}, {"stratify_by": "Cardiomegaly"}, {"test_fraction": 0.3})}
    assert len(others | {base}) == 5
    assert family.config_name(RESOLUTION, csv=str(tree.csv_path), num_folds=5).startswith("labels_r16_k5_seed0_")
    tree.rows[0]["Tuberculosis"] = "0" if tree.rows[0]["Tuberculosis"] == "1" else "1"
    tree.write_csv()
    assert family.config_name(RESOLUTION, csv=str(tree.csv_path)) != base  # another CSV, another build
    with pytest.raises(ValueError, match="not a label column"):
        family.config_name(RESOLUTION, csv=str(tree.csv_path), stratify_by="age")


def test_csv_bad_rows_named_in_one_error_or_skipped_with_a_report(tmp_path):
    tree = make_csv_tree(tmp_path / "raw")
    rows = tree.rows
    rows[0]["Tuberculosis"] = "yes"
    rows[1]["Cardiomegaly"] = "-1"
    (tree.root / rows[2]["path"]).unlink()
    rows.append(dict(rows[3]))
    rows[4]["patient_id"] = ""
    tree.write_csv()
    (tree.root / rows[5]["path"]).write_bytes(b"not an image")
    expected = {("unknown_label_value", rows[0]["path"]), ("unknown_label_value", rows[1]["path"]),
                ("missing_image", rows[2]["path"]), ("duplicate_path", rows[3]["path"]),
                ("missing_patient_id", rows[4]["path"])}
    with pytest.raises(RawDataError) as error:
        build_one("csv", tree.root, tmp_path / "out", csv=str(tree.csv_path))
    assert {(p.kind, p.item) for p in error.value.problems} == expected
    assert "Tuberculosis='yes'" in str(error.value) and "Cardiomegaly='-1'" in str(error.value)
    report = build.verify_raw("csv", tree.root, csv=str(tree.csv_path), num_workers=1, progress=False)
    assert {(p.kind, p.item) for p in report.problems} == expected | {("undecodable_image", rows[5]["path"])}
    result = build_one("csv", tree.root, tmp_path / "out", csv=str(tree.csv_path), skip_bad=True)
    skipped = {(s["kind"], s["item"]) for s in result.report["skipped"]}
    assert skipped == expected | {("undecodable_image", rows[5]["path"])}
    kept = {text(r["image_id"]) for rs in read_all(result).values() for r in rs}
    assert kept == {r["path"] for r in rows} - {item for _, item in skipped}


def test_csv_prepare_cli_verify_and_usage_errors(tmp_path, capsys):
    tree = make_csv_tree(tmp_path, n_patients=4)
    assert prepare.main(["--dataset=csv", f"--manual_dir={tmp_path}", f"--csv={tree.csv_path}", "--verify",
                         "--workers=1"]) == 0
    out = capsys.readouterr().out
    assert "OK: no problems" in out and "Tuberculosis" in out and "patient-disjoint" in out
    assert prepare.main(["--dataset=csv", f"--manual_dir={tmp_path}", "--verify"]) == 2
    assert "--csv=FILE" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("file,label\na.png,1\n")
    assert prepare.main(["--dataset=csv", f"--manual_dir={tmp_path}", f"--csv={tmp_path / 'bad.csv'}",
                         "--verify"]) == 2
    assert "no 'path' column" in capsys.readouterr().err


def test_skip_report_records_every_build_parameter(tmp_path):
    make_padchest_tree(tmp_path / "raw", n_patients=4)
    result = build_one("padchest", tmp_path / "raw", tmp_path / "out", views="all", seed=2)
    report = json.loads((result.path / builders.SKIP_REPORT_FILE).read_text())
    assert report["build_parameters"] == {"resolution": RESOLUTION, "views": "all", "val_fraction": 0.1,
                                          "test_fraction": 0.1, "seed": 2, "bit_depth": 0, "geometry": "resize_crop"}
    assert result.config_name == "r16_all_val0p1_test0p1_seed2"
    assert report["details"]["split"] == {"val_fraction": 0.1, "test_fraction": 0.1, "seed": 2, "by": "patient"}
