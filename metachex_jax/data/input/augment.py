"""Image augmentation for the input pipeline: stored R x R uint8 gray -> model resolution S x S uint8 gray.

Training: a random S x S crop of the stored image, optionally a small random affine (rotation, scale,
translation) about the crop centre, then an optional horizontal flip. The crop and the affine are ONE
resampling (OpenCV's `warpAffine` with a composed matrix, bilinear, rounded to uint8), so an image is interpolated
at most once; with no rotation/scale/translation configured the crop is a plain array slice (exact, ~40x faster).
Pixels the affine pulls from outside the stored image are 0 (black, like the X-ray border). OpenCV rather than
Pillow's `Image.transform` (the same geometry): 0.11 against 0.82 ms of CPU per 224 px image, measured on the
2-core CPU box; the affine was the input pipeline's hot spot. OpenCV runs single-threaded here (its thread pool
would compete with the input workers).

Evaluation: the centre S x S crop, no randomness. Centre crop (rather than resizing R -> S) keeps the pixel
scale the model saw in training, where crops are taken at scale 1 from the same R x R images (the CheXNet
recipe: resize to 256, random-crop 224 to train, centre-crop 224 to test).

Evaluation views and the two geometries ("resize_crop", ours; "crop_resize", torchxrayvision's) are defined in
`metachex_jax.imaging.geometry`, which the pixel contract uses too. In "crop_resize" training resizes the stored
record to S first, then applies the affine and flip (a random S x S crop of an S x S image is the whole image).

Images stay uint8 0..255 here. Normalisation is NOT done on the host: it happens on the device in
`metachex_jax.contract.pixels` (`to_model_input` for ImageNet-style models), the one definition of model
input.

Every random draw comes from the `np.random.Generator` passed in, always in the same order, so an image's
augmentation depends only on that generator's seed (the pipeline derives it from (seed, epoch, record index)).
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from metachex_jax.imaging.geometry import GEOMETRIES, check_fits, eval_view

cv2.setNumThreads(1)  # one thread: OpenCV's pool would compete with the input workers


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Training augmentation settings. `Augmentation.none()` turns all randomness off (centre crop only)."""

    random_crop: bool = True                      # False: centre crop
    flip_probability: float = 0.5                 # horizontal flip
    rotation_degrees: float = 0.0                 # rotation drawn uniformly from [-d, d]
    scale_range: tuple[float, float] = (1.0, 1.0)  # zoom drawn uniformly; > 1 magnifies
    translate_fraction: float = 0.0               # shift drawn uniformly from [-f, f] * S per axis

    def __post_init__(self):
        problems = []
        if not 0.0 <= self.flip_probability <= 1.0:
            problems.append(f"flip_probability={self.flip_probability} not in [0, 1]")
        if not 0.0 <= self.rotation_degrees <= 180.0:
            problems.append(f"rotation_degrees={self.rotation_degrees} not in [0, 180]")
        low, high = self.scale_range
        if not 0.0 < low <= high:
            problems.append(f"scale_range={self.scale_range} must satisfy 0 < low <= high")
        if not 0.0 <= self.translate_fraction < 1.0:
            problems.append(f"translate_fraction={self.translate_fraction} not in [0, 1)")
        if problems:
            raise ValueError("invalid Augmentation: " + "; ".join(problems))

    @classmethod
    def none(cls) -> Augmentation:
        return cls(random_crop=False, flip_probability=0.0)

    @property
    def has_affine(self) -> bool:
        return (self.rotation_degrees > 0 or self.scale_range != (1.0, 1.0)
                or self.translate_fraction > 0)


def train_view(image: np.ndarray, size: int, augmentation: Augmentation, rng: np.random.Generator,
               geometry: str = "resize_crop") -> np.ndarray:
    """A stored (H, W) uint8 record -> an augmented size x size training input in `geometry`."""
    if geometry == "crop_resize":
        image = eval_view(image, size, geometry)
    elif geometry != "resize_crop":
        raise ValueError(f"unknown geometry {geometry!r}; expected one of {GEOMETRIES}")
    return augment(image, size, augmentation, rng)


