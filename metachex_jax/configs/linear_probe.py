"""The transfer comparison with the linear probe only: transfer.py with methods=probe.

  python -m metachex_jax.main --config=configs/linear_probe.py[:demo] --config.init_from=PRE --workdir=DIR
"""

from __future__ import annotations

import ml_collections

from metachex_jax.configs import transfer


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return transfer.get_config(",".join(filter(None, ["methods=probe", arg])))
