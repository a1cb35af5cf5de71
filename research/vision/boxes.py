"""Host-side box utilities in numpy: box conversions, letterbox undo, IoU and NMS.

Semantics follow the official YOLOv5 v7.0 `utils/general.py` (`non_max_suppression`,
`xywh2xyxy`, `xyxy2xywh`, `scale_boxes`, `clip_boxes`); the arithmetic is kept in the input
dtype (float32 for model outputs) with the same operation order, so results match the official
torch pipeline (torchvision.ops.nms on class-offset boxes) bit for bit on float32 inputs.

Differences from the official functions, all deliberate:
  * every function returns a new array and never modifies its input in place;
  * NMS has no wall-clock time limit (the official loop gives up after 0.5 s + 0.05 s/image),
    so the output is deterministic;
  * no autolabelling `labels=` input and no mask columns (`nm`); merge-NMS is not implemented
    (it is switched off in the official code as well).

Nothing here imports torch or jax; pass `np.asarray(jax_array)`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "xywh2xyxy",
    "xyxy2xywh",
    "clip_boxes",
    "scale_boxes",
    "box_iou",
    "nms",
    "non_max_suppression",
    "array_module",
    "cxcywh_to_xyxy",
    "xyxy_to_cxcywh",
    "box_area",
    "elementwise_box_iou_union",
    "elementwise_box_iou",
    "elementwise_generalized_box_iou",
    "pairwise_box_iou",
    "pairwise_generalized_box_iou",
]


def _float_copy(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    return np.array(x, copy=True)


def xywh2xyxy(x: np.ndarray) -> np.ndarray:
    """[n, 4+] (cx, cy, w, h, ...) -> (x1, y1, x2, y2, ...); extra columns are copied through."""
    x = np.asarray(x)
    y = _float_copy(x)
    half_w = x[..., 2] / 2
    half_h = x[..., 3] / 2
    y[..., 0] = x[..., 0] - half_w
    y[..., 1] = x[..., 1] - half_h
    y[..., 2] = x[..., 0] + half_w
    y[..., 3] = x[..., 1] + half_h
    return y


def xyxy2xywh(x: np.ndarray) -> np.ndarray:
    """[n, 4+] (x1, y1, x2, y2, ...) -> (cx, cy, w, h, ...); extra columns are copied through."""
    x = np.asarray(x)
    y = _float_copy(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def clip_boxes(boxes: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Clip xyxy boxes to an image of `shape` = (height, width, ...); returns a new array."""
    out = _float_copy(boxes)
    h, w = shape[0], shape[1]
    out[..., [0, 2]] = out[..., [0, 2]].clip(0, w)
    out[..., [1, 3]] = out[..., [1, 3]].clip(0, h)
    return out


