"""Entry point: `python -m metachex_jax.main --config=configs/pretrain.py[:ARGS] --workdir=DIR`.

Deliberately thin: parse flags, check the config (`check`: the config's rules, `config_lib.validate`, then the
data preflight of its trainer; every problem at once, before any work), start the multi-host runtime when asked or
detected, set up the console and the run's log file (core/console.py: WORKDIR/logs/process_<i>.log gets the config
and every library's messages), and hand over to the trainer the config names (`config.trainer`). Everything else is
importable from tests and notebooks (`metachex_jax.training.trainer.train_and_evaluate(config, workdir)`).

Exit status: 0 done, or a pretraining run stopped by SIGTERM/SIGINT after saving its checkpoint
(`core.preemption.Preempted`); 2 a user error (bad flags or config, missing data, unusable starting weights: the
message says what to change, without a traceback, see core/errors.py); anything else is a bug and shows its
traceback.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from metachex_jax.configs import config_lib
from metachex_jax.core import console, distributed, files, preemption
from metachex_jax.core.errors import ConfigError, UserError
from metachex_jax.data.input import preflight
from metachex_jax.data.input.spec import DataSpec
from metachex_jax.training import trainer
from metachex_jax.transfer import preflight as transfer_preflight
from metachex_jax.transfer import run as transfer_run

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain.py:demo", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and evaluation results are written.")
flags.DEFINE_string("compilation_cache_dir", "~/.cache/metachex_jax/xla",
                    "JAX's persistent compilation cache: a restarted or repeated run loads its compiled steps "
                    "instead of compiling them again (DenseNet-121's train step took 103 s to compile on an "
                    "H200). Local or gs://; '' turns it off. Default: JAX_COMPILATION_CACHE_DIR if set, else "
                    "this. Always off in a multi-process run on CPU, where a cache hit hangs the run.")
flags.mark_flags_as_required(["config", "workdir"])

DUMP_STACKS_VAR = "METACHEX_JAX_DUMP_STACKS_ON_SIGUSR1"


def dump_stacks_on_sigusr1_if_asked(env=os.environ) -> None:
    """With METACHEX_JAX_DUMP_STACKS_ON_SIGUSR1=1, `kill -USR1 PID` prints every thread's Python stack to stderr and
    the run goes on (even a thread waiting in XLA's C++ code): how the tests show where a hung process sits. Off by
    default, because SIGUSR1 otherwise ends the process, which is what a scheduler sending it may count on."""
    if env.get(DUMP_STACKS_VAR) == "1":
        faulthandler.register(signal.SIGUSR1, all_threads=True)


def use_compilation_cache(directory: str, explicit: bool = True) -> None:
    """Point JAX's persistent compilation cache at `directory` ('' = off). Without an explicit flag, a cache that
    JAX_COMPILATION_CACHE_DIR already set is kept. Only the lead process writes entries (JAX's rule), every
    process reads them; entries are keyed on the program, the JAX/XLA versions and the devices, so a stale
    entry is never used. Call it after `distributed.maybe_initialize`: where a cache hit would hang the run
    (`cache_hit_hangs`), the cache stays off, with a warning."""
    if explicit or not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", files.absolute(directory) if directory else None)
    if jax.config.jax_compilation_cache_dir and cache_hit_hangs():
        logging.warning("JAX's persistent compilation cache is off: in a multi-process run on CPU, a process that "
                        "loads its compiled steps from it waits forever for the others at the first step "
                        "(the docs' Launching page, \"Multi-host runs and the compilation cache\")")
        jax.config.update("jax_compilation_cache_dir", None)


def cache_hit_hangs() -> bool:
    """Whether a persistent-cache hit hangs this run: in a multi-process run on CPU. There JAX keys an entry by the
    process that compiled it (the key covers the process's own devices) and only process 0 writes, so a rerun has
    process 0 load its steps while the others compile theirs, and XLA:CPU's all-reduce in a loaded executable
    never meets the one in a freshly compiled executable (gloo waits forever; all loaded or all compiled works).
    On GPU and TPU, by JAX's cache-key code, every process computes the same key and loads what process 0 wrote."""
    return jax.process_count() > 1 and jax.default_backend() == "cpu"


def run(config, workdir: str):
    """Dispatch to the trainer that `config.trainer` names."""
    if config.trainer == "pretrain":
        return trainer.train_and_evaluate(config, workdir)
    if config.trainer == "transfer":
        return transfer_run.run(config, workdir)
    raise ValueError(f"unknown config.trainer {config.trainer!r}; expected one of {config_lib.TRAINERS}")


def check(config) -> None:
    """Everything wrong with a config, before any work: its rules (config_lib.validate), then whether the data it
    names is there or can be made by the run (the data preflight of its trainer). Raises errors.ConfigError."""
    config_lib.validate(config)
    if config.trainer == "pretrain":
        missing = preflight.missing_pretraining_data(DataSpec.from_config(config))
    else:
        missing = transfer_preflight.missing_transfer_data(config)
    if missing:
        raise ConfigError(missing)


def user_error_exit(message: str) -> None:
    """Print a user error without a traceback and exit with status 2 (absl's UsageError would exit 1)."""
    print(f"python -m metachex_jax.main: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (config file, overrides, required flags); a bad flag is a user error."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        # A config file's get_config raising a UserError (a bad argument after the colon): its own message.
        chain, user_error = e, None
        while chain is not None:
            user_error = chain if isinstance(chain, UserError) else user_error
            chain = chain.__cause__ or chain.__context__
        user_error_exit(str(user_error) if user_error else f"{e}\nSee python -m metachex_jax.main --helpfull.")
    except (AttributeError, KeyError) as e:  # ml_collections: an override names a field the config lacks
        overrides = [a for a in argv if a.startswith("--config.")]
        field = str(e).strip("\"'")
        user_error_exit(f"unknown config field {field!r}: check the overrides {' '.join(overrides)}")


def main(argv):
    try:
        if len(argv) > 1:
            raise UserError(f"unexpected arguments: {argv[1:]} (flags are --name=value)")
        config = FLAGS.config
        check(config)
        distributed.maybe_initialize(config.distributed)
        workdir = files.absolute(FLAGS.workdir)  # gs://... stays as it is
        log_file = console.log_path(workdir, jax.process_index())
        console.setup(log_file, everything=FLAGS.verbosity >= 1)  # -v 1: every library's messages on the console
        use_compilation_cache(FLAGS.compilation_cache_dir, explicit=FLAGS["compilation_cache_dir"].present)
        if jax.process_index() == 0:
            logging.info("process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())
            logging.info("config:\n%s", config, extra=console.LOG_FILE_ONLY)
        logging.info("the config and every library's messages (checkpoint saves, ...): %s", log_file)
        run(config, workdir)
    except UserError as e:
        user_error_exit(str(e))
    except preemption.Preempted as e:
        logging.warning("%s", e)  # a clean stop: exit status 0


if __name__ == "__main__":
    dump_stacks_on_sigusr1_if_asked()
    app.run(main, flags_parser=parse_flags)
