"""The benchmarks: `python -m metachex_jax.bench MODE` dispatches to every mode, and each mode runs end to end on
tiny inputs and ends with one parseable JSON line."""

from __future__ import annotations

import collections
import dataclasses
import importlib
import importlib.util
import io
import json
import os
import pathlib
import re
import sys

import docs_pages
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subprocesses
from metachex_jax.bench import MODES
from metachex_jax.bench import __main__ as dispatcher
from metachex_jax.bench import features, profile, results, suite
from metachex_jax.bench import train as train_bench

HAS_TORCH = importlib.util.find_spec("torch") is not None
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_json(text: str) -> dict:
    lines = text.strip().splitlines()
    assert len(lines) >= 2  # human-readable lines first
    return json.loads(lines[-1])


# --- the entry point ------------------------------------------------------------------------------------------

def test_every_mode_is_a_module_with_main_and_listed_once_in_the_docs():
    assert list(MODES) == ["train", "loop", "data", "probe", "features", "predict", "profile", "suite"]
    for mode in MODES:
        assert callable(importlib.import_module(f"metachex_jax.bench.{mode}").main)
    docs = docs_pages.all_text()  # README.md and docs/*.md (the modes' table is in docs/benchmarks.md)
    for mode in MODES:
        assert len(re.findall(rf"`python -m metachex_jax\.bench {mode}\b", docs)) == 1, mode
    for old in ("metachex_jax.loop_bench", "metachex_jax.data.bench", "metachex_jax.transfer.bench"):
        assert old not in docs


def test_dispatcher_lists_modes_and_refuses_unknown_ones(capsys):
    assert dispatcher.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {mode} " in out for mode in MODES)
    assert dispatcher.main([]) == 2
    assert dispatcher.main(["speed"]) == 2 and "unknown benchmark mode 'speed'" in capsys.readouterr().err


