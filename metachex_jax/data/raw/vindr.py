"""VinDr-CXR (PhysioNet 1.0.0; Nguyen et al., Sci Data 2022) and the Kaggle VinBigData copy -> labelled records.

Two layouts of one family, told apart by their files (`--manual_dir` is the folder holding them, or its `1.0.0/`):

PhysioNet 1.0.0:
    train/<image_id>.dicom (15,000)   test/<image_id>.dicom (3,000)
    annotations/image_labels_train.csv   image_id, rad_id, then the 28 labels: one row per image and radiologist
    annotations/image_labels_test.csv    image_id, then the 28 labels: the consensus of five, no rad_id
    annotations/annotations_train.csv    image_id, rad_id, class_name, x_min, y_min, x_max, y_max: one per box
    annotations/annotations_test.csv     the same without rad_id
Kaggle "VinBigData Chest X-ray Abnormalities Detection":
    train/<image_id>.dicom   train.csv: image_id, class_name, class_id (0-14; 14 = No finding, empty box), rad_id,
    x_min, y_min, x_max, y_max (one row per box, or per reader's No finding)   test/ (no labels: left out, counted)

Labels (`LABEL_NAMES`): the 22 local labels, then the 6 global ones, as the PhysioNet files order them. The train
file spells `Other diseases`, the test file `Other disease`: one label, `Other diseases`. Values 1 or 0 (1.0/0.0
too); a blank cell is 0 (as VinDr's loaders read it; counted); anything else is a bad row. The Kaggle layout has
only 14 local classes and No finding: its other 13 labels are unknown (-1) for its images.
- Training images were read by three radiologists each (rad_id R1-R17). The label rule combines them
  (`label_rule`): `majority` (the default: a finding is 1 when more than half of the image's readers marked it;
  when No finding wins, every finding is 0, as VinDr's majority vote does) or `any` (a finding is 1 when any
  reader marked it; No finding is 1 only when no finding is). An image read by another number of readers is kept
  and flagged (readers_not_3). Test images carry the consensus of five readers as given.
- Fleiss' kappa of each label across the three readers of the training images (those read by exactly three) is
  in the build report (`details.fleiss_kappa`; undefined where all readers always agree on one value).
- Sex and age from the DICOM header: PatientSex M or F (empty, missing or O: masked, flag unknown_sex),
  PatientAge `055Y` style (missing: flag missing_age; not a DICOM age string: flag unparseable_age, counted by
  value; outside 0-110 years: flag implausible_age). The files carry no ViewPosition (the dataset says every image
  is PA): the view is masked, not assumed.
- Pixels: DICOM through the image reader (MONOCHROME1 inverted, 10 to 16 BitsStored, JPEG 2000 or uncompressed,
  the modality LUT and window first).
Splits: PhysioNet: test = the official test set; the training set is split into train and validation by IMAGE
(no patient ids: each image is its own patient), stratified by No finding, `val_fraction` (0.1) and `seed`.
Kaggle: its test set has no labels, so train.csv's images are split into train / validation / test by image
(`val_fraction`, `test_fraction` 0.2, `seed`).
Bad items (one error naming each, or `--skip_bad`): bad_row, unknown_label_value, duplicate_reader_row (an image
and reader twice), duplicate_image (a test image twice), missing_image, unlisted_image (a DICOM in train/ or
test/ that no label file lists), bad_class (a Kaggle class_id and class_name that do not match), bad_box.

Boxes (`read_boxes`, for the pointing game): every box of the annotations files (train: all readers; test: the
consensus), in the image's pixel space (x = column, y = row), merged per image and finding as the union of the
boxes (a point is inside the finding when it is inside any of them). Rows without coordinates (No finding, the
global labels) carry no box.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from metachex_jax.data.raw import labelled
from metachex_jax.data.raw.common import (Problem, RawCheck, compare_counts, is_plausible_age, parse_age_years,
                                          raise_or_skip, read_table)
from metachex_jax.data.raw.labelled import UNKNOWN, LabelledRaw, LabelledRecord

DATASET = "vindr"
LOCAL_LABELS = ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
                "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
                "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
                "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion")
GLOBAL_LABELS = ("COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding")
LABEL_NAMES = LOCAL_LABELS + GLOBAL_LABELS
NO_FINDING = "No finding"
SPELLINGS = {"Other diseases": ("Other disease",)}  # the test file's spelling
# The Kaggle copy's class ids (train.csv).
KAGGLE_CLASSES = ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
                  "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
                  "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "No finding")
LABEL_RULES = ("majority", "any")
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.2  # the Kaggle layout's test carve-out
EXTENSIONS = (".dicom", ".dcm")
# Published counts (verify).
EXPECTED_COUNTS = {"physionet": {"train_images": 15_000, "train_label_rows": 45_000, "test_images": 3_000},
                   "kaggle": {"train_images": 15_000, "train_csv_rows": 67_914}}
_VALUES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0}
_BOX_COLUMNS = ("class_name", "x_min", "y_min", "x_max", "y_max")
_AGE = re.compile(r"^\d{3}[DWMY]$")  # a DICOM AS value


@dataclasses.dataclass
class Layout:
    kind: str  # "physionet" or "kaggle"
    root: Path


def find_layout(manual_dir: str | os.PathLike) -> Layout:
    manual_dir = Path(manual_dir)
    for candidate in (manual_dir, manual_dir / "1.0.0"):
        if (candidate / "annotations" / "image_labels_train.csv").is_file():
            return Layout("physionet", candidate)
        if (candidate / "train.csv").is_file():
            return Layout("kaggle", candidate)
    raise FileNotFoundError(f"{DATASET}: neither annotations/image_labels_train.csv (PhysioNet VinDr-CXR 1.0.0) nor "
                            f"train.csv (Kaggle VinBigData) in {manual_dir} or {manual_dir / '1.0.0'}")


def name_parts(*, label_rule: str, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    if label_rule not in LABEL_RULES:
        raise ValueError(f"{DATASET}: label_rule={label_rule!r}; choose one of {LABEL_RULES}")
    if not (0 < val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"{DATASET}: val_fraction={val_fraction}, test_fraction={test_fraction}: each in [0, 1), "
                         "leaving a training part")
    parts = [] if label_rule == "majority" else [f"rule-{label_rule}"]
    if (val_fraction, test_fraction, seed) != (DEFAULT_VAL_FRACTION, DEFAULT_TEST_FRACTION, 0):
        parts.append(f"val{val_fraction:g}_test{test_fraction:g}_seed{seed}".replace(".", "p"))
    return parts


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of N subjects each rated by the same number n of raters into k categories: `counts` (N, k),
    counts[i, j] = raters who put subject i in category j. NaN when chance agreement is 1 (one category only)."""
    counts = np.asarray(counts, np.float64)
    n = counts.sum(axis=1)
    if len(counts) == 0 or np.any(n != n[0]) or n[0] < 2:
        raise ValueError("Fleiss' kappa needs at least one subject and the same number (>= 2) of raters for each")
    n = n[0]
    p_j = counts.sum(axis=0) / counts.sum()
    p_i = (np.sum(counts * counts, axis=1) - n) / (n * (n - 1))
    p_bar, p_e = p_i.mean(), np.sum(p_j * p_j)
    return float("nan") if p_e >= 1.0 else float((p_bar - p_e) / (1.0 - p_e))


