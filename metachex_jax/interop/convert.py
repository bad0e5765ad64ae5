"""Import torchvision DenseNet weights, and save/restore DenseNet backbones as `model_init` checkpoints.

Design. `metachex_jax.models.DenseNet` mirrors torchvision's module tree one to one, so a torchvision state dict
and the NNX state differ only in names and in axis order:

    torchvision key                                        NNX path                            transform
    features.conv0.weight                                  conv0.kernel                        OIHW -> HWIO
    features.norm0.{weight,bias,running_mean,running_var}  norm0.{scale,bias,mean,var}         none
    features.denseblockB.denselayerL.{norm1,conv1,...}.*   blocks[B-1].layers[L-1].{...}.*     (as above)
    features.transitionT.{norm,conv}.*                     transitions[T-1].{norm,conv}.*
    features.norm5.*                                       norm5.*
    classifier.{weight,bias}                               classifier.{kernel,bias}            (out,in) -> (in,out)
    *.num_batches_tracked                                  (dropped: NNX BatchNorm has no counter)

The mapping is generated from the NNX model (`torchvision_key` names every model variable), so it cannot drift
from the model code. `convert_state_dict` checks it is total both ways: every model variable receives exactly one
tensor of the right shape, and every state-dict tensor is used once or explicitly dropped; anything else (missing
keys, unexpected keys, shape mismatches) is collected and reported in one error. The target model is built with
`nnx.eval_shape` (shapes only, no random initialisation) and then filled.

Old torchvision checkpoints spell dense-layer modules `norm.1`, `conv.2`, ...; they are renamed exactly as
torchvision's own `_load_state_dict` does (its regex, extended to `num_batches_tracked`).

Files: `.pth`/`.pt` are read by `metachex_jax.interop.torch_pickle` (no torch needed; a restricted unpickler that runs
nothing from the file; a plain state dict or a whole pickled module); `.npz` and `.safetensors` with numpy /
safetensors alone.

Backbone checkpoints (`save_backbone` / `load_backbone`, the trainer's `--config.model_init=DEST`): DEST is an
orbax StandardCheckpointer checkpoint of `{"backbone": nnx.to_pure_dict(<DenseNet state without classifier>)}`
with `DEST/metadata.json` beside orbax's own files:
`{"format": "metachex_jax.backbone/1", "arch", "spec", "num_features", "in_channels", "num_params", "source"}`
(`in_channels` absent in checkpoints written before it existed: 3).
DEST is written under a temporary name and renamed into place, so a DEST that exists is complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy
from etils import epath
from flax import nnx

from metachex_jax.contract.card import is_model_dir
from metachex_jax.core import files
from metachex_jax.interop import torch_pickle
from metachex_jax.models import saved
from metachex_jax.models.densenet import SPECS, DenseNet, DenseNetSpec, convert_layout, count_params, unrolled

BACKBONE_FORMAT = "metachex_jax.backbone/1"
METADATA_FILE = "metadata.json"
READABLE_SUFFIXES = (".pth", ".pt", ".npz", ".safetensors")

# NNX BatchNorm variable -> torchvision BatchNorm tensor.
_BATCH_NORM_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# torchvision's `_load_state_dict` regex for old keys (`denselayer1.norm.1.weight` -> `denselayer1.norm1.weight`),
# extended to num_batches_tracked.
_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                         r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
# Axis permutation NNX -> torch by rank: conv kernels HWIO -> OIHW, linear kernels (in, out) -> (out, in).
_TO_TORCH_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}


class CheckpointReadError(ValueError):
    """A weights file could not be read (corrupt, truncated, wrong format, not a flat state dict)."""


class StateDictMismatchError(ValueError):
    """A state dict or backbone checkpoint does not fit the model; the message lists every mismatch."""


class Conversion(NamedTuple):
    state: dict           # nested pure dict for `nnx.replace_by_pure_dict`, float32 numpy arrays in NNX layout
    dropped: list[str]    # state-dict keys deliberately not loaded (num_batches_tracked, a dropped classifier)


# ---------------------------------------------------------------------------------------------------------------
# Architecture names.

def resolve_spec(arch: str | DenseNetSpec) -> DenseNetSpec:
    if isinstance(arch, DenseNetSpec):
        return arch
    if arch not in SPECS:
        raise ValueError(f"unknown DenseNet arch {arch!r}; known: {', '.join(SPECS)}")
    return SPECS[arch]


def arch_name(spec: DenseNetSpec) -> str | None:
    """The `SPECS` name of a spec ("densenet121", ...), or None for a custom one."""
    return next((name for name, s in SPECS.items() if s == spec), None)


def spec_to_json(spec: DenseNetSpec) -> dict:
    """The spec as metadata.json stores it (block_config as a list)."""
    return dataclasses.asdict(spec) | {"block_config": list(spec.block_config)}


def describe(spec: DenseNetSpec) -> str:
    return arch_name(spec) or f"custom DenseNet {dataclasses.asdict(spec)}"


def infer_spec(state_dict: Mapping[str, Any]) -> DenseNetSpec:
    """Read the architecture off a torchvision-layout state dict (legacy keys already renamed).

    Depths come from the highest block/layer indices present, widths from the stem and first dense layer, so a
    damaged state dict still yields the intended spec and `convert_state_dict` can then list what is wrong.
    """
    layers: dict[int, int] = {}
    for key in state_dict:
        match = re.match(r"features\.denseblock(\d+)\.denselayer(\d+)\.", key)
        if match:
            block, layer = int(match[1]), int(match[2])
            layers[block] = max(layers.get(block, 0), layer)
    needed = ["features.conv0.weight", "features.denseblock1.denselayer1.conv1.weight",
              "features.denseblock1.denselayer1.conv2.weight"]
    absent = [k for k in needed if k not in state_dict]
    if not layers or absent:
        raise StateDictMismatchError(
            "cannot infer a DenseNet architecture: not a torchvision DenseNet state dict "
            f"(missing {', '.join(absent) or 'features.denseblock* keys'}); pass arch= to compare it key by key")
    growth_rate = int(np.shape(state_dict[needed[2]])[0])
    return DenseNetSpec(
        growth_rate=growth_rate,
        block_config=tuple(layers.get(b, 0) for b in range(1, max(layers) + 1)),
        num_init_features=int(np.shape(state_dict[needed[0]])[0]),
        bn_size=int(np.shape(state_dict[needed[1]])[0]) // growth_rate)


# ---------------------------------------------------------------------------------------------------------------
# The key mapping.

def torchvision_key(path: tuple) -> str:
    """torchvision state-dict key of an NNX DenseNet variable path, e.g. ("blocks", 0, "layers", 2, "conv1",
    "kernel") -> "features.denseblock1.denselayer3.conv1.weight"."""
    head, *rest = path
    if head == "blocks" and len(rest) == 5 and rest[1] == "layers":
        block, _, layer, module, leaf = rest
        prefix = f"features.denseblock{block + 1}.denselayer{layer + 1}.{module}"
    elif head == "transitions" and len(rest) == 3:
        transition, module, leaf = rest
        prefix = f"features.transition{transition + 1}.{module}"
    elif head in ("conv0", "norm0", "norm5") and len(rest) == 1:
        prefix, leaf = f"features.{head}", rest[0]
    elif head == "classifier" and len(rest) == 1:
        prefix, leaf = "classifier", rest[0]
    else:
        raise KeyError(f"no torchvision name for DenseNet variable {path}")
    if leaf == "kernel":
        return f"{prefix}.weight"
    if prefix.rsplit(".", 1)[-1].startswith("norm"):
        return f"{prefix}.{_BATCH_NORM_NAMES[leaf]}"
    if leaf == "bias":
        return f"{prefix}.bias"
    raise KeyError(f"no torchvision name for DenseNet variable {path}")


def to_torch_layout(value: np.ndarray) -> np.ndarray:
    """NNX -> torch axis order: conv kernels HWIO -> OIHW, linear kernels (in,out) -> (out,in)."""
    axes = _TO_TORCH_AXES.get(value.ndim)
    return np.transpose(value, axes) if axes else value


def from_torch_layout(value: np.ndarray) -> np.ndarray:
    """torch -> NNX axis order: conv OIHW -> HWIO, linear (out,in) -> (in,out)."""
    axes = _TO_TORCH_AXES.get(value.ndim)
    return np.transpose(value, np.argsort(axes)) if axes else value


def torch_shape(nnx_shape: tuple[int, ...]) -> tuple[int, ...]:
    axes = _TO_TORCH_AXES.get(len(nnx_shape))
    return tuple(nnx_shape[a] for a in axes) if axes else tuple(nnx_shape)


def variable_paths(model: nnx.Module) -> dict[tuple, Any]:
    """Every state variable of a (possibly abstract) model: path -> value (array or ShapeDtypeStruct)."""
    return {tuple(path): variable.get_value() for path, variable in nnx.to_flat_state(nnx.state(model))}


def rename_legacy_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename old torchvision keys (`norm.1` -> `norm1`), refusing a state dict that spells one tensor both ways."""
    renamed: dict[str, Any] = {}
    clashes = []
    for key, value in state_dict.items():
        match = _LEGACY_KEY.match(key)
        new_key = match[1] + match[2] if match else key
        if new_key in renamed:
            clashes.append(new_key)
        renamed[new_key] = value
    if clashes:
        raise StateDictMismatchError(
            f"{len(clashes)} tensors appear under both the legacy and the current key spelling: "
            + ", ".join(sorted(clashes)))
    return renamed


