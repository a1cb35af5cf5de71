"""HigherHRNet evaluation: OKS keypoint AP with pycocotools `COCOeval(..., 'keypoints')` on the eval split.

Follows `tools/valid.py` and `lib/dataset/COCODataset.py` (`evaluate`, `_write_coco_keypoint_results`,
`_do_python_keypoint_eval`): each image is resized with `resize_align_multi_scale` (the affine map of
`research.higherhrnet.inference.multi_scale_geometry`, `cv2.warpAffine`), normalised, run with its mirror (flip test)
at every test scale, aggregated and grouped by the existing post-processing (`research/higherhrnet/inference.py`,
`group.py`), and every grouped person is written as a COCO keypoint result (x, y, heatmap value per joint; score =
the person's mean joint value, `HeatmapParser.parse`'s score). No OKS NMS, as officially. The ground truth is the
split's annotations, rebuilt from the records (`data.coco_ground_truth`), so crowd annotations and people without
keypoints are ignored by COCOeval exactly as with the annotation file.

Images sharing one test geometry (all images of the synthetic data) are batched (the last batch padded by repeating
an image, so the jitted forward compiles once); `valid.py` uses batch 1, which gives the same maps.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

from research.evaluation import base as evaluation_base
from research.higherhrnet import group, inference

STATS_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
# OKS sigmas of CrowdPose (crowdposetools), for 14 joints; pycocotools' defaults are COCO's 17.
CROWDPOSE_SIGMAS = np.array([.79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89, .79, .79]) / 10.0


def oks_ap(ground_truth: dict, results: Sequence[dict], sigmas: np.ndarray | None = None) -> dict:
    """COCO keypoint AP / AR (official `_do_python_keypoint_eval`).

    Args:
      ground_truth: COCO keypoints dict (images, annotations, categories).
      results: COCO keypoint results ({image_id, category_id, keypoints [3J], score}).
      sigmas: per-joint OKS sigmas (None: pycocotools' COCO 17).

    Returns:
      dict of the ten COCOeval stats named `STATS_NAMES` (all 0 without results).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    if not results:
        return {k: 0.0 for k in STATS_NAMES}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        gt = COCO()
        gt.dataset = json.loads(json.dumps(ground_truth))
        gt.createIndex()
        dt = gt.loadRes([dict(r) for r in results])
        ev = COCOeval(gt, dt, "keypoints")
        ev.params.useSegm = None
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = np.asarray(sigmas, np.float64)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(max(v, 0.0)) for k, v in zip(STATS_NAMES, ev.stats)}


# crowdposetools `COCOeval.summarize` splits the images by `crowdIndex` with `get_type_result(first=0.2, second=0.8)`:
# easy < 0.2 <= medium < 0.8 <= hard (the CrowdPose paper names 0.1 as the easy bound; its toolkit, whose numbers the
# paper tables and HigherHRNet report, uses 0.2 in every revision).
CROWDPOSE_TYPE_BOUNDS = (0.2, 0.8)
CROWDPOSE_STATS_NAMES = ("AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP_easy", "AP_medium", "AP_hard")
CROWDPOSE_AREA_FACTOR = 0.53  # crowdposetools computeOks / evaluateImg: area = bbox w * h * 0.53


