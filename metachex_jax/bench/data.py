"""Input-pipeline benchmark: what the host does per training image, per core, against a naive full-size PNG loader.

    python -m metachex_jax.bench data --synthetic
    python -m metachex_jax.bench data --data_dir=~/tensorflow_datasets --dataset=chestxray14/r256

On one split of a built dataset, in one run:

    read       one record by index with `builders.data_source` (records.RecordSource: the record layout of
               builders 2.0.0, layout.py, what the trainer reads with) against the same records in the layout of
               builders 1.x (tf.Example in ArrayRecord, decoded with protobuf's C parser as 1.x's RecordSource did;
               written here: `TfExampleSource`), microseconds of CPU per record
    device     `pipeline.train_batches(augmentation=None)`: read + batch, all the host does with
               config.data.augment_on="device" (goal: >= 10,000 img/s per core), for both layouts
    crop_flip  read + random crop + flip on the host
    host       read + crop + flip + the affine on the host, augment_on="host" (goals: >= 1,000 img/s per core
               and >= 10x the naive loader per core)
    workers    the host figure with --num_workers worker processes (per core = total / workers)
    naive      the common way to read ChestX-ray14: decode a 1024 x 1024 PNG with PIL, convert, resize to the
               stored resolution, the same augmentation (--naive_images PNGs written here, read round-robin)
    build      --synthetic: raw PNGs -> the dataset read above (`data.build.build_dataset`, every core)
    mixture    the host figure over three sources of the shared label space (data/input/mixture.py: one NIH-format and
               two label-table sources, weights 1 / 2 / 0.5) against one source of the same records (goal:
               >= 0.9 of the single source's)
    sources    source builds, in-process, per CPU second, against a naive PIL loop (open, 8-bit gray, BILINEAR
               resize to --resolution) over the same files (goal: >= 1.5x with --runner=local): CheXpert-small-like
               gray JPEGs (--jpeg_images of 320 x 390) and PadChest-like 16-bit PNGs (--png16_images of
               --png16_size px holding 12-bit data, BitsStored_DICOM 12); for each, the reader alone
               (`images.decode_many`) and the whole `build.build_dataset` (local runner, one process). With
               --beam, the same build on Beam's DirectRunner too (no goal: a test runner), in_memory (CPU of this
               process) and multi_processing with two workers (CPU of this process and its children). The naive
               loops run first; then this process keeps large buffers on the heap, as every build's decoding
               workers do (images._keep_large_buffers_on_the_heap).
    full size  --full_size: a build's work per image (work.process_chunk: read, decode, resize, record bytes; CPU
               ms, in-process) on synthetic files the size of ChestX-ray14's, CheXpert's, PadChest's and
               MIMIC-CXR's (FULL_SIZE_SOURCES): the CPU costs of the paper estimate in docs/beam.md

Per core: the in-process figures run on one thread (no reader thread, no prefetch: `next()` does all the work)
and are reported per wall-clock second and per CPU second of this process (`time.process_time`). On a machine
shared with other jobs the wall-clock rate falls with the load while the CPU rate barely moves; the goals are per
core, so the CPU rates are the ones compared with them (and their ratios). The 1-minute load average is printed
next to every figure.

--synthetic: the source is a chestxray14 dataset built with the real builder (the current record layout) from
--num_records demo-generator PNGs of --build_size px, at --resolution.

Every function here measures one thing and returns its figures (for `python -m metachex_jax.bench`); `main` prints
one line per measurement and, last, one JSON object with all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import flags
from array_record.python import array_record_data_source, array_record_module
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2  # builders 1.x's record layout, for the comparison

from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.data.build import build, builders, registry, work
from metachex_jax.data.input import mixture, pipeline
from metachex_jax.data.input.augment import Augmentation, augment
from metachex_jax.data.raw import labelled
from metachex_jax.demo.write import write_demo_data
from metachex_jax.imaging import images

GOALS = {"device_img_per_cpu_s": 10_000, "host_img_per_cpu_s": 1_000, "host_vs_naive_per_core": 10.0,
         "mixture_vs_single": 0.9, "jpeg_build_vs_naive_per_core": 1.5, "png16_build_vs_naive_per_core": 1.5}
CHEXPERT_OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                         "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                         "Pleural Other", "Fracture", "Support Devices")


def load() -> float:
    return round(os.getloadavg()[0], 2)


def timed(work, count: int) -> dict:
    """{"img_per_s": count / wall seconds, "img_per_cpu_s": count / CPU seconds of this process, "load": ...}."""
    cpu, wall = time.process_time(), time.perf_counter()
    work()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"img_per_s": count / wall, "img_per_cpu_s": count / max(cpu, 1e-9), "load": load()}


def timed_with_children(work, count: int) -> dict:
    """`timed`, with the CPU of the child processes that ended meanwhile (Beam's DirectRunner workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    figures = timed(work, count)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    own_cpu = count / figures["img_per_cpu_s"]
    return {**figures, "img_per_cpu_s": count / max(own_cpu + child_cpu, 1e-9)}


class TfExampleSource:
    """The records of `source` in the layout of builders 1.x: each a tf.Example (raw image and label bytes,
    int64 / float scalars, bytes text) in an uncompressed ArrayRecord file, read by index and decoded with
    protobuf's C parser field by field, as 1.x's RecordSource did. For the read comparison only."""

    def __init__(self, source, path: Path, limit: int):
        writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1,uncompressed")
        first = source[0]
        self._fields = [(name, np.asarray(value).dtype, np.shape(value), type(value)) for name, value in first.items()]
        for i in range(min(len(source), limit)):
            example = tf_example_pb2.Example()
            for name, value in source[i].items():
                feature = example.features.feature[name]
                if isinstance(value, bytes):
                    feature.bytes_list.value.append(value)
                elif isinstance(value, np.ndarray):
                    feature.bytes_list.value.append(value.tobytes())
                elif isinstance(value, float):
                    feature.float_list.value.append(value)
                else:
                    feature.int64_list.value.append(int(value))
            writer.write(example.SerializeToString(deterministic=True))
        writer.close()
        self._raw = array_record_data_source.ArrayRecordDataSource([os.fspath(path)])

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, index: int) -> dict:
        features = tf_example_pb2.Example.FromString(self._raw[index]).features.feature
        record = {}
        for name, dtype, shape, kind in self._fields:
            if kind is bytes:
                record[name] = features[name].bytes_list.value[0]
            elif kind is np.ndarray:
                record[name] = np.frombuffer(features[name].bytes_list.value[0], dtype).reshape(shape)
            elif kind is float:
                record[name] = float(features[name].float_list.value[0])
            else:
                record[name] = kind(features[name].int64_list.value[0])
        return record


