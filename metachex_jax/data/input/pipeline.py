"""The grain input pipeline: random-access record sources -> per-host numpy batches.

A *source* is anything with `len()` and `__getitem__(i)` returning a record dict in the format the builders write
(the fields of each record kind, data/build/layout.py: `image` (R, R, 1) uint8, the labels, sex, age, ...; the
batch functions below list what each kind reads): `records.RecordSource` splits (`builders.data_source`), or a
plain list in tests. Records are read lazily; nothing is loaded up front.

Training (`train_batches`), per source:

    positions 0, 1, 2, ... (repeat(num_epochs); None = forever)
      -> (source number, epoch, record index)
                                epoch = position // shard size; this host's shard is records
                                process_index, process_index + process_count, ..., visited in a new
                                permutation each epoch, drawn from (seed, source number, epoch)
several sources are then interleaved by weight (`grain.MapDataset.mix`, a fixed deterministic pattern) and the
positions batched (per-host batch = global batch / process count, remainder dropped); then each batch is

      -> read + augment + assemble
                                records read, each augmentation RNG seeded by (seed, source number, epoch,
                                record index), one array per field for the whole batch (`nih_batch`,
                                `tb_batch`); with augmentation=None (config.data.augment_on="device") read
                                only: the stored R x R images are batched whole and augmented in the train step

Because batching happens on the random-access dataset, each batch is a pure function of its position:
`mp_prefetch` workers each build whole batches (worker w builds batches w, w+W, ...) and the output is identical
for any worker count, including 0.

Evaluation (`eval_batches`) visits every record exactly once: no shuffle, no repeat, centre crop (or, for
`geometry="crop_resize"`, the record resized to S; see `augment.py`). Host h takes
records h, h + P, h + 2P, ... and every host is padded to the same number of full batches
(`ceil(ceil(n / P) / B)`), because a multi-host jitted step needs every host to take the same number of steps.
Padding rows have image 0, index -1 and ALL masks 0 (example_mask included), so metrics that weight by the masks
count every real example exactly once.

Images leave the pipeline as uint8 (B, S, S) (training with augmentation=None: (B, R, R)), values 0..255. The pipeline does NOT normalise: the device does,
inside the jitted step, with `metachex_jax.contract.pixels.to_model_input`.

Iterators (`BatchIterator`) are grain `DatasetIterator`s: `get_state()`/`set_state()` resume at exactly the same
batch, and orbax saves them with grain's handler, e.g.
`ocp.args.Composite(..., data_iter=grain.checkpoint.CheckpointSave(it))` /
`grain.checkpoint.CheckpointRestore(it)`. They own worker processes when num_workers > 0: close them
(`it.close()` or `with train_batches(...) as it:`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np

from metachex_jax.core.labels import METADATA_TASKS, PATHOLOGIES
from metachex_jax.data.input.augment import Augmentation, train_view
from metachex_jax.imaging.geometry import as_gray_2d, eval_view

Record = dict[str, Any]
Example = dict[str, np.ndarray]


class RandomAccessSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


# ---------------------------------------------------------------------------------------------------------
# Records -> batch, per dataset kind (the batch formats of the data contract). Columnar: one numpy array per
# field for the whole batch, built once per batch (per-example dicts stacked afterwards cost more than the
# record reads they follow).
# ---------------------------------------------------------------------------------------------------------

def _known_or_zero(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels with -1 = unknown -> (label with unknown as 0, mask 1 = known)."""
    known = value >= 0
    return np.where(known, value, 0).astype(np.float32), known.astype(np.float32)


def _ages(records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray]:
    valid = np.array([bool(r["age_valid"]) for r in records])
    age = np.where(valid, np.array([r["age"] for r in records], np.float32), 0.0).astype(np.float32)
    return age, valid.astype(np.float32)


def _multitask_batch(records: Sequence[Record], images: np.ndarray, indices: np.ndarray, pathology: np.ndarray,
                     pathology_mask: np.ndarray, patient_id: np.ndarray) -> Example:
    """The multi-task batch around its pathology labels, their mask and the patient ids (what the record kinds
    differ in): the metadata and age with their masks, index and example mask."""
    metadata, metadata_mask = _known_or_zero(
        np.array([[r[name] for name in METADATA_TASKS] for r in records], np.float32))
    age, age_mask = _ages(records)
    return {
        "image": images,
        "pathology": pathology,
        "pathology_mask": pathology_mask,
        "metadata": metadata,
        "metadata_mask": metadata_mask,
        "age": age,
        "age_mask": age_mask,
        "patient_id": patient_id,
        "index": np.asarray(indices, np.int64),
        "example_mask": np.ones(len(records), np.float32),
    }


