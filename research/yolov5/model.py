"""YOLOv5 (v6.0/v7.0, anchor-based) built from a yaml layer list, in flax.linen.

The builder follows the official `parse_model` rules: each row `[from, number, module, args]`
has its repeat count scaled by `depth_multiple` and its output channels by `width_multiple`
(rounded up to a multiple of 8). Module names are the official layer indices ("0" … "24") and
the official attribute names (`conv`, `bn`, `cv1`, `m.0`, …), so a Flax parameter path maps
mechanically onto the official PyTorch `state_dict` key (`model.2.m.0.cv1.conv.weight`); see
`research/yolov5/bridge.py`.

Layout is NHWC throughout. The Detect head returns its raw per-level outputs in the official
torch layout `[B, anchor, y, x, 5 + nc]`, so the loss and golden checks use the same indexing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.cpu.layers import PLAIN, Layers
from research.cpu.layers import select as select_layers
from research.vision.init import torch_bias_init, torch_conv_init
from research.vision.upsample import upsample_nearest
from research.yolov5.cfg import DEFAULT_YAML, VARIANTS, load_yaml_cfg  # noqa: F401  (public here as before)

Dtype = Any

BN_EPS = 1e-3  # official initialize_weights sets BatchNorm eps=1e-3, momentum=0.03
BN_MOMENTUM = 0.97  # flax momentum = 1 - torch momentum


def make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    index: int
    source: int | tuple[int, ...]
    module: str
    kwargs: tuple[tuple[str, Any], ...]
    out_channels: int


def parse_model(cfg: Mapping[str, Any], in_channels: int = 3) -> tuple[LayerSpec, ...]:
    """Turns yaml rows into layer specs with the official depth/width scaling."""
    nc = int(cfg["nc"])
    gd, gw = float(cfg["depth_multiple"]), float(cfg["width_multiple"])
    anchors = cfg["anchors"]
    na = (len(anchors[0]) // 2) if isinstance(anchors, (list, tuple)) else int(anchors)
    no = na * (nc + 5)
    ch = [in_channels]
    specs = []
    rows = list(cfg["backbone"]) + list(cfg["head"])
    for i, row in enumerate(rows):
        if len(row) != 4:
            raise ValueError(f"layer {i}: expected [from, number, module, args], got {row!r}")
        f, n, m, args = row
        args = [nc if a == "nc" else anchors if a == "anchors" else a for a in args]
        n = max(round(n * gd), 1) if n > 1 else n
        src = tuple(f) if isinstance(f, (list, tuple)) else int(f)
        in_ch = [ch[j] if j < 0 else ch[j + 1] for j in (src if isinstance(src, tuple) else (src,))]
        if m in ("Conv", "C3", "Bottleneck", "SPPF", "SPP"):
            c1, c2 = in_ch[0], args[0]
            if c2 != no:
                c2 = make_divisible(c2 * gw, 8)
            rest = list(args[1:])
            if m == "Conv":
                names = ("kernel", "stride", "padding", "groups")
                kw = dict(zip(names, rest))
                kw["features"] = c2
                if n != 1:
                    raise ValueError(f"layer {i}: Conv with number {n} > 1 is not supported")
            elif m == "C3":
                kw = dict(features=c2, n=n, shortcut=bool(rest[0]) if rest else True)
            elif m == "Bottleneck":
                kw = dict(features=c2, shortcut=bool(rest[0]) if rest else True)
            elif m == "SPPF":
                kw = dict(features=c2, k=int(rest[0]) if rest else 5)
            else:  # SPP
                kw = dict(features=c2, ks=tuple(rest[0]) if rest else (5, 9, 13))
            out = c2
        elif m == "Concat":
            kw, out = {}, sum(in_ch)
            if args and args[0] not in (1, -1):
                raise ValueError(f"layer {i}: Concat supports the channel dimension only, got {args}")
        elif m in ("nn.Upsample", "Upsample"):
            scale = args[1] if len(args) > 1 else 2
            mode = args[2] if len(args) > 2 else "nearest"
            if mode != "nearest":
                raise ValueError(f"layer {i}: only nearest upsampling is supported, got {mode!r}")
            kw, out, m = dict(scale=int(scale)), in_ch[0], "Upsample"
        elif m == "Detect":
            a = args[1]
            if isinstance(a, int):
                raise ValueError("Detect with an anchor count instead of anchor sizes is not supported")
            kw = dict(nc=int(args[0]), anchors=tuple(tuple(float(v) for v in level) for level in a))
            out = no
        else:
            raise ValueError(f"layer {i}: unknown module {m!r}; known: Conv, C3, Bottleneck, SPPF, SPP, "
                             "Concat, nn.Upsample, Detect")
        specs.append(LayerSpec(i, src, m, tuple(sorted(kw.items())), out))
        ch.append(out)
    if not specs or specs[-1].module != "Detect":
        raise ValueError("the last layer of a YOLOv5 cfg must be Detect")
    return tuple(specs)


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm + SiLU, the official `Conv`."""

    features: int
    kernel: int = 1
    stride: int = 1
    padding: int | None = None
    groups: int = 1
    act: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    layers: Layers = PLAIN

    @nn.compact
    def __call__(self, x, train: bool = False):
        p = self.kernel // 2 if self.padding is None else self.padding
        x = self.layers.conv(self.features, self.kernel, self.stride, p, self.groups, kernel_init=torch_conv_init(),
                             dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        return self.layers.norm_act("silu" if self.act else "none", momentum=BN_MOMENTUM, epsilon=BN_EPS,
                                    dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x, train)


class Bottleneck(nn.Module):
    features: int
    shortcut: bool = True
    groups: int = 1
    expansion: float = 0.5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    layers: Layers = PLAIN

    @nn.compact
    def __call__(self, x, train: bool = False):
        hidden = int(self.features * self.expansion)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, layers=self.layers)
        y = Conv(hidden, 1, 1, name="cv1", **kw)(x, train)
        y = Conv(self.features, 3, 1, groups=self.groups, name="cv2", **kw)(y, train)
        return x + y if self.shortcut and x.shape[-1] == self.features else y


