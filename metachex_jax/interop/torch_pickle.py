"""Read PyTorch weight files without PyTorch, and without running anything the file contains.

    state_dict = read_state_dict("nih-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt")  # {key: ndarray}
    obj = load("weights.pt")   # the unpickled object graph, tensors as `TensorRef` (`.numpy()`)

`torch.save` writes one pickle plus the raw bytes of every tensor storage, in one of two layouts:

- **zip** (torch >= 1.6, the default): a zip archive `NAME/data.pkl` (the pickle), `NAME/data/KEY` (one stored,
  uncompressed member per storage, raw little-endian bytes unless `NAME/byteorder` says "big"), `NAME/version`.
  Every member carries a CRC-32: all are read and checked, with their local headers, so damage is an error.
- **legacy** (`_use_new_zipfile_serialization=False`, and torch < 1.6): five things one after another in one
  stream: pickles of a magic number, the protocol version (1001) and system info, the main pickle, a pickle of
  the list of storage keys, then each storage as an 8-byte little-endian element count and its bytes. Nothing in
  it is checksummed: damaged bytes may read as other numbers, or another key.

In both, the main pickle names each storage by a persistent id `("storage", <torch.FloatStorage etc.>, key,
location, numel[, view])` and rebuilds tensors with `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)`, parameters with `torch._utils._rebuild_parameter(tensor, ...)`.

Why a reader of our own: torchxrayvision's release files (and many research checkpoints) are **whole pickled
modules**, which `torch.load(weights_only=True)` refuses, and `weights_only=False` runs whatever the pickle asks
for. A pickle is a small program: its opcodes import names (GLOBAL), call them (REDUCE, NEWOBJ, INST, OBJ) and
change objects (BUILD sets attributes, SETITEM(S) and APPEND(S) fill containers). What makes this reader safe:

- **Nothing is imported.** `find_class` answers a short list of names with frozen records of this module (the
  tensor and parameter rebuilds, the storage types, `collections.OrderedDict`, `set`, `frozenset`, `torch.Size`,
  `copyreg._reconstructor`); **every other name becomes a `Global`**, a name and nothing else. Calling or
  instantiating a `Global` makes a `Record`, which only remembers its arguments and its BUILD state. So a
  pickled module becomes a tree of Records whose state holds `_parameters`, `_buffers` and `_modules`, from which
  `state_dict` collects the tensors with the keys `module.state_dict()` would give; a pickled `os.system(...)`
  becomes a Record that did nothing.
- **Every opcode that calls or changes something is our own code** (the pure-Python unpickler with those opcodes
  replaced; the C unpickler cannot be changed opcode by opcode). BUILD applies only to a Record (once) or to an
  OrderedDict made by the same load (torch's `_metadata`, plain attributes only); SETITEM(S), APPEND(S) and
  ADDITEMS only to dicts, lists, sets and Records made by the same load; calls only to the allowlisted records
  and Globals. Anything else is refused (`TorchFileError`). Each load therefore works on objects of its own: no
  file can change what the reader hands to a later file (a crafted file once could, by BUILDing a storage type or
  a rebuild function's `__defaults__`). The opcodes torch never writes and that could reach shared state or
  allocate unbounded memory (the copyreg extension registry, protocol 5's out-of-band buffers) are refused.
- **Work and memory stay proportional to the file**: dict keys and set elements must be flat (a tuple nested a
  million deep crashes CPython's hash), copies made by the allowlisted calls may not exceed the pickle's size
  (one list `set()` a million times), zip members may not overlap or be compressed (torch stores them), a module
  tree may not contain itself or more than `MAX_MODULE_ENTRIES` entries, and the tensors of one file may hold at
  most `max(1 GiB, 16 x the file's size)` bytes (a stride-0 tensor of 10^12 elements takes a few bytes to
  describe). Like any unpickler, the object graph itself takes memory linear in the pickle's size.

`tests/test_torch_pickle.py` has a file for each attack; `tests/torch_fuzz.py` fuzzes the reader with mutated files
of both layouts against an independent decoder, and checks that no file runs code or changes this module.

Tensors are read as numpy arrays in their dtype (bfloat16 widened to float32, numpy has none). Sizes, strides and
offsets must be int64 values that keep the tensor inside its storage; this is checked when the tensor is
unpickled, and every storage's bytes when the file is read. The tar format of torch < 0.4, sparse, quantized and
conjugate/negative-bit tensors are refused with a message naming them; so is anything truncated or malformed:
every error is a `TorchFileError` naming the file.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import operator
import os
import pickle
import pickletools
import reprlib
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL_VERSION = 1001
MAX_DIMS = 64                  # numpy's limit; torch's is lower
MAX_INDEX = 2**63 - 1          # sizes, strides, offsets and element counts are int64 in torch
TENSOR_BYTES_FLOOR = 1 << 30   # the tensors of one file may hold max(1 GiB, 16 x its size) bytes
TENSOR_BYTES_PER_FILE_BYTE = 16
MAX_MODULE_ENTRIES = 1_000_000  # parameters, buffers and submodules walked for one state dict


class TorchFileError(ValueError):
    """The file is not a readable torch file (truncated, malformed, or holding something we do not read)."""


_repr = reprlib.Repr()  # short reprs for messages (set as attributes: Python 3.11's Repr takes no arguments)
_repr.maxstring = _repr.maxother = 80
_repr.maxlevel = 3


def _clip(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[:limit] + " ..."


def _short(value: Any) -> str:
    try:
        return _repr.repr(value)
    except Exception:  # e.g. an int of more than 4300 digits, which repr refuses
        return f"<{type(value).__name__}>"


# ---------------------------------------------------------------------------------------------------------------
# What the unpickler builds instead of torch objects.

@dataclasses.dataclass(frozen=True, slots=True)
class StorageType:
    """Stands for `torch.FloatStorage` etc.: the dtype of a storage's elements (frozen: no file can change it)."""

    name: str
    dtype: str  # numpy dtype string, little-endian; "bfloat16" for torch.BFloat16Storage

    @property
    def raw_dtype(self) -> np.dtype:
        """How the stored bytes are read: bfloat16 as its 16 bits, bool as bytes (any non-zero byte is True)."""
        return np.dtype({"bfloat16": "<u2", "?": "u1"}.get(self.dtype, self.dtype))

    @property
    def itemsize(self) -> int:
        return self.raw_dtype.itemsize

    @property
    def numpy_dtype(self) -> np.dtype:
        """The dtype of the arrays read: native byte order, bfloat16 widened to float32."""
        return np.dtype(np.float32) if self.dtype == "bfloat16" else np.dtype(self.dtype).newbyteorder("=")


