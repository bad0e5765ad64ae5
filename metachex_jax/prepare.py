"""Build, verify or check the prepared datasets (the command line over metachex_jax.data.build).

    python -m metachex_jax.prepare --dataset=chestxray14 --manual_dir=RAW/ChestX-ray14 --data_dir=OUT \\
        [--resolution=256] [--val_fraction=0.1] [--num_folds=10] [--seed=0] [--skip_bad] [--overwrite] [--workers=N]
    python -m metachex_jax.prepare --dataset=padchest --manual_dir=gs://BUCKET/padchest --data_dir=gs://BUCKET/tfds \\
        --runner=dataflow --beam_options="--project=P --region=R --temp_location=gs://BUCKET/tmp ..."
    python -m metachex_jax.prepare --dataset=shenzhen --manual_dir=RAW --data_dir=OUT --verify [--strict_counts]
    python -m metachex_jax.prepare --dataset=shenzhen --data_dir=OUT --check_built [--resolution=256 ...]
    python -m metachex_jax.prepare --dataset=chexpert --manual_dir=RAW --data_dir=OUT [--views=frontal|all] \\
        [--uncertainty=ignore|ones|zeros|ignore,Atelectasis=ones,...] [--test_fraction=0.1]
    python -m metachex_jax.prepare --dataset=csv --csv=LABELS.csv --manual_dir=IMAGE_ROOT --data_dir=OUT \\
        [--num_folds=10] [--stratify_by=COLUMN] [--val_fraction=0.1] [--test_fraction=0.2]
Every dataset also takes the reader's options (imaging/images.py): --bit_depth=N reads high-depth images (16-bit
PNG/TIFF, DICOM) as N-bit data instead of the reader's rule (8-bit images ignore it; the build is then named
r256_bits12 and read by runs with --config.data.bit_depth=12), --geometry=crop_resize keeps the centre square of
each image (r256_square, read by crop_resize models such as torchxrayvision's), --max_pixels=N refuses images
larger than N pixels (default 100,000,000) as undecodable, before decoding them.

--runner: `local` (default: this machine's processes, --workers), or Apache Beam's `direct`, `dataflow`, `flink`,
`spark` (the `beam` extra; --beam_options are Beam's own flags). Every runner writes the same records. The
--manual_dir and --data_dir may be gs:// URLs (or a shared mount).

Build prints where the dataset went, its split sizes, what was skipped (with --skip_bad) and the read call.
Exit status: 0 built (or already built; --check_built: no damage), 1 raw-data problems (the message lists every
one) or, for --check_built, damaged records (listed by split and index, or whole shards), 2 usage errors
(including a bad option value, e.g. an unknown uncertainty policy, a CSV without a path column, or a Beam runner
without apache-beam installed).

--verify checks the raw copy WITHOUT building and exits 1 when it finds problems (what is checked, and the count
rule: metachex_jax/data/build/build.py). --clean deletes the unpublished build folders of a config (left by killed
builds; make sure none of its builds is running). The datasets and their build parameters are the table in
metachex_jax/data/build/registry.py; a parameter a dataset does not take (--num_folds for chestxray14) is ignored.
"""

from __future__ import annotations

import argparse
import sys

