"""The dataset families' definitions: `chestxray14`, `shenzhen`, `montgomery`, and the label-table datasets
`chexpert`, `padchest`, `mimic`, `tbx11k`, `vindr` and `csv` (your own data): what a build of each is called, which version of its builder
made it, and how its raw copy is read. Each is one entry of the dataset table, `registry.DATASETS`.

Build with `build.build_dataset` (or `python -m metachex_jax.prepare`); read with

    source = data_source("chestxray14", "train", OUT)                 # records.RecordSource; also "validation",
    record = source[i]                                                # "test", "train+validation+test"

A family is a class holding its builder VERSION and release notes, its predefined configs and `read_raw` (the
raw copy -> the planned records of each split, every problem collected: data/raw). Everything else, the same for
every family, is the build (build.py: plan, runners, tally, publish), so a new family builds locally and on Beam
without code of its own. A label-table family is `_LabelledBuilder` with four class attributes (its reader's
LOAD, the config fields passed to it, its LABEL_NAMES, a DESCRIPTION).

Identity: the config name carries everything that changes the content, so two builds never mix: `r{resolution}`
with the defaults, plus `_val{fraction}_seed{seed}` (chestxray14) or `_k{k}_seed{seed}` (TB) when those differ
from the defaults ("." in a fraction is written "p": r256_val0p05_seed3), `_bits{n}` when the build overrides the
bit depth of high-depth images (`bit_depth`, the reader's override, imaging/images.py; 0, the default, is the
reader's rule), and `_square` for geometry "crop_resize": the centre square of each image is kept, then resized
(torchxrayvision's pixels; imaging/geometry.py), where the default "resize_crop" resizes the whole image to R x R.
The label-table datasets' names are built the same way from their options (`chexpert_config`, `padchest_config`,
`mimic_config`, `tbx11k_config`, `vindr_config`, `csv_config`), and a CSV dataset's also carries a fingerprint of
the CSV file. `skip_bad` and `max_pixels` (the reader's size limit) are not part of the identity: what they left
out is in the skip report.

Versions: a build's folder is named after its builder's VERSION, and a run reads only builds of the current
VERSION (`is_complete`), so a build made by an older builder is never mixed with new ones: the run prepares the
dataset again when it knows the raw copy, or stops with the `prepare` command that rebuilds it (an older build
found is named: `older_builds`). 2.0.0 (every family): the record layout of layout.py (raw pixels, a small label
block, the texts; no tf.Example), shards fixed by record position, publication by info file (publish.py), the
`geometry` parameter. Builds before 2.0.0 are not read. The families added on this layout (mimic, tbx11k,
vindr) start at 2.0.0, so a version names one record layout for every family.

Storage (layout.py, shards.py): per record the R x R pixels as raw bytes and a few dozen bytes of labels and
metadata, in uncompressed ArrayRecord files, one riegeli chunk (and hash) per record. Reading is the input
pipeline's hot path on every epoch; disk is paid once: NIH at 256 px takes about 7.3 GB (65.6 KiB x 112,120).

Records are written in plan order (sorted by image name / id), so record index i is stable across builds of the
same raw copy and config, on every runner, byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar

from etils import epath

from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.data.build import publish
from metachex_jax.data.build.records import RecordSource
from metachex_jax.data.raw import chexpert, csv_dataset, mimic, nih, padchest, tb, tbx11k, vindr
from metachex_jax.data.raw.common import Problem
from metachex_jax.imaging.geometry import GEOMETRIES

SKIP_REPORT_FILE = "skip_report.json"
LABEL_COUNTS_FILE = "label_counts.json"
DEFAULT_RESOLUTION = 256
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_SEED = 0
DEFAULT_GEOMETRY = "resize_crop"
PREDEFINED_RESOLUTIONS = (256, 224, 512, 128, 1024)  # the first is the default config

# What the reader's one-rounding rule changed in every family's pixels (the release note of its version bump).
PIXELS_NOTE = ("One pixel path: every source mapped to 8 bits with one rounding, then the exact area average rounded "
               "once (imaging/resize.py; Pillow's BOX filter rounded between passes and is no area average for "
               "non-integer ratios); 16-bit colour and gray+alpha PNGs at full depth; gray PNGs with tRNS read; "
               "JPEG EXIF orientation applied; truncated JPEGs refused; build parameter bit_depth; "
               "`orientations` in the skip report.")
LAYOUT_NOTE = ("Lean records (layout.py: raw pixels, a small label block, the texts; no tf.Example), written "
               "byte-identically by the local process pool and by Apache Beam; shards fixed by record position; a "
               "build published by its dataset_info.json, written last (publish.py); build parameter geometry "
               "(crop_resize: the centre square kept, `_square`). The pixels of resize_crop builds are unchanged.")


def _fraction_text(fraction: float) -> str:
    return f"{fraction:g}".replace(".", "p")


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """A build's identity: `name` (the folder: r256, r256_k5_seed1, ...) and its parameters (the subclasses'
    fields)."""

    name: str
    description: str = ""


@dataclasses.dataclass(frozen=True)
class NihConfig(BuildConfig):
    resolution: int = DEFAULT_RESOLUTION
    val_fraction: float = DEFAULT_VAL_FRACTION
    seed: int = DEFAULT_SEED
    bit_depth: int = 0  # the reader's override for high-depth images (0: the reader's rule)
    geometry: str = DEFAULT_GEOMETRY


@dataclasses.dataclass(frozen=True)
class TbConfig(BuildConfig):
    resolution: int = DEFAULT_RESOLUTION
    num_folds: int = tb.DEFAULT_NUM_FOLDS
    seed: int = DEFAULT_SEED
    bit_depth: int = 0
    geometry: str = DEFAULT_GEOMETRY


def _reader_suffix(bit_depth: int, geometry: str) -> list[str]:
    """The config name parts of a bit-depth override and of the centre-square geometry (none for the defaults)."""
    if bit_depth and not 1 <= bit_depth <= 16:
        raise ValueError(f"bit_depth={bit_depth}: must be in 1..16 (or 0: the reader's rule)")
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry={geometry!r}: expected one of {GEOMETRIES}")
    return ([f"bits{bit_depth}"] if bit_depth else []) + (["square"] if geometry == "crop_resize" else [])


def nih_config_name(resolution: int = DEFAULT_RESOLUTION, val_fraction: float = DEFAULT_VAL_FRACTION,
                    seed: int = DEFAULT_SEED, bit_depth: int = 0, geometry: str = DEFAULT_GEOMETRY) -> str:
    parts = [f"r{resolution}"]
    if (val_fraction, seed) != (DEFAULT_VAL_FRACTION, DEFAULT_SEED):
        parts.append(f"val{_fraction_text(val_fraction)}_seed{seed}")
    return "_".join(parts + _reader_suffix(bit_depth, geometry))


def tb_config_name(resolution: int = DEFAULT_RESOLUTION, num_folds: int = tb.DEFAULT_NUM_FOLDS,
                   seed: int = DEFAULT_SEED, bit_depth: int = 0, geometry: str = DEFAULT_GEOMETRY) -> str:
    parts = [f"r{resolution}"]
    if (num_folds, seed) != (tb.DEFAULT_NUM_FOLDS, DEFAULT_SEED):
        parts.append(f"k{num_folds}_seed{seed}")
    return "_".join(parts + _reader_suffix(bit_depth, geometry))


def _reader_text(bit_depth: int, geometry: str) -> str:
    return ((f"; high-depth images read as {bit_depth}-bit" if bit_depth else "")
            + ("; the centre square of each image" if geometry == "crop_resize" else ""))


def nih_config(resolution: int = DEFAULT_RESOLUTION, val_fraction: float = DEFAULT_VAL_FRACTION,
               seed: int = DEFAULT_SEED, bit_depth: int = 0, geometry: str = DEFAULT_GEOMETRY) -> NihConfig:
    return NihConfig(name=nih_config_name(resolution, val_fraction, seed, bit_depth, geometry), resolution=resolution,
                     val_fraction=val_fraction, seed=seed, bit_depth=bit_depth, geometry=geometry,
                     description=f"{resolution}x{resolution} gray; validation = {val_fraction:g} of train_val "
                                 f"patients (seed {seed}){_reader_text(bit_depth, geometry)}")


def tb_config(resolution: int = DEFAULT_RESOLUTION, num_folds: int = tb.DEFAULT_NUM_FOLDS,
              seed: int = DEFAULT_SEED, bit_depth: int = 0, geometry: str = DEFAULT_GEOMETRY) -> TbConfig:
    return TbConfig(name=tb_config_name(resolution, num_folds, seed, bit_depth, geometry), resolution=resolution,
                    num_folds=num_folds, seed=seed, bit_depth=bit_depth, geometry=geometry,
                    description=f"{resolution}x{resolution} gray; {num_folds} stratified folds (seed {seed})"
                                f"{_reader_text(bit_depth, geometry)}")


@dataclasses.dataclass(frozen=True)
class ChexpertConfig(BuildConfig):
    resolution: int = DEFAULT_RESOLUTION
    views: str = "frontal"
    uncertainty: str = "ignore"
    test_fraction: float = chexpert.DEFAULT_TEST_FRACTION
    seed: int = DEFAULT_SEED
    bit_depth: int = 0
    geometry: str = DEFAULT_GEOMETRY


@dataclasses.dataclass(frozen=True)
class PadchestConfig(BuildConfig):
    resolution: int = DEFAULT_RESOLUTION
    views: str = "frontal"
    val_fraction: float = padchest.DEFAULT_VAL_FRACTION
    test_fraction: float = padchest.DEFAULT_TEST_FRACTION
    seed: int = DEFAULT_SEED
    bit_depth: int = 0
    geometry: str = DEFAULT_GEOMETRY


@dataclasses.dataclass(frozen=True)
class CsvConfig(BuildConfig):
    resolution: int = DEFAULT_RESOLUTION
    csv: str = ""  # the CSV file (absolute)
    num_folds: int = csv_dataset.DEFAULT_NUM_FOLDS
    seed: int = DEFAULT_SEED
    stratify_by: str = ""  # the label column (resolved: never blank in a built config)
    val_fraction: float = csv_dataset.DEFAULT_VAL_FRACTION
    test_fraction: float = csv_dataset.DEFAULT_TEST_FRACTION
    label_names: tuple = ()  # the CSV's label columns, in order
    bit_depth: int = 0
    geometry: str = DEFAULT_GEOMETRY


def chexpert_config(resolution: int = DEFAULT_RESOLUTION, views: str = "frontal", uncertainty: str = "ignore",
                    test_fraction: float = chexpert.DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SEED,
                    bit_depth: int = 0, geometry: str = DEFAULT_GEOMETRY) -> ChexpertConfig:
    """r{R}, plus `_all` (every view), `_unc-...` (a non-default uncertainty policy, chexpert.uncertainty_name),
    `_test{f}_seed{s}`, `_bits{n}` and `_square` when they differ from the defaults."""
    chexpert.parse_uncertainty(uncertainty)  # fails early, naming the problem
    parts = [f"r{resolution}"]
    parts += ["all"] if views == "all" else []
    parts += [chexpert.uncertainty_name(uncertainty)] if chexpert.uncertainty_name(uncertainty) else []
    if (test_fraction, seed) != (chexpert.DEFAULT_TEST_FRACTION, DEFAULT_SEED):
        parts.append(f"test{_fraction_text(test_fraction)}_seed{seed}")
    return ChexpertConfig(name="_".join(parts + _reader_suffix(bit_depth, geometry)), resolution=resolution,
                          views=views, uncertainty=uncertainty, test_fraction=test_fraction, seed=seed,
                          bit_depth=bit_depth, geometry=geometry,
                          description=f"{resolution}x{resolution} gray; {views} views; uncertain labels: "
                                      f"{uncertainty}; test = {test_fraction:g} of train.csv's patients (seed {seed})"
                                      f"{_reader_text(bit_depth, geometry)}")


def padchest_config(resolution: int = DEFAULT_RESOLUTION, views: str = "frontal",
                    val_fraction: float = padchest.DEFAULT_VAL_FRACTION,
                    test_fraction: float = padchest.DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SEED,
                    bit_depth: int = 0, geometry: str = DEFAULT_GEOMETRY) -> PadchestConfig:
    """r{R}, plus `_all` (every projection), `_val{f}_test{f}_seed{s}`, `_bits{n}` and `_square` when they differ
    from the defaults."""
    parts = [f"r{resolution}"] + (["all"] if views == "all" else [])
    if (val_fraction, test_fraction, seed) != (padchest.DEFAULT_VAL_FRACTION, padchest.DEFAULT_TEST_FRACTION,
                                               DEFAULT_SEED):
        parts.append(f"val{_fraction_text(val_fraction)}_test{_fraction_text(test_fraction)}_seed{seed}")
    return PadchestConfig(name="_".join(parts + _reader_suffix(bit_depth, geometry)), resolution=resolution,
                          views=views, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                          bit_depth=bit_depth, geometry=geometry,
                          description=f"{resolution}x{resolution} gray; {views} projections; train/validation/test "
                                      f"by patient ({val_fraction:g} validation, {test_fraction:g} test, seed {seed})"
                                      f"{_reader_text(bit_depth, geometry)}")


def csv_config(resolution: int = DEFAULT_RESOLUTION, csv: str = "", num_folds: int = csv_dataset.DEFAULT_NUM_FOLDS,
               seed: int = DEFAULT_SEED, stratify_by: str = "", val_fraction: float = csv_dataset.DEFAULT_VAL_FRACTION,
               test_fraction: float = csv_dataset.DEFAULT_TEST_FRACTION, bit_depth: int = 0,
               geometry: str = DEFAULT_GEOMETRY) -> CsvConfig:
    """`<csv stem>_r{R}[_k{k}_seed{s}][_strat-{column}][_val{f}_test{f}][_bits{n}][_square]_<fingerprint>` (options
    when they differ from the defaults; the fingerprint covers the CSV's bytes and every option:
    csv_dataset.fingerprint)."""
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
    parts += _reader_suffix(bit_depth, geometry)
    # (only when set, so that the fingerprints of builds with the defaults stay what they were)
    options.update({"bit_depth": bit_depth} if bit_depth else {})
    options.update({"geometry": geometry} if geometry != DEFAULT_GEOMETRY else {})
    parts.append(csv_dataset.fingerprint(layout.path, options))
    return CsvConfig(name="_".join(parts), resolution=resolution, csv=str(layout.path), num_folds=num_folds,
                     seed=seed, stratify_by=stratify_by, val_fraction=val_fraction, test_fraction=test_fraction,
                     label_names=layout.label_names, bit_depth=bit_depth, geometry=geometry,
                     description=f"{layout.path.name}: {resolution}x{resolution} gray; labels "
                                 f"{', '.join(layout.label_names)}; {num_folds} folds and a train/validation/test "
                                 f"split by patient, stratified by {stratify_by} (seed {seed})"
                                 f"{_reader_text(bit_depth, geometry)}")


@dataclasses.dataclass(frozen=True)
class MimicConfig(BuildConfig):
    resolution: int = DEFAULT_RESOLUTION
    views: str = "frontal"
    uncertainty: str = "ignore"
    labeler: str = "chexpert"
    csv_dir: str = ""  # the JPG release's CSVs, for the DICOM release ("": manual_dir)
    patients_csv: str = ""  # MIMIC-IV's patients file, the source of sex and age ("": none)
    bit_depth: int = 0
    geometry: str = DEFAULT_GEOMETRY


@dataclasses.dataclass(frozen=True)
class Tbx11kConfig(BuildConfig):
    resolution: int = DEFAULT_RESOLUTION
    val_fraction: float = tbx11k.DEFAULT_VAL_FRACTION
    seed: int = DEFAULT_SEED
    extra_folders: str = "exclude"
    box_tolerance: float = tbx11k.DEFAULT_BOX_TOLERANCE
    bit_depth: int = 0
    geometry: str = DEFAULT_GEOMETRY


@dataclasses.dataclass(frozen=True)
class VindrConfig(BuildConfig):
    resolution: int = DEFAULT_RESOLUTION
    label_rule: str = "majority"
    val_fraction: float = vindr.DEFAULT_VAL_FRACTION
    test_fraction: float = vindr.DEFAULT_TEST_FRACTION
    seed: int = DEFAULT_SEED
    bit_depth: int = 0
    geometry: str = DEFAULT_GEOMETRY


def _table_config(config_class: type, name_parts, resolution: int, bit_depth: int, geometry: str, **options):
    """A label-table config whose reader names its options' config-name parts (`name_parts(**options)`: none for
    the defaults; the reader knows which options change the content): r{R}, those parts, `_bits{n}`, `_square`."""
    parts = [f"r{resolution}", *name_parts(**options), *_reader_suffix(bit_depth, geometry)]
    text = ", ".join(f"{k}={v!r}" for k, v in options.items())
    return config_class(name="_".join(parts), resolution=resolution, bit_depth=bit_depth, geometry=geometry,
                        description=f"{resolution}x{resolution} gray; {text}{_reader_text(bit_depth, geometry)}",
                        **options)


def mimic_config(resolution: int = DEFAULT_RESOLUTION, views: str = "frontal", uncertainty: str = "ignore",
                 labeler: str = "chexpert", csv_dir: str = "", patients_csv: str = "", bit_depth: int = 0,
                 geometry: str = DEFAULT_GEOMETRY) -> MimicConfig:
    """r{R}, plus mimic.name_parts (views, labeller, uncertainty policy, the patients file's fingerprint),
    `_bits{n}` and `_square` when they differ from the defaults."""
    return _table_config(MimicConfig, mimic.name_parts, resolution, bit_depth, geometry, views=views,
                         uncertainty=uncertainty, labeler=labeler, csv_dir=csv_dir, patients_csv=patients_csv)


def tbx11k_config(resolution: int = DEFAULT_RESOLUTION, val_fraction: float = tbx11k.DEFAULT_VAL_FRACTION,
                  seed: int = DEFAULT_SEED, extra_folders: str = "exclude",
                  box_tolerance: float = tbx11k.DEFAULT_BOX_TOLERANCE, bit_depth: int = 0,
                  geometry: str = DEFAULT_GEOMETRY) -> Tbx11kConfig:
    """r{R}, plus tbx11k.name_parts (`_val{f}_seed{s}`, `_extra`, `_tol{t}`), `_bits{n}` and `_square` when they
    differ from the defaults."""
    return _table_config(Tbx11kConfig, tbx11k.name_parts, resolution, bit_depth, geometry, val_fraction=val_fraction,
                         seed=seed, extra_folders=extra_folders, box_tolerance=box_tolerance)


def vindr_config(resolution: int = DEFAULT_RESOLUTION, label_rule: str = "majority",
                 val_fraction: float = vindr.DEFAULT_VAL_FRACTION, test_fraction: float = vindr.DEFAULT_TEST_FRACTION,
                 seed: int = DEFAULT_SEED, bit_depth: int = 0, geometry: str = DEFAULT_GEOMETRY) -> VindrConfig:
    """r{R}, plus vindr.name_parts (`_rule-any`, `_val{f}_test{f}_seed{s}`), `_bits{n}` and `_square` when they
    differ from the defaults."""
    return _table_config(VindrConfig, vindr.name_parts, resolution, bit_depth, geometry, label_rule=label_rule,
                         val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)


def config_parameters(config: BuildConfig) -> dict:
    """A config's own fields (resolution and the build parameters), as the skip report records them."""
    common = {f.name for f in dataclasses.fields(BuildConfig)}
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in common}


