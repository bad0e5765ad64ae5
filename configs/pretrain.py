"""MetaChexNet pretraining on NIH ChestX-ray14: 14 pathologies + view position + sex + age.

Real data (DenseNet-121, 224x224, CheXNet's recipe; prepare the dataset first, see README):
  python -m metachex_jax.main --config=configs/pretrain.py --workdir=/tmp/metachex \
      --config.data.data_dir=$HOME/tensorflow_datasets

The synthetic demo (generates and prepares demo data, trains the real DenseNet-121 at 64x64 on CPU):
  python -m metachex_jax.main --config=configs/pretrain.py:demo --workdir=/tmp/metachex_demo

On a weighted mixture of datasets (each prepared first; the losses are masked per label where a dataset lacks it;
evaluation per dataset; README "More datasets"):
  python -m metachex_jax.main --config=configs/pretrain.py:datasets=chestxray14+chexpert+padchest:0.5 \
      --workdir=/tmp/mixture --config.data.data_dir=$HOME/tensorflow_datasets --config.data.extra_labels="No Finding"

Arguments after the colon (comma-separated): demo, runlocal (a few steps, for smoke tests),
arch=densenet121|densenet169|densenet201|densenet_tiny, res=IMAGE_SIZE (default 224; demo 64), init=PATH (model_init),
datasets=NAME[:WEIGHT]+... (chestxray14, chexpert, padchest, csv; sets optim.plateau_on="mean_auroc").
"""

from metachex_jax import config_lib


def get_config(arg=None):
    return config_lib.pretrain_config(arg, multitask=True)