def test_a_mode_runs_through_python_dash_m():
    done = subprocesses.run([sys.executable, "-m", "metachex_jax.bench", "probe", "--folds=3"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert done.returncode == 0, done.stderr[-2000:]
    figures = last_json(done.stdout)
    assert figures["folds"] == 3 and figures["probe_s"] > 0


# --- train: the DenseNet train step ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_run():
    """One real benchmark run (with the torch comparison where torch is installed): printed text and figures."""
    out = io.StringIO()
    figures = train_bench.run("densenet_tiny", batch=4, resolution=32, steps=2, warmup=1, torch=HAS_TORCH, out=out)
    return out.getvalue(), figures


def test_train_prints_json_last_with_positive_figures(train_run):
    text, result = train_run
    figures = last_json(text)
    assert figures == result
    assert (figures["arch"], figures["batch"], figures["resolution"]) == ("densenet_tiny", 4, 32)
    assert figures["backend"] == "cpu"
    for key in ("img_per_s", "compile_s", "peak_mem_mb", "params"):
        assert figures[key] > 0, key
    # One run compares the forms: unrolled vs scanned (speed, compile time), remat vs not (step memory).
    assert list(figures["forms"]) == list(train_bench.FORMS)
    for form in figures["forms"].values():
        assert form["img_per_s"] > 0 and form["compile_s"] > 0 and form["step_mem_mb"] > 0
    assert figures["default_form"] == "scanned"  # scan_layers="auto" on CPU
    assert figures["img_per_s"] == figures["forms"]["scanned"]["img_per_s"]
    for base in ("unrolled", "scanned"):
        assert figures["remat_memory_ratio"][base] == pytest.approx(
            figures["forms"][f"{base}+remat"]["step_mem_mb"] / figures["forms"][base]["step_mem_mb"])
        assert figures["remat_memory_ratio"][base] < 1  # remat keeps less for the backward pass
    assert len(figures["load_avg_start"]) == 3 and "load average" in text


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed (optional extra)")
def test_train_torch_comparison_reports_ratio(train_run):
    _, figures = train_run
    assert figures["torch_img_per_s"] > 0
    assert figures["ratio"] == pytest.approx(figures["img_per_s"] / figures["torch_img_per_s"])


@pytest.mark.skipif(HAS_TORCH, reason="torch is installed")
def test_train_torch_missing_is_a_clear_error():
    with pytest.raises(SystemExit, match="--torch needs torch"):
        train_bench.run("densenet_tiny", batch=2, resolution=32, steps=1, warmup=0, torch=True, out=io.StringIO())


def test_train_times_the_trainers_step_which_really_trains():
    """The timed step is the trainer's real step: it lowers the loss and moves the BatchNorm running statistics."""
    figures, step = train_bench.setup_jax("densenet_tiny", batch=4, resolution=32, dtype="float32")
    assert figures["params"] > 0
    losses = [step() for _ in range(4)]
    assert losses[-1] < losses[0]


def test_train_rejects_bad_arguments():
    with pytest.raises(ValueError, match="densenet999"):
        train_bench.run("densenet999")
    with pytest.raises(ValueError, match="resolution=8"):
        train_bench.run("densenet_tiny", resolution=8)
    with pytest.raises(SystemExit):
        dispatcher.main(["train", "--dtype", "float16"])
    with pytest.raises(ValueError, match="unknown --forms .'folded'."):
        train_bench.run("densenet_tiny", resolution=32, forms=("scanned", "folded"))


# --- loop: the training loop against the bare step, and the input ceiling (--null_step) -------------------------

TINY_DEMO = ["--config.demo_data.num_nih=160", "--config.demo_data.num_shenzhen=12",
             "--config.demo_data.num_montgomery=8", "--config.demo_data.num_hospital=0", "--config.demo_data.size=64"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """One demo folder for every loop of this module: its tree and records are generated once (same parameters as
    `suite.tiny`'s)."""
    return str(tmp_path_factory.mktemp("demo"))


def test_loop_runs_the_trainer_and_the_bare_step(demo_dir, capsys):
    from metachex_jax.bench import loop

    config = os.path.join(REPO, "configs/pretrain.py:demo,arch=densenet_tiny,res=32")
    result = loop.main([f"--config={config}", f"--config.demo_dir={demo_dir}", *TINY_DEMO,
                        "--config.batch_size_per_device=8", "--steps=2", "--log_every=1", "--augment_on=device",
                        "--norepeat_bare"])
    assert last_json(capsys.readouterr().out) == result
    assert result["arch"] == "densenet_tiny" and result["image_size"] == 32
    assert result["bare_step_img_per_s"] > 0 and len(result["bare_step_runs"]) == 1
    for name in ("loop_device", "trainer_step_host", "trainer_step_device"):
        assert result[f"{name}_img_per_s"] > 0, name
        assert result[f"{name}_ratio"] == pytest.approx(
            result[f"{name}_img_per_s"] / result["bare_step_img_per_s"], rel=1e-3), name
    assert "loop_host_img_per_s" not in result and "ratio" not in result  # auto is "host" on CPU: not run here
    assert set(result["load"]) == {"bare_step", "loop_device", "trainer_step_host", "trainer_step_device"}
    with pytest.raises(SystemExit) as e:
        loop.main(["--steps=2"])
    assert e.value.code == 2 and "--config is required" in capsys.readouterr().err


def test_null_step_passes_the_state_through_and_reads_the_batch():
    """The null step is the trainer's step signature with nothing but the batch's first rows read: the state
    comes back unchanged but for its step counter, the "loss" is those rows' mean (numpy's), and a stop flag set
    on any device is reported as in the real step."""
    from metachex_jax.bench import loop
    from metachex_jax.core import preemption, sharding
    from metachex_jax.training import steps as train_steps

    mesh = sharding.make_mesh()
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = train_steps.TrainState(jnp.asarray(7, jnp.int32), {"w": jnp.arange(3.0)}, {}, ())
    images = np.random.default_rng(0).integers(0, 256, (4, 12, 12), np.uint8)
    step = loop.null_train_step(None, None, None, None, "device", replicated, None, None)
    signals = preemption.StopSignals(data)
    new_state, metrics, stop = step(state, sharding.to_global({"image": images}, data), signals.flags())
    assert int(new_state.step) == 8 and np.array_equal(new_state.params["w"], [0.0, 1.0, 2.0])
    assert float(metrics["loss"]) == pytest.approx(images[:, 0].astype(np.float64).mean(), rel=1e-6)
    assert int(stop) == 0
    signals.requested = True  # as SIGTERM sets it
    assert int(step(new_state, sharding.to_global({"image": images}, data), signals.flags())[2]) == 1


def test_null_step_loop_reports_every_worker_count(demo_dir, capsys):
    from metachex_jax.bench import loop

    result = loop.main(["--null_step", f"--config={os.path.join(REPO, 'configs/pretrain.py:demo,arch=densenet_tiny,res=32')}",
                        f"--config.demo_dir={demo_dir}", *TINY_DEMO, "--batch=8", "--workers=0,1", "--steps=2",
                        "--log_every=1"])
    assert last_json(capsys.readouterr().out) == result
    assert (result["global_batch"], result["image_size"], result["stored_resolution"]) == (8, 32, 36)
    rates = [result[f"null_step_device_{w}_workers_img_per_s"] for w in (0, 1)]
    assert min(rates) > 0 and result["img_per_s"] == max(rates)
    assert result["goal_met"] == (max(rates) >= loop.NULL_STEP_GOAL)
    with pytest.raises(SystemExit) as e:
        loop.main(["--null_step", "--workers=0,x"])
    assert e.value.code == 2 and "--workers takes counts" in capsys.readouterr().err


# --- suite: every mode with settings for the backend -------------------------------------------------------------

def test_suite_settings_per_backend():
    """The settings the issue asks for: CPU quick / full, one GPU quick (bf16, 224², batch 256, scanned; the loop
    with augment_on=device and automatic workers; predict at 256 with Grad-CAM), the full GPU suite adding float32
    and the unrolled form."""
    gpu = suite.settings_for("gpu", quick=True, torch=True)
    entries = {e.name: e.argv for e in suite.plan(gpu)}
    assert list(entries) == ["train_bfloat16", "input_ceiling", "loop_vs_step", "predict"]
    assert {"--batch=256", "--resolution=224", "--forms=scanned", "--torch"} <= set(entries["train_bfloat16"])
    assert {"--augment_on=device", "--config.data.workers=-1", "--config.model.dtype=bfloat16"} <= set(
        entries["loop_vs_step"])
    assert {"--null_step", "--workers=-1", "--batch=256"} <= set(entries["input_ceiling"])
    assert {"--batch=256", "--dtype=bfloat16"} <= set(entries["predict"])
    full = suite.plan(suite.settings_for("gpu", quick=False, torch=False))
    assert {"train_bfloat16", "train_float32"} <= {e.name for e in full}
    assert all("--forms=scanned,unrolled" in e.argv and "--torch" not in e.argv for e in full if e.mode == "train")
    cpu = {e.name: e.argv for e in suite.plan(suite.settings_for("cpu", quick=True, torch=False))}
    assert list(cpu) == ["train_float32", "input_ceiling", "predict"] and "--batch=8" in cpu["train_float32"]
    cpu_full = {e.name: e.argv for e in suite.plan(suite.settings_for("cpu", quick=False, torch=False))}
    assert "--workers=0,1,2" in cpu_full["input_ceiling"] and {"input_pipeline", "probe"} <= set(cpu_full)
    assert suite.settings_for("cpu", True, False).budget_s == 180 and gpu.budget_s == 480


@pytest.fixture(scope="module")
def tiny_gpu_suite(demo_dir, tmp_path_factory):
    """The one-GPU --quick suite's settings at the smallest sizes, run on this CPU (the CI smoke test)."""
    out = tmp_path_factory.mktemp("suite")
    settings = suite.tiny(suite.settings_for("gpu", quick=True, torch=HAS_TORCH), demo_dir)
    lines = []
    return suite.run(settings, out, echo=lines.append), out, lines


def test_suite_runs_every_benchmark_and_writes_json_and_markdown(tiny_gpu_suite):
    result, out, lines = tiny_gpu_suite
    assert [e.get("error") for e in result["entries"]] == [None] * 4
    env = result["environment"]
    assert env["backend"] == "cpu" and env["cpus"] >= 1 and env["cpu_model"] and "jax" in env["versions"]
    assert len(env["load_start"]) == 3 and len(env["load_end"]) == 3
    stem = f"{env['date']}_{env['machine']}_quick"
    assert json.loads((out / f"{stem}.json").read_text()) == json.loads(json.dumps(result))
    markdown = (out / f"{stem}.md").read_text()
    assert markdown == results.table(result)
    assert "=== predict:" in (out / f"{stem}.log").read_text()  # each mode's own output
    benchmarks = [row["benchmark"] for row in result["rows"]]
    for name in ("train step", "input ceiling (`loop --null_step`)", "training loop vs its bare step",
                 "inference forward", "Grad-CAM", "files to predictions"):
        assert name in benchmarks, name
    for row in result["rows"]:  # every headline row is in the table, with its figure
        assert f"| {row['benchmark']} | {row['setting']} | {row['figure']} |" in markdown
    loop_figures = next(e["figures"] for e in result["entries"] if e["name"] == "loop_vs_step")
    assert loop_figures["global_batch"] == 8 and "loop_device_ratio" in loop_figures
    assert any(line.startswith("  [4/4] predict") for line in lines)


def test_suite_records_a_failing_benchmark_and_goes_on(tmp_path):
    entry = suite.Entry("broken", "train", ("--arch=densenet999",), suite.predict_rows)
    with open(tmp_path / "log", "w") as log:
        out = suite.run_entry(entry, log)
    assert out["error"].startswith("SystemExit") and "rows" not in out
    assert "invalid choice: 'densenet999'" in (tmp_path / "log").read_text()


def test_a_run_on_an_oversubscribed_machine_judges_no_goal():
    env = {"backend": "cpu", "device": "cpu", "devices": 1, "cpu_model": "Some CPU", "cpus": 2,
           "load_start": [1.5, 1.0, 1.0], "load_end": [1.9, 1.0, 1.0], "versions": {"jax": "0"}}
    result = {"environment": env, "settings": {"quick": True}, "seconds": 60, "budget_s": 180, "entries": [],
              "rows": [dataclasses.asdict(results.Row("train step", "batch 8", "1 img/s", "", ">= 1.0x", True))]}
    assert "| >= 1.0x (met) |" in results.table(result) and "no goal is judged" not in results.table(result)
    env["load_end"][0] = 2.5  # above the 2 CPUs
    assert "| >= 1.0x |" in results.table(result) and "no goal is judged" in results.table(result)


def test_suite_records_its_commands_without_machine_paths():
    argv = suite.demo_config(suite.settings_for("cpu", quick=True, torch=False), 224)
    assert argv[0].startswith("--config=" + suite.PACKAGE_DIR)  # what runs: the installed package's recipe
    assert suite.portable(argv)[0] == "--config=metachex_jax/configs/pretrain.py:demo,res=224,arch=densenet121"


def test_docs_list_the_committed_suite_results():
    """docs/benchmarks.md's generated section is what `suite --render_docs` makes of docs/results/*.json (rerun
    it after adding a results file); every committed run is listed with its file."""
    page = (pathlib.Path(REPO) / "docs" / "benchmarks.md").read_text()
    section = results.docs_section(pathlib.Path(REPO) / "docs" / "results")
    assert section in page, "docs/benchmarks.md is stale: run python -m metachex_jax.bench suite --render_docs"
    for path in (pathlib.Path(REPO) / "docs" / "results").glob("*.json"):
        assert f"(results/{path.name})" in section


def test_render_docs_adds_a_run_to_the_page(tiny_gpu_suite, tmp_path, capsys):
    result, out, _ = tiny_gpu_suite
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "run.json").write_text(json.dumps(result))
    (tmp_path / "benchmarks.md").write_text(f"# Benchmarks\n\n{results.BEGIN}\nold\n{results.END}\n\nafter\n")
    assert dispatcher.main(["suite", "--render_docs", f"--docs_dir={tmp_path}"]) == 0
    page = (tmp_path / "benchmarks.md").read_text()
    assert "old" not in page and page.endswith("after\n") and results.table(result) in page
    assert f"#### {result['environment']['machine']}, {result['environment']['date']}" in page
    assert "updated" in capsys.readouterr().out
    (tmp_path / "benchmarks.md").write_text("no markers")
    with pytest.raises(ValueError, match="no generated section"):
        results.update_page(tmp_path / "benchmarks.md", tmp_path / "results")


# --- profile: the train step per operation ---------------------------------------------------------------------

def test_profile_classifies_a_known_function_by_phase_and_kind():
    """A function whose operations are known (a convolution, a 1x1 matmul, a concatenation, ReLU, a reduction
    and their gradients): its compiled HLO's operations get the phase and kind their JAX name stack and fused
    opcodes say."""

    def loss(w, x):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = jnp.concatenate([x, jax.nn.relu(y)], axis=-1)
        return jnp.mean(y @ jnp.ones((6, 2)))

    def step(w, x):
        return w - 0.1 * jax.grad(loss)(w, x)

    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 3))
    operations = profile.hlo_operations(jax.jit(step).lower(w, x).compile().as_text())
    classes = {(profile.xla_phase(op["op_name"]), profile.xla_kind(op["ops"])) for op in operations.values()}
    assert {("forward", "convolution"), ("backward", "convolution")} <= classes
    assert all(phase in profile.PHASES and kind in profile.KINDS for phase, kind in classes)
    assert profile.xla_kind({"convolution", "add"}) == "convolution"
    assert profile.xla_kind({"reduce", "multiply"}) == "batchnorm"
    assert profile.xla_kind({"concatenate", "copy"}) == "concat_copy"
    assert profile.xla_kind({"maximum", "multiply"}) == "elementwise"
    assert profile.xla_phase("jit(train_step)/transpose(jvp())/while/body/dot_general") == "backward"
    assert profile.xla_phase("jit(train_step)/jvp()/conv") == "forward"
    assert profile.xla_phase("jit(train_step)/jit(tree_bias_correction)/div") == "optimizer"


