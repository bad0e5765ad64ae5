"""The pretraining data preflight: which datasets a (valid) config names that are neither prepared nor preparable
by the run, each with the exact `prepare` commands. `main` runs it after the config's rules and before any work,
and exits 2 with every problem at once (the transfer run's is transfer/preflight.py).
"""

from __future__ import annotations

from metachex_jax.data.input import datasets, mixture
from metachex_jax.data.input.spec import DataSpec


def missing_pretraining_data(spec: DataSpec) -> list[str]:
    """[] when every dataset of `spec.datasets` is prepared, or has a raw copy the run prepares it from at the
    start, or the run is a demo (it makes its data); else one message naming what is missing and how to make it."""
    if spec.demo is not None:
        return []
    unprepared = [name for name in mixture.parse_mixture(spec.datasets) if not datasets.manual_dir_of(spec, name)]
    message = datasets.missing_data_message(spec, unprepared, datasets.PRETRAIN_DEMO_COMMAND) if unprepared else ""
    return [message] if message else []
