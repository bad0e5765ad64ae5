"""The train-step benchmark runs end to end on a tiny DenseNet and ends with one parseable JSON line."""

from __future__ import annotations

import importlib.util
import io
import json

import pytest

from metachex_jax import bench

HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def bench_run():
    """One real benchmark run (with the torch comparison where torch is installed): printed text and figures."""
    out = io.StringIO()
    figures = bench.run("densenet_tiny", batch=4, resolution=32, steps=2, warmup=1, torch=HAS_TORCH, out=out)
    return out.getvalue(), figures


def test_bench_prints_json_last_with_positive_figures(bench_run):
    text, result = bench_run
    lines = text.strip().splitlines()
    assert len(lines) >= 2  # human-readable lines first
    figures = json.loads(lines[-1])
    assert figures == pytest.approx(result)
    assert (figures["arch"], figures["batch"], figures["resolution"]) == ("densenet_tiny", 4, 32)
    assert figures["backend"] == "cpu"
    for key in ("img_per_s", "compile_s", "peak_mem_mb", "params"):
        assert figures[key] > 0, key


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed (optional extra)")
def test_bench_torch_comparison_reports_ratio(bench_run):
    _, figures = bench_run
    assert figures["torch_img_per_s"] > 0
    assert figures["ratio"] == pytest.approx(figures["img_per_s"] / figures["torch_img_per_s"])


@pytest.mark.skipif(HAS_TORCH, reason="torch is installed")
def test_bench_torch_missing_is_a_clear_error():
    with pytest.raises(SystemExit, match="--torch needs torch"):
        bench.run("densenet_tiny", batch=2, resolution=32, steps=1, warmup=0, torch=True, out=io.StringIO())


def test_bench_times_the_trainers_step_which_really_trains():
    """The timed step is the trainer's real step: it lowers the loss and moves the BatchNorm running statistics."""
    figures, step = bench.setup_jax("densenet_tiny", batch=4, resolution=32, dtype="float32")
    assert figures["params"] > 0
    losses = [step() for _ in range(4)]
    assert losses[-1] < losses[0]


def test_bench_rejects_bad_arguments():
    with pytest.raises(ValueError, match="densenet999"):
        bench.run("densenet999")
    with pytest.raises(ValueError, match="resolution=8"):
        bench.run("densenet_tiny", resolution=8)
    with pytest.raises(SystemExit):
        bench.main(["--dtype", "float16"])
