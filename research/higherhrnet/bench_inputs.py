"""Deterministic benchmark inputs shared by our benchmark spec (`research/higherhrnet/benchmark.py`) and the official
PyTorch runner (`research/higherhrnet/official_torch.py`), so both time the same maps and batches. numpy only (the
official runner's interpreter may have no JAX).

  planted_maps   aggregated test maps of one image with planted people: what the grouping (NMS, top-k, matching,
                 adjust, refine) works on, channels-last
  train_batch    a training batch in our loader's layout (`research/higherhrnet/task.py`): images, heatmaps, masks and
                 associative-embedding joints of planted people at both output resolutions
"""

from __future__ import annotations

import numpy as np

from research.higherhrnet import targets


def _people(rng: np.random.Generator, size: float, num_people: int, num_joints: int) -> np.ndarray:
    """[P, J, 3] joints (x, y, v=2) of people spread over a size x size image, each within a box of ~size/4."""
    centres = rng.uniform(0.12 * size, 0.88 * size, (num_people, 1, 2))
    offsets = rng.normal(0.0, 0.07 * size, (num_people, num_joints, 2))
    xy = np.clip(centres + offsets, 0, size - 1)
    return np.concatenate([xy, np.full((num_people, num_joints, 1), 2.0)], axis=2)


def planted_maps(size: int = 512, num_joints: int = 17, num_people: int = 12, seed: int = 0,
                 noise: float = 0.04) -> tuple[np.ndarray, np.ndarray]:
    """Aggregated maps of one crowded image, as `inference.aggregate_outputs` gives them (flip test, project2image).

    Each person's joints are Gaussian peaks (sigma 2 px, height 0.3-0.95) over uniform noise in [0, `noise`); tags are
    the person's embedding (1.5 units apart between people) plus N(0, 0.05) near its joints, N(0, 1) elsewhere, for the
    image and its mirror (T = 2).

    Returns:
      heatmaps float32 [size, size, J], tags float32 [size, size, J, 2].
    """
    rng = np.random.default_rng(seed)
    joints = _people(rng, size, num_people, num_joints)
    heat = rng.uniform(0.0, noise, (size, size, num_joints)).astype(np.float32)
    tags = rng.normal(0.0, 1.0, (size, size, num_joints, 2)).astype(np.float32)
    yy, xx = np.mgrid[-6:7, -6:7]
    g = np.exp(-(xx ** 2 + yy ** 2) / 8.0)
    for p, person in enumerate(joints):
        emb = 1.5 * p
        for j, (x, y, _) in enumerate(person):
            xi, yi = int(x), int(y)
            x0, x1, y0, y1 = max(xi - 6, 0), min(xi + 7, size), max(yi - 6, 0), min(yi + 7, size)
            patch = rng.uniform(0.3, 0.95) * g[y0 - yi + 6:y1 - yi + 6, x0 - xi + 6:x1 - xi + 6]
            heat[y0:y1, x0:x1, j] = np.maximum(heat[y0:y1, x0:x1, j], patch)
            tags[y0:y1, x0:x1, j] = emb + rng.normal(0.0, 0.05, (y1 - y0, x1 - x0, 2))
    return heat, tags


def train_batch(batch_size: int, input_size: int, num_joints: int = 17, num_people: int = 4,
                max_people: int = 30, seed: int = 0) -> dict:
    """A synthetic training batch with the official targets (`targets.make_targets`) of planted people.

    Returns:
      image uint8 [B, S, S, 3]; heatmaps_i float32 [B, R_i, R_i, J]; mask_i float32 [B, R_i, R_i] (ones);
      joints_i int32 [B, P, J, 2] for R = (S / 4, S / 2).
    """
    rng = np.random.default_rng(seed)
    sizes = (input_size // 4, input_size // 2)
    out: dict = {"image": rng.integers(0, 256, (batch_size, input_size, input_size, 3)).astype(np.uint8)}
    exs = []
    for _ in range(batch_size):
        joints = _people(rng, input_size, num_people, num_joints)
        js = [joints * np.array([r / input_size, r / input_size, 1.0]) for r in sizes]
        masks = [np.ones((r, r), np.float32) for r in sizes]
        exs.append(targets.make_targets(js, masks, sizes, num_joints, max_people, 2.0))
    for k in exs[0]:
        out[k] = np.stack([e[k] for e in exs])
    return out
