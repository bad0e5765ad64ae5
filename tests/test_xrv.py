"""torchxrayvision models: the converter, its bad-input errors, predict / Grad-CAM / export / model_init on a
converted model, and parity with torchxrayvision itself (skipped without torch and torchxrayvision).

The converted model here is a random-weight `densenet_tiny` in torchxrayvision's layout (1-channel stem, 18
classes, `op_threshs`), pickled as a whole module by `torch_files` (no torch needed), with BatchNorm statistics
calibrated on [-1024, 1024] inputs so that outputs are of order 1 rather than saturated.
"""

from __future__ import annotations

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from test_convert import mismatch_lines, with_random_batchnorm

import torch_files
from metachex_jax import convert_torchxrayvision, predict
from metachex_jax.configs import pretrain
from metachex_jax.imaging.resize import resize_gray
from metachex_jax.interop import convert, torchxrayvision
from metachex_jax.interop.torchxrayvision import LABELS, WEIGHTS
from metachex_jax.models import SPECS, DenseNet, runs
from metachex_jax.serving import export, gradcam
from metachex_jax.serving.predictor import Predictor

TINY = "densenet_tiny"
NAME = "densenet121-res224-nih"  # 14 trained labels, 4 untrained ('')
SIZE = 224


def thresholds(name: str) -> np.ndarray:
    return np.asarray([np.nan if t is None else t for t in WEIGHTS[name].op_thresholds], np.float32)


