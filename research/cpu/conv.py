"""2-D convolution for every network here, with a CPU-friendly computation.

`Conv2D` has exactly `flax.linen.Conv`'s parameters (`kernel` HWIO, optional `bias`), so
checkpoints and the torch bridge do not depend on how it computes. `impl` picks the computation:

  "lax"  `lax.conv_general_dilated` for the forward and XLA's own gradients.
  "dot"  the same sums arranged for XLA:CPU, where a matrix product runs much faster than a
         convolution of the same FLOPs:
           * a 1x1 convolution is one `dot` over the channels, forward and both gradients
             (the kernel gradient written as `x^T @ dy` in a custom VJP: autodiff's form of
             it made XLA:CPU write a transposed copy of `dy` for every layer, 7 % of a step);
           * a k x k convolution keeps XLA's forward; its kernel gradient is k*k matrix
             products (one per tap: shifted input^T @ output gradient) where that measured
             faster (`_tap_weight_grad_pays`), and a strided one's input gradient is one matrix
             product plus shifted sums per phase (`phase_input_grad`) instead of XLA's
             zero-dilated transposed convolution (2x faster per layer).
  "onednn" (CPU) k x k convolutions through oneDNN, the library PyTorch's CPU convolutions use,
         as XLA custom calls (`research/cpu/kernels`): forward, input gradient and kernel
         gradient; 1x1 convolutions as in "dot". Float32, groups 1; anything else as "dot".
  "auto" "onednn" on the CPU backend where its kernels build and load (else "dot", logged
         once with the reason), "lax" elsewhere (GPU/TPU convolutions are tuned already).

Measured on a 2-core CPU (`docs/yolov5.md`, benchmark section), YOLOv5s 640 px: "dot" against
"lax" inference -25 %, train step b2 about -40 %; "onednn" against "dot" train step b2 -13 to
-21 % (same process, alternating), most of it in the stem and the 320/160 px layers, where
oneDNN's forward, input and kernel gradients are 1.5-3x faster than XLA's. Outputs equal "lax"
to float rounding (tests/cpu/test_conv.py).
"""

from __future__ import annotations

import functools
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ("auto", "lax", "dot", "onednn")
Dtype = Any


def resolve_impl(impl: str) -> str:
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl {impl!r}: expected one of {CONV_IMPLS}")
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "lax"
        return "onednn" if _onednn_ok(explicit=False) else "dot"
    if impl == "onednn":
        _onednn_ok(explicit=True)
    return impl


@functools.lru_cache(maxsize=None)
def _onednn_ok(explicit: bool) -> bool:
    from research.cpu.kernels import onednn
    ok, why = onednn.available()
    if not ok:
        if explicit:
            raise onednn.OnednnUnavailable(f"conv_impl 'onednn': {why}")
        logging.warning("conv_impl auto: oneDNN kernels unavailable, XLA convolutions ('dot') instead: %s", why)
    return ok


def _lax_conv(x, w, stride: int, padding: int, groups: int = 1):
    p = padding
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)


def _tap(xp, i: int, j: int, ho: int, wo: int, stride: int):
    """The input pixels that kernel tap (i, j) meets, for every output position: [B, ho, wo, C]."""
    return xp[:, i:i + (ho - 1) * stride + 1:stride, j:j + (wo - 1) * stride + 1:stride, :]


def _tap_weight_grad_pays(cin: int, cout: int, stride: int) -> bool:
    # From per-layer timings of XLA's kernel gradient against per-tap products on a 2-core
    # CPU: strided convolutions gain 1.5-2.5x, stride-1 ones from 64 input channels on;
    # stride-1 convolutions with few channels at high resolution lose.
    return (stride > 1 and cin * cout >= 96) or cin >= 64


def tap_weight_grad(x, dy, k: int, stride: int, padding: int):
    """d(loss)/d(kernel) [k, k, Cin, Cout] from the input x and output gradient dy, per tap."""
    _, ho, wo, cout = dy.shape
    cin = x.shape[-1]
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    d2 = dy.reshape(-1, cout)
    rows = []
    for i in range(k):
        rows.append(jnp.stack([
            jnp.dot(_tap(x, i, j, ho, wo, stride).reshape(-1, cin).T, d2,
                    preferred_element_type=jnp.float32) for j in range(k)]))
    return jnp.stack(rows)


