"""DenseNet (Huang et al., 2017) in Flax NNX with torchvision's exact topology and parameter layout.

Layout mirrors torchvision's `features.*` / `classifier` modules one to one, so that converting weights is a
renaming (see `metachex_jax.interop.convert`):

    conv0, norm0                      stem: 7x7/2 conv (no bias), BN, ReLU, 3x3/2 max-pool (padding 1)
    blocks[b].layers[l].norm1/conv1   BN-ReLU-1x1 conv (bn_size * growth channels)
                       .norm2/conv2   BN-ReLU-3x3 conv (growth channels), output concatenated to the input
    transitions[b].norm/conv          BN-ReLU-1x1 conv (half the channels)-2x2/2 avg-pool
    norm5                             final BN, ReLU, global average pool -> `num_features` features
    classifier                        optional Linear(num_features, num_classes)

Inputs are NHWC floats normalised as `metachex_jax.contract.pixels.to_model_input` documents.
BatchNorm uses momentum 0.9 (Flax convention; torch's 0.1) and epsilon 1e-5 like torchvision. Under `jit` with
a data-sharded batch the batch statistics are computed over the global batch (synchronised BN). One remaining
difference from torch: torch updates `running_var` with the unbiased batch variance (n / (n - 1)), Flax with
the biased one; n = N*H*W is at least a few hundred here, so the difference is below 0.3%.

Train / eval mode: `model.train()` (batch statistics, updated in place) and `model.eval()` (running statistics).

Two forms of the same network (`scan_layers`; see `DenseBlock`): unrolled (the layout above) and scanned, which
stores each block's layers stacked (`blocks[b].stacked.*`, zero-padded to the block's final width) and runs them
with one `lax.scan`, so that XLA compiles one layer body per block instead of every layer. `convert_layout` and
`set_block_options` convert between the two exactly; `remat` recomputes each dense layer in the backward pass.

Speed on CPU: the forward computes exactly torchvision's function, but some steps are written in a form that
XLA's CPU backend runs faster: the 1x1 convolutions are matmuls over the channel axis, each transition pools
before its 1x1 convolution (both are linear, so the order does not change the result; the convolution then sees
4x fewer pixels), and on CPU the backward passes of BN-ReLU-conv, the stem convolution and the max-pool are
written by hand (`metachex_jax.models.ops`). Outputs, gradients and BatchNorm statistics agree with the
straightforward version to float32 rounding; in float64 to ~1e-15. `python -m metachex_jax.bench train
--torch` measures the train step against torchvision.
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

from metachex_jax.models import ops


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


def pointwise_conv(conv: nnx.Conv, x):
    """`conv(x)` for a 1x1, stride-1, unpadded, bias-free `conv`, as a matmul over the channel axis."""
    x, kernel = nnx.nn.dtypes.promote_dtype((x, conv.kernel[...][0, 0]), dtype=conv.dtype)
    return ops.pointwise(x, kernel)


def norm_arrays(norm) -> dict[str, jax.Array]:
    """A BatchNorm's variables (nnx.BatchNorm or StackedBatchNorm) as a dict of arrays."""
    return {"scale": norm.scale[...], "bias": norm.bias[...], "mean": norm.mean[...], "var": norm.var[...]}


def update_running_stats(norm, mean, var, where=None) -> None:
    """nnx.BatchNorm's update of its running averages from one batch's statistics (only where `where`)."""
    new_mean = norm.momentum * norm.mean[...] + (1 - norm.momentum) * mean
    new_var = norm.momentum * norm.var[...] + (1 - norm.momentum) * var
    if where is not None:
        new_mean, new_var = jnp.where(where, new_mean, norm.mean[...]), jnp.where(where, new_var, norm.var[...])
    norm.mean[...], norm.var[...] = new_mean, new_var