class C3(nn.Module):
    """CSP bottleneck with three convolutions."""

    features: int
    n: int = 1
    shortcut: bool = True
    expansion: float = 0.5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    layers: Layers = PLAIN

    @nn.compact
    def __call__(self, x, train: bool = False):
        hidden = int(self.features * self.expansion)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, layers=self.layers)
        a = Conv(hidden, 1, 1, name="cv1", **kw)(x, train)
        b = Conv(hidden, 1, 1, name="cv2", **kw)(x, train)
        for j in range(self.n):
            a = Bottleneck(hidden, self.shortcut, expansion=1.0, name=f"m.{j}", **kw)(a, train)
        return Conv(self.features, 1, name="cv3", **kw)(jnp.concatenate([a, b], axis=-1), train)


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained k x k max pools."""

    features: int
    k: int = 5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    layers: Layers = PLAIN

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, layers=self.layers)
        x = Conv(x.shape[-1] // 2, 1, 1, name="cv1", **kw)(x, train)
        y1 = self.layers.max_pool_same(x, self.k, train)
        y2 = self.layers.max_pool_same(y1, self.k, train)
        y3 = self.layers.max_pool_same(y2, self.k, train)
        return Conv(self.features, 1, 1, name="cv2", **kw)(jnp.concatenate([x, y1, y2, y3], -1), train)


class SPP(nn.Module):
    features: int
    ks: tuple[int, ...] = (5, 9, 13)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    layers: Layers = PLAIN

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, layers=self.layers)
        x = Conv(x.shape[-1] // 2, 1, 1, name="cv1", **kw)(x, train)
        pools = [self.layers.max_pool_same(x, k, train) for k in self.ks]
        return Conv(self.features, 1, 1, name="cv2", **kw)(jnp.concatenate([x] + pools, -1), train)


class Detect(nn.Module):
    """Per-level 1x1 conv heads plus the official inference decoding.

    Returns the raw heads `[B, na, ny, nx, 5 + nc]` ("heads"), the same logits in the
    convolution's own layout `[B, ny, nx, na, 5 + nc]` ("heads_nhwc": what the training loss
    reads, so no transposes run; under jit whichever is unused costs nothing) and, when `decode`,
    the decoded boxes
    `[B, N, 5 + nc]` (xywh in input pixels, objectness and class probabilities), anchor-major
    per level as the official `Detect.forward` in eval mode.
    """

    nc: int
    anchors: tuple[tuple[float, ...], ...]  # pixels, per level [w0, h0, w1, h1, ...]
    strides: tuple[int, ...] = (8, 16, 32)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    layers: Layers = PLAIN

    @property
    def na(self) -> int:
        return len(self.anchors[0]) // 2

    def _bias_init(self, stride: int, fan_in: int):
        no, na, nc = self.nc + 5, self.na, self.nc
        base = torch_bias_init(fan_in)

        def init(key, shape, dtype=jnp.float32):
            b = base(key, shape, dtype).reshape(na, no)
            # official _initialize_biases: objectness for ~8 objects per 640 image, class prior 0.6
            b = b.at[:, 4].add(math.log(8 / (640 / stride) ** 2))
            b = b.at[:, 5:5 + nc].add(math.log(0.6 / (nc - 0.99999)))
            return b.reshape(shape)

        return init

    @nn.compact
    def __call__(self, xs: Sequence[jax.Array], decode: bool = True):
        no, na = self.nc + 5, self.na
        heads, heads_nhwc, decoded = [], [], []
        for i, x in enumerate(xs):
            y = self.layers.conv(na * no, 1, use_bias=True, kernel_init=torch_conv_init(),
                       bias_init=self._bias_init(self.strides[i], x.shape[-1]),
                       dtype=self.dtype, param_dtype=self.param_dtype, name=f"m.{i}")(x)
            b, ny, nx, _ = y.shape
            y = y.astype(jnp.float32)
            heads_nhwc.append(y.reshape(b, ny, nx, na, no))
            # the official layout through channels-first, as the official Detect does: in an ONNX export the first
            # transpose cancels against the convolution's own NCHW output, so the graph reads its output
            # channels-first (cheaper for ONNX Runtime than a channels-last reorder plus a 5-D transpose)
            y = y.transpose(0, 3, 1, 2).reshape(b, na, no, ny, nx).transpose(0, 1, 3, 4, 2)
            heads.append(y)
            if decode:
                decoded.append(self._decode(y, i))
        out = {"heads": heads, "heads_nhwc": heads_nhwc}
        if decode:
            out["pred"] = jnp.concatenate(decoded, axis=1)
        return out

    def _decode(self, y, i: int):
        b, na, ny, nx, no = y.shape
        stride = float(self.strides[i])
        gx = np.arange(nx, dtype=np.float32)
        gy = np.arange(ny, dtype=np.float32)
        grid = np.stack(np.meshgrid(gx, gy, indexing="xy"), -1)[None, None] - 0.5  # [1,1,ny,nx,2]
        # full [1, na, ny, nx, 2] like the official anchor_grid: ONNX Runtime multiplies equal shapes fast, a
        # broadcast over ny and nx with 2 innermost elements slowly
        anchor_grid = np.ascontiguousarray(np.broadcast_to(
            np.asarray(self.anchors[i], np.float32).reshape(1, na, 1, 1, 2), (1, na, ny, nx, 2)))
        s = jax.nn.sigmoid(y)
        xy = (s[..., 0:2] * 2 + grid) * stride
        wh = (s[..., 2:4] * 2) ** 2 * anchor_grid
        out = jnp.concatenate([xy, wh, s[..., 4:]], axis=-1)
        return out.reshape(b, na * ny * nx, no)


_MODULES = {"Conv": Conv, "C3": C3, "Bottleneck": Bottleneck, "SPPF": SPPF, "SPP": SPP}


class YOLOv5(nn.Module):
    """YOLOv5 from a parsed yaml cfg.

    Attributes:
      cfg: the model cfg dict (nc, depth_multiple, width_multiple, anchors, backbone, head).
      strides: output strides of the Detect inputs (8, 16, 32 for the P3-P5 layout).
      dtype: computation dtype (e.g. bfloat16 on GPUs); heads and decoding stay float32.
      param_dtype: parameter dtype.
      layers: how convolutions, BatchNorm+SiLU and max pooling compute (`research.cpu.layers`;
        `build_model` picks the CPU speed layer on CPU); parameters are the same either way.
    """

    cfg: Mapping[str, Any]
    strides: tuple[int, ...] = (8, 16, 32)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    layers: Layers = PLAIN

    @property
    def specs(self) -> tuple[LayerSpec, ...]:
        return parse_model(self.cfg)

    @property
    def detect_spec(self) -> LayerSpec:
        return self.specs[-1]

    @property
    def anchors_pixels(self) -> np.ndarray:
        """[nl, na, 2] anchor sizes in pixels."""
        a = dict(self.detect_spec.kwargs)["anchors"]
        return np.asarray(a, np.float32).reshape(len(a), -1, 2)

    @property
    def anchors_stride_units(self) -> np.ndarray:
        """[nl, na, 2], the official `Detect.anchors` buffer (anchors divided by stride)."""
        return self.anchors_pixels / np.asarray(self.strides, np.float32)[:, None, None]

    def for_export(self) -> "YOLOv5":
        """The same model computing with XLA convolutions: exported graphs then hold `Conv`
        nodes, which ONNX Runtime and TensorRT fuse and tune (faster there than matmuls)."""
        return self.clone(layers=PLAIN)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, decode: bool | None = None):
        """x: [B, H, W, 3] in [0, 1]. Returns {'heads': [...], 'pred': [B, N, 5+nc] (eval)}."""
        decode = (not train) if decode is None else decode
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, layers=self.layers)
        x = x.astype(self.dtype)
        outputs: list[Any] = []
        for spec in self.specs:
            take = lambda j: outputs[j] if outputs else x  # noqa: E731  (layer 0 reads the image)
            src = spec.source
            inp = [take(j) for j in src] if isinstance(src, tuple) else take(src)
            kwargs = dict(spec.kwargs)
            name = str(spec.index)
            if spec.module in _MODULES:
                y = _MODULES[spec.module](name=name, **kwargs, **kw)(inp, train)
            elif spec.module == "Concat":
                y = jnp.concatenate(inp, axis=-1)
            elif spec.module == "Upsample":
                y = upsample_nearest(inp, kwargs["scale"])
            elif spec.module == "Detect":
                y = Detect(name=name, strides=self.strides, **kwargs, **kw)(inp, decode=decode)
            else:  # parse_model already rejects unknown modules
                raise AssertionError(spec.module)
            outputs.append(y)
        return outputs[-1]


def build_model(cfg: str | Mapping[str, Any] | None = None, *, variant: str | None = None,
                nc: int | None = None, dtype: Dtype = jnp.float32,
                param_dtype: Dtype = jnp.float32, conv_impl: str = "auto") -> YOLOv5:
    """Builds a YOLOv5 from a yaml path / dict (default: the official v6.0 layout) and a variant."""
    cfg = load_yaml_cfg(cfg, variant=variant, nc=nc)
    parse_model(cfg)  # validate early, with layer-numbered errors
    # the CPU speed layer on CPU, flax's own computations elsewhere (research/cpu/layers.py);
    # a typo in conv_impl fails here, not at the first trace
    model = YOLOv5(cfg=_freeze(cfg), dtype=dtype, param_dtype=param_dtype, layers=select_layers(conv_impl))
    # Strides of the Detect inputs from a 256 x 256 probe, as the official Model does.
    out, _ = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, 256, 256, 3)),
                                                           decode=False))
    strides = tuple(256 // h.shape[2] for h in out["heads"])
    return model.clone(strides=strides) if strides != model.strides else model


def _freeze(obj):
    """Hashable cfg so the module can be a static jit argument."""
    if isinstance(obj, Mapping):
        return flax.core.FrozenDict({k: _freeze(v) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        return tuple(_freeze(v) for v in obj)
    return obj


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
