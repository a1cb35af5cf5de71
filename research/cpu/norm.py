"""BatchNorm followed by an activation, with a memory-lean gradient (shared by every network).

`BatchNormAct` has exactly `flax.linen.BatchNorm`'s variables (`params/{scale,bias}`,
`batch_stats/{mean,var}`, same running-average rule and the same `E[x^2] - E[x]^2` batch
variance), so checkpoints and the torch bridge do not change, and then applies `act`.

Why: with flax's BatchNorm and autodiff, XLA kept `x - mean`, the normalised `z` and `act(z)`
as separate full-size arrays (three elementwise passes per layer in the forward). Here the
training forward is one `custom_vjp` function that saves only the convolution output and
per-channel vectors: one reduction pass (sum and sum of squares) and one elementwise pass. The
backward recomputes `z` and `act'(z)` from the saved input, writes `dz` once (XLA:CPU's channel
reductions read it), takes the two channel sums and then the input gradient. The values equal
`nn.BatchNorm` + `act` to float rounding (tests/cpu/test_norm.py).

Statistics are over every axis but the last, so under `jax.jit` with a batch sharded over the
`data` mesh they are global-batch statistics (XLA inserts the cross-device sums).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

ACTIVATIONS = ("silu", "relu", "none")


def _act(z, act: str):
    if act == "silu":
        return z * jax.nn.sigmoid(z)
    if act == "relu":
        return jax.nn.relu(z)
    return z


def _act_grad(z, g, act: str):
    """g * act'(z)."""
    if act == "silu":
        s = jax.nn.sigmoid(z)
        return g * (s * (1.0 + z * (1.0 - s)))
    if act == "relu":
        return jnp.where(z > 0, g, 0)  # torch's threshold_backward: no gradient at 0
    return g


def batch_stats(x, axes):
    """Mean and biased variance as flax computes them (`E[x^2] - E[x]^2`, clipped at 0), float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axes)
    mean_sq = jnp.mean(jnp.square(x32), axes)
    return mean, jnp.maximum(0.0, mean_sq - jnp.square(mean))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def bn_act_train(x, scale, bias, eps: float, act: str):
    """Training-mode BatchNorm (batch statistics) + activation. Returns (out, mean, var)."""
    out, mean, var, _ = _bn_act_fwd_impl(x, scale, bias, eps, act)
    return out, mean, var


def _bn_act_fwd_impl(x, scale, bias, eps, act):
    axes = tuple(range(x.ndim - 1))
    mean, var = batch_stats(x, axes)
    inv = jax.lax.rsqrt(var + eps)
    a = scale.astype(jnp.float32) * inv
    b = bias.astype(jnp.float32)
    out = _act((x.astype(jnp.float32) - mean) * a + b, act).astype(x.dtype)
    return out, mean, var, (x, a, b, mean, inv)


def _bn_act_fwd(x, scale, bias, eps, act):
    out, mean, var, res = _bn_act_fwd_impl(x, scale, bias, eps, act)
    return (out, mean, var), res + (scale, bias)


def _bn_act_bwd(eps, act, res, cts):
    x, a, b, mean, inv, scale, bias = res
    # The barrier keeps XLA from merging the recomputation below with the forward's identical
    # expressions (common-subexpression elimination would then keep those full-size
    # intermediates alive from the forward to here, the memory traffic this function avoids).
    x, a, b, mean, inv = jax.lax.optimization_barrier((x, a, b, mean, inv))
    g = cts[0].astype(jnp.float32)  # mean/var feed only the running averages: no gradient
    axes = tuple(range(x.ndim - 1))
    n = 1
    for ax in axes:
        n *= x.shape[ax]
    x32 = x.astype(jnp.float32)
    dz = _act_grad((x32 - mean) * a + b, g, act)
    dbias = jnp.sum(dz, axes)
    # sum(dz * xhat) with xhat = (x - mean) * inv, from sum(dz * x): the channel sums then read
    # the stored x itself, and no full-size x - mean is written (as flax's variance, this
    # trades a little cancellation for one memory pass less)
    dscale = (jnp.sum(dz * x32, axes) - mean * dbias) * inv
    # dx = a * (dz - mean(dz) - xhat * mean(dz * xhat))
    dx = (a * dz - (a / n) * dbias - (a * inv * dscale / n) * (x32 - mean)).astype(x.dtype)
    return dx, dscale.astype(scale.dtype), dbias.astype(bias.dtype)


bn_act_train.defvjp(_bn_act_fwd, _bn_act_bwd)


class BatchNormAct(nn.Module):
    """`nn.BatchNorm(use_running_average=not train)` then `act` ("silu", "relu" or "none").

    Attributes mirror `nn.BatchNorm` (momentum is flax's: running = m * running + (1-m) * batch).
    `lean`: the training forward/backward through the custom VJP above; False computes as flax
    does (autodiff through the normalisation), for accelerators.
    """

    momentum: float = 0.99
    epsilon: float = 1e-5
    act: str = "silu"
    lean: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"{self.name}: act {self.act!r}: expected one of {ACTIVATIONS}")
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        x = x.astype(self.dtype)
        if not train:
            a = scale.astype(jnp.float32) * jax.lax.rsqrt(ra_var.value + self.epsilon)
            z = (x.astype(jnp.float32) - ra_mean.value) * a + bias.astype(jnp.float32)
            return _act(z, self.act).astype(self.dtype)
        if self.lean:
            out, mean, var = bn_act_train(x, scale, bias, float(self.epsilon), self.act)
        else:
            mean, var = batch_stats(x, tuple(range(x.ndim - 1)))
            a = scale.astype(jnp.float32) * jax.lax.rsqrt(var + self.epsilon)
            out = _act((x.astype(jnp.float32) - mean) * a + bias.astype(jnp.float32), self.act).astype(self.dtype)
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
            ra_var.value = m * ra_var.value + (1.0 - m) * jax.lax.stop_gradient(var)
        return out
