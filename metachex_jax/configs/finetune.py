"""The transfer comparison with fine-tuning only: transfer.py with methods=finetune.

  python -m metachex_jax.main --config=configs/finetune.py[:demo] --config.init_from=PRE --workdir=DIR
"""

from __future__ import annotations

import ml_collections

from metachex_jax.configs import transfer


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return transfer.get_config(",".join(filter(None, ["methods=finetune", arg])))
