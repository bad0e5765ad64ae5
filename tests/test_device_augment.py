"""Augmentation on the device (config.data.augment_on="device") against the host's: the same crops and flips
exactly, the same affine up to rounding, randomness a function of (seed, step, position in the batch)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from metachex_jax.data.input import device_augment, pipeline
from metachex_jax.data.input.augment import NUM_UNIFORMS, Augmentation, augment_with

STORED, SIZE, BATCH = 40, 32, 12
AFFINE = Augmentation(rotation_degrees=10, scale_range=(0.9, 1.1), translate_fraction=0.05)


def stored_images() -> np.ndarray:
    """Half noise (every pixel differs from its neighbours), half smooth X-ray-like gradients."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH, STORED, STORED), dtype=np.uint8)
    y, x = np.mgrid[0:STORED, 0:STORED]
    for i in range(BATCH // 2, BATCH):
        images[i] = (120 + 90 * np.sin(x / (3 + i)) * np.cos(y / 7)).astype(np.uint8)
    return images


def host_and_device(augmentation: Augmentation, seed=3, step=5):
    images = stored_images()
    u = np.asarray(device_augment.uniforms(seed, step, BATCH))
    device = np.asarray(jax.jit(device_augment.augment_batch, static_argnums=(2, 3))(images, u, SIZE, augmentation))
    host = np.stack([augment_with(image, SIZE, augmentation, draws) for image, draws in zip(images, u)])
    return host, device, u


@pytest.mark.parametrize("augmentation", [Augmentation(), Augmentation.none(),
                                          Augmentation(random_crop=False, flip_probability=1.0)],
                         ids=["crop+flip", "centre", "centre+flip"])
def test_crop_and_flip_equal_the_host_exactly(augmentation):
    host, device, u = host_and_device(augmentation)
    assert device.dtype == np.uint8 and device.shape == (BATCH, SIZE, SIZE)
    np.testing.assert_array_equal(device, host)
    if augmentation.random_crop and augmentation.flip_probability == 0.5:
        assert 0 < (u[:, -1] < 0.5).sum() < BATCH  # some flipped, some not: both branches compared
        assert len({tuple(row) for row in (u[:, :2] * (STORED - SIZE + 1)).astype(int)}) > 1


def test_affine_matches_the_host_up_to_rounding():
    host, device, _ = host_and_device(AFFINE)
    difference = np.abs(device.astype(int) - host.astype(int))
    assert difference.mean() < 0.05 and (difference <= 1).mean() > 0.995, (difference.mean(), difference.max())
    # The affine really moved pixels: no image equals its plain crop.
    _, plain, _ = host_and_device(Augmentation())
    assert all(not np.array_equal(a, b) for a, b in zip(device, plain))


def test_affine_extremes_rotate_and_fill_like_the_host():
    """A 90 degree rotation of the whole image (clockwise as displayed) and a zoom-out with its black border."""
    images = stored_images()
    u = np.zeros((BATCH, NUM_UNIFORMS), np.float32)
    u[:, 2] = 1.0  # angle = +rotation_degrees
    u[:, 6] = 1.0  # no flip
    u[:, 4:6] = 0.5  # no shift
    rotate = Augmentation(random_crop=False, flip_probability=0.0, rotation_degrees=90)
    rotated = np.asarray(device_augment.augment_batch(images, u, STORED, rotate)).astype(int)
    np.testing.assert_allclose(rotated, np.rot90(images, k=-1, axes=(1, 2)).astype(int), atol=1)
    u[:, 3] = 0.0  # scale = low
    shrink = Augmentation(random_crop=False, flip_probability=0.0, scale_range=(0.5, 0.5))
    small = np.asarray(device_augment.augment_batch(images, u, SIZE, shrink))
    host = np.stack([augment_with(image, SIZE, shrink, draws) for image, draws in zip(images, u)])
    assert not small[:, :4].any() and not small[:, :, -4:].any()
    assert np.abs(small.astype(int) - host.astype(int)).max() <= 1


def test_randomness_is_a_function_of_seed_step_and_position():
    u = np.asarray(device_augment.uniforms(0, 7, BATCH))
    assert u.shape == (BATCH, NUM_UNIFORMS) and u.dtype == np.float32 and (0 <= u).all() and (u < 1).all()
    np.testing.assert_array_equal(u, device_augment.uniforms(0, 7, BATCH))  # reproducible
    np.testing.assert_array_equal(u[:5], device_augment.uniforms(0, 7, 5))  # example i: its own key
    assert len({row.tobytes() for row in u}) == BATCH
    for other in (device_augment.uniforms(0, 8, BATCH), device_augment.uniforms(1, 7, BATCH)):
        assert not np.isclose(u, np.asarray(other)).any()
    # Inside a jitted function with a traced step, as in the train step.
    traced = jax.jit(lambda step: device_augment.uniforms(0, step, BATCH))(np.int32(7))
    np.testing.assert_array_equal(u, traced)
    images = stored_images()
    step_fn = jax.jit(lambda x, step: device_augment.train_images(x, step, seed=0, size=SIZE, augmentation=AFFINE))
    first = np.asarray(step_fn(images, np.int32(7)))
    np.testing.assert_array_equal(first, step_fn(images, np.int32(7)))
    assert not np.array_equal(first, step_fn(images, np.int32(8)))


def test_host_pipeline_in_device_mode_batches_the_stored_images_whole():
    rng = np.random.default_rng(0)
    records = [{"image": rng.integers(0, 256, (STORED, STORED, 1), dtype=np.uint8), "labels": np.zeros(14, np.uint8),
                "age": np.float32(40), "age_valid": True, "patient_id": np.int64(i), "sex_male": np.int64(1),
                "view_ap": np.int64(0)} for i in range(10)]
    with pipeline.train_batches(records, kind="nih", global_batch_size=4, image_size=SIZE, seed=0,
                                augmentation=None, process_index=0, process_count=1) as batches:
        batch = next(batches)
    assert batch["image"].shape == (4, STORED, STORED) and batch["image"].dtype == np.uint8
    for image, index in zip(batch["image"], batch["index"]):
        np.testing.assert_array_equal(image, records[index]["image"][..., 0])


def test_augment_on_auto_follows_the_backend_and_a_resumed_run():
    assert pipeline.resolve_augment_on("auto", "cpu") == "host"
    assert pipeline.resolve_augment_on("auto", "gpu") == "device"
    assert pipeline.resolve_augment_on("auto", "tpu") == "device"
    assert pipeline.resolve_augment_on("auto", "gpu", saved="host") == "host"  # resume as saved
    assert pipeline.resolve_augment_on("device", "cpu", saved="host") == "device"  # explicit wins
    with pytest.raises(ValueError, match="augment_on='gpu'"):
        pipeline.resolve_augment_on("gpu", "cpu")
    # A torchxrayvision-geometry model (centre square, resize) augments on the host: the device crops R x R.
    assert pipeline.resolve_augment_on("auto", "gpu", geometry="crop_resize") == "host"
    with pytest.raises(ValueError, match="geometry is crop_resize"):
        pipeline.resolve_augment_on("device", "gpu", geometry="crop_resize")
