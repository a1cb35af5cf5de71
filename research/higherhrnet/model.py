"""HigherHRNet (bottom-up multi-person pose) in flax.linen: HRNet backbone plus the deconvolution head.

Follows `lib/models/pose_higher_hrnet.py` of HRNet/HigherHRNet-Human-Pose-Estimation (`PoseHigherResolutionNet`):

  stem      two 3x3 stride-2 conv + BN + ReLU (64 channels), stride 4
  layer1    4 Bottlenecks (64 -> 256 channels)
  stage2-4  HighResolutionModules: parallel branches of BasicBlocks at strides 4, 8, 16, 32, exchanged by fuse
            layers (1x1 conv + BN then nearest upsampling towards higher resolution; chains of 3x3 stride-2
            conv + BN (+ ReLU except the last) towards lower resolution; summed, then ReLU). The last module of
            stage 4 fuses into the highest-resolution branch only.
  head      `final_layers.0` (1x1 conv with bias) on the stride-4 features gives output 0: 17 heatmaps + 17
            associative-embedding tag maps; `deconv_layers.0` takes [features, output 0] concatenated, upsamples
            them x2 with a 4x4 stride-2 transposed conv (+ BN + ReLU) and 4 BasicBlocks; `final_layers.1` gives
            output 1: 17 heatmaps at stride 2.

Layout is NHWC. Every submodule carries the official attribute path as its Flax name (`stage3.2.fuse_layers.2.0.1.0`
for the first conv of the chain that takes branch 0 down to branch 2), so a Flax parameter path joined with "." is the
official `state_dict` key; `research/higherhrnet/bridge.py` converts. The configuration mirrors the yaml
`experiments/coco/higher_hrnet/w32_512_adam_lr1e-3.yaml` (`MODEL.EXTRA`, `MODEL.NUM_JOINTS`, `MODEL.TAG_PER_JOINT`,
`LOSS.WITH_AE_LOSS`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.vision.upsample import upsample_nearest

Dtype = Any
ModuleDef = Callable[..., nn.Module]

BN_MOMENTUM = 0.1  # torch momentum of every BatchNorm2d in the official model (explicit or torch's default)
BN_EPS = 1e-5  # torch's default eps; the official code never changes it


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One `MODEL.EXTRA.STAGE<n>` block of the yaml (BLOCK is BASIC and FUSE_METHOD is SUM in every official cfg)."""

    num_modules: int
    num_blocks: tuple[int, ...]
    num_channels: tuple[int, ...]
    block: str = "BASIC"
    fuse_method: str = "SUM"

    @property
    def num_branches(self) -> int:
        return len(self.num_channels)


@dataclasses.dataclass(frozen=True)
class DeconvConfig:
    """`MODEL.EXTRA.DECONV` of the yaml: the upsampling head after the backbone."""

    num_deconvs: int = 1
    num_channels: tuple[int, ...] = (32,)
    kernel_size: tuple[int, ...] = (4,)
    num_basic_blocks: int = 4
    cat_output: tuple[bool, ...] = (True,)


