"""The datasets a transfer run reads, and each seen through one binary target.

    records = load_datasets(spec, ("shenzhen", "csv"))    # name -> DatasetRecords: every record of a build
    view = transfer_set(records, ("shenzhen", "montgomery"), "Tuberculosis", num_folds=10, fold_seed=0)

Any prepared dataset can be a transfer dataset: the TB sets (shenzhen, montgomery), chexpert, padchest, a csv
dataset of one's own, chestxray14, mimic, tbx11k, vindr. A TARGET is a binary label named as in the shared label space
(data/input/mixture.py: NIH's names, CheXpert's other observations, PadChest's Tuberculosis, a CSV's column headers);
the TB sets' `tb` label is "Tuberculosis", the name PadChest and the demo hospital use. A dataset without the
target cannot take part in that target's protocols.

A TransferSet is one or several datasets (concatenated, for "train on A + B") restricted to the images whose
target is known, with per-image label `y`, `fold`, `patient`, `image_id` and `split` (the build's: what a
split_<dataset> protocol uses), and `source`: random-access records
of the pipeline's "binary" kind (image, target, sex_male, age, age_valid, fold) for fine-tuning.

Folds: the ones stored in the build when the target is the label they are stratified by (TB sets: TB; csv: its
stratify_by label); otherwise drawn here: `num_folds` folds of PATIENTS, stratified by the target, seeded by
`fold_seed` (the config's data.num_folds and data.fold_seed; data/raw/labelled.py).
Patients: the build's patient ids; every TB-set image is its own patient. Bootstrap CIs resample patients.

Where the builds come from follows data/input/datasets.py, from the run's data spec (data/input/spec.py): for a
demo run the demo tree (Shenzhen, Montgomery and the hospital CSV of the pretraining demo's tree); otherwise its
data_dir, a TB set prepared first from its manual_dir (config.data.manual_dir: the folder holding
ChinaSet_AllFiles/ and MontgomerySet/), another dataset from its own (config.data.<name>.manual_dir); a missing
build raises a MissingDataError holding the `prepare` commands that make it. The fingerprint hashes a build's files
(names and bytes), so the feature cache follows the data's content, not its path. `flagged_readings` are the TB
sets' normal images whose reading names TB (the build's skip report, `tb.mentions_tb`), for the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np
from absl import logging
from etils import epath

from metachex_jax.core import distributed
from metachex_jax.core.errors import MissingDataError
from metachex_jax.data.build import build, builders, registry
from metachex_jax.data.input import datasets as data_lib
from metachex_jax.data.input import mixture
from metachex_jax.data.input.spec import DataSpec
from metachex_jax.data.raw import labelled

TB_DATASETS = ("shenzhen", "montgomery")
TB_TARGET = "Tuberculosis"
ALL_RECORDS = "train+validation+test"
TRANSFER_DEMO_COMMAND = ("python -m metachex_jax.main --config=configs/transfer.py:demo "
                         "--config.init_from=/tmp/metachex_demo --workdir=/tmp/tb_demo")


@dataclasses.dataclass
class DatasetRecords:
    """Every record of one prepared dataset: labels in the shared label names, folds, patients."""

    name: str
    kind: str  # the registry's record kind: "tb", "labelled" or "nih"
    source: object  # random-access records (records.RecordSource)
    label_names: tuple[str, ...]  # in the shared label space's names
    labels: np.ndarray  # (N, K) int8: 1 / 0 / -1 unknown
    fold: np.ndarray  # (N,) int64, -1 where the build stores none
    folds_stratified_by: str | None  # the label the stored folds are stratified by (None: no stored folds)
    patient: np.ndarray  # (N,) int64 patient keys
    image_id: list[str]
    fingerprint: str
    build_dir: Path
    flagged_readings: dict[str, str] = dataclasses.field(default_factory=dict)  # image id -> reading text
    split: np.ndarray = dataclasses.field(default_factory=lambda: np.array([], str))  # (N,) the build's split

    def __len__(self) -> int:
        return len(self.image_id)

    def column(self, target: str) -> int | None:
        return self.label_names.index(target) if target in self.label_names else None


class RecordSubset:
    """Records `indices` of a source, as a source (for the grain pipeline; picklable)."""

    def __init__(self, source, indices):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[int(self.indices[i])]


class BinaryRecords:
    """Records of the pipeline's "binary" kind: `rows` of one or several datasets, `target` = the label in column
    `column` of each (None: no target, -1; feature extraction needs none), `fold` from `folds`. Picklable."""

    def __init__(self, parts: list[tuple[DatasetRecords, np.ndarray, int | None, np.ndarray]]):
        self.parts = [(d.source, d.kind, np.asarray(rows, np.int64), column, np.asarray(folds, np.int64))
                      for d, rows, column, folds in parts]
        self.starts = np.cumsum([0] + [len(rows) for _, _, rows, _, _ in self.parts])

    @classmethod
    def every_record(cls, records: DatasetRecords) -> BinaryRecords:
        """All of a dataset's records (feature extraction), a TB set's with its TB label as the target (so a
        cached feature table of a TB set carries its labels: `bench probe --features`), others without one."""
        return cls([(records, np.arange(len(records)), 0 if records.kind == "tb" else None, records.fold)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict:
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        source, kind, rows, column, folds = self.parts[part]
        j = i - int(self.starts[part])
        record = source[int(rows[j])]
        if column is None:
            target = -1
        elif kind == "tb":
            target = int(record["tb"])
        else:
            target = int(np.asarray(record["labels"])[column])
        return {"image": record["image"], "target": target, "sex_male": record["sex_male"], "age": record["age"],
                "age_valid": record["age_valid"], "fold": int(folds[j])}


@dataclasses.dataclass
class TransferSet:
    """One or several datasets seen through one target, images with a known target only (module docstring)."""

    name: str  # "shenzhen", or "shenzhen+montgomery"
    target: str
    parts: list[tuple[str, np.ndarray]]  # (dataset, its record rows), in order
    source: BinaryRecords
    y: np.ndarray  # (N,) int64 0/1
    fold: np.ndarray  # (N,) int64
    patient: np.ndarray  # (N,) int64
    image_id: list[str]
    dataset: list[str]  # each image's dataset
    split: np.ndarray  # (N,) each image's split in its build: "train", "validation" or "test" (split_<d>)

    def __len__(self) -> int:
        return len(self.y)


def build_fingerprint(build_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in build_dir.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:  # an epath.Path: local or gs://
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def geometry_problems(starts, spec: DataSpec, datasets: tuple[str, ...]) -> list[str]:
    """Why starts cannot be compared on the builds this run reads: every start must see the pixels `predict`
    gives it, so its records are built in its own geometry (builders.py: `_square` builds keep the centre
    square), and the builds of a run have the run's geometry (config.model.geometry, `spec.geometry`). A start of
    another geometry (a torchxrayvision model is "crop_resize") is refused with the run and the builds it needs."""
    problems = []
    for start in starts:
        geometry = start.contract.geometry
        if geometry == spec.geometry:
            continue
        other = dataclasses.replace(spec, geometry=geometry)
        commands = [build.prepare_command(name, spec.data_dir, resolution=spec.resolution,
                                          **data_lib.required_build(name, other)[1]) for name in datasets]
        problems.append(f"starting weights {start.name!r} take {geometry} pixels ({start.contract.describe()}), but "
                        f"this comparison reads builds of geometry {spec.geometry} (config.model.geometry): compare "
                        f"{geometry} starts in a run with --config.model.geometry={geometry}, which reads the builds "
                        "these commands make:\n    " + "\n    ".join(commands))
    return problems


def record_splits(source) -> np.ndarray:
    """(N,) the build split ("train", "validation", "test") of each record of a source read as several splits
    (ALL_RECORDS: records.RecordSource concatenates them in the order named)."""
    names = str(source.split).split("+")
    sizes = [source.dataset_info.info["splits"][name]["num_examples"] for name in names]
    if sum(sizes) != len(source):
        raise ValueError(f"{source}: its splits {dict(zip(names, sizes))} do not add up to its {len(source)} records")
    return np.repeat(np.array(names), sizes)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _tb_sources(spec: DataSpec, datasets: tuple[str, ...]) -> dict:
    """{name: (all-records source, build dir)} of the TB sets, prepared first where needed (a MissingDataError
    prints the `prepare` commands that make them)."""
    manual_dir, data_dir = spec.manual_dir, os.path.expanduser(spec.data_dir)
    if spec.demo is not None:
        nih_manual_dir, data_dir = data_lib.resolve_demo(spec)
        manual_dir = os.path.dirname(nih_manual_dir)  # the demo tree: ChinaSet_AllFiles/, MontgomerySet/
    config_name, parameters = data_lib.required_build("shenzhen", spec)  # the same for both TB sets
    missing = [f"{d}/{config_name}" for d in datasets if not builders.is_complete(data_dir, d, config_name)]
    if missing and not manual_dir:
        raise MissingDataError(data_lib.missing_data_message(spec, list(datasets), TRANSFER_DEMO_COMMAND))

    def prepare_missing():
        for dataset in datasets:
            if not builders.is_complete(data_dir, dataset, config_name):
                logging.info("preparing %s/%s from %s into %s", dataset, config_name, manual_dir, data_dir)
                build.build_dataset(dataset, os.path.expanduser(manual_dir), data_dir, resolution=spec.resolution,
                                    progress=False, **parameters)

    if spec.demo is not None:  # a local cache, prepared by the processes in turns (see datasets.resolve_demo)
        distributed.one_process_at_a_time(prepare_missing, "demo TB sets")
    elif missing and jax.process_count() > 1:
        raise MissingDataError(f"{', '.join(missing)} not prepared in {data_dir}; prepare them once before a "
                               "multi-host run (not from every host at once):\n" + "\n".join(
                                   "  " + build.prepare_command(name.split("/")[0], data_dir, manual_dir=manual_dir,
                                                                resolution=spec.resolution, **parameters)
                                   for name in missing))
    else:
        prepare_missing()
    return {d: (builders.data_source(d, ALL_RECORDS, data_dir, config_name=config_name),
                builders.dataset_dir(data_dir, d, config_name)) for d in datasets}


def load_datasets(spec: DataSpec, names) -> dict[str, DatasetRecords]:
    """name -> DatasetRecords for every dataset named (module docstring: where the builds come from)."""
    names = tuple(dict.fromkeys(names))
    tb_names = tuple(n for n in names if n in TB_DATASETS)
    found = _tb_sources(spec, tb_names) if tb_names else {}
    for name in names:
        if name not in found:
            own = spec
            if name == "chestxray14" and spec.demo is None:  # spec.manual_dir is the TB sets' raw folder here
                own = dataclasses.replace(spec, manual_dir="")
            source = data_lib.dataset_splits(own, name, (ALL_RECORDS,))[ALL_RECORDS]
            found[name] = (source, epath.Path(source.dataset_info.data_dir))
    out = {}
    for name in names:
        source, build_dir = found[name]
        kind = registry.family(name).kind
        if kind == "tb":
            label_names = (TB_TARGET,)
        else:
            label_names = tuple(mixture.space_name(name, n) for n in mixture.native_label_names(source, kind))
        labels, fold, patient, ids = [], [], [], []
        for i in range(len(source)):
            record = source[i]
            image_id = _text(record["image_name" if kind == "nih" else "image_id"])
            ids.append(image_id)
            labels.append([int(record["tb"])] if kind == "tb" else np.asarray(record["labels"], np.int64))
            fold.append(int(record["fold"]) if "fold" in record else -1)
            patient.append(int(record["patient_id"]) if kind == "nih" else int(record["patient_key"])
                           if kind == "labelled" else labelled.patient_key(f"{name}:{image_id}"))
        report = json.loads((build_dir / builders.SKIP_REPORT_FILE).read_text())
        flagged = report.get("flag_details", {}).get("tb_mention_in_normal", {})
        stratified_by = _stored_folds_label(name, kind, report)
        out[name] = DatasetRecords(name, kind, source, label_names,
                                   np.asarray(labels, np.int64).reshape(len(ids), len(label_names)),
                                   np.asarray(fold, np.int64), stratified_by, np.asarray(patient, np.int64), ids,
                                   build_fingerprint(build_dir), build_dir, flagged, record_splits(source))
    return out


def _stored_folds_label(name: str, kind: str, skip_report: dict) -> str | None:
    """The label a build's stored folds are stratified by: TB for the TB sets, a csv build's stratify_by."""
    if kind == "tb":
        return TB_TARGET
    if name == "csv":
        return mixture.space_name(name, skip_report["build_parameters"]["stratify_by"])
    return None


def has_target(records: DatasetRecords, target: str) -> bool:
    column = records.column(target)
    return column is not None and bool((records.labels[:, column] >= 0).any())


def transfer_set(records: dict[str, DatasetRecords], names: tuple[str, ...], target: str, *, num_folds: int,
                 fold_seed: int) -> TransferSet:
    """The datasets `names` (concatenated in order) restricted to the images whose `target` is known."""
    parts, binary = [], []
    y, fold, patient, image_id, dataset, split = [], [], [], [], [], []
    for name in names:
        d = records[name]
        column = d.column(target)
        if column is None:
            raise ValueError(f"{name} has no label {target!r}; its labels: {', '.join(d.label_names)}")
        rows = np.flatnonzero(d.labels[:, column] >= 0)
        folds = d.fold[rows]
        if target != d.folds_stratified_by or (folds < 0).any():  # folds of patients, stratified by the target
            strata = labelled.patient_strata(zip(d.patient[rows].tolist(), d.labels[rows, column].tolist()))
            by_patient = labelled.assign_group_folds(strata, num_folds, fold_seed)
            folds = np.array([by_patient[p] for p in d.patient[rows].tolist()], np.int64)
        parts.append((name, rows))
        binary.append((d, rows, column, folds))
        y.append(d.labels[rows, column])
        fold.append(folds)
        patient.append(d.patient[rows])
        image_id += [d.image_id[i] for i in rows]
        dataset += [name] * len(rows)
        split.append(d.split[rows])
    return TransferSet("+".join(names), target, parts, BinaryRecords(binary), np.concatenate(y).astype(np.int64),
                       np.concatenate(fold), np.concatenate(patient), image_id, dataset, np.concatenate(split))


def features_of(tables: dict[str, dict], view: TransferSet) -> np.ndarray:
    """The rows of the per-dataset feature tables (features.py) that `view` holds, in its order."""
    return np.concatenate([tables[name]["features"][rows] for name, rows in view.parts])


def tb_transfer_sets(spec: DataSpec, names: tuple[str, ...] = TB_DATASETS) -> dict[str, TransferSet]:
    """The TB sets seen through their TB label (the default comparison's sets)."""
    records = load_datasets(spec, names)
    return {name: transfer_set(records, (name,), TB_TARGET, num_folds=spec.num_folds, fold_seed=spec.fold_seed)
            for name in names}
