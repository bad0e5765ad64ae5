"""Building blocks for the `configs/*.py` files (ml_collections), in the style of big_vision, and their checks.

A config file is `get_config(arg)`; `arg` is the short string after the colon in
`--config=configs/pretrain.py:demo,arch=densenet_tiny`. `parse_arg` turns it into a ConfigDict whose values keep
the types of the defaults, so `res=64` is an int and `demo` alone means `demo=True`. Any field can still be
overridden on the command line: `--config.optim.lr=3e-4`.

Sections and their rules. Each section is built by `section(NAME, field=(default, rule), ...)`: every field
declares its default and, next to it, the rule its value must satisfy, e.g.

    dtype=("float32", one_of("float32", "bfloat16")),  # computation dtype

A section may also name `checks`: functions of the whole section for combinations that cannot work (the root
sections "pretrain" and "transfer" see the whole config). `validate(config)`, which `main` runs before anything
else, applies the rules of every section wherever a sub-dict of that name appears (so `optim`'s rules also check
`finetune.optim`) and raises one `errors.ConfigError` listing every problem. Rules are the small functions
below (`one_of`, `integer`, `number`, `boolean`, `existing_path`, ...); each returns None or what is wrong.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections

from metachex_jax.errors import ConfigArgumentError, ConfigError
from metachex_jax.labels import METADATA_TASKS, PATHOLOGIES

TRAINERS = ("pretrain", "transfer")  # config.trainer -> main.run dispatches; each is also a root section
METHODS = ("probe", "finetune")  # transfer methods
RANDOM_STARTS = ("random", "random_bn")  # transfer starting weights that are not paths


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parse "a,b=3,c=x" against `defaults` (the allowed keys and their types); unknown keys are an error."""
    out = ml_collections.ConfigDict(defaults)
    bad, problems = [], []
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
                problems.append(f"config argument {key!r} needs a value ({key}=...)")
                continue
        elif isinstance(default, bool):
            value = value.lower() in ("1", "true", "yes", "y")
        elif default is not None:
            try:
                value = type(default)(value)
            except ValueError:
                problems.append(f"config argument {key}={value!r}: must be {type(default).__name__}")
                continue
        out[key] = value
    if bad:
        problems.append(f"unknown config argument(s) {bad}; allowed: {sorted(defaults)}")
    if problems:
        raise ConfigArgumentError("; ".join(problems))
    return out


# -------------------------------------------------------------------------------------------------------------
# Rules: value -> None (fine) or what is wrong with it.
# -------------------------------------------------------------------------------------------------------------

Rule = Callable[[Any], "str | None"]


def boolean(value) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


def one_of(*choices) -> Rule:
    def rule(value):
        return None if value in choices else f"must be one of {', '.join(map(str, choices))}"
    return rule


def _bounds(value, min=None, max=None, above=None, below=None) -> str | None:
    wrong = []
    if min is not None and not value >= min:
        wrong.append(f">= {min}")
    if max is not None and not value <= max:
        wrong.append(f"<= {max}")
    if above is not None and not value > above:
        wrong.append(f"> {above}")
    if below is not None and not value < below:
        wrong.append(f"< {below}")
    return f"must be {' and '.join(wrong)}" if wrong else None


def integer(min=None, max=None) -> Rule:
    def rule(value):
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be an integer"
        return _bounds(value, min, max)
    return rule


