"""The rules of the configs (the recipes are metachex_jax/configs/*.py), in the style of big_vision, and their
checks.

A recipe is `get_config(arg)` returning a plain ml_collections ConfigDict; `arg` is the short string after the
colon in `--config=configs/pretrain.py:demo,arch=densenet_tiny`. `parse_arg` turns it into a ConfigDict whose
values keep the types of the defaults, so `res=64` is an int and `demo` alone means `demo=True`. Any field can
still be overridden on the command line: `--config.optim.lr=3e-4`.

The rules live here, apart from the defaults, keyed by SECTION name and field: `rules(NAME, field=RULE, ...)`
records what each field's value must satisfy, e.g.

    rules("model", dtype=one_of("float32", "bfloat16"), ...)

and `checks` of the whole section for combinations that cannot work (the root sections "pretrain" and "transfer"
see the whole config). `validate(config)`, which `main` runs before anything else, applies the rules of every
section wherever a sub-dict of that name appears (so `optim`'s rules also check `finetune.optim`; a field a
section's dict does not have is not checked) and raises one `errors.ConfigError` listing every problem. Rules
are the small functions below (`one_of`, `integer`, `number`, `boolean`, `existing_path`, ...); each returns
None or what is wrong. Whether the data a valid config names is there is not a rule: `main` asks the data
preflight next (data/input/preflight.py, transfer/preflight.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections

from metachex_jax.contract.pixels import NORMALIZATIONS
from metachex_jax.core import files
from metachex_jax.core.errors import ConfigArgumentError, ConfigError
from metachex_jax.core.labels import METADATA_TASKS, PATHOLOGIES
from metachex_jax.data.input import mixture as mixture_lib
from metachex_jax.data.raw.chexpert import parse_uncertainty
from metachex_jax.data.raw.mimic import LABELERS, parse_views
from metachex_jax.data.raw.tbx11k import EXTRA_CHOICES
from metachex_jax.data.raw.vindr import LABEL_RULES
from metachex_jax.imaging.geometry import GEOMETRIES
from metachex_jax.models import SPECS
from metachex_jax.transfer.protocols import column_name, parse_protocols, parse_targets

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
    return None if value in NORMALIZATIONS else f"must be one of {', '.join(NORMALIZATIONS)}"


def pixel_geometry(value) -> str | None:
    return None if value in GEOMETRIES else f"must be one of {', '.join(GEOMETRIES)}"


def architecture(value) -> str | None:
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
    """A comma-separated string of "random", "random_bn", paths that exist and glob patterns that match ("" =
    none)."""
    if not isinstance(value, str):
        return "must be a comma-separated string"
    wrong = []
    for item in split_list(value):
        if item in RANDOM_STARTS:
            continue
        if files.has_glob(item):
            wrong += [] if files.glob(item) else [f"{files.absolute(item)} matches nothing"]
        elif existing_path(item):
            wrong.append(existing_path(item))
    return (f"{'; '.join(wrong)} (each must be random, random_bn, an existing path or a glob pattern that matches)"
            if wrong else None)


def train_sizes(value) -> str | None:
    """"" (no curves) or comma-separated image counts >= 1 and/or "all", each once."""
    if not isinstance(value, str):
        return "must be a string of comma-separated sizes"
    items = [v.strip() for v in value.split(",") if v.strip()]
    wrong = [v for v in items if v != "all" and not (v.isdigit() and int(v) >= 1)]
    if wrong:
        return f"{', '.join(wrong)}: each size must be a number of images >= 1 or all (e.g. 10,20,50,all)"
    return "names a size twice" if len(set(items)) < len(items) else None


PRETRAIN_DATASETS = ("chestxray14", "chexpert", "padchest", "csv", "mimic")  # what pretraining reads (a mixture)
TRANSFER_DATASETS = ("shenzhen", "montgomery", "csv", "chexpert", "padchest", "chestxray14", "mimic", "tbx11k",
                     "vindr")


def mixture(value) -> str | None:
    """data.datasets: "name[:weight],..." of PRETRAIN_DATASETS."""
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
    try:
        protocols = parse_protocols(value) if isinstance(value, str) else None
    except ValueError as e:
        return str(e)
    if protocols is None:
        return "must be a comma-separated string"
    unknown = sorted({d for p in protocols for d in p.datasets} - set(TRANSFER_DATASETS))
    return f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(TRANSFER_DATASETS)}" if unknown else None


def mimic_views(value) -> str | None:
    try:
        parse_views(value)
    except (ValueError, AttributeError) as e:
        return str(e)
    return None


def uncertainty_policy(value) -> str | None:
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
# Sections: each field's rule, keyed by the section's name.
# -------------------------------------------------------------------------------------------------------------

Problem = tuple[tuple[str, ...], str]  # what a check finds: (the fields involved, what is wrong)


@dataclasses.dataclass
class _Rules:
    fields: dict[str, Rule]  # dotted field (within the section) -> rule
    checks: tuple[Callable[[Any], list[Problem]], ...]  # section ConfigDict -> problems of combinations


_SECTIONS: dict[str, _Rules] = {}  # section name -> its rules (recorded by `rules`)


def rules(name: str, /, *, checks: tuple[Callable, ...] = (), **fields) -> None:
    """Record the rules of section `name`: field=RULE, or a dict of such for a nested group (e.g. loss.weights).
    A sub-dict that is a section of its own (data.augment) is checked by that section's rules. A check is a
    function of the section's ConfigDict returning [(fields involved, what is wrong), ...]."""
    flat: dict[str, Rule] = {}

    def add(items: dict, prefix: str) -> None:
        for key, rule in items.items():
            if isinstance(rule, dict):
                add(rule, f"{prefix}{key}.")
            else:
                flat[prefix + key] = rule

    add(fields, "")
    _SECTIONS[name] = _Rules(flat, tuple(checks))


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
    """Raise errors.ConfigError naming every problem of the config; main calls this before anything else (then
    the data preflight, data/input/preflight.py and transfer/preflight.py)."""
    found = problems(config)
    if found:
        raise ConfigError(found)


