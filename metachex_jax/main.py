"""Entry point: `python -m metachex_jax.main --config=configs/pretrain.py[:ARGS] --workdir=DIR`.

Deliberately thin: parse flags, start the multi-host runtime when asked or detected, print the config, and
hand over to the trainer the config names (`config.trainer`). A pretraining run stopped by SIGTERM/SIGINT
(`preemption.Preempted`, after its checkpoint is saved) exits with status 0. Everything else is importable from
tests and notebooks (`metachex_jax.train.train_and_evaluate(config, workdir)`).
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from metachex_jax import distributed, files, preemption

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain.py:demo", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and evaluation results are written.")
flags.DEFINE_string("compilation_cache_dir", "~/.cache/metachex_jax/xla",
                    "JAX's persistent compilation cache: a restarted or repeated run loads its compiled steps "
                    "instead of compiling them again (DenseNet-121's train step took 103 s to compile on an "
                    "H200). Local or gs://; '' turns it off. Default: JAX_COMPILATION_CACHE_DIR if set, else "
                    "this.")
flags.mark_flags_as_required(["config", "workdir"])


def use_compilation_cache(directory: str, explicit: bool = True) -> None:
    """Point JAX's persistent compilation cache at `directory` ('' = off). Without an explicit flag, a cache that
    JAX_COMPILATION_CACHE_DIR already set is kept. Only the lead process writes entries (JAX's rule), every
    process reads them; entries are keyed on the program, the JAX/XLA versions and the devices, so a stale
    entry is never used."""
    if not explicit and jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", files.absolute(directory) if directory else None)


def run(config, workdir: str):
    """Dispatch to the trainer that `config.trainer` names."""
    if config.trainer == "pretrain":
        from metachex_jax import train
        return train.train_and_evaluate(config, workdir)
    if config.trainer == "transfer":
        from metachex_jax.transfer import run as transfer_run
        return transfer_run.run(config, workdir)
    raise ValueError(f"unknown config.trainer {config.trainer!r}; expected 'pretrain' or 'transfer'")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    use_compilation_cache(FLAGS.compilation_cache_dir, explicit=FLAGS["compilation_cache_dir"].present)
    distributed.maybe_initialize(config.get("distributed", "auto"))
    workdir = files.absolute(FLAGS.workdir)  # gs://... stays as it is
    if jax.process_index() == 0:
        logging.info("process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())
        logging.info("config:\n%s", config)
    try:
        run(config, workdir)
    except preemption.Preempted as e:
        logging.warning("%s", e)  # a clean stop: exit status 0


if __name__ == "__main__":
    app.run(main)