def number(min=None, max=None, above=None, below=None) -> Rule:
    def rule(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return "must be a number"
        return _bounds(value, min, max, above, below)
    return rule


def string(value) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def text(value) -> str | None:
    return None if isinstance(value, str) and value.strip() else "must be a non-empty string"


def local_path(value) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "must be a local folder"
    return "must be a local folder, not a URL" if "://" in value else None


def existing_path(value) -> str | None:
    """"" (not used) or a local or gs:// path that exists."""
    if not isinstance(value, str):
        return "must be a path"
    if not value:
        return None
    from metachex_jax import files

    return None if files.exists(files.absolute(value)) else f"{files.absolute(value)} does not exist"


def subset_of(*choices) -> Rule:
    def rule(value):
        if not isinstance(value, (list, tuple)):
            return "must be a list"
        unknown = [v for v in value if v not in choices]
        return f"unknown {unknown}; choose from {', '.join(choices)}" if unknown else None
    return rule


def numbers(above=None) -> Rule:
    """A non-empty list of numbers, each > above."""
    each = number(above=above)

    def rule(value):
        if not isinstance(value, (list, tuple)) or not value:
            return "must be a non-empty list of numbers"
        wrong = [v for v in value if each(v)]
        return f"{wrong}: each must be a number > {above}" if wrong else None
    return rule


def pixel_normalization(value) -> str | None:
    from metachex_jax.preprocessing import NORMALIZATIONS

    return None if value in NORMALIZATIONS else f"must be one of {', '.join(NORMALIZATIONS)}"


def pixel_geometry(value) -> str | None:
    from metachex_jax.data.augment import GEOMETRIES

    return None if value in GEOMETRIES else f"must be one of {', '.join(GEOMETRIES)}"


def architecture(value) -> str | None:
    from metachex_jax.models import SPECS

    return None if value in SPECS else f"unknown architecture; choose one of {', '.join(sorted(SPECS))}"


def split_list(value: str) -> list[str]:
    """"a, b,,c" -> ["a", "b", "c"]; "probe+finetune" -> ["probe", "finetune"]."""
    return [v.strip() for v in value.replace("+", ",").split(",") if v.strip()]


def names_from(choices: Callable[[], tuple[str, ...]] | tuple[str, ...]) -> Rule:
    """A comma- (or +-) separated string of one or more of `choices` (a tuple, or a function returning one)."""
    def rule(value):
        known = choices() if callable(choices) else choices
        if not isinstance(value, str) or not split_list(value):
            return f"must name one or more of {', '.join(known)}"
        unknown = [name for name in split_list(value) if name not in known]
        return f"unknown {', '.join(unknown)}; choose from {', '.join(known)}" if unknown else None
    return rule


def starting_weights(value) -> str | None:
    """A comma-separated string of "random", "random_bn" and paths that exist ("" = none)."""
    if not isinstance(value, str):
        return "must be a comma-separated string"
    wrong = [existing_path(item) for item in split_list(value) if item not in RANDOM_STARTS and existing_path(item)]
    return f"{'; '.join(wrong)} (each must be random, random_bn or an existing path)" if wrong else None


PRETRAIN_DATASETS = ("chestxray14", "chexpert", "padchest", "csv")  # what pretraining reads (a mixture of them)
TRANSFER_DATASETS = ("shenzhen", "montgomery", "csv", "chexpert", "padchest", "chestxray14")


def mixture(value) -> str | None:
    """data.datasets: "name[:weight],..." of PRETRAIN_DATASETS."""
    from metachex_jax.data import mixture as mixture_lib

    try:
        names = mixture_lib.parse_mixture(value) if isinstance(value, str) else None
    except ValueError:
        names = None
    if names is None:
        return "must be name[:weight] entries separated by commas, each name once, weights > 0"
    unknown = [n for n in names if n not in PRETRAIN_DATASETS]
    return f"unknown {', '.join(unknown)}; pretraining takes {', '.join(PRETRAIN_DATASETS)}" if unknown else None


def protocol_list(value) -> str | None:
    """transfer protocols: cv_<dataset> or <a>[+<b>...]_to_<c> (transfer/protocols.py), datasets known."""
    from metachex_jax.transfer.protocols import parse_protocols

    try:
        protocols = parse_protocols(value) if isinstance(value, str) else None
    except ValueError as e:
        return str(e)
    if protocols is None:
        return "must be a comma-separated string"
    unknown = sorted({d for p in protocols for d in p.datasets} - set(TRANSFER_DATASETS))
    return f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(TRANSFER_DATASETS)}" if unknown else None


def uncertainty_policy(value) -> str | None:
    from metachex_jax.data.chexpert import parse_uncertainty

    try:
        parse_uncertainty(value)
    except (ValueError, AttributeError) as e:
        return str(e)
    return None


def protocol_or_empty(value) -> str | None:
    """"" or a report column: a protocol, or <protocol>.<target> with several targets."""
    if value == "":
        return None
    wrong = protocol_list(value.split(".")[0]) if isinstance(value, str) else "must be a string"
    return f"must be empty or a protocol column of the run ({wrong})" if wrong else None


def checkpoint_step(value) -> str | None:
    ok = value in ("best", "latest") or (isinstance(value, int) and value >= 0) or str(value).isdigit()
    return None if ok else "must be best, latest or a step number"


# -------------------------------------------------------------------------------------------------------------
# Sections: each field is (default, rule).
# -------------------------------------------------------------------------------------------------------------

Problem = tuple[tuple[str, ...], str]  # what a check finds: (the fields involved, what is wrong)


@dataclasses.dataclass
class _Rules:
    fields: dict[str, Rule]  # dotted field (within the section) -> rule
    checks: tuple[Callable[[Any], list[Problem]], ...]  # section ConfigDict -> problems of combinations


_SECTIONS: dict[str, _Rules] = {}  # section name -> its rules (recorded by `section`)


