"""Orbax checkpoints of a run: the train state, the input iterator's position and the trainer's bookkeeping.

Layout: WORKDIR/checkpoints/<step>/{state, data_iter, meta}. Saves are asynchronous; orbax writes each
checkpoint under a temporary name and renames it only once complete, so a process killed mid-save leaves the
previous checkpoints untouched and the half-written one is never picked up. Kept: the latest
`keep` checkpoints plus the best by validation mean AUROC (a `LatestN` + `BestN` policy: `max_to_keep` with
`best_fn` would keep only the best and could delete the latest, which breaks resume).

`restore_latest` walks back from the newest checkpoint: one that fails to restore (corrupted files) is
reported loudly and the previous one is used.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "val_mean_auroc"


def make_manager(directory: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    preservation = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=preservation, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("state", "data_iter", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter, meta: dict,
         metrics: dict | None = None) -> None:
    """Start an (asynchronous) save; `metrics` (with BEST_METRIC) marks candidates for 'best'."""
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)


def restore_step(manager, step: int, abstract_state, data_iter=None):
    """Restore one step: (state, meta); `data_iter`, when given, is moved to the saved position."""
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
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