from metachex_jax.core import console
from metachex_jax.data.build import build, registry
from metachex_jax.data.raw.common import RawDataError
from metachex_jax.imaging import images


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=list(registry.DATASETS))
    parser.add_argument("--manual_dir", help="the raw copy (dataset folder or its parent; local or gs://); "
                                             "required unless --check_built or --clean")
    parser.add_argument("--data_dir", help="where the prepared datasets go (local or gs://; required unless --verify)")
    parser.add_argument("--resolution", type=int, default=256)
    defaults: dict[str, dict] = {}  # parameter -> {family: its default}
    for family in registry.DATASETS.values():
        for name, default in family.parameters.items():
            defaults.setdefault(name, {})[family.name] = default
    for name, by_family in defaults.items():  # every family's build parameters; the default is the family's own
        text = ", ".join(f"{family} {default!r}" for family, default in by_family.items())
        parser.add_argument(f"--{name}", type=type(next(iter(by_family.values()))), default=None,
                            help=f"{registry.PARAMETER_HELP[name]} (defaults: {text})")
    parser.add_argument("--skip_bad", action="store_true", help="drop offending items and list them in the report")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if a complete build exists")
    parser.add_argument("--runner", default="local", choices=build.RUNNERS,
                        help="local: this machine's processes (--workers); direct, dataflow, flink, spark: Apache "
                             "Beam's runners (the beam extra)")
    parser.add_argument("--beam_options", default="",
                        help='Beam pipeline options, as on a command line: "--project=P --region=R ..."')
    parser.add_argument("--workers", type=int, default=None,
                        help="processes of the local runner and of --verify / --check_built (default: every core)")
    parser.add_argument("--verify", action="store_true", help="check the raw copy only; exit 1 on problems")
    parser.add_argument("--strict_counts", action="store_true", help="--verify: the copy must be complete")
    parser.add_argument("--no_image_check", action="store_true", help="--verify: skip decoding every image")
    parser.add_argument("--check_built", action="store_true",
                        help="read and check every record of the published build; exit 1 on damage")
    parser.add_argument("--clean", action="store_true",
                        help="delete the unpublished build folders of this config (no build of it may be running)")
    parser.add_argument("--max_pixels", type=int, default=images.DEFAULT_MAX_PIXELS,
                        help="refuse images whose header declares more pixels, before decoding them (default "
                             f"{images.DEFAULT_MAX_PIXELS:,}: far above any radiograph; a decompression bomb guard)")
    args = parser.parse_args(argv)
    if args.max_pixels < 1:
        parser.error(f"--max_pixels={args.max_pixels}: must be >= 1")
    if sum([args.verify, args.check_built, args.clean]) > 1:
        parser.error("give one of --verify, --check_built and --clean")
    if not args.verify and not args.data_dir:
        parser.error("--data_dir is required (unless --verify)")
    if not (args.check_built or args.clean) and not args.manual_dir:
        parser.error("--manual_dir is required (unless --check_built or --clean)")
    if args.beam_options and args.runner == "local":
        parser.error("--beam_options are for a Beam runner (--runner=direct, dataflow, flink or spark)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    console.setup()
    family = registry.family(args.dataset)
    parameters = {name: getattr(args, name) for name in family.parameters if getattr(args, name) is not None}
    try:
        if args.verify:
            report = build.verify_raw(args.dataset, args.manual_dir, check_images=not args.no_image_check,
                                      strict_counts=args.strict_counts, num_workers=args.workers,
                                      max_pixels=args.max_pixels, **parameters)
            print(report.format())
            return 0 if report.ok else 1
        if args.check_built:
            checked = build.check_built(args.dataset, args.data_dir, resolution=args.resolution,
                                        num_workers=args.workers, **parameters)
            print(checked.format())
            return 0 if checked.ok else 1
        if args.clean:
            removed = build.clean(args.dataset, args.data_dir, resolution=args.resolution, **parameters)
            print("\n".join([f"removed {path}" for path in removed] or ["no unpublished build folders"]))
            return 0
        result = build.build_dataset(args.dataset, args.manual_dir, args.data_dir, resolution=args.resolution,
                                     skip_bad=args.skip_bad, overwrite=args.overwrite, num_workers=args.workers,
                                     max_pixels=args.max_pixels, runner=args.runner, beam_options=args.beam_options,
                                     **parameters)
        print(result.format())
        return 0
    except (RawDataError, FileNotFoundError) as exc:
        print(exc, file=sys.stderr)
        return 1
    except ValueError as exc:  # a bad option value (the raw data's problems are RawDataErrors, above)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
