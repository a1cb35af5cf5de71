"""The evaluator scores COCO against the folder's annotation json (config.eval.annotations)."""

import json
import os

import cv2
import numpy as np
import pytest

from configs.yolov5 import get_config
from research.yolov5 import data
from research.yolov5.task import Task


def _coco_folder(root):
    for d in ("annotations", "train2017", "val2017"):
        os.makedirs(root / d)
    cv2.imwrite(str(root / "val2017" / "p.png"), np.full((60, 80, 3), 90, np.uint8))
    cv2.imwrite(str(root / "val2017" / "q.png"), np.full((40, 50, 3), 90, np.uint8))
    cv2.imwrite(str(root / "train2017" / "t.png"), np.full((40, 50, 3), 90, np.uint8))
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    val = {"images": [{"id": 7, "file_name": "p.png", "height": 60, "width": 80},
                      {"id": 8, "file_name": "q.png", "height": 40, "width": 50}],
           "annotations": [
               {"id": 1, "image_id": 7, "category_id": 1, "bbox": [20, 10, 30, 20], "area": 600, "iscrowd": 0},
               # a crowd region: ignored by COCOeval, dropped by the loader
               {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 1},
               # reaches outside the image: the loader clips it to [30, 20, 20, 20], the file keeps it
               {"id": 3, "image_id": 8, "category_id": 3, "bbox": [30, 20, 40, 40], "area": 1600, "iscrowd": 0}],
           "categories": cats}
    train = {"images": [{"id": 1, "file_name": "t.png", "height": 40, "width": 50}],
             "annotations": [{"id": 9, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10], "iscrowd": 0}],
             "categories": cats}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(val))
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(train))


SHAPES = []


class _GroundTruthAsPredictions(Task):
    """Detections = the loader's ground-truth boxes, in network-input pixels, confidence 1."""

    def predictions(self, variables, onnx_path, split):
        rect = max(self.model.strides) if self.config.eval.rect else 0
        loader = data.loader(self.dataset, split, train=False, batch_size=2, hyp=self.config.hyp,
                             seed=0, process_index=0, process_count=1, rect_stride=rect)
        SHAPES.clear()
        for batch in loader:
            SHAPES.append(batch["image"].shape[1:3])
            hw = np.array(batch["image"].shape[1:3])
            pred = np.zeros((len(batch["image"]), 10, 85), np.float32)
            for i in range(len(pred)):
                for j in np.flatnonzero(batch["valid"][i]):
                    pred[i, j, :4] = batch["boxes"][i, j] * hw[[1, 0, 1, 0]]
                    pred[i, j, 4] = 1.0
                    pred[i, j, 5 + batch["classes"][i, j]] = 1.0
            yield batch, pred


@pytest.fixture(scope="module")
def coco_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    _coco_folder(root)
    c = get_config("data=coco")
    c.data.manual_dir = str(root)
    c.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    c.data.image_size, c.data.max_labels, c.data.num_workers = 64, 4, 0
    c.model.variant = "tiny"
    c.eval.batch_size = 2
    return c, root


def _score(c, setting, rect=True):
    c.eval.annotations, c.eval.rect = setting, rect
    (evaluator,) = _GroundTruthAsPredictions(c).evaluators()
    res = dict(evaluator.run(None))
    return [round(res["eval/mAP50"], 6), round(res["eval/mAP50_95"], 6)]


def test_annotation_file_is_the_ground_truth(coco_task):
    c, root = coco_task
    assert _score(c, "labels", rect=False) == [1.0, 1.0]
    assert SHAPES == [(64, 64)]
    assert _score(c, "labels") == [1.0, 1.0]
    assert SHAPES == [(96, 96)]  # rect: one batch holding ratios 0.75 and 0.8 -> (64 * 0.8 / 32 + 0.5) strides
    # against the file: the person is found (its crowd region does not count), the clipped car box
    # overlaps the file's car box by IoU 0.25 only: AP 1 for person, 0 for car
    assert _score(c, "auto") == [0.5, 0.5]
    path = str(root / "annotations" / "instances_val2017.json")
    assert _score(c, path) == [0.5, 0.5]
    with pytest.raises(FileNotFoundError, match="config.eval.annotations not found"):
        _score(c, str(root / "nope.json"))


def test_shapes_auto_uses_the_labels(tmp_path):
    c = get_config("smoke")
    c.data.data_dir = str(tmp_path / "tfds")
    assert Task(c).dataset.annotation_file("validation", "auto") is None


