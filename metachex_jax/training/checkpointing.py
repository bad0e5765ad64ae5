"""Saving and restoring a training run's checkpoints: the train state, the input iterator's position and the
trainer's bookkeeping, into the manager of `models/runs.py` (the layout, what is kept, and how the rest of the
package reads a run).

`restore_latest` walks back from the newest checkpoint: one that fails to restore (corrupted files) is
reported loudly and the previous one is used.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter, meta: dict,
         metrics: dict | None = None) -> None:
    """Start an (asynchronous) save; `metrics` (with runs.BEST_METRIC) marks candidates for 'best'."""
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)


def restore_step(manager, step: int, abstract_state, data_iter=None):
    """Restore one step: (state, meta); `data_iter`, when given, is moved to the saved position."""
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
        # grain saves one input position per process (data_iter/process_<i>-of-<n>.json). A checkpoint from a
        # different number of processes restores the state at this run's shardings; each host's data shard is
        # new, so its input starts afresh.
        own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if (epath.Path(manager.directory) / str(step) / "data_iter" / own).exists():
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        else:
            logging.warning("checkpoint %d was saved by a different number of processes (it has no data_iter/%s): "
                            "restoring the train state; the input pipeline starts from the beginning", step, own)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iter=None):
    """Restore the newest readable checkpoint: (step, state, meta), or None if there is none.

    `abstract_state` gives shapes, dtypes and shardings (jax.ShapeDtypeStruct leaves). `data_iter`, when
    given, is moved to the saved position in place.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
        try:
            state, meta = restore_step(manager, step, abstract_state, data_iter)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: report it and fall back
            logging.error("checkpoint at step %d in %s could not be restored (%s: %s); trying an older one",
                          step, manager.directory, type(e).__name__, e)
            failures.append(f"step {step}: {type(e).__name__}: {e}")
            continue
        if failures:
            logging.warning("resumed from step %d after skipping unreadable checkpoints: %s", step, failures)
        return step, state, meta
    if failures:
        raise RuntimeError(f"no checkpoint in {manager.directory} could be restored:\n  " + "\n  ".join(failures))
    return None


def abstract(tree, sharding) -> Any:
    """ShapeDtypeStructs with `sharding` for every array of `tree` (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
