"""A self-contained model directory: a model card (`model.json`) and the weights, readable without its run.

    DIR/model.json      the card: {"format": "metachex_jax.model/1", "kind", "model_config", "input" (the pixel
                        contract), "outputs" [{"name", "kind", "threshold"?}], plus provenance: "source",
                        "training", "metrics", "versions", ...}
    DIR/weights/        orbax checkpoint of the model's state (`nnx.to_pure_dict`), for the Flax model
    DIR/exported/       (`metachex_jax.export` only) the inference function serialised with jax.export and the
                        weights as numpy arrays: runs without the model code (see export.py)

`kind` names the Flax module to build from `model_config` (`BUILDERS`): "metachexnet" (MetaChexNet, the CheXNet
baseline and backbone-only models are its variants). Other kinds register a builder here.

`save` writes into a temporary sibling folder and renames it into place, so a DIR that exists is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable

from metachex_jax import files

FORMAT = "metachex_jax.model/1"
CARD_FILE = "model.json"
WEIGHTS_DIR = "weights"
EXPORTED_DIR = "exported"


def _build_metachexnet(model_config):
    from flax import nnx

    from metachex_jax.models import build_model

    return build_model(model_config, nnx.Rngs(0))


# kind -> function(model_config: ConfigDict) -> an NNX module with `backbone`, `output_kinds()`, `output_scores()`
BUILDERS: dict[str, Callable] = {"metachexnet": _build_metachexnet}


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
    """Write `model` (an NNX module of `card["kind"]`) and its card into the directory `path` (local)."""
    import orbax.checkpoint as ocp
    from flax import nnx

    if card.get("kind") not in BUILDERS:
        raise ValueError(f"unknown model kind {card.get('kind')!r}; known: {sorted(BUILDERS)}")
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(tmp, WEIGHTS_DIR), nnx.to_pure_dict(nnx.state(model)))
        with open(os.path.join(tmp, CARD_FILE), "w") as f:
            json.dump({"format": FORMAT, **card}, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 is for the temporary name only
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(path: str):
    """(the NNX module in eval mode with its weights, the card) of a model directory."""
    import jax
    import ml_collections
    import orbax.checkpoint as ocp
    from flax import nnx

    card = read_card(path)
    kind = card.get("kind")
    if kind not in BUILDERS:
        raise ValueError(f"{path}: unknown model kind {kind!r}; known: {sorted(BUILDERS)}")
    model_config = ml_collections.ConfigDict(card["model_config"])
    model = nnx.eval_shape(lambda: BUILDERS[kind](model_config))
    graphdef, state = nnx.split(model)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(files.join(files.absolute(path), WEIGHTS_DIR), target)
    nnx.replace_by_pure_dict(state, restored)
    model = nnx.merge(graphdef, state)
    model.eval()
    return model, card
