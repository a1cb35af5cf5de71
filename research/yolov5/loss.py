"""YOLOv5 v7.0 training loss (`utils/loss.py` `ComputeLoss`), in JAX with static shapes.

The official loss builds its targets with boolean indexing, so the number of matched
(prediction cell, target) pairs changes from batch to batch. Here every candidate pair is
enumerated instead: per level `[B, 5 offsets, na anchors, M label slots]`, and the official
filters (anchor-ratio test, neighbouring-cell rules, padding) become a mask. Masked sums
divided by the masked count give exactly the official means, and the function traces once
for a given `(B, M)` and head shapes.

Duplicate cells: when several candidates land on the same `(image, anchor, gy, gx)` cell,
torch's `tobj[b, a, gj, gi] = iou` keeps the candidate written last, in the order
offset-major, then anchor, then label row. That order is rebuilt explicitly (a scatter-max
of each candidate's rank per cell, then only the winning candidate writes its IoU), so the
result does not depend on the scatter order of any backend.

Conventions (as the official code):
  * heads: raw Detect logits `[B, na, ny, nx, 5 + nc]` (x, y, w, h, obj, classes).
  * anchors: `[nl, na, 2]` in grid units of each level (official `model[-1].anchors`,
    i.e. pixel anchors divided by the level's stride).
  * labels: normalized `cx, cy, w, h` in 0..1 of the (letterboxed) input image.
  * the returned total is `(lbox + lobj + lcls) * B`: the official loss is a sum over
    the batch, and its gradients are summed again over accumulated batches.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research.yolov5.hyp import HYP_SCRATCH_LOW  # noqa: E402,F401  (re-exported: the loss gains live there)

# Neighbour-cell offsets in the official candidate order: own cell, then the cells to the
# left (x-1), above (y-1), right (x+1) and below (y+1), chosen by which half of the cell the
# centre lies in. Expressed, as officially, as values subtracted from the centre (times g).
_CELL_OFFSETS = np.array([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], np.float32)
_G = 0.5  # neighbour-cell bias


def scale_hyp(hyp: Mapping[str, float], nl: int, nc: int, imgsz: int) -> dict[str, float]:
    """Returns a copy of `hyp` with train.py's gain scaling for `nl` levels, `nc` classes, `imgsz` px."""
    out = dict(hyp)
    out["box"] = hyp["box"] * (3 / nl)
    out["cls"] = hyp["cls"] * (nc / 80 * 3 / nl)
    out["obj"] = hyp["obj"] * ((imgsz / 640) ** 2 * 3 / nl)
    return out


def level_balance(nl: int) -> list[float]:
    """Per-level objectness weights of the official loss (P3.. first); autobalance is not used."""
    table = [4.0, 1.0, 0.4] if nl == 3 else [4.0, 1.0, 0.25, 0.06, 0.02]
    if nl > len(table):
        raise ValueError(f"the official balance table covers at most {len(table)} levels, got nl={nl}")
    return table[:nl]