def calibrated_densenet(arch=TINY, seed=0) -> DenseNet:
    """A random 1-channel DenseNet with 18 outputs whose BatchNorm statistics are those of xrv-scaled images."""
    model = DenseNet(arch, num_classes=18, in_channels=1, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    images = xrv_input(np.stack([make_xray(SIZE, SIZE, 10 + i) for i in range(4)]))
    norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    for bn in norms:
        bn.momentum = 0.0  # running statistics := this batch's
    model.train()
    model(jnp.asarray(images))
    for bn in norms:
        bn.momentum = 0.9
    model.classifier.bias[...] = jnp.asarray(rng.normal(0, 1, 18), jnp.float32)
    model.eval()
    return model


def xrv_state_dict(model: DenseNet, name: str = NAME) -> dict:
    """torchxrayvision's `model.state_dict()` for these weights: torchvision keys, num_batches_tracked, op_threshs."""
    state_dict = convert.to_torchvision_state_dict(model)
    for key in list(state_dict):
        if key.endswith(".running_mean"):
            state_dict[key.replace("running_mean", "num_batches_tracked")] = np.array(3, np.int64)
    state_dict["op_threshs"] = thresholds(name)
    return state_dict


def xrv_input(images: np.ndarray) -> np.ndarray:
    """torchxrayvision's `datasets.normalize(img, 255)`, NHWC with one channel (written out independently)."""
    return ((2.0 * (images.astype(np.float32) / 255.0) - 1.0) * 1024.0)[..., None]


def op_norm_numpy(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    out = np.where(p < t, p / (t * 2), 1.0 - (1.0 - p) / ((1 - t) * 2))
    return np.where(np.isnan(t), 0.5, out)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("xrv")
    reference = calibrated_densenet()
    torch_files.write_module(root / "nih.pt", xrv_state_dict(reference), "zip")
    assert convert_torchxrayvision.main([str(root / "nih.pt"), str(root / "model"), f"--weights_name={NAME}",
                                         f"--arch={TINY}"]) == 0
    return root, reference


def test_card_and_outputs(converted):
    root, _ = converted
    card = json.loads((root / "model" / "model.json").read_text())
    assert card["kind"] == "torchxrayvision"
    assert card["input"] == {"image_size": 224, "resolution": 224, "normalization": "xrv", "geometry": "crop_resize",
                             "channels": 1, "description": card["input"]["description"]}
    assert card["source"]["weights_name"] == NAME and card["source"]["weights_url"].endswith(
        "nih-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt")
    import hashlib
    assert card["source"]["sha256"] == hashlib.sha256((root / "nih.pt").read_bytes()).hexdigest()
    assert card["source"]["table"].startswith("torchxrayvision 1.5.")
    assert card["source"]["op_threshs_in_file"] == "equal to the table"
    assert card["model_config"]["labels"] == list(LABELS[:14]) + [""] * 4
    assert card["model_config"]["op_thresholds"][14:] == [None] * 4
    names = [o["name"] for o in card["outputs"]]
    assert names == [n for label in LABELS[:14] for n in (label, f"{label}_opnorm")]  # '' labels dropped
    assert card["outputs"][1] == {"name": "Atelectasis_opnorm", "kind": "op_norm",
                                  "op_threshold": WEIGHTS[NAME].op_thresholds[0]}


def make_xray(height, width, seed) -> np.ndarray:
    """A smooth gray test image with some noise (uint8)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = (127 + 60 * np.sin(xx / 17.0 + seed) * np.cos(yy / 23.0) + rng.normal(0, 10, (height, width)))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_xray(path, height, width, seed):
    Image.fromarray(make_xray(height, width, seed), mode="L").save(path)
    return np.asarray(Image.open(path))


def centre_square(image: np.ndarray) -> np.ndarray:
    """torchxrayvision's XRayCenterCrop, written out: y // 2 - side // 2."""
    h, w = image.shape
    side = min(h, w)
    top, left = h // 2 - side // 2, w // 2 - side // 2
    return image[top:top + side, left:left + side]


def test_predict_reports_probabilities_and_op_normalised_outputs(converted, tmp_path):
    root, reference = converted
    shapes = {"wide.png": (224, 300), "tall.png": (260, 224), "square.png": (224, 224)}  # short side 224: no resize
    originals = {n: write_xray(tmp_path / n, h, w, i) for i, (n, (h, w)) in enumerate(shapes.items())}
    assert predict.main([f"--model={root / 'model'}", *[str(tmp_path / n) for n in shapes],
                         f"--out={tmp_path / 'p'}", "--features"]) == 0
    with open(tmp_path / "p" / "predictions.csv") as f:
        rows = {os.path.basename(r["path"]): r for r in csv.DictReader(f)}
    header = list(next(iter(rows.values())))
    assert "Lung Lesion" not in header and "Fracture_opnorm" not in header  # untrained labels are not outputs
    assert header[1:3] == ["Atelectasis", "Atelectasis_opnorm"]

    # The expected values, computed independently: centre square, xrv scaling, the reference DenseNet.
    crops = np.stack([centre_square(originals[n]) for n in shapes])
    logits = np.asarray(reference(jnp.asarray(xrv_input(crops))), np.float64)
    probabilities = 1 / (1 + np.exp(-logits))
    op_normed = op_norm_numpy(probabilities, thresholds(NAME).astype(np.float64))
    assert 0.05 < np.median(probabilities) < 0.95  # calibrated: not saturated
    for i, name in enumerate(shapes):
        for j, label in enumerate(LABELS[:14]):
            assert float(rows[name][label]) == pytest.approx(probabilities[i, j], abs=1e-5)
            assert float(rows[name][f"{label}_opnorm"]) == pytest.approx(op_normed[i, j], abs=1e-5)
    features = np.load(tmp_path / "p" / "features.npy")
    np.testing.assert_allclose(features, np.asarray(reference.features(jnp.asarray(xrv_input(crops)))),
                               rtol=1e-4, atol=1e-5)
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["input_contract"]["normalization"] == "xrv" and summary["model"]["kind"] == "torchxrayvision"
    # Its training images are not here: no OOD columns, and the summary says why and what to give instead.
    assert "ood_distance" not in header and "ood_flag" not in header
    assert not summary["ood"]["columns"] and "torchxrayvision" in summary["ood"]["why"]
    assert "--ood_reference=DIR" in summary["ood"]["why"]


def test_raw_file_geometry_is_the_centre_square(tmp_path):
    from metachex_jax.contract.pixels import PixelContract

    contract = PixelContract(32, 32, "xrv", "crop_resize")
    image = write_xray(tmp_path / "wide.png", 32, 45, 0)
    crop, info = contract.from_file(tmp_path / "wide.png")
    np.testing.assert_array_equal(crop, centre_square(image))
    assert (info.width, info.height) == (45, 32)
    # A stored (prepared) record is square already: the square crop keeps it, the resize takes it to S (the
    # builders' resize, imaging/resize.py, checked against a brute-force area average in test_resize.py).
    stored = resize_gray(image, 40)
    np.testing.assert_array_equal(contract.from_stored(stored), resize_gray(stored, 32))
    # Through a 40 x 40 resize first (R > S): the same two (area) resizes a prepared dataset's record gets.
    large = write_xray(tmp_path / "large.png", 64, 90, 1)
    two_step = PixelContract(32, 40, "xrv", "crop_resize").from_file(tmp_path / "large.png")[0]
    np.testing.assert_array_equal(two_step, resize_gray(resize_gray(centre_square(large), 40), 32))


def test_gradcam_on_the_converted_model(converted, tmp_path):
    root, reference = converted
    predictor = Predictor.load(str(root / "model"), batch_size=4)
    rng = np.random.default_rng(5)
    crops = rng.integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8)
    maps = predictor.gradcam(crops, ["Cardiomegaly", "Cardiomegaly_opnorm"])
    np.testing.assert_array_equal(maps["Cardiomegaly"], maps["Cardiomegaly_opnorm"])  # one logit drives both
    # Final layer + linear classifier: Grad-CAM is ReLU(A . w_k) / (h w), upsampled.
    activation = np.asarray(reference.feature_map(jnp.asarray(xrv_input(crops))))
    w = np.asarray(reference.classifier.kernel[...])[:, LABELS.index("Cardiomegaly")]
    h, wd = activation.shape[1:3]
    expected = np.asarray(jax.image.resize(np.maximum(activation @ w / (h * wd), 0), (3, SIZE, SIZE), "linear"))
    np.testing.assert_allclose(maps["Cardiomegaly"], expected, rtol=1e-4, atol=1e-7)
    # Back on a 224 x 300 original: the map covers the centre square (columns 38..262) and nothing else.
    heat, covered = gradcam.to_original(maps["Cardiomegaly"][0], predictor.contract, width=300, height=224)
    assert covered[:, :37].max() == 0 and covered[:, 263:].max() == 0 and covered[:, 40:260].min() == 1
    x, y = gradcam.peak_in_original(maps["Cardiomegaly"][0], predictor.contract, width=300, height=224)
    row, col = np.unravel_index(np.argmax(maps["Cardiomegaly"][0]), (SIZE, SIZE))
    assert (x, y) == (38 + col + 0.5, row + 0.5)
    write_xray(tmp_path / "a.png", 230, 250, 1)
    assert predict.main([f"--model={root / 'model'}", str(tmp_path / "a.png"), "--heatmaps=Mass",
                         f"--out={tmp_path / 'h'}"]) == 0
    with Image.open(tmp_path / "h" / "heatmaps" / "a.png" / "Mass.png") as overlay:
        assert overlay.size == (250, 230)


def test_export_of_the_converted_model(converted, tmp_path):
    root, _ = converted
    out = export.export(str(root / "model"), str(tmp_path / "exported"), platforms=("cpu",))
    card = json.loads((tmp_path / "exported" / "model.json").read_text())
    assert card["input"]["normalization"] == "xrv" and card["training"]["data"].startswith("NIH")
    assert "ood" not in card and "--ood_reference" in card["ood_absent"]  # nothing to carry, and why
    rng = np.random.default_rng(2)
    crops = rng.integers(0, 256, (5, SIZE, SIZE), dtype=np.uint8)
    flax_out, exported_out = Predictor.load(str(root / "model"))(crops), Predictor.load(out)(crops)
    assert Predictor.load(out).exported and list(exported_out) == list(flax_out)
    for name in flax_out:
        np.testing.assert_allclose(exported_out[name], flax_out[name], atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Bad input: every problem named, nothing written.

def run_cli(tmp_path, capsys, src, *extra, dest="out"):
    status = convert_torchxrayvision.main([str(src), str(tmp_path / dest), f"--weights_name={NAME}",
                                           f"--arch={TINY}", *extra])
    return status, capsys.readouterr().err


def test_bad_inputs_name_what_is_wrong_and_write_nothing(tmp_path, capsys):
    good = xrv_state_dict(calibrated_densenet())

    torchvision_rgb = {**good, "features.conv0.weight": np.zeros((16, 3, 7, 7), np.float32)}
    torch_files.write_module(tmp_path / "rgb.pt", torchvision_rgb)
    status, err = run_cli(tmp_path, capsys, tmp_path / "rgb.pt")
    assert status == 1 and "features.conv0.weight: " in err and "(16, 3, 7, 7), model expects (16, 1, 7, 7)" in err

    damaged = dict(good)
    del damaged["features.norm5.running_var"]
    damaged["features.extra.weight"] = np.zeros(3, np.float32)
    damaged["classifier.weight"] = np.zeros((14, 32), np.float32)
    np.savez(tmp_path / "damaged.npz", **damaged)
    status, err = run_cli(tmp_path, capsys, tmp_path / "damaged.npz")
    assert status == 1
    assert mismatch_lines(err, "missing keys") == {"features.norm5.running_var"}
    assert mismatch_lines(err, "unexpected keys") == {"features.extra.weight"}
    assert mismatch_lines(err, "shape mismatches") == {"classifier.weight"}

    resnet = {"conv1.weight": np.zeros((64, 1, 7, 7), np.float32), "bn1.weight": np.zeros(64, np.float32),
              "layer1.0.conv1.weight": np.zeros((64, 64, 1, 1), np.float32), "fc.weight": np.zeros((18, 2048))}
    torch_files.write_module(tmp_path / "resnet.pt", resnet, classes={"": ("torchxrayvision.models", "ResNet")})
    status, err = run_cli(tmp_path, capsys, tmp_path / "resnet.pt")
    assert status == 1 and "does not look like a torchvision DenseNet" in err
    assert mismatch_lines(err, "unexpected keys") == set(resnet)
    assert "features.conv0.weight" in mismatch_lines(err, "missing keys")

    torch_files.write_module(tmp_path / "full.pt", good)
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    status, err = run_cli(tmp_path, capsys, tmp_path / "cut.pt")
    assert status == 1 and "cut.pt" in err and "damaged zip archive" in err

    torch_files.write_state_dict(tmp_path / "ckpt.pt", {}, extra={"epoch": torch_files.Raw(b"K\x05")})
    status, err = run_cli(tmp_path, capsys, tmp_path / "ckpt.pt")
    assert status == 1 and "offending entries: 'epoch' (int)" in err

    status, err = run_cli(tmp_path, capsys, tmp_path / "absent.pt")
    assert status == 1 and "not found" in err
    assert sorted(os.listdir(tmp_path)) == sorted(["rgb.pt", "damaged.npz", "resnet.pt", "full.pt", "cut.pt",
                                                   "ckpt.pt"])  # nothing half-written, no temporary leftovers

    assert run_cli(tmp_path, capsys, tmp_path / "full.pt")[0] == 0
    before = (tmp_path / "out" / "model.json").read_text()
    status, err = run_cli(tmp_path, capsys, tmp_path / "rgb.pt")
    assert status == 1 and "already exists" in err
    status, err = run_cli(tmp_path, capsys, tmp_path / "rgb.pt", "--overwrite")
    assert status == 1 and (tmp_path / "out" / "model.json").read_text() == before  # the good one stays
    (tmp_path / "other").mkdir()
    status, err = run_cli(tmp_path, capsys, tmp_path / "full.pt", "--overwrite", dest="other")
    assert status == 1 and "is not a model directory" in err
    with pytest.raises(SystemExit):
        convert_torchxrayvision.main([str(tmp_path / "full.pt"), str(tmp_path / "x"), "--weights_name=resnet50"])
    with pytest.raises(ValueError, match="unknown --weights_name"):
        torchxrayvision.convert_file(str(tmp_path / "full.pt"), "densenet121-res224-imagenet")


def test_legacy_layout_converts_to_the_same_model(converted, tmp_path, capsys):
    root, reference = converted
    torch_files.write_module(tmp_path / "legacy.pt", xrv_state_dict(reference), "legacy")
    assert run_cli(tmp_path, capsys, tmp_path / "legacy.pt")[0] == 0
    crops = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE), dtype=np.uint8)
    a, b = Predictor.load(str(root / "model"))(crops), Predictor.load(str(tmp_path / "out"))(crops)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


