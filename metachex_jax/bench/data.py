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

Per-core figures divide by the processes doing the work (1 in-process, N with N workers); on a machine shared
with other jobs they are lower bounds.
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

from metachex_jax.data import pipeline, registry
from metachex_jax.data.augment import Augmentation, augment
from metachex_jax.labels import PATHOLOGIES

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
                     batch_size: int, num_batches: int, read_threads: int = 1, warmup_batches: int = 3) -> float:
    """Training-pipeline images per second (after warm-up, which also absorbs worker start-up)."""
    with pipeline.train_batches(source, kind=kind, global_batch_size=batch_size, image_size=image_size,
                                seed=0, augmentation=augmentation, num_workers=num_workers, read_threads=read_threads,
                                prefetch_batches=max(2, 2 * num_workers),
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
    results = {k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()}
    print(json.dumps(results), flush=True)
    return results
