"""What `data/` needs to know of a run, resolved once: `DataSpec.from_config(config)` (the trainer, the transfer
run and the data preflight call it); everything in `data/` then takes the spec, never the config.

A spec names the prepared builds a run reads (data_dir, resolution, each dataset's build parameters), the raw
copies it may prepare them from (manual dirs), the datasets of a pretraining mixture and its extra labels, how the
input pipeline runs (workers, where training images are augmented and how), and, for the demo, the synthetic tree
it generates and prepares its data from.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from metachex_jax.data.input.augment import Augmentation
from metachex_jax.demo.write import GENERATOR_VERSION

# the datasets whose build parameters are a section of their own
LABEL_TABLES = ("chexpert", "padchest", "csv", "mimic", "tbx11k", "vindr")


@dataclasses.dataclass(frozen=True)
class DemoSpec:
    """The synthetic demo tree a demo run generates (once) and prepares its datasets from."""

    directory: str  # config.demo_dir, unexpanded: the trees and their prepared datasets live below it
    seed: int
    num_nih: int
    num_shenzhen: int
    num_montgomery: int
    num_hospital: int
    size: int

    @property
    def root(self) -> str:
        """The folder of this tree (raw/ and tfds/ inside), unexpanded. One folder per generator version and
        parameters, so a prepared dataset never outlives the tree it came from."""
        return os.path.join(self.directory, f"v{GENERATOR_VERSION}_seed{self.seed}_nih{self.num_nih}"
                                            f"_sz{self.num_shenzhen}_mc{self.num_montgomery}_hs{self.num_hospital}"
                                            f"_px{self.size}")

    def parameters(self) -> dict[str, int]:
        """The generator's arguments (demo.write.write_demo_data)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "directory"}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The data side of a run (module docstring). Build parameters keep the config's names: val_fraction and
    val_seed (chestxray14's validation carve-out), num_folds and fold_seed (the TB sets' stored folds, and the
    folds drawn for datasets that store none), bit_depth (every dataset), and one mapping per label-table dataset
    in `tables` (chexpert, padchest, csv: their sections of the config, manual_dir included), and `geometry`, the
model's pixel geometry (config.model.geometry): a "crop_resize" model reads builds of the centre square
(builders.py: `_square`), so that it sees in training the pixels `predict` gives it."""

    data_dir: str  # where the prepared datasets are (local or gs://), unexpanded
    resolution: int  # R: the stored images are R x R
    image_size: int  # S: the model input is S x S
    datasets: str = "chestxray14"  # pretraining: one dataset or a weighted mixture "name[:weight],..."
    extra_labels: str = ""  # pretraining: labels after NIH's 14 in the model's pathology head
    manual_dir: str = ""  # the raw copy of chestxray14 (pretraining) or of the TB sets (transfer); "" = none
    val_fraction: float = 0.1
    val_seed: int = 0
    num_folds: int = 10
    fold_seed: int = 0
    bit_depth: int = 0
    geometry: str = "resize_crop"  # the model's pixel geometry (config.model.geometry): the builds it reads
    tables: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    workers: int = -1  # grain workers per host: -1 auto, 0 in-process, N
    augment_on: str = "auto"  # where training images are augmented: "auto", "host" or "device"
    augmentation: Augmentation = dataclasses.field(default_factory=Augmentation)
    demo: DemoSpec | None = None  # the synthetic demo tree, for a demo run

    @classmethod
    def from_config(cls, config) -> DataSpec:
        """The spec of a run's config (a ConfigDict or the dict a run saved): its `data` section, and `demo`,
        `demo_dir` and `demo_data` when it is a demo run. Fields an older saved config lacks take the defaults."""
        data = config["data"]
        plain = {f.name: data[f.name] for f in dataclasses.fields(cls)
                 if f.name in data and f.name not in ("tables", "augmentation", "demo")}
        demo = None
        if config.get("demo"):
            demo = DemoSpec(config["demo_dir"], **{k: int(v) for k, v in dict(config["demo_data"]).items()})
        augmentation = Augmentation()
        if "augment" in data:  # (a saved config holds lists where the recipe has tuples)
            augment = dict(data["augment"])
            augmentation = Augmentation(**{**augment, "scale_range": tuple(augment["scale_range"])})
        geometry = str(config["model"].get("geometry", "resize_crop")) if "model" in config else "resize_crop"
        return cls(**plain, geometry=geometry,
                   tables={name: dict(data[name]) for name in LABEL_TABLES if name in data},
                   augmentation=augmentation, demo=demo)

    def manual_dir_of(self, dataset: str, kind: str) -> str:
        """The raw copy `dataset` (of record `kind`, registry.py) may be prepared from ("" = none): the label-table
        datasets' own, else `manual_dir`."""
        return self.tables[dataset]["manual_dir"] if kind == "labelled" else self.manual_dir
