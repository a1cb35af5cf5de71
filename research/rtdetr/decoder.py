"""RT-DETR transformer decoder (`RTDETRTransformer`) in flax.linen.

Follows the official `rtdetr_pytorch/src/zoo/rtdetr/rtdetr_decoder.py` (`RTDETRTransformer`,
`TransformerDecoder`, `TransformerDecoderLayer`, `MSDeformableAttention`, `MLP`) and
`src/zoo/rtdetr/utils.py` (`deformable_attention_core_func`, `inverse_sigmoid`) of lyuwenyu/RT-DETR:

  1. input projection of each encoder map (1x1 conv + BatchNorm; extra 3x3 stride-2 levels when
     `num_levels` exceeds the maps), flattened and concatenated: the memory `[B, sum(H*W), C]`;
  2. anchors in logit space per memory position (+inf where the box is not inside (eps, 1-eps)),
     memory zeroed at those positions, encoder head (Linear + LayerNorm, class scores, box MLP + anchor);
  3. query selection: the `num_queries` positions with the highest max class logit give the decoder's
     initial content (their encoder features, detached) and reference boxes (detached);
  4. decoder layers: self-attention (with the optional denoising attention mask), multi-scale
     deformable cross-attention around each reference box, FFN; after each layer a box head refines the
     reference (iterative refinement in logit space) and a class head scores it.

Denoising (training): the caller (the criterion side, official `get_contrastive_denoising_training_group`)
builds the noised queries and passes `dn_class` (class ids, embedded here with `denoising_class_embed`, or
ready embeddings), `dn_bbox_unact` (boxes in logit space) and `dn_attn_mask`. They are prepended to the
matching queries as in the official code and their outputs are returned separately (`dn_outputs`).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.rtdetr.backbone import BatchNorm, activation, constant_init, dense, torch_default_kernel_init
from research.rtdetr.encoder import MultiheadAttention, layer_norm

ModuleDef = Any
Dtype = Any


def bias_init_with_prob(prior_prob: float = 0.01) -> float:
    """Logit of a prior probability: the official class-head bias init (-4.595 for 0.01)."""
    return float(-math.log((1 - prior_prob) / prior_prob))


def inverse_sigmoid(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Official `inverse_sigmoid`: log(x / (1 - x)) with x clipped to [0, 1] and both terms to >= eps."""
    x = jnp.clip(x, 0.0, 1.0)
    return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1 - x, eps))