def scale_boxes(img1_shape: Sequence[int], boxes: np.ndarray, img0_shape: Sequence[int],
                ratio_pad=None) -> np.ndarray:
    """Map xyxy boxes from the letterboxed image (img1_shape = (h, w)) back to the original image.

    Subtracts the letterbox padding, divides by the resize gain and clips to img0_shape (h, w).
    `ratio_pad` = ((gain_h, gain_w), (pad_w, pad_h)) as the official dataloader records it
    (only gain_h is used, as officially); by default gain and centred padding are recomputed
    from the two shapes. Columns beyond the 4th are copied through. Returns a new array.
    """
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        pad = ((img1_shape[1] - img0_shape[1] * gain) / 2, (img1_shape[0] - img0_shape[0] * gain) / 2)
    else:
        gain = ratio_pad[0][0]
        pad = ratio_pad[1]
    out = _float_copy(boxes)
    out[..., [0, 2]] -= pad[0]
    out[..., [1, 3]] -= pad[1]
    out[..., :4] /= gain
    return clip_boxes(out, img0_shape)


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Pairwise IoU [n, m] of xyxy boxes (float64 accumulation, for analysis / tests)."""
    b1 = np.asarray(boxes1, dtype=np.float64)[:, None, :4]
    b2 = np.asarray(boxes2, dtype=np.float64)[None, :, :4]
    iw = (np.minimum(b1[..., 2], b2[..., 2]) - np.maximum(b1[..., 0], b2[..., 0])).clip(0)
    ih = (np.minimum(b1[..., 3], b2[..., 3]) - np.maximum(b1[..., 1], b2[..., 1])).clip(0)
    inter = iw * ih
    a1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    a2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    return inter / (a1 + a2 - inter)


def _pair_iou(x1, y1, x2, y2, area, bx1, by1, bx2, by2, barea, zero):
    """IoU between broadcast box sets with torchvision's float formula (symmetric bitwise)."""
    w = np.maximum(zero, np.minimum(x2, bx2) - np.maximum(x1, bx1))
    h = np.maximum(zero, np.minimum(y2, by2) - np.maximum(y1, by1))
    inter = w * h
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 for empty boxes -> NaN, never suppresses
        return inter / (area + barea - inter)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thres: float, max_keep: int | None = None) -> np.ndarray:
    """Greedy NMS with torchvision.ops.nms semantics; returns kept indices, highest score first.

    Boxes are visited in stable descending score order; a box is dropped when its IoU with an
    already kept box is strictly greater than `iou_thres`. IoU is computed in the boxes' dtype
    with torchvision's formula and compared in float64, as the torchvision CPU kernel does
    (a NaN IoU from degenerate boxes is "not greater", so such boxes are kept, as there).
    `max_keep` stops after that many kept boxes: the result is then exactly the first
    `max_keep` entries of the full result, because later boxes never change earlier decisions.

    Implementation: boxes are taken in score-ordered chunks. A chunk is first filtered against
    all boxes kept so far with one IoU matrix, then resolved greedily inside itself, so the
    Python loop runs once per kept box on chunk-sized arrays.
    """
    boxes = np.asarray(boxes)
    if not np.issubdtype(boxes.dtype, np.floating):
        boxes = boxes.astype(np.float32)
    scores = np.asarray(scores)
    n = boxes.shape[0]
    limit = n if max_keep is None else max(int(max_keep), 0)
    if n == 0 or limit == 0:
        return np.zeros((0,), dtype=np.int64)
    thr = float(iou_thres)
    zero = boxes.dtype.type(0)
    order = np.argsort(-scores, kind="stable")
    sx1, sy1, sx2, sy2 = (boxes[order, k] for k in range(4))
    sarea = (sx2 - sx1) * (sy2 - sy1)

    keep: list[int] = []  # positions in the sorted arrays
    start, chunk = 0, 1024
    while start < n and len(keep) < limit:
        pos = np.arange(start, min(start + chunk, n))
        start += pos.shape[0]
        chunk = min(chunk * 2, 8192)
        if keep:
            k = np.asarray(keep)
            iou = _pair_iou(sx1[k, None], sy1[k, None], sx2[k, None], sy2[k, None], sarea[k, None],
                            sx1[None, pos], sy1[None, pos], sx2[None, pos], sy2[None, pos],
                            sarea[None, pos], zero)
            pos = pos[~(iou.astype(np.float64) > thr).any(axis=0)]
        x1, y1, x2, y2, area = sx1[pos], sy1[pos], sx2[pos], sy2[pos], sarea[pos]
        while pos.shape[0] and len(keep) < limit:
            keep.append(int(pos[0]))
            iou = _pair_iou(x1[0], y1[0], x2[0], y2[0], area[0], x1[1:], y1[1:], x2[1:], y2[1:], area[1:], zero)
            alive = np.flatnonzero(~(iou.astype(np.float64) > thr)) + 1
            pos, x1, y1, x2, y2, area = pos[alive], x1[alive], y1[alive], x2[alive], y2[alive], area[alive]
    return order[np.asarray(keep, dtype=np.int64)]


# Above this many detections per image, NMS runs on independent class groups (see `_batched_nms`).
_PER_CLASS_MIN_DET = 1000


def _batched_nms(offset_boxes, scores, cls, iou_thres, max_det):
    """`nms` of class-offset boxes, first `max_det` kept; indices into the (conf-sorted) rows.

    With a small `max_det` one global greedy pass that stops after `max_det` kept boxes is
    cheapest. With a large one (nearly everything kept) the greedy runs on groups of classes
    whose offset boxes cannot interact: classes are grouped so that the x-extents (of the float
    values actually used) of different groups at most touch. Any cross-group pair then has
    min(x2) - max(x1) <= 0, so intersection 0, IoU 0 (or NaN) and no suppression, and the
    result is identical to the global pass. With the usual class offset every class is its
    own group; in agnostic mode everything is one group.
    """
    n = offset_boxes.shape[0]
    if max_det <= _PER_CLASS_MIN_DET or n <= 1024:
        return nms(offset_boxes, scores, iou_thres, max_keep=max_det)
    lo_box = np.minimum(offset_boxes[:, 0], offset_boxes[:, 2])
    hi_box = np.maximum(offset_boxes[:, 0], offset_boxes[:, 2])
    if not (np.isfinite(lo_box).all() and np.isfinite(hi_box).all()):
        return nms(offset_boxes, scores, iou_thres, max_keep=max_det)
    uniq, inv = np.unique(cls, return_inverse=True)
    lo = np.full(uniq.shape[0], np.inf)
    hi = np.full(uniq.shape[0], -np.inf)
    np.minimum.at(lo, inv, lo_box)
    np.maximum.at(hi, inv, hi_box)
    by_lo = np.argsort(lo, kind="stable")
    group = np.empty(uniq.shape[0], dtype=np.int64)
    g, reach = -1, -np.inf
    for c in by_lo:  # sweep: a class starts a new group when it begins at or after all before it end
        if lo[c] >= reach:
            g += 1
        reach = max(reach, hi[c])
        group[c] = g
    if g == 0:
        return nms(offset_boxes, scores, iou_thres, max_keep=max_det)
    row_group = group[inv]
    keep = []
    for k in range(g + 1):
        rows = np.flatnonzero(row_group == k)
        keep.append(rows[nms(offset_boxes[rows], scores[rows], iou_thres, max_keep=max_det)])
    # Rows are already in stable descending conf order, so row order is the global kept order.
    return np.sort(np.concatenate(keep))[:max_det]


