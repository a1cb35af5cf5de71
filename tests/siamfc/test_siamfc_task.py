"""SiamFC task: pair sampling, transforms, data builders, tracking evaluator, optimiser, and --mode=all.

Sampling and transforms were also checked against the official `siamfc/datasets.py` /
`siamfc/transforms.py` fed the same random draws (`transforms.LegacyRandom`): identical crops,
filters and pairs (docs/siamfc.md); these tests pin the same behaviour by value.
"""

import json
import os

import cv2
import flax.linen as flax_nn
import jax
import numpy as np
import pytest

import research.siamfc.task as siamfc_task  # registers "siamfc"
from configs import siamfc as siamfc_config
from research import modes, tasks
from research.siamfc import data, evaluation
from research.siamfc import transforms as T
import siamfc_testlib


# ------------------------------------------------------------------------------------------ sampling
def test_filter_frames_applies_every_official_condition():
    wh = (400, 300)
    anno = np.array([
        [1, 1, 40, 30],     # 0 ok
        [1, 1, 19, 30],     # 1 side < 20
        [1, 1, 40, 151],    # 2 h / H > 0.5
        [1, 1, 100, 24],    # 3 aspect 4.17 > 4
        [1, 1, 24, 100],    # 4 aspect 0.24 < 0.25
        [1, 1, 200, 150],   # 5 ok (exactly 0.5 of each side)
        [1, 1, 600, 100],   # 6 w > 500 (and > 0.5 W)
        [1, 1, 21, 84],     # 7 ok (aspect 0.25)
    ], np.float64)
    assert T.filter_frames(wh, anno).tolist() == [0, 5, 7]
    # cover > max(1, 0.3 * max): with max 8 the threshold is 2.4
    cover = np.array([3, 8, 8, 8, 8, 2, 8, 0])
    assert T.filter_frames(wh, anno, cover).tolist() == [0]
    # absent frames go as well (cover 0 already does that on GOT-10k)
    assert T.filter_frames(wh, anno, absent=np.array([0, 0, 0, 0, 0, 1, 0, 0], bool)).tolist() == [0, 7]
    # a 1 % floor relative to the image side
    assert T.filter_frames((3000, 3000), np.array([[1, 1, 25, 40]])).tolist() == []


def test_sample_pair_is_ordered_close_and_seeded():
    rng = np.random.default_rng(0)
    assert T.sample_pair(np.array([7]), rng) == (7, 7)
    assert T.sample_pair(np.array([3, 250]), rng) == (3, 250)  # two frames: those, whatever the gap
    idx = np.arange(0, 400, 3)
    pairs = [T.sample_pair(idx, np.random.default_rng(s)) for s in range(200)]
    assert all(z < x and x - z < 100 and z in idx and x in idx for z, x in pairs)
    assert pairs == [T.sample_pair(idx, np.random.default_rng(s)) for s in range(200)]
    # no two usable frames closer than 100: after 100 draws one frame twice
    z, x = T.sample_pair(np.array([0, 150, 300]), np.random.default_rng(1))
    assert z == x and z in (0, 150, 300)
    with pytest.raises(ValueError, match="no usable frame"):
        T.sample_pair(np.array([], np.int64), rng)


# ------------------------------------------------------------------------------------------ transforms
def _square_scene(size=200, box=(81, 61, 40, 40), color=(250, 10, 10)):
    img = np.full((size, size, 3), 60, np.uint8)
    x, y, w, h = box
    img[y - 1:y - 1 + h, x - 1:x - 1 + w] = color
    return img


def test_crop_instance_geometry_and_mean_padding():
    img = _square_scene()
    # 40 x 40 box: context 40, exemplar side 80, instance side 80 * 255 / 127 = 160.6 -> 161 px
    crop = T.crop_instance(img, (81, 61, 40, 40), 255, 127, 0.5, cv2.INTER_NEAREST)
    assert crop.shape == (255, 255, 3) and crop.dtype == np.uint8
    red = np.nonzero((crop[..., 0] > 200).any(0))[0]
    assert abs(len(red) - 40 * 255 / 161) <= 1.5  # the box, scaled by 255 / 161
    assert abs((red[0] + red[-1]) / 2 - 127) <= 1.0  # centred
    # a box at the corner: the part outside the image is the image's mean colour
    crop = T.crop_instance(img, (1, 1, 40, 40), 255, 127, 0.5, cv2.INTER_NEAREST)
    mean = np.round(img.mean(axis=(0, 1))).astype(np.uint8)
    np.testing.assert_array_equal(crop[0, 0], mean)