def convert_state_dict(state_dict: Mapping[str, Any], model: nnx.Module, *, what: str = "state dict",
                       droppable: tuple[str, ...] = ()) -> Conversion:
    """Map a torchvision-layout state dict onto `model`'s variables (model may be abstract, from eval_shape).

    Every model variable must receive one tensor of the right shape; every state-dict key must be used, except
    `num_batches_tracked` of the model's BatchNorms, for a model without classifier `classifier.*`, and the keys in
    `droppable`.
    Raises `StateDictMismatchError` listing all missing keys, unexpected keys and shape mismatches.
    """
    state_dict = rename_legacy_keys(state_dict)
    variables = variable_paths(model)
    targets = {torchvision_key(path): (path, value) for path, value in variables.items()}
    assert len(targets) == len(variables), "two model variables map to one torchvision key"
    droppable = {key.rsplit(".", 1)[0] + ".num_batches_tracked" for key in targets if key.endswith(".running_mean")
                 } | set(droppable)
    if getattr(model, "classifier", None) is None:
        droppable |= {"classifier.weight", "classifier.bias"}

    missing, mismatched, flat = [], [], {}
    for key, (path, target) in targets.items():
        if key not in state_dict:
            missing.append(f"{key} (expected shape {torch_shape(target.shape)})")
            continue
        value = np.asarray(state_dict[key])
        if value.shape != torch_shape(target.shape):
            mismatched.append(f"{key}: {what} has {value.shape}, model expects {torch_shape(target.shape)}")
            continue
        flat[path] = np.ascontiguousarray(from_torch_layout(value), dtype=target.dtype)
    unexpected = [f"{key} (shape {np.shape(state_dict[key])})" for key in state_dict
                  if key not in targets and key not in droppable]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(_mismatch_report(
            f"{what} does not fit {describe(model.spec)} "
            f"(num_classes={model.classifier.out_features if model.classifier is not None else None}, "
            f"in_channels={model.in_channels})"
            + _looks_like(state_dict),
            missing=missing, unexpected=unexpected, mismatched=mismatched))
    dropped = sorted(key for key in state_dict if key in droppable)
    return Conversion(_nest(flat), dropped)


