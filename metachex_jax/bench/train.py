"""Train-step benchmark for the DenseNet backbones: `python -m metachex_jax.bench train [--torch]`.

What is timed is the trainer's own step (`train_steps.make_train_step`) for the CheXNet configuration (the
DenseNet with the 14-way pathology head alone) on one batch of random uint8 images: normalisation on the device,
forward, sigmoid binary cross-entropy, backward, the optax Adam update and the BatchNorm running-statistics
update, compiled with `jax.jit` with the state donated. Each form of the model (`--forms`; the dense blocks
unrolled or scanned, `config.model.scan_layers`, each with and without `config.model.remat`) is compiled and
timed; they compute the same function. Figures reported for whatever backend JAX sees:

    img_per_s     batch / median step time over `--steps` timed steps, after `--warmup` untimed ones
    compile_s     lowering + XLA compilation of the step (ahead of time, so it is not mixed into step times)
    step_mem_mb   the step's peak memory as XLA plans it (arguments + outputs - donated + temporaries;
                  `compiled.memory_analysis()`): comparable between forms in one process, on every backend
    peak_mem_mb   GPU/TPU: the device's peak_bytes_in_use; CPU: the process's peak resident set size, read
                  after every JAX form ran and before torch runs (all forms together)
    remat_memory_ratio   step_mem_mb with remat / without, per form (goal: <= 0.6)
    default_form  the form `scan_layers="auto"` picks on this backend; the top-level img_per_s, compile_s and
                  ratio are that form's

`--torch` also times torchvision's DenseNet with the same hyper-parameters in the same process (eager, train mode,
same batch, head, loss and Adam; on CPU with as many threads as JAX uses; on GPU with bf16 autocast and
channels_last when `--dtype bfloat16`) and reports the ratio jax/torch per form. All steps are timed in turns
(form 1, form 2, ..., torch, form 1, ...), so that a change in machine load hits all alike; the load average
before and after is printed and recorded. Still, read ratios from a quiet machine: when other processes
oversubscribe the cores, torch's OpenMP threads slow down far more than XLA's (seen here: torch from 6 to 0.5
img/s while JAX halved), which inflates the ratio.

Human-readable lines come first; the last line printed is exactly one JSON object with all the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metachex_jax.configs import chexnet
from metachex_jax.contract.pixels import PixelContract, to_model_input
from metachex_jax.data.input import pipeline
from metachex_jax.models import SPECS, build_model, count_params, resolve_scan_layers
from metachex_jax.training import optim
from metachex_jax.training import steps as train_steps

NUM_CLASSES = 14  # CheXNet's head: the 14 ChestX-ray14 pathologies (torchvision's classifier size)
LEARNING_RATE = 1e-4
# form -> (config.model.scan_layers, config.model.remat)
FORMS = {"unrolled": ("no", False), "scanned": ("yes", False), "unrolled+remat": ("no", True),
         "scanned+remat": ("yes", True)}


def default_form(backend: str) -> str:
    """The form the config default (scan_layers="auto", remat off) gives on `backend`."""
    return "scanned" if resolve_scan_layers("auto", backend) else "unrolled"


def random_batch(batch: int, resolution: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A random batch in the pipeline's NIH format (uint8 gray images, 0/1 targets, all masks on)."""
    return pipeline.random_nih_batch(batch, resolution, seed)


def cpu_threads() -> int:
    """Cores this process may run on: XLA's CPU thread pool is sized the same way."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def peak_memory_mb(device: jax.Device) -> float:
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def time_interleaved(steps: dict[str, Callable[[], None]], num_steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each `step()` (which must block until its result is ready).

    The steps take turns (a, b, a, b, ...) so that a change in machine load hits all of them alike.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(num_steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def step_memory_mb(compiled) -> float:
    """The compiled step's peak memory as XLA plans it: arguments + outputs - donated (aliased) + temporaries."""
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes) / 2**20


