"""MetaChexNet pretraining on NIH ChestX-ray14: 14 pathologies + view position + sex + age. The whole recipe.

Real data (DenseNet-121, 224x224, CheXNet's recipe; prepare the dataset first: python -m metachex_jax.prepare):
  python -m metachex_jax.main --config=configs/pretrain.py --workdir=/tmp/metachex \
      --config.data.data_dir=$HOME/tensorflow_datasets

The synthetic demo (generates and prepares demo data, trains the real DenseNet-121 at 64x64 on CPU):
  python -m metachex_jax.main --config=configs/pretrain.py:demo --workdir=/tmp/metachex_demo

On a weighted mixture of datasets (each prepared first; the losses are masked per label where a dataset lacks it;
evaluation per dataset):
  python -m metachex_jax.main --config=configs/pretrain.py:datasets=chestxray14+chexpert+padchest:0.5 \
      --workdir=/tmp/mixture --config.data.data_dir=$HOME/tensorflow_datasets --config.data.extra_labels="No Finding"

Arguments after the colon (comma-separated): demo, runlocal (a few steps, for smoke tests),
arch=densenet121|densenet169|densenet201|densenet_tiny, res=IMAGE_SIZE (default 224; demo 64), init=PATH (model_init),
datasets=NAME[:WEIGHT]+... (chestxray14, chexpert, padchest, csv; sets optim.plateau_on="mean_auroc").
Any field can be overridden on the command line (--config.optim.lr=3e-4); what each value may be is checked by
the rules in config_lib.py before the run starts. The sections `model`, `data`, `optim` (with `augment`) and the
demo settings are also the transfer recipe's (transfer.py).
"""

from __future__ import annotations

import ml_collections

from metachex_jax.configs import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, demo=False, runlocal=False, arch="densenet121", res=0, init="", datasets="")
    # Stored resolution R and crop S keep CheXNet's 256 -> 224 ratio: R = S * 8 / 7.
    image_size = arg.res or (64 if arg.demo else 224)
    c = ml_collections.ConfigDict()
    c.trainer = "pretrain"
    c.data = data(
        image_size,
        # the dataset, or a weighted mixture "chestxray14:1,chexpert:1,padchest:0.5" of chestxray14, chexpert,
        # padchest and csv (weights: relative sampling rates, default 1; data/input/mixture.py)
        datasets="chestxray14",
        # labels after NIH's 14 in the model's pathology head, e.g. "Lung Opacity,Fracture" (CheXpert's), "No
        # Finding", "Tuberculosis" (PadChest's, or a CSV column's); each dataset is masked where it lacks one
        extra_labels="",
    )
    c.model = model(arg.arch)
    c.loss = ml_collections.ConfigDict(dict(
        weights=dict(pathology=1.0, metadata=1.0, age=1.0),  # of the summed loss
        # "none", or "chexnet": per-class positive/negative weights |N|/(|P|+|N|) and |P|/(|P|+|N|) from the
        # training set's label prevalence, as in CheXNet.
        class_weighting="none",
        age_loss="l1",  # "l1" or "huber", on the normalised age
        huber_delta=1.0,  # in units of age_std
    ))
    c.optim = optim(lr=1e-3)
    c.batch_size_per_device = 16  # global batch = batch_size_per_device x devices (CheXNet: 16 on one GPU)
    # Training length: num_steps when > 0, else num_epochs epochs, an epoch being as many images as the training
    # splits of every dataset hold together (one pass over the data when the mixture weights follow their sizes)
    c.num_steps = 0
    c.num_epochs = 15
    c.max_steps = 0  # stop after this many steps (0 = no limit)
    c.eval_every_steps = 0  # 0 = once per epoch
    c.eval_max_batches = 0  # 0 = the whole split
    c.eval_batch_size_per_device = 64
    c.log_every_steps = 50
    c.checkpoint_every_steps = 0  # 0 = at every evaluation
    c.keep_checkpoints = 2  # the latest N are kept, plus the best by validation mean AUROC
    # The out-of-distribution description of the best checkpoint written at the end (training/ood_reference.py):
    # the features of at most max_images training images (0 = none), flagged beyond the `quantile` of the
    # validation images' distances (`python -m metachex_jax.ood` makes it for another step)
    c.ood = ml_collections.ConfigDict(dict(max_images=2000, quantile=0.99))
    # Where the starting weights come from, in this order (written once, in training/trainer.py initial_state):
    #   1. this run's own workdir (automatic resume), 2. `resume` (another run's checkpoint, full state),
    #   3. `model_init` (backbone weights only: converted ImageNet weights or another run; heads are new),
    #   4. random initialisation.
    c.resume = ""
    c.model_init = arg.init
    run_settings(c)
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
        c.max_steps = 4
        c.eval_max_batches = 2
        c.log_every_steps = 1
        c.n_boot = 20
    return c


def model(arch: str = "densenet121") -> ml_collections.ConfigDict:
    """The `model` section: MetaChexNet with every head (chexnet.py drops the metadata and age heads)."""
    return ml_collections.ConfigDict(dict(
        arch=arch,
        num_pathologies=14,  # NIH's 14 (a mixture's extra labels are added by the trainer)
        metadata_tasks=["view_ap", "sex_male"],  # the binary metadata heads
        age_hidden=256,  # width of the age head's intermediate layer; 0 = no age head
        age_mean=47.0,  # years; the age head regresses (age - age_mean) / age_std
        age_std=17.0,
        dtype="float32",  # computation dtype; "bfloat16" on accelerators. Parameters stay float32.
        # The model's pixel contract besides the sizes in `data` (metachex_jax.contract.pixels.PixelContract):
        # "imagenet" (gray -> 3 channels, ImageNet mean/std) or "xrv" (1 channel, [-1024, 1024]; the stem gets 1
        # input channel), and "resize_crop" (resize to R, centre/random crop S) or "crop_resize" (centre square,
        # resize to S). A model_init from a converted torchxrayvision model sets both to its own.
        normalization="imagenet",
        geometry="resize_crop",
        # Dense blocks stored stacked and run as one lax.scan each: one compiled layer body per block, so the
        # train step compiles in seconds; the same function, and checkpoints convert between the forms. "auto"
        # (yes on CPU, no on GPU/TPU; see the docs' model forms), "yes" or "no".
        scan_layers="auto",
        remat=False,  # recompute each dense layer in the backward pass: less memory, more compute
    ))