# --- the sections' rules ---------------------------------------------------------------------------------------

FRACTION = number(min=0, below=1)
SEED = integer(min=0)


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


def _csv_needs_its_file(c) -> list[Problem]:
    """A csv dataset in the run needs its CSV file (with demo and no CSV, csv is the demo tree's hospital)."""
    if c.demo or c.data.csv.csv:
        return []
    if c.trainer == "pretrain" and not mixture(c.data.datasets) and "csv" in mixture_lib.parse_mixture(c.data.datasets):
        return [(("data.datasets", "data.csv.csv"), "a csv dataset needs its CSV file (data/raw/csv_dataset.py)")]
    if c.trainer == "transfer" and not protocol_list(c.protocols) and any(
            "csv" in p.datasets for p in parse_protocols(c.protocols)):
        return [(("protocols", "data.csv.csv"), "a csv dataset needs its CSV file (data/raw/csv_dataset.py)")]
    return []


def _scale_range_ordered(c) -> list[Problem]:
    scale = c.scale_range
    return [] if len(scale) == 2 and scale[0] <= scale[1] else [(("scale_range",), "must be two numbers, LOW <= HIGH")]


def _crop_fits_stored_images(c) -> list[Problem]:
    if c.image_size <= c.resolution:
        return []
    return [(("image_size", "resolution"), "the model input is cropped from the stored images, so image_size "
             "must be <= resolution (the config files' res=S sets resolution = S * 8 // 7)")]


def _weight_decay_needs_adamw(c) -> list[Problem]:
    if c.weight_decay > 0 and c.name != "adamw":
        return [(("weight_decay", "name"), "weight decay needs name='adamw' (decoupled weight decay)")]
    return []


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
    elif cv not in columns and not protocol.fixed_split:  # (a fixed split chooses on its own validation split)
        out.append((("deploy.protocol", "protocols"), f"the model deployed from {column} takes its threshold "
                    f"and epoch count from {cv}, which must be among protocols"))
    return out


rules("model", arch=architecture, num_pathologies=one_of(len(PATHOLOGIES)), metadata_tasks=subset_of(*METADATA_TASKS),
      age_hidden=integer(min=0), age_mean=number(), age_std=number(above=0), dtype=one_of("float32", "bfloat16"),
      normalization=pixel_normalization, geometry=pixel_geometry, scan_layers=one_of("auto", "yes", "no"),
      remat=boolean)
rules("loss", weights=dict(pathology=number(min=0), metadata=number(min=0), age=number(min=0)),
      class_weighting=one_of("none", "chexnet"), age_loss=one_of("l1", "huber"), huber_delta=number(above=0))
rules("augment", checks=(_scale_range_ordered,), random_crop=boolean, flip_probability=number(min=0, max=1),
      rotation_degrees=number(min=0, max=180), scale_range=numbers(above=0), translate_fraction=number(min=0, below=1))
rules("chexpert", manual_dir=existing_path, views=one_of("frontal", "all"), uncertainty=uncertainty_policy,
      test_fraction=FRACTION, seed=SEED)
rules("padchest", manual_dir=existing_path, views=one_of("frontal", "all"), val_fraction=FRACTION,
      test_fraction=FRACTION, seed=SEED)
