"""The CheXNet baseline (Rajpurkar et al., 2017): the pretraining recipe (pretrain.py) with the 14-pathology head
alone, no metadata or age heads and no loss for them. Same DenseNet, data, optimiser and trainer.

Real data:
  python -m metachex_jax.main --config=configs/chexnet.py --workdir=/tmp/chexnet \
      --config.data.data_dir=$HOME/tensorflow_datasets

Demo on the synthetic data:
  python -m metachex_jax.main --config=configs/chexnet.py:demo --workdir=/tmp/chexnet_demo

Arguments: as pretrain.py's (demo, runlocal, arch=..., res=..., init=..., datasets=...).
"""

from __future__ import annotations

import ml_collections

from metachex_jax.configs import pretrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = pretrain.get_config(arg)
    c.model.metadata_tasks = []
    c.model.age_hidden = 0
    c.loss.weights.metadata = 0.0
    c.loss.weights.age = 0.0
    return c
