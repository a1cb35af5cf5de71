"""Helpers shared by the SiamFC tests: a moving-square video and the tiny synthetic dataset."""

from __future__ import annotations

import functools
import tempfile

import numpy as np


def moving_square(n: int = 16, size: int = 160, side: int = 28, start=(30, 40), step=(5, 3), seed: int = 0):
    """`n` uint8 RGB frames `[n, size, size, 3]` of a textured square moving `step` (dx, dy) px per
    frame over a smooth noisy background, and its `[n, 4]` boxes `[x, y, w, h]` (1-based x, y)."""
    import cv2
    rng = np.random.default_rng(seed)
    bg = cv2.resize(rng.uniform(40, 120, (8, 8, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:side, 0:side]
    tex = np.where(((yy // 7 + xx // 7) % 2)[..., None] == 1, [250, 230, 20], [200, 20, 200]).astype(np.float32)
    frames, boxes = [], []
    for t in range(n):
        img = bg + rng.normal(0, 4, bg.shape)
        x0, y0 = start[0] + step[0] * t, start[1] + step[1] * t
        img[y0:y0 + side, x0:x0 + side] = tex
        frames.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
        boxes.append([x0 + 1, y0 + 1, side, side])
    return np.stack(frames), np.asarray(boxes, np.float64)


@functools.lru_cache(maxsize=None)
def tiny_data() -> tuple[str, object]:
    """(data_dir, builder) of the `tiny` synthetic videos, prepared once per test process."""
    from research.siamfc import data
    d = tempfile.mkdtemp(prefix="siamfc_tfds_")
    return d, data.prepare("synthetic", d, config="tiny")