@dataclasses.dataclass(frozen=True)
class HigherHRNetConfig:
    """Architecture settings, named after the official yaml keys.

    Attributes:
      num_joints: `MODEL.NUM_JOINTS` (17 for COCO).
      tag_per_joint: `MODEL.TAG_PER_JOINT`: one tag map per joint (True) or a single one.
      with_ae_loss: `LOSS.WITH_AE_LOSS`, one flag per output: an output with the flag carries tag maps after its
        heatmaps (the official model reads this loss setting to size its final layers).
      stem_channels: width of the two stem convolutions (hard-coded 64 officially; `STEM_INPLANES` in the yaml).
      layer1_planes, layer1_blocks: Bottleneck planes (x4 out) and count of layer1 (64, 4 officially, hard-coded).
      stages: `STAGE2`, `STAGE3`, `STAGE4`.
      final_conv_kernel: `FINAL_CONV_KERNEL` (1 or 3) of the final layers.
      deconv: `DECONV`.
      bn_momentum: torch BatchNorm momentum (Flax momentum is 1 - this).
      bn_eps: BatchNorm epsilon.
    """

    num_joints: int = 17
    tag_per_joint: bool = True
    with_ae_loss: tuple[bool, ...] = (True, False)
    stem_channels: int = 64
    layer1_planes: int = 64
    layer1_blocks: int = 4
    stages: tuple[StageConfig, ...] = (
        StageConfig(1, (4, 4), (32, 64)),
        StageConfig(4, (4, 4, 4), (32, 64, 128)),
        StageConfig(3, (4, 4, 4, 4), (32, 64, 128, 256)),
    )
    final_conv_kernel: int = 1
    deconv: DeconvConfig = DeconvConfig()
    bn_momentum: float = BN_MOMENTUM
    bn_eps: float = BN_EPS

    @property
    def dim_tag(self) -> int:
        return self.num_joints if self.tag_per_joint else 1

    def output_channels(self, i: int) -> int:
        """Channels of output i: heatmaps, plus tag maps where `with_ae_loss[i]`."""
        return self.num_joints + (self.dim_tag if self.with_ae_loss[i] else 0)

    @classmethod
    def from_official(cls, cfg: Mapping[str, Any]) -> "HigherHRNetConfig":
        """From an official experiment yaml, parsed to nested dicts (`yaml.safe_load`): reads `MODEL.NUM_JOINTS`,
        `MODEL.TAG_PER_JOINT`, `MODEL.EXTRA` (STAGE2-4, FINAL_CONV_KERNEL, DECONV) and `LOSS.WITH_AE_LOSS`, as
        `PoseHigherResolutionNet.__init__` does.

        Raises:
          KeyError: a required key is missing. ValueError: the result is invalid (see `validate`).
        """
        model, extra = cfg["MODEL"], cfg["MODEL"]["EXTRA"]
        stages = []
        for n in (2, 3, 4):
            s = extra[f"STAGE{n}"]
            if int(s["NUM_BRANCHES"]) != len(s["NUM_CHANNELS"]):
                raise ValueError(f"STAGE{n}: NUM_BRANCHES({s['NUM_BRANCHES']}) <> NUM_CHANNELS({s['NUM_CHANNELS']})")
            stages.append(StageConfig(int(s["NUM_MODULES"]), tuple(map(int, s["NUM_BLOCKS"])),
                                      tuple(map(int, s["NUM_CHANNELS"])), s["BLOCK"], s["FUSE_METHOD"]))
        d = extra["DECONV"]
        out = cls(num_joints=int(model["NUM_JOINTS"]), tag_per_joint=bool(model["TAG_PER_JOINT"]),
                  with_ae_loss=tuple(bool(v) for v in cfg["LOSS"]["WITH_AE_LOSS"]),
                  stages=tuple(stages),  # the official model ignores STEM_INPLANES: its stem is always 64 wide
                  final_conv_kernel=int(extra["FINAL_CONV_KERNEL"]),
                  deconv=DeconvConfig(int(d["NUM_DECONVS"]), tuple(map(int, d["NUM_CHANNELS"])),
                                      tuple(map(int, d["KERNEL_SIZE"])), int(d["NUM_BASIC_BLOCKS"]),
                                      tuple(bool(v) for v in d["CAT_OUTPUT"])))
        out.validate()
        return out

    def validate(self) -> None:
        """Raises ValueError on a configuration the official code would reject or mis-build."""
        if len(self.stages) != 3:
            raise ValueError(f"HRNet has stages 2, 3 and 4; got {len(self.stages)} stage configs")
        for n, s in enumerate(self.stages, start=2):
            if s.block != "BASIC" or s.fuse_method != "SUM":
                raise ValueError(f"STAGE{n}: only BLOCK BASIC and FUSE_METHOD SUM are supported, got {s.block}, "
                                 f"{s.fuse_method}")
            if len(s.num_blocks) != s.num_branches:
                raise ValueError(f"STAGE{n}: NUM_BRANCHES({s.num_branches}) <> NUM_BLOCKS({len(s.num_blocks)})")
        if len(self.with_ae_loss) != self.deconv.num_deconvs + 1:
            raise ValueError(f"with_ae_loss needs one flag per output ({self.deconv.num_deconvs + 1}), got "
                             f"{self.with_ae_loss}")
        d = self.deconv
        if not (len(d.num_channels) == len(d.kernel_size) == len(d.cat_output) == d.num_deconvs):
            raise ValueError(f"DECONV lists must have NUM_DECONVS ({d.num_deconvs}) entries: {d}")
        for k in d.kernel_size:
            if k not in (2, 3, 4):
                raise ValueError(f"DECONV.KERNEL_SIZE must be 2, 3 or 4, got {k}")
        if self.final_conv_kernel not in (1, 3):
            raise ValueError(f"FINAL_CONV_KERNEL must be 1 or 3, got {self.final_conv_kernel}")


def _hrnet_stages(widths: Sequence[int], blocks: int = 4, modules: Sequence[int] = (1, 4, 3)) -> tuple:
    return tuple(StageConfig(m, (blocks,) * (n + 2), tuple(widths[:n + 2])) for n, m in enumerate(modules))


W32 = HigherHRNetConfig()  # experiments/coco/higher_hrnet/w32_512_adam_lr1e-3.yaml (and w32_640)
W48 = HigherHRNetConfig(stages=_hrnet_stages((48, 96, 192, 384)),
                        deconv=DeconvConfig(num_channels=(48,)))  # w48_640_adam_lr1e-3.yaml
# Not official: a small variant for tests (widths 8/16/32/64, one block per branch, one module per stage).
TINY = HigherHRNetConfig(stem_channels=16, layer1_planes=8, layer1_blocks=1,
                         stages=_hrnet_stages((8, 16, 32, 64), blocks=1, modules=(1, 1, 1)),
                         deconv=DeconvConfig(num_channels=(8,), num_basic_blocks=1))
