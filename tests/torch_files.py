"""Write torch `.pt` files WITHOUT torch, opcode by opcode, so the safe reader is tested where torch is absent (CI).

    write_state_dict(path, {"a.weight": array, ...}, layout="zip" | "legacy")
    write_module(path, state_dict, layout=..., classes=..., extra_state={"payload": exec_call("...")})
    write_state_dict(path, {"t": Strided(storage, offset, size, stride)})   # a view, as torch writes it
    pickled, storages = state_dict_pickle(...); data, raw = encode(pickled, storages, layout)   # for fuzzers

The bytes follow torch's own writer (`torch/serialization.py`: `_save` for the zip layout, `_legacy_save` for the
legacy one): a protocol-2 pickle whose tensors are `torch._utils._rebuild_tensor_v2(<persistent id ("storage",
torch.FloatStorage, key, "cpu", numel[, None])>, offset, size, stride, False, OrderedDict())`, parameters wrapped
in `torch._utils._rebuild_parameter`, modules as `NEWOBJ` of their class with their `__dict__` as BUILD state.
Nothing here imports the reader: the files are written independently of the code under test.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import struct
import zipfile

import numpy as np

MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
STORAGE_NAMES = {np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
                 np.dtype("float16"): "HalfStorage", np.dtype("int64"): "LongStorage", np.dtype("int32"): "IntStorage",
                 np.dtype("uint8"): "ByteStorage", np.dtype("bool"): "BoolStorage"}
PARAMETER_NAMES = ("weight", "bias")  # everything else is a buffer (running_mean, num_batches_tracked, op_threshs)


class Raw(bytes):
    """Pickle opcodes spliced in as they are (an expression that leaves one value on the stack)."""


def global_(module: str, name: str) -> Raw:
    return Raw(b"c" + f"{module}\n{name}\n".encode())


def opcodes(value) -> Raw:
    """The opcodes of a value made of str, int, float, bool, None, tuples, lists and dicts (no memo)."""
    return Raw(_value(value, None))


def attacks() -> dict[str, Raw]:
    """Crafted opcodes that try to change what the reader hands to later files (each leaves one value on the stack):
    BUILD, SETITEM, APPEND, NEWOBJ and REDUCE on the names a safe reader knows, and a built object built again."""
    return {name: Raw(body) for name, body in {
        # BUILD with a dict state writes a frozen record's __dict__ (the storage type: floats read as halves)
        "storage_type_dict_state": global_("torch", "FloatStorage") + b"}" + opcodes("dtype") + opcodes("<f2")
        + b"sb",
        # BUILD with a (dict, slots) state setattr()s a function (the tensor rebuild: every tensor conjugate)
        "function_slot_state": global_("torch._utils", "_rebuild_tensor_v2") + b"N"
        + opcodes({"__defaults__": (False, None, {"conj": True})}) + b"\x86b",
        "ordered_dict_class_state": global_("collections", "OrderedDict") + b"N" + opcodes({"fromkeys": None})
        + b"\x86b",
        "setitem_on_storage_type": global_("torch", "FloatStorage") + opcodes("dtype") + opcodes("<f2") + b"s",
        "append_to_torch_size": global_("torch", "Size") + b"K\x01a",
        "newobj_of_set": global_("builtins", "set") + b")\x81",
        "call_a_storage_type": global_("torch", "FloatStorage") + b")R",
        "shadow_ordered_dict_method": global_("collections", "OrderedDict") + b")R" + opcodes({"items": None})
        + b"b",
        "build_twice": global_("a", "B") + b")\x81" + opcodes({"x": 1}) + b"b" + opcodes({"x": 2}) + b"b",
    }.items()}


def exec_call(code: str) -> Raw:
    """`builtins.exec(code)`: what a malicious pickle does; run by any ordinary unpickler."""
    return Raw(global_("builtins", "exec") + b"(" + _value(code, None) + b"tR")


@dataclasses.dataclass
class Strided:
    """A tensor viewing `storage` (a 1-d array: one storage of the file, however many tensors view it) from element
    `offset` with `size` and `stride` in elements, as torch writes views and non-contiguous tensors. Nothing is
    checked: a crafted size can reach past the storage."""

    storage: np.ndarray
    offset: int
    size: tuple
    stride: tuple


class _Writer:
    def __init__(self, legacy: bool):
        self.legacy = legacy
        self.storages: dict[str, np.ndarray] = {}
        self.keys: dict[int, str] = {}  # id of a Strided's storage array -> its key

    def tensor(self, array: np.ndarray | Strided, parameter: bool = False) -> bytes:
        if isinstance(array, Strided):
            view, array = array, array.storage
            key = self.keys.setdefault(id(array), str(len(self.storages)))
        else:
            array = np.array(array, order="C")  # (not ascontiguousarray: it makes 0-d arrays 1-d)
            key = str(len(self.storages))
            view = Strided(array, 0, array.shape, tuple(int(np.prod(array.shape[i + 1:])) for i in range(array.ndim)))
        self.storages[key] = array
        pid = (b"(" + _value("storage", self) + global_("torch", STORAGE_NAMES[array.dtype]) + _value(key, self)
               + _value("cpu", self) + _value(array.size, self) + (b"N" if self.legacy else b"") + b"tQ")
        out = (global_("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + _value(view.offset, self)
               + _value(tuple(view.size), self) + _value(tuple(view.stride), self) + b"\x89"
               + _ordered_dict({}, self) + b"tR")
        if parameter:
            out = (global_("torch._utils", "_rebuild_parameter") + b"(" + out + b"\x88" + _ordered_dict({}, self)
                   + b"tR")
        return out


def _value(value, writer) -> bytes:
    if isinstance(value, Raw):
        return bytes(value)
    if isinstance(value, (np.ndarray, Strided)):
        return writer.tensor(value)
    if isinstance(value, dict):
        return b"}(" + b"".join(_value(k, writer) + _value(v, writer) for k, v in value.items()) + b"u"
    if isinstance(value, tuple):
        return b"(" + b"".join(_value(v, writer) for v in value) + b"t"
    if isinstance(value, list):
        return b"](" + b"".join(_value(v, writer) for v in value) + b"e"
    return _scalar(value)


def _scalar(value) -> bytes:
    """str, int, float, bool, None as opcodes: pickle's own, without memo puts, PROTO and STOP stripped."""
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=2)
    pickler.fast = True  # no memo
    pickler.dump(value)
    return out.getvalue()[2:-1]


