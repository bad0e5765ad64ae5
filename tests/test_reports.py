"""metachex_jax.evaluation.reports: exact CSV round trips, atomic JSON, markdown, the recompute command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_metrics import multitask_predictions

from metachex_jax import reports as reports_command
from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.evaluation import metrics, reports


def assert_same_arrays(a: dict, b: dict):
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        if a[key].dtype.kind == "f":  # bitwise: NaN payload-free equality and the sign of zero
            bits = f"u{a[key].itemsize}"
            np.testing.assert_array_equal(a[key].view(bits), b[key].view(bits))
        else:
            np.testing.assert_array_equal(a[key], b[key])


def test_predictions_csv_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    f32 = rng.normal(size=7).astype(np.float32)
    f32[:5] = [np.nan, -0.0, np.float32(1e-45), np.finfo(np.float32).max, np.float32(0.1)]
    columns = {
        "prob": f32,
        "exact64": np.array([0.1, 1 / 3, -2.5e-300, 1e300, np.nan, 0.0, np.pi]),
        "half": np.array([0.1, 2, 3, 4, 5, 6, 65504], dtype=np.float16),
        "patient_id": np.array([1, 2, 3, 2**62, -5, 0, 7], dtype=np.int64),
        "fold": np.arange(7, dtype=np.uint8),
        "flag": np.array([True, False] * 3 + [True]),
        "image_name": np.array(["a.png", "b,c.png", 'q"uote', "ü", "", "x y", "0001"]),
        "image_id": np.array([b"CHNCXR_0001_0"] * 7),  # tfds gives bytes; read back as str
        "matrix": rng.random((7, 3)).astype(np.float32),
    }
    path = tmp_path / "p.csv"
    reports.write_predictions_csv(path, columns, column_names={"matrix": ["A", "B b", "C_c"]})
    read = reports.read_predictions_csv(path, column_names={"matrix": ["A", "B b", "C_c"], "absent": ["x"]})
    expected = dict(columns, image_id=columns["image_id"].astype(str))
    assert_same_arrays(expected, read)
    header = path.read_text().splitlines()[0]
    assert "matrix[B b]:float32" in header and "patient_id:int64" in header


def test_metrics_recomputed_from_csv_are_identical(tmp_path):
    predictions = multitask_predictions(np.random.default_rng(1))
    path = tmp_path / "predictions.csv"
    reports.write_predictions_csv(path, predictions, column_names=reports.MULTITASK_COLUMN_NAMES)
    from_csv = reports.read_predictions_csv(path, reports.MULTITASK_COLUMN_NAMES)
    assert_same_arrays(predictions, from_csv)
    in_memory = metrics.evaluate_multitask(predictions, n_boot=100, seed=3)
    recomputed = metrics.evaluate_multitask(from_csv, n_boot=100, seed=3)
    assert reports.to_json_text(recomputed) == reports.to_json_text(in_memory)
    assert repr(recomputed) == repr(in_memory)  # every float bit for bit, NaN included


def test_read_predictions_csv_names_every_problem(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a:int64,b:float32,c\n1,2.5,x\n2,zz\nq,nan,y\n3,1e400x,z\n")
    with pytest.raises(ValueError) as e:
        reports.read_predictions_csv(path)
    message = str(e.value)
    assert "header cell 3 'c'" in message and "line 3: 2 cells" in message
    path.write_text("a:int64,b:float32\n1,2.5\nq,nan\n3,oops\n")
    with pytest.raises(ValueError) as e:
        reports.read_predictions_csv(path)
    assert "a:int64: not int64: line 3: 'q'" in str(e.value) and "line 4: 'oops'" in str(e.value)
    path.write_text("m[x]:float32,m[x]:float32\n1,2\n")
    with pytest.raises(ValueError, match="inconsistent"):
        reports.read_predictions_csv(path)


def test_read_predictions_csv_rejects_reordered_pathologies(tmp_path):
    predictions = multitask_predictions(np.random.default_rng(2))
    path = tmp_path / "p.csv"
    names = dict(reports.MULTITASK_COLUMN_NAMES, pathology_prob=PATHOLOGIES[::-1])
    reports.write_predictions_csv(path, predictions, column_names=names)
    assert reports.read_predictions_csv(path)["pathology_prob"].shape == (90, 14)  # no names asked for
    with pytest.raises(ValueError) as e:
        reports.read_predictions_csv(path, reports.MULTITASK_COLUMN_NAMES)
    assert "'pathology_prob': sub-columns must be ['Atelectasis'," in str(e.value)
    assert "'pathology':" not in str(e.value)


def test_write_predictions_csv_rejects_bad_columns_and_keeps_old_file(tmp_path):
    path = tmp_path / "p.csv"
    reports.write_predictions_csv(path, {"a": np.arange(3)})
    before = path.read_bytes()
    with pytest.raises(ValueError) as e:
        reports.write_predictions_csv(path, {"a": np.arange(3), "b": np.arange(4), "c:d": np.arange(3),
                                             "m": np.zeros((3, 2))}, column_names={"m": ["x"]})
    message = str(e.value)
    assert "differ in length" in message and "'c:d'" in message and "'m'" in message
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["p.csv"]


def test_write_json_nan_as_null_numpy_values_and_key_order(tmp_path):
    path = tmp_path / "m.json"
    obj = {"z": np.float32(0.25), "a": [np.int64(3), float("nan"), (1, 2)],
           "m": {"x": np.array([1.5, np.nan])}, "flag": np.bool_(True), "none": None}
    reports.write_json(path, obj)
    text = path.read_text()
    assert json.loads(text) == {"z": 0.25, "a": [3, None, [1, 2]], "m": {"x": [1.5, None]}, "flag": True,
                                "none": None}
    assert text.index('"z"') < text.index('"a"') < text.index('"m"')  # insertion order kept


def test_write_json_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    reports.write_json(path, {"auroc": 0.8})
    before = path.read_bytes()
    with pytest.raises(ValueError) as e:  # conversion problems: all named, nothing written
        reports.write_json(path, {"a": float("inf"), "b": [object()], 3: 1})
    assert "$['a']" in str(e.value) and "$['b'][0]" in str(e.value) and "key 3" in str(e.value)
    assert path.read_bytes() == before

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)  # the write itself fails at the last step
    with pytest.raises(OSError, match="disk full"):
        reports.write_json(path, {"auroc": 0.9})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.json"]  # no temporary file left behind


def test_markdown_table():
    table = reports.markdown_table(["Model", "AUROC"], [["a|b", 0.5], ["c", "0.7"]])
    assert table == "| Model | AUROC |\n| --- | --- |\n| a\\|b | 0.5 |\n| c | 0.7 |\n"
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        reports.markdown_table(["a", "b"], [[1, 2], [3]])


def test_multitask_markdown_lists_every_metric():
    predictions = multitask_predictions(np.random.default_rng(3))
    result = metrics.evaluate_multitask(predictions, n_boot=50, seed=0)
    text = reports.multitask_markdown(result)
    lines = text.splitlines()
    assert lines[0] == "| Metric | Value | 95% CI |"
    eff = result["pathology"]["Effusion"]["auroc"]
    assert f"| AUROC Effusion | {eff['value']:.4f} | [{eff['ci_low']:.4f}, {eff['ci_high']:.4f}] |" in lines
    assert "| AUROC Hernia | n/a | [n/a, n/a] (50 resamples undefined) |" in lines
    assert any(line.startswith("| Mean AUROC (13 pathologies) |") for line in lines)
    mae = result["age"]["mae_years"]
    assert any(line.startswith(f"| Age MAE (years) | {mae['value']:.2f} |") for line in lines)
    assert sum(line.startswith("| ") for line in lines) == 2 + 14 + 1 + 4 + 2
    assert f"{result['counts']['patients']} patients" in text
    titled = reports.multitask_markdown(dict(result, loss=0.3), title="test, step 6")
    assert titled == "### test, step 6\n\n" + text


def test_recompute_command(tmp_path, capsys):
    predictions = multitask_predictions(np.random.default_rng(4))
    csv_path, json_path = tmp_path / "predictions.csv", tmp_path / "metrics.json"
    reports.write_predictions_csv(csv_path, predictions, column_names=reports.MULTITASK_COLUMN_NAMES)
    assert reports_command.main(["recompute", str(csv_path), "--n_boot", "40", "--json", str(json_path)]) == 0
    expected = metrics.evaluate_multitask(predictions, n_boot=40, seed=0)
    assert capsys.readouterr().out == reports.multitask_markdown(expected)
    assert json_path.read_text() == reports.to_json_text(expected)

    (tmp_path / "bad.csv").write_text("patient_id:int64\n1\n")
    assert reports_command.main(["recompute", str(tmp_path / "bad.csv")]) == 2
    assert "no task to evaluate" in capsys.readouterr().err

    # The module entry point, as users run it.
    done = subprocess.run([sys.executable, "-m", "metachex_jax.reports", "recompute", str(csv_path),
                           "--n_boot", "40"], capture_output=True, text=True, check=True)
    assert done.stdout == reports.multitask_markdown(expected)
