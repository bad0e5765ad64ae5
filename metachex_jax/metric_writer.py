"""Where logged scalars go: the console, WORKDIR/metrics.jsonl (every scalar, one JSON object per line) and
TensorBoard event files (WORKDIR/tensorboard, written with tensorboardX, no TensorFlow). Only the lead host
(process 0) writes; on other hosts every call is a no-op.
"""

from __future__ import annotations

import json
import math
import os

import jax
from absl import logging


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

    def write(self, step: int, scalars: dict[str, float], console: str | None = None) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        record = {"step": int(step), **{k: (v if math.isfinite(v) else None) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, int(step))
        if console:
            logging.info(console)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
