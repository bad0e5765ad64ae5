"""NIH ChestX-ray14's adjudicated expert labels (Majkowska et al., Radiology 2019): read the label files.

Published with the Google Cloud copy of NIH as two files, a test set (1,962 images) and a validation set (2,414),
and circulated merged with a `Set Id` column (`test` / `val`). Either form is accepted: one merged file, or
several files without `Set Id` whose names say which set they hold (a name containing "test", or "val"/
"validation"). Columns (found by name; the bracketed ones contain commas, as in NIH's own CSV, and are read the
way data/raw/nih.py reads them):

    Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age, Patient Gender, View Position,
    OriginalImage[Width, Height], OriginalImagePixelSpacing[x, y], Fracture, Pneumothorax, Airspace opacity,
    Nodule or mass[, Set Id]

The four findings are YES or NO (any case). Anything else, an image listed twice, a Patient ID that is not an
integer or a Set Id that is neither test nor val is a problem: one RawDataError names every one.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from metachex_jax.data.raw.common import Problem, RawDataError
from metachex_jax.data.raw.nih import _expand_header

DATASET = "nih_expert"
FINDINGS = ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")
SETS = ("test", "val")
# The published counts of the two label files (Majkowska et al., Radiology 2019).
EXPECTED_COUNTS = {"images": 4_376, "patients": 1_695, "test": 1_962, "val": 2_414}


@dataclasses.dataclass(frozen=True)
class ExpertRecord:
    image_name: str
    patient_id: int
    set_id: str  # "test" or "val"
    labels: tuple[int, ...]  # 1 = YES, 0 = NO, in FINDINGS order
    source: str  # file:line


def _set_from_name(path: Path) -> str | None:
    name = path.name.lower()
    found = [s for s, pattern in (("test", r"test"), ("val", r"val")) if re.search(pattern, name)]
    return found[0] if len(found) == 1 else None


def read_expert_labels(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, ExpertRecord]:
    """Image name -> ExpertRecord from the merged file or the pair of files (module docstring)."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise ValueError("no expert label file given (--labels_csv=FILE, once per file)")
    records: dict[str, ExpertRecord] = {}
    problems: list[Problem] = []
    seen: dict[str, list[str]] = {}
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{DATASET}: {path} does not exist")
        with open(path, newline="", encoding="utf-8-sig") as f:
            header_line = f.readline()
            columns = _expand_header(header_line)
            missing = [c for c in ("Image Index", "Patient ID", *FINDINGS) if c not in columns]
            if missing:
                raise ValueError(f"{DATASET}: {path} lacks column(s) {missing}; its header: {header_line.strip()!r}")
            has_set = "Set Id" in columns
            file_set = None if has_set else _set_from_name(path)
            if not has_set and file_set is None:
                raise ValueError(f"{DATASET}: {path} has no 'Set Id' column and its name does not say whether it "
                                 "holds the test or the validation set (name it *test*.csv or *val*.csv, or use "
                                 "the merged file)")
            index = {name: i for i, name in enumerate(columns)}
            for line, row in enumerate(csv.reader(f), start=2):
                if not any(cell.strip() for cell in row):
                    continue
                where = f"{path.name}:{line}"
                while len(row) > len(columns) and not row[-1].strip():
                    row = row[:-1]
                if len(row) != len(columns):
                    problems.append(Problem("bad_row", where, f"{len(row)} fields, expected {len(columns)}"))
                    continue
                cell = {name: row[i].strip() for name, i in index.items()}
                name = cell["Image Index"]
                seen.setdefault(name, []).append(where)
                row_problems = []
                labels = []
                for finding in FINDINGS:
                    value = {"YES": 1, "NO": 0}.get(cell[finding].upper())
                    if value is None:
                        row_problems.append(f"{finding}={cell[finding]!r}")
                    labels.append(value)
                set_id = file_set or {"test": "test", "val": "val", "validation": "val"}.get(cell["Set Id"].lower())
                if set_id is None:
                    row_problems.append(f"Set Id={cell['Set Id']!r} (test or val)")
                if not cell["Patient ID"].isdigit():
                    row_problems.append(f"Patient ID={cell['Patient ID']!r}")
                if row_problems:
                    problems.append(Problem("bad_value", name, f"{where}: {', '.join(row_problems)} (findings are "
                                            "YES or NO)"))
                    continue
                records[name] = ExpertRecord(name, int(cell["Patient ID"]), set_id, tuple(labels), where)
    for name, wheres in seen.items():
        if len(wheres) > 1:
            records.pop(name, None)
            problems.append(Problem("duplicate_image", name, f"listed at {', '.join(wheres)}"))
    if problems:
        raise RawDataError(DATASET, problems, hint="correct the label files")
    return dict(sorted(records.items()))


def summary(records: dict[str, ExpertRecord]) -> dict:
    """Counts: images, patients, per set, YES per finding (compare with EXPECTED_COUNTS, the published ones)."""
    return {"images": len(records), "patients": len({r.patient_id for r in records.values()}),
            "sets": dict(sorted(Counter(r.set_id for r in records.values()).items())),
            "yes": {f: sum(r.labels[j] for r in records.values()) for j, f in enumerate(FINDINGS)}}
