"""Read PyTorch weight files without PyTorch, and without running anything the file contains.

    state_dict = read_state_dict("nih-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt")  # {key: ndarray}
    obj = load("weights.pt")   # the unpickled object graph, tensors as `TensorRef` (`.numpy()`)

`torch.save` writes one pickle plus the raw bytes of every tensor storage, in one of two layouts:

- **zip** (torch >= 1.6, the default): a zip archive `NAME/data.pkl` (the pickle), `NAME/data/KEY` (one file per
  storage, raw little-endian bytes unless `NAME/byteorder` says "big"), `NAME/version`.
- **legacy** (`_use_new_zipfile_serialization=False`, and torch < 1.6): five things one after another in one
  stream: pickles of a magic number, the protocol version (1001) and system info, the main pickle, a pickle of
  the list of storage keys, then each storage as an 8-byte little-endian element count and its bytes.

In both, the main pickle names each storage by a persistent id `("storage", <torch.FloatStorage etc.>, key,
location, numel[, view])` and rebuilds tensors with `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)`, parameters with `torch._utils._rebuild_parameter(tensor, ...)`.

Why a reader of our own: torchxrayvision's release files (and many research checkpoints) are **whole pickled
modules**, which `torch.load(weights_only=True)` refuses, and `weights_only=False` runs whatever the pickle asks
for. Here the unpickler's `find_class` never imports anything. It knows a short list of names and answers them
with functions of this module (tensor and parameter rebuilds, storage types, `collections.OrderedDict`, `set`,
`torch.Size`); **every other class or function becomes an inert `Record`**: "calling" it only records the
arguments, "building" it only records the state. So a pickled module becomes a tree of Records whose state holds
`_parameters`, `_buffers` and `_modules`, from which `state_dict` collects the tensors with the keys
`module.state_dict()` would give; a pickled `os.system(...)` becomes a Record that did nothing.

Tensors are read as numpy arrays in their dtype (bfloat16 widened to float32, numpy has none). Storage bounds are
checked before any view is made. The tar format of torch < 0.4, sparse, quantized and conjugate/negative-bit
tensors are refused with a message naming them; so is anything truncated or malformed (`TorchFileError`).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL_VERSION = 1001


class TorchFileError(ValueError):
    """The file is not a readable torch file (truncated, malformed, or holding something we do not read)."""


# ---------------------------------------------------------------------------------------------------------------
# What the unpickler builds instead of torch objects.

@dataclasses.dataclass(frozen=True)
class StorageType:
    """Stands for `torch.FloatStorage` etc.: the dtype of a storage's elements."""

    name: str
    dtype: str  # numpy dtype string, little-endian; "bfloat16" for torch.BFloat16Storage

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize


STORAGE_TYPES = {t.name: t for t in (
    StorageType("FloatStorage", "<f4"), StorageType("DoubleStorage", "<f8"), StorageType("HalfStorage", "<f2"),
    StorageType("BFloat16Storage", "bfloat16"), StorageType("LongStorage", "<i8"), StorageType("IntStorage", "<i4"),
    StorageType("ShortStorage", "<i2"), StorageType("CharStorage", "i1"), StorageType("ByteStorage", "u1"),
    StorageType("BoolStorage", "?"), StorageType("UntypedStorage", "u1"))}


@dataclasses.dataclass
class StorageRef:
    """One storage of the file: its bytes are looked up by `key` once the file has been read."""

    key: str
    type: StorageType
    numel: int
    location: str
    table: dict  # key -> bytes (filled after unpickling for the legacy format)
    byteorder: str = "little"
    view: tuple[int, int] | None = None  # legacy storage views: (element offset, element count) into the root

    def data(self) -> memoryview:
        if self.key not in self.table:
            raise TorchFileError(f"storage {self.key!r} is referenced by the pickle but not stored in the file")
        data = memoryview(self.table[self.key])
        expected = self.numel * self.type.itemsize
        if len(data) < expected:
            raise TorchFileError(f"storage {self.key!r} holds {len(data)} bytes, {expected} expected "
                                 "(a truncated file?)")
        if self.view is not None:
            offset, count = self.view
            if offset < 0 or count < 0 or offset + count > self.numel:
                raise TorchFileError(f"storage view {self.view} outside storage {self.key!r} of {self.numel}")
            size = self.type.itemsize
            return data[offset * size:(offset + count) * size]
        return data[:expected]


