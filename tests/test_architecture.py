"""The package's plan, checked: folders by job in layers, imports only downward, imports at the top of modules, and
the modules that run in decoding and input worker processes free of jax and tensorflow_datasets.

The layer table below is the plan, written once (the docs show the same table). A module may import modules of its
own package and of LOWER layers; packages on the same layer do not import each other; no module imports itself back
through others (no cycle).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "metachex_jax"

# (layer, package, its job), bottom first. "" is the package root: the command-line modules (thin: parse the
# arguments, call the library) and the public API in __init__.py.
LAYERS = [
    (0, "core", "what everything shares: errors, files, labels, the distributed runtime, preemption, the mesh and "
                "sharding helpers, the console"),
    (1, "imaging", "image files -> 8-bit gray pixels (the one reader), and the pixel geometry"),
    (1, "demo", "the synthetic demo data: rendering, sampling records, writing the trees"),
    (2, "contract", "what a model promises without its code: its pixel contract, named outputs, model card"),
    (2, "data.raw", "raw dataset copies -> rows (paths, labels, metadata)"),
    (3, "models", "the networks, a model directory's Flax model, a run's saved model"),
    (3, "data.build", "rows -> ArrayRecord datasets, and reading built splits"),
    (4, "interop", "torch files and other libraries' weights"),
    (4, "data.input", "built datasets -> batches: the data spec, the datasets a run reads, mixture, pipeline, "
                      "augmentation, the data preflight"),
    (5, "serving", "applying a model to files: Predictor, predict, Grad-CAM, export"),
    (6, "evaluation", "the numbers users cite: metrics, reports, split evaluation, expert labels, pointing game"),
    (7, "training", "pretraining: the trainer, steps, losses, optimiser, checkpoints, metric writer"),
    (8, "transfer", "the transfer comparison"),
    (9, "configs", "the recipes and their rules"),
    (10, "", "command lines and the public API"),
    (10, "bench", "benchmarks"),
]

# The only packages a function may import inside itself, and why (everything else is imported at the top).
OPTIONAL_IMPORTS = {
    "torch": "the `torch` extra: torchvision's models in the parity benchmarks (.pth files are read without torch)",
    "torchvision": "the `torch` extra: torchvision's DenseNet in the parity benchmarks",
    "torchxrayvision": "the `xrv` extra: the torchxrayvision parity checks",
    "sklearn": "the `test` extra: scikit-learn, the reference of the probe benchmark",
    "pydicom": "an optional codec, imported on the first DICOM file: importing it costs about 0.3 s, which every "
               "spawned decoding worker and every `predict` would pay for the many collections that hold no DICOM",
}
# Modules of the package a function may import inside itself, and why.
LAZY_MODULES = {
    "metachex_jax.data.build.beam_runner": "the Apache Beam runner of builds: it imports apache-beam (the `beam` "
                                           "extra), which `prepare --runner=local` never needs",
    "metachex_jax.serving.flax_model": "the model code (flax, orbax, the networks): `Predictor.load` imports it for "
                                       "a model that is not exported; an exported model runs without it "
                                       "(tests/test_predict.py checks a fresh interpreter)",
}

# What runs inside spawned worker processes (image decoding of builds and `predict`, a build's work on the local
# pool and on Beam's workers, the check of a built dataset, the demo's rendering, the raw readers the builders'
# workers may call, the record reader that every input worker unpickles, the host augmentation): none of it may
# import jax or tensorflow_datasets, which would cost every worker seconds. Not listed: the grain input pipeline
# itself (grain imports jax).
WORKER_MODULES = ["metachex_jax.core.labels", "metachex_jax.core.errors", "metachex_jax.imaging.images",
                  "metachex_jax.imaging.dicom", "metachex_jax.imaging.file_formats", "metachex_jax.imaging.resize",
                  "metachex_jax.imaging.workers",
                  "metachex_jax.imaging.geometry", "metachex_jax.demo.render", "metachex_jax.demo.records",
                  "metachex_jax.demo.write", "metachex_jax.data.input.augment",
                  *(f"metachex_jax.data.build.{name}" for name in ("layout", "work", "shards", "publish", "records",
                                                                   "check", "beam_runner")),
                  *(f"metachex_jax.data.raw.{name}" for name in ("common", "nih", "tb", "chexpert", "padchest",
                                                                 "csv_dataset", "labelled", "nih_expert", "mimic",
                                                                 "tbx11k", "vindr"))]


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def package_of(module: str) -> str:
    """The table's package holding `module` (the longest match); "" for the root's own modules."""
    inner = module.removeprefix("metachex_jax").removeprefix(".")
    names = [name for _, name, _ in LAYERS if name and (inner == name or inner.startswith(name + "."))]
    if names:
        return max(names, key=len)
    assert "." not in inner, f"{module} is in no package of the layer table"
    return ""


LAYER = {name: layer for layer, name, _ in LAYERS}


def imports(path: Path, module: str, known: dict[str, Path]) -> list[tuple[int, str, bool]]:
    """(line, imported module of this package, whether the import is inside a function) of every import."""
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            # `from a import b`: the module a.b when there is one, else a (b is a name in it)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out += [(node.lineno, t, id(node) in local) for t in targets if t == "metachex_jax" or
                t.startswith("metachex_jax.")]
    return out


def namespace_only(path: Path) -> bool:
    """A folder's __init__.py that imports nothing (its docstring only): no node of the graph."""
    return path.name == "__init__.py" and not any(isinstance(n, (ast.Import, ast.ImportFrom))
                                                  for n in ast.walk(ast.parse(path.read_text())))


