"""One label space for several datasets, and each dataset's records seen in it (pretraining on a mixture).

The label space is NIH's 14 pathologies (labels.PATHOLOGIES, CheXNet's order) followed by optional extra labels
(`config.data.extra_labels`, e.g. "Lung Opacity,Fracture"). A dataset's own label names map onto it by name,
after the aliases of `labels.LABEL_ALIASES` (CheXpert's "Pleural Effusion" is NIH's Effusion; PadChest's builder
already writes NIH's names; a CSV column named like an NIH label is that label). For every example, a label of
the space that its dataset does not provide is UNKNOWN: its mask is 0, so it contributes exactly nothing to the
loss (losses.py) or to the metrics, and metadata a dataset lacks (a CSV without a sex column, a lateral's view) is
masked the same way. NIH records know all 14 labels; CheXpert's leave Infiltration, Mass, Nodule, Emphysema,
Fibrosis, Pleural_Thickening and Hernia unknown.

`HarmonisedSource(source, kind, label_names, space)` wraps a prepared split (kind "nih" or "labelled", the
registry's record kinds) and returns records in the "labelled" format of the space, which the input pipeline
(pipeline.py, kind "labelled") turns into the usual multi-task examples with per-label masks:

    image, image_name, labels int8 (len(space),) 1/0/-1, age, age_valid, sex_male, view_ap (-1 unknown),
    patient_key int64 (NIH: the patient id; others: labelled.patient_key of the patient id)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from metachex_jax.core.labels import LABEL_ALIASES, PATHOLOGIES

UNKNOWN = -1


def label_space(extra_labels: str | Sequence[str] = ()) -> tuple[str, ...]:
    """NIH's 14, then the extra labels (comma-separated text or a sequence; NIH names among them are ignored)."""
    if isinstance(extra_labels, str):
        extra_labels = [name.strip() for name in extra_labels.split(",")]
    extras = [name for name in dict.fromkeys(extra_labels) if name and name not in PATHOLOGIES]
    return PATHOLOGIES + tuple(extras)


def space_name(dataset: str, native: str) -> str:
    """A dataset's label name in the shared label space."""
    return LABEL_ALIASES.get(dataset, {}).get(native, native)


def label_columns(dataset: str, native_names: Sequence[str], space: Sequence[str]) -> np.ndarray:
    """For each label of `space`, the index of the dataset's label that is it, or -1 (the dataset lacks it)."""
    where = {space_name(dataset, name): j for j, name in enumerate(native_names)}
    return np.array([where.get(name, UNKNOWN) for name in space], np.int64)


def native_label_names(source, kind: str) -> tuple[str, ...]:
    """The label names of a prepared split: NIH's 14 for kind "nih", the build's metadata for "labelled"."""
    if kind == "nih":
        return PATHOLOGIES
    if kind == "labelled":
        return tuple(source.dataset_info.metadata["label_names"])
    raise ValueError(f"records of kind {kind!r} have no pathology labels (a TB set is a transfer target)")


class HarmonisedSource:
    """A prepared split's records in the shared label space (module docstring). Picklable for grain workers."""

    def __init__(self, source, *, dataset: str, kind: str, space: Sequence[str],
                 label_names: Sequence[str] | None = None):
        self.source, self.dataset, self.kind = source, dataset, kind
        self.space = tuple(space)
        self.native_names = tuple(label_names) if label_names is not None else native_label_names(source, kind)
        self.columns = label_columns(dataset, self.native_names, self.space)

    @property
    def provided(self) -> tuple[str, ...]:
        """The labels of the space this dataset provides."""
        return tuple(name for name, column in zip(self.space, self.columns) if column >= 0)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        record = self.source[index]
        native = np.asarray(record["labels"]).astype(np.int8)
        labels = np.where(self.columns >= 0, native[np.maximum(self.columns, 0)], UNKNOWN).astype(np.int8)
        if self.kind == "nih":
            name, patient = record["image_name"], np.int64(record["patient_id"])
        else:
            name, patient = record["image_id"], np.int64(record["patient_key"])
        return {"image": record["image"], "image_name": name, "labels": labels, "age": record["age"],
                "age_valid": record["age_valid"], "sex_male": record["sex_male"], "view_ap": record["view_ap"],
                "patient_key": patient}

    def __repr__(self) -> str:
        return f"HarmonisedSource({self.dataset}, {len(self)} records, {len(self.space)} labels)"


def parse_mixture(text: str) -> dict[str, float]:
    """'chestxray14' or 'chestxray14:2,chexpert,padchest:0.5' (also '+' between entries) -> {name: weight}.

    A missing weight is 1. Weights are relative sampling rates (pipeline.train_batches, grain's mix)."""
    mixture: dict[str, float] = {}
    problems = []
    for entry in filter(None, (e.strip() for e in text.replace("+", ",").split(","))):
        name, _, weight = entry.partition(":")
        name = name.strip()
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            value = -1.0
        if value <= 0 or name in mixture:
            problems.append(entry)
        mixture[name] = value
    if problems or not mixture:
        raise ValueError(f"data.datasets={text!r}: write name[:weight] entries separated by commas, each name once, "
                         f"weights > 0 (bad: {problems or 'none given'})")
    return mixture