def dense_layer(p: dict[str, Any], x, *, train: bool, epsilon: float, dtype: Any):
    """One dense layer on arrays: BN-ReLU-1x1 conv-BN-ReLU-3x3 conv. Returns (new features, batch statistics).

    `p` holds the layer's arrays: p["norm1"], p["norm2"] (`norm_arrays`), p["conv1"] the 1x1 kernel as an
    (in, out) matrix, p["conv2"] the 3x3 kernel (3, 3, in, out). The statistics are
    {"norm1": (mean, var), "norm2": (mean, var)} in training mode, None in evaluation mode.
    """
    h, stats1 = ops.bn_relu_conv(x, p["norm1"], p["conv1"], train=train, epsilon=epsilon, dtype=dtype)
    out, stats2 = ops.bn_relu_conv(h, p["norm2"], p["conv2"], train=train, epsilon=epsilon, dtype=dtype)
    return out, ({"norm1": stats1, "norm2": stats2} if train else None)


class DenseLayer(nnx.Module):
    """BN-ReLU-1x1 conv-BN-ReLU-3x3 conv; returns only the `growth_rate` new channels."""

    def __init__(self, cin: int, spec: DenseNetSpec, dtype: Any, rngs: nnx.Rngs):
        width = spec.bn_size * spec.growth_rate
        self.norm1 = batch_norm(cin, dtype, rngs)
        self.conv1 = conv(cin, width, 1, 1, 0, dtype, rngs)
        self.norm2 = batch_norm(width, dtype, rngs)
        self.conv2 = conv(width, spec.growth_rate, 3, 1, 1, dtype, rngs)

    def arrays(self) -> dict[str, Any]:
        """The layer's variables as `dense_layer` takes them."""
        return {"norm1": norm_arrays(self.norm1), "conv1": self.conv1.kernel[...][0, 0],
                "norm2": norm_arrays(self.norm2), "conv2": self.conv2.kernel[...]}

    def function(self):
        """`dense_layer` with this layer's settings bound: a pure function (arrays, x) -> (out, statistics)."""
        return functools.partial(dense_layer, train=not self.norm1.use_running_average,
                                 epsilon=self.norm1.epsilon, dtype=self.conv2.dtype)

    def update_stats(self, stats) -> None:
        """Folds one batch's statistics (from `function()`) into the running averages; None: evaluation mode."""
        if stats is not None:
            update_running_stats(self.norm1, *stats["norm1"])
            update_running_stats(self.norm2, *stats["norm2"])

    def __call__(self, x):
        out, stats = self.function()(self.arrays(), x)
        self.update_stats(stats)
        return out


class StackedBatchNorm(nnx.Module):
    """The BatchNorms of a scanned block's layers: scale, bias (nnx.Param), mean, var (nnx.BatchStat), each
    (layers, channels); the attributes `model.train()` / `model.eval()` and BatchNorm calibration use."""

    def __init__(self, scale, bias, mean, var, *, momentum: float, epsilon: float, dtype: Any,
                 use_running_average: bool):
        self.scale, self.bias = nnx.Param(scale), nnx.Param(bias)
        self.mean, self.var = nnx.BatchStat(mean), nnx.BatchStat(var)
        self.momentum, self.epsilon, self.dtype = momentum, epsilon, dtype
        self.use_running_average = use_running_average


class StackedConv(nnx.Module):
    """The kernels of one convolution of a scanned block's layers: (layers, kh, kw, in, out)."""

    def __init__(self, kernel, dtype: Any):
        self.kernel = nnx.Param(kernel)
        self.dtype = dtype


# Which axis of each per-layer variable grows with the layer's input width (padded when stacked).
_PADDED_AXIS = {("norm1", "scale"): -1, ("norm1", "bias"): -1, ("norm1", "mean"): -1, ("norm1", "var"): -1,
                ("conv1", "kernel"): -2}


def stack_layers(layers: list[dict], width: int) -> dict:
    """Per-layer variables {"norm1": {"scale": ...}, "conv1": {"kernel": ...}, ...} (pure dicts, one per layer)
    -> the same names holding arrays stacked along a new leading axis, each layer's input-width axis
    zero-padded to `width` (a variance padded with 1). Exact inverse: `unstack_layers`."""
    def pad(path, value):
        axis = _PADDED_AXIS.get(path)
        if axis is None:
            return value
        widths = [(0, 0)] * value.ndim
        widths[axis] = (0, width - value.shape[axis])
        return jnp.pad(value, widths, constant_values=1.0 if path[1] == "var" else 0.0)

    return {sub: {name: jnp.stack([pad((sub, name), layer[sub][name]) for layer in layers])
                  for name in layers[0][sub]} for sub in layers[0]}