def import_graph() -> dict[str, list[tuple[int, str]]]:
    known = modules()
    graph = {}
    for module, path in known.items():
        if namespace_only(path):
            continue
        graph[module] = [(line, target) for line, target, _ in imports(path, module, known)
                         if target != module and not namespace_only(known.get(target, path))]
    return graph


def test_every_import_goes_down_the_layers():
    wrong = []
    for module, targets in import_graph().items():
        here = package_of(module)
        for line, target in targets:
            there = package_of(target)
            if there == here:
                continue
            if LAYER[there] > LAYER[here]:
                wrong.append(f"{module}:{line} imports {target}: upward (layer {LAYER[here]} -> {LAYER[there]})")
            elif LAYER[there] == LAYER[here]:
                wrong.append(f"{module}:{line} imports {target}: across packages of layer {LAYER[here]}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = {m: sorted({t for _, t in targets}) for m, targets in import_graph().items()}
    cycles, state = [], {}  # state: 1 on the path, 2 done

    def visit(module, path):
        state[module] = 1
        for target in graph.get(module, []):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def commented(lines: list[str], index: int) -> bool:
    """Whether the import on line `index` (0-based) says why: a comment on it, on another import line of the same
    block above it, or on the line just above that block."""
    while index >= 0:
        line = lines[index].strip()
        if "#" in line:
            return True
        if not line.startswith(("import ", "from ")):
            return False
        index -= 1
    return False


def test_function_local_imports_are_optional_dependencies_with_a_comment():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or "."]
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in LAZY_MODULES else node.module
                             for a in node.names]
                optional = [n for n in names if n.split(".")[0] in OPTIONAL_IMPORTS or n in LAZY_MODULES]
                if getattr(node, "level", 0) or len(optional) < len(names):
                    wrong.append(f"{where}: {lines[node.lineno - 1].strip()} (not an optional dependency: import it "
                                 "at the top)")
                elif not commented(lines, node.lineno - 1):
                    wrong.append(f"{where}: {lines[node.lineno - 1].strip()} (say why it is imported here)")
    assert not wrong, "\n".join(wrong)


def test_the_table_names_every_package_and_each_package_is_a_folder():
    packages = {package_of(m) for m in modules()}
    assert packages == set(LAYER), (sorted(packages), sorted(LAYER))
    assert all((PACKAGE / name.replace(".", "/") / "__init__.py").is_file() for name in LAYER if name)


def test_worker_modules_import_neither_jax_nor_tensorflow_datasets():
    code = ("import importlib, json, sys\n"
            f"for name in {WORKER_MODULES!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'tensorflow_datasets'))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []
