"""Differential fuzzing of the image reader (`metachex_jax.imaging.images.read_gray`) against independent reference
decoders (`reader_cases.py`), seeded and bounded; or coverage-guided with atheris.

CI runs a short campaign (tests/test_reader_fuzz.py). Long ones print files tried and failures per format:

    nice -n 19 python tests/reader_fuzz.py --minutes 20 --seed 1 --save_failures failures
    nice -n 19 python tests/reader_fuzz.py --atheris --minutes 20 --save_failures failures

Two families of examples, each file written fresh from (seed, family, format, index), so any failure is rebuilt from
its line in the report:

- "valid": a file `reader_cases.write_case` wrote (PNG, JPEG, DICOM across colour types, depths, syntaxes and
  display attributes). The reader must return exactly the reference decoder's pixels after the documented
  conversions (within the stated bounds where two codecs may legitimately differ); a refusal is a failure.
- "corrupted": such a file truncated at a random offset, with random bytes or bits flipped, bytes inserted, deleted
  or duplicated, or with a structural change: a PNG chunk, JPEG segment or DICOM element dropped, duplicated,
  swapped or given a lying length, a PNG chunk's body changed with its CRC recomputed (so that libpng decodes it), or
  a DICOM attribute that lies (Rows, BitsStored, a window of width 0, a truncated PixelData, ...). The reader must
  refuse the file with its `ImageDecodeError` naming the file, or return what the reference returns; never an
  image where the reference reports an error.

Both families: never a crash of the process, never a hang, never another exception, the file's format and size
reported right, and the same file through `decode_many` at a resolution (the build and predict path) gives an image
or an error naming the file. Every example runs in a worker process with a CPU-time limit per file (RLIMIT_CPU, so a
loaded machine does not make it fail) and a memory limit (RLIMIT_AS), so that a crash or a hang is seen, reported
(with the phase: reader or reference) and the worker replaced. A reference decoder that crashes or hangs (GDCM
aborts on some files) is counted, not a failure of the reader.

With --atheris (`pip install -e ".[fuzz]"`), libFuzzer mutates a corpus of valid files (100 per format, written as
above), guided by the coverage of the reader's Python code and pydicom's, Pillow's and pypng's, and every input is
judged the same way: see `reader_atheris.py`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import multiprocessing
import os
import resource
import signal
import struct
import sys
import tempfile
import time
import zlib

import numpy as np

import reader_cases
from metachex_jax.imaging import images
from reader_cases import FORMATS, PNG_SIGNATURE, Refused

FAMILIES = ("valid", "corrupted")
READER = "metachex_jax.imaging.images:read_gray"
RESOLUTION = 8  # the decode_many check


# ---------------------------------------------------------------------------------------------------------------
# Mutations.

def png_units(data: bytes) -> list[tuple[int, int]]:
    return [(start, end) for start, end, _ in reader_cases.png_chunks(data)]


def fix_png_crcs(data: bytes) -> bytes:
    """Every complete chunk's CRC recomputed (so a change reaches the decoder instead of the CRC check)."""
    out = bytearray(data)
    for start, end, kind in reader_cases.png_chunks(data):
        if end - start >= 12:
            out[end - 4:end] = struct.pack(">I", zlib.crc32(bytes(out[start + 4:end - 4])))
    return bytes(out)


def jpeg_units(data: bytes) -> list[tuple[int, int]]:
    """SOI, each marker segment (a scan's segment with its entropy-coded data), EOI."""
    units, pos = [(0, 2)], 2
    while pos + 2 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xD9 or pos + 4 > len(data):
            units.append((pos, min(pos + 2, len(data))))
            break
        end = pos + 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker == 0xDA:
            following = end
            while following + 1 < len(data) and not (data[following] == 0xFF and data[following + 1] not in (
                    0x00, *range(0xD0, 0xD8), 0xFF)):
                following += 1
            end = following
        units.append((pos, min(end, len(data))))
        pos = end
    return units


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UR", b"UT", b"UN", b"SV", b"UV"}


