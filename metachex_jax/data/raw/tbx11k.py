"""TBX11K (Liu et al., CVPR 2020): the official zip's folders, lists and box annotations -> labelled records.

Layout (`--manual_dir` is `TBX11K/` or its parent; paths in lists and JSON are relative to `imgs/`, with or without
an `imgs/` prefix):

    imgs/health/hNNNN.png  imgs/sick/sNNNN.png  imgs/tb/tbNNNN.png   (512 x 512 8-bit RGB, gray in all channels)
    imgs/test/unknown_N.png                                           the challenge's test set: labels withheld
    imgs/extra/da+db/{train,val}/  imgs/extra/mc+shenzhen/{train,val}/ copies of other TB sets
    lists/TBX11K_train.txt  lists/TBX11K_val.txt                      one path per line (which images are train/val)
    annotations/json/TBX11K_train.json  TBX11K_val.json (or TBX11K_trainval.json)   COCO boxes, 512-pixel space
    annotations/xml/tbNNNN.xml                                        the same boxes at the original resolution

Membership of the original train and val sets: the two lists (names matched exactly: `TBX11K_trainval.txt` is
not `TBX11K_train.txt`), or without them the JSON files' `images`; when both exist they must agree (an image in
one and not the other is an annotation_mismatch problem).

Labels (`LABEL_NAMES`), by FOLDER first:
- `Tuberculosis`: 1 for every image in `tb/` (active or latent TB: the TB of Shenzhen's and Montgomery's labels
  includes old TB, so protocols across the three share this target), 0 for `health/` and `sick/`.
- `Active TB`: 1 for an image with an ActiveTuberculosis box (the images with both active and latent boxes
  included), 0 for a `tb/` image whose boxes are all latent and for `health/`, `sick/`; unknown (-1) for a `tb/`
  image without any box (tb1199: flag tb_without_boxes; it is also out of the pointing game).
- `Latent TB`: the same with ObsoletePulmonaryTuberculosis boxes. A PulmonaryTuberculosis (uncertain) box, which
  only the withheld test set has, leaves the label it could be unknown (flag uncertain_tb_box).
- `No Finding`: 1 for `health/`, 0 otherwise (sick images have other findings).
Age, sex and view are not in TBX11K: masked for every image.

Excluded and counted (`details.counts`): the withheld test images (`imgs/test/`); the extra folders, which copy
Shenzhen, Montgomery and the Indian DA/DB sets and would leak into any protocol that also uses Shenzhen or
Montgomery (`extra_folders="include"` keeps them: labels from the file names as the official code reads them,
CHNCXR_/MCUCXR_ ending in _1 and DA/DB names starting with p are TB; their `train/` to the training pool,
`val/` to test; Active/Latent/No Finding unknown); and every val image byte-identical to a train image (38 sick
images in the release): the val copy is dropped and listed (`details.val_copies_of_train_images`).

Boxes: the JSON's, in its images' `width` x `height` (512) space; they are what the pointing game uses. The XML
boxes (original resolution, `<size>` in the file) are rescaled into that space and compared corner by corner
with the JSON's of the same image and category: a difference above `box_tolerance` (default 2 pixels of 512
space) or a different number of boxes is a disagreement, listed in the build report (`details.xml_json_
disagreements`); the JSON is kept. A box on a health or sick image is a problem (box_on_non_tb_image).

Splits: the test labels are withheld, so, as Idiap's mednet does, the original val set is the TEST split, and
the original train set is split into train and validation, stratified by class (healthy, sick, active, latent
only, TB without boxes) and seeded (`val_fraction`, default 0.2; `seed`). TBX11K has no patient ids: each image
is its own patient, so one patient's images could fall on both sides (not checkable).
Bad items (one error naming each, or `--skip_bad`): missing_image, unlisted_image (a file in health/, sick/ or
tb/ in neither list), annotation_mismatch, box_on_non_tb_image, bad_box (not four numbers, or a box category
that is none of the three).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

from metachex_jax.data.raw import labelled
from metachex_jax.data.raw.common import Problem, RawCheck, compare_counts, not_dataset_file, raise_or_skip
from metachex_jax.data.raw.labelled import UNKNOWN, LabelledRaw, LabelledRecord

DATASET = "tbx11k"
LABEL_NAMES = ("Tuberculosis", "Active TB", "Latent TB", "No Finding")
CATEGORIES = {"ActiveTuberculosis": "Active TB", "ObsoletePulmonaryTuberculosis": "Latent TB",
              "PulmonaryTuberculosis": "Uncertain TB"}
CLASS_FOLDERS = ("health", "sick", "tb")
EXTRA_FOLDER = "extra"
WITHHELD_FOLDER = "test"
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_BOX_TOLERANCE = 2.0  # pixels of 512 space
EXTRA_CHOICES = ("exclude", "include")
# The release's counts (verify): the official train/val split, the folders, the boxes, the duplicated sick images.
EXPECTED_COUNTS = {"train_images": 6_600, "val_images": 1_800, "health_images": 3_800, "sick_images": 3_800,
                   "tb_images": 800, "train_boxes": 902, "val_boxes": 309}
PUBLISHED_VAL_COPIES = 38
_STRATA = {"health": 0, "sick": 1, "active": 2, "latent": 3, "tb_without_boxes": 4, "extra_negative": 5,
           "extra_tb": 6}


@dataclasses.dataclass
class Boxes:
    """The JSON boxes of the original train and val images (what the pointing game and the labels use)."""

    boxes: dict[str, dict[str, list[tuple[float, float, float, float]]]]  # image -> category label -> (x, y, w, h)
    space: dict[str, tuple[int, int]]  # image -> (width, height) the JSON gives it: the boxes' space
    split: dict[str, str]  # image -> "train" / "val" (the original sets)
    problems: list[Problem]
    sources: list[str]  # the files read


def find_root(manual_dir: str | os.PathLike) -> Path:
    manual_dir = Path(manual_dir)
    for candidate in (manual_dir, manual_dir / "TBX11K"):
        if (candidate / "imgs").is_dir():
            return candidate
    raise FileNotFoundError(f"{DATASET}: no imgs/ folder in {manual_dir} or {manual_dir / 'TBX11K'}; point "
                            "--manual_dir at the unpacked TBX11K folder (holding imgs/, annotations/, lists/)")


def _relative(name: str) -> str:
    name = name.strip().replace("\\", "/")
    return name[len("imgs/"):] if name.startswith("imgs/") else name


def name_parts(*, val_fraction: float, seed: int, extra_folders: str, box_tolerance: float) -> list[str]:
    """Config-name parts of the options that differ from the defaults."""
    if extra_folders not in EXTRA_CHOICES:
        raise ValueError(f"{DATASET}: extra_folders={extra_folders!r}; choose one of {EXTRA_CHOICES}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"{DATASET}: val_fraction={val_fraction} must be in (0, 1)")
    parts = []
    if (val_fraction, seed) != (DEFAULT_VAL_FRACTION, 0):
        parts.append(f"val{val_fraction:g}_seed{seed}".replace(".", "p"))
    if extra_folders == "include":
        parts.append("extra")
    if box_tolerance != DEFAULT_BOX_TOLERANCE:
        parts.append(f"tol{box_tolerance:g}".replace(".", "p"))
    return parts


def read_boxes(manual_dir: str | os.PathLike) -> tuple[Path, Boxes]:
    """(root, the JSON boxes and original split of every train and val image) (module docstring)."""
    root = find_root(manual_dir)
    folder = root / "annotations" / "json"
    pairs = [folder / "TBX11K_train.json", folder / "TBX11K_val.json"]
    if all(p.is_file() for p in pairs):
        sources = [(p, split) for p, split in zip(pairs, ("train", "val"))]
    elif (folder / "TBX11K_trainval.json").is_file():
        sources = [(folder / "TBX11K_trainval.json", None)]
    else:
        raise FileNotFoundError(f"{DATASET}: neither TBX11K_train.json and TBX11K_val.json nor TBX11K_trainval.json "
                                f"in {folder}")
    result = Boxes({}, {}, {}, [], [str(p) for p, _ in sources])
    for path, split in sources:
        data = json.loads(path.read_text())
        categories = {c["id"]: c["name"] for c in data.get("categories", [])}
        by_id = {}
        for image in data["images"]:
            name = _relative(image["file_name"])
            by_id[image["id"]] = name
            result.space[name] = (int(image["width"]), int(image["height"]))
            result.boxes.setdefault(name, {})
            if split:
                result.split[name] = split
        for annotation in data.get("annotations", []):
            name = by_id.get(annotation.get("image_id"))
            category = CATEGORIES.get(categories.get(annotation.get("category_id"), ""))
            box = annotation.get("bbox")
            if name is None or category is None or not (isinstance(box, list) and len(box) == 4
                                                         and all(isinstance(v, (int, float)) for v in box)):
                result.problems.append(Problem("bad_box", name or f"{path.name} annotation {annotation.get('id')}",
                                               f"{path.name}: annotation {annotation.get('id')}: category "
                                               f"{annotation.get('category_id')!r}, bbox {box!r}"))
                continue
            result.boxes[name].setdefault(category, []).append(tuple(float(v) for v in box))
    return root, result


def read_lists(root: Path) -> dict[str, list[str]] | None:
    """{"train": [...], "val": [...]} from lists/TBX11K_train.txt and TBX11K_val.txt, or None without them."""
    paths = {split: root / "lists" / f"TBX11K_{split}.txt" for split in ("train", "val")}
    if not all(p.is_file() for p in paths.values()):
        return None
    return {split: [_relative(line) for line in p.read_text().splitlines() if line.strip()]
            for split, p in paths.items()}


def read_xml(path: Path) -> tuple[tuple[int, int], list[tuple[str, tuple[float, float, float, float]]]]:
    """An annotations/xml file -> ((width, height), [(category label, (xmin, ymin, xmax, ymax))]) at the
    original resolution."""
    tree = ElementTree.parse(path).getroot()
    size = (int(tree.findtext("size/width")), int(tree.findtext("size/height")))
    objects = []
    for item in tree.iter("object"):
        box = item.find("bndbox")
        objects.append((CATEGORIES.get(item.findtext("name", "").strip(), item.findtext("name", "")),
                        tuple(float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))))
    return size, objects


def compare_xml(name: str, json_boxes: dict, space: tuple[int, int], xml_path: Path, tolerance: float) -> list[dict]:
    """The disagreements between an image's JSON boxes and its XML boxes rescaled into the JSON's space, each
    difference measured in pixels of 512 space (module docstring)."""
    (width, height), objects = read_xml(xml_path)
    to_512 = (512 / space[0], 512 / space[1])
    out = []
    for category in sorted({c for c, _ in objects} | set(json_boxes)):
        xml_corners = [(x0 * 512 / width, y0 * 512 / height, x1 * 512 / width, y1 * 512 / height)
                       for c, (x0, y0, x1, y1) in objects if c == category]
        json_corners = [(x * to_512[0], y * to_512[1], (x + w) * to_512[0], (y + h) * to_512[1])
                        for x, y, w, h in json_boxes.get(category, [])]
        if len(xml_corners) != len(json_corners):
            out.append({"image": name, "category": category, "json_boxes": len(json_corners),
                        "xml_boxes": len(xml_corners), "why": "a different number of boxes"})
            continue
        unmatched = list(json_corners)
        for corners in sorted(xml_corners):
            best = min(unmatched, key=lambda j: max(abs(a - b) for a, b in zip(corners, j)))
            unmatched.remove(best)
            difference = max(abs(a - b) for a, b in zip(corners, best))
            if difference > tolerance:
                out.append({"image": name, "category": category, "json_512": [round(v, 1) for v in best],
                            "xml_512": [round(v, 1) for v in corners], "difference_512px": round(difference, 2),
                            "why": f"corners differ by more than {tolerance:g} px of 512 space"})
    return out


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _extra_is_tb(name: str) -> bool:
    """The official code's rule for the extra folders: Shenzhen/Montgomery names end in _1 for TB, DA/DB positives
    start with p."""
    stem, base = Path(name).stem, Path(name).name
    if base.startswith(("CHNCXR", "MCUCXR")):
        return stem.endswith("_1")
    return base.startswith("p")


def collect_tbx11k(manual_dir: str | os.PathLike, *, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0,
                   extra_folders: str = "exclude", box_tolerance: float = DEFAULT_BOX_TOLERANCE) -> LabelledRaw:
    """Parse the lists, the annotations and the image folders, collecting every problem (module docstring)."""
    name_parts(val_fraction=val_fraction, seed=seed, extra_folders=extra_folders, box_tolerance=box_tolerance)
    root, boxes = read_boxes(manual_dir)
    images = root / "imgs"
    problems = list(boxes.problems)
    on_disk, excluded, ignored = set(), Counter(), Counter()
    extra_files = []
    for folder, _, names in os.walk(images):
        for name in names:
            relative = os.path.relpath(os.path.join(folder, name), images).replace(os.sep, "/")
            top = relative.split("/")[0]
            if not_dataset_file(relative):
                ignored[not_dataset_file(relative)] += 1
            elif top in CLASS_FOLDERS:
                on_disk.add(relative)
            elif top == EXTRA_FOLDER:
                excluded["extra: " + relative.split("/")[1]] += 1
                extra_files.append(relative)
            else:
                excluded["withheld test (imgs/test/)" if top == WITHHELD_FOLDER else f"other: {top}/"] += 1
    lists = read_lists(root)
    if lists is None and not boxes.split:
        raise FileNotFoundError(f"{DATASET}: no lists/TBX11K_train.txt and TBX11K_val.txt, and only "
                                "TBX11K_trainval.json: nothing says which images are train and which val")
    membership = ({name: split for split, names in lists.items() for name in names} if lists is not None
                  else dict(boxes.split))
    if lists is not None and boxes.split:
        for name in sorted(set(membership) ^ set(boxes.split)):
            problems.append(Problem("annotation_mismatch", name, "in the lists but not in the JSON files"
                                    if name in membership else "in the JSON files but not in the lists"))
        problems += [Problem("annotation_mismatch", n, f"lists: {membership[n]}, JSON: {boxes.split[n]}")
                     for n in sorted(set(membership) & set(boxes.split)) if membership[n] != boxes.split[n]]
    problems += [Problem("missing_image", n, f"listed in {membership[n]}, {images / n} does not exist")
                 for n in sorted(membership) if n not in on_disk]
    problems += [Problem("unlisted_image", n, f"{images / n} is in neither the train nor the val list")
                 for n in sorted(on_disk - set(membership) - set(boxes.split))]  # (else an annotation_mismatch)
    bad = {p.item for p in problems}

    flags = {"tb_without_boxes": [], "uncertain_tb_box": []}
    records, strata, disagreements, no_xml = [], {}, [], []
    for name in sorted(membership):
        if name in bad or name not in on_disk:
            continue
        folder = name.split("/")[0]
        found = boxes.boxes.get(name, {})
        if found and folder != "tb":
            problems.append(Problem("box_on_non_tb_image", name, f"{sum(map(len, found.values()))} box(es) on a "
                                    f"{folder}/ image"))
            continue
        if folder == "tb":
            labels, stratum = _tb_labels(name, found, flags)
            xml_path = root / "annotations" / "xml" / f"{Path(name).stem}.xml"
            if xml_path.is_file():
                disagreements += compare_xml(name, found, boxes.space.get(name, (512, 512)), xml_path, box_tolerance)
            elif found:
                no_xml.append(name)
        else:
            labels, stratum = (0, 0, 0, int(folder == "health")), folder
        records.append(LabelledRecord(image_id=name, path=str(images / name), patient_id=name, labels=labels,
                                      age=0.0, age_valid=False, sex_male=UNKNOWN, view_ap=UNKNOWN, view="",
                                      split=membership[name]))
        strata[name] = _STRATA[stratum]
    if extra_folders == "include":
        for name in sorted(extra_files):
            tb = _extra_is_tb(name)
            split = "val" if "/val/" in name else "train"
            records.append(LabelledRecord(image_id=name, path=str(images / name), patient_id=name,
                                          labels=(int(tb), UNKNOWN, UNKNOWN, UNKNOWN), age=0.0, age_valid=False,
                                          sex_male=UNKNOWN, view_ap=UNKNOWN, view="", split=split))
            strata[name] = _STRATA["extra_tb" if tb else "extra_negative"]
    # The val copies of train images: dropped (the train image is kept).
    train_hashes = {_hash(Path(r.path)): r.image_id for r in records if r.split == "train"}
    copies = {r.image_id: train_hashes[h] for r in records if r.split == "val"
              for h in [_hash(Path(r.path))] if h in train_hashes}
    records = [r for r in records if r.image_id not in copies]
    carve = labelled.assign_group_split({r.image_id: strata[r.image_id] for r in records if r.split == "train"},
                                        {"validation": val_fraction}, seed)
    records = sorted((dataclasses.replace(r, split="test" if r.split == "val" else carve[r.image_id])
                      for r in records), key=lambda r: r.image_id)
    kept = {r.image_id for r in records}
    flags = {flag: sorted(set(ids) & kept) for flag, ids in flags.items()}
    split_counts = Counter(r.split for r in records)
    box_counts = Counter(membership.get(n) for n, per in boxes.boxes.items() for b in per.values() for _ in b)
    details = {
        "root": str(root),
        "annotations": boxes.sources,
        "membership_from": "lists/TBX11K_{train,val}.txt" if lists is not None else "the JSON files",
        "original_sets": dict(Counter(membership.values())),
        "folders": dict(Counter(n.split("/")[0] for n in on_disk)),
        "boxes": {split: box_counts[split] for split in ("train", "val")},
        "val_copies_of_train_images": copies,
        "box_tolerance_512px": box_tolerance,
        "xml_json_disagreements": disagreements,
        "tb_images_without_xml": no_xml,
        "excluded": dict(excluded),
        "ignored_files": dict(ignored),
        "extra_folders": extra_folders,
        "split": {"test": "the original val set (test labels are withheld)",
                  "train/validation": f"the original train set, stratified by class, {val_fraction:g} validation, "
                                      f"seed {seed}", "patients": "none in TBX11K: each image is its own patient"},
        "masked": "age, sex and view (not in TBX11K) for every image",
        "counts": {"images per split": {s: split_counts[s] for s in labelled.SPLITS},
                   "original train / val images": dict(Counter(membership.values())),
                   "val copies of train images dropped": len(copies),
                   "excluded (withheld test, extra folders)": dict(excluded),
                   "XML/JSON box disagreements": len(disagreements)},
    }
    return LabelledRaw(DATASET, root, LABEL_NAMES, records, sorted(problems), flags, details)


def _tb_labels(name: str, found: dict, flags: dict) -> tuple[tuple[int, ...], str]:
    """(labels, stratum) of a tb/ image from its boxes (module docstring)."""
    if not found:
        flags["tb_without_boxes"].append(name)
        return (1, UNKNOWN, UNKNOWN, 0), "tb_without_boxes"
    uncertain = "Uncertain TB" in found
    if uncertain:
        flags["uncertain_tb_box"].append(name)
    active = 1 if "Active TB" in found else UNKNOWN if uncertain else 0
    latent = 1 if "Latent TB" in found else UNKNOWN if uncertain else 0
    return (1, active, latent, 0), "active" if active == 1 else "latent"


def load_tbx11k(manual_dir: str | os.PathLike, *, skip_bad: bool = False, **options) -> LabelledRaw:
    raw = collect_tbx11k(manual_dir, **options)
    raise_or_skip(DATASET, raw.problems, skip_bad)
    return raw


def verify(manual_dir: str | os.PathLike, *, strict_counts: bool = False, **options) -> RawCheck:
    """The registry's verify hook: bad items, counts against the release's, splits, labels, box disagreements."""
    raw = collect_tbx11k(manual_dir, **options)
    d = raw.details
    found = {"train_images": d["original_sets"].get("train", 0), "val_images": d["original_sets"].get("val", 0),
             **{f"{f}_images": d["folders"].get(f, 0) for f in CLASS_FOLDERS},
             "train_boxes": d["boxes"]["train"], "val_boxes": d["boxes"]["val"]}
    count_notes, count_problems = compare_counts(found, EXPECTED_COUNTS, strict_counts)
    count_notes.append(f"val copies of train images dropped: {len(d['val_copies_of_train_images'])} (the release "
                       f"has {PUBLISHED_VAL_COPIES})")
    count_notes.append(f"XML/JSON box disagreements above {d['box_tolerance_512px']:g} px (512 space): "
                       f"{len(d['xml_json_disagreements'])}")
    notes, split_problems = labelled.split_notes_and_problems(raw)
    return RawCheck(root=raw.root, problems=raw.problems + count_problems + split_problems,
                    notes=count_notes + notes, image_paths={r.image_id: r.path for r in raw.records})
