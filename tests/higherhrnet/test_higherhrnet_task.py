"""HigherHRNet task: targets by value, augmentation consistency, builder determinism and validation, OKS evaluator,
and a smoke `--mode=all` through research.modes.run (trains, loss falls, evaluates, predicts, exports ONNX = JAX)."""

import json
import os

import cv2
import numpy as np
import pytest

import research.higherhrnet.task  # noqa: F401  (registers "higherhrnet")
from configs.higherhrnet import get_config
from research.higherhrnet import data, evaluation, targets
from research.higherhrnet import transforms as T


# ------------------------------------------------------------------------------------------------ targets


def test_heatmap_gaussian_peak_and_sigma():
    j = np.zeros((1, 17, 3))
    j[0, 3] = (10.7, 20.2, 2)  # int() truncation: the peak is at pixel (10, 20)
    j[0, 5] = (31.0, 5.0, 1)  # labelled but occluded: still a target
    j[0, 6] = (40.0, 5.0, 2)  # outside a 32-pixel map: skipped
    j[0, 7] = (5.0, 5.0, 0)  # not labelled: skipped
    hm = targets.heatmaps(j, 32, 17, sigma=2.0)
    assert hm.shape == (32, 32, 17) and hm.dtype == np.float32
    assert hm[20, 10, 3] == 1.0 and hm[..., 3].max() == 1.0
    np.testing.assert_allclose(hm[20, 12, 3], np.exp(-4 / 8), rtol=1e-6)  # exp(-d^2 / (2 sigma^2)), d = 2
    np.testing.assert_allclose(hm[23, 11, 3], np.exp(-10 / 8), rtol=1e-6)
    # the (6 sigma + 3)-pixel window reaches 3 sigma + 1 = 7 pixels either side of the peak, not 8
    np.testing.assert_allclose(hm[20, 17, 3], np.exp(-49 / 8), rtol=1e-6)
    assert hm[20, 18, 3] == 0 and hm[20, 2, 3] == 0 and hm[20, 3, 3] > 0
    assert hm[5, 31, 5] == 1.0
    assert hm[..., 6].max() == 0 and hm[..., 7].max() == 0
    # two people: the maximum, not the sum
    j2 = np.concatenate([j, j], 0)
    np.testing.assert_array_equal(targets.heatmaps(j2, 32, 17), hm)


def test_joint_indices_packed_per_person():
    j = np.zeros((2, 17, 3))
    j[0, 0] = (3, 4, 2)
    j[0, 2] = (5, 6, 1)
    j[0, 4] = (40, 6, 2)  # outside
    j[1, 16] = (1, 2, 2)
    idx = targets.joint_indices(j, 30, 32)
    assert idx.shape == (30, 17, 2) and idx.dtype == np.int32
    assert idx[0, 0].tolist() == [4 * 32 + 3, 1]
    assert idx[0, 1].tolist() == [2 * 32 * 32 + 6 * 32 + 5, 1]
    assert idx[0, 2:].sum() == 0 and idx[2:].sum() == 0
    assert idx[1, 0].tolist() == [16 * 32 * 32 + 2 * 32 + 1, 1]
    assert targets.joint_indices(j, 30, 32, tag_per_joint=False)[1, 0].tolist() == [2 * 32 + 1, 1]


# ------------------------------------------------------------------------------------------------ transforms


def _scene():
    img = np.zeros((96, 128, 3), np.uint8)
    joints = np.zeros((1, 17, 3))
    joints[0, :, :2] = np.stack([np.linspace(20, 100, 17), np.linspace(15, 80, 17)], 1)
    joints[0, :, 2] = 2
    for x, y, _ in joints[0]:
        cv2.circle(img, (int(round(x)), int(round(y))), 2, (255, 255, 255), -1)
    ignore = np.zeros((96, 128), np.uint8)
    ignore[:20, :30] = 1
    return img, ignore, joints


