"""Benchmark: the full training loop (input pipeline + step + logging) against the bare train step.

    python -m metachex_jax.loop_bench --config=configs/pretrain.py:demo --steps=60

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
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from metachex_jax import optim, train, train_state
from metachex_jax.data import pipeline
from metachex_jax.models import build_model

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config, e.g. configs/pretrain.py:demo")
flags.DEFINE_integer("steps", 60, "Timed steps (after the first logging interval).")
flags.DEFINE_integer("log_every", 10, "Logging interval of the loop run.")


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


def main(argv):
    del argv
    config = FLAGS.config
    loop = loop_throughput(config, FLAGS.steps, FLAGS.log_every)
    bare = bare_step_throughput(config, FLAGS.steps)
    print(f"{config.model.arch} {config.data.image_size}px, global batch "
          f"{config.batch_size_per_device * jax.device_count()}, {jax.default_backend()}: "
          f"loop {loop:.1f} img/s, bare step {bare:.1f} img/s, ratio {loop / bare:.3f}")
    print(json.dumps({"backend": jax.default_backend(), "arch": config.model.arch,
                      "image_size": config.data.image_size, "loop_img_per_s": round(loop, 2),
                      "bare_step_img_per_s": round(bare, 2), "ratio": round(loop / bare, 4)}))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
