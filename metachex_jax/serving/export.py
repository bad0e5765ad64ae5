"""Export a model as a self-contained directory that runs without this project's model code.

    python -m metachex_jax.export RUN_OR_TB_WORKDIR --out=DIR [--step=best] [--platforms=cpu,cuda,tpu]
    python -m metachex_jax.predict --model=DIR xray.png      # runs it (the model code is never imported)

DIR holds (see `metachex_jax.saved_model`):

    DIR/model.json                    the model card: input contract (`PixelContract`), output names, kinds and
                                      thresholds in order, training data, headline metrics with their 95% CIs
                                      of the exported step (`step_metrics`), the source run, versions, and what
                                      was exported
    DIR/exported/forward.jaxexport    the whole inference function, `(weights, uint8 images (b, S, S)) ->
                                      (values (b, K), features (b, F))`, serialised with `jax.export`:
                                      batch-size polymorphic (b is symbolic), lowered for CPU, CUDA and TPU, and
                                      without shardings, so the caller spreads batches over the devices it has
    DIR/exported/weights.npz          the weights as numpy arrays, in the function's argument order

Grad-CAM is not exported: `predict --heatmaps` on an exported model says so and names the workdir to use.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys

import jax
import numpy as np

from metachex_jax import files, saved_model

FUNCTION_FILE = "forward.jaxexport"
WEIGHTS_FILE = "weights.npz"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


def read_exported(path: str):
    """(jax.export.Exported, weights list) of an exported model directory."""
    directory = files.join(path, saved_model.EXPORTED_DIR)
    function = jax.export.deserialize(bytearray(files.read_bytes(files.join(directory, FUNCTION_FILE))))
    with np.load(io.BytesIO(files.read_bytes(files.join(directory, WEIGHTS_FILE)))) as npz:
        weights = [npz[f"w{i}"] for i in range(len(npz.files))]
    return function, weights


def export_predictor(predictor, platforms=DEFAULT_PLATFORMS):
    """(serialised function bytes, weight arrays) of a Flax-backed `inference.Predictor`."""
    from metachex_jax.inference import make_forward

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
    import flax

    import metachex_jax

    card = {
        "kind": "exported",  # run through exported/ only; "source" says what it was exported from
        "input": predictor.contract.to_json(),
        "outputs": [o.to_json() for o in predictor.outputs],
        "num_features": predictor.num_features,
        "source": {k: v for k, v in predictor.info.items() if k != "exported"} | {"model": model_path},
        "versions": {"metachex_jax": metachex_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
                     "python": platform.python_version()},
        "exported": {"function": f"{saved_model.EXPORTED_DIR}/{FUNCTION_FILE}",
                     "weights": f"{saved_model.EXPORTED_DIR}/{WEIGHTS_FILE}", "platforms": list(platforms),
                     "signature": "(weights: list of arrays in weights.npz order (w0, w1, ...), images: uint8 "
                                  "(b, S, S)) -> (values float32 (b, K) in outputs order, features float32 (b, F))",
                     "serialization_version": jax.export.maximum_supported_calling_convention_version},
    }
    card.update(_provenance(model_path, predictor.info))
    return card


def _provenance(model_path: str, info: dict) -> dict:
    """Training data and headline metrics of the source, as far as it records them."""
    path = files.absolute(model_path)
    if saved_model.is_model_dir(info.get("model", "")):
        card = saved_model.read_card(info["model"])
        return {k: card[k] for k in ("training", "metrics", "threshold_rule") if k in card}
    if info.get("kind") != "pretraining run":
        return {}
    from metachex_jax import checkpointing

    _, run = checkpointing.load_run_model(path, info["step"])
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
    from metachex_jax.inference import Predictor

    out = files.absolute(out)
    if files.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if files.exists(out) and not saved_model.is_model_dir(out):
        raise FileExistsError(f"{out} exists and is not a model directory; refusing to replace it")
    predictor = Predictor.load(model_path, step=step)
    if predictor.exported:
        raise ValueError(f"{model_path} is already an exported model")
    function, weights = export_predictor(predictor, platforms)
    npz = io.BytesIO()
    np.savez(npz, **{f"w{i}": w for i, w in enumerate(weights)})
    saved_model.write_directory(out, {f"{saved_model.EXPORTED_DIR}/{FUNCTION_FILE}": bytes(function),
                                      f"{saved_model.EXPORTED_DIR}/{WEIGHTS_FILE}": npz.getvalue()},
                                model_card(predictor, model_path, platforms))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a pretraining workdir, a transfer workdir (its TB model) or a model directory")
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--step", default="best", help="pretraining checkpoint: best, latest or a step number")
    parser.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                        help="comma-separated jax.export platforms (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    args = parser.parse_args(argv)
    step = args.step if args.step in ("best", "latest") else int(args.step)
    from metachex_jax.inference import ModelError

    try:
        out = export(args.model, args.out, step=step, platforms=[p.strip() for p in args.platforms.split(",")],
                     overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    card = saved_model.read_card(out)
    print(f"exported {args.model} -> {out}")
    print(f"  input:   {card['input']['description']}")
    print(f"  outputs: {', '.join(o['name'] for o in card['outputs']) or '(features only)'}")
    print(f"  run it:  python -m metachex_jax.predict --model={out} IMAGES...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
