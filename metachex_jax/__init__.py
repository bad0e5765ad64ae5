"""metachex-jax: MetaChexNet (Gozes & Greenspan, EMBC 2019) in JAX / Flax NNX.

The stable Python API is importable from the package root:

    from metachex_jax import Predictor, PixelContract, MetaChexNet, DenseNet121
    predictor = Predictor.load("/tmp/metachex_demo")      # a run, a model directory, an exported model, ...
    probabilities = predictor.predict_files(["xray.png"]).rows()

Each name lives in the module `PUBLIC` names; it is imported when first used (a PEP 562 module `__getattr__`), not
with the package: the image-decoding and input worker processes import the package root and must not pay for
jax. Everything else is reached by its module path (`metachex_jax.data.input.pipeline`, ...); the docs' Architecture
page lists the folders and their layers. Recipes: `from metachex_jax.configs import pretrain`.
"""

import importlib

from metachex_jax.core.version import __version__

# name -> (module, attribute): the stable API
PUBLIC = {
    "Predictor": ("metachex_jax.serving.predictor", "Predictor"),  # apply any model to images or files
    "FilePredictions": ("metachex_jax.serving.predictor", "FilePredictions"),
    "ModelError": ("metachex_jax.core.errors", "ModelError"),
    "PixelContract": ("metachex_jax.contract.pixels", "PixelContract"),  # what pixels a model is fed
    "to_model_input": ("metachex_jax.contract.pixels", "to_model_input"),
    "MetaChexNet": ("metachex_jax.models.metachexnet", "MetaChexNet"),
    "build_model": ("metachex_jax.models.metachexnet", "build_model"),  # from a config's `model` section
    "DenseNet": ("metachex_jax.models.densenet", "DenseNet"),
    "DenseNet121": ("metachex_jax.models.densenet", "DenseNet121"),
    "DenseNet169": ("metachex_jax.models.densenet", "DenseNet169"),
    "DenseNet201": ("metachex_jax.models.densenet", "DenseNet201"),
    "load_model": ("metachex_jax.models.saved", "load"),  # a model directory -> (module, card)
    "save_model": ("metachex_jax.models.saved", "save"),
    "load_run_model": ("metachex_jax.models.runs", "load_run_model"),  # a pretraining workdir's model
    "train_and_evaluate": ("metachex_jax.training.trainer", "train_and_evaluate"),  # pretraining
    "run_transfer": ("metachex_jax.transfer.run", "run"),  # the transfer comparison
    "build_dataset": ("metachex_jax.data.build.build", "build_dataset"),  # a raw copy -> a prepared dataset
    "write_demo_data": ("metachex_jax.demo.write", "write_demo_data"),  # the synthetic demo trees
}
__all__ = ["__version__", *PUBLIC]


def __getattr__(name: str):
    if name not in PUBLIC:  # (a submodule, `from metachex_jax import predict`, is then imported as usual)
        raise AttributeError(f"module 'metachex_jax' has no attribute {name!r}")
    module, attribute = PUBLIC[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *PUBLIC])
