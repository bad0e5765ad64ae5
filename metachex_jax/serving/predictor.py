"""Apply a model to images: `Predictor`, the Python API behind `python -m metachex_jax.predict`.

    predictor = Predictor.load("/tmp/metachex_demo")       # any MODEL `predict` takes (see `Predictor.load`)
    out = predictor(uint8_images)                           # {output name: (N,) array}, images (N, S, S) uint8
    result = predictor.predict_files(["a.png", "b.dcm"])    # raw files: read, resize, crop, predict
    maps = predictor.gradcam(uint8_images, ["Cardiomegaly"])  # {name: (N, S, S)} Grad-CAM maps

MODEL is one of:
- a model directory (`model.json`; contract/card.py): a transfer run's deployable TB model (`TB_WORKDIR/model/`,
  or the TB workdir itself), or an exported model (`python -m metachex_jax.export`; run through jax.export without
  importing the model code);
- a pretraining workdir (its best checkpoint; `step=` picks another): MetaChexNet or the CheXNet baseline;
- a `convert_torchvision` backbone directory: features only (`features=True`), at `image_size`/`resolution`;
- a `convert_torchxrayvision` model directory (a model directory of kind "torchxrayvision").

Named outputs (contract/outputs.py), in the model's order: probabilities (sigmoid of a logit: each pathology by
name, `view_ap` = P(AP view), `sex_male` = P(male), `tb` = P(TB)), `age` in years, and for a converted
torchxrayvision model each trained label's probability `L` and op-normalised value `L_opnorm` (models/xrv.py). An
output with a decision threshold (the TB model's) also gets `<name>_decision` (1 when the probability >= the
threshold) in `predict_files` results, and one with a calibrator (a deployed TB model's Platt scaling,
contract/calibration.py) `<name>_calibrated` when asked for (`calibrated=True`).

Out-of-distribution score (contract/ood.py): `predictor.ood` is the model's description of its training images in
feature space (a model directory's `ood.npz`, a pretraining run's WORKDIR/ood/step_<N>.npz) or None, and then
`predictor.ood_note` says why; `reference_from_files` makes one from reference images. With a description,
`predict_files` gives every file its Mahalanobis distance and flag (`ood_distance`, `ood_flag`).

Preprocessing is the model's `PixelContract` (contract/pixels.py): the same functions the dataset builders and the
evaluation path of training use, so predicting a raw file equals evaluating the prepared record of that file.
The model code (flax_model.py) is imported only for a model that is not exported: an exported model runs on
jax.export alone. Batches are sharded over every local device (a 1-D "data" mesh); the last batch is padded,
never recompiled. Test-time augmentation `tta="flip"` averages each output (probabilities, years, features) over
the image and its horizontal mirror.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image
from tqdm import tqdm

from metachex_jax.contract import ood as ood_lib
from metachex_jax.contract.card import EXPORTED_DIR, is_model_dir, read_card
from metachex_jax.contract.outputs import Output
from metachex_jax.contract.pixels import PixelContract
from metachex_jax.core import files
from metachex_jax.core.errors import ModelError
from metachex_jax.imaging import images as image_reader
from metachex_jax.serving.exported import read_exported

TTA_MODES = ("flip",)


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
    ood_distance: np.ndarray | None = None  # (N,) Mahalanobis distances (NaN where the file failed)
    ood_threshold: float | None = None
    calibrated: bool = False  # rows() adds `<name>_calibrated` for outputs with a calibrator
    thumbnails: list | None = None  # uint8 gray (t, t) per file (None where it failed), when asked for

    @property
    def failed(self) -> list[int]:
        return [i for i, e in enumerate(self.errors) if e is not None]

    def column(self, name: str) -> np.ndarray:
        return self.values[:, [o.name for o in self.outputs].index(name)]

    @property
    def ood_flags(self) -> np.ndarray | None:
        """(N,) 1 flagged, 0 not, -1 where the file failed; None without a description."""
        if self.ood_distance is None:
            return None
        return np.where(np.isnan(self.ood_distance), -1, (self.ood_distance > self.ood_threshold).astype(int))

    def rows(self) -> list[dict]:
        """One dict per image: path, every output (+ decisions, calibrated probabilities), the OOD distance and
        flag, the reader's decisions, error."""
        rows = []
        flags = self.ood_flags
        for i, path in enumerate(self.paths):
            row = {"path": path}
            for j, output in enumerate(self.outputs):
                value = self.values[i, j]
                row[output.name] = "" if np.isnan(value) else f"{value:.8g}"
                if output.threshold is not None:
                    row[f"{output.name}_decision"] = "" if np.isnan(value) else int(value >= output.threshold)
                if self.calibrated and output.calibration is not None:
                    row[f"{output.name}_calibrated"] = "" if np.isnan(value) else f"{output.calibration(value):.8g}"
            if flags is not None:
                distance = self.ood_distance[i]
                row["ood_distance"] = "" if np.isnan(distance) else f"{distance:.8g}"
                row["ood_flag"] = "" if flags[i] < 0 else int(flags[i])
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


