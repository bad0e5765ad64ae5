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

`overlay(original, cam, contract)` maps a map back onto the original image through the pixel contract's geometry
(crop and resize, either order; the part of the image the model did not see gets no colour) and blends it with a
matplotlib colour map.
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
    left, top, right, bottom = contract.input_box(width, height)
    s = contract.image_size
    return left + (col + 0.5) * (right - left) / s, top + (row + 0.5) * (bottom - top) / s


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
            "random_point_baseline": float(np.mean(shares)) if shares else float("nan"), "case_hits": hits}


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


# ---------------------------------------------------------------------------------------------------------------
# The pointing game on NIH-format bounding boxes: python -m metachex_jax.gradcam --model=RUN --nih_dir=DIR

BBOX_LABELS = {"Infiltrate": "Infiltration"}  # BBox_List_2017.csv's spelling -> the label name


def read_bbox_list(path: str) -> dict[str, dict[str, list[tuple[float, float, float, float]]]]:
    """NIH's BBox_List_2017.csv -> {image name: {finding: [(x, y, w, h), ...]}} (pixels of the original image).

    The real file's header is `Image Index,Finding Label,Bbox [x,y,w,h],,,` (the box takes four fields).
    """
    import csv

    boxes: dict = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0] != "Image Index" or len(header) < 6:
            raise ValueError(f"{path}: not a BBox_List_2017.csv (header {header})")
        problems = []
        for line, row in enumerate(reader, start=2):
            try:
                x, y, w, h = (float(v) for v in row[2:6])
            except (ValueError, IndexError):
                problems.append(f"line {line}: {row}")
                continue
            label = BBOX_LABELS.get(row[1].strip(), row[1].strip())
            boxes.setdefault(row[0].strip(), {}).setdefault(label, []).append((x, y, w, h))
    if problems:
        raise ValueError(f"{path}: rows without four numbers:\n  " + "\n  ".join(problems))
    return boxes


def pointing_game_run(model: str, nih_dir: str, *, bbox_csv: str | None = None, layer: str = "final",
                      split_list: str | None = "test_list.txt", n_boot: int = 1000, seed: int = 0) -> dict:
    """Grad-CAM pointing game of MODEL on the boxed images of an NIH-layout folder (real or demo)."""
    import os

    from metachex_jax.inference import Predictor

    bbox_csv = bbox_csv or os.path.join(nih_dir, "BBox_List_2017.csv")
    boxes = read_bbox_list(bbox_csv)
    if split_list:
        names = set(open(os.path.join(nih_dir, split_list)).read().split())
        boxes = {k: v for k, v in boxes.items() if k in names}
    files = {}
    for root, _, found in os.walk(nih_dir):
        files.update({n: os.path.join(root, n) for n in found if n in boxes})
    missing = sorted(set(boxes) - set(files))
    if missing:
        raise FileNotFoundError(f"{len(missing)} boxed images are not under {nih_dir}, e.g. {missing[:5]}")
    predictor = Predictor.load(model)
    findings = sorted({f for per_image in boxes.values() for f in per_image} & set(predictor.output_names))
    if not findings:
        raise ValueError(f"the model has none of the boxed findings' outputs ({sorted(predictor.output_names)})")
    cases = []  # (finding, peak, boxes, area)
    ordered = sorted(files)
    for start in range(0, len(ordered), predictor.batch_size):
        chunk = ordered[start:start + predictor.batch_size]
        crops, infos = zip(*(predictor.contract.from_file(files[n]) for n in chunk))
        maps = predictor.gradcam(np.stack(crops), findings, layer=layer)
        for i, name in enumerate(chunk):
            for finding, finding_boxes in boxes[name].items():
                if finding in maps:
                    peak = peak_in_original(maps[finding][i], predictor.contract, infos[i].width, infos[i].height)
                    cases.append((finding, peak, finding_boxes, infos[i].width * infos[i].height))
    rng = np.random.default_rng(seed)

    def score(selected):  # with a 95% CI: bootstrap over cases
        result = pointing_game([c[1] for c in selected], [c[2] for c in selected], [c[3] for c in selected])
        hits = result.pop("case_hits")
        boot = [hits[rng.integers(0, len(hits), len(hits))].mean() for _ in range(n_boot)] if len(hits) else [np.nan]
        result["hit_rate_ci95"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
        return result

    report = {"model": model, "layer": layer, "bbox_csv": bbox_csv, "images": len(files), "all": score(cases)}
    report["per_finding"] = {f: score([c for c in cases if c[0] == f]) for f in findings}
    return report


def main(argv=None) -> int:
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m metachex_jax.gradcam",
                                     description="The Grad-CAM pointing game on NIH-format bounding boxes: a hit "
                                                 "when the map's maximum lies inside a box of that finding.")
    parser.add_argument("--model", required=True, help="a pretraining workdir (or any MODEL predict takes)")
    parser.add_argument("--nih_dir", required=True, help="the ChestX-ray14 folder (real or the demo's)")
    parser.add_argument("--bbox_csv", default=None, help="default: NIH_DIR/BBox_List_2017.csv")
    parser.add_argument("--split_list", default="test_list.txt", help="only images of this list ('' = all)")
    parser.add_argument("--layer", default="final")
    parser.add_argument("--out", default=None, help="also write the report here (JSON)")
    args = parser.parse_args(argv)
    try:
        report = pointing_game_run(args.model, args.nih_dir, bbox_csv=args.bbox_csv, layer=args.layer,
                                   split_list=args.split_list or None)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [("all", report["all"])] + list(report["per_finding"].items())
    print(f"pointing game, {report['images']} images, layer {args.layer}:")
    for name, r in rows:
        low, high = r["hit_rate_ci95"]
        print(f"  {name:14s} {r['hits']:4d}/{r['cases']:<4d} hit rate {r['hit_rate']:.3f} [{low:.3f}, {high:.3f}]  "
              f"random point {r['random_point_baseline']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps({"hit_rate": report["all"]["hit_rate"], "random_point": report["all"]["random_point_baseline"],
                      "cases": report["all"]["cases"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
