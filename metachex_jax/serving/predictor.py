"""Apply a model to images: `Predictor`, the Python API behind `python -m metachex_jax.predict`.

    predictor = Predictor.load("/tmp/metachex_demo")       # any MODEL `predict` takes (see `Predictor.load`)
    out = predictor(uint8_images)                           # {output name: (N,) array}, images (N, S, S) uint8
    result = predictor.predict_files(["a.png", "b.dcm"])    # raw files: read, resize, crop, predict
    maps = predictor.gradcam(uint8_images, ["Cardiomegaly"])  # {name: (N, S, S)} Grad-CAM maps

MODEL is one of:
- a model directory (`model.json`; `metachex_jax.saved_model`): a transfer run's deployable TB model
  (`TB_WORKDIR/model/`, or the TB workdir itself), or an exported model (`metachex_jax.export`; run through
  jax.export without importing the model code);
- a pretraining workdir (its best checkpoint; `step=` picks another): MetaChexNet or the CheXNet baseline;
- a `convert_torchvision` backbone directory: features only (`features=True`), at `image_size`/`resolution`;
- a `convert_torchxrayvision` model directory (a model directory of kind "torchxrayvision").

Named outputs, in the model's order: probabilities (sigmoid of a logit: each pathology by name, `view_ap` = P(AP
view), `sex_male` = P(male), `tb` = P(TB)), `age` in years, and for a converted torchxrayvision model each trained
label's probability `L` and op-normalised value `L_opnorm` (models/xrv.py). An output with a decision threshold (the TB
model's) also gets `<name>_decision` (1 when the probability >= the threshold) in `predict_files` results.

Preprocessing is the model's `PixelContract` (preprocessing.py): the same functions the dataset builders and the
evaluation path of training use, so predicting a raw file equals evaluating the prepared record of that file.
Batches are sharded over every local device (a 1-D "data" mesh); the last batch is padded, never recompiled.
Test-time augmentation `tta="flip"` averages each output (probabilities, years, features) over the image and
its horizontal mirror.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metachex_jax import files, saved_model
from metachex_jax.data import images as image_reader
from metachex_jax.preprocessing import PixelContract

TTA_MODES = ("flip",)


class ModelError(ValueError):
    """MODEL cannot be used as asked (not a model, no such output, ...); raised before any work starts."""


@dataclasses.dataclass(frozen=True)
class Output:
    name: str
    kind: str  # "probability" (sigmoid of a logit), "op_norm" (torchxrayvision's op-normalised one) or "years"
    threshold: float | None = None  # decision threshold on the probability (e.g. TB screening)
    op_threshold: float | None = None  # "op_norm" outputs: the probability that maps to 0.5 (models/xrv.py)

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass
class FilePredictions:
    """`Predictor.predict_files` results, one entry per input path, in input order."""

    paths: list[str]
    outputs: list[Output]
    values: np.ndarray  # (N, K) float64, NaN where the file failed
    features: np.ndarray | None  # (N, F) float32, NaN rows where the file failed (when asked for)
    infos: list  # image_reader.ImageInfo or None
    errors: list  # str or None
    seconds: float

    @property
    def failed(self) -> list[int]:
        return [i for i, e in enumerate(self.errors) if e is not None]

    def column(self, name: str) -> np.ndarray:
        return self.values[:, [o.name for o in self.outputs].index(name)]

    def rows(self) -> list[dict]:
        """One dict per image: path, every output (+ decisions), the reader's decisions, error."""
        rows = []
        for i, path in enumerate(self.paths):
            row = {"path": path}
            for j, output in enumerate(self.outputs):
                value = self.values[i, j]
                row[output.name] = "" if np.isnan(value) else f"{value:.8g}"
                if output.threshold is not None:
                    row[f"{output.name}_decision"] = "" if np.isnan(value) else int(value >= output.threshold)
            info = self.infos[i]
            row["format"] = info.format if info else ""
            row["width"] = info.width if info else ""
            row["height"] = info.height if info else ""
            row["bit_depth"] = info.bit_depth if info else ""
            row["bit_depth_source"] = info.bit_depth_source if info else ""
            row["orientation"] = info.orientation if info else ""
            row["error"] = self.errors[i] or ""
            rows.append(row)
        return rows


