"""The one place that defines what pixels the model expects.

The data pipeline hands the accelerator **uint8 grayscale** images of shape (N, H, W) (or (N, H, W, 1)),
values 0..255, already cropped/resized to the model resolution. `to_model_input` runs inside the jitted
step and turns them into what every DenseNet here (and torchvision's ImageNet weights) expects:

    float (N, H, W, 3), gray replicated to RGB, x = (pixel / 255 - IMAGENET_MEAN) / IMAGENET_STD

i.e. roughly in [-2.1, 2.6]. Feeding 0..255 floats, or 0..1 floats, to the model directly is the classic
mistake; `check_model_input` warns when an array looks like either.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_model_input(images, dtype=jnp.float32):
    """uint8 gray (N, H, W) or (N, H, W, 1) -> normalised float (N, H, W, 3) for the model."""
    if images.dtype != jnp.uint8:
        raise TypeError(f"to_model_input expects uint8 pixels 0..255, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected (N, H, W), (N, H, W, 1) or (N, H, W, 3) images, got {images.shape}")
    x = images.astype(jnp.float32) / 255.0
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
    return ((x - mean) / std).astype(dtype)


def check_model_input(x) -> None:
    """Warn when a float array does not look like `to_model_input` output (a pixel-range mistake)."""
    x = np.asarray(x)
    lo, hi = float(x.min()), float(x.max())
    if hi > 10.0:
        warnings.warn(
            f"model input ranges {lo:.1f}..{hi:.1f}: looks like raw 0..255 pixels; "
            "use metachex_jax.preprocessing.to_model_input", stacklevel=2)
    elif lo >= 0.0 and hi <= 1.0:
        warnings.warn(
            f"model input ranges {lo:.2f}..{hi:.2f}: looks like 0..1 pixels without ImageNet "
            "normalisation; use metachex_jax.preprocessing.to_model_input", stacklevel=2)
