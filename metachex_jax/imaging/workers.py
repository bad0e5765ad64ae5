"""A pool of decoding processes that one file cannot break: `images.decode_many` decodes in it (`decoding_pool`).

    with WorkerPool(num_workers, cpu_limit_s=...) as pool:
        for result in pool.map(function, items, lost=lambda item, reason: ...): ...   # in order

Each worker takes a chunk of items at a time and sends each item's result as it finishes. Every item runs under a
CPU-time limit (RLIMIT_CPU, reset before each item: a loaded machine does not trip it, a decoder that spins does).
A worker that dies on an item (a decoder's segfault or abort, the out-of-memory killer, SIGXCPU past the limit) is
replaced: that item's result is `lost(item, reason)`, the rest of its chunk goes to the new worker, and the other
workers go on. (concurrent.futures' ProcessPoolExecutor, used before, breaks for good when a worker dies: every
pending file failed and the whole build or `predict` run stopped with BrokenProcessPool.)

"spawn" start method: forking a process that has imported JAX or TFDS (threads) can deadlock. As with any spawn
pool, a script that uses it needs an `if __name__ == "__main__":` guard; without one the workers die as they start,
which is reported as such (RuntimeError), not as lost files.
"""

from __future__ import annotations

import collections
import math
import multiprocessing
import multiprocessing.connection
import resource
import signal
import traceback
from collections.abc import Callable, Iterable, Iterator

DEFAULT_CPU_LIMIT_S = 300  # per file: far above any real radiograph's decode (seconds), far below forever


def _limit_cpu(seconds: int) -> None:
    """SIGXCPU once this process has used `seconds` more CPU time."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(used.ru_utime + used.ru_stime) + seconds
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _serve(conn, cpu_limit_s: int, initializer: Callable[[], None] | None) -> None:
    """A worker: ("ready",), then for each chunk (function, items): ("result", value) or ("failed", reason) per
    item, ("done",) at the end; None stops it."""
    if initializer is not None:
        initializer()
    conn.send(("ready",))
    while (task := conn.recv()) is not None:
        function, items = task
        for item in items:
            _limit_cpu(cpu_limit_s)
            try:
                conn.send(("result", function(item)))
            except Exception as exc:  # noqa: BLE001 - the item's failure, reported with it
                conn.send(("failed", "".join(traceback.format_exception_only(exc)).strip()))
        conn.send(("done",))


class _Worker:
    def __init__(self, context, cpu_limit_s: int, initializer):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, cpu_limit_s, initializer), daemon=True)
        self.process.start()
        child.close()
        self.task: tuple[int, list] | None = None  # (chunk number, its items not yet answered)
        self.ready = False

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()


def death_reason(exitcode: int | None, cpu_limit_s: int) -> str:
    if exitcode == -signal.SIGXCPU:
        return f"the decoder used more than the per-file CPU-time limit of {cpu_limit_s} s (it hangs on this file)"
    if exitcode is not None and exitcode < 0:
        return f"the decoding process died on this file ({signal.Signals(-exitcode).name}: the decoder crashed)"
    return f"the decoding process died on this file (exit code {exitcode})"


class WorkerPool:
    """See the module docstring."""

    def __init__(self, num_workers: int, *, cpu_limit_s: int = DEFAULT_CPU_LIMIT_S,
                 initializer: Callable[[], None] | None = None):
        self.num_workers = num_workers
        self.cpu_limit_s = cpu_limit_s
        self._initializer = initializer
        self._context = multiprocessing.get_context("spawn")
        self._workers = [self._start() for _ in range(num_workers)]
        self.replaced = 0  # workers that died and were replaced

    def _start(self) -> _Worker:
        return _Worker(self._context, self.cpu_limit_s, self._initializer)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Idle workers are asked to stop, busy ones (a consumer that stopped early) are killed."""
        for worker in self._workers:
            idle = worker.process.is_alive() and worker.ready and worker.task is None
            try:
                if idle:
                    worker.conn.send(None)
                    worker.process.join(10)
            except OSError:
                pass
            worker.stop()

    def map(self, function: Callable, items: Iterable, *, lost: Callable[[object, str], object],
            chunk: int = 16, in_flight: int | None = None) -> Iterator:
        """function(item) for each item, in order, computed in the workers `chunk` items at a time, with at most
        `in_flight` chunks (default 4 per worker) computed and not yet consumed; an item whose worker died gives
        lost(item, reason) instead. `function` must be importable by name (spawn)."""
        in_flight = in_flight or 4 * self.num_workers
        chunks = iter(enumerate(_chunked(items, chunk)))
        queue: collections.deque[tuple[int, list]] = collections.deque()  # chunks (or their rests) to hand out
        results: dict[int, list] = {}  # chunk number -> results so far
        sizes: dict[int, int] = {}
        next_out, exhausted = 0, False
        while True:
            while not exhausted and len(sizes) < in_flight:
                try:
                    number, items_of_chunk = next(chunks)
                except StopIteration:
                    exhausted = True
                    break
                queue.append((number, items_of_chunk))
                results[number], sizes[number] = [], len(items_of_chunk)
            while next_out in sizes and len(results[next_out]) == sizes[next_out]:
                yield from results.pop(next_out)
                del sizes[next_out]
                next_out += 1
            if exhausted and not sizes:
                return
            for worker in self._workers:
                if worker.ready and worker.task is None and queue:
                    worker.task = queue.popleft()
                    worker.conn.send((function, worker.task[1]))
            self._receive(results, queue, lost)

    def _receive(self, results: dict, queue: collections.deque, lost) -> None:
        """Wait for the workers' next messages and file them; replace a worker that died."""
        waiting = {worker.conn: worker for worker in self._workers if worker.task is not None or not worker.ready}
        for conn in multiprocessing.connection.wait(list(waiting)):
            worker = waiting[conn]
            try:
                message = conn.recv()
            except (EOFError, OSError):
                self._replace(worker, results, queue, lost)
                continue
            if message[0] == "ready":
                worker.ready = True
            elif message[0] == "done":
                worker.task = None
            else:
                number, rest = worker.task
                value = message[1] if message[0] == "result" else lost(rest[0], message[1])
                results[number].append(value)
                worker.task = (number, rest[1:])

    def _replace(self, worker: _Worker, results: dict, queue: collections.deque, lost) -> None:
        worker.process.join(10)
        if not worker.ready:
            self.close()
            raise RuntimeError("an image decoding worker died as it started; if this runs from a script, put the "
                               "work under `if __name__ == '__main__':` (spawned workers re-import the main module)")
        if worker.task is not None:
            number, rest = worker.task
            results[number].append(lost(rest[0], death_reason(worker.process.exitcode, self.cpu_limit_s)))
            if rest[1:]:
                queue.appendleft((number, rest[1:]))
        worker.stop()
        self._workers[self._workers.index(worker)] = self._start()
        self.replaced += 1


def _chunked(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
