"""Models: the DenseNet backbones and the MetaChexNet multi-task network."""

from metachex_jax.models.densenet import (SPECS, DenseNet, DenseNet121, DenseNet169, DenseNet201, DenseNetSpec,
                                          batch_norms, convert_layout, count_params, set_block_options, unrolled)
from metachex_jax.models.metachexnet import MetaChexNet, build_model, resolve_scan_layers

__all__ = ["SPECS", "DenseNet", "DenseNet121", "DenseNet169", "DenseNet201", "DenseNetSpec", "MetaChexNet",
           "batch_norms", "build_model", "convert_layout", "count_params", "resolve_scan_layers", "set_block_options",
           "unrolled"]
