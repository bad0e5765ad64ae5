"""Differential fuzzing of the image reader: a bounded, seeded campaign (`reader_fuzz`) of files written by independent
writers, valid and corrupted, judged against independent reference decoders (`reader_cases`); the harness itself;
the decoding pool's protection against a decoder that crashes or spins.

    METACHEX_FUZZ_EXAMPLES=2000 pytest -s tests/test_reader_fuzz.py            # a longer campaign, counts printed
    nice -n 19 python tests/reader_fuzz.py --minutes 20 --seed 1                # a long one, with progress
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

import reader_fuzz
from pool_faults import square_or_fault
from metachex_jax.imaging import images, workers

EXAMPLES = int(os.environ.get("METACHEX_FUZZ_EXAMPLES", "60"))  # per family and format; about 30 s on a 2-core box


def test_valid_and_corrupted_files_read_as_the_references_or_raise_a_clear_error():
    report = reader_fuzz.run_campaign(seed=0, examples=EXAMPLES)
    print(report.summary())
    assert not report.failures, "\n".join(report.failures[:20])
    for fmt, counts in report.counts.items():
        assert counts["valid tried"] == counts["corrupted tried"] == EXAMPLES
        # Every valid file was read; the corruptions were neither all refused nor all harmless.
        assert counts["read"] > EXAMPLES and counts["refused"] > 0, (fmt, counts)


def test_the_same_seed_writes_the_same_files():
    for fmt in reader_fuzz.FORMATS:
        for family in reader_fuzz.FAMILIES:
            first, second = (reader_fuzz.example(7, family, fmt, 3) for _ in range(2))
            assert first.data == second.data and first.description == second.description


# --- the harness reports what a faulty reader does (a fuzz test that cannot fail would be worth nothing) ---------

def wrong_pixels_reader(path):
    gray, info = images.read_gray(path)
    gray = gray.copy()
    gray[0, 0] ^= 1
    return gray, info


def raising_reader(path):
    raise KeyError("a bug")


def crashing_reader(path):
    os.kill(os.getpid(), signal.SIGSEGV)


def spinning_reader(path):
    while True:
        pass


def silent_reader(path):
    """Reads what the reference reads and never refuses: a damaged file comes back as a blank image."""
    try:
        return images.read_gray(path)
    except images.ImageDecodeError:
        return np.zeros((4, 4), np.uint8), images.ImageInfo("png", 4, 4, 8, "8-bit file")


@pytest.mark.parametrize("reader, family, outcome", [
    ("wrong_pixels_reader", "valid", "differs"),
    ("raising_reader", "valid", "unexpected_exception"),
    ("crashing_reader", "valid", "crash"),
    ("spinning_reader", "valid", "hang"),
    ("silent_reader", "corrupted", "loaded_where_reference_refuses"),
])
def test_the_harness_reports_a_faulty_reader(reader, family, outcome):
    examples = 1 if family == "valid" else 12  # enough PNGs for a corruption that pypng refuses
    report = reader_fuzz.run_campaign(seed=0, examples=examples, formats=("png",), families=(family,),
                                      reader=f"test_reader_fuzz:{reader}", cpu_limit_s=1)
    assert report.counts["png"][outcome] >= 1, report.summary()
    assert report.failures and all(f.startswith("png ") for f in report.failures)


# --- the decoding pool: one file cannot break a build or a `predict` run -----------------------------------------

def test_the_worker_pool_replaces_a_worker_that_crashes_or_spins_and_reports_that_item():
    with workers.WorkerPool(2, cpu_limit_s=1) as pool:
        results = list(pool.map(square_or_fault, range(10), lost=lambda n, reason: f"lost {n}: {reason}", chunk=3))
        assert pool.replaced == 2
    assert [r for i, r in enumerate(results) if i not in (3, 5, 7)] == [i * i for i in range(10) if i not in (3, 5, 7)]
    assert results[3].startswith("lost 3: the decoding process died on this file (SIGSEGV")
    assert results[5].startswith("lost 5: the decoder used more than the per-file CPU-time limit of 1 s")
    assert results[7].startswith("lost 7: ValueError: seven")


def test_decode_many_turns_any_failure_of_a_file_into_that_files_error(tmp_path):
    """An exception outside the decoder (here the resize, asked for an impossible size) is the file's error, in
    this process and in a pool; it aborted the whole decode before."""
    path = tmp_path / "a.png"
    path.write_bytes(reader_fuzz.example(0, "valid", "png", 0).data)
    with images.decoding_pool(2) as pool:
        for where in (None, pool):
            results = list(images.decode_many([path, path], 0, pool=where, progress=False))
            assert [image for image, _ in results] == [None, None]
            assert all(error.startswith(f"{path}: cannot decode image (ValueError") for _, error in results)
