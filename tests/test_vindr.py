"""VinDr-CXR on tiny trees in both layouts (PhysioNet 1.0.0 and Kaggle VinBigData; tests/dataset_trees.py), record by
record: three readers combined by majority or any, the test set's consensus with `Other disease`, DICOMs of 10-16
bits (MONOCHROME1, JPEG 2000, implicit VR) read back to the planted values, sex and age from the header (missing,
unparseable and 'O' masked), Fleiss' kappa against a brute-force definition, statsmodels and a published example,
boxes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from statsmodels.stats import inter_rater

from dataset_trees import KAGGLE_CLASSES, VINDR_GLOBAL_TEST, make_kaggle_vindr_tree, make_vindr_tree
from metachex_jax.data.build import build, builders, registry
from metachex_jax.data.raw import labelled, vindr
from metachex_jax.data.raw.common import RawDataError

RESOLUTION = 16
NAMES = vindr.LABEL_NAMES


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def combined(readers: dict[str, list[str]], rule: str, known=NAMES) -> list[int]:
    """The expected labels of a training image, from its readers' positive labels (written independently of the
    reader's vectorised rule)."""
    votes = {name: sum(name in positives for positives in readers.values()) for name in NAMES}
    if rule == "majority":
        out = {name: int(votes[name] * 2 > len(readers)) for name in NAMES}
        if out["No finding"]:
            out = {name: int(name == "No finding") for name in NAMES}
    else:
        out = {name: int(votes[name] > 0) for name in NAMES}
        out["No finding"] = int(not any(v for n, v in out.items() if n != "No finding" and n in known))
    return [out[name] if name in known else -1 for name in NAMES]


def expected_sex_age(tags: dict) -> tuple[int, bool, float]:
    sex = {"M": 1, "F": 0}.get(tags.get("PatientSex", ""), -1)
    age = tags.get("PatientAge", "")
    valid = len(age) == 4 and age[:3].isdigit() and age.endswith("Y")
    return sex, valid, float(age[:3]) if valid else 0.0


def read_records(result) -> dict[str, tuple[str, dict]]:
    data_dir = result.path.parents[3]
    return {text(r["image_id"]): (split, r) for split in labelled.SPLITS
            for s in [builders.data_source(result.dataset, split, data_dir, config_name=result.config_name)]
            for r in (s[i] for i in range(len(s)))}


@pytest.fixture(scope="module")
def physionet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vindr")
    tree = make_vindr_tree(tmp / "vindr-cxr" / "1.0.0")
    result = build.build_dataset("vindr", tree.root, tmp / "out", resolution=RESOLUTION, num_workers=1,
                                 progress=False)
    return tree, result


def test_physionet_build_record_by_record(physionet):
    tree, result = physionet
    records = read_records(result)
    assert sorted(records) == sorted([*tree.train, *tree.test])
    for image, (split, record) in records.items():
        if image in tree.test:
            assert split == "test"
            spelled = [{"Other disease": "Other diseases"}.get(p, p) for p in tree.test[image]]
            expected = [int(name in spelled) for name in NAMES]
        else:
            assert split in ("train", "validation")
            expected = combined(tree.train[image], "majority")
        np.testing.assert_array_equal(record["labels"], expected, err_msg=image)
        assert np.all(record["image"] == tree.values[image]), image  # every depth, photometry and syntax
        sex, valid, age = expected_sex_age(tree.tags[image])
        assert (record["sex_male"], record["age_valid"], record["age"]) == (sex, valid, age)
        assert record["view_ap"] == -1
    assert {d["bits"] for d in result.report["bit_depths"]} == {10, 12, 14, 16}
    flags = result.report["flags"]
    ids = list(tree.values)
    assert flags["missing_age"] == sorted([ids[2], ids[3]]) and flags["unparseable_age"] == [ids[5]]
    assert flags["unknown_sex"] == sorted([ids[3], ids[7]])
    assert flags["readers_not_3"] == []
    assert "Other disease" in VINDR_GLOBAL_TEST  # the test file's spelling was read as Other diseases
    details = result.report["details"]
    assert details["layout"] == "physionet" and details["readers_per_training_image"] == {"3": 6}
    assert "masked sex / age" in result.format() and "Fleiss" not in result.format()  # kappa is in the report


def test_label_rule_any(physionet):
    tree, _ = physionet
    raw = {r.image_id: r for r in vindr.load_vindr(tree.root, label_rule="any").records}
    for image, readers in tree.train.items():
        assert list(raw[image].labels) == combined(readers, "any"), image
    assert registry.family("vindr").config_name(RESOLUTION, label_rule="any") == "r16_rule-any"


def brute_force_kappa(ratings: np.ndarray) -> float:
    """Fleiss' kappa from its definition: agreement = the share of ordered pairs of distinct raters who agree, per
    subject; chance = the agreement of raters drawing categories at the pooled rates."""
    n_subjects, n_raters = ratings.shape
    agree = [np.mean([a == b for a, b in itertools.permutations(row, 2)]) for row in ratings]
    categories = sorted(set(ratings.ravel().tolist()))
    chance = sum((np.sum(ratings == c) / ratings.size) ** 2 for c in categories)
    return (np.mean(agree) - chance) / (1 - chance)


