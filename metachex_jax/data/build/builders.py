"""TFDS builders `chestxray14`, `shenzhen`, `montgomery`, and the label-table datasets `chexpert`, `padchest` and
`csv` (your own data): raw copies -> ArrayRecord datasets (no TensorFlow).

Each is one entry of the dataset table, `registry.DATASETS` (which imports this module; `BUILDERS` below names
the builder classes for the functions that find builds on disk).

Build (the Python API; `tfds build` needs TensorFlow) -- or use metachex_jax.data.build.build_dataset:

    builder = Chestxray14(config=nih_config(resolution=256), data_dir=OUT, skip_bad=False)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=RAW))

Read (the exact call; importing this module is not needed to read):

    source = tfds.data_source("chestxray14/r256", split="train", data_dir=OUT)   # also "validation", "test"
    record = source[i]          # dict of numpy arrays / python scalars / bytes: the builder's `_info` features
    tb_all = tfds.data_source("shenzhen/r256", split="train+validation+test", data_dir=OUT)  # split arithmetic
                                                                                              # works (tested)
or `builder.as_data_source()[split]`. `data_source(dataset, split, data_dir, ...)` below builds the name.

Identity: the config name carries everything that changes the content, so two builds never mix:
`r{resolution}` with the defaults, plus `_val{fraction}_seed{seed}` (chestxray14) or `_k{k}_seed{seed}` (TB)
when those differ from the defaults ("." in a fraction is written "p": r256_val0p05_seed3), and `_bits{n}` when
the build overrides the bit depth of high-depth images (`bit_depth`, the reader's override, imaging/images.py; 0,
the default, is the reader's rule); the label-table datasets' names are built the same way from their options
(`chexpert_config`, `padchest_config`, `csv_config`), and a CSV dataset's also carries a fingerprint of the CSV
file. Configs outside BUILDER_CONFIGS are built with `config=nih_config(...)` and read by name exactly like the
predefined ones (TFDS reads unknown configs from the files). `skip_bad` and `max_pixels` (the reader's size
limit) are not part of the identity: what they left out is in the skip report.

Versions: a build's folder is named after its builder's VERSION, and a run reads only builds of the current
VERSION (`is_complete`), so a build made by an older reader is never mixed with new ones: the run prepares the
dataset again when it knows the raw copy, or stops with the `prepare` command that rebuilds it (an older build
found is named: `older_builds`). The pixels of chestxray14 1.3.0, TB 1.4.0 and the label-table datasets 1.1.0
come from the reader's one-rounding rule (imaging/images.py, imaging/resize.py).

Storage (chestxray14 1.2.0+, TB 1.3.0+): pixels are a `tfds.features.Tensor(shape=(R, R, 1), dtype=uint8,
encoding=BYTES)` (one raw byte string; TFDS without TF cannot encode numpy through tfds.features.Image), the
labels too, in ArrayRecord files written uncompressed (`_writing_uncompressed_array_records`: TFDS's writer would
apply ArrayRecord's default zstd and offers no option). Reading is the input pipeline's hot path on every epoch;
disk is paid once. Measured on the 2-core CPU box, the same 201 synthetic 256 px records (demo generator), CPU
per record read at load ~10:
    1.1.0  Tensor, one int64 per pixel, zstd:  54.4 KiB/record, 0.92 ms (tfds.data_source)
    1.2.0  Tensor BYTES, uncompressed:          64.6 KiB/record, 0.30 ms (tfds.data_source), 0.12 ms (RecordSource)
    PNG bytes (Image), measured earlier:        28.2 KiB/record, 1.5x the 1.1.0 read, plus a Pillow decode
so NIH at 256 px takes about 7.2 GB (64 KiB x 112,120) instead of ~5.2 GB, for a 3-8x cheaper read.
`data_source` below returns `records.RecordSource`. (Synthetic images: real radiographs compress differently, so
only the uncompressed size is exact.)

Records are written in the order the generator yields them (sorted by image name / id; `disable_shuffling=True`),
so record index i is stable across builds of the same raw copy and config.

Build pipeline: the raw copy is parsed (nih.load_nih / tb.load_tb: every problem collected; error or skip), images
are decoded and resized in a process pool using every core (`num_workers`, images.decode_many) with a tqdm bar.
An image that fails to decode is collected too; at the end of the build all failures raise one error (the build is
then discarded) unless skip_bad. Raw-row problems stop the build before any decoding, so a copy with both kinds
reports the image problems on the next attempt; `python -m metachex_jax.prepare --verify` reports both at once.

Interrupted builds: TFDS writes into `<data_dir>/<name>/<config>/incomplete.XXXXXX_<version>/` and renames it to
`<version>/` only after every split and dataset_info.json are written; an exception deletes the temporary folder.
A killed process leaves `incomplete.*` behind, which readers never open (tfds only looks for `<version>/` with its
dataset_info.json); `remove_incomplete_builds` clears such leftovers before a new build, under `build_lock`
(one build per config at a time, so concurrent callers never delete each other's work; the second one waits and
then reuses the finished dataset). The skip report
(`skip_report.json`, format in `write_skip_report`) and the per-split label counts (`label_counts.json`,
`write_label_counts`: what `class_weighting="chexnet"` needs, without reading every record) are written inside
the temporary folder, so they appear exactly when the dataset does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from etils import epath
from tensorflow_datasets.core import file_adapters

from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.data.build.records import RecordSource
from metachex_jax.data.raw import chexpert, csv_dataset, labelled, nih, padchest, tb
from metachex_jax.data.raw.common import Problem, RawDataError
from metachex_jax.imaging import images

# What the reader's one-rounding rule changed in every family's pixels (the release note of its version bump).
PIXELS_NOTE = ("One pixel path: every source mapped to 8 bits with one rounding, then the exact area average rounded "
               "once (imaging/resize.py; Pillow's BOX filter rounded between passes and is no area average for "
               "non-integer ratios); 16-bit colour and gray+alpha PNGs at full depth; gray PNGs with tRNS read; "
               "JPEG EXIF orientation applied; truncated JPEGs refused; build parameter bit_depth; "
               "`orientations` in the skip report.")
SKIP_REPORT_FILE = "skip_report.json"
LABEL_COUNTS_FILE = "label_counts.json"
DEFAULT_RESOLUTION = 256
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_SEED = 0
PREDEFINED_RESOLUTIONS = (256, 224, 512, 128, 1024)  # the first is the default config


def _fraction_text(fraction: float) -> str:
    return f"{fraction:g}".replace(".", "p")


@dataclasses.dataclass(eq=False)
class NihConfig(tfds.core.BuilderConfig):
    resolution: int = DEFAULT_RESOLUTION
    val_fraction: float = DEFAULT_VAL_FRACTION
    seed: int = DEFAULT_SEED
    bit_depth: int = 0  # the reader's override for high-depth images (0: the reader's rule)


@dataclasses.dataclass(eq=False)
class TbConfig(tfds.core.BuilderConfig):
    resolution: int = DEFAULT_RESOLUTION
    num_folds: int = tb.DEFAULT_NUM_FOLDS
    seed: int = DEFAULT_SEED
    bit_depth: int = 0


def _bits_suffix(bit_depth: int) -> list[str]:
    """The config name part of a bit-depth override (none for the reader's rule)."""
    if bit_depth and not 1 <= bit_depth <= 16:
        raise ValueError(f"bit_depth={bit_depth}: must be in 1..16 (or 0: the reader's rule)")
    return [f"bits{bit_depth}"] if bit_depth else []


def nih_config_name(resolution: int = DEFAULT_RESOLUTION, val_fraction: float = DEFAULT_VAL_FRACTION,
                    seed: int = DEFAULT_SEED, bit_depth: int = 0) -> str:
    parts = [f"r{resolution}"]
    if (val_fraction, seed) != (DEFAULT_VAL_FRACTION, DEFAULT_SEED):
        parts.append(f"val{_fraction_text(val_fraction)}_seed{seed}")
    return "_".join(parts + _bits_suffix(bit_depth))


def tb_config_name(resolution: int = DEFAULT_RESOLUTION, num_folds: int = tb.DEFAULT_NUM_FOLDS,
                   seed: int = DEFAULT_SEED, bit_depth: int = 0) -> str:
    parts = [f"r{resolution}"]
    if (num_folds, seed) != (tb.DEFAULT_NUM_FOLDS, DEFAULT_SEED):
        parts.append(f"k{num_folds}_seed{seed}")
    return "_".join(parts + _bits_suffix(bit_depth))


def _bits_text(bit_depth: int) -> str:
    return f"; high-depth images read as {bit_depth}-bit" if bit_depth else ""


def nih_config(resolution: int = DEFAULT_RESOLUTION, val_fraction: float = DEFAULT_VAL_FRACTION,
               seed: int = DEFAULT_SEED, bit_depth: int = 0) -> NihConfig:
    return NihConfig(name=nih_config_name(resolution, val_fraction, seed, bit_depth), resolution=resolution,
                     val_fraction=val_fraction, seed=seed, bit_depth=bit_depth,
                     description=f"{resolution}x{resolution} gray; validation = {val_fraction:g} of train_val "
                                 f"patients (seed {seed}){_bits_text(bit_depth)}")


def tb_config(resolution: int = DEFAULT_RESOLUTION, num_folds: int = tb.DEFAULT_NUM_FOLDS,
              seed: int = DEFAULT_SEED, bit_depth: int = 0) -> TbConfig:
    return TbConfig(name=tb_config_name(resolution, num_folds, seed, bit_depth), resolution=resolution,
                    num_folds=num_folds, seed=seed, bit_depth=bit_depth,
                    description=f"{resolution}x{resolution} gray; {num_folds} stratified folds (seed {seed})"
                                f"{_bits_text(bit_depth)}")


@dataclasses.dataclass(eq=False)
class ChexpertConfig(tfds.core.BuilderConfig):
    resolution: int = DEFAULT_RESOLUTION
    views: str = "frontal"
    uncertainty: str = "ignore"
    test_fraction: float = chexpert.DEFAULT_TEST_FRACTION
    seed: int = DEFAULT_SEED
    bit_depth: int = 0


@dataclasses.dataclass(eq=False)
class PadchestConfig(tfds.core.BuilderConfig):
    resolution: int = DEFAULT_RESOLUTION
    views: str = "frontal"
    val_fraction: float = padchest.DEFAULT_VAL_FRACTION
    test_fraction: float = padchest.DEFAULT_TEST_FRACTION
    seed: int = DEFAULT_SEED
    bit_depth: int = 0


@dataclasses.dataclass(eq=False)
class CsvConfig(tfds.core.BuilderConfig):
    resolution: int = DEFAULT_RESOLUTION
    csv: str = ""  # the CSV file (absolute)
    num_folds: int = csv_dataset.DEFAULT_NUM_FOLDS
    seed: int = DEFAULT_SEED
    stratify_by: str = ""  # the label column (resolved: never blank in a built config)
    val_fraction: float = csv_dataset.DEFAULT_VAL_FRACTION
    test_fraction: float = csv_dataset.DEFAULT_TEST_FRACTION
    label_names: tuple = ()  # the CSV's label columns, in order
    bit_depth: int = 0


def chexpert_config(resolution: int = DEFAULT_RESOLUTION, views: str = "frontal", uncertainty: str = "ignore",
                    test_fraction: float = chexpert.DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SEED,
                    bit_depth: int = 0) -> ChexpertConfig:
    """r{R}, plus `_all` (every view), `_unc-...` (a non-default uncertainty policy, chexpert.uncertainty_name),
    `_test{f}_seed{s}` and `_bits{n}` when they differ from the defaults."""
    chexpert.parse_uncertainty(uncertainty)  # fails early, naming the problem
    parts = [f"r{resolution}"]
    parts += ["all"] if views == "all" else []
    parts += [chexpert.uncertainty_name(uncertainty)] if chexpert.uncertainty_name(uncertainty) else []
    if (test_fraction, seed) != (chexpert.DEFAULT_TEST_FRACTION, DEFAULT_SEED):
        parts.append(f"test{_fraction_text(test_fraction)}_seed{seed}")
    return ChexpertConfig(name="_".join(parts + _bits_suffix(bit_depth)), resolution=resolution, views=views,
                          uncertainty=uncertainty, test_fraction=test_fraction, seed=seed, bit_depth=bit_depth,
                          description=f"{resolution}x{resolution} gray; {views} views; uncertain labels: "
                                      f"{uncertainty}; test = {test_fraction:g} of train.csv's patients (seed {seed})"
                                      f"{_bits_text(bit_depth)}")


def padchest_config(resolution: int = DEFAULT_RESOLUTION, views: str = "frontal",
                    val_fraction: float = padchest.DEFAULT_VAL_FRACTION,
                    test_fraction: float = padchest.DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SEED,
                    bit_depth: int = 0) -> PadchestConfig:
    """r{R}, plus `_all` (every projection), `_val{f}_test{f}_seed{s}` and `_bits{n}` when they differ from the
    defaults."""
    parts = [f"r{resolution}"] + (["all"] if views == "all" else [])
    if (val_fraction, test_fraction, seed) != (padchest.DEFAULT_VAL_FRACTION, padchest.DEFAULT_TEST_FRACTION,
                                               DEFAULT_SEED):
        parts.append(f"val{_fraction_text(val_fraction)}_test{_fraction_text(test_fraction)}_seed{seed}")
    return PadchestConfig(name="_".join(parts + _bits_suffix(bit_depth)), resolution=resolution, views=views,
                          val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, bit_depth=bit_depth,
                          description=f"{resolution}x{resolution} gray; {views} projections; train/validation/test "
                                      f"by patient ({val_fraction:g} validation, {test_fraction:g} test, seed {seed})"
                                      f"{_bits_text(bit_depth)}")


def csv_config(resolution: int = DEFAULT_RESOLUTION, csv: str = "", num_folds: int = csv_dataset.DEFAULT_NUM_FOLDS,
               seed: int = DEFAULT_SEED, stratify_by: str = "", val_fraction: float = csv_dataset.DEFAULT_VAL_FRACTION,
               test_fraction: float = csv_dataset.DEFAULT_TEST_FRACTION, bit_depth: int = 0) -> CsvConfig:
    """`<csv stem>_r{R}[_k{k}_seed{s}][_strat-{column}][_val{f}_test{f}][_bits{n}]_<fingerprint>` (options when
    they differ from the defaults; the fingerprint covers the CSV's bytes and every option: csv_dataset.fingerprint)."""
    layout = csv_dataset.read_layout(csv)
    stratify_by = csv_dataset._stratify_column(layout, stratify_by)
    options = {"resolution": resolution, "num_folds": num_folds, "seed": seed, "stratify_by": stratify_by,
               "val_fraction": val_fraction, "test_fraction": test_fraction}
    parts = [csv_dataset.name_stem(layout.path), f"r{resolution}"]
    if (num_folds, seed) != (csv_dataset.DEFAULT_NUM_FOLDS, DEFAULT_SEED):
        parts.append(f"k{num_folds}_seed{seed}")
    if stratify_by != layout.label_names[0]:
        parts.append("strat-" + csv_dataset.name_stem(stratify_by))
    if (val_fraction, test_fraction) != (csv_dataset.DEFAULT_VAL_FRACTION, csv_dataset.DEFAULT_TEST_FRACTION):
        parts.append(f"val{_fraction_text(val_fraction)}_test{_fraction_text(test_fraction)}")
    parts += _bits_suffix(bit_depth)
    if bit_depth:  # (only then, so that the fingerprints of builds without an override stay what they were)
        options["bit_depth"] = bit_depth
    parts.append(csv_dataset.fingerprint(layout.path, options))
    return CsvConfig(name="_".join(parts), resolution=resolution, csv=str(layout.path), num_folds=num_folds,
                     seed=seed, stratify_by=stratify_by, val_fraction=val_fraction, test_fraction=test_fraction,
                     label_names=layout.label_names, bit_depth=bit_depth,
                     description=f"{layout.path.name}: {resolution}x{resolution} gray; labels "
                                 f"{', '.join(layout.label_names)}; {num_folds} folds and a train/validation/test "
                                 f"split by patient, stratified by {stratify_by} (seed {seed}){_bits_text(bit_depth)}")


def config_parameters(config: tfds.core.BuilderConfig) -> dict:
    """A config's own fields (resolution and the build parameters), as the skip report records them."""
    common = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in common}


