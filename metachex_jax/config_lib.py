"""Building blocks for the `configs/*.py` files (ml_collections), in the style of big_vision.

A config file is `get_config(arg)`; `arg` is the short string after the colon in
`--config=configs/pretrain.py:demo,arch=densenet_tiny`. `parse_arg` turns it into a ConfigDict whose values keep
the types of the defaults, so `res=64` is an int and `demo` alone means `demo=True`. Any field can still be
overridden on the command line: `--config.optim.lr=3e-4`.
"""

from __future__ import annotations

import ml_collections

from metachex_jax.labels import METADATA_TASKS, PATHOLOGIES


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parse "a,b=3,c=x" against `defaults` (the allowed keys and their types); unknown keys are an error."""
    out = ml_collections.ConfigDict(defaults)
    bad = []
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            bad.append(key)
            continue
        default = defaults[key]
        if not value:
            value = True if isinstance(default, bool) else None
            if value is None:
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
        elif isinstance(default, bool):
            value = value.lower() in ("1", "true", "yes", "y")
        elif default is not None:
            value = type(default)(value)
        out[key] = value
    if bad:
        raise ValueError(f"unknown config argument(s) {bad}; allowed: {sorted(defaults)}")
    return out


def model_config(arch: str = "densenet121", multitask: bool = True) -> ml_collections.ConfigDict:
    """The `model` section: MetaChexNet (all heads) or, with multitask=False, the CheXNet baseline."""
    return ml_collections.ConfigDict(dict(
        arch=arch,
        num_pathologies=len(PATHOLOGIES),
        metadata_tasks=list(METADATA_TASKS) if multitask else [],
        age_hidden=256 if multitask else 0,  # width of the age head's intermediate layer; 0 = no age head
        age_mean=47.0,  # years; the age head regresses (age - age_mean) / age_std
        age_std=17.0,
        dtype="float32",  # computation dtype; "bfloat16" on accelerators. Parameters stay float32.
    ))


def loss_config(multitask: bool = True) -> ml_collections.ConfigDict:
    """The `loss` section: per-task weights of the summed loss and the per-task options."""
    return ml_collections.ConfigDict(dict(
        weights=dict(pathology=1.0, metadata=1.0 if multitask else 0.0, age=1.0 if multitask else 0.0),
        # "none", or "chexnet": per-class positive/negative weights |N|/(|P|+|N|) and |P|/(|P|+|N|) from the
        # training set's label prevalence, as in CheXNet.
        class_weighting="none",
        age_loss="l1",  # "l1" or "huber", on the normalised age
        huber_delta=1.0,  # in units of age_std
    ))


def data_config(dataset: str = "chestxray14", resolution: int = 256, image_size: int = 224):
    """The `data` section: where the prepared datasets live, how images are cropped and augmented."""
    from metachex_jax.data import registry  # the build parameters of each dataset family, with their defaults

    return ml_collections.ConfigDict(dict(
        # Pretraining: the dataset, or a weighted mixture "chestxray14:1,chexpert:1,padchest:0.5" of any of
        # chestxray14, chexpert, padchest and csv (weights are relative sampling rates, default 1; data/mixture.py)
        datasets=dataset,
        # Labels after NIH's 14 in the model's pathology head, e.g. "Lung Opacity,Fracture" (CheXpert's), "No
        # Finding", "Tuberculosis" (PadChest's, or a CSV column's); each dataset is masked where it lacks one
        extra_labels="",
        data_dir="~/tensorflow_datasets",  # where `python -m metachex_jax.prepare` wrote the dataset
        manual_dir="",  # chestxray14's raw copy; if set and the dataset is missing, it is prepared first
        resolution=resolution,  # stored R x R at build time
        image_size=image_size,  # model input S x S (random crop for training, centre crop for eval)
        val_fraction=0.1,  # chestxray14: of train_val patients, carved out by patient at build time
        val_seed=0,
        # The other datasets' build parameters (prepare's flags; data/registry.py) and raw copies (manual_dir: if set
        # and the build is missing, it is prepared first). csv.csv is the CSV file (see data/csv_dataset.py).
        **{name: dict(manual_dir="", **registry.family(name).parameters) for name in ("chexpert", "padchest", "csv")},
        # grain worker processes per host: -1 = auto (pipeline.resolve_workers: in-process on a CPU backend,
        # where XLA needs the cores; one per spare core on GPU/TPU hosts), 0 = in-process, N = N workers
        workers=-1,
        # metachex_jax.data.augment.Augmentation's fields
        augment=dict(random_crop=True, flip_probability=0.5, rotation_degrees=5.0, scale_range=(0.95, 1.05),
                     translate_fraction=0.03),
    ))


def optim_config(lr: float = 1e-3):
    """The `optim` section: CheXNet's recipe by default (Adam, lr 1e-3, reduce-on-plateau by 10x)."""
    return ml_collections.ConfigDict(dict(
        name="adam",  # "adam" or "adamw"
        lr=lr,
        b1=0.9,
        b2=0.999,
        weight_decay=0.0,
        grad_clip_norm=0.0,  # 0 = off
        schedule="plateau",  # "plateau" (on validation loss) or "cosine" (with linear warmup)
        plateau_factor=0.1,
        plateau_patience=1,  # evaluations without improvement before the lr is reduced
        # What the plateau watches on validation: "loss" (CheXNet's) or "mean_auroc" (for a mixture: the mean over
        # datasets of each dataset's mean AUROC over the labels it has; the best checkpoint always uses it)
        plateau_on="loss",
        warmup_steps=0,
        # Scale the lr with the global batch: "linear" (lr * batch / reference_batch), "sqrt" (by its square root,
        # gentler for Adam), or "none". With one device and batch 16 every rule gives CheXNet's 1e-3.
        lr_scaling="sqrt",
        reference_batch=16,  # CheXNet's batch size
    ))


