"""grain input pipeline: tfds array_record detection data -> fixed-shape numpy.

Data are read with ``tfds.builder(...).as_data_source(split)`` (array_record,
random access, no TensorFlow) and transformed with YOLOv5-style augmentation
(`research.data.transforms`).  One seeded order of the record positions is the
same in every process; global batch ``t`` is positions ``[t*B, (t+1)*B)`` of
it, and process ``p`` of ``P`` reads and augments slots ``[p*b, (p+1)*b)`` of
each (``b = B // P``, `GlobalBatchSampler`).  So 1 device, N devices and N
processes train on identical global batches, with identical augmentation
(per-record randomness is keyed by the global position).

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

A point of the original image maps to ``x * ratio + pad[0]``,
``y * ratio + pad[1]``; `boxes_to_original` inverts that.  With
``train=False`` and ``drop_remainder=False`` the split is padded with dummy
examples (``image_id == -1``, no valid boxes) up to a multiple of the global
batch so that every process yields the same number of full batches.

The returned ``grain.DataLoader`` gives checkpointable iterators:
``it.get_state()`` (JSON bytes) / ``it.set_state(state)``, or orbax with
``grain.checkpoint.CheckpointSave/CheckpointRestore``.

Per-example randomness comes from grain's per-record ``np.random.Generator``
(seeded from ``seed`` and the record position), so a given record position is
augmented identically whatever ``worker_count`` is.  Note that grain's
DataLoader deals whole batches round-robin to workers, so which positions end
up in which batch depends on ``worker_count``, and an iterator state can only
be restored into a loader with the same ``worker_count``.  With
``worker_count > 0`` grain spawns processes (a few seconds of start-up), and
the program's main module must be importable (``if __name__ == '__main__'``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

from absl import flags
from absl import logging
import cv2
import grain
import numpy as np
import tensorflow_datasets as tfds

from research.data import transforms as T

__all__ = ['prepare', 'make_detection_loader', 'DetectionSource',
           'TrainTransform', 'EvalTransform', 'boxes_to_original',
           'label_to_category_id']

_MAX_SUBSTITUTE_TRIES = 16
_warned_truncation = False


def _register_builders():
    # importing registers the builders with tfds
    from research.data import coco  # pylint: disable=g-import-not-at-top,unused-import
    from research.data import shapes  # pylint: disable=g-import-not-at-top,unused-import


def prepare(builder_name: str, data_dir: str, *, manual_dir: str | None = None,
            **builder_kwargs) -> tfds.core.DatasetBuilder:
    """Generates ``builder_name`` as array_record under ``data_dir`` if needed.

    Idempotent: returns at once when the dataset is already prepared.

    Args:
      builder_name: e.g. ``'shapes_detection'``, ``'shapes_detection/tiny'``,
        ``'coco_detection_local'``.
      data_dir: tfds data directory.
      manual_dir: folder with manually provided files (COCO builder).
      **builder_kwargs: passed to ``tfds.builder`` (e.g. ``config=...``).

    Returns:
      The prepared builder.
    """
    _register_builders()
    builder = tfds.builder(builder_name, data_dir=data_dir,
                           file_format='array_record', **builder_kwargs)
    if builder.is_prepared():
        return builder
    # Generated datasets are prepared on first use, possibly by several processes
    # at once (test workers, the processes of a multi-host run on one data_dir):
    # one prepares under a file lock, the others wait and then read its result.
    import filelock  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top
    os.makedirs(data_dir, exist_ok=True)
    config_name = builder.builder_config.name if builder.builder_config else 'default'
    lock = os.path.join(data_dir, f'.{builder.name}-{config_name}.lock')
    with filelock.FileLock(lock):
        builder = tfds.builder(builder_name, data_dir=data_dir,
                               file_format='array_record', **builder_kwargs)
        if not builder.is_prepared():
            logging.info('preparing %s in %s (first use)', builder.info.full_name, data_dir)
            download_config = None
            if manual_dir is not None:
                download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
            builder.download_and_prepare(download_config=download_config,
                                         file_format='array_record')
    return builder


def _decode_rgb(data) -> np.ndarray:
    if isinstance(data, np.ndarray) and data.ndim == 3:
        return data
    # the builders store pixels in the frame of the boxes: an EXIF orientation tag is not applied
    # again here (image headers give the same size, see `_record_size`)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if arr is None or arr.ndim != 3 or arr.size == 0:
        raise ValueError('image bytes could not be decoded')
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def _as_str(x) -> str:
    if isinstance(x, bytes):
        return x.decode('utf-8', 'replace')
    return str(x)


class DetectionSource:
    """Random-access source of decoded detection examples.

    Wraps a tfds array_record data source (opened lazily, so the object pickles
    cheaply into grain workers).  ``source[i]`` returns a dict with ``image``
    (uint8 HWC RGB), ``labels`` float32 (n, 5) ``[cls, x1, y1, x2, y2]`` in
    pixels (crowd boxes removed), ``image_id`` and ``filename``.  A record or
    image that fails to load is logged and replaced by another record (the next
    ones, deterministically).  Indices ``>= num_records`` (up to
    ``padded_length``) return ``{'pad': True}``.
    """

    def __init__(self, dataset_dir: str, split: str,
                 padded_length: int | None = None, image_cache=None):
        self._dataset_dir = str(dataset_dir)
        self._split = split
        self._ds = None
        self.num_records = len(self._open())
        self._length = max(int(padded_length or 0), self.num_records)
        # `image_cache.ImageCache`: images come decoded and resized from it (labels follow)
        self.image_cache = image_cache

    def _open(self):
        if self._ds is None:
            builder = tfds.builder_from_directory(self._dataset_dir)
            self._ds = builder.as_data_source(
                self._split, decoders={'image': tfds.decode.SkipDecoding()})
        return self._ds

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_ds'] = None
        return state

    def __len__(self) -> int:
        return self._length

    def __repr__(self):
        return (f'DetectionSource({self._dataset_dir!r}, {self._split!r}, '
                f'num_records={self.num_records}, length={self._length})')

    def _image(self, rec, i: int, use_cache: bool = True) -> np.ndarray:
        """Record i's image (uint8 HWC RGB), from the cache if there is one; ValueError naming the
        image otherwise."""
        try:
            if use_cache and self.image_cache is not None:
                return self.image_cache.get(i)
            return _decode_rgb(rec['image'])
        except Exception as e:  # pylint: disable=broad-except
            raise ValueError(f"image_id {int(rec.get('image_id', i))} "
                             f"{_as_str(rec.get('image/filename', ''))}: {e}") from e

    def decode_image(self, i: int) -> np.ndarray:
        """Record i's image decoded from its stored bytes (what the image cache is built from)."""
        return self._image(self._open()[i], i, use_cache=False)

    def _decode(self, i: int) -> dict[str, Any]:
        rec = self._open()[i]
        image_id = int(rec.get('image_id', i))
        filename = _as_str(rec.get('image/filename', ''))
        img = self._image(rec, i)
        h, w = img.shape[:2]
        obj = rec.get('objects', {})
        bbox = np.asarray(obj.get('bbox', []), np.float32).reshape(-1, 4)
        cls = np.asarray(obj.get('label', []), np.float32).reshape(-1)
        if 'is_crowd' in obj:
            keep = ~np.asarray(obj['is_crowd'], bool).reshape(-1)
            bbox, cls = bbox[keep], cls[keep]
        labels = np.stack([cls, bbox[:, 1] * w, bbox[:, 0] * h, bbox[:, 3] * w,
                           bbox[:, 2] * h], 1).astype(np.float32).reshape(-1, 5)
        return {'image': img, 'labels': labels, 'image_id': image_id,
                'filename': filename, 'index': i}

    def __getitem__(self, index) -> dict[str, Any]:
        i = int(index)
        if i >= self.num_records:
            return {'pad': True, 'index': i}
        n = self.num_records
        for k in range(_MAX_SUBSTITUTE_TRIES):
            j = (i + k) % n
            try:
                return self._decode(j)
            except Exception as e:  # pylint: disable=broad-except
                logging.warning('data: split %r record %d failed to load (%s); '
                                'substituting record %d', self._split, j, e,
                                (j + 1) % n)
        raise RuntimeError(f'{_MAX_SUBSTITUTE_TRIES} consecutive records of split '
                           f'{self._split!r} failed to load, starting at {i}')