def test_profile_self_times_subtract_nested_events():
    event = collections.namedtuple("Event", "name start_ns duration_ns")
    events = [event("b", 10, 20), event("while", 0, 100), event("c", 40, 30), event("d", 45, 5),
              event("after", 100, 7)]
    assert dict(profile.self_times(events)) == {"while": 50.0, "b": 20.0, "c": 25.0, "d": 5.0, "after": 7.0}


def test_profile_mode_splits_the_step(capsys):
    result = profile.main(["--arch=densenet_tiny", "--batch=2", "--resolution=32", "--steps=1"])
    assert last_json(capsys.readouterr().out) == json.loads(json.dumps(result))
    jax_profile = result["jax"]
    assert sum(jax_profile["phase_share"].values()) == pytest.approx(1, abs=0.01)
    assert sum(jax_profile["kind_share"].values()) == pytest.approx(1, abs=0.01)
    for phase in profile.PHASES:
        assert jax_profile["phase_share"][phase] > 0
    assert jax_profile["ms_per_step"]["forward"]["convolution"] > 0
    assert jax_profile["ms_per_step"]["backward"]["convolution"] > 0


# --- data: the input pipeline -----------------------------------------------------------------------------------

def test_data_reports_reads_device_host_naive_and_build_throughput(capsys):
    from metachex_jax.bench import data

    result = data.main(["--synthetic", "--num_records=24", "--build_size=64", "--resolution=40", "--image_size=32",
                        "--batch_size=4", "--num_batches=3", "--num_workers=0", "--naive_images=2",
                        "--naive_samples=4", "--num_reads=10", "--jpeg_images=20", "--png16_images=3",
                        "--png16_size=128"])
    figures = last_json(capsys.readouterr().out)
    assert figures == result
    assert figures["stored_resolution"] == 40 and figures["image_size"] == 32 and figures["records"] > 0
    assert figures["source"].startswith("chestxray14/r40") and figures["build_img_per_s"] > 0
    for name in ("device", "crop_flip", "host", "naive_png"):
        assert figures[f"{name}_img_per_s"] > 0 and figures[f"{name}_img_per_cpu_s"] > 0, name
    assert figures["read_us_tf_example"] > 0 and figures["read_us"] > 0 and figures["record_layout_version"] == "2.0.0"
    assert figures["device_tf_example_img_per_cpu_s"] > 0
    assert figures["host_vs_naive_per_core"] == pytest.approx(
        figures["host_img_per_cpu_s"] / figures["naive_png_img_per_cpu_s"], rel=0.01)
    assert set(figures["goals_met"]) == set(data.GOALS)
    for source in ("jpeg", "png16"):  # the source builds against the naive PIL loop, per core
        for what in ("naive_pil", "reader", "build"):
            assert figures[f"{source}_{what}_img_per_cpu_s"] > 0
        assert figures[f"{source}_build_vs_naive_per_core"] == pytest.approx(
            figures[f"{source}_build_img_per_cpu_s"] / figures[f"{source}_naive_pil_img_per_cpu_s"], rel=0.02)
    assert figures["mixture_vs_single"] == pytest.approx(
        figures["mixture_img_per_cpu_s"] / figures["single_source_img_per_cpu_s"], rel=0.02)
    assert isinstance(figures["load_at_start"], float)
    with pytest.raises(SystemExit):
        data.main(["--num_records=16"])  # neither --synthetic nor --data_dir
    assert "give --synthetic, or --data_dir" in capsys.readouterr().err


