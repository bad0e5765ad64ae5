"""MIMIC-CXR-JPG (2.0.0, 2.1.0) and MIMIC-CXR (DICOM, 2.0.0, 2.1.0): the release's CSVs -> labelled records.

Layout (`--manual_dir` is the release folder, holding `files/`):

    files/p10/p10000032/s50414267/<dicom_id>.jpg   (MIMIC-CXR-JPG; the DICOM release: the same tree, .dcm)
    mimic-cxr-2.0.0-metadata.csv.gz   one row per image: dicom_id, subject_id, study_id, ViewPosition, StudyDate, ...
    mimic-cxr-2.0.0-split.csv.gz      one row per image: dicom_id, study_id, subject_id, split (train/validate/test)
    mimic-cxr-2.0.0-chexpert.csv.gz   one row per STUDY: subject_id, study_id, the 14 CheXpert observations
    mimic-cxr-2.0.0-negbio.csv.gz     the same, labelled by NegBio (`labeler="negbio"`)

The image of a metadata row is `files/p<first 2 digits of subject_id>/p<subject_id>/s<study_id>/<dicom_id>` with
`.jpg` (the JPG release) or `.dcm` (the DICOM release, which ships none of these CSVs: `csv_dir` names the folder
holding the JPG release's CSVs, which are keyed by dicom_id; the images are the same). A CSV may be the `.csv.gz`
of the release or its unpacked `.csv`. Columns are found by name.

- Labels: the labeller file's row of the image's STUDY (subject_id, study_id), applied to every image of the study.
  Values 1.0, 0.0, -1.0 (uncertain) or blank (not mentioned: negative, as CheXpert's reader reads it); uncertain
  follows CheXpert's policies (chexpert.parse_uncertainty: `ignore` masks it, the default; `ones`; `zeros`; per
  label). A study without a row (the labeller could not label it) keeps its images with EVERY label unknown
  (masked; flag no_label_row; counted by study and image in the report). The label names are CheXpert's 14, in
  chexpert.OBSERVATIONS order; onto NIH's 14 they map as CheXpert's do (core/labels.py: LABEL_ALIASES).
- Views: ViewPosition PA (view_ap 0) and AP (view_ap 1) are frontal. `views="frontal"` (the default) keeps them
  only; AP AXIAL, AP LLD, AP RLD, PA LLD, PA RLD, LATERAL, LL, LAO, RAO, LPO, SWIMMERS, XTABLE LATERAL, any other
  value and an EMPTY ViewPosition are excluded and counted by value. `views="all"` keeps every image; or a list of
  values separated by `+` (e.g. `PA+AP+LATERAL`, `blank` for the empty one). A kept image that is not PA or AP has
  view_ap unknown.
- Sex and age are not in MIMIC-CXR: they come from MIMIC-IV's `patients.csv.gz` when `patients_csv` names it
  (columns subject_id, gender M/F, anchor_age, anchor_year): age at the study = anchor_age + (study year -
  anchor_year), the study year from StudyDate (YYYYMMDD, dates shifted per patient, as MIMIC-IV's are). The
  anchor_age 91 group means "91 or older": its ages are masked (flag age_91_or_older). A subject absent from the
  file (flag not_in_patients), another gender (flag unknown_sex) or an unreadable StudyDate (flag bad_study_date)
  is masked too. Without the file, sex and age are masked for every image (counted in the report).
- Split: the official split file (`validate` is the validation split); patient-disjoint as published.
Bad rows (one error naming each, or `--skip_bad`): bad_row (fields), bad_id (a subject_id, study_id or dicom_id
that is not one), duplicate_dicom_id, missing_split (an image the split file does not list), split_mismatch (its
study or subject differs there), bad_split (a value other than train/validate/test), missing_image,
unlisted_image (an image below files/ that the metadata does not list), unknown_label_value, duplicate_study_label.

Published counts (verify): 377,110 images of 227,835 studies, 227,827 of them labelled by the CheXpert labeller
(V: the release page); patients 65,379 (paper) or 64,588 (MIMIC-IV's page), so derived, never hard-coded.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

from metachex_jax.data.raw import chexpert, labelled
from metachex_jax.data.raw.common import (Problem, RawCheck, RawDataError, compare_counts, find_file,
                                          is_plausible_age, raise_or_skip, read_table)
from metachex_jax.data.raw.labelled import UNKNOWN, LabelledRaw, LabelledRecord

DATASET = "mimic"
OBSERVATIONS = chexpert.OBSERVATIONS
LABELERS = ("chexpert", "negbio")
FRONTAL = {"PA": 0, "AP": 1}
BLANK_VIEW = "blank"  # how `views` names the empty ViewPosition
SPLITS = {"train": "train", "validate": "validation", "test": "test"}
OLDEST_ANCHOR_AGE = 91  # MIMIC-IV's "91 or older" group
EXTENSIONS = {".jpg": "MIMIC-CXR-JPG", ".dcm": "MIMIC-CXR (DICOM)"}
# The release's published counts (verify compares a copy with them).
EXPECTED_COUNTS = {"images": 377_110, "studies": 227_835}
EXPECTED_LABELLED_STUDIES = {"chexpert": 227_827, "negbio": 227_835}
# Recalled split sizes (images), not verified against the release: printed for comparison only.
RECALLED_SPLIT_IMAGES = {"train": 368_960, "validation": 2_991, "test": 5_159}

# The 2.1.0 radiologist-labelled test file's spellings of CheXpert's observation names.
TEST_FILE_SPELLINGS = {"Lung Opacity": ("Airspace Opacity",), "No Finding": ("No Findings",)}
_PATIENT_COLUMNS = ("subject_id", "gender", "anchor_age", "anchor_year")
_UNCERTAIN_MASKED = chexpert.parse_uncertainty("ignore")  # the radiologists' test labels: -1.0, if any, is unknown
_DICOM_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")


def csv_names(kind: str) -> tuple[str, str]:
    """The release's file name of a CSV (`metadata`, `split`, `chexpert`, `negbio`), gzipped and unpacked."""
    name = f"mimic-cxr-2.0.0-{kind}.csv"
    return name + ".gz", name


def parse_views(text: str) -> frozenset[str] | None:
    """`frontal` -> {PA, AP}; `all` -> None (every view); else the `+`-separated ViewPosition values ("" = blank)."""
    text = text.strip()
    if text == "frontal":
        return frozenset(FRONTAL)
    if text == "all":
        return None
    values = [v.strip().upper() for v in text.split("+")]
    if not text or any(not v for v in values):
        raise ValueError(f"{DATASET}: views={text!r}: write frontal, all, or ViewPosition values separated by '+' "
                         f"(e.g. PA+AP+LATERAL; {BLANK_VIEW} for an empty ViewPosition)")
    return frozenset("" if v == BLANK_VIEW.upper() else v for v in values)


def name_parts(*, views: str, uncertainty: str, labeler: str, csv_dir: str, patients_csv: str) -> list[str]:
    """The config-name parts of these options (after r<R>): views, labeler, uncertainty policy and a fingerprint
    of the patients file when they differ from the defaults (csv_dir changes nothing: the same CSVs)."""
    check_options(views=views, uncertainty=uncertainty, labeler=labeler)
    parts = []
    if views != "frontal":
        parts.append("views-" + re.sub(r"[^a-z0-9]+", "-", views.lower()).strip("-"))
    if labeler != "chexpert":
        parts.append(labeler)
    if chexpert.uncertainty_name(uncertainty):
        parts.append(chexpert.uncertainty_name(uncertainty))
    if patients_csv:
        parts.append("patients-" + hashlib.sha256(Path(patients_csv).expanduser().read_bytes()).hexdigest()[:10])
    return parts


def check_options(*, views: str, uncertainty: str, labeler: str) -> None:
    """ValueError naming a bad option (before any file is read)."""
    parse_views(views)
    chexpert.parse_uncertainty(uncertainty)
    if labeler not in LABELERS:
        raise ValueError(f"{DATASET}: labeler={labeler!r}; choose one of {LABELERS}")


def image_stem(subject_id: str, study_id: str, dicom_id: str) -> str:
    """The image's path below the release folder, without its extension."""
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}"


def study_of(image_id: str) -> str:
    """The study id of a record's image_id (its `s<study_id>` folder): "files/p10/p10000032/s50414267/x.jpg" ->
    "50414267"."""
    return image_id.split("/")[-2][1:]


def _find_csv(kind: str, folders: list[Path]) -> Path:
    for folder in folders:
        found = find_file(folder, csv_names(kind))
        if found:
            return found
    raise FileNotFoundError(f"{DATASET}: no {' or '.join(csv_names(kind))} in {' or '.join(map(str, folders))}. "
                            "The DICOM release (MIMIC-CXR) ships no CSVs: pass --csv_dir=the MIMIC-CXR-JPG folder "
                            "holding them (they are keyed by dicom_id)")


