"""Pretraining: `train_and_evaluate(config, workdir)`, read top to bottom as the run happens.

  1. mesh and shardings       one "data" axis over every device of every host; state replicated
  2. input                    the data spec (data/input/spec.py) from config.data; prepared splits of ChestX-ray14
                              or of a weighted mixture of datasets, in one label space with per-label masks
                              (data/input/mixture.py) -> grain iterators -> global jax.Arrays; training images
                              augmented on the host or in the train step (config.data.augment_on)
  3. model and optimiser      MetaChexNet (or the CheXNet baseline) from config.model, optax from config.optim;
                              its pixel contract (models/contract.py) from config.data + config.model
  4. starting weights         own workdir (resume) > config.resume > config.model_init (backbone) > random
  5. steps                    one jitted train step (state donated), one jitted eval step
  6. loop                     log, evaluate on validation, reduce-on-plateau, checkpoint, stop loudly on NaN;
                              on SIGTERM/SIGINT every process saves the same step and stops
                              (`core.preemption.Preempted`)
  7. final evaluation         the best checkpoint on the test split -> WORKDIR/eval/ (per dataset for a mixture)
  8. OOD description          the best checkpoint's features of a sample of training images, threshold from
                              validation images -> WORKDIR/ood/step_<N>.npz (config.ood; training/ood_reference.py)

A mixture (config.data.datasets = "chestxray14:1,chexpert:1,...") is evaluated per dataset, each on the labels it
has; the best checkpoint is the one with the highest mean over datasets of each dataset's validation mean AUROC,
which reduce-on-plateau also watches when optim.plateau_on = "mean_auroc" (the mixture configs' setting).

Everything a run writes lives in the workdir: checkpoints/, eval/, ood/, metrics.jsonl, tensorboard/.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from metachex_jax.contract.card import is_model_dir, read_card
from metachex_jax.contract.pixels import PixelContract
from metachex_jax.core import files, preemption, sharding
from metachex_jax.core.errors import MissingDataError, NonFiniteLossError
from metachex_jax.data.input import datasets, device_augment, pipeline
from metachex_jax.data.input.augment import Augmentation
from metachex_jax.data.input.spec import DataSpec
from metachex_jax.evaluation import evaluate
from metachex_jax.interop import convert
from metachex_jax.models import SPECS, build_model, count_params, resolve_scan_layers, runs
from metachex_jax.training import checkpointing, ood_reference, optim, steps
from metachex_jax.training.losses import chexnet_class_weights
from metachex_jax.training.metric_writer import MetricWriter


def restore_latest(manager, config, tx, fresh_state, replicated, data_iter=None):
    """`checkpointing.restore_latest` into this run's state. A checkpoint written with the dense blocks in the
    other form (config.model.scan_layers) is restored in that form and converted, exactly: parameters,
    BatchNorm statistics and optimiser moments."""
    saved_scan = runs.scanned_layout(manager)
    scan = resolve_scan_layers(config.model.scan_layers)
    target = fresh_state
    if saved_scan is not None and saved_scan != scan:
        saved_model = ml_collections.ConfigDict({**config.model.to_dict(),
                                                  "scan_layers": "yes" if saved_scan else "no"})
        target = jax.eval_shape(lambda: steps.create(build_model(saved_model, nnx.Rngs(0)), tx)[1])
    restored = checkpointing.restore_latest(manager, checkpointing.abstract(target, replicated), data_iter)
    if restored is None or target is fresh_state:
        return restored
    step, state, meta = restored
    state = steps.convert_layout(state, fresh_state, SPECS[config.model.arch], scan)
    return step, jax.device_put(state, replicated), meta


def jit_train_step(config, graphdef, tx, class_weights, augment_on: str, replicated, contract,
                   augmentation: Augmentation):
    """The trainer's jitted step: (state, batch, stop_flags) -> (state, metrics, 1 if any process asked to stop).

    State donated. With augment_on="device" the batch holds the stored images, cropped, flipped and warped here
    by `augmentation` (`device_augment.train_images`); `stop_flags` is `preemption.StopSignals.flags()`."""
    augment = None
    if augment_on == "device":
        augment = functools.partial(device_augment.train_images, seed=config.seed, size=contract.image_size,
                                    augmentation=augmentation)
    step_fn = steps.make_train_step(graphdef, tx, config.loss, jnp.dtype(config.model.dtype), class_weights,
                                          augment=augment, contract=contract)

    def train_step(state, batch, stop_flags):
        state, metrics = step_fn(state, batch)
        return state, metrics, preemption.any_process_stops(stop_flags)

    return jax.jit(train_step, donate_argnums=0, out_shardings=(replicated, replicated, replicated))


def initial_state(config, workdir, manager, graphdef, fresh_state, replicated, train_iter, tx):
    """Pick the starting weights, in this order, and say which was used:

    1. this run's own checkpoints in WORKDIR/checkpoints (automatic resume, input position included);
    2. `config.resume`: another run's workdir or its checkpoints/ (full state; the input starts afresh);
    3. `config.model_init`: backbone weights only (a convert_torchvision backbone, or the backbone of a model
       directory such as a converted torchxrayvision model); new heads;
    4. random initialisation (`fresh_state`, from config.seed).
    Returns (state, meta, source).
    """
    restored = restore_latest(manager, config, tx, fresh_state, replicated, train_iter)
    if restored is not None:
        step, state, meta = restored
        return state, meta, f"resumed from {workdir}/checkpoints step {step}"
    if config.resume:
        directory = files.absolute(config.resume)  # local or gs://
        if files.is_dir(files.join(directory, "checkpoints")):
            directory = files.join(directory, "checkpoints")
        other = runs.make_manager(directory, keep=1 << 30, async_save=False)
        restored = restore_latest(other, config, tx, fresh_state, replicated)
        if restored is None:
            raise MissingDataError(f"config.resume={config.resume!r} holds no checkpoint")
        step, state, meta = restored
        other.close()
        return state, {**meta, "resumed_from": config.resume}, f"full state from {config.resume} step {step}"
    if config.model_init:
        model = steps.model_of(graphdef, fresh_state)
        convert.load_backbone(files.absolute(config.model_init), model)
        _, params, stats = nnx.split(model, nnx.Param, ...)
        state = fresh_state.replace(params=params, batch_stats=stats)
        return jax.device_put(state, replicated), {}, f"backbone from {config.model_init}; heads random"
    return fresh_state, {}, f"random initialisation (seed {config.seed})"


def adopt_model_init_contract(config):
    """A `config.model_init` that is a model directory (a converted torchxrayvision model) brings its own pixel
    contract: its stem is kept, so the run's `model.normalization` and `model.geometry` become the backbone's (the
    sizes stay the run's `data.image_size` / `data.resolution`). Returns the config, a changed copy if needed; the
    run saves that copy with its checkpoints, so everything that reads the run later sees the contract it used.
    A `convert_torchvision` backbone (metadata.json) takes ImageNet-normalised 3-channel input: the default."""
    if not config.model_init:
        return config
    path = files.absolute(config.model_init)
    if not is_model_dir(path):
        return config
    backbone = PixelContract.from_json(read_card(path)["input"])
    wanted = {"normalization": backbone.normalization, "geometry": backbone.geometry}
    current = {k: config.model.get(k) for k in wanted}
    if current == wanted:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model.update(wanted)
    if jax.process_index() == 0:
        logging.info("model_init %s: the run takes the backbone's pixel contract %s (the config said %s)",
                     config.model_init, wanted, current)
    return config


def train_and_evaluate(config, workdir: str, *, make_train_step=jit_train_step) -> dict:
    """Train, evaluate on validation periodically and on test at the end. Returns the final test metrics.

    `make_train_step` builds the jitted train step (`jit_train_step`'s arguments and result); `bench loop
    --null_step` passes a trivial one, to measure what the input pipeline and this loop deliver."""
    workdir = files.absolute(workdir)
    lead = jax.process_index() == 0
    config = adopt_model_init_contract(config)
    contract = PixelContract.from_config(config)

    # 1. Mesh and shardings.
    mesh = sharding.make_mesh()
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    global_batch = config.batch_size_per_device * jax.device_count()
    eval_batch = config.eval_batch_size_per_device * jax.device_count()

    # 2. Input.
    spec = DataSpec.from_config(config)
    data = datasets.pretraining_data(spec)
    config = with_label_space(config, data.space)  # what the checkpoints record: the model's pathology names
    train_size = sum(len(splits["train"]) for splits in data.splits.values())
    steps_per_epoch = train_size // global_batch  # an epoch of a mixture: as many images as its training splits
    if steps_per_epoch == 0:
        raise ValueError(f"the training split has {train_size} images, fewer than one global batch "
                         f"({global_batch}); lower config.batch_size_per_device")
    total_steps = config.get("num_steps") or config.num_epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    eval_every = config.eval_every_steps or steps_per_epoch
    checkpoint_every = config.checkpoint_every_steps or eval_every
    manager = runs.make_manager(files.join(workdir, "checkpoints"), config.keep_checkpoints)
    saved = runs.latest_meta(manager) or {}  # a resumed run keeps its input position's settings
    workers = pipeline.workers_for_resume(spec.workers, pipeline.resolve_workers(spec.workers, jax.default_backend()),
                                          saved.get("input_workers", 0) if saved else None)
    augment_on = pipeline.resolve_augment_on(spec.augment_on, jax.default_backend(), saved.get("augment_on"),
                                             contract.geometry)
    train_iter = pipeline.train_batches(
        [splits["train"] for splits in data.splits.values()], kind="labelled", global_batch_size=global_batch,
        image_size=contract.image_size, seed=config.seed,
        augmentation=spec.augmentation if augment_on == "host" else None,  # None: read + batch only
        weights=list(data.weights.values()) if data.is_mixture else None, num_workers=workers,
        geometry=contract.geometry)

    # 3. Model and optimiser.
    model = build_model(config.model, nnx.Rngs(config.seed))
    tx = optim.make_optimizer(config.optim, global_batch, total_steps)
    graphdef, state = steps.create(model, tx)
    state = jax.device_put(state, replicated)
    class_weights = None
    if config.loss.class_weighting == "chexnet":  # per label, from the training images that know it
        positives, known = datasets.known_label_counts(data)
        class_weights = chexnet_class_weights(positives, np.maximum(known, 1))
    elif config.loss.class_weighting != "none":
        raise ValueError(f"config.loss.class_weighting must be 'none' or 'chexnet', got "
                         f"{config.loss.class_weighting!r}")

    # 4. Starting weights.
    state, meta, source = initial_state(config, workdir, manager, graphdef, state, replicated, train_iter, tx)
    plateau = optim.Plateau(config.optim.plateau_factor, config.optim.plateau_patience,
                            **meta.get("plateau", {}))
    best = meta.get("best", {"val_mean_auroc": None, "step": None})  # by validation mean AUROC
    writer = MetricWriter(workdir)
    if lead:
        logging.info("model %s: %s parameters; %s", config.model.arch, f"{count_params(model):,}", source)
        logging.info("pixel contract: %s", contract.describe())
        logging.info("%d devices, global batch %d, %d steps/epoch, %d steps, %d input workers per host, "
                     "augmentation on the %s", jax.device_count(), global_batch, steps_per_epoch, total_steps,
                     workers, augment_on)

    # 5. Steps.
    train_step = make_train_step(config, graphdef, tx, class_weights, augment_on, replicated, contract,
                                 spec.augmentation)
    eval_step = jax.jit(steps.make_eval_step(graphdef, config.loss, jnp.dtype(config.model.dtype),
                                                   contract=contract))

    def run_eval(split: str, step: int, tag: str) -> dict:
        """One dataset: its result. A mixture: each dataset's (files tagged with its name), and their means."""
        results = {name: evaluate.evaluate_split(
            eval_step, state, splits[split], split=split, step=step,
            tag=f"{tag}_{name}" if data.is_mixture else tag, workdir=workdir, global_batch=eval_batch,
            contract=contract, data_sharding=data_sharding, loss_weights=config.loss.weights, n_boot=config.n_boot,
            seed=config.seed, max_batches=config.eval_max_batches, workers=workers, kind="labelled",
            label_names=data.space) for name, splits in data.splits.items()}
        if not data.is_mixture:
            return next(iter(results.values()))
        return evaluate.combine_datasets(results, workdir=workdir, tag=tag, step=step, split=split)

    def save(step: int, metrics: dict | None = None):
        nonlocal saved_step
        bookkeeping = {"plateau": plateau.state(), "best": best, "config": config.to_dict(),
                       "input_workers": workers, "augment_on": augment_on}
        checkpointing.save(manager, step, state, train_iter, bookkeeping, metrics)
        saved_step = step

    # 6. Loop.
    step = saved_step = int(state.step)
    # The previous step's outputs are read one step late (NaN check, stop request), so the device never idles.
    pending = None
    stopping = False  # any process got SIGTERM/SIGINT: the same on every process at the same step (preemption.py)
    signals = preemption.StopSignals(data_sharding)
    timer_step, timer = step, time.time()
    try:
        with signals:
            while step < total_steps:
                batch = sharding.to_global(next(train_iter), data_sharding)
                state, metrics, stop = train_step(state, batch, signals.flags())
                step += 1
                if pending is not None:
                    stopping |= settle(*pending)
                pending = (step, metrics, stop)
                if step % config.log_every_steps == 0 or step == total_steps:
                    stopping |= settle(*pending)
                    elapsed = time.time() - timer
                    img_s = (step - timer_step) * global_batch / max(elapsed, 1e-9)
                    scalars = {k: float(v) for k, v in metrics.items()}
                    scalars["lr"] = optim.learning_rate(config.optim, global_batch, total_steps, step,
                                                        state.opt_state)
                    scalars["img_per_s"] = img_s
                    eta = (total_steps - step) * global_batch / max(img_s, 1e-9)
                    writer.write(step, {f"train/{k}": v for k, v in scalars.items()},
                                 f"step {step}/{total_steps} loss {scalars['loss']:.4f} lr {scalars['lr']:.2e} "
                                 f"{img_s:.1f} img/s ETA {eta / 60:.1f} min")
                    timer_step, timer = step, time.time()
                if step % eval_every == 0 or step == total_steps:
                    stopping |= settle(*pending)
                    result = run_eval("validation", step, "validation")
                    val_loss, val_auroc = result["loss"], result["mean_auroc"]["value"]
                    if math.isfinite(val_auroc) and (best["step"] is None or val_auroc > best["val_mean_auroc"]):
                        best = {"val_mean_auroc": val_auroc, "step": step}
                    if config.optim.schedule == "plateau":
                        watched = plateau_value(config.optim, val_loss, val_auroc)
                        scale = plateau.update(watched, optim.plateau_scale(state.opt_state))
                        optim.set_plateau_scale(state.opt_state, scale)
                    writer.write(step, summary_scalars("val", result),
                                 f"validation at step {step}: loss {val_loss:.4f} mean AUROC {val_auroc:.4f}")
                    save(step, {runs.BEST_METRIC: val_auroc if math.isfinite(val_auroc) else -1.0})
                elif step % checkpoint_every == 0:
                    stopping |= settle(*pending)
                    save(step)
                if stopping and step < total_steps:
                    # This step's bookkeeping is done, as in an uninterrupted run: check it, save it, stop.
                    settle(*pending)
                    if saved_step != step:
                        save(step)
                    manager.wait_until_finished()
                    raise preemption.Preempted(step, signals.signal_name)
        manager.wait_until_finished()

        # 7. Final evaluation of the best checkpoint on the test split.
        best_step = best["step"] or step
        if best_step != step:
            state, _ = checkpointing.restore_step(manager, best_step, checkpointing.abstract(state, replicated))
        final = run_eval("test", best_step, "test")
        writer.write(step, summary_scalars("test", final),
                     f"test (best validation checkpoint, step {best_step}): "
                     f"mean AUROC {final['mean_auroc']['value']:.4f}")

        # 8. The description of the best checkpoint's training images in feature space (predict's OOD flags).
        # One process only: loading a checkpoint is collective in a multi-process run, and the others are done.
        manager.wait_until_finished()
        if config.ood.max_images and jax.process_count() > 1:
            logging.warning("no OOD description written in this multi-process run; write it afterwards in one "
                            "process: python -m metachex_jax.ood %s --step=%d", workdir, best_step)
        elif config.ood.max_images:
            ood_reference.describe_run(workdir, step=best_step, max_images=config.ood.max_images,
                                       quantile=config.ood.quantile, seed=config.seed)
        return final
    finally:
        manager.wait_until_finished()
        manager.close()
        train_iter.close()
        writer.close()


def with_label_space(config, space) -> ml_collections.ConfigDict:
    """An unlocked copy of the config whose model section names its pathology outputs (the label space), so that
    a checkpoint's config rebuilds the model (models.runs.load_run_model)."""
    resolved = ml_collections.ConfigDict(config.to_dict())
    resolved.model.pathology_names = list(space)
    resolved.model.num_pathologies = len(space) if resolved.model.num_pathologies else 0
    if not resolved.model.num_pathologies:
        resolved.model.pathology_names = []
    return resolved


def plateau_value(optim_config, val_loss: float, val_mean_auroc: float) -> float:
    """What reduce-on-plateau minimises: the validation loss, or minus the (mixture's) mean AUROC."""
    watched = optim_config.get("plateau_on", "loss")
    if watched == "loss":
        return val_loss
    if watched == "mean_auroc":
        return -val_mean_auroc if math.isfinite(val_mean_auroc) else math.inf
    raise ValueError(f"optim.plateau_on must be 'loss' or 'mean_auroc', got {watched!r}")


def summary_scalars(prefix: str, result: dict) -> dict:
    """The headline numbers of an evaluation, for metrics.jsonl and TensorBoard (the JSON file has them all);
    a mixture's: its means, then each dataset's under `prefix/<dataset>/`."""
    if "datasets" in result:
        out = {f"{prefix}/loss": result["loss"], f"{prefix}/mean_auroc": result["mean_auroc"]["value"]}
        for name, one in result["datasets"].items():
            out.update(summary_scalars(f"{prefix}/{name}", one))
        return out
    out = {f"{prefix}/loss": result["loss"], f"{prefix}/mean_auroc": result["mean_auroc"]["value"]}
    for task in ("sex_male", "view_ap"):
        if task in result:
            out[f"{prefix}/{task}_auroc"] = result[task]["auroc"]["value"]
            out[f"{prefix}/{task}_accuracy"] = result[task]["accuracy"]["value"]
    if "age" in result:
        out[f"{prefix}/age_mae_years"] = result["age"]["mae_years"]["value"]
        out[f"{prefix}/age_pearson_r"] = result["age"]["pearson_r"]["value"]
    return out


def settle(step: int, metrics: dict, stop) -> bool:
    """Wait for a dispatched step: stop loudly on a non-finite loss; return whether any process asked to stop."""
    check_finite(step, metrics)
    return bool(stop)


def check_finite(step: int, metrics: dict) -> None:
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        terms = {k: float(v) for k, v in metrics.items()}
        raise NonFiniteLossError(
            f"loss is {loss} at step {step} ({terms}); stopping. The last good checkpoint is left as it was; "
            "lower optim.lr, enable optim.grad_clip_norm, or check the input data.")