def section(name: str, /, *, checks: tuple[Callable, ...] = (), **fields) -> ml_collections.ConfigDict:
    """A ConfigDict of the fields' defaults; records their rules (and `checks`) under the section's `name`.

    A field is (default, rule), a dict of such (a nested group, e.g. loss.weights) or a ConfigDict another
    `section` built (a sub-section with its own rules). A check is a function of the section's ConfigDict
    returning [(fields involved, what is wrong), ...]."""
    rules: dict[str, Rule] = {}

    def defaults(items: dict, prefix: str) -> dict:
        values = {}
        for key, spec in items.items():
            if isinstance(spec, ml_collections.ConfigDict):
                values[key] = spec
            elif isinstance(spec, dict):
                values[key] = defaults(spec, f"{prefix}{key}.")
            else:
                values[key], rules[prefix + key] = spec
        return values

    config = ml_collections.ConfigDict(defaults(fields, ""))
    _SECTIONS[name] = _Rules(rules, tuple(checks))
    return config


_MISSING = object()


def _get(config, dotted: str):
    for key in dotted.split("."):
        if key not in config:
            return _MISSING
        config = config[key]
    return config


def problems(config) -> list[str]:
    """Every problem of the config (the rules of every section, then the combination checks); [] when none."""
    trainer = config.get("trainer")
    if trainer not in TRAINERS:
        return [f"--config.trainer={trainer!r}: must be one of {', '.join(TRAINERS)}"]
    return _section_problems(config, trainer, "", set())


def is_valid(config, name: str) -> bool:
    """True when `config`, a section named `name`, has no problems (its sub-sections and checks included)."""
    return not _section_problems(config, name, "", set())


def _section_problems(config, name: str, prefix: str, invalid: set[str]) -> list[str]:
    """The problems of section `name` at `prefix`; adds the fields with a problem of their own to `invalid`."""
    rules = _SECTIONS.get(name)
    if rules is None:
        return []
    out = []

    def describe(fields: tuple[str, ...], what: str) -> str:
        values = ", ".join(f"--config.{prefix}{f}={_get(config, f)!r}" for f in fields)
        return f"{values}: {what}" if values else what

    for field, rule in rules.fields.items():
        value = _get(config, field)
        problem = None if value is _MISSING else rule(value)
        if problem:
            invalid.add(prefix + field)
            out.append(describe((field,), problem))
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict) and key in _SECTIONS:
            out += _section_problems(value, key, f"{prefix}{key}.", invalid)
    for check in rules.checks:  # a combination with an invalid value in it is reported as that value's problem
        try:
            out += [describe(fields, what) for fields, what in check(config)
                    if not invalid & {prefix + f for f in fields}]
        except (TypeError, ValueError, KeyError, AttributeError):
            if not out:  # not explained by an invalid value reported above: a bug in the check
                raise
    return out


def validate(config) -> None:
    """Raise errors.ConfigError naming every problem of the config; main calls this before anything else."""
    found = problems(config)
    if found:
        raise ConfigError(found)


# --- model ---------------------------------------------------------------------------------------------------

def model_config(arch: str = "densenet121", multitask: bool = True) -> ml_collections.ConfigDict:
    """The `model` section: MetaChexNet (all heads) or, with multitask=False, the CheXNet baseline."""
    return section(
        "model",
        arch=(arch, architecture),
        num_pathologies=(len(PATHOLOGIES), one_of(len(PATHOLOGIES))),
        metadata_tasks=(list(METADATA_TASKS) if multitask else [], subset_of(*METADATA_TASKS)),
        # width of the age head's intermediate layer; 0 = no age head
        age_hidden=(256 if multitask else 0, integer(min=0)),
        age_mean=(47.0, number()),  # years; the age head regresses (age - age_mean) / age_std
        age_std=(17.0, number(above=0)),
        # computation dtype; "bfloat16" on accelerators. Parameters stay float32.
        dtype=("float32", one_of("float32", "bfloat16")),
        # The model's pixel contract besides the sizes in `data` (metachex_jax.preprocessing.PixelContract):
        # "imagenet" (gray -> 3 channels, ImageNet mean/std) or "xrv" (1 channel, [-1024, 1024]; the stem gets 1
        # input channel), and "resize_crop" (resize to R, centre/random crop S) or "crop_resize" (centre square,
        # resize to S). A model_init from a converted torchxrayvision model sets both to its own.
        normalization=("imagenet", pixel_normalization),
        geometry=("resize_crop", pixel_geometry),
        # Dense blocks stored stacked and run as one lax.scan each: one compiled layer body per block, so the
        # train step compiles in seconds; the same function, and checkpoints convert between the forms. "auto"
        # (yes on CPU, no on GPU/TPU; README "Model forms"), "yes" or "no".
        scan_layers=("auto", one_of("auto", "yes", "no")),
        remat=(False, boolean),  # recompute each dense layer in the backward pass: less memory, more compute
    )


# --- loss ----------------------------------------------------------------------------------------------------