# Not official: the CPU default for the embedded synthetic people (twice TINY's widths: 16/32/64/128, stem 32,
# layer1 16 planes, deconv 16 channels). TINY plateaus at OKS AP ~0.40 there, its wrists and ankles drawn onto the
# elbows and knees; SMALL reaches 0.58 in 20 epochs at 1.7x TINY's step time (docs/higherhrnet.md).
SMALL = HigherHRNetConfig(stem_channels=32, layer1_planes=16, layer1_blocks=1,
                          stages=_hrnet_stages((16, 32, 64, 128), blocks=1, modules=(1, 1, 1)),
                          deconv=DeconvConfig(num_channels=(16,), num_basic_blocks=1))
VARIANTS = {"w32": W32, "w48": W48, "small": SMALL, "tiny": TINY}


def official_init(stddev: float = 0.001) -> nn.initializers.Initializer:
    """The official `init_weights`: conv and transposed-conv weights normal(0, 0.001) (biases 0, BN 1 / 0)."""
    return nn.initializers.normal(stddev)


def torch_deconv_padding(kernel: int, padding: int, output_padding: int) -> tuple[int, int]:
    """Explicit (low, high) padding that makes `lax.conv_transpose` equal torch's ConvTranspose2d.

    torch pads the stride-dilated input by kernel - 1 - padding on both sides, and output_padding more at the end.
    """
    return kernel - 1 - padding, kernel - 1 - padding + output_padding


def deconv_cfg(kernel: int) -> tuple[int, int]:
    """`_get_deconv_cfg`: (padding, output_padding) giving an exact x2 upsampling for kernel 4, 3 or 2."""
    return {4: (1, 0), 3: (1, 1), 2: (0, 0)}[kernel]


@dataclasses.dataclass(frozen=True)
class Fold:
    """Inference with each BatchNorm folded into the convolution before it (`conv_bn`).

    With running statistics a BatchNorm is y * a + b per channel (a = scale / sqrt(var + eps), b = bias - mean * a),
    so conv(x, W) then BatchNorm equals conv(x, W * a) + b: one elementwise pass less per layer (on XLA:CPU the
    separate BatchNorm passes were about a third of W32-512 inference). Parameters stay those of `nn.Conv` /
    `nn.BatchNorm`; the folded weights are computed inside the call. Equal to the plain path to float rounding
    (tests/higherhrnet/test_higherhrnet_model.py, `test_fold_bn_and_phase_deconv_match_plain`).

    Attributes:
      impl: `research.cpu.conv.conv2d` implementation of the folded convolutions ("lax", "dot", "onednn"), or
        "onednn_wide" (see `impl_for`), or "onednn_fused": every float32 conv + BatchNorm of `conv_bn` as one
        oneDNN call with the BatchNorm's scale and shift, the residual and the ReLU as post-ops
        (`research.cpu.kernels.onednn.conv_affine_act`; XLA:CPU ran them as separate passes over each output map
        and folded the scale into the weights on every call: about 45 % of W32-512 inference).
      eps: BatchNorm epsilon.
    """

    impl: str = "lax"
    eps: float = BN_EPS

    def impl_for(self, cin: int, kernel: int) -> str:
        """The implementation of one folded convolution: `impl`, except "onednn_wide": oneDNN for k x k kernels with at
        least 128 input channels (the 32x32 and 16x16 branches), XLA's convolution for the rest (W32-512 inference on
        a loaded 2-core CPU: 1754 ms of CPU time against 1792 with XLA only and 1887 with oneDNN only)."""
        if self.impl in ("onednn_wide", "onednn_fused"):
            return "onednn" if (kernel > 1 and cin >= 128) else "lax"
        return self.impl

    def fused(self, x: jax.Array) -> bool:
        """Whether `conv_bn` runs x's convolution, bias, residual and ReLU as one oneDNN call."""
        return self.impl == "onednn_fused" and x.dtype == jnp.float32


