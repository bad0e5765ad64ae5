"""Benchmark: the full training loop (input pipeline + step + logging) against the bare train step.

    python -m metachex_jax.bench loop --config=configs/pretrain.py:demo --steps=60

Runs the real trainer (`trainer.train_and_evaluate`) for `--steps` steps in a scratch workdir, once with
config.data.augment_on="host" and once with "device", and reads its logged img/s (every `log_every` steps; the
first interval, which includes compilation, is dropped). Then times train steps alone, on one batch already on
the device, for the same number of steps:

    bare          `train_steps.make_train_step` on a batch of crops: the reference of the goal (loop >= 0.97 x bare
                  on CPU for the demo config; >= 0.95 on a GPU with augment_on=device)
    trainer_host  the trainer's own jitted step (`trainer.jit_train_step`) with its stop-flag input and the OR over
                  processes (preemption.py): the cost of the preemption check, against bare
    trainer_device  the same with the augmentation in the step, on a batch of stored (uncropped) images: the
                  device's cost of augment_on="device", against bare

Steps and loops run in turns (bare, loops, bare again: the median of the two bare timings is used), so a change
in machine load hits both; the load average is printed next to every figure. The last line of output is one JSON
object with the figures.

The input ceiling, `--null_step`:

    python -m metachex_jax.bench loop --null_step [--workers=0,1,2] [--batch=256]

runs the same trainer with its train step replaced by a trivial jitted function of the batch (`null_train_step`),
so its img/s is what the input pipeline and the loop deliver to a device: reading and batching the records, the
per-batch transfer (`device_put` of the global batch), the stop-flag input, the one-step-late loss check and the
logging. Without --config it generates its own records (the synthetic demo, stored at 256 px, 224 px crops;
NULL_STEP_CONFIG) with `augment_on=device`; one run per `--workers` count (-1: the automatic count). The goal
(issue 24): >= 3,000 img/s on the 2-core CPU, 1.5x the H200's measured bf16 step rate.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx
from ml_collections import config_flags

from metachex_jax.configs import config_lib, pretrain
from metachex_jax.contract.pixels import PixelContract
from metachex_jax.core import preemption, sharding
from metachex_jax.core.errors import UserError
from metachex_jax.data.input import pipeline
from metachex_jax.data.input.spec import DataSpec
from metachex_jax.models import build_model
from metachex_jax.training import optim
from metachex_jax.training import steps as train_steps
from metachex_jax.training import trainer


def load() -> float:
    return round(os.getloadavg()[0], 2)


NULL_STEP_GOAL = 3000  # img/s on the 2-core CPU (issue 24)
# --null_step without --config: the demo's synthetic records at 256 px (generated once, cached under the config's
# demo_dir), 224 px crops; the model only sets the size of the state the null step passes through (and the final
# one-batch evaluation), so the tiny one keeps set-up short.
NULL_STEP_CONFIG = f"{pretrain.__file__}:demo,res=224,arch=densenet_tiny"


def null_train_step(config, graphdef, tx, class_weights, augment_on, replicated, contract, augmentation):
    """A stand-in for `trainer.jit_train_step` (same arguments, same outputs) whose step does almost nothing:
    the state passes through (donated, its step counter advanced) and the "loss" is the mean of every image's
    first row, so each batch is consumed on the device. The stop flags are reduced as in the real step."""
    del config, graphdef, tx, class_weights, augment_on, contract, augmentation

    def train_step(state, batch, stop_flags):
        loss = jnp.mean(batch["image"][:, 0].astype(jnp.float32))
        return state.replace(step=state.step + 1), {"loss": loss}, preemption.any_process_stops(stop_flags)

    return jax.jit(train_step, donate_argnums=0, out_shardings=(replicated, replicated, replicated))


def loop_throughput(config, steps: int, log_every: int, augment_on: str | None = None, workers: int | None = None,
                    null_step: bool = False) -> float:
    """Median img/s the trainer logs over `steps` steps (first interval dropped); `null_step`: with
    `null_train_step` as its step."""
    config = config.copy_and_resolve_references()
    if augment_on is not None:
        config.data.augment_on = augment_on
    if workers is not None:
        config.data.workers = workers
    config.max_steps = steps + log_every
    config.log_every_steps = log_every
    config.eval_every_steps = 10**9  # evaluate only at the end (outside the timed intervals)
    config.eval_max_batches = 1
    config.n_boot = 0
    with tempfile.TemporaryDirectory() as workdir:
        trainer.train_and_evaluate(config, workdir,
                                   make_train_step=null_train_step if null_step else trainer.jit_train_step)
        logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rates = [x["train/img_per_s"] for x in logged if "train/img_per_s" in x]
    return statistics.median(rates[1:])


def bare_step_throughput(config, steps: int, trainer_step: str | None = None) -> float:
    """img/s of a jitted train step alone, on one device-resident batch.

    trainer_step None: `train_steps.make_train_step` on crops (the bare step); "host" / "device": the trainer's
    step (`trainer.jit_train_step`, stop flags included) for that augment_on, on crops / stored images."""
    batch_size = config.batch_size_per_device * jax.device_count()
    model = build_model(config.model, nnx.Rngs(0))
    tx = optim.make_optimizer(config.optim, batch_size, steps)
    graphdef, state = train_steps.create(model, tx)
    mesh = sharding.make_mesh()
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = jax.device_put(state, replicated)
    contract = PixelContract.from_config(config)
    size = config.data.resolution if trainer_step == "device" else config.data.image_size
    batch = sharding.to_global(pipeline.random_nih_batch(batch_size, size), data)
    if trainer_step is None:
        jitted = jax.jit(train_steps.make_train_step(graphdef, tx, config.loss, jnp.dtype(config.model.dtype),
                                                     contract=contract),
                         donate_argnums=0)
        step = lambda state: jitted(state, batch)  # noqa: E731
    else:
        jitted = trainer.jit_train_step(config, graphdef, tx, None, trainer_step, replicated, contract,
                                        DataSpec.from_config(config).augmentation)
        flags = preemption.StopSignals(data).flags()  # not entered: no handlers, the flag stays 0
        step = lambda state: jitted(state, batch, flags)[:2]  # noqa: E731
    for _ in range(2):  # compile and warm up
        state, metrics = step(state)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state)
    jax.block_until_ready(metrics)
    return steps * batch_size / (time.perf_counter() - start)


def parse_args(argv: list[str]):
    """The options of `--config=FILE[:ARGS] [--config.x=y ...] [--steps=N] [--log_every=N] ...` (module docstring).

    Flags of its own (not absl's global ones), so that importing this module defines nothing globally."""
    argv = ["python -m metachex_jax.bench loop", *argv]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", NULL_STEP_CONFIG, "Training config, e.g. configs/pretrain.py:demo "
                                    "(required, but for --null_step)", flag_values=fv, sys_argv=argv)
    flags.DEFINE_integer("steps", 60, "Timed steps (after the first logging interval).", flag_values=fv)
    flags.DEFINE_integer("log_every", 10, "Logging interval of the loop run.", flag_values=fv)
    flags.DEFINE_list("augment_on", None, "The loops to run: config.data.augment_on values (default: host,device; "
                      "with --null_step: device).", flag_values=fv)
    flags.DEFINE_bool("repeat_bare", True, "Time the bare step again after the loops (median of both).",
                      flag_values=fv)
    flags.DEFINE_bool("trainer_steps", True, "Also time the trainer's own step with host and device augmentation.",
                      flag_values=fv)
    flags.DEFINE_bool("null_step", False, "Time the loop with a trivial step instead (the input ceiling).",
                      flag_values=fv)
    flags.DEFINE_list("workers", ["0", "1", "2"], "--null_step: the input worker counts to run (-1: automatic).",
                      flag_values=fv)
    flags.DEFINE_integer("batch", 256, "--null_step: the global batch.", flag_values=fv)
    if "-h" in argv or "--help" in argv:
        print(f"usage: {argv[0]} --config=CONFIG[:ARGS] [--config.FIELD=VALUE ...] [--steps=N] [--log_every=N] "
              f"[--augment_on=host,device] [--norepeat_bare] [--notrainer_steps]\n"
              f"       {argv[0]} --null_step [--workers=0,1,2] [--batch=256] [--config=...] [--steps=N]\n"
              f"{__doc__.splitlines()[0]}\n\n{fv.get_help()}")
        raise SystemExit(0)
    try:
        fv(argv)
        if not fv.null_step and not fv["config"].present:
            raise flags.Error("--config is required")
        augment_on = fv.augment_on or (["device"] if fv.null_step else ["host", "device"])
        if set(augment_on) - set(pipeline.AUGMENT_ON):
            raise flags.Error(f"--augment_on takes host and/or device, got {augment_on}")
        workers = [int(w) for w in fv.workers if w.lstrip("-").isdigit()]
        if len(workers) != len(fv.workers) or not workers or min(workers) < -1:
            raise flags.Error(f"--workers takes counts >= 0 or -1 (automatic), got {fv.workers}")
        if fv.batch < 1 or fv.batch % jax.device_count():
            raise flags.Error(f"--batch={fv.batch} must be a positive multiple of the {jax.device_count()} devices")
        config = fv.config
        if fv.null_step:
            config.batch_size_per_device = fv.batch // jax.device_count()
        config_lib.validate(config)
    except (flags.Error, UserError) as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return Options(config, fv.steps, fv.log_every, augment_on, fv.repeat_bare, fv.trainer_steps, fv.null_step,
                   workers)