def loss_config(multitask: bool = True) -> ml_collections.ConfigDict:
    """The `loss` section: per-task weights of the summed loss and the per-task options."""
    return section(
        "loss",
        weights=dict(pathology=(1.0, number(min=0)), metadata=(1.0 if multitask else 0.0, number(min=0)),
                     age=(1.0 if multitask else 0.0, number(min=0))),
        # "none", or "chexnet": per-class positive/negative weights |N|/(|P|+|N|) and |P|/(|P|+|N|) from the
        # training set's label prevalence, as in CheXNet.
        class_weighting=("none", one_of("none", "chexnet")),
        age_loss=("l1", one_of("l1", "huber")),  # on the normalised age
        huber_delta=(1.0, number(above=0)),  # in units of age_std
    )


# --- data ----------------------------------------------------------------------------------------------------

def augment_config() -> ml_collections.ConfigDict:
    """The `augment` section: metachex_jax.data.augment.Augmentation's fields (training only)."""
    return section(
        "augment",
        checks=(_scale_range_ordered,),
        random_crop=(True, boolean),  # False: centre crop
        flip_probability=(0.5, number(min=0, max=1)),
        rotation_degrees=(5.0, number(min=0, max=180)),
        scale_range=((0.95, 1.05), numbers(above=0)),  # zoom drawn uniformly; > 1 magnifies
        translate_fraction=(0.03, number(min=0, below=1)),  # shift, as a fraction of the image size
    )


def _scale_range_ordered(c) -> list[Problem]:
    scale = c.scale_range
    return [] if len(scale) == 2 and scale[0] <= scale[1] else [(("scale_range",), "must be two numbers, LOW <= HIGH")]


def label_table_sections() -> dict:
    """The build parameters (prepare's flags, data/registry.py) and raw copy of each label-table dataset:
    `data.chexpert`, `data.padchest`, `data.csv` (manual_dir: if set and the build is missing, it is prepared
    first; csv.csv is the CSV file, data/csv_dataset.py; with demo and no CSV, the demo tree's hospital)."""
    fraction = number(min=0, below=1)
    return dict(
        chexpert=section("chexpert", manual_dir=("", existing_path), views=("frontal", one_of("frontal", "all")),
                         uncertainty=("ignore", uncertainty_policy), test_fraction=(0.1, fraction),
                         seed=(0, integer(min=0))),
        padchest=section("padchest", manual_dir=("", existing_path), views=("frontal", one_of("frontal", "all")),
                         val_fraction=(0.1, fraction), test_fraction=(0.1, fraction), seed=(0, integer(min=0))),
        csv=section("csv", manual_dir=("", existing_path), csv=("", existing_path), num_folds=(10, integer(min=2)),
                    seed=(0, integer(min=0)), stratify_by=("", string), val_fraction=(0.1, fraction),
                    test_fraction=(0.2, fraction)),
    )


def data_config(dataset: str = "chestxray14", resolution: int = 256, image_size: int = 224):
    """The `data` section: where the prepared datasets live, how images are cropped and augmented. Pretraining
    (dataset chestxray14) reads `datasets`, one or a weighted mixture; transfer (dataset shenzhen) the datasets
    its protocols name, with `num_folds` / `fold_seed` for the TB sets' builds and for the folds drawn for
    datasets that store none."""
    if dataset in ("shenzhen", "montgomery"):
        which = dict(
            # stratified folds stored in the TB records at build time (k-fold CV), or drawn for a dataset that
            # stores none (by patient, stratified by the target)
            num_folds=(10, integer(min=2)),
            fold_seed=(0, integer(min=0)),
        )
    else:
        which = dict(
            # the dataset, or a weighted mixture "chestxray14:1,chexpert:1,padchest:0.5" of chestxray14, chexpert,
            # padchest and csv (weights: relative sampling rates, default 1; data/mixture.py)
            datasets=(dataset, mixture),
            # labels after NIH's 14 in the model's pathology head, e.g. "Lung Opacity,Fracture" (CheXpert's), "No
            # Finding", "Tuberculosis" (PadChest's, or a CSV column's); each dataset is masked where it lacks one
            extra_labels=("", string),
        )
    return section(
        "data",
        checks=(_crop_fits_stored_images,),
        **which,
        data_dir=("~/tensorflow_datasets", text),  # where `python -m metachex_jax.prepare` wrote the dataset
        # raw copy of chestxray14 (pretraining) or of the TB sets (transfer); if set and the dataset is missing, it
        # is prepared first
        manual_dir=("", existing_path),
        resolution=(resolution, integer(min=8)),  # stored R x R at build time
        image_size=(image_size, integer(min=8)),  # model input S x S (random crop for training, centre for eval)
        val_fraction=(0.1, number(min=0, below=1)),  # of train_val patients, carved out by patient at build time
        val_seed=(0, integer(min=0)),
        # the bit depth high-depth images of every dataset were built with (prepare --bit_depth; 0: the reader's
        # rule, data/images.py); it names the build the run reads (r256_bits12)
        bit_depth=(0, integer(min=0, max=16)),
        **label_table_sections(),
        # grain worker processes per host: -1 = auto (pipeline.resolve_workers: in-process on a CPU backend,
        # where XLA needs the cores; one per spare core on GPU/TPU hosts), 0 = in-process, N = N workers
        workers=(-1, integer(min=-1)),
        # Pretraining: where training images are cropped, flipped and warped (`augment`): "host" (the input
        # pipeline), "device" (inside the jitted train step; the host only reads and batches the stored images),
        # or "auto": "host" on a CPU backend, "device" on GPU/TPU (measurements in the README), or what a resumed
        # run used; always "host" for a crop_resize (torchxrayvision) model. Fine-tuning augments on the host.
        augment_on=("auto", one_of("auto", "host", "device")),
        augment=augment_config(),
    )