def to_torchvision_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The inverse mapping: a DenseNet's variables as a torchvision state dict of numpy arrays (torch layout).

    `num_batches_tracked` is not part of the NNX state and is not emitted."""
    return {torchvision_key(path): np.ascontiguousarray(to_torch_layout(np.asarray(value)))
            for path, value in variable_paths(unrolled(model)).items()}


def _looks_like(state_dict: Mapping[str, Any]) -> str:
    try:
        return f"; the state dict looks like {describe(infer_spec(state_dict))}"
    except StateDictMismatchError:
        return "; the state dict does not look like a torchvision DenseNet"


def _mismatch_report(title: str, *, missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    lines = [title]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            lines.append(f"  {len(items)} {label}:")
            lines.extend(f"    {item}" for item in items)
    return "\n".join(lines)


def _nest(flat: Mapping[tuple, Any]) -> dict:
    nested: dict = {}
    for path, value in flat.items():
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return nested


def _load_backbone_from_model_dir(src: str, model: nnx.Module) -> dict:
    """`load_backbone` from a model directory: its model's `.backbone`, checked key by key like a checkpoint."""
    backbone = _backbone_of(model)
    try:
        source, card = saved.load(src)
    except Exception as e:  # noqa: BLE001 - unreadable weights: orbax raises many types, name them
        raise CheckpointReadError(f"cannot read the model directory {src}: {type(e).__name__}: {e}") from e
    source_backbone = _backbone_of(source)
    target, stored = _flatten(_backbone_state(backbone)), _flatten(_backbone_state(source_backbone))
    missing = [f"{k} (expected shape {tuple(v.shape)})" for k, v in target.items() if k not in stored]
    unexpected = [f"{k} (shape {tuple(v.shape)})" for k, v in stored.items() if k not in target]
    mismatched = [f"{k}: the model directory has {tuple(stored[k].shape)}, model expects {tuple(v.shape)}"
                  for k, v in target.items() if k in stored and tuple(stored[k].shape) != tuple(v.shape)]
    if source_backbone.spec != backbone.spec or missing or unexpected or mismatched:
        raise StateDictMismatchError(_mismatch_report(
            f"the backbone of model directory {src} ({card.get('kind')}, {describe(source_backbone.spec)}, "
            f"{source_backbone.in_channels} input channel(s)) does not fit the model's {describe(backbone.spec)} "
            f"with {backbone.in_channels}", missing=missing, unexpected=unexpected, mismatched=mismatched))
    restored = jax.tree.map(lambda value, current: jax.device_put(value, current.sharding),
                            _backbone_state(source_backbone), _backbone_state(backbone))
    _set_backbone_state(backbone, restored)
    return card


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"blocks.0.layers.1.conv1.kernel": leaf}; keys stringified (orbax metadata uses "0")."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


