"""StopSignals: a real SIGTERM / SIGINT sets the flag the train step OR-reduces, handlers are restored afterwards,
and a second SIGINT stops at once. (The trainer's save-and-resume on a signal: tests/test_train.py and
tests/test_multihost.py.)"""

from __future__ import annotations

import os
import signal
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from metachex_jax.core import preemption, sharding


def wait_for(condition, timeout=5.0):
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.01)  # the handler runs in the main thread between bytecodes
    return condition()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_sets_the_flag_that_the_step_reduces(signum):
    data = NamedSharding(sharding.make_mesh(), P("data"))
    reduce = jax.jit(preemption.any_process_stops)
    before = {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS}
    with preemption.StopSignals(data) as signals:
        assert not signals.requested and int(reduce(signals.flags())) == 0
        assert signals.flags().shape == (jax.device_count(),)
        os.kill(os.getpid(), signum)
        assert wait_for(lambda: signals.requested)
        assert signals.signal_name == signal.Signals(signum).name
        assert int(reduce(signals.flags())) == 1
        np.testing.assert_array_equal(np.asarray(signals.flags()), 1)
        if signum == signal.SIGTERM:  # a repeated SIGTERM changes nothing (schedulers repeat it, then kill)
            os.kill(os.getpid(), signum)
            time.sleep(0.1)
            assert signals.requested
    assert {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS} == before


def test_a_second_sigint_stops_at_once():
    data = NamedSharding(sharding.make_mesh(), P("data"))
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs as a background job of a shell
    with pytest.raises(KeyboardInterrupt):
        with preemption.StopSignals(data) as signals:
            os.kill(os.getpid(), signal.SIGINT)
            assert wait_for(lambda: signals.requested)
            os.kill(os.getpid(), signal.SIGINT)
            wait_for(lambda: False, timeout=2.0)
    assert signal.getsignal(signal.SIGINT) is before  # the handler it found is back
