"""An independent decoder of torch files, for differential tests of `metachex_jax.interop.torch_pickle`.

    state_dict = reference_state_dict(data)   # raises Refused (malformed) or Unchecked (declined)

Python's C unpickler (the reader under test uses the pure-Python one, with its own opcodes), torch's rebuild
functions written here from torch's documentation (`torch/serialization.py`, `torch/_utils.py`), and tensors
gathered element by element with explicit index arithmetic (no stride tricks). Unknown classes become inert objects
that record their BUILD state (the semantics the reader promises, so that the two can be compared); names are never
imported, and every load gets fresh objects from `find_class`, so that no file changes what the next one reads.
It is lenient where torch is: the reader may refuse more, never less.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import pickle
import pickletools
import struct
import types
import zipfile

import numpy as np

MAGIC_NUMBER = 0x1950a86a20f9469cfc6c


class Refused(Exception):
    """The reference decoder finds the file malformed."""


class Unchecked(Exception):
    """The reference decoder declines the file (a tensor too large to gather element by element, a memo index
    that would make the C unpickler allocate gigabytes)."""


# torch's storage types: the dtype their bytes are read as (bool: any non-zero byte is True; bfloat16: the high half
# of a float32).
_STORAGE_DTYPES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8",
                   "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
                   "BoolStorage": "u1", "UntypedStorage": "u1", "BFloat16Storage": "<u2"}


class _Inert:
    """An object of a class the reference does not know: records what was done to it, like torch_pickle's Record
    (the semantics the reader promises), so the two can be compared."""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.__dict__["_state"] = None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _inert_class("call")()

    def __setstate__(self, state):
        self.__dict__["_state"] = state.copy() if isinstance(state, dict) else state

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def __setitem__(self, key, value):
        pass


def _inert_class(name: str) -> type:
    return type(name if name.isidentifier() else "Inert", (_Inert,), {})


@dataclasses.dataclass
class _RefStorage:
    name: str  # FloatStorage etc.
    key: str
    numel: int
    view: tuple | None


@dataclasses.dataclass
class _RefTensor:
    storage: _RefStorage
    offset: int
    size: tuple
    stride: tuple


def _ref_rebuild_tensor(storage, offset, size, stride, *_):
    if not isinstance(storage, _RefStorage):
        raise Refused("tensor of a non-storage")
    return _RefTensor(storage, offset, tuple(size), tuple(stride))


def _ref_rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _ref_rebuild_tensor(storage, offset, size, stride)


def _ref_rebuild_from_type_v2(func, new_type, args, state):
    return func(*args) if getattr(func, "func", None) in (_ref_rebuild_tensor, _ref_rebuild_tensor_v2,
                                                          _ref_identity) else _inert_class("from_type")()


def _ref_identity(data, *_):
    return data


def _ref_reconstructor(cls, base, state=None):
    return cls() if isinstance(cls, type) and issubclass(cls, _Inert) else _inert_class("reconstructor")()


_REFERENCE_NAMES = {
    ("torch._utils", "_rebuild_tensor"): _ref_rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _ref_rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _ref_identity,
    ("torch._utils", "_rebuild_parameter_with_state"): _ref_identity,
    ("torch._tensor", "_rebuild_from_type_v2"): _ref_rebuild_from_type_v2,
    ("collections", "OrderedDict"): collections.OrderedDict, ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset, ("torch", "Size"): tuple,
    ("copyreg", "_reconstructor"): _ref_reconstructor,
}


class _ReferenceUnpickler(pickle.Unpickler):
    def __init__(self, stream):
        super().__init__(stream, encoding="utf-8")
        self.storages: dict[str, _RefStorage] = {}

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return types.SimpleNamespace(storage_name=name)  # fresh: nothing a file does to it reaches another file
        function = _REFERENCE_NAMES.get((module, name))
        if function is None:
            return _inert_class(name)
        return function if isinstance(function, type) else functools.partial(function)

    def persistent_load(self, pid):
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]  # torch's _maybe_decode_ascii
        if kind == "module":
            return pid[1]
        if kind != "storage":
            raise Refused(f"persistent id {pid[0]!r}")
        storage_type, key, location, numel = pid[1:5]
        view = pid[5] if len(pid) > 5 else None
        if not isinstance(storage_type, types.SimpleNamespace):
            raise Refused("unknown storage type")
        storage = _RefStorage(storage_type.storage_name, key, numel, view)
        first = self.storages.setdefault(key, storage)
        if (first.name, first.numel) != (storage.name, storage.numel):
            raise Refused("a storage named with two types or sizes")
        return storage


def _decline_memo_bombs(stream: io.BytesIO) -> None:
    """The C unpickler grows its memo to the largest index PUT: a crafted index would allocate gigabytes."""
    start = stream.tell()
    try:
        for op, arg, _ in pickletools.genops(stream):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > 100_000:
                raise Unchecked("a memo index the C unpickler would allocate for")
            if op.name in ("BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER", "EXT1", "EXT2", "EXT4"):
                raise Unchecked(op.name)
    except Unchecked:
        raise
    except Exception:
        pass  # pickletools stops where it cannot parse; the unpickler's verdict is the one that counts
    stream.seek(start)


def _reference_load(stream: io.BytesIO) -> tuple[object, dict]:
    """One pickle from `stream` (a legacy file's goes on after it), and the storages it names."""
    _decline_memo_bombs(stream)
    unpickler = _ReferenceUnpickler(stream)
    return unpickler.load(), unpickler.storages


def _gather(tensor: _RefTensor, data: dict[str, bytes], byteorder: str) -> np.ndarray:
    storage = tensor.storage
    dtype = np.dtype(_STORAGE_DTYPES[storage.name]).newbyteorder(">" if byteorder == "big" else "<")
    raw = data.get(storage.key)
    if raw is None or len(raw) < storage.numel * dtype.itemsize:
        raise Refused("storage missing or short")
    flat = np.frombuffer(raw, dtype, count=storage.numel)
    if storage.view is not None:
        _, start, count = storage.view
        if start < 0 or count < 0 or start + count > storage.numel:
            raise Refused("storage view outside its storage")
        flat = flat[start:start + count]
    size, stride, offset = tensor.size, tensor.stride, tensor.offset
    if not all(type(v) in (int, bool) for v in (offset, *size, *stride)) or len(size) != len(stride):
        raise Refused("malformed geometry")
    if min((offset, *size, *stride), default=0) < 0 or len(size) > 64:
        raise Refused("negative geometry")
    if 0 in size:
        values = np.zeros(size, dtype)
    else:
        if np.prod([float(n) for n in size]) > 2**16:
            raise Unchecked("tensor too large to gather element by element")
        index = np.full(size, offset, dtype=object)  # Python ints: no overflow
        for axis, (n, s) in enumerate(zip(size, stride)):
            shape = [1] * len(size)
            shape[axis] = n
            index = index + np.arange(n, dtype=object).reshape(shape) * s
        if index.size and int(index.max()) >= len(flat):
            raise Refused("tensor outside its storage")
        values = flat[index.astype(np.int64)] if index.size else np.zeros(size, dtype)
    values = values.astype(dtype.newbyteorder("="))
    if storage.name == "BFloat16Storage":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values != 0 if storage.name == "BoolStorage" else values


def _state_dict(obj, prefix: str = "") -> dict:
    if isinstance(obj, _Inert):
        state = obj.__dict__["_state"]
        if not (isinstance(state, dict) and all(isinstance(state.get(k), dict)
                                                for k in ("_parameters", "_buffers", "_modules"))):
            raise Refused("not a module")
        transient = state.get("_non_persistent_buffers_set") or set()
        out = {}
        for name, value in state["_parameters"].items():
            if value is not None:
                out[prefix + name] = value
        for name, value in state["_buffers"].items():
            if value is not None and name not in transient:
                out[prefix + name] = value
        for name, child in state["_modules"].items():
            if child is not None:
                out.update(_state_dict(child, f"{prefix}{name}."))
        return out
    if isinstance(obj, dict):
        return dict(obj)
    raise Refused(f"a {type(obj).__name__}")


def reference_state_dict(data: bytes) -> dict[str, np.ndarray]:
    """The state dict of a torch file as an independent decoder reads it; `Refused` or `Unchecked` otherwise."""
    try:
        return _reference_state_dict(data)
    except (Refused, Unchecked):
        raise
    except RecursionError as e:
        raise Unchecked("nested too deep for the reference") from e
    except Exception as e:
        raise Refused(f"{type(e).__name__}: {e}") from e


def _reference_state_dict(data: bytes) -> dict[str, np.ndarray]:
    if data[:4] == b"PK\x03\x04":
        archive = zipfile.ZipFile(io.BytesIO(data))
        (pickled,) = [n for n in archive.namelist() if n.endswith("data.pkl")]
        prefix = pickled[:-len("data.pkl")]
        byteorder = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in archive.namelist() \
            else "little"
        obj, storages = _reference_load(io.BytesIO(archive.read(pickled)))
        raw = {key: archive.read(f"{prefix}data/{key}") for key in storages}
    else:
        stream = io.BytesIO(data)
        if _reference_load(stream)[0] != MAGIC_NUMBER or _reference_load(stream)[0] != 1001:
            raise Refused("not a legacy torch file")
        _reference_load(stream)
        obj, storages = _reference_load(stream)
        keys = _reference_load(stream)[0]
        raw, byteorder = {}, "little"
        for key in keys:
            storage = storages[key]  # KeyError: stored but not named
            (count,) = struct.unpack("<q", stream.read(8))
            itemsize = np.dtype(_STORAGE_DTYPES[storage.name]).itemsize
            if count != storage.numel or key in raw:
                raise Refused("storage count differs from the pickle's")
            raw[key] = stream.read(count * itemsize)
        if set(storages) - set(raw):
            raise Refused("storage named but not stored")
    tensors = _state_dict(obj)
    if not all(isinstance(key, str) and isinstance(tensor, _RefTensor) for key, tensor in tensors.items()):
        raise Refused("not a flat state dict of tensors")
    return {key: _gather(tensor, raw, byteorder) for key, tensor in tensors.items()}
