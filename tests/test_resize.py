"""The one resize (imaging/resize.py) against brute force: the exact area average in rational arithmetic, rounded
once; bilinear upscaling in float64; and the places that must use it (the square crop, geometry.eval_view)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from test_images import write_png

from metachex_jax.imaging import geometry, images, resize

RNG = np.random.default_rng(0)


def band_weights(size: int, count: int) -> list[dict[int, Fraction]]:
    """For each of `count` equal bands of [0, size): {input pixel: the fraction of the band it covers}."""
    step = Fraction(size, count)
    weights = []
    for band in range(count):
        start, end = band * step, (band + 1) * step
        pixels = range(int(start), min(size, int(end) + 1))
        overlaps = {pixel: min(end, pixel + 1) - max(start, pixel) for pixel in pixels}
        weights.append({pixel: overlap / step for pixel, overlap in overlaps.items() if overlap > 0})
    return weights


def exact_area_average(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Brute force: each output pixel's area-weighted mean in exact rationals, rounded half to even."""
    rows, cols = band_weights(image.shape[0], height), band_weights(image.shape[1], width)
    out = np.zeros((height, width), np.int64)
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            mean = sum(wy * wx * int(image[y, x]) for y, wy in row.items() for x, wx in col.items())
            out[i, j] = round(mean)  # Python rounds a Fraction half to even
    return out


IMAGES = {
    "uniform noise": lambda shape: RNG.integers(0, 256, shape).astype(np.uint8),
    "extremes": lambda shape: RNG.choice(np.array([0, 1, 254, 255], np.uint8), shape),
    "smooth": lambda shape: np.clip(np.cumsum(RNG.normal(0, 3, shape), axis=1) + 128, 0, 255).astype(np.uint8),
}


@pytest.mark.parametrize("kind", IMAGES)
@pytest.mark.parametrize("shape, size", [((16, 16), (8, 8)), ((30, 30), (6, 10)), ((37, 23), (7, 5)),
                                         ((41, 40), (40, 13)), ((17, 29), (17, 3)), ((9, 10), (2, 3)),
                                         ((64, 48), (16, 16))])
def test_downscaling_is_the_exact_area_average_rounded_once(kind, shape, size):
    """Integer and non-integer ratios, ties (half to even) included: bit for bit."""
    image = IMAGES[kind](shape)
    np.testing.assert_array_equal(resize.resize_gray(image, *size), exact_area_average(image, *size))


def test_large_downscales_match_a_float_brute_force_away_from_ties():
    image = IMAGES["smooth"]((300, 257))
    for height, width in ((73, 73), (224, 256), (256, 100)):
        weights_y = np.array([[w.get(y, 0) for y in range(300)] for w in band_weights(300, height)], np.float64)
        weights_x = np.array([[w.get(x, 0) for x in range(257)] for w in band_weights(257, width)], np.float64)
        mean = weights_y @ image.astype(np.float64) @ weights_x.T
        away_from_ties = np.abs(mean - np.floor(mean) - 0.5) > 1e-6
        got = resize.resize_gray(image, height, width)
        np.testing.assert_array_equal(got[away_from_ties], np.rint(mean)[away_from_ties])
        assert np.abs(got - mean).max() <= 0.5 + 1e-9


def bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Brute-force bilinear resampling with pixel centres aligned and edges replicated, in float64."""
    def taps(size, count):
        position = np.clip((np.arange(count) + 0.5) * size / count - 0.5, 0, size - 1)
        low = np.floor(position).astype(int)
        return low, np.minimum(low + 1, size - 1), position - low
    y0, y1, fy = taps(image.shape[0], height)
    x0, x1, fx = taps(image.shape[1], width)
    image = image.astype(np.float64)
    top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
    bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def test_upscaling_is_bilinear_rounded_once():
    image = IMAGES["uniform noise"]((12, 20))
    for size in ((32, 32), (12, 41), (30, 20)):
        expected = bilinear(image, *size)
        got = resize.resize_gray(image, *size)
        away_from_ties = np.abs(expected - np.floor(expected) - 0.5) > 1e-3  # OpenCV's float32 weights
        np.testing.assert_array_equal(got[away_from_ties], np.rint(expected)[away_from_ties])
        assert np.abs(got - expected).max() <= 0.5 + 1e-3


def test_the_square_crop_paths_use_the_same_resize(tmp_path):
    pixels = IMAGES["smooth"]((90, 130))
    write_png(tmp_path / "wide.png", pixels)
    square = pixels[:, 20:110]  # geometry.square_box: the centre square
    for size in (32, 73, 90):
        expected = resize.resize_gray(square, size)
        np.testing.assert_array_equal(images.load_gray(tmp_path / "wide.png", None)[:, 20:110], square)
        np.testing.assert_array_equal(images.load_gray_with_info(tmp_path / "wide.png", size, square=True)[0],
                                      expected)
        np.testing.assert_array_equal(geometry.eval_view(pixels, size, "crop_resize"), expected)
    np.testing.assert_array_equal(resize.resize_gray(square, 90), square)  # the same size: unchanged


def test_resize_takes_uint8_gray_only():
    with pytest.raises(ValueError, match="uint8"):
        resize.resize_gray(np.zeros((4, 4), np.float32), 2)
