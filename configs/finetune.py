"""The TB transfer comparison with fine-tuning only (configs/transfer.py with methods=finetune).

  python -m metachex_jax.main --config=configs/finetune.py[:demo] --config.init_from=PRE --workdir=DIR
"""

from metachex_jax import config_lib


def get_config(arg=None):
    return config_lib.transfer_config(",".join(filter(None, ["methods=finetune", arg])))