def _crop_fits_stored_images(c) -> list[Problem]:
    if c.image_size <= c.resolution:
        return []
    return [(("image_size", "resolution"), "the model input is cropped from the stored images, so image_size "
             "must be <= resolution (the config files' res=S sets resolution = S * 8 // 7)")]


# --- optimiser -----------------------------------------------------------------------------------------------

def optim_config(lr: float = 1e-3):
    """The `optim` section: CheXNet's recipe by default (Adam, lr 1e-3, reduce-on-plateau by 10x)."""
    return section(
        "optim",
        checks=(_weight_decay_needs_adamw,),
        name=("adam", one_of("adam", "adamw")),
        lr=(lr, number(above=0)),
        b1=(0.9, number(min=0, below=1)),
        b2=(0.999, number(min=0, below=1)),
        weight_decay=(0.0, number(min=0)),
        grad_clip_norm=(0.0, number(min=0)),  # 0 = off
        schedule=("plateau", one_of("plateau", "cosine")),  # plateau: on validation loss; cosine: linear warmup
        plateau_factor=(0.1, number(above=0, below=1)),
        plateau_patience=(1, integer(min=0)),  # evaluations without improvement before the lr is reduced
        # What the plateau watches on validation: "loss" (CheXNet's) or "mean_auroc" (for a mixture: the mean over
        # datasets of each dataset's mean AUROC over the labels it has; the best checkpoint always uses it)
        plateau_on=("loss", one_of("loss", "mean_auroc")),
        warmup_steps=(0, integer(min=0)),
        # Scale the lr with the global batch: "linear" (lr * batch / reference_batch), "sqrt" (by its square root,
        # gentler for Adam), or "none". With one device and batch 16 every rule gives CheXNet's 1e-3.
        lr_scaling=("sqrt", one_of("linear", "sqrt", "none")),
        reference_batch=(16, integer(min=1)),  # CheXNet's batch size
    )


def _weight_decay_needs_adamw(c) -> list[Problem]:
    if c.weight_decay > 0 and c.name != "adamw":
        return [(("weight_decay", "name"), "weight decay needs name='adamw' (decoupled weight decay)")]
    return []


# --- what every trainer shares -------------------------------------------------------------------------------

def _run_fields() -> dict:
    return dict(
        seed=(0, integer(min=0)),
        distributed=("auto", one_of("auto", "yes", "no")),  # "auto": initialise when a cluster is detected
        n_boot=(1000, integer(min=0)),  # bootstrap resamples (by patient) for confidence intervals
        demo=(False, boolean),  # generate and prepare the synthetic demo data if missing (metachex_jax.demo_data)
        demo_dir=("~/.cache/metachex_jax/demo", local_path),  # raw demo trees + prepared datasets live here
        demo_data=section(
            "demo_data",
            seed=(0, integer(min=0)),
            num_nih=(2000, integer(min=20)),
            num_shenzhen=(300, integer(min=2)),
            num_montgomery=(100, integer(min=2)),
            num_hospital=(200, integer(min=0)),  # the hospital CSV dataset (Hospital/labels.csv)
            size=(256, integer(min=32)),
        ),
    )


# --- pretraining ---------------------------------------------------------------------------------------------

