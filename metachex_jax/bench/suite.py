"""The benchmark suite: `python -m metachex_jax.bench suite [--quick]`, the one command to run on new hardware.

It runs the benchmark modes with settings chosen for the backend JAX finds (`settings_for`), on data it makes
itself (random batches; the synthetic demo's records for the loops, generated once and cached under the demo
folder), each mode in this process, one after the other:

    CPU, --quick (budget 3 min)    train step (scanned, float32, batch 8, 224²); the input ceiling (`loop
                                   --null_step`, batch 256, 224² crops of 256 px records, augment_on=device, 0
                                   workers); predict (batch 32) with Grad-CAM
    CPU (budget 15 min)            every model form of the train step; the input ceiling with 0, 1 and 2 workers;
                                   the demo's training loop against its bare step; predict with files; the input
                                   pipeline (`bench data`, reduced); the TB probe
    GPU/TPU, --quick (8 min,       train step (scanned, bfloat16, batch 256, 224²); the training loop (augment_on=
    compiles included)             device, automatic workers) against its bare step, and the input ceiling; predict
                                   (bfloat16, batch 256, with files) with Grad-CAM
    GPU/TPU (budget 30 min)        adds float32 and the unrolled form, the input pipeline and the TB probe

Where torch and torchvision are importable, the train step and the forward are compared with torchvision's at the
same batch and resolution (on GPU with bf16 autocast and channels_last for bfloat16).

Writes, in --out_dir, `<date>_<machine>[_quick].json` (the environment: device, library versions, CPU model and
load; the settings; every mode's figures; the headline rows), the same as a markdown table (`.md`) and every
mode's own output (`.log`). To list a run in the docs, copy its JSON into docs/results/ and run
`python -m metachex_jax.bench suite --render_docs`, which rewrites the generated section of docs/benchmarks.md.
A mode that fails is recorded with its error and the suite goes on; the exit status is then 1. The last line
printed is the JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import jax

from metachex_jax.bench import results
from metachex_jax.bench.results import Row
from metachex_jax.configs import pretrain
from metachex_jax.data.input import pipeline

PRETRAIN = pretrain.__file__  # the recipe file the loops load (`configs/pretrain.py` of the package)
PACKAGE_DIR = os.path.dirname(os.path.dirname(PRETRAIN))  # .../metachex_jax


def portable(argv) -> list[str]:
    """`argv` as recorded in the results: the package's own files as `metachex_jax/...` (as from a checkout's
    root), so that a committed results file names no path of the machine it ran on."""
    return [arg.replace(PACKAGE_DIR, "metachex_jax") for arg in argv]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the suite runs (`settings_for`; `tiny` shrinks any of them for tests)."""

    backend: str
    quick: bool
    budget_s: int
    torch: bool  # compare with torchvision (importable here)
    arch: str = "densenet121"
    resolution: int = 224  # model input S; records are stored at S * 8 / 7
    train_batch: int = 8
    train_dtypes: tuple[str, ...] = ("float32",)
    train_forms: tuple[str, ...] = ("scanned",)
    train_steps: int = 3
    null_step_batch: int = 256
    null_step_workers: tuple[int, ...] = (0,)  # -1: automatic
    loop_steps: int = 30
    loop_log_every: int = 5
    # The training loop against its bare step: (resolution, global batch, dtype, augment_on, workers); None: skip
    loop_vs_step: tuple[int, int, str, str, int] | None = None
    demo_records: int = 600  # ChestX-ray14-like demo images generated for the loops
    demo_size: int = 256  # their side (>= the stored resolution)
    demo_dir: str = ""  # "" = the recipe's demo folder (a cache kept between runs)
    predict_batch: int = 32
    predict_dtype: str = "float32"
    predict_files: int = 0
    data_argv: tuple[str, ...] = ()  # `bench data` options; () = skip
    probe_argv: tuple[str, ...] = ()  # `bench probe` options; () = skip


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("torchvision") is not None


