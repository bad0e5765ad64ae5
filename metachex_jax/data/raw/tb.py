"""Shenzhen and Montgomery TB sets: read the raw folders into records with folds and a default split.

Layouts (the NLM releases; the docs' Data page shows them): `ChinaSet_AllFiles/CXR_png/CHNCXR_NNNN_L.png` and
`MontgomerySet/CXR_png/MCUCXR_NNNN_L.png`, L = 0 normal / 1 TB, each with `ClinicalReadings/<same stem>.txt`.
`manual_dir` is the set's folder or its parent.

Clinical readings, parsed leniently and never guessed (forms seen in the real sets are in the tests):
- Shenzhen: first line is sex and age in any case/spacing ("male 35yrs", "male35yrs", "female  45yrs",
  "femal 32yrs" (sic), "male 16month", "Male, 8 months", "female 10days"); the rest is the reading.
- Montgomery: lines `Patient's Sex: M|F` (trailing spaces happen) and `Patient's Age: 035Y` (also M/W/D units);
  the other lines are the reading.
Sex that is not male/female gives sex_male=-1; an age without a recognised unit or outside
labels.PLAUSIBLE_AGE_YEARS gives age_valid=False (age 0.0 when unparseable). A missing readings file gives both.
A normal (label 0) image whose reading names TB without negating it ("old healed TB in the right apex",
"calcified granuloma; old tuberculosis") is real and legitimate (healed or inactive TB is read as normal for
screening) and gets the flag `tb_mention_in_normal`, its reading text kept in `TbRaw.flag_details` (and in the
build's skip report). Negations before or after the word are understood ("no evidence of active TB", "negative
for tuberculosis", "TB is not seen", "tuberculosis: negative"); "TB cannot be excluded" is not a negation.
These are FLAGS: counted and reported (`TbRaw.flags`), the image is kept.

PROBLEMS (an error naming every item unless skip_bad, then dropped and reported; see raw_common):
  bad_file_name        a PNG in CXR_png that does not match <PREFIX>_NNNN_L.png
  duplicate_image_id   two files with the same NNNN (different labels)
  label_disagreement   the reading contradicts the file-name label: label 1 (TB) with a reading that is just
                       "normal". Decision: an error, because one of the two is wrong and a silently mislabelled
                       TB image corrupts a 138/662-image evaluation; --skip_bad drops the image and records it.
                       TB readings that do not name TB ("right upper pneumonia") are not judged.
  reading_without_image a readings file with no image (a copy that lost images)
Files that are no part of the set (AppleDouble `._*`, hidden files, Thumbs.db: raw_common.not_dataset_file) are
left out and counted in `TbRaw.ignored_files`, never problems.

Folds: stratified by tb, deterministic. Within each class the ids (sorted) are permuted with
default_rng(seed); class 0 takes fold i % k for its i-th id, class 1 continues the count (offset n0), so every fold
gets floor/ceil of each class and the fold sizes differ by at most one.

Default split (fixed, documented): per class, permuted with default_rng(seed + 1): the first round(0.2 n) ids are
`test`, the next round(0.1 n) are `validation`, the rest (about 70%) are `train`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from metachex_jax.data.raw.common import (Problem, RawCheck, compare_counts, is_plausible_age, not_dataset_file,
                                          parse_age_years, raise_or_skip, summarize_ignored)


@dataclasses.dataclass(frozen=True)
class TbSource:
    name: str  # the tfds builder name
    folder: str  # the set's top folder
    prefix: str  # image id prefix
    expected_counts: dict  # the release's published counts


SHENZHEN = TbSource("shenzhen", "ChinaSet_AllFiles", "CHNCXR", {"images": 662, "normal": 326, "tb": 336})
MONTGOMERY = TbSource("montgomery", "MontgomerySet", "MCUCXR", {"images": 138, "normal": 80, "tb": 58})
SOURCES = {s.name: s for s in (SHENZHEN, MONTGOMERY)}

SPLIT_FRACTIONS = {"test": 0.2, "validation": 0.1}  # the rest is train
DEFAULT_NUM_FOLDS = 10

_TB_WORDS = re.compile(r"\b(tb|ptb|stb|tuberculosis|tuberculous|tuberculoma)\b", re.IGNORECASE)
# A negation anywhere before the TB word in its clause ("no evidence of active TB") ...
_NEGATION_BEFORE = re.compile(r"\b(no|not|without|negative|free of|rule out|ruled out|r/o)\b", re.IGNORECASE)
# ... or right after it ("TB is not seen", "tuberculosis: negative"); "not excluded" is deliberately absent.
_NEGATION_AFTER = re.compile(
    r"^\W*(?:(?:is|are|was|were|has been|have been)\s+)?(?:not\s+(?:seen|present|detected|found|identified|"
    r"evident|visible|noted|shown|demonstrated|suggested|suspected)|negative|absent|excluded|ruled out)\b",
    re.IGNORECASE)
_CLAUSE_BREAK = re.compile(r"[.,;\n]")
_SEX_WORD = re.compile(r"\b(female?|male)", re.IGNORECASE)  # "male35yrs" and "femal 32yrs" happen
_SHENZHEN_AGE = re.compile(r"(\d+(?:\.\d+)?\s*[a-z]*)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class TbRecord:
    """One image with the fields the shenzhen/montgomery builders write (their features: data/build/builders.py)."""

    image_id: str  # e.g. "CHNCXR_0001_0"
    path: str
    tb: int
    sex_male: int  # 1 male, 0 female, -1 unknown
    age: float  # years; 0.0 when unparseable
    age_valid: bool
    reading: str
    fold: int = -1
    split: str = ""


@dataclasses.dataclass
class TbRaw:
    source: TbSource
    root: Path
    records: list[TbRecord]  # sorted by image_id, fold and split assigned
    problems: list[Problem]
    flags: dict[str, list[str]]  # kind -> image ids: unknown_sex, invalid_age, missing_reading, tb_mention_in_normal
    flag_details: dict[str, dict[str, str]]  # kind -> {image id: reading text} (tb_mention_in_normal)
    num_folds: int
    images_on_disk: int
    ignored_files: dict[str, list[str]]  # not_dataset_file kind -> paths relative to root

    def split(self, name: str) -> list[TbRecord]:
        return [r for r in self.records if r.split == name]


def find_tb_root(manual_dir: str | os.PathLike, source: TbSource) -> Path:
    """The set's folder (the one holding CXR_png): manual_dir itself, manual_dir/<folder>, or one level deeper."""
    manual_dir = Path(manual_dir)
    for candidate in (manual_dir, manual_dir / source.folder, *sorted(manual_dir.glob(f"*/{source.folder}"))):
        if (candidate / "CXR_png").is_dir():
            return candidate
    raise FileNotFoundError(f"{source.name}: no {source.folder}/CXR_png in or below {manual_dir}")


