"""`predict`, the Predictor API, Grad-CAM and export on a tiny pretraining run of the demo generator's tree.

The run (densenet_tiny, 32 px, 3 steps) is real; so are the raw files predict reads: the demo tree's PNGs, plus
files written here (DICOM, 12-bit PNG, broken files).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from data_fixtures import write_gray_png_with_trns
from dataset_trees import write_dicom
from metachex_jax import predict
from metachex_jax.core.errors import ModelError
from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.evaluation import pointing_game, reports
from metachex_jax.interop import convert
from metachex_jax.serving import export
from metachex_jax.serving.predictor import Predictor
from metachex_jax.training import trainer
from test_transfer_run import ARCH, RES, pretrain_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The transfer tests' tiny pretraining run (densenet_tiny, 32 px, 3 steps) on its own demo tree."""
    demo_dir, workdir = tmp_path_factory.mktemp("demo"), tmp_path_factory.mktemp("run")
    trainer.train_and_evaluate(pretrain_config(demo_dir), str(workdir))
    (raw,) = list(demo_dir.glob("*/raw"))
    return workdir, raw / "ChestX-ray14"


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def nih_test_files(nih_root):
    names = (nih_root / "test_list.txt").read_text().split()
    found = {p.name: p for p in nih_root.rglob("*.png")}
    return [found[n] for n in names]


def test_predict_from_raw_files_equals_evaluation_of_the_prepared_records(run_dir, tmp_path, capsys):
    workdir, nih_root = run_dir
    status = predict.main([f"--model={workdir}", str(nih_root), f"--out={tmp_path}/p", "--features"])
    assert status == 0
    rows = {os.path.basename(r["path"]): r for r in read_rows(tmp_path / "p" / "predictions.csv")}
    assert len(rows) == 96  # every image of the tree; the CSV and list files beside them are left out, counted
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["left_out_of_folders"]["not_named_like_images"]["count"] == 4  # 2 csv + 2 txt
    assert summary["failed"] == 0 and summary["bit_depths"] == [{"bits": 8, "source": "8-bit file", "images": 96}]
    (evaluated,) = (workdir / "eval").glob("test_step*_predictions.csv")
    cols = reports.read_predictions_csv(evaluated)
    assert len(cols["image_name"]) > 10
    for i, name in enumerate(cols["image_name"]):
        row = rows[str(name)]
        np.testing.assert_allclose([float(row[p]) for p in PATHOLOGIES], cols["pathology_prob"][i], atol=1e-5)
        np.testing.assert_allclose(float(row["sex_male"]), cols["sex_male_prob"][i], atol=1e-5)
        np.testing.assert_allclose(float(row["view_ap"]), cols["view_ap_prob"][i], atol=1e-5)
        np.testing.assert_allclose(float(row["age"]), cols["age_pred"][i], rtol=1e-5)
    features = np.load(tmp_path / "p" / "features.npy")
    assert features.shape == (96, 32) and np.isfinite(features).all()


def test_python_api_batches_tta_and_features(run_dir):
    workdir, nih_root = run_dir
    predictor = Predictor.load(str(workdir), batch_size=8)
    assert predictor.output_names == [*PATHOLOGIES, "view_ap", "sex_male", "age"]
    paths = nih_test_files(nih_root)[:11]  # not a multiple of the batch: the last batch is padded
    from_files = predictor.predict_files(paths, features=True)
    crops = np.stack([predictor.contract.from_file(p)[0] for p in paths])
    direct = predictor(crops, features=True)
    np.testing.assert_allclose(direct["Cardiomegaly"], from_files.column("Cardiomegaly"), atol=1e-6)
    np.testing.assert_allclose(direct["features"], from_files.features, atol=1e-5)
    one_by_one = np.concatenate([predictor(crops[i:i + 1])["age"] for i in range(len(crops))])
    np.testing.assert_allclose(one_by_one, direct["age"], rtol=1e-5)
    flipped = predictor(crops[:, :, ::-1].copy())
    with_tta = predictor(crops, tta="flip")
    for name in ("Mass", "age"):
        np.testing.assert_allclose(with_tta[name], (direct[name] + flipped[name]) / 2, rtol=1e-5)
    with pytest.raises(ValueError, match="expected uint8 images"):
        predictor(crops.astype(np.float32))


