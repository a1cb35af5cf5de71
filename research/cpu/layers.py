"""The one place that chooses how convolutions, BatchNorm+activation and max pooling compute.

Models take a `Layers` value as a module argument (the flax `examples/imagenet` `conv=` pattern)
and build their layers through it; parameters are always those of `flax.linen.Conv` /
`flax.linen.BatchNorm` (`kernel` HWIO, `bias`, `scale`, `mean`, `var`), so checkpoints, the torch
bridge and golden tests do not depend on the choice:

    layers = select(config.model.conv_impl)        # "auto": the CPU speed layer on CPU, PLAIN elsewhere
    model = MyNet(layers=layers)
    ...
    y = self.layers.conv(64, 3, stride=2, padding=1, name="conv1")(x)
    y = self.layers.norm_act("relu", momentum=0.9, epsilon=1e-5, name="bn1")(y, train)
    y = self.layers.max_pool_same(y, 5, train)

`PLAIN` computes as flax.linen does (`lax.conv_general_dilated`, flax's BatchNorm arithmetic,
`reduce_window` pooling with autodiff): what runs on GPU/TPU and what exports trace.

Networks written with `nn.Conv` / `nn.BatchNorm` factories as module arguments get the same
choice through `layers.nn_conv` and `layers.nn_batch_norm`: drop-in factories with the flax
layers' interfaces and parameters (PLAIN gives back `nn.Conv` / `nn.BatchNorm` themselves).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.cpu import conv as conv_lib
from research.cpu import norm as norm_lib
from research.cpu import pool as pool_lib


@dataclasses.dataclass(frozen=True)
class Layers:
    """How a model's layers compute (hashable: a model holding it can be a static jit argument).

    Attributes:
      conv_impl: `research.cpu.conv` implementation: "lax" (plain), "dot" or "onednn" (CPU).
      lean_norm: BatchNorm+activation through the memory-lean custom VJP (`research.cpu.norm`);
        False: flax's formulation, differentiated by autodiff.
      lean_pool_grad: stride-1 max pooling with the cheap shifted-compare gradient
        (`research.cpu.pool`); False: `reduce_window` with autodiff.
    """

    conv_impl: str = "lax"
    lean_norm: bool = False
    lean_pool_grad: bool = False

    def conv(self, features: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1,
             use_bias: bool = False, **kwargs) -> nn.Module:
        """A square-kernel convolution with `nn.Conv`'s parameters (see `research.cpu.conv.Conv2D`)."""
        return conv_lib.Conv2D(features, kernel, stride, padding, groups, use_bias, impl=self.conv_impl, **kwargs)

    def norm_act(self, act: str = "none", **kwargs) -> nn.Module:
        """BatchNorm then `act` ("relu", "silu" or "none"), `nn.BatchNorm`'s variables; call `(x, train)`."""
        return norm_lib.BatchNormAct(act=act, lean=self.lean_norm, **kwargs)

    def max_pool_same(self, x: jax.Array, k: int, train: bool = False) -> jax.Array:
        """k x k max pool, stride 1, 'same' size, NHWC."""
        return pool_lib.max_pool_same(x, k, train and self.lean_pool_grad)

    @property
    def nn_conv(self) -> Callable[..., nn.Module]:
        """A factory with `nn.Conv`'s interface and parameters (`kernel` HWIO, `bias`)."""
        return nn.Conv if self.conv_impl == "lax" else functools.partial(FlaxConv, impl=self.conv_impl)

    @property
    def nn_batch_norm(self) -> Callable[..., nn.Module]:
        """A factory with `nn.BatchNorm`'s interface and variables (`scale`, `bias`, `mean`, `var`)."""
        return FlaxBatchNorm if self.lean_norm else nn.BatchNorm


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


