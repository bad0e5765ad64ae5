"""The TB transfer comparison with the linear probe only (configs/transfer.py with methods=probe).

  python -m metachex_jax.main --config=configs/linear_probe.py[:demo] --config.init_from=PRE --workdir=DIR
"""

from metachex_jax import config_lib


def get_config(arg=None):
    return config_lib.transfer_config(",".join(filter(None, ["methods=probe", arg])))
