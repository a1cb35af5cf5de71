"""`--mode=benchmark` for SiamFC at tiny width: the records, the ONNX check, the measured pairs.

The official runner (`research/siamfc/official_torch.py`) is exercised when `SIAMFC_REPO` names a
clone of huanglianghua/siamfc-pytorch (it needs got10k and the full-width network: ~1 min).
"""

import json
import math
import os

import numpy as np
import pytest

from configs.siamfc import get_config
from research import benchmark
from research.siamfc import benchmark as siamfc_bench


def tiny_config():
    c = get_config("smoke")
    c.benchmark.variant = "tiny"
    c.benchmark.batch_size = 3
    c.benchmark.train_batch_size = 2
    c.benchmark.repeats = 2
    c.benchmark.tracker_frames = 3
    return c


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("bench"))
    benchmark.run(tiny_config(), workdir)
    with open(os.path.join(workdir, "benchmark.json")) as f:
        return json.load(f)


def _positive(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def test_records(result):
    by = {r["what"]: r for r in result["records"]}
    assert {"infer", "onnx_infer", "train_step", "template", "tracker_frame", "onnx_tracker_frame"} <= set(by)
    assert (by["infer"]["batch"], by["infer"]["image_size"]) == (3, 255)  # 3 scales of 255 px
    assert by["train_step"]["batch"] == 2 and (by["template"]["batch"], by["template"]["image_size"]) == (1, 127)
    for what in ("infer", "onnx_infer", "train_step", "template", "tracker_frame", "onnx_tracker_frame"):
        r = by[what]
        assert _positive(r["median_ms"]) and r["min_ms"] <= r["median_ms"], what
    assert by["onnx_infer"]["rel_err_vs_jax"] < 1e-4  # search.onnx = the JAX search branch, [3, 1, 17, 17]
    for what in ("tracker_frame", "onnx_tracker_frame"):
        r = by[what]
        assert r["repeats"] == 3 and r["fps"] == pytest.approx(1000.0 / r["median_ms"])
    # the search branch runs the template's backbone on 3 larger crops: more FLOPs, more time
    assert by["infer"]["flops"] > 3 * by["template"]["flops"] > 0
    assert result["recompilation"]["ok"], result["recompilation"]
    assert result["model"]["params"] == 9296 and math.isfinite(by["train_step"]["loss_first_step"])


def test_measured_pairs_give_same_run_ratios():
    spec = siamfc_bench.benchmark_spec(tiny_config(), variant="tiny", image_size=255)
    recs = [benchmark.record("infer", 3, 255, [40.0]), benchmark.record("template", 1, 127, [5.0]),
            benchmark.record("tracker_frame", 1, 255, [30.0, 50.0]),
            benchmark.record("onnx_tracker_frame", 1, 255, [20.0]), benchmark.record("torch_infer", 3, 255, [80.0]),
            benchmark.record("torch_template", 1, 127, [10.0]), benchmark.record("torch_tracker_frame", 1, 255, [60.0])]
    r = benchmark.ratios(recs, spec, infer_batch=3, train_batch=8)
    assert r["tracker_frame_over_torch_tracker_frame_measured"] == pytest.approx(40.0 / 60.0)
    assert r["onnx_tracker_frame_over_torch_tracker_frame_measured"] == pytest.approx(20.0 / 60.0)
    assert r["template_over_torch_template_measured"] == pytest.approx(0.5)
    assert r["infer_over_torch_infer_measured"] == pytest.approx(0.5)


def test_synthetic_video_is_deterministic_and_moves():
    a, box = siamfc_bench.synthetic_video(4)
    b, _ = siamfc_bench.synthetic_video(4)
    assert a.shape == (4, 360, 640, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    x, y, w, h = (int(v) for v in box)
    # the textured target fills the box in frame 0 and has moved by (3, 2) px in frame 1
    assert a[0, y - 1:y - 1 + h, x - 1:x - 1 + w].std() > 40
    f0, f1 = a[0].astype(int), a[1].astype(int)
    patch = f0[y - 1:y - 1 + h, x - 1:x - 1 + w]
    assert np.abs(f1[y + 1:y + 1 + h, x + 2:x + 2 + w] - patch).max() < 25  # pixel noise only
    assert np.abs(f1[y - 1:y - 1 + h, x - 1:x - 1 + w] - patch).max() > 100


@pytest.mark.skipif(not os.environ.get("SIAMFC_REPO"), reason="SIAMFC_REPO (official clone) not set")
def test_official_runner(tmp_path):
    from research.siamfc import official_torch
    out = str(tmp_path / "torch.json")
    official_torch.main([f"--repo={os.environ['SIAMFC_REPO']}", "--repeats=1", "--tracker_frames=2", f"--out={out}"])
    res = json.load(open(out))
    for key in ("infer", "template", "template_and_search", "train_step", "tracker_frame"):
        assert len(res[key]) >= 1 and all(t > 0 for t in res[key]), key
    with pytest.raises(ValueError, match="only alexnet_v1"):
        official_torch.measure(os.environ["SIAMFC_REPO"], variant="tiny")