def settings_for(backend: str, quick: bool, torch: bool) -> Settings:
    """The suite's settings on `backend` ("cpu", or an accelerator's: "gpu", "tpu")."""
    if backend == "cpu":
        if quick:
            return Settings(backend, quick, 180, torch, null_step_workers=(0,), loop_steps=20)
        return Settings(backend, quick, 900, torch, train_forms=("scanned", "unrolled", "scanned+remat",
                                                                 "unrolled+remat"),
                        train_steps=5, null_step_workers=(0, 1, 2), loop_vs_step=(64, 32, "float32", "host", 0),
                        predict_files=64,
                        data_argv=("--synthetic", "--num_records=512", "--num_batches=40", "--num_workers=2",
                                   "--naive_samples=32", "--jpeg_images=300", "--png16_images=8"),
                        probe_argv=("--sklearn",))
    gpu = Settings(backend, quick, 480 if quick else 1800, torch, train_batch=256, train_dtypes=("bfloat16",),
                   train_forms=("scanned",), train_steps=5, null_step_workers=(-1,),
                   loop_vs_step=(224, 256, "bfloat16", "device", -1), predict_batch=256,
                   predict_dtype="bfloat16", predict_files=128)
    if quick:
        return gpu
    return dataclasses.replace(gpu, train_dtypes=("bfloat16", "float32"), train_forms=("scanned", "unrolled"),
                               null_step_workers=(0, -1), data_argv=("--synthetic",), probe_argv=("--extract",))


def tiny(settings: Settings, demo_dir: str) -> Settings:
    """The same benchmarks at the smallest sizes (the smoke test: every mode and option of `settings` runs)."""
    loop_vs_step = settings.loop_vs_step
    if loop_vs_step is not None:
        loop_vs_step = (32, 8, *loop_vs_step[2:])
    data_argv = ()
    if settings.data_argv:
        data_argv = ("--synthetic", "--num_records=24", "--build_size=64", "--resolution=40", "--image_size=32",
                     "--batch_size=4", "--num_batches=2", "--num_workers=0", "--naive_images=2", "--naive_samples=2",
                     "--num_reads=4", "--no-mixture", "--jpeg_images=0", "--png16_images=0")
    probe_argv = ()
    if settings.probe_argv:
        probe_argv = ("--folds=2", *(("--extract", "--arch=densenet_tiny", "--resolution=32", "--batch=2",
                                      "--batches=1") if "--extract" in settings.probe_argv else ()))
    return dataclasses.replace(settings, arch="densenet_tiny", resolution=32, train_batch=2, train_steps=1,
                               null_step_batch=8, loop_steps=2, loop_log_every=1, loop_vs_step=loop_vs_step,
                               demo_records=160, demo_size=64, demo_dir=demo_dir, predict_batch=2,
                               predict_files=min(settings.predict_files, 2), data_argv=data_argv,
                               probe_argv=probe_argv)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One benchmark run: `python -m metachex_jax.bench MODE *argv`, and its headline rows from its figures."""

    name: str
    mode: str
    argv: tuple[str, ...]
    rows: Callable[[dict], list[Row]]


def plan(s: Settings) -> list[Entry]:
    """The suite's benchmark runs for settings `s`, in order."""
    entries = []
    torch = ("--torch",) if s.torch else ()
    for dtype in s.train_dtypes:
        entries.append(Entry(
            f"train_{dtype}", "train",
            (f"--arch={s.arch}", f"--batch={s.train_batch}", f"--resolution={s.resolution}", f"--dtype={dtype}",
             f"--steps={s.train_steps}", "--warmup=1", f"--forms={','.join(s.train_forms)}", *torch),
            lambda f, s=s: train_rows(f, s.backend)))
    entries.append(Entry(
        "input_ceiling", "loop",
        ("--null_step", *demo_config(s, s.resolution), f"--batch={s.null_step_batch}",
         f"--workers={','.join(map(str, s.null_step_workers))}", f"--steps={s.loop_steps}",
         f"--log_every={s.loop_log_every}"),
        null_step_rows))
    if s.loop_vs_step is not None:
        resolution, batch, dtype, augment_on, workers = s.loop_vs_step
        entries.append(Entry(
            "loop_vs_step", "loop",
            (*demo_config(s, resolution), f"--config.batch_size_per_device={batch // jax.device_count()}",
             f"--config.model.dtype={dtype}", f"--config.data.workers={workers}", f"--augment_on={augment_on}",
             "--norepeat_bare", "--notrainer_steps", f"--steps={s.loop_steps}", f"--log_every={s.loop_log_every}"),
            lambda f, augment_on=augment_on, workers=workers, dtype=dtype: loop_rows(f, augment_on, workers,
                                                                                     dtype)))
    entries.append(Entry(
        "predict", "predict",
        (f"--arch={s.arch}", f"--batch={s.predict_batch}", f"--resolution={s.resolution}",
         f"--dtype={s.predict_dtype}", "--steps=3", f"--files={s.predict_files}", *torch),
        predict_rows))
    if s.data_argv:
        entries.append(Entry("input_pipeline", "data", s.data_argv, data_rows))
    if s.probe_argv:
        entries.append(Entry("probe", "probe", s.probe_argv, probe_rows))
    return entries


