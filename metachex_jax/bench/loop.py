"""Benchmark: the full training loop (input pipeline + step + logging) against the bare train step.

    python -m metachex_jax.bench loop --config=configs/pretrain.py:demo --steps=60

Runs the real trainer (`train.train_and_evaluate`) for `--steps` steps in a scratch workdir and reads its logged
img/s (every `log_every` steps; the first interval, which includes compilation, is dropped). Then times the same
jitted train step alone, on one batch already on the device, for the same number of steps. Both use the config's
model, batch size and resolution. The goal (issue: pretraining) is loop >= 0.95 x bare.
The last line of output is one JSON object with the figures.
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

from metachex_jax import config_lib, optim, train, train_state
from metachex_jax.data import pipeline
from metachex_jax.errors import UserError
from metachex_jax.models import build_model


def loop_throughput(config, steps: int, log_every: int) -> float:
    """Median img/s the trainer logs over `steps` steps (first interval dropped)."""
    config = config.copy_and_resolve_references()
    config.max_steps = steps + log_every
    config.log_every_steps = log_every
    config.eval_every_steps = 10**9  # evaluate only at the end (outside the timed intervals)
    config.eval_max_batches = 1
    config.n_boot = 0
    with tempfile.TemporaryDirectory() as workdir:
        train.train_and_evaluate(config, workdir)
        logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rates = [x["train/img_per_s"] for x in logged if "train/img_per_s" in x]
    return statistics.median(rates[1:])


def bare_step_throughput(config, steps: int) -> float:
    """img/s of the jitted train step alone, on one device-resident batch."""
    batch_size = config.batch_size_per_device * jax.device_count()
    model = build_model(config.model, nnx.Rngs(0))
    tx = optim.make_optimizer(config.optim, batch_size, steps)
    graphdef, state = train_state.create(model, tx)
    mesh = train.make_mesh()
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = jax.device_put(state, replicated)
    batch = train.to_global(pipeline.random_nih_batch(batch_size, config.data.image_size), data)
    step = jax.jit(train_state.make_train_step(graphdef, tx, config.loss, jnp.dtype(config.model.dtype)),
                   donate_argnums=0)
    for _ in range(2):  # compile and warm up
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
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
    if "-h" in argv or "--help" in argv:
        print(f"usage: {argv[0]} --config=CONFIG[:ARGS] [--config.FIELD=VALUE ...] [--steps=N] [--log_every=N]\n"
              f"{__doc__.splitlines()[0]}\n\n{fv.get_help()}")
        raise SystemExit(0)
    try:
        fv(argv)
        if fv.config is None:
            raise flags.Error("--config is required")
        config_lib.validate(fv.config)
    except (flags.Error, UserError) as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return fv.config, fv.steps, fv.log_every


def main(argv: list[str]) -> dict:
    config, steps, log_every = parse_args(argv)
    loop = loop_throughput(config, steps, log_every)
    bare = bare_step_throughput(config, steps)
    print(f"{config.model.arch} {config.data.image_size}px, global batch "
          f"{config.batch_size_per_device * jax.device_count()}, {jax.default_backend()}: "
          f"loop {loop:.1f} img/s, bare step {bare:.1f} img/s, ratio {loop / bare:.3f}")
    result = {"backend": jax.default_backend(), "arch": config.model.arch, "image_size": config.data.image_size,
              "loop_img_per_s": round(loop, 2), "bare_step_img_per_s": round(bare, 2),
              "ratio": round(loop / bare, 4)}
    print(json.dumps(result), flush=True)
    return result
