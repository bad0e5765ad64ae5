"""NIH ChestX-ray14: read the raw release (CSV + split lists + PNG tree) into per-split record lists.

Layout (NIH's release; the docs' Data page shows it): a folder holding `Data_Entry_2017_v2020.csv` (preferred when both
are present) or `Data_Entry_2017.csv`, `train_val_list.txt`, `test_list.txt`, and the PNGs anywhere below it
(`images/` from the official tarballs or the mirrors' `images_0NN/images/`). `manual_dir` may be that folder or a
parent holding it.

CSV quirks handled: the header's bracketed names contain commas (`OriginalImage[Width,Height]` spans two data
columns), the 2017 file has a trailing empty column, the sex column is `Patient Gender` or `Patient Sex`, ages may
be written `58` or `058Y`. Columns are found by name, so their order does not matter.

Every problem is collected before anything is decided (see raw_common): one row can carry several. Kinds, each
naming one dropped item when `skip_bad=True`:
  bad_row, unknown_label, bad_labels, bad_age, bad_sex, bad_view, patient_id_mismatch, duplicate_csv_row,
  duplicate_image_file, missing_image (in the CSV, not on disk), unlisted_image (a PNG on disk, not in the CSV;
  whatever its name: an image nobody listed may be a renamed or misplaced one),
  split_name_not_in_csv, duplicate_in_split_list, in_both_splits, not_in_split_list,
  patient_in_both_splits (the patient's train_val images are dropped; the official test set is kept whole).
Files that are no part of the dataset (AppleDouble `._*`, hidden files, Thumbs.db: raw_common.not_dataset_file)
are not looked at: they are counted in `NihRaw.ignored_files` and reported, never problems.
Implausible ages (outside labels.PLAUSIBLE_AGE_YEARS) are not problems: the row is kept with age_valid=False and
the image names are reported in `NihRaw.invalid_age_names`.

Validation is carved from train_val BY PATIENT (`split_validation_patients`): the sorted patient ids are permuted
with numpy's default_rng(seed) and the first round(fraction * n_patients) become validation. Same seed, same split.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from metachex_jax.core.labels import NO_FINDING, PATHOLOGIES
from metachex_jax.data.raw.common import (Problem, RawCheck, compare_counts, is_plausible_age, not_dataset_file,
                                          parse_age_years, raise_or_skip, summarize_ignored)

DATASET = "chestxray14"
CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # first found wins
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
# The published counts (NIH's release: 112,120 images of 30,805 patients); the verifier reports differences.
EXPECTED_COUNTS = {"images": 112_120, "patients": 30_805, "train_val": 86_524, "test": 25_596}

_IMAGE_NAME_RE = re.compile(r"^(\d{8})_(\d{3})\.png$")
_REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "View Position")
_SEX_COLUMNS = ("Patient Gender", "Patient Sex")


@dataclasses.dataclass(frozen=True)
class NihRecord:
    """One image, with the fields the chestxray14 builder writes (its features: data/build/builders.py)."""

    image_name: str
    patient_id: int
    follow_up: int
    labels: tuple[int, ...]  # multi-hot in PATHOLOGIES order
    age: float  # as written, in years (may be implausible)
    age_valid: bool
    sex_male: int
    view_ap: int
    path: str = ""  # filled in once the file is found on disk


@dataclasses.dataclass
class NihRaw:
    """The parsed raw copy. `splits` maps train/validation/test to records sorted by image name."""

    root: Path
    csv_path: Path
    splits: dict[str, list[NihRecord]]
    problems: list[Problem]  # every problem found (all of them were skipped if this object exists)
    invalid_age_names: list[str]
    csv_rows: int
    images_on_disk: int
    split_list_sizes: dict[str, int]
    ignored_files: dict[str, list[str]]  # not_dataset_file kind -> paths relative to root


def find_nih_root(manual_dir: str | os.PathLike) -> Path:
    """The folder holding Data_Entry_2017*.csv: manual_dir itself or one below it (searched two levels deep)."""
    manual_dir = Path(manual_dir)
    candidates = [manual_dir, *sorted(p for p in manual_dir.glob("*") if p.is_dir())]
    candidates += sorted(p for p in manual_dir.glob("*/*") if p.is_dir())
    roots = [d for d in candidates if any((d / name).is_file() for name in CSV_NAMES)]
    if not roots:
        raise FileNotFoundError(
            f"{DATASET}: no {' or '.join(CSV_NAMES)} in {manual_dir} or the two levels below it; "
            "point --manual_dir at the folder holding the CSV, the split lists and the images."
        )
    if len(roots) > 1 and roots[0] != manual_dir:
        raise FileNotFoundError(f"{DATASET}: several folders under {manual_dir} hold the CSV: {roots}; choose one.")
    return roots[0]


def _expand_header(header_line: str) -> list[str]:
    """Column names of the data rows: "OriginalImage[Width,Height]" becomes OriginalImage[Width], ...[Height]."""
    names, current, depth = [], "", 0
    for char in header_line.strip() + ",":
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            names.append(current.strip())
            current = ""
        else:
            current += char
    while names and not names[-1]:  # the 2017 file's trailing empty column
        names.pop()
    columns = []
    for name in names:
        bracket = re.fullmatch(r"(.*)\[(.*)\]", name)
        if bracket:
            columns += [f"{bracket.group(1)}[{part.strip()}]" for part in bracket.group(2).split(",")]
        else:
            columns.append(name)
    return columns


def _parse_labels(text: str) -> tuple[tuple[int, ...] | None, str, str]:
    """Finding Labels -> (multi-hot, "", "") or (None, problem kind, detail)."""
    names = [n.strip() for n in text.split("|")]
    unknown = [n for n in names if n not in PATHOLOGIES and n != NO_FINDING]
    if unknown:
        return None, "unknown_label", f"unknown label(s) {unknown} (known: {', '.join(PATHOLOGIES)}, {NO_FINDING})"
    if NO_FINDING in names and len(names) > 1:
        return None, "bad_labels", f"'{NO_FINDING}' combined with other labels: {text!r}"
    return tuple(int(p in names) for p in PATHOLOGIES), "", ""


def read_data_entry(csv_path: str | os.PathLike) -> tuple[dict[str, NihRecord], list[Problem], int]:
    """Parse Data_Entry_2017*.csv -> ({image name: record}, problems, number of data rows).

    Rows with problems are absent from the dict; duplicated image names are dropped entirely (which row is right
    cannot be known).
    """
    csv_path = Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        header_line = f.readline()
        columns = _expand_header(header_line)
        sex_column = next((c for c in _SEX_COLUMNS if c in columns), None)
        missing = [c for c in _REQUIRED_COLUMNS if c not in columns]
        missing += [] if sex_column else [" or ".join(_SEX_COLUMNS)]
        if missing:
            raise ValueError(f"{csv_path}: header lacks column(s) {missing}; header was {header_line.strip()!r}")
        index = {name: i for i, name in enumerate(columns)}
        records: dict[str, NihRecord] = {}
        problems: list[Problem] = []
        rows_by_name: dict[str, list[int]] = defaultdict(list)
        n_rows = 0
        for line_number, row in enumerate(csv.reader(f), start=2):
            if not any(field.strip() for field in row):
                continue  # blank line
            n_rows += 1
            where = f"{csv_path.name}:{line_number}"
            while len(row) > len(columns) and not row[-1].strip():
                row = row[:-1]
            if len(row) != len(columns):
                item = row[0].strip() if row else where
                problems.append(Problem("bad_row", item, f"{where}: {len(row)} fields, expected {len(columns)}"))
                continue
            field = {name: row[i].strip() for name, i in index.items()}
            name = field["Image Index"]
            rows_by_name[name].append(line_number)
            row_problems = []
            labels, label_problem, label_detail = _parse_labels(field["Finding Labels"])
            if label_problem:
                row_problems.append(Problem(label_problem, name, f"{where}: {label_detail}"))
            try:
                patient_id, follow_up = int(field["Patient ID"]), int(field["Follow-up #"])
            except ValueError:
                row_problems.append(Problem("bad_row", name, f"{where}: Patient ID {field['Patient ID']!r} / "
                                            f"Follow-up # {field['Follow-up #']!r} are not integers"))
                patient_id = follow_up = -1
            name_match = _IMAGE_NAME_RE.match(name)
            if name_match and patient_id >= 0 and int(name_match.group(1)) != patient_id:
                row_problems.append(Problem("patient_id_mismatch", name,
                                            f"{where}: Patient ID {patient_id} but the file name says "
                                            f"{int(name_match.group(1))}"))
            age = parse_age_years(field["Patient Age"], bare_number_unit="y")
            if age is None:
                row_problems.append(Problem("bad_age", name, f"{where}: Patient Age {field['Patient Age']!r}"))
            sex = field[sex_column].upper()
            if sex not in ("M", "F"):
                row_problems.append(Problem("bad_sex", name, f"{where}: {sex_column} {field[sex_column]!r} (M/F)"))
            view = field["View Position"].upper()
            if view not in ("PA", "AP"):
                row_problems.append(Problem("bad_view", name, f"{where}: View Position {field['View Position']!r} "
                                            "(PA/AP)"))
            if row_problems:
                problems += row_problems
                continue
            records[name] = NihRecord(
                image_name=name, patient_id=patient_id, follow_up=follow_up, labels=labels, age=age,
                age_valid=is_plausible_age(age), sex_male=int(sex == "M"), view_ap=int(view == "AP"),
            )
    for name, lines in rows_by_name.items():
        if len(lines) > 1:
            records.pop(name, None)
            problems.append(Problem("duplicate_csv_row", name, f"{csv_path.name} lines {lines}"))
    return records, problems, n_rows


def read_name_list(path: str | os.PathLike) -> list[str]:
    """The image names of a split list, one a line (the last line may lack a newline; blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f.read().splitlines() if line.strip()]


