"""When to call `jax.distributed.initialize()`: exactly when asked, or when a multi-process launch is detected.

`jax.distributed.initialize()` takes no arguments on Cloud TPU VM slices and under SLURM (JAX reads the
environment). Elsewhere (a plain multi-node recipe, or several processes on one machine) set
JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process; they are passed
on explicitly. On a plain single host `initialize()` raises, so a single-host run never calls it.

`one_process_at_a_time(fn, name)` runs process-local disk-cache work (the demo data) in turns; see its docstring.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import jax
from jax.experimental import multihost_utils

T = TypeVar("T")


def multiprocess_launch_detected(env=os.environ) -> str | None:
    """Name the multi-process launcher found in the environment, or None for a single-process run.

    SLURM counts only when `srun` started several tasks for this job step (SLURM_STEP_NUM_TASKS > 1, with this
    task's SLURM_PROCID): Python run directly in an `salloc` shell or an `sbatch` script sees the allocation's
    SLURM_NTASKS (and, in a batch script, SLURM_PROCID=0) but is one process, and must not wait for others.
    """
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    step_tasks = env.get("SLURM_STEP_NUM_TASKS", "")
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and step_tasks.isdigit() and int(step_tasks) > 1:
        return "SLURM"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "TPU VM slice"
    return None


def maybe_initialize(mode: str = "auto", env=os.environ) -> bool:
    """Initialise JAX's multi-host runtime for mode "yes", or "auto" when a launcher is detected."""
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"config.distributed must be 'auto', 'yes' or 'no', got {mode!r}")
    if mode == "yes" or (mode == "auto" and multiprocess_launch_detected(env)):
        explicit = {}
        if env.get("JAX_COORDINATOR_ADDRESS"):
            explicit["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
            if "JAX_NUM_PROCESSES" in env:
                explicit["num_processes"] = int(env["JAX_NUM_PROCESSES"])
            if "JAX_PROCESS_ID" in env:
                explicit["process_id"] = int(env["JAX_PROCESS_ID"])
        jax.distributed.initialize(**explicit)
        return True
    return False


def one_process_at_a_time(fn: Callable[[], T], name: str, *, process_index: int | None = None,
                          process_count: int | None = None, barrier: Callable[[str], None] | None = None) -> T:
    """Call `fn()` on every process, one process after another (in process order), and return its result.

    For work on a disk cache that any process can do but two must never do at once, and whose `fn` does nothing
    when the result is already there (the demo tree under ~/.cache): on a disk shared by all processes, process 0
    makes it and the others find it; with one disk per host, the first process of each host makes it and that
    host's other processes find it. No knowledge of which processes share a disk is needed. The cost is one
    barrier per process. An exception in `fn` is raised only after the last turn, so no process waits forever at
    a barrier that a failed process never reaches.

    `process_index`, `process_count` and `barrier` (called with a unique name after each turn) default to JAX's
    (`multihost_utils.sync_global_devices`); tests pass their own to play several processes.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if count == 1:
        return fn()
    if barrier is None:
        barrier = multihost_utils.sync_global_devices
    result, error = None, None
    for turn in range(count):
        if turn == index:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised below, after every turn
                error = e
        barrier(f"metachex_jax one_process_at_a_time {name} turn {turn}")
    if error is not None:
        raise error
    return result
