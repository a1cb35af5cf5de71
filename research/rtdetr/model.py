"""RT-DETR (backbone -> HybridEncoder -> RTDETRTransformer) in flax.linen, and its official variants.

Follows the official `rtdetr_pytorch/src/zoo/rtdetr/rtdetr.py` (`RTDETR`) with the settings of
`configs/rtdetr/rtdetr_r{18,34,50,101}vd_6x_coco.yml` and `rtdetr_r50vd_m_6x_coco.yml` (each including
`include/rtdetr_r50vd.yml`; 80 classes from `configs/dataset/coco_detection.yml`). The official train-mode
random resize (`multi_scale`) is a data-pipeline step here, not part of the module.

Input `[B, H, W, 3]`, RGB in [0, 1] (the official transforms end with ToTensor, no mean/std normalisation).
Outputs: the decoder's dict (`research/rtdetr/decoder.py`: pred_logits, pred_boxes cxcywh normalised,
enc_outputs, aux_outputs, dn_outputs).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from research.rtdetr.backbone import PResNet
from research.rtdetr.decoder import RTDETRTransformer
from research.rtdetr.encoder import HybridEncoder

ModuleDef = Any

# Per variant: constructor arguments of the three parts, as the official configs resolve them.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "r18vd": dict(
        backbone=dict(depth=18, freeze_at=-1, freeze_norm=False),
        encoder=dict(in_channels=(128, 256, 512), hidden_dim=256, expansion=0.5),
        decoder=dict(feat_channels=(256, 256, 256), num_decoder_layers=3)),
    "r34vd": dict(
        backbone=dict(depth=34, freeze_at=-1, freeze_norm=False),
        encoder=dict(in_channels=(128, 256, 512), hidden_dim=256, expansion=0.5),
        decoder=dict(feat_channels=(256, 256, 256), num_decoder_layers=4)),
    "r50vd": dict(
        backbone=dict(depth=50, freeze_at=0, freeze_norm=True),
        encoder=dict(in_channels=(512, 1024, 2048), hidden_dim=256, expansion=1.0),
        decoder=dict(feat_channels=(256, 256, 256), num_decoder_layers=6)),
    "r50vd_m": dict(
        backbone=dict(depth=50, freeze_at=0, freeze_norm=True),
        encoder=dict(in_channels=(512, 1024, 2048), hidden_dim=256, expansion=0.5),
        decoder=dict(feat_channels=(256, 256, 256), num_decoder_layers=6, eval_idx=2)),
    "r101vd": dict(
        backbone=dict(depth=101, freeze_at=0, freeze_norm=True),
        encoder=dict(in_channels=(512, 1024, 2048), hidden_dim=384, dim_feedforward=2048, expansion=1.0),
        decoder=dict(feat_channels=(384, 384, 384), num_decoder_layers=6)),
    # not official: narrow widths for fast tests (same structure as r18vd)
    "tiny": dict(
        backbone=dict(depth=18, freeze_at=-1, freeze_norm=False, base_width=8),
        encoder=dict(in_channels=(16, 32, 64), hidden_dim=32, nhead=4, dim_feedforward=64, expansion=0.5,
                     depth_mult=1 / 3),
        decoder=dict(feat_channels=(32, 32, 32), hidden_dim=32, nhead=4, dim_feedforward=64, num_queries=20,
                     num_decoder_layers=2, num_denoising=10)),
}
# Shared by every official variant (include/rtdetr_r50vd.yml).
COMMON = dict(
    backbone=dict(variant="d", return_idx=(1, 2, 3), num_stages=4, act="relu"),
    encoder=dict(feat_strides=(8, 16, 32), use_encoder_idx=(2,), num_encoder_layers=1, enc_act="gelu",
                 pe_temperature=10000.0, act="silu", dropout=0.0),
    decoder=dict(feat_strides=(8, 16, 32), num_levels=3, num_decoder_points=4, activation="relu"),
)


class RTDETR(nn.Module):
    """RT-DETR: backbone maps (strides 8/16/32) -> hybrid encoder -> decoder.

    Attributes:
      backbone, encoder, decoder: module constructors (e.g. `functools.partial(PResNet, depth=18)`);
        instantiated with the official names `backbone`, `encoder`, `decoder`.

    Call: `images [B, H, W, 3]` in [0, 1], `train`, and the optional denoising inputs of
    `RTDETRTransformer` (`dn_class`, `dn_bbox_unact`, `dn_attn_mask`) -> output dict.
    """

    backbone: ModuleDef
    encoder: ModuleDef
    decoder: ModuleDef

    @nn.compact
    def __call__(self, images, train: bool = False, dn_class=None, dn_bbox_unact=None, dn_attn_mask=None):
        feats = self.backbone(name="backbone")(images, train)
        feats = self.encoder(name="encoder")(feats, train)
        return self.decoder(name="decoder")(feats, train, dn_class=dn_class, dn_bbox_unact=dn_bbox_unact,
                                            dn_attn_mask=dn_attn_mask)


def build_model(variant: str = "r18vd", num_classes: int = 80, eval_spatial_size: Optional[Sequence[int]] = (640, 640),
                dtype: Any = None, param_dtype: Any = jnp.float32, conv: ModuleDef = nn.Conv,
                norm: Optional[ModuleDef] = None, backbone: Optional[Mapping[str, Any]] = None,
                encoder: Optional[Mapping[str, Any]] = None, decoder: Optional[Mapping[str, Any]] = None) -> RTDETR:
    """RT-DETR of an official variant ('r18vd', 'r34vd', 'r50vd', 'r50vd_m', 'r101vd') or 'tiny'.

    eval_spatial_size: (H, W) for the eval-mode anchors and position embedding (official 640x640); None
      computes them from the input in eval mode too. backbone/encoder/decoder: per-part overrides.

    Raises:
      ValueError: unknown variant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown RT-DETR variant {variant!r}; choose one of {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    kw = dict(dtype=dtype, param_dtype=param_dtype, conv=conv)
    if norm is not None:
        kw["norm"] = norm
    ess = None if eval_spatial_size is None else tuple(int(s) for s in eval_spatial_size)
    b = {**COMMON["backbone"], **v["backbone"], **kw, **(backbone or {})}
    e = {**COMMON["encoder"], **v["encoder"], "eval_spatial_size": ess, **kw, **(encoder or {})}
    d = {**COMMON["decoder"], **v["decoder"], "num_classes": num_classes, "eval_spatial_size": ess, **kw,
         **(decoder or {})}
    return RTDETR(backbone=functools.partial(PResNet, **b), encoder=functools.partial(HybridEncoder, **e),
                  decoder=functools.partial(RTDETRTransformer, **d))


def count_params(params: Mapping[str, Any]) -> int:
    """Number of parameters (official `sum(p.numel() for p in model.parameters())`; frozen BatchNorm
    statistics and affine terms are buffers there and live in `batch_stats` here)."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))


def trainable_mask(model: RTDETR, params: Mapping[str, Any]) -> Any:
    """Pytree of bools like `params`: False for the parameters the official code freezes (backbone stem and
    the first `freeze_at` stages get requires_grad=False), for an optimizer mask (no update, no weight decay)."""
    frozen = PResNet(**model.backbone.keywords).frozen_submodules() if isinstance(
        model.backbone, functools.partial) else ()
    flat = traverse_util.flatten_dict(dict(params))
    mask = {k: not (len(k) > 1 and k[0] == "backbone" and k[1] in frozen) for k in flat}
    return traverse_util.unflatten_dict(mask)