def _ordered_dict(items: dict, writer, parameters: bool = False) -> bytes:
    body = b"".join(_value(k, writer) + (writer.tensor(v, parameters) if isinstance(v, (np.ndarray, Strided))
                                         else _value(v, writer)) for k, v in items.items())
    return global_("collections", "OrderedDict") + b")R" + (b"(" + body + b"u" if items else b"")


def _module(tree: dict, writer, classes: dict, path: str, extra_state: dict) -> bytes:
    parameters = {k: v for k, v in tree.items() if isinstance(v, np.ndarray) and k in PARAMETER_NAMES}
    buffers = {k: v for k, v in tree.items() if isinstance(v, np.ndarray) and k not in PARAMETER_NAMES}
    children = {k: v for k, v in tree.items() if isinstance(v, dict)}
    module, name = classes.get(path, ("torch.nn.modules.module", "Module"))
    state = b"".join([
        _value("training", writer), _value(False, writer),
        _value("_parameters", writer), _ordered_dict(parameters, writer, parameters=True),
        _value("_buffers", writer), _ordered_dict(buffers, writer),
        _value("_non_persistent_buffers_set", writer), global_("builtins", "set") + b"(](etR",
        _value("_modules", writer),
        global_("collections", "OrderedDict") + b")R" + (b"(" + b"".join(
            _value(k, writer) + _module(v, writer, classes, f"{path}.{k}".lstrip("."), {})
            for k, v in children.items()) + b"u" if children else b""),
        *[_value(k, writer) + _value(v, writer) for k, v in extra_state.items()],
    ])
    return global_(module, name) + b")\x81" + b"}(" + state + b"ub"