def nih_batch(records: Sequence[Record], images: np.ndarray, indices: np.ndarray) -> Example:
    """ChestX-ray14 records and their (already cropped) images -> the multi-task batch."""
    bad = [int(i) for i, r in zip(indices, records) if np.shape(r["labels"]) != (len(PATHOLOGIES),)]
    if bad:
        raise ValueError(f"records {bad}: labels must have shape ({len(PATHOLOGIES)},)")
    pathology = np.array([r["labels"] for r in records], np.float32)
    return _multitask_batch(records, images, indices, pathology, np.ones_like(pathology),
                            np.array([r["patient_id"] for r in records], np.int64))


def _transfer_fields(records: Sequence[Record], images: np.ndarray, indices: np.ndarray) -> Example:
    """What every transfer batch holds besides its target: the image, sex and age with masks, fold and index."""
    sex_male, sex_mask = _known_or_zero(np.array([r["sex_male"] for r in records], np.float32))
    age, age_mask = _ages(records)
    return {
        "image": images,
        "sex_male": sex_male,
        "sex_mask": sex_mask,
        "age": age,
        "age_mask": age_mask,
        "fold": np.array([r["fold"] for r in records], np.int64),
        "index": np.asarray(indices, np.int64),
        "example_mask": np.ones(len(records), np.float32),
    }


def tb_batch(records: Sequence[Record], images: np.ndarray, indices: np.ndarray) -> Example:
    """Shenzhen/Montgomery records and their (already cropped) images -> the TB batch."""
    return {"tb": np.array([r["tb"] for r in records], np.float32), **_transfer_fields(records, images, indices)}


def binary_batch(records: Sequence[Record], images: np.ndarray, indices: np.ndarray) -> Example:
    """Records of one binary target of any dataset (transfer/sets.py: target 1/0/-1 = unknown) -> the batch that
    fine-tuning and feature extraction read."""
    target, target_mask = _known_or_zero(np.array([r["target"] for r in records], np.float32))
    return {"target": target, "target_mask": target_mask, **_transfer_fields(records, images, indices)}


def labelled_batch(records: Sequence[Record], images: np.ndarray, indices: np.ndarray) -> Example:
    """Records of the shared label space (data/input/mixture.py: labels 1/0/-1 = unknown) -> the multi-task batch, with
    a 0 mask for every unknown label or metadata entry."""
    labels = np.array([r["labels"] for r in records], np.int8)
    return _multitask_batch(records, images, indices, (labels == 1).astype(np.float32),
                            (labels >= 0).astype(np.float32), np.array([r["patient_key"] for r in records], np.int64))


@dataclasses.dataclass(frozen=True)
class ExampleFormat:
    to_batch: Callable[[Sequence[Record], np.ndarray, np.ndarray], Example]
    required_keys: tuple[str, ...]


EXAMPLE_FORMATS = {
    "nih": ExampleFormat(nih_batch, ("image", "labels", "age", "age_valid", "patient_id") + METADATA_TASKS),
    "tb": ExampleFormat(tb_batch, ("image", "tb", "sex_male", "age", "age_valid", "fold")),
    # one binary target of any dataset (transfer/sets.py: BinaryRecords)
    "binary": ExampleFormat(binary_batch, ("image", "target", "sex_male", "age", "age_valid", "fold")),
    # the shared label space of data/input/mixture.py (HarmonisedSource records), any number of labels
    "labelled": ExampleFormat(labelled_batch, ("image", "labels", "age", "age_valid", "patient_key")
                              + METADATA_TASKS),
}


def _blank_padding(batch: Example, padding: np.ndarray) -> Example:
    """Padding rows keep the structure: image 0, every mask 0, ids -1."""
    if padding.any():
        for value in batch.values():
            value[padding] = -1 if value.dtype == np.int64 else 0
    return batch


