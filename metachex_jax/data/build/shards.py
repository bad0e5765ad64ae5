"""Shards: which file of a split holds which record, and the one writer of shard files (every runner uses it).

Shards are fixed before any image is read, from each record's position in its split's plan: record i of a split
is in shard i // records_per_shard. So a local build and a Beam build cut a split at the same places, and a shard
is written by one worker that has all of its records (sorted by index). A shard whose records were all skipped
(--skip_bad) has no file; the build's info lists the files that exist.

    <dataset>-<split>.array_record-<k>-of-<n>   (k, n: five digits, n the planned shards of the split)

Files are ArrayRecord, one record per chunk ("group_size:1"), uncompressed: each record is read by its own offset
and carries riegeli's chunk hash; the build's info also holds each file's SHA-256 (check.py verifies both). ArrayRecord's writer opens local files only, so a shard
for gs:// is written to a local temporary file and uploaded when complete (through etils.epath); a local shard is
written next to its final name and renamed into place. Either way a shard file is whole or absent, and writing it
again (a retried Beam task) gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile

from array_record.python import array_record_module
from etils import epath

from metachex_jax.core import files

WRITER_OPTIONS = "group_size:1,uncompressed"
SHARD_BYTES = 128 << 20  # aim of a shard's size: a worker holds one shard's records to sort them


def records_per_shard(record_bytes: int, target_bytes: int = SHARD_BYTES) -> int:
    return max(1, target_bytes // max(1, record_bytes))


def num_shards(num_records: int, per_shard: int) -> int:
    return max(1, -(-num_records // per_shard))


def shard_name(dataset: str, split: str, shard: int, total: int) -> str:
    return f"{dataset}-{split}.array_record-{shard:05d}-of-{total:05d}"


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    split: str
    shard: int
    file: str  # name inside the build folder
    num_records: int
    num_bytes: int  # record bytes (not the file's size)
    sha256: str  # of the whole file, as written (check.py compares it)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def write_shard(folder: str, name: str, split: str, shard: int, records: list[tuple[int, bytes]]) -> ShardInfo:
    """Write `records` ((index, bytes), any order) sorted by index as `folder/name`; see the module docstring."""
    records = sorted(records, key=lambda item: item[0])
    indices = [index for index, _ in records]
    if len(set(indices)) != len(indices):
        raise ValueError(f"shard {name}: a record index appears twice")
    target = files.join(folder, name)
    if files.is_url(folder):
        fd, local = tempfile.mkstemp(prefix=".shard-", suffix=".array_record")
        os.close(fd)
    else:
        os.makedirs(folder, exist_ok=True)
        local = os.path.join(folder, f".{name}.writing")
    try:
        writer = array_record_module.ArrayRecordWriter(local, WRITER_OPTIONS)
        for _, data in records:
            writer.write(data)
        writer.close()
        digest = _sha256(local)
        if files.is_url(folder):
            epath.Path(local).copy(epath.Path(target), overwrite=True)  # one upload of the complete file
        else:
            os.replace(local, target)
    finally:
        if os.path.exists(local):
            os.remove(local)
    return ShardInfo(split, shard, name, len(records), sum(len(data) for _, data in records), digest)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class SplitWriter:
    """Records of one split arriving in index order (the local runner) -> its shard files, one at a time."""

    def __init__(self, folder: str, dataset: str, split: str, num_records: int, per_shard: int):
        self.folder, self.dataset, self.split, self.per_shard = folder, dataset, split, per_shard
        self.total = num_shards(num_records, per_shard)
        self.shards: list[ShardInfo] = []
        self._current: int | None = None
        self._pending: list[tuple[int, bytes]] = []

    def add(self, index: int, data: bytes) -> None:
        shard = index // self.per_shard
        if shard != self._current:
            self._flush()
            self._current = shard
        self._pending.append((index, data))

    def close(self) -> list[ShardInfo]:
        self._flush()
        return self.shards

    def _flush(self) -> None:
        if self._pending:
            name = shard_name(self.dataset, self.split, self._current, self.total)
            self.shards.append(write_shard(self.folder, name, self.split, self._current, self._pending))
        self._pending = []
