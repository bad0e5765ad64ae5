"""What the raw-data readers (nih.py, tb.py) share: problem records, the all-at-once error, the verify result and
count comparison, age parsing.

Files that are not part of any dataset (`not_dataset_file`: macOS AppleDouble `._*` files and `__MACOSX/`,
other hidden files, Windows thumbnail databases) are left out by every reader and counted in its report; they are
never problems, so a copy made on a Mac or browsed on Windows builds as it is.

Policy (the same for every dataset): a reader never stops at the first bad row. It collects every `Problem`
(kind, item, detail), then either raises ONE `RawDataError` listing all of them, or, when the caller passed
`skip_bad=True`, drops the offending items and returns the problems as the skip report. Soft issues that keep the
item (an implausible or unparseable age, an unknown sex in a TB reading) are `flags`: counted and reported, never
errors, and the value is marked invalid rather than guessed.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePath
from typing import TextIO

from metachex_jax.core.errors import UserError
from metachex_jax.core.labels import PLAUSIBLE_AGE_YEARS


@dataclasses.dataclass(frozen=True, order=True)
class Problem:
    """One offending raw item. `item` names it (image name, file path or "file:line"); `kind` is machine-readable."""

    kind: str
    item: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


class RawDataError(UserError, ValueError):
    """The raw copy has problems; `.problems` lists every one, the message names every offending item."""

    def __init__(self, dataset: str, problems: Iterable[Problem], hint: str = "pass skip_bad=True (--skip_bad)"):
        self.problems = sorted(problems)
        counts = Counter(p.kind for p in self.problems)
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        lines = [f"{dataset}: {len(self.problems)} problem(s) in the raw data ({summary}):"]
        lines += [f"  [{p.kind}] {p.item}: {p.detail}" for p in self.problems]
        lines.append(f"Fix the raw copy, or {hint} to drop exactly these items and record them in the skip report.")
        super().__init__("\n".join(lines))


THUMBNAIL_DATABASES = ("thumbs.db", "ehthumbs.db", "ehthumbs_vista.db")


def not_dataset_file(relative_path: str | PurePath) -> str | None:
    """Why a file below a raw copy is no part of the dataset, or None (it may be one).

    "appledouble": a macOS resource fork (`._NAME`, or anything below `__MACOSX/`), written next to every file
    when a copy passes through a non-Mac file system or a zip; "hidden": any other name starting with "." or
    below a hidden folder (.DS_Store, .Trash-1000/, editor swap files); "thumbnail_database": Windows Thumbs.db.
    """
    parts = PurePath(relative_path).parts
    if parts[-1].startswith("._") or "__MACOSX" in parts:
        return "appledouble"
    if any(part.startswith(".") and part not in (".", "..") for part in parts):
        return "hidden"
    if parts[-1].lower() in THUMBNAIL_DATABASES:
        return "thumbnail_database"
    return None


def summarize_ignored(ignored: dict[str, list[str]], examples: int = 3) -> str:
    """"2 appledouble (e.g. images/._x.png), 1 hidden (.DS_Store)" for a reader's ignored files; "" if none."""
    return ", ".join(f"{len(paths)} {kind} (e.g. {', '.join(paths[:examples])})"
                     for kind, paths in sorted(ignored.items()) if paths)


@dataclasses.dataclass
class RawCheck:
    """What a reader's `verify` hook finds in a raw copy (data/build/build.py: verify_raw adds the image decode
    check)."""

    root: Path  # the dataset's folder found under manual_dir
    problems: list[Problem]
    notes: list[str]  # counts, split sizes, prevalence, flags: informational
    image_paths: dict[str, str]  # item name -> image file, for every record that would be built


