"""Mutation fuzzing of the torch reader (`metachex_jax.interop.torch_pickle`) in both layouts, seeded and bounded.

CI runs a short campaign (tests/test_torch_pickle_fuzz.py). A long one, printing files tried and failures per
layout (on the order of a hundred files a second):

    nice -n 19 python tests/torch_fuzz.py --examples 200000 --minutes 20 --seed 1 --save_failures /tmp/failures

Each example is a valid file written by `torch_files` (a state dict with views, a whole pickled module carrying
code that an ordinary unpickler would run, a big-endian archive, files with the attacks of `torch_files.attacks`)
mutated one of two ways:

- "file": the bytes of the whole file (bytes or bits flipped, truncated, random bytes inserted, chunks removed,
  duplicated or moved). A zip-layout file must give the seed's tensors or a `TorchFileError` (its members carry
  CRC-32s); a legacy file has no checksum, so it must give what an independent reference decoder reads from the
  same bytes, or a `TorchFileError` (and where only raw storage bytes changed, the seed's keys, dtypes and shapes).
- "pickle": the main pickle's opcodes (random opcodes with plausible arguments inserted or put in place of
  others, arguments replaced, opcodes removed, duplicated or swapped, attack gadgets spliced in: BUILD, SETITEM,
  APPEND, NEWOBJ or REDUCE on what the pickle can name or has in its memo, memo overwrites), the file then put
  together validly (fresh CRCs): the reader must give what the reference decoder reads, or a `TorchFileError`.

The reference decoder (`torch_reference.py`) is Python's C unpickler with torch's rebuild functions written from
torch's documentation, tensors gathered by explicit index arithmetic. Every example runs in a worker process, so
that a crash or a hang is seen, reported and the worker replaced. After every file the worker checks that nothing
ran: a tripwire function the seeds call (an exploit that imports names would call it), an audit hook for imports,
code execution and attribute changes of functions and classes, and a snapshot of the reader module's state
(`reachable`: its globals, the defaults and dicts of its functions, its classes' dicts, the frozen records
`find_class` hands out) compared with the one taken before the campaign. Each file gets a CPU-time limit
(RLIMIT_CPU, so that a loaded machine does not make it fail) and the worker a memory limit.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import copyreg
import dataclasses
import importlib
import math
import multiprocessing
import os
import pickle
import pickletools
import resource
import signal
import struct
import sys
import tempfile
import time
import types

import numpy as np

import torch_files
from metachex_jax.interop.torch_pickle import TorchFileError, read_state_dict
from torch_files import Raw, Strided, global_, opcodes
from torch_reference import Refused, Unchecked, reference_state_dict

LAYOUTS = ("zip", "legacy")
READER = "metachex_jax.interop.torch_pickle:read_state_dict"
TRIPPED: list = []  # what `tripwire` was called with, in this process


def tripwire(*args):
    """What the seeds' payloads call: a reader that imports the names a pickle gives would call this."""
    TRIPPED.append(args)


# ---------------------------------------------------------------------------------------------------------------
# Seeds: valid files and what they hold.

@dataclasses.dataclass
class Seed:
    name: str
    pickled: bytes                     # the main pickle
    storages: dict[str, np.ndarray]
    expected: dict[str, np.ndarray] | None  # the state dict read from the unmutated file; None: it is refused
    byteorder: str = "little"


def _brute_force_view(view: Strided) -> np.ndarray:
    """A view's values by explicit indexing, element by element (independent of numpy's stride tricks)."""
    flat = view.storage.reshape(-1)
    values = [flat[view.offset + sum(i * s for i, s in zip(index, view.stride))] for index in np.ndindex(*view.size)]
    return np.array(values, dtype=flat.dtype).reshape(view.size)


def _payloads() -> dict:
    """Attributes that run code when unpickled by an ordinary unpickler."""
    return {"hook": torch_files.exec_call("import torch_fuzz; torch_fuzz.tripwire('exec')"),
            "call": Raw(global_("torch_fuzz", "tripwire") + b"(" + opcodes("reduce") + b"tR"),
            "shell": Raw(global_("os", "system") + b"(" + opcodes("exit 0") + b"tR")}


