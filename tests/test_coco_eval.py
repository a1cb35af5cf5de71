"""research/evaluation/coco.py: CocoDetectionEvaluator and coco_gt_from_arrays on pycocotools."""

import io
import json
import contextlib

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from research.evaluation import coco as coco_lib
from research.evaluation.coco import (STAT_NAMES, CocoDetectionEvaluator, coco80_to_coco91_class,
                                      coco_gt_from_arrays)

# pycocotools divides by (tp + fp + eps), so a perfect score is 1 - 2**-52 rather than 1.
ONE = pytest.approx(1.0, abs=1e-12)


def make_gt(label_to_category_id=None, categories=("circle", "square", "triangle")):
    """Three 200x300 images; boxes of 100x100 (large) and 40x40 (medium), no small objects."""
    images = [dict(id=i, height=200, width=300, file_name=f"{i}.png") for i in (11, 12, 13)]
    boxes = [
        np.array([[10, 10, 110, 110], [150, 20, 190, 60]], np.float32),
        np.array([[100, 50, 200, 150]], np.float32),
        np.array([[20, 30, 120, 130], [200, 100, 240, 140], [0, 0, 0, 0]], np.float32),
    ]
    labels = [np.array([0, 1]), np.array([2]), np.array([1, 0, -1])]  # -1 row = padding
    gt = coco_gt_from_arrays(images, boxes, labels, list(categories), label_to_category_id)
    return gt, images, boxes, labels


def add_all(ev, images, boxes, labels, shift=0.0, scores=None, label_offset=0):
    for img, b, lab in zip(images, boxes, labels):
        keep = lab >= 0
        b = b[keep].copy()
        b[:, [0, 2]] += shift
        s = np.ones(len(b), np.float32) if scores is None else scores[: len(b)]
        ev.add(img["id"], b, s, (lab[keep] + label_offset) % 3)


def test_gt_from_arrays():
    gt, *_ = make_gt()
    assert isinstance(gt, COCO)
    assert sorted(gt.getImgIds()) == [11, 12, 13]
    anns = gt.loadAnns(gt.getAnnIds())
    assert len(anns) == 5 and min(a["id"] for a in anns) == 1  # padding skipped, ids from 1
    a = gt.loadAnns(gt.getAnnIds(imgIds=[12]))[0]
    assert a["bbox"] == [100, 50, 100, 100] and a["area"] == 10000 and a["iscrowd"] == 0
    assert a["category_id"] == 2
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == ["circle", "square", "triangle"]


def test_perfect_predictions():
    gt, images, boxes, labels = make_gt()
    ev = CocoDetectionEvaluator(gt)
    add_all(ev, images, boxes, labels)
    r = ev.result()
    assert set(STAT_NAMES) <= set(r) and len(STAT_NAMES) == 12
    assert r["mAP50"] == ONE and r["mAP50_95"] == ONE and r["mAP75"] == ONE
    assert r["mAP_medium"] == ONE and r["mAP_large"] == ONE and r["AR100"] == ONE
    assert r["mAP_small"] == -1.0 and r["AR_small"] == -1.0  # no small gt: undefined, as pycocotools


def test_shifted_predictions_known_iou():
    # Shift every box by 10% of its width along x: IoU = 0.9 / 1.1 = 0.818..., which matches at the
    # thresholds 0.50, 0.55, ..., 0.80 (7 of 10) and misses at 0.85, 0.90, 0.95.
    gt, images, boxes, labels = make_gt()
    ev = CocoDetectionEvaluator(gt)
    for img, b, lab in zip(images, boxes, labels):
        keep = lab >= 0
        b = b[keep].copy()
        dx = 0.1 * (b[:, 2] - b[:, 0])
        b[:, 0] += dx
        b[:, 2] += dx
        ev.add(img["id"], b, np.full(len(b), 0.9, np.float32), lab[keep])
    r = ev.result()
    assert r["mAP50"] == ONE
    assert r["mAP75"] == ONE
    assert r["mAP50_95"] == pytest.approx(0.7, abs=1e-12)
    assert r["AR100"] == pytest.approx(0.7, abs=1e-12)


def test_wrong_class_and_empty():
    gt, images, boxes, labels = make_gt()
    ev = CocoDetectionEvaluator(gt)
    add_all(ev, images, boxes, labels, label_offset=1)
    r = ev.result()
    assert r["mAP50"] == 0.0 and r["mAP50_95"] == 0.0

    ev = CocoDetectionEvaluator(gt)
    for img in images:
        ev.add(img["id"], np.zeros((0, 4), np.float32), np.zeros(0), np.zeros(0, np.int64))
    r = ev.result()
    assert r["mAP50"] == 0.0 and r["mAP50_95"] == 0.0 and r["AR100"] == 0.0
    assert ev.num_images == 3 and ev.num_detections == 0

    assert CocoDetectionEvaluator(gt).result() == {name: 0.0 for name in STAT_NAMES}  # nothing added


