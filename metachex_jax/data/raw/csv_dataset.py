"""Your own data: a CSV listing images and their labels (`--dataset=csv --csv=FILE --manual_dir=IMAGES`).

The CSV (comma-separated, a header row, UTF-8; a byte-order mark is fine):

    path,Tuberculosis,Cardiomegaly,patient_id,age,sex,view
    images/0001.png,1,0,P001,54,M,PA
    images/0002.jpg,0,,P001,55,male,ap
    scans/0003.dcm,0,1,P002,,F,

- `path` (required): the image file, relative to `--manual_dir`; any format the image reader takes (PNG, JPEG,
  DICOM, ... decided by content, images.py), any bit depth.
- every other column is a LABEL, except the optional metadata columns `patient_id`, `age`, `sex`, `view` (these
  five names are matched case-insensitively). A label cell is 1, 0 (also 1.0 / 0.0) or blank = unknown (masked
  out of losses and metrics). A label column named like one of NIH's 14 (e.g. `Cardiomegaly`) is that label in
  a mixture (data/input/mixture.py); others are labels of their own (e.g. `Tuberculosis`, a transfer target).
- `patient_id`: groups images of one patient, so that a patient never straddles a split or a fold. Without the
  column every image is its own patient; a blank cell in it is a bad row (the grouping cannot be guaranteed).
- `age` in years (a number, or e.g. "54Y"); `sex` M / F / male / female (any case); `view` PA / AP (any case).
  Anything else there (blank included) is unknown: masked, counted and listed in the build report, never guessed.

Bad rows, named all at once in one error, or dropped with `--skip_bad` and listed in the skip report:
  bad_row (wrong number of fields), unknown_label_value (a label cell that is not 1/0/blank), missing_image,
  duplicate_path (every row naming the same file), missing_patient_id; images that do not decode are found by
  the build (undecodable_image) and `--verify`.

Splits, both stored in every record (labelled.py, grouped by patient when patient ids exist, stratified by the
label `stratify_by`, default the first label column): a k-fold assignment (`fold`, `num_folds`, default 10,
seed `seed`) for cross-validation, and a fixed train/validation/test split (70/10/20 by default, like the TB
sets; seed `seed + 1`).

Identity: the build's config name is `<csv stem>_r<resolution>[_<options>]_<fingerprint>`, the fingerprint a
hash of the CSV's bytes and of every option, so builds of different CSVs (or of one CSV with other options)
never mix. The images' bytes are not hashed: after changing an image in place, rebuild with --overwrite.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
from collections import Counter, defaultdict
from csv import reader as csv_reader  # (collect_csv's argument `csv` is the CSV's path)
from pathlib import Path

from metachex_jax.data.raw import labelled
from metachex_jax.data.raw.common import Problem, RawCheck, is_plausible_age, parse_age_years, raise_or_skip
from metachex_jax.data.raw.labelled import UNKNOWN, LabelledRaw, LabelledRecord

DATASET = "csv"
PATH_COLUMN = "path"
METADATA_COLUMNS = ("patient_id", "age", "sex", "view")
DEFAULT_NUM_FOLDS = 10
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.2
_LABEL_VALUES = {"1": 1, "0": 0, "1.0": 1, "0.0": 0, "": UNKNOWN}


@dataclasses.dataclass(frozen=True)
class CsvLayout:
    """The CSV's columns: where path/metadata are, and the label columns in order."""

    path: Path
    header: tuple[str, ...]
    label_names: tuple[str, ...]
    metadata: dict  # metadata column name -> index

    @property
    def label_indices(self) -> list[int]:
        return [self.header.index(name) for name in self.label_names]


def csv_path(csv_file: str | os.PathLike) -> Path:
    if not csv_file:
        raise ValueError("the csv dataset needs the CSV file: --csv=FILE (config: data.csv.csv)")
    path = Path(os.path.expanduser(os.fspath(csv_file))).absolute()
    if not path.is_file():
        raise FileNotFoundError(f"{DATASET}: the CSV file {path} does not exist")
    return path


