"""Detection datasets by config name (`shapes`, `coco`): builder, loaders, ground truth."""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
from absl import logging

from research.data import pipeline
from research.data import transforms as T

DATASETS = ("shapes", "coco")


class _ResumableLoader:
    """`iter()` gives a grain iterator positioned at a saved state (if any)."""

    def __init__(self, loader, state: dict | None):
        self.loader, self.state = loader, state

    def __iter__(self):
        it = iter(self.loader)
        if self.state:
            it.set_state(self.state["bytes"].encode("latin-1") if "bytes" in self.state else self.state)
        return it


class DetectionData:
    """The dataset named by `config.data` (a ConfigDict with name, data_dir, manual_dir, …)."""

    def __init__(self, data_config):
        self.config = c = data_config
        if c.name not in DATASETS:
            raise ValueError(f"unknown dataset config.data.name={c.name!r}; choose one of {DATASETS}")
        data_dir = os.path.abspath(c.data_dir or "data/tfds")
        if c.name == "shapes":
            from research.data import shapes
            self.class_names = tuple(shapes.CLASS_NAMES)
            self.label_to_category_id = None
            sizes = (c.image_size, c.num_train_examples, c.num_eval_examples)
            named = {(128, 2000, 200): "default", (64, 128, 32): "tiny"}
            if sizes in named:
                kwargs = dict(config=named[sizes])
            else:
                kwargs = dict(config=shapes.ShapesConfig(
                    name=f"s{sizes[0]}_n{sizes[1]}_v{sizes[2]}", image_size=sizes[0], num_train=sizes[1],
                    num_validation=sizes[2]))
            self.builder = pipeline.prepare("shapes_detection", data_dir, **kwargs)
        else:
            from research.data import coco
            if not c.manual_dir:
                raise ValueError("config.data.manual_dir must name the local COCO folder "
                                 "(images + annotations/instances_*.json)")
            if not os.path.isdir(c.manual_dir):
                raise FileNotFoundError(f"config.data.manual_dir not found: {c.manual_dir}")
            self.class_names = tuple(coco.COCO80_NAMES)
            self.label_to_category_id = list(coco.COCO80_TO_91)
            self.builder = pipeline.prepare("coco_detection_local", data_dir, manual_dir=c.manual_dir)

    def num_examples(self, split: str) -> int:
        return int(self.builder.info.splits[split].num_examples)

    def loader(self, split: str, *, train: bool, batch_size: int, hyp, seed: int,
               iterator_state: dict | None = None, process_index: int | None = None,
               process_count: int | None = None, rect_stride: int = 0):
        hyp = {k: float(v) for k, v in dict(hyp).items()}
        loader = pipeline.make_detection_loader(
            self.builder, split, image_size=self.config.image_size, batch_size=batch_size, train=train,
            hyp=hyp, max_labels=self.config.max_labels, seed=seed, num_epochs=None if train else 1,
            worker_count=self.config.num_workers, process_index=process_index, process_count=process_count,
            rect_stride=rect_stride, cache_images=bool(train and self.config.cache_images))
        return _ResumableLoader(loader, iterator_state)

    def label_sizes(self, split: str):
        """(image sizes [n, 2] w, h; per-image normalized label w, h) without decoding images."""
        return pipeline.label_sizes(self.builder.data_dir, split)

    def annotation_file(self, split: str, setting: str) -> str | None:
        """The COCO annotation json that scores `split` (`config.eval.annotations` = setting).

        "auto": for `coco`, the folder's own file for that split (as val.py scores COCO with
        instances_val2017.json: crowd regions ignored, official areas); None otherwise, and the
        ground truth is built from the loader's labels. "" / "labels": always the labels. Any
        other value is a path that must exist.
        """
        if setting in ("", "labels"):
            return None
        if setting != "auto":
            if not os.path.isfile(setting):
                raise FileNotFoundError(f"config.eval.annotations not found: {setting}")
            return setting
        if self.config.name != "coco":
            return None
        from research.data import coco
        rel = getattr(coco.CocoConfig, f"{split}_annotations", None)
        path = os.path.join(self.config.manual_dir, rel) if rel else None
        if path is None or not os.path.isfile(path):
            logging.warning("eval: no annotation file for split %r (%s); scoring against the loader's labels",
                            split, path)
            return None
        return path

    def coco_gt(self, images, boxes, labels):
        from research.evaluation.coco import coco_gt_from_arrays
        return coco_gt_from_arrays(images, boxes, labels, self.class_names, self.label_to_category_id)

    def predict_images(self, input_dir: str, size: int, limit: int) -> Iterator[tuple]:
        """(name, original RGB image, letterboxed uint8 input, ratio, (dw, dh)) per image."""
        if input_dir:
            yield from images_from_folder(input_dir, size, limit)
            return
        source = pipeline.DetectionSource(self.builder.data_dir, self.config.eval_split)
        for i in range(min(limit, source.num_records)):
            ex = source[i]
            img = ex["image"]
            lb, ratio, pad = T.letterbox(img, (size, size), auto=False)
            yield f"{self.config.eval_split}_{i:04d}", img, lb, float(ratio[0]), tuple(float(p) for p in pad)


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