def _image_feature(resolution: int) -> tfds.features.Tensor:
    # BYTES: the pixels as one raw byte string (NONE would store one int64 varint per pixel).
    return tfds.features.Tensor(shape=(resolution, resolution, 1), dtype=np.uint8,
                                encoding=tfds.features.Encoding.BYTES)


class _UncompressedArrayRecords(file_adapters.ArrayRecordFileAdapter):
    """TFDS's ArrayRecord writer with compression off (TFDS passes "group_size:1", so ArrayRecord's default zstd
    applies; the TFDS writer offers no option for it)."""

    @classmethod
    def write_examples(cls, path, iterator):
        writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1,uncompressed")
        for _, serialized_example in iterator:
            writer.write(serialized_example)
        writer.close()


@contextlib.contextmanager
def _writing_uncompressed_array_records() -> Iterator[None]:
    """While building: TFDS writes ArrayRecord files through `_UncompressedArrayRecords` (its adapter table is
    module state, looked up when a split is written; restored afterwards)."""
    table, key = file_adapters.ADAPTER_FOR_FORMAT, file_adapters.FileFormat.ARRAY_RECORD
    original = table[key]
    table[key] = _UncompressedArrayRecords
    try:
        yield
    finally:
        table[key] = original


class _RawImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """What the three builders share: options, the decoding pool, decode-failure policy, the skip report."""

    VERSION = tfds.core.Version("1.3.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "16-bit PNGs holding 12-bit data without sBIT are scaled by 4095, not 65535 (they came out almost "
                 "black); format by content; DICOM; per-record `bit_depth`; bit depths in the skip report.",
        "1.2.0": "Images and labels stored as raw bytes (Tensor encoding BYTES) in uncompressed ArrayRecord "
                 "files: a record reads in a fraction of the time (see Storage in builders.py).",
        "1.3.0": PIXELS_NOTE,
    }

    def __init__(self, *, skip_bad: bool = False, num_workers: int | None = None, progress: bool = True,
                 max_pixels: int | None = images.DEFAULT_MAX_PIXELS, **kwargs):
        kwargs.setdefault("file_format", "array_record")  # TFRecord would need TensorFlow
        self._skip_bad = skip_bad
        self._max_pixels = max_pixels  # the reader's limit (not part of the identity: it refuses, never changes)
        self._num_workers = num_workers
        self._progress = progress
        self._pool = None
        self._problems: list[Problem] = []
        self._flags: dict[str, list[str]] = {}
        self._flag_details: dict[str, dict[str, str]] = {}  # kind -> {item: detail}, e.g. the reading text
        self._ignored: dict[str, list[str]] = {}  # files that are no part of the dataset, by kind
        self._written: Counter = Counter()
        self._bit_depths: Counter = Counter()  # (bits, source) of every written image, for the report
        self._orientations: Counter = Counter()  # EXIF orientation of the written images that had one (not 1)
        self._details: dict = {}  # dataset-specific facts for the report (label-table datasets)
        self._positives: dict[str, Counter] = {}  # split -> label name -> records with that label = 1
        self._known: dict[str, Counter] = {}  # split -> label name -> records whose label is known (not -1)
        super().__init__(**kwargs)

    # TFDS prints where it prepares the dataset, and that it is done, to stdout; the build's own lines (its progress
    # per split, and build.BuildResult.format) say the same.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    # -- subclass hooks --------------------------------------------------------------------------------------

    def label_names(self) -> tuple[str, ...]:
        """The names of a record's `labels` entries (TB sets have none)."""
        return ()

    def _read_raw(self, manual_dir: Path) -> dict[str, list]:
        """Parse the raw copy -> {split: records}; record problems/flags on self."""
        raise NotImplementedError

    def _example(self, record, image: np.ndarray) -> tuple[str, dict]:
        raise NotImplementedError

    # -- tfds hooks ------------------------------------------------------------------------------------------
    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        splits = self._read_raw(Path(dl_manager.manual_dir))
        return {name: self._generate_examples(name, records) for name, records in splits.items()}

    def _generate_examples(self, split: str, records: list):
        decoded = images.decode_many([r.path for r in records], self.builder_config.resolution, pool=self._pool,
                                     desc=f"{self.name} {split}", progress=self._progress, with_info=True,
                                     declared_bits=[getattr(r, "declared_bits", None) for r in records],
                                     bit_depth=self.builder_config.bit_depth or None, max_pixels=self._max_pixels)
        resolution = self.builder_config.resolution
        for record, (image, error, info) in zip(records, decoded):
            if error is None:
                try:  # one file's failure after its decode is that file's problem, not the build's end
                    check_decoded(image, resolution)
                    key, example = self._example(record, image[..., None])
                except Exception as exc:  # noqa: BLE001 - named below with the file, like a decode failure
                    error = f"{record.path}: {type(exc).__name__}: {exc}"
            if error is not None:
                self._problems.append(Problem("undecodable_image", _record_name(record), error))
                continue
            self._written[split] += 1
            self._bit_depths[info.bit_depth, info.bit_depth_source] += 1
            if info.orientation != 1:
                self._orientations[info.orientation] += 1
            self._positives.setdefault(split, Counter()).update(positive_labels(example, self.label_names()))
            self._known.setdefault(split, Counter()).update(
                name for name, value in zip(self.label_names(), example.get("labels", ())) if value >= 0)
            yield key, {**example, "bit_depth": info.bit_depth}

    def _download_and_prepare(self, dl_manager, download_config):
        self._problems, self._flags, self._flag_details, self._ignored = [], {}, {}, {}
        self._written, self._bit_depths, self._positives, self._known = Counter(), Counter(), {}, {}
        self._orientations = Counter()
        with images.decoding_pool(self._num_workers) as self._pool, _writing_uncompressed_array_records():
            try:
                super()._download_and_prepare(dl_manager, download_config)  # one decoding pool for all splits
            except AssertionError as exc:  # tfds refuses a split without examples
                if "No examples were yielded" not in str(exc):
                    raise
                raise RawDataError(self.name, self._problems, hint=f"add images ({exc}: every image of that split "
                                   "was left out, for the problems above)") from exc
        decode_failures = [p for p in self._problems if p.kind == "undecodable_image"]
        if decode_failures and not self._skip_bad:
            raise RawDataError(self.name, decode_failures)  # the temporary dataset folder is then deleted
        write_skip_report(Path(self.data_dir) / SKIP_REPORT_FILE, self, dl_manager.manual_dir)
        write_label_counts(Path(self.data_dir) / LABEL_COUNTS_FILE, self)


def check_decoded(image: np.ndarray, resolution: int | None) -> None:
    """ValueError unless the reader returned what a record holds: a uint8 gray image, R x R when resized."""
    if image.dtype != np.uint8 or image.ndim != 2 or (resolution and image.shape != (resolution, resolution)):
        size = f"{resolution} x {resolution} " if resolution else ""
        raise ValueError(f"decoded to {image.dtype} {image.shape}, not the {size}uint8 gray image a record holds")


def positive_labels(example: dict, label_names=PATHOLOGIES) -> list[str]:
    """The binary labels set to 1 in a record: its `labels` by `label_names` (chestxray14: NIH's 14; a
    label-table dataset: its own), "tb", "sex_male", "view_ap"."""
    names = [name for name, value in zip(label_names, example.get("labels", ())) if value == 1]
    return names + [name for name in ("tb", "sex_male", "view_ap") if example.get(name) == 1]


def write_label_counts(path: Path, builder: _RawImageBuilder) -> None:
    """Per-split label counts of the records written, so that runs need not read every record (which decodes its
    image) to weight classes. Written next to the records, like the skip report. Format:

    {"dataset": "chestxray14", "config": "r256", "version": "1.2.0",
     "splits": {"train": {"num_examples": n, "positives": {"Atelectasis": n, ..., "sex_male": n, "view_ap": n},
                          "known": {"Atelectasis": n, ...}},   # label-table datasets: labels not -1 (unknown)
                ...}}                               # every label of the dataset listed, 0 included
    """
    metadata = ["tb", "sex_male"] if isinstance(builder, _TbBuilder) else ["sex_male", "view_ap"]
    names = list(builder.label_names()) + metadata
    labelled = isinstance(builder, _LabelledBuilder)
    splits = {}
    for split, n in sorted(builder._written.items()):
        splits[split] = {"num_examples": n,
                         "positives": {name: builder._positives.get(split, Counter())[name] for name in names}}
        if labelled:
            splits[split]["known"] = {name: builder._known.get(split, Counter())[name]
                                      for name in builder.label_names()}
    counts = {"dataset": builder.name, "config": builder.builder_config.name, "version": str(builder.version),
              "splits": splits}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(counts, indent=1) + "\n")
    tmp.replace(path)


