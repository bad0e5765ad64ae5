"""Synthetic demo data in the REAL on-disk layouts: `write_demo_data(DIR, ...)` (`python -m metachex_jax.demo_data`).

The real ChestX-ray14, Shenzhen and Montgomery sets cannot be downloaded here, so the demo, the tests and the
README quick start run on this generator (render.py draws the images, records.py samples the sets). It writes the
real datasets' layouts (see the docs' data pages):

    DIR/ChestX-ray14/images_001/images/PPPPPPPP_FFF.png ...   (mirror layout, split across >= 2 folders)
    DIR/ChestX-ray14/Data_Entry_2017_v2020.csv                 (the real header, unquoted: 11 comma fields)
    DIR/ChestX-ray14/train_val_list.txt, test_list.txt         (patient-disjoint, no newline after the last name)
    DIR/ChestX-ray14/BBox_List_2017.csv                        (the real format: a box per focal finding of the
                                                                test images, for the eight boxed labels)
    DIR/ChinaSet_AllFiles/CXR_png/CHNCXR_NNNN_L.png            (some RGB-mode, sizes not square)
    DIR/ChinaSet_AllFiles/ClinicalReadings/CHNCXR_NNNN_L.txt   ("male 35yrs", varied spacing/case; reading)
    DIR/MontgomerySet/CXR_png/MCUCXR_NNNN_L.png                (portrait/landscape, some 16-bit)
    DIR/MontgomerySet/ClinicalReadings/MCUCXR_NNNN_L.txt       ("Patient's Sex: M", "Patient's Age: 035Y")
    DIR/MontgomerySet/ManualMask/{leftMask,rightMask}/MCUCXR_NNNN_L.png   (from the generator's lung geometry)
    DIR/Hospital/labels.csv, DIR/Hospital/images/H*.png|jpg    ("your own data": the CSV format of
                                                                data/raw/csv_dataset.py; TB and Cardiomegaly
                                                                labels, blanks, several spellings of sex and
                                                                view, JPEGs)
    DIR/README_SYNTHETIC.txt, DIR/demo_data_complete.json      (what this is; the marker, written last)

`write_demo_data` builds the tree in a temporary sibling folder and renames it into place, with the marker file
written last, so an interrupted run never leaves a tree that looks complete. It returns at once when a complete
tree with the same parameters exists, and refuses any other non-empty folder. Images are rendered in spawned
worker processes; the bytes never depend on how many.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

from metachex_jax.core.labels import NO_FINDING
from metachex_jax.demo.records import (HospitalRecord, NIHRecord, TBRecord, montgomery_reading, sample_hospital_records,
                                       sample_montgomery_records, sample_nih_records, sample_shenzhen_records,
                                       shenzhen_reading)
from metachex_jax.demo.render import (BOX_FINDINGS, PLANTED_SIGNALS, ChestFactors, image_key, render_chest,
                                      sample_other_disease)

GENERATOR = "metachex_jax.demo_data"  # the command that writes a tree (its marker records it)
# 3: BBox_List_2017.csv; 4: the Hospital CSV dataset; 5: more nuisance; 6: TB signs, other disease; 7: volume loss
# the one TB sign, the TB sets at the real sizes (662, 138); 8: a cavity (the Hernia painter) the one TB sign;
# 9: the cavity at 60% of the hernia's contrast (NIH-like images unchanged)
GENERATOR_VERSION = 9
MARKER_NAME = "demo_data_complete.json"
README_NAME = "README_SYNTHETIC.txt"
NIH_DIR, SHENZHEN_DIR, MONTGOMERY_DIR, HOSPITAL_DIR = "ChestX-ray14", "ChinaSet_AllFiles", "MontgomerySet", "Hospital"
HOSPITAL_CSV_NAME = "labels.csv"
HOSPITAL_COLUMNS = ("path", "Tuberculosis", "Cardiomegaly", "patient_id", "age", "sex", "view")
NIH_CSV_NAME = "Data_Entry_2017_v2020.csv"
BBOX_CSV_NAME = "BBox_List_2017.csv"
BBOX_CSV_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"  # the real header: 6 fields, 3 of them empty
BBOX_LABEL_SPELLING = {"Infiltration": "Infiltrate"}
# The real header, byte for byte. The bracketed names contain commas and are NOT quoted in the real file, so
# the csv module reads 11 fields: width, height, spacing x and spacing y are separate columns in every row.
NIH_CSV_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
NIH_IMAGES_PER_FOLDER = 1000


@dataclasses.dataclass(frozen=True)
class ImageJob:
    """One PNG to render and write (plus lung masks for Montgomery). Picklable for the process pool."""

    key: tuple[int, ...]
    shape: tuple[int, int]  # (height, width)
    factors: ChestFactors
    path: str  # relative to the tree root
    mode: str = "L"  # "L" 8-bit gray, "RGB" gray in 3 channels, "I;16" 16-bit gray, "JPEG" 8-bit gray JPEG
    mask_paths: tuple[str, str] | None = None  # (leftMask, rightMask)


# ----------------------------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------------------------


def to_png_array(image: np.ndarray, mode: str) -> np.ndarray:
    """float [0, 1] -> the pixel array stored for `mode` (16-bit uses the full 0..65535 range)."""
    if mode == "I;16":
        return np.round(image * 65535.0).astype(np.uint16)
    gray = np.round(image * 255.0).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1) if mode == "RGB" else gray


def _save_png(array: np.ndarray, path: str) -> None:
    Image.fromarray(array).save(path, format="PNG")


def _render_and_write(job: ImageJob, root: str) -> dict:
    """Render and write one image; returns its boxes."""
    rendered = render_chest(job.key, job.shape, job.factors)
    if job.mode == "JPEG":
        Image.fromarray(to_png_array(rendered["image"], "L")).save(os.path.join(root, job.path), format="JPEG",
                                                                    quality=92)
    else:
        _save_png(to_png_array(rendered["image"], job.mode), os.path.join(root, job.path))
    if job.mask_paths:
        for mask, path in zip((rendered["left_lung"], rendered["right_lung"]), job.mask_paths):
            _save_png(mask.astype(np.uint8) * 255, os.path.join(root, path))
    return rendered["boxes"]


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def _nih_files(root: str, seed: int, num_images: int, size: int) -> tuple[list[ImageJob], dict, list[NIHRecord]]:
    records = sample_nih_records(seed, num_images)
    base = os.path.join(root, NIH_DIR)
    num_folders = min(max(2, math.ceil(num_images / NIH_IMAGES_PER_FOLDER)), 12, num_images)
    per_folder = math.ceil(num_images / num_folders)
    spacing = f"{0.143 * 1024 / size:.3f}"
    jobs, rows = [], [NIH_CSV_HEADER]
    for i, r in enumerate(records):
        folder = os.path.join(NIH_DIR, f"images_{i // per_folder + 1:03d}", "images")
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        factors = ChestFactors(frozenset(r.findings), False, r.sex == "M", float(r.age), r.view == "AP", "chestxray14")
        path = os.path.join(folder, r.image_index)
        jobs.append(ImageJob(image_key(seed, "chestxray14", i), (size, size), factors, path))
        labels = "|".join(r.findings) if r.findings else NO_FINDING
        rows.append(",".join(map(str, (
            r.image_index, labels, r.follow_up, r.patient_id, r.age, r.sex, r.view, size, size, spacing, spacing
        ))))
    _write_text(os.path.join(base, NIH_CSV_NAME), "\n".join(rows) + "\n")
    # Real copies sometimes lack the newline after the last name; reproduce that.
    _write_text(os.path.join(base, "train_val_list.txt"), "\n".join(r.image_index for r in records if not r.test))
    _write_text(os.path.join(base, "test_list.txt"), "\n".join(r.image_index for r in records if r.test))
    counts = {
        "num_nih": len(records),
        "num_nih_patients": len({r.patient_id for r in records}),
        "num_nih_train_val": sum(not r.test for r in records),
        "num_nih_test": sum(r.test for r in records),
    }
    return jobs, counts, records


def _write_bbox_list(root: str, records: list[NIHRecord], boxes: list[dict]) -> int:
    """BBox_List_2017.csv in the real format, for the test images (where the real boxes are); returns the count."""
    rows = [BBOX_CSV_HEADER]
    for record, image_boxes in zip(records, boxes):
        if not record.test:
            continue
        for name in BOX_FINDINGS:
            if name in image_boxes:
                x, y, w, h = image_boxes[name]
                rows.append(f"{record.image_index},{BBOX_LABEL_SPELLING.get(name, name)},{x},{y},{w},{h}")
    _write_text(os.path.join(root, NIH_DIR, BBOX_CSV_NAME), "\n".join(rows) + "\n")
    return len(rows) - 1


def _tb_files(root: str, seed: int, dataset: str, records: list[TBRecord]) -> list[ImageJob]:
    folder = SHENZHEN_DIR if dataset == "shenzhen" else MONTGOMERY_DIR
    subfolders = ["CXR_png", "ClinicalReadings"]
    if dataset == "montgomery":
        subfolders += [os.path.join("ManualMask", "leftMask"), os.path.join("ManualMask", "rightMask")]
    for sub in subfolders:
        os.makedirs(os.path.join(root, folder, sub), exist_ok=True)
    jobs = []
    for i, r in enumerate(records):
        key = image_key(seed, dataset, i)
        reading = shenzhen_reading(r, key) if dataset == "shenzhen" else montgomery_reading(r, key)
        _write_text(os.path.join(root, folder, "ClinicalReadings", r.image_id + ".txt"), reading)
        masks = None
        if dataset == "montgomery":
            masks = tuple(os.path.join(folder, "ManualMask", m, r.image_id + ".png") for m in ("leftMask", "rightMask"))
        factors = ChestFactors(sample_other_disease(key), r.tb, r.sex_male, r.age_years, False, dataset)
        path = os.path.join(folder, "CXR_png", r.image_id + ".png")
        jobs.append(ImageJob(key, r.shape, factors, path, r.mode, masks))
    return jobs


def _hospital_files(root: str, seed: int, records: list[HospitalRecord]) -> list[ImageJob]:
    os.makedirs(os.path.join(root, HOSPITAL_DIR, "images"), exist_ok=True)
    rows = [",".join(HOSPITAL_COLUMNS)] + [",".join(r.cells[c] for c in HOSPITAL_COLUMNS) for r in records]
    _write_text(os.path.join(root, HOSPITAL_DIR, HOSPITAL_CSV_NAME), "\n".join(rows) + "\n")
    return [ImageJob(image_key(seed, "hospital", i), r.shape, r.factors, os.path.join(HOSPITAL_DIR, r.path), r.mode)
            for i, r in enumerate(records)]


def _readme(params: dict) -> str:
    return (
        "THIS DATA IS SYNTHETIC. It is not ChestX-ray14, Shenzhen, Montgomery or any hospital's data and contains\n"
        "no patient data.\n"
        "It was drawn by metachex_jax.demo_data (a procedural chest-X-ray-like renderer) only to exercise the\n"
        "real on-disk layouts, the pipeline and the training code. Numbers measured on it say nothing about\n"
        "real chest X-rays.\n\n"
        f"Parameters: {json.dumps(params, sort_keys=True)}\n"
        "Regenerate byte for byte with:\n"
        f"  python -m metachex_jax.demo_data --out=DIR --seed={params['seed']} --num_nih={params['num_nih']} "
        f"--num_shenzhen={params['num_shenzhen']} --num_montgomery={params['num_montgomery']} "
        f"--num_hospital={params['num_hospital']} "
        f"--size={params['size']}\n\n"
        f"{PLANTED_SIGNALS}\n"
    )


_WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "16777216", "MALLOC_TRIM_THRESHOLD_": "67108864"}


def _run_jobs(jobs: list[ImageJob], root: str, num_workers: int) -> list[dict]:
    """Render and write every job; returns each job's boxes, in job order."""
    if num_workers <= 1 or len(jobs) < 64:  # starting workers costs more than a few dozen small images
        return [_render_and_write(job, root) for job in jobs]
    # "spawn": safe even when the caller has JAX (threads) loaded; results do not depend on the workers.
    # The workers inherit a glibc setting that keeps the renderer's ~0.25 MB temporaries on the heap instead
    # of mmap/munmap per array: without it a third of the CPU time goes to page faults.
    context = multiprocessing.get_context("spawn")
    saved = {name: os.environ.get(name) for name in _WORKER_MALLOC_ENV}
    os.environ.update(_WORKER_MALLOC_ENV)
    try:
        with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
            chunk = max(1, len(jobs) // (8 * num_workers))
            return list(pool.map(_render_and_write, jobs, [root] * len(jobs), chunksize=chunk))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _generate(root: str, params: dict, num_workers: int) -> dict:
    seed, size = params["seed"], params["size"]
    jobs, counts, nih_records = _nih_files(root, seed, params["num_nih"], size)
    num_nih = len(jobs)
    shenzhen = sample_shenzhen_records(seed, params["num_shenzhen"], size)
    montgomery = sample_montgomery_records(seed, params["num_montgomery"], size)
    jobs += _tb_files(root, seed, "shenzhen", shenzhen)
    jobs += _tb_files(root, seed, "montgomery", montgomery)
    hospital = sample_hospital_records(seed, params["num_hospital"], size)
    jobs += _hospital_files(root, seed, hospital)
    boxes = _run_jobs(jobs, root, num_workers)
    counts["num_nih_boxes"] = _write_bbox_list(root, nih_records, boxes[:num_nih])
    counts |= {
        "num_shenzhen": len(shenzhen),
        "num_shenzhen_tb": sum(r.tb for r in shenzhen),
        "num_montgomery": len(montgomery),
        "num_montgomery_tb": sum(r.tb for r in montgomery),
        "num_hospital": len(hospital),
        "num_hospital_patients": len({r.patient_id for r in hospital}),
        "num_hospital_tb": sum(r.tb for r in hospital),
    }
    _write_text(os.path.join(root, README_NAME), _readme(params))
    return counts


# ----------------------------------------------------------------------------------------------------------
# The tree: validate, reuse, or build in a temporary sibling and rename into place.
# ----------------------------------------------------------------------------------------------------------

TREE_ENTRIES = {NIH_DIR, SHENZHEN_DIR, MONTGOMERY_DIR, HOSPITAL_DIR, README_NAME, MARKER_NAME}


def _validate(params: dict) -> None:
    minimum = {"num_nih": 20, "num_shenzhen": 2, "num_montgomery": 2, "num_hospital": 0, "size": 32}
    problems = [f"{name}={params[name]} (must be an integer >= {low})" for name, low in minimum.items()
                if not isinstance(params[name], int) or params[name] < low]
    if not isinstance(params["seed"], int) or params["seed"] < 0:
        problems.append(f"seed={params['seed']} (must be a non-negative integer)")
    if problems:
        raise ValueError("invalid demo data parameters: " + "; ".join(problems))


def _read_marker(out_dir: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, MARKER_NAME), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _result(out_dir: str, marker: dict, reused: bool, seconds: float) -> dict:
    return {
        "root": out_dir,
        "chestxray14_dir": os.path.join(out_dir, NIH_DIR),
        "shenzhen_dir": os.path.join(out_dir, SHENZHEN_DIR),
        "montgomery_dir": os.path.join(out_dir, MONTGOMERY_DIR),
        "hospital_dir": os.path.join(out_dir, HOSPITAL_DIR),
        "hospital_csv": os.path.join(out_dir, HOSPITAL_DIR, HOSPITAL_CSV_NAME),
        **marker["params"],
        **marker["counts"],
        "reused": reused,
        "seconds": seconds,
    }


def write_demo_data(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num_nih: int = 2000,
    num_shenzhen: int = 662,
    num_montgomery: int = 138,
    size: int = 256,
    num_workers: int | None = None,
    num_hospital: int = 200,
) -> dict:
    """Writes (or reuses) a complete synthetic demo tree at `out_dir`; returns its paths, parameters, counts.

    - `out_dir` absent or empty: generated in a temporary sibling, then renamed into place.
    - `out_dir` a complete demo tree with the same parameters: returned at once (`reused=True`).
    - `out_dir` a complete demo tree with other parameters: rebuilt and swapped in (nothing else is touched;
      a tree holding files the generator did not write is refused instead).
    - anything else non-empty: FileExistsError naming what is there.
    `num_workers` (default: the CPU count) changes speed only, never the bytes written.
    """
    start = time.perf_counter()
    out_dir = os.path.abspath(os.fspath(out_dir))
    params = {"version": GENERATOR_VERSION, "seed": seed, "num_nih": num_nih, "num_shenzhen": num_shenzhen,
              "num_montgomery": num_montgomery, "num_hospital": num_hospital, "size": size}
    _validate(params)
    existing = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else None
    if os.path.exists(out_dir) and existing is None:
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    marker = _read_marker(out_dir) if existing else None
    if existing:
        if marker is None:
            raise FileExistsError(
                f"refusing to write demo data into {out_dir}: it is not empty and has no {MARKER_NAME} "
                f"(not a complete demo tree); it contains: {', '.join(existing)}"
            )
        if marker.get("params") == params:
            return _result(out_dir, marker, reused=True, seconds=time.perf_counter() - start)
        foreign = [name for name in existing if name not in TREE_ENTRIES]
        if foreign:
            raise FileExistsError(
                f"refusing to replace the demo tree {out_dir} (parameters {marker.get('params')} -> {params}): "
                f"it also holds entries the generator did not write: {', '.join(foreign)}"
            )

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        counts = _generate(staging, params, num_workers or os.cpu_count() or 1)
        marker = {"generator": GENERATOR, "params": params, "counts": counts}
        _write_text(os.path.join(staging, MARKER_NAME), json.dumps(marker, indent=2, sort_keys=True) + "\n")
        if existing:  # a complete demo tree with other parameters: swap, then delete the old one
            retired = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(retired, "tree"))
            os.rename(staging, out_dir)
            shutil.rmtree(retired)
        else:
            if existing is not None:
                os.rmdir(out_dir)  # empty
            os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _result(out_dir, marker, reused=False, seconds=time.perf_counter() - start)