def find_images(root: str | os.PathLike) -> tuple[dict[str, Path], list[Problem], dict[str, list[str]]]:
    """All *.png below root (any depth, either layout) -> ({file name: path}, duplicate_image_file problems,
    {kind: relative paths} of the files that are no part of the dataset, which are left out)."""
    root = Path(root)
    found: dict[str, list[Path]] = defaultdict(list)
    ignored: dict[str, list[str]] = defaultdict(list)
    for folder, _, files in os.walk(root):
        for file_name in files:
            path = Path(folder) / file_name
            kind = not_dataset_file(path.relative_to(root))
            if kind:
                ignored[kind].append(str(path.relative_to(root)))
            elif file_name.lower().endswith(".png"):
                found[file_name].append(path)
    paths, problems = {}, []
    for name, where in found.items():
        if len(where) == 1:
            paths[name] = where[0]
        else:
            problems.append(Problem("duplicate_image_file", name,
                                    "found at " + ", ".join(str(p.relative_to(root)) for p in sorted(where))))
    return paths, problems, {kind: sorted(found) for kind, found in sorted(ignored.items())}


def split_validation_patients(patient_ids, fraction: float, seed: int) -> set[int]:
    """The patients carved out of train_val for validation: deterministic in (set of ids, fraction, seed)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    patients = np.array(sorted(set(patient_ids)), dtype=np.int64)
    n_val = int(round(fraction * len(patients)))
    if fraction > 0 and len(patients) > 1:
        n_val = min(max(n_val, 1), len(patients) - 1)
    order = np.random.default_rng(seed).permutation(len(patients))
    return set(patients[order[:n_val]].tolist())


def _split_list_problems(lists: dict[str, list[str]], csv_names: set[str], csv_file: str) -> list[Problem]:
    problems = []
    for list_name, names in lists.items():
        for name, count in Counter(names).items():
            if count > 1:
                problems.append(Problem("duplicate_in_split_list", name, f"listed {count} times in {list_name}"))
            if name not in csv_names:
                problems.append(Problem("split_name_not_in_csv", name,
                                        f"listed in {list_name}, absent from {csv_file}"))
    for name in sorted(set(lists[TRAIN_VAL_LIST]) & set(lists[TEST_LIST])):
        problems.append(Problem("in_both_splits", name, f"listed in both {TRAIN_VAL_LIST} and {TEST_LIST}"))
    return problems


def collect_nih(manual_dir: str | os.PathLike, *, val_fraction: float = 0.1, seed: int = 0) -> NihRaw:
    """Parse everything and collect every problem, dropping offending items (never raises for bad rows/files)."""
    root = find_nih_root(manual_dir)
    csv_path = next(root / name for name in CSV_NAMES if (root / name).is_file())
    records, problems, n_rows = read_data_entry(csv_path)
    bad_csv_names = {p.item for p in problems}  # rows that exist in the CSV but were dropped
    for list_file in (TRAIN_VAL_LIST, TEST_LIST):
        if not (root / list_file).is_file():
            raise FileNotFoundError(f"{DATASET}: {root / list_file} is missing")
    lists = {name: read_name_list(root / name) for name in (TRAIN_VAL_LIST, TEST_LIST)}
    problems += _split_list_problems(lists, set(records) | bad_csv_names, csv_path.name)

    paths, duplicate_files, ignored = find_images(root)
    problems += duplicate_files
    duplicate_file_names = {p.item for p in duplicate_files}
    for name in sorted(set(paths) - set(records) - bad_csv_names):
        problems.append(Problem("unlisted_image", str(paths[name].relative_to(root)),
                                f"on disk but not in {csv_path.name}"))
    for name in sorted(set(records) - set(paths) - duplicate_file_names):
        problems.append(Problem("missing_image", name, f"in {csv_path.name} but not found below {root}"))

    in_list = {list_name: set(names) for list_name, names in lists.items()}
    for name in sorted(set(records) - in_list[TRAIN_VAL_LIST] - in_list[TEST_LIST]):
        problems.append(Problem("not_in_split_list", name, f"in {csv_path.name} but in neither split list"))

    dropped = {p.item for p in problems}
    usable = {n: dataclasses.replace(r, path=str(paths[n])) for n, r in records.items() if n not in dropped}
    test = sorted(n for n in usable if n in in_list[TEST_LIST])
    train_val = sorted(n for n in usable if n in in_list[TRAIN_VAL_LIST])
    test_patients = {usable[n].patient_id for n in test}
    for name in train_val:
        if usable[name].patient_id in test_patients:
            problems.append(Problem("patient_in_both_splits", name,
                                    f"patient {usable[name].patient_id} also has images in {TEST_LIST}; "
                                    f"dropped from {TRAIN_VAL_LIST}"))
    train_val = [n for n in train_val if usable[n].patient_id not in test_patients]

    val_patients = split_validation_patients((usable[n].patient_id for n in train_val), val_fraction, seed)
    splits = {
        "train": [usable[n] for n in train_val if usable[n].patient_id not in val_patients],
        "validation": [usable[n] for n in train_val if usable[n].patient_id in val_patients],
        "test": [usable[n] for n in test],
    }
    invalid_ages = sorted(r.image_name for rs in splits.values() for r in rs if not r.age_valid)
    return NihRaw(root=root, csv_path=csv_path, splits=splits, problems=sorted(problems),
                  invalid_age_names=invalid_ages, csv_rows=n_rows, images_on_disk=len(paths) + len(duplicate_files),
                  split_list_sizes={k: len(v) for k, v in lists.items()}, ignored_files=ignored)


def load_nih(manual_dir: str | os.PathLike, *, val_fraction: float = 0.1, seed: int = 0,
             skip_bad: bool = False) -> NihRaw:
    """`collect_nih`, then raise one RawDataError naming every problem unless skip_bad."""
    raw = collect_nih(manual_dir, val_fraction=val_fraction, seed=seed)
    raise_or_skip(DATASET, raw.problems, skip_bad)
    return raw


def verify(manual_dir: str | os.PathLike, *, val_fraction: float = 0.1, seed: int = 0,
           strict_counts: bool = False) -> RawCheck:
    """The registry's verify hook: every reader problem, counts against the published ones, patient-disjoint
    splits, label prevalence and implausible ages (`python -m metachex_jax.prepare --verify`)."""
    raw = collect_nih(manual_dir, val_fraction=val_fraction, seed=seed)
    records = [r for split in raw.splits.values() for r in split]
    problems, notes = list(raw.problems), [f"metadata: {raw.csv_path.name}"]
    found = {"images": raw.csv_rows, "patients": len({r.patient_id for r in records}),
             "train_val": raw.split_list_sizes[TRAIN_VAL_LIST], "test": raw.split_list_sizes[TEST_LIST]}
    count_notes, count_problems = compare_counts(found, EXPECTED_COUNTS, strict_counts)
    notes += count_notes + [f"images on disk: {raw.images_on_disk:,}"]
    if raw.ignored_files:
        notes.append(f"ignored, not images of the dataset: {summarize_ignored(raw.ignored_files)}")
    problems += count_problems
    patients = {split: {r.patient_id for r in rs} for split, rs in raw.splits.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        for patient in sorted(patients[a] & patients[b]):  # cannot happen after collect_nih; checked anyway
            problems.append(Problem("patient_overlap", f"patient {patient}", f"in both {a} and {b}"))
    notes.append("split sizes (images / patients): " + ", ".join(
        f"{s} {len(rs):,} / {len(patients[s]):,}" for s, rs in raw.splits.items()) + "; patient-disjoint")
    prevalence = Counter(p for r in records for p, v in zip(PATHOLOGIES, r.labels) if v)
    notes.append("labels: " + ", ".join(f"{p} {prevalence[p]:,}" for p in PATHOLOGIES)
                 + f", No Finding {sum(1 for r in records if not any(r.labels)):,}")
    notes.append(f"implausible ages (kept, age_valid=False): {len(raw.invalid_age_names)}"
                 + (f" e.g. {', '.join(raw.invalid_age_names[:5])}" if raw.invalid_age_names else ""))
    return RawCheck(root=raw.root, problems=problems, notes=notes,
                    image_paths={r.image_name: r.path for r in records})
