"""RT-DETR's data transforms (official `configs/rtdetr/include/dataloader.yml`), in numpy + PIL.

The official train pipeline (torchvision `transforms.v2` on PIL images, `rtdetr_pytorch/src/data/transforms.py`):

  RandomPhotometricDistort(p=0.5) -> RandomZoomOut(fill=0) -> RandomIoUCrop(p=0.8) ->
  SanitizeBoundingBox(min_size=1) -> RandomHorizontalFlip -> Resize([S, S]) -> ToImageTensor ->
  ConvertDtype -> SanitizeBoundingBox(min_size=1) -> ConvertBox(cxcywh, normalize=True)

and the validation pipeline `Resize([S, S]) -> ToImageTensor -> ConvertDtype` (a plain stretch, no letterbox:
boxes normalised to the image are unchanged by it). Each step here follows the torchvision v2 semantics
(parameters drawn in the same order, the same integer rounding of sizes and offsets, the same PIL colour
operations and bilinear resize), with the randomness taken from one `numpy.random.Generator` per record
(grain's per-record rng), so a record's augmentation depends only on (seed, global position) and not on the
worker or process count. The draws differ from torch's (another generator); the distributions are the same.

Boxes inside the pipeline are xyxy in pixels of the current image, `[n, 4]` float32, with `[n]` int labels.
The packed output has fixed shapes (`S` image size, `M` max_labels):

  image   uint8   [S, S, 3]   RGB (the model divides by 255: official ConvertDtype)
  boxes   float32 [M, 4]      cxcywh normalised to the image (official ConvertBox(cxcywh, normalize=True))
  classes int32   [M]
  valid   bool    [M]         False for padding rows
  image_id int64
  orig_size int32 [2]         (width, height) of the original image (official `orig_size`, the post-processor's
                              `orig_target_sizes`)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from absl import logging
from PIL import Image, ImageEnhance

# torchvision v2 defaults of the ops the official config uses with their defaults.
PHOTOMETRIC = dict(brightness=(0.875, 1.125), contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=(-0.05, 0.05))
ZOOM_OUT_SIDE_RANGE = (1.0, 4.0)
IOU_CROP = dict(min_scale=0.3, max_scale=1.0, min_aspect_ratio=0.5, max_aspect_ratio=2.0,
                sampler_options=(0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0), trials=40)
# RandomIoUCrop's `while True` ends when the 'leave as is' option (1.0) is drawn; this many option draws
# without success (probability (6/7)^1000 ~ 1e-67) is treated as that option, so a record can never hang.
_MAX_IOU_CROP_OPTIONS = 1000
_warned_truncation = False


def photometric_distort(img: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """torchvision v2 `RandomPhotometricDistort(p)` on a uint8 RGB image (PIL colour operations, as the
    official pipeline runs it on PIL images).

    Each of brightness, contrast, saturation, hue is applied with probability p, with a factor uniform in its
    range; contrast comes first or after hue (a fair coin); with probability p the channels are permuted.
    """
    params = {}
    for key in ("brightness", "contrast", "saturation", "hue"):
        lo, hi = PHOTOMETRIC[key]
        params[key] = float(rng.uniform(lo, hi)) if rng.random() < p else None
    contrast_before = bool(rng.random() < 0.5)
    perm = rng.permutation(3) if rng.random() < p else None
    im = Image.fromarray(img)
    if params["brightness"] is not None:
        im = ImageEnhance.Brightness(im).enhance(params["brightness"])
    if params["contrast"] is not None and contrast_before:
        im = ImageEnhance.Contrast(im).enhance(params["contrast"])
    if params["saturation"] is not None:
        im = ImageEnhance.Color(im).enhance(params["saturation"])
    if params["hue"] is not None:
        im = adjust_hue(im, params["hue"])
    if params["contrast"] is not None and not contrast_before:
        im = ImageEnhance.Contrast(im).enhance(params["contrast"])
    out = np.asarray(im)
    if perm is not None:
        out = out[..., perm]
    return np.ascontiguousarray(out)


def adjust_hue(im: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision's PIL `adjust_hue`: the HSV hue channel (uint8) shifted by hue_factor * 255, wrapping."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor {hue_factor} is not in [-0.5, 0.5]")
    h, s, v = im.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    with np.errstate(over="ignore"):
        np_h += np.uint8(np.int64(hue_factor * 255) % 256)
    h = Image.fromarray(np_h, "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def zoom_out(img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, p: float = 0.5,
             side_range: Sequence[float] = ZOOM_OUT_SIDE_RANGE, fill: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """torchvision v2 `RandomZoomOut(fill, side_range, p)`: with probability p the image is placed at a random
    offset on a `fill` canvas `r` times its size (r uniform in side_range); boxes move with it."""
    if rng.random() >= p:
        return img, boxes
    h, w = img.shape[:2]
    r = side_range[0] + rng.random() * (side_range[1] - side_range[0])
    cw, ch = int(w * r), int(h * r)
    u = rng.random(2)
    left, top = int((cw - w) * u[0]), int((ch - h) * u[1])
    canvas = np.full((ch, cw, 3), fill, np.uint8)
    canvas[top:top + h, left:left + w] = img
    return canvas, boxes + np.array([left, top, left, top], np.float32)


def _iou_with(boxes: np.ndarray, box: Sequence[float]) -> np.ndarray:
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    a2 = (box[2] - box[0]) * (box[3] - box[1])
    wh = np.clip(np.minimum(boxes[:, 2:], box[2:]) - np.maximum(boxes[:, :2], box[:2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (area + a2 - inter)


def iou_crop(img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, p: float = 0.8,
             **options) -> tuple[np.ndarray, np.ndarray]:
    """Official `RandomIoUCrop(p)` (torchvision v2 `RandomIoUCrop` applied with probability p).

    Draws a minimum IoU from the sampler options (1.0 = leave as is); then up to `trials` crops of scale
    U[min_scale, max_scale] per side with aspect ratio in range, at a uniform offset; a crop is taken when some
    box centre lies strictly inside it and one such box has IoU >= the minimum with it. The image is cropped,
    boxes are shifted and clamped to the crop, and boxes whose centre is outside become all-zero (degenerate:
    the following `sanitize` drops them). Without any box no crop qualifies until 1.0 is drawn.
    """
    if rng.random() >= p:
        return img, boxes
    o = {**IOU_CROP, **options}
    h, w = img.shape[:2]
    cx = 0.5 * (boxes[:, 0] + boxes[:, 2])
    cy = 0.5 * (boxes[:, 1] + boxes[:, 3])
    for _ in range(_MAX_IOU_CROP_OPTIONS):
        min_iou = o["sampler_options"][int(rng.integers(0, len(o["sampler_options"])))]
        if min_iou >= 1.0:
            return img, boxes
        for _ in range(o["trials"]):
            r = o["min_scale"] + (o["max_scale"] - o["min_scale"]) * rng.random(2)
            new_w, new_h = int(w * r[0]), int(h * r[1])
            if new_h == 0 or not o["min_aspect_ratio"] <= new_w / new_h <= o["max_aspect_ratio"]:
                continue
            r = rng.random(2)
            left, top = int((w - new_w) * r[0]), int((h - new_h) * r[1])
            right, bottom = left + new_w, top + new_h
            if left == right or top == bottom:
                continue
            inside = (left < cx) & (cx < right) & (top < cy) & (cy < bottom)
            if not inside.any():
                continue
            if _iou_with(boxes[inside], (left, top, right, bottom)).max() < min_iou:
                continue
            out = boxes - np.array([left, top, left, top], np.float32)
            out[:, 0::2] = out[:, 0::2].clip(0, new_w)
            out[:, 1::2] = out[:, 1::2].clip(0, new_h)
            out[~inside] = 0
            return img[top:bottom, left:right], out
    return img, boxes


def sanitize(boxes: np.ndarray, labels: np.ndarray, image_hw: tuple[int, int],
             min_size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """torchvision v2 `SanitizeBoundingBox(min_size)`: keeps boxes with width and height >= min_size pixels,
    no negative coordinate and x <= W, y <= H; their labels follow."""
    h, w = image_hw
    ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (ws >= min_size) & (hs >= min_size) & (boxes >= 0).all(-1)
    keep &= (boxes[:, 0] <= w) & (boxes[:, 2] <= w) & (boxes[:, 1] <= h) & (boxes[:, 3] <= h)
    return boxes[keep], labels[keep]


def hflip(img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flip of the image and its xyxy pixel boxes."""
    w = img.shape[1]
    out = boxes.copy()
    out[:, 0], out[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    return np.ascontiguousarray(img[:, ::-1]), out


def resize(img: np.ndarray, boxes: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """torchvision v2 `Resize([S, S])` on a PIL image: bilinear (PIL, antialiased when shrinking) to S x S;
    boxes scale by S / W and S / H."""
    h, w = img.shape[:2]
    if (h, w) != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    if boxes is not None:
        boxes = boxes * np.array([size / w, size / h, size / w, size / h], np.float32)
    return img, boxes


def pack(img: np.ndarray, boxes_xyxy: np.ndarray, labels: np.ndarray, image_id: int, orig_wh: Sequence[int],
         max_labels: int) -> dict[str, np.ndarray]:
    """Fixed-shape example: boxes (xyxy pixels of `img`) -> normalised cxcywh, padded to max_labels (extra
    boxes dropped, warned once)."""
    global _warned_truncation
    h, w = img.shape[:2]
    n = len(boxes_xyxy)
    if n > max_labels:
        if not _warned_truncation:
            logging.warning("rtdetr data: image %d has %d boxes > max_labels %d; extra boxes dropped "
                            "(raise config.data.max_labels)", image_id, n, max_labels)
            _warned_truncation = True
        boxes_xyxy, labels, n = boxes_xyxy[:max_labels], labels[:max_labels], max_labels
    b = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
    cxcywh = np.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                       (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], -1)
    out_boxes = np.zeros((max_labels, 4), np.float32)
    out_boxes[:n] = cxcywh
    classes = np.zeros((max_labels,), np.int32)
    classes[:n] = labels
    valid = np.zeros((max_labels,), bool)
    valid[:n] = True
    return {"image": np.ascontiguousarray(img, np.uint8), "boxes": out_boxes, "classes": classes, "valid": valid,
            "image_id": np.int64(image_id), "orig_size": np.asarray(orig_wh, np.int32)}


def split_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DetectionSource labels `[n, 5]` (cls, x1, y1, x2, y2 pixels) -> (boxes float32 [n, 4], classes int32 [n])."""
    labels = np.asarray(labels, np.float32).reshape(-1, 5)
    return labels[:, 1:5].copy(), labels[:, 0].astype(np.int32)


def train_transform(img: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *,
                    image_size: int, photometric_p: float = 0.5, zoom_out_p: float = 0.5,
                    zoom_out_side_range: Sequence[float] = ZOOM_OUT_SIDE_RANGE, iou_crop_p: float = 0.8,
                    flip_p: float = 0.5, min_size: float = 1.0):
    """The official train pipeline (module docstring) up to the normalised boxes.

    Args:
      img: uint8 [H, W, 3] RGB; boxes: [n, 4] xyxy pixels; labels: [n] int; rng: the record's generator.
    Returns:
      (image uint8 [S, S, 3], boxes xyxy pixels of it [k, 4], labels [k]).
    """
    img = photometric_distort(img, rng, photometric_p)
    img, boxes = zoom_out(img, boxes, rng, zoom_out_p, zoom_out_side_range)
    img, boxes = iou_crop(img, boxes, rng, iou_crop_p)
    boxes, labels = sanitize(boxes, labels, img.shape[:2], min_size)
    if rng.random() < flip_p:
        img, boxes = hflip(img, boxes)
    img, boxes = resize(img, boxes, image_size)
    boxes, labels = sanitize(boxes, labels, img.shape[:2], min_size)
    return img, boxes, labels


def check_boxes(boxes: np.ndarray, image_hw: tuple[int, int], what: str) -> None:
    """Raises ValueError naming `what` when a box is not finite, inverted or outside the image by > 1 px."""
    h, w = image_hw
    if len(boxes) == 0:
        return
    bad = ~np.isfinite(boxes).all(-1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    bad |= (boxes[:, :2] < -1).any(-1) | (boxes[:, 2] > w + 1) | (boxes[:, 3] > h + 1)
    if bad.any():
        raise ValueError(f"{what}: box {boxes[np.argmax(bad)].tolist()} is not inside the {w}x{h} image")