# ---------------------------------------------------------------------------------------------------------------
# Reading weights files.

def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a flat state dict of numpy arrays from `.pth`/`.pt` (torch's zip or legacy format: a state dict or a
    whole pickled module, read by `metachex_jax.interop.torch_pickle` without torch), `.npz` or `.safetensors`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in READABLE_SUFFIXES:
        raise CheckpointReadError(f"{path}: unsupported weights file type {suffix!r}; expected one of "
                                  + ", ".join(READABLE_SUFFIXES))
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                loaded = {key: archive[key] for key in archive.files}
        elif suffix == ".safetensors":
            loaded = safetensors.numpy.load_file(path)
        else:
            # Our own restricted unpickler (no torch needed): a state dict or a whole pickled module; nothing
            # from the file is imported or run.
            loaded = torch_pickle.read_state_dict(path)
    except Exception as e:  # every reader has its own exception types; all mean "this file is unreadable"
        raise CheckpointReadError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from e
    return _as_numpy_state_dict(loaded, path)


def _as_numpy_state_dict(loaded: Any, path: Path) -> dict[str, np.ndarray]:
    if not isinstance(loaded, Mapping):
        raise CheckpointReadError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    result, bad = {}, []
    for key, value in loaded.items():
        if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16, so widen low-precision floats
            value = value.detach().cpu()
            value = value.float() if value.is_floating_point() and value.element_size() < 4 else value
            value = value.numpy()
        if isinstance(key, str) and isinstance(value, np.ndarray):
            result[key] = value
        else:
            bad.append(f"{key!r} ({type(value).__name__})")
    if bad:
        raise CheckpointReadError(
            f"{path} is not a flat state dict of tensors; offending entries: {', '.join(bad)} "
            "(a training checkpoint? extract its model state dict first)")
    return result


# ---------------------------------------------------------------------------------------------------------------
# Loading a torchvision DenseNet.

def abstract_densenet(arch: str | DenseNetSpec, num_classes: int | None, dtype: Any = jnp.float32,
                      in_channels: int = 3) -> DenseNet:
    """A DenseNet whose variables are ShapeDtypeStructs: the target to fill, without random initialisation."""
    return nnx.eval_shape(lambda: DenseNet(arch, num_classes=num_classes, in_channels=in_channels, dtype=dtype,
                                           rngs=nnx.Rngs(0)))


def fill(abstract_model: nnx.Module, state: dict) -> nnx.Module:
    """Replace every variable of an abstract model with the arrays of a pure dict of the same structure."""
    graphdef, abstract_state = nnx.split(abstract_model)
    nnx.replace_by_pure_dict(abstract_state, jax.tree.map(jnp.asarray, state))
    return nnx.merge(graphdef, abstract_state)


