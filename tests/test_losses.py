"""Multi-task loss: values against independent formulas, and masking that removes loss AND gradient exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.metrics import log_loss

from metachex_jax.configs import chexnet, pretrain
from metachex_jax.models import MetaChexNet
from metachex_jax.training import losses

AGE_MEAN, AGE_STD = 47.0, 17.0


def _batch(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "pathology": rng.integers(0, 2, (n, 14)).astype(np.float32),
        "pathology_mask": np.ones((n, 14), np.float32),
        "metadata": rng.integers(0, 2, (n, 2)).astype(np.float32),
        "metadata_mask": np.ones((n, 2), np.float32),
        "age": rng.uniform(5, 90, n).astype(np.float32),
        "age_mask": np.ones(n, np.float32),
        "example_mask": np.ones(n, np.float32),
    }


def _outputs(n=6, seed=1):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n).astype(np.float32)
    return {"pathology": rng.normal(size=(n, 14)).astype(np.float32),
            "metadata": rng.normal(size=(n, 2)).astype(np.float32),
            "age_z": z, "age": AGE_MEAN + AGE_STD * z}


def _loss(outputs, batch, cfg=None, **kw):
    cfg = cfg or pretrain.get_config().loss
    return losses.multitask_loss(outputs, batch, cfg, age_mean=AGE_MEAN, age_std=AGE_STD, **kw)


def test_terms_match_independent_formulas():
    out, batch = _outputs(), _batch()
    total, terms = _loss(out, batch)
    p = jax.nn.sigmoid(out["pathology"])
    ref_bce = log_loss(batch["pathology"].ravel(), np.asarray(p).ravel())
    np.testing.assert_allclose(terms["pathology"], ref_bce, rtol=1e-5)
    ref_meta = log_loss(batch["metadata"].ravel(), np.asarray(jax.nn.sigmoid(out["metadata"])).ravel())
    np.testing.assert_allclose(terms["metadata"], ref_meta, rtol=1e-5)
    ref_l1 = np.mean(np.abs(out["age"] - batch["age"])) / AGE_STD
    np.testing.assert_allclose(terms["age"], ref_l1, rtol=1e-5)
    np.testing.assert_allclose(total, ref_bce + ref_meta + ref_l1, rtol=1e-5)


def test_huber_matches_optax_and_weights_apply():
    cfg = pretrain.get_config().loss
    cfg.age_loss, cfg.huber_delta = "huber", 0.5
    cfg.weights.metadata, cfg.weights.age = 0.25, 2.0
    out, batch = _outputs(), _batch()
    total, terms = _loss(out, batch, cfg)
    target_z = (batch["age"] - AGE_MEAN) / AGE_STD
    ref = optax.huber_loss(out["age_z"], target_z, delta=0.5).mean()
    np.testing.assert_allclose(terms["age"], ref, rtol=1e-5)
    np.testing.assert_allclose(total, terms["pathology"] + 0.25 * terms["metadata"] + 2.0 * terms["age"], rtol=1e-6)
    cfg.age_loss = "l3"
    with pytest.raises(ValueError, match="unknown age loss"):
        _loss(out, batch, cfg)


def test_chexnet_class_weights():
    pos, neg = losses.chexnet_class_weights(np.array([10, 50]), 100)
    np.testing.assert_allclose(pos, [0.9, 0.5])
    np.testing.assert_allclose(neg, [0.1, 0.5])
    out, batch = _outputs(), _batch()
    _, terms = _loss(out, batch, class_weights=(pos.repeat(7), neg.repeat(7)))
    y, z = batch["pathology"], out["pathology"]
    w_pos, w_neg = pos.repeat(7)[None], neg.repeat(7)[None]
    ref = -(w_pos * y * jax.nn.log_sigmoid(z) + w_neg * (1 - y) * jax.nn.log_sigmoid(-z)).mean()
    np.testing.assert_allclose(terms["pathology"], ref, rtol=1e-5)


def test_masked_entries_contribute_exactly_zero_loss_and_gradient():
    out, batch = _outputs(), _batch()
    masked = {k: v.copy() for k, v in batch.items()}
    masked["pathology_mask"][0, 3] = 0
    masked["pathology"][0, 3] = np.nan  # garbage under a zero mask must not leak
    masked["age_mask"][2] = 0
    masked["age"][2] = 900.0  # an implausible age, masked
    masked["example_mask"][5] = 0  # a padding row
    masked["pathology"][5] = np.nan
    masked["age"][5] = np.nan

    def total(o, b):
        return _loss(o, b)[0]

    loss, grads = jax.value_and_grad(total)(out, masked)
    assert np.isfinite(loss)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert grads["pathology"][0, 3] == 0 and grads["age_z"][2] == 0
    assert not np.any(grads["pathology"][5]) and not np.any(grads["metadata"][5]) and grads["age_z"][5] == 0
    # The masked loss equals the loss over the valid entries alone.
    _, terms = _loss(out, masked)
    valid = np.ones((6, 14), bool)
    valid[0, 3] = False
    valid[5] = False
    p = np.asarray(jax.nn.sigmoid(out["pathology"]))
    np.testing.assert_allclose(terms["pathology"], log_loss(batch["pathology"][valid], p[valid]), rtol=1e-5)
    keep = np.array([0, 1, 3, 4])
    ref_age = np.mean(np.abs(out["age"][keep] - batch["age"][keep])) / AGE_STD
    np.testing.assert_allclose(terms["age"], ref_age, rtol=1e-5)


def test_masked_age_leaves_model_gradients_unchanged():
    """End to end through a tiny MetaChexNet: a masked age's value changes nothing in any parameter gradient."""
    model = MetaChexNet("densenet_tiny", rngs=nnx.Rngs(0))
    model.eval()  # fixed statistics so the two evaluations see the same function
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(0), (6, 32, 32, 3))
    batch = _batch()
    batch["age_mask"][1] = 0

    def loss_fn(p, b):
        out = nnx.merge(graphdef, p, rest)(x)
        return _loss(out, b)[0]

    g1 = jax.grad(loss_fn)(params, batch)
    batch2 = dict(batch, age=batch["age"].copy())
    batch2["age"][1] = 500.0
    g2 = jax.grad(loss_fn)(params, batch2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_array_equal(a, b)
    batch3 = dict(batch, age=batch["age"].copy())
    batch3["age"][0] = 500.0  # an unmasked age does change the gradient
    g3 = jax.grad(loss_fn)(params, batch3)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g3)))


def test_no_terms_is_an_error():
    cfg = chexnet.get_config().loss
    with pytest.raises(ValueError, match="no terms"):
        _loss({"age_z": jnp.zeros(6)}, _batch(), cfg)
