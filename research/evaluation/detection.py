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
