"""The CheXNet baseline: the same DenseNet and trainer, the 14-pathology head alone (Rajpurkar et al., 2017).

Real data:
  python -m metachex_jax.main --config=configs/chexnet.py --workdir=/tmp/chexnet \
      --config.data.data_dir=$HOME/tensorflow_datasets

Demo on the synthetic data:
  python -m metachex_jax.main --config=configs/chexnet.py:demo --workdir=/tmp/chexnet_demo

Arguments: as configs/pretrain.py (demo, runlocal, arch=..., res=..., init=...).
"""

from metachex_jax import config_lib


def get_config(arg=None):
    return config_lib.pretrain_config(arg, multitask=False)
