"""`prepare --check_built`: a scrub of a published build. Every shard, in parallel (a process per core):

1. the file's SHA-256 against the one its build recorded (any changed byte, records, index or padding alike);
2. the file opens, its index (ArrayRecord's footer) reads, and it holds the number of records the build wrote;
   otherwise the WHOLE shard is damaged (its records cannot be found);
3. every record is read by its offset, which checks riegeli's hashes of its chunk (header and data), and decoded
   with the build's record layout (layout.py): a record that fails either is damaged, named by split and index.

A shard whose hash differs but whose records all read and decode is reported too, as changed outside its records.
Runs in the check's worker processes: imports neither jax nor tensorflow_datasets.
"""

from __future__ import annotations

import dataclasses
import hashlib

from array_record.python import array_record_module
from etils import epath
from tqdm import tqdm

from metachex_jax.core import files
from metachex_jax.data.build import layout, publish
from metachex_jax.data.build.records import READER_OPTIONS
from metachex_jax.imaging import images


@dataclasses.dataclass(frozen=True)
class Damage:
    split: str
    shard: str  # the file
    index: int | None  # the record's index in its split; None: the whole shard
    detail: str

    def format(self) -> str:
        where = f"{self.split} record {self.index}" if self.index is not None else f"{self.split}: WHOLE SHARD"
        return f"  [{where}] {self.shard}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class _ShardTask:
    path: str
    name: str
    split: str
    first_index: int  # of its first record in the split
    num_records: int
    sha256: str
    record_layout: list


@dataclasses.dataclass
class CheckReport:
    build: str  # the build's folder
    records: dict[str, int]  # split -> records checked
    damaged: list[Damage]

    @property
    def ok(self) -> bool:
        return not self.damaged

    def format(self) -> str:
        lines = [f"{self.build}: {sum(self.records.values()):,} records in "
                 + ", ".join(f"{split} {n:,}" for split, n in self.records.items())]
        if self.ok:
            lines.append("  every shard's hash, index and record read and decoded: no damage found")
        else:
            shards = {d.shard for d in self.damaged}
            lines.append(f"  DAMAGED: {len(self.damaged)} finding(s) in {len(shards)} shard(s) (rebuild with "
                         "prepare --overwrite):")
            lines += [d.format() for d in self.damaged]
        return "\n".join(lines)


def _lost_shard(task: _ShardTask, reason: str) -> list[Damage]:
    """A checking worker died on this shard (imaging/workers.py): the whole shard is reported."""
    return [Damage(task.split, task.name, None, f"its check's worker died ({reason})")]


def check_shard(task: _ShardTask) -> list[Damage]:
    """Every finding in one shard (module docstring)."""
    def whole(detail: str) -> list[Damage]:
        return [Damage(task.split, task.name, None, detail)]

    if not epath.Path(task.path).exists():
        return whole("the file is missing")
    digest = _sha256(task.path)
    try:
        reader = array_record_module.ArrayRecordReader(task.path, READER_OPTIONS)
    except Exception as exc:  # noqa: BLE001 - the reader raises RuntimeError, ValueError, ... for a bad file
        return whole(f"cannot be opened: {exc}")
    if not reader.ok() or reader.num_records() != task.num_records:
        found = reader.num_records() if reader.ok() else "no"
        return whole(f"its index (footer) is damaged: {found} records found, the build wrote {task.num_records}"
                     + _closing_error(reader))
    codec = layout.RecordCodec.from_json(task.record_layout)
    damaged = []
    for position in range(task.num_records):
        try:
            reader.seek(position)
            codec.decode(reader.read())
        except Exception as exc:  # noqa: BLE001 - a hash mismatch (RuntimeError) or a record that does not decode
            damaged.append(Damage(task.split, task.name, task.first_index + position, f"{type(exc).__name__}: "
                                                                                      f"{exc}"))
            _closing_error(reader)  # riegeli's reader stays failed after an error: the next records get a new one
            reader = array_record_module.ArrayRecordReader(task.path, READER_OPTIONS)
    closing = _closing_error(reader)
    if closing:
        damaged.append(Damage(task.split, task.name, None, "the file ends badly" + closing))
    if digest != task.sha256 and not damaged:
        damaged.append(Damage(task.split, task.name, None, "the file's SHA-256 differs from the one its build "
                                                           "recorded, although every record reads and decodes: bytes "
                                                           "changed outside the records"))
    return damaged


def _closing_error(reader) -> str:
    try:
        reader.close()
    except Exception as exc:  # noqa: BLE001
        return f" ({exc})"
    return ""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_build(version_dir: str, *, num_workers: int | None = None, progress: bool = True) -> CheckReport:
    """Scrub the build published in `version_dir` (module docstring)."""
    info = publish.read_info(version_dir)
    if info is None:
        raise FileNotFoundError(f"no published build in {version_dir} (no {publish.INFO_FILE})")
    folder = publish.build_folder(version_dir, info)
    tasks, records = [], {}
    for split, entry in info["splits"].items():
        first = 0
        for shard in entry["shards"]:
            tasks.append(_ShardTask(files.join(folder, shard["file"]), shard["file"], split, first,
                                    shard["num_records"], shard["sha256"], info["record_layout"]))
            first += shard["num_records"]
        records[split] = first
    damaged = []
    with images.decoding_pool(num_workers) as pool:
        results = map(check_shard, tasks) if pool is None else pool.map(check_shard, tasks, lost=_lost_shard,
                                                                                      chunk=1)
        for found in tqdm(results, total=len(tasks), desc="checking shards", unit="shard", disable=not progress):
            damaged += found
    order = {split: i for i, split in enumerate(info["splits"])}
    damaged.sort(key=lambda d: (order[d.split], d.shard, -1 if d.index is None else d.index))
    return CheckReport(folder, records, damaged)