def dicom_units(data: bytes) -> list[tuple[int, int, int, int]]:
    """(start, end, length field offset, its size) of the top-level elements of a DICOM file, walked simply (file
    meta explicit little endian; the dataset implicit or explicit little endian)."""
    pos = 132 if data[128:132] == b"DICM" else 0
    implicit = None
    units = []
    while pos + 8 <= len(data):
        group = struct.unpack("<H", data[pos:pos + 2])[0]
        vr = data[pos + 4:pos + 6]
        explicit = group == 0x0002 or (implicit is False) or (implicit is None and vr.isalpha() and vr.isupper())
        if group != 0x0002 and implicit is None:
            implicit = not explicit
        if explicit and vr in _LONG_VRS:
            field, size = pos + 8, 4
        elif explicit:
            field, size = pos + 6, 2
        else:
            field, size = pos + 4, 4
        if field + size > len(data):
            break
        length = int.from_bytes(data[field:field + size], "little")
        start_value = field + size
        if length == 0xFFFFFFFF:
            delimiter = data.find(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", start_value)
            end = len(data) if delimiter < 0 else delimiter + 8
        else:
            end = min(start_value + length, len(data))
        units.append((pos, end, field, size))
        pos = end
    return units


def _structure_mutation(rng, data: bytes, fmt: str) -> tuple[bytes, str]:
    """Drop, duplicate or swap a structural unit (PNG chunk, JPEG segment, DICOM element), or make its length lie."""
    if fmt == "png":
        units = [(a, b, a, 4) for a, b in png_units(data)]
    elif fmt == "jpeg":
        units = [(a, b, a + 2, 2) for a, b in jpeg_units(data) if b - a >= 4]
    else:
        units = dicom_units(data)
    if len(units) < 2:
        return data[:len(data) // 2], "half of a file without units"
    k = int(rng.integers(len(units)))
    start, end, field, size = units[k]
    kind = str(rng.choice(["drop", "duplicate", "swap", "lie"]))
    if kind == "drop":
        out = data[:start] + data[end:]
    elif kind == "duplicate":
        out = data[:end] + data[start:end] + data[end:]
    elif kind == "swap" and k + 1 < len(units):
        after = units[k + 1][1]
        out = data[:start] + data[end:after] + data[start:end] + data[after:]
    else:
        kind = "lie"
        old = int.from_bytes(data[field:field + size], "big" if fmt != "dicom" else "little")
        new = int(rng.choice([0, 1, old + 1, max(0, old - 1), old * 2, 2 ** (8 * size) - 1, 2 ** (8 * size - 1)]))
        new %= 2 ** (8 * size)
        out = data[:field] + new.to_bytes(size, "big" if fmt != "dicom" else "little") + data[field + size:]
        return out, f"unit {k} ({start}-{end}) length {old} -> {new}"
    return out, f"unit {k} ({start}-{end}) {kind}"


def mutate(rng, data: bytes, fmt: str) -> tuple[bytes, str]:
    """One corruption of a valid file (see the module docstring)."""
    kind = str(rng.choice(["truncate", "flip", "bit", "insert", "delete", "duplicate", "structure", "structure",
                           "rewrite"]))
    n = len(data)
    if kind == "truncate":
        cut = int(rng.integers(0, n)) if rng.random() < 0.5 else n - int(rng.integers(1, min(n, 64) + 1))
        return data[:cut], f"truncated to {cut} of {n} bytes"
    if kind in ("flip", "bit"):
        out = bytearray(data)
        positions = sorted({int(p) for p in rng.integers(0, n, int(rng.integers(1, 5)) if kind == "flip" else 1)})
        for p in positions:
            out[p] ^= int(rng.integers(1, 256)) if kind == "flip" else 1 << int(rng.integers(8))
        return bytes(out), f"{kind} at {positions}"
    at, size = int(rng.integers(0, n + 1)), int(rng.integers(1, 33))
    if kind == "insert":
        return data[:at] + rng.bytes(size) + data[at:], f"{size} random bytes inserted at {at}"
    if kind == "delete":
        return data[:at] + data[at + size:], f"{size} bytes deleted at {at}"
    if kind == "duplicate":
        to = int(rng.integers(0, n + 1))
        return data[:to] + data[at:at + size] + data[to:], f"{size} bytes from {at} duplicated at {to}"
    if kind == "structure":
        out, how = _structure_mutation(rng, data, fmt)
        if fmt == "png" and rng.random() < 0.5:
            out, how = fix_png_crcs(out), how + ", CRCs recomputed"
        return out, how
    # "rewrite": bytes inside one unit changed, the file otherwise consistent (PNG: CRC recomputed)
    units = {"png": png_units, "jpeg": jpeg_units}.get(fmt, lambda d: [u[:2] for u in dicom_units(d)])(data)
    start, end = units[int(rng.integers(len(units)))] if units else (0, n)
    out = bytearray(data)
    positions = sorted({int(p) for p in rng.integers(start, max(start + 1, end), int(rng.integers(1, 4)))})
    for p in positions:
        if p < n:
            out[p] = int(rng.integers(0, 256))
    out = bytes(out)
    return (fix_png_crcs(out) if fmt == "png" else out), f"bytes {positions} rewritten inside unit {start}-{end}"


@dataclasses.dataclass
class Example:
    family: str
    format: str
    description: str
    data: bytes


def example(seed: int, family: str, fmt: str, index: int) -> Example:
    rng = np.random.default_rng([seed, FAMILIES.index(family), FORMATS.index(fmt), index])
    lie = family == "corrupted" and fmt == "dicom" and rng.random() < 0.3
    case = reader_cases.write_case(fmt, rng, lie=lie)
    if family == "valid" or lie:
        return Example(family, fmt, case.description, case.data)
    data, how = mutate(rng, case.data, fmt)
    return Example(family, fmt, f"{case.description}; {how}", data)


# ---------------------------------------------------------------------------------------------------------------
# The judge.

def content_format(data: bytes) -> str:
    """The format the reader must report for a file the reference reads."""
    return "png" if data.startswith(PNG_SIGNATURE) else "jpeg" if data.startswith(b"\xff\xd8") else "dicom"


def judge(data: bytes, path: str, family: str, reader, send=lambda message: None) -> tuple[str, str]:
    """(outcome, detail) for the file `path` holding `data`; outcomes in OUTCOMES."""
    with open(path, "wb") as f:
        f.write(data)
    send(("phase", "reader"))
    try:
        got, info = reader(path)
        error = None
    except Exception as exc:  # noqa: BLE001 - sorted out below
        if type(exc).__name__ != "ImageDecodeError":
            return "unexpected_exception", f"{type(exc).__name__}: {exc}"[:300]
        got, info, error = None, None, str(exc)
    if error is not None:
        if not error.startswith(path):
            return "unnamed_file", error[:300]
        if "MemoryError" in error:
            return "memory", error[:300]
    send(("phase", "reference"))
    try:
        expected, refusal = reader_cases.reference(data, path), None
    except Refused as exc:
        expected, refusal = None, exc
    outcome, detail = _compare(family, got, info, error, expected, refusal, path)
    if outcome in SUCCESSES:
        send(("phase", "reader"))
        problem = _check_decode_many(path, got)
        if problem:
            return "decode_many", problem
    return outcome, detail


def _compare(family: str, got, info, error, expected, refusal, path: str) -> tuple[str, str]:
    """The reader's result against the reference's."""
    if error is not None:
        if family == "valid" and refusal is None:
            return "refused_valid", error[len(path):][:300]
        return "refused", ""
    # On a damaged file, another codec's refusal or result decides nothing (`reader_cases.Expected.codec`).
    undecided = family == "corrupted" and (refusal.codec if refusal is not None else expected.codec)
    if refusal is not None:
        if family == "valid":
            return "reference_refused_valid", str(refusal)[:300]
        return ("unchecked" if undecided else "loaded_where_reference_refuses"), str(refusal)[:300]
    if got.shape != expected.low.shape:
        return ("unchecked" if undecided else "differs"), f"shape {got.shape} != {expected.low.shape}"
    outside = (got < expected.low) | (got > expected.high)
    if outside.any():
        where = tuple(int(i[0]) for i in np.nonzero(outside))
        return ("unchecked" if undecided else "differs"), (
            f"{int(outside.sum())} of {got.size} pixels, e.g. at {where}: {got[where]} not in "
            f"[{expected.low[where]}, {expected.high[where]}] ({expected.note})")
    if (info.format, info.width, info.height) != (expected.format, got.shape[1], got.shape[0]):
        return "wrong_info", f"{info} for a {expected.format} of {got.shape[1]} x {got.shape[0]}"
    return "read", ""


def _check_decode_many(path: str, full) -> str | None:
    """The build / predict path: an image of the right size, or an error naming the file; never an exception."""
    try:
        for square in (False, True):
            ((image, error),) = list(images.decode_many([path], RESOLUTION, square=square, progress=False))
            if error is not None and not error.startswith(path):
                return f"decode_many error without the file's name: {error[:200]}"
            if full is not None and (error is not None or image.shape != (RESOLUTION, RESOLUTION)):
                return f"decode_many gives {error or image.shape} for a file read_gray reads"
    except Exception as exc:  # noqa: BLE001
        return f"decode_many raised {type(exc).__name__}: {exc}"[:300]
    return None


# Outcomes that are not failures of the reader: a file read right, refused with a clear error, a damaged file read
# where only another codec could judge it (`reader_cases.Expected.codec`), or one the reference decoder itself
# crashed or spun on.
SUCCESSES = ("read", "refused", "unchecked", "reference_crash", "reference_hang")


# ---------------------------------------------------------------------------------------------------------------
# The worker: one example at a time; tells the parent which phase it is in, so that a crash is attributed.

def _load(reader_name: str):
    module_name, function_name = reader_name.split(":")
    module = __import__(module_name, fromlist=[function_name])
    return getattr(module, function_name)


def _limit_cpu(seconds: int) -> None:
    """SIGXCPU once this process has used `seconds` more CPU time."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(used.ru_utime + used.ru_stime) + seconds
    resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.getrlimit(resource.RLIMIT_CPU)[1]))


def _worker(conn, seed: int, reader_name: str, cpu_limit_s: int, memory_limit: int, directory: str):
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    reader = _load(reader_name)
    path = os.path.join(directory, f"worker-{os.getpid()}")
    conn.send(("ready", ""))
    while (job := _next_job(conn)) is not None:
        _limit_cpu(cpu_limit_s)
        if job[0] == "bytes":  # an input found by atheris, judged again
            data, family = job[1], "corrupted"
        else:
            family, fmt, index = job
            try:
                data = example(seed, family, fmt, index).data
            except Exception as exc:  # noqa: BLE001 - a defect of the case writers, reported as such
                conn.send(("verdict", "writer_error", f"{type(exc).__name__}: {exc}"[:300]))
                continue
        conn.send(("verdict", *judge(data, path, family, reader, conn.send)))


def _next_job(conn):
    try:
        return conn.recv()
    except EOFError:  # the parent is gone
        return None


class Worker:
    def __init__(self, context, seed: int, reader: str, cpu_limit_s: int, memory_limit: int, directory: str):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, daemon=True,
                                       args=(child, seed, reader, cpu_limit_s, memory_limit, directory))
        self.process.start()
        child.close()
        if not self.conn.poll(300) or self.conn.recv()[0] != "ready":
            raise RuntimeError("the fuzz worker did not start")

    def run(self, job, backstop_s: float) -> tuple[str, str]:
        """(outcome, detail); a dead or spinning worker is reported by phase (and must then be replaced)."""
        self.conn.send(job)
        phase = "reader"
        while True:
            try:
                if not self.conn.poll(backstop_s):
                    self.stop()
                    return ("hang" if phase == "reader" else "reference_hang"), f"no answer in {backstop_s} s"
                message = self.conn.recv()
            except (EOFError, OSError):
                self.process.join(10)
                code = self.process.exitcode
                over = code == -signal.SIGXCPU
                kind = "hang" if over else "crash"
                detail = "over its CPU-time limit" if over else f"exit code {code}"
                return (kind if phase == "reader" else f"reference_{kind}"), f"{detail} ({phase})"
            if message[0] == "phase":
                phase = message[1]
            else:
                return message[1], message[2]

    def stop(self):
        self.process.kill()
        self.process.join(10)


# ---------------------------------------------------------------------------------------------------------------
# The campaign.

@dataclasses.dataclass
class Report:
    counts: dict[str, collections.Counter]  # per format: "tried", "<family> tried", each outcome
    failures: list[str]
    seconds: float

    def failed(self, fmt: str) -> int:
        return sum(n for k, n in self.counts[fmt].items() if k in OUTCOMES and k not in SUCCESSES)

    def summary(self) -> str:
        lines = []
        for fmt, counts in self.counts.items():
            details = ", ".join(f"{k} {n}" for k, n in sorted(counts.items()) if k != "tried")
            lines.append(f"{fmt}: {counts['tried']} files tried, {self.failed(fmt)} failures; {details}")
        return "\n".join(lines) + f"\n{self.seconds:.0f} s"


FRESH_WORKER = ("hang", "crash", "reference_hang", "reference_crash", "memory", "writer_error")  # replaced after
OUTCOMES = ("read", "refused", "unchecked", "reference_crash", "reference_hang", "differs",
            "loaded_where_reference_refuses",
            "refused_valid", "reference_refused_valid", "unnamed_file", "unexpected_exception", "memory",
            "wrong_info", "decode_many", "crash", "hang", "writer_error")


def _quiet_environment() -> dict:
    return {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run_campaign(seed: int, examples: int, formats=FORMATS, families=FAMILIES, reader: str = READER,
                 cpu_limit_s: int = 5, memory_limit: int = 2 << 30, backstop_s: float = 300,
                 save_failures: str | None = None, progress_every: int = 0,
                 max_seconds: float | None = None) -> Report:
    """Examples #0 .. #examples-1 of each family and format (taken in turn) in a worker process; with
    `max_seconds`, it stops after the round that exceeds it."""
    start = time.time()
    context = multiprocessing.get_context("spawn")
    counts = {fmt: collections.Counter() for fmt in formats}
    failures: list[str] = []
    old_env = {k: os.environ.get(k) for k in _quiet_environment()}
    os.environ.update(_quiet_environment())
    worker = None
    try:
        with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as directory:
            for index in range(examples):
                for family in families:
                    for fmt in formats:
                        for attempt in range(2):
                            worker = worker or Worker(context, seed, reader, cpu_limit_s, memory_limit, directory)
                            outcome, detail = worker.run((family, fmt, index), backstop_s)
                            if outcome in FRESH_WORKER:
                                worker.stop()
                                worker = None
                            if outcome not in ("memory", "writer_error"):
                                break  # (those two: once more in a fresh worker, whose memory no file before used)
                        counts[fmt].update(["tried", f"{family} tried", outcome])
                        if outcome not in SUCCESSES:
                            ex = None if outcome == "writer_error" else example(seed, family, fmt, index)
                            failures.append(f"{fmt} {family} #{index} (seed {seed}): {outcome}: {detail} "
                                            f"[{ex.description if ex else ''}]")
                            if ex is not None:
                                _save(save_failures, f"{fmt}-{family}-{seed}-{index}", ex.data)
                if progress_every and (index + 1) % progress_every == 0:
                    print(Report(counts, failures, time.time() - start).summary(), flush=True)
                if max_seconds is not None and time.time() - start > max_seconds:
                    break
            if worker is not None:
                worker.conn.send(None)
                worker.process.join(10)
    finally:
        if worker is not None:
            worker.stop()
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Report(counts, failures, time.time() - start)


def _save(folder: str | None, name: str, data: bytes) -> None:
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1_000_000, help="examples per family and format")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long (counts say how far)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--save_failures", default=None, help="a folder for the failing files")
    parser.add_argument("--atheris", action="store_true", help="coverage-guided (atheris) instead of seeded")
    args = parser.parse_args(argv)
    max_seconds = None if args.minutes is None else 60 * args.minutes
    if args.atheris:
        import reader_atheris  # optional: needs atheris

        report = reader_atheris.run(args.seed, max_seconds or 600, tuple(args.formats.split(",")),
                                    args.save_failures)
    else:
        report = run_campaign(args.seed, args.examples, tuple(args.formats.split(",")),
                              tuple(args.families.split(",")), save_failures=args.save_failures,
                              progress_every=200, max_seconds=max_seconds)
    print(report.summary())
    for failure in report.failures[:50]:
        print(failure)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
