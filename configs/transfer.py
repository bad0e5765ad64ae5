"""The transfer comparison: the path users pass to --config. A one-line shim; the recipe, with every setting and
its commands, is metachex_jax/configs/transfer.py (importable as metachex_jax.configs.transfer).

  python -m metachex_jax.main --config=configs/transfer.py:demo --config.init_from=PRE --workdir=/tmp/tb_demo
  python -m metachex_jax.main --config=configs/transfer.py --config.init_from=PRE --workdir=/tmp/tb \
      --config.data.data_dir=DIR
"""

from metachex_jax.configs.transfer import get_config  # noqa: F401
