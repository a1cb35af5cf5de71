"""PResNet (ResNet-vd) backbone of RT-DETR in flax.linen, NHWC.

Follows the official `rtdetr_pytorch/src/nn/backbone/presnet.py` (`PResNet`, `BasicBlock`,
`BottleNeck`, `Blocks`) and `src/nn/backbone/common.py` (`ConvNormLayer`, `FrozenBatchNorm2d`) of
lyuwenyu/RT-DETR. The "vd" variant has a stem of three 3x3 convolutions and, in the first block of
each downsampling stage, a shortcut that average-pools 2x2 before its 1x1 convolution.

Module names are the official attribute names (`conv1.conv1_1.conv`, `res_layers.1.blocks.0.short.conv.norm`),
so a Flax variable path joined with "." is the official state_dict key (see `research/rtdetr/bridge.py`).

This file also holds the small layer helpers the encoder and decoder share: torch's default
initialisers, activations by name, and `ConvNormLayer`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.cpu import pool as pool_lib

ModuleDef = Any
Dtype = Any

BN_MOMENTUM = 0.9  # torch BatchNorm2d momentum 0.1; flax momentum = 1 - torch momentum
BN_EPS = 1e-5
# torch BatchNorm2d semantics: eps 1e-5, momentum 0.1, two-pass variance.
BatchNorm = functools.partial(nn.BatchNorm, momentum=BN_MOMENTUM, epsilon=BN_EPS, use_fast_variance=False)

# depth -> blocks per stage (official ResNet_cfg)
RESNET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


# ----------------------------------------------------------------------------- shared layer helpers

def torch_default_kernel_init() -> nn.initializers.Initializer:
    """torch's default Conv/Linear weight init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """torch's default Conv/Linear bias init: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def constant_init(value: float) -> nn.initializers.Initializer:
    """Initialiser filling every element with `value` (torch `init.constant_`)."""

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.full(shape, value, dtype)

    return init


def activation(name: Optional[str]) -> Callable[[jax.Array], jax.Array]:
    """Activation by its official name (`get_activation` in src/zoo/rtdetr/utils.py).

    Raises:
      ValueError: unknown name.
    """
    if name is None:
        return lambda x: x
    name = name.lower()
    if name == "relu":
        return nn.relu
    if name == "silu":
        return nn.silu
    if name == "gelu":  # torch nn.GELU() is the exact (erf) form
        return functools.partial(nn.gelu, approximate=False)
    if name == "leaky_relu":  # torch default negative_slope
        return functools.partial(nn.leaky_relu, negative_slope=0.01)
    raise ValueError(f"unknown activation {name!r}; expected relu, silu, gelu, leaky_relu or None")


