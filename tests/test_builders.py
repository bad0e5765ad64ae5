"""Builds end to end (local runner): build tiny raw trees, read them back, skip reports, killed and concurrent
builds. The Beam runner, storage and the check of built datasets: tests/test_build_runners.py."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest

import subprocesses
from data_fixtures import make_nih_tree, make_tb_tree, write_gray_png_with_trns
from metachex_jax.data.build import builders, publish
from metachex_jax.data.build.build import build_dataset
from metachex_jax.data.raw import nih, tb
from metachex_jax.data.raw.common import RawDataError

RESOLUTION = 16  # from 32 px raw images
WORKERS = 2


def build(dataset, raw_dir, out_dir, **kwargs):
    return build_dataset(dataset, raw_dir, out_dir, resolution=RESOLUTION, num_workers=WORKERS, progress=False,
                         **kwargs)


def read_split(dataset, out_dir, split, config_name=f"r{RESOLUTION}"):
    source = builders.data_source(dataset, split, out_dir, config_name=config_name)
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def nih_build(tmp_path_factory):
    base = tmp_path_factory.mktemp("nih")
    tree = make_nih_tree(base / "raw" / "ChestX-ray14", n_patients=12, mirror_layout=True)
    result = build("chestxray14", base / "raw" / "ChestX-ray14", base / "out")
    return tree, base / "out", result


def test_chestxray14_round_trip(nih_build):
    tree, out_dir, result = nih_build
    raw = nih.load_nih(tree.root)  # the default val fraction/seed, as the build used
    assert result.config_name == f"r{RESOLUTION}" and not result.reused
    for split in ("train", "validation", "test"):
        records = read_split("chestxray14", out_dir, split)
        expected = raw.splits[split]
        assert [r["image_name"].decode() for r in records] == [e.image_name for e in expected]  # sorted, no loss
        for record, want in zip(records, expected):
            assert record["image"].dtype == np.uint8 and record["image"].shape == (RESOLUTION, RESOLUTION, 1)
            assert np.all(record["image"] == tree.values[want.image_name])
            np.testing.assert_array_equal(record["labels"], np.array(want.labels, np.uint8))
            assert record["labels"].dtype == np.uint8
            assert (record["patient_id"], record["follow_up"]) == (want.patient_id, want.follow_up)
            assert record["age"] == pytest.approx(want.age) and record["age_valid"] == want.age_valid
            assert (record["sex_male"], record["view_ap"]) == (want.sex_male, want.view_ap)
    patients = {s: {r["patient_id"] for r in read_split("chestxray14", out_dir, s)} for s in ("train", "validation")}
    assert patients["train"] and patients["validation"] and not patients["train"] & patients["validation"]
    report = builders.read_skip_report(out_dir, "chestxray14", result.config_name)
    assert report["skipped"] == [] and report["flags"]["invalid_age"] == raw.invalid_age_names
    assert report["split_sizes"] == {s: len(raw.splits[s]) for s in ("test", "train", "validation")}


def test_chestxray14_label_counts_are_stored_and_read_once(nih_build, caplog, tmp_path):
    """label_counts.json holds every split's counts, equal to the records' labels; datasets.label_counts reads it.
    A build made before the counts were stored, or a source that is not a built split, is counted record by
    record, with a warning saying so."""
    import shutil

    from metachex_jax.core.labels import PATHOLOGIES
    from metachex_jax.data.input import datasets

    _, out_dir, result = nih_build
    stored = builders.read_label_counts(out_dir, "chestxray14", result.config_name)
    assert (stored["dataset"], stored["config"]) == ("chestxray14", result.config_name)
    for split in ("train", "validation", "test"):
        records = read_split("chestxray14", out_dir, split)
        counts = stored["splits"][split]
        assert counts["num_examples"] == len(records) > 0
        labels = np.array([r["labels"] for r in records])
        assert [counts["positives"][name] for name in PATHOLOGIES] == labels.sum(0).tolist()
        assert counts["positives"]["sex_male"] == sum(r["sex_male"] == 1 for r in records)
        assert counts["positives"]["view_ap"] == sum(r["view_ap"] == 1 for r in records)
    train = builders.data_source("chestxray14", "train", out_dir, config_name=result.config_name)
    positives, total = datasets.label_counts(train)
    assert total == len(train) and positives.tolist() == [stored["splits"]["train"]["positives"][name]
                                                          for name in PATHOLOGIES]
    assert not caplog.records
    as_list = [train[i] for i in range(len(train))]
    again, total_again = datasets.label_counts(as_list)
    assert again.tolist() == positives.tolist() and total_again == total
    assert "the source is not a built dataset: counting the labels by reading" in caplog.text
    old = tmp_path / "old"
    shutil.copytree(out_dir, old)
    (builders.dataset_dir(old, "chestxray14", result.config_name) / builders.LABEL_COUNTS_FILE).unlink()
    caplog.clear()
    old_train = builders.data_source("chestxray14", "train", old, config_name=result.config_name)
    assert datasets.label_counts(old_train)[0].tolist() == positives.tolist()
    assert f"has no {builders.LABEL_COUNTS_FILE} (built before" in caplog.text


RECORD_TYPES = {  # what a record holds, by kind: the dict TFDS's data_source gave for builds before 2.0.0
    "chestxray14": {"image": (np.uint8, (RESOLUTION, RESOLUTION, 1)), "image_name": bytes, "patient_id": int,
                    "follow_up": int, "labels": (np.uint8, (14,)), "age": float, "age_valid": bool, "sex_male": int,
                    "view_ap": int, "bit_depth": int},
    "montgomery": {"image": (np.uint8, (RESOLUTION, RESOLUTION, 1)), "image_id": bytes, "tb": int, "sex_male": int,
                   "age": float, "age_valid": bool, "fold": int, "reading": bytes, "bit_depth": int},
}


@pytest.mark.parametrize("dataset", ["chestxray14", "montgomery"])
def test_records_hold_every_field_with_its_type_and_pickle_for_worker_processes(nih_build, tmp_path, dataset):
    """builders.data_source (records.RecordSource) returns, for every record of every split and of split
    arithmetic, the dict of the record kind: numpy arrays of the stored dtype and shape, Python scalars, bytes;
    after pickling too (grain's workers); images stored uncompressed, one record per chunk."""
    import pickle

    from array_record.python.array_record_module import ArrayRecordReader

    if dataset == "chestxray14":
        out_dir, config_name = nih_build[1], nih_build[2].config_name
    else:
        make_tb_tree(tmp_path / "raw", dataset)
        out_dir, config_name = tmp_path / "out", build(dataset, tmp_path / "raw", tmp_path / "out").config_name
    sizes = builders.read_skip_report(out_dir, dataset, config_name)["split_sizes"]
    for split in ("train", "validation", "test", "train+test"):
        source = pickle.loads(pickle.dumps(builders.data_source(dataset, split, out_dir, config_name=config_name)))
        assert len(source) == sum(sizes[s] for s in split.split("+")) > 0 and source.split == split
        for i in range(len(source)):
            record = source[i]
            assert record.keys() == RECORD_TYPES[dataset].keys()
            for key, want in RECORD_TYPES[dataset].items():
                if isinstance(want, tuple):
                    assert (type(record[key]), record[key].dtype, record[key].shape) == (np.ndarray, *want), key
                else:
                    assert type(record[key]) is want, key
    files = sorted(builders.dataset_dir(out_dir, dataset, config_name).glob("*.array_record-*"))
    reader = ArrayRecordReader(str(files[0]))
    assert "uncompressed" in reader.writer_options_string() and "group_size:1" in reader.writer_options_string()
    reader.close()


def test_second_build_reuses_and_other_options_get_their_own_name(nih_build, tmp_path):
    tree, out_dir, first = nih_build
    assert build("chestxray14", tree.root, out_dir).reused
    name = builders.nih_config_name(RESOLUTION, val_fraction=0.3, seed=1)
    assert name == f"r{RESOLUTION}_val0p3_seed1"
    assert builders.nih_config_name(256) == "r256"
    other = build("chestxray14", tree.root, tmp_path, val_fraction=0.3, seed=1)
    assert other.config_name == name
    validation = builders.data_source("chestxray14", "validation", tmp_path, config_name=name)
    assert len(validation) == other.report["split_sizes"]["validation"] > 0
    assert len(builders.data_source("chestxray14", "train", out_dir, resolution=RESOLUTION)) == \
        first.report["split_sizes"]["train"]


@pytest.mark.parametrize("dataset", ["shenzhen", "montgomery"])
def test_tb_round_trip_and_split_arithmetic(tmp_path, dataset):
    tree = make_tb_tree(tmp_path / "raw", dataset)
    result = build(dataset, tmp_path / "raw", tmp_path / "out")
    raw = tb.load_tb(tmp_path / "raw", dataset)
    everything = read_split(dataset, tmp_path / "out", "train+validation+test")
    expected = [r for split in ("train", "validation", "test") for r in raw.split(split)]
    assert [r["image_id"].decode() for r in everything] == [e.image_id for e in expected]
    for record, want in zip(everything, expected):
        assert np.all(record["image"] == tree.values[want.image_id])
        assert (record["tb"], record["sex_male"], record["fold"]) == (want.tb, want.sex_male, want.fold)
        assert record["age"] == pytest.approx(want.age) and record["age_valid"] == want.age_valid
        assert record["reading"].decode() == want.reading
    assert sorted(r["fold"] for r in everything) == sorted(r.fold for r in raw.records)
    assert result.report["split_sizes"] == {s: len(raw.split(s)) for s in ("test", "train", "validation")}
    counts = builders.read_label_counts(tmp_path / "out", dataset, result.config_name)["splits"]
    for split in ("train", "validation", "test"):
        assert counts[split] == {"num_examples": len(raw.split(split)),
                                 "positives": {"tb": sum(r.tb == 1 for r in raw.split(split)),
                                               "sex_male": sum(r.sex_male == 1 for r in raw.split(split))}}
    assert {r["bit_depth"] for r in everything} == {8}
    assert result.report["bit_depths"] == [{"bits": 8, "source": "8-bit file", "images": len(everything)}]


def test_12bit_png_without_sbit_is_built_at_full_contrast_and_its_depth_recorded(tmp_path):
    """The bug of builder version 1.0.0: 0..4095 in a 16-bit PNG came out at most 16 of 255."""
    from PIL import Image

    tree = make_tb_tree(tmp_path / "raw", "montgomery")
    image_id = sorted(tree.values)[0]
    Image.fromarray(np.full((32, 32), 4095, np.uint16)).save(tree.image_path(image_id))
    result = build("montgomery", tmp_path / "raw", tmp_path / "out")
    records = {r["image_id"].decode(): r for r in read_split("montgomery", tmp_path / "out", "train+validation+test")}
    assert np.all(records[image_id]["image"] == 255) and records[image_id]["bit_depth"] == 12
    assert {"bits": 12, "source": "data", "images": 1} in result.report["bit_depths"]


def corrupt_nih_tree(tree):
    """One of each NIH bad-input case; returns the (kind, item) pairs a skip build must report."""
    rows = tree.rows
    rows[0]["labels"] = "Infiltrate"
    rows[1]["age"] = "unknown"
    rows[3]["sex"] = "?"
    rows.append(dict(rows[4]))  # duplicate row
    tree.write_csv()
    tree.train_val.append("99999999_000.png")
    tree.write_lists()
    tree.image_path(rows[6]["name"]).unlink()
    truncated, garbage = tree.image_path(rows[7]["name"]), tree.image_path(rows[8]["name"])
    truncated.write_bytes(truncated.read_bytes()[:40])
    garbage.write_bytes(b"not a png")
    return {("unknown_label", rows[0]["name"]), ("bad_age", rows[1]["name"]), ("bad_sex", rows[3]["name"]),
            ("duplicate_csv_row", rows[4]["name"]), ("split_name_not_in_csv", "99999999_000.png"),
            ("missing_image", rows[6]["name"]), ("undecodable_image", rows[7]["name"]),
            ("undecodable_image", rows[8]["name"])}


def test_chestxray14_skip_bad_builds_without_exactly_the_bad_items(tmp_path):
    tree = make_nih_tree(tmp_path / "raw", n_patients=12)
    expected = corrupt_nih_tree(tree)
    with pytest.raises(RawDataError) as error:
        build("chestxray14", tree.root, tmp_path / "out")
    for kind, item in expected - {p for p in expected if p[0] == "undecodable_image"}:
        assert f"[{kind}] {item}:" in str(error.value)
    assert not builders.is_complete(tmp_path / "out", "chestxray14", f"r{RESOLUTION}")

    result = build("chestxray14", tree.root, tmp_path / "out", skip_bad=True)
    report = json.loads((result.path / builders.SKIP_REPORT_FILE).read_text())
    assert report["skip_bad"] is True
    assert {(s["kind"], s["item"]) for s in report["skipped"]} == expected
    assert sum(report["skipped_counts"].values()) == len(expected)
    names = {r["image_name"].decode() for s in ("train", "validation", "test")
             for r in read_split("chestxray14", tmp_path / "out", s)}
    assert names == {r["name"] for r in tree.rows} - {item for _, item in expected}


def test_undecodable_images_fail_the_build_naming_each_and_leave_nothing(tmp_path):
    tree = make_tb_tree(tmp_path / "raw", "shenzhen")
    ids = sorted(tree.values)
    tree.image_path(ids[2]).write_bytes(tree.image_path(ids[2]).read_bytes()[:50])
    tree.image_path(ids[15]).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(RawDataError) as error:
        build("shenzhen", tmp_path / "raw", tmp_path / "out")
    assert {(p.kind, p.item) for p in error.value.problems} == {("undecodable_image", ids[2]),
                                                                ("undecodable_image", ids[15])}
    assert str(tree.image_path(ids[2])) in str(error.value) and str(tree.image_path(ids[15])) in str(error.value)
    where = builders.version_dir(tmp_path / "out", "shenzhen", f"r{RESOLUTION}")
    assert not builders.is_complete(tmp_path / "out", "shenzhen", f"r{RESOLUTION}")
    assert publish.build_folders(where) == []  # the failed build's folder was deleted: nothing half-written stays
    with pytest.raises(FileNotFoundError, match="is not prepared"):
        builders.data_source("shenzhen", "train", tmp_path / "out", resolution=RESOLUTION)


def test_a_file_that_decodes_to_what_no_record_holds_is_that_files_problem(tmp_path, monkeypatch):
    """After its decode, a file that is not a uint8 R x R gray image is reported by name, like an undecodable one,
    by the build and by `verify_raw` alike; on main the build died in TFDS's encoder. Real: a gray PNG with a tRNS
    chunk (gray + alpha on main; read as gray by a fixed reader, then simply built). Simulated, to keep the check
    tested whatever the reader does: the reader returns two channels for one named file."""
    from metachex_jax.data.build import build as build_lib
    from metachex_jax.imaging import images

    tree = make_tb_tree(tmp_path / "raw", "shenzhen")
    ids = sorted(tree.values)
    write_gray_png_with_trns(tree.image_path(ids[3]), np.full((32, 32), 120, np.uint8))
    two_channels = str(tree.image_path(ids[7]))
    load = images.load_gray_with_info

    def two_channels_for_one_file(path, *args, **kwargs):
        image, info = load(path, *args, **kwargs)
        return (np.stack([image, image], axis=-1) if str(path) == two_channels else image), info

    monkeypatch.setattr(images, "load_gray_with_info", two_channels_for_one_file)  # in-process decoding below
    options = dict(resolution=RESOLUTION, num_workers=1, progress=False)
    with pytest.raises(RawDataError) as error:
        build_dataset("shenzhen", tmp_path / "raw", tmp_path / "out", **options)
    refused = {p.item for p in error.value.problems if p.kind == "undecodable_image"}
    assert {p.kind for p in error.value.problems} == {"undecodable_image"} and refused in ({ids[7]}, {ids[3], ids[7]})
    assert f"{two_channels}: ValueError: decoded to uint8 ({RESOLUTION}, {RESOLUTION}, 2)" in str(error.value)
    report = build_lib.verify_raw("shenzhen", tmp_path / "raw", num_workers=1, progress=False)
    assert {p.item for p in report.problems} == refused  # --verify refuses the same files
    result = build_dataset("shenzhen", tmp_path / "raw", tmp_path / "out", skip_bad=True, **options)
    assert {s["item"] for s in result.report["skipped"]} == refused
    built = {r["image_id"].decode() for r in read_split("shenzhen", tmp_path / "out", "train+validation+test")}
    assert built == set(ids) - refused


def test_tb_skip_bad_reports_disagreements_and_flags(tmp_path):
    tree = make_tb_tree(tmp_path / "raw", "montgomery")
    ids = sorted(tree.values)
    old_tb = "old healed TB in the right apex, no active disease"
    tree.write_reading(ids[0], f"Patient's Sex: M\nPatient's Age: 040Y\n{old_tb}\n")  # label 0: a flag
    tree.write_reading(ids[1], "Patient's Sex: ?\nPatient's Age: unknown\nnormal\n")  # flags only
    tree.write_reading(ids[-1], "Patient's Sex: F \nPatient's Age: 027Y\nnormal\n")  # label 1: a contradiction
    result = build("montgomery", tmp_path / "raw", tmp_path / "out", skip_bad=True)
    assert [(s["kind"], s["item"]) for s in result.report["skipped"]] == [("label_disagreement", ids[-1])]
    assert result.report["flags"]["unknown_sex"] == [ids[1]] and result.report["flags"]["invalid_age"] == [ids[1]]
    # The TB mention in a normal reading is kept, flagged, and listed with its reading in the skip report.
    assert result.report["flags"]["tb_mention_in_normal"] == [ids[0]]
    assert result.report["flag_details"] == {"tb_mention_in_normal": {ids[0]: old_tb}}
    assert f"tb_mention_in_normal {ids[0]}: {old_tb!r}" in result.format()
    records = {r["image_id"].decode(): r for r in read_split("montgomery", tmp_path / "out", "train+validation+test")}
    assert ids[-1] not in records and records[ids[1]]["sex_male"] == -1 and not records[ids[1]]["age_valid"]
    assert records[ids[0]]["tb"] == 0 and records[ids[0]]["reading"].decode() == old_tb


KILL_SCRIPT = """
import os, signal, sys
from metachex_jax.data.build import build, work

process_chunk = work.process_chunk

def killed_after_the_training_records(chunk):
    if chunk.split != "train":
        os.kill(os.getpid(), signal.SIGKILL)  # as a power cut or the OOM killer would
    return process_chunk(chunk)

if __name__ == "__main__":
    work.process_chunk = killed_after_the_training_records
    build.build_dataset("shenzhen", sys.argv[1], sys.argv[2], resolution=16, num_workers=1, progress=False,
                        records_per_shard=4)
"""


CONCURRENT_SCRIPT = """
import sys
from metachex_jax.data.build.build import build_dataset
if __name__ == "__main__":
    result = build_dataset("montgomery", sys.argv[1], sys.argv[2], resolution=16, num_workers=1, progress=False)
    print("REUSED" if result.reused else "BUILT", result.report["split_sizes"])
"""


def test_concurrent_builds_of_one_config_publish_one_build(tmp_path):
    """Two processes build one config at once: both may do the work, one publishes (its info is created, never
    replaced), the other reports the published build as reused and deletes its own folder."""
    make_tb_tree(tmp_path / "raw", "montgomery")
    script = tmp_path / "build_once.py"
    script.write_text(CONCURRENT_SCRIPT)
    command = [sys.executable, str(script), str(tmp_path / "raw"), str(tmp_path / "out")]
    processes = [subprocesses.start(command, tmp_path / f"build{i}.out", stderr_log=tmp_path / f"build{i}.err")
                 for i in range(2)]
    subprocesses.wait(processes)
    assert [p.popen.returncode for p in processes] == [0, 0], [p.output(1)[-2000:] for p in processes]
    lines = sorted(p.output(0).strip().splitlines()[-1] for p in processes)
    assert lines[0].startswith("BUILT") and lines[1].startswith("REUSED") and lines[0][5:] == lines[1][6:]
    where = builders.version_dir(tmp_path / "out", "montgomery", "r16")
    assert publish.build_folders(where) == [publish.read_info(where)["build"]]
    assert len(read_split("montgomery", tmp_path / "out", "train+validation+test", "r16")) == 22


def test_killed_build_is_never_read_and_a_rerun_publishes_a_complete_one(tmp_path):
    """SIGKILL in the middle of a build (shards of one split written): nothing is published, readers find no
    dataset; a rerun publishes a complete build, the killed one's folder is never read, and --clean deletes it."""
    from metachex_jax import prepare

    make_tb_tree(tmp_path / "raw", "shenzhen")
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT))
    done = subprocesses.run([sys.executable, str(script), str(tmp_path / "raw"), str(tmp_path / "out")])
    assert done.returncode == -9, done.stderr[-2000:]
    where = builders.version_dir(tmp_path / "out", "shenzhen", "r16")
    [killed] = publish.build_folders(where)
    assert list((tmp_path / "out" / "shenzhen" / "r16" / "2.0.0" / killed).glob("shenzhen-train.array_record-*"))
    assert not builders.is_complete(tmp_path / "out", "shenzhen", "r16")  # half-written: not a dataset
    with pytest.raises(FileNotFoundError, match="is not prepared"):
        builders.data_source("shenzhen", "train", tmp_path / "out", config_name="r16")
    result = build("shenzhen", tmp_path / "raw", tmp_path / "out")
    assert not result.reused and result.unpublished == [killed] and killed in result.format()
    assert result.path.name != killed and publish.read_info(where)["build"] == result.path.name
    train = builders.data_source("shenzhen", "train", tmp_path / "out", config_name="r16")
    assert len(train) == result.report["split_sizes"]["train"] == 16
    assert prepare.main(["--dataset=shenzhen", f"--data_dir={tmp_path / 'out'}", "--resolution=16", "--clean"]) == 0
    assert publish.build_folders(where) == [result.path.name]
    assert len(builders.data_source("shenzhen", "train+validation+test", tmp_path / "out", config_name="r16")) == 22


def test_build_ignores_and_reports_files_that_are_not_images_of_the_dataset(tmp_path):
    from test_nih import litter_like_a_mac_and_windows

    tree = make_nih_tree(tmp_path / "raw", n_patients=8)
    counts = litter_like_a_mac_and_windows(tmp_path / "raw", [r["name"] for r in tree.rows[:3]])
    result = build("chestxray14", tree.root, tmp_path / "out")
    assert sum(result.report["split_sizes"].values()) == len(tree.rows) and not result.report["skipped"]
    assert {k: v["count"] for k, v in result.report["ignored_files"].items()} == counts
    assert f"images/._{tree.rows[0]['name']}" in result.report["ignored_files"]["appledouble"]["examples"]
    assert "ignored, not images of the dataset: 4 appledouble (e.g. " in result.format()