STORAGE_TYPES = {t.name: t for t in (
    StorageType("FloatStorage", "<f4"), StorageType("DoubleStorage", "<f8"), StorageType("HalfStorage", "<f2"),
    StorageType("BFloat16Storage", "bfloat16"), StorageType("LongStorage", "<i8"), StorageType("IntStorage", "<i4"),
    StorageType("ShortStorage", "<i2"), StorageType("CharStorage", "i1"), StorageType("ByteStorage", "u1"),
    StorageType("BoolStorage", "?"), StorageType("UntypedStorage", "u1"))}


@dataclasses.dataclass(eq=False)
class _Source:
    """What the tensors of one load read: the file's name and size, and its storages' bytes by key."""

    path: str
    size: int
    storages: dict[str, bytes] = dataclasses.field(default_factory=dict)

    @property
    def tensor_bytes_limit(self) -> int:
        return max(TENSOR_BYTES_FLOOR, TENSOR_BYTES_PER_FILE_BYTE * self.size)


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class StorageRef:
    """One storage of the file (or, in the legacy layout, a view of one): its bytes are `source.storages[key]`."""

    key: str
    type: StorageType
    numel: int
    location: str
    source: _Source = dataclasses.field(repr=False)
    byteorder: str = "little"
    view: tuple[int, int] | None = None  # legacy storage views: (element offset, element count) into the root

    @property
    def count(self) -> int:
        """The elements a tensor of this storage may reach."""
        return self.numel if self.view is None else self.view[1]

    def data(self) -> memoryview:
        offset = 0 if self.view is None else self.view[0]
        size = self.type.itemsize
        return memoryview(self.source.storages[self.key])[offset * size:(offset + self.count) * size]


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class TensorRef:
    """A tensor of the file, checked to lie inside its storage: `numpy()` reads it (a copy)."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def __repr__(self):
        return f"<tensor {self.size} {self.storage.type.name} {self.storage.key!r}>"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.size

    @property
    def nbytes(self) -> int:
        return math.prod(self.size) * self.storage.type.numpy_dtype.itemsize

    def numpy(self) -> np.ndarray:
        storage = self.storage
        limit = storage.source.tensor_bytes_limit
        if self.nbytes > limit:
            raise TorchFileError(f"{storage.source.path}: tensor {self.size} of storage {storage.key!r} would take "
                                 f"{self.nbytes} bytes, more than the {limit} allowed for this file")
        if 0 in self.size:
            return np.zeros(self.size, storage.type.numpy_dtype)
        raw = storage.type.raw_dtype.newbyteorder(">" if storage.byteorder == "big" else "<")
        flat = np.frombuffer(storage.data(), dtype=raw)
        itemsize = raw.itemsize
        strides = tuple(0 if n == 1 else s * itemsize for n, s in zip(self.size, self.stride))  # n == 1: unused
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.size, strides, writeable=False)
        array = view.astype(raw.newbyteorder("="))
        if storage.type.dtype == "bfloat16":
            return (array.astype(np.uint32) << 16).view(np.float32)
        if storage.type.dtype == "?":
            return array != 0
        return array


@dataclasses.dataclass(frozen=True, slots=True)
class Global:
    """A class or function the pickle names that this reader does not know: its name, and nothing is imported."""

    module: str
    name: str

    def __repr__(self):
        return f"<global {self.qualname}>"

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclasses.dataclass(slots=True, eq=False)
class Record:
    """An object the pickle made of a `Global`: what the pickle said about it, and nothing else.

    `module`/`name` name the class or function; `args`/`kwargs` what it was called with; `state` what it was built
    with (BUILD); `items`/`dictitems` what was appended or set on it. Nothing of the named class is imported or run.
    """

    module: str
    name: str
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    state: Any = None
    items: list = dataclasses.field(default_factory=list)
    dictitems: dict = dataclasses.field(default_factory=dict)

    def __repr__(self):
        return f"<record {self.qualname}>"

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class _Known:
    """A name the reader answers itself, as `find_class` hands it out: frozen, so no file can change it.

    `copies`: the function copies its one argument (a container), which counts against the load's copy budget."""

    qualname: str
    function: Callable | None  # None for _REBUILD_FROM_TYPE
    copies: bool = False

    def __repr__(self):
        return f"<known {self.qualname}>"