def padding_record(source) -> Record:
    """The record padding rows are made from: zeros shaped like the source's records (labels of its length)."""
    if len(source) and "labels" in source[0]:
        return {**_ZERO_RECORD, "labels": np.zeros(np.shape(source[0]["labels"]), np.int8)}
    return _ZERO_RECORD


_ZERO_RECORD = {"labels": np.zeros(len(PATHOLOGIES)), "age": 0.0, "age_valid": False, "patient_id": -1,
                "patient_key": -1, "tb": 0, "target": -1, "sex_male": -1, "fold": -1, "view_ap": -1}


def check_source(source: RandomAccessSource, kind: str, image_size: int) -> None:
    """Fail early, naming every problem, if the source's first record cannot feed this pipeline."""
    if kind not in EXAMPLE_FORMATS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(EXAMPLE_FORMATS)}")
    if len(source) == 0:
        raise ValueError(f"{_describe(source)} is empty")
    record = source[0]
    problems = [f"missing key {key!r}" for key in EXAMPLE_FORMATS[kind].required_keys if key not in record]
    if "image" in record:
        image = np.asarray(record["image"])
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 1):
            problems.append(f"image is {image.dtype} {image.shape}, expected uint8 (R, R, 1)")
        elif min(image.shape[:2]) < image_size:
            problems.append(f"image {image.shape} is smaller than the model resolution {image_size}")
    if problems:
        raise ValueError(f"record 0 of {_describe(source)} does not fit the {kind!r} pipeline: "
                         + "; ".join(problems))


def _describe(source: RandomAccessSource) -> str:
    # An in-memory list's repr would print every image.
    return f"{type(source).__name__} source of {len(source)} records" if isinstance(source, list) else repr(source)


# ---------------------------------------------------------------------------------------------------------
# Element transforms (top-level classes so that grain can pickle them into worker processes).
# ---------------------------------------------------------------------------------------------------------

class _ShuffledShard(grain.transforms.MapWithIndex):
    """(position in the repeated stream, position within the epoch) -> (source number, epoch, record index).

    The shard is records first, first + step, ... (size of them); each epoch visits it in a fresh permutation
    drawn from (seed, source number, epoch). numpy permutations, cached for the current epoch, rather than
    grain's `shuffle`: grain 0.2.18's index shuffle costs 0.4-5 ms per element on datasets of <= 100 records
    and 0.08 ms at 512 (measured), the size of the TB datasets and their host shards.
    """

    def __init__(self, first: int, step: int, size: int, *, seed: int, source_number: int, shuffle: bool):
        self.first, self.step, self.size = first, step, size
        self.seed, self.source_number, self.shuffle = seed, source_number, shuffle
        self._cached = (-1, None)   # (epoch, order); replaced as a whole, so safe with reader threads

    def map_with_index(self, position: int, position_in_epoch: int) -> tuple[int, int, int]:
        epoch = position // self.size
        if self.shuffle:
            position_in_epoch = int(self._order(epoch)[position_in_epoch])
        return self.source_number, epoch, self.first + self.step * position_in_epoch

    def _order(self, epoch: int) -> np.ndarray:
        cached_epoch, order = self._cached
        if cached_epoch != epoch:
            order = np.random.default_rng([self.seed, self.source_number, epoch]).permutation(self.size)
            self._cached = (epoch, order)
        return order


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: identity hash; the sources need not be hashable
class _ReadTrainBatch(grain.transforms.Map):
    """[(source number, epoch, record index), ...] -> the batch of those records, augmented."""
    sources: tuple[RandomAccessSource, ...]
    kind: str
    image_size: int
    augmentation: Augmentation | None  # None: the stored images as they are (augmentation on the device)
    seed: int
    geometry: str = "resize_crop"

    def map(self, positions: Sequence[tuple[int, int, int]]) -> Example:
        records = [self.sources[number][index] for number, _, index in positions]
        images = None
        for row, (record, (number, epoch, index)) in enumerate(zip(records, positions)):
            image = as_gray_2d(record["image"])
            if self.augmentation is not None:
                rng = np.random.default_rng([self.seed, number, epoch, index])
                image = train_view(image, self.image_size, self.augmentation, rng, self.geometry)
            if images is None:
                images = np.empty((len(positions), *image.shape), np.uint8)
            images[row] = image
        indices = np.array([index for _, _, index in positions], np.int64)
        return EXAMPLE_FORMATS[self.kind].to_batch(records, images, indices)