class _FlaxModel:
    """The NNX model behind a Predictor: jitted forward (values, features) and Grad-CAM."""

    exported = False

    def __init__(self, model, outputs: list[Output], contract: PixelContract):
        from flax import nnx

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
        from metachex_jax import gradcam

        key = (names, layer)
        if key not in self._gradcam:
            self._gradcam[key] = jax.jit(gradcam.make_gradcam(self.graphdef, names, layer, self.contract))
        return self._gradcam[key](self.state, images)


class _ExportedModel:
    """An exported model (`metachex_jax.export`): a jax.export function and its weights; no model code."""

    exported = True

    def __init__(self, path: str, card: dict):
        from metachex_jax import export

        self.function, self.weights = export.read_exported(path)
        self.num_features = int(card["num_features"])
        self.layer_names = ()
        self._forward = jax.jit(self.function.call)

    def replicate(self, sharding) -> None:
        self.weights = jax.device_put(self.weights, sharding)

    def forward(self, images):
        return self._forward(self.weights, images)


def file_error(path: str, stage: str, exc: BaseException) -> str:
    """The error of a file that failed at `stage` after it was read ("pixel contract", "prediction", "heatmap")."""
    return f"{path}: {stage} failed ({type(exc).__name__}: {exc})"


def one_by_one(items: Sequence, run, fail) -> None:
    """run(item) for each item; fail(item, exception) for those that raise (their batch failed together)."""
    for item in items:
        try:
            run(item)
        except Exception as exc:  # noqa: BLE001 - one file's failure is that file's error
            fail(item, exc)


def make_forward(graphdef, outputs: Sequence[Output], contract: PixelContract):
    """(state, uint8 images (N, S, S)) -> (values (N, K) float32, features (N, F) float32): the whole model.

    Values are in `outputs` order (the model's `output_kinds()` order), from each output's score (a logit or
    years; `output_scores`): sigmoid for "probability", torchxrayvision's op_norm of the sigmoid for "op_norm"
    (with the output's `op_threshold`), the value itself for "years". Pure: `export` serialises exactly this
    function.
    """
    from flax import nnx

    from metachex_jax.models.xrv import op_norm

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


OUTPUT_KINDS = ("probability", "op_norm", "years")


def outputs_of(model, thresholds: dict | None = None) -> list[Output]:
    """The named outputs of a Flax model (`output_kinds()`), with decision thresholds and op-norm thresholds."""
    thresholds = thresholds or {}
    op_thresholds = model.output_op_thresholds() if hasattr(model, "output_op_thresholds") else {}
    return [Output(name, kind, thresholds.get(name), op_thresholds.get(name))
            for name, kind in model.output_kinds().items()]


