"""A run's directory as everything after training reads it: its checkpoints (the orbax manager over
WORKDIR/checkpoints, what is kept), the config it saved, and its model at a step (`load_run_model`, for
evaluation, transfer, `predict` and export).

Layout: WORKDIR/checkpoints/<step>/{state, data_iter, meta}. Saves are asynchronous; orbax writes each
checkpoint under a temporary name and renames it only once complete, so a process killed mid-save leaves the
previous checkpoints untouched and the half-written one is never picked up. Kept: the latest
`keep` checkpoints plus the best by validation mean AUROC (a `LatestN` + `BestN` policy: `max_to_keep` with
`best_fn` would keep only the best and could delete the latest, which breaks resume). Saving and restoring the
train state: training/checkpointing.py.
"""

from __future__ import annotations

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from orbax.checkpoint import checkpoint_managers as policies

from metachex_jax.core import files
from metachex_jax.models import build_model, convert_layout

BEST_METRIC = "val_mean_auroc"


def make_manager(directory: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    preservation = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=preservation, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(files.absolute(directory), options=options,
                                 item_names=("state", "data_iter", "meta"))


def latest_meta(manager: ocp.CheckpointManager) -> dict | None:
    """The bookkeeping (meta) of the newest checkpoint whose meta is readable, or None without checkpoints."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception:  # noqa: BLE001 - restore_latest reports unreadable checkpoints; here: try older ones
            continue
    return None


def load_run_model(run_dir: str, step: int | str = "best"):
    """The model of a pretraining run, for evaluation or transfer: (MetaChexNet in eval mode, info dict).

    `run_dir` is a pretraining workdir (holding checkpoints/). `step` is "best" (by validation mean AUROC, as
    recorded by the trainer), "latest", or a step number. The architecture and heads come from the config the
    run saved with its checkpoint, so no config needs to be passed.
    """
    directory = files.join(files.absolute(run_dir), "checkpoints")
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"{run_dir} is not a pretraining workdir: {directory} does not exist")
    manager = make_manager(directory, keep=1 << 30, async_save=False)
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        latest_meta = manager.restore(max(steps), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if step == "best":
            step = (latest_meta.get("best") or {}).get("step") or max(steps)
        elif step == "latest":
            step = max(steps)
        if int(step) not in steps:
            raise FileNotFoundError(f"step {step} is not among the checkpoints in {directory}: {sorted(steps)}")
        model_config = ml_collections.ConfigDict(latest_meta["config"]["model"])
        model = nnx.eval_shape(lambda: build_model(model_config, nnx.Rngs(0)))
        graphdef, params, stats = nnx.split(model, nnx.Param, ...)
        # Every array onto this process's first device, whatever devices (or how many processes) wrote the
        # checkpoint: without restore args orbax reuses the saved shardings, whose devices may not exist here.
        on_this_host = _on_local_device(files.join(directory, str(int(step)), "state"))
        restored = manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(restore_args=on_this_host)))["state"]
    finally:
        manager.close()
    # The checkpoint's dense blocks may be stored in the other form (model.scan_layers) than this model's.
    scan = any(getattr(block, "scan_layers", False) for block in getattr(model.backbone, "blocks", []))
    spec = model.backbone.spec
    try:
        nnx.replace_by_pure_dict(params, convert_layout(_unwrap_values(restored["params"]), spec, scan))
        nnx.replace_by_pure_dict(stats, convert_layout(_unwrap_values(restored["batch_stats"]), spec, scan))
    except Exception as e:
        raise ValueError(f"checkpoint {directory}/{step} does not match the model its config describes "
                         f"({model_config.arch}): {e}") from e
    model = nnx.merge(graphdef, params, stats)
    model.eval()
    return model, {"run_dir": run_dir, "step": int(step), "arch": model_config.arch,
                   "config": latest_meta["config"],
                   "val_mean_auroc": (latest_meta.get("best") or {}).get("val_mean_auroc")}  # the run's best


def scanned_layout(manager: ocp.CheckpointManager) -> bool | None:
    """Whether the newest checkpoint holds scanned dense blocks (`blocks[b].stacked`, model.scan_layers) or
    unrolled ones (`blocks[b].layers`); None without checkpoints. Read from the checkpoint's tree metadata."""
    steps = manager.all_steps()
    if not steps:
        return None
    tree = _tree_metadata(files.join(str(manager.directory), str(max(steps)), "state"))
    found = []
    jax.tree_util.tree_map_with_path(lambda path, _: found.append("'stacked'" in jax.tree_util.keystr(path)), tree)
    return any(found)


def saved_config(run_dir: str) -> dict:
    """The config a pretraining run saved with its newest checkpoint (what `load_run_model` builds the model from)."""
    directory = files.join(files.absolute(run_dir), "checkpoints")
    manager = make_manager(directory, keep=1 << 30, async_save=False)
    try:
        meta = latest_meta(manager)
    finally:
        manager.close()
    if meta is None:
        raise FileNotFoundError(f"{run_dir} holds no readable checkpoint (looked in {directory})")
    return meta["config"]


def _tree_metadata(state_dir: str):
    """The array tree (shapes, dtypes) of a checkpoint item folder. Read through the handler, not a Checkpointer:
    the step's own metadata file is one level up, and a Checkpointer warns that it is missing."""
    return ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir)).tree


def _on_local_device(state_dir: str):
    """Restore args that put every array of the checkpointed tree in `state_dir` on jax.local_devices()[0]."""
    tree = _tree_metadata(state_dir)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), tree)


def _unwrap_values(tree):
    """A checkpointed nnx.State read without a target nests each array as {"value": array}: unwrap it."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {k: _unwrap_values(v) for k, v in tree.items()}
    return tree