def seeds(layout: str) -> list[Seed]:
    rng = np.random.default_rng(0)
    shared = np.arange(24, dtype=np.int32)
    views = {"shared.t": Strided(shared, 2, (3, 4), (1, 5)), "shared.slice": Strided(shared, 6, (2, 3), (6, 1)),
             "shared.expanded": Strided(shared, 1, (2, 3), (0, 2)), "shared.unit": Strided(shared, 0, (1, 4), (99, 1))}
    state = {
        "conv.weight": rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
        "norm.running_var": np.array([1.5, -2, 3.25, np.nan], np.float32),
        "fc.weight": rng.standard_normal((3, 2)),
        "fc.bias": np.array([1, -2, 0.5], np.float16),
        "steps": np.array(7, np.int64),
        "pixels": np.arange(5, dtype=np.uint8),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
        **views,
    }
    expected = {k: _brute_force_view(v) if isinstance(v, Strided) else v for k, v in state.items()}
    out = [Seed("state_dict", *torch_files.state_dict_pickle(state, layout), expected)]
    module_state = {k: v for k, v in state.items() if not isinstance(v, Strided)}
    out.append(Seed("module", *torch_files.module_pickle(module_state, layout, extra_state=_payloads()),
                    module_state))
    if layout == "zip":
        out.append(Seed("big_endian", *torch_files.state_dict_pickle(module_state, layout), module_state, "big"))
    pickled, storages = torch_files.state_dict_pickle({"w": np.array([1.5, -2, 3.25, 4], np.float32)}, layout)
    out += [Seed(f"attack_{name}", pickled[:2] + attack + b"0" + pickled[2:], storages, None)
            for name, attack in torch_files.attacks().items()]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Mutations.

_NAMES = [("torch", "FloatStorage"), ("torch", "HalfStorage"), ("torch", "Size"), ("collections", "OrderedDict"),
          ("builtins", "set"), ("builtins", "frozenset"), ("copyreg", "_reconstructor"),
          ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
          ("torch._tensor", "_rebuild_from_type_v2"), ("torch.nn.modules.module", "Module"), ("builtins", "exec"),
          ("builtins", "eval"), ("builtins", "getattr"), ("builtins", "__import__"), ("os", "system"),
          ("posix", "system"), ("subprocess", "Popen"), ("torch_fuzz", "tripwire"), ("copyreg", "__newobj__")]
_STRINGS = ["_parameters", "_buffers", "_modules", "storage", "module", "cpu", "0", "1", "dtype", "numel", "size",
            "__defaults__", "__kwdefaults__", "__dict__", "__class__", "__setstate__", "items", "keys", "weight",
            "_metadata", "conj", "little", "big", "<f2", ""]


def _small_int(rng) -> int:
    return int(rng.choice([0, 1, 2, 3, 4, 5, 7, 8, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, -1, -2,
                           int(rng.integers(0, 64))]))


def _text(rng) -> str:
    return str(rng.choice(_STRINGS)) if rng.random() < 0.8 else rng.bytes(int(rng.integers(0, 6))).hex()


