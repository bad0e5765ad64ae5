"""Export a model as a self-contained directory that runs without this project's model code: `export(MODEL,
out)`, the library behind `python -m metachex_jax.export` (whose help describes the directory).

The directory is a model directory (`models/saved.py`) whose card says what was exported, with DIR/exported/
(`exported.py`): the whole inference function (`forward.make_forward`) serialised with `jax.export`, batch-size
polymorphic, lowered for CPU, CUDA and TPU and without shardings, and its weights. Grad-CAM is not exported.
The function returns the pooled features with the outputs, so the model's OOD description (contract/ood.py: the
source's `ood.npz`, or a pretraining run's WORKDIR/ood/step_<N>.npz) travels with it: the card's "ood" entry and
the directory's `ood.npz`. A source without one exports without one (the card says why).
"""

from __future__ import annotations

import io
import json
import platform

import flax
import jax
import numpy as np

from metachex_jax.contract import ood
from metachex_jax.contract.card import EXPORTED_DIR, is_model_dir, read_card, write_directory
from metachex_jax.core import files
from metachex_jax.core.version import __version__
from metachex_jax.models import runs
from metachex_jax.serving.exported import FUNCTION_FILE, WEIGHTS_FILE
from metachex_jax.serving.flax_model import make_forward
from metachex_jax.serving.predictor import Predictor

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


def export_predictor(predictor, platforms=DEFAULT_PLATFORMS):
    """(serialised function bytes, weight arrays) of a Flax-backed `Predictor`."""
    backend = predictor._backend
    forward = make_forward(backend.graphdef, predictor.outputs, predictor.contract)
    leaves, treedef = jax.tree.flatten(backend.state)

    def flat_forward(weights, images):
        return forward(jax.tree.unflatten(treedef, weights), images)

    size = predictor.contract.image_size
    (batch,) = jax.export.symbolic_shape("b")
    args = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
            jax.ShapeDtypeStruct((batch, size, size), np.uint8))
    exported = jax.export.export(jax.jit(flat_forward), platforms=tuple(platforms))(*args)
    return exported.serialize(), [np.asarray(x) for x in leaves]


def model_card(predictor, model_path: str, platforms) -> dict:
    """The card of the exported model: what it expects, what it outputs, where it came from."""
    card = {
        "kind": "exported",  # run through exported/ only; "source" says what it was exported from
        "input": predictor.contract.to_json(),
        "outputs": [o.to_json() for o in predictor.outputs],
        "num_features": predictor.num_features,
        "source": {k: v for k, v in predictor.info.items() if k != "exported"} | {"model": model_path},
        "versions": {"metachex_jax": __version__, "jax": jax.__version__, "flax": flax.__version__,
                     "python": platform.python_version()},
        "exported": {"function": f"{EXPORTED_DIR}/{FUNCTION_FILE}",
                     "weights": f"{EXPORTED_DIR}/{WEIGHTS_FILE}", "platforms": list(platforms),
                     "signature": "(weights: list of arrays in weights.npz order (w0, w1, ...), images: uint8 "
                                  "(b, S, S)) -> (values float32 (b, K) in outputs order, features float32 (b, F))",
                     "serialization_version": jax.export.maximum_supported_calling_convention_version},
    }
    card.update(_provenance(model_path, predictor.info))
    if predictor.ood is not None:
        card["ood"] = predictor.ood.card_entry()
    else:
        card["ood_absent"] = predictor.ood_note
    return card


def _provenance(model_path: str, info: dict) -> dict:
    """Training data and headline metrics of the source, as far as it records them."""
    path = files.absolute(model_path)
    if is_model_dir(info.get("model", "")):
        card = read_card(info["model"])
        return {k: card[k] for k in ("training", "metrics", "threshold_rule") if k in card}
    if info.get("kind") != "pretraining run":
        return {}
    _, run = runs.load_run_model(path, info["step"])
    config = run["config"]
    data = config["data"]
    out = {"training": {"dataset": data.get("datasets", data.get("dataset")), "data_dir": data["data_dir"],
                        "resolution": config["data"]["resolution"], "image_size": config["data"]["image_size"],
                        "val_fraction": config["data"]["val_fraction"], "demo_data": bool(config.get("demo")),
                        "step": info["step"], "arch": info["arch"]}}
    metrics = step_metrics(path, info["step"])
    if metrics:
        out["metrics"] = metrics
    return out


def _headline(result: dict) -> dict:
    """The headline numbers of one evaluation file (`evaluate.evaluate_split`'s JSON)."""
    out = {"mean_auroc": result.get("mean_auroc")}
    for task in ("sex_male", "view_ap"):
        if task in result:
            out[f"{task}_auroc"] = result[task]["auroc"]
    if "age" in result:
        out["age_mae_years"] = result["age"]["mae_years"]
    return out


def step_metrics(run_dir: str, step: int) -> dict | None:
    """The evaluation of the exported step itself: its test results (the trainer tests the best checkpoint), else
    its validation results, else None. A mixture's step has `{split}_step{N}_datasets.json` (the mean over datasets)
    and one file per dataset (`{split}_{dataset}_step{N}.json`); one dataset's, `{split}_step{N}.json`."""
    eval_dir = files.join(run_dir, "eval")
    for split in ("test", "validation"):
        single, mixture = (files.join(eval_dir, f"{split}_step{step}{suffix}.json") for suffix in ("", "_datasets"))
        if files.is_file(single):
            return {"split": split, "step": step, "file": single, **_headline(json.loads(files.read_text(single)))}
        if files.is_file(mixture):
            combined = json.loads(files.read_text(mixture))
            return {"split": split, "step": step, "file": mixture, "mean_auroc": combined["mean_auroc"],
                    "datasets": {name: _headline(json.loads(files.read_text(files.join(eval_dir, entry["file"]))))
                                 for name, entry in combined["per_dataset"].items()}}
    return None


def export(model_path: str, out: str, *, step: str | int = "best", platforms=DEFAULT_PLATFORMS,
           overwrite: bool = False) -> str:
    """Export MODEL (a pretraining or transfer workdir, or a model directory) into `out`; returns `out`."""
    out = files.absolute(out)
    if files.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if files.exists(out) and not is_model_dir(out):
        raise FileExistsError(f"{out} exists and is not a model directory; refusing to replace it")
    predictor = Predictor.load(model_path, step=step)
    if predictor.exported:
        raise ValueError(f"{model_path} is already an exported model")
    function, weights = export_predictor(predictor, platforms)
    npz = io.BytesIO()
    np.savez(npz, **{f"w{i}": w for i, w in enumerate(weights)})
    contents = {f"{EXPORTED_DIR}/{FUNCTION_FILE}": bytes(function), f"{EXPORTED_DIR}/{WEIGHTS_FILE}": npz.getvalue()}
    if predictor.ood is not None:
        contents[ood.FILE] = predictor.ood.to_bytes()
    write_directory(out, contents, model_card(predictor, model_path, platforms))
    return out