def read_layout(csv_file: str | os.PathLike) -> CsvLayout:
    """The CSV's header, checked: a `path` column, no duplicate or empty names, at least one label column."""
    path = csv_path(csv_file)
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = tuple(name.strip() for name in next(csv.reader(f), []))
    lowered = [name.lower() for name in header]
    problems = []
    if PATH_COLUMN not in lowered:
        problems.append(f"no '{PATH_COLUMN}' column")
    duplicates = sorted(name for name, n in Counter(lowered).items() if n > 1)
    if duplicates:
        problems.append(f"duplicate column names {duplicates}")
    if any(not name for name in header):
        problems.append("an empty column name")
    reserved = (PATH_COLUMN, *METADATA_COLUMNS)
    labels = tuple(name for name in header if name.lower() not in reserved)
    if not labels:
        problems.append("no label column (every column besides path, patient_id, age, sex and view is a label)")
    if problems:
        raise ValueError(f"{DATASET}: {path}: " + "; ".join(problems) + f". Header: {list(header)}")
    metadata = {name: lowered.index(name) for name in METADATA_COLUMNS if name in lowered}
    metadata[PATH_COLUMN] = lowered.index(PATH_COLUMN)
    return CsvLayout(path, header, labels, metadata)


def fingerprint(csv_file: str | os.PathLike, options: dict) -> str:
    """10 hex digits of sha256(CSV bytes, options as JSON)."""
    digest = hashlib.sha256(csv_path(csv_file).read_bytes())
    digest.update(json.dumps(options, sort_keys=True).encode())
    return digest.hexdigest()[:10]


def name_stem(csv_file: str | os.PathLike) -> str:
    """The CSV file's stem as a config-name part: lower case, [a-z0-9_] only."""
    return re.sub(r"[^a-z0-9_]+", "_", Path(os.fspath(csv_file)).stem.lower()).strip("_") or "csv"


def _stratify_column(layout: CsvLayout, stratify_by: str) -> str:
    if not stratify_by:
        return layout.label_names[0]
    if stratify_by not in layout.label_names:
        raise ValueError(f"{DATASET}: stratify_by={stratify_by!r} is not a label column of {layout.path.name}; "
                         f"its label columns: {list(layout.label_names)}")
    return stratify_by


