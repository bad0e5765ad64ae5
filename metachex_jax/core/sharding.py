"""The device mesh and the batch sharding both trainers (pretraining and transfer fine-tuning) use."""

from __future__ import annotations

import jax


def make_mesh():
    """A 1-D device mesh over all devices; the axis is named so a model axis can be added later."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def to_global(batch: dict, sharding) -> dict:
    """Per-host numpy batch -> global jax.Arrays sharded along the batch axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