# --- probe: the TB linear probe ---------------------------------------------------------------------------------

def test_features_probes_each_label_and_its_auroc_is_scikit_learns(capsys):
    """The per-label figures are scikit-learn's AUROC of the saved out-of-fold probabilities; labels too rare for the
    probe's inner search are left out, not guessed."""
    from sklearn.metrics import roc_auc_score

    result = features.main(["--images=120", "--folds=2", "--arch=densenet_tiny", "--image_size=32",
                            "--render_size=64"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["auroc"] == result["auroc"]
    assert list(result["auroc"]) == ["random"] and 0 < len(result["labels"]) <= 14
    for label, y in result["labels"].items():
        assert min(sum(y), len(y) - sum(y)) >= 10  # 2 folds: >= 5 of each class in every training half
        assert result["auroc"]["random"][label] == pytest.approx(
            roc_auc_score(y, result["oof"]["random"][label]), abs=1e-12)


def test_probe_runs_the_cross_validated_probe_and_its_references(capsys):
    from metachex_jax.bench import probe

    result = probe.main(["--folds=3", "--sklearn", "--extract", "--arch=densenet_tiny", "--resolution=32",
                         "--batch=4", "--batches=1"])
    assert (result["n"], result["d"]) == (probe.NUM_IMAGES, probe.NUM_FEATURES)
    assert result["probe_oof_auroc"] > 0.7  # the planted signal is found
    assert result["probe_s"] > 0 and result["sklearn_s_per_fold"] > 0 and result["extract_img_per_s"] > 0
    assert last_json(capsys.readouterr().out) == result


# --- predict: inference ---------------------------------------------------------------------------------------

def test_predict_mode_reports_forward_files_and_gradcam():
    from metachex_jax.bench import predict as predict_bench

    out = io.StringIO()
    figures = predict_bench.run("densenet_tiny", batch=4, image_size=32, steps=2, files=6, torch=HAS_TORCH, out=out)
    assert last_json(out.getvalue()) == json.loads(json.dumps(figures))
    for key in ("forward_img_per_s", "files_img_per_s", "files_ratio", "gradcam_s_per_image", "gradcam_vs_forward"):
        assert figures[key] > 0, key
    assert ("ratio_vs_torch" in figures) == HAS_TORCH