def measure_pipeline(source, *, kind: str, augmentation: Augmentation | None, image_size: int, batch_size: int,
                     num_batches: int, num_workers: int = 0, warmup_batches: int = 3,
                     weights: Sequence[float] | None = None) -> dict:
    """Training batches of `pipeline.train_batches` (augmentation=None: read + batch only; `source` may be a list
    mixed by `weights`). In-process (num_workers=0) on one thread; after warm-up (which also absorbs worker
    start-up)."""
    with pipeline.train_batches(source, kind=kind, global_batch_size=batch_size, image_size=image_size, seed=0,
                                weights=weights,
                                augmentation=augmentation, num_workers=num_workers, read_threads=0,
                                prefetch_batches=max(0, 2 * num_workers), process_index=0,
                                process_count=1) as batches:
        for _ in range(warmup_batches):
            next(batches)
        return timed(lambda: [next(batches) for _ in range(num_batches)], num_batches * batch_size)


def measure_reads(source, num_reads: int) -> float:
    """CPU microseconds per `source[i]`, over a permutation of the records (repeated up to num_reads)."""
    order = np.random.default_rng(0).permutation(len(source))
    indices = [int(order[i % len(order)]) for i in range(num_reads)]
    return 1e6 / timed(lambda: [source[i] for i in indices], num_reads)["img_per_cpu_s"]


def measure_naive_png_loader(png_paths: Sequence[Path], *, resolution: int, image_size: int,
                             augmentation: Augmentation, num_samples: int) -> dict:
    """Decode full-size PNG -> gray -> resize -> the same augmentation, one thread."""
    rng = np.random.default_rng(0)

    def work():
        for i in range(num_samples):
            with Image.open(png_paths[i % len(png_paths)]) as png:
                image = np.asarray(png.convert("L").resize((resolution, resolution), Image.Resampling.BILINEAR))
            augment(image, image_size, augmentation, rng)

    return timed(work, num_samples)