def conv_bn(parent: nn.Module, x: jax.Array, features: int, kernel: int, stride: int, padding: int, conv: ModuleDef,
            norm: ModuleDef, conv_name: str, bn_name: str, fold: Fold | None, relu: bool = False,
            residual: jax.Array | None = None) -> jax.Array:
    """`norm(name=bn_name)(conv(features, ..., name=conv_name)(x))` inside `parent`'s compact call, plus `residual`
    if given, then ReLU if `relu`; with `fold` (inference only, after initialisation), the same from the folded
    kernel and bias read from `parent`'s variables `params/{conv_name}/kernel`, `params/{bn_name}/{scale,bias}`,
    `batch_stats/{bn_name}/{mean,var}` (one oneDNN call for all of it where `fold.fused(x)`).

    x: [B, H, W, Cin], residual: [B, H', W', features] -> [B, H', W', features]."""
    training = False
    if fold is None or parent.is_initializing():
        y = conv(features, (kernel, kernel), (stride, stride), padding=padding, name=conv_name)(x)
        bn = norm(name=bn_name)
        y = bn(y)
        training = bn.use_running_average is False and not parent.is_initializing()
    else:
        from research.cpu import conv as conv_lib
        if fold.fused(x):
            from research.cpu.kernels import onednn
            w, a, b = bn_scale_shift(parent, conv_name, bn_name, fold.eps)
            return onednn.conv_affine_act(x, w, a, b, stride, padding, relu, residual)
        w, b = folded_kernel(parent, conv_name, bn_name, fold.eps)
        y = conv_lib.conv2d(x, w.astype(x.dtype), stride, padding, 1, fold.impl_for(x.shape[-1], kernel)) + b.astype(
            x.dtype)
    if residual is not None:
        y = y + residual
    y = nn.relu(y) if relu else y
    if training and materialize_outputs():
        # Every consumer, forward and backward, reads the layer's output from its buffer. Without this XLA:CPU
        # duplicated the BatchNorm arithmetic of a residual chain into each consumer, nested: one backward loop of W32's
        # branch 0 recomputed ~33 layers per element (88 ms of a 4.9 s train step for that fusion alone).
        from research.cpu.kernels import onednn
        y = onednn.materialize(y)
    return y


def materialize_outputs() -> bool:
    """Whether training materialises each conv + BatchNorm output (`conv_bn`): on the CPU backend where the speed
    layer's kernels load (`research.cpu.kernels.onednn.materialize`)."""
    if jax.default_backend() != "cpu":
        return False
    from research.cpu.kernels import onednn
    return onednn.available()[0]


