"""A self-contained model directory's card and layout, readable without the model code:

    DIR/model.json      the card: {"format": "metachex_jax.model/1", "kind", "model_config", "input" (the pixel
                        contract), "outputs" [{"name", "kind", "threshold"?}], plus provenance: "source",
                        "training", "metrics", "versions", ...}
    DIR/weights.npz     the model's state, for the Flax model (models/saved.py writes and reads it)
    DIR/exported/       (`python -m metachex_jax.export` only) the inference function serialised with jax.export and the
                        weights as numpy arrays: runs without the model code (serving/exported.py)

`write_directory` writes into a temporary sibling folder and renames it into place, so a DIR that exists is
complete (on gs:// the card is written last: a directory without its card is not a model directory).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from etils import epath

from metachex_jax.core import files

FORMAT = "metachex_jax.model/1"
CARD_FILE = "model.json"
WEIGHTS_FILE = "weights.npz"
EXPORTED_DIR = "exported"


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


def write_directory(path: str, contents: dict[str, bytes], card: dict) -> None:
    """Write a model directory: `contents` (relative path -> bytes) and the card, never half of it.

    Locally everything goes into a temporary sibling that is renamed into place (replacing an older directory).
    On gs:// there is no rename: the old card is removed first and the new one written last, so the directory is
    a model directory (`is_model_dir`) only when complete.
    """
    card_text = json.dumps({"format": FORMAT, **card}, indent=1) + "\n"
    if files.is_url(path):
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
