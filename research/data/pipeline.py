"""The shared data layer: tfds builders prepared on first use, detection records, global batches.

  prepare(name, data_dir)      generates a registered tfds builder's array_record files if needed
                               (under a file lock: several processes may start at once)
  DetectionSource              random access to a detection split (``as_data_source``, no
                               TensorFlow): decoded RGB uint8 images (EXIF-independent), boxes as
                               normalised cxcywh with class labels, image ids; a corrupt image is
                               logged with its record and replaced by the next readable one
  image_sizes / label_sizes    header-only sizes of a split (no image decoding)
  GlobalBatchSampler           one seeded order of the records, the same in every process; global
                               batch ``t`` is positions ``[t*B, (t+1)*B)``, process ``p`` of ``P``
                               reads and augments slots ``[p*b, (p+1)*b)`` (``b = B // P``), with
                               per-record randomness keyed by the global position; so 1 device, N
                               devices and N processes train on identical global batches
  label_to_category_id         contiguous label -> dataset category id

Each network builds its own transforms and loader on these (YOLOv5: `research/yolov5/data.py`).
"""

from __future__ import annotations

import functools
from typing import Any

from absl import logging
import cv2
import grain
import numpy as np
import tensorflow_datasets as tfds


__all__ = ['prepare', 'DetectionSource', 'GlobalBatchSampler', 'image_sizes',
           'label_sizes', 'ground_truth', 'label_to_category_id']

_MAX_SUBSTITUTE_TRIES = 16


def register_builders():
    """Imports the shared builder modules, which registers them with tfds."""
    # importing registers the builders with tfds
    from research.data import coco  # pylint: disable=g-import-not-at-top,unused-import
    from research.data import shapes  # pylint: disable=g-import-not-at-top,unused-import


def prepare(builder_name: str, data_dir: str, *, manual_dir: str | None = None,
            **builder_kwargs) -> tfds.core.DatasetBuilder:
    """Generates ``builder_name`` as array_record under ``data_dir`` if needed.

    Idempotent: returns at once when the dataset is already prepared. A builder that validates
    a user's folder (a `validation` collector, `research.data.validation`) has its problems
    written next to the prepared data (`validation_report.json`).

    Args:
      builder_name: e.g. ``'shapes_detection'``, ``'shapes_detection/tiny'``,
        ``'coco_detection_local'``.
      data_dir: tfds data directory.
      manual_dir: folder with manually provided files (COCO builder).
      **builder_kwargs: passed to ``tfds.builder`` (e.g. ``config=...``).

    Returns:
      The prepared builder.
    """
    register_builders()
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
            # what the builder's validation pass found, kept next to the data it describes
            collector = getattr(builder, 'validation', None)
            if collector is not None:
                from research.data import validation  # pylint: disable=g-import-not-at-top
                validation.write(collector.problems, os.path.join(os.fspath(builder.data_dir),
                                                                  validation.REPORT_FILE))
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