def parse_shenzhen_reading(text: str) -> tuple[int, float | None, str]:
    """Shenzhen readings text -> (sex_male or -1, age years or None, reading)."""
    lines = text.lstrip("\ufeff").rstrip().splitlines()  # the first line is sex/age even when it is empty
    first = lines[0] if lines else ""
    sex_match = _SEX_WORD.search(first)
    sex_male = -1 if not sex_match else int(sex_match.group(1).lower() == "male")  # "femal(e)" -> 0
    after_sex = first[sex_match.end():] if sex_match else first
    age_match = _SHENZHEN_AGE.search(after_sex)
    age = parse_age_years(age_match.group(1)) if age_match else None
    return sex_male, age, "\n".join(line.strip() for line in lines[1:] if line.strip())


def parse_montgomery_reading(text: str) -> tuple[int, float | None, str]:
    """Montgomery readings text -> (sex_male or -1, age years or None, reading)."""
    sex_male, age, reading = -1, None, []
    for line in text.strip().splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower().replace("\u2019", "'")
        if key == "patient's sex":
            sex_male = {"m": 1, "male": 1, "f": 0, "female": 0}.get(value.strip().lower(), -1)
        elif key == "patient's age":
            age = parse_age_years(value)
        elif line.strip():
            reading.append(line.strip())
    return sex_male, age, "\n".join(reading)


