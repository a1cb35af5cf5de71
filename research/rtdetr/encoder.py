"""RT-DETR HybridEncoder in flax.linen, NHWC.

Follows the official `rtdetr_pytorch/src/zoo/rtdetr/hybrid_encoder.py` (lyuwenyu/RT-DETR):
  * input projection: per level a 1x1 convolution (no bias) + BatchNorm to `hidden_dim`
    (official `input_proj.<i>` = Sequential(Conv2d, BatchNorm2d): submodules `0`, `1`);
  * AIFI: a post-norm transformer encoder layer (self-attention + FFN) over the flattened S5 map
    with a fixed 2-D sin-cos position embedding (`encoder.<i>.layers.<j>`);
  * CCFM: a top-down FPN (`lateral_convs`, nearest 2x upsampling, `fpn_blocks`) then a bottom-up
    PAN (`downsample_convs` 3x3 stride 2, `pan_blocks`), fusing with CSPRepLayer blocks whose
    RepVGG blocks sum a 3x3 and a 1x1 ConvNorm branch.
`MultiheadAttention` (torch `nn.MultiheadAttention`, batch_first) is defined here and reused by the decoder.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.rtdetr.backbone import (BN_EPS, BatchNorm, ConvNormLayer, activation, dense, torch_default_bias_init,
                                      torch_default_kernel_init)
from research.vision.upsample import upsample_nearest

ModuleDef = Any
Dtype = Any

LN_EPS = 1e-5  # torch nn.LayerNorm default (flax's is 1e-6)


def layer_norm(name: str, dtype=None, param_dtype=jnp.float32) -> nn.LayerNorm:
    """torch.nn.LayerNorm(d): eps 1e-5, two-pass variance."""
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name)


def sincos_position_embedding_2d(w: int, h: int, embed_dim: int = 256, temperature: float = 10000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, `[1, w*h, embed_dim]` float32.

    Official `HybridEncoder.build_2d_sincos_position_embedding(w, h, ...)`, element for element:
    row k holds `[sin(a*omega), cos(a*omega), sin(b*omega), cos(b*omega)]` with a = k // h, b = k % h
    and omega = 1 / temperature**(arange(D/4) / (D/4)). (The official grid is `meshgrid(w, h, 'ij')`;
    for a row-major flattened `[h, w]` map this means a is the row and b the column when h == w.)

    Raises:
      ValueError: embed_dim not divisible by 4.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    pos_dim = embed_dim // 4
    omega = np.arange(pos_dim, dtype=np.float32) / np.float32(pos_dim)
    omega = (np.float32(1.0) / (np.float32(temperature) ** omega)).astype(np.float32)
    grid_w, grid_h = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32), indexing="ij")
    out_w = grid_w.reshape(-1, 1) * omega[None]
    out_h = grid_h.reshape(-1, 1) * omega[None]
    emb = np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)], axis=1)
    return emb[None].astype(np.float32)


class _InProj(nn.Module):
    """The fused q/k/v input projection of torch `nn.MultiheadAttention`.

    One `kernel` `[E, 3E]` (= torch `in_proj_weight.T`, columns q|k|v) and `bias` `[3E]` (`in_proj_bias`),
    kept fused so the torch key maps 1:1 (`...self_attn.in_proj.weight` <-> `...self_attn.in_proj_weight`,
    renamed in research/rtdetr/bridge.py). Applied to three different inputs, one third each.
    """

    embed_dim: int
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query, key, value):
        e = self.embed_dim
        # torch: xavier_uniform_ on the (3E, E) in_proj_weight, zero bias
        kernel = self.param("kernel", nn.initializers.xavier_uniform(), (e, 3 * e), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (3 * e,), self.param_dtype)
        dtype = self.dtype or query.dtype
        kernel, bias = kernel.astype(dtype), bias.astype(dtype)
        return tuple(jnp.dot(x.astype(dtype), kernel[:, i * e:(i + 1) * e]) + bias[i * e:(i + 1) * e]
                     for i, x in enumerate((query, key, value)))


class MultiheadAttention(nn.Module):
    """torch `nn.MultiheadAttention(embed_dim, num_heads, dropout, batch_first=True)`.

    Variables: `in_proj/{kernel, bias}` (fused q|k|v, see `_InProj`), `out_proj/{kernel, bias}`.

    Call: `query [B, Lq, E]`, `key [B, Lk, E]`, `value [B, Lk, E]`, `attn_mask` bool `[Lq, Lk]`
    (or `[B, Lq, Lk]`) with True where attention is NOT allowed (torch's boolean attn_mask
    convention, as the official denoising group builds it) -> `[B, Lq, E]`.
    Dropout (on the attention weights, as torch) is active only when `deterministic` is False.
    """

    embed_dim: int
    num_heads: int
    dropout: float = 0.0
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query, key, value, attn_mask=None, deterministic: bool = True):
        e, nh = self.embed_dim, self.num_heads
        if e % nh:
            raise ValueError(f"embed_dim {e} must be divisible by num_heads {nh}")
        hd = e // nh
        q, k, v = _InProj(e, dtype=self.dtype, param_dtype=self.param_dtype, name="in_proj")(query, key, value)
        b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        q = q.reshape(b, lq, nh, hd) * jnp.asarray(1.0 / math.sqrt(hd), q.dtype)
        k = k.reshape(b, lk, nh, hd)
        v = v.reshape(b, lk, nh, hd)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.ndim == 2 else attn_mask[:, None]
            logits = jnp.where(mask, jnp.asarray(-jnp.inf, logits.dtype), logits)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        if self.dropout > 0.0 and not deterministic:
            weights = nn.Dropout(self.dropout)(weights, deterministic=False)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, lq, e)
        # torch: out_proj weight keeps the default Linear init, its bias is zeroed
        return dense(e, "out_proj", dtype=self.dtype, param_dtype=self.param_dtype,
                     bias_init=nn.initializers.zeros)(out)


class TransformerEncoderLayer(nn.Module):
    """Official `TransformerEncoderLayer` (hybrid_encoder.py): self-attention with the position
    embedding added to queries and keys (not values), then a 2-layer FFN; post-norm unless
    `normalize_before`. Call: `src [B, L, C]`, `pos_embed [1 or B, L, C]` -> `[B, L, C]`."""

    d_model: int
    nhead: int
    dim_feedforward: int = 2048
    dropout: float = 0.1
    act: str = "relu"
    normalize_before: bool = False
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, src, src_mask=None, pos_embed=None, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = lambda x: nn.Dropout(self.dropout)(x, deterministic=not train) if self.dropout > 0 else x
        norm1, norm2 = layer_norm("norm1", **kw), layer_norm("norm2", **kw)
        residual = src
        if self.normalize_before:
            src = norm1(src)
        q = k = src if pos_embed is None else src + pos_embed.astype(src.dtype)
        src = MultiheadAttention(self.d_model, self.nhead, self.dropout, name="self_attn", **kw)(
            q, k, src, attn_mask=src_mask, deterministic=not train)
        src = residual + drop(src)
        if not self.normalize_before:
            src = norm1(src)
        residual = src
        if self.normalize_before:
            src = norm2(src)
        src = dense(self.dim_feedforward, "linear1", fan_in=self.d_model, **kw)(src)
        src = drop(activation(self.act)(src))
        src = dense(self.d_model, "linear2", fan_in=self.dim_feedforward, **kw)(src)
        src = residual + drop(src)
        if not self.normalize_before:
            src = norm2(src)
        return src


class TransformerEncoder(nn.Module):
    """`num_layers` TransformerEncoderLayers named `layers.<i>` (official `TransformerEncoder`, no final norm)."""

    num_layers: int
    d_model: int
    nhead: int
    dim_feedforward: int = 2048
    dropout: float = 0.1
    act: str = "relu"
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, src, src_mask=None, pos_embed=None, train: bool = False):
        for i in range(self.num_layers):
            src = TransformerEncoderLayer(self.d_model, self.nhead, self.dim_feedforward, self.dropout, self.act,
                                          dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers.{i}")(
                src, src_mask=src_mask, pos_embed=pos_embed, train=train)
        return src


class RepVggBlock(nn.Module):
    """Official `RepVggBlock`: act(ConvNorm3x3(x) + ConvNorm1x1(x)); submodules `conv1`, `conv2`.

    x: [B, H, W, C] -> [B, H, W, features]. In training (and at initialisation) the two branches run as written. In
    inference with `deploy` (the default) they run as the official deploy form (`convert_to_deploy` /
    `get_equivalent_kernel_bias`): each BatchNorm folded into its convolution with the running statistics, the 1x1
    kernel added to the centre tap of the 3x3, one 3x3 convolution with bias, computed from the same variables inside
    the call (so checkpoints and the bridge are unchanged). Equal to the two-branch form to float rounding
    (tests/rtdetr/test_rtdetr_model.py); one convolution and one pass over the activations less per block, in JAX
    inference and in the exported ONNX graph, as in the official `tools/export_onnx.py` graph.
    """

    features: int
    act: str = "relu"
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    deploy: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.deploy and not train and not self.is_initializing():
            kernel, bias = self.deploy_kernel_bias()
            conv = self.conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=True, dtype=self.dtype,
                             param_dtype=jnp.float32, parent=None)
            return activation(self.act)(conv.apply({"params": {"kernel": kernel, "bias": bias}}, x))
        kw = dict(conv=self.conv, norm=self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
        y = ConvNormLayer(self.features, 3, 1, padding=1, name="conv1", **kw)(x, train)
        y = y + ConvNormLayer(self.features, 1, 1, padding=0, name="conv2", **kw)(x, train)
        return activation(self.act)(y)

    def deploy_kernel_bias(self) -> tuple[jax.Array, jax.Array]:
        """The deploy form's (kernel [3, 3, Cin, features], bias [features]), float32, from this block's variables
        (official `RepVggBlock.get_equivalent_kernel_bias`); BatchNorm epsilon `BN_EPS` as the encoder's norms."""
        params, stats = self.variables["params"], self.variables["batch_stats"]

        def fold(name):
            bn, st = params[name]["norm"], stats[name]["norm"]
            a = bn["scale"].astype(jnp.float32) * jax.lax.rsqrt(st["var"].astype(jnp.float32) + BN_EPS)
            return (params[name]["conv"]["kernel"].astype(jnp.float32) * a,
                    bn["bias"].astype(jnp.float32) - st["mean"].astype(jnp.float32) * a)

        k3, b3 = fold("conv1")
        k1, b1 = fold("conv2")
        return k3.at[1, 1].add(k1[0, 0]), b3 + b1


class CSPRepLayer(nn.Module):
    """Official `CSPRepLayer`: conv3(bottlenecks(conv1(x)) + conv2(x)), hidden width int(out * expansion);
    conv3 is the identity when hidden == out. Bottlenecks named `bottlenecks.<i>`."""

    features: int
    num_blocks: int = 3
    expansion: float = 1.0
    use_bias: bool = False
    act: str = "silu"
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        hidden = int(self.features * self.expansion)
        kw = dict(conv=self.conv, norm=self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
        x1 = ConvNormLayer(hidden, 1, 1, use_bias=self.use_bias, act=self.act, name="conv1", **kw)(x, train)
        for i in range(self.num_blocks):
            x1 = RepVggBlock(hidden, act=self.act, name=f"bottlenecks.{i}", **kw)(x1, train)
        x2 = ConvNormLayer(hidden, 1, 1, use_bias=self.use_bias, act=self.act, name="conv2", **kw)(x, train)
        y = x1 + x2
        if hidden != self.features:
            y = ConvNormLayer(self.features, 1, 1, use_bias=self.use_bias, act=self.act, name="conv3", **kw)(y, train)
        return y


class _ConvBN(nn.Module):
    """Official `Sequential(Conv2d(c, hidden, 1, bias=False), BatchNorm2d(hidden))`: submodules `0`, `1`."""

    features: int
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.conv(self.features, (1, 1), use_bias=False, kernel_init=torch_default_kernel_init(),
                      bias_init=torch_default_bias_init(x.shape[-1]), dtype=self.dtype,
                      param_dtype=self.param_dtype, name="0")(x)
        return self.norm(dtype=self.dtype, param_dtype=self.param_dtype, name="1")(x, use_running_average=not train)


class HybridEncoder(nn.Module):
    """RT-DETR hybrid encoder: AIFI on the deepest level(s), then CCFM (FPN + PAN).

    Official `HybridEncoder` (src/zoo/rtdetr/hybrid_encoder.py); the attribute defaults are the
    official class defaults (the R50 config).

    Attributes:
      in_channels: channels of the backbone maps, shallow to deep.
      feat_strides: their strides (used only for the eval-size position embedding).
      hidden_dim: width of every output map.
      use_encoder_idx / num_encoder_layers: levels that get the transformer encoder and its depth.
      expansion / depth_mult: CSPRepLayer width factor and RepVGG block count factor (round(3 * depth_mult)).
      act: CCFM activation; enc_act: the transformer FFN activation.
      eval_spatial_size: (H, W) of the eval input. Official: in eval mode the position embedding is the one
        precomputed for this size (a map of another size fails); in train mode, or when None, it is computed
        from the map's shape. Here the same, with a ValueError on a mismatch.

    Call: list of `[B, H_i, W_i, in_channels[i]]` -> list of `[B, H_i, W_i, hidden_dim]` (same strides).

    Raises:
      ValueError: wrong number of maps, or (eval) a map whose size differs from eval_spatial_size's.
    """

    in_channels: Sequence[int] = (512, 1024, 2048)
    feat_strides: Sequence[int] = (8, 16, 32)
    hidden_dim: int = 256
    nhead: int = 8
    dim_feedforward: int = 1024
    dropout: float = 0.0
    enc_act: str = "gelu"
    use_encoder_idx: Sequence[int] = (2,)
    num_encoder_layers: int = 1
    pe_temperature: float = 10000.0
    expansion: float = 1.0
    depth_mult: float = 1.0
    act: str = "silu"
    eval_spatial_size: Optional[Sequence[int]] = None
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    def position_embedding(self, level: int, h: int, w: int, train: bool) -> np.ndarray:
        """`[1, h*w, hidden_dim]` for an `[h, w]` map of `level`, train/eval as the official forward."""
        if train or self.eval_spatial_size is None:
            return sincos_position_embedding_2d(w, h, self.hidden_dim, self.pe_temperature)
        stride = self.feat_strides[level]
        eh, ew = self.eval_spatial_size[0] // stride, self.eval_spatial_size[1] // stride
        if (eh, ew) != (h, w):
            raise ValueError(f"HybridEncoder eval: level {level} map is {h}x{w} but eval_spatial_size "
                             f"{tuple(self.eval_spatial_size)} gives {eh}x{ew} (official code fails too); "
                             "set eval_spatial_size to the input size or None")
        return sincos_position_embedding_2d(ew, eh, self.hidden_dim, self.pe_temperature)

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], train: bool = False) -> list[jax.Array]:
        n = len(self.in_channels)
        if len(feats) != n:
            raise ValueError(f"HybridEncoder expects {n} feature maps, got {len(feats)}")
        kw = dict(conv=self.conv, norm=self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
        proj = [_ConvBN(self.hidden_dim, name=f"input_proj.{i}", **kw)(f, train) for i, f in enumerate(feats)]

        if self.num_encoder_layers > 0:
            for i, level in enumerate(self.use_encoder_idx):
                b, h, w, c = proj[level].shape
                pos = jnp.asarray(self.position_embedding(level, h, w, train))
                memory = TransformerEncoder(self.num_encoder_layers, self.hidden_dim, self.nhead,
                                            self.dim_feedforward, self.dropout, self.enc_act, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=f"encoder.{i}")(
                    proj[level].reshape(b, h * w, c), pos_embed=pos, train=train)
                proj[level] = memory.reshape(b, h, w, c)

        num_blocks = round(3 * self.depth_mult)
        csp = dict(num_blocks=num_blocks, expansion=self.expansion, act=self.act, **kw)
        # top-down: the lateral conv output replaces the higher map in inner_outs (official order)
        inner_outs = [proj[-1]]
        for idx in range(n - 1, 0, -1):
            j = n - 1 - idx
            feat_high = ConvNormLayer(self.hidden_dim, 1, 1, act=self.act, name=f"lateral_convs.{j}", **kw)(
                inner_outs[0], train)
            inner_outs[0] = feat_high
            fused = jnp.concatenate([upsample_nearest(feat_high, 2), proj[idx - 1]], axis=-1)
            inner_outs.insert(0, CSPRepLayer(self.hidden_dim, name=f"fpn_blocks.{j}", **csp)(fused, train))
        # bottom-up
        outs = [inner_outs[0]]
        for idx in range(n - 1):
            down = ConvNormLayer(self.hidden_dim, 3, 2, act=self.act, name=f"downsample_convs.{idx}", **kw)(
                outs[-1], train)
            fused = jnp.concatenate([down, inner_outs[idx + 1]], axis=-1)
            outs.append(CSPRepLayer(self.hidden_dim, name=f"pan_blocks.{idx}", **csp)(fused, train))
        return outs
