"""The safe torch-file reader: both layouts, state dicts and whole pickled modules, nothing from the file run.

Files are written two ways: opcode by opcode without torch (`torch_files`, so these run in CI), and, where torch is
installed, by `torch.save` itself in both layouts (`_use_new_zipfile_serialization=False` for the legacy one).
"""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch_files

from metachex_jax import torch_pickle
from metachex_jax.torch_pickle import TorchFileError

LAYOUTS = ("zip", "legacy")


def sample_state_dict():
    rng = np.random.default_rng(0)
    return {
        "features.conv0.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "features.norm0.weight": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "features.norm0.bias": rng.standard_normal(4).astype(np.float32),
        "features.norm0.running_mean": rng.standard_normal(4).astype(np.float32),
        "features.norm0.running_var": rng.uniform(0.5, 2, 4).astype(np.float32),
        "features.norm0.num_batches_tracked": np.array(7, np.int64),
        "classifier.weight": rng.standard_normal((3, 4)).astype(np.float64),
        "classifier.bias": np.array([1.0, -2.0, 0.5], np.float16),
        "op_threshs": np.array([0.1, np.nan, 0.3], np.float32),
        "mask": np.array([True, False, True]),
    }


def assert_same(got: dict, expected: dict):
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_written_without_torch(tmp_path, layout):
    expected = sample_state_dict()
    torch_files.write_state_dict(tmp_path / "w.pt", expected, layout)
    assert_same(torch_pickle.read_state_dict(tmp_path / "w.pt"), expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_whole_module_written_without_torch(tmp_path, layout):
    expected = sample_state_dict()
    torch_files.write_module(tmp_path / "m.pt", expected, layout)
    obj = torch_pickle.load(tmp_path / "m.pt")
    assert torch_pickle.is_module_record(obj) and obj.qualname == "torchxrayvision.models.DenseNet"
    assert_same(torch_pickle.read_state_dict(tmp_path / "m.pt"), expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_code_in_the_pickle_is_never_run(tmp_path, layout):
    """A pickle that runs code when unpickled normally (shown first) is read without running it."""
    marker = tmp_path / "ran"
    payload = torch_files.exec_call(f"open({str(marker)!r}, 'w').write('ran')")
    torch_files.write_module(tmp_path / "evil.pt", sample_state_dict(), layout, extra_state={"hook": payload})
    torch_files.write_state_dict(tmp_path / "evil_sd.pt", sample_state_dict(), layout, extra={"x": payload})

    # The control: an ordinary unpickler runs the payload (so the test below can fail).
    pickled = torch_files._pickle(lambda w: bytes(payload), legacy=False)[0]
    pickle.loads(pickled)
    assert marker.read_text() == "ran"
    marker.unlink()

    state_dict = torch_pickle.read_state_dict(tmp_path / "evil.pt")  # the payload is an inert module attribute
    assert_same(state_dict, sample_state_dict())
    hook = torch_pickle.load(tmp_path / "evil.pt").state["hook"]
    assert isinstance(hook, torch_pickle.Record) and hook.qualname == "builtins.exec"
    with pytest.raises(TorchFileError, match=r"offending entries: 'x' \(pickled builtins\.exec object\)"):
        torch_pickle.read_state_dict(tmp_path / "evil_sd.pt")
    assert not marker.exists()


def test_damaged_and_foreign_files_are_refused_with_the_reason(tmp_path):
    torch_files.write_state_dict(tmp_path / "zip.pt", sample_state_dict(), "zip")
    torch_files.write_state_dict(tmp_path / "legacy.pt", sample_state_dict(), "legacy")
    for name in ("zip.pt", "legacy.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[:len(data) - 20])
    with pytest.raises(TorchFileError, match="damaged zip archive"):
        torch_pickle.read_state_dict(tmp_path / "cut_zip.pt")
    with pytest.raises(TorchFileError, match="truncated"):
        torch_pickle.read_state_dict(tmp_path / "cut_legacy.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(TorchFileError, match="neither a zip-format nor a legacy-format torch file"):
        torch_pickle.read_state_dict(tmp_path / "text.pt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(TorchFileError, match="not torch's magic number"):
        torch_pickle.read_state_dict(tmp_path / "plain.pkl")
    import zipfile
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "hi")
    with pytest.raises(TorchFileError, match="not a torch file: 0 data.pkl"):
        torch_pickle.read_state_dict(tmp_path / "other.zip")


def test_tensor_outside_its_storage_and_non_state_dicts_are_refused(tmp_path):
    torch_files.write_state_dict(tmp_path / "w.pt", {"a": np.zeros(4, np.float32)}, "zip")
    obj = torch_pickle.load(tmp_path / "w.pt")
    obj["a"].size = (5,)  # a malicious size: would read past the storage
    with pytest.raises(TorchFileError, match="reaches element 4, but the storage holds 4"):
        torch_pickle.state_dict(obj)
    training = {"epoch": torch_files.Raw(b"K\x03"), "model": sample_state_dict()}
    torch_files.write_state_dict(tmp_path / "ckpt.pt", {}, "zip", extra=training)
    with pytest.raises(TorchFileError, match=re.escape("offending entries: 'epoch' (int), 'model' (dict with keys")):
        torch_pickle.read_state_dict(tmp_path / "ckpt.pt")


# --------------------------------------------------------------------------------------------------------------
# Files written by torch itself (skipped without torch).

@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("zip_layout", [True, False], ids=["zip", "legacy"])
def test_files_saved_by_torch(tmp_path, torch, zip_layout):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"plain": torch.randn(3, 5), "transposed": base.t(), "slice": base[1:3, 2:5],  # views of one storage
               "double": torch.randn(2, dtype=torch.float64), "half": torch.randn(4).half(),
               "bf16": torch.randn(4).bfloat16(), "long": torch.tensor([1, -2], dtype=torch.int64),
               "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3)}
    torch.save(tensors, tmp_path / "t.pt", _use_new_zipfile_serialization=zip_layout)
    got = torch_pickle.read_state_dict(tmp_path / "t.pt")
    for key, tensor in tensors.items():
        expected = tensor.float().numpy() if key == "bf16" else tensor.numpy()
        assert got[key].dtype == expected.dtype and got[key].shape == expected.shape, key
        np.testing.assert_array_equal(got[key], expected, err_msg=key)


@pytest.mark.parametrize("zip_layout", [True, False], ids=["zip", "legacy"])
def test_whole_torchxrayvision_module_saved_by_torch(tmp_path, torch, zip_layout):
    xrv = pytest.importorskip("torchxrayvision")
    torch.manual_seed(0)
    model = xrv.models.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2,
                                op_threshs=torch.rand(18))
    model.evil = Exploit()
    Exploit.ran = False
    torch.save(model, tmp_path / "m.pt", _use_new_zipfile_serialization=zip_layout)
    got = torch_pickle.read_state_dict(tmp_path / "m.pt")
    expected = {k: v.numpy() for k, v in model.state_dict().items()}
    assert_same(got, expected)
    assert not Exploit.ran
    # The handmade writer agrees with torch: torch reads our files (weights_only) to the same tensors.
    torch_files.write_state_dict(tmp_path / "ours.pt", expected, "zip" if zip_layout else "legacy")
    theirs = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert_same({k: v.numpy() for k, v in theirs.items()}, expected)


class Exploit:
    """Unpickling this normally calls `Exploit.trigger` (through __reduce__)."""

    ran = False

    def __reduce__(self):
        return (Exploit.trigger, ())

    @staticmethod
    def trigger():
        Exploit.ran = True
        return None
