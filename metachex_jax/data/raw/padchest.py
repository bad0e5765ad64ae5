"""PadChest (Bustos et al., Medical Image Analysis 2020): the label CSV -> labelled records in NIH's label names.

Layout: `PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv` (or the `.csv.gz` it is distributed as) and the
image folders named by its `ImageDir` column (`0/`, `1/`, ..., 52 of them), all under `--manual_dir`; the image
of a row is `<manual_dir>/<ImageDir>/<ImageID>`: 16-bit PNGs whose real depth is the row's `BitsStored_DICOM`
(12 or 10), which the image reader uses (images.choose_bit_depth: the dataset's metadata comes before the data).

Columns used (found by name; the others are ignored): ImageID, ImageDir, StudyDate_DICOM, PatientID,
PatientBirth, PatientSex_DICOM, Projection, Labels, BitsStored_DICOM, PhotometricInterpretation_DICOM.
- Labels: a Python list literal of lower-case finding names (`['normal']`, `['pleural effusion',
  'cardiomegaly']`), read with ast.literal_eval (never eval). Names are stripped; empty strings inside a list are
  ignored (counted). A cell that is not a list literal of strings is a bad row (bad_labels). Findings are mapped
  onto NIH's 14 (and three extras) with FINDING_TO_LABEL; a label is 1 when any of its findings is listed, else
  0. Findings outside the table are ignored and counted by name in the build report (`details.unmapped_findings`).
- Age = the study's year (first 4 digits of StudyDate_DICOM) minus PatientBirth (a float year). A blank
  PatientBirth is unknown (masked; flag missing_birth); an implausible age is masked (flag implausible_age);
  a StudyDate or PatientBirth that is not a number is a bad row (bad_age).
- PatientSex_DICOM: M / F; O or blank is unknown (masked; flag unknown_sex); anything else is a bad row.
- Projection: PA (view_ap 0), AP and AP_horizontal (view_ap 1) are frontal; L, COSTAL, EXCLUDE, UNK and anything
  else are not. `views="frontal"` (the default) keeps frontal images only (the others are counted in the report);
  `views="all"` keeps every image, non-frontal ones with view_ap unknown.
- BitsStored_DICOM: the image's bit depth (blank: the reader decides from the data; flag unknown_bits_stored).
  PhotometricInterpretation_DICOM is MONOCHROME2 throughout PadChest; MONOCHROME1 rows are flagged (the PNGs are
  kept as stored, not inverted).
Bad rows (one error naming each, or `--skip_bad`): bad_row, bad_labels, bad_age, bad_sex, missing_image,
duplicate_image_id, missing_patient_id.

Split: none is published. train / validation / test are carved by PATIENT (80/10/10 by default: `val_fraction`,
`test_fraction`, `seed`; labelled.assign_group_split), recorded in the skip report.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.data.raw import labelled
from metachex_jax.data.raw.common import (Problem, RawCheck, compare_counts, is_plausible_age, open_text,
                                          raise_or_skip)
from metachex_jax.data.raw.labelled import UNKNOWN, LabelledRaw, LabelledRecord

DATASET = "padchest"
CSV_NAMES = ("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",
             "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz")
FRONTAL = {"PA": 0, "AP": 1, "AP_horizontal": 1}
VIEWS = ("frontal", "all")
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.1
EXPECTED_COUNTS = {"images": 160_861, "patients": 67_625}  # the published counts of the label CSV

# PadChest finding -> label. NIH's 14 first (spelled as NIH spells them), then the extras PadChest adds: normal as
# "No Finding" (CheXpert's name, so the two share it in a mixture) and tuberculosis, a transfer target. Choices
# follow torchxrayvision's PadChest mapping where it exists (e.g. the interstitial and alveolar patterns as
# Infiltration, air bronchogram as Consolidation), with exact names instead of substring matches (a substring
# match would read "subcutaneous emphysema" as Emphysema).
LABEL_FINDINGS = {
    "Atelectasis": ("atelectasis", "laminar atelectasis", "lobar atelectasis", "segmental atelectasis",
                    "round atelectasis", "total atelectasis", "atelectasis basal"),
    "Cardiomegaly": ("cardiomegaly",),
    "Effusion": ("pleural effusion", "loculated pleural effusion", "loculated fissural effusion",
                 "hydropneumothorax"),
    "Infiltration": ("infiltrates", "interstitial pattern", "reticular interstitial pattern",
                     "reticulonodular interstitial pattern", "ground glass pattern", "alveolar pattern"),
    "Mass": ("mass", "pulmonary mass"),
    "Nodule": ("nodule", "multiple nodules"),
    "Pneumonia": ("pneumonia", "atypical pneumonia"),
    "Pneumothorax": ("pneumothorax", "hydropneumothorax"),
    "Consolidation": ("consolidation", "air bronchogram"),
    "Edema": ("pulmonary edema",),
    "Emphysema": ("emphysema",),
    "Fibrosis": ("pulmonary fibrosis",),
    "Pleural_Thickening": ("pleural thickening", "apical pleural thickening", "calcified pleural thickening"),
    "Hernia": ("hiatal hernia",),
    "No Finding": ("normal",),
    "Tuberculosis": ("tuberculosis",),
    "Tuberculosis sequelae": ("tuberculosis sequelae",),
}
LABEL_NAMES = tuple(LABEL_FINDINGS)
assert LABEL_NAMES[:len(PATHOLOGIES)] == PATHOLOGIES
FINDING_TO_LABEL: dict[str, list[str]] = defaultdict(list)
for _label, _findings in LABEL_FINDINGS.items():
    for _finding in _findings:
        FINDING_TO_LABEL[_finding].append(_label)

_COLUMNS = ("ImageID", "ImageDir", "StudyDate_DICOM", "PatientID", "PatientBirth", "PatientSex_DICOM", "Projection",
            "Labels", "BitsStored_DICOM", "PhotometricInterpretation_DICOM")


def find_csv(manual_dir: str | os.PathLike) -> Path:
    manual_dir = Path(manual_dir)
    for name in CSV_NAMES:
        if (manual_dir / name).is_file():
            return manual_dir / name
    raise FileNotFoundError(f"{DATASET}: neither {' nor '.join(CSV_NAMES)} in {manual_dir}; point --manual_dir at "
                            "the folder holding the CSV and the image folders")


def parse_labels(text: str) -> tuple[list[str] | None, int]:
    """A Labels cell -> (finding names, empty strings ignored), or (None, 0) when it is not a list literal of
    strings."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None, 0
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        return None, 0
    names = [v.strip() for v in value]
    return [n for n in names if n], sum(1 for n in names if not n)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value else None  # NaN