def test_bad_files_get_their_error_and_the_rest_still_run(run_dir, tmp_path):
    workdir, nih_root = run_dir
    good = nih_test_files(nih_root)[:3]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "empty.png").write_bytes(b"")
    (inputs / "notes.png").write_text("not an image")
    (inputs / "truncated.png").write_bytes(good[0].read_bytes()[:100])
    status = predict.main([f"--model={workdir}", *map(str, good), str(inputs), f"--out={tmp_path}/p"])
    assert status == 1
    rows = read_rows(tmp_path / "p" / "predictions.csv")
    assert [os.path.basename(r["path"]) for r in rows[:3]] == [p.name for p in good]  # input order
    errors = {os.path.basename(r["path"]): r["error"] for r in rows}
    assert all(errors[p.name] == "" for p in good)
    assert "empty" in errors["empty.png"] and "not an image" in errors["notes.png"]
    assert errors["truncated.png"].startswith(str(inputs / "truncated.png"))
    assert all(rows[i]["Mass"] == "" for i in range(3, 6)) and all(rows[i]["Mass"] for i in range(3))
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["failed"] == 3 and {f["path"] for f in summary["failures"]} == {
        str(inputs / n) for n in ("empty.png", "notes.png", "truncated.png")}
    assert sorted(os.listdir(tmp_path / "p")) == ["predictions.csv", "summary.json"]  # no temporary leftovers


def test_a_failure_at_any_stage_is_that_files_error_and_the_rest_are_predicted(run_dir, tmp_path, monkeypatch):
    """Files that fail after they are read (the pixel contract, the model) get their error, naming the file and the
    stage; every other file is predicted exactly as when predicted alone. The stage failures are simulated (the
    stage raises for one marked image); the gray PNG with tRNS is a real file (decoded as gray + alpha on main, where
    it aborted the whole run)."""
    from metachex_jax.contract.pixels import PixelContract

    workdir, nih_root = run_dir
    good = nih_test_files(nih_root)[:4]
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_gray_png_with_trns(inputs / "trns.png", np.asarray(Image.open(good[0]).convert("L")))
    for name, value in (("contract_fails.png", 9), ("model_fails.png", 7)):  # constant images mark the file
        Image.fromarray(np.full((40, 40), value, np.uint8)).save(inputs / name)
    order = [good[0], inputs / "trns.png", good[1], inputs / "contract_fails.png", good[2],
             inputs / "model_fails.png", good[3]]
    assert predict.main([f"--model={workdir}", *map(str, good), f"--out={tmp_path}/alone", "--batch_size=4",
                         "--features"]) == 0
    alone = {r["path"]: r for r in read_rows(tmp_path / "alone" / "predictions.csv")}
    alone_features = np.load(tmp_path / "alone" / "features.npy")

    from_stored, run_tta = PixelContract.from_stored, Predictor._run_tta

    def contract_fails_for_nines(self, image):
        if np.all(np.asarray(image) == 9):
            raise RuntimeError("simulated contract failure")
        return from_stored(self, image)

    def model_fails_for_sevens(self, images, tta):
        if any(np.all(image == 7) for image in images):
            raise RuntimeError("simulated model failure")
        return run_tta(self, images, tta)

    monkeypatch.setattr(PixelContract, "from_stored", contract_fails_for_nines)
    monkeypatch.setattr(Predictor, "_run_tta", model_fails_for_sevens)
    status = predict.main([f"--model={workdir}", *map(str, order), f"--out={tmp_path}/p", "--batch_size=4",
                           "--features"])
    assert status == 1
    rows = read_rows(tmp_path / "p" / "predictions.csv")
    assert [r["path"] for r in rows] == [str(p) for p in order]
    errors = {os.path.basename(r["path"]): r["error"] for r in rows}
    assert errors["contract_fails.png"].startswith(f"{inputs / 'contract_fails.png'}: pixel contract failed "
                                                   "(RuntimeError: simulated contract failure")
    assert errors["model_fails.png"].startswith(f"{inputs / 'model_fails.png'}: prediction failed "
                                                "(RuntimeError: simulated model failure")
    # The tRNS file: predicted where the reader reads it as gray, else its own error (never the run's end).
    trns = rows[1]
    assert (trns["error"] == "" and trns["Mass"] != "") or (
        trns["error"].startswith(str(inputs / "trns.png")) and trns["Mass"] == "")
    features = np.load(tmp_path / "p" / "features.npy")
    for i, row in enumerate(rows):
        if row["path"] in alone:  # the good files, batched with failing ones: as when predicted alone
            assert row["error"] == ""
            for name in (*PATHOLOGIES, "age"):
                assert abs(float(row[name]) - float(alone[row["path"]][name])) <= 1e-6 * max(1.0, abs(float(row[name])))
            np.testing.assert_allclose(features[i], alone_features[[str(p) for p in good].index(row["path"])],
                                       rtol=1e-5, atol=1e-6)
        elif row["error"]:
            assert row["Mass"] == "" and np.isnan(features[i]).all()
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    failed = {r["path"]: r["error"] for r in rows if r["error"]}
    assert {f["path"]: f["error"] for f in summary["failures"]} == failed and summary["failed"] == len(failed)
    assert summary["predicted"] == len(order) - len(failed)