def test_fleiss_kappa_against_its_definition_and_a_published_example(physionet):
    # Fleiss (1971) as tabulated on Wikipedia: 10 subjects, 14 raters, 5 categories, kappa 0.210.
    table = np.array([[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                      [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]])
    assert vindr.fleiss_kappa(table) == pytest.approx(0.210, abs=5e-4)
    assert vindr.fleiss_kappa(table) == pytest.approx(inter_rater.fleiss_kappa(table), abs=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ratings = (rng.random((int(rng.integers(3, 30)), 3)) < rng.random()).astype(int)
        if len(set(ratings.ravel().tolist())) < 2:
            continue
        counts = np.stack([(ratings == 0).sum(1), (ratings == 1).sum(1)], axis=1)
        assert vindr.fleiss_kappa(counts) == pytest.approx(brute_force_kappa(ratings), abs=1e-12)
        assert vindr.fleiss_kappa(counts) == pytest.approx(inter_rater.fleiss_kappa(counts), abs=1e-12)
    tree, result = physionet
    kappa = result.report["details"]["fleiss_kappa"]
    readers = list(tree.train.values())
    for name in ("Cardiomegaly", "Tuberculosis", "No finding", "Pleural effusion"):
        ratings = np.array([[int(name in p) for p in r.values()] for r in readers])
        assert kappa[name] == pytest.approx(brute_force_kappa(ratings), abs=1e-4), name
    assert kappa["Rib fracture"] is None  # nobody marked it: undefined


def test_boxes_merged_per_image_and_finding(physionet):
    tree, _ = physionet
    boxes = vindr.read_boxes(tree.root)
    assert boxes.problems == []
    for row in tree.boxes:
        if row["x_min"] == "":
            continue
        merged = boxes.boxes[row["image_id"]][row["class_name"]]
        box = (row["x_min"], row["y_min"], row["x_max"] - row["x_min"], row["y_max"] - row["y_min"])
        assert box in merged
        assert boxes.split[row["image_id"]] == row["split"]
    cardiomegaly = next(i for i, r in tree.train.items() if "Cardiomegaly" in r["R8"])
    assert len(boxes.boxes[cardiomegaly]["Cardiomegaly"]) == 2  # two readers' boxes, one finding


def test_bad_rows_named_together(tmp_path):
    tree = make_vindr_tree(tmp_path)
    labels = tree.root / "annotations" / "image_labels_train.csv"
    lines = labels.read_text().splitlines()
    first = lines[1].split(",")
    first[5] = "2"  # a label value that is neither 1 nor 0
    lines[1] = ",".join(first)
    lines.append(lines[2])  # the same image and reader twice
    labels.write_text("\n".join(lines) + "\n")
    missing = next(iter(tree.test))
    (tree.root / "test" / f"{missing}.dicom").unlink()
    stray = tree.root / "train" / ("f" * 32 + ".dicom")
    stray.write_bytes((tree.root / "train" / f"{next(iter(tree.train))}.dicom").read_bytes())
    image_1, image_2 = lines[1].split(",")[0], lines[2].split(",")[0]
    expected = {("unknown_label_value", image_1), ("duplicate_reader_row", image_2), ("missing_image", missing),
                ("unlisted_image", "f" * 32)}
    with pytest.raises(RawDataError) as error:
        vindr.load_vindr(tree.root)
    assert {(p.kind, p.item) for p in error.value.problems} == expected
    raw = vindr.load_vindr(tree.root, skip_bad=True)  # an image with a bad reader row goes as a whole
    assert {r.image_id for r in raw.records} == (set(tree.train) | set(tree.test)) - {image_1, image_2, missing}


def test_kaggle_layout_detected_and_split_by_image(tmp_path):
    tree = make_kaggle_vindr_tree(tmp_path / "vinbigdata")
    result = build.build_dataset("vindr", tree.root, tmp_path / "out", resolution=RESOLUTION, num_workers=1,
                                 progress=False)
    records = read_records(result)
    assert sorted(records) == sorted(tree.readers)
    known = set(KAGGLE_CLASSES)
    for image, (split, record) in records.items():
        np.testing.assert_array_equal(record["labels"], combined(tree.readers[image], "majority", known), image)
        assert np.all(record["image"] == tree.values[image])
        index = list(tree.values).index(image)  # the order the tree wrote them in
        assert (record["age"], record["age_valid"], record["sex_male"]) == (40 + index, True, index % 2)
    assert {s for s, _ in records.values()} == set(labelled.SPLITS)
    assert result.report["details"]["layout"] == "kaggle"
    assert result.report["details"]["counts"]["Kaggle test images (no labels, left out)"] == 1
    again = {r.image_id: r.split for r in vindr.load_vindr(tree.root).records}
    assert again == {i: s for i, (s, _) in records.items()}  # seeded
    rows = (tree.root / "train.csv").read_text().splitlines()
    rows[1] = rows[1].replace(",0,", ",3,", 1) if ",0," in rows[1] else rows[1].replace(",14,", ",2,", 1)
    (tree.root / "train.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(RawDataError, match="bad_class"):
        vindr.load_vindr(tree.root)


def test_verify_counts_and_kappa_notes(physionet):
    tree, _ = physionet
    report = build.verify_raw("vindr", tree.root, num_workers=1, progress=False)
    assert report.ok, report.format()
    out = report.format()
    assert "train_label_rows: 45,000 expected, 18 found" in out and "test_images: 3,000 expected, 3 found" in out
    assert "Fleiss' kappa per label" in out and "layout: physionet" in out
