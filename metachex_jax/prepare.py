"""Build or verify the ArrayRecord datasets from raw copies.

    python -m metachex_jax.prepare --dataset=chestxray14 --manual_dir=RAW/ChestX-ray14 --data_dir=OUT \\
        [--resolution=256] [--val_fraction=0.1] [--num_folds=10] [--seed=0] [--skip_bad] [--overwrite] [--workers=N]
    python -m metachex_jax.prepare --dataset=shenzhen --manual_dir=RAW --data_dir=OUT --verify [--strict_counts]

Build prints where the dataset went, its split sizes, what was skipped (with --skip_bad) and the read call:
    tfds.data_source("chestxray14/r256", split="train", data_dir=OUT)
Exit status: 0 built (or already built), 1 raw-data problems (the message lists every one), 2 usage errors.

--verify checks the raw copy WITHOUT building and exits 1 when it finds problems. It reports every per-row/per-file
problem of the readers (nih.py / tb.py docstrings), every image that does not decode (full decode of every file,
in a process pool), patient-disjointness of the official split and of the validation carve-out, split sizes,
label names and prevalence, flags (implausible ages, unknown sex), and the counts compared with the published ones.
Count rule: the copy is judged strictly against ITSELF (CSV vs split lists vs files vs readings) but only
informationally against the published counts, because a subset or a synthetic demo copy is legitimate
("112,120 expected, 2,000 found" is printed, not failed). Two exceptions are problems: a count ABOVE the published
one (no genuine copy or subset can have more), and any difference when --strict_counts says the copy is complete.

Library use (the trainer calls these when a dataset is missing):
    build_dataset("shenzhen", manual_dir, data_dir, resolution=256) -> BuildResult
    verify_raw("chestxray14", manual_dir) -> VerifyReport (.ok, .problems, .format())
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections import Counter
from pathlib import Path

from etils import epath

from metachex_jax import files
from metachex_jax.data import images, nih, tb
from metachex_jax.data.raw_common import Problem, RawDataError
from metachex_jax.labels import PATHOLOGIES

DATASETS = ("chestxray14", "shenzhen", "montgomery")


def remote_data_dir_message(dataset: str, data_dir: str | os.PathLike) -> str:
    """Why a dataset cannot be built INTO gs:// (the build lock is a local flock, tfds writes local temp folders)."""
    return (f"cannot prepare {dataset} into {os.fspath(data_dir)}: building into Cloud Storage is not supported. "
            "Prepare it into a local folder, then copy it: python -m metachex_jax.prepare --dataset=... "
            f"--manual_dir=... --data_dir=LOCAL_DIR && gsutil -m cp -r LOCAL_DIR/{dataset} "
            f"{os.fspath(data_dir)}/ (or build into a gcsfuse mount of the bucket, which is a local path)")


@dataclasses.dataclass
class BuildResult:
    dataset: str
    config_name: str
    path: epath.Path  # <data_dir>/<dataset>/<config>/<version>
    reused: bool  # True when a complete build was already there
    removed_incomplete: list[Path]  # leftovers of interrupted builds that were deleted first
    report: dict  # the skip report (builders.write_skip_report)

    @property
    def tfds_name(self) -> str:
        return f"{self.dataset}/{self.config_name}"

    def format(self) -> str:
        lines = [f"{self.tfds_name}: {'already built' if self.reused else 'built'} at {self.path}"]
        lines += [f"  removed leftover of an interrupted build: {p}" for p in self.removed_incomplete]
        lines.append("  split sizes: " + ", ".join(f"{k} {v:,}" for k, v in self.report["split_sizes"].items()))
        skipped = self.report["skipped"]
        lines.append(f"  skipped: {len(skipped)}" + (f" ({self.report['skipped_counts']})" if skipped else ""))
        lines += [f"    [{s['kind']}] {s['item']}: {s['detail']}" for s in skipped]
        for flag, items in self.report["flags"].items():
            lines.append(f"  flagged {flag}: {len(items)}" + (f" (e.g. {', '.join(items[:5])})" if items else ""))
        for flag, details in self.report.get("flag_details", {}).items():
            lines += [f"    {flag} {item}: {detail!r}" for item, detail in details.items()]
        lines.append(f"  skip report: {self.path / 'skip_report.json'}")
        data_dir = self.path.parent.parent.parent
        lines.append(f'  read: tfds.data_source("{self.tfds_name}", split="train", data_dir="{data_dir}")')
        return "\n".join(lines)


