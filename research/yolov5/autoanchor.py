"""AutoAnchor: the official `utils/autoanchor.py` check, run on the host before training.

`check_anchors` measures how well the anchors fit the training labels: with the label sizes in
pixels at the training image size (each image scaled by a random 0.9-1.1), a label is
matchable by an anchor when neither side ratio exceeds `anchor_t` (hyp, 4.0). The best possible
recall (BPR) is the fraction of labels with at least one matchable anchor; above 0.98 the
anchors stay. Otherwise `kmean_anchors` computes new ones (k-means on whitened label sizes, then
1000 generations of a mutation search on the fitness `mean(best * (best > 1/thr))`), and they
replace the old ones only if their BPR is higher, as officially. Randomness comes from a numpy
Generator seeded by the config seed, so a run is repeatable (not bit-equal to torch's global RNG).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from absl import logging


def anchor_metrics(wh: np.ndarray, anchors: np.ndarray, thr: float) -> tuple[float, float]:
    """(best possible recall, anchors above threshold per label) of [N, 2] label sizes, [K, 2] anchors."""
    wh = np.asarray(wh, np.float32)
    k = np.asarray(anchors, np.float32).reshape(-1, 2)
    if len(wh) == 0:
        return 1.0, float(len(k))
    r = wh[:, None] / k[None]
    x = np.minimum(r, 1 / r).min(2)  # [N, K] ratio metric
    best = x.max(1)
    return float((best > 1 / thr).mean()), float((x > 1 / thr).sum(1).mean())


def label_sizes(shapes: np.ndarray, labels_wh: Sequence[np.ndarray], img_size: int,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """Label widths/heights in pixels of images letterboxed to `img_size` ([N, 2]).

    shapes: [n_images, 2] original (width, height); labels_wh: per image [m, 2] normalized sizes.
    With `rng`, each image is also scaled by U(0.9, 1.1) (check_anchors' augmentation).
    """
    shapes = np.asarray(shapes, np.float64).reshape(-1, 2)
    if len(shapes) != len(labels_wh):
        raise ValueError(f"{len(shapes)} image shapes but {len(labels_wh)} label arrays")
    scaled = img_size * shapes / np.maximum(shapes.max(1, keepdims=True), 1e-9)
    if rng is not None:
        scaled = scaled * rng.uniform(0.9, 1.1, size=(len(scaled), 1))
    parts = [np.asarray(lab, np.float64).reshape(-1, 2) * s for s, lab in zip(scaled, labels_wh)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 2), np.float32)


def kmean_anchors(wh0: np.ndarray, n: int, img_size: int, thr: float = 4.0, gen: int = 1000,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """[n, 2] anchors (pixels, small to large) evolved for label sizes wh0 [N, 2] (pixels)."""
    from scipy.cluster.vq import kmeans

    rng = np.random.default_rng(0) if rng is None else rng
    t = 1 / thr
    wh0 = np.asarray(wh0, np.float32).reshape(-1, 2)
    small = int((wh0 < 3.0).any(1).sum())
    if small:
        logging.warning("autoanchor: %d of %d labels are smaller than 3 pixels", small, len(wh0))
    wh = wh0[(wh0 >= 2.0).any(1)]

    def fitness(k):
        r = wh[:, None] / k[None]
        best = np.minimum(r, 1 / r).min(2).max(1)
        return float((best * (best > t)).mean())

    k = None
    if n <= len(wh):
        s = wh.std(0)
        s = np.where(s > 0, s, 1.0)
        # scipy's kmeans draws its initial centroids from numpy's global RNG: seed it from ours
        state = np.random.get_state()
        np.random.seed(int(rng.integers(2**31)))
        try:
            k = kmeans(wh / s, n, iter=30)[0] * s
        finally:
            np.random.set_state(state)
        if len(k) != n:  # k-means returns fewer centroids for too few distinct sizes
            k = None
    if k is None:
        logging.warning("autoanchor: k-means could not place %d anchors; starting from random sizes", n)
        k = np.sort(rng.random(n * 2)).reshape(n, 2) * img_size
    k = k.astype(np.float32)
    f, mp, sigma = fitness(k), 0.9, 0.1
    for _ in range(gen):
        v = np.ones(k.shape)
        while (v == 1).all():  # mutate until something changes
            v = ((rng.random(k.shape) < mp) * rng.random() * rng.standard_normal(k.shape) * sigma + 1).clip(0.3, 3.0)
        kg = (k * v).clip(min=2.0).astype(np.float32)
        fg = fitness(kg)
        if fg > f:
            f, k = fg, kg
    return k[np.argsort(k.prod(1))].astype(np.float32)


def check_anchors(shapes: np.ndarray, labels_wh: Sequence[np.ndarray], anchors_px: np.ndarray,
                  thr: float, img_size: int, seed: int = 0, gen: int = 1000) -> dict:
    """The official check: returns {'bpr', 'aat', 'anchors' [nl, na, 2] pixels, 'changed', ...}."""
    rng = np.random.default_rng(seed)
    anchors_px = np.asarray(anchors_px, np.float32)
    wh = label_sizes(shapes, labels_wh, img_size, rng)
    bpr, aat = anchor_metrics(wh, anchors_px, thr)
    report = {"bpr": bpr, "aat": aat, "labels": int(len(wh)), "anchors_before": anchors_px.tolist(),
              "anchors": anchors_px.tolist(), "changed": False}
    logging.info("autoanchor: %.2f anchors/target, best possible recall %.3f on %d labels", aat, bpr, len(wh))
    if bpr > 0.98 or len(wh) == 0:
        return report
    na = anchors_px.size // 2
    new = kmean_anchors(label_sizes(shapes, labels_wh, img_size), na, img_size, thr, gen, rng)
    new_bpr, new_aat = anchor_metrics(wh, new, thr)
    report.update(new_bpr=new_bpr, new_aat=new_aat)
    if new_bpr > bpr:
        # kmean_anchors sorts by area, so the order already follows the strides (check_anchor_order)
        report.update(anchors=new.reshape(anchors_px.shape).tolist(), changed=True)
        logging.info("autoanchor: new anchors, best possible recall %.3f -> %.3f", bpr, new_bpr)
    else:
        logging.info("autoanchor: evolved anchors were not better (%.3f); keeping the original ones", new_bpr)
    return report
