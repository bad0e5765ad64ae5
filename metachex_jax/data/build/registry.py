"""Every dataset family the project can prepare, in one table: `DATASETS`, name -> `DatasetFamily`.

A family plugs in here. Its parts:
  reader       data/raw/<family>.py: raw copy -> records, every problem collected (nih.py, tb.py)
  verify       the reader's check of a raw copy without building -> raw_common.RawCheck
  builder      its TFDS builder class (builders.py): raw copy -> ArrayRecord splits
  make_config  (resolution, **parameters) -> the builder config; its name (r256, r256_k5_seed1) is the build's
               identity on disk, so builds with different parameters never mix
  parameters   the build parameters besides resolution, with their defaults; `prepare` offers each as a flag
  kind         the record format the input pipeline turns into batches (pipeline.py: "nih", "tb" or "labelled")
  from_spec    a run's data spec (data/input/spec.py) -> the build parameters it needs (the build it looks for)
  raw_copy     what --manual_dir must hold, and where to get it (for the messages that print `prepare` commands)

To add a family: write data/raw/<family>.py (reader + `verify`; a label table? reuse labelled.py's record and
splits, as chexpert.py, padchest.py and csv_dataset.py do), a builder class in builders.py, and one entry in
DATASETS below (a new parameter also gets a line in PARAMETER_HELP). `python -m metachex_jax.prepare
--dataset=chexpert` (build and --verify), `build.build_dataset` and `build.verify_raw` then know it.
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
    make_config: Callable[..., Any]  # (resolution, **parameters) -> tfds BuilderConfig
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
        """The builder config for these parameters. A predefined config is returned as the builder's own object
        (TFDS refuses an equal copy under the same name)."""
        config = self.make_config(resolution, **self.resolve(parameters))
        return self.builder.builder_configs.get(config.name, config)

    def config_name(self, resolution: int = builders.DEFAULT_RESOLUTION, **parameters) -> str:
        return self.config(resolution, **parameters).name


_BIT_DEPTH = {"bit_depth": 0}  # every family: the reader's override for high-depth images (0: the reader's rule)
# The label-table families declared through builders.labelled_family: the reader's options and their defaults.
_MIMIC_OPTIONS = {"views": "frontal", "uncertainty": "ignore", "labeler": "chexpert", "csv_dir": "",
                  "patients_csv": ""}
Mimic, mimic_config = builders.labelled_family(
    "mimic", load=mimic.load_mimic, label_names=mimic.OBSERVATIONS, options=_MIMIC_OPTIONS, name_parts=mimic.name_parts,
    description="MIMIC-CXR-JPG or MIMIC-CXR (DICOM): the CheXpert (or NegBio) labeller's study labels on each image "
                "of the study, the official split; sex and age from MIMIC-IV when given.",
    homepage="https://physionet.org/content/mimic-cxr-jpg/",
    instructions="""\
    Download MIMIC-CXR-JPG (or MIMIC-CXR, the DICOMs) from PhysioNet (credentialed access); manual_dir is the
    release folder holding files/ (and, for the JPG release, the mimic-cxr-2.0.0-*.csv.gz files). Then run
    python -m metachex_jax.prepare --dataset=mimic --manual_dir=THAT_FOLDER --data_dir=OUT
        [--csv_dir=THE_JPG_RELEASE (for the DICOMs)] [--patients_csv=MIMIC-IV/hosp/patients.csv.gz]
    """)
_TBX11K_OPTIONS = {"val_fraction": tbx11k.DEFAULT_VAL_FRACTION, "seed": builders.DEFAULT_SEED,
                   "extra_folders": "exclude", "box_tolerance": tbx11k.DEFAULT_BOX_TOLERANCE}
Tbx11k, tbx11k_config = builders.labelled_family(
    "tbx11k", load=tbx11k.load_tbx11k, label_names=tbx11k.LABEL_NAMES, options=_TBX11K_OPTIONS,
    name_parts=tbx11k.name_parts,
    description="TBX11K: labels by folder (Tuberculosis) and by box (Active TB, Latent TB); test = the original "
                "val set (the challenge's test labels are withheld), train/validation carved from the original "
                "train set.",
    homepage="https://github.com/yun-liu/Tuberculosis",
    instructions="""\
    Download TBX11K (the official zip, see https://github.com/yun-liu/Tuberculosis) and unpack it; manual_dir is
    TBX11K/ (holding imgs/, annotations/, lists/) or its parent. Then run
    python -m metachex_jax.prepare --dataset=tbx11k --manual_dir=THAT_FOLDER --data_dir=OUT
    """)
_VINDR_OPTIONS = {"label_rule": "majority", "val_fraction": vindr.DEFAULT_VAL_FRACTION,
                  "test_fraction": vindr.DEFAULT_TEST_FRACTION, "seed": builders.DEFAULT_SEED}
Vindr, vindr_config = builders.labelled_family(
    "vindr", load=vindr.load_vindr, label_names=vindr.LABEL_NAMES, options=_VINDR_OPTIONS, name_parts=vindr.name_parts,
    description="VinDr-CXR (PhysioNet 1.0.0, or the Kaggle VinBigData copy): 22 local and 6 global labels, three "
                "readers per training image combined by the label rule, the test set's consensus labels.",
    homepage="https://physionet.org/content/vindr-cxr/",
    instructions="""\
    Download VinDr-CXR 1.0.0 from PhysioNet (credentialed access; or the Kaggle VinBigData competition data);
    manual_dir holds train/, test/ and annotations/ (Kaggle: train/ and train.csv). Then run
    python -m metachex_jax.prepare --dataset=vindr --manual_dir=THAT_FOLDER --data_dir=OUT [--label_rule=any]
    """)

_NIH_PARAMETERS = {"val_fraction": builders.DEFAULT_VAL_FRACTION, "seed": builders.DEFAULT_SEED, **_BIT_DEPTH}
_TB_PARAMETERS = {"num_folds": tb.DEFAULT_NUM_FOLDS, "seed": builders.DEFAULT_SEED, **_BIT_DEPTH}
_CHEXPERT_PARAMETERS = {"views": "frontal", "uncertainty": "ignore", "test_fraction": chexpert.DEFAULT_TEST_FRACTION,
                        "seed": builders.DEFAULT_SEED, **_BIT_DEPTH}
_PADCHEST_PARAMETERS = {"views": "frontal", "val_fraction": padchest.DEFAULT_VAL_FRACTION,
                        "test_fraction": padchest.DEFAULT_TEST_FRACTION, "seed": builders.DEFAULT_SEED, **_BIT_DEPTH}
_CSV_PARAMETERS = {"csv": "", "num_folds": csv_dataset.DEFAULT_NUM_FOLDS, "seed": builders.DEFAULT_SEED,
                   "stratify_by": "", "val_fraction": csv_dataset.DEFAULT_VAL_FRACTION,
                   "test_fraction": csv_dataset.DEFAULT_TEST_FRACTION, **_BIT_DEPTH}


def _nih_from_spec(spec) -> dict[str, Any]:
    return {"val_fraction": spec.val_fraction, "seed": spec.val_seed, "bit_depth": spec.bit_depth}


def _tb_from_spec(spec) -> dict[str, Any]:
    return {"num_folds": spec.num_folds, "seed": spec.fold_seed, "bit_depth": spec.bit_depth}


def _table_from_spec(name: str, spec) -> dict[str, Any]:
    """A label-table dataset's build parameters: its own section of the data config (`spec.tables[name]`:
    `data.chexpert`, ...), and the bit-depth override that every dataset of a run shares (`spec.bit_depth`)."""
    return {key: spec.bit_depth if key == "bit_depth" else spec.tables[name][key] for key in DATASETS[name].parameters}


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
    DatasetFamily("mimic", Mimic, mimic_config, {**_MIMIC_OPTIONS, **_BIT_DEPTH}, mimic.verify, "labelled",
                  functools.partial(_table_from_spec, "mimic"),
                  "the MIMIC-CXR-JPG (or MIMIC-CXR) release folder holding files/, from "
                  "https://physionet.org/content/mimic-cxr-jpg/ (credentialed access)"),
    DatasetFamily("tbx11k", Tbx11k, tbx11k_config, {**_TBX11K_OPTIONS, **_BIT_DEPTH}, tbx11k.verify, "labelled",
                  functools.partial(_table_from_spec, "tbx11k"),
                  "the folder holding TBX11K/ (imgs/, annotations/, lists/), from "
                  "https://github.com/yun-liu/Tuberculosis"),
    DatasetFamily("vindr", Vindr, vindr_config, {**_VINDR_OPTIONS, **_BIT_DEPTH}, vindr.verify, "labelled",
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
    "bit_depth": "every dataset: read high-depth images (16-bit PNG/TIFF, DICOM BitsStored > 8) as this many bits "
                 "instead of the reader's rule (metadata, sBIT, the data); 8-bit images ignore it; part of the "
                 "build's name (_bits12)",
}


def family(name: str) -> DatasetFamily:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]
