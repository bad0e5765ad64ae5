"""Evaluation protocols: which images train and which test, for every split of a protocol, on any datasets.

    cv_<dataset>                   k-fold cross-validation within the dataset (its folds: transfer/sets.py): split
                                   f tests fold f and trains on the others; the out-of-fold predictions cover
                                   every image once. E.g. cv_shenzhen, cv_csv.
    <a>[+<b>...]_to_<c>            the unseen-dataset test: train on every image of a (and b, ...), test on every
                                   image of c. E.g. shenzhen_to_montgomery, shenzhen+montgomery_to_csv.
    split_<dataset>                the dataset's own fixed split, as built (its train / validation / test splits):
                                   fit on train, choose on validation (the probe's L2 strength, fine-tuning's
                                   epoch, every decision threshold), report on test. E.g. split_tbx11k (test = the
                                   original val set), split_chexpert, split_mimic (the official split), split_csv,
                                   split_shenzhen.

TB_PROTOCOLS are the paper's four (the default). Split indices are into the TransferSets (`sets`) named by the
protocol ("shenzhen", "shenzhen+montgomery", ...): images whose target is known.

Fine-tuning also needs a validation part for early stopping; it is carved from the TRAINING images only: the
fold after the test fold (CV), or fold 0 of the training set (cross-dataset), so it is stratified too; a fixed
split's is its validation split (`Split.train` is then train + validation, `Split.fit` the train split).

`check_protocol` refuses (naming every offending fold) a fold whose training, validation or test part holds a
single class, or a set whose folds are not 0..k-1: metrics and thresholds would be undefined there. A fixed
split's validation part is always checked: the probe chooses on it too.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

TB_PROTOCOLS = ("cv_shenzhen", "cv_montgomery", "shenzhen_to_montgomery", "montgomery_to_shenzhen")
_NAME = r"[a-z][a-z0-9]*"


KINDS = ("cv", "cross", "split")


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    train: tuple[str, ...]  # the datasets trained on
    test: str  # the dataset tested on
    kind: str = "cross"  # "cv" (cv_<d>), "cross" (<a>_to_<b>) or "split" (split_<d>)

    @property
    def within(self) -> bool:
        """k-fold cross-validation within one dataset."""
        return self.kind == "cv"

    @property
    def fixed_split(self) -> bool:
        """The dataset's own train / validation / test split."""
        return self.kind == "split"

    @property
    def train_set(self) -> str:
        """The TransferSet name of the training side ("a+b" for several datasets)."""
        return "+".join(self.train)

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.train, self.test)))


def parse_protocol(name: str) -> Protocol:
    cv = re.fullmatch(rf"cv_({_NAME})", name)
    if cv:
        return Protocol(name, (cv.group(1),), cv.group(1), "cv")
    fixed = re.fullmatch(rf"split_({_NAME})", name)
    if fixed:
        return Protocol(name, (fixed.group(1),), fixed.group(1), "split")
    cross = re.fullmatch(rf"({_NAME}(?:\+{_NAME})*)_to_({_NAME})", name)
    if cross:
        train = tuple(cross.group(1).split("+"))
        if cross.group(2) in train or len(set(train)) < len(train):
            raise ValueError(f"protocol {name}: the test dataset must not be among the training ones, each once "
                             f"(for a test within a dataset use cv_{cross.group(2)})")
        return Protocol(name, train, cross.group(2))
    raise ValueError(f"protocol {name!r}: write cv_<dataset>, split_<dataset> or <dataset>[+<dataset>...]_to_"
                     f"<dataset> (e.g. {', '.join(TB_PROTOCOLS)}, split_tbx11k, shenzhen+montgomery_to_csv)")


def parse_protocols(text: str) -> list[Protocol]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise ValueError(f"config.protocols is empty; e.g. {','.join(TB_PROTOCOLS)}")
    if len(set(names)) < len(names):
        raise ValueError(f"config.protocols names a protocol twice: {names}")
    return [parse_protocol(name) for name in names]