def _argument(rng, arg: pickletools.ArgumentDescriptor) -> bytes:
    """Plausible bytes for an opcode's argument: small numbers and known names mostly, lies about lengths sometimes."""
    name = arg.name
    fixed = {"uint1": ("<B", 255), "uint2": ("<H", 65535), "int4": ("<i", 2**31 - 1), "uint4": ("<I", 2**32 - 1),
             "uint8": ("<Q", 2**64 - 1)}
    if name in fixed:
        fmt, top = fixed[name]
        value = (_small_int(rng) if rng.random() < 0.9 else int.from_bytes(rng.bytes(8), "little")) % (top + 1)
        return struct.pack(fmt, value if fmt != "<i" or value <= 2**31 - 1 else value - 2**32)
    if name == "float8":
        return struct.pack(">d", float(rng.choice([0.0, 1.5, -1.0, np.nan, np.inf, 1e300])))
    if name in ("decimalnl_short", "decimalnl_long"):
        return f"{_small_int(rng)}{'L' if name.endswith('long') else ''}\n".encode()
    if name == "floatnl":
        return b"1.5\n"
    if name == "stringnl":
        return repr(_text(rng)).encode() + b"\n"
    if name == "unicodestringnl":
        return _text(rng).encode("raw-unicode-escape") + b"\n"
    if name == "stringnl_noescape":
        return _text(rng).encode() + b"\n"
    if name == "stringnl_noescape_pair":
        module, attr = _NAMES[int(rng.integers(len(_NAMES)))]
        return f"{module}\n{attr}\n".encode()
    if name in ("long1", "long4"):
        data = int(_small_int(rng)).to_bytes(9, "little", signed=True).rstrip(b"\x00") or b""
        return (struct.pack("<B", len(data)) if name == "long1" else struct.pack("<i", len(data))) + data
    sizes = {"1": "<B", "4": "<I", "8": "<Q"}
    data = _text(rng).encode()
    length = len(data) if rng.random() < 0.9 else len(data) + int(rng.integers(1, 4))  # sometimes a lie
    return struct.pack(sizes[name[-1]], min(length, 255) if name[-1] == "1" else length) + data


_OPCODES = [op for op in pickletools.opcodes]


def _random_opcode(rng) -> bytes:
    op = _OPCODES[int(rng.integers(len(_OPCODES)))]
    return op.code.encode("latin-1") + (_argument(rng, op.arg) if op.arg is not None else b"")


def _gadget(rng) -> bytes:
    """A few opcodes that try to change something shared: net zero on the stack when they work."""
    module, name = _NAMES[int(rng.integers(len(_NAMES)))]
    target = global_(module, name) if rng.random() < 0.6 else b"h" + bytes([int(rng.integers(0, 12))])
    key, value = opcodes(_text(rng)), opcodes(_text(rng))
    kinds = [b"}" + key + value + b"sb0", b"N}" + key + value + b"s\x86b0", key + value + b"s0", value + b"a0",
             b"(" + key + value + b"u0", b")\x810", b"(" + key + value + b"tR0", b"](" + value + b"e\x85R0"]
    if rng.random() < 0.15:  # overwrite a memo entry that later GETs use
        return value + b"q" + bytes([int(rng.integers(0, 12))]) + b"0"
    return target + kinds[int(rng.integers(len(kinds)))]


def mutate_pickle(rng, pickled: bytes) -> tuple[bytes, str]:
    """An opcode-level mutation of a pickle."""
    ops = list(pickletools.genops(pickled))
    starts = [pos for _, _, pos in ops] + [len(pickled)]
    spans = list(zip(starts[:-1], starts[1:]))
    kind = str(rng.choice(["insert", "insert", "gadget", "gadget", "argument", "argument", "replace", "delete",
                           "duplicate", "swap", "flip", "cut"]))
    i = int(rng.integers(1, len(spans)))  # never before PROTO
    a, b = spans[i]
    if kind == "argument":  # the same opcode with another argument: often still a valid pickle, meaning another thing
        with_argument = [j for j, (op, _, _) in enumerate(ops) if op.arg is not None and j > 0]
        i = with_argument[int(rng.integers(len(with_argument)))]
        (a, b), op = spans[i], ops[i][0]
        new = op.code.encode("latin-1") + _argument(rng, op.arg)
        return pickled[:a] + new + pickled[b:], f"pickle argument {pickled[a:b]!r} -> {new!r} at {a}"
    if kind == "replace":
        new = _random_opcode(rng)
        return pickled[:a] + new + pickled[b:], f"pickle replace {pickled[a:b]!r} -> {new!r} at {a}"
    if kind == "insert":
        new = b"".join(_random_opcode(rng) for _ in range(int(rng.integers(1, 4))))
        return pickled[:a] + new + pickled[a:], f"pickle insert {new!r} at {a}"
    if kind == "gadget":
        new = _gadget(rng)
        return pickled[:a] + new + pickled[a:], f"pickle gadget {new!r} at {a}"
    if kind == "delete":
        return pickled[:a] + pickled[b:], f"pickle delete {pickled[a:b]!r} at {a}"
    if kind == "duplicate":
        return pickled[:b] + pickled[a:b] + pickled[b:], f"pickle duplicate {pickled[a:b]!r} at {a}"
    if kind == "swap" and i + 1 < len(spans):
        c = spans[i + 1][1]
        return pickled[:a] + pickled[b:c] + pickled[a:b] + pickled[c:], f"pickle swap at {a}"
    if kind == "cut":
        return pickled[:a], f"pickle cut at {a}"
    position = int(rng.integers(2, len(pickled)))
    flipped = bytearray(pickled)
    flipped[position] ^= int(rng.integers(1, 256))
    return bytes(flipped), f"pickle flip at {position}"


