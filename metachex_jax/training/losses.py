"""The multi-task loss: masked sigmoid cross-entropy for the binary heads, masked L1/Huber for age.

Every term is a masked mean: entries whose mask is 0 (a missing label, an implausible age, a padding row)
contribute exactly zero loss and zero gradient. Targets under a zero mask are replaced before any arithmetic,
so even a NaN target there cannot leak into the gradient.

    total = w_pathology * L_pathology + w_metadata * L_metadata + w_age * L_age      (weights from config.loss)

The batch layout is the pipeline's (see `metachex_jax.data.input.pipeline`): pathology/pathology_mask (N, 14),
metadata/metadata_mask (N, 2), age/age_mask (N,), example_mask (N,) for padding rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def masked_mean(values, mask):
    """Mean of `values` over entries where mask > 0; 0 when nothing is valid."""
    mask = mask.astype(values.dtype)
    return jnp.sum(jnp.where(mask > 0, values, 0.0) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sigmoid_bce(logits, targets, mask, pos_weight=None, neg_weight=None):
    """Masked binary cross-entropy on logits, optionally class-weighted (CheXNet's w+ / w-), averaged."""
    targets = jnp.where(mask > 0, targets, 0.0)
    log_p = jax.nn.log_sigmoid(logits)
    log_not_p = jax.nn.log_sigmoid(-logits)
    pos = 1.0 if pos_weight is None else pos_weight
    neg = 1.0 if neg_weight is None else neg_weight
    per_entry = -(pos * targets * log_p + neg * (1.0 - targets) * log_not_p)
    return masked_mean(per_entry, mask)


def age_regression(pred_z, age_years, mask, age_mean, age_std, kind="l1", huber_delta=1.0):
    """Masked L1 or Huber loss between the normalised age prediction and the normalised target."""
    target_z = (jnp.where(mask > 0, age_years, age_mean) - age_mean) / age_std
    err = pred_z - target_z
    if kind == "l1":
        per_example = jnp.abs(err)
    elif kind == "huber":
        abs_err = jnp.abs(err)
        per_example = jnp.where(abs_err <= huber_delta, 0.5 * err**2, huber_delta * (abs_err - 0.5 * huber_delta))
    else:
        raise ValueError(f"unknown age loss {kind!r}; use 'l1' or 'huber'")
    return masked_mean(per_example, mask)


def chexnet_class_weights(positives: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """CheXNet's per-class weights from training-set counts: w+ = |N| / (|P|+|N|), w- = |P| / (|P|+|N|)."""
    positives = np.asarray(positives, np.float64)
    return ((total - positives) / total).astype(np.float32), (positives / total).astype(np.float32)


def multitask_loss(outputs, batch, loss_config, *, age_mean, age_std, class_weights=None):
    """Weighted sum of the configured task losses.

    Args:
      outputs: the model's output dict (pathology, metadata, age_z heads as present).
      batch: the pipeline's batch dict (targets and masks).
      loss_config: `config.loss` (weights, age_loss, huber_delta).
      age_mean, age_std: the model's age normalisation.
      class_weights: optional (pos_weight, neg_weight) arrays of shape (num_pathologies,).
    Returns:
      (total, terms) where terms maps each task to its unweighted loss.
    """
    example = batch["example_mask"][:, None]
    weights = loss_config.weights
    terms = {}
    if "pathology" in outputs and weights.get("pathology", 0.0):
        pos, neg = class_weights if class_weights is not None else (None, None)
        terms["pathology"] = sigmoid_bce(outputs["pathology"], batch["pathology"],
                                         batch["pathology_mask"] * example, pos, neg)
    if "metadata" in outputs and weights.get("metadata", 0.0):
        terms["metadata"] = sigmoid_bce(outputs["metadata"], batch["metadata"], batch["metadata_mask"] * example)
    if "age_z" in outputs and weights.get("age", 0.0):
        terms["age"] = age_regression(outputs["age_z"], batch["age"], batch["age_mask"] * example[:, 0],
                                      age_mean, age_std, loss_config.age_loss, loss_config.huber_delta)
    if not terms:
        raise ValueError("the loss has no terms: check config.loss.weights against the model's heads")
    total = sum(weights[name] * value for name, value in terms.items())
    return total, terms