# --------------------------------------------------------------------------------------------------------------
# Parity with torchxrayvision (needs torch and torchxrayvision).

def test_table_is_torchxrayvisions():
    xrv = pytest.importorskip("torchxrayvision")
    from torchxrayvision.models import model_urls

    assert list(xrv.models.DenseNet.targets) == list(LABELS)
    published = sorted(k for k in model_urls if k.startswith("densenet121-"))
    assert published == sorted(WEIGHTS)
    for name, weights in WEIGHTS.items():
        entry = model_urls[name]
        assert weights.url == entry["weights_url"] and list(weights.labels) == entry["labels"], name
        np.testing.assert_array_equal(thresholds(name), np.asarray(entry["op_threshs"], np.float32), err_msg=name)
        assert weights.input_resolution == entry["input_resolution"]


def torchxrayvision_reference(torch, xrv, arch: str, name: str, seed: int = 0):
    """torchxrayvision's DenseNet with random weights, BatchNorm statistics calibrated on [-1024, 1024] inputs (as
    the torchvision parity test does: random affine BatchNorm parameters, cumulative running averages over a few
    train-mode forwards) and the table's operating thresholds."""
    spec = SPECS[arch]
    torch.manual_seed(seed)
    model = xrv.models.DenseNet(growth_rate=spec.growth_rate, block_config=spec.block_config,
                                num_init_features=spec.num_init_features, bn_size=spec.bn_size,
                                op_threshs=torch.from_numpy(thresholds(name)))
    return with_random_batchnorm(torch, model,
                                 lambda: model.features2(torch.empty(4, 1, 64, 64).uniform_(-1024, 1024)))


