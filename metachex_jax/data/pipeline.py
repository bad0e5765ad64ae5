"""The grain input pipeline: random-access record sources -> per-host numpy batches.

A *source* is anything with `len()` and `__getitem__(i)` returning a record dict of the data contract
(/work/notes/data_contract.md): `tfds.data_source(...)` splits, grain's ArrayRecordDataSource with a decoder,
or a plain list in tests. Records are read lazily; nothing is loaded up front.

Training (`train_batches`), per source:

    positions 0, 1, 2, ... (repeat(num_epochs); None = forever)
      -> (epoch, record index)  epoch = position // shard size; this host's shard is records
                                process_index, process_index + process_count, ..., visited in a new
                                permutation each epoch, drawn from (seed, source number, epoch)
      -> read + augment         augmentation RNG seeded by (seed, source number, epoch, record index)
several sources are then interleaved by weight (`grain.MapDataset.mix`, a fixed deterministic pattern), and
batched (per-host batch = global batch / process count, remainder dropped). Because batching happens on the
random-access dataset, each batch is a pure function of its position: `mp_prefetch` workers each build whole
batches (worker w builds batches w, w+W, ...) and the output is identical for any worker count, including 0.

Evaluation (`eval_batches`) visits every record exactly once: no shuffle, no repeat, centre crop. Host h takes
records h, h + P, h + 2P, ... and every host is padded to the same number of full batches
(`ceil(ceil(n / P) / B)`), because a multi-host jitted step needs every host to take the same number of steps.
Padding rows have image 0, index -1 and ALL masks 0 (example_mask included), so metrics that weight by the masks
count every real example exactly once.

Images leave the pipeline as uint8 (B, S, S), values 0..255. The pipeline does NOT normalise: the device does,
inside the jitted step, with `metachex_jax.preprocessing.to_model_input`.

Iterators (`BatchIterator`) are grain `DatasetIterator`s: `get_state()`/`set_state()` resume at exactly the same
batch, and orbax saves them with grain's handler, e.g.
`ocp.args.Composite(..., data_iter=grain.checkpoint.CheckpointSave(it))` /
`grain.checkpoint.CheckpointRestore(it)`. They own worker processes when num_workers > 0: close them
(`it.close()` or `with train_batches(...) as it:`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from metachex_jax.data.augment import Augmentation, as_gray_2d, augment, center_crop
from metachex_jax.labels import METADATA_TASKS, PATHOLOGIES

Record = dict[str, Any]
Example = dict[str, np.ndarray]


class RandomAccessSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


# ---------------------------------------------------------------------------------------------------------
# Record -> example, per dataset kind (the batch formats of the data contract).
# ---------------------------------------------------------------------------------------------------------

def _known_or_zero(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels with -1 = unknown -> (label with unknown as 0, mask 1 = known)."""
    known = value >= 0
    return np.where(known, value, 0).astype(np.float32), known.astype(np.float32)


def _age(record: Record) -> tuple[np.float32, np.float32]:
    valid = bool(record["age_valid"])
    return np.float32(record["age"] if valid else 0.0), np.float32(valid)


def nih_example(record: Record, image: np.ndarray, index: int) -> Example:
    """A ChestX-ray14 record (already cropped image) -> the multi-task example."""
    pathology = np.asarray(record["labels"], np.float32)
    if pathology.shape != (len(PATHOLOGIES),):
        raise ValueError(f"record {index}: labels has shape {pathology.shape}, expected ({len(PATHOLOGIES)},)")
    metadata, metadata_mask = _known_or_zero(
        np.array([record[name] for name in METADATA_TASKS], np.float32))
    age, age_mask = _age(record)
    return {
        "image": image,
        "pathology": pathology,
        "pathology_mask": np.ones(len(PATHOLOGIES), np.float32),
        "metadata": metadata,
        "metadata_mask": metadata_mask,
        "age": age,
        "age_mask": age_mask,
        "patient_id": np.int64(record["patient_id"]),
        "index": np.int64(index),
        "example_mask": np.float32(1.0),
    }


def tb_example(record: Record, image: np.ndarray, index: int) -> Example:
    """A Shenzhen/Montgomery record (already cropped image) -> the TB example."""
    sex_male, sex_mask = _known_or_zero(np.float32(record["sex_male"]))
    age, age_mask = _age(record)
    return {
        "image": image,
        "tb": np.float32(record["tb"]),
        "sex_male": sex_male,
        "sex_mask": sex_mask,
        "age": age,
        "age_mask": age_mask,
        "fold": np.int64(record["fold"]),
        "index": np.int64(index),
        "example_mask": np.float32(1.0),
    }


