"""The CheXNet baseline: the path users pass to --config. A one-line shim; the recipe (pretraining's with the
pathology head alone) is metachex_jax/configs/chexnet.py (importable as metachex_jax.configs.chexnet).

  python -m metachex_jax.main --config=configs/chexnet.py:demo --workdir=/tmp/chexnet_demo
  python -m metachex_jax.main --config=configs/chexnet.py --workdir=/tmp/chexnet --config.data.data_dir=DIR
"""

from metachex_jax.configs.chexnet import get_config  # noqa: F401