# ---------------------------------------------------------------------------------------------------------------
# The functions behind the known names. Their arguments come from the file: each checks what it uses.

def _index(value: Any, what: str) -> int:
    """A size, stride, offset or count: an int64 >= 0 (torch's type), so arithmetic on it stays cheap."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise TorchFileError(f"{what} is a {type(value).__name__}, not an integer") from None
    if not 0 <= number <= MAX_INDEX:
        raise TorchFileError(f"{what} {_short(number)} is outside 0..2^63-1")
    return number


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    if not isinstance(storage, StorageRef):
        raise TorchFileError(f"a tensor rebuild refers to {_short(storage)}, not to a storage of the file")
    for what, values in (("size", size), ("stride", stride)):
        if type(values) not in (tuple, list) or len(values) > MAX_DIMS:
            raise TorchFileError(f"tensor of storage {storage.key!r}: its {what} {_short(values)} is not a tuple of "
                                 f"at most {MAX_DIMS} integers")
    offset = _index(storage_offset, "tensor offset")
    size = tuple(_index(n, "tensor size") for n in size)
    stride = tuple(_index(s, "tensor stride") for s in stride)
    if len(size) != len(stride):
        raise TorchFileError(f"tensor of storage {storage.key!r}: size {size} and stride {stride} differ in length")
    if 0 not in size:  # an empty tensor reads nothing (torch does not check its offset either)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.count:
            raise TorchFileError(f"tensor {size} (offset {offset}, stride {stride}) of storage {storage.key!r} "
                                 f"reaches element {last}, but the storage holds {storage.count}")
    return TensorRef(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    flags = metadata.values() if isinstance(metadata, Mapping) and len(metadata) <= 8 else [metadata]
    if any(flags):
        raise TorchFileError(f"a tensor with metadata {_short(metadata)} (conjugate or negative bit) is not "
                             "supported")
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_):
    if not isinstance(data, TensorRef):
        raise TorchFileError(f"a parameter holds {_short(data)}, not a tensor")
    return data


def _reconstructor(cls, base, state=None):
    # copyreg._reconstructor (protocols 0 and 1): only ever makes a Record.
    if isinstance(cls, Global):
        return Record(cls.module, cls.name)
    return Record("copyreg", "_reconstructor", (cls, base, state))


_FLAT_KEY_TYPES = (str, bytes, int, float, type(None), Global, Record, _Known)


def _key(key: Any) -> Any:
    """A dict key or set element: flat values only, so hashing it is quick (a tuple nested a million deep crashes
    CPython's hash with a C stack overflow; a huge int is hashed anew every time)."""
    parts = key if type(key) is tuple and len(key) <= 16 else (key,)
    if not all(isinstance(part, _FLAT_KEY_TYPES) and not (type(part) is int and not -2**63 <= part < 2**64)
               for part in parts):
        raise TorchFileError(f"a dict key or set element {_short(key)} is not a string, a number or a short flat "
                             "tuple")
    return key


def _ordered_dict(items=()):
    out = collections.OrderedDict()
    for pair in (items.items() if isinstance(items, dict) else items):  # Python 2's OrderedDict: [[key, value]]
        if type(pair) not in (tuple, list) or len(pair) != 2:
            raise TorchFileError(f"an OrderedDict item {_short(pair)} is not a (key, value) pair")
        out[_key(pair[0])] = pair[1]
    return out


def _set(items=()):
    return set(map(_key, items))


def _frozenset(items=()):
    return frozenset(map(_key, items))


def _torch_size(values=()):
    return tuple(values)


_REBUILD_FROM_TYPE = "torch._tensor._rebuild_from_type_v2"  # calls another known function: done by the unpickler
_TENSOR_REBUILDS = {"torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
                    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"}


def _known_names() -> dict[tuple[str, str], _Known | StorageType]:
    functions = {
        "collections.OrderedDict": (_ordered_dict, True), "builtins.set": (_set, True),
        "__builtin__.set": (_set, True), "builtins.frozenset": (_frozenset, True),
        "__builtin__.frozenset": (_frozenset, True), "torch.Size": (_torch_size, True),
        "copyreg._reconstructor": (_reconstructor, False), "copy_reg._reconstructor": (_reconstructor, False),
        "torch._utils._rebuild_tensor": (_rebuild_tensor, False),
        "torch._utils._rebuild_tensor_v2": (_rebuild_tensor_v2, False),
        "torch._utils._rebuild_parameter": (_rebuild_parameter, False),
        "torch._utils._rebuild_parameter_with_state": (_rebuild_parameter, False),
        _REBUILD_FROM_TYPE: (None, False),
    }
    known: dict[tuple[str, str], _Known | StorageType] = {
        tuple(name.rsplit(".", 1)): _Known(name, function, copies) for name, (function, copies) in functions.items()}
    return known | {("torch", name): storage_type for name, storage_type in STORAGE_TYPES.items()}


_KNOWN = _known_names()


# ---------------------------------------------------------------------------------------------------------------
# The unpickler: the pure-Python one, with every opcode that calls, builds or changes something replaced.

class _Opcodes(dict):
    def __missing__(self, code):
        names = [op.name for op in pickletools.opcodes if ord(op.code) == code]
        raise TorchFileError(f"the pickle uses opcode 0x{code:02x}{f' ({names[0]})' if names else ''}, which this "
                             "reader refuses (torch files do not use it)")


def _is_own_container(obj: Any, *types: type) -> bool:
    # Exact types: the only dicts, lists and sets on the stack are ones this load made (find_class hands out none).
    return type(obj) in types


class _Unpickler(pickle._Unpickler):
    """Unpickles one pickle of a torch file. `storages`: the root storages its persistent ids named, by key."""

    dispatch: _Opcodes  # set below the class

    def __init__(self, stream: io.BytesIO, source: _Source, copy_budget: int, byteorder: str = "little"):
        super().__init__(stream, encoding="utf-8")
        self.source, self.byteorder = source, byteorder
        self.storages: dict[str, StorageRef] = {}
        self.copies_left = copy_budget + 1024  # a torch pickle copies each container it builds at most once

    def find_class(self, module, name):
        if not module or not name:  # (the C unpickler, and so torch, refuses them too)
            raise TorchFileError(f"the pickle names a global {module!r}.{name!r} with an empty part")
        known = _KNOWN.get((module, name))
        return known if known is not None else Global(module, name)

    def persistent_load(self, pid):
        if type(pid) is not tuple or not pid:
            raise TorchFileError(f"unknown persistent id {_short(pid)}")
        kind = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) == 4:  # legacy: ("module", class, source file, source): the class, inert
            return pid[1]
        if kind != "storage" or len(pid) not in (5, 6):
            raise TorchFileError(f"unknown persistent id {_short(pid)}")
        storage_type, key, location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if isinstance(location, bytes):
            location = location.decode("ascii", "replace")
        if not isinstance(key, str) or not isinstance(location, str):
            raise TorchFileError(f"storage persistent id {_short(pid)}: its key and location are not strings")
        if not isinstance(storage_type, StorageType):
            raise TorchFileError(f"storage {key!r} has an unknown type {_short(storage_type)}")
        numel = _index(numel, f"the element count of storage {key!r}")
        root = self.storages.setdefault(key, StorageRef(key, storage_type, numel, location, self.source,
                                                        self.byteorder))
        if (root.type, root.numel) != (storage_type, numel):
            raise TorchFileError(f"storage {key!r} is named as {root.numel} x {root.type.name} and as "
                                 f"{numel} x {storage_type.name}")
        if view is None:
            return root
        if type(view) is not tuple or len(view) != 3:
            raise TorchFileError(f"storage {key!r}: malformed view {_short(view)}")
        offset, count = _index(view[1], "storage view offset"), _index(view[2], "storage view size")
        if offset + count > numel:
            raise TorchFileError(f"storage view ({offset}, {count}) outside storage {key!r} of {numel}")
        return dataclasses.replace(root, view=(offset, count))

    def _charge(self, copies: int) -> None:
        self.copies_left -= copies
        if self.copies_left < 0:
            raise TorchFileError("the pickle asks for more copying than its size allows (a crafted file?)")

    def _call(self, func, args, kwargs=None):
        """REDUCE, and what NEWOBJ, INST and OBJ do: only known functions and Globals can be called."""
        if type(args) is not tuple or (kwargs is not None and type(kwargs) is not dict):
            raise TorchFileError(f"a call of {_short(func)} has arguments {_short(args)}, not a tuple")
        if isinstance(func, Global):
            return Record(func.module, func.name, args, {} if kwargs is None else kwargs)
        if isinstance(func, Record):  # e.g. the result of an inert getattr(...) called: another Record
            return Record(func.module, f"{func.name}(...)", args, {} if kwargs is None else kwargs)
        if not isinstance(func, _Known) or kwargs:
            raise TorchFileError(f"the pickle calls {_short(func)}, which is not a class or function it may call")
        if len(args) > 7:
            raise TorchFileError(f"{func.qualname} called with {len(args)} arguments")
        if func.copies:
            if len(args) > 1 or (args and type(args[0]) not in (tuple, list, dict, collections.OrderedDict, set,
                                                                  frozenset)):
                raise TorchFileError(f"{func.qualname} called with {_short(args)}, not one container")
            self._charge(len(args[0]) if args else 0)
        if func.qualname == _REBUILD_FROM_TYPE:
            # A tensor subclass (e.g. Parameter in some versions): rebuild the tensor, forget the subclass and state.
            inner, _, inner_args, _ = args
            if not isinstance(inner, _Known) or inner.qualname not in _TENSOR_REBUILDS:
                return Record("torch._tensor", "_rebuild_from_type_v2", args)
            return self._call(inner, inner_args)
        return func.function(*args)

    def _new(self, cls, args, kwargs=None):
        if not isinstance(cls, Global):
            raise TorchFileError(f"the pickle instantiates {_short(cls)}, which is not a class it may instantiate")
        return self._call(cls, args, kwargs)

    # -- the replaced opcodes

    def _load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def _load_newobj(self):
        args = self.stack.pop()
        self.stack[-1] = self._new(self.stack[-1], args)

    def _load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        self.stack[-1] = self._new(self.stack[-1], args, kwargs)

    def _instantiate(self, klass, args):  # INST and OBJ
        self.append(self._new(klass, tuple(args)))

    def _load_build(self):
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, Record):
            if target.state is not None:
                raise TorchFileError(f"the pickle builds {target!r} twice")
            if _is_own_container(state, dict, collections.OrderedDict):  # copied, as `__setstate__` would
                self._charge(len(state))
                state = state.copy()
            target.state = state
        elif _is_own_container(target, collections.OrderedDict) and isinstance(state, dict) and all(
                isinstance(k, str) and not hasattr(collections.OrderedDict, k) for k in state):
            self._charge(len(state))  # torch's `_metadata` on a state dict: plain attributes that shadow nothing
            target.__dict__.update(state)
        else:
            raise TorchFileError(f"the pickle sets the state of {_short(target)} to {_short(state)}; only objects "
                                 "of unknown classes the pickle made (Records) and OrderedDicts can have one")

    def _setitems(self, target, items):
        if len(items) % 2:
            raise TorchFileError("SETITEMS with a key and no value")
        if isinstance(target, Record):
            target = target.dictitems
        elif not _is_own_container(target, dict, collections.OrderedDict):
            raise TorchFileError(f"the pickle sets items of {_short(target)}, not of a dict it made")
        for i in range(0, len(items), 2):
            target[_key(items[i])] = items[i + 1]

    def _load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._setitems(self.stack[-1], [key, value])

    def _load_setitems(self):
        items = self.pop_mark()
        self._setitems(self.stack[-1], items)

    def _load_dict(self):
        items = self.pop_mark()
        self.append({})
        self._setitems(self.stack[-1], items)

    def _extend(self, target, items):
        if isinstance(target, Record):
            target = target.items
        elif not _is_own_container(target, list):
            raise TorchFileError(f"the pickle appends to {_short(target)}, not to a list it made")
        target.extend(items)

    def _load_append(self):
        value = self.stack.pop()
        self._extend(self.stack[-1], [value])

    def _load_appends(self):
        items = self.pop_mark()
        self._extend(self.stack[-1], items)

    def _load_additems(self):
        items = self.pop_mark()
        if not _is_own_container(self.stack[-1], set):
            raise TorchFileError(f"the pickle adds items to {_short(self.stack[-1])}, not to a set it made")
        self.stack[-1].update(map(_key, items))

    def _load_frozenset(self):
        items = self.pop_mark()  # (before self.append is looked up: pop_mark changes it)
        self.append(frozenset(map(_key, items)))

    def _load_frame(self):
        # The pure-Python unpickler takes a frame shorter than it declares (the C one does not): read it ourselves.
        (size,) = struct.unpack("<Q", self.read(8))
        unframer = self._unframer
        if unframer.current_frame and unframer.current_frame.read():
            raise TorchFileError("a pickle frame starts before the previous one ends")
        frame = unframer.file_read(min(size, MAX_INDEX))
        if len(frame) != size:
            raise TorchFileError(f"a pickle frame of {size} bytes holds {len(frame)} (a truncated file?)")
        unframer.current_frame = io.BytesIO(frame)

    def _load_stop(self):
        value = self.stack.pop()
        if self.stack or self.metastack:
            raise TorchFileError("the pickle ends with unused values on its stack")
        raise pickle._Stop(value)