def demo_data_config() -> dict:
    """The synthetic demo tree's parameters (metachex_jax.demo_data.write_demo_data)."""
    return dict(seed=0, num_nih=2000, num_shenzhen=300, num_montgomery=100, num_hospital=200, size=256)


def pretrain_config(arg: str | None, multitask: bool) -> ml_collections.ConfigDict:
    """The whole pretraining config; `configs/pretrain.py` (multitask) and `configs/chexnet.py` call this.

    `arg`: demo, runlocal, arch=..., res=IMAGE_SIZE, init=MODEL_INIT_PATH, datasets=A+B:W+... (a mixture; see the
    config files' docstrings).
    """
    arg = parse_arg(arg, demo=False, runlocal=False, arch="densenet121", res=0, init="", datasets="")
    c = ml_collections.ConfigDict()
    c.trainer = "pretrain"
    c.seed = 0
    # Stored resolution R and crop S keep CheXNet's 256 -> 224 ratio: R = S * 8 / 7.
    image_size = arg.res or (64 if arg.demo else 224)
    c.data = data_config("chestxray14", resolution=image_size * 8 // 7, image_size=image_size)
    c.model = model_config(arg.arch, multitask)
    c.loss = loss_config(multitask)
    c.optim = optim_config(lr=1e-3)
    c.batch_size_per_device = 16  # global batch = batch_size_per_device x devices (CheXNet: 16 on one GPU)
    # Training length: num_steps when > 0, else num_epochs epochs, an epoch being as many images as the training
    # splits of every dataset hold together (one pass over the data when the mixture weights follow their sizes)
    c.num_steps = 0
    c.num_epochs = 15
    c.eval_every_steps = 0  # 0 = once per epoch
    c.log_every_steps = 50
    c.checkpoint_every_steps = 0  # 0 = at every evaluation
    c.keep_checkpoints = 2  # the latest N are kept, plus the best by validation mean AUROC
    c.n_boot = 1000  # bootstrap resamples (by patient) for confidence intervals
    c.eval_batch_size_per_device = 64
    # Where the starting weights come from, in this order (written once, in train.initial_state):
    #   1. this run's own workdir (automatic resume), 2. `resume` (another run's checkpoint, full state),
    #   3. `model_init` (backbone weights only: converted ImageNet weights or another run; heads are new),
    #   4. random initialisation.
    c.resume = ""
    c.model_init = arg.init
    c.distributed = "auto"  # "auto": jax.distributed.initialize() when a cluster is detected; "yes"; "no"
    c.demo = False  # generate and prepare the synthetic demo data if missing (see metachex_jax.demo_data)
    c.demo_dir = "~/.cache/metachex_jax/demo"  # raw demo trees + prepared datasets live here
    c.demo_data = demo_data_config()
    if arg.datasets:
        c.data.datasets = arg.datasets.replace("+", ",")
        c.optim.plateau_on = "mean_auroc"  # the losses of different datasets do not add up to one scale
    if arg.demo:
        c.demo = True
        c.data.val_fraction = 0.15
        c.batch_size_per_device = 32
        c.eval_batch_size_per_device = 64
        c.num_epochs = 10
        c.optim.schedule = "cosine"
        c.optim.warmup_steps = 20
        c.log_every_steps = 10
        c.n_boot = 200
    if arg.runlocal:
        c.num_epochs = 1
        c.max_steps = 4  # stop after this many steps (0 = no limit)
        c.eval_max_batches = 2
        c.log_every_steps = 1
        c.n_boot = 20
    else:
        c.max_steps = 0
        c.eval_max_batches = 0  # 0 = the whole split
    return c


def transfer_config(arg: str | None) -> ml_collections.ConfigDict:
    """The TB transfer comparison config; `configs/transfer.py`, `linear_probe.py` and `finetune.py` call this.

    `arg`: demo, runlocal, methods=probe+finetune, init=PATH (init_from), res=IMAGE_SIZE, arch=... (see
    configs/transfer.py). One run = every starting weight x every method x every protocol -> one report.
    """
    arg = parse_arg(arg, demo=False, runlocal=False, methods="probe+finetune", arch="densenet121", res=0,
                    init="")
    c = ml_collections.ConfigDict()
    c.trainer = "transfer"
    c.seed = 0
    image_size = arg.res or (64 if arg.demo else 224)
    c.data = data_config("shenzhen", resolution=image_size * 8 // 7, image_size=image_size)
    c.data.num_folds = 10  # stratified folds stored in the TB records at build time (k-fold CV), or drawn for a
    c.data.fold_seed = 0  # dataset that stores none
    c.model = model_config(arg.arch, multitask=True)  # every starting weight must have this architecture
    # Starting weights, compared side by side. Each is a pretraining workdir (MetaChexNet or CheXNet; its best
    # checkpoint), a convert_torchvision output directory (e.g. ImageNet weights), or "random".
    c.init_from = arg.init  # the weights under study; required unless baselines_only
    c.baselines_only = False  # True: run the compare_with baselines without init_from (else its absence is an error)
    # More starting weights: comma-separated paths, "random" (BatchNorm at its initial statistics) and/or
    # "random_bn" (random weights, BatchNorm statistics from bn_statistics_images ChestX-ray14 training images
    # read from data.data_dir at this resolution: needs that dataset prepared).
    c.compare_with = "random"
    c.bn_statistics_images = 1280
    c.checkpoint_step = "best"  # which checkpoint of a pretraining workdir: "best", "latest" or a step
    c.methods = arg.methods  # "probe", "finetune" or "probe+finetune"
    # The binary target(s), comma-separated, named as in the shared label space: "Tuberculosis" is the TB sets'
    # label (and PadChest's, and the demo hospital's); any label of the datasets works (e.g. "Cardiomegaly" of a
    # CSV dataset). Several targets give one probe / fine-tune per target, side by side in the report.
    c.targets = "Tuberculosis"
    # cv_<dataset>: k-fold CV within a dataset; <a>[+<b>...]_to_<c>: train on all of a (and b), test on all of c
    # (the unseen-dataset test). Datasets: shenzhen, montgomery, chexpert, padchest, csv (config.data.csv: your
    # own; the demo's hospital with demo), chestxray14. Datasets without stored folds get data.num_folds folds of
    # patients, stratified by the target (seed data.fold_seed).
    c.protocols = "cv_shenzhen,cv_montgomery,shenzhen_to_montgomery,montgomery_to_shenzhen"
    c.feature_cache_dir = "~/.cache/metachex_jax/features"  # keyed on the weights' and the dataset's content
    c.feature_batch_size = 64
    c.probe = dict(
        inner_folds=5,  # inner stratified CV on the training folds only, to choose the L2 strength
        l2_grid=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0),  # lambda: mean log loss + l2/2 |w|^2
        selection="log_loss",  # inner-CV criterion: "log_loss" or "auroc"
        max_iter=500,
        tol=1e-5,  # preconditioned gradient norm at which L-BFGS stops
    )
    c.finetune = dict(
        max_folds=0,  # 0 = every fold of a CV protocol; n = only the first n folds (the demo)
        num_epochs=30,
        patience=5,  # epochs without a better validation AUROC before stopping
        batch_size=16,
        eval_batch_size=64,
        head_lr=1e-3,
        backbone_lr=1e-4,  # lower than the head's: the pretrained backbone moves slowly
        # BatchNorm statistics of the test predictions in the cross-dataset protocols (recomputed for the
        # fine-tuned weights either way): "fit" = the training set's fit images; "target" = the unlabelled test
        # images (test-time adaptation). Within a dataset they always come from the fit images.
        bn_stats="fit",
    )
    c.finetune.optim = optim_config(lr=1e-3)  # name, betas, clipping, warmup; finetune.py sets the two lrs and a
    # constant schedule (early stopping decides the length)
    c.finetune.optim.warmup_steps = 0
    c.finetune.optim.lr_scaling = "none"  # head_lr and backbone_lr are used as written, whatever the batch size
    # Screening operating points, thresholds chosen on training data: WHO's target product profile for a TB
    # triage test asks for sensitivity >= 0.90 with specificity >= 0.70.
    c.screening = dict(sensitivity=0.9, specificity=0.7)
    # The deployable TB model fitted at the end on every training image and saved to WORKDIR/model/ for
    # `predict` (transfer/deploy.py; chosen by the config, never by test results): start = a start's name
    # ("" = init_from's, "none" = no model), method ("" = finetune when the run fine-tunes, else probe), protocol
    # ("" = the first report column: a protocol, or <protocol>.<target> with several targets; its training set,
    # one dataset, is fitted), threshold_rule ("sensitivity": the largest
    # threshold with out-of-fold sensitivity >= screening.sensitivity; or "youden").
    c.deploy = dict(start="", method="", protocol="", threshold_rule="sensitivity")
    c.calibration_bins = 10  # equal-width probability bins of the expected calibration error and reliability plots
    c.finetune.augment = c.data.augment.to_dict()
    c.n_boot = 1000
    c.distributed = "auto"
    c.demo = False  # generate and prepare the synthetic demo data (the same tree the pretraining demo uses)
    c.demo_dir = "~/.cache/metachex_jax/demo"
    c.demo_data = demo_data_config()
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
    if arg.runlocal:
        c.finetune.max_folds = 1
        c.finetune.num_epochs = 1
        c.n_boot = 20
    return c
