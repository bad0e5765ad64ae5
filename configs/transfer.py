"""Transfer comparison: starting weights x {linear probe, fine-tuning} x protocols x targets -> one report. TB on
Shenzhen and Montgomery by default; any prepared datasets and binary labels with config.protocols / config.targets.

Real data (prepare shenzhen and montgomery first, see README; PRE is a pretraining workdir):
  python -m metachex_jax.main --config=configs/transfer.py --config.init_from=PRE --workdir=/tmp/tb \
      --config.data.data_dir=$HOME/tensorflow_datasets --config.compare_with=random,/path/to/imagenet_backbone

The demo (after `python -m metachex_jax.main --config=configs/pretrain.py:demo --workdir=PRE`; the TB sets are
prepared from the same synthetic tree):
  python -m metachex_jax.main --config=configs/transfer.py:demo --config.init_from=PRE --workdir=/tmp/tb_demo

With torchxrayvision's chest X-ray weights (converted with `python -m metachex_jax.convert_torchxrayvision`):
      --config.compare_with=random,/path/to/imagenet_backbone,/path/to/xrv-nih,/path/to/xrv-all

Your own data (a CSV dataset, see data/csv_dataset.py), e.g. cross-validated within it and trained on both TB sets
and tested on it, for two of its labels:
  python -m metachex_jax.main --config=configs/transfer.py --config.init_from=PRE --workdir=/tmp/hospital \
      --config.data.csv.csv=/data/hospital/labels.csv --config.data.csv.manual_dir=/data/hospital \
      --config.protocols=cv_csv,shenzhen+montgomery_to_csv --config.targets=Tuberculosis,Cardiomegaly
(with :demo and no CSV given, csv is the demo tree's synthetic hospital). A protocol whose datasets lack a target
(shenzhen has no Cardiomegaly) is skipped for that target, with a note in the report.

Starting weights in compare_with: paths, "random" (BatchNorm at its initial statistics) and "random_bn" (random
weights, BatchNorm statistics from ChestX-ray14 training images in data.data_dir; probe only; the demo compares
both). init_from is required; --config.baselines_only=True runs the compare_with baselines alone.

Fine-tuned models predict with BatchNorm statistics recomputed for their weights; across datasets from the
training set (--config.finetune.bn_stats=fit, the default) or from the unlabelled test set (=target; the validation
predictions the thresholds are chosen on then use the validation images' own statistics).

Arguments after the colon (comma-separated): demo, runlocal (one fine-tuning fold, one epoch),
methods=probe|finetune|probe+finetune, init=PATH (init_from), res=IMAGE_SIZE (default 224; demo 64),
arch=densenet121|...|densenet_tiny. Outputs: WORKDIR/report/{comparison.json,comparison.md,roc_*.png,
reliability_*.png,predictions/}.
"""

from metachex_jax import config_lib


def get_config(arg=None):
    return config_lib.transfer_config(arg)
