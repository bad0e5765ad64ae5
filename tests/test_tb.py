"""Shenzhen / Montgomery raw parsing: readings, flags, label disagreement, folds and the default split."""

from __future__ import annotations

from collections import Counter

import pytest

from data_fixtures import make_tb_tree
from metachex_jax.data.raw import tb
from metachex_jax.data.raw.common import RawDataError


@pytest.mark.parametrize("line,sex,age", [
    ("male 35yrs", 1, 35.0),
    ("female  45yrs", 0, 45.0),
    ("FEMALE 45 yrs", 0, 45.0),
    ("Male, 6 months", 1, 0.5),
    ("female 73days", 0, 73 / 365.25),
    ("male35yrs", 1, 35.0),
    ("female 1yrs", 0, 1.0),  # verbatim forms from the real Shenzhen readings
    ("femal 32yrs", 0, 32.0),
    ("male 16month", 1, 16 / 12),
    ("male 35", 1, None),  # no unit: unparseable, not guessed
    ("unknown 35yrs", -1, 35.0),
    ("", -1, None),
])
def test_shenzhen_first_line(line, sex, age):
    parsed_sex, parsed_age, reading = tb.parse_shenzhen_reading(f"{line}\nnormal\n")
    assert parsed_sex == sex and reading == "normal"
    assert parsed_age == pytest.approx(age) if age is not None else parsed_age is None


@pytest.mark.parametrize("text,sex,age", [
    ("Patient's Sex: M\nPatient's Age: 035Y\nnormal", 1, 35.0),
    ("Patient's Sex: F \nPatient's Age: 027Y\nnormal", 0, 27.0),  # verbatim, trailing space included
    ("Patient's Sex: F\nPatient's Age: 018M\nnormal", 0, 1.5),
    ("Patient's Sex: O\nPatient's Age: 0XXY\nnormal", -1, None),
])
def test_montgomery_fields(text, sex, age):
    parsed_sex, parsed_age, reading = tb.parse_montgomery_reading(text)
    assert parsed_sex == sex and reading == "normal"
    assert parsed_age == pytest.approx(age) if age is not None else parsed_age is None


@pytest.mark.parametrize("dataset", ["shenzhen", "montgomery"])
def test_clean_copy_parses_labels_and_readings(tmp_path, dataset):
    tree = make_tb_tree(tmp_path, dataset)
    raw = tb.load_tb(tmp_path, dataset, num_folds=4)
    assert raw.problems == [] and raw.root == tree.root
    assert [r.image_id for r in raw.records] == sorted(tree.values)
    for index, record in enumerate(raw.records):
        assert record.tb == int(record.image_id[-1])
        assert record.sex_male == int(index % 2 == 0)
        assert record.age == 20 + (index * 7) % 60 and record.age_valid
        assert record.reading == tree.readings[record.image_id].splitlines()[-1]
    assert all(not ids for ids in raw.flags.values())


def test_unparseable_readings_are_flagged_not_guessed(tmp_path):
    tree = make_tb_tree(tmp_path, "shenzhen")
    ids = sorted(tree.values)
    tree.write_reading(ids[0], "patient 35\nnormal\n")  # neither sex nor age
    tree.write_reading(ids[1], "female ??\nnormal\n")  # sex only
    tree.write_reading(ids[2], "male 300yrs\nnormal\n")  # implausible age
    tree.reading_path(ids[3]).unlink()
    raw = tb.load_tb(tmp_path, "shenzhen")
    assert raw.flags == {"unknown_sex": [ids[0], ids[3]], "invalid_age": ids[:4], "missing_reading": [ids[3]],
                         "tb_mention_in_normal": []}
    records = {r.image_id: r for r in raw.records}
    assert records[ids[0]].sex_male == -1 and records[ids[0]].age == 0.0 and not records[ids[0]].age_valid
    assert records[ids[1]].sex_male == 0 and not records[ids[1]].age_valid
    assert records[ids[2]].age == 300.0 and not records[ids[2]].age_valid
    assert len(raw.records) == len(ids)  # flags never drop an image