def mentions_tb(reading: str) -> bool:
    """True when some clause (split at . , ; and line ends) names TB without negating it.

    A mention is negated by a negation earlier in its clause ("no evidence of active TB") or right after the
    word ("TB is not seen", "tuberculosis: negative").
    """
    for clause in _CLAUSE_BREAK.split(reading):
        for word in _TB_WORDS.finditer(clause):
            negated = _NEGATION_BEFORE.search(clause[:word.start()]) or _NEGATION_AFTER.match(clause[word.end():])
            if not negated:
                return True
    return False


def reading_contradicts_label(reading: str, tb: int) -> bool:
    """True only for a TB-labelled image whose reading says just "normal" (any case, trailing full stop).

    A normal image whose reading names TB is legitimate (old or healed TB; see `mentions_tb`): a flag, not a
    contradiction.
    """
    return tb == 1 and re.sub(r"[\s.]+", " ", reading).strip().lower() == "normal"


def assign_folds(ids: list[str], labels: list[int], num_folds: int, seed: int) -> dict[str, int]:
    """Stratified, deterministic fold per id (see module docstring)."""
    if num_folds < 2:
        raise ValueError(f"need at least 2 folds, got {num_folds}")
    rng = np.random.default_rng(seed)
    folds, offset = {}, 0
    for label in sorted(set(labels)):
        members = sorted(i for i, lab in zip(ids, labels) if lab == label)
        for position, index in enumerate(rng.permutation(len(members))):
            folds[members[index]] = (offset + position) % num_folds
        offset += len(members)
    return folds


def assign_default_split(ids: list[str], labels: list[int], seed: int) -> dict[str, str]:
    """Stratified train/validation/test per id with SPLIT_FRACTIONS (see module docstring)."""
    rng = np.random.default_rng(seed + 1)
    split = {}
    for label in sorted(set(labels)):
        members = sorted(i for i, lab in zip(ids, labels) if lab == label)
        n_test = int(round(SPLIT_FRACTIONS["test"] * len(members)))
        n_val = int(round(SPLIT_FRACTIONS["validation"] * len(members)))
        for position, index in enumerate(rng.permutation(len(members))):
            if position < n_test:
                split[members[index]] = "test"
            else:
                split[members[index]] = "validation" if position < n_test + n_val else "train"
    return split


def collect_tb(manual_dir: str | os.PathLike, dataset: str, *, num_folds: int = DEFAULT_NUM_FOLDS,
               seed: int = 0) -> TbRaw:
    """Parse a TB set, collecting every problem and flag; offending images are left out of `records`."""
    source = SOURCES[dataset]
    root = find_tb_root(manual_dir, source)
    name_re = re.compile(rf"^{source.prefix}_(\d{{4}})_([01])\.png$")
    parse_reading = parse_shenzhen_reading if source is SHENZHEN else parse_montgomery_reading
    readings_dir = root / "ClinicalReadings"
    problems: list[Problem] = []
    flags: dict[str, list[str]] = {"unknown_sex": [], "invalid_age": [], "missing_reading": [],
                                   "tb_mention_in_normal": []}
    flag_details: dict[str, dict[str, str]] = {"tb_mention_in_normal": {}}

    ignored: dict[str, list[str]] = {}

    def dataset_files(folder: str, suffix: str) -> list[Path]:
        found = []
        for path in sorted((root / folder).iterdir()) if (root / folder).is_dir() else []:
            kind = not_dataset_file(path.relative_to(root))
            if kind and path.is_file():
                ignored.setdefault(kind, []).append(str(path.relative_to(root)))
            elif path.is_file() and path.suffix.lower() == suffix:
                found.append(path)
        return found

    pngs = dataset_files("CXR_png", ".png")
    by_number: dict[str, list[Path]] = {}
    for path in pngs:
        match = name_re.match(path.name)
        if not match:
            problems.append(Problem("bad_file_name", f"CXR_png/{path.name}",
                                    f"expected {source.prefix}_NNNN_L.png with L = 0 or 1"))
        else:
            by_number.setdefault(match.group(1), []).append(path)

    records = []
    for number, paths in sorted(by_number.items()):
        if len(paths) > 1:
            problems += [Problem("duplicate_image_id", p.stem, f"image number {number} appears as "
                                 + ", ".join(q.name for q in paths)) for p in paths]
            continue
        path = paths[0]
        tb = int(path.stem[-1])
        reading_path = readings_dir / f"{path.stem}.txt"
        if reading_path.is_file():
            sex_male, age, reading = parse_reading(reading_path.read_text(encoding="utf-8", errors="replace"))
        else:
            sex_male, age, reading = -1, None, ""
            flags["missing_reading"].append(path.stem)
        if reading_contradicts_label(reading, tb):
            problems.append(Problem("label_disagreement", path.stem,
                                    f"file name says {'TB' if tb else 'normal'} but the reading is {reading!r}"))
            continue
        if tb == 0 and mentions_tb(reading):
            flags["tb_mention_in_normal"].append(path.stem)
            flag_details["tb_mention_in_normal"][path.stem] = reading
        if sex_male < 0:
            flags["unknown_sex"].append(path.stem)
        age_valid = is_plausible_age(age)
        if not age_valid:
            flags["invalid_age"].append(path.stem)
        records.append(TbRecord(image_id=path.stem, path=str(path), tb=tb, sex_male=sex_male,
                                age=float(age) if age is not None else 0.0, age_valid=age_valid, reading=reading))

    image_stems = {p.stem for p in pngs}
    if readings_dir.is_dir():
        for txt in dataset_files("ClinicalReadings", ".txt"):
            if txt.stem not in image_stems:
                problems.append(Problem("reading_without_image", f"ClinicalReadings/{txt.name}",
                                        "no matching image in CXR_png"))

    ids, labels = [r.image_id for r in records], [r.tb for r in records]
    folds = assign_folds(ids, labels, num_folds, seed) if records else {}
    splits = assign_default_split(ids, labels, seed)
    records = [dataclasses.replace(r, fold=folds[r.image_id], split=splits[r.image_id]) for r in records]
    return TbRaw(source=source, root=root, records=records, problems=sorted(problems), flags=flags,
                 flag_details=flag_details, num_folds=num_folds, images_on_disk=len(pngs), ignored_files=ignored)


