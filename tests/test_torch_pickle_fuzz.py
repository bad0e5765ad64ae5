"""Fuzzing the torch reader: a bounded, seeded campaign of mutated files in both layouts (`torch_fuzz`).

    METACHEX_FUZZ_EXAMPLES=20000 pytest -s tests/test_torch_pickle_fuzz.py   # a longer campaign, counts printed
    nice -n 19 python tests/torch_fuzz.py --examples 200000 --minutes 20     # a long one, with progress

The harness is tested too: a reader that runs the file's code, changes the reader module, crashes or spins is
reported as such (a fuzz test that cannot fail would be worth nothing).
"""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path

import pytest

import torch_files
import torch_fuzz
import torch_reference
from metachex_jax.interop import torch_pickle

EXAMPLES = int(os.environ.get("METACHEX_FUZZ_EXAMPLES", "600"))  # per layout; about 15 s in all on a 2-core box


def test_mutated_files_run_nothing_and_read_right_or_raise_a_clear_error():
    report = torch_fuzz.run_campaign(seed=0, examples=EXAMPLES)
    print(report.summary())
    assert not report.failures, "\n".join(report.failures[:20])
    for layout, counts in report.counts.items():
        assert counts["tried"] == EXAMPLES
        # Both families ran, and both outcomes happened: not every mutation is refused, nor every one harmless.
        assert counts["family file"] > 0 and counts["family pickle"] > 0
        assert counts["original"] > 0 and counts["refused"] > 0


@pytest.mark.parametrize("layout", torch_fuzz.LAYOUTS)
def test_the_seeds_read_as_written_by_the_reader_and_the_reference(tmp_path, layout):
    for seed in torch_fuzz.seeds(layout):
        data = torch_files.encode(seed.pickled, seed.storages, layout, seed.byteorder)[0]
        (tmp_path / "seed.pt").write_bytes(data)
        if seed.expected is None:  # a crafted file: refused by the reader
            with pytest.raises(torch_pickle.TorchFileError):
                torch_pickle.read_state_dict(tmp_path / "seed.pt")
            continue
        for got in (torch_pickle.read_state_dict(tmp_path / "seed.pt"), torch_reference.reference_state_dict(data)):
            assert torch_fuzz.difference(got, seed.expected) is None, seed.name
    assert not torch_fuzz.TRIPPED  # the payloads were not run here either


def faulty_loader(path):
    """A reader with the faults the harness must report, one per file in this order (counted with folders beside the
    files read, as workers are replaced): it changes the reader module, runs a pickle's code, spins, crashes."""
    fault = 1
    while True:
        try:
            os.mkdir(Path(path).parent / f"faulty_loader_call_{fault}")  # (no audit event the harness flags)
            break
        except FileExistsError:
            fault += 1
    if fault == 1:
        torch_pickle._KNOWN[("torch", "FloatStorage")] = torch_pickle.STORAGE_TYPES["HalfStorage"]
    if fault == 2:  # what an ordinary unpickler does with such a pickle
        pickle.loads(b"\x80\x02" + torch_files.exec_call("import torch_fuzz; torch_fuzz.tripwire()") + b".")
    if fault == 3:
        while True:
            pass
    if fault == 4:
        os.kill(os.getpid(), signal.SIGSEGV)
    return torch_pickle.read_state_dict(path)


def test_the_harness_reports_code_run_state_changed_crashes_and_hangs():
    report = torch_fuzz.run_campaign(seed=0, examples=5, layouts=("zip",), loader=f"{__name__}:faulty_loader",
                                     cpu_limit_s=1)
    kinds = [failure.split(": ")[1] for failure in report.failures]
    assert kinds == ["state_changed", "ran_code", "hang", "crash"], report.failures
    assert "tripwire called" in report.failures[1], report.failures
