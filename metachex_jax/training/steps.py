"""The training state and the jit-compiled steps that update it.

    TrainState(step, params, batch_stats, opt_state)      a plain pytree: checkpointed by orbax as is

The model's structure (`graphdef`) stays outside the state; the steps `nnx.merge` it with the arrays, run the
model, and `nnx.split` the updated BatchNorm statistics back out. This keeps the jitted functions pure (no
module or `nnx.Rngs` captured by a closure), as NNX's coming tree mode expects.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from metachex_jax import models
from metachex_jax.contract.pixels import PixelContract
from metachex_jax.training import losses


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of nnx.Param
    batch_stats: Any  # nnx.State of everything else (BatchNorm running statistics)
    opt_state: Any


def create(model: nnx.Module, tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, ...)
    state = TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params))
    return graphdef, state


def convert_layout(state, target, spec, scan_layers: bool):
    """`state` (a TrainState, or any pytree of nnx.States: parameters, statistics, optimiser moments) of a model
    whose dense blocks are in the other form, converted to `target`'s structure (same model, blocks scanned or
    unrolled as `scan_layers` says; `models.convert_layout`, exact). Leaves that are not nnx.States (the step,
    optimiser counts) are kept."""
    def convert(source, destination):
        if not isinstance(source, nnx.State):
            return source
        out = jax.tree.map(lambda x: x, destination)  # a fresh State of the target's structure
        nnx.replace_by_pure_dict(out, models.convert_layout(nnx.to_pure_dict(source), spec, scan_layers))
        return out

    return jax.tree.map(convert, state, target, is_leaf=lambda x: isinstance(x, nnx.State))


def model_of(graphdef, state: TrainState) -> nnx.Module:
    """The NNX model holding the state's current weights (for evaluation, export, feature extraction)."""
    return nnx.merge(graphdef, state.params, state.batch_stats)


def make_train_step(graphdef, tx, loss_config, compute_dtype, class_weights=None, augment=None, *,
                    contract: PixelContract):
    """A pure function (state, batch) -> (state, metrics); the trainer jits it with the state donated.

    `contract`: the model's pixel contract; its `model_input` turns the batch's uint8 images into the model's
    input (normalisation and channels). `augment`, when given, is (uint8 images, step) -> uint8 images, applied
    to the batch's images first (`config.data.augment_on="device"`: `metachex_jax.data.input.device_augment`).
    """

    def train_step(state: TrainState, batch):
        images = batch["image"] if augment is None else augment(batch["image"], state.step)

        def loss_fn(params):
            # copy: fresh Variables at this trace level, so BatchNorm may update its statistics here.
            model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
            model.train()
            outputs = model(contract.model_input(images, compute_dtype))
            total, terms = losses.multitask_loss(outputs, batch, loss_config, age_mean=model.age_mean,
                                                 age_std=model.age_std, class_weights=class_weights)
            _, _, new_stats = nnx.split(model, nnx.Param, ...)
            return total, (terms, new_stats)

        (loss, (terms, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **{f"loss_{k}": v for k, v in terms.items()}}
        return TrainState(state.step + 1, params, new_stats, opt_state), metrics

    return train_step


def make_eval_step(graphdef, loss_config, compute_dtype, *, contract: PixelContract):
    """(state, batch) -> per-example predictions and the batch's summed loss terms (eval-mode BatchNorm)."""

    def eval_step(state: TrainState, batch):
        model = nnx.merge(graphdef, state.params, state.batch_stats)
        model.eval()
        outputs = model(contract.model_input(batch["image"], compute_dtype))
        _, terms = losses.multitask_loss(outputs, batch, loss_config, age_mean=model.age_mean,
                                         age_std=model.age_std)
        preds = {}
        if "pathology" in outputs:
            preds["pathology_prob"] = jax.nn.sigmoid(outputs["pathology"])
        if "metadata" in outputs:
            preds["metadata_prob"] = jax.nn.sigmoid(outputs["metadata"])
        if "age" in outputs:
            preds["age_pred"] = outputs["age"]
        # Masked means per batch; the trainer weights them by the number of real examples.
        n = jnp.sum(batch["example_mask"])
        return preds, {k: v * n for k, v in terms.items()}, n

    return eval_step
