"""One contract, one set of pixels: for both pixel geometries, the uint8 input `predict` makes from a raw non-square
file is, bit for bit, the one evaluation makes from that file's prepared record; a run reads the build of its
model's geometry (a crop_resize build keeps the centre square, and its name says so)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from data_fixtures import make_tb_tree
from metachex_jax.contract.pixels import PixelContract
from metachex_jax.data.build import build, builders
from metachex_jax.data.input import datasets, pipeline
from metachex_jax.data.input.spec import DataSpec

RESOLUTION, IMAGE_SIZE = 16, 12


def evaluated(source, geometry: str) -> np.ndarray:
    """The evaluation pipeline's uint8 inputs for every record of `source`, in order."""
    with pipeline.eval_batches(source, kind="tb", global_batch_size=len(source), image_size=IMAGE_SIZE,
                               geometry=geometry, process_index=0, process_count=1) as batches:
        return np.asarray(next(batches)["image"])


def test_predicting_a_raw_non_square_file_equals_evaluating_its_prepared_record(tmp_path):
    tree = make_tb_tree(tmp_path / "raw", "montgomery", n_normal=6, n_tb=6)
    rng = np.random.default_rng(0)
    for image_id in tree.values:  # 40 x 64, landscape and portrait: the centre square is a third of the image
        shape = (40, 64) if image_id.endswith("1") else (64, 40)
        Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(tree.image_path(image_id))
    inputs = {}
    for geometry, name in (("resize_crop", f"r{RESOLUTION}"), ("crop_resize", f"r{RESOLUTION}_square")):
        spec = DataSpec(data_dir=str(tmp_path / "out"), resolution=RESOLUTION, image_size=IMAGE_SIZE, geometry=geometry)
        config_name, parameters = datasets.required_build("montgomery", spec)
        assert config_name == name  # the run's model geometry names the build it reads
        result = build.build_dataset("montgomery", tmp_path / "raw", tmp_path / "out", resolution=RESOLUTION,
                                     num_workers=1, progress=False, **parameters)
        assert result.config_name == name and result.report["build_parameters"]["geometry"] == geometry
        source = builders.data_source("montgomery", "train+validation+test", tmp_path / "out", config_name=name)
        assert source.dataset_info.geometry == geometry
        contract = PixelContract(IMAGE_SIZE, RESOLUTION, "imagenet", geometry)
        predicted = np.stack([contract.from_file(tree.image_path(source[i]["image_id"].decode()))[0]
                              for i in range(len(source))])
        inputs[geometry] = evaluated(source, geometry)
        assert inputs[geometry].dtype == predicted.dtype == np.uint8
        np.testing.assert_array_equal(inputs[geometry], predicted)
    # The two geometries show a model different pixels; and a crop_resize model evaluated on the whole-image build
    # (what every run read before builds knew their geometry) would not see what predict gives it.
    assert not np.array_equal(inputs["resize_crop"], inputs["crop_resize"])
    squeezed = builders.data_source("montgomery", "train+validation+test", tmp_path / "out",
                                    config_name=f"r{RESOLUTION}")
    assert (evaluated(squeezed, "crop_resize") != inputs["crop_resize"]).mean() > 0.3
