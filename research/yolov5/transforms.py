"""YOLOv5 (v7.0) style detection augmentations in numpy/cv2.

Conventions used throughout this module:

* images are ``uint8`` arrays of shape ``(H, W, 3)`` in RGB order;
* labels are ``float`` arrays of shape ``(n, 5)`` holding
  ``[class, x1, y1, x2, y2]`` in pixels of the image they accompany;
* every random decision is drawn from an explicit ``np.random.Generator``
  passed by the caller (never the global ``random`` / ``np.random`` state), so
  an example is reproducible from its seed.

The geometry and sampling follow the reference YOLOv5 v7.0 data code
(``load_image``, ``load_mosaic``, ``letterbox``, ``random_perspective``,
``box_candidates``, ``augment_hsv``, flips): same parameter ranges, same order
of random draws (with ``rng.uniform`` in place of ``random.uniform``), same
thresholds and the same pad value 114.  HSV works on RGB input with
``COLOR_RGB2HSV``, which yields the same HSV planes as the reference's BGR
conversion of the same picture.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import cv2
import numpy as np

from research.yolov5.hyp import AUGMENTATION_KEYS, HYP_SCRATCH_LOW

PAD_VALUE = 114

# Default augmentation hyper-parameters (hyp.scratch-low.yaml of YOLOv5 v7.0).
# hyp.scratch-low.yaml's augmentation values (research/yolov5/hyp.py)
DEFAULT_HYP: Mapping[str, float] = {k: HYP_SCRATCH_LOW[k] for k in AUGMENTATION_KEYS}

__all__ = [
    'PAD_VALUE', 'DEFAULT_HYP', 'load_image', 'scale_labels', 'letterbox',
    'letterbox_labels', 'random_perspective', 'box_candidates', 'mosaic_center', 'mosaic4',
    'load_mosaic', 'mixup', 'augment_hsv', 'hflip', 'vflip', 'xyxy_to_cxcywhn',
    'empty_labels',
]


def empty_labels() -> np.ndarray:
    """An empty ``(0, 5)`` float32 label array."""
    return np.zeros((0, 5), np.float32)


def _as_labels(labels) -> np.ndarray:
    if labels is None:
        return empty_labels()
    labels = np.asarray(labels, dtype=np.float32)
    return labels.reshape(-1, 5)


def load_image(img: np.ndarray, img_size: int, augment: bool):
    """Resizes so the long side equals ``img_size`` (reference ``load_image``).

    Uses INTER_LINEAR when augmenting or up-scaling and INTER_AREA for
    down-scaling otherwise; the new size is truncated with ``int`` as the
    reference (v7.0) does, but at least 1 px (an extreme aspect ratio such as
    2000 x 10 at 64 px would give 0 px, where the reference crashes in
    ``cv2.resize``).

    Returns:
      ``(img, (h0, w0), (h, w))``: resized image, original and new height/width.
    """
    h0, w0 = img.shape[:2]
    r = img_size / max(h0, w0)
    if r != 1:
        interp = cv2.INTER_LINEAR if (augment or r > 1) else cv2.INTER_AREA
        img = cv2.resize(img, (max(int(w0 * r), 1), max(int(h0 * r), 1)), interpolation=interp)
    return img, (h0, w0), img.shape[:2]


def scale_labels(labels, sx: float, sy: float, padw: float = 0.0,
                 padh: float = 0.0) -> np.ndarray:
    """Returns labels with x scaled by ``sx`` (+``padw``) and y by ``sy`` (+``padh``)."""
    out = _as_labels(labels).copy()
    out[:, [1, 3]] = out[:, [1, 3]] * sx + padw
    out[:, [2, 4]] = out[:, [2, 4]] * sy + padh
    return out


def letterbox(img: np.ndarray, new_shape=(640, 640), color=(PAD_VALUE,) * 3,
              auto: bool = False, scaleFill: bool = False,  # pylint: disable=invalid-name
              scaleup: bool = True, stride: int = 32):
    """Aspect-preserving resize into ``new_shape`` plus constant border.

    Args:
      img: HWC uint8 image.
      new_shape: int or (height, width) of the output (exact when ``auto`` is
        False).
      color: border value (114 grey as in YOLOv5).
      auto: pad only to the next multiple of ``stride`` (minimum rectangle).
      scaleFill: stretch to ``new_shape`` without padding.
      scaleup: allow enlarging; when False the image is only shrunk.
      stride: stride used by ``auto``.

    Returns:
      ``(img, (rw, rh), (dw, dh))``: output image, width/height gain and the
      (fractional) padding added on the left/top sides.  A point ``x`` of the
      input maps to ``x * rw + dw``.
    """
    h, w = img.shape[:2]
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    r = min(new_shape[0] / h, new_shape[1] / w)
    if not scaleup:
        r = min(r, 1.0)
    ratio = (r, r)
    unpad_w, unpad_h = max(int(round(w * r)), 1), max(int(round(h * r)), 1)  # >= 1 px (extreme aspect ratios)
    dw, dh = new_shape[1] - unpad_w, new_shape[0] - unpad_h
    if auto:
        dw, dh = np.mod(dw, stride), np.mod(dh, stride)
    elif scaleFill:
        dw, dh = 0.0, 0.0
        unpad_w, unpad_h = new_shape[1], new_shape[0]
        ratio = (new_shape[1] / w, new_shape[0] / h)
    dw /= 2
    dh /= 2
    if (w, h) != (unpad_w, unpad_h):
        img = cv2.resize(img, (unpad_w, unpad_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT,
                             value=tuple(int(c) for c in color))
    return img, ratio, (float(dw), float(dh))


def letterbox_labels(labels, ratio, pad) -> np.ndarray:
    """Maps pixel labels of the letterbox input onto its output."""
    return scale_labels(labels, ratio[0], ratio[1], pad[0], pad[1])


def box_candidates(box1, box2, wh_thr=2, ar_thr=100, area_thr=0.1, eps=1e-16):
    """Keeps boxes still worth training on after a geometric augmentation.

    ``box1`` (4, n) are the boxes before, ``box2`` (4, n) after augmentation
    (xyxy).  A box survives when it is wider and taller than ``wh_thr`` pixels,
    keeps more than ``area_thr`` of its (scale-adjusted) area and has an aspect
    ratio below ``ar_thr``.  Returns a boolean mask of length n.
    """
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1]
    w2, h2 = box2[2] - box2[0], box2[3] - box2[1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return ((w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr)
            & (ar < ar_thr))


def random_perspective(img: np.ndarray, labels, rng: np.random.Generator, *,
                       degrees: float = 10.0, translate: float = 0.1,
                       scale: float = 0.1, shear: float = 10.0,
                       perspective: float = 0.0, border=(0, 0)):
    """Random rotation/scale/shear/translation (+ optional perspective) warp.

    The output canvas is the input size grown by ``2 * border`` (border is
    (y, x); negative values crop, as used after mosaic).  Box corners are warped,
    re-boxed, clipped to the canvas and filtered with ``box_candidates``.

    Returns:
      ``(img, labels)`` with labels of the surviving boxes.
    """
    labels = _as_labels(labels)
    height = img.shape[0] + border[0] * 2
    width = img.shape[1] + border[1] * 2

    c_mat = np.eye(3)
    c_mat[0, 2] = -img.shape[1] / 2
    c_mat[1, 2] = -img.shape[0] / 2

    p_mat = np.eye(3)
    p_mat[2, 0] = rng.uniform(-perspective, perspective)
    p_mat[2, 1] = rng.uniform(-perspective, perspective)

    r_mat = np.eye(3)
    a = rng.uniform(-degrees, degrees)
    s = rng.uniform(1 - scale, 1 + scale)
    r_mat[:2] = cv2.getRotationMatrix2D(angle=a, center=(0, 0), scale=s)

    s_mat = np.eye(3)
    s_mat[0, 1] = math.tan(rng.uniform(-shear, shear) * math.pi / 180)
    s_mat[1, 0] = math.tan(rng.uniform(-shear, shear) * math.pi / 180)

    t_mat = np.eye(3)
    t_mat[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * width
    t_mat[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * height

    m = t_mat @ s_mat @ r_mat @ p_mat @ c_mat  # applied right to left
    if border[0] != 0 or border[1] != 0 or (m != np.eye(3)).any():
        fill = (PAD_VALUE,) * 3
        if perspective:
            img = cv2.warpPerspective(img, m, dsize=(width, height), borderValue=fill)
        else:
            img = cv2.warpAffine(img, m[:2], dsize=(width, height), borderValue=fill)

    n = len(labels)
    if n:
        xy = np.ones((n * 4, 3))
        # corners: (x1, y1), (x2, y2), (x1, y2), (x2, y1)
        xy[:, :2] = labels[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(n * 4, 2)
        xy = xy @ m.T
        if perspective:
            xy = xy[:, :2] / xy[:, 2:3]
        else:
            xy = xy[:, :2]
        xy = xy.reshape(n, 8)
        xs = xy[:, [0, 2, 4, 6]]
        ys = xy[:, [1, 3, 5, 7]]
        new = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)
        new[:, [0, 2]] = new[:, [0, 2]].clip(0, width)
        new[:, [1, 3]] = new[:, [1, 3]].clip(0, height)
        keep = box_candidates(box1=labels[:, 1:5].T * s, box2=new.T, area_thr=0.10)
        labels = labels[keep]
        labels[:, 1:5] = new[keep]
    return img, labels.astype(np.float32)


def mosaic_center(img_size: int, rng: np.random.Generator) -> tuple[int, int]:
    """Random mosaic centre ``(yc, xc)``, each ``int(U(s/2, 3s/2))`` (y first)."""
    border = -img_size // 2  # floor division as the reference mosaic_border
    yc = int(rng.uniform(-border, 2 * img_size + border))
    xc = int(rng.uniform(-border, 2 * img_size + border))
    return yc, xc


def mosaic4(samples: Sequence[tuple[np.ndarray, np.ndarray]], img_size: int,
            center: tuple[int, int]):
    """Tiles 4 (already ``load_image``-resized) samples around ``center``.

    The canvas is ``2s x 2s`` filled with 114; ``center`` is ``(yc, xc)`` in
    canvas pixels.  Sample 0 goes top-left of the centre, 1 top-right,
    2 bottom-left, 3 bottom-right, each cropped at the canvas edge.  Labels are
    shifted into canvas pixels and clipped to ``[0, 2s]``.

    Returns:
      ``(canvas, labels)``.
    """
    s = img_size
    yc, xc = int(center[0]), int(center[1])
    canvas = None
    all_labels = []
    for i, (img, labels) in enumerate(samples):
        h, w = img.shape[:2]
        if canvas is None:
            canvas = np.full((s * 2, s * 2, img.shape[2]), PAD_VALUE, dtype=np.uint8)
        if i == 0:
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b, x2b, y2b = w - (x2a - x1a), h - (y2a - y1a), w, h
        elif i == 1:
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, s * 2), yc
            x1b, y1b, x2b, y2b = 0, h - (y2a - y1a), min(w, x2a - x1a), h
        elif i == 2:
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(s * 2, yc + h)
            x1b, y1b, x2b, y2b = w - (x2a - x1a), 0, w, min(y2a - y1a, h)
        else:
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, s * 2), min(s * 2, yc + h)
            x1b, y1b, x2b, y2b = 0, 0, min(w, x2a - x1a), min(y2a - y1a, h)
        canvas[y1a:y2a, x1a:x2a] = img[y1b:y2b, x1b:x2b]
        all_labels.append(scale_labels(labels, 1.0, 1.0, x1a - x1b, y1a - y1b))
    labels4 = np.concatenate(all_labels, 0)
    np.clip(labels4[:, 1:], 0, 2 * s, out=labels4[:, 1:])
    return canvas, labels4


def load_mosaic(load_fn: Callable[[int], tuple[np.ndarray, np.ndarray]],
                index: int, num_items: int, img_size: int,
                rng: np.random.Generator, hyp: Mapping[str, float]):
    """YOLOv5 4-image mosaic followed by ``random_perspective``.

    Args:
      load_fn: ``i -> (img, labels)`` returning the ``load_image``-resized image
        of item ``i`` (long side ``img_size``) with pixel labels on it.
      index: the item this example is built around.
      num_items: number of items to draw the 3 extra ones from (uniformly, with
        replacement).
      img_size: network input size ``s``; the result is ``s x s``.
      rng: random generator.
      hyp: augmentation hyper-parameters (degrees, translate, scale, shear,
        perspective).

    Returns:
      ``(img, labels)`` of size ``s x s``.
    """
    s = img_size
    border = -s // 2
    center = mosaic_center(s, rng)  # drawn before the extra indices (reference)
    indices = [int(index)] + [int(i) for i in rng.integers(0, num_items, 3)]
    indices = [indices[i] for i in rng.permutation(4)]
    canvas, labels4 = mosaic4([load_fn(i) for i in indices], s, center)
    return random_perspective(
        canvas, labels4, rng,
        degrees=hyp.get('degrees', 0.0), translate=hyp.get('translate', 0.0),
        scale=hyp.get('scale', 0.0), shear=hyp.get('shear', 0.0),
        perspective=hyp.get('perspective', 0.0), border=(border, border))


def mixup(img: np.ndarray, labels: np.ndarray, img2: np.ndarray,
          labels2: np.ndarray, rng: np.random.Generator):
    """MixUp as YOLOv5: blend ratio r ~ Beta(32, 32), labels of both images kept."""
    r = rng.beta(32.0, 32.0)
    out = (img * r + img2 * (1 - r)).astype(np.uint8)
    return out, np.concatenate([labels, labels2], 0)


def augment_hsv(img: np.ndarray, rng: np.random.Generator, hgain=0.5,
                sgain=0.5, vgain=0.5) -> np.ndarray:
    """Random hue/saturation/value gains applied through lookup tables.

    Gains are ``1 + U(-1, 1) * gain`` per channel; hue wraps modulo 180 (OpenCV
    8-bit hue range), saturation and value saturate at 255.  Works in place on
    ``img`` (RGB uint8, must be writable) and also returns it.
    """
    if hgain or sgain or vgain:
        r = rng.uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1
        hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV))
        dtype = img.dtype
        x = np.arange(0, 256, dtype=r.dtype)
        lut_hue = ((x * r[0]) % 180).astype(dtype)
        lut_sat = np.clip(x * r[1], 0, 255).astype(dtype)
        lut_val = np.clip(x * r[2], 0, 255).astype(dtype)
        hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat),
                         cv2.LUT(val, lut_val)))
        cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=img)
    return img


def hflip(img: np.ndarray, labels):
    """Left-right flip of image and pixel labels."""
    labels = _as_labels(labels).copy()
    w = img.shape[1]
    x1 = labels[:, 1].copy()
    labels[:, 1] = w - labels[:, 3]
    labels[:, 3] = w - x1
    return np.ascontiguousarray(img[:, ::-1]), labels


def vflip(img: np.ndarray, labels):
    """Up-down flip of image and pixel labels."""
    labels = _as_labels(labels).copy()
    h = img.shape[0]
    y1 = labels[:, 2].copy()
    labels[:, 2] = h - labels[:, 4]
    labels[:, 4] = h - y1
    return np.ascontiguousarray(img[::-1]), labels


def xyxy_to_cxcywhn(boxes, w: int, h: int, clip: bool = True,
                    eps: float = 1e-3) -> np.ndarray:
    """Pixel xyxy -> normalized (cx, cy, w, h).

    With ``clip`` the corners are first clipped to ``[0, w - eps]`` x
    ``[0, h - eps]`` as the reference ``xyxy2xywhn(..., clip=True, eps=1e-3)``.
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
    if clip:
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, w - eps)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, h - eps)
    out = np.empty_like(b)
    out[:, 0] = (b[:, 0] + b[:, 2]) / 2 / w
    out[:, 1] = (b[:, 1] + b[:, 3]) / 2 / h
    out[:, 2] = (b[:, 2] - b[:, 0]) / w
    out[:, 3] = (b[:, 3] - b[:, 1]) / h
    return out.astype(np.float32)