def _study_date_year(text: str) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    date = int(value)
    return date // 10000 if value == date and 10000101 <= date <= 99991231 else None


def read_patients(path: str | os.PathLike) -> tuple[dict[str, tuple[str, int, int]], list[Problem]]:
    """MIMIC-IV patients.csv(.gz) -> subject_id -> (gender, anchor_age, anchor_year), and its bad rows."""
    _, rows, problems = read_table(path, _PATIENT_COLUMNS, DATASET)
    patients = {}
    for where, cell in rows:
        if not (cell["anchor_age"].isdigit() and cell["anchor_year"].isdigit() and cell["subject_id"].isdigit()):
            problems.append(Problem("bad_patient_row", where, f"subject_id {cell['subject_id']!r}, anchor_age "
                                    f"{cell['anchor_age']!r}, anchor_year {cell['anchor_year']!r} (integers)"))
            continue
        patients[cell["subject_id"]] = (cell["gender"], int(cell["anchor_age"]), int(cell["anchor_year"]))
    return patients, problems


def read_study_labels(path: Path, policies: dict[str, str], subject_column: bool = True,
                      ) -> tuple[dict[str, tuple[int, ...]], Counter, list[Problem]]:
    """A labeller file (one row per study) -> study_id -> labels in OBSERVATIONS order (uncertain by `policies`),
    the uncertain values per observation, and the problems (bad values, a study listed twice)."""
    _, rows, problems = read_table(path, (*(("subject_id",) if subject_column else ()), "study_id", *OBSERVATIONS),
                                   DATASET)
    labels, uncertain, seen = {}, Counter(), defaultdict(list)
    for where, cell in rows:
        study = cell["study_id"]
        seen[study].append(where)
        values, bad = chexpert.observation_labels(cell, policies, uncertain)
        if bad or not study.isdigit():
            problems.append(Problem("unknown_label_value", f"study {study}", f"{where}: {', '.join(bad) or 'study_id'}"
                                    " (1.0, 0.0, -1.0 or blank)"))
            continue
        labels[study] = tuple(values)
    for study, wheres in seen.items():
        if len(wheres) > 1:
            labels.pop(study, None)
            problems.append(Problem("duplicate_study_label", f"study {study}", f"rows {', '.join(wheres)}"))
    return labels, uncertain, problems