def test_a_failed_heatmap_keeps_the_predictions_and_the_other_heatmaps(run_dir, tmp_path, monkeypatch, capsys):
    """Heatmaps come after the predictions are written. One file is overwritten (truncated) after it was
    predicted, so its heatmap's read fails for real; another's Grad-CAM is made to fail (simulated, for its image
    only). Both keep their predictions in the CSV with their heatmap error, the third gets its heatmaps, exit 1."""
    workdir, nih_root = run_dir
    inputs = tmp_path / "in"
    inputs.mkdir()
    for source in nih_test_files(nih_root)[:3]:
        Image.open(source).save(inputs / source.name)
    keep, changes, gradcam_fails = sorted(inputs.iterdir())
    marked = Predictor.load(str(workdir)).contract.from_file(gradcam_fails)[0]
    predict_files, gradcam = Predictor.predict_files, Predictor.gradcam

    def then_a_file_changes(self, paths, **kwargs):
        result = predict_files(self, paths, **kwargs)
        changes.write_bytes(changes.read_bytes()[:200])  # e.g. a copy in progress replaced it
        return result

    def gradcam_fails_for_one_image(self, images, names, *, layer="final"):
        if any(np.array_equal(image, marked) for image in images):
            raise RuntimeError("simulated Grad-CAM failure")
        return gradcam(self, images, names, layer=layer)

    monkeypatch.setattr(Predictor, "predict_files", then_a_file_changes)
    monkeypatch.setattr(Predictor, "gradcam", gradcam_fails_for_one_image)
    status = predict.main([f"--model={workdir}", str(inputs), "--heatmaps=Mass", "--heatmap_layer=transition3",
                           f"--out={tmp_path}/p", "--batch_size=4"])
    assert status == 1
    rows = {os.path.basename(r["path"]): r for r in read_rows(tmp_path / "p" / "predictions.csv")}
    assert all(r["Mass"] != "" for r in rows.values())  # every file predicted
    assert rows[keep.name]["error"] == ""
    assert rows[changes.name]["error"].startswith(f"{changes}: heatmap failed (ImageDecodeError: ")
    assert rows[gradcam_fails.name]["error"].startswith(f"{gradcam_fails}: heatmap failed (RuntimeError: simulated")
    assert sorted(os.listdir(tmp_path / "p" / "heatmaps")) == [keep.name]
    assert sorted(os.listdir(tmp_path / "p" / "heatmaps" / keep.name)) == ["Mass.npy", "Mass.png"]
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["predicted"] == 3 and summary["failed"] == 2
    assert summary["heatmaps"]["files"] == 2 and summary["heatmaps"]["failed"] == 2
    assert {f["path"] for f in summary["failures"]} == {str(changes), str(gradcam_fails)}
    err = capsys.readouterr().err
    assert f"failed: {changes}: heatmap failed" in err and f"failed: {gradcam_fails}: heatmap failed" in err


def test_usage_errors_stop_before_any_work(run_dir, tmp_path, capsys):
    workdir, nih_root = run_dir
    image = str(nih_test_files(nih_root)[0])
    cases = [
        ([f"--model={tmp_path}/nowhere", image], "does not exist"),
        ([f"--model={tmp_path}", image], "neither a model directory"),
        ([f"--model={workdir}", image, "--heatmaps=tb"], "no output(s) ['tb']"),
        ([f"--model={workdir}", image, "--heatmaps=age", "--heatmap_layer=block9"], "choose one of stem"),
        ([f"--model={workdir}", f"{tmp_path}/missing.png"], "no such file or folder"),
        ([f"--model={workdir}", f"{tmp_path}/*.dcm"], "matches no file"),
        ([f"--model={workdir}"], "no input images"),
        ([f"--model={workdir}", image, "--image_size=64"], "pixel contract is fixed"),
    ]
    for argv, message in cases:
        out = tmp_path / "out"
        assert predict.main([*argv, f"--out={out}"]) == 2, argv
        assert message in capsys.readouterr().err, argv
        assert not out.exists()  # nothing written


def test_other_formats_and_bit_depths_through_predict(run_dir, tmp_path):
    workdir, _ = run_dir
    rng = np.random.default_rng(1)
    twelve = rng.integers(0, 4096, (80, 60)).astype(np.uint16)
    Image.fromarray(twelve).save(tmp_path / "twelve_bit.png")
    write_dicom(tmp_path / "scan", twelve)  # DICOM without an extension
    Image.fromarray((twelve >> 4).astype(np.uint8), mode="L").save(tmp_path / "jpeg_named.png", format="JPEG")
    status = predict.main([f"--model={workdir}", str(tmp_path / "twelve_bit.png"), str(tmp_path / "scan"),
                           str(tmp_path / "jpeg_named.png"), f"--out={tmp_path}/p"])
    assert status == 0
    rows = {os.path.basename(r["path"]): r for r in read_rows(tmp_path / "p" / "predictions.csv")}
    assert (rows["twelve_bit.png"]["format"], rows["twelve_bit.png"]["bit_depth"]) == ("png", "12")
    assert (rows["scan"]["format"], rows["scan"]["bit_depth"]) == ("dicom", "12")
    assert (rows["jpeg_named.png"]["format"], rows["jpeg_named.png"]["width"]) == ("jpeg", "60")
    # The same 12-bit samples give the same prediction from the PNG and from the DICOM.
    assert abs(float(rows["scan"]["Mass"]) - float(rows["twelve_bit.png"]["Mass"])) < 1e-6
    assert predict.main([f"--model={workdir}", str(tmp_path / "twelve_bit.png"), "--bit_depth=16",
                         f"--out={tmp_path}/p16"]) == 0
    assert read_rows(tmp_path / "p16" / "predictions.csv")[0]["bit_depth_source"] == "override"


def _independent_gradcam(model, images, name, layer):
    """Grad-CAM written out without the delta mechanism: the network is cut at `layer` by hand and the rest is
    differentiated per example with jax.grad."""
    bb = model.backbone
    x = jnp.asarray(images)
    from metachex_jax.contract.pixels import to_model_input

    _, activation = bb.feature_map(to_model_input(x), tap=layer)
    assert layer == "transition3"

    def rest(a):  # transition3's output -> block4 -> norm5 -> pool -> the output's score
        final = nnx.relu(bb.norm5(bb.blocks[3](a[None])))
        return model.output_scores(jnp.mean(final, axis=(1, 2)))[name][0]

    grads = jnp.stack([jax.grad(rest)(a) for a in activation])
    weights = grads.mean(axis=(1, 2))
    cam = np.maximum(np.einsum("nhwc,nc->nhw", np.asarray(activation), np.asarray(weights)), 0)
    return np.asarray(jax.image.resize(cam, (len(cam), images.shape[1], images.shape[2]), "linear"))


def test_gradcam_matches_an_independent_computation(run_dir):
    workdir, nih_root = run_dir
    predictor = Predictor.load(str(workdir), batch_size=4)
    crops = np.stack([predictor.contract.from_file(p)[0] for p in nih_test_files(nih_root)[:5]])
    model = predictor._backend.module
    maps = predictor.gradcam(crops, ["Mass", "age"], layer="transition3")
    for name in ("Mass", "age"):
        assert maps[name].shape == (5, RES, RES) and (maps[name] >= 0).all()
        np.testing.assert_allclose(maps[name], _independent_gradcam(model, crops, name, "transition3"),
                                   rtol=1e-4, atol=1e-6)
    # At the final layer a linear head makes Grad-CAM closed-form: ReLU(A . w_k) / (h w), upsampled.
    final = predictor.gradcam(crops, ["Mass"])["Mass"]
    from metachex_jax.contract.pixels import to_model_input

    activation = np.asarray(model.backbone.feature_map(to_model_input(jnp.asarray(crops))))
    w = np.asarray(model.pathology_head.kernel[...])[:, PATHOLOGIES.index("Mass")]
    h, wd = activation.shape[1:3]
    cam = np.maximum(activation @ w / (h * wd), 0)
    expected = np.asarray(jax.image.resize(cam, (5, RES, RES), "linear"))
    np.testing.assert_allclose(final, expected, rtol=1e-4, atol=1e-7)
    with pytest.raises(ModelError, match="no output"):
        predictor.gradcam(crops, ["tb"])


def test_heatmap_files_mirror_input_paths_and_overlay_the_original(run_dir, tmp_path):
    workdir, nih_root = run_dir
    source = nih_test_files(nih_root)[0]
    for folder in ("a", "b"):  # equal base names in two folders
        (tmp_path / "in" / folder).mkdir(parents=True)
        Image.open(source).resize((96, 80)).save(tmp_path / "in" / folder / "x.png")
    status = predict.main([f"--model={workdir}", str(tmp_path / "in"), "--heatmaps=all",
                           "--heatmap_layer=transition3", f"--out={tmp_path}/p"])
    assert status == 0
    for folder in ("a", "b"):
        out = tmp_path / "p" / "heatmaps" / folder / "x.png"
        assert sorted(os.listdir(out)) == sorted(f"{n}.{e}" for n in [*PATHOLOGIES, "view_ap", "sex_male", "age"]
                                                 for e in ("npy", "png"))
        assert np.load(out / "age.npy").shape == (RES, RES)
        with Image.open(out / "age.png") as overlay:
            assert overlay.size == (96, 80) and overlay.mode == "RGB"


def test_heatmaps_of_files_differing_only_by_extension_keep_their_own_folders(run_dir, tmp_path):
    """a.png, a.dcm and an extensionless DICOM `a` side by side: three heatmap folders, each holding the map of its
    own file (Grad-CAM of that file's model input, computed directly)."""
    workdir, nih_root = run_dir
    inputs = tmp_path / "in"
    inputs.mkdir()
    sources = [np.asarray(Image.open(p).convert("L")) for p in nih_test_files(nih_root)[:3]]  # three different X-rays
    Image.fromarray(sources[0]).save(inputs / "a.png")
    for pixels, name in ((sources[1], "a.dcm"), (sources[2], "a")):  # as 12-bit DICOM
        write_dicom(inputs / name, np.rint(pixels * (4095 / 255)).astype(np.uint16))
    status = predict.main([f"--model={workdir}", str(inputs), "--heatmaps=Mass,age", "--heatmap_layer=transition3",
                           f"--out={tmp_path}/p"])
    assert status == 0
    assert sorted(os.listdir(tmp_path / "p" / "heatmaps")) == ["a", "a.dcm", "a.png"]
    predictor = Predictor.load(str(workdir))
    maps = []
    for name in ("a", "a.dcm", "a.png"):
        crop, _ = predictor.contract.from_file(inputs / name)
        expected = predictor.gradcam(crop[None], ["Mass", "age"], layer="transition3")
        for output in ("Mass", "age"):
            np.testing.assert_allclose(np.load(tmp_path / "p" / "heatmaps" / name / f"{output}.npy"),
                                       expected[output][0], rtol=1e-5, atol=1e-7)
        maps.append(np.stack([expected["Mass"][0], expected["age"][0]]))
    assert all(not np.allclose(maps[i], maps[j]) for i, j in ((0, 1), (0, 2), (1, 2)))  # three different maps


def test_gradcam_overlay_geometry():
    """The map goes back through the crop and the resize: a peak at the crop's centre lands at the image's."""
    from metachex_jax.contract.pixels import PixelContract
    from metachex_jax.serving import gradcam

    contract = PixelContract(image_size=8, resolution=12)
    cam = np.zeros((8, 8), np.float32)
    cam[3, 4] = 1.0
    x, y = gradcam.peak_in_original(cam, contract, width=120, height=60)
    assert (x, y) == ((4 + 2 + 0.5) * 10, (3 + 2 + 0.5) * 5)
    heat, covered = gradcam.to_original(cam, contract, 120, 60)
    assert covered[:, :10].max() < 0.5 and covered[30, 60] == 1.0  # the crop cut 2 of 12 columns per side
    result = pointing_game.pointing_game([(x, y), (1, 1)], [[(60, 20, 10, 10)], [(50, 50, 5, 5)]], [7200, 7200])
    assert (result["hits"], result["cases"]) == (1, 2) and list(result["case_hits"]) == [1.0, 0.0]
    assert result["random_point_baseline"] == pytest.approx((100 / 7200 + 25 / 7200) / 2)


