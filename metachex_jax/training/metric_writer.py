"""Where logged scalars go: the console, WORKDIR/metrics.jsonl (every scalar, one JSON object per line) and
TensorBoard event files (WORKDIR/tensorboard, written with tensorboardX, no TensorFlow). Only the lead host
(process 0) writes; on other hosts every call is a no-op.

metrics.jsonl in a local workdir is appended to and flushed after every line. Cloud Storage (a gs:// workdir)
cannot append to an object, so there the lines are kept in memory, starting with those of the existing file (a
resumed run keeps its history), and the whole file is uploaded again (`files.write_atomic`: readers see the
previous version or the new one) at most every `flush_secs` seconds and at close. A crash therefore loses at
most the last `flush_secs` of lines of a remote file; the checkpoints are unaffected. tensorboardX writes
gs:// event files itself (it needs the `google-cloud-storage` package for that).
"""

from __future__ import annotations

import json
import math
import time

import jax
from absl import logging
from tensorboardX import SummaryWriter

from metachex_jax.core import files


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool | None = None, flush_secs: float = 30.0):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._tb = None
        if self.enabled:
            files.makedirs(workdir)
            path = files.join(workdir, "metrics.jsonl")
            self._jsonl = _AppendLocal(path) if not files.is_url(path) else _RewriteRemote(path, flush_secs)
            self._tb = SummaryWriter(files.join(workdir, "tensorboard"), flush_secs=30)

    def write(self, step: int, scalars: dict[str, float], console: str | None = None) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        record = {"step": int(step), **{k: (v if math.isfinite(v) else None) for k, v in scalars.items()}}
        self._jsonl.add(json.dumps(record) + "\n")
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, int(step))
        if console:
            logging.info(console)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


class _AppendLocal:
    """A local file, appended to and flushed line by line."""

    def __init__(self, path: str):
        self._file = open(path, "a", encoding="utf-8")

    def add(self, line: str) -> None:
        self._file.write(line)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _RewriteRemote:
    """A remote object holding every line so far, uploaded whole at most every `flush_secs` and at close."""

    def __init__(self, path: str, flush_secs: float):
        self._path, self._flush_secs = path, flush_secs
        existing = files.read_text(path) if files.exists(path) else ""
        if existing and not existing.endswith("\n"):
            existing += "\n"  # a file edited by hand without a final newline must not swallow the next record
        self._lines = [existing] if existing else []
        self._last_upload = time.monotonic()
        self._dirty = False

    def add(self, line: str) -> None:
        self._lines.append(line)
        self._dirty = True
        if time.monotonic() - self._last_upload >= self._flush_secs:
            try:
                self._upload()
            except Exception as e:  # noqa: BLE001 - a transient storage error must not stop training
                self._last_upload = time.monotonic()  # retried at the next interval (and at close, which raises)
                logging.warning("could not upload %s (%s: %s); retrying in %.0f s", self._path, type(e).__name__, e,
                                self._flush_secs)

    def _upload(self) -> None:
        files.write_atomic(self._path, "".join(self._lines))
        self._last_upload = time.monotonic()
        self._dirty = False

    def close(self) -> None:
        if self._dirty:
            self._upload()
