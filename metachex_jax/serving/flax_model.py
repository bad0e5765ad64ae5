"""The model code behind a `Predictor` (flax): a model directory's Flax model, a pretraining run's checkpoint or a
convert_torchvision backbone, run as one jitted pure function (`make_forward`, which export serialises), and its
Grad-CAM maps (`make_gradcam`). `Predictor.load` imports this module only for such models: an exported model runs
without the model code.

Grad-CAM (Selvaraju et al., 2017), for output k and the activation A (N, h, w, C) of `layer` (default "final":
ReLU(norm5), the tensor that is pooled; `DenseNet.layer_names()` lists the others, e.g. "block3" when the last
block is too coarse, as in the 64 px demo model whose final map is 2x2):

    weights[n, c] = mean over (h, w) of d score_k[n] / d A[n, :, :, c]
    map[n]        = ReLU(sum_c weights[n, c] * A[n, :, :, c]), upsampled bilinearly to the model input (S x S)

`score` is the logit of a probability output (probabilities saturate) or the value of a regression (age in
years). The gradient is taken through a zero perturbation added at the layer (`DenseNet.feature_map(tap=,
delta=)`), every output at once (`jax.jacrev`); the backend compiles one function per (outputs, layer). Maps are
not normalised: a map's scale says how strongly that layer drives the output; overlays (gradcam.py) normalise each
map by its maximum.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from metachex_jax.contract.card import is_model_dir
from metachex_jax.contract.outputs import OUTPUT_KINDS, Output, outputs_of
from metachex_jax.contract.pixels import PixelContract
from metachex_jax.core import files
from metachex_jax.core.errors import ModelError
from metachex_jax.interop import convert
from metachex_jax.models import MetaChexNet, runs, saved
from metachex_jax.models.densenet import DenseNetSpec
from metachex_jax.models.xrv import op_norm


def load(model: str, path: str, *, step: str | int, image_size: int | None, resolution: int | None):
    """(backend, outputs, pixel contract, info) of MODEL at `path` (absolute): a model directory with a Flax model,
    a pretraining workdir (its `step` checkpoint) or a convert_torchvision backbone (at `image_size`/`resolution`,
    default 224 / 256)."""
    if is_model_dir(path):
        module, card = saved.load(path)
        contract = PixelContract.from_json(card["input"])
        outputs = [Output.from_json(o) for o in card["outputs"]]
        info = {"model": path, "kind": card["kind"], "source": card.get("source")}
    elif files.is_dir(files.join(path, "checkpoints")):
        module, run = runs.load_run_model(path, step)
        contract = PixelContract.from_config(run["config"])
        outputs = outputs_of(module)
        info = {"model": path, "kind": "pretraining run", "step": run["step"], "arch": run["arch"]}
    elif files.is_file(files.join(path, "metadata.json")):
        module, info = _load_backbone(path)
        contract = PixelContract(image_size or 224, resolution or 256)
        outputs = []
    else:
        raise ModelError(f"--model={model}: {path} is neither a model directory (model.json), a transfer "
                         "workdir (model/model.json), a pretraining workdir (checkpoints/) nor a "
                         "convert_torchvision backbone (metadata.json)")
    return FlaxModel(module, outputs, contract), outputs, contract, info


class FlaxModel:
    """The NNX model behind a Predictor: jitted forward (values, features) and Grad-CAM."""

    exported = False

    def __init__(self, model, outputs: list[Output], contract: PixelContract):
        if model.backbone.in_channels != contract.channels:
            raise ModelError(f"the model's first convolution takes {model.backbone.in_channels} channel(s), but its "
                             f"pixel contract makes {contract.channels} ({contract.describe()})")
        names = list(model.output_kinds())
        if names != [o.name for o in outputs]:
            raise ModelError(f"the model names its outputs {names}, but its card says {[o.name for o in outputs]}: "
                             "one name for each output everywhere (card, model, CSV, heatmaps)")
        self.module = model
        self.graphdef, self.state = nnx.split(model)
        self.num_features = model.num_features
        self.layer_names = model.backbone.layer_names()
        self.contract = contract
        self._forward = jax.jit(make_forward(self.graphdef, outputs, contract))
        self._gradcam = {}  # (outputs, layer) -> jitted Grad-CAM

    def replicate(self, sharding) -> None:
        self.state = jax.device_put(self.state, sharding)

    def forward(self, images):
        return self._forward(self.state, images)

    def gradcam(self, images, names: tuple[str, ...], layer: str) -> dict:
        key = (names, layer)
        if key not in self._gradcam:
            self._gradcam[key] = jax.jit(make_gradcam(self.graphdef, names, layer, self.contract))
        return self._gradcam[key](self.state, images)


def make_forward(graphdef, outputs: Sequence[Output], contract: PixelContract):
    """(state, uint8 images (N, S, S)) -> (values (N, K) float32, features (N, F) float32): the whole model.

    Values are in `outputs` order (the model's `output_kinds()` order), from each output's score (a logit or
    years; `output_scores`): sigmoid for "probability", torchxrayvision's op_norm of the sigmoid for "op_norm"
    (with the output's `op_threshold`), the value itself for "years". Pure: `export` serialises exactly this
    function.
    """
    outputs = tuple(outputs)
    unknown = [f"{o.name} ({o.kind})" for o in outputs if o.kind not in OUTPUT_KINDS]
    if unknown:
        raise ModelError(f"outputs of unknown kinds: {unknown}; known: {OUTPUT_KINDS}")

    def value(score, output: Output):
        if output.kind == "probability":
            return jax.nn.sigmoid(score)
        if output.kind == "op_norm":
            return op_norm(jax.nn.sigmoid(score), output.op_threshold)
        return score

    def forward(state, images):
        model = nnx.merge(graphdef, state)
        features = model.features(contract.model_input(images))
        scores = model.output_scores(features)
        if list(scores) != [o.name for o in outputs]:
            raise ValueError(f"the model's outputs {list(scores)} are not the predictor's {[o.name for o in outputs]}")
        values = [value(scores[o.name], o) for o in outputs]
        stacked = jnp.stack(values, axis=1) if values else jnp.zeros((images.shape[0], 0), jnp.float32)
        return stacked.astype(jnp.float32), features.astype(jnp.float32)

    return forward


def make_gradcam(graphdef, names: Sequence[str], layer: str, contract: PixelContract):
    """A pure function (state, uint8 images (N, S, S)) -> {name: (N, S, S) float32 map}."""
    names = tuple(names)

    def maps(state, images):
        model = nnx.merge(graphdef, state)
        x = contract.model_input(images)
        shape = jax.eval_shape(lambda: model.backbone.feature_map(x, tap=layer)[1])

        def scores(delta):
            final, activation = model.backbone.feature_map(x, tap=layer, delta=delta)
            out = model.output_scores(jnp.mean(final, axis=(1, 2)).astype(jnp.float32))
            # Examples are independent in eval mode, so the gradient of the batch sum is per-example.
            return jnp.stack([out[name].sum() for name in names]), activation

        grads, activation = jax.jacrev(scores, has_aux=True)(jnp.zeros(shape.shape, shape.dtype))
        weights = jnp.mean(grads.astype(jnp.float32), axis=(2, 3))  # (K, N, C)
        cams = jax.nn.relu(jnp.einsum("nhwc,knc->knhw", activation.astype(jnp.float32), weights))
        k, n = cams.shape[:2]
        size = images.shape[1]
        cams = jnp.maximum(jax.image.resize(cams, (k, n, size, size), "linear"), 0.0)
        return {name: cams[i] for i, name in enumerate(names)}

    return maps


def _load_backbone(path: str):
    """A convert_torchvision backbone as a head-less MetaChexNet (features only)."""
    metadata = json.loads(files.read_text(files.join(path, "metadata.json")))
    spec = metadata.get("spec")
    if not spec:
        raise ModelError(f"{path}/metadata.json has no DenseNet spec: not a convert_torchvision output")
    model = MetaChexNet(DenseNetSpec(**{**spec, "block_config": tuple(spec["block_config"])}), num_pathologies=0,
                        metadata_tasks=(), age_hidden=0, in_channels=int(metadata.get("in_channels", 3)),
                        rngs=nnx.Rngs(0))
    convert.load_backbone(path, model)
    model.eval()
    return model, {"model": path, "kind": "backbone", "source": metadata.get("source"), "arch": metadata.get("arch")}