def test_center_crop_random_crop_and_stretch_values():
    img = np.arange(255 * 255 * 3, dtype=np.int64).reshape(255, 255, 3).astype(np.uint8)
    out = T.center_crop(img, 247)
    np.testing.assert_array_equal(out, img[4:251, 4:251])
    # official padding: 242 px -> round(-2.5) = -2 (half to even) -> 2 px of mean colour -> 246 px
    small = np.full((242, 242, 3), 9, np.uint8)
    small[0, 0] = 255
    out = T.center_crop(small, 247)
    assert out.shape == (246, 246, 3)
    np.testing.assert_array_equal(out[0, 0], np.round(small.mean(axis=(0, 1))).astype(np.uint8))
    np.testing.assert_array_equal(out[2, 2], [255, 255, 255])
    assert T.random_stretch(img, 1.05, cv2.INTER_LINEAR).shape == (268, 268, 3)  # round(267.75)
    assert T.random_stretch(img, 0.95, cv2.INTER_AREA).shape == (242, 242, 3)  # round(242.25)
    seen = set()
    for s in range(60):
        c = T.random_crop(np.arange(247 * 247).reshape(247, 247), 239, np.random.default_rng(s))
        i, j = divmod(int(c[0, 0]), 247)
        assert 0 <= i <= 8 and 0 <= j <= 8 and c.shape == (239, 239)
        np.testing.assert_array_equal(c, np.arange(247 * 247).reshape(247, 247)[i:i + 239, j:j + 239])
        seen.add(i)
    assert seen == set(range(9))  # every offset 0..8 is reachable (inclusive upper end)


def test_siamfc_transforms_sizes_centre_and_determinism():
    img = _square_scene()
    tr = T.SiamFCTransforms()
    z, x = tr(img, img, (81, 61, 40, 40), (81, 61, 40, 40), np.random.default_rng(3))
    assert z.shape == (127, 127, 3) and x.shape == (239, 239, 3) and z.dtype == x.dtype == np.uint8
    z2, x2 = tr(img, img, (81, 61, 40, 40), (81, 61, 40, 40), np.random.default_rng(3))
    np.testing.assert_array_equal(z, z2)
    np.testing.assert_array_equal(x, x2)
    # exemplar: the 40 px box spans 40 * 127 / 80 = 63.5 px (x stretch <= 5 %), centred within the
    # random crop's +-4 px (+ 5 % stretch of the centre offset)
    red = np.nonzero((z[..., 0] > 200).any(0))[0]
    assert 58 <= len(red) <= 69 and abs((red[0] + red[-1]) / 2 - 63) <= 5
    red = np.nonzero((x[..., 0] > 200).any(0))[0]
    assert 58 <= len(red) <= 69 and abs((red[0] + red[-1]) / 2 - 119) <= 5


# ------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def tiny_data():
    return siamfc_testlib.tiny_data()  # prepared once per test process