@dataclasses.dataclass
class RawCopy:
    """A raw copy parsed by a family's reader: the planned records and what the build report needs of it."""

    splits: dict[str, list]  # split -> raw records (data/raw dataclasses with a `path`), in record order
    problems: list[Problem]  # raw-row problems: left out (skip_bad), else the reader raised already
    flags: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # kept, with a value marked invalid
    flag_details: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # e.g. a reading's text
    ignored: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # files no part of the dataset
    details: dict = dataclasses.field(default_factory=dict)  # dataset-specific facts (label-table datasets)


class _RawImageBuilder:
    """What every family has (module docstring). An instance is one config's builder."""

    name: ClassVar[str]
    VERSION: ClassVar[str] = "2.0.0"
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release.",
        "1.1.0": "16-bit PNGs holding 12-bit data without sBIT are scaled by 4095, not 65535 (they came out almost "
                 "black); format by content; DICOM; per-record `bit_depth`; bit depths in the skip report.",
        "1.2.0": "Images and labels stored as raw bytes (Tensor encoding BYTES) in uncompressed ArrayRecord files.",
        "1.3.0": PIXELS_NOTE,
        "2.0.0": LAYOUT_NOTE,
    }
    BUILDER_CONFIGS: ClassVar[list] = []
    DESCRIPTION: ClassVar[str] = ""
    HOMEPAGE: ClassVar[str] = ""
    MANUAL_DOWNLOAD_INSTRUCTIONS: ClassVar[str] = ""

    def __init__(self, config: BuildConfig):
        self.builder_config = config

    def label_names(self) -> tuple[str, ...]:
        """The names of a record's `labels` entries (TB sets have none)."""
        return ()

    def read_raw(self, manual_dir: str, *, skip_bad: bool) -> RawCopy:
        """Parse the raw copy (a local folder) -> the planned records of each split, every problem collected."""
        raise NotImplementedError


