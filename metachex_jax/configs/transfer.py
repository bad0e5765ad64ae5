"""Transfer comparison: starting weights x {linear probe, fine-tuning} x protocols x targets -> one report. TB on
Shenzhen and Montgomery by default; any prepared datasets and binary labels with config.protocols / config.targets.
The whole recipe; its `model`, `data`, fine-tuning `optim` and `augment` sections and the demo settings are the
pretraining recipe's (pretrain.py: the same fields and defaults), set here where they differ.

Real data (prepare shenzhen and montgomery first with python -m metachex_jax.prepare; PRE is a pretraining
workdir):
  python -m metachex_jax.main --config=configs/transfer.py --config.init_from=PRE --workdir=/tmp/tb \
      --config.data.data_dir=$HOME/tensorflow_datasets --config.compare_with=random,/path/to/imagenet_backbone

The demo (after `python -m metachex_jax.main --config=configs/pretrain.py:demo --workdir=PRE`; the TB sets are
prepared from the same synthetic tree):
  python -m metachex_jax.main --config=configs/transfer.py:demo --config.init_from=PRE --workdir=/tmp/tb_demo

With torchxrayvision's chest X-ray weights (converted with `python -m metachex_jax.convert_torchxrayvision`):
      --config.compare_with=random,/path/to/imagenet_backbone,/path/to/xrv-nih,/path/to/xrv-all

Your own data (a CSV dataset, see data/raw/csv_dataset.py), e.g. cross-validated within it and trained on both TB
sets and tested on it, for two of its labels:
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
reliability_*.png,predictions/}. linear_probe.py and finetune.py are this recipe with one method.
"""

from __future__ import annotations

import ml_collections

