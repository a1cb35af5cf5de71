"""CrowdPose scoring (crowdposetools' COCOeval differences on pycocotools), against values worked out by hand.

The case: three images, one ground-truth person each (bbox 100 x 80, so the toolkit's area is 0.53 * 8000 = 4240),
and detections whose keypoints are the ground truth shifted in x by d_j with d_j^2 = -ln(o) * 2 * area * (2 sigma_j)^2,
so that every joint's OKS term, and the person's OKS, is exactly o:

  image 1, crowdIndex 0.15: person A; detection d1 OKS 0.93, score 0.90
  image 2, crowdIndex 0.50: person B; d3 far away (OKS 0), score 0.85; d2 OKS 0.72, score 0.80
  image 3, crowdIndex 0.90: person D; d4 OKS 0.57, score 0.70

OKS thresholds t_i = 0.50 + 0.05 i (i = 0..9). A detection matches at t_i when its OKS >= t_i: d1 for i <= 8, d2 for
i <= 4, d4 for i <= 1. Ranked by score: d1, d3, d2, d4 (3 ground-truth people). Precision at the 101 recall
thresholds r = 0, 0.01, .., 1 is the right-maximum of the precision at the first rank reaching recall >= r (0 when
none does):

  i = 0, 1  (T F T T): recall 1/3 1/3 2/3 1, precision 1 1/2 2/3 3/4 -> maxima 1 3/4 3/4 3/4;
            r <= 1/3 (34 thresholds) 1, the other 67 3/4: mean (34 + 67 * 3/4) / 101 = 84.25 / 101
  i = 2..4  (T F T F): recall 1/3 1/3 2/3 2/3, precision 1 1/2 2/3 1/2 -> r <= 1/3: 1 (34), r <= 2/3: 2/3 (33),
            above: 0: mean (34 + 22) / 101 = 56 / 101
  i = 5..8  (T F F F): r <= 1/3: 1 (34), else 0: 34 / 101
  i = 9     nothing matches: 0

  AP = (2 * 84.25 + 3 * 56 + 4 * 34) / 1010 = 472.5 / 1010; AP50 = 84.25 / 101; AP75 (i = 5) = 34 / 101
  AR = mean of the final recalls (1, 1, 2/3, 2/3, 2/3, 1/3 x 4, 0) = 16/3 / 10; AR50 = 1; AR75 = 1/3

Types with the toolkit's bounds (easy < 0.2 <= medium < 0.8 <= hard), each the mean precision of its images alone:
  easy = image 1: precision 1 at every r for i <= 8, 0 at i = 9 -> 0.9
  medium = image 2: ranks d3 (F), d2 (T for i <= 4): recall 0 1, precision 0 1/2 -> 1/2 at every r for i <= 4 -> 0.25
  hard = image 3: 1 for i <= 1 -> 0.2
With the paper's bounds (0.1, 0.8): easy has no image (-1); medium = images 1 and 2, ranks d1, d3, d2 (2 people):
  i <= 4: recall 1/2 1/2 1, precision 1 1/2 2/3 -> r <= 1/2 (51 thresholds) 1, the other 50 2/3: 253 / 303
  i = 5..8: recall 1/2 only: 51 / 101;  i = 9: 0  -> (5 * 253/303 + 4 * 51/101) / 10 = 1877 / 3030 -> 0.6195
"""

import numpy as np
import pytest

from research.higherhrnet import evaluation

SIGMAS = np.array([.79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89, .79, .79]) / 10.0
W, H = 100.0, 80.0
AREA = 0.53 * W * H


def _person(x0: float, y0: float) -> np.ndarray:
    """[14, 3] keypoints spread inside the box (x0, y0, 100, 80), all visible."""
    k = np.zeros((14, 3))
    k[:, 0] = x0 + 10 + 6 * np.arange(14)
    k[:, 1] = y0 + 5 + 5 * np.arange(14)
    k[:, 2] = 2
    return k


def _shifted(k: np.ndarray, oks: float) -> list[float]:
    d = k.copy()
    d[:, 0] += np.sqrt(-np.log(oks) * 2 * AREA * (2 * SIGMAS) ** 2)
    d[:, 2] = 1
    return d.reshape(-1).tolist()


def _case(with_area: bool):
    people = {1: _person(50, 40), 2: _person(300, 200), 3: _person(20, 30)}
    images = [{"id": i, "width": 640, "height": 480, "crowdIndex": c} for i, c in ((1, 0.15), (2, 0.5), (3, 0.9))]
    anns = []
    for i, k in people.items():
        a = {"id": 10 + i, "image_id": i, "category_id": 1, "keypoints": k.reshape(-1).tolist(), "num_keypoints": 14,
             "bbox": [float(k[0, 0] - 10), float(k[0, 1] - 5), W, H], "iscrowd": 0}
        if with_area:
            a["area"] = W * H  # a COCO-style area: the toolkit ignores it
        anns.append(a)
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}
    far = people[2].copy()
    far[:, 0] += 1000
    results = [{"image_id": 1, "category_id": 1, "keypoints": _shifted(people[1], 0.93), "score": 0.90},
               {"image_id": 2, "category_id": 1, "keypoints": far.reshape(-1).tolist(), "score": 0.85},
               {"image_id": 2, "category_id": 1, "keypoints": _shifted(people[2], 0.72), "score": 0.80},
               {"image_id": 3, "category_id": 1, "keypoints": _shifted(people[3], 0.57), "score": 0.70}]
    return gt, results