# The dispatch table: the opcodes that only make new values or read the memo run as the pure-Python unpickler has
# them; the ones that call, build or change something are ours (above); every other opcode is refused, among them
# the copyreg extension opcodes (a registry shared by the whole process), protocol 5's buffers (BYTEARRAY8
# allocates whatever size it reads) and any opcode a later Python adds.
_CODES = {op.name: ord(op.code) for op in pickletools.opcodes}
_SAFE_AS_THEY_ARE = (
    "MARK", "POP", "POP_MARK", "DUP", "FLOAT", "INT", "BININT", "BININT1", "LONG", "BININT2", "NONE", "PERSID",
    "BINPERSID", "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "GLOBAL", "EMPTY_DICT", "GET",
    "BINGET", "INST", "LONG_BINGET", "LIST", "EMPTY_LIST", "OBJ", "PUT", "BINPUT", "LONG_BINPUT", "TUPLE",
    "EMPTY_TUPLE", "BINFLOAT", "PROTO", "TUPLE1", "TUPLE2", "TUPLE3", "NEWTRUE", "NEWFALSE", "LONG1", "LONG4",
    "BINBYTES", "SHORT_BINBYTES", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES8", "EMPTY_SET", "STACK_GLOBAL",
    "MEMOIZE")  # INST and OBJ call _Unpickler._instantiate