def test_synthetic_builder_is_deterministic_and_boxes_are_exact(tiny_data, tmp_path):
    d, builder = tiny_data
    cfg = data.SiamfcSyntheticVideos.builder_configs["tiny"]
    again = data.prepare("synthetic", str(tmp_path), config="tiny")
    a, b = data.VideoSource(builder.data_dir, "train"), data.VideoSource(again.data_dir, "train")
    assert len(a) == cfg.num_train and a.names == b.names
    for i in (0, 5):
        np.testing.assert_array_equal(a.sequence(i)["boxes"], b.sequence(i)["boxes"])
        np.testing.assert_array_equal(a.frame(i, 3), b.frame(i, 3))
        q = data.render_sequence(cfg, "train", i)
        np.testing.assert_array_equal(a.frame(i, 3), q["frames"][3])  # PNG is lossless
        np.testing.assert_allclose(a.sequence(i)["boxes"], q["boxes"], atol=1e-4)
    # a rendered target with no distractors fills exactly its box: 1-based [x, y, w, h]
    clean = data.SyntheticVideosConfig(name="clean", num_distractors=0, absent_prob=0.0)
    q = data.render_sequence(clean, "train", 2)
    q_bg = data.render_sequence(data.SyntheticVideosConfig(name="bg", num_distractors=0, absent_prob=1.0,
                                                           num_frames=9), "train", 2)
    assert q_bg["absent"].any() and (q_bg["cover"][q_bg["absent"]] == 0).all()
    background = q_bg["frames"][np.nonzero(q_bg["absent"])[0][0]]  # an absent frame: background only
    for t in (0, 5):
        x, y, w, h = q["boxes"][t].astype(int)
        changed = np.nonzero((q["frames"][t].astype(int) != background.astype(int)).any(-1))
        assert changed[1].min() >= x - 1 and changed[1].max() <= x - 2 + w
        assert changed[0].min() >= y - 1 and changed[0].max() <= y - 2 + h
    val = data.VideoSource(builder.data_dir, "validation")
    assert not any(val.sequence(i)["absent"].any() for i in range(len(val)))  # OTB-style evaluation videos