@dataclasses.dataclass(frozen=True, eq=False)
class _ReadEvalBatch(grain.transforms.Map):
    """Batch number b -> this host's records process_index + p * process_count for the batch's positions p, centre
    cropped; positions past the end of the source are padding rows."""
    source: RandomAccessSource
    kind: str
    image_size: int
    per_host_batch_size: int
    process_index: int
    process_count: int
    geometry: str = "resize_crop"

    def map(self, batch_number: int) -> Example:
        positions = batch_number * self.per_host_batch_size + np.arange(self.per_host_batch_size)
        indices = self.process_index + positions * self.process_count
        padding = indices >= len(self.source)
        padded = padding_record(self.source) if padding.any() else None
        records = [padded if pad else self.source[int(i)] for i, pad in zip(indices, padding)]
        blank = np.zeros((self.image_size, self.image_size), np.uint8)
        images = np.stack([blank if pad else eval_view(as_gray_2d(r["image"]), self.image_size, self.geometry)
                           for r, pad in zip(records, padding)])
        batch = EXAMPLE_FORMATS[self.kind].to_batch(records, images, np.where(padding, -1, indices))
        return _blank_padding(batch, padding)


# ---------------------------------------------------------------------------------------------------------
# Datasets (unbatched, random access) and batch iterators.
# ---------------------------------------------------------------------------------------------------------

def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    return process_index, process_count


def _per_host_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    return global_batch_size // process_count


def _shard_positions(source: RandomAccessSource, *, seed: int, process_index: int, process_count: int,
                     num_epochs: int | None, shuffle: bool, source_number: int) -> grain.MapDataset:
    """This host's (source number, epoch, record index) stream over one source (infinite when num_epochs is None)."""
    shard_size = len(range(process_index, len(source), process_count))
    if shard_size == 0:
        raise ValueError(f"source of {len(source)} records has no records for host {process_index} of "
                         f"{process_count}")
    order = _ShuffledShard(process_index, process_count, shard_size, seed=seed, source_number=source_number,
                           shuffle=shuffle)
    return grain.MapDataset.range(shard_size).repeat(num_epochs).map_with_index(order)


def eval_num_batches(num_records: int, per_host_batch_size: int, process_count: int) -> int:
    """Batches every host yields in evaluation: enough for the host with the most records."""
    return max(1, math.ceil(math.ceil(num_records / process_count) / per_host_batch_size))


class BatchIterator(grain.DatasetIterator):
    """A grain iterator over per-host batches that also closes its workers as a context manager.

    It is a `grain.DatasetIterator`, so `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` work
    with orbax. `num_batches` is the number of batches per host (None when infinite).
    """

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, dataset: grain.IterDataset, num_batches: int | None):
        super().__init__(iter(dataset))
        self.num_batches = num_batches

    def __next__(self) -> Example:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


MAX_AUTO_WORKERS = 32


def workers_for_resume(requested: int, resolved: int, saved: int | None) -> int:
    """The worker count of a resumed run: the one its checkpoint's input position was saved with.

    The batches do not depend on the worker count, but grain's saved iterator state does (a state saved with
    N workers restored with M skips or repeats batches, or fails). `saved` is None for a fresh run.
    """
    if saved is None:
        return resolved
    if requested not in (-1, saved):
        raise ValueError(f"config.data.workers={requested}, but the checkpoint to resume from saved its input "
                         f"position with {saved} worker(s); resume with --config.data.workers={saved} (or -1, "
                         "which follows the checkpoint)")
    return saved


AUGMENT_ON = ("auto", "host", "device")  # config.data.augment_on