def load_torchvision_densenet(path: str | os.PathLike, num_classes: int | None = 1000,
                              arch: str | DenseNetSpec | None = None, *, dtype: Any = jnp.float32,
                              in_channels: int | None = None) -> DenseNet:
    """Build an NNX DenseNet holding the weights and BatchNorm statistics of a torchvision state dict file.

    Args:
      path: `.pth`/`.pt` (needs torch; read with weights_only=True), `.npz` or `.safetensors` holding a
        torchvision `densenet*` state dict (e.g. torchvision's ImageNet weights `densenet121-a639ec97.pth`).
      num_classes: classifier size, which must match the file's; None drops the file's classifier (if any) and
        returns the backbone alone.
      arch: "densenet121", ... or a `DenseNetSpec`; None infers it from the state dict. A given arch that does
        not match the file raises `StateDictMismatchError` listing every missing/unexpected/mismatched key.
      dtype: computation dtype of the model; parameters stay float32.
      in_channels: the stem's input channels; None reads them off the file's `features.conv0.weight` (3 for
        torchvision's, 1 for torchxrayvision's); a given value that does not match is a reported mismatch.

    The model comes back in the default (training) mode, like a freshly built one. For inference and for parity
    with torchvision's `model.eval()`, call `model.eval()` so that BatchNorm uses the loaded running statistics.
    Inputs are NHWC (torch's NCHW transposed), normalised as `metachex_jax.contract.pixels` documents.
    """
    return densenet_from_state_dict(read_state_dict(path), num_classes, arch, dtype=dtype, what=str(path),
                                    in_channels=in_channels)[0]


def densenet_from_state_dict(state_dict: Mapping[str, Any], num_classes: int | None = 1000,
                             arch: str | DenseNetSpec | None = None, *, dtype: Any = jnp.float32,
                             what: str = "state dict", in_channels: int | None = None,
                             droppable: tuple[str, ...] = ()) -> tuple[DenseNet, list[str]]:
    """`load_torchvision_densenet` for an in-memory state dict; also returns the keys deliberately dropped.

    `what` names the source in error messages; `droppable` names further keys that may be present and are not
    loaded (e.g. torchxrayvision's `op_threshs` buffer)."""
    state_dict = rename_legacy_keys(state_dict)
    try:
        spec = resolve_spec(arch) if arch is not None else infer_spec(state_dict)
    except StateDictMismatchError as e:
        raise StateDictMismatchError(f"{what}: {e}") from None
    if in_channels is None:
        stem = state_dict.get("features.conv0.weight")
        in_channels = int(np.shape(stem)[1]) if stem is not None and np.ndim(stem) == 4 else 3
    model = abstract_densenet(spec, num_classes, dtype, in_channels)
    conversion = convert_state_dict(state_dict, model, what=what, droppable=droppable)
    return fill(model, conversion.state), conversion.dropped


# ---------------------------------------------------------------------------------------------------------------
# Backbone checkpoints (model_init).

def _backbone_of(model: nnx.Module) -> DenseNet:
    backbone = model if isinstance(model, DenseNet) else getattr(model, "backbone", None)
    if not isinstance(backbone, DenseNet):
        raise TypeError(f"expected a DenseNet or a model with a DenseNet `.backbone`, got {type(model).__name__}")
    return backbone


def _set_backbone_state(backbone: DenseNet, restored: dict) -> None:
    """Put a `_backbone_state` (torchvision's layout) into `backbone`, whichever form its dense blocks take."""
    if backbone.blocks[0].scan_layers:
        restored = convert_layout(restored, backbone.spec, scan_layers=True)
    state = nnx.state(backbone)
    nnx.replace_by_pure_dict(state, restored)  # a classifier, absent from `restored`, keeps its values
    nnx.update(backbone, state)


def _backbone_state(backbone: DenseNet) -> dict:
    """The backbone's pure state dict without the classifier, in torchvision's (unrolled) layout."""
    state = nnx.to_pure_dict(nnx.state(unrolled(backbone)))
    state.pop("classifier", None)
    return state