def build_dataset(dataset: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike, *,
                  resolution: int = 256, val_fraction: float = 0.1, num_folds: int = tb.DEFAULT_NUM_FOLDS,
                  seed: int = 0, skip_bad: bool = False, overwrite: bool = False, num_workers: int | None = None,
                  progress: bool = True) -> BuildResult:
    """Build `dataset` from the raw copy in manual_dir into data_dir (no-op if already complete, unless overwrite).

    Raises RawDataError naming every problem (raw rows/files or undecodable images) unless skip_bad; then nothing
    readable is left behind.
    """
    if files.is_url(data_dir):
        raise ValueError(remote_data_dir_message(dataset, data_dir))
    import tensorflow_datasets as tfds

    from metachex_jax.data import builders

    config = builders.make_config(dataset, resolution=resolution, val_fraction=val_fraction, num_folds=num_folds,
                                  seed=seed)
    # One build per config at a time: a second process (another host, another run) waits here, then finds the
    # dataset complete and reuses it; and the leftovers removed below can never be a live build's folder.
    with builders.build_lock(data_dir, dataset, config.name):
        removed = builders.remove_incomplete_builds(data_dir, dataset, config.name)
        reused = builders.is_complete(data_dir, dataset, config.name) and not overwrite
        if not reused:
            builder = builders.BUILDERS[dataset](config=config, data_dir=os.fspath(data_dir), skip_bad=skip_bad,
                                                 num_workers=num_workers, progress=progress)
            mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite  # replaces the complete build
                    else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(manual_dir), download_mode=mode))
    return BuildResult(dataset=dataset, config_name=config.name,
                       path=builders.dataset_dir(data_dir, dataset, config.name), reused=reused,
                       removed_incomplete=removed, report=builders.read_skip_report(data_dir, dataset, config.name))


@dataclasses.dataclass
class VerifyReport:
    dataset: str
    root: Path
    problems: list[Problem]
    notes: list[str]  # counts, split sizes, prevalence, flags: informational

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"{self.dataset}: raw copy at {self.root}"] + [f"  {n}" for n in self.notes]
        if self.ok:
            lines.append("  OK: no problems")
        else:
            lines.append(str(RawDataError(self.dataset, self.problems, hint="pass --skip_bad when building")))
        return "\n".join(lines)


def _compare_counts(found: dict[str, int], expected: dict[str, int], strict: bool) -> tuple[list[str], list[Problem]]:
    notes, problems = [], []
    for key, want in expected.items():
        have = found[key]
        if have == want:
            notes.append(f"{key}: {have:,} (as published)")
            continue
        text = f"{key}: {want:,} expected, {have:,} found"
        if have > want or strict:
            problems.append(Problem("count_mismatch", key, text + (" (more than the published dataset)"
                                                                   if have > want else " (--strict_counts)")))
        else:
            notes.append(text + " (a subset or synthetic copy; not an error)")
    return notes, problems


def _check_images(paths: dict[str, str], num_workers: int | None, progress: bool) -> list[Problem]:
    names = sorted(paths)
    with images.decoding_pool(num_workers) as pool:
        results = images.decode_many([paths[n] for n in names], None, pool=pool, desc="checking images",
                                     progress=progress)
        return [Problem("undecodable_image", name, error) for name, (_, error) in zip(names, results) if error]