def demo_config(s: Settings, resolution: int) -> tuple[str, ...]:
    """The pretraining demo recipe at model input `resolution`, on `s.demo_records` generated demo images."""
    argv = [f"--config={PRETRAIN}:demo,res={resolution},arch={s.arch}",
            f"--config.demo_data.num_nih={s.demo_records}", "--config.demo_data.num_shenzhen=12",
            "--config.demo_data.num_montgomery=8", "--config.demo_data.num_hospital=0",
            f"--config.demo_data.size={s.demo_size}"]
    if s.demo_dir:
        argv.append(f"--config.demo_dir={s.demo_dir}")
    return tuple(argv)


# --- the headline rows of each mode's figures -----------------------------------------------------------------

def train_rows(f: dict, backend: str) -> list[Row]:
    rows = []
    for form, x in f["forms"].items():
        setting = f"{f['arch']}, {form}, {f['dtype']}, batch {f['batch']}, {f['resolution']}²"
        figure = f"{x['img_per_s']:.1f} img/s; compile {x['compile_s']:.1f} s; step memory {x['step_mem_mb']:.0f} MB"
        reference, goals, met = "", [], []
        if "torch_img_per_s" in f:
            kind = "torchvision AMP + channels_last" if backend != "cpu" and f["dtype"] == "bfloat16" else \
                "torchvision eager"
            reference = f"{kind} {f['torch_img_per_s']:.1f} img/s: **{x['ratio']:.2f}x**"
        if backend == "cpu" and f["dtype"] == "float32" and form == f["default_form"]:
            goals.append(">= 1.0x torchvision")
            met.append(x["ratio"] >= 1.0 if "ratio" in x else None)
        if backend != "cpu" and f["dtype"] == "bfloat16":
            goals.append(">= 2.0x torch AMP + channels_last")
            met.append(x["ratio"] >= 2.0 if "ratio" in x else None)
        if backend != "cpu" and form == "scanned":
            goals.append("compile <= 30 s")
            met.append(x["compile_s"] <= 30)
        rows.append(Row("train step", setting, figure, reference, "; ".join(goals), all_met(met)))
    return rows


def all_met(checks: list) -> bool | None:
    """True / False when every check could be made; None when there is none or one could not be (no torch)."""
    if not checks or None in checks:
        return None
    return all(checks)


