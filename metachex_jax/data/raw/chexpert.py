"""CheXpert (Irvin et al., AAAI 2019): the release's train.csv and valid.csv -> labelled records.

Layout: `CheXpert-v1.0-small/` (the downsampled JPEGs) or `CheXpert-v1.0/` (full size), each holding `train.csv`,
`valid.csv`, `train/patientNNNNN/studyN/viewN_frontal.jpg` and `valid/...`. `--manual_dir` is the folder holding
the release folder, or the release folder itself. The CSVs' `Path` starts with the release folder's name
(`CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`); that first part is replaced by the folder
actually found, so a renamed release folder still works. The patient id is the `patientNNNNN` part of Path.

Columns (found by name): `Path, Sex, Age, Frontal/Lateral, AP/PA` and the 14 observations (OBSERVATIONS), each
`1.0`, `0.0`, `-1.0` (uncertain) or blank (not mentioned: negative, as in the CheXpert paper).
- Uncertain (-1) follows the uncertainty policy, per label: `ignore` (masked: unknown, the default), `ones`
  (positive) or `zeros` (negative). Written `ignore`, `ones` or `zeros` for every label, or a default followed by
  per-label overrides: `ignore,Atelectasis=ones,Edema=ones` (the U-Ones labels of the CheXpert paper).
- Sex: Male / Female; Unknown is masked and counted (flag unknown_sex).
- Age: an integer; 0 is unknown (masked; flag age_zero).
- Frontal/Lateral: Frontal or Lateral. AP/PA: AP, PA, LL or RL, blank for laterals. A frontal image whose AP/PA
  is LL, RL or blank has an unknown view (masked; flag frontal_view_unknown); laterals have view_ap unknown.
- Views: `frontal` (the default) keeps frontal images only (laterals are counted in the report), `all` keeps both.
Anything else in these columns, a Path without a patient id, a duplicated Path, an image missing on disk and a
patient in both CSVs are bad rows: one error naming every one, or dropped with `--skip_bad` and reported.

Splits: validation = valid.csv (the official validation set); test = `test_fraction` (10% by default) of
train.csv's PATIENTS, drawn with `seed` (labelled.assign_group_split; the official test set is not public); train
= the rest of train.csv. The carve-out is recorded in the skip report (`details`).

Mapping onto NIH's 14 (data/input/mixture.py): Atelectasis, Cardiomegaly, Consolidation, Edema, Pneumonia, Pneumothorax
by name, `Pleural Effusion` -> Effusion; NIH labels CheXpert lacks (Infiltration, Mass, Nodule, Emphysema, Fibrosis,
Pleural_Thickening, Hernia) are masked; the other observations are extra labels under their own names.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

from metachex_jax.data.raw import labelled
from metachex_jax.data.raw.common import (Problem, RawCheck, compare_counts, is_plausible_age, parse_age_years,
                                          raise_or_skip)
from metachex_jax.data.raw.labelled import UNKNOWN, LabelledRaw, LabelledRecord

DATASET = "chexpert"
RELEASE_FOLDERS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices")
POLICIES = ("ignore", "ones", "zeros")
DEFAULT_TEST_FRACTION = 0.1
VIEWS = ("frontal", "all")
# The published counts of CheXpert-v1.0's train.csv and valid.csv; the verifier reports differences.
EXPECTED_COUNTS = {"train_images": 223_414, "train_patients": 64_540, "valid_images": 234, "valid_patients": 200}

_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
_VALUES = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "-1.0": -1, "-1": -1, "": 0}  # blank: not mentioned, negative
_UNCERTAIN_AS = {"ignore": UNKNOWN, "ones": 1, "zeros": 0}  # an uncertain (-1) value under each policy
_PATIENT = re.compile(r"(?:^|/)(patient\d+)/")


def parse_uncertainty(text: str) -> dict[str, str]:
    """'ignore' or 'ignore,Atelectasis=ones,...' -> {observation: policy} for all 14 observations."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    default, overrides, problems = "ignore", {}, []
    for part in parts:
        name, sep, policy = part.partition("=")
        name, policy = name.strip(), policy.strip()
        if not sep:
            default = name
        elif name not in OBSERVATIONS:
            problems.append(f"unknown observation {name!r}")
        else:
            overrides[name] = policy
    for policy in [default, *overrides.values()]:
        if policy not in POLICIES:
            problems.append(f"unknown policy {policy!r}")
    if problems or len([p for p in parts if "=" not in p]) > 1:
        raise ValueError(f"uncertainty={text!r}: " + ("; ".join(problems) or "more than one default")
                         + f". Write a policy ({', '.join(POLICIES)}), optionally followed by "
                         f"Observation=policy overrides, e.g. 'ignore,Atelectasis=ones,Edema=ones'; the "
                         f"observations: {', '.join(OBSERVATIONS)}")
    return {name: overrides.get(name, default) for name in OBSERVATIONS}


