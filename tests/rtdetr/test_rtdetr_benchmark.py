"""RT-DETR's benchmark spec (research/rtdetr/benchmark.py) at a tiny size, and the official runner's import check."""

import json
import os

import jax
import numpy as np
import pytest

import research.rtdetr.task  # noqa: F401  (registers "rtdetr")
from configs.rtdetr import get_config
from research import benchmark, tasks
from research.rtdetr import official_torch
from research.rtdetr.matcher import linear_assignment_host

OFFICIAL = os.environ.get("RTDETR_REPO", "/work/official/RT-DETR")


def test_tiny_spec_infer_and_matcher_stages():
    """The harness on the `smoke` model at 64 px: the deploy graph runs, the matcher stage gives its per-call,
    host and per-train-step records (per step = per call x (decoder layers + 1)), and the share of the train
    step is reported through measured_pairs."""
    c = get_config("smoke")
    c.benchmark.train_batch_size = 2
    spec = tasks.task_class("rtdetr").benchmark_spec(c, variant="tiny", image_size=64)
    assert spec.torch_reference_module == "research.rtdetr.official_torch"
    assert spec.info["matcher_calls_per_step"] == 3  # tiny: 2 decoder layers + encoder
    res = benchmark.benchmark(spec, infer_batch=1, train_batch=2, repeats=2, warmup=1, stages=("infer", "extra"))
    by = {r["what"]: r for r in res["records"]}
    assert set(by) == {"infer", "matcher", "matcher_host", "matcher_per_train_step"}
    out = jax.jit(spec.infer_fn)(spec.variables, **spec.make_inputs(1))
    assert [o.shape for o in out] == [(1, 100), (1, 100, 4), (1, 100)]  # eval.num_top_queries 100 (smoke)
    assert np.all(np.diff(np.asarray(out[2])[0]) <= 0)  # scores sorted, top-k
    per_call, per_step = by["matcher"], by["matcher_per_train_step"]
    np.testing.assert_allclose(per_step["times_ms"], np.asarray(per_call["times_ms"]) * 3, rtol=1e-3, atol=3e-3)
    assert per_step["matcher_calls"] == 3 and by["matcher_host"]["median_ms"] > 0
    # the share of a (here made-up, 10x the per-step matcher time) train step, as the ratios report it
    train = benchmark.record("train_step", 2, 64, [per_step["median_ms"] * 10.0])
    ratios = benchmark.ratios(res["records"] + [train], spec, 1, 2)
    assert ratios["matcher_per_train_step_over_train_step_measured"] == pytest.approx(0.1, rel=1e-6)


def test_jitted_matcher_equals_scipy_on_the_stage_shapes():
    """What the matcher stage times is the real assignment: the jitted matcher (cost in XLA, scipy on the host)
    equals scipy on the numpy cost matrix, and each valid target gets a distinct query."""
    from research.rtdetr.matcher import HungarianMatcher
    m = HungarianMatcher()
    rs = np.random.RandomState(0)
    logits = rs.normal(0, 2, (2, 30, 5)).astype(np.float32)
    pred = np.concatenate([rs.uniform(0.1, 0.9, (2, 30, 2)), rs.uniform(0.02, 0.5, (2, 30, 2))], -1).astype(np.float32)
    labels = rs.randint(0, 5, (2, 6)).astype(np.int32)
    boxes = np.concatenate([rs.uniform(0.2, 0.8, (2, 6, 2)), rs.uniform(0.05, 0.3, (2, 6, 2))], -1).astype(np.float32)
    valid = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], bool)  # image 1: no boxes
    got = np.asarray(jax.jit(m.__call__)(logits, pred, labels, boxes, valid))
    want = linear_assignment_host(m.cost_matrix(logits, pred, labels, boxes, valid), valid)
    np.testing.assert_array_equal(got, want)
    assert len(set(got[0, :4])) == 4 and (got[0, 4:] == -1).all() and (got[1] == -1).all()


def test_official_runner_reports_why_it_cannot_time(tmp_path):
    """Without torchvision the official forward pass cannot be imported (rtdetr_decoder -> denoising -> box_ops
    -> torchvision): the runner writes the import chain instead of timings and exits normally."""
    if not os.path.isdir(OFFICIAL):
        pytest.skip(f"no official clone at {OFFICIAL} (set RTDETR_REPO)")
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is importable here: the official runner would time the model")
    except Exception:
        pass
    out = tmp_path / "torch.json"
    official_torch.main([f"--repo={OFFICIAL}", "--variant=r18vd", "--image_size=64", "--repeats=1", f"--out={out}"])
    res = json.load(open(out))
    assert not any(isinstance(v, list) for v in res.values())  # no timings
    msg = res["skipped"]
    for part in ("src/zoo/rtdetr/rtdetr_decoder.py:", "src/zoo/rtdetr/denoising.py:", "src/zoo/rtdetr/box_ops.py:",
                 "torchvision"):
        assert part in msg, (part, msg)
    with pytest.raises(FileNotFoundError, match="not a lyuwenyu/RT-DETR clone"):
        official_torch.code_root(str(tmp_path))
