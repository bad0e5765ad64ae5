"""TbClassifier: a DenseNet backbone and a one-logit head (fine-tuning, and the deployable model of a target).

    logit = tb_head(backbone.features(x))        P(target) = sigmoid(logit)

The head's weights keep their TB name (`tb_head`) whatever the target; the OUTPUT is named `output_name` ("tb" for
Tuberculosis, else the target's name, as the deployed model's card says), and that one name is used by
`output_kinds`, `output_scores`, Grad-CAM, predict's CSV columns and heatmap files alike.

A linear probe deploys as the same module: its weights on standardised features are folded into `tb_head`
(`fold_standardisation`), so every TB model runs through the same code in `predict` and export.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from metachex_jax.contract.pixels import channels_of
from metachex_jax.models.densenet import DenseNet, linear_init


class TbClassifier(nnx.Module):
    def __init__(self, backbone: DenseNet, rngs: nnx.Rngs, output_name: str = "tb"):
        self.backbone = backbone
        self.output_name = output_name
        self.tb_head = nnx.Linear(backbone.num_features, 1, kernel_init=linear_init,
                                  bias_init=nnx.initializers.zeros, rngs=rngs)

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def features(self, x):
        return self.backbone.features(x).astype(jnp.float32)

    def __call__(self, x):
        return self.output_scores(self.features(x))[self.output_name]

    def output_kinds(self) -> dict[str, str]:
        return {self.output_name: "probability"}

    def output_scores(self, features) -> dict[str, Any]:
        return {self.output_name: self.tb_head(features.astype(jnp.float32))[:, 0].astype(jnp.float32)}


def build_tb_classifier(model_config) -> TbClassifier:
    """The module a saved TB model's `model_config` ({"arch", "normalization", "output_name"}) describes (weights
    are loaded after). The normalisation of its pixel contract fixes the stem's input channels (cards written
    before it was recorded: "imagenet", 3 channels); `output_name` names the output (default "tb")."""
    in_channels = channels_of(model_config.get("normalization", "imagenet"))
    return TbClassifier(DenseNet(model_config.arch, num_classes=None, in_channels=in_channels, rngs=nnx.Rngs(0)),
                        nnx.Rngs(0), output_name=model_config.get("output_name", "tb"))


def fold_standardisation(weights: np.ndarray, bias: float, mean: np.ndarray, scale: np.ndarray):
    """(kernel (F, 1), bias (1,)) of the linear map f -> ((f - mean) / scale) . weights + bias."""
    kernel = np.asarray(weights, np.float64) / np.asarray(scale, np.float64)
    return kernel[:, None].astype(np.float32), np.asarray([bias - float(np.dot(mean, kernel))], np.float32)