def synthetic_xray(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth X-ray-like uint8 image (a bright ellipse, a gradient, a little noise): compresses like one."""
    y, x = np.mgrid[0:size, 0:size] / size
    body = np.exp(-(((x - 0.5) / 0.35) ** 2 + ((y - 0.55) / 0.45) ** 2))
    image = 40 + 150 * body + 30 * y + rng.normal(0, 4, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def build_synthetic_dataset(workdir: Path, num_images: int, png_size: int, resolution: int) -> dict:
    """Raw NIH-layout demo PNGs -> a chestxray14 dataset with `build.build_dataset` on every core, timed."""
    tree = write_demo_data(workdir / "raw", num_nih=num_images, num_shenzhen=2, num_montgomery=2,
                                     num_hospital=0, size=png_size)
    workers = os.cpu_count() or 1
    start = time.perf_counter()
    result = build.build_dataset("chestxray14", tree["chestxray14_dir"], workdir / "tfds", resolution=resolution,
                                 num_workers=workers, progress=False)
    return {"build_img_per_s": num_images / (time.perf_counter() - start), "build_workers": workers,
            "build_png_size": png_size, "data_dir": str(workdir / "tfds"),
            "dataset": f"chestxray14/{result.config_name}"}


def measure_mixture(source, *, augmentation: Augmentation, image_size: int, batch_size: int,
                    num_batches: int) -> dict:
    """The host pipeline over one harmonised source of `source`'s records against three (thirds of them: one
    NIH-format, two label-table sources of other label names) mixed by weight."""
    space = mixture.label_space("No Finding")
    third = len(source) // 3

    class Part:  # records [start, stop) of `source`, as a label-table source (labels 1/0/-1, patient_key)
        def __init__(self, start, stop, labelled):
            self.start, self.stop, self.labelled = start, stop, labelled

        def __len__(self):
            return self.stop - self.start

        def __getitem__(self, i):
            record = source[self.start + i]
            if not self.labelled:
                return record
            labels = np.where(np.arange(len(PATHOLOGIES)) < 7, record["labels"].astype(np.int8), np.int8(-1))
            return {**record, "labels": labels, "image_id": record["image_name"],
                    "patient_key": record["patient_id"]}

    single = mixture.HarmonisedSource(source, dataset="chestxray14", kind="nih", space=space)
    mixed = [mixture.HarmonisedSource(Part(0, third, False), dataset="chestxray14", kind="nih", space=space)]
    mixed += [mixture.HarmonisedSource(Part(a, b, True), dataset="csv", kind="labelled", space=space,
                                       label_names=PATHOLOGIES) for a, b in ((third, 2 * third), (2 * third, 3 * third))]
    common = dict(kind="labelled", augmentation=augmentation, image_size=image_size, batch_size=batch_size,
                  num_batches=num_batches)
    one = measure_pipeline(single, **common)
    three = measure_pipeline(mixed, weights=[1.0, 2.0, 0.5], **common)
    return {"single_source_img_per_cpu_s": one["img_per_cpu_s"], "mixture_img_per_cpu_s": three["img_per_cpu_s"],
            "mixture_vs_single": three["img_per_cpu_s"] / one["img_per_cpu_s"], "load": three["load"]}


def write_chexpert_tree(root: Path, num_images: int, rng: np.random.Generator) -> list[Path]:
    """A CheXpert-v1.0-small tree of gray 320 x 390 JPEGs, one frontal per patient (train.csv and a tenth in
    valid.csv); returns the image paths."""
    release = root / "CheXpert-v1.0-small"
    bases = [synthetic_xray(rng, 390)[:, :320] for _ in range(4)]
    rows = {"train": [], "valid": []}
    paths = []
    for i in range(num_images):
        table = "valid" if i % 10 == 9 else "train"
        relative = f"{table}/patient{i + 1:05d}/study1/view1_frontal.jpg"
        path = release / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        noisy = np.clip(bases[i % 4].astype(np.int16) + rng.integers(-3, 4, bases[0].shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(path)
        rows[table].append(f"CheXpert-v1.0-small/{relative},Male,{30 + i % 50},Frontal,PA,"
                           + ",".join("1.0" if (i + j) % 7 == 0 else "" for j in range(14)))
    for table, lines in rows.items():
        header = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_OBSERVATIONS)
        (release / f"{table}.csv").write_text("\n".join([header, *lines]) + "\n")
    return paths


def write_padchest_tree(root: Path, num_images: int, size: int, rng: np.random.Generator) -> list[Path]:
    """A PadChest tree of 16-bit PNGs holding 12-bit data (BitsStored_DICOM 12), PA, one per patient."""
    root.mkdir(parents=True, exist_ok=True)
    header = ("ImageID,ImageDir,StudyDate_DICOM,PatientID,PatientBirth,PatientSex_DICOM,Projection,MethodLabel,"
              "Labels,BitsStored_DICOM,PhotometricInterpretation_DICOM")
    lines, paths = [header], []
    base = synthetic_xray(rng, size).astype(np.uint16) * 16
    for i in range(num_images):
        image_id = f"{i:020d}_00-000-000.png"
        path = root / str(i % 3) / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(base + rng.integers(0, 16, base.shape).astype(np.uint16)).save(path)
        paths.append(path)
        lines.append(f"{image_id},{i % 3},20120101,{i},1950.0,M,PA,Physician,\"['normal']\",12,MONOCHROME2")
    (root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv").write_text("\n".join(lines) + "\n")
    return paths


def naive_pil_loop(paths: Sequence[Path], resolution: int, bits: int | None = None) -> dict:
    """The naive loop: PIL open, 8-bit gray (16-bit data scaled by its bit depth), BILINEAR resize, one thread."""
    def work():
        for path in paths:
            with Image.open(path) as image:
                if bits:
                    gray = Image.fromarray((np.asarray(image).astype(np.float32) * (255.0 / (2 ** bits - 1)))
                                           .astype(np.uint8))
                else:
                    gray = image.convert("L")
                np.asarray(gray.resize((resolution, resolution), Image.Resampling.BILINEAR))

    return timed(work, len(paths))


def measure_source_builds(workdir: Path, args: argparse.Namespace) -> dict:
    """The reader and the whole build of JPEG and 16-bit PNG sources against the naive loop (module docstring)."""
    rng = np.random.default_rng(2)
    sources = []
    if args.jpeg_images:
        sources.append(("jpeg", "chexpert", write_chexpert_tree(workdir / "chexpert", args.jpeg_images, rng), None))
    if args.png16_images:
        sources.append(("png16", "padchest", write_padchest_tree(workdir / "padchest", args.png16_images,
                                                                   args.png16_size, rng), 12))
    naive = {name: naive_pil_loop(paths, args.resolution, bits) for name, _, paths, bits in sources}
    images._keep_large_buffers_on_the_heap()  # as every build's decoding workers do
    out = {}
    for name, dataset, paths, bits in sources:
        declared = [bits] * len(paths)

        def decode(paths=paths, declared=declared):
            for _, error in images.decode_many(paths, args.resolution, progress=False, declared_bits=declared):
                assert error is None, error

        reader = timed(decode, len(paths))
        built = timed(lambda dataset=dataset: build.build_dataset(
            dataset, workdir / dataset, workdir / "tfds_sources", resolution=args.resolution, num_workers=1,
            progress=False), len(paths))
        base = naive[name]["img_per_cpu_s"]
        out.update({f"{name}_naive_pil_img_per_cpu_s": base, f"{name}_reader_img_per_cpu_s": reader["img_per_cpu_s"],
                    f"{name}_build_img_per_cpu_s": built["img_per_cpu_s"],
                    f"{name}_reader_vs_naive_per_core": reader["img_per_cpu_s"] / base,
                    f"{name}_build_vs_naive_per_core": built["img_per_cpu_s"] / base})
        print(f"{name:>9} source ({len(paths)} images), per CPU second: naive PIL {base:8.1f}, reader "
              f"{reader['img_per_cpu_s']:8.1f} ({reader['img_per_cpu_s'] / base:.2f}x), build "
              f"{built['img_per_cpu_s']:8.1f} ({built['img_per_cpu_s'] / base:.2f}x)  load {built['load']}")
        for mode, options in (("in_memory", "--direct_running_mode=in_memory"),
                              ("2_workers", "--direct_running_mode=multi_processing --direct_num_workers=2")):
            if not args.beam:
                break
            beam = timed_with_children(lambda dataset=dataset, mode=mode, options=options: build.build_dataset(
                dataset, workdir / dataset, workdir / f"tfds_direct_{mode}", resolution=args.resolution,
                progress=False, runner="direct", beam_options=options), len(paths))
            out[f"{name}_direct_{mode}_build_vs_naive_per_core"] = beam["img_per_cpu_s"] / base
            print(f"{name:>9} source, DirectRunner {mode}: build {beam['img_per_cpu_s']:8.1f} per CPU second "
                  f"({beam['img_per_cpu_s'] / base:.2f}x naive, no goal)  load {beam['load']}")
    return out


FULL_SIZE_SOURCES = {  # name: (what it stands for, writer of one file of that kind)
    "nih": "ChestX-ray14: 1024 x 1024 8-bit gray PNG",
    "chexpert": "CheXpert (full size): 2320 x 2828 8-bit gray JPEG",
    "padchest": "PadChest: 2500 x 2500 16-bit gray PNG holding 12-bit data",
    "mimic": "MIMIC-CXR: 2500 x 2500 uncompressed 16-bit DICOM, 12 bits stored, MONOCHROME2",
}


def write_full_size(kind: str, path: Path, rng: np.random.Generator) -> Path:
    """One synthetic X-ray-like file of `kind` at a real dataset's full size (FULL_SIZE_SOURCES)."""
    if kind == "nih":
        Image.fromarray(synthetic_xray(rng, 1024)).save(path)
    elif kind == "chexpert":
        Image.fromarray(synthetic_xray(rng, 2828)[:, :2320]).save(path, quality=90)
    elif kind == "padchest":
        Image.fromarray(synthetic_xray(rng, 2500).astype(np.uint16) * 16 + rng.integers(0, 16, (2500, 2500),
                                                                                        dtype=np.uint16)).save(path)
    else:
        import pydicom  # an optional codec (see images.py): only this benchmark writes DICOM
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (DigitalXRayImageStorageForPresentation,
                                                                         generate_uid())
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "DX", "MONOCHROME2", 1
        ds.Rows = ds.Columns = 2500
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (synthetic_xray(rng, 2500).astype(np.uint16) * 16).tobytes()
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def measure_full_size_costs(workdir: Path, resolution: int, count: int = 3) -> dict:
    """CPU milliseconds per image of a build's work (work.process_chunk: read, decode, resize, record bytes) on
    files the size of each big dataset's (FULL_SIZE_SOURCES), in this process; the paper estimate of
    docs/beam.md starts from these."""
    rng = np.random.default_rng(3)
    out = {}
    for kind, what in FULL_SIZE_SOURCES.items():
        suffix = {"nih": "png", "chexpert": "jpg", "padchest": "png", "mimic": "dcm"}[kind]
        paths = [write_full_size(kind, workdir / f"full_{kind}_{i}.{suffix}", rng) for i in range(count)]
        records = tuple(labelled.LabelledRecord(image_id=p.name, path=str(p), patient_id=p.name, labels=(1,),
                                                age=50.0, age_valid=True, sex_male=1, view_ap=0, view="PA")
                        for p in paths)
        chunk = work.Chunk("train", 0, records, work.RecordSpec("labelled", resolution, ("x",)))
        result = work.process_chunk(chunk)  # (also a warm-up: pydicom is imported on the first DICOM)
        assert not result.tally.problems, result.tally.problems
        figures = timed(lambda chunk=chunk: work.process_chunk(chunk), count)
        megabytes = sum(p.stat().st_size for p in paths) / count / 1e6
        out[f"full_size_{kind}_cpu_ms"] = 1e3 / figures["img_per_cpu_s"]
        out[f"full_size_{kind}_file_mb"] = megabytes
        print(f"full size, {what} ({megabytes:.1f} MB): {1e3 / figures['img_per_cpu_s']:.1f} ms of CPU per image "
              f"to a {resolution} px record  load {figures['load']}")
    return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.bench data", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--synthetic", action=argparse.BooleanOptionalAction, default=False,
        help="build a synthetic chestxray14 dataset here and benchmark on it")
    add("--data_dir", help="the data_dir holding a built dataset")
    add("--dataset", default="chestxray14/r256", help="built dataset, DATASET/CONFIG (e.g. chestxray14/r256)")
    add("--split", default="train", help="split to read")
    add("--num_records", type=int, default=512, help="--synthetic: raw images generated and built (and the records "
                                                     "copied to builders 1.x's layout for the read comparison)")
    add("--build_size", type=int, default=512, help="--synthetic: side of those raw PNGs (the real ones: 1024)")
    add("--resolution", type=int, default=256, help="--synthetic: stored resolution")
    add("--image_size", type=int, default=224, help="model resolution")
    add("--batch_size", type=int, default=32, help="batch size")
    add("--num_batches", type=int, default=100, help="batches timed per configuration (after warm-up)")
    add("--num_workers", type=int, default=os.cpu_count() or 1,
        help="workers for the multi-process host run (0: in-process runs only)")
    add("--rotation_degrees", type=float, default=10.0, help="augmentation: max rotation")
    add("--scale_range", type=lambda text: [float(v) for v in text.split(",")], default=[0.9, 1.1],
        help="augmentation: zoom range, LOW,HIGH")
    add("--translate_fraction", type=float, default=0.05, help="augmentation: max shift / image size")
    add("--naive_images", type=int, default=8, help="1024x1024 PNGs written for the naive loader")
    add("--naive_samples", type=int, default=64, help="samples timed for the naive loader")
    add("--num_reads", type=int, default=500, help="records read one by one for the read figures")
    add("--mixture", action=argparse.BooleanOptionalAction, default=True,
        help="time the host pipeline over a 3-source mixture against one source")
    add("--jpeg_images", type=int, default=2000, help="CheXpert-small-like 320 x 390 JPEGs (0 = skip)")
    add("--png16_images", type=int, default=32, help="PadChest-like 16-bit PNGs (0 = skip)")
    add("--png16_size", type=int, default=2000, help="side of those PNGs")
    add("--full_size", action=argparse.BooleanOptionalAction, default=False,
        help="also time a build's work per image on files of the big datasets' full sizes (the paper estimate)")
    add("--beam", action=argparse.BooleanOptionalAction, default=False,
        help="also time the source builds on Beam's DirectRunner (needs the beam extra)")
    args = parser.parse_args(argv)
    if not args.synthetic and not args.data_dir:
        parser.error("give --synthetic, or --data_dir (and --dataset) of a built dataset")
    if len(args.scale_range) != 2:
        parser.error(f"--scale_range takes LOW,HIGH, got {args.scale_range}")
    return args