def verify_raw(dataset: str, manual_dir: str | os.PathLike, *, val_fraction: float = 0.1,
               num_folds: int = tb.DEFAULT_NUM_FOLDS, seed: int = 0, check_images: bool = True,
               strict_counts: bool = False, num_workers: int | None = None, progress: bool = True) -> VerifyReport:
    """Check a raw copy without building (see the module docstring for what is checked and the count rule)."""
    if dataset == "chestxray14":
        raw = nih.collect_nih(manual_dir, val_fraction=val_fraction, seed=seed)
        records = [r for split in raw.splits.values() for r in split]
        problems, notes = list(raw.problems), [f"metadata: {raw.csv_path.name}"]
        found = {"images": raw.csv_rows, "patients": len({r.patient_id for r in records}),
                 "train_val": raw.split_list_sizes[nih.TRAIN_VAL_LIST], "test": raw.split_list_sizes[nih.TEST_LIST]}
        count_notes, count_problems = _compare_counts(found, nih.EXPECTED_COUNTS, strict_counts)
        notes += count_notes + [f"images on disk: {raw.images_on_disk:,}"]
        problems += count_problems
        patients = {split: {r.patient_id for r in rs} for split, rs in raw.splits.items()}
        for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
            for patient in sorted(patients[a] & patients[b]):  # cannot happen after collect_nih; checked anyway
                problems.append(Problem("patient_overlap", f"patient {patient}", f"in both {a} and {b}"))
        notes.append("split sizes (images / patients): " + ", ".join(
            f"{s} {len(rs):,} / {len(patients[s]):,}" for s, rs in raw.splits.items()) + "; patient-disjoint")
        prevalence = Counter(p for r in records for p, v in zip(PATHOLOGIES, r.labels) if v)
        notes.append("labels: " + ", ".join(f"{p} {prevalence[p]:,}" for p in PATHOLOGIES)
                     + f", No Finding {sum(1 for r in records if not any(r.labels)):,}")
        notes.append(f"implausible ages (kept, age_valid=False): {len(raw.invalid_age_names)}"
                     + (f" e.g. {', '.join(raw.invalid_age_names[:5])}" if raw.invalid_age_names else ""))
        paths = {r.image_name: r.path for r in records}
    elif dataset in tb.SOURCES:
        raw = tb.collect_tb(manual_dir, dataset, num_folds=num_folds, seed=seed)
        problems, notes = list(raw.problems), []
        labels = Counter(r.tb for r in raw.records)
        found = {"images": raw.images_on_disk, "normal": labels[0], "tb": labels[1]}
        count_notes, count_problems = _compare_counts(found, raw.source.expected_counts, strict_counts)
        notes += count_notes
        problems += count_problems
        notes.append("default split: " + ", ".join(
            f"{s} {len(raw.split(s))} ({sum(r.tb for r in raw.split(s))} TB)" for s in ("train", "validation", "test")))
        fold_sizes = Counter(r.fold for r in raw.records)
        notes.append(f"{raw.num_folds} folds, sizes {[fold_sizes[f] for f in range(raw.num_folds)]}")
        notes += [f"flagged {flag}: {len(ids)}" + (f" ({', '.join(ids[:5])})" if ids else "")
                  for flag, ids in raw.flags.items()]
        notes += [f"  {flag} {item}: {detail!r}" for flag, details in raw.flag_details.items()
                  for item, detail in details.items()]
        if dataset == "montgomery":
            for side in ("leftMask", "rightMask"):
                masks = len(list((raw.root / "ManualMask" / side).glob("*.png")))
                notes.append(f"ManualMask/{side}: {masks} masks (not used for training; 138 published)")
        paths = {r.image_id: r.path for r in raw.records}
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    if check_images:
        problems += _check_images(paths, num_workers, progress)
    return VerifyReport(dataset=dataset, root=raw.root, problems=sorted(problems), notes=notes)


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--manual_dir", required=True, help="the raw copy (dataset folder or its parent)")
    parser.add_argument("--data_dir", help="where the tfds datasets go (required unless --verify)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--val_fraction", type=float, default=0.1, help="chestxray14: patients carved from train_val")
    parser.add_argument("--num_folds", type=int, default=tb.DEFAULT_NUM_FOLDS, help="shenzhen/montgomery")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_bad", action="store_true", help="drop offending items and list them in the report")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if a complete build exists")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: every core)")
    parser.add_argument("--verify", action="store_true", help="check the raw copy only; exit 1 on problems")
    parser.add_argument("--strict_counts", action="store_true", help="--verify: the copy must be complete")
    parser.add_argument("--no_image_check", action="store_true", help="--verify: skip decoding every image")
    args = parser.parse_args(argv)
    if not args.verify and not args.data_dir:
        parser.error("--data_dir is required to build")
    if not args.verify and files.is_url(args.data_dir):
        parser.error(remote_data_dir_message(args.dataset, args.data_dir))
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.verify:
            report = verify_raw(args.dataset, args.manual_dir, val_fraction=args.val_fraction,
                                num_folds=args.num_folds, seed=args.seed, check_images=not args.no_image_check,
                                strict_counts=args.strict_counts, num_workers=args.workers)
            print(report.format())
            return 0 if report.ok else 1
        result = build_dataset(args.dataset, args.manual_dir, args.data_dir, resolution=args.resolution,
                               val_fraction=args.val_fraction, num_folds=args.num_folds, seed=args.seed,
                               skip_bad=args.skip_bad, overwrite=args.overwrite, num_workers=args.workers)
        print(result.format())
        return 0
    except (RawDataError, FileNotFoundError) as exc:
        print(exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