def _write_got10k(root, n_frames=5, gt=None, absence=None, corrupt=None):
    seq = os.path.join(root, "train", "GOT-10k_Train_000001")
    os.makedirs(seq, exist_ok=True)
    rng = np.random.default_rng(0)
    for t in range(n_frames):
        cv2.imwrite(os.path.join(seq, f"{t + 1:08d}.jpg"), rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
    if corrupt is not None:
        open(os.path.join(seq, f"{corrupt:08d}.jpg"), "wb").write(b"not a jpeg")
    gt = gt if gt is not None else [f"{10 + t},{20 + t},40.5,30" for t in range(n_frames)]
    open(os.path.join(seq, "groundtruth.txt"), "w").write("\n".join(gt) + "\n")
    open(os.path.join(seq, "absence.label"), "w").write("\n".join(absence or ["0"] * n_frames) + "\n")
    open(os.path.join(seq, "cover.label"), "w").write("\n".join(["8"] * n_frames) + "\n")
    os.makedirs(os.path.join(root, "val"), exist_ok=True)
    return seq


def test_got10k_local_builder_reads_and_validates(tmp_path):
    root = str(tmp_path / "got")
    seq = _write_got10k(root)
    builder = data.prepare("got10k", str(tmp_path / "tfds"), manual_dir=root)
    src = data.VideoSource(builder.data_dir, "train")
    s = src.sequence(0)
    assert s["name"] == "GOT-10k_Train_000001" and (s["width"], s["height"]) == (160, 120)
    np.testing.assert_allclose(s["boxes"][2], [12, 22, 40.5, 30])
    np.testing.assert_array_equal(src.frame(0, 4), cv2.imread(os.path.join(seq, "00000005.jpg"))[..., ::-1])
    with pytest.raises(ValueError, match="no split 'validation'"):  # val/ holds no sequence: left out
        data.VideoSource(builder.data_dir, "validation")
    # named errors
    bad = str(tmp_path / "bad")
    with pytest.raises(data.DataError, match=r"groundtruth.txt:3: 3 values"):
        data.read_got10k_sequence(_write_got10k(bad, gt=["1,1,30,30", "1,1,30,30", "1,1,30", "1,1,30,30",
                                                         "1,1,30,30"]))
    with pytest.raises(data.DataError, match=r"groundtruth.txt:2: box .* outside the 160x120 image"):
        data.read_got10k_sequence(_write_got10k(bad, gt=["1,1,30,30", "500,1,30,30", "1,1,30,30", "1,1,30,30",
                                                         "1,1,30,30"]))
    with pytest.raises(data.DataError, match=r"groundtruth.txt:4: empty box"):
        data.read_got10k_sequence(_write_got10k(bad, gt=["1,1,30,30"] * 3 + ["1,1,0,0", "1,1,30,30"]))
    # ... unless the frame is marked absent
    data.read_got10k_sequence(_write_got10k(bad, gt=["1,1,30,30"] * 3 + ["1,1,0,0", "1,1,30,30"],
                                            absence=["0", "0", "0", "1", "0"]))
    with pytest.raises(data.DataError, match=r"00000003.jpg: unreadable or corrupt"):
        data.read_got10k_sequence(_write_got10k(str(tmp_path / "bad2"), corrupt=3))
    with pytest.raises(data.DataError, match=r"groundtruth.txt: 4 boxes for 5 frames"):
        data.read_got10k_sequence(_write_got10k(str(tmp_path / "bad3"), gt=["1,1,30,30"] * 4))


# ------------------------------------------------------------------------------------------ evaluator
def test_otb_measures_by_hand():
    gt = np.array([[11, 21, 40, 20]] * 4, np.float64)
    # a perfect tracker: IoU exactly 1, which is not > 1, so the last of the 21 bins is 0 (toolkit's AUC 20/21)
    rep = evaluation.otb_report([evaluation.sequence_curves(gt.copy(), gt)])
    assert rep["success_score"] == pytest.approx(20 / 21) and rep["precision_score"] == 1.0
    assert rep["success_rate"] == 1.0
    # frame 0 is always the ground truth; frames 1-3 shifted by 20 px in x: IoU 20 / 60 = 1/3, error 20 px
    shifted = gt + [20, 0, 0, 0]
    ious = evaluation.rect_iou(shifted, gt)
    np.testing.assert_allclose(ious, 1 / 3)
    succ, prec, _ = evaluation.sequence_curves(shifted, gt)
    thr = np.linspace(0, 1, 21)
    np.testing.assert_allclose(succ, np.where(thr < 1 / 3, 1.0, 0.25) * (thr < 1) + (thr == 1) * 0.0)
    assert prec[19] == 0.25 and prec[20] == 1.0  # <= 20 px counts
    # curves average over sequences before the scores; absent frames are left out
    rep = evaluation.otb_report([(succ, prec), evaluation.sequence_curves(gt.copy(), gt)])
    assert rep["success_score"] == pytest.approx((np.mean(succ) + 20 / 21) / 2)
    absent = np.array([0, 1, 1, 1], bool)
    succ_a, _, _ = evaluation.sequence_curves(shifted, gt, absent)
    np.testing.assert_allclose(succ_a, np.r_[np.ones(20), 0.0])
    assert evaluation.center_error(np.array([[1, 1, 3, 3]]), np.array([[4, 5, 3, 3]]))[0] == 5.0


class _Oracle:
    """A tracker that returns the ground truth."""

    def __init__(self, source):
        self.source = source

    def track(self, frames, box):
        for i in range(len(self.source)):
            s = self.source.sequence(i)
            if np.array_equal(s["boxes"][0], box):
                return s["boxes"][:len(frames)].astype(np.float64)
        raise AssertionError


def test_evaluator_on_a_perfect_tracker(tiny_data):
    _, builder = tiny_data
    src = data.VideoSource(builder.data_dir, "validation")
    ev = evaluation.TrackingEvaluator(src, lambda _: _Oracle(src), max_frames=5)
    res = dict(ev.run(None))
    assert res["eval/success_auc"] == pytest.approx(20 / 21)  # the toolkit's maximum
    assert res["eval/precision_20px"] == 1.0 and res["eval/success_rate_50"] == 1.0
    # the "box stays where it started" baseline on the same frames: the first frame's box everywhere
    seqs = ev.last["sequences"]
    still = evaluation.otb_report([evaluation.sequence_curves(np.repeat(r["anno"][:1], len(r["anno"]), 0), r["anno"],
                                                              r["absent"]) for r in seqs])
    assert res["eval/baseline_success_auc"] == pytest.approx(still["success_score"])
    assert res["eval/baseline_precision_20px"] == pytest.approx(still["precision_score"])
    assert res["eval/baseline_success_auc"] < res["eval/success_auc"]  # the synthetic targets move
    # a tracker that does return the first box scores exactly the baseline
    class _Still:
        def track(self, frames, box):
            return np.repeat(np.asarray(box, np.float64)[None], len(frames), 0)
    res_still = dict(evaluation.TrackingEvaluator(src, lambda _: _Still(), max_frames=5).run(None))
    assert res_still["eval/success_auc"] == pytest.approx(res["eval/baseline_success_auc"])


# ------------------------------------------------------------------------------------------ optimiser, loader
def test_optimizer_matches_torch_sgd_with_exponential_lr():
    torch = pytest.importorskip("torch")
    c = siamfc_config.get_config("smoke")
    c.optim.initial_lr, c.optim.ultimate_lr = 0.1, 0.001
    task = siamfc_task.Task(c, "export")
    steps = tasks.Steps(steps_per_epoch=2, total_steps=6, num_epochs=3)
    p0 = np.array([1.0, -2.0, 0.5], np.float32)
    tx = task.make_optimizer({"w": p0}, steps)
    params, state = {"w": jax.numpy.asarray(p0)}, tx.init({"w": p0})
    w = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, (0.001 / 0.1) ** (1 / 3))
    import optax
    for epoch in range(3):
        for k in range(2):
            g = np.array([0.3, -1.0, 2.0], np.float32) * (epoch * 2 + k + 1)
            upd, state = tx.update({"w": g}, state, params)
            params = optax.apply_updates(params, upd)
            opt.zero_grad()
            w.grad = torch.tensor(g)
            opt.step()
        sched.step()
        np.testing.assert_allclose(np.asarray(params["w"]), w.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert task.log_hyperparams(4)["lr"] == pytest.approx(0.1 * 0.01 ** (2 / 3), rel=1e-6)


def test_loader_slices_and_resumes(tiny_data):
    d, _ = tiny_data
    c = siamfc_config.get_config("smoke")
    c.data.data_dir = d
    task = siamfc_task.Task(c)
    src = task.source("train")
    sampler = T.PairSampler(src, task.transforms)
    full = T.pair_dataset(sampler, batch_size=4, seed=0)
    halves = [T.pair_dataset(sampler, batch_size=4, seed=0, process_index=p, process_count=2) for p in (0, 1)]
    for b in (0, 3):  # batch 3 crosses into the second epoch (12 sequences)
        np.testing.assert_array_equal(np.concatenate([h[b]["search"] for h in halves]), full[b]["search"])
    assert all(len(set(full[b]["sequence"].tolist())) == 4 for b in range(3))  # one epoch: distinct sequences
    # the loader's state is the number of global batches consumed
    it = iter(task.train_loader())
    uninterrupted = [next(it) for _ in range(4)]
    assert it.get_state() == {"global_batches": 4}
    resumed = iter(task.train_loader({"global_batches": 3}))
    third = next(resumed)
    for k in ("exemplar", "search", "frames", "sequence"):
        np.testing.assert_array_equal(third[k], uninterrupted[3][k])
    assert resumed.get_state() == {"global_batches": 4}
    assert not np.array_equal(uninterrupted[2]["search"], uninterrupted[3]["search"])  # the check can fail
    # resumed on 2 processes from the same state: process 0 + process 1 = the 1-process global batch
    parts = [next(iter(task.train_loader({"global_batches": 3}, process_index=p, process_count=2))) for p in (0, 1)]
    assert parts[0]["search"].shape[0] == 2
    for k in ("exemplar", "search", "frames"):
        np.testing.assert_array_equal(np.concatenate([q[k] for q in parts]), uninterrupted[3][k])
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        iter(task.train_loader(None, process_index=0, process_count=3))


# ------------------------------------------------------------------------------------------ end to end
def test_mode_all_smoke_trains_evaluates_predicts_and_exports(tiny_data, tmp_path):
    d, _ = tiny_data
    c = siamfc_config.get_config("smoke")
    c.data.data_dir = d
    wd = str(tmp_path / "wd")
    res = modes.run(c, wd, "all")
    assert res["perf/train_step_compiles"] == 1
    records = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    for f in ("export/model.onnx", "export/model.pt", "eval_onnx_tracking.json", "curves.png"):
        assert os.path.exists(os.path.join(wd, f)), f
    assert len(res["predictions"]) == 2 and cv2.imread(res["predictions"][0]).shape == (384, 384, 3)
    # the ONNX tracker follows the JAX tracker (same responses up to float round-off -> same boxes)
    assert res["eval_onnx/success_auc"] == pytest.approx(res["eval/success_auc"], abs=1e-6)
    # the ONNX graph equals the JAX model for any batch, exemplar i paired with search i
    from research.bridge.onnx_export import OnnxRunner
    task = tasks.get_task(c, "export")
    variables, _ = modes.restore_variables(task, wd)
    rng = np.random.default_rng(0)
    for b in (1, 3):
        z = rng.uniform(0, 255, (b, 127, 127, 3)).astype(np.float32)
        x = rng.uniform(0, 255, (b, 255, 255, 3)).astype(np.float32)
        ours = np.asarray(task.model.apply(variables, z, x)["response"])
        onnx = OnnxRunner(res["onnx"])(exemplar=z, search=x)[0]
        assert onnx.shape == (b, 17, 17, 1)
        np.testing.assert_allclose(onnx, ours, rtol=1e-4, atol=1e-5 * np.abs(ours).max())
    sd = task.to_torch(variables)
    assert "backbone.conv1.0.weight" in sd and sd["backbone.conv1.0.weight"].shape == (8, 3, 11, 11)


def test_training_lowers_the_loss(tiny_data, tmp_path):
    """48 steps on the tiny videos: the balanced loss of the last steps is clearly below the first."""
    d, _ = tiny_data
    c = siamfc_config.get_config("smoke")
    c.data.data_dir = d
    c.data.pairs_per_seq = 8
    c.batch_size = 8
    c.total_steps = 48
    c.log_every_steps = 1
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 48
    wd = str(tmp_path / "learn")
    modes.run(c, wd, "train")
    loss = [json.loads(line)["train/loss"] for line in open(os.path.join(wd, "metrics.jsonl"))
            if "train/loss" in line]
    assert np.mean(loss[-12:]) < 0.9 * np.mean(loss[:6]), loss


def test_config_variants_and_crop_geometry():
    official = siamfc_config.get_config("data=got10k")
    assert official.model.variant == "alexnet_v1" and official.batch_size == 8 and official.num_epochs == 50
    assert (official.optim.initial_lr, official.optim.ultimate_lr) == (1e-2, 1e-5)
    assert (official.optim.weight_decay, official.optim.momentum, official.loss.r_pos) == (5e-4, 0.9, 16.0)
    assert siamfc_config.get_config().model.variant == "tiny"
    with pytest.raises(ValueError, match="unknown config argument 'varient'"):
        siamfc_config.get_config("varient=tiny")
    assert [siamfc_task.embedding_size(s) for s in (87, 127, 239, 255)] == [1, 6, 20, 22]
    with pytest.raises(ValueError, match="too small"):
        siamfc_task.embedding_size(80)
    task = siamfc_task.Task(siamfc_config.get_config("smoke"), "export")
    s = task.tracker_settings()
    assert (s.exemplar_sz, s.instance_sz, s.response_sz, s.upscale_sz) == (127, 255, 17, 272)


def test_conv_impl_choices_build_the_same_variables():
    from research.cpu.kernels import onednn
    c = siamfc_config.get_config("smoke")
    assert siamfc_task.resolve_conv_impl("auto") == ("onednn" if onednn.available()[0] else "split")
    assert siamfc_task.resolve_conv_impl("lax") == "lax"
    with pytest.raises(ValueError, match="conv_impl='fast'"):
        siamfc_task.resolve_conv_impl("fast")
    shapes = {}
    for impl in ("lax", "split", "dot"):
        c.model.conv_impl = impl
        model = siamfc_task.build_model(c)
        assert (model.layers is not None) == (impl == "dot")
        shapes[impl] = jax.tree_util.tree_map(lambda a: a.shape, jax.eval_shape(
            lambda m=model: m.init(jax.random.PRNGKey(0), np.zeros((1, 87, 87, 3)), np.zeros((1, 87, 87, 3)))))
        assert model.slice_pool == model.fast_xcorr == (impl != "lax")  # the faster inference forms on CPU
    assert shapes["lax"] == shapes["split"] == shapes["dot"]
    exported = siamfc_task.build_model(c, export=True)
    assert exported.conv is flax_nn.Conv and not exported.slice_pool and not exported.fast_xcorr