class Predictor:
    """A model ready to apply to images; build it with `Predictor.load(MODEL)`."""

    def __init__(self, backend, outputs: list[Output], contract: PixelContract, info: dict,
                 batch_size: int = 32):
        self._backend = backend
        self.outputs = list(outputs)
        self.contract = contract
        self.info = info  # what was loaded (json-ready), for summaries
        devices = jax.local_devices()
        self.mesh = Mesh(np.asarray(devices), ("data",))
        self._sharding = NamedSharding(self.mesh, P("data"))
        backend.replicate(NamedSharding(self.mesh, P()))  # weights on every local device
        self.batch_size = -(-batch_size // len(devices)) * len(devices)  # a multiple of the local devices

    # ----- loading -----------------------------------------------------------------------------------------
    @classmethod
    def load(cls, model: str, *, step: str | int = "best", batch_size: int = 32, image_size: int | None = None,
             resolution: int | None = None) -> Predictor:
        """Load MODEL (see the module docstring). `image_size`/`resolution` are needed only for a bare backbone
        (default 224 / 256, the ImageNet recipe); for other models they must match the saved contract."""
        path = files.absolute(model)
        if not files.exists(path):
            raise ModelError(f"--model={model}: {path} does not exist")
        tb_model = files.join(path, "model")
        if not saved_model.is_model_dir(path) and saved_model.is_model_dir(tb_model):
            path = tb_model  # a transfer workdir: its deployable TB model
        if saved_model.is_model_dir(path):
            card = saved_model.read_card(path)
            contract = PixelContract.from_json(card["input"])
            outputs = [Output(o["name"], o["kind"], o.get("threshold"), o.get("op_threshold"))
                       for o in card["outputs"]]
            info = {"model": path, "kind": card["kind"], "source": card.get("source")}
            if files.is_dir(files.join(path, saved_model.EXPORTED_DIR)):
                backend = _ExportedModel(path, card)
                info["exported"] = True
            else:
                module, card = saved_model.load(path)
                backend = _FlaxModel(module, outputs, contract)
        elif files.is_dir(files.join(path, "checkpoints")):
            from metachex_jax import checkpointing

            module, run = checkpointing.load_run_model(path, step)
            contract = PixelContract.from_config(run["config"])
            outputs = outputs_of(module)
            backend = _FlaxModel(module, outputs, contract)
            info = {"model": path, "kind": "pretraining run", "step": run["step"], "arch": run["arch"]}
        elif files.is_file(files.join(path, "metadata.json")):
            module, info = _load_backbone(path)
            contract = PixelContract(image_size or 224, resolution or 256)
            outputs = []
            backend = _FlaxModel(module, outputs, contract)
        else:
            raise ModelError(f"--model={model}: {path} is neither a model directory (model.json), a transfer "
                             "workdir (model/model.json), a pretraining workdir (checkpoints/) nor a "
                             "convert_torchvision backbone (metadata.json)")
        for name, value, saved in (("image_size", image_size, contract.image_size),
                                   ("resolution", resolution, contract.resolution)):
            if value is not None and value != saved:
                raise ModelError(f"--{name}={value}, but the model was trained with {name} {saved}: its pixel "
                                 f"contract is fixed ({contract.describe()})")
        return cls(backend, outputs, contract, info, batch_size)

    # ----- what the model offers ---------------------------------------------------------------------------
    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    @property
    def num_features(self) -> int:
        return self._backend.num_features

    @property
    def exported(self) -> bool:
        return self._backend.exported

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Layers Grad-CAM can use (empty for an exported model)."""
        return self._backend.layer_names

    def check_outputs(self, names: Sequence[str]) -> list[str]:
        """`names` ("all" = every output) checked against the model's outputs; ModelError names the unknown."""
        if list(names) == ["all"]:
            return self.output_names
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise ModelError(f"the model has no output(s) {unknown}; it has: {', '.join(self.output_names) or 'none'}")
        return list(names)

    # ----- prediction --------------------------------------------------------------------------------------
    def _run(self, images: np.ndarray):
        """One padded batch -> device futures (values, features) for its real rows (asynchronous)."""
        n = len(images)
        batch = np.zeros((self.batch_size, *images.shape[1:]), np.uint8)
        batch[:n] = images
        values, features = self._backend.forward(jax.device_put(batch, self._sharding))
        return values, features, n

    def _run_tta(self, images: np.ndarray, tta: str | None):
        runs = [self._run(images)]
        if tta == "flip":
            runs.append(self._run(images[:, :, ::-1]))
        elif tta is not None:
            raise ValueError(f"unknown tta {tta!r}; expected one of {TTA_MODES} or None")
        return runs

    @staticmethod
    def _collect(runs) -> tuple[np.ndarray, np.ndarray]:
        n = runs[0][2]
        values = np.mean([np.asarray(v, np.float64)[:n] for v, _, _ in runs], axis=0)
        features = np.mean([np.asarray(f)[:n] for _, f, _ in runs], axis=0).astype(np.float32)
        return values, features

    def __call__(self, images, *, tta: str | None = None, features: bool = False) -> dict[str, np.ndarray]:
        """uint8 images (N, S, S) or (N, S, S, 1), already at the model's size -> {output name: (N,)}.

        With `features=True` also "features": (N, F) pooled features.
        """
        images = np.asarray(images)
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        size = self.contract.image_size
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (size, size):
            raise ValueError(f"expected uint8 images (N, {size}, {size}) (the model's pixel contract: "
                             f"{self.contract.describe()}), got {images.dtype} {images.shape}; for raw files use "
                             "predict_files")
        values, feats = [], []
        for start in range(0, len(images), self.batch_size):
            v, f = self._collect(self._run_tta(images[start:start + self.batch_size], tta))
            values.append(v)
            feats.append(f)
        values = np.concatenate(values) if values else np.zeros((0, len(self.outputs)))
        out = {o.name: values[:, j] for j, o in enumerate(self.outputs)}
        if features:
            out["features"] = np.concatenate(feats) if feats else np.zeros((0, self.num_features), np.float32)
        return out

    def predict_files(self, paths: Sequence[str], *, tta: str | None = None, features: bool = False,
                      bit_depth: int | None = None, workers: int | None = None, progress: bool = False,
                      max_pixels: int | None = image_reader.DEFAULT_MAX_PIXELS) -> FilePredictions:
        """Read, preprocess and predict every file; a file that fails at any stage (read, pixel contract,
        prediction) gets its error, naming the file and the stage, and the rest run.

        Files are decoded in `workers` processes (default: every core when there are many files) ahead of the
        device, which computes batch k while the host assembles batch k + 1. A batch that fails is run again one
        file at a time, so only the files that fail alone get an error.
        """
        from tqdm import tqdm

        began = time.perf_counter()
        paths = [str(p) for p in paths]
        n = len(paths)
        values = np.full((n, len(self.outputs)), np.nan)
        feats = np.full((n, self.num_features), np.nan, np.float32) if features else None
        infos: list = [None] * n
        errors: list = [None] * n
        if workers is None:
            workers = image_reader.default_num_workers() if n >= 4 * self.batch_size else 1
        pending = None  # (rows, crops, runs): the batch on the device while the next one is assembled

        def store(rows, runs):
            v, f = self._collect(runs)
            values[rows] = v
            if feats is not None:
                feats[rows] = f

        def launch(rows, crops):
            try:
                return rows, crops, self._run_tta(np.stack(crops), tta)
            except Exception:  # noqa: BLE001 - finish() runs the batch's files one by one and names those that fail
                return rows, crops, None

        def finish(job):
            rows, crops, runs = job
            if runs is not None:
                try:
                    store(rows, runs)
                    return
                except Exception:  # noqa: BLE001 - the same: one file at a time
                    pass
            crop_of = dict(zip(rows, crops))
            one_by_one(rows, lambda i: store([i], self._run_tta(crop_of[i][None], tta)),
                       lambda i, exc: fail(i, "prediction", exc))

        def fail(i, stage, exc):
            errors[i] = file_error(paths[i], stage, exc)

        with image_reader.decoding_pool(workers) as pool, tqdm(total=n, unit="img", disable=not progress,
                                                                 desc="predict") as bar:
            decoded = image_reader.decode_many(paths, self.contract.resolution, pool=pool, bit_depth=bit_depth,
                                               with_info=True, progress=False, square=self.contract.crops_to_square,
                                               max_pixels=max_pixels)
            rows, crops = [], []
            for i, (stored, error, info) in enumerate(decoded):
                infos[i] = info
                errors[i] = error
                if error is None:
                    try:
                        crops.append(self.contract.from_stored(stored))
                        rows.append(i)
                    except Exception as exc:  # noqa: BLE001 - one file's failure is that file's error
                        fail(i, "pixel contract", exc)
                if errors[i] is not None:
                    bar.update(1)
                if len(rows) == self.batch_size or (i == n - 1 and rows):
                    job = launch(rows, crops)
                    if pending is not None:
                        finish(pending)
                        bar.update(len(pending[0]))
                    pending, rows, crops = job, [], []
            if pending is not None:
                finish(pending)
                bar.update(len(pending[0]))
        return FilePredictions(paths, self.outputs, values, feats, infos, errors, time.perf_counter() - began)

    # ----- Grad-CAM ----------------------------------------------------------------------------------------
    def gradcam(self, images, names: Sequence[str], *, layer: str = "final") -> dict[str, np.ndarray]:
        """Grad-CAM maps {name: (N, S, S) float32 >= 0} at the model's input resolution (see gradcam.py)."""
        if self.exported:
            raise ModelError("Grad-CAM needs the model's weights and code; an exported model has neither in a "
                             "form Grad-CAM can differentiate. Use the run or TB workdir it was exported from.")
        names = tuple(self.check_outputs(names))
        if layer not in self.layer_names:
            raise ModelError(f"unknown layer {layer!r}; choose one of {', '.join(self.layer_names)}")
        images = np.asarray(images)
        maps = {name: [] for name in names}
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            batch = np.zeros((self.batch_size, *chunk.shape[1:]), np.uint8)
            batch[:len(chunk)] = chunk
            out = self._backend.gradcam(jax.device_put(batch, self._sharding), names, layer)
            for name in names:
                maps[name].append(np.asarray(out[name])[:len(chunk)])
        return {name: np.concatenate(v) if v else np.zeros((0,) * 3, np.float32) for name, v in maps.items()}


def _load_backbone(path: str):
    """A convert_torchvision backbone as a head-less MetaChexNet (features only)."""
    from flax import nnx

    from metachex_jax import convert
    from metachex_jax.models import MetaChexNet
    from metachex_jax.models.densenet import DenseNetSpec

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