def test_restrict_to_added_images_and_extra_false_positive():
    gt, images, boxes, labels = make_gt()
    ev = CocoDetectionEvaluator(gt)
    add_all(ev, images[:1], boxes[:1], labels[:1])
    assert ev.result()["mAP50_95"] == ONE
    ev_all = CocoDetectionEvaluator(gt, restrict_to_added_images=False)
    add_all(ev_all, images[:1], boxes[:1], labels[:1])
    assert ev_all.result()["AR100"] < 1.0

    # A low-scoring false positive ranked after all true positives leaves AP at 1.
    ev = CocoDetectionEvaluator(gt)
    add_all(ev, images, boxes, labels)
    ev.add(12, np.array([[0, 0, 30, 30]]), np.array([0.1]), np.array([2]))
    assert ev.result()["mAP50"] == ONE
    with pytest.raises(KeyError):
        ev.add(99, np.zeros((0, 4)), np.zeros(0), np.zeros(0))


def test_json_like_val_py_and_equivalence(tmp_path):
    gt, images, boxes, labels = make_gt()
    ev = CocoDetectionEvaluator(gt.dataset)  # dict input
    ev.add(11, np.array([[10.12345, 20.5, 50.0, 60.25]], np.float32), np.array([0.123456789], np.float32),
           np.array([1]))
    add_all(ev, images, boxes, labels, shift=3.0, scores=np.array([0.8, 0.7, 0.6], np.float32))
    path = ev.to_json(tmp_path / "sub" / "predictions.json")
    dets = json.load(open(path))
    assert dets[0]["image_id"] == 11 and dets[0]["category_id"] == 1
    assert dets[0]["bbox"] == [10.123, 20.5, 39.877, 39.75]  # top-left x, y, w, h rounded to 3
    assert dets[0]["score"] == 0.12346  # rounded to 5
    assert len(dets) == 1 + 5

    # result() equals pycocotools run on the written file, the val.py way.
    with contextlib.redirect_stdout(io.StringIO()):
        e = COCOeval(gt, gt.loadRes(str(path)), "bbox")
        e.params.imgIds = [11, 12, 13]
        e.evaluate()
        e.accumulate()
        e.summarize()
    r = ev.result()
    np.testing.assert_array_equal([r[n] for n in STAT_NAMES], e.stats)
    assert 0.0 < r["mAP50_95"] < 1.0


def test_coco80_to_coco91_round_trip(tmp_path):
    ids = coco80_to_coco91_class()
    assert len(ids) == 80 and ids[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13] and ids[-1] == 90
    names = [f"class{k}" for k in range(80)]
    images = [dict(id=1, height=480, width=640), dict(id=2, height=480, width=640)]
    boxes = [np.array([[10, 10, 110, 110], [200, 200, 260, 240]], np.float32),
             np.array([[300, 100, 400, 300]], np.float32)]
    labels = [np.array([11, 79]), np.array([25])]  # -> category ids 13, 90, 28
    gt = coco_gt_from_arrays(images, boxes, labels, names, label_to_category_id=ids)
    assert sorted(a["category_id"] for a in gt.loadAnns(gt.getAnnIds())) == [13, 28, 90]

    ev = CocoDetectionEvaluator(gt, label_to_category_id=ids)
    for img, b, lab in zip(images, boxes, labels):
        ev.add(img["id"], b, np.ones(len(b)), lab)
    r = ev.result()
    assert r["mAP50_95"] == ONE and r["mAP50"] == ONE
    dets = json.load(open(ev.to_json(tmp_path / "p.json")))
    assert sorted(d["category_id"] for d in dets) == [13, 28, 90]

    # Without the mapping the contiguous labels land on the wrong categories.
    ev = CocoDetectionEvaluator(gt)
    for img, b, lab in zip(images, boxes, labels):
        ev.add(img["id"], b, np.ones(len(b)), lab)
    assert ev.result()["mAP50"] == 0.0


def test_quiet_stdout(capsys):
    gt, images, boxes, labels = make_gt()
    ev = CocoDetectionEvaluator(gt)
    add_all(ev, images, boxes, labels)
    ev.result()
    assert capsys.readouterr().out == ""
    assert coco_lib.load_coco_gt(gt) is gt
