"""The safe torch-file reader: both layouts, state dicts and whole pickled modules, nothing from the file run.

Files are written two ways: opcode by opcode without torch (`torch_files`, so these run in CI), and, where torch is
installed, by `torch.save` itself in both layouts (`_use_new_zipfile_serialization=False` for the legacy one).
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import torch_files
import torch_fuzz
from metachex_jax.interop import torch_pickle
from metachex_jax.interop.torch_pickle import TorchFileError
from torch_files import Strided, global_, opcodes

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
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "hi")
    with pytest.raises(TorchFileError, match="not a torch file: 0 data.pkl"):
        torch_pickle.read_state_dict(tmp_path / "other.zip")


def test_tensor_outside_its_storage_and_non_state_dicts_are_refused(tmp_path):
    storage = np.zeros(4, np.float32)
    torch_files.write_state_dict(tmp_path / "w.pt", {"a": Strided(storage, 0, (5,), (1,))}, "zip")  # past the end
    with pytest.raises(TorchFileError, match=re.escape(f"{tmp_path / 'w.pt'}: tensor (5,)") + ".*reaches element 4, "
                       "but the storage holds 4"):
        torch_pickle.load(tmp_path / "w.pt")
    training = {"epoch": torch_files.Raw(b"K\x03"), "model": sample_state_dict()}
    torch_files.write_state_dict(tmp_path / "ckpt.pt", {}, "zip", extra=training)
    with pytest.raises(TorchFileError, match=re.escape("offending entries: 'epoch' (int), 'model' (dict with keys")):
        torch_pickle.read_state_dict(tmp_path / "ckpt.pt")


def brute_force(view: Strided) -> np.ndarray:
    """A view's values element by element: storage[offset + sum(index * stride)]."""
    values = [view.storage[view.offset + sum(i * s for i, s in zip(index, view.stride))]
              for index in np.ndindex(*view.size)]
    return np.array(values, view.storage.dtype).reshape(view.size)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_views_strides_and_bools_are_read_as_torch_defines_them(tmp_path, layout):
    storage = np.arange(24, dtype=np.float64)
    views = {"transposed": Strided(storage, 2, (3, 4), (1, 5)), "slice": Strided(storage, 6, (2, 3), (6, 1)),
             "expanded": Strided(storage, 1, (2, 3), (0, 2)),
             "unit_dim": Strided(storage, 0, (1, 4), (2**62, 1)),  # a size-1 dim's stride is never used
             "empty_at_end": Strided(storage, 24, (0, 5), (5, 1))}
    bools = np.frombuffer(bytes([0, 1, 2, 255]), np.uint8).view(np.bool_)  # torch reads any non-zero byte as True
    torch_files.write_state_dict(tmp_path / "v.pt", {**views, "mask": bools}, layout)
    got = torch_pickle.read_state_dict(tmp_path / "v.pt")
    assert_same({k: v for k, v in got.items() if k != "mask"}, {k: brute_force(v) for k, v in views.items()})
    assert got["mask"].tolist() == [False, True, True, True] and set(got["mask"].view(np.uint8).tolist()) == {0, 1}


# --------------------------------------------------------------------------------------------------------------
# Crafted files: what a file can do to the reader.

GOOD = {"w": np.array([1.5, -2, 3.25, 4], np.float32)}