def null_step_rows(f: dict) -> list[Row]:
    rows = []
    for key, value in f.items():
        if key.startswith("null_step_") and key.endswith("_img_per_s"):
            augment_on, workers = key.removeprefix("null_step_").removesuffix("_workers_img_per_s").split("_")
            on_cpu = f["backend"] == "cpu"
            rows.append(Row("input ceiling (`loop --null_step`)",
                            f"{f['image_size']}² crops of {f['stored_resolution']} px records, batch "
                            f"{f['global_batch']}, augment_on={augment_on}, {workers} workers",
                            f"{value:,.0f} img/s", "", f">= {f['goal']:,} img/s (2-core CPU)" if on_cpu else "",
                            value >= f["goal"] if on_cpu and f["cpu_count"] <= 2 else None))
    return rows


def loop_rows(f: dict, augment_on: str, workers: int, dtype: str) -> list[Row]:
    ratio = f[f"loop_{augment_on}_ratio"]
    on_cpu = f["backend"] == "cpu"
    goal = 0.97 if on_cpu else 0.95
    return [Row("training loop vs its bare step", f"{f['arch']} (MetaChexNet), {f['image_size']}², batch "
                f"{f['global_batch']}, {dtype}, augment_on={augment_on}, workers "
                f"{'automatic' if workers == -1 else workers}",
                f"{f[f'loop_{augment_on}_img_per_s']:.1f} img/s", f"bare step {f['bare_step_img_per_s']:.1f} img/s: "
                f"**{ratio:.3f}**", f">= {goal} of the bare step", ratio >= goal)]


def predict_rows(f: dict) -> list[Row]:
    setting = f"{f['arch']} MetaChexNet, batch {f['batch']}, {f['image_size']}², {f['dtype']}"
    reference = f"torchvision eager {f['torch_img_per_s']:.1f} img/s: **{f['ratio_vs_torch']:.2f}x**" \
        if "ratio_vs_torch" in f else ""
    on_cpu = f["backend"] == "cpu"
    rows = [Row("inference forward", setting, f"{f['forward_img_per_s']:.1f} img/s (compile "
                f"{f['forward_compile_s']:.1f} s)", reference, ">= 1.0x torchvision" if on_cpu else "",
                f["ratio_vs_torch"] >= 1.0 if on_cpu and "ratio_vs_torch" in f else None),
            Row("Grad-CAM", setting, f"{1e3 * f['gradcam_s_per_image']:.1f} ms/image",
                f"{f['gradcam_vs_forward']:.2f}x a forward", "<= 3x a forward", f["gradcam_vs_forward"] <= 3)]
    if "files_ratio" in f:
        rows.append(Row("files to predictions", f"{setting}, {f['files']} 1024 px PNGs",
                        f"{f['files_img_per_s']:.1f} img/s", f"{f['files_ratio']:.2f}x the bare forward",
                        ">= 0.85x the forward", f["files_ratio"] >= 0.85))
    return rows


def data_rows(f: dict) -> list[Row]:
    setting = f"{f['image_size']}² from {f['stored_resolution']} px records, batch {f['batch_size']}, one thread"
    met = f["goals_met"]
    return [Row("input: read + batch (augment_on=device)", setting, f"{f['device_img_per_cpu_s']:,.0f} img per CPU s",
                "", ">= 10,000", met.get("device_img_per_cpu_s")),
            Row("input: read + augment (augment_on=host)", setting, f"{f['host_img_per_cpu_s']:,.0f} img per CPU s",
                f"naive PNG loader: {f['host_vs_naive_per_core']:.1f}x per core", ">= 1,000; >= 10x naive",
                all_met([met.get("host_img_per_cpu_s"), met.get("host_vs_naive_per_core")]))]


def probe_rows(f: dict) -> list[Row]:
    rows = [Row("TB linear probe", f"{f['folds']}-fold CV with the inner L2 search, {f['n']} x {f['d']}",
                f"{f['probe_s']:.2f} s", f"scikit-learn {f['speedup_vs_sklearn']:.0f}x slower per fold"
                if "speedup_vs_sklearn" in f else "", "< 10 s (2-core CPU)",
                f["probe_s"] < 10 if f.get("folds") == 10 else None)]
    if "extract_img_per_s" in f:
        rows.append(Row("frozen-feature extraction", f"{f['arch']}, {f['resolution']}², batch {f['batch']}",
                        f"{f['extract_img_per_s']:.1f} img/s"))
    return rows


