"""Builds on Apache Beam (the DirectRunner, two worker processes, as CI runs it) against the local runner: the same
records byte for byte; bad input and failures in a distributed build; both ends in Cloud Storage (the gs://
stand-in); the check of a built dataset (bytes flipped in shards)."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import make_chexpert_tree, make_csv_tree, make_padchest_tree, make_tb_tree
from dataset_trees import make_mimic_tree, make_tbx11k_tree, make_vindr_tree
from metachex_jax import prepare
from metachex_jax.data.build import build, builders, layout, local, publish, shards, work
from metachex_jax.data.raw.common import RawDataError
from metachex_jax.demo.write import write_demo_data

RESOLUTION = 16
PER_SHARD = 5  # several shards per split, some of them left empty or short by skipped files
TWO_WORKERS = "--direct_num_workers=2 --direct_running_mode=multi_processing"
IN_PROCESS = "--direct_running_mode=in_memory"  # the DoFns run in this process (the gs:// stand-in, monkeypatch)


def build_with(runner, dataset, manual_dir, out_dir, beam_options="", **kwargs):
    return build.build_dataset(dataset, manual_dir, out_dir, resolution=RESOLUTION, progress=False, runner=runner,
                               beam_options=beam_options, records_per_shard=PER_SHARD,
                               num_workers=kwargs.pop("num_workers", 2 if runner == "local" else None), **kwargs)


def published(data_dir, result) -> dict:
    """Everything a reader can see of a build: each split's record bytes, the shards, reports, identity."""
    where = builders.version_dir(data_dir, result.dataset, result.config_name)
    info = publish.read_info(where)
    source = {split: builders.data_source(result.dataset, split, data_dir, config_name=result.config_name)
              for split in info["splits"]}
    return {"records": {split: [s.raw(i) for i in range(len(s))] for split, s in source.items()},
            "shards": {split: entry["shards"] for split, entry in info["splits"].items()},
            "skip_report": builders.read_skip_report(data_dir, result.dataset, result.config_name),
            "label_counts": builders.read_label_counts(data_dir, result.dataset, result.config_name),
            "identity": (info["dataset"], info["config"], info["version"], info["kind"], info["record_layout"])}


def file_digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.array_record-*"))}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small slice of the demo tree (every family the demo has)."""
    return write_demo_data(tmp_path_factory.mktemp("demo") / "raw", num_nih=24, num_shenzhen=16, num_montgomery=2,
                           num_hospital=0, size=48, num_workers=1)


@pytest.mark.parametrize("dataset", ["chestxray14", "csv"])
def test_a_direct_runner_build_gives_the_local_builds_records_byte_for_byte(demo, tmp_path, dataset):
    """DirectRunner with two worker processes against the local process pool, on the demo tree's ChestX-ray14 and
    on a synthetic CSV dataset with two bad files (skip_bad): every split's sequence of record bytes, the shard
    files (their SHA-256), split sizes, skip report, label counts and identity are the same."""
    if dataset == "chestxray14":
        manual_dir, options = demo["chestxray14_dir"], {}
    else:
        tree = make_csv_tree(tmp_path / "raw")
        for path in list(tree.values)[3:5]:
            (tree.root / path).write_bytes(b"not an image")
        manual_dir, options = tree.root, {"csv": str(tree.csv_path), "skip_bad": True}
    local = build_with("local", dataset, manual_dir, tmp_path / "local", **options)
    beam = build_with("direct", dataset, manual_dir, tmp_path / "beam", TWO_WORKERS, **options)
    assert (local.runner, beam.runner) == ("local", "direct") and not local.reused and not beam.reused
    ours, theirs = published(tmp_path / "local", local), published(tmp_path / "beam", beam)
    assert ours == theirs
    assert sum(len(records) for records in ours["records"].values()) > 2 * PER_SHARD
    assert file_digests(local.path) == file_digests(beam.path)
    if dataset == "csv":
        assert ours["skip_report"]["skipped_counts"] == {"undecodable_image": 2}