from metachex_jax.configs import config_lib, pretrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, demo=False, runlocal=False, methods="probe+finetune", arch="densenet121", res=0,
                               init="")
    image_size = arg.res or (64 if arg.demo else 224)
    c = ml_collections.ConfigDict()
    c.trainer = "transfer"
    c.data = pretrain.data(
        image_size,
        # stratified folds stored in the TB records at build time (k-fold CV), or drawn for a dataset that stores
        # none (by patient, stratified by the target)
        num_folds=10,
        fold_seed=0,
    )
    c.model = pretrain.model(arg.arch)  # every starting weight must have this architecture
    # Starting weights, compared side by side. Each is a pretraining workdir (MetaChexNet or CheXNet; its best
    # checkpoint), a convert_torchvision output directory (e.g. ImageNet weights), a model directory such as a
    # convert_torchxrayvision output (fed its own pixels: 1 channel, [-1024, 1024], centre square), or "random".
    # The weights under study, required unless baselines_only: one run, or several runs as ONE start (a comma list
    # and/or glob patterns, e.g. /runs/metachexnet_seed*: seeds of one config); transfer/groups.py
    c.init_from = arg.init
    c.init_name = ""  # the report's name of that start; "" = the weights' own (metachexnet, chexnet, imagenet, ...)
    c.baselines_only = False  # True: run the compare_with baselines without init_from (else its absence is an error)
    # More starting weights, one start per entry (a glob pattern: its matches, several runs as one start):
    # comma-separated paths, "random" (BatchNorm at its initial statistics) and/or
    # "random_bn" (random weights, BatchNorm statistics from bn_statistics_images ChestX-ray14 training images read
    # from data.data_dir at this resolution: needs that dataset prepared).
    c.compare_with = "random"
    c.bn_statistics_images = 1280
    c.checkpoint_step = "best"  # which checkpoint of a pretraining workdir: "best", "latest" or a step
    c.methods = arg.methods  # "probe", "finetune" or "probe+finetune"
    # The binary target(s), comma-separated, named as in the shared label space: "Tuberculosis" is the TB sets'
    # label (and PadChest's, and the demo hospital's); any label of the datasets works (e.g. "Cardiomegaly" of a
    # CSV dataset). Several targets: one probe / fine-tune per target, side by side.
    c.targets = "Tuberculosis"
    # cv_<dataset>: k-fold CV within a dataset; <a>[+<b>...]_to_<c>: train on all of a (and b), test on all of c
    # (the unseen-dataset test). Datasets: shenzhen, montgomery, csv (data.csv: your own; the demo's hospital with
    # demo), chexpert, padchest, chestxray14. A protocol whose datasets lack a target is skipped for it, with a note.
    c.protocols = "cv_shenzhen,cv_montgomery,shenzhen_to_montgomery,montgomery_to_shenzhen"
    c.feature_cache_dir = "~/.cache/metachex_jax/features"  # keyed on the weights' and data's content
    c.feature_batch_size = 64
    c.probe = ml_collections.ConfigDict(dict(
        inner_folds=5,  # inner stratified CV (folds of patients) to choose the L2 strength
        l2_grid=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0),  # lambda: mean log loss + l2/2 |w|^2
        selection="log_loss",  # inner-CV criterion: "log_loss" or "auroc"
        max_iter=500,
        tol=1e-5,  # preconditioned gradient norm at which L-BFGS stops
    ))
    c.finetune = ml_collections.ConfigDict(dict(
        max_folds=0,  # 0 = every fold of a CV protocol; n = only the first n folds (demo)
        num_epochs=30,
        patience=5,  # epochs without a better validation AUROC before stopping
        batch_size=16,
        eval_batch_size=64,
        head_lr=1e-3,
        backbone_lr=1e-4,  # lower than the head's: the pretrained backbone moves slowly
        # BatchNorm statistics of the test predictions in the cross-dataset protocols (recomputed for the fine-tuned
        # weights either way): "fit" = the training set's fit images; "target" = the unlabelled test images
        # (test-time adaptation), and then the validation predictions the thresholds are chosen on use the
        # validation images' own. Within a dataset they always come from the fit images.
        bn_stats="fit",
        # name, betas, clipping: pretraining's optimiser; the two lrs above are used as written (lr_scaling "none")
        # with a constant schedule (early stopping decides the length)
        optim=pretrain.optim(lr=1e-3),
        augment=pretrain.augment(),
    ))
    c.finetune.optim.warmup_steps = 0
    c.finetune.optim.lr_scaling = "none"  # head_lr and backbone_lr are used as written, whatever the batch size
    # Screening operating points, thresholds chosen on training data: WHO's target product profile for a TB triage
    # test asks for sensitivity >= 0.90 with specificity >= 0.70.
    c.screening = ml_collections.ConfigDict(dict(sensitivity=0.9, specificity=0.7))
    # The deployable TB model fitted at the end on every training image and saved to WORKDIR/model/ for `predict`
    # (transfer/deploy.py; chosen by the config, never by test results).
    c.deploy = ml_collections.ConfigDict(dict(
        start="",  # a start's name ("" = init_from's, "none" = no model); checked once loaded
        method="",  # "" = finetune when the run fine-tunes, else probe
        # "" = the first report column (a protocol, or <protocol>.<target> with several targets); its training set,
        # one dataset, is fitted
        protocol="",
        # "sensitivity": the largest threshold with out-of-fold sensitivity >= screening.sensitivity; "youden"
        threshold_rule="sensitivity",
        # the model's OOD description (contract/ood.py): the training images' features, flagged beyond this
        # quantile of their out-of-fold distances; 0 = no description
        ood_quantile=0.99,
    ))
    c.calibration_bins = 10  # equal-width probability bins of the expected calibration error and reliability plots
    # Label-efficiency curves (transfer/curves.py): the probe (and, with train_sizes_finetune, the fine-tuning) on
    # train_draws stratified, patient-grouped draws of each size of every split's training images, evaluated on the
    # full run's held-out images. Sizes: comma-separated image counts and "all" (e.g. "10,20,50,100,all"; "" = no
    # curves); a size that cannot leave 5 images of each class is skipped with a note.
    c.train_sizes = ""
    c.train_draws = 3
    c.train_sizes_finetune = False
    c.curve_target_auroc = 0.9  # the report names the smallest size whose mean AUROC reaches it
    pretrain.run_settings(c)
    if arg.demo:
        c.demo = True
        c.feature_batch_size = 100
        c.finetune.max_folds = 2
        c.compare_with = "random,random_bn" if "probe" in arg.methods else "random"  # random_bn: probe only
        c.data.val_fraction = 0.15  # as the pretraining demo: random_bn reads the same ChestX-ray14 build
        c.finetune.num_epochs = 3
        c.finetune.patience = 2
        c.finetune.batch_size = 32
        c.n_boot = 200
        c.train_sizes = "10,20,50,all"
    if arg.runlocal:
        c.finetune.max_folds = 1
        c.finetune.num_epochs = 1
        c.n_boot = 20
    return c
