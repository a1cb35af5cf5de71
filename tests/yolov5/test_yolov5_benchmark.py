"""`--mode=benchmark` on the tiny YOLOv5 at 64 px: the json's records, ratios and environment."""

import json
import math
import os

import pytest

from configs.yolov5 import get_config
from research import benchmark

RECORD_FIELDS = ("what", "batch", "image_size", "median_ms", "min_ms", "images_per_s", "compile_s", "flops",
                 "flops_per_s", "peak_rss_mb")


def tiny_config():
    c = get_config("smoke")  # locked: only existing fields are set
    c.benchmark.variant = "tiny"
    c.benchmark.image_size = 64
    c.benchmark.batch_size = 1
    c.benchmark.train_batch_size = 2
    c.benchmark.repeats = 2
    return c


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("bench"))
    out = benchmark.run(tiny_config(), workdir)
    with open(os.path.join(workdir, "benchmark.json")) as f:
        return out, json.load(f), workdir


def _positive(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def test_records(result):
    _, data, workdir = result
    by = {r["what"]: r for r in data["records"]}
    assert {"infer", "train_step", "onnx_infer"} <= set(by), list(by)
    for r in data["records"]:
        for k in RECORD_FIELDS:
            assert k in r, (r["what"], k)
        assert r["image_size"] == 64
        for k in ("median_ms", "min_ms", "images_per_s", "compile_s"):
            assert _positive(r[k]), (r["what"], k, r[k])
        assert r["min_ms"] <= r["median_ms"]
        assert r["repeats"] == 2
    assert by["infer"]["batch"] == 1 and by["onnx_infer"]["batch"] == 1 and by["train_step"]["batch"] == 2
    for what in ("infer", "train_step", "onnx_infer"):
        r = by[what]
        for k in ("flops", "flops_per_s", "peak_rss_mb"):
            assert _positive(r[k]), (what, k, r[k])
    # the train step costs more than the forward it contains
    assert by["train_step"]["flops"] > 2 * by["infer"]["flops"]
    assert by["infer"]["lower_s"] < by["infer"]["compile_s"]
    # conftest's persistent compilation cache may serve the executables: flagged per record
    assert isinstance(by["infer"]["compile_cache_hit"], bool)
    assert isinstance(by["train_step"]["compile_cache_hit"], bool)
    mem = by["train_step"]["xla_memory"]
    assert mem is None or all(v >= 0 for v in mem.values())
    assert os.path.exists(by["onnx_infer"]["onnx_path"])
    assert by["onnx_infer"]["onnx_path"].startswith(os.path.join(os.path.abspath(workdir), "benchmark"))
    assert by["onnx_infer"]["rel_err_vs_jax"] < 1e-3
    assert math.isfinite(by["train_step"]["loss_first_step"])


def test_no_recompilation(result):
    _, data, _ = result
    assert data["recompilation"]["ok"], data["recompilation"]
    for what in ("infer", "train_step"):
        rc = data["recompilation"][what]
        assert rc["jit_cache_size_end"] == 1 and rc["backend_compiles_after_first_call"] == 0


def test_ratios_reference_and_environment(result):
    out, data, _ = result
    r = data["ratios"]
    assert _positive(r["onnx_over_jax_infer_time"])
    # tiny @ 64 px is not the reference setting: no comparison with the torch figures
    assert r["jax_infer_over_torch_reference"] is None and r["jax_train_step_over_torch_reference"] is None
    assert r["comparable_to_reference"] == {"infer": False, "train": False}
    from research.yolov5.benchmark import REFERENCE
    ref = data["reference"]
    assert ref["infer_ms"] == list(REFERENCE["infer_ms"]) and ref["train_step_ms"] == list(REFERENCE["train_step_ms"])
    env = data["environment"]
    for k in ("jax", "XLA_FLAGS", "cpu_count"):
        assert k in env
    assert data["model"]["variant"] == "tiny" and data["model"]["nc"] == 80
    assert out["path"].endswith("benchmark.json")


def test_table_and_comparable_setting():
    recs = [benchmark.record("infer", 1, 640, [120.0, 130.0, 125.0], flops=16.5e9, compile_s=1.0),
            benchmark.record("train_step", 2, 640, [850.0, 870.0], flops=1e11, compile_s=2.0),
            benchmark.record("onnx_infer", 1, 640, [90.0, 95.0], flops=16.5e9, compile_s=0.5)]
    assert recs[0]["median_ms"] == 125.0 and recs[0]["images_per_s"] == pytest.approx(8.0)
    assert recs[0]["flops_per_s"] == pytest.approx(16.5e9 / 0.125)
    from research.yolov5.benchmark import REFERENCE
    spec = benchmark.BenchSpec(name="yolov5", variant="s", image_size=640, variables={}, make_inputs=None,
                               infer_fn=None, make_batch=None, loss_fn=None, tx=None, ema_decay=None, use_ema=True,
                               reference=REFERENCE)
    r = benchmark.ratios(recs, spec, infer_batch=1, train_batch=2)
    assert r["jax_infer_over_torch_reference"] == pytest.approx(125.0 / 135.0)
    assert r["jax_infer_meets_target"] and r["jax_train_step_meets_target"] and r["onnx_faster_than_jax"]
    assert r["xla_flops_over_official_gflops"] == pytest.approx(1.0)
    text = benchmark.table(recs)
    assert "train_step" in text and "onnx_infer" in text


def test_custom_call_flops_counts_onednn_convolutions():
    import jax
    import jax.numpy as jnp

    from research import benchmark
    from research.cpu import conv
    x, w = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 4))
    macs = 2 * 8 * 8 * 4 * (3 * 3 * 8)  # output elements x taps x input channels
    fwd = jax.jit(lambda x, w: conv.conv2d(x, w, 2, 1, impl="onednn")).lower(x, w).compile()
    assert benchmark.custom_call_flops(fwd.as_text()) == 2 * macs
    # gradients of a sum: input and kernel gradient; the unused forward is removed by XLA
    grad = jax.jit(jax.grad(lambda x, w: conv.conv2d(x, w, 2, 1, impl="onednn").sum(), (0, 1)))
    assert benchmark.custom_call_flops(grad.lower(x, w).compile().as_text()) == 2 * 2 * macs
    assert benchmark._cost_flops(fwd) >= 2 * macs
