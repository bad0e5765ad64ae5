"""DenseNet (Huang et al., 2017) in Flax NNX with torchvision's exact topology and parameter layout.

Layout mirrors torchvision's `features.*` / `classifier` modules one to one, so that converting weights is a
renaming (see `metachex_jax.convert`):

    conv0, norm0                      stem: 7x7/2 conv (no bias), BN, ReLU, 3x3/2 max-pool (padding 1)
    blocks[b].layers[l].norm1/conv1   BN-ReLU-1x1 conv (bn_size * growth channels)
                       .norm2/conv2   BN-ReLU-3x3 conv (growth channels), output concatenated to the input
    transitions[b].norm/conv          BN-ReLU-1x1 conv (half the channels)-2x2/2 avg-pool
    norm5                             final BN, ReLU, global average pool -> `num_features` features
    classifier                        optional Linear(num_features, num_classes)

Inputs are NHWC floats normalised as `metachex_jax.preprocessing.to_model_input` documents.
BatchNorm uses momentum 0.9 (Flax convention; torch's 0.1) and epsilon 1e-5 like torchvision. Under `jit` with
a data-sharded batch the batch statistics are computed over the global batch (synchronised BN). One remaining
difference from torch: torch updates `running_var` with the unbiased batch variance (n / (n - 1)), Flax with
the biased one; n = N*H*W is at least a few hundred here, so the difference is below 0.3%.

Train / eval mode: `model.train()` (batch statistics, updated in place) and `model.eval()` (running statistics).

Speed on CPU: the forward computes exactly torchvision's function, but three steps are written in a form that
XLA's CPU backend runs faster (each replaces one library call; see the helpers below): the 1x1 convolutions are
matmuls over the channel axis, the stem's max-pool is a maximum over nine strided slices (XLA's gradient of a
reduce_window max-pool is a slow select_and_scatter), and each transition pools before its 1x1 convolution
(both are linear, so the order does not change the result; the convolution then sees 4x fewer pixels).
Outputs, gradients and BatchNorm statistics agree with the straightforward version to float32 rounding; in
float64 to ~1e-15. `python -m metachex_jax.bench train --torch` measures the train step against torchvision.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax


@dataclasses.dataclass(frozen=True)
class DenseNetSpec:
    """Architecture hyper-parameters, named as in torchvision's `DenseNet.__init__`."""

    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4

    @property
    def num_features(self) -> int:
        """Width of the pooled feature vector (1024 for DenseNet-121)."""
        c = self.num_init_features
        for i, n in enumerate(self.block_config):
            c += n * self.growth_rate
            if i != len(self.block_config) - 1:
                c //= 2
        return c


SPECS = {
    "densenet121": DenseNetSpec(32, (6, 12, 24, 16), 64),
    "densenet169": DenseNetSpec(32, (6, 12, 32, 32), 64),
    "densenet201": DenseNetSpec(32, (6, 12, 48, 32), 64),
    "densenet161": DenseNetSpec(48, (6, 12, 36, 24), 96),
    # For tests: same code path, a few thousand parameters.
    "densenet_tiny": DenseNetSpec(8, (2, 2, 2, 2), 16, bn_size=2),
}

def host_initializer(scale: float, distribution: str):
    """torchvision's initialisers, drawn with numpy from a seed derived from the JAX key.

    `scale / fan_in` is the variance; "normal" is *not* truncated (torch's kaiming_normal_ is not), "uniform"
    draws from +-sqrt(3 * variance). Why numpy: XLA on CPU compiles every distinct `jax.random` draw separately
    (~0.15 s each), which made building DenseNet-121 take over 20 s; numpy draws the same distributions in
    milliseconds and is deterministic for a given key. Under tracing (jit, eval_shape) the key is abstract,
    so the draw falls back to `jax.random`.
    """
    def init(key, shape, dtype=jnp.float32):
        fan_in = math.prod(shape[:-1])  # Flax kernels are (..., in, out): every axis but the last feeds one output
        std = math.sqrt(scale / fan_in)
        if isinstance(key, jax.core.Tracer):
            if distribution == "normal":
                return std * jax.random.normal(key, shape, dtype)
            return jax.random.uniform(key, shape, dtype, -math.sqrt(3) * std, math.sqrt(3) * std)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
        if distribution == "normal":
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        else:
            value = rng.uniform(-math.sqrt(3) * std, math.sqrt(3) * std, shape).astype(np.float32)
        return jnp.asarray(value, dtype)
    return init


