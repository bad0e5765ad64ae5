"""Tiny raw trees in the real layouts (the readers' docstrings, data/raw/) for the data tests: a few dozen 32-48 px
PNGs.

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

from metachex_jax.core.labels import NO_FINDING, PATHOLOGIES

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


def write_gray_png_with_trns(path: Path, pixels: np.ndarray) -> Path:
    """A gray 8-bit PNG (colour type 0) with a tRNS chunk: gray level 5 is transparent."""
    Image.fromarray(np.asarray(pixels, np.uint8), mode="L").save(path, format="PNG", transparency=5)
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


# ---------------------------------------------------------------------------------------------------------------
# The label-table datasets: CheXpert, PadChest, a CSV of one's own (real layouts: the readers' docstrings). Images
# are constant (pixel_value(i)) so a build can be checked pixel by pixel.

def write_jpeg(path: Path, value: int, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8), mode="L").save(path, quality=95)
    return path


def write_png16(path: Path, value16: int, size: int = 32) -> Path:
    """A 16-bit gray PNG without sBIT holding one sample value (e.g. 12-bit data: 0..4095)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value16, np.uint16)).save(path)
    return path


CHEXPERT_OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                         "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                         "Pleural Other", "Fracture", "Support Devices")


@dataclasses.dataclass
class ChexpertTree:
    root: Path  # the release folder
    rows: dict[str, list[dict]]  # "train"/"valid" -> rows (column -> text)
    values: dict[str, int]  # Path -> pixel value

    def write_csvs(self) -> None:
        import csv
        for table, rows in self.rows.items():
            with open(self.root / f"{table}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS])
                for r in rows:
                    writer.writerow([r["Path"], r["Sex"], r["Age"], r["Frontal/Lateral"], r["AP/PA"],
                                     *(r[o] for o in CHEXPERT_OBSERVATIONS)])


def make_chexpert_tree(parent: Path, *, release: str = "CheXpert-v1.0-small", n_train_patients: int = 10,
                       n_valid_patients: int = 3, size: int = 32) -> ChexpertTree:
    """Patients with 1-2 studies of a frontal (AP or PA) and, every other study, a lateral JPEG. Observations
    cycle through 1.0 / 0.0 / -1.0 / blank; in train.csv the second frontal has sex Unknown, the third AP/PA LL
    and the fourth age 0."""
    root = parent / release
    tree = ChexpertTree(root=root, rows={"train": [], "valid": []}, values={})
    index = 0
    cycle = ("1.0", "0.0", "-1.0", "")
    for table, first, count in (("train", 1, n_train_patients), ("valid", 64541, n_valid_patients)):
        for patient in range(first, first + count):
            for study in range(1, 1 + (patient % 2) + 1):
                views = [("frontal", "Frontal")] + ([("lateral", "Lateral")] if (patient + study) % 2 else [])
                for number, (word, frontal) in enumerate(views, start=1):
                    path = f"{release}/{table}/patient{patient:05d}/study{study}/view{number}_{word}.jpg"
                    write_jpeg(parent / path, pixel_value(index), size)
                    tree.values[path] = pixel_value(index)
                    ap_pa = "" if frontal == "Lateral" else "AP" if index % 3 else "PA"
                    row = {"Path": path, "Sex": "Male" if index % 2 else "Female", "Age": str(20 + index % 60),
                           "Frontal/Lateral": frontal, "AP/PA": ap_pa}
                    row.update({o: cycle[(index + j) % 4] for j, o in enumerate(CHEXPERT_OBSERVATIONS)})
                    row["No Finding"] = "1.0" if index % 5 == 0 else ""  # only 1.0 or blank, as in the real file
                    tree.rows[table].append(row)
                    index += 1
    frontals = [r for r in tree.rows["train"] if r["Frontal/Lateral"] == "Frontal"]
    frontals[1]["Sex"], frontals[2]["AP/PA"], frontals[3]["Age"] = "Unknown", "LL", "0"
    tree.write_csvs()
    return tree


PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
PADCHEST_HEADER = ("", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
                   "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric",
                   "Modality_DICOM", "PhotometricInterpretation_DICOM", "BitsStored_DICOM", "Rows_DICOM",
                   "Columns_DICOM", "ReportID", "Report", "MethodLabel", "Labels", "Localizations")
PADCHEST_LABELS = ("['normal']", "['pleural effusion', 'cardiomegaly']", "['COPD signs', '']",
                   "[' pulmonary edema', 'infiltrates']", "['tuberculosis sequelae', 'hiatal hernia']",
                   "['tuberculosis', 'nodule', 'laminar atelectasis']", "['subcutaneous emphysema']", "[]")


@dataclasses.dataclass
class PadchestTree:
    root: Path
    rows: list[dict]
    values16: dict[str, int]  # ImageID -> the 16-bit sample value
    bits: dict[str, int]  # ImageID -> BitsStored_DICOM
    gz: bool = False

    @property
    def csv_path(self) -> Path:
        return self.root / (PADCHEST_CSV + (".gz" if self.gz else ""))

    def write_csv(self) -> None:
        import csv
        import gzip
        import io
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(PADCHEST_HEADER)
        for i, r in enumerate(self.rows):
            writer.writerow([str(i) if h == "" else r.get(h, "") for h in PADCHEST_HEADER])
        data = text.getvalue().encode()
        for name in (PADCHEST_CSV, PADCHEST_CSV + ".gz"):
            (self.root / name).unlink(missing_ok=True)
        self.csv_path.write_bytes(gzip.compress(data) if self.gz else data)

    def row(self, image_id: str) -> dict:
        return next(r for r in self.rows if r["ImageID"] == image_id)


def make_padchest_tree(root: Path, *, n_patients: int = 12, gz: bool = False, size: int = 32) -> PadchestTree:
    """Patients with 2 images each; projections cycle PA, AP, AP_horizontal, L, COSTAL, PA; 16-bit PNGs declared
    12 or 10 bits; one sex O, one blank, one blank PatientBirth; labels cycle PADCHEST_LABELS."""
    projections = ("PA", "AP", "AP_horizontal", "L", "COSTAL", "PA")
    tree = PadchestTree(root=root, rows=[], values16={}, bits={}, gz=gz)
    index = 0
    for patient in range(n_patients):
        for image in range(2):
            image_id = f"2168401113669640{patient:05d}{image}_00-{index:03d}-000.png"
            folder = str(index % 3)
            bits = 10 if index % 4 == 0 else 12
            value16 = (pixel_value(index) * ((1 << bits) - 1)) // 255
            write_png16(root / folder / image_id, value16, size)
            tree.values16[image_id], tree.bits[image_id] = value16, bits
            tree.rows.append({
                "ImageID": image_id, "ImageDir": folder, "StudyDate_DICOM": f"20{10 + image:02d}0315",
                "StudyID": f"s{index}", "PatientID": f"{patient * 7919 + 10**30}",
                "PatientBirth": "" if index == 5 else f"{1940 + (index * 3) % 50}.0",
                "PatientSex_DICOM": "O" if index == 6 else "" if index == 7 else "M" if index % 2 else "F",
                "ViewPosition_DICOM": "POSTEROANTERIOR", "Projection": projections[index % len(projections)],
                "MethodProjection": "Manual review of DICOM fields", "Pediatric": "No", "Modality_DICOM": "CR",
                "PhotometricInterpretation_DICOM": "MONOCHROME2", "BitsStored_DICOM": str(bits),
                "Rows_DICOM": str(size), "Columns_DICOM": str(size), "ReportID": str(index),
                "Report": "cardiomegalia, derrame pleural.", "MethodLabel": "Physician",
                "Labels": PADCHEST_LABELS[index % len(PADCHEST_LABELS)], "Localizations": "[]"})
            index += 1
    tree.write_csv()
    return tree


@dataclasses.dataclass
class CsvTree:
    root: Path  # manual_dir: image paths are relative to it
    csv_path: Path
    header: list[str]
    rows: list[dict]
    values: dict[str, int]  # path -> 8-bit pixel value

    def write_csv(self) -> None:
        import csv
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.header)
            writer.writerows([[r.get(h, "") for h in self.header] for r in self.rows])