def combine_readers(readers: list[tuple[int, ...]], rule: str) -> tuple[tuple[int, ...], bool]:
    """One image's labels from its readers' (each a tuple in LABEL_NAMES order, UNKNOWN where the layout has no
    such label), by `rule` (module docstring); and whether No finding zeroed a finding that had a majority."""
    values = np.array(readers, np.int64)
    known = values[0] >= 0
    marked = (values == 1).sum(axis=0)
    nothing = LABEL_NAMES.index(NO_FINDING)
    findings = np.arange(len(LABEL_NAMES)) != nothing
    if rule == "majority":
        out = (2 * marked > len(readers)).astype(np.int64)
        zeroed = bool(out[nothing] and out[findings & known].any())
        if out[nothing]:
            out[findings] = 0
    else:
        out = (marked > 0).astype(np.int64)
        out[nothing] = int(not out[findings & known].any())
        zeroed = False
    return tuple(int(v) if k else UNKNOWN for v, k in zip(out, known)), zeroed


def read_tags(path: str | os.PathLike) -> tuple[str | None, str | None]:
    """(PatientAge, PatientSex) of a DICOM file's header (None when absent), without reading the pixels."""
    import pydicom  # an optional codec, imported on the first DICOM (see imaging/dicom.py)
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["PatientAge", "PatientSex"])
    return (str(ds.PatientAge) if "PatientAge" in ds else None, str(ds.PatientSex) if "PatientSex" in ds else None)


def _images_in(folder: Path) -> dict[str, Path]:
    """image_id -> file of the DICOMs in `folder` (.dicom, as released, or .dcm)."""
    if not folder.is_dir():
        return {}
    return {Path(name).stem: folder / name for name in os.listdir(folder) if Path(name).suffix.lower() in EXTENSIONS}