def load_tb(manual_dir: str | os.PathLike, dataset: str, *, num_folds: int = DEFAULT_NUM_FOLDS, seed: int = 0,
            skip_bad: bool = False) -> TbRaw:
    """`collect_tb`, then raise one RawDataError naming every problem unless skip_bad."""
    raw = collect_tb(manual_dir, dataset, num_folds=num_folds, seed=seed)
    raise_or_skip(dataset, raw.problems, skip_bad)
    return raw


def verify(manual_dir: str | os.PathLike, dataset: str, *, num_folds: int = DEFAULT_NUM_FOLDS, seed: int = 0,
           strict_counts: bool = False) -> RawCheck:
    """The registry's verify hook: every reader problem, counts against the published ones, the default split,
    fold sizes and flags (`python -m metachex_jax.prepare --verify`)."""
    raw = collect_tb(manual_dir, dataset, num_folds=num_folds, seed=seed)
    problems, notes = list(raw.problems), []
    labels = Counter(r.tb for r in raw.records)
    found = {"images": raw.images_on_disk, "normal": labels[0], "tb": labels[1]}
    count_notes, count_problems = compare_counts(found, raw.source.expected_counts, strict_counts)
    notes += count_notes
    problems += count_problems
    notes.append("default split: " + ", ".join(
        f"{s} {len(raw.split(s))} ({sum(r.tb for r in raw.split(s))} TB)" for s in ("train", "validation", "test")))
    fold_sizes = Counter(r.fold for r in raw.records)
    notes.append(f"{raw.num_folds} folds, sizes {[fold_sizes[f] for f in range(raw.num_folds)]}")
    notes += [f"flagged {flag}: {len(ids)}" + (f" ({', '.join(ids[:5])})" if ids else "")
              for flag, ids in raw.flags.items()]
    notes += [f"  {flag} {item}: {detail!r}" for flag, details in raw.flag_details.items()
              for item, detail in details.items()]
    if raw.ignored_files:
        notes.append(f"ignored, not images of the dataset: {summarize_ignored(raw.ignored_files)}")
    if raw.source is MONTGOMERY:
        for side in ("leftMask", "rightMask"):
            masks = len(list((raw.root / "ManualMask" / side).glob("*.png")))
            notes.append(f"ManualMask/{side}: {masks} masks (not used for training; 138 published)")
    return RawCheck(root=raw.root, problems=problems, notes=notes,
                    image_paths={r.image_id: r.path for r in raw.records})
