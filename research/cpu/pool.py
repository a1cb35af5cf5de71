"""Max pooling with a cheap gradient (shared by every network).

`max_pool(x, k, stride, padding)` equals `flax.linen.max_pool(x, (k, k), (stride, stride), padding)` (torch's
`MaxPool2d(k, stride, padding)`, e.g. AlexNet's 3x3 stride 2); `max_pool_same(x, k)` is the stride-1 'same' case
(YOLOv5's SPPF).
Its gradient goes, as in torch's `max_pool2d` backward and XLA's `select_and_scatter`, to the
first maximum of each window in row-major order. JAX differentiates `reduce_window` max through
a variadic reduce-window that tracks indices; on CPU that costs ~50 ms per YOLOv5s SPPF train
step at 640 px. Here the backward is k*k (strided) compares on the pooled map instead and k*k
interior-padded adds back to the input (a few ms), with the same routing of ties (tests/cpu/test_pool.py).

Inference and export use `nn.max_pool` itself (the ONNX bridge maps it).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _pool(x, k: int, stride: int, padding: int):
    p = padding
    return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, k, k, 1), (1, stride, stride, 1),
                                 ((0, 0), (p, p), (p, p), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_first_argmax(x, k: int, stride: int, padding: int):
    return _pool(x, k, stride, padding)


def _fwd(x, k, stride, padding):
    y = _pool(x, k, stride, padding)
    return y, (x, y)


def _bwd(k, stride, padding, res, g):
    x, y = res
    p, s = padding, stride
    _, h, w, _ = x.shape
    _, ho, wo, _ = y.shape
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)
    hp, wp = xp.shape[1:3]
    span_h, span_w = s * (ho - 1) + 1, s * (wo - 1) + 1  # extent of one window offset's taps

    def tap(i, j):  # the input under window position (i, j) of every output cell: [B, ho, wo, C]
        return xp[:, i:i + span_h:s, j:j + span_w:s, :]

    # index (row-major) of the first window position holding the maximum
    first = jnp.full(y.shape, k * k, jnp.int32)
    for t in reversed(range(k * k)):
        i, j = divmod(t, k)
        first = jnp.where(tap(i, j) == y, t, first)
    dxp = None
    for t in range(k * k):  # each window position sends its cells' gradient back to where it read them
        i, j = divmod(t, k)
        part = jax.lax.pad(jnp.where(first == t, g, jnp.zeros((), g.dtype)), jnp.zeros((), g.dtype),
                           ((0, 0, 0), (i, hp - i - span_h, s - 1), (j, wp - j - span_w, s - 1), (0, 0, 0)))
        dxp = part if dxp is None else dxp + part
    return (dxp[:, p:p + h, p:p + w, :],)


_max_pool_first_argmax.defvjp(_fwd, _bwd)


def max_pool(x, k: int, stride: int, padding: int = 0, train: bool = False):
    """k x k max pool with `stride` and symmetric -inf `padding` (floor mode: windows that do not fit are dropped),
    NHWC: `flax.linen.max_pool(x, (k, k), (stride, stride), ((padding, padding),) * 2)`, as torch's
    `nn.MaxPool2d(k, stride, padding)`. With `train`, its gradient is the cheap first-argmax one (module docstring)."""
    if train:
        return _max_pool_first_argmax(x, k, stride, padding)
    return nn.max_pool(x, (k, k), strides=(stride, stride), padding=((padding, padding), (padding, padding)))


def max_pool_same(x, k: int, train: bool = False):
    """k x k max pool, stride 1, zero-size change ('same' with -inf padding), NHWC."""
    if k % 2 != 1:
        raise ValueError(f"max_pool_same: kernel {k} must be odd")
    return max_pool(x, k, 1, k // 2, train)
