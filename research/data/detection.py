"""Detection datasets by name (`config.data.name`): a small registry of tfds builders.

    @register_dataset("shapes")
    def _shapes(data_config) -> DatasetSpec: ...

`DetectionData(config.data)` prepares the named dataset (on first use) and answers what every
detector needs from it: class names, the label -> category id table, split sizes, header-only
label sizes, the COCO annotation file that scores a split, and ground truth built from labels.
Networks read its records through `research.data.pipeline.DetectionSource` with their own
transforms (YOLOv5: `research/yolov5/data.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from typing import Callable

from absl import logging

from research.data import pipeline


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A prepared detection dataset.

    Attributes:
      builder: the prepared tfds builder (array_record).
      class_names: name of each contiguous class index.
      label_to_category_id: category id of each class index in the annotation files (None:
        the index itself).
      annotation_files: split -> COCO json that scores it (relative to `config.data.manual_dir`).
    """

    builder: object
    class_names: tuple[str, ...]
    label_to_category_id: tuple[int, ...] | None = None
    annotation_files: dict = dataclasses.field(default_factory=dict)


_DATASETS: dict[str, Callable[..., DatasetSpec]] = {}


def register_dataset(name: str) -> Callable:
    """Decorator: `fn(data_config) -> DatasetSpec` is the dataset `config.data.name = name`."""
    def wrap(fn):
        _DATASETS[name] = fn
        return fn
    return wrap


def dataset_names() -> list[str]:
    return sorted(_DATASETS)


@register_dataset("shapes")
def _shapes(c) -> DatasetSpec:
    """The embedded synthetic `shapes` data (research/data/shapes.py), generated on first use."""
    from research.data import shapes
    data_dir = os.path.abspath(c.data_dir or "data/tfds")
    sizes = (c.image_size, c.num_train_examples, c.num_eval_examples)
    named = {(128, 2000, 200): "default", (64, 128, 32): "tiny"}
    if sizes in named:
        kwargs = dict(config=named[sizes])
    else:
        kwargs = dict(config=shapes.ShapesConfig(
            name=f"s{sizes[0]}_n{sizes[1]}_v{sizes[2]}", image_size=sizes[0], num_train=sizes[1],
            num_validation=sizes[2]))
    return DatasetSpec(pipeline.prepare("shapes_detection", data_dir, **kwargs), tuple(shapes.CLASS_NAMES))


@register_dataset("coco")
def _coco(c) -> DatasetSpec:
    """COCO detection from a local folder (images + annotations/instances_*.json); the classes are
    COCO's 80 unless the folder's categories are its own (`folder_categories`)."""
    from research.data import coco
    if not c.manual_dir:
        raise ValueError("config.data.manual_dir must name the local COCO folder "
                         "(images + annotations/instances_*.json)")
    if not os.path.isdir(c.manual_dir):
        raise FileNotFoundError(f"config.data.manual_dir not found: {c.manual_dir}")
    data_dir = os.path.abspath(c.data_dir or "data/tfds")
    files = {split: getattr(coco.CocoConfig, f"{split}_annotations") for split in ("train", "validation")
             if hasattr(coco.CocoConfig, f"{split}_annotations")}
    ids, names = folder_categories(os.path.join(c.manual_dir, files["train"]))
    # The prepared data is keyed to its source: the annotation files' contents (and the classes) name
    # the builder config, so an edited json or another folder is prepared anew, never silently reused.
    source = annotations_digest([os.path.join(c.manual_dir, f) for f in files.values()])
    if ids is None:  # COCO itself (or a subset of its categories): the 80-class table, 80 <-> 91 ids
        config = coco.CocoConfig(name=f"coco80_{source}")
        builder = pipeline.prepare("coco_detection_local", data_dir, manual_dir=c.manual_dir, config=config)
        return DatasetSpec(builder, tuple(coco.COCO80_NAMES), tuple(coco.COCO80_TO_91), files)
    digest = zlib.crc32(json.dumps([ids, names]).encode())
    config = coco.CocoConfig(name=f"categories_{len(ids)}_{digest:08x}_{source}", category_ids=ids,
                             class_names=names)
    builder = pipeline.prepare("coco_detection_local", data_dir, manual_dir=c.manual_dir, config=config)
    return DatasetSpec(builder, names, ids, files)


def annotations_digest(paths) -> str:
    """12 hex digits of the SHA-1 of the annotation files' bytes (missing files count as empty)."""
    h = hashlib.sha1()
    for path in paths:
        h.update(os.path.basename(path).encode())
        if os.path.isfile(path):
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()[:12]


