"""Stopping a run cleanly on SIGTERM or SIGINT: every process saves a checkpoint at the same step, then exits 0.

Spot TPU VMs and SLURM (preemption, or `--signal` before the time limit; see the docs' Launching page) send SIGTERM and
kill the run a little later; Ctrl-C sends SIGINT. `StopSignals` turns either into a flag that the trainer acts
on at a step boundary:

    signal -> handler sets this process's flag
           -> the next train step takes every process's flag as a tiny input sharded over the devices
              (`flags()`, one entry per device) and returns their maximum: the OR over all processes,
              computed inside the step, with no extra host synchronisation
           -> the trainer reads that value together with the step's loss (which it already fetches one step
              late for the NaN check), so every process sees the same answer for the same step, finishes that
              step's bookkeeping (evaluation, checkpoint) and then saves and stops (`Preempted`)

Hence at most the step in flight when the signal came runs after it, and nothing is lost. The flag arrays are
made once (one for "go on", one for "stop"), so a step costs no extra host-to-device transfer.

JAX's own preemption sync point (`jax.experimental.multihost_utils.reached_preemption_sync_point`) exists only
after `jax.distributed.initialize()` and only for SIGTERM; this works for one process too, and for SIGINT.

A second SIGINT stops at once (KeyboardInterrupt: for a user at a terminal who does not want to wait); a
repeated SIGTERM is ignored (schedulers repeat it, then kill). Grain's input worker processes ignore both
signals (`pipeline._ignore_stop_signals`), so they keep serving batches until the trainer closes them.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from absl import logging

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """SIGTERM or SIGINT stopped the run after every process saved a checkpoint at `step`; running the same command
    again resumes from it. `python -m metachex_jax.main` exits with status 0 on it."""

    def __init__(self, step: int, signal_name: str | None):
        super().__init__(f"stopped at step {step} on {signal_name or 'a signal to another process'}; "
                         "checkpoint saved: run the same command again to resume")
        self.step, self.signal_name = step, signal_name


class StopSignals:
    """While entered (in the main thread): SIGTERM and SIGINT set `requested` instead of ending the process."""

    def __init__(self, data_sharding: jax.sharding.Sharding):
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        local = jax.local_device_count()
        self._flags = {flag: jax.make_array_from_process_local_data(data_sharding, np.full(local, flag, np.int32))
                       for flag in (0, 1)}

    def flags(self) -> jax.Array:
        """This process's flag on each of its devices: the train step's `stop_flags` input (see the module)."""
        return self._flags[int(self.requested)]

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            if signum == signal.SIGINT:
                logging.warning("second SIGINT: stopping now, without saving a checkpoint")
                raise KeyboardInterrupt
            logging.warning("%s again: already stopping at the next step boundary", name)
            return
        self.requested, self.signal_name = True, name
        logging.warning("%s received: saving a checkpoint at the next step boundary, then exiting", name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        else:
            logging.warning("not in the main thread: SIGTERM/SIGINT will not save a checkpoint before exiting")
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def any_process_stops(stop_flags: jax.Array) -> jax.Array:
    """Inside the jitted step: 1 when any process's flag is set (the OR over the sharded per-device flags)."""
    return stop_flags.max()
