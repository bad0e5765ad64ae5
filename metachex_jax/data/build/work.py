"""The work of a build, the same for every runner: a chunk of planned records -> their record bytes and a tally.

    result = process_chunk(chunk)          # Chunk -> ChunkResult(records=[(index, bytes), ...], tally)

The local runner (local.py) maps it over a process pool, Beam (beam.py) over its workers; both then write each
shard's records sorted by index (shards.py), so the records are the same whatever ran them. Runs in those workers:
imports neither jax nor tensorflow_datasets.

One file's failure (a decode error, an image no record can hold, anything raised while making its record) is
that file's `Problem` in the tally, never the chunk's or the build's end: the build decides at the end, with every
problem in hand (build.py: one error naming every file, or --skip_bad and its report).

`Tally` is everything a build learns while it writes: records per split, label counts per split, the reader's
bit-depth decisions and EXIF orientations, the problems. Tallies merge (`Tally.merge`, associative and
commutative), which is how the local runner adds up its chunks and how Beam combines them (a CombineFn), so a
build's tally is the same however its work was divided.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import numpy as np

from metachex_jax.data.build import layout
from metachex_jax.data.raw.common import Problem
from metachex_jax.imaging import images

CHUNK_SIZE = 16  # records per task: few round trips, yet smooth progress and load balance


@dataclasses.dataclass(frozen=True)
class RecordSpec:
    """What a worker needs to turn a raw record into its bytes (picklable, no TFDS objects)."""

    kind: str
    resolution: int
    label_names: tuple[str, ...]  # of the dataset (a label table's own); layout.label_names picks per kind
    bit_depth: int = 0  # the reader's override for high-depth images (0: the reader's rule)
    square: bool = False  # geometry crop_resize: the centre square of each image is kept
    max_pixels: int | None = images.DEFAULT_MAX_PIXELS

    def codec(self) -> layout.RecordCodec:
        return layout.RecordCodec(layout.fields(self.kind, self.resolution, len(self.label_names)))


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Consecutive planned records of one split: record `start + i` of the split is `records[i]`."""

    split: str
    start: int
    records: tuple
    spec: RecordSpec


@dataclasses.dataclass
class Tally:
    """What a build counts while it writes (module docstring); JSON-able through to_json / from_json."""

    written: Counter = dataclasses.field(default_factory=Counter)  # split -> records written
    positives: dict[str, Counter] = dataclasses.field(default_factory=dict)  # split -> label -> records with 1
    known: dict[str, Counter] = dataclasses.field(default_factory=dict)  # split -> label -> records not -1
    bit_depths: Counter = dataclasses.field(default_factory=Counter)  # (bits, source) -> images
    orientations: Counter = dataclasses.field(default_factory=Counter)  # EXIF orientation (not 1) -> images
    problems: list[Problem] = dataclasses.field(default_factory=list)

    def merge(self, other: Tally) -> Tally:
        """A new tally holding both (neither is changed)."""
        out = Tally(self.written + other.written, _merge_counters(self.positives, other.positives),
                    _merge_counters(self.known, other.known), self.bit_depths + other.bit_depths,
                    self.orientations + other.orientations, sorted(self.problems + other.problems))
        out.written.update({split: 0 for split in (*self.written, *other.written)})  # keep splits of 0 records
        return out

    def add_record(self, split: str, example: dict[str, Any], info: images.ImageInfo, kind: str,
                   label_names: tuple[str, ...]) -> None:
        self.written[split] += 1
        self.bit_depths[info.bit_depth, info.bit_depth_source] += 1
        if info.orientation != 1:
            self.orientations[info.orientation] += 1
        names = layout.label_names(kind, label_names)
        labels = example.get("labels", ())
        positives = self.positives.setdefault(split, Counter())
        positives.update(name for name, value in zip(names, labels) if value == 1)
        positives.update(name for name in layout.counted_flags(kind) if example.get(name) == 1)
        if kind == "labelled":
            self.known.setdefault(split, Counter()).update(name for name, value in zip(names, labels) if value >= 0)

    def to_json(self) -> dict:
        return {"written": dict(self.written), "positives": {s: dict(c) for s, c in self.positives.items()},
                "known": {s: dict(c) for s, c in self.known.items()},
                "bit_depths": [[bits, source, n] for (bits, source), n in sorted(self.bit_depths.items())],
                "orientations": {str(k): n for k, n in sorted(self.orientations.items())},
                "problems": [p.as_dict() for p in sorted(self.problems)]}

    @classmethod
    def from_json(cls, data: dict) -> Tally:
        return cls(Counter(data["written"]), {s: Counter(c) for s, c in data["positives"].items()},
                   {s: Counter(c) for s, c in data["known"].items()},
                   Counter({(bits, source): n for bits, source, n in data["bit_depths"]}),
                   Counter({int(k): n for k, n in data["orientations"].items()}),
                   [Problem(**p) for p in data["problems"]])


def _merge_counters(a: dict[str, Counter], b: dict[str, Counter]) -> dict[str, Counter]:
    return {key: a.get(key, Counter()) + b.get(key, Counter()) for key in sorted({*a, *b})}


@dataclasses.dataclass
class ChunkResult:
    records: list[tuple[int, bytes]]  # (index in the split, record bytes), in index order
    tally: Tally


def check_decoded(image: np.ndarray, resolution: int | None) -> None:
    """ValueError unless the reader returned what a record holds: a uint8 gray image, R x R when resized."""
    if image.dtype != np.uint8 or image.ndim != 2 or (resolution and image.shape != (resolution, resolution)):
        size = f"{resolution} x {resolution} " if resolution else ""
        raise ValueError(f"decoded to {image.dtype} {image.shape}, not the {size}uint8 gray image a record holds")


def process_chunk(chunk: Chunk) -> ChunkResult:
    """Every record of the chunk made (or its problem recorded); see the module docstring."""
    spec, codec, tally, out = chunk.spec, chunk.spec.codec(), Tally(), []
    tally.written[chunk.split] += 0
    for offset, record in enumerate(chunk.records):
        try:
            image, info = images.load_gray_with_info(record.path, spec.resolution, bit_depth=spec.bit_depth or None,
                                                     declared_bits=getattr(record, "declared_bits", None),
                                                     square=spec.square, max_pixels=spec.max_pixels)
            check_decoded(image, spec.resolution)
            example = layout.example(spec.kind, record, image[..., None], info.bit_depth)
            data = codec.encode(example)
        except images.ImageDecodeError as exc:  # its message starts with the file's path
            tally.problems.append(Problem("undecodable_image", layout.record_name(record), str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - one file's failure is that file's problem, named with the file
            tally.problems.append(Problem("undecodable_image", layout.record_name(record),
                                          f"{record.path}: {type(exc).__name__}: {exc}"))
            continue
        tally.add_record(chunk.split, example, info, spec.kind, spec.label_names)
        out.append((chunk.start + offset, data))
    return ChunkResult(out, tally)


def chunks(split: str, records: list, spec: RecordSpec, size: int = CHUNK_SIZE) -> list[Chunk]:
    """A split's planned records cut into chunks of `size`."""
    return [Chunk(split, start, tuple(records[start:start + size]), spec) for start in range(0, len(records), size)]