def collect_mimic(manual_dir: str | os.PathLike, *, views: str = "frontal", uncertainty: str = "ignore",
                  labeler: str = "chexpert", csv_dir: str = "", patients_csv: str = "") -> LabelledRaw:
    """Parse the CSVs and the image tree, collecting every problem and flag (module docstring)."""
    check_options(views=views, uncertainty=uncertainty, labeler=labeler)
    kept_views, policies = parse_views(views), chexpert.parse_uncertainty(uncertainty)
    root = Path(manual_dir)
    if not (root / "files").is_dir():
        raise FileNotFoundError(f"{DATASET}: no files/ folder in {root}; point --manual_dir at the release folder "
                                "(holding files/p10 ... files/p19)")
    folders = [root] + ([Path(csv_dir).expanduser()] if csv_dir else [])
    paths = {kind: _find_csv(kind, folders) for kind in ("metadata", "split", labeler)}
    on_disk = {}  # image path without extension -> extension (one walk, not one stat per row)
    problems: list[Problem] = []
    for folder, _, names in os.walk(root / "files"):
        for name in names:
            stem, extension = os.path.splitext(name)
            if extension.lower() in EXTENSIONS:
                on_disk[os.path.relpath(os.path.join(folder, stem), root)] = extension

    _, split_rows, bad = read_table(paths["split"], ("dicom_id", "study_id", "subject_id", "split"), DATASET)
    problems += bad
    split_of = {cell["dicom_id"]: (cell["subject_id"], cell["study_id"], cell["split"], where)
                for where, cell in split_rows}
    labels_of, uncertain, bad = read_study_labels(paths[labeler], policies)
    problems += bad
    patients, bad = read_patients(patients_csv) if patients_csv else ({}, [])
    problems += bad

    _, rows, bad = read_table(paths["metadata"], ("dicom_id", "subject_id", "study_id", "ViewPosition",
                                                  "StudyDate"), DATASET)
    problems += bad
    flags = {"no_label_row": [], "age_91_or_older": [], "not_in_patients": [], "unknown_sex": [],
             "bad_study_date": []}
    excluded, view_counts, releases = Counter(), Counter(), Counter()
    rows_of: dict[str, list[str]] = defaultdict(list)
    records: dict[str, LabelledRecord] = {}  # dicom_id -> record
    listed, studies, patients_seen, studies_without_row = set(), set(), set(), set()
    for where, cell in rows:
        dicom_id, subject, study = cell["dicom_id"], cell["subject_id"], cell["study_id"]
        rows_of[dicom_id].append(where)
        if not (_DICOM_ID.match(dicom_id) and subject.isdigit() and study.isdigit()):
            problems.append(Problem("bad_id", dicom_id or where, f"{where}: dicom_id {dicom_id!r}, subject_id "
                                    f"{subject!r}, study_id {study!r}"))
            continue
        stem = image_stem(subject, study, dicom_id)
        listed.add(stem)
        row_problems = []
        split = split_of.get(dicom_id)
        if split is None:
            row_problems.append(Problem("missing_split", dicom_id, f"{where}: not in {paths['split'].name}"))
        elif (split[0], split[1]) != (subject, study):
            row_problems.append(Problem("split_mismatch", dicom_id, f"{where}: subject {subject}, study {study}; "
                                        f"{split[3]}: subject {split[0]}, study {split[1]}"))
        elif split[2] not in SPLITS:
            row_problems.append(Problem("bad_split", dicom_id, f"{split[3]}: split {split[2]!r} (train, validate "
                                        "or test)"))
        if stem not in on_disk:
            row_problems.append(Problem("missing_image", dicom_id, f"{where}: {root / stem}.jpg (or .dcm) does not "
                                        "exist"))
        if row_problems:
            problems += row_problems
            continue
        studies.add(study)
        patients_seen.add(subject)
        view = cell["ViewPosition"].strip()
        view_counts[view or "(empty)"] += 1
        if kept_views is not None and view.upper() not in kept_views:
            excluded[view or "(empty)"] += 1
            continue
        image_id = stem + on_disk[stem]
        releases[EXTENSIONS[on_disk[stem].lower()]] += 1
        labels = labels_of.get(study)
        if labels is None:
            flags["no_label_row"].append(image_id)
            studies_without_row.add(study)
            labels = (UNKNOWN,) * len(OBSERVATIONS)
        sex, age = UNKNOWN, None
        if patients_csv:
            sex, age = _sex_and_age(patients.get(subject), cell["StudyDate"], image_id, flags)
        records[dicom_id] = LabelledRecord(
            image_id=image_id, path=str(root / image_id), patient_id=subject, labels=labels,
            age=float(age) if age is not None else 0.0, age_valid=is_plausible_age(age), sex_male=sex,
            view_ap=FRONTAL.get(view.upper(), UNKNOWN), view=view, split=SPLITS[split[2]])
    for dicom_id, wheres in rows_of.items():
        if len(wheres) > 1:
            records.pop(dicom_id, None)
            problems.append(Problem("duplicate_dicom_id", dicom_id, f"rows {', '.join(wheres)}"))
    problems += [Problem("unlisted_image", stem + extension, f"{root / stem}{extension} is not in "
                         f"{paths['metadata'].name}") for stem, extension in sorted(on_disk.items())
                 if stem not in listed]
    kept = sorted(records.values(), key=lambda r: r.image_id)
    kept_ids = {r.image_id for r in kept}
    flags = {flag: sorted(set(ids) & kept_ids) for flag, ids in flags.items()}
    split_counts = Counter(r.split for r in kept)
    details = {
        "release": dict(releases),
        "csv_files": {kind: str(path) for kind, path in paths.items()},
        "labeler": labeler,
        "uncertainty": uncertainty,
        "uncertain_values": dict(uncertain),
        "views": views,
        "view_positions": dict(view_counts.most_common()),
        "excluded_views": dict(excluded.most_common()),
        "metadata_images": len(listed),
        "studies": len(studies),
        "patients": len(patients_seen),
        "labelled_studies": len(studies & set(labels_of)),
        "studies_without_label_row": {"studies": len({study_of(i) for i in flags["no_label_row"]}),
                                      "images": len(flags["no_label_row"])},
        "age_sex_source": (f"MIMIC-IV {patients_csv}" if patients_csv else
                           f"none given (--patients_csv): sex and age masked for all {len(kept):,} images"),
        "counts": {"images per split": {s: split_counts[s] for s in labelled.SPLITS},
                   "studies without a label row (every label masked)": len(studies_without_row),
                   "excluded views": sum(excluded.values())},
    }
    return LabelledRaw(DATASET, root, OBSERVATIONS, kept, sorted(problems), flags, details)