# torchvision initialisation: kaiming_normal_ (fan_in, gain sqrt(2)) for convolutions, torch's default Linear
# init (uniform +-1/sqrt(fan_in)) with zero bias for the classifier; BatchNorm scale 1, bias 0.
conv_init = host_initializer(2.0, "normal")
linear_init = host_initializer(1.0 / 3.0, "uniform")


def batch_norm(num_features: int, dtype: Any, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(num_features, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)


def conv(cin: int, cout: int, kernel: int, stride: int, padding: int, dtype: Any, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, (kernel, kernel), (stride, stride), padding=[(padding, padding)] * 2,
                    use_bias=False, kernel_init=conv_init, dtype=dtype, rngs=rngs)


# Forward helpers: each computes what the nnx.Conv / nnx.max_pool / nnx.avg_pool call it replaces computes
# (the same sums, possibly in another order) in a form XLA's CPU backend runs faster.

def pointwise_conv(conv: nnx.Conv, x):
    """`conv(x)` for a 1x1, stride-1, unpadded, bias-free `conv`, as a matmul over the channel axis."""
    x, kernel = nnx.nn.dtypes.promote_dtype((x, conv.kernel[...]), dtype=conv.dtype)
    return lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))


def max_pool_3x3_stride2(x):
    """torch's MaxPool2d(3, stride=2, padding=1) on NHWC: the maximum of the nine strided window offsets."""
    _, h, w, _ = x.shape
    out_h, out_w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    offsets = [padded[:, i:i + 2 * out_h - 1:2, j:j + 2 * out_w - 1:2, :] for i in range(3) for j in range(3)]
    return functools.reduce(jnp.maximum, offsets)


def avg_pool_2x2(x):
    """torch's AvgPool2d(2, stride=2) on NHWC (an odd last row/column is dropped, as torch does)."""
    n, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2, :]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class DenseLayer(nnx.Module):
    """BN-ReLU-1x1 conv-BN-ReLU-3x3 conv; returns only the `growth_rate` new channels."""

    def __init__(self, cin: int, spec: DenseNetSpec, dtype: Any, rngs: nnx.Rngs):
        width = spec.bn_size * spec.growth_rate
        self.norm1 = batch_norm(cin, dtype, rngs)
        self.conv1 = conv(cin, width, 1, 1, 0, dtype, rngs)
        self.norm2 = batch_norm(width, dtype, rngs)
        self.conv2 = conv(width, spec.growth_rate, 3, 1, 1, dtype, rngs)

    def __call__(self, x):
        x = pointwise_conv(self.conv1, nnx.relu(self.norm1(x)))
        return self.conv2(nnx.relu(self.norm2(x)))


class DenseBlock(nnx.Module):
    def __init__(self, num_layers: int, cin: int, spec: DenseNetSpec, dtype: Any, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [DenseLayer(cin + i * spec.growth_rate, spec, dtype, rngs) for i in range(num_layers)])

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.concatenate([x, layer(x)], axis=-1)
        return x


class Transition(nnx.Module):
    def __init__(self, cin: int, cout: int, dtype: Any, rngs: nnx.Rngs):
        self.norm = batch_norm(cin, dtype, rngs)
        self.conv = conv(cin, cout, 1, 1, 0, dtype, rngs)

    def __call__(self, x):
        # torchvision convolves, then pools; both are linear, so pooling first gives the same result
        # (up to float rounding) with a 4x cheaper convolution.
        return pointwise_conv(self.conv, avg_pool_2x2(nnx.relu(self.norm(x))))