@dataclasses.dataclass
class TensorRef:
    """A tensor of the file: `numpy()` reads it (a copy, bounds checked)."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.size

    def numpy(self) -> np.ndarray:
        storage = self.storage
        data = storage.data()
        itemsize = storage.type.itemsize
        numel = len(data) // itemsize
        if any(n < 0 for n in self.size) or any(s < 0 for s in self.stride) or self.offset < 0:
            raise TorchFileError(f"tensor of storage {storage.key!r}: negative size, stride or offset "
                                 f"({self.size}, {self.stride}, {self.offset})")
        if len(self.size) != len(self.stride):
            raise TorchFileError(f"tensor of storage {storage.key!r}: size {self.size} and stride {self.stride} "
                                 "differ in length")
        if 0 in self.size:
            return np.zeros(self.size, _numpy_dtype(storage.type))
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= numel:
            raise TorchFileError(f"tensor of storage {storage.key!r} reaches element {last}, but the storage "
                                 f"holds {numel}")
        raw_dtype = "<u2" if storage.type.dtype == "bfloat16" else storage.type.dtype
        dtype = np.dtype(raw_dtype)
        if storage.byteorder == "big":
            dtype = dtype.newbyteorder(">")
        flat = np.frombuffer(data, dtype=dtype, count=numel)
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.size,
                                               tuple(s * itemsize for s in self.stride), writeable=False)
        array = np.array(view, dtype=dtype.newbyteorder("="))
        if storage.type.dtype == "bfloat16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


def _numpy_dtype(storage_type: StorageType) -> np.dtype:
    return np.dtype(np.float32) if storage_type.dtype == "bfloat16" else np.dtype(storage_type.dtype).newbyteorder("=")


class Record:
    """An object of a class this reader does not know: what the pickle said about it, and nothing else.

    `module`/`name` name the class or function; `args` what it was called with; `state` what it was built with
    (BUILD); `items`/`dictitems` what was appended or set on it. Nothing of the named class is imported or run.
    """

    module = "?"
    name = "?"

    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs
        self.state = None
        self.items: list = []
        self.dictitems: dict = {}

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):  # e.g. REDUCE on the result of an inert getattr(...): another record
        return _inert_class(self.module, f"{self.name}(...)")(*args, **kwargs)

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __setitem__(self, key, value):
        self.dictitems[key] = value

    def __repr__(self):
        return f"<record {self.module}.{self.name}>"

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


def _inert_class(module: str, name: str) -> type:
    # A class per name, so that NEWOBJ (`cls.__new__(cls)`) and INST work; it never refers to the real class.
    return type(name if name.isidentifier() else "Record", (Record,), {"module": module, "name": name})


# ---------------------------------------------------------------------------------------------------------------
# The few names the reader answers itself.

def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    if not isinstance(storage, StorageRef):
        raise TorchFileError(f"a tensor rebuild refers to {storage!r}, not to a storage of the file")
    try:
        return TensorRef(storage, int(storage_offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))
    except (TypeError, ValueError) as e:
        raise TorchFileError(f"malformed tensor (offset {storage_offset!r}, size {size!r}, stride {stride!r})"
                             ) from e


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    flags = metadata.values() if isinstance(metadata, Mapping) else [metadata]
    if any(flags):
        raise TorchFileError(f"a tensor with metadata {metadata!r} (conjugate or negative bit) is not supported")
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    # A tensor subclass (e.g. Parameter in some versions): rebuild the tensor, forget the subclass and its state.
    if func not in (_rebuild_tensor_v2, _rebuild_parameter, _rebuild_tensor):
        return _inert_class("torch._tensor", "_rebuild_from_type_v2")(func, new_type, args, state)
    return func(*args)


def _reconstructor(cls, base, state=None):
    # copyreg._reconstructor (protocols 0 and 1): only ever instantiates an inert record.
    if isinstance(cls, type) and issubclass(cls, Record):
        return cls()
    return _inert_class("copyreg", "_reconstructor")(cls, base, state)


def _torch_size(values=()):
    return tuple(values)


_KNOWN = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): _torch_size,
    **{("torch", name): storage_type for name, storage_type in STORAGE_TYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    """find_class answers from `_KNOWN` or with an inert class; persistent ids become `StorageRef`s."""

    def __init__(self, file, table: dict, byteorder: str = "little"):
        super().__init__(file, encoding="utf-8")
        self._table, self._byteorder = table, byteorder
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module, name):
        return _KNOWN.get((module, name)) or _inert_class(module, name)

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise TorchFileError(f"unknown persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":  # legacy: ("module", class, source file, source) - the class, inert
            return pid[1]
        if kind != "storage" or len(pid) not in (5, 6):
            raise TorchFileError(f"unknown persistent id {pid!r}")
        storage_type, key, location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, StorageType):
            raise TorchFileError(f"storage {key!r} has an unknown type {storage_type!r}")
        key, location = str(key), location.decode() if isinstance(location, bytes) else str(location)
        root = self.storages.setdefault(key, StorageRef(key, storage_type, int(numel), location, self._table,
                                                         self._byteorder))
        if view is None:
            return root
        view_key, offset, size = view
        return dataclasses.replace(root, view=(int(offset), int(size)))


# ---------------------------------------------------------------------------------------------------------------
# The two file layouts.

def load(path: str | os.PathLike) -> Any:
    """The object graph of a torch file, unpickled safely (see the module docstring)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] == b"PK\x03\x04":
        return _load_zip(data, path)
    if data[:262][257:262] == b"ustar":
        raise TorchFileError(f"{path} is a tar-format torch file (PyTorch < 0.4), which this reader does not "
                             "read; re-save it with a newer torch")
    return _load_legacy(data, path)


