"""Hungarian matching of RT-DETR queries to targets (official `src/zoo/rtdetr/matcher.py`).

The cost of assigning query q to target j is

    cost_bbox * L1(box_q, box_j)  +  cost_class * class_cost(q, label_j)  +  cost_giou * -GIoU(box_q, box_j)

with boxes in normalised cxcywh (GIoU on their corners). With `use_focal_loss` the class cost is
the focal-loss form on sigmoid probabilities p of the target's class,
`alpha * (1 - p)^gamma * -log(p + 1e-8) - (1 - alpha) * p^gamma * -log(1 - p + 1e-8)`; otherwise it
is minus the softmax probability. The assignment per image is scipy's `linear_sum_assignment`
(run on the host), as officially.

Targets use a static padded layout: `labels [B, M]`, `boxes [B, M, 4]`, `valid [B, M]` (padding
slots False, anywhere in the row). A match is returned per target slot, `query_for_target [B, M]`:
the query index assigned to that target, or -1 for a padding slot (and for targets left without a
query when an image has more targets than queries). Two entry points:

  * `HungarianMatcher.host(...)`: NumPy in, NumPy out, for use outside jit.
  * `HungarianMatcher.__call__(...)`: JAX in, JAX out, jit-compatible. The cost matrix is computed
    in JAX and handed to the host solver through `jax.pure_callback`; shapes are static
    (`[B, Q, M] -> [B, M]`), so the call traces once per `(B, Q, M)`. No gradient flows through
    the matching (the inputs are wrapped in `stop_gradient`, like the official `torch.no_grad()`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import expit

from research.vision import boxes as box_lib

# Stand-in box for padding target slots, so that their (unused) cost columns stay finite.
_PAD_BOX = (0.5, 0.5, 1.0, 1.0)


def linear_assignment_host(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Solves one assignment problem per image on the host.

    Args:
      cost: `[B, Q, M]` cost of query q for target slot m (only valid columns are read).
      valid: `[B, M]` bool, the real target slots.
    Returns:
      `[B, M]` int32: the query assigned to each target slot, -1 for padding or unassigned slots.
    """
    cost = np.asarray(cost)
    valid = np.asarray(valid, bool)
    out = np.full(valid.shape, -1, np.int32)
    for b in range(cost.shape[0]):
        cols = np.flatnonzero(valid[b])
        if cols.size == 0:
            continue
        rows, picked = linear_sum_assignment(cost[b][:, cols])
        out[b, cols[picked]] = rows
    return out


