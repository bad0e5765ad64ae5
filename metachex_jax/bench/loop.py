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
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx
from ml_collections import config_flags

from metachex_jax.configs import config_lib
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


def loop_throughput(config, steps: int, log_every: int, augment_on: str | None = None) -> float:
    """Median img/s the trainer logs over `steps` steps (first interval dropped)."""
    config = config.copy_and_resolve_references()
    if augment_on is not None:
        config.data.augment_on = augment_on
    config.max_steps = steps + log_every
    config.log_every_steps = log_every
    config.eval_every_steps = 10**9  # evaluate only at the end (outside the timed intervals)
    config.eval_max_batches = 1
    config.n_boot = 0
    with tempfile.TemporaryDirectory() as workdir:
        trainer.train_and_evaluate(config, workdir)
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
    """(config, steps, log_every) from `--config=FILE[:ARGS] [--config.x=y ...] [--steps=N] [--log_every=N]`.

    Flags of its own (not absl's global ones), so that importing this module defines nothing globally."""
    argv = ["python -m metachex_jax.bench loop", *argv]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Training config, e.g. configs/pretrain.py:demo",
                                    flag_values=fv, sys_argv=argv)
    flags.DEFINE_integer("steps", 60, "Timed steps (after the first logging interval).", flag_values=fv)
    flags.DEFINE_integer("log_every", 10, "Logging interval of the loop run.", flag_values=fv)
    flags.DEFINE_list("augment_on", ["host", "device"], "The loops to run: config.data.augment_on values.",
                      flag_values=fv)
    flags.DEFINE_bool("repeat_bare", True, "Time the bare step again after the loops (median of both).",
                      flag_values=fv)
    if "-h" in argv or "--help" in argv:
        print(f"usage: {argv[0]} --config=CONFIG[:ARGS] [--config.FIELD=VALUE ...] [--steps=N] [--log_every=N] "
              f"[--augment_on=host,device] [--norepeat_bare]\n"
              f"{__doc__.splitlines()[0]}\n\n{fv.get_help()}")
        raise SystemExit(0)
    try:
        fv(argv)
        if fv.config is None:
            raise flags.Error("--config is required")
        config_lib.validate(fv.config)
        if not fv.augment_on or set(fv.augment_on) - set(pipeline.AUGMENT_ON):
            raise flags.Error(f"--augment_on takes host and/or device, got {fv.augment_on}")
    except (flags.Error, UserError) as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return fv.config, fv.steps, fv.log_every, fv.augment_on, fv.repeat_bare


def main(argv: list[str]) -> dict:
    config, steps, log_every, modes, repeat_bare = parse_args(argv)
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
    for mode in ("host", "device"):
        measure(f"trainer_step_{mode}", lambda mode=mode: bare_step_throughput(config, steps, mode))
    if repeat_bare:
        bare_runs.append(measure("bare_step", lambda: bare_step_throughput(config, steps)))
    bare = statistics.median(bare_runs)
    result = {"backend": jax.default_backend(), "arch": config.model.arch, "image_size": config.data.image_size,
              "stored_resolution": config.data.resolution, "global_batch": config.batch_size_per_device *
              jax.device_count(), "bare_step_img_per_s": round(bare, 2),
              "bare_step_runs": [round(x, 2) for x in bare_runs]}
    names = [f"loop_{mode}" for mode in modes] + ["trainer_step_host", "trainer_step_device"]
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


def config_default_augment_on(config) -> str:
    """What augment_on the config runs with on this backend (a fresh run)."""
    return pipeline.resolve_augment_on(config.data.augment_on, jax.default_backend())