def binary_example(record: Record, image: np.ndarray, index: int) -> Example:
    """A record of one binary target (the transfer pipeline's, transfer/sets.py: target 1/0/-1 = unknown) -> the
    example fine-tuning and feature extraction read."""
    target, target_mask = _known_or_zero(np.float32(record["target"]))
    sex_male, sex_mask = _known_or_zero(np.float32(record["sex_male"]))
    age, age_mask = _age(record)
    return {
        "image": image,
        "target": target,
        "target_mask": target_mask,
        "sex_male": sex_male,
        "sex_mask": sex_mask,
        "age": age,
        "age_mask": age_mask,
        "fold": np.int64(record["fold"]),
        "index": np.int64(index),
        "example_mask": np.float32(1.0),
    }


def labelled_example(record: Record, image: np.ndarray, index: int) -> Example:
    """A record of the shared label space (data/mixture.py: labels 1/0/-1 = unknown) -> the multi-task example,
    with a 0 mask for every unknown label or metadata entry."""
    labels = np.asarray(record["labels"], np.int8)
    metadata, metadata_mask = _known_or_zero(
        np.array([record[name] for name in METADATA_TASKS], np.float32))
    age, age_mask = _age(record)
    return {
        "image": image,
        "pathology": (labels == 1).astype(np.float32),
        "pathology_mask": (labels >= 0).astype(np.float32),
        "metadata": metadata,
        "metadata_mask": metadata_mask,
        "age": age,
        "age_mask": age_mask,
        "patient_id": np.int64(record["patient_key"]),
        "index": np.int64(index),
        "example_mask": np.float32(1.0),
    }


@dataclasses.dataclass(frozen=True)
class ExampleFormat:
    to_example: Callable[[Record, np.ndarray, int], Example]
    required_keys: tuple[str, ...]


EXAMPLE_FORMATS = {
    "nih": ExampleFormat(nih_example, ("image", "labels", "age", "age_valid", "patient_id")
                         + METADATA_TASKS),
    "tb": ExampleFormat(tb_example, ("image", "tb", "sex_male", "age", "age_valid", "fold")),
    # one binary target of any dataset (transfer/sets.py: BinaryRecords)
    "binary": ExampleFormat(binary_example, ("image", "target", "sex_male", "age", "age_valid", "fold")),
    # the shared label space of data/mixture.py (HarmonisedSource records), any number of labels
    "labelled": ExampleFormat(labelled_example, ("image", "labels", "age", "age_valid", "patient_key")
                              + METADATA_TASKS),
}  # each dataset's kind: data/registry.py


def padding_example(kind: str, image_size: int, record: Record | None = None) -> Example:
    """A padding row: same structure as a real example (of `record`, e.g. the source's first, where the label
    count varies), image 0, every mask 0, ids -1."""
    record = _ZERO_RECORD if record is None else record
    example = EXAMPLE_FORMATS[kind].to_example(record, np.zeros((image_size, image_size), np.uint8), -1)
    for name, value in example.items():
        example[name] = np.full_like(value, -1) if value.dtype == np.int64 else np.zeros_like(value)
    return example


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
    """(position in the repeated stream, position within the epoch) -> (epoch, record index).

    The shard is records first, first + step, ... (size of them); each epoch visits it in a fresh permutation
    drawn from (seed, source number, epoch). numpy permutations, cached for the current epoch, rather than
    grain's `shuffle`: grain 0.2.18's index shuffle costs 0.4-5 ms per element on datasets of <= 100 records
    and 0.08 ms at 512 (measured), the size of the TB datasets and their host shards.
    """

    def __init__(self, first: int, step: int, size: int, *, seed: int, source_number: int, shuffle: bool):
        self.first, self.step, self.size = first, step, size
        self.seed, self.source_number, self.shuffle = seed, source_number, shuffle
        self._cached = (-1, None)   # (epoch, order); replaced as a whole, so safe with reader threads

    def map_with_index(self, position: int, position_in_epoch: int) -> tuple[int, int]:
        epoch = position // self.size
        if self.shuffle:
            position_in_epoch = int(self._order(epoch)[position_in_epoch])
        return epoch, self.first + self.step * position_in_epoch

    def _order(self, epoch: int) -> np.ndarray:
        cached_epoch, order = self._cached
        if cached_epoch != epoch:
            order = np.random.default_rng([self.seed, self.source_number, epoch]).permutation(self.size)
            self._cached = (epoch, order)
        return order


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: identity hash; the source need not be hashable
class _ReadTrainExample(grain.transforms.Map):
    source: RandomAccessSource
    kind: str
    image_size: int
    augmentation: Augmentation
    seed: int
    source_number: int

    def map(self, epoch_and_index: tuple[int, int]) -> Example:
        epoch, index = epoch_and_index
        rng = np.random.default_rng([self.seed, self.source_number, epoch, index])
        record = self.source[index]
        image = augment(as_gray_2d(record["image"]), self.image_size, self.augmentation, rng)
        return EXAMPLE_FORMATS[self.kind].to_example(record, image, index)


