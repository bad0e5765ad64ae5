"""MIMIC-CXR-JPG and MIMIC-CXR (DICOM) on tiny trees in the release layout (tests/dataset_trees.py), checked record
by record: study labels on every image of the study, a study without a label row masked, views (the empty one
counted), sex and age from MIMIC-IV (the 91 group masked), the official split with `validate`, the DICOM release
read through the JPG release's CSVs, bad rows named together, the radiologist test file's spellings."""

from __future__ import annotations

import numpy as np
import pytest

from dataset_trees import MIMIC_PATIENTS, make_mimic_tree, write_csv
from metachex_jax.data.build import build, builders, registry
from metachex_jax.data.raw import labelled, mimic
from metachex_jax.data.raw.common import RawDataError

RESOLUTION = 16
VALUES = {"1.0": 1, "0.0": 0, "-1.0": -1, "": 0}


def read_all(result) -> dict[str, list[dict]]:
    data_dir = result.path.parents[3]
    return {split: [s[i] for i in range(len(s))] for split in labelled.SPLITS
            for s in [builders.data_source(result.dataset, split, data_dir, config_name=result.config_name)]}


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def expected_labels(tree, study: str, policy: str = "ignore", labeler: str = "chexpert") -> list[int]:
    """The study's row, by CheXpert's names, in the reader's label order (-1 everywhere without a row)."""
    row = (tree.labels if labeler == "chexpert" else tree.negbio).get(study)
    if row is None:
        return [-1] * len(mimic.OBSERVATIONS)
    uncertain = {"ignore": -1, "ones": 1, "zeros": 0}[policy]
    return [uncertain if row[name] == "-1.0" else VALUES[row[name]] for name in mimic.OBSERVATIONS]


def expected_age(image: dict) -> tuple[bool, float]:
    patient = MIMIC_PATIENTS.get(image["subject"])
    if patient is None or patient[1] == 91:
        return False, 0.0
    return True, float(patient[1] + int(image["date"][:4]) - patient[2])


@pytest.fixture(scope="module")
def jpg_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mimic")
    tree = make_mimic_tree(tmp / "mimic-cxr-jpg" / "2.1.0")
    result = build.build_dataset("mimic", tree.root, tmp / "out", resolution=RESOLUTION, num_workers=1,
                                 progress=False, patients_csv=str(tree.patients_csv))
    return tree, result


def test_jpg_build_record_by_record(jpg_build):
    tree, result = jpg_build
    records = read_all(result)
    source = builders.data_source(result.dataset, "train", result.path.parents[3], config_name=result.config_name)
    assert source.dataset_info.metadata["label_names"] == list(mimic.OBSERVATIONS)
    frontal = [i for i in tree.images if i["view"] in ("PA", "AP")]
    seen = {}
    for split, rs in records.items():
        for record in rs:
            seen[text(record["image_id"])] = (split, record)
    assert sorted(seen) == sorted(i["path"] for i in frontal)  # laterals, LL, AP AXIAL and the empty view left out
    for image in frontal:
        split, record = seen[image["path"]]
        assert split == {"train": "train", "validate": "validation", "test": "test"}[image["split"]]
        np.testing.assert_array_equal(record["labels"], expected_labels(tree, image["study"]))
        assert text(record["patient_id"]) == image["subject"]
        assert record["view_ap"] == {"PA": 0, "AP": 1}[image["view"]] and text(record["view"]) == image["view"]
        valid, age = expected_age(image)
        assert record["age_valid"] == valid and record["age"] == pytest.approx(age)
        patient = MIMIC_PATIENTS.get(image["subject"])
        assert record["sex_male"] == ({"M": 1, "F": 0}[patient[0]] if patient else -1)
        assert np.abs(record["image"].astype(int) - image["value"]).max() <= 1  # JPEG
    report = result.report
    assert report["details"]["excluded_views"] == {"LATERAL": 1, "(empty)": 1, "AP AXIAL": 1, "LL": 1}
    unlabelled = [i["path"] for i in frontal if i["study"] not in tree.labels]
    assert report["flags"]["no_label_row"] == unlabelled and len(unlabelled) == 1
    assert report["details"]["studies_without_label_row"] == {"studies": 1, "images": 1}
    assert report["flags"]["age_91_or_older"] == [i["path"] for i in frontal if i["subject"] == "12000022"]
    assert report["flags"]["not_in_patients"] == [i["path"] for i in frontal if i["subject"] == "19999987"]
    assert report["details"]["counts"]["images per split"] == {"train": 5, "validation": 1, "test": 2}
    assert "studies without a label row (every label masked)" in result.format()


def test_views_uncertainty_labeler_and_no_patients_file(tmp_path):
    tree = make_mimic_tree(tmp_path / "mimic", gz=False)  # the unpacked .csv files
    raw = mimic.load_mimic(tree.root, views="all", uncertainty="ones", labeler="negbio")
    assert sorted(r.image_id for r in raw.records) == sorted(i["path"] for i in tree.images)
    for record in raw.records:
        image = next(i for i in tree.images if i["path"] == record.image_id)
        assert list(record.labels) == expected_labels(tree, image["study"], "ones", "negbio")
        assert record.view == image["view"] and record.view_ap == {"PA": 0, "AP": 1}.get(image["view"], -1)
        assert (record.sex_male, record.age_valid) == (-1, False)  # no MIMIC-IV file: masked
    assert "none given" in raw.details["age_sex_source"]
    chosen = mimic.load_mimic(tree.root, views="PA+blank")
    assert sorted(r.view for r in chosen.records) == sorted(i["view"] for i in tree.images if i["view"] in ("PA", ""))
    family = registry.family("mimic")
    assert family.config_name(RESOLUTION) == "r16"
    assert family.config_name(RESOLUTION, views="PA+AP+LATERAL", labeler="negbio") == "r16_views-pa-ap-lateral_negbio"
    with pytest.raises(ValueError, match="labeler='chexbert'"):
        family.config_name(RESOLUTION, labeler="chexbert")


