"""Input-pipeline benchmark: what the host does per training image, per core, against a naive full-size PNG loader.

    python -m metachex_jax.bench data --synthetic
    python -m metachex_jax.bench data --data_dir=~/tensorflow_datasets --dataset=chestxray14/r256

On one split of a built dataset, in one run:

    read       one record by index: `tfds.data_source` (TFDS's generic decoding) against `builders.data_source`
               (records.RecordSource, what the trainer reads with), microseconds of CPU per record
    device     `pipeline.train_batches(augmentation=None)`: read + batch, all the host does with
               config.data.augment_on="device" (goal: >= 10,000 img/s per core)
    crop_flip  read + random crop + flip on the host
    host       read + crop + flip + the affine on the host, augment_on="host" (goals: >= 1,000 img/s per core
               and >= 10x the naive loader per core)
    workers    the host figure with --num_workers worker processes (per core = total / workers)
    naive      the common way to read ChestX-ray14: decode a 1024 x 1024 PNG with PIL, convert, resize to the
               stored resolution, the same augmentation (--naive_images PNGs written here, read round-robin)
    build      --synthetic: raw PNGs -> the dataset read above (`data.build.build_dataset`, every core)

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
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from metachex_jax.data import pipeline, registry
from metachex_jax.data.augment import Augmentation, augment

GOALS = {"device_img_per_cpu_s": 10_000, "host_img_per_cpu_s": 1_000, "host_vs_naive_per_core": 10.0}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def timed(work, count: int) -> dict:
    """{"img_per_s": count / wall seconds, "img_per_cpu_s": count / CPU seconds of this process, "load": ...}."""
    cpu, wall = time.process_time(), time.perf_counter()
    work()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"img_per_s": count / wall, "img_per_cpu_s": count / max(cpu, 1e-9), "load": load()}


def measure_pipeline(source, *, kind: str, augmentation: Augmentation | None, image_size: int, batch_size: int,
                     num_batches: int, num_workers: int = 0, warmup_batches: int = 3) -> dict:
    """Training batches of `pipeline.train_batches` (augmentation=None: read + batch only). In-process
    (num_workers=0) on one thread; after warm-up (which also absorbs worker start-up)."""
    with pipeline.train_batches(source, kind=kind, global_batch_size=batch_size, image_size=image_size, seed=0,
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
    from metachex_jax import demo_data
    from metachex_jax.data import build

    tree = demo_data.write_demo_data(workdir / "raw", num_nih=num_images, num_shenzhen=2, num_montgomery=2,
                                     size=png_size)
    workers = os.cpu_count() or 1
    start = time.perf_counter()
    result = build.build_dataset("chestxray14", tree["chestxray14_dir"], workdir / "tfds", resolution=resolution,
                                 num_workers=workers, progress=False)
    return {"build_img_per_s": num_images / (time.perf_counter() - start), "build_workers": workers,
            "build_png_size": png_size, "data_dir": str(workdir / "tfds"),
            "dataset": f"chestxray14/{result.config_name}"}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.bench data", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--synthetic", action=argparse.BooleanOptionalAction, default=False,
        help="build a synthetic chestxray14 dataset here and benchmark on it")
    add("--data_dir", help="tensorflow_datasets data_dir holding a built dataset")
    add("--dataset", default="chestxray14", help="built dataset (tfds name, e.g. chestxray14/r256)")
    add("--split", default="train", help="split to read")
    add("--num_records", type=int, default=512, help="--synthetic: raw images generated and built")
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
    args = parser.parse_args(argv)
    if not args.synthetic and not args.data_dir:
        parser.error("give --synthetic, or --data_dir (and --dataset) of a built dataset")
    if len(args.scale_range) != 2:
        parser.error(f"--scale_range takes LOW,HIGH, got {args.scale_range}")
    return args


def main(argv: Sequence[str]) -> dict:
    import tensorflow_datasets as tfds  # no TensorFlow needed for array_record data sources

    from metachex_jax.data.records import RecordSource

    args = parse_args(argv)
    tfds.disable_progress_bar()
    from absl import flags
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
        generic = tfds.data_source(dataset, split=args.split, data_dir=os.path.expanduser(data_dir))
        source = RecordSource(generic)
        kind = registry.family(dataset.split("/")[0]).kind
        results.update(source=f"{dataset}/{args.split}", records=len(source),
                       stored_resolution=int(np.asarray(source[0]["image"]).shape[0]),
                       record_layout_version=str(generic.dataset_info.version))

        results["read_us_tfds"] = measure_reads(generic, min(args.num_reads, 200))
        results["read_us_fast"] = measure_reads(source, args.num_reads)
        print(f"one record: tfds.data_source {results['read_us_tfds']:.0f} us, RecordSource "
              f"{results['read_us_fast']:.0f} us of CPU  load {load()}")

        common = dict(kind=kind, image_size=args.image_size, batch_size=args.batch_size,
                      num_batches=args.num_batches)
        for name, aug in (("device", None), ("crop_flip", Augmentation()), ("host", augmentation)):
            figures = measure_pipeline(source, augmentation=aug, **common)
            results[f"{name}_img_per_s"] = figures["img_per_s"]
            results[f"{name}_img_per_cpu_s"] = figures["img_per_cpu_s"]
            print(f"{name:>9}, 1 thread: {figures['img_per_s']:9.1f} img/s, {figures['img_per_cpu_s']:9.1f} img "
                  f"per CPU second  load {figures['load']}")
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
    results["goals_met"] = {name: bool(results[name] >= goal) for name, goal in GOALS.items()}
    results["load_at_end"] = load()
    print("goals (per core, CPU rates): " + ", ".join(
        f"{name} {results[name]:.1f} (goal {goal:g}: {'met' if results['goals_met'][name] else 'NOT met'})"
        for name, goal in GOALS.items()))
    results = {k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()}
    print(json.dumps(results), flush=True)
    return results
