"""Raw copies -> prepared datasets, checks of raw copies without building, and scrubs of built ones.

    build_dataset("shenzhen", manual_dir, data_dir, resolution=256, num_folds=10) -> BuildResult (.format())
    build_dataset(..., runner="direct", beam_options="--direct_num_workers=2 --direct_running_mode=multi_processing")
    verify_raw("chestxray14", manual_dir) -> VerifyReport (.ok, .problems, .format())
    check_built("chestxray14", data_dir, config_name="r256") -> check.CheckReport (.ok, .damaged, .format())

All work for every family of `registry.DATASETS`, with that family's build parameters (chestxray14:
val_fraction, seed; shenzhen/montgomery: num_folds, seed; every family: bit_depth, geometry).
`python -m metachex_jax.prepare` is the command line over them; the trainer calls `build_dataset` when a dataset
is missing and the raw copy is known.

A build, whatever runs it:
  1. plan (here, on the driver): the family's reader parses the raw copy (a local folder, a shared mount, or
     gs:// through staging.py) into each split's records in order; raw-row problems raise one RawDataError naming
     all of them, unless skip_bad. The position of a record in its split is its index, and fixes its shard.
  2. work (work.py), on the runner: `local` (local.py: this machine's process pool) or Apache Beam (beam_runner.py:
     `direct`, `dataflow`, `flink`, `spark`): decode, record bytes, shards in a new build folder (publish.py), and
     the tally (counts, label counts, bit depths, every file that failed).
  3. decide (here): files that failed raise one RawDataError naming every one (the build folder is deleted), or,
     with skip_bad, are the skip report's; a split left without records is an error too.
  4. publish: skip_report.json and label_counts.json into the build folder, then its dataset_info.json created
     (publish.py: readers see a complete build or none; two concurrent builds: the first publishes, the second
     reuses it).

The records, shards, split sizes, skip report, label counts and identity are the same for every runner (tested
byte for byte: a DirectRunner build with two worker processes against a local one).

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
import datetime
import json
import os
import shlex
from collections import Counter
from pathlib import Path

from etils import epath

from metachex_jax.core import files
from metachex_jax.data.build import builders, check, layout, local, publish, registry, shards, staging, work
from metachex_jax.data.raw.common import Problem, RawDataError
from metachex_jax.imaging import images

RUNNERS = ("local", "direct", "dataflow", "flink", "spark")
BEAM_INSTALL = 'pip install "metachex-jax[beam]" (from a clone: pip install -e ".[beam]")'


class BeamNotInstalled(ValueError):
    """A Beam runner was asked for without apache-beam installed."""


def prepare_command(dataset: str, data_dir: str | os.PathLike, *, manual_dir: str = "RAW_DIR",
                    resolution: int = builders.DEFAULT_RESOLUTION, **parameters) -> str:
    """The complete `python -m metachex_jax.prepare` command for this build, every build parameter spelled out
    (but the reader's defaults: bit_depth 0, geometry resize_crop)."""
    family = registry.family(dataset)
    words = ["python", "-m", "metachex_jax.prepare", f"--dataset={dataset}", f"--manual_dir={manual_dir}",
             f"--data_dir={files.absolute(data_dir)}", f"--resolution={resolution}"]
    defaults = {"bit_depth": 0, "geometry": builders.DEFAULT_GEOMETRY}
    words += [f"--{name}={value}" for name, value in family.resolve(parameters).items()
              if name not in defaults or value != defaults[name]]
    return shlex.join(words)


@dataclasses.dataclass
class BuildResult:
    dataset: str
    config_name: str
    path: epath.Path  # the published build's folder: <data_dir>/<dataset>/<config>/<version>/build-...
    reused: bool  # True when a published build was there (or another build published first)
    removed_incomplete: list[str]  # unpublished build folders deleted first (older than publish.STALE_AFTER)
    report: dict  # the skip report (skip_report)
    runner: str = "local"
    unpublished: list[str] = dataclasses.field(default_factory=list)  # other build folders left (maybe live)

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.config_name}"

    def format(self) -> str:
        how = f"already built at {self.path}" if self.reused else f"built at {self.path} by the {self.runner} runner"
        lines = [f"{self.name}: {how}"]
        lines += [f"  removed an unpublished build older than {publish.STALE_AFTER}: {p}"
                  for p in self.removed_incomplete]
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
        if self.unpublished:
            lines.append(f"  unpublished build folders left (never read; a build may still be writing one; "
                         f"prepare --clean deletes them): {', '.join(self.unpublished)}")
        lines.append(f"  skip report: {self.path / builders.SKIP_REPORT_FILE}")
        data_dir = self.path.parent.parent.parent.parent
        lines.append(f'  read: builders.data_source("{self.dataset}", "train", "{data_dir}", '
                     f'config_name="{self.config_name}")')
        return "\n".join(lines)