def resolve_augment_on(requested: str, backend: str, saved: str | None = None,
                       geometry: str = "resize_crop") -> str:
    """Where training images are augmented, for `requested` (config.data.augment_on): "host", "device" or "auto".

    Auto: what a checkpoint being resumed used (`saved`), else "host" on the CPU backend and "device" on GPU/TPU;
    always "host" for a "crop_resize" model (the device crops stored images, resize_crop only; asking for
    "device" there is an error).
    Why (measured; the docs' Benchmarks page): on CPU the "device" is the same cores, so moving the work there
    gains nothing (the host's crop + OpenCV affine is ~0.5 ms against a ~30 ms step per image); on an accelerator
    the step's augmentation costs the device little, while the host's work per image drops to a read (~0.15 ms).
    """
    if requested not in (*AUGMENT_ON, "auto"):
        raise ValueError(f"config.data.augment_on={requested!r}: use 'host', 'device' or 'auto'")
    if geometry != "resize_crop":
        if requested == "device":
            raise ValueError(f"config.data.augment_on=device crops the stored R x R images (geometry resize_crop); "
                             f"this model's geometry is {geometry}: use augment_on=host or auto")
        return "host"
    if requested == "auto":
        return saved or ("host" if backend == "cpu" else "device")
    return requested


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_workers(requested: int, backend: str, cpu_count: int | None = None) -> int:
    """Worker processes for `requested` (config.data.workers): -1 = auto, else itself.

    Auto: 0 (in-process) on the CPU backend, whose XLA thread pool already uses every core; on GPU/TPU hosts one
    worker per core, less two for the training process and the device runtime, at most MAX_AUTO_WORKERS. Why it
    matters: decoding and augmenting in one process fed an H200 424 img/s at 224 px while its step alone ran at
    1318 img/s (measured with `bench loop`, bf16, batch 64). The batches do not depend on the worker count, but a
    saved input position does: a resumed run keeps its checkpoint's count (`workers_for_resume`).
    """
    if requested == -1:
        cpu_count = available_cpus() if cpu_count is None else cpu_count
        return 0 if backend == "cpu" else max(1, min(MAX_AUTO_WORKERS, cpu_count - 2))
    if requested < 0:
        raise ValueError(f"config.data.workers={requested}: use -1 (auto), 0 (in-process) or a positive count")
    return requested


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
    """In grain's worker processes: ignore SIGINT and SIGTERM. Ctrl-C and schedulers signal the whole process
    group; the trainer then saves a checkpoint at the next step boundary (`metachex_jax.core.preemption`), which
    needs the workers alive until it closes them. So that a worker never outlives its trainer (killed, say), it
    asks Linux for SIGKILL when its parent dies."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _to_iterator(batches: grain.MapDataset, num_batches: int | None, num_workers: int, read_threads: int,
                 prefetch_batches: int) -> BatchIterator:
    if num_workers < 0 or read_threads < 0:
        raise ValueError(f"num_workers={num_workers} and read_threads={read_threads} must be >= 0")
    dataset = batches.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                        prefetch_buffer_size=prefetch_batches))
    if num_workers > 0:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=max(1, prefetch_batches // num_workers)),
            worker_init_fn=_ignore_stop_signals)
    return BatchIterator(dataset, num_batches)


def train_batches(sources: RandomAccessSource | Sequence[RandomAccessSource], *, kind: str,
                  global_batch_size: int, image_size: int, seed: int,
                  augmentation: Augmentation | None = Augmentation(),
                  weights: Sequence[float] | None = None,
                  num_epochs: int | None = None,
                  num_workers: int = 0, read_threads: int = 1, prefetch_batches: int = 2,
                  process_index: int | None = None, process_count: int | None = None,
                  geometry: str = "resize_crop") -> BatchIterator:
    """This host's training batches: sharded, shuffled each epoch, repeated, augmented, mixed, batched.

    Args:
      sources: one source, or several (all of the same `kind`) mixed by `weights`.
      kind: "nih" (ChestX-ray14 multi-task batches), "tb" (Shenzhen/Montgomery), "labelled" (records in the
        shared label space of data/input/mixture.py: per-label masks; what the trainer feeds) or "binary" (one target:
        what transfer fine-tuning feeds); a prepared dataset's kind is in data/build/registry.py.
      global_batch_size: summed over hosts; each host yields global_batch_size / process_count examples.
      image_size: model resolution S; images are cropped from the stored R x R (R >= S).
      geometry: the model's pixel geometry (`imaging.geometry.GEOMETRIES`; `PixelContract.geometry`): "resize_crop"
        crops S from the stored R x R, "crop_resize" resizes the record's centre square to S.
      seed: shuffling and augmentation seed; same seed -> same batches for any worker count.
      augmentation: see `Augmentation`; `Augmentation.none()` gives centre crops; None gives the stored R x R
        images uncropped, for augmentation in the train step (`metachex_jax.data.input.device_augment`): the host
        then only reads and batches.
      weights: relative sampling weights of `sources` (default uniform).
      num_epochs: None repeats forever (count steps in the trainer); otherwise stops after that many passes
        (over the shortest source relative to its weight when mixing), the last incomplete batch dropped,
        after the same number of batches on every host.
      num_workers: grain worker processes (0 = in this process).
      read_threads: threads reading/augmenting batches in each process.
      prefetch_batches: batches buffered ahead.
      process_index, process_count: this host; default jax.process_index() / jax.process_count().
    """
    process_index, process_count = _host(process_index, process_count)
    per_host = _per_host_batch_size(global_batch_size, process_count)
    sources = [sources] if _is_single_source(sources) else list(sources)
    if weights is not None and len(weights) != len(sources):
        raise ValueError(f"{len(weights)} weights for {len(sources)} sources")
    for source in sources:
        check_source(source, kind, image_size)
    streams = [_shard_positions(source, seed=seed, process_index=process_index, process_count=process_count,
                                num_epochs=num_epochs, shuffle=True, source_number=number)
               for number, source in enumerate(sources)]
    if augmentation is None and geometry != "resize_crop":
        raise ValueError(f"augmentation on the device crops the stored R x R images (geometry resize_crop); a "
                         f"{geometry} model augments on the host (config.data.augment_on=host)")
    read = _ReadTrainBatch(tuple(sources), kind, image_size, augmentation, seed, geometry)
    batches = _mix(streams, weights).batch(per_host, drop_remainder=True, batch_fn=list).map(read)
    num_batches = None
    if num_epochs is not None:
        # Host shards differ in size by up to one record; every host stops where the smallest one does, so
        # that all hosts take the same number of steps.
        smallest_shards = [grain.MapDataset.range(len(source) // process_count).repeat(num_epochs)
                           for source in sources]
        num_batches = len(_mix(smallest_shards, weights)) // per_host
        batches = batches[:num_batches]
    return _to_iterator(batches, num_batches, num_workers, read_threads, prefetch_batches)


def _mix(datasets: Sequence[grain.MapDataset], weights: Sequence[float] | None) -> grain.MapDataset:
    return datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)


def eval_batches(source: RandomAccessSource, *, kind: str, global_batch_size: int, image_size: int,
                 num_workers: int = 0, read_threads: int = 1, prefetch_batches: int = 2,
                 process_index: int | None = None, process_count: int | None = None,
                 geometry: str = "resize_crop") -> BatchIterator:
    """This host's evaluation batches: every record once over all hosts, padded, equal batch count per host.

    `iterator.num_batches` is the same on every host. Arguments as in `train_batches`.
    """
    process_index, process_count = _host(process_index, process_count)
    per_host = _per_host_batch_size(global_batch_size, process_count)
    check_source(source, kind, image_size)
    num_batches = eval_num_batches(len(source), per_host, process_count)
    batches = grain.MapDataset.range(num_batches).map(
        _ReadEvalBatch(source, kind, image_size, per_host, process_index, process_count, geometry))
    return _to_iterator(batches, num_batches, num_workers, read_threads, prefetch_batches)


def _is_single_source(sources) -> bool:
    # A list of sources to mix, or one source (which may itself be an in-memory list of record dicts).
    if not isinstance(sources, (list, tuple)):
        return True
    return len(sources) == 0 or isinstance(sources[0], dict)


def random_nih_batch(batch_size: int, image_size: int, seed: int = 0) -> Example:
    """A random batch in the NIH batch format, all masks on (for benchmarks and train-step tests; not data)."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (batch_size, image_size, image_size), dtype=np.uint8),
        "pathology": rng.integers(0, 2, (batch_size, len(PATHOLOGIES))).astype(np.float32),
        "pathology_mask": np.ones((batch_size, len(PATHOLOGIES)), np.float32),
        "metadata": rng.integers(0, 2, (batch_size, len(METADATA_TASKS))).astype(np.float32),
        "metadata_mask": np.ones((batch_size, len(METADATA_TASKS)), np.float32),
        "age": rng.uniform(10, 90, batch_size).astype(np.float32),
        "age_mask": np.ones(batch_size, np.float32),
        "example_mask": np.ones(batch_size, np.float32),
    }