def _record_size(rec) -> tuple[int, int]:
    """(width, height) of a record's image from its encoded header (no decoding)."""
    import io
    from PIL import Image
    data = rec['image']
    if isinstance(data, np.ndarray) and data.ndim == 3:
        return int(data.shape[1]), int(data.shape[0])
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def _open_records(dataset_dir: str, split: str):
    return tfds.builder_from_directory(str(dataset_dir)).as_data_source(
        split, decoders={'image': tfds.decode.SkipDecoding()})


def _sizes_and_records(dataset_dir: str, split: str):
    """Yields (index, record, (width, height) or the header's read error)."""
    ds = _open_records(dataset_dir, split)
    for i in range(len(ds)):
        rec = ds[i]
        try:
            yield i, rec, _record_size(rec)
        except Exception as e:  # pylint: disable=broad-except
            yield i, rec, e


@functools.lru_cache(maxsize=8)
def image_sizes(dataset_dir: str, split: str) -> np.ndarray:
    """[n, 2] (width, height) of every record's image; NaN where unreadable.

    Cached per split (read-only): rectangular evaluation asks at every evaluation.
    """
    out = np.full((0, 2), np.nan, np.float32)
    sizes = [s if isinstance(s, tuple) else (np.nan, np.nan)
             for _, _, s in _sizes_and_records(dataset_dir, split)]
    if sizes:  # unreadable ones: the loader reports and substitutes them
        out = np.asarray(sizes, np.float32)
    out.flags.writeable = False
    return out


