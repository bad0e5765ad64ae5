"""The one place that defines what pixels the model expects, and how a raw image file becomes them.

The data pipeline hands the accelerator **uint8 grayscale** images of shape (N, H, W) (or (N, H, W, 1)),
values 0..255, already cropped/resized to the model resolution. `to_model_input` runs inside the jitted
step and turns them into what every DenseNet here (and torchvision's ImageNet weights) expects:

    float (N, H, W, 3), gray replicated to RGB, x = (pixel / 255 - IMAGENET_MEAN) / IMAGENET_STD

i.e. roughly in [-2.1, 2.6]. Feeding 0..255 floats, or 0..1 floats, to the model directly is the classic
mistake; `check_model_input` warns when an array looks like either.

torchxrayvision's models expect other pixels: `to_xrv_input`, one channel, `(2 * x / 255 - 1) * 1024`.

`PixelContract` is the whole definition as a property of a model, saved with it (a run's config: `data.image_size`,
`data.resolution`, `model.normalization`, `model.geometry`; a model card's "input"): its geometry on the host
(`from_file`: the raw file is read and resized to R x R exactly as the dataset builders do, then cut to S x S
exactly as evaluation does on a stored record, `from_stored`; the geometries are defined in
`metachex_jax.imaging.geometry`) and
its normalisation on the device (`model_input`, which also fixes the number of input channels). Training,
evaluation, feature extraction, `predict` and export all go through it, so a model is fed the same pixels from a
prepared dataset and from a raw file, and never another model's pixels.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from metachex_jax.imaging.file_formats import DEFAULT_MAX_PIXELS
from metachex_jax.imaging.geometry import GEOMETRIES, as_gray_2d, eval_view, square_box
from metachex_jax.imaging.images import load_gray_with_info

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
            "use metachex_jax.to_model_input", stacklevel=2)
    elif lo >= 0.0 and hi <= 1.0:
        warnings.warn(
            f"model input ranges {lo:.2f}..{hi:.2f}: looks like 0..1 pixels without ImageNet "
            "normalisation; use metachex_jax.to_model_input", stacklevel=2)


def to_xrv_input(images, dtype=jnp.float32):
    """uint8 gray (N, H, W) or (N, H, W, 1) -> float (N, H, W, 1) in [-1024, 1024], torchxrayvision's scaling
    `(2 * x / maxval - 1) * 1024` with maxval 255 (`xrv.datasets.normalize(img, 255)`)."""
    if images.dtype != jnp.uint8:
        raise TypeError(f"to_xrv_input expects uint8 pixels 0..255, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] != 1:
        raise ValueError(f"expected (N, H, W) or (N, H, W, 1) gray images, got {images.shape}")
    return ((2.0 * images.astype(jnp.float32) / 255.0 - 1.0) * 1024.0).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Device-side uint8 gray -> model input, and the number of input channels it makes."""

    function: Callable
    channels: int
    description: str


NORMALIZATIONS = {
    "imagenet": Normalization(to_model_input, 3, "gray -> 3 channels, (x / 255 - ImageNet mean) / ImageNet std"),
    "xrv": Normalization(to_xrv_input, 1, "1 channel, (2 x / 255 - 1) * 1024, i.e. [-1024, 1024] "
                                          "(torchxrayvision)"),
}


