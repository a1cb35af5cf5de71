"""Decoded, resized training images in one memory-mapped file (train.py's `--cache`).

The official loader can keep every training image, decoded and resized so its long side is
the training size (`load_image`), in RAM. Here the same arrays are written once into a flat
uint8 file beside the dataset's array_record files, and every reader (the main process and
grain's worker processes) maps it read-only: the OS page cache keeps it in memory when it fits
and shares it between the processes, and nothing is decoded again on later runs.

Layout, in ``<dataset_dir>/image_cache/``: ``<split>_s<size>.u8`` (images, row after row) and
``<split>_s<size>.json`` (per record: byte offset, height, width; offset -1 where the image
failed to decode, so the loader reports and substitutes it as without a cache). The index is
written last, both through a temporary name and a rename, so a half-written cache is never
read. The cached arrays equal what the loader computes without the cache (tested).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import uuid

from absl import logging
import numpy as np

from research.yolov5 import transforms as T

_CHUNK = 256  # images decoded at a time (bounds the memory of the threaded build)


def cache_paths(dataset_dir: str, split: str, image_size: int) -> tuple[str, str]:
    name = re.sub(r'[^A-Za-z0-9_.-]+', '_', split) + f'_s{int(image_size)}'
    base = os.path.join(str(dataset_dir), 'image_cache', name)
    return base + '.u8', base + '.json'


def _load_resized(source, i: int, image_size: int):
    """(uint8 image as the training transform resizes it, or None if it cannot be decoded)."""
    try:
        img = source.decode_image(i)
    except Exception as e:  # pylint: disable=broad-except
        return None, str(e)
    return T.load_image(img, image_size, True)[0], None


def ensure(source, dataset_dir: str, split: str, image_size: int) -> str:
    """Builds the cache of `split` at `image_size` unless a complete one exists; returns its index."""
    data_path, index_path = cache_paths(dataset_dir, split, image_size)
    n = source.num_records
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                meta = json.load(f)
            # a data file of another size (truncated, replaced) would give wrong images: rebuild
            if meta['num_records'] == n and os.path.getsize(data_path) == meta['bytes']:
                return index_path
        except (OSError, ValueError, KeyError, TypeError):
            pass
        logging.warning('image cache %s does not match split %r (%d records) or its data file %s; '
                        'rebuilding', index_path, split, n, data_path)
    folder = os.path.dirname(data_path)
    os.makedirs(folder, exist_ok=True)
    # upper bound: every image with its long side at image_size
    need = n * image_size * image_size * 3
    free = shutil.disk_usage(folder).free
    if need > free:
        raise OSError(f'image cache for split {split!r} needs up to {need / 2**30:.1f} GiB in {folder}, '
                      f'only {free / 2**30:.1f} GiB free: free space, point config.data.data_dir '
                      'elsewhere or set config.data.cache_images=False')
    logging.info('caching %d decoded %d px images of split %r in %s (up to %.1f GiB)', n,
                 image_size, split, data_path, need / 2**30)
    tag = uuid.uuid4().hex[:8]
    tmp_data, tmp_index = f'{data_path}.{tag}.tmp', f'{index_path}.{tag}.tmp'
    entries, offset = [], 0
    try:
        with open(tmp_data, 'wb') as out, concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for start in range(0, n, _CHUNK):
                ids = range(start, min(start + _CHUNK, n))
                for i, (img, err) in zip(ids, pool.map(lambda j: _load_resized(source, j, image_size), ids)):
                    if img is None:
                        entries.append([-1, 0, 0])
                        logging.warning('image cache: split %r record %d not cached (%s)', split, i, err)
                        continue
                    img = np.ascontiguousarray(img, np.uint8)
                    out.write(img.tobytes())
                    entries.append([offset, img.shape[0], img.shape[1]])
                    offset += img.nbytes
        with open(tmp_index, 'w') as f:
            json.dump({'num_records': n, 'image_size': int(image_size), 'bytes': offset,
                       'records': entries}, f)
        os.replace(tmp_data, data_path)
        os.replace(tmp_index, index_path)
    finally:
        for p in (tmp_data, tmp_index):
            if os.path.exists(p):
                os.remove(p)
    logging.info('image cache %s: %.2f GiB', data_path, offset / 2**30)
    return index_path


class ImageCache:
    """Read-only view of a cache; pickles as its paths (each grain worker maps the file itself)."""

    def __init__(self, index_path: str):
        self.index_path = index_path
        self.data_path = index_path[:-len('.json')] + '.u8'
        with open(index_path) as f:
            meta = json.load(f)
        self.image_size = int(meta['image_size'])
        self.records = np.asarray(meta['records'], np.int64).reshape(-1, 3)
        self._data = None

    def __getstate__(self):
        return {**self.__dict__, '_data': None}

    def __len__(self) -> int:
        return len(self.records)

    def get(self, i: int) -> np.ndarray:
        """The cached image of record i (a private copy); ValueError where it failed to decode."""
        offset, h, w = (int(v) for v in self.records[i])
        if offset < 0:
            raise ValueError('image could not be decoded when the cache was built')
        if self._data is None:
            self._data = np.memmap(self.data_path, np.uint8, 'r') if os.path.getsize(self.data_path) else \
                np.zeros(0, np.uint8)
        return np.array(self._data[offset:offset + h * w * 3]).reshape(h, w, 3)
