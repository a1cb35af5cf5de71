"""Tracking evaluation with the measures of the benchmarks' own toolkits (got10k toolkit 0.1.3).

Per sequence, the tracker is initialised on frame 0 with the ground-truth box and run over the
rest. Boxes are `[x, y, w, h]` pixels (x, y 1-based as the toolkits store them).

OTB one-pass evaluation (`got10k.experiments.ExperimentOTB.report`): frame 0's result is the
ground truth (the toolkit overwrites it), then
  * IoU of the boxes (`got10k.utils.metrics.rect_iou`, no image bound) and centre error in pixels
    between centres `xy + (wh - 1) / 2` (`center_error`);
  * success curve: fraction of frames with IoU > t for 21 thresholds t = linspace(0, 1, 21);
    precision curve: fraction with centre error <= t px for t = 0 .. 50;
  * the curves are averaged over sequences; success AUC = mean of the averaged success curve,
    precision = its value at 20 px, success rate = the success curve at IoU 0.5.
  * normalised precision (TrackingNet / LaSOT, which the OTB toolkit lacks): the centre error
    divided by the ground-truth width and height, `|(c_pred - c_gt) / wh_gt|`, its precision curve
    over thresholds 0, 0.01 .. 0.5 averaged over sequences, and the area under it (mean of the 51
    points), the number those benchmarks rank by.
Frames flagged absent are left out of a sequence's OTB curves (OTB has no absent frames).

GOT-10k (`got10k.experiments.ExperimentGOT10k.report` on the val subset): frames 1.. (the first
is the initialisation), IoU with both boxes clipped to the image (`rect_iou(..., bound=(W, H))`),
only frames whose visible ratio `cover` is > 0 (absent or fully occluded targets do not count);
the IoUs of all sequences are pooled, then AO = their mean, SR@0.5 / SR@0.75 = the fraction > 0.5
/ > 0.75, and the success curve has 101 thresholds linspace(0, 1, 101).
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
NBINS_NORM_CE = 51  # normalised centre-error thresholds 0, 0.01 .. 0.5
NBINS_GOT10K = 101


def rect_iou(rects1: np.ndarray, rects2: np.ndarray, bound: tuple[float, float] | None = None) -> np.ndarray:
    """`[N]` IoU of `[N, 4]` `[x, y, w, h]` boxes, clipped to [0, 1] (got10k `rect_iou`).

    Args:
      bound: `(W, H)` image size in pixels: both boxes are first clipped to `[0, W] x [0, H]` as the
        GOT-10k evaluation does (the inputs are not modified); None = no clipping (OTB).

    Raises:
      ValueError: the two arrays have different shapes.
    """
    r1, r2 = np.array(rects1, np.float64), np.array(rects2, np.float64)
    if r1.shape != r2.shape:
        raise ValueError(f"rect_iou: shapes {r1.shape} and {r2.shape} differ")
    if bound is not None:
        for r in (r1, r2):
            r[..., 0] = np.clip(r[..., 0], 0, bound[0])
            r[..., 1] = np.clip(r[..., 1], 0, bound[1])
            r[..., 2] = np.clip(r[..., 2], 0, bound[0] - r[..., 0])
            r[..., 3] = np.clip(r[..., 3], 0, bound[1] - r[..., 1])
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


def normalized_center_error(rects: np.ndarray, anno: np.ndarray) -> np.ndarray:
    """`[N]` distance between the centres of `rects` and `anno` (`[N, 4]` `[x, y, w, h]`), each
    axis divided by the ground truth's width / height (TrackingNet / LaSOT normalised precision);
    a ground-truth side of 0 counts as 1 px."""
    r1, r2 = np.asarray(rects, np.float64), np.asarray(anno, np.float64)
    c1 = r1[..., :2] + (r1[..., 2:] - 1) / 2
    c2 = r2[..., :2] + (r2[..., 2:] - 1) / 2
    return np.sqrt(np.sum(((c1 - c2) / np.maximum(r2[..., 2:], 1.0)) ** 2, axis=-1))


def otb_curves(ious: np.ndarray, center_errors: np.ndarray,
               norm_center_errors: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Curves of one sequence (`ExperimentOTB._calc_curves`): `[21]` success, `[51]` precision and,
    with `norm_center_errors`, the `[51]` normalised precision curve (thresholds 0 .. 0.5)."""
    ious = np.asarray(ious, float)[:, None]
    ce = np.asarray(center_errors, float)[:, None]
    succ = np.mean(ious > np.linspace(0, 1, NBINS_IOU)[None, :], axis=0)
    prec = np.mean(ce <= np.arange(0, NBINS_CE)[None, :], axis=0)
    if norm_center_errors is None:
        return succ, prec
    nce = np.asarray(norm_center_errors, float)[:, None]
    return succ, prec, np.mean(nce <= np.linspace(0, 0.5, NBINS_NORM_CE)[None, :], axis=0)


