"""The pixel geometry: where a model's S x S input lies in an image, without randomness. The one definition the
pixel contract (models/contract.py), the reader's square crop (images.py) and the input pipeline's evaluation
view (data/input/augment.py) share.

Geometries (`GEOMETRIES`; a model's pixel contract says which it expects):
- "resize_crop" (ours, CheXNet's): the image resized to R x R (at build time), its centre S x S crop to evaluate
  (the training input pipeline takes random S x S crops of the same R x R images).
- "crop_resize" (torchxrayvision's): the centre square of the image (`square_box`, XRayCenterCrop's arithmetic),
  resized to S x S by the one resize (`resize.resize_gray`: the exact area average, rounded once). Such a model
  reads builds of its own geometry (`prepare --geometry=crop_resize`, named `_square`: the centre square of each
  image resized to R x R), so a stored record is already the square and the record is resized R -> S: exactly the
  pixels `predict` makes from the raw file (square, R x R, then S x S; tested bit for bit on non-square files).
"""

from __future__ import annotations

import numpy as np

from metachex_jax.imaging.resize import resize_gray

GEOMETRIES = ("resize_crop", "crop_resize")


def as_gray_2d(image: np.ndarray) -> np.ndarray:
    """(H, W, 1) or (H, W) uint8 -> (H, W) uint8."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 gray image (H, W) or (H, W, 1), got {image.dtype} {image.shape}")
    return image


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The centre size x size crop of a (H, W) image (the evaluation transform)."""
    height, width = image.shape
    check_fits(image, size)
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(image[top:top + size, left:left + size])


def square_box(height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of the centre square, as torchxrayvision's XRayCenterCrop computes it."""
    side = min(height, width)
    return height // 2 - side // 2, width // 2 - side // 2, side


def eval_view(image: np.ndarray, size: int, geometry: str = "resize_crop") -> np.ndarray:
    """A (H, W) uint8 image (a stored record, or a raw image already resized) -> the model's size x size input, no
    randomness: evaluation, feature extraction and `predict` (through the pixel contract)."""
    if geometry == "resize_crop":
        return center_crop(image, size)
    if geometry == "crop_resize":
        check_fits(image, size)
        top, left, side = square_box(*image.shape)
        square = image[top:top + side, left:left + side]
        return resize_gray(np.ascontiguousarray(square), size)
    raise ValueError(f"unknown geometry {geometry!r}; expected one of {GEOMETRIES}")


def check_fits(image: np.ndarray, size: int) -> None:
    if image.shape[0] < size or image.shape[1] < size:
        raise ValueError(f"stored image {image.shape} is smaller than the model resolution {size}; "
                         "build the dataset at a resolution >= the model resolution")