def test_flip_twice_is_identity():
    img, ignore, joints = _scene()
    masks = [np.random.default_rng(0).random((32, 32)) > 0.5, np.random.default_rng(1).random((64, 64)) > 0.5]
    js = [joints * 0.25, joints * 0.5]
    once = T.horizontal_flip(img, masks, js, data.COCO_FLIP_INDEX, (32, 64))
    twice = T.horizontal_flip(*once, data.COCO_FLIP_INDEX, (32, 64))
    np.testing.assert_array_equal(twice[0], img)
    for a, b in zip(twice[1], masks):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(twice[2], js):
        np.testing.assert_allclose(a, b)
    # one flip swaps left/right labels: the right eye's new x is the mirrored left eye's
    assert once[2][0][0, 2, 0] == 32 - js[0][0, 1, 0] - 1


def test_export_normalisation_equals_the_training_one():
    """The exported graph's channels-first normalisation gives the same values as ToTensor + Normalize."""
    x = np.random.default_rng(0).random((2, 8, 6, 3)).astype(np.float32)
    ref = T.normalize(x, max_value=1.0)
    np.testing.assert_allclose(np.asarray(T.normalize_for_export(x)), np.asarray(ref), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ref)[0, 0, 0], (x[0, 0, 0] - np.array(T.MEAN)) / np.array(T.STD), rtol=1e-6)


def test_affine_moves_joints_with_the_image():
    """Every joint lands where its drawn dot lands, at the input and at both output resolutions; masks follow."""
    img, ignore, joints = _scene()
    cfg = T.AugmentConfig(input_size=128, output_sizes=(32, 64), flip_prob=0.0)
    for seed in range(3):
        out, masks, js = T.augment(img, ignore, joints, cfg, np.random.default_rng(seed))
        assert out.shape == (128, 128, 3) and [m.shape for m in masks] == [(32, 32), (64, 64)]
        j_in = js[1][0] * 2.0  # output 64 -> input 128 pixels
        for x, y, v in j_in:
            if 3 <= x < 125 and 3 <= y < 125:
                assert out[int(round(y)) - 1:int(round(y)) + 2, int(round(x)) - 1:int(round(x)) + 2].max() > 100
        np.testing.assert_allclose(js[0][..., :2] * 2, js[1][..., :2], atol=1e-9)  # same map, scaled
        np.testing.assert_array_equal(js[0][..., 2], joints[..., 2])
        assert 0 < masks[1].mean() < 1  # the ignore corner and the outside become 0
    # same seed, same augmentation
    a = T.augment(img, ignore, joints, T.AugmentConfig(128, (32, 64)), np.random.default_rng(7))
    b = T.augment(img, ignore, joints, T.AugmentConfig(128, (32, 64)), np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[2][1], b[2][1])


# ------------------------------------------------------------------------------------------------ data


def test_synthetic_render_is_deterministic_and_valid():
    cfg = data.SyntheticConfig(name="t", image_size=96)
    a, b = data.render_example(cfg, "train", 5), data.render_example(cfg, "train", 5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["image"], data.render_example(cfg, "train", 6)["image"])
    for i in range(20):
        ex = data.render_example(cfg, "validation", i)
        k = ex["keypoints"]
        lab = k[..., 2] > 0
        assert ((k[..., 0] >= 0) & (k[..., 0] < 96) & (k[..., 1] >= 0) & (k[..., 1] < 96))[lab].all()
        assert np.isin(k[..., 2], (0, 1, 2)).all()
        np.testing.assert_array_equal(ex["num_keypoints"], lab.sum(1))
        assert (ex["num_keypoints"] > 0).sum() >= 1


def _coco_folder(root, keypoints=None, image_id=1, write_image=True, corrupt=False):
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, "images", "val2017"), exist_ok=True)
    os.makedirs(os.path.join(root, "images", "train2017"), exist_ok=True)
    path = os.path.join(root, "images", "val2017", "a.jpg")
    if write_image:
        if corrupt:
            open(path, "wb").write(b"not an image")
        else:
            cv2.imwrite(path, np.full((40, 50, 3), 90, np.uint8))
    kp = keypoints if keypoints is not None else [10, 10, 2] + [0, 0, 0] * 16
    ann = {"images": [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 50}],
           "annotations": [{"id": 7, "image_id": image_id, "category_id": 1, "keypoints": kp, "num_keypoints": 1,
                            "area": 100.0, "bbox": [5, 5, 10, 10], "iscrowd": 0},
                           {"id": 8, "image_id": 1, "category_id": 1, "keypoints": [0] * 51, "num_keypoints": 0,
                            "area": 50.0, "bbox": [30, 20, 10, 10], "iscrowd": 0,
                            "segmentation": [[30, 20, 40, 20, 40, 30, 30, 30]]}],
           "categories": [{"id": 1, "name": "person"}]}
    p = os.path.join(root, "annotations", "person_keypoints_val2017.json")
    json.dump(ann, open(p, "w"))
    return p, os.path.join(root, "images", "val2017")


