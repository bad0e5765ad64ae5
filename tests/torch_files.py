"""Write torch `.pt` files WITHOUT torch, opcode by opcode, so the safe reader is tested where torch is absent (CI).

    write_state_dict(path, {"a.weight": array, ...}, layout="zip" | "legacy")
    write_module(path, state_dict, layout=..., classes=..., extra_state={"payload": exec_call("...")})

The bytes follow torch's own writer (`torch/serialization.py`: `_save` for the zip layout, `_legacy_save` for the
legacy one): a protocol-2 pickle whose tensors are `torch._utils._rebuild_tensor_v2(<persistent id ("storage",
torch.FloatStorage, key, "cpu", numel[, None])>, offset, size, stride, False, OrderedDict())`, parameters wrapped
in `torch._utils._rebuild_parameter`, modules as `NEWOBJ` of their class with their `__dict__` as BUILD state.
Nothing here imports the reader: the files are written independently of the code under test.
"""

from __future__ import annotations

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


def exec_call(code: str) -> Raw:
    """`builtins.exec(code)`: what a malicious pickle does; run by any ordinary unpickler."""
    return Raw(global_("builtins", "exec") + b"(" + _value(code, None) + b"tR")


class _Writer:
    def __init__(self, legacy: bool):
        self.legacy = legacy
        self.storages: dict[str, np.ndarray] = {}

    def tensor(self, array: np.ndarray, parameter: bool = False) -> bytes:
        array = np.array(array, order="C")  # (not ascontiguousarray: it makes 0-d arrays 1-d)
        key = str(len(self.storages))
        self.storages[key] = array
        pid = (b"(" + _value("storage", self) + global_("torch", STORAGE_NAMES[array.dtype]) + _value(key, self)
               + _value("cpu", self) + _value(array.size, self) + (b"N" if self.legacy else b"") + b"tQ")
        stride = tuple(int(np.prod(array.shape[i + 1:])) for i in range(array.ndim))
        out = (global_("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + _value(0, self)
               + _value(tuple(array.shape), self) + _value(stride, self) + b"\x89" + _ordered_dict({}, self) + b"tR")
        if parameter:
            out = (global_("torch._utils", "_rebuild_parameter") + b"(" + out + b"\x88" + _ordered_dict({}, self)
                   + b"tR")
        return out


def _value(value, writer) -> bytes:
    if isinstance(value, Raw):
        return bytes(value)
    if isinstance(value, np.ndarray):
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
    body = b"".join(_value(k, writer) + (writer.tensor(v, parameters) if isinstance(v, np.ndarray)
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


def _write(path, data: bytes, storages: dict, layout: str) -> None:
    if layout == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("archive/data.pkl", data)
            archive.writestr("archive/byteorder", "little")
            for key, array in storages.items():
                archive.writestr(f"archive/data/{key}", array.astype(array.dtype.newbyteorder("<")).tobytes())
            archive.writestr("archive/version", "3\n")
    elif layout == "legacy":
        out = io.BytesIO()
        for header in (MAGIC_NUMBER, 1001, {"protocol_version": 1001, "little_endian": True,
                                            "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(header, out, protocol=2)
        out.write(data)
        keys = sorted(storages)
        pickle.dump(keys, out, protocol=2)
        for key in keys:
            array = storages[key]
            out.write(struct.pack("<q", array.size) + array.astype(array.dtype.newbyteorder("<")).tobytes())
        with open(path, "wb") as f:
            f.write(out.getvalue())
    else:
        raise ValueError(layout)


def write_state_dict(path, state_dict: dict, layout: str = "zip", extra: dict | None = None) -> None:
    """torch.save(OrderedDict(state_dict)) in `layout`; `extra` adds raw entries (e.g. an `exec_call`)."""
    items = {k: np.asarray(v) for k, v in state_dict.items()} | (extra or {})
    data, storages = _pickle(lambda w: _ordered_dict(items, w), layout == "legacy")
    _write(path, data, storages, layout)


def write_module(path, state_dict: dict, layout: str = "zip", classes: dict | None = None,
                 extra_state: dict | None = None) -> None:
    """torch.save(module) in `layout` for a module whose state_dict() is `state_dict` (weights/biases as
    parameters, everything else as buffers). `classes` maps a module path ("" = the root, "features.conv0", ...)
    to its (module, class name); `extra_state` adds attributes to the root module's __dict__."""
    tree = _nest(state_dict)
    classes = {"": ("torchxrayvision.models", "DenseNet"), **(classes or {})}
    data, storages = _pickle(lambda w: _module(tree, w, classes, "", extra_state or {}), layout == "legacy")
    _write(path, data, storages, layout)