def parse_targets(text: str) -> list[str]:
    """config.targets: comma-separated label names (a name may hold spaces: "Lung Opacity")."""
    targets = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not targets:
        raise ValueError("config.targets is empty: name the binary label(s) to transfer to, e.g. Tuberculosis")
    return targets


def column_name(protocol: str, target: str, several: bool) -> str:
    """The report column of (protocol, target): the protocol's name, with the target when there are several."""
    return f"{protocol}.{target.lower().replace(' ', '_')}" if several else protocol


@dataclasses.dataclass(frozen=True)
class Split:
    protocol: str
    fold: int  # the test fold (CV); -1 for a cross-dataset split
    train_set: str
    test_set: str
    train: np.ndarray  # indices into sets[train_set]
    validation: np.ndarray  # indices into sets[train_set], a subset of `train` (fine-tuning early stopping)
    test: np.ndarray  # indices into sets[test_set]

    @property
    def fit(self) -> np.ndarray:
        """Training records without the validation part (what fine-tuning trains on)."""
        return np.setdiff1d(self.train, self.validation)


def splits(protocol: Protocol, sets: dict) -> list[Split]:
    train_set, test_set = sets[protocol.train_set], sets[protocol.test]
    if protocol.fixed_split:
        part = np.asarray(train_set.split)
        return [Split(protocol.name, -1, protocol.train_set, protocol.test,
                      np.flatnonzero((part == "train") | (part == "validation")), np.flatnonzero(part == "validation"),
                      np.flatnonzero(part == "test"))]
    if protocol.within:
        k = int(train_set.fold.max()) + 1
        out = []
        for f in range(k):
            train = np.flatnonzero(train_set.fold != f)
            validation = np.flatnonzero(train_set.fold == (f + 1) % k)
            out.append(Split(protocol.name, f, protocol.train_set, protocol.test, train, validation,
                             np.flatnonzero(train_set.fold == f)))
        return out
    every_train = np.arange(len(train_set))
    return [Split(protocol.name, -1, protocol.train_set, protocol.test, every_train,
                  np.flatnonzero(train_set.fold == 0), np.arange(len(test_set)))]


def _class_counts(y: np.ndarray) -> tuple[int, int]:
    counts = np.bincount(np.asarray(y, np.int64), minlength=2)
    return int(counts[0]), int(counts[1])


def check_protocol(protocol: Protocol | str, sets: dict, need_validation: bool) -> list[Split]:
    """The protocol's (a Protocol or its name) splits, after checking folds and classes; raises naming every
    problem."""
    protocol = parse_protocol(protocol) if isinstance(protocol, str) else protocol
    problems = []
    for name in dict.fromkeys((protocol.train_set, protocol.test)):
        folds = sets[name].fold
        k = int(folds.max()) + 1 if len(folds) else 0
        present = set(np.unique(folds).tolist())
        if protocol.within and (k < 2 or present != set(range(k))):
            problems.append(f"{name}: fold ids {sorted(present)} are not 0..k-1 with k >= 2")
        if not len(folds):
            problems.append(f"{name}: no image with a known {sets[name].target}")
    if problems:
        raise ValueError(f"protocol {protocol.name}: " + "; ".join(problems))
    result = splits(protocol, sets)
    for split in result:
        where = (f"fold {split.fold}" if split.fold >= 0 else "its fixed split" if protocol.fixed_split
                 else "the whole set")
        parts = [("training part", split.train_set, split.train), ("test part", split.test_set, split.test)]
        if need_validation or protocol.fixed_split:
            parts += [("validation part", split.train_set, split.validation),
                      ("training part without validation", split.train_set, split.fit)]
        for label, set_name, rows in parts:
            negative, positive = _class_counts(sets[set_name].y[rows])
            if negative == 0 or positive == 0:
                problems.append(f"{set_name} {where}: the {label} has a single class ({negative} negative, "
                                f"{positive} positive {sets[set_name].target})")
    if problems:
        raise ValueError(f"protocol {protocol.name} cannot be evaluated (lower data.num_folds or add images):\n  "
                         + "\n  ".join(dict.fromkeys(problems)))
    return result
