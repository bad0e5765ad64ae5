"""The one place that defines what pixels the model expects, and how a raw image file becomes them.

The data pipeline hands the accelerator **uint8 grayscale** images of shape (N, H, W) (or (N, H, W, 1)),
values 0..255, already cropped/resized to the model resolution. `to_model_input` runs inside the jitted
step and turns them into what every DenseNet here (and torchvision's ImageNet weights) expects:

    float (N, H, W, 3), gray replicated to RGB, x = (pixel / 255 - IMAGENET_MEAN) / IMAGENET_STD

i.e. roughly in [-2.1, 2.6]. Feeding 0..255 floats, or 0..1 floats, to the model directly is the classic
mistake; `check_model_input` warns when an array looks like either.

`PixelContract` is that definition as a property of a model, saved with it (a run's config, an exported model's
card): its geometry on the host (`from_file`: the raw file is read and resized to R x R exactly as the dataset
builders do, then centre-cropped to S x S exactly as evaluation does on a stored record, `from_stored`) and its
normalisation on the device (`model_input`). Training, evaluation, `predict` and export all go through it, so a
model is fed the same pixels from a prepared dataset and from a raw file.
"""

from __future__ import annotations

import dataclasses
import os
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


NORMALIZATIONS = {"imagenet": to_model_input}  # name -> device-side uint8 -> model input


@dataclasses.dataclass(frozen=True)
class PixelContract:
    """How a model's input is made from an image: resize to R x R, centre crop S x S, then normalise."""

    image_size: int = 224  # S: the model's input is S x S
    resolution: int = 256  # R: images are resized to R x R first (at dataset build time for training)
    normalization: str = "imagenet"  # a key of NORMALIZATIONS

    def __post_init__(self):
        if not 0 < self.image_size <= self.resolution:
            raise ValueError(f"pixel contract: image_size {self.image_size} must be in 1..resolution "
                             f"({self.resolution})")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"pixel contract: unknown normalization {self.normalization!r}; "
                             f"expected one of {sorted(NORMALIZATIONS)}")

    @classmethod
    def from_config(cls, config) -> PixelContract:
        """The contract of a run's config (its `data` section: resolution R and image_size S)."""
        return cls(int(config["data"]["image_size"]), int(config["data"]["resolution"]))

    @classmethod
    def from_json(cls, data: dict) -> PixelContract:
        return cls(int(data["image_size"]), int(data["resolution"]), str(data.get("normalization", "imagenet")))

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "description": self.describe()}

    def describe(self) -> str:
        return (f"gray image resized to {self.resolution}x{self.resolution} (aspect ratio not kept, area "
                f"filter), centre {self.image_size}x{self.image_size} crop, uint8 0..255; on the device: "
                "gray -> 3 channels, (x / 255 - ImageNet mean) / ImageNet std")

    def crop_offset(self) -> int:
        """Rows/columns cut from each side of the R x R image by the centre crop."""
        return (self.resolution - self.image_size) // 2

    def from_stored(self, image: np.ndarray) -> np.ndarray:
        """A stored R x R record image (H, W) or (H, W, 1) -> the model's S x S uint8 (the evaluation crop)."""
        from metachex_jax.data.augment import as_gray_2d, center_crop

        return center_crop(as_gray_2d(image), self.image_size)

    def from_file(self, path: str | os.PathLike, *, bit_depth: int | None = None):
        """A raw image file -> (S x S uint8, the reader's ImageInfo): the builders' read and resize, then
        `from_stored`. Raises `metachex_jax.data.images.ImageDecodeError` naming the file."""
        from metachex_jax.data import images

        stored, info = images.load_gray_with_info(path, self.resolution, bit_depth=bit_depth)
        return self.from_stored(stored), info

    def model_input(self, images, dtype=jnp.float32):
        """uint8 (N, S, S) -> the normalised model input (inside jit, on the device)."""
        return NORMALIZATIONS[self.normalization](images, dtype)
