"""The Grad-CAM pointing game (`python -m metachex_jax.gradcam --model=RUN --boxes=nih|tbx11k|vindr ...`): does a
model's Grad-CAM map peak inside the radiologists' bounding box of the finding? With the hit rate's 95% CI
(bootstrap over cases) against the random-point baseline (the mean share of the image the case's boxes cover).

One case = one image and one boxed finding the model has an output for. Box sources (`BoxSource`), each read from
the raw copy as released:
- `nih`: BBox_List_2017.csv (real or the demo's; 1024 x 1024 pixels of the original images), the images of a
  split list (test_list.txt by default). Findings are NIH's labels, scored by the output of the same name.
- `tbx11k`: TBX11K's JSON boxes (data/raw/tbx11k.py; 512-pixel space, scaled to the file's size), the images of
  the original val set (the build's test split; `split="all"` adds the train set). Findings: `Tuberculosis` (every
  TB box of the image), scored by a TB model's `tb` output (a transfer run's model) or a `Tuberculosis` output;
  `Active TB` and `Latent TB` by outputs of those names. TB images without boxes (tb1199) are out of the game
  (counted).
- `vindr`: VinDr-CXR's boxes (data/raw/vindr.py; the image's own pixels), merged per image and finding as the
  union of the readers' boxes; the test set's consensus boxes (`split="all"` adds the training set's three
  readers'). Findings map onto a model's outputs as the VinDr evaluation scores them (VINDR_OUTPUTS); Nodule/Mass
  uses the map of whichever of Mass and Nodule scores higher on that image.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from metachex_jax.data.raw import tbx11k, vindr
from metachex_jax.evaluation import external_labels
from metachex_jax.serving.gradcam import peak_in_original
from metachex_jax.serving.predictor import Predictor

Box = tuple[float, float, float, float]  # x, y, width, height
SPLITS = ("test", "all")
# A VinDr finding -> its model outputs (several: the one scoring highest on the image), as the VinDr evaluation
# scores them (external_labels.py: the output of the same name in the shared label space, Nodule/Mass by Nodule or
# Mass; docs/data.md's VinDr table).
VINDR_OUTPUTS = {name: [external_labels.output_group("vindr", name)] for name in vindr.LOCAL_LABELS}
TBX11K_OUTPUTS = {"Tuberculosis": [("tb",), ("Tuberculosis",)], "Active TB": [("Active TB",)],
                  "Latent TB": [("Latent TB",)]}


@dataclasses.dataclass
class BoxSource:
    """Boxed images of one dataset, ready for the game."""

    name: str
    files: dict[str, str]  # image -> its file
    boxes: dict[str, dict[str, list[Box]]]  # image -> finding -> boxes in `space`
    space: dict[str, tuple[float, float]]  # image -> (width, height) the boxes are in (absent: the file's pixels)
    outputs: dict[str, list[tuple[str, ...]]]  # finding -> output groups, in order of preference
    described: str
    left_out: dict[str, int] = dataclasses.field(default_factory=dict)  # why images are out of the game -> count


def pointing_game(peaks: Sequence[tuple[float, float]], boxes: Sequence[Sequence[Box]],
                  areas: Sequence[float]) -> dict:
    """Hit rate of map maxima inside boxes, against the random-point baseline.

    peaks[i]: the peak (x, y) of case i's map; boxes[i]: that case's boxes (x, y, w, h) of the finding (one case
    = one image and finding), in the same coordinates; areas[i]: the image area there. Baseline: the expected hit
    rate of a uniformly random point, i.e. the mean share of the image the case's boxes cover.
    """
    hits, shares = [], []
    for (x, y), case_boxes, area in zip(peaks, boxes, areas):
        hits.append(any(bx <= x <= bx + bw and by <= y <= by + bh for bx, by, bw, bh in case_boxes))
        shares.append(min(1.0, _union_area(case_boxes) / area))
    hits = np.asarray(hits, float)
    return {"cases": len(hits), "hits": int(hits.sum()), "hit_rate": float(hits.mean()) if len(hits) else float("nan"),
            "random_point_baseline": float(np.mean(shares)) if shares else float("nan"), "case_hits": hits}


def _union_area(boxes: Sequence[Box]) -> float:
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


def read_bbox_list(path: str) -> dict[str, dict[str, list[Box]]]:
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


def nih_boxes(nih_dir: str, *, bbox_csv: str | None = None, split_list: str | None = "test_list.txt") -> BoxSource:
    """NIH's boxes of the images of `split_list` (None: every boxed image) below an NIH-layout folder."""
    bbox_csv = bbox_csv or os.path.join(nih_dir, "BBox_List_2017.csv")
    boxes = read_bbox_list(bbox_csv)
    if split_list:
        with open(os.path.join(nih_dir, split_list)) as f:
            names = set(f.read().split())
        boxes = {k: v for k, v in boxes.items() if k in names}
    files = {}
    for root, _, found in os.walk(nih_dir):
        files.update({n: os.path.join(root, n) for n in found if n in boxes})
    missing = sorted(set(boxes) - set(files))
    if missing:
        raise FileNotFoundError(f"{len(missing)} boxed images are not under {nih_dir}, e.g. {missing[:5]}")
    findings = {f for per_image in boxes.values() for f in per_image}
    return BoxSource("nih", files, boxes, {}, {f: [(f,)] for f in findings}, f"{bbox_csv} ({split_list or 'all'})")