NUM_UNIFORMS = 7  # u_top, u_left, u_angle, u_scale, u_dx, u_dy, u_flip: the draws of one image's augmentation


def augment(image: np.ndarray, size: int, augmentation: Augmentation, rng: np.random.Generator) -> np.ndarray:
    """Random crop (+ affine) (+ flip) of a (H, W) uint8 image to (size, size) uint8."""
    # Draw everything up front, in a fixed order, whatever the settings, so that changing one setting does
    # not shift the random stream of the others.
    return augment_with(image, size, augmentation, rng.random(NUM_UNIFORMS))


def geometry(uniforms, height: int, width: int, size: int, augmentation: Augmentation) -> dict:
    """The augmentation of one image from its NUM_UNIFORMS draws in [0, 1): crop corner (top, left) as floats
    holding whole numbers, rotation (degrees), scale, shift (dx, dy in pixels) and flip (bool).

    Only arithmetic and comparisons, so the same function serves the host (numpy/Python floats, `augment_with`)
    and the device (jax arrays of a whole batch, `metachex_jax.data.input.device_augment`): both augmentations have
    the same parameter ranges and meaning by construction.
    """
    u_top, u_left, u_angle, u_scale, u_dx, u_dy, u_flip = (uniforms[..., i] for i in range(NUM_UNIFORMS))
    if augmentation.random_crop:
        top, left = (u_top * (height - size + 1)) // 1, (u_left * (width - size + 1)) // 1
    else:
        top, left = 0 * u_top + (height - size) // 2, 0 * u_left + (width - size) // 2
    low, high = augmentation.scale_range
    shift = augmentation.translate_fraction * size
    return {"top": top, "left": left, "degrees": (2 * u_angle - 1) * augmentation.rotation_degrees,
            "scale": low + u_scale * (high - low), "dx": (2 * u_dx - 1) * shift, "dy": (2 * u_dy - 1) * shift,
            "flip": u_flip < augmentation.flip_probability}


def augment_with(image: np.ndarray, size: int, augmentation: Augmentation, uniforms: np.ndarray) -> np.ndarray:
    """`augment` with its NUM_UNIFORMS draws given (see `geometry`)."""
    height, width = image.shape
    check_fits(image, size)
    g = geometry(np.asarray(uniforms, np.float64), height, width, size, augmentation)
    top, left = int(g["top"]), int(g["left"])
    if augmentation.has_affine:
        out = affine_crop(image, size, top=top, left=left, degrees=float(g["degrees"]), scale=float(g["scale"]),
                          dx=float(g["dx"]), dy=float(g["dy"]))
    else:
        out = image[top:top + size, left:left + size]
    if g["flip"]:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def affine_crop(image: np.ndarray, size: int, *, top: int, left: int, degrees: float = 0.0, scale: float = 1.0,
                dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """The size x size window at (top, left), rotated by `degrees` (clockwise as displayed, rows pointing
    down), zoomed by `scale` about its centre and shifted by (dx, dy) pixels, in one bilinear resampling.

    Output pixel p maps to input c_in + R(-angle) (p - c_out - d) / scale, with c_out the output centre,
    c_in the centre of the window, d = (dx, dy), written below as (a, b, c, d, e, f) in continuous pixel
    coordinates (pixel centres at +0.5), for which the identity with offset (1, 0, left, 0, 1, top) is the array
    slice. OpenCV puts pixel centres at whole numbers, hence the half-pixel terms of its matrix. Neighbours
    outside the image count as 0 (constant border), so a sample half a pixel beyond the edge is half as bright.
    """
    angle = math.radians(degrees)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    half = size / 2.0
    cx_in, cy_in = left + half, top + half
    # input = C_in + M @ (out - C_out - d), M = [[cos, sin], [-sin, cos]]
    ox, oy = half + dx, half + dy
    a, b, d, e = cos, sin, -sin, cos
    c = cx_in - a * ox - b * oy
    f = cy_in - d * ox - e * oy
    to_input = np.array([[a, b, c + (a + b - 1) / 2], [d, e, f + (d + e - 1) / 2]])
    return cv2.warpAffine(np.ascontiguousarray(image), to_input, (size, size),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)
