"""What each synthetic set contains: its records (labels, sex, age, view, image sizes and modes) and the TB sets'
clinical readings, drawn in the main process from each set's metadata stream (render.metadata_rng), in the real
sets' proportions where they matter (NIH's prevalences scaled up so every label has positives in every split).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.demo.render import TB_SIGN, ChestFactors, metadata_rng, sample_other_disease

# Per-image prevalence, scaled up from the real v2020 ranking so that even Hernia has 9% positives: a 2,000-image
# set then has >= 30 positives per label in test and ~15 in a 10% validation carve, enough for AUROC to mean something.
# Counts are exact per split (see _assign_labels), so the guarantee does not depend on the seed.
NIH_PREVALENCE = {
    "Atelectasis": 0.12, "Cardiomegaly": 0.09, "Effusion": 0.13, "Infiltration": 0.16, "Mass": 0.10,
    "Nodule": 0.10, "Pneumonia": 0.09, "Pneumothorax": 0.10, "Consolidation": 0.09, "Edema": 0.09,
    "Emphysema": 0.09, "Fibrosis": 0.09, "Pleural_Thickening": 0.09, "Hernia": 0.09,
}
NIH_TEST_PATIENT_FRACTION = 0.23  # the real split puts ~23% of images (by patient) in test
NIH_MALE_FRACTION, NIH_AP_FRACTION = 0.56, 0.40
SHENZHEN_TB_FRACTION = 336 / 662
MONTGOMERY_TB_FRACTION = 58 / 138
MONTGOMERY_ASPECT = 4892 / 4020  # real images are 4020x4892 (portrait) or 4892x4020 (landscape)


@dataclasses.dataclass(frozen=True)
class NIHRecord:
    image_index: str
    findings: tuple[str, ...]
    follow_up: int
    patient_id: int
    age: int
    sex: str
    view: str
    test: bool


def _assign_labels(rng: np.random.Generator, num_images: int) -> list[set[str]]:
    """Exactly max(1, round(p * n)) positives per label among n images, independent across labels."""
    labels = [set() for _ in range(num_images)]
    for name in PATHOLOGIES:
        count = min(num_images, max(1, round(NIH_PREVALENCE[name] * num_images)))
        for i in rng.choice(num_images, size=count, replace=False):
            labels[int(i)].add(name)
    return labels


def sample_nih_records(seed: int, num_images: int) -> list[NIHRecord]:
    rng = metadata_rng(seed, "chestxray14")
    follow_ups = []
    while sum(follow_ups) < num_images:
        follow_ups.append(min(int(rng.geometric(0.4)), 12))
    follow_ups[-1] -= sum(follow_ups) - num_images
    num_patients = len(follow_ups)
    num_test = min(max(1, round(NIH_TEST_PATIENT_FRACTION * num_patients)), num_patients - 1)
    test_patients = set((rng.permutation(num_patients)[:num_test] + 1).tolist())

    records = []
    for patient_id, count in enumerate(follow_ups, start=1):
        sex = "M" if rng.random() < NIH_MALE_FRACTION else "F"
        base_age = int(rng.integers(1, 18)) if rng.random() < 0.06 else int(np.clip(rng.normal(50, 16), 18, 93))
        for follow_up in range(count):
            records.append(NIHRecord(
                image_index=f"{patient_id:08d}_{follow_up:03d}.png",
                findings=(),
                follow_up=follow_up,
                patient_id=patient_id,
                age=min(base_age + follow_up // 2, 95),
                sex=sex,
                view="AP" if rng.random() < NIH_AP_FRACTION else "PA",
                test=patient_id in test_patients,
            ))
    # Labels are assigned per split so each split holds an exact, seed-independent number of positives.
    for is_test in (False, True):
        members = [i for i, r in enumerate(records) if r.test == is_test]
        for i, labels in zip(members, _assign_labels(rng, len(members))):
            records[i] = dataclasses.replace(records[i], findings=tuple(sorted(labels)))
    return records


@dataclasses.dataclass(frozen=True)
class TBRecord:
    image_id: str  # e.g. CHNCXR_0001_0
    tb: bool
    sex_male: bool
    age_years: float
    age_text: str  # how the reading writes the age
    shape: tuple[int, int]
    mode: str


def _tb_counts(num_images: int, tb_fraction: float) -> tuple[int, int]:
    num_tb = min(max(1, round(tb_fraction * num_images)), num_images - 1)
    return num_images - num_tb, num_tb


def sample_shenzhen_records(seed: int, num_images: int, size: int) -> list[TBRecord]:
    """Normals first, then TB (as the real numbering); ~5% infants with ages in months; some RGB PNGs.

    First lines vary like the real ones: "male 35yrs", "Female  45yrs", "MALE 60 yr", "male 8month".
    """
    rng = metadata_rng(seed, "shenzhen")
    num_normal, _ = _tb_counts(num_images, SHENZHEN_TB_FRACTION)
    records = []
    for i in range(num_images):
        sex_male = bool(rng.random() < 0.7)
        sex_word = ["male", "female"][not sex_male]
        sex_word = [sex_word, sex_word.capitalize(), sex_word.upper()][int(rng.choice(3, p=[0.8, 0.15, 0.05]))]
        if rng.random() < 0.05:
            months = int(rng.integers(3, 24))
            age_years, number, unit = months / 12.0, months, "month"
        else:
            age_years = float(rng.integers(2, 86))
            number, unit = int(age_years), str(rng.choice(["yrs", "yrs", "yrs", "yr"]))
        gap = " " if rng.random() < 0.8 else "  "
        unit_gap = " " if rng.random() < 0.1 else ""
        shape = (size - int(rng.integers(0, size // 8 + 1)), size - int(rng.integers(0, size // 8 + 1)))
        records.append(TBRecord(
            image_id=f"CHNCXR_{i + 1:04d}_{int(i >= num_normal)}",
            tb=i >= num_normal,
            sex_male=sex_male,
            age_years=age_years,
            age_text=f"{sex_word}{gap}{number}{unit_gap}{unit}",
            shape=shape,
            mode="RGB" if i % 10 == 3 else "L",
        ))
    return records


def sample_montgomery_records(seed: int, num_images: int, size: int) -> list[TBRecord]:
    """Normals first, then TB; every 4th image landscape, every 3rd a 16-bit PNG."""
    rng = metadata_rng(seed, "montgomery")
    num_normal, _ = _tb_counts(num_images, MONTGOMERY_TB_FRACTION)
    long_side = round(size * MONTGOMERY_ASPECT)
    records = []
    for i in range(num_images):
        sex_male = bool(rng.random() < 0.5)
        age = int(rng.integers(5, 90))
        records.append(TBRecord(
            image_id=f"MCUCXR_{i + 1:04d}_{int(i >= num_normal)}",
            tb=i >= num_normal,
            sex_male=sex_male,
            age_years=float(age),
            age_text=f"{age:03d}Y",
            shape=(size, long_side) if i % 4 == 2 else (long_side, size),
            mode="I;16" if i % 3 == 1 else "L",
        ))
    return records


@dataclasses.dataclass(frozen=True)
class HospitalRecord:
    """One image of the synthetic hospital CSV, with the cells as written (blank = unknown)."""

    path: str  # relative to the Hospital folder
    patient_id: str
    tb: bool
    cardiomegaly: bool
    cells: dict  # column -> text, as the CSV holds it
    factors: ChestFactors
    shape: tuple[int, int]
    mode: str  # "L" (PNG) or "JPEG"


HOSPITAL_TB_FRACTION = 0.4
HOSPITAL_CARDIOMEGALY_FRACTION = 0.15


def sample_hospital_records(seed: int, num_images: int, size: int) -> list[HospitalRecord]:
    """A hospital's own labelled set: ~30% of patients with two images (same TB status), TB in ~40% of patients,
    Cardiomegaly in ~15% of images (blank = unknown for ~8%), ages with ~5% blanks, sex as M/F/male/Female (~4%
    blank), view PA/AP/ap (~5% blank), ~30% JPEGs."""
    rng = metadata_rng(seed, "hospital")
    records = []
    patient = 0
    while len(records) < num_images:
        patient += 1
        tb = bool(rng.random() < HOSPITAL_TB_FRACTION)
        sex_male = bool(rng.random() < 0.55)
        sex_text = str(rng.choice(["M", "male", "Male"] if sex_male else ["F", "female", "Female"]))
        sex_text = "" if rng.random() < 0.04 else sex_text
        base_age = int(rng.integers(18, 86))
        for image in range(min(1 + int(rng.random() < 0.3), num_images - len(records))):
            age = base_age + image
            view_ap = bool(rng.random() < 0.25)
            view_text = "" if rng.random() < 0.05 else str(rng.choice(["AP", "ap"])) if view_ap else "PA"
            cardiomegaly = bool(rng.random() < HOSPITAL_CARDIOMEGALY_FRACTION)
            jpeg = bool(rng.random() < 0.3)
            shape = (size, size - int(rng.integers(0, size // 10 + 1)))
            path = f"images/H{patient:04d}_{image}.{'jpg' if jpeg else 'png'}"
            cells = {"path": path, "Tuberculosis": str(int(tb)),
                     "Cardiomegaly": "" if rng.random() < 0.08 else str(int(cardiomegaly)),
                     "patient_id": f"H{patient:04d}", "age": "" if rng.random() < 0.05 else str(age),
                     "sex": sex_text, "view": view_text}
            factors = ChestFactors(frozenset({"Cardiomegaly"}) if cardiomegaly else frozenset(), tb, sex_male,
                                   float(age), view_ap, "hospital")
            records.append(HospitalRecord(path, cells["patient_id"], tb, cardiomegaly, cells, factors, shape,
                                          "JPEG" if jpeg else "L"))
    return records


_DISEASE_WORDS = {"Infiltration": "infiltrate", "Consolidation": "consolidation", "Pneumonia": "pneumonia",
                  "Fibrosis": "basal fibrosis", "Pleural_Thickening": "pleural thickening", "Edema": "pulmonary edema",
                  "Effusion": "pleural effusion"}


TB_SIGN_WORDS = {"Hernia": "a retrocardiac cavity with an air-fluid level"}[TB_SIGN]  # what the image shows


def _other_disease_words(key: Sequence[int]) -> list[str]:
    return [_DISEASE_WORDS[name] for name in sorted(sample_other_disease(key))]


def shenzhen_reading(record: TBRecord, key: Sequence[int]) -> str:
    """The reading names the image's TB sign and other disease (none: "normal")."""
    parts = ([f"PTB with {TB_SIGN_WORDS}"] if record.tb else []) + _other_disease_words(key)
    return f"{record.age_text}\n{', '.join(parts) or 'normal'}\n"


def montgomery_reading(record: TBRecord, key: Sequence[int]) -> str:
    header = f"Patient's Sex: {'M' if record.sex_male else 'F'}\nPatient's Age: {record.age_text}\n"
    other = "".join(f" {words.capitalize()}." for words in _other_disease_words(key))
    if not record.tb:
        return header + (other.strip() or "normal") + "\n"
    return header + f"{TB_SIGN_WORDS.capitalize()}, consistent with TB." + other + "\n"