ATTACKS = {  # torch_files.attacks(), and what the reader says of each
    "storage_type_dict_state": "sets the state of StorageType",
    "function_slot_state": "sets the state of <known torch._utils._rebuild_tensor_v2>",
    "ordered_dict_class_state": "sets the state of <known collections.OrderedDict>",
    "setitem_on_storage_type": "sets items of StorageType",
    "append_to_torch_size": "appends to <known torch.Size>",
    "newobj_of_set": "instantiates <known builtins.set>",
    "call_a_storage_type": "calls StorageType",
    "shadow_ordered_dict_method": "sets the state of OrderedDict",
    "build_twice": "builds <record a.B> twice",
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_crafted_file_cannot_change_what_later_files_read(tmp_path, attack):
    """Reported: a 44-byte file made a later file's [1.5, -2, 3.25, 4] read as [0, 1.94, 0, -2]."""
    body, message = torch_files.attacks()[attack], ATTACKS[attack]
    before = torch_fuzz.state_of()
    (tmp_path / "crafted.pt").write_bytes(b"\x80\x02" + body + b".")  # read as the legacy layout's first pickle
    pickled, storages = torch_files.state_dict_pickle(GOOD, "zip")  # the same inside a torch zip file
    (tmp_path / "crafted.zip.pt").write_bytes(torch_files.encode(pickled[:2] + body + b"0" + pickled[2:], storages,
                                                                 "zip")[0])
    errors = {}
    for name in ("crafted.pt", "crafted.zip.pt"):
        try:
            torch_pickle.load(tmp_path / name)
        except TorchFileError as e:
            errors[name] = str(e)
    for layout in LAYOUTS:  # then good files, in the same process
        torch_files.write_state_dict(tmp_path / f"good_{layout}.pt", GOOD, layout)
        assert_same(torch_pickle.read_state_dict(tmp_path / f"good_{layout}.pt"), GOOD)
    assert torch_fuzz.state_of() == before
    for name in ("crafted.pt", "crafted.zip.pt"):
        assert errors.get(name, "").startswith(f"{tmp_path / name}: ") and message in errors[name], errors.get(name)


class Point:
    """A class of the file's author: the reader must record, not import, it."""

    def __init__(self, x, y):
        self.x, self.y = x, y


class PointWithNewArgs(Point):
    def __getnewargs_ex__(self):  # pickled with NEWOBJ_EX from protocol 4 on
        return (self.x,), {"y": self.y}

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol_reads_values_and_records_objects(tmp_path, protocol):
    values = {"list": [1, -2, (3, 4.5)], "set": {1, 2}, "frozen": frozenset({3}), "none": None, "flag": True,
              "big": 2**70, "text": "x" * 70000, "nested": {"a": [{"b": ()}]}}
    if protocol >= 3:
        values["bytes"] = b"\x00\xff"
    objects = [Point(1, [2])] + ([PointWithNewArgs(3, 4)] if protocol >= 4 else [])  # (NEWOBJ_EX)
    data = pickle.dumps([values, objects], protocol=protocol)
    (tmp_path / "p.pt").write_bytes(torch_files.encode(data, {}, "legacy")[0])
    got_values, got_objects = torch_pickle.load(tmp_path / "p.pt")
    assert got_values == pickle.loads(data)[0]  # the C unpickler as the reference
    for got, obj in zip(got_objects, objects):
        assert isinstance(got, torch_pickle.Record) and got.qualname == f"{__name__}.{type(obj).__name__}"
        assert got.state == vars(obj)


# --------------------------------------------------------------------------------------------------------------
# Files made to exhaust the reader: each is refused quickly, with bounded memory, and the process lives.

def module_opcodes(children: dict[str, bytes], memo: int) -> bytes:
    """A pickled module whose submodules are `children` (opcodes), remembered at memo index `memo`."""
    empty = global_("collections", "OrderedDict") + b")R"
    modules = empty + (b"(" + b"".join(opcodes(k) + v for k, v in children.items()) + b"u" if children else b"")
    return (global_("torch.nn", "Module") + b")\x81" + b"r" + memo.to_bytes(4, "little") + b"}("
            + opcodes("_parameters") + empty + opcodes("_buffers") + empty + opcodes("_modules") + modules + b"ub")


def write_pickle(path: Path, body: bytes, layout: str = "zip") -> Path:
    path.write_bytes(torch_files.encode(b"\x80\x02" + body + b".", {}, layout)[0])
    return path


def test_a_key_nested_a_million_deep_is_refused_without_crashing_the_process(tmp_path):
    """Hashing such a tuple overflows CPython's C stack (a segmentation fault), so it is run in another process."""
    path = write_pickle(tmp_path / "deep.pt", b"}" + b")" + b"\x85" * 1_000_000 + b"Ns")
    code = ("import sys\nfrom metachex_jax.interop import torch_pickle\ntry:\n    torch_pickle.load(sys.argv[1])\n"
            "except torch_pickle.TorchFileError as e:\n    print(e)\n")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{path}: a dict key or set element" in result.stdout


def test_work_and_memory_stay_proportional_to_the_file(tmp_path):
    n = 3000  # one list of n items, set() of it n times: n^2 copies from 6n bytes
    body = (b"(" + b"K\x01" * n + b"lq\x00" + global_("builtins", "set") + b"q\x01" + b"0" * 2
            + b"h\x01h\x00\x85R0" * n + b"N")
    with pytest.raises(TorchFileError, match="more copying than its size allows"):
        torch_pickle.load(write_pickle(tmp_path / "copies.pt", body))
    with pytest.raises(TorchFileError, match="BYTEARRAY8"):  # protocol 5's bytearray: allocates what it declares
        torch_pickle.load(write_pickle(tmp_path / "bytearray.pt", b"\x96" + (2**62).to_bytes(8, "little")))
    huge = Strided(np.zeros(1, np.float32), 0, (10**6, 10**6), (0, 0))  # 4 TB from a stride-0 tensor
    torch_files.write_state_dict(tmp_path / "expanded.pt", {"a": huge}, "zip")
    with pytest.raises(TorchFileError, match=r"holds tensors of 4000000000000 bytes, more than the \d+ allowed"):
        torch_pickle.read_state_dict(tmp_path / "expanded.pt")


def test_module_trees_that_loop_or_explode_are_refused(tmp_path):
    looping = module_opcodes({"self": b"h\x00"}, memo=0)  # a module that is its own submodule
    with pytest.raises(TorchFileError, match="submodule 'self' contains itself"):
        torch_pickle.read_state_dict(write_pickle(tmp_path / "loop.pt", looping))
    body = module_opcodes({}, memo=0)
    for level in range(1, 41):  # each level holds the one below twice: 2^40 paths
        below = b"h" + bytes([level - 1])
        body += b"0" + module_opcodes({"a": below, "b": below}, memo=level)
    with pytest.raises(TorchFileError, match="more than 1000000 entries"):
        torch_pickle.read_state_dict(write_pickle(tmp_path / "shared.pt", body))


def zip_with_member_renamed_in_the_directory(data: bytes, old: bytes, new: bytes) -> bytes:
    directory = data.rindex(b"PK\x01\x02" + data[data.index(b"PK\x01\x02") + 4:][:0])
    central = data.index(b"PK\x01\x02")
    assert len(old) == len(new) and data[central:].count(old) == 1 and directory >= 0
    return data[:central] + data[central:].replace(old, new)


def test_damaged_or_crafted_zip_archives_are_refused_naming_the_file(tmp_path):
    pickled, storages = torch_files.state_dict_pickle(GOOD, "zip")
    data, _ = torch_files.encode(pickled, storages, "zip", byteorder="big")
    (tmp_path / "big.pt").write_bytes(data)
    assert_same(torch_pickle.read_state_dict(tmp_path / "big.pt"), GOOD)
    # Its tensor's bytes damaged: the member's CRC-32 fails.
    at = data.index(GOOD["w"].astype(">f4").tobytes())
    (tmp_path / "flipped.pt").write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
    # The byteorder member's name damaged in the central directory only: reading it as little-endian would give
    # other numbers without an error; its local header still names it.
    (tmp_path / "renamed.pt").write_bytes(zip_with_member_renamed_in_the_directory(data, b"archive/byteorder",
                                                                                   b"archive/byteordes"))
    with zipfile.ZipFile(tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/data/0", GOOD["w"].tobytes())
    for name, message in [("flipped.pt", "Bad CRC-32"), ("renamed.pt", "differ"),
                          ("deflated.pt", "is compressed (method 8); torch stores its members")]:
        with pytest.raises(TorchFileError, match=re.escape(f"{tmp_path / name}: ") + ".*" + re.escape(message)):
            torch_pickle.read_state_dict(tmp_path / name)


def test_a_legacy_storage_of_another_size_than_the_pickle_says_is_refused(tmp_path):
    pickled, storages = torch_files.state_dict_pickle(GOOD, "legacy")
    data, raw = torch_files.encode(pickled, storages, "legacy")
    count = raw[0].start - 8
    longer = data[:count] + (5).to_bytes(8, "little") + data[count + 8:] + b"\x00" * 4
    (tmp_path / "longer.pt").write_bytes(longer)
    with pytest.raises(TorchFileError, match="storage '0' is stored with 5 elements, the pickle says 4"):
        torch_pickle.read_state_dict(tmp_path / "longer.pt")


def test_what_torchs_own_unpickler_refuses_is_refused(tmp_path):
    """The reader runs the pure-Python unpickler, which accepts a few things the C one (torch's) does not; found
    by the fuzzer against the C unpickler."""
    tensor = (global_("torch._utils", "_rebuild_tensor_v2") + b"((" + opcodes("storage")
              + global_("torch", "FloatStorage"))
    cases = {
        "empty global name": (b"ccollections\n\n)R", "names a global 'collections'.'' with an empty part"),
        "a frame longer than the file": (b"\x95" + (1000).to_bytes(8, "little") + b"N", "a pickle frame of 1000 bytes"),
        "values left on the stack": (b"NN", "ends with unused values on its stack"),
        "a bool as a size": (tensor + opcodes("0") + opcodes("cpu") + b"K\x01tQK\x00\x88\x85K\x01\x85tR",
                             "tensor size is a bool"),
    }
    for name, (body, message) in cases.items():
        with pytest.raises(TorchFileError, match=re.escape(message)):
            torch_pickle.load(write_pickle(tmp_path / f"{name}.pt", body))


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
