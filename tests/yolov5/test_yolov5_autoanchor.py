"""research/yolov5/autoanchor.py (the official anchor check) and its use by the YOLOv5 task."""

import json
import os

import numpy as np
import pytest

from configs.yolov5 import get_config
from research.yolov5 import autoanchor
from research.yolov5.task import AUTOANCHOR_FILE, Task

COCO_ANCHORS = np.array([[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
                        np.float32).reshape(3, 3, 2)


def test_metrics_by_hand():
    wh = np.array([[10, 10], [100, 5], [30, 12]], np.float32)
    # label 1 fits exactly; label 2 is 10x too wide for [10, 10]; label 3: ratios 3 and 1.2 (< 4)
    bpr, aat = autoanchor.anchor_metrics(wh, np.array([[10, 10]]), thr=4.0)
    assert bpr == pytest.approx(2 / 3) and aat == pytest.approx(2 / 3)
    bpr, aat = autoanchor.anchor_metrics(wh, np.array([[10, 10], [100, 5]]), thr=4.0)
    assert bpr == 1.0 and aat == pytest.approx(4 / 3)  # label 3 vs [100, 5]: 100/30 and 12/5 < 4


def test_label_sizes_letterbox_scale():
    wh = autoanchor.label_sizes(np.array([[200, 100], [50, 100]]), [np.array([[0.5, 0.5]]), np.zeros((0, 2))], 640)
    np.testing.assert_allclose(wh, [[320, 160]])
    aug = autoanchor.label_sizes(np.array([[200, 100]] * 50), [np.array([[0.5, 0.5]])] * 50, 640,
                                 np.random.default_rng(0))
    ratio = aug[:, 0] / 320
    assert 0.9 <= ratio.min() < 0.95 and 1.05 < ratio.max() <= 1.1  # the U(0.9, 1.1) image scale


def _elongated(n=400, seed=0):
    rs = np.random.RandomState(seed)
    shapes = np.tile([[640, 480]], (n, 1))
    # thin horizontal bars: width 16-30x the height, which no COCO anchor matches within 4x
    h = rs.uniform(0.005, 0.02, n)
    w = h * rs.uniform(16, 30, n) * 480 / 640  # pixel width / height = 16..30
    return shapes, [np.array([[a, b]]) for a, b in zip(w, h)]


def test_poor_fit_gets_evolved_anchors_deterministically():
    shapes, wh = _elongated()
    r1 = autoanchor.check_anchors(shapes, wh, COCO_ANCHORS, 4.0, 640, seed=3, gen=300)
    assert r1["bpr"] < 0.8 and r1["changed"]
    assert r1["new_bpr"] > 0.98 and r1["new_bpr"] > r1["bpr"]
    a = np.asarray(r1["anchors"])
    assert a.shape == (3, 3, 2)
    area = a.reshape(-1, 2).prod(1)
    assert np.all(np.diff(area) >= 0)  # small to large: follows the strides
    assert np.all(a[..., 0] > 3 * a[..., 1])  # the anchors became bars too
    r2 = autoanchor.check_anchors(shapes, wh, COCO_ANCHORS, 4.0, 640, seed=3, gen=300)
    assert r2["anchors"] == r1["anchors"]


def test_good_fit_keeps_anchors():
    rs = np.random.RandomState(1)
    shapes = np.tile([[640, 640]], (200, 1))
    wh = [COCO_ANCHORS.reshape(-1, 2)[rs.randint(9, size=2)] / 640 * rs.uniform(0.8, 1.2, (2, 1))
          for _ in range(200)]
    r = autoanchor.check_anchors(shapes, wh, COCO_ANCHORS, 4.0, 640)
    assert r["bpr"] > 0.98 and not r["changed"] and r["anchors"] == COCO_ANCHORS.tolist()


def _tiny_task(tmp_path):
    c = get_config("smoke")
    c.data.data_dir = str(tmp_path / "tfds")
    return c, Task(c)


def test_task_records_and_reuses_anchors(tmp_path):
    c, task = _tiny_task(tmp_path)
    wd = tmp_path / "wd"
    wd.mkdir()
    task.prepare(str(wd), "eval")  # no record and not training: nothing happens
    assert not (wd / AUTOANCHOR_FILE).exists()
    task.prepare(str(wd), "train")
    report = json.loads((wd / AUTOANCHOR_FILE).read_text())
    assert report["labels"] > 0 and 0 < report["bpr"] <= 1
    np.testing.assert_allclose(task.model.anchors_pixels, report["anchors"])
    # a recorded change is what later modes (and resumed runs) use
    new = (np.asarray(report["anchors"]) * 0.5).tolist()
    report["anchors"] = new
    (wd / AUTOANCHOR_FILE).write_text(json.dumps(report))
    _, task2 = _tiny_task(tmp_path)
    task2.prepare(str(wd), "eval")
    np.testing.assert_allclose(task2.model.anchors_pixels, new)
    np.testing.assert_allclose(task2.anchors, np.asarray(new) / np.asarray(task2.model.strides)[:, None, None])
    # a record for another model is a clear error
    (wd / AUTOANCHOR_FILE).write_text(json.dumps({"anchors": [[1, 2]]}))
    with pytest.raises(ValueError, match=AUTOANCHOR_FILE):
        _tiny_task(tmp_path)[1].prepare(str(wd), "eval")
    (wd / AUTOANCHOR_FILE).write_text('{"anchors": [[1, 2')  # cut short
    with pytest.raises(ValueError, match=AUTOANCHOR_FILE):
        _tiny_task(tmp_path)[1].prepare(str(wd), "eval")


def test_autoanchor_off_and_resumed_runs_skip_the_check(tmp_path):
    c, task = _tiny_task(tmp_path)
    c.autoanchor = False
    wd = tmp_path / "off"
    wd.mkdir()
    task.prepare(str(wd), "train")
    assert not (wd / AUTOANCHOR_FILE).exists()
    c.autoanchor = True
    os.makedirs(wd / "checkpoints" / "100")  # a run already under way keeps its anchors
    task.prepare(str(wd), "train")
    assert not (wd / AUTOANCHOR_FILE).exists()