def main(argv: Sequence[str]) -> dict:
    args = parse_args(argv)
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; this entry point has none
        flags.FLAGS.mark_as_parsed()
    low, high = args.scale_range
    augmentation = Augmentation(rotation_degrees=args.rotation_degrees, scale_range=(low, high),
                                translate_fraction=args.translate_fraction)
    results = {"image_size": args.image_size, "batch_size": args.batch_size, "augmentation": repr(augmentation),
               "cpu_count": os.cpu_count(), "load_at_start": load()}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data_dir, dataset = args.data_dir, args.dataset
        if args.synthetic:
            built = build_synthetic_dataset(workdir, args.num_records, args.build_size, args.resolution)
            data_dir, dataset = built.pop("data_dir"), built.pop("dataset")
            results.update(built)
            print(f"dataset build:        {built['build_img_per_s']:9.1f} img/s ({built['build_workers']} processes, "
                  f"{args.build_size} px PNGs -> {args.resolution} px records)  load {load()}")
        name, config_name = dataset.split("/")
        source = builders.data_source(name, args.split, os.path.expanduser(data_dir), config_name=config_name)
        old_layout = TfExampleSource(source, workdir / "tf_example.array_record", limit=args.num_records)
        kind = registry.family(name).kind
        results.update(source=f"{dataset}/{args.split}", records=len(source),
                       stored_resolution=int(np.asarray(source[0]["image"]).shape[0]),
                       record_layout_version=source.dataset_info.version)

        results["read_us_tf_example"] = measure_reads(old_layout, args.num_reads)
        results["read_us"] = measure_reads(source, args.num_reads)
        print(f"one record: {results['read_us']:.0f} us of CPU (builders 1.x's tf.Example layout: "
              f"{results['read_us_tf_example']:.0f} us)  load {load()}")

        common = dict(kind=kind, image_size=args.image_size, batch_size=args.batch_size,
                      num_batches=args.num_batches)
        figures = measure_pipeline(old_layout, augmentation=None, **common)
        results["device_tf_example_img_per_cpu_s"] = figures["img_per_cpu_s"]
        for name, aug in (("device", None), ("crop_flip", Augmentation()), ("host", augmentation)):
            figures = measure_pipeline(source, augmentation=aug, **common)
            results[f"{name}_img_per_s"] = figures["img_per_s"]
            results[f"{name}_img_per_cpu_s"] = figures["img_per_cpu_s"]
            print(f"{name:>9}, 1 thread: {figures['img_per_s']:9.1f} img/s, {figures['img_per_cpu_s']:9.1f} img "
                  f"per CPU second  load {figures['load']}")
        print(f"   device, 1 thread, builders 1.x's layout: {results['device_tf_example_img_per_cpu_s']:9.1f} img per "
              f"CPU second")
        if args.num_workers > 0:
            figures = measure_pipeline(source, augmentation=augmentation, num_workers=args.num_workers, **common)
            results[f"host_{args.num_workers}_workers_img_per_s"] = figures["img_per_s"]
            print(f"     host, {args.num_workers} workers: {figures['img_per_s']:8.1f} img/s "
                  f"({figures['img_per_s'] / args.num_workers:.1f} per worker)  load {figures['load']}")

        rng = np.random.default_rng(1)
        png_paths = []
        for i in range(args.naive_images):
            png_paths.append(workdir / f"{i:08d}_000.png")
            Image.fromarray(synthetic_xray(rng, 1024)).save(png_paths[-1])
        naive = measure_naive_png_loader(png_paths, resolution=results["stored_resolution"],
                                         image_size=args.image_size, augmentation=augmentation,
                                         num_samples=args.naive_samples)
        results["naive_png_img_per_s"], results["naive_png_img_per_cpu_s"] = naive["img_per_s"], naive["img_per_cpu_s"]
        results["host_vs_naive_per_core"] = results["host_img_per_cpu_s"] / naive["img_per_cpu_s"]
        results["device_vs_naive_per_core"] = results["device_img_per_cpu_s"] / naive["img_per_cpu_s"]
        print(f"    naive, 1 thread: {naive['img_per_s']:9.1f} img/s, {naive['img_per_cpu_s']:9.1f} img per CPU "
              f"second  load {naive['load']}; per core, host = {results['host_vs_naive_per_core']:.1f}x naive, "
              f"device = {results['device_vs_naive_per_core']:.1f}x naive")
        if args.mixture:
            mixed = measure_mixture(source, augmentation=augmentation, image_size=args.image_size,
                                    batch_size=args.batch_size, num_batches=args.num_batches)
            print(f"  mixture, 1 thread: {mixed['mixture_img_per_cpu_s']:9.1f} img per CPU second over 3 sources vs "
                  f"{mixed['single_source_img_per_cpu_s']:.1f} over one: {mixed['mixture_vs_single']:.2f}x  load "
                  f"{mixed.pop('load')}")
            results.update(mixed)
        if args.jpeg_images or args.png16_images:
            results.update(measure_source_builds(workdir, args))
        if args.full_size:
            results.update(measure_full_size_costs(workdir, args.resolution))
    results["goals_met"] = {name: bool(results[name] >= goal) for name, goal in GOALS.items() if name in results}
    results["load_at_end"] = load()
    print("goals (per core, CPU rates): " + ", ".join(
        f"{name} {results[name]:.1f} (goal {goal:g}: {'met' if results['goals_met'][name] else 'NOT met'})"
        for name, goal in GOALS.items() if name in results))
    results = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in results.items()}
    print(json.dumps(results), flush=True)
    return results
