"""SiamFC: an AlexNet embedding shared by exemplar and search images, and a cross-correlation head.

Follows huanglianghua/siamfc-pytorch (`siamfc/backbones.py` `AlexNetV1`, `siamfc/heads.py`
`SiamFC`, `siamfc/siamfc.py` `Net`). Submodule names mirror the official attributes and its
`nn.Sequential` indices (`backbone` / `conv1` / `0` is the convolution, `1` the BatchNorm), so a
Flax parameter path joined with "." is the official key: `params/backbone/conv1/0/kernel` is
`backbone.conv1.0.weight` (see `research/siamfc/bridge.py`).

Layout is NHWC. Images are raw pixel values 0..255 in RGB order (the official tracker does no mean
or std normalisation). With the official sizes an exemplar crop of 127 px gives a `[6, 6, 256]`
embedding and a search crop of 255 px a `[22, 22, 256]` one; their cross-correlation is the
`[17, 17]` response map, one cell per 8 px (the backbone's total stride) of the search crop.

The tracker embeds the exemplar once (`SiamFC.embed`) and then correlates every frame's search
crops with that cached embedding (`SiamFC.respond`); `__call__` does both for training pairs.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.cpu import pool as pool_lib

Dtype = Any
ModuleDef = Any

# Official `_BatchNorm2d`: eps 1e-6, torch momentum 0.05 (flax momentum = 1 - torch momentum).
BN_EPS = 1e-6
BN_MOMENTUM = 0.95
OUT_SCALE = 0.001  # official `TrackerSiamFC.parse_args` out_scale, passed to `heads.SiamFC`
WIDTHS = (96, 256, 384, 384, 256)  # AlexNetV1 conv1..conv5 output channels
TINY_WIDTHS = (8, 16, 16, 16, 16)  # not official: a fast variant for tests


def _pairing(exemplar: jax.Array, search: jax.Array, name: str):
    """Shapes of an exemplar / search pair and the searches per exemplar (`Bx // Bz`), checked for `name`.

    Raises:
      ValueError: the channel counts differ or `Bx` is not a multiple of `Bz`.
    """
    bz, _, _, c = exemplar.shape
    bx, _, _, cx = search.shape
    if c != cx:
        raise ValueError(f"{name}: exemplar has {c} channels, search {cx}")
    if bx % bz:
        raise ValueError(f"{name}: search batch {bx} is not a multiple of exemplar batch {bz}")
    return exemplar.shape, search.shape, bx // bz


def xcorr(exemplar: jax.Array, search: jax.Array, out_scale: float = OUT_SCALE, *,
          precision: Any = None) -> jax.Array:
    """Cross-correlates each exemplar embedding over search embeddings, times `out_scale`.

    Same pairing as the official `heads.SiamFC._fast_xcorr`: search item `i` is correlated with
    exemplar `i % Bz`, so `Bz == Bx` gives one response per training pair and `Bz == 1` correlates
    one exemplar with every search scale. All pairs run as one grouped convolution (one group per
    exemplar), not a Python loop.

    Args:
      exemplar: `[Bz, hz, wz, C]` exemplar embeddings (the correlation kernels).
      search: `[Bx, hx, wx, C]` search embeddings, `Bx` a multiple of `Bz`.
      out_scale: factor applied to the correlation (official 0.001 keeps the logits O(1) at init).
      precision: `jax.lax.Precision` for the correlation (e.g. HIGHEST to avoid TF32 on GPUs).

    Returns:
      `[Bx, hx - hz + 1, wx - wz + 1, 1]` response maps (the official NCHW `(Bx, 1, h, w)` in NHWC).

    Raises:
      ValueError: if the channel counts differ or `Bx` is not a multiple of `Bz`.
    """
    (bz, hz, wz, c), (bx, hx, wx, _), n = _pairing(exemplar, search, "xcorr")
    # [n, Bz, H, W, C] -> [n, H, W, Bz*C]: channel group j holds the items paired with exemplar j.
    x = search.reshape(n, bz, hx, wx, c).transpose(0, 2, 3, 1, 4).reshape(n, hx, wx, bz * c)
    kernel = exemplar.transpose(1, 2, 3, 0).astype(x.dtype)  # HWIO, I = C per group, O = Bz
    out = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=bz, precision=precision)
    ho, wo = out.shape[1:3]
    return (out * out_scale).reshape(n, ho, wo, bz).transpose(0, 3, 1, 2).reshape(bx, ho, wo, 1)


def xcorr_matmul(exemplar: jax.Array, search: jax.Array, out_scale: float = OUT_SCALE) -> jax.Array:
    """`xcorr` as one batched matrix product and shifted sums: the same sums in another order.

    For pair `(i, j)` (search item `i`, exemplar `j = i % Bz`) every search cell `p` meets every
    exemplar cell `t` in `Y[i, p, t] = <search[i, p, :], exemplar[j, t, :]>` (one batched matrix
    product over the channels); response cell `(a, b)` sums the `hz * wz` entries
    `Y[i, (a + u, b + v), (u, v)]`, which are `hz * wz` shifted slices of `Y`. Its autodiff gradient
    is two batched products more (`dY @ exemplar`, `dY^T @ search`) and pads of the small `dY`
    maps, where XLA:CPU differentiates `xcorr`'s convolution with `Bz` feature groups through a
    slow grouped backward (alexnet_v1's 8 training pairs, 6 x 6 over 20 x 20 x 256: forward and
    gradient ~2 s against ~15 ms, 2-core CPU). Used
    by `SiamFC` in training; equal to `xcorr` to float rounding (tests/siamfc/test_siamfc_model.py).

    Args / returns / raises: as `xcorr` (no `precision`: float32 products).
    """
    (bz, hz, wz, c), (bx, hx, wx, _), n = _pairing(exemplar, search, "xcorr_matmul")
    ho, wo = hx - hz + 1, wx - wz + 1
    x = search.reshape(n, bz, hx * wx, c)
    z = exemplar.reshape(bz, hz * wz, c).astype(x.dtype)
    y = jnp.einsum("nbpc,btc->nbpt", x, z).reshape(n, bz, hx, wx, hz, wz)
    out = None
    for u in range(hz):
        for v in range(wz):
            part = y[:, :, u:u + ho, v:v + wo, u, v]
            out = part if out is None else out + part
    return (out * out_scale).reshape(bx, ho, wo, 1)


def _diagonal_kernel(hz: int, wz: int) -> np.ndarray:
    """`[hz, wz, hz * wz, 1]` HWIO 0/1 kernel: tap `(u, v)` reads channel `u * wz + v` only."""
    k = np.zeros((hz, wz, hz * wz, 1), np.float32)
    for u in range(hz):
        for v in range(wz):
            k[u, v, u * wz + v, 0] = 1.0
    return k


def xcorr_single(exemplar: jax.Array, search: jax.Array, out_scale: float = OUT_SCALE) -> jax.Array:
    """`xcorr` for one exemplar (the tracker's `Bz = 1`) as two convolutions: the same sums in another order.

    A 1 x 1 convolution with the exemplar as its kernel gives `Y[i, p, q, (u, v)] = <search[i, p, q, :],
    exemplar[0, u, v, :]>` (one matrix product over the channels), then a constant 0/1 `hz x wz`
    convolution sums `Y[i, a + u, b + v, (u, v)]` over the taps. XLA:CPU runs `xcorr`'s
    convolution with a 6 x 6 kernel of 256 channels slowly (3 x 22 x 22 search embeddings: 3.4 ms,
    `xcorr_matmul` 1.1 ms, this 0.75 ms, 2-core CPU); ONNX Runtime likewise
    (`research/siamfc/export.py`). Equal to `xcorr` to float rounding (tests/siamfc/test_siamfc_model.py).

    Args:
      exemplar: `[1, hz, wz, C]` exemplar embedding (a larger batch: the first one is used, so an
        export with a symbolic batch traces).
      search: `[Bx, hx, wx, C]` search embeddings.
      out_scale: as `xcorr`.

    Returns:
      `[Bx, hx - hz + 1, wx - wz + 1, 1]` response maps.

    Raises:
      ValueError: the channel counts differ.
    """
    _, hz, wz, c = exemplar.shape
    if c != search.shape[-1]:
        raise ValueError(f"xcorr_single: exemplar has {c} channels, search {search.shape[-1]}")
    dn = ("NHWC", "HWIO", "NHWC")
    taps = exemplar[0].reshape(hz * wz, c).T.reshape(1, 1, c, hz * wz).astype(search.dtype)  # output (u, v)
    y = jax.lax.conv_general_dilated(search, taps, (1, 1), "VALID", dimension_numbers=dn)
    out = jax.lax.conv_general_dilated(y, jnp.asarray(_diagonal_kernel(hz, wz), y.dtype), (1, 1), "VALID",
                                       dimension_numbers=dn)
    return out * out_scale


def split_groups_conv(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                      dimension_numbers=None, feature_group_count: int = 1, precision: Any = None,
                      **kwargs) -> jax.Array:
    """`lax.conv_general_dilated` with each feature group run as its own convolution.

    Same arguments and result (same sums; measured bit-identical on XLA:CPU for AlexNetV1), but
    XLA:CPU runs AlexNetV1's grouped layers about 1.5x faster this way (the whole 3 x 255 px
    backbone ~30 % faster, 2-core CPU). Used through `SplitGroupConv`.
    """
    g = feature_group_count
    if g == 1:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, 1, precision=precision, **kwargs)
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    parts = [jax.lax.conv_general_dilated(a, b, window_strides, padding, lhs_dilation, rhs_dilation, dn, 1,
                                          precision=precision, **kwargs)
             for a, b in zip(jnp.split(lhs, g, axis=dn.lhs_spec[1]), jnp.split(rhs, g, axis=dn.rhs_spec[0]))]
    return jnp.concatenate(parts, axis=dn.out_spec[1])


# A CPU speed layer: `nn.Conv` itself (same variables), computing grouped convolutions group by group.
SplitGroupConv: ModuleDef = functools.partial(nn.Conv, conv_general_dilated=split_groups_conv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def onednn_conv_all_grads(x: jax.Array, w: jax.Array, stride: int, groups: int = 1) -> jax.Array:
    """VALID NHWC / HWIO float32 convolution through oneDNN forward and backward (both gradients).

    `x` `[B, H, W, Ci]`, `w` `[k, k, Ci / groups, Co]`, `stride` in pixels, `groups` as lax's
    `feature_group_count` -> `[B, (H - k) // stride + 1, (W - k) // stride + 1, Co]`; the oneDNN
    kernels must be available (`research.cpu.kernels.onednn`). A grouped layer is one oneDNN
    primitive (AlexNetV1's conv2/4/5: 3.7 ms less per 3 x 255 px search branch than two calls
    and a concatenation, one thread; bit-identical outputs).

    `research.cpu.conv.conv2d(impl="onednn")` takes the kernel gradient of layers with more than 64
    input channels from per-tap matrix products, tuned on YOLOv5's layers; on AlexNetV1's (conv3..5,
    256 / 192 input channels, 24-26 px at batch 8) oneDNN's own kernel gradient measured 1.0-1.4x
    faster (2-core CPU). Same sums to float rounding (tests/siamfc/test_siamfc_model.py).
    """
    from research.cpu.kernels import onednn
    return onednn.conv(x, w, stride, 0, groups)


def _onednn_all_fwd(x, w, stride, groups):
    return onednn_conv_all_grads(x, w, stride, groups), (x, w)


def _onednn_all_bwd(stride, groups, res, dy):
    from research.cpu.kernels import onednn
    x, w = res
    return (onednn.conv_input_grad(dy, w, x.shape, stride, 0, groups),
            onednn.conv_kernel_grad(x, dy, w.shape, stride, 0, groups))


onednn_conv_all_grads.defvjp(_onednn_all_fwd, _onednn_all_bwd)


def layers_conv_general_dilated(impl: str):
    """A `conv_general_dilated` for `nn.Conv` that computes through oneDNN (`impl` "onednn", float32:
    `onednn_conv_all_grads`, grouped layers as one grouped primitive) or else through
    `research.cpu.conv.conv2d(impl)`, group by group (it takes groups of 1 only).

    Used for the AlexNetV1 layers as `nn.Conv` builds them: NHWC / HWIO, square kernels and
    strides, VALID padding, no dilation; anything else goes to `split_groups_conv`. Same sums as
    `lax.conv_general_dilated` to float rounding (tests/siamfc/test_siamfc_model.py).
    """
    from research.cpu import conv as conv_lib

    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
             feature_group_count: int = 1, precision=None, **kwargs):
        dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        nhwc = dn == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
        valid = padding == "VALID" or (not isinstance(padding, str) and all(tuple(p) == (0, 0) for p in padding))
        plain = all(d in (None, 1) or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
        strides = tuple(window_strides)
        if not (nhwc and valid and plain and strides[0] == strides[1] and rhs.shape[0] == rhs.shape[1]
                and precision is None and not kwargs):
            return split_groups_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                     dimension_numbers, feature_group_count, precision, **kwargs)
        g = feature_group_count
        if impl == "onednn" and lhs.dtype == rhs.dtype == jnp.float32 and rhs.shape[0] > 1:
            return onednn_conv_all_grads(lhs, rhs, strides[0], g)
        parts = [conv_lib.conv2d(a, b, strides[0], 0, 1, impl)
                 for a, b in zip(jnp.split(lhs, g, axis=3), jnp.split(rhs, g, axis=3))]
        return parts[0] if g == 1 else jnp.concatenate(parts, axis=3)
    return conv


def max_pool_slices(x: jax.Array, k: int = 3, stride: int = 2) -> jax.Array:
    """`k x k` max pooling with `stride`, no padding, floor mode (`nn.max_pool(x, (k, k), (stride,
    stride), "VALID")`, official `nn.MaxPool2d(k, stride)`), as the maximum of `k * k` strided slices.

    `[B, H, W, C]` -> `[B, (H - k) // stride + 1, (W - k) // stride + 1, C]`, bit-identical to
    `nn.max_pool` (a maximum is exact). XLA:CPU fuses the slices with the BatchNorm + ReLU before
    them into one pass vectorised over channels, where its `reduce_window` runs a scalar loop:
    AlexNetV1's two BatchNorm + ReLU + pool stages on 3 x 255 px crops 9.6 ms -> 1.8 ms (one
    thread, 2-core CPU). Inference only (its autodiff gradient splits ties between equal maxima,
    where torch's goes to the first): training uses `research.cpu.pool.max_pool`, export
    `nn.max_pool` (one ONNX MaxPool node).

    Raises:
      ValueError: the map is smaller than the window.
    """
    _, h, w, _ = x.shape
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"max_pool_slices: a {h} x {w} map is smaller than the {k} x {k} window")
    out = None
    for u in range(k):
        for v in range(k):
            tap = x[:, u:u + stride * (ho - 1) + 1:stride, v:v + stride * (wo - 1) + 1:stride, :]
            out = tap if out is None else jnp.maximum(out, tap)
    return out


def layer_factories(layers) -> tuple[ModuleDef, ModuleDef]:
    """`(conv, norm)` factories of a `research.cpu.layers.Layers` choice, with `nn.Conv` /
    `nn.BatchNorm` variables: `PLAIN` gives `(SplitGroupConv, nn.BatchNorm)`; the CPU speed
    layer its convolutions (`layers_conv_general_dilated`) and its memory-lean BatchNorm."""
    if layers.conv_impl == "lax":
        conv = SplitGroupConv
    else:
        conv = functools.partial(nn.Conv, conv_general_dilated=layers_conv_general_dilated(layers.conv_impl))
    return conv, layers.nn_batch_norm


class ConvBlock(nn.Module):
    """One official `nn.Sequential` stage: conv `0`, then optional BatchNorm `1`, ReLU, max pool.

    Attributes:
      features: output channels.
      kernel_size, stride, groups: of the convolution (no padding, with bias, as `nn.Conv2d`).
      norm_act: BatchNorm + ReLU after the convolution (conv5 has neither).
      pool: 3x3 stride-2 max pooling (no padding, floor mode) at the end (conv1, conv2).
      conv, norm: layer factories (`nn.Conv`, `nn.BatchNorm` or drop-ins with their variables).
      lean_pool_grad: in training, pool through `research.cpu.pool.max_pool` (same values, the
        gradient to each window's first maximum as `nn.max_pool`'s, without its slow variadic
        reduce-window on XLA:CPU).
      slice_pool: outside training, pool with `max_pool_slices` (same values, faster on XLA:CPU);
        False: `nn.max_pool` (what export traces).
    """

    features: int
    kernel_size: int
    stride: int = 1
    groups: int = 1
    norm_act: bool = True
    pool: bool = False
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm
    lean_pool_grad: bool = True
    slice_pool: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        k = self.kernel_size
        x = self.conv(self.features, (k, k), strides=(self.stride, self.stride), padding="VALID",
                      feature_group_count=self.groups, use_bias=True,
                      # official ops.init_weights: xavier_uniform weights, zero biases
                      kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros,
                      dtype=self.dtype, param_dtype=self.param_dtype, name="0")(x)
        if self.norm_act:
            x = self.norm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                          scale_init=nn.initializers.ones, bias_init=nn.initializers.zeros,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="1")(x)
            x = nn.relu(x)
        if self.pool:
            if train and self.lean_pool_grad:
                x = pool_lib.max_pool(x, 3, 2, 0, train=True)
            elif self.slice_pool and not train:
                x = max_pool_slices(x, 3, 2)
            else:
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        return x


class AlexNetV1(nn.Module):
    """The official `backbones.AlexNetV1` (total stride 8), NHWC.

    conv1 11x11/2 + BN + ReLU + maxpool 3/2; conv2 5x5 groups 2 + BN + ReLU + maxpool 3/2;
    conv3 3x3 + BN + ReLU; conv4 3x3 groups 2 + BN + ReLU; conv5 3x3 groups 2 (no BN, no ReLU).
    BatchNorm eps 1e-6, torch momentum 0.05. No padding anywhere (floor-mode pooling), so an
    input of 127 px gives a 6 x 6 embedding, 239 px 20 x 20 and 255 px 22 x 22.

    Attributes:
      widths: output channels of conv1..conv5 (`WIDTHS` official, `TINY_WIDTHS` for tests); the
        grouped layers need even widths.
      lean_pool_grad: the cheap max-pool gradient in training (`ConvBlock`).
      slice_pool: inference pooling as strided slices (`ConvBlock`, `max_pool_slices`).
    """

    widths: Sequence[int] = WIDTHS
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm
    lean_pool_grad: bool = True
    slice_pool: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, 3]` raw 0..255 images -> `[B, h, w, widths[4]]` embeddings."""
        if len(self.widths) != 5:
            raise ValueError(f"AlexNetV1 needs 5 widths, got {tuple(self.widths)}")
        block = functools.partial(ConvBlock, conv=self.conv, norm=self.norm, lean_pool_grad=self.lean_pool_grad,
                                  slice_pool=self.slice_pool, dtype=self.dtype, param_dtype=self.param_dtype)
        w1, w2, w3, w4, w5 = self.widths
        x = block(w1, 11, stride=2, pool=True, name="conv1")(x, train)
        x = block(w2, 5, groups=2, pool=True, name="conv2")(x, train)
        x = block(w3, 3, name="conv3")(x, train)
        x = block(w4, 3, groups=2, name="conv4")(x, train)
        return block(w5, 3, groups=2, norm_act=False, name="conv5")(x, train)


class SiamFC(nn.Module):
    """The official `Net(AlexNetV1(), heads.SiamFC(out_scale))`.

    Methods (use with `apply(..., method=...)`):
      `__call__(z, x)`: training / evaluation on pairs, `{'response', 'exemplar', 'search'}`.
      `embed(images)`: backbone embeddings; the tracker's cached exemplar is `embed(z)`.
      `respond(exemplar, x)`: `{'response'}` for search images against cached exemplar embeddings.

    Attributes:
      widths: backbone widths (`WIDTHS` official; `TINY_WIDTHS` for tests), a tuple: the tracker
        passes the model to `jax.jit` as a static (hashed) argument.
      out_scale: response scale (official 0.001).
      conv, norm: layer factories injected into every backbone layer.
      layers: a `research.cpu.layers.Layers` (`select(config.model.conv_impl)`); when set it
        chooses `conv` and `norm` (`layer_factories`), parameters unchanged.
      precision: `jax.lax.Precision` of the correlation head (the backbone's comes with `conv`).
      fast_train_grads: in training, the cheap max-pool gradient (`ConvBlock.lean_pool_grad`) and
        the correlation as `xcorr_matmul` (unless `precision` is set); same values and gradients to
        float rounding, the alexnet_v1 train step several times faster on XLA:CPU. Inference and
        export are unaffected.
      slice_pool: inference max pooling as strided slices (`max_pool_slices`: same values, ~6 ms
        less per 3-scale search branch on XLA:CPU); `task.build_model` sets it on the CPU paths,
        export keeps `nn.max_pool`.
      fast_xcorr: outside training (and without `precision`), the correlation as `xcorr_single`
        for one exemplar (the tracker) and as `xcorr_matmul` for pairs: the same sums to float
        rounding, ~2.6 ms less per 3-scale search branch on XLA:CPU; set by `task.build_model` on
        the CPU paths.
    """

    widths: Sequence[int] = WIDTHS
    out_scale: float = OUT_SCALE
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm
    layers: Any = None
    precision: Any = None
    fast_train_grads: bool = True
    slice_pool: bool = False
    fast_xcorr: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        conv, norm = layer_factories(self.layers) if self.layers is not None else (self.conv, self.norm)
        self.backbone = AlexNetV1(widths=self.widths, conv=conv, norm=norm, lean_pool_grad=self.fast_train_grads,
                                  slice_pool=self.slice_pool, dtype=self.dtype, param_dtype=self.param_dtype)

    def embed(self, images: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, 3]` raw 0..255 images -> `[B, h, w, C]` embeddings (official `net.backbone`)."""
        return self.backbone(images, train)

    def respond(self, exemplar: jax.Array, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Responses of search images `x` `[Bx, H, W, 3]` to cached embeddings `exemplar` `[Bz, h, w, C]`.

        Search item `i` is paired with exemplar `i % Bz` (`xcorr`). Returns `{'response': [Bx, ho, wo, 1],
        'search': [Bx, hx, wx, C]}` (official `net.head(kernel, net.backbone(x))`).
        """
        search = self.backbone(x, train)
        if self.precision is None:  # the faster forms: same sums to float rounding
            if train and self.fast_train_grads:  # the fast gradient
                return {"response": xcorr_matmul(exemplar, search, self.out_scale), "search": search}
            if not train and self.fast_xcorr:
                fast = xcorr_single if exemplar.shape[0] == 1 else xcorr_matmul
                return {"response": fast(exemplar, search, self.out_scale), "search": search}
        return {"response": xcorr(exemplar, search, self.out_scale, precision=self.precision), "search": search}

    def __call__(self, z: jax.Array, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Official `Net.forward(z, x)`: backbone on `z` then on `x` (two BatchNorm passes in training).

        Args:
          z: `[Bz, Hz, Wz, 3]` exemplar crops, raw 0..255 (127 px officially).
          x: `[Bx, Hx, Wx, 3]` search crops (255 px officially); `Bx` a multiple of `Bz`.
          train: BatchNorm uses and updates batch statistics (`mutable=['batch_stats']`).

        Returns:
          `{'response': [Bx, ho, wo, 1], 'exemplar': [Bz, hz, wz, C], 'search': [Bx, hx, wx, C]}`.
        """
        exemplar = self.embed(z, train)
        out = self.respond(exemplar, x, train)
        return {"response": out["response"], "exemplar": exemplar, "search": out["search"]}


TinySiamFC: Callable[..., SiamFC] = functools.partial(SiamFC, widths=TINY_WIDTHS)

# Full float32 convolutions everywhere. On recent NVIDIA GPUs XLA's default float32 convolution
# may run on TF32 tensor cores (10-bit mantissas), ~1e-4 relative on the responses, which already
# moves tracker peaks (golden_tracker README, "TF32"); use this to reproduce the official CPU tracker.
HighestPrecisionConv: ModuleDef = functools.partial(nn.Conv, precision=jax.lax.Precision.HIGHEST)
HighestPrecisionSiamFC: Callable[..., SiamFC] = functools.partial(
    SiamFC, conv=HighestPrecisionConv, precision=jax.lax.Precision.HIGHEST)


def init_variables(model: SiamFC, rng: jax.Array, z_size: int = 127, x_size: int = 255) -> dict:
    """Initial `{'params', 'batch_stats'}` from one exemplar and one search image of the given sizes."""
    z = jnp.zeros((1, z_size, z_size, 3), jnp.float32)
    x = jnp.zeros((1, x_size, x_size, 3), jnp.float32)
    return dict(model.init(rng, z, x))


def param_count(variables: dict) -> int:
    """Number of trainable parameters (the official `sum(p.numel() for p in net.parameters())`)."""
    return int(sum(v.size for v in jax.tree_util.tree_leaves(variables["params"])))