def _examples(ann, imgs):
    from research.data import validation
    report = validation.Collector()
    return list(data.generate_coco_examples(ann, imgs, report=report)), report.problems


def test_coco_folder_records_and_named_problems(tmp_path):
    """Issue 10 on the keypoints path: each bad entry is named (file, ids, what, action) and skipped or
    repaired; the run goes on with what is usable."""
    ann, imgs = _coco_folder(str(tmp_path / "ok"))
    ((key, rec),), problems = _examples(ann, imgs)
    assert problems == []
    assert key == 1 and rec["keypoints"].shape == (2, 17, 3) and rec["ann_id"].tolist() == [7, 8]
    ignore = cv2.imdecode(np.frombuffer(rec["ignore"], np.uint8), cv2.IMREAD_GRAYSCALE)
    assert ignore[25, 35] == 1 and ignore[10, 10] == 0  # the person without keypoints is ignored (get_mask)

    # a labelled joint outside the image: that joint unlabelled, the other kept
    ((_, rec),), (p,) = _examples(*_coco_folder(str(tmp_path / "out"), [60, 10, 2, 12, 14, 2] + [0] * 45))
    assert (p.image_id, p.annotation_id, p.action) == (1, 7, "those joints set to unlabelled") and "[0]" in p.what
    np.testing.assert_array_equal(rec["keypoints"][0, :2], [[0, 0, 0], [12, 14, 2]])
    assert rec["num_keypoints"].tolist() == [1, 0]
    # an annotation of an unknown image: dropped, the image kept with its other person
    ((_, rec),), (p,) = _examples(*_coco_folder(str(tmp_path / "id"), image_id=3))
    assert (p.image_id, p.annotation_id, p.action) == (3, 7, "dropped") and rec["ann_id"].tolist() == [8]
    # a missing or corrupt image: skipped and named
    recs, (p,) = _examples(*_coco_folder(str(tmp_path / "miss"), write_image=False))
    assert recs == [] and p.file.endswith("a.jpg") and "cannot read" in p.what and p.image_id == 1
    recs, (p,) = _examples(*_coco_folder(str(tmp_path / "bad"), corrupt=True))
    assert recs == [] and p.file.endswith("a.jpg") and p.what == "cannot decode the image"
    # keypoints of the wrong length: the person kept as unannotated, so its region is masked out
    ((_, rec),), (p,) = _examples(*_coco_folder(str(tmp_path / "len"), [1, 2, 2]))
    assert "51 finite numbers, got 3" in p.what and p.annotation_id == 7
    assert rec["num_keypoints"].tolist() == [0, 0] and not rec["keypoints"][0].any()
    # string ids and missing fields (no bbox, area, iscrowd): normalised as for detection
    root = str(tmp_path / "str")
    ann, imgs = _coco_folder(root)
    d = json.load(open(ann))
    d["images"][0]["id"] = "1"
    d["annotations"][0] = {"id": "7", "image_id": "1", "category_id": 1, "keypoints": [10, 10, 2, 20, 30, 1] + [0] * 45}
    json.dump(d, open(ann, "w"))
    ((key, rec),), (p,) = _examples(ann, imgs)
    assert key == 1 and p.action == "box taken from its labelled keypoints" and p.annotation_id == "7"
    np.testing.assert_allclose(rec["bbox"][0], [10, 10, 10, 20])
    np.testing.assert_allclose(rec["area"][0], 200.0)
    assert rec["is_crowd"].tolist() == [0, 0] and rec["num_keypoints"].tolist() == [2, 0]


