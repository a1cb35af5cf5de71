"""`shapes_detection`: a synthetic, embedded object-detection dataset (tfds).

Every image is rendered deterministically from ``(config.seed, split, index)``
with numpy + OpenCV (no download, no manual files): 1..6 filled shapes of
``CLASS_NAMES`` with random size (about 8..60 % of the image side, log-uniform),
rotation and colour on a flat / gradient / noise / stripes background.  Shapes
may overlap, but a new shape is only accepted while every earlier one keeps at
least ``MIN_VISIBLE_FRACTION`` of its pixels, and each box is the tight
pixel-edge box of the object's *visible* pixels, so boxes always enclose
exactly the pixels of that object's colour.  Shapes are drawn without
anti-aliasing, so a shape's pixels carry exactly its colour.

Records are written by tfds (``file_format='array_record'`` recommended, for
random access through ``as_data_source``); images are PNG-encoded here with
OpenCV so that generation needs no TensorFlow.

Example::

  from research.data import pipeline, shapes
  pipeline.prepare('shapes_detection', data_dir)            # default 128 px
  pipeline.prepare('shapes_detection', data_dir,
                   config=shapes.ShapesConfig(name='s64', image_size=64))
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
import tensorflow_datasets as tfds

from research.data import _tfds_compat

CLASS_NAMES = ('circle', 'square', 'triangle', 'star', 'ellipse', 'cross')
BACKGROUNDS = ('flat', 'gradient', 'noise', 'stripes')
SPLIT_CODES = {'train': 0, 'validation': 1}
MIN_VISIBLE_FRACTION = 0.6
MIN_SIZE_FRACTION = 0.08
MAX_SIZE_FRACTION = 0.60
_MIN_COLOR_DISTANCE = 110  # L1 distance in RGB from background colours
_SUBPIXEL_SHIFT = 4  # cv2.fillPoly fractional bits

__all__ = ['CLASS_NAMES', 'ShapesConfig', 'ShapesDetection', 'render_example',
           'encode_png']


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Parameters of a `shapes_detection` variant.

    Attributes:
      image_size: square image side in pixels.
      num_train: number of train images.
      num_validation: number of validation images.
      seed: base seed; image ``i`` of split ``s`` uses ``(seed, s, i)``.
      min_objects: minimum shapes per image.
      max_objects: maximum shapes per image.
    """
    image_size: int = 128
    num_train: int = 2000
    num_validation: int = 200
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 6


def _regular_points(n: int, radius: float, phase: float) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], 1)


def _rotate(pts: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _shape_polygon(label: int, size: float, rng: np.random.Generator):
    """Polygon (k, 2) of shape ``CLASS_NAMES[label]`` centred on the origin."""
    name = CLASS_NAMES[label]
    r = size / 2
    if name == 'circle':
        return _regular_points(96, r, 0.0)
    if name == 'ellipse':
        pts = _regular_points(96, 1.0, 0.0)
        pts = pts * np.array([r, r * rng.uniform(0.35, 0.65)])
        return _rotate(pts, rng.uniform(0, np.pi))
    if name == 'square':
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * (r / 1.2)
        return _rotate(pts, rng.uniform(0, np.pi / 2))
    if name == 'triangle':
        jitter = rng.uniform(-0.25, 0.25, 3)
        t = rng.uniform(0, 2 * np.pi) + 2 * np.pi * (np.arange(3) + jitter) / 3
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if name == 'star':
        outer = _regular_points(5, r, rng.uniform(0, 2 * np.pi))
        inner_r = r * rng.uniform(0.38, 0.5)
        phase = math.atan2(outer[0, 1], outer[0, 0]) + np.pi / 5
        inner = _regular_points(5, inner_r, phase)
        return np.stack([outer, inner], 1).reshape(10, 2)
    if name == 'cross':
        a = r / 1.1
        t = a * rng.uniform(0.22, 0.38)
        pts = np.array([[-t, -a], [t, -a], [t, -t], [a, -t], [a, t], [t, t],
                        [t, a], [-t, a], [-t, t], [-a, t], [-a, -t], [-t, -t]])
        return _rotate(pts, rng.uniform(0, np.pi / 2))
    raise ValueError(name)


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.int64)