rules("csv", manual_dir=existing_path, csv=existing_path, num_folds=integer(min=2), seed=SEED, stratify_by=string,
      val_fraction=FRACTION, test_fraction=FRACTION)
rules("mimic", manual_dir=existing_path, views=mimic_views, uncertainty=uncertainty_policy, labeler=one_of(*LABELERS),
      csv_dir=existing_path, patients_csv=existing_path)
rules("tbx11k", manual_dir=existing_path, val_fraction=FRACTION, seed=SEED, extra_folders=one_of(*EXTRA_CHOICES),
      box_tolerance=number(min=0))
rules("vindr", manual_dir=existing_path, label_rule=one_of(*LABEL_RULES), val_fraction=FRACTION,
      test_fraction=FRACTION, seed=SEED)
rules("data", checks=(_crop_fits_stored_images,),
      datasets=mixture, extra_labels=string,  # pretraining
      num_folds=integer(min=2), fold_seed=SEED,  # transfer
      data_dir=text, manual_dir=existing_path, resolution=integer(min=8), image_size=integer(min=8),
      val_fraction=FRACTION, val_seed=SEED, bit_depth=integer(min=0, max=16), workers=integer(min=-1),
      augment_on=one_of("auto", "host", "device"))
rules("optim", checks=(_weight_decay_needs_adamw,), name=one_of("adam", "adamw"), lr=number(above=0),
      b1=number(min=0, below=1), b2=number(min=0, below=1), weight_decay=number(min=0), grad_clip_norm=number(min=0),
      schedule=one_of("plateau", "cosine"), plateau_factor=number(above=0, below=1), plateau_patience=integer(min=0),
      plateau_on=one_of("loss", "mean_auroc"), warmup_steps=integer(min=0),
      lr_scaling=one_of("linear", "sqrt", "none"), reference_batch=integer(min=1))
rules("demo_data", seed=SEED, num_nih=integer(min=20), num_shenzhen=integer(min=2), num_montgomery=integer(min=2),
      num_hospital=integer(min=0), size=integer(min=32))
RUN_RULES = dict(seed=SEED, distributed=one_of("auto", "yes", "no"), n_boot=integer(min=0), demo=boolean,
                 demo_dir=local_path)  # what every trainer's root has
rules("pretrain", checks=(_heads_match_loss, _csv_needs_its_file), trainer=one_of(*TRAINERS),
      batch_size_per_device=integer(min=1), num_steps=integer(min=0), num_epochs=integer(min=1),
      max_steps=integer(min=0), eval_every_steps=integer(min=0), eval_max_batches=integer(min=0),
      eval_batch_size_per_device=integer(min=1), log_every_steps=integer(min=1),
      checkpoint_every_steps=integer(min=0), keep_checkpoints=integer(min=1), resume=existing_path,
      model_init=existing_path, **RUN_RULES)
def description_size(value) -> str | None:
    """config.ood.max_images: 0 (no description) or at least 2 images (a covariance needs two)."""
    return integer(min=0)(value) or ("must be 0 (no description) or >= 2" if value == 1 else None)


rules("ood", max_images=description_size, quantile=number(above=0, below=1))
rules("probe", inner_folds=integer(min=2), l2_grid=numbers(above=0), selection=one_of("log_loss", "auroc"),
      max_iter=integer(min=1), tol=number(above=0))
rules("finetune", max_folds=integer(min=0), num_epochs=integer(min=1), patience=integer(min=1),
      batch_size=integer(min=1), eval_batch_size=integer(min=1), head_lr=number(above=0),
      backbone_lr=number(min=0), bn_stats=one_of("fit", "target"))
rules("screening", sensitivity=number(above=0, max=1), specificity=number(above=0, max=1))
rules("deploy", start=string, method=one_of("", *METHODS), protocol=protocol_or_empty,
      threshold_rule=one_of("sensitivity", "youden"), ood_quantile=number(min=0, below=1))
rules("transfer", checks=(_starting_weights_given, _random_bn_is_a_probe_baseline, _deploy_fits_the_run,
                          _csv_needs_its_file),
      trainer=one_of(*TRAINERS), init_from=starting_weights, baselines_only=boolean, compare_with=starting_weights,
      bn_statistics_images=integer(min=1), checkpoint_step=checkpoint_step, methods=names_from(METHODS),
      targets=text, protocols=protocol_list, feature_cache_dir=text, feature_batch_size=integer(min=1),
      calibration_bins=integer(min=1), init_name=string, train_sizes=train_sizes, train_draws=integer(min=1),
      train_sizes_finetune=boolean, curve_target_auroc=number(above=0, max=1), **RUN_RULES)
