"""Tiny raw trees in the real layouts (datasets.md) for the data tests: a few dozen 32-48 px PNGs.

Each image is a constant gray value that is unique per image (`pixel_value(i)`), so a test can check that the
pixels read back belong to the right record (BOX resizing keeps a constant image exact).
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Sequence
from pathlib import Path

import grain

import numpy as np
from PIL import Image

from metachex_jax.labels import NO_FINDING, PATHOLOGIES

NIH_HEADER_2017 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                   "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
NIH_HEADER_2020 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Sex,View Position,"
                   "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


def pixel_value(index: int) -> int:
    return (37 * index + 11) % 251


def write_png(path: Path, value: int, size: int = 32, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    gray = Image.fromarray(np.full((size, size), value, np.uint8), mode="L")
    (gray if mode == "L" else gray.convert(mode)).save(path)
    return path


@dataclasses.dataclass
class NihTree:
    """A tiny ChestX-ray14 copy. `rows` are the CSV fields (strings); edit them and call write_csv()."""

    root: Path
    rows: list[dict]
    train_val: list[str]
    test: list[str]
    values: dict[str, int]  # image name -> pixel value
    header: str = NIH_HEADER_2017

    @property
    def csv_path(self) -> Path:
        return self.root / ("Data_Entry_2017.csv" if self.header == NIH_HEADER_2017 else "Data_Entry_2017_v2020.csv")

    def write_csv(self) -> None:
        trailing = "," if self.header.endswith(",") else ""
        lines = [self.header]
        for r in self.rows:
            lines.append(",".join([r["name"], r["labels"], r["follow_up"], r["patient_id"], r["age"], r["sex"],
                                   r["view"], "2500", "2048", "0.143", "0.143"]) + trailing)
        self.csv_path.write_text("\n".join(lines) + "\n")

    def write_lists(self, newline_at_end: bool = False) -> None:
        end = "\n" if newline_at_end else ""  # the real lists' last line may lack a newline
        (self.root / "train_val_list.txt").write_text("\n".join(self.train_val) + end)
        (self.root / "test_list.txt").write_text("\n".join(self.test) + end)

    def image_path(self, name: str) -> Path:
        return next(self.root.rglob(name))

    def row(self, name: str) -> dict:
        return next(r for r in self.rows if r["name"] == name)


def make_nih_tree(root: Path, *, n_patients: int = 10, mirror_layout: bool = False, v2020: bool = False,
                  size: int = 32) -> NihTree:
    """Patients 1..n with 1-3 images each; patients divisible by 4 are the test set; one implausible age (412)."""
    root.mkdir(parents=True, exist_ok=True)
    rows, values, index = [], {}, 0
    for patient in range(1, n_patients + 1):
        for follow_up in range(1 + patient % 3):
            name = f"{patient:08d}_{follow_up:03d}.png"
            picked = [PATHOLOGIES[(index * k) % 14] for k in range(1, index % 3 + 1)] if index % 4 else []
            labels = "|".join(dict.fromkeys(picked)) or NO_FINDING
            age = "412" if index == 5 else f"{20 + (index * 7) % 60:03d}Y" if index % 2 else str(20 + index % 60)
            rows.append({"name": name, "labels": labels, "follow_up": str(follow_up), "patient_id": str(patient),
                         "age": age, "sex": "M" if index % 2 else "F", "view": "AP" if index % 3 == 0 else "PA"})
            folder = root / (f"images_{1 + index % 2:03d}/images" if mirror_layout else "images")
            write_png(folder / name, pixel_value(index), size)
            values[name] = pixel_value(index)
            index += 1
    tree = NihTree(root=root, rows=rows, values=values,
                   train_val=[r["name"] for r in rows if int(r["patient_id"]) % 4],
                   test=[r["name"] for r in rows if int(r["patient_id"]) % 4 == 0],
                   header=NIH_HEADER_2020 if v2020 else NIH_HEADER_2017)
    tree.write_csv()
    tree.write_lists()
    return tree


@dataclasses.dataclass
class TbTree:
    root: Path  # the set's folder (ChinaSet_AllFiles or MontgomerySet)
    values: dict[str, int]  # image id -> pixel value
    readings: dict[str, str]  # image id -> readings file text

    def image_path(self, image_id: str) -> Path:
        return self.root / "CXR_png" / f"{image_id}.png"

    def reading_path(self, image_id: str) -> Path:
        return self.root / "ClinicalReadings" / f"{image_id}.txt"

    def write_reading(self, image_id: str, text: str) -> None:
        self.readings[image_id] = text
        self.reading_path(image_id).write_text(text)


def shenzhen_reading(male: bool, age: str, tb: bool) -> str:
    return f"{'male' if male else 'female'} {age}\n{'PTB in the left upper field' if tb else 'normal'}\n"


def montgomery_reading(male: bool, age_years: int, tb: bool) -> str:
    return (f"Patient's Sex: {'M' if male else 'F'}\nPatient's Age: {age_years:03d}Y\n"
            f"{'bilateral upper lobe infiltrates, TB' if tb else 'normal'}\n")


def make_tb_tree(parent: Path, dataset: str, *, n_normal: int = 12, n_tb: int = 10, size: int = 32) -> TbTree:
    """A tiny Shenzhen or Montgomery set under `parent` (normals first, then TB; ages 20..79 years)."""
    folder, prefix = {"shenzhen": ("ChinaSet_AllFiles", "CHNCXR"), "montgomery": ("MontgomerySet", "MCUCXR")}[dataset]
    tree = TbTree(root=parent / folder, values={}, readings={})
    (tree.root / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
    for index in range(n_normal + n_tb):
        is_tb = index >= n_normal
        image_id = f"{prefix}_{index + 1:04d}_{int(is_tb)}"
        male, age = index % 2 == 0, 20 + (index * 7) % 60
        write_png(tree.image_path(image_id), pixel_value(index), size, mode="RGB" if index % 5 == 0 else "L")
        tree.values[image_id] = pixel_value(index)
        if dataset == "shenzhen":
            spacing = "  " if index % 3 == 0 else " "
            text = shenzhen_reading(male, f"{age}yrs", is_tb).replace(" ", spacing, 1)
        else:
            text = montgomery_reading(male, age, is_tb)
        tree.write_reading(image_id, text)
    return tree


# --- ArrayRecord files of pickled record dicts (an ArrayRecord source that is not a TFDS build) -----------

class PickledArrayRecordSource:
    """A random-access source over ArrayRecord files whose records are pickled record dicts.

    Picklable (grain's ArrayRecordDataSource reopens the files in each worker process).
    """

    def __init__(self, paths: str | Sequence[str]):
        self._records = grain.sources.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return pickle.loads(self._records[index])

    def __repr__(self) -> str:
        return f"PickledArrayRecordSource({self._records!r})"


def write_pickled_array_records(path: str | Path, records: Sequence[dict]) -> None:
    """Write records (dicts of numpy arrays / scalars) as pickles to one ArrayRecord file (temp, then rename)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    writer = ArrayRecordWriter(str(partial), "group_size:1")
    try:
        for record in records:
            writer.write(pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        writer.close()
    partial.replace(path)