def _record_name(record) -> str:
    return getattr(record, "image_name", None) or record.image_id


def write_skip_report(path: Path, builder: _RawImageBuilder, manual_dir) -> None:
    """The JSON written next to the records. Format:

    {"dataset": "chestxray14", "config": "r256", "version": "1.0.0", "manual_dir": "...", "skip_bad": true,
     "build_parameters": {"resolution": 256, ...},
     "split_sizes": {"train": n, "validation": n, "test": n},         # records actually written
     "skipped": [{"kind": "...", "item": "...", "detail": "..."}, ...], # exactly what was left out, and why
     "skipped_counts": {"kind": n, ...},
     "flags": {"invalid_age": ["00000001_000.png", ...], ...},        # kept, but with a value marked invalid
     "flag_details": {"tb_mention_in_normal": {"CHNCXR_0001_0": "reading text"}},  # what a flag is about
     "bit_depths": [{"bits": 8, "source": "8-bit file", "images": n}, ...],  # the reader's decisions (images.py)
     "orientations": {"6": n, ...},  # JPEG EXIF orientations applied (images other than 1; builds 1.3.0 / 1.4.0 /
                                     # 1.1.0 on)
     "ignored_files": {"appledouble": {"count": n, "examples": [...]}, ...},  # no part of the dataset (._*,
                                                                       # hidden, Thumbs.db): not read
     "details": {...}}   # label-table datasets: label names, unmapped findings, excluded views, the split drawn
    """
    config = builder.builder_config
    report = {
        "dataset": builder.name,
        "config": config.name,
        "version": str(builder.version),
        "manual_dir": os.fspath(manual_dir),
        "skip_bad": builder._skip_bad,
        "build_parameters": config_parameters(config),
        "split_sizes": dict(sorted(builder._written.items())),
        "skipped": [p.as_dict() for p in sorted(builder._problems)],
        "skipped_counts": dict(sorted(Counter(p.kind for p in builder._problems).items())),
        "flags": builder._flags,
        "flag_details": builder._flag_details,
        "bit_depths": [{"bits": bits, "source": source, "images": n}
                       for (bits, source), n in sorted(builder._bit_depths.items())],
        "orientations": {str(k): n for k, n in sorted(builder._orientations.items())},
        "ignored_files": {kind: {"count": len(paths), "examples": paths[:5]}
                          for kind, paths in sorted(builder._ignored.items())},
    }
    if builder._details:
        report["details"] = builder._details
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)