@pytest.mark.parametrize("dataset", ["shenzhen", "chexpert", "padchest", "mimic", "tbx11k", "vindr"])
def test_every_other_family_builds_on_beam_as_locally(tmp_path, dataset):
    """The families the test above leaves out (TB readings, CheXpert's JPEG release, PadChest's 16-bit PNGs,
    MIMIC-CXR's DICOM release with its labels and MIMIC-IV's sex and age, TBX11K's RGB PNGs with labels by folder
    and box, VinDr-CXR's DICOMs of 10 to 16 bits with three readers' labels) on the DirectRunner in this process:
    the local build's records, shards, reports and identity."""
    raw, options = tmp_path / "raw", {}
    if dataset == "mimic":
        tree = make_mimic_tree(raw, dicom=True)
        options = {"csv_dir": str(tree.csv_dir), "patients_csv": str(tree.patients_csv)}
    else:
        {"shenzhen": lambda: make_tb_tree(raw, "shenzhen", n_normal=6, n_tb=6),
         "chexpert": lambda: make_chexpert_tree(raw), "padchest": lambda: make_padchest_tree(raw),
         "tbx11k": lambda: make_tbx11k_tree(raw), "vindr": lambda: make_vindr_tree(raw)}[dataset]()
    local = build_with("local", dataset, raw, tmp_path / "local", num_workers=1, **options)
    beam = build_with("direct", dataset, raw, tmp_path / "beam", IN_PROCESS, **options)
    assert published(tmp_path / "local", local) == published(tmp_path / "beam", beam)
    assert file_digests(local.path) == file_digests(beam.path) and len(file_digests(local.path)) >= 3


def test_two_local_builds_are_byte_identical(demo, tmp_path):
    """The same raw copy and config, built twice (each time in fresh worker processes): the same shard files.
    (Builders before 2.0.0 serialised with TFDS, whose protobuf map order changed with each process.)"""
    first = build_with("local", "shenzhen", demo["root"], tmp_path / "a")
    second = build_with("local", "shenzhen", demo["root"], tmp_path / "b")
    assert file_digests(first.path) == file_digests(second.path) and len(file_digests(first.path)) >= 2
    for name in (builders.SKIP_REPORT_FILE, builders.LABEL_COUNTS_FILE):
        assert (first.path / name).read_bytes() == (second.path / name).read_bytes()


def test_bad_files_fail_a_beam_build_naming_each_and_skip_bad_reports_them_as_locally(tmp_path):
    tree = make_tb_tree(tmp_path / "raw", "montgomery")
    ids = sorted(tree.values)
    tree.image_path(ids[2]).write_bytes(tree.image_path(ids[2]).read_bytes()[:50])
    tree.image_path(ids[15]).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(RawDataError) as error:
        build_with("direct", "montgomery", tmp_path / "raw", tmp_path / "beam", IN_PROCESS)
    assert {(p.kind, p.item) for p in error.value.problems} == {("undecodable_image", ids[2]),
                                                                ("undecodable_image", ids[15])}
    assert str(tree.image_path(ids[2])) in str(error.value) and str(tree.image_path(ids[15])) in str(error.value)
    where = builders.version_dir(tmp_path / "beam", "montgomery", f"r{RESOLUTION}")
    assert not publish.is_published(where) and publish.build_folders(where) == []  # nothing half-written stays
    beam = build_with("direct", "montgomery", tmp_path / "raw", tmp_path / "beam", IN_PROCESS, skip_bad=True)
    local = build_with("local", "montgomery", tmp_path / "raw", tmp_path / "local", skip_bad=True)
    assert published(tmp_path / "beam", beam) == published(tmp_path / "local", local)
    assert {s["item"] for s in beam.report["skipped"]} == {ids[2], ids[15]}
    assert sum(beam.report["split_sizes"].values()) == len(ids) - 2


