"""One-pass tracking evaluation with the got10k toolkit's OTB measures (`ExperimentOTB.report`).

Per sequence, the tracker is initialised on frame 0 with the ground-truth box and run over the
rest; frame 0's result is the ground truth (the toolkit overwrites it), then
  * IoU of `[x, y, w, h]` boxes (`got10k.utils.metrics.rect_iou`, no image bound) and centre
    error in pixels between centres `xy + (wh - 1) / 2` (`center_error`);
  * success curve: fraction of frames with IoU > t for 21 thresholds t = linspace(0, 1, 21);
    precision curve: fraction with centre error <= t px for t = 0 .. 50;
  * the curves are averaged over sequences; success AUC = mean of the averaged success curve,
    precision = its value at 20 px, success rate = the success curve at IoU 0.5.
Frames flagged absent are left out of a sequence's curves (the GOT-10k toolkit's rule; OTB has no
absent frames, and the synthetic validation videos never hide the target).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterator

import numpy as np

from research.evaluation import base as evaluation_base
from research.siamfc import tracker as tracker_lib

NBINS_IOU = 21
NBINS_CE = 51


def rect_iou(rects1: np.ndarray, rects2: np.ndarray) -> np.ndarray:
    """`[N]` IoU of `[N, 4]` `[x, y, w, h]` boxes (got10k `rect_iou` without `bound`), clipped to [0, 1]."""
    r1, r2 = np.asarray(rects1, np.float64), np.asarray(rects2, np.float64)
    if r1.shape != r2.shape:
        raise ValueError(f"rect_iou: shapes {r1.shape} and {r2.shape} differ")
    x1 = np.maximum(r1[..., 0], r2[..., 0])
    y1 = np.maximum(r1[..., 1], r2[..., 1])
    x2 = np.minimum(r1[..., 0] + r1[..., 2], r2[..., 0] + r2[..., 2])
    y2 = np.minimum(r1[..., 1] + r1[..., 3], r2[..., 1] + r2[..., 3])
    inter = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    union = np.prod(r1[..., 2:], axis=-1) + np.prod(r2[..., 2:], axis=-1) - inter
    return np.clip(inter / (union + np.finfo(float).eps), 0.0, 1.0)


def center_error(rects1: np.ndarray, rects2: np.ndarray) -> np.ndarray:
    """`[N]` Euclidean distance (px) between the centres `xy + (wh - 1) / 2` of `[N, 4]` boxes."""
    r1, r2 = np.asarray(rects1, np.float64), np.asarray(rects2, np.float64)
    c1 = r1[..., :2] + (r1[..., 2:] - 1) / 2
    c2 = r2[..., :2] + (r2[..., 2:] - 1) / 2
    return np.sqrt(np.sum((c1 - c2) ** 2, axis=-1))


def otb_curves(ious: np.ndarray, center_errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(`[21]` success curve, `[51]` precision curve) of one sequence (`ExperimentOTB._calc_curves`)."""
    ious = np.asarray(ious, float)[:, None]
    ce = np.asarray(center_errors, float)[:, None]
    succ = np.mean(ious > np.linspace(0, 1, NBINS_IOU)[None, :], axis=0)
    prec = np.mean(ce <= np.arange(0, NBINS_CE)[None, :], axis=0)
    return succ, prec


def sequence_curves(boxes: np.ndarray, anno: np.ndarray, absent: np.ndarray | None = None):
    """Curves of one tracked sequence: frame 0 set to the ground truth, absent frames left out.

    Raises:
      ValueError: `boxes` and `anno` have different lengths, or every frame is absent.
    """
    boxes = np.array(boxes, np.float64, copy=True)
    anno = np.asarray(anno, np.float64)
    if boxes.shape != anno.shape:
        raise ValueError(f"tracked boxes {boxes.shape} and ground truth {anno.shape} differ")
    boxes[0] = anno[0]
    keep = np.ones(len(anno), bool) if absent is None else ~np.asarray(absent, bool)
    if not keep.any():
        raise ValueError("every frame of the sequence is absent")
    return otb_curves(rect_iou(boxes[keep], anno[keep]), center_error(boxes[keep], anno[keep]))


