"""The prepared datasets a run reads, found (or, for the demo, made) from the config's `data` section.

Real data is prepared once with `python -m metachex_jax.prepare` (see the README). A run then opens the
ArrayRecord splits with `tfds.data_source`. If the dataset is missing, the run prepares it when
`config.data.manual_dir` names the raw copy; otherwise it stops with instructions (a multi-process run refuses
to prepare real data: prepare it once first). With `config.demo` the synthetic demo tree is generated (once)
under `config.demo_dir` and prepared from there, by several processes in turns (`resolve_demo`).
data_dir may be a gs:// URL of a dataset prepared elsewhere (see launch/README.md for reading it).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from metachex_jax import distributed
from metachex_jax.data import build, builders

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
                        f"_mc{d.num_montgomery}_px{d.size}")
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


def chestxray14_splits(config) -> dict:
    """{"train", "validation", "test"} -> random-access sources of the prepared ChestX-ray14 dataset."""
    data = config.data
    manual_dir, data_dir = data.manual_dir, os.path.expanduser(data.data_dir)
    if config.demo:
        manual_dir, data_dir = resolve_demo(config)
    config_name = builders.nih_config_name(data.resolution, data.val_fraction, data.val_seed)
    name = f"chestxray14/{config_name}"

    def prepare_if_missing():
        if builders.is_complete(data_dir, "chestxray14", config_name):
            return
        if not manual_dir:
            raise FileNotFoundError(_missing_message(name, data_dir))
        logging.info("preparing %s from %s into %s", name, manual_dir, data_dir)
        build.build_dataset("chestxray14", os.path.expanduser(manual_dir), data_dir,
                            resolution=data.resolution, val_fraction=data.val_fraction, seed=data.val_seed)

    if config.demo:  # a local cache like the demo tree: prepared in turns, as resolve_demo explains
        distributed.one_process_at_a_time(prepare_if_missing, "demo chestxray14")
    elif jax.process_count() > 1 and not builders.is_complete(data_dir, "chestxray14", config_name):
        raise FileNotFoundError(f"{name} is not prepared in {data_dir}; prepare it once before a multi-host "
                                "run (python -m metachex_jax.prepare ...), not from every host at once")
    else:
        prepare_if_missing()
    return {split: builders.data_source("chestxray14", split, data_dir, config_name=config_name)
            for split in NIH_SPLITS}


def label_counts(source) -> tuple[np.ndarray, int]:
    """(positives per pathology, number of images) of a split, for CheXNet's class weights."""
    positives = np.zeros(0)
    for i in range(len(source)):
        labels = np.asarray(source[i]["labels"], np.int64)
        positives = labels if i == 0 else positives + labels
    return positives, len(source)