@dataclasses.dataclass(frozen=True)
class Options:
    config: Any
    steps: int
    log_every: int
    augment_on: list[str]
    repeat_bare: bool
    trainer_steps: bool
    null_step: bool
    workers: list[int]


def main(argv: list[str]) -> dict:
    options = parse_args(argv)
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl's global flags; this entry point has none
        flags.FLAGS.mark_as_parsed()
    if options.null_step:
        return main_null_step(options)
    config, steps, log_every, modes = options.config, options.steps, options.log_every, options.augment_on
    header = (f"{config.model.arch} {config.data.image_size}px (stored {config.data.resolution}px), global batch "
              f"{config.batch_size_per_device * jax.device_count()}, {jax.default_backend()}")
    print(header, flush=True)
    figures, loads = {}, {}

    def measure(name: str, fn) -> float:
        figures[name] = fn()
        loads[name] = load()
        print(f"  {name:<16} {figures[name]:8.1f} img/s  load {loads[name]}", flush=True)
        return figures[name]

    bare_runs = [measure("bare_step", lambda: bare_step_throughput(config, steps))]
    for mode in modes:
        measure(f"loop_{mode}", lambda mode=mode: loop_throughput(config, steps, log_every, mode))
    trainer_steps = ("host", "device") if options.trainer_steps else ()
    for mode in trainer_steps:
        measure(f"trainer_step_{mode}", lambda mode=mode: bare_step_throughput(config, steps, mode))
    if options.repeat_bare:
        bare_runs.append(measure("bare_step", lambda: bare_step_throughput(config, steps)))
    bare = statistics.median(bare_runs)
    result = {"backend": jax.default_backend(), "arch": config.model.arch, "image_size": config.data.image_size,
              "stored_resolution": config.data.resolution, "global_batch": config.batch_size_per_device *
              jax.device_count(), "bare_step_img_per_s": round(bare, 2),
              "bare_step_runs": [round(x, 2) for x in bare_runs]}
    names = [f"loop_{mode}" for mode in modes] + [f"trainer_step_{mode}" for mode in trainer_steps]
    for name in names:
        result[f"{name}_img_per_s"] = round(figures[name], 2)
        result[f"{name}_ratio"] = round(figures[name] / bare, 4)
    default = f"loop_{config_default_augment_on(config)}_ratio"
    if default in result:
        result["ratio"] = result[default]  # loop / bare with the config's own augment_on on this backend
    result["load"] = loads
    print("ratios to the bare step: " + ", ".join(f"{name} {result[f'{name}_ratio']:.3f}" for name in names)
          + " (trainer_step_host: the stop-flag check; trainer_step_device: the augmentation in the step)")
    print(json.dumps(result), flush=True)
    return result