def compile_jax_step(arch: str, batch: int, resolution: int, dtype: str, form: str = "unrolled"):
    """The trainer's step for one form (a key of FORMS), compiled ahead of time on a random batch:
    (compiled step, state, batch, model, compile seconds)."""
    config = chexnet.get_config(f"arch={arch},res={resolution}")
    config.model.dtype = dtype
    config.model.scan_layers, config.model.remat = FORMS[form]
    config.optim.lr, config.optim.lr_scaling = LEARNING_RATE, "none"
    model = build_model(config.model, nnx.Rngs(0))
    tx = optim.make_optimizer(config.optim, batch, total_steps=1000)
    graphdef, state = train_steps.create(model, tx)
    step_fn = jax.jit(train_steps.make_train_step(graphdef, tx, config.loss, jnp.dtype(dtype),
                                                 contract=PixelContract.from_config(config)), donate_argnums=0)
    data = {k: jnp.asarray(v) for k, v in random_batch(batch, resolution).items()}
    start = time.perf_counter()
    compiled = step_fn.lower(state, data).compile()
    return compiled, state, data, model, time.perf_counter() - start


def setup_jax(arch: str, batch: int, resolution: int, dtype: str, form: str = "unrolled"
              ) -> tuple[dict[str, Any], Callable]:
    """Compiles and runs the JAX step of one form (a key of FORMS) once; returns its figures and the step to time."""
    compiled, state, data, model, compile_s = compile_jax_step(arch, batch, resolution, dtype, form)

    def step() -> float:
        nonlocal state
        state, metrics = compiled(state, data)
        return float(metrics["loss"])  # waits for the device

    step()  # the first run allocates the buffers that peak memory counts
    return {
        "backend": jax.default_backend(),
        "params": count_params(model),
        "compile_s": compile_s,
        "step_mem_mb": step_memory_mb(compiled),
    }, step


def import_torch():
    """(torch, torchvision), or a clear error: torch is an optional extra."""
    try:
        import torch  # optional: the torch extra
        import torchvision
    except ImportError as e:
        raise SystemExit(f"--torch needs torch and torchvision, which are not importable here ({e}); "
                         "install the 'torch' extra or run with a Python that has them") from e
    return torch, torchvision


