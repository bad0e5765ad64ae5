"""Training augmentation on the accelerator (`config.data.augment_on = "device"`), inside the jitted train step.

The host then only reads and batches the stored R x R uint8 images (`pipeline.train_batches(...,
augmentation=None)`); this module turns such a batch into the S x S uint8 crops that `augment.augment` would
have made on the host, with the same parameter ranges and meaning (`augment.geometry` is shared):

    random crop (top, left)   exactly the host's integer window: `lax.dynamic_slice`, no resampling
    small affine              rotation / scale / shift about the crop centre, one bilinear resampling with the
                              host's conventions (the same matrix, neighbours outside the image count as 0,
                              rounded to uint8), so it matches the host's OpenCV `warpAffine` up to rounding
                              (OpenCV quantises coordinates to 1/32 pixel: +-1 grey level here and there)
    horizontal flip           after the above, exactly as on the host

Randomness: example i of the global batch at train step t draws its NUM_UNIFORMS uniforms from
`fold_in(fold_in(fold_in(key(seed), _STREAM), t), i)`, so a batch's augmentation is a pure function of (seed, step, position in the
batch): reproducible, independent of how the batch is sharded over devices, and the same after a resume (the
step is part of the checkpointed state). The host pipeline's draws come from (seed, epoch, record index)
instead; the two modes therefore augment a given record differently, with the same distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metachex_jax.data.input.augment import NUM_UNIFORMS, Augmentation, geometry

# Folded into the seed's key first, so that these draws are not those of other users of the same seed (the
# model's initialisation uses nnx.Rngs(seed), which also folds counts into key(seed)).
_STREAM = 0x617567  # "aug"


def uniforms(seed: int, step, batch_size: int) -> jax.Array:
    """(batch_size, NUM_UNIFORMS) float32 in [0, 1): example i's draws at `step` (a traced int is fine)."""
    step_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STREAM), step)
    keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(batch_size))
    return jax.vmap(lambda k: jax.random.uniform(k, (NUM_UNIFORMS,), jnp.float32))(keys)


def augment_batch(images: jax.Array, u: jax.Array, size: int, augmentation: Augmentation) -> jax.Array:
    """(B, H, W) uint8 stored images and their (B, NUM_UNIFORMS) draws -> (B, size, size) uint8."""
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.dtype != jnp.uint8 or images.ndim != 3:
        raise ValueError(f"expected uint8 (B, H, W) images, got {images.dtype} {images.shape}")
    _, height, width = images.shape
    if height < size or width < size:
        raise ValueError(f"stored images {images.shape[1:]} are smaller than the model resolution {size}")
    g = geometry(u, height, width, size, augmentation)
    top, left = g["top"].astype(jnp.int32), g["left"].astype(jnp.int32)
    if augmentation.has_affine:
        out = jax.vmap(_affine_crop, in_axes=(0, 0, 0, 0, 0, 0, 0, None))(
            images, top, left, g["degrees"], g["scale"], g["dx"], g["dy"], size)
    else:
        out = jax.vmap(lambda image, t, l: jax.lax.dynamic_slice(image, (t, l), (size, size)))(images, top, left)
    return jnp.where(g["flip"][:, None, None], out[:, :, ::-1], out)


def train_images(images: jax.Array, step, *, seed: int, size: int, augmentation: Augmentation) -> jax.Array:
    """The train step's augmentation: stored (B, H, W) uint8 -> augmented (B, size, size) uint8."""
    return augment_batch(images, uniforms(seed, step, images.shape[0]), size, augmentation)


def _affine_crop(image, top, left, degrees, scale, dx, dy, size: int):
    """Device twin of `augment.affine_crop` (same matrix): output pixel p samples input
    c_in + R(-angle) (p - c_out - d) / scale, bilinear, in continuous coordinates with pixel centres at +0.5."""
    height, width = image.shape
    angle = jnp.deg2rad(degrees)
    cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
    half = size / 2.0
    centre = jnp.arange(size, dtype=jnp.float32) + 0.5
    px, py = centre[None, :] - (half + dx), centre[:, None] - (half + dy)
    x_in = left + half + cos * px + sin * py
    y_in = top + half - sin * px + cos * py
    x, y = x_in - 0.5, y_in - 0.5  # pixel centres at whole numbers from here on
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    pixels = image.astype(jnp.float32)

    def at(yy, xx):  # a neighbour outside the image is 0 (OpenCV's constant border)
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        return jnp.where(inside, pixels[jnp.clip(yy, 0, height - 1), jnp.clip(xx, 0, width - 1)], 0.0)

    upper = (1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1)
    lower = (1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)
    return jnp.clip(jnp.round((1 - fy) * upper + fy * lower), 0, 255).astype(jnp.uint8)