class _ExportedModel:
    """An exported model (`metachex_jax.serving.export`): a jax.export function and its weights; no model code."""

    exported = True

    def __init__(self, path: str, card: dict):
        self.function, self.weights = read_exported(path)
        self.num_features = int(card["num_features"])
        self.layer_names = ()
        self._forward = jax.jit(self.function.call)

    def replicate(self, sharding) -> None:
        self.weights = jax.device_put(self.weights, sharding)

    def forward(self, images):
        return self._forward(self.weights, images)


def saved_reference(path: str, info: dict) -> tuple[ood_lib.FeatureReference | None, str]:
    """(the OOD description saved with the model at `path`, where it came from) or (None, why there is none)."""
    if is_model_dir(path):
        entry = read_card(path).get("ood")
        if not entry:
            what = {"torchxrayvision": "a converted torchxrayvision model, whose training images are not here"}.get(
                info.get("kind"), "a model saved without one")
            return None, f"{path}: the model card has no OOD description ({what}); give --ood_reference=DIR"
        where = files.join(path, entry["file"])
    elif info.get("kind") == "pretraining run":
        where = ood_lib.run_reference_path(files.join, path, info["step"])
        if not files.is_file(where):
            return None, (f"no OOD description for step {info['step']} of {path} ({where} is missing: a run "
                          "from before descriptions existed, or another step); make it with `python -m "
                          f"metachex_jax.ood {path} --step={info['step']}`, or give --ood_reference=DIR")
    else:
        return None, (f"{path}: a convert_torchvision backbone carries no description of its training images; give "
                      "--ood_reference=DIR")
    return ood_lib.FeatureReference.from_bytes(files.read_bytes(where), where), where


def thumbnail(image: np.ndarray, size: int) -> np.ndarray:
    """A uint8 gray image shrunk (area average) to at most size x size."""
    image = np.asarray(image)
    image = image[..., 0] if image.ndim == 3 else image
    if max(image.shape) <= size:
        return image.astype(np.uint8)
    return np.asarray(Image.fromarray(image.astype(np.uint8)).resize((size, size), Image.Resampling.BOX))


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


