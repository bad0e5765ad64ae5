"""Grad-CAM heatmaps (Selvaraju et al., 2017) for any named output of a model, and their overlays.

    maps = Predictor.load(MODEL).gradcam(uint8_images, ["Cardiomegaly", "age"], layer="final")

For output k and the activation A (N, h, w, C) of `layer` (default "final": ReLU(norm5), the tensor that is
pooled; `DenseNet.layer_names()` lists the others, e.g. "block3" when the last block is too coarse, as in the
64 px demo model whose final map is 2x2):

    weights[n, c] = mean over (h, w) of d score_k[n] / d A[n, :, :, c]
    map[n]        = ReLU(sum_c weights[n, c] * A[n, :, :, c]), upsampled bilinearly to the model input (S x S)

`score` is the logit of a probability output (probabilities saturate) or the value of a regression (age in
years). The gradient is taken through a zero perturbation added at the layer (`DenseNet.feature_map(tap=,
delta=)`), every output at once (`jax.jacrev`); `Predictor` compiles one function per (outputs, layer). Maps are not
normalised: a map's scale says how strongly that layer drives the output; overlays normalise each map by its
maximum.

`overlay(original, cam, contract)` maps a map back onto the original image through the pixel contract's crop
and resize (the part of the image the crop removed gets no colour) and blends it with a matplotlib colour map.
`pointing_game` scores maps against bounding boxes: a hit when the map's maximum lies inside a box of that finding.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from metachex_jax.preprocessing import PixelContract

def make_gradcam(graphdef, names: Sequence[str], layer: str, contract: PixelContract):
    """A pure function (state, uint8 images (N, S, S)) -> {name: (N, S, S) float32 map}."""
    from flax import nnx

    names = tuple(names)

    def maps(state, images):
        model = nnx.merge(graphdef, state)
        x = contract.model_input(images)
        shape = jax.eval_shape(lambda: model.backbone.feature_map(x, tap=layer)[1])

        def scores(delta):
            final, activation = model.backbone.feature_map(x, tap=layer, delta=delta)
            out = model.output_scores(jnp.mean(final, axis=(1, 2)).astype(jnp.float32))
            # Examples are independent in eval mode, so the gradient of the batch sum is per-example.
            return jnp.stack([out[name].sum() for name in names]), activation

        grads, activation = jax.jacrev(scores, has_aux=True)(jnp.zeros(shape.shape, shape.dtype))
        weights = jnp.mean(grads.astype(jnp.float32), axis=(2, 3))  # (K, N, C)
        cams = jax.nn.relu(jnp.einsum("nhwc,knc->knhw", activation.astype(jnp.float32), weights))
        k, n = cams.shape[:2]
        size = images.shape[1]
        cams = jnp.maximum(jax.image.resize(cams, (k, n, size, size), "linear"), 0.0)
        return {name: cams[i] for i, name in enumerate(names)}

    return maps


def to_original(cam: np.ndarray, contract: PixelContract, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """A (S, S) map at model input -> (map, mask) at the original image's (height, width).

    The model saw the centre S x S crop of the image resized to R x R; the map is placed at the crop's position in
    an R x R canvas and the canvas is resized back to the original size. `mask` (float 0..1) is where the crop
    covered the image: outside it the model saw nothing, and the map there is 0.
    """
    r, offset, s = contract.resolution, contract.crop_offset(), contract.image_size
    canvas = np.zeros((r, r), np.float32)
    canvas[offset:offset + s, offset:offset + s] = cam
    covered = np.zeros((r, r), np.float32)
    covered[offset:offset + s, offset:offset + s] = 1.0
    resize = (lambda a: np.asarray(Image.fromarray(a, mode="F").resize((width, height), Image.Resampling.BILINEAR)))
    return resize(canvas), np.clip(resize(covered), 0.0, 1.0)


def overlay(original: np.ndarray, cam: np.ndarray, contract: PixelContract, *, colormap: str = "jet",
            alpha: float = 0.45, max_side: int = 2048) -> np.ndarray:
    """RGB uint8 (H', W', 3): the original gray image with the map (normalised by its maximum) blended on top.

    `original` is the full-size gray image (uint8 or float 0..255); larger than `max_side` it is shown scaled down
    (aspect kept).
    """
    from matplotlib import colormaps

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
    offset, r = contract.crop_offset(), contract.resolution
    return (col + offset + 0.5) * width / r, (row + offset + 0.5) * height / r


def pointing_game(peaks: Sequence[tuple[float, float]], boxes: Sequence[Sequence[tuple[float, float, float, float]]],
                  areas: Sequence[float]) -> dict:
    """Hit rate of map maxima inside boxes, against the random-point baseline.

    peaks[i]: the peak (x, y) of case i's map; boxes[i]: that case's boxes (x, y, w, h) of the finding (one case
    = one image and finding); areas[i]: the image area. Baseline: the expected hit rate of a uniformly random
    point, i.e. the mean share of the image the case's boxes cover.
    """
    hits, shares = [], []
    for (x, y), case_boxes, area in zip(peaks, boxes, areas):
        hits.append(any(bx <= x <= bx + bw and by <= y <= by + bh for bx, by, bw, bh in case_boxes))
        shares.append(min(1.0, _union_area(case_boxes) / area))
    hits = np.asarray(hits, float)
    return {"cases": len(hits), "hits": int(hits.sum()), "hit_rate": float(hits.mean()) if len(hits) else float("nan"),
            "random_point_baseline": float(np.mean(shares)) if shares else float("nan")}


def _union_area(boxes: Sequence[tuple[float, float, float, float]]) -> float:
    """Area covered by axis-aligned boxes (exact, on the grid of their edges)."""
    xs = sorted({v for x, _, w, _ in boxes for v in (x, x + w)})
    ys = sorted({v for _, y, _, h in boxes for v in (y, y + h)})
    area = 0.0
    for x0, x1 in zip(xs, xs[1:]):
        for y0, y1 in zip(ys, ys[1:]):
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            if any(bx <= cx <= bx + bw and by <= cy <= by + bh for bx, by, bw, bh in boxes):
                area += (x1 - x0) * (y1 - y0)
    return area