class Chestxray14(_RawImageBuilder):
    """NIH ChestX-ray14 (112,120 frontal chest X-rays, 14 pathologies + age/sex/view metadata)."""

    def label_names(self) -> tuple[str, ...]:
        return PATHOLOGIES

    BUILDER_CONFIGS = [nih_config(r) for r in PREDEFINED_RESOLUTIONS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download NIH ChestX-ray14 from https://nihcc.app.box.com/v/ChestXray-NIHCC (or a mirror). Put in one folder
    (manual_dir): Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv), train_val_list.txt, test_list.txt and the
    unpacked images_01..12.tar.gz (images/*.png or images_0NN/images/*.png; any depth). Then run
    python -m metachex_jax.prepare --dataset=chestxray14 --manual_dir=THAT_FOLDER --data_dir=OUT
    """

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description="NIH ChestX-ray14, 8-bit gray resized to RxR (aspect not preserved), official test split, "
                        "validation carved from train_val by patient.",
            features=tfds.features.FeaturesDict({
                "image": _image_feature(r),
                "image_name": tfds.features.Text(),
                "patient_id": tfds.features.Scalar(dtype=np.int64),
                "follow_up": tfds.features.Scalar(dtype=np.int64),
                "labels": tfds.features.Tensor(shape=(len(PATHOLOGIES),), dtype=np.uint8,
                                               encoding=tfds.features.Encoding.BYTES),
                "age": tfds.features.Scalar(dtype=np.float32),
                "age_valid": tfds.features.Scalar(dtype=np.bool_),
                "sex_male": tfds.features.Scalar(dtype=np.int64),
                "view_ap": tfds.features.Scalar(dtype=np.int64),
                "bit_depth": tfds.features.Scalar(dtype=np.int64),  # of the raw file, as the reader decided
            }),
            homepage="https://nihcc.app.box.com/v/ChestXray-NIHCC",
            disable_shuffling=True,
        )

    def _read_raw(self, manual_dir: Path) -> dict[str, list]:
        config = self.builder_config
        raw = nih.load_nih(manual_dir, val_fraction=config.val_fraction, seed=config.seed, skip_bad=self._skip_bad)
        self._problems += raw.problems
        self._flags = {"invalid_age": raw.invalid_age_names}
        self._ignored = raw.ignored_files
        return raw.splits

    def _example(self, record: nih.NihRecord, image: np.ndarray) -> tuple[str, dict]:
        return record.image_name, {
            "image": image,
            "image_name": record.image_name,
            "patient_id": record.patient_id,
            "follow_up": record.follow_up,
            "labels": np.asarray(record.labels, dtype=np.uint8),
            "age": np.float32(record.age),
            "age_valid": record.age_valid,
            "sex_male": record.sex_male,
            "view_ap": record.view_ap,
        }


class _TbBuilder(_RawImageBuilder, skip_registration=True):
    BUILDER_CONFIGS = [tb_config(r) for r in PREDEFINED_RESOLUTIONS]
    VERSION = tfds.core.Version("1.4.0")
    RELEASE_NOTES = {
        **_RawImageBuilder.RELEASE_NOTES,
        "1.2.0": "Readings: 'femal' read as female; a normal image whose reading names TB (old or healed TB) is "
                 "kept and flagged (tb_mention_in_normal, with its reading in the skip report) instead of being "
                 "a label disagreement; negations after the word ('TB is not seen') understood.",
        "1.3.0": "The record layout of chestxray14's 1.2.0: images as raw bytes in uncompressed ArrayRecord files.",
        "1.4.0": PIXELS_NOTE,
    }
    SOURCE: tb.TbSource

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.SOURCE.folder} TB set, 8-bit gray resized to RxR; fixed stratified "
                        "train/validation/test (70/10/20) and a stratified fold per record.",
            features=tfds.features.FeaturesDict({
                "image": _image_feature(r),
                "image_id": tfds.features.Text(),
                "tb": tfds.features.Scalar(dtype=np.int64),
                "sex_male": tfds.features.Scalar(dtype=np.int64),
                "age": tfds.features.Scalar(dtype=np.float32),
                "age_valid": tfds.features.Scalar(dtype=np.bool_),
                "fold": tfds.features.Scalar(dtype=np.int64),
                "reading": tfds.features.Text(),
                "bit_depth": tfds.features.Scalar(dtype=np.int64),  # of the raw file, as the reader decided
            }),
            homepage="https://lhncbc.nlm.nih.gov/LHC-downloads/tuberculosis-chest-x-ray-image-data-sets",
            disable_shuffling=True,
        )

    def _read_raw(self, manual_dir: Path) -> dict[str, list]:
        config = self.builder_config
        raw = tb.load_tb(manual_dir, self.SOURCE.name, num_folds=config.num_folds, seed=config.seed,
                         skip_bad=self._skip_bad)
        self._problems += raw.problems
        self._flags, self._flag_details = raw.flags, raw.flag_details
        self._ignored = raw.ignored_files
        return {split: raw.split(split) for split in ("train", "validation", "test")}

    def _example(self, record: tb.TbRecord, image: np.ndarray) -> tuple[str, dict]:
        return record.image_id, {
            "image": image,
            "image_id": record.image_id,
            "tb": record.tb,
            "sex_male": record.sex_male,
            "age": np.float32(record.age),
            "age_valid": record.age_valid,
            "fold": record.fold,
            "reading": record.reading,
        }


_TB_INSTRUCTIONS = """\
    Download the {folder} set from https://lhncbc.nlm.nih.gov/LHC-downloads/tuberculosis-chest-x-ray-image-data-sets
    and unpack it so that manual_dir is `{folder}` (holding CXR_png/ and ClinicalReadings/) or its parent. Then run
    python -m metachex_jax.prepare --dataset={name} --manual_dir=THAT_FOLDER --data_dir=OUT
    """


class Shenzhen(_TbBuilder):
    """Shenzhen TB set (662 images: 326 normal, 336 TB)."""

    SOURCE = tb.SHENZHEN
    MANUAL_DOWNLOAD_INSTRUCTIONS = _TB_INSTRUCTIONS.format(folder=tb.SHENZHEN.folder, name="shenzhen")


class Montgomery(_TbBuilder):
    """Montgomery County TB set (138 images: 80 normal, 58 TB)."""

    SOURCE = tb.MONTGOMERY
    MANUAL_DOWNLOAD_INSTRUCTIONS = _TB_INSTRUCTIONS.format(folder=tb.MONTGOMERY.folder, name="montgomery")


class _LabelledBuilder(_RawImageBuilder, skip_registration=True):
    """The label-table datasets (labelled.py): one record format, the label names in the dataset's metadata.

    Records: image, image_id, patient_id (as written), patient_key (labelled.patient_key: the int64 the pipeline
    groups by), labels int8 (K,) 1/0/-1 in `dataset_info.metadata["label_names"]` order, age, age_valid, sex_male
    and view_ap (-1 unknown), view (as written), fold (-1 where the dataset has none), bit_depth.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.", "1.1.0": PIXELS_NOTE}
    LOAD = None  # the reader's load function: (manual_dir, skip_bad=..., **options) -> labelled.LabelledRaw
    OPTIONS: tuple[str, ...] = ()  # the config fields passed to LOAD
    LABEL_NAMES: tuple[str, ...] = ()
    DESCRIPTION = ""
    HOMEPAGE = ""

    def label_names(self) -> tuple[str, ...]:
        return tuple(self.LABEL_NAMES)

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        names = self.label_names()
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.DESCRIPTION} 8-bit gray resized to RxR (aspect not preserved). Labels: 1 present, "
                        "0 absent, -1 unknown, in metadata['label_names'] order.",
            features=tfds.features.FeaturesDict({
                "image": _image_feature(r),
                "image_id": tfds.features.Text(),
                "patient_id": tfds.features.Text(),
                "patient_key": tfds.features.Scalar(dtype=np.int64),
                "labels": tfds.features.Tensor(shape=(len(names),), dtype=np.int8),
                "age": tfds.features.Scalar(dtype=np.float32),
                "age_valid": tfds.features.Scalar(dtype=np.bool_),
                "sex_male": tfds.features.Scalar(dtype=np.int64),
                "view_ap": tfds.features.Scalar(dtype=np.int64),
                "view": tfds.features.Text(),
                "fold": tfds.features.Scalar(dtype=np.int64),
                "bit_depth": tfds.features.Scalar(dtype=np.int64),  # of the raw file, as the reader decided
            }),
            metadata=tfds.core.MetadataDict(label_names=list(names)),
            homepage=self.HOMEPAGE,
            disable_shuffling=True,
        )

    def _read_raw(self, manual_dir: Path) -> dict[str, list]:
        config = self.builder_config
        raw = type(self).LOAD(manual_dir, skip_bad=self._skip_bad, **{k: getattr(config, k) for k in self.OPTIONS})
        if raw.label_names != self.label_names():
            raise ValueError(f"{self.name}: the raw copy's labels {raw.label_names} are not the build's "
                             f"{self.label_names()}")
        self._problems += raw.problems
        self._flags = raw.flags
        self._details = {"label_names": list(raw.label_names), **raw.details}
        empty = [name for name, records in raw.splits.items() if not records]
        if empty:
            raise ValueError(f"{self.name}: the {' and '.join(empty)} split(s) would be empty "
                             f"({ {k: len(v) for k, v in raw.splits.items()} } images): too few patients for the "
                             f"split fractions of {self.builder_config.name}; add images or raise the fractions")
        return raw.splits

    def _example(self, record: labelled.LabelledRecord, image: np.ndarray) -> tuple[str, dict]:
        return record.image_id, {
            "image": image,
            "image_id": record.image_id,
            "patient_id": record.patient_id,
            "patient_key": labelled.patient_key(record.patient_id),
            "labels": np.asarray(record.labels, dtype=np.int8),
            "age": np.float32(record.age),
            "age_valid": record.age_valid,
            "sex_male": record.sex_male,
            "view_ap": record.view_ap,
            "view": record.view,
            "fold": record.fold,
        }


class Chexpert(_LabelledBuilder):
    """CheXpert (224,316 images of 65,240 patients; train.csv + valid.csv), 14 observations (chexpert.py)."""

    name = "chexpert"
    BUILDER_CONFIGS = [chexpert_config(r) for r in PREDEFINED_RESOLUTIONS]
    LOAD = staticmethod(chexpert.load_chexpert)
    OPTIONS = ("views", "uncertainty", "test_fraction", "seed")
    LABEL_NAMES = chexpert.OBSERVATIONS
    DESCRIPTION = ("CheXpert: train.csv (less a patient-disjoint test carve-out) and valid.csv; uncertain "
                   "observations by the config's policy.")
    HOMEPAGE = "https://stanfordmlgroup.github.io/competitions/chexpert/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download CheXpert-v1.0-small (or CheXpert-v1.0) from https://stanfordmlgroup.github.io/competitions/chexpert/
    and unpack it; manual_dir is the folder holding CheXpert-v1.0-small/ (or that folder itself). Then run
    python -m metachex_jax.prepare --dataset=chexpert --manual_dir=THAT_FOLDER --data_dir=OUT
    """


class Padchest(_LabelledBuilder):
    """PadChest (160,861 images of 67,625 patients), findings mapped onto NIH's 14 + extras (padchest.py)."""

    name = "padchest"
    BUILDER_CONFIGS = [padchest_config(r) for r in PREDEFINED_RESOLUTIONS]
    LOAD = staticmethod(padchest.load_padchest)
    OPTIONS = ("views", "val_fraction", "test_fraction", "seed")
    LABEL_NAMES = padchest.LABEL_NAMES
    DESCRIPTION = ("PadChest: findings mapped onto NIH's 14 labels plus No Finding and Tuberculosis (padchest."
                   "LABEL_FINDINGS); 16-bit PNGs scaled by their BitsStored_DICOM; train/validation/test by patient.")
    HOMEPAGE = "https://bimcv.cipf.es/bimcv-projects/padchest/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download PadChest from https://bimcv.cipf.es/bimcv-projects/padchest/ and unpack the image zips; manual_dir
    holds PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz) and the numbered image folders. Then run
    python -m metachex_jax.prepare --dataset=padchest --manual_dir=THAT_FOLDER --data_dir=OUT
    """


class Csv(_LabelledBuilder):
    """Your own images and labels, listed in a CSV (csv_dataset.py)."""

    name = "csv"
    BUILDER_CONFIGS = []  # every config depends on its CSV: csv_config(...)
    LOAD = staticmethod(csv_dataset.load_csv)
    OPTIONS = ("csv", "num_folds", "seed", "stratify_by", "val_fraction", "test_fraction")
    DESCRIPTION = "Images and labels listed in a CSV; folds and train/validation/test by patient, stratified."
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Write a CSV with a `path` column (relative to manual_dir), one column per label (1, 0 or blank) and optional
    patient_id, age, sex and view columns (see metachex_jax/data/csv_dataset.py). Then run
    python -m metachex_jax.prepare --dataset=csv --csv=YOUR.csv --manual_dir=IMAGE_ROOT --data_dir=OUT
    """

    def label_names(self) -> tuple[str, ...]:
        return tuple(self.builder_config.label_names)


BUILDERS = {builder.name: builder for builder in (Chestxray14, Shenzhen, Montgomery, Chexpert, Padchest, Csv)}


def labelled_family(name: str, *, load, label_names: tuple[str, ...], options: dict, name_parts, description: str,
                    homepage: str, instructions: str, version: str = "1.0.0",
                    release_notes: dict | None = None) -> tuple[type, Callable[..., tfds.core.BuilderConfig]]:
    """A label-table dataset declared in one call (registry.py): (its builder class, its config function).

    `load(manual_dir, skip_bad=..., **options)` -> labelled.LabelledRaw (the reader); `options`: the reader's
    options besides resolution and bit_depth, name -> default (each becomes a config field and a build
    parameter); `name_parts(**options)` -> the config name's parts after `r<R>` (empty for the defaults; the
    reader knows which options change the content). The builder records what every label-table builder records
    (_LabelledBuilder) and is registered in BUILDERS.
    """
    fields = [("resolution", int, DEFAULT_RESOLUTION), *((k, type(v), v) for k, v in options.items()),
              ("bit_depth", int, 0)]
    camel = "".join(part.capitalize() for part in name.split("_"))
    config_class = dataclasses.make_dataclass(f"{camel}Config", fields, bases=(tfds.core.BuilderConfig,),
                                              eq=False)

    def make_config(resolution: int = DEFAULT_RESOLUTION, bit_depth: int = 0, **given) -> tfds.core.BuilderConfig:
        unknown = sorted(set(given) - set(options))
        if unknown:
            raise ValueError(f"{name} takes no option(s) {unknown}; its options: {', '.join(options)}")
        values = {**options, **given}
        parts = [f"r{resolution}", *name_parts(**values), *_bits_suffix(bit_depth)]
        text = ", ".join(f"{k}={v!r}" for k, v in values.items())
        return config_class(name="_".join(parts), resolution=resolution, bit_depth=bit_depth, **values,
                            description=f"{resolution}x{resolution} gray; {text}{_bits_text(bit_depth)}")

    builder = type(camel, (_LabelledBuilder,), {
        "__module__": __name__, "name": name, "VERSION": tfds.core.Version(version),
        "RELEASE_NOTES": release_notes or {version: "Initial release."},
        "BUILDER_CONFIGS": [make_config(r) for r in PREDEFINED_RESOLUTIONS], "LOAD": staticmethod(load),
        "OPTIONS": tuple(options), "LABEL_NAMES": tuple(label_names), "DESCRIPTION": description,
        "HOMEPAGE": homepage, "MANUAL_DOWNLOAD_INSTRUCTIONS": instructions})
    BUILDERS[name] = builder
    return builder, make_config


def version(dataset: str) -> str:
    """The VERSION of `dataset`'s builder: the folder its complete builds live in."""
    if dataset not in BUILDERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(BUILDERS)}")
    return str(BUILDERS[dataset].VERSION)


def dataset_dir(data_dir: str | os.PathLike, dataset: str, config_name: str) -> epath.Path:
    """Where a complete build lives: <data_dir>/<dataset>/<config>/<version> (data_dir local or gs://)."""
    return epath.Path(os.fspath(data_dir)) / dataset / config_name / version(dataset)


def is_complete(data_dir: str | os.PathLike, dataset: str, config_name: str) -> bool:
    """True when the build finished (tfds wrote dataset_info.json and renamed the folder into place)."""
    return (dataset_dir(data_dir, dataset, config_name) / "dataset_info.json").is_file()


def older_builds(data_dir: str | os.PathLike, dataset: str, config_name: str) -> list[str]:
    """The versions of complete builds of this config made by earlier builders: a run never reads them (the
    pixels or records differ; see Versions in the module docstring), so they are named when a build is missing."""
    config_dir = epath.Path(os.fspath(data_dir)) / dataset / config_name
    current = version(dataset)
    if not config_dir.is_dir():
        return []
    return sorted(p.name for p in config_dir.iterdir() if p.name != current and (p / "dataset_info.json").exists())


@contextlib.contextmanager
def build_lock(data_dir: str | os.PathLike, dataset: str, config_name: str) -> Iterator[None]:
    """An exclusive lock (flock on <data_dir>/<dataset>/<config>/.build.lock) held while building that config.

    Local data_dir only (flock needs a local or shared POSIX file system; build.build_dataset refuses gs://).
    """
    config_dir = Path(data_dir) / dataset / config_name
    config_dir.mkdir(parents=True, exist_ok=True)
    with open(config_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def remove_incomplete_builds(data_dir: str | os.PathLike, dataset: str, config_name: str) -> list[Path]:
    """Delete the `incomplete.*` folders an interrupted (killed) build left behind; returns what was removed.

    Call it under `build_lock` (as build.build_dataset does), so that no live build's folder is removed.
    """
    config_dir = Path(data_dir) / dataset / config_name
    leftovers = sorted(config_dir.glob("incomplete.*")) if config_dir.is_dir() else []
    for path in leftovers:
        shutil.rmtree(path)
    return leftovers


def read_skip_report(data_dir: str | os.PathLike, dataset: str, config_name: str) -> dict:
    return json.loads((dataset_dir(data_dir, dataset, config_name) / SKIP_REPORT_FILE).read_text())


def read_label_counts(data_dir: str | os.PathLike, dataset: str, config_name: str) -> dict | None:
    """The build's `write_label_counts` JSON (local or gs://), or None for a build made before it existed."""
    return read_label_counts_at(dataset_dir(data_dir, dataset, config_name))


def read_label_counts_at(build_dir: str | os.PathLike) -> dict | None:
    """`read_label_counts` of the build in `build_dir` (<data_dir>/<dataset>/<config>/<version>, as
    `tfds.data_source(...).dataset_info.data_dir` names it)."""
    path = epath.Path(os.fspath(build_dir)) / LABEL_COUNTS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def data_source(dataset: str, split: str, data_dir: str | os.PathLike, *, config_name: str | None = None,
                resolution: int = DEFAULT_RESOLUTION):
    """`tfds.data_source("<dataset>/<config>", split=split, data_dir=data_dir)` (config defaults to r<resolution>),
    read through `records.RecordSource`: the same records, decoded without TFDS's per-record overhead."""
    config_name = config_name or f"r{resolution}"
    return RecordSource(tfds.data_source(f"{dataset}/{config_name}", split=split, data_dir=os.fspath(data_dir)))
