"""The optimiser from config: lr scaling, schedules, CheXNet's reduce-on-plateau, the plateau scale in the state."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metachex_jax.configs import pretrain
from metachex_jax.training import optim


def test_lr_scaling_rules():
    c = pretrain.optim(lr=1e-3)
    for rule, expected in (("none", 1e-3), ("linear", 4e-3), ("sqrt", 2e-3)):
        c.lr_scaling = rule
        assert optim.scaled_lr(c, global_batch=64) == pytest.approx(expected)  # reference batch 16
    c.lr_scaling = "cubic"
    with pytest.raises(ValueError, match="lr_scaling"):
        optim.scaled_lr(c, 64)


def test_schedules():
    c = pretrain.optim(lr=1e-3)
    c.lr_scaling, c.warmup_steps = "none", 10
    plateau = optim.lr_schedule(c, 16, 100)
    assert float(plateau(0)) == 0 and float(plateau(5)) == pytest.approx(5e-4)
    assert float(plateau(50)) == pytest.approx(1e-3)
    c.schedule = "cosine"
    cosine = optim.lr_schedule(c, 16, 100)
    assert float(cosine(10)) == pytest.approx(1e-3) and float(cosine(100)) == pytest.approx(0, abs=1e-9)
    c.schedule = "step"
    with pytest.raises(ValueError, match="schedule"):
        optim.lr_schedule(c, 16, 100)


def test_plateau_follows_torch_reduce_on_plateau():
    p = optim.Plateau(factor=0.1, patience=1)
    scales = []
    scale = 1.0
    for val_loss in [1.0, 0.9, 0.95, 0.91, 0.92, 0.93, 0.5]:
        scale = p.update(val_loss, scale)
        scales.append(scale)
    # Two evaluations without improvement (more than patience=1) divide the lr by 10, then the count restarts.
    assert scales == pytest.approx([1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    assert p.state() == {"best": 0.5, "bad_evals": 0}


def test_plateau_scale_scales_the_update_and_lives_in_the_state():
    c = pretrain.optim(lr=1e-2)
    c.lr_scaling = "none"
    tx = optim.make_optimizer(c, 16, 100)
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    state = tx.init(params)
    full, _ = tx.update(grads, state, params)
    assert optim.plateau_scale(state) == 1.0
    optim.set_plateau_scale(state, 0.1)
    assert optim.plateau_scale(state) == pytest.approx(0.1)
    reduced, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(reduced["w"], 0.1 * full["w"], rtol=1e-6)
    assert optim.learning_rate(c, 16, 100, 5, state) == pytest.approx(1e-3)


def test_adamw_and_clipping_options():
    c = pretrain.optim(lr=1e-2)
    c.weight_decay = 0.1
    with pytest.raises(ValueError, match="adamw"):
        optim.make_optimizer(c, 16, 10)
    c.name, c.grad_clip_norm = "adamw", 1.0
    tx = optim.make_optimizer(c, 16, 10)
    params = {"w": jnp.ones(2)}
    updates, _ = tx.update({"w": jnp.array([300.0, 400.0])}, tx.init(params), params)
    assert np.all(np.isfinite(updates["w"]))
    clipped = optax.clip_by_global_norm(1.0).update({"w": jnp.array([300.0, 400.0])}, None)[0]["w"]
    np.testing.assert_allclose(clipped, [0.6, 0.8], rtol=1e-6)
