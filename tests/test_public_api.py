"""The stable Python API: `from metachex_jax import Predictor, MetaChexNet, ...` gives the objects their modules
define, and importing the package root imports none of them (worker processes import it)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import metachex_jax

REPO = Path(__file__).resolve().parent.parent


def test_every_public_name_is_its_modules_object():
    assert set(metachex_jax.__all__) == {"__version__", *metachex_jax.PUBLIC}
    for name, (module, attribute) in metachex_jax.PUBLIC.items():
        assert getattr(metachex_jax, name) is getattr(importlib.import_module(module), attribute), name
    assert set(metachex_jax.PUBLIC) <= set(dir(metachex_jax))
    from metachex_jax import DenseNet121, MetaChexNet, PixelContract, Predictor  # noqa: F401 - the documented form
    from metachex_jax.serving.predictor import Predictor as defined
    assert Predictor is defined


def test_an_unknown_name_is_an_attribute_error_and_submodules_still_import():
    try:
        metachex_jax.NoSuchThing
    except AttributeError as e:
        assert "NoSuchThing" in str(e)
    else:
        raise AssertionError("metachex_jax.NoSuchThing did not raise")
    from metachex_jax import predict  # a command-line module, found as a submodule
    assert callable(predict.main)


def test_importing_the_package_root_imports_no_public_module_nor_jax():
    code = ("import json, sys; import metachex_jax; print(json.dumps(sorted(m for m in sys.modules "
            "if m.split('.')[0] == 'jax' or m.startswith(('metachex_jax.serving', 'metachex_jax.models')))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []
