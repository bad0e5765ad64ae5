"""The reader through the commands users run: `prepare --verify`, builds and `predict` each report a file the
reader refuses (a truncated gray JPEG), take the same reader options (--bit_depth, --max_pixels), and record what
the reader did (bit depth, EXIF orientation); a build made by an older reader is refused with its rebuild command."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from flax import nnx
from PIL import Image, ImageOps

from data_fixtures import make_tb_tree
from metachex_jax import predict, prepare
from metachex_jax.data.build import build, builders, registry
from metachex_jax.data.input import datasets
from metachex_jax.data.input.spec import DataSpec
from metachex_jax.data.raw.common import RawDataError
from metachex_jax.imaging import file_formats, resize
from metachex_jax.interop import convert
from test_transfer_run import ARCH

RESOLUTION = 16


def truncated_gray_jpeg(path):
    """A gray JPEG cut before its end (named like the PNG it replaces): libjpeg-turbo would decode it silently."""
    smooth = np.clip(np.cumsum(np.random.default_rng(0).normal(0, 3, (32, 32)), axis=1) + 128, 0, 255)
    Image.fromarray(smooth.astype(np.uint8)).save(path, format="JPEG", quality=90)
    path.write_bytes(path.read_bytes()[:-40])
    return path


def rotated_jpeg(path, orientation: int = 6) -> np.ndarray:
    """A gray JPEG whose EXIF says it is displayed rotated; returns the pixels as displayed (Pillow's decode)."""
    stored = np.zeros((32, 32), np.uint8)
    stored[:8] = 255  # a bright top band: displayed on the right for orientation 6
    exif = Image.Exif()
    exif[file_formats.EXIF_ORIENTATION_TAG] = orientation
    Image.fromarray(stored).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    with Image.open(path) as reference:
        return np.asarray(ImageOps.exif_transpose(reference).convert("L"))


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    """A random densenet_tiny backbone: `predict --features` on it reads files exactly like any model."""
    from metachex_jax.models import DenseNet

    path = tmp_path_factory.mktemp("backbone")
    convert.save_backbone(DenseNet(ARCH, num_classes=None, rngs=nnx.Rngs(0)), path / "bb", source="test")
    return path / "bb"


def run_predict(backbone_dir, out, *arguments) -> tuple[int, dict]:
    status = predict.main([f"--model={backbone_dir}", "--features", "--image_size=32", "--resolution=36",
                           f"--out={out}", *map(str, arguments)])
    with open(out / "predictions.csv") as f:
        return status, {row["path"].rsplit("/", 1)[1]: row for row in csv.DictReader(f)}


# --- a truncated gray JPEG is a bad file on every path (defect 1a) ---------------------------------------------

def test_verify_reports_a_truncated_gray_jpeg(tmp_path):
    tree = make_tb_tree(tmp_path, "montgomery", n_normal=3, n_tb=3)
    bad = sorted(tree.values)[1]
    truncated_gray_jpeg(tree.image_path(bad))
    report = build.verify_raw("montgomery", tmp_path, num_workers=1, progress=False)
    [problem] = [p for p in report.problems if p.kind == "undecodable_image"]
    assert problem.item == bad and "truncated JPEG" in problem.detail


def test_a_build_refuses_a_truncated_gray_jpeg(tmp_path):
    tree = make_tb_tree(tmp_path / "raw", "montgomery", n_normal=3, n_tb=3)
    bad = sorted(tree.values)[4]
    truncated_gray_jpeg(tree.image_path(bad))
    with pytest.raises(RawDataError) as error:
        build.build_dataset("montgomery", tmp_path / "raw", tmp_path / "out", resolution=RESOLUTION, num_workers=1,
                            progress=False)
    assert {(p.kind, p.item) for p in error.value.problems} == {("undecodable_image", bad)}
    assert str(tree.image_path(bad)) in str(error.value) and "truncated JPEG" in str(error.value)


def test_predict_reports_a_truncated_gray_jpeg_and_predicts_the_rest(tmp_path, backbone_dir):
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(tmp_path / "good.png")
    truncated_gray_jpeg(tmp_path / "cut.jpg")
    status, rows = run_predict(backbone_dir, tmp_path / "p", tmp_path / "good.png", tmp_path / "cut.jpg")
    assert status == 1
    assert rows["good.png"]["error"] == ""
    assert rows["cut.jpg"]["error"].startswith(f"{tmp_path / 'cut.jpg'}: cannot decode image (truncated JPEG")
    features = np.load(tmp_path / "p" / "features.npy")
    assert np.isfinite(features[0]).all() and np.isnan(features[1]).all()


# --- the reader's options: one rule for files and datasets (defects 1i, 1j) and what it records (1g) ------------

def test_prepare_bit_depth_applies_to_high_depth_images_only_and_names_the_build(tmp_path, capsys):
    tree = make_tb_tree(tmp_path / "raw", "montgomery", n_normal=6, n_tb=6)
    ids = sorted(tree.values)
    Image.fromarray(np.full((32, 32), 1000, np.uint16)).save(tree.image_path(ids[0]))  # 16-bit gray, 12-bit data
    displayed = rotated_jpeg(tree.image_path(ids[1]))
    argv = ["--dataset=montgomery", f"--manual_dir={tmp_path / 'raw'}", f"--data_dir={tmp_path / 'out'}",
            f"--resolution={RESOLUTION}", "--workers=1"]
    assert prepare.main(argv + ["--bit_depth=16"]) == 0
    assert f"montgomery/r{RESOLUTION}_bits16: built at" in capsys.readouterr().out
    assert prepare.main(argv) == 0  # the reader's rule: a build of its own name
    records = {}
    for config_name in (f"r{RESOLUTION}_bits16", f"r{RESOLUTION}"):
        source = builders.data_source("montgomery", "train+validation+test", tmp_path / "out",
                                      config_name=config_name)
        records[config_name] = {source[i]["image_id"].decode(): source[i] for i in range(len(source))}
    override, rule = records[f"r{RESOLUTION}_bits16"], records[f"r{RESOLUTION}"]
    assert np.all(override[ids[0]]["image"] == round(1000 * 255 / 65535)) and override[ids[0]]["bit_depth"] == 16
    assert np.all(rule[ids[0]]["image"] == round(1000 * 255 / 4095)) and rule[ids[0]]["bit_depth"] == 12
    for image_id in ids[1:]:  # 8-bit images: the override does not apply
        np.testing.assert_array_equal(override[image_id]["image"], rule[image_id]["image"])
    report = builders.read_skip_report(tmp_path / "out", "montgomery", f"r{RESOLUTION}_bits16")
    assert report["build_parameters"]["bit_depth"] == 16
    assert {"bits": 16, "source": "override", "images": 1} in report["bit_depths"]
    assert {"bits": 8, "source": "8-bit file (bit_depth=16 not applied)", "images": 11} in report["bit_depths"]
    # The rotated JPEG is stored as displayed, and its orientation recorded.
    np.testing.assert_array_equal(rule[ids[1]]["image"][..., 0], resize.resize_gray(displayed, RESOLUTION))
    assert rule[ids[1]]["image"][:, -2:].min() > 200 and rule[ids[1]]["image"][:, :8].max() < 50  # band: right
    assert report["orientations"] == {"6": 1}
    # A run reads the build its config names.
    spec = DataSpec(data_dir="~/tensorflow_datasets", resolution=RESOLUTION, image_size=RESOLUTION, bit_depth=16)
    assert datasets.required_build("montgomery", spec)[0] == f"r{RESOLUTION}_bits16"
    assert registry.family("chexpert").config_name(RESOLUTION, bit_depth=12) == f"r{RESOLUTION}_bits12"
    assert "--bit_depth" not in build.prepare_command("montgomery", tmp_path, resolution=RESOLUTION)


def test_max_pixels_is_an_option_of_prepare_and_predict(tmp_path, capsys, backbone_dir):
    make_tb_tree(tmp_path / "raw", "montgomery", n_normal=2, n_tb=2)  # 32 x 32 = 1024 pixels each
    verify = ["--dataset=montgomery", f"--manual_dir={tmp_path / 'raw'}", "--verify", "--workers=1"]
    assert prepare.main(verify + ["--max_pixels=1000"]) == 1
    out = capsys.readouterr().out
    assert out.count("[undecodable_image]") == 4
    assert "declares 32 x 32 = 1,024 pixels, above the limit max_pixels=1,000" in out
    assert prepare.main(verify + ["--max_pixels=1024"]) == 0
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(tmp_path / "a.png")
    status, rows = run_predict(backbone_dir, tmp_path / "p", tmp_path / "a.png", "--max_pixels=1199")
    assert status == 1 and "declares 30 x 40 = 1,200 pixels" in rows["a.png"]["error"]
    assert run_predict(backbone_dir, tmp_path / "q", tmp_path / "a.png", "--max_pixels=1200")[0] == 0


def test_predict_bit_depth_leaves_8bit_files_alone_and_rows_carry_the_orientation(tmp_path, backbone_dir):
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(tmp_path / "eight.png")
    Image.fromarray(np.full((40, 40), 1000, np.uint16)).save(tmp_path / "sixteen.png")
    rotated_jpeg(tmp_path / "rotated.jpg")
    status, rows = run_predict(backbone_dir, tmp_path / "p", tmp_path / "eight.png", tmp_path / "sixteen.png",
                               tmp_path / "rotated.jpg", "--bit_depth=12")
    assert status == 0, rows
    assert rows["eight.png"]["bit_depth_source"] == "8-bit file (bit_depth=12 not applied)"
    assert (rows["sixteen.png"]["bit_depth"], rows["sixteen.png"]["bit_depth_source"]) == ("12", "override")
    assert [rows[name]["orientation"] for name in ("eight.png", "rotated.jpg")] == ["1", "6"]
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["failed"] == 0


# --- a build made by an older reader is refused with the command that rebuilds it ------------------------------

def test_an_older_build_is_refused_with_its_rebuild_command(tmp_path):
    older = tmp_path / "tfds" / "montgomery" / f"r{RESOLUTION}" / "1.3.0"  # TB builds before the one-rounding rule
    older.mkdir(parents=True)
    (older / "dataset_info.json").write_text("{}")
    assert str(builders.Montgomery.VERSION) != "1.3.0"
    assert not builders.is_complete(tmp_path / "tfds", "montgomery", f"r{RESOLUTION}")
    assert builders.older_builds(tmp_path / "tfds", "montgomery", f"r{RESOLUTION}") == ["1.3.0"]
    spec = DataSpec(data_dir=str(tmp_path / "tfds"), resolution=RESOLUTION, image_size=RESOLUTION)
    message = datasets.missing_data_message(spec, ["montgomery"])
    assert (f"montgomery/r{RESOLUTION} in {tmp_path / 'tfds'} was built by an older version of its builder "
            f"(1.3.0; now {builders.Montgomery.VERSION}), which this version does not read: rebuild it") in message
    assert (f"python -m metachex_jax.prepare --dataset=montgomery --manual_dir=RAW_DIR "
            f"--data_dir={tmp_path / 'tfds'} --resolution={RESOLUTION}") in message
