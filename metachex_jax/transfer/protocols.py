"""Evaluation protocols: which records train and which test, for every split of a protocol.

    cv_shenzhen, cv_montgomery     k-fold cross-validation within the set, the folds stored in its records
                                   (stratified by TB at build time, deterministic): split f tests fold f and
                                   trains on the others; the out-of-fold predictions cover every image once.
    shenzhen_to_montgomery,        the unseen-dataset test: train on every image of one set, test on every
    montgomery_to_shenzhen         image of the other.

Fine-tuning also needs a validation part for early stopping; it is carved from the TRAINING records only: the
fold after the test fold (CV), or fold 0 of the training set (cross-dataset), so it is stratified too.

`check_protocol` refuses (naming every offending fold) a fold whose training, validation or test part holds a
single class, or a set whose folds are not 0..k-1: metrics and thresholds would be undefined there.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PROTOCOLS = {
    "cv_shenzhen": ("shenzhen", "shenzhen"),
    "cv_montgomery": ("montgomery", "montgomery"),
    "shenzhen_to_montgomery": ("shenzhen", "montgomery"),
    "montgomery_to_shenzhen": ("montgomery", "shenzhen"),
}


@dataclasses.dataclass(frozen=True)
class Split:
    protocol: str
    fold: int  # the test fold (CV); -1 for a cross-dataset split
    train_set: str
    test_set: str
    train: np.ndarray  # record indices into train_set
    validation: np.ndarray  # record indices into train_set, a subset of `train` (fine-tuning early stopping)
    test: np.ndarray  # record indices into test_set

    @property
    def fit(self) -> np.ndarray:
        """Training records without the validation part (what fine-tuning trains on)."""
        return np.setdiff1d(self.train, self.validation)


def parse_protocols(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PROTOCOLS]
    if unknown or not names:
        raise ValueError(f"config.protocols: unknown {unknown} (or none given); choose from {sorted(PROTOCOLS)}")
    return names


def splits(protocol: str, tb_sets: dict) -> list[Split]:
    train_name, test_name = PROTOCOLS[protocol]
    train_set, test_set = tb_sets[train_name], tb_sets[test_name]
    if train_name == test_name:
        k = int(train_set.fold.max()) + 1
        out = []
        for f in range(k):
            train = np.flatnonzero(train_set.fold != f)
            validation = np.flatnonzero(train_set.fold == (f + 1) % k)
            out.append(Split(protocol, f, train_name, test_name, train, validation, np.flatnonzero(train_set.fold == f)))
        return out
    every_train = np.arange(len(train_set))
    return [Split(protocol, -1, train_name, test_name, every_train, np.flatnonzero(train_set.fold == 0),
                  np.arange(len(test_set)))]


def _class_counts(y: np.ndarray) -> tuple[int, int]:
    counts = np.bincount(np.asarray(y, np.int64), minlength=2)
    return int(counts[0]), int(counts[1])


def check_protocol(protocol: str, tb_sets: dict, need_validation: bool) -> list[Split]:
    """The protocol's splits, after checking folds and classes; raises naming every problem."""
    problems = []
    for name in set(PROTOCOLS[protocol]):
        folds = tb_sets[name].fold
        k = int(folds.max()) + 1 if len(folds) else 0
        present = set(np.unique(folds).tolist())
        if k < 2 or present != set(range(k)):
            problems.append(f"{name}: fold ids {sorted(present)} are not 0..k-1 with k >= 2")
    if problems:
        raise ValueError(f"protocol {protocol}: " + "; ".join(problems))
    result = splits(protocol, tb_sets)
    for split in result:
        where = f"fold {split.fold}" if split.fold >= 0 else "the whole set"
        parts = [("training part", split.train_set, split.train), ("test part", split.test_set, split.test)]
        if need_validation:
            parts += [("validation part", split.train_set, split.validation),
                      ("training part without validation", split.train_set, split.fit)]
        for label, set_name, rows in parts:
            normal, tb = _class_counts(tb_sets[set_name].tb[rows])
            if normal == 0 or tb == 0:
                problems.append(f"{set_name} {where}: the {label} has a single class ({normal} normal, {tb} TB)")
    if problems:
        raise ValueError(f"protocol {protocol} cannot be evaluated (lower data.num_folds or add images):\n  "
                         + "\n  ".join(dict.fromkeys(problems)))
    return result