def _nest(state_dict: dict) -> dict:
    tree: dict = {}
    for key, value in state_dict.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.asarray(value)
    return tree


def _pickle(body_fn, legacy: bool) -> tuple[bytes, dict]:
    writer = _Writer(legacy)
    body = body_fn(writer)
    return b"\x80\x02" + body + b".", writer.storages


def encode(pickled: bytes, storages: dict, layout: str, byteorder: str = "little") -> tuple[bytes, list[range]]:
    """The file torch would write for a main pickle and its storages (key -> array), and the byte ranges in it that
    hold raw storage bytes (legacy layout; none listed for zip, where every member carries a CRC-32)."""
    order = "<" if byteorder == "little" else ">"
    raw = {key: np.asarray(array).astype(array.dtype.newbyteorder(order)).tobytes() for key, array in storages.items()}
    out = io.BytesIO()
    if layout == "zip":
        members = {"archive/data.pkl": pickled, "archive/byteorder": byteorder.encode(),
                   **{f"archive/data/{key}": data for key, data in raw.items()}, "archive/version": b"3\n"}
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
            for name, data in members.items():  # a fixed date: the same bytes every time
                archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
        return out.getvalue(), []
    if layout != "legacy" or byteorder != "little":
        raise ValueError((layout, byteorder))
    for header in (MAGIC_NUMBER, 1001, {"protocol_version": 1001, "little_endian": True,
                                        "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, out, protocol=2)
    out.write(pickled)
    keys = sorted(storages)
    pickle.dump(keys, out, protocol=2)
    ranges = []
    for key in keys:
        out.write(struct.pack("<q", storages[key].size))
        ranges.append(range(out.tell(), out.tell() + len(raw[key])))
        out.write(raw[key])
    return out.getvalue(), ranges


def state_dict_pickle(state_dict: dict, layout: str = "zip", extra: dict | None = None) -> tuple[bytes, dict]:
    """The main pickle of torch.save(OrderedDict(state_dict)) and its storages (key -> array)."""
    items = {k: v if isinstance(v, Strided) else np.asarray(v) for k, v in state_dict.items()} | (extra or {})
    return _pickle(lambda w: _ordered_dict(items, w), layout == "legacy")


def module_pickle(state_dict: dict, layout: str = "zip", classes: dict | None = None,
                  extra_state: dict | None = None) -> tuple[bytes, dict]:
    """The main pickle of torch.save(module) and its storages (see `write_module`)."""
    tree = _nest(state_dict)
    classes = {"": ("torchxrayvision.models", "DenseNet"), **(classes or {})}
    return _pickle(lambda w: _module(tree, w, classes, "", extra_state or {}), layout == "legacy")


def write_state_dict(path, state_dict: dict, layout: str = "zip", extra: dict | None = None,
                     byteorder: str = "little") -> None:
    """torch.save(OrderedDict(state_dict)) in `layout`; `extra` adds raw entries (e.g. an `exec_call`)."""
    with open(path, "wb") as f:
        f.write(encode(*state_dict_pickle(state_dict, layout, extra), layout, byteorder)[0])


def write_module(path, state_dict: dict, layout: str = "zip", classes: dict | None = None,
                 extra_state: dict | None = None) -> None:
    """torch.save(module) in `layout` for a module whose state_dict() is `state_dict` (weights/biases as
    parameters, everything else as buffers). `classes` maps a module path ("" = the root, "features.conv0", ...)
    to its (module, class name); `extra_state` adds attributes to the root module's __dict__."""
    with open(path, "wb") as f:
        f.write(encode(*module_pickle(state_dict, layout, classes, extra_state), layout)[0])