def save_backbone(model: nnx.Module, dest: str | os.PathLike, *, source: str, overwrite: bool = False) -> Path:
    """Write the DenseNet backbone of `model` (a DenseNet or a MetaChexNet; classifier/heads left out) to DEST.

    DEST becomes an orbax StandardCheckpointer checkpoint of {"backbone": pure state} plus DEST/metadata.json
    (format, arch, spec, num_features, in_channels, num_params, source). Everything is written into a temporary
    sibling directory that is renamed to DEST at the end, so DEST never exists half-written. An existing DEST is refused
    unless overwrite=True. Single-process tool: call it from one process, not from every host of a multi-host run.
    Returns DEST as an absolute path.
    """
    dest = Path(dest).absolute()
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists; pass overwrite=True to replace it")
    if dest.exists():  # overwrite only ever replaces another backbone checkpoint, never an unrelated directory
        try:
            read_backbone_metadata(dest)
        except (FileNotFoundError, CheckpointReadError) as e:
            raise FileExistsError(f"{dest} exists and is not a backbone checkpoint; refusing to replace it ({e})"
                                  ) from None
    backbone = _backbone_of(model)
    spec = backbone.spec
    metadata = {
        "format": BACKBONE_FORMAT,
        "arch": arch_name(spec),
        "spec": spec_to_json(spec),
        "num_features": backbone.num_features,
        "in_channels": backbone.in_channels,
        "num_params": count_params(backbone) - (
            count_params(backbone.classifier) if backbone.classifier is not None else 0),
        "source": str(source),
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        checkpoint = staging / "checkpoint"
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(checkpoint, {"backbone": _backbone_state(backbone)})
            checkpointer.wait_until_finished()
        (checkpoint / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if dest.exists():  # overwrite: move the old one aside, delete it only once the new one is in place
            replaced = staging / "replaced"
            os.rename(dest, replaced)
            try:
                os.rename(checkpoint, dest)
            except OSError:
                os.rename(replaced, dest)
                raise
        else:
            os.rename(checkpoint, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def read_backbone_metadata(src: str | os.PathLike) -> dict:
    """metadata.json of a backbone checkpoint, checked for the expected format."""
    src = epath.Path(files.absolute(src))  # local or gs://
    meta_path = src / METADATA_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{src} is not a backbone checkpoint: {meta_path} not found "
                                "(write one with `python -m metachex_jax.convert_torchvision`)")
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointReadError(f"cannot read {meta_path}: {e}") from e
    if not isinstance(metadata, dict) or metadata.get("format") != BACKBONE_FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise CheckpointReadError(f"{meta_path}: format is {found!r}, expected {BACKBONE_FORMAT!r}")
    return metadata


def load_backbone(src: str | os.PathLike, model: nnx.Module) -> dict:
    """Restore a `save_backbone` checkpoint into `model.backbone` (MetaChexNet) or into a bare DenseNet, in place.

    SRC may also be a model directory (`models/saved.py`, e.g. a `convert_torchxrayvision` output): its backbone is
    used. Heads and a DenseNet's classifier are left untouched. The checkpoint's architecture and every key and
    shape are checked against the model first; `StateDictMismatchError` lists all differences. Restored arrays
    take the shardings of the model's current arrays. Returns the checkpoint's metadata (for a model directory:
    its card).
    """
    src = files.absolute(src)  # a gs:// checkpoint stays a URL (orbax reads it)
    if is_model_dir(src):
        return _load_backbone_from_model_dir(src, model)
    metadata = read_backbone_metadata(src)
    backbone = _backbone_of(model)
    target = _backbone_state(backbone)
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            stored = _flatten(checkpointer.metadata(src).item_metadata["backbone"])
        except Exception as e:
            raise CheckpointReadError(f"cannot read the orbax checkpoint {src}: {type(e).__name__}: {e}") from e

        expected = _flatten(target)
        missing = [f"{k} (expected shape {tuple(v.shape)})" for k, v in expected.items() if k not in stored]
        unexpected = [f"{k} (shape {tuple(v.shape)})" for k, v in stored.items() if k not in expected]
        mismatched = [f"{k}: checkpoint has {tuple(stored[k].shape)}, model expects {tuple(v.shape)}"
                      for k, v in expected.items() if k in stored and tuple(stored[k].shape) != v.shape]
        stored_spec = metadata.get("spec")
        if stored_spec != spec_to_json(backbone.spec) or missing or unexpected or mismatched:
            raise StateDictMismatchError(_mismatch_report(
                f"backbone checkpoint {src} (arch {metadata.get('arch')}, spec {stored_spec}) does not fit the "
                f"model's {describe(backbone.spec)}", missing=missing, unexpected=unexpected, mismatched=mismatched))

        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
        try:
            restored = checkpointer.restore(src, {"backbone": abstract})["backbone"]
        except Exception as e:
            raise CheckpointReadError(f"cannot restore the orbax checkpoint {src}: {type(e).__name__}: {e}") from e
    _set_backbone_state(backbone, restored)
    return metadata
