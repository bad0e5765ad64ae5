"""Helper for test_parallel.py: run a few real train steps of a tiny MetaChexNet on a fixed global batch and save
the losses and final parameters. Run as a separate process so that the device count / process count can be set:

  python tests/sharded_steps.py OUT.npz --mesh_devices=N            (N of this process's devices)
  JAX_COORDINATOR_ADDRESS=... JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i python tests/sharded_steps.py OUT.npz
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from metachex_jax.configs import pretrain
from metachex_jax.contract.pixels import PixelContract  # noqa: E402
from metachex_jax.core import distributed  # noqa: E402
from metachex_jax.core import sharding
from metachex_jax.data.input import pipeline  # noqa: E402
from metachex_jax.main import dump_stacks_on_sigusr1_if_asked  # noqa: E402
from metachex_jax.models import build_model  # noqa: E402
from metachex_jax.training import steps as train_steps

GLOBAL_BATCH, STEPS, SIZE = 16, 2, 32


def global_batch(step: int) -> dict:
    batch = pipeline.random_nih_batch(GLOBAL_BATCH, SIZE, seed=step)
    batch["age_mask"][::5] = 0  # some ages missing, as in real data
    return batch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--mesh_devices", type=int, default=0, help="0 = every device of every process")
    args = parser.parse_args()
    distributed.maybe_initialize("auto")
    devices = jax.devices()[: args.mesh_devices] if args.mesh_devices else jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    data_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    config = pretrain.get_config(f"arch=densenet_tiny,res={SIZE}")
    model = build_model(config.model, nnx.Rngs(0))
    # Plain SGD: Adam divides by sqrt(v), which turns the last-bit noise of a near-zero gradient into a full
    # lr-sized step of either sign, hiding what this checks (the sharded forward/backward and synchronised BN).
    tx = optax.sgd(0.05)
    graphdef, state = train_steps.create(model, tx)
    state = jax.device_put(state, replicated)
    step_fn = jax.jit(train_steps.make_train_step(graphdef, tx, config.loss, jnp.float32,
                                                 contract=PixelContract.from_config(config)), donate_argnums=0)

    # Each process feeds its own contiguous slice of the global batch, as the input pipeline does per host.
    n, i = jax.process_count(), jax.process_index()
    per_process = GLOBAL_BATCH // n
    losses = []
    for step in range(STEPS):
        local = {k: v[i * per_process:(i + 1) * per_process] for k, v in global_batch(step).items()}
        state, metrics = step_fn(state, sharding.to_global(local, data_sharding))
        losses.append(float(metrics["loss"]))
    leaves = [np.asarray(x) for x in jax.tree.leaves((state.params, state.batch_stats))]
    if i == 0:
        np.savez(args.out, losses=np.array(losses), *leaves)


if __name__ == "__main__":
    dump_stacks_on_sigusr1_if_asked()  # tests/subprocesses.py asks for the stacks of a hung run
    main()