def tbx11k_boxes(manual_dir: str, *, split: str = "test") -> BoxSource:
    """TBX11K's JSON boxes of the original val set (`test`) or of train and val (`all`) (module docstring)."""
    _check_split(split)
    root, read = tbx11k.read_boxes(manual_dir)
    if read.problems:
        raise ValueError("TBX11K's annotations have problems:\n  " + "\n  ".join(
            f"[{p.kind}] {p.item}: {p.detail}" for p in read.problems))
    chosen = [n for n, s in read.split.items() if split == "all" or s == "val"]
    boxes, left_out = {}, {"TB images without boxes (e.g. tb1199)": 0}
    for name in sorted(chosen):
        if not name.startswith("tb/"):
            continue
        per = read.boxes.get(name, {})
        if not per:
            left_out["TB images without boxes (e.g. tb1199)"] += 1
            continue
        boxes[name] = {"Tuberculosis": [b for found in per.values() for b in found], **per}
    files = {n: str(root / "imgs" / n) for n in boxes}
    missing = sorted(n for n, path in files.items() if not os.path.isfile(path))
    if missing:
        raise FileNotFoundError(f"{len(missing)} boxed TBX11K images are missing, e.g. {missing[:5]}")
    return BoxSource("tbx11k", files, boxes, {n: read.space[n] for n in boxes}, TBX11K_OUTPUTS,
                     f"TBX11K {', '.join(read.sources)} ({'original val set' if split == 'test' else 'train + val'})",
                     left_out)


def vindr_boxes(manual_dir: str, *, split: str = "test") -> BoxSource:
    """VinDr-CXR's boxes, merged per image and finding (module docstring). `test`: PhysioNet's test set; the
    Kaggle layout's test split as its build draws it with the default options (data/raw/vindr.py)."""
    _check_split(split)
    read = vindr.read_boxes(manual_dir)
    if read.problems:
        raise ValueError("VinDr-CXR's box files have problems:\n  " + "\n  ".join(
            f"[{p.kind}] {p.item}: {p.detail}" for p in read.problems))
    layout = vindr.find_layout(manual_dir)
    chosen = set(read.boxes)
    if split == "test":
        if layout.kind == "physionet":
            chosen = {i for i in chosen if read.split[i] == "test"}
        else:
            chosen &= {r.image_id for r in vindr.collect_vindr(manual_dir).records if r.split == "test"}
    missing = sorted(i for i in chosen if i not in read.files)
    if missing:
        raise FileNotFoundError(f"{len(missing)} boxed VinDr images are missing, e.g. {missing[:5]}")
    return BoxSource("vindr", {i: str(read.files[i]) for i in sorted(chosen)}, {i: read.boxes[i] for i in chosen},
                     {}, VINDR_OUTPUTS, f"VinDr-CXR {layout.kind} ({split})")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of {SPLITS}")


def outputs_for(source: BoxSource, output_names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """finding -> the output group scoring it, for the findings this model can be scored on."""
    chosen = {}
    for finding, groups in source.outputs.items():
        group = next((g for g in groups if all(name in output_names for name in g)), None)
        if group is not None:
            chosen[finding] = group
    return chosen


def pointing_game_run(model: str, source: BoxSource, *, layer: str = "final", n_boot: int = 1000,
                      seed: int = 0) -> dict:
    """Grad-CAM pointing game of MODEL on a box source's images (module docstring)."""
    predictor = Predictor.load(model)
    scored = outputs_for(source, predictor.output_names)
    findings = sorted({f for per in source.boxes.values() for f in per} & set(scored))
    if not findings:
        raise ValueError(f"the model has no output for any of the boxed findings "
                         f"({sorted({f for per in source.boxes.values() for f in per})}; through {source.outputs}); "
                         f"its outputs: {sorted(predictor.output_names)}")
    names = sorted({o for f in findings for o in scored[f]})
    cases = []  # (finding, output used, peak in box coordinates, boxes, area there, image)
    ordered = sorted(n for n in source.files if set(source.boxes[n]) & set(findings))
    for start in range(0, len(ordered), predictor.batch_size):
        chunk = ordered[start:start + predictor.batch_size]
        crops, infos = zip(*(predictor.contract.from_file(source.files[n]) for n in chunk))
        crops = np.stack(crops)
        maps = predictor.gradcam(crops, names, layer=layer)
        scores = predictor(crops) if any(len(scored[f]) > 1 for f in findings) else {}
        for i, name in enumerate(chunk):
            width, height = infos[i].width, infos[i].height
            space = source.space.get(name, (width, height))
            for finding, finding_boxes in source.boxes[name].items():
                if finding not in scored:
                    continue
                group = scored[finding]
                output = max(group, key=lambda o: float(np.asarray(scores[o])[i])) if len(group) > 1 else group[0]
                x, y = peak_in_original(maps[output][i], predictor.contract, width, height)
                cases.append((finding, output, (x * space[0] / width, y * space[1] / height), finding_boxes,
                              space[0] * space[1], name))
    rng = np.random.default_rng(seed)

    def score(selected):  # with a 95% CI: bootstrap over cases
        result = pointing_game([c[2] for c in selected], [c[3] for c in selected], [c[4] for c in selected])
        hits = result.pop("case_hits")
        boot = [hits[rng.integers(0, len(hits), len(hits))].mean() for _ in range(n_boot)] if len(hits) else [np.nan]
        result["hit_rate_ci95"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
        return result

    every = pointing_game([c[2] for c in cases], [c[3] for c in cases], [c[4] for c in cases])["case_hits"]
    return {"model": model, "layer": layer, "boxes": source.name, "source": source.described,
            "images": len(ordered), "left_out": source.left_out,
            "outputs": {f: list(scored[f]) for f in findings},
            "not_scored": sorted({f for per in source.boxes.values() for f in per} - set(scored)),
            "all": score(cases), "per_finding": {f: score([c for c in cases if c[0] == f]) for f in findings},
            "cases": [{"image": c[5], "finding": c[0], "output": c[1], "peak": [round(v, 2) for v in c[2]],
                       "hit": bool(hit)} for c, hit in zip(cases, every)]}