def collect_padchest(manual_dir: str | os.PathLike, *, views: str = "frontal",
                     val_fraction: float = DEFAULT_VAL_FRACTION, test_fraction: float = DEFAULT_TEST_FRACTION,
                     seed: int = 0) -> LabelledRaw:
    """Parse the CSV, collecting every problem and flag (module docstring)."""
    if views not in VIEWS:
        raise ValueError(f"{DATASET}: views={views!r}; choose one of {VIEWS}")
    root = Path(manual_dir)
    path = find_csv(root)
    csv.field_size_limit(sys.maxsize)  # the Report column holds whole reports
    problems: list[Problem] = []
    flags = {"missing_birth": [], "implausible_age": [], "unknown_sex": [], "unknown_bits_stored": [],
             "monochrome1": []}
    unmapped, projections, excluded = Counter(), Counter(), Counter()
    empty_strings, rows_total = 0, 0
    records: dict[str, LabelledRecord] = {}
    lines_of: dict[str, list[int]] = defaultdict(list)
    patients = set()
    files_in: dict[str, set[str]] = {}
    with open_text(path) as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        missing = [c for c in _COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{DATASET}: {path.name} lacks column(s) {missing}; its header: {header}")
        index = {name: header.index(name) for name in _COLUMNS}
        for line, row in enumerate(reader, start=2):
            if not any(c.strip() for c in row):
                continue
            rows_total += 1
            where = f"{path.name}:{line}"
            if len(row) != len(header):
                problems.append(Problem("bad_row", where, f"{len(row)} fields, the header has {len(header)}"))
                continue
            cell = {name: row[i].strip() for name, i in index.items()}
            image_id = cell["ImageID"]
            lines_of[image_id].append(line)
            row_problems = []
            findings, empties = parse_labels(cell["Labels"])
            if findings is None:
                row_problems.append(Problem("bad_labels", image_id, f"{where}: Labels {cell['Labels']!r} is not a "
                                            "Python list literal of strings"))
            study, birth = _number(cell["StudyDate_DICOM"][:4]), _number(cell["PatientBirth"] or "nan")
            if study is None or (cell["PatientBirth"] and birth is None):
                row_problems.append(Problem("bad_age", image_id, f"{where}: StudyDate_DICOM "
                                            f"{cell['StudyDate_DICOM']!r} / PatientBirth {cell['PatientBirth']!r} "
                                            "are not numbers"))
            sex = {"M": 1, "F": 0, "O": UNKNOWN, "": UNKNOWN}.get(cell["PatientSex_DICOM"])
            if sex is None:
                row_problems.append(Problem("bad_sex", image_id, f"{where}: PatientSex_DICOM "
                                            f"{cell['PatientSex_DICOM']!r} (M, F, O or blank)"))
            if not cell["PatientID"]:
                row_problems.append(Problem("missing_patient_id", image_id, f"{where}: blank PatientID"))
            folder = cell["ImageDir"]
            if folder not in files_in:
                directory = root / folder
                files_in[folder] = set(os.listdir(directory)) if folder and directory.is_dir() else set()
            if image_id not in files_in[folder]:
                row_problems.append(Problem("missing_image", image_id, f"{where}: {root / folder / image_id} "
                                            "does not exist"))
            if row_problems:
                problems += row_problems
                continue
            patients.add(cell["PatientID"])
            projection = cell["Projection"]
            projections[projection] += 1
            if projection not in FRONTAL and views == "frontal":
                excluded[projection or "(blank)"] += 1
                continue
            empty_strings += empties
            present = set()
            for finding in findings:
                if finding in FINDING_TO_LABEL:
                    present.update(FINDING_TO_LABEL[finding])
                else:
                    unmapped[finding] += 1
            age = study - birth if birth is not None else None
            if age is None:
                flags["missing_birth"].append(image_id)
            elif not is_plausible_age(age):
                flags["implausible_age"].append(image_id)
            if sex == UNKNOWN:
                flags["unknown_sex"].append(image_id)
            bits = _number(cell["BitsStored_DICOM"])
            if bits is None or bits != int(bits) or not 1 <= bits <= 16:
                flags["unknown_bits_stored"].append(image_id)
                bits = None
            if cell["PhotometricInterpretation_DICOM"] == "MONOCHROME1":
                flags["monochrome1"].append(image_id)
            records[image_id] = LabelledRecord(
                image_id=image_id, path=str(root / folder / image_id), patient_id=cell["PatientID"],
                labels=tuple(int(name in present) for name in LABEL_NAMES),
                age=float(age) if age is not None else 0.0, age_valid=is_plausible_age(age),
                sex_male=sex, view_ap=FRONTAL.get(projection, UNKNOWN), view=projection,
                declared_bits=None if bits is None else int(bits))
    for image_id, lines in lines_of.items():
        if len(lines) > 1:
            records.pop(image_id, None)
            problems.append(Problem("duplicate_image_id", image_id, f"{path.name} lines {lines}"))
    kept = sorted(records.values(), key=lambda r: r.image_id)
    split = labelled.assign_group_split({r.patient_id: 0 for r in kept},
                                        {"test": test_fraction, "validation": val_fraction}, seed)
    kept = [dataclasses.replace(r, split=split[r.patient_id]) for r in kept]
    kept_ids = set(records)
    details = {
        "csv": str(path),
        "csv_rows": rows_total,
        "patients": len(patients),
        "views": views,
        "projections": dict(projections.most_common()),
        "excluded_projections": dict(excluded.most_common()),
        "empty_strings_in_labels": empty_strings,
        "unmapped_findings": dict(unmapped.most_common()),
        "label_findings": {label: list(findings) for label, findings in LABEL_FINDINGS.items()},
        "split": {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed, "by": "patient"},
    }
    flags = {flag: sorted(set(ids) & kept_ids) for flag, ids in flags.items()}
    return LabelledRaw(DATASET, root, LABEL_NAMES, kept, sorted(problems), flags, details)


def load_padchest(manual_dir: str | os.PathLike, *, skip_bad: bool = False, **options) -> LabelledRaw:
    raw = collect_padchest(manual_dir, **options)
    raise_or_skip(DATASET, raw.problems, skip_bad)
    return raw


def verify(manual_dir: str | os.PathLike, *, strict_counts: bool = False, **options) -> RawCheck:
    """The registry's verify hook: bad rows, counts against the published ones, splits, labels, unmapped findings,
    flags."""
    raw = collect_padchest(manual_dir, **options)
    found = {"images": raw.details["csv_rows"], "patients": raw.details["patients"]}
    count_notes, count_problems = compare_counts(found, EXPECTED_COUNTS, strict_counts)
    notes, split_problems = labelled.split_notes_and_problems(raw)
    return RawCheck(root=raw.root, problems=raw.problems + count_problems + split_problems,
                    notes=count_notes + notes, image_paths={r.image_id: r.path for r in raw.records})
