"""A self-contained model directory: a model card (`model.json`) and the weights, readable without its run.

    DIR/model.json      the card: {"format": "metachex_jax.model/1", "kind", "model_config", "input" (the pixel
                        contract), "outputs" [{"name", "kind", "threshold"?}], plus provenance: "source",
                        "training", "metrics", "versions", ...}
    DIR/weights.npz     the model's state (`nnx.to_pure_dict`, keys are "/"-joined paths), for the Flax model
    DIR/exported/       (`metachex_jax.export` only) the inference function serialised with jax.export and the
                        weights as numpy arrays: runs without the model code (see export.py)

`kind` names the Flax module to build from `model_config` (`BUILDERS`): "metachexnet" (MetaChexNet, the CheXNet
baseline and backbone-only models are its variants), "tb_classifier" (a transfer run's deployable TB model),
"torchxrayvision" (a converted torchxrayvision DenseNet, `models/xrv.py`; written by `convert_torchxrayvision`).
Other kinds register a builder here.

`save` writes into a temporary sibling folder and renames it into place, so a DIR that exists is complete (on
gs:// the card is written last: a directory without its card is not a model directory). Weights are a plain
numpy archive, so one process can write them (no collective checkpointing) and anything can read them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable

import numpy as np

from metachex_jax import files

FORMAT = "metachex_jax.model/1"
CARD_FILE = "model.json"
WEIGHTS_FILE = "weights.npz"
EXPORTED_DIR = "exported"


def _build_metachexnet(model_config):
    from flax import nnx

    from metachex_jax.models import build_model

    return build_model(model_config, nnx.Rngs(0))


def _build_tb_classifier(model_config):
    from metachex_jax.models.tb_classifier import build_tb_classifier

    return build_tb_classifier(model_config)


def _build_torchxrayvision(model_config):
    from metachex_jax.models.xrv import build_xrv_model

    return build_xrv_model(model_config)


# kind -> function(model_config: ConfigDict) -> an NNX module with `backbone`, `features()`, `output_kinds()`,
# `output_scores()`
BUILDERS: dict[str, Callable] = {"metachexnet": _build_metachexnet, "tb_classifier": _build_tb_classifier,
                                 "torchxrayvision": _build_torchxrayvision}


def is_model_dir(path: str) -> bool:
    return files.is_file(files.join(path, CARD_FILE))


def read_card(path: str) -> dict:
    """The card of a model directory; a clear error when `path` is not one."""
    card_path = files.join(path, CARD_FILE)
    if not files.is_file(card_path):
        raise FileNotFoundError(f"{path} is not a model directory (no {CARD_FILE})")
    try:
        card = json.loads(files.read_text(card_path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{card_path} is not valid JSON: {e}") from e
    if card.get("format") != FORMAT:
        raise ValueError(f"{card_path}: format {card.get('format')!r}, expected {FORMAT!r}")
    return card


def save(path: str, model, card: dict) -> None:
    """Write `model` (an NNX module of `card["kind"]`) and its card into the directory `path` (local or gs://)."""
    from flax import nnx

    if card.get("kind") not in BUILDERS:
        raise ValueError(f"unknown model kind {card.get('kind')!r}; known: {sorted(BUILDERS)}")
    from metachex_jax.models import unrolled

    buffer = io.BytesIO()  # torchvision's (unrolled) layout, whatever form the dense blocks run in
    np.savez(buffer, **_flatten(nnx.to_pure_dict(nnx.state(unrolled(model)))))
    write_directory(path, {WEIGHTS_FILE: buffer.getvalue()}, card)


def write_directory(path: str, contents: dict[str, bytes], card: dict) -> None:
    """Write a model directory: `contents` (relative path -> bytes) and the card, never half of it.

    Locally everything goes into a temporary sibling that is renamed into place (replacing an older directory).
    On gs:// there is no rename: the old card is removed first and the new one written last, so the directory is
    a model directory (`is_model_dir`) only when complete.
    """
    card_text = json.dumps({"format": FORMAT, **card}, indent=1) + "\n"
    if files.is_url(path):
        from etils import epath

        epath.Path(files.join(path, CARD_FILE)).unlink(missing_ok=True)
        for name, data in contents.items():
            files.write_atomic(files.join(path, name), data)
        files.write_atomic(files.join(path, CARD_FILE), card_text)
        return
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
    try:
        for name, data in {**contents, CARD_FILE: card_text.encode()}.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 is for the temporary name only
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(path: str):
    """(the NNX module in eval mode with its weights, the card) of a model directory."""
    import ml_collections
    from flax import nnx

    from metachex_jax.models import resolve_scan_layers, set_block_options

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
    import jax

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
