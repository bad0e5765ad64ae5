"""Tests for metachex_jax.convert: torchvision DenseNet state dicts <-> NNX DenseNet, and backbone checkpoints.

The synthetic state dicts are built by `torchvision_layout`, written here independently of the library from
torchvision's `DenseNet.__init__` naming; the torch tests check it against torchvision itself. Without torch the
torch tests skip; the parity tests compare eval-mode logits with torchvision's.
"""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

from metachex_jax import convert_torchvision
from metachex_jax.interop import convert
from metachex_jax.interop.convert import (CheckpointReadError, StateDictMismatchError, abstract_densenet,
                                          convert_state_dict, infer_spec, load_backbone, load_torchvision_densenet,
                                          save_backbone, to_torchvision_state_dict)
from metachex_jax.models import SPECS, DenseNet, DenseNetSpec, MetaChexNet

TINY = SPECS["densenet_tiny"]


def torchvision_layout(spec: DenseNetSpec, num_classes: int | None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of torchvision's `DenseNet(growth_rate, block_config, num_init_features, bn_size)`."""
    shapes: dict[str, tuple[int, ...]] = {}

    def batch_norm(prefix, channels):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    width = spec.bn_size * spec.growth_rate
    shapes["features.conv0.weight"] = (spec.num_init_features, 3, 7, 7)
    batch_norm("features.norm0", spec.num_init_features)
    channels = spec.num_init_features
    for b, num_layers in enumerate(spec.block_config, start=1):
        for layer in range(1, num_layers + 1):
            prefix = f"features.denseblock{b}.denselayer{layer}"
            cin = channels + (layer - 1) * spec.growth_rate
            batch_norm(f"{prefix}.norm1", cin)
            shapes[f"{prefix}.conv1.weight"] = (width, cin, 1, 1)
            batch_norm(f"{prefix}.norm2", width)
            shapes[f"{prefix}.conv2.weight"] = (spec.growth_rate, width, 3, 3)
        channels += num_layers * spec.growth_rate
        if b != len(spec.block_config):
            batch_norm(f"features.transition{b}.norm", channels)
            shapes[f"features.transition{b}.conv.weight"] = (channels // 2, channels, 1, 1)
            channels //= 2
    batch_norm("features.norm5", channels)
    if num_classes:
        shapes["classifier.weight"] = (num_classes, channels)
        shapes["classifier.bias"] = (num_classes,)
    return shapes


def random_state_dict(spec: DenseNetSpec, num_classes: int | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Distinct random float32 values per tensor (positive variances), int64 num_batches_tracked."""
    rng = np.random.default_rng(seed)
    state_dict = {}
    for key, shape in torchvision_layout(spec, num_classes).items():
        if key.endswith("num_batches_tracked"):
            state_dict[key] = np.array(7, np.int64)
        elif key.endswith("running_var"):
            state_dict[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:
            state_dict[key] = rng.standard_normal(shape, dtype=np.float32)
    return state_dict


def shape_only_state_dict(spec: DenseNetSpec, num_classes: int | None) -> dict[str, np.ndarray]:
    """Zero-stride arrays of the right shapes: a DenseNet-161 key set without allocating its weights."""
    return {k: np.broadcast_to(np.float32(0), s) for k, s in torchvision_layout(spec, num_classes).items()}


def model_arrays(model) -> dict[tuple, np.ndarray]:
    return {path: np.asarray(v) for path, v in convert.variable_paths(model).items()}


def assert_same_arrays(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def mismatch_lines(message: str, label: str) -> set[str]:
    """The key names listed under one heading ("missing keys", ...) of a mismatch report."""
    match = re.search(rf"  (\d+) {label}:\n((?:    .*\n?)*)", message)
    if match is None:
        return set()
    keys = {line.strip().split(" ")[0].rstrip(":") for line in match[2].splitlines()}
    assert len(keys) == int(match[1])
    return keys


# --------------------------------------------------------------------------------------------------------------
# The mapping.

@pytest.mark.parametrize("arch, num_classes", [("densenet_tiny", 10), ("densenet121", 1000)])
def test_mapping_is_total_and_round_trips_bit_identically(arch, num_classes):
    state_dict = random_state_dict(SPECS[arch], num_classes)
    target = abstract_densenet(arch, num_classes)  # shapes only: DenseNet-121 is never compiled or initialised
    conversion = convert_state_dict(state_dict, target)

    nnx_keys = set(convert._flatten(conversion.state))
    assert nnx_keys == set(convert._flatten(nnx.to_pure_dict(nnx.state(target))))
    assert conversion.dropped == sorted(k for k in state_dict if k.endswith("num_batches_tracked"))
    model = convert.fill(target, conversion.state)
    back = to_torchvision_state_dict(model)
    expected = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    assert_same_arrays(back, expected)


def test_axes_follow_torch_conventions():
    state_dict = random_state_dict(TINY, 10)
    model = convert.fill(abstract_densenet(TINY, 10), convert_state_dict(state_dict, abstract_densenet(TINY, 10)).state)
    conv0 = state_dict["features.conv0.weight"]  # (out, in, kh, kw)
    kernel = np.asarray(model.conv0.kernel[...])  # (kh, kw, in, out)
    assert kernel[1, 5, 2, 9] == conv0[9, 2, 1, 5]
    assert np.asarray(model.classifier.kernel[...])[3, 7] == state_dict["classifier.weight"][7, 3]
    norm = model.blocks[1].layers[0].norm2
    prefix = "features.denseblock2.denselayer1.norm2"
    for nnx_name, torch_name in [("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                                 ("var", "running_var")]:
        np.testing.assert_array_equal(getattr(norm, nnx_name)[...], state_dict[f"{prefix}.{torch_name}"])


@pytest.mark.parametrize("arch", ["densenet121", "densenet169", "densenet201", "densenet161", "densenet_tiny"])
def test_infer_spec(arch):
    assert infer_spec(shape_only_state_dict(SPECS[arch], 1000)) == SPECS[arch]


def test_legacy_key_spelling_loads_like_the_current_one(tmp_path):
    state_dict = random_state_dict(TINY, 10)
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in state_dict.items()}
    assert "features.denseblock1.denselayer2.norm.1.running_var" in legacy
    assert "features.denseblock1.denselayer2.conv.2.weight" in legacy
    np.savez(tmp_path / "legacy.npz", **legacy)
    np.savez(tmp_path / "current.npz", **state_dict)
    assert_same_arrays(model_arrays(load_torchvision_densenet(tmp_path / "legacy.npz", 10)),
                       model_arrays(load_torchvision_densenet(tmp_path / "current.npz", 10)))

    both = state_dict | {"features.denseblock1.denselayer2.norm.1.weight": state_dict[
        "features.denseblock1.denselayer2.norm1.weight"]}
    with pytest.raises(StateDictMismatchError, match=r"features\.denseblock1\.denselayer2\.norm1\.weight"):
        convert_state_dict(both, abstract_densenet(TINY, 10))


# --------------------------------------------------------------------------------------------------------------
# Files.

def test_npz_and_safetensors_load_the_same_model(tmp_path):
    import safetensors.numpy

    state_dict = random_state_dict(TINY, 10)
    np.savez(tmp_path / "w.npz", **state_dict)
    safetensors.numpy.save_file(state_dict, str(tmp_path / "w.safetensors"))
    from_npz = load_torchvision_densenet(tmp_path / "w.npz", num_classes=10)  # arch inferred
    from_safetensors = load_torchvision_densenet(tmp_path / "w.safetensors", num_classes=10, arch=TINY)
    assert from_npz.spec == TINY
    expected = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    assert_same_arrays(to_torchvision_state_dict(from_npz), expected)
    assert_same_arrays(model_arrays(from_safetensors), model_arrays(from_npz))

    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3), dtype=np.float32)
    from_npz.eval()
    logits = np.asarray(nnx.jit(lambda m, images: m(images))(from_npz, x))
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))


def test_num_classes_none_drops_the_classifier(tmp_path):
    state_dict = random_state_dict(TINY, 10)
    np.savez(tmp_path / "with_head.npz", **state_dict)
    model = load_torchvision_densenet(tmp_path / "with_head.npz", num_classes=None)
    assert model.classifier is None
    _, dropped = convert.densenet_from_state_dict(state_dict, num_classes=None)
    assert {"classifier.weight", "classifier.bias"} <= set(dropped)

    headless = random_state_dict(TINY, None)
    np.savez(tmp_path / "headless.npz", **headless)
    assert load_torchvision_densenet(tmp_path / "headless.npz", num_classes=None).classifier is None
    with pytest.raises(StateDictMismatchError) as error:
        load_torchvision_densenet(tmp_path / "headless.npz", num_classes=10)
    assert mismatch_lines(str(error.value), "missing keys") == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_corrupt_files_name_the_file(tmp_path, suffix):
    import safetensors.numpy

    path = tmp_path / f"w{suffix}"
    state_dict = random_state_dict(TINY, 10)
    if suffix == ".npz":
        np.savez(path, **state_dict)
    else:
        safetensors.numpy.save_file(state_dict, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointReadError, match=re.escape(str(path))):
        load_torchvision_densenet(path, 10)
    path.write_bytes(b"not a weights file at all")
    with pytest.raises(CheckpointReadError, match=re.escape(str(path))):
        load_torchvision_densenet(path, 10)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.npz"))):
        load_torchvision_densenet(tmp_path / "absent.npz")
    (tmp_path / "w.h5").write_bytes(b"\x89HDF")
    with pytest.raises(CheckpointReadError, match=r"w\.h5.*unsupported.*\.safetensors"):
        load_torchvision_densenet(tmp_path / "w.h5")


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_pth_is_read_without_torch(tmp_path, layout):
    """A torchvision state dict in either torch layout (written here without torch) loads like the npz."""
    import torch_files

    state_dict = random_state_dict(TINY, 10)
    torch_files.write_state_dict(tmp_path / "w.pth", state_dict, layout)
    np.savez(tmp_path / "w.npz", **state_dict)
    assert_same_arrays(model_arrays(load_torchvision_densenet(tmp_path / "w.pth", 10)),
                       model_arrays(load_torchvision_densenet(tmp_path / "w.npz", 10)))


# --------------------------------------------------------------------------------------------------------------
# Mismatches: every offending key is named.

def test_missing_extra_and_misshaped_keys_are_all_reported(tmp_path):
    state_dict = random_state_dict(TINY, 10)
    del state_dict["features.denseblock2.denselayer1.conv1.weight"]
    del state_dict["features.norm5.running_var"]
    state_dict["features.denseblock9.denselayer1.conv1.weight"] = np.zeros((4, 4, 1, 1), np.float32)
    state_dict["fc.weight"] = np.zeros((10, 32), np.float32)
    state_dict["features.transition2.conv.weight"] = np.zeros((20, 40, 1, 1), np.float32)
    state_dict["classifier.weight"] = np.zeros((14, 32), np.float32)
    path = tmp_path / "damaged.npz"
    np.savez(path, **state_dict)
    with pytest.raises(StateDictMismatchError) as error:
        load_torchvision_densenet(path, num_classes=10, arch="densenet_tiny")
    message = str(error.value)
    assert str(path) in message
    assert mismatch_lines(message, "missing keys") == {"features.denseblock2.denselayer1.conv1.weight",
                                                       "features.norm5.running_var"}
    assert mismatch_lines(message, "unexpected keys") == {"features.denseblock9.denselayer1.conv1.weight",
                                                          "fc.weight"}
    assert mismatch_lines(message, "shape mismatches") == {"features.transition2.conv.weight", "classifier.weight"}
    assert "(14, 32)" in message and "(10, 32)" in message


def test_another_depth_lists_every_difference():
    state_dict = shape_only_state_dict(SPECS["densenet121"], 1000)
    with pytest.raises(StateDictMismatchError) as error:
        convert_state_dict(state_dict, abstract_densenet("densenet169", 1000), what="dn121.pth")
    message = str(error.value)
    layout_169 = torchvision_layout(SPECS["densenet169"], 1000)
    shared = state_dict.keys() & layout_169.keys()
    optional = {k for k in layout_169 if k.endswith("num_batches_tracked")}
    assert "dn121.pth does not fit densenet169" in message and "looks like densenet121" in message
    assert mismatch_lines(message, "missing keys") == layout_169.keys() - state_dict.keys() - optional
    assert mismatch_lines(message, "shape mismatches") == {k for k in shared if state_dict[k].shape
                                                           != layout_169[k]}
    assert len(mismatch_lines(message, "shape mismatches")) > 0
    assert mismatch_lines(message, "unexpected keys") == set()


def test_another_architecture_is_refused(tmp_path):
    resnet_like = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32), "fc.weight": np.zeros((1000, 512), np.float32)}
    np.savez(tmp_path / "resnet.npz", **resnet_like)
    with pytest.raises(StateDictMismatchError, match=r"resnet\.npz.*cannot infer a DenseNet.*arch="):
        load_torchvision_densenet(tmp_path / "resnet.npz")
    with pytest.raises(StateDictMismatchError) as error:
        load_torchvision_densenet(tmp_path / "resnet.npz", num_classes=10, arch="densenet_tiny")
    message = str(error.value)
    assert mismatch_lines(message, "unexpected keys") == {"conv1.weight", "fc.weight"}
    assert len(mismatch_lines(message, "missing keys")) == len(
        [k for k in torchvision_layout(TINY, 10) if not k.endswith("num_batches_tracked")])


# --------------------------------------------------------------------------------------------------------------
# Backbone checkpoints.

@pytest.fixture(scope="module")
def tiny_imported(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.npz"
    np.savez(path, **random_state_dict(TINY, 10, seed=3))
    return load_torchvision_densenet(path, num_classes=10)


def test_backbone_round_trip_into_metachexnet(tmp_path, tiny_imported):
    dest = save_backbone(tiny_imported, tmp_path / "init", source="tiny.npz")
    metadata = json.loads((dest / "metadata.json").read_text())
    assert metadata == {"format": "metachex_jax.backbone/1", "arch": "densenet_tiny",
                        "spec": {"growth_rate": 8, "block_config": [2, 2, 2, 2], "num_init_features": 16,
                                 "bn_size": 2},
                        "num_features": 32, "in_channels": 3, "num_params": metadata["num_params"],
                        "source": "tiny.npz"}
    torch_parameters = [v for k, v in to_torchvision_state_dict(tiny_imported).items()
                        if k.rsplit(".", 1)[1] in ("weight", "bias") and not k.startswith("classifier")]
    assert metadata["num_params"] == sum(v.size for v in torch_parameters)
    assert [p.name for p in tmp_path.iterdir()] == ["init"]  # no staging directory left behind

    model = MetaChexNet("densenet_tiny", rngs=nnx.Rngs(1))
    heads_before = nnx.to_pure_dict(nnx.state(model.pathology_head))
    assert load_backbone(dest, model) == metadata
    expected = {k: v for k, v in model_arrays(tiny_imported).items() if k[0] != "classifier"}
    assert_same_arrays(model_arrays(model.backbone), expected)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model.pathology_head)), heads_before)


def test_backbone_loads_into_a_bare_densenet_keeping_its_classifier(tmp_path, tiny_imported):
    dest = save_backbone(MetaChexNet("densenet_tiny", rngs=nnx.Rngs(4)), tmp_path / "init", source="scratch")
    model = DenseNet("densenet_tiny", num_classes=5, rngs=nnx.Rngs(5))
    classifier_before = np.asarray(model.classifier.kernel[...])
    saved_conv0 = MetaChexNet("densenet_tiny", rngs=nnx.Rngs(4)).backbone.conv0.kernel[...]
    assert not np.array_equal(model.conv0.kernel[...], saved_conv0)
    load_backbone(dest, model)
    np.testing.assert_array_equal(model.classifier.kernel[...], classifier_before)
    np.testing.assert_array_equal(model.conv0.kernel[...], saved_conv0)


def test_save_backbone_refuses_to_overwrite_unless_asked(tmp_path, tiny_imported):
    dest = save_backbone(tiny_imported, tmp_path / "init", source="first")
    with pytest.raises(FileExistsError, match="init"):
        save_backbone(tiny_imported, dest, source="second")
    assert json.loads((dest / "metadata.json").read_text())["source"] == "first"
    save_backbone(tiny_imported, dest, source="second", overwrite=True)
    assert json.loads((dest / "metadata.json").read_text())["source"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init"]
    load_backbone(dest, DenseNet("densenet_tiny", num_classes=None, rngs=nnx.Rngs(0)))

    unrelated = tmp_path / "results"
    unrelated.mkdir()
    (unrelated / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="results exists and is not a backbone checkpoint"):
        save_backbone(tiny_imported, unrelated, source="third", overwrite=True)
    assert (unrelated / "keep.txt").read_text() == "precious"


def test_load_backbone_lists_every_mismatch(tmp_path, tiny_imported):
    dest = save_backbone(tiny_imported, tmp_path / "init", source="tiny")
    deeper = DenseNetSpec(8, (2, 2, 3, 2), 16, bn_size=2)  # one more layer in block 3 shifts later widths
    with pytest.raises(StateDictMismatchError) as error:
        load_backbone(dest, DenseNet(deeper, num_classes=None, rngs=nnx.Rngs(0)))
    message = str(error.value)
    assert "arch densenet_tiny" in message and str(dest) in message
    assert mismatch_lines(message, "missing keys") == {f"blocks.2.layers.2.{m}.{v}" for m, v in [
        ("norm1", "scale"), ("norm1", "bias"), ("norm1", "mean"), ("norm1", "var"), ("conv1", "kernel"),
        ("norm2", "scale"), ("norm2", "bias"), ("norm2", "mean"), ("norm2", "var"), ("conv2", "kernel")]}
    assert mismatch_lines(message, "unexpected keys") == set()
    assert {"transitions.2.conv.kernel", "norm5.scale", "blocks.3.layers.0.conv1.kernel"} <= mismatch_lines(
        message, "shape mismatches")

    wider = DenseNetSpec(8, (2, 2, 2, 2), 16, bn_size=4)  # same keys, different widths: still refused
    with pytest.raises(StateDictMismatchError, match=r"shape mismatches"):
        load_backbone(dest, DenseNet(wider, num_classes=None, rngs=nnx.Rngs(0)))


def test_load_backbone_refuses_other_directories(tmp_path, tiny_imported):
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        load_backbone(tmp_path, tiny_imported)
    dest = save_backbone(tiny_imported, tmp_path / "init", source="tiny")
    (dest / "manifest.ocdbt").write_bytes(b"garbage")  # orbax's index of the array data
    with pytest.raises(CheckpointReadError, match=re.escape(str(dest))):
        load_backbone(dest, tiny_imported)
    (dest / "metadata.json").write_text(json.dumps({"format": "something/else"}))
    with pytest.raises(CheckpointReadError, match="something/else"):
        load_backbone(dest, tiny_imported)


def test_cli_converts_and_refuses_bad_input(tmp_path, capsys):
    np.savez(tmp_path / "w.npz", **random_state_dict(TINY, 10))
    args = [str(tmp_path / "w.npz"), str(tmp_path / "out")]
    assert convert_torchvision.main(args) == 0
    printed = capsys.readouterr().out
    assert "densenet_tiny" in printed and str(tmp_path / "out") in printed
    layout = torchvision_layout(TINY, 10)
    counters = sum(k.endswith("num_batches_tracked") for k in layout)
    assert f"{len(layout)} tensors read, {counters + 2} dropped" in printed  # + classifier weight and bias
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["source"] == str(tmp_path / "w.npz")

    assert convert_torchvision.main(args) == 1
    assert "already exists" in capsys.readouterr().err
    assert convert_torchvision.main(args + ["--arch", "densenet121", "--overwrite"]) == 1
    assert "does not fit densenet121" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["arch"] == "densenet_tiny"


# --------------------------------------------------------------------------------------------------------------
# Parity with torchvision (needs torch + torchvision).

def torchvision_model_with_statistics(torchvision, torch, spec: DenseNetSpec, num_classes: int, size: int):
    """A torchvision DenseNet with random affine BatchNorm parameters and running statistics accumulated over
    a few train-mode forwards (cumulative average), so every mapped tensor is non-trivial."""
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(spec.growth_rate, spec.block_config, spec.num_init_features,
                                        spec.bn_size, num_classes=num_classes)
    return with_random_batchnorm(torch, model, lambda: model(torch.randn(4, 3, size, size)))


def with_random_batchnorm(torch, model, forward):
    """`model` (a torch DenseNet) with random BatchNorm affine parameters and classifier bias, and running
    statistics averaged over three train-mode calls of `forward`; returned in eval mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.normal_(module.bias, 0.0, 0.1)
            module.momentum = None  # cumulative average
    torch.nn.init.normal_(model.classifier.bias)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            forward()
    return model.eval()


def check_parity(tmp_path, spec, num_classes, size) -> float:
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision_model_with_statistics(torchvision, torch, spec, num_classes, size)
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = reference(x).numpy()

    model = load_torchvision_densenet(tmp_path / "w.pth", num_classes=num_classes)
    assert model.spec == spec
    model.eval()
    logits = np.asarray(nnx.jit(lambda m, images: m(images))(model, x.permute(0, 2, 3, 1).numpy()))
    max_diff = float(np.abs(logits - expected).max())
    print(f"\nparity {convert.describe(spec)} {size}px: max |logit diff| = {max_diff:.2e}, "
          f"max |logit| = {np.abs(expected).max():.2f}")
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
    return max_diff


def test_synthetic_layout_matches_torchvision():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):  # shapes only, no initialisation
        built = {name: getattr(torchvision.models, name)() for name in
                 ("densenet121", "densenet169", "densenet201", "densenet161")}
        built["densenet_tiny"] = torchvision.models.DenseNet(8, (2, 2, 2, 2), 16, 2)
    for name, model in built.items():
        actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert actual == torchvision_layout(SPECS[name], 1000), name


def test_parity_with_torchvision_tiny(tmp_path):
    check_parity(tmp_path, TINY, num_classes=10, size=32)


@pytest.mark.slow
def test_parity_with_torchvision_densenet121(tmp_path):
    check_parity(tmp_path, SPECS["densenet121"], num_classes=1000, size=64)


def test_pth_reading_runs_no_code_and_errors_name_the_file(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "truncated.pth"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in random_state_dict(TINY, 10).items()}, path)
    assert load_torchvision_densenet(path, 10).spec == TINY
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointReadError, match=re.escape(str(path))):
        load_torchvision_densenet(path, 10)

    torch.save({"features.conv0.weight": torch.zeros(2), "payload": Payload()}, tmp_path / "evil.pth")
    Payload.ran = False
    with pytest.raises(CheckpointReadError, match=re.escape(str(tmp_path / "evil.pth"))):
        load_torchvision_densenet(tmp_path / "evil.pth")
    assert not Payload.ran
    (tmp_path / "w.pth").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointReadError, match=re.escape(str(tmp_path / "w.pth"))):
        load_torchvision_densenet(tmp_path / "w.pth")
    torch.save({"state_dict": {"a": torch.zeros(1)}, "epoch": 3}, tmp_path / "training.pth")
    with pytest.raises(CheckpointReadError, match=r"training\.pth is not a flat state dict.*'state_dict'.*'epoch'"):
        load_torchvision_densenet(tmp_path / "training.pth")


class Payload:
    """Unpickling this would run `__setstate__`; weights_only loading must refuse it instead."""

    ran = False

    def __init__(self):
        self.armed = True

    def __setstate__(self, state):
        Payload.ran = True