def _label_columns(header: list[str], path: Path) -> dict[str, str]:
    """label -> the file's column (either spelling of Other disease(s)); ValueError naming missing ones."""
    column = {name: next((c for c in (name, *SPELLINGS.get(name, ())) if c in header), None) for name in LABEL_NAMES}
    missing = [name for name, c in column.items() if c is None]
    if missing:
        raise ValueError(f"{DATASET}: {path} lacks label column(s) {missing}; its header: {header}")
    return column


def _read_label_rows(path: Path, with_reader: bool) -> tuple[dict[str, dict[str, tuple[int, ...]]], Counter,
                                                               list[Problem], int]:
    """image_id -> reader ("" without rad_id) -> labels, blank cells per label, problems, rows."""
    header, rows, problems = read_table(path, ("image_id", *(("rad_id",) if with_reader else ())), DATASET)
    column = _label_columns(header, path)
    out: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    blanks, where_of = Counter(), defaultdict(list)
    for where, cell in rows:
        image, reader = cell["image_id"], cell["rad_id"] if with_reader else ""
        where_of[image, reader].append(where)
        values, bad = [], []
        for name in LABEL_NAMES:
            text = cell[column[name]]
            if not text:
                blanks[name] += 1
            value = _VALUES.get(text, 0 if not text else None)
            if value is None:
                bad.append(f"{column[name]}={text!r}")
            values.append(value)
        if bad:
            problems.append(Problem("unknown_label_value", image, f"{where}: {', '.join(bad)} (1, 0 or blank)"))
            continue
        out[image][reader] = tuple(values)
    for (image, reader), wheres in where_of.items():
        if len(wheres) > 1:
            out[image].pop(reader, None)
            kind = "duplicate_reader_row" if with_reader else "duplicate_image"
            reader_text = f"reader {reader}: " if reader else ""
            problems.append(Problem(kind, image, f"{reader_text}rows {', '.join(wheres)}"))
    return {k: v for k, v in out.items() if v}, blanks, problems, len(rows)


def _read_kaggle_rows(path: Path) -> tuple[dict[str, dict[str, tuple[int, ...]]], list[Problem], int]:
    """train.csv -> image_id -> reader -> labels (the 15 classes; the other labels UNKNOWN), problems, rows."""
    _, rows, problems = read_table(path, ("image_id", "class_name", "class_id", "rad_id"), DATASET)
    marked: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for where, cell in rows:
        class_id = int(cell["class_id"]) if cell["class_id"].isdigit() else -1
        if not 0 <= class_id < len(KAGGLE_CLASSES) or KAGGLE_CLASSES[class_id] != cell["class_name"]:
            problems.append(Problem("bad_class", cell["image_id"], f"{where}: class_id {cell['class_id']!r}, "
                                    f"class_name {cell['class_name']!r} (the 15 Kaggle classes: "
                                    f"{list(enumerate(KAGGLE_CLASSES))})"))
            continue
        marked[cell["image_id"]][cell["rad_id"]].add(cell["class_name"])
    out = {image: {reader: tuple((int(name in names) if name in KAGGLE_CLASSES else UNKNOWN) for name in LABEL_NAMES)
                   for reader, names in readers.items()} for image, readers in marked.items()}
    return out, problems, len(rows)


