"""Train-step benchmark for the DenseNet backbones: `python -m metachex_jax.bench train [--torch]`.

What is timed is the trainer's own step (`train_state.make_train_step`) for the CheXNet configuration (the
DenseNet with the 14-way pathology head alone) on one batch of random uint8 images: normalisation on the device,
forward, sigmoid binary cross-entropy, backward, the optax Adam update and the BatchNorm running-statistics
update, compiled with `jax.jit` with the state donated. Figures reported for whatever backend
JAX sees:

    img_per_s     batch / median step time over `--steps` timed steps, after `--warmup` untimed ones
    compile_s     lowering + XLA compilation of the step (ahead of time, so it is not mixed into step times)
    peak_mem_mb   GPU/TPU: the device's peak_bytes_in_use; CPU: the process's peak resident set size,
                  read before torch runs

`--torch` also times torchvision's DenseNet with the same hyper-parameters in the same process (eager, train mode,
same batch, head, loss and Adam; on CPU with as many threads as JAX uses; on GPU with bf16 autocast and
channels_last when `--dtype bfloat16`) and reports the ratio jax/torch. The JAX and torch steps are timed in
turns, so that a change in machine load hits both alike. Still, read ratios from a quiet machine: when other
processes oversubscribe the cores, torch's OpenMP threads slow down far more than XLA's (seen here: torch from
6 to 0.5 img/s while JAX halved), which inflates the ratio.

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

from metachex_jax import config_lib, optim, train_state
from metachex_jax.data import pipeline
from metachex_jax.models import SPECS, build_model, count_params
from metachex_jax.preprocessing import PixelContract, to_model_input

NUM_CLASSES = 14  # CheXNet's head: the 14 ChestX-ray14 pathologies (torchvision's classifier size)
LEARNING_RATE = 1e-4


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


def setup_jax(arch: str, batch: int, resolution: int, dtype: str) -> tuple[dict[str, Any], Callable]:
    """Compiles and runs the JAX step once; returns its figures so far and the step to time."""
    config = config_lib.pretrain_config(f"arch={arch},res={resolution}", multitask=False)  # CheXNet
    config.model.dtype = dtype
    config.optim.lr, config.optim.lr_scaling = LEARNING_RATE, "none"
    model = build_model(config.model, nnx.Rngs(0))
    tx = optim.make_optimizer(config.optim, batch, total_steps=1000)
    graphdef, state = train_state.create(model, tx)
    step_fn = jax.jit(train_state.make_train_step(graphdef, tx, config.loss, jnp.dtype(dtype),
                                                 contract=PixelContract.from_config(config)), donate_argnums=0)
    data = {k: jnp.asarray(v) for k, v in random_batch(batch, resolution).items()}

    start = time.perf_counter()
    compiled = step_fn.lower(state, data).compile()
    compile_s = time.perf_counter() - start

    def step() -> float:
        nonlocal state
        state, metrics = compiled(state, data)
        return float(metrics["loss"])  # waits for the device

    step()  # the first run allocates the buffers that peak memory counts
    return {
        "backend": jax.default_backend(),
        "params": count_params(model),
        "compile_s": compile_s,
        "peak_mem_mb": peak_memory_mb(jax.devices()[0]),  # before torch allocates anything
    }, step


def import_torch():
    """(torch, torchvision), or a clear error: torch is an optional extra."""
    try:
        import torch
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

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(images).float(), labels)
        loss.backward()
        optimizer.step()
        loss.item()  # waits for the device

    return {"torch_threads": torch.get_num_threads(), "torch_device": device.type}, step


def run(arch: str = "densenet121", batch: int = 8, resolution: int = 224, steps: int = 5, warmup: int = 2,
        dtype: str = "float32", torch: bool = False, out=sys.stdout) -> dict[str, Any]:
    """Runs the benchmark, prints the report to `out` (JSON last) and returns the figures."""
    if arch not in SPECS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {sorted(SPECS)}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    if batch < 1 or resolution < 32 or steps < 1 or warmup < 0:
        raise ValueError(f"need batch >= 1, resolution >= 32, steps >= 1, warmup >= 0; got "
                         f"batch={batch} resolution={resolution} steps={steps} warmup={warmup}")
    if torch:
        import_torch()  # fail before the (long) JAX part
    result: dict[str, Any] = {"arch": arch, "batch": batch, "resolution": resolution, "dtype": dtype,
                              "steps": steps, "warmup": warmup}
    jax_figures, jax_step = setup_jax(arch, batch, resolution, dtype)
    result |= jax_figures
    steps_to_time = {"jax": jax_step}
    if torch:
        torch_settings, steps_to_time["torch"] = setup_torch(arch, batch, resolution, dtype, result["backend"])
        result |= torch_settings
    times = time_interleaved(steps_to_time, steps, warmup)
    result["img_per_s"] = batch / statistics.median(times["jax"])
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {result['backend']} ({device.device_kind}, "
          f"{cpu_threads()} CPU threads): {arch} ({result['params']:,} params), batch {batch}, "
          f"{resolution}x{resolution}, {dtype}", file=out)
    print(f"  jax:   {result['img_per_s']:.2f} img/s, compile {result['compile_s']:.1f} s, "
          f"peak memory {result['peak_mem_mb']:.0f} MB", file=out)
    if torch:
        result["torch_img_per_s"] = batch / statistics.median(times["torch"])
        result["ratio"] = result["img_per_s"] / result["torch_img_per_s"]
        print(f"  torch: {result['torch_img_per_s']:.2f} img/s ({result['torch_device']}, "
              f"{result['torch_threads']} threads); jax/torch = {result['ratio']:.2f} "
              "(steps timed in turns)", file=out)
    print(json.dumps(result), file=out, flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.bench train", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="densenet121", choices=sorted(SPECS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--torch", action="store_true", help="also time torchvision in the same run")
    args = parser.parse_args(argv)
    return run(args.arch, args.batch, args.resolution, args.steps, args.warmup, args.dtype, args.torch)