def skip_report(builder: builders._RawImageBuilder, manual_dir: str, skip_bad: bool, raw: builders.RawCopy,
                tally: work.Tally) -> dict:
    """The JSON written next to the records. Format:

    {"dataset": "chestxray14", "config": "r256", "version": "2.0.0", "manual_dir": "...", "skip_bad": true,
     "build_parameters": {"resolution": 256, ...},
     "split_sizes": {"train": n, "validation": n, "test": n},         # records actually written
     "skipped": [{"kind": "...", "item": "...", "detail": "..."}, ...], # exactly what was left out, and why
     "skipped_counts": {"kind": n, ...},
     "flags": {"invalid_age": ["00000001_000.png", ...], ...},        # kept, but with a value marked invalid
     "flag_details": {"tb_mention_in_normal": {"CHNCXR_0001_0": "reading text"}},  # what a flag is about
     "bit_depths": [{"bits": 8, "source": "8-bit file", "images": n}, ...],  # the reader's decisions (images.py)
     "orientations": {"6": n, ...},  # JPEG EXIF orientations applied (images other than 1)
     "ignored_files": {"appledouble": {"count": n, "examples": [...]}, ...},  # no part of the dataset (._*,
                                                                       # hidden, Thumbs.db): not read
     "details": {...}}   # label-table datasets: label names, unmapped findings, excluded views, the split drawn
    """
    config = builder.builder_config
    problems = sorted(raw.problems + tally.problems)
    report = {
        "dataset": builder.name,
        "config": config.name,
        "version": str(builder.VERSION),
        "manual_dir": os.fspath(manual_dir),
        "skip_bad": skip_bad,
        "build_parameters": builders.config_parameters(config),
        "split_sizes": dict(sorted(tally.written.items())),
        "skipped": [p.as_dict() for p in problems],
        "skipped_counts": dict(sorted(Counter(p.kind for p in problems).items())),
        "flags": raw.flags,
        "flag_details": raw.flag_details,
        "bit_depths": [{"bits": bits, "source": source, "images": n}
                       for (bits, source), n in sorted(tally.bit_depths.items())],
        "orientations": {str(k): n for k, n in sorted(tally.orientations.items())},
        "ignored_files": {kind: {"count": len(paths), "examples": paths[:5]}
                          for kind, paths in sorted(raw.ignored.items())},
    }
    if raw.details:
        report["details"] = raw.details
    return report


def label_counts(builder: builders._RawImageBuilder, kind: str, tally: work.Tally) -> dict:
    """Per-split label counts of the records written, so that runs need not read every record to weight classes
    (label_counts.json, next to the records). Format:

    {"dataset": "chestxray14", "config": "r256", "version": "2.0.0",
     "splits": {"train": {"num_examples": n, "positives": {"Atelectasis": n, ..., "sex_male": n, "view_ap": n},
                          "known": {"Atelectasis": n, ...}},   # label-table datasets: labels not -1 (unknown)
                ...}}                               # every label of the dataset listed, 0 included
    """
    label_names = layout.label_names(kind, builder.label_names())
    names = list(label_names) + list(layout.counted_flags(kind))
    splits = {}
    for split, n in sorted(tally.written.items()):
        positives = tally.positives.get(split, Counter())
        splits[split] = {"num_examples": n, "positives": {name: positives[name] for name in names}}
        if kind == "labelled":
            known = tally.known.get(split, Counter())
            splits[split]["known"] = {name: known[name] for name in label_names}
    return {"dataset": builder.name, "config": builder.builder_config.name, "version": str(builder.VERSION),
            "splits": splits}


def _record_spec(family: registry.DatasetFamily, builder: builders._RawImageBuilder,
                 max_pixels: int | None) -> work.RecordSpec:
    config = builder.builder_config
    return work.RecordSpec(family.kind, config.resolution, tuple(builder.label_names()), config.bit_depth,
                           config.geometry == "crop_resize", max_pixels)


def _run(runner: str, plan: dict[str, list], spec: work.RecordSpec, folder: str, dataset: str, per_shard: int, *,
         num_workers: int | None, progress: bool, beam_options: str) -> tuple[list[shards.ShardInfo], work.Tally]:
    if runner == "local":
        return local.run(plan, spec, folder, dataset, per_shard, num_workers=num_workers, progress=progress)
    try:
        from metachex_jax.data.build import beam_runner  # optional: the `beam` extra (apache-beam)
    except ImportError as exc:
        raise BeamNotInstalled(f"--runner={runner} needs Apache Beam, which is not installed ({exc}); install it "
                               f"with: {BEAM_INSTALL}") from exc
    return beam_runner.run(plan, spec, folder, dataset, per_shard, runner=runner, beam_options=beam_options)