# --- running -----------------------------------------------------------------------------------------------------

def run_entry(entry: Entry, log) -> dict:
    """Runs one benchmark in this process: {"name", "mode", "argv", "seconds", "figures" | "error"}."""
    out = {"name": entry.name, "mode": entry.mode, "argv": portable(entry.argv)}
    log.write(f"\n=== {entry.name}: python -m metachex_jax.bench {entry.mode} {' '.join(entry.argv)}\n")
    log.flush()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # the suite prints a summary
            figures = importlib.import_module(f"metachex_jax.bench.{entry.mode}").main(list(entry.argv))
        out["figures"] = json.loads(json.dumps(figures))  # plain JSON types
        out["rows"] = [dataclasses.asdict(row) for row in entry.rows(out["figures"])]
    except (Exception, SystemExit) as e:  # noqa: BLE001 - one failing benchmark must not end the suite
        out["error"] = f"{type(e).__name__}: {e}"
        log.write(traceback.format_exc())
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def run(settings: Settings, out_dir: Path, echo=print) -> dict:
    """Runs the suite, writes its JSON, markdown and log to `out_dir`, and returns the JSON object."""
    device = jax.devices()[0]
    env = results.environment(jax.default_backend(), device.device_kind, jax.device_count(),
                              pipeline.available_cpus())
    result = {"environment": env, "settings": dataclasses.asdict(settings), "budget_s": settings.budget_s}
    stem = results.file_stem(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = plan(settings)
    echo(f"benchmark suite{' --quick' if settings.quick else ''} on {env['machine']} ({settings.backend} settings, "
         f"{env['cpu_model']}, load {env['load_start'][0]}): {len(entries)} benchmarks, budget "
         f"{settings.budget_s // 60} min; each benchmark's output goes to {out_dir / (stem + '.log')}")
    start = time.perf_counter()
    done = []
    with open(out_dir / f"{stem}.log", "w") as log:
        for number, entry in enumerate(entries, 1):
            done.append(run_entry(entry, log))
            rows = done[-1].get("rows", [])
            summary = done[-1].get("error") or (f"{rows[0]['figure']}" if rows else "")
            echo(f"  [{number}/{len(entries)}] {entry.name}: {done[-1]['seconds']:.0f} s; {summary}")
    result |= {"seconds": round(time.perf_counter() - start, 1), "entries": done,
               "rows": [row for entry in done for row in entry.get("rows", [])]}
    env["load_end"] = [round(x, 2) for x in os.getloadavg()]
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(results.table(result))
    echo(results.table(result))
    echo(f"wrote {out_dir / (stem + '.json')} and .md ({result['seconds'] / 60:.1f} min; budget "
         f"{settings.budget_s // 60} min)")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.bench suite", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short suite (CPU 3 min, GPU 8 min)")
    parser.add_argument("--out_dir", default="bench_results", help="where the JSON, markdown and log go")
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=None,
                        help="compare with torchvision (default: when it is importable)")
    parser.add_argument("--render_docs", action="store_true",
                        help="run nothing: rewrite the generated section of DOCS_DIR/benchmarks.md from the "
                             "results files in DOCS_DIR/results/")
    parser.add_argument("--docs_dir", default="docs", help="the docs folder (with --render_docs)")
    args = parser.parse_args(argv)
    if args.render_docs:
        docs = Path(args.docs_dir)
        changed = results.update_page(docs / "benchmarks.md", docs / "results")
        print(f"{docs / 'benchmarks.md'}: {'updated' if changed else 'already up to date'}")
        return {"updated": changed}
    torch = torch_installed() if args.torch is None else args.torch
    result = run(settings_for(jax.default_backend(), args.quick, torch), Path(args.out_dir))
    print(json.dumps(result), flush=True)
    if any("error" in entry for entry in result["entries"]):
        raise SystemExit(1)
    return result