def test_export_runs_without_the_model_code_and_equals_the_workdir(run_dir, tmp_path):
    workdir, nih_root = run_dir
    out = export.export(str(workdir), str(tmp_path / "exported"))
    card = json.loads((tmp_path / "exported" / "model.json").read_text())
    assert card["input"]["image_size"] == RES and card["exported"]["platforms"] == ["cpu", "cuda", "tpu"]
    assert [o["name"] for o in card["outputs"]][-1] == "age" and card["metrics"]["mean_auroc"]["value"] > 0
    assert card["training"]["demo_data"] is True
    assert card["ood"]["file"] == "ood.npz" and (tmp_path / "exported" / "ood.npz").is_file()  # the run's
    images = [str(p) for p in nih_test_files(nih_root)[:7]]
    assert predict.main([f"--model={workdir}", *images, f"--out={tmp_path}/flax"]) == 0
    # A fresh interpreter: predict from the exported model, then check what was imported.
    code = (f"import sys; from metachex_jax import predict; "
            f"status = predict.main(['--model={out}', *{images!r}, '--out={tmp_path}/exp', '--batch_size=4']); "
            "bad = [m for m in sys.modules if m.startswith(('flax', 'metachex_jax.models', 'orbax'))]; "
            "print('IMPORTED', bad); sys.exit(status or (3 if bad else 0))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "IMPORTED []" in done.stdout
    flax_rows, exported_rows = (read_rows(tmp_path / d / "predictions.csv") for d in ("flax", "exp"))
    for a, b in zip(flax_rows, exported_rows):
        for name in [*PATHOLOGIES, "view_ap", "sex_male", "age", "ood_distance"]:
            assert abs(float(a[name]) - float(b[name])) <= 1e-5 * max(1.0, abs(float(a[name])))
    assert predict.main([f"--model={out}", images[0], "--heatmaps=age", f"--out={tmp_path}/h"]) == 2
    with pytest.raises(FileExistsError):
        export.export(str(workdir), str(tmp_path / "exported"))


def test_predict_shards_over_several_devices(run_dir, tmp_path):
    """Two CPU devices (a fresh process): the batch is split over both and the predictions do not change."""
    workdir, nih_root = run_dir
    images = [str(p) for p in nih_test_files(nih_root)[:9]]
    assert predict.main([f"--model={workdir}", *images, f"--out={tmp_path}/one", "--batch_size=4"]) == 0
    code = (f"import jax; from metachex_jax import predict; assert jax.local_device_count() == 2; "
            f"raise SystemExit(predict.main(['--model={workdir}', *{images!r}, '--out={tmp_path}/two', "
            "'--batch_size=3']))")  # rounded up to 4, a multiple of the devices
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    for a, b in zip(*(read_rows(tmp_path / d / "predictions.csv") for d in ("one", "two"))):
        assert abs(float(a["age"]) - float(b["age"])) < 1e-4 and abs(float(a["Mass"]) - float(b["Mass"])) < 1e-6


def test_backbone_directory_gives_features_only(tmp_path, run_dir):
    from metachex_jax.models import DenseNet

    _, nih_root = run_dir
    backbone = DenseNet(ARCH, num_classes=None, rngs=nnx.Rngs(3))
    convert.save_backbone(backbone, tmp_path / "bb", source="test")
    image = str(nih_test_files(nih_root)[0])
    assert predict.main([f"--model={tmp_path}/bb", image, f"--out={tmp_path}/none"]) == 2  # nothing to output
    assert predict.main([f"--model={tmp_path}/bb", image, "--features", "--image_size=32", "--resolution=36",
                         f"--out={tmp_path}/f"]) == 0
    assert "ood_flag" not in read_rows(tmp_path / "f" / "predictions.csv")[0]  # no description: no columns
    why = json.loads((tmp_path / "f" / "summary.json").read_text())["ood"]["why"]
    assert "convert_torchvision backbone carries no description" in why and "--ood_reference=DIR" in why
    # Reference images give it one: every reference image described, the threshold from out-of-fold distances.
    references = [str(p) for p in sorted(nih_root.rglob("*.png"))[:20]]
    assert predict.main([f"--model={tmp_path}/bb", image, "--features", "--image_size=32", "--resolution=36",
                         f"--ood_reference={os.path.dirname(references[0])}", f"--out={tmp_path}/r"]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())["ood"]
    assert summary["columns"] and summary["threshold_from"] == "out-of-fold distances (5 folds)"
    assert read_rows(tmp_path / "r" / "predictions.csv")[0]["ood_flag"] in ("0", "1")
    (tmp_path / "few").mkdir()
    assert predict.main([f"--model={tmp_path}/bb", image, "--features", "--image_size=32", "--resolution=36",
                         f"--ood_reference={tmp_path}/few", f"--out={tmp_path}/x"]) == 2  # no images: a usage error
    features = np.load(tmp_path / "f" / "features.npy")
    backbone.eval()
    from metachex_jax.contract.pixels import PixelContract

    crop, _ = PixelContract(32, 36).from_file(image)
    from metachex_jax.contract.pixels import to_model_input

    expected = np.asarray(backbone.features(to_model_input(jnp.asarray(crop[None]))))
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


# --- out-of-distribution flags, the review page ----------------------------------------------------------------

def shifted_copies(sources, folder):
    """Copies unlike the training images: inverted, strongly re-exposed both ways, and other textures (white
    noise, a checkerboard), each kind of every source image."""
    rng = np.random.default_rng(0)
    kinds = {"inverted": lambda x: 255 - x,
             "darkened": lambda x: 255 * (x / 255) ** 3.0,
             "brightened": lambda x: 255 * (x / 255) ** 0.3,
             "noise": lambda x: rng.integers(0, 256, x.shape),
             "checkerboard": lambda x: ((np.indices(x.shape).sum(axis=0) // 4) % 2) * 255}
    out = {kind: [] for kind in kinds}
    for source in sources:
        pixels = np.asarray(Image.open(source).convert("L"), np.float64)
        for kind, change in kinds.items():
            path = folder / f"{kind}_{source.name}"
            Image.fromarray(np.clip(change(pixels), 0, 255).astype(np.uint8)).save(path)
            out[kind].append(path)
    return out


def validation_files(workdir, nih_root):
    from metachex_jax.data.input import datasets
    from metachex_jax.data.input.spec import DataSpec
    from metachex_jax.models import runs

    validation = datasets.pretraining_data(DataSpec.from_config(runs.saved_config(str(workdir)))).splits[
        "chestxray14"]["validation"]
    names = [validation[i]["image_name"] for i in range(len(validation))]
    found = {p.name: p for p in nih_root.rglob("*.png")}
    return [found[n.decode() if isinstance(n, bytes) else str(n)] for n in names]


def test_ood_flags_held_out_images_at_the_threshold_rate_and_shifted_copies_in_their_majority(run_dir, tmp_path):
    """Training described its best checkpoint (WORKDIR/ood/step_N.npz: training images, threshold from the
    validation split). predict scores raw files: the validation files' largest distance is the threshold (fewer
    than 99 of them: k = n), the test split's images are flagged at the rate that implies, and the shifted copies
    in their majority."""
    from scipy import stats

    from metachex_jax.contract import ood

    workdir, nih_root = run_dir
    (saved,) = (workdir / "ood").glob("step_*.npz")
    described = ood.FeatureReference.from_bytes(saved.read_bytes())
    info = described.info
    n, k = info["threshold_images"], info["threshold_rank"]
    assert info["reference_images"] > n > 5 and info["source"]["run"] == str(workdir)
    validation = validation_files(workdir, nih_root)
    assert len(validation) == n
    tests = nih_test_files(nih_root)
    shifted = shifted_copies(tests, tmp_path)
    inputs = [*validation, *tests, *(p for paths in shifted.values() for p in paths)]
    assert predict.main([f"--model={workdir}", *map(str, inputs), f"--out={tmp_path}/p"]) == 0
    rows = {r["path"]: r for r in read_rows(tmp_path / "p" / "predictions.csv")}
    distance = {p: float(rows[str(p)]["ood_distance"]) for p in inputs}
    flag = {p: int(rows[str(p)]["ood_flag"]) for p in inputs}
    near = [p for p in inputs if abs(distance[p] - described.threshold) <= 1e-6 * described.threshold]
    assert all(flag[p] == int(distance[p] > described.threshold) for p in inputs if p not in near)
    assert max(distance[p] for p in validation) == pytest.approx(described.threshold, rel=1e-4)
    # Conditional on the threshold a held-out image is flagged with probability U ~ Beta(n + 1 - k, k)
    # (exchangeable with the validation images), so the flag count of m test images is beta-binomial: we accept
    # its central 99.9%.
    flagged = sum(flag[p] for p in tests)
    low, high = stats.betabinom(len(tests), n + 1 - k, k).ppf([0.0005, 0.9995])
    assert low <= flagged <= high, (flagged, low, high, info["expected_flag_rate"])
    # Every kind of copy moves away from the training images, each copy beyond its own source image in most cases;
    # all but the inverted copies beyond the threshold in their majority. (Inversion: this 3-step tiny model's
    # features barely see it among the demo's exposure nuisance, bright collimation bands and markers; the demo's
    # 10-epoch model flags every inverted copy: docs/applying.md.)
    for kind, paths in shifted.items():
        farther = sum(distance[copy] > distance[source] for copy, source in zip(paths, tests))
        assert farther > 0.8 * len(paths), (kind, farther)
        if kind != "inverted":
            assert sum(flag[p] for p in paths) > len(paths) / 2, kind
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["ood"]["columns"] and summary["ood"]["description"] == str(saved)
    assert summary["ood"]["flagged"] == sum(flag.values()) and summary["ood"]["scored"] == len(inputs)


def test_ood_command_describes_a_step_as_training_did(run_dir, tmp_path, capsys):
    from metachex_jax import ood as ood_command
    from metachex_jax.contract import ood

    workdir, nih_root = run_dir
    (saved,) = (workdir / "ood").glob("step_*.npz")
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "ood")
    image = str(nih_test_files(nih_root)[0])
    assert predict.main([f"--model={copy}", image, f"--out={tmp_path}/none"]) == 0
    assert "ood_distance" not in read_rows(tmp_path / "none" / "predictions.csv")[0]
    why = json.loads((tmp_path / "none" / "summary.json").read_text())["ood"]
    assert not why["columns"] and f"python -m metachex_jax.ood {copy} --step=" in why["why"]
    assert ood_command.main([str(copy), "--step=latest", "--max_images=1000"]) == 0
    again = ood.FeatureReference.from_bytes((copy / "ood" / saved.name).read_bytes())
    described = ood.FeatureReference.from_bytes(saved.read_bytes())
    assert again.threshold == pytest.approx(described.threshold, rel=1e-6)
    np.testing.assert_allclose(again.precision, described.precision, rtol=1e-5)
    assert ood_command.main([str(copy), "--step=99"]) == 1
    assert "step 99 is not among the checkpoints" in capsys.readouterr().err


def test_review_page_in_a_headless_browser(run_dir, tmp_path):
    """`predict --report` writes index.html; Chromium opens it from disk: no console error (its
    Content-Security-Policy turns any load from elsewhere into one), a card per CSV row, sorting by an output
    orders the cards, the OOD filter shows the flagged ones."""
    from browser import headless_chromium

    workdir, nih_root = run_dir
    inputs = tmp_path / "in"
    inputs.mkdir()
    tests = nih_test_files(nih_root)[:8]
    for source in tests:
        shutil.copy(source, inputs / source.name)
    shifted_copies(tests[:2], inputs)
    (inputs / "empty.png").write_bytes(b"")
    out = tmp_path / "p"
    assert predict.main([f"--model={workdir}", str(inputs), f"--out={out}", "--report", "--heatmaps=Mass",
                         "--heatmap_layer=transition3"]) == 1  # the empty file fails
    rows = read_rows(out / "predictions.csv")
    page = (out / "index.html").read_text()
    assert "Content-Security-Policy" in page and "http://" not in page and "https://" not in page
    with headless_chromium() as driver:
        from selenium.webdriver.common.by import By  # the test extra: there once the browser is
        from selenium.webdriver.support.ui import Select

        driver.get((out / "index.html").as_uri())
        cards = driver.find_elements(By.CSS_SELECTOR, ".card")
        assert len(cards) == len(rows) == 19
        column = [o["name"] for o in json.loads((out / "summary.json").read_text())["outputs"]].index("Mass")
        Select(driver.find_element(By.ID, "sort")).select_by_visible_text("Mass")
        shown = [c.get_attribute(f"data-o{column}") for c in driver.find_elements(By.CSS_SELECTOR, ".card")]
        values = [float(v) for v in shown if v]
        assert values == sorted((float(r["Mass"]) for r in rows if r["Mass"]), reverse=True)
        assert shown[-1] == ""  # the failed file last
        Select(driver.find_element(By.ID, "filter")).select_by_visible_text("OOD flagged")
        visible = [c for c in driver.find_elements(By.CSS_SELECTOR, ".card") if c.is_displayed()]
        assert len(visible) == sum(r["ood_flag"] == "1" for r in rows) > 0
        links = driver.find_elements(By.CSS_SELECTOR, ".card a")
        assert len(links) == sum(1 for r in rows if not r["error"])  # one heatmap each
        assert (out / links[0].get_attribute("href").removeprefix(f"file://{out}/")).is_file()
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
