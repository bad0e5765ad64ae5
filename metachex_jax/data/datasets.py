"""The prepared datasets a run reads, found (or, for the demo, made) from the config's `data` section.

Real data is prepared once with `python -m metachex_jax.prepare` (see the README). A run then opens the
ArrayRecord splits with `tfds.data_source`. If the dataset is missing, the run prepares it when
`config.data.manual_dir` names the raw copy; otherwise it stops with a MissingDataError holding the exact
`prepare` commands (`missing_data_message`, which config validation prints before any work too; a multi-process
run refuses to prepare real data: prepare it once first). `required_build` maps the config to the build it
reads (registry: each family's `from_config`). With `config.demo` the synthetic demo tree is generated (once)
under `config.demo_dir` and prepared from there, by several processes in turns (`resolve_demo`).
data_dir may be a gs:// URL of a dataset prepared elsewhere (see launch/README.md for reading it).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from metachex_jax import config_lib, distributed, files
from metachex_jax.data import build, builders, registry
from metachex_jax.errors import MissingDataError
from metachex_jax.labels import PATHOLOGIES

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


def required_build(dataset: str, data) -> tuple[str, dict]:
    """(config name, build parameters) of the build of `dataset` that a run with `data` (config.data) reads."""
    family = registry.family(dataset)
    parameters = family.from_config(data)
    return family.config_name(data.resolution, **parameters), parameters


def missing_data_message(data, names: list[str], demo_command: str | None = None,
                         prepare_at_start: bool = True) -> str:
    """"" when the builds of `names` that `data` (config.data) needs are in data.data_dir; otherwise what is
    missing and, for each, the complete `prepare` command that makes it, ready to paste but for RAW_DIR; then,
    with `prepare_at_start`, the run's own alternative (data.manual_dir), and the demo command if given."""
    data_dir = files.absolute(data.data_dir)
    missing = []
    for name in sorted(names):
        config_name, parameters = required_build(name, data)
        if not builders.is_complete(data_dir, name, config_name):
            missing.append((name, config_name, parameters))
    if not missing:
        return ""
    lines = [f"prepared dataset(s) {', '.join(f'{n}/{c}' for n, c, _ in missing)} not found in {data_dir} "
             f"(resolution {data.resolution} for image_size {data.image_size}). Prepare them once, with RAW_DIR the "
             "raw copy:"]
    remote = files.is_url(data_dir)  # builds are made locally, then copied (build.remote_data_dir_message)
    for name, config_name, parameters in missing:
        lines.append(f"  # {name}: RAW_DIR = {registry.family(name).raw_copy}")
        lines.append("  " + build.prepare_command(name, "LOCAL_DIR" if remote else data_dir,
                                                  resolution=data.resolution, **parameters))
        if remote:
            lines.append(f"  gcloud storage cp -r LOCAL_DIR/{name}/{config_name} {data_dir}/{name}/")
    if prepare_at_start and not remote:
        lines.append("or pass --config.data.manual_dir=RAW_DIR to prepare them at the start of this run.")
    if demo_command:
        lines.append(f"To try the pipeline without the real data, run the synthetic demo instead:\n  {demo_command}")
    return "\n".join(lines)


def chestxray14_splits(config) -> dict:
    """{"train", "validation", "test"} -> random-access sources of the prepared ChestX-ray14 dataset."""
    data = config.data
    manual_dir, data_dir = data.manual_dir, os.path.expanduser(data.data_dir)
    if config.demo:
        manual_dir, data_dir = resolve_demo(config)
    config_name, parameters = required_build("chestxray14", data)
    name = f"chestxray14/{config_name}"

    def prepare_if_missing():
        if builders.is_complete(data_dir, "chestxray14", config_name):
            return
        if not manual_dir:
            raise MissingDataError(missing_data_message(data, ["chestxray14"], config_lib.PRETRAIN_DEMO_COMMAND))
        logging.info("preparing %s from %s into %s", name, manual_dir, data_dir)
        build.build_dataset("chestxray14", os.path.expanduser(manual_dir), data_dir, resolution=data.resolution,
                            **parameters)

    if config.demo:  # a local cache like the demo tree: prepared in turns, as resolve_demo explains
        distributed.one_process_at_a_time(prepare_if_missing, "demo chestxray14")
    elif jax.process_count() > 1 and not builders.is_complete(data_dir, "chestxray14", config_name):
        raise MissingDataError(f"{name} is not prepared in {data_dir}; prepare it once before a multi-host run "
                               "(not from every host at once):\n  "
                               + build.prepare_command("chestxray14", data_dir, manual_dir=manual_dir or "RAW_DIR",
                                                       resolution=data.resolution, **parameters))
    else:
        prepare_if_missing()
    return {split: builders.data_source("chestxray14", split, data_dir, config_name=config_name)
            for split in NIH_SPLITS}


def label_counts(source) -> tuple[np.ndarray, int]:
    """(positives per pathology, number of images) of a ChestX-ray14 split, for CheXNet's class weights.

    Read from the counts the build stored next to the records (`builders.write_label_counts`), once per run. A
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