@pytest.mark.parametrize("dataset", ["shenzhen", "montgomery"])
def test_tb_image_read_as_normal_is_an_error_or_skipped(tmp_path, dataset):
    tree = make_tb_tree(tmp_path, dataset)
    tb_id = sorted(i for i in tree.values if i.endswith("_1"))[2]
    header = "\n".join(tree.readings[tb_id].splitlines()[:-1])
    tree.write_reading(tb_id, header + "\nNormal.\n")
    with pytest.raises(RawDataError) as error:
        tb.load_tb(tmp_path, dataset)
    assert f"[label_disagreement] {tb_id}:" in str(error.value)
    raw = tb.load_tb(tmp_path, dataset, skip_bad=True)
    assert {(p.kind, p.item) for p in raw.problems} == {("label_disagreement", tb_id)}
    assert tb_id not in {r.image_id for r in raw.records}


@pytest.mark.parametrize("dataset", ["shenzhen", "montgomery"])
def test_tb_mention_in_a_normal_reading_is_a_flag_with_its_text(tmp_path, dataset):
    tree = make_tb_tree(tmp_path, dataset)
    normal_ids = sorted(i for i in tree.values if i.endswith("_0"))
    texts = {normal_ids[1]: "calcified granuloma; old tuberculosis",
             normal_ids[2]: "TB is not seen",  # negated after the word: nothing to flag
             normal_ids[3]: "no evidence of active TB"}
    for image_id, text in texts.items():
        header = "\n".join(tree.readings[image_id].splitlines()[:-1])
        tree.write_reading(image_id, f"{header}\n{text}\n")
    raw = tb.load_tb(tmp_path, dataset)  # no error
    assert raw.problems == [] and len(raw.records) == len(tree.values)
    assert raw.flags["tb_mention_in_normal"] == [normal_ids[1]]
    assert raw.flag_details == {"tb_mention_in_normal": {normal_ids[1]: texts[normal_ids[1]]}}


# Findings of TB-labelled images, verbatim from the real sets, and TB mentions in normal ones.
@pytest.mark.parametrize("reading,tb_label,contradicts", [
    ("normal", 1, True),
    ("Normal.", 1, True),
    (" normal \n", 1, True),
    ("normal", 0, False),
    ("STB", 1, False),
    ("PTB in the left upper field", 1, False),
    ("secondary PTB  in the right upper field", 1, False),
    ("bilateral PTB ?right pleurisy with pleural effusion", 1, False),
    ("1.secondary PTB ...; 2.small tuberculoma; 3.right pleural thickening and adhesions", 1, False),
    ("right upper pneumonia", 1, False),
    ("", 1, False),
    ("PTB in the left upper field", 0, False),  # a flag (mentions_tb), never a contradiction
    ("calcified granuloma; old tuberculosis", 0, False),
])
def test_reading_label_agreement_rule(reading, tb_label, contradicts):
    assert tb.reading_contradicts_label(reading, tb_label) is contradicts


@pytest.mark.parametrize("reading,mentions", [
    ("STB", True),
    ("PTB in the left upper field", True),
    ("secondary PTB  in the right upper field", True),
    ("bilateral PTB ?right pleurisy with pleural effusion", True),
    ("1.secondary PTB ...; 2.small tuberculoma; 3.right pleural thickening and adhesions", True),
    ("old healed TB in the right apex", True),
    ("calcified granuloma; old tuberculosis", True),
    ("no active TB; old healed TB", True),  # the second clause affirms it
    ("TB cannot be excluded", True),
    ("TB not excluded", True),
    ("TB is not seen", False),
    ("TB not seen", False),
    ("tuberculosis: negative", False),
    ("no evidence of active TB", False),
    ("clear lungs, negative for tuberculosis", False),
    ("right upper pneumonia", False),
    ("normal", False),
    ("stable appearance", False),  # "stb" only as a word
])
def test_mentions_tb(reading, mentions):
    assert tb.mentions_tb(reading) is mentions