def mutate_file(rng, data: bytes) -> tuple[bytes, str, list[int] | None]:
    """A byte-level mutation of a whole file: (bytes, description, changed positions if the length is kept)."""
    kind = str(rng.choice(["flip", "flip", "bit", "truncate", "insert", "delete", "duplicate", "move"]))
    n = len(data)
    if kind in ("flip", "bit"):
        positions = sorted({int(p) for p in rng.integers(0, n, int(rng.integers(1, 5)) if kind == "flip" else 1)})
        out = bytearray(data)
        for p in positions:
            out[p] ^= int(rng.integers(1, 256)) if kind == "flip" else 1 << int(rng.integers(8))
        return bytes(out), f"file {kind} at {positions}", positions
    if kind == "truncate":
        cut = int(rng.integers(0, n))
        return data[:cut], f"file truncated to {cut}", None
    at, size = int(rng.integers(0, n)), int(rng.integers(1, 33))
    if kind == "insert":
        return data[:at] + rng.bytes(size) + data[at:], f"file insert {size} at {at}", None
    if kind == "delete":
        return data[:at] + data[at + size:], f"file delete {size} at {at}", None
    chunk = data[at:at + size]
    to = int(rng.integers(0, n))
    if kind == "duplicate":
        return data[:to] + chunk + data[to:], f"file duplicate {size} from {at} to {to}", None
    out = bytearray(data)
    out[to:to + len(chunk)] = chunk
    return bytes(out[:n]), f"file move {size} from {at} to {to}", None


@dataclasses.dataclass
class Example:
    layout: str
    seed: Seed
    data: bytes
    family: str            # "file" or "pickle"
    description: str
    raw_only: bool         # only raw storage bytes of a legacy file changed


def example(seed_value: int, layout: str, index: int, corpus: list[Seed]) -> Example:
    rng = np.random.default_rng([seed_value, LAYOUTS.index(layout), index])
    attacks = [seed for seed in corpus if seed.expected is None]
    files = [seed for seed in corpus if seed.expected is not None]
    pool = attacks if rng.random() < 0.3 else files
    seed = pool[int(rng.integers(len(pool)))]
    if rng.random() < 0.5:
        pickled, description = mutate_pickle(rng, seed.pickled)
        data = torch_files.encode(pickled, seed.storages, layout, seed.byteorder)[0]
        return Example(layout, seed, data, "pickle", f"{seed.name}: {description}", False)
    data, raw = torch_files.encode(seed.pickled, seed.storages, layout, seed.byteorder)
    mutated, description, positions = mutate_file(rng, data)
    raw_only = positions is not None and all(any(p in r for r in raw) for p in positions)
    return Example(layout, seed, mutated, "file", f"{seed.name}: {description}", raw_only)


# ---------------------------------------------------------------------------------------------------------------
# What must not change: the reader module's state, and nothing may run.