class _PerfectFromRecords(Task):
    """Detections = every ground-truth box of the records (not the capped batch), confidence 1."""

    def predictions(self, variables, onnx_path, split):
        from research.data import pipeline
        truth = pipeline.ground_truth(str(self.dataset.builder.data_dir), split)
        loader = data.loader(self.dataset, split, train=False, batch_size=2, hyp=self.config.hyp,
                             seed=0, process_index=0, process_count=1)
        for batch in loader:
            pred = np.zeros((len(batch["image"]), 32, 5 + len(self.class_names)), np.float32)
            for i, image_id in enumerate(batch["image_id"]):
                if image_id < 0:
                    continue
                classes, xyxy = truth[int(image_id)]
                r, (dw, dh) = float(batch["ratio"][i]), batch["pad"][i]
                for j, (c, (x1, y1, x2, y2)) in enumerate(zip(classes, xyxy)):
                    pred[i, j, :4] = [(x1 + x2) / 2 * r + dw, (y1 + y2) / 2 * r + dh, (x2 - x1) * r, (y2 - y1) * r]
                    pred[i, j, 4] = 1.0
                    pred[i, j, 5 + c] = 1.0
            yield batch, pred


def test_scoring_sees_every_box_not_the_training_cap(tmp_path):
    """Issue 10 case 6: data.max_labels caps the batches, not the ground truth that scores them."""
    from research.data import pipeline
    c = get_config("smoke")
    c.data.data_dir = str(tmp_path / "tfds")
    c.eval.conf_thres = 0.5
    task = _PerfectFromRecords(c)
    truth = pipeline.ground_truth(str(task.dataset.builder.data_dir), "validation")
    assert max(len(v[0]) for v in truth.values()) >= 3  # images with more boxes than the cap below
    for cap in (16, 1):
        c.data.max_labels = cap
        (evaluator,) = _PerfectFromRecords(c).evaluators()
        res = dict(evaluator.run(None))
        assert res["eval/mAP50"] == pytest.approx(1.0) and res["eval/mAP50_95"] > 0.99, (cap, res)


def test_empty_validation_split_trains_without_evaluation_and_names_the_json(tmp_path):
    """Issue 10 case 4: a val json with no images used to stop everything with a tfds assertion."""
    from research import modes
    root = tmp_path / "coco"
    _coco_folder(root)
    val = root / "annotations" / "instances_val2017.json"
    val.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}))
    c = get_config("data=coco")
    c.data.manual_dir, c.data.data_dir = str(root), str(tmp_path / "tfds")
    c.data.image_size, c.data.max_labels, c.data.num_workers = 64, 4, 0
    c.model.variant, c.batch_size, c.nbs, c.total_steps = "tiny", 1, 1, 2
    c.eval_every_steps, c.autoanchor = 0, False
    res = modes.run(c, str(tmp_path / "wd"), "train")  # evaluation off: trains
    assert res["perf/train_step_compiles"] == 1
    listed = json.load(open(tmp_path / "wd" / "data_problems.json"))  # listed before training
    assert [(os.path.basename(p["file"]), p["what"]) for p in listed["problems"]] == [
        ("instances_val2017.json", '"images" is empty')]
    with pytest.raises(ValueError, match=r"no 'validation' split \(.*instances_val2017.json\): it lists no images"):
        modes.run(c, str(tmp_path / "wd"), "eval")
    train = root / "annotations" / "instances_train2017.json"
    train.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    c.data.data_dir = str(tmp_path / "tfds2")
    with pytest.raises(ValueError, match=r"instances_train2017.json: \"images\" is empty"):
        modes.run(c, str(tmp_path / "wd2"), "train")


def test_valid_coco_json_that_pycocotools_cannot_read_is_scored_as_trained(tmp_path):
    """Issue 10 case 2: no area / iscrowd, string ids, a null bbox with a polygon, a null bbox without:
    the builder and the evaluator read the same normalised annotations (ground truth as predictions
    scores 1.0; it crashed with KeyError 'iscrowd' / 'area' / image id)."""
    root = tmp_path / "coco"
    _coco_folder(root)
    cv2.imwrite(str(root / "val2017" / "p.png"), np.full((60, 80, 3), 90, np.uint8))
    val = {"images": [{"id": "7", "file_name": "p.png", "height": 60, "width": 80}],
           "annotations": [
               {"id": 1, "image_id": "7", "category_id": 1, "bbox": [20, 10, 30, 20]},
               {"id": 2, "image_id": "7", "category_id": 3, "bbox": None,
                "segmentation": [[5, 30, 15, 30, 15, 50, 5, 50]]},
               {"id": 3, "image_id": "7", "category_id": 3, "bbox": None}],
           "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(val))
    c = get_config("data=coco")
    c.data.manual_dir, c.data.data_dir = str(root), str(tmp_path / "tfds")
    c.data.image_size, c.data.max_labels, c.data.num_workers = 64, 4, 0
    c.model.variant, c.eval.batch_size, c.eval.rect = "tiny", 2, False
    task = _GroundTruthAsPredictions(c)
    from research.data import pipeline
    truth = pipeline.ground_truth(str(task.dataset.builder.data_dir), "validation")
    classes, xyxy = truth[7]
    assert sorted(classes.tolist()) == [0, 2]  # person, and the car boxed from its polygon (index 2 of 80)
    np.testing.assert_allclose(xyxy[classes.tolist().index(2)], [5, 30, 15, 50], atol=0.01)
    (evaluator,) = task.evaluators()
    res = dict(evaluator.run(None))
    assert res["eval/mAP50"] == pytest.approx(1.0), res
