"""COCO-style box detection evaluation on pycocotools, usable with any detector.

Pattern (scenic / big_vision style): build one `CocoDetectionEvaluator` per evaluation run,
`add()` the post-processed detections of every evaluated image (boxes already mapped back to
original image pixels), then call `result()` for the 12 COCOeval bbox statistics and optionally
`to_json()` for a standard detections file.

Detections are stored exactly as the official YOLOv5 v7.0 `val.py` writes its JSON (top-left
x, y, w, h with coordinates rounded to 3 decimals, score rounded to 5) and evaluated from those
rounded values, so `result()` equals running pycocotools on the written file. COCOeval's
defaults are used (IoU 0.50:0.05:0.95, maxDets 1/10/100, COCO area ranges); a statistic that
is undefined because no ground truth falls in its stratum is -1, as in pycocotools.

pycocotools' console output is captured and forwarded to absl logging (INFO; the summary table
at INFO as well), so evaluation is silent on stdout.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = [
    "STAT_NAMES",
    "coco80_to_coco91_class",
    "coco_gt_from_arrays",
    "load_coco_gt",
    "CocoDetectionEvaluator",
]

# Names of COCOeval.stats[0..11] for iouType="bbox", in order.
STAT_NAMES = (
    "mAP50_95",  # AP @[IoU=0.50:0.95 | area=all | maxDets=100]
    "mAP50",  # AP @[IoU=0.50 | area=all | maxDets=100]
    "mAP75",  # AP @[IoU=0.75 | area=all | maxDets=100]
    "mAP_small",  # AP @[IoU=0.50:0.95 | area=small | maxDets=100]
    "mAP_medium",
    "mAP_large",
    "AR1",  # AR @[IoU=0.50:0.95 | area=all | maxDets=1]
    "AR10",
    "AR100",
    "AR_small",  # AR @[IoU=0.50:0.95 | area=small | maxDets=100]
    "AR_medium",
    "AR_large",
)


def coco80_to_coco91_class() -> list[int]:
    """Category ids (paper numbering, 1..90 with gaps) of the 80 contiguous COCO detection classes."""
    from research.vision.coco_classes import COCO80_TO_91
    return list(COCO80_TO_91)


@contextlib.contextmanager
def _quiet(what: str):
    """Capture pycocotools' prints and forward them to absl logging."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        text = buf.getvalue().strip()
        if text:
            logging.info("pycocotools %s:\n%s", what, text)


