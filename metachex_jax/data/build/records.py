"""Reading a prepared dataset: `RecordSource`, random access to the records of one or several splits of a PUBLISHED
build (publish.py), whichever runner wrote it (the local process pool or Beam).

    source = RecordSource.open(version_dir, "train")      # or "train+validation+test": the splits in that order
    len(source), source[i]                                 # dict: layout.RecordCodec.decode
    source.dataset_info.data_dir                           # the build's folder (skip report, label counts)
    source.dataset_info.metadata["label_names"]            # a label table's names

`builders.data_source(dataset, split, data_dir, ...)` finds the build of the current builder version and returns
this. A record is read by its offset in its shard (ArrayRecord's index, one riegeli chunk per record) and decoded
with numpy and struct only: no protobuf, no TFDS. Builds made before builders 2.0.0 (tf.Example records, read by
`tfds.data_source`) are not read: a run never reads an older VERSION's folder (builders.py: Versions) and names the
command that rebuilds it.

Picklable (grain's worker processes reopen the shard files), and safe to share between threads (each shard's
reader is used under a lock: ArrayRecord's seek + read, the fastest random access, has a position).
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

from array_record.python import array_record_module

from metachex_jax.core import files
from metachex_jax.data.build import layout, publish

READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # random access (ArrayRecord's own advice)


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    """What a reader knows of the build (from its dataset_info.json)."""

    name: str  # the dataset
    config_name: str
    version: str
    data_dir: str  # the build's folder: shards, skip_report.json, label_counts.json
    metadata: dict  # {"label_names": [...]} for a label table; {} otherwise
    geometry: str  # "resize_crop" (whole image resized) or "crop_resize" (centre square kept)
    info: dict  # the whole dataset_info.json


class RecordSource:
    """A random-access source over splits of one published build (module docstring)."""

    def __init__(self, info: BuildInfo, split: str, paths: Sequence[str], lengths: Sequence[int],
                 codec: layout.RecordCodec):
        self.dataset_info, self.split, self.codec = info, split, codec
        self._paths = list(paths)
        self._ends = [int(sum(lengths[:i + 1])) for i in range(len(lengths))]
        self._readers: list = [None] * len(self._paths)
        self._locks = [threading.Lock() for _ in self._paths]

    @classmethod
    def open(cls, version_dir: str, split: str) -> RecordSource:
        """The splits `split` ("train", or "train+validation+test") of the build published in `version_dir`."""
        info = publish.read_info(version_dir)
        if info is None:
            raise FileNotFoundError(f"no published build in {version_dir} (no {publish.INFO_FILE})")
        if info.get("format") != publish.FORMAT:
            raise ValueError(f"{version_dir} holds no build of this format ({info.get('format')!r}, expected "
                             f"{publish.FORMAT!r}); rebuild it with python -m metachex_jax.prepare")
        folder = publish.build_folder(version_dir, info)
        paths, lengths = [], []
        for name in split.split("+"):
            if name not in info["splits"]:
                raise ValueError(f"split {name!r} is not in {version_dir}; its splits: {sorted(info['splits'])}")
            for shard in info["splits"][name]["shards"]:
                paths.append(files.join(folder, shard["file"]))
                lengths.append(shard["num_records"])
        build = BuildInfo(info["dataset"], info["config"], info["version"], folder,
                          {"label_names": info["label_names"]} if info["kind"] == "labelled" else {},
                          info["geometry"], info)
        return cls(build, split, paths, lengths, layout.RecordCodec.from_json(info["record_layout"]))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def raw(self, index: int) -> bytes:
        """Record `index`'s bytes."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of a source of {len(self)}")
        shard = bisect.bisect_right(self._ends, index)
        position = index - (self._ends[shard - 1] if shard else 0)
        with self._locks[shard]:
            reader = self._readers[shard]
            if reader is None:
                reader = self._readers[shard] = array_record_module.ArrayRecordReader(self._paths[shard],
                                                                                      READER_OPTIONS)
            reader.seek(position)
            return reader.read()

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.codec.decode(self.raw(int(index)))

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self[i] for i in indices]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_readers"], state["_locks"] = [None] * len(self._paths), None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._locks = [threading.Lock() for _ in self._paths]

    def __repr__(self) -> str:
        info = self.dataset_info
        return f"RecordSource({info.name}/{info.config_name} {info.version}, split={self.split!r}, {len(self)} records)"
