"""MetaChexNet: a DenseNet backbone whose pooled features feed pathology, metadata and age heads.

    features = backbone(x)                        (N, 1024) for DenseNet-121
    pathology  = Linear(features) -> 14 logits    (sigmoid; CheXNet's labels, `labels.PATHOLOGIES`)
    metadata   = Linear(features) -> 2 logits     (sigmoid; `labels.METADATA_TASKS`: view AP?, sex male?)
    age        = Linear -> ReLU -> Linear -> 1    (regression through an intermediate layer)

The age head regresses a normalised age z; `age_years = age_mean + age_std * z`. Both are returned.
Which heads exist comes from the config: the CheXNet baseline is the pathology head alone.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from metachex_jax.contract.pixels import channels_of
from metachex_jax.core.labels import METADATA_TASKS, PATHOLOGIES
from metachex_jax.models.densenet import DenseNet, linear_init


def head(cin: int, cout: int, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(cin, cout, kernel_init=linear_init, bias_init=nnx.initializers.zeros, dtype=dtype,
                      rngs=rngs)


class MetaChexNet(nnx.Module):
    """Multi-task chest X-ray network.

    Args:
      arch: backbone architecture, a key of `metachex_jax.models.SPECS`.
      num_pathologies: size of the pathology head (0 for none).
      pathology_names: the head's label names (default: NIH's 14 when it has 14 outputs); a model pretrained on a
        mixture with extra labels has NIH's 14 followed by them (data/input/mixture.py).
      metadata_tasks: names of the binary metadata logits (empty for no metadata head).
      age_hidden: width of the age head's intermediate layer (0 for no age head).
      age_mean, age_std: years; the age head predicts (age - age_mean) / age_std.
      in_channels: input channels of the backbone's stem (3, or 1 for a torchxrayvision backbone).
      dtype: computation dtype; parameters stay float32.
      scan_layers, remat: how the backbone stores and runs its dense blocks (see `DenseNet`).
    """

    def __init__(self, arch: str = "densenet121", *, num_pathologies: int = len(PATHOLOGIES),
                 metadata_tasks: tuple[str, ...] = METADATA_TASKS, age_hidden: int = 256,
                 age_mean: float = 47.0, age_std: float = 17.0, in_channels: int = 3, dtype: Any = jnp.float32,
                 scan_layers: bool = False, remat: bool = False,
                 pathology_names: tuple[str, ...] | None = None, rngs: nnx.Rngs):
        if pathology_names is not None and len(pathology_names) != num_pathologies:
            raise ValueError(f"{len(pathology_names)} pathology names for a head of {num_pathologies}")
        if pathology_names is None and num_pathologies == len(PATHOLOGIES):
            pathology_names = PATHOLOGIES
        self._pathology_names = tuple(pathology_names or (f"pathology_{i}" for i in range(num_pathologies)))
        self.backbone = DenseNet(arch, num_classes=None, in_channels=in_channels, dtype=dtype,
                                 scan_layers=scan_layers, remat=remat, rngs=rngs)
        f = self.backbone.num_features
        self.metadata_tasks = tuple(metadata_tasks)
        self.age_mean, self.age_std = float(age_mean), float(age_std)
        self.pathology_head = head(f, num_pathologies, dtype, rngs) if num_pathologies else None
        self.metadata_head = head(f, len(metadata_tasks), dtype, rngs) if metadata_tasks else None
        self.age_hidden = head(f, age_hidden, dtype, rngs) if age_hidden else None
        self.age_out = head(age_hidden, 1, dtype, rngs) if age_hidden else None

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def features(self, x):
        """Frozen-probe features: the backbone's pooled (N, num_features) output, float32."""
        return self.backbone.features(x).astype(jnp.float32)

    def heads(self, features) -> dict[str, Any]:
        """Apply the configured heads to pooled features; outputs are float32."""
        out = {}
        if self.pathology_head is not None:
            out["pathology"] = self.pathology_head(features).astype(jnp.float32)
        if self.metadata_head is not None:
            out["metadata"] = self.metadata_head(features).astype(jnp.float32)
        if self.age_out is not None:
            z = self.age_out(nnx.relu(self.age_hidden(features)))[..., 0].astype(jnp.float32)
            out["age_z"] = z
            out["age"] = self.age_mean + self.age_std * z
        return out

    def __call__(self, x) -> dict[str, Any]:
        return self.heads(self.backbone.features(x))

    def output_kinds(self) -> dict[str, str]:
        """The named outputs `predict` reports, in order: name -> "probability" (a sigmoid of a logit) or "years".

        Pathologies by their label names (CheXNet's order), then the metadata tasks (`view_ap`: P(AP view),
        `sex_male`: P(male)), then `age`.
        """
        kinds = {name: "probability" for name in self.pathology_names()}
        kinds.update({task: "probability" for task in self.metadata_tasks})
        if self.age_out is not None:
            kinds["age"] = "years"
        return kinds

    def output_scores(self, features) -> dict[str, Any]:
        """Each named output's score from pooled features, (N,) float32: the logit of a probability, or years.

        Grad-CAM differentiates these (logits rather than probabilities, which saturate).
        """
        heads = self.heads(features)
        scores = {}
        for j, name in enumerate(self.pathology_names()):
            scores[name] = heads["pathology"][:, j]
        for j, task in enumerate(self.metadata_tasks):
            scores[task] = heads["metadata"][:, j]
        if "age" in heads:
            scores["age"] = heads["age"]
        return scores

    def pathology_names(self) -> tuple[str, ...]:
        return self._pathology_names if self.pathology_head is not None else ()


def resolve_scan_layers(value, backend: str | None = None) -> bool:
    """config.model.scan_layers -> bool: "auto" scans the dense blocks on CPU and unrolls them elsewhere (the
    measured defaults, the docs' Benchmarks page); "yes"/"no" (or a bool) choose explicitly."""
    if isinstance(value, bool):
        return value
    choice = str(value).strip().lower()
    if choice == "auto":
        return (backend or jax.default_backend()) == "cpu"
    if choice in ("yes", "true", "1"):
        return True
    if choice in ("no", "false", "0"):
        return False
    raise ValueError(f"model.scan_layers must be 'auto', 'yes' or 'no', got {value!r}")


def build_model(model_config, rngs: nnx.Rngs) -> MetaChexNet:
    """Build the model a config's `model` section describes (the recipes: `metachex_jax.configs`).

    The stem's input channels follow the pixel contract's normalisation (`model_config.normalization`; configs
    saved before it existed are "imagenet": 3 channels)."""
    names = model_config.get("pathology_names")  # written by the trainer for mixtures with extra labels
    return MetaChexNet(
        model_config.arch,
        num_pathologies=len(names) if names else model_config.num_pathologies,
        pathology_names=tuple(names) if names else None,
        metadata_tasks=tuple(model_config.metadata_tasks),
        age_hidden=model_config.age_hidden,
        age_mean=model_config.age_mean,
        age_std=model_config.age_std,
        in_channels=channels_of(model_config.get("normalization", "imagenet")),
        dtype=jnp.dtype(model_config.dtype),
        # .get: configs saved with checkpoints before these fields existed
        scan_layers=resolve_scan_layers(model_config.get("scan_layers", False)),
        remat=model_config.get("remat", False),
        rngs=rngs,
    )