def _load_zip(data: bytes, path: str) -> Any:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise TorchFileError(f"{path} is a damaged zip archive (truncated?): {e}") from e
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
        raise TorchFileError(f"{path} is a zip archive but not a torch file: {len(pickles)} data.pkl entries "
                             f"(found {names[:5]}{' ...' if len(names) > 5 else ''})")
    prefix = pickles[0][:-len("data.pkl")]
    try:
        byteorder = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names \
            else "little"

        class LazyTable(dict):  # storages are read from the archive when a tensor is read
            def __missing__(self, key):
                raise KeyError(key)

            def __contains__(self, key):
                return f"{prefix}data/{key}" in names

            def __getitem__(self, key):
                return archive.read(f"{prefix}data/{key}")

        unpickler = _Unpickler(io.BytesIO(archive.read(pickles[0])), LazyTable(), byteorder)
        return unpickler.load()
    except TorchFileError:
        raise
    except Exception as e:  # the pickle machinery raises many types on malformed input
        raise TorchFileError(f"{path}: cannot read its pickle: {type(e).__name__}: {e}") from e


def _load_legacy(data: bytes, path: str) -> Any:
    stream = io.BytesIO(data)
    try:
        magic = _Unpickler(stream, {}).load()
    except Exception as e:
        raise TorchFileError(f"{path} is neither a zip-format nor a legacy-format torch file "
                             f"({type(e).__name__}: {e})") from e
    if magic != LEGACY_MAGIC_NUMBER:
        raise TorchFileError(f"{path} is neither a zip-format nor a legacy-format torch file (it starts with a "
                             f"pickle of {type(magic).__name__}, not torch's magic number)")
    table: dict = {}
    try:
        version = _Unpickler(stream, {}).load()
        if version != LEGACY_PROTOCOL_VERSION:
            raise TorchFileError(f"{path}: legacy torch protocol version {version!r}, expected "
                                 f"{LEGACY_PROTOCOL_VERSION}")
        sys_info = _Unpickler(stream, {}).load()
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            raise TorchFileError(f"{path} was written on a big-endian machine; not supported")
        main = _Unpickler(stream, table)
        result = main.load()
        keys = _Unpickler(stream, {}).load()
        if not isinstance(keys, list):
            raise TorchFileError(f"{path}: the storage key list is a {type(keys).__name__}")
        for key in keys:
            header = stream.read(8)
            if len(header) < 8:
                raise TorchFileError(f"{path} is truncated: storage {key!r} is missing")
            (count,) = struct.unpack("<q", header)
            if count < 0:
                raise TorchFileError(f"{path}: storage {key!r} has a negative size {count}")
            # The element size is the storage type's, known from the pickle's references to this key.
            if str(key) not in main.storages:
                raise TorchFileError(f"{path}: storage {key!r} is stored but the pickle does not refer to it")
            itemsize = main.storages[str(key)].type.itemsize
            chunk = stream.read(count * itemsize)
            if len(chunk) < count * itemsize:
                raise TorchFileError(f"{path} is truncated: storage {key!r} needs {count * itemsize} bytes, "
                                     f"{len(chunk)} are left")
            table[str(key)] = chunk
    except TorchFileError:
        raise
    except Exception as e:
        raise TorchFileError(f"{path}: cannot read the legacy torch format: {type(e).__name__}: {e} "
                             "(a truncated file?)") from e
    return result