def generate_anchors(spatial_shapes: Sequence[tuple[int, int]], grid_size: float = 0.05,
                     eps: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """Encoder anchors in logit space (official `RTDETRTransformer._generate_anchors`), float32 numpy.

    Each position of level l gets the box (cx, cy, w, h) = ((x + 0.5) / W, (y + 0.5) / H,
    grid_size * 2**l, grid_size * 2**l), normalised; it is valid when all four lie in (eps, 1 - eps).

    Returns:
      anchors `[1, sum(H*W), 4]` = log(a / (1 - a)), +inf where invalid; valid_mask `[1, sum(H*W), 1]` bool.
    """
    anchors = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        grid_y, grid_x = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
        grid_xy = np.stack([grid_x, grid_y], -1)
        grid_xy = (grid_xy + np.float32(0.5)) / np.array([w, h], np.float32)
        wh = np.ones_like(grid_xy) * np.float32(grid_size) * np.float32(2.0 ** lvl)
        anchors.append(np.concatenate([grid_xy, wh], -1).reshape(1, h * w, 4))
    a = np.concatenate(anchors, 1).astype(np.float32)
    valid = np.all((a > eps) & (a < 1 - eps), axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        logit = np.log(a / (np.float32(1) - a)).astype(np.float32)
    return np.where(valid, logit, np.float32(np.inf)).astype(np.float32), valid


def deformable_attention_core(value: jax.Array, spatial_shapes: Sequence[tuple[int, int]],
                              sampling_locations: jax.Array, attention_weights: jax.Array) -> jax.Array:
    """Multi-scale deformable attention sampling (official `deformable_attention_core_func`).

    Bilinear sampling with exactly the semantics of `F.grid_sample(mode='bilinear', padding_mode='zeros',
    align_corners=False)` on each level: a location u in [0, 1] is the pixel coordinate u * W - 0.5, and
    each of the 4 neighbours outside the map contributes zero. Written as one gather over the flattened
    multi-level value, with the bilinear and attention weights folded into the sum.

    Args:
      value: `[B, sum(H*W), n_heads, head_dim]`, levels concatenated in `spatial_shapes` order, row-major.
      spatial_shapes: `[(H, W)]` per level (static).
      sampling_locations: `[B, Lq, n_heads, n_levels, n_points, 2]`, (x, y) normalised to [0, 1]
        (any value; outside gives zero).
      attention_weights: `[B, Lq, n_heads, n_levels, n_points]`.

    Returns:
      `[B, Lq, n_heads * head_dim]`.
    """
    b, lv, nh, hd = value.shape
    _, lq, _, nl, npt, _ = sampling_locations.shape
    if nl != len(spatial_shapes) or lv != sum(h * w for h, w in spatial_shapes):
        raise ValueError(f"deformable attention: {nl} levels / value length {lv} do not fit spatial shapes "
                         f"{list(spatial_shapes)}")
    # positions and bilinear weights in float32 whatever the compute dtype (bfloat16 would put a point up to
    # ~0.3 px off on an 80 px map); only the sampled values and the weighted sum use value.dtype
    dtype = jnp.promote_types(sampling_locations.dtype, jnp.float32)
    hs = jnp.asarray([h for h, _ in spatial_shapes], dtype).reshape(nl, 1)
    ws = jnp.asarray([w for _, w in spatial_shapes], dtype).reshape(nl, 1)
    starts = jnp.asarray(np.cumsum([0] + [h * w for h, w in spatial_shapes])[:-1], jnp.int32).reshape(nl, 1)
    grid = 2 * sampling_locations.astype(dtype) - 1
    # grid_sample's unnormalisation for align_corners=False: ((g + 1) * size - 1) / 2
    ix = ((grid[..., 0] + 1) * ws - 1) / 2  # [B, Lq, nh, L, P]
    iy = ((grid[..., 1] + 1) * hs - 1) / 2
    # far-away points are out of the map either way; clipping keeps the int conversion defined
    ix = jnp.clip(ix, -2.0, ws + 1)
    iy = jnp.clip(iy, -2.0, hs + 1)
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    x1, y1 = x0 + 1, y0 + 1
    corners = ((x0, y0, (x1 - ix) * (y1 - iy)), (x1, y0, (ix - x0) * (y1 - iy)),
               (x0, y1, (x1 - ix) * (iy - y0)), (x1, y1, (ix - x0) * (iy - y0)))
    idx, wts = [], []
    for cx, cy, cw in corners:
        inside = (cx >= 0) & (cx <= ws - 1) & (cy >= 0) & (cy <= hs - 1)
        xi = jnp.clip(cx, 0, ws - 1).astype(jnp.int32)
        yi = jnp.clip(cy, 0, hs - 1).astype(jnp.int32)
        idx.append(starts + yi * ws.astype(jnp.int32) + xi)
        wts.append(jnp.where(inside, cw, jnp.zeros((), dtype)) * attention_weights.astype(dtype))
    idx = jnp.stack(idx, -1)  # [B, Lq, nh, L, P, 4]
    wts = jnp.stack(wts, -1)
    k = nl * npt * 4
    idx = idx.transpose(0, 2, 1, 3, 4, 5).reshape(b, nh, lq * k)
    wts = wts.transpose(0, 2, 1, 3, 4, 5).reshape(b, nh, lq, k).astype(value.dtype)
    v = value.transpose(0, 2, 1, 3)  # [B, nh, Lv, hd]
    # indices are in range by construction: no negative-index wrapping (two passes over the indices, in XLA
    # and in the exported graph)
    sampled = jnp.take_along_axis(v, idx[..., None], axis=2, mode="clip", wrap_negative_indices=False).reshape(
        b, nh, lq, k, hd)
    out = jnp.einsum("bhqk,bhqkd->bqhd", wts, sampled)
    return out.reshape(b, lq, nh * hd)


def _sampling_offset_bias_init(num_heads: int, num_levels: int, num_points: int):
    """Official MSDeformableAttention init: head h points along angle 2*pi*h/n_heads, point p at distance p+1."""

    def init(key, shape, dtype=jnp.float32):
        del key
        thetas = np.arange(num_heads, dtype=np.float32) * np.float32(2.0 * math.pi / num_heads)
        g = np.stack([np.cos(thetas), np.sin(thetas)], -1)
        g = g / np.abs(g).max(-1, keepdims=True)
        g = np.tile(g.reshape(num_heads, 1, 1, 2), (1, num_levels, num_points, 1))
        g = g * np.arange(1, num_points + 1, dtype=np.float32).reshape(1, 1, -1, 1)
        return jnp.asarray(g.reshape(shape), dtype)

    return init


class MSDeformableAttention(nn.Module):
    """Multi-scale deformable attention (official `MSDeformableAttention`).

    Variables: `sampling_offsets`, `attention_weights`, `value_proj`, `output_proj` (Dense).

    Call:
      query `[B, Lq, C]`; reference_points `[B, Lq, 1 or n_levels, 2 or 4]` normalised ((x, y) or
      (cx, cy, w, h); with boxes the offsets are scaled by w/h * 0.5 / n_points); value `[B, Lv, C]`;
      spatial_shapes `[(H, W)]` static; value_mask `[B, Lv]` (True = keep) -> `[B, Lq, C]`.

    Raises:
      ValueError: reference_points whose last dim is not 2 or 4.
    """

    embed_dim: int = 256
    num_heads: int = 8
    num_levels: int = 4
    num_points: int = 4
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query, reference_points, value, spatial_shapes, value_mask=None):
        nh, nl, npt, c = self.num_heads, self.num_levels, self.num_points, self.embed_dim
        b, lq = query.shape[:2]
        lv = value.shape[1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        zeros = nn.initializers.zeros
        xavier = nn.initializers.xavier_uniform()
        value = dense(c, "value_proj", kernel_init=xavier, bias_init=zeros, **kw)(value)
        if value_mask is not None:
            value = value * value_mask.astype(value.dtype)[..., None]
        value = value.reshape(b, lv, nh, c // nh)
        offsets = dense(nh * nl * npt * 2, "sampling_offsets", kernel_init=zeros,
                        bias_init=_sampling_offset_bias_init(nh, nl, npt), **kw)(query)
        offsets = offsets.reshape(b, lq, nh, nl, npt, 2)
        attn = dense(nh * nl * npt, "attention_weights", kernel_init=zeros, bias_init=zeros, **kw)(query)
        attn = jax.nn.softmax(attn.reshape(b, lq, nh, nl * npt), axis=-1).reshape(b, lq, nh, nl, npt)
        # sampling positions in float32 (see deformable_attention_core)
        ref = reference_points.astype(jnp.promote_types(reference_points.dtype, jnp.float32))
        offsets = offsets.astype(ref.dtype)
        if ref.shape[-1] == 2:
            normalizer = jnp.asarray([[w, h] for h, w in spatial_shapes], offsets.dtype).reshape(1, 1, 1, nl, 1, 2)
            loc = ref[:, :, None, :, None, :] + offsets / normalizer
        elif ref.shape[-1] == 4:
            loc = ref[:, :, None, :, None, :2] + offsets / npt * ref[:, :, None, :, None, 2:] * 0.5
        else:
            raise ValueError(f"last dim of reference_points must be 2 or 4, got {ref.shape[-1]}")
        out = deformable_attention_core(value, spatial_shapes, loc, attn)
        return dense(c, "output_proj", kernel_init=xavier, bias_init=zeros, **kw)(out)


class MLP(nn.Module):
    """Official `MLP`: `num_layers` Linear layers named `layers.<i>`, activation between them."""

    hidden_dim: int
    output_dim: int
    num_layers: int
    act: Optional[str] = "relu"
    kernel_inits: Optional[Sequence[Any]] = None  # per layer; None = torch default
    last_zero: bool = False  # official heads zero the last layer's weight and bias
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dims = [self.hidden_dim] * (self.num_layers - 1) + [self.output_dim]
        for i, d in enumerate(dims):
            last = i == self.num_layers - 1
            kinit = self.kernel_inits[i] if self.kernel_inits else None
            binit = None
            if last and self.last_zero:
                kinit, binit = nn.initializers.zeros, nn.initializers.zeros
            x = dense(d, f"layers.{i}", kernel_init=kinit, bias_init=binit, fan_in=x.shape[-1], dtype=self.dtype,
                      param_dtype=self.param_dtype)(x)
            if not last:
                x = activation(self.act)(x)
        return x


class TransformerDecoderLayer(nn.Module):
    """Official `TransformerDecoderLayer`: post-norm self-attention, deformable cross-attention, FFN.

    Call: tgt `[B, Q, C]`, reference_points `[B, Q, 1, 4]` (sigmoid space), memory `[B, Lv, C]`,
    spatial_shapes, attn_mask bool `[Q, Q]` (True = blocked), memory_mask `[B, Lv]`, query_pos_embed `[B, Q, C]`.
    """

    d_model: int = 256
    n_head: int = 8
    dim_feedforward: int = 1024
    dropout: float = 0.0
    act: str = "relu"
    n_levels: int = 4
    n_points: int = 4
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tgt, reference_points, memory, spatial_shapes, attn_mask=None, memory_mask=None,
                 query_pos_embed=None, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = lambda x: nn.Dropout(self.dropout)(x, deterministic=not train) if self.dropout > 0 else x
        with_pos = lambda t: t if query_pos_embed is None else t + query_pos_embed
        q = k = with_pos(tgt)
        tgt2 = MultiheadAttention(self.d_model, self.n_head, self.dropout, name="self_attn", **kw)(
            q, k, tgt, attn_mask=attn_mask, deterministic=not train)
        tgt = layer_norm("norm1", **kw)(tgt + drop(tgt2))
        tgt2 = MSDeformableAttention(self.d_model, self.n_head, self.n_levels, self.n_points, name="cross_attn", **kw)(
            with_pos(tgt), reference_points, memory, spatial_shapes, memory_mask)
        tgt = layer_norm("norm2", **kw)(tgt + drop(tgt2))
        tgt2 = dense(self.dim_feedforward, "linear1", fan_in=self.d_model, **kw)(tgt)
        tgt2 = dense(self.d_model, "linear2", fan_in=self.dim_feedforward, **kw)(drop(activation(self.act)(tgt2)))
        tgt = tgt + drop(tgt2)
        # the official clamp to the float16 range (for mixed precision) before the last norm
        return layer_norm("norm3", **kw)(jnp.clip(tgt, -65504, 65504))


class TransformerDecoder(nn.Module):
    """Official `TransformerDecoder`: the layer stack (`layers.<i>`) with iterative box refinement.

    The heads belong to the parent (official: passed into forward) and are passed in as module lists.
    Train mode returns every layer's outputs; eval mode stops after `eval_idx` and returns that layer only.
    Boxes: layer i's box is sigmoid(bbox_head[i](out) + inverse_sigmoid(ref)), where ref is the previous
    layer's box. Train: the next layer samples around the detached box; the box outputs of layers > 0 use
    the undetached previous box (official gradient path; same values).

    Returns:
      (boxes `[n_out, B, Q, 4]` cxcywh in [0, 1], logits `[n_out, B, Q, num_classes]`).
    """

    num_layers: int
    eval_idx: int = -1
    d_model: int = 256
    n_head: int = 8
    dim_feedforward: int = 1024
    dropout: float = 0.0
    act: str = "relu"
    n_levels: int = 4
    n_points: int = 4
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tgt, ref_points_unact, memory, spatial_shapes, bbox_head, score_head, query_pos_head,
                 attn_mask=None, memory_mask=None, train: bool = False):
        eval_idx = self.eval_idx if self.eval_idx >= 0 else self.num_layers + self.eval_idx
        output = tgt
        boxes, logits = [], []
        # boxes stay float32 whatever the compute dtype (iterative refinement in logit space)
        ref_points_detach = jax.nn.sigmoid(ref_points_unact.astype(jnp.promote_types(ref_points_unact.dtype,
                                                                                   jnp.float32)))
        ref_points = ref_points_detach
        for i in range(self.num_layers):
            query_pos_embed = query_pos_head(ref_points_detach)
            output = TransformerDecoderLayer(self.d_model, self.n_head, self.dim_feedforward, self.dropout, self.act,
                                             self.n_levels, self.n_points, dtype=self.dtype,
                                             param_dtype=self.param_dtype, name=f"layers.{i}")(
                output, ref_points_detach[:, :, None], memory, spatial_shapes, attn_mask, memory_mask,
                query_pos_embed, train=train)
            delta = bbox_head[i](output).astype(ref_points_detach.dtype)
            inter_ref_bbox = jax.nn.sigmoid(delta + inverse_sigmoid(ref_points_detach))
            if train:
                logits.append(score_head[i](output))
                boxes.append(inter_ref_bbox if i == 0 else jax.nn.sigmoid(delta + inverse_sigmoid(ref_points)))
            elif i == eval_idx:
                logits.append(score_head[i](output))
                boxes.append(inter_ref_bbox)
                if not self.is_initializing():
                    break
            elif self.is_initializing():  # eval-mode init still creates every head's parameters
                score_head[i](output)
            ref_points = inter_ref_bbox
            ref_points_detach = jax.lax.stop_gradient(inter_ref_bbox) if train else inter_ref_bbox
        return jnp.stack(boxes), jnp.stack(logits)


class _InputProj(nn.Module):
    """Official `Sequential(OrderedDict(conv=Conv2d(..., bias=False), norm=BatchNorm2d))`."""

    features: int
    kernel_size: int = 1
    stride: int = 1
    padding: int = 0
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        k, p = self.kernel_size, self.padding
        x = self.conv(self.features, (k, k), strides=(self.stride, self.stride), padding=((p, p), (p, p)),
                      use_bias=False, kernel_init=torch_default_kernel_init(), dtype=self.dtype,
                      param_dtype=self.param_dtype, name="conv")(x)
        return self.norm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x, use_running_average=not train)


def _embedding_init(padding_idx: Optional[int]):
    """torch nn.Embedding init: N(0, 1), the padding row zero."""

    def init(key, shape, dtype=jnp.float32):
        w = jax.random.normal(key, shape, dtype)
        return w if padding_idx is None else w.at[padding_idx].set(0)

    return init


def _gather_rows(x, idx):
    """x `[B, N, D]`, idx `[B, K]` -> `[B, K, D]`."""
    return jnp.take_along_axis(x, idx[..., None], axis=1)


class RTDETRTransformer(nn.Module):
    """RT-DETR decoder with query selection (official `RTDETRTransformer`; defaults = official class defaults).

    Attributes (official names): num_classes, hidden_dim, num_queries, feat_channels / feat_strides (of the
    encoder maps), num_levels (>= number of maps; extra levels are made by stride-2 convolutions),
    num_decoder_points, nhead, num_decoder_layers, dim_feedforward, dropout, activation, num_denoising (> 0
    creates `denoising_class_embed`, num_classes + 1 rows, the last one the padding class), learnt_init_query,
    eval_spatial_size ((H, W): in eval mode the anchors are those precomputed for this input size, as the
    official code; in train mode, or when None, they are computed from the map shapes), eval_idx (the layer
    whose outputs eval mode returns; later layers are not run), eps (anchor validity margin), aux_loss.

    Call:
      feats: list of `[B, H_i, W_i, feat_channels[i]]` (the encoder outputs).
      train: BatchNorm batch statistics, dropout, all decoder layers, auxiliary outputs.
      dn_class: optional (train only) denoising queries' classes: int `[B, N_dn]` class ids (num_classes =
        padding), embedded with `denoising_class_embed`, or float `[B, N_dn, hidden_dim]` embeddings.
      dn_bbox_unact: `[B, N_dn, 4]` their boxes in logit space (inverse_sigmoid of cxcywh).
      dn_attn_mask: bool `[N_dn + num_queries, N_dn + num_queries]`, True where attention is NOT allowed
        (the official mask: matching queries do not see the denoising ones, denoising groups do not see
        each other).

    Returns a dict:
      pred_logits `[B, Q, num_classes]`, pred_boxes `[B, Q, 4]` (cxcywh, normalised to [0, 1]): the last
        layer in train mode, layer `eval_idx` in eval mode, matching queries only (boxes and every box computation
        are float32 whatever `dtype`; logits come in `dtype`);
      enc_outputs: {pred_logits, pred_boxes} of the encoder's top-k selection `[B, Q, ...]`;
      aux_outputs (train, aux_loss): list of {pred_logits, pred_boxes} of decoder layers 0..L-2, in order.
        The official code appends the encoder top-k as one more aux entry (loss suffix `_aux_{L-1}`); here it
        is `enc_outputs`, so a criterion that follows the official numbering uses `aux_outputs + [enc_outputs]`;
      dn_outputs (train, when dn inputs are given): list over all L decoder layers of {pred_logits, pred_boxes}
        `[B, N_dn, ...]` (the official `dn_aux_outputs`).
    Intermediates are sown into the `intermediates` collection (apply with `mutable=['intermediates']`):
    decoder_memory, enc_logits, enc_coord_unact, enc_anchors, enc_valid_mask (pre-top-k), enc_topk_ind,
    dec_init_ref_unact.

    Raises:
      ValueError: dn inputs in eval mode or incomplete, too many maps, or (eval) maps whose sizes differ from
        eval_spatial_size's.
    """

    num_classes: int = 80
    hidden_dim: int = 256
    num_queries: int = 300
    feat_channels: Sequence[int] = (512, 1024, 2048)
    feat_strides: Sequence[int] = (8, 16, 32)
    num_levels: int = 3
    num_decoder_points: int = 4
    nhead: int = 8
    num_decoder_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.0
    activation: str = "relu"
    num_denoising: int = 100
    learnt_init_query: bool = False
    eval_spatial_size: Optional[Sequence[int]] = None
    eval_idx: int = -1
    eps: float = 1e-2
    aux_loss: bool = True
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @property
    def strides(self) -> tuple[int, ...]:
        s = list(self.feat_strides)
        while len(s) < self.num_levels:  # official: appends feat_strides[-1] * 2 per extra level
            s.append(s[-1] * 2)
        return tuple(s)

    def anchors(self, spatial_shapes: Sequence[tuple[int, int]], train: bool) -> tuple[np.ndarray, np.ndarray]:
        """Anchors and valid mask for the memory layout, train/eval as the official `_get_decoder_input`."""
        if train or self.eval_spatial_size is None:
            return generate_anchors(spatial_shapes, eps=self.eps)
        eh, ew = self.eval_spatial_size
        eval_shapes = [(int(eh / s), int(ew / s)) for s in self.strides]
        if list(eval_shapes) != [tuple(s) for s in spatial_shapes]:
            raise ValueError(f"RTDETRTransformer eval: map sizes {list(spatial_shapes)} differ from those of "
                             f"eval_spatial_size {tuple(self.eval_spatial_size)}: {eval_shapes} (official code fails "
                             "too); set eval_spatial_size to the input size or None")
        return generate_anchors(eval_shapes, eps=self.eps)

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], train: bool = False, dn_class: Optional[jax.Array] = None,
                 dn_bbox_unact: Optional[jax.Array] = None, dn_attn_mask: Optional[jax.Array] = None) -> dict:
        c = self.hidden_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ckw = dict(conv=self.conv, norm=self.norm, **kw)
        if len(feats) > self.num_levels:
            raise ValueError(f"{len(feats)} feature maps but num_levels {self.num_levels}")
        use_dn = dn_class is not None or dn_bbox_unact is not None or dn_attn_mask is not None
        if use_dn and not train:
            raise ValueError("denoising queries are a training-mode input (official: self.training only)")
        if use_dn and (dn_class is None or dn_bbox_unact is None or dn_attn_mask is None):
            raise ValueError("give dn_class, dn_bbox_unact and dn_attn_mask together")

        # 1. input projection (official _get_encoder_input)
        proj = [_InputProj(c, name=f"input_proj.{i}", **ckw)(f, train) for i, f in enumerate(feats)]
        for i in range(len(feats), self.num_levels):
            src = feats[-1] if i == len(feats) else proj[-1]
            proj.append(_InputProj(c, 3, 2, 1, name=f"input_proj.{i}", **ckw)(src, train))
        spatial_shapes = tuple((p.shape[1], p.shape[2]) for p in proj)
        b = proj[0].shape[0]
        memory = jnp.concatenate([p.reshape(b, -1, c) for p in proj], axis=1)
        self.sow("intermediates", "decoder_memory", memory)

        # denoising embedding table (created whenever num_denoising > 0, as the official module)
        dn_embed = None
        if self.num_denoising > 0:
            embed = nn.Embed(self.num_classes + 1, c, embedding_init=_embedding_init(self.num_classes),
                             name="denoising_class_embed", **kw)
            if dn_class is not None and jnp.issubdtype(dn_class.dtype, jnp.integer):
                dn_embed = embed(dn_class)
                # nn.Embedding(padding_idx=num_classes): the padding row gets no gradient
                dn_embed = jnp.where((dn_class == self.num_classes)[..., None], jax.lax.stop_gradient(dn_embed),
                                     dn_embed)
            elif self.is_initializing():
                embed(jnp.zeros((1,), jnp.int32))
        if dn_class is not None and dn_embed is None:
            if jnp.issubdtype(dn_class.dtype, jnp.integer):
                raise ValueError("integer dn_class needs num_denoising > 0 (the denoising_class_embed table)")
            dn_embed = dn_class

        # 2. encoder head on the anchors (official _get_decoder_input)
        anchors, valid_mask = self.anchors(spatial_shapes, train)
        self.sow("intermediates", "enc_anchors", jnp.asarray(anchors))
        self.sow("intermediates", "enc_valid_mask", jnp.asarray(valid_mask))
        memory_valid = jnp.asarray(valid_mask, memory.dtype) * memory
        output_memory = dense(c, "enc_output.0", kernel_init=nn.initializers.xavier_uniform(), fan_in=c, **kw)(
            memory_valid)
        output_memory = layer_norm("enc_output.1", **kw)(output_memory)
        prior = constant_init(bias_init_with_prob(0.01))
        enc_logits = dense(self.num_classes, "enc_score_head", bias_init=prior, **kw)(output_memory)
        box_dtype = jnp.promote_types(output_memory.dtype, jnp.float32)  # boxes in float32 (see TransformerDecoder)
        enc_coord_unact = MLP(c, 4, 3, last_zero=True, name="enc_bbox_head", **kw)(output_memory).astype(box_dtype) \
            + jnp.asarray(anchors, box_dtype)
        self.sow("intermediates", "enc_logits", enc_logits)
        self.sow("intermediates", "enc_coord_unact", enc_coord_unact)

        # 3. query selection
        _, topk_ind = jax.lax.top_k(enc_logits.max(-1), self.num_queries)
        self.sow("intermediates", "enc_topk_ind", topk_ind)
        ref_unact = _gather_rows(enc_coord_unact, topk_ind)
        enc_topk_bboxes = jax.nn.sigmoid(ref_unact)
        enc_topk_logits = _gather_rows(enc_logits, topk_ind)
        self.sow("intermediates", "dec_init_ref_unact", ref_unact)
        if self.learnt_init_query:
            tgt = nn.Embed(self.num_queries, c, embedding_init=nn.initializers.xavier_uniform(), name="tgt_embed",
                           **kw)(jnp.arange(self.num_queries))
            target = jnp.broadcast_to(tgt[None].astype(output_memory.dtype), (b, self.num_queries, c))
        else:
            target = jax.lax.stop_gradient(_gather_rows(output_memory, topk_ind))
        num_dn = 0
        if use_dn:
            num_dn = dn_bbox_unact.shape[1]
            expect = (num_dn + self.num_queries,) * 2
            if dn_embed.shape[:2] != (b, num_dn) or tuple(dn_attn_mask.shape[-2:]) != expect:
                raise ValueError(f"denoising inputs do not fit: dn_class {dn_class.shape}, dn_bbox_unact "
                                 f"{dn_bbox_unact.shape}, dn_attn_mask {dn_attn_mask.shape} (expected {expect})")
            ref_unact = jnp.concatenate([dn_bbox_unact.astype(ref_unact.dtype), ref_unact], axis=1)
            target = jnp.concatenate([dn_embed.astype(target.dtype), target], axis=1)
        init_ref_unact = jax.lax.stop_gradient(ref_unact)

        # 4. decoder
        xavier = nn.initializers.xavier_uniform()
        query_pos_head = MLP(2 * c, c, 2, kernel_inits=(xavier, xavier), name="query_pos_head", **kw)
        score_head = [dense(self.num_classes, f"dec_score_head.{i}", bias_init=prior, fan_in=c, **kw)
                      for i in range(self.num_decoder_layers)]
        bbox_head = [MLP(c, 4, 3, last_zero=True, name=f"dec_bbox_head.{i}", **kw)
                     for i in range(self.num_decoder_layers)]
        out_boxes, out_logits = TransformerDecoder(
            self.num_decoder_layers, self.eval_idx, c, self.nhead, self.dim_feedforward, self.dropout,
            self.activation, self.num_levels, self.num_decoder_points, name="decoder", **kw)(
            target, init_ref_unact, memory, spatial_shapes, bbox_head, score_head, query_pos_head,
            attn_mask=dn_attn_mask, train=train)

        out = {"pred_logits": out_logits[-1, :, num_dn:], "pred_boxes": out_boxes[-1, :, num_dn:],
               "enc_outputs": {"pred_logits": enc_topk_logits, "pred_boxes": enc_topk_bboxes}}
        if train and self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": out_logits[i, :, num_dn:], "pred_boxes": out_boxes[i, :, num_dn:]}
                                  for i in range(out_logits.shape[0] - 1)]
        if use_dn:
            out["dn_outputs"] = [{"pred_logits": out_logits[i, :, :num_dn], "pred_boxes": out_boxes[i, :, :num_dn]}
                                 for i in range(out_logits.shape[0])]
        return out
