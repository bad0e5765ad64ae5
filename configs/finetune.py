"""The transfer comparison with fine-tuning only: the path users pass to --config. A one-line shim; the recipe is
metachex_jax/configs/finetune.py (importable as metachex_jax.configs.finetune).

  python -m metachex_jax.main --config=configs/finetune.py[:demo] --config.init_from=PRE --workdir=DIR
"""

from metachex_jax.configs.finetune import get_config  # noqa: F401
