"""TB transfer comparison: starting weights x {linear probe, fine-tuning} x protocols -> one report.

Real data (prepare shenzhen and montgomery first, see README; PRE is a pretraining workdir):
  python -m metachex_jax.main --config=configs/transfer.py --config.init_from=PRE --workdir=/tmp/tb \
      --config.data.data_dir=$HOME/tensorflow_datasets --config.compare_with=random,/path/to/imagenet_backbone

The demo (after `python -m metachex_jax.main --config=configs/pretrain.py:demo --workdir=PRE`; the TB sets are
prepared from the same synthetic tree):
  python -m metachex_jax.main --config=configs/transfer.py:demo --config.init_from=PRE --workdir=/tmp/tb_demo

Starting weights in compare_with: paths, "random" (BatchNorm at its initial statistics) and "random_bn" (random
weights, BatchNorm statistics from ChestX-ray14 training images in data.data_dir; probe only; the demo compares
both). init_from is required; --config.baselines_only=True runs the compare_with baselines alone.

Fine-tuned models predict with BatchNorm statistics recomputed for their weights; across datasets from the
training set (--config.finetune.bn_stats=fit, the default) or from the unlabelled test set (=target).

Arguments after the colon (comma-separated): demo, runlocal (one fine-tuning fold, one epoch),
methods=probe|finetune|probe+finetune, init=PATH (init_from), res=IMAGE_SIZE (default 224; demo 64),
arch=densenet121|...|densenet_tiny. Outputs: WORKDIR/report/{comparison.json,comparison.md,roc_*.png,
reliability_*.png,predictions/}.
"""

from metachex_jax import config_lib


def get_config(arg=None):
    return config_lib.transfer_config(arg)
