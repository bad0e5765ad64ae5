"""torchxrayvision's DenseNet classifier in NNX: a 1-channel DenseNet backbone and one linear layer to 18 logits.

    logits     = classifier(backbone.features(x))          (N, 18), torchxrayvision's `model.classifier(...)`
    probability = sigmoid(logit)
    op_norm    = sigmoid(logit) / (2 t)                     where sigmoid(logit) <  t   (t: the label's operating
               = 1 - (1 - sigmoid(logit)) / (2 (1 - t))     where sigmoid(logit) >= t    threshold; t maps to 0.5)

`labels` are torchxrayvision's 18 names in its order, '' for a label the weights were never trained on;
`op_thresholds` the published per-label thresholds (None where undefined). Both come from the converter's table
(`metachex_jax.convert_torchxrayvision`), are static (part of the module's structure, not its weights) and are
stored in the model card's `model_config`. Input: the "xrv" pixel contract (`preprocessing.to_xrv_input`).

Named outputs (`output_kinds`, what `predict` and Grad-CAM use), for each trained label L: `L` the sigmoid
probability (kind "probability", as every model here reports) and, where L has a threshold, `L_opnorm` the
op-normalised value torchxrayvision's `model(x)` returns (kind "op_norm"). Untrained ('') labels are not outputs
(torchxrayvision gives them 0.5 after op_norm, or a meaningless logit). `output_scores` gives each output's logit
(Grad-CAM differentiates logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from metachex_jax.models.densenet import DenseNet, linear_init

OPNORM_SUFFIX = "_opnorm"


def op_norm(probabilities, thresholds):
    """torchxrayvision's `op_norm`: each column's threshold t maps to 0.5, linearly on either side of it.

    `thresholds` (K,) floats; NaN columns give 0.5 (as torchxrayvision's)."""
    t = jnp.asarray(thresholds, jnp.float32)
    below = probabilities / (t * 2.0)
    above = 1.0 - (1.0 - probabilities) / ((1.0 - t) * 2.0)
    out = jnp.where(probabilities < t, below, above)
    return jnp.where(jnp.isnan(t), 0.5, out)


class XRVDenseNet(nnx.Module):
    """torchxrayvision's `models.DenseNet`: backbone (`DenseNet`, 1 input channel, no classifier) + classifier."""

    def __init__(self, arch: str = "densenet121", *, labels: Sequence[str], op_thresholds: Sequence[float | None],
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if len(op_thresholds) != len(labels):
            raise ValueError(f"{len(labels)} labels but {len(op_thresholds)} op thresholds")
        self.backbone = DenseNet(arch, num_classes=None, in_channels=1, dtype=dtype, rngs=rngs)
        self.classifier = nnx.Linear(self.backbone.num_features, len(labels), kernel_init=linear_init,
                                     bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)
        self.labels = tuple(str(label) for label in labels)
        # None, not NaN: the module's static structure is compared by value (jit caches), and NaN != NaN.
        self.op_thresholds = tuple(None if t is None or t != t else float(t) for t in op_thresholds)

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def features(self, x):
        """Pooled (N, num_features) float32 features: torchxrayvision's `features2`."""
        return self.backbone.features(x).astype(jnp.float32)

    def logits(self, features):
        return self.classifier(features).astype(jnp.float32)

    def __call__(self, x):
        return self.logits(self.features(x))

    def op_normalized(self, logits):
        """What torchxrayvision's `model(x)` returns with its thresholds: op_norm(sigmoid(logits))."""
        nan = float("nan")
        return op_norm(jax.nn.sigmoid(logits), [nan if t is None else t for t in self.op_thresholds])

    def output_kinds(self) -> dict[str, str]:
        kinds = {}
        for label, threshold in zip(self.labels, self.op_thresholds):
            if label:
                kinds[label] = "probability"
                if threshold is not None:
                    kinds[label + OPNORM_SUFFIX] = "op_norm"
        return kinds

    def output_op_thresholds(self) -> dict[str, float]:
        """The op_norm outputs' thresholds, by output name."""
        return {label + OPNORM_SUFFIX: t for label, t in zip(self.labels, self.op_thresholds)
                if label and t is not None}

    def output_scores(self, features) -> dict[str, Any]:
        logits = self.logits(features)
        scores = {}
        for j, (label, threshold) in enumerate(zip(self.labels, self.op_thresholds)):
            if label:
                scores[label] = logits[:, j]
                if threshold is not None:
                    scores[label + OPNORM_SUFFIX] = logits[:, j]
        return scores


def build_xrv_model(model_config, rngs: nnx.Rngs | None = None) -> XRVDenseNet:
    """The model a "torchxrayvision" model card's `model_config` describes (arch, labels, op_thresholds, dtype)."""
    return XRVDenseNet(model_config.arch, labels=tuple(model_config.labels),
                       op_thresholds=tuple(model_config.op_thresholds),
                       dtype=jnp.dtype(model_config.get("dtype", "float32")), rngs=rngs or nnx.Rngs(0))
