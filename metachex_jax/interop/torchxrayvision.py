"""torchxrayvision's DenseNet-121 chest X-ray weights -> a model directory every tool here reads: the library
behind `python -m metachex_jax.convert_torchxrayvision` (whose help describes SRC, DEST and --weights_name).

`WEIGHTS` is a copy of torchxrayvision's `model_urls` table (torchxrayvision/models.py, `TABLE_VERSION`): the label
names and per-label operating thresholds of each published weights file, which the files do not carry. DEST is a
model directory (`models/saved.py`) of kind "torchxrayvision" (`models/xrv.py`), with the pixel contract
`PixelContract(224, 224, "xrv", "crop_resize")` and the source file's SHA-256. Every tensor is checked against the
architecture (`convert.convert_state_dict`); DEST is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import platform

import flax
import jax
import numpy as np
from flax import nnx

from metachex_jax.contract.card import is_model_dir
from metachex_jax.contract.outputs import outputs_of
from metachex_jax.contract.pixels import PixelContract
from metachex_jax.core import files
from metachex_jax.core.version import __version__
from metachex_jax.interop import convert
from metachex_jax.models import saved
from metachex_jax.models.xrv import XRVDenseNet

TABLE_VERSION = "torchxrayvision 1.5.7, torchxrayvision/models.py: model_urls"
PAPER = "https://arxiv.org/abs/2002.02497"
# torchxrayvision's `models.DenseNet.targets`: the 18 outputs, in order.
LABELS = ("Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
          "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion",
          "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum")
RELEASES = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
# torchxrayvision's LICENSE: "Main library (Apache-2.0): xrv.models, ..." (the weights are its release assets).
LICENCE = ("torchxrayvision's LICENSE puts its main library, xrv.models included, under Apache-2.0; the weights "
           "are assets of its GitHub release v1. The training datasets have their own terms of use.")


@dataclasses.dataclass(frozen=True)
class XrvWeights:
    url: str
    labels: tuple[str, ...]  # LABELS with '' where these weights were not trained
    op_thresholds: tuple[float | None, ...]  # NaN in torchxrayvision's table -> None
    training_data: str  # as torchxrayvision's README / model_urls describe it
    input_resolution: int = 224
    arch: str = "densenet121"


def _weights(file: str, trained: list[int], op_thresholds: list, training_data: str) -> XrvWeights:
    labels = tuple(label if i in trained else "" for i, label in enumerate(LABELS))
    return XrvWeights(RELEASES + file, labels, tuple(op_thresholds), training_data)


WEIGHTS = {
    "densenet121-res224-all": _weights(
        "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
        list(range(18)),
        [0.07422872, 0.038290843, 0.09814756, 0.0098118475, 0.023601074, 0.0022490358, 0.010060724, 0.103246614,
         0.056810737, 0.026791653, 0.050318155, 0.023985857, 0.01939503, 0.042889766, 0.053369623, 0.035975814,
         0.20204692, 0.05015312],
        "nih-pc-chex-mimic_ch-google-openi-rsna: NIH ChestX-ray14, PadChest, CheXpert, MIMIC-CXR, Google's NIH "
        "relabels, OpenI, RSNA Pneumonia (described in " + PAPER + ")"),
    "densenet121-res224-nih": _weights(
        "nih-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt", list(range(14)),
        [0.039117552, 0.0034529066, 0.11396341, 0.0057298196, 0.00045666535, 0.0018880932, 0.012037827,
         0.038744126, 0.0037213727, 0.014730946, 0.016149804, 0.054241467, 0.037198864, 0.0004403434,
         None, None, None, None],
        "NIH ChestX-ray14 (ChestX-ray8)"),
    "densenet121-res224-pc": _weights(
        "pc-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt", [*range(14), 15],
        [0.031012505, 0.013347598, 0.081435576, 0.001262615, 0.002587246, 0.0035944257, 0.0023071, 0.055412333,
         0.044385884, 0.042766232, 0.043258056, 0.037629247, 0.005658899, 0.0091741895, None, 0.026507627,
         None, None],
        "PadChest (University of Alicante)"),
    "densenet121-res224-chex": _weights(
        "chex-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt", [0, 1, 3, 4, 7, 8, 10, 14, 15, 16, 17],
        [0.1988969, 0.05710573, None, 0.0531293, 0.1435217, None, None, 0.27212676, 0.07749717, None, 0.19712369,
         None, None, None, 0.09932402, 0.09273402, 0.3270967, 0.10888247],
        "CheXpert (Stanford)"),
    "densenet121-res224-rsna": _weights(
        "kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt", [8, 16],
        [None] * 8 + [0.13486601] + [None] * 7 + [0.13511065, None],
        "RSNA Pneumonia Detection Challenge (Kaggle)"),
    "densenet121-res224-mimic_nb": _weights(
        "mimic_nb-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt", [0, 1, 3, 4, 7, 8, 10, 14, 15, 16, 17],
        [0.08558747, 0.011884617, None, 0.0040595434, 0.010733786, None, None, 0.118761964, 0.022924708, None,
         0.06358637, None, None, None, 0.022143636, 0.017476924, 0.1258702, 0.014020768],
        "MIMIC-CXR (MIT)"),
    "densenet121-res224-mimic_ch": _weights(
        "mimic_ch-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt", [0, 1, 3, 4, 7, 8, 10, 14, 15, 16, 17],
        [0.09121389, 0.010573786, None, 0.005023008, 0.003698257, None, None, 0.08001232, 0.037242252, None,
         0.05006329, None, None, None, 0.019866971, 0.03823637, 0.11303808, 0.0069147074],
        "MIMIC-CXR (MIT)"),
}


def input_contract(weights: XrvWeights) -> PixelContract:
    """torchxrayvision's input: centre square, resized to its resolution (224), 1 channel, [-1024, 1024]."""
    return PixelContract(weights.input_resolution, weights.input_resolution, "xrv", "crop_resize")


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_file(src: str, weights_name: str, *, arch: str | None = None) -> tuple[XRVDenseNet, dict]:
    """(the model, its card) from a torchxrayvision weights file. `arch` overrides the table's (tests)."""
    if weights_name not in WEIGHTS:
        raise ValueError(f"unknown --weights_name={weights_name!r}; torchxrayvision's DenseNet weights are: "
                         + ", ".join(WEIGHTS))
    weights = WEIGHTS[weights_name]
    src = os.path.abspath(src)
    state_dict = convert.read_state_dict(src)
    spec = convert.resolve_spec(arch or weights.arch)
    target = convert.abstract_densenet(spec, len(weights.labels), in_channels=1)
    # Every key checked (missing, extra, misshapen: all reported); `op_threshs` is a buffer of torchxrayvision's
    # module, but the thresholds come from the table, as torchxrayvision itself takes them.
    conversion = convert.convert_state_dict(state_dict, target, what=src, droppable=("op_threshs",))
    state = dict(conversion.state)
    classifier = state.pop("classifier")
    model = nnx.eval_shape(lambda: XRVDenseNet(spec, labels=weights.labels, op_thresholds=weights.op_thresholds,
                                               rngs=nnx.Rngs(0)))
    model = convert.fill(model, {"backbone": state, "classifier": classifier})
    model.eval()
    card = {
        "kind": "torchxrayvision",
        "model_config": {"arch": convert.arch_name(spec),
                         "labels": list(weights.labels), "op_thresholds": list(weights.op_thresholds),
                         "dtype": "float32"},
        "input": input_contract(weights).to_json(),
        "outputs": [o.to_json() for o in outputs_of(model)],
        "num_features": model.num_features,
        "source": {"file": src, "sha256": sha256(src), "weights_name": weights_name, "weights_url": weights.url,
                   "table": TABLE_VERSION, "op_threshs_in_file": _file_thresholds(state_dict, weights),
                   "dropped_keys": [k for k in conversion.dropped if not k.endswith(".num_batches_tracked")]},
        "training": {"data": weights.training_data, "by": "torchxrayvision (" + PAPER + ")",
                     "input_resolution": weights.input_resolution},
        "licence": LICENCE,
        "versions": {"metachex_jax": __version__, "jax": jax.__version__, "flax": flax.__version__,
                     "python": platform.python_version()},
    }
    return model, card


