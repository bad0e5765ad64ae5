"""MetaChexNet pretraining: the path users pass to --config. A one-line shim; the recipe, with every setting and
its commands, is metachex_jax/configs/pretrain.py (importable as metachex_jax.configs.pretrain).

  python -m metachex_jax.main --config=configs/pretrain.py:demo --workdir=/tmp/metachex_demo
  python -m metachex_jax.main --config=configs/pretrain.py --workdir=/tmp/metachex --config.data.data_dir=DIR
"""

from metachex_jax.configs.pretrain import get_config  # noqa: F401