def check_parity(tmp_path, arch: str, name: str, zip_layout: bool, n: int = 3):
    torch = pytest.importorskip("torch")
    xrv = pytest.importorskip("torchxrayvision")
    reference = torchxrayvision_reference(torch, xrv, arch, name)
    torch.save(reference, tmp_path / "w.pt", _use_new_zipfile_serialization=zip_layout)  # the whole module
    torchxrayvision.convert_to_directory(str(tmp_path / "w.pt"), str(tmp_path / "m"), name, arch=arch)

    images = np.random.default_rng(1).integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8)
    x = torch.from_numpy(xrv.datasets.normalize(images.astype(np.float32), 255)[:, None])
    with torch.no_grad():
        features = reference.features2(x).numpy()
        logits = reference.classifier(reference.features2(x)).numpy()
        op_normed = reference(x).numpy()
    probabilities = 1 / (1 + np.exp(-logits.astype(np.float64)))

    predictor = Predictor.load(str(tmp_path / "m"))
    ours = predictor(images, features=True)
    our_logits = np.asarray(predictor._backend.module.logits(jnp.asarray(ours["features"])))
    relative = {"features": np.abs(ours["features"] - features).max() / np.abs(features).max(),
                "logits": np.abs(our_logits - logits).max() / np.abs(logits).max()}
    trained = [j for j, label in enumerate(WEIGHTS[name].labels) if label]
    absolute = {
        "probabilities": max(abs(ours[LABELS[j]] - probabilities[:, j]).max() for j in trained),
        "op_normed": max(abs(ours[f"{LABELS[j]}_opnorm"] - op_normed[:, j]).max() for j in trained
                         if WEIGHTS[name].op_thresholds[j] is not None)}
    print(f"\nparity {arch} {name} {'zip' if zip_layout else 'legacy'}: relative {relative}, absolute {absolute}, "
          f"max |logit| {np.abs(logits).max():.2f}")
    assert 0.02 < np.median(probabilities[:, trained]) < 0.98  # calibrated: the comparison is not of saturated 0/1
    assert max(relative.values()) < 1e-4 and max(absolute.values()) < 1e-4
    untrained = [j for j, label in enumerate(WEIGHTS[name].labels) if not label]
    assert np.all(op_normed[:, untrained] == 0.5)  # what torchxrayvision gives the labels predict drops


