"""ChestX-ray14 raw parsing: CSV variants, layouts, split lists, the patient carve-out and every bad-input case."""

from __future__ import annotations

import shutil

import pytest

from data_fixtures import make_nih_tree
from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.data.raw import nih
from metachex_jax.data.raw.common import RawDataError


def all_records(raw):
    return {r.image_name: r for split in raw.splits.values() for r in split}


@pytest.mark.parametrize("v2020,mirror", [(False, False), (True, True)])
def test_clean_copy_parses_every_field(tmp_path, v2020, mirror):
    tree = make_nih_tree(tmp_path / "ChestX-ray14", v2020=v2020, mirror_layout=mirror)
    raw = nih.load_nih(tmp_path, val_fraction=0.25, seed=0)  # manual_dir may be the parent
    assert raw.root == tree.root and raw.problems == []
    records = all_records(raw)
    assert sorted(records) == sorted(r["name"] for r in tree.rows)
    for row in tree.rows:
        record = records[row["name"]]
        names = set(row["labels"].split("|"))
        assert record.labels == tuple(int(p in names) for p in PATHOLOGIES)
        assert record.patient_id == int(row["patient_id"]) and record.follow_up == int(row["follow_up"])
        assert record.age == float(row["age"].rstrip("Y"))
        assert record.age_valid == (record.age <= 110)
        assert record.sex_male == (row["sex"] == "M") and record.view_ap == (row["view"] == "AP")
        assert record.path == str(tree.image_path(row["name"]))
    assert raw.invalid_age_names == [r["name"] for r in tree.rows if r["age"] == "412"]
    assert sorted(r.image_name for r in raw.splits["test"]) == sorted(tree.test)
    assert raw.split_list_sizes == {"train_val_list.txt": len(tree.train_val), "test_list.txt": len(tree.test)}


def test_split_lists_are_counted_by_lines_with_or_without_final_newline(tmp_path):
    tree = make_nih_tree(tmp_path)
    assert nih.read_name_list(tmp_path / "test_list.txt") == tree.test
    tree.write_lists(newline_at_end=True)
    assert nih.read_name_list(tmp_path / "test_list.txt") == tree.test


def test_validation_is_carved_by_patient_deterministically(tmp_path):
    make_nih_tree(tmp_path, n_patients=24)
    raw = nih.load_nih(tmp_path, val_fraction=0.25, seed=3)
    patients = {split: {r.patient_id for r in records} for split, records in raw.splits.items()}
    assert not patients["train"] & patients["validation"]
    assert not (patients["train"] | patients["validation"]) & patients["test"]
    train_val_patients = patients["train"] | patients["validation"]
    assert len(patients["validation"]) == round(0.25 * len(train_val_patients))
    again = nih.load_nih(tmp_path, val_fraction=0.25, seed=3)
    assert again.splits == raw.splits
    other_seed = nih.load_nih(tmp_path, val_fraction=0.25, seed=4)
    assert {r.patient_id for r in other_seed.splits["validation"]} != patients["validation"]


def expect_problems(tmp_path, expected: set[tuple[str, str]]):
    """The error names every expected item; skip_bad returns exactly these (kind, item) pairs and drops them."""
    with pytest.raises(RawDataError) as error:
        nih.load_nih(tmp_path)
    for kind, item in expected:
        assert f"[{kind}] {item}:" in str(error.value)
    assert {(p.kind, p.item) for p in error.value.problems} == expected
    raw = nih.load_nih(tmp_path, skip_bad=True)
    assert {(p.kind, p.item) for p in raw.problems} == expected
    assert not {item for _, item in expected} & set(all_records(raw))
    return raw


def test_unknown_label(tmp_path):
    tree = make_nih_tree(tmp_path)
    tree.rows[1]["labels"] = "Infiltrate"  # the BBox file's spelling, not the CSV's
    tree.rows[4]["labels"] = "Mass|Covid"
    tree.write_csv()
    expect_problems(tmp_path, {("unknown_label", tree.rows[1]["name"]), ("unknown_label", tree.rows[4]["name"])})


def test_bad_age_sex_and_view(tmp_path):
    tree = make_nih_tree(tmp_path)
    tree.rows[0]["age"] = "abc"
    tree.rows[2]["age"] = ""
    tree.rows[3]["sex"] = "X"
    tree.rows[6]["view"] = "LL"
    tree.rows[7]["sex"] = "U"
    tree.rows[7]["view"] = "?"
    tree.write_csv()
    names = [r["name"] for r in tree.rows]
    raw = expect_problems(tmp_path, {("bad_age", names[0]), ("bad_age", names[2]), ("bad_sex", names[3]),
                                     ("bad_view", names[6]), ("bad_sex", names[7]), ("bad_view", names[7])})
    assert len(all_records(raw)) == len(tree.rows) - 5