def _background(size: int, rng: np.random.Generator):
    """Returns (uint8 image, list of reference colours, background kind)."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    c0, c1 = _random_color(rng), _random_color(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == 'flat':
        img = np.broadcast_to(c0, (size, size, 3))
        refs = [c0]
    elif kind == 'gradient':
        theta = rng.uniform(0, 2 * np.pi)
        proj = xx * math.cos(theta) + yy * math.sin(theta)
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
        img = c0 * (1 - t[..., None]) + c1 * t[..., None]
        refs = [c0, c1, (c0 + c1) // 2]
    elif kind == 'noise':
        sigma = rng.uniform(6, 20)
        noise = rng.normal(0, sigma, (size, size, 3))
        img = c0 + noise
        refs = [c0]
    else:  # stripes
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(4, max(size / 5, 6))
        proj = xx * math.cos(theta) + yy * math.sin(theta)
        on = (np.floor(proj / (period / 2)) % 2).astype(bool)
        img = np.where(on[..., None], c1, c0)
        refs = [c0, c1]
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img), refs, kind


def _pick_color(rng, refs, used):
    best, best_d = None, -1
    for _ in range(64):
        c = _random_color(rng)
        d = min(int(np.abs(c - r).sum()) for r in refs)
        d_used = min((int(np.abs(c - u).sum()) for u in used), default=999)
        score = min(d, 2 * d_used)
        if d >= _MIN_COLOR_DISTANCE and d_used >= _MIN_COLOR_DISTANCE // 2:
            return c
        if score > best_d:
            best, best_d = c, score
    return best


def render_example(config: ShapesConfig, split: str, index: int) -> dict:
    """Renders image ``index`` of ``split`` deterministically.

    Returns:
      dict with ``image`` uint8 (S, S, 3) RGB, ``labels`` int64 (n,),
      ``boxes`` float32 (n, 4) pixel-edge ``[x1, y1, x2, y2]`` (tight box of the
      visible pixels: x2/y2 are one past the last pixel), ``colors`` uint8
      (n, 3), ``instance_map`` int16 (S, S) with the object index owning each
      pixel (-1 = background) and ``background`` (kind name).
    """
    size = int(config.image_size)
    rng = np.random.default_rng(
        [int(config.seed), SPLIT_CODES.get(split, 7), int(index)])
    img, refs, kind = _background(size, rng)
    img = img.copy()
    n_target = int(rng.integers(config.min_objects, config.max_objects + 1))
    owner = np.full((size, size), -1, np.int16)
    full_area, visible, labels, colors = [], [], [], []
    mask = np.zeros((size, size), np.uint8)
    lo, hi = math.log(MIN_SIZE_FRACTION), math.log(MAX_SIZE_FRACTION)
    attempts = 0
    while len(labels) < n_target and attempts < 20 * n_target:
        attempts += 1
        label = int(rng.integers(len(CLASS_NAMES)))
        extent = size * math.exp(rng.uniform(lo, hi))
        pts = _shape_polygon(label, extent, rng)
        mn, mx = pts.min(0), pts.max(0)
        span = mx - mn
        if (span > size - 1).any():
            continue
        off = np.array([rng.uniform(-mn[0], size - mx[0]),
                        rng.uniform(-mn[1], size - mx[1])])
        pts = pts + off
        mask[:] = 0
        fixed = np.round(pts * (1 << _SUBPIXEL_SHIFT)).astype(np.int32)
        cv2.fillPoly(mask, [fixed], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_SHIFT)
        new = mask.astype(bool)
        area = int(new.sum())
        if area < 12:
            continue
        if labels:
            covered = np.bincount(owner[new] + 1, minlength=len(labels) + 1)[1:]
            after = np.array(visible) - covered
            if (after < MIN_VISIBLE_FRACTION * np.array(full_area)).any():
                continue
            visible = list(after)
        color = _pick_color(rng, refs, colors)
        k = len(labels)
        owner[new] = k
        img[new] = color.astype(np.uint8)
        labels.append(label)
        colors.append(color)
        full_area.append(area)
        visible.append(area)
    boxes = np.zeros((len(labels), 4), np.float32)
    for k in range(len(labels)):
        ys, xs = np.nonzero(owner == k)
        boxes[k] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return {
        'image': img,
        'labels': np.asarray(labels, np.int64),
        'boxes': boxes,
        'colors': np.asarray(colors, np.uint8).reshape(-1, 3),
        'instance_map': owner,
        'background': kind,
    }


def encode_png(img_rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image (OpenCV, no TensorFlow)."""
    ok, buf = cv2.imencode('.png', np.ascontiguousarray(img_rgb[..., ::-1]))
    if not ok:
        raise RuntimeError('PNG encoding failed')
    return buf.tobytes()


class ShapesDetection(_tfds_compat.SourceFileCodePath,
                      tfds.core.GeneratorBasedBuilder):
    """Synthetic shapes detection dataset (generated, no download)."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    BUILDER_CONFIGS = [
        ShapesConfig(name='default', description='128x128, 2000 train / 200 val'),
        ShapesConfig(name='tiny', image_size=64, num_train=128,
                     num_validation=32, description='64x64, for smoke tests'),
    ]
    DEFAULT_CONFIG_NAME = 'default'

    def _info(self) -> tfds.core.DatasetInfo:
        s = int(self.builder_config.image_size)
        return self.dataset_info_from_configs(
            description='Synthetic coloured shapes on varied backgrounds.',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(s, s, 3), encoding_format='png'),
                'image_id': np.int64,
                'objects': tfds.features.Sequence({
                    'bbox': tfds.features.BBoxFeature(),
                    'label': tfds.features.ClassLabel(names=CLASS_NAMES),
                }),
            }),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        return {
            'train': self._generate_examples('train', cfg.num_train),
            'validation': self._generate_examples('validation', cfg.num_validation),
        }

    def _generate_examples(self, split: str, num: int):
        cfg = self.builder_config
        s = float(cfg.image_size)
        for i in range(int(num)):
            ex = render_example(cfg, split, i)
            b = ex['boxes']
            bbox = np.stack([b[:, 1] / s, b[:, 0] / s, b[:, 3] / s, b[:, 2] / s],
                            1).astype(np.float32).reshape(-1, 4)
            yield i, {
                'image': encode_png(ex['image']),
                'image_id': i,
                'objects': {'bbox': bbox, 'label': ex['labels']},
            }
