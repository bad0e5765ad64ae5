"""The exported form of a model directory, DIR/exported/ (written by `export`): the whole inference function
serialised with jax.export, and its weights. Reading it needs neither the model code nor the run.

    DIR/exported/forward.jaxexport    `(weights, uint8 images (b, S, S)) -> (values (b, K), features (b, F))`
    DIR/exported/weights.npz          the weights as numpy arrays w0, w1, ..., in the function's argument order
"""

from __future__ import annotations

import io

import jax
import numpy as np

from metachex_jax.contract.card import EXPORTED_DIR
from metachex_jax.core import files

FUNCTION_FILE = "forward.jaxexport"
WEIGHTS_FILE = "weights.npz"


def read_exported(path: str):
    """(jax.export.Exported, weights list) of an exported model directory."""
    directory = files.join(path, EXPORTED_DIR)
    function = jax.export.deserialize(bytearray(files.read_bytes(files.join(directory, FUNCTION_FILE))))
    with np.load(io.BytesIO(files.read_bytes(files.join(directory, WEIGHTS_FILE)))) as npz:
        weights = [npz[f"w{i}"] for i in range(len(npz.files))]
    return function, weights