def folder_categories(train_json: str) -> tuple[tuple[int, ...] | None, tuple[str, ...] | None]:
    """The classes of a COCO-format folder, from its training json's `categories`.

    Returns (None, None) when every category is COCO's own (same id and name as the 2017
    detection table): the folder is COCO or a subset of it, trained with the 80 classes (official
    weights fit). Otherwise (ids sorted, names): its own classes, label i <-> category id ids[i].

    Raises:
      FileNotFoundError / ValueError: the json is missing, unreadable, or its categories lack an
        integer id or a name (naming the file).
    """
    from research.vision.coco_classes import COCO80_NAMES, COCO80_TO_91
    if not os.path.isfile(train_json):
        raise FileNotFoundError(f"COCO annotations file not found: {train_json}")
    try:
        with open(train_json) as f:
            cats = json.load(f).get("categories", [])
        pairs = sorted((int(cat["id"]), str(cat["name"])) for cat in cats)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{train_json}: categories must be a list of {{'id': int, 'name': str}}: {e!r}") from None
    coco = dict(zip(COCO80_TO_91, COCO80_NAMES))
    if not pairs or all(coco.get(i) == n for i, n in pairs):
        return None, None
    ids = [i for i, _ in pairs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{train_json}: duplicate category ids {sorted(i for i in ids if ids.count(i) > 1)}")
    return tuple(ids), tuple(n for _, n in pairs)


class DetectionData:
    """The dataset named by `config.data` (a ConfigDict with name, data_dir, manual_dir, …).

    Raises:
      ValueError: an unknown `config.data.name` (the message lists the registered ones), or a
        dataset that needs `manual_dir` without it.
      FileNotFoundError: `manual_dir` does not exist.
    """

    def __init__(self, data_config):
        self.config = c = data_config
        if c.name not in _DATASETS:
            raise ValueError(f"unknown dataset config.data.name={c.name!r}; choose one of {dataset_names()}")
        self.spec = _DATASETS[c.name](c)
        self.builder = self.spec.builder
        self.class_names = self.spec.class_names
        self.label_to_category_id = (list(self.spec.label_to_category_id)
                                     if self.spec.label_to_category_id is not None else None)

    def check_split(self, split: str) -> None:
        """Raises ValueError naming the split, the dataset and its annotation file when the
        prepared data has no such split (e.g. an annotation json listing no images)."""
        if split not in self.builder.info.splits:
            rel = self.spec.annotation_files.get(split)
            where = f" ({os.path.join(self.config.manual_dir, rel)})" if rel and self.config.manual_dir else ""
            raise ValueError(f"dataset {self.config.name!r} has no {split!r} split{where}: it lists no images. "
                             "Evaluate on another split, or set --config.eval_every_steps=0 to train without "
                             "evaluation")

    def problems(self) -> list:
        """What the validation pass found while preparing this dataset (`validation.Problem`s,
        read from the prepared data; [] for generated data)."""
        from research.data import validation
        return validation.read(self.builder.data_dir)

    def num_examples(self, split: str) -> int:
        self.check_split(split)
        return int(self.builder.info.splits[split].num_examples)

    def label_sizes(self, split: str):
        """(image sizes [n, 2] w, h; per-image normalized label w, h) without decoding images."""
        return pipeline.label_sizes(self.builder.data_dir, split)

    def annotation_file(self, split: str, setting: str) -> str | None:
        """The COCO annotation json that scores `split` (`config.eval.annotations` = setting).

        "auto": the dataset's own file for that split (as val.py scores COCO with
        instances_val2017.json: crowd regions ignored, official areas); None when it has none,
        and the ground truth is built from the loader's labels. "" / "labels": always the
        labels. Any other value is a path that must exist.

        Raises:
          FileNotFoundError: an explicit path that does not exist.
        """
        if setting in ("", "labels"):
            return None
        if setting != "auto":
            if not os.path.isfile(setting):
                raise FileNotFoundError(f"config.eval.annotations not found: {setting}")
            return setting
        rel = self.spec.annotation_files.get(split)
        if rel is None:
            return None
        path = os.path.join(self.config.manual_dir, rel)
        if not os.path.isfile(path):
            logging.warning("eval: no annotation file for split %r (%s); scoring against the loader's labels",
                            split, path)
            return None
        return path

    def coco_gt(self, images, boxes, labels):
        from research.evaluation.coco import coco_gt_from_arrays
        return coco_gt_from_arrays(images, boxes, labels, self.class_names, self.label_to_category_id)