# ---------------------------------------------------------------------------------------------------------------
# State dicts.

def is_module_record(obj: Any) -> bool:
    """A pickled `torch.nn.Module`: a Record whose state holds `_parameters`, `_buffers` and `_modules`."""
    return isinstance(obj, Record) and isinstance(obj.state, Mapping) and all(
        isinstance(obj.state.get(k), Mapping) for k in ("_parameters", "_buffers", "_modules"))


def module_state_dict(module: Record, prefix: str = "") -> dict[str, TensorRef]:
    """What `module.state_dict()` would give: parameters, persistent buffers, then submodules (`name.` prefixed)."""
    state = module.state
    out: dict[str, Any] = {}
    transient = state.get("_non_persistent_buffers_set") or set()
    for name, value in state["_parameters"].items():
        if value is not None:
            out[prefix + name] = value
    for name, value in state["_buffers"].items():
        if value is not None and name not in transient:
            out[prefix + name] = value
    for name, child in state["_modules"].items():
        if child is None:
            continue
        if not is_module_record(child):
            raise TorchFileError(f"submodule {prefix + name!r} is a {describe(child)}, not a pickled module")
        out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


def describe(obj: Any) -> str:
    if isinstance(obj, Record):
        return f"pickled {obj.qualname} object" if not is_module_record(obj) else f"pickled module {obj.qualname}"
    if isinstance(obj, TensorRef):
        return f"tensor {obj.size}"
    if isinstance(obj, Mapping):
        keys = list(obj)[:8]
        return f"{type(obj).__name__} with keys {keys}{' ...' if len(obj) > 8 else ''}"
    return type(obj).__name__


def state_dict(obj: Any, what: str = "the file") -> dict[str, np.ndarray]:
    """The tensors of a loaded torch object as a flat {key: ndarray}: a state dict as is, a pickled module's
    `state_dict()`. Anything else (a training checkpoint dict, a bare tensor, ...) is refused naming what it holds
    and, for a dict, every entry that is not a tensor."""
    if is_module_record(obj):
        tensors = module_state_dict(obj)
        bad = [f"{k!r} ({describe(v)})" for k, v in tensors.items() if not isinstance(v, TensorRef)]
    elif isinstance(obj, Mapping):
        tensors = dict(obj)
        bad = [f"{k!r} ({describe(v)})" for k, v in tensors.items()
               if not isinstance(k, str) or not isinstance(v, TensorRef)]
    else:
        raise TorchFileError(f"{what} holds a {describe(obj)}, neither a state dict nor a pickled torch module")
    if bad:
        raise TorchFileError(f"{what} is not a flat state dict of tensors; offending entries: {', '.join(bad)} "
                             "(a training checkpoint? extract its model state dict first)")
    return {key: value.numpy() for key, value in tensors.items()}


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a torch `.pt`/`.pth` file (a state dict or a whole pickled module), as numpy arrays."""
    return state_dict(load(path), what=os.fspath(path))