def _coco_from_dict(dataset: Mapping[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(dict(dataset))
    coco.dataset.setdefault("images", [])
    coco.dataset.setdefault("annotations", [])
    coco.dataset.setdefault("categories", [])
    with _quiet("index"):
        coco.createIndex()
    return coco


def load_coco_gt(gt: COCO | Mapping[str, Any] | str | os.PathLike) -> COCO:
    """A pycocotools COCO object from a COCO object, a COCO-format dict, or an annotations json path.

    Dicts and files are read through `research.data.coco_annotations.normalize` (string ids, missing
    `iscrowd`/`area`, boxes from polygons), as the dataset builder reads them (whose validation report lists the problems).
    """
    if isinstance(gt, COCO):
        return gt
    source = "annotations"
    if isinstance(gt, (str, os.PathLike)):
        source = os.fspath(gt)
        with open(gt) as f:
            gt = json.load(f)
    from research.data import coco_annotations
    gt, problems = coco_annotations.normalize(gt, source)
    if problems:  # the same entries the dataset's validation report lists before the run
        logging.info("evaluation ground truth %s: %d entries normalised or dropped, e.g. %s", source,
                     len(problems), problems[0].line())
    return _coco_from_dict(gt)


def coco_gt_from_arrays(images: Sequence[Mapping[str, Any]], boxes: Sequence[np.ndarray],
                        labels: Sequence[np.ndarray], categories: Sequence[str],
                        label_to_category_id: Sequence[int] | None = None) -> COCO:
    """Ground truth COCO object for a synthetic / array dataset.

    Args:
      images: one dict per image with at least `id`, `height`, `width` (other keys are kept).
      boxes: per image, [n, 4] xyxy boxes in original image pixels.
      labels: per image, [n] contiguous class indices; rows with a negative label (padding)
        are skipped.
      categories: class names, index = contiguous class index.
      label_to_category_id: category id of each contiguous class (same meaning as for
        `CocoDetectionEvaluator`); default: the class index itself.

    Annotations get ids 1..N (pycocotools treats id 0 as "unmatched"), `area` = box w * h and
    `iscrowd` = 0.
    """
    if len(images) != len(boxes) or len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(boxes)} box and {len(labels)} label arrays")
    cat_ids = list(range(len(categories))) if label_to_category_id is None else list(label_to_category_id)
    if len(cat_ids) < len(categories):
        raise ValueError("label_to_category_id is shorter than categories")
    dataset: dict[str, Any] = {
        "info": {"description": "built by research.evaluation.coco.coco_gt_from_arrays"},
        "images": [],
        "annotations": [],
        "categories": [{"id": int(cat_ids[k]), "name": str(name)} for k, name in enumerate(categories)],
    }
    ann_id = 1
    for img, b, lab in zip(images, boxes, labels):
        img = dict(img)
        img["id"] = int(img["id"])
        img["height"], img["width"] = int(img["height"]), int(img["width"])
        dataset["images"].append(img)
        b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
        lab = np.asarray(lab).reshape(-1)
        if b.shape[0] != lab.shape[0]:
            raise ValueError(f"image {img['id']}: {b.shape[0]} boxes but {lab.shape[0]} labels")
        for (x1, y1, x2, y2), c in zip(b.tolist(), lab.tolist()):
            if c < 0:
                continue
            w, h = x2 - x1, y2 - y1
            dataset["annotations"].append({
                "id": ann_id,
                "image_id": img["id"],
                "category_id": int(cat_ids[int(c)]),
                "bbox": [x1, y1, w, h],
                "area": w * h,
                "iscrowd": 0,
            })
            ann_id += 1
    return _coco_from_dict(dataset)


class CocoDetectionEvaluator:
    """Accumulates detections image by image and scores them with pycocotools COCOeval (bbox).

    Args:
      gt: ground truth as a pycocotools COCO object, a COCO-format dict or an annotations path.
      label_to_category_id: maps the detector's contiguous class index to the dataset's
        category id (e.g. `coco80_to_coco91_class()` for COCO); None = identity.
      restrict_to_added_images: evaluate only the images passed to `add()` (also those added
        with zero detections), as val.py does for COCO; False evaluates every gt image.

    Call `add()` once for every evaluated image, even when it has no detections, so that its
    ground truth counts as missed.
    """

    def __init__(self, gt: COCO | Mapping[str, Any] | str | os.PathLike,
                 label_to_category_id: Sequence[int] | None = None, *,
                 restrict_to_added_images: bool = True):
        self.gt = load_coco_gt(gt)
        self.label_to_category_id = None if label_to_category_id is None else [int(c) for c in label_to_category_id]
        self.restrict_to_added_images = restrict_to_added_images
        self._gt_image_ids = set(self.gt.getImgIds())
        self.reset()

    def reset(self) -> None:
        """Forget all added detections."""
        self._dets: list[dict[str, Any]] = []
        self._image_ids: set[int] = set()

    @property
    def num_images(self) -> int:
        return len(self._image_ids)

    @property
    def num_detections(self) -> int:
        return len(self._dets)

    def add(self, image_id: int, boxes_xyxy: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> None:
        """Record one image's detections: [n, 4] xyxy original-image pixels, [n] scores, [n] class indices."""
        if hasattr(image_id, "item"):
            image_id = image_id.item()
        if image_id not in self._gt_image_ids:
            raise KeyError(f"image_id {image_id!r} is not in the ground truth")
        boxes = np.asarray(boxes_xyxy)
        if not np.issubdtype(boxes.dtype, np.floating):
            boxes = boxes.astype(np.float32)
        boxes = boxes.reshape(-1, 4)
        scores = np.asarray(scores).reshape(-1)
        labels = np.asarray(labels).reshape(-1)
        if not boxes.shape[0] == scores.shape[0] == labels.shape[0]:
            raise ValueError(f"boxes {boxes.shape}, scores {scores.shape}, labels {labels.shape} disagree")
        self._image_ids.add(image_id)
        if not boxes.shape[0]:
            return
        # Same arithmetic as val.py: xyxy -> centre xywh in the boxes' dtype, centre -> top-left.
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        cx = (boxes[:, 0] + boxes[:, 2]) / 2
        cy = (boxes[:, 1] + boxes[:, 3]) / 2
        xywh = np.stack([cx - w / 2, cy - h / 2, w, h], axis=1)
        cmap = self.label_to_category_id
        for b, s, c in zip(xywh.tolist(), scores.tolist(), labels.tolist()):
            self._dets.append({
                "image_id": image_id,
                "category_id": int(c) if cmap is None else cmap[int(c)],
                "bbox": [round(v, 3) for v in b],
                "score": round(float(s), 5),
            })

    def detections(self) -> list[dict[str, Any]]:
        """The detections in COCO results format (a copy)."""
        return copy.deepcopy(self._dets)

    def to_json(self, path: str | os.PathLike) -> str:
        """Write the detections as a COCO results json (a list of dicts, like val.py); returns path."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self._dets, f)
        return path

    def _results_coco(self) -> COCO:
        if self._dets:
            with _quiet("loadRes"):
                return self.gt.loadRes(copy.deepcopy(self._dets))
        # loadRes cannot take an empty list; an empty results set scores 0 where gt exists.
        return _coco_from_dict({
            "images": list(self.gt.dataset.get("images", [])),
            "categories": copy.deepcopy(self.gt.dataset.get("categories", [])),
            "annotations": [],
        })

    def evaluate(self) -> COCOeval:
        """Run COCOeval (evaluate, accumulate, summarize) and return it, for per-class analysis."""
        coco_eval = COCOeval(self.gt, self._results_coco(), "bbox")
        if self.restrict_to_added_images:
            coco_eval.params.imgIds = sorted(self._image_ids)
        with _quiet("COCOeval"):
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return coco_eval

    def result(self) -> dict[str, float]:
        """The 12 COCOeval bbox statistics by name (`STAT_NAMES`); mAP50_95 = stats[0], mAP50 = stats[1].

        No added image, or no ground truth at all, gives 0.0 everywhere; zero detections give
        0.0 for every statistic that has ground truth.
        """
        if self.restrict_to_added_images and not self._image_ids:
            return {name: 0.0 for name in STAT_NAMES}
        if not self.gt.getAnnIds(imgIds=sorted(self._image_ids) if self.restrict_to_added_images else []):
            return {name: 0.0 for name in STAT_NAMES}
        stats = self.evaluate().stats
        return {name: float(v) for name, v in zip(STAT_NAMES, stats)}

