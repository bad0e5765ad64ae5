"""The local runner (`prepare --runner=local`, the default): the build's work (work.py) on a process pool of this
machine, every core by default, and the shards written here as the records arrive.

Chunks are decoded in the pool in order (a bounded window of them in flight, so memory stays bounded when writing
is slower), and each split's records go to its `shards.SplitWriter` in index order: the shards are the ones a Beam
build writes (shards.py). With one worker, or `num_workers=1`, everything runs in this process.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from tqdm import tqdm

from metachex_jax.data.build import shards, work
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
                _ordered_bounded_map(pool, work.process_chunk, chunks, _CHUNKS_IN_FLIGHT_PER_WORKER * workers)
            with tqdm(total=len(records), desc=f"{dataset} {split}", unit="img", disable=not progress,
                      mininterval=1.0) as bar:
                for result in results:
                    for index, data in result.records:
                        writer.add(index, data)
                    tally = tally.merge(result.tally)
                    bar.update(len(result.records) + len(result.tally.problems))
            written += writer.close()
    return written, tally


def _ordered_bounded_map(pool: ProcessPoolExecutor, fn, items: list, in_flight: int) -> Iterator:
    """pool.map, but with at most `in_flight` tasks submitted and not yet consumed."""
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as exc:
        raise RuntimeError("a decoding worker died (a decoder crashed, or the machine ran out of memory); if this "
                           "runs from a script, put the work under `if __name__ == '__main__':` (spawned workers "
                           "re-import the main module). Find a crashing file with prepare --verify") from exc