def uncertainty_name(text: str) -> str:
    """A config-name part for a policy: '' for the default (ignore everywhere), else e.g. 'unc-ignore-Atelectasis-
    ones'."""
    policies = parse_uncertainty(text)
    default = Counter(policies.values()).most_common(1)[0][0]
    if set(policies.values()) == {"ignore"}:
        return ""
    overrides = [f"{name.replace(' ', '')}-{p}" for name, p in policies.items() if p != default]
    return "-".join(["unc", default, *overrides])


def observation_labels(cell: dict[str, str], policies: dict[str, str], uncertain: Counter,
                       columns: dict[str, str] | None = None) -> tuple[list[int], list[str]]:
    """A row's observation cells -> its labels in OBSERVATIONS order and its bad values (`Column='text'`).

    1.0 and 0.0 are kept, blank is negative, -1.0 (uncertain) follows its observation's policy (`policies`, from
    parse_uncertainty) and is counted in `uncertain`. `columns` maps an observation to the row's column where
    the file spells it otherwise (default: the observation's own name). CheXpert's CSVs and MIMIC-CXR's labeller
    files share these values."""
    labels, bad = [], []
    for name in OBSERVATIONS:
        column = (columns or {}).get(name, name)
        value = _VALUES.get(cell[column])
        if value is None:
            bad.append(f"{column}={cell[column]!r}")
        elif value == -1:
            uncertain[name] += 1
            value = _UNCERTAIN_AS[policies[name]]
        labels.append(value)
    return labels, bad


def find_release(manual_dir: str | os.PathLike) -> Path:
    """The release folder (holding train.csv): manual_dir itself or manual_dir/<release folder>."""
    manual_dir = Path(manual_dir)
    for candidate in (manual_dir, *(manual_dir / name for name in RELEASE_FOLDERS)):
        if (candidate / "train.csv").is_file():
            return candidate
    raise FileNotFoundError(f"{DATASET}: no train.csv in {manual_dir} or in {' or '.join(RELEASE_FOLDERS)} below "
                            "it; point --manual_dir at the folder holding the release folder")


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        rows = [(line, row) for line, row in enumerate(reader, start=2) if any(c.strip() for c in row)]
    missing = [c for c in (*_COLUMNS, *OBSERVATIONS) if c not in header]
    if missing:
        raise ValueError(f"{DATASET}: {path} lacks column(s) {missing}; its header: {header}")
    return header, rows


