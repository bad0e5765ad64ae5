"""The local runner (`prepare --runner=local`, the default): the build's work (work.py) on a process pool of this
machine, every core by default, and the shards written here as the records arrive.

Chunks are decoded in the pool in order (a bounded window of them in flight, so memory stays bounded when writing
is slower), and each split's records go to its `shards.SplitWriter` in index order: the shards are the ones a Beam
build writes (shards.py). With one worker, or `num_workers=1`, everything runs in this process.

A worker that dies on a chunk (a decoder that crashes or spins past its CPU limit: imaging/workers.py) costs only
the file that killed it: the chunk's records are decoded again one per task in a fresh pool, and the file whose
worker dies is that file's problem in the tally, as any undecodable file.
"""

from __future__ import annotations

from tqdm import tqdm

from metachex_jax.data.build import layout, shards, work
from metachex_jax.data.raw.common import Problem
from metachex_jax.imaging import images

_CHUNKS_IN_FLIGHT_PER_WORKER = 4


def run(plan: dict[str, list], spec: work.RecordSpec, folder: str, dataset: str, per_shard: int, *,
        num_workers: int | None = None, progress: bool = True) -> tuple[list[shards.ShardInfo], work.Tally]:
    """Build every split of `plan` (split -> raw records) into `folder`; returns the shards written and the tally."""
    written, tally = [], work.Tally()
    workers = num_workers or images.default_num_workers()
    with images.decoding_pool(workers) as pool:
        for split, records in plan.items():
            writer = shards.SplitWriter(folder, dataset, split, len(records), per_shard)
            chunks = work.chunks(split, records, spec)
            results = map(work.process_chunk, chunks) if pool is None else \
                pool.map(work.process_chunk, chunks, lost=_one_by_one, chunk=1,
                         in_flight=_CHUNKS_IN_FLIGHT_PER_WORKER * workers)
            with tqdm(total=len(records), desc=f"{dataset} {split}", unit="img", disable=not progress,
                      mininterval=1.0) as bar:
                for result in results:
                    for index, data in result.records:
                        writer.add(index, data)
                    tally = tally.merge(result.tally)
                    bar.update(len(result.records) + len(result.tally.problems))
            written += writer.close()
    return written, tally


def _one_by_one(chunk: work.Chunk, reason: str) -> work.ChunkResult:
    """A worker died on `chunk` (`reason`): its records again, one per task in a fresh pool, so that only the file
    that kills a worker is lost, as that file's problem."""
    singles = [work.Chunk(chunk.split, chunk.start + i, (record,), chunk.spec) for i, record in enumerate(chunk.records)]
    out, tally = [], work.Tally()
    with images.decoding_pool(1, pool_for_one=True) as pool:
        for result in pool.map(work.process_chunk, singles, lost=_lost_record, chunk=1):
            out += result.records
            tally = tally.merge(result.tally)
    return work.ChunkResult(out, tally)


def _lost_record(single: work.Chunk, reason: str) -> work.ChunkResult:
    record = single.records[0]
    problem = Problem("undecodable_image", layout.record_name(record), f"{record.path}: cannot decode image ({reason})")
    return work.ChunkResult([], work.Tally(problems=[problem]))