def collect_vindr(manual_dir: str | os.PathLike, *, label_rule: str = "majority",
                  val_fraction: float = DEFAULT_VAL_FRACTION, test_fraction: float = DEFAULT_TEST_FRACTION,
                  seed: int = 0) -> LabelledRaw:
    """Parse either layout's label files and DICOM headers, collecting every problem and flag (module docstring)."""
    name_parts(label_rule=label_rule, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    layout = find_layout(manual_dir)
    root = layout.root
    files = {split: _images_in(root / split) for split in ("train", "test")}
    if layout.kind == "physionet":
        train, blanks, problems, train_rows = _read_label_rows(root / "annotations" / "image_labels_train.csv", True)
        test, test_blanks, bad, test_rows = _read_label_rows(root / "annotations" / "image_labels_test.csv", False)
        problems += bad
        blanks.update(test_blanks)
        rows = {"train_label_rows": train_rows, "test_label_rows": test_rows}
    else:
        train, problems, train_rows = _read_kaggle_rows(root / "train.csv")
        test, blanks, rows = {}, Counter(), {"train_csv_rows": train_rows}
    labelled_ids = {"train": train, "test": test}
    for split, readers_of in labelled_ids.items():
        problems += [Problem("missing_image", image, f"labelled in the {split} files, {root / split / image}.dicom "
                             "does not exist") for image in sorted(readers_of) if image not in files[split]]
    unlisted = {split: sorted(set(found) - set(labelled_ids[split])) for split, found in files.items()}
    problems += [Problem("unlisted_image", image, f"{files['train'][image]} is in no label file")
                 for image in unlisted["train"]]
    if layout.kind == "physionet":
        problems += [Problem("unlisted_image", image, f"{files['test'][image]} is in no label file")
                     for image in unlisted["test"]]
    bad = {p.item for p in problems}

    flags = {"readers_not_3": [], "no_finding_outvoted_finding": [], "missing_age": [], "unparseable_age": [],
             "implausible_age": [], "unknown_sex": []}
    unparseable, sexes = Counter(), Counter()
    records, kappa_rows = [], []
    for split, readers_of in labelled_ids.items():
        for image in sorted(readers_of):
            if image in bad or image not in files[split]:
                continue
            readers = readers_of[image]
            if split == "train":
                if len(readers) != 3:
                    flags["readers_not_3"].append(image)
                else:
                    kappa_rows.append(np.array(list(readers.values()), np.int64))
                labels, zeroed = combine_readers(list(readers.values()), label_rule)
                if zeroed:
                    flags["no_finding_outvoted_finding"].append(image)
            else:
                labels = readers[""]
            age, sex = _age_and_sex(files[split][image], image, flags, unparseable, sexes)
            records.append(LabelledRecord(image_id=image, path=str(files[split][image]), patient_id=image,
                                          labels=labels, age=float(age) if age is not None else 0.0,
                                          age_valid=is_plausible_age(age), sex_male=sex, view_ap=UNKNOWN, view="",
                                          split=split))
    records = _assign_splits(records, layout.kind, val_fraction, test_fraction, seed)
    kappa = _kappa_per_label(kappa_rows)
    split_counts = Counter(r.split for r in records)
    details = {
        "layout": layout.kind,
        "root": str(root),
        "label_rule": label_rule,
        "rows": rows,
        "readers_per_training_image": dict(Counter(len(r) for r in train.values())),
        "fleiss_kappa": kappa,
        "fleiss_kappa_images": len(kappa_rows),
        "blank_label_cells": dict(blanks),
        "unparseable_ages": dict(unparseable),
        "sexes": dict(sexes),
        "unlabelled_test_images": len(unlisted["test"]) if layout.kind == "kaggle" else 0,
        "split": ({"test": "the official test set (consensus labels)",
                   "train/validation": f"the training set by image, {val_fraction:g} validation, seed {seed}"}
                  if layout.kind == "physionet" else
                  {"train/validation/test": f"train.csv's images by image ({val_fraction:g} validation, "
                                            f"{test_fraction:g} test, seed {seed}): Kaggle's test set has no labels"}),
        "masked": "view (no ViewPosition in the files); sex and age where the header lacks them (flags)",
        "counts": {"images per split": {s: split_counts[s] for s in labelled.SPLITS},
                   "training images by number of readers": dict(Counter(len(r) for r in train.values())),
                   "masked sex / age": f"{sum(r.sex_male == UNKNOWN for r in records)} / "
                                       f"{sum(not r.age_valid for r in records)}",
                   **({"Kaggle test images (no labels, left out)": len(unlisted["test"])}
                      if layout.kind == "kaggle" else {})},
    }
    kept = {r.image_id for r in records}
    flags = {flag: sorted(set(ids) & kept) for flag, ids in flags.items()}
    return LabelledRaw(DATASET, root, LABEL_NAMES, records, sorted(problems), flags, details)


def _age_and_sex(path: Path, image: str, flags: dict, unparseable: Counter, sexes: Counter
                 ) -> tuple[float | None, int]:
    age_text, sex_text = read_tags(path)
    sex = {"M": 1, "F": 0}.get((sex_text or "").strip().upper(), UNKNOWN)
    sexes[(sex_text or "").strip() or "(missing or empty)"] += 1
    if sex == UNKNOWN:
        flags["unknown_sex"].append(image)
    age = None
    if not (age_text or "").strip():
        flags["missing_age"].append(image)
    else:
        age = parse_age_years(age_text) if _AGE.match(age_text.strip()) else None
        if age is None:
            flags["unparseable_age"].append(image)
            unparseable[age_text] += 1
        elif not is_plausible_age(age):
            flags["implausible_age"].append(image)
    return age, sex


def _assign_splits(records: list[LabelledRecord], kind: str, val_fraction: float, test_fraction: float,
                   seed: int) -> list[LabelledRecord]:
    """The module docstring's splits, by image, stratified by No finding."""
    nothing = LABEL_NAMES.index(NO_FINDING)
    pool = {r.image_id: r.labels[nothing] for r in records if r.split == "train"}
    fractions = {"validation": val_fraction} if kind == "physionet" else {"test": test_fraction,
                                                                          "validation": val_fraction}
    carve = labelled.assign_group_split(pool, fractions, seed) if pool else {}
    return sorted((dataclasses.replace(r, split="test" if r.split == "test" else carve[r.image_id]) for r in records),
                  key=lambda r: r.image_id)


def _kappa_per_label(readings: list[np.ndarray]) -> dict[str, float | None]:
    """Fleiss' kappa per label over images read by three readers (None: undefined or no such label)."""
    out = {}
    for j, name in enumerate(LABEL_NAMES):
        marks = np.array([r[:, j] for r in readings if (r[:, j] >= 0).all()], np.int64)
        if not len(marks):
            out[name] = None
            continue
        positive = marks.sum(axis=1)
        value = fleiss_kappa(np.stack([marks.shape[1] - positive, positive], axis=1))
        out[name] = None if math.isnan(value) else round(value, 4)
    return out


@dataclasses.dataclass
class Boxes:
    boxes: dict[str, dict[str, list[tuple[float, float, float, float]]]]  # image_id -> finding -> (x, y, w, h)
    split: dict[str, str]  # image_id -> "train" / "test" (the files it came from)
    files: dict[str, Path]  # image_id -> its DICOM
    problems: list[Problem]


def read_boxes(manual_dir: str | os.PathLike) -> Boxes:
    """Every box of the annotations (module docstring), merged per image and finding."""
    layout = find_layout(manual_dir)
    root = layout.root
    sources = ([("train", root / "annotations" / "annotations_train.csv"),
                ("test", root / "annotations" / "annotations_test.csv")] if layout.kind == "physionet"
               else [("train", root / "train.csv")])
    out = Boxes({}, {}, {}, [])
    for split, path in sources:
        files = _images_in(root / split)
        _, rows, problems = read_table(path, ("image_id", *_BOX_COLUMNS), DATASET)
        out.problems += problems
        for where, cell in rows:
            coordinates = [cell[k] for k in ("x_min", "y_min", "x_max", "y_max")]
            if not any(coordinates):
                continue  # No finding, or a label without a box
            try:
                x0, y0, x1, y1 = (float(v) for v in coordinates)
            except ValueError:
                x0 = y0 = x1 = y1 = float("nan")
            if not (x1 >= x0 and y1 >= y0) or cell["class_name"] not in LOCAL_LABELS:
                out.problems.append(Problem("bad_box", cell["image_id"], f"{where}: {cell['class_name']!r} "
                                            f"{coordinates} (a local label, x_min <= x_max, y_min <= y_max)"))
                continue
            image = cell["image_id"]
            out.boxes.setdefault(image, {}).setdefault(cell["class_name"], []).append((x0, y0, x1 - x0, y1 - y0))
            out.split[image] = split
            if image in files:
                out.files[image] = files[image]
    return out


def load_vindr(manual_dir: str | os.PathLike, *, skip_bad: bool = False, **options) -> LabelledRaw:
    raw = collect_vindr(manual_dir, **options)
    raise_or_skip(DATASET, raw.problems, skip_bad)
    return raw


def verify(manual_dir: str | os.PathLike, *, strict_counts: bool = False, **options) -> RawCheck:
    """The registry's verify hook: bad items, counts against the published ones, splits, labels, kappa, flags."""
    raw = collect_vindr(manual_dir, **options)
    d = raw.details
    found = {"train_images": sum(r.split != "test" for r in raw.records) if d["layout"] == "physionet"
             else len(raw.records)}
    if d["layout"] == "physionet":
        found |= {"train_label_rows": d["rows"]["train_label_rows"], "test_images": raw.details["counts"][
            "images per split"]["test"]}
    else:
        found["train_csv_rows"] = d["rows"]["train_csv_rows"]
    count_notes, count_problems = compare_counts(found, EXPECTED_COUNTS[d["layout"]], strict_counts)
    count_notes.append(f"layout: {d['layout']}; Fleiss' kappa per label (three readers, "
                       f"{d['fleiss_kappa_images']} images): " + ", ".join(
                           f"{k} {v:.3f}" for k, v in d["fleiss_kappa"].items() if v is not None))
    notes, split_problems = labelled.split_notes_and_problems(raw)
    return RawCheck(root=raw.root, problems=raw.problems + count_problems + split_problems,
                    notes=count_notes + notes, image_paths={r.image_id: r.path for r in raw.records})