class FlaxConv(nn.Module):
    """`nn.Conv` (2-D, NHWC) computed by `research.cpu.conv.conv2d(impl)` where it applies.

    Same attributes, defaults and parameters as `nn.Conv`; square kernels with equal strides and
    symmetric padding (an int, `((p, p), (p, p))`, `"VALID"`, or `"SAME"` at stride 1 with an odd
    kernel) go through the CPU implementations (groups through XLA); any other padding, dilation
    or mask falls back to XLA's convolution, still with `nn.Conv`'s parameters.
    """

    features: int
    kernel_size: Sequence[int] | int
    strides: Sequence[int] | int = 1
    padding: Any = "SAME"
    input_dilation: Any = 1
    kernel_dilation: Any = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    impl: str = "dot"

    def _symmetric_padding(self, k: tuple[int, int], s: tuple[int, int]) -> int | None:
        p = self.padding
        if isinstance(p, str):
            if p.upper() == "VALID":
                return 0
            if p.upper() == "SAME" and s == (1, 1) and k[0] % 2 == 1:
                return k[0] // 2
            return None
        if isinstance(p, int):
            return p
        pairs = [(a, a) if isinstance(a, int) else tuple(a) for a in p]
        if len(pairs) == 2 and pairs[0] == pairs[1] and pairs[0][0] == pairs[0][1]:
            return int(pairs[0][0])
        return None

    @nn.compact
    def __call__(self, x):
        k, s = _pair(self.kernel_size), _pair(self.strides)
        cin = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (*k, cin // self.feature_group_count, self.features),
                            self.param_dtype)
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        p = self._symmetric_padding(k, s)
        plain = (p is None or k[0] != k[1] or s[0] != s[1] or _pair(self.input_dilation) != (1, 1)
                 or _pair(self.kernel_dilation) != (1, 1) or self.precision is not None)
        if plain:
            padding = self.padding if not isinstance(self.padding, int) else [(self.padding, self.padding)] * 2
            y = jax.lax.conv_general_dilated(x, kernel, s, padding, _pair(self.input_dilation),
                                             _pair(self.kernel_dilation), ("NHWC", "HWIO", "NHWC"),
                                             self.feature_group_count, precision=self.precision)
        else:
            y = conv_lib.conv2d(x, kernel, s[0], p, self.feature_group_count, self.impl)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(dtype)
        return y


class FlaxBatchNorm(norm_lib.BatchNormAct):
    """`nn.BatchNorm` (statistics over all axes but the last) through the memory-lean
    `research.cpu.norm.BatchNormAct` in training; `nn.BatchNorm`'s call interface and variables.

    `use_fast_variance=False` (two-pass variance) and `axis_name` are accepted for interface
    compatibility; the variance is flax's `E[x^2] - E[x]^2` (equal to float rounding), and under
    `jax.jit` over a sharded batch the statistics are global without `axis_name`.

    Raises:
      ValueError: another axis than the last, or no scale/bias.
    """

    act: str = "none"
    use_running_average: bool | None = None
    axis: int = -1
    use_bias: bool = True
    use_scale: bool = True
    axis_name: Any = None
    use_fast_variance: bool = True

    def __call__(self, x, use_running_average: bool | None = None):
        ura = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        if self.axis not in (-1, x.ndim - 1) or not (self.use_bias and self.use_scale):
            raise ValueError(f"{self.name}: FlaxBatchNorm supports the last axis with scale and bias only")
        return super().__call__(x, train=not ura)


PLAIN = Layers()


def select(conv_impl: str = "auto") -> Layers:
    """The layers for this run: `conv_impl` "auto" is the CPU speed layer on the CPU backend
    (oneDNN convolutions where they build, else matrix products) and `PLAIN` elsewhere; "lax"
    is `PLAIN`; "dot" / "onednn" force that CPU convolution with the lean norm and pool.

    Raises:
      ValueError: an unknown `conv_impl`, or "onednn" where its kernels cannot be built.
    """
    impl = conv_lib.resolve_impl(conv_impl)
    if impl == "lax":
        return PLAIN
    return Layers(conv_impl=impl, lean_norm=True, lean_pool_grad=True)