def assignment_pairs(query_for_target: np.ndarray, valid: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-target matches -> the official list of `(query indices, target indices)` per image.

    Pairs are sorted by query index, the order `linear_sum_assignment` returns them in; target
    indices count the valid slots of the image only (its position among the real targets).
    """
    out = []
    for qft, val in zip(np.asarray(query_for_target), np.asarray(valid, bool)):
        rank = np.cumsum(val) - 1
        keep = val & (qft >= 0)
        q, t = qft[keep].astype(np.int64), rank[keep].astype(np.int64)
        order = np.argsort(q, kind="stable")
        out.append((q[order], t[order]))
    return out


def query_target_index(query_for_target: jax.Array, num_queries: int) -> jax.Array:
    """Per-target matches `[B, M]` -> per-query target slot `[B, Q]` (-1 for unmatched queries).

    This is the form `research/rtdetr/criterion.py` consumes (the denoising queries arrive in it
    directly).
    """
    b, m = query_for_target.shape
    q = jnp.where(query_for_target >= 0, query_for_target, num_queries)  # out of range: dropped
    slots = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (b, m))
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, m))
    return jnp.full((b, num_queries), -1, jnp.int32).at[rows, q].set(slots, mode="drop")


@dataclasses.dataclass(frozen=True)
class HungarianMatcher:
    """Official `HungarianMatcher`, with the r18vd/r50vd config values as defaults.

    The official class defaults are `use_focal_loss=False`; the RT-DETR configs
    (`configs/rtdetr/include/rtdetr_r50vd.yml`) set `use_focal_loss: True`, cost weights
    class 2 / bbox 5 / giou 2 and alpha 0.25, gamma 2.0, which are the defaults here.

    Attributes:
      cost_class, cost_bbox, cost_giou: weights of the three cost terms.
      use_focal_loss: focal-form class cost on sigmoid probabilities (else -softmax probability).
      alpha, gamma: focal-cost parameters.
    """
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    use_focal_loss: bool = True
    alpha: float = 0.25
    gamma: float = 2.0

    def __post_init__(self):
        if self.cost_class == 0 and self.cost_bbox == 0 and self.cost_giou == 0:
            raise ValueError("all matching costs are 0")

    def cost_matrix(self, pred_logits, pred_boxes, labels, boxes, valid=None):
        """Matching cost per image, NumPy in -> NumPy out, JAX in -> JAX out.

        Args:
          pred_logits: `[B, Q, C]` class logits (before sigmoid / softmax).
          pred_boxes: `[B, Q, 4]` cxcywh, normalised.
          labels: `[B, M]` int class ids in 0..C-1 (padding slots: any value when `valid` is given).
          boxes: `[B, M, 4]` cxcywh, normalised.
          valid: optional `[B, M]` bool; padding columns are computed on a stand-in box and set to 0.
        Returns:
          `[B, Q, M]` cost, in the dtype of the predictions.
        """
        xp = box_lib.array_module(pred_logits, pred_boxes, labels, boxes)
        dtype = pred_logits.dtype
        if valid is not None:
            boxes = xp.where(valid[..., None], boxes, xp.asarray(_PAD_BOX, boxes.dtype))
            labels = xp.where(valid, labels, 0)
        boxes = boxes.astype(pred_boxes.dtype)
        if self.use_focal_loss:
            prob = expit(pred_logits) if xp is np else jax.nn.sigmoid(pred_logits)
        else:
            z = pred_logits - pred_logits.max(-1, keepdims=True)
            prob = xp.exp(z) / xp.exp(z).sum(-1, keepdims=True)
        p = xp.take_along_axis(prob, xp.broadcast_to(labels[:, None, :], prob.shape[:2] + labels.shape[1:]), axis=2)
        if self.use_focal_loss:
            neg = (1 - self.alpha) * (p ** self.gamma) * (-xp.log(1 - p + 1e-8))
            pos = self.alpha * ((1 - p) ** self.gamma) * (-xp.log(p + 1e-8))
            cost_class = pos - neg
        else:
            cost_class = -p
        cost_bbox = xp.abs(pred_boxes[:, :, None, :] - boxes[:, None, :, :]).sum(-1)
        cost_giou = -box_lib.elementwise_generalized_box_iou(
            box_lib.cxcywh_to_xyxy(pred_boxes)[:, :, None, :], box_lib.cxcywh_to_xyxy(boxes)[:, None, :, :])
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        if valid is not None:
            cost = xp.where(valid[:, None, :], cost, xp.zeros((), cost.dtype))
        return cost.astype(dtype)

    def host(self, pred_logits: np.ndarray, pred_boxes: np.ndarray, labels: np.ndarray, boxes: np.ndarray,
             valid: np.ndarray) -> np.ndarray:
        """Matching on the host: NumPy arrays (shapes as `cost_matrix`) -> `[B, M]` int32 query per target."""
        args = [np.asarray(a) for a in (pred_logits, pred_boxes, labels, boxes, valid)]
        return linear_assignment_host(self.cost_matrix(*args), args[-1])

    def __call__(self, pred_logits: jax.Array, pred_boxes: jax.Array, labels: jax.Array, boxes: jax.Array,
                 valid: jax.Array) -> jax.Array:
        """Jit-compatible matching: shapes as `cost_matrix` -> `[B, M]` int32 query per target (-1 none)."""
        pred_logits, pred_boxes, boxes = (jax.lax.stop_gradient(jnp.asarray(a))
                                          for a in (pred_logits, pred_boxes, boxes))
        labels, valid = jnp.asarray(labels), jnp.asarray(valid, bool)
        cost = self.cost_matrix(pred_logits, pred_boxes, labels, boxes, valid)
        out = jax.ShapeDtypeStruct(valid.shape, jnp.int32)
        return jax.pure_callback(linear_assignment_host, out, cost, valid, vmap_method="sequential")
