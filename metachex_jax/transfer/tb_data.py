"""The prepared Shenzhen and Montgomery sets a transfer run reads, and a content fingerprint of each build.

`tb_sources(config)` returns {"shenzhen": TbSet, "montgomery": TbSet}: every record (split
"train+validation+test", so the k-fold protocols see the whole set) with its fold, label and metadata. Where
the datasets come from follows `metachex_jax.data.datasets` exactly: with `config.demo` the synthetic demo tree
(the same one the pretraining demo generated, `datasets.resolve_demo`) is prepared under the demo folder;
otherwise `config.data.data_dir`, prepared first from `config.data.manual_dir` when that is set; otherwise a
FileNotFoundError says how to prepare it.

The fingerprint hashes the build's files (ArrayRecord shards and dataset_info.json, names and bytes), so
the feature cache follows the data's content, not its path. `flagged_readings` are the normal images whose
reading names TB (the build's skip report, `tb.mentions_tb`), for the transfer report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import jax
import numpy as np
from absl import logging

from metachex_jax import distributed
from metachex_jax.data import build, builders

TB_DATASETS = ("shenzhen", "montgomery")
ALL_RECORDS = "train+validation+test"


@dataclasses.dataclass
class TbSet:
    name: str
    source: object  # random-access records (tfds data source)
    tb: np.ndarray  # (N,) int64
    fold: np.ndarray  # (N,) int64
    image_id: list[str]
    fingerprint: str
    build_dir: Path
    flagged_readings: dict[str, str] = dataclasses.field(default_factory=dict)  # image id -> reading text

    def __len__(self) -> int:
        return len(self.tb)


class RecordSubset:
    """Records `indices` of a source, as a source (for the grain pipeline; picklable)."""

    def __init__(self, source, indices):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[int(self.indices[i])]


def build_fingerprint(build_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in build_dir.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:  # an epath.Path: local or gs://
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _missing_message(name: str, data_dir: str) -> str:
    return (f"the prepared dataset {name} was not found in {data_dir}.\n"
            f"Prepare it: python -m metachex_jax.prepare --dataset={name.split('/')[0]} --manual_dir=RAW_DIR "
            f"--data_dir={data_dir} --resolution=... --num_folds=...\n"
            "or pass --config.data.manual_dir=RAW_DIR (the folder holding ChinaSet_AllFiles/ and MontgomerySet/) to "
            "prepare it at the start of this run; or run the demo (configs/transfer.py:demo).")


def tb_sources(config, datasets: tuple[str, ...] = TB_DATASETS) -> dict[str, TbSet]:
    data = config.data
    manual_dir, data_dir = data.manual_dir, os.path.expanduser(data.data_dir)
    if config.demo:
        from metachex_jax.data import datasets as nih_datasets

        nih_manual_dir, data_dir = nih_datasets.resolve_demo(config)
        manual_dir = os.path.dirname(nih_manual_dir)  # the demo tree: ChinaSet_AllFiles/, MontgomerySet/
    config_name = builders.tb_config_name(data.resolution, data.num_folds, data.fold_seed)
    missing = [f"{d}/{config_name}" for d in datasets if not builders.is_complete(data_dir, d, config_name)]
    if missing and not manual_dir:
        raise FileNotFoundError("\n".join(_missing_message(name, data_dir) for name in missing))

    def prepare_missing():
        for dataset in datasets:
            if not builders.is_complete(data_dir, dataset, config_name):
                logging.info("preparing %s/%s from %s into %s", dataset, config_name, manual_dir, data_dir)
                build.build_dataset(dataset, os.path.expanduser(manual_dir), data_dir, resolution=data.resolution,
                                    num_folds=data.num_folds, seed=data.fold_seed, progress=False)

    if config.demo:  # a local cache, prepared by the processes in turns (see datasets.resolve_demo)
        distributed.one_process_at_a_time(prepare_missing, "demo TB sets")
    elif missing and jax.process_count() > 1:
        raise FileNotFoundError(f"{', '.join(missing)} not prepared in {data_dir}; prepare them once before a "
                                "multi-host run (python -m metachex_jax.prepare ...), not from every host at once")
    else:
        prepare_missing()
    out = {}
    for dataset in datasets:
        source = builders.data_source(dataset, ALL_RECORDS, data_dir, config_name=config_name)
        tb, fold, ids = [], [], []
        for i in range(len(source)):
            record = source[i]
            tb.append(int(record["tb"]))
            fold.append(int(record["fold"]))
            image_id = record["image_id"]
            ids.append(image_id.decode() if isinstance(image_id, bytes) else str(image_id))
        build_dir = builders.dataset_dir(data_dir, dataset, config_name)
        details = builders.read_skip_report(data_dir, dataset, config_name).get("flag_details", {})
        out[dataset] = TbSet(dataset, source, np.asarray(tb, np.int64), np.asarray(fold, np.int64), ids,
                             build_fingerprint(build_dir), build_dir, details.get("tb_mention_in_normal", {}))
    return out
