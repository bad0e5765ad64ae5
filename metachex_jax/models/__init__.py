"""Models: the DenseNet backbones and the MetaChexNet multi-task network."""

from metachex_jax.models.densenet import (SPECS, DenseNet, DenseNet121, DenseNet169, DenseNet201, DenseNetSpec,
                                          count_params)
from metachex_jax.models.metachexnet import MetaChexNet, build_model

__all__ = ["SPECS", "DenseNet", "DenseNet121", "DenseNet169", "DenseNet201", "DenseNetSpec", "MetaChexNet",
           "build_model", "count_params"]
