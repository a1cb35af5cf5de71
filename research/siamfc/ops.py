"""Host-side image operations of the SiamFC tracker, with the official `siamfc/ops.py` semantics.

These run in numpy / OpenCV on purpose. The official crop rounds the centre and size to whole
pixels, pads with the mean colour rounded to uint8 and resizes the uint8 patch with OpenCV's
fixed-point bilinear filter; a float bilinear sampler (`map_coordinates`, `grid_sample`,
`jax.image.resize`) differs by up to ~0.8 grey levels or half a pixel, which already moves
response peaks (golden_tracker README, "Sensitivity"). Likewise OpenCV's bicubic upsampling of
the responses is Keys a = -0.75 with clamped borders, not `jax.image.resize`'s a = -0.5.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

try:
    import cv2
except ImportError as e:  # pragma: no cover
    raise ImportError("the SiamFC tracker ops need OpenCV: pip install opencv-python-headless") from e


def crop_corners(center: np.ndarray, size: float) -> tuple[int, np.ndarray]:
    """Integer square patch around `center`, as the official `ops.crop_and_resize` places it.

    Args:
      center: `(y, x)` 0-based pixel coordinates (pixel i covers [i - 0.5, i + 0.5]).
      size: side in pixels; rounded half to even (Python `round`).

    Returns:
      `(size, corners)`: the rounded side and int64 `[y0, x0, y1, x1]` (end exclusive, unpadded
      image coordinates; may lie outside the image). The top-left corner is
      `round(center - (size - 1) / 2)`, half to even, so the sub-pixel part of the centre is lost.
    """
    size = round(float(size))
    top_left = np.round(np.asarray(center) - (size - 1) / 2)
    corners = np.concatenate([top_left, top_left + size]).astype(np.int64)
    return size, corners


def crop_and_resize(img: np.ndarray, center: np.ndarray, size: float, out_size: int,
                    border_value: Sequence[float] = (0, 0, 0),
                    interp: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Square crop around `center`, padded with `border_value` where it leaves the image, resized.

    Official `ops.crop_and_resize` (BORDER_CONSTANT): the image is padded on all four sides by the
    largest overhang (`cv2.copyMakeBorder`, which rounds `border_value` to the image dtype), the
    `round(size)` patch is cut and `cv2.resize`d to `out_size` with `interp`.

    Args:
      img: `[H, W, C]` image (uint8 RGB for the tracker; the resize then runs on uint8).
      center: `(y, x)` 0-based centre in pixels.
      size: patch side in pixels.
      out_size: output side in pixels.
      border_value: padding colour per channel (the tracker passes the first frame's mean colour).
      interp: OpenCV interpolation flag.

    Returns:
      `[out_size, out_size, C]` patch, same dtype as `img`.
    """
    size, corners = crop_corners(center, size)
    overhang = np.concatenate([-corners[:2], corners[2:] - np.asarray(img.shape[:2])])
    npad = max(0, int(overhang.max()))
    if npad > 0:
        img = cv2.copyMakeBorder(img, npad, npad, npad, npad, cv2.BORDER_CONSTANT,
                                 value=tuple(float(v) for v in border_value))
    y0, x0, y1, x1 = (corners + npad).tolist()
    return cv2.resize(img[y0:y1, x0:x1], (out_size, out_size), interpolation=interp)


def upsample_bicubic(maps: np.ndarray, out_size: int) -> np.ndarray:
    """`[N, h, w]` float32 maps -> `[N, out_size, out_size]` with `cv2.resize(..., INTER_CUBIC)`.

    OpenCV's bicubic: Keys kernel a = -0.75, half-pixel centres, border taps clamped, float32.
    """
    return np.stack([cv2.resize(np.ascontiguousarray(m), (out_size, out_size), interpolation=cv2.INTER_CUBIC)
                     for m in maps])


def hann_window(size: int) -> np.ndarray:
    """`[size, size]` float64 outer product of `np.hanning(size)`, normalised to sum 1."""
    w = np.outer(np.hanning(size), np.hanning(size))
    return w / w.sum()
