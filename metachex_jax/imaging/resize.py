"""The one resize of the project's pixels: 8-bit gray (H, W) -> (height, width) 8-bit gray, rounded once.

Every image the builders store and `predict` reads goes through `resize_gray`, after the reader has mapped its
source to 8 bits (images.py). So the same 8-bit pixels give the same model input whatever file they came
from, and no value is rounded twice.

- Downscaling (both sides >= the target): the EXACT area average. Output pixel (i, j) covers the input rectangle
  [i H / h, (i + 1) H / h) x [j W / w, (j + 1) W / w); its value is the mean of the input over that rectangle
  (input pixels weighted by the part of them inside it), rounded once to the nearest integer, ties to even (as
  numpy's rint). Computed exactly, in integers: in units of 1 / h of a pixel, every overlap of an output band
  with an input pixel is an integer, so each pass (rows, then columns) is a sum of a few integer-weighted taps
  (`_taps`; two or three for ratios under 2) and the rectangle's sum an integer N; the value is N / (H W).
  Pillow's BOX filter, used before, is not an area average for non-integer ratios (each input pixel counts
  wholly or not at all, by where its centre falls) and rounds between its two passes; OpenCV's INTER_AREA works
  in float32 and is approximate for some ratios (errors up to 0.5 before rounding at 1024 -> 1023, measured).
  CPU per image on the 2-core box (load 4-6): 390 x 320 -> 256 0.33 ms (Pillow's BOX 0.31), 1024^2 -> 256
  1.46 ms (1.28), 2000^2 -> 256 3.2 ms (3.8), 256^2 -> 73 0.11 ms (0.11).
- Upscaling (a side smaller than the target; only tiny synthetic images): bilinear interpolation in float32
  (OpenCV, pixel centres aligned, edges replicated), rounded once.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

cv2.setNumThreads(1)  # one thread: decoding runs a process per core


def resize_gray(gray: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """uint8 (H, W) -> uint8 (height, width) (width defaults to height); see the module docstring."""
    width = height if width is None else width
    gray = np.asarray(gray)
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"resize_gray takes uint8 (H, W) gray pixels, got {gray.dtype} {gray.shape}")
    if gray.shape == (height, width):
        return gray
    if gray.shape[0] >= height and gray.shape[1] >= width:
        return area_average(gray, height, width)
    resized = cv2.resize(gray.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def area_average(gray: np.ndarray, height: int, width: int) -> np.ndarray:
    """The exact area average of uint8 (H, W) onto (height, width) <= (H, W), rounded once (ties to even)."""
    rows, cols = gray.shape
    dtype = np.int32 if 255 * rows * cols < 2**31 else np.int64  # holds every sum below
    row_pixels, row_weights = _taps(rows, height)
    bands = np.einsum("kiw,ki->iw", gray[row_pixels], row_weights, dtype=dtype)  # (height, cols)
    col_pixels, col_weights = _taps(cols, width)
    sums = np.einsum("ikj,kj->ij", bands[:, col_pixels], col_weights, dtype=dtype)  # (height, width)
    # The value is sums / (rows x cols): exact in float64 (sums < 2**53), and a value that is no tie lies at least
    # 1 / (2 rows cols) from one, far above the error of the division; rint rounds ties to even.
    return np.rint(sums / float(rows * cols)).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def _taps(size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """For `count` equal bands of [0, size): the input pixels each band overlaps, (K, count), and the overlaps as
    integer weights in units of 1 / count of a pixel, (K, count), summing to `size` per band (0 for unused taps).
    Cached (a dataset's images mostly share their sizes): read-only."""
    band = np.arange(count, dtype=np.int64)
    start, end = band * size, (band + 1) * size  # in units of 1 / count
    first = start // count
    taps = int(((end - 1) // count - first).max()) + 1
    pixels = first[None, :] + np.arange(taps)[:, None]
    weights = np.clip(np.minimum(end, (pixels + 1) * count) - np.maximum(start, pixels * count), 0, None)
    pixels, weights = np.minimum(pixels, size - 1), weights.astype(np.int32)
    pixels.setflags(write=False)
    weights.setflags(write=False)
    return pixels, weights