def otb_report(curves: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Overall scores from per-sequence `(success, precision)` curves (`ExperimentOTB.report`)."""
    if not curves:
        raise ValueError("otb_report: no sequences")
    succ = np.mean([c[0] for c in curves], axis=0)
    prec = np.mean([c[1] for c in curves], axis=0)
    return {"success_curve": succ, "precision_curve": prec, "success_score": float(np.mean(succ)),
            "precision_score": float(prec[20]), "success_rate": float(succ[NBINS_IOU // 2])}


class TrackingEvaluator:
    """Runs a tracker over the videos of a `VideoSource` and reports the OTB scores.

    Args:
      source: `research.siamfc.data.VideoSource` of the evaluation split.
      make_tracker: `variables -> tracker` (an object with `track(frames, box) -> [T, 4]`); with
        an ONNX-backed tracker `variables` is None.
      prefix: metric prefix (`eval` / `eval_onnx`).
      max_videos / max_frames: evaluate the first videos / frames only (0 = all).
      out_dir: when set, per-sequence boxes and scores go to `<out_dir>/<prefix>_tracking.json`.

    `run(variables)` yields `<prefix>/success_auc`, `<prefix>/precision_20px`,
    `<prefix>/success_rate_50` and `<prefix>/fps` (frames per second of the whole loop, host included), and the
    same scores of the "box stays where it started" baseline on the same frames (every frame's box = the
    first frame's ground truth): `<prefix>/baseline_success_auc`, `<prefix>/baseline_precision_20px`,
    `<prefix>/baseline_success_rate_50`, so that a trained tracker is measured against not tracking at all.
    """

    def __init__(self, source, make_tracker, prefix: str = "eval", max_videos: int = 0, max_frames: int = 0,
                 out_dir: str | None = None):
        self.source, self.make_tracker, self.prefix = source, make_tracker, prefix
        self.max_videos, self.max_frames, self.out_dir = int(max_videos), int(max_frames), out_dir
        self.last: dict[str, Any] = {}

    def track_all(self, variables) -> list[dict]:
        tracker = self.make_tracker(variables)
        n = len(self.source) if not self.max_videos else min(self.max_videos, len(self.source))
        out = []
        for i in range(n):
            seq = self.source.sequence(i)
            frames = self.source.frames(i, self.max_frames or None)
            t0 = time.time()
            boxes = tracker.track(frames, seq["boxes"][0])
            out.append({"name": seq["name"], "boxes": np.asarray(boxes), "anno": seq["boxes"][:len(frames)],
                        "absent": seq["absent"][:len(frames)], "seconds": time.time() - t0})
        return out

    def run(self, variables) -> Iterator[tuple[str, float]]:
        import jax
        if jax.process_index() != 0:
            return
        results = self.track_all(variables)
        curves = [sequence_curves(r["boxes"], r["anno"], r["absent"]) for r in results]
        rep = otb_report(curves)
        frames = sum(len(r["boxes"]) for r in results)
        fps = frames / max(sum(r["seconds"] for r in results), 1e-9)
        self.last = {"report": rep, "sequences": results}
        if self.out_dir:
            doc = {"overall": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in rep.items()},
                   "seq_wise": {r["name"]: {"boxes": np.round(r["boxes"], 3).tolist(),
                                            "success_score": float(np.mean(c[0])),
                                            "precision_score": float(c[1][20])}
                                for r, c in zip(results, curves)}}
            path = os.path.join(self.out_dir, f"{self.prefix}_tracking.json")
            with open(path + ".tmp", "w") as f:
                json.dump(doc, f)
            os.replace(path + ".tmp", path)
        yield f"{self.prefix}/success_auc", rep["success_score"]
        yield f"{self.prefix}/precision_20px", rep["precision_score"]
        yield f"{self.prefix}/success_rate_50", rep["success_rate"]
        yield f"{self.prefix}/fps", fps
        still = otb_report([sequence_curves(np.repeat(np.asarray(r["anno"][:1], np.float64), len(r["boxes"]), 0),
                                            r["anno"], r["absent"]) for r in results])
        yield f"{self.prefix}/baseline_success_auc", still["success_score"]
        yield f"{self.prefix}/baseline_precision_20px", still["precision_score"]
        yield f"{self.prefix}/baseline_success_rate_50", still["success_rate"]


@evaluation_base.register("tracking_otb")
class OtbTracking(evaluation_base.Evaluator):
    """`config.evals.<name>.type = "tracking_otb"`: the task's tracker (JAX, or with `onnx_path` the
    same tracker on the exported `template.onnx` / `search.onnx` in that folder) over the evaluation
    videos, scored as the got10k toolkit's ExperimentOTB (`TrackingEvaluator`).

    Entry fields: `split` ("" = `config.data.eval_split`), `max_videos`, `max_frames` (0 = all).
    The task provides `source(split)`, `make_tracker(variables)` and `tracker_settings()`.
    """

    def __init__(self, task, name, config, **kwargs):
        super().__init__(task, name, config, **kwargs)
        if self.onnx_path:  # the tracker on the exported template.onnx / search.onnx beside model.onnx
            settings, export_dir = task.tracker_settings(), os.path.dirname(os.path.abspath(self.onnx_path))
            make = lambda _: tracker_lib.TrackerSiamFC(tracker_lib.OnnxBackend.from_dir(export_dir),  # noqa: E731
                                                       settings)
        else:
            make = task.make_tracker
        split = config.get("split", "") or task.config.data.eval_split
        self.tracking = TrackingEvaluator(task.source(split), make, prefix=self.prefix,
                                          max_videos=config.get("max_videos", 0),
                                          max_frames=config.get("max_frames", 0), out_dir=self.out_dir)

    def run(self, variables):
        yield from self.tracking.run(variables)
