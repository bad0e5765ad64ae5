"""Raw copies -> prepared ArrayRecord datasets, and checks of raw copies without building.

    build_dataset("shenzhen", manual_dir, data_dir, resolution=256, num_folds=10) -> BuildResult (.format())
    verify_raw("chestxray14", manual_dir) -> VerifyReport (.ok, .problems, .format())

Both work for every family of `registry.DATASETS`, with that family's build parameters (chestxray14:
val_fraction, seed; shenzhen/montgomery: num_folds, seed). `python -m metachex_jax.prepare` is the command line
over these two; the trainer calls `build_dataset` when a dataset is missing and the raw copy is known.

verify_raw reports every per-row/per-file problem of the readers (nih.py / tb.py docstrings), every image that
does not decode (full decode of every file, in a process pool), patient-disjointness of the official split and of
the validation carve-out, split sizes, label names and prevalence, flags (implausible ages, unknown sex), and the
counts compared with the published ones. Count rule: the copy is judged strictly against ITSELF (CSV vs split
lists vs files vs readings) but only informationally against the published counts, because a subset or a
synthetic demo copy is legitimate ("112,120 expected, 2,000 found" is a note, not a problem). Two exceptions are
problems: a count ABOVE the published one (no genuine copy or subset can have more), and any difference when
strict_counts says the copy is complete.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path

import tensorflow_datasets as tfds
from etils import epath

from metachex_jax.core import files
from metachex_jax.data.build import builders, registry
from metachex_jax.data.raw.common import Problem, RawDataError
from metachex_jax.imaging import images


def remote_data_dir_message(dataset: str, data_dir: str | os.PathLike) -> str:
    """Why a dataset cannot be built INTO gs:// (the build lock is a local flock, tfds writes local temp folders)."""
    return (f"cannot prepare {dataset} into {os.fspath(data_dir)}: building into Cloud Storage is not supported. "
            "Prepare it into a local folder, then copy it: python -m metachex_jax.prepare --dataset=... "
            f"--manual_dir=... --data_dir=LOCAL_DIR && gsutil -m cp -r LOCAL_DIR/{dataset} "
            f"{os.fspath(data_dir)}/ (or build into a gcsfuse mount of the bucket, which is a local path)")


def prepare_command(dataset: str, data_dir: str | os.PathLike, *, manual_dir: str = "RAW_DIR",
                    resolution: int = builders.DEFAULT_RESOLUTION, **parameters) -> str:
    """The complete `python -m metachex_jax.prepare` command for this build, every build parameter spelled out."""
    family = registry.family(dataset)
    words = ["python", "-m", "metachex_jax.prepare", f"--dataset={dataset}", f"--manual_dir={manual_dir}",
             f"--data_dir={data_dir if data_dir == 'LOCAL_DIR' else files.absolute(data_dir)}",
             f"--resolution={resolution}"]
    words += [f"--{name}={value}" for name, value in family.resolve(parameters).items()
              if name != "bit_depth" or value]  # (0, the reader's own rule, needs no flag)
    return shlex.join(words)


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
        for depth in self.report.get("bit_depths", []):
            lines.append(f"  bit depth {depth['bits']} ({depth['source']}): {depth['images']} images")
        ignored = self.report.get("ignored_files", {})  # (builds made before this field have none)
        if ignored:
            lines.append("  ignored, not images of the dataset: " + ", ".join(
                f"{i['count']} {kind} (e.g. {', '.join(i['examples'][:3])})" for kind, i in ignored.items()))
        # What a label-table reader counted for comparison with the published counts, and the labels written.
        lines += [f"  {name}: {value}" for name, value in self.report.get("details", {}).get("counts", {}).items()]
        counts = builders.read_label_counts_at(self.path)
        for split, entry in (counts or {}).get("splits", {}).items():
            if "known" in entry:
                lines.append(f"  {split} labels (positive / known): " + ", ".join(
                    f"{name} {entry['positives'][name]}/{known}" for name, known in entry["known"].items()))
        lines.append(f"  skip report: {self.path / 'skip_report.json'}")
        data_dir = self.path.parent.parent.parent
        lines.append(f'  read: tfds.data_source("{self.tfds_name}", split="train", data_dir="{data_dir}")')
        return "\n".join(lines)


def build_dataset(dataset: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike, *,
                  resolution: int = builders.DEFAULT_RESOLUTION, skip_bad: bool = False, overwrite: bool = False,
                  num_workers: int | None = None, progress: bool = True,
                  max_pixels: int | None = images.DEFAULT_MAX_PIXELS, **parameters) -> BuildResult:
    """Build `dataset` from the raw copy in manual_dir into data_dir (no-op if already complete, unless overwrite).

    `parameters`: the family's build parameters (registry.DATASETS[dataset].parameters; defaults for the rest),
    `bit_depth` among them (the reader's override for high-depth images). `max_pixels`: the reader's size limit
    (images.py); a larger image is an undecodable image.
    Raises RawDataError naming every problem (raw rows/files or undecodable images) unless skip_bad; then nothing
    readable is left behind.
    """
    if files.is_url(data_dir):
        raise ValueError(remote_data_dir_message(dataset, data_dir))
    family = registry.family(dataset)
    config = family.config(resolution, **parameters)
    # One build per config at a time: a second process (another host, another run) waits here, then finds the
    # dataset complete and reuses it; and the leftovers removed below can never be a live build's folder.
    with builders.build_lock(data_dir, dataset, config.name):
        removed = builders.remove_incomplete_builds(data_dir, dataset, config.name)
        reused = builders.is_complete(data_dir, dataset, config.name) and not overwrite
        if not reused:
            tfds.disable_progress_bar()  # TFDS's bars of splits and shuffles; the build shows its own per split
            builder = family.builder(config=config, data_dir=os.fspath(data_dir), skip_bad=skip_bad,
                                     num_workers=num_workers, progress=progress, max_pixels=max_pixels)
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


def _check_images(paths: dict[str, str], num_workers: int | None, progress: bool, bit_depth: int,
                  max_pixels: int | None) -> list[Problem]:
    names = sorted(paths)
    with images.decoding_pool(num_workers) as pool:
        results = images.decode_many([paths[n] for n in names], None, pool=pool, desc="checking images",
                                     progress=progress, bit_depth=bit_depth or None, max_pixels=max_pixels)
        problems = []
        for name, (image, error) in zip(names, results):
            if error is None:
                try:  # what the build would refuse after the decode, refused here too
                    builders.check_decoded(image, None)
                except ValueError as exc:
                    error = f"{paths[name]}: {exc}"
            if error is not None:
                problems.append(Problem("undecodable_image", name, error))
        return problems


def verify_raw(dataset: str, manual_dir: str | os.PathLike, *, check_images: bool = True,
               strict_counts: bool = False, num_workers: int | None = None, progress: bool = True,
               max_pixels: int | None = images.DEFAULT_MAX_PIXELS, **parameters) -> VerifyReport:
    """Check a raw copy without building (see the module docstring for what is checked and the count rule).
    Images are decoded as a build would (`bit_depth` among the parameters, `max_pixels`)."""
    family = registry.family(dataset)
    resolved = family.resolve(parameters)
    bit_depth = resolved.pop("bit_depth")  # the reader's option, not the raw copy's
    check = family.verify(manual_dir, strict_counts=strict_counts, **resolved)
    problems = list(check.problems)
    if check_images:
        problems += _check_images(check.image_paths, num_workers, progress, bit_depth, max_pixels)
    return VerifyReport(dataset=dataset, root=check.root, problems=sorted(problems), notes=check.notes)