def reachable() -> list:
    """What a file could change that the reader hands to later files: everything reachable from the reader
    module's globals (functions with their defaults, code and dicts; classes; the frozen records find_class hands
    out; dicts and lists), from the pure-Python unpickler it is built on, and copyreg's registries."""
    module = sys.modules["metachex_jax.interop.torch_pickle"]
    todo = [module.__dict__, pickle._Unpickler, copyreg.dispatch_table, copyreg._extension_registry,
            copyreg._inverted_registry, copyreg._extension_cache]
    seen: dict[int, object] = {}
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, type(None), types.ModuleType)):
            continue
        if isinstance(obj, type) and obj.__module__ not in (module.__name__, "pickle"):
            continue  # numpy's, typing's and builtins' classes: not the reader's to guard
        seen[id(obj)] = obj
        if isinstance(obj, dict):
            todo += [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo += list(obj)
        elif isinstance(obj, (types.FunctionType, types.MethodType)):
            function = getattr(obj, "__func__", obj)
            todo += [function.__defaults__, function.__kwdefaults__, function.__dict__]
        elif isinstance(obj, type):
            todo += list(vars(obj).values())
        else:
            todo += [getattr(obj, f.name) for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
            todo += [vars(obj)] if hasattr(obj, "__dict__") else []
    return list(seen.values())


def shallow(obj) -> tuple:
    """What `obj` refers to, by id: a change anywhere in `reachable()` changes some object's `shallow`."""
    if isinstance(obj, dict):
        return tuple(obj.keys()), tuple(map(id, obj.values()))
    if isinstance(obj, (list, tuple, set, frozenset)):
        return tuple(map(id, obj))
    if isinstance(obj, (types.FunctionType, types.MethodType)):
        function = getattr(obj, "__func__", obj)
        return (id(function), id(function.__code__), id(function.__defaults__), id(function.__kwdefaults__),
                id(function.__dict__), function.__qualname__)
    if isinstance(obj, type):
        return tuple((name, id(value)) for name, value in vars(obj).items())
    fields = tuple(id(getattr(obj, f.name)) for f in dataclasses.fields(obj)) if dataclasses.is_dataclass(obj) else ()
    return id(type(obj)), fields, id(vars(obj)) if hasattr(obj, "__dict__") else None


def state_of() -> list:
    """A picture of everything `reachable()`, to compare before and after loading files."""
    return [(id(obj), shallow(obj)) for obj in reachable()]


_DANGEROUS_EVENTS = ("exec", "compile", "import", "object.__setattr__", "object.__delattr__", "pickle.find_class",
                     "marshal.loads", "os.system", "subprocess.Popen", "os.exec", "os.spawn", "os.posix_spawn",
                     "os.fork", "ctypes.", "socket.", "shutil.", "os.remove", "os.rename", "os.chmod")


class _Watch:
    """An audit hook armed while the reader runs: any import, code execution or change of a function or class."""

    def __init__(self):
        self.armed_for: str | None = None
        self.events: list[str] = []
        sys.addaudithook(self.hook)

    def hook(self, event, args):
        if self.armed_for is None:
            return
        if event == "open" and args and args[0] not in (self.armed_for, None) and not str(args[0]).endswith(".pyc"):
            self.events.append(f"open {args[0]!r}")
        elif event.startswith(_DANGEROUS_EVENTS) and not (event == "import" and str(args[0]).startswith("encodings")):
            self.events.append(f"{event} {str(args)[:120]}")


# ---------------------------------------------------------------------------------------------------------------
# The worker: runs one example at a time, and tells the parent which phase it is in (so a crash is attributed).

def difference(got: dict, expected: dict) -> str | None:
    """How two state dicts differ (keys, dtype, shape or bits), or None."""
    if sorted(got) != sorted(expected):
        return f"keys {sorted(got)[:6]} != {sorted(expected)[:6]}"
    for key, value in expected.items():
        value = np.asarray(value)
        if got[key].dtype != value.dtype or got[key].shape != value.shape:
            return f"{key}: {got[key].dtype}{got[key].shape} != {value.dtype}{value.shape}"
        if got[key].tobytes() != value.tobytes():
            return f"{key}: {got[key].ravel()[:4]} != {value.ravel()[:4]}"
    return None


def _geometry(state: dict) -> list:
    return [(k, np.asarray(v).dtype, np.asarray(v).shape) for k, v in state.items()]


def _judge(ex: Example, path: str, loader, watch: _Watch, baseline, send) -> tuple[str, str]:
    """(outcome, detail): outcome is a success ("original", "other", "refused", "unchecked") or a failure kind."""
    with open(path, "wb") as f:
        f.write(ex.data)
    send(("phase", "reader"))
    TRIPPED.clear()
    watch.armed_for, watch.events = path, []
    try:
        got, error = loader(path), None
    except TorchFileError as e:
        got, error = None, e
    except BaseException as e:  # anything else is a finding
        return "unexpected_exception", f"{type(e).__name__}: {e}"
    finally:
        watch.armed_for = None
    if TRIPPED:
        return "ran_code", f"tripwire called with {TRIPPED}"
    if watch.events:
        return "ran_code", "; ".join(watch.events[:3])
    if [shallow(obj) for obj in baseline[0]] != baseline[1]:
        return "state_changed", "the reader module's state differs from before the campaign"
    if error is not None:
        if path not in str(error):
            return "unnamed_file", str(error)[:200]
        if "MemoryError" in str(error):
            return "memory", str(error)[:200]
    if ex.layout == "zip" and ex.family == "file":  # CRC-32s: the seed's tensors or an error
        if error is not None:
            return "refused", ""
        problem = difference(got, ex.seed.expected) if ex.seed.expected is not None else "loaded a refused seed"
        return ("original", "") if problem is None else ("wrong_tensors", problem)
    send(("phase", "reference"))
    try:
        reference, reference_error = reference_state_dict(ex.data), None
    except Unchecked as e:
        return ("refused" if error is not None else "unchecked"), str(e)
    except Refused as e:
        reference, reference_error = None, e
    if error is not None:
        return "refused", ""
    if reference_error is not None:
        return "loaded_where_reference_refuses", str(reference_error)[:200]
    problem = difference(got, reference)
    if problem is not None:
        return "differs_from_reference", problem
    if ex.raw_only and ex.seed.expected is not None and sorted(_geometry(got)) != sorted(_geometry(ex.seed.expected)):
        return "wrong_tensors", "raw bytes changed the keys, dtypes or shapes"
    same_as_seed = ex.seed.expected is not None and difference(got, ex.seed.expected) is None
    return ("original" if same_as_seed else "other"), ""


def _worker(conn, seed_value: int, loader_name: str, cpu_limit_s: int, memory_limit: int, directory: str):
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    module_name, function_name = loader_name.split(":")
    loader = getattr(importlib.import_module(module_name), function_name)
    corpus = {layout: seeds(layout) for layout in LAYOUTS}
    for encoding in ("cp437", "raw_unicode_escape", "unicode_escape", "latin_1", "ascii", "utf_8"):
        codecs.lookup(encoding)  # imported now, not while the reader runs
    path = os.path.join(directory, f"worker-{os.getpid()}.pt")
    for layout in LAYOUTS:  # the reader's lazy imports happen now, before the baseline
        for seed in corpus[layout]:
            with open(path, "wb") as f:
                f.write(torch_files.encode(seed.pickled, seed.storages, layout, seed.byteorder)[0])
            try:
                read_state_dict(path)
            except TorchFileError:
                pass
    watched = reachable()
    baseline = (watched, [shallow(obj) for obj in watched])
    watch = _Watch()
    conn.send(("ready", ""))
    while (job := conn.recv()) is not None:
        layout, index = job
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = math.ceil(used.ru_utime + used.ru_stime) + cpu_limit_s  # SIGXCPU past it
        resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.getrlimit(resource.RLIMIT_CPU)[1]))
        ex = example(seed_value, layout, index, corpus[layout])
        conn.send(("verdict", *_judge(ex, path, loader, watch, baseline, conn.send), ex.family))