def collect_csv(manual_dir: str | os.PathLike, *, csv: str, num_folds: int = DEFAULT_NUM_FOLDS, seed: int = 0,
                stratify_by: str = "", val_fraction: float = DEFAULT_VAL_FRACTION,
                test_fraction: float = DEFAULT_TEST_FRACTION) -> LabelledRaw:
    """Parse the CSV, collecting every problem and flag; offending rows are left out of `records`."""
    root = Path(manual_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{DATASET}: --manual_dir {root} (the folder image paths are relative to) "
                                "does not exist")
    layout = read_layout(csv)
    stratify = _stratify_column(layout, stratify_by)
    column = {name: layout.metadata.get(name) for name in (PATH_COLUMN, *METADATA_COLUMNS)}
    label_indices = layout.label_indices
    problems: list[Problem] = []
    flags: dict[str, list[str]] = {"unknown_sex": [], "unknown_view": [], "unknown_age": [],
                                   "unparseable_age": [], "implausible_age": []}
    unknown_values: dict[str, Counter] = {"sex": Counter(), "view": Counter(), "age": Counter()}
    rows_by_file: dict[str, list[int]] = defaultdict(list)
    parsed: dict[int, LabelledRecord] = {}
    with open(layout.path, newline="", encoding="utf-8-sig") as f:
        reader = csv_reader(f)
        next(reader)
        for line, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            where = f"{layout.path.name}:{line}"
            if len(row) != len(layout.header):
                problems.append(Problem("bad_row", where, f"{len(row)} fields, the header has {len(layout.header)}"))
                continue
            cell = {name: row[i].strip() for name, i in column.items() if i is not None}
            image = cell[PATH_COLUMN]
            if not image:
                problems.append(Problem("bad_row", where, "empty path"))
                continue
            rows_by_file[os.path.normpath(image)].append(line)
            labels, bad = [], []
            for name, i in zip(layout.label_names, label_indices):
                value = _LABEL_VALUES.get(row[i].strip())
                if value is None:
                    bad.append(f"{name}={row[i]!r}")
                labels.append(UNKNOWN if value is None else value)
            if bad:
                problems.append(Problem("unknown_label_value", image,
                                        f"{where}: {', '.join(bad)} (a label is 1, 0 or blank = unknown)"))
            patient = image
            if column["patient_id"] is not None:
                patient = cell["patient_id"]
                if not patient:
                    problems.append(Problem("missing_patient_id", image, f"{where}: blank patient_id"))
            path = root / image
            if not path.is_file():
                problems.append(Problem("missing_image", image, f"{where}: {path} does not exist"))
            if bad or not patient or not path.is_file():
                continue
            sex = labelled.parse_sex(cell.get("sex", ""))
            if sex is None:
                flags["unknown_sex"].append(image)
                unknown_values["sex"][cell.get("sex", "")] += 1
            view = labelled.parse_view(cell.get("view", ""))
            if view is None:
                flags["unknown_view"].append(image)
                unknown_values["view"][cell.get("view", "")] += 1
            age_text = cell.get("age", "")
            age = parse_age_years(age_text, bare_number_unit="y") if age_text else None
            if not age_text:
                flags["unknown_age"].append(image)
            elif age is None:
                flags["unparseable_age"].append(image)
                unknown_values["age"][age_text] += 1
            elif not is_plausible_age(age):
                flags["implausible_age"].append(image)
            parsed[line] = LabelledRecord(
                image_id=image, path=str(path), patient_id=patient, labels=tuple(labels),
                age=float(age) if age is not None else 0.0, age_valid=is_plausible_age(age),
                sex_male=UNKNOWN if sex is None else sex, view_ap=UNKNOWN if view is None else view,
                view=cell.get("view", ""))
    for image, lines in rows_by_file.items():
        if len(lines) > 1:
            for line in lines:
                parsed.pop(line, None)
            problems.append(Problem("duplicate_path", image, f"{layout.path.name} lines {lines}"))
    records = sorted(parsed.values(), key=lambda r: r.image_id)
    for flag in list(flags):
        flags[flag] = sorted(set(flags[flag]) & {r.image_id for r in records})

    j = layout.label_names.index(stratify)
    strata = labelled.patient_strata((r.patient_id, r.labels[j]) for r in records)
    folds = labelled.assign_group_folds(strata, num_folds, seed) if strata else {}
    split = labelled.assign_group_split(strata, {"test": test_fraction, "validation": val_fraction}, seed + 1)
    records = [dataclasses.replace(r, fold=folds[r.patient_id], split=split[r.patient_id]) for r in records]
    details = {"csv": str(layout.path), "label_columns": list(layout.label_names), "stratify_by": stratify,
               "patients": len(strata) if column["patient_id"] is not None
               else "no patient_id column: every image is its own patient",
               "unknown_values": {k: dict(v) for k, v in unknown_values.items() if v}}
    return LabelledRaw(DATASET, root, layout.label_names, records, sorted(problems), flags, details)


def load_csv(manual_dir: str | os.PathLike, *, skip_bad: bool = False, **options) -> LabelledRaw:
    """`collect_csv`, then one RawDataError naming every problem unless skip_bad."""
    raw = collect_csv(manual_dir, **options)
    raise_or_skip(DATASET, raw.problems, skip_bad)
    return raw


def verify(manual_dir: str | os.PathLike, *, strict_counts: bool = False, **options) -> RawCheck:
    """The registry's verify hook: every bad row, splits and folds, label counts, unknown metadata.

    There are no published counts to compare with (`strict_counts` has nothing to check).
    """
    raw = collect_csv(manual_dir, **options)
    notes, problems = labelled.split_notes_and_problems(raw)
    fold_sizes = Counter(r.fold for r in raw.records)
    notes.insert(0, f"{len(raw.records):,} usable images of {raw.details['csv']}")
    notes.append(f"{options.get('num_folds', DEFAULT_NUM_FOLDS)} folds, sizes (images) "
                 f"{[fold_sizes[f] for f in sorted(fold_sizes)]}")
    return RawCheck(root=raw.root, problems=raw.problems + problems, notes=notes,
                    image_paths={r.image_id: r.path for r in raw.records})
