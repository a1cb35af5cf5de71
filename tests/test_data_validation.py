"""The data validation pass (issue 10): every problem of a COCO folder listed once, before the run,
as one list (file, ids, what, what was done), kept next to the prepared data and written to the
workdir; and what it says was done is what the prepared data holds."""

import json
import logging as py_logging
import os

import cv2
import numpy as np

from configs.yolov5 import get_config
from research.data import detection, pipeline, validation


def _folder(root):
    for d in ("annotations", "train2017", "val2017"):
        os.makedirs(root / d)
    cv2.imwrite(str(root / "train2017" / "t.png"), np.full((40, 50, 3), 90, np.uint8))
    cv2.imwrite(str(root / "val2017" / "p.png"), np.full((60, 80, 3), 90, np.uint8))
    cv2.imwrite(str(root / "val2017" / "q.png"), np.full((40, 50, 3), 90, np.uint8))
    (root / "val2017" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    train = {"images": [{"id": 1, "file_name": "t.png", "height": 40, "width": 50}],
             "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10]}],
             "categories": cats}
    val = {"images": [{"id": 7, "file_name": "p.png", "height": 60, "width": 80},
                      {"id": 8, "file_name": "bad.jpg"},
                      {"id": 9, "file_name": "q.png", "height": 30, "width": 30},
                      {"id": "x", "file_name": "r.png"},
                      {"id": 10}],
           "annotations": [
               {"id": 1, "image_id": 7, "category_id": 1, "bbox": [20, 10, 30, 20]},
               {"id": 2, "image_id": 7, "category_id": 1, "bbox": [70, 50, 30, 20]},
               {"id": 3, "image_id": 7, "category_id": 1, "bbox": [100, 100, 5, 5]},
               {"id": 4, "image_id": 7, "category_id": 1, "bbox": [1, 1, 0, 5]},
               {"id": 5, "image_id": 7, "category_id": 12, "bbox": [1, 1, 5, 5]},
               {"id": 6, "image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5]},
               {"id": 7, "image_id": 7, "category_id": 3, "bbox": None,
                "segmentation": [[5, 30, 15, 30, 15, 50, 5, 50]]},
               {"id": 8, "image_id": 7, "category_id": 3, "bbox": None},
               {"id": 9, "image_id": "abc", "category_id": 1, "bbox": [1, 1, 5, 5]},
               {"id": 10, "image_id": 7, "category_id": 1, "bbox": [1, 2, 3]}],
           "categories": cats}
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(train))
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(val))


def test_one_report_names_every_problem_and_matches_the_prepared_data(tmp_path, caplog):
    root = tmp_path / "coco"
    _folder(root)
    c = get_config("data=coco")
    c.data.manual_dir, c.data.data_dir = str(root), str(tmp_path / "tfds")
    with caplog.at_level(py_logging.WARNING):
        ds = detection.DetectionData(c.data)
    # preparing lists nothing piecemeal: the problems come as one list (below)
    assert not [r for r in caplog.records if r.getMessage().startswith("coco:")], caplog.text
    caplog.clear()
    problems = ds.problems()
    val = str(root / "annotations" / "instances_val2017.json")
    got = [(os.path.basename(p.file), p.image_id, p.annotation_id, p.action) for p in problems]
    assert got == [
        ("instances_val2017.json", None, None, "dropped"),                       # image id "x"
        ("instances_val2017.json", 7, 7, "box taken from its polygon segmentation"),
        ("instances_val2017.json", 7, 8, "dropped"),                             # no bbox, no polygon
        ("instances_val2017.json", None, 9, "dropped"),                          # image id "abc"
        ("instances_val2017.json", 7, 10, "dropped"),                            # 3-number bbox
        ("instances_val2017.json", 10, None, "skipped"),                         # no file_name
        ("instances_val2017.json", 99, 6, "dropped"),                            # image 99 not listed
        ("instances_val2017.json", 7, 2, "clipped to the image"),
        ("instances_val2017.json", 7, 3, "dropped"),                             # outside the image
        ("instances_val2017.json", 7, 4, "dropped"),                             # zero width
        ("bad.jpg", 8, None, "image skipped with its annotations"),
        ("instances_val2017.json", 9, None, "decoded size used"),
        ("instances_val2017.json", None, None, "its boxes dropped"),             # category 12
    ], got
    assert "category id 12" in problems[-1].what and "annotation 5 of image 7" in problems[-1].what
    assert problems[0].file == val
    # what the report says was done is what the prepared data holds
    truth = pipeline.ground_truth(str(ds.builder.data_dir), "validation")
    assert sorted(truth) == [7, 9]
    classes, xyxy = truth[7]
    order = np.lexsort((xyxy[:, 1], xyxy[:, 0]))
    np.testing.assert_allclose(xyxy[order], [[5, 30, 15, 50], [20, 10, 50, 30], [70, 50, 80, 60]], atol=0.01)
    # the same list again for a run that reuses the prepared data, published once to the workdir
    again = detection.DetectionData(c.data).problems()
    assert again == problems
    with caplog.at_level(py_logging.WARNING):
        path = validation.publish(again, str(tmp_path / "wd"), what="yolov5 data")
    written = json.load(open(path))
    assert written["count"] == 13 and written["problems"][7]["annotation_id"] == 2
    msgs = [r.getMessage() for r in caplog.records if "data validation:" in r.getMessage()]
    assert len(msgs) == 1 and "13 problem(s)" in msgs[0] and "bad.jpg [image 8]: cannot decode" in msgs[0]


def test_clean_folder_reports_nothing(tmp_path):
    root = tmp_path / "coco"
    _folder(root)
    clean = {"images": [{"id": 7, "file_name": "p.png", "height": 60, "width": 80}],
             "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [20, 10, 30, 20], "area": 600,
                              "iscrowd": 0}],
             "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(clean))
    c = get_config("data=coco")
    c.data.manual_dir, c.data.data_dir = str(root), str(tmp_path / "tfds")
    assert detection.DetectionData(c.data).problems() == []
    path = validation.publish([], str(tmp_path / "wd"))
    assert json.load(open(path)) == {"count": 0, "problems": []}