def dense(features: int, name: str, *, dtype=None, param_dtype=jnp.float32, kernel_init=None, bias_init=None,
          fan_in: Optional[int] = None, use_bias: bool = True) -> nn.Dense:
    """A torch-initialised `nn.Dense` (torch.nn.Linear default init unless inits are given).

    fan_in: the input width, for the default bias bound; needed when `bias_init` is None.
    """
    if bias_init is None:
        if fan_in is None:
            raise ValueError("dense: give fan_in or bias_init")
        bias_init = torch_default_bias_init(fan_in)
    return nn.Dense(features, use_bias=use_bias, kernel_init=kernel_init or torch_default_kernel_init(),
                    bias_init=bias_init, dtype=dtype, param_dtype=param_dtype, name=name)


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (official `FrozenBatchNorm2d`).

    The official layer keeps `weight`, `bias`, `running_mean`, `running_var` as buffers, not
    parameters: they are not counted by `model.parameters()` and never trained. Here all four live
    in the `batch_stats` collection (`scale`, `bias`, `mean`, `var`) and are never updated, in
    train mode too. Output: `x * w / sqrt(var + eps) + (b - mean * w / sqrt(var + eps))`.
    """

    epsilon: float = BN_EPS
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, use_running_average: Optional[bool] = None):
        del use_running_average  # always the stored statistics
        c = x.shape[-1]
        w = self.variable("batch_stats", "scale", lambda: jnp.ones((c,), self.param_dtype)).value
        b = self.variable("batch_stats", "bias", lambda: jnp.zeros((c,), self.param_dtype)).value
        rm = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), self.param_dtype)).value
        rv = self.variable("batch_stats", "var", lambda: jnp.ones((c,), self.param_dtype)).value
        scale = w * jax.lax.rsqrt(rv + self.epsilon)
        shift = b - rm * scale
        dtype = self.dtype or x.dtype
        return (x * scale.astype(dtype) + shift.astype(dtype)).astype(dtype)


class ConvNormLayer(nn.Module):
    """Conv2d (symmetric padding (k-1)//2, no bias by default) + norm + activation (official `ConvNormLayer`).

    Input/output `[B, H, W, C]`. Submodules `conv`, `norm`.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: Optional[int] = None
    use_bias: bool = False
    act: Optional[str] = None
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        k, s = self.kernel_size, self.stride
        p = (k - 1) // 2 if self.padding is None else self.padding
        fan_in = x.shape[-1] * k * k
        x = self.conv(self.features, (k, k), strides=(s, s), padding=((p, p), (p, p)), use_bias=self.use_bias,
                      kernel_init=torch_default_kernel_init(), bias_init=torch_default_bias_init(fan_in),
                      dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        x = self.norm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x, use_running_average=not train)
        return activation(self.act)(x)


def avg_pool_2x2_ceil(x: jax.Array) -> jax.Array:
    """torch `AvgPool2d(2, 2, 0, ceil_mode=True)` on `[B, H, W, C]`.

    With ceil_mode an odd H or W gets a last window that hangs over the edge; torch averages only
    its in-bounds elements (padding is 0, so the divisor is clipped to the input).
    """
    b, h, w, c = x.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    total = x.reshape(b, (h + ph) // 2, 2, (w + pw) // 2, 2, c).sum(axis=(2, 4))
    count = np.full(((h + ph) // 2, (w + pw) // 2), 4.0, np.float32)
    if ph:
        count[-1, :] /= 2
    if pw:
        count[:, -1] /= 2
    return total / jnp.asarray(count, x.dtype)[None, :, :, None]


# ----------------------------------------------------------------------------- PResNet

class _PoolConvShortcut(nn.Module):
    """vd shortcut of a downsampling block: 2x2 average pool (ceil mode) then 1x1 ConvNormLayer (`pool`, `conv`)."""

    features: int
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = avg_pool_2x2_ceil(x)
        return ConvNormLayer(self.features, 1, 1, conv=self.conv, norm=self.norm, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="conv")(x, train)


def _shortcut(block: nn.Module, features: int, stride: int):
    kw = dict(conv=block.conv, norm=block.norm, dtype=block.dtype, param_dtype=block.param_dtype, name="short")
    if block.variant == "d" and stride == 2:
        return _PoolConvShortcut(features, **kw)
    return ConvNormLayer(features, 1, stride, **kw)


class BasicBlock(nn.Module):
    """ResNet-18/34 block (official `BasicBlock`): 3x3 (stride) + 3x3, shortcut, activation after the sum."""

    features: int
    stride: int
    shortcut: bool
    act: str = "relu"
    variant: str = "b"
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(conv=self.conv, norm=self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
        out = ConvNormLayer(self.features, 3, self.stride, act=self.act, name="branch2a", **kw)(x, train)
        out = ConvNormLayer(self.features, 3, 1, act=None, name="branch2b", **kw)(out, train)
        short = x if self.shortcut else _shortcut(self, self.features, self.stride)(x, train)
        return activation(self.act)(out + short)


class BottleNeck(nn.Module):
    """ResNet-50/101 block (official `BottleNeck`): 1x1, 3x3 (stride; variant 'a' strides the 1x1), 1x1 x4."""

    features: int
    stride: int
    shortcut: bool
    act: str = "relu"
    variant: str = "b"
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(conv=self.conv, norm=self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
        s1, s2 = (self.stride, 1) if self.variant == "a" else (1, self.stride)
        out = ConvNormLayer(self.features, 1, s1, act=self.act, name="branch2a", **kw)(x, train)
        out = ConvNormLayer(self.features, 3, s2, act=self.act, name="branch2b", **kw)(out, train)
        out = ConvNormLayer(self.features * 4, 1, 1, act=None, name="branch2c", **kw)(out, train)
        short = x if self.shortcut else _shortcut(self, self.features * 4, self.stride)(x, train)
        return activation(self.act)(out + short)


class Blocks(nn.Module):
    """One ResNet stage (official `Blocks`): `count` blocks named `blocks.<i>`; the first has the projection shortcut
    and stride 2 unless it is stage 2 (stage_num counts from 2, after the stem)."""

    block: Any
    features: int
    count: int
    stage_num: int
    act: str = "relu"
    variant: str = "b"
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i in range(self.count):
            stride = 2 if i == 0 and self.stage_num != 2 else 1
            x = self.block(self.features, stride, shortcut=i != 0, act=self.act, variant=self.variant,
                           conv=self.conv, norm=self.norm, dtype=self.dtype, param_dtype=self.param_dtype,
                           name=f"blocks.{i}")(x, train)
        return x


class PResNet(nn.Module):
    """ResNet (variants a/b/c/d; RT-DETR uses d) returning the feature maps of `return_idx`.

    Official `PResNet` (src/nn/backbone/presnet.py). Stage i (0-based) has stride 4 * 2**i and
    `base_width * 2**i * expansion` channels (expansion 1 for depth 18/34, 4 for 50/101); RT-DETR
    takes `return_idx=(1, 2, 3)`: strides 8/16/32.

    Attributes:
      depth: 18, 34, 50 or 101.
      variant: 'd' (3-conv stem, average-pool shortcut) as RT-DETR; 'c' has the 3-conv stem only; 'a'/'b' the 7x7 stem.
      freeze_at: -1 freezes nothing; n >= 0 freezes the stem and the first n stages (official: their parameters
        get requires_grad=False). Here a `stop_gradient` after the last frozen stage gives the same (zero)
        gradients; an optimizer must also leave them alone (no weight decay): use `trainable_mask`.
      freeze_norm: every BatchNorm becomes `frozen_norm` (official FrozenBatchNorm2d: buffers, not parameters).
      base_width: stem/first-stage width, 64 officially; smaller only for fast tests.

    Call: `x [B, H, W, 3]` -> list of `[B, H/s, W/s, C_s]` for the returned stages.

    Raises:
      ValueError: unsupported depth.
    """

    depth: int = 50
    variant: str = "d"
    num_stages: int = 4
    return_idx: Sequence[int] = (0, 1, 2, 3)
    act: str = "relu"
    freeze_at: int = -1
    freeze_norm: bool = True
    base_width: int = 64
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    frozen_norm: ModuleDef = FrozenBatchNorm
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @property
    def block(self):
        return BottleNeck if self.depth >= 50 else BasicBlock

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.base_width * 2 ** i * self.block.expansion for i in self.return_idx)

    @property
    def out_strides(self) -> tuple[int, ...]:
        return tuple(4 * 2 ** i for i in self.return_idx)

    def frozen_submodules(self) -> tuple[str, ...]:
        """Names of the submodules whose parameters the official code freezes (`freeze_at`)."""
        if self.freeze_at < 0:
            return ()
        return ("conv1",) + tuple(f"res_layers.{i}" for i in range(min(self.freeze_at, self.num_stages)))

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.depth not in RESNET_BLOCKS:
            raise ValueError(f"PResNet depth {self.depth}: expected one of {sorted(RESNET_BLOCKS)}")
        norm = self.frozen_norm if self.freeze_norm else self.norm
        kw = dict(conv=self.conv, norm=norm, dtype=self.dtype, param_dtype=self.param_dtype)
        w = self.base_width
        if self.variant in ("c", "d"):
            stem = ((w // 2, 3, 2, "conv1_1"), (w // 2, 3, 1, "conv1_2"), (w, 3, 1, "conv1_3"))
        else:
            stem = ((w, 7, 2, "conv1_1"),)
        x = _Stem(stem, self.act, name="conv1", **kw)(x, train)
        frozen = self.frozen_submodules()
        if "conv1" in frozen and "res_layers.0" not in frozen:
            x = jax.lax.stop_gradient(x)
        # torch MaxPool2d(3, 2, 1); in training with the first-maximum gradient of `research.cpu.pool` (same values
        # and routing; autodiff of reduce_window builds a variadic argmax reduce-window over four index maps on
        # XLA:CPU, ~4 % of the R18vd train step), `nn.max_pool` itself in inference and export
        x = pool_lib.max_pool(x, 3, 2, 1, train=train)
        outs = []
        for i in range(self.num_stages):
            x = Blocks(self.block, w * 2 ** i, RESNET_BLOCKS[self.depth][i], i + 2, act=self.act,
                       variant=self.variant, name=f"res_layers.{i}", **kw)(x, train)
            if f"res_layers.{i}" in frozen and f"res_layers.{i + 1}" not in frozen:
                x = jax.lax.stop_gradient(x)
            if i in self.return_idx:
                outs.append(x)
        return outs


class _Stem(nn.Module):
    """The official `conv1` Sequential of ConvNormLayers (`conv1_1`...)."""

    layers: Sequence[tuple[int, int, int, str]]
    act: str = "relu"
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for features, k, s, name in self.layers:
            x = ConvNormLayer(features, k, s, act=self.act, conv=self.conv, norm=self.norm, dtype=self.dtype,
                              param_dtype=self.param_dtype, name=name)(x, train)
        return x
