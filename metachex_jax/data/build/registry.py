"""Every dataset family the project can prepare, in one table: `DATASETS`, name -> `DatasetFamily`.

A family plugs in here. Its parts:
  reader       data/raw/<family>.py: raw copy -> records, every problem collected (nih.py, tb.py)
  verify       the reader's check of a raw copy without building -> raw_common.RawCheck
  builder      its family class (builders.py): identity, VERSION, `read_raw` (raw copy -> the planned records)
  make_config  (resolution, **parameters) -> the build's config; its name (r256, r256_k5_seed1) is the build's
               identity on disk, so builds with different parameters never mix
  parameters   the build parameters besides resolution, with their defaults; `prepare` offers each as a flag
               (bit_depth and geometry, the reader's, are every family's)
  kind         the record format (layout.py) the input pipeline turns into batches (pipeline.py: "nih", "tb" or
               "labelled")
  from_spec    a run's data spec (data/input/spec.py) -> the build parameters it needs (the build it looks for)
  raw_copy     what --manual_dir must hold, and where to get it (for the messages that print `prepare` commands)

To add a family: write data/raw/<family>.py (reader + `verify`; a label table? reuse labelled.py's record and
splits, as chexpert.py, padchest.py and csv_dataset.py do), a family class in builders.py (a label table:
`_LabelledBuilder` with LOAD, OPTIONS, LABEL_NAMES, DESCRIPTION), and one entry in DATASETS below (a new
parameter also gets a line in PARAMETER_HELP). `python -m metachex_jax.prepare --dataset=NAME` (build on every
runner, local or Beam, --verify and --check_built), `build.build_dataset` and `build.verify_raw` then know it: the
build itself (plan, work, shards, publication) has no code per family.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from metachex_jax.data.build import builders
from metachex_jax.data.raw import chexpert, csv_dataset, mimic, nih, padchest, tb, tbx11k, vindr
from metachex_jax.data.raw.common import RawCheck


@dataclasses.dataclass(frozen=True)
class DatasetFamily:
    name: str
    builder: type  # a builders._RawImageBuilder subclass
    make_config: Callable[..., Any]  # (resolution, **parameters) -> builders.BuildConfig
    parameters: dict[str, Any]  # build parameter -> default (resolution is common to all)
    verify: Callable[..., RawCheck]  # (manual_dir, *, strict_counts, **parameters) -> RawCheck
    kind: str  # record format for pipeline.py
    from_spec: Callable[[Any], dict[str, Any]]  # a run's DataSpec -> parameters
    raw_copy: str  # what manual_dir holds and where to download it

    def resolve(self, parameters: dict[str, Any]) -> dict[str, Any]:
        """The family's parameters with defaults filled in; a parameter it does not take is an error."""
        unknown = sorted(set(parameters) - set(self.parameters))
        if unknown:
            raise ValueError(f"{self.name} takes no build parameter(s) {unknown}; its parameters: "
                             f"resolution, {', '.join(self.parameters)}")
        return {**self.parameters, **parameters}

    def config(self, resolution: int = builders.DEFAULT_RESOLUTION, **parameters):
        """The build's config (identity and parameters) for these parameters."""
        return self.make_config(resolution, **self.resolve(parameters))

    def config_name(self, resolution: int = builders.DEFAULT_RESOLUTION, **parameters) -> str:
        return self.config(resolution, **parameters).name


# Every family's: the reader's override for high-depth images (0: the reader's rule), and the pixel geometry.
_READER = {"bit_depth": 0, "geometry": builders.DEFAULT_GEOMETRY}
_NIH_PARAMETERS = {"val_fraction": builders.DEFAULT_VAL_FRACTION, "seed": builders.DEFAULT_SEED, **_READER}
_TB_PARAMETERS = {"num_folds": tb.DEFAULT_NUM_FOLDS, "seed": builders.DEFAULT_SEED, **_READER}
_MIMIC_PARAMETERS = {"views": "frontal", "uncertainty": "ignore", "labeler": "chexpert", "csv_dir": "",
                     "patients_csv": "", **_READER}
_TBX11K_PARAMETERS = {"val_fraction": tbx11k.DEFAULT_VAL_FRACTION, "seed": builders.DEFAULT_SEED,
                      "extra_folders": "exclude", "box_tolerance": tbx11k.DEFAULT_BOX_TOLERANCE, **_READER}
