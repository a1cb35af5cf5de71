"""research/vision/boxes.py against an independent torch reference of the official pipeline.

torchvision is not available, so the reference greedy NMS below is a plain torch re-statement of
the torchvision CPU kernel: visit boxes in stable descending score order, IoU in float32 with
inter / (area_i + area_j - inter), suppress later boxes whose float IoU, promoted to double, is
strictly greater than the threshold.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

from research.vision.boxes import (box_iou, clip_boxes, nms, non_max_suppression, scale_boxes,
                                         xywh2xyxy, xyxy2xywh)


# ----------------------------------------------------------------------------- torch reference


def ref_greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> torch.Tensor:
    n = boxes.shape[0]
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    x1, y1, x2, y2 = b.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    suppressed = torch.zeros(n, dtype=torch.bool)
    keep = []
    zero = torch.zeros((), dtype=boxes.dtype)
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        w = torch.maximum(zero, torch.minimum(x2[i], x2[i + 1:]) - torch.maximum(x1[i], x1[i + 1:]))
        h = torch.maximum(zero, torch.minimum(y2[i], y2[i + 1:]) - torch.maximum(y1[i], y1[i + 1:]))
        inter = w * h
        ovr = inter / (area[i] + area[i + 1:] - inter)
        suppressed[i + 1:] |= ovr.double() > thr
    return order[torch.tensor(keep, dtype=torch.long)]


def ref_nms_pipeline(pred, conf_thres, iou_thres, classes=None, agnostic=False, multi_label=False,
                     max_det=300, max_nms=30000, max_wh=7680):
    """Official YOLOv5 v7.0 non_max_suppression semantics, written independently in torch."""
    pred = torch.from_numpy(np.asarray(pred))
    nc = pred.shape[2] - 5
    multi_label = multi_label and nc > 1
    out = []
    for x in pred:
        x = x[x[:, 4] > conf_thres].clone()
        if x.shape[0] == 0:
            out.append(np.zeros((0, 6), np.float32))
            continue
        x[:, 5:] = x[:, 5:] * x[:, 4:5]
        cx, cy, w, h = x[:, 0], x[:, 1], x[:, 2], x[:, 3]
        box = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        if multi_label:
            ii, jj = torch.nonzero(x[:, 5:] > conf_thres, as_tuple=True)
            det = torch.cat([box[ii], x[ii, 5 + jj][:, None], jj[:, None].float()], 1)
        else:
            conf, jj = x[:, 5:].max(1)
            det = torch.cat([box, conf[:, None], jj[:, None].float()], 1)[conf > conf_thres]
        if classes is not None:
            det = det[torch.isin(det[:, 5], torch.tensor(classes, dtype=det.dtype))]
        if det.shape[0] == 0:
            out.append(np.zeros((0, 6), np.float32))
            continue
        det = det[torch.sort(det[:, 4], descending=True, stable=True).indices[:max_nms]]
        off = det[:, 5:6] * (0 if agnostic else max_wh)
        keep = ref_greedy_nms(det[:, :4] + off, det[:, 4], iou_thres)[:max_det]
        out.append(det[keep].numpy())
    return out


def make_pred(rng, b=2, n=400, nc=4, quantize=True, img=160.0):
    """Clustered, heavily overlapping boxes; quantized coordinates and scores give many exact ties."""
    centers = rng.uniform(20, img - 20, size=(b, 6, 2))
    which = rng.integers(0, 6, size=(b, n))
    xy = np.take_along_axis(centers, which[..., None].repeat(2, -1), axis=1) + rng.normal(0, 4, (b, n, 2))
    wh = rng.uniform(8, 40, size=(b, n, 2))
    obj = rng.uniform(0, 1, size=(b, n, 1))
    cls = rng.uniform(0, 1, size=(b, n, nc))
    if quantize:
        xy, wh = np.round(xy), np.round(wh / 2) * 2
        obj, cls = np.round(obj * 4) / 4, np.round(cls * 4) / 4
    return np.concatenate([xy, wh, obj, cls], -1).astype(np.float32)


def assert_same(a_list, b_list):
    assert len(a_list) == len(b_list)
    for a, b in zip(a_list, b_list):
        assert a.shape == b.shape, (a.shape, b.shape)
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- NMS vs reference


@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize("agnostic", [False, True])
@pytest.mark.parametrize("quantize", [False, True])
def test_nms_matches_reference(multi_label, agnostic, quantize):
    rng = np.random.default_rng(hash((multi_label, agnostic, quantize)) % 2**32)
    pred = make_pred(rng, quantize=quantize)
    kw = dict(conf_thres=0.1, iou_thres=0.45, multi_label=multi_label, agnostic=agnostic)
    ours = non_max_suppression(pred, **kw)
    assert_same(ours, ref_nms_pipeline(pred, **kw))
    assert sum(len(o) for o in ours) > 10


@pytest.mark.parametrize("kw", [
    dict(conf_thres=0.001, iou_thres=0.6, multi_label=True, max_det=300),  # val.py settings
    dict(conf_thres=0.25, iou_thres=0.5, classes=[1, 3]),
    dict(conf_thres=0.05, iou_thres=0.3, multi_label=True, max_det=7),
    dict(conf_thres=0.05, iou_thres=0.7, multi_label=True, max_nms=50),  # truncation through ties
    dict(conf_thres=0.05, iou_thres=0.5, max_nms=33, max_det=5),
    dict(conf_thres=0.9, iou_thres=0.5),
])
def test_nms_options_match_reference(kw):
    pred = make_pred(np.random.default_rng(7))
    assert_same(non_max_suppression(pred, **kw), ref_nms_pipeline(pred, **kw))


def test_greedy_nms_many_boxes_and_chunks():
    # > 1024 boxes with max_keep=None walks several chunks and the kept-vs-chunk filter.
    rng = np.random.default_rng(3)
    n = 3000
    xy = rng.uniform(0, 300, (n, 2))
    wh = rng.uniform(5, 60, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = (np.round(rng.uniform(0, 1, n) * 20) / 20).astype(np.float32)  # many ties
    for thr in (0.3, 0.7):
        ref = ref_greedy_nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).numpy()
        np.testing.assert_array_equal(nms(boxes, scores, thr), ref)
        np.testing.assert_array_equal(nms(boxes, scores, thr, max_keep=50), ref[:50])


@pytest.mark.parametrize("extra, n_calls", [
    (dict(), 3),  # every class is its own group
    (dict(agnostic=True), 1),
    (dict(max_wh=150), 1),  # class extents (boxes span ~0..180 px) overlap: one group, same result
    (dict(max_wh=190), 3),  # extents now only touch or separate
])
def test_nms_large_max_det_grouped_path(extra, n_calls, monkeypatch):
    # max_det above _PER_CLASS_MIN_DET runs greedy NMS on groups of classes that cannot interact.
    from research.vision import boxes as postprocess

    calls = []
    real_nms = postprocess.nms
    monkeypatch.setattr(postprocess, "nms", lambda *a, **k: calls.append(1) or real_nms(*a, **k))
    pred = make_pred(np.random.default_rng(11), b=1, n=1500, nc=3)
    kw = dict(conf_thres=0.001, iou_thres=0.6, multi_label=True, max_det=5000, **extra)
    ours = non_max_suppression(pred, **kw)
    assert len(calls) == n_calls
    assert_same(ours, ref_nms_pipeline(pred, **kw))
    assert len(ours[0]) > 300


def test_nms_exact_threshold_and_classes():
    def pred_from(rows, nc=2):  # rows: (x1, y1, x2, y2, obj, cls)
        p = np.zeros((1, len(rows), 5 + nc), np.float32)
        for k, (x1, y1, x2, y2, obj, c) in enumerate(rows):
            p[0, k, :5] = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, obj]
            p[0, k, 5 + c] = 1.0
        return p

    # IoU([0,0,10,10], [0,0,10,5]) = 0.5 exactly: kept at thr 0.5, suppressed just below.
    p = pred_from([(0, 0, 10, 10, 0.9, 0), (0, 0, 10, 5, 0.8, 0)])
    assert len(non_max_suppression(p, 0.25, 0.5)[0]) == 2
    assert len(non_max_suppression(p, 0.25, 0.4999)[0]) == 1

    # Strong overlap but different classes: both kept unless agnostic.
    p = pred_from([(0, 0, 10, 10, 0.9, 0), (1, 1, 10, 10, 0.8, 1)])
    out = non_max_suppression(p, 0.25, 0.45)[0]
    np.testing.assert_array_equal(out[:, 5], [0, 1])
    out = non_max_suppression(p, 0.25, 0.45, agnostic=True)[0]
    np.testing.assert_allclose(out, [[0, 0, 10, 10, 0.9, 0]])

    # Output rows: xyxy, conf = obj * cls, class; sorted by conf.
    p = pred_from([(50, 50, 60, 70, 0.6, 1), (0, 0, 10, 10, 0.9, 0)])
    out = non_max_suppression(p, 0.25, 0.45)[0]
    np.testing.assert_allclose(out, [[0, 0, 10, 10, 0.9, 0], [50, 50, 60, 70, 0.6, 1]], rtol=1e-6)

    # max_det cap keeps the highest-scoring survivors.
    rows = [(20 * k, 0, 20 * k + 10, 10, 0.3 + 0.01 * k, 0) for k in range(10)]
    out = non_max_suppression(pred_from(rows), 0.25, 0.45, max_det=3)[0]
    np.testing.assert_allclose(out[:, 0], [180, 160, 140])


def test_nms_thresholds_and_empty():
    p = np.zeros((2, 10, 8), np.float32)
    out = non_max_suppression(p, 0.25, 0.45)
    assert len(out) == 2 and all(o.shape == (0, 6) and o.dtype == np.float32 for o in out)
    # obj > conf strictly and obj * cls > conf strictly.
    p = np.array([[[5, 5, 4, 4, 0.5, 0.5], [5, 5, 4, 4, 0.6, 0.5], [5, 5, 4, 4, 0.5, 1.0]]], np.float32)
    out = non_max_suppression(p, 0.25, 0.45, agnostic=True)[0]
    np.testing.assert_allclose(out[:, 4], [0.5])
    # multi_label needs nc > 1; a (pred, train_out) tuple uses its first item.
    assert len(non_max_suppression((p, None), 0.2, 0.45, multi_label=True)[0]) == 1
    with pytest.raises(ValueError):
        non_max_suppression(p, 1.5)


# ----------------------------------------------------------------------------- box helpers


def test_box_conversions():
    xyxy = np.array([[10, 20, 30, 60], [0, 0, 1, 1]], np.float32)
    xywh = xyxy2xywh(xyxy)
    np.testing.assert_allclose(xywh, [[20, 40, 20, 40], [0.5, 0.5, 1, 1]])
    np.testing.assert_allclose(xywh2xyxy(xywh), xyxy)
    assert xywh.dtype == np.float32 and xyxy[0, 0] == 10  # inputs untouched
    np.testing.assert_allclose(xywh2xyxy(np.array([[5, 5, 2, 4, 0.7]])), [[4, 3, 6, 7, 0.7]])


def test_clip_and_scale_boxes():
    np.testing.assert_allclose(clip_boxes(np.array([[-5, -1, 50, 70]]), (60, 40)), [[0, 0, 40, 60]])
    # 480x640 (h, w) image letterboxed into 640x640: gain 1, pad (0, 80).
    boxes = np.array([[100, 180, 200, 280], [-10, 70, 700, 600]], np.float32)
    out = scale_boxes((640, 640), boxes, (480, 640))
    np.testing.assert_allclose(out, [[100, 100, 200, 200], [0, 0, 640, 480]])
    assert boxes[0, 1] == 180
    # 240x320 image into 640x640: gain 2, pad (0, 80) in letterbox pixels.
    out = scale_boxes((640, 640), np.array([[100, 180, 200, 280]]), (240, 320))
    np.testing.assert_allclose(out, [[50, 50, 100, 100]])
    # Explicit ratio_pad ((gain_h, gain_w), (pad_w, pad_h)) as the dataloader records it.
    out = scale_boxes((640, 640), np.array([[100, 180, 200, 280]]), (240, 320), ratio_pad=((2, 2), (10, 80)))
    np.testing.assert_allclose(out, [[45, 50, 95, 100]])


def test_box_iou():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 5], [20, 20, 30, 30]])
    np.testing.assert_allclose(box_iou(a, b), [[0.5, 0.0]])


def test_no_torch_import():
    code = "import sys, research.vision.boxes; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=__import__("conftest").ROOT)


# ----------------------------------------------------------------------------- visualize


def test_draw_detections(tmp_path):
    from PIL import Image

    from research.vision.plots import class_color, draw_detections

    image = np.full((120, 160, 3), 40, np.uint8)
    dets = np.array([[20, 40, 100, 110, 0.87, 2], [110, 10, 150, 50, 0.3, 25]], np.float32)
    path = tmp_path / "out" / "dets.png"
    drawn = draw_detections(image, dets, ["a", "b", "circle"], path)
    assert image.max() == 40  # input untouched
    im = np.asarray(Image.open(path))
    assert im.shape == (120, 160, 3) and im.dtype == np.uint8
    np.testing.assert_array_equal(im, drawn)
    c2, c25 = class_color(2), class_color(25)
    assert c25 == class_color(5) and c2 != c25
    # Left / bottom / right edges (line width 2 at this size) carry the class colour.
    for y, x in [(80, 20), (80, 21), (110, 60), (109, 60), (75, 100)]:
        assert tuple(im[y, x]) == c2, (y, x, im[y, x])
    assert tuple(im[30, 150]) == c25
    assert tuple(im[80, 60]) == (40, 40, 40)  # box interior unchanged
    # Label box sits above the first box, filled with its colour and containing white text.
    label = im[max(0, 40 - 20):40, 20:60].reshape(-1, 3)
    assert (label == c2).all(1).any() and (label == 255).all(1).any()
    # Empty detections: image returned unchanged.
    np.testing.assert_array_equal(draw_detections(image, np.zeros((0, 6)), None, None), image)


def test_plot_curves(tmp_path):
    import json

    from PIL import Image

    from research.vision.plots import plot_curves

    recs = []
    for step in range(0, 100, 10):
        r = {"step": step, "train/loss": 3 - step / 50, "train/lbox": 1 - step / 200, "train/lobj": 1.0,
             "train/lcls": 0.5, "train/lr": 0.01}
        if step % 30 == 0:
            r.update({"eval/mAP50": step / 100, "eval/mAP50_95": step / 200, "eval/mAP_small": -1.0})
        recs.append(r)
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n{truncated\n")
    out = plot_curves(path, tmp_path / "curves.png", panel_size=(3, 2), dpi=50)
    im = Image.open(out)
    im.load()
    # 5 train panels + 1 mAP panel -> 4 columns x 2 rows of 3x2 inch panels at 50 dpi.
    assert im.size == (4 * 3 * 50, 2 * 2 * 50)
    assert np.asarray(im.convert("RGB")).std() > 5
    out = plot_curves([], tmp_path / "empty.png", dpi=50)
    assert Image.open(out).size == (200, 150)


# ----------------------------------------------------------------------------- array-module generic box ops
# (DETR / RT-DETR box_ops semantics, numpy or jax, jit-able)


def test_generic_box_ops_hand_values_numpy():
    from research.vision import boxes as B
    b1 = np.array([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 2.0]], np.float32)
    b2 = np.array([[1.0, 1.0, 3.0, 3.0], [10.0, 10.0, 11.0, 11.0], [0.0, 0.0, 2.0, 2.0]], np.float32)
    iou, union = B.pairwise_box_iou(b1, b2)
    giou = B.pairwise_generalized_box_iou(b1, b2)
    assert isinstance(iou, np.ndarray) and iou.dtype == np.float32 and iou.shape == (2, 3)
    assert iou[0, 0] == pytest.approx(1 / 7) and union[0, 0] == pytest.approx(7)   # overlap 1, areas 4 + 4
    assert giou[0, 0] == pytest.approx(1 / 7 - 2 / 9)                              # enclosing box 3x3
    assert iou[0, 2] == pytest.approx(1.0) and giou[0, 2] == pytest.approx(1.0)    # identical boxes
    assert iou[0, 1] == 0 and giou[0, 1] == pytest.approx(-(121 - 5) / 121)         # disjoint: -(C - U) / C
    assert iou[1, 0] == pytest.approx(1 / 2)  # [1,1,3,2] vs [1,1,3,3]: inter 2, union 2 + 4 - 2
    # the float64 numpy box_iou of this module gives the same IoU
    np.testing.assert_allclose(iou, box_iou(b1, b2), rtol=1e-6)
    # elementwise = diagonal of pairwise, with broadcasting
    pairs = b2[[0, 2]]
    np.testing.assert_allclose(B.elementwise_box_iou(b1, pairs), np.diag(iou[:, [0, 2]]), rtol=1e-6)
    np.testing.assert_allclose(B.elementwise_generalized_box_iou(b1, pairs), np.diag(giou[:, [0, 2]]), rtol=1e-6)
    np.testing.assert_allclose(B.elementwise_generalized_box_iou(b1[:, None], b2[None]), giou, rtol=1e-6)
    np.testing.assert_allclose(B.box_area(b2), [4.0, 1.0, 4.0])
    # conversions: hand values, inverse of each other, and the YOLO-style xywh2xyxy on 4 columns
    np.testing.assert_allclose(B.cxcywh_to_xyxy(np.array([0.5, 0.4, 0.2, 0.6], np.float32)), [0.4, 0.1, 0.6, 0.7],
                               atol=1e-7)
    np.testing.assert_allclose(B.xyxy_to_cxcywh(np.array([0.4, 0.1, 0.6, 0.7], np.float32)), [0.5, 0.4, 0.2, 0.6],
                               atol=1e-7)
    c = np.random.default_rng(0).uniform(0.1, 0.9, (2, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(B.xyxy_to_cxcywh(B.cxcywh_to_xyxy(c)), c, atol=1e-6)
    np.testing.assert_allclose(B.cxcywh_to_xyxy(c[0]), xywh2xyxy(c[0]), atol=1e-7)
    np.testing.assert_allclose(B.xyxy_to_cxcywh(c[0]), xyxy2xywh(c[0]), atol=1e-7)


def test_generic_box_ops_jax_equal_numpy_and_jit():
    import jax
    import jax.numpy as jnp

    from research.vision import boxes as B
    rs = np.random.default_rng(1)
    cxcywh1 = rs.uniform(0.05, 0.9, (6, 4)).astype(np.float32)
    cxcywh2 = rs.uniform(0.05, 0.9, (4, 4)).astype(np.float32)
    a, b = B.cxcywh_to_xyxy(cxcywh1), B.cxcywh_to_xyxy(cxcywh2)
    assert B.array_module(a, b) is np and B.array_module(a, jnp.asarray(b)) is jnp

    @jax.jit
    def all_ops(c1, c2):
        x1, x2 = B.cxcywh_to_xyxy(c1), B.cxcywh_to_xyxy(c2)
        iou, union = B.pairwise_box_iou(x1, x2)
        return (x1, B.xyxy_to_cxcywh(x1), iou, union, B.pairwise_generalized_box_iou(x1, x2),
                B.elementwise_box_iou(x1[:4], x2), B.elementwise_generalized_box_iou(x1[:4], x2))

    got = all_ops(jnp.asarray(cxcywh1), jnp.asarray(cxcywh2))
    assert all(isinstance(g, jax.Array) for g in got)
    iou, union = B.pairwise_box_iou(a, b)
    want = (a, B.xyxy_to_cxcywh(a), iou, union, B.pairwise_generalized_box_iou(a, b),
            B.elementwise_box_iou(a[:4], b), B.elementwise_generalized_box_iou(a[:4], b))
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-6)
    # torch re-statement of the DETR formulas (float32): same values
    t1, t2 = torch.from_numpy(a), torch.from_numpy(b)
    lt, rb = torch.max(t1[:, None, :2], t2[None, :, :2]), torch.min(t1[:, None, 2:], t2[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda t: (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])  # noqa: E731
    t_union = area(t1)[:, None] + area(t2)[None, :] - inter
    lt, rb = torch.min(t1[:, None, :2], t2[None, :, :2]), torch.max(t1[:, None, 2:], t2[None, :, 2:])
    enclosing = (rb - lt).clamp(min=0).prod(-1)
    t_giou = inter / t_union - (enclosing - t_union) / enclosing
    np.testing.assert_allclose(np.asarray(got[4]), t_giou.numpy(), rtol=1e-6, atol=1e-7)
    # gradients flow (the GIoU loss is differentiated under jit)
    g = jax.grad(lambda x: jnp.sum(B.elementwise_generalized_box_iou(B.cxcywh_to_xyxy(x), jnp.asarray(b[:1]))))(
        jnp.asarray(cxcywh1[:1]))
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0