# ---------------------------------------------------------------------------------------------------------------
# The campaign.

@dataclasses.dataclass
class Report:
    counts: dict[str, collections.Counter]  # per layout: "tried", each outcome, "family file" / "family pickle"
    failures: list[str]
    seconds: float

    def summary(self) -> str:
        lines = []
        for layout, counts in self.counts.items():
            failed = sum(n for k, n in counts.items() if k != "tried" and not k.startswith("family ")
                         and k not in _NOT_FAILURES)
            lines.append(f"{layout}: {counts['tried']} files tried, {failed} failures; "
                         + ", ".join(f"{k} {n}" for k, n in sorted(counts.items()) if k != "tried"))
        return "\n".join(lines) + f"\n{self.seconds:.0f} s"


# Outcomes that are not the reader's failures: the seed's tensors, other tensors the reference reads too, a clear
# error, a file the reference declines, and the reference decoder itself crashing or spinning (the C unpickler).
_NOT_FAILURES = ("original", "other", "refused", "unchecked", "reference_crash", "reference_hang")


class _Worker:
    def __init__(self, context, seed_value, loader, cpu_limit_s, memory_limit, directory):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, daemon=True,
                                       args=(child, seed_value, loader, cpu_limit_s, memory_limit, directory))
        self.process.start()
        child.close()
        if not self.conn.poll(120) or self.conn.recv()[0] != "ready":
            raise RuntimeError("the fuzz worker did not start")

    def run(self, job, backstop_s: float) -> tuple[str, str, str]:
        self.conn.send(job)
        phase = "reader"
        while True:
            try:
                if not self.conn.poll(backstop_s):
                    self.stop()
                    return "hang", f"no answer in {backstop_s} s ({phase})", "?"
                message = self.conn.recv()
            except (EOFError, OSError):
                self.process.join(10)
                code = self.process.exitcode
                died = "over its CPU-time limit" if code == -signal.SIGXCPU else f"exit code {code}"
                kind = "hang" if code == -signal.SIGXCPU else "crash"
                return (kind if phase == "reader" else f"reference_{kind}"), f"{died} ({phase})", "?"
            if message[0] == "phase":
                phase = message[1]
            else:
                return message[1], message[2], message[3]

    def stop(self):
        self.process.kill()
        self.process.join(10)