def collect_chexpert(manual_dir: str | os.PathLike, *, views: str = "frontal", uncertainty: str = "ignore",
                     test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0) -> LabelledRaw:
    """Parse train.csv and valid.csv, collecting every problem and flag (module docstring)."""
    if views not in VIEWS:
        raise ValueError(f"{DATASET}: views={views!r}; choose one of {VIEWS}")
    policies = parse_uncertainty(uncertainty)
    release = find_release(manual_dir)
    on_disk = {os.path.relpath(os.path.join(folder, name), release)  # one walk, not one stat per listed file
               for part in ("train", "valid") for folder, _, names in os.walk(release / part) for name in names}
    problems: list[Problem] = []
    flags = {"unknown_sex": [], "age_zero": [], "frontal_view_unknown": []}
    excluded, uncertain, table_rows = Counter(), Counter(), Counter()
    records: dict[str, list[LabelledRecord]] = {}
    rows_of: dict[str, list[str]] = defaultdict(list)
    patients_of: dict[str, set[str]] = {}
    for table in ("train", "valid"):
        path = release / f"{table}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{DATASET}: {path} is missing")
        header, rows = _read_table(path)
        index = {name: header.index(name) for name in (*_COLUMNS, *OBSERVATIONS)}
        records[table], patients_of[table] = [], set()
        for line, row in rows:
            where = f"{path.name}:{line}"
            table_rows[table] += 1
            if len(row) != len(header):
                problems.append(Problem("bad_row", where, f"{len(row)} fields, the header has {len(header)}"))
                continue
            cell = {name: row[i].strip() for name, i in index.items()}
            listed = cell["Path"]
            rows_of[listed].append(where)
            relative = listed.split("/", 1)[1] if "/" in listed else listed  # without the release folder's name
            row_problems = []
            patient = _PATIENT.search(listed)
            if patient is None:
                row_problems.append(Problem("bad_path", listed, f"{where}: no patientNNNNN part in Path"))
            sex = {"Male": 1, "Female": 0, "Unknown": UNKNOWN}.get(cell["Sex"])
            if sex is None:
                row_problems.append(Problem("bad_sex", listed, f"{where}: Sex {cell['Sex']!r} (Male/Female/Unknown)"))
            age = parse_age_years(cell["Age"], bare_number_unit="y") if cell["Age"].isdigit() else None
            if age is None:
                row_problems.append(Problem("bad_age", listed, f"{where}: Age {cell['Age']!r} (an integer)"))
            frontal = {"Frontal": True, "Lateral": False}.get(cell["Frontal/Lateral"])
            if frontal is None:
                row_problems.append(Problem("bad_view", listed, f"{where}: Frontal/Lateral "
                                            f"{cell['Frontal/Lateral']!r} (Frontal/Lateral)"))
            if cell["AP/PA"] not in ("AP", "PA", "LL", "RL", ""):
                row_problems.append(Problem("bad_view", listed, f"{where}: AP/PA {cell['AP/PA']!r} "
                                            "(AP/PA/LL/RL or blank)"))
            labels, bad = observation_labels(cell, policies, uncertain)
            if bad:
                row_problems.append(Problem("unknown_label_value", listed,
                                            f"{where}: {', '.join(bad)} (1.0, 0.0, -1.0 or blank)"))
            if relative not in on_disk:
                row_problems.append(Problem("missing_image", listed, f"{where}: {release / relative} does not exist"))
            if row_problems:
                problems += row_problems
                continue
            patients_of[table].add(patient.group(1))
            if not frontal and views == "frontal":
                excluded[f"{table} lateral"] += 1
                continue
            view_ap = {"AP": 1, "PA": 0}.get(cell["AP/PA"], UNKNOWN) if frontal else UNKNOWN
            if frontal and view_ap == UNKNOWN:
                flags["frontal_view_unknown"].append(listed)
            if sex == UNKNOWN:
                flags["unknown_sex"].append(listed)
            if age == 0:
                flags["age_zero"].append(listed)
            view = f"Frontal {cell['AP/PA']}".strip() if frontal else "Lateral"
            records[table].append(LabelledRecord(
                image_id=listed, path=str(release / relative), patient_id=patient.group(1), labels=tuple(labels),
                age=float(age), age_valid=bool(age) and is_plausible_age(age), sex_male=sex, view_ap=view_ap,
                view=view))

    duplicated = {p for p, wheres in rows_of.items() if len(wheres) > 1}
    problems += [Problem("duplicate_path", p, f"listed at {', '.join(rows_of[p])}") for p in sorted(duplicated)]
    in_both = patients_of["train"] & patients_of["valid"]
    for record in records["train"]:
        if record.patient_id in in_both:
            problems.append(Problem("patient_in_both_splits", record.image_id,
                                    f"patient {record.patient_id} also has images in valid.csv; dropped from train"))
    train = [r for r in records["train"] if r.image_id not in duplicated and r.patient_id not in in_both]
    valid = [r for r in records["valid"] if r.image_id not in duplicated]
    carve = labelled.assign_group_split({r.patient_id: 0 for r in train}, {"test": test_fraction}, seed)
    out = [dataclasses.replace(r, split=carve[r.patient_id]) for r in train]
    out += [dataclasses.replace(r, split="validation") for r in valid]
    out.sort(key=lambda r: r.image_id)
    kept = {r.image_id for r in out}
    flags = {flag: sorted(set(ids) & kept) for flag, ids in flags.items()}
    details = {
        "release_folder": str(release),
        "csv_rows": {"train": table_rows["train"], "valid": table_rows["valid"]},
        "patients": {"train.csv": len(patients_of["train"]), "valid.csv": len(patients_of["valid"])},
        "views": views,
        "excluded_views": dict(excluded),
        "uncertainty": uncertainty,
        "uncertain_values": dict(uncertain),
        "test_carve_out": {"fraction_of_train_patients": test_fraction, "seed": seed,
                           "patients": sum(1 for s in carve.values() if s == "test")},
    }
    return LabelledRaw(DATASET, release, OBSERVATIONS, out, sorted(problems), flags, details)


def load_chexpert(manual_dir: str | os.PathLike, *, skip_bad: bool = False, **options) -> LabelledRaw:
    raw = collect_chexpert(manual_dir, **options)
    raise_or_skip(DATASET, raw.problems, skip_bad)
    return raw


def verify(manual_dir: str | os.PathLike, *, strict_counts: bool = False, **options) -> RawCheck:
    """The registry's verify hook: bad rows, counts against the published ones, splits, labels, flags."""
    raw = collect_chexpert(manual_dir, **options)
    found = {"train_images": raw.details["csv_rows"]["train"], "train_patients": raw.details["patients"]["train.csv"],
             "valid_images": raw.details["csv_rows"]["valid"], "valid_patients": raw.details["patients"]["valid.csv"]}
    count_notes, count_problems = compare_counts(found, EXPECTED_COUNTS, strict_counts)
    notes, split_problems = labelled.split_notes_and_problems(raw)
    return RawCheck(root=raw.root, problems=raw.problems + count_problems + split_problems,
                    notes=count_notes + notes, image_paths={r.image_id: r.path for r in raw.records})