def make_csv_tree(root: Path, *, n_patients: int = 14, size: int = 32) -> CsvTree:
    """A hospital's CSV: 1-2 images per patient (PNG, JPEG named .jpg, a 12-bit PNG), labels Tuberculosis and
    Cardiomegaly with blanks, sex and view written in several ways (and some unknown)."""
    header = ["path", "Tuberculosis", "Cardiomegaly", "patient_id", "age", "Sex", "view"]
    sexes = ("M", "female", "F", "Male", "", "x")
    views = ("PA", "ap", "AP", "", "lateral")
    tree = CsvTree(root=root, csv_path=root / "labels.csv", header=header, rows=[], values={})
    index = 0
    for patient in range(n_patients):
        for image in range(1 + patient % 2):
            kind = index % 3
            path = f"images/{patient:03d}_{image}." + ("jpg" if kind == 1 else "png")
            value = pixel_value(index)
            if kind == 0:
                write_png(root / path, value, size)
            elif kind == 1:
                write_jpeg(root / path, value, size)
            else:
                write_png16(root / path, (value * 4095) // 255, size)
            tree.values[path] = value
            tree.rows.append({"path": path, "Tuberculosis": str(patient % 2),
                              "Cardiomegaly": "" if index % 4 == 0 else str(index % 3 == 0),
                              "patient_id": f"P{patient:03d}",
                              "age": "" if index == 3 else "abc" if index == 4 else str(30 + index),
                              "Sex": sexes[index % len(sexes)], "view": views[index % len(views)]})
            index += 1
    for r in tree.rows:
        r["Cardiomegaly"] = {"True": "1", "False": "0"}.get(r["Cardiomegaly"], r["Cardiomegaly"])
    tree.write_csv()
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