def sequence_curves(boxes: np.ndarray, anno: np.ndarray, absent: np.ndarray | None = None):
    """`(success [21], precision [51], normalised precision [51])` curves of one tracked sequence:
    frame 0 set to the ground truth, absent frames left out.

    Args:
      boxes, anno: `[T, 4]` tracked and ground-truth `[x, y, w, h]` boxes (pixels).
      absent: `[T]` bool, frames to leave out (None = none).

    Raises:
      ValueError: `boxes` and `anno` have different shapes, or every frame is absent.
    """
    boxes = np.array(boxes, np.float64, copy=True)
    anno = np.asarray(anno, np.float64)
    if boxes.shape != anno.shape:
        raise ValueError(f"tracked boxes {boxes.shape} and ground truth {anno.shape} differ")
    boxes[0] = anno[0]
    keep = np.ones(len(anno), bool) if absent is None else ~np.asarray(absent, bool)
    if not keep.any():
        raise ValueError("every frame of the sequence is absent")
    b, g = boxes[keep], anno[keep]
    return otb_curves(rect_iou(b, g), center_error(b, g), normalized_center_error(b, g))


def otb_report(curves: list[tuple[np.ndarray, ...]]) -> dict[str, Any]:
    """Overall scores from per-sequence `sequence_curves` (`ExperimentOTB.report`).

    Returns: `success_curve` `[21]`, `precision_curve` `[51]`, `success_score` (AUC, the mean of the
    averaged success curve), `precision_score` (at 20 px), `success_rate` (at IoU 0.5) and, when
    the curves carry it, `norm_precision_curve` `[51]` and `norm_precision_score` (its mean).

    Raises:
      ValueError: no sequences.
    """
    if not curves:
        raise ValueError("otb_report: no sequences")
    succ = np.mean([c[0] for c in curves], axis=0)
    prec = np.mean([c[1] for c in curves], axis=0)
    rep = {"success_curve": succ, "precision_curve": prec, "success_score": float(np.mean(succ)),
           "precision_score": float(prec[20]), "success_rate": float(succ[NBINS_IOU // 2])}
    if all(len(c) > 2 for c in curves):
        norm = np.mean([c[2] for c in curves], axis=0)
        rep.update(norm_precision_curve=norm, norm_precision_score=float(np.mean(norm)))
    return rep


def got10k_ious(boxes: np.ndarray, anno: np.ndarray, cover: np.ndarray | None,
                resolution: tuple[int, int]) -> np.ndarray:
    """IoUs of one sequence as the GOT-10k evaluation counts them (`ExperimentGOT10k.report`).

    Args:
      boxes, anno: `[T, 4]` tracked and ground-truth `[x, y, w, h]` boxes (pixels).
      cover: `[T]` visible-ratio levels 0..8 (None = all visible); frames with cover 0 are left out.
      resolution: `(W, H)` of the frames: both boxes are clipped to the image.

    Returns:
      `[K]` IoUs of frames 1..T-1 whose cover is > 0.

    Raises:
      ValueError: shapes differ.
    """
    boxes, anno = np.asarray(boxes, np.float64), np.asarray(anno, np.float64)
    if boxes.shape != anno.shape:
        raise ValueError(f"tracked boxes {boxes.shape} and ground truth {anno.shape} differ")
    ious = rect_iou(boxes[1:], anno[1:], bound=resolution)
    if cover is not None:
        ious = ious[np.asarray(cover)[1:len(anno)] > 0]
    return ious


def got10k_report(seq_ious: list[np.ndarray]) -> dict[str, Any]:
    """AO, SR@0.5, SR@0.75 and the `[101]` success curve over the pooled IoUs of all sequences
    (`ExperimentGOT10k._evaluate`: every counted frame weighs the same).

    Raises:
      ValueError: no frame counted.
    """
    ious = np.concatenate([np.asarray(i, np.float64).reshape(-1) for i in seq_ious]) if seq_ious else np.zeros(0)
    if ious.size == 0:
        raise ValueError("got10k_report: no frames to score (every frame absent or no sequences)")
    curve = np.mean(ious[:, None] > np.linspace(0, 1, NBINS_GOT10K)[None, :], axis=0)
    return {"ao": float(np.mean(ious)), "sr_50": float(np.mean(ious > 0.5)), "sr_75": float(np.mean(ious > 0.75)),
            "succ_curve": curve}


def plot_otb_curves(reports: dict[str, dict], out_prefix: str, title: str = "") -> list[str]:
    """Success and precision plots as the OTB toolkit draws them, one line per tracker.

    Args:
      reports: tracker name -> `otb_report` result (legend: success AUC / precision at 20 px).
      out_prefix: the PNGs are `<out_prefix>success_plot.png` and `<out_prefix>precision_plot.png`.

    Returns: the two paths.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    for kind, curve_key, score_key, xs, xlabel, ylabel in (
            ("success", "success_curve", "success_score", np.linspace(0, 1, NBINS_IOU), "Overlap threshold",
             "Success rate"),
            ("precision", "precision_curve", "precision_score", np.arange(0, NBINS_CE), "Location error threshold (px)",
             "Precision")):
        fig = Figure(figsize=(5.0, 4.0), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for name, rep in sorted(reports.items(), key=lambda kv: -kv[1][score_key]):
            ax.plot(xs, rep[curve_key], label=f"{name}: [{rep[score_key]:.3f}]")
        ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(xs[0], xs[-1]), ylim=(0, 1),
               title=f"{'Success' if kind == 'success' else 'Precision'} plots of OPE{' on ' + title if title else ''}")
        ax.grid(True)
        ax.legend(loc="lower left" if kind == "success" else "lower right", fontsize=8)
        fig.tight_layout()
        path = f"{out_prefix}{kind}_plot.png"
        fig.savefig(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)
        paths.append(path)
    return paths


def write_got10k_records(results: list[dict], out_dir: str) -> str:
    """Writes tracked boxes in the GOT-10k toolkit's record layout (`ExperimentGOT10k._record`):
    `<out_dir>/<seq>/<seq>_001.txt` (one `x,y,w,h` line per frame, 4 decimals) and
    `<seq>_time.txt` (seconds per frame), what the benchmark's evaluation server takes (zip the
    folder). Returns `out_dir`."""
    for r in results:
        d = os.path.join(out_dir, r["name"])
        os.makedirs(d, exist_ok=True)
        np.savetxt(os.path.join(d, f"{r['name']}_001.txt"), np.asarray(r["boxes"], np.float64), fmt="%.4f",
                   delimiter=",")
        per_frame = r["seconds"] / max(len(r["boxes"]), 1)
        np.savetxt(os.path.join(d, f"{r['name']}_time.txt"), np.full(len(r["boxes"]), per_frame), fmt="%.8f")
    return out_dir


class TrackingEvaluator:
    """Runs a tracker over the videos of a `VideoSource` and reports the OTB and GOT-10k scores.

    Args:
      source: `research.siamfc.data.VideoSource` of the evaluation split.
      make_tracker: `variables -> tracker` (an object with `track(frames, box) -> [T, 4]`); with
        an ONNX-backed tracker `variables` is None.
      prefix: metric prefix (`eval` / `eval_onnx`).
      max_videos / max_frames: evaluate the first videos / frames only (0 = all).
      out_dir: when set, per-sequence boxes and scores go to `<out_dir>/<prefix>_tracking.json` and
        the success and precision plots (the tracker and the baseline below) to
        `<out_dir>/<prefix>_success_plot.png` / `<prefix>_precision_plot.png`.
      title: the dataset's name on the plots.

    `run(variables)` yields, with `<prefix>/` in front:
      OTB: `success_auc`, `precision_20px`, `norm_precision` (area under the normalised precision
        curve), `success_rate_50`;
      GOT-10k: `ao`, `sr_50`, `sr_75`;
      `fps` (frames per second of the whole loop, host included);
      and the same scores of the "box stays where it started" baseline on the same frames (every
      frame's box = the first frame's ground truth) as `baseline_<name>`, so that a trained tracker
      is measured against not tracking at all.
    """

    def __init__(self, source, make_tracker, prefix: str = "eval", max_videos: int = 0, max_frames: int = 0,
                 out_dir: str | None = None, title: str = ""):
        self.source, self.make_tracker, self.prefix = source, make_tracker, prefix
        self.max_videos, self.max_frames, self.out_dir, self.title = int(max_videos), int(max_frames), out_dir, title
        self.last: dict[str, Any] = {}

    def track_all(self, variables) -> list[dict]:
        """Tracks every selected video: a list of dicts with `name`, `boxes` `[T, 4]`, `anno`,
        `absent`, `cover`, `resolution` `(W, H)` and `seconds`."""
        tracker = self.make_tracker(variables)
        n = len(self.source) if not self.max_videos else min(self.max_videos, len(self.source))
        out = []
        for i in range(n):
            seq = self.source.sequence(i)
            frames = self.source.frames(i, self.max_frames or None)
            t0 = time.time()
            boxes = tracker.track(frames, seq["boxes"][0])
            t = len(frames)
            out.append({"name": seq["name"], "boxes": np.asarray(boxes), "anno": seq["boxes"][:t],
                        "absent": seq["absent"][:t], "cover": seq["cover"][:t],
                        "resolution": (int(seq["width"]), int(seq["height"])), "seconds": time.time() - t0})
        return out

    @staticmethod
    def score(results: list[dict]) -> dict[str, Any]:
        """OTB (`otb_report`) and GOT-10k (`got10k_report`) scores of `track_all` results; the
        per-sequence curves are under `curves`, the per-sequence GOT-10k IoUs under `seq_ious`."""
        curves = [sequence_curves(r["boxes"], r["anno"], r["absent"]) for r in results]
        seq_ious = [got10k_ious(r["boxes"], r["anno"], r["cover"], r["resolution"]) for r in results]
        rep = otb_report(curves)
        rep.update(got10k_report(seq_ious))
        rep["curves"], rep["seq_ious"] = curves, seq_ious
        return rep

    def run(self, variables) -> Iterator[tuple[str, float]]:
        import jax
        if jax.process_index() != 0:
            return
        results = self.track_all(variables)
        frames = sum(len(r["boxes"]) for r in results)
        fps = frames / max(sum(r["seconds"] for r in results), 1e-9)
        if getattr(self.source, "first_frame_only", False):
            # GOT-10k test: no ground truth past frame 0; the records go to the benchmark's server
            if self.out_dir:
                self.last = {"records": write_got10k_records(results, os.path.join(
                    self.out_dir, f"{self.prefix}_got10k_records"))}
            yield f"{self.prefix}/fps", fps
            return
        rep = self.score(results)
        still = self.score([dict(r, boxes=np.repeat(np.asarray(r["anno"][:1], np.float64), len(r["boxes"]), 0))
                            for r in results])
        self.last = {"report": rep, "baseline": still, "sequences": results}
        if self.out_dir:
            overall = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in rep.items()
                       if k not in ("curves", "seq_ious")}
            doc = {"overall": overall,
                   "seq_wise": {r["name"]: {"boxes": np.round(r["boxes"], 3).tolist(),
                                            "success_score": float(np.mean(c[0])),
                                            "precision_score": float(c[1][20]),
                                            "ao": float(np.mean(i)) if i.size else None}
                                for r, c, i in zip(results, rep["curves"], rep["seq_ious"])}}
            path = os.path.join(self.out_dir, f"{self.prefix}_tracking.json")
            with open(path + ".tmp", "w") as f:
                json.dump(doc, f)
            os.replace(path + ".tmp", path)
            plot_otb_curves({"SiamFC": rep, "box stays where it started": still},
                            os.path.join(self.out_dir, f"{self.prefix}_"), title=self.title)
        names = (("success_auc", "success_score"), ("precision_20px", "precision_score"),
                 ("norm_precision", "norm_precision_score"), ("success_rate_50", "success_rate"),
                 ("ao", "ao"), ("sr_50", "sr_50"), ("sr_75", "sr_75"))
        for name, key in names:
            yield f"{self.prefix}/{name}", rep[key]
        yield f"{self.prefix}/fps", fps
        for name, key in names:
            yield f"{self.prefix}/baseline_{name}", still[key]


@evaluation_base.register("tracking")
class Tracking(evaluation_base.Evaluator):
    """`config.evals.<name>.type = "tracking"`: the task's tracker (JAX, or with `onnx_path` the
    same tracker on the exported `template.onnx` / `search.onnx` in that folder) over evaluation
    videos, scored as the got10k toolkit's ExperimentOTB and ExperimentGOT10k (`TrackingEvaluator`).

    Entry fields: `split` ("" = `config.data.eval_split`), `max_videos`, `max_frames` (0 = all), and
    the videos to track: `data` ("" = the task's `config.data`; else a dataset name of
    `research.siamfc.data.BUILDERS`: `synthetic`, `got10k`, `otb`) with `builder_config` (e.g.
    `otb2015`) and `manual_dir` (its local folder), prepared under `config.data.data_dir`.
    A task trained on GOT-10k can thus be scored on OTB-2015 in the same run.
    """

    def __init__(self, task, name, config, **kwargs):
        super().__init__(task, name, config, **kwargs)
        if self.onnx_path:  # the tracker on the exported template.onnx / search.onnx beside model.onnx
            settings, export_dir = task.tracker_settings(), os.path.dirname(os.path.abspath(self.onnx_path))
            make = lambda _: tracker_lib.TrackerSiamFC(tracker_lib.OnnxBackend.from_dir(export_dir),  # noqa: E731
                                                       settings)
        else:
            make = task.make_tracker
        dataset = config.get("data", "") or ""
        if dataset:
            from research.siamfc import data
            builder = data.prepare(dataset, task.config.data.data_dir, config=config.get("builder_config", ""),
                                   manual_dir=config.get("manual_dir", "") or None)
            split = config.get("split", "") or data.default_eval_split(builder)
            source = data.VideoSource(builder.data_dir, split)
            title = f"{builder.name}/{builder.builder_config.name}"
        else:
            split = config.get("split", "") or task.config.data.eval_split
            source, title = task.source(split), f"{task.config.data.name} {split}"
        self.tracking = TrackingEvaluator(source, make, prefix=self.prefix,
                                          max_videos=config.get("max_videos", 0),
                                          max_frames=config.get("max_frames", 0), out_dir=self.out_dir, title=title)

    def run(self, variables):
        yield from self.tracking.run(variables)