def test_bad_names_duplicates_and_orphan_readings(tmp_path):
    tree = make_tb_tree(tmp_path, "montgomery")
    (tree.root / "CXR_png" / "MCUCXR_0001_1.png").write_bytes(tree.image_path("MCUCXR_0001_0").read_bytes())
    (tree.root / "CXR_png" / "scan 7.png").write_bytes(b"")
    (tree.root / "ClinicalReadings" / "MCUCXR_0999_0.txt").write_text("Patient's Sex: M\n")
    with pytest.raises(RawDataError) as error:
        tb.load_tb(tmp_path, "montgomery")
    expected = {("duplicate_image_id", "MCUCXR_0001_0"), ("duplicate_image_id", "MCUCXR_0001_1"),
                ("bad_file_name", "CXR_png/scan 7.png"),
                ("reading_without_image", "ClinicalReadings/MCUCXR_0999_0.txt")}
    assert {(p.kind, p.item) for p in error.value.problems} == expected
    for _, item in expected:
        assert item in str(error.value)


def test_folds_are_stratified_balanced_and_deterministic(tmp_path):
    make_tb_tree(tmp_path, "shenzhen", n_normal=23, n_tb=17)
    raw = tb.load_tb(tmp_path, "shenzhen", num_folds=5, seed=7)
    per_fold = {label: Counter(r.fold for r in raw.records if r.tb == label) for label in (0, 1)}
    for label, n in ((0, 23), (1, 17)):
        assert sorted(per_fold[label]) == list(range(5))
        assert max(per_fold[label].values()) - min(per_fold[label].values()) <= 1
        assert sum(per_fold[label].values()) == n
    sizes = Counter(r.fold for r in raw.records)
    assert max(sizes.values()) - min(sizes.values()) <= 1
    assert tb.load_tb(tmp_path, "shenzhen", num_folds=5, seed=7).records == raw.records
    other = tb.load_tb(tmp_path, "shenzhen", num_folds=5, seed=8).records
    assert [r.fold for r in other] != [r.fold for r in raw.records]


def test_default_split_is_stratified_70_10_20(tmp_path):
    make_tb_tree(tmp_path, "shenzhen", n_normal=30, n_tb=20)
    raw = tb.load_tb(tmp_path, "shenzhen")
    counts = Counter((r.split, r.tb) for r in raw.records)
    assert counts == {("test", 0): 6, ("validation", 0): 3, ("train", 0): 21,
                      ("test", 1): 4, ("validation", 1): 2, ("train", 1): 14}
    assert tb.load_tb(tmp_path, "shenzhen").records == raw.records


def test_appledouble_and_hidden_files_are_ignored_and_counted(tmp_path):
    tree = make_tb_tree(tmp_path, "shenzhen")
    first = sorted(tree.values)[0]
    (tree.root / "CXR_png" / f"._{first}.png").write_bytes(b"\x00\x05\x16\x07")
    (tree.root / "ClinicalReadings" / f"._{first}.txt").write_bytes(b"\x00\x05\x16\x07")
    (tree.root / "CXR_png" / ".DS_Store").write_bytes(b"Bud1")
    (tree.root / "CXR_png" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    raw = tb.load_tb(tmp_path, "shenzhen")  # neither bad_file_name nor reading_without_image
    assert not raw.problems and len(raw.records) == len(tree.values)
    assert raw.ignored_files == {"appledouble": [f"CXR_png/._{first}.png", f"ClinicalReadings/._{first}.txt"],
                                 "hidden": ["CXR_png/.DS_Store"], "thumbnail_database": ["CXR_png/Thumbs.db"]}