class DenseNet(nnx.Module):
    """DenseNet backbone with an optional classifier.

    Args:
      arch: a key of `SPECS` ("densenet121", ...) or a `DenseNetSpec`.
      num_classes: size of the classifier; None builds the backbone alone (`__call__` returns features).
      in_channels: input channels of the stem convolution: 3 (ImageNet-style input) or 1 (torchxrayvision's
        gray input); the pixel contract's normalisation decides which (`preprocessing.channels_of`).
      dtype: computation dtype (e.g. jnp.bfloat16); parameters and BatchNorm statistics stay float32.
    """

    def __init__(self, arch: str | DenseNetSpec = "densenet121", *, num_classes: int | None = 1000,
                 in_channels: int = 3, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if isinstance(arch, str) and arch not in SPECS:
            raise ValueError(f"unknown DenseNet architecture {arch!r}; choose one of {sorted(SPECS)}")
        spec = SPECS[arch] if isinstance(arch, str) else arch
        self.spec = spec
        self.in_channels = in_channels
        self.conv0 = conv(in_channels, spec.num_init_features, 7, 2, 3, dtype, rngs)
        self.norm0 = batch_norm(spec.num_init_features, dtype, rngs)
        blocks, transitions = [], []
        c = spec.num_init_features
        for i, n in enumerate(spec.block_config):
            blocks.append(DenseBlock(n, c, spec, dtype, rngs))
            c += n * spec.growth_rate
            if i != len(spec.block_config) - 1:
                transitions.append(Transition(c, c // 2, dtype, rngs))
                c //= 2
        self.blocks = nnx.List(blocks)
        self.transitions = nnx.List(transitions)
        self.norm5 = batch_norm(c, dtype, rngs)
        self.num_features = c
        self.classifier = (
            nnx.Linear(c, num_classes, kernel_init=linear_init, bias_init=nnx.initializers.zeros,
                       dtype=dtype, rngs=rngs)
            if num_classes else None)

    def layer_names(self) -> tuple[str, ...]:
        """The stages `feature_map` can tap, in forward order ("final" is the tensor that is pooled)."""
        names = ["stem"]
        for i in range(len(self.blocks)):
            names.append(f"block{i + 1}")
            if i < len(self.transitions):
                names.append(f"transition{i + 1}")
        return (*names, "final")

    def feature_map(self, x, tap: str | None = None, delta=None):
        """The tensor that is pooled: ReLU(norm5(...)), (N, h, w, num_features).

        With `tap` (a name of `layer_names()`), returns (feature map, that stage's output) and adds `delta` (same
        shape, or None) to the stage's output first: the gradient of anything computed from the result with
        respect to `delta` at 0 is the gradient with respect to that activation (Grad-CAM uses this).
        """
        tapped = None

        def stage(name, value):
            nonlocal tapped
            if name == tap:
                value = value if delta is None else value + delta
                tapped = value
            return value

        x = stage("stem", max_pool_3x3_stride2(nnx.relu(self.norm0(self.conv0(x)))))
        for i, block in enumerate(self.blocks):
            x = stage(f"block{i + 1}", block(x))
            if i < len(self.transitions):
                x = stage(f"transition{i + 1}", self.transitions[i](x))
        x = stage("final", nnx.relu(self.norm5(x)))
        if tap is None:
            return x
        if tapped is None:
            raise ValueError(f"unknown layer {tap!r}; choose one of {', '.join(self.layer_names())}")
        return x, tapped

    def features(self, x):
        """Pooled features (N, num_features) after the final BN-ReLU and global average pooling."""
        return jnp.mean(self.feature_map(x), axis=(1, 2))

    def __call__(self, x):
        f = self.features(x)
        return self.classifier(f) if self.classifier is not None else f


def _named(arch: str):
    def build(num_classes: int | None = 1000, *, rngs: nnx.Rngs | None = None, **kw) -> DenseNet:
        return DenseNet(arch, num_classes=num_classes, rngs=rngs or nnx.Rngs(0), **kw)
    build.__name__ = build.__qualname__ = arch.replace("densenet", "DenseNet")
    build.__doc__ = f"torchvision-compatible {arch}; see `DenseNet` for the arguments."
    return build


DenseNet121 = _named("densenet121")
DenseNet169 = _named("densenet169")
DenseNet201 = _named("densenet201")


def count_params(model: nnx.Module) -> int:
    """Trainable parameters (nnx.Param), the figure torch reports; BatchNorm statistics excluded."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