def setup_torch(arch: str, batch: int, resolution: int, dtype: str, backend: str) -> tuple[dict[str, Any], Callable]:
    """torchvision's DenseNet with the same step; returns its settings and the step to time."""
    torch, torchvision = import_torch()
    device = torch.device("cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    amp = device.type == "cuda" and dtype == "bfloat16"
    memory_format = torch.channels_last if amp else torch.contiguous_format

    spec = SPECS[arch]  # torchvision's DenseNet class takes the same hyper-parameters, so every SPECS entry works
    model = torchvision.models.DenseNet(spec.growth_rate, spec.block_config, spec.num_init_features,
                                        spec.bn_size, num_classes=NUM_CLASSES)
    model = model.to(device, memory_format=memory_format).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    data = random_batch(batch, resolution)
    images_np = np.asarray(to_model_input(jnp.asarray(data["image"])))  # the same normalised input as JAX's
    images = torch.from_numpy(images_np).permute(0, 3, 1, 2).to(device).contiguous(memory_format=memory_format)
    labels = torch.from_numpy(data["pathology"]).to(device)

    def step():  # the record_function labels name the phases for `bench profile` (free when not profiling)
        optimizer.zero_grad(set_to_none=True)
        with torch.autograd.profiler.record_function("forward"), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(images).float(), labels)
        with torch.autograd.profiler.record_function("backward"):
            loss.backward()
        with torch.autograd.profiler.record_function("optimizer"):
            optimizer.step()
        loss.item()  # waits for the device

    return {"torch_threads": torch.get_num_threads(), "torch_device": device.type}, step


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def run(arch: str = "densenet121", batch: int = 8, resolution: int = 224, steps: int = 5, warmup: int = 2,
        dtype: str = "float32", torch: bool = False, forms=tuple(FORMS), out=sys.stdout) -> dict[str, Any]:
    """Runs the benchmark, prints the report to `out` (JSON last) and returns the figures."""
    if arch not in SPECS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {sorted(SPECS)}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    if batch < 1 or resolution < 32 or steps < 1 or warmup < 0:
        raise ValueError(f"need batch >= 1, resolution >= 32, steps >= 1, warmup >= 0; got "
                         f"batch={batch} resolution={resolution} steps={steps} warmup={warmup}")
    unknown = [f for f in forms if f not in FORMS]
    if unknown or not forms:
        raise ValueError(f"unknown --forms {unknown or forms}; choose from {list(FORMS)}")
    if torch:
        import_torch()  # fail before the (long) JAX part
    backend = jax.default_backend()
    result: dict[str, Any] = {"arch": arch, "batch": batch, "resolution": resolution, "dtype": dtype,
                              "steps": steps, "warmup": warmup, "backend": backend, "load_avg_start": load_average(),
                              "default_form": default_form(backend), "forms": {}}
    steps_to_time = {}
    for form in forms:
        figures, steps_to_time[form] = setup_jax(arch, batch, resolution, dtype, form)
        result["params"] = figures.pop("params")
        result["forms"][form] = {k: v for k, v in figures.items() if k != "backend"}
    result["peak_mem_mb"] = peak_memory_mb(jax.devices()[0])  # before torch allocates anything
    if torch:
        torch_settings, steps_to_time["torch"] = setup_torch(arch, batch, resolution, dtype, backend)
        result |= torch_settings
    times = time_interleaved(steps_to_time, steps, warmup)
    result["load_avg_end"] = load_average()
    for form in forms:
        result["forms"][form]["img_per_s"] = batch / statistics.median(times[form])
    if torch:
        result["torch_img_per_s"] = batch / statistics.median(times["torch"])
        for form in forms:
            result["forms"][form]["ratio"] = result["forms"][form]["img_per_s"] / result["torch_img_per_s"]
    result["remat_memory_ratio"] = {
        base: result["forms"][f"{base}+remat"]["step_mem_mb"] / result["forms"][base]["step_mem_mb"]
        for base in ("unrolled", "scanned") if base in forms and f"{base}+remat" in forms}
    headline = result["default_form"] if result["default_form"] in forms else forms[0]
    result |= {k: result["forms"][headline][k] for k in ("img_per_s", "compile_s", "ratio")
               if k in result["forms"][headline]}
    print_report(result, out)
    print(json.dumps(result), file=out, flush=True)
    return result


def print_report(result: dict[str, Any], out) -> None:
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {result['backend']} ({device.device_kind}, {cpu_threads()} CPU threads): "
          f"{result['arch']} ({result['params']:,} params), batch {result['batch']}, "
          f"{result['resolution']}x{result['resolution']}, {result['dtype']}; load average "
          f"{result['load_avg_start']} before, {result['load_avg_end']} after", file=out)
    print(f"  {'form':16s} {'img/s':>7s} {'compile s':>10s} {'step memory MB':>15s}"
          + (f" {'jax/torch':>10s}" if "torch_img_per_s" in result else ""), file=out)
    for form, f in result["forms"].items():
        mark = " (default here)" if form == result["default_form"] else ""
        print(f"  {form:16s} {f['img_per_s']:7.2f} {f['compile_s']:10.1f} {f['step_mem_mb']:15.0f}"
              + (f" {f['ratio']:10.2f}" if "ratio" in f else "") + mark, file=out)
    if "torch_img_per_s" in result:
        print(f"  torch:  {result['torch_img_per_s']:.2f} img/s ({result['torch_device']}, "
              f"{result['torch_threads']} threads); all steps timed in turns", file=out)
    for base, ratio in result["remat_memory_ratio"].items():
        print(f"  remat: {base} step memory x{ratio:.2f} (goal <= 0.6)", file=out)
    print(f"  process peak memory {result['peak_mem_mb']:.0f} MB (all JAX forms)", file=out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.bench train", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="densenet121", choices=sorted(SPECS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--torch", action="store_true", help="also time torchvision in the same run")
    parser.add_argument("--forms", default=",".join(FORMS),
                        help=f"comma-separated forms to compile and time, of: {', '.join(FORMS)}")
    args = parser.parse_args(argv)
    return run(args.arch, args.batch, args.resolution, args.steps, args.warmup, args.dtype, args.torch,
               tuple(f.strip() for f in args.forms.split(",") if f.strip()))
