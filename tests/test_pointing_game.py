"""The Grad-CAM pointing game on each box source. TB: a TB model directory (what a transfer run deploys) on a TBX11K
tree whose boxes are PLANTED around, or away from, each image's Grad-CAM peak, computed here in closed form (at the
final layer a linear head makes Grad-CAM ReLU(A . w) / (h w), upsampled; tests/test_transfer_run.py checks the
serving code against the same form): the hits, the random-point baseline and the 512-space scaling are known.
VinDr: merged boxes in the image's pixels, Nodule/Mass scored by whichever of Mass and Nodule scores higher."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from data_fixtures import make_nih_tree
from dataset_trees import make_tbx11k_tree, make_vindr_tree
from metachex_jax import gradcam
from metachex_jax.configs import pretrain
from metachex_jax.contract.outputs import outputs_of
from metachex_jax.contract.pixels import PixelContract
from metachex_jax.evaluation import pointing_game
from metachex_jax.models import build_model, saved
from metachex_jax.models.densenet import DenseNet
from metachex_jax.models.tb_classifier import TbClassifier
from metachex_jax.serving.predictor import Predictor

SIZE = 64  # images and model input: densenet_tiny's final map is 2 x 2
JSON_SPACE = 512  # TBX11K's box space; the images here are smaller, so boxes are scaled


def tb_model(path, output_name: str = "tb") -> tuple[TbClassifier, PixelContract]:
    """A TB classifier saved as a transfer run saves its deployable model; head weights 1, so the map is the
    channel sum of the final activations (all >= 0)."""
    contract = PixelContract(image_size=SIZE, resolution=SIZE)
    model = TbClassifier(DenseNet("densenet_tiny", num_classes=None, rngs=nnx.Rngs(1)), nnx.Rngs(0),
                         output_name=output_name)
    model.tb_head.kernel[...] = jnp.ones_like(model.tb_head.kernel[...])
    model.eval()
    saved.save(str(path), model, {"kind": "tb_classifier", "input": contract.to_json(),
                                  "model_config": {"arch": "densenet_tiny", "normalization": "imagenet",
                                                   "output_name": output_name},
                                  "outputs": [{"name": output_name, "kind": "probability"}]})
    return model, contract


def closed_form_peak(model: TbClassifier, contract: PixelContract, image_path) -> tuple[float, float]:
    """(x, y) of the Grad-CAM peak in the file's pixels, without the serving code."""
    crop, _ = contract.from_file(str(image_path))
    activation = np.asarray(model.backbone.feature_map(contract.model_input(jnp.asarray(crop[None]))))
    w = np.asarray(model.tb_head.kernel[...])[:, 0]
    cam = np.maximum(activation @ w / (activation.shape[1] * activation.shape[2]), 0)
    cam = np.asarray(jax.image.resize(cam, (1, SIZE, SIZE), "linear"))[0]
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return col + 0.5, row + 0.5  # resolution == image_size == file size: the crop is the whole image


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A TBX11K tree whose val TB images are noise (so peaks differ) with boxes planted by the closed-form peak:
    tb0201's box around it (hit), tb0206's away from it (miss), tb1143 an active box around it and a latent one
    away (a Tuberculosis hit, an Active TB hit)."""
    tmp = tmp_path_factory.mktemp("tb_game")
    tree = make_tbx11k_tree(tmp / "raw", size=SIZE)
    tree.json_size = JSON_SPACE
    model, contract = tb_model(tmp / "tb_model")
    rng = np.random.default_rng(0)
    scale = JSON_SPACE / SIZE
    planned = {}
    for name in tree.val:
        if not name.startswith("tb/"):
            continue
        noise = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
        Image.fromarray(noise, mode="L").convert("RGB").save(tree.root / "imgs" / name)
        x, y = closed_form_peak(model, contract, tree.root / "imgs" / name)
        around = [x * scale - 24, y * scale - 24, 48.0, 48.0]  # 48 px of 512: 6 px of the image
        away = [((x + SIZE / 2) % SIZE) * scale - 24, ((y + SIZE / 2) % SIZE) * scale - 24, 48.0, 48.0]
        planned[name] = {"tb/tb0201.png": [(1, around)], "tb/tb0206.png": [(2, away)],
                         "tb/tb1143.png": [(1, around), (2, away)]}[name]
        tree.boxes[name] = planned[name]
    tree.write_annotations()
    return tree, tmp / "tb_model", planned


def test_tb_pointing_game_on_planted_boxes(planted, tmp_path, capsys):
    tree, model_dir, planned = planted
    out = tmp_path / "report.json"
    assert gradcam.main([f"--model={model_dir}", "--boxes=tbx11k", f"--manual_dir={tree.root.parent}",
                         f"--out={out}"]) == 0
    report = json.loads(out.read_text())
    assert report["outputs"] == {"Tuberculosis": ["tb"]}  # the TB model's `tb` output scores TB boxes
    assert report["not_scored"] == ["Active TB", "Latent TB"]
    cases = {c["image"]: c["hit"] for c in report["cases"]}
    assert cases == {"tb/tb0201.png": True, "tb/tb0206.png": False, "tb/tb1143.png": True}
    tb = report["per_finding"]["Tuberculosis"]
    assert (tb["hits"], tb["cases"]) == (2, 3)
    # The random point's expected hit rate: the share of the 512 x 512 image the boxes cover (apart: they add).
    shares = [sum(48 * 48 for _ in boxes) / JSON_SPACE ** 2 for boxes in planned.values()]
    assert tb["random_point_baseline"] == pytest.approx(np.mean(shares))
    assert "Tuberculosis" in capsys.readouterr().out


def test_active_tb_output_and_the_images_left_out(planted, tmp_path):
    tree, _, _ = planted
    tb_model(tmp_path / "active", output_name="Active TB")
    every = pointing_game.tbx11k_boxes(str(tree.root), split="all")
    assert every.left_out == {"TB images without boxes (e.g. tb1199)": 1}
    assert "tb/tb1199.png" not in every.files and "health/h0001.png" not in every.files
    source = pointing_game.tbx11k_boxes(str(tree.root))
    assert set(source.files) == {"tb/tb0201.png", "tb/tb0206.png", "tb/tb1143.png"}
    report = pointing_game.pointing_game_run(str(tmp_path / "active"), source, n_boot=10)
    assert report["outputs"] == {"Active TB": ["Active TB"]}
    assert {c["image"]: c["hit"] for c in report["cases"]} == {"tb/tb0201.png": True, "tb/tb1143.png": True}


def test_vindr_boxes_and_the_larger_of_mass_and_nodule(tmp_path):
    tree = make_vindr_tree(tmp_path / "vindr")
    source = pointing_game.vindr_boxes(str(tree.root))
    assert set(source.files) == {b["image_id"] for b in tree.boxes if b["split"] == "test" and b["x_min"] != ""}
    config = pretrain.get_config("demo,arch=densenet_tiny,res=32").model
    model = build_model(config, nnx.Rngs(0))
    model.eval()
    contract = PixelContract(image_size=32, resolution=36)
    saved.save(str(tmp_path / "m"), model, {"kind": "metachexnet", "model_config": config.to_dict(),
                                            "input": contract.to_json(),
                                            "outputs": [o.to_json() for o in outputs_of(model)]})
    report = pointing_game.pointing_game_run(str(tmp_path / "m"), source, n_boot=10)
    assert report["outputs"]["Nodule/Mass"] == ["Nodule", "Mass"] and "Cardiomegaly" in report["outputs"]
    predictor = Predictor.load(str(tmp_path / "m"))
    for case in report["cases"]:
        if case["finding"] == "Nodule/Mass":
            crop, _ = predictor.contract.from_file(source.files[case["image"]])
            scores = predictor(crop[None])
            assert case["output"] == max(("Nodule", "Mass"), key=lambda o: float(np.asarray(scores[o])[0]))
    assert any(c["finding"] == "Nodule/Mass" for c in report["cases"])
    for case in report["cases"]:  # boxes in the DICOM's own pixels
        boxes = source.boxes[case["image"]][case["finding"]]
        x, y = case["peak"]
        assert case["hit"] == any(bx <= x <= bx + bw and by <= y <= by + bh for bx, by, bw, bh in boxes)
    nih = make_nih_tree(tmp_path / "nih", n_patients=8)
    test_image = nih.test[0]
    (nih.root / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                                                 f"{test_image},Infiltrate,1,2,10,12\n{nih.train_val[0]},Mass,1,1,5,5\n")
    boxes = pointing_game.nih_boxes(str(nih.root))
    assert boxes.boxes == {test_image: {"Infiltration": [(1.0, 2.0, 10.0, 12.0)]}}
    with pytest.raises(SystemExit) as usage:  # no --manual_dir
        gradcam.main([f"--model={tmp_path / 'm'}", "--boxes=vindr"])
    assert usage.value.code == 2
