"""research/evaluation: detector-agnostic evaluators."""

from research.evaluation.coco import (STAT_NAMES, CocoDetectionEvaluator, coco80_to_coco91_class,
                                      coco_gt_from_arrays, load_coco_gt)

__all__ = [
    "STAT_NAMES",
    "CocoDetectionEvaluator",
    "coco80_to_coco91_class",
    "coco_gt_from_arrays",
    "load_coco_gt",
]