def main_null_step(options: Options) -> dict:
    """The input ceiling: the loop with `null_train_step`, for each worker count and augment_on."""
    config = options.config
    backend = jax.default_backend()
    result = {"backend": backend, "null_step": True, "image_size": config.data.image_size,
              "stored_resolution": config.data.resolution,
              "global_batch": config.batch_size_per_device * jax.device_count(), "cpu_count": pipeline.available_cpus(),
              "goal": NULL_STEP_GOAL, "load": {}}
    rates = []
    print(f"input ceiling (null step): {config.data.image_size}px crops of {config.data.resolution}px records, global "
          f"batch {result['global_batch']}, {backend}, {result['cpu_count']} CPUs", flush=True)
    for augment_on in options.augment_on:
        for requested in options.workers:
            workers = pipeline.resolve_workers(requested, backend)
            name = f"null_step_{augment_on}_{workers}_workers"
            result[f"{name}_img_per_s"] = round(loop_throughput(
                config, options.steps, options.log_every, augment_on, workers, null_step=True), 1)
            result["load"][name] = load()
            rates.append(result[f"{name}_img_per_s"])
            print(f"  augment_on={augment_on}, {workers} workers{' (automatic)' if requested == -1 else ''}: "
                  f"{result[f'{name}_img_per_s']:9.1f} img/s  load {result['load'][name]}", flush=True)
    best = max(rates)
    result |= {"img_per_s": best, "goal_met": best >= NULL_STEP_GOAL}
    print(f"best {best:.1f} img/s (goal on the 2-core CPU: >= {NULL_STEP_GOAL}: "
          f"{'met' if result['goal_met'] else 'NOT met'})", flush=True)
    print(json.dumps(result), flush=True)
    return result


def config_default_augment_on(config) -> str:
    """What augment_on the config runs with on this backend (a fresh run)."""
    return pipeline.resolve_augment_on(config.data.augment_on, jax.default_backend())
