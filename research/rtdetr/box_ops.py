"""Box conversions and IoU / generalized IoU for RT-DETR (official `src/zoo/rtdetr/box_ops.py`).

Every function takes NumPy or JAX arrays: when all array arguments are `np.ndarray` the result is
NumPy (host-side matching, data pipelines), otherwise it is a JAX array (traced code). The
arithmetic is written in the official operation order, so float32 results agree with torch to
rounding.

Formats: `cxcywh` is (centre x, centre y, width, height); `xyxy` is (x0, y0, x1, y1). Units are
whatever the caller uses (RT-DETR: normalised to the image, 0..1).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

Array = Any  # np.ndarray or jax.Array


def _xp(*arrays: Array):
    """NumPy when every argument is a NumPy array, else jax.numpy."""
    return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def box_cxcywh_to_xyxy(x: Array) -> Array:
    """`[..., 4]` cxcywh -> `[..., 4]` xyxy (official `box_cxcywh_to_xyxy`)."""
    xp = _xp(x)
    cx, cy, w, h = (x[..., k] for k in range(4))
    return xp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(x: Array) -> Array:
    """`[..., 4]` xyxy -> `[..., 4]` cxcywh (official `box_xyxy_to_cxcywh`)."""
    xp = _xp(x)
    x0, y0, x1, y1 = (x[..., k] for k in range(4))
    return xp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes: Array) -> Array:
    """Area of `[..., 4]` xyxy boxes -> `[...]` (torchvision `box_area`; no clamping)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _iou_union(boxes1: Array, boxes2: Array) -> tuple[Array, Array]:
    """IoU and union of broadcast-compatible `[..., 4]` xyxy boxes."""
    xp = _xp(boxes1, boxes2)
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = xp.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = xp.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = xp.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - inter
    return inter / union, union


def _giou_from(boxes1: Array, boxes2: Array, iou: Array, union: Array) -> Array:
    xp = _xp(boxes1, boxes2)
    lt = xp.minimum(boxes1[..., :2], boxes2[..., :2])
    rb = xp.maximum(boxes1[..., 2:], boxes2[..., 2:])
    wh = xp.clip(rb - lt, 0, None)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


def box_iou(boxes1: Array, boxes2: Array) -> tuple[Array, Array]:
    """Pairwise IoU and union of xyxy boxes (official `box_iou`, which also returns the union).

    Args:
      boxes1: `[N, 4]` xyxy.
      boxes2: `[M, 4]` xyxy.
    Returns:
      (iou `[N, M]`, union `[N, M]`). Degenerate pairs (zero union) give nan / inf, as officially.
    """
    return _iou_union(boxes1[:, None, :], boxes2[None, :, :])


def generalized_box_iou(boxes1: Array, boxes2: Array) -> Array:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes (official `generalized_box_iou`).

    Args:
      boxes1: `[N, 4]` xyxy with x1 >= x0, y1 >= y0.
      boxes2: `[M, 4]` xyxy, same requirement.
    Returns:
      `[N, M]` GIoU in [-1, 1]. The official function asserts well-formed boxes; this one does not
      check (it runs under jit), and degenerate boxes give nan / inf.
    """
    b1, b2 = boxes1[:, None, :], boxes2[None, :, :]
    iou, union = _iou_union(b1, b2)
    return _giou_from(b1, b2, iou, union)


def elementwise_box_iou(boxes1: Array, boxes2: Array) -> Array:
    """IoU of corresponding xyxy boxes, `[..., 4]` x `[..., 4]` -> `[...]`.

    Equals the diagonal of the pairwise `box_iou` that the official loss takes, without the
    `[N, N]` matrix.
    """
    return _iou_union(boxes1, boxes2)[0]


def elementwise_generalized_box_iou(boxes1: Array, boxes2: Array) -> Array:
    """GIoU of corresponding xyxy boxes, `[..., 4]` x `[..., 4]` -> `[...]`.

    Equals `diag(generalized_box_iou(boxes1, boxes2))` as the official loss computes it.
    """
    iou, union = _iou_union(boxes1, boxes2)
    return _giou_from(boxes1, boxes2, iou, union)
