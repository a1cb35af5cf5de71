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
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

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