_REPLACED = {
    "REDUCE": _Unpickler._load_reduce, "NEWOBJ": _Unpickler._load_newobj, "NEWOBJ_EX": _Unpickler._load_newobj_ex,
    "BUILD": _Unpickler._load_build, "SETITEM": _Unpickler._load_setitem, "SETITEMS": _Unpickler._load_setitems,
    "DICT": _Unpickler._load_dict, "APPEND": _Unpickler._load_append, "APPENDS": _Unpickler._load_appends,
    "ADDITEMS": _Unpickler._load_additems, "FROZENSET": _Unpickler._load_frozenset, "STOP": _Unpickler._load_stop,
    "FRAME": _Unpickler._load_frame}
_Unpickler.dispatch = _Opcodes({_CODES[name]: pickle._Unpickler.dispatch[_CODES[name]] for name in _SAFE_AS_THEY_ARE}
                               | {_CODES[name]: method for name, method in _REPLACED.items()})


# ---------------------------------------------------------------------------------------------------------------
# The two file layouts.

def load(path: str | os.PathLike) -> Any:
    """The object graph of a torch file, unpickled safely (see the module docstring)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    source = _Source(path, len(data))
    try:
        if data[:4] == b"PK\x03\x04":
            return _load_zip(data, source)
        if data[257:262] == b"ustar":
            raise TorchFileError("a tar-format torch file (PyTorch < 0.4), which this reader does not read; "
                                 "re-save it with a newer torch")
        return _load_legacy(data, source)
    except TorchFileError as e:
        raise TorchFileError(f"{path}: {e}") from e
    except Exception as e:  # the pickle and zip machinery raise many types on malformed input
        raise TorchFileError(f"{path}: malformed ({type(e).__name__}: {_clip(str(e))})") from e


def _load_zip(data: bytes, source: _Source) -> Any:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except Exception as e:
        raise TorchFileError(f"a damaged zip archive (truncated?): {type(e).__name__}: {_clip(str(e))}") from e
    names = [info.filename for info in infos]
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
        raise TorchFileError(f"a zip archive but not a torch file: {len(pickles)} data.pkl entries (found "
                             f"{names[:5]}{' ...' if len(names) > 5 else ''})")
    prefix = pickles[0][:-len("data.pkl")]
    if len(set(names)) != len(names):
        raise TorchFileError("the zip archive names a member twice")
    try:
        members = _read_members(archive, infos, len(data))
        byteorder = members.pop(prefix + "byteorder", b"little").decode("ascii").strip()
        if byteorder not in ("little", "big"):
            raise TorchFileError(f"unknown byte order {byteorder!r}")
        pickled = members[pickles[0]]
        unpickler = _Unpickler(io.BytesIO(pickled), source, copy_budget=len(pickled), byteorder=byteorder)
        result = unpickler.load()
        for key, storage in unpickler.storages.items():
            name = f"{prefix}data/{key}"
            if name not in members:
                raise TorchFileError(f"storage {key!r} is referenced by the pickle but not stored in the file")
            source.storages[key] = _checked(storage, members[name], exact=False)
    except TorchFileError:
        raise
    except Exception as e:
        raise TorchFileError(f"cannot read the archive's contents (damaged?): {type(e).__name__}: "
                             f"{_clip(str(e))}") from e
    return result


def _read_members(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], file_size: int) -> dict[str, bytes]:
    """Every member, each checked against its CRC-32 and local header (so a damaged directory entry, e.g. the name
    of the byteorder member, is seen): stored ones only (torch stores them), together no larger than the file
    (members that overlap could make a small file read as gigabytes)."""
    left = file_size
    members = {}
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise TorchFileError(f"member {info.filename!r} is compressed (method {info.compress_type}); torch "
                                 "stores its members")
        if info.file_size > left:
            raise TorchFileError(f"member {info.filename!r} of {info.file_size} bytes: the members overlap or are "
                                 "larger than the file")
        left -= info.file_size
        members[info.filename] = archive.read(info)
    return members


def _checked(storage: StorageRef, data: bytes, exact: bool) -> bytes:
    expected = storage.numel * storage.type.itemsize
    if len(data) < expected or (exact and len(data) != expected):
        raise TorchFileError(f"storage {storage.key!r} holds {len(data)} bytes, {expected} expected (a truncated "
                             "file?)")
    return data


def _load_legacy(data: bytes, source: _Source) -> Any:
    stream = io.BytesIO(data)

    def unpickler() -> _Unpickler:
        return _Unpickler(stream, source, copy_budget=len(data) - stream.tell())

    try:
        magic = unpickler().load()
    except TorchFileError:
        raise
    except Exception as e:
        raise TorchFileError(f"neither a zip-format nor a legacy-format torch file ({type(e).__name__}: "
                             f"{_clip(str(e))})") from e
    if type(magic) is not int or magic != LEGACY_MAGIC_NUMBER:
        raise TorchFileError(f"neither a zip-format nor a legacy-format torch file (it starts with a pickle of "
                             f"{type(magic).__name__}, not torch's magic number)")
    try:
        version = unpickler().load()
        if type(version) is not int or version != LEGACY_PROTOCOL_VERSION:
            raise TorchFileError(f"legacy torch protocol version {_short(version)}, expected "
                                 f"{LEGACY_PROTOCOL_VERSION}")
        sys_info = unpickler().load()
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            raise TorchFileError("written on a big-endian machine; not supported")
        main = unpickler()
        result = main.load()
        keys = unpickler().load()
        if type(keys) is not list or not all(isinstance(key, str) for key in keys) or len(set(keys)) != len(keys):
            raise TorchFileError(f"the storage key list {_short(keys)} is not a list of distinct strings")
        for key in keys:
            if key not in main.storages:
                raise TorchFileError(f"storage {key!r} is stored but the pickle does not refer to it")
            storage = main.storages[key]
            header = stream.read(8)
            if len(header) < 8:
                raise TorchFileError(f"truncated: storage {key!r} is missing")
            (count,) = struct.unpack("<q", header)
            if count != storage.numel:
                raise TorchFileError(f"storage {key!r} is stored with {count} elements, the pickle says "
                                     f"{storage.numel}")
            source.storages[key] = _checked(storage, stream.read(count * storage.type.itemsize), exact=True)
        missing = sorted(set(main.storages) - set(keys))
        if missing:
            raise TorchFileError(f"storages {_short(missing)} are referenced by the pickle but not stored (a "
                                 "truncated file?)")
    except TorchFileError:
        raise
    except Exception as e:
        raise TorchFileError(f"cannot read the legacy torch format: {type(e).__name__}: {_clip(str(e))} (a truncated "
                             "file?)") from e
    return result


# ---------------------------------------------------------------------------------------------------------------
# State dicts.

def is_module_record(obj: Any) -> bool:
    """A pickled `torch.nn.Module`: a Record whose state holds `_parameters`, `_buffers` and `_modules`."""
    return isinstance(obj, Record) and isinstance(obj.state, Mapping) and all(
        isinstance(obj.state.get(k), Mapping) for k in ("_parameters", "_buffers", "_modules"))


def module_state_dict(module: Record, prefix: str = "") -> dict[str, Any]:
    """What `module.state_dict()` would give: parameters, persistent buffers, then submodules (`name.` prefixed).

    Walked without recursion. A module that contains itself is refused, and so is a tree of more than
    `MAX_MODULE_ENTRIES` entries (a submodule shared twice at each of 40 levels makes 2^40 paths)."""
    out: dict[str, Any] = {}
    on_path: set[int] = set()  # the modules from the root to the one walked
    todo: list = [(prefix, module)]
    walked = 0
    while todo:
        prefix, module = todo.pop()
        if prefix is None:  # all of `module`'s submodules are done
            on_path.discard(id(module))
            continue
        on_path.add(id(module))
        state = module.state
        transient = state.get("_non_persistent_buffers_set") or set()
        if type(transient) not in (set, frozenset, list, tuple):
            raise TorchFileError(f"module {prefix or '(root)'}: its non-persistent buffers are a "
                                 f"{describe(transient)}")
        entries = [*state["_parameters"].items(), *((name, value) for name, value in state["_buffers"].items()
                                                     if name not in transient)]
        children = [(name, child) for name, child in state["_modules"].items() if child is not None]
        walked += 1 + len(entries) + len(children)
        if walked > MAX_MODULE_ENTRIES:
            raise TorchFileError(f"the module tree has more than {MAX_MODULE_ENTRIES} entries (submodules shared "
                                 "over and over?)")
        for name, _ in entries + children:
            if not isinstance(name, str):
                raise TorchFileError(f"module {prefix or '(root)'} has an entry named {_short(name)}, not a string")
        out.update((prefix + name, value) for name, value in entries if value is not None)
        todo.append((None, module))
        for name, child in reversed(children):
            if not is_module_record(child):
                raise TorchFileError(f"submodule {prefix + name!r} is a {describe(child)}, not a pickled module")
            if id(child) in on_path:
                raise TorchFileError(f"submodule {prefix + name!r} contains itself")
            todo.append((f"{prefix}{name}.", child))
    return out


def describe(obj: Any) -> str:
    if isinstance(obj, Record):
        return f"pickled {obj.qualname} object" if not is_module_record(obj) else f"pickled module {obj.qualname}"
    if isinstance(obj, (Global, _Known)):
        return f"reference to {obj.qualname}"
    if isinstance(obj, TensorRef):
        return f"tensor {obj.size}"
    if isinstance(obj, Mapping):
        keys = list(obj)[:8]
        return f"{type(obj).__name__} with keys {_short(keys)}{' ...' if len(obj) > 8 else ''}"
    return type(obj).__name__


def state_dict(obj: Any, what: str = "the file") -> dict[str, np.ndarray]:
    """The tensors of a loaded torch object as a flat {key: ndarray}: a state dict as is, a pickled module's
    `state_dict()`. Anything else (a training checkpoint dict, a bare tensor, ...) is refused naming what it holds
    and, for a dict, every entry that is not a tensor."""
    try:
        if is_module_record(obj):
            tensors = module_state_dict(obj)
        elif isinstance(obj, Mapping):
            tensors = dict(obj)
        else:
            raise TorchFileError(f"holds a {describe(obj)}, neither a state dict nor a pickled torch module")
        bad = [f"{_short(k)} ({describe(v)})" for k, v in tensors.items()
               if not isinstance(k, str) or not isinstance(v, TensorRef)]
        if bad:
            raise TorchFileError(f"is not a flat state dict of tensors; offending entries: {', '.join(bad)} "
                                 "(a training checkpoint? extract its model state dict first)")
        total = sum(tensor.nbytes for tensor in tensors.values())
        limit = min((tensor.storage.source.tensor_bytes_limit for tensor in tensors.values()), default=0)
        if total > limit > 0:
            raise TorchFileError(f"holds tensors of {total} bytes, more than the {limit} allowed for its size")
    except TorchFileError as e:
        raise TorchFileError(f"{what}: {e}") from e
    return {key: value.numpy() for key, value in tensors.items()}


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a torch `.pt`/`.pth` file (a state dict or a whole pickled module), as numpy arrays."""
    return state_dict(load(path), what=os.fspath(path))
