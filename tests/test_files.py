"""Local and gs:// outputs: metachex_jax.files and every writer that goes through it.

gs:// is served by the `fake_gcs` fixture (conftest.py): a stand-in for Cloud Storage only (objects in a local
folder, no appends); the code under test is the package's own.
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image
from test_metrics import multitask_predictions
from test_reports import assert_same_arrays

from metachex_jax.contract.pixels import PixelContract
from metachex_jax.core import distributed, files
from metachex_jax.data.build import builders, publish
from metachex_jax.evaluation import evaluate, metrics, reports
from metachex_jax.training.metric_writer import MetricWriter
from metachex_jax.transfer import plot, weights


def test_paths_local_and_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert files.is_url("gs://b/x") and not files.is_url("/tmp/x") and not files.is_url("~/x")
    assert files.absolute("gs://b/run") == "gs://b/run"
    assert files.absolute("run") == str(tmp_path / "run")
    assert files.absolute("~/run") == os.path.expanduser("~/run")
    assert files.join("gs://b/run", "eval", "x.json") == "gs://b/run/eval/x.json"
    assert files.join("/w", "eval", "x.json") == "/w/eval/x.json"


def test_local_write_atomic_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out" / "a.txt"
    files.write_atomic(path, "one\n")  # creates the folder
    files.write_atomic(path, b"two\n")
    assert path.read_text() == "two\n" and oct(path.stat().st_mode & 0o777) == "0o644"
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(path, "three\n")
    assert path.read_text() == "two\n" and os.listdir(path.parent) == ["a.txt"]


def test_write_atomic_exclusive_creates_once_locally_and_on_gs(tmp_path, fake_gcs):
    """exclusive=True (how a build is published): the first writer creates the file, a second one gets
    FileExistsError and changes nothing; no temporary file stays."""
    for path in (str(tmp_path / "out" / "info.json"), fake_gcs.url + "/out/info.json"):
        files.write_atomic(path, "first\n", exclusive=True)  # creates the folder
        with pytest.raises(FileExistsError):
            files.write_atomic(path, "second\n", exclusive=True)
        assert files.read_text(path) == "first\n"
    assert os.listdir(tmp_path / "out") == ["info.json"]
    assert oct((tmp_path / "out" / "info.json").stat().st_mode & 0o777) == "0o644"


def test_gs_write_read_and_helpers(fake_gcs):
    url = fake_gcs.url + "/run/x/a.txt"
    assert not files.exists(url) and not files.is_file(url)
    files.makedirs(fake_gcs.url + "/run/x")  # a no-op: objects need no folders
    files.write_atomic(url, "é\r\n")
    assert files.is_file(url) and files.is_dir(fake_gcs.url + "/run/x")
    assert files.read_bytes(url) == "é\r\n".encode() and fake_gcs.local(url).read_bytes() == "é\r\n".encode()


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metric_writer_gs_uploads_whole_file_and_a_resumed_writer_keeps_history(fake_gcs):
    workdir = fake_gcs.url + "/run"
    jsonl = fake_gcs.local(workdir + "/metrics.jsonl")
    writer = MetricWriter(workdir, enabled=True, flush_secs=3600)
    writer.write(1, {"loss": 2.0})
    writer.write(2, {"loss": 1.5, "auroc": float("nan")})
    assert not jsonl.exists()  # not yet uploaded: at most every flush_secs
    writer.close()
    assert read_jsonl(jsonl) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "auroc": None}]
    events = list(fake_gcs.local(workdir + "/tensorboard").iterdir())
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents") and events[0].stat().st_size > 0

    resumed = MetricWriter(workdir, enabled=True, flush_secs=0)  # uploads after every line
    resumed.write(3, {"loss": 1.0})
    assert [r["step"] for r in read_jsonl(jsonl)] == [1, 2, 3]  # old lines kept, visible before close
    resumed.close()
    assert read_jsonl(jsonl)[-1] == {"step": 3, "loss": 1.0}


def test_metric_writer_gs_uploads_after_flush_secs(fake_gcs):
    jsonl = fake_gcs.local(fake_gcs.url + "/run/metrics.jsonl")
    writer = MetricWriter(fake_gcs.url + "/run", enabled=True, flush_secs=0.2)
    writer.write(1, {"loss": 2.0})
    assert not jsonl.exists()
    time.sleep(0.3)
    writer.write(2, {"loss": 1.0})
    assert [r["step"] for r in read_jsonl(jsonl)] == [1, 2]
    writer.close()


def test_metric_writer_gs_survives_a_failed_upload_and_retries(fake_gcs, monkeypatch):
    from metachex_jax.training import metric_writer

    jsonl = fake_gcs.local(fake_gcs.url + "/run/metrics.jsonl")
    writer = MetricWriter(fake_gcs.url + "/run", enabled=True, flush_secs=0)
    real_write = metric_writer.files.write_atomic
    monkeypatch.setattr(metric_writer.files, "write_atomic",
                        lambda path, data: (_ for _ in ()).throw(OSError("503 Service Unavailable")))
    writer.write(1, {"loss": 2.0})  # the upload fails: training goes on
    assert not jsonl.exists()
    monkeypatch.setattr(metric_writer.files, "write_atomic", real_write)
    writer.write(2, {"loss": 1.0})  # the next flush uploads everything
    assert [r["step"] for r in read_jsonl(jsonl)] == [1, 2]
    writer.close()


def test_metric_writer_local_appends(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 3.0}\n')
    writer = MetricWriter(str(tmp_path), enabled=True)
    writer.write(1, {"loss": 2.0})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 0, "loss": 3.0}, {"step": 1, "loss": 2.0}]
    writer.close()


def test_reports_gs_round_trip_and_failed_writes_leave_the_old_object(fake_gcs):
    predictions = multitask_predictions(np.random.default_rng(1))
    csv_url = fake_gcs.url + "/run/p.csv"
    reports.write_predictions_csv(csv_url, predictions, column_names=reports.MULTITASK_COLUMN_NAMES)
    assert_same_arrays(predictions, reports.read_predictions_csv(csv_url, reports.MULTITASK_COLUMN_NAMES))
    json_url = fake_gcs.url + "/run/m.json"
    reports.write_json(json_url, {"auroc": 0.8})
    reports.write_text(fake_gcs.url + "/run/t.md", "| a |\n")
    before = {p.name: p.read_bytes() for p in fake_gcs.local(fake_gcs.url + "/run").iterdir()}
    assert json.loads(before["m.json"]) == {"auroc": 0.8} and before["t.md"] == b"| a |\n"

    with pytest.raises(ValueError):
        reports.write_json(json_url, {"auroc": float("inf")})
    with pytest.raises(ValueError):
        reports.write_predictions_csv(csv_url, {"a": np.arange(3), "b": np.arange(4)})
    after = {p.name: p.read_bytes() for p in fake_gcs.local(fake_gcs.url + "/run").iterdir()}
    assert after == before  # nothing partial, nothing extra


def test_eval_outputs_land_in_a_gs_workdir(fake_gcs):
    cols = multitask_predictions(np.random.default_rng(2))
    result = metrics.evaluate_multitask(cols, n_boot=10, seed=0)
    stem = evaluate.write_outputs(fake_gcs.url + "/run", "val", 7, "validation", cols, result)
    assert stem == fake_gcs.url + "/run/eval/val_step7"
    local = fake_gcs.local(stem)
    assert sorted(p.name for p in local.parent.iterdir()) == ["val_step7.json", "val_step7.md",
                                                               "val_step7_predictions.csv"]
    assert json.loads((local.parent / "val_step7.json").read_text()) == json.loads(reports.to_json_text(result))
    assert_same_arrays(cols, reports.read_predictions_csv(stem + "_predictions.csv", reports.MULTITASK_COLUMN_NAMES))


def test_builders_is_complete_and_skip_report_on_gs(fake_gcs):
    data_dir = fake_gcs.url + "/tensorflow_datasets"
    where = builders.version_dir(data_dir, "shenzhen", "r16")
    assert where == f"{data_dir}/shenzhen/r16/{builders.Shenzhen.VERSION}"
    assert not builders.is_complete(data_dir, "shenzhen", "r16")
    files.write_atomic(f"{where}/build-20250101T000000Z-abcdef/{builders.SKIP_REPORT_FILE}",
                       json.dumps({"skipped": []}))
    assert not builders.is_complete(data_dir, "shenzhen", "r16")  # no dataset_info.json: an unpublished build
    assert publish.publish(where, {"build": "build-20250101T000000Z-abcdef"})
    assert not publish.publish(where, {"build": "build-20250102T000000Z-abcdef"})  # created once, never replaced
    assert builders.is_complete(data_dir, "shenzhen", "r16")
    assert builders.read_skip_report(data_dir, "shenzhen", "r16") == {"skipped": []}


def test_roc_png_to_gs(fake_gcs):
    url = fake_gcs.url + "/report/roc.png"
    plot.write_roc_png(url, "t", [("a", np.array([0, 0.5, 1]), np.array([0, 0.8, 1]))], size=200)
    with Image.open(fake_gcs.local(url)) as image:
        assert image.format == "PNG" and image.size[0] == 200


def test_starting_weights_gs_spec_is_kept_as_a_url(fake_gcs):
    with pytest.raises(weights.StartingWeightsError) as e:
        weights.load_start(fake_gcs.url + "/no-such-run", None, 0, contract=PixelContract())
    assert f"{fake_gcs.url}/no-such-run does not exist" in str(e.value)


def play_processes(hosts: list[str], work) -> list:
    """Run one_process_at_a_time on len(hosts) threads standing for processes; hosts[i] = process i's disk."""
    barrier, results = threading.Barrier(len(hosts)), [None] * len(hosts)

    def process(i):
        results[i] = distributed.one_process_at_a_time(lambda: work(i, hosts[i]), "test", process_index=i,
                                                       process_count=len(hosts), barrier=lambda _: barrier.wait())

    threads = [threading.Thread(target=process, args=(i,)) for i in range(len(hosts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


@pytest.mark.parametrize("hosts, makers", [
    (["shared"] * 4, {0}),                       # one shared disk: process 0 makes the cache, the rest reuse it
    (["a", "a", "b", "b"], {0, 2}),              # a disk per host: each host's first process makes it
])
def test_one_process_at_a_time_makes_each_disk_cache_once(tmp_path, hosts, makers):
    running, log = threading.Lock(), []

    def make_if_missing(i, disk):
        assert running.acquire(blocking=False), "two processes worked at once"
        try:
            marker = tmp_path / disk / "done"
            if marker.exists():
                return "reused"
            time.sleep(0.05)
            marker.parent.mkdir(exist_ok=True)
            marker.write_text(str(i))
            log.append(i)
            return "made"
        finally:
            running.release()

    results = play_processes(hosts, make_if_missing)
    assert set(log) == makers and len(log) == len(makers)
    assert results == ["made" if i in makers else "reused" for i in range(len(hosts))]


def test_one_process_at_a_time_raises_after_every_turn(tmp_path):
    turns = []

    def work(i, _):
        turns.append(i)
        if i == 0:
            raise RuntimeError("generation failed")
        return i

    barrier, outcome = threading.Barrier(2), {}

    def process(i):
        try:
            outcome[i] = distributed.one_process_at_a_time(lambda: work(i, None), "t", process_index=i,
                                                           process_count=2, barrier=lambda _: barrier.wait())
        except RuntimeError as e:
            outcome[i] = str(e)

    threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert outcome == {0: "generation failed", 1: 1} and turns == [0, 1]  # process 1 was not left waiting