def bn_scale_shift(parent: nn.Module, conv_name: str, bn_name: str, eps: float
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(kernel [kh, kw, Cin, Cout], a [Cout], b [Cout]) of `parent`'s conv `conv_name` followed by BatchNorm `bn_name`
    with running statistics: BatchNorm(conv(x)) = conv(x) * a + b (see `Fold`)."""
    params, stats = parent.variables["params"], parent.variables["batch_stats"]
    bn, st = params[bn_name], stats[bn_name]
    a = bn["scale"].astype(jnp.float32) * jax.lax.rsqrt(st["var"].astype(jnp.float32) + eps)
    b = bn["bias"].astype(jnp.float32) - st["mean"].astype(jnp.float32) * a
    return params[conv_name]["kernel"].astype(jnp.float32), a, b


def folded_kernel(parent: nn.Module, conv_name: str, bn_name: str, eps: float) -> tuple[jax.Array, jax.Array]:
    """(kernel * a [.., Cout], b [Cout]) of `parent`'s conv `conv_name` followed by BatchNorm `bn_name` (see `Fold`)."""
    w, a, b = bn_scale_shift(parent, conv_name, bn_name, eps)
    return w * a, b


ONNX_CHANNEL_BLOCK = 16  # onnxruntime's NCHWc block on AVX-512 (8 on AVX2, which divides it)


def identity_conv(x: jax.Array) -> jax.Array:
    """x [B, H, W, C] through a 1x1 convolution with the identity kernel: the same values (x * 1 plus zeros, exact
    for finite x), as one ONNX `Conv` in an export, which onnxruntime runs in its blocked layout (see
    `HigherHRNet.onnx_form`)."""
    c = x.shape[-1]
    return jax.lax.conv_general_dilated(x, jnp.eye(c, dtype=x.dtype)[None, None], (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def phase_conv_transpose(x: jax.Array, kernel: jax.Array, padding: Sequence[tuple[int, int]],
                         impl: str = "lax", epilogue: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """`nn.ConvTranspose(strides=(2, 2), padding=padding)` (kernel [kh, kw, in, out] applied without flip over the
    zero-dilated input) as four small convolutions of x, one per output phase, interleaved.

    Output pixel 2m + r (per axis) of the dilated convolution only meets the kernel taps t with r + t - lo even, at
    input m + (r + t - lo) / 2: a stride-1 convolution of x with those taps. The zero-dilated form spends 3/4 of its
    multiply-adds on inserted zeros (kernel 4: four 2x2 convolutions instead of one 4x4 over a 4x larger input).
    Needs equally many outputs per phase (an even output size, as every `deconv_cfg` kernel gives).

    Args:
      x: [B, H, W, Cin]; kernel: [kh, kw, Cin, Cout]; padding: ((lo_h, hi_h), (lo_w, hi_w)) of the dilated input.
      impl: `research.cpu.conv.conv2d` implementation of the phase convolutions, or "nchw": each phase as one
        channels-first `lax.conv_general_dilated` (what the ONNX export form uses: one plain `Conv` per phase whose
        bias and ReLU onnxruntime fuses into it).
      epilogue: elementwise per-channel function applied to each phase before the interleave (a bias and ReLU:
        `epilogue(interleave(p)) == interleave(epilogue(p))` for such functions), on [B, Ho/2, Wo/2, Cout] or, with
        `impl="nchw"`, on [B, Cout, Ho/2, Wo/2].

    Returns:
      [B, Ho, Wo, Cout], Ho = 2H - 1 + lo_h + hi_h - kh + 1 (and W alike).

    Raises:
      ValueError: an odd output size.
    """
    from research.cpu import conv as conv_lib
    b, h, w, _ = x.shape
    per_axis = []
    for size, k, (lo, hi) in ((h, kernel.shape[0], padding[0]), (w, kernel.shape[1], padding[1])):
        out = 2 * size - 1 + lo + hi - k + 1
        if out % 2:
            raise ValueError(f"phase_conv_transpose: output size {out} (input {size}, kernel {k}, padding {lo, hi}) is "
                             f"odd; the phases would differ in size")
        phases = []
        for r in (0, 1):
            taps = [t for t in range(k) if (r + t - lo) % 2 == 0]
            offsets = [(r + t - lo) // 2 for t in taps]
            pad_lo = -min(offsets)
            pad_hi = out // 2 - size - pad_lo + (max(offsets) - min(offsets))
            phases.append((taps, pad_lo, pad_hi))
        per_axis.append(phases)
    epilogue = epilogue or (lambda p: p)
    x_nchw = jnp.transpose(x, (0, 3, 1, 2)) if impl == "nchw" else None
    rows = []
    for taps_h, lo_h, hi_h in per_axis[0]:
        cols = []
        for taps_w, lo_w, hi_w in per_axis[1]:
            kw = kernel[np.array(taps_h)][:, np.array(taps_w)]
            if impl == "nchw":
                p = jax.lax.conv_general_dilated(x_nchw, kw, (1, 1), ((lo_h, hi_h), (lo_w, hi_w)),
                                                 dimension_numbers=("NCHW", "HWIO", "NCHW"))
                cols.append(jnp.transpose(epilogue(p), (0, 2, 3, 1)))
                continue
            if impl == "lax":  # the padding in the convolution: one ONNX Conv per phase in an export
                cols.append(epilogue(jax.lax.conv_general_dilated(x, kw, (1, 1), ((lo_h, hi_h), (lo_w, hi_w)),
                                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))))
                continue
            xp = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (lo_h, hi_h, 0), (lo_w, hi_w, 0), (0, 0, 0)))
            cols.append(epilogue(conv_lib.conv2d(xp, kw, 1, 0, 1, impl)))
        rows.append(jnp.stack(cols, axis=3))  # [B, Ho/2, Wo/2, 2 (column phase), Cout]
    y = jnp.stack(rows, axis=2)  # [B, Ho/2, 2 (row phase), Wo/2, 2, Cout]
    return y.reshape(b, y.shape[1] * 2, y.shape[3] * 2, kernel.shape[-1])


class PhaseConvTranspose(nn.Module):
    """`nn.ConvTranspose` with strides (2, 2) and explicit padding (same `kernel` [kh, kw, in, out], no flip, same
    optional `bias`) computed by `phase_conv_transpose`; the official ConvTranspose2d for `deconv_cfg` kernels.

    Raises:
      ValueError: other strides, or padding not given as explicit pairs.
    """

    features: int
    kernel_size: tuple
    strides: tuple = (2, 2)
    padding: Any = ((0, 0), (0, 0))
    use_bias: bool = False
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if tuple(self.strides) != (2, 2) or isinstance(self.padding, str):
            raise ValueError(f"{self.name}: PhaseConvTranspose needs strides (2, 2) and explicit padding pairs, got "
                             f"{self.strides}, {self.padding}")
        kh, kw = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), self.param_dtype)
        y = phase_conv_transpose(x.astype(self.dtype), kernel.astype(self.dtype), tuple(map(tuple, self.padding)),
                                 self.impl)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(self.dtype)
        return y


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN with a residual (official `BasicBlock`, expansion 1).

    Attributes:
      features: output channels.
      strides: stride of the first conv.
      conv, norm: layer factories (bias-free `nn.Conv`, `nn.BatchNorm` with the mode bound).
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    fold: Fold | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cb = functools.partial(conv_bn, self, conv=self.conv, norm=self.norm, fold=self.fold)
        y = cb(x, self.features, 3, self.strides, 1, conv_name="conv1", bn_name="bn1", relu=True)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = cb(x, self.features, 1, self.strides, 0, conv_name="downsample.0", bn_name="downsample.1")
        return cb(y, self.features, 3, 1, 1, conv_name="conv2", bn_name="bn2", relu=True, residual=x)


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 conv + BN with a residual (official `Bottleneck`, expansion 4): `planes` -> 4 * planes."""

    planes: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    expansion: int = 4
    fold: Fold | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.planes * self.expansion
        cb = functools.partial(conv_bn, self, conv=self.conv, norm=self.norm, fold=self.fold)
        y = cb(x, self.planes, 1, 1, 0, conv_name="conv1", bn_name="bn1", relu=True)
        y = cb(y, self.planes, 3, self.strides, 1, conv_name="conv2", bn_name="bn2", relu=True)
        if self.strides != 1 or x.shape[-1] != out:
            x = cb(x, out, 1, self.strides, 0, conv_name="downsample.0", bn_name="downsample.1")
        return cb(y, out, 1, 1, 0, conv_name="conv3", bn_name="bn3", relu=True, residual=x)


class HighResolutionModule(nn.Module):
    """Parallel BasicBlock branches and their exchange (official `HighResolutionModule`, FUSE_METHOD SUM).

    Attributes:
      num_blocks: BasicBlocks per branch.
      num_channels: channels per branch (branch i has stride 4 * 2**i).
      multi_scale_output: fuse into every branch (True) or into branch 0 only (last module of the last stage).
      nested_upsampling: sum the upsampled terms of a fuse nested, coarsest first (x_i + up2(c_i+1 + up2(c_i+2 +
        ...))) instead of each upsampled to branch i (x_i + up2(c_i+1) + up4(c_i+2) + ...): the same sum (nearest
        upsampling is linear and up4 = up2 o up2; float rounding differs by the order of the additions), with one
        full-resolution add and upsampling instead of one per term (the ONNX form, `HigherHRNet.onnx_form`).
    """

    num_blocks: tuple[int, ...]
    num_channels: tuple[int, ...]
    conv: ModuleDef
    norm: ModuleDef
    multi_scale_output: bool = True
    fold: Fold | None = None
    nested_upsampling: bool = False

    @nn.compact
    def __call__(self, xs: Sequence[jax.Array]) -> list[jax.Array]:
        """xs: one [B, H_i, W_i, C_i] map per branch. Returns the fused maps (one, or one per branch)."""
        n = len(self.num_channels)
        if len(xs) != n:
            raise ValueError(f"HighResolutionModule has {n} branches, got {len(xs)} inputs")
        xs = list(xs)
        for i in range(n):
            for b in range(self.num_blocks[i]):
                xs[i] = BasicBlock(self.num_channels[i], self.conv, self.norm, fold=self.fold,
                                   name=f"branches.{i}.{b}")(xs[i])
        if n == 1:
            return xs
        fused = []
        for i in range(n if self.multi_scale_output else 1):
            # sum over j of branch j brought to branch i, then ReLU: the identity and upsampled terms first, then
            # each downsampling chain (j < i), whose last conv + BatchNorm adds the sum so far as its residual (and
            # the last one applies the ReLU): one oneDNN call each on the fused inference path
            if self.nested_upsampling and i + 1 < n:
                acc = None
                for j in range(n - 1, i, -1):
                    t = self._fuse(xs[j], i, j, upsample=False)
                    acc = t if acc is None else t + upsample_nearest(acc, 2)
                y = xs[i] + upsample_nearest(acc, 2)
            else:
                y = None
                for j in range(i, n):
                    t = xs[j] if j == i else self._fuse(xs[j], i, j)
                    y = t if y is None else y + t
            for j in range(i):
                y = self._fuse(xs[j], i, j, residual=y, relu=j == i - 1)
            fused.append(y if i > 0 else nn.relu(y))
        return fused

    def _fuse(self, x: jax.Array, i: int, j: int, residual: jax.Array | None = None, relu: bool = False,
              upsample: bool = True) -> jax.Array:
        """Brings branch j's map to branch i's resolution and width (`fuse_layers.i.j`); for j < i (a chain ending in
        conv + BatchNorm) `residual` is added and ReLU applied after the chain's last BatchNorm if given; for j > i
        without `upsample`, branch i's width at branch j's resolution."""
        c_i, c_j = self.num_channels[i], self.num_channels[j]
        name = f"fuse_layers.{i}.{j}"
        cb = functools.partial(conv_bn, self, conv=self.conv, norm=self.norm, fold=self.fold)
        if j > i:
            x = cb(x, c_i, 1, 1, 0, conv_name=f"{name}.0", bn_name=f"{name}.1")
            return upsample_nearest(x, 2 ** (j - i)) if upsample else x
        for k in range(i - j):
            last = k == i - j - 1
            x = cb(x, c_i if last else c_j, 3, 2, 1, conv_name=f"{name}.{k}.0", bn_name=f"{name}.{k}.1",
                   relu=relu if last else True, residual=residual if last else None)
        return x


class HigherHRNet(nn.Module):
    """The official `PoseHigherResolutionNet`.

    Attributes:
      config: architecture (`W32`, `W48`, `TINY` or another `HigherHRNetConfig`).
      conv: convolution factory with `flax.linen.Conv`'s signature and parameters (called bias-free except the
        final layers).
      conv_transpose: transposed-convolution factory with `flax.linen.ConvTranspose`'s signature; its kernel is
        `[kh, kw, in, out]` and applied as a forward convolution over the dilated input (no flip), so it is the torch
        weight flipped spatially (the bridge does that).
      norm: BatchNorm factory with `flax.linen.BatchNorm`'s signature and variables.
      kernel_init: conv / transposed-conv weight init (official `init_weights`: normal(0, 0.001)).
      dtype: computation dtype; outputs are returned in float32.
      param_dtype: parameter dtype.
      fold_bn: in inference (`train=False`), fold every BatchNorm into the convolution before it (`Fold`; the
        transposed convolution is then computed by `phase_conv_transpose`); same variables, same outputs to float
        rounding.
      fold_impl: implementation of the folded convolutions (`Fold.impl`).
      onnx_form: in inference, the network in the form the ONNX export ships (same variables, same outputs to float
        rounding; what onnxruntime's blocked-layout (NCHWc) CPU kernels run fastest): every fuse layer sums its
        upsampled terms nested (`HighResolutionModule.nested_upsampling`); each final layer that feeds a
        deconv computes zero-padded extra channels so that the concatenated deconv input is a whole number of
        16-channel blocks (66 -> 80 for W32; the padded kernel rows are zero, output 0 is its first channels); the
        deconv's BatchNorm is folded into its four phase convolutions, each with its bias and ReLU before the
        interleave; and an identity 1x1 convolution after the interleave (`identity_conv`) starts the BasicBlocks in
        the blocked layout, so that onnxruntime fuses their residual adds into the convolutions as it does in the
        stages. The official export runs that region channels-first: per block a reorder out, an Add, a ReLU and a
        reorder in over [256, 256, 32] maps (docs/higherhrnet.md, Export).
    """

    config: HigherHRNetConfig = W32
    conv: ModuleDef = nn.Conv
    conv_transpose: ModuleDef = nn.ConvTranspose
    norm: ModuleDef = nn.BatchNorm
    kernel_init: nn.initializers.Initializer = official_init()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    fold_bn: bool = False
    fold_impl: str = "lax"
    onnx_form: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, Any]:
        """Runs the network.

        Args:
          x: [B, H, W, 3] normalised image (the official pipeline feeds ImageNet mean/std normalised RGB); H and W
            multiples of 32.
          train: BatchNorm uses batch statistics and updates `batch_stats` (pass `mutable=['batch_stats']`).

        Returns:
          dict with
            `outputs`: list, one per resolution as the official `forward` returns them: [B, H/4, W/4, 17 + 17] (heatmaps
              then tag maps) and [B, H/2, W/2, 17] (heatmaps), float32;
            `heatmaps`: list of the heatmap channels of each output (`[..., :num_joints]`);
            `tags`: list of the tag channels (`[..., num_joints:]`) of the outputs that carry them (`with_ae_loss`),
              i.e. [B, H/4, W/4, 17] for the COCO configs.

        Raises:
          ValueError: on an invalid config or input shape.
        """
        cfg = self.config
        cfg.validate()
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected an NHWC RGB batch [B, H, W, 3], got shape {x.shape}")
        conv = functools.partial(self.conv, use_bias=False, kernel_init=self.kernel_init, dtype=self.dtype,
                                 param_dtype=self.param_dtype)
        norm = functools.partial(self.norm, use_running_average=not train, momentum=1.0 - cfg.bn_momentum,
                                 epsilon=cfg.bn_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        fold = Fold(self.fold_impl, cfg.bn_eps) if self.fold_bn and not train else None
        cb = functools.partial(conv_bn, self, conv=conv, norm=norm, fold=fold)
        onnx_form = self.onnx_form and not train and not self.is_initializing()

        c = cfg.stem_channels
        x = cb(x, c, 3, 2, 1, conv_name="conv1", bn_name="bn1", relu=True)
        x = cb(x, c, 3, 2, 1, conv_name="conv2", bn_name="bn2", relu=True)
        for b in range(cfg.layer1_blocks):
            x = Bottleneck(cfg.layer1_planes, conv, norm, fold=fold, name=f"layer1.{b}")(x)

        ys = [x]
        for s, stage in enumerate(cfg.stages):
            n = s + 1  # transition n feeds stage n + 1
            xs = self._transition(ys, stage.num_channels, cb, f"transition{n}")
            last_stage = s == len(cfg.stages) - 1
            for m in range(stage.num_modules):
                multi = not (last_stage and m == stage.num_modules - 1)
                xs = HighResolutionModule(stage.num_blocks, stage.num_channels, conv, norm, multi_scale_output=multi,
                                          fold=fold, nested_upsampling=onnx_form, name=f"stage{s + 2}.{m}")(xs)
            ys = xs

        x = ys[0]
        final = functools.partial(self.conv, use_bias=True, kernel_init=self.kernel_init, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        k = cfg.final_conv_kernel
        pad = 1 if k == 3 else 0
        d = cfg.deconv

        def final_layer(x: jax.Array, i: int) -> tuple[jax.Array, jax.Array]:
            """Output i [B, h, w, C] and what the next deconv concatenates (the same; in `onnx_form`, channels-first
            and padded with zero channels to a whole number of onnxruntime blocks with x's)."""
            name = f"final_layers.{i}"
            if not onnx_form:
                y = final(cfg.output_channels(i), (k, k), padding=pad, name=name)(x)
                return y, y
            cat_next = i < d.num_deconvs and d.cat_output[i]
            w, b = self.variables["params"][name]["kernel"], self.variables["params"][name]["bias"]
            c = w.shape[-1]
            extra = (-(x.shape[-1] + c)) % ONNX_CHANNEL_BLOCK if cat_next else 0
            w = jnp.pad(w.astype(x.dtype), ((0, 0), (0, 0), (0, 0), (0, extra)))
            b = jnp.pad(b.astype(x.dtype), (0, extra))
            y = jax.lax.conv_general_dilated(jnp.transpose(x, (0, 3, 1, 2)), w, (1, 1), ((pad, pad), (pad, pad)),
                                             dimension_numbers=("NCHW", "HWIO", "NCHW")) + b[:, None, None]
            return jnp.transpose(y[:, :c], (0, 2, 3, 1)), jnp.transpose(y, (0, 2, 3, 1))

        y, y_cat = final_layer(x, 0)
        outputs = [y]
        for i in range(d.num_deconvs):
            if d.cat_output[i]:
                x = jnp.concatenate([x, y_cat], axis=-1)
            kernel = d.kernel_size[i]
            p, op = deconv_cfg(kernel)
            padding = (torch_deconv_padding(kernel, p, op),) * 2
            dname, bname = f"deconv_layers.{i}.0.0", f"deconv_layers.{i}.0.1"
            if onnx_form:
                w, bias = folded_kernel(self, dname, bname, cfg.bn_eps)
                w = jnp.pad(w.astype(x.dtype), ((0, 0), (0, 0), (0, x.shape[-1] - w.shape[2]), (0, 0)))
                bias = bias.astype(x.dtype)[:, None, None]
                x = phase_conv_transpose(x, w, padding, "nchw", epilogue=lambda q: nn.relu(q + bias))
                if d.num_basic_blocks:
                    x = identity_conv(x)
            elif fold is None or self.is_initializing():
                x = self.conv_transpose(d.num_channels[i], (kernel, kernel), (2, 2), padding=padding, use_bias=False,
                                        kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype,
                                        name=dname)(x)
                x = nn.relu(norm(name=bname)(x))
            else:
                w, bias = folded_kernel(self, dname, bname, fold.eps)
                x = nn.relu(phase_conv_transpose(x, w.astype(x.dtype), padding, fold.impl_for(x.shape[-1], kernel))
                            + bias.astype(x.dtype))
            for b in range(d.num_basic_blocks):
                x = BasicBlock(d.num_channels[i], conv, norm, fold=fold, name=f"deconv_layers.{i}.{b + 1}.0")(x)
            y, y_cat = final_layer(x, i + 1)
            outputs.append(y)

        outputs = [o.astype(jnp.float32) for o in outputs]
        nj = cfg.num_joints
        return {
            "outputs": outputs,
            "heatmaps": [o[..., :nj] for o in outputs],
            "tags": [o[..., nj:] for o, ae in zip(outputs, cfg.with_ae_loss) if ae],
        }

    @staticmethod
    def _transition(ys: list[jax.Array], channels: Sequence[int], cb: Callable[..., jax.Array],
                    name: str) -> list[jax.Array]:
        """The official `_make_transition_layer` and its use in `forward`: existing branches keep their map unless
        their width changes (3x3 conv + BN + ReLU); each new branch comes from the lowest-resolution map through a
        chain of 3x3 stride-2 conv + BN + ReLU."""
        pre = [y.shape[-1] for y in ys]
        xs = []
        for i, c in enumerate(channels):
            if i < len(pre):
                if c == pre[i]:
                    xs.append(ys[i])
                    continue
                # the official forward feeds the last map (y_list[-1]) to every transition it applies, also to one
                # that changes an existing branch's width (only transition1's single input in official cfgs)
                xs.append(cb(ys[-1], c, 3, 1, 1, conv_name=f"{name}.{i}.0", bn_name=f"{name}.{i}.1", relu=True))
                continue
            h = ys[-1]
            steps = i + 1 - len(pre)
            for j in range(steps):
                out = c if j == steps - 1 else pre[-1]
                h = cb(h, out, 3, 2, 1, conv_name=f"{name}.{i}.{j}.0", bn_name=f"{name}.{i}.{j}.1", relu=True)
            xs.append(h)
        return xs


def build_model(variant: str | HigherHRNetConfig = "w32", **kwargs) -> HigherHRNet:
    """A HigherHRNet for a variant name ('w32', 'w48', 'small', 'tiny') or a config; kwargs go to `HigherHRNet`.

    Raises:
      ValueError: unknown variant name or invalid config.
    """
    if isinstance(variant, str):
        if variant not in VARIANTS:
            raise ValueError(f"unknown HigherHRNet variant {variant!r}; choose one of {sorted(VARIANTS)}")
        variant = VARIANTS[variant]
    variant.validate()
    return HigherHRNet(config=variant, **kwargs)


def count_params(params: Any) -> int:
    """Number of parameter scalars, as torch's `sum(p.numel() for p in model.parameters())` counts them."""
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