def channels_of(normalization: str) -> int:
    """Input channels a model fed by `normalization` needs (its first convolution's input width)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {sorted(NORMALIZATIONS)}")
    return NORMALIZATIONS[normalization].channels


@dataclasses.dataclass(frozen=True)
class PixelContract:
    """How a model's input is made from an image: geometry on the host, normalisation on the device.

    geometry "resize_crop" (ours): resize to R x R, centre crop S x S. "crop_resize" (torchxrayvision's): centre
    square, resize to R x R (the builders' resize), then to S x S (one resize when R == S, as for converted
    torchxrayvision models). A prepared dataset is built in the geometry of the models that read it (builders.py:
    a crop_resize build keeps the centre square, `_square`), so evaluation and `predict` feed the same pixels; see
    `metachex_jax.imaging.geometry`.
    """

    image_size: int = 224  # S: the model's input is S x S
    resolution: int = 256  # R: images are resized to R x R first (at dataset build time for training)
    normalization: str = "imagenet"  # a key of NORMALIZATIONS
    geometry: str = "resize_crop"  # one of imaging.geometry.GEOMETRIES

    def __post_init__(self):
        if not 0 < self.image_size <= self.resolution:
            raise ValueError(f"pixel contract: image_size {self.image_size} must be in 1..resolution "
                             f"({self.resolution})")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"pixel contract: unknown normalization {self.normalization!r}; "
                             f"expected one of {sorted(NORMALIZATIONS)}")
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"pixel contract: unknown geometry {self.geometry!r}; expected one of {GEOMETRIES}")

    @property
    def channels(self) -> int:
        """Input channels of the model (1 for torchxrayvision's, 3 for ImageNet-style models)."""
        return NORMALIZATIONS[self.normalization].channels

    @classmethod
    def from_config(cls, config) -> PixelContract:
        """The contract of a run's config: `data.image_size` (S), `data.resolution` (R), and the model's
        `model.normalization` / `model.geometry`. Configs saved before those two existed mean "imagenet" /
        "resize_crop", the only contract there was."""
        model = config["model"]
        return cls(int(config["data"]["image_size"]), int(config["data"]["resolution"]),
                   str(model.get("normalization", "imagenet")), str(model.get("geometry", "resize_crop")))

    @classmethod
    def from_json(cls, data: dict) -> PixelContract:
        """From a model card's "input" (cards written before geometry existed are "resize_crop")."""
        contract = cls(int(data["image_size"]), int(data["resolution"]), str(data.get("normalization", "imagenet")),
                       str(data.get("geometry", "resize_crop")))
        if "channels" in data and int(data["channels"]) != contract.channels:
            raise ValueError(f"pixel contract: {data['channels']} channels recorded, but normalization "
                             f"{contract.normalization!r} makes {contract.channels}")
        return contract

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "channels": self.channels, "description": self.describe()}

    def describe(self) -> str:
        s, r = self.image_size, self.resolution
        if self.geometry == "resize_crop":
            geometry = f"gray image resized to {r}x{r} (aspect ratio not kept, area filter), centre {s}x{s} crop"
        else:
            geometry = "centre square of the gray image" + (
                f" resized to {s}x{s}" if r == s else f" resized to {r}x{r}, then to {s}x{s}") + " (area filter)"
        return f"{geometry}, uint8 0..255; on the device: {NORMALIZATIONS[self.normalization].description}"

    def input_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom), in an original image's pixel coordinates, of the region the model's
        S x S input shows (Grad-CAM maps are placed back there)."""
        if self.geometry == "crop_resize":
            top, left, side = square_box(height, width)
            return float(left), float(top), float(left + side), float(top + side)
        offset, s, r = (self.resolution - self.image_size) // 2, self.image_size, self.resolution
        return offset * width / r, offset * height / r, (offset + s) * width / r, (offset + s) * height / r

    def from_stored(self, image: np.ndarray) -> np.ndarray:
        """A stored R x R record image (H, W) or (H, W, 1) -> the model's S x S uint8 (the evaluation view)."""
        return eval_view(as_gray_2d(image), self.image_size, self.geometry)

    @property
    def crops_to_square(self) -> bool:
        """Whether a raw file's centre square is cut out before the resize to R x R."""
        return self.geometry == "crop_resize"

    def from_file(self, path: str | os.PathLike, *, bit_depth: int | None = None,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS):
        """A raw image file -> (S x S uint8, the reader's ImageInfo): the builders' read and resize (after the
        square crop for "crop_resize"), then `from_stored`. Raises `metachex_jax.imaging.images.ImageDecodeError`
        naming the file."""
        stored, info = load_gray_with_info(path, self.resolution, bit_depth=bit_depth, square=self.crops_to_square,
                                           max_pixels=max_pixels)
        return self.from_stored(stored), info

    def model_input(self, images, dtype=jnp.float32):
        """uint8 (N, S, S) -> the normalised model input (inside jit, on the device)."""
        return NORMALIZATIONS[self.normalization].function(images, dtype)

