"""A function for the decoding pool's tests (tests/test_reader_fuzz.py) in a module of its own, so that the pool's
spawned workers import nothing heavy to run it."""

import os
import signal


def square_or_fault(n: int) -> int:
    """n * n; 3 crashes its process, 5 spins, 7 raises."""
    if n == 3:
        os.kill(os.getpid(), signal.SIGSEGV)
    if n == 5:
        while True:
            pass
    if n == 7:
        raise ValueError("seven")
    return n * n
