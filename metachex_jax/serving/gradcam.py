"""Grad-CAM heatmaps (Selvaraju et al., 2017) placed back on the image: the maps themselves come from the model's
backend (`Predictor.gradcam`; the math: flax_model.make_gradcam), this module maps them onto the original image.

`overlay(original, cam, contract)` maps a map back onto the original image through the pixel contract's geometry
(crop and resize, either order; the part of the image the model did not see gets no colour) and blends it with a
matplotlib colour map. `peak_in_original` finds a map's maximum in the original image's coordinates; the pointing
game that scores maps against bounding boxes is metachex_jax/evaluation/pointing_game.py. No model code: an
exported model's predictions are written without it.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image

from metachex_jax.contract.pixels import PixelContract


def to_original(cam: np.ndarray, contract: PixelContract, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """A (S, S) map at model input -> (map, mask) at the original image's (height, width).

    The model's S x S input shows one box of the original image (`PixelContract.input_box`: the centre crop of the
    R x R resize for "resize_crop", the centre square for "crop_resize"); the map is stretched over that box
    (bilinear) and is 0 elsewhere. `mask` (float 0..1) is where the box covers the image: outside it the model saw
    nothing.
    """
    left, top, right, bottom = contract.input_box(width, height)
    s = contract.image_size
    # PIL's AFFINE maps each output pixel (x, y) to the input point (a x + b y + c, d x + e y + f).
    sx, sy = s / (right - left), s / (bottom - top)
    data = (sx, 0.0, -left * sx, 0.0, sy, -top * sy)

    def place(a):
        return np.asarray(Image.fromarray(np.asarray(a, np.float32), mode="F").transform(
            (width, height), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR, fillcolor=0.0))

    return place(cam), np.clip(place(np.ones((s, s), np.float32)), 0.0, 1.0)


def overlay(original: np.ndarray, cam: np.ndarray, contract: PixelContract, *, colormap: str = "jet",
            alpha: float = 0.45, max_side: int = 2048) -> np.ndarray:
    """RGB uint8 (H', W', 3): the original gray image with the map (normalised by its maximum) blended on top.

    `original` is the full-size gray image (uint8 or float 0..255); larger than `max_side` it is shown scaled down
    (aspect kept).
    """
    height, width = original.shape
    scale = min(1.0, max_side / max(height, width))
    out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
    gray = Image.fromarray(np.clip(original, 0, 255).astype(np.uint8), mode="L")
    gray = np.asarray(gray.resize((out_w, out_h), Image.Resampling.BOX) if scale < 1 else gray, np.float32)
    heat, covered = to_original(np.asarray(cam, np.float32), contract, out_w, out_h)
    peak = float(heat.max())
    heat = heat / peak if peak > 0 else heat
    colours = colormaps[colormap](heat)[..., :3] * 255.0
    weight = (alpha * covered * np.clip(heat * 2.0, 0.0, 1.0))[..., None]  # faint where the map is near 0
    blended = (1.0 - weight) * gray[..., None] + weight * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def peak_in_original(cam: np.ndarray, contract: PixelContract, width: int, height: int) -> tuple[float, float]:
    """(x, y) in the original image's pixel coordinates of the map's maximum (pixel centre)."""
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    left, top, right, bottom = contract.input_box(width, height)
    s = contract.image_size
    return left + (col + 0.5) * (right - left) / s, top + (row + 0.5) * (bottom - top) / s