def compare_counts(found: dict[str, int], expected: dict[str, int], strict: bool) -> tuple[list[str], list[Problem]]:
    """(notes, problems) comparing a copy's counts with the published ones.

    A copy is judged only informationally against the published counts (a subset or a synthetic copy is
    legitimate), except for a count ABOVE the published one, or any difference when `strict` (the copy is said to
    be complete).
    """
    notes, problems = [], []
    for key, want in expected.items():
        have = found[key]
        if have == want:
            notes.append(f"{key}: {have:,} (as published)")
            continue
        text = f"{key}: {want:,} expected, {have:,} found"
        if have > want or strict:
            problems.append(Problem("count_mismatch", key, text + (" (more than the published dataset)"
                                                                   if have > want else " (--strict_counts)")))
        else:
            notes.append(text + " (a subset or synthetic copy; not an error)")
    return notes, problems


def open_text(path: str | os.PathLike) -> TextIO:
    """A CSV file for reading, gzip-compressed (`.gz`) or not; UTF-8, a byte-order mark ignored."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="", encoding="utf-8-sig")
    return open(path, newline="", encoding="utf-8-sig")


def find_file(folder: str | os.PathLike, names: Sequence[str]) -> Path | None:
    """The first of `names` (e.g. a `.csv.gz` and its unpacked `.csv`) that is a file in `folder`, or None."""
    return next((Path(folder) / name for name in names if (Path(folder) / name).is_file()), None)


def read_table(path: str | os.PathLike, required: Sequence[str], dataset: str,
               ) -> tuple[list[str], list[tuple[str, dict[str, str]]], list[Problem]]:
    """(header, [(where "file:line", {column: stripped cell})], bad_row problems) of a CSV (`.gz` or not).

    Columns are found by NAME (third-party copies disagree on their order); a missing required column is a
    ValueError naming it and the header. Blank lines are skipped; a row with another number of fields than the
    header is a `bad_row` problem (and left out)."""
    path = Path(path)
    with open_text(path) as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        missing = [name for name in required if name not in header]
        if missing:
            raise ValueError(f"{dataset}: {path} lacks column(s) {missing}; its header: {header}")
        rows, problems = [], []
        for line, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path.name}:{line}"
            if len(row) != len(header):
                problems.append(Problem("bad_row", where, f"{len(row)} fields, the header has {len(header)}"))
                continue
            rows.append((where, {name: cell.strip() for name, cell in zip(header, row)}))
    return header, rows, problems


def raise_or_skip(dataset: str, problems: list[Problem], skip_bad: bool) -> list[Problem]:
    """Raise RawDataError unless skip_bad; return the (sorted) problems that were skipped."""
    if problems and not skip_bad:
        raise RawDataError(dataset, problems)
    return sorted(problems)


_AGE_UNITS_IN_YEARS = {
    "y": 1.0, "yr": 1.0, "yrs": 1.0, "year": 1.0, "years": 1.0,
    "m": 1 / 12, "mo": 1 / 12, "mos": 1 / 12, "mon": 1 / 12, "month": 1 / 12, "months": 1 / 12, "mth": 1 / 12,
    "mths": 1 / 12,
    "w": 7 / 365.25, "wk": 7 / 365.25, "wks": 7 / 365.25, "week": 7 / 365.25, "weeks": 7 / 365.25,
    "d": 1 / 365.25, "day": 1 / 365.25, "days": 1 / 365.25,
}
_AGE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]*)\.?$")


def parse_age_years(text: str, *, bare_number_unit: str | None = None) -> float | None:
    """Age text -> years, or None when it cannot be parsed.

    Accepts "35", "035Y", "35yrs", "35 years", "8 months", "10days", "3wks" (case-insensitive). A bare number is
    only accepted when the source defines its unit (`bare_number_unit="y"` for the NIH CSV's "Patient Age");
    elsewhere it is unparseable, not guessed.
    """
    match = _AGE_RE.match(text.strip().lower())
    if not match:
        return None
    number, unit = match.groups()
    unit = unit or bare_number_unit
    if unit not in _AGE_UNITS_IN_YEARS:
        return None
    years = float(number) * _AGE_UNITS_IN_YEARS[unit]
    return years if math.isfinite(years) else None


def is_plausible_age(years: float | None) -> bool:
    low, high = PLAUSIBLE_AGE_YEARS
    return years is not None and low <= years <= high