_VINDR_PARAMETERS = {"label_rule": "majority", "val_fraction": vindr.DEFAULT_VAL_FRACTION,
                     "test_fraction": vindr.DEFAULT_TEST_FRACTION, "seed": builders.DEFAULT_SEED, **_READER}
_CHEXPERT_PARAMETERS = {"views": "frontal", "uncertainty": "ignore", "test_fraction": chexpert.DEFAULT_TEST_FRACTION,
                        "seed": builders.DEFAULT_SEED, **_READER}
_PADCHEST_PARAMETERS = {"views": "frontal", "val_fraction": padchest.DEFAULT_VAL_FRACTION,
                        "test_fraction": padchest.DEFAULT_TEST_FRACTION, "seed": builders.DEFAULT_SEED, **_READER}
_CSV_PARAMETERS = {"csv": "", "num_folds": csv_dataset.DEFAULT_NUM_FOLDS, "seed": builders.DEFAULT_SEED,
                   "stratify_by": "", "val_fraction": csv_dataset.DEFAULT_VAL_FRACTION,
                   "test_fraction": csv_dataset.DEFAULT_TEST_FRACTION, **_READER}


def _reader_from_spec(spec) -> dict[str, Any]:
    """What every dataset of a run shares: the bit-depth override and the model's pixel geometry."""
    return {"bit_depth": spec.bit_depth, "geometry": spec.geometry}


def _nih_from_spec(spec) -> dict[str, Any]:
    return {"val_fraction": spec.val_fraction, "seed": spec.val_seed, **_reader_from_spec(spec)}


def _tb_from_spec(spec) -> dict[str, Any]:
    return {"num_folds": spec.num_folds, "seed": spec.fold_seed, **_reader_from_spec(spec)}


def _table_from_spec(name: str, spec) -> dict[str, Any]:
    """A label-table dataset's build parameters: its own section of the data config (`spec.tables[name]`:
    `data.chexpert`, ...), and the reader's parameters every dataset of a run shares (`_reader_from_spec`)."""
    shared = _reader_from_spec(spec)
    return {key: shared[key] if key in shared else spec.tables[name][key] for key in DATASETS[name].parameters}


_TB_RAW = ("the folder holding {folder}/ (CXR_png/ and ClinicalReadings/), from "
           "https://lhncbc.nlm.nih.gov/LHC-downloads/tuberculosis-chest-x-ray-image-data-sets")

DATASETS: dict[str, DatasetFamily] = {family.name: family for family in (
    DatasetFamily("chestxray14", builders.Chestxray14, builders.nih_config, _NIH_PARAMETERS, nih.verify, "nih",
                  _nih_from_spec,
                  "the folder holding Data_Entry_2017_v2020.csv, train_val_list.txt, test_list.txt and the "
                  "unpacked images_001..012, from https://nihcc.app.box.com/v/ChestXray-NIHCC"),
    DatasetFamily("shenzhen", builders.Shenzhen, builders.tb_config, _TB_PARAMETERS,
                  functools.partial(tb.verify, dataset="shenzhen"), "tb", _tb_from_spec,
                  _TB_RAW.format(folder=tb.SHENZHEN.folder)),
    DatasetFamily("montgomery", builders.Montgomery, builders.tb_config, _TB_PARAMETERS,
                  functools.partial(tb.verify, dataset="montgomery"), "tb", _tb_from_spec,
                  _TB_RAW.format(folder=tb.MONTGOMERY.folder)),
    DatasetFamily("chexpert", builders.Chexpert, builders.chexpert_config, _CHEXPERT_PARAMETERS, chexpert.verify,
                  "labelled", functools.partial(_table_from_spec, "chexpert"),
                  "the folder holding CheXpert-v1.0-small/ (or CheXpert-v1.0/), from "
                  "https://stanfordmlgroup.github.io/competitions/chexpert/"),
    DatasetFamily("padchest", builders.Padchest, builders.padchest_config, _PADCHEST_PARAMETERS, padchest.verify,
                  "labelled", functools.partial(_table_from_spec, "padchest"),
                  "the folder holding PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz) and the image "
                  "folders, from https://bimcv.cipf.es/bimcv-projects/padchest/"),
    DatasetFamily("mimic", builders.Mimic, builders.mimic_config, _MIMIC_PARAMETERS, mimic.verify, "labelled",
                  functools.partial(_table_from_spec, "mimic"),
                  "the MIMIC-CXR-JPG (or MIMIC-CXR) release folder holding files/, from "
                  "https://physionet.org/content/mimic-cxr-jpg/ (credentialed access)"),
    DatasetFamily("tbx11k", builders.Tbx11k, builders.tbx11k_config, _TBX11K_PARAMETERS, tbx11k.verify, "labelled",
                  functools.partial(_table_from_spec, "tbx11k"),
                  "the folder holding TBX11K/ (imgs/, annotations/, lists/), from "
                  "https://github.com/yun-liu/Tuberculosis"),
    DatasetFamily("vindr", builders.Vindr, builders.vindr_config, _VINDR_PARAMETERS, vindr.verify, "labelled",
                  functools.partial(_table_from_spec, "vindr"),
                  "the VinDr-CXR 1.0.0 folder (train/, test/, annotations/) from "
                  "https://physionet.org/content/vindr-cxr/, or the Kaggle VinBigData folder (train/, train.csv)"),
    DatasetFamily("csv", builders.Csv, builders.csv_config, _CSV_PARAMETERS, csv_dataset.verify, "labelled",
                  functools.partial(_table_from_spec, "csv"),
                  "the folder the CSV's image paths are relative to (data/raw/csv_dataset.py)"),
)}