def _file_thresholds(state_dict: dict, weights: XrvWeights) -> str:
    """What the file's own `op_threshs` buffer says, next to the table's (which are used)."""
    if "op_threshs" not in state_dict:
        return "absent"
    found = np.asarray(state_dict["op_threshs"], np.float64).ravel()
    table = np.asarray([math.nan if t is None else t for t in weights.op_thresholds], np.float64)
    if found.shape == table.shape and np.allclose(found, table, rtol=1e-6, atol=0, equal_nan=True):
        return "equal to the table"
    return "differs from the table (the table's are used, as torchxrayvision does)"


def convert_to_directory(src: str, dest: str, weights_name: str, *, arch: str | None = None,
                         overwrite: bool = False) -> dict:
    """Convert SRC and write the model directory DEST; returns its card. Checks DEST before reading SRC."""
    dest = os.path.abspath(dest)
    if os.path.exists(dest):
        if not overwrite:
            raise FileExistsError(f"{dest} already exists; pass --overwrite to replace it")
        if not is_model_dir(dest):
            raise FileExistsError(f"{dest} exists and is not a model directory; refusing to replace it")
    if not files.is_file(src):
        raise FileNotFoundError(f"weights file not found: {src}")
    model, card = convert_file(src, weights_name, arch=arch)
    saved.save(dest, model, card)
    return card