def run_campaign(seed: int, examples: int, layouts=LAYOUTS, loader: str = READER, cpu_limit_s: int = 5,
                 memory_limit: int = 4 << 30, backstop_s: float = 300, save_failures: str | None = None,
                 progress_every: int = 0, max_seconds: float | None = None) -> Report:
    """Mutated files #0 .. #examples-1 of each layout (the layouts taken in turn), in a worker process; with
    `max_seconds`, it stops after the file that exceeds it. Failures are listed with how to rebuild the file."""
    start = time.time()
    context = multiprocessing.get_context("spawn")
    counts = {layout: collections.Counter() for layout in layouts}
    corpus = {layout: seeds(layout) for layout in layouts}
    failures: list[str] = []
    env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    worker = None
    try:
        with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as directory:
            for index in range(examples):
                for layout in layouts:
                    worker = worker or _Worker(context, seed, loader, cpu_limit_s, memory_limit, directory)
                    outcome, detail, family = worker.run((layout, index), backstop_s)
                    counts[layout].update(["tried", outcome, f"family {family}"])
                    if outcome in ("hang", "crash", "reference_hang", "reference_crash"):
                        worker.stop()
                        worker = None
                    if outcome not in _NOT_FAILURES:
                        ex = example(seed, layout, index, corpus[layout])
                        failures.append(f"{layout} #{index} (seed {seed}): {outcome}: {detail} [{ex.description}]")
                        if save_failures:
                            os.makedirs(save_failures, exist_ok=True)
                            with open(os.path.join(save_failures, f"{layout}-{seed}-{index}.pt"), "wb") as f:
                                f.write(ex.data)
                if progress_every and (index + 1) % progress_every == 0:
                    print(Report(counts, failures, time.time() - start).summary(), flush=True)
                if max_seconds is not None and time.time() - start > max_seconds:
                    break
            if worker is not None:
                worker.conn.send(None)
                worker.process.join(10)
    finally:
        if worker is not None:
            worker.stop()
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Report(counts, failures, time.time() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=10000, help="mutated files per layout")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long (counts say how far)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--save_failures", default=None, help="a folder for the failing files")
    args = parser.parse_args(argv)
    report = run_campaign(args.seed, args.examples, tuple(args.layouts.split(",")), save_failures=args.save_failures,
                          progress_every=1000, max_seconds=None if args.minutes is None else 60 * args.minutes)
    print(report.summary())
    for failure in report.failures[:50]:
        print(failure)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