@dataclasses.dataclass(frozen=True, eq=False)
class _ReadEvalExample(grain.transforms.Map):
    """Host-local position -> the example of record process_index + position * process_count, or padding."""
    source: RandomAccessSource
    kind: str
    image_size: int
    process_index: int
    process_count: int

    def map(self, position: int) -> Example:
        index = self.process_index + position * self.process_count
        if index >= len(self.source):
            return padding_example(self.kind, self.image_size, self.source[0] if self.kind == "labelled" else None)
        record = self.source[index]
        image = center_crop(as_gray_2d(record["image"]), self.image_size)
        return EXAMPLE_FORMATS[self.kind].to_example(record, image, index)


# ---------------------------------------------------------------------------------------------------------
# Datasets (unbatched, random access) and batch iterators.
# ---------------------------------------------------------------------------------------------------------

def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only here: worker processes and tests with explicit hosts need not import jax
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


def train_examples(source: RandomAccessSource, *, kind: str, image_size: int, seed: int,
                   augmentation: Augmentation, process_index: int, process_count: int,
                   num_epochs: int | None = None, shuffle: bool = True,
                   source_number: int = 0) -> grain.MapDataset:
    """This host's stream of augmented training examples from one source (infinite when num_epochs is None)."""
    check_source(source, kind, image_size)
    shard_size = len(range(process_index, len(source), process_count))
    if shard_size == 0:
        raise ValueError(f"source of {len(source)} records has no records for host {process_index} of "
                         f"{process_count}")
    order = _ShuffledShard(process_index, process_count, shard_size, seed=seed, source_number=source_number,
                           shuffle=shuffle)
    return (grain.MapDataset.range(shard_size).repeat(num_epochs)
            .map_with_index(order)
            .map(_ReadTrainExample(source, kind, image_size, augmentation, seed, source_number)))


def eval_examples(source: RandomAccessSource, *, kind: str, image_size: int, per_host_batch_size: int,
                  process_index: int, process_count: int) -> grain.MapDataset:
    """This host's evaluation examples in record order, padded to the batch count shared by all hosts."""
    check_source(source, kind, image_size)
    num_batches = eval_num_batches(len(source), per_host_batch_size, process_count)
    return (grain.MapDataset.range(num_batches * per_host_batch_size)
            .map(_ReadEvalExample(source, kind, image_size, process_index, process_count)))


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


def _to_iterator(batches: grain.MapDataset, num_batches: int | None, num_workers: int, read_threads: int,
                 prefetch_batches: int) -> BatchIterator:
    if num_workers < 0 or read_threads < 0:
        raise ValueError(f"num_workers={num_workers} and read_threads={read_threads} must be >= 0")
    dataset = batches.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                        prefetch_buffer_size=prefetch_batches))
    if num_workers > 0:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=max(1, prefetch_batches // num_workers)))
    return BatchIterator(dataset, num_batches)


def train_batches(sources: RandomAccessSource | Sequence[RandomAccessSource], *, kind: str,
                  global_batch_size: int, image_size: int, seed: int,
                  augmentation: Augmentation = Augmentation(),
                  weights: Sequence[float] | None = None,
                  num_epochs: int | None = None,
                  num_workers: int = 0, read_threads: int = 1, prefetch_batches: int = 2,
                  process_index: int | None = None, process_count: int | None = None) -> BatchIterator:
    """This host's training batches: sharded, shuffled each epoch, repeated, augmented, mixed, batched.

    Args:
      sources: one source, or several (all of the same `kind`) mixed by `weights`.
      kind: "nih" (ChestX-ray14 multi-task batches), "tb" (Shenzhen/Montgomery), "labelled" (records in the
        shared label space of data/mixture.py: per-label masks; what the trainer feeds) or "binary" (one target:
        what transfer fine-tuning feeds); a prepared dataset's kind is in data/registry.py.
      global_batch_size: summed over hosts; each host yields global_batch_size / process_count examples.
      image_size: model resolution S; images are cropped from the stored R x R (R >= S).
      seed: shuffling and augmentation seed; same seed -> same batches for any worker count.
      augmentation: see `Augmentation`; `Augmentation.none()` gives centre crops.
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
    streams = [train_examples(source, kind=kind, image_size=image_size, seed=seed, augmentation=augmentation,
                              process_index=process_index, process_count=process_count,
                              num_epochs=num_epochs, source_number=number)
               for number, source in enumerate(sources)]
    batches = _mix(streams, weights).batch(per_host, drop_remainder=True)
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
                 process_index: int | None = None, process_count: int | None = None) -> BatchIterator:
    """This host's evaluation batches: every record once over all hosts, padded, equal batch count per host.

    `iterator.num_batches` is the same on every host. Arguments as in `train_batches`.
    """
    process_index, process_count = _host(process_index, process_count)
    per_host = _per_host_batch_size(global_batch_size, process_count)
    examples = eval_examples(source, kind=kind, image_size=image_size, per_host_batch_size=per_host,
                             process_index=process_index, process_count=process_count)
    batches = examples.batch(per_host, drop_remainder=True)  # exact: padded to whole batches
    return _to_iterator(batches, len(batches), num_workers, read_threads, prefetch_batches)


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