def label_sizes(dataset_dir: str, split: str) -> tuple[np.ndarray, list]:
    """Image sizes and normalized label sizes of a split, without decoding images.

    Returns ``(shapes, wh)``: ``shapes`` [n, 2] (width, height) read from each
    encoded image's header, ``wh`` a list of [m, 2] normalized (w, h) per image
    (crowd boxes removed). Records whose image header cannot be read are skipped
    with a warning, as the loader does.
    """
    shapes, wh = [], []
    for i, rec, size in _sizes_and_records(dataset_dir, split):
        if not isinstance(size, tuple):
            logging.warning('data: split %r record %d (%s): image header unreadable '
                            '(%s); skipped for the anchor check', split, i,
                            _as_str(rec.get('image/filename', '')), size)
            continue
        obj = rec.get('objects', {})
        bbox = np.asarray(obj.get('bbox', []), np.float32).reshape(-1, 4)
        if 'is_crowd' in obj:
            bbox = bbox[~np.asarray(obj['is_crowd'], bool).reshape(-1)]
        shapes.append(size)
        wh.append(np.stack([bbox[:, 3] - bbox[:, 1], bbox[:, 2] - bbox[:, 0]], 1))
    return np.asarray(shapes, np.float32).reshape(-1, 2), wh


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
        _register_builders()
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
    rect_stride: int = 0, cache_images: bool = False) -> grain.DataLoader:
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
        (`research.data.image_cache`; the official ``--cache``).

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
        from research.data import image_cache  # pylint: disable=g-import-not-at-top
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
        order, shapes = rect_batch_shapes(image_sizes(str(builder.data_dir), split),
                                          batch_size, image_size, rect_stride)
        source = RectSource(source, order, shapes, batch_size)

    shard = grain.sharding.NoSharding()  # the sampler gives this process its slots
    sampler = GlobalBatchSampler(
        num_records=len(source), global_batch=batch_size,
        process_index=process_index, process_count=process_count,
        shuffle=shuffle, num_epochs=num_epochs, seed=int(seed))
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


class GlobalBatchSampler:
    """This process's slots of every global batch of one seeded global order.

    The global order is grain's `IndexSampler` without sharding (same seed, so
    the same in every process): position ``k`` holds a record key and its
    per-record generator (``Philox(seed + k)``).  Global batch ``t`` is
    positions ``[t*B, (t+1)*B)``; process ``p`` of ``P`` gets slots
    ``[p*b, (p+1)*b)`` of it, ``b = B // P``, as local positions
    ``t*b .. t*b + b - 1``.  The union over processes of each global batch is
    therefore the same records, in the same slots, with the same augmentation
    randomness, whatever the process count (a partial last global batch of a
    finite order is dropped).

    Raises:
      ValueError: ``global_batch`` is not divisible by ``process_count``.
    """

    def __init__(self, num_records: int, global_batch: int, process_index: int,
                 process_count: int, shuffle: bool, num_epochs: int | None,
                 seed: int):
        if global_batch % process_count:
            raise ValueError(f'global batch {global_batch} is not divisible by '
                             f'{process_count} processes')
        self._inner = grain.samplers.IndexSampler(
            num_records=num_records, shuffle=shuffle, num_epochs=num_epochs,
            seed=int(seed))
        self._global = int(global_batch)
        self._local = self._global // process_count
        self._offset = process_index * self._local
        total = len(self._inner)
        self._len = total if num_epochs is None else (
            total // self._global * self._local)

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        # grain stores the sampler's repr in iterator states and refuses another one
        return (f'GlobalBatchSampler(global_batch={self._global}, '
                f'local_batch={self._local}, offset={self._offset}, '
                f'inner={self._inner!r})')

    def global_position(self, index: int) -> int:
        """The global-order position of this process's local position ``index``."""
        return (index // self._local) * self._global + self._offset + (
            index % self._local)

    def __getitem__(self, index: int):
        if index < 0 or index >= self._len:
            raise IndexError(f'local position {index} out of [0, {self._len})')
        md = self._inner[self.global_position(index)]
        return grain.RecordMetadata(index=index, record_key=md.record_key,
                                    rng=md.rng)


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


def label_to_category_id(builder_or_dir) -> list[int] | None:
    """Contiguous label -> dataset category id table, or None for identity.

    Reads ``category_ids`` from the dataset metadata (written by
    `coco_detection_local`); synthetic datasets have none.
    """
    if isinstance(builder_or_dir, tfds.core.DatasetBuilder):
        builder = builder_or_dir
    else:
        builder = tfds.builder_from_directory(str(builder_or_dir))
    meta = builder.info.metadata
    if meta and 'category_ids' in meta:
        return [int(c) for c in meta['category_ids']]
    return None
