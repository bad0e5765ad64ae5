"""TbClassifier: a DenseNet backbone and a one-logit TB head (fine-tuning, and the deployable TB model).

    logit = tb_head(backbone.features(x))        P(TB) = sigmoid(logit)

A linear probe deploys as the same module: its weights on standardised features are folded into `tb_head`
(`fold_standardisation`), so every TB model runs through the same code in `predict` and export.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from metachex_jax.models.densenet import DenseNet, linear_init


class TbClassifier(nnx.Module):
    def __init__(self, backbone: DenseNet, rngs: nnx.Rngs):
        self.backbone = backbone
        self.tb_head = nnx.Linear(backbone.num_features, 1, kernel_init=linear_init,
                                  bias_init=nnx.initializers.zeros, rngs=rngs)

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def features(self, x):
        return self.backbone.features(x).astype(jnp.float32)

    def __call__(self, x):
        return self.output_scores(self.features(x))["tb"]

    def output_kinds(self) -> dict[str, str]:
        return {"tb": "probability"}

    def output_scores(self, features) -> dict[str, Any]:
        return {"tb": self.tb_head(features.astype(jnp.float32))[:, 0].astype(jnp.float32)}


def build_tb_classifier(model_config) -> TbClassifier:
    """The module a saved TB model's `model_config` ({"arch", "normalization"}) describes (weights are loaded
    after). The normalisation of its pixel contract fixes the stem's input channels (cards written before it was
    recorded: "imagenet", 3 channels)."""
    from metachex_jax.preprocessing import channels_of

    in_channels = channels_of(model_config.get("normalization", "imagenet"))
    return TbClassifier(DenseNet(model_config.arch, num_classes=None, in_channels=in_channels, rngs=nnx.Rngs(0)),
                        nnx.Rngs(0))


def fold_standardisation(weights: np.ndarray, bias: float, mean: np.ndarray, scale: np.ndarray):
    """(kernel (F, 1), bias (1,)) of the linear map f -> ((f - mean) / scale) . weights + bias."""
    kernel = np.asarray(weights, np.float64) / np.asarray(scale, np.float64)
    return kernel[:, None].astype(np.float32), np.asarray([bias - float(np.dot(mean, kernel))], np.float32)
