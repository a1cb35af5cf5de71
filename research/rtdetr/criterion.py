"""RT-DETR training criterion (official `src/zoo/rtdetr/rtdetr_criterion.py` `SetCriterion`), in JAX.

For each output (the last decoder layer, every entry of `aux_outputs`, every entry of
`dn_aux_outputs`) the criterion pairs queries with targets and computes

  * `loss_vfl`: varifocal loss. Binary cross entropy with logits against a soft target that is the
    (gradient-free) IoU of the matched query's box with its target box at the target's class and 0
    elsewhere, weighted per element by `alpha * sigmoid(logit)^gamma` (gradient-free) off target
    and by the soft target on it; summed over every (image, query, class) element and divided by
    the number of boxes N (the official `mean(1).sum() * num_queries / N`, no division by classes);
  * `loss_bbox`: L1 distance of the matched cxcywh boxes, summed, / N;
  * `loss_giou`: sum of `1 - GIoU` of the matched pairs (on the boxes' corners), / N,

each multiplied by its `weight_dict` entry (the returned values are already weighted; their sum
is the training loss). The main and auxiliary outputs are matched by `HungarianMatcher`, each
one afresh, with suffixes `_aux_<i>`. The denoising outputs are not matched: their positive
queries reconstruct known targets (`dn_meta['dn_target_idx']`), their terms carry the suffix
`_dn_<i>`, and N is multiplied by `dn_num_group`. N is the batch's number of targets, averaged
over the devices of `axis_name` when one is given (the official all-reduce / world size) and
clamped to at least 1.

Static-shape conventions:
  * targets: dict of `labels` `[B, M]` int, `boxes` `[B, M, 4]` cxcywh normalised, `valid`
    `[B, M]` bool (padding slots False).
  * outputs: dict of `pred_logits` `[B, Q, C]` (logits), `pred_boxes` `[B, Q, 4]` (cxcywh in 0..1),
    optional `aux_outputs` (sequence of such dicts), optional `dn_aux_outputs` (sequence of dicts
    `[B, D, ...]`) with `dn_meta` (see `research/rtdetr/denoising.py`).
  * A matching is carried per query, `tgt_idx` `[B, Q]` int32: the target slot of the query, or -1.

Differences from the official code, none of which changes a value: the loss is computed on all
queries with a matched mask instead of on gathered pairs; inactive denoising slots (beyond the
official query count) are masked out of `loss_vfl`; and a batch without any target still returns
the `_dn_` terms when the outputs carry denoising outputs (all exactly 0, so the total is the
official one; officially there are no denoising outputs and no such keys then).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from research.rtdetr.matcher import HungarianMatcher, query_target_index
from research.vision import boxes as box_lib

# configs/rtdetr/include/rtdetr_r50vd.yml (SetCriterion.weight_dict), used by every RT-DETR config.
DEFAULT_WEIGHT_DICT = {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}

# Stand-in target box for unmatched queries, so their masked-out terms (and gradients) stay finite.
_PAD_BOX = (0.5, 0.5, 1.0, 1.0)

Outputs = Mapping[str, Any]
Targets = Mapping[str, jax.Array]


def _gather_targets(targets: Targets, tgt_idx: jax.Array):
    """Per-query matched mask, label and box (`[B, Q]`, `[B, Q]`, `[B, Q, 4]`) from per-query slots."""
    matched = tgt_idx >= 0
    t = jnp.maximum(tgt_idx, 0)
    labels = jnp.take_along_axis(targets["labels"], t, axis=1)
    boxes = jnp.take_along_axis(targets["boxes"], t[..., None], axis=1)
    boxes = jnp.where(matched[..., None], boxes, jnp.asarray(_PAD_BOX, boxes.dtype))
    return matched, labels, boxes


@dataclasses.dataclass(frozen=True)
class SetCriterion:
    """Official `SetCriterion` with the RT-DETR config values as defaults.

    The official class defaults are alpha 0.2 and an empty weight dict; `rtdetr_r50vd.yml`, which
    every RT-DETR config includes, sets losses ['vfl', 'boxes'], weights vfl 1 / bbox 5 / giou 2,
    alpha 0.75, gamma 2.0 and the matcher (see `HungarianMatcher`), the defaults here.

    Attributes:
      matcher: the Hungarian matcher of the main and auxiliary outputs.
      weight_dict: weight per loss name; terms without a weight are dropped, as officially.
      losses: loss groups to compute: 'vfl' (loss_vfl) and 'boxes' (loss_bbox, loss_giou).
      alpha, gamma: varifocal loss parameters.
      num_classes: number of classes C.
      axis_name: mapped axis over which N is averaged (data parallelism); None for one device.
    """
    matcher: HungarianMatcher = dataclasses.field(default_factory=HungarianMatcher)
    weight_dict: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_WEIGHT_DICT))
    losses: Sequence[str] = ("vfl", "boxes")
    alpha: float = 0.75
    gamma: float = 2.0
    num_classes: int = 80
    axis_name: Optional[str] = None

    def __post_init__(self):
        unknown = set(self.losses) - {"vfl", "boxes"}
        if unknown:
            raise ValueError(f"unsupported losses {sorted(unknown)}; this port has 'vfl' and 'boxes'")

    def num_boxes(self, valid: jax.Array) -> jax.Array:
        """N: the number of targets (`valid` `[B, M]`), averaged over `axis_name`, at least 1 (float32)."""
        n = jnp.sum(valid).astype(jnp.float32)
        if self.axis_name is not None:
            n = jax.lax.pmean(n, self.axis_name)
        return jnp.maximum(n, 1.0)

    def loss_labels_vfl(self, outputs: Outputs, targets: Targets, tgt_idx: jax.Array, num_boxes: jax.Array,
                        query_valid: Optional[jax.Array] = None) -> dict[str, jax.Array]:
        """Varifocal loss (official `loss_labels_vfl`), unweighted.

        Args:
          tgt_idx: `[B, Q]` target slot per query, -1 unmatched.
          query_valid: optional `[Q]` or `[B, Q]` mask of the queries that exist (denoising slots).
        """
        logits = outputs["pred_logits"]
        matched, labels, boxes = _gather_targets(targets, tgt_idx)
        iou = box_lib.elementwise_box_iou(box_lib.cxcywh_to_xyxy(outputs["pred_boxes"]),
                                          box_lib.cxcywh_to_xyxy(boxes.astype(logits.dtype)))
        iou = jax.lax.stop_gradient(jnp.where(matched, iou, 0))
        classes = jnp.arange(logits.shape[-1], dtype=labels.dtype)
        target = ((labels[..., None] == classes) & matched[..., None]).astype(logits.dtype)
        target_score = iou[..., None] * target
        pred_score = jax.lax.stop_gradient(jax.nn.sigmoid(logits))
        weight = self.alpha * pred_score ** self.gamma * (1 - target) + target_score
        loss = weight * ((1 - target_score) * logits - jax.nn.log_sigmoid(logits))
        if query_valid is not None:
            loss = jnp.where(jnp.broadcast_to(query_valid, tgt_idx.shape)[..., None], loss, 0)
        return {"loss_vfl": jnp.sum(loss) / num_boxes}

    def loss_boxes(self, outputs: Outputs, targets: Targets, tgt_idx: jax.Array,
                   num_boxes: jax.Array) -> dict[str, jax.Array]:
        """L1 and GIoU losses of the matched boxes (official `loss_boxes`), unweighted."""
        src = outputs["pred_boxes"]
        matched, _, boxes = _gather_targets(targets, tgt_idx)
        boxes = boxes.astype(src.dtype)
        mask = matched.astype(src.dtype)
        loss_bbox = jnp.sum(jnp.abs(src - boxes) * mask[..., None]) / num_boxes
        giou = box_lib.elementwise_generalized_box_iou(box_lib.cxcywh_to_xyxy(src),
                                                       box_lib.cxcywh_to_xyxy(boxes))
        loss_giou = jnp.sum((1 - giou) * mask) / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def get_loss(self, loss: str, outputs: Outputs, targets: Targets, tgt_idx: jax.Array, num_boxes: jax.Array,
                 query_valid: Optional[jax.Array] = None) -> dict[str, jax.Array]:
        """One loss group, weighted by `weight_dict` (terms without a weight dropped)."""
        if loss == "vfl":
            terms = self.loss_labels_vfl(outputs, targets, tgt_idx, num_boxes, query_valid)
        elif loss == "boxes":
            terms = self.loss_boxes(outputs, targets, tgt_idx, num_boxes)
        else:
            raise ValueError(f"unsupported loss {loss!r}")
        return {k: v * self.weight_dict[k] for k, v in terms.items() if k in self.weight_dict}

    def match(self, outputs: Outputs, targets: Targets) -> jax.Array:
        """Hungarian matching of one output: `[B, Q]` target slot per query (-1 unmatched)."""
        qft = self.matcher(outputs["pred_logits"], outputs["pred_boxes"], targets["labels"], targets["boxes"],
                           targets["valid"])
        return query_target_index(qft, outputs["pred_logits"].shape[1])

    def __call__(self, outputs: Outputs, targets: Targets) -> dict[str, jax.Array]:
        """All loss terms by their official names (weighted), in the official order.

        Args:
          outputs: model outputs (module docstring).
          targets: padded targets (module docstring).
        Returns:
          dict name -> float scalar: loss_vfl, loss_bbox, loss_giou, then `_aux_<i>` per auxiliary
          output, then `_dn_<i>` per denoising output.
        """
        targets = dict(targets)
        targets["valid"] = jnp.asarray(targets["valid"], bool)
        if targets["valid"].shape[1] == 0:  # keep gathers in range: one padding slot
            b = targets["valid"].shape[0]
            targets = {"labels": jnp.zeros((b, 1), jnp.int32), "valid": jnp.zeros((b, 1), bool),
                       "boxes": jnp.zeros((b, 1, 4), jnp.asarray(targets["boxes"]).dtype)}
        num_boxes = self.num_boxes(targets["valid"])

        losses = {}
        tgt_idx = self.match(outputs, targets)
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, targets, tgt_idx, num_boxes))

        for i, aux in enumerate(outputs.get("aux_outputs", ())):
            tgt_idx = self.match(aux, targets)
            for loss in self.losses:
                terms = self.get_loss(loss, aux, targets, tgt_idx, num_boxes)
                losses.update({f"{k}_aux_{i}": v for k, v in terms.items()})

        if "dn_aux_outputs" in outputs:
            if "dn_meta" not in outputs:
                raise ValueError("outputs have dn_aux_outputs but no dn_meta")
            meta = outputs["dn_meta"]
            tgt_idx = jnp.asarray(meta["dn_target_idx"], jnp.int32)
            dn_valid = jnp.asarray(meta["dn_valid"], bool)
            dn_num_boxes = num_boxes * jnp.asarray(meta["dn_num_group"], jnp.float32)
            for i, aux in enumerate(outputs["dn_aux_outputs"]):
                for loss in self.losses:
                    terms = self.get_loss(loss, aux, targets, tgt_idx, dn_num_boxes, query_valid=dn_valid)
                    losses.update({f"{k}_dn_{i}": v for k, v in terms.items()})
        return losses
