"""Starting weights for transfer: a pretraining workdir, a converted backbone or model directory, or "random".

    load_start(spec, model_config, seed, contract=...) -> Start(name, kind, model, fingerprint, info, contract)

- a pretraining workdir (holds checkpoints/): `models.runs.load_run_model` (MetaChexNet or the CheXNet baseline,
  as the run's saved config says), checkpoint `step` ("best", "latest" or a number);
- a `convert_torchvision` output (holds metadata.json): `convert.load_backbone` into a fresh MetaChexNet of
  `model_config` (its heads stay random and are never evaluated);
- a model directory (holds model.json), e.g. a `convert_torchxrayvision` output ("xrv_nih", "xrv_all", ... by its
  weights): its backbone, the same way, into a MetaChexNet whose stem takes the directory's input channels;
- "random": MetaChexNet of `model_config` from `seed`, BatchNorm at its initial statistics (mean 0, variance 1:
  in eval mode it does not normalise at all), as a freshly built network computes;
- "random_bn": the same random weights, with BatchNorm statistics estimated on ChestX-ray14 training images by
  the caller (`run` calls `features.calibrate_batchnorm`), the images a pretrained network's statistics come
  from: a baseline that differs from the pretrained network in its learned weights only.
Each start carries its pixel contract (`contract`): the run's sizes (`data.image_size`, `data.resolution`: the
TB sets are built at one resolution) with the normalisation and geometry its weights expect: a pretraining run's
own, ImageNet's for a torchvision backbone, the card's for a model directory (torchxrayvision's: 1 channel,
[-1024, 1024], centre square), the config's for the random starts. Feature extraction, BatchNorm statistics and
fine-tuning all feed each start through its own contract.
Every start must have the architecture of `model_config.arch`, so that a comparison compares weights, not
architectures; anything else is an error naming the path and both architectures. Unreadable or incomplete
checkpoints raise `StartingWeightsError` naming the path and orbax's complaint.

`fingerprint` is a SHA-256 of every array of the model (names, shapes, dtypes, bytes): the feature cache is keyed
on it, so moving or copying a checkpoint keeps its cache and retraining into the same path invalidates it.
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import numpy as np
from flax import nnx

from metachex_jax.contract.card import CARD_FILE, is_model_dir, read_card
from metachex_jax.contract.pixels import PixelContract
from metachex_jax.core import files
from metachex_jax.core.errors import UserError
from metachex_jax.interop import convert
from metachex_jax.models import build_model, resolve_scan_layers, runs, set_block_options, unrolled
from metachex_jax.models.metachexnet import MetaChexNet

RANDOM_KINDS = ("random", "random_bn")


class StartingWeightsError(UserError, ValueError):
    """Starting weights that cannot be used (missing, unreadable, another architecture)."""


@dataclasses.dataclass
class Start:
    name: str  # e.g. "metachexnet", "chexnet", "imagenet", "random", "random_bn"
    kind: str  # "run", "backbone", "random" or "random_bn"
    model: MetaChexNet  # eval mode
    fingerprint: str
    info: dict  # where the weights came from (json-ready)
    contract: PixelContract  # the pixels this start's model takes (see the module docstring)
    group: str = ""  # the start (groups.py) this is a run of; its name by default

    @property
    def has_trained_metadata_heads(self) -> bool:
        """The MetaChexNet age and sex heads were trained (a multi-task pretraining run)."""
        return self.kind == "run" and self.model.metadata_head is not None and self.model.age_out is not None


def weights_fingerprint(model: nnx.Module) -> str:
    """SHA-256 of the model's variables in torchvision's (unrolled) layout: the same weights give the same
    fingerprint whether the dense blocks are scanned or not."""
    digest = hashlib.sha256()
    flat = nnx.to_flat_state(nnx.state(unrolled(model)))
    for path, variable in sorted(flat, key=lambda item: tuple(map(str, item[0]))):
        array = np.asarray(jax.device_get(variable.get_value() if hasattr(variable, "get_value") else variable))
        digest.update(f"{'/'.join(map(str, path))}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def load_start(spec: str, model_config, seed: int, step: str = "best", *, contract: PixelContract) -> Start:
    """The starting weights `spec` names (a path or "random"); see the module docstring. `contract` gives the
    run's sizes and, for the random starts, the normalisation and geometry (`PixelContract.from_config(config)`).
    The model runs its dense blocks as `model_config` says (scan_layers, remat), whatever form a checkpoint was
    trained in."""
    start = _load_start(spec, model_config, seed, step, contract)
    set_block_options(start.model, scan_layers=resolve_scan_layers(model_config.get("scan_layers", "no")),
                      remat=model_config.get("remat", False))
    return start


def _load_start(spec: str, model_config, seed: int, step: str, contract: PixelContract) -> Start:
    if spec in RANDOM_KINDS:
        model = build_model(_with_pixels(model_config, contract), nnx.Rngs(seed))
        model.eval()
        return Start(spec, spec, model, weights_fingerprint(model),
                     {"source": spec, "seed": seed, "arch": model_config.arch, "input": contract.describe()}, contract)
    path = files.absolute(spec)  # local or gs://
    if files.is_dir(files.join(path, "checkpoints")):
        return _load_run(path, model_config, step, contract)
    if is_model_dir(path):
        return _load_model_dir(path, model_config, seed, contract)
    if files.is_file(files.join(path, convert.METADATA_FILE)):
        return _load_backbone(path, model_config, seed, dataclasses.replace(contract, normalization="imagenet",
                                                                            geometry="resize_crop"))
    what = "does not exist" if not files.exists(path) else "holds neither checkpoints/ (a pretraining workdir), " \
        f"{CARD_FILE} (a model directory) nor {convert.METADATA_FILE} (a convert_torchvision output)"
    raise StartingWeightsError(f"starting weights {spec!r}: {path} {what}; expected a pretraining workdir, a "
                               "convert_torchvision or convert_torchxrayvision output directory, 'random' or "
                               "'random_bn'")


def _with_pixels(model_config, contract: PixelContract):
    """`model_config` for a model fed by `contract` (its normalisation fixes the stem's input channels)."""
    config = model_config.copy_and_resolve_references()
    config.normalization, config.geometry = contract.normalization, contract.geometry
    return config


def _load_run(path: str, model_config, step: str, contract: PixelContract) -> Start:
    step_arg = step if step in ("best", "latest") else int(step)
    try:
        model, info = runs.load_run_model(path, step_arg)
    except FileNotFoundError as e:
        raise StartingWeightsError(f"starting weights {path}: {e}") from e
    except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable files: name them all
        raise StartingWeightsError(f"starting weights {path}: the checkpoint could not be read (incomplete or "
                                   f"corrupt?): {type(e).__name__}: {e}") from e
    if info["arch"] != model_config.arch:
        raise StartingWeightsError(f"starting weights {path}: the checkpoint is a {info['arch']} but this "
                                   f"comparison uses {model_config.arch} (config.model.arch)")
    own = PixelContract.from_config(info["config"])
    contract = dataclasses.replace(contract, normalization=own.normalization, geometry=own.geometry)
    name = "metachexnet" if model.metadata_head is not None else "chexnet"
    info = {"source": path, "step": info["step"], "arch": info["arch"],
            "multitask": model.metadata_head is not None, "input": contract.describe(),
            "val_mean_auroc": info["val_mean_auroc"]}
    return Start(name, "run", model, weights_fingerprint(model), info, contract)


def _load_backbone(path: str, model_config, seed: int, contract: PixelContract, card: dict | None = None) -> Start:
    model = build_model(_with_pixels(model_config, contract), nnx.Rngs(seed))
    try:
        metadata = convert.load_backbone(path, model)
    except (convert.StateDictMismatchError, convert.CheckpointReadError) as e:
        raise StartingWeightsError(f"starting weights {path}: {e}") from e
    model.eval()
    if card is not None:  # a model directory
        weights_name = (card.get("source") or {}).get("weights_name", "")
        name = f"xrv_{weights_name.rsplit('-', 1)[-1]}" if card.get("kind") == "torchxrayvision" else "model"
        info = {"source": path, "arch": model_config.arch, "kind": card.get("kind"),
                "converted_from": (card.get("source") or {}).get("file"), "weights_name": weights_name or None}
    else:
        source = str(metadata.get("source", ""))
        name = "imagenet" if "imagenet" in source.lower() or "torchvision" in source.lower() else "backbone"
        info = {"source": path, "arch": metadata.get("arch"), "converted_from": source}
    info["input"] = contract.describe()
    return Start(name, "backbone", model, weights_fingerprint(model), info, contract)


def _load_model_dir(path: str, model_config, seed: int, contract: PixelContract) -> Start:
    """The backbone of a model directory (a converted torchxrayvision model, ...), fed by the card's contract."""
    try:
        card = read_card(path)
        own = PixelContract.from_json(card["input"])
    except (ValueError, KeyError) as e:
        raise StartingWeightsError(f"starting weights {path}: unreadable model card: {e}") from e
    if card.get("kind") == "exported":
        raise StartingWeightsError(f"starting weights {path}: an exported model holds no trainable weights; use the "
                                   "directory it was exported from")
    return _load_backbone(path, model_config, seed,
                          dataclasses.replace(contract, normalization=own.normalization, geometry=own.geometry), card)