# ------------------------------------------------------------------------------------------------ evaluation


def test_ground_truth_as_prediction_gives_ap_1():
    cfg = data.SyntheticConfig(name="t", image_size=128)
    recs = []
    for i in range(6):
        ex = data.render_example(cfg, "validation", i)
        ex.update(image_id=i + 1, ann_id=np.arange(len(ex["bbox"])) + 10 * (i + 1))
        recs.append(ex)
    gt = data.coco_ground_truth(recs)
    results = []
    for r in recs:
        keep = r["num_keypoints"] > 0
        results += evaluation.people_to_results(r["image_id"], r["keypoints"][keep], np.ones(keep.sum()))
    stats = evaluation.oks_ap(gt, results)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR"] == pytest.approx(1.0)
    # shifted keypoints lose AP; no results give 0
    moved = [dict(r, keypoints=[v + 6.0 if n % 3 < 2 else v for n, v in enumerate(r["keypoints"])])
             for r in results]
    assert evaluation.oks_ap(gt, moved)["AP"] < 0.9
    assert evaluation.oks_ap(gt, [])["AP"] == 0.0


# ------------------------------------------------------------------------------------------------ end to end


def test_smoke_mode_all(tmp_path):
    from research import modes
    from research.bridge.onnx_export import OnnxRunner
    config = get_config("smoke")
    config.data.data_dir = str(tmp_path / "data")
    config.total_steps = 8
    config.optim.lr = 3e-3
    wd = str(tmp_path / "wd")
    results = modes.run(config, wd, "all")
    assert results["perf/train_step_compiles"] == 1
    losses = [json.loads(line).get("train/loss") for line in open(os.path.join(wd, "metrics.jsonl"))]
    losses = [v for v in losses if v is not None]
    assert len(losses) == 4 and np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    for key in ("eval/AP", "eval_onnx/AP"):
        assert 0.0 <= results[key] <= 1.0
    assert len(results["predictions"]) == 2 and all(os.path.exists(p) for p in results["predictions"])
    assert os.path.exists(results["torch_pt"])
    # the exported graph equals the JAX model on the same variables
    task = research.higherhrnet.task.Task(config, "export")
    variables, _ = modes.restore_variables(task, wd)
    x = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    ref = [np.asarray(o) for o in task.forward_fn(variables)(x)]
    got = OnnxRunner(results["onnx"])(images=x)
    assert [g.shape for g in got] == [(2, 16, 16, 34), (2, 32, 32, 17)]
    import onnx  # the head's ONNX form (model.HigherHRNet.onnx_form): every BatchNorm folded into a convolution
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(results["onnx"]).graph.node}
    for r, g in zip(ref, got):
        assert np.abs(r - g).max() <= 1e-4 * np.abs(r).max()
    assert "deconv_layers.0.0.0.weight" in task.to_torch(variables)


def test_loader_batches_are_deterministic_and_resumable(tmp_path):
    config = get_config("smoke")
    config.data.data_dir = str(tmp_path / "data")
    task = research.higherhrnet.task.Task(config, "train")
    assert task.num_train_examples() == 32
    it = iter(task.train_loader())
    first = next(it)
    assert first["image"].shape == (4, 64, 64, 3) and first["image"].dtype == np.uint8
    assert first["heatmaps_0"].shape == (4, 16, 16, 17) and first["heatmaps_1"].shape == (4, 32, 32, 17)
    assert first["mask_1"].shape == (4, 32, 32) and first["joints_0"].shape == (4, 30, 17, 2)
    assert first["heatmaps_1"].max() == 1.0 and first["joints_1"][..., 1].sum() > 0
    state = it.get_state()
    assert state == {"global_batches": 1}  # the position is global batches, whatever the process count
    second = next(it)
    third = next(it)
    again = iter(task.train_loader())
    for k, v in next(again).items():
        np.testing.assert_array_equal(v, first[k])
    resumed = iter(task.train_loader(state))
    for k, v in next(resumed).items():
        np.testing.assert_array_equal(v, second[k])
    # resumed on 2 processes at the same position: their slices joined are the 1-process batch
    halves = [next(iter(task.train_loader(state, process_index=p, process_count=2))) for p in (0, 1)]
    for k, v in second.items():
        assert halves[0][k].shape[0] == 2
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), v)
    # a 2-process run's state resumes a 1-process run: after 2 batches both read the third
    it2 = iter(task.train_loader(None, process_index=1, process_count=2))
    next(it2), next(it2)
    for k, v in next(iter(task.train_loader(it2.get_state()))).items():
        np.testing.assert_array_equal(v, third[k])
    assert not np.array_equal(second["image"], third["image"])