# What each build parameter means (the `prepare` flags' help).
PARAMETER_HELP = {
    "val_fraction": "chestxray14: fraction of the train_val patients carved out as validation; padchest, csv: "
                    "fraction of the patients in validation; tbx11k: fraction of the original train set carved out "
                    "as validation; vindr: fraction of the training images in validation",
    "num_folds": "shenzhen/montgomery/csv: stratified cross-validation folds stored per record",
    "seed": "the seed of the validation carve-out (chestxray14), of the folds and split (TB sets, csv), of the "
            "test carve-out (chexpert), of the split (padchest) or of the train/validation carve-out (tbx11k, "
            "vindr)",
    "views": "chexpert, padchest: 'frontal' (frontal images only) or 'all'; mimic: 'frontal' (PA and AP), 'all', "
             "or ViewPosition values joined by '+' (PA+AP+LATERAL; 'blank' for an empty one)",
    "uncertainty": "chexpert, mimic: uncertain (-1) observations: ignore (masked), ones or zeros, optionally per label "
                   "after a default: 'ignore,Atelectasis=ones,Edema=ones'",
    "test_fraction": "chexpert: fraction of train.csv's patients carved out as test; padchest, csv: fraction of "
                     "the patients in test; vindr (the Kaggle layout only): fraction of train.csv's images in test",
    "csv": "csv: the CSV file listing path, labels and optional patient_id, age, sex, view",
    "stratify_by": "csv: the label column folds and split are stratified by (default: the first label column)",
    "labeler": "mimic: the labeller whose study labels are read: chexpert (mimic-cxr-2.0.0-chexpert.csv.gz) or "
               "negbio",
    "csv_dir": "mimic: the folder holding the JPG release's CSVs (for the DICOM release, which ships none; "
               "default: manual_dir)",
    "patients_csv": "mimic: MIMIC-IV's hosp/patients.csv.gz, the source of sex and age (default: none; both masked)",
    "extra_folders": "tbx11k: exclude (default) or include imgs/extra/ (copies of Shenzhen, Montgomery and DA/DB: "
                     "never include them next to those datasets)",
    "box_tolerance": "tbx11k: the largest XML/JSON box difference (pixels of 512 space) not reported as a "
                     "disagreement",
    "label_rule": "vindr: how three readers' labels of a training image combine: majority (default) or any",
    "geometry": "every dataset: the pixel geometry of the models that read the build: resize_crop (the whole image "
                "resized to R x R) or crop_resize (its centre square kept, then resized: torchxrayvision's pixels; "
                "part of the build's name, _square)",
    "bit_depth": "every dataset: read high-depth images (16-bit PNG/TIFF, DICOM BitsStored > 8) as this many bits "
                 "instead of the reader's rule (metadata, sBIT, the data); 8-bit images ignore it; part of the "
                 "build's name (_bits12)",
}


def family(name: str) -> DatasetFamily:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]