def _top_stable(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, ordered as a stable descending sort would order them."""
    n = values.shape[0]
    if n > k:
        kth = np.partition(values, n - k)[n - k]  # k-th largest value
        above = np.flatnonzero(values > kth)
        ties = np.flatnonzero(values == kth)[: k - above.shape[0]]
        sel = np.sort(np.concatenate([above, ties]))
    else:
        sel = np.arange(n)
    return sel[np.argsort(-values[sel], kind="stable")]


def non_max_suppression(pred, conf_thres: float = 0.25, iou_thres: float = 0.45, classes=None,
                        agnostic: bool = False, multi_label: bool = False, max_det: int = 300,
                        max_nms: int = 30000, max_wh: int = 7680) -> list[np.ndarray]:
    """Official YOLOv5 NMS on the Detect inference output.

    Args:
      pred: [B, N, 5 + nc] rows (cx, cy, w, h in pixels, objectness, class probabilities), all
        already sigmoided. A (inference_out, train_out) tuple/list is accepted; its first item
        is used, as officially.
      conf_thres: candidates need objectness > conf_thres and obj * cls > conf_thres.
      iou_thres: IoU strictly above this suppresses the lower-scored box.
      classes: optional iterable of class indices to keep.
      agnostic: one NMS over all classes instead of per class.
      multi_label: emit every (box, class) pair with conf > conf_thres (needs nc > 1);
        otherwise only each box's best class.
      max_det: detections kept per image after NMS.
      max_nms: candidates (highest conf) fed to NMS per image.
      max_wh: per-class coordinate offset that separates classes in the batched NMS.

    Returns:
      B arrays [n, 6] (x1, y1, x2, y2, conf, cls) in pred's float dtype, sorted by conf.
    """
    if isinstance(pred, (list, tuple)):
        pred = pred[0]
    pred = np.asarray(pred)
    if not np.issubdtype(pred.dtype, np.floating):
        pred = pred.astype(np.float32)
    if pred.ndim != 3:
        raise ValueError(f"pred must be [B, N, 5 + nc], got shape {pred.shape}")
    if not 0 <= conf_thres <= 1:
        raise ValueError(f"conf_thres must be in [0, 1], got {conf_thres}")
    if not 0 <= iou_thres <= 1:
        raise ValueError(f"iou_thres must be in [0, 1], got {iou_thres}")
    dtype = pred.dtype
    nc = pred.shape[2] - 5
    multi_label = bool(multi_label) and nc > 1
    class_filter = None if classes is None else np.asarray(list(classes), dtype=dtype)

    output = []
    for x in pred:
        x = x[x[:, 4] > conf_thres]
        if not x.shape[0]:
            output.append(np.zeros((0, 6), dtype=dtype))
            continue
        cls_conf = x[:, 5:] * x[:, 4:5]  # conf = obj * cls
        if multi_label:
            # Candidates are (box, class) pairs in row-major order, as torch's nonzero yields them.
            ok = cls_conf > conf_thres
        else:
            best = np.argmax(cls_conf, axis=1)
            ok = np.zeros(cls_conf.shape, dtype=bool)
            rows = np.arange(cls_conf.shape[0])
            ok[rows, best] = cls_conf[rows, best] > conf_thres
        if class_filter is not None:
            ok &= np.isin(np.arange(nc, dtype=dtype), class_filter)[None, :]
        flat = np.flatnonzero(ok)
        if not flat.shape[0]:
            output.append(np.zeros((0, 6), dtype=dtype))
            continue
        # Stable descending sort by conf truncated to max_nms, without sorting everything.
        flat = flat[_top_stable(cls_conf.reshape(-1)[flat], max_nms)]
        i, j = np.divmod(flat, nc)
        box = xywh2xyxy(x[i, :4])
        det = np.concatenate([box, cls_conf[i, j, None], j[:, None].astype(dtype)], axis=1)
        offset = det[:, 5:6] * dtype.type(0 if agnostic else max_wh)
        keep = _batched_nms(det[:, :4] + offset, det[:, 4], det[:, 5], iou_thres, max_det)
        output.append(det[keep])
    return output


# ---------------------------------------------------------------------------------------------
# Array-module generic box operations (numpy or jax.numpy, jit-able), in the operation order of
# the DETR-family `box_ops.py` (RT-DETR `src/zoo/rtdetr/box_ops.py`, torchvision `box_area`), so
# float32 results agree with torch to rounding. Formats: `cxcywh` = (centre x, centre y, width,
# height), `xyxy` = (x0, y0, x1, y1), in any unit (RT-DETR: normalised to the image, 0..1).
# When every array argument is a numpy array the result is numpy (host-side matching, data
# pipelines); otherwise (jax arrays, tracers under jit) it is a jax array. jax is imported only
# when a jax array is passed.


def array_module(*arrays):
    """`numpy` when every argument is an `np.ndarray`, else `jax.numpy` (jax arrays or tracers)."""
    if all(isinstance(a, np.ndarray) for a in arrays):
        return np
    import jax.numpy as jnp
    return jnp


def cxcywh_to_xyxy(x):
    """`[..., 4]` cxcywh -> `[..., 4]` xyxy (DETR `box_cxcywh_to_xyxy`); numpy or jax (see above)."""
    xp = array_module(x)
    cx, cy, w, h = (x[..., k] for k in range(4))
    return xp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(x):
    """`[..., 4]` xyxy -> `[..., 4]` cxcywh (DETR `box_xyxy_to_cxcywh`); numpy or jax."""
    xp = array_module(x)
    x0, y0, x1, y1 = (x[..., k] for k in range(4))
    return xp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes):
    """Area `[...]` of `[..., 4]` xyxy boxes (torchvision `box_area`: no clamping, so an inverted
    box has a negative area); numpy or jax."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def elementwise_box_iou_union(boxes1, boxes2):
    """(IoU, union) of broadcast-compatible `[..., 4]` xyxy boxes, each `[...]` (broadcast shape).

    A pair with zero union (two empty boxes) gives nan, as torch's division does.
    """
    xp = array_module(boxes1, boxes2)
    lt = xp.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = xp.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = xp.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter / union, union


def _giou_from_iou(boxes1, boxes2, iou, union):
    xp = array_module(boxes1, boxes2)
    lt = xp.minimum(boxes1[..., :2], boxes2[..., :2])
    rb = xp.maximum(boxes1[..., 2:], boxes2[..., 2:])
    wh = xp.clip(rb - lt, 0, None)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def elementwise_box_iou(boxes1, boxes2):
    """IoU of corresponding xyxy boxes: `[..., 4]` x `[..., 4]` (broadcast) -> `[...]`.

    Equals the diagonal of the pairwise `pairwise_box_iou` that DETR losses take, without the
    `[N, N]` matrix. numpy or jax.
    """
    return elementwise_box_iou_union(boxes1, boxes2)[0]


def elementwise_generalized_box_iou(boxes1, boxes2):
    """Generalized IoU (Rezatofighi et al. 2019) of corresponding xyxy boxes, `[..., 4]` x
    `[..., 4]` (broadcast) -> `[...]` in [-1, 1]: IoU - (C - U) / C with C the enclosing box's
    area. Equals `diag(pairwise_generalized_box_iou(a, b))` (DETR `generalized_box_iou`). Boxes
    must be well formed (x1 >= x0, y1 >= y0): the official function asserts it, this one does not
    check (it runs under jit); degenerate boxes give nan / inf. numpy or jax.
    """
    iou, union = elementwise_box_iou_union(boxes1, boxes2)
    return _giou_from_iou(boxes1, boxes2, iou, union)


def pairwise_box_iou(boxes1, boxes2):
    """Pairwise (IoU, union) of xyxy boxes (DETR `box_iou`, which also returns the union).

    Args:
      boxes1: `[N, 4]` xyxy.
      boxes2: `[M, 4]` xyxy.
    Returns:
      (iou `[N, M]`, union `[N, M]`) in the input dtype (numpy or jax). Unlike `box_iou` above
      (numpy, float64 accumulation, IoU only) this keeps the dtype and is jit-able.
    """
    return elementwise_box_iou_union(boxes1[:, None, :], boxes2[None, :, :])


def pairwise_generalized_box_iou(boxes1, boxes2):
    """Pairwise generalized IoU `[N, M]` of `[N, 4]` and `[M, 4]` xyxy boxes (DETR
    `generalized_box_iou`); requirements as `elementwise_generalized_box_iou`. numpy or jax."""
    return elementwise_generalized_box_iou(boxes1[:, None, :], boxes2[None, :, :])