def _sex_and_age(patient, study_date: str, image_id: str, flags: dict) -> tuple[int, float | None]:
    """(sex_male, age or None) of an image from its subject's MIMIC-IV row (module docstring), flagging why a value
    is masked."""
    if patient is None:
        flags["not_in_patients"].append(image_id)
        return UNKNOWN, None
    gender, anchor_age, anchor_year = patient
    sex = {"M": 1, "F": 0}.get(gender, UNKNOWN)
    if sex == UNKNOWN:
        flags["unknown_sex"].append(image_id)
    year = _study_date_year(study_date)
    if anchor_age >= OLDEST_ANCHOR_AGE:
        flags["age_91_or_older"].append(image_id)
        return sex, None
    if year is None:
        flags["bad_study_date"].append(image_id)
        return sex, None
    return sex, float(anchor_age + year - anchor_year)


def load_mimic(manual_dir: str | os.PathLike, *, skip_bad: bool = False, **options) -> LabelledRaw:
    raw = collect_mimic(manual_dir, **options)
    raise_or_skip(DATASET, raw.problems, skip_bad)
    return raw


def verify(manual_dir: str | os.PathLike, *, strict_counts: bool = False, **options) -> RawCheck:
    """The registry's verify hook: bad rows, counts against the published ones, splits, labels, flags."""
    raw = collect_mimic(manual_dir, **options)
    labeler = options.get("labeler", "chexpert")
    found = {"images": raw.details["metadata_images"], "studies": raw.details["studies"],
             "labelled_studies": raw.details["labelled_studies"]}
    expected = {**EXPECTED_COUNTS, "labelled_studies": EXPECTED_LABELLED_STUDIES[labeler]}
    count_notes, count_problems = compare_counts(found, expected, strict_counts)
    count_notes.append(f"patients: {raw.details['patients']:,} (published: 65,379 in the paper, 64,588 on MIMIC-IV's "
                       "page)")
    count_notes.append("images per split (recalled, not verified: " + ", ".join(
        f"{s} {n:,}" for s, n in RECALLED_SPLIT_IMAGES.items()) + "): " + ", ".join(
        f"{s} {n:,}" for s, n in raw.details["counts"]["images per split"].items()))
    notes, split_problems = labelled.split_notes_and_problems(raw)
    return RawCheck(root=raw.root, problems=raw.problems + count_problems + split_problems,
                    notes=count_notes + notes, image_paths={r.image_id: r.path for r in raw.records})


def read_test_labels(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict]:
    """MIMIC-CXR-JPG 2.1.0's radiologist labels of test studies (`mimic-cxr-2.1.0-test-set-labeled.csv`: study_id
    and 14 categories, no subject_id) -> study_id -> labels in OBSERVATIONS order, and what was renamed.

    The file names CheXpert's Lung Opacity `Airspace Opacity`, and its no-finding column is `No Finding` or `No
    Findings` (unverified: both are accepted). Blank is "not mentioned" (negative); -1.0, if any, is unknown.
    Raises one RawDataError naming every bad row."""
    header, rows, problems = read_table(path, ("study_id",), DATASET)
    column = {}  # observation -> the file's column
    for name in OBSERVATIONS:
        column[name] = next((c for c in (name, *TEST_FILE_SPELLINGS.get(name, ())) if c in header), None)
    missing = [name for name, found in column.items() if found is None]
    if missing:
        raise ValueError(f"{DATASET}: {path} lacks column(s) {missing} (also accepted: {TEST_FILE_SPELLINGS}); its "
                         f"header: {header}")
    labels, seen = {}, defaultdict(list)
    for where, cell in rows:
        values, bad = chexpert.observation_labels(cell, _UNCERTAIN_MASKED, Counter(), columns=column)
        seen[cell["study_id"]].append(where)
        if bad or not cell["study_id"].isdigit():
            problems.append(Problem("unknown_label_value", f"study {cell['study_id']}",
                                    f"{where}: {', '.join(bad) or 'study_id'}"))
            continue
        labels[cell["study_id"]] = tuple(values)
    problems += [Problem("duplicate_study_label", f"study {s}", f"rows {', '.join(w)}")
                 for s, w in seen.items() if len(w) > 1]
    if problems:
        raise RawDataError(DATASET, problems, hint="correct the label file")
    return labels, {"columns": {n: c for n, c in column.items() if c != n}, "studies": len(labels)}