def crowdpose_ap(ground_truth: dict, results: Sequence[dict], crowd_index: dict | None = None,
                 type_bounds: tuple[float, float] = CROWDPOSE_TYPE_BOUNDS) -> dict:
    """CrowdPose keypoint AP as its benchmark toolkit scores it (crowdposetools `cocoeval.py`), on pycocotools.

    The toolkit is pycocotools' COCOeval with these differences, each reproduced here:
      * OKS sigmas of the 14 CrowdPose joints (`CROWDPOSE_SIGMAS`, hard-coded in its `computeOks`);
      * no `area` field: the OKS scale and the area-range test use `bbox[2] * bbox[3] * 0.53` of each ground-truth
        person (any `area` in `ground_truth` is replaced by it);
      * `summarize` reports, at maxDets 20: AP, AP@0.5, AP@0.75 (area `all`), AR, AR@0.5, AR@0.75, and AP easy /
        medium / hard: the images split by their `crowdIndex` (easy < bounds[0] <= medium < bounds[1] <= hard), each
        subset evaluated and accumulated alone, its value the plain mean of `precision[:, :, :, all-area, :]` rounded
        to 4 decimals (`get_type_result`); a subset without images gives -1 (its precision array stays -1).

    Args:
      ground_truth: COCO keypoints dict (images, annotations with `keypoints` [3 * 14], `bbox` (x, y, w, h) pixels,
        `num_keypoints`, `iscrowd`, categories); not modified.
      results: COCO keypoint results ({image_id, category_id, keypoints [3 * 14], score}).
      crowd_index: image id -> crowd index in [0, 1]; default: each image's `crowdIndex` field (CrowdPose json).
      type_bounds: (easy/medium, medium/hard) crowd-index bounds.

    Returns:
      dict of `CROWDPOSE_STATS_NAMES` -> float (without results: 0, and -1 for the types without images).

    Raises:
      ValueError: an image has no crowd index, or an annotation no 14-joint keypoints / bbox.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    gt_dict = json.loads(json.dumps(ground_truth))
    index = {}
    for im in gt_dict["images"]:
        ci = (crowd_index or {}).get(im["id"], im.get("crowdIndex"))
        if ci is None:
            raise ValueError(f"CrowdPose scoring: image {im['id']} has no crowdIndex (pass crowd_index= or keep the "
                             "field of the CrowdPose annotation file)")
        index[im["id"]] = float(ci)
    for a in gt_dict["annotations"]:
        if len(a.get("keypoints", ())) != 3 * len(CROWDPOSE_SIGMAS) or len(a.get("bbox", ())) != 4:
            raise ValueError(f"CrowdPose scoring: annotation {a.get('id')} needs 42 keypoint values and a bbox")
        a["area"] = float(a["bbox"][2]) * float(a["bbox"][3]) * CROWDPOSE_AREA_FACTOR
    lo, hi = type_bounds
    subsets = ([i for i, c in index.items() if c < lo], [i for i, c in index.items() if lo <= c < hi],
               [i for i, c in index.items() if c >= hi])
    if not results:  # (the toolkit's loadRes fails on an empty list)
        out = dict.fromkeys(CROWDPOSE_STATS_NAMES[:6], 0.0)
        out.update({n: (0.0 if ids else -1.0) for n, ids in zip(("AP_easy", "AP_medium", "AP_hard"), subsets)})
        return out
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        dt = gt.loadRes([dict(r) for r in results])
        ev = COCOeval(gt, dt, "keypoints")
        ev.params.useSegm = None
        ev.params.kpt_oks_sigmas = CROWDPOSE_SIGMAS.astype(np.float64)
        ev.params.maxDets = [20]
        ev.evaluate()
        ev.accumulate()
        p = ev.params
        a_all, m20 = p.areaRngLbl.index("all"), p.maxDets.index(20)
        prec, rec = ev.eval["precision"][:, :, :, a_all, m20], ev.eval["recall"][:, :, a_all, m20]

        def mean_valid(s):
            s = s[s > -1]
            return float(np.mean(s)) if s.size else -1.0

        t50, t75 = np.abs(p.iouThrs - 0.5) < 0.01, np.abs(p.iouThrs - 0.75) < 0.01
        out = {"AP": mean_valid(prec), "AP50": mean_valid(prec[t50]), "AP75": mean_valid(prec[t75]),
               "AR": mean_valid(rec), "AR50": mean_valid(rec[t50]), "AR75": mean_valid(rec[t75])}
        for name, ids in zip(("AP_easy", "AP_medium", "AP_hard"), subsets):
            if not ids:
                out[name] = -1.0
                continue
            ev.params.imgIds = sorted(ids)
            ev.evaluate()
            ev.accumulate()
            out[name] = round(float(np.mean(ev.eval["precision"][:, :, :, a_all, :])), 4)
    return out


def people_to_results(image_id: int, keypoints: np.ndarray, scores: np.ndarray) -> list[dict]:
    """COCO results of one image's people (official `_coco_keypoint_results_one_category_kernel`).

    Args:
      keypoints: [N, J, 3 + T] (x, y original pixels, value, tags) from `inference.people_from_maps`.
      scores: [N].
    """
    out = []
    for k, s in zip(np.asarray(keypoints), np.asarray(scores)):
        out.append({"image_id": int(image_id), "category_id": 1,
                    "keypoints": [float(v) for v in k[:, :3].reshape(-1)], "score": float(s)})
    return out


def warp_to_input(image: np.ndarray, center, scale, size) -> np.ndarray:
    """`resize_align_multi_scale`'s image: the affine map of (center, scale) onto `size` = (W, H), bilinear."""
    mat = group.affine_transform_matrix(center, scale, size)
    return cv2.warpAffine(image, mat, (int(size[0]), int(size[1])))


