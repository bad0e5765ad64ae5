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


def dataset_name(value) -> str | None:
    from metachex_jax.data import registry

    return None if value in registry.DATASETS else f"unknown dataset; choose one of {', '.join(registry.DATASETS)}"


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


def _protocol_names() -> tuple[str, ...]:
    from metachex_jax.transfer.protocols import PROTOCOLS

    return tuple(PROTOCOLS)


def protocol_or_empty(value) -> str | None:
    known = _protocol_names()
    return None if value == "" or value in known else f"must be empty or one of {', '.join(known)}"


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


def data_config(dataset: str = "chestxray14", resolution: int = 256, image_size: int = 224):
    """The `data` section: where the prepared dataset lives, how images are cropped and augmented."""
    tb_folds = {}
    if dataset in ("shenzhen", "montgomery"):
        tb_folds = dict(
            num_folds=(10, integer(min=2)),  # stratified folds stored in the TB records at build time (k-fold CV)
            fold_seed=(0, integer(min=0)),
        )
    return section(
        "data",
        checks=(_crop_fits_stored_images,),
        dataset=(dataset, dataset_name),
        data_dir=("~/tensorflow_datasets", text),  # where `python -m metachex_jax.prepare` wrote the dataset
        manual_dir=("", existing_path),  # raw copy; if set and the dataset is missing, it is prepared first
        resolution=(resolution, integer(min=8)),  # stored R x R at build time
        image_size=(image_size, integer(min=8)),  # model input S x S (random crop for training, centre for eval)
        val_fraction=(0.1, number(min=0, below=1)),  # of train_val patients, carved out by patient at build time
        val_seed=(0, integer(min=0)),
        **tb_folds,
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
            size=(256, integer(min=32)),
        ),
    )


# --- pretraining ---------------------------------------------------------------------------------------------

def pretrain_config(arg: str | None, multitask: bool) -> ml_collections.ConfigDict:
    """The whole pretraining config; `configs/pretrain.py` (multitask) and `configs/chexnet.py` call this.

    `arg`: demo, runlocal, arch=..., res=IMAGE_SIZE, init=MODEL_INIT_PATH (see the config files' docstrings).
    """
    arg = parse_arg(arg, demo=False, runlocal=False, arch="densenet121", res=0, init="")
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
    # The demo makes its data; a raw copy (manual_dir) is prepared at the start; invalid data settings are
    # reported by the data section's rules already.
    if c.demo or c.data.manual_dir or not is_valid(c.data, "data"):
        return []
    from metachex_jax.data import datasets

    message = datasets.missing_data_message(c.data, ["chestxray14"], PRETRAIN_DEMO_COMMAND)
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
        # cv_shenzhen / cv_montgomery: k-fold CV within a set; shenzhen_to_montgomery and the reverse: train on
        # all of one set, test on all of the other (the unseen-dataset test).
        protocols=("cv_shenzhen,cv_montgomery,shenzhen_to_montgomery,montgomery_to_shenzhen",
                   names_from(_protocol_names)),
        feature_cache_dir=("~/.cache/metachex_jax/features", text),  # keyed on the weights' and data's content
        feature_batch_size=(64, integer(min=1)),
        probe=section(
            "probe",
            inner_folds=(5, integer(min=2)),  # inner stratified CV on the training folds, to choose the L2 strength
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
            # test images (test-time adaptation). Within a dataset they always come from the fit images.
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
            protocol=("", protocol_or_empty),  # "" = the first of protocols; its training set is fitted
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
    """What the config alone says about the deployable model (the start's name is checked once starts load)."""
    d = c.deploy
    if d.start == "none" or (not d.start and not c.init_from.strip()):
        return []
    methods, protocols = split_list(c.methods), split_list(c.protocols)
    method = d.method or ("finetune" if "finetune" in methods else "probe")
    out = []
    if method not in methods:
        out.append((("deploy.method", "methods"), "the deployed method must be one the run uses"))
    elif method == "finetune" and d.start == "random_bn":
        out.append((("deploy.start", "deploy.method"), "random_bn is a probe-only baseline; deploy it with "
                    "deploy.method=probe"))
    if names_from(_protocol_names)(c.protocols):  # reported by the protocols rule
        return out
    from metachex_jax.transfer.protocols import PROTOCOLS

    protocol = d.protocol or protocols[0]
    if protocol not in protocols:
        out.append((("deploy.protocol", "protocols"), "the deployed protocol must be one the run uses"))
    else:
        cv = f"cv_{PROTOCOLS[protocol][0]}"  # its training set's cross-validation
        if cv not in protocols:
            out.append((("deploy.protocol", "protocols"), f"the model deployed from {protocol} takes its threshold "
                        f"and epoch count from {cv}, which must be among protocols"))
    return out


def _transfer_data_is_there(c) -> list[Problem]:
    if c.demo or not is_valid(c.data, "data") or names_from(_protocol_names)(c.protocols):
        return []
    from metachex_jax.data import datasets
    from metachex_jax.transfer.protocols import PROTOCOLS

    out = []
    if not c.data.manual_dir:  # with a raw copy the TB sets are prepared at the start
        tb_sets = sorted({name for p in split_list(c.protocols) for name in PROTOCOLS[p]})
        message = datasets.missing_data_message(c.data, tb_sets, TRANSFER_DEMO_COMMAND)
        out += [((), message)] if message else []
    if "random_bn" in _starts(c):  # ChestX-ray14 is never prepared by a transfer run
        message = datasets.missing_data_message(c.data, ["chestxray14"], prepare_at_start=False)
        out += [((), "compare_with names random_bn, whose BatchNorm statistics come from ChestX-ray14 training "
                 f"images: {message}")] if message else []
    return out