def phase_input_grad(dy, w, x_shape, stride: int, padding: int):
    """d(loss)/d(input) of a strided convolution without XLA's zero-dilated transposed convolution.

    Input pixel (s*h + i, s*w + j) of the padded input receives dy[h, w] @ W[i, j]^T. One matrix
    product gives every tap's contribution; the taps with the same (i mod s, j mod s) are shifted
    and summed into that phase, and the s*s phases interleave into the padded input gradient.
    """
    k = w.shape[0]
    b, ho, wo, cout = dy.shape
    _, h, wd, cin = x_shape
    s = stride
    q = (k - 1) // s
    z = jnp.dot(dy, jnp.transpose(w, (3, 0, 1, 2)).reshape(cout, k * k * cin))
    z = z.reshape(b, ho, wo, k, k, cin)
    rows = []
    for a in range(s):
        cols = []
        for c in range(s):
            acc = None
            for i in range(a, k, s):
                for j in range(c, k, s):
                    qi, qj = i // s, j // s
                    t = jnp.pad(z[:, :, :, i, j], ((0, 0), (qi, q - qi), (qj, q - qj), (0, 0)))
                    acc = t if acc is None else acc + t
            cols.append(acc if acc is not None else jnp.zeros((b, ho + q, wo + q, cin), dy.dtype))
        rows.append(jnp.stack(cols, 3))  # [b, ho+q, wo+q, s (column phase), cin]
    full = jnp.stack(rows, 2).reshape(b, s * (ho + q), s * (wo + q), cin)
    pad_h, pad_w = max(0, padding + h - full.shape[1]), max(0, padding + wd - full.shape[2])
    if pad_h or pad_w:  # padded-input rows/columns no tap reaches
        full = jnp.pad(full, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    return full[:, padding:padding + h, padding:padding + wd]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_custom_grad(x, w, stride: int, padding: int, tap_dw: bool):
    return _lax_conv(x, w, stride, padding)


def _conv_custom_grad_fwd(x, w, stride, padding, tap_dw):
    return _lax_conv(x, w, stride, padding), (x, w)


def _xla_kernel_grad(x, dy, w, stride: int, padding: int, tap_dw: bool):
    """The kernel gradient as `dot` computes it: per-tap products or XLA's own."""
    if tap_dw:
        return tap_weight_grad(x, dy, w.shape[0], stride, padding).astype(w.dtype)
    (dw,) = jax.vjp(lambda w_: _lax_conv(x, w_, stride, padding), w)[1](dy)
    return dw


def _conv_custom_grad_bwd(stride, padding, tap_dw, res, dy):
    x, w = res
    if stride > 1:
        dx = phase_input_grad(dy, w, x.shape, stride, padding).astype(x.dtype)
    else:
        (dx,) = jax.vjp(lambda x_: _lax_conv(x_, w, stride, padding), x)[1](dy)
    return dx, _xla_kernel_grad(x, dy, w, stride, padding, tap_dw)


_conv_custom_grad.defvjp(_conv_custom_grad_fwd, _conv_custom_grad_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_conv(x, w, stride: int, padding: int):
    from research.cpu.kernels import onednn
    return onednn.conv(x, w, stride, padding)


def _onednn_conv_fwd(x, w, stride, padding):
    return _onednn_conv(x, w, stride, padding), (x, w)


def _onednn_conv_bwd(stride, padding, res, dy):
    from research.cpu.kernels import onednn
    x, w = res
    dx = onednn.conv_input_grad(dy, w, x.shape, stride, padding)
    # oneDNN's kernel gradient: 1.2-2.6x faster than the per-tap products or XLA's own at every YOLOv5 and HRNet
    # shape timed (b2, 16-160 px maps, 32-512 channels, strides 1 and 2; docs/yolov5.md "CPU speed layer")
    dw = onednn.conv_kernel_grad(x, dy, w.shape, stride, padding)
    return dx, dw


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


@jax.custom_vjp
def _dot_1x1(x, w2):
    """x [..., Cin] @ w2 [Cin, Cout]; the kernel gradient as x^T @ dy (see the module doc)."""
    return jnp.dot(x, w2)


def _dot_1x1_fwd(x, w2):
    return jnp.dot(x, w2), (x, w2)


def _dot_1x1_bwd(res, g):
    x, w2 = res
    cin, cout = w2.shape
    dx = jnp.dot(g, w2.T)
    dw = jnp.dot(x.reshape(-1, cin).T, g.reshape(-1, cout), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w2.dtype)


_dot_1x1.defvjp(_dot_1x1_fwd, _dot_1x1_bwd)


def conv2d(x, w, stride: int = 1, padding: int = 0, groups: int = 1, impl: str = "auto"):
    """NHWC x, HWIO w, symmetric zero padding; the same result for every `impl`."""
    impl = resolve_impl(impl)
    k, kw, cin, cout = w.shape
    if impl == "lax" or groups != 1 or k != kw:
        return _lax_conv(x, w, stride, padding, groups)
    if k == 1:
        if padding:
            x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        if stride > 1:
            x = x[:, ::stride, ::stride, :]
        return _dot_1x1(x, w.reshape(cin, cout))
    if impl == "onednn" and x.dtype == jnp.float32 and w.dtype == jnp.float32:
        return _onednn_conv(x, w, stride, padding)
    tap_dw = _tap_weight_grad_pays(cin, cout, stride)
    if tap_dw or stride > 1:
        return _conv_custom_grad(x, w, stride, padding, tap_dw)
    return _lax_conv(x, w, stride, padding)


class Conv2D(nn.Module):
    """`nn.Conv` with square kernels, symmetric padding and a choice of computation (`impl`)."""

    features: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1
    use_bias: bool = False
    impl: str = "auto"
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        if cin % self.groups:
            raise ValueError(f"{self.name}: {cin} input channels not divisible by groups={self.groups}")
        k = self.param("kernel", self.kernel_init,
                       (self.kernel, self.kernel, cin // self.groups, self.features), self.param_dtype)
        y = conv2d(x.astype(self.dtype), k.astype(self.dtype), self.stride, self.padding, self.groups,
                   self.impl)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(self.dtype)
        return y
