"""The Grad-CAM pointing game (`python -m metachex_jax.gradcam --model=RUN --nih_dir=DIR`): does a model's Grad-CAM
map peak inside the radiologists' bounding box of the finding? On NIH-format boxes (BBox_List_2017.csv, real or the
demo's), with the hit rate's 95% CI (bootstrap over cases) against the random-point baseline.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np

from metachex_jax.serving.gradcam import peak_in_original
from metachex_jax.serving.predictor import Predictor


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


BBOX_LABELS = {"Infiltrate": "Infiltration"}  # BBox_List_2017.csv's spelling -> the label name


def read_bbox_list(path: str) -> dict[str, dict[str, list[tuple[float, float, float, float]]]]:
    """NIH's BBox_List_2017.csv -> {image name: {finding: [(x, y, w, h), ...]}} (pixels of the original image).

    The real file's header is `Image Index,Finding Label,Bbox [x,y,w,h],,,` (the box takes four fields).
    """
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
