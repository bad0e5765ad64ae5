"""The transfer run's data preflight: the datasets its protocols name (and ChestX-ray14, for a "random_bn" start)
that are neither prepared nor preparable by the run, each with the exact `prepare` commands. `main` runs it after
the config's rules and before any work (pretraining's is data/input/preflight.py).
"""

from __future__ import annotations

from metachex_jax.data.input import datasets
from metachex_jax.data.input.spec import DataSpec
from metachex_jax.transfer.protocols import parse_protocols
from metachex_jax.transfer.sets import TRANSFER_DEMO_COMMAND


def missing_transfer_data(config) -> list[str]:
    """[] when every dataset the run reads is prepared, or (the protocols' datasets) has a raw copy the run prepares
    it from at the start, or the run is a demo; else the messages naming what is missing and how to make it."""
    if config.demo:
        return []
    spec = DataSpec.from_config(config)
    needed = sorted({d for p in parse_protocols(config.protocols) for d in p.datasets})
    unprepared = [name for name in needed if not datasets.manual_dir_of(spec, name)]  # with a raw copy: at the start
    message = datasets.missing_data_message(spec, unprepared, TRANSFER_DEMO_COMMAND) if unprepared else ""
    out = [message] if message else []
    starts = [s.strip() for s in f"{config.init_from},{config.compare_with}".split(",")]
    if "random_bn" in starts:  # ChestX-ray14 is never prepared by a transfer run
        message = datasets.missing_data_message(spec, ["chestxray14"], prepare_at_start=False)
        out += [f"compare_with names random_bn, whose BatchNorm statistics come from ChestX-ray14 training images: "
                f"{message}"] if message else []
    return out