def pretrain_config(arg: str | None, multitask: bool) -> ml_collections.ConfigDict:
    """The whole pretraining config; `configs/pretrain.py` (multitask) and `configs/chexnet.py` call this.

    `arg`: demo, runlocal, arch=..., res=IMAGE_SIZE, init=MODEL_INIT_PATH, datasets=A+B:WEIGHT+... (a mixture; see
    the config files' docstrings).
    """
    arg = parse_arg(arg, demo=False, runlocal=False, arch="densenet121", res=0, init="", datasets="")
    # Stored resolution R and crop S keep CheXNet's 256 -> 224 ratio: R = S * 8 / 7.
    image_size = arg.res or (64 if arg.demo else 224)
    c = section(
        "pretrain",
        checks=(_heads_match_loss, _pretraining_data_is_there),
        trainer=("pretrain", one_of(*TRAINERS)),
        data=data_config("chestxray14", resolution=image_size * 8 // 7, image_size=image_size),
        model=model_config(arg.arch, multitask),
        loss=loss_config(multitask),
        optim=optim_config(lr=1e-3),
        # global batch = batch_size_per_device x devices (CheXNet: 16 on one GPU)
        batch_size_per_device=(16, integer(min=1)),
        # Training length: num_steps when > 0, else num_epochs epochs, an epoch being as many images as the
        # training splits of every dataset hold together (one pass over the data when the mixture weights follow
        # their sizes)
        num_steps=(0, integer(min=0)),
        num_epochs=(15, integer(min=1)),
        max_steps=(0, integer(min=0)),  # stop after this many steps (0 = no limit)
        eval_every_steps=(0, integer(min=0)),  # 0 = once per epoch
        eval_max_batches=(0, integer(min=0)),  # 0 = the whole split
        eval_batch_size_per_device=(64, integer(min=1)),
        log_every_steps=(50, integer(min=1)),
        checkpoint_every_steps=(0, integer(min=0)),  # 0 = at every evaluation
        keep_checkpoints=(2, integer(min=1)),  # the latest N are kept, plus the best by validation mean AUROC
        # Where the starting weights come from, in this order (written once, in train.initial_state):
        #   1. this run's own workdir (automatic resume), 2. `resume` (another run's checkpoint, full state),
        #   3. `model_init` (backbone weights only: converted ImageNet weights or another run; heads are new),
        #   4. random initialisation.
        resume=("", existing_path),
        model_init=(arg.init, existing_path),
        **_run_fields(),
    )
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


def _heads_match_loss(c) -> list[Problem]:
    out = []
    weights = c.loss.weights
    if weights.metadata > 0 and not c.model.metadata_tasks:
        out.append((("loss.weights.metadata", "model.metadata_tasks"), "a metadata loss needs metadata heads"))
    if weights.age > 0 and c.model.age_hidden == 0:
        out.append((("loss.weights.age", "model.age_hidden"), "an age loss needs the age head (age_hidden > 0)"))
    if not (weights.pathology > 0 or (weights.metadata > 0 and c.model.metadata_tasks)
            or (weights.age > 0 and c.model.age_hidden)):
        out.append((("loss.weights",), "every weight is 0, so the loss has no terms"))
    return out


def _pretraining_data_is_there(c) -> list[Problem]:
    # The demo makes its data (a csv dataset without a CSV is then the demo's hospital); a raw copy (manual_dir)
    # is prepared at the start; invalid data settings are reported by the data section's rules already.
    if not is_valid(c.data, "data"):
        return []
    from metachex_jax.data import datasets
    from metachex_jax.data import mixture as mixture_lib

    names = list(mixture_lib.parse_mixture(c.data.datasets))
    if "csv" in names and not c.data.csv.csv and not c.demo:
        return [(("data.datasets", "data.csv.csv"), "a csv dataset needs its CSV file (data/csv_dataset.py)")]
    if c.demo:
        return []
    unprepared = [n for n in names if not _get(c, datasets.manual_dir_field(n))]
    message = datasets.missing_data_message(c.data, unprepared, PRETRAIN_DEMO_COMMAND) if unprepared else ""
    return [((), message)] if message else []


PRETRAIN_DEMO_COMMAND = "python -m metachex_jax.main --config=configs/pretrain.py:demo --workdir=/tmp/metachex_demo"
TRANSFER_DEMO_COMMAND = ("python -m metachex_jax.main --config=configs/transfer.py:demo "
                         "--config.init_from=/tmp/metachex_demo --workdir=/tmp/tb_demo")


# --- TB transfer ---------------------------------------------------------------------------------------------

def transfer_config(arg: str | None) -> ml_collections.ConfigDict:
    """The TB transfer comparison config; `configs/transfer.py`, `linear_probe.py` and `finetune.py` call this.

    `arg`: demo, runlocal, methods=probe+finetune, init=PATH (init_from), res=IMAGE_SIZE, arch=... (see
    configs/transfer.py). One run = every starting weight x every method x every protocol -> one report.
    """
    arg = parse_arg(arg, demo=False, runlocal=False, methods="probe+finetune", arch="densenet121", res=0,
                    init="")
    image_size = arg.res or (64 if arg.demo else 224)
    data = data_config("shenzhen", resolution=image_size * 8 // 7, image_size=image_size)
    c = section(
        "transfer",
        checks=(_starting_weights_given, _random_bn_is_a_probe_baseline, _deploy_fits_the_run,
                _transfer_data_is_there),
        trainer=("transfer", one_of(*TRAINERS)),
        data=data,
        model=model_config(arg.arch, multitask=True),  # every starting weight must have this architecture
        # Starting weights, compared side by side. Each is a pretraining workdir (MetaChexNet or CheXNet; its
        # best checkpoint), a convert_torchvision output directory (e.g. ImageNet weights), a model directory such
        # as a convert_torchxrayvision output (fed its own pixels: 1 channel, [-1024, 1024], centre square), or
        # "random".
        init_from=(arg.init, starting_weights),  # the weights under study; required unless baselines_only
        # True: run the compare_with baselines without init_from (else its absence is an error)
        baselines_only=(False, boolean),
        # More starting weights: comma-separated paths, "random" (BatchNorm at its initial statistics) and/or
        # "random_bn" (random weights, BatchNorm statistics from bn_statistics_images ChestX-ray14 training
        # images read from data.data_dir at this resolution: needs that dataset prepared).
        compare_with=("random", starting_weights),
        bn_statistics_images=(1280, integer(min=1)),
        # which checkpoint of a pretraining workdir: "best", "latest" or a step
        checkpoint_step=("best", checkpoint_step),
        methods=(arg.methods, names_from(METHODS)),  # "probe", "finetune" or "probe+finetune"
        # The binary target(s), comma-separated, named as in the shared label space: "Tuberculosis" is the TB
        # sets' label (and PadChest's, and the demo hospital's); any label of the datasets works (e.g.
        # "Cardiomegaly" of a CSV dataset). Several targets: one probe / fine-tune per target, side by side.
        targets=("Tuberculosis", text),
        # cv_<dataset>: k-fold CV within a dataset; <a>[+<b>...]_to_<c>: train on all of a (and b), test on all of
        # c (the unseen-dataset test). Datasets: shenzhen, montgomery, csv (data.csv: your own; the demo's
        # hospital with demo), chexpert, padchest, chestxray14. A protocol whose datasets lack a target is skipped
        # for it, with a note.
        protocols=("cv_shenzhen,cv_montgomery,shenzhen_to_montgomery,montgomery_to_shenzhen", protocol_list),
        feature_cache_dir=("~/.cache/metachex_jax/features", text),  # keyed on the weights' and data's content
        feature_batch_size=(64, integer(min=1)),
        probe=section(
            "probe",
            inner_folds=(5, integer(min=2)),  # inner stratified CV (folds of patients) to choose the L2 strength
            # lambda: mean log loss + l2/2 |w|^2
            l2_grid=((1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0), numbers(above=0)),
            selection=("log_loss", one_of("log_loss", "auroc")),  # inner-CV criterion
            max_iter=(500, integer(min=1)),
            tol=(1e-5, number(above=0)),  # preconditioned gradient norm at which L-BFGS stops
        ),
        finetune=section(
            "finetune",
            max_folds=(0, integer(min=0)),  # 0 = every fold of a CV protocol; n = only the first n folds (demo)
            num_epochs=(30, integer(min=1)),
            patience=(5, integer(min=1)),  # epochs without a better validation AUROC before stopping
            batch_size=(16, integer(min=1)),
            eval_batch_size=(64, integer(min=1)),
            head_lr=(1e-3, number(above=0)),
            backbone_lr=(1e-4, number(min=0)),  # lower than the head's: the pretrained backbone moves slowly
            # BatchNorm statistics of the test predictions in the cross-dataset protocols (recomputed for the
            # fine-tuned weights either way): "fit" = the training set's fit images; "target" = the unlabelled
            # test images (test-time adaptation), and then the validation predictions the thresholds are chosen on
            # use the validation images' own. Within a dataset they always come from the fit images.
            bn_stats=("fit", one_of("fit", "target")),
            # name, betas, clipping, warmup; finetune.py sets the two lrs and a constant schedule (early stopping
            # decides the length)
            optim=optim_config(lr=1e-3),
            augment=augment_config(),
        ),
        # Screening operating points, thresholds chosen on training data: WHO's target product profile for a TB
        # triage test asks for sensitivity >= 0.90 with specificity >= 0.70.
        screening=section(
            "screening",
            sensitivity=(0.9, number(above=0, max=1)),
            specificity=(0.7, number(above=0, max=1)),
        ),
        # The deployable TB model fitted at the end on every training image and saved to WORKDIR/model/ for
        # `predict` (transfer/deploy.py; chosen by the config, never by test results).
        deploy=section(
            "deploy",
            start=("", string),  # a start's name ("" = init_from's, "none" = no model); checked once loaded
            method=("", one_of("", *METHODS)),  # "" = finetune when the run fine-tunes, else probe
            # "" = the first report column (a protocol, or <protocol>.<target> with several targets); its training
            # set, one dataset, is fitted
            protocol=("", protocol_or_empty),
            # "sensitivity": the largest threshold with out-of-fold sensitivity >= screening.sensitivity; "youden"
            threshold_rule=("sensitivity", one_of("sensitivity", "youden")),
        ),
        # equal-width probability bins of the expected calibration error and reliability plots
        calibration_bins=(10, integer(min=1)),
        **_run_fields(),
    )
    c.finetune.optim.warmup_steps = 0
    c.finetune.optim.lr_scaling = "none"  # head_lr and backbone_lr are used as written, whatever the batch size
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


def _starts(c) -> list[str]:
    return split_list(c.init_from) + split_list(c.compare_with)


def _starting_weights_given(c) -> list[Problem]:
    """init_from is the weights under study; comparing baselines only must be asked for (baselines_only)."""
    init_from = c.init_from.strip()
    if not init_from and not c.baselines_only:
        return [(("init_from",), "empty: set it to the weights under study (a pretraining workdir or a "
                 "convert_torchvision output), or set baselines_only=True to compare only compare_with")]
    if init_from and c.baselines_only:
        return [(("baselines_only", "init_from"), "both are set; drop one of them")]
    if c.baselines_only and not split_list(c.compare_with):
        return [(("baselines_only", "compare_with"), "baselines_only needs baselines in compare_with")]
    return []


def _random_bn_is_a_probe_baseline(c) -> list[Problem]:
    if "random_bn" in _starts(c) and "probe" not in split_list(c.methods):
        return [(("compare_with", "methods"), "random_bn is a linear-probe baseline (fine-tuning would repeat "
                 "'random'); drop it from compare_with or add the probe to methods")]
    return []


def _deploy_fits_the_run(c) -> list[Problem]:
    """What the config alone says about the deployable model (the start's name and the protocol column are
    checked once the run's columns are known, transfer/deploy.py)."""
    d = c.deploy
    if d.start == "none" or (not d.start and not c.init_from.strip()):
        return []
    methods = split_list(c.methods)
    method = d.method or ("finetune" if "finetune" in methods else "probe")
    out = []
    if method not in methods:
        out.append((("deploy.method", "methods"), "the deployed method must be one the run uses"))
    elif method == "finetune" and d.start == "random_bn":
        out.append((("deploy.start", "deploy.method"), "random_bn is a probe-only baseline; deploy it with "
                    "deploy.method=probe"))
    if protocol_list(c.protocols) or not c.targets.strip():  # reported by the protocols and targets rules
        return out
    from metachex_jax.transfer.protocols import column_name, parse_protocols, parse_targets

    targets = parse_targets(c.targets)
    several = len(targets) > 1
    columns = {column_name(p.name, t, several): (p, t) for t in targets for p in parse_protocols(c.protocols)}
    column = d.protocol or next(iter(columns))
    if column not in columns:
        out.append((("deploy.protocol", "protocols"), "the deployed protocol must be one the run uses"
                    + (" (with several targets: <protocol>.<target>, e.g. " + next(iter(columns)) + ")"
                       if several else "")))
        return out
    protocol, target = columns[column]
    cv = column_name(f"cv_{protocol.train_set}", target, several)
    if len(protocol.train) > 1:
        out.append((("deploy.protocol",), f"the model deployed from {column} would train on several datasets, "
                    "for which no cross-validation gives a threshold; deploy a protocol that trains on one"))
    elif cv not in columns:
        out.append((("deploy.protocol", "protocols"), f"the model deployed from {column} takes its threshold "
                    f"and epoch count from {cv}, which must be among protocols"))
    return out


def _transfer_data_is_there(c) -> list[Problem]:
    if c.demo or not is_valid(c.data, "data") or protocol_list(c.protocols):
        return []
    from metachex_jax.data import datasets
    from metachex_jax.transfer.protocols import parse_protocols

    out = []
    needed = sorted({d for p in parse_protocols(c.protocols) for d in p.datasets})
    if "csv" in needed and not c.data.csv.csv:
        return [(("protocols", "data.csv.csv"), "a csv dataset needs its CSV file (data/csv_dataset.py)")]
    unprepared = [n for n in needed if not _get(c, datasets.manual_dir_field(n))]  # with a raw copy: at the start
    message = datasets.missing_data_message(c.data, unprepared, TRANSFER_DEMO_COMMAND) if unprepared else ""
    out += [((), message)] if message else []
    if "random_bn" in _starts(c):  # ChestX-ray14 is never prepared by a transfer run
        message = datasets.missing_data_message(c.data, ["chestxray14"], prepare_at_start=False)
        out += [((), "compare_with names random_bn, whose BatchNorm statistics come from ChestX-ray14 training "
                 f"images: {message}")] if message else []
    return out
