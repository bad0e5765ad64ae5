"""The prepared datasets a run reads, found (or, for the demo, made) from the config's `data` section: one
dataset or a weighted mixture (`pretraining_data`: chestxray14, chexpert, padchest and csv builds seen in one
label space, data/mixture.py).

Real data is prepared once with `python -m metachex_jax.prepare` (see the README). A run then opens the
ArrayRecord splits with `tfds.data_source`. If the dataset is missing, the run prepares it when
`config.data.manual_dir` names the raw copy; otherwise it stops with instructions (a multi-process run refuses
to prepare real data: prepare it once first). With `config.demo` the synthetic demo tree is generated (once)
under `config.demo_dir` and prepared from there, by several processes in turns (`resolve_demo`).
data_dir may be a gs:// URL of a dataset prepared elsewhere (see launch/README.md for reading it).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from absl import logging

from metachex_jax import distributed
from metachex_jax.data import build, builders, mixture, registry

NIH_SPLITS = ("train", "validation", "test")


def resolve_demo(config) -> tuple[str, str]:
    """Generate the demo raw tree if missing; return (manual_dir for chestxray14, data_dir).

    The tree is a cache on the local disk (config.demo_dir). With several processes, they generate it in turns
    (`distributed.one_process_at_a_time`): the first process on each disk generates it, the others reuse it. The
    generator is deterministic, so every host's copy is the same.
    """
    from metachex_jax import demo_data

    d = config.demo_data
    # One folder per generator version and parameters, so a prepared dataset never outlives the tree it came from.
    root = os.path.join(os.path.expanduser(config.demo_dir),
                        f"v{demo_data.GENERATOR_VERSION}_seed{d.seed}_nih{d.num_nih}_sz{d.num_shenzhen}"
                        f"_mc{d.num_montgomery}_hs{d.num_hospital}_px{d.size}")
    distributed.one_process_at_a_time(lambda: demo_data.write_demo_data(os.path.join(root, "raw"), **d), "demo tree")
    return os.path.join(root, "raw", "ChestX-ray14"), os.path.join(root, "tfds")


def _missing_message(name: str, data_dir: str) -> str:
    return (
        f"the prepared dataset {name} was not found in {data_dir}.\n"
        "To use the real NIH ChestX-ray14 data: download it from https://nihcc.app.box.com/v/ChestXray-NIHCC "
        "(images_001..012.tar.gz, Data_Entry_2017_v2020.csv, train_val_list.txt, test_list.txt), unpack it, then\n"
        f"  python -m metachex_jax.prepare --dataset=chestxray14 --manual_dir=RAW_DIR --data_dir={data_dir}\n"
        "or pass --config.data.manual_dir=RAW_DIR to prepare it at the start of this run.\n"
        "To try the pipeline without the real data, run the synthetic demo instead:\n"
        "  python -m metachex_jax.main --config=configs/pretrain.py:demo --workdir=/tmp/metachex_demo")


def chestxray14_splits(config, splits: tuple[str, ...] = NIH_SPLITS) -> dict:
    """{"train", "validation", "test"} (or `splits`, e.g. "train+validation+test") -> random-access sources of the
    prepared ChestX-ray14 dataset."""
    data = config.data
    manual_dir, data_dir = data.manual_dir, os.path.expanduser(data.data_dir)
    if config.demo:
        manual_dir, data_dir = resolve_demo(config)
    config_name = builders.nih_config_name(data.resolution, data.val_fraction, data.val_seed)
    return _prepared_splits(config, "chestxray14", config_name, manual_dir, data_dir,
                            dict(val_fraction=data.val_fraction, seed=data.val_seed), splits)


def dataset_splits(config, name: str, splits: tuple[str, ...] = NIH_SPLITS) -> dict:
    """{"train", "validation", "test"} -> sources of one dataset of `config.data.datasets` (prepared first from
    its `manual_dir` when missing). chestxray14 reads config.data's fields; chexpert, padchest and csv their own
    section, `config.data.<name>` (build parameters as `prepare`'s flags). With config.demo, a csv dataset without
    a CSV file is the demo tree's synthetic hospital."""
    if name == "chestxray14":
        return chestxray14_splits(config, splits)
    family = registry.family(name)
    if family.kind != "labelled":
        raise ValueError(f"{name} has no pathology labels to pretrain on (it is a transfer dataset); pretraining "
                         "takes chestxray14, chexpert, padchest and csv")
    section = config.data[name]
    parameters = {key: section[key] for key in family.parameters}
    manual_dir, data_dir = section.manual_dir, os.path.expanduser(config.data.data_dir)
    if config.demo:
        nih_manual_dir, data_dir = resolve_demo(config)
        if name == "csv" and not parameters["csv"]:
            from metachex_jax import demo_data

            manual_dir = os.path.join(os.path.dirname(nih_manual_dir), demo_data.HOSPITAL_DIR)
            parameters["csv"] = os.path.join(manual_dir, demo_data.HOSPITAL_CSV_NAME)
    config_name = family.config_name(config.data.resolution, **parameters)
    return _prepared_splits(config, name, config_name, manual_dir, data_dir, parameters, splits)


def _prepared_splits(config, dataset: str, config_name: str, manual_dir: str, data_dir: str,
                     parameters: dict, splits: tuple[str, ...]) -> dict:
    """The splits of `dataset/config_name` in data_dir, prepared from manual_dir first when missing (see the
    module docstring for who may prepare)."""
    name = f"{dataset}/{config_name}"

    def prepare_if_missing():
        if builders.is_complete(data_dir, dataset, config_name):
            return
        if not manual_dir:
            raise FileNotFoundError(_missing_message(name, data_dir) if dataset == "chestxray14" else
                                    f"the prepared dataset {name} was not found in {data_dir}; prepare it with "
                                    f"python -m metachex_jax.prepare --dataset={dataset} --manual_dir=RAW_DIR "
                                    f"--data_dir={data_dir} (and its build parameters), or set "
                                    f"--config.data.{dataset}.manual_dir=RAW_DIR to prepare it at the start of "
                                    "this run")
        logging.info("preparing %s from %s into %s", name, manual_dir, data_dir)
        build.build_dataset(dataset, os.path.expanduser(manual_dir), data_dir, resolution=config.data.resolution,
                            **parameters)

    if config.demo:  # a local cache like the demo tree: prepared in turns, as resolve_demo explains
        distributed.one_process_at_a_time(prepare_if_missing, f"demo {dataset}")
    elif jax.process_count() > 1 and not builders.is_complete(data_dir, dataset, config_name):
        raise FileNotFoundError(f"{name} is not prepared in {data_dir}; prepare it once before a multi-host "
                                "run (python -m metachex_jax.prepare ...), not from every host at once")
    else:
        prepare_if_missing()
    return {split: builders.data_source(dataset, split, data_dir, config_name=config_name) for split in splits}


@dataclasses.dataclass
class PretrainingData:
    """The datasets a pretraining run reads, every split seen in one label space (data/mixture.py)."""

    space: tuple[str, ...]  # the model's pathology outputs: NIH's 14, then config.data.extra_labels
    weights: dict[str, float]  # dataset -> sampling weight, in config.data.datasets order
    splits: dict[str, dict[str, mixture.HarmonisedSource]]  # dataset -> split -> records in the space

    @property
    def is_mixture(self) -> bool:
        return len(self.splits) > 1


def pretraining_data(config) -> PretrainingData:
    """Every dataset of `config.data.datasets` (one, or a weighted mixture), prepared, in the label space."""
    weights = mixture.parse_mixture(config.data.datasets)
    space = mixture.label_space(config.data.extra_labels)
    splits = {}
    for name in weights:
        kind = registry.family(name).kind
        splits[name] = {split: mixture.HarmonisedSource(source, dataset=name, kind=kind, space=space)
                        for split, source in dataset_splits(config, name).items()}
        missing = [label for label in space if label not in splits[name]["train"].provided]
        if missing and len(missing) == len(space):
            raise ValueError(f"{name} provides none of the labels {space}")
        if missing:
            logging.info("%s lacks %s: masked for its images", name, ", ".join(missing))
    return PretrainingData(space, weights, splits)


def known_label_counts(sources) -> tuple[np.ndarray, np.ndarray]:
    """(positives per label, images whose label is known per label) over HarmonisedSources, for CheXNet's class
    weights on a label space where datasets may lack labels."""
    positives, known = 0, 0
    for source in sources:
        for i in range(len(source)):
            labels = np.asarray(source[i]["labels"], np.int64)
            positives, known = positives + (labels == 1), known + (labels >= 0)
    return np.asarray(positives, np.int64), np.asarray(known, np.int64)


def label_counts(source) -> tuple[np.ndarray, int]:
    """(positives per pathology, number of images) of a split, for CheXNet's class weights."""
    positives = np.zeros(0)
    for i in range(len(source)):
        labels = np.asarray(source[i]["labels"], np.int64)
        positives = labels if i == 0 else positives + labels
    return positives, len(source)
