"""The prepared datasets a run reads, found (or, for the demo, made) from its data spec (spec.py): one dataset or
a weighted mixture (`pretraining_data`: chestxray14, chexpert, padchest and csv builds seen in one label space,
mixture.py).

Real data is prepared once with `python -m metachex_jax.prepare`. A run then opens the published build's splits with
`builders.data_source` (records.RecordSource). If the dataset is missing, the run prepares it when the spec names its raw copy
(`config.data.manual_dir`; chexpert, padchest, csv: `config.data.<name>.manual_dir`); otherwise it stops with a
MissingDataError holding the exact `prepare` commands (`missing_data_message`, which the data preflight prints
before any work too, preflight.py; a multi-process run refuses to prepare real data: prepare it once first).
`required_build` maps the spec to the build it reads (registry: each family's `from_spec`). For a demo run the
synthetic demo tree is generated (once) under the demo folder and prepared from there, by several processes in
turns (`resolve_demo`). data_dir may be a gs:// URL of a dataset prepared elsewhere (see the docs on multi-host
runs for reading it); a run may also prepare a missing dataset into a gs:// data_dir (data/build/build.py).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from absl import logging

from metachex_jax.core import distributed, files
from metachex_jax.core.errors import MissingDataError
from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.data.build import build, builders, registry
from metachex_jax.data.input import mixture
from metachex_jax.data.input.spec import DataSpec
from metachex_jax.demo import write as demo_write

NIH_SPLITS = ("train", "validation", "test")
PRETRAIN_DEMO_COMMAND = "python -m metachex_jax.main --config=configs/pretrain.py:demo --workdir=/tmp/metachex_demo"


def resolve_demo(spec: DataSpec) -> tuple[str, str]:
    """Generate the demo raw tree if missing; return (manual_dir for chestxray14, data_dir).

    The tree is a cache on the local disk (the spec's demo folder). With several processes, they generate it in
    turns (`distributed.one_process_at_a_time`): the first process on each disk generates it, the others reuse it.
    The generator is deterministic, so every host's copy is the same.
    """
    root = os.path.expanduser(spec.demo.root)
    distributed.one_process_at_a_time(
        lambda: demo_write.write_demo_data(os.path.join(root, "raw"), **spec.demo.parameters()), "demo tree")
    return os.path.join(root, "raw", demo_write.NIH_DIR), os.path.join(root, "tfds")


def required_build(dataset: str, spec: DataSpec) -> tuple[str, dict]:
    """(config name, build parameters) of the build of `dataset` that a run with `spec` reads."""
    family = registry.family(dataset)
    parameters = family.from_spec(spec)
    return family.config_name(spec.resolution, **parameters), parameters


def manual_dir_field(dataset: str) -> str:
    """The config field naming a dataset's raw copy (prepared at the start of a run when set)."""
    return f"data.{dataset}.manual_dir" if registry.family(dataset).kind == "labelled" else "data.manual_dir"


def manual_dir_of(spec: DataSpec, dataset: str) -> str:
    """The raw copy the run may prepare `dataset` from ("" = none: it must be prepared)."""
    return spec.manual_dir_of(dataset, registry.family(dataset).kind)


def missing_data_message(spec: DataSpec, names: list[str], demo_command: str | None = None,
                         prepare_at_start: bool = True) -> str:
    """"" when the builds of `names` that `spec` needs are in its data_dir; otherwise what is missing and, for each,
    the complete `prepare` command that makes it, ready to paste but for RAW_DIR; then, with `prepare_at_start`,
    the run's own alternative (data.manual_dir), and the demo command if given."""
    data_dir = files.absolute(spec.data_dir)
    missing = []
    for name in sorted(names):
        config_name, parameters = required_build(name, spec)
        if not builders.is_complete(data_dir, name, config_name):
            missing.append((name, config_name, parameters))
    if not missing:
        return ""
    lines = [f"prepared dataset(s) {', '.join(f'{n}/{c}' for n, c, _ in missing)} not found in {data_dir} "
             f"(resolution {spec.resolution} for image_size {spec.image_size}). Prepare them once, with RAW_DIR the "
             "raw copy (local or gs://):"]
    for name, config_name, parameters in missing:
        older = builders.older_builds(data_dir, name, config_name)
        if older:
            lines.append(f"  # {name}/{config_name} in {data_dir} was built by an older version of its builder "
                         f"({', '.join(older)}; now {registry.family(name).builder.VERSION}), which this version "
                         "does not read: rebuild it")
        lines.append(f"  # {name}: RAW_DIR = {registry.family(name).raw_copy}")
        lines.append("  " + build.prepare_command(name, data_dir, resolution=spec.resolution, **parameters))
    if prepare_at_start:
        fields = dict.fromkeys(manual_dir_field(name) for name, _, _ in missing)
        lines.append(f"or pass {' and '.join(f'--config.{f}=RAW_DIR' for f in fields)} to prepare them at the start "
                     "of this run.")
    if demo_command:
        lines.append(f"To try the pipeline without the real data, run the synthetic demo instead:\n  {demo_command}")
    return "\n".join(lines)


def chestxray14_splits(spec: DataSpec, splits: tuple[str, ...] = NIH_SPLITS) -> dict:
    """{"train", "validation", "test"} (or `splits`, e.g. "train+validation+test") -> random-access sources of the
    prepared ChestX-ray14 dataset."""
    return dataset_splits(spec, "chestxray14", splits)


def dataset_splits(spec: DataSpec, name: str, splits: tuple[str, ...] = NIH_SPLITS) -> dict:
    """{"train", "validation", "test"} (or `splits`) -> sources of a prepared dataset: chestxray14, or a label-table
    dataset (chexpert, padchest, csv; its build parameters in `spec.tables[name]`), prepared first from its raw
    copy (`manual_dir_of`) when missing. For a demo run, a csv dataset without a CSV file is the demo tree's
    synthetic hospital."""
    family = registry.family(name)
    if family.kind == "tb":
        raise ValueError(f"{name} is read by the transfer code (transfer/sets.py), not as splits")
    manual_dir = spec.manual_dir_of(name, family.kind)
    data_dir = os.path.expanduser(spec.data_dir)
    config_name, parameters = (None, None)
    if spec.demo is not None:
        nih_manual_dir, data_dir = resolve_demo(spec)
        manual_dir = nih_manual_dir if name == "chestxray14" else manual_dir
        if name == "csv" and not spec.tables["csv"]["csv"]:
            manual_dir = os.path.join(os.path.dirname(nih_manual_dir), demo_write.HOSPITAL_DIR)
            parameters = {**family.from_spec(spec), "csv": os.path.join(manual_dir, demo_write.HOSPITAL_CSV_NAME)}
            config_name = family.config_name(spec.resolution, **parameters)
    if config_name is None:
        config_name, parameters = required_build(name, spec)
    full_name = f"{name}/{config_name}"

    def prepare_if_missing():
        if builders.is_complete(data_dir, name, config_name):
            return
        if not manual_dir:
            demo = PRETRAIN_DEMO_COMMAND if name == "chestxray14" else None
            raise MissingDataError(missing_data_message(spec, [name], demo))
        logging.info("preparing %s from %s into %s", full_name, manual_dir, data_dir)
        build.build_dataset(name, os.path.expanduser(manual_dir), data_dir, resolution=spec.resolution, **parameters)

    if spec.demo is not None:  # a local cache like the demo tree: prepared in turns, as resolve_demo explains
        distributed.one_process_at_a_time(prepare_if_missing, f"demo {name}")
    elif jax.process_count() > 1 and not builders.is_complete(data_dir, name, config_name):
        raise MissingDataError(f"{full_name} is not prepared in {data_dir}; prepare it once before a multi-host run "
                               "(not from every host at once):\n  "
                               + build.prepare_command(name, data_dir, manual_dir=manual_dir or "RAW_DIR",
                                                       resolution=spec.resolution, **parameters))
    else:
        prepare_if_missing()
    return {split: builders.data_source(name, split, data_dir, config_name=config_name) for split in splits}


@dataclasses.dataclass
class PretrainingData:
    """The datasets a pretraining run reads, every split seen in one label space (data/input/mixture.py)."""

    space: tuple[str, ...]  # the model's pathology outputs: NIH's 14, then spec.extra_labels
    weights: dict[str, float]  # dataset -> sampling weight, in spec.datasets order
    splits: dict[str, dict[str, mixture.HarmonisedSource]]  # dataset -> split -> records in the space

    @property
    def is_mixture(self) -> bool:
        return len(self.splits) > 1


def pretraining_data(spec: DataSpec) -> PretrainingData:
    """Every dataset of `spec.datasets` (one, or a weighted mixture), prepared, in the label space."""
    weights = mixture.parse_mixture(spec.datasets)
    space = mixture.label_space(spec.extra_labels)
    splits = {}
    for name in weights:
        kind = registry.family(name).kind
        splits[name] = {split: mixture.HarmonisedSource(source, dataset=name, kind=kind, space=space)
                        for split, source in dataset_splits(spec, name).items()}
        missing = [label for label in space if label not in splits[name]["train"].provided]
        if missing and len(missing) == len(space):
            raise ValueError(f"{name} provides none of the labels {space}")
        if missing:
            logging.info("%s lacks %s: masked for its images", name, ", ".join(missing))
    return PretrainingData(space, weights, splits)


def known_label_counts(data: PretrainingData) -> tuple[np.ndarray, np.ndarray]:
    """(positives per label of the space, training images whose label is known per label) over every dataset of a
    pretraining run, for CheXNet's class weights on a label space where datasets may lack labels. From the counts
    each build stored (`build.label_counts`); a build without them is counted by reading (`label_counts`
    says when)."""
    positives, known = np.zeros(len(data.space), np.int64), np.zeros(len(data.space), np.int64)
    for name, splits in data.splits.items():
        harmonised = splits["train"]
        source = harmonised.source
        info = getattr(source, "dataset_info", None)
        stored = builders.read_label_counts_at(info.data_dir) if info is not None else None
        split = stored["splits"].get(str(source.split)) if stored else None
        if split is None or (harmonised.kind == "labelled" and "known" not in split):
            logging.warning("%s: counting the labels by reading every training record (no stored label counts)",
                            name)
            for i in range(len(harmonised)):
                labels = np.asarray(harmonised[i]["labels"], np.int64)
                positives, known = positives + (labels == 1), known + (labels >= 0)
            continue
        native_known = split.get("known") or {n: split["num_examples"] for n in harmonised.native_names}
        for j, column in enumerate(harmonised.columns):
            if column >= 0:
                native = harmonised.native_names[column]
                positives[j] += split["positives"][native]
                known[j] += native_known[native]
    return positives, known


def label_counts(source) -> tuple[np.ndarray, int]:
    """(positives per pathology, number of images) of a ChestX-ray14 split, for CheXNet's class weights.

    Read from the counts the build stored next to the records (`build.label_counts`), once per run. A
    dataset built before the builders stored them (or a source that is no built split) has none: the split's
    records are then read one by one, which decodes every image (minutes for NIH), with a warning saying how to
    avoid it. The stored counts are checked against the split's size.
    """
    info, split = getattr(source, "dataset_info", None), getattr(source, "split", None)
    counts = builders.read_label_counts_at(info.data_dir) if info is not None else None
    if counts is None or str(split) not in counts["splits"]:
        where = f"{info.data_dir} has no {builders.LABEL_COUNTS_FILE} (built before the builders stored label " \
                f"counts)" if info is not None else "the source is not a built dataset"
        logging.warning("%s: counting the labels by reading all %d records of the split, which decodes every "
                        "image; rebuild the dataset (python -m metachex_jax.prepare ...) to skip this", where,
                        len(source))
        return count_labels_by_reading(source)
    stored = counts["splits"][str(split)]
    if stored["num_examples"] != len(source):
        raise ValueError(f"{info.data_dir}/{builders.LABEL_COUNTS_FILE} counts {stored['num_examples']} {split} "
                         f"records, the split has {len(source)}: the folder was changed after its build; rebuild it")
    return np.array([stored["positives"][name] for name in PATHOLOGIES], np.int64), stored["num_examples"]


def count_labels_by_reading(source) -> tuple[np.ndarray, int]:
    """(positives per pathology, number of images) counted over every record of a split."""
    positives = np.zeros(len(PATHOLOGIES), np.int64)
    for i in range(len(source)):
        positives += np.asarray(source[i]["labels"], np.int64)
    return positives, len(source)