def targets_to_padded(targets: np.ndarray, batch_size: int,
                      max_labels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Official `(N, 6)` label rows `(image, class, cx, cy, w, h)` -> padded per-image arrays.

    Rows keep their relative order within each image (that order decides which label owns a
    shared objectness cell).

    Returns:
      boxes `[B, M, 4]` float32 (padding 0), classes `[B, M]` int32, valid `[B, M]` bool.
    """
    targets = np.asarray(targets, np.float64).reshape(-1, 6)
    boxes = np.zeros((batch_size, max_labels, 4), np.float32)
    classes = np.zeros((batch_size, max_labels), np.int32)
    valid = np.zeros((batch_size, max_labels), bool)
    fill = np.zeros(batch_size, np.int64)
    for row in targets:
        b = int(row[0])
        if not 0 <= b < batch_size:
            raise ValueError(f"label image index {b} outside batch of {batch_size}")
        k = fill[b]
        if k >= max_labels:
            raise ValueError(f"image {b} has more than max_labels={max_labels} labels")
        boxes[b, k] = row[2:6]
        classes[b, k] = int(row[1])
        valid[b, k] = True
        fill[b] += 1
    return boxes, classes, valid


def bbox_ciou(box1: jax.Array, box2: jax.Array, eps: float = 1e-7) -> jax.Array:
    """Complete IoU of matching rows of two `[..., 4]` xywh box arrays (official bbox_iou, CIoU=True).

    Operation order and the placement of eps follow the official function, so float32 results
    agree to rounding; the CIoU trade-off weight alpha carries no gradient, as officially.
    """
    x1, y1, w1, h1 = (box1[..., k] for k in range(4))
    x2, y2, w2, h2 = (box2[..., k] for k in range(4))
    w1_, h1_, w2_, h2_ = w1 / 2, h1 / 2, w2 / 2, h2 / 2
    b1_x1, b1_x2, b1_y1, b1_y2 = x1 - w1_, x1 + w1_, y1 - h1_, y1 + h1_
    b2_x1, b2_x2, b2_y1, b2_y2 = x2 - w2_, x2 + w2_, y2 - h2_, y2 + h2_

    inter = (jnp.maximum(jnp.minimum(b1_x2, b2_x2) - jnp.maximum(b1_x1, b2_x1), 0)
             * jnp.maximum(jnp.minimum(b1_y2, b2_y2) - jnp.maximum(b1_y1, b2_y1), 0))
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union

    cw = jnp.maximum(b1_x2, b2_x2) - jnp.minimum(b1_x1, b2_x1)
    ch = jnp.maximum(b1_y2, b2_y2) - jnp.minimum(b1_y1, b2_y1)
    c2 = cw**2 + ch**2 + eps
    rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2)**2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2)**2) / 4
    v = (4 / math.pi**2) * (jnp.arctan(w2 / h2) - jnp.arctan(w1 / h1))**2
    alpha = jax.lax.stop_gradient(v / (v - iou + (1 + eps)))
    return iou - (rho2 / c2 + v * alpha)


def bce_with_logits(logits: jax.Array, target: jax.Array, pos_weight: float = 1.0,
                    fl_gamma: float = 0.0, fl_alpha: float = 0.25) -> jax.Array:
    """Elementwise torch BCEWithLogitsLoss(pos_weight) (no reduction), optionally focal-wrapped.

    With `fl_gamma > 0` this is the official `FocalLoss(BCE, gamma)` (alpha 0.25, TF-style factor).
    """
    log_weight = (pos_weight - 1.0) * target + 1.0
    loss = (1.0 - target) * logits - log_weight * jax.nn.log_sigmoid(logits)
    if fl_gamma > 0:
        prob = jax.nn.sigmoid(logits)
        p_t = target * prob + (1 - target) * (1 - prob)
        alpha_factor = target * fl_alpha + (1 - target) * (1 - fl_alpha)
        loss = loss * alpha_factor * (1.0 - p_t)**fl_gamma
    return loss


def _level_candidates(boxes, valid, anchors, nx, ny, anchor_t):
    """Enumerates the official build_targets candidates of one level.

    Args:
      boxes: [B, M, 4] normalized xywh (padding already made harmless).
      valid: [B, M] bool.
      anchors: [na, 2] grid units.
    Returns (all shaped [B, 5, na, M] unless noted):
      mask (bool), gi, gj (clamped int32 cell), txy [..., 2] (centre relative to the
      unclamped cell), twh [..., 2] (grid units), anchor index a (int32).
    """
    B, M = valid.shape
    na = anchors.shape[0]
    gain = jnp.asarray([nx, ny], boxes.dtype)
    gxy = boxes[..., 0:2] * gain                                     # [B, M, 2]
    gwh = boxes[..., 2:4] * gain                                     # [B, M, 2]

    r = gwh[:, None, :, :] / anchors[None, :, None, :]               # [B, na, M, 2]
    match = jnp.max(jnp.maximum(r, 1 / r), axis=-1) < anchor_t       # [B, na, M]
    match = match & valid[:, None, :]

    gxi = gain - gxy
    near_lo = (gxy % 1 < _G) & (gxy > 1)                             # [B, M, 2]: x, y
    near_hi = (gxi % 1 < _G) & (gxi > 1)
    use_offset = jnp.stack([jnp.ones_like(near_lo[..., 0]), near_lo[..., 0], near_lo[..., 1],
                            near_hi[..., 0], near_hi[..., 1]], axis=1)  # [B, 5, M]
    mask = match[:, None, :, :] & use_offset[:, :, None, :]         # [B, 5, na, M]

    offsets = jnp.asarray(_CELL_OFFSETS * _G, boxes.dtype)           # [5, 2]
    shifted = gxy[:, None, :, :] - offsets[None, :, None, :]         # [B, 5, M, 2]
    gij = shifted.astype(jnp.int32)                                  # truncation, as torch .long()
    txy = gxy[:, None, :, :] - gij.astype(boxes.dtype)               # [B, 5, M, 2]
    gi = jnp.clip(gij[..., 0], 0, nx - 1)
    gj = jnp.clip(gij[..., 1], 0, ny - 1)

    bcast = (B, 5, na, M)
    gi = jnp.broadcast_to(gi[:, :, None, :], bcast)
    gj = jnp.broadcast_to(gj[:, :, None, :], bcast)
    txy = jnp.broadcast_to(txy[:, :, None, :, :], bcast + (2,))
    twh = jnp.broadcast_to(gwh[:, None, None, :, :], bcast + (2,))
    a = jnp.broadcast_to(jnp.arange(na, dtype=jnp.int32)[None, None, :, None], bcast)
    return mask, gi, gj, txy, twh, a


def compute_loss(heads: Sequence[jax.Array], boxes: jax.Array, classes: jax.Array,
                 valid: jax.Array, anchors: jax.Array,
                 hyp: Mapping[str, float], layout: str = "official") -> tuple[jax.Array, dict[str, jax.Array]]:
    """Official YOLOv5 v7.0 ComputeLoss (autobalance off, gr = 1.0, sort_obj_iou off).

    Args:
      heads: nl raw Detect outputs, each `[B, na, ny, nx, 5 + nc]` logits (`layout="official"`)
        or `[B, ny, nx, na, 5 + nc]` (`layout="nhwc"`: the Detect convolution's own output
        reshaped, so training skips the transposes to and from the official layout).
      boxes: `[B, M, 4]` normalized cx, cy, w, h of the padded labels.
      classes: `[B, M]` int class ids.
      valid: `[B, M]` bool, which label slots are real.
      anchors: `[nl, na, 2]` anchors in grid (stride) units.
      hyp: python floats `box, obj, cls, cls_pw, obj_pw, anchor_t` and optionally
        `label_smoothing` (default 0) and `fl_gamma` (default 0; > 0 wraps both BCEs in
        the official FocalLoss). Pass already-scaled gains (`scale_hyp`) for training.

    Returns:
      `(total, {"lbox", "lobj", "lcls"})`: the parts are already multiplied by their gains and
      `total = (lbox + lobj + lcls) * B`, as the official loss. Computed in float32.
    """
    if layout not in ("official", "nhwc"):
        raise ValueError(f"heads layout {layout!r}: expected 'official' or 'nhwc'")
    nl = len(heads)
    anchors = jnp.asarray(anchors, jnp.float32)
    if anchors.shape[0] != nl:
        raise ValueError(f"anchors has {anchors.shape[0]} levels, heads {nl}")
    balance = level_balance(nl)
    eps_ls = float(hyp.get("label_smoothing", 0.0))
    cp, cn = 1.0 - 0.5 * eps_ls, 0.5 * eps_ls
    fl_gamma = float(hyp.get("fl_gamma", 0.0))
    anchor_t = float(hyp["anchor_t"])
    cls_pw, obj_pw = float(hyp["cls_pw"]), float(hyp["obj_pw"])

    valid = jnp.asarray(valid, bool)
    # Padding slots get a harmless box so nothing non-finite reaches the (masked) gradients.
    boxes = jnp.where(valid[..., None], jnp.asarray(boxes, jnp.float32),
                      jnp.asarray([0.5, 0.5, 0.1, 0.1], jnp.float32))
    classes = jnp.asarray(classes, jnp.int32)

    lbox = jnp.zeros((), jnp.float32)
    lobj = jnp.zeros((), jnp.float32)
    lcls = jnp.zeros((), jnp.float32)
    batch = heads[0].shape[0]
    for i, head in enumerate(heads):
        head = jnp.asarray(head, jnp.float32)
        if layout == "nhwc":
            B, ny, nx, na, no = head.shape
        else:
            B, na, ny, nx, no = head.shape
        nc = no - 5
        M = valid.shape[1]
        mask, gi, gj, txy, twh, a = _level_candidates(boxes, valid, anchors[i], nx, ny, anchor_t)

        b = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None, None, None], mask.shape)
        if layout == "nhwc":
            cell = ((b * ny + gj) * nx + gi) * na + a                 # [B, 5, na, M]
        else:
            cell = ((b * na + a) * ny + gj) * nx + gi
        flat = head.reshape(B * na * ny * nx, no)
        pred = flat[cell]                                            # [B, 5, na, M, no]

        pxy = jax.nn.sigmoid(pred[..., 0:2]) * 2 - 0.5
        pwh = (jax.nn.sigmoid(pred[..., 2:4]) * 2)**2 * anchors[i][a]
        pbox = jnp.concatenate([pxy, pwh], axis=-1)
        tbox = jnp.concatenate([txy, twh], axis=-1)
        iou = bbox_ciou(pbox, tbox)                                  # [B, 5, na, M]

        maskf = mask.astype(jnp.float32)
        n = jnp.sum(maskf)
        has = n > 0
        safe_n = jnp.maximum(n, 1.0)
        lbox = lbox + jnp.where(has, jnp.sum(jnp.where(mask, 1.0 - iou, 0.0)) / safe_n, 0.0)

        # Objectness target: the IoU of the candidate torch writes last into each cell.
        rank = jnp.arange(5 * na * M, dtype=jnp.int32).reshape(1, 5, na, M)
        rank = jnp.where(mask, rank, -1)
        ncell = B * na * ny * nx
        last = jnp.full((ncell,), -1, jnp.int32).at[cell.reshape(-1)].max(rank.reshape(-1))
        winner = mask & (last[cell] == rank)
        iou_t = jnp.maximum(jax.lax.stop_gradient(iou), 0.0)
        tobj = jnp.zeros((ncell,), jnp.float32).at[cell.reshape(-1)].add(
            jnp.where(winner, iou_t, 0.0).reshape(-1))
        tobj = tobj.reshape(head.shape[:-1])

        if nc > 1:
            is_cls = classes[..., None] == jnp.arange(nc, dtype=jnp.int32)  # [B, M, nc]
            t = jnp.where(is_cls, jnp.float32(cp), jnp.float32(cn))
            t = jnp.broadcast_to(t[:, None, None, :, :], pred.shape[:-1] + (nc,))
            bce = bce_with_logits(pred[..., 5:], t, cls_pw, fl_gamma)
            bce = jnp.sum(jnp.where(mask[..., None], bce, 0.0))
            lcls = lcls + jnp.where(has, bce / (safe_n * nc), 0.0)

        obji = jnp.mean(bce_with_logits(head[..., 4], tobj, obj_pw, fl_gamma))
        lobj = lobj + obji * balance[i]

    lbox = lbox * hyp["box"]
    lobj = lobj * hyp["obj"]
    lcls = lcls * hyp["cls"]
    total = (lbox + lobj + lcls) * batch
    return total, {"lbox": lbox, "lobj": lobj, "lcls": lcls}