def test_a_beam_build_that_fails_midway_publishes_nothing_and_a_rerun_publishes_it_whole(tmp_path, monkeypatch):
    """A worker error after some shards were written (here: writing the third shard fails) fails the job; the
    build's folder is deleted, readers find no dataset; the rerun publishes the complete build."""
    make_tb_tree(tmp_path / "raw", "montgomery")
    write_shard, calls = shards.write_shard, []

    def failing_third_shard(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise OSError("the disk went away")
        return write_shard(*args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", failing_third_shard)
    with pytest.raises(Exception, match="the disk went away"):
        build_with("direct", "montgomery", tmp_path / "raw", tmp_path / "out", IN_PROCESS)
    where = builders.version_dir(tmp_path / "out", "montgomery", f"r{RESOLUTION}")
    assert len(calls) == 3 and not publish.is_published(where) and publish.build_folders(where) == []
    with pytest.raises(FileNotFoundError):
        builders.data_source("montgomery", "train", tmp_path / "out", resolution=RESOLUTION)
    monkeypatch.setattr(shards, "write_shard", write_shard)
    result = build_with("direct", "montgomery", tmp_path / "raw", tmp_path / "out", IN_PROCESS)
    everything = builders.data_source("montgomery", "train+validation+test", tmp_path / "out", resolution=RESOLUTION)
    assert len(everything) == 22 == sum(result.report["split_sizes"].values())


def test_a_beam_runner_without_apache_beam_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    make_tb_tree(tmp_path / "raw", "montgomery", n_normal=2, n_tb=2)
    import metachex_jax.data.build as package

    monkeypatch.delitem(sys.modules, "metachex_jax.data.build.beam_runner", raising=False)
    monkeypatch.delattr(package, "beam_runner", raising=False)  # imported anew below...
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # ...where `import apache_beam` fails
    argv = ["--dataset=montgomery", f"--manual_dir={tmp_path / 'raw'}", f"--data_dir={tmp_path / 'out'}",
            "--resolution=16", "--runner=direct"]
    assert prepare.main(argv) == 2
    assert 'pip install "metachex-jax[beam]"' in capsys.readouterr().err
    where = builders.version_dir(tmp_path / "out", "montgomery", "r16")
    assert publish.build_folders(where) == [] and not publish.is_published(where)


def test_raw_copy_and_build_both_in_cloud_storage(fake_gcs, tmp_path):
    """--manual_dir and --data_dir gs:// (the stand-in): the raw copy is staged (its metadata downloaded, images
    read from the bucket), shards uploaded, the build published by its info; the local runner (in this process)
    and the DirectRunner (in_memory: the stand-in is this process's) publish the records of a local build."""
    make_tb_tree(tmp_path / "raw", "montgomery")
    shutil.copytree(tmp_path / "raw", fake_gcs.local(f"{fake_gcs.url}/raw"))
    data_dir = f"{fake_gcs.url}/tfds"
    local = build_with("local", "montgomery", tmp_path / "raw", tmp_path / "local")
    for runner, options in (("local", ""), ("direct", IN_PROCESS)):
        out = f"{data_dir}/{runner}"
        result = build.build_dataset("montgomery", f"{fake_gcs.url}/raw", out, resolution=RESOLUTION, progress=False,
                                     runner=runner, beam_options=options, num_workers=1, records_per_shard=PER_SHARD)
        assert builders.is_complete(out, "montgomery", f"r{RESOLUTION}") and not result.reused
        assert str(result.path).startswith(f"{out}/montgomery/r{RESOLUTION}/{builders.Montgomery.VERSION}/build-")
        assert result.report["split_sizes"] == local.report["split_sizes"]
        assert result.report["manual_dir"] == f"{fake_gcs.url}/raw"
        # ArrayRecord's reader opens gs:// through its own GCS client, which the stand-in cannot serve: the
        # uploaded objects are read through their local files.
        mirror = fake_gcs.local(out)
        assert published(mirror, result) == {**published(tmp_path / "local", local),
                                             "skip_report": published(mirror, result)["skip_report"]}
        assert file_digests(fake_gcs.local(str(result.path))) == file_digests(local.path)
        again = build.build_dataset("montgomery", f"{fake_gcs.url}/raw", out, resolution=RESOLUTION, progress=False)
        assert again.reused and again.path == result.path


def test_check_built_finds_flipped_bytes_by_split_and_index_and_damaged_shards(tmp_path, capsys):
    make_tb_tree(tmp_path / "raw", "montgomery")
    result = build_with("local", "montgomery", tmp_path / "raw", tmp_path / "out")
    argv = ["--dataset=montgomery", f"--data_dir={tmp_path / 'out'}", f"--resolution={RESOLUTION}", "--check_built"]
    assert prepare.main(argv + ["--workers=2"]) == 0 and "no damage found" in capsys.readouterr().out
    info = publish.read_info(builders.version_dir(tmp_path / "out", "montgomery", f"r{RESOLUTION}"))
    train = builders.data_source("montgomery", "train", tmp_path / "out", resolution=RESOLUTION)
    train_shards = [s["file"] for s in info["splits"]["train"]["shards"]]

    def flip(path, offset):
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x5A
        path.write_bytes(bytes(data))

    # A pixel of train record 7 (second shard), found by its bytes.
    second = result.path / train_shards[1]
    flip(second, second.read_bytes().index(train.raw(7)) + 40)
    # The index (footer) of the third shard: its last bytes that are not zero padding.
    third = result.path / train_shards[2]
    flip(third, len(third.read_bytes().rstrip(b"\0")) - 30)
    # A padding byte of the fourth: no record is touched, but its bytes are not the ones written.
    fourth = result.path / train_shards[3]
    flip(fourth, len(fourth.read_bytes()) - 1)
    assert prepare.main(argv + ["--workers=1"]) == 1
    out = capsys.readouterr().out
    report = build.check_built("montgomery", tmp_path / "out", resolution=RESOLUTION, num_workers=1,
                               progress=False)
    found = [(d.split, d.shard, d.index) for d in report.damaged]
    assert found == [("train", train_shards[1], 7), ("train", train_shards[2], None),
                     ("train", train_shards[3], None)]
    assert "hash mismatch" in report.damaged[0].detail and "index (footer)" in report.damaged[1].detail
    assert "SHA-256 differs" in report.damaged[2].detail
    assert f"[train record 7] {train_shards[1]}" in out and f"[train: WHOLE SHARD] {train_shards[2]}" in out
    assert report.records == result.report["split_sizes"]
    reread = builders.data_source("montgomery", "train", tmp_path / "out", resolution=RESOLUTION)
    np.testing.assert_array_equal(reread[6]["image"], train[6]["image"])  # the shard's other records still read


def test_a_chunk_whose_worker_died_is_decoded_again_file_by_file_to_the_same_records(tmp_path):
    """The local runner's recovery (local._one_by_one: the chunk's files one per task in a fresh pool) gives what the
    chunk itself gives: the same record bytes at the same indexes and the same tally, a bad file named as such."""
    make_tb_tree(tmp_path / "raw", "montgomery")
    raw = builders.Montgomery(builders.tb_config(RESOLUTION)).read_raw(str(tmp_path / "raw"), skip_bad=False)
    records = [r for split in ("train", "validation", "test") for r in raw.splits[split]][:4]
    bad = records[1]
    Path(bad.path).write_bytes(Path(bad.path).read_bytes()[:60])
    spec = work.RecordSpec("tb", RESOLUTION, ())
    chunk = work.Chunk("train", 7, tuple(records), spec)
    expected = work.process_chunk(chunk)
    again = local._one_by_one(chunk, "killed by signal 9")
    assert [i for i, _ in again.records] == [7, 9, 10]
    assert again.records == expected.records and again.tally.to_json() == expected.tally.to_json()
    assert [p.item for p in again.tally.problems] == [layout.record_name(bad)]
    lost = local._lost_record(work.Chunk("train", 9, (records[0],), spec), "killed by signal 11")
    assert lost.records == [] and [p.item for p in lost.tally.problems] == [layout.record_name(records[0])]
    assert records[0].path in lost.tally.problems[0].detail and "signal 11" in lost.tally.problems[0].detail