@pytest.mark.parametrize("zip_layout", [True, False], ids=["zip", "legacy"])
def test_parity_with_torchxrayvision_tiny(tmp_path, zip_layout):
    check_parity(tmp_path, TINY, "densenet121-res224-chex", zip_layout)


@pytest.mark.slow
def test_parity_with_torchxrayvision_densenet121(tmp_path):
    check_parity(tmp_path, "densenet121", "densenet121-res224-all", zip_layout=True, n=2)


# --------------------------------------------------------------------------------------------------------------
# model_init: pretraining MetaChexNet from a converted torchxrayvision backbone.

def test_model_init_keeps_the_one_channel_stem_and_takes_the_contract(converted, tmp_path):
    from metachex_jax.contract.pixels import PixelContract
    from metachex_jax.training import trainer

    root, reference = converted
    c = pretrain.get_config(f"demo,arch={TINY},res=32")
    c.demo_dir = str(tmp_path / "demo")
    c.demo_data.update(dict(seed=0, num_nih=96, num_shenzhen=12, num_montgomery=8, size=64))
    c.batch_size_per_device, c.eval_batch_size_per_device = 16, 32
    c.num_epochs, c.max_steps, c.eval_every_steps, c.log_every_steps, c.n_boot = 1, 2, 2, 1, 10
    c.optim.lr = 0.0  # no update: the weights the run saves are the ones it started from
    c.model_init = str(root / "model")
    assert (c.model.normalization, c.model.geometry) == ("imagenet", "resize_crop")  # the config's defaults
    result = trainer.train_and_evaluate(c, str(tmp_path / "run"))
    assert np.isfinite(result["loss"])

    model, run = runs.load_run_model(str(tmp_path / "run"))
    assert (run["config"]["model"]["normalization"], run["config"]["model"]["geometry"]) == ("xrv", "crop_resize")
    assert model.backbone.in_channels == 1
    np.testing.assert_array_equal(np.asarray(model.backbone.conv0.kernel[...]), np.asarray(reference.conv0.kernel[...]))
    from metachex_jax.models.densenet import unrolled  # the run's blocks are scanned on CPU (scan_layers=auto)

    np.testing.assert_array_equal(np.asarray(unrolled(model.backbone).blocks[3].layers[1].conv2.kernel[...]),
                                  np.asarray(unrolled(reference).blocks[3].layers[1].conv2.kernel[...]))
    predictor = Predictor.load(str(tmp_path / "run"))
    assert predictor.contract == PixelContract(32, 36, "xrv", "crop_resize")
    # One definition of the pixels: predicting the raw (square) demo files gives the trainer's own test-split
    # predictions, made from the prepared records through the same contract.
    from metachex_jax.core.labels import PATHOLOGIES
    from metachex_jax.evaluation import reports

    (evaluated,) = (tmp_path / "run" / "eval").glob("test_step*_predictions.csv")
    cols = reports.read_predictions_csv(evaluated)
    (raw,) = list((tmp_path / "demo").glob("*/raw"))
    found = {p.name: p for p in (raw / "ChestX-ray14").rglob("*.png")}
    names = [str(n) for n in cols["image_name"][:12]]
    from_files = predictor.predict_files([found[n] for n in names])
    for j, label in enumerate(PATHOLOGIES):
        np.testing.assert_allclose(from_files.column(label), cols["pathology_prob"][:12, j], atol=1e-5)
