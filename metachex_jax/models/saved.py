"""A model directory's Flax model: written with its card (`save`) and built back from it (`load`), without its run.
The card and the directory's layout are contract/card.py:

    DIR/model.json      the card (contract/card.py)
    DIR/weights.npz     the model's state (`nnx.to_pure_dict`, keys are "/"-joined paths)

`kind` names the Flax module to build from `model_config` (`BUILDERS`): "metachexnet" (MetaChexNet, the CheXNet
baseline and backbone-only models are its variants), "tb_classifier" (a transfer run's deployable TB model),
"torchxrayvision" (a converted torchxrayvision DenseNet, `models/xrv.py`; written by `convert_torchxrayvision`).
Other kinds register a builder here.

`save` writes the directory whole or not at all (card.write_directory). Weights are a plain numpy archive, so one
process can write them (no collective checkpointing) and anything can read them.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from metachex_jax.contract.card import WEIGHTS_FILE, read_card, write_directory
from metachex_jax.core import files
from metachex_jax.models import build_model, resolve_scan_layers, set_block_options, unrolled
from metachex_jax.models.tb_classifier import build_tb_classifier
from metachex_jax.models.xrv import build_xrv_model


def _build_metachexnet(model_config):
    return build_model(model_config, nnx.Rngs(0))


# kind -> function(model_config: ConfigDict) -> an NNX module with `backbone`, `features()`, `output_kinds()`,
# `output_scores()`
BUILDERS: dict[str, Callable] = {"metachexnet": _build_metachexnet, "tb_classifier": build_tb_classifier,
                                 "torchxrayvision": build_xrv_model}


def save(path: str, model, card: dict, extra: dict[str, bytes] | None = None) -> None:
    """Write `model` (an NNX module of `card["kind"]`) and its card into the directory `path` (local or gs://),
    with `extra` files (relative path -> bytes, e.g. the OOD description `ood.npz` the card names)."""
    if card.get("kind") not in BUILDERS:
        raise ValueError(f"unknown model kind {card.get('kind')!r}; known: {sorted(BUILDERS)}")
    buffer = io.BytesIO()  # torchvision's (unrolled) layout, whatever form the dense blocks run in
    np.savez(buffer, **_flatten(nnx.to_pure_dict(nnx.state(unrolled(model)))))
    write_directory(path, {WEIGHTS_FILE: buffer.getvalue(), **(extra or {})}, card)


def load(path: str):
    """(the NNX module in eval mode with its weights, the card) of a model directory."""
    card = read_card(path)
    kind = card.get("kind")
    if kind not in BUILDERS:
        raise ValueError(f"{path}: unknown model kind {kind!r}; known: {sorted(BUILDERS)}")
    model_config = ml_collections.ConfigDict(card["model_config"])
    if kind == "tb_classifier" and "output_name" not in model_config:  # cards written before it was recorded
        model_config.output_name = card["outputs"][0]["name"]
    scan = resolve_scan_layers(model_config.get("scan_layers", "no"))
    unrolled_config = ml_collections.ConfigDict({**model_config.to_dict(), "scan_layers": "no"})
    model = nnx.eval_shape(lambda: BUILDERS[kind](unrolled_config))  # the stored layout
    graphdef, state = nnx.split(model)
    expected = _flatten(jax_shapes(nnx.to_pure_dict(state)))
    with np.load(io.BytesIO(files.read_bytes(files.join(path, WEIGHTS_FILE)))) as npz:
        stored = {k: npz[k] for k in npz.files}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    misshapen = [f"{k}: stored {stored[k].shape}, model {expected[k]}" for k in expected
                 if k in stored and tuple(stored[k].shape) != expected[k]]
    if missing or unexpected or misshapen:
        raise ValueError(f"{path}: the weights do not fit the {kind} model its card describes: missing {missing}, "
                         f"unexpected {unexpected}, misshapen {misshapen}")
    nnx.replace_by_pure_dict(state, _unflatten(stored))
    model = nnx.merge(graphdef, state)
    set_block_options(model, scan_layers=scan)  # dense blocks as the card's model_config says
    model.eval()
    return model, card


def jax_shapes(tree):
    return jax.tree.map(lambda x: tuple(x.shape), tree)


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        out.update(_flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(int(part) if part.isdigit() else part, {})
        node[int(leaf) if leaf.isdigit() else leaf] = value
    return tree
