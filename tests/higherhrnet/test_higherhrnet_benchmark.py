"""HigherHRNet benchmark spec at tiny size through the shared harness (all stages, values checked), the grouping on the
planted benchmark maps, and the official runner on the local clone when there is one."""

import os

import numpy as np
import pytest

from configs.higherhrnet import get_config
from research import benchmark
from research.higherhrnet import bench_inputs, inference
from research.higherhrnet import benchmark as hb

# a clone of HRNet/HigherHRNet-Human-Pose-Estimation (the runner test takes ~1.5 min on 2 busy cores: opt-in)
OFFICIAL = os.environ.get("HIGHERHRNET_REPO", "")


def test_spec_runs_every_stage_at_tiny_size(tmp_path):
    spec = hb.benchmark_spec(get_config("smoke"), variant="tiny", image_size=64)
    res = benchmark.benchmark(spec, infer_batch=1, train_batch=2, repeats=1, warmup=1, out_dir=str(tmp_path))
    by = {r["what"]: r for r in res["records"]}
    assert {"infer", "onnx_infer", "train_step", "grouping", "single_scale"} <= set(by)
    assert by["onnx_infer"]["rel_err_vs_jax"] <= 1e-4
    assert np.isfinite(by["train_step"]["loss_first_step"]) and by["train_step"]["loss_first_step"] > 0
    g = by["grouping"]
    assert g["share_of_single_scale"] == pytest.approx(g["median_ms"] / by["single_scale"]["median_ms"])
    assert res["recompilation"]["ok"]
    with pytest.raises(ValueError, match="variant"):
        hb.benchmark_spec(get_config("smoke"), variant="w64", image_size=64)


def test_grouping_finds_the_planted_people():
    """The benchmark maps are meaningful: the 12 planted people come out as the 12 best groups, every joint on a
    planted peak (the tags separate them); the few other groups are stray single joints (a person's score is its
    mean joint value: one joint of <= 0.95 out of 17 scores <= 0.056)."""
    from research.higherhrnet.group import PostprocessSettings
    heat, tags = bench_inputs.planted_maps(256, 17, num_people=12, seed=0)
    settings = PostprocessSettings(input_size=256)
    people = inference.people_from_maps(heat[None], tags[None], (128.0, 128.0), (1.28, 1.28), settings)[0]
    order = np.argsort(-people["scores"])
    best, rest = order[:12], order[12:]
    assert (people["scores"][best] > 0.5).all() and (people["scores"][rest] < 0.06).all()
    # joints matched on planted peaks (heights 0.3-0.95); where two people's same joints overlap, NMS keeps one peak
    found = (people["adjusted"][best][..., 2] > 0.25).sum(1)
    assert found.min() >= 15 and found.sum() >= 0.95 * 12 * 17


@pytest.mark.skipif(not (OFFICIAL and os.path.isdir(OFFICIAL)), reason="HIGHERHRNET_REPO names no official clone")
def test_official_runner_small(tmp_path):
    pytest.importorskip("torch")
    from research.higherhrnet import official_torch
    out = official_torch.measure(OFFICIAL, variant="w32_512", image_size=64, infer_batch=1, train_batch=1, repeats=1)
    assert out["params"] == 28_645_331  # the official model, built from the official yaml
    assert len(out["infer"]) == 1 and len(out["train_step"]) == 1 and out["infer"][0] > 0
    try:  # the official export, with a fixed and with a symbolic batch (the form ours ships)
        import onnxruntime  # noqa: F401
        assert len(out["onnx_infer"]) == 1 and len(out["onnx_infer_dynamic"]) == 1
        assert out["batches"]["onnx_infer_dynamic"] == 1
    except ImportError:
        assert "onnx" in out["notes"]
    try:
        import munkres  # noqa: F401
        assert len(out["grouping"]) == 1
    except ImportError:
        assert "grouping" not in out and "munkres" in out["notes"]