HAND = {"AP": 472.5 / 1010, "AP50": 84.25 / 101, "AP75": 34 / 101, "AR": 16 / 30, "AR50": 1.0, "AR75": 1 / 3,
        "AP_easy": 0.9, "AP_medium": 0.25, "AP_hard": 0.2}


@pytest.mark.parametrize("with_area", [False, True])
def test_crowdpose_scores_equal_hand_values(with_area):
    gt, results = _case(with_area)
    got = evaluation.crowdpose_ap(gt, results)
    assert set(got) == set(evaluation.CROWDPOSE_STATS_NAMES)
    for k, v in HAND.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k
    assert "area" not in gt["annotations"][0] or gt["annotations"][0]["area"] == W * H  # input left unchanged


def test_crowdpose_type_bounds_and_crowd_index_argument():
    gt, results = _case(False)
    got = evaluation.crowdpose_ap(gt, results, type_bounds=(0.1, 0.8))
    assert got["AP_easy"] == -1.0 and got["AP_medium"] == 0.6195 and got["AP_hard"] == 0.2
    assert got["AP"] == pytest.approx(HAND["AP"])  # the bounds change only the type split
    # an explicit crowd index map replaces the images' field: image 3 becomes easy
    got = evaluation.crowdpose_ap(gt, results, crowd_index={1: 0.5, 2: 0.5, 3: 0.0})
    assert got["AP_easy"] == 0.2 and got["AP_medium"] == 0.6195 and got["AP_hard"] == -1.0
    empty = evaluation.crowdpose_ap(gt, [], type_bounds=(0.1, 0.8))
    assert empty == dict(HAND, AP=0.0, AP50=0.0, AP75=0.0, AR=0.0, AR50=0.0, AR75=0.0, AP_easy=-1.0, AP_medium=0.0,
                         AP_hard=0.0)
    for im in gt["images"]:
        del im["crowdIndex"]
    with pytest.raises(ValueError, match="image 1 has no crowdIndex"):
        evaluation.crowdpose_ap(gt, results)


def test_coco_scoring_differs_on_the_same_case():
    """pycocotools' COCO keypoint scoring of the same case (COCO area w * h, same sigmas) is not the toolkit's: a
    larger area raises every OKS (d1 0.93 -> 0.93^0.53 = 0.962 passes t = 0.95), so the hand values need the
    toolkit's area."""
    gt, results = _case(True)
    coco = evaluation.oks_ap(gt, results, SIGMAS)
    assert coco["AP"] > HAND["AP"] + 0.01


def test_crowdpose_folder_wiring(tmp_path):
    """`data=crowdpose`: the task reads each evaluated image's crowdIndex from the annotation file and the ground
    truth rebuilt from the records scores 1.0 against itself in every type present, -1 in the empty one."""
    import json
    import os

    import cv2

    from configs.higherhrnet import get_config
    from research.higherhrnet import task as task_lib
    root = tmp_path / "crowdpose"
    os.makedirs(root / "images")
    os.makedirs(root / "json")
    for s in ("trainval", "test"):  # CrowdPose's own layout (CrowdPoseDataset.py): json/crowdpose_<set>.json, images/
        images, anns = [], []
        for i, ci in ((1, 0.05), (2, 0.95)):
            cv2.imwrite(str(root / "images" / f"{i}.jpg"), np.full((200, 200, 3), 60 * i, np.uint8))
            images.append({"id": i, "file_name": f"{i}.jpg", "height": 200, "width": 200, "crowdIndex": ci})
            k = _person(40, 30)
            anns.append({"id": 10 + i, "image_id": i, "category_id": 1, "keypoints": k.reshape(-1).tolist(),
                         "num_keypoints": 14, "bbox": [40.0, 30.0, W, H], "iscrowd": 0})
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]},
                  open(root / "json" / f"crowdpose_{s}.json", "w"))
    c = get_config("variant=tiny,data=crowdpose")
    c.data.manual_dir, c.data.data_dir = str(root), str(tmp_path / "tfds")
    task = task_lib.Task(c, "eval")
    assert task.crowd_index() == {1: 0.05, 2: 0.95}
    gt = task.ground_truth()
    results = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
               for a in gt["annotations"]]
    got = evaluation.crowdpose_ap(gt, results, task.crowd_index())
    assert got["AP"] == pytest.approx(1.0) and got["AR"] == pytest.approx(1.0)
    assert (got["AP_easy"], got["AP_medium"], got["AP_hard"]) == (1.0, -1.0, 1.0)