def predict_people(forward: Callable[[np.ndarray], Sequence[np.ndarray]], images: Iterable[np.ndarray],
                   settings: group.PostprocessSettings, batch_size: int = 8) -> Iterator[dict]:
    """Grouped people of each image, in order.

    Args:
      forward: `x [B, H, W, 3] float32 RGB in [0, 1] -> (output 0, output 1)` (the exported graph's contract).
      images: uint8 [H, W, 3] RGB images (any iterable; read once, one batch at a time).
      settings: post-processing (input_size, scale_factors, flip_test, thresholds...).
      batch_size: images per forward call (consecutive images of one size; every batch padded to this size by
        repeating its last image, so a jitted forward compiles once per input size).

    Yields:
      per image `inference.people_from_maps`' dict (`keypoints` [N, J, 3 + T] original pixels, `scores` [N]).
    """
    chunk: list = []
    for image in images:
        if chunk and (len(chunk) == batch_size or image.shape[:2] != chunk[0].shape[:2]):
            yield from _predict_chunk(forward, chunk, settings, batch_size)
            chunk = []
        chunk.append(image)
    if chunk:
        yield from _predict_chunk(forward, chunk, settings, batch_size)


def _predict_chunk(forward, chunk: list, settings: group.PostprocessSettings, batch_size: int) -> list:
    hw = chunk[0].shape[:2]
    n = len(chunk)
    chunk = chunk + [chunk[-1]] * (batch_size - n)
    geo = inference.multi_scale_geometry(hw, settings)
    per_scale = []
    for s in geo["scales"]:
        size, center, scale = inference.multi_scale_size(hw, settings.input_size, s, min(settings.scale_factors))
        x = np.stack([warp_to_input(im, center, scale, size) for im in chunk]).astype(np.float32) / 255.0
        outs = tuple(np.asarray(o) for o in forward(x))
        outs_flip = tuple(np.asarray(o) for o in forward(np.ascontiguousarray(x[:, :, ::-1]))) \
            if settings.flip_test else None
        per_scale.append((outs, outs_flip))
    maps = inference.aggregate_outputs(per_scale, settings, tuple(int(v) for v in geo["base_size"]))
    return inference.people_from_maps(maps["heatmaps"][:n], maps["tags"][:n], geo["center"], geo["scale"], settings)


@evaluation_base.register("coco_keypoints")
class KeypointEvaluator(evaluation_base.Evaluator):
    """`config.evals.<name>.type = "coco_keypoints"`: OKS AP of the model (or the exported ONNX graph)
    on `config.data.eval_split`, with the test settings of `config.eval`.

    `run(variables)` yields (`eval/AP`, ...) or (`eval_onnx/AP`, ...) (CrowdPose, `config.data.name == "crowdpose"`:
    scored as its toolkit does, `crowdpose_ap`, adding `AP_easy` / `AP_medium` / `AP_hard`); with `out_dir` the results json is written as
    `keypoints_<split>_results.json` (the official results file). The task provides `eval_records()`,
    `eval_images()`, `forward_fn(variables)`, `postprocess_settings()`, `ground_truth()`, `oks_sigmas()`.
    """

    def run(self, variables) -> Iterator[tuple[str, float]]:
        import jax
        if jax.process_index() != 0:
            return
        task, cfg = self.task, self.task.config
        records = task.eval_records()
        if self.onnx_path:
            from research.bridge.onnx_export import OnnxRunner
            runner = OnnxRunner(self.onnx_path)
            forward = lambda x: runner(images=x)  # noqa: E731
        else:
            forward = task.forward_fn(variables)
        results = []
        people = predict_people(forward, task.eval_images(), task.postprocess_settings(), cfg.eval.batch_size)
        for r, p in zip(records, people):
            results += people_to_results(r["image_id"], p["keypoints"], p["scores"])
        crowdpose = cfg.data.name == "crowdpose"
        if crowdpose:
            stats = crowdpose_ap(task.ground_truth(), results, task.crowd_index())
        else:
            stats = oks_ap(task.ground_truth(), results, task.oks_sigmas())
        prefix = self.prefix
        if self.out_dir:
            name = f"keypoints_{cfg.data.eval_split}{'_onnx' if self.onnx_path else ''}_results.json"
            with open(os.path.join(self.out_dir, name), "w") as f:
                json.dump(results, f)
        yield f"{prefix}/AP", stats["AP"]
        yield f"{prefix}/AP50", stats["AP50"]
        yield f"{prefix}/AP75", stats["AP75"]
        yield f"{prefix}/AR", stats["AR"]
        if crowdpose:
            for k in ("AP_easy", "AP_medium", "AP_hard"):
                yield f"{prefix}/{k}", stats[k]
        yield f"{prefix}/num_people", float(len(results))
