"""When to call `jax.distributed.initialize()`: exactly when asked, or when a multi-process launch is detected.

`jax.distributed.initialize()` takes no arguments on Cloud TPU VM slices and under SLURM (JAX reads the
environment). Elsewhere (a plain multi-node recipe, or several processes on one machine) set
JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process; they are passed
on explicitly. On a plain single host `initialize()` raises, so a single-host run never calls it.
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
