"""Nearest-neighbour upsampling by an integer factor, in the form each consumer runs best.

`upsample_nearest(x, f)` is torch's `nn.Upsample(scale_factor=f, mode='nearest')` /
`F.interpolate(x, scale_factor=f)` on NHWC maps (YOLOv5's `Upsample`, HigherHRNet's fuse layers, RT-DETR's
CCFM). JAX runs it as a broadcast + reshape: cheap forward and backward on every backend (the backward is
a sum over each f x f block; `jax.image.resize`'s gather-based nearest costs ~20x more there on XLA:CPU).
jax2onnx, however, turns that broadcast into a Shape/Gather/Concat/Expand/Reshape chain per call, which
keeps ONNX Runtime from moving the NHWC<->NCHW transposes around the convolutions out of the way. Inside
`export_forms()` (entered by `research.bridge.onnx_export.export_onnx` while it traces) the same function
is written as `jax.image.resize(..., "nearest")`, which the bridge lowers to one ONNX `Resize` (nearest,
asymmetric floor: the same pixels for integer factors, tested in tests/test_onnx_export.py).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax
import jax.numpy as jnp

_EXPORTING = contextvars.ContextVar("research_vision_upsample_exporting", default=False)


@contextlib.contextmanager
def export_forms() -> Iterator[None]:
    """While active, `upsample_nearest` traces as `jax.image.resize` (one ONNX Resize). Only for tracing an
    export: a function jitted inside the block keeps that form in jit's cache."""
    token = _EXPORTING.set(True)
    try:
        yield
    finally:
        _EXPORTING.reset(token)


def upsample_nearest(x: jax.Array, factor: int) -> jax.Array:
    """[B, H, W, C] -> [B, factor * H, factor * W, C], each pixel repeated factor x factor times.

    Raises:
      ValueError: `x` is not 4-D or `factor` is not a positive integer.
    """
    if x.ndim != 4:
        raise ValueError(f"upsample_nearest expects [B, H, W, C], got shape {x.shape}")
    f = int(factor)
    if f != factor or f < 1:
        raise ValueError(f"upsample_nearest: factor must be a positive integer, got {factor!r}")
    b, h, w, c = x.shape
    if f == 1:
        return x
    if _EXPORTING.get():
        return jax.image.resize(x, (b, h * f, w * f, c), "nearest")
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, f, w, f, c)).reshape(b, h * f, w * f, c)
