"""When to call `jax.distributed.initialize()`: exactly when asked, or when a multi-process launch is detected.

`jax.distributed.initialize()` takes no arguments on Cloud TPU VM slices and under SLURM (JAX reads the
environment), and an explicit coordinator elsewhere (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID, read by JAX itself). On a plain single host it raises, so a single-host run never calls it.
"""

from __future__ import annotations

import os

import jax


def multiprocess_launch_detected(env=os.environ) -> str | None:
    """Name the multi-process launcher found in the environment, or None for a single-process run."""
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return "SLURM"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "TPU VM slice"
    return None


def maybe_initialize(mode: str = "auto", env=os.environ) -> bool:
    """Initialise JAX's multi-host runtime for mode "yes", or "auto" when a launcher is detected."""
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"config.distributed must be 'auto', 'yes' or 'no', got {mode!r}")
    if mode == "yes" or (mode == "auto" and multiprocess_launch_detected(env)):
        jax.distributed.initialize()
        return True
    return False
