"""Tiny raw trees of MIMIC-CXR(-JPG), TBX11K and VinDr-CXR in their exact layouts, every pitfall of the reference
planted, for the datasets' tests (test_mimic.py, test_tbx11k.py, test_vindr.py, ...). Images are 16-24 px and
constant (`pixel_value(i)`), so a build can be checked pixel by pixel; each tree keeps the truth it wrote (rows,
values) for the tests to compare against. Also the DICOM writer the tests share (`dicom_dataset`, `write_dicom`).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEG2000Lossless, generate_uid)

from data_fixtures import pixel_value, write_jpeg, write_png

SIZE = 16


def write_csv(path: Path, header, rows, gz: bool = False) -> Path:
    """rows: dicts (by header name) or lists; gzipped when gz."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([row.get(h, "") for h in header] if isinstance(row, dict) else row)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.getvalue().encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def dicom_dataset(pixels: np.ndarray, *, bits_stored: int = 12, photometric: str = "MONOCHROME2",
                  signed: bool = False, **elements) -> Dataset:
    """A single-frame DX image as pydicom writes it (samples per pixel and bits allocated from `pixels`' shape and
    dtype); `elements` are set on the dataset (e.g. WindowCenter)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1 if pixels.ndim == 2 else pixels.shape[-1]
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 * pixels.dtype.itemsize
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = pixels.tobytes()
    for name, value in elements.items():
        setattr(ds, name, value)
    return ds


def write_dicom(path: Path, stored: np.ndarray, *, bits_stored: int = 12, photometric: str = "MONOCHROME2",
                syntax=ExplicitVRLittleEndian, **elements) -> Path:
    """A 16-bit single-frame DX file as pydicom writes it (`syntax` JPEG2000Lossless compresses it)."""
    stored = np.asarray(stored, np.uint16)
    ds = dicom_dataset(stored, bits_stored=bits_stored, photometric=photometric, **elements)
    if syntax == JPEG2000Lossless:
        ds.compress(JPEG2000Lossless, stored, encoding_plugin="pylibjpeg")
    elif syntax == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_for_value(value: int, bits: int, photometric: str, size: int = SIZE) -> np.ndarray:
    """Stored samples that the reader maps to the 8-bit `value` (the BitsStored range, MONOCHROME1 inverted)."""
    maximum = (1 << bits) - 1
    shown = value if photometric == "MONOCHROME2" else 255 - value
    return np.full((size, size), round(shown * maximum / 255), np.uint16)


# -------------------------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG / MIMIC-CXR

MIMIC_LABEL_COLUMNS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
                       "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
                       "Pneumonia", "Pneumothorax", "Support Devices")  # the files' (alphabetical) order
MIMIC_METADATA_HEADER = ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                         "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                         "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning")
# (subject, study, split, StudyDate, [ViewPosition of each image], label row?)
MIMIC_STUDIES = (
    ("10000032", "50000001", "train", "21800506", ["PA", "LATERAL"], True),
    ("10000032", "50000002", "train", "21830101", ["AP"], True),
    ("10000764", "50000003", "train", "21320315", ["PA"], False),  # a study the labeller left without a row
    ("11000011", "50000004", "validate", "21500720", ["AP", "", "AP AXIAL"], True),  # an empty ViewPosition
    ("12000022", "50000005", "test", "21600101", ["PA", "LL"], True),  # anchor_age 91: "91 or older"
    ("19999987", "50000006", "test", "21900909", ["AP"], True),  # absent from MIMIC-IV's patients
    ("15000005", "50000007", "train", "21700202", ["PA"], True),
    ("15000005", "50000008", "train", "21710202", ["PA"], True),
)
# subject -> (gender, anchor_age, anchor_year)
MIMIC_PATIENTS = {"10000032": ("M", 52, 2180), "10000764": ("F", 76, 2132), "11000011": ("M", 40, 2150),
                  "12000022": ("F", 91, 2160), "15000005": ("F", 30, 2170)}
MIMIC_CYCLE = ("1.0", "0.0", "-1.0", "")


@dataclasses.dataclass
class MimicTree:
    root: Path  # the release folder (holding files/)
    csv_dir: Path  # where the CSVs are (root for the JPG release)
    images: list[dict]  # one per image: dicom_id, subject, study, split, date, view, path, value
    labels: dict[str, dict[str, str]]  # study -> column -> text (the chexpert file)
    negbio: dict[str, dict[str, str]]
    patients_csv: Path
    extension: str
    gz: bool = True

    def write_csvs(self) -> None:
        name = "mimic-cxr-2.0.0-{}.csv" + (".gz" if self.gz else "")
        write_csv(self.csv_dir / name.format("metadata"), MIMIC_METADATA_HEADER, [
            {"dicom_id": i["dicom_id"], "subject_id": i["subject"], "study_id": i["study"], "ViewPosition": i["view"],
             "Rows": SIZE, "Columns": SIZE, "StudyDate": i["date"], "StudyTime": "93015.312"}
            for i in self.images], self.gz)
        write_csv(self.csv_dir / name.format("split"), ("dicom_id", "study_id", "subject_id", "split"),
                  [[i["dicom_id"], i["study"], i["subject"], i["split"]] for i in self.images], self.gz)
        for kind, table in (("chexpert", self.labels), ("negbio", self.negbio)):
            write_csv(self.csv_dir / name.format(kind), ("subject_id", "study_id", *MIMIC_LABEL_COLUMNS),
                      [{"subject_id": row["subject_id"], "study_id": study, **row} for study, row in table.items()],
                      self.gz)

    def image(self, dicom_id: str) -> dict:
        return next(i for i in self.images if i["dicom_id"] == dicom_id)


def make_mimic_tree(root: Path, *, dicom: bool = False, gz: bool = True) -> MimicTree:
    """MIMIC_STUDIES as a JPG release (8-bit gray JPEGs) or, with `dicom`, a DICOM release whose CSVs are in a
    separate JPG-release folder (`csv_dir`), as the DICOM release ships none."""
    extension = ".dcm" if dicom else ".jpg"
    csv_dir = root.parent / "mimic-cxr-jpg" if dicom else root
    tree = MimicTree(root=root, csv_dir=csv_dir, images=[], labels={}, negbio={},
                     patients_csv=root.parent / "mimic-iv" / "hosp" / "patients.csv.gz", extension=extension, gz=gz)
    index = 0
    for n, (subject, study, split, date, views, labelled) in enumerate(MIMIC_STUDIES):
        for view in views:
            dicom_id = "-".join(f"{(index * 7 + k) * 2654435761 % (1 << 32):08x}" for k in range(5))
            path = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}{extension}"
            value = pixel_value(index)
            if dicom:
                photometric = "MONOCHROME1" if index % 3 == 0 else "MONOCHROME2"
                write_dicom(root / path, dicom_for_value(value, 12, photometric), photometric=photometric)
            else:
                write_jpeg(root / path, value, SIZE)
            tree.images.append({"dicom_id": dicom_id, "subject": subject, "study": study, "split": split,
                                "date": date, "view": view, "path": path, "value": value})
            index += 1
        if labelled:
            row = {c: MIMIC_CYCLE[(n + j) % 4] for j, c in enumerate(MIMIC_LABEL_COLUMNS)}
            tree.labels[study] = {"subject_id": subject, **row, "No Finding": "1.0" if n == 6 else ""}
        tree.negbio[study] = {"subject_id": subject, **{c: MIMIC_CYCLE[(n + j + 1) % 4]
                                                        for j, c in enumerate(MIMIC_LABEL_COLUMNS)}}
    tree.write_csvs()
    write_csv(tree.patients_csv, ("subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"),
              [[s, g, a, y, "2008 - 2010", ""] for s, (g, a, y) in MIMIC_PATIENTS.items()], gz=True)
    return tree


# -------------------------------------------------------------------------------------------------------------
# TBX11K

TBX_CATEGORIES = [{"id": 1, "name": "ActiveTuberculosis", "supercategory": "Tuberculosis"},
                  {"id": 2, "name": "ObsoletePulmonaryTuberculosis", "supercategory": "Tuberculosis"},
                  {"id": 3, "name": "PulmonaryTuberculosis", "supercategory": "Tuberculosis"}]


@dataclasses.dataclass
class TbxTree:
    root: Path  # TBX11K/ (holding imgs/, annotations/, lists/)
    train: list[str]  # paths relative to imgs/, in the lists' order
    val: list[str]
    values: dict[str, int]  # path relative to imgs/ -> pixel value
    boxes: dict[str, list[tuple[int, list[float]]]]  # tb path -> [(category id, [x, y, w, h] in 512 space)]
    xml_sizes: dict[str, tuple[int, int]]  # tb path -> the original (width, height) its XML is in
    duplicates: dict[str, str]  # val path -> the train path it is a byte copy of
    size: int
    json_size: int = 0  # the JSON's width and height, the boxes' space (0: the images' size, as in the release)

    def write_annotations(self) -> None:
        space = self.json_size or self.size
        for split, names in (("train", self.train), ("val", self.val)):
            images, annotations = [], []
            for image_id, name in enumerate(names, start=1):
                images.append({"id": image_id, "file_name": name, "width": space, "height": space,
                               "date_captured": "", "license": 1, "coco_url": "", "flickr_url": ""})
                for category, box in self.boxes.get(name, []):
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                        "iscrowd": 0, "area": box[2] * box[3], "bbox": box, "width": space,
                                        "height": space})
            path = self.root / "annotations" / "json" / f"TBX11K_{split}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"categories": TBX_CATEGORIES, "images": images,
                                        "annotations": annotations}))
            lists = self.root / "lists"
            lists.mkdir(parents=True, exist_ok=True)
            (lists / f"TBX11K_{split}.txt").write_text("\n".join(names) + "\n")
        (self.root / "lists" / "TBX11K_trainval.txt").write_text("\n".join(self.train + self.val) + "\n")
        names = {c["id"]: c["name"] for c in TBX_CATEGORIES}
        for name, (width, height) in self.xml_sizes.items():
            objects = "".join(
                f"<object><name>{names[c]}</name><pose>unspecified</pose><truncated>0</truncated><difficult>0"
                f"</difficult><bndbox><xmin>{round(x * width / space)}</xmin><ymin>{round(y * height / space)}"
                f"</ymin><xmax>{round((x + w) * width / space)}</xmax><ymax>"
                f"{round((y + h) * height / space)}</ymax></bndbox></object>"
                for c, (x, y, w, h) in self.boxes.get(name, []))
            stem = Path(name).stem
            path = self.root / "annotations" / "xml" / f"{stem}.xml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"<annotation><filename>{stem}</filename><segmented>0</segmented><size><width>{width}"
                            f"</width><height>{height}</height></size>{objects}</annotation>")


def make_tbx11k_tree(parent: Path, *, size: int = SIZE) -> TbxTree:
    """A tiny TBX11K: healthy, sick and TB images in train and val (sparse numbers), active, latent and both kinds
    of boxes, tb1199 without boxes, a val sick image byte-identical to a train one, the anonymised test images
    with all_test.json, the extra folders (Shenzhen/Montgomery copies, DA/DB) and XMLs at a larger size. Box
    coordinates are in 512 space scaled to `size` (the PNGs are size x size RGB, as the real ones are 512 RGB)."""
    root = parent / "TBX11K"
    s = size / 512
    tree = TbxTree(root=root, train=[], val=[], values={}, boxes={}, xml_sizes={}, duplicates={}, size=size)
    index = 0

    def add(name: str, split: str, value: int | None = None) -> None:
        nonlocal index
        value = pixel_value(index) if value is None else value
        write_png(root / "imgs" / name, value, size, mode="RGB")
        tree.values[name] = value
        (tree.train if split == "train" else tree.val).append(name)
        index += 1

    for i in (1, 8, 14, 22, 37, 44, 61, 73):
        add(f"health/h{i:04d}.png", "train")
    for i in (3, 9, 4994):
        add(f"health/h{i:04d}.png", "val")
    for i in (2, 11, 27, 3378, 40, 52, 66, 77):
        add(f"sick/s{i:04d}.png", "train")
    for i in (109, 4990):
        add(f"sick/s{i:04d}.png", "val", value=tree.values["sick/s3378.png"] if i == 109 else None)
    tree.duplicates["sick/s0109.png"] = "sick/s3378.png"  # the same bytes (a copy in the real val set)
    (root / "imgs" / "sick" / "s0109.png").write_bytes((root / "imgs" / "sick" / "s3378.png").read_bytes())
    # TB: active, latent, both, and tb1199 without boxes (train); active, latent and both in val.
    box = [[100 * s, 120 * s, 160 * s, 200 * s], [300 * s, 80 * s, 120 * s, 150 * s]]
    plan = [("tb0005", "train", [(1, box[0])]), ("tb0007", "train", [(2, box[1])]),
            ("tb0135", "train", [(1, box[0]), (2, box[1])]), ("tb0012", "train", [(1, box[1])]),
            ("tb0018", "train", [(2, box[0])]), ("tb0029", "train", [(1, box[0]), (1, box[1])]),
            ("tb1199", "train", []),
            ("tb0201", "val", [(1, box[1])]), ("tb0206", "val", [(2, box[0])]),
            ("tb1143", "val", [(1, box[0]), (2, box[1])])]
    for stem, split, boxes in plan:
        add(f"tb/{stem}.png", split)
        if boxes:
            tree.boxes[f"tb/{stem}.png"] = boxes
            tree.xml_sizes[f"tb/{stem}.png"] = (1757, 2022)
    # XML disagreeing with JSON beyond the tolerance on one image (the JSON is kept).
    tree.write_annotations()
    xml = root / "annotations" / "xml" / "tb0012.xml"
    xml.write_text(xml.read_text().replace(f"<xmin>{round(300 * s * 1757 / size)}</xmin>", "<xmin>20</xmin>"))
    # The anonymised test images (labels withheld) and the extra folders.
    for n in (1, 2):
        write_png(root / "imgs" / "test" / f"unknown_{n}.png", 9, size, mode="RGB")
    (root / "annotations" / "json" / "all_test.json").write_text(json.dumps(
        {"categories": TBX_CATEGORIES, "images": [{"id": n, "file_name": f"test/unknown_{n}.png", "width": size,
                                                   "height": size} for n in (1, 2)], "annotations": []}))
    for k, name in enumerate(("extra/mc+shenzhen/train/CHNCXR_0001_1.png", "extra/mc+shenzhen/val/MCUCXR_0002_0.png",
                              "extra/da+db/train/p12.png", "extra/da+db/val/nx3.jpg")):
        write_png(root / "imgs" / name, 200 + k, size, mode="RGB")
    return tree


# -------------------------------------------------------------------------------------------------------------
# VinDr-CXR (PhysioNet 1.0.0) and the Kaggle VinBigData layout

VINDR_LOCAL = ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
               "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
               "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
               "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion")
VINDR_GLOBAL_TRAIN = ("COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding")
VINDR_GLOBAL_TEST = ("COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other disease", "No finding")
KAGGLE_CLASSES = ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
                  "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
                  "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "No finding")


@dataclasses.dataclass
class VindrTree:
    root: Path
    train: dict[str, dict[str, list[str]]]  # image id -> rad_id -> positive labels
    test: dict[str, list[str]]  # image id -> positive labels (consensus)
    boxes: list[dict]  # rows of annotations_*.csv (split, image_id, rad_id, class_name, x_min..y_max)
    values: dict[str, int]
    tags: dict[str, dict]  # image id -> the PatientAge / PatientSex written (absent keys: not written)


def _image_id(index: int) -> str:
    return f"{(index + 1) * 0x9E3779B97F4A7C15 % (1 << 128):032x}"


def make_vindr_tree(root: Path) -> VindrTree:
    """A tiny VinDr-CXR 1.0.0: 6 training images read by three radiologists each, 3 test images (consensus; their
    files have no rad_id and spell `Other disease`), DICOMs of 10 to 16 bits, MONOCHROME1 and 2, a JPEG 2000 file,
    an implicit-VR file; PatientAge `055Y`-style, missing and 'O' sexes; boxes of several readers."""
    tree = VindrTree(root=root, train={}, test={}, boxes=[], values={}, tags={})
    plans = [  # (split, {rad: positive labels}, bits, photometric, syntax, tags)
        ("train", {"R8": ["Cardiomegaly", "Aortic enlargement"], "R9": ["Cardiomegaly"], "R10": ["No finding"]}, 12,
         "MONOCHROME2", ExplicitVRLittleEndian, {"PatientAge": "055Y", "PatientSex": "M"}),
        ("train", {"R8": ["No finding"], "R9": ["No finding"], "R10": ["No finding"]}, 14, "MONOCHROME1",
         ExplicitVRLittleEndian, {"PatientAge": "031Y", "PatientSex": "F"}),
        ("train", {"R8": ["Nodule/Mass", "Lung tumor"], "R9": ["Nodule/Mass", "Other diseases"],
                   "R11": ["Tuberculosis", "Pleural effusion"]}, 16, "MONOCHROME2", JPEG2000Lossless,
         {"PatientSex": "M"}),  # no PatientAge
        ("train", {"R8": ["Pleural effusion", "Pleural thickening"], "R9": ["Pleural effusion"],
                   "R10": ["No finding"]}, 10, "MONOCHROME2", ImplicitVRLittleEndian,
         {"PatientAge": "", "PatientSex": "O"}),
        ("train", {"R8": ["Pneumonia", "Consolidation"], "R9": ["Pneumonia", "Consolidation", "Other diseases"],
                   "R10": ["Pneumonia"]}, 12, "MONOCHROME1", ExplicitVRLittleEndian,
         {"PatientAge": "062Y", "PatientSex": "F"}),
        ("train", {"R8": ["Tuberculosis", "Pulmonary fibrosis"], "R9": ["Tuberculosis"], "R10": ["Tuberculosis",
                                                                                                 "Infiltration"]},
         12, "MONOCHROME2", ExplicitVRLittleEndian, {"PatientAge": "X5Y", "PatientSex": "M"}),  # unparseable age
        ("test", {"": ["Cardiomegaly", "Other disease"]}, 12, "MONOCHROME2", ExplicitVRLittleEndian,
         {"PatientAge": "070Y", "PatientSex": "F"}),
        ("test", {"": ["No finding"]}, 16, "MONOCHROME1", JPEG2000Lossless, {"PatientAge": "044Y"}),  # no sex
        ("test", {"": ["Nodule/Mass", "Tuberculosis"]}, 14, "MONOCHROME2", ExplicitVRLittleEndian,
         {"PatientAge": "028Y", "PatientSex": "M"}),
    ]
    for index, (split, readers, bits, photometric, syntax, tags) in enumerate(plans):
        image_id = _image_id(index)
        value = pixel_value(index)
        # 32 px: OpenJPEG's default of 6 resolution levels needs at least 2^5 pixels a side
        write_dicom(root / split / f"{image_id}.dicom", dicom_for_value(value, bits, photometric, 32),
                    bits_stored=bits, photometric=photometric, syntax=syntax, **tags)
        tree.values[image_id], tree.tags[image_id] = value, tags
        if split == "train":
            tree.train[image_id] = readers
        else:
            tree.test[image_id] = readers[""]
        for rad, positives in readers.items():
            for k, label in enumerate(p for p in positives if p in VINDR_LOCAL):
                x, y = 2.0 + k + len(rad), 3.0 + index
                tree.boxes.append({"split": split, "image_id": image_id, "rad_id": rad, "class_name": label,
                                   "x_min": x, "y_min": y, "x_max": x + 6, "y_max": y + 5})
            if "No finding" in positives:
                tree.boxes.append({"split": split, "image_id": image_id, "rad_id": rad, "class_name": "No finding",
                                   "x_min": "", "y_min": "", "x_max": "", "y_max": ""})
    annotations = root / "annotations"
    train_header = ("image_id", "rad_id", *VINDR_LOCAL, *VINDR_GLOBAL_TRAIN)
    write_csv(annotations / "image_labels_train.csv", train_header, [
        [image_id, rad, *(int(label in positives) for label in (*VINDR_LOCAL, *VINDR_GLOBAL_TRAIN))]
        for image_id, readers in tree.train.items() for rad, positives in readers.items()])
    write_csv(annotations / "image_labels_test.csv", ("image_id", *VINDR_LOCAL, *VINDR_GLOBAL_TEST), [
        [image_id, *(int(label in positives) for label in (*VINDR_LOCAL, *VINDR_GLOBAL_TEST))]
        for image_id, positives in tree.test.items()])
    box_columns = ("class_name", "x_min", "y_min", "x_max", "y_max")
    write_csv(annotations / "annotations_train.csv", ("image_id", "rad_id", *box_columns),
              [b for b in tree.boxes if b["split"] == "train"])
    write_csv(annotations / "annotations_test.csv", ("image_id", *box_columns),
              [b for b in tree.boxes if b["split"] == "test"])
    return tree


@dataclasses.dataclass
class KaggleTree:
    root: Path
    readers: dict[str, dict[str, list[str]]]  # image id -> rad_id -> classes (names)
    values: dict[str, int]


def make_kaggle_vindr_tree(root: Path, *, n_images: int = 12) -> KaggleTree:
    """The Kaggle VinBigData layout: train/<image_id>.dicom and train.csv (class ids 0-14, 14 = No finding with
    empty box columns, coordinates as integer-valued floats); test/ without labels; sample_submission.csv."""
    tree = KaggleTree(root=root, readers={}, values={})
    rows = []
    for index in range(n_images):
        image_id = _image_id(100 + index)
        value = pixel_value(index)
        write_dicom(root / "train" / f"{image_id}.dicom", dicom_for_value(value, 12, "MONOCHROME2"),
                    PatientAge=f"{40 + index:03d}Y", PatientSex="M" if index % 2 else "F")
        tree.values[image_id] = value
        readers = {}
        for r, rad in enumerate(("R8", "R9", "R10")):
            if (index + r) % 3 == 0:
                classes = ["No finding"]
            else:
                classes = [KAGGLE_CLASSES[(index * 3 + r) % 14], KAGGLE_CLASSES[(index + 5) % 14]]
            readers[rad] = list(dict.fromkeys(classes))
            for name in readers[rad]:
                class_id = KAGGLE_CLASSES.index(name)
                box = ["", "", "", ""] if class_id == 14 else [f"{1.0 + r:.1f}", "2.0", f"{9.0 + r:.1f}", "8.0"]
                rows.append([image_id, name, class_id, rad, *box])
        tree.readers[image_id] = readers
    write_csv(root / "train.csv", ("image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max",
                                   "y_max"), rows)
    write_dicom(root / "test" / f"{_image_id(999)}.dicom", dicom_for_value(50, 12, "MONOCHROME2"))
    write_csv(root / "sample_submission.csv", ("image_id", "PredictionString"), [[_image_id(999), "14 1 0 0 1 1"]])
    return tree
