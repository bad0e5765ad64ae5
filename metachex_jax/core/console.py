"""The console a person reads, and the log file that keeps everything: `setup`, which every command line calls once.

The console (stderr) shows this package's own messages (a run's progress lines, evaluations, what it prepared or
resumed from) and every library's warnings and errors. The libraries' INFO lines (orbax's, for every checkpoint
save, finalisation and deletion; TFDS's; grain's) go to the log file only, where a run also records its whole
config; with `everything` (`python -m metachex_jax.main ... -v 1`, absl's verbosity) the console shows them too.
The log file, a training or transfer run's WORKDIR/logs/process_<i>.log (`log_path`), gets every message at INFO
and above from every library, in absl's format (time, thread, file and line).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

from absl import flags
from absl import logging as absl_logging

from metachex_jax.core import files

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the metachex_jax folder
LOG_FILE_ONLY = {"console": False}  # logging.info(..., extra=LOG_FILE_ONLY): a message for the log file alone


def log_path(workdir: str, process_index: int = 0) -> str:
    """Where a run's process writes its log: WORKDIR/logs/process_<i>.log; for a gs:// workdir (a log file is
    appended to line by line, which Cloud Storage cannot do) a local folder named after it, under the temp dir."""
    if files.is_url(workdir):
        workdir = os.path.join(tempfile.gettempdir(), "metachex_jax_logs", workdir.replace("://", "/"))
    return os.path.join(workdir, "logs", f"process_{process_index}.log")


class _ConsoleFilter(logging.Filter):
    """Passes this package's messages and every warning or error; with `everything`, every message."""

    def __init__(self, everything: bool):
        super().__init__()
        self.everything = everything

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True):
            return False
        return self.everything or record.levelno >= logging.WARNING or record.pathname.startswith(PACKAGE_DIR)


class _ConsoleFormatter(logging.Formatter):
    """`HH:MM:SS message`; warnings and errors also name their level and, from a library, where they come from."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno < logging.WARNING:
            return f"{stamp} {message}"
        where = "" if record.pathname.startswith(PACKAGE_DIR) else f" ({os.path.basename(record.pathname)})"
        return f"{stamp} {record.levelname}{where}: {message}"


def setup(log_file: str | None = None, everything: bool = False) -> None:
    """Route the process's log messages as the module docstring says; call it again to change the log file."""
    if not flags.FLAGS.is_parsed():  # an argparse command line: absl's flags keep their defaults (and absl does not
        flags.FLAGS.mark_as_parsed()  # warn that it logs before flag parsing)
    absl_logging.use_absl_handler()
    if absl_logging.get_verbosity() < absl_logging.INFO:  # (before flags are parsed absl says WARNING)
        absl_logging.set_verbosity(absl_logging.INFO)
    console = absl_logging.get_absl_handler().python_handler  # (the absl handler hands each record to it)
    for old in [f for f in console.filters if isinstance(f, _ConsoleFilter)]:
        console.removeFilter(old)
    console.addFilter(_ConsoleFilter(everything))
    console.setFormatter(_ConsoleFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "metachex_log_file", False)]:
        root.removeHandler(old)
        old.close()
    if log_file:
        os.makedirs(os.path.dirname(log_file), exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.metachex_log_file = True
        handler.setFormatter(absl_logging.PythonFormatter())
        root.addHandler(handler)