def test_config_variants_and_official_schedule():
    from research.higherhrnet.task import lr_schedule, model_config
    for arg, (net, size, batch) in {"variant=w32_512,data=coco": ("w32", 512, 96),
                                    "variant=w32_640,data=coco": ("w32", 640, 96),
                                    "variant=w48_640,data=coco": ("w48", 640, 80)}.items():
        c = get_config(arg)
        assert (c.model.variant, c.data.input_size, tuple(c.data.output_sizes), c.batch_size) == (
            net, size, (size // 4, size // 2), batch)
        assert (c.optim.lr, tuple(c.optim.lr_steps), c.optim.lr_factor, c.num_epochs) == (1e-3, (200, 260), 0.1, 300)
        assert (c.data.max_rotation, c.data.min_scale, c.data.max_scale, c.data.max_translate) == (30, 0.75, 1.5, 40)
    crowd = get_config("variant=w32_512,data=crowdpose")
    assert crowd.data.num_joints == 14 and tuple(crowd.data.flip_index) == data.CROWDPOSE_FLIP_INDEX
    assert model_config(crowd).num_joints == 14
    default = get_config()
    assert (default.model.variant, default.data.name, default.data.input_size) == ("small", "synthetic", 128)
    assert (default.num_epochs, tuple(default.optim.lr_steps)) == (20, (14, 18))
    assert get_config("variant=tiny").model.variant == "tiny"
    with pytest.raises(ValueError, match="variant"):
        get_config("variant=w64")
    # MultiStepLR stepped at each epoch start: epoch e trains at lr * 0.1^(#milestones <= e + 1)
    sched = lr_schedule(1e-3, (200, 260), 0.1, steps_per_epoch=10)
    assert float(sched(1989)) == pytest.approx(1e-3)
    assert float(sched(1990)) == pytest.approx(1e-4)
    assert float(sched(2589)) == pytest.approx(1e-4)
    assert float(sched(2590)) == pytest.approx(1e-5)


def test_coco_folder_cut_jpeg_kept_and_empty_validation_split_left_out(tmp_path):
    """Issue 10 cases 8 and 4 on the keypoints path: a JPEG missing only its end marker is restored and
    trained on; a validation json listing no images leaves that split out (named), training still prepares."""
    import shutil

    import ml_collections
    from research.data import validation
    root = str(tmp_path / "coco")
    ann, imgs = _coco_folder(root)
    pix = np.zeros((40, 50, 3), np.uint8)
    pix[5:15, 5:15] = 220
    ok, enc = cv2.imencode(".jpg", pix)
    with open(os.path.join(root, "images", "train2017", "a.jpg"), "wb") as f:
        f.write(enc.tobytes()[:-2])  # no FFD9 end marker
    shutil.copy(ann, ann.replace("val2017", "train2017"))
    json.dump({"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}, open(ann, "w"))
    cfg = ml_collections.ConfigDict(dict(name="coco", num_joints=17, train_set="train2017", validation_set="val2017",
                                         manual_dir=root, data_dir=str(tmp_path / "tfds")))
    builder = data.prepare(cfg)
    assert list(builder.info.splits) == ["train"]
    r = data.decode_record(data.open_split(builder, "train")[0])
    assert r["image"].shape == (40, 50, 3) and r["image"][10, 10].min() > 180  # the pixels are there
    lines = [(os.path.basename(p.file), p.what, p.action) for p in validation.read(builder.data_dir)]
    assert not [x for x in lines if x[0] == "a.jpg" and "skipped" in x[2]]  # kept (restored if it must be)
    assert ("person_keypoints_val2017.json", '"images" is empty',
            "no 'validation' split (evaluation on it will say so)") in lines


def test_keypoints_extreme_aspect_and_uncapped_scoring_ground_truth(tmp_path):
    """Issue 10 cases 1 and 6 on the keypoints path: a 2000 x 10 image prepares and augments into a full training
    example (the official affine keeps every side >= 1 px); 35 people in one image are all in the ground truth
    that scores, while the training targets keep the official 30 (DATASET.MAX_NUM_PEOPLE)."""
    from research.higherhrnet import targets
    root = str(tmp_path / "wide")
    ann, imgs = _coco_folder(root)
    cv2.imwrite(os.path.join(imgs, "a.jpg"), np.full((10, 2000, 3), 90, np.uint8))
    d = json.load(open(ann))
    d["images"][0].update(height=10, width=2000)
    d["annotations"] = [{"id": 100 + n, "image_id": 1, "category_id": 1, "iscrowd": 0, "num_keypoints": 1,
                         "keypoints": [20 + 50 * n, 5, 2] + [0] * 48, "bbox": [10 + 50 * n, 0, 20, 10], "area": 200.0}
                        for n in range(35)]
    json.dump(d, open(ann, "w"))
    ((key, rec),), problems = _examples(ann, imgs)
    assert problems == [] and rec["keypoints"].shape == (35, 17, 3)
    gt = data.coco_ground_truth([{**{k: v for k, v in rec.items() if k != "image"}, "hw": (10, 2000)}])
    assert len(gt["annotations"]) == 35 and gt["images"][0]["width"] == 2000
    image = cv2.imdecode(np.frombuffer(rec["image"], np.uint8), cv2.IMREAD_COLOR)
    aug = T.AugmentConfig(input_size=128, output_sizes=(32, 64))
    for seed in range(3):
        img, masks, joints = T.augment(image, np.zeros((10, 2000), np.uint8), rec["keypoints"], aug,
                                       np.random.default_rng(seed))
        assert img.shape == (128, 128, 3) and [m.shape for m in masks] == [(32, 32), (64, 64)]
        assert all(np.isfinite(j).all() for j in joints)
    ind = targets.joint_indices(np.tile([[[1.0, 1.0, 2.0]]], (35, 17, 1)), 30, 32)
    assert ind.shape == (30, 17, 2) and int(ind[..., 1].sum()) == 30 * 17  # the training cap, not the scoring


def test_coco_folder_prepares_through_tfds(tmp_path):
    import shutil

    import ml_collections
    root = str(tmp_path / "coco")
    ann, imgs = _coco_folder(root)
    shutil.copy(ann, ann.replace("val2017", "train2017"))
    shutil.copy(os.path.join(imgs, "a.jpg"), os.path.join(root, "images", "train2017", "a.jpg"))
    cfg = ml_collections.ConfigDict(dict(name="coco", num_joints=17, train_set="train2017", validation_set="val2017",
                                         manual_dir=root, data_dir=str(tmp_path / "tfds")))
    r = data.decode_record(data.open_split(data.prepare(cfg), "validation")[0])
    assert r["image"].shape == (40, 50, 3) and r["ignore"].sum() == 100  # the 10 x 10 no-keypoint person
    assert r["keypoints"].shape == (2, 17, 3) and r["ann_id"].tolist() == [7, 8] and r["filename"] == "a.jpg"
    gt = data.coco_ground_truth([dict(r, hw=(40, 50))])
    assert [a["num_keypoints"] for a in gt["annotations"]] == [1, 0]
    from research.data import validation
    first = data.prepare(cfg)
    assert validation.read(first.data_dir) == []  # a clean folder: nothing to report
    d = json.load(open(ann))  # an edited json is prepared anew, with its problems recorded (issue 10 case 3)
    d["annotations"][0]["keypoints"] = [60, 10, 2] + [0] * 48
    json.dump(d, open(ann, "w"))
    again = data.prepare(cfg)
    assert again.data_dir != first.data_dir
    (p,) = validation.read(again.data_dir)
    assert (p.image_id, p.annotation_id, p.action) == (1, 7, "those joints set to unlabelled")