class Predictor:
    """A model ready to apply to images; build it with `Predictor.load(MODEL)`."""

    def __init__(self, backend, outputs: list[Output], contract: PixelContract, info: dict,
                 batch_size: int = 32, ood: ood_lib.FeatureReference | None = None, ood_note: str = ""):
        self._backend = backend
        self.outputs = list(outputs)
        self.contract = contract
        self.info = info  # what was loaded (json-ready), for summaries
        self.ood = ood  # the model's description of its training images in feature space, or None:
        self.ood_note = ood_note  # where it came from, or why there is none
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
        if not is_model_dir(path) and is_model_dir(tb_model):
            path = tb_model  # a transfer workdir: its deployable TB model
        if is_model_dir(path) and files.is_dir(files.join(path, EXPORTED_DIR)):
            card = read_card(path)
            contract = PixelContract.from_json(card["input"])
            outputs = [Output.from_json(o) for o in card["outputs"]]
            info = {"model": path, "kind": card["kind"], "source": card.get("source"), "exported": True}
            backend = _ExportedModel(path, card)
        else:
            # The model code (flax, orbax, the networks), imported here only: an exported model runs without it.
            from metachex_jax.serving import flax_model
            backend, outputs, contract, info = flax_model.load(model, path, step=step, image_size=image_size,
                                                               resolution=resolution)
        for name, value, saved in (("image_size", image_size, contract.image_size),
                                   ("resolution", resolution, contract.resolution)):
            if value is not None and value != saved:
                raise ModelError(f"--{name}={value}, but the model was trained with {name} {saved}: its pixel "
                                 f"contract is fixed ({contract.describe()})")
        ood, note = saved_reference(path, info)
        if ood is not None and ood.num_features != backend.num_features:
            raise ModelError(f"{note}: describes {ood.num_features} features, but the model has "
                             f"{backend.num_features}")
        return cls(backend, outputs, contract, info, batch_size, ood, note)

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
                      max_pixels: int | None = image_reader.DEFAULT_MAX_PIXELS, calibrated: bool = False,
                      thumbnails: int | None = None) -> FilePredictions:
        """Read, preprocess and predict every file; a file that fails at any stage (read, pixel contract,
        prediction) gets its error, naming the file and the stage, and the rest run.

        With an OOD description (`self.ood`) every file gets its distance and flag. `calibrated`: the rows add
        each calibrated output's calibrated probability. `thumbnails=T`: each file's stored image (the whole
        image at the contract's resolution R), shrunk to T x T when R > T, for review pages.

        Files are decoded in `workers` processes (default: every core when there are many files) ahead of the
        device, which computes batch k while the host assembles batch k + 1. A batch that fails is run again one
        file at a time, so only the files that fail alone get an error.
        """
        began = time.perf_counter()
        paths = [str(p) for p in paths]
        n = len(paths)
        values = np.full((n, len(self.outputs)), np.nan)
        keep_features = features or self.ood is not None
        feats = np.full((n, self.num_features), np.nan, np.float32) if keep_features else None
        small: list | None = [None] * n if thumbnails else None
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
                if error is None and small is not None:
                    small[i] = thumbnail(stored, thumbnails)
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
        distance = self.ood.distance(feats) if self.ood is not None else None
        return FilePredictions(paths, self.outputs, values, feats if features else None, infos, errors,
                               time.perf_counter() - began, distance,
                               self.ood.threshold if self.ood is not None else None, calibrated, small)

    def reference_from_files(self, paths: Sequence[str], *, quantile: float = ood_lib.DEFAULT_QUANTILE,
                             folds: int = 5, seed: int = 0, **read_options) -> ood_lib.FeatureReference:
        """An OOD description made from reference images (e.g. a converted model's, whose training images are
        not at hand): every image in the description, the threshold from out-of-fold distances over `folds`
        seeded random folds. Every file must be read (ValueError naming each that fails)."""
        if len(paths) < 2 * folds:
            raise ValueError(f"{len(paths)} reference images: at least {2 * folds} are needed for {folds} folds")
        result = self.predict_files(paths, features=True, **read_options)
        if result.failed:
            raise ValueError(f"{len(result.failed)} of {len(paths)} reference images failed:\n  "
                             + "\n  ".join(result.errors[i] for i in result.failed))
        return ood_lib.describe_out_of_fold(result.features, ood_lib.seeded_folds(len(paths), folds, seed),
                                            quantile=quantile,
                                            source={"reference_images": len(paths), "folds": folds, "seed": seed})

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