def _info(builder: builders._RawImageBuilder, kind: str, build_name: str, written: list[shards.ShardInfo],
          plan: dict[str, list], spec: work.RecordSpec, runner: str) -> dict:
    """The published build's dataset_info.json (records.RecordSource reads it)."""
    config = builder.builder_config
    splits = {}
    for split in plan:
        mine = [s for s in written if s.split == split]
        splits[split] = {"num_examples": sum(s.num_records for s in mine), "num_bytes": sum(s.num_bytes for s in mine),
                         "shards": [{"file": s.file, "num_records": s.num_records, "sha256": s.sha256}
                                    for s in mine]}
    return {"format": publish.FORMAT, "dataset": builder.name, "config": config.name, "version": str(builder.VERSION),
            "build": build_name, "kind": kind, "resolution": config.resolution, "geometry": config.geometry,
            "label_names": list(builder.label_names()), "record_layout": spec.codec().to_json(),
            "description": f"{builder.DESCRIPTION} {config.description}", "homepage": builder.HOMEPAGE,
            "build_parameters": builders.config_parameters(config), "splits": splits, "runner": runner,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def build_dataset(dataset: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike, *,
                  resolution: int = builders.DEFAULT_RESOLUTION, skip_bad: bool = False, overwrite: bool = False,
                  num_workers: int | None = None, progress: bool = True,
                  max_pixels: int | None = images.DEFAULT_MAX_PIXELS, runner: str = "local", beam_options: str = "",
                  records_per_shard: int | None = None, **parameters) -> BuildResult:
    """Build `dataset` from the raw copy in manual_dir into data_dir (either may be gs://); a no-op if a build is
    published there already, unless overwrite. See the module docstring for the steps.

    `parameters`: the family's build parameters (registry.DATASETS[dataset].parameters; defaults for the rest),
    `bit_depth` and `geometry` among them. `max_pixels`: the reader's size limit (images.py); a larger image is an
    undecodable image. `runner`: "local" (num_workers processes, default every core) or a Beam runner (RUNNERS;
    `beam_options`: Beam's flags, e.g. "--direct_num_workers=2 --direct_running_mode=multi_processing").
    `records_per_shard`: default from the record size (shards.SHARD_BYTES).
    Raises RawDataError naming every problem (raw rows/files or undecodable images) unless skip_bad; then nothing
    is published and the build's folder is deleted.
    """
    if runner not in RUNNERS:
        raise ValueError(f"runner {runner!r}: expected one of {RUNNERS}")
    if runner == "dataflow" and not (files.is_url(manual_dir) and files.is_url(data_dir)):
        raise ValueError("--runner=dataflow reads the raw copy and writes the build from Dataflow's workers, which "
                         "cannot see this machine's disk: give gs:// --manual_dir and --data_dir")
    family = registry.family(dataset)
    config = family.config(resolution, **parameters)
    data_dir = files.absolute(data_dir)
    where = builders.version_dir(data_dir, dataset, config.name)
    removed = publish.remove_unreferenced(where)
    if publish.is_published(where) and not overwrite:
        return _result(dataset, config.name, data_dir, True, removed, runner)
    builder = family.builder(config)
    staged = staging.stage(os.fspath(manual_dir)) if files.is_url(manual_dir) else None
    try:
        raw = builder.read_raw(staged.root if staged else os.path.expanduser(os.fspath(manual_dir)),
                               skip_bad=skip_bad)
    finally:
        if staged:
            staged.remove()
    plan = staging.with_urls(raw.splits, staged) if staged else raw.splits
    spec = _record_spec(family, builder, max_pixels)
    per_shard = records_per_shard or shards.records_per_shard(spec.codec().fixed_size)
    build_name = publish.new_build_name()
    folder = files.join(where, build_name)
    try:
        written, tally = _run(runner, plan, spec, folder, dataset, per_shard, num_workers=num_workers,
                              progress=progress, beam_options=beam_options)
        _check_outcome(dataset, plan, raw, tally, skip_bad)
        _check_written(folder, written)
        files.write_atomic(files.join(folder, builders.SKIP_REPORT_FILE), _json(skip_report(
            builder, files.absolute(manual_dir), skip_bad, raw, tally)))
        files.write_atomic(files.join(folder, builders.LABEL_COUNTS_FILE), _json(label_counts(builder, family.kind,
                                                                                              tally)))
        replaced = publish.read_info(where) if overwrite else None
        published = publish.publish(where, _info(builder, family.kind, build_name, written, plan, spec, runner),
                                    replace=overwrite)
    except BaseException:
        publish.remove_folder(folder)  # nothing of a failed build stays, and nothing of it was published
        raise
    if not published:  # another build of this config published first: the same records (builds are deterministic)
        publish.remove_folder(folder)
        return _result(dataset, config.name, data_dir, True, removed, runner)
    if replaced and replaced["build"] != build_name:
        publish.remove_folder(publish.build_folder(where, replaced))
    return _result(dataset, config.name, data_dir, False, removed, runner)


def _result(dataset: str, config_name: str, data_dir: str, reused: bool, removed: list[str],
            runner: str) -> BuildResult:
    where = builders.version_dir(data_dir, dataset, config_name)
    return BuildResult(dataset=dataset, config_name=config_name,
                       path=builders.dataset_dir(data_dir, dataset, config_name), reused=reused,
                       removed_incomplete=removed, report=builders.read_skip_report(data_dir, dataset, config_name),
                       runner=runner, unpublished=publish.unreferenced(where))


def _json(value) -> str:
    return json.dumps(value, indent=1) + "\n"


def _check_outcome(dataset: str, plan: dict[str, list], raw: builders.RawCopy, tally: work.Tally,
                   skip_bad: bool) -> None:
    """Step 3 of the module docstring: one error naming every file that failed, unless skip_bad; no empty split."""
    failed = [p for p in tally.problems if p.kind == "undecodable_image"]
    if failed and not skip_bad:
        raise RawDataError(dataset, failed)
    empty = [split for split in plan if not tally.written.get(split)]
    if empty:
        why = {split: f"every one of its {len(plan[split])} images was left out, for the problems listed" if plan[split]
               else "the raw copy has no images for it (too few for the split)" for split in empty}
        raise RawDataError(dataset, raw.problems + tally.problems + [
            Problem("empty_split", split, f"a split without records: {reason}") for split, reason in why.items()],
            hint="add images")


def _check_written(folder: str, written: list[shards.ShardInfo]) -> None:
    """Every shard the runner reported is there, before anything names them (e.g. a folder deleted by a clean-up
    meant for a dead build)."""
    missing = [s.file for s in written if not files.exists(files.join(folder, s.file))]
    if missing:
        raise RuntimeError(f"{folder}: shards written but missing now: {', '.join(missing)}")


def check_built(dataset: str, data_dir: str | os.PathLike, *, resolution: int = builders.DEFAULT_RESOLUTION,
                num_workers: int | None = None, progress: bool = True, **parameters) -> check.CheckReport:
    """Scrub the published build of these parameters (check.py): hashes, indexes, every record read and decoded."""
    config_name = registry.family(dataset).config_name(resolution, **parameters)
    return check.check_build(builders.version_dir(files.absolute(data_dir), dataset, config_name),
                             num_workers=num_workers, progress=progress)


def clean(dataset: str, data_dir: str | os.PathLike, *, resolution: int = builders.DEFAULT_RESOLUTION,
          **parameters) -> list[str]:
    """Delete every unpublished build folder of these parameters now (make sure no build of them is running)."""
    config_name = registry.family(dataset).config_name(resolution, **parameters)
    return publish.remove_unreferenced(builders.version_dir(files.absolute(data_dir), dataset, config_name),
                                       older_than=None)


@dataclasses.dataclass
class VerifyReport:
    dataset: str
    root: Path | str
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
                    work.check_decoded(image, None)
                except ValueError as exc:
                    error = f"{paths[name]}: {exc}"
            if error is not None:
                problems.append(Problem("undecodable_image", name, error))
        return problems


def verify_raw(dataset: str, manual_dir: str | os.PathLike, *, check_images: bool = True,
               strict_counts: bool = False, num_workers: int | None = None, progress: bool = True,
               max_pixels: int | None = images.DEFAULT_MAX_PIXELS, **parameters) -> VerifyReport:
    """Check a raw copy (local or gs://) without building (see the module docstring for what is checked and the
    count rule). Images are decoded as a build would (`bit_depth` among the parameters, `max_pixels`)."""
    family = registry.family(dataset)
    resolved = family.resolve(parameters)
    bit_depth = resolved.pop("bit_depth")  # the reader's options, not the raw copy's
    resolved.pop("geometry")
    staged = staging.stage(os.fspath(manual_dir)) if files.is_url(manual_dir) else None
    try:
        check_result = family.verify(staged.root if staged else manual_dir, strict_counts=strict_counts, **resolved)
    finally:
        if staged:
            staged.remove()
    paths = {name: staged.to_url(path) for name, path in check_result.image_paths.items()} if staged else \
        check_result.image_paths
    problems = list(check_result.problems)
    if check_images:
        problems += _check_images(paths, num_workers, progress, bit_depth, max_pixels)
    root = os.fspath(manual_dir) if staged else check_result.root
    return VerifyReport(dataset=dataset, root=root, problems=sorted(problems), notes=check_result.notes)
