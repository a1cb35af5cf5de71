"""YOLOv5's data: its augmentation and batches on top of the shared detection records.

The shared layer (`research/data/`) gives the records (`pipeline.DetectionSource`: decoded RGB
images, normalised cxcywh boxes, labels) and the global-batch sampler; here is what is YOLOv5's,
as the official `utils/dataloaders.py` does it: mosaic (4 images), MixUp, random perspective,
HSV, flips and letterbox for training (`TrainTransform`), letterboxed evaluation batches
(`EvalTransform`), val.py's rectangular batches (`rect_batch_shapes`, `RectSource`), the image
cache (`image_cache.py`) and the loader that puts them together (`make_detection_loader`).

Batch layout (``S = image_size``, ``M = max_labels``, ``b`` local batch)::

  image     uint8   [b, S, S, 3]   RGB network input
  boxes     float32 [b, M, 4]      normalized (cx, cy, w, h) on the S x S input
  classes   int32   [b, M]
  valid     bool    [b, M]         False for padding rows
  image_id  int64   [b]            -1 for eval padding examples
  # eval (train=False) only:
  orig_hw   int32   [b, 2]         original (height, width)
  ratio     float32 [b]            gain original -> input pixels
  pad       float32 [b, 2]         (dw, dh) added on the left / top

A point of the original image maps to ``x * ratio + pad[0]``, ``y * ratio + pad[1]``;
`boxes_to_original` inverts that. With ``train=False`` and ``drop_remainder=False`` the split is
padded with dummy examples (``image_id == -1``, no valid boxes) up to a multiple of the global
batch so that every process yields the same number of full batches.

The returned ``grain.DataLoader`` gives checkpointable iterators: ``it.get_state()`` (JSON bytes)
/ ``it.set_state(state)``. Per-example randomness comes from grain's per-record generator keyed
by the record's global position, so a record is augmented identically whatever ``worker_count``
or process count is. Note that grain's DataLoader deals whole batches round-robin to workers, so
an iterator state can only be restored into a loader with the same ``worker_count``. With
``worker_count > 0`` grain spawns processes (a few seconds of start-up), and the program's main
module must be importable (``if __name__ == '__main__'``).
"""

from __future__ import annotations

import math
import os
from typing import Iterator, Mapping

from absl import flags
from absl import logging
import grain
import numpy as np
import tensorflow_datasets as tfds

from research.data import pipeline
from research.data.pipeline import DetectionSource, GlobalBatchSampler, image_sizes
from research.yolov5 import transforms as T

_warned_truncation = False


def rect_batch_shapes(sizes: np.ndarray, batch_size: int, image_size: int,
                      stride: int, pad: float = 0.5):
    """val.py's rectangular batches: (order, [n_batches, 2] (h, w) shapes).

    Images are sorted by aspect ratio h/w; each batch of ``batch_size`` gets the
    smallest stride-multiple shape that holds its most extreme ratio with the
    long side ``image_size`` (plus ``pad`` strides, as val.py: 672 for square
    640 images). Unreadable sizes count as square.
    """
    sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
    ar = np.where(np.isfinite(sizes).all(1) & (sizes[:, 0] > 0),
                  sizes[:, 1] / np.maximum(sizes[:, 0], 1e-9), 1.0)
    order = np.argsort(ar, kind='stable')
    ar = ar[order]
    nb = int(math.ceil(len(ar) / batch_size))
    shapes = np.ones((nb, 2))
    for i in range(nb):
        ari = ar[i * batch_size:(i + 1) * batch_size]
        mini, maxi = ari.min(), ari.max()
        if maxi < 1:
            shapes[i] = [maxi, 1]
        elif mini > 1:
            shapes[i] = [1, 1 / mini]
    shapes = (np.ceil(shapes * image_size / stride + pad).astype(int) * stride)
    return order, shapes


