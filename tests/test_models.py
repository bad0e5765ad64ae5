"""DenseNet / MetaChexNet: torchvision's parameter counts, shapes, BatchNorm modes, initialisation, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metachex_jax.configs import chexnet, pretrain
from metachex_jax.models import SPECS, DenseNet, DenseNet121, MetaChexNet, build_model, count_params
from metachex_jax.models.densenet import conv_init


@pytest.mark.parametrize("arch,expected", [
    ("densenet121", 7_978_856), ("densenet169", 14_149_480), ("densenet201", 20_013_928),
    ("densenet161", 28_681_000)])
def test_parameter_counts_match_torchvision(arch, expected):
    model = nnx.eval_shape(lambda: DenseNet(arch, num_classes=1000, rngs=nnx.Rngs(0)))
    assert count_params(model) == expected


def test_densenet121_factory_and_feature_width():
    model = nnx.eval_shape(lambda: DenseNet121(num_classes=None))
    assert model.classifier is None and model.num_features == 1024 == SPECS["densenet121"].num_features


def _tiny_batch(n=4, size=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def test_tiny_forward_shapes_and_features():
    model = DenseNet("densenet_tiny", num_classes=5, rngs=nnx.Rngs(0))
    x = _tiny_batch()
    assert model(x).shape == (4, 5)
    assert model.features(x).shape == (4, SPECS["densenet_tiny"].num_features)
    # Stem /4, three transitions /8: a 32 px input reaches the last block at 1x1 and still works.
    assert model.features(_tiny_batch(size=64)).shape == (4, model.num_features)


def test_batchnorm_train_updates_statistics_eval_uses_them():
    model = DenseNet("densenet_tiny", num_classes=3, rngs=nnx.Rngs(0))
    x = _tiny_batch()
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    model.train()
    model(x)
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    assert all(changed)
    # momentum 0.9 (torch's 0.1): one step from mean 0 moves the running mean 10% of the way to the batch mean.
    batch_mean = np.asarray(model.conv0(x)).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(model.norm0.mean[...]), 0.1 * batch_mean, rtol=1e-4, atol=1e-6)
    model.eval()
    out_full = model(x)
    out_single = model(x[:1])  # eval mode: an example's output does not depend on the rest of the batch
    np.testing.assert_allclose(out_full[:1], out_single, rtol=1e-5, atol=1e-6)
    unchanged = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(unchanged)))


def test_torchvision_initialisation_statistics_and_determinism():
    model = DenseNet("densenet121", num_classes=1000, rngs=nnx.Rngs(0))
    k = np.asarray(model.blocks[2].layers[23].conv1.kernel[...])  # (1, 1, 992, 128)
    assert abs(k.std() / np.sqrt(2.0 / 992) - 1) < 0.02
    assert np.abs(k).max() > 3.5 * np.sqrt(2.0 / 992)  # kaiming_normal_ is not truncated at 2 sigma
    w = np.asarray(model.classifier.kernel[...])
    assert np.abs(w).max() <= 1 / 32 and np.abs(w).max() > 0.99 / 32  # U(-1/sqrt(1024), 1/sqrt(1024))
    assert not np.any(np.asarray(model.classifier.bias[...]))
    assert np.all(np.asarray(model.norm5.scale[...]) == 1) and not np.any(np.asarray(model.norm5.bias[...]))
    again = DenseNet("densenet121", num_classes=1000, rngs=nnx.Rngs(0))
    other = DenseNet("densenet121", num_classes=1000, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(again.conv0.kernel[...], model.conv0.kernel[...])
    assert not np.array_equal(other.conv0.kernel[...], model.conv0.kernel[...])
    # Under tracing (jit, eval_shape) the key is abstract and the same distributions come from jax.random.
    traced = np.asarray(jax.jit(lambda key: conv_init(key, (1, 1, 992, 128)))(jax.random.key(0)))
    assert abs(traced.std() / np.sqrt(2.0 / 992) - 1) < 0.02 and np.abs(traced).max() > 3.5 * np.sqrt(2.0 / 992)


def test_metachexnet_heads_from_config():
    rngs = nnx.Rngs(0)
    multi = build_model(pretrain.model("densenet_tiny"), rngs)
    out = multi(_tiny_batch())
    assert set(out) == {"pathology", "metadata", "age_z", "age"}
    assert out["pathology"].shape == (4, 14) and out["metadata"].shape == (4, 2) and out["age"].shape == (4,)
    np.testing.assert_allclose(out["age"], multi.age_mean + multi.age_std * out["age_z"], rtol=1e-6)
    baseline = build_model(chexnet.get_config("arch=densenet_tiny").model, rngs)
    assert set(baseline(_tiny_batch())) == {"pathology"}
    assert baseline.metadata_head is None and baseline.age_out is None
    assert multi.features(_tiny_batch()).shape == (4, multi.num_features)


def test_bfloat16_compute_keeps_float32_parameters():
    model = MetaChexNet("densenet_tiny", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    out = model(_tiny_batch())
    assert all(v.dtype == jnp.float32 for v in out.values())
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    model.eval()
    ref = MetaChexNet("densenet_tiny", rngs=nnx.Rngs(0))
    ref.eval()
    np.testing.assert_allclose(model(_tiny_batch())["pathology"], ref(_tiny_batch())["pathology"], atol=0.1)


def test_fast_forward_helpers_equal_the_reference_flax_ops():
    """The forward's CPU-friendly rewrites compute what nnx.Conv / nnx.max_pool / conv-then-avg_pool compute."""
    from metachex_jax.models.densenet import batch_norm, conv, pointwise_conv
    from metachex_jax.models.ops import avg_pool_2x2, max_pool_3x3_stride2

    rngs = nnx.Rngs(0)
    x = jax.random.normal(jax.random.key(1), (2, 9, 11, 6))  # odd sizes: padding and dropped rows matter
    c = conv(6, 5, 1, 1, 0, jnp.float32, rngs)
    np.testing.assert_allclose(pointwise_conv(c, x), c(x), rtol=1e-5, atol=1e-6)
    ref = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    np.testing.assert_array_equal(max_pool_3x3_stride2(x), ref)
    grad = jax.grad(lambda v: (max_pool_3x3_stride2(v) ** 2).sum())(x)
    ref_grad = jax.grad(lambda v: (nnx.max_pool(v, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))) ** 2).sum())(x)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-6)
    # A transition pools before its 1x1 convolution; torchvision convolves first. Both are linear.
    np.testing.assert_allclose(pointwise_conv(c, avg_pool_2x2(x)), nnx.avg_pool(c(x), (2, 2), strides=(2, 2)),
                               rtol=1e-5, atol=1e-6)
    assert batch_norm(6, jnp.float32, rngs).momentum == 0.9


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown DenseNet architecture 'densenet999'; choose one of \['densenet121'"):
        DenseNet("densenet999", rngs=nnx.Rngs(0))
