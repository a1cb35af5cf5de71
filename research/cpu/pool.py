"""Stride-1 'same' max pooling with a cheap gradient (shared by every network).

`max_pool_same(x, k)` equals `flax.linen.max_pool(x, (k, k), strides=(1, 1), padding=k // 2)`.
Its gradient goes, as in torch's `max_pool2d` backward and XLA's `select_and_scatter`, to the
first maximum of each window in row-major order. JAX differentiates `reduce_window` max through
a variadic reduce-window that tracks indices; on CPU that costs ~50 ms per YOLOv5s SPPF train
step at 640 px. Here the backward is k*k shifted compares on the small pooled map instead
(a few ms), with the same routing of ties (tests/cpu/test_pool.py).

Inference and export use `nn.max_pool` itself (the ONNX bridge maps it).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _pool(x, k: int):
    p = k // 2
    return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, k, k, 1), (1, 1, 1, 1),
                                 ((0, 0), (p, p), (p, p), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_first_argmax(x, k: int):
    return _pool(x, k)


def _fwd(x, k):
    y = _pool(x, k)
    return y, (x, y)


def _bwd(k, res, g):
    x, y = res
    p = k // 2
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)
    # index (row-major) of the first window position holding the maximum
    first = jnp.full(y.shape, k * k, jnp.int32)
    for t in reversed(range(k * k)):
        i, j = divmod(t, k)
        first = jnp.where(xp[:, i:i + h, j:j + w, :] == y, t, first)
    dxp = None
    for t in range(k * k):
        i, j = divmod(t, k)
        part = jnp.pad(jnp.where(first == t, g, 0), ((0, 0), (i, k - 1 - i), (j, k - 1 - j), (0, 0)))
        dxp = part if dxp is None else dxp + part
    return (dxp[:, p:p + h, p:p + w, :],)


_max_pool_first_argmax.defvjp(_fwd, _bwd)


def max_pool_same(x, k: int, train: bool = False):
    """k x k max pool, stride 1, zero-size change ('same' with -inf padding), NHWC."""
    if k % 2 != 1:
        raise ValueError(f"max_pool_same: kernel {k} must be odd")
    if train:
        return _max_pool_first_argmax(x, k)
    p = k // 2
    return nn.max_pool(x, (k, k), strides=(1, 1), padding=((p, p), (p, p)))
