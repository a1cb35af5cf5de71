"""SiamFC benchmarks: OTB and GOT-10k scores against the got10k toolkit on the same boxes, the local
OTB builder (its irregular sequences) and the GOT-10k builder's bad input and test subset."""

import os

import cv2
import numpy as np
import pytest

from research.data import pipeline, validation
from research.siamfc import data, evaluation
import siamfc_testlib


def _random_track(rng, n, w=320, h=240, drift=8.0):
    """Ground truth and a noisy tracked copy, `[n, 4]` each; some tracked boxes leave the image."""
    gt = np.zeros((n, 4))
    gt[0] = [rng.uniform(20, 120), rng.uniform(20, 80), rng.uniform(20, 80), rng.uniform(20, 60)]
    for t in range(1, n):
        gt[t] = gt[t - 1] + np.r_[rng.normal(0, 4, 2), rng.normal(0, 1.5, 2)]
        gt[t, 2:] = np.maximum(gt[t, 2:], 5)
    tracked = gt + np.c_[rng.normal(0, drift, (n, 2)), rng.normal(0, drift / 2, (n, 2))]
    tracked[:, 2:] = np.maximum(tracked[:, 2:], 1)
    tracked[n // 2, 0] = w - 10  # partly outside the image: GOT-10k clips, OTB does not
    return np.round(gt, 3), np.round(tracked, 3)


class _Seqs(list):
    """The got10k toolkit's dataset interface over in-memory sequences."""

    def __init__(self, items, names):
        super().__init__(items)
        self.seq_names = names
        self.return_meta = False

    def __getitem__(self, index):  # by position or by name, as the toolkit's datasets
        return super().__getitem__(self.seq_names.index(index) if isinstance(index, str) else index)


def test_otb_scores_equal_the_got10k_toolkit(tmp_path):
    from got10k.experiments import ExperimentOTB
    rng = np.random.default_rng(3)
    names, annos, boxes = [], [], []
    for i, n in enumerate((40, 25, 61)):
        gt, tr = _random_track(rng, n, drift=4.0 + 6 * i)
        names.append(f"seq{i}")
        annos.append(gt)
        boxes.append(tr)
    ours = evaluation.otb_report([evaluation.sequence_curves(b, a) for b, a in zip(boxes, annos)])

    exp = ExperimentOTB.__new__(ExperimentOTB)  # without its dataset download: the same report code
    exp.dataset = _Seqs([([], a) for a in annos], names)
    exp.result_dir, exp.report_dir = str(tmp_path / "results"), str(tmp_path / "reports")
    exp.nbins_iou, exp.nbins_ce = 21, 51
    os.makedirs(os.path.join(exp.result_dir, "ours"))
    for name, b in zip(names, boxes):
        np.savetxt(os.path.join(exp.result_dir, "ours", f"{name}.txt"), b, fmt="%.3f", delimiter=",")
    theirs = exp.report(["ours"])["ours"]["overall"]
    np.testing.assert_allclose(ours["success_curve"], theirs["success_curve"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours["precision_curve"], theirs["precision_curve"], rtol=0, atol=1e-12)
    for key in ("success_score", "precision_score", "success_rate"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-12), key
    assert 0.1 < ours["success_score"] < 0.9  # not a degenerate case


def test_got10k_scores_equal_the_got10k_toolkit(tmp_path):
    from got10k.experiments import ExperimentGOT10k
    rng = np.random.default_rng(4)
    results, items, names = [], [], []
    for i, (n, w, h) in enumerate(((30, 320, 240), (45, 200, 150), (21, 640, 360))):
        gt, tr = _random_track(rng, n, w, h, drift=3.0 + 5 * i)
        cover = rng.integers(0, 9, n)
        cover[0] = 8
        name = f"GOT-10k_Val_{i:06d}"
        names.append(name)
        items.append(([], gt, {"cover": cover, "resolution": f"({w}, {h})"}))
        results.append({"name": name, "boxes": tr, "anno": gt, "cover": cover, "resolution": (w, h),
                        "seconds": 0.01 * n})
    ious = [evaluation.got10k_ious(r["boxes"], r["anno"], r["cover"], r["resolution"]) for r in results]
    ours = evaluation.got10k_report(ious)
    assert sum(len(i) for i in ious) == sum(int((r["cover"][1:] > 0).sum()) for r in results)

    exp = ExperimentGOT10k.__new__(ExperimentGOT10k)
    exp.dataset = _Seqs(items, names)
    exp.subset, exp.nbins_iou = "val", 101
    exp.result_dir, exp.report_dir = str(tmp_path / "results"), str(tmp_path / "reports")
    # our record writer in the toolkit's layout, read back by the toolkit
    evaluation.write_got10k_records(results, os.path.join(exp.result_dir, "ours"))
    theirs = exp.report(["ours"])["ours"]["overall"]
    assert ours["ao"] == pytest.approx(theirs["ao"], abs=1e-6)  # boxes rounded to 4 decimals in the records
    assert ours["sr_50"] == pytest.approx(theirs["sr"], abs=1e-12)
    np.testing.assert_allclose(ours["succ_curve"], theirs["succ_curve"], rtol=0, atol=1e-12)
    assert np.linspace(0, 1, 101)[75] == 0.75  # SR@0.75 is the toolkit's curve at 0.75
    assert ours["sr_75"] == pytest.approx(theirs["succ_curve"][75], abs=1e-12)
    assert 0.1 < ours["ao"] < 0.9 and ours["sr_75"] < ours["sr_50"]
    # by hand: boxes are clipped to the image first (a ground truth running 20 px past the right edge)
    gt, tr = np.array([[300.0, 100, 40, 20]]), np.array([[300.0, 100, 20, 20]])
    assert evaluation.rect_iou(tr, gt)[0] == pytest.approx(0.5)
    assert evaluation.rect_iou(tr, gt, bound=(320, 240))[0] == pytest.approx(1.0)
    assert gt[0, 2] == 40  # inputs are not modified (the toolkit clips in place)


def test_normalised_precision_by_hand():
    gt = np.array([[11, 21, 40, 20]] * 4, np.float64)
    shifted = gt + [20, 0, 0, 0]  # 20 px = half the width: normalised error 0.5 on frames 1-3
    np.testing.assert_allclose(evaluation.normalized_center_error(shifted, gt), 0.5)
    _, _, norm = evaluation.sequence_curves(shifted, gt)
    thr = np.linspace(0, 0.5, 51)
    np.testing.assert_allclose(norm, np.where(thr < 0.5, 0.25, 1.0))  # frame 0 is the ground truth
    rep = evaluation.otb_report([evaluation.sequence_curves(shifted, gt)])
    assert rep["norm_precision_score"] == pytest.approx((50 * 0.25 + 1.0) / 51)
    # 10 px in y on a 20 px tall box is 0.5 too
    np.testing.assert_allclose(evaluation.normalized_center_error(gt + [0, 10, 0, 0], gt), 0.5)


def test_tracking_evaluator_scores_and_plots(tmp_path):
    _, builder = siamfc_testlib.tiny_data()
    src = data.VideoSource(builder.data_dir, "validation")

    class Oracle:
        def track(self, frames, box):
            for i in range(len(src)):
                s = src.sequence(i)
                if np.array_equal(s["boxes"][0], box):
                    return s["boxes"][:len(frames)].astype(np.float64)
            raise AssertionError

    ev = evaluation.TrackingEvaluator(src, lambda _: Oracle(), max_frames=6, out_dir=str(tmp_path), title="tiny")
    res = dict(ev.run(None))
    assert res["eval/ao"] == pytest.approx(1.0) and res["eval/sr_75"] == 1.0 and res["eval/sr_50"] == 1.0
    assert res["eval/norm_precision"] == 1.0 and res["eval/success_auc"] == pytest.approx(20 / 21)
    assert res["eval/baseline_ao"] < 0.9
    for kind in ("success", "precision"):
        img = cv2.imread(str(tmp_path / f"eval_{kind}_plot.png"))
        assert img is not None and img.shape[0] > 200 and img.std() > 10, kind
    assert (tmp_path / "eval_tracking.json").exists()


# ------------------------------------------------------------------------------------------ OTB builder
def _frames(folder, numbers, size=(32, 24), skip=()):
    img_dir = os.path.join(folder, "img")
    os.makedirs(img_dir, exist_ok=True)
    for k in numbers:
        if k in skip:
            continue
        img = np.full((size[1], size[0], 3), (k * 7) % 256, np.uint8)
        cv2.imwrite(os.path.join(img_dir, f"{k:04d}.jpg"), img)


def _boxes(n, sep=",", start=1):
    return "\n".join(sep.join(str(v) for v in (2 + (start + t) % 5, 3, 10, 8)) for t in range(n)) + "\n"


def test_otb_local_builder_reads_the_irregular_sequences(tmp_path):
    root = str(tmp_path / "OTB")
    # one target, comma-separated
    _frames(os.path.join(root, "Basketball"), range(1, 7))
    open(os.path.join(root, "Basketball", "groundtruth_rect.txt"), "w").write(_boxes(6))
    # two targets (tab- and space-separated)
    _frames(os.path.join(root, "Jogging"), range(1, 6))
    open(os.path.join(root, "Jogging", "groundtruth_rect.1.txt"), "w").write(_boxes(5, "\t"))
    open(os.path.join(root, "Jogging", "groundtruth_rect.2.txt"), "w").write(_boxes(5, " ", start=3))
    # an empty first target file (Human4): one target left, under the folder's name
    _frames(os.path.join(root, "Human4"), range(1, 5))
    open(os.path.join(root, "Human4", "groundtruth_rect.1.txt"), "w").write("\n")
    open(os.path.join(root, "Human4", "groundtruth_rect.2.txt"), "w").write(_boxes(4))
    # the benchmark's start/end frames: Tiger1 6..354 with one line per image file; David 300..770
    # with one line per evaluated frame; BlurCar1's files are numbered 247..988
    _frames(os.path.join(root, "Tiger1"), range(1, 355))
    open(os.path.join(root, "Tiger1", "groundtruth_rect.txt"), "w").write(_boxes(354))
    _frames(os.path.join(root, "David"), range(1, 771))
    open(os.path.join(root, "David", "groundtruth_rect.txt"), "w").write(_boxes(471, start=300))
    _frames(os.path.join(root, "BlurCar1"), range(247, 989))
    open(os.path.join(root, "BlurCar1", "groundtruth_rect.txt"), "w").write(_boxes(742))
    # bad input, each left out with its reason: a missing frame, a bad line, a zero-size box
    _frames(os.path.join(root, "Car4"), range(1, 6), skip=(3,))
    open(os.path.join(root, "Car4", "groundtruth_rect.txt"), "w").write(_boxes(5))
    _frames(os.path.join(root, "Deer"), range(1, 6))
    open(os.path.join(root, "Deer", "groundtruth_rect.txt"), "w").write("1,2,10,8\n1,2,10,8\n1,2,ten,8\n")
    _frames(os.path.join(root, "Dog1"), range(1, 4))
    open(os.path.join(root, "Dog1", "groundtruth_rect.txt"), "w").write("1,2,10,8\n1,2,0,8\n1,2,10,8\n")

    builder = data.prepare("otb", str(tmp_path / "tfds"), manual_dir=root)
    assert data.default_eval_split(builder) == "test"
    src = data.VideoSource(builder.data_dir, "test")
    seqs = {src.names[i]: src.sequence(i) for i in range(len(src))}
    assert sorted(seqs) == ["Basketball", "BlurCar1", "David", "Human4", "Jogging.1", "Jogging.2", "Tiger1"]
    assert len(seqs["Tiger1"]["boxes"]) == 349 and len(seqs["David"]["boxes"]) == 471
    assert len(seqs["BlurCar1"]["boxes"]) == 742 and len(seqs["Human4"]["boxes"]) == 4
    # Tiger1's first evaluated frame is image 0006 with ground-truth line 6
    i = src.names.index("Tiger1")
    np.testing.assert_allclose(seqs["Tiger1"]["boxes"][0], [2 + 6 % 5, 3, 10, 8])
    assert src.frame(i, 0)[0, 0, 0] in range((6 * 7) - 3, (6 * 7) + 4)  # JPEG of grey level 42
    i = src.names.index("David")
    assert src.frame(i, 0)[0, 0, 0] in range((300 * 7) % 256 - 3, (300 * 7) % 256 + 4)
    np.testing.assert_allclose(seqs["Jogging.2"]["boxes"][0], [2 + 3 % 5, 3, 10, 8])
    np.testing.assert_allclose(seqs["Jogging.1"]["boxes"][:, 2:], 10 * np.ones((5, 2)) - [0, 2])
    assert not any(s["absent"].any() for s in seqs.values())
    problems = validation.read(builder.data_dir)
    text = "\n".join(p.line() for p in problems)
    assert "Car4" in text and "frame 3 missing" in text
    assert "Deer/groundtruth_rect.txt:3: not numbers" in text
    assert "Dog1/groundtruth_rect.txt:2 (frame 2): empty box" in text
    assert len(problems) == 3

    # the benchmark's lists: a listed folder that is not there is named
    b13 = pipeline.prepare("otb_local/otb2013", str(tmp_path / "tfds13"), manual_dir=root)
    names13 = data.VideoSource(b13.data_dir, "test").names
    assert sorted(names13) == ["Basketball", "David", "Jogging.1", "Jogging.2", "Tiger1"]
    missing = [p for p in validation.read(b13.data_dir) if p.what == "sequence folder not found"]
    assert len(missing) == 50 - 7  # Car4, Deer, Dog1 exist but are bad


def test_got10k_builder_leaves_bad_sequences_out_and_reads_the_test_subset(tmp_path):
    root = str(tmp_path / "GOT-10k")

    def seq(split, name, n, gt_lines):
        d = os.path.join(root, split, name)
        os.makedirs(d, exist_ok=True)
        for t in range(n):
            cv2.imwrite(os.path.join(d, f"{t + 1:08d}.jpg"), np.full((60, 80, 3), 10 * t, np.uint8))
        open(os.path.join(d, "groundtruth.txt"), "w").write("\n".join(gt_lines) + "\n")

    seq("train", "GOT-10k_Train_000001", 4, ["5,6,20,10"] * 4)
    seq("train", "GOT-10k_Train_000002", 4, ["5,6,20,10", "5,6,20,10", "5;6;20;10", "5,6,20,10"])
    seq("train", "GOT-10k_Train_000003", 4, ["5,6,20,10", "5,6,-3,10", "5,6,20,10", "5,6,20,10"])
    seq("val", "GOT-10k_Val_000001", 5, [f"{5 + t},6,20,10" for t in range(5)])
    seq("test", "GOT-10k_Test_000001", 6, ["7,8,20,10"])
    builder = data.prepare("got10k", str(tmp_path / "tfds"), manual_dir=root)
    train = data.VideoSource(builder.data_dir, "train")
    assert train.names == ["GOT-10k_Train_000001"] and not train.first_frame_only
    text = "\n".join(p.line() for p in validation.read(builder.data_dir))
    assert "GOT-10k_Train_000002/groundtruth.txt:3: not numbers" in text
    assert "GOT-10k_Train_000003/groundtruth.txt:2: negative box size" in text
    test = data.VideoSource(builder.data_dir, "test")
    assert test.first_frame_only and len(test.sequence(0)["boxes"]) == 6
    np.testing.assert_allclose(test.sequence(0)["boxes"][0], [7, 8, 20, 10])
    assert test.sequence(0)["absent"][1:].all()

    class Still:
        def track(self, frames, box):
            return np.repeat(np.asarray(box, np.float64)[None], len(frames), 0)

    out = tmp_path / "eval"
    ev = evaluation.TrackingEvaluator(test, lambda _: Still(), out_dir=str(out))
    assert [k for k, _ in ev.run(None)] == ["eval/fps"]  # no ground truth to score
    rec = np.loadtxt(out / "eval_got10k_records" / "GOT-10k_Test_000001" / "GOT-10k_Test_000001_001.txt",
                     delimiter=",")
    np.testing.assert_allclose(rec, np.repeat([[7, 8, 20, 10]], 6, 0))
    # a folder without any usable sequence is an error naming why
    bad = str(tmp_path / "bad")
    os.makedirs(os.path.join(bad, "val", "x"))
    with pytest.raises(data.DataError, match="no usable GOT-10k sequence.*no frames"):
        data.prepare("got10k", str(tmp_path / "tfds_bad"), manual_dir=bad)
