"""The COCO detection evaluator (`type: coco_detection`), shared by the detectors (YOLOv5, RT-DETR).

It asks the task for its detections on the evaluation split and scores them with pycocotools
(`research/evaluation/coco.py`), as the official `val.py` / RT-DETR `CocoEvaluator` do. The task
provides (the detector protocol):

  detections(variables, onnx_path, split) -> iterator of per-image records
      {'image': {'id', 'height', 'width'},           original image, pixels
       'gt_xyxy': [n, 4], 'gt_labels': [n],           ground truth in original pixels, class index
       'dets': [m, 6]}                                x1, y1, x2, y2 (original pixels), score, class
  ground_truth_file(split) -> path of the dataset's COCO json, or None (then the ground truth is
      built from the records' boxes)
  class_names, label_to_category_id (None: the class index is the category id)

Entry fields: `split` (default `config.data.eval_split`). Metrics: `<prefix>/mAP50`,
`<prefix>/mAP50_95`. With `out_dir` (`--mode=eval`), the detections are also written as
`<out_dir>/detections[_onnx]_<split>.json` in the COCO results format (`val.py --save-json`).
"""

from __future__ import annotations

import os

import jax

from research.evaluation.base import Evaluator, register


@register("coco_detection")
class CocoDetection(Evaluator):
    """COCO mAP@0.5 and mAP@0.5:0.95 of the task's detections (process 0 evaluates the whole split)."""

    def run(self, variables):
        from research.evaluation.coco import CocoDetectionEvaluator, coco_gt_from_arrays
        if jax.process_index() != 0:
            return
        task = self.task
        split = self.config.get("split", "") or task.config.data.eval_split
        images, gt_boxes, gt_labels, dets = [], [], [], []
        for rec in task.detections(variables, self.onnx_path, split):
            images.append(rec["image"])
            gt_boxes.append(rec["gt_xyxy"])
            gt_labels.append(rec["gt_labels"])
            dets.append((rec["image"]["id"], rec["dets"]))
        path = task.ground_truth_file(split)
        if path:  # the dataset's own file; only the evaluated images count (as val.py)
            gt = task.coco_gt_file(path)
        else:
            gt = coco_gt_from_arrays(images, gt_boxes, gt_labels, task.class_names, task.label_to_category_id)
        ev = CocoDetectionEvaluator(gt, task.label_to_category_id)
        for image_id, d in dets:
            ev.add(image_id, d[:, :4], d[:, 4], d[:, 5].astype("int64"))
        res = ev.result()
        self.last_detections = dets
        if self.out_dir:
            name = "detections_onnx" if self.onnx_path else "detections"
            ev.to_json(os.path.join(self.out_dir, f"{name}_{split}.json"))
        yield f"{self.prefix}/mAP50", res["mAP50"]
        yield f"{self.prefix}/mAP50_95", res["mAP50_95"]


class DetectionDataMixin:
    """What a detector task on the shared detection datasets (`research/data/detection.py`) has in
    common, for the protocol above and the class count: mix into a `research.tasks.Task` subclass
    (`class Task(DetectionDataMixin, tasks.Task)`) that has `config` and `mode`.

    Provides `dataset` (the `DetectionData` of `config.data`, prepared on first use),
    `data_problems()`, `label_to_category_id`, `ground_truth_file(split)`, `coco_gt_file(path)`,
    and `resolve_num_classes(weights_num_classes)`, which sets `class_names`.
    """

    @property
    def dataset(self):
        """The detection data of `config.data` (prepared on first use, once per task)."""
        if "_dataset" not in self.__dict__:
            from research.data import detection
            self._dataset = detection.DetectionData(self.config.data)
        return self._dataset

    def data_problems(self) -> list:
        """What the validation pass found in `config.data` (listed before the run)."""
        return self.dataset.problems()

    @property
    def label_to_category_id(self):
        return self.dataset.label_to_category_id

    def ground_truth_file(self, split: str) -> str | None:
        return self.dataset.annotation_file(split, self.config.eval.annotations)

    def coco_gt_file(self, path: str):
        """pycocotools COCO of an annotation json, loaded once per task."""
        cache = self.__dict__.setdefault("_coco_gt_files", {})
        if path not in cache:
            from research.evaluation.coco import load_coco_gt
            cache[path] = load_coco_gt(path)
        return cache[path]

    @staticmethod
    def names_for(nc: int) -> tuple[str, ...]:
        """COCO's 80 names for 80 classes, else `class0..`."""
        from research.vision.coco_classes import COCO80_NAMES
        return tuple(COCO80_NAMES) if nc == len(COCO80_NAMES) else tuple(f"class{i}" for i in range(nc))

    def resolve_num_classes(self, weights_num_classes) -> int:
        """The model's class count, and `self.class_names`: `config.model.num_classes` when > 0;
        else, with official weights (`config.model.init_from`) in `--mode=export/predict`, the
        weights' count (`weights_num_classes(state_dict)`); else the dataset's, which must then
        agree with the weights'.

        Raises:
          ValueError: the weights' class count differs from the data's (naming both).
        """
        c = self.config
        if c.model.num_classes > 0:
            nc = int(c.model.num_classes)
            self.class_names = self.names_for(nc)
            return nc
        sd = self.init_state_dict()
        nc_weights = None
        if sd is not None:
            nc_weights = int(weights_num_classes(sd))
            if self.mode in ("export", "predict"):
                self.class_names = self.names_for(nc_weights)
                return nc_weights
        names = tuple(self.dataset.class_names)
        if nc_weights is not None and nc_weights != len(names):
            raise ValueError(
                f"config.model.init_from={c.model.init_from} has {nc_weights} classes but the "
                f"{c.data.name!r} data has {len(names)}: train on data with the weights' classes, or set "
                "config.model.init_from='' (or --mode=export/predict, which use the weights' classes)")
        self.class_names = names
        return len(names)