def test_duplicate_csv_rows_and_duplicate_image_files(tmp_path):
    tree = make_nih_tree(tmp_path)
    tree.rows.append(dict(tree.rows[2]))
    tree.write_csv()
    duplicate_file = tree.rows[5]["name"]
    (tmp_path / "images_002" / "images").mkdir(parents=True)
    shutil.copy(tree.image_path(duplicate_file), tmp_path / "images_002" / "images" / duplicate_file)
    expect_problems(tmp_path, {("duplicate_csv_row", tree.rows[2]["name"]), ("duplicate_image_file", duplicate_file)})


def test_split_list_naming_images_absent_from_the_csv(tmp_path):
    tree = make_nih_tree(tmp_path)
    tree.train_val.append("99999999_000.png")
    tree.test.append("88888888_001.png")
    tree.write_lists()
    expect_problems(tmp_path, {("split_name_not_in_csv", "99999999_000.png"),
                               ("split_name_not_in_csv", "88888888_001.png")})


def test_missing_and_unlisted_images(tmp_path):
    tree = make_nih_tree(tmp_path)
    missing = [tree.rows[0]["name"], tree.rows[9]["name"]]
    for name in missing:
        tree.image_path(name).unlink()
    shutil.copy(tree.image_path(tree.rows[1]["name"]), tmp_path / "images" / "77777777_000.png")
    expect_problems(tmp_path, {("missing_image", missing[0]), ("missing_image", missing[1]),
                               ("unlisted_image", "images/77777777_000.png")})


def test_rows_outside_the_split_lists_and_patients_in_both_splits(tmp_path):
    tree = make_nih_tree(tmp_path)
    left_out = tree.train_val.pop(0)
    test_patient_name = tree.test[0]
    moved = next(r["name"] for r in tree.rows if r["patient_id"] == tree.row(test_patient_name)["patient_id"]
                 and r["name"] != test_patient_name)
    tree.test.remove(moved)
    tree.train_val.append(moved)  # same patient now on both sides
    tree.write_lists()
    raw = expect_problems(tmp_path, {("not_in_split_list", left_out), ("patient_in_both_splits", moved)})
    assert test_patient_name in {r.image_name for r in raw.splits["test"]}  # the test set stays whole


def test_many_kinds_are_reported_together_in_one_error(tmp_path):
    tree = make_nih_tree(tmp_path)
    tree.rows[0]["labels"] = "Nope"
    tree.rows[1]["age"] = "forty"
    tree.write_csv()
    tree.image_path(tree.rows[2]["name"]).unlink()
    with pytest.raises(RawDataError) as error:
        nih.load_nih(tmp_path)
    message = str(error.value)
    assert "3 problem(s)" in message
    for name in (tree.rows[0]["name"], tree.rows[1]["name"], tree.rows[2]["name"]):
        assert name in message


def test_missing_metadata_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Data_Entry_2017"):
        nih.load_nih(tmp_path)
    make_nih_tree(tmp_path)
    (tmp_path / "test_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test_list.txt"):
        nih.load_nih(tmp_path)


def litter_like_a_mac_and_windows(root, image_names):
    """What copies pick up on the way: AppleDouble forks (also as __MACOSX/ from a zip), Finder and Trash files,
    Windows thumbnail databases. Their bytes are not PNGs, and some carry NIH-like image names."""
    images = root / "images"
    for name in image_names:
        (images / f"._{name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (root / "__MACOSX" / "images").mkdir(parents=True)
    (root / "__MACOSX" / "images" / f"._{image_names[0]}").write_bytes(b"\x00\x05\x16\x07")
    (images / ".DS_Store").write_bytes(b"Bud1")
    (root / ".Trash-1000" / "files").mkdir(parents=True)
    (root / ".Trash-1000" / "files" / "99999999_000.png").write_bytes(b"deleted")
    (images / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    return {"appledouble": len(image_names) + 1, "hidden": 2, "thumbnail_database": 1}


def test_files_that_are_not_images_of_the_dataset_are_ignored_and_counted(tmp_path):
    tree = make_nih_tree(tmp_path)
    counts = litter_like_a_mac_and_windows(tmp_path, [tree.rows[0]["name"], tree.rows[1]["name"]])
    raw = nih.load_nih(tmp_path)  # no problem raised
    assert not raw.problems and len(all_records(raw)) == len(tree.rows)
    assert {kind: len(paths) for kind, paths in raw.ignored_files.items()} == counts
    assert f"images/._{tree.rows[0]['name']}" in raw.ignored_files["appledouble"]
    assert raw.ignored_files["thumbnail_database"] == ["images/Thumbs.db"]
    notes = "\n".join(nih.verify(tmp_path).notes)
    assert "ignored, not images of the dataset: 3 appledouble (e.g. " in notes and "2 hidden" in notes
    # A real image nobody listed stays a problem, NIH-named or not.
    shutil.copy(tree.image_path(tree.rows[1]["name"]), tmp_path / "images" / "88888888_000.png")
    shutil.copy(tree.image_path(tree.rows[1]["name"]), tmp_path / "images" / "scan.png")
    expect_problems(tmp_path, {("unlisted_image", "images/88888888_000.png"), ("unlisted_image", "images/scan.png")})
