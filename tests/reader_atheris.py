"""Coverage-guided fuzzing of the image reader with atheris (libFuzzer), judged as the seeded campaign judges
(`reader_fuzz.judge`): `python tests/reader_fuzz.py --atheris --minutes 20` (atheris: `pip install atheris`).

libFuzzer mutates a corpus of valid files (written by `reader_cases`, as the seeded campaign's "valid" family),
guided by the coverage of the reader's Python code and of pydicom's, Pillow's and pypng's, which run in the fuzzing
process (`_fuzz_one`: the reader on each input, its errors caught). A custom mutator recomputes a PNG's CRCs half of
the time (so that changes reach libpng). Every input is judged in a `reader_fuzz.Worker` process (CPU-time and memory
limits; a reference decoder that crashes there costs that worker only). Failures are counted and saved, not raised,
so the campaign goes on. An input that crashes the fuzzing process itself or passes libFuzzer's time or memory limit
ends it: the parent judges that input in a worker (to say whose crash it was), counts it, and starts libFuzzer again
on the grown corpus until the time is spent.
"""

from __future__ import annotations

import collections
import glob
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

import atheris  # optional (`pip install atheris`): only this command imports this module
import numpy as np

# The reader's modules and the libraries it calls are instrumented for coverage when they are first imported, which
# is here in the fuzzing process (this file run as a script); in a process that imported them before, nothing is.
with atheris.instrument_imports(include=["metachex_jax", "pydicom", "PIL", "png"]):
    import reader_fuzz
    from metachex_jax.imaging import images

CORPUS_PER_FORMAT = 100
STATS = "stats-{}.json"


def run(seed: int, max_seconds: float, formats: tuple[str, ...], save_failures: str | None) -> reader_fuzz.Report:
    """The campaign (see the module docstring): files tried and failures per format."""
    start = time.time()
    counts = {fmt: collections.Counter() for fmt in formats}
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as work:
        corpus, artifacts = os.path.join(work, "corpus"), os.path.join(work, "artifacts")
        failure_folder = save_failures or os.path.join(work, "failures")
        for folder in (corpus, artifacts, failure_folder):
            os.makedirs(folder, exist_ok=True)
        for fmt in formats:
            for index in range(CORPUS_PER_FORMAT):
                with open(os.path.join(corpus, f"{fmt}-{index}"), "wb") as f:
                    f.write(reader_fuzz.example(seed, "valid", fmt, index).data)
        runs = 0
        while (left := max_seconds - (time.time() - start)) > 30:
            stats = os.path.join(work, STATS.format(runs))
            subprocess.run([sys.executable, __file__, corpus, stats, failure_folder, f"-max_total_time={int(left)}",
                            f"-artifact_prefix={artifacts}/", "-timeout=60", "-rss_limit_mb=4096",
                            f"-seed={seed * 1000 + runs}", "-print_final_stats=1"],
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, check=False)
            _merge(stats, counts, failures, formats)
            for path in sorted(glob.glob(os.path.join(artifacts, "*"))):
                if not os.path.basename(path).startswith("slow-unit-"):  # (slow units were judged as they ran)
                    _judge_artifact(path, counts, failures, formats, failure_folder)  # the input that ended it
                os.remove(path)
            runs += 1
    return reader_fuzz.Report(counts, failures, time.time() - start)


def _merge(stats: str, counts: dict, failures: list, formats) -> None:
    if not os.path.exists(stats):
        return
    with open(stats) as f:
        saved = json.load(f)
    for fmt, outcomes in saved["counts"].items():
        if fmt in counts:
            counts[fmt].update(outcomes)
    failures.extend(saved["failures"])


def _judge_artifact(path: str, counts: dict, failures: list, formats, failure_folder: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    fmt = reader_fuzz.content_format(data)
    worker = reader_fuzz.Worker(multiprocessing.get_context("spawn"), 0, reader_fuzz.READER, 5, 2 << 30,
                                tempfile.gettempdir())
    try:
        outcome, detail = worker.run(("bytes", data), backstop_s=300)
    finally:
        worker.stop()
    if fmt in counts:
        counts[fmt].update(["tried", "corrupted tried", outcome, "ended libFuzzer"])
    if outcome not in reader_fuzz.SUCCESSES:
        name = f"atheris-{os.path.basename(path)}"
        failures.append(f"{fmt} atheris {name}: {outcome}: {detail}")
        reader_fuzz._save(failure_folder, name, data)


# ---------------------------------------------------------------------------------------------------------------
# The fuzzing process (libFuzzer, through atheris).

def _child(argv: list[str]) -> None:
    """libFuzzer on the corpus folder argv[1]; counts and failures saved to argv[2] after every input."""
    corpus, stats, failure_folder = argv[1:4]
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures: list[str] = []
    context = multiprocessing.get_context("spawn")
    directory = tempfile.mkdtemp()
    state = {"worker": None}
    own_path = os.path.join(directory, "input")

    def fuzz_one(data: bytes) -> None:
        with open(own_path, "wb") as f:
            f.write(data)
        try:
            images.read_gray(own_path)  # here for the coverage; judged in the worker
        except images.ImageDecodeError:
            pass
        if state["worker"] is None:
            state["worker"] = reader_fuzz.Worker(context, 0, reader_fuzz.READER, 5, 2 << 30, directory)
        outcome, detail = state["worker"].run(("bytes", data), backstop_s=300)
        if outcome in reader_fuzz.FRESH_WORKER:
            state["worker"].stop()
            state["worker"] = None
        fmt = reader_fuzz.content_format(data)
        counts[fmt].update(["tried", "corrupted tried", outcome])
        if outcome not in reader_fuzz.SUCCESSES:
            name = f"atheris-{abs(hash(data)):x}"
            failures.append(f"{fmt} atheris {name}: {outcome}: {detail}")
            reader_fuzz._save(failure_folder, name, data)
        with open(stats + ".tmp", "w") as f:  # after every input: libFuzzer ends the process without a word
            json.dump({"counts": counts, "failures": failures}, f)
        os.replace(stats + ".tmp", stats)

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        out = atheris.Mutate(data, max_size)
        if out.startswith(reader_fuzz.PNG_SIGNATURE) and np.random.default_rng(seed).random() < 0.5:
            out = reader_fuzz.fix_png_crcs(out)
        return out

    atheris.Setup([argv[0], corpus, *argv[4:]], fuzz_one, custom_mutator=mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    _child(sys.argv)
