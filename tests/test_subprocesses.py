"""tests/subprocesses.py, the wait every test that starts processes uses: a process that waits forever is called
hung after the stated time without progress, and named with its Python stack; one that only prints, or only
computes, is slow, not hung."""

from __future__ import annotations

import sys

import pytest

import subprocesses

STALL = 4.0  # seconds; the tests' own runs use subprocesses.STALL_SECONDS
# CPU time that counts as progress in one STALL window here: a process waiting on an event uses none, a busy one
# gets far more even on a loaded machine (the default, 1 s, suits the runs' 120 s window, not a 4 s one).
CPU_PROGRESS = 0.2


def python(code: str, stacks_on_request: bool = False) -> list[str]:
    """`code` in a fresh Python, which with `stacks_on_request` answers SIGUSR1 as `python -m metachex_jax.main`."""
    if stacks_on_request:
        code = ("from metachex_jax.main import dump_stacks_on_sigusr1_if_asked\n"
                "dump_stacks_on_sigusr1_if_asked()\n" + code)
    return [sys.executable, "-c", code]


def test_a_process_that_waits_forever_is_hung_and_named_with_its_stack(tmp_path):
    code = "import threading\ndef wait_for_a_peer_that_never_comes():\n    threading.Event().wait()\n" \
           "print('started', flush=True)\nwait_for_a_peer_that_never_comes()\n"
    waiting, done = (subprocesses.start(python(code, stacks_on_request=True), tmp_path / "waiting.txt",
                                          name="waiting"),
                     subprocesses.start(python("print('done')"), tmp_path / "done.txt", name="done"))
    # Its start (importing jax, which a loaded machine may stretch past STALL) is waited for first.
    subprocesses.wait([waiting], until=lambda: "started" in waiting.output())
    with pytest.raises(AssertionError, match=r"hung: no new output and under 0.2 s of CPU time") as failure:
        subprocesses.wait([waiting, done], stall_seconds=STALL, cpu_progress_seconds=CPU_PROGRESS)
    message = str(failure.value)
    assert "--- waiting (pid" in message and "running" in message and "started" in message
    stacks = message.split("--- waiting, stacks:")[1].split("--- done")[0]
    assert "in wait_for_a_peer_that_never_comes" in stacks and "in <module>" in stacks
    assert "--- done (pid" in message and "exited with 0" in message
    assert waiting.popen.returncode is not None  # ended, not left behind


@pytest.mark.parametrize("code", [
    "import time\nfor i in range(5):\n    print(i, flush=True)\n    time.sleep(1)\n",
    "import time\nend = time.process_time() + 5\nwhile time.process_time() < end:\n    pass\n",
], ids=["output without CPU time", "CPU time without output"])
def test_a_process_that_prints_or_computes_for_longer_than_the_stall_time_is_not_hung(tmp_path, code):
    slow = subprocesses.start(python(code), tmp_path / "slow.txt")
    subprocesses.wait([slow], stall_seconds=STALL, cpu_progress_seconds=CPU_PROGRESS)
    assert slow.popen.returncode == 0, slow.output()


def test_run_captures_both_streams_and_the_status():
    done = subprocesses.run(python("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)"))
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