class RectSource:
    """A padded DetectionSource read in aspect-ratio order, each element tagged
    with its batch's letterbox shape (``rect_shape``)."""

    def __init__(self, source: DetectionSource, order, shapes, batch_size: int):
        self.source, self.order = source, np.asarray(order)
        self.shapes, self.batch_size = np.asarray(shapes), int(batch_size)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        i = int(index)
        j = int(self.order[i]) if i < len(self.order) else i
        ex = dict(self.source[j])
        ex['rect_shape'] = self.shapes[i // self.batch_size]
        return ex


def _pack(img: np.ndarray, labels_n: np.ndarray, image_id: int,
          max_labels: int) -> dict[str, np.ndarray]:
    """Fixed-size arrays from normalized (n, 5) [cls, cx, cy, w, h] labels."""
    global _warned_truncation
    n = len(labels_n)
    if n > max_labels:
        if not _warned_truncation:
            logging.warning('data: image %d has %d labels > max_labels=%d; extra '
                            'labels are dropped (warned once)', image_id, n,
                            max_labels)
            _warned_truncation = True
        labels_n = labels_n[:max_labels]
        n = max_labels
    boxes = np.zeros((max_labels, 4), np.float32)
    classes = np.zeros((max_labels,), np.int32)
    valid = np.zeros((max_labels,), bool)
    boxes[:n] = labels_n[:, 1:5]
    classes[:n] = labels_n[:, 0].astype(np.int32)
    valid[:n] = True
    return {'image': np.ascontiguousarray(img, dtype=np.uint8), 'boxes': boxes,
            'classes': classes, 'valid': valid,
            'image_id': np.int64(image_id)}


def _normalized(img, labels) -> np.ndarray:
    h, w = img.shape[:2]
    out = np.zeros((len(labels), 5), np.float32)
    if len(labels):
        out[:, 0] = labels[:, 0]
        out[:, 1:] = T.xyxy_to_cxcywhn(labels[:, 1:5], w, h, clip=True, eps=1e-3)
    return out


class TrainTransform(grain.transforms.RandomMap):
    """Mosaic / letterbox + random_perspective, HSV, flips (YOLOv5 order)."""

    def __init__(self, source: DetectionSource, image_size: int,
                 hyp: Mapping[str, float], max_labels: int):
        self.source = source
        self.image_size = int(image_size)
        self.hyp = {**T.DEFAULT_HYP, **dict(hyp or {})}
        self.max_labels = int(max_labels)
        if self.hyp.get('copy_paste', 0.0) > 0:
            raise ValueError(
                f"hyp copy_paste={self.hyp['copy_paste']}: copy-paste pastes object "
                'segments, and these datasets store boxes only; set it to 0')

    def _resized(self, ex):
        img, (h0, w0), (h, w) = T.load_image(ex['image'], self.image_size, True)
        return img, T.scale_labels(ex['labels'], w / w0, h / h0)

    def random_map(self, element, rng: np.random.Generator):
        hyp, s = self.hyp, self.image_size
        if element.get('pad'):
            raise ValueError('padding examples are only used for evaluation')
        if rng.random() < hyp['mosaic']:
            first = element

            def load_fn(j):
                return self._resized(first if j == first['index'] else self.source[j])

            img, labels = T.load_mosaic(load_fn, element['index'],
                                        self.source.num_records, s, rng, hyp)
            # MixUp with a second mosaic (official: only after a mosaic). No random
            # draw when mixup is 0, so recipes without it keep their augmentations.
            if hyp.get('mixup', 0.0) > 0 and rng.random() < hyp['mixup']:
                j = int(rng.integers(0, self.source.num_records))
                img2, labels2 = T.load_mosaic(lambda k: self._resized(self.source[k]),
                                              j, self.source.num_records, s, rng, hyp)
                img, labels = T.mixup(img, labels, img2, labels2, rng)
        else:
            img, labels = self._resized(element)
            img, ratio, pad = T.letterbox(img, s, auto=False, scaleup=True)
            labels = T.letterbox_labels(labels, ratio, pad)
            img, labels = T.random_perspective(
                img, labels, rng, degrees=hyp['degrees'],
                translate=hyp['translate'], scale=hyp['scale'], shear=hyp['shear'],
                perspective=hyp['perspective'])
        labels_n = _normalized(img, labels)
        img = np.ascontiguousarray(img)
        T.augment_hsv(img, rng, hgain=hyp['hsv_h'], sgain=hyp['hsv_s'],
                      vgain=hyp['hsv_v'])
        if rng.random() < hyp['flipud']:
            img = img[::-1]
            labels_n[:, 2] = 1 - labels_n[:, 2]
        if rng.random() < hyp['fliplr']:
            img = img[:, ::-1]
            labels_n[:, 1] = 1 - labels_n[:, 1]
        return _pack(img, labels_n, element['image_id'], self.max_labels)


class EvalTransform(grain.transforms.Map):
    """Resize long side to S (``load_image``) + letterbox, no augmentation."""

    def __init__(self, image_size: int, max_labels: int):
        self.image_size = int(image_size)
        self.max_labels = int(max_labels)

    def map(self, element):
        s = self.image_size
        shape = tuple(int(v) for v in element.get('rect_shape', (s, s)))  # (h, w)
        if element.get('pad'):
            out = _pack(np.full(shape + (3,), T.PAD_VALUE, np.uint8),
                        np.zeros((0, 5), np.float32), -1, self.max_labels)
            out.update(orig_hw=np.zeros((2,), np.int32), ratio=np.float32(1.0),
                       pad=np.zeros((2,), np.float32))
            return out
        img, (h0, w0), (h, w) = T.load_image(element['image'], s, False)
        labels = T.scale_labels(element['labels'], w / w0, h / h0)
        img, ratio, pad = T.letterbox(img, shape, auto=False, scaleup=False)
        labels = T.letterbox_labels(labels, ratio, pad)
        out = _pack(img, _normalized(img, labels), element['image_id'],
                    self.max_labels)
        out.update(orig_hw=np.array([h0, w0], np.int32),
                   # the reference maps back with gain (h / h0) * letterbox ratio
                   ratio=np.float32(ratio[0] * h / h0),
                   pad=np.array(pad, np.float32))
        return out


def _resolve_builder(builder_name_or_builder, data_dir):
    if isinstance(builder_name_or_builder, tfds.core.DatasetBuilder):
        builder = builder_name_or_builder
    else:
        pipeline.register_builders()
        builder = tfds.builder(builder_name_or_builder, data_dir=data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f'dataset {builder.name} is not prepared in {builder.data_dir}; call '
            'research.data.pipeline.prepare(...) first')
    return builder


def make_detection_loader(
    builder_name_or_builder, split: str, *, data_dir: str | None = None,
    image_size: int = 640, batch_size: int, train: bool,
    hyp: Mapping[str, float] | None = None, max_labels: int = 100,
    seed: int = 0, shuffle: bool | None = None, num_epochs: int | None = None,
    worker_count: int = 0, process_index: int | None = None,
    process_count: int | None = None, drop_remainder: bool | None = None,
    worker_buffer_size: int = 1, read_threads: int = 4,
    rect_stride: int = 0, cache_images: bool = False, start_batch: int = 0) -> grain.DataLoader:
    """Builds the grain DataLoader for one process.

    Args:
      builder_name_or_builder: tfds name (``'shapes_detection'``,
        ``'coco_detection_local'``, with optional ``/config``) or a builder.
      split: tfds split (slicing such as ``'train[:10%]'`` works).
      data_dir: tfds data dir (when a name is given).
      image_size: square network input size S.
      batch_size: GLOBAL batch size; each process yields
        ``batch_size // process_count``.
      train: augment (mosaic etc.) when True; letterbox only when False.
      hyp: augmentation hyper-parameters; missing keys default to
        `transforms.DEFAULT_HYP` (YOLOv5 hyp.scratch-low).
      max_labels: M, boxes per image kept (extra ones dropped, warned once).
      seed: shuffling and augmentation seed.
      shuffle: defaults to ``train``.
      num_epochs: None repeats forever.
      worker_count: grain worker processes (0 = in-process).
      process_index / process_count: default ``jax.process_index()`` /
        ``jax.process_count()``.
      drop_remainder: defaults to ``train``.  For ``train=False`` and
        ``drop_remainder=False`` the split is padded to full global batches.
      worker_buffer_size: batches prefetched per worker.
      read_threads: grain reader threads.
      rect_stride: evaluation only: > 0 gives val.py's rectangular batches
        (images in aspect-ratio order, each batch letterboxed to its own shape,
        a multiple of this stride); 0 = every image square ``image_size``.
      cache_images: training only: decoded, resized images come from a
        memory-mapped cache built once under the dataset folder
        (`research.yolov5.image_cache`; the official ``--cache``).

    Returns:
      ``grain.DataLoader``; ``iter(loader)`` supports ``get_state``/``set_state``.
    """
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ValueError(f'global batch_size {batch_size} is not divisible by '
                         f'process_count {process_count}')
    local_bs = batch_size // process_count
    shuffle = train if shuffle is None else shuffle
    drop_remainder = train if drop_remainder is None else drop_remainder

    if worker_count and not flags.FLAGS.is_parsed():
        # grain worker processes read absl flags; outside absl.app (scripts,
        # tests) they are unparsed, so accept their defaults
        flags.FLAGS.mark_as_parsed()

    builder = _resolve_builder(builder_name_or_builder, data_dir)
    source = DetectionSource(builder.data_dir, split)
    n = source.num_records
    if cache_images:
        if not train:
            raise ValueError('cache_images is for training loaders (evaluation maps boxes back '
                             'to the original images)')
        from research.yolov5 import image_cache  # pylint: disable=g-import-not-at-top
        index = image_cache.ensure(source, str(builder.data_dir), split, image_size)
        source.image_cache = image_cache.ImageCache(index)
    if not train and not drop_remainder:
        padded = int(math.ceil(n / batch_size)) * batch_size
        source = DetectionSource(builder.data_dir, split, padded_length=padded)
    elif n < batch_size:
        raise ValueError(f'split {split!r} has {n} examples < global batch '
                         f'{batch_size} with drop_remainder')

    if rect_stride:
        if train or process_count != 1 or drop_remainder:
            raise ValueError('rectangular batches are for single-process evaluation '
                             '(train=False, process_count=1, no drop_remainder)')
        if worker_count:
            # each grain worker batches its own share of the records, which would mix images of
            # rect batches of different shapes in one batch: read them in this process (threads)
            logging.info('data: rectangular evaluation batches are read in-process '
                         '(num_workers=%d ignored for them)', worker_count)
            worker_count = 0
        order, shapes = rect_batch_shapes(image_sizes(str(builder.data_dir), split),
                                          batch_size, image_size, rect_stride)
        source = RectSource(source, order, shapes, batch_size)

    shard = grain.sharding.NoSharding()  # the sampler gives this process its slots
    sampler = GlobalBatchSampler(
        num_records=len(source), global_batch=batch_size,
        process_index=process_index, process_count=process_count,
        shuffle=shuffle, num_epochs=num_epochs, seed=int(seed), start_batch=start_batch)
    if train:
        op = TrainTransform(source, image_size, hyp or {}, max_labels)
    else:
        op = EvalTransform(image_size, max_labels)
    return grain.DataLoader(
        data_source=source, sampler=sampler,
        operations=[op, grain.transforms.Batch(local_bs,
                                               drop_remainder=drop_remainder)],
        worker_count=worker_count, worker_buffer_size=worker_buffer_size,
        shard_options=shard,
        read_options=grain.ReadOptions(num_threads=read_threads,
                                       prefetch_buffer_size=max(2 * local_bs, 8)))



def boxes_to_original(boxes_xyxy, ratio, pad, orig_hw) -> np.ndarray:
    """Maps xyxy pixel boxes on the network input back to the original image.

    Args:
      boxes_xyxy: (..., 4) boxes in input pixels.
      ratio: scalar gain (batch field ``ratio``).
      pad: (dw, dh) (batch field ``pad``).
      orig_hw: (height, width) of the original image, for clipping.

    Returns:
      float32 (..., 4) boxes in original pixels, clipped to the image.
    """
    b = np.array(boxes_xyxy, np.float32, copy=True)
    b[..., [0, 2]] = (b[..., [0, 2]] - pad[0]) / ratio
    b[..., [1, 3]] = (b[..., [1, 3]] - pad[1]) / ratio
    b[..., [0, 2]] = b[..., [0, 2]].clip(0, orig_hw[1])
    b[..., [1, 3]] = b[..., [1, 3]].clip(0, orig_hw[0])
    return b


def images_from_folder(input_dir: str, size: int, limit: int) -> Iterator[tuple]:
    """(name, original RGB image, letterboxed uint8 [size, size, 3] input, ratio, (dw, dh)) per image
    file of `input_dir` (sorted, at most `limit`); unreadable files are skipped with a warning.

    Raises:
        FileNotFoundError: `input_dir` is not a folder.
    """
    import cv2
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"config.predict.input_dir not found: {input_dir}")
    files = sorted(f for f in os.listdir(input_dir) if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")))
    for f in files[:limit]:
        img = cv2.imread(os.path.join(input_dir, f), cv2.IMREAD_COLOR)
        if img is None:
            logging.warning("skipping unreadable image %s", os.path.join(input_dir, f))
            continue
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        lb, ratio, pad = T.letterbox(img, (size, size), auto=False)
        yield os.path.splitext(f)[0], img, lb, float(ratio[0]), tuple(float(p) for p in pad)


def split_images(dataset, split: str, size: int, limit: int) -> Iterator[tuple]:
    """As `images_from_folder`, for the first `limit` images of a dataset split."""
    source = DetectionSource(dataset.builder.data_dir, split)
    for i in range(min(limit, source.num_records)):
        img = source[i]["image"]
        lb, ratio, pad = T.letterbox(img, (size, size), auto=False)
        yield f"{split}_{i:04d}", img, lb, float(ratio[0]), tuple(float(p) for p in pad)


def loader(dataset, split: str, *, train: bool, batch_size: int, hyp, seed: int,
           iterator_state: dict | None = None, process_index: int | None = None,
           process_count: int | None = None, rect_stride: int = 0):
    """YOLOv5 batches of a `research.data.detection.DetectionData` split (its config's image size,
    label count, workers, image cache), resumable from a saved iterator state
    (`{"global_batches": n}`: the next batch is global batch n, whatever the process count)."""
    c = dataset.config
    dataset.check_split(split)
    hyp = {k: float(v) for k, v in dict(hyp).items()}

    def make(start_batch: int):
        return make_detection_loader(
            dataset.builder, split, image_size=c.image_size, batch_size=batch_size, train=train,
            hyp=hyp, max_labels=c.max_labels, seed=seed, num_epochs=None if train else 1,
            worker_count=c.num_workers, process_index=process_index, process_count=process_count,
            rect_stride=rect_stride, cache_images=bool(train and c.cache_images), start_batch=start_batch)
    return pipeline.ResumableLoader(make, iterator_state)
