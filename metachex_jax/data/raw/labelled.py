"""What the label-table datasets share (CheXpert, PadChest, a CSV of your own): one record type, patient-grouped
splits and folds, the metadata parsers, and the common verify notes. Their readers are chexpert.py, padchest.py
and csv_dataset.py; their builder is builders._LabelledBuilder.

A record's `labels` are in the dataset's own label names (`LabelledRaw.label_names`, stored with the build as
`dataset_info.metadata["label_names"]`), each 1 (present), 0 (absent) or -1 (unknown: masked out of the losses
and metrics). Mapping those names onto the shared label space (NIH's 14 first) is data/input/mixture.py's job.

Splits and folds are assigned to PATIENTS, never to images, so no patient can be in two parts by construction
(`--verify` checks it anyway). `assign_group_split` and `assign_group_folds` are deterministic in (patients,
strata, fractions or k, seed): within each stratum the sorted patient ids are permuted with numpy's
default_rng(seed); the split takes the first round(f * n) patients of each stratum for each part in the order
given (e.g. test, then validation), the rest are train; the folds deal the permuted patients round-robin, each
stratum continuing where the previous one stopped, so fold sizes (in patients) differ by at most one. A patient's
stratum is the stratification label over their images: 1 if any image is positive, else 0 if any is known
negative, else -1 (all unknown).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from metachex_jax.data.raw.common import Problem

UNKNOWN = -1
SPLITS = ("train", "validation", "test")
_REPORT_ONLY = {"label_findings"}  # details too long for --verify's notes (they are in the skip report)


@dataclasses.dataclass(frozen=True)
class LabelledRecord:
    """One image of a label-table dataset, with every field its builder writes."""

    image_id: str  # the image as the table names it (CheXpert Path, PadChest ImageID, the CSV's path)
    path: str  # the file on disk
    patient_id: str  # as written ("" never: images without a patient id are their own patient)
    labels: tuple[int, ...]  # 1 / 0 / -1 (unknown) in the dataset's label_names order
    age: float  # years; 0.0 when unknown
    age_valid: bool
    sex_male: int  # 1 male, 0 female, -1 unknown
    view_ap: int  # 1 AP, 0 PA, -1 unknown or not frontal
    view: str  # the view as written (e.g. "PA", "AP_horizontal", "Lateral")
    declared_bits: int | None = None  # bit depth from the dataset's metadata (PadChest's BitsStored_DICOM)
    fold: int = -1  # cross-validation fold (the CSV dataset), -1 when the dataset has none
    split: str = ""


@dataclasses.dataclass
class LabelledRaw:
    """A parsed raw copy: records with their split, and everything the build report and --verify need."""

    dataset: str
    root: Path
    label_names: tuple[str, ...]
    records: list[LabelledRecord]  # sorted by image_id; problem rows left out
    problems: list[Problem]  # every problem found (the offending items are not in `records`)
    flags: dict[str, list[str]]  # kept, with a value marked unknown: flag -> image ids
    details: dict  # dataset-specific facts for the report (unmapped findings, excluded views, ...)

    def split(self, name: str) -> list[LabelledRecord]:
        return [r for r in self.records if r.split == name]

    @property
    def splits(self) -> dict[str, list[LabelledRecord]]:
        return {name: self.split(name) for name in SPLITS}


def patient_key(patient_id: str) -> int:
    """A stable non-negative int64 for a patient id of any form (the pipeline groups bootstrap resamples by it)."""
    return int.from_bytes(hashlib.sha256(patient_id.encode()).digest()[:8], "big") >> 1


def patient_strata(records: Iterable[tuple[str, int]]) -> dict[str, int]:
    """(patient, label of one image: 1/0/-1) pairs -> patient -> stratum (see the module docstring)."""
    strata: dict[str, int] = {}
    for patient, label in records:
        strata[patient] = max(strata.get(patient, UNKNOWN), label)
    return strata


def assign_group_split(strata: Mapping[str, int], fractions: Mapping[str, float], seed: int) -> dict[str, str]:
    """patient -> part: per stratum, the first round(f * n) permuted patients go to each part of `fractions` in
    its order; the rest to "train". A part with f > 0 that rounding left empty gets the next training patient of
    the stratum with the most (so a small dataset still has every part when it can). Deterministic."""
    if sum(fractions.values()) >= 1.0 or any(f < 0 for f in fractions.values()):
        raise ValueError(f"split fractions {dict(fractions)} must be >= 0 and leave a training part")
    rng = np.random.default_rng(seed)
    split, remaining = {}, {}
    for stratum in sorted(set(strata.values())):
        members = sorted(p for p, s in strata.items() if s == stratum)
        order = [members[i] for i in rng.permutation(len(members))]
        start = 0
        for part, fraction in fractions.items():
            n = int(round(fraction * len(members)))
            split.update({p: part for p in order[start:start + n]})
            start += n
        remaining[stratum] = order[start:]
    for part, fraction in fractions.items():
        if fraction > 0 and part not in split.values():
            stratum = max(remaining, key=lambda s: (len(remaining[s]), -s), default=None)
            if stratum is not None and len(remaining[stratum]) > 1:
                split[remaining[stratum].pop(0)] = part
    for order in remaining.values():
        split.update({p: "train" for p in order})
    return split


def assign_group_folds(strata: Mapping[str, int], num_folds: int, seed: int) -> dict[str, int]:
    """patient -> fold in 0..num_folds-1, stratified, deterministic (module docstring)."""
    if num_folds < 2:
        raise ValueError(f"need at least 2 folds, got {num_folds}")
    rng = np.random.default_rng(seed)
    folds, offset = {}, 0
    for stratum in sorted(set(strata.values())):
        members = sorted(p for p, s in strata.items() if s == stratum)
        for position, index in enumerate(rng.permutation(len(members))):
            folds[members[index]] = (offset + position) % num_folds
        offset += len(members)
    return folds


def parse_sex(text: str) -> int | None:
    """M / F / male / female (any case, surrounding spaces) -> 1 / 0; anything else None."""
    return {"m": 1, "male": 1, "f": 0, "female": 0}.get(text.strip().lower())


def parse_view(text: str) -> int | None:
    """PA / AP (any case) -> 0 / 1; anything else None."""
    return {"pa": 0, "ap": 1}.get(text.strip().lower())


def label_counts(records: Sequence[LabelledRecord], label_names: Sequence[str]) -> dict[str, dict[str, int]]:
    """label -> {"positive", "negative", "unknown"} image counts."""
    values = np.array([r.labels for r in records], np.int64).reshape(len(records), len(label_names))
    return {name: {"positive": int((values[:, j] == 1).sum()), "negative": int((values[:, j] == 0).sum()),
                   "unknown": int((values[:, j] == UNKNOWN).sum())} for j, name in enumerate(label_names)}


def split_notes_and_problems(raw: LabelledRaw) -> tuple[list[str], list[Problem]]:
    """The verify notes every label-table dataset shares (split sizes, patient-disjointness, labels, flags) and
    a problem for any patient in two parts (impossible by construction; checked anyway)."""
    notes, problems = [], []
    patients = {name: {r.patient_id for r in records} for name, records in raw.splits.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        for patient in sorted(patients[a] & patients[b]):
            problems.append(Problem("patient_overlap", f"patient {patient}", f"in both {a} and {b}"))
    notes.append("split sizes (images / patients): " + ", ".join(
        f"{s} {len(rs):,} / {len(patients[s]):,}" for s, rs in raw.splits.items())
        + ("; patient-disjoint" if not problems else "; NOT patient-disjoint"))
    counts = label_counts(raw.records, raw.label_names)
    notes.append("labels (positive / negative / unknown): " + ", ".join(
        f"{name} {c['positive']:,}/{c['negative']:,}/{c['unknown']:,}" for name, c in counts.items()))
    notes += [f"flagged {flag}: {len(ids)}" + (f" (e.g. {', '.join(ids[:5])})" if ids else "")
              for flag, ids in raw.flags.items()]
    notes += [f"{key}: {value}" for key, value in raw.details.items() if key not in _REPORT_ONLY]
    return notes, problems


