"""The transfer comparison with the linear probe only: the path users pass to --config. A one-line shim; the
recipe is metachex_jax/configs/linear_probe.py (importable as metachex_jax.configs.linear_probe).

  python -m metachex_jax.main --config=configs/linear_probe.py[:demo] --config.init_from=PRE --workdir=DIR
"""

from metachex_jax.configs.linear_probe import get_config  # noqa: F401