class Chestxray14(_RawImageBuilder):
    """NIH ChestX-ray14 (112,120 frontal chest X-rays, 14 pathologies + age/sex/view metadata)."""

    name = "chestxray14"
    BUILDER_CONFIGS = [nih_config(r) for r in PREDEFINED_RESOLUTIONS]
    DESCRIPTION = ("NIH ChestX-ray14, 8-bit gray resized to RxR, official test split, validation carved from "
                   "train_val by patient.")
    HOMEPAGE = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download NIH ChestX-ray14 from https://nihcc.app.box.com/v/ChestXray-NIHCC (or a mirror). Put in one folder
    (manual_dir): Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv), train_val_list.txt, test_list.txt and the
    unpacked images_01..12.tar.gz (images/*.png or images_0NN/images/*.png; any depth). Then run
    python -m metachex_jax.prepare --dataset=chestxray14 --manual_dir=THAT_FOLDER --data_dir=OUT
    """

    def label_names(self) -> tuple[str, ...]:
        return PATHOLOGIES

    def read_raw(self, manual_dir: str, *, skip_bad: bool) -> RawCopy:
        config = self.builder_config
        raw = nih.load_nih(manual_dir, val_fraction=config.val_fraction, seed=config.seed, skip_bad=skip_bad)
        return RawCopy(raw.splits, list(raw.problems), flags={"invalid_age": raw.invalid_age_names},
                       ignored=raw.ignored_files)


class _TbBuilder(_RawImageBuilder):
    BUILDER_CONFIGS = [tb_config(r) for r in PREDEFINED_RESOLUTIONS]
    RELEASE_NOTES = {
        **_RawImageBuilder.RELEASE_NOTES,
        "1.2.0": "Readings: 'femal' read as female; a normal image whose reading names TB (old or healed TB) is "
                 "kept and flagged (tb_mention_in_normal, with its reading in the skip report) instead of being "
                 "a label disagreement; negations after the word ('TB is not seen') understood.",
        "1.3.0": "The record layout of chestxray14's 1.2.0: images as raw bytes in uncompressed ArrayRecord files.",
        "1.4.0": PIXELS_NOTE,
    }
    HOMEPAGE = "https://lhncbc.nlm.nih.gov/LHC-downloads/tuberculosis-chest-x-ray-image-data-sets"
    SOURCE: ClassVar[tb.TbSource]

    def read_raw(self, manual_dir: str, *, skip_bad: bool) -> RawCopy:
        config = self.builder_config
        raw = tb.load_tb(manual_dir, self.SOURCE.name, num_folds=config.num_folds, seed=config.seed,
                         skip_bad=skip_bad)
        return RawCopy({split: raw.split(split) for split in ("train", "validation", "test")}, list(raw.problems),
                       flags=raw.flags, flag_details=raw.flag_details, ignored=raw.ignored_files)


_TB_INSTRUCTIONS = """\
    Download the {folder} set from https://lhncbc.nlm.nih.gov/LHC-downloads/tuberculosis-chest-x-ray-image-data-sets
    and unpack it so that manual_dir is `{folder}` (holding CXR_png/ and ClinicalReadings/) or its parent. Then run
    python -m metachex_jax.prepare --dataset={name} --manual_dir=THAT_FOLDER --data_dir=OUT
    """
_TB_DESCRIPTION = ("{folder} TB set, 8-bit gray resized to RxR; fixed stratified train/validation/test (70/10/20) "
                   "and a stratified fold per record.")


class Shenzhen(_TbBuilder):
    """Shenzhen TB set (662 images: 326 normal, 336 TB)."""

    name = "shenzhen"
    SOURCE = tb.SHENZHEN
    DESCRIPTION = _TB_DESCRIPTION.format(folder=tb.SHENZHEN.folder)
    MANUAL_DOWNLOAD_INSTRUCTIONS = _TB_INSTRUCTIONS.format(folder=tb.SHENZHEN.folder, name="shenzhen")


class Montgomery(_TbBuilder):
    """Montgomery County TB set (138 images: 80 normal, 58 TB)."""

    name = "montgomery"
    SOURCE = tb.MONTGOMERY
    DESCRIPTION = _TB_DESCRIPTION.format(folder=tb.MONTGOMERY.folder)
    MANUAL_DOWNLOAD_INSTRUCTIONS = _TB_INSTRUCTIONS.format(folder=tb.MONTGOMERY.folder, name="montgomery")


class _LabelledBuilder(_RawImageBuilder):
    """The label-table datasets (labelled.py): one record format, the label names in the build's info.

    Records (layout.py, kind "labelled"): image, image_id, patient_id (as written), patient_key
    (labelled.patient_key: the int64 the pipeline groups by), labels int8 (K,) 1/0/-1 in `label_names` order, age,
    age_valid, sex_male and view_ap (-1 unknown), view (as written), fold (-1 where the dataset has none),
    bit_depth.
    """

    RELEASE_NOTES = {"1.0.0": "Initial release.", "1.1.0": PIXELS_NOTE, "2.0.0": LAYOUT_NOTE}
    LOAD: ClassVar[Any] = None  # the reader's load function: (manual_dir, skip_bad=..., **options) -> LabelledRaw
    OPTIONS: ClassVar[tuple[str, ...]] = ()  # the config fields passed to LOAD
    LABEL_NAMES: ClassVar[tuple[str, ...]] = ()

    def label_names(self) -> tuple[str, ...]:
        return tuple(self.LABEL_NAMES)

    def read_raw(self, manual_dir: str, *, skip_bad: bool) -> RawCopy:
        config = self.builder_config
        raw = type(self).LOAD(manual_dir, skip_bad=skip_bad, **{k: getattr(config, k) for k in self.OPTIONS})
        if raw.label_names != self.label_names():
            raise ValueError(f"{self.name}: the raw copy's labels {raw.label_names} are not the build's "
                             f"{self.label_names()}")
        empty = [name for name, records in raw.splits.items() if not records]
        if empty:
            raise ValueError(f"{self.name}: the {' and '.join(empty)} split(s) would be empty "
                             f"({ {k: len(v) for k, v in raw.splits.items()} } images): too few patients for the "
                             f"split fractions of {config.name}; add images or raise the fractions")
        return RawCopy(raw.splits, list(raw.problems), flags=raw.flags,
                       details={"label_names": list(raw.label_names), **raw.details})


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
    LOAD = staticmethod(csv_dataset.load_csv)
    OPTIONS = ("csv", "num_folds", "seed", "stratify_by", "val_fraction", "test_fraction")
    DESCRIPTION = "Images and labels listed in a CSV; folds and train/validation/test by patient, stratified."
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Write a CSV with a `path` column (relative to manual_dir), one column per label (1, 0 or blank) and optional
    patient_id, age, sex and view columns (see metachex_jax/data/raw/csv_dataset.py). Then run
    python -m metachex_jax.prepare --dataset=csv --csv=YOUR.csv --manual_dir=IMAGE_ROOT --data_dir=OUT
    """

    def label_names(self) -> tuple[str, ...]:
        return tuple(self.builder_config.label_names)


# The families added on the 2.0.0 record layout: their first version is the layout's.
_NEW_ON_LAYOUT = {"2.0.0": "Initial release, on the record layout of every family's 2.0.0: " + LAYOUT_NOTE}


class Mimic(_LabelledBuilder):
    """MIMIC-CXR-JPG or MIMIC-CXR (DICOM): the labeller's study labels on each image of the study (mimic.py)."""

    name = "mimic"
    RELEASE_NOTES = _NEW_ON_LAYOUT
    BUILDER_CONFIGS = [mimic_config(r) for r in PREDEFINED_RESOLUTIONS]
    LOAD = staticmethod(mimic.load_mimic)
    OPTIONS = ("views", "uncertainty", "labeler", "csv_dir", "patients_csv")
    LABEL_NAMES = mimic.OBSERVATIONS
    DESCRIPTION = ("MIMIC-CXR-JPG or MIMIC-CXR (DICOM): the CheXpert (or NegBio) labeller's study labels on each "
                   "image of the study, the official split; sex and age from MIMIC-IV when given.")
    HOMEPAGE = "https://physionet.org/content/mimic-cxr-jpg/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download MIMIC-CXR-JPG (or MIMIC-CXR, the DICOMs) from PhysioNet (credentialed access); manual_dir is the
    release folder holding files/ (and, for the JPG release, the mimic-cxr-2.0.0-*.csv.gz files). Then run
    python -m metachex_jax.prepare --dataset=mimic --manual_dir=THAT_FOLDER --data_dir=OUT
        [--csv_dir=THE_JPG_RELEASE (for the DICOMs)] [--patients_csv=MIMIC-IV/hosp/patients.csv.gz]
    """


class Tbx11k(_LabelledBuilder):
    """TBX11K: labels by folder (Tuberculosis) and by box (Active TB, Latent TB) (tbx11k.py)."""

    name = "tbx11k"
    RELEASE_NOTES = _NEW_ON_LAYOUT
    BUILDER_CONFIGS = [tbx11k_config(r) for r in PREDEFINED_RESOLUTIONS]
    LOAD = staticmethod(tbx11k.load_tbx11k)
    OPTIONS = ("val_fraction", "seed", "extra_folders", "box_tolerance")
    LABEL_NAMES = tbx11k.LABEL_NAMES
    DESCRIPTION = ("TBX11K: labels by folder (Tuberculosis) and by box (Active TB, Latent TB); test = the original "
                   "val set (the challenge's test labels are withheld), train/validation carved from the original "
                   "train set.")
    HOMEPAGE = "https://github.com/yun-liu/Tuberculosis"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download TBX11K (the official zip, see https://github.com/yun-liu/Tuberculosis) and unpack it; manual_dir is
    TBX11K/ (holding imgs/, annotations/, lists/) or its parent. Then run
    python -m metachex_jax.prepare --dataset=tbx11k --manual_dir=THAT_FOLDER --data_dir=OUT
    """


class Vindr(_LabelledBuilder):
    """VinDr-CXR: 22 local and 6 global labels, three readers per training image combined by a rule (vindr.py)."""

    name = "vindr"
    RELEASE_NOTES = _NEW_ON_LAYOUT
    BUILDER_CONFIGS = [vindr_config(r) for r in PREDEFINED_RESOLUTIONS]
    LOAD = staticmethod(vindr.load_vindr)
    OPTIONS = ("label_rule", "val_fraction", "test_fraction", "seed")
    LABEL_NAMES = vindr.LABEL_NAMES
    DESCRIPTION = ("VinDr-CXR (PhysioNet 1.0.0, or the Kaggle VinBigData copy): 22 local and 6 global labels, three "
                   "readers per training image combined by the label rule, the test set's consensus labels.")
    HOMEPAGE = "https://physionet.org/content/vindr-cxr/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download VinDr-CXR 1.0.0 from PhysioNet (credentialed access; or the Kaggle VinBigData competition data);
    manual_dir holds train/, test/ and annotations/ (Kaggle: train/ and train.csv). Then run
    python -m metachex_jax.prepare --dataset=vindr --manual_dir=THAT_FOLDER --data_dir=OUT [--label_rule=any]
    """


BUILDERS = {builder.name: builder for builder in (Chestxray14, Shenzhen, Montgomery, Chexpert, Padchest, Mimic,
                                                    Tbx11k, Vindr, Csv)}


def version(dataset: str) -> str:
    """The VERSION of `dataset`'s builder: the folder its builds live in."""
    if dataset not in BUILDERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(BUILDERS)}")
    return str(BUILDERS[dataset].VERSION)


def version_dir(data_dir: str | os.PathLike, dataset: str, config_name: str) -> str:
    """<data_dir>/<dataset>/<config>/<version> (data_dir local or gs://): the published build's info, and every
    build folder of this version (publish.py)."""
    return os.fspath(epath.Path(os.fspath(data_dir)) / dataset / config_name / version(dataset))


def is_complete(data_dir: str | os.PathLike, dataset: str, config_name: str) -> bool:
    """True when a build of the current version is published (its dataset_info.json exists)."""
    return publish.is_published(version_dir(data_dir, dataset, config_name))


def dataset_dir(data_dir: str | os.PathLike, dataset: str, config_name: str) -> epath.Path:
    """The folder of the published build (shards, skip report, label counts); FileNotFoundError when none is."""
    where = version_dir(data_dir, dataset, config_name)
    info = publish.read_info(where)
    if info is None:
        raise FileNotFoundError(f"{dataset}/{config_name}: no published build in {where}")
    return epath.Path(publish.build_folder(where, info))


def older_builds(data_dir: str | os.PathLike, dataset: str, config_name: str) -> list[str]:
    """The versions of complete builds of this config made by earlier builders: a run never reads them (the
    pixels or records differ; see Versions in the module docstring), so they are named when a build is missing."""
    config_dir = epath.Path(os.fspath(data_dir)) / dataset / config_name
    current = version(dataset)
    if not config_dir.is_dir():
        return []
    return sorted(p.name for p in config_dir.iterdir()
                  if p.name != current and (p / publish.INFO_FILE).exists())


def read_skip_report(data_dir: str | os.PathLike, dataset: str, config_name: str) -> dict:
    return json.loads((dataset_dir(data_dir, dataset, config_name) / SKIP_REPORT_FILE).read_text())


def read_label_counts(data_dir: str | os.PathLike, dataset: str, config_name: str) -> dict | None:
    """The build's label counts (build.label_counts; local or gs://), or None when it has none."""
    return read_label_counts_at(dataset_dir(data_dir, dataset, config_name))


def read_label_counts_at(build_dir: str | os.PathLike) -> dict | None:
    """`read_label_counts` of the build in `build_dir` (a build's folder, as `source.dataset_info.data_dir` names
    it)."""
    path = epath.Path(os.fspath(build_dir)) / LABEL_COUNTS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def data_source(dataset: str, split: str, data_dir: str | os.PathLike, *, config_name: str | None = None,
                resolution: int = DEFAULT_RESOLUTION) -> RecordSource:
    """The records of `split` ("train", "train+validation+test", ...) of the published build of
    `<dataset>/<config>` (config defaults to r<resolution>), current builder version: records.RecordSource."""
    config_name = config_name or f"r{resolution}"
    where = version_dir(data_dir, dataset, config_name)
    if not publish.is_published(where):
        older = older_builds(data_dir, dataset, config_name)
        note = (f"; builds of older versions ({', '.join(older)}) are not read: rebuild it with python -m "
                "metachex_jax.prepare" if older else "")
        raise FileNotFoundError(f"{dataset}/{config_name} is not prepared in {os.fspath(data_dir)} (no published "
                                f"build of version {version(dataset)}){note}")
    return RecordSource.open(where, split)
