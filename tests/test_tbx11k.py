"""TBX11K on a tiny tree in the release layout (tests/dataset_trees.py), record by record: labels by folder and by
box (active, latent, both, tb1199 without boxes), the val copy of a train image dropped, the withheld test and the
extra folders left out and counted, XML boxes rescaled and compared with the JSON's, the mednet-style split."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from dataset_trees import make_tbx11k_tree
from metachex_jax.data.build import build, builders, registry
from metachex_jax.data.raw import labelled, tbx11k
from metachex_jax.data.raw.common import RawDataError

RESOLUTION = 16


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def expected_labels(tree, name: str) -> tuple[int, ...]:
    folder = name.split("/")[0]
    if folder != "tb":
        return 0, 0, 0, int(folder == "health")
    categories = {c for c, _ in tree.boxes.get(name, [])}
    if not categories:
        return 1, -1, -1, 0
    return 1, int(1 in categories), int(2 in categories), 0


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tbx11k")
    tree = make_tbx11k_tree(tmp / "raw")
    result = build.build_dataset("tbx11k", tmp / "raw", tmp / "out", resolution=RESOLUTION, num_workers=1,
                                 progress=False)
    return tree, result


def test_build_record_by_record(built):
    tree, result = built
    data_dir = result.path.parents[3]
    records = {text(r["image_id"]): (split, r) for split in labelled.SPLITS
               for s in [builders.data_source(result.dataset, split, data_dir, config_name=result.config_name)]
               for r in (s[i] for i in range(len(s)))}
    source = builders.data_source(result.dataset, "test", data_dir, config_name=result.config_name)
    assert source.dataset_info.metadata["label_names"] == list(tbx11k.LABEL_NAMES)
    copies = {n for n in tree.val if hashlib.sha256((tree.root / "imgs" / n).read_bytes()).digest() in
              {hashlib.sha256((tree.root / "imgs" / t).read_bytes()).digest() for t in tree.train}}
    assert copies == set(tree.duplicates) == {"sick/s0109.png"}
    assert sorted(records) == sorted(set(tree.train + tree.val) - copies)
    for name, (split, record) in records.items():
        np.testing.assert_array_equal(record["labels"], expected_labels(tree, name))
        assert (split == "test") == (name in tree.val)  # the original val set is the test split
        assert np.all(record["image"] == tree.values[name])  # RGB stored gray: back exactly
        assert (record["age_valid"], record["sex_male"], record["view_ap"]) == (False, -1, -1)
        assert text(record["patient_id"]) == name
    both = [n for n in records if expected_labels(tree, n)[1:3] == (1, 1)]
    assert both == ["tb/tb0135.png", "tb/tb1143.png"]  # active AND latent: positive for both
    report = result.report
    assert report["flags"]["tb_without_boxes"] == ["tb/tb1199.png"]
    details = report["details"]
    assert details["val_copies_of_train_images"] == tree.duplicates
    assert details["excluded"] == {"withheld test (imgs/test/)": 2, "extra: mc+shenzhen": 2, "extra: da+db": 2}
    assert details["boxes"] == {"train": sum(len(tree.boxes.get(n, [])) for n in tree.train),
                                "val": sum(len(tree.boxes.get(n, [])) for n in tree.val)}
    [disagreement] = details["xml_json_disagreements"]  # the one tampered XML; every other box within 2 px
    assert disagreement["image"] == "tb/tb0012.png" and disagreement["category"] == "Active TB"
    assert disagreement["difference_512px"] == pytest.approx(300 - 20 * 512 / 1757, abs=0.01)
    assert details["counts"]["images per split"] == {s: sum(1 for v in records.values() if v[0] == s)
                                                     for s in labelled.SPLITS}
    train_pool = [n for n in tree.train]
    validation = [n for n, (s, _) in records.items() if s == "validation"]
    assert validation and set(validation) <= set(train_pool)
    for folder in ("health", "sick"):  # stratified: 0.2 of each class
        members = [n for n in train_pool if n.startswith(folder)]
        assert sum(n in validation for n in members) == round(0.2 * len(members))
    assert "val copies of train images dropped: 1" in result.format()
    test_labels = np.array([expected_labels(tree, n) for n, (s, _) in records.items() if s == "test"])
    assert "test labels (positive / known): " + ", ".join(  # printed at build time, from the build's label counts
        f"{name} {np.sum(test_labels[:, k] == 1)}/{np.sum(test_labels[:, k] != -1)}"
        for k, name in enumerate(tbx11k.LABEL_NAMES)) in result.format()


def test_xml_comparison_against_a_hand_computed_rescale(built):
    tree, _ = built
    name = "tb/tb0005.png"
    [(category, (x, y, w, h))] = tree.boxes[name]
    size = tree.size
    # The XML holds the box at 1757 x 2022, rounded to integers; rescaled to 512 space it is off by < 0.3 px.
    xml_x0 = round(x * 1757 / size) * 512 / 1757
    expected = abs(xml_x0 - x * 512 / size)
    found = tbx11k.compare_xml(name, {"Active TB": [(x, y, w, h)]}, (size, size),
                               tree.root / "annotations" / "xml" / "tb0005.xml", tolerance=0.0)
    assert expected > 0 and max(d["difference_512px"] for d in found) >= round(expected, 2)
    assert tbx11k.compare_xml(name, {"Active TB": [(x, y, w, h)]}, (size, size),
                              tree.root / "annotations" / "xml" / "tb0005.xml", tolerance=2.0) == []
    assert tbx11k.compare_xml(name, {}, (size, size), tree.root / "annotations" / "xml" / "tb0005.xml",
                              tolerance=2.0)[0]["why"] == "a different number of boxes"


def test_extra_folders_included_on_request_and_split_seeded(tmp_path):
    tree = make_tbx11k_tree(tmp_path)
    raw = tbx11k.load_tbx11k(tmp_path, extra_folders="include")
    extra = {r.image_id: r for r in raw.records if r.image_id.startswith("extra/")}
    assert {n: (r.labels, r.split) for n, r in extra.items()} == {
        "extra/mc+shenzhen/train/CHNCXR_0001_1.png": ((1, -1, -1, -1), extra[
            "extra/mc+shenzhen/train/CHNCXR_0001_1.png"].split),
        "extra/mc+shenzhen/val/MCUCXR_0002_0.png": ((0, -1, -1, -1), "test"),
        "extra/da+db/train/p12.png": ((1, -1, -1, -1), extra["extra/da+db/train/p12.png"].split),
        "extra/da+db/val/nx3.jpg": ((0, -1, -1, -1), "test")}
    assert {extra[n].split for n in extra if "/train/" in n} <= {"train", "validation"}
    assert registry.family("tbx11k").config_name(RESOLUTION, extra_folders="include") == "r16_extra"
    splits = [{r.image_id: r.split for r in tbx11k.load_tbx11k(tmp_path, seed=s).records} for s in (0, 0, 1)]
    assert splits[0] == splits[1] and splits[0] != splits[2]
    assert tree.root.is_dir()


def test_membership_from_json_and_bad_items_named(tmp_path):
    tree = make_tbx11k_tree(tmp_path)
    raw = {r.image_id: r for r in tbx11k.load_tbx11k(tree.root).records}
    for name in ("TBX11K_train.txt", "TBX11K_val.txt"):
        (tree.root / "lists" / name).unlink()
    assert {r.image_id: r for r in tbx11k.load_tbx11k(tree.root).records} == raw  # the JSON says the same
    tree.write_annotations()  # lists back
    (tree.root / "lists" / "TBX11K_val.txt").write_text("\n".join(tree.val[1:]) + "\n")  # h0003 only in the JSON
    (tree.root / "imgs" / tree.train[0]).unlink()
    (tree.root / "imgs" / "health" / "h0999.png").write_bytes(b"")  # in no list
    data = json.loads((tree.root / "annotations" / "json" / "TBX11K_train.json").read_text())
    sick = next(i["id"] for i in data["images"] if i["file_name"] == "sick/s0002.png")
    data["annotations"].append({"id": 99, "image_id": sick, "category_id": 1, "bbox": [1, 1, 2, 2]})
    (tree.root / "annotations" / "json" / "TBX11K_train.json").write_text(json.dumps(data))
    expected = {("annotation_mismatch", tree.val[0]), ("missing_image", tree.train[0]),
                ("unlisted_image", "health/h0999.png"), ("box_on_non_tb_image", "sick/s0002.png")}
    with pytest.raises(RawDataError) as error:
        tbx11k.load_tbx11k(tree.root)
    assert {(p.kind, p.item) for p in error.value.problems} == expected
    kept = {r.image_id for r in tbx11k.load_tbx11k(tree.root, skip_bad=True).records}
    assert kept == set(raw) - {item for _, item in expected}


def test_verify_compares_the_release_counts(built):
    tree, _ = built
    report = build.verify_raw("tbx11k", tree.root.parent, num_workers=1, progress=False)
    assert report.ok, report.format()
    out = report.format()
    assert f"train_images: 6,600 expected, {len(tree.train)} found" in out and "val copies of train images dropped: 1" in out
    assert "XML/JSON box disagreements above 2 px (512 space): 1" in out