def data(image_size: int, **which) -> ml_collections.ConfigDict:
    """The `data` section: where the prepared datasets live, how images are cropped and augmented. `which`: the
    datasets a run reads, the section's first fields (pretraining: datasets, extra_labels; transfer: num_folds,
    fold_seed)."""
    return ml_collections.ConfigDict(dict(
        **which,
        data_dir="~/tensorflow_datasets",  # where `python -m metachex_jax.prepare` wrote the dataset
        # raw copy of chestxray14 (pretraining) or of the TB sets (transfer); if set and the dataset is missing, it
        # is prepared first
        manual_dir="",
        resolution=image_size * 8 // 7,  # stored R x R at build time (R = S * 8 / 7: CheXNet's 256 -> 224)
        image_size=image_size,  # model input S x S (random crop for training, centre for eval)
        val_fraction=0.1,  # of train_val patients, carved out by patient at build time
        val_seed=0,
        # the bit depth high-depth images of every dataset were built with (prepare --bit_depth; 0: the reader's
        # rule, imaging/images.py); it names the build the run reads (r256_bits12)
        bit_depth=0,
        # The build parameters (prepare's flags, data/build/registry.py) and raw copy of each label-table dataset
        # (manual_dir: if set and the build is missing, it is prepared first)
        chexpert=dict(manual_dir="", views="frontal", uncertainty="ignore", test_fraction=0.1, seed=0),
        padchest=dict(manual_dir="", views="frontal", val_fraction=0.1, test_fraction=0.1, seed=0),
        # csv: the CSV file (data/raw/csv_dataset.py); with demo and no CSV, the demo tree's hospital
        csv=dict(manual_dir="", csv="", num_folds=10, seed=0, stratify_by="", val_fraction=0.1, test_fraction=0.2),
        # mimic: MIMIC-CXR-JPG or the DICOM release (csv_dir: the JPG release's CSVs), sex and age from MIMIC-IV's
        # patients.csv.gz when given (data/raw/mimic.py)
        mimic=dict(manual_dir="", views="frontal", uncertainty="ignore", labeler="chexpert", csv_dir="",
                   patients_csv=""),
        tbx11k=dict(manual_dir="", val_fraction=0.2, seed=0, extra_folders="exclude", box_tolerance=2.0),
        vindr=dict(manual_dir="", label_rule="majority", val_fraction=0.1, test_fraction=0.2, seed=0),
        # grain worker processes per host: -1 = auto (pipeline.resolve_workers: in-process on a CPU backend,
        # where XLA needs the cores; one per spare core on GPU/TPU hosts), 0 = in-process, N = N workers
        workers=-1,
        # Pretraining: where training images are cropped, flipped and warped (`augment`): "host" (the input
        # pipeline), "device" (inside the jitted train step; the host only reads and batches the stored images),
        # or "auto": "host" on a CPU backend, "device" on GPU/TPU (see the docs' benchmarks), or what a resumed
        # run used; always "host" for a crop_resize (torchxrayvision) model. Fine-tuning augments on the host.
        augment_on="auto",
        augment=augment(),
    ))


def augment() -> ml_collections.ConfigDict:
    """The `augment` section: metachex_jax.data.input.augment.Augmentation's fields (training only)."""
    return ml_collections.ConfigDict(dict(
        random_crop=True,  # False: centre crop
        flip_probability=0.5,
        rotation_degrees=5.0,
        scale_range=(0.95, 1.05),  # zoom drawn uniformly; > 1 magnifies
        translate_fraction=0.03,  # shift, as a fraction of the image size
    ))


def optim(lr: float) -> ml_collections.ConfigDict:
    """The `optim` section: CheXNet's recipe by default (Adam, lr 1e-3, reduce-on-plateau by 10x)."""
    return ml_collections.ConfigDict(dict(
        name="adam",  # or "adamw"
        lr=lr,
        b1=0.9,
        b2=0.999,
        weight_decay=0.0,  # needs adamw
        grad_clip_norm=0.0,  # 0 = off
        schedule="plateau",  # plateau: on validation loss; cosine: linear warmup
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


def run_settings(c: ml_collections.ConfigDict) -> None:
    """What every trainer's config ends with: seed, the multi-host runtime, bootstrap, the synthetic demo data."""
    c.seed = 0
    c.distributed = "auto"  # "auto": initialise when a cluster is detected; "yes" or "no"
    c.n_boot = 1000  # bootstrap resamples (by patient) for confidence intervals
    c.demo = False  # generate and prepare the synthetic demo data if missing (python -m metachex_jax.demo_data)
    c.demo_dir = "~/.cache/metachex_jax/demo"  # raw demo trees + prepared datasets live here
    c.demo_data = ml_collections.ConfigDict(dict(
        seed=0,
        num_nih=2000,
        num_shenzhen=662,  # the real sets' sizes (Shenzhen 662, Montgomery 138)
        num_montgomery=138,
        num_hospital=200,  # the hospital CSV dataset (Hospital/labels.csv)
        size=256,
    ))
