"""RT-DETR's input pipeline: the shared detection datasets through grain, with RT-DETR's own transforms.

The datasets are the shared tfds builders (`research/data/`): the embedded `shapes_detection` (the builder
config chosen from `config.data` sizes, as `research.data.detection.DetectionData` does) and
`coco_detection_local` for a local COCO folder. Records are read with `research.data.pipeline.DetectionSource`
(decoded RGB image, `[n, 5]` cls + xyxy pixel labels, image_id), batched with
`research.data.pipeline.GlobalBatchSampler` (one seeded global order: every process reads its slots of the
same global batches, with per-record randomness keyed by the global position, so 1 or N processes see identical
batches and augmentation) and a grain `DataLoader`. The training loader's position is the number of global
batches consumed (`research.data.pipeline.ResumableLoader` over `GlobalBatchSampler(start_batch=...)`), so a run
resumes on any process count.
The transforms are RT-DETR's (`research/rtdetr/transforms.py`); the batch layout is documented there
(`image` uint8 [b, S, S, 3], `boxes` cxcywh [b, M, 4], `classes`, `valid`, `image_id`, `orig_size` (w, h)).

Evaluation batches (train=False) are the whole split in order, padded to full global batches with examples of
`image_id == -1` (no boxes), as the shared evaluation loader does.
"""

from __future__ import annotations

import math
from typing import Mapping

import grain
import numpy as np

from research.data import pipeline
from research.rtdetr import transforms as T


class TrainTransform(grain.transforms.RandomMap):
    """Official train transforms on one DetectionSource record, randomness from grain's per-record rng."""

    def __init__(self, image_size: int, max_labels: int, aug: Mapping[str, float]):
        self.image_size, self.max_labels = int(image_size), int(max_labels)
        self.aug = {k: (tuple(v) if isinstance(v, (list, tuple)) else float(v)) for k, v in dict(aug).items()}

    def random_map(self, element, rng: np.random.Generator):
        if element.get("pad"):
            raise ValueError("padding examples are only used for evaluation")
        img = element["image"]
        h0, w0 = img.shape[:2]
        boxes, labels = T.split_labels(element["labels"])
        T.check_boxes(boxes, (h0, w0), f"image_id {element['image_id']} {element.get('filename', '')}")
        img, boxes, labels = T.train_transform(img, boxes, labels, rng, image_size=self.image_size, **self.aug)
        return T.pack(img, boxes, labels, element["image_id"], (w0, h0), self.max_labels)


class EvalTransform(grain.transforms.Map):
    """Official val transform (Resize([S, S])); padding records become empty examples with image_id -1."""

    def __init__(self, image_size: int, max_labels: int):
        self.image_size, self.max_labels = int(image_size), int(max_labels)

    def map(self, element):
        s = self.image_size
        if element.get("pad"):
            return T.pack(np.zeros((s, s, 3), np.uint8), np.zeros((0, 4), np.float32), np.zeros((0,), np.int32), -1,
                          (s, s), self.max_labels)
        img = element["image"]
        h0, w0 = img.shape[:2]
        boxes, labels = T.split_labels(element["labels"])
        T.check_boxes(boxes, (h0, w0), f"image_id {element['image_id']} {element.get('filename', '')}")
        img, boxes = T.resize(img, boxes, s)
        return T.pack(img, boxes, labels, element["image_id"], (w0, h0), self.max_labels)


def make_loader(builder, split: str, *, image_size: int, batch_size: int, train: bool, max_labels: int,
                seed: int = 0, aug: Mapping[str, float] | None = None, worker_count: int = 0,
                process_index: int | None = None, process_count: int | None = None,
                read_threads: int = 4, start_batch: int = 0) -> grain.DataLoader:
    """This process's grain DataLoader over `split` of a prepared tfds `builder`.

    Args:
      builder: a prepared tfds builder (`research.data.pipeline.prepare`).
      split: tfds split name.
      image_size: S, the square network input.
      batch_size: GLOBAL batch size (each process yields batch_size // process_count).
      train: official train transforms, shuffled, repeated forever, incomplete last batch dropped; else the val
        transform over the split once, in order, padded to full global batches.
      max_labels: M, boxes per image kept.
      seed: order and augmentation seed.
      aug: keyword arguments of `transforms.train_transform` (probabilities, zoom-out range).
      worker_count: grain worker processes (0 = in-process).
      process_index / process_count: default jax's.
      start_batch: training: begin at this global batch (the resume position, the same on any process count).

    Raises:
      ValueError: batch_size not divisible by process_count, or a training split smaller than one batch.
    """
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by process_count {process_count}")
    if worker_count:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain workers read absl flags; outside absl.app accept the defaults
            flags.FLAGS.mark_as_parsed()
    source = pipeline.DetectionSource(builder.data_dir, split)
    n = source.num_records
    if train:
        if n < batch_size:
            raise ValueError(f"split {split!r} has {n} examples < global batch {batch_size}")
        op = TrainTransform(image_size, max_labels, aug or {})
    else:
        source = pipeline.DetectionSource(builder.data_dir, split,
                                          padded_length=int(math.ceil(n / batch_size)) * batch_size)
        op = EvalTransform(image_size, max_labels)
    sampler = pipeline.GlobalBatchSampler(num_records=len(source), global_batch=batch_size,
                                          process_index=process_index, process_count=process_count, shuffle=train,
                                          num_epochs=None if train else 1, seed=int(seed),
                                          start_batch=int(start_batch))
    local = batch_size // process_count
    return grain.DataLoader(
        data_source=source, sampler=sampler,
        operations=[op, grain.transforms.Batch(local, drop_remainder=train)],
        worker_count=worker_count, shard_options=grain.sharding.NoSharding(),
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * local, 8)))
