"""PyTorch's default parameter initialisers as flax initialisers (so a fresh Flax model starts from
the same distributions as the official one; the official code relies on them where it does not
initialise explicitly)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def torch_conv_init() -> nn.initializers.Initializer:
    """torch's default Conv2d/Linear weight init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).

    Flax kernels are HWIO / (in, out), so fan_in is the product of all but the last axis, as
    torch's fan_in for OIHW / (out, in).
    """
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """torch's default Conv2d/Linear bias init, U(+-1/sqrt(fan_in)) with the layer's weight fan_in."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init