def test_dicom_release_reads_the_jpg_csvs_by_dicom_id(tmp_path):
    tree = make_mimic_tree(tmp_path / "mimic-cxr" / "2.0.0", dicom=True)
    with pytest.raises(FileNotFoundError, match="--csv_dir"):
        mimic.load_mimic(tree.root)
    result = build.build_dataset("mimic", tree.root, tmp_path / "out", resolution=RESOLUTION, num_workers=1,
                                 progress=False, csv_dir=str(tree.csv_dir))
    records = {text(r["image_id"]): r for rs in read_all(result).values() for r in rs}
    frontal = [i for i in tree.images if i["view"] in ("PA", "AP")]
    assert sorted(records) == sorted(i["path"] for i in frontal)
    for image in frontal:  # MONOCHROME1 files inverted, 12-bit data scaled: the planted 8-bit value comes back
        assert np.all(records[image["path"]]["image"] == image["value"])
        assert records[image["path"]]["bit_depth"] == 12
    assert result.report["details"]["release"] == {"MIMIC-CXR (DICOM)": len(frontal)}


def test_bad_rows_named_together_and_skipped(tmp_path):
    tree = make_mimic_tree(tmp_path / "mimic")
    gone = tree.images[0]
    (tree.root / gone["path"]).unlink()
    unlisted = tree.root / "files/p10/p10000032/s50000001/00000000-00000000-00000000-00000000-00000000.jpg"
    unlisted.write_bytes((tree.root / tree.images[1]["path"]).read_bytes())
    tree.labels["50000002"]["Edema"] = "2.0"
    orphan = dict(tree.images[3])
    tree.images.append({**orphan, "dicom_id": "ffffffff-ffffffff-ffffffff-ffffffff-ffffffff"})  # no split, no file
    tree.write_csvs()
    split_file = tree.root / "mimic-cxr-2.0.0-split.csv.gz"
    rows = [[i["dicom_id"], i["study"], i["subject"], "val" if n == 4 else i["split"]]
            for n, i in enumerate(tree.images[:-1])]
    write_csv(split_file, ("dicom_id", "study_id", "subject_id", "split"), rows, gz=True)
    expected = {("missing_image", gone["dicom_id"]), ("unlisted_image", str(unlisted.relative_to(tree.root))),
                ("unknown_label_value", "study 50000002"), ("missing_split", tree.images[-1]["dicom_id"]),
                ("bad_split", tree.images[4]["dicom_id"]), ("missing_image", tree.images[-1]["dicom_id"])}
    with pytest.raises(RawDataError) as error:
        mimic.load_mimic(tree.root)
    assert {(p.kind, p.item) for p in error.value.problems} == expected
    assert "Edema='2.0'" in str(error.value) and "split 'val'" in str(error.value)
    raw = mimic.load_mimic(tree.root, skip_bad=True)
    kept = {r.image_id for r in raw.records}
    assert gone["path"] not in kept and tree.images[4]["path"] not in kept
    assert all(r.labels == (-1,) * 14 for r in raw.records if "/s50000002/" in r.image_id)  # its row was bad


@pytest.mark.parametrize("no_finding", ["No Finding", "No Findings"])
def test_radiologist_test_labels_accept_both_spellings(tmp_path, no_finding):
    header = ["study_id", *(no_finding if n == "No Finding" else "Airspace Opacity" if n == "Lung Opacity" else n
                            for n in mimic.OBSERVATIONS)]
    rows = [["50000005", *("1.0" if n in ("Airspace Opacity", "Edema") else "" for n in header[1:])],
            ["50000006", *("1.0" if n == no_finding else "0.0" for n in header[1:])]]
    rows[0][header.index("Cardiomegaly")] = "-1.0"  # uncertain, if any: unknown
    path = write_csv(tmp_path / "mimic-cxr-2.1.0-test-set-labeled.csv", header, rows)
    labels, info = mimic.read_test_labels(path)
    opacity, nothing = mimic.OBSERVATIONS.index("Lung Opacity"), mimic.OBSERVATIONS.index("No Finding")
    assert labels["50000005"][opacity] == 1 and labels["50000005"][mimic.OBSERVATIONS.index("Edema")] == 1
    assert labels["50000005"][mimic.OBSERVATIONS.index("Cardiomegaly")] == labelled.UNKNOWN
    assert labels["50000005"].count(1) == 2 and labels["50000005"].count(0) == 11
    assert labels["50000006"][nothing] == 1 and sum(labels["50000006"]) == 1
    assert info["columns"]["Lung Opacity"] == "Airspace Opacity"
    rows[1][header.index("Airspace Opacity")] = "yes"
    write_csv(path, header, rows)
    with pytest.raises(RawDataError, match="study 50000006.*Airspace Opacity='yes'"):  # the file's spelling
        mimic.read_test_labels(path)


def test_verify_notes_counts_and_splits(jpg_build):
    tree, _ = jpg_build
    report = build.verify_raw("mimic", tree.root, num_workers=1, progress=False, patients_csv=str(tree.patients_csv))
    assert report.ok, report.format()
    text_ = report.format()
    assert f"images: 377,110 expected, {len(tree.images)} found" in text_
    assert "studies: 227,835 expected, 8 found" in text_ and "patient-disjoint" in text_
    assert "recalled, not verified" in text_
