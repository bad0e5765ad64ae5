"""Input-pipeline benchmark: training batches per second from stored records vs. a naive full-size PNG loader.

    python -m metachex_jax.bench data --synthetic
    python -m metachex_jax.bench data --data_dir=~/tensorflow_datasets --dataset=chestxray14

It measures `pipeline.train_batches` (crop to --image_size from the stored records, flip and the configured
affine) with 0 workers (in-process) and with --num_workers worker processes, and, in the same run, the way
ChestX-ray14 is commonly read: decode each original 1024 x 1024 PNG with PIL, resize it to the stored
resolution and crop (written to a temp dir here: --naive_images PNGs, read round-robin). It prints one line per
measurement and, last, one JSON object with all figures.

--synthetic writes its own records (NIH format, --resolution px) to a temporary ArrayRecord file, pickled
dicts, read back through `PickledArrayRecordSource`, so that reading goes through ArrayRecord like a built
dataset does. The dataset *build* throughput (raw PNGs -> ArrayRecord dataset, `data.build.build_dataset` with a
process pool over every core) is timed on a synthetic raw tree in the real NIH layout (--build_images PNGs of
--build_size px, written by the demo generator; 0 skips it).

Source builds (`--source_builds`, on by default) time `build.build_dataset` on two synthetic raw trees in their
real layouts, against a naive PIL loop (open, to 8-bit gray, BILINEAR resize to the stored resolution, one
process) over the same files: CheXpert-small-like gray JPEGs (--jpeg_images of 320 x 390) and PadChest-like
16-bit PNGs (--png16_images of --png16_size px holding 12-bit data, BitsStored_DICOM 12). Each reports the build's
img/s per core (total / decoding processes) and, the steady state without the build's fixed costs (pool start,
CSV parsing, writing the dataset), the reader's `decode_many` over the same files on a warm pool, per core; the
goal is >= 1.5x the naive loop per core.

The mixture figure (`--mixture`, on by default) is the training pipeline's img/s over three sources of the shared
label space (data/mixture.py: one NIH-format and two label-table sources, mixed by weight) against one source of
the same records, in-process; the goal is >= 0.9 of the single source's.

Per-core figures divide by the processes doing the work (1 in-process, N with N workers); on a machine shared
with other jobs they are lower bounds, and the ratios in one run are what count.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from metachex_jax.data import mixture, pipeline, registry
from metachex_jax.data.augment import Augmentation, augment
from metachex_jax.labels import PATHOLOGIES

CHEXPERT_OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                         "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                         "Pleural Other", "Fracture", "Support Devices")

class PickledArrayRecordSource:
    """A random-access source over ArrayRecord files whose records are pickled record dicts.

    Picklable (grain's ArrayRecordDataSource reopens the files in each worker process).
    """

    def __init__(self, paths: str | Sequence[str]):
        import grain
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


def synthetic_xray(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth X-ray-like uint8 image (a bright ellipse, a gradient, a little noise): compresses like one."""
    y, x = np.mgrid[0:size, 0:size] / size
    body = np.exp(-(((x - 0.5) / 0.35) ** 2 + ((y - 0.55) / 0.45) ** 2))
    image = 40 + 150 * body + 30 * y + rng.normal(0, 4, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def synthetic_nih_records(num_records: int, resolution: int, seed: int = 0) -> list[dict]:
    """Records in the chestxray14 format of the data contract (a handful of base images, varied labels)."""
    rng = np.random.default_rng(seed)
    bases = [synthetic_xray(rng, resolution) for _ in range(4)]
    return [{
        "image": bases[i % len(bases)][..., None],
        "image_name": f"{i:08d}_000.png",
        "patient_id": np.int64(i // 2),
        "follow_up": np.int64(i % 2),
        "labels": (rng.random(len(PATHOLOGIES)) < 0.1).astype(np.uint8),
        "age": np.float32(rng.uniform(1, 95)),
        "age_valid": True,
        "sex_male": np.int64(rng.integers(2)),
        "view_ap": np.int64(rng.integers(2)),
    } for i in range(num_records)]


def measure_pipeline(source, *, kind: str, num_workers: int, augmentation: Augmentation, image_size: int,
                     batch_size: int, num_batches: int, read_threads: int = 1, warmup_batches: int = 3,
                     weights: Sequence[float] | None = None) -> float:
    """Training-pipeline images per second (after warm-up, which also absorbs worker start-up); `source` may be a
    list of sources mixed by `weights`."""
    with pipeline.train_batches(source, kind=kind, global_batch_size=batch_size, image_size=image_size,
                                weights=weights, seed=0, augmentation=augmentation, num_workers=num_workers,
                                read_threads=read_threads, prefetch_batches=max(2, 2 * num_workers),
                                process_index=0, process_count=1) as batches:
        for _ in range(warmup_batches):
            next(batches)
        start = time.perf_counter()
        for _ in range(num_batches):
            next(batches)
        return num_batches * batch_size / (time.perf_counter() - start)


def measure_naive_png_loader(png_paths: Sequence[Path], *, resolution: int, image_size: int,
                             augmentation: Augmentation, num_samples: int) -> float:
    """Images per second of decode full-size PNG -> gray -> resize -> the same augmentation, one process."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(num_samples):
        with Image.open(png_paths[i % len(png_paths)]) as png:
            image = np.asarray(png.convert("L").resize((resolution, resolution), Image.Resampling.BILINEAR))
        augment(image, image_size, augmentation, rng)
    return num_samples / (time.perf_counter() - start)


def measure_build(build: Callable[[], object], num_images: int) -> float:
    """Images per second of any dataset-build callable (hook for the builders' raw PNG -> records timing)."""
    start = time.perf_counter()
    build()
    return num_images / (time.perf_counter() - start)


def measure_dataset_build(workdir: Path, num_images: int, png_size: int, resolution: int) -> dict:
    """Raw NIH-layout PNGs -> a chestxray14 ArrayRecord dataset with `build.build_dataset` (every core)."""
    from metachex_jax import demo_data
    from metachex_jax.data import build

    tree = demo_data.write_demo_data(workdir / "raw", num_nih=num_images, num_shenzhen=2, num_montgomery=2,
                                     num_hospital=0, size=png_size)
    workers = os.cpu_count() or 1
    rate = measure_build(lambda: build.build_dataset("chestxray14", tree["chestxray14_dir"], workdir / "tfds",
                                                       resolution=resolution, num_workers=workers,
                                                       progress=False), num_images)
    return {"build_img_per_s": rate, "build_workers": workers, "build_png_size": png_size}


# ---------------------------------------------------------------------------------------------------------------
# Source builds: JPEG (CheXpert-small-like) and 16-bit PNG (PadChest-like) raw trees vs a naive PIL loop.

def write_chexpert_tree(root: Path, num_images: int, rng: np.random.Generator) -> list[Path]:
    """A CheXpert-v1.0-small tree of gray 320 x 390 JPEGs, one frontal per patient (train.csv and a few in
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


def naive_pil_img_per_s(paths: Sequence[Path], resolution: int, bits: int | None = None) -> float:
    """The naive loop: PIL open, 8-bit gray (16-bit data scaled by its bit depth), BILINEAR resize, one process."""
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            if bits:
                gray = Image.fromarray((np.asarray(image).astype(np.float32) * (255.0 / (2 ** bits - 1)))
                                       .astype(np.uint8))
            else:
                gray = image.convert("L")
            np.asarray(gray.resize((resolution, resolution), Image.Resampling.BILINEAR))
    return len(paths) / (time.perf_counter() - start)


def decode_img_per_s(paths: Sequence[Path], resolution: int, workers: int, declared_bits: int | None) -> float:
    """The reader's decode_many over `paths` on a warm pool of `workers` worker processes, as a build decodes
    (total img/s; the main process only collects)."""
    from metachex_jax.data import images

    declared = [declared_bits] * len(paths)
    with images.decoding_pool(workers, pool_for_one=True) as pool:  # decoding as a build's workers do
        list(images.decode_many(paths[:workers], resolution, pool=pool, progress=False,
                                declared_bits=declared[:workers]))  # start the workers
        start = time.perf_counter()
        for _, error in images.decode_many(paths, resolution, pool=pool, progress=False, declared_bits=declared):
            assert error is None, error
        return len(paths) / (time.perf_counter() - start)


def measure_source_builds(workdir: Path, args: argparse.Namespace) -> dict:
    """Build throughput per core of the JPEG and 16-bit PNG sources against the naive loop (module docstring)."""
    from metachex_jax.data import build

    rng = np.random.default_rng(2)
    workers = args.build_workers
    out = {"source_build_workers": workers}
    sources = (("jpeg", "chexpert", lambda: write_chexpert_tree(workdir / "chexpert", args.jpeg_images, rng), None),
               ("png16", "padchest", lambda: write_padchest_tree(workdir / "padchest", args.png16_images,
                                                                   args.png16_size, rng), 12))
    for name, dataset, write, bits in sources:
        if not (args.jpeg_images if name == "jpeg" else args.png16_images):
            continue
        paths = write()
        naive = naive_pil_img_per_s(paths, args.resolution, bits)
        decode = decode_img_per_s(paths, args.resolution, workers, bits) / workers
        start = time.perf_counter()
        build.build_dataset(dataset, workdir / dataset, workdir / "tfds", resolution=args.resolution,
                            num_workers=workers, progress=False)
        built = len(paths) / (time.perf_counter() - start) / workers
        out.update({f"{name}_naive_pil_img_per_s_per_core": naive, f"{name}_decode_img_per_s_per_core": decode,
                    f"{name}_build_img_per_s_per_core": built, f"{name}_decode_vs_naive_per_core": decode / naive,
                    f"{name}_build_vs_naive_per_core": built / naive})
        print(f"{name:5} source ({len(paths)} images): naive PIL {naive:7.1f} img/s (1 core); reader "
              f"{decode:7.1f}/core ({decode / naive:.2f}x); build {built:7.1f}/core ({built / naive:.2f}x)")
    return out


def measure_mixture(args: argparse.Namespace, workdir: Path, augmentation: Augmentation) -> dict:
    """Pipeline img/s: three sources of the shared label space mixed by weight vs one source of the same records."""
    records = synthetic_nih_records(args.num_records, args.resolution)
    labelled = [{**r, "labels": np.where(np.arange(14) < 7, r["labels"].astype(np.int8), np.int8(-1)),
                 "image_id": r["image_name"], "patient_key": r["patient_id"]} for r in records]
    third = len(records) // 3
    paths = {}
    for name, part in (("all", records), ("nih", records[:third]), ("a", labelled[third:2 * third]),
                       ("b", labelled[2 * third:])):
        paths[name] = workdir / f"mixture_{name}.array_record"
        write_pickled_array_records(paths[name], part)
    space = mixture.label_space("No Finding")
    single = mixture.HarmonisedSource(PickledArrayRecordSource(str(paths["all"])), dataset="chestxray14",
                                      kind="nih", space=space)
    mixed = [mixture.HarmonisedSource(PickledArrayRecordSource(str(paths["nih"])), dataset="chestxray14",
                                      kind="nih", space=space)]
    mixed += [mixture.HarmonisedSource(PickledArrayRecordSource(str(paths[n])), dataset="csv", kind="labelled",
                                       space=space, label_names=PATHOLOGIES) for n in ("a", "b")]
    common = dict(kind="labelled", num_workers=0, augmentation=augmentation, image_size=args.image_size,
                  batch_size=args.batch_size, num_batches=args.num_batches, read_threads=args.read_threads)
    one = measure_pipeline(single, **common)
    three = measure_pipeline(mixed, weights=[1.0, 2.0, 0.5], **common)
    print(f"mixture pipeline:       {three:8.1f} img/s (3 sources) vs {one:.1f} (1 source): "
          f"{three / one:.2f}x")
    return {"mixture_img_per_s": three, "single_source_img_per_s": one, "mixture_vs_single": three / one}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.bench data", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--synthetic", action=argparse.BooleanOptionalAction, default=False,
        help="benchmark on generated records instead of a built dataset")
    add("--data_dir", help="tensorflow_datasets data_dir holding the built dataset")
    add("--dataset", default="chestxray14", help="built dataset (tfds name, e.g. chestxray14/r256)")
    add("--split", default="train", help="split to read")
    add("--num_records", type=int, default=512, help="synthetic records to write")
    add("--resolution", type=int, default=256, help="stored resolution of synthetic records / naive resize")
    add("--image_size", type=int, default=224, help="model resolution")
    add("--batch_size", type=int, default=32, help="batch size")
    add("--num_batches", type=int, default=100, help="batches timed per configuration (after warm-up)")
    add("--num_workers", type=int, default=os.cpu_count() or 1,
        help="workers for the multi-process run (0: in-process run only)")
    add("--read_threads", type=int, default=1, help="reader threads per process")
    add("--rotation_degrees", type=float, default=10.0, help="augmentation: max rotation")
    add("--scale_range", type=lambda text: [float(v) for v in text.split(",")], default=[0.9, 1.1],
        help="augmentation: zoom range, LOW,HIGH")
    add("--translate_fraction", type=float, default=0.05, help="augmentation: max shift / image size")
    add("--naive_images", type=int, default=8, help="1024x1024 PNGs written for the naive loader")
    add("--naive_samples", type=int, default=64, help="samples timed for the naive loader")
    add("--build_images", type=int, default=200, help="raw NIH-layout PNGs for the build timing (0 = skip)")
    add("--build_size", type=int, default=512, help="side of those raw PNGs (the real ones are 1024)")
    add("--source_builds", action=argparse.BooleanOptionalAction, default=True,
        help="time JPEG and 16-bit PNG source builds against a naive PIL loop")
    add("--jpeg_images", type=int, default=400, help="CheXpert-small-like 320 x 390 JPEGs (0 = skip)")
    add("--png16_images", type=int, default=16, help="PadChest-like 16-bit PNGs (0 = skip)")
    add("--png16_size", type=int, default=2000, help="side of those PNGs")
    add("--build_workers", type=int, default=os.cpu_count() or 1, help="decoding processes of the source builds")
    add("--mixture", action=argparse.BooleanOptionalAction, default=True,
        help="time the pipeline over a 3-source mixture against one source")
    args = parser.parse_args(argv)
    if not args.synthetic and not args.data_dir:
        parser.error("give --synthetic, or --data_dir (and --dataset) of a built dataset")
    if len(args.scale_range) != 2:
        parser.error(f"--scale_range takes LOW,HIGH, got {args.scale_range}")
    return args


def _open_source(args: argparse.Namespace, workdir: Path):
    if args.synthetic:
        path = workdir / "synthetic.array_record"
        write_pickled_array_records(path, synthetic_nih_records(args.num_records, args.resolution))
        return PickledArrayRecordSource(str(path)), "synthetic"
    import tensorflow_datasets as tfds  # only here: no TensorFlow needed for array_record data sources
    source = tfds.data_source(args.dataset, split=args.split, data_dir=args.data_dir)
    return source, f"{args.dataset}/{args.split}"


def main(argv: Sequence[str]) -> dict:
    args = parse_args(argv)
    low, high = args.scale_range
    augmentation = Augmentation(rotation_degrees=args.rotation_degrees, scale_range=(low, high),
                                translate_fraction=args.translate_fraction)
    common = dict(augmentation=augmentation, image_size=args.image_size, batch_size=args.batch_size,
                  num_batches=args.num_batches, read_threads=args.read_threads)
    results = {"image_size": args.image_size, "batch_size": args.batch_size,
               "augmentation": repr(augmentation), "cpu_count": os.cpu_count(),
               "read_threads": args.read_threads}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        source, results["source"] = _open_source(args, workdir)
        common["kind"] = "nih" if args.synthetic else registry.family(args.dataset.split("/")[0]).kind
        results["stored_resolution"] = int(np.asarray(source[0]["image"]).shape[0])

        in_process = measure_pipeline(source, num_workers=0, **common)
        results["pipeline_0_workers_img_per_s"] = in_process
        results["pipeline_0_workers_img_per_s_per_core"] = in_process
        print(f"pipeline, in-process:   {in_process:8.1f} img/s (1 core)")

        workers = args.num_workers
        if workers > 0:
            multi = measure_pipeline(source, num_workers=workers, **common)
            results[f"pipeline_{workers}_workers_img_per_s"] = multi
            results[f"pipeline_{workers}_workers_img_per_s_per_core"] = multi / workers
            print(f"pipeline, {workers} workers:   {multi:8.1f} img/s ({multi / workers:.1f} per core)")

        rng = np.random.default_rng(1)
        png_paths = []
        for i in range(args.naive_images):
            png_paths.append(workdir / f"{i:08d}_000.png")
            Image.fromarray(synthetic_xray(rng, 1024)).save(png_paths[-1])
        naive = measure_naive_png_loader(png_paths, resolution=results["stored_resolution"],
                                         image_size=args.image_size, augmentation=augmentation,
                                         num_samples=args.naive_samples)
        results["naive_png_img_per_s_per_core"] = naive
        results["speedup_per_core_vs_naive_png"] = in_process / naive
        print(f"naive PNG loader:       {naive:8.1f} img/s (1 core); "
              f"pipeline/naive per core = {in_process / naive:.1f}x")
        if args.build_images:
            build = measure_dataset_build(workdir, args.build_images, args.build_size, args.resolution)
            results.update(build)
            print(f"dataset build:          {build['build_img_per_s']:8.1f} img/s ({build['build_workers']} "
                  f"processes, {args.build_size} px PNGs -> {args.resolution} px records)")
        if args.mixture:
            results.update(measure_mixture(args, workdir, augmentation))
        if args.source_builds:
            results.update(measure_source_builds(workdir, args))
    results = {k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()}
    print(json.dumps(results), flush=True)
    return results