def unstack_layers(stacked: dict, widths: list[int]) -> list[dict]:
    """Inverse of `stack_layers`: layer l's variables, its input-width axis cut to `widths[l]`."""
    def cut(path, value, width):
        axis = _PADDED_AXIS.get(path)
        return value if axis is None else lax.slice_in_dim(value, 0, width, axis=axis % value.ndim)

    return [{sub: {name: cut((sub, name), value[l], width) for name, value in names.items()}
             for sub, names in stacked.items()} for l, width in enumerate(widths)]


def block_input_widths(spec: DenseNetSpec) -> list[int]:
    """Input width of each dense block."""
    widths, c = [], spec.num_init_features
    for n in spec.block_config:
        widths.append(c)
        c = (c + n * spec.growth_rate) // 2
    return widths


def convert_layout(tree: dict, spec: DenseNetSpec, scan_layers: bool) -> dict:
    """A pure dict with a DenseNet's nesting (its variables, gradients, optimiser moments, BatchNorm statistics
    alone; the DenseNet anywhere inside, e.g. under "backbone") with every dense block converted to the scanned
    (`blocks[b].stacked`) or unrolled (`blocks[b].layers[l]`) layout, exactly. Already converted blocks and
    everything else are returned as they are."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "blocks" and isinstance(value, dict) and len(value) == len(spec.block_config):
            out[key] = {b: _convert_block(block, spec, b, scan_layers) for b, block in value.items()}
        else:
            out[key] = convert_layout(value, spec, scan_layers)
    return out


def _convert_block(block: dict, spec: DenseNetSpec, b, scan_layers: bool) -> dict:
    cin, n = block_input_widths(spec)[int(b)], spec.block_config[int(b)]
    widths = [cin + l * spec.growth_rate for l in range(n)]
    rest = {k: v for k, v in block.items() if k not in ("layers", "stacked")}
    if scan_layers and "layers" in block:
        layers = [block["layers"][l] for l in sorted(block["layers"], key=int)]
        return {**rest, "stacked": stack_layers(layers, cin + n * spec.growth_rate)}
    if not scan_layers and "stacked" in block:
        return {**rest, "layers": dict(enumerate(unstack_layers(block["stacked"], widths)))}
    return block


class DenseBlock(nnx.Module):
    """Dense layers, each fed the concatenation of the block's input and every earlier layer's output.

    Two forms compute the same function:
      unrolled (default)   `layers[l]` (torchvision's layout); one concatenation per layer. XLA compiles every
                           layer separately: a DenseNet-121 train step takes about a minute to compile on CPU.
      scan_layers=True     `stacked.*`: each variable of the block's layers stacked along a leading axis, norm1 /
                           conv1 zero-padded to the block's final width. A `lax.scan` over the layers runs on a
                           buffer of that width: layer l reads the whole buffer (scale, bias and kernel rows are
                           0 for channels not yet written, masked so they stay 0, so those channels contribute
                           exactly nothing) and writes its `growth_rate` channels at cin + l * growth_rate. XLA
                           compiles one layer body per block, at the cost of norm1 / conv1 over the full width
                           (about 1.6x their work in DenseNet-121). Training runs `ops.dense_block_scan`.
    `set_scan_layers` converts between them in place (`stack_layers` / `unstack_layers`, exact).
    remat=True: the backward pass recomputes each layer instead of keeping its activations (torchvision's
    memory_efficient=True): unrolled, `jax.checkpoint` on each layer, which takes the separate feature maps (so
    that not even the concatenation is kept); scanned, the bottleneck activations are recomputed.
    """

    def __init__(self, num_layers: int, cin: int, spec: DenseNetSpec, dtype: Any, rngs: nnx.Rngs, *,
                 scan_layers: bool = False, remat: bool = False):
        self.spec, self.cin, self.growth_rate, self.num_layers = spec, cin, spec.growth_rate, num_layers
        self.remat = remat
        # Built unrolled (so that a seed gives the same weights in both forms), then stacked if asked.
        self.layers = nnx.List(
            [DenseLayer(cin + i * spec.growth_rate, spec, dtype, rngs) for i in range(num_layers)])
        self.stacked = nnx.data(None)  # data (not a static attribute), as the stacked variables it holds later
        if scan_layers:
            self.set_scan_layers(True)

    @property
    def scan_layers(self) -> bool:
        return self.stacked is not None

    @property
    def widths(self) -> list[int]:
        """Input width of each layer."""
        return [self.cin + l * self.growth_rate for l in range(self.num_layers)]

    @property
    def width(self) -> int:
        """The block's output width."""
        return self.cin + self.num_layers * self.growth_rate

    def set_scan_layers(self, scan_layers: bool) -> None:
        """Converts the block's variables to the scanned (stacked) or unrolled form, in place, exactly."""
        if scan_layers == self.scan_layers:
            return
        if scan_layers:
            first = self.layers[0]
            stacked = stack_layers([nnx.to_pure_dict(nnx.state(layer)) for layer in self.layers], self.width)
            norm = lambda name: StackedBatchNorm(
                **stacked[name], momentum=getattr(first, name).momentum, epsilon=getattr(first, name).epsilon,
                dtype=getattr(first, name).dtype, use_running_average=getattr(first, name).use_running_average)
            self.stacked = nnx.Dict(
                norm1=norm("norm1"), conv1=StackedConv(stacked["conv1"]["kernel"], first.conv1.dtype),
                norm2=norm("norm2"), conv2=StackedConv(stacked["conv2"]["kernel"], first.conv2.dtype))
            self.layers = nnx.data(None)
        else:
            s = self.stacked
            per_layer = unstack_layers(nnx.to_pure_dict(nnx.state(s)), self.widths)
            layers = nnx.eval_shape(lambda: [DenseLayer(w, self.spec, s["conv2"].dtype, nnx.Rngs(0))
                                             for w in self.widths])
            for layer, values in zip(layers, per_layer):
                nnx.update(layer, values)
                for norm, stacked_norm in ((layer.norm1, s["norm1"]), (layer.norm2, s["norm2"])):
                    norm.momentum, norm.epsilon = stacked_norm.momentum, stacked_norm.epsilon
                    norm.use_running_average = stacked_norm.use_running_average
            self.layers = nnx.List(layers)
            self.stacked = nnx.data(None)

    def __call__(self, x):
        return self._scanned(x) if self.scan_layers else self._unrolled(x)

    def _unrolled(self, x):
        if not self.remat:
            for layer in self.layers:
                x = jnp.concatenate([x, layer(x)], axis=-1)
            return x
        # The checkpointed function takes the separate feature maps and concatenates them itself, so that the
        # concatenation (the part of a DenseNet's memory that grows quadratically) is not kept either.
        features = [x]
        for layer in self.layers:
            run = jax.checkpoint(lambda p, *fs, f=layer.function(): f(p, jnp.concatenate(fs, axis=-1)))
            new, stats = run(layer.arrays(), *features)
            layer.update_stats(stats)
            features.append(new)
        return jnp.concatenate(features, axis=-1)

    def _scanned(self, x):
        s = self.stacked
        widths = np.asarray(self.widths)
        mask = np.arange(self.width)[None, :] < widths[:, None]  # (layers, width): channels each layer reads
        p = {"norm1": {k: v * mask if k in ("scale", "bias") else v for k, v in norm_arrays(s["norm1"]).items()},
             "conv1": s["conv1"].kernel[...][:, 0, 0] * mask[:, :, None],
             "norm2": norm_arrays(s["norm2"]), "conv2": s["conv2"].kernel[...]}
        buffer, stats = ops.dense_block_scan(x, p, self.widths, train=not s["norm1"].use_running_average,
                                             epsilon=s["norm1"].epsilon, dtype=s["conv2"].dtype, remat=self.remat)
        if stats is not None:
            update_running_stats(s["norm1"], *stats["norm1"], where=mask)
            update_running_stats(s["norm2"], *stats["norm2"])
        return buffer


class Transition(nnx.Module):
    def __init__(self, cin: int, cout: int, dtype: Any, rngs: nnx.Rngs):
        self.norm = batch_norm(cin, dtype, rngs)
        self.conv = conv(cin, cout, 1, 1, 0, dtype, rngs)

    def __call__(self, x):
        # torchvision convolves, then pools; both are linear, so pooling first gives the same result
        # (up to float rounding) with a 4x cheaper convolution.
        return pointwise_conv(self.conv, ops.avg_pool_2x2(nnx.relu(self.norm(x))))


class DenseNet(nnx.Module):
    """DenseNet backbone with an optional classifier.

    Args:
      arch: a key of `SPECS` ("densenet121", ...) or a `DenseNetSpec`.
      num_classes: size of the classifier; None builds the backbone alone (`__call__` returns features).
      in_channels: input channels of the stem convolution: 3 (ImageNet-style input) or 1 (torchxrayvision's
        gray input); the pixel contract's normalisation decides which (`preprocessing.channels_of`).
      dtype: computation dtype (e.g. jnp.bfloat16); parameters and BatchNorm statistics stay float32.
      scan_layers: store each dense block's layers stacked and run them as a `lax.scan` (one compiled layer
        body per block: much faster compiles); see `DenseBlock`. Same function, same initial weights for a seed;
        `convert_layout` / `set_block_options` convert between the forms.
      remat: recompute each dense layer in the backward pass instead of keeping its activations (less memory,
        more compute; torchvision's memory_efficient=True).
    """

    def __init__(self, arch: str | DenseNetSpec = "densenet121", *, num_classes: int | None = 1000,
                 in_channels: int = 3, dtype: Any = jnp.float32, scan_layers: bool = False, remat: bool = False,
                 rngs: nnx.Rngs):
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
            blocks.append(DenseBlock(n, c, spec, dtype, rngs, scan_layers=scan_layers, remat=remat))
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

        x, kernel = nnx.nn.dtypes.promote_dtype((x, self.conv0.kernel[...]), dtype=self.conv0.dtype)
        x = stage("stem", ops.max_pool_3x3_stride2(nnx.relu(self.norm0(ops.stem_conv(x, kernel)))))
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
    """Trainable parameters (nnx.Param), the figure torch reports; BatchNorm statistics and the zero padding of
    scanned blocks excluded."""
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    for _, block in nnx.iter_modules(model):
        if isinstance(block, DenseBlock) and block.scan_layers:
            padding = sum(block.width - w for w in block.widths)  # channels of norm1 / conv1 that are padding
            total -= padding * (2 + block.stacked["conv1"].kernel.shape[-1])  # scale, bias, kernel row
    return total


def unrolled(model: nnx.Module) -> nnx.Module:
    """`model` itself if no dense block of it is scanned, else an unrolled copy (torchvision's layout; exact)."""
    if not any(isinstance(m, DenseBlock) and m.scan_layers for _, m in nnx.iter_modules(model)):
        return model
    copy = nnx.clone(model)
    set_block_options(copy, scan_layers=False)
    return copy


def batch_norms(model: nnx.Module) -> list:
    """Every BatchNorm of `model`: nnx.BatchNorm and the stacked ones of scanned blocks (`StackedBatchNorm`)."""
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, (nnx.BatchNorm, StackedBatchNorm))]


def set_block_options(model: nnx.Module, *, scan_layers: bool | None = None, remat: bool | None = None) -> None:
    """Switch every dense block of `model` (a DenseNet, or a network holding one) to the scanned or unrolled
    form and/or turn remat on or off, in place. The form conversion is exact (`DenseBlock.set_scan_layers`)."""
    for _, block in nnx.iter_modules(model):
        if isinstance(block, DenseBlock):
            if scan_layers is not None:
                block.set_scan_layers(scan_layers)
            if remat is not None:
                block.remat = remat