@functools.lru_cache(maxsize=8)
def ground_truth(dataset_dir: str, split: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Every record's boxes, uncapped, for scoring: image_id -> (classes [n] int64, xyxy [n, 4]
    float64 in original-image pixels), crowd boxes removed; read without decoding images.

    Loaders cap the boxes per image (`max_labels`) for training; scoring must see them all.
    Records whose image header cannot be read are left out (the loader substitutes them too).
    """
    out = {}
    for i, rec, size in _sizes_and_records(dataset_dir, split):
        if not isinstance(size, tuple):
            continue
        w, h = size
        obj = rec.get('objects', {})
        bbox = np.asarray(obj.get('bbox', []), np.float64).reshape(-1, 4)
        cls = np.asarray(obj.get('label', []), np.int64).reshape(-1)
        if 'is_crowd' in obj:
            keep = ~np.asarray(obj['is_crowd'], bool).reshape(-1)
            bbox, cls = bbox[keep], cls[keep]
        xyxy = np.stack([bbox[:, 1] * w, bbox[:, 0] * h, bbox[:, 3] * w, bbox[:, 2] * h], 1).reshape(-1, 4)
        out[int(rec.get('image_id', i))] = (cls, xyxy)
    return out


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
    finite order is dropped). ``start_batch`` starts at global batch ``t``: a
    run resumed after ``t`` steps continues the same sequence on any number of
    processes.

    Raises:
      ValueError: ``global_batch`` is not divisible by ``process_count``.
    """

    def __init__(self, num_records: int, global_batch: int, process_index: int,
                 process_count: int, shuffle: bool, num_epochs: int | None,
                 seed: int, start_batch: int = 0):
        if global_batch % process_count:
            raise ValueError(f'global batch {global_batch} is not divisible by '
                             f'{process_count} processes')
        self._inner = grain.samplers.IndexSampler(
            num_records=num_records, shuffle=shuffle, num_epochs=num_epochs,
            seed=int(seed))
        self._global = int(global_batch)
        self._local = self._global // process_count
        self._offset = process_index * self._local
        self._start = int(start_batch)
        total = len(self._inner)
        self._len = total if num_epochs is None else max(
            total // self._global - self._start, 0) * self._local

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        # grain stores the sampler's repr in iterator states and refuses another one
        return (f'GlobalBatchSampler(global_batch={self._global}, '
                f'local_batch={self._local}, offset={self._offset}, '
                f'start_batch={self._start}, inner={self._inner!r})')

    def global_position(self, index: int) -> int:
        """The global-order position of this process's local position ``index``."""
        return (self._start + index // self._local) * self._global + self._offset + (
            index % self._local)

    def __getitem__(self, index: int):
        if index < 0 or index >= self._len:
            raise IndexError(f'local position {index} out of [0, {self._len})')
        md = self._inner[self.global_position(index)]
        return grain.RecordMetadata(index=index, record_key=md.record_key,
                                    rng=md.rng)


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


class ResumableLoader:
    """A training loader whose position is the number of global batches consumed.

    `make_loader(start_batch)` builds the loader that starts at global batch `start_batch` (for
    example over a `GlobalBatchSampler(..., start_batch=start_batch)`); `iter()` gives an
    iterator whose `get_state()` is `{"global_batches": n}`, so a run resumed on any number of
    processes (or grain workers) reads global batch `n` next. A grain iterator state saved by an
    older checkpoint (same process count and workers only) is restored as grain stores it.
    """

    def __init__(self, make_loader, state: dict | None):
        self.make_loader, self.state = make_loader, dict(state or {})

    def __iter__(self):
        if "global_batches" in self.state or not self.state:
            start = int(self.state.get("global_batches", 0))
            return _CountingIterator(iter(self.make_loader(start)), start)
        it = iter(self.make_loader(0))  # a grain state from before global-batch positions
        it.set_state(self.state["bytes"].encode("latin-1") if "bytes" in self.state else self.state)
        return it


class _CountingIterator:
    def __init__(self, it, start: int):
        self.it, self.count = it, start

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.count += 1
        return batch

    def get_state(self) -> dict:
        return {"global_batches": self.count}

    def close(self) -> None:
        """Stops the wrapped iterator's grain workers and frees their shared memory."""
        close_iterator(self.it)


def close_iterator(it) -> None:
    """Stops a loader iterator's worker processes and unlinks the shared memory of the batches
    they had prepared but nobody read, so a run that ends (or fails) mid-epoch leaves nothing
    behind (Python's `resource_tracker` otherwise reports leaked shared_memory objects at exit).

    Accepts grain `DatasetIterator`s (their `close()`), grain `DataLoader` iterators (which wrap
    one without exposing `close()` in grain 0.2), our wrappers and plain iterators (no-op).
    """
    close = getattr(it, "close", None)
    if close is None:
        inner = getattr(it, "_iterator", None)  # grain.DataLoaderIterator
        close = getattr(inner, "close", None)
    if close is not None:
        close()


class closing_iterator:  # noqa: N801 (used like contextlib.closing)
    """`with closing_iterator(loader) as it:` iterates `loader` and closes the iterator (its grain
    workers and their shared memory) when the block ends, normally or by an exception."""

    def __init__(self, iterable):
        self.it = iter(iterable)

    def __enter__(self):
        return self.it

    def __exit__(self, *exc):
        close_iterator(self.it)
        return False
